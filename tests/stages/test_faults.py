"""The pipeline under ``kill -9``: killed in every stage, the same command run again recovers the same adapter.

Each killed run is a real ``edgetune pipeline`` process, SIGKILLed at a chosen point: a small start-up hook
(``_HOOK``) holds the process still right where a kill does the most harm (a checkpoint half written, an
output complete in its temporary folder but not yet in place) and says so on stdout; the test then kills
it. Holding it still makes the kill land in the stage named, every time, instead of racing a stage that
takes milliseconds on the tiny model. The rerun is the plain command (no hook), with and without ``--resume``.

After the last rerun: exit 0, every stage's output present, the adapter byte-identical to an uninterrupted
run's (and the merged model and the report's scores with it), no checkpoints and no ``.tmp-``/``.old-``
entry anywhere under the run.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Run as `python -c _HOOK POINT edgetune-args...`: POINT is checkpoint-N (kill while the Trainer writes
# checkpoint N: weights on disk, optimizer and trainer_state.json not yet) or a run sub-folder (adapters,
# merged, quantized, export, eval: kill once that stage's first output is complete in its temporary folder
# or file, before the rename that publishes it).
_HOOK = r"""
import contextlib, sys, time
from pathlib import Path

point, argv = sys.argv[1], sys.argv[2:]


def pause(where):
    print(f"PAUSED {where}", flush=True)
    time.sleep(300)  # the test kills the process long before this ends


if point.startswith("checkpoint-"):
    from transformers import Trainer

    step, real_save = int(point.split("-")[1]), Trainer._save_optimizer_and_scheduler

    def save(self, output_dir):
        if self.state.global_step == step:
            pause(output_dir)
        return real_save(self, output_dir)

    Trainer._save_optimizer_and_scheduler = save
else:
    from pipeline import artifacts

    real_dir, real_text = artifacts.atomic_dir, artifacts.write_text_atomic

    @contextlib.contextmanager
    def atomic_dir(final):
        with real_dir(final) as tmp:
            yield tmp
            if point in Path(final).parts[-3:-1]:
                pause(tmp)

    def write_text_atomic(path, text):
        if point in Path(path).parts[-3:-1]:
            tmp = path.with_name(artifacts._temporary_name(path.name, "tmp"))
            tmp.write_text(text)
            pause(tmp)
        return real_text(path, text)

    artifacts.atomic_dir, artifacts.write_text_atomic = atomic_dir, write_text_atomic

from pipeline.cli import main

sys.exit(main(argv))
"""


def command(tiny_model_dir: Path, out: Path, *, resume: bool) -> list[str]:
    """The edgetune arguments every run of a test repeats unchanged."""
    return ["pipeline", "--config", "configs/tiny.yaml", "--set", f"base={tiny_model_dir}", "--set", f"out_dir={out}",
            "--task", "sentiment", *(["--resume"] if resume else [])]


def run(args: list[str], log: Path) -> None:
    """Run edgetune to the end; it must succeed."""
    with log.open("a") as f:
        rc = subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, stdout=f, stderr=f,
                            timeout=600).returncode
    assert rc == 0, log.read_text()[-3000:]


def kill_at(point: str, args: list[str], log: Path) -> str:
    """Run edgetune until it reaches ``point``, SIGKILL it there; return what it was writing."""
    with log.open("a") as f:
        proc = subprocess.Popen([sys.executable, "-c", _HOOK, point, *args], cwd=ROOT, stdout=subprocess.PIPE,
                                stderr=f, text=True)
        try:
            for line in proc.stdout:
                if line.startswith("PAUSED "):
                    proc.kill()
                    proc.wait()
                    return line.split(" ", 1)[1].strip()
            proc.wait(timeout=600)
        finally:
            proc.kill()
            proc.stdout.close()
    raise AssertionError(f"the run ended (exit {proc.returncode}) without reaching {point}:\n"
                         f"{log.read_text()[-3000:]}")


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Path:
    """An uninterrupted run of the same command: what every recovered run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    run(command(tiny_model_dir, out, resume=False), out / "log.txt")
    return out / "tiny"


