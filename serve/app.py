"""The OpenAI-compatible HTTP server: routes, auth, validation, back-pressure, metrics.

Routes
  GET  /health, /ready, /metrics (Prometheus)          open
  GET  /v1/models                                       base + adapters (state: ready, failed, evicted)
  POST /v1/completions, /v1/chat/completions            ``model`` names the adapter (the base's name: none)
  POST /v1/adapters {"name", "source", "pinned"}        load or hot-swap an adapter from the adapter root
  DELETE /v1/adapters/{name}                            unload (idempotent)
Errors use OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import queue
import time
import uuid
from pathlib import Path
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serve.adapters import AdapterError, check_name, inspect_adapter, resolve_source
from serve.settings import ServeSettings

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error answered with OpenAI's error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code, self.headers = (
            status, message, type_, param, code, headers)


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    n: int = 1
    stream: bool = False


class CompletionBody(_Sampling):
    prompt: str | list[str]


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatBody(_Sampling):
    messages: list[ChatMessage] = Field(min_length=1)


class AdapterBody(BaseModel):
    name: str
    source: str | None = None
    pinned: bool = False


class Metrics:
    """The server's Prometheus metrics, in a registry of their own."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("edgetune_requests", "Requests by route, adapter and status",
                                ["route", "adapter", "status"], registry=r)
        self.latency = Histogram("edgetune_request_latency_seconds", "Request latency", ["route"], registry=r)
        self.ttft = Histogram("edgetune_time_to_first_token_seconds", "Time to first token", ["route"], registry=r)
        self.tokens = Counter("edgetune_generated_tokens", "Generated tokens", ["adapter"], registry=r)
        self.queue = Gauge("edgetune_queue_depth", "Requests waiting for a batch slot", registry=r)
        self.loaded = Gauge("edgetune_loaded_adapters", "Adapters in memory", registry=r)
        self.load_time = Histogram("edgetune_adapter_load_seconds", "Adapter load time", registry=r)
        self.batch = Histogram("edgetune_decode_batch_size", "Requests decoded together per step", registry=r,
                               buckets=(1, 2, 4, 8, 16, 32, 64))


