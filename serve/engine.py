"""The generation engine: one frozen base, many adapters of every kind, continuous mixed-adapter batching.

A single worker thread owns the model. Requests wait in a bounded queue; between decode steps the
worker admits new ones (prefilled together, or alone when they carry virtual tokens, then copied
into a free slot of the preallocated key/value cache, :mod:`serve.torch_slots`, which every step
writes in place) and drops finished ones (the last row moves into the freed slot), so a request never
waits for a whole batch to finish and no step copies the running rows' cache. Each row of a decode
step names its adapter (:attr:`serve.batched_lora.BatchedLora.rows`; ``__base__`` is the bare base), so
requests for different adapters share forward passes. LoRA/DoRA/QLoRA rows go through the two-product LoRA
layer (:mod:`serve.batched_lora`); IA3 and PIR rows through per-row hooks (:mod:`serve.rowwise`);
prompt-learning rows are base rows whose prefill starts from their virtual tokens.

The engine runs where its model is (CPU or CUDA, float32, bfloat16 or float16: see :func:`load_base`):
every tensor it makes (ids, masks, positions, cache padding, virtual tokens, row-wise adapters,
LoRA masks) is made on the model's device, floating ones that enter the model in its dtype, and adapters
read from (float32) files are cast to them as they load.

Adapter changes (load, replace, unload, evict) are commands the worker runs between steps, so the
model never changes under a running forward. Each loaded version gets its own internal PEFT name:
replacing ``sentiment`` loads the new weights beside the old ones, new requests go to the new
version, and the old one is deleted when its last running request finishes.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge.generation import ContextOverflow, FinishReason, TextStream, token_budget
from pipeline.adapter_spec import kv_layout
from serve.adapters import AdapterError, AdapterInfo, declared
from serve.registry import AdapterRegistry
from serve.sampling import TorchSampling
from serve.worker import PREFILL_TOKENS, Worker

log = logging.getLogger(__name__)

BASE = "__base__"
"""PEFT's name for "no adapter" in a mixed batch."""


@dataclass
class GenRequest:
    """One generation: inputs, sampling settings, and the callbacks that carry its output out."""

    prompt_ids: list[int]
    max_tokens: int
    adapter: str | None = None
    """Public adapter name; None: the base model."""
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    on_text: Callable[[str], None] = lambda text: None
    """Called from the worker with each new piece of text."""
    on_done: Callable[[str, int, str | None], None] = lambda reason, n, error: None
    """Called once: finish reason (a :class:`edge.generation.FinishReason`, a ``str``), generated token count,
    error message."""
    deadline: float | None = None
    """``time.monotonic()`` after which the request is ended with reason ``timeout``."""
    context_overflow: bool = False
    """Set by the engine when the prompt and the adapter's virtual tokens leave no room for an answer: the
    request ended with reason ``error`` through the client's fault (the server answers 400, not 500)."""
    error_status: int | None = None
    """Set by the engine when the request ended with reason ``error`` because of its adapter: the HTTP status
    to answer (404: unloaded after the request was accepted; 422: its files no longer load)."""
    # worker state
    tokens: list[int] = field(default_factory=list)
    """Generated tokens (the stop token excluded); once generation starts, the list its ``stream`` fills."""
    stream: TextStream | None = None
    """Its text, stop rules and token budget (made at its prefill)."""
    internal: str = BASE
    """The PEFT LoRA adapter this row uses in a mixed batch (``__base__``: none)."""
    row_adapter: str | None = None
    """The row-wise (IA3, PIR) adapter this row uses, if any."""
    cancelled: bool = False
    virtual: Any = None
    """A prompt-learning adapter's virtual tokens: embeddings [V, hidden], or a key/value prefix table."""
    prefix: bool = False
    finished: bool = False
    released: bool = False
    sampler: TorchSampling | None = None
    """Its sampler (made at its first token)."""


@dataclass
class LoadedAdapter:
    """One loaded version of an adapter (the registry's handle); a replaced one lives on in ``retired``."""

    info: AdapterInfo
    internal: str
    """The PEFT LoRA adapter its rows use (``__base__``: none)."""
    in_flight: int = 0
    virtual: Any = None
    prefix: bool = False
    row_adapter: str | None = None
    """Internal name in the engine's RowAdapters (IA3, PIR); then ``internal`` is ``__base__``."""


