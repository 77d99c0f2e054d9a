"""Random-weight checkpoints at real model widths, for benchmarks (no model hub here).

`python -m benchmarks.make_checkpoint --preset deepseek-v2-lite --layers 4 --dtype bfloat16 --out DIR`
writes what transformers' `save_pretrained` writes for a DeepSeek-V2 model of the preset's shape
(`configs/<preset>.json`: the real model's dimensions) cut to N layers, with the shipped demo
tokenizer (its vocabulary replaces the preset's, so embeddings and lm_head are small and a
decode step's bytes are the layers'). Weights are transformers' own random initialisation,
seeded. The first `first_k_dense_replace` layers stay dense, so `--layers 4` of DeepSeek-V2-Lite
is 1 dense + 3 MoE layers: 1.83 B parameters, 3.7 GB in bf16, 7.3 GB in fp32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from afd_compile.errors import AfdError

CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"
DTYPES = ("float32", "bfloat16", "float16")


def presets() -> list[str]:
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def preset_config(preset: str, layers: int | None, tokenizer, **overrides):
    """The preset's DeepseekV2Config with `layers` layers and the tokenizer's vocabulary."""
    from transformers import DeepseekV2Config

    path = CONFIGS_DIR / f"{preset}.json"
    if not path.is_file():
        raise AfdError(f"unknown preset {preset!r}; choose from {', '.join(presets())}")
    fields = json.loads(path.read_text())
    if layers is not None:
        if layers < 1:
            raise AfdError(f"--layers must be >= 1, got {layers}")
        fields["num_hidden_layers"] = layers
    fields.update(overrides, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    return DeepseekV2Config(**fields)


def make_checkpoint(out: str | Path, preset: str = "deepseek-v2-lite", layers: int | None = None,
                    dtype: str = "bfloat16", seed: int = 0, **overrides) -> Path:
    """Writes the checkpoint directory `out` (config.json, safetensors, tokenizer) and returns it."""
    import torch
    from transformers import DeepseekV2ForCausalLM

    from afd_compile.demo.tokenizer import build_tokenizer

    if dtype not in DTYPES:
        raise AfdError(f"--dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise AfdError(f"{out} exists and is not empty; choose a new --out directory")
    tok = build_tokenizer()
    cfg = preset_config(preset, layers, tok, **overrides)
    torch.manual_seed(seed)
    # Built directly in the target dtype: a bf16 checkpoint never exists as an fp32 copy first.
    model = DeepseekV2ForCausalLM._from_config(cfg, dtype=getattr(torch, dtype))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.make_checkpoint", description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="deepseek-v2-lite", help=f"configs/<preset>.json ({', '.join(presets())})")
    ap.add_argument("--layers", type=int, default=None, help="number of layers (default: the preset's)")
    ap.add_argument("--dtype", default="bfloat16", choices=DTYPES)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="new directory to write the checkpoint to")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    try:
        path = make_checkpoint(args.out, args.preset, args.layers, args.dtype, args.seed)
    except AfdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    print(f"wrote {path}: {args.preset}, {args.layers or 'all'} layers, {args.dtype}, "
          f"{size / 1e9:.2f} GB of weights in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
