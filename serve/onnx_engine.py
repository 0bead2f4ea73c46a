"""The ONNX backend of the server: an edge bundle's base and adapters on ONNX Runtime, no PyTorch.

It satisfies the same :class:`serve.protocol.GenerationEngine` as the torch engine (``submit``, ``load``,
``unload``, ``registry``...), so routes, auth, metrics and back-pressure are the same. One
worker thread owns generation: it admits up to ``max_batch_size`` requests and advances each by
one token in turn, so concurrent requests all stream (interleaved, batch-1 forwards: a LoRA
adapter is a per-run setting in ONNX Runtime, so rows of different adapters cannot share a run).
Adapters are the bundle's; ``POST /v1/adapters`` loads one by name, and every bundle adapter
loads on its first request.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edge.generation import ContextOverflow, FinishReason, Sampling, TextStream
from serve.adapters import AdapterError, AdapterInfo
from serve.registry import AdapterRegistry
from serve.worker import Worker

log = logging.getLogger(__name__)


@dataclass
class _Loaded:
    """A loaded bundle adapter (the registry's handle)."""

    info: AdapterInfo
    source: str
    """Its name in the bundle (several public names may share one)."""


@dataclass
class _Running:
    """A request being generated: its tokens (one forward per ``next``) and their text."""

    request: Any
    source: str | None
    """The bundle adapter it runs (None: the base): not released while this runs."""
    tokens: Iterator[int]
    text: TextStream


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
        self.registry: AdapterRegistry[_Loaded] = AdapterRegistry()
        for name in runner.adapter_names:  # every bundle adapter can be asked for by name: it loads on first use
            self.registry.known(name, name, runner.bundle.adapters[name].kind)
        self.on_step: Callable[[int], None] = lambda batch_size: None
        self.resolver: Callable[[str, str], AdapterInfo] = self.inspect
        self.active: list[_Running] = []
        self._start_worker(max_queue, "edgetune-onnx-engine", self._run)

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
        """Load bundle adapter ``source`` under ``info.name``, registered READY (worker thread, via run_command)."""
        started = time.perf_counter()
        self.runner.resolve(source)  # loads the .onnx_adapter / prefix / merged model
        entry = _Loaded(info, source)
        old = self.registry.ready(info.name, entry, source, pinned, info.kind)
        if old is not None and old.source != source:
            self._release(old.source)
        self._evict(keep=info.name)
        log.info("onnx engine: adapter %s (%s) ready in %.0f ms", info.name, info.kind,
                 1000 * (time.perf_counter() - started))
        return entry

    def unload(self, name: str) -> bool:
        """Unload ``name``; like the torch engine, it is then unknown until ``POST /v1/adapters`` loads it."""
        entry = self.registry.forget(name)
        if entry is None:
            return False
        self._release(entry.source)
        return True

    def _evict(self, keep: str | None = None) -> None:
        """Release least recently used unpinned adapters no running request uses, beyond capacity."""
        busy = {r.source for r in self.active}
        for _, entry in self.registry.evict_beyond(self.max_loaded_adapters, keep, lambda a: a.source not in busy):
            self._release(entry.source)

    def _release(self, source: str) -> None:
        """Free a bundle adapter's memory unless a running request or another loaded name still uses it."""
        if not any(r.source == source for r in self.active) and \
                not any(a.source == source for a in self.registry.handles()):
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
        while len(self.active) < self.max_batch_size and not self.pending.empty():
            request = self.pending.get_nowait()
            if request.cancelled:
                continue
            try:
                # an evicted adapter reloads here, transparently
                source = self._checkout(request.adapter).source if request.adapter is not None else None
                # the edge runtime's own start: the same context budget, stop rules and text as run-edge
                tokens, text = self.runner.start(
                    request.prompt_ids, request.max_tokens, adapter=source, stop=request.stop,
                    sampling=Sampling(request.temperature, request.top_p, request.seed))
                self.active.append(_Running(request, source, tokens, text))
            except ContextOverflow as exc:  # the client's prompt, not a server fault: no traceback
                request.context_overflow = True
                request.on_done(FinishReason.ERROR, 0, str(exc))
            except AdapterError as exc:  # unloaded since the request was accepted (404), or it no longer loads
                request.error_status = exc.status
                request.on_done(FinishReason.ERROR, 0, str(exc))
            except Exception as exc:  # noqa: BLE001 - reported to the request, the server goes on
                log.exception("onnx engine: request failed to start")
                request.on_done(FinishReason.ERROR, 0, str(exc))

    def _advance(self, running: _Running) -> None:
        """Generate one token of ``running`` (or end it: cancelled, past its deadline, done, failed)."""
        request = running.request
        if request.cancelled:
            self._finish(running, FinishReason.CANCELLED)
            return
        if request.deadline is not None and time.monotonic() > request.deadline:
            self._finish(running, FinishReason.TIMEOUT)
            return
        try:
            piece = running.text.push(next(running.tokens))
        except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
            log.exception("onnx engine: generation failed")
            self._finish(running, FinishReason.ERROR, str(exc))
            return
        if piece:
            request.on_text(piece)
        if running.text.finish_reason is not None:
            self._finish(running, running.text.finish_reason)

    def _finish(self, running: _Running, reason: FinishReason, error: str | None = None) -> None:
        """End ``running``: send any held-back text, free its slot, report ``reason``."""
        self.active.remove(running)
        if running.source is not None:  # its adapter may have been unloaded or evicted while it ran
            self._release(running.source)
        rest = running.text.flush()
        if rest:
            running.request.on_text(rest)
        running.request.on_done(reason, len(running.text.tokens), error)


def start_onnx_engine(bundle_path: Path, settings) -> tuple[OnnxEngine, str]:
    """Load the bundle (verified) and start the engine; returns it and the base's public name."""
    from edge.bundle import EdgeRunner, load_bundle

    try:
        bundle = load_bundle(bundle_path)
        runner = EdgeRunner(bundle, threads=settings.num_threads or None, providers=settings.providers)
    except ValueError as exc:  # BundleError, or providers this onnxruntime build lacks
        raise AdapterError(str(exc), status=500) from exc
    log.info("onnx engine: execution providers %s", ", ".join(runner.base.providers))
    engine = OnnxEngine(runner, max_batch_size=settings.max_batch_size, max_queue=settings.max_queue,
                        max_loaded_adapters=settings.max_loaded_adapters)
    return engine, str(bundle.manifest.get("base_name") or "base")
