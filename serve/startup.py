"""Start-up: build the configured backend's engine, then preload adapters (blocking; run off the event loop)."""

from __future__ import annotations

import logging
from pathlib import Path

from serve.adapters import AdapterError, check_name, inspect_adapter, resolve_source
from serve.protocol import GenerationEngine
from serve.state import AppState

log = logging.getLogger(__name__)


def start(state: AppState, model=None, tokenizer=None) -> None:
    """Set ``state.engine``: the torch engine over ``model``/``tokenizer`` (loaded from ``settings.base``
    when None), or the ONNX engine over the edge bundle; then preload adapters."""
    settings = state.settings
    if settings.backend == "onnx":
        from serve.onnx_engine import start_onnx_engine

        engine, state.base_name = start_onnx_engine(Path(settings.bundle), settings)
        preload = engine.runner.adapter_names  # the bundle's
    else:
        engine = _torch_engine(state, model, tokenizer)
        root = Path(settings.adapters)
        preload = sorted(p.name for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    engine.on_step = state.metrics.batch.observe
    state.engine = engine
    if settings.preload:
        _preload(state, engine, preload[: settings.max_loaded_adapters])
    if settings.backend == "onnx":
        log.info("serve: ONNX bundle %s (base %s) ready with %d adapters", settings.bundle, state.base_name,
                 len(engine.registry.loaded()))
    else:
        log.info("serve: base %s ready with %d adapters", state.base_name, len(engine.registry.loaded()))


def _torch_engine(state: AppState, model, tokenizer) -> GenerationEngine:
    """PyTorch base (full precision in ``settings.dtype`` or bitsandbytes, on ``settings.device``) plus PEFT
    adapters validated from the adapter root."""
    from pipeline.device import set_threads
    from pipeline.models import load_tokenizer, resolve_base
    from serve.engine import Engine, load_base

    settings = state.settings
    set_threads(settings.num_threads)
    if model is None:
        path = resolve_base(settings.base)
        model = load_base(path, settings.quantize, device=settings.device, dtype=settings.dtype)
        tokenizer = load_tokenizer(path)
    engine = Engine(model, tokenizer, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                    max_loaded_adapters=settings.max_loaded_adapters)
    log.info("serve: base on %s in %s%s", engine.device, str(engine.dtype).removeprefix("torch."),
             f" (bitsandbytes {settings.quantize})" if settings.quantize != "none" else "")

    def resolve(name: str, source: str):
        folder = resolve_source(Path(settings.adapters), source)
        return inspect_adapter(name, folder, engine.model.get_base_model(), settings.max_rank)

    engine.resolver = resolve
    return engine


def _preload(state: AppState, engine: GenerationEngine, names: list[str]) -> None:
    """Load each adapter by its folder (bundle) name; one that fails is logged and left failed (with its reason
    in ``GET /v1/models``): one bad folder never stops the server from serving the others."""
    for name in names:
        try:
            state.load_adapter(engine, check_name(name), name, name in state.settings.pinned)
            log.info("serve: adapter %s ready", name)
        except AdapterError as exc:
            log.warning("serve: adapter %s not loaded: %s", name, exc)
        except Exception:  # noqa: BLE001 - a server fault on one adapter; the registry holds it failed
            log.exception("serve: adapter %s not loaded", name)
