"""The calibration text of 4-bit weights, and the layer statistics GPTQ needs from it.

One place decides what 4-bit weights are calibrated on, for every artifact that is: the ONNX int4
export of a task's merged model (the task's own training rows), the edge bundle's shared base and
the shared NF4 base (every task's training rows, shared evenly). Test rows are never used: the
held-out scores stay held out.
"""

from __future__ import annotations

import logging
import os
import random
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from pipeline.config import Config, TaskConfig
from pipeline.data import left_padded, load_examples, render_prompt
from pipeline.errors import EdgetuneError

log = logging.getLogger(__name__)

__all__ = ["calibration_inputs", "calibration_texts", "layer_hessians", "recipe"]


def calibration_texts(cfg: Config, tasks: Sequence[TaskConfig], tokenizer) -> list[str]:
    """``cfg.calibration.rows`` training rows of ``tasks`` (shared evenly, seeded by ``cfg.seed``) rendered as the
    model reads them: prompt, reference answer, end token. Rows without a reference count as their text."""
    if not tasks:
        raise EdgetuneError("calibration needs at least one task")
    per_task = max(1, cfg.calibration.rows // len(tasks))
    texts = []
    for task in tasks:
        rows = load_examples(task.train)
        random.Random(f"{cfg.seed}:{task.name}").shuffle(rows)
        for example in rows[:per_task]:
            if example.reference is not None:
                texts.append(render_prompt(tokenizer, example) + example.reference + (tokenizer.eos_token or ""))
            elif example.text:
                texts.append(example.text)
    if not texts:
        raise EdgetuneError(f"the training files of {', '.join(t.name for t in tasks)} have no rows to calibrate "
                            "4-bit weights on; set export.int4_method=rtn and quantize.nf4_method=rtn")
    return texts


def calibration_inputs(cfg: Config, tasks: Sequence[TaskConfig]) -> dict[str, Path]:
    """The files calibration reads, for the fingerprint of what it makes: a changed train file re-calibrates."""
    return {f"calibration:{t.name}": Path(t.train) for t in tasks}


def recipe(method: str, cfg: Config) -> str:
    """What a calibrated artifact depends on besides its inputs (part of its fingerprint and manifest)."""
    if method == "rtn":
        return "rtn"
    c = cfg.calibration
    return f"{method}:rows={c.rows}:seed={cfg.seed}:damp=0.01:act_order"


def _batches(rows: list[list[int]], opening: int, size: int) -> Iterator[dict[str, Any]]:
    """``rows`` (token ids) without their first ``opening`` tokens, ``size`` at a time, left-padded, with
    position ids that count on after the opening."""
    for i in range(0, len(rows), size):
        yield left_padded([r[opening:] for r in rows[i:i + size]])


_CACHE: dict[tuple, dict[str, Any]] = {}
"""The last two measurements in this process: the shared base is calibrated for NF4 (quantize) and for the
edge bundle (export) on the same rows, and a task's merged model for its int4 export and its edge entry."""


def layer_hessians(cfg: Config, model, tasks: Sequence[TaskConfig], tokenizer) -> dict[str, Any]:
    """``H = E[x xᵀ]`` of every ``nn.Linear``'s input in ``model`` on the calibration text of ``tasks``.

    Measured once per process for a model folder (its manifest fingerprint when it has one) and rows."""
    import time

    import torch

    from exporters.gptq import calibration_hessians
    from pipeline.artifacts import read_manifest

    source = str(getattr(model, "name_or_path", "") or "")
    texts = calibration_texts(cfg, tasks, tokenizer)
    key = (source, (read_manifest(Path(source)) or {}).get("fingerprint") if source else None, tuple(texts),
           cfg.calibration.batch_size, cfg.tune.max_seq_len)
    if source and key in _CACHE:
        _CACHE[key] = _CACHE.pop(key)  # most recently used last
        return _CACHE[key]
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    started = time.perf_counter()
    rows = [tokenizer(t, truncation=True, max_length=cfg.tune.max_seq_len, add_special_tokens=False)["input_ids"]
            for t in texts]
    # the opening the rows share (system turn; a task's instruction) is measured once, counted once per row
    opening = min(len(os.path.commonprefix(rows)), min(map(len, rows)) - 1) if len(rows) > 1 else 0
    hessians = calibration_hessians(model, _batches(rows, opening, cfg.calibration.batch_size), names,
                                    opening=torch.tensor([rows[0][:opening]]) if opening else None,
                                    opening_rows=len(rows))
    log.info("calibration: inputs of %d layers measured on %d training rows of %s in %.0f s (their shared %d "
             "opening tokens once)", len(hessians), len(texts), ", ".join(t.name for t in tasks),
             time.perf_counter() - started, opening)
    if source:
        _CACHE[key] = hessians
        while len(_CACHE) > 2:
            _CACHE.pop(next(iter(_CACHE)))
    return hessians
