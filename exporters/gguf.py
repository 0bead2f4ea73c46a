"""GGUF files for llama.cpp and Ollama: merged models, a shared base, LoRA adapters, Modelfiles.

Written with llama.cpp's own Python library (``gguf``: ``GGUFWriter``, its HF → GGUF tensor-name map,
its numpy quantizers), in the layout llama.cpp's ``convert_hf_to_gguf.py`` and
``convert_lora_to_gguf.py`` write:

- **Models** (:func:`write_model_gguf`): architecture metadata, the tokenizer (byte-level BPE: tokens,
  token types, merges, pre-tokenizer name), the chat template and the end-of-turn token, and the
  weights at ``f16``, ``q8_0`` or ``q4_1``. Norms stay f32. At ``q4_1`` the token embedding (also
  the output head when tied) is ``q8_0``, as in the Q4_1 file the embedded default ships in; the
  decoder projections may be given as calibrated 4-bit blocks (GPTQ, :mod:`exporters.gptq`) that
  ``q4_1`` holds exactly: ``w = (q - zero)·scale = scale·q + min`` with ``min = -scale·zero``.
  Llama-architecture query/key rows are permuted as llama.cpp's rotary layout expects.
- **LoRA adapters** (:func:`write_lora_gguf`): ``general.type = adapter``, ``adapter.type = lora``,
  ``<base tensor>.lora_a`` ([rank, in]) and ``.lora_b`` ([out, rank]) in f32. PEFT's scaling
  (alpha/rank per module, rank and alpha patterns, rsLoRA) is folded into ``lora_b`` and
  ``adapter.lora.alpha`` is 0, which llama.cpp reads as "scale 1": exact for every pattern.
- **Modelfiles** (:func:`modelfile`) for ``ollama create``.

Supported: Llama-architecture models (Llama, SmolLM, Mistral) and Qwen2/Qwen3 with byte-level BPE
tokenizers; anything else raises :class:`GGUFExportError` naming what is supported. The files are
read back with :func:`load_gguf_model` (as transformers' GGUF loader reads them, the file parsed once:
:func:`read_gguf`) and :func:`read_lora_gguf` for the fidelity gates.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np

from exporters.gptq import BlockQuantized
from exporters.onnx_lora import LoraExportError, lora_factors, lora_input_names

log = logging.getLogger(__name__)

__all__ = ["FORMAT", "GGUF_TYPES", "GGUFExportError", "gguf_arch", "llama_cpp_decode_speed", "llama_cpp_rate",
           "load_gguf_model", "modelfile", "read_gguf", "read_lora_gguf",
           "write_lora_gguf", "write_model_gguf"]

FORMAT = "gguf-writer-1"
"""Version of what this module writes (part of the export fingerprint: a change re-exports)."""
GGUF_TYPES = ("f16", "q8_0", "q4_1")
"""Weight types a model is written at: half precision, 8-bit and 4-bit blocks of 32."""

_ARCHS = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}
"""transformers ``model_type`` → GGUF architecture (Mistral is written as llama, as convert_hf_to_gguf does)."""
SUPPORTED = "Llama, SmolLM, Mistral, Qwen2 and Qwen3 with byte-level BPE tokenizers"
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
_BLOCK = 32  # elements per q8_0 / q4_1 block


class GGUFExportError(ValueError):
    """The model or adapter cannot be written as GGUF (the message says why and what is supported)."""


def gguf_arch(config) -> str:
    """The GGUF architecture name of a transformers ``config`` (raises for unsupported families)."""
    arch = _ARCHS.get(config.model_type)
    if arch is None:
        raise GGUFExportError(f"GGUF export supports {SUPPORTED}; this model is {config.model_type}. "
                              "Drop `gguf` from export.targets for it, or convert the merged safetensors export "
                              "with llama.cpp's convert_hf_to_gguf.py")
    scaling = getattr(config, "rope_scaling", None)
    if scaling and scaling.get("rope_type", scaling.get("type")) not in (None, "default"):
        raise GGUFExportError(f"GGUF export does not write rope scaling ({scaling}); convert the merged safetensors "
                              "export with llama.cpp's convert_hf_to_gguf.py")
    return arch


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query/key projection reordered from HF's rotary halves to llama.cpp's interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """The inverse of :func:`_permute`."""
    return w.reshape(heads, w.shape[0] // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _rotary_heads(arch: str, config, module: str) -> int | None:
    """Heads to permute ``module``'s output rows by (llama architecture's q/k only), else None."""
    if arch != "llama":
        return None
    if module.endswith("self_attn.q_proj"):
        return config.num_attention_heads
    if module.endswith("self_attn.k_proj"):
        return config.num_key_value_heads or config.num_attention_heads
    return None


def _pre_tokenizer(arch: str, spec: dict) -> str:
    """llama.cpp's name for the tokenizer's pre-tokenization (its regex set), from ``tokenizer.json``."""
    if arch in ("qwen2", "qwen3"):
        return "qwen2"
    pre = spec.get("pre_tokenizer") or {}
    parts = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [p.get("type") for p in parts]
    if kinds == ["ByteLevel"]:
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and parts[0].get("individual_digits"):
        return "smollm"
    if kinds and kinds[0] == "Split" and "ByteLevel" in kinds:
        regex = json.dumps(parts[0].get("pattern", {}))
        if "\\\\p{N}{1,3}" in regex:
            return "llama-bpe"
    log.warning("GGUF: unrecognised pre-tokenizer %s; written as 'default' (llama.cpp's GPT-2 splitting)", kinds)
    return "default"


def _add_tokenizer(writer, arch: str, tokenizer, vocab_size: int) -> None:
    """Byte-level BPE vocabulary, merges, special ids and chat template, as convert_hf_to_gguf writes them."""
    import gguf

    spec = json.loads(tokenizer.backend_tokenizer.to_str()) if getattr(tokenizer, "is_fast", False) else {}
    model = spec.get("model", {})
    if model.get("type") != "BPE" or "ByteLevel" not in json.dumps(spec.get("pre_tokenizer")):
        raise GGUFExportError(f"GGUF export writes byte-level BPE tokenizers ({SUPPORTED}); this tokenizer is "
                              f"{model.get('type') or type(tokenizer).__name__}. Convert the merged safetensors "
                              "export with llama.cpp's convert_hf_to_gguf.py")
    by_id = {i: t for t, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = model.get("merges", [])
    merges = [m if isinstance(m, str) else " ".join(m) for m in merges]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(_pre_tokenizer(arch, spec))
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for setter, token_id in ((writer.add_bos_token_id, tokenizer.bos_token_id),
                             (writer.add_eos_token_id, tokenizer.eos_token_id),
                             (writer.add_eot_token_id, tokenizer.eos_token_id),
                             (writer.add_unk_token_id, tokenizer.unk_token_id),
                             (writer.add_pad_token_id, tokenizer.pad_token_id)):
        if token_id is not None:
            setter(int(token_id))
    writer.add_add_bos_token(False)  # the chat template writes every special token itself
    writer.add_add_space_prefix(False)
    if tokenizer.chat_template:
        writer.add_chat_template(tokenizer.chat_template)


def _add_hparams(writer, arch: str, config, name: str, file_type) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", 10000.0)))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    if head_dim * config.num_attention_heads != config.hidden_size:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(2)


def _q4_1(q: BlockQuantized) -> np.ndarray:
    """GPTQ blocks of 32 as ggml ``Q4_1`` bytes ([rows, K/32 * 20]): ``d = scale``, ``m = -scale·zero``."""
    n, k = q.codes.shape
    codes = q.codes.reshape(n, k // _BLOCK, 2, _BLOCK // 2)
    packed = codes[..., 0, :] | (codes[..., 1, :] << np.uint8(4))  # element j low nibble, j + 16 high nibble
    d = q.scales.astype(np.float16)[..., None].view(np.uint8)
    m = (-q.scales * q.zeros.astype(np.float32)).astype(np.float16)[..., None].view(np.uint8)
    return np.concatenate([d, m, packed.astype(np.uint8)], axis=-1).reshape(n, -1)


def _qtype(gguf_type: str, name: str, shape: tuple[int, ...]):
    """The ggml type a tensor is stored at for a file of ``gguf_type``."""
    import gguf

    if len(shape) < 2:
        return gguf.GGMLQuantizationType.F32  # norms and biases
    if gguf_type == "f16" or shape[-1] % _BLOCK:
        return gguf.GGMLQuantizationType.F16
    if gguf_type == "q8_0" or name == "token_embd.weight" or name == "output.weight":
        return gguf.GGMLQuantizationType.Q8_0
    return gguf.GGMLQuantizationType.Q4_1


@contextmanager
def _writing(out: Path, arch: str) -> Iterator[Any]:
    """A ``GGUFWriter`` for ``arch`` whose file appears at ``out`` only when the block completes: it is written
    to ``<out>.partial``, which an error removes, so nothing half-written is left beside finished files."""
    import gguf

    tmp = out.with_name(out.name + ".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    try:
        yield writer
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out)


def write_model_gguf(model, tokenizer, out: Path, gguf_type: str, *, name: str,
                     int4: Mapping[str, BlockQuantized] | None = None) -> Path:
    """Write ``model`` (a transformers causal LM) and ``tokenizer`` as one GGUF file at ``out``.

    ``gguf_type`` is one of :data:`GGUF_TYPES`. ``int4`` (module name → GPTQ blocks of 32) replaces
    round-to-nearest for those projections in a ``q4_1`` file. The file is written next to ``out``
    and renamed into place, so a failure leaves nothing half-written.
    """
    import gguf

    if gguf_type not in GGUF_TYPES:
        raise GGUFExportError(f"unknown GGUF type {gguf_type!r}: one of {', '.join(GGUF_TYPES)}")
    config = model.config
    arch = gguf_arch(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    file_type = {"f16": gguf.LlamaFileType.MOSTLY_F16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
                 "q4_1": gguf.LlamaFileType.MOSTLY_Q4_1}[gguf_type]
    with _writing(out, arch) as writer:
        _add_hparams(writer, arch, config, name, file_type)
        _add_tokenizer(writer, arch, tokenizer, config.vocab_size)
        tied = bool(getattr(config, "tie_word_embeddings", False))
        for key, tensor in model.state_dict().items():
            if tied and key == "lm_head.weight":
                continue  # llama.cpp uses token_embd as the head when output.weight is absent
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise GGUFExportError(f"no GGUF tensor name for {key} in the {arch} architecture")
            module = key.rsplit(".", 1)[0]
            data = tensor.detach().float().cpu().numpy()
            heads = _rotary_heads(arch, config, module)
            qtype = _qtype(gguf_type, target, data.shape)
            if qtype == gguf.GGMLQuantizationType.Q4_1 and int4 and module in int4 and key.endswith(".weight"):
                q = int4[module]
                if heads:
                    q = BlockQuantized(_permute(q.codes, heads), _permute(q.scales, heads), _permute(q.zeros, heads))
                writer.add_tensor(target, _q4_1(q), raw_dtype=qtype)
                continue
            if heads:
                data = _permute(data, heads)
            if qtype == gguf.GGMLQuantizationType.F32:
                writer.add_tensor(target, data.astype(np.float32))
            elif qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(target, data.astype(np.float16))
            else:
                writer.add_tensor(target, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
    return out


def write_lora_gguf(adapter_dir: Path, config, out: Path, *, name: str) -> Path:
    """Write the PEFT LoRA adapter in ``adapter_dir`` (on a base with transformers ``config``) as a llama.cpp
    LoRA adapter at ``out``. Raises :class:`GGUFExportError` for adapters without a GGUF LoRA form."""
    import gguf

    arch = gguf_arch(config)
    try:
        factors = lora_factors(adapter_dir)
    except LoraExportError as exc:
        raise GGUFExportError(f"{exc} (a GGUF LoRA adapter holds the same factors)") from exc
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    with _writing(out, arch) as writer:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_name(name)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, 0.0)  # 0: llama.cpp applies lora_b as written (scale folded in)
        for module in sorted({k.removeprefix("lora.")[:-2] for k in factors}):
            a_name, b_name = lora_input_names(module)
            a = np.ascontiguousarray(factors[a_name].T)  # [rank, in]
            b = np.ascontiguousarray(factors[b_name].T)  # [out, rank], scaling folded
            heads = _rotary_heads(arch, config, module)
            if heads:
                b = np.ascontiguousarray(_permute(b, heads))
            target = names.get_name(module + ".weight", try_suffixes=(".weight",))
            if target is None:
                raise GGUFExportError(f"no GGUF tensor name for {module} in the {arch} architecture")
            writer.add_tensor(f"{target}.lora_a", a.astype(np.float32))
            writer.add_tensor(f"{target}.lora_b", b.astype(np.float32))
    return out


def read_lora_gguf(path: Path, config) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A GGUF LoRA adapter read back: HF module name → (A [rank, in], scale·B [out, rank]) as the model
    computes them (llama.cpp's alpha/rank scale applied; llama-layout rows un-permuted)."""
    import gguf

    arch = gguf_arch(config)
    reader = gguf.GGUFReader(path)
    field = reader.fields.get(gguf.Keys.General.TYPE)
    if field is None or field.contents() != "adapter":
        raise GGUFExportError(f"{path} is not a GGUF adapter (general.type is not 'adapter')")
    alpha = float(reader.fields[gguf.Keys.Adapter.LORA_ALPHA].contents())
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    modules = {names.get_name(f"model.layers.{i}.{p}.weight", try_suffixes=(".weight",)): f"model.layers.{i}.{p}"
               for i in range(config.num_hidden_layers) for p in _PROJECTIONS}
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type).reshape([int(d) for d in reversed(t.shape)])
               for t in reader.tensors}
    out = {}
    for key, a in tensors.items():
        if not key.endswith(".lora_a"):
            continue
        base = key.removesuffix(".lora_a")
        module = modules.get(base)
        if module is None:
            raise GGUFExportError(f"{path}: {base} is not a decoder projection of this {arch} base")
        b = tensors[base + ".lora_b"]
        scale = alpha / a.shape[0] if alpha else 1.0
        heads = _rotary_heads(arch, config, module)
        out[module] = (np.asarray(a, np.float32), np.asarray(_unpermute(b, heads) if heads else b, np.float32) * scale)
    return out


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
"""GGUF metadata value type → struct format (8 is a string, 9 an array)."""


