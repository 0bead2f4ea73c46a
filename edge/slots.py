"""Decoding with a key/value cache written in place, over a fused graph (:mod:`exporters.fused_graph`): the
edge runtime's fast path (:class:`edge.runtime.Decoder` at batch 1) and the ONNX server's batched runtime.

A :class:`FusedModel` is one ONNX Runtime session of the fused graph plus its stacked LoRA adapters; any
number of :class:`SlotDecoder` share it. A slot decoder runs ``slots`` rows: each slot owns one row of a
preallocated key/value buffer per layer ([slots, kv_heads, capacity, head_dim]); ONNX Runtime reads past
keys from it and writes each step's new keys into it at the row's own length (the same memory is bound
as ``past_key_values.*`` and ``present.*``), so rows of any lengths share one run and a request joining
or leaving copies nothing of the others' cache. Rows that run together must be contiguous slots
``[start, start + n)``: the caller keeps its running rows at the front and moves the last one into a
hole (:meth:`SlotDecoder.move` copies that one row).

LoRA adapters are stacked (:class:`LoraStack`): every projection's factors of every loaded adapter
side by side along the rank axis, and each slot's ``lora_rows`` mask keeps its own adapter's slice,
so rows of different adapters (and base rows, whose mask is all zero) share every run. A
prompt-learning adapter is a key/value prefix written into the slot before its prompt.

Imports only numpy and onnxruntime (plus :mod:`edge.session`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.session import LORA_PREFIX, Prefix, resolve_providers, session_options

__all__ = ["FUSED_FORMAT", "FusedModel", "LoraStack", "SlotDecoder", "fused_path"]

SEQLENS, TOTAL, ROWS, LAST = "seqlens_k", "total_sequence_length", "lora_rows", "last_index"
"""The fused graph's own inputs besides ``input_ids`` and the key/value cache."""
FUSED_FORMAT = "edgetune-fused/2"
"""``edgetune.fused`` in a fused graph's metadata: the input contract above. A graph of another format is refused."""
FUSED_SUFFIX = ".fused.onnx"


def fused_path(model_path: Path) -> Path:
    """Where the export puts the fused sidecar of the decoder at ``model_path`` (``model.onnx`` ->
    ``model.fused.onnx``): a small graph whose weights are byte ranges of ``model_path`` itself."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name.removesuffix(".onnx") + FUSED_SUFFIX)


def _bind(io: ort.IOBinding, name: str, array: np.ndarray, output: bool = False) -> None:
    """Bind ``array``'s own memory (C-contiguous, on the CPU) to input or output ``name``: no copy."""
    assert array.flags.c_contiguous, name
    bind = io.bind_output if output else io.bind_input
    bind(name, "cpu", 0, array.dtype, list(array.shape), array.ctypes.data)


@dataclass
class _Range:
    start: int
    width: int


