"""Stage 4, export: deployable files from each merged model.

Targets (``export.targets``):
  - ``safetensors``: the merged model in ``export.safetensors_dtype`` with tokenizer and
    generation config → ``runs/<run>/export/safetensors/<task>/``
  - ``onnx``: ONNX fp32 with KV cache (optimum-onnx), loadable by ``ORTModelForCausalLM``, gated
    on logit parity with the PyTorch model → ``runs/<run>/export/onnx/<task>/``
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.artifacts import atomic_dir, fingerprint, is_fresh, write_manifest
from pipeline.config import Config, TaskConfig
from pipeline.errors import EdgetuneError
from pipeline.merge import (
    FIDELITY_PROMPTS,
    is_mergeable,
    merged_dir,
    prompt_batch,
    remove_stale,
    require_stage_output,
)
from pipeline.models import load_model, load_tokenizer, resolve_base, set_threads
from pipeline.tune import adapter_dir, copy_adapter

log = logging.getLogger(__name__)

ONNX_SKIP_REASON = ("the method learns virtual tokens (soft prompt or key/value prefix), which cannot be merged into "
                    "the weights, and the exported ONNX decoder does not take them yet; use the safetensors bundle "
                    "(base + adapter) or the int8/NF4 artifacts")


def export_dir(cfg: Config, task: TaskConfig, target: str) -> Path:
    return cfg.run_dir / "export" / target / task.name


def run(cfg: Config, task: TaskConfig, *, force: bool = False) -> list[Path]:
    """Write every configured export target for ``task``; return their folders."""
    mergeable = is_mergeable(cfg, task)
    src = merged_dir(cfg, task) if mergeable else adapter_dir(cfg, task)
    require_stage_output(src, "merge" if mergeable else "tune", task)
    set_threads(cfg.num_threads)
    outs = []
    for target in cfg.export.targets:
        out = export_dir(cfg, task, target)
        if not mergeable and target == "onnx":
            log.warning("export %s: onnx skipped: %s", task.name, ONNX_SKIP_REASON)
            remove_stale(out, f"export {task.name}")
            continue
        settings = cfg.export.safetensors_dtype if target == "safetensors" else str(cfg.export.onnx_max_abs_logit_diff)
        fp, inputs = fingerprint("export", {"merged" if mergeable else "adapter": src}, f"{target}:{settings}")
        outs.append(out)
        if not force and is_fresh(out, fp):
            log.info("export %s %s: up to date (%s), nothing to do; --force redoes it", task.name, target, out)
            continue
        log.info("export %s: %s", task.name, target)
        with atomic_dir(out) as tmp:
            metrics = _EXPORTERS[target](cfg, task, src, tmp)
            write_manifest(tmp, stage="export", fp=fp, inputs=inputs, config_hash=settings, metrics=metrics,
                           extra={"task": task.name, "target": target})
    return outs


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


def _export_onnx(cfg: Config, task: TaskConfig, src: Path, out: Path) -> dict:
    from exporters.onnx import export_onnx_fp32, load_onnx_model, logit_parity

    export_onnx_fp32(src, out)
    tokenizer = load_tokenizer(src)
    batch = prompt_batch(tokenizer, task, FIDELITY_PROMPTS)
    parity = logit_parity(load_model(src, "cpu"), load_onnx_model(out, set_threads(cfg.num_threads)),
                          batch["input_ids"], batch["attention_mask"])
    limit = cfg.export.onnx_max_abs_logit_diff
    if parity["max_abs_logit_diff"] > limit:
        raise EdgetuneError(f"export {task.name}: ONNX fp32 logits differ from PyTorch by "
                            f"{parity['max_abs_logit_diff']:.2e} (gate {limit:.0e}); the export is not published")
    log.info("export %s: ONNX parity max |Δlogit| %.2e, top-1 agreement %.3f", task.name,
             parity["max_abs_logit_diff"], parity["top1_agreement"])
    return parity


_EXPORTERS = {"safetensors": _export_safetensors, "onnx": _export_onnx}
