"""The torch engine's key/value cache: one preallocated slot per running request, written in place.

Each layer keeps keys and values for ``slots`` rows ([slots, kv_heads, capacity, head_dim], in the model's
dtype, on its device). A request's prefill (run alone) is copied into its slot once; every decode step
writes each row's new key and value at that row's own length and attends over the slots' first
``max(length) + 1`` positions, a 2-D mask hiding what lies past each row's end. So a request joining costs
the copy of its own prompt's cache, one leaving the copy of at most one other row (the last row moves into
its slot), and a step copies no cache at all: the attention reads the slots where they are. Rows run
together must be slots ``0 .. n - 1``: the engine keeps its running rows at the front.

The step's :class:`SlotCache` is a transformers ``Cache``: the model calls its ``update`` per layer and reads
the mask size from it, so any decoder built on transformers' cache interface runs on it unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

__all__ = ["KVSlots", "SlotCache"]


class _SlotLayer(CacheLayerMixin):
    """One layer's view of the slots for one decode step."""

    is_compileable = False
    is_sliding = False

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, rows: torch.Tensor, at: torch.Tensor,
                 length: int) -> None:
        super().__init__()
        self.slot_keys, self.slot_values, self.rows, self.at, self.length = keys, values, rows, at, length
        self.is_initialized = True

    def lazy_initialization(self, key_states: torch.Tensor) -> None:  # the slots exist already
        return None

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor,
               cache_kwargs: dict[str, Any] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Write each row's new key and value (one position) at its own length; return the rows' slots up to the
        longest length (views, no copy)."""
        if key_states.shape[2] != 1:
            raise ValueError("the slot cache takes one new position per row (prefill runs on a DynamicCache)")
        self.slot_keys[self.rows, :, self.at] = key_states[:, :, 0]
        self.slot_values[self.rows, :, self.at] = value_states[:, :, 0]
        n = key_states.shape[0]
        return self.slot_keys[:n, :, :self.length], self.slot_values[:n, :, :self.length]

    def get_mask_sizes(self, cache_position: torch.Tensor) -> tuple[int, int]:
        return self.length, 0

    def get_seq_length(self) -> int:
        return self.length - 1

    def get_max_cache_shape(self) -> int:
        return -1


class SlotCache(Cache):
    """The cache a decode step passes to the model: every layer's :class:`_SlotLayer`."""

    def __init__(self, layers: list[_SlotLayer]) -> None:
        super().__init__(layers=layers)


class KVSlots:
    """Preallocated per-request key/value slots for every layer of a model."""

    def __init__(self, layers: int, slots: int, kv_heads: int, head_dim: int, *, dtype: torch.dtype,
                 device: torch.device, capacity: int = 128, max_length: int = 2048) -> None:
        self.layers, self.slots, self.kv_heads, self.head_dim = layers, slots, kv_heads, head_dim
        self.dtype, self.device, self.max_length = dtype, device, max_length
        self.lengths = [0] * slots
        """Positions held by each slot."""
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self._grow(min(capacity, max_length))

    def _grow(self, capacity: int) -> None:
        keep = min(self.capacity, capacity)
        shape = (self.slots, self.kv_heads, capacity, self.head_dim)
        for store in (self.keys, self.values):
            old = list(store)
            store.clear()
            for layer in range(self.layers):
                buf = torch.zeros(shape, dtype=self.dtype, device=self.device)
                if old:
                    buf[:, :, :keep] = old[layer][:, :, :keep]
                store.append(buf)
        self.capacity = capacity

    def reserve(self, length: int) -> None:
        """Room for ``length`` positions per slot (doubling, at most ``max_length``; one copy when it grows)."""
        if length > self.capacity:
            self._grow(min(self.max_length, max(length, 2 * self.capacity)))

    def write(self, slot: int, cache, row: int = 0, length: int | None = None) -> None:
        """Copy row ``row`` of a prefill's cache (a transformers cache), its first ``length`` positions (default:
        all), into ``slot``."""
        length = cache.get_seq_length() if length is None else length
        self.reserve(length + 1)
        for layer, entry in enumerate(cache.layers):
            self.keys[layer][slot, :, :length] = entry.keys[row, :, :length]
            self.values[layer][slot, :, :length] = entry.values[row, :, :length]
        self.lengths[slot] = length

    def move(self, src: int, dst: int) -> None:
        """Copy slot ``src`` (its cache and length) into ``dst``."""
        n = self.lengths[src]
        for buf in (*self.keys, *self.values):
            buf[dst, :, :n] = buf[src, :, :n]
        self.lengths[dst] = n

    def step(self, n: int) -> tuple[SlotCache, torch.Tensor, torch.Tensor, torch.Tensor]:
        """For a decode step of rows ``0 .. n - 1``: (the cache, the 2-D attention mask [n, L], position ids
        [n, 1], cache positions [1]), L being the longest row's length plus its new token. Call
        :meth:`advance` after the step."""
        at = torch.tensor(self.lengths[:n], device=self.device)
        length = max(self.lengths[:n]) + 1
        self.reserve(length)
        rows = torch.arange(n, device=self.device)
        mask = (torch.arange(length, device=self.device)[None] <= at[:, None]).long()
        layers = [_SlotLayer(self.keys[i], self.values[i], rows, at, length) for i in range(self.layers)]
        return SlotCache(layers), mask, at[:, None], torch.tensor([length - 1], device=self.device)

    def advance(self, n: int) -> None:
        for row in range(n):
            self.lengths[row] += 1
