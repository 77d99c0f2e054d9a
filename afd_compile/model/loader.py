"""Loads HF DeepSeek-V2 checkpoint directories: config and tokenizer through transformers,
weights through safetensors, only the tensors the requested part needs.

Accepts the per-expert names real DeepSeek-V2(-Lite) checkpoints and transformers'
`save_pretrained` write (`mlp.experts.N.gate_proj.weight`, ...) and transformers v5's stacked
form (`mlp.experts.gate_up_proj`). An expert-parallel rank reads only its experts' slices.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from tqdm import tqdm
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig, PreTrainedTokenizerBase

from afd_compile.config import DEFAULT_MODEL, check_model_dir
from afd_compile.errors import AfdError
from afd_compile.model.decoder import DeepseekV2
from moe_kernels.cpu_build import cpu_kernels

SUPPORTED_MODEL_TYPES = ("deepseek_v2",)

_LAYER = re.compile(r"model\.layers\.(\d+)\.(.+)")
_EXPERT = re.compile(r"mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
_ATTENTION_PREFIXES = ("input_layernorm.", "self_attn.")
_FFN_PREFIXES = ("post_attention_layernorm.", "mlp.")


def load_config(path: str | Path) -> PretrainedConfig:
    path = check_model_dir(path)
    try:
        raw = json.loads((path / "config.json").read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AfdError(f"{path / 'config.json'} is not valid JSON: {e}") from None
    if not isinstance(raw, dict):
        raise AfdError(f"{path / 'config.json'} must hold a JSON object, not {type(raw).__name__}")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise AfdError(f"unsupported architecture: model_type {model_type!r} in {path / 'config.json'}; "
                       f"afd-compile supports {', '.join(SUPPORTED_MODEL_TYPES)}")
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False)
    except (ValueError, TypeError, KeyError, StrictDataclassError) as e:
        raise AfdError(f"cannot read {path / 'config.json'}: {e}") from None


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    path = check_model_dir(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "tokenizer.model")):
        raise AfdError(f"model directory {str(path)!r} has no tokenizer (tokenizer.json or tokenizer.model)")
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise AfdError(f"cannot load the tokenizer in {str(path)!r}: {e}") from None


def prompt_ids(tokenizer, text: str) -> list[int]:
    """A text prompt's ids, with what the tokenizer adds (bos, on most); AfdError if it holds no
    token of its own: "" or whitespace would otherwise be a prompt of bos alone."""
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    added = set(tokenizer.all_special_ids) - {tokenizer.unk_token_id}  # unknown text is still text
    if all(i in added for i in ids):
        raise AfdError("the prompt is empty")
    return ids


def single_turn(path: str | Path) -> bool:
    """Whether the model was trained on single-turn chats only (`"afd_single_turn": true` in its
    generation_config.json, as the shipped demo model says): chat front ends then send each
    message without the earlier turns."""
    try:
        config = json.loads((check_model_dir(path) / "generation_config.json").read_text())
    except (OSError, ValueError):
        return False
    return config.get("afd_single_turn") is True


def chat_prompt_ids(tokenizer, messages: list[dict], model: str | Path) -> list[int]:
    """The token ids of messages through the tokenizer's chat template, ending in the assistant's
    turn. Special-token text typed in a message (`<|assistant|>`) is encoded as text, not as the
    special token: otherwise a user forges turns of the conversation."""
    if not tokenizer.chat_template:
        raise AfdError(f"the tokenizer of {model} has no chat template")
    specials = {t.content: (i, t) for i, t in tokenizer.added_tokens_decoder.items() if t.special}
    contents = [str(msg.get("content") or "") for msg in messages]
    if not any(s in c for c in contents for s in specials):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=False))
    return _ids_with_content_as_text(tokenizer, messages, contents, specials)


def _ids_with_content_as_text(tokenizer, messages, contents, specials) -> list[int]:
    """The template rendered with a placeholder for each message's content tells the template's
    own special tokens from the messages' text. Tokenizing splits the text at special tokens
    before anything else (tokenizers' added vocabulary), so splitting only at the template's and
    encoding each stretch between them with special tokens off gives the ids ordinary
    tokenization gives a message without special-token text."""
    marks = [f"\ue000{i}\ue001" for i in range(len(messages))]  # private-use code points
    rendered = tokenizer.apply_chat_template([{**msg, "content": mark} for msg, mark in zip(messages, marks)],
                                             add_generation_prompt=True, tokenize=False)
    if any(rendered.count(mark) != 1 for mark in marks):
        raise AfdError("a message contains special-token text, and this model's chat template does not insert "
                       "message content verbatim, so it cannot be kept apart from the template's special tokens")
    pieces = re.split("(" + "|".join(re.escape(mark) for mark in marks) + ")", rendered)
    special = re.compile("(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")")
    segments: list = [""]  # text (str) and special-token ids (int), text never twice in a row
    for piece in pieces:
        if piece in marks:
            segments[-1] += contents[marks.index(piece)]
            continue
        for j, part in enumerate(special.split(piece)):
            if j % 2:  # a special token of the template
                token = specials[part][1]
                if token.lstrip:
                    segments[-1] = segments[-1].rstrip()
                segments += [specials[part][0], ""]
                strip_next = token.rstrip
            else:
                segments[-1] += part.lstrip() if j and strip_next else part
    backend = tokenizer.backend_tokenizer
    previous, backend.encode_special_tokens = backend.encode_special_tokens, True
    try:
        ids: list[int] = []
        for seg in segments:
            ids += [seg] if isinstance(seg, int) else backend.encode(seg, add_special_tokens=False).ids if seg else []
        return ids
    finally:
        backend.encode_special_tokens = previous


def _safe_open(file: Path):
    """safe_open, with a missing or corrupt file reported as an AfdError."""
    try:
        return safe_open(file, framework="pt")
    except (SafetensorError, OSError) as e:
        raise AfdError(f"cannot read the weights file {file}: {e}") from None


def weight_files(path: Path) -> dict[str, Path]:
    """Checkpoint tensor name -> the safetensors file holding it."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            return {name: path / file for name, file in weight_map.items()}
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as e:
            raise AfdError(f"{index} is not a valid safetensors index (a JSON object with a weight_map): "
                           f"{type(e).__name__}: {e}") from None
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for ext in ("*.bin", "*.pt", "*.pth") for p in path.glob(ext))
        if pickles:
            raise AfdError(f"{path} holds only pickle weights ({', '.join(pickles)}); afd-compile loads "
                           "safetensors only, since unpickling can run arbitrary code. Convert them with "
                           "transformers: model.save_pretrained(dir, safe_serialization=True)")
        raise AfdError(f"model directory {str(path)!r} has no *.safetensors weights")
    names = {}
    for file in files:
        with _safe_open(file) as f:
            names.update((name, file) for name in f.keys())
    return names


