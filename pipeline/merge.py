"""Stage 2, merge: fold a task adapter into the base weights, checked for fidelity.

The merged model must behave like base + adapter: logits on the task's first test prompts are
compared before and after merging (fp32, ``max |Δlogit|`` must stay below ``MAX_LOGIT_DIFF``), and
any NaN/Inf weight rejects the merge. Output: ``runs/<run>/merged/<task>/``, a plain HF model
folder (safetensors) with tokenizer and generation config.

LoRA-family adapters merge through PEFT, PIR sparse deltas by adding their values into the
weights; whole models (full, ULMFiT) pass through, checked the same way. Prompt-learning adapters
(prompt, ptuning, prefix) cannot be merged: the stage says so and keeps the adapter as the artifact.
"""

from __future__ import annotations

import logging
from pathlib import Path

from pipeline.artifacts import atomic_dir, fingerprint, is_fresh, read_manifest, write_manifest
from pipeline.config import Config, TaskConfig
from pipeline.data import load_examples, render_prompt
from pipeline.errors import EdgetuneError
from pipeline.models import load_tokenizer, resolve_base, set_threads
from pipeline.tune import adapter_dir

log = logging.getLogger(__name__)

MAX_LOGIT_DIFF = 1e-3
"""fp32 merge fidelity gate: merged vs unmerged logits on the same prompts."""
FIDELITY_PROMPTS = 4


def merged_dir(cfg: Config, task: TaskConfig) -> Path:
    return cfg.run_dir / "merged" / task.name


def require_stage_output(folder: Path, stage: str, task: TaskConfig) -> dict:
    """The manifest of a finished earlier stage, or an error saying which command makes it."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise EdgetuneError(f"{folder} does not exist or is incomplete; run `edgetune {stage}` for task "
                            f"{task.name!r} first (or `edgetune pipeline`)")
    return manifest


def is_mergeable(cfg: Config, task: TaskConfig) -> bool:
    """Whether ``task``'s tune result can be merged into the weights (its manifest says so)."""
    return bool(require_stage_output(adapter_dir(cfg, task), "tune", task).get("mergeable", False))


def remove_stale(folder: Path, what: str) -> None:
    """Delete an artifact an earlier run with another method left where this method publishes none,
    so nothing later picks up a result that does not belong to the current adapter."""
    import shutil

    if folder.exists():
        log.info("%s: removing %s, left by an earlier run with another method", what, folder)
        shutil.rmtree(folder)


def prompt_batch(tokenizer, task: TaskConfig, n: int):
    """A left-padded batch of the first ``n`` test prompts of ``task`` (fixed evaluation prompts)."""
    examples = [e for e in load_examples(task.test) if e.messages][:n]
    texts = [render_prompt(tokenizer, e) for e in examples]
    return tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)


def run(cfg: Config, task: TaskConfig, *, force: bool = False) -> Path:
    """Merge ``task``'s adapter into the base; return the merged model folder."""
    import torch

    from pipeline.tune import load_tuned, merge_tuned

    src = adapter_dir(cfg, task)
    manifest = require_stage_output(src, "tune", task)
    out = merged_dir(cfg, task)
    if not manifest.get("mergeable", False):
        # Soft prompts and prefixes live in the input/attention, not in a weight: there is nothing
        # to fold. The adapter stays the artifact; quantize and export carry base + adapter.
        log.info("merge %s: method %r learns virtual tokens, which cannot be merged into weights; keeping the "
                 "adapter (%s) as the artifact: quantize and export use the base plus the adapter",
                 task.name, manifest.get("method"), src)
        remove_stale(out, f"merge {task.name}")
        return src
    base = resolve_base(cfg.base)
    fp, inputs = fingerprint("merge", {"base": base, "adapter": src}, "")
    if not force and is_fresh(out, fp):
        log.info("merge %s: up to date (%s), nothing to do; --force redoes it", task.name, out)
        return out

    set_threads(cfg.num_threads)
    tokenizer = load_tokenizer(src)
    model = load_tuned(src, base)
    batch = prompt_batch(tokenizer, task, FIDELITY_PROMPTS)
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
    if diff > MAX_LOGIT_DIFF:
        raise EdgetuneError(f"merge {task.name}: merged logits differ from the adapter's by {diff:.2e} "
                            f"(limit {MAX_LOGIT_DIFF:.0e}); not publishing the merged model")
    log.info("merge %s: max |Δlogit| merged vs adapter = %.2e on %d prompts", task.name, diff, len(mask))

    with atomic_dir(out) as tmp:
        merged.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        write_manifest(tmp, stage="merge", fp=fp, inputs=inputs, config_hash="",
                       metrics={"max_abs_logit_diff_vs_adapter": diff, "fidelity_prompts": int(len(mask))},
                       extra={"task": task.name, "method": manifest.get("method")})
    return out
