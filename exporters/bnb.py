"""bitsandbytes quantization (LLM.int8 and 4-bit NF4) that runs on the CPU.

bitsandbytes >= 0.49 has a real CPU backend, so no GPU is needed at any step:

* ``int8`` (LLM.int8): weights are stored as int8 with one fp32 scale per output row (``SCB``).
  At inference the activations are quantized per row to int8 and multiplied with
  ``torch._int_mm`` (on CPUs with AVX-512; elsewhere bitsandbytes falls back to an fp32 matmul
  of the int8 values, which is correct but slow). Activation columns holding an outlier
  (``|x| >= llm_int8_threshold``) are taken out and multiplied in full precision.
* ``nf4``: weights are 4-bit NormalFloat in blocks of 64 with double quantization (the fp32
  block scales are themselves 8-bit quantized). On a CPU with AVX512-BF16 bitsandbytes repacks
  each layer on its first eval-mode no-grad forward into a CPU-friendly layout and runs a fused
  bf16 kernel; elsewhere (or with grad enabled) it dequantizes to ``bnb_4bit_compute_dtype`` and
  calls ``F.linear``. Both paths give the same accuracy on SmolLM2-135M (mean KL to fp32 0.936 vs
  0.932): NF4's loss there is the 4-bit format itself, not the CPU kernel.

Both formats serialize to ordinary safetensors checkpoints (``quantization_config`` in
``config.json``) and reload with plain ``AutoModelForCausalLM.from_pretrained``.

What is *not* quantized: the token embedding, the norms and ``lm_head``. transformers leaves
``lm_head`` (and whatever it is tied to) in full precision by design, which is also what keeps
``tie_word_embeddings=True`` models (SmolLM2, the tiny test model) working: the tie survives
quantization, saving and reloading. Those modules are kept in fp32 (``DENSE_DTYPE``), see there.
"""

from __future__ import annotations

import gc
import json
import logging
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, PreTrainedModel

__all__ = [
    "DENSE_DTYPE",
    "FORMATS",
    "INT8_THRESHOLD",
    "NF4_COMPUTE_DTYPE",
    "TOKENIZER_FILES",
    "bnb_config",
    "load_quantized",
    "quantize_to_dir",
    "quantized_footprint_bytes",
]

FORMATS: tuple[str, ...] = ("int8", "nf4")

#: Copied verbatim from the source model directory (when present) so the quantized folder is
#: self-contained: fast tokenizer, chat template, generation defaults. Deliberately *not*
#: ``tokenizer.model``: the fast ``tokenizer.json`` is what AutoTokenizer loads, and in a snapshot
#: converted from GGUF (like the SmolLM2 one) ``tokenizer.model`` is the ~100 MB GGUF file itself.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)

#: LLM.int8 outlier threshold. We keep the paper's (and bitsandbytes') 6.0 on the CPU: the outlier
#: columns are then multiplied in fp32, which is what keeps int8 faithful. Measured on
#: SmolLM2-135M-Instruct (2 threads): 6.0 -> top-1 agreement with fp32 91%, mean KL 0.034, greedy
#: answer identical; 0.0 (pure int8, no decomposition) -> 86%, KL 0.081, greedy answer changes,
#: for ~16% more decode speed. Accuracy is the point of int8 here, so 6.0.
INT8_THRESHOLD: float = 6.0

#: dtype of everything bitsandbytes does not quantize (embeddings, norms, lm_head) and of the
#: activations flowing between layers. transformers silently defaults this to float16 for bnb
#: models, a GPU habit: CPUs mostly lack fp16 GEMM, so the (tied) lm_head, the largest matrix of a
#: small model, gets slower (measured: int8 batch-16 decode 93 tok/s with fp16 vs 122 with fp32).
#: fp32 keeps the unquantized part bit-identical to the source model. (bfloat16 would shrink the
#: embedding by half and speed NF4 batch-1 decode ~20%, at a small accuracy cost; not the default.)
DENSE_DTYPE: torch.dtype = torch.float32

#: NF4 compute dtype. On AVX512-BF16 CPUs the fused kernel computes in bf16 whatever this says:
#: measured, fp32 and bf16 give bit-identical logits and the same speed (28 vs 28 tok/s batch 1,
#: 185 vs 183 batch 16), so bf16 is not measurably better. Elsewhere the weight is dequantized to
#: this dtype and fed to F.linear, where fp32 is the accurate choice and bf16 is slow without
#: hardware bf16 support. Hence fp32.
NF4_COMPUTE_DTYPE: torch.dtype = torch.float32

_WEIGHT_GLOBS = ("model.safetensors", "model-*-of-*.safetensors")

# The CPU NF4 repacking (AVX512-BF16 fast path) tiles output features in blocks of 32 and reshapes
# the block scales to (out_features, in_features / blocksize), so it needs out_features % 32 == 0
# and in_features % blocksize (64) == 0; see _keep_unpackable_nf4_layers_generic.
_CPU_PACK_BLOCK_N = 32


