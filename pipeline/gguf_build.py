"""The ``gguf`` export target: llama.cpp and Ollama files for one task, each gated before it is published.

``runs/<run>/export/gguf/<task>/``:
  - ``model-<type>.gguf`` for each of ``export.gguf_types`` (a mergeable method's merged model), and
    ``Modelfile`` (Ollama) on the most compact one that passed;
  - for a plain LoRA task, ``adapter.gguf`` (llama.cpp LoRA adapter) and ``Modelfile.adapter`` over the
    run's shared base ``runs/<run>/export/gguf-base/model-<export.gguf_base_type>.gguf`` (written once,
    re-written only when the base or the type changes).

Every file is read back (transformers' GGUF reader; the adapter by :func:`exporters.gguf.read_lora_gguf`)
and checked against the PyTorch merged model with the gate of its precision (``f16`` → ``export.gates.f16``,
``q8_0`` → ``int8``, ``q4_1`` → ``int4``); the base + adapter pair with the base type's gate. A file that
fails is not published; the others are. Methods with no GGUF form are recorded with the reason.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.artifacts import atomic_dir, fingerprint, is_fresh, write_manifest
from pipeline.config import GGUF_PRECISIONS, Config, TaskConfig
from pipeline.errors import EdgetuneError, GateFailed
from pipeline.models import load_model, load_tokenizer, resolve_base

log = logging.getLogger(__name__)

BASE_DIR = "gguf-base"
MERGED_ONLY_REASON = ("{kind} has no llama.cpp adapter form (only plain LoRA does): the task ships as merged GGUF "
                      "models")


def base_gguf(cfg: Config) -> Path:
    """The run's shared GGUF base at ``export.gguf_base_type``: written when missing or stale, then reused."""
    from exporters.gguf import FORMAT, write_model_gguf

    out = cfg.run_dir / "export" / BASE_DIR
    base = resolve_base(cfg.base)
    fp, inputs = fingerprint("export", {"base": base}, f"gguf-base:{cfg.export.gguf_base_type}:{FORMAT}")
    path = out / f"model-{cfg.export.gguf_base_type}.gguf"
    if is_fresh(out, fp) and path.is_file():
        return path
    log.info("export: the shared GGUF base (%s)", cfg.export.gguf_base_type)
    with atomic_dir(out) as tmp:
        write_model_gguf(load_model(base, "cpu"), load_tokenizer(base), tmp / path.name, cfg.export.gguf_base_type,
                         name=f"{cfg.base} (edgetune base)")
        write_manifest(tmp, stage="export", fp=fp, inputs=inputs, config_hash=cfg.export.gguf_base_type,
                       metrics={"bytes": (tmp / path.name).stat().st_size}, extra={"target": "gguf-base"})
    return path


def export_gguf(cfg: Config, task: TaskConfig, src: Path, merged_model: Callable[[], Any],
                adapter: Path, adapter_kind: str, out: Path) -> tuple[dict[str, Any], dict[str, dict[str, Any]]]:
    """Write and gate the task's GGUF files into ``out``; return (manifest metrics, failed files).

    ``src`` is the merged model's folder and ``merged_model()`` the loaded merged model (the export stage
    skips methods that cannot be merged before calling this); ``adapter`` the tune result, written as a
    llama.cpp adapter when ``adapter_kind`` is plain ``lora``.
    """
    import torch

    from exporters.gguf import GGUFExportError, load_gguf_model, modelfile, write_lora_gguf, write_model_gguf
    from pipeline.fidelity import gate

    tokenizer = load_tokenizer(src)
    reference = merged_model()
    metrics: dict[str, Any] = {"files": {}}
    failed: dict[str, dict[str, Any]] = {}

    def gated(path: Path, precision: str, what: str, load: Callable[[], Any]) -> bool:
        with torch.inference_mode():
            try:
                m = gate(cfg, task, precision, reference, load(), tokenizer, what)
            except GateFailed as exc:
                log.error("%s; not published, the run goes on and will end with exit status 3", exc)
                failed[f"gguf:{path.name}"] = {"reason": str(exc), "metrics": exc.metrics}
                path.unlink()
                return False
        metrics["files"][path.name] = {**m, "bytes": path.stat().st_size}
        return True

    int4 = _int4_blocks(cfg, task, reference, tokenizer) if "q4_1" in cfg.export.gguf_types else None
    for gguf_type in cfg.export.gguf_types:
        path = write_model_gguf(reference, tokenizer, out / f"model-{gguf_type}.gguf", gguf_type,
                                name=f"{task.name} ({gguf_type})", int4=int4 if gguf_type == "q4_1" else None)
        gated(path, GGUF_PRECISIONS[gguf_type], f"{task.name} gguf {gguf_type}", lambda p=path: load_gguf_model(p))
    if any(out.glob("model-*.gguf")):
        (out / "Modelfile").write_text(modelfile(f"./{model_file(out).name}", tokenizer, max_tokens=task.max_new_tokens))
    if adapter_kind == "lora":
        base = base_gguf(cfg)
        try:
            path = write_lora_gguf(adapter, reference.config, out / "adapter.gguf", name=task.name)
        except GGUFExportError as exc:  # e.g. LoRA on the embedding, modules_to_save: the merged files still ship
            log.warning("export %s: no GGUF adapter: %s", task.name, exc)
            metrics["adapter_skipped"] = str(exc)
            return metrics, failed
        rel_base = Path("..", "..", BASE_DIR, base.name).as_posix()
        if gated(path, GGUF_PRECISIONS[cfg.export.gguf_base_type], f"{task.name} gguf adapter on the "
                 f"{cfg.export.gguf_base_type} base", lambda: load_gguf_model(base, lora=path)):
            (out / "Modelfile.adapter").write_text(modelfile(rel_base, tokenizer, adapter_file="./adapter.gguf",
                                                             max_tokens=task.max_new_tokens))
            metrics["adapter_base"] = rel_base
    else:
        metrics["adapter_skipped"] = MERGED_ONLY_REASON.format(kind=adapter_kind)
    return metrics, failed


def model_file(folder: Path) -> Path:
    """The merged GGUF model of a task's ``gguf`` export that its Modelfile runs: the most compact that passed."""
    for gguf_type in ("q4_1", "q8_0", "f16"):
        if (folder / f"model-{gguf_type}.gguf").is_file():
            return folder / f"model-{gguf_type}.gguf"
    raise EdgetuneError(f"{folder} holds no GGUF model (every one failed its gate?); see the export record, then "
                        "run `edgetune export` again")


def _int4_blocks(cfg: Config, task: TaskConfig, model, tokenizer) -> dict | None:
    """GPTQ blocks for ``q4_1`` (None: gguf's round-to-nearest), as the onnx-int4 export calibrates them."""
    if cfg.export.int4_method != "gptq":
        return None
    if cfg.export.int4_block_size != 32:
        log.warning("export %s: q4_1 holds blocks of 32, export.int4_block_size is %d: its 4-bit weights are "
                    "rounded to nearest", task.name, cfg.export.int4_block_size)
        return None
    from pipeline.onnx_build import gptq_int4

    return gptq_int4(cfg, model, tokenizer, [task])
