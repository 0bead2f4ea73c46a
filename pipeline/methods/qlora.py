"""QLoRA (Dettmers et al., 2023): LoRA on every linear layer of a frozen 4-bit NF4 base.

The base is loaded with NF4 + double quantization (bitsandbytes, which runs on the CPU too), the
adapters train in full precision, activations are recomputed in the backward pass (gradient
checkpointing, as in the paper: at this size activations, not weights, dominate training memory),
and a paged AdamW absorbs memory spikes where bitsandbytes provides one (CUDA). On the CPU there is no paged optimizer: plain AdamW is used and the tune
stage says so in its log and manifest. The adapter merges into the full-precision base.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.lora import apply_lora
from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_qlora(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Prepare the NF4-loaded ``model`` as the QLoRA recipe does (gradient checkpointing, full-precision
    norms) and add LoRA (``cfg.lora`` rank/alpha/dropout) to every linear layer."""
    from peft import prepare_model_for_kbit_training

    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True,
                                            gradient_checkpointing_kwargs={"use_reentrant": False})
    return apply_lora(model, cfg, target_modules="all-linear")


register(Method(
    name="qlora",
    description="LoRA on all linear layers of an NF4 (double-quantized) frozen base; paged AdamW on CUDA.",
    mergeable=True,
    apply=apply_qlora,
    base_quantization="nf4",
    paged_optimizer=True,
))
