"""Run an exported ONNX decoder with ONNX Runtime: greedy or sampled generation, over the bare base,
a LoRA ``.onnx_adapter`` or a key/value prefix. Imports only numpy, onnxruntime, the sampler of
:mod:`edge.generation` (which adds tokenizers) and the fused path of :mod:`edge.slots`.

The decoder is the optimum-onnx layout: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.<i>.key|value`` (and, for a multi-LoRA base, ``lora.*`` inputs); outputs
``logits`` and ``present.<i>.key|value``. Steps run with ``run_with_ort_values``, so the key/value
cache stays in ONNX Runtime's own buffers from one step to the next, and an adapter is activated
through ``RunOptions``.

**Fused path.** When the export wrote a fused sidecar next to the model (``model.fused.onnx``, see
:mod:`exporters.fused_graph`; its weights are byte ranges of ``model.onnx``), every method runs it:
one ``GroupQueryAttention`` per layer over a key/value buffer written in place (:mod:`edge.slots`), a
few hundred nodes per token instead of ~3,000, the same weights. The export held it to the same
fidelity gate as the exported graph. Only the CPU provider takes it (its buffers are host memory bound
by address), and only sequences its rotary tables cover; otherwise the exported graph runs, its
session opened on first use (so a decoder that never needs it keeps one copy of the weights).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.generation import Sampling
from edge.session import LORA_PREFIX, PROVIDERS, Prefix, resolve_providers, session_options
from edge.slots import FusedModel, SlotDecoder, fused_path

__all__ = ["Decoder", "Prefix", "resolve_providers"]

log = logging.getLogger(__name__)


class Decoder:
    """One exported ONNX decoder (and its fused sidecar, when there is one); every method is batch-aware.

    ``adapters`` maps the names of loaded LoRA adapters to their ``.onnx_adapter`` files (see :meth:`load_adapter`).
    """

    def __init__(self, model_path: Path, *, threads: int | None = None, providers: Sequence[str] | None = None,
                 fused: bool = True):
        """Open ``model_path`` on ``providers`` (see :func:`resolve_providers`; None: the CPU). ``fused``: use
        the fused sidecar when the export wrote one and the CPU runs it (False: the
        exported graph for everything).

        Raises ``ValueError`` when a GPU provider was asked for but the session could not start on it
        (ONNX Runtime would otherwise fall back to the CPU with only a log line)."""
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"no ONNX model at {model_path}; export one with `edgetune export` first")
        self.path = model_path
        self.threads = threads
        self.wanted = resolve_providers(providers)
        self.fused: FusedModel | None = None
        """The fused sidecar's session, or None (no sidecar, ``fused=False``, or a GPU provider)."""
        sidecar = fused_path(model_path)
        if fused and sidecar.is_file() and self.wanted == [PROVIDERS["cpu"]]:
            try:
                self.fused = FusedModel(sidecar, threads=threads, providers=self.wanted)
                if self.fused.source_bytes != model_path.stat().st_size:
                    raise ValueError(f"it was written for a {self.fused.source_bytes}-byte {model_path.name}, this "
                                     f"one has {model_path.stat().st_size} bytes (re-export to write a new one)")
            except Exception as exc:  # noqa: BLE001 - any stale or damaged sidecar: the exported graph still runs
                self.fused = None
                log.warning("%s: not using the fused sidecar %s: %s; decoding with the exported graph",
                            model_path.name, sidecar.name, (str(exc).splitlines() or ["?"])[0][:200])
        self._session: ort.InferenceSession | None = None
        self.adapters: dict[str, Path] = {}
        self._ort_adapters: dict[str, ort.LoraAdapter] = {}
        self._openings: dict[tuple, tuple[Prefix | None, Prefix]] = {}
        """(opening, adapter, id(prefix)) -> (prefix, prefix + opening): see :meth:`_opening_cache`."""
        if self.fused is not None:  # the exported graph opens when first needed: one copy of the weights in memory
            self.providers: list[str] = self.wanted
            self.layers, self.kv_heads, self.head_dim = self.fused.layers, self.fused.kv_heads, self.fused.head_dim
        else:
            self._open()

    @property
    def session(self) -> ort.InferenceSession:
        """The exported graph's session (opened on first use when the fused sidecar runs generation)."""
        if self._session is None:
            self._open()
        return self._session

    def _open(self) -> None:
        session = ort.InferenceSession(str(self.path), session_options(self.threads), providers=self.wanted)
        self.providers = session.get_providers()
        """The providers the session really runs on, in order (the CPU last)."""
        missing = [p for p in self.wanted if p not in self.providers]
        if missing:
            raise ValueError(f"ONNX Runtime could not start {', '.join(missing)} for {self.path.name} (no GPU "
                             f"visible, or its CUDA/cuDNN libraries are missing: see ONNX Runtime's log above); it would "
                             f"run on {', '.join(self.providers)} only. Leave {', '.join(missing)} out of the "
                             "providers to run there")
        inputs = {i.name: i for i in session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in session.get_outputs() if o.name.startswith("present.")]
        self.output_names = ["logits", *self.present_names]
        if "input_ids" not in inputs or not self.past_names:
            raise ValueError(f"{self.path} is not a decoder with a key/value cache (inputs: {sorted(inputs)[:6]}...); "
                             "export with task text-generation-with-past")
        first = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.layers = len(self.past_names) // 2
        self.kv_heads, self.head_dim = int(first[1]), int(first[3])
        self.has_positions = "position_ids" in inputs
        # LoRA factor inputs ([in, rank], [rank, out]) default to rank-0 initializers: ONNX Runtime
        # lists them as overridable initializers, not inputs, and an adapter may set any of them.
        self.lora_inputs = {i.name: list(i.shape) for i in session.get_overridable_initializers()
                            if i.name.startswith(LORA_PREFIX)}
        self._session = session

    # ---- adapters ----------------------------------------------------------------------------
    def load_adapter(self, name: str, path: Path) -> None:
        """Load a ``.onnx_adapter`` file under ``name``, after checking it only sets this model's LoRA inputs
        (``ValueError`` naming the problem otherwise)."""
        if self.fused is not None:
            self.fused.load_lora(name, path)  # checks names and shapes against the same LoRA inputs
        else:
            self._ort_adapter(name, path)
        self.adapters[name] = Path(path)
        self._openings.clear()  # computed with whatever ``name`` held before

    def _ort_adapter(self, name: str, path: Path) -> ort.LoraAdapter:
        """``name``'s adapter loaded for the exported graph (checked against its LoRA inputs first)."""
        if name in self._ort_adapters:
            return self._ort_adapters[name]
        if self._session is None:
            self._open()  # its LoRA inputs are what the file is checked against
        if not self.lora_inputs:
            raise ValueError(f"{self.path.name} has no LoRA inputs: adapter {name!r} needs the multi-LoRA base model")
        try:
            params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
        except RuntimeError as exc:
            raise ValueError(f"adapter {name!r}: {Path(path).name} is not an ONNX Runtime adapter file "
                             f"({str(exc).splitlines()[-1][-120:]}); re-export the bundle") from None
        unknown = sorted(set(params) - set(self.lora_inputs))
        if unknown:
            raise ValueError(f"adapter {name!r} sets {unknown[:3]}, which {self.path.name} does not take; "
                             "it was exported for another base")
        for key, value in params.items():  # A is [in, rank], B is [rank, out]: in and out must fit
            want, got = self.lora_inputs[key], value.shape()
            fixed = 0 if key.endswith(".A") else 1
            if len(got) != 2 or got[fixed] != want[fixed]:
                raise ValueError(f"adapter {name!r}: {key} has shape {got}, this base needs {want[fixed]} on "
                                 f"axis {fixed}; it was exported for another base")
        adapter = ort.LoraAdapter()
        adapter.Load(str(path))
        self._ort_adapters[name] = adapter
        return adapter

    def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)
        self._ort_adapters.pop(name, None)
        self._openings.clear()
        if self.fused is not None:
            self.fused.unload_lora(name)

    def _check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.adapters) or 'none'})")

    # ---- one forward -------------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[ort.OrtValue]:
        if self._session is None:
            self._open()
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), np.float32)
        return [ort.OrtValue.ortvalue_from_numpy(empty) for _ in self.past_names]

    def prefix_past(self, prefix: Prefix, batch: int) -> list[ort.OrtValue]:
        """The prefix as the initial cache of ``batch`` rows (layer order key, value, key, ...)."""
        if len(prefix.keys) != self.layers or prefix.keys[0].shape[0] != self.kv_heads \
                or prefix.keys[0].shape[2] != self.head_dim:
            raise ValueError(f"key/value prefix of shape {len(prefix.keys)} x {prefix.keys[0].shape} does not fit "
                             f"this decoder ({self.layers} layers x [{self.kv_heads}, P, {self.head_dim}])")
        out = []
        for k, v in zip(prefix.keys, prefix.values):
            for t in (k, v):
                out.append(ort.OrtValue.ortvalue_from_numpy(
                    np.ascontiguousarray(np.broadcast_to(t[None], (batch, *t.shape)), dtype=np.float32)))
        return out

    def forward(self, input_ids: np.ndarray, attention_mask: np.ndarray, position_ids: np.ndarray,
                past: list[ort.OrtValue], adapter: str | None = None) -> tuple[np.ndarray, list[ort.OrtValue]]:
        """Logits [batch, seq, vocab] and the new cache for one step.

        ``attention_mask`` covers past and new tokens ([batch, past + seq]); ``past`` comes from
        :meth:`empty_past`, :meth:`prefix_past` or a previous call; ``adapter`` names a loaded
        LoRA adapter (None: the base alone).
        """
        session = self.session
        feeds = {
            "input_ids": _ortvalue(input_ids, np.int64),
            "attention_mask": _ortvalue(attention_mask, np.int64),
            **dict(zip(self.past_names, past)),
        }
        if self.has_positions:
            feeds["position_ids"] = _ortvalue(position_ids, np.int64)
        options = None
        if adapter is not None:
            self._check_adapter(adapter)
            options = ort.RunOptions()
            options.add_active_adapter(self._ort_adapter(adapter, self.adapters[adapter]))
        outputs = session.run_with_ort_values(self.output_names, feeds, options)
        return outputs[0].numpy(), list(outputs[1:])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
               adapter: str | None = None, prefix: Prefix | None = None, keep: int | None = None,
               opening: Sequence[int] = ()) -> np.ndarray:
        """Full-sequence logits of a (left-padded) batch, with no cache: [batch, seq, vocab]. On the fused
        sidecar the padded positions' logits are zeros (the exported graph computes something there).

        ``keep``: the last ``keep`` positions only, [batch, keep, vocab] (transformers' ``logits_to_keep``):
        the fused sidecar then runs the output head (a vocabulary-wide matrix per position) there only.

        ``opening``: tokens every row starts with, left out of ``input_ids`` (a chat template's system turn, a
        task's instruction): each row is ``opening`` + its real tokens, and the logits are those of the rows'
        own positions. The opening runs once (and is kept for the next calls with the same opening, adapter and
        prefix) and every row continues from its key/value cache, as after a prefix: a third to a half less
        work on the bundled tasks. The logits are those of the rows run whole, up to float rounding."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        keep = min(keep, seq) if keep else None
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        n = prefix.length if prefix else 0
        self._check_adapter(adapter)
        real = mask.astype(bool)
        if len(opening):  # the prefix and the opening become one key/value prefix, computed once (and kept)
            prefix = self._opening_cache(tuple(int(t) for t in opening), adapter, prefix)
            n = prefix.length
        if self._fits(n + seq + 1) and real.any(axis=1).all():
            rows = [row[keep_].tolist() for row, keep_ in zip(input_ids, real)]
            slots = self._slots(batch, adapter, prefix, n + seq + 1)
            if keep:  # input position p of a row is position (real tokens up to p) - 1 of its unpadded prompt
                picked = np.maximum(np.cumsum(real, axis=1) - 1, 0)[:, seq - keep:]
                wanted = real[:, seq - keep:]
                out = np.zeros((batch, keep, self.fused.vocab), np.float32)
                for start, part in _prefill_runs(rows, n):
                    got = slots.prefill(start, part, [n] * len(part), positions=picked[start:start + len(part)])
                    out[start:start + len(part)] = got
                out[~wanted] = 0  # padding, as below
                return out
            out = np.zeros((batch, seq, self.fused.vocab), np.float32)
            for start, part in _prefill_runs(rows, n):
                got = slots.prefill(start, part, [n] * len(part), every_position=True)
                for k, row in enumerate(part):
                    out[start + k, real[start + k]] = got[k, :len(row)]
            return out
        past = self.prefix_past(prefix, batch) if prefix else self.empty_past(batch)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + n
        full_mask = np.concatenate([np.ones((batch, n), np.int64), mask], axis=1)
        logits, _ = self.forward(input_ids, full_mask, positions, past, adapter)
        return logits[:, seq - keep:] if keep else logits

    def _opening_cache(self, opening: tuple[int, ...], adapter: str | None, prefix: Prefix | None) -> Prefix:
        """``prefix`` (None: none) followed by ``opening``'s keys and values with ``adapter``, as one key/value
        prefix: computed on first use (on the fused sidecar when it fits, else the exported graph), then kept
        (the last few; loading or unloading an adapter forgets them), so the opening of many calls runs once."""
        key = (opening, adapter, id(prefix))
        hit = self._openings.get(key)
        if hit is not None and hit[0] is prefix:  # the entry holds its prefix: the same id is the same object
            return hit[1]
        n, width = (prefix.length if prefix else 0), len(opening)
        if self._fits(n + width + 1):
            slots = self._slots(1, adapter, prefix, n + width + 1)
            slots.prefill(0, [list(opening)], [n])
            block = slots.read_block(0, 0, n + width)  # [layers, 2, kv_heads, n + width, head_dim]
            keys, values = [layer[0] for layer in block], [layer[1] for layer in block]
        else:
            past = self.prefix_past(prefix, 1) if prefix else self.empty_past(1)
            _, present = self.forward(np.asarray([opening], np.int64), np.ones((1, n + width), np.int64),
                                      np.arange(n, n + width, dtype=np.int64)[None], past, adapter)
            arrays = [value.numpy()[0] for value in present]  # layer by layer: key, value
            keys, values = arrays[0::2], arrays[1::2]
        combined = Prefix(keys, values)
        self._openings[key] = (prefix, combined)
        while len(self._openings) > 8:
            self._openings.pop(next(iter(self._openings)), None)
        return combined

    def _fits(self, length: int) -> bool:
        """Whether the fused sidecar runs a sequence of ``length`` positions (prefix included)."""
        return self.fused is not None and length <= self.fused.max_length

    def _slots(self, rows: int, adapter: str | None, prefix: Prefix | None, capacity: int) -> SlotDecoder:
        """A cache of its own over the fused sidecar, ``rows`` slots all with ``adapter`` and ``prefix``: streams
        and batches may interleave or run in several threads over the one session."""
        slots = SlotDecoder(self.fused, slots=rows, capacity=capacity)
        for row in range(rows):
            slots.set_adapter(row, adapter)
            if prefix is not None:
                slots.write_prefix(row, prefix)
        return slots

    # ---- generation --------------------------------------------------------------------------
    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *, adapter: str | None = None,
               prefix: Prefix | None = None, sampling: Sampling | None = None) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` new token ids, one forward each (batch 1): on the fused sidecar when
        there is one and the sequence fits its rotary tables, else on the exported graph.

        It never stops early: stop tokens, stop strings and the context budget are the caller's
        :class:`edge.generation.TextStream` and :func:`edge.generation.token_budget` (see ``EdgeRunner.start``).
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        sampling = sampling or Sampling()
        n = prefix.length if prefix else 0
        self._check_adapter(adapter)
        if self._fits(n + len(prompt_ids) + max_new_tokens + 1):
            slots = self._slots(1, adapter, prefix, n + len(prompt_ids) + max_new_tokens + 1)
            logits = slots.prefill(0, [prompt_ids], [n])
            for step in range(max_new_tokens):
                token = sampling.pick(logits[0])
                yield token
                if step + 1 < max_new_tokens:
                    logits = slots.decode([token])
            return
        past = self.prefix_past(prefix, 1) if prefix else self.empty_past(1)
        ids = np.asarray([prompt_ids], dtype=np.int64)
        positions = np.arange(n, n + ids.shape[1], dtype=np.int64)[None]
        total = n + ids.shape[1]
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, np.ones((1, total), np.int64), positions, past, adapter)
            token = sampling.pick(logits[0, -1])
            yield token
            ids = np.asarray([[token]], dtype=np.int64)
            positions = np.asarray([[total]], dtype=np.int64)
            total += 1

    def generate_batch(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, pad_id: int,
                       adapter: str | None = None, prefix: Prefix | None = None,
                       stop_ids: Sequence[int] = ()) -> list[list[int]]:
        """Greedy generation for several prompts at once; returns each row's new tokens (up to a stop token).
        On the fused sidecar each row decodes at its own length; on the exported graph rows are left-padded."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        n = prefix.length if prefix else 0
        self._check_adapter(adapter)
        stops = np.asarray(sorted(set(stop_ids)) or [-1])
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, bool)
        if self._fits(n + width + max_new_tokens + 1) and all(prompts):
            slots = self._slots(batch, adapter, prefix, n + width + max_new_tokens + 1)
            logits = np.concatenate([slots.prefill(start, part, [n] * len(part), pad_id=pad_id)
                                     for start, part in _prefill_runs(prompts, n)])
            for step in range(max_new_tokens):
                tokens = logits.argmax(-1)
                done |= np.isin(tokens, stops)
                for row in np.flatnonzero(~done):
                    out[row].append(int(tokens[row]))
                if done.all() or step + 1 == max_new_tokens:
                    break
                logits = slots.decode(np.where(done, pad_id, tokens).tolist())
            return out
        ids = np.full((batch, width), pad_id, np.int64)
        mask = np.zeros((batch, n + width), np.int64)
        mask[:, :n] = 1
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = p
            mask[row, n + width - len(p):] = 1
        positions = np.maximum(np.cumsum(mask[:, n:], axis=1) - 1, 0) + n
        past = self.prefix_past(prefix, batch) if prefix else self.empty_past(batch)
        for _ in range(max_new_tokens):
            logits, past = self.forward(ids, mask, positions, past, adapter)
            tokens = logits[:, -1].argmax(-1)
            done |= np.isin(tokens, stops)
            for row in np.flatnonzero(~done):
                out[row].append(int(tokens[row]))
            if done.all():
                break
            ids = np.where(done, pad_id, tokens)[:, None].astype(np.int64)
            positions = positions[:, -1:] + 1
            mask = np.concatenate([mask, np.ones((batch, 1), np.int64)], axis=1)
        return out

    def decode_speed(self, prompt_ids: Sequence[int], new_tokens: int, repeats: int, *,
                     adapter: str | None = None, prefix: Prefix | None = None,
                     clock: Callable[[], float] = time.perf_counter) -> float:
        """Median greedy decode tokens/s at batch 1 over ``repeats`` runs of exactly ``new_tokens`` (after a warm-up)."""
        list(self.stream(prompt_ids, 2, adapter=adapter, prefix=prefix))
        rates = []
        for _ in range(repeats):
            started = clock()
            count = sum(1 for _ in self.stream(prompt_ids, new_tokens, adapter=adapter, prefix=prefix))
            rates.append(count / (clock() - started))
        return float(np.median(rates))


def _prefill_runs(prompts: Sequence[Sequence[int]], past: int) -> list[tuple[int, Sequence[Sequence[int]]]]:
    """(first row, prompts) of each prefill run: all rows in one, or one run per row after a key/value prefix
    (ONNX Runtime's GroupQueryAttention takes a prompt over a past context for one row at a time)."""
    if not past:
        return [(0, prompts)]
    return [(row, [prompt]) for row, prompt in enumerate(prompts)]


def _ortvalue(array: np.ndarray, dtype) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=dtype))

