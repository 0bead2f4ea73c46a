"""The ``edge`` export target: the run's edge bundle, one shared base and every task's adapter.

``runs/<run>/export/edge/`` (layout in :mod:`edge.bundle`) holds the base as a multi-LoRA ONNX
decoder at ``export.edge_precision`` and, per task, the adapter in the form ONNX Runtime runs:

  - LoRA / QLoRA → ``adapters/<task>.onnx_adapter`` (selected per request with RunOptions);
  - prefix tuning, prompt tuning, P-tuning → ``adapters/<task>.prefix.npz`` (a key/value prefix);
  - DoRA, IA3, PIR, full, ULMFiT → ``merged/<task>.onnx`` (the merged model at the same precision).

Each task is added by rebuilding the bundle in a temporary folder (unchanged files hard-linked,
not copied) that then replaces the old one, so the bundle on disk is always complete and its
``manifest.json`` (sha256 of every file) always true. A task whose adapter fails its fidelity gate
is left out of the bundle (the base and the other tasks are published) and :class:`GateFailed` is
raised for it; a shared base that fails its gate publishes no bundle at all.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edge.bundle import FORMAT
from pipeline.artifacts import atomic_dir, fingerprint, read_manifest, write_manifest
from pipeline.calibration import calibration_inputs
from pipeline.config import Config, TaskConfig
from pipeline.device import onnx_providers, set_threads
from pipeline.errors import EdgetuneError, GateFailed
from pipeline.models import load_model, load_tokenizer, resolve_base
from pipeline.onnx_build import add_fused, fp32_onnx, int4_recipe, quantize_onnx
from pipeline.paths import adapter_dir, bundle_dir, merged_dir
from pipeline.stage_outputs import remove_stale, require_stage_output, tuned_spec
from pipeline.tuned import load_tuned

log = logging.getLogger(__name__)

_SENTINEL = "\u2063EDGETUNE_PROMPT\u2063"
_HEADER = ("base_name", "model", "tokenizer", "chat", "stop_token_ids", "pad_token_id", "context_length",
           "base_fidelity", "recipe")
"""Manifest keys that describe the shared base (kept when a task is added to an existing bundle)."""
_FAILED_BASES: dict[tuple[str, str], GateFailed] = {}
"""(base fingerprint, export settings) -> its gate failure in this process: the next task does not rebuild it."""


def adapter_kind(cfg: Config, task: TaskConfig) -> str:
    """How ``task``'s tune result travels in the bundle: ``lora``, ``prefix`` or ``merged``."""
    from exporters.onnx_lora import LoraExportError, lora_factors

    spec = tuned_spec(cfg, task)
    if spec.kind in ("lora", "dora"):
        try:  # LoRA outside the decoder layers' projections, DoRA, extra trained modules: ship merged
            lora_factors(adapter_dir(cfg, task))
            return "lora"
        except LoraExportError as exc:
            log.info("export %s edge: the adapter ships merged: %s", task.name, exc)
            return "merged"
    return "prefix" if spec.prompt_learning else "merged"


def _settings(cfg: Config) -> str:
    from edge.slots import FUSED_FORMAT
    from exporters.onnx_quant import RECIPE

    e = cfg.export
    recipe = f":{int4_recipe(cfg)}" if e.edge_precision == "int4" else ""
    return f"{FORMAT}:{RECIPE}:{FUSED_FORMAT}:{e.edge_precision}:{e.int4_block_size}:{e.accuracy_level}{recipe}"


def _calibrated(cfg: Config) -> bool:
    return cfg.export.edge_precision == "int4" and cfg.export.int4_method == "gptq"


