"""Export a merged causal LM to ONNX (fp32, with KV cache) and run it with ONNX Runtime on CPU.

The export goes through optimum-onnx (``main_export`` with task ``text-generation-with-past``),
so the result is a single decoder graph that takes ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.*`` and returns ``logits`` plus ``present.*``. That is the
layout ``optimum.onnxruntime.ORTModelForCausalLM`` expects, which gives us ``.generate()`` with
incremental decoding for free.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:  # optimum / onnxruntime are heavy imports; only pay for them when used.
    from optimum.onnxruntime import ORTModelForCausalLM

__all__ = ["TOKENIZER_FILES", "export_onnx_fp32", "load_onnx_model", "logit_parity", "position_ids_from_mask"]

#: Files copied verbatim from the source model directory into the ONNX directory, so the ONNX
#: folder is self-contained (tokenizer + chat template + generation defaults). optimum re-saves a
#: tokenizer itself, but a re-save can normalise/alter files; the originals are the source of truth.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    # Only present for some tokenizers; copied when they exist so nothing is lost.
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)

_WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")


def _check_model_dir(model_dir: Path) -> None:
    """Fail early, naming the path and the fix, instead of deep inside optimum/transformers."""
    if not model_dir.exists():
        raise FileNotFoundError(
            f"ONNX export: model directory {model_dir} does not exist. "
            "Pass the merged Hugging Face model directory (run the merge stage first)."
        )
    if not model_dir.is_dir():
        raise NotADirectoryError(
            f"ONNX export: {model_dir} is not a directory. Pass the merged model *directory* "
            "(containing config.json and model.safetensors), not a file."
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"ONNX export: {model_dir / 'config.json'} not found; {model_dir} is not a saved Hugging Face "
            "model. Save the merged model with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
        )
    if not any(any(model_dir.glob(p)) for p in _WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"ONNX export: no weights (model.safetensors) in {model_dir}. A LoRA adapter directory cannot be "
            "exported directly: merge the adapter into the base model and save_pretrained() the result."
        )


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the tracer/exporter chatter that is expected and harmless for this export.

    - ``TracerWarning``s: transformers' cache/mask code branches on tensor shapes; the traced
      graph keeps dynamic axes for batch/sequence/past, and parity tests cover correctness.
    - optimum's "Found different candidate ONNX initializers ... tied weights" warning: it is
      emitted on the way to *successfully* de-duplicating the tied embedding / lm_head.
    """
    import transformers

    optimum_logger = logging.getLogger("optimum")
    old_optimum_level = optimum_logger.level
    old_tf_verbosity = transformers.logging.get_verbosity()
    optimum_logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", message=r".*torch_dtype.*deprecated.*")
            yield
    finally:
        optimum_logger.setLevel(old_optimum_level)
        transformers.logging.set_verbosity(old_tf_verbosity)


def export_onnx_fp32(model_dir: Path, out_dir: Path) -> Path:
    """Export a merged HF causal-LM directory to an fp32 ONNX decoder with KV cache.

    Contract:
      - ``model_dir`` must be a saved Hugging Face causal LM (``config.json`` + safetensors
        weights, tokenizer files). Raises ``FileNotFoundError`` / ``NotADirectoryError`` naming
        the path otherwise. Nothing is downloaded (``local_files_only``).
      - ``out_dir`` is created if missing and written in place (atomicity - temp dir and
        rename - is the caller's job). Existing files with the same names are overwritten.
      - On return ``out_dir`` holds ``model.onnx`` (task ``text-generation-with-past``, CPU,
        fp32; external-data files only when the model exceeds protobuf's 2 GB limit),
        ``config.json``, and the tokenizer/chat-template/generation-config files of
        ``model_dir``, and is loadable by ``ORTModelForCausalLM.from_pretrained(out_dir)``.
      - No numerical validation is done here (``do_validation=False`` saves a second full
        model load); use :func:`logit_parity` for that.

    Returns ``out_dir``.
    """
    from optimum.exporters.onnx import main_export

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    _check_model_dir(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    with _quiet_export():
        main_export(
            str(model_dir),
            output=out_dir,
            task="text-generation-with-past",
            device="cpu",
            # fp32 explicitly: a bf16/fp16 checkpoint must not silently become a half-precision graph.
            dtype="fp32",
            # Skip re-running the model under ORT against PyTorch (another full load + forward).
            do_validation=False,
            # Known library and local dir: stops optimum from guessing via the Hub.
            library_name="transformers",
            local_files_only=True,
        )

    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)

    if not (out_dir / "model.onnx").is_file():  # defensive: optimum changed its file naming
        raise RuntimeError(f"ONNX export finished but {out_dir / 'model.onnx'} was not written.")
    return out_dir


