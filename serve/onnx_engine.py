"""The ONNX backend of the server: an edge bundle's base and adapters on ONNX Runtime, no PyTorch.

It satisfies the same :class:`serve.protocol.GenerationEngine` as the torch engine (``submit``, ``load``,
``unload``, ``registry``...), so routes, auth, metrics and back-pressure are the same. Adapters are the
bundle's; ``POST /v1/adapters`` loads one by name, and every bundle adapter loads on its first request.

**Batched** (the default, when the bundle's graph can be fused: :mod:`exporters.fused_graph`): one worker thread
runs continuous batching over :class:`edge.slots.SlotDecoder` slots. Every running request holds a
slot of the in-place key/value cache; each iteration prefills the new requests together (up to
``PREFILL_TOKENS`` prompt tokens, so running requests keep streaming) and then decodes one token for
every running request in **one** run, whatever adapters they use: LoRA rows through the stacked
factors and a per-row mask, prompt-learning rows from their key/value prefix in their slot, base rows
with an all-zero mask. A merged adapter (DoRA, IA3, full...) is its own model: its rows batch together
on its own fused decoder. Prompt blocks already computed for the same adapter are copied from the
prefix cache (:mod:`serve.prefix_cache`) instead of prefilled. At start the fused graph's logits are
checked against the bundle's own graph on a probe prompt; a mismatch (or a graph that cannot be fused)
falls back to interleaved serving, with a warning.

**Interleaved** (the fallback): requests advance one token each in turn, batch-1 forwards of the
bundle's own graph (a LoRA adapter is then a per-run ONNX Runtime setting).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from edge.generation import ContextOverflow, FinishReason, Sampling, TextStream, token_budget
from serve.adapters import AdapterError, AdapterInfo
from serve.registry import AdapterRegistry
from serve.worker import PREFILL_TOKENS, Worker

log = logging.getLogger(__name__)

@dataclass
class _Loaded:
    """A loaded bundle adapter (the registry's handle)."""

    info: AdapterInfo
    source: str
    """Its name in the bundle (several public names may share one)."""


@dataclass
class _Running:
    """A request on the interleaved path: its tokens (one forward per ``next``) and their text."""

    request: Any
    source: str | None
    """The bundle adapter it runs (None: the base): not released while this runs."""
    tokens: Iterator[int]
    text: TextStream


@dataclass
class _Row:
    """A request on the batched path: where it runs, its prompt and its text."""

    request: Any
    source: str | None
    """The bundle adapter it runs (None: the base): not released while this runs."""
    group: _Group
    prompt: list[int]
    text: TextStream
    sampling: Sampling
    lora: str | None = None
    """The stacked LoRA adapter its slot selects."""
    prefix: Any = None
    """A prompt-learning adapter's key/value prefix, written into its slot before the prompt."""
    last: int | None = None
    """The token it generated last: the next decode step's input."""


@dataclass
class _Group:
    """The rows running on one fused decoder (the shared base, or one merged adapter's model); ``rows[i]`` is in
    slot ``i``."""

    decoder: Any
    rows: list[_Row] = field(default_factory=list)


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

    def __init__(self, runner, *, max_batch_size: int = 16, max_queue: int = 64, max_loaded_adapters: int = 8,
                 batched: bool = True, prefix_cache_mb: int = 64) -> None:
        """``batched``: serve through the fused graph when it can be built and passes its probe (else, and with
        False, interleaved); ``prefix_cache_mb``: memory for cached prompt blocks (0: no prefix cache)."""
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
        self.active: list = []
        """Running requests: ``_Row`` (batched) or ``_Running`` (interleaved); the drain waits for them."""
        self.groups: dict[str | None, _Group] = {}
        """Fused decoders by model: None, the shared base; a merged adapter's bundle name, its own model."""
        self.prefixes: dict[str, Any] = {}
        self.waiting: list[_Row] = []
        """Admitted, not prefilled yet."""
        self.cache = None
        self.mode = "interleaved"
        """``batched`` or ``interleaved``: how this engine runs requests (see the module docstring)."""
        if batched:
            self._start_batched(prefix_cache_mb)
        self._start_worker(max_queue, "edgetune-onnx-engine",
                           self._run_batched if self.mode == "batched" else self._run_interleaved)

    def _start_batched(self, prefix_cache_mb: int) -> None:
        """Set up the fused base (the bundle's sidecar, or fused here and checked against the bundle's own graph
        on a probe prompt) and the prefix cache."""
        from exporters.fused_graph import FUSED_TOLERANCE, FuseError
        from serve.prefix_cache import PrefixCache

        if self.runner.providers[0] != "CPUExecutionProvider":
            # the slots are host memory bound by address; a GPU provider would copy them every run
            log.info("onnx engine: batched serving runs on the CPU provider; on %s requests are interleaved",
                     self.runner.providers[0])
            return
        try:
            decoder = self._fused_decoder(self.runner.bundle.model_path)
            off = None if decoder.model.path is not None else self._probe(decoder)
        except (FuseError, ImportError) as exc:
            log.warning("onnx engine: serving requests interleaved, one token each in turn: %s", exc)
            return
        except Exception as exc:  # noqa: BLE001 - a graph ONNX Runtime rejects: serve as before, say why
            log.warning("onnx engine: the fused graph failed its probe (%s); serving requests interleaved",
                        str(exc)[:300])
            return
        if off is not None and not off <= FUSED_TOLERANCE:
            log.warning("onnx engine: the fused graph's logits differ from the bundle's by %.3f of their range "
                        "(allowed %.2f); serving requests interleaved instead", off, FUSED_TOLERANCE)
            return
        self.groups[None] = _Group(decoder)
        self.cache = PrefixCache(layers=decoder.layers, kv_heads=decoder.kv_heads, head_dim=decoder.head_dim,
                                 max_bytes=prefix_cache_mb << 20)
        self.mode = "batched"
        how = (f"the bundle's {decoder.model.path.name} (gated at export)" if off is None
               else f"fused at start, within {off:.4f} of the bundle's logits range")
        log.info("onnx engine: batched, %d slots on %s; prefix cache %d MB", self.max_batch_size, how, prefix_cache_mb)

    def _probe(self, decoder) -> float:
        """How far a graph fused here is from the bundle's own on a probe prompt: max |Δlogit| / the logits' range."""
        from edge.runtime import Decoder

        probe = (self.runner.encode_chat("Say hello.") or [0])[:32]
        own = self.runner.base  # the bundle's own graph, unless it decodes on a sidecar (one too short for the context)
        if own.fused is not None:
            own = Decoder(own.path, threads=self.runner.threads, providers=self.runner.providers, fused=False)
        want = own.logits(np.asarray([probe]))[0, -1]
        got = decoder.prefill(0, [probe])[0]
        return float(np.abs(want - got).max()) / max(float(want.max() - want.min()), 1e-6)

    def _fused_decoder(self, path: Path):
        """Slots over the fused graph of the bundle model at ``path``: the export's sidecar when it covers the
        context (the base's is the one its runner already opened), else the graph fused here, in memory
        (a bundle exported before sidecars; needs the ``onnx`` package)."""
        from edge.slots import FusedModel, SlotDecoder, fused_path

        options = {"threads": self.runner.threads, "providers": self.runner.providers}
        model = self.runner.base.fused if path == self.runner.bundle.model_path else None
        if model is None and fused_path(path).is_file():
            model = FusedModel(fused_path(path), **options)
        if model is None or model.max_length < self.context_length:
            from exporters.fused_graph import fuse_decoder

            model = FusedModel(fuse_decoder(path, max_length=self.context_length), **options)
        return SlotDecoder(model, slots=self.max_batch_size, capacity=min(256, self.context_length))

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
        try:
            if self.mode == "batched":
                self._prepare(source)
            else:
                self.runner.resolve(source)  # loads the .onnx_adapter / prefix / merged model
        except AdapterError:
            raise
        except Exception as exc:  # noqa: BLE001 - a damaged or foreign file: the load fails, the server goes on
            raise AdapterError(f"adapter {info.name!r} failed to load: {str(exc)[:300]}", status=422) from None
        entry = _Loaded(info, source)
        old = self.registry.ready(info.name, entry, source, pinned, info.kind)
        if old is not None and old.source != source:
            self._release(old.source)
        self._evict(keep=info.name)
        log.info("onnx engine: adapter %s (%s) ready in %.0f ms", info.name, info.kind,
                 1000 * (time.perf_counter() - started))
        return entry

    def _prepare(self, source: str) -> None:
        """Make bundle adapter ``source`` servable on the batched path (idempotent)."""
        from edge.session import Prefix

        entry = self.runner.bundle.adapters[source]
        path = self.runner.bundle.root / entry.file
        base = self.groups[None].decoder
        if entry.kind == "lora":
            if base.lora is None or source not in base.lora.ranges:
                base.load_lora(source, path)
        elif entry.kind == "prefix":
            if source not in self.prefixes:
                prefix = Prefix.load(path)
                base.check_prefix(prefix)
                self.prefixes[source] = prefix
        elif entry.kind == "merged":
            if source not in self.groups:
                self.groups[source] = _Group(self._fused_decoder(path))
        else:
            raise AdapterError(f"adapter {source!r} has unknown kind {entry.kind!r}", status=422)

    def unload(self, name: str) -> bool:
        """Unload ``name``; like the torch engine, it is then unknown until ``POST /v1/adapters`` loads it."""
        entry = self.registry.forget(name)
        if entry is None:
            return False
        self._release(entry.source)
        return True

    def _busy(self) -> set[str | None]:
        return {r.source for r in self.active} | {r.source for r in self.waiting}

    def _evict(self, keep: str | None = None) -> None:
        """Release least recently used unpinned adapters no running request uses, beyond capacity."""
        busy = self._busy()
        for _, entry in self.registry.evict_beyond(self.max_loaded_adapters, keep, lambda a: a.source not in busy):
            self._release(entry.source)

    def _release(self, source: str | None) -> None:
        """Free a bundle adapter's memory unless a running request or another loaded name still uses it."""
        if source is None or source in self._busy() or any(a.source == source for a in self.registry.handles()):
            return
        if self.mode == "interleaved":
            self.runner.release(source)
            return
        self.groups[None].decoder.unload_lora(source)
        self.prefixes.pop(source, None)
        self.groups.pop(source, None)
        self.cache.drop(source)

    # ---- the batched worker loop -------------------------------------------------------------
    def _run_batched(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            self._admit_rows()
            if not self.active and not self.waiting:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self._expire()
            try:
                self._prefill()
            except Exception as exc:  # noqa: BLE001 - the rows being started fail, the others go on
                log.exception("onnx engine: prefill failed")
                for row in [r for r in self.active if r.last is None]:
                    self._end(row, FinishReason.ERROR, str(exc))
            self._expire()  # a client that left on its first token gets no second one
            for group in list(self.groups.values()):
                if group.rows:
                    try:
                        self._decode(group)
                    except Exception as exc:  # noqa: BLE001 - this model's rows fail, the server goes on
                        log.exception("onnx engine: decode step failed")
                        for row in list(group.rows):
                            self._end(row, FinishReason.ERROR, str(exc))

    def _admit_rows(self) -> None:
        """Take queued requests while slots are free: check their adapter out, budget their tokens."""
        self._admit(lambda: len(self.active) + len(self.waiting) < self.max_batch_size, self._start_row)

    def _start_row(self, request) -> None:
        # an evicted adapter reloads here, transparently
        source = self._checkout(request.adapter).source if request.adapter is not None else None
        kind = self.runner.bundle.adapters[source].kind if source is not None else None
        prefix = self.prefixes[source] if kind == "prefix" else None
        budget = token_budget(len(request.prompt_ids), prefix.length if prefix else 0, request.max_tokens,
                              self.context_length)
        if not request.prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        text = TextStream(self.runner.tokenizer, max_tokens=budget, stop=request.stop, stop_ids=self.runner.stop_ids)
        group = self.groups[source if kind == "merged" else None]
        self.waiting.append(_Row(request, source, group, list(request.prompt_ids), text,
                                 Sampling(request.temperature, request.top_p, request.seed),
                                 lora=source if kind == "lora" else None, prefix=prefix))

    def _admit(self, room: Callable[[], bool], start: Callable[[Any], None]) -> None:
        """While ``room()``: take a queued request and ``start`` it; a request that cannot start is ended with
        its reason (the client's prompt: a 400; its adapter: 404/422; anything else: an error), the rest go on."""
        while room() and not self.pending.empty():
            request = self.pending.get_nowait()
            if request.cancelled:
                continue
            try:
                start(request)
            except ContextOverflow as exc:  # the client's prompt, not a server fault: no traceback
                request.context_overflow = True
                request.on_done(FinishReason.ERROR, 0, str(exc))
            except AdapterError as exc:  # unloaded since the request was accepted (404), or it no longer loads
                request.error_status = exc.status
                request.on_done(FinishReason.ERROR, 0, str(exc))
            except Exception as exc:  # noqa: BLE001 - reported to the request, the server goes on
                log.exception("onnx engine: request failed to start")
                request.on_done(FinishReason.ERROR, 0, str(exc))

    def _expire(self) -> None:
        """End requests whose client left or whose deadline passed."""
        now = time.monotonic()
        for row in [*self.waiting, *self.active]:
            if row.request.cancelled:
                self._end(row, FinishReason.CANCELLED)
            elif row.request.deadline is not None and now > row.request.deadline:
                self._end(row, FinishReason.TIMEOUT)

    def _prefill(self) -> None:
        """Start waiting requests (up to ``PREFILL_TOKENS`` prompt tokens, one run per model): their slot gets
        its prefix and cached blocks, the rest of the prompt runs, and each samples its first token."""
        if not self.waiting:
            return
        taken, tokens = [], 0
        for row in list(self.waiting):
            if taken and tokens + len(row.prompt) > PREFILL_TOKENS:
                break
            taken.append(row)
            tokens += len(row.prompt)
        for group in {id(r.group): r.group for r in taken}.values():
            todo = self._place(group, [r for r in taken if r.group is group])
            # Rows that start from an empty slot run together (padded to the longest); a row whose slot already
            # holds positions (a prefix, cached blocks) runs alone: GroupQueryAttention takes a prompt after
            # past positions only at batch 1.
            fresh = [t for t in todo if t[1] == 0]
            for batch in ([fresh] if fresh else []) + [[t] for t in todo if t[1] > 0]:
                slot = group.rows.index(batch[0][0])  # rows placed together are in consecutive slots
                logits = group.decoder.prefill(slot, [row.prompt[skip:] for row, _, skip in batch],
                                               [past for _, past, _ in batch], pad_id=self.runner.pad_id)
                for (row, _, _), row_logits in zip(batch, logits):
                    self._store_blocks(row)
                    self._emit(row, row.sampling.pick(row_logits))

    def _place(self, group: _Group, rows: list[_Row]) -> list[tuple[_Row, int, int]]:
        """Give ``rows`` the next slots of ``group`` (contiguous, in order), write each one's prefix and cached
        blocks there; returns the rows that need a prefill run, each with (positions already in its slot, prompt
        tokens they cover). A row whose cached blocks cover all its prompt but the last token needs none: that
        token is its input to the next decode step."""
        looked = []
        for row in rows:
            self.waiting.remove(row)
            virtual = row.prefix.length if row.prefix is not None else 0
            blocks = self.cache.lookup(row.source or "", row.prompt)
            looked.append((row, virtual, blocks, sum(b.shape[3] for b in blocks)))
        # rows that prefill from an empty slot first: they run together, so their slots must be consecutive
        looked.sort(key=lambda item: not (item[1] + item[3] == 0 and len(item[0].prompt) > 1))
        out = []
        for row, virtual, blocks, covered in looked:
            slot = len(group.rows)
            group.rows.append(row)
            self.active.append(row)
            decoder = group.decoder
            decoder.set_adapter(slot, row.lora)
            if row.prefix is not None:
                decoder.write_prefix(slot, row.prefix)
            at = virtual
            for block in blocks:
                decoder.write_block(slot, at, block)
                at += block.shape[3]
            decoder.lengths[slot] = at  # what is in the slot now (a move before its prefill copies it)
            if covered == len(row.prompt) - 1:  # only the last token is left: it joins the next decode step
                row.last = row.prompt[-1]
                continue
            out.append((row, at, covered))
        return out

    def _store_blocks(self, row: _Row) -> None:
        """Keep the full blocks of ``row``'s prompt (just prefilled in its slot) in the prefix cache."""
        decoder, slot = row.group.decoder, row.group.rows.index(row)
        virtual = row.prefix.length if row.prefix is not None else 0
        self.cache.store(row.source or "", row.prompt,
                         lambda start, length: decoder.read_block(slot, virtual + start, length))

    def _decode(self, group: _Group) -> None:
        """One token for every running row of ``group``, in one run (the metrics' decode batch size)."""
        rows = list(group.rows)
        logits = group.decoder.decode([r.last for r in rows])
        self.on_step(len(rows))
        for row, row_logits in zip(rows, logits):
            self._emit(row, row.sampling.pick(row_logits))

    def _emit(self, row: _Row, token: int) -> None:
        """Push ``row``'s new token to its text; send what it completes; end the row when it is done."""
        piece = row.text.push(token)
        if piece:
            row.request.on_text(piece)
        if row.text.finish_reason is not None:
            self._end(row, row.text.finish_reason)
        else:
            row.last = token

    def _end(self, row: _Row, reason: FinishReason, error: str | None = None) -> None:
        """End ``row``: free its slot (the group's last row moves into it), send held-back text, report."""
        if row in self.waiting:
            self.waiting.remove(row)
        if row in self.active:
            self.active.remove(row)
            rows = row.group.rows
            hole, last = rows.index(row), len(rows) - 1
            if hole != last:
                row.group.decoder.move(last, hole)
                rows[hole] = rows[last]
            rows.pop()
        self._release(row.source)
        _report(row.request, row.text, reason, error)

    # ---- the interleaved worker loop ---------------------------------------------------------
    def _run_interleaved(self) -> None:
        while not self._stop.is_set():
            self._run_commands()
            self._admit(lambda: len(self.active) < self.max_batch_size, self._start_running)
            if not self.active:
                self._wake.wait(0.05)
                self._wake.clear()
                continue
            self.on_step(len(self.active))
            for running in list(self.active):
                self._advance(running)

    def _start_running(self, request) -> None:
        # an evicted adapter reloads here, transparently
        source = self._checkout(request.adapter).source if request.adapter is not None else None
        # the edge runtime's own start: the same context budget, stop rules and text as run-edge
        tokens, text = self.runner.start(request.prompt_ids, request.max_tokens, adapter=source, stop=request.stop,
                                         sampling=Sampling(request.temperature, request.top_p, request.seed))
        self.active.append(_Running(request, source, tokens, text))

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
        _report(running.request, running.text, reason, error)


def _report(request, text: TextStream, reason: FinishReason, error: str | None) -> None:
    """Send ``request`` the text its stream still held back, its tokens, and how it ended."""
    rest = text.flush()
    if rest:
        request.on_text(rest)
    request.tokens = list(text.tokens)
    request.on_done(reason, len(text.tokens), error)


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
                        max_loaded_adapters=settings.max_loaded_adapters, prefix_cache_mb=settings.prefix_cache_mb)
    return engine, str(bundle.manifest.get("base_name") or "base")
