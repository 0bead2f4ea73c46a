"""DoRA (Liu et al., 2024): LoRA on the direction of each weight plus a learned magnitude, via PEFT.

Uses the ``lora`` settings (rank, alpha, dropout, target modules). Mergeable like LoRA.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_dora(model: PreTrainedModel, cfg: Config) -> PreTrainedModel:
    """Freeze ``model`` and add DoRA adapters (LoRA with weight decomposition) per ``cfg.lora``."""
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, use_dora=True,
                                            task_type="CAUSAL_LM", bias="none"))


register(Method(
    name="dora",
    description="Weight-decomposed LoRA (PEFT use_dora): magnitude + low-rank direction; mergeable.",
    mergeable=True,
    apply=apply_dora,
))
