"""A tune result as a PyTorch model: loaded unmerged (for evaluation, fidelity references) or merged.

What the folder holds comes from its :class:`~pipeline.adapter_spec.AdapterSpec`: a PEFT adapter
or a PIR sparse delta on the base, or a whole model (full fine-tuning, ULMFiT).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.adapter_spec import read_spec
from pipeline.models import load_model


def load_tuned(tuned: Path, base: Path, device: str = "cpu"):
    """The trained model in ``tuned``, unmerged, in eval mode on ``device``: a PEFT adapter or a PIR
    sparse delta on ``base``, or a whole model (full fine-tuning, ULMFiT)."""
    spec = read_spec(tuned)
    if spec.peft:
        from peft import PeftModel

        return PeftModel.from_pretrained(load_model(base, device), tuned).eval()
    if spec.kind == "pir":
        from pipeline.methods.pir import load_sparse_delta

        return load_sparse_delta(load_model(base, device), tuned).eval()
    return load_model(tuned, device)


def merge_tuned(model):
    """Fold a loaded tune result into plain weights (PEFT ``safe_merge`` or PIR's exact index-add);
    a whole model passes through. Raises ValueError when PEFT finds the merged weights non-finite."""
    from peft import PeftModel

    from pipeline.methods.pir import delta_layers, merge_sparse_delta

    if isinstance(model, PeftModel):
        return model.merge_and_unload(safe_merge=True)
    if delta_layers(model):
        return merge_sparse_delta(model)
    return model
