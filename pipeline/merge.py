"""Stage 2, merge: fold a task adapter into the base weights, checked for fidelity.

The merged model must behave like base + adapter: logits on the task's first test prompts are
compared before and after merging (fp32, ``max |Δlogit|`` on ``merge.fidelity_prompts`` prompts must
stay within ``merge.max_abs_logit_diff``), and any NaN/Inf weight rejects the merge; a rejected merge
publishes nothing. Output: ``runs/<run>/merged/<task>/``, a plain HF model
folder (safetensors) with tokenizer and generation config.

LoRA-family adapters merge through PEFT, PIR sparse deltas by adding their values into the
weights; whole models (full, ULMFiT) pass through, checked the same way. Prompt-learning adapters
(prompt, ptuning, prefix) cannot be merged: the stage says so and keeps the adapter as the artifact.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.artifacts import atomic_dir, fingerprint, is_fresh, write_manifest
from pipeline.config import Config, TaskConfig
from pipeline.device import model_device, resolve_device, set_threads, to_model
from pipeline.errors import EdgetuneError
from pipeline.models import load_tokenizer, resolve_base
from pipeline.paths import adapter_dir, merged_dir
from pipeline.scoring import prompt_batch
from pipeline.stage_outputs import remove_stale, require_stage_output, tuned_spec

log = logging.getLogger(__name__)


def run(cfg: Config, task: TaskConfig, *, force: bool = False) -> Path:
    """Merge ``task``'s adapter into the base; return the merged model folder."""
    import torch

    from pipeline.tuned import load_tuned, merge_tuned

    src = adapter_dir(cfg, task)
    manifest = require_stage_output(src, "tune", task)
    out = merged_dir(cfg, task)
    if not tuned_spec(cfg, task).mergeable:
        # Soft prompts and prefixes live in the input/attention, not in a weight: there is nothing
        # to fold. The adapter stays the artifact; quantize and export carry base + adapter.
        log.info("merge %s: method %r learns virtual tokens, which cannot be merged into weights; keeping the "
                 "adapter (%s) as the artifact: quantize and export use the base plus the adapter",
                 task.name, manifest.get("method"), src)
        remove_stale(out, f"merge {task.name}")
        return src
    base = resolve_base(cfg.base)
    gate = cfg.merge
    config_hash = cfg.section_hash("merge")  # a changed gate re-checks the merge
    fp, inputs = fingerprint("merge", {"base": base, "adapter": src}, config_hash)
    if not force and is_fresh(out, fp):
        log.info("merge %s: up to date (%s), nothing to do; --force redoes it", task.name, out)
        return out

    set_threads(cfg.num_threads)
    tokenizer = load_tokenizer(src)
    model = load_tuned(src, base, resolve_device(cfg.device))
    batch = to_model(prompt_batch(tokenizer, task, gate.fidelity_prompts), model)
    with torch.no_grad():
        before = model(**batch).logits
        try:  # a fully fine-tuned model has nothing to merge: it passes through, checked the same way
            merged = merge_tuned(model)
        except ValueError as exc:  # safe_merge refuses NaN deltas
            raise EdgetuneError(f"merge {task.name}: the adapter produces non-finite weights ({exc}); retrain it "
                                "with a lower learning rate") from exc
        bad = [n for n, p in merged.named_parameters() if not torch.isfinite(p).all()]
        if bad:
            raise EdgetuneError(f"merge {task.name}: non-finite values in {bad[:3]}; the adapter is corrupt, retrain it")
        after = merged(**batch).logits
    mask = batch["attention_mask"].bool()
    diff = (before - after).abs()[mask].max().item()
    if diff > gate.max_abs_logit_diff:
        raise EdgetuneError(f"merge {task.name}: merged logits differ from the adapter's by {diff:.2e} "
                            f"(limit merge.max_abs_logit_diff={gate.max_abs_logit_diff:g}); not publishing the "
                            "merged model")
    log.info("merge %s: max |Δlogit| merged vs adapter = %.2e on %d prompts", task.name, diff, len(mask))

    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, stage="merge", fp=fp, inputs=inputs, config_hash=config_hash,
                       metrics={"max_abs_logit_diff_vs_adapter": diff, "fidelity_prompts": int(len(mask))},
                       extra={"task": task.name, "method": manifest.get("method"), "device": str(model_device(model))})
    return out
