"""The cost model's schedule simulation against hand-computed step times, and `afd plan`."""

from __future__ import annotations

import json

import pytest

from afd_compile.cli import main
from afd_compile.errors import AfdError
from afd_compile.planner import Profile, candidates, fit_line, plan, step_time

MS = 1e-3


def profile(attention=1.0, ffn=1.0, trip=0.0, overhead=0.0, per_row=0.0, mb_overhead=0.0, layers=2) -> Profile:
    """Constant costs in ms (plus per_row ms per row on attention and FFN)."""
    return Profile(num_layers=layers, attention=(attention * MS, per_row * MS), attention_send=(0.0, 0.0),
                   ffn=[(ffn * MS, per_row * MS)] * layers, ffn_send=(0.0, 0.0), round_trip=(trip * MS, 0.0),
                   step_overhead=(overhead * MS, 0.0), micro_batch_overhead=mb_overhead * MS, machine={})


def test_fit_line_recovers_a_line_and_a_constant():
    assert fit_line([1, 2, 4], [3, 5, 9]) == pytest.approx((1, 2))
    assert fit_line([8, 8], [2, 4]) == pytest.approx((3, 0))


def test_one_micro_batch_is_serial():
    """m = 1: every layer waits for its FFN output: L * (attention + round trip + FFN) + overhead."""
    p = profile(attention=1, ffn=2, trip=0.5, overhead=3, layers=4)
    assert step_time(p, 8, 1) == pytest.approx((4 * (1 + 0.5 + 2) + 3) * MS)


def test_ping_pong_overlaps_attention_and_ffn():
    """m = 2, equal halves of 1 ms per micro-batch, no link cost: the FFN of one micro-batch runs
    beside the attention of the other, so 2 layers take 2 * 2 + 1 ms instead of 2 * 4."""
    p = profile(attention=1, ffn=1, layers=2)
    assert step_time(p, 8, 1) == pytest.approx(4 * MS)
    assert step_time(p, 8, 2) == pytest.approx(5 * MS)  # a0 a1 | f0 f1 overlapped with a1, a0' ...
    assert step_time(p, 8, 2) < 2 * step_time(p, 8, 1)


def test_delay_costs_two_trips_per_layer_at_m1_and_hides_at_larger_m():
    p = profile(attention=1, ffn=1, layers=3)
    d = 0.25 * MS
    assert step_time(p, 8, 1, delay_s=d) - step_time(p, 8, 1) == pytest.approx(3 * 2 * d)
    # m = 4: each micro-batch's round trip (2d + FFN) fits behind the other three's attention;
    # only the pipeline's fill and drain (one trip each way) stay exposed.
    assert step_time(p, 8, 4, delay_s=d) - step_time(p, 8, 4) == pytest.approx(2 * d)


def test_rows_scale_with_micro_batches_and_attention_ranks():
    p = profile(attention=0, ffn=0, per_row=0.01, layers=1)
    # 2A1F: each attention rank holds 16 of 32 rows; the FFN rank computes both ranks' rows.
    assert step_time(p, 32, 1, "2A1F") == pytest.approx((16 * 0.01 + 32 * 0.01) * MS)
    assert step_time(p, 32, 1, "1A1F") == pytest.approx(2 * 32 * 0.01 * MS)


def test_plan_ranks_fitting_topologies_best_first():
    assert candidates(2) == ["1A1F"]
    assert set(candidates(4)) >= {"1A1F", "2A1F", "1A2F", "3A1F", "2A2F", "1A3F"}
    rows = plan(profile(attention=1, ffn=1, trip=0.2), batch=16, cores=3, max_micro_batches=3)
    assert {r["afd_size"] for r in rows} == {"1A1F", "2A1F", "1A2F"}
    assert [r["tokens_per_s"] for r in rows] == sorted((r["tokens_per_s"] for r in rows), reverse=True)
    with pytest.raises(AfdError, match="at least 2 cores"):
        plan(profile(), batch=16, cores=1)


def test_afd_plan_cli(tmp_path, capsys):
    path = tmp_path / "profile.json"
    path.write_text(json.dumps({"profile": profile(attention=1, ffn=1, trip=0.2).to_json()}))
    assert main(["plan", "--profile", str(path), "--batch-size", "16", "--cores", "3"]) == 0
    out = capsys.readouterr().out
    assert "recommended: --afd-size" in out and "1A1F" in out


@pytest.mark.parametrize("content,match", [("{", "cannot read"), ('{"profile": {"num_layers": 2}}', "not an AFD profile")])
def test_afd_plan_rejects_a_bad_profile(tmp_path, capsys, content, match):
    path = tmp_path / "p.json"
    path.write_text(content)
    assert main(["plan", "--profile", str(path)]) != 0
    assert match in capsys.readouterr().err
