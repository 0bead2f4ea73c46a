"""Prefix tuning (Li & Liang, 2021) / P-tuning v2 (Liu et al., 2022): learned key/value vectors
prepended at every layer ("deep prompts"); the whole model stays frozen.

More capacity than a soft prompt (every layer is steered, not just the input) for a still small
adapter. Not mergeable: merge keeps it as an adapter, quantize/export carry the base plus the
prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_prefix(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Freeze ``model`` and learn ``prompt.num_virtual_tokens`` key/value pairs per layer (PEFT prefix tuning)."""
    from peft import PrefixTuningConfig, get_peft_model

    p = cfg.prompt
    return get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                                    prefix_projection=p.prefix_projection))


register(Method(
    name="prefix",
    description="Prefix tuning / P-tuning v2: learned key/value prefixes at every layer; not mergeable.",
    mergeable=False,
    apply=apply_prefix,
    learning_rate=1e-2,
    prompt_learning=True,
))
