"""Evaluation during training: the validation rows, validation loss and exact match every ``tune.eval_steps``,
the best checkpoint, early stopping, and the history the report draws.

It rides on transformers' ``Trainer``: each evaluation is one teacher-forced pass over the validation rows
(:func:`pipeline.scoring.answer_pass`, the code evaluate uses) that gives both the validation loss (the mean
over every target token) and, for the rows scored for exact match, which greedy answers are surely the
reference; :func:`pipeline.scoring.exact_match` decodes only the others. Rank 0 evaluates and broadcasts the
metrics, so every rank holds the same ones and takes the same decision to stop; the Trainer's
``load_best_model_at_end`` keeps the best checkpoint.

"Best" is strict improvement of ``tune.metric_for_best``; by exact match, ties are broken by validation loss
(exact match on a few dozen rows reaches 1.0 long before the adapter has the margin that 4-bit weights need,
so the lower loss wins among equal scores). The Trainer tracks it as one number, ``eval_selection``
(:func:`selection`), which orders evaluations exactly that way; an equal selection keeps the earlier step.
The stop decision is read from the Trainer's log history, not from state of its own, so a run resumed from
a checkpoint decides exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import distributed
from pipeline.config import Config, TaskConfig
from pipeline.data import Example, load_examples, split_validation
from pipeline.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Validation:
    """The validation rows of one tune and how they are scored."""

    examples: list[Example]
    """Every validation row (the loss is taken on all of them)."""
    source: str
    """Where they came from: the ``tasks[].validation`` file, or the share held out of the training file."""
    metric: str
    """``exact_match`` or ``loss``: what makes an evaluation the best."""
    scored: list[Example]
    """The rows whose greedy answer is scored for exact match (empty: the rows have no answers)."""

    @property
    def scored_rows(self) -> list[int]:
        """Where the ``scored`` rows are in ``examples`` (the first rows with answers)."""
        return [i for i, e in enumerate(self.examples) if e.reference is not None][:len(self.scored)]

    @property
    def greater_is_better(self) -> bool:
        return self.metric == "exact_match"

    @property
    def key(self) -> str:
        """The Trainer metric that ranks evaluations (``metric_for_best_model``, without ``eval_``)."""
        return "selection" if self.metric == "exact_match" else "loss"

    def to_manifest(self) -> dict[str, Any]:
        return {"source": self.source, "rows": len(self.examples), "exact_match_rows": len(self.scored),
                "metric_for_best": self.metric}


def split(cfg: Config, task: TaskConfig, train: list[Example]) -> tuple[list[Example], Validation | None]:
    """(training rows, validation) for ``task``: its ``validation`` file, else ``tune.validation_share`` of
    ``train`` held out with the seed; validation None when neither is configured. Every validation row is
    read and checked here, before any model work (a malformed row raises DataError with ``file:line``)."""
    t = cfg.tune
    if task.validation is not None:
        rows, source = load_examples(task.validation), task.validation
    elif t.validation_share > 0:
        train, rows = split_validation(train, t.validation_share, cfg.seed, task.train)
        source = f"{len(rows)} of the rows of {task.train} (tune.validation_share={t.validation_share}, seed {cfg.seed})"
    else:
        return train, None
    answered = [e for e in rows if e.reference is not None]
    metric = t.metric_for_best
    if metric == "auto":
        metric = "exact_match" if answered else "loss"
    elif metric == "exact_match" and not answered:
        raise ConfigError(f"tune.metric_for_best=exact_match, but the validation rows of task {task.name!r} "
                          f"({source}) have no answers to match (text rows); use metric_for_best: loss or auto")
    return train, Validation(rows, source, metric, answered[:t.eval_rows])


def selection(exact_match: float, loss: float, rows: int) -> float:
    """One number that orders evaluations by exact match, then by lower validation loss: exact match moves in
    steps of 1/``rows``, and the loss term stays below half a step (and falls as the loss rises)."""
    return exact_match + 0.5 / rows / (1.0 + max(loss, 0.0))


def _what(metric: str) -> str:
    return "exact match (ties: loss)" if metric == "exact_match" else "loss"


def stop_reason(history: list[dict[str, Any]], validation: Validation, patience: int | None) -> str | None:
    """Why training should stop after the evaluations in ``history`` (the Trainer's ``log_history``), or None:
    ``patience`` evaluations in a row brought no new best. ``patience`` None: never."""
    evals = [e for e in history if f"eval_{validation.key}" in e]
    if patience is None or not evals:
        return None
    best = best_index(evals, validation)
    waited = len(evals) - 1 - best
    if waited >= patience:
        return (f"{waited} evaluations without a better validation {_what(validation.metric)} than step "
                f"{evals[best]['step']}'s (tune.early_stopping_patience={patience})")
    return None


def best_index(evals: list[dict[str, Any]], validation: Validation) -> int:
    """Index of the best evaluation in ``evals``: strictly better than every earlier one (ties keep the first)."""
    key, best = f"eval_{validation.key}", 0
    for i, e in enumerate(evals):
        if (e[key] > evals[best][key]) if validation.greater_is_better else (e[key] < evals[best][key]):
            best = i
    return best


def history(log_history: list[dict[str, Any]]) -> dict[str, list[list[float]]]:
    """The curves of a run: ``train_loss`` [[step, loss]], ``eval_loss`` and ``eval_exact_match``."""
    curves: dict[str, list[list[float]]] = {"train_loss": [], "eval_loss": [], "eval_exact_match": []}
    for e in log_history:
        if "loss" in e:
            curves["train_loss"].append([e["step"], e["loss"]])
        for key in ("eval_loss", "eval_exact_match"):
            if key in e:
                curves[key].append([e["step"], e[key]])
    return curves


def trainer_args(cfg: Config, validation: Validation | None) -> dict[str, Any]:
    """``TrainingArguments`` for evaluation during training (none without validation rows)."""
    t = cfg.tune
    if validation is None:
        return {"save_steps": t.save_steps}
    return {"eval_strategy": "steps", "eval_steps": t.eval_steps, "save_steps": t.eval_steps,
            "per_device_eval_batch_size": t.eval_batch_size,
            "label_names": ["labels"], "metric_for_best_model": validation.key,
            "greater_is_better": validation.greater_is_better, "load_best_model_at_end": t.load_best_at_end}


def trainer_class():
    """A ``Trainer`` whose evaluation is one pass over the validation rows (loss, and greedy exact match on the
    rows with answers; see the module's docstring), and whose training loss runs a batch's shared opening once
    (batches collated with an ``opening``)."""
    from transformers import Trainer
    from transformers.trainer_utils import EvalLoopOutput

    from pipeline.opening import with_opening
    from pipeline.scoring import AnswerPass, answer_pass, exact_match

    class ValidatingTrainer(Trainer):
        def __init__(self, *args, validation: Validation | None = None, tokenizer=None, max_new_tokens: int = 32,
                     max_len: int = 4096, task: str = "", **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self.validation, self.scoring_tokenizer = validation, tokenizer
            self.max_new_tokens, self.max_len, self.task = max_new_tokens, max_len, task

        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            # a batch collated with an opening: it runs once, with gradients, for every row
            if "opening_ids" in inputs:
                inputs = with_opening(model, inputs)
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)

        def evaluation_loop(self, dataloader, description, prediction_loss_only=None, ignore_keys=None,
                            metric_key_prefix="eval"):
            if self.validation is None:
                return super().evaluation_loop(dataloader, description, prediction_loss_only, ignore_keys,
                                               metric_key_prefix)
            result = self._validate() if distributed.is_main_process() else None
            loss, score = distributed.broadcast_object(result)
            metrics = {f"{metric_key_prefix}_loss": loss}
            if score is not None:
                metrics[f"{metric_key_prefix}_exact_match"] = round(score, 4)
                metrics[f"{metric_key_prefix}_selection"] = selection(score, loss, len(self.validation.scored))
            return EvalLoopOutput(predictions=None, label_ids=None, metrics=metrics,
                                  num_samples=len(self.validation.examples))

        def _validate(self) -> tuple[float, float | None]:
            """(validation loss, exact match or None) from one pass over the validation rows; the scored rows
            whose greedy answer the pass cannot tell are decoded."""
            v, size = self.validation, self.args.per_device_eval_batch_size
            self.model.eval()  # the next training step switches it back
            passed = answer_pass(self.model, self.scoring_tokenizer, v.examples, self.max_len, size,
                                 self.max_new_tokens if v.scored else None)
            loss = passed.nll / max(passed.tokens, 1)
            if not v.scored:
                return loss, None
            rows = v.scored_rows
            checked = AnswerPass(0.0, 0, [passed.greedy_hit[i] for i in rows], [passed.answer[i] for i in rows],
                                 [passed.misses[i] for i in rows])
            score, _ = exact_match(self.model, self.scoring_tokenizer, v.scored, self.max_new_tokens, size,
                                   desc=f"{self.task} validation", max_len=self.max_len, checked=checked)
            return loss, score

    return ValidatingTrainer


def control_callback(validation: Validation, patience: int | None, task: str):
    """A Trainer callback that evaluates at the last step too, logs each evaluation, and stops early
    (:func:`stop_reason`; tune reads the reason back from the log history for its manifest)."""
    from transformers import TrainerCallback

    class EvaluationControl(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step >= state.max_steps:  # the last step is judged too, not only multiples
                control.should_evaluate = True
            return control

        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            evals = [e for e in state.log_history if f"eval_{validation.key}" in e]
            best = evals[best_index(evals, validation)]["step"] if evals else None
            em = (metrics or {}).get("eval_exact_match")
            if state.is_world_process_zero:
                log.info("tune %s: step %d: validation loss %.4f%s (best %s: step %s)", task, state.global_step,
                         (metrics or {}).get("eval_loss", float("nan")),
                         "" if em is None else f", exact match {em:.3f} on {len(validation.scored)} rows",
                         _what(validation.metric), best)
            reason = stop_reason(state.log_history, validation, patience)
            if reason:
                control.should_training_stop = True
                if state.is_world_process_zero:
                    log.info("tune %s: stopping early at step %d: %s", task, state.global_step, reason)
            return control

    return EvaluationControl()


def write_state(trainer, folder: Path) -> None:
    """The run's ``trainer_state.json`` (log history, best step and metric) into ``folder``."""
    trainer.state.save_to_json(str(folder / "trainer_state.json"))
