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


def test_connector_scenario_reports_every_backend(tmp_path, monkeypatch):
    import benchmarks.connector as connector

    monkeypatch.setattr(connector, "SIZES", [1 << 10, 4 << 10])
    out = tmp_path / "connector.json"
    assert main(["bench", "--scenario", "connector", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    assert set(result["results"]) == {"tcp (raw socket)", "shm copy (memcpy x2)", "connector gloo", "connector shm"}
    assert all(t > 0 for times in result["results"].values() for t in times.values())


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
