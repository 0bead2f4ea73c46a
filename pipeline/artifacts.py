"""The artifact contract: atomic output folders and the ``manifest.json`` beside every output.

A stage writes into a temporary sibling folder and renames it into place only when complete, so
a killed run never leaves a folder that looks finished. Its manifest records the inputs (with
sha256), the config hash, library versions, sizes and measured metrics; the *fingerprint* (a hash
of everything the output depends on) lets a re-run with unchanged inputs be a no-op.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import platform
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

from pipeline.errors import EdgetuneError

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
_LIBRARIES = ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "optimum", "optimum-onnx",
              "onnx", "onnxruntime", "gguf", "safetensors", "tokenizers", "edgetune")


def sha256_file(path: Path, _cache: dict[tuple[str, int, int], str] = {}) -> str:  # noqa: B006
    """sha256 of a file's bytes, memoised per (path, size, mtime) within the process."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if key not in _cache:
        h = hashlib.sha256()
        with path.open("rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        _cache[key] = h.hexdigest()
    return _cache[key]


def digest(path: Path) -> str:
    """Content digest of a file or folder.

    A folder with a manifest is identified by its manifest's fingerprint and outputs digest (the
    stage that wrote it already hashed its files: read, never re-derive; the fingerprint covers what
    the folder refers to but does not contain, such as a shared quantized base). Other folders hash
    every file.
    """
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    manifest = read_manifest(path)
    if manifest and "outputs_sha256" in manifest:
        return hashlib.sha256(f"{manifest.get('fingerprint')}:{manifest['outputs_sha256']}".encode()).hexdigest()
    return _hash_tree(path)


def _hash_tree(path: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file() and p.name != MANIFEST):
        h.update(str(f.relative_to(path)).encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


def dir_size(path: Path) -> int:
    """Bytes on disk of a file or every file under a folder (the manifest excluded)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and p.name != MANIFEST)


def library_versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _LIBRARIES:
        with contextlib.suppress(metadata.PackageNotFoundError):
            out[name] = metadata.version(name)
    return out


def fingerprint(stage: str, inputs: Mapping[str, Path | str], config_hash: str) -> tuple[str, dict[str, Any]]:
    """Hash of what a stage's output depends on; also returns the per-input records."""
    records = {}
    for name, value in sorted(inputs.items()):
        if isinstance(value, Path):
            records[name] = {"path": str(value), "sha256": digest(value)}
        else:  # a hub id or other non-file input: identified by its name
            records[name] = {"id": str(value)}
    blob = json.dumps({"stage": stage, "inputs": records, "config": config_hash}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16], records


def read_manifest(path: Path) -> dict[str, Any] | None:
    """The manifest of an output folder, or None if the folder is not a finished output."""
    file = Path(path) / MANIFEST
    if not file.is_file():
        return None
    try:
        return json.loads(file.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def is_fresh(out: Path, fp: str) -> bool:
    """Whether ``out`` is a finished output made from exactly the same inputs and settings."""
    manifest = read_manifest(out)
    return bool(manifest) and manifest.get("fingerprint") == fp


def write_manifest(
    out: Path,
    *,
    stage: str,
    fp: str,
    inputs: Mapping[str, Any],
    config_hash: str,
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Write ``out/manifest.json`` describing the (complete) files in ``out``; return it."""
    files = {
        str(p.relative_to(out)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(out.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "stage": stage,
        "fingerprint": fp,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "inputs": dict(inputs),
        "config_hash": config_hash,
        "versions": library_versions(),
        "size_bytes": sum(f["bytes"] for f in files.values()),
        "files": files,
        "outputs_sha256": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        "metrics": dict(metrics or {}),
        **dict(extra or {}),
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")
    return manifest


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces ``final`` only if the block succeeds.

    On error the temporary folder is removed and any previous ``final`` is left untouched. A kill leaves
    only dot-named siblings (``.<name>.tmp-<pid>-<hex>``, and for a moment ``.<name>.old-<pid>-<hex>``);
    the next write of ``final`` first cleans those of dead processes (:func:`remove_stale_temporaries`).
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(final.parent, name=final.name)
        tmp = final.parent / _temporary_name(final.name, "tmp")
        tmp.mkdir()
    except OSError as exc:
        raise EdgetuneError(
            f"cannot write to {final.parent}: {exc.strerror or exc}; choose a writable out_dir "
            "(--set out_dir=PATH) or fix the folder's permissions"
        ) from exc
    try:
        yield tmp
        old = None
        if final.exists():
            old = final.parent / _temporary_name(final.name, "old")
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# Temporary siblings: ``.<name>.tmp-<pid>-<hex>`` (being written) and ``.<name>.old-<pid>-<hex>`` (the output
# it replaces, between two renames). Names written before the pid was recorded have none.
_TEMPORARY = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[0-9a-f]{6}$")


def _temporary_name(name: str, kind: str) -> str:
    return f".{name}.{kind}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


@contextlib.contextmanager
def scratch_dir(parent: Path, name: str) -> Iterator[Path]:
    """A folder under ``parent`` for files that are used and deleted (never published), named like the
    stages' temporaries so that what a killed run leaves is cleaned by the next one."""
    path = Path(parent) / _temporary_name(name, "tmp")
    path.mkdir(parents=True)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def remove_stale_temporaries(root: Path, *, name: str | None = None) -> list[Path]:
    """Clean what killed writers left under ``root``; return the entries removed or restored.

    ``name`` given: only ``root``'s own temporary siblings of that output (an atomic write's start).
    Otherwise the whole tree (a run's start). An entry is stale when the process named in it is gone, or
    started after the entry was last written (its pid was reused); a live concurrent writer's entries are
    kept. A stale ``.old-`` folder is the complete output a killed writer was replacing: it is moved back
    into place when nothing took that place, else removed.
    """
    root = Path(root)
    found: list[tuple[Path, re.Match]] = []
    walk = [(str(root), [], os.listdir(root))] if name is not None and root.is_dir() else os.walk(root)
    for folder, subfolders, files in walk:
        for entry in [*subfolders, *files]:
            match = _TEMPORARY.match(entry)
            if match and (name is None or match["name"] == name):
                found.append((Path(folder) / entry, match))
        subfolders[:] = [d for d in subfolders if not _TEMPORARY.match(d)]  # never descend into one
    cleaned = []
    for path, match in found:
        with contextlib.suppress(FileNotFoundError):  # a concurrent sweep got there first
            if not _stale(path, int(match["pid"]) if match["pid"] else None):
                continue
            final = path.parent / match["name"]
            if match["kind"] == "old" and not final.exists():
                path.rename(final)
                log.warning("restored %s, which a killed run was replacing", final)
            elif path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
                log.info("removed %s, left by a killed run", path)
            else:
                path.unlink()
                log.info("removed %s, left by a killed run", path)
            cleaned.append(path)
    return cleaned


def _stale(path: Path, pid: int | None) -> bool:
    """Whether the writer of ``path`` (process ``pid``; None: unrecorded) can no longer be writing it."""
    written = path.lstat().st_mtime
    if pid is None:  # an older edgetune's entry: stale once older than this process
        pid = os.getpid()
    else:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, another user's
    started = _process_start(pid)
    # /proc's boot time is whole seconds: allow one, erring towards keeping a live writer's entry
    return started is not None and written < started - 1.0


def _process_start(pid: int) -> float | None:
    """Start time (epoch seconds) of process ``pid`` from /proc; None where /proc cannot tell (not Linux)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        ticks = int(stat[stat.rindex(")") + 2:].split()[19])  # field 22, starttime, in clock ticks since boot
        boot = next(int(line.split()[1]) for line in Path("/proc/stat").read_text().splitlines()
                    if line.startswith("btime "))
        return boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return None


def check_writable(folder: Path) -> None:
    """Fail early, before any work, if outputs cannot be written under ``folder``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{uuid.uuid4().hex[:6]}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise EdgetuneError(
            f"output folder {folder} is not writable ({exc.strerror or exc}); "
            "pass --set out_dir=PATH with a writable folder"
        ) from exc


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file and rename, so readers never see half a file."""
    write_text_atomic(path, json.dumps(data, indent=2) + "\n")


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary sibling and rename (stale siblings of killed writers go first)."""
    write_bytes_atomic(path, text.encode())


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a temporary sibling and rename (stale siblings of killed writers go first)."""
    remove_stale_temporaries(path.parent, name=path.name)
    tmp = path.with_name(_temporary_name(path.name, "tmp"))
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