def assert_recovered(run_dir: Path, reference: Path) -> None:
    """Every stage's output is there and equals the uninterrupted run's; nothing temporary is left."""
    for folder in ("adapters/sentiment", "merged/sentiment", "quantized/sentiment-int8", "quantized/sentiment-nf4",
                   "export/safetensors/sentiment", "export/onnx/sentiment", "export/onnx-int8/sentiment",
                   "export/onnx-int4/sentiment", "export/edge"):
        assert (run_dir / folder / "manifest.json").is_file(), folder
    adapter = "adapters/sentiment/adapter_model.safetensors"
    assert (run_dir / adapter).read_bytes() == (reference / adapter).read_bytes()
    manifest = json.loads((run_dir / "adapters/sentiment/manifest.json").read_text())
    assert manifest["metrics"]["steps"] == 4  # tiny.yaml's max_steps: no step lost, none added on resume
    merged = [json.loads((d / "merged/sentiment/manifest.json").read_text())["outputs_sha256"]
              for d in (run_dir, reference)]
    assert merged[0] == merged[1]
    scores = [{a: (r["exact_match"], r["perplexity"])
               for a, r in json.loads((d / "report.json").read_text())["tasks"]["sentiment"]["artifacts"].items()}
              for d in (run_dir, reference)]
    assert scores[0] == scores[1]
    leftovers = [p for p in run_dir.rglob("*") if ".tmp-" in p.name or ".old-" in p.name]
    assert leftovers == [] and not (run_dir / "checkpoints" / "sentiment").exists()


def test_killed_in_every_stage_resume_recovers_the_same_adapter(tmp_path: Path, tiny_model_dir: Path,
                                                                reference: Path) -> None:
    """One run per kill point, each the same ``--resume`` command, each killed one stage further on."""
    args, log, run_dir = command(tiny_model_dir, tmp_path, resume=True), tmp_path / "log.txt", tmp_path / "tiny"
    checkpoints = run_dir / "checkpoints" / "sentiment"
    # the final checkpoint half written: checkpoint-2 is complete, and the next run resumes from it (a first
    # checkpoint half written, nothing to resume from: test_pipeline's in-process resume tests)
    assert Path(kill_at("checkpoint-4", args, log)) == checkpoints / "checkpoint-4"
    assert (checkpoints / "checkpoint-2" / "trainer_state.json").is_file()
    assert not (checkpoints / "checkpoint-4" / "trainer_state.json").exists()
    # training finished (checkpoint-4 complete), the adapter not yet in place: the next run trains no step
    kill_at("adapters", args, log)
    assert (checkpoints / "checkpoint-4" / "trainer_state.json").is_file()
    for point, output in (("merged", "merged/sentiment"), ("quantized", "quantized/sentiment-int8"),
                          ("export", "export/safetensors/sentiment"), ("eval", "report.json")):
        written = Path(kill_at(point, args, log))
        assert written.name.startswith(".") and written.exists()  # killed holding a finished temporary
        assert not (run_dir / output).exists()  # ... and nothing that looks complete
    run(args, log)
    text = log.read_text()
    assert "checkpoint-4 is incomplete" in text and "resuming from" in text and "restored, not trained" in text
    assert "left by a killed run" in text
    assert_recovered(run_dir, reference)


def test_killed_mid_training_a_plain_rerun_starts_over_to_the_same_adapter(tmp_path: Path, tiny_model_dir: Path,
                                                                          reference: Path) -> None:
    args, log = command(tiny_model_dir, tmp_path, resume=False), tmp_path / "log.txt"
    kill_at("checkpoint-4", args, log)
    run(args, log)
    assert "an interrupted run left checkpoints" in log.read_text()
    assert_recovered(tmp_path / "tiny", reference)
