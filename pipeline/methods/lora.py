"""LoRA (Hu et al., 2021): low-rank updates ``B @ A`` added to frozen linear layers, via PEFT."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_lora(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None, **overrides) -> PreTrainedModel:
    """Freeze ``model`` and add LoRA adapters per ``cfg.lora`` (PEFT format, mergeable).

    ``overrides`` replace PEFT ``LoraConfig`` fields: the LoRA-family methods (DoRA, QLoRA) are
    this with one or two settings changed.
    """
    from peft import LoraConfig, get_peft_model

    lora = cfg.lora
    settings = dict(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
                    task_type="CAUSAL_LM", bias="none")
    return get_peft_model(model, LoraConfig(**{**settings, **overrides}))


register(
    Method(
        name="lora",
        description="Low-rank adapters on linear layers (PEFT LoRA); small, mergeable, servable.",
        mergeable=True,
        apply=apply_lora,
    )
)