class Engine(Worker):
    """Owns the model; ``submit`` generation requests, ``load``/``unload`` adapters (thread-safe).

    Satisfies :class:`serve.protocol.GenerationEngine`; adapters live in ``registry`` (LRU order)."""

    def __init__(self, model, tokenizer, *, max_batch_size: int = 16, max_queue: int = 64,
                 max_loaded_adapters: int = 8, context_length: int | None = None) -> None:
        from peft import PeftModel

        from pipeline.device import model_device
        from serve.batched_lora import BatchedLora
        from serve.rowwise import RowAdapters

        if not isinstance(model, PeftModel):
            model = _peft_shell(model)
        self.model = model.eval()
        self.device = model_device(self.model)
        """Where the model runs: every tensor the engine makes is made here."""
        self.dtype = self.model.get_input_embeddings().weight.dtype
        """The dtype of what enters the model (embeddings, virtual tokens, the key/value cache): the base's
        weights dtype (float32 for a bitsandbytes base, whose unquantized layers stay float32)."""
        self.batched = BatchedLora(self.model, self.device)
        self.rowwise = RowAdapters(self.model, self.device, self.dtype)
        self.tokenizer = tokenizer
        self.max_batch_size = max_batch_size
        self.max_loaded_adapters = max_loaded_adapters
        self.context_length = context_length or getattr(model.config, "max_position_embeddings", 2048)
        self.registry: AdapterRegistry[LoadedAdapter] = AdapterRegistry()
        self.retired: list[LoadedAdapter] = []
        """Replaced, unloaded or evicted versions that running requests still use; freed when idle."""
        self.on_step: Callable[[int], None] = lambda batch_size: None
        """Called after every decode step with the number of rows it decoded (metrics)."""
        self.resolver: Callable[[str, str], AdapterInfo] | None = None
        """(name, source) -> validated AdapterInfo: lets the worker reload an evicted adapter on demand."""
        self.active: list[GenRequest] = []
        from serve.torch_slots import KVSlots

        layers, kv_heads, head_dim = kv_layout(self.model.config)
        self.kv = KVSlots(layers, max_batch_size, kv_heads, head_dim, dtype=self.dtype, device=self.device,
                          max_length=self.context_length)
        """Running request ``i`` decodes from slot ``i`` (see :mod:`serve.torch_slots`)."""
        self._counter = 0
        self._start_worker(max_queue, "edgetune-engine", self._run)

    # ---- adapter management (worker thread, via run_command) --------------------------------
    def load(self, info: AdapterInfo, source: str, pinned: bool = False) -> LoadedAdapter:
        """Load (or replace) adapter ``info.name``, registered READY; evict LRU unpinned ones beyond capacity."""
        tensors, info = info.tensors, replace(info, tensors={})  # loaded into the model, not kept twice
        if info.kind == "prompt":
            return self._load_virtual(info, tensors, source, pinned)
        self._counter += 1
        internal = f"a{self._counter}"
        try:
            if info.kind in ("ia3", "pir"):
                self._load_rowwise(info, tensors, internal)
            else:
                self._load_lora(info, tensors, internal)
        except Exception as exc:  # a library error must not take the server down (the caller marks it failed)
            self._discard(internal)
            log.warning("adapter %s failed to load: %r", info.name, exc)
            raise AdapterError(f"adapter {info.name!r} failed to load: {str(exc)[:300]}", status=422) from None
        self.batched.refresh()
        return self._publish(LoadedAdapter(info, BASE if info.kind in ("ia3", "pir") else internal,
                                           row_adapter=internal if info.kind in ("ia3", "pir") else None),
                             source, pinned)

    def _load_lora(self, info: AdapterInfo, tensors: dict[str, Any], internal: str) -> None:
        """Load ``internal`` from the validated ``tensors`` (config from the folder): a plain LoRA adapter as factors
        on the layers the shell wraps (:meth:`serve.batched_lora.BatchedLora.add`, tens of milliseconds), anything
        else (DoRA, a module the shell does not wrap) through PEFT's own layers."""
        from peft import PeftConfig
        from peft.utils import set_peft_model_state_dict

        config = PeftConfig.from_pretrained(str(info.path))
        if config.peft_type != "LORA":  # the folder changed since intake read it
            raise ValueError(f"its config now says {config.peft_type}, not LORA; load it again")
        factors = self._plain_lora(config, tensors)
        if factors is not None:
            self.batched.add(internal, factors)
            return
        config.inference_mode = True
        with _int8_state_kept(self.model):
            # in the base's dtype (PEFT would keep bf16/fp16 adapters in float32: a training default)
            self.model.add_adapter(internal, config, autocast_adapter_dtype=False)
            result = set_peft_model_state_dict(self.model, tensors, adapter_name=internal)
        if result.unexpected_keys:  # intake admits only LoRA keys of declared targets: PEFT must take them all
            raise ValueError(f"weights PEFT did not place: {result.unexpected_keys[:3]}")

    def _plain_lora(self, config, tensors: dict[str, Any]) -> dict[Any, tuple[Any, Any]] | None:
        """{LoRA layer: (A, B * scaling)} in the model's dtype and device when the adapter is plain LoRA on layers
        the shell wraps (scaling as PEFT computes it: alpha / r, or / sqrt(r) with rsLoRA, per-module patterns);
        None when it needs PEFT's own layers (DoRA, another variant, fan-in-fan-out, a module not wrapped)."""
        import math

        from peft.tuners.lora import LoraLayer
        from peft.utils.other import get_pattern_key

        if config.use_dora or getattr(config, "lora_bias", False) or config.fan_in_fan_out or \
                getattr(config, "use_qalora", False) or getattr(config, "arrow_config", None) or \
                getattr(config, "target_parameters", None):
            return None
        model = self.model.get_base_model()
        factors = {}
        for key, a in tensors.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix("base_model.model.").split(".lora_A.")[0]
            try:
                layer = model.get_submodule(module)
            except AttributeError:
                return None
            if not isinstance(layer, LoraLayer) or a.dim() != 2:
                return None
            b = tensors[key.replace(".lora_A.", ".lora_B.")]
            alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
            rank = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
            if a.shape[0] != rank:  # PEFT would build rank-r layers and then fail to place these weights
                raise ValueError(f"{key} has rank {a.shape[0]}, but its config gives {module} rank {rank}")
            scaling = alpha / (math.sqrt(rank) if config.use_rslora else rank)
            # in the base's dtype, as PEFT's path keeps them (autocast_adapter_dtype=False)
            factors[layer] = (a.to(self.device, self.dtype), (b * scaling).to(self.device, self.dtype))
        return factors or None

    def _discard(self, internal: str) -> None:
        """Remove whatever a failed load of ``internal`` left in the model (PEFT layers, also when PEFT had
        already forgotten its config; row-wise entries), so the next load and every request run as before."""
        from peft.tuners.tuners_utils import BaseTunerLayer

        self.rowwise.remove(internal)
        self.batched.remove(internal)
        self.model.peft_config.pop(internal, None)
        for module in self.model.modules():
            if isinstance(module, BaseTunerLayer):
                module.delete_adapter(internal)  # drops what the layer holds of it (nothing: a no-op)

    def _publish(self, entry: LoadedAdapter, source: str, pinned: bool) -> LoadedAdapter:
        """Make ``entry`` its adapter's current version (READY): the version it replaces (LoRA weights, a
        row-wise adapter, a virtual-token table) goes once idle, and capacity is kept."""
        old = self.registry.ready(entry.info.name, entry, source, pinned, entry.info.kind)
        if old is not None:
            self._retire(old)
        self._evict(keep=entry.info.name)
        return entry

    def _load_rowwise(self, info: AdapterInfo, tensors: dict[str, Any], internal: str) -> None:
        """IA3 vectors or a PIR sparse delta, applied per row by hooks (see serve/rowwise.py)."""
        if info.kind == "pir":
            deltas = {k.rsplit(".", 1)[0]: (tensors[k].long(), tensors[k.rsplit(".", 1)[0] + ".values"])
                      for k in tensors if k.endswith(".indices")}
            self.rowwise.add(internal, "pir", deltas)
            return
        vectors = {k.removeprefix("base_model.model.").removesuffix(".ia3_l"): t for k, t in tensors.items()}
        feedforward = {m for m in vectors if declared(m, info.spec.feedforward_modules)}
        self.rowwise.add(internal, "ia3", vectors, feedforward)

    def _load_virtual(self, info: AdapterInfo, tensors: dict[str, Any], source: str, pinned: bool) -> LoadedAdapter:
        """A prompt-learning adapter is data, not layers: its rows run as base rows whose prefill starts
        from the virtual tokens (embeddings prepended, or a key/value prefix as the initial cache)."""
        table = tensors["prompt_embeddings"].to(self.device, self.dtype)
        # running requests keep the table they started with
        return self._publish(LoadedAdapter(info, BASE, virtual=table, prefix=info.spec.kind == "prefix"),
                             source, pinned)

    def unload(self, name: str) -> bool:
        """Unload adapter ``name``: it is unknown until loaded again (idempotent: False when it was not loaded)."""
        entry = self.registry.forget(name)
        if entry is None:
            return False
        self._retire(entry)
        return True

    def _evict(self, keep: str | None = None) -> None:
        """Unload least recently used unpinned, idle adapters beyond capacity (never ``keep``, just loaded)."""
        for name, entry in self.registry.evict_beyond(self.max_loaded_adapters, keep, lambda a: a.in_flight == 0):
            self._retire(entry)
            log.info("adapter %s evicted (least recently used); it reloads on its next request", name)

    def _retire(self, entry: LoadedAdapter) -> None:
        """``entry`` takes no new requests; its weights go once its running requests have finished."""
        self.retired.append(entry)
        self._collect_retired()

    def _collect_retired(self) -> None:
        gone = [e for e in self.retired if e.in_flight == 0]
        for entry in gone:
            if entry.row_adapter:
                self.rowwise.remove(entry.row_adapter)
            elif entry.internal in self.batched.fast:
                self.batched.remove(entry.internal)
            elif entry.internal != BASE:
                self.model.delete_adapter(entry.internal)
            self.retired.remove(entry)
        if gone:
            self.batched.refresh()

    # ---- the worker loop ---------------------------------------------------------------------
    def _run(self) -> None:
        import torch

        torch.set_grad_enabled(False)
        while not self._stop.is_set():
            self._run_commands()
            try:
                self._admit()
            except Exception:  # a bug in admission must not kill the worker: those requests failed already
                log.exception("admitting requests failed")
            if not self.active:
                self._wake.wait(timeout=0.05)
                self._wake.clear()
                continue
            try:
                self._decode_step()
            except Exception as exc:  # never let one bad step kill the worker: fail the batch, go on
                log.exception("decode step failed")
                for r in self.active:
                    self._finish(r, FinishReason.ERROR, str(exc))
                self.active = []

    def _admit(self) -> None:
        """Take queued requests while slots are free and prefill them: those without virtual tokens together
        (right-padded, up to ``PREFILL_TOKENS`` prompt tokens), the others one by one."""
        plain: list[GenRequest] = []
        tokens = 0
        while len(self.active) + len(plain) < self.max_batch_size:
            try:
                request = self.pending.get_nowait()
            except queue.Empty:
                break
            if request.cancelled:
                continue
            try:  # an evicted adapter reloads here, transparently
                entry = self._checkout(request.adapter) if request.adapter else None
            except AdapterError as exc:  # unloaded since it was accepted (404), or its files no longer load
                request.error_status = exc.status
                self._finish(request, FinishReason.ERROR, str(exc))
                continue
            if entry is not None:
                if entry.internal != BASE or entry.row_adapter:  # weights in the model: keep them while it runs
                    entry.in_flight += 1
                request.internal, request.virtual, request.prefix = entry.internal, entry.virtual, entry.prefix
                request.row_adapter = entry.row_adapter
            if not self._budget(request):
                continue
            if request.virtual is not None:  # virtual tokens first: prefilled alone
                self._prefill_guarded([request])
                continue
            if plain and tokens + len(request.prompt_ids) > PREFILL_TOKENS:  # a full batch runs, a new one starts
                self._prefill_guarded(plain)
                plain, tokens = [], 0
            plain.append(request)
            tokens += len(request.prompt_ids)
        if plain:
            self._prefill_guarded(plain)

    def _prefill_guarded(self, requests: list[GenRequest]) -> None:
        """Prefill ``requests``; if that fails they fail (with the error), the running batch goes on."""
        try:
            if len(requests) == 1 and requests[0].virtual is not None:
                self._prefill(requests[0])
            else:
                self._prefill_plain(requests)
        except Exception as exc:
            log.exception("prefill failed")
            for request in requests:
                if not request.finished and request not in self.active:
                    self._release(request)
                    self._finish(request, FinishReason.ERROR, str(exc))

    def _forward(self, input_ids, attention_mask, position_ids, cache, adapters: list[str],
                 row_adapters: list[str | None] | None = None, **inputs):
        self.rowwise.rows = row_adapters
        self.batched.rows = tuple(adapters)  # each LoRA layer reads its rows' adapters here (serve/batched_lora.py)
        try:
            return self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              past_key_values=cache, use_cache=True, **inputs)
        finally:
            self.rowwise.rows = None
            self.batched.rows = None

    def _budget(self, request: GenRequest) -> bool:
        """Give ``request`` its token budget and text stream; False (and the request ended with a 400's error)
        when its prompt and virtual tokens leave no room to answer: it is not run at all."""
        n_virtual = 0 if request.virtual is None else request.virtual.shape[0]
        try:
            budget = token_budget(len(request.prompt_ids), n_virtual, request.max_tokens, self.context_length)
        except ContextOverflow as exc:
            request.context_overflow = True
            self._release(request)
            self._finish(request, FinishReason.ERROR, str(exc))
            return False
        request.stream = TextStream(self.tokenizer, max_tokens=budget, stop=request.stop,
                                    stop_ids=[self.tokenizer.eos_token_id])
        request.tokens = request.stream.tokens  # one list: the stream appends, the decode step reads
        return True

    def _prefill_plain(self, requests: list[GenRequest]) -> None:
        """Run the prompts of ``requests`` (no virtual tokens) in one forward, right-padded: each row's real
        tokens attend only to its own earlier ones; sample each first token; copy each row's cache, its real
        positions only, into a free slot."""
        import torch
        from transformers import DynamicCache

        lengths = [len(r.prompt_ids) for r in requests]
        width = max(lengths)
        # the padding's value never matters (masked, and after every real token): token 0 exists in every vocabulary
        ids = torch.tensor([r.prompt_ids + [0] * (width - len(r.prompt_ids)) for r in requests], device=self.device)
        mask = (torch.arange(width, device=self.device)[None] < torch.tensor(lengths, device=self.device)[:, None])
        positions = torch.arange(width, device=self.device)[None].expand(len(requests), -1)
        out = self._forward(ids, mask.long(), positions, DynamicCache(), [r.internal for r in requests],
                            [r.row_adapter for r in requests])
        for row, (request, length) in enumerate(zip(requests, lengths)):
            self._emit(request, self._sample(request, out.logits[row, length - 1]))
            if not request.finished:  # a request ended by its first token (end of sequence, a stop) never joins
                self.kv.write(len(self.active), out.past_key_values, row, length)
                self.active.append(request)

    def _prefill(self, request: GenRequest) -> None:
        """Run a prompt with virtual tokens alone (after them), sample its first token, join the batch."""
        import torch
        from transformers import DynamicCache

        n_virtual = request.virtual.shape[0]
        ids = torch.tensor([request.prompt_ids], device=self.device)
        mask = torch.ones(1, n_virtual + ids.shape[1], dtype=torch.long, device=self.device)
        positions = torch.arange(n_virtual, n_virtual + ids.shape[1], device=self.device).unsqueeze(0)
        cache = DynamicCache()
        if request.prefix:  # PEFT's layout: per layer a key (slot 2l) then a value (slot 2l+1)
            layers, kv_heads, head_dim = kv_layout(self.model.config)
            table = request.virtual.view(n_virtual, layers * 2, kv_heads, head_dim).permute(1, 2, 0, 3)
            for layer in range(layers):
                cache.update(table[2 * layer][None], table[2 * layer + 1][None], layer)
            out = self._forward(ids, mask, positions, cache, [BASE])
        else:  # soft prompt: virtual embeddings in front of the prompt's
            embeds = torch.cat([request.virtual, self.model.get_input_embeddings()(ids[0])])[None]
            out = self._forward(None, mask, torch.arange(mask.shape[1], device=self.device).unsqueeze(0), cache, [BASE],
                                inputs_embeds=embeds)
        self._emit(request, self._sample(request, out.logits[0, -1]))
        if not request.finished:  # a request ended by its first token (end of sequence, a stop) never joins
            self.kv.write(len(self.active), out.past_key_values)  # the next free slot; no other row is touched
            self.active.append(request)

    def _decode_step(self) -> None:
        import torch

        rows = [r for r in self.active if not r.cancelled and not _expired(r)]
        if len(rows) != len(self.active):
            for r in self.active:
                if r not in rows:
                    self._finish(r, FinishReason.TIMEOUT if _expired(r) else FinishReason.CANCELLED)
            self._keep(rows)
            if not rows:
                return
        n = len(self.active)
        ids = torch.tensor([[r.tokens[-1]] for r in self.active], device=self.device)
        cache, mask, positions, cache_position = self.kv.step(n)
        out = self._forward(ids, mask, positions, cache, [r.internal for r in self.active],
                            [r.row_adapter for r in self.active], cache_position=cache_position)
        self.kv.advance(n)
        self.on_step(n)
        for row, r in enumerate(list(self.active)):
            self._emit(r, self._sample(r, out.logits[row, -1]))
        self._keep([r for r in self.active if not r.finished])

    def _keep(self, rows: list[GenRequest]) -> None:
        """Shrink the batch to ``rows`` (still running): each slot left empty takes the last row (one row's copy)."""
        for gone in [r for r in self.active if r not in rows]:
            hole, last = self.active.index(gone), len(self.active) - 1
            if hole != last:
                self.kv.move(last, hole)
                self.active[hole] = self.active[last]
            self.active.pop()

    def _sample(self, request: GenRequest, logits) -> int:
        """The request's next token from its row of logits (see :class:`edge.generation.SamplingParams`)."""
        if request.sampler is None:
            request.sampler = TorchSampling(request.temperature, request.top_p, request.seed)
        return request.sampler.pick(logits)

    def _emit(self, request: GenRequest, token: int) -> None:
        """Hand ``token`` to the request's :class:`TextStream`: send the text it completes, end the request
        when the stream says so (end of sequence, a stop string, its token budget)."""
        piece = request.stream.push(token)
        if piece:
            request.on_text(piece)
        if request.stream.finish_reason is not None:
            self._finish(request, request.stream.finish_reason)

    def _finish(self, request: GenRequest, reason: FinishReason, error: str | None = None) -> None:
        """End ``request`` once: free its adapter, send any held-back text, report ``reason``."""
        if request.finished:
            return
        request.finished = True
        self._release(request)
        rest = request.stream.flush() if request.stream is not None else ""
        if rest:
            request.on_text(rest)
        request.on_done(reason, len(request.tokens), error)

    def _release(self, request: GenRequest) -> None:
        if (request.internal == BASE and not request.row_adapter) or request.released:
            return
        request.released = True
        for entry in [*self.registry.handles(), *self.retired]:
            if (entry.row_adapter or entry.internal) == (request.row_adapter or request.internal):
                entry.in_flight -= 1
        self._collect_retired()


