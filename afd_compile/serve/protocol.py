"""OpenAI request and response schemas (with vLLM's extra sampling fields), as pydantic models
so FastAPI validates requests and publishes them in /openapi.json."""

from __future__ import annotations

import time
import uuid
from typing import Annotated, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_serializer

from afd_compile.engine.sampling_params import SamplingParams

# Requests are validated strictly, as /openapi.json publishes them: `"n": 1.5`, `"top_k": true`,
# `"temperature": "0.5"` or `"prompt": [[false]]` are 400s, not silently coerced to something else.
STRICT = ConfigDict(strict=True)


def _utf8(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"must be valid Unicode text, but has a lone surrogate {text[e.start]!r} at {e.start}") from None
    return text


# JSON may spell a lone surrogate ("\ud800"); the tokenizer cannot take one (a TypeError, once a 500).
Text = Annotated[str, AfterValidator(_utf8)]


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "user", "assistant"]
    content: Text


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingRequest(BaseModel):
    """Fields shared by chat and text completions (OpenAI names plus vLLM's extras)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=-1, ge=-1)
    min_p: float = Field(default=0.0, ge=0.0, le=1.0)
    repetition_penalty: float = Field(default=1.0, gt=0.0, le=10.0)
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False
    n: int = Field(default=1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def sampling_params(self, max_tokens: int, logprobs: int | None, index: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        # n choices from one seeded request must differ from each other, yet be reproducible.
        seed = None if self.seed is None else self.seed + index
        return SamplingParams(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                              repetition_penalty=self.repetition_penalty, presence_penalty=self.presence_penalty,
                              frequency_penalty=self.frequency_penalty, seed=seed, max_tokens=max_tokens, stop=stop,
                              stop_token_ids=list(self.stop_token_ids or []), ignore_eos=self.ignore_eos,
                              logprobs=logprobs)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(default=None, ge=0, le=20)


class CompletionRequest(SamplingRequest):
    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(default=16, ge=1)
    logprobs: int | None = Field(default=None, ge=0, le=20)
    echo: bool = False

    @field_validator("prompt")
    @classmethod
    def _prompt_text(cls, prompt):  # after the union: one clear message, not one per branch
        for text in [prompt] if isinstance(prompt, str) else prompt:
            if isinstance(text, str):
                _utf8(text)
        return prompt


class TokenizeCompletionRequest(BaseModel):
    """vLLM's /tokenize body for a text prompt."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    prompt: Text
    add_special_tokens: bool = True


class TokenizeChatRequest(BaseModel):
    """vLLM's /tokenize body for chat messages (the prompt the chat endpoint would build)."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    messages: list[ChatMessage] = Field(min_length=1)


class DetokenizeRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    tokens: list[int]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: int


class ErrorResponse(BaseModel):
    error: ErrorBody

    @classmethod
    def of(cls, code: int, message: str, kind: str = "invalid_request_error",
           param: str | None = None) -> ErrorResponse:
        return cls(error=ErrorBody(message=message, type=kind, param=param, code=code))


class TraceRequest(BaseModel):
    model_config = STRICT

    steps: int = Field(default=8, ge=1, le=1000)
    timeout: float = Field(default=30.0, gt=0, le=600)


# ---------------------------------------------------------------- responses


class Reply(BaseModel):
    """A response body. Some fields are left out while they are None (a chunk's usage, a chat
    choice's logprobs unless asked for), others are sent as null (finish_reason, a completion
    choice's logprobs): a class names the former in omit_none."""

    omit_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler):
        return {k: v for k, v in handler(self).items() if v is not None or k not in self.omit_none}


class Usage(Reply):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class Envelope(Reply):
    """What every completion and chunk starts with; `object` names the kind."""

    id: str
    object: str
    created: int
    model: str


class ChatLogprob(Reply):
    token: str
    logprob: float
    bytes: list[int]


class ChatLogprobToken(ChatLogprob):
    top_logprobs: list[ChatLogprob]


class ChatLogprobs(Reply):
    content: list[ChatLogprobToken]


class ChatChoice(Reply):
    """A chat choice, whole or a chunk's: its logprobs only when asked for."""

    omit_none = frozenset({"logprobs"})

    index: int


class ChatCompletionResponseChoice(ChatChoice):
    message: ChatMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionResponse(Envelope):
    object: Literal["chat.completion"] = "chat.completion"
    choices: list[ChatCompletionResponseChoice]
    usage: Usage


class DeltaMessage(Reply):
    """A chat chunk's delta: the role in a choice's first chunk only; {} for a last chunk without text."""

    omit_none = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatCompletionResponseStreamChoice(ChatChoice):
    delta: DeltaMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatCompletionStreamResponse(Envelope):
    """A chunk with one choice's delta, or the last one with no choices and the usage."""

    omit_none = frozenset({"usage"})

    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    choices: list[ChatCompletionResponseStreamChoice]
    usage: Usage | None = None


class CompletionLogprobs(Reply):
    tokens: list[str]
    token_logprobs: list[float]
    top_logprobs: list[dict[str, float]]
    text_offset: list[int] = []  # not computed


class CompletionResponseChoice(Reply):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None


class CompletionResponse(Envelope):
    object: Literal["text_completion"] = "text_completion"
    choices: list[CompletionResponseChoice]
    usage: Usage


class CompletionStreamResponse(CompletionResponse):
    """As OpenAI: a chunk's object is "text_completion" too; the last has no choices and the usage."""

    omit_none = frozenset({"usage"})

    usage: Usage | None = None


class ModelCard(Reply):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "afd-compile"
    max_model_len: int


class ModelList(Reply):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class HealthResponse(Reply):
    omit_none = frozenset({"message"})

    status: Literal["ok", "degraded"]
    backend: str
    message: str | None = None


class VersionResponse(Reply):
    version: str


class TokenizeResponse(Reply):
    count: int
    max_model_len: int
    tokens: list[int]


class DetokenizeResponse(Reply):
    prompt: str