def create_app(settings: ServeSettings, *, model=None, tokenizer=None) -> FastAPI:
    """The app; ``model``/``tokenizer`` skip loading the base (tests), else it loads at start-up."""
    from contextlib import asynccontextmanager

    state: dict[str, Any] = {"engine": None, "base_name": _base_name(settings.base)}
    metrics = Metrics()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await asyncio.to_thread(_start, settings, state, model, tokenizer, metrics)
        yield
        engine = state.get("engine")
        if engine is not None:
            await asyncio.to_thread(engine.shutdown, settings.request_timeout_s)

    app = FastAPI(title="edgetune server", lifespan=lifespan)
    app.state.edgetune = state

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError):
        return _error(exc.status, exc.message, exc.type, exc.param, exc.code, exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return _error(400, f"invalid request: {where or 'body'}: {first.get('msg', 'malformed')}", param=where or None)

    def auth(request: Request) -> None:
        if settings.api_key and request.headers.get("authorization") != f"Bearer {settings.api_key}":
            raise ApiError(401, "missing or wrong API key: send Authorization: Bearer <key>", "authentication_error",
                           code="invalid_api_key")

    def engine():
        if state["engine"] is None:
            raise ApiError(503, "the base model is still loading", "server_error", headers={"Retry-After": "5"})
        return state["engine"]

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        if state["engine"] is None:
            return _error(503, "the base model is still loading", "server_error")
        return {"status": "ready", "base": state["base_name"]}

    @app.get("/metrics")
    async def prometheus():
        from prometheus_client import generate_latest

        if state["engine"] is not None:
            metrics.queue.set(state["engine"].queue_depth())
            metrics.loaded.set(len(state["engine"].adapters))
        return PlainTextResponse(generate_latest(metrics.registry).decode(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models(request: Request):
        auth(request)
        eng = engine()
        data = [{"id": state["base_name"], "object": "model", "owned_by": "edgetune", "created": 0, "kind": "base",
                 "state": "ready"}]
        for name, a in list(eng.adapters.items()):
            data.append({"id": name, "object": "model", "owned_by": "edgetune", "created": int(a.loaded_at),
                         "kind": a.info.kind, "state": "ready", "pinned": a.pinned, "source": a.source})
        for name in list(eng.known_sources):
            if name not in eng.adapters:
                data.append({"id": name, "object": "model", "owned_by": "edgetune", "created": 0,
                             "state": "evicted", "source": eng.known_sources[name][0]})
        for name, reason in list(eng.failed.items()):
            data.append({"id": name, "object": "model", "owned_by": "edgetune", "created": 0, "state": "failed",
                         "reason": reason})
        for name in list(state.get("loading", ())):
            data.append({"id": name, "object": "model", "owned_by": "edgetune", "created": 0, "state": "loading"})
        return {"object": "list", "data": data}

    @app.post("/v1/adapters")
    async def load_adapter(body: AdapterBody, request: Request):
        auth(request)
        eng = engine()
        try:
            name = check_name(body.name)
            info = await asyncio.to_thread(_load, settings, state, eng, name, body.source or name, body.pinned, metrics)
        except AdapterError as exc:
            raise ApiError(exc.status, str(exc), param="source" if "source" in str(exc) else "name") from None
        return {"id": name, "object": "model", "state": "ready", "kind": info.kind, "pinned": body.pinned}

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(name: str, request: Request):
        auth(request)
        eng = engine()
        try:
            check_name(name)
        except AdapterError as exc:
            raise ApiError(400, str(exc), param="name") from None
        deleted = await asyncio.to_thread(eng.run_command, lambda: eng.unload(name))
        metrics.loaded.set(len(eng.adapters))
        return {"id": name, "object": "model", "deleted": bool(deleted)}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        auth(request)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "exactly one prompt per request is supported; send several requests", param="prompt")
        return await _generate(request, body, prompts[0], "completions")

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        auth(request)
        tok = state["tokenizer"]
        messages = [m.model_dump() for m in body.messages]
        if tok.chat_template:
            try:
                text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except AdapterError as exc:  # the ONNX backend's template needs jinja2 for several messages
                raise ApiError(exc.status, str(exc), param="messages") from None
        else:
            text = "\n".join(m["content"] for m in messages) + "\n"
        return await _generate(request, body, text, "chat")

    async def _generate(request: Request, body: _Sampling, text: str, route: str):
        from serve.engine import GenRequest

        eng = engine()
        adapter = None if body.model == state["base_name"] else body.model
        if adapter is not None and adapter not in eng.adapters and adapter not in eng.known_sources:
            raise ApiError(404, f"model {body.model!r} does not exist: GET /v1/models lists the base and the "
                           "adapters; POST /v1/adapters loads one", param="model", code="model_not_found")
        if body.n != 1:
            raise ApiError(400, "only n=1 is supported", param="n")
        max_tokens = body.max_tokens or min(256, settings.max_tokens)
        if max_tokens > settings.max_tokens:
            raise ApiError(400, f"max_tokens {max_tokens} is above this server's limit {settings.max_tokens}",
                           param="max_tokens")
        ids = state["tokenizer"](text, add_special_tokens=False)["input_ids"]
        if len(ids) + max_tokens > eng.context_length:
            raise ApiError(400, f"the prompt ({len(ids)} tokens) plus max_tokens ({max_tokens}) exceeds the context "
                           f"length {eng.context_length}; shorten the prompt or lower max_tokens", param="messages"
                           if route == "chat" else "prompt", code="context_length_exceeded")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ApiError(400, "stop takes up to 4 non-empty strings", param="stop")

        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        gen = GenRequest(prompt_ids=ids, max_tokens=max_tokens, adapter=adapter, temperature=body.temperature,
                         top_p=body.top_p, seed=body.seed, stop=stops,
                         on_text=lambda t: loop.call_soon_threadsafe(events.put_nowait, ("text", t)),
                         on_done=lambda reason, n, err: loop.call_soon_threadsafe(
                             events.put_nowait, ("done", (reason, n, err))),
                         deadline=time.monotonic() + settings.request_timeout_s)
        started = time.perf_counter()
        try:
            eng.submit(gen)
        except queue.Full:
            metrics.requests.labels(route, body.model, "429").inc()
            raise ApiError(429, "the server is at capacity; retry after a moment", "rate_limit_error",
                           headers={"Retry-After": "1"}) from None
        rid = f"{'chatcmpl' if route == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        created = int(time.time())

        def usage(n: int) -> dict:
            return {"prompt_tokens": len(ids), "completion_tokens": n, "total_tokens": len(ids) + n}

        def chunk(delta: str | None, finish: str | None, first: bool = False) -> dict:
            if route == "chat":
                d = {"role": "assistant", "content": delta or ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "finish_reason": finish}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": body.model,
                        "choices": [choice]}
            return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "text": delta or "", "finish_reason": finish, "logprobs": None}]}

        def record(status: str, n: int) -> None:
            metrics.requests.labels(route, body.model, status).inc()
            metrics.latency.labels(route).observe(time.perf_counter() - started)
            metrics.tokens.labels(body.model).inc(n)

        if body.stream:
            async def stream():
                first = True
                try:
                    while True:
                        kind, value = await events.get()
                        if kind == "text":
                            if first:
                                metrics.ttft.labels(route).observe(time.perf_counter() - started)
                            yield f"data: {json.dumps(chunk(value, None, first))}\n\n"
                            first = False
                            continue
                        reason, n, err = value
                        if reason in ("error", "timeout"):
                            record("504" if reason == "timeout" else "500", n)
                            message = "request timed out" if reason == "timeout" else f"generation failed: {err}"
                            yield f"data: {json.dumps({'error': {'message': message, 'type': 'server_error'}})}\n\n"
                        else:
                            record("200", n)
                            final = chunk(None, reason, first)
                            final["usage"] = usage(n)
                            yield f"data: {json.dumps(final)}\n\n"
                        yield "data: [DONE]\n\n"
                        return
                finally:
                    gen.cancelled = True  # a client that went away frees its batch slot

            return StreamingResponse(stream(), media_type="text/event-stream")

        pieces = []
        try:
            while True:
                kind, value = await events.get()
                if kind == "text":
                    if not pieces:
                        metrics.ttft.labels(route).observe(time.perf_counter() - started)
                    pieces.append(value)
                    continue
                reason, n, err = value
                break
        finally:
            gen.cancelled = True
        if reason == "timeout":
            record("504", n)
            raise ApiError(504, f"request timed out after {settings.request_timeout_s:.0f} s", "server_error")
        if reason == "error":
            record("500", n)
            raise ApiError(500, f"generation failed: {err}", "server_error")
        record("200", n)
        text_out = "".join(pieces)
        if route == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text_out}, "finish_reason": reason}
            return {"id": rid, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [choice], "usage": usage(n)}
        return {"id": rid, "object": "text_completion", "created": created, "model": body.model,
                "choices": [{"index": 0, "text": text_out, "finish_reason": reason, "logprobs": None}],
                "usage": usage(n)}

    return app


