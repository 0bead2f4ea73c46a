"""Fidelity gates: an export is checked against the PyTorch model it came from before it is published.

On the first ``export.fidelity_rows`` held-out rows of the task (prompt + reference answer, fixed
for a given test file) it measures, at the positions that predict the reference answer (and its end
token), max |Δlogit|, top-1 agreement and mean KL(PyTorch || export), plus the exact match of both
models' greedy answers (the export's read from the argmax chain of that same comparison where it is the
reference, decoded elsewhere), then applies ``export.gates.<precision>``. Answer positions, not the whole
prompt: that is what the task asks of the model, and a 4-bit 135M model reshuffles its guesses
inside a long generic system prompt (mean KL above 1 nat there) while its answers hold.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

from pipeline.config import Config, TaskConfig
from pipeline.data import IGNORE_INDEX, load_examples, shared_prefix
from pipeline.errors import EdgetuneError, GateFailed

log = logging.getLogger(__name__)

_TORCH_SCORES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""PyTorch model -> {(task, test file, rows, max_new_tokens): exact match}; entries go with the model."""
_TORCH_LOGITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""PyTorch model -> {(row ids, scored positions): its logits there} (see exporters.onnx.logit_parity)."""


def fidelity_examples(cfg: Config, task: TaskConfig) -> list:
    """The held-out rows every export of ``task`` is checked on (those with a reference answer)."""
    rows = [e for e in load_examples(task.test) if e.reference is not None][: cfg.export.fidelity_rows]
    if not rows:
        raise EdgetuneError(f"export {task.name}: {task.test} has no rows with a reference answer to check exports "
                            "against; add prompt/completion or messages rows to the test file")
    return rows


def measure(cfg: Config, task: TaskConfig, torch_model, export_model, tokenizer) -> dict[str, Any]:
    """Logit and task-score agreement of ``export_model`` (an OnnxCausalLM) with ``torch_model``."""
    import torch

    from exporters.onnx import logit_parity
    from pipeline.scoring import (
        AnswerPass,
        confident_argmax,
        exact_match,
        greedy_reproduces,
        reference_rows,
    )

    rows = fidelity_examples(cfg, task)
    encoded, answers = reference_rows(tokenizer, rows, cfg.tune.max_seq_len)
    width = max(len(r["input_ids"]) for r in encoded)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    answer = torch.zeros_like(ids, dtype=torch.bool)
    for i, (row, ans) in enumerate(zip(encoded, answers)):
        n = len(row["input_ids"])
        ids[i, width - n:] = torch.tensor(row["input_ids"])  # left padding: the answer and end token come last
        mask[i, width - n:] = 1
        # the answer's positions (predicted from one position earlier); a row without a usable answer is
        # compared on its target tokens
        k = len(ans) if ans else sum(label != IGNORE_INDEX for label in row["labels"])
        answer[i, width - k - 1:width - 1] = True
    # the same PyTorch model is the reference of several exports (ONNX fp32/int8/int4, edge, GGUF): its
    # answer-position logits are computed once
    reference = _TORCH_LOGITS.setdefault(torch_model, {})
    predicted: list = []
    # the opening every row shares (system turn, instruction) runs once, in the export and in the reference
    metrics: dict[str, Any] = logit_parity(torch_model, export_model, ids, mask, answer, reference=reference,
                                           predictions=predicted, opening=shared_prefix(encoded))
    size = max(1, min(cfg.evaluate.batch_size, len(rows)))
    # the same PyTorch model is the reference of several exports (fp32, int8, int4, edge): score it once
    key = (task.name, task.test, len(rows), task.max_new_tokens)
    scores = _TORCH_SCORES.setdefault(torch_model, {})
    if key not in scores:
        scores[key], _ = exact_match(torch_model, tokenizer, rows, task.max_new_tokens, size, desc=f"{task.name}/torch",
                                     max_len=cfg.tune.max_seq_len)
    score_torch = scores[key]
    # the export's greedy answers: read from the argmax chain the comparison above already computed (a row
    # that is the reference then the end token needs no decoding: scoring.exact_match); the rest are decoded
    verdicts = [greedy_reproduces(tokenizer, ans, [p == t for p, t in zip(confident_argmax(got).tolist(), ans)],
                                  task.max_new_tokens) if ans else (None, None) for got, ans in zip(predicted, answers)]
    checked = AnswerPass(0.0, 0, [v[0] for v in verdicts], [v[1] for v in verdicts])
    score_export, _ = exact_match(export_model, tokenizer, rows, task.max_new_tokens, size, desc=f"{task.name}/onnx",
                                  checked=checked)
    metrics.update(score_torch=score_torch, score_export=score_export, score_drop=score_torch - score_export,
                   rows=len(rows))
    return {k: round(v, 6) if isinstance(v, float) else v for k, v in metrics.items()}


def check(cfg: Config, precision: str, metrics: dict[str, Any], what: str, *, logits: bool = True) -> None:
    """Raise :class:`GateFailed` naming every gate ``metrics`` fail for ``precision``.

    ``logits=False`` applies only the task-score gate (the bare base of the edge bundle: it was not
    trained for the task, so its answer-position logits are low-confidence guesses that quantization
    reorders; the adapters on top of it are gated in full).
    """
    gate = getattr(cfg.export.gates, precision)
    failed = []
    if not logits:
        gate = gate.model_copy(update={"max_abs_logit_diff": None, "min_top1_agreement": 0.0, "max_kl": None})
    if gate.max_abs_logit_diff is not None and metrics["max_abs_logit_diff"] > gate.max_abs_logit_diff:
        failed.append(f"max |Δlogit| {metrics['max_abs_logit_diff']:.3g} > {gate.max_abs_logit_diff:g} (max_abs_logit_diff)")
    if metrics["top1_agreement"] < gate.min_top1_agreement:
        failed.append(f"top-1 agreement {metrics['top1_agreement']:.3f} < {gate.min_top1_agreement:g} (min_top1_agreement)")
    if gate.max_kl is not None and metrics["kl"] > gate.max_kl:
        failed.append(f"KL {metrics['kl']:.3g} > {gate.max_kl:g} (max_kl)")
    if metrics["score_drop"] > gate.max_score_drop + 1e-9:
        failed.append(f"exact match {metrics['score_export']:.3f} vs PyTorch {metrics['score_torch']:.3f}, a drop of "
                      f"{metrics['score_drop']:.3f} > {gate.max_score_drop:g} (max_score_drop)")
    if failed:
        raise GateFailed(
            f"export {what}: the {precision} fidelity gate failed on {metrics['rows']} held-out rows: "
            + "; ".join(failed) + ". It is not published. If this trade-off is acceptable, loosen the gate, e.g. "
            f"--set export.gates.{precision}.<setting>=VALUE; for int4, export.int4_method=gptq (the default) and a "
            "smaller export.int4_block_size are more accurate, and export.edge_fallback=int8 ships a task whose int4 "
            "adapter fails at int8 instead", {"precision": precision, **metrics})
    log.info("export %s: %s gate passed: max |Δlogit| %.3g, top-1 %.3f, KL %.3g, exact match %.3f vs %.3f (torch)",
             what, precision, metrics["max_abs_logit_diff"], metrics["top1_agreement"], metrics["kl"],
             metrics["score_export"], metrics["score_torch"])


def gate(cfg: Config, task: TaskConfig, precision: str, torch_model, export_model, tokenizer, what: str, *,
         logits: bool = True) -> dict:
    """:func:`measure` then :func:`check`; returns the metrics (recorded in the export's manifest)."""
    metrics = measure(cfg, task, torch_model, export_model, tokenizer)
    check(cfg, precision, metrics, what, logits=logits)
    return {"precision": precision, **metrics}
