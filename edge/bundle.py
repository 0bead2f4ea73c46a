"""The edge bundle: one folder a device needs to run every task, and the runner that serves it.

Layout (written by ``edgetune export`` with target ``edge``; see README "Edge bundle")::

    manifest.json            format, files ({bytes, sha256}), adapters, chat format, stop tokens
    model.onnx               the shared base (int4 by default), with LoRA inputs
    tokenizer.json, chat_template.jinja
    adapters/<task>.onnx_adapter   a LoRA adapter (ONNX Runtime adapter format)
    adapters/<task>.prefix.npz     a prompt-learning adapter as a key/value prefix
    merged/<task>.onnx             a task whose method has no adapter form here (DoRA, IA3, full...)

Only numpy, onnxruntime and tokenizers are imported: this runs where PyTorch is not installed.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.generation import Sampling, TextStream, token_budget
from edge.runtime import Decoder
from edge.session import Prefix, resolve_providers

MANIFEST = "manifest.json"
FORMAT = "edgetune-edge/1"
ADAPTER_KINDS = ("lora", "prefix", "merged")


class BundleError(ValueError):
    """The bundle is missing, incomplete, altered or asked for something it does not hold."""


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class AdapterEntry:
    name: str
    kind: str
    """``lora`` (.onnx_adapter over the shared base), ``prefix`` (key/value prefix) or ``merged`` (own model)."""
    file: str
    """Path relative to the bundle root."""


@dataclass
class Bundle:
    root: Path
    manifest: dict[str, Any]

    @property
    def adapters(self) -> dict[str, AdapterEntry]:
        return {name: AdapterEntry(name, a["kind"], a["file"]) for name, a in self.manifest.get("adapters", {}).items()}

    @property
    def model_path(self) -> Path:
        return self.root / self.manifest["model"]

    def render(self, prompt: str) -> str:
        """``prompt`` as one user turn in the model's chat format, ready for the answer."""
        chat = self.manifest["chat"]
        return chat["prefix"] + prompt + chat["suffix"]

    def verify(self) -> None:
        """Check every listed file against its sha256; raise :class:`BundleError` naming what differs."""
        problems = []
        for rel, record in self.manifest.get("files", {}).items():
            path = self.root / rel
            if not path.is_file():
                problems.append(f"{rel} is missing")
            elif path.stat().st_size != record["bytes"] or sha256(path) != record["sha256"]:
                problems.append(f"{rel} does not match its sha256 (changed or truncated)")
        if problems:
            raise BundleError(f"edge bundle {self.root} failed verification: " + "; ".join(problems)
                              + ". Re-export it with `edgetune export --task <task>` (export.targets has edge).")


