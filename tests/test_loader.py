"""Checkpoint loading: what each part holds, what it reads, which layouts it accepts, and how it
fails. Oracles: the full model loaded from the same directory (for partial and alternative
layouts), transformers itself (for the layouts it writes), and the error contract (AfdError
with a message naming the problem; the CLI prints it as one `afd: error:` line)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from afd_compile.errors import AfdError
from afd_compile.model.decoder import padded_batch
from afd_compile.model import loader
from afd_compile.model.loader import load_config, load_model, load_tokenizer

EXPERT_NAME = re.compile(r"(model\.layers\.\d+\.mlp\.experts)\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


# ---------------------------------------------------------------- helpers

def copy_without_weights(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.endswith((".safetensors", ".safetensors.index.json")):
            shutil.copy(f, dst / f.name)
    return dst


def to_stacked_layout(src: Path, dst: Path) -> Path:
    """Rewrites a per-expert checkpoint in transformers v5's stacked expert layout:
    mlp.experts.gate_up_proj [E, 2I, H] (gate rows, then up rows) and mlp.experts.down_proj [E, H, I]."""
    copy_without_weights(src, dst)
    out, experts = {}, {}
    for name, tensor in load_file(src / "model.safetensors").items():
        m = EXPERT_NAME.fullmatch(name)
        if m:
            experts.setdefault(m[1], {}).setdefault(int(m[2]), {})[m[3]] = tensor
        else:
            out[name] = tensor
    for prefix, per_expert in experts.items():
        n = len(per_expert)
        out[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([per_expert[e]["gate_proj"], per_expert[e]["up_proj"]]) for e in range(n)])
        out[f"{prefix}.down_proj"] = torch.stack([per_expert[e]["down_proj"] for e in range(n)])
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def routed_params(model) -> int:
    return sum(p.numel() for name, p in model.named_parameters() if ".mlp.experts." in name)


def last_logits(model, prompt: list[int]) -> torch.Tensor:
    model.setup_caches(2, 16, 32)
    n = len(prompt)
    tokens, positions, slot_mapping, block_tables, _ = padded_batch([prompt], model)
    with torch.inference_mode():
        return model(tokens, positions, slot_mapping, block_tables, torch.tensor([n - 1]), model.context_blocks(n))


def assert_same_state(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.fixture
def record_reads(monkeypatch):
    """Names passed to get_tensor / get_slice of every safetensors handle the loader opens."""
    reads: list[str] = []
    original = loader._Reader.handle

    class Recording:
        def __init__(self, handle):
            self._handle = handle

        def get_tensor(self, name):
            reads.append(name)
            return self._handle.get_tensor(name)

        def get_slice(self, name):
            reads.append(name)
            return self._handle.get_slice(name)

        def __getattr__(self, attr):
            return getattr(self._handle, attr)

    monkeypatch.setattr(loader._Reader, "handle", lambda self, file: Recording(original(self, file)))
    return reads


@pytest.fixture(scope="module")
def full_model(tiny_greedy_checkpoint):
    return load_model(tiny_greedy_checkpoint)


@pytest.fixture(scope="module")
def stacked_checkpoint(tiny_greedy_checkpoint, tmp_path_factory) -> Path:
    return to_stacked_layout(tiny_greedy_checkpoint, tmp_path_factory.mktemp("stacked"))


PROMPT = [1, 17, 400, 33, 9, 250, 101]
# Bit-identical weights may still differ in the last ulp of the logits: BLAS kernels pick their
# path by the weights' memory alignment, which depends on the file offsets safetensors maps.
SAME_WEIGHTS = dict(atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- what each part holds

def test_attention_part_holds_no_ffn_params(tiny_greedy_checkpoint, full_model):
    """Oracle: the full model. The attention part has exactly the full model's embeddings,
    attention halves, final norm and lm_head, with equal values, and nothing of the FFN."""
    att = load_model(tiny_greedy_checkpoint, part="attention")
    names = dict(att.named_parameters())
    assert names and not [n for n in names if "ffn_halves" in n or ".mlp." in n or "experts" in n]
    assert not hasattr(att, "ffn_halves")
    full = dict(full_model.named_parameters())
    assert set(names) == {n for n in full if not n.startswith("ffn_halves.")}
    for n, p in names.items():
        assert torch.equal(p, full[n]), n


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_ffn_part_holds_its_half_of_the_experts(tiny_greedy_checkpoint, full_model, ep_rank):
    """Oracle: the full model's stacked experts, sliced [4 * rank, 4 * rank + 4): with ep_size=2 an
    FFN rank holds exactly half the routed experts, plus the router, shared and dense FFNs, and no
    embeddings, attention or lm_head."""
    cfg = full_model.cfg
    ffn = load_model(tiny_greedy_checkpoint, part="ffn", ep_rank=ep_rank, ep_size=2)
    names = dict(ffn.named_parameters())
    assert all(n.startswith("ffn_halves.") for n in names)
    assert not [n for n in names if "attn" in n or "embed" in n or "lm_head" in n or "input_layernorm" in n]
    half = cfg.n_routed_experts // 2
    full = dict(full_model.named_parameters())
    for i in range(cfg.first_k_dense_replace, cfg.num_hidden_layers):
        experts = ffn.ffn_halves[i].mlp.experts
        assert experts.gate_up_proj.shape == (half, 2 * cfg.moe_intermediate_size, cfg.hidden_size)
        assert experts.down_proj.shape == (half, cfg.hidden_size, cfg.moe_intermediate_size)
        assert ffn.ffn_halves[i].mlp.first_expert == ep_rank * half
        rows = slice(ep_rank * half, (ep_rank + 1) * half)
        assert torch.equal(experts.gate_up_proj, full[f"ffn_halves.{i}.mlp.experts.gate_up_proj"][rows])
        assert torch.equal(experts.down_proj, full[f"ffn_halves.{i}.mlp.experts.down_proj"][rows])
        # The router sees all experts on every rank (each rank must know where every token goes).
        assert ffn.ffn_halves[i].mlp.gate.weight.shape == (cfg.n_routed_experts, cfg.hidden_size)
    for n, p in names.items():
        if ".experts." not in n:
            assert torch.equal(p, full[n]), n


@pytest.mark.parametrize("ep_size", [1, 2, 4, 8])
def test_parameter_counts_add_up(tiny_greedy_checkpoint, full_model, ep_size):
    """Oracle: the full model's parameter count = attention part + the non-routed FFN params
    (router, shared experts, dense layers: replicated on every FFN rank, counted once) + every
    FFN rank's routed experts."""
    att = load_model(tiny_greedy_checkpoint, part="attention")
    ranks = [load_model(tiny_greedy_checkpoint, part="ffn", ep_rank=r, ep_size=ep_size) for r in range(ep_size)]
    replicated = {n_params(r) - routed_params(r) for r in ranks}
    assert len(replicated) == 1
    assert len({routed_params(r) for r in ranks}) == 1
    total = n_params(att) + replicated.pop() + sum(routed_params(r) for r in ranks)
    assert total == n_params(full_model)
    assert sum(routed_params(r) for r in ranks) == routed_params(full_model)


