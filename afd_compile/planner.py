"""Cost model and planner for AFD decode: `afd plan --profile P`.

A profile (written by `afd bench --scenario afd`) holds, per decode batch size, what one 1A1F
deployment with one micro-batch measured on its timeline: attention time per layer, FFN time
per layer, the send cost on each side, the round-trip overhead beyond FFN compute (link
latency both ways plus receive costs) and the rest of the step (embedding, logits, sampling,
scheduling), plus the extra cost of each further micro-batch from one ping-pong run. Each is
fitted as a + b * rows by least squares (fit_profile, from the ranks' trace spans).

Prediction replays the ping-pong schedule of roles/attention.py and roles/ffn.py as a
discrete-event simulation: an attention rank runs layer l of micro-batch k once the FFN output
of layer l-1 of k is back, then sends; the FFN rank serves (layer, micro-batch) pairs in that
same order, each as soon as every peer's rows have arrived. xAyF with x >= y is modelled as
identical attention ranks, x/y per FFN rank, whose rows the FFN rank processes together; with
y > 1, the FFN ranks split the routed experts (expert parallelism), modelled as the FFN time
divided by y plus one round-trip overhead for the all-to-alls, which this 2-core machine
cannot validate.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

from afd_compile.errors import AfdError
from afd_compile.topology import Topology

Line = tuple[float, float]  # seconds = a + b * rows


def fit_line(xs: list[float], ys: list[float]) -> Line:
    """Least-squares a + b * x (a constant where all x are equal)."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    var = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else 0.0
    return my - b * mx, b


def at(line: Line, rows: float) -> float:
    return max(line[0] + line[1] * rows, 0.0)


@dataclass
class Profile:
    num_layers: int
    attention: Line  # one layer's attention half, per micro-batch
    attention_send: Line
    ffn: list[Line]  # per layer (dense and MoE layers differ)
    ffn_send: Line
    round_trip: Line  # attention's wait for a layer's output minus FFN compute and send
    step_overhead: Line  # rest of a decode step, by the attention rank's batch
    micro_batch_overhead: float  # each micro-batch beyond the first
    machine: dict

    @classmethod
    def load(cls, path: str | Path) -> "Profile":
        try:
            data = json.loads(Path(path).read_text())
        except (OSError, json.JSONDecodeError) as e:
            raise AfdError(f"cannot read the profile {path}: {e}") from None
        data = data.get("profile", data) if isinstance(data, dict) else {}
        missing = sorted(set(cls.__dataclass_fields__) - set(data))
        if missing:
            raise AfdError(f"{path} is not an AFD profile (no {', '.join(missing)}); "
                           "write one with `afd bench --scenario afd`")
        return cls(**{k: data[k] for k in cls.__dataclass_fields__})

    def to_json(self) -> dict:
        return asdict(self)


