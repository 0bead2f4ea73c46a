"""What the routes share, kept on ``app.state.edgetune``: settings, metrics, the engine once it runs."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from serve.adapters import AdapterInfo, public_reason
from serve.errors import ApiError
from serve.metrics import Metrics
from serve.protocol import GenerationEngine
from serve.settings import ServeSettings


@dataclass
class AppState:
    """The server's state; ``engine`` is None until start-up has loaded the base (routes answer 503)."""

    settings: ServeSettings
    metrics: Metrics
    base_name: str
    """The base model's public name (``model`` in a request for no adapter)."""
    engine: GenerationEngine | None = None

    @classmethod
    def new(cls, settings: ServeSettings) -> AppState:
        """Before start-up: the base's name from its setting (a local folder's name, else the hub id/name)."""
        base = Path(settings.base)
        return cls(settings, Metrics(), base.name if base.exists() else settings.base)

    def require_engine(self) -> GenerationEngine:
        """The engine; ApiError 503 (Retry-After) while the base is still loading."""
        if self.engine is None:
            raise ApiError(503, "the base model is still loading", "server_error", headers={"Retry-After": "5"})
        return self.engine

    def load_adapter(self, engine: GenerationEngine, name: str, source: str, pinned: bool) -> AdapterInfo:
        """Validate and load adapter ``name`` from ``source`` (blocking: call it off the event loop).

        The registry shows ``name`` loading, then ready, or failed with the reason (re-raised: AdapterError
        for an unfit adapter)."""
        engine.registry.loading(name)
        started = time.perf_counter()
        try:
            info = engine.resolver(name, source)
            engine.run_command(lambda: engine.load(info, source, pinned))
        except Exception as exc:
            engine.registry.fail(name, public_reason(exc))
            raise
        self.metrics.load_time.observe(time.perf_counter() - started)
        self.metrics.loaded.set(len(engine.registry.loaded()))
        return info
