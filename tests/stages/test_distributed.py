"""Tune on 2 CPU ranks (gloo) with the real command line: ``torchrun --nproc-per-node 2 -m pipeline.cli tune``.

Every registered method trains, writes from rank 0 only and reloads; LoRA, ULMFiT and PIR on 2 ranks x
batch 2 equal one process x batch 2 x grad_accum 2 (the same 4 examples per optimizer step); ULMFiT's
frozen groups do not move on 2 ranks either; PIR's ranks agree on one selection; each rank runs on its
share of the cores. Each launch costs ~20 s on 2 cores (mostly imports), so every method is launched once
and the checks share its result.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from functools import cache
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import tune
from pipeline.artifacts import read_manifest
from pipeline.config import load_config
from pipeline.methods import METHODS
from pipeline.methods.ulmfit import layer_groups
from pipeline.models import load_model, load_tokenizer
from pipeline.tuned import load_tuned

ROOT = Path(__file__).resolve().parents[2]
RANKS = 2
SETTINGS = ["num_threads=0", "tune.max_steps=4", "tune.save_steps=100", "tune.logging_steps=1"]
# Measured: 0.0 for lora, ulmfit and pir (the same kernels add the same numbers: DDP averages the two
# ranks' gradients of 2 examples each, one process accumulates two micro-batches of 2, and the Trainer
# divides both by the token count of all 4). One process x batch 4 instead differs by ~1e-6: a batch of 4
# sums its rows in another order. The bound leaves room for that kind of summation-order difference
# (other thread counts pick other kernels); a rank training on its own (ULMFiT unfrozen by requires_grad,
# PIR choosing its own weights) is off by ~1e-2.
TOLERANCE = 1e-5
RANK_THREADS = max(1, (os.cpu_count() or 1) // RANKS)
"""Each rank's share of the cores; the one-process reference runs with as many threads, so both pick the same
kernels (with every core, one process summed in another order: 1.6e-5 apart for ULMFiT on a 2-core AMD EPYC)."""
# ULMFiT's launch also trains a one-step copy of the task: 1 step of 2 phases ends in phase 0, where only
# the top group may move (a second task costs ~2 s, a second launch ~20 s).
PHASE0_TASKS = ("tasks=[{name: sentiment, train: data/tasks/sentiment/train.jsonl, test: data/tasks/sentiment/test.jsonl},"
                " {name: phase0, train: data/tasks/sentiment/train.jsonl, test: data/tasks/sentiment/test.jsonl,"
                " max_steps: 1}]")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def launch(workdir: Path, tiny_model_dir: Path):
    """``launch(method)``: (run folder, output) of its 2-rank tune, run once per method."""

    @cache
    def run(method: str) -> tuple[Path, str]:
        out = workdir / method
        settings, tasks = ([PHASE0_TASKS], ["sentiment", "phase0"]) if method == "ulmfit" else ([], ["sentiment"])
        # an interrupted run's leftovers: the main process clears them while the other rank waits
        (out / "tiny" / "checkpoints" / "sentiment" / "checkpoint-3").mkdir(parents=True)
        # Each rank starts with every core (as without a launcher): tune must cut that to its share.
        env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 1)}
        sets = [f"base={tiny_model_dir}", f"out_dir={out}", f"method={method}", "tune.batch_size=2", *SETTINGS,
                *settings]
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
               "-m", "pipeline.cli", "tune", "--config", "configs/tiny.yaml",
               *(a for t in tasks for a in ("--task", t)), *(a for s in sets for a in ("--set", s))]
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-4000:]
        return out / "tiny", output

    return run


@pytest.fixture(scope="module")
def one_process(workdir: Path, tiny_model_dir: Path):
    """``one_process(method)``: (adapter folder, log records) of the same run in this process, one rank
    with batch 2 x grad_accum 2: the same global batch."""

    @cache
    def run(method: str) -> tuple[Path, str]:
        cfg = load_config("configs/tiny.yaml", [f"base={tiny_model_dir}", f"out_dir={workdir / ('one-' + method)}",
                                                f"method={method}", "tune.batch_size=2", "tune.grad_accum=2",
                                                *SETTINGS, f"num_threads={RANK_THREADS}"])
        handler, logger = _Collect(), logging.getLogger("pipeline")
        level, threads = logger.level, torch.get_num_threads()
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
        try:
            folder = tune.run(cfg, cfg.task("sentiment"))
        finally:
            logger.removeHandler(handler)
            logger.setLevel(level)
            torch.set_num_threads(threads)  # tune set this process's thread count; later tests get theirs back
        return folder, "\n".join(handler.lines)

    return run


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    assert len(files) == 1, files
    return load_file(str(files[0]))


@pytest.mark.parametrize("method", sorted(METHODS))
def test_every_method_tunes_on_two_ranks_and_only_rank_0_writes(method: str, launch, tiny_model_dir: Path) -> None:
    run_dir, output = launch(method)
    for rank in range(RANKS):
        assert f"tune sentiment: rank {rank} of {RANKS} trains with {RANK_THREADS} CPU threads" in output, output[-3000:]
    tasks = sorted(p.name for p in (run_dir / "adapters").iterdir())
    assert output.count("adapter in ") == len(tasks)  # one rank saved each

    expected = set()
    for task in tasks:
        manifest = read_manifest(run_dir / "adapters" / task)
        assert manifest and manifest["method"] == method
        expected |= {f"adapters/{task}/{f}" for f in [*manifest["files"], "manifest.json"]}
        assert not (run_dir / "checkpoints" / task).exists()  # this run's checkpoints (and the leftovers) gone
    written = {p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file()}
    assert written == expected  # nothing stray, nothing half-written

    adapter = run_dir / "adapters" / "sentiment"
    assert read_manifest(adapter)["metrics"]["steps"] == 4

    model = load_tuned(adapter, tiny_model_dir)  # what every later stage does with it
    batch = load_tokenizer(tiny_model_dir)(["Review: great mug.\nLabel the sentiment."], return_tensors="pt")
    with torch.no_grad():
        assert torch.isfinite(model(**batch).logits).all()


@pytest.mark.parametrize("method", ["lora", "ulmfit", "pir"])
def test_two_ranks_equal_one_process_with_the_same_global_batch(method: str, launch, one_process) -> None:
    run_dir, _ = launch(method)
    reference, _ = one_process(method)
    two, one = _tensors(run_dir / "adapters" / "sentiment"), _tensors(reference)
    assert two.keys() == one.keys()
    for name in one:
        if not one[name].is_floating_point():  # PIR's indices: the same weights, exactly
            assert torch.equal(two[name], one[name]), name
    diff = max((two[n].double() - one[n].double()).abs().max().item() for n in one if one[n].is_floating_point())
    assert diff <= TOLERANCE, diff


def test_pir_ranks_agree_on_one_selection_equal_to_one_process(launch, one_process) -> None:
    _, output = launch("pir")
    chosen = {rank: sha for sha, rank in re.findall(r"pir: selection sha256 (\w+) on rank (\d) of 2", output)}
    assert set(chosen) == {"0", "1"} and len(set(chosen.values())) == 1, chosen
    _, log = one_process("pir")
    assert f"pir: selection sha256 {chosen['0']} on rank 0 of 1" in log


def test_ulmfit_groups_not_yet_unfrozen_do_not_move_on_two_ranks(launch, tiny_model_dir: Path) -> None:
    run_dir, _ = launch("ulmfit")  # its task "phase0" stops after 1 step, in phase 0 of 2
    base, tuned = load_model(tiny_model_dir), load_model(run_dir / "adapters" / "phase0")
    assert read_manifest(run_dir / "adapters" / "phase0")["metrics"]["steps"] == 1
    top, bottom = layer_groups(base, 2)
    names = {id(p): n for n, p in base.named_parameters()}
    after = dict(tuned.named_parameters())
    assert all(torch.equal(p, after[names[id(p)]]) for p in bottom)  # frozen: bit for bit the base
    assert all(not torch.equal(p, after[names[id(p)]]) for p in top)  # trained


def test_two_ranks_evaluate_and_stop_early_together(workdir: Path, tiny_model_dir: Path) -> None:
    """Validation loss is sharded over the ranks and exact match decoded on rank 0 and broadcast: both ranks
    see the same stalled metric and stop at the same step (one rank stopping alone would hang the other)."""
    out = workdir / "early"
    sets = [f"base={tiny_model_dir}", f"out_dir={out}", "tune.batch_size=2", "num_threads=0", "tune.max_steps=12",
            "tune.eval_steps=2", "tune.early_stopping_patience=2", "tune.metric_for_best=auto",
            "tune.learning_rate=1e-30"]  # the metric stalls (see tests/stages/test_validation.py)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={RANKS}",
           "-m", "pipeline.cli", "tune", "--config", "configs/tiny.yaml", "--task", "sentiment",
           *(a for s in sets for a in ("--set", s))]
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-4000:]
    metrics = read_manifest(out / "tiny" / "adapters" / "sentiment")["metrics"]
    assert (metrics["steps"], metrics["kept_step"]) == (6, 2), metrics  # exact match 0.0 at 2, 4, 6
    assert output.count("tune sentiment: stopping early at step 6") == 1  # logged by rank 0, obeyed by both


def test_without_a_launcher_the_helpers_are_single_process_no_ops(monkeypatch) -> None:
    from pipeline import distributed

    for name in ("WORLD_SIZE", "RANK", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    assert distributed.world_size() == 1 and distributed.rank() == 0 and distributed.is_main_process()
    selection = {"a": torch.arange(3)}
    assert distributed.broadcast_object(selection) is selection
    distributed.barrier()  # returns at once
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert distributed.world_size() == 2 and not distributed.is_main_process()


def test_fsdp_is_refused_before_training(tmp_path: Path, tiny_model_dir: Path, monkeypatch, capsys) -> None:
    """An FSDP launch would have rank 0 save shards: refused with the launcher that works, nothing written."""
    from pipeline.cli import main

    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    assert main(["tune", "--config", "configs/tiny.yaml", "--set", f"base={tiny_model_dir}",
                 "--set", f"out_dir={tmp_path}"]) == 2
    err = capsys.readouterr().err
    assert "FSDP is not supported yet" in err and "configs/accelerate/ddp.yaml" in err
    assert not (tmp_path / "tiny" / "adapters").exists()