def add_task(cfg: Config, task: TaskConfig, *, force: bool = False,
             merged_model: Callable[[], Any] | None = None) -> Path:
    """Add (or refresh) ``task`` in the run's edge bundle, building the shared base first if needed.

    ``merged_model`` returns the task's PyTorch merged model when the caller already holds it (the
    export stage does); otherwise it is loaded here if the task ships merged."""
    root = bundle_dir(cfg)
    base = resolve_base(cfg.base)
    kind = adapter_kind(cfg, task)
    source = merged_dir(cfg, task) if kind == "merged" else adapter_dir(cfg, task)
    require_stage_output(source, "merge" if kind == "merged" else "tune", task)
    # the shared base is calibrated on every task's training rows: a changed or added task file rebuilds it
    base_fp, base_inputs = fingerprint("export", {"base": base, **(calibration_inputs(cfg, cfg.tasks)
                                                                  if _calibrated(cfg) else {})}, _settings(cfg))
    task_fp, _ = fingerprint("export", {"source": source, "base": base_fp},
                             _settings(cfg) + kind + cfg.section_hash("export"))
    current = read_manifest(root)
    reuse = current if (current and current.get("fingerprint") == base_fp and current.get("format") == FORMAT
                        and all(k in current for k in _HEADER)) else None
    if reuse and not force and reuse["adapters"].get(task.name, {}).get("fingerprint") == task_fp:
        log.info("export %s edge: up to date in %s, nothing to do; --force redoes it", task.name, root)
        return root
    set_threads(cfg.num_threads)
    precision = cfg.export.edge_precision
    failed_base = _FAILED_BASES.get((base_fp, cfg.section_hash("export")))
    if failed_base is not None and not reuse:  # this process already built this base and saw it fail
        raise GateFailed(str(failed_base), failed_base.metrics)
    try:
        with atomic_dir(root) as tmp:
            adapters = {}
            if reuse:  # keep the base and the other tasks: hard links, no copies
                keep = {f for f in reuse["files"] if not f.startswith(tuple(_task_files(task.name)))}
                for rel in keep:
                    (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
                    _link(root / rel, tmp / rel)
                adapters = {k: v for k, v in reuse["adapters"].items() if k != task.name}
                header = {k: reuse[k] for k in _HEADER}
            else:
                log.info("export edge: building the shared %s base with LoRA inputs from %s", precision, base)
                header = _build_base(cfg, task, base, tmp, precision)
            failure = None
            try:
                entry = _add_adapter(cfg, task, kind, source, base, tmp, precision,
                                     merged_model or (lambda: load_model(source, "cpu")))
                adapters[task.name] = {**entry, "fingerprint": task_fp}
            except GateFailed as exc:  # the bundle goes out without this task: the others keep working
                _remove_task_files(tmp, task.name)
                entry = _fallback(cfg, task, base, tmp, precision, merged_model, exc)
                if entry is None:
                    failure = exc
                else:
                    adapters[task.name] = {**entry, "fingerprint": task_fp}
            write_manifest(tmp, stage="export", fp=base_fp, inputs=base_inputs, config_hash=_settings(cfg),
                           extra={"format": FORMAT, "target": "edge", "precision": precision, **header,
                                  "adapters": dict(sorted(adapters.items()))})
    except GateFailed as exc:  # only the shared base's gate gets here: there is no bundle to publish
        _FAILED_BASES[(base_fp, cfg.section_hash("export"))] = exc
        remove_stale(root, "export edge", why="its shared base fails the gate this config sets")
        raise
    if failure is not None:
        raise failure
    log.info("export %s edge: %s adapter in %s", task.name, kind, root)
    return root


def _task_files(name: str) -> list[str]:
    return [f"adapters/{name}.", f"merged/{name}."]


def _remove_task_files(root: Path, name: str) -> None:
    for rel in _task_files(name):
        for stale in (root / rel).parent.glob(Path(rel).name + "*"):
            stale.unlink()


_ORDER = ("int4", "int8", "fp32")


def _fallback(cfg: Config, task: TaskConfig, base: Path, out: Path, precision: str,
              merged_model: Callable[[], Any] | None, failure: GateFailed) -> dict | None:
    """``export.edge_fallback``: ``task``'s merged model at the fallback precision, gated at it, as its manifest
    entry (recording the failure it replaces); None when there is no fallback or it fails too."""
    fallback = cfg.export.edge_fallback
    if fallback is None or _ORDER.index(fallback) <= _ORDER.index(precision):
        return None
    if not tuned_spec(cfg, task).mergeable:
        log.warning("export %s edge: no fallback to %s: the method's adapter cannot be merged", task.name, fallback)
        return None
    source = merged_dir(cfg, task)
    require_stage_output(source, "merge", task)
    log.warning("export %s edge: the %s adapter failed its gate; export.edge_fallback ships the merged model at %s",
                task.name, precision, fallback)
    try:
        entry = _add_adapter(cfg, task, "merged", source, base, out, fallback,
                             merged_model or (lambda: load_model(source, "cpu")))
    except GateFailed as again:
        _remove_task_files(out, task.name)
        log.error("%s", again)
        return None
    return {**entry, "precision": fallback, "fallback": {"from": precision, "reason": str(failure),
                                                         "metrics": failure.metrics}}


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not allowed: copy
        shutil.copy2(src, dst)


def _build_base(cfg: Config, task: TaskConfig, base: Path, out: Path, precision: str) -> dict:
    """Write the shared base (``model.onnx``) and ``tokenizer.json`` into ``out``; return the manifest header."""
    import onnx

    from exporters.onnx import export_onnx_fp32, load_onnx_model
    from exporters.onnx_lora import add_lora_inputs
    from pipeline.fidelity import gate

    tokenizer = load_tokenizer(base)
    base_model = load_model(base, "cpu")
    with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as work:
        fp32 = export_onnx_fp32(base, Path(work) / "fp32")
        model = onnx.load(str(fp32 / "model.onnx"))
        add_lora_inputs(model)
        onnx.save_model(model, str(Path(work) / "lora.onnx"))
        del model
        # one base for every task: calibrated on all of their training rows
        quantize_onnx(cfg, precision, Path(work) / "lora.onnx", out / "model.onnx",
                      calibrate=(base_model, tokenizer, list(cfg.tasks)))
    shutil.copy2(base / "tokenizer.json", out / "tokenizer.json")
    if tokenizer.chat_template:  # for multi-message chats on the server's ONNX backend
        (out / "chat_template.jinja").write_text(tokenizer.chat_template)
    exported = load_onnx_model(out, set_threads(cfg.num_threads), providers=onnx_providers(cfg.providers))
    fidelity = gate(cfg, task, precision, base_model, exported, tokenizer, f"edge base ({task.name} rows)",
                    logits=False)
    context = int(getattr(base_model.config, "max_position_embeddings", 2048))
    fidelity["fused"] = add_fused(cfg, task, out / "model.onnx", base_model, tokenizer, precision,
                                  f"edge base ({task.name} rows)", context_length=context, logits=False)
    return {"base_name": Path(cfg.base).name if Path(cfg.base).exists() else cfg.base,
            "model": "model.onnx", "tokenizer": "tokenizer.json", "chat": _chat_format(tokenizer),
            "stop_token_ids": _stop_ids(base, tokenizer), "pad_token_id": tokenizer.pad_token_id,
            "context_length": context,
            "base_fidelity": fidelity, "recipe": _settings(cfg)}


def _chat_format(tokenizer) -> dict[str, str]:
    """The chat template rendered around one user turn, as a fixed prefix and suffix.

    A device then needs no template engine: ``prefix + prompt + suffix`` is exactly what the
    template renders for a single user message (default system prompt included) ready for the answer.
    """
    if not tokenizer.chat_template:
        return {"prefix": "", "suffix": "\n"}  # the pipeline's plain-text prompt format
    text = tokenizer.apply_chat_template([{"role": "user", "content": _SENTINEL}], tokenize=False,
                                         add_generation_prompt=True)
    if text.count(_SENTINEL) != 1:
        raise EdgetuneError("the chat template does not place the user message exactly once; the edge bundle "
                            "cannot precompute it")
    prefix, suffix = text.split(_SENTINEL)
    return {"prefix": prefix, "suffix": suffix}


def _stop_ids(base: Path, tokenizer) -> list[int]:
    """Tokens that end an answer: the tokenizer's end token and the generation config's."""
    ids = {tokenizer.eos_token_id}
    generation = base / "generation_config.json"
    if generation.is_file():
        eos = json.loads(generation.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos])
    return sorted(i for i in ids if i is not None)


