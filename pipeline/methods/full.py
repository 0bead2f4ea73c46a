"""Full fine-tuning: every weight trains. The reference row every parameter-efficient method is judged against.

Its result is a whole model (``adapters/<task>/`` then holds a normal HF model folder), so merge
has nothing to fold in and passes it through; it is also the largest and slowest to train.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_full(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Make every parameter of ``model`` trainable."""
    model.requires_grad_(True)
    return model


register(Method(
    name="full",
    description="Full fine-tuning of every weight: the reference row; largest artifact, highest memory.",
    mergeable=True,
    apply=apply_full,
    learning_rate=5e-5,
    full_model=True,
))