@contextlib.contextmanager
def _int8_state_kept(model) -> Iterator[None]:
    """Restore every bitsandbytes int8 layer's weight and matmul state after the block. Loading a DoRA adapter
    makes PEFT dequantize each base weight, and on the CPU it then replaces the int8 weight with a copy that
    lacks the quantization state the layer's first forward moved off it: every later matmul of that layer
    fails (bitsandbytes: ``col_stats`` is None). DoRA's norms in serving come from :mod:`serve.batched_lora`."""
    layers = [(m, m.weight, m.state.CB, m.state.SCB) for m in model.modules()
              if type(m).__name__ == "Linear8bitLt" and type(m).__module__.startswith("bitsandbytes")]
    try:
        yield
    finally:
        for module, weight, cb, scb in layers:
            module.weight, module.state.CB, module.state.SCB = weight, cb, scb


def _expired(request: GenRequest) -> bool:
    return request.deadline is not None and time.monotonic() > request.deadline


def _peft_shell(model):
    """Wrap a plain model so it can hold many LoRA adapters: a PeftModel with one rank-1 LoRA on every linear
    layer but the head that never takes part (rows without an adapter run as ``__base__``)."""
    from peft import LoraConfig, get_peft_model

    # every linear layer but the head: a plain LoRA adapter then loads as factors on these wrappers
    return get_peft_model(model, LoraConfig(r=1, target_modules="all-linear", task_type="CAUSAL_LM"),
                          adapter_name="_shell")


def load_base(path: Path, quantize: str, *, device: str = "cpu", dtype: str = "auto"):
    """The frozen base for serving, in eval mode, on ``device`` (``auto | cpu | cuda``, see
    :func:`pipeline.device.resolve_device`).

    ``quantize`` ``none``: full precision in ``dtype`` (``auto | float32 | bfloat16 | float16``; auto is
    bfloat16 on a GPU, float32 on the CPU). ``int8``/``nf4``: bitsandbytes, quantized as it loads, its
    other layers float32, so ``dtype`` must be auto or float32 (else :class:`pipeline.errors.ModelError`).
    """
    from pipeline.device import resolve_device, resolve_dtype
    from pipeline.errors import ModelError
    from pipeline.models import load_model

    device = resolve_device(device)
    if quantize == "none":
        return load_model(path, device, dtype=resolve_dtype(dtype, device))
    if dtype not in ("auto", "float32"):
        raise ModelError(f"dtype {dtype}: a bitsandbytes base (quantize {quantize}) keeps its unquantized layers "
                         "in float32; use dtype auto or float32 with it")
    from exporters.bnb import load_quantizing

    return load_quantizing(path, quantize, device)
