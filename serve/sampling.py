"""The torch twin of :class:`edge.generation.Sampling`: the same contract on torch logits (the torch engine).

It lives here because the edge runtime must not import torch. It keeps torch's own generator, so a
seeded request samples in the worker without leaving torch (a seed repeats its answer on this engine;
numpy's and torch's generators differ, so the same seed picks differently on the ONNX backend).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from edge.generation import SamplingParams


@dataclass
class TorchSampling(SamplingParams):
    """:class:`edge.generation.SamplingParams` on torch logits; None as ``seed`` seeds from the clock."""

    _generator: Any = field(default=None, init=False, repr=False)

    def pick(self, logits) -> int:
        """The next token id from one row of logits ``[vocab]`` (a torch tensor)."""
        import torch

        if self.greedy:
            return int(logits.argmax())
        if self._generator is None:
            self._generator = torch.Generator(device=logits.device)
            self._generator.manual_seed(self.seed if self.seed is not None else time.time_ns() % 2**63)
        z = logits.float()
        # subtract the max before dividing: a tiny temperature then sends the others to -inf, never inf - inf
        probs = torch.softmax((z - z.max()) / self.temperature, dim=-1)
        if self.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True, stable=True)
            keep = sorted_probs.cumsum(0) - sorted_probs < self.top_p  # up to the token that reaches top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        return int(torch.multinomial(probs, 1, generator=self._generator))
