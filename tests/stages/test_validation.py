"""Evaluation during training on the tiny model: early stopping, the kept checkpoint, resume, bad validation data,
experiment tracking and the curves in the report.

The tiny random model never answers a sentiment row right, so its validation exact match stays 0.0; with a
learning rate of 1e-30 its weights still move (each step adds ~1e-30 to them) but its validation loss cannot, so
the metric stalls from the first evaluation: exactly the run early stopping must cut short, keeping the first
evaluation's weights.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoints, tune
from pipeline.cli import main
from pipeline.validation import Validation, best_index, selection, stop_reason

SENTIMENT = ("tasks=[{name: sentiment, train: data/tasks/sentiment/train.jsonl, test: data/tasks/sentiment/test.jsonl,"
             " max_new_tokens: 4}]")


def tune_cli(tiny_model_dir: Path, out: Path, *sets: str, resume: bool = False) -> int:
    argv = ["tune", "--config", "configs/tiny.yaml", *(["--resume"] if resume else [])]
    for s in (f"base={tiny_model_dir}", f"out_dir={out}", SENTIMENT, *sets):
        argv += ["--set", s]
    return main(argv)


def metrics(out: Path) -> dict:
    return json.loads((out / "tiny" / "adapters" / "sentiment" / "manifest.json").read_text())["metrics"]


def test_early_stopping_stops_a_stalled_run_and_keeps_the_best_checkpoint_bit_for_bit(
        tmp_path: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(checkpoints, "remove", lambda folder: None)  # keep them to compare with
    assert tune_cli(tiny_model_dir, tmp_path, "tune.max_steps=20", "tune.eval_steps=2", "tune.learning_rate=1e-30",
                    "tune.early_stopping_patience=2", "tune.metric_for_best=auto") == 0
    m = metrics(tmp_path)
    # evaluations at 2, 4, 6: exact match 0.0 each time, so step 2 stays best and two more end the run
    assert m["steps"] == 6 and m["kept_step"] == 2, m
    assert "2 evaluations without a better validation exact match (ties: loss) than step 2's" in m["stop_reason"]
    assert [s for s, _ in m["curves"]["eval_exact_match"]] == [2, 4, 6]
    assert len({loss for _, loss in m["curves"]["eval_loss"]}) == 1  # stalled indeed
    assert m["best_metric"]["step"] == 2 and m["best_metric"]["exact_match"] == 0.0

    adapter = load_file(tmp_path / "tiny/adapters/sentiment/adapter_model.safetensors")
    folder = tmp_path / "tiny/checkpoints/sentiment"
    # the Trainer keeps the best checkpoint beside the last and drops the last one at the end (save_total_limit 1)
    assert sorted(p.name for p in folder.glob("checkpoint-*")) == ["checkpoint-2"]
    best = load_file(folder / "checkpoint-2/adapter_model.safetensors")
    assert adapter.keys() == best.keys() and all(torch.equal(adapter[k], best[k]) for k in best)
    assert any(t.abs().max() > 0 for k, t in best.items() if "lora_B" in k)  # trained (B starts at zero)
    state = json.loads((tmp_path / "tiny/adapters/sentiment/trainer_state.json").read_text())
    assert state["best_global_step"] == 2 and state["global_step"] == 6


def test_load_best_at_end_off_keeps_the_last_step(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert tune_cli(tiny_model_dir, tmp_path, "tune.max_steps=6", "tune.eval_steps=2",
                    "tune.load_best_at_end=false") == 0
    m = metrics(tmp_path)
    assert m["steps"] == 6 and m["kept_step"] == 6 and m["stop_reason"] == "max_steps (6) reached"


def test_without_validation_rows_training_runs_max_steps_as_before(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert tune_cli(tiny_model_dir, tmp_path, "tune.validation_share=0") == 0
    m = metrics(tmp_path)
    assert m["steps"] == m["kept_step"] == 4 and m["curves"]["eval_loss"] == [] and m["best_metric"] is None
    manifest = json.loads((tmp_path / "tiny/adapters/sentiment/manifest.json").read_text())
    assert manifest["validation"] is None


def test_resume_after_a_kill_continues_the_history(tmp_path: Path, tiny_model_dir: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    sets = ("tune.max_steps=8", "tune.eval_steps=2", "tune.early_stopping_patience=null", "tune.metric_for_best=loss")
    assert tune_cli(tiny_model_dir, tmp_path / "whole", *sets) == 0
    whole = metrics(tmp_path / "whole")

    class Killed(Exception):
        pass

    timer = tune.step_timer

    def dying_timer():  # the process "dies" after step 5, with checkpoint-4 complete on disk
        callback = timer()
        ended = callback.on_step_end

        def on_step_end(args, state, control, **kwargs):
            ended(args, state, control, **kwargs)
            if state.global_step == 5:
                raise Killed

        callback.on_step_end = on_step_end
        return callback

    monkeypatch.setattr(tune, "step_timer", dying_timer)
    with pytest.raises(Killed):
        tune_cli(tiny_model_dir, tmp_path / "cut", *sets)
    assert checkpoints.last_complete(tmp_path / "cut/tiny/checkpoints/sentiment").name == "checkpoint-4"
    monkeypatch.setattr(tune, "step_timer", timer)
    assert tune_cli(tiny_model_dir, tmp_path / "cut", *sets, resume=True) == 0
    resumed = metrics(tmp_path / "cut")
    # every evaluation before the kill is in the history, and the ones after continue it as if never cut
    assert resumed["curves"] == whole["curves"]
    assert [s for s, _ in resumed["curves"]["eval_loss"]] == [2, 4, 6, 8]
    assert (resumed["kept_step"], resumed["best_metric"]) == (whole["kept_step"], whole["best_metric"])
    adapter = "tiny/adapters/sentiment/adapter_model.safetensors"
    assert (tmp_path / "cut" / adapter).read_bytes() == (tmp_path / "whole" / adapter).read_bytes()


def test_a_malformed_validation_file_fails_before_training(tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    bad = tmp_path / "validation.jsonl"
    bad.write_text('{"prompt": "a", "completion": "b"}\n{"prompt": "c", "completion": "d"}\n{"prompt": 3}\n')
    tasks = (f"tasks=[{{name: sentiment, train: data/tasks/sentiment/train.jsonl, "
             f"test: data/tasks/sentiment/test.jsonl, validation: '{bad}'}}]")
    assert tune_cli(tiny_model_dir, tmp_path, tasks) == 2
    err = capsys.readouterr().err
    assert f"{bad}:3" in err and "edgetune: error:" in err
    assert not (tmp_path / "tiny" / "checkpoints").exists() and not (tmp_path / "tiny" / "adapters").exists()


@pytest.mark.parametrize(("sets", "message"), [
    (["tasks=[{name: s, train: data/tasks/sentiment/train.jsonl, test: data/tasks/sentiment/test.jsonl, "
      "validation: data/tasks/sentiment/test.jsonl}]"], "is the test file"),
    (["tune.validation_share=1.5"], "tune.validation_share"),
    (["tune.metric_for_best=accuracy"], "metric_for_best"),
])
def test_bad_validation_settings_are_config_errors(sets: list[str], message: str, tmp_path: Path,
                                                   tiny_model_dir: Path, capsys) -> None:
    assert tune_cli(tiny_model_dir, tmp_path, *sets) == 2
    assert message in capsys.readouterr().err


def test_a_share_that_leaves_nothing_to_train_on_or_text_rows_with_exact_match_fail_clearly(
        tmp_path: Path, tiny_model_dir: Path, capsys) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text('{"prompt": "a", "completion": "b"}\n')
    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "plain text"}\n' * 4)
    task = "tasks=[{{name: t, train: '{}', test: data/tasks/sentiment/test.jsonl}}]"
    assert tune_cli(tiny_model_dir, tmp_path, task.format(one)) == 2
    assert "cannot spare tune.validation_share" in capsys.readouterr().err
    assert tune_cli(tiny_model_dir, tmp_path, task.format(text), "tune.metric_for_best=exact_match") == 2
    assert "have no answers to match" in capsys.readouterr().err


def test_stop_rules_exact_match_then_loss_and_ties_keep_the_first() -> None:
    by_em, by_loss = Validation([], "", "exact_match", []), Validation([], "", "loss", [])

    def evals(*rows):  # (step, exact match over 4 rows, loss)
        return [{"step": s, "eval_exact_match": em, "eval_loss": loss, "eval_selection": selection(em, loss, 4)}
                for s, em, loss in rows]

    # equal exact match: the lower loss wins; a higher exact match beats any loss; an exact tie keeps the first
    history = evals((10, 0.5, 0.9), (20, 1.0, 0.30), (30, 1.0, 0.10), (40, 0.75, 0.01), (50, 1.0, 0.10))
    assert best_index(history, by_em) == 2
    assert stop_reason(history[:4], by_em, 2) is None
    assert "2 evaluations without a better validation exact match (ties: loss) than step 30's" in \
        stop_reason(history, by_em, 2)
    assert stop_reason(history, by_em, None) is None  # no patience: never
    assert selection(0.75, 0.0, 4) < selection(1.0, 1e9, 4)  # the loss term never outweighs one more right row
    loss = [{"step": s, "eval_loss": v} for s, v in ((2, 1.0), (4, 0.5), (6, 0.7), (8, 0.6))]
    assert best_index(loss, by_loss) == 1 and "2 evaluations without a better validation loss" in \
        stop_reason(loss, by_loss, 2)


def test_report_to_tensorboard_writes_event_files_offline(tmp_path: Path, tiny_model_dir: Path) -> None:
    assert tune_cli(tiny_model_dir, tmp_path, "tune.report_to=tensorboard") == 0
    events = list((tmp_path / "tiny/tracking/tensorboard/sentiment").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_report_to_without_its_package_names_the_extra(tmp_path: Path, tiny_model_dir: Path,
                                                       monkeypatch: pytest.MonkeyPatch, capsys) -> None:
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    assert tune_cli(tiny_model_dir, tmp_path, "tune.report_to=wandb") == 2
    assert "pip install 'edgetune[wandb]'" in capsys.readouterr().err
    assert not (tmp_path / "tiny" / "adapters").exists()