class LoraStack:
    """Every loaded LoRA adapter's factors, stacked along the rank axis, per projection.

    For each ``lora.<module>.A``/``.B`` input of the fused graph, ``a[input]`` is [capacity, in] (the
    ``.onnx_adapter``'s [in, rank] factor, transposed) and ``b[input]`` [capacity, out]; adapter ``name`` owns
    rows ``ranges[name]`` of both, as many as its largest rank (smaller ranks and modules it leaves alone are
    zero), so the adapters of any run are one contiguous block of rows. Freed ranges are zeroed and reused;
    the stack grows (one copy) when no free range is wide enough.
    """

    def __init__(self, inputs: dict[str, list]) -> None:
        """``inputs``: the fused graph's LoRA inputs, name -> declared shape ([rank, in] or [rank, out])."""
        self.widths = {n: int(s[1]) for n, s in inputs.items()}
        self.capacity = 0
        self.a: dict[str, np.ndarray] = {}
        self.b: dict[str, np.ndarray] = {}
        self.ranges: dict[str, _Range] = {}
        self.version = 0
        self._resize(0)

    def _resize(self, capacity: int) -> None:
        grown = {}
        for name, width in self.widths.items():
            old = (self.a if name.endswith(".A") else self.b).get(name)
            buf = np.zeros((capacity, width), np.float32)
            if old is not None:
                buf[:self.capacity] = old
            grown[name] = buf
        self.a = {n: v for n, v in grown.items() if n.endswith(".A")}
        self.b = {n: v for n, v in grown.items() if not n.endswith(".A")}
        self.capacity = capacity
        self.version += 1  # new arrays: bindings to the old ones are stale

    def _free(self, width: int) -> int | None:
        """Start of the first unused run of ``width`` rows, or None."""
        taken = sorted((r.start, r.start + r.width) for r in self.ranges.values())
        cursor = 0
        for start, end in taken:
            if start - cursor >= width:
                return cursor
            cursor = max(cursor, end)
        return cursor if self.capacity - cursor >= width else None

    def add(self, name: str, params: dict[str, np.ndarray]) -> _Range:
        """Stack adapter ``name`` (``params``: its ``.onnx_adapter`` tensors, A [in, r], B [r, out])."""
        if name in self.ranges:
            self.remove(name)
        width = max(v.shape[0 if k.endswith(".B") else 1] for k, v in params.items())
        start = self._free(width)
        if start is None:
            self._resize(max(2 * self.capacity, self.capacity + width))
            start = self._free(width)
        for key, value in params.items():
            if key.endswith(".A"):
                self.a[key][start:start + value.shape[1]] = value.T
            else:
                self.b[key][start:start + value.shape[0]] = value
        self.ranges[name] = _Range(start, width)
        return self.ranges[name]

    def remove(self, name: str) -> None:
        """Unstack ``name``: its rows are zeroed and free for the next adapter."""
        r = self.ranges.pop(name, None)
        if r is None:
            return
        for buf in (*self.a.values(), *self.b.values()):
            buf[r.start:r.start + r.width] = 0


class FusedModel:
    """One session of a fused decoder graph and the LoRA adapters stacked for it; shared by slot decoders.

    ``model``: the serialized graph (:func:`exporters.fused_graph.fuse_decoder`) or the path of a fused
    sidecar (:func:`fused_path`). Raises ``ValueError`` for a graph that is not a fused decoder of this format.
    """

    def __init__(self, model: bytes | str | Path, *, threads: int | None = None,
                 providers: Sequence[str] | None = None) -> None:
        source = model if isinstance(model, bytes) else str(model)
        self.path: Path | None = None if isinstance(model, bytes) else Path(model)
        """The sidecar file it was opened from (None: from memory)."""
        self.session = ort.InferenceSession(source, session_options(threads), providers=resolve_providers(providers))
        meta = self.session.get_modelmeta().custom_metadata_map
        if meta.get("edgetune.fused") != FUSED_FORMAT:
            raise ValueError(f"not a fused decoder of format {FUSED_FORMAT} (metadata says "
                             f"{meta.get('edgetune.fused')!r}); re-export the model")
        inputs = {i.name: i for i in self.session.get_inputs()}
        pasts = [n for n in inputs if n.startswith("past_key_values.")]
        first = inputs[pasts[0]].shape  # [batch, kv_heads, past, head_dim]
        self.layers, self.kv_heads, self.head_dim = len(pasts) // 2, int(first[1]), int(first[3])
        self.max_length = int(meta["edgetune.max_length"])
        """Positions the rotary tables cover: the longest sequence a row may reach."""
        self.source_bytes = int(meta.get("edgetune.source_bytes", -1))
        """Size of the exported file a sidecar reads its weights from (-1: fused in memory)."""
        self.vocab = int(self.session.get_outputs()[0].shape[-1])
        lora = {i.name: i.shape for i in self.session.get_overridable_initializers()
                if i.name.startswith(LORA_PREFIX) and i.name.endswith((".A", ".B"))}
        self.lora = LoraStack(lora) if lora else None

    def load_lora(self, name: str, path: Path) -> None:
        """Stack the ``.onnx_adapter`` at ``path`` as ``name``, after checking it sets only this graph's LoRA
        inputs with shapes that fit (ValueError naming the problem otherwise)."""
        if self.lora is None:
            raise ValueError(f"adapter {name!r} needs the multi-LoRA base model; this one has no LoRA inputs")
        try:
            adapter = ort.AdapterFormat.read_adapter(str(path))
        except RuntimeError as exc:
            raise ValueError(f"adapter {name!r}: {Path(path).name} is not an ONNX Runtime adapter file "
                             f"({str(exc).splitlines()[-1][-120:]}); re-export the bundle") from None
        # copied out while the file's object lives: the OrtValues point into its memory
        params = {k: np.array(v.numpy(), np.float32) for k, v in adapter.get_parameters().items()}
        del adapter
        unknown = sorted(set(params) - set(self.lora.widths))
        if unknown:
            raise ValueError(f"adapter {name!r} sets {unknown[:3]}, which this base does not take; it was exported "
                             "for another base")
        for key, value in params.items():
            fixed = 0 if key.endswith(".A") else 1  # A is [in, rank], B [rank, out]: in and out must fit
            want = self.lora.widths[key]
            if value.ndim != 2 or value.shape[fixed] != want or value.shape[1 - fixed] > 4096:
                raise ValueError(f"adapter {name!r}: {key} has shape {list(value.shape)}, this base needs {want} "
                                 f"on axis {fixed}; it was exported for another base")
            if not np.isfinite(value).all():
                raise ValueError(f"adapter {name!r}: {key} holds NaN or infinite values")
        self.lora.add(name, params)

    def unload_lora(self, name: str) -> None:
        if self.lora is not None:
            self.lora.remove(name)

    def check_prefix(self, prefix: Prefix) -> None:
        """ValueError unless ``prefix`` has this decoder's layers, key/value heads and head size."""
        if len(prefix.keys) != self.layers or prefix.keys[0].shape[0] != self.kv_heads \
                or prefix.keys[0].shape[2] != self.head_dim:
            raise ValueError(f"key/value prefix of shape {len(prefix.keys)} x {prefix.keys[0].shape} does not fit "
                             f"this decoder ({self.layers} layers x [{self.kv_heads}, P, {self.head_dim}])")


