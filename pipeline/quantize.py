"""Stage 3, quantize: bitsandbytes int8 and NF4 checkpoints of each merged model.

Output: ``runs/<run>/quantized/<task>-<fmt>/``, serialized bitsandbytes checkpoints that
``AutoModelForCausalLM.from_pretrained`` loads (the quantization config travels in config.json).
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.artifacts import atomic_dir, fingerprint, is_fresh, write_manifest
from pipeline.config import Config, TaskConfig
from pipeline.merge import merged_dir, require_stage_output
from pipeline.models import set_threads

log = logging.getLogger(__name__)


def quantized_dir(cfg: Config, task: TaskConfig, fmt: str) -> Path:
    return cfg.run_dir / "quantized" / f"{task.name}-{fmt}"


def run(cfg: Config, task: TaskConfig, *, force: bool = False) -> list[Path]:
    """Write every configured quantized format of ``task``'s merged model; return their folders."""
    from exporters.bnb import quantize_to_dir

    src = merged_dir(cfg, task)
    require_stage_output(src, "merge", task)
    set_threads(cfg.num_threads)
    outs = []
    for fmt in cfg.quantize.formats:
        out = quantized_dir(cfg, task, fmt)
        fp, inputs = fingerprint("quantize", {"merged": src}, fmt)
        outs.append(out)
        if not force and is_fresh(out, fp):
            log.info("quantize %s %s: up to date (%s), nothing to do; --force redoes it", task.name, fmt, out)
            continue
        log.info("quantize %s: %s with bitsandbytes", task.name, fmt)
        with atomic_dir(out) as tmp:
            quantize_to_dir(src, tmp, fmt)
            write_manifest(tmp, stage="quantize", fp=fp, inputs=inputs, config_hash=fmt,
                           extra={"task": task.name, "format": fmt})
    return outs
