"""The artifact contract: atomic folders, manifests, fingerprints."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline.artifacts import (
    atomic_dir,
    check_writable,
    digest,
    fingerprint,
    is_fresh,
    remove_stale_temporaries,
    write_json_atomic,
    write_manifest,
)
from pipeline.errors import EdgetuneError


def test_atomic_dir_publishes_only_on_success(tmp_path: Path) -> None:
    final = tmp_path / "out"
    with atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("v1")
    assert (final / "a.txt").read_text() == "v1"
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("killed mid-write")
    assert (final / "a.txt").read_text() == "v1"  # the previous output survives
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temp folder left


def test_manifest_fingerprint_and_digest(tmp_path: Path) -> None:
    src = tmp_path / "train.jsonl"
    src.write_text("{}\n")
    fp, inputs = fingerprint("tune", {"train": src, "base": "org/model"}, "cfg1")
    out = tmp_path / "out"
    with atomic_dir(out) as tmp:
        (tmp / "w.bin").write_bytes(b"123")
        manifest = write_manifest(tmp, stage="tune", fp=fp, inputs=inputs, config_hash="cfg1", metrics={"x": 1})
    assert is_fresh(out, fp)
    assert manifest["size_bytes"] == 3 and manifest["files"]["w.bin"]["bytes"] == 3
    assert inputs["train"]["sha256"] and inputs["base"] == {"id": "org/model"}
    assert digest(out) != manifest["outputs_sha256"] and len(digest(out)) == 64
    assert fingerprint("tune", {"train": src, "base": "org/model"}, "cfg2")[0] != fp
    src.write_text("{}\n{}\n")
    assert fingerprint("tune", {"train": src, "base": "org/model"}, "cfg1")[0] != fp


def test_check_writable_under_a_file(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(EdgetuneError, match="not writable"):
        check_writable(blocker / "run")


def test_export_record_is_read_back_and_refused_once_the_adapter_changed(tmp_path: Path) -> None:
    """Evaluate reads why export skipped a target from export's record, never from a record of an older adapter."""
    from pipeline.adapter_spec import MANIFEST_KEY, AdapterSpec
    from pipeline.config import load_config
    from pipeline.paths import adapter_dir, export_record
    from pipeline.stage_outputs import export_skips, tuned_spec, write_export_record

    cfg = load_config("configs/tiny.yaml", [f"out_dir={tmp_path}"])
    task = cfg.task("sentiment")

    def tune_output(fp: str) -> None:
        with atomic_dir(adapter_dir(cfg, task)) as tmp:
            write_manifest(tmp, stage="tune", fp=fp, inputs={}, config_hash="",
                           extra={MANIFEST_KEY: AdapterSpec(kind="prefix", num_virtual_tokens=4).to_manifest()})

    with pytest.raises(EdgetuneError, match="run `edgetune tune`"):
        tuned_spec(cfg, task)
    tune_output("first")
    assert export_skips(cfg, task) == {} and not tuned_spec(cfg, task).mergeable  # export has not run yet
    write_export_record(cfg, task, {"edge": "bundle"}, {"onnx": "virtual tokens"})
    assert export_skips(cfg, task) == {"onnx": "virtual tokens"}
    written = export_record(cfg, task).stat().st_mtime_ns
    write_export_record(cfg, task, {"edge": "bundle"}, {"onnx": "virtual tokens"})
    assert export_record(cfg, task).stat().st_mtime_ns == written  # unchanged: not rewritten
    tune_output("second")  # retrained with other settings: the record no longer describes it
    with pytest.raises(EdgetuneError, match="describes an earlier tune result"):
        export_skips(cfg, task)


def dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    import subprocess
    import sys

    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(proc.stdout)


def test_a_killed_writers_temporaries_go_at_the_next_write_a_live_writers_stay(tmp_path: Path) -> None:
    import os

    dead = tmp_path / f".out.tmp-{dead_pid()}-abcdef"
    (dead / "sub").mkdir(parents=True)
    live = tmp_path / f".out.tmp-{os.getpid()}-123456"  # a concurrent write of this (live) process
    live.mkdir()
    other = tmp_path / f".other.tmp-{dead_pid()}-aaaaaa"  # another output's: left to that output's next write
    other.mkdir()
    with atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("v1")
    assert not dead.exists() and live.is_dir() and other.is_dir()


def test_a_reused_pid_does_not_keep_a_stale_temporary(tmp_path: Path) -> None:
    import os

    # this process's pid, but written before this process started: its writer was another process
    stale = tmp_path / f".out.tmp-{os.getpid()}-abcdef"
    stale.mkdir()
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    legacy = tmp_path / ".out.old-abc123"  # a name from before pids were recorded, as old
    legacy.mkdir()
    os.utime(legacy, (1_000_000_000, 1_000_000_000))
    (tmp_path / "out").mkdir()
    assert sorted(remove_stale_temporaries(tmp_path)) == sorted([stale, legacy])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_an_output_killed_between_its_two_renames_is_restored(tmp_path: Path) -> None:
    # atomic_dir moves the old output aside, then the new one into place: killed in between, neither is there
    old = tmp_path / "run" / "merged" / f".t.old-{dead_pid()}-abcdef"
    old.mkdir(parents=True)
    (old / "manifest.json").write_text("{}")
    half = tmp_path / "run" / "eval" / f".x.json.tmp-{dead_pid()}-abcdef"  # an atomic file write, killed
    half.parent.mkdir()
    half.write_text("{")
    remove_stale_temporaries(tmp_path / "run")
    assert (tmp_path / "run" / "merged" / "t" / "manifest.json").is_file() and not old.exists()
    assert not half.exists()
    half.write_text("{")  # killed again: the next write of x.json clears it
    write_json_atomic(tmp_path / "run" / "eval" / "x.json", {"a": 1})
    assert [p.name for p in (tmp_path / "run" / "eval").iterdir()] == ["x.json"]
