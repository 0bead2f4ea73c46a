"""IA3 (Liu et al., 2022): learned vectors that rescale keys, values and feed-forward activations.

Far fewer trainable parameters than LoRA (one vector per adapted layer). Targets come from
PEFT's per-architecture defaults (for Llama: k_proj, v_proj, down_proj). Mergeable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_ia3(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Freeze ``model`` and add IA3 scaling vectors on PEFT's default modules for its architecture."""
    from peft import IA3Config, get_peft_model

    return get_peft_model(model, IA3Config(task_type="CAUSAL_LM"))


register(Method(
    name="ia3",
    description="IA3 (PEFT): learned rescaling vectors on keys, values and MLP; tiny, mergeable.",
    mergeable=True,
    apply=apply_ia3,
))
