"""Run an exported ONNX decoder with ONNX Runtime: greedy or sampled generation, over the bare base,
a LoRA ``.onnx_adapter`` or a key/value prefix. Imports only numpy, onnxruntime and the sampler of
:mod:`edge.generation` (which adds tokenizers).

The decoder is the optimum-onnx layout: inputs ``input_ids``, ``attention_mask``, ``position_ids``,
``past_key_values.<i>.key|value`` (and, for a multi-LoRA base, ``lora.*`` inputs); outputs
``logits`` and ``present.<i>.key|value``. Steps run with ``run_with_ort_values``, so the key/value
cache stays in ONNX Runtime's own buffers from one step to the next instead of being copied out to
numpy and back every token (for a model this small that copy is a real share of a step), and an
adapter is still activated through ``RunOptions`` (IO binding ignores active adapters).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort

from edge.generation import Sampling

__all__ = ["Decoder", "Prefix", "resolve_providers"]

LORA_PREFIX = "lora."
"""Graph inputs that start with this are LoRA factors a ``.onnx_adapter`` overrides (see exporters.onnx_lora)."""


@dataclass(frozen=True)
class Prefix:
    """A key/value prefix: per layer ``keys[l]``/``values[l]`` of shape [kv_heads, length, head_dim].

    A prefix-tuning adapter stores it directly; a prompt-tuning or P-tuning adapter's prefix is what
    the base computes over its virtual tokens. Real tokens then start at position ``length``.
    """

    keys: list[np.ndarray]
    values: list[np.ndarray]

    @property
    def length(self) -> int:
        return int(self.keys[0].shape[1]) if self.keys else 0

    @classmethod
    def load(cls, path: Path) -> Prefix:
        """Read a prefix written by :meth:`save` (``.npz``, no pickles)."""
        with np.load(path, allow_pickle=False) as data:
            layers = len([k for k in data.files if k.startswith("key.")])
            return cls([data[f"key.{i}"] for i in range(layers)], [data[f"value.{i}"] for i in range(layers)])

    def save(self, path: Path) -> None:
        arrays = {f"key.{i}": k for i, k in enumerate(self.keys)}
        arrays.update({f"value.{i}": v for i, v in enumerate(self.values)})
        np.savez(path, **arrays)


PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
"""Short execution-provider names (``--providers cpu,cuda``) -> ONNX Runtime's names."""
GPU_EXTRA_HINT = ("install the gpu extra in place of the CPU wheel: pip uninstall -y onnxruntime && "
                  "pip install 'edgetune[gpu]' (onnxruntime-gpu, which needs an NVIDIA driver and CUDA 12 libraries)")


def resolve_providers(names: Sequence[str] | None) -> list[str]:
    """ONNX Runtime provider names for ``names`` (``cpu``, ``cuda`` or ORT names such as
    ``CUDAExecutionProvider``), in order of preference, with the CPU always last as the fallback for
    operators a GPU provider does not run. None or empty: the CPU alone.

    Raises ``ValueError`` for an unknown name, or a provider this onnxruntime build lacks (``cuda`` on the
    CPU wheel: the message says how to install onnxruntime-gpu).
    """
    available = ort.get_available_providers()
    out: list[str] = []
    for name in names or ():
        full = PROVIDERS.get(name.strip().lower(), name.strip())
        if not full.endswith("ExecutionProvider"):
            raise ValueError(f"unknown execution provider {name!r}; use {', '.join(PROVIDERS)} or an ONNX Runtime "
                             f"name (this build has: {', '.join(available)})")
        if full not in available:
            hint = GPU_EXTRA_HINT if full == PROVIDERS["cuda"] else f"this build has: {', '.join(available)}"
            raise ValueError(f"execution provider {name!r} ({full}) is not in this onnxruntime "
                             f"{ort.__version__} build; {hint}")
        if full not in out:
            out.append(full)
    out = [p for p in out if p != PROVIDERS["cpu"]]
    return [*out, PROVIDERS["cpu"]]