def load_onnx_model(onnx_dir: Path, num_threads: int | None = None) -> ORTModelForCausalLM:
    """Load an exported directory as an ``ORTModelForCausalLM`` on ``CPUExecutionProvider``.

    ``num_threads`` sets ORT's ``intra_op_num_threads`` (``None`` lets ORT pick: one per
    physical core). The model keeps the KV cache (``use_cache=True``) and supports
    ``.generate(input_ids=..., attention_mask=..., max_new_tokens=..., do_sample=False)``,
    including left-padded batches: generate derives ``position_ids`` from ``attention_mask``.

    Raises ``FileNotFoundError`` naming the path if ``onnx_dir/model.onnx`` is missing.
    """
    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM

    onnx_dir = Path(onnx_dir)
    if not (onnx_dir / "model.onnx").is_file():
        raise FileNotFoundError(
            f"No model.onnx in {onnx_dir}. Export the merged model first with export_onnx_fp32(model_dir, {onnx_dir})."
        )
    session_options = ort.SessionOptions()
    if num_threads is not None:
        if num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 (or None for ORT's default), got {num_threads}")
        session_options.intra_op_num_threads = num_threads
        # A single decoder graph has little inter-op parallelism; keep it from oversubscribing.
        session_options.inter_op_num_threads = 1
    return ORTModelForCausalLM.from_pretrained(
        onnx_dir,
        provider="CPUExecutionProvider",
        session_options=session_options,
        use_cache=True,
        # IO binding only pays off on GPU; on CPU plain session.run is what optimum uses anyway.
        use_io_binding=False,
        local_files_only=True,
    )


def position_ids_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted over real tokens only, as HF ``generate`` does for left padding.

    Padded slots get position 1 (any valid index works; they are masked out). Without this,
    a plain forward uses ``arange(seq_len)`` and a left-padded row would see shifted RoPE
    positions compared with the same prompt unpadded.
    """
    position_ids = attention_mask.long().cumsum(-1) - 1
    return position_ids.masked_fill(attention_mask == 0, 1)


@torch.no_grad()
def logit_parity(
    torch_model: torch.nn.Module,
    onnx_model: ORTModelForCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
) -> dict[str, float]:
    """Compare full-sequence logits of a PyTorch model and its ONNX export on one batch (no past).

    Both models get identical ``input_ids``, ``attention_mask`` and mask-derived ``position_ids``
    (see :func:`position_ids_from_mask`), with ``use_cache=False``.

    Returns:
      - ``max_abs_logit_diff``: max |torch - onnx| over the logits of non-padded positions.
        Padded query positions are excluded: their rows are fully masked and each runtime is
        free to produce different (meaningless) values there.
      - ``top1_agreement``: fraction of non-padded positions whose argmax token matches (1.0 = all).
    """
    attention_mask = attention_mask.to(torch.long)
    input_ids = input_ids.to(torch.long)
    position_ids = position_ids_from_mask(attention_mask)

    was_training = torch_model.training
    torch_model.eval()
    try:
        ref = torch_model(
            input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
        ).logits.float()
    finally:
        torch_model.train(was_training)
    got = onnx_model(
        input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, use_cache=False
    ).logits
    got = torch.as_tensor(got).float()
    if ref.shape != got.shape:
        raise RuntimeError(f"logit shape mismatch: torch {tuple(ref.shape)} vs onnx {tuple(got.shape)}")

    real = attention_mask.bool()
    if not real.any():
        raise ValueError("attention_mask has no real (non-padded) positions to compare")
    ref_real, got_real = ref[real], got[real]  # (n_real_positions, vocab)
    return {
        "max_abs_logit_diff": float((ref_real - got_real).abs().max()),
        "top1_agreement": float((ref_real.argmax(-1) == got_real.argmax(-1)).float().mean()),
    }
