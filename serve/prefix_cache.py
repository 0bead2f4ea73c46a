"""Automatic prefix caching for the ONNX backend: prompt blocks already computed are copied, not recomputed.

Most requests to a server start alike: the chat template's system turn, a shared instruction, the
same few-shot examples. Their keys and values depend only on the tokens before them and on the
adapter, so after a prompt is prefilled its blocks of ``block`` tokens are kept (keyed by the adapter
and a hash chained over every token up to the block's end, as vLLM's prefix caching does), and a later
prompt for the same adapter that begins with the same blocks gets them copied into its slot and
prefills only the rest. What is kept covers every prompt token but the last (whose logits give the
first new token), the final block partial when the prompt does not end on a block boundary: a prompt
seen before then needs no prefill run at all, only its last token, which joins the next decode step.
The cache is bounded in bytes and drops least recently used blocks. Copying a block is exact: the same
keys and values the prefill computed. Pure numpy.
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict
from collections.abc import Sequence

import numpy as np

__all__ = ["PrefixCache"]


class PrefixCache:
    """Key/value blocks of prompt prefixes, per adapter, least recently used first."""

    def __init__(self, *, layers: int, kv_heads: int, head_dim: int, max_bytes: int, block: int = 8) -> None:
        self.block = block
        self.block_bytes = layers * 2 * kv_heads * block * head_dim * 4
        self.capacity = max_bytes // self.block_bytes if max_bytes > 0 else 0
        self._blocks: OrderedDict[bytes, tuple[str, np.ndarray]] = OrderedDict()
        """chained hash -> (adapter key, [layers, 2, kv_heads, block, head_dim] float32)"""
        self.hits = 0
        """Prompt tokens served from the cache (not prefilled)."""
        self.misses = 0
        """Prompt tokens prefilled."""

    @property
    def enabled(self) -> bool:
        return self.capacity > 0

    def _spans(self, tokens: Sequence[int]) -> list[tuple[int, int]]:
        """The (start, end) of each block over ``tokens[:-1]``: full blocks, then a partial one if any is left."""
        n = len(tokens) - 1
        return [(k, min(k + self.block, n)) for k in range(0, max(n, 0), self.block)]

    def _hashes(self, adapter: str, tokens: Sequence[int]) -> list[tuple[int, int, bytes]]:
        out, digest = [], hashlib.blake2b(adapter.encode(), digest_size=16).digest()
        for start, end in self._spans(tokens):
            chunk = np.asarray(tokens[start:end], np.int64).tobytes()
            digest = hashlib.blake2b(digest + chunk, digest_size=16).digest()
            out.append((start, end, digest))
        return out

    def lookup(self, adapter: str, tokens: Sequence[int]) -> list[np.ndarray]:
        """The cached blocks that begin ``tokens`` for ``adapter``, in order (each [layers, 2, kv_heads, length,
        head_dim]); together they cover at most every token but the last. Counted in :attr:`hits`/:attr:`misses`."""
        found = []
        for _, _, digest in self._hashes(adapter, tokens) if self.enabled else ():
            entry = self._blocks.get(digest)
            if entry is None:
                break
            self._blocks.move_to_end(digest)
            found.append(entry[1])
        covered = sum(block.shape[3] for block in found)
        self.hits += covered
        self.misses += len(tokens) - covered
        return found

    def store(self, adapter: str, tokens: Sequence[int], read) -> None:
        """Keep the blocks of ``tokens`` not cached yet; ``read(start, length)`` returns the keys and values of
        prompt positions ``start .. start + length - 1`` from where the prompt was just prefilled."""
        if not self.enabled:
            return
        for start, end, digest in self._hashes(adapter, tokens):
            if digest in self._blocks:
                self._blocks.move_to_end(digest)
                continue
            self._blocks[digest] = (adapter, read(start, end - start))
            while len(self._blocks) > self.capacity:
                self._blocks.popitem(last=False)

    def drop(self, adapter: str) -> None:
        """Forget every block of ``adapter`` (unloaded or replaced: its keys and values changed)."""
        for digest in [d for d, (a, _) in self._blocks.items() if a == adapter]:
            del self._blocks[digest]

    def clear(self) -> None:
        self._blocks.clear()

    def stats(self) -> dict[str, float]:
        total = self.hits + self.misses
        return {"blocks": len(self._blocks), "bytes": len(self._blocks) * self.block_bytes,
                "hit_rate": round(self.hits / total, 3) if total else 0.0}