# ---------------------------------------------------------------- what each part reads

def test_attention_part_reads_no_ffn_tensors(tiny_greedy_checkpoint, record_reads):
    """Oracle: the checkpoint's tensor names. The attention part reads every attention-side tensor
    and no expert, router, shared-expert or dense-FFN tensor."""
    load_model(tiny_greedy_checkpoint, part="attention")
    assert record_reads
    assert not [n for n in record_reads if ".mlp." in n or "post_attention_layernorm" in n]
    assert len(record_reads) == len(set(record_reads))
    assert {"model.embed_tokens.weight", "lm_head.weight", "model.norm.weight"} <= set(record_reads)


def test_ffn_part_reads_only_its_experts(tiny_greedy_checkpoint, record_reads):
    """Oracle: the checkpoint's tensor names. FFN rank 1 of 2 reads experts 4..7 only, and nothing
    of attention or the embeddings."""
    load_model(tiny_greedy_checkpoint, part="ffn", ep_rank=1, ep_size=2)
    experts = {int(m[2]) for n in record_reads if (m := EXPERT_NAME.fullmatch(n))}
    assert experts == {4, 5, 6, 7}
    assert not [n for n in record_reads if "self_attn" in n or "embed" in n or "lm_head" in n or "model.norm" in n]


def test_stacked_layout_ffn_rank_reads_slices(stacked_checkpoint, record_reads):
    """Oracle: the stacked tensor names. In transformers v5's layout a rank reads its experts as a
    slice of the stacked tensor (get_slice), never the whole tensor."""
    load_model(stacked_checkpoint, part="ffn", ep_rank=1, ep_size=2)
    stacked = [n for n in record_reads if n.endswith(("experts.gate_up_proj", "experts.down_proj"))]
    assert len(stacked) == 2 * (3 - 1)  # two stacked tensors per MoE layer (layers 1 and 2)


