"""Stage 1, tune: train one task-specialist adapter with the configured method.

Training runs on transformers' ``Trainer`` (accelerate underneath), so the same command scales
out under ``accelerate launch`` or ``torchrun``. Methods plug in by preparing the model (adapter
layers, trainable parameters); method-specific behaviour beyond that belongs in callbacks and
optimizer parameter groups, not in a loop of our own.

With validation rows (``tasks[].validation`` or ``tune.validation_share``), training is evaluated every
``tune.eval_steps``, stops early when the validation metric stalls, and keeps the best evaluation's
checkpoint (:mod:`pipeline.validation`); ``tune.max_steps`` is then an upper bound.

Output: ``runs/<run>/adapters/<task>/``: the method's result (a PEFT adapter, a PIR sparse delta or a
whole model) plus the tokenizer, ``trainer_state.json`` (the Trainer's log history) and ``manifest.json``,
whose ``adapter`` entry is the result's :class:`~pipeline.adapter_spec.AdapterSpec`, the description every
later stage reads, and whose metrics hold the curves, the step kept and why training stopped.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from functools import partial
from pathlib import Path

from pipeline import checkpoints as checkpoint_files
from pipeline import distributed, tracking, validation
from pipeline.adapter_spec import MANIFEST_KEY, AdapterSpec, spec_from_files
from pipeline.artifacts import atomic_dir, fingerprint, is_fresh, write_manifest
from pipeline.config import Config, TaskConfig
from pipeline.data import collate_for_training, encode_all, load_examples, shared_prefix
from pipeline.device import resolve_device, resolve_precision, set_threads
from pipeline.errors import EdgetuneError
from pipeline.methods import Method, get_method
from pipeline.models import load_model, load_tokenizer, resolve_base
from pipeline.paths import adapter_dir, checkpoints_dir

log = logging.getLogger(__name__)


def _plan(cfg: Config, task: TaskConfig) -> tuple[Path, str, dict, str]:
    base = resolve_base(cfg.base)
    config_hash = cfg.section_hash("method", "seed", "lora", "ulmfit", "prompt", "pir", "tune") + \
        f":{task.name}:{task.max_steps}:{task.validation}"
    files = {"base": base, "train": Path(task.train)}
    if task.validation is not None:
        files["validation"] = Path(task.validation)
    fp, inputs = fingerprint("tune", files, config_hash)
    return base, fp, inputs, config_hash


def run(cfg: Config, task: TaskConfig, *, force: bool = False, resume: bool = False) -> Path:
    """Train ``task``'s adapter unless an identical one exists; return its folder.

    ``resume`` continues from the last checkpoint of an interrupted run of this task.
    """
    from transformers import TrainingArguments, set_seed

    out = adapter_dir(cfg, task)
    base, fp, inputs, config_hash = _plan(cfg, task)
    if not force and is_fresh(out, fp):
        log.info("tune %s: up to date (%s), nothing to do; --force retrains", task.name, out)
        return out

    examples = load_examples(task.train)  # validate every row (and the validation rows) before any model work
    examples, held_out = validation.split(cfg, task, examples)
    tracker_args = tracking.trainer_args(cfg, task)
    method = get_method(cfg.method)
    device = resolve_device(cfg.device)
    precision = resolve_precision(cfg.tune.precision, device)
    distributed.init(device)  # under a launcher: join the group before loading (binds this rank's GPU)
    if distributed.fsdp_requested():
        # Saving from sharded parameters needs every rank to gather them first; that path is not built (and
        # could not be tested here), so refuse rather than write an adapter of shards.
        raise EdgetuneError("tune: FSDP is not supported yet (the adapter is saved by rank 0 from unsharded "
                            "parameters); launch with configs/accelerate/ddp.yaml or torchrun (data parallel)")
    set_threads(cfg.num_threads)
    set_seed(cfg.seed)
    tokenizer = load_tokenizer(base)
    dataset = encode_all(tokenizer, examples, cfg.tune.max_seq_len, f"{task.train}")
    eval_dataset = encode_all(tokenizer, held_out.examples, cfg.tune.max_seq_len, held_out.source) \
        if held_out else None
    model = method.apply(load_base_for_training(method, base, device), cfg, data=dataset)
    optimizer, optimizer_note = choose_optimizer(method, device)
    if optimizer_note:
        log.warning("tune %s: %s", task.name, optimizer_note)
    trainable, total = parameter_counts(model)
    if held_out:
        log.info("tune %s: validation on %s (%d rows, %d scored for exact match); every %d steps, best by %s, "
                 "early stopping patience %s", task.name, held_out.source, len(held_out.examples),
                 len(held_out.scored), cfg.tune.eval_steps, held_out.metric, cfg.tune.early_stopping_patience)
    log.info("tune %s: method=%s, %d examples, %d trainable of %d parameters (%.3f%%), device=%s, precision=%s, "
             "optimizer=%s", task.name, method.name, len(examples), trainable, total, 100 * trainable / total, device,
             precision, optimizer)

    checkpoints = checkpoints_dir(cfg, task)
    if distributed.is_main_process():  # keep only complete checkpoints of this very tune (or none)
        checkpoint_files.prepare(checkpoints, fp, resume=resume, what=f"tune {task.name}")
    distributed.barrier()  # the other ranks touch no checkpoint while the main process clears them
    resume_from = checkpoint_files.last_complete(checkpoints) if resume else None
    if resume:
        log.info("tune %s: %s", task.name, f"resuming from {resume_from}" if resume_from else
                 f"--resume given but no complete checkpoint in {checkpoints}; starting from scratch")
    # Mixed precision reaches accelerate through the environment (TrainingArguments sets the variable for
    # bf16/fp16 and never clears it) and its process-wide state: set both for this run, or an earlier bf16 run
    # in the same process would silently make this one bf16 too. The distributed part of the state is kept.
    from accelerate.state import AcceleratorState

    os.environ["ACCELERATE_MIXED_PRECISION"] = {"fp32": "no"}.get(precision, precision)
    AcceleratorState._reset_state(reset_partial_state=False)
    t = cfg.tune
    args = TrainingArguments(
        output_dir=str(checkpoints),
        max_steps=task.max_steps or t.max_steps,
        per_device_train_batch_size=t.batch_size,
        gradient_accumulation_steps=t.grad_accum,
        learning_rate=t.learning_rate or method.learning_rate,
        lr_scheduler_type=t.lr_scheduler,
        warmup_steps=t.warmup_steps,
        weight_decay=t.weight_decay,
        optim=optimizer,
        logging_steps=t.logging_steps,
        logging_first_step=True,
        save_strategy="steps",
        save_total_limit=1,  # with load_best_model_at_end the Trainer also keeps the best one
        seed=cfg.seed,
        use_cpu=device == "cpu",
        bf16=precision == "bf16",
        fp16=precision == "fp16",
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=False,
        **validation.trainer_args(cfg, held_out),
        **tracker_args,
    )
    # the tokens every row starts with (chat template's system turn, the task's instruction) run once per batch
    opening = 0 if method.prompt_learning else shared_prefix(dataset + (eval_dataset or []))
    if opening:
        log.info("tune %s: every row opens with the same %d tokens: they run once per batch", task.name, opening)
    timer = step_timer()
    plan = method.training_plan(model, cfg, args.learning_rate, args.max_steps) if method.training_plan else None
    control = validation.control_callback(held_out, t.early_stopping_patience, task.name) if held_out else None
    trainer = validation.trainer_class()(
        model=model,
        args=args,
        train_dataset=dataset,
        eval_dataset=eval_dataset,
        # its own tokenizer: padding a batch for decoding records padding settings in a tokenizer, and the one
        # saved with the adapter must not depend on whether this process ran an evaluation (resume)
        validation=held_out, tokenizer=load_tokenizer(base) if held_out else None,
        max_new_tokens=task.max_new_tokens, max_len=t.max_seq_len, task=task.name,
        # prompt-learning methods prepend virtual tokens (and their labels) inside the model: full-width logits,
        # whole rows; every other method runs the rows' shared opening once per batch (the trainer's loss)
        data_collator=partial(collate_for_training, pad_id=tokenizer.pad_token_id,
                              slice_logits=not method.prompt_learning, opening=opening),
        optimizers=(plan.optimizer, plan.scheduler) if plan else (None, None),
        callbacks=[*(plan.callbacks if plan else []), timer, *([control] if control else [])],
    )
    # accelerate's state (built with the Trainer) sets its own thread count when OMP_NUM_THREADS is unset
    threads = set_threads(cfg.num_threads)
    log.info("tune %s: rank %d of %d trains with %d CPU threads", task.name, distributed.rank(),
             distributed.world_size(), threads)
    started = time.perf_counter()
    finished = resume_from and (checkpoint_files.global_step(resume_from) >= args.max_steps or (held_out and
                                validation.stop_reason(checkpoint_files.log_history(resume_from), held_out,
                                                       t.early_stopping_patience)))
    if finished:
        restore_finished(trainer, resume_from)
    else:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    seconds = time.perf_counter() - started
    outcome = training_outcome(trainer, held_out, t.early_stopping_patience, args.max_steps)
    losses = outcome["curves"]["train_loss"]  # [[step, loss]] as logged

    if trainer.is_world_process_zero():
        with atomic_dir(out) as tmp:
            if method.save:
                method.save(model, tmp)
            else:
                model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            validation.write_state(trainer, tmp)
            spec = describe(method, tmp)
            write_manifest(
                tmp,
                stage="tune",
                fp=fp,
                inputs=inputs,
                config_hash=config_hash,
                metrics={
                    "train_loss_first": losses[0][1] if losses else None,
                    "train_loss_last": losses[-1][1] if losses else None,
                    "steps": trainer.state.global_step,
                    **outcome,
                    "train_seconds": round(seconds, 2),
                    "step_seconds_median": round(statistics.median(timer.seconds), 3) if timer.seconds else None,
                    "trainable_params": trainable,
                    "total_params": total,
                },
                extra={"task": task.name, "method": method.name, "mergeable": method.mergeable, "base": cfg.base,
                       "full_model": method.full_model, "prompt_learning": method.prompt_learning,
                       "learning_rate": args.learning_rate, "opening_tokens": opening,
                       "validation": held_out.to_manifest() if held_out else None,
                       "report_to": t.report_to,
                       "base_quantization": method.base_quantization, "optimizer": optimizer,
                       "optimizer_class": optimizer_class(trainer),
                       "device": device, "precision": precision,
                       "optimizer_note": optimizer_note, MANIFEST_KEY: spec.to_manifest()},
            )
        checkpoint_files.remove(checkpoints)
        log.info("tune %s: done in %.0f s, %d steps (%s), kept step %d, loss %.3f -> %.3f, adapter in %s", task.name,
                 seconds, trainer.state.global_step, outcome["stop_reason"], outcome["kept_step"],
                 losses[0][1] if losses else float("nan"), losses[-1][1] if losses else float("nan"), out)
    distributed.barrier()  # every rank returns once the adapter is in place
    return out


def training_outcome(trainer, held_out: validation.Validation | None, patience: int | None,
                     max_steps: int) -> dict:
    """The manifest's account of how training ended: the step whose weights were kept, why it stopped, the
    best validation metric, and the curves (train loss, validation loss and exact match against steps)."""
    state = trainer.state
    curves = validation.history(state.log_history)
    if held_out is None:
        return {"kept_step": state.global_step, "stop_reason": f"max_steps ({max_steps}) reached",
                "best_metric": None, "curves": curves}
    # the patience may also run out at the last step: that run was not stopped early
    reason = validation.stop_reason(state.log_history, held_out, patience) if state.global_step < max_steps else None
    keep_best = trainer.args.load_best_model_at_end and state.best_global_step is not None
    return {"kept_step": state.best_global_step if keep_best else state.global_step,
            "stop_reason": f"early stopping: {reason}" if reason else f"max_steps ({max_steps}) reached",
            "best_metric": best_evaluation(state.log_history, held_out.metric, state.best_global_step),
            "curves": curves}


def best_evaluation(log_history: list[dict], metric: str, step: int | None) -> dict | None:
    """The best evaluation's numbers: what ranked it (``name``), its step, validation loss and exact match."""
    found = [e for e in log_history if e.get("step") == step and "eval_loss" in e]
    if not found:
        return None
    return {"name": metric, "step": step, "loss": found[-1]["eval_loss"], "exact_match": found[-1].get("eval_exact_match")}


