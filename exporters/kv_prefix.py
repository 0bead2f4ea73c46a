"""A prompt-learning adapter (prefix tuning, prompt tuning, P-tuning) as a key/value prefix.

The ONNX decoder takes token ids, not embeddings, and no per-layer prefix parameters: what it does
take is an initial cache. So each adapter becomes the per-layer keys and values a PEFT model would
attend to before the prompt:

- prefix tuning (P-tuning v2) stores exactly that: its table is ``[virtual, layers * 2 * kv_heads *
  head_dim]``, a key then a value per layer;
- prompt tuning and P-tuning store virtual-token embeddings; their keys and values are what the
  base computes over those embeddings at positions ``0 .. virtual-1``, computed here once.

PEFT saves the table after its prompt encoder (P-tuning's MLP, prefix projection), so the saved
``prompt_embeddings`` are what the model uses at inference.
"""

from __future__ import annotations

from pathlib import Path

from edge.session import Prefix
from pipeline.adapter_spec import ADAPTER_WEIGHTS, kv_layout, read_spec


def adapter_prefix(adapter_dir: Path, base_dir: Path) -> Prefix:
    """The key/value prefix equivalent to the prompt-learning adapter in ``adapter_dir`` on ``base_dir``."""
    import torch
    from safetensors.torch import load_file

    from pipeline.models import load_model

    spec = read_spec(adapter_dir)
    if not spec.prompt_learning:
        raise ValueError(f"{adapter_dir} is a {spec.kind} adapter; a key/value prefix needs prefix tuning, prompt "
                         "tuning or P-tuning")
    table = load_file(str(adapter_dir / ADAPTER_WEIGHTS))["prompt_embeddings"].float()
    virtual = table.shape[0]
    model = load_model(base_dir, "cpu")
    if spec.kind == "prefix":
        layers, kv_heads, head_dim = kv_layout(model.config)
        kv = table.view(virtual, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3).numpy()
        return Prefix([kv[2 * i] for i in range(layers)], [kv[2 * i + 1] for i in range(layers)])
    with torch.no_grad():
        out = model(inputs_embeds=table[None].to(model.dtype), position_ids=torch.arange(virtual)[None],
                    attention_mask=torch.ones(1, virtual, dtype=torch.long), use_cache=True)
    cache = out.past_key_values
    return Prefix([layer.keys[0].float().numpy() for layer in cache.layers],
                  [layer.values[0].float().numpy() for layer in cache.layers])


def save_prefix(prefix: Prefix, path: Path) -> None:
    """Write ``prefix`` as ``.npz`` (plain arrays: numpy reads it without pickles)."""
    prefix.save(path)
    if not path.is_file():  # np.savez appends .npz to other names
        raise RuntimeError(f"prefix file {path} was not written (name it *.npz)")


__all__ = ["adapter_prefix", "save_prefix"]
