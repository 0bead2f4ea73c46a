"""OpenAI's routes: ``/v1/completions``, ``/v1/chat/completions`` (streamed or whole) and ``/v1/models``.

A request's ``model`` is the base's name (no adapter) or an adapter's. Validation errors are 4xx before
anything is queued; a full queue is 429; a request past ``request_timeout_s`` is 504 (or, streaming,
a final error event). Both response kinds read the same engine events (:mod:`serve.events`), and a
stream starts (200) only with its first event: a request the engine refuses as the client's fault before
any token gets the same 4xx as the whole response, never a 200 stream that carries an error.
"""

from __future__ import annotations

import queue
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Literal

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from serve.adapters import AdapterError
from serve.engine import GenRequest  # the request type only: importing serve.engine does not import torch
from serve.errors import ApiError
from serve.events import Done, Event, EventQueue, Text, collect
from serve.protocol import GenerationEngine
from serve.routes.deps import RunningEngine, State
from serve.schemas import (
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatDelta,
    ChatMessage,
    Completion,
    CompletionChoice,
    CompletionRequest,
    ErrorBody,
    ModelCard,
    ModelList,
    SamplingRequest,
    Usage,
)
from serve.state import AppState

router = APIRouter(prefix="/v1", tags=["openai"])

Route = Literal["completions", "chat"]


@router.get("/models", response_model=ModelList)
async def models(state: State, engine: RunningEngine) -> ModelList:
    """The base (first), then every adapter the registry knows, with its state."""
    cards = [ModelCard(id=state.base_name, kind="base", state="ready")]
    for e in engine.registry.snapshot():
        loaded = e.handle is not None
        cards.append(ModelCard(id=e.name, created=e.created if loaded else 0, kind=e.kind, state=e.state.value,
                               pinned=e.pinned if loaded else None, source=e.source, reason=e.reason))
    return ModelList(data=cards)


@router.post("/completions", response_model=Completion)
async def completions(body: CompletionRequest, state: State, engine: RunningEngine):
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    if len(prompts) != 1:
        raise ApiError(400, "exactly one prompt per request is supported; send several requests", param="prompt")
    return await _generate(state, engine, body, prompts[0], "completions")


@router.post("/chat/completions", response_model=ChatCompletion)
async def chat_completions(body: ChatCompletionRequest, state: State, engine: RunningEngine):
    messages = [m.model_dump() for m in body.messages]
    if engine.tokenizer.chat_template:
        try:
            text = engine.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except AdapterError as exc:  # the ONNX backend's template needs jinja2 for several messages
            raise ApiError(exc.status, str(exc), param="messages") from None
        except Exception as exc:  # noqa: BLE001 - the template's own refusal (e.g. roles must alternate)
            raise ApiError(400, f"the base's chat template refused these messages: {exc}", param="messages") from None
    else:
        text = "\n".join(m["content"] for m in messages) + "\n"
    return await _generate(state, engine, body, text, "chat")


@dataclass
class _Job:
    """One queued generation and what its response is built from."""

    route: Route
    model: str
    id: str
    created: int
    prompt_tokens: int
    request: GenRequest
    """``cancelled`` frees its batch slot."""
    events: EventQueue
    started: float


async def _generate(state: AppState, engine: GenerationEngine, body: SamplingRequest, text: str, route: Route):
    job = _submit(state, engine, body, text, route)
    if body.stream:
        return StreamingResponse(_stream(state, job, await _opening(state, job)), media_type="text/event-stream")
    try:
        result = await collect(_observed(state, job))
    finally:
        job.request.cancelled = True
    failure = _finished(state, job, result.done)
    if failure is not None:
        raise failure
    usage = Usage.of(job.prompt_tokens, result.done.completion_tokens)
    if route == "chat":
        return ChatCompletion(id=job.id, created=job.created, model=job.model, usage=usage, choices=[
            ChatChoice(message=ChatMessage(role="assistant", content=result.text), finish_reason=result.done.reason)])
    return Completion(id=job.id, created=job.created, model=job.model, usage=usage,
                      choices=[CompletionChoice(text=result.text, finish_reason=result.done.reason)])