def bnb_config(fmt: str) -> BitsAndBytesConfig:
    """The ``BitsAndBytesConfig`` for ``fmt`` (one of :data:`FORMATS`).

    ``int8``: LLM.int8 with ``llm_int8_threshold=INT8_THRESHOLD`` (6.0, outlier decomposition on).
    ``nf4``: 4-bit NormalFloat, double quantization, fp32 compute dtype.
    Raises ``ValueError`` naming the allowed formats for anything else.
    """
    if fmt == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_threshold=INT8_THRESHOLD)
    if fmt == "nf4":
        return BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=NF4_COMPUTE_DTYPE,
        )
    raise ValueError(f"unknown bitsandbytes format {fmt!r}; expected one of: {', '.join(FORMATS)}")


def quantize_to_dir(model_dir: Path, out_dir: Path, fmt: str, device: str = "cpu",
                    refine: Callable[[PreTrainedModel], Any] | None = None) -> Path:
    """Quantize the full-precision HF causal LM in ``model_dir`` to ``fmt`` and save it to ``out_dir``.

    The model is loaded on ``device`` with :func:`bnb_config` (bitsandbytes quantizes each Linear as
    its weights are loaded; the saved checkpoint loads on any device), then ``save_pretrained`` writes the quantized safetensors checkpoint
    and a ``config.json`` carrying the ``quantization_config``; the tokenizer files present in
    ``model_dir`` (:data:`TOKENIZER_FILES`) are copied next to it. ``out_dir`` is created if
    needed; making the write atomic (temp folder + rename) is the caller's job. Returns ``out_dir``.
    ``refine(model)``, when given, may change the quantized weights in place before they are saved
    (GPTQ codes: :func:`exporters.gptq.gptq_bnb_4bit`).
    """
    config = bnb_config(fmt)  # validate the format before paying for a model load
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"bnb quantize: {model_dir / 'config.json'} not found; pass a saved Hugging Face model directory."
        )
    model = _load_quantized_model(model_dir, device=device, quantization_config=config)
    try:
        if _count_bnb_linears(model) == 0:
            raise RuntimeError(f"bnb quantize: no Linear layer of {model_dir} was quantized to {fmt}.")
        if refine is not None:
            refine(model)
        out_dir.mkdir(parents=True, exist_ok=True)
        # Save before any forward pass: on AVX512-BF16 CPUs the first forward repacks NF4 weights
        # and turns the double-quantized scales into bf16; saving afterwards re-quantizes those
        # scales, a small avoidable loss.
        model.save_pretrained(out_dir, safe_serialization=True)
    finally:
        del model
        gc.collect()
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)
    return out_dir


def load_quantized(out_dir: Path, device: str = "cpu") -> PreTrainedModel:
    """Load a checkpoint written by :func:`quantize_to_dir` on ``device``, in eval mode, ready to ``.generate()``.

    Raises ``FileNotFoundError`` if ``out_dir`` holds no config/weights and ``ValueError`` if it
    is not a bitsandbytes-quantized checkpoint (no, or a non-bnb, ``quantization_config``).
    """
    out_dir = Path(out_dir)
    config_path = out_dir / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(
            f"bnb load: {config_path} not found; {out_dir} is not a saved model directory."
        )
    quant = json.loads(config_path.read_text()).get("quantization_config") or {}
    if quant.get("quant_method") != "bitsandbytes" or not (
        quant.get("load_in_8bit") or quant.get("load_in_4bit")
    ):
        raise ValueError(
            f"bnb load: {out_dir} is not a bitsandbytes-quantized checkpoint (its config.json has "
            f"quantization_config={quant or None}); produce one with quantize_to_dir()."
        )
    if not any(out_dir.glob(pattern) for pattern in _WEIGHT_GLOBS):
        raise FileNotFoundError(f"bnb load: no model*.safetensors in {out_dir}.")
    # The saved quantization_config is applied automatically; no config argument needed.
    model = _load_quantized_model(out_dir, device=device)
    if _count_bnb_linears(model) == 0:
        raise ValueError(f"bnb load: {out_dir} loaded without any bitsandbytes layer.")
    _keep_unpackable_nf4_layers_generic(model)
    _silence_int8_cast_warning()
    return model.eval()


