"""vLLM's adapter routes, so orchestrators and RL trainers that drive vLLM can drive edgetune unchanged.

  POST /v1/load_lora_adapter   {"lora_name", "lora_path", "load_inplace"?}
  POST /v1/unload_lora_adapter {"lora_name"}

Same answers as vLLM's: 200 with a plain-text ``Success: ...`` line; 400 when a field is missing or the
name is already loaded (unless ``load_inplace``, which hot-swaps it); 404 when the path or the name is
unknown. Same safety as ``POST /v1/adapters``: ``lora_path`` is a folder under the adapter root (torch
backend: a relative name, or an absolute path that lies inside the root) or one of the edge bundle's
adapters (ONNX backend: its name, or the path of its file in the bundle); the adapter is validated the
same way, and an unfit one is a 4xx that leaves the name failed.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import PlainTextResponse
from pydantic import BaseModel, ConfigDict

from serve.adapters import AdapterError, check_name
from serve.errors import ApiError
from serve.registry import AdapterState
from serve.routes.deps import RunningEngine, State
from serve.schemas import Text

router = APIRouter(prefix="/v1", tags=["adapters (vLLM)"])


class LoadLoraAdapter(BaseModel):
    """vLLM's ``LoadLoRAAdapterRequest``; ``lora_int_id`` and other vLLM fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore")
    lora_name: Text | None = None
    lora_path: Text | None = None
    load_inplace: bool = False


class UnloadLoraAdapter(BaseModel):
    model_config = ConfigDict(extra="ignore")
    lora_name: Text | None = None


def _source(state, engine, lora_path: str) -> str:
    """The ``source`` (as ``POST /v1/adapters`` takes it) that ``lora_path`` names."""
    path = Path(lora_path)
    if state.settings.backend == "onnx":
        bundle = engine.runner.bundle
        if lora_path in bundle.adapters:
            return lora_path
        for name, entry in bundle.adapters.items():
            if path.is_absolute() and path.resolve() == (bundle.root / entry.file).resolve():
                return name
        raise ApiError(404, f"No adapter found at {lora_path!r}: the ONNX backend serves the edge bundle's adapters "
                            f"({', '.join(sorted(bundle.adapters)) or 'none'}), by name or by the path of their file",
                       param="lora_path")
    if not path.is_absolute():
        return lora_path
    root = Path(state.settings.adapters).resolve()
    try:
        return str(path.resolve().relative_to(root))
    except ValueError:
        raise ApiError(400, f"lora_path {lora_path!r} is outside the adapter root {state.settings.adapters}; the "
                            "server loads adapters only from there (start it with --adapters pointing at their "
                            "parent folder)", param="lora_path") from None


_SUCCESS = {200: {"description": "``Success: ...`` (plain text, as vLLM answers)",
                  "content": {"text/plain": {"schema": {"type": "string"}}}}}


@router.post("/load_lora_adapter", responses=_SUCCESS)
async def load_lora_adapter(body: LoadLoraAdapter, state: State, engine: RunningEngine) -> PlainTextResponse:
    """Load (or, with ``load_inplace``, hot-swap) adapter ``lora_name`` from ``lora_path``."""
    if not body.lora_name or not body.lora_path:
        raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                       param="lora_name" if not body.lora_name else "lora_path")
    try:
        name = check_name(body.lora_name)
    except AdapterError as exc:
        raise ApiError(exc.status, str(exc), param="lora_name") from None
    entry = engine.registry.get(name)
    if entry is not None and entry.state in (AdapterState.READY, AdapterState.LOADING, AdapterState.EVICTED) and not body.load_inplace:
        raise ApiError(400, f"The lora adapter '{name}' has already been loaded.", param="lora_name")
    source = _source(state, engine, body.lora_path)
    try:
        await asyncio.to_thread(state.load_adapter, engine, name, source, name in state.settings.pinned)
    except AdapterError as exc:
        raise ApiError(exc.status, str(exc), param="lora_path") from None
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


@router.post("/unload_lora_adapter", responses=_SUCCESS)
async def unload_lora_adapter(body: UnloadLoraAdapter, state: State, engine: RunningEngine) -> PlainTextResponse:
    """Unload ``lora_name``; running requests finish on it. 404 when it is not loaded."""
    if not body.lora_name:
        raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.", param="lora_name")
    try:
        name = check_name(body.lora_name)
    except AdapterError as exc:
        raise ApiError(exc.status, str(exc), param="lora_name") from None
    deleted = await asyncio.to_thread(engine.run_command, lambda: engine.unload(name))
    state.metrics.loaded.set(len(engine.registry.loaded()))
    if not deleted:
        raise ApiError(404, f"The lora adapter '{name}' cannot be found.", param="lora_name")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