def _error(status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
           code: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status, headers=headers)


def _base_name(base: str) -> str:
    return Path(base).name if Path(base).exists() else base


def _start(settings: ServeSettings, state: dict, model, tokenizer, metrics: Metrics) -> None:
    """Load the base (unless given) and the engine; preload adapters found under the root."""
    if settings.backend == "onnx":
        _start_onnx(settings, state, metrics)
        return
    from pipeline.models import load_tokenizer, resolve_base, set_threads
    from serve.engine import Engine, load_base

    set_threads(settings.num_threads)
    if model is None:
        path = resolve_base(settings.base)
        model, tokenizer = load_base(path, settings.quantize), load_tokenizer(path)
    state["tokenizer"] = tokenizer
    eng = Engine(model, tokenizer, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                 max_loaded_adapters=settings.max_loaded_adapters)
    eng.on_step = metrics.batch.observe
    state["engine"] = eng

    def resolve(name: str, source: str):
        folder = resolve_source(Path(settings.adapters), source)
        return inspect_adapter(name, folder, eng.model.get_base_model(), settings.max_rank)

    eng.resolver = resolve
    root = Path(settings.adapters)
    if settings.preload and root.is_dir():
        for folder in sorted(p for p in root.iterdir() if p.is_dir())[: settings.max_loaded_adapters]:
            try:
                _load(settings, state, eng, check_name(folder.name), folder.name, folder.name in settings.pinned,
                      metrics)
                log.info("serve: adapter %s ready", folder.name)
            except AdapterError as exc:
                log.warning("serve: adapter %s not loaded: %s", folder.name, exc)
    log.info("serve: base %s ready with %d adapters", state["base_name"], len(eng.adapters))


