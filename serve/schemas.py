"""The HTTP API's bodies, in OpenAI's shapes: what clients send and what the server answers.

Requests ignore unknown fields (OpenAI clients send more than this server uses). Responses name
every field OpenAI's clients read; a field listed in ``omit_if_none`` is left out while None, as
OpenAI's server does (a chunk's ``usage``, a delta's ``role``), other None fields are sent as null.
"""

from __future__ import annotations

from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_serializer

from edge.generation import SEED_MAX, SMALLEST, check_temperature, check_top_p

OWNER = "edgetune"


def _unicode(value: str) -> str:
    """``value`` if it is valid Unicode text; a lone surrogate (JSON ``"\\ud800"``) is text no tokenizer,
    log or response can encode, so it is refused here, as a 400 naming the field, not a 500 later."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"not valid Unicode: a lone surrogate ({value[exc.start]!r}) at character {exc.start}; "
                         "send UTF-8 text (a \\u escape above U+FFFF needs both halves of its pair)") from None
    return value


Text = Annotated[str, AfterValidator(_unicode)]
"""A request string: any valid Unicode text."""


class _Response(BaseModel):
    omit_if_none: ClassVar[frozenset[str]] = frozenset()

    @model_serializer(mode="wrap")
    def _omit_none(self, handler) -> dict[str, Any]:
        return {k: v for k, v in handler(self).items() if v is not None or k not in self.omit_if_none}


# ---- requests ------------------------------------------------------------------------------------
class SamplingRequest(BaseModel):
    """What completions and chat completions share: the model (base or adapter name) and sampling."""

    model_config = ConfigDict(extra="ignore")

    model: Text
    """The base's name, or an adapter's."""
    max_tokens: int | None = Field(default=None, ge=1)
    # The bounds every sampler shares (edge.generation): below SMALLEST a float32 sampler rounds to 0.
    temperature: Annotated[float, AfterValidator(check_temperature)] = Field(
        default=1.0, ge=0.0, le=2.0, description=f"0 (greedy) or in [{SMALLEST:.3g}, 2]")
    top_p: Annotated[float, AfterValidator(check_top_p)] = Field(
        default=1.0, gt=0.0, le=1.0, description=f"in [{SMALLEST:.3g}, 1]")
    stop: Text | list[Text] | None = None
    seed: Annotated[int, Field(ge=0, le=SEED_MAX)] | None = None
    """Repeats a sample (within one backend); what both samplers' generators take: [0, 2**63 - 1]."""
    n: int = 1
    stream: bool = False


class CompletionRequest(SamplingRequest):
    prompt: Text | list[Text]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: Text


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterLoadRequest(BaseModel):
    """``POST /v1/adapters``: load (or hot-swap) ``name`` from folder ``source`` (default: ``name``)."""

    name: Text
    source: Text | None = None
    pinned: bool = False


# ---- completions ---------------------------------------------------------------------------------
class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, prompt_tokens: int, completion_tokens: int) -> Usage:
        return cls(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens)


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    finish_reason: str | None
    logprobs: None = None


class Completion(_Response):
    """A whole completion, or (``usage`` only on the last) one streamed chunk of it: OpenAI uses one shape."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"usage"})

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ChatChoice(BaseModel):
    index: int = 0
    message: ChatMessage
    finish_reason: str | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Response):
    """The new text of a chat chunk; the first chunk also names the role."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"role", "content"})

    role: Literal["assistant"] | None = None
    content: str | None = None


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    finish_reason: str | None


class ChatCompletionChunk(_Response):
    omit_if_none: ClassVar[frozenset[str]] = frozenset({"usage"})

    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None
    """On the last chunk only."""


# ---- models and adapters -------------------------------------------------------------------------
class ModelCard(_Response):
    """``GET /v1/models``: the base (``kind: base``) or an adapter, with its registry state."""

    omit_if_none: ClassVar[frozenset[str]] = frozenset({"kind", "pinned", "source", "reason"})

    id: str
    object: Literal["model"] = "model"
    owned_by: str = OWNER
    created: int = 0
    kind: str | None = None
    state: Literal["loading", "ready", "evicted", "failed"]
    pinned: bool | None = None
    source: str | None = None
    reason: str | None = None
    """Why its last load failed."""


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class AdapterLoaded(BaseModel):
    id: str
    object: Literal["model"] = "model"
    state: Literal["ready"] = "ready"
    kind: str
    pinned: bool


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["model"] = "model"
    deleted: bool
    """False when it was not loaded (deleting is idempotent)."""


# ---- operations and errors -----------------------------------------------------------------------
class Health(BaseModel):
    status: Literal["ok"] = "ok"


class Readiness(BaseModel):
    status: Literal["ready"] = "ready"
    base: str


class ErrorDetail(BaseModel):
    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    """OpenAI's error body, for every 4xx/5xx and a stream's final error event."""

    error: ErrorDetail
