"""Server settings: one typed object, from command-line flags or ``EDGETUNE_SERVE_*`` environment variables.

Precedence: a flag given on the command line, else the environment variable, else the default.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.errors import ConfigError

ENV_PREFIX = "EDGETUNE_SERVE_"


@dataclass(frozen=True)
class ServeSettings:
    """Everything ``edgetune serve`` needs."""

    base: str = "smollm2-135m-instruct"
    """Base model: the embedded name, a local HF folder, or a hub id."""
    adapters: str = "runs/default/adapters"
    """Adapter root: the only place adapters load from (each adapter is a folder under it)."""
    quantize: Literal["none", "int8", "nf4"] = "none"
    """Precision of the shared frozen base: fp32, or bitsandbytes int8/NF4 (torch backend)."""
    backend: Literal["torch", "onnx"] = "torch"
    """``torch``: PyTorch base + PEFT adapters from ``adapters``; ``onnx``: the edge bundle at ``bundle`` on
    ONNX Runtime (no PyTorch needed), serving the bundle's adapters."""
    bundle: str = "runs/default/export/edge"
    """Edge bundle served by the ONNX backend."""
    host: str = "127.0.0.1"
    port: int = 8000
    api_key: str | None = None
    """When set, every /v1 route needs ``Authorization: Bearer <key>`` (health, ready, metrics stay open)."""
    max_loaded_adapters: int = 8
    """Adapters held in memory at once; the least recently used unpinned one is evicted beyond this."""
    pinned: tuple[str, ...] = ()
    """Adapters never evicted."""
    max_rank: int = 64
    """Largest LoRA rank accepted."""
    max_batch_size: int = 16
    """Requests decoded together."""
    max_queue: int = 64
    """Requests waiting beyond the running batch; more get 429 with Retry-After."""
    max_tokens: int = 512
    """Upper bound of a request's ``max_tokens``."""
    request_timeout_s: float = 120.0
    """A request running longer is ended (504 or a final stream error)."""
    preload: bool = True
    """Load every adapter folder under the root at start-up (up to ``max_loaded_adapters``)."""
    num_threads: int = 0
    """CPU threads for torch (0: all cores)."""

    @classmethod
    def from_sources(cls, flags: dict[str, Any] | None = None, env: dict[str, str] | None = None) -> ServeSettings:
        """Build from ``flags`` (None values mean "not given") over ``env`` (default ``os.environ``)."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        errors = []
        for f in dataclasses.fields(cls):
            raw = (flags or {}).get(f.name)
            if raw is None and ENV_PREFIX + f.name.upper() in env:
                raw = env[ENV_PREFIX + f.name.upper()]
            if raw is None:
                continue
            try:
                values[f.name] = _coerce(f, raw)
            except ValueError as exc:
                errors.append(f"{f.name}: {exc}")
        settings = None
        if not errors:
            settings = cls(**values)
            errors = settings.problems()
        if errors:
            raise ConfigError("serve settings:\n  - " + "\n  - ".join(errors))
        return settings

    def problems(self) -> list[str]:
        out = []
        if self.quantize not in ("none", "int8", "nf4"):
            out.append(f"quantize: {self.quantize!r} is not one of none, int8, nf4")
        if self.backend not in ("torch", "onnx"):
            out.append(f"backend: {self.backend!r} is not one of torch, onnx")
        if self.backend == "onnx" and self.quantize != "none":
            out.append("quantize: applies to the torch backend; the ONNX backend runs the bundle's own precision "
                       "(export.edge_precision)")
        for name, low in (("port", 1), ("max_loaded_adapters", 1), ("max_rank", 1), ("max_batch_size", 1),
                          ("max_queue", 1), ("max_tokens", 1)):
            if getattr(self, name) < low:
                out.append(f"{name}: must be >= {low}")
        if self.request_timeout_s <= 0:
            out.append("request_timeout_s: must be > 0")
        return out


def _coerce(f: dataclasses.Field, raw: Any) -> Any:
    kind = f.type if isinstance(f.type, str) else str(f.type)
    if isinstance(raw, str):
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
        if kind.startswith("bool"):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(f"expected true/false, got {raw!r}")
            return raw.lower() in ("1", "true", "yes")
        if kind.startswith("tuple"):
            return tuple(p.strip() for p in raw.split(",") if p.strip())
    if kind.startswith("tuple"):
        return tuple(raw)
    return raw
