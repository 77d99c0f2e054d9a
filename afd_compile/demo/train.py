"""Train the shipped demo model: `python -m afd_compile.demo.train --out models/afd-demo-moe`.

Reproducible (fixed seed, fixed step count) and CPU-only. Trains transformers'
DeepseekV2ForCausalLM, the same class the oracle tests compare against, and saves it with
`save_pretrained` (safetensors) next to the tokenizer.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

from afd_compile.demo.tasks import held_out_set, sample
from afd_compile.demo.tokenizer import build_tokenizer

SEQ_LEN = 20  # bos, <|user|>, 8 shown, <|assistant|>, 8 answered, eos


PRESET = Path(__file__).resolve().parents[2] / "configs" / "afd-demo-moe.json"


def demo_config(tok, preset: Path = PRESET) -> DeepseekV2Config:
    """The architecture preset (configs/afd-demo-moe.json) plus the tokenizer's vocabulary."""
    return DeepseekV2Config(**json.loads(preset.read_text()), vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)


def encode(tok, seq, with_answer: bool) -> list[int]:
    messages = [{"role": "user", "content": seq.prompt}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)["input_ids"]
    if with_answer:
        ids = ids + tok(seq.answer, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return ids


def make_batch(tok, rng: random.Random, batch_size: int):
    input_ids = torch.full((batch_size, SEQ_LEN), tok.pad_token_id)
    labels = torch.full((batch_size, SEQ_LEN), -100)
    for row in range(batch_size):
        seq = sample(rng, held_out=False)
        n_prompt = len(encode(tok, seq, with_answer=False))
        ids = encode(tok, seq, with_answer=True)
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, n_prompt : len(ids)] = torch.tensor(ids[n_prompt:])  # loss on the answer only
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
def held_out_accuracy(model, tok, n: int = 200) -> float:
    seqs = held_out_set(n)
    prompts = [encode(tok, s, with_answer=False) for s in seqs]
    width = max(map(len, prompts))
    ids = torch.tensor([[tok.pad_token_id] * (width - len(p)) + p for p in prompts])
    mask = (ids != tok.pad_token_id).long()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                         pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    texts = tok.batch_decode(out[:, width:], skip_special_tokens=True)
    return sum(t.strip() == s.answer for t, s in zip(texts, seqs)) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, default=Path("models/afd-demo-moe"))
    ap.add_argument("--preset", type=Path, default=PRESET, help="architecture (DeepseekV2Config fields) as JSON")
    ap.add_argument("--steps", type=int, default=12000)
    ap.add_argument("--batch-size", type=int, default=192)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tok = build_tokenizer()
    config = demo_config(tok, args.preset)
    model = DeepseekV2ForCausalLM(config)
    print(f"parameters: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = 300
    schedule = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps)))))

    start = time.time()
    for step in range(1, args.steps + 1):
        input_ids, labels = make_batch(tok, rng, args.batch_size)
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
            print(f"step {step} held-out exact: {held_out_accuracy(model, tok):.3f}", flush=True)
            model.train()
            model.save_pretrained(args.out)
            tok.save_pretrained(args.out)


if __name__ == "__main__":
    main()