def _target(name: str, model: DeepseekV2) -> str | None:
    """Our parameter name for a checkpoint tensor, or None when this part does not need it."""
    if name in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        return name.removeprefix("model.") if model.has_attention else None
    m = _LAYER.fullmatch(name)
    if m is None or int(m[1]) >= model.cfg.num_hidden_layers:
        return None
    layer, rest = m[1], m[2]
    if rest.startswith(_ATTENTION_PREFIXES):
        return f"attention_halves.{layer}.{rest}" if model.has_attention else None
    if rest.startswith(_FFN_PREFIXES):
        return f"ffn_halves.{layer}.{rest}" if model.has_ffn else None
    return None


class _Reader:
    """Reads tensors (or expert slices of them) one at a time, each straight into the running dtype
    and device. A file is mapped only while one of its tensors is read: safetensors reads through
    mmap, and pages a mapping has touched count in the process's resident set until it is closed,
    so a file kept open through the whole load would hold a second copy of the weights there."""

    def __init__(self, files: dict[str, Path], dtype: torch.dtype, device):
        self.files, self.dtype, self.device = files, dtype, device

    def handle(self, file: Path):
        return _safe_open(file)

    def get(self, name: str, rows: slice | None = None, dtype: torch.dtype | None = None) -> torch.Tensor:
        f = self.handle(self.files[name])  # unmapped when this frame drops it
        tensor = f.get_tensor(name) if rows is None else f.get_slice(name)[rows]
        return tensor.to(device=self.device, dtype=dtype or self.dtype)


def _dtype_for(key: str, dtype: torch.dtype) -> torch.dtype:
    """The router stays fp32 (as in transformers): expert choice must not flip with the dtype."""
    return torch.float32 if key.endswith("mlp.gate.weight") else dtype


def weights_nbytes(model: DeepseekV2, dtype: torch.dtype) -> int:
    """Bytes the model's parameters take in the running dtype (model on the meta device)."""
    return sum(t.numel() * _dtype_for(k, dtype).itemsize for k, t in model.state_dict().items())


def available_memory() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where there is no such file)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def check_fits_in_memory(path: Path, model: DeepseekV2, dtype: torch.dtype) -> None:
    """Refuses, before reading anything, weights that cannot fit the memory available now."""
    need, have = weights_nbytes(model, dtype), available_memory()
    if have is not None and need > have:
        raise AfdError(f"the {model.part} weights of {path} take {need / 1e9:.1f} GB in {str(dtype).removeprefix('torch.')}"
                       f" but only {have / 1e9:.1f} GB of memory is available; use a smaller --dtype "
                       "(bfloat16 halves float32), fewer layers, or more FFN ranks (each holds its experts only)")