# ---------------------------------------------------------------- layouts

def test_sharded_checkpoint_matches_single_file(tiny_greedy_checkpoint, full_model, tmp_path):
    """Oracle: the single-file checkpoint. transformers' save_pretrained with a small shard size
    writes model.safetensors.index.json + several shards; the loaded model is bit-identical."""
    from transformers import DeepseekV2ForCausalLM

    sharded = copy_without_weights(tiny_greedy_checkpoint, tmp_path / "sharded")
    DeepseekV2ForCausalLM.from_pretrained(tiny_greedy_checkpoint).save_pretrained(sharded, max_shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert not (sharded / "model.safetensors").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    model = load_model(sharded)
    assert_same_state(model, full_model)
    torch.testing.assert_close(last_logits(model, PROMPT), last_logits(full_model, PROMPT), **SAME_WEIGHTS)
    rank = load_model(sharded, part="ffn", ep_rank=1, ep_size=2)
    assert_same_state(rank, load_model(tiny_greedy_checkpoint, part="ffn", ep_rank=1, ep_size=2))


def test_stacked_expert_layout_matches_per_expert(stacked_checkpoint, tiny_greedy_checkpoint, full_model):
    """Oracle: the per-expert checkpoint it was converted from, and transformers reading the
    stacked file. Same parameters, identical logits, for the full model and an FFN rank."""
    from transformers import DeepseekV2ForCausalLM

    assert "model.layers.1.mlp.experts.gate_up_proj" in load_file(stacked_checkpoint / "model.safetensors")
    model = load_model(stacked_checkpoint)
    assert_same_state(model, full_model)
    ours = last_logits(model, PROMPT)
    torch.testing.assert_close(ours, last_logits(full_model, PROMPT), **SAME_WEIGHTS)
    hf = DeepseekV2ForCausalLM.from_pretrained(stacked_checkpoint).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours[0], hf(torch.tensor([PROMPT])).logits[0, -1], atol=1e-4, rtol=1e-4)
    rank = load_model(stacked_checkpoint, part="ffn", ep_rank=1, ep_size=2)
    assert_same_state(rank, load_model(tiny_greedy_checkpoint, part="ffn", ep_rank=1, ep_size=2))


def test_tied_embeddings(tmp_path):
    """Oracle: transformers. With tie_word_embeddings the checkpoint has no lm_head.weight and the
    head reuses the embedding matrix."""
    from tests.conftest import make_checkpoint
    from transformers import DeepseekV2ForCausalLM

    path = make_checkpoint(tmp_path / "tied", tie_word_embeddings=True, num_hidden_layers=2)
    assert "lm_head.weight" not in load_file(path / "model.safetensors")
    model = load_model(path)
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    hf = DeepseekV2ForCausalLM.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(last_logits(model, PROMPT)[0], hf(torch.tensor([PROMPT])).logits[0, -1],
                                   atol=1e-4, rtol=1e-4)


def test_bfloat16_keeps_router_fp32(tiny_greedy_checkpoint):
    """Oracle: transformers keeps the router in fp32 (_keep_in_fp32_modules_strict = gate.weight);
    so do we, whatever the model dtype."""
    model = load_model(tiny_greedy_checkpoint, dtype=torch.bfloat16)
    assert model.embed_tokens.weight.dtype == torch.bfloat16
    assert model.ffn_halves[1].mlp.experts.gate_up_proj.dtype == torch.bfloat16
    assert model.ffn_halves[1].mlp.gate.weight.dtype == torch.float32


