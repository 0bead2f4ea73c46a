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
from pipeline.calibration import calibration_inputs, layer_hessians, recipe
from pipeline.config import Config, TaskConfig
from pipeline.device import resolve_device, set_threads
from pipeline.models import load_model, load_tokenizer, resolve_base
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


def _quantize(cfg: Config, src: Path, out: Path, fmt: str, stage_input: str, what: str, force: bool, device: str,
              calibration: list[TaskConfig], **extra) -> Path:
    """Quantize the HF model folder ``src`` on ``device`` into ``out`` unless an identical result exists.

    NF4 with ``quantize.nf4_method: gptq`` chooses its codes by GPTQ on ``calibration``'s training rows."""
    from exporters.bnb import quantize_to_dir

    gptq = fmt == "nf4" and cfg.quantize.nf4_method == "gptq"
    recipe = nf4_recipe(cfg) if fmt == "nf4" else fmt
    sources = {stage_input: src, **(calibration_inputs(cfg, calibration) if gptq else {})}
    fp, inputs = fingerprint("quantize", sources, f"{fmt}:{recipe}")
    if not force and is_fresh(out, fp):
        log.info("quantize %s %s: up to date (%s), nothing to do; --force redoes it", what, fmt, out)
        return out
    log.info("quantize %s: %s with bitsandbytes on %s%s", what, fmt, device,
             f", codes by GPTQ on the training rows of {', '.join(t.name for t in calibration)}" if gptq else "")
    with atomic_dir(out) as tmp:
        quantize_to_dir(src, tmp, fmt, device, refine=_gptq_refiner(cfg, src, calibration) if gptq else None)
        write_manifest(tmp, stage="quantize", fp=fp, inputs=inputs, config_hash=f"{fmt}:{recipe}",
                       extra={"format": fmt, "kind": "merged", "device": device, "recipe": recipe, **extra})
    return out


def nf4_recipe(cfg: Config) -> str:
    """How NF4 codes are chosen (manifest and fingerprint)."""
    return recipe(cfg.quantize.nf4_method, cfg)


def _gptq_refiner(cfg: Config, src: Path, calibration: list[TaskConfig]):
    """``refine(model)`` for :func:`exporters.bnb.quantize_to_dir`: GPTQ codes against ``src``'s fp32 weights."""
    def refine(quantized) -> None:
        import time

        from exporters.gptq import gptq_bnb_4bit

        reference = load_model(src, "cpu")
        hessians = layer_hessians(cfg, reference, calibration, load_tokenizer(src))
        started = time.perf_counter()
        done = gptq_bnb_4bit(quantized, reference, hessians)
        log.info("quantize: GPTQ chose the NF4 codes of %d layers in %.0f s", len(done), time.perf_counter() - started)

    return refine


def _merged(cfg: Config, task: TaskConfig, fmt: str, force: bool) -> Path:
    src = merged_dir(cfg, task)
    require_stage_output(src, "merge", task)
    return _quantize(cfg, src, quantized_dir(cfg, task, fmt), fmt, "merged", task.name, force,
                     resolve_device(cfg.device), [task], task=task.name)


def _unmerged(cfg: Config, task: TaskConfig, fmt: str, force: bool) -> Path:
    adapter = adapter_dir(cfg, task)
    require_stage_output(adapter, "tune", task)
    base = resolve_base(cfg.base)
    # The shared base depends only on the base model and the format (its fingerprint): a task's
    # --force redoes the task's artifact, not the base every task shares.
    # one base for every task: calibrated on all of their training rows
    base_q = _quantize(cfg, base, quantized_base_dir(cfg, fmt), fmt, "base", "base", force=False,
                       device=resolve_device(cfg.device), calibration=list(cfg.tasks))
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