def step_time(p: Profile, batch: int, micro_batches: int, afd_size: str = "1A1F", delay_s: float = 0.0) -> float:
    """Predicted seconds per decode step for `batch` sequences over all attention ranks."""
    topo = Topology.parse(afd_size)
    x, y = topo.num_attention, topo.num_ffn
    rank_batch = batch / x
    # As roles/attention.py splits: micro-batches of ceil(B / m) rows, so B < m gives fewer.
    b = math.ceil(rank_batch / micro_batches)
    micro_batches = math.ceil(rank_batch / b)
    peers = max(x // y, 1)  # attention ranks per FFN rank
    half_trip = at(p.round_trip, b) / 2 + delay_s
    ffn_rows = peers * b

    def ffn(layer: int) -> float:
        t = at(p.ffn[layer], ffn_rows)
        return t if y == 1 else t / y + at(p.round_trip, ffn_rows)

    t_attn = t_ffn = 0.0
    back = [[0.0] * micro_batches for _ in range(p.num_layers)]
    for layer in range(p.num_layers):
        for k in range(micro_batches):
            if layer:
                t_attn = max(t_attn, back[layer - 1][k])
            t_attn += at(p.attention, b) + at(p.attention_send, b)
            t_ffn = max(t_ffn, t_attn + half_trip) + ffn(layer) + peers * at(p.ffn_send, b)
            back[layer][k] = t_ffn + half_trip
    t_attn = max(t_attn, *back[-1])
    return t_attn + at(p.step_overhead, rank_batch) + (micro_batches - 1) * p.micro_batch_overhead


def _spans(events) -> dict:
    """Mean seconds of each (side, span name, layer) over a timeline."""
    acc = defaultdict(list)
    for e in events:
        if e.get("ph") == "X":
            acc[e["cat"], e["name"], e["args"].get("layer")].append(e["dur"] * 1e-6)
    return {k: statistics.fmean(v) for k, v in acc.items()}


def _over_layers(spans: dict, side: str, name: str, first: int = 0) -> float:
    return statistics.fmean(v for (c, n, layer), v in spans.items() if (c, n) == (side, name) and layer >= first)


def fit_profile(traced: dict, pingpong: dict, num_layers: int, machine: dict) -> Profile:
    """traced: {batch: m=1 run with events}; pingpong: {batch: m=2 run} for the per-micro-batch cost;
    machine: where they ran. A run is {"step_times": [...], "events": the ranks' trace events}."""
    rows, attn, attn_send, ffn_send, trip, rest = [], [], [], [], [], []
    ffn = [[] for _ in range(num_layers)]
    for b, run in sorted(traced.items()):
        s = _spans(run["events"])
        # Layer 0's attention span also holds the step's entry into its compiled graph and the
        # embedding: a per-step cost (in `rest` below), not a per-layer one.
        ta, sa = _over_layers(s, "attention", "attention", first=1), _over_layers(s, "attention", "send")
        sf = _over_layers(s, "ffn", "send")
        waits = [s["attention", "wait", l] for l in range(num_layers)]
        tf = [s["ffn", "ffn", l] for l in range(num_layers)]
        rows.append(b)
        attn.append(ta)
        attn_send.append(sa)
        ffn_send.append(sf)
        for per_layer, t in zip(ffn, tf):
            per_layer.append(t)
        trip.append(statistics.fmean(w - f - sf for w, f in zip(waits, tf)))
        rest.append(statistics.median(run["step_times"]) - num_layers * (ta + sa) - sum(waits))
    profile = Profile(num_layers=num_layers, attention=fit_line(rows, attn), attention_send=fit_line(rows, attn_send),
                      ffn=[fit_line(rows, per_layer) for per_layer in ffn], ffn_send=fit_line(rows, ffn_send),
                      round_trip=fit_line(rows, trip), step_overhead=fit_line(rows, rest), micro_batch_overhead=0.0,
                      machine=machine)
    extra = [statistics.median(run["step_times"]) - step_time(profile, b, 2) for b, run in pingpong.items()]
    profile.micro_batch_overhead = statistics.fmean(extra)
    return profile


def candidates(cores: int) -> list[str]:
    """Every xAyF whose x + y ranks fit on `cores` cores, one rank per core."""
    return [f"{x}A{y}F" for x in range(1, cores) for y in range(1, cores - x + 1) if x % y == 0 or y % x == 0]


def plan(p: Profile, batch: int, cores: int, max_micro_batches: int = 6, delay_s: float = 0.0) -> list[dict]:
    """Predicted step time and throughput of every topology and micro-batch count, best first."""
    rows = []
    for afd_size in candidates(cores):
        x = Topology.parse(afd_size).num_attention
        for m in range(1, max_micro_batches + 1):
            if batch / x / m < 1:
                continue
            t = step_time(p, batch, m, afd_size, delay_s)
            rows.append({"afd_size": afd_size, "micro_batches": m, "step_ms": t * 1e3, "tokens_per_s": batch / t})
    if not rows:
        raise AfdError(f"no topology fits batch {batch} on {cores} cores (need at least 2 cores: 1A1F)")
    return sorted(rows, key=lambda r: -r["tokens_per_s"])