@pytest.mark.parametrize("ckpt_dtype,run_dtype", [("float32", torch.bfloat16), ("bfloat16", torch.bfloat16),
                                                   ("bfloat16", torch.float32)])
def test_weights_converted_as_read_equal_converting_after(tmp_path, ckpt_dtype, run_dtype):
    """Oracle: the checkpoint's own tensors converted to the running dtype afterwards. Each tensor
    is converted as it is read (no copy of the whole state in the checkpoint's dtype), with the
    same values and the router kept fp32."""
    from tests.conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "ckpt")
    if ckpt_dtype == "bfloat16":
        tensors = {k: v.bfloat16() for k, v in load_file(path / "model.safetensors").items()}
        save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    raw = load_file(path / "model.safetensors")
    model = load_model(path, dtype=run_dtype)
    gate = model.ffn_halves[1].mlp
    assert gate.gate.weight.dtype == torch.float32
    assert torch.equal(gate.gate.weight, raw["model.layers.1.mlp.gate.weight"].float())
    assert model.attention_halves[0].self_attn.kv_b_proj.weight.dtype == run_dtype
    assert torch.equal(model.attention_halves[0].self_attn.kv_b_proj.weight,
                       raw["model.layers.0.self_attn.kv_b_proj.weight"].to(run_dtype))
    assert gate.experts.down_proj.dtype == run_dtype
    assert torch.equal(gate.experts.down_proj[3], raw["model.layers.1.mlp.experts.3.down_proj.weight"].to(run_dtype))


# VmHWM, not ru_maxrss: the latter keeps the forking parent's (pytest's) peak across exec.
PEAK_RSS_SCRIPT = """
import sys, torch
from afd_compile.model.loader import load_model
def status(key):
    return int(next(l for l in open('/proc/self/status') if l.startswith(key)).split()[1]) * 1024
load_model(sys.argv[3])  # imports and one-off set-up (the kernels' build) before measuring
before = status('VmHWM')
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
peak = status('VmHWM')
print(sum(p.numel() * p.element_size() for p in model.parameters()), before, peak)
"""


@pytest.mark.parametrize("run_dtype", ["bfloat16", "float32"])
def test_loading_holds_one_copy_of_the_weights(tmp_path, run_dtype, tiny_greedy_checkpoint):
    """Oracle: the weights' own bytes in the running dtype. The resident set grows by at most
    1.25x them while loading a bf16 checkpoint (~200 MB): no second copy in the checkpoint's
    dtype, and no mapped file left resident beside the loaded tensors."""
    from tests.conftest import make_checkpoint

    path = make_checkpoint(tmp_path / "ckpt", hidden_size=512, moe_intermediate_size=352, n_routed_experts=64,
                           num_experts_per_tok=6, intermediate_size=1024, num_hidden_layers=3)
    tensors = {k: v.bfloat16() for k, v in load_file(path / "model.safetensors").items()}
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    del tensors
    out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, str(path), run_dtype,
                          str(tiny_greedy_checkpoint)], capture_output=True,
                         text=True, timeout=300, check=True).stdout.split()
    weights, before, peak = map(int, out[-3:])
    assert weights > 100e6
    assert peak - before <= 1.25 * weights, f"grew {(peak - before) / 1e6:.0f} MB for {weights / 1e6:.0f} MB of weights"


# ---------------------------------------------------------------- errors

def _expect(match: str, fn, *args, **kwargs) -> str:
    with pytest.raises(AfdError, match=match) as info:
        fn(*args, **kwargs)
    return str(info.value)


def test_weights_larger_than_memory_refused_before_reading(tiny_greedy_checkpoint, monkeypatch, record_reads):
    """A checkpoint whose weights exceed the memory available is refused with the sizes named,
    before a single tensor is read."""
    monkeypatch.setattr(loader, "available_memory", lambda: 1000)
    message = _expect(r"take .* GB in float32 but only 0\.0 GB of memory is available", load_model,
                      tiny_greedy_checkpoint)
    assert "bfloat16" in message
    assert record_reads == []


