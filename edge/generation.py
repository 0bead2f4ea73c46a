"""The generation tail every runtime shares: finish reasons, the context budget, sampling, incremental text.

Used by the edge runtime (:mod:`edge.bundle`, :mod:`edge.cli`) and both server engines
(:mod:`serve.engine`, :mod:`serve.onnx_engine`), so a request ends, is clipped, sampled and
detokenized the same way wherever it runs. Imports only the stdlib, numpy and tokenizers
(:mod:`serve.sampling` holds the torch twin of :class:`Sampling`).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

import numpy as np
from tokenizers import Tokenizer

try:  # tokenizers >= 0.21; older versions decode the whole text every token (same output, slower)
    from tokenizers.decoders import DecodeStream
except ImportError:  # pragma: no cover - depends on the installed tokenizers
    DecodeStream = None

__all__ = ["SEED_MAX", "SMALLEST", "ContextOverflow", "FinishReason", "Sampling", "SamplingParams", "TextStream",
           "check_seed", "check_temperature", "check_top_p", "token_budget"]


class FinishReason(str, Enum):
    """Why a generation ended. A ``str``: it compares equal to (and serialises as) its value."""

    STOP = "stop"
    """A stop token or stop string."""
    LENGTH = "length"
    """``max_tokens``, or the context, ran out."""
    TIMEOUT = "timeout"
    """The request's deadline passed."""
    CANCELLED = "cancelled"
    """The client went away (or the caller cancelled it)."""
    ERROR = "error"
    """Generation failed; the error message goes with it."""

    __str__ = str.__str__  # "stop", not "FinishReason.STOP", in f-strings and logs on every Python version


class ContextOverflow(ValueError):
    """The prompt (with any virtual tokens) leaves no room in the context for a new token."""


def token_budget(prompt_len: int, prefix_len: int, max_tokens: int, context_length: int) -> int:
    """How many new tokens a request may generate: ``max_tokens`` clipped to the room the context has left
    after ``prefix_len`` virtual tokens (a prompt-learning adapter's) and ``prompt_len`` prompt tokens.

    Raises :class:`ContextOverflow` when not even one new token fits.
    """
    room = context_length - prefix_len - prompt_len
    if room < 1:
        virtual = f" after {prefix_len} virtual tokens" if prefix_len else ""
        raise ContextOverflow(f"the prompt has {prompt_len} tokens{virtual}; the context holds {context_length}: "
                              "shorten the prompt")
    return min(max_tokens, room)


SMALLEST = float(np.finfo(np.float32).tiny)
"""The smallest positive temperature or top_p (about 1.2e-38, the smallest normal float32). The torch
sampler divides float32 logits by the temperature and compares float32 probabilities with top_p: a
smaller value rounds to 0 there (1e-300: 0/0 is NaN; top_p 1e-320: no token reaches it), or to a
subnormal that a device flushing subnormals to zero (FTZ/DAZ) also treats as 0, so it is refused."""
SEED_MAX = 2**63 - 1
"""The largest seed: both generators (numpy's and torch's) take every seed in [0, 2**63 - 1]."""


def check_temperature(value: float) -> float:
    """``value`` if it is 0 (greedy) or a finite number >= :data:`SMALLEST`, else ValueError naming the range."""
    if value == 0 or (math.isfinite(value) and value >= SMALLEST):
        return value
    raise ValueError(f"temperature must be 0 (greedy) or a finite number >= {SMALLEST:.3g}, got {value!r}")


def check_top_p(value: float) -> float:
    """``value`` if it is in [:data:`SMALLEST`, 1], else ValueError naming the range."""
    if SMALLEST <= value <= 1:
        return value
    raise ValueError(f"top_p must be in [{SMALLEST:.3g}, 1] (1: no nucleus cut), got {value!r}")


def check_seed(value: int | None) -> int | None:
    """``value`` if it is None (seed from the system) or an integer in [0, :data:`SEED_MAX`], else ValueError."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= SEED_MAX):
        return value
    raise ValueError(f"seed must be an integer in [0, 2**63 - 1] ({SEED_MAX}), got {value!r}")


@dataclass
class SamplingParams:
    """The sampler contract, one for every runtime (numpy: :class:`Sampling`; torch: ``serve.sampling``).

    - ``temperature`` 0: greedy, the most probable token (the lowest id on ties).
    - Otherwise the probabilities are ``softmax(logits / temperature)``; with ``top_p`` < 1 only the
      nucleus stays: the smallest set of most probable tokens (ties by lowest id) whose cumulative
      probability reaches ``top_p``, renormalised. The most probable token is always in it.
    - ``seed``: the same seed gives the same picks from the same logits (within one implementation);
      None seeds from the system.

    The bounds (:func:`check_temperature`, :func:`check_top_p`, :func:`check_seed`) are checked here, so
    every runtime refuses the same values; the server checks the same functions before queueing a request.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        check_temperature(self.temperature)
        check_top_p(self.top_p)
        check_seed(self.seed)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Sampling(SamplingParams):
    """:class:`SamplingParams` on numpy logits (the edge runtime and the ONNX engine)."""

    _rng: np.random.Generator | None = field(default=None, init=False, repr=False)

    def pick(self, logits: np.ndarray) -> int:
        """The next token id from one row of logits ``[vocab]``."""
        if self.greedy:
            return int(logits.argmax())
        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        z = logits.astype(np.float64)
        # subtract the max before dividing: a tiny temperature then sends the others to -inf, never inf - inf
        probs = np.exp((z - z.max()) / self.temperature)
        probs /= probs.sum()
        if self.top_p < 1.0:
            order = np.argsort(-probs, kind="stable")
            sorted_probs = probs[order]
            keep = np.cumsum(sorted_probs) - sorted_probs < self.top_p  # up to the token that reaches top_p
            probs = np.zeros_like(probs)
            probs[order[keep]] = sorted_probs[keep]
            probs /= probs.sum()
        return int(self._rng.choice(len(probs), p=probs))


