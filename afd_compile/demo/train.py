"""Train the shipped demo model: `python -m afd_compile.demo.train --out models/afd-demo-moe`.

Each sequence is a chat turn or raw text ("<|bos|> 2 4 6" continued "8 10 12 ..."), so both
/v1/chat/completions and /v1/completions work. `--init DIR` continues from a saved model (the
shipped one was trained on chat turns, then continued on the mix: training_log.txt has both runs).
Reproducible (fixed seed, fixed step count) and CPU-only. Trains transformers'
DeepseekV2ForCausalLM, the same class the oracle tests compare against, and saves it with
`save_pretrained` (safetensors) next to the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from afd_compile.demo.tasks import CONTINUATION, MIN_SHOWN, RAW_TERMS, held_out_set, sample
from afd_compile.demo.tokenizer import build_tokenizer

FORMATS = ("chat", "raw")


PRESET = Path(__file__).resolve().parents[2] / "configs" / "afd-demo-moe.json"


def demo_config(tok, preset: Path = PRESET) -> DeepseekV2Config:
    """The architecture preset (configs/afd-demo-moe.json) plus the tokenizer's vocabulary."""
    return DeepseekV2Config(**json.loads(preset.read_text()), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def encode(tok, seq, with_answer: bool, fmt: str = "chat") -> list[int]:
    """The prompt as the engine encodes it: the chat template for "chat", the tokenizer (bos
    first) for "raw". with_answer: a chat turn adds the answer and eos; raw text goes on for
    RAW_TERMS terms (eos only where the sequence leaves 0..MAX_NUMBER), as text does: where a
    raw prompt ends is not in its tokens, so it cannot have an answer of its own length."""
    if fmt == "chat":
        messages = [{"role": "user", "content": seq.prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
        if with_answer:
            ids = ids + tok(seq.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return ids
    if not with_answer:
        return tok(seq.prompt, add_special_tokens=True)["input_ids"]
    terms = seq.raw_terms()
    ids = tok(" ".join(map(str, terms)), add_special_tokens=True)["input_ids"]
    return ids + ([tok.eos_token_id] if len(terms) < RAW_TERMS else [])


def make_batch(tok, rng: random.Random, batch_size: int, formats=FORMATS):
    rows = []  # (ids, index of the first token with a loss)
    for _ in range(batch_size):
        seq = sample(rng, held_out=False)
        fmt = formats[0] if len(formats) == 1 else rng.choice(formats)  # one format: the first run's draws
        # chat: loss on the answer only; raw: on every term from the MIN_SHOWN-th on
        first = len(encode(tok, seq, with_answer=False, fmt=fmt)) if fmt == "chat" else 1 + MIN_SHOWN
        rows.append((encode(tok, seq, with_answer=True, fmt=fmt), first))
    width = max(len(ids) for ids, _ in rows)
    input_ids = torch.full((batch_size, width), tok.pad_token_id)
    labels = torch.full((batch_size, width), -100)
    for row, (ids, first) in enumerate(rows):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, first : len(ids)] = torch.tensor(ids[first:])
    return input_ids, labels


def load_balance_loss(router_logits, top_k: int) -> torch.Tensor:
    """Switch-Transformer auxiliary loss: keeps every expert in use, which expert parallelism needs."""
    total = 0.0
    for logits in router_logits:
        probs = logits.softmax(-1)
        chosen = F.one_hot(probs.topk(top_k, dim=-1).indices, probs.shape[-1]).sum(1).float()
        total = total + probs.shape[-1] * (chosen.mean(0) * probs.mean(0)).sum() / top_k
    return total / len(router_logits)


@torch.no_grad()
def held_out_accuracy(model, tok, fmt: str, n: int = 200) -> float:
    seqs = held_out_set(n)
    prompts = [encode(tok, s, with_answer=False, fmt=fmt) for s in seqs]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (ids != tok.pad_token_id).long()
    # raw text goes on past the answer: its first CONTINUATION tokens (fewer where it ends) are it
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10 if fmt == "chat" else CONTINUATION,
                         do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(t.strip() == s.answer for t, s in zip(texts, seqs)) / n


def mark_single_turn(out: Path) -> None:
    """Trained on one user turn each: says so in generation_config.json, where chat front ends
    read it (loader.single_turn). Written by hand: transformers drops keys it does not know."""
    path = out / "generation_config.json"
    config = json.loads(path.read_text())
    path.write_text(json.dumps({**config, "afd_single_turn": True}, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("models/afd-demo-moe"))
    ap.add_argument("--preset", type=Path, default=PRESET, help="architecture (DeepseekV2Config fields) as JSON")
    ap.add_argument("--init", type=Path, help="continue from this saved model instead of random weights")
    ap.add_argument("--formats", default=",".join(FORMATS), help="prompt formats to draw from: chat, raw")
    ap.add_argument("--warmup", type=int, default=300, help="steps of linear learning-rate warm-up")
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    formats = args.formats.split(",")
    if not set(formats) <= set(FORMATS) or not formats:
        ap.error(f"--formats: {args.formats!r}; accepted: a comma list of {', '.join(FORMATS)}")
    tok = build_tokenizer()
    if args.init:
        model = DeepseekV2ForCausalLM.from_pretrained(args.init, dtype=torch.float32)
        config = model.config
    else:
        config = demo_config(tok, args.preset)
        model = DeepseekV2ForCausalLM(config)
    print(f"python -m afd_compile.demo.train {' '.join(sys.argv[1:])}")
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / args.warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))

    start = time.time()
    for step in range(1, args.steps + 1):
        input_ids, labels = make_batch(tok, rng, args.batch_size, formats)
        out = model(input_ids=input_ids, attention_mask=(input_ids != tok.pad_token_id).long(),
                    labels=labels, output_router_logits=True)
        loss = out.loss + 0.01 * load_balance_loss(out.router_logits, config.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        schedule.step()
        if step % 100 == 0:
            print(f"step {step} loss {out.loss.item():.4f} lr {schedule.get_last_lr()[0]:.2e} "
                  f"{time.time() - start:.0f}s", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            exact = ", ".join(f"{fmt} {held_out_accuracy(model, tok, fmt):.3f}" for fmt in FORMATS)
            print(f"step {step} held-out exact: {exact}", flush=True)
            model.train()
            model.save_pretrained(args.out)
            tok.save_pretrained(args.out)
            mark_single_turn(args.out)


if __name__ == "__main__":
    main()
