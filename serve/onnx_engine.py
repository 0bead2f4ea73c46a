"""The ONNX backend of the server: an edge bundle's base and adapters on ONNX Runtime, no PyTorch.

It offers the torch engine's interface to :mod:`serve.app` (``submit``, ``load``, ``unload``,
``adapters``, ``known_sources``...), so routes, auth, metrics and back-pressure are the same. One
worker thread owns generation: it admits up to ``max_batch_size`` requests and advances each by
one token in turn, so concurrent requests all stream (interleaved, batch-1 forwards: a LoRA
adapter is a per-run setting in ONNX Runtime, so rows of different adapters cannot share a run).
Adapters are the bundle's; ``POST /v1/adapters`` loads one by name, and every bundle adapter
loads on its first request.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from serve.adapters import AdapterError, AdapterInfo
from serve.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    info: AdapterInfo
    source: str
    pinned: bool
    loaded_at: float


@dataclass
class _Running:
    request: Any
    source: str | None
    """The bundle adapter it runs (None: the base): not released while this runs."""
    tokens: Iterator[int]
    ids: list
    text: str = ""


class BundleTokenizer:
    """The slice of a Hugging Face tokenizer the app uses, over ``tokenizers`` and the bundle's chat format."""

    def __init__(self, runner) -> None:
        self.runner = runner
        self.inner = runner.tokenizer
        template = runner.bundle.root / "chat_template.jinja"
        self.chat_template = template.read_text() if template.is_file() else None
        self.eos_token_id = runner.stop_ids[0] if runner.stop_ids else None

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        return {"input_ids": self.inner.encode(text, add_special_tokens=add_special_tokens).ids}

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.inner.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tokenize: bool = False, add_generation_prompt: bool = True) -> str:
        """One user turn: the bundle's exact prefix/suffix; anything else: the Jinja template (needs jinja2)."""
        if len(messages) == 1 and messages[0]["role"] == "user":
            return self.runner.bundle.render(messages[0]["content"])
        try:
            from jinja2.sandbox import ImmutableSandboxedEnvironment
        except ImportError as exc:
            raise AdapterError("multi-message chats on the ONNX backend need jinja2 (pip install jinja2); "
                               "a single user message works without it", status=400) from exc

        def raise_exception(message: str):
            raise AdapterError(f"chat template: {message}", status=400)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = raise_exception
        return env.from_string(self.chat_template or "").render(
            messages=messages, add_generation_prompt=add_generation_prompt,
            eos_token=self.decode([self.eos_token_id], skip_special_tokens=False) if self.eos_token_id is not None else "")