def session_options(threads: int | None) -> ort.SessionOptions:
    """CPU session options: ``threads`` intra-op threads (None: ORT's default, one per core)."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    # A multi-LoRA base has overridable initializers (the LoRA inputs): ORT warns about each one.
    options.log_severity_level = 3
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1 (or None for ONNX Runtime's default), got {threads}")
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1  # one decoder graph: little to run side by side
    return options


class Decoder:
    """One ONNX decoder session plus its key/value layout; every method is batch-aware.

    ``adapters`` maps names to loaded ``ort.LoraAdapter`` objects (see :meth:`load_adapter`).
    """

    def __init__(self, model_path: Path, *, threads: int | None = None, providers: Sequence[str] | None = None):
        """Open ``model_path`` on ``providers`` (see :func:`resolve_providers`; None: the CPU).

        Raises ``ValueError`` when a GPU provider was asked for but the session could not start on it
        (ONNX Runtime would otherwise fall back to the CPU with only a log line)."""
        model_path = Path(model_path)
        if not model_path.is_file():
            raise FileNotFoundError(f"no ONNX model at {model_path}; export one with `edgetune export` first")
        self.path = model_path
        wanted = resolve_providers(providers)
        self.session = ort.InferenceSession(str(model_path), session_options(threads), providers=wanted)
        self.providers: list[str] = self.session.get_providers()
        """The providers the session really runs on, in order (the CPU last)."""
        missing = [p for p in wanted if p not in self.providers]
        if missing:
            raise ValueError(f"ONNX Runtime could not start {', '.join(missing)} for {model_path.name} (no GPU "
                             f"visible, or its CUDA/cuDNN libraries are missing: see ONNX Runtime's log above); it would "
                             f"run on {', '.join(self.providers)} only. Leave {', '.join(missing)} out of the "
                             "providers to run there")
        inputs = {i.name: i for i in self.session.get_inputs()}
        self.past_names = [n for n in inputs if n.startswith("past_key_values.")]
        self.present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        self.output_names = ["logits", *self.present_names]
        if "input_ids" not in inputs or not self.past_names:
            raise ValueError(f"{model_path} is not a decoder with a key/value cache (inputs: {sorted(inputs)[:6]}...); "
                             "export with task text-generation-with-past")
        first = inputs[self.past_names[0]].shape  # [batch, kv_heads, past, head_dim]
        self.layers = len(self.past_names) // 2
        self.kv_heads, self.head_dim = int(first[1]), int(first[3])
        self.has_positions = "position_ids" in inputs
        # LoRA factor inputs ([in, rank], [rank, out]) default to rank-0 initializers: ONNX Runtime
        # lists them as overridable initializers, not inputs, and an adapter may set any of them.
        self.lora_inputs = {i.name: list(i.shape) for i in self.session.get_overridable_initializers()
                            if i.name.startswith(LORA_PREFIX)}
        self.adapters: dict[str, ort.LoraAdapter] = {}

    # ---- adapters ----------------------------------------------------------------------------
    def load_adapter(self, name: str, path: Path) -> None:
        """Load a ``.onnx_adapter`` file under ``name``, after checking it only sets this model's LoRA inputs."""
        if not self.lora_inputs:
            raise ValueError(f"{self.path.name} has no LoRA inputs: adapter {name!r} needs the multi-LoRA base model")
        params = ort.AdapterFormat.read_adapter(str(path)).get_parameters()
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
        self.adapters[name] = adapter

    def unload_adapter(self, name: str) -> None:
        self.adapters.pop(name, None)

    # ---- one forward -------------------------------------------------------------------------
    def empty_past(self, batch: int) -> list[ort.OrtValue]:
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
        feeds = {
            "input_ids": _ortvalue(input_ids, np.int64),
            "attention_mask": _ortvalue(attention_mask, np.int64),
            **dict(zip(self.past_names, past)),
        }
        if self.has_positions:
            feeds["position_ids"] = _ortvalue(position_ids, np.int64)
        options = None
        if adapter is not None:
            if adapter not in self.adapters:
                raise KeyError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.adapters) or 'none'})")
            options = ort.RunOptions()
            options.add_active_adapter(self.adapters[adapter])
        outputs = self.session.run_with_ort_values(self.output_names, feeds, options)
        return outputs[0].numpy(), list(outputs[1:])

    def logits(self, input_ids: np.ndarray, attention_mask: np.ndarray | None = None, *,
               adapter: str | None = None, prefix: Prefix | None = None) -> np.ndarray:
        """Full-sequence logits of a (left-padded) batch, with no cache: [batch, seq, vocab]."""
        input_ids = np.asarray(input_ids, dtype=np.int64)
        batch, seq = input_ids.shape
        mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask, dtype=np.int64)
        n = prefix.length if prefix else 0
        past = self.prefix_past(prefix, batch) if prefix else self.empty_past(batch)
        positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0) + n
        full_mask = np.concatenate([np.ones((batch, n), np.int64), mask], axis=1)
        logits, _ = self.forward(input_ids, full_mask, positions, past, adapter)
        return logits

    # ---- generation --------------------------------------------------------------------------
    def stream(self, prompt_ids: Sequence[int], max_new_tokens: int, *, adapter: str | None = None,
               prefix: Prefix | None = None, sampling: Sampling | None = None) -> Iterator[int]:
        """Yield up to ``max_new_tokens`` new token ids, one forward each (batch 1).

        It never stops early: stop tokens, stop strings and the context budget are the caller's
        :class:`edge.generation.TextStream` and :func:`edge.generation.token_budget` (see ``EdgeRunner.start``).
        """
        if not prompt_ids:
            raise ValueError("the prompt is empty: give at least one token")
        sampling = sampling or Sampling()
        n = prefix.length if prefix else 0
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
        """Greedy generation for several prompts at once (left-padded); returns each row's new tokens."""
        batch, width = len(prompts), max(len(p) for p in prompts)
        n = prefix.length if prefix else 0
        ids = np.full((batch, width), pad_id, np.int64)
        mask = np.zeros((batch, n + width), np.int64)
        mask[:, :n] = 1
        for row, p in enumerate(prompts):
            ids[row, width - len(p):] = p
            mask[row, n + width - len(p):] = 1
        positions = np.maximum(np.cumsum(mask[:, n:], axis=1) - 1, 0) + n
        past = self.prefix_past(prefix, batch) if prefix else self.empty_past(batch)
        out: list[list[int]] = [[] for _ in prompts]
        done = np.zeros(batch, bool)
        stops = np.asarray(sorted(set(stop_ids)) or [-1])
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


def _ortvalue(array: np.ndarray, dtype) -> ort.OrtValue:
    return ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(array, dtype=dtype))

