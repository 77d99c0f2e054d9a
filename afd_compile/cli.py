"""`afd` command line: generate, chat, bench."""

from __future__ import annotations

import argparse
import os
import sys

from afd_compile.errors import AfdError


def _engine_args(p: argparse.ArgumentParser) -> None:
    from afd_compile.model.loader import DEFAULT_MODEL

    p.add_argument("--model", default=str(DEFAULT_MODEL), help="HF checkpoint directory (default: the shipped demo model)")
    p.add_argument("--enforce-eager", action="store_true", help="run without torch.compile, as in vLLM")
    p.add_argument("--max-model-len", type=int, default=None, help="context length (default: min(model, 2048))")
    p.add_argument("--max-num-seqs", type=int, default=16, help="KV cache slots: most sequences at once")
    p.add_argument("--dtype", default="float32", help="float32, bfloat16 or float16")


def _sampling_args(p: argparse.ArgumentParser, default_max_tokens: int) -> None:
    p.add_argument("--max-tokens", type=int, default=default_max_tokens)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=-1)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--presence-penalty", type=float, default=0.0)
    p.add_argument("--frequency-penalty", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")


def _sampling_params(args):
    from afd_compile.engine import SamplingParams

    return SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, min_p=args.min_p,
                          repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                          frequency_penalty=args.frequency_penalty, seed=args.seed, max_tokens=args.max_tokens,
                          stop=args.stop)


def _engine(args):
    from afd_compile.config import EngineConfig
    from afd_compile.engine import LLMEngine

    return LLMEngine(EngineConfig(model=args.model, enforce_eager=args.enforce_eager, max_model_len=args.max_model_len,
                                  max_num_seqs=args.max_num_seqs, dtype=args.dtype))


def cmd_generate(args) -> None:
    params = _sampling_params(args)
    engine = _engine(args)
    prompts = [engine.encode_chat([{"role": "user", "content": p}]) if args.chat else p for p in args.prompt]
    for completion in engine.generate(prompts, params):
        print(completion.text.strip() if args.chat else completion.text, flush=True)


def cmd_chat(args) -> None:
    params = _sampling_params(args)
    engine = _engine(args)
    messages = []
    print("afd chat: empty line or Ctrl-D to quit", file=sys.stderr)
    while True:
        try:
            line = input("> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        try:
            seq = engine.add_request(engine.encode_chat(messages), params)
        except AfdError as e:  # e.g. the conversation outgrew the context: report and keep chatting
            print(f"error: {e}", file=sys.stderr)
            messages.clear()
            continue
        shown = ""
        while not seq.finished:
            engine.step()
            print(seq.output_text[len(shown):], end="", flush=True)
            shown = seq.output_text
        print()
        messages.append({"role": "assistant", "content": seq.output_text.strip()})


def cmd_bench(args) -> None:
    from benchmarks import run_scenario

    run_scenario(args)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="afd", description="Attention-FFN disaggregated MoE inference")
    sub = ap.add_subparsers(dest="command", required=True)

    p = sub.add_parser("generate", help="complete prompts and print only the completions, one per line")
    _engine_args(p)
    _sampling_args(p, default_max_tokens=32)
    p.add_argument("--chat", action="store_true", help="wrap each prompt as a user message with the chat template")
    p.add_argument("prompt", nargs="+")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("chat", help="interactive chat with the model")
    _engine_args(p)
    _sampling_args(p, default_max_tokens=64)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("bench", help="run a benchmark scenario (results under benchmarks/results/)")
    _engine_args(p)
    p.add_argument("--scenario", choices=["monolithic"], required=True)
    p.add_argument("--batch-sizes", default="1,16,64", help="comma-separated decode batch sizes")
    p.add_argument("--steps", type=int, default=32, help="decode steps measured per configuration")
    p.add_argument("--out", default=None, help="JSON result path (default: benchmarks/results/<scenario>.json)")
    p.set_defaults(func=cmd_bench)
    return ap


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except AfdError as e:
        print(f"afd: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
