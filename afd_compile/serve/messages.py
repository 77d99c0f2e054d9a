"""The typed messages between the API process and the engine core process (engine_core.py),
msgpack-encoded by msgspec over ZMQ: token ids, parameters and states, never pickles.

Each is a msgspec Struct tagged with its class name; a frame whose tag is none of them, or that
is not a message at all, is a ProtocolError naming what arrived, never a silent drop.
"""

from __future__ import annotations

import msgspec

from afd_compile.engine.sampling_params import SamplingParams
from afd_compile.errors import AfdError


class ProtocolError(AfdError):
    pass


class _Message(msgspec.Struct, tag=True, array_like=True):
    pass


# ---- API process -> engine core
class AddRequest(_Message):
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class AbortRequest(_Message):
    request_id: str


class StartTrace(_Message):
    ask_id: int  # the reply's, as EngineClient._ask numbers them
    steps: int
    timeout_s: float


class GetMetrics(_Message):
    ask_id: int


class Shutdown(_Message):
    pass


# ---- engine core -> API process
class Ready(_Message):
    max_model_len: int
    backend: str  # "monolithic" or "AFD xAyF"


class StartupFailed(_Message):
    error: str
    bad_input: bool  # an AfdError (the user's to fix), not a crash


class Output(msgspec.Struct, array_like=True):
    """A request's new tokens (the API process detokenizes them), or how it ended."""
    request_id: str
    token_ids: list[int]
    logprobs: list[dict]
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None  # the engine failed: 503
    bad_request: str | None = None  # add_request refused it: 400


class Outputs(_Message):
    """One engine step's outputs, one message for the batch."""
    outputs: list[Output]


class EngineState(_Message):
    """Sent whenever it changes: what /health reports."""
    healthy: bool
    reconnecting: bool
    error: str | None
    stalled: str | None = None  # a step has run past STALL_LIMIT_S (a silent AFD peer): why, for /health


class TraceDone(_Message):
    ask_id: int
    trace: dict | None
    error: str | None
    status: int = 503  # the HTTP status the API answers an error with: 400 bad request, 409 nothing to record


class Metrics(_Message):
    ask_id: int
    text: bytes  # the core's Prometheus exposition


TO_CORE = AddRequest | AbortRequest | StartTrace | GetMetrics | Shutdown
FROM_CORE = Ready | StartupFailed | Outputs | EngineState | TraceDone | Metrics

_encoder = msgspec.msgpack.Encoder()
_decoders = {"core": msgspec.msgpack.Decoder(TO_CORE), "api": msgspec.msgpack.Decoder(FROM_CORE)}


def encode(message: _Message) -> bytes:
    return _encoder.encode(message)


def decode(frame: bytes, to: str):
    """The message of one frame sent to `to` ("core" or "api")."""
    try:
        return _decoders[to].decode(frame)
    except msgspec.ValidationError as e:
        tag = _tag(frame)
        what = f"a message of unknown type {tag!r}" if isinstance(tag, str) else "a malformed message"
        raise ProtocolError(f"the {to} process received {what} ({e})") from None
    except msgspec.DecodeError as e:
        raise ProtocolError(f"the {to} process received a frame that is not a message ({e})") from None


def _tag(frame: bytes):
    try:
        value = msgspec.msgpack.decode(frame)
    except msgspec.DecodeError:
        return None
    return value[0] if isinstance(value, list) and value else None