class SlotDecoder:
    """``slots`` rows of in-place key/value cache over a :class:`FusedModel` (see the module docstring).

    ``model``: a :class:`FusedModel` to share (its session and stacked adapters), or what opens one
    (serialized graph or sidecar path, with ``threads`` and ``providers``). ``capacity``: positions per
    slot allocated up front (the buffers double when a row needs more, up to ``max_length``).
    """

    def __init__(self, model: FusedModel | bytes | str | Path, *, slots: int, threads: int | None = None,
                 providers: Sequence[str] | None = None, capacity: int = 256) -> None:
        self.model = model if isinstance(model, FusedModel) else FusedModel(model, threads=threads,
                                                                               providers=providers)
        self.session = self.model.session
        self.slots = slots
        self.layers, self.kv_heads, self.head_dim = self.model.layers, self.model.kv_heads, self.model.head_dim
        self.max_length = self.model.max_length
        self.vocab = self.model.vocab
        self.lengths = np.zeros(slots, np.int64)
        """Tokens in each slot's cache (prefix included)."""
        self.capacity = 0
        self.keys: list[np.ndarray] = []
        self.values: list[np.ndarray] = []
        self._kv_version = 0
        self._grow(min(capacity, self.max_length))
        self._row_range: list[_Range | None] = [None] * slots
        self._bound: tuple[int, int, int] | None = None
        self._kv_bound: tuple[int, int, int] | None = None
        """(start, rows, buffers' version) of the key/value rows bound last: they stay bound (by address) until
        the rows change or :meth:`_grow` reallocates the buffers."""
        self._io = self.session.io_binding()

    @property
    def lora(self) -> LoraStack | None:
        return self.model.lora

    # ---- cache -------------------------------------------------------------------------------
    def _grow(self, capacity: int) -> None:
        """Reallocate the buffers with room for ``capacity`` positions per slot (copies what is there)."""
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        keep = min(self.capacity, capacity)
        keys, values = [], []
        for old, new_list in ((self.keys, keys), (self.values, values)):
            for layer in range(self.layers):
                buf = np.zeros(shape, np.float32)
                if old:
                    buf[:, :, :keep] = old[layer][:, :, :keep]
                new_list.append(buf)
        self.keys, self.values, self.capacity = keys, values, capacity
        self._kv_version += 1  # new arrays: bindings to the old ones are stale

    def reserve(self, length: int) -> None:
        """Make room for ``length`` positions in every slot (doubling; at most ``max_length``)."""
        if length > self.max_length:
            raise ValueError(f"{length} positions exceed the context ({self.max_length})")
        if length > self.capacity:
            self._grow(min(self.max_length, max(length, 2 * self.capacity)))

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (its cache, length and adapter) into slot ``dst``."""
        n = int(self.lengths[src])
        for buf in (*self.keys, *self.values):
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst] = n
        self._row_range[dst] = self._row_range[src]

    # ---- adapters ----------------------------------------------------------------------------
    def load_lora(self, name: str, path: Path) -> None:
        """Stack an ``.onnx_adapter`` on the shared model (:meth:`FusedModel.load_lora`)."""
        self.model.load_lora(name, path)

    def unload_lora(self, name: str) -> None:
        self.model.unload_lora(name)

    def set_adapter(self, slot: int, adapter: str | None) -> None:
        """Slot ``slot`` uses stacked LoRA adapter ``adapter`` (None: the base alone)."""
        if adapter is not None and (self.lora is None or adapter not in self.lora.ranges):
            raise KeyError(f"LoRA adapter {adapter!r} is not stacked")
        self._row_range[slot] = self.lora.ranges[adapter] if adapter is not None else None

    def _lora_span(self, start: int, n: int) -> tuple[int, int, np.ndarray]:
        """The block of stacked rows the adapters of rows ``start .. start + n - 1`` occupy, (lo, hi), and the
        rows' mask over it [n, 1, hi - lo]: ones on each row's own adapter, zeros elsewhere (base rows: all)."""
        used = [r for r in self._row_range[start:start + n] if r is not None]
        lo = min((r.start for r in used), default=0)
        hi = max((r.start + r.width for r in used), default=0)
        mask = np.zeros((n, 1, hi - lo), np.float32)
        for k, r in enumerate(self._row_range[start:start + n]):
            if r is not None:
                mask[k, 0, r.start - lo:r.start - lo + r.width] = 1
        return lo, hi, mask

    # ---- runs ------------------------------------------------------------------------------
    def _run(self, start: int, ids: np.ndarray, seqlens: np.ndarray, last: np.ndarray) -> np.ndarray:
        """One run of rows ``start ..``; ``last`` [rows, k]: the positions of ``ids`` whose logits come back,
        [rows, k, vocab]."""
        n = ids.shape[0]
        io = self._io
        stack = None
        if self.lora is not None:  # only the stacked adapters these rows use: the cost follows them
            # held for the run: another thread's load may swap the stack's arrays for grown ones meanwhile
            stack = (self.lora.a, self.lora.b)
            lo, hi, mask = self._lora_span(start, n)
            if self._bound != (lo, hi, self.lora.version):  # bound by address: same arrays, same block, no rebind
                for name, array in (*self.lora.a.items(), *self.lora.b.items()):
                    _bind(io, name, array[lo:hi])
                self._bound = (lo, hi, self.lora.version)
            _bind(io, ROWS, mask)
        ids = np.ascontiguousarray(ids, np.int64)
        seqlens = np.ascontiguousarray(seqlens, np.int32)
        total = np.asarray(int(seqlens.max()) + 1, np.int32)
        last = np.ascontiguousarray(last, np.int64).reshape(n, -1)
        for name, array in ((("input_ids", ids), (SEQLENS, seqlens), (TOTAL, total), (LAST, last))):
            _bind(io, name, array)
        if self._kv_bound != (start, n, self._kv_version):  # the same rows of the same buffers: bound already
            for layer in range(self.layers):
                for kind, bufs in (("key", self.keys), ("value", self.values)):
                    rows = bufs[layer][start:start + n]
                    _bind(io, f"past_key_values.{layer}.{kind}", rows)
                    _bind(io, f"present.{layer}.{kind}", rows, output=True)
            self._kv_bound = (start, n, self._kv_version)
        logits = np.empty((n, last.shape[1], self.vocab), np.float32)
        _bind(io, "logits", logits, output=True)
        # the arrays bound above must live until the run ends: they are locals of this frame
        self.session.run_with_iobinding(io)
        del stack
        return logits

    def write_prefix(self, slot: int, prefix: Prefix) -> None:
        """Write a prompt-learning adapter's key/value prefix at positions ``0 .. prefix.length - 1`` of ``slot``."""
        self.check_prefix(prefix)
        self.reserve(prefix.length + 1)
        for layer in range(self.layers):
            self.keys[layer][slot, :, :prefix.length] = prefix.keys[layer]
            self.values[layer][slot, :, :prefix.length] = prefix.values[layer]

    def read_block(self, slot: int, at: int, length: int) -> np.ndarray:
        """Positions ``at .. at + length - 1`` of ``slot``: [layers, 2, kv_heads, length, head_dim] (a copy)."""
        return np.stack([np.stack([self.keys[layer][slot, :, at:at + length],
                                   self.values[layer][slot, :, at:at + length]]) for layer in range(self.layers)])

    def write_block(self, slot: int, at: int, block: np.ndarray) -> None:
        """The inverse of :meth:`read_block`."""
        length = block.shape[3]
        self.reserve(at + length + 1)
        for layer in range(self.layers):
            self.keys[layer][slot, :, at:at + length] = block[layer, 0]
            self.values[layer][slot, :, at:at + length] = block[layer, 1]

    def prefill(self, start: int, prompts: Sequence[Sequence[int]], past: Sequence[int] = (),
                pad_id: int = 0, every_position: bool = False, positions: np.ndarray | None = None) -> np.ndarray:
        """Run the prompts of rows ``start .. start + len(prompts) - 1`` in one run; returns each row's next-token
        logits [rows, vocab] (``every_position``: the logits at every prompt position, [rows, longest prompt,
        vocab], padding included; ``positions`` [rows, k]: at those positions of each row's prompt, [rows, k, vocab],
        the output head run there only). Slot ``start + k`` already holds ``past[k]`` positions (a prefix, cached blocks:
        see :meth:`write_prefix`, :meth:`write_block`; default none) and its prompt follows them. Adapters:
        :meth:`set_adapter` first.

        Shorter prompts are padded after their end and the padding is run as if real: it lands in the
        slot after the prompt, where the row's next token overwrites it, and no real token attends to it.
        """
        n = len(prompts)
        if n == 0 or start < 0 or start + n > self.slots:
            raise ValueError(f"rows {start}..{start + n - 1} are outside the {self.slots} slots")
        width = max(len(p) for p in prompts)
        past = np.asarray(list(past) or [0] * n, np.int64)
        self.reserve(int(past.max()) + width + 1)
        ids = np.full((n, width), pad_id, np.int64)
        for k, p in enumerate(prompts):
            if not len(p):
                raise ValueError("a prompt is empty: give at least one token")
            ids[k, :len(p)] = p
        lengths = np.asarray([len(p) for p in prompts], np.int64)
        if every_position:
            picked = np.broadcast_to(np.arange(width), (n, width))
        elif positions is not None:
            picked = np.asarray(positions, np.int64).reshape(n, -1)
        else:
            picked = (lengths - 1)[:, None]
        logits = self._run(start, ids, past + width - 1, picked)
        self.lengths[start:start + n] = past + lengths
        return logits if every_position or positions is not None else logits[:, 0]

    def decode(self, tokens: Sequence[int], start: int = 0) -> np.ndarray:
        """One token for each of rows ``start .. start + len(tokens) - 1`` (their last picks); next logits."""
        n = len(tokens)
        lengths = self.lengths[start:start + n]
        self.reserve(int(lengths.max()) + 1)
        logits = self._run(start, np.asarray(tokens, np.int64).reshape(n, 1), lengths.copy(),
                           np.zeros((n, 1), np.int64))
        self.lengths[start:start + n] += 1
        return logits[:, 0]

    def check_prefix(self, prefix: Prefix) -> None:
        self.model.check_prefix(prefix)