def load_state_dict(path: Path, model: DeepseekV2, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The checkpoint's tensors for `model`, in `dtype` on `device`: each tensor is converted as it
    is read, so no second copy of the weights is ever held."""
    files = weight_files(path)
    wanted = dict(model.state_dict())
    reader = _Reader(files, dtype, device)
    out: dict[str, torch.Tensor] = {}
    filled: dict[str, set[tuple[int, str]]] = {}  # stacked key -> (local expert, matrix) read into it
    todo = [(name, target) for name in files if (target := _target(name, model)) is not None]
    for name, target in tqdm(todo, desc=f"loading {path.name} ({model.part})", unit="tensor", disable=None):
        m = _EXPERT.search(target)
        if m is not None:  # one expert's matrix: goes into the stacked tensor, if this rank holds it
            moe = model.get_submodule(target[: target.index(".mlp.") + 4])
            local = int(m[1]) - moe.first_expert
            n_local, _, inter = moe.experts.down_proj.shape[0], *moe.experts.down_proj.shape[1:]
            if not 0 <= local < n_local:
                continue
            prefix = target[: m.start()] + "mlp.experts."
            stacked = "down_proj" if m[2] == "down_proj" else "gate_up_proj"
            key = prefix + stacked
            if key not in out:
                out[key] = torch.empty(wanted[key].shape, dtype=dtype, device=device)
            rows = {"gate_proj": slice(0, inter), "up_proj": slice(inter, 2 * inter), "down_proj": slice(None)}[m[2]]
            tensor, dest = reader.get(name), out[key][local, rows]
            if tensor.shape != dest.shape:
                raise AfdError(f"checkpoint tensor {name} has shape {tuple(tensor.shape)}, "
                               f"config.json implies {tuple(dest.shape)}")
            dest.copy_(tensor)
            filled.setdefault(key, set()).add((local, m[2]))
        elif target.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            moe = model.get_submodule(target.removesuffix(".experts.gate_up_proj").removesuffix(".experts.down_proj"))
            n_local = moe.experts.down_proj.shape[0]
            out[target] = reader.get(name, slice(moe.first_expert, moe.first_expert + n_local))
        else:
            out[target] = reader.get(name, dtype=_dtype_for(target, dtype))
    if model.has_attention and "lm_head.weight" not in out and model.cfg.tie_word_embeddings:
        out["lm_head.weight"] = out.get("embed_tokens.weight")
    missing = sorted(set(wanted) - set(out))
    for key, got in filled.items():  # a stacked tensor is complete only once all its experts were read
        moe = model.get_submodule(key.removesuffix(".experts.gate_up_proj").removesuffix(".experts.down_proj"))
        mats = ("down_proj",) if key.endswith("down_proj") else ("gate_proj", "up_proj")
        layer = key.split(".")[1]
        missing += [f"model.layers.{layer}.mlp.experts.{moe.first_expert + e}.{mat}.weight"
                    for e in range(wanted[key].shape[0]) for mat in mats if (e, mat) not in got]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise AfdError(f"checkpoint in {path} lacks tensors the model needs: {shown}")
    for key, tensor in out.items():
        if tuple(tensor.shape) != tuple(wanted[key].shape):
            raise AfdError(f"checkpoint tensor for {key} has shape {tuple(tensor.shape)}, "
                           f"config.json implies {tuple(wanted[key].shape)}")
    return out


def load_model(path: str | Path = DEFAULT_MODEL, part: str = "all", ep_rank: int = 0, ep_size: int = 1,
               dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
               ep_dispatch: str = "sort") -> DeepseekV2:
    """Builds the model on the meta device and assigns the loaded tensors: no double allocation.
    ep_rank/ep_size/ep_dispatch: an FFN rank's share of the experts and how it exchanges tokens
    (see ffn_half.MoE)."""
    path = check_model_dir(path)
    cfg = load_config(path)
    if ep_size < 1 or cfg.n_routed_experts % ep_size:
        raise AfdError(f"n_routed_experts={cfg.n_routed_experts} is not divisible by the {ep_size} FFN ranks")
    if not 0 <= ep_rank < ep_size:
        raise AfdError(f"ep_rank={ep_rank} is out of range for ep_size={ep_size}")
    with torch.device("meta"):
        model = DeepseekV2(cfg, part, ep_rank, ep_size, ep_dispatch)
    if torch.device(device).type == "cpu":
        check_fits_in_memory(path, model, dtype)
    state = load_state_dict(path, model, dtype, device)
    model.load_state_dict(state, assign=True, strict=True)
    if torch.device(device).type == "cpu":
        cpu_kernels()  # built (or found in the cache) before anything compiles a step
    return model.eval().requires_grad_(False)