class OnnxEngine(Worker):
    """Generation over an edge bundle; same public interface as :class:`serve.engine.Engine`."""

    def __init__(self, runner, *, max_batch_size: int = 16, max_queue: int = 64, max_loaded_adapters: int = 8) -> None:
        self.runner = runner
        self.tokenizer = BundleTokenizer(runner)
        self.max_batch_size = max_batch_size
        self.max_loaded_adapters = max_loaded_adapters
        self.context_length = runner.context_length
        self.adapters: OrderedDict[str, _Loaded] = OrderedDict()
        # every bundle adapter can be asked for by name: it loads on its first request
        self.known_sources: dict[str, tuple[str, bool]] = {name: (name, False) for name in runner.adapter_names}
        self.failed: dict[str, str] = {}
        self.on_step: Callable[[int], None] = lambda batch_size: None
        self.resolver: Callable[[str, str], AdapterInfo] = self.inspect
        self.active: list[_Running] = []
        self._start_worker(max_queue, "edgetune-onnx-engine")

    # ---- public API (any thread) -------------------------------------------------------------
    def inspect(self, name: str, source: str) -> AdapterInfo:
        """The bundle adapter ``source`` (its name in the bundle) as ``name``; 404 if the bundle lacks it."""
        entry = self.runner.bundle.adapters.get(source)
        if entry is None:
            raise AdapterError(f"the edge bundle has no adapter {source!r} (it has: "
                               f"{', '.join(self.runner.adapter_names) or 'none'}); the ONNX backend serves "
                               "the bundle's adapters, re-export the bundle to add one", status=404)
        return AdapterInfo(name, self.runner.bundle.root / entry.file, entry.kind, None)

    def load(self, info: AdapterInfo, source: str, pinned: bool = False) -> _Loaded:
        """Load bundle adapter ``source`` under ``info.name`` (worker thread, via run_command)."""
        started = time.perf_counter()
        self.runner.resolve(source)  # loads the .onnx_adapter / prefix / merged model
        entry = _Loaded(info, source, pinned, time.time())
        self._register(info.name, entry, source, pinned)
        log.info("onnx engine: adapter %s (%s) ready in %.0f ms", info.name, info.kind,
                 1000 * (time.perf_counter() - started))
        return entry

    def unload(self, name: str) -> bool:
        """Unload ``name``; like the torch engine, it is then unknown until ``POST /v1/adapters`` loads it."""
        entry = self._forget(name)
        if entry is None:
            return False
        self._release(entry.source)
        return True

    def _evict(self, keep: str | None = None) -> None:
        busy = {r.source for r in self.active}
        while len(self.adapters) > self.max_loaded_adapters:
            victim = next((n for n, a in self.adapters.items()
                           if not a.pinned and n != keep and a.source not in busy), None)
            if victim is None:
                return
            self._release(self.adapters.pop(victim).source)

    def _release(self, source: str) -> None:
        """Free a bundle adapter's memory unless a running request or another loaded name still uses it."""
        if not any(r.source == source for r in self.active) and \
                not any(a.source == source for a in self.adapters.values()):
            self.runner.release(source)

    # ---- the worker loop ---------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            self._admit()
            if not self.active:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.on_step(len(self.active))
            for running in list(self.active):
                self._advance(running)

    def _admit(self) -> None:
        from edge.runtime import Sampling

        while len(self.active) < self.max_batch_size and not self.pending.empty():
            request = self.pending.get_nowait()
            if request.cancelled:
                continue
            try:
                source = None
                if request.adapter is not None:
                    if request.adapter not in self.adapters:
                        source, pinned = self.known_sources[request.adapter]
                        self.load(self.inspect(request.adapter, source), source, pinned)
                    self.adapters.move_to_end(request.adapter)
                    source = self.adapters[request.adapter].source
                decoder, lora, prefix = self.runner.resolve(source)
                sampling = Sampling(request.temperature, request.top_p, request.seed)
                tokens = decoder.stream(request.prompt_ids, request.max_tokens, adapter=lora, prefix=prefix,
                                        sampling=sampling, stop_ids=self.runner.stop_ids)
                self.active.append(_Running(request, source, tokens, []))
            except Exception as exc:  # noqa: BLE001 - reported to the request, the server goes on
                log.exception("onnx engine: request failed to start")
                request.on_done("error", 0, str(exc))

    def _advance(self, running: _Running) -> None:
        request = running.request
        if request.cancelled:
            self._finish(running, "stop", None)
            return
        if request.deadline is not None and time.monotonic() > request.deadline:
            self._finish(running, "timeout", None)
            return
        try:
            token = next(running.tokens)
        except StopIteration:  # a stop token, or the token budget
            reason = "length" if len(running.ids) >= request.max_tokens else "stop"
            self._finish(running, reason, None)
            return
        except Exception as exc:  # noqa: BLE001
            log.exception("onnx engine: generation failed")
            self._finish(running, "error", str(exc))
            return
        running.ids.append(token)
        text = self.tokenizer.decode(running.ids)
        for stop in request.stop:
            cut = text.find(stop)
            if cut != -1:
                if cut > len(running.text):
                    request.on_text(text[len(running.text):cut])
                self._finish(running, "stop", None)
                return
        if not text.endswith("\ufffd") and len(text) > len(running.text):
            request.on_text(text[len(running.text):])
            running.text = text
        if len(running.ids) >= request.max_tokens:
            self._finish(running, "length", None)

    def _finish(self, running: _Running, reason: str, error: str | None) -> None:
        self.active.remove(running)
        if running.source is not None:  # its adapter may have been unloaded or evicted while it ran
            self._release(running.source)
        running.request.on_done(reason, len(running.ids), error)


def start_onnx_engine(bundle_path: Path, settings) -> tuple[OnnxEngine, str]:
    """Load the bundle (verified) and start the engine; returns it and the base's public name."""
    from edge.bundle import BundleError, EdgeRunner, load_bundle

    try:
        bundle = load_bundle(bundle_path)
    except BundleError as exc:
        raise AdapterError(str(exc), status=500) from exc
    runner = EdgeRunner(bundle, threads=settings.num_threads or None)
    engine = OnnxEngine(runner, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                        max_loaded_adapters=settings.max_loaded_adapters)
    return engine, str(bundle.manifest.get("base_name") or "base")