def _add_adapter(cfg: Config, task: TaskConfig, kind: str, source: Path, base: Path, out: Path,
                 precision: str, merged_model: Callable[[], Any]) -> dict:
    """Write ``task``'s adapter file into ``out`` and gate it against its PyTorch model; the manifest entry."""
    from edge.runtime import Decoder
    from exporters.onnx import OnnxCausalLM
    from pipeline.fidelity import gate

    threads, providers = set_threads(cfg.num_threads), onnx_providers(cfg.providers)
    tokenizer = load_tokenizer(base)
    if kind == "lora":
        from exporters.onnx_lora import LoraExportError, write_onnx_adapter

        rel = f"adapters/{task.name}.onnx_adapter"
        (out / "adapters").mkdir(exist_ok=True)
        try:
            write_onnx_adapter(source, out / rel)
        except LoraExportError as exc:
            raise EdgetuneError(f"export {task.name} edge: {exc}") from exc
        decoder = Decoder(out / "model.onnx", threads=threads, providers=providers, fused=False)
        decoder.load_adapter(task.name, out / rel)
        export_model, torch_model = OnnxCausalLM(decoder, adapter=task.name), load_tuned(source, base)
    elif kind == "prefix":
        from edge.session import Prefix
        from exporters.kv_prefix import adapter_prefix, save_prefix

        rel = f"adapters/{task.name}.prefix.npz"
        (out / "adapters").mkdir(exist_ok=True)
        save_prefix(adapter_prefix(source, base), out / rel)
        decoder = Decoder(out / "model.onnx", threads=threads, providers=providers, fused=False)
        export_model = OnnxCausalLM(decoder, prefix=Prefix.load(out / rel))
        torch_model = load_tuned(source, base)
    else:
        rel = f"merged/{task.name}.onnx"
        (out / "merged").mkdir(exist_ok=True)
        torch_model = merged_model()
        with tempfile.TemporaryDirectory(dir=out, prefix=".work-") as work:
            quantize_onnx(cfg, precision, fp32_onnx(cfg, task, Path(work) / "fp32") / "model.onnx", out / rel,
                          calibrate=(torch_model, tokenizer, [task]))
        export_model = OnnxCausalLM(Decoder(out / rel, threads=threads, providers=providers, fused=False))
    what = f"{task.name} edge"
    fidelity = gate(cfg, task, precision, torch_model, export_model, tokenizer, what)
    if kind == "merged":  # its own model: its own sidecar
        context = int(getattr(torch_model.config, "max_position_embeddings", 2048))
        fidelity["fused"] = add_fused(cfg, task, out / rel, torch_model, tokenizer, precision, what,
                                      context_length=context)
    elif (out / "model.fused.onnx").is_file():  # the shared base's sidecar decodes this adapter: gated on it too
        fused = Decoder(out / "model.onnx", threads=threads)
        if kind == "lora":
            fused.load_adapter(task.name, out / rel)
        metrics = gate(cfg, task, precision, torch_model, OnnxCausalLM(fused, adapter=export_model.adapter,
                                                                       prefix=export_model.prefix),
                       tokenizer, f"{what} fused")
        fidelity["fused"] = {"file": "model.fused.onnx", **metrics}
    return {"kind": kind, "file": rel, "fidelity": fidelity}
