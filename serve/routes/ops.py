"""Operations routes, open without the API key: liveness, readiness, Prometheus metrics."""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from serve.errors import error_response
from serve.routes.deps import State
from serve.schemas import ErrorDetail, Health, Readiness

router = APIRouter(tags=["operations"])


@router.get("/health", response_model=Health)
async def health() -> Health:
    """The process answers (the base may still be loading)."""
    return Health()


@router.get("/ready", response_model=Readiness)
async def ready(state: State) -> Readiness | JSONResponse:
    """200 once the base is loaded and the engine runs; 503 before."""
    if state.engine is None:
        return error_response(503, ErrorDetail(message="the base model is still loading", type="server_error"))
    return Readiness(base=state.base_name)


@router.get("/metrics", response_class=PlainTextResponse)
async def metrics(state: State) -> PlainTextResponse:
    """Prometheus text format; queue depth and loaded adapters are sampled now."""
    if state.engine is not None:
        state.metrics.queue.set(state.engine.queue_depth())
        state.metrics.loaded.set(len(state.engine.registry.loaded()))
        cache = getattr(state.engine, "cache", None)  # the ONNX backend's prefix cache, when it batches
        if cache is not None:
            stats = cache.stats()
            state.metrics.prefix_hit.set(stats["hit_rate"])
            state.metrics.prefix_bytes.set(stats["bytes"])
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")
