"""Export a merged causal LM to ONNX (fp32, with KV cache) and run it with ONNX Runtime on CPU.

The export goes through optimum-onnx (``main_export`` with task ``text-generation-with-past``),
so the result is a single decoder graph that takes ``input_ids``, ``attention_mask``,
``position_ids`` and ``past_key_values.*`` and returns ``logits`` plus ``present.*`` (the layout
``optimum.onnxruntime.ORTModelForCausalLM`` also loads). Running it is the job of the torch-free
:mod:`edge.runtime`; :class:`OnnxCausalLM` puts a torch face on that for evaluation and the gates.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

log = logging.getLogger(__name__)

__all__ = ["TOKENIZER_FILES", "OnnxCausalLM", "export_onnx_fp32", "load_onnx_model", "logit_parity"]

#: Files copied verbatim from the source model directory into the ONNX directory, so the ONNX
#: folder is self-contained (tokenizer + chat template + generation defaults). optimum re-saves a
#: tokenizer itself, but a re-save can normalise/alter files; the originals are the source of truth.
TOKENIZER_FILES: tuple[str, ...] = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
    # Only present for some tokenizers; copied when they exist so nothing is lost.
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
)

_WEIGHT_PATTERNS = ("model.safetensors", "model-*.safetensors", "pytorch_model.bin", "pytorch_model-*.bin")


def _check_model_dir(model_dir: Path) -> None:
    """Fail early, naming the path and the fix, instead of deep inside optimum/transformers."""
    if not model_dir.exists():
        raise FileNotFoundError(
            f"ONNX export: model directory {model_dir} does not exist. "
            "Pass the merged Hugging Face model directory (run the merge stage first)."
        )
    if not model_dir.is_dir():
        raise NotADirectoryError(
            f"ONNX export: {model_dir} is not a directory. Pass the merged model *directory* "
            "(containing config.json and model.safetensors), not a file."
        )
    if not (model_dir / "config.json").is_file():
        raise FileNotFoundError(
            f"ONNX export: {model_dir / 'config.json'} not found; {model_dir} is not a saved Hugging Face "
            "model. Save the merged model with model.save_pretrained(dir) and tokenizer.save_pretrained(dir)."
        )
    if not any(any(model_dir.glob(p)) for p in _WEIGHT_PATTERNS):
        raise FileNotFoundError(
            f"ONNX export: no weights (model.safetensors) in {model_dir}. A LoRA adapter directory cannot be "
            "exported directly: merge the adapter into the base model and save_pretrained() the result."
        )


@contextlib.contextmanager
def _quiet_export() -> Iterator[None]:
    """Silence the tracer/exporter chatter that is expected and harmless for this export.

    - ``TracerWarning``s: transformers' cache/mask code branches on tensor shapes; the traced
      graph keeps dynamic axes for batch/sequence/past, and parity tests cover correctness.
    - optimum's "Found different candidate ONNX initializers ... tied weights" warning: it is
      emitted on the way to *successfully* de-duplicating the tied embedding / lm_head.
    """
    import transformers

    optimum_logger = logging.getLogger("optimum")
    old_optimum_level = optimum_logger.level
    old_tf_verbosity = transformers.logging.get_verbosity()
    optimum_logger.setLevel(logging.ERROR)
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
            warnings.filterwarnings("ignore", category=UserWarning, module=r"torch\.onnx.*")
            warnings.filterwarnings("ignore", message=r".*torch_dtype.*deprecated.*")
            yield
    finally:
        optimum_logger.setLevel(old_optimum_level)
        transformers.logging.set_verbosity(old_tf_verbosity)


def export_onnx_fp32(model_dir: Path, out_dir: Path) -> Path:
    """Export a merged HF causal-LM directory to an fp32 ONNX decoder with KV cache.

    Contract:
      - ``model_dir`` must be a saved Hugging Face causal LM (``config.json`` + safetensors
        weights, tokenizer files). Raises ``FileNotFoundError`` / ``NotADirectoryError`` naming
        the path otherwise. Nothing is downloaded (``local_files_only``).
      - ``out_dir`` is created if missing and written in place (atomicity - temp dir and
        rename - is the caller's job). Existing files with the same names are overwritten.
      - On return ``out_dir`` holds ``model.onnx`` (task ``text-generation-with-past``, CPU,
        fp32; external-data files only when the model exceeds protobuf's 2 GB limit),
        ``config.json``, and the tokenizer/chat-template/generation-config files of
        ``model_dir``, and is loadable by ``ORTModelForCausalLM.from_pretrained(out_dir)``.
      - No numerical validation is done here (``do_validation=False`` saves a second full
        model load); use :func:`logit_parity` for that.
      - The graph is traced once per configuration in a process: a later model with the same
        ``config.json`` (and tokenizer files) gets the first one's graph with its own weights
        (:mod:`exporters.onnx_template`; the same file optimum writes), in a few seconds instead of
        the trace's ~25.

    Returns ``out_dir``.
    """
    from exporters import onnx_template

    model_dir = Path(model_dir)
    out_dir = Path(out_dir)
    _check_model_dir(model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    # a configuration (and tokenizer) this process exported before: its graph, with this model's weights
    key = _template_key(model_dir)
    template = _TEMPLATES.get(key)
    if template is not None:
        weights = onnx_template.load_weights(model_dir)
        if weights is not None and onnx_template.write(template, weights, out_dir / "model.onnx"):
            for name, data in template.files.items():
                (out_dir / name).write_bytes(data)
            _copy_tokenizer_files(model_dir, out_dir)
            log.info("ONNX export of %s: the graph traced for the same configuration earlier, with its weights",
                     model_dir)
            return out_dir

    from optimum.exporters.onnx import main_export

    fresh = not any(out_dir.iterdir())  # only then is every file beside the graph optimum's
    with _quiet_export():
        main_export(
            str(model_dir),
            output=out_dir,
            task="text-generation-with-past",
            device="cpu",
            # fp32 explicitly: a bf16/fp16 checkpoint must not silently become a half-precision graph.
            dtype="fp32",
            # Skip re-running the model under ORT against PyTorch (another full load + forward).
            do_validation=False,
            # Known library and local dir: stops optimum from guessing via the Hub.
            library_name="transformers",
            local_files_only=True,
        )

    _copy_tokenizer_files(model_dir, out_dir)
    if not (out_dir / "model.onnx").is_file():  # defensive: optimum changed its file naming
        raise RuntimeError(f"ONNX export finished but {out_dir / 'model.onnx'} was not written.")
    if key not in _TEMPLATES and fresh:
        weights = onnx_template.load_weights(model_dir)
        written = [p for p in out_dir.iterdir() if p.is_file() and p.name != "model.onnx"]
        # what the copies above did not replace is optimum's (its config.json); a tokenizer file of its own
        # (one the source lacks) would be this model's tokenizer's, so such an export is not reused
        files = {p.name: p.read_bytes() for p in written if p.name not in TOKENIZER_FILES}
        reusable = weights and not any(p.name in TOKENIZER_FILES and not (model_dir / p.name).is_file()
                                       for p in written)
        _TEMPLATES[key] = onnx_template.record(out_dir / "model.onnx", weights, files) if reusable else None
    return out_dir


_TEMPLATES: dict[str, object] = {}
"""Template key -> the graph optimum exported for it (:mod:`exporters.onnx_template`), or None when it cannot
be reused: the first export of a configuration in a process is traced, the next ones are written from it."""


def _template_key(model_dir: Path) -> str:
    """What an exported graph and the files optimum writes beside it depend on besides the weights: the
    configuration, and which tokenizer files the source has (they are copied over optimum's re-saves)."""
    import hashlib

    present = [name for name in TOKENIZER_FILES if (model_dir / name).is_file()]
    return hashlib.sha256((model_dir / "config.json").read_bytes() + repr(present).encode()).hexdigest()


def _copy_tokenizer_files(model_dir: Path, out_dir: Path) -> None:
    for name in TOKENIZER_FILES:
        src = model_dir / name
        if src.is_file():
            shutil.copy2(src, out_dir / name)


class OnnxCausalLM:
    """A torch-facing view of an ONNX decoder (:class:`edge.runtime.Decoder`), for evaluation and gates.

    ``model(input_ids=, attention_mask=, logits_to_keep=)`` returns an object with ``.logits`` (a torch tensor;
    the last ``logits_to_keep`` positions only when it is given, as transformers does) and
    ``model.generate(...)`` takes the Hugging Face keywords the pipeline uses (greedy only) and
    returns prompt + new tokens like ``transformers`` does (a stop token is kept, then padding).
    ``adapter`` / ``prefix`` select a LoRA adapter loaded in the decoder or a key/value prefix.
    """

    def __init__(self, decoder, *, adapter: str | None = None, prefix=None) -> None:
        self.decoder, self.adapter, self.prefix = decoder, adapter, prefix

    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 logits_to_keep: int = 0, opening_ids: torch.Tensor | None = None, **_: object):
        """``opening_ids`` (1 x P): tokens every row starts with, left out of ``input_ids`` (from
        :func:`pipeline.data.collate_for_training` with ``opening``); the logits are the rows' own positions'
        (:meth:`edge.runtime.Decoder.logits`)."""
        from types import SimpleNamespace

        logits = self.decoder.logits(input_ids.numpy(), None if attention_mask is None else attention_mask.numpy(),
                                     adapter=self.adapter, prefix=self.prefix, keep=logits_to_keep or None,
                                     opening=() if opening_ids is None else opening_ids[0].tolist())
        return SimpleNamespace(logits=torch.from_numpy(logits))

    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
                 max_new_tokens: int, min_new_tokens: int = 0, do_sample: bool = False,
                 pad_token_id: int | None = None, eos_token_id: int | list[int] | None = None,
                 **_: object) -> torch.Tensor:
        if do_sample:
            raise ValueError("OnnxCausalLM.generate is greedy only; use edge.runtime.Decoder.stream to sample")
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask
        prompts = [row[m.bool()].tolist() for row, m in zip(input_ids, mask)]
        stops = [] if eos_token_id is None or min_new_tokens else (
            [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id))
        pad = pad_token_id if pad_token_id is not None else (stops[0] if stops else 0)
        new = self.decoder.generate_batch(prompts, max_new_tokens, pad_id=pad, adapter=self.adapter,
                                          prefix=self.prefix, stop_ids=stops)
        new = [row + [stops[0]] if stops and len(row) < max_new_tokens else row for row in new]
        width = max(len(row) for row in new)
        out = torch.full((len(new), input_ids.shape[1] + width), pad, dtype=torch.long)
        out[:, :input_ids.shape[1]] = input_ids
        for i, row in enumerate(new):
            out[i, input_ids.shape[1]:input_ids.shape[1] + len(row)] = torch.tensor(row, dtype=torch.long)
        return out


def load_onnx_model(onnx_dir: Path, num_threads: int | None = None, *, file_name: str = "model.onnx",
                    providers: Sequence[str] | None = None) -> OnnxCausalLM:
    """Load ``onnx_dir/file_name`` (fp32, int8 or int4) on ONNX Runtime as an :class:`OnnxCausalLM`.

    ``num_threads`` sets ORT's intra-op threads (None: ORT's default, one per physical core);
    ``providers`` its execution providers (``cpu``, ``cuda``; None: the CPU; see
    :func:`edge.session.resolve_providers`, whose ``ValueError`` it raises for one this build lacks).
    Raises ``FileNotFoundError`` naming the path if the model file is missing.
    """
    from edge.runtime import Decoder

    path = Path(onnx_dir) / file_name
    if not path.is_file():
        raise FileNotFoundError(
            f"No {file_name} in {onnx_dir}. Export the merged model first with export_onnx_fp32(model_dir, {onnx_dir})."
        )
    return OnnxCausalLM(Decoder(path, threads=num_threads, providers=providers))


@torch.no_grad()
def logit_parity(
    torch_model: torch.nn.Module,
    onnx_model: OnnxCausalLM,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    score_mask: torch.Tensor | None = None,
    reference: dict | None = None,
    predictions: list | None = None,
    opening: int = 0,
    batch_size: int = 8,
) -> dict[str, float]:
    """Compare the logits of a PyTorch model and an export (an :class:`OnnxCausalLM`, or another PyTorch
    model: a GGUF file read back) over the real tokens of a batch.

    ``score_mask`` (same shape, optional) limits the comparison to some positions, e.g. those that
    predict a reference answer; by default every real position counts.

    Each model computes its output head from each row's first scored position on only (:func:`_tail_logits`),
    ``batch_size`` rows at a time, each row left-padded with its own positions and mask, so the logits do not
    depend on which rows share a batch (up to float rounding). A PEFT prompt-learning model (whose own forward
    adds virtual tokens) runs each row alone and whole, compared position for position with its ONNX
    key/value-prefix form: logits of virtual tokens are dropped.

    ``reference`` (optional, a dict the caller keeps per PyTorch model) caches the PyTorch logits at the
    scored positions of each row, so several exports gated against one model run its forwards once.

    ``predictions`` (optional, a list) receives each row's export logits at its scored positions, in order (a
    gate reads the export's greedy answers to the reference from them: pipeline.fidelity).

    ``opening``: how many leading real tokens every row shares (:func:`pipeline.data.shared_prefix`): they run
    once per batch and each row continues from their key/value cache; the logits are the same, up to float
    rounding.

    Returns, over all scored positions:
      - ``max_abs_logit_diff``: max |torch - onnx|;
      - ``top1_agreement``: share of positions whose argmax token matches (1.0 = all);
      - ``kl``: mean KL(p_torch || p_onnx) in nats (0 = same distributions).
    """
    mask = attention_mask.to(torch.bool)
    scored = mask if score_mask is None else score_mask.to(torch.bool) & mask
    if not scored.any():
        raise ValueError("no real (non-padded) positions to compare")
    # each row's real tokens, its scored positions among the last ``width`` (from its first scored one on)
    rows, keeps, widths, keys = [], [], [], []
    for row, row_mask, row_scored in zip(input_ids.to(torch.long), mask, scored):
        ids, keep = row[row_mask], row_scored[row_mask]
        if not keep.any():
            continue
        width = len(ids) - int(keep.nonzero()[0, 0])
        rows.append(ids)
        keeps.append(keep[-width:])
        widths.append(width)
        keys.append((tuple(ids.tolist()), tuple(keep.tolist())))
    was_training = torch_model.training
    torch_model.eval()
    try:
        reference = {} if reference is None else reference
        todo = [i for i, key in enumerate(keys) if key not in reference]
        computed = _tail_logits(torch_model, [rows[i] for i in todo], [widths[i] for i in todo], opening, batch_size)
        for i, logits in zip(todo, computed):
            reference[keys[i]] = logits[keeps[i]]
        exported = _tail_logits(onnx_model, rows, widths, opening, batch_size)
    finally:
        torch_model.train(was_training)
    diffs, agree, kls, count = [], 0, 0.0, 0
    for key, keep, got in zip(keys, keeps, exported):
        ref = reference[key]
        got = got[keep]
        if got.shape != ref.shape:
            raise RuntimeError(f"logit shape mismatch: torch {tuple(ref.shape)} vs onnx {tuple(got.shape)}")
        if predictions is not None:
            predictions.append(got)
        diffs.append(float((ref - got).abs().max()))
        agree += int((ref.argmax(-1) == got.argmax(-1)).sum())
        log_p, log_q = ref.log_softmax(-1), got.log_softmax(-1)
        kls += float((log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0).sum())
        count += int(keep.sum())
    return {"max_abs_logit_diff": max(diffs), "top1_agreement": agree / count, "kl": kls / count}


def _tail_logits(model, rows: list[torch.Tensor], widths: list[int], opening: int,
                 batch_size: int) -> list[torch.Tensor]:
    """Logits [width, vocab] (float32, on the CPU) of ``model`` at the last ``width`` positions of each row
    (1-D ids, no padding), the output head run there only, ``batch_size`` rows per forward (left-padded, each
    row with its own positions and mask).

    ``opening`` > 0 (the first tokens every row shares, none of them among those positions): an
    :class:`OnnxCausalLM` gets them apart (its decoder keeps their cache: :meth:`edge.runtime.Decoder.logits`);
    a PyTorch model runs them once per batch and the rows continue from their key/value cache
    (:func:`pipeline.opening.with_opening`). A PEFT prompt-learning model (its forward adds virtual tokens in
    front) runs each row alone and whole, its virtual tokens' logits dropped."""
    from pipeline.data import left_padded
    from pipeline.device import to_model
    from pipeline.opening import prompt_learning, with_opening

    if prompt_learning(model):  # virtual tokens in front: whole rows, one at a time
        out = []
        for ids, width in zip(rows, widths):
            logits = model(input_ids=ids[None], attention_mask=torch.ones_like(ids[None])).logits
            out.append(logits.float()[0, -len(ids):][-width:].cpu())
        return out
    shared = bool(rows) and 0 < opening and all(opening <= len(r) - w for r, w in zip(rows, widths))
    head = rows[0][:opening][None] if shared else None
    out = []
    for start in range(0, len(rows), batch_size):
        part = [r[opening:] if shared else r for r in rows[start:start + batch_size]]
        keep_each = widths[start:start + batch_size]
        keep = max(keep_each)
        batch = left_padded(part)
        if isinstance(model, OnnxCausalLM):
            logits = torch.as_tensor(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                           logits_to_keep=keep, opening_ids=head).logits)
        else:
            batch = to_model(batch, model)
            if head is not None:
                batch = with_opening(model, {**batch, "opening_ids": head.to(batch["input_ids"].device)})
            logits = model(**batch, logits_to_keep=keep).logits
        out.extend(logits[i, keep - w:].float().cpu() for i, w in enumerate(keep_each))
    return out
