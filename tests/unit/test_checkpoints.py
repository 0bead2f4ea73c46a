"""Tune's checkpoints: what counts as complete, which one is resumed from, what is cleared and when."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from pipeline import checkpoints


def write_checkpoint(folder: Path, step: int, *, drop: str | None = None) -> Path:
    """A checkpoint as the Trainer leaves it, with the file ``drop`` not (yet) written."""
    ckpt = folder / f"checkpoint-{step}"
    ckpt.mkdir(parents=True)
    save_file({"w": np.zeros((2, 2), dtype=np.float32)}, str(ckpt / "adapter_model.safetensors"))
    for name in ("optimizer.pt", "scheduler.pt", "rng_state.pth"):
        (ckpt / name).write_bytes(b"x")
    (ckpt / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    if drop:
        (ckpt / drop).unlink()
    return ckpt


def test_a_complete_checkpoint_has_every_file_and_its_own_step(tmp_path: Path) -> None:
    assert checkpoints.is_complete(write_checkpoint(tmp_path, 2))
    assert checkpoints.global_step(tmp_path / "checkpoint-2") == 2
    (tmp_path / "checkpoint-3").mkdir()  # killed as the folder appeared
    assert not checkpoints.is_complete(tmp_path / "checkpoint-3")


@pytest.mark.parametrize("drop", ["trainer_state.json", "optimizer.pt", "scheduler.pt", "rng_state.pth",
                                  "adapter_model.safetensors"])
def test_a_checkpoint_missing_any_file_is_incomplete(tmp_path: Path, drop: str) -> None:
    assert not checkpoints.is_complete(write_checkpoint(tmp_path, 4, drop=drop))


def test_truncated_files_and_a_state_of_another_step_are_incomplete(tmp_path: Path) -> None:
    weights = write_checkpoint(tmp_path, 2) / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4])  # killed while the weights were written
    assert not checkpoints.is_complete(tmp_path / "checkpoint-2")
    state = write_checkpoint(tmp_path, 4) / "trainer_state.json"
    state.write_text('{"global_st')
    assert not checkpoints.is_complete(tmp_path / "checkpoint-4")
    state.write_text(json.dumps({"global_step": 2}))
    assert not checkpoints.is_complete(tmp_path / "checkpoint-4")
    (tmp_path / "checkpoint-4" / "scheduler.pt").write_bytes(b"")
    state.write_text(json.dumps({"global_step": 4}))
    assert not checkpoints.is_complete(tmp_path / "checkpoint-4")


def test_resume_keeps_the_last_complete_checkpoint_and_removes_partial_ones(tmp_path: Path) -> None:
    folder = tmp_path / "ckpt"
    checkpoints.prepare(folder, "fp1", resume=False, what="tune t")
    write_checkpoint(folder, 2)
    write_checkpoint(folder, 4, drop="trainer_state.json")
    (folder / "checkpoint-6").mkdir()
    assert checkpoints.last_complete(folder) == folder / "checkpoint-2"
    checkpoints.prepare(folder, "fp1", resume=True, what="tune t")
    assert sorted(p.name for p in folder.iterdir()) == ["checkpoint-2", checkpoints.FINGERPRINT]


def test_checkpoints_of_other_settings_or_without_resume_are_cleared(tmp_path: Path, caplog) -> None:
    folder = tmp_path / "ckpt"
    write_checkpoint(folder, 2)  # no fingerprint: written before fingerprints were recorded
    with caplog.at_level("INFO"):
        checkpoints.prepare(folder, "fp1", resume=True, what="tune t")
    assert "other data or settings" in caplog.text and checkpoints.last_complete(folder) is None
    write_checkpoint(folder, 2)
    checkpoints.prepare(folder, "fp2", resume=True, what="tune t")
    assert checkpoints.last_complete(folder) is None
    write_checkpoint(folder, 2)
    checkpoints.prepare(folder, "fp2", resume=False, what="tune t")
    assert checkpoints.last_complete(folder) is None and (folder / checkpoints.FINGERPRINT).read_text() == "fp2\n"
