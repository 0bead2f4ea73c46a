"""Stage 4, export: deployable files for each task, each checked against its PyTorch source.

Targets (``export.targets``):
  - ``safetensors``: the merged model in ``export.safetensors_dtype`` with tokenizer and
    generation config → ``runs/<run>/export/safetensors/<task>/`` (an unmergeable adapter: the
    base plus ``adapter/``). The bitsandbytes int8/NF4 checkpoints come from the quantize stage.
  - ``onnx``, ``onnx-int8``, ``onnx-int4``: the merged model as an ONNX decoder with KV cache in
    fp32, int8 or int4 (weight-only MatMulNBits, embedding and tied head included) →
    ``runs/<run>/export/<target>/<task>/model.onnx`` plus tokenizer files.
  - ``gguf``: llama.cpp/Ollama files (:mod:`pipeline.gguf_build`): the merged model at each of
    ``export.gguf_types``, a LoRA task's adapter over the run's shared GGUF base, Modelfiles; each file
    gated on its own (one that fails is left out, the others published).
  - ``edge``: the run's edge bundle (:mod:`pipeline.bundle`): one base, every task's adapter.

Every ONNX export passes the fidelity gate of its precision (:mod:`pipeline.fidelity`) inside a
temporary folder first. One that fails is not published (an earlier file of that target is removed:
it no longer matches what this config accepts), and the stage goes on with the other targets and
tasks; the run then ends with exit status 3, "completed with failed gates"
(:data:`pipeline.errors.EXIT_FAILED_GATES`), after the report lists the failure with its numbers.

When every configured target of a task is done, ``runs/<run>/export/records/<task>.json`` records
which were written where, which were skipped and why (a prompt-learning adapter has no ONNX merged
export), and which failed their gate, with the reason and the measurements; evaluate reads them there.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from exporters.gguf import GGUFExportError
from pipeline.artifacts import atomic_dir, fingerprint, is_fresh, read_manifest, write_manifest
from pipeline.calibration import calibration_inputs
from pipeline.config import ONNX_PRECISIONS, Config, TaskConfig
from pipeline.device import onnx_providers, set_threads
from pipeline.errors import GateFailed
from pipeline.models import load_model, load_tokenizer, resolve_base
from pipeline.onnx_build import add_fused, export_settings, fp32_onnx, int4_recipe, quantize_onnx
from pipeline.paths import adapter_dir, export_dir, merged_dir
from pipeline.stage_outputs import (
    copy_adapter,
    remove_stale,
    require_stage_output,
    tuned_spec,
    write_export_record,
)

log = logging.getLogger(__name__)

GGUF_SKIP_REASON = ("the method learns virtual tokens (soft prompt or key/value prefix), which neither a merged GGUF "
                    "nor a llama.cpp adapter can hold; serve it from the edge bundle or the PyTorch server")
ONNX_SKIP_REASON = ("the method learns virtual tokens (soft prompt or key/value prefix), which cannot be merged into "
                    "the weights; on ONNX it runs from the edge bundle, as a key/value prefix over the shared base")


def run(cfg: Config, task: TaskConfig, *, force: bool = False) -> list[Path]:
    """Write every configured export target for ``task``; return their folders."""
    mergeable = tuned_spec(cfg, task).mergeable
    src = merged_dir(cfg, task) if mergeable else adapter_dir(cfg, task)
    require_stage_output(src, "merge" if mergeable else "tune", task)
    set_threads(cfg.num_threads)
    outs = []
    loaded = []
    exported: dict[str, str] = {}
    skipped: dict[str, str] = {}
    failed: dict[str, dict[str, Any]] = {}

    def merged_model():
        """The PyTorch merged model every ONNX target of this task is gated against: loaded once, on first use."""
        if not loaded:
            loaded.append(load_model(src, "cpu"))
        return loaded[0]

    # fp32 ONNX first: the quantized targets start from it.
    for target in sorted(cfg.export.targets, key=lambda t: (t == "edge", t.startswith("onnx-"))):
        if target == "edge":
            from pipeline.bundle import add_task

            try:
                outs.append(add_task(cfg, task, force=force, merged_model=merged_model if mergeable else None))
                exported[target] = str(outs[-1])
            except GateFailed as exc:
                failed[target] = _failure(task, target, exc)
            continue
        out = export_dir(cfg, task, target)
        if not mergeable and (target in ONNX_PRECISIONS or target == "gguf"):
            reason = ONNX_SKIP_REASON if target != "gguf" else GGUF_SKIP_REASON
            log.info("export %s: %s skipped: %s", task.name, target, reason)
            remove_stale(out, f"export {task.name}")
            skipped[target] = reason
            continue
        sources = {"merged" if mergeable else "adapter": src}
        if target in ("onnx-int4", "gguf") and cfg.export.int4_method == "gptq":  # calibrated on the task's training rows
            sources.update(calibration_inputs(cfg, [task]))
        if target == "gguf":
            sources.update(adapter=adapter_dir(cfg, task), base=resolve_base(cfg.base))
        fp, inputs = fingerprint("export", sources, export_settings(cfg, target))
        outs.append(out)
        exported[target] = str(out)
        if not force and is_fresh(out, fp):
            log.info("export %s %s: up to date (%s), nothing to do; --force redoes it", task.name, target, out)
            done = (read_manifest(out) or {}).get("metrics", {})
            failed.update(done.get("failed", {}))  # gguf files left out
            if done.get("adapter_base"):  # the shared base its adapter runs on: rewritten if missing or stale
                from pipeline.gguf_build import base_gguf

                base_gguf(cfg)
            continue
        log.info("export %s: %s", task.name, target)
        try:
            with atomic_dir(out) as tmp:
                if target == "gguf":
                    metrics = _export_gguf(cfg, task, merged_model, tmp, failed)
                else:
                    metrics = _export_safetensors(cfg, task, src, tmp) if target == "safetensors" else \
                        _export_onnx(cfg, task, merged_model, tmp, target)
                write_manifest(tmp, stage="export", fp=fp, inputs=inputs, config_hash=export_settings(cfg, target),
                               metrics=metrics, extra={"task": task.name, "target": target})
        except GateFailed as exc:
            outs.pop()
            del exported[target]
            remove_stale(out, f"export {task.name} {target}", why="it failed the gate this config sets")
            failed[target] = _failure(task, target, exc)
        except GGUFExportError as exc:  # a family or tokenizer GGUF export does not write: the other targets go on
            outs.pop()
            del exported[target]
            log.warning("export %s: gguf skipped: %s", task.name, exc)
            remove_stale(out, f"export {task.name} {target}")
            skipped[target] = str(exc)
    write_export_record(cfg, task, exported, skipped, failed)
    return outs


def _failure(task: TaskConfig, target: str, exc: GateFailed) -> dict[str, Any]:
    """The export record's entry for a target that failed its gate (logged: the run goes on)."""
    log.error("%s; the run goes on without it and will end with exit status 3", exc)
    return {"reason": str(exc), "metrics": exc.metrics}