def test_missing_directory(tmp_path):
    """Oracle: the error contract: AfdError naming the path."""
    missing = tmp_path / "nope"
    _expect(r"does not exist", load_model, missing)
    _expect(r"does not exist", load_tokenizer, missing)
    assert str(missing) in _expect("nope", load_config, missing)


def test_directory_without_config(tmp_path):
    """Oracle: the error contract."""
    _expect(r"has no config\.json", load_model, tmp_path)


@pytest.mark.parametrize("text,match", [
    ("{not json", r"is not valid JSON"),
    ("", r"is not valid JSON"),
    ("[1, 2]", r"must hold a JSON object"),
    ('{"model_type": "deepseek_v2", "hidden_size": "wide"}', r"cannot read .*config\.json.*hidden_size"),
], ids=["syntax", "empty", "not_an_object", "bad_field_type"])
def test_malformed_config(tmp_path, text, match):
    """Oracle: the error contract. Every malformed config.json is an AfdError, never a raw
    JSONDecodeError / AttributeError / validation error from inside transformers."""
    (tmp_path / "config.json").write_text(text)
    _expect(match, load_config, tmp_path)
    _expect(match, load_model, tmp_path)


def test_unsupported_architecture(tmp_path):
    """Oracle: the error contract: names the model_type found and the one supported."""
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64}))
    msg = _expect(r"unsupported architecture", load_model, tmp_path)
    assert "'llama'" in msg and "deepseek_v2" in msg


def test_missing_tokenizer(tiny_greedy_checkpoint, tmp_path):
    """Oracle: the error contract."""
    d = tmp_path / "m"
    d.mkdir()
    shutil.copy(tiny_greedy_checkpoint / "config.json", d / "config.json")
    _expect(r"has no tokenizer", load_tokenizer, d)


@pytest.mark.parametrize("present,match", [
    ("pytorch_model.bin", r"only pickle weights \(pytorch_model\.bin\); afd-compile loads safetensors only"),
    ("model.pt", r"only pickle weights \(model\.pt\)"),
    (None, r"no \*\.safetensors weights"),
], ids=["bin", "pt", "none"])
def test_checkpoint_without_safetensors(tiny_greedy_checkpoint, tmp_path, present, match):
    """Oracle: the error contract: pickle weights are refused, pointing at safetensors, and never
    unpickled (the file is not even a pickle); a directory with no weights at all says so."""
    d = copy_without_weights(tiny_greedy_checkpoint, tmp_path / "w")
    if present:
        (d / present).write_bytes(b"not even a pickle: must not be opened")
    _expect(match, load_model, d)


