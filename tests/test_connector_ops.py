"""The connector's transfers as ops (afd_compile/connector/ops.py): inside one compiled graph
they keep the order the Python code gives them, record the rank's timeline, and a failed
transfer surfaces as its own exception."""

from __future__ import annotations

import pytest
import torch

from afd_compile.config import EngineConfig
from afd_compile.connector.base import ConnectorError, Kind, StepHeader
from afd_compile.connector.ops import Endpoint, Loopback
from afd_compile.engine import SamplingParams
from afd_compile.compilation import compile_options
from afd_compile.engine.sequence import Sequence
from afd_compile.model.loader import load_model
from afd_compile.roles.attention import AFDModelRunner
from afd_compile.trace import Tracer


class RecordingFFN:
    """An attention rank's connector whose FFN doubles what it is sent; logs every transfer."""

    def __init__(self, fail_at: int | None = None):
        self.log: list[tuple[str, int]] = []
        self.pending: dict[int, list[torch.Tensor]] = {}
        self.fail_at = fail_at

    def send_attn_output(self, x, micro_batch):
        self.log.append(("send", micro_batch))
        self.pending.setdefault(micro_batch, []).append(2 * x)

    def recv_ffn_output(self, micro_batch):
        if len(self.log) == self.fail_at:
            raise ConnectorError("the FFN rank is gone")
        self.log.append(("recv", micro_batch))
        return self.pending[micro_batch].pop(0)


def pipeline(xs: list[torch.Tensor], w: torch.Tensor, endpoint: int, layers: int = 3) -> list[torch.Tensor]:
    """The attention rank's ping-pong order (roles/attention.py _layers), with a matmul as the half."""
    hs, sent = list(xs), list(xs)
    link = xs[0].new_empty(0)
    for layer in range(layers):
        for k in range(len(hs)):
            if layer:
                hs[k] = link = torch.ops.afd.recv_ffn_output(sent[k], link, endpoint, layer - 1, k)
            sent[k] = torch.tanh(hs[k] @ w)
            link = torch.ops.afd.send_attn_output(sent[k], link, endpoint, layer, k)
    outs = []
    for k in range(len(hs)):
        link = torch.ops.afd.recv_ffn_output(sent[k], link, endpoint, layers - 1, k)
        outs.append(link)
    return outs


compiled_pipeline = torch.compile(pipeline, fullgraph=True, dynamic=False, options=compile_options(torch.device("cpu")))


@pytest.fixture
def inputs():
    torch.manual_seed(0)
    return [torch.randn(4, 8) for _ in range(2)], torch.randn(8, 8)


@torch.inference_mode()
def test_compiled_transfers_keep_the_ping_pong_order(inputs):
    """Oracle: the same function run eagerly. The compiled graph makes the same transfers in the
    same order (the compiler may not move a receive ahead of the other micro-batch's compute)
    and gives the same result."""
    xs, w = inputs
    eager_conn, compiled_conn = RecordingFFN(), RecordingFFN()
    eager, compiled = Endpoint(eager_conn, Tracer("a", 0), "attention"), Endpoint(compiled_conn, Tracer("a", 0), "attention")
    try:
        expected = pipeline(xs, w, eager.id)
        got = compiled_pipeline(xs, w, compiled.id)
    finally:
        eager.close()
        compiled.close()
    assert compiled_conn.log == eager_conn.log
    assert eager_conn.log[:4] == [("send", 0), ("send", 1), ("recv", 0), ("send", 0)]
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b)


@torch.inference_mode()
def test_transfers_record_the_timeline(inputs):
    """Each send records the compute since the previous transfer and itself; each receive a wait."""
    xs, w = inputs
    tracer = Tracer("attention 0", 0, enabled=True)
    ep = Endpoint(RecordingFFN(), tracer, "attention")
    try:
        ep.start(step=7)
        compiled_pipeline(xs, w, ep.id)
    finally:
        ep.close()
    spans = [(e["name"], e["args"]["layer"], e["args"]["micro_batch"]) for e in tracer.events]
    assert spans[:5] == [("attention", 0, 0), ("send", 0, 0), ("attention", 0, 1), ("send", 0, 1), ("wait", 0, 0)]
    assert sum(name == "wait" for name, _, _ in spans) == 3 * 2
    assert {e["args"]["step"] for e in tracer.events} == {7}
    assert all(e["cat"] == "attention" and e["dur"] >= 0 for e in tracer.events)


@torch.inference_mode()
def test_a_failed_transfer_raises_its_own_error(inputs):
    """Inside a compiled graph the connector's exception reaches the caller only as a failed
    kernel; the endpoint keeps the original, which callers re-raise (dead peer vs bug)."""
    xs, w = inputs
    ep = Endpoint(RecordingFFN(fail_at=2), Tracer("a", 0), "attention")
    try:
        ep.start(0)
        with pytest.raises(Exception):
            compiled_pipeline(xs, w, ep.id)
        with pytest.raises(ConnectorError, match="the FFN rank is gone"):
            ep.raise_error()
        ep.start(1)
        ep.raise_error()  # a new step starts clean
    finally:
        ep.close()


def test_a_closed_endpoint_is_a_clear_error(inputs):
    xs, w = inputs
    ep = Endpoint(RecordingFFN(), Tracer("a", 0), "attention")
    ep.close()
    with pytest.raises(RuntimeError, match=f"AFD endpoint {ep.id} was released"):
        pipeline(xs, w, ep.id)


class CacheWatchingLinks(Loopback):
    """Loopback links of an attention rank (its FFN returns what it is sent) that note, at each
    send, whether micro-batch 1's first-layer latent is in the KV cache yet (at blocks `slots`,
    offsets `positions`)."""

    def __init__(self, model, slots, positions):
        super().__init__(model.cfg.hidden_size, torch.float32, torch.device("cpu"))
        self.attention = model.attention_halves[0].self_attn
        self.slots, self.positions = slots, positions
        self.written_at_send: list[bool] = []

    def send_step(self, header):
        pass

    def recv_reply(self):
        return StepHeader(Kind.ACK)

    def flush(self):
        pass

    def send_attn_output(self, hidden, micro_batch):
        self.written_at_send.append(bool(self.attention.kv_cache.latent[self.slots, self.positions].abs().sum() > 0))
        super().send_attn_output(hidden, micro_batch)


@torch.inference_mode()
def test_a_micro_batch_starts_after_the_previous_one_is_sent(tiny_greedy_checkpoint):
    """Nothing orders micro-batch 1's first layer after micro-batch 0's send but afd::after:
    without it inductor fuses the two micro-batches' first layers and sends neither until both
    are computed, while the FFN rank waits. Watched through the KV cache of the compiled step."""
    model = load_model(tiny_greedy_checkpoint, part="attention")
    seqs = []
    for slot in range(4):
        seq = Sequence([1, 5, 7, 9], SamplingParams())
        seq.block_table, seq.num_computed = [slot], 3  # block `slot` of 16 positions
        seqs.append(seq)
    model.setup_caches(4, 16, 16)
    links = CacheWatchingLinks(model, torch.tensor([2, 3]), torch.tensor([3, 3]))
    runner = AFDModelRunner(model, EngineConfig(max_num_seqs=4, max_model_len=16, batch_buckets=(2,)), 16, links,
                            micro_batches=2)
    try:
        runner.decode(seqs)
    finally:
        runner.endpoint.close()
    # sends: layer 0 of micro-batches 0 and 1, then the later layers
    assert links.written_at_send[:2] == [False, True]
