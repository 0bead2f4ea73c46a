"""Prefix tuning (Li & Liang, 2021) / P-tuning v2 (Liu et al., 2022): learned key/value vectors
prepended at every layer ("deep prompts"); the whole model stays frozen.

More capacity than a soft prompt (every layer is steered, not just the input) for a still small
adapter. ``prompt.init_text`` starts the prefix from the base's own keys and values for that text. Not mergeable: merge keeps it as an adapter, quantize/export carry the base plus the
prefix.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.methods.registry import Method, register

if TYPE_CHECKING:
    from transformers import PreTrainedModel

    from pipeline.config import Config


def apply_prefix(model: PreTrainedModel, cfg: Config, data: list[dict] | None = None) -> PreTrainedModel:
    """Freeze ``model`` and learn ``prompt.num_virtual_tokens`` key/value pairs per layer (PEFT prefix tuning)."""
    from peft import PrefixTuningConfig, get_peft_model

    p = cfg.prompt
    peft_model = get_peft_model(model, PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=p.num_virtual_tokens,
                                                         prefix_projection=p.prefix_projection))
    if p.init_text and not p.prefix_projection:
        init_from_text(peft_model, p.init_text)
    return peft_model


def init_from_text(peft_model, text: str) -> None:
    """Start the prefix from the keys and values the frozen base computes for ``text`` (repeated or cut
    to the prefix length), as Li & Liang found real-word activations train faster than random ones.

    PEFT's prefix table row ``t`` holds, per layer ``l``, the key (slot ``2l``) and value (slot ``2l+1``)
    of virtual token ``t``, each ``kv_heads * head_dim`` wide; the text's positions ``0..V-1`` are the
    positions the prefix occupies at run time.
    """
    import torch

    from pipeline.models import load_tokenizer

    table = peft_model.prompt_encoder["default"].embedding.weight
    n_virtual = table.shape[0]
    ids = load_tokenizer(peft_model.get_base_model().name_or_path)(text, add_special_tokens=False)["input_ids"]
    ids = (ids * (n_virtual // max(len(ids), 1) + 1))[:n_virtual]
    with torch.no_grad():
        cache = peft_model.get_base_model()(input_ids=torch.tensor([ids], device=table.device), use_cache=True).past_key_values
        layers = cache.to_legacy_cache() if hasattr(cache, "to_legacy_cache") else cache
        slots = [t for k, v in layers for t in (k, v)]  # (1, kv_heads, V, head_dim) each
        rows = torch.cat([t[0].permute(1, 0, 2).reshape(n_virtual, -1) for t in slots], dim=1)
        if rows.shape != table.shape:
            raise ValueError(f"prefix init: base keys/values {tuple(rows.shape)} do not fit the prefix table "
                             f"{tuple(table.shape)}")
        table.copy_(rows.to(table.dtype))


register(Method(
    name="prefix",
    description="Prefix tuning / P-tuning v2: learned key/value prefixes at every layer; not mergeable.",
    mergeable=False,
    apply=apply_prefix,
    learning_rate=1e-2,
    prompt_learning=True,
))