def _start_onnx(settings: ServeSettings, state: dict, metrics: Metrics) -> None:
    """The ONNX backend: the edge bundle on ONNX Runtime (nothing here imports torch)."""
    from serve.onnx_engine import start_onnx_engine

    eng, base_name = start_onnx_engine(Path(settings.bundle), settings)
    eng.on_step = metrics.batch.observe
    state.update(engine=eng, tokenizer=eng.tokenizer, base_name=base_name)
    if settings.preload:
        for name in eng.runner.adapter_names[: settings.max_loaded_adapters]:
            try:
                _load(settings, state, eng, check_name(name), name, name in settings.pinned, metrics)
            except AdapterError as exc:
                log.warning("serve: adapter %s not loaded: %s", name, exc)
    log.info("serve: ONNX bundle %s (base %s) ready with %d adapters", settings.bundle, base_name, len(eng.adapters))


def _load(settings: ServeSettings, state: dict, eng, name: str, source: str, pinned: bool, metrics: Metrics):
    """Validate and load adapter ``name`` from ``source`` under the root (blocking; not on the event loop)."""
    loading = state.setdefault("loading", set())
    loading.add(name)
    started = time.perf_counter()
    try:
        info = eng.resolver(name, source)
        eng.run_command(lambda: eng.load(info, source, pinned))
    except AdapterError as exc:
        eng.failed[name] = str(exc)
        raise
    finally:
        loading.discard(name)
    metrics.load_time.observe(time.perf_counter() - started)
    metrics.loaded.set(len(eng.adapters))
    return info


def wait_ready(url: str, proc=None, timeout: float = 120.0) -> None:
    """Block until ``GET url/ready`` answers 200 (a server started elsewhere, e.g. in a child process).

    Raises ``RuntimeError`` when ``proc`` (a ``subprocess.Popen``, optional) exits first or ``timeout``
    seconds pass. Uses only the standard library, so scripts need no HTTP client to call it.
    """
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            with urllib.request.urlopen(f"{url}/ready", timeout=1) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server at {url} was not ready after {timeout:.0f} s")


def serve(settings: ServeSettings) -> int:
    """Run the server until interrupted; SIGTERM/Ctrl-C drain running requests first."""
    import uvicorn

    app = create_app(settings)
    if settings.backend == "onnx":
        log.info("serve: http://%s:%d (ONNX backend, bundle %s)", settings.host, settings.port, settings.bundle)
    else:
        log.info("serve: http://%s:%d (adapters from %s, base %s, %s)", settings.host, settings.port,
                 settings.adapters, settings.base, settings.quantize)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level="info",
                timeout_graceful_shutdown=int(settings.request_timeout_s))
    return 0