def load_bundle(path: Path, *, verify: bool = True) -> Bundle:
    """Read the bundle at ``path`` (a folder with ``manifest.json``), by default verifying every file."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise BundleError(f"{path} is not an edge bundle (no {MANIFEST}); make one with `edgetune export` "
                          "(export.targets includes edge) or `make pipeline`; it lands in runs/<run>/export/edge")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise BundleError(f"{manifest_path} is not valid JSON ({exc}); re-export the bundle") from exc
    if manifest.get("format") != FORMAT:
        raise BundleError(f"{manifest_path}: format {manifest.get('format')!r}, this runtime reads {FORMAT!r}")
    bundle = Bundle(path, manifest)
    if verify:
        bundle.verify()
    return bundle


class EdgeRunner:
    """Generate text from a bundle: the shared base with any of its adapters, chosen per call.

    Thread-safe for concurrent calls (ONNX Runtime sessions are); adapters load lazily on first use.
    """

    def __init__(self, bundle: Bundle, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        """``threads``: CPU threads per session (None: one per core); ``providers``: ONNX Runtime execution
        providers in order of preference (``cpu``, ``cuda``; see :func:`edge.session.resolve_providers`)."""
        from tokenizers import Tokenizer

        self.bundle = bundle
        self.threads = threads
        self.providers = resolve_providers(providers)
        self.tokenizer = Tokenizer.from_file(str(bundle.root / bundle.manifest["tokenizer"]))
        self.base = Decoder(bundle.model_path, threads=threads, providers=self.providers)
        self.stop_ids = list(bundle.manifest.get("stop_token_ids", []))
        self.pad_id = int(bundle.manifest.get("pad_token_id", self.stop_ids[0] if self.stop_ids else 0))
        self.context_length = int(bundle.manifest.get("context_length", 2048))
        self._prefixes: dict[str, Prefix] = {}
        self._merged: dict[str, Decoder] = {}
        self._lock = threading.Lock()

    @property
    def adapter_names(self) -> list[str]:
        return sorted(self.bundle.adapters)

    def resolve(self, adapter: str | None) -> tuple[Decoder, str | None, Prefix | None]:
        """(decoder, LoRA adapter name, prefix) that run ``adapter`` (None: the bare base)."""
        if adapter is None:
            return self.base, None, None
        entry = self.bundle.adapters.get(adapter)
        if entry is None:
            raise BundleError(f"adapter {adapter!r} is not in the bundle (it has: {', '.join(self.adapter_names) or 'none'})")
        path = self.bundle.root / entry.file
        with self._lock:
            if entry.kind == "lora":
                if adapter not in self.base.adapters:
                    self.base.load_adapter(adapter, path)
                return self.base, adapter, None
            if entry.kind == "prefix":
                if adapter not in self._prefixes:
                    self._prefixes[adapter] = Prefix.load(path)
                return self.base, None, self._prefixes[adapter]
            if entry.kind == "merged":
                if adapter not in self._merged:
                    self._merged[adapter] = Decoder(path, threads=self.threads, providers=self.providers)
                return self._merged[adapter], None, None
        raise BundleError(f"adapter {adapter!r} has unknown kind {entry.kind!r} (known: {', '.join(ADAPTER_KINDS)})")

    def release(self, adapter: str | None) -> None:
        """Free what :meth:`resolve` loaded for ``adapter`` (it loads again on its next use)."""
        with self._lock:
            self.base.unload_adapter(adapter)
            self._prefixes.pop(adapter, None)
            self._merged.pop(adapter, None)

    def encode_chat(self, prompt: str) -> list[int]:
        return self.tokenizer.encode(self.bundle.render(prompt), add_special_tokens=False).ids

    def start(self, prompt_ids: list[int], max_tokens: int, *, adapter: str | None = None,
              sampling: Sampling | None = None, stop: Sequence[str] = ()) -> tuple[Iterator[int], TextStream]:
        """One generation, not run yet: its token ids (lazily, one forward each) and the :class:`TextStream`
        that turns them into text and says when to stop. ``max_tokens`` is clipped to the context
        (:func:`edge.generation.token_budget`, which raises ``ContextOverflow`` when the prompt fills it)."""
        decoder, lora, prefix = self.resolve(adapter)
        budget = token_budget(len(prompt_ids), prefix.length if prefix else 0, max_tokens, self.context_length)
        tokens = decoder.stream(prompt_ids, budget, adapter=lora, prefix=prefix, sampling=sampling)
        return tokens, TextStream(self.tokenizer, max_tokens=budget, stop=stop, stop_ids=self.stop_ids)

    def stream_text(self, prompt_ids: list[int], max_tokens: int, *, adapter: str | None = None,
                    sampling: Sampling | None = None, stop: Sequence[str] = ()) -> Iterator[str]:
        """Yield decoded text pieces as tokens arrive (a piece ends only on whole characters), up to a stop
        token, a ``stop`` string (cut before it) or the token budget."""
        tokens, text = self.start(prompt_ids, max_tokens, adapter=adapter, sampling=sampling, stop=stop)
        for token in tokens:
            piece = text.push(token)
            if piece:
                yield piece
            if text.finish_reason is not None:
                return

    def generate(self, prompt: str, *, adapter: str | None = None, max_tokens: int = 128,
                 sampling: Sampling | None = None, chat: bool = True) -> str:
        """The answer to ``prompt`` (as a chat user turn unless ``chat`` is False)."""
        ids = self.encode_chat(prompt) if chat else self.tokenizer.encode(prompt, add_special_tokens=False).ids
        return "".join(self.stream_text(ids, max_tokens, adapter=adapter, sampling=sampling))
