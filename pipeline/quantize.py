"""Stage 3, quantize: bitsandbytes int8 and NF4 artifacts of each task.

Two shapes, chosen per format by ``quantize.unmerged``:
  - merged (default for int8): ``runs/<run>/quantized/<task>-<fmt>/`` is a serialized
    bitsandbytes checkpoint of the merged model; ``AutoModelForCausalLM.from_pretrained`` loads
    it (the quantization config travels in config.json).
  - unmerged (default for NF4): the base is quantized once per run into
    ``runs/<run>/quantized/base-<fmt>/`` and ``<task>-<fmt>/`` holds the task's adapter, applied
    in full precision on top (QLoRA-style inference). Rounding merged weights to 4 bits erases
    much of a small LoRA delta; keeping the delta separate preserves it, and one quantized base
    serves every task. Prompt-learning adapters (prompt, ptuning, prefix) cannot be merged, so
    every format takes this shape for them.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.artifacts import atomic_dir, fingerprint, is_fresh, write_manifest
from pipeline.config import Config, TaskConfig
from pipeline.device import resolve_device, set_threads
from pipeline.models import resolve_base
from pipeline.paths import adapter_dir, merged_dir, quantized_base_dir, quantized_dir
from pipeline.stage_outputs import copy_adapter, require_stage_output, tuned_spec

log = logging.getLogger(__name__)


def run(cfg: Config, task: TaskConfig, *, force: bool = False) -> list[Path]:
    """Write every configured quantized format of ``task``; return their folders."""
    set_threads(cfg.num_threads)
    # A whole model (full, ULMFiT) or a PIR delta has no PEFT adapter to keep apart: it is quantized
    # merged. A prompt-learning adapter cannot be merged: every format is quantized base + adapter.
    spec = tuned_spec(cfg, task)
    has_adapter, mergeable = spec.peft, spec.mergeable
    if not mergeable:
        log.info("quantize %s: the adapter cannot be merged; each format is the quantized base plus the adapter",
                 task.name)
    return [(_unmerged if not mergeable or (fmt in cfg.quantize.unmerged and has_adapter) else _merged)(
            cfg, task, fmt, force) for fmt in cfg.quantize.formats]


def _quantize(src: Path, out: Path, fmt: str, stage_input: str, what: str, force: bool, device: str,
              **extra) -> Path:
    """Quantize the HF model folder ``src`` on ``device`` into ``out`` unless an identical result exists."""
    from exporters.bnb import quantize_to_dir

    fp, inputs = fingerprint("quantize", {stage_input: src}, fmt)
    if not force and is_fresh(out, fp):
        log.info("quantize %s %s: up to date (%s), nothing to do; --force redoes it", what, fmt, out)
        return out
    log.info("quantize %s: %s with bitsandbytes on %s", what, fmt, device)
    with atomic_dir(out) as tmp:
        quantize_to_dir(src, tmp, fmt, device)
        write_manifest(tmp, stage="quantize", fp=fp, inputs=inputs, config_hash=fmt,
                       extra={"format": fmt, "kind": "merged", "device": device, **extra})
    return out


def _merged(cfg: Config, task: TaskConfig, fmt: str, force: bool) -> Path:
    src = merged_dir(cfg, task)
    require_stage_output(src, "merge", task)
    return _quantize(src, quantized_dir(cfg, task, fmt), fmt, "merged", task.name, force,
                     resolve_device(cfg.device), task=task.name)


def _unmerged(cfg: Config, task: TaskConfig, fmt: str, force: bool) -> Path:
    adapter = adapter_dir(cfg, task)
    require_stage_output(adapter, "tune", task)
    base = resolve_base(cfg.base)
    # The shared base depends only on the base model and the format (its fingerprint): a task's
    # --force redoes the task's artifact, not the base every task shares.
    base_q = _quantize(base, quantized_base_dir(cfg, fmt), fmt, "base", "base", force=False,
                       device=resolve_device(cfg.device))
    out = quantized_dir(cfg, task, fmt)
    fp, inputs = fingerprint("quantize", {"quantized_base": base_q, "adapter": adapter}, f"{fmt}:unmerged")
    if not force and is_fresh(out, fp):
        log.info("quantize %s %s: up to date (%s), nothing to do; --force redoes it", task.name, fmt, out)
        return out
    with atomic_dir(out) as tmp:
        copy_adapter(adapter, tmp)
        write_manifest(tmp, stage="quantize", fp=fp, inputs=inputs, config_hash=f"{fmt}:unmerged",
                       extra={"task": task.name, "format": fmt, "kind": "unmerged",
                              "quantized_base": str(base_q)})
    log.info("quantize %s %s: adapter on the %s base in %s", task.name, fmt, fmt, base_q)
    return out
