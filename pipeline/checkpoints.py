"""Tune's resumable checkpoints: which are complete, which belong to this run, which to resume from.

transformers' ``Trainer`` (4.57, ``Trainer._save_checkpoint``) writes ``checkpoint-N/`` in place, in this
order: the weights (``adapter_model.safetensors`` for a PEFT model, ``model.safetensors`` or a sharded
index for a whole model), ``optimizer.pt``, ``scheduler.pt`` (``scaler.pt`` under fp16), the RNG state
(``rng_state.pth``, ``rng_state_<rank>.pth`` under DDP) and ``trainer_state.json`` last; only then does it
delete checkpoints beyond ``save_total_limit``. A kill therefore leaves the newest folder empty or partial
while the one before it is still whole.

A checkpoint is **complete** when ``trainer_state.json`` parses and records the folder's own step, the
weights' safetensors header parses, and optimizer, scheduler and RNG state are present and non-empty
(written before the state file, so present means finished). Only complete checkpoints are resumed from;
incomplete ones are removed with a log line.

The folder also holds the fingerprint of the tune it belongs to (inputs and settings, as in the adapter's
manifest): checkpoints of other settings or data are never resumed from.
"""

from __future__ import annotations

import json
import logging
import shutil
import struct
from pathlib import Path

log = logging.getLogger(__name__)

STATE = "trainer_state.json"
FINGERPRINT = "edgetune-fingerprint"
_WEIGHTS = ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json")
_REQUIRED = ("optimizer.pt", "scheduler.pt")


def step_of(folder: Path) -> int | None:
    """The step a ``checkpoint-N`` folder is named after (None for any other name)."""
    prefix, _, number = folder.name.rpartition("-")
    return int(number) if prefix == "checkpoint" and number.isdigit() else None


def is_complete(folder: Path) -> bool:
    """Whether ``folder`` is a checkpoint the Trainer finished writing (see the module docstring)."""
    step = step_of(folder)
    if step is None or not folder.is_dir():
        return False
    try:
        state = json.loads((folder / STATE).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return False
    if not isinstance(state, dict) or state.get("global_step") != step:
        return False
    weights = [folder / name for name in _WEIGHTS if (folder / name).is_file()]
    if not weights or not all(_readable_weights(w) for w in weights):
        return False
    rng = list(folder.glob("rng_state*.pth"))
    return all(_non_empty(folder / name) for name in _REQUIRED) and bool(rng) and all(map(_non_empty, rng))


def global_step(folder: Path) -> int:
    """The optimizer steps a complete checkpoint holds."""
    return int(json.loads((folder / STATE).read_text(encoding="utf-8"))["global_step"])


def log_history(folder: Path) -> list[dict]:
    """The Trainer's log history up to a complete checkpoint (losses and evaluations, in order)."""
    return list(json.loads((folder / STATE).read_text(encoding="utf-8")).get("log_history", []))


def remove(folder: Path) -> None:
    """Remove a finished tune's checkpoints (the adapter holds what was kept)."""
    shutil.rmtree(folder, ignore_errors=True)


def last_complete(folder: Path) -> Path | None:
    """The complete checkpoint of the highest step under ``folder`` (None if there is none)."""
    found = [p for p in folder.glob("checkpoint-*") if step_of(p) is not None and is_complete(p)] \
        if folder.is_dir() else []
    return max(found, key=lambda p: step_of(p) or 0, default=None)


def prepare(folder: Path, fp: str, *, resume: bool, what: str) -> None:
    """Make ``folder`` hold only checkpoints this tune (fingerprint ``fp``) can resume from; main process only.

    Without ``resume`` every earlier checkpoint is removed. With it, checkpoints of another fingerprint (other
    data or settings, or written before fingerprints were recorded) are removed, and so are incomplete ones
    (a kill while the Trainer wrote them). Each removal is logged under ``what`` (e.g. ``tune sentiment``).
    """
    if folder.is_dir():
        if not resume:
            if any(folder.iterdir()):
                log.info("%s: an interrupted run left checkpoints in %s; removed (pass --resume to continue "
                         "from them instead)", what, folder)
            shutil.rmtree(folder)
        elif _read_fingerprint(folder) != fp:
            log.warning("%s: the checkpoints in %s were made from other data or settings; removed, training "
                        "from scratch", what, folder)
            shutil.rmtree(folder)
        else:
            for p in sorted(folder.glob("checkpoint-*")):
                if p.is_dir() and not is_complete(p):
                    log.warning("%s: %s is incomplete (the run was killed while writing it); removed", what, p)
                    shutil.rmtree(p)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / FINGERPRINT).write_text(fp + "\n")


def _read_fingerprint(folder: Path) -> str | None:
    try:
        return (folder / FINGERPRINT).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None


def _non_empty(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _readable_weights(path: Path) -> bool:
    """A safetensors file whose header length and JSON header are whole (an index: valid JSON)."""
    try:
        with path.open("rb") as f:
            if path.suffix == ".json":
                json.load(f)
                return True
            head = f.read(8)
            if len(head) < 8:
                return False
            size = struct.unpack("<Q", head)[0]
            header = json.loads(f.read(size))
            end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
            return path.stat().st_size >= 8 + size + end
    except (OSError, ValueError, KeyError, TypeError, IndexError, struct.error):
        return False
