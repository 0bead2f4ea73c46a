"""The OpenAI-compatible HTTP server: the app (state, routers, error handlers, start-up) and ``serve``.

Routes (:mod:`serve.routes`)
  GET  /health, /ready, /metrics (Prometheus)          open
  GET  /v1/models                                       base + adapters (state: loading, ready, evicted, failed)
  POST /v1/completions, /v1/chat/completions            ``model`` names the adapter (the base's name: none)
  POST /v1/adapters {"name", "source", "pinned"}        load or hot-swap an adapter from the adapter root
  DELETE /v1/adapters/{name}                            unload (idempotent)
  POST /v1/load_lora_adapter, /v1/unload_lora_adapter   vLLM's adapter routes and answers (:mod:`serve.routes.vllm`)
Errors use OpenAI's body: ``{"error": {"message", "type", "param", "code"}}``; an invalid body is a 400.
With an API key (:mod:`serve.auth`), every path but health, ready and metrics needs it, checked before
a body is read; /openapi.json too, and /docs and /redoc are off (a browser page cannot send the key).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from serve.auth import ApiKeyMiddleware
from serve.errors import ERROR_RESPONSES, install_error_handlers
from serve.routes import adapters, openai, ops, vllm
from serve.settings import ServeSettings
from serve.startup import start
from serve.state import AppState

log = logging.getLogger(__name__)


def create_app(settings: ServeSettings, *, model=None, tokenizer=None) -> FastAPI:
    """The app; ``model``/``tokenizer`` skip loading the base (tests), else it loads at start-up.

    Its :class:`AppState` is ``app.state.edgetune``; on shutdown the engine drains running requests."""
    state = AppState.new(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await asyncio.to_thread(start, state, model, tokenizer)
        yield
        if state.engine is not None:
            await asyncio.to_thread(state.engine.shutdown, settings.request_timeout_s)

    keyed = settings.api_key is not None
    app = FastAPI(title="edgetune server", lifespan=lifespan, docs_url=None if keyed else "/docs",
                  redoc_url=None if keyed else "/redoc")
    app.state.edgetune = state
    install_error_handlers(app)
    app.include_router(ops.router)
    for module in (openai, adapters, vllm):
        app.include_router(module.router, responses=ERROR_RESPONSES)
    if keyed:
        app.add_middleware(ApiKeyMiddleware, key=settings.api_key)
    return app


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