@pytest.mark.parametrize("damage,match", [
    ("truncated", r"cannot read the weights file .*model\.safetensors"),
    ("garbage", r"cannot read the weights file .*model\.safetensors"),
    ("index_names_missing_shard", r"cannot read the weights file .*model-00001-of-00002\.safetensors"),
    ("index_not_json", r"not a valid safetensors index"),
    ("index_without_weight_map", r"not a valid safetensors index"),
])
def test_damaged_weight_files(tiny_greedy_checkpoint, tmp_path, damage, match):
    """Oracle: the error contract: a corrupt safetensors file or a broken shard index is an
    AfdError naming the file, not a SafetensorError / FileNotFoundError / KeyError."""
    d = copy_without_weights(tiny_greedy_checkpoint, tmp_path / damage)
    data = (tiny_greedy_checkpoint / "model.safetensors").read_bytes()
    index = d / "model.safetensors.index.json"
    if damage == "truncated":
        (d / "model.safetensors").write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        (d / "model.safetensors").write_bytes(b"garbage")
    elif damage == "index_names_missing_shard":
        index.write_text(json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00002.safetensors"}}))
    elif damage == "index_not_json":
        index.write_text("{")
    else:
        index.write_text(json.dumps({"metadata": {}}))
    _expect(match, load_model, d)


@pytest.mark.parametrize("drop", [
    "model.layers.0.self_attn.kv_b_proj.weight",
    "lm_head.weight",
    "model.layers.2.mlp.gate.weight",
    "model.layers.1.mlp.experts.6.up_proj.weight",
], ids=["attention", "lm_head", "router", "one_expert_matrix"])
def test_missing_tensor(tiny_greedy_checkpoint, tmp_path, drop):
    """Oracle: the error contract. A checkpoint lacking a tensor the model needs is an AfdError
    naming it; in particular one missing expert matrix must not leave uninitialised memory in
    the stacked expert tensor. A part that does not need the tensor still loads."""
    d = copy_without_weights(tiny_greedy_checkpoint, tmp_path / "partial")
    state = load_file(tiny_greedy_checkpoint / "model.safetensors")
    del state[drop]
    save_file(state, d / "model.safetensors", metadata={"format": "pt"})
    msg = _expect(r"lacks tensors", load_model, d)
    if EXPERT_NAME.fullmatch(drop):
        assert drop in msg
        _expect(drop, load_model, d, part="ffn", ep_rank=1, ep_size=2)  # expert 6 lives on rank 1
        load_model(d, part="ffn", ep_rank=0, ep_size=2)  # rank 0 never needs it
        load_model(d, part="attention")
    elif "self_attn" in drop or "lm_head" in drop:
        load_model(d, part="ffn")
    else:
        load_model(d, part="attention")


@pytest.mark.parametrize("field,value", [("moe_intermediate_size", 16), ("kv_lora_rank", 8), ("hidden_size", 32)])
def test_config_disagrees_with_tensor_shapes(tiny_greedy_checkpoint, tmp_path, field, value):
    """Oracle: the error contract: a config.json that does not match the weights is an AfdError
    about shapes (not a RuntimeError from a tensor copy)."""
    d = tmp_path / "m"
    shutil.copytree(tiny_greedy_checkpoint, d)
    cfg = json.loads((d / "config.json").read_text())
    cfg[field] = value
    (d / "config.json").write_text(json.dumps(cfg))
    _expect(r"has shape .* config\.json implies", load_model, d)


@pytest.mark.parametrize("ep_size", [3, 5, 0])
def test_ep_size_must_divide_experts(tiny_greedy_checkpoint, ep_size):
    """Oracle: the error contract: 8 experts cannot be split over 3, 5 or 0 FFN ranks."""
    _expect(r"not divisible", load_model, tiny_greedy_checkpoint, part="ffn", ep_size=ep_size)


@pytest.mark.parametrize("ep_rank", [-1, 2])
def test_ep_rank_out_of_range(tiny_greedy_checkpoint, ep_rank):
    """Oracle: the error contract (rather than a misleading 'lacks tensors')."""
    _expect(r"ep_rank=.* out of range", load_model, tiny_greedy_checkpoint, part="ffn", ep_rank=ep_rank, ep_size=2)


# ---------------------------------------------------------------- the CLI's view of the same errors

CLI_CASES = ["missing_dir", "llama", "pickle_only"]


@pytest.fixture(scope="module")
def cli_results(tiny_greedy_checkpoint, tmp_path_factory):
    """Runs `afd generate --model BAD x` for every bad directory at once (each run imports torch)."""
    root = tmp_path_factory.mktemp("cli")
    dirs = {"missing_dir": root / "does-not-exist"}
    for case in CLI_CASES[1:]:
        dirs[case] = copy_without_weights(tiny_greedy_checkpoint, root / case)
    (dirs["llama"] / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (dirs["pickle_only"] / "pytorch_model.bin").write_bytes(b"\x80\x04")
    procs = {case: subprocess.Popen([sys.executable, "-m", "afd_compile.cli", "generate", "--model", str(d),
                                     "--enforce-eager", "x"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                    text=True)
             for case, d in dirs.items()}
    return {case: (p.wait(timeout=120), *p.communicate()) for case, p in procs.items()}


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_bad_model_is_one_line_error(cli_results, case):
    """Oracle: the CLI contract: non-zero exit, stdout empty, stderr exactly one line starting
    `afd: error:`, no traceback."""
    rc, out, err = cli_results[case]
    assert rc != 0
    assert out == ""
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("afd: error: "), err
