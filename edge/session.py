"""What both ONNX decoders of the edge runtime share: ONNX Runtime session options, execution providers,
and the key/value :class:`Prefix` of a prompt-learning adapter. Imports only numpy and onnxruntime.

:class:`edge.runtime.Decoder` runs the exported (optimum-layout) graph; :class:`edge.slots.SlotDecoder`
its fused sidecar (see :mod:`exporters.fused_graph`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

__all__ = ["LORA_PREFIX", "PROVIDERS", "Prefix", "resolve_providers", "session_options"]

LORA_PREFIX = "lora."
"""Graph inputs that start with this are LoRA factors a ``.onnx_adapter`` overrides (see exporters.onnx_lora)."""


@dataclass(frozen=True)
class Prefix:
    """A key/value prefix: per layer ``keys[l]``/``values[l]`` of shape [kv_heads, length, head_dim].

    A prefix-tuning adapter stores it directly; a prompt-tuning or P-tuning adapter's prefix is what
    the base computes over its virtual tokens. Real tokens then start at position ``length``.
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    @classmethod
    def load(cls, path: Path) -> Prefix:
        """Read a prefix written by :meth:`save` (``.npz``, no pickles)."""
        with np.load(path, allow_pickle=False) as data:
            layers = len([k for k in data.files if k.startswith("key.")])
            return cls([data[f"key.{i}"] for i in range(layers)], [data[f"value.{i}"] for i in range(layers)])

    def save(self, path: Path) -> None:
        arrays = {f"key.{i}": k for i, k in enumerate(self.keys)}
        arrays.update({f"value.{i}": v for i, v in enumerate(self.values)})
        np.savez(path, **arrays)


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
"""Short execution-provider names (``--providers cpu,cuda``) -> ONNX Runtime's names."""
GPU_EXTRA_HINT = ("install the gpu extra in place of the CPU wheel: pip uninstall -y onnxruntime && "
                  "pip install 'edgetune[gpu]' (onnxruntime-gpu, which needs an NVIDIA driver and CUDA 12 libraries)")


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """ONNX Runtime provider names for ``names`` (``cpu``, ``cuda`` or ORT names such as
    ``CUDAExecutionProvider``), in order of preference, with the CPU always last as the fallback for
    operators a GPU provider does not run. None or empty: the CPU alone.

    Raises ``ValueError`` for an unknown name, or a provider this onnxruntime build lacks (``cuda`` on the
    CPU wheel: the message says how to install onnxruntime-gpu).
    """
    available = ort.get_available_providers()
    out: list[str] = []
    for name in names or ():
        full = PROVIDERS.get(name.strip().lower(), name.strip())
        if not full.endswith("ExecutionProvider"):
            raise ValueError(f"unknown execution provider {name!r}; use {', '.join(PROVIDERS)} or an ONNX Runtime "
                             f"name (this build has: {', '.join(available)})")
        if full not in available:
            hint = GPU_EXTRA_HINT if full == PROVIDERS["cuda"] else f"this build has: {', '.join(available)}"
            raise ValueError(f"execution provider {name!r} ({full}) is not in this onnxruntime "
                             f"{ort.__version__} build; {hint}")
        if full not in out:
            out.append(full)
    out = [p for p in out if p != PROVIDERS["cpu"]]
    return [*out, PROVIDERS["cpu"]]


def session_options(threads: int | None) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads (None: ORT's default, one per core)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A multi-LoRA base has overridable initializers (the LoRA inputs): ORT warns about each one.
    options.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for ONNX Runtime's default), got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one decoder graph: little to run side by side
    return options
