"""The opening every row of a data set shares (a chat template's system turn, a task's instruction), run once.

Training, validation loss, evaluation and the export gates all run rows that start with the same tokens
(:func:`pipeline.data.shared_prefix`); a PyTorch model runs that opening once per batch and every row continues
from its key/value cache. This module holds that step and the one question it depends on (does the model put
virtual tokens in front of its input?), for ``pipeline`` and ``exporters`` alike.
"""

from __future__ import annotations

__all__ = ["prompt_learning", "with_opening"]


def prompt_learning(model) -> bool:
    """Whether ``model`` is a PEFT prompt-learning model (prompt tuning, P-tuning, prefix tuning): its forward
    puts virtual tokens or a key/value prefix in front of the input, so it cannot continue from another cache,
    and it takes no ``logits_to_keep``/``position_ids`` of its own."""
    configs = getattr(model, "peft_config", None) or {}
    return any(getattr(c, "is_prompt_learning", False) for c in configs.values())


def with_opening(model, batch: dict) -> dict:
    """Model inputs for a batch of rows that share an opening (``opening_ids``, 1 x P, from
    :func:`pipeline.data.collate_for_training` with ``opening``): the opening runs here once (with
    gradients when they are enabled, as in training) and its key/value cache, repeated for every row, is what the
    rows attend to; their mask and positions continue after it. The result is the same as running every row
    whole, up to float rounding. A model that returns no cache it can repeat gets the whole rows back (the
    opening in front of each), so the result never depends on it."""
    import torch

    inputs = dict(batch)
    opening = inputs.pop("opening_ids")
    rows, width = inputs["input_ids"].shape[0], opening.shape[1]
    past = model(input_ids=opening, use_cache=True, logits_to_keep=1).past_key_values
    mask = inputs["attention_mask"]
    mask = torch.cat([torch.ones((rows, width), dtype=mask.dtype, device=mask.device), mask], 1)
    positions = inputs["position_ids"] + width
    if past is None or not hasattr(past, "batch_repeat_interleave"):
        ahead = torch.arange(width, dtype=positions.dtype, device=positions.device).expand(rows, -1)
        return {**inputs, "input_ids": torch.cat([opening.expand(rows, -1), inputs["input_ids"]], 1),
                "attention_mask": mask, "position_ids": torch.cat([ahead, positions], 1)}
    past.batch_repeat_interleave(rows)
    return {**inputs, "past_key_values": past, "use_cache": True, "attention_mask": mask, "position_ids": positions}