def step_timer():
    """A Trainer callback whose ``seconds`` list gets the wall time of every optimizer step."""
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        def __init__(self) -> None:
            self.seconds: list[float] = []
            self._started = 0.0

        def on_step_begin(self, args, state, control, **kwargs) -> None:
            self._started = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs) -> None:
            self.seconds.append(time.perf_counter() - self._started)

    return StepTimer()


def parameter_counts(model) -> tuple[int, int]:
    """(trainable, total) parameters of ``model``, counting what each tensor stands for: a packed
    4-bit bitsandbytes tensor holds two weights per stored byte, so QLoRA's base counts in full."""
    def logical(p) -> int:
        state = getattr(p, "quant_state", None)
        return state.shape.numel() if state is not None else p.numel()

    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(logical(p) for p in params)


def load_base_for_training(method: Method, base: Path, device: str):
    """The frozen base the method trains on: fp32, or bitsandbytes-quantized (QLoRA's NF4)."""
    if method.base_quantization is None:
        return load_model(base, device)
    from exporters.bnb import load_quantizing

    return load_quantizing(base, method.base_quantization, device)


def describe(method: Method, folder: Path) -> AdapterSpec:
    """The spec of the tune result ``method`` saved in ``folder`` (read from its files), checked against
    what the method declares: later stages trust the spec, so a disagreement stops here."""
    spec = spec_from_files(folder)
    declared = {"mergeable": method.mergeable, "prompt_learning": method.prompt_learning,
                "full_model": method.full_model}
    found = {k: getattr(spec, k) for k in declared}
    if found != declared:
        raise EdgetuneError(f"tune: method {method.name!r} declares {declared} but saved a {spec.kind} result "
                            f"({found}); the method's registration is wrong")
    return spec


