"""The registry itself: what a method is (:class:`Method`), and ``register`` for each method module.

Separate from the package ``__init__`` (which imports every method module) so a method module's
import of the registry is not an import of the package that imports it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


@dataclass(frozen=True)
class Method:
    """A fine-tuning method as the pipeline sees it."""

    name: str
    """Lowercase key used as ``method:`` in the config."""
    description: str
    """One line for ``edgetune methods``."""
    mergeable: bool
    """Whether merge can fold the trained delta into the base weights."""
    apply: Callable[..., PreTrainedModel]
    """``apply(model, cfg, data=None)``: wrap/prepare ``model`` for training and return the model whose
    trainable parameters are the method's. ``data`` (encoded training rows) is there for methods that
    calibrate on the task before training (PIR); without it they must still produce a model of the
    same shape (``edgetune methods`` counts parameters that way)."""
    base_quantization: str | None = None
    """Load the frozen base for training in this bitsandbytes format (``nf4`` for QLoRA), else fp32."""
    paged_optimizer: bool = False
    """Use a paged AdamW where the backend has one (bitsandbytes on CUDA); elsewhere plain AdamW, logged."""
    learning_rate: float = 1e-3
    """Default peak learning rate when the config leaves ``tune.learning_rate`` null."""
    full_model: bool = False
    """The result is a whole model (saved as an HF model folder), not a PEFT adapter."""
    prompt_learning: bool = False
    """Learned virtual tokens are prepended to the input (prompt, P-tuning, prefix): nothing to merge;
    quantize and export carry the base plus the adapter; training keeps full-width logits."""
    save: Callable[[PreTrainedModel, Path], None] | None = None
    """Write the trained result into a folder; None: the model's own ``save_pretrained`` (PEFT or HF)."""
    training_plan: Callable[[PreTrainedModel, Config, float, int], TrainingPlan] | None = None
    """Optional (model, cfg, learning rate, steps) -> optimizer, scheduler and callbacks for the Trainer,
    for methods whose behaviour lives in parameter groups and schedules (ULMFiT)."""


@dataclass(frozen=True)
class TrainingPlan:
    """What a method hands the Trainer beyond the model: its optimizer, schedule and callbacks."""

    optimizer: Any
    scheduler: Any
    callbacks: list[Any]


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    """Add ``method`` to the registry (names are unique)."""
    if method.name in METHODS:
        raise ValueError(f"method {method.name!r} registered twice")
    METHODS[method.name] = method
    return method
