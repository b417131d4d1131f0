"""The slice of the OpenAI HTTP API we serve: request/response models and error bodies.

Requests are validated strictly (no "1" for 1, no true for 1) so a wrong type is a
400, never a silent coercion. Unknown fields are ignored, as OpenAI-compatible
servers do, except the known OpenAI features we do not implement
(`UNSUPPORTED`): asking for one of those is a 400 rather than a quiet no-op.
Errors are `{"error": {"message", "type", "param", "code"}}` like OpenAI's.
"""
from __future__ import annotations

import json
import time
import uuid
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

MAX_N = 16      # choices per prompt
MAX_ROWS = 32   # prompts x n per request: bounds one request's share of a batch
MAX_STOP = 4    # OpenAI's limit on stop sequences
MAX_LOGPROBS = 5  # top alternatives per token (OpenAI's completions limit; its chat allows 20)

# field -> values that mean "feature not requested" (anything else is refused).
UNSUPPORTED: dict[str, tuple] = {
    "best_of": (None, 1), "suffix": (None, ""), "logit_bias": (None, {}),
    "presence_penalty": (None, 0), "frequency_penalty": (None, 0),
    "tools": (None, []), "tool_choice": (None, "none"), "functions": (None, []),
    "response_format": (None, {"type": "text"}),
}


class APIError(Exception):
    """An error the client caused (4xx) or we did (5xx), rendered as OpenAI's error body."""

    def __init__(self, status: int, message: str, param: str | None = None,
                 code: str | None = None, type: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("server_error" if status >= 500 else "invalid_request_error")

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def from_validation_error(err: ValidationError) -> APIError:
    """The first pydantic problem as a 400 naming the offending field."""
    first = err.errors(include_url=False)[0]
    if first["type"] == "json_invalid":
        return APIError(400, f"request body is not valid JSON: {first['msg']}", code="invalid_json")
    param = ".".join(str(p) for p in first["loc"]) or None
    where = f"{param}: " if param else ""
    more = f" (and {err.error_count() - 1} more problems)" if err.error_count() > 1 else ""
    return APIError(400, f"{where}{first['msg']}{more}", param=param, code="invalid_value")


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    include_usage: bool | None = None


class _Request(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)
    unsupported: ClassVar[dict[str, tuple]] = UNSUPPORTED

    model: str
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    n: int | None = Field(None, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-(2**63), lt=2**64)
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _refuse_unsupported(cls, data: Any) -> Any:
        if isinstance(data, dict):
            for key, allowed in cls.unsupported.items():
                if key in data and not any(_same(data[key], a) for a in allowed):
                    # An APIError passes through pydantic, so the 400 can name the field.
                    raise APIError(400, f"{key}={data[key]!r} is not supported by this server",
                                   param=key, code="unsupported_value")
        return data

    def stop_list(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise APIError(400, f"stop: at most {MAX_STOP} sequences", param="stop")
        if any(s == "" for s in stops):
            raise APIError(400, "stop: sequences must not be empty", param="stop")
        return tuple(stops)


def _same(value: Any, allowed: Any) -> bool:
    """Equality that does not let True pass for 1, nor 0 for False."""
    if isinstance(value, bool) or isinstance(allowed, bool):
        return value is allowed
    return value == allowed


class CompletionRequest(_Request):
    # Chat's name for the alternatives count; here it is `logprobs`.
    unsupported: ClassVar[dict[str, tuple]] = {**UNSUPPORTED, "top_logprobs": (None,)}

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = Field(16, ge=0)  # OpenAI's default for completions; 0 with echo
    echo: bool | None = None
    logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _zero_tokens_only_to_score(self) -> CompletionRequest:
        if self.max_tokens == 0 and not self.echo:
            raise APIError(400, "max_tokens: 0 generates nothing; it is only allowed with echo: true "
                           "(to score the prompt)", param="max_tokens", code="invalid_value")
        return self


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatRequest(_Request):
    unsupported: ClassVar[dict[str, tuple]] = {**UNSUPPORTED, "echo": (None, False)}

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)             # None: what the context leaves
    max_completion_tokens: int | None = Field(None, ge=1)  # OpenAI's newer name; wins
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)

    @model_validator(mode="after")
    def _top_logprobs_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs: true", param="top_logprobs",
                           code="invalid_value")
        return self

    def token_budget(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens

    def alternatives(self) -> int | None:
        """Top alternatives per token when logprobs are asked for, else None."""
        return (self.top_logprobs or 0) if self.logprobs else None


# ---- responses -------------------------------------------------------------------

class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(BaseModel):
    """The legacy completions shape: parallel lists, one entry per token (echoed prompt first)."""
    tokens: list[str]
    token_logprobs: list[float | None]             # None: the prompt's first token
    top_logprobs: list[dict[str, float] | None]    # top alternatives and the chosen token
    text_offset: list[int]                         # where each token's text starts in `text`


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token text's UTF-8 bytes


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]  # the most likely alternatives, most likely first


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"]


class ChatResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None


class ChatChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "instructray"


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now() -> int:
    return int(time.time())


def sse(payload: BaseModel | dict) -> str:
    """One server-sent event; `[DONE]` ends the stream as in OpenAI's API."""
    data = payload.model_dump_json(exclude_none=False) if isinstance(payload, BaseModel) \
        else json.dumps(payload)
    return f"data: {data}\n\n"


SSE_DONE = "data: [DONE]\n\n"