def _export_safetensors(cfg: Config, task: TaskConfig, src: Path, out: Path) -> dict:
    """The merged model in the configured dtype; for an unmergeable adapter, the base plus ``adapter/``."""
    import torch

    dtype = getattr(torch, cfg.export.safetensors_dtype)
    adapter = src == adapter_dir(cfg, task)  # run() passes the adapter itself when it cannot be merged
    model = load_model(resolve_base(cfg.base) if adapter else src, "cpu", dtype=dtype)
    model.save_pretrained(out, safe_serialization=True)
    load_tokenizer(src).save_pretrained(out)
    if adapter:
        copy_adapter(src, out / "adapter")
    return {"dtype": cfg.export.safetensors_dtype, "kind": "base+adapter" if adapter else "merged"}


def _export_gguf(cfg: Config, task: TaskConfig, merged_model: Callable[[], Any], out: Path,
                 failed: dict[str, dict[str, Any]]) -> dict:
    """The task's GGUF files (:mod:`pipeline.gguf_build`); files that fail their gate go into ``failed``. Raises
    :class:`GateFailed` when none passed (nothing is published)."""
    from pipeline.gguf_build import export_gguf

    metrics, failures = export_gguf(cfg, task, merged_dir(cfg, task), merged_model, adapter_dir(cfg, task),
                                    tuned_spec(cfg, task).kind, out)
    failed.update(failures)
    metrics["failed"] = failures  # kept in the manifest: an up-to-date re-run still reports them
    if not metrics["files"]:
        failures = {k: v for k, v in failed.items() if k.startswith("gguf:")}
        raise GateFailed(f"export {task.name} gguf: every GGUF file failed its gate ({', '.join(failures)})",
                         {"files": failures})
    return metrics


def _export_onnx(cfg: Config, task: TaskConfig, merged_model: Callable[[], Any], out: Path, target: str) -> dict:
    """The merged model as ONNX at the target's precision, gated against the PyTorch merged model
    (``merged_model()`` returns it)."""
    src = merged_dir(cfg, task)
    from exporters.onnx import TOKENIZER_FILES, export_onnx_fp32, load_onnx_model
    from pipeline.fidelity import gate

    precision = ONNX_PRECISIONS[target]
    if precision == "fp32":
        export_onnx_fp32(src, out)
    else:
        scratch = out / ".fp32"
        fp32 = fp32_onnx(cfg, task, scratch)
        quantize_onnx(cfg, precision, fp32 / "model.onnx", out / "model.onnx",
                      calibrate=(merged_model(), load_tokenizer(src), [task]))
        for name in (*TOKENIZER_FILES, "config.json"):
            if (fp32 / name).is_file():
                shutil.copy2(fp32 / name, out / name)
        shutil.rmtree(scratch, ignore_errors=True)
    exported = load_onnx_model(out, set_threads(cfg.num_threads), providers=onnx_providers(cfg.providers))
    tokenizer = load_tokenizer(src)
    metrics = gate(cfg, task, precision, merged_model(), exported, tokenizer, f"{task.name} {target}")
    context = int(getattr(merged_model().config, "max_position_embeddings", 2048))
    metrics["fused"] = add_fused(cfg, task, out / "model.onnx", merged_model(), tokenizer, precision,
                                 f"{task.name} {target}", context_length=context)
    return {**metrics, "recipe": int4_recipe(cfg)} if precision == "int4" else metrics