def optimizer_class(trainer) -> str:
    """Class name of the optimizer that really stepped (``PagedAdamW32bit`` for QLoRA on CUDA): the manifest
    records what ran, not only what was asked for. (accelerate wraps it; the wrapped one is named.)"""
    opt = trainer.optimizer
    return type(getattr(opt, "optimizer", opt)).__name__


def choose_optimizer(method: Method, device: str) -> tuple[str, str | None]:
    """Trainer ``optim`` name for ``method`` on ``device``, and a note when a fallback was taken."""
    if not method.paged_optimizer:
        return "adamw_torch", None
    if device == "cuda":
        return "paged_adamw_32bit", None
    return "adamw_torch", (f"{method.name}: no paged optimizer on {device} (bitsandbytes pages optimizer state "
                           "through CUDA unified memory); using plain AdamW")


def restore_finished(trainer, checkpoint: Path) -> None:
    """Put a checkpoint that already holds every step into ``trainer`` (weights, state, log) without training.

    ``Trainer.train`` resumed from it would run one more step (it checks for the last step only after
    taking one: 13 of 12), which changes the adapter under a constant schedule; the same holds for a checkpoint
    at which early stopping had decided to stop. The weights are loaded by the same Trainer method ``train``
    resumes with, then the best checkpoint's, as ``train`` does at its end.
    """
    from transformers import TrainerState

    trainer._load_from_checkpoint(str(checkpoint))
    trainer.state = TrainerState.load_from_json(str(checkpoint / checkpoint_files.STATE))
    if trainer.args.load_best_model_at_end and trainer.state.best_model_checkpoint:  # as train() ends
        trainer._load_best_model()
    if trainer.optimizer is None:  # the manifest names the optimizer class a run uses
        trainer.create_optimizer()
    log.info("%s already holds all %d steps: restored, not trained further", checkpoint, trainer.state.global_step)