def _submit(state: AppState, engine: GenerationEngine, body: SamplingRequest, text: str, route: Route) -> _Job:
    """Validate the request against the server's limits, tokenize, queue it (ApiError: 4xx, 429)."""
    settings = state.settings
    adapter = None if body.model == state.base_name else body.model
    if adapter is not None and not engine.registry.servable(adapter):
        raise ApiError(404, f"model {body.model!r} does not exist: GET /v1/models lists the base and the "
                       "adapters; POST /v1/adapters loads one", param="model", code="model_not_found")
    if body.n != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = body.max_tokens or min(256, settings.max_tokens)
    if max_tokens > settings.max_tokens:
        raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit {settings.max_tokens}",
                       param="max_tokens")
    ids = engine.tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:  # the model needs at least one token to predict the next from
        raise ApiError(400, "the prompt is empty (0 tokens): send some text", param="prompt")
    if len(ids) + max_tokens > engine.context_length:
        raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                       f"length {engine.context_length}; shorten the prompt or lower max_tokens",
                       param="messages" if route == "chat" else "prompt", code="context_length_exceeded")
    stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")

    events = EventQueue()
    request = GenRequest(prompt_ids=ids, max_tokens=max_tokens, adapter=adapter, temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed, stop=stops, on_text=events.on_text,
                         on_done=events.on_done, deadline=time.monotonic() + settings.request_timeout_s)
    started = time.perf_counter()
    try:
        engine.submit(request)
    except queue.Full:
        state.metrics.requests.labels(route, body.model, "429").inc()
        raise ApiError(429, "the server is at capacity; retry after a moment", "rate_limit_error",
                       headers={"Retry-After": "1"}) from None
    return _Job(route, body.model, f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                int(time.time()), len(ids), request, events, started)


async def _observed(state: AppState, job: _Job) -> AsyncIterator[Event]:
    """The job's events, timing its first token."""
    first = True
    async for event in job.events:
        if first and isinstance(event, Text):
            state.metrics.ttft.labels(job.route).observe(time.perf_counter() - job.started)
            first = False
        yield event


def _status(job: _Job, done: Done) -> int:
    """The HTTP status of a request that ended with ``done``: 200, or for one that failed, 504 (timeout),
    400 (a prompt that leaves its adapter's virtual tokens no room), the adapter's status (404: unloaded after the
    request was accepted; 422: its files no longer load), 500 (any other error)."""
    status = {"timeout": 504, "error": 500}.get(done.reason, 200)
    if status == 500 and job.request.context_overflow:
        status = 400
    elif status == 500 and job.request.error_status is not None:
        status = job.request.error_status
    return status


def _finished(state: AppState, job: _Job, done: Done) -> ApiError | None:
    """Record the request's metrics; for a request that failed (see :func:`_status`), its error."""
    status = _status(job, done)
    state.metrics.requests.labels(job.route, job.model, str(status)).inc()
    state.metrics.latency.labels(job.route).observe(time.perf_counter() - job.started)
    state.metrics.tokens.labels(job.model).inc(done.completion_tokens)
    if status == 504:
        return ApiError(504, f"request timed out after {state.settings.request_timeout_s:g} s", "server_error")
    if status == job.request.error_status and status < 500:  # its adapter's fault, as the engine named it
        return ApiError(status, str(done.error), param="model", code="model_not_found" if status == 404 else None)
    if status == 400:
        return ApiError(400, str(done.error),
                        param="messages" if job.route == "chat" else "prompt", code="context_length_exceeded")
    if status == 500:
        return ApiError(500, f"generation failed: {done.error}", "server_error")
    return None


async def _opening(state: AppState, job: _Job) -> AsyncIterator[Event]:
    """The job's events, once the first has come: a request that ends before its first token for a fault
    of the client's (a 4xx) raises that ApiError here, before any status is sent, as the whole response
    would. Other ends (a timeout, a server error) stay in the stream, as they would after a token."""
    events = _observed(state, job)
    try:
        first = await anext(events)
        if isinstance(first, Done) and 400 <= _status(job, first) < 500:
            raise _finished(state, job, first)
    except BaseException:
        job.request.cancelled = True  # refused, or the client went away while it waited
        raise

    async def replay() -> AsyncIterator[Event]:
        yield first
        async for event in events:
            yield event

    return replay()


async def _stream(state: AppState, job: _Job, events: AsyncIterator[Event]) -> AsyncIterator[str]:
    """Server-sent events: a chunk per text piece, a last chunk with the finish reason and usage (or an
    error event), then ``[DONE]``."""
    first = True
    try:
        async for event in events:
            if isinstance(event, Text):
                yield _sse(_chunk(job, event.text, None, first))
                first = False
                continue
            failure = _finished(state, job, event)
            if failure is not None:
                yield _sse(ErrorBody(error=failure.detail))
            else:
                yield _sse(_chunk(job, None, event.reason, first,
                                  Usage.of(job.prompt_tokens, event.completion_tokens)))
        yield "data: [DONE]\n\n"
    finally:
        job.request.cancelled = True  # a client that went away frees its batch slot


def _chunk(job: _Job, text: str | None, finish: str | None, first: bool,
           usage: Usage | None = None) -> Completion | ChatCompletionChunk:
    """One streamed chunk; a chat stream's first one names the role."""
    if job.route == "chat":
        delta = ChatDelta(role="assistant", content=text or "") if first else ChatDelta(content=text or None)
        return ChatCompletionChunk(id=job.id, created=job.created, model=job.model, usage=usage,
                                   choices=[ChatChunkChoice(delta=delta, finish_reason=finish)])
    return Completion(id=job.id, created=job.created, model=job.model, usage=usage,
                      choices=[CompletionChoice(text=text or "", finish_reason=finish)])


def _sse(payload: BaseModel) -> str:
    return f"data: {payload.model_dump_json()}\n\n"