def quantized_footprint_bytes(model: torch.nn.Module) -> int:
    """Bytes of tensor storage the model holds: parameters, buffers and bitsandbytes' side tensors.

    bitsandbytes keeps part of a quantized layer outside ``parameters()``: the int8 row scales
    (``weight.SCB``) and the NF4 quantization state (block scales, the nested scales of double
    quantization, the code tables). Those are counted too. Tensors are de-duplicated by address,
    so tied weights (embedding = lm_head) count once. Note that on AVX512-BF16 CPUs the first NF4
    forward swaps the double-quantized scales for plain bf16 ones (a few % larger).
    """
    seen: set[tuple[int, int, torch.dtype]] = set()
    total = 0
    for tensor in _held_tensors(model):
        key = (tensor.data_ptr(), tensor.numel(), tensor.dtype)
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def load_quantizing(model_dir: Path | str, fmt: str, device: str = "cpu") -> PreTrainedModel:
    """Load the full-precision model in ``model_dir`` quantized to ``fmt`` as it loads, writing nothing:
    the frozen base QLoRA trains on and the server serves. Same CPU fixes as :func:`load_quantized`."""
    model = _load_quantized_model(model_dir, device=device, quantization_config=bnb_config(fmt))
    _keep_unpackable_nf4_layers_generic(model)
    _silence_int8_cast_warning()
    return model.eval()


def _load_quantized_model(model_dir: Path | str, device: str = "cpu", **kwargs) -> PreTrainedModel:
    # An explicit device_map pins the model (and so bitsandbytes' backend) to ``device``: without it
    # transformers' bnb quantizer picks CUDA/XPU/NPU whenever one is present. dtype must be
    # explicit, or transformers makes the unquantized modules float16: see DENSE_DTYPE.
    _bitsandbytes()  # import it quietly before transformers does
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), device_map={"": device}, dtype=DENSE_DTYPE, **kwargs)
    if set(getattr(model, "hf_device_map", {}).values()) <= {"cpu"}:
        # The whole model on the CPU is no placement at all, but the map's presence makes PEFT's prefix
        # tuning look for the accelerator it dispatches the key/value cache to (peft.utils.integrations.
        # get_layer_device_map: StopIteration). Without a map, PEFT leaves the cache where the model is.
        del model.hf_device_map
    return model


def _bitsandbytes():
    # Imported lazily (it loads a native library). On AVX512-BF16 CPUs the import logs "Failed to
    # load CPU gemm_4bit_forward from kernels-community ... pip install kernels": that optional
    # package would fetch a kernel from the Hugging Face Hub at run time; without it bitsandbytes
    # uses the CPU kernel bundled in its wheel, which works (and is what we measured). Mute just
    # that import-time message.
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import bitsandbytes
    finally:
        logger.setLevel(previous)
    return bitsandbytes


def _count_bnb_linears(model: torch.nn.Module) -> int:
    bnb = _bitsandbytes()
    return sum(isinstance(m, (bnb.nn.Linear8bitLt, bnb.nn.Linear4bit)) for m in model.modules())


def _keep_unpackable_nf4_layers_generic(model: torch.nn.Module) -> None:
    # bitsandbytes 0.50 repacks every Linear4bit on its first no-grad eval forward on AVX512-BF16
    # CPUs without checking the shape: a layer with out_features % 32 != 0 or in_features not a
    # multiple of the 64-element block fails there (AssertionError / "shape '[64, 1]' is invalid").
    # For such layers turn the fast path off: they take the generic dequantize + F.linear path.
    bnb = _bitsandbytes()
    for module in model.modules():
        if isinstance(module, bnb.nn.Linear4bit) and getattr(module, "support_avx512bf16_for_cpu", False):
            state = module.weight.quant_state
            if state is None:
                continue
            out_features, in_features = state.shape
            if out_features % _CPU_PACK_BLOCK_N or in_features % state.blocksize:
                module.support_avx512bf16_for_cpu = False


def _silence_int8_cast_warning() -> None:
    # MatMul8bitLt logs "inputs will be cast from torch.float32 to float16" on *every* forward of
    # every int8 layer (hundreds of lines per generated token with fp32 activations). It is the
    # only message of that logger, the cast is intended, and the logging itself costs time, so
    # raise that one logger's level, unless the application configured it.
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    if logger.level == logging.NOTSET:
        logger.setLevel(logging.ERROR)


def _held_tensors(model: torch.nn.Module) -> Iterator[torch.Tensor]:
    for module in model.modules():
        yield from module.parameters(recurse=False)
        yield from module.buffers(recurse=False)
        weight = getattr(module, "weight", None)
        # int8: the per-row scales start on the weight (weight.SCB) and move to the layer's
        # MatmulLtState (state.SCB, state.CB is the weight itself) on the first forward.
        for holder in (weight, getattr(module, "state", None)):
            for name in ("SCB", "CB"):
                value = getattr(holder, name, None)
                if isinstance(value, torch.Tensor):
                    yield value
        # NF4: block scales, plus the nested state (scales of the scales) of double quantization.
        state = getattr(weight, "quant_state", None)
        while state is not None:
            for name in ("absmax", "code", "offset"):
                value = getattr(state, name, None)
                if isinstance(value, torch.Tensor):
                    yield value
            state = getattr(state, "state2", None)
