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

    On error the temporary folder is removed and any previous ``final`` is left untouched.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:6]}"
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
            old = final.parent / f".{final.name}.old-{uuid.uuid4().hex[:6]}"
            final.rename(old)
        tmp.rename(final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:6]}")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:6]}")
    tmp.write_text(text)
    tmp.replace(path)