def read_gguf(path: Path) -> tuple[dict[str, Any], dict[str, tuple[Any, np.ndarray]]]:
    """(metadata, tensors) of the GGUF file ``path``, as gguf-py's ``GGUFReader`` reads them, minus arrays.

    ``metadata``: key → int, float, bool or str; array values (the tokenizer's tokens, types and merges)
    are skipped, not parsed. ``tensors``: name → (``gguf.GGMLQuantizationType``, raw bytes [*rows, bytes per
    row], a read-only view of the file that :func:`gguf.quants.dequantize` takes). ``GGUFReader`` builds a
    NumPy view for every element of every array: on a 49k-token vocabulary that was 4.5 s a file, the rest of
    the file 0.1 s. Raises ``GGUFExportError`` for a file that is not GGUF v2/v3, or is truncated or damaged.
    """
    import struct

    import gguf

    data = buf = None  # the file, mapped (below: an empty file cannot be)
    offset = 0

    def take(fmt: str):
        nonlocal offset
        value = struct.unpack_from(fmt, buf, offset)
        offset += struct.calcsize(fmt)
        return value[0]

    def string() -> str:
        nonlocal offset
        size = take("<Q")
        offset += size
        return bytes(buf[offset - size:offset]).decode("utf-8")

    def skip(kind: int, count: int) -> None:
        nonlocal offset
        if kind in _SCALARS:
            offset += struct.calcsize(_SCALARS[kind]) * count
        elif kind == 8:
            for _ in range(count):
                offset += 8 + struct.unpack_from("<Q", buf, offset)[0]
        elif kind == 9:
            for _ in range(count):
                inner, n = take("<I"), take("<Q")
                skip(inner, n)
        else:
            raise GGUFExportError(f"{path}: unknown GGUF metadata type {kind}")

    try:
        data = np.memmap(path, mode="r")
        buf = memoryview(data)
        if bytes(buf[:4]) != b"GGUF" or struct.unpack_from("<I", buf, 4)[0] not in (2, 3):
            raise GGUFExportError(f"{path} is not a little-endian GGUF v2/v3 file")
        offset = 8
        tensor_count, kv_count = take("<Q"), take("<Q")
        metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key, kind = string(), take("<I")
            if kind == 8:
                metadata[key] = string()
            elif kind == 9:
                inner, count = take("<I"), take("<Q")
                skip(inner, count)
            elif kind in _SCALARS:
                metadata[key] = take(_SCALARS[kind])
            else:
                raise GGUFExportError(f"{path}: unknown GGUF metadata type {kind} for {key}")
        infos = []
        for _ in range(tensor_count):
            name, n_dims = string(), take("<I")
            dims = [take("<Q") for _ in range(n_dims)]
            infos.append((name, dims, gguf.GGMLQuantizationType(take("<I")), take("<Q")))
        alignment = int(metadata.get("general.alignment", gguf.GGUF_DEFAULT_ALIGNMENT))
        start = -(-offset // alignment) * alignment
        tensors = {}
        for name, dims, kind, at in infos:
            shape = gguf.quant_shape_to_byte_shape(tuple(reversed(dims)), kind) if kind not in (
                gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) else \
                (*reversed(dims[1:]), dims[0] * (4 if kind == gguf.GGMLQuantizationType.F32 else 2))
            size = int(np.prod(shape))
            tensors[name] = (kind, data[start + at:start + at + size].reshape(shape))
    except GGUFExportError:
        raise
    except (struct.error, ValueError, UnicodeDecodeError) as exc:  # cut short, or not what it says it is
        raise GGUFExportError(f"{path} is truncated or damaged ({exc}); export it again") from exc
    return metadata, tensors


def _config(path: Path, metadata: Mapping[str, Any], tensors: Mapping[str, Any]):
    """The transformers configuration of a GGUF model file, read as transformers reads it (its own map
    of GGUF keys to config fields, ``GGUF_TO_TRANSFORMERS_MAPPING``; Mistral written as llama; the output
    head tied when the file has no ``output.weight``), from metadata :func:`read_gguf` already parsed."""
    from transformers import CONFIG_MAPPING
    from transformers.modeling_gguf_pytorch_utils import GGUF_TO_TRANSFORMERS_MAPPING

    arch = metadata["general.architecture"]
    model_type = "mistral" if arch == "llama" and metadata.get("general.name") == "mistral" else arch
    if model_type not in _ARCHS:
        raise GGUFExportError(f"{path}: a {arch} GGUF file; the read-back supports {SUPPORTED}")
    renames = GGUF_TO_TRANSFORMERS_MAPPING["config"]
    fields: dict[str, Any] = {"tie_word_embeddings": "output.weight" not in tensors}
    for key, value in metadata.items():
        prefix, _, rest = key.partition(".")
        prefix = model_type if prefix == arch else prefix
        field = renames.get(prefix, {}).get(rest)
        if field not in (None, -1):
            fields[field] = model_type if field == "model_type" else value
    fields.setdefault("vocab_size", int(tensors["token_embd.weight"][1].shape[0]))
    key_length = metadata.get(f"{arch}.attention.key_length")
    if key_length is not None:  # transformers drops it for some families (Qwen3): head_dim != hidden/heads
        fields["head_dim"] = int(key_length)
    return CONFIG_MAPPING[model_type].from_dict(fields)


def load_gguf_model(path: Path, *, lora: Path | None = None):
    """The model in GGUF file ``path`` as a transformers model (fp32, CPU); with ``lora``, that GGUF adapter's
    updates added to the weights (what llama.cpp computes).

    The configuration is transformers' reading of the file's metadata; the tensors are found by gguf-py's
    name map (llama.cpp's own), dequantized by gguf-py, and llama-layout query/key rows un-permuted. That is
    what transformers' GGUF loader does (``from_pretrained(gguf_file=)``; tests hold the two equal, config and
    weight for weight, for every family written here), with the file parsed once and its vocabulary skipped
    (:func:`read_gguf`): parsing the vocabulary's strings in Python was most of a 20 s read-back of SmolLM2-135M."""
    import gguf
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.modeling_utils import no_init_weights

    metadata, tensors = read_gguf(path)
    config = _config(path, metadata, tensors)
    with no_init_weights():  # every weight is read from the file below (random init was 1.8 s of 3.7)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    arch = gguf_arch(config)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], config.num_hidden_layers)
    state = {}
    for name in model.state_dict():
        stored = tensors.get(names.get_name(name, try_suffixes=(".weight", ".bias")) or "")
        if stored is None:
            if name == "lm_head.weight" and config.tie_word_embeddings:
                continue  # the output head reads the embedding (no output.weight in the file)
            raise GGUFExportError(f"{path}: no tensor for {name}; is it a complete {arch} model file?")
        kind, raw = stored
        weight = gguf.quants.dequantize(raw, kind)
        heads = _rotary_heads(arch, config, name.rsplit(".", 1)[0])
        state[name] = torch.from_numpy(np.array(_unpermute(weight, heads) if heads else weight, dtype=np.float32))
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    model.eval()
    if lora is not None:
        modules = dict(model.named_modules())
        with torch.no_grad():
            for name, (a, b) in read_lora_gguf(lora, model.config).items():
                modules[name].weight += torch.from_numpy(b @ a)
    return model


def _go_template(tokenizer) -> tuple[str, str] | None:
    """An Ollama (Go) TEMPLATE and default SYSTEM for a ChatML chat template, or None for other templates
    (Ollama then picks a template from the GGUF's own ``tokenizer.chat_template``)."""
    template = tokenizer.chat_template or ""
    if "<|im_start|>" not in template:
        return None
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    system = ""
    if rendered.startswith("<|im_start|>system\n"):
        system = rendered.removeprefix("<|im_start|>system\n").split("<|im_end|>", 1)[0]
    # Ollama puts SYSTEM into .Messages as the first message when a request has none of its own
    go = ('{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}'
          '<|im_start|>assistant\n')
    return go, system


def modelfile(model_file: str, tokenizer, *, adapter_file: str | None = None, max_tokens: int | None = None) -> str:
    """An Ollama ``Modelfile``: ``FROM`` the GGUF model (paths relative to the Modelfile), ``ADAPTER`` the
    GGUF LoRA when given, the chat template in Go form (ChatML), stop at the end-of-turn token, greedy."""
    lines = [f"FROM {model_file}"]
    if adapter_file:
        lines.append(f"ADAPTER {adapter_file}")
    chat = _go_template(tokenizer)
    if chat:
        template, system = chat
        lines.append(f'TEMPLATE """{template}"""')
        if system:
            lines.append(f'SYSTEM """{system}"""')
    if tokenizer.eos_token:
        lines.append(f'PARAMETER stop "{tokenizer.eos_token}"')
    lines.append("PARAMETER temperature 0")
    if max_tokens:
        lines.append(f"PARAMETER num_predict {max_tokens}")
    return "\n".join(lines) + "\n"


def llama_cpp_rate(llama, prompt_ids: list[int], new_tokens: int) -> float:
    """Tokens/s of one greedy llama.cpp run (a ``llama_cpp.Llama``) of exactly ``new_tokens`` after ``prompt_ids``,
    the prompt included in the time as :func:`pipeline.scoring.decode_speed` and the ONNX runtime count it."""
    import time

    started = time.perf_counter()
    for n, _ in enumerate(llama.generate(prompt_ids, top_k=1, temp=0.0, reset=True), start=1):
        if n == new_tokens:
            break
    return new_tokens / (time.perf_counter() - started)


def llama_cpp_decode_speed(path: Path, prompt_ids: list[int], new_tokens: int, repeats: int, threads: int) -> float | None:
    """Median of ``repeats`` :func:`llama_cpp_rate` runs on the GGUF file ``path`` at batch 1 (after a warm-up);
    None when llama-cpp-python is not installed (the ``bench`` extra)."""
    import statistics

    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    model = Llama(model_path=str(path), n_ctx=len(prompt_ids) + new_tokens + 8, n_threads=threads,
                  n_threads_batch=threads, verbose=False)
    llama_cpp_rate(model, prompt_ids, 2)
    rate = statistics.median(llama_cpp_rate(model, prompt_ids, new_tokens) for _ in range(repeats))
    model.close()
    return rate