def _backend(tokenizer: Any) -> Any:
    """The ``tokenizers.Tokenizer`` whose streaming decode equals ``tokenizer.decode``, or None.

    A Hugging Face tokenizer's ``decode`` is its backend's plus, when ``clean_up_tokenization_spaces``
    is set, a Python pass over the whole text (" ." -> "." ...) that a stream cannot reproduce piece
    by piece: such a tokenizer (or one without a backend) is decoded whole each token instead.
    """
    if DecodeStream is None or getattr(tokenizer, "clean_up_tokenization_spaces", False):
        return None
    if isinstance(tokenizer, Tokenizer):
        return tokenizer
    return getattr(tokenizer, "backend_tokenizer", None)


class TextStream:
    """One request's tokens in, its text out: new pieces as they complete, the stop rules, the finish reason.

    ``push`` each generated token; it returns the text that token completes ("" if none) and sets
    :attr:`finish_reason` when the request is done:

    - a token in ``stop_ids`` (end of sequence): ``stop``; it is not counted and adds no text;
    - a ``stop`` string in the text: ``stop``; the text ends just before it (nothing of it is ever
      returned: text that could begin a stop string is held back until it cannot);
    - ``max_tokens`` tokens (the :func:`token_budget`): ``length``.

    The pieces joined are ``tokenizer.decode(tokens, skip_special_tokens=True)`` (cut at a stop string):
    a piece ends only on whole characters (text ending in an incomplete UTF-8 character, decoded as
    "\\ufffd", waits for the next token). When the request ends for another reason (timeout,
    cancellation, error), :meth:`flush` returns the held-back text. ``tokenizer`` is a
    ``tokenizers.Tokenizer`` or anything with its ``decode`` (a Hugging Face tokenizer).
    """

    def __init__(self, tokenizer: Any, *, max_tokens: int, stop: Sequence[str] = (),
                 stop_ids: Collection[int] = ()) -> None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {max_tokens}")
        self.tokenizer = tokenizer
        self.max_tokens = max_tokens
        self.stop = [s for s in stop if s]
        self.stop_ids = frozenset(stop_ids)
        self.tokens: list[int] = []
        self.text = ""
        """The text so far (returned or held back), cut at a stop string."""
        self.finish_reason: FinishReason | None = None
        self._sent = 0  # characters of ``text`` returned
        self._decoded = ""  # the decoder's text so far, before stop strings
        self._backend = _backend(tokenizer)
        self._stream = DecodeStream(skip_special_tokens=True) if self._backend is not None else None

    def push(self, token: int) -> str:
        """Take one generated token; return the new text it completes ("" if none)."""
        if self.finish_reason is not None:
            raise RuntimeError(f"the request already finished ({self.finish_reason})")
        if token in self.stop_ids:
            self.finish_reason = FinishReason.STOP
            return self.flush()
        self.tokens.append(token)
        piece = self._decode(token)
        if piece:
            self._add(piece)
        if self.finish_reason is None and len(self.tokens) >= self.max_tokens:
            self.finish_reason = FinishReason.LENGTH
        return self.flush() if self.finish_reason is not None else self._release()

    def flush(self) -> str:
        """All text not returned yet (held back as a possible stop string's start); call when ending."""
        out, self._sent = self.text[self._sent:], len(self.text)
        return out

    def _decode(self, token: int) -> str:
        if self._stream is not None:
            try:
                piece = self._stream.step(self._backend, token) or ""
            except Exception:  # noqa: BLE001 - DecodeStream refused its own window: decode whole from here on
                self._stream = None
            else:
                self._decoded += piece  # what the whole-text decode has reached, should the stream fail later
                return piece
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd") or len(text) <= len(self._decoded):  # an incomplete character waits
            return ""
        piece, self._decoded = text[len(self._decoded):], text
        return piece

    def _add(self, piece: str) -> None:
        """Append ``piece`` to the text, cutting at the first stop string it completes."""
        start = len(self.text)
        self.text += piece
        cuts = [i for i in (self.text.find(s, max(0, start - len(s) + 1)) for s in self.stop) if i != -1]
        if cuts:
            self.text = self.text[:min(cuts)]
            self.finish_reason = FinishReason.STOP

    def _release(self) -> str:
        """The text no stop string can still claim: all but the longest tail that begins a stop string."""
        held = 0
        for stop in self.stop:  # only unsent text can be held: what was sent never begins a stop string
            for n in range(min(len(stop) - 1, len(self.text) - self._sent), held, -1):
                if self.text.endswith(stop[:n]):
                    held = n
                    break
        end = len(self.text) - held
        out, self._sent = self.text[self._sent:end], end
        return out

