"""Where compute runs: the device, the numeric precision, CPU threads, and inputs that follow the model.

Placement is decided here and nowhere else. Every stage resolves the config's ``device`` with
:func:`resolve_device`, loads its models there (``pipeline.models.load_model``,
``exporters.bnb.load_quantized``), and moves each batch to the model it feeds with :func:`to_model`.
A model's inputs never decide its device. ONNX models run on the config's ``providers``
(:func:`onnx_providers`). Export traces its ONNX graphs on the CPU, so the file runs anywhere.

Threads: a process uses every core, or, when several ranks of one job share a machine
(``torchrun``/``accelerate launch`` set ``LOCAL_WORLD_SIZE``), its share of them: two ranks each
running all cores would run at a fraction of their speed.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pipeline.errors import ModelError

if TYPE_CHECKING:
    import torch

Precision = Literal["fp32", "bf16", "fp16"]
PRECISION_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
"""Precision name -> torch dtype name."""


def resolve_device(setting: str) -> str:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; a forced ``cuda`` must exist."""
    import torch

    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda" and not torch.cuda.is_available():
        raise ModelError("device: cuda was requested but no CUDA GPU is visible (torch.cuda.is_available() is "
                         "False: a CPU build of torch, or no driver); use device: auto or cpu")
    if setting not in ("cpu", "cuda"):
        raise ModelError(f"unknown device {setting!r}; use auto, cpu or cuda")
    return setting


def resolve_precision(setting: str, device: str) -> Precision:
    """The training precision for ``setting`` (``auto | fp32 | bf16 | fp16``) on ``device``.

    ``auto``: bf16 mixed precision on a GPU that supports it, else fp32 (fp16 needs loss scaling
    and overflows more easily, so it is never chosen for you). fp16 needs CUDA: CPUs have no fast
    fp16 kernels, and the Trainer refuses fp16 there.
    """
    import torch

    if setting == "auto":
        return "bf16" if device == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if setting == "fp16" and device != "cuda":
        raise ModelError("tune.precision: fp16 mixed precision needs a CUDA GPU; on the CPU use bf16 or fp32 "
                         "(or auto)")
    if setting not in PRECISION_DTYPES:
        raise ModelError(f"unknown precision {setting!r}; use auto, fp32, bf16 or fp16")
    return setting  # type: ignore[return-value]


def resolve_dtype(setting: str, device: str) -> torch.dtype:
    """A weights dtype (``auto | float32 | bfloat16 | float16``) on ``device``: ``auto`` is bfloat16 on a
    GPU that supports it (float16 on one that does not) and float32 on the CPU."""
    import torch

    if setting == "auto":
        if device != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if setting not in ("float32", "bfloat16", "float16"):
        raise ModelError(f"unknown dtype {setting!r}; use auto, float32, bfloat16 or float16")
    return getattr(torch, setting)


def model_device(model: Any) -> torch.device:
    """The device ``model`` computes on: where its first parameter lives (the CPU for a model without
    torch parameters, such as an ONNX model behind a torch face)."""
    import torch

    device = getattr(model, "device", None)
    if isinstance(device, torch.device):
        return device
    params = getattr(model, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")


def to_model(batch: Mapping[str, Any], model: Any) -> dict[str, Any]:
    """``batch`` with every tensor moved to ``model``'s device (other values unchanged): inputs follow
    the model, whatever device the tokenizer or collator made them on."""
    import torch

    device = model_device(model)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def onnx_providers(names: list[str]) -> list[str]:
    """ONNX Runtime execution providers for the config's ``providers`` (``cpu``, ``cuda``), in order, the CPU
    last; a provider this onnxruntime build lacks (``cuda`` without the ``gpu`` extra) is a clear error."""
    from edge.session import resolve_providers

    try:
        return resolve_providers(names)
    except ValueError as exc:
        raise ModelError(f"providers: {exc}") from None


def check_placement(device: str, precision: str, providers: list[str]) -> str:
    """Resolve the config's placement settings once before any stage runs, so an impossible one (``cuda``
    without a GPU, fp16 on the CPU, ONNX ``cuda`` without onnxruntime-gpu) fails before work is done.
    Returns a one-line description for the log."""
    where = resolve_device(device)
    return (f"device {where}, training precision {resolve_precision(precision, where)}, ONNX Runtime providers "
            f"{', '.join(onnx_providers(providers))}")


def local_world_size() -> int:
    """Processes of this job on this machine (1 unless launched by torchrun / accelerate)."""
    try:
        return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        return 1


def thread_count(num_threads: int) -> int:
    """``num_threads``, or for 0 this process's share of the cores (all of them, divided among the
    local ranks of a multi-process launch), at least 1."""
    return num_threads or max(1, (os.cpu_count() or 1) // local_world_size())


def set_threads(num_threads: int) -> int:
    """Use :func:`thread_count` CPU threads in torch; return the number chosen."""
    import torch

    n = thread_count(num_threads)
    torch.set_num_threads(n)
    return n
