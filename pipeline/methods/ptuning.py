"""P-tuning (Liu et al., 2021): virtual input tokens produced by a small trainable prompt encoder
(an MLP over learned embeddings); the whole model stays frozen.

Only the encoder's output matters at inference, but PEFT saves the encoder so training can resume.
Not mergeable: merge keeps it as an adapter, quantize/export carry the base plus the adapter.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_ptuning(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Freeze ``model`` and prepend virtual tokens from an MLP prompt encoder (PEFT P-tuning)."""
    from peft import PromptEncoderConfig, get_peft_model

    p = cfg.prompt
    return get_peft_model(model, PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                                     encoder_hidden_size=p.encoder_hidden_size,
                                                     encoder_reparameterization_type="MLP"))


register(Method(
    name="ptuning",
    description="P-tuning: virtual input tokens from a trained MLP prompt encoder; small, not mergeable.",
    mergeable=False,
    apply=apply_ptuning,
    learning_rate=3e-3,
    prompt_learning=True,
))
