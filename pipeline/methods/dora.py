"""DoRA (Liu et al., 2024): LoRA on the direction of each weight plus a learned magnitude, via PEFT.

Uses the ``lora`` settings (rank, alpha, dropout, target modules). Mergeable like LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.lora import apply_lora
from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_dora(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Freeze ``model`` and add DoRA adapters (LoRA with weight decomposition) per ``cfg.lora``."""
    return apply_lora(model, cfg, use_dora=True)


register(Method(
    name="dora",
    description="Weight-decomposed LoRA (PEFT use_dora): magnitude + low-rank direction; mergeable.",
    mergeable=True,
    apply=apply_dora,
))
