"""Shared by the benchmark scripts: run a child process and measure it alone."""

from __future__ import annotations

import os
import shlex
import subprocess
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_measured(cmd: list[str], what: str) -> tuple[float, float]:
    """Run ``cmd`` from the repository root; return (wall seconds, the child's own peak RSS in MB).

    ``wait4`` reports the resource use of that child alone, so one benchmark's numbers never include
    another's. A non-zero exit ends the benchmark with ``what`` and the command in the message.
    """
    print("$", shlex.join(cmd), flush=True)
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT)
    _, status, usage = os.wait4(proc.pid, 0)
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"{what}: `{shlex.join(cmd)}` failed (exit {code})")
    return time.perf_counter() - started, usage.ru_maxrss / 1024  # Linux reports KiB


def write_results(out: Path, name: str, result: dict, lines: list[str]) -> int:
    """Finish a benchmark whose ``result`` has a ``checks`` dict: the markdown ``lines`` plus one PASS/FAIL line
    per check, written with the JSON to ``out/name.{json,md}`` (atomically) and printed. The exit status:
    0 when every check passed, else 1."""
    from pipeline.artifacts import write_json_atomic, write_text_atomic

    lines = [*lines, "", "Checks:", ""] + [f"- {'PASS' if ok else 'FAIL'}: {k}" for k, ok in result["checks"].items()]
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / f"{name}.json", result)
    write_text_atomic(out / f"{name}.md", "\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0 if all(result["checks"].values()) else 1
