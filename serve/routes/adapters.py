"""Adapter routes: ``POST /v1/adapters`` loads or hot-swaps one from the adapter root, ``DELETE`` unloads it."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter

from serve.adapters import AdapterError, check_name
from serve.errors import ApiError
from serve.routes.deps import RunningEngine, State
from serve.schemas import AdapterDeleted, AdapterLoaded, AdapterLoadRequest

router = APIRouter(prefix="/v1", tags=["adapters"])


@router.post("/adapters", response_model=AdapterLoaded)
async def load_adapter(body: AdapterLoadRequest, state: State, engine: RunningEngine) -> AdapterLoaded:
    """Load ``name`` from folder ``source`` (default: ``name``); an unfit adapter is a 4xx and stays failed."""
    try:
        name = check_name(body.name)
        info = await asyncio.to_thread(state.load_adapter, engine, name, body.source or name, body.pinned)
    except AdapterError as exc:
        raise ApiError(exc.status, str(exc), param="source" if "source" in str(exc) else "name") from None
    return AdapterLoaded(id=name, kind=info.kind, pinned=body.pinned)


@router.delete("/adapters/{name}", response_model=AdapterDeleted)
async def unload_adapter(name: str, state: State, engine: RunningEngine) -> AdapterDeleted:
    """Unload ``name`` (idempotent: ``deleted`` is False when it was not loaded); running requests finish."""
    try:
        check_name(name)
    except AdapterError as exc:
        raise ApiError(400, str(exc), param="name") from None
    deleted = await asyncio.to_thread(engine.run_command, lambda: engine.unload(name))
    state.metrics.loaded.set(len(engine.registry.loaded()))
    return AdapterDeleted(id=name, deleted=bool(deleted))
