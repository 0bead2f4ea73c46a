"""Prompt tuning (Lester et al., 2021): a few learned input embeddings ("soft prompt") prepended to
every input; the whole model stays frozen.

The smallest adapter there is (``num_virtual_tokens x hidden`` numbers). It cannot be merged into
the weights: merge keeps it as an adapter, and quantize/export carry the base plus the soft prompt.
``prompt.init_text`` starts the soft prompt from a text's token embeddings, which helps a small
model learn in few steps.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_prompt(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Freeze ``model`` and prepend ``prompt.num_virtual_tokens`` trainable input embeddings."""
    from peft import PromptTuningConfig, PromptTuningInit, get_peft_model

    p = cfg.prompt
    init = dict(prompt_tuning_init=PromptTuningInit.RANDOM)
    if p.init_text:
        init = dict(prompt_tuning_init=PromptTuningInit.TEXT, prompt_tuning_init_text=p.init_text,
                    tokenizer_name_or_path=model.name_or_path)
    return get_peft_model(model, PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                                    **init))


register(Method(
    name="prompt",
    description="Prompt tuning: a learned soft prompt of virtual input tokens; tiny, not mergeable.",
    mergeable=False,
    apply=apply_prompt,
    learning_rate=3e-2,
    prompt_learning=True,
))
