"""Stage 5, evaluate: quality, size and speed of the base model and every artifact of every task.

For each (task, artifact) it measures held-out exact match (greedy decoding; one teacher-forced pass
over prompt + reference gives the perplexity and every row greedy decoding would answer exactly, and only
the other rows are decoded: :func:`pipeline.scoring.exact_match`), perplexity on the test completions,
size on disk and batch-1 greedy decode tokens/s, and caches the result in
``runs/<run>/eval/<task>/<artifact>.json`` (fingerprinted, so unchanged artifacts are not
re-scored). Then :mod:`pipeline.report` writes ``report.json`` and ``report.md``.

Decode speed is a property of an artifact's form and shapes, not of the values its weights hold: one run's
tasks share each form's measurement when their files match (:func:`speed_key`), so it is measured once per
form, on the first task that needs it, and the others record where it came from (``speed_measured_on``).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from pipeline.artifacts import dir_size, fingerprint, scratch_dir, write_json_atomic
from pipeline.calibration import calibration_inputs
from pipeline.config import ONNX_PRECISIONS, Config, TaskConfig
from pipeline.data import Example, load_examples, render_prompt
from pipeline.device import onnx_providers, resolve_device, set_threads
from pipeline.errors import EdgetuneError
from pipeline.models import load_model, load_tokenizer, resolve_base
from pipeline.onnx_build import int4_recipe
from pipeline.paths import adapter_dir, eval_file, export_dir, merged_dir, quantized_dir
from pipeline.scoring import SHOWN_MISTAKES, answer_pass, decode_speed, exact_match
from pipeline.stage_outputs import (
    export_failures,
    export_skips,
    quantized_base_of,
    require_stage_output,
    training_record,
    tuned_spec,
)

log = logging.getLogger(__name__)

# artifact -> the stage (and config list) that produces it; used to explain what is missing.
_PRODUCER = {"adapter": "tune", "merged": "merge", "int8": "quantize", "nf4": "quantize", "onnx": "export",
             "onnx-int8": "export", "onnx-int4": "export", "gguf": "export", "edge": "export"}


def artifact_path(cfg: Config, task: TaskConfig, artifact: str) -> Path:
    """Where ``artifact`` of ``task`` lives (for ``base``: the base model itself)."""
    if artifact == "base":
        return resolve_base(cfg.base)
    if artifact == "adapter":
        return adapter_dir(cfg, task)
    if artifact == "merged":
        return merged_dir(cfg, task)
    if artifact in ("int8", "nf4"):
        return quantized_dir(cfg, task, artifact)
    if artifact in ("onnx", "onnx-int8", "onnx-int4", "gguf", "edge"):
        return export_dir(cfg, task, artifact)
    raise EdgetuneError(f"unknown artifact {artifact!r}")


def skip_reason(cfg: Config, task: TaskConfig, artifact: str) -> str | None:
    """Why the configured stages produce no ``artifact`` for ``task`` (None: they do): the config leaves it
    out, the tune result's spec cannot be merged, or the export stage's record says why it skipped it."""
    if artifact == "base":
        return None
    if artifact in ("int8", "nf4") and artifact not in cfg.quantize.formats:
        return "not in quantize.formats"
    if artifact in ONNX_PRECISIONS or artifact in ("gguf", "edge"):
        if artifact not in cfg.export.targets:
            return "not in export.targets"
        return export_skips(cfg, task).get(artifact)
    if artifact == "merged" and not tuned_spec(cfg, task).mergeable:
        return "the method's adapter cannot be merged; it is the artifact"
    return None


def load_artifact(cfg: Config, task: TaskConfig, artifact: str):
    """(model, tokenizer) for ``artifact``; every model has ``__call__`` → logits and ``generate``.

    PyTorch and bitsandbytes artifacts load on the config's device (``device: auto`` takes the GPU when
    there is one); ONNX ones run on ONNX Runtime with the config's ``providers``."""
    path = artifact_path(cfg, task, artifact)
    device = resolve_device(cfg.device)
    if artifact != "base":
        require_stage_output(path, _PRODUCER[artifact], task)
    if artifact in ("base", "merged"):
        return load_model(path, device), load_tokenizer(path)
    if artifact == "adapter":
        from pipeline.tuned import load_tuned

        return load_tuned(path, resolve_base(cfg.base), device), load_tokenizer(path)
    if artifact in ("int8", "nf4"):
        from exporters.bnb import load_quantized
        base_q = quantized_base_of(path)
        if base_q is None:
            return load_quantized(path, device), load_tokenizer(path)
        from peft import PeftModel

        return PeftModel.from_pretrained(load_quantized(base_q, device), path).eval(), load_tokenizer(path)
    if artifact == "edge":
        return _edge_model(cfg, task, path), load_tokenizer(resolve_base(cfg.base))
    if artifact == "gguf":  # the file its Modelfile runs, its weights read back into PyTorch (CPU)
        from exporters.gguf import load_gguf_model
        from pipeline.gguf_build import model_file

        return load_gguf_model(model_file(path)), load_tokenizer(merged_dir(cfg, task))
    from exporters.onnx import load_onnx_model

    return load_onnx_model(path, set_threads(cfg.num_threads), providers=onnx_providers(cfg.providers)), \
        load_tokenizer(path)


def load_bundle_manifest(path: Path) -> dict[str, Any]:
    """The edge bundle's manifest (unverified: the runner verifies the files it loads)."""
    from edge.bundle import load_bundle

    return load_bundle(path, verify=False).manifest


def _edge_model(cfg: Config, task: TaskConfig, bundle_path: Path):
    """The task's adapter in the edge bundle, run by the torch-free runtime (behind OnnxCausalLM)."""
    from edge.bundle import EdgeRunner, load_bundle
    from exporters.onnx import OnnxCausalLM

    bundle = load_bundle(bundle_path)
    if task.name not in bundle.adapters:
        raise EdgetuneError(f"the edge bundle {bundle_path} has no adapter {task.name!r}; run `edgetune export "
                            f"--task {task.name}` (export.targets includes edge)")
    decoder, lora, prefix = EdgeRunner(bundle, threads=set_threads(cfg.num_threads),
                                       providers=onnx_providers(cfg.providers)).resolve(task.name)
    return OnnxCausalLM(decoder, adapter=lora, prefix=prefix)


def _runs_on(cfg: Config, artifact: str) -> str:
    """Where ``artifact`` was scored: the torch device, or ONNX Runtime's first provider."""
    if artifact in ONNX_PRECISIONS or artifact == "edge" or "@" in artifact:
        return f"onnxruntime:{cfg.providers[0]}"
    if artifact == "gguf":  # read back on the CPU (see load_artifact)
        return "cpu"
    return resolve_device(cfg.device)


def artifact_size(cfg: Config, task: TaskConfig, artifact: str) -> int:
    """Bytes on disk needed to run ``artifact`` (an unmerged quantized artifact counts its base too)."""
    path = artifact_path(cfg, task, artifact)
    if artifact == "gguf":  # the one file llama.cpp or Ollama loads for the task
        from pipeline.gguf_build import model_file

        return model_file(path).stat().st_size
    if artifact == "edge":
        return sum(dir_size(f) for f in _edge_files(path, task))
    base_q = quantized_base_of(path) if artifact in ("int8", "nf4") else None
    return dir_size(path) + (dir_size(base_q) if base_q else 0)


_WEIGHT_FILES = (".safetensors", ".onnx", ".onnx_adapter", ".gguf", ".data")
"""Files that hold a model's tensors or graph: their sizes follow its shapes, not its values."""


def _shape_listing(path: Path) -> list[tuple[str, int]]:
    """(name, bytes) of every weight or graph file at ``path`` (a file or a folder, recursively)."""
    if path.is_file():
        return [(path.name, path.stat().st_size)]
    return sorted((str(p.relative_to(path)), p.stat().st_size) for p in path.rglob("*")
                  if p.is_file() and p.name.endswith(_WEIGHT_FILES))


def speed_key(cfg: Config, task: TaskConfig, artifact: str) -> str:
    """What ``artifact``'s decode speed depends on: its form, the tuned adapter's kind and every file it runs
    (name and size, which follow the shapes: a LoRA of another rank, a sparse delta of another size, an ONNX
    export without its fused sidecar all differ). Two tasks' artifacts with equal keys run the same computation
    on weights of the same shapes, so they decode at the same speed: it is measured once (the task name and the
    values of the weights are not part of the key)."""
    import hashlib

    if artifact == "base":
        parts: list = []
    elif "@" in artifact:  # an int4 variant, built from the merged model
        parts = _shape_listing(merged_dir(cfg, task))
    elif artifact == "edge":  # the files the task runs (a merged fallback: its own file, no shared base);
        # by suffix, since the task's file is named by the task
        parts = [(f.suffix, f.stat().st_size) for f in _edge_files(artifact_path(cfg, task, artifact), task)]
    elif artifact == "gguf":
        from pipeline.gguf_build import model_file

        parts = _shape_listing(model_file(artifact_path(cfg, task, artifact)))
    else:
        path = artifact_path(cfg, task, artifact)
        base_q = quantized_base_of(path) if artifact in ("int8", "nf4") else None
        parts = [_shape_listing(path), _shape_listing(base_q) if base_q else []]
    kind = tuned_spec(cfg, task).kind if artifact != "base" else None
    blob = json.dumps([artifact, kind, parts], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _edge_files(bundle_path: Path, task: TaskConfig) -> list[Path]:
    """What a device needs to run ``task`` from the edge bundle: the task's file, the shared base unless the
    task ships merged, and their fused sidecars."""
    from edge.bundle import load_bundle
    from edge.slots import fused_path

    bundle = load_bundle(bundle_path, verify=False)
    entry = bundle.adapters[task.name]
    files = [bundle_path / entry.file] + ([] if entry.kind == "merged" else [bundle.model_path])
    return files + [fused_path(f) for f in files if f.suffix == ".onnx" and fused_path(f).is_file()]


def evaluate_artifact(cfg: Config, task: TaskConfig, artifact: str, examples: list[Example],
                      speeds: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """Measure one artifact on one task (see module docstring); returns the metrics.

    ``speeds``: speed key -> a measurement this run already made (decode speed, where it ran, the task it was
    measured on); a match is reused instead of measured again, and a new measurement is added.
    ``onnx-int4@<variant>`` (``evaluate.int4_variants``) is built from the merged model in a scratch folder,
    measured, and deleted."""
    started = time.perf_counter()
    if "@" in artifact:
        with int4_variant(cfg, task, artifact.partition("@")[2]) as (model, tokenizer, size):
            key = speed_key(cfg, task, artifact)
            result = _measure(cfg, task, artifact, model, tokenizer, examples, (speeds or {}).get(key))
        result.update(size_bytes=size, path=None)
    else:
        model, tokenizer = load_artifact(cfg, task, artifact)  # first: it says clearly what is missing
        key = speed_key(cfg, task, artifact)
        result = _measure(cfg, task, artifact, model, tokenizer, examples, (speeds or {}).get(key))
        result.update(size_bytes=artifact_size(cfg, task, artifact), path=str(artifact_path(cfg, task, artifact)))
    result["speed_key"] = key
    if speeds is not None:
        speeds.setdefault(key, speed_record(result))
    result["eval_seconds"] = round(time.perf_counter() - started, 1)
    if artifact == "edge":  # export.edge_fallback: say what shipped instead of the adapter on the shared base
        entry = load_bundle_manifest(artifact_path(cfg, task, artifact))["adapters"][task.name]
        if entry.get("fallback"):
            result["note"] = (f"the adapter on the {entry['fallback']['from']} base failed its gate; this is the "
                              f"merged model at {entry['precision']} (export.edge_fallback)")
    if artifact == "gguf":
        from pipeline.gguf_build import model_file

        speed = "llama.cpp's" if result["device"] == "llama.cpp" else \
            "PyTorch's (install the bench extra, llama-cpp-python, for llama.cpp's)"
        result["note"] = (f"{model_file(artifact_path(cfg, task, artifact)).name}: quality scored on its weights read back "
                          f"into PyTorch, decode speed {speed}")
    log.info("evaluate %s/%s: exact match %s, perplexity %.3f, %.1f MB, %.1f tok/s", task.name, artifact,
             "n/a" if result["exact_match"] is None else f"{result['exact_match']:.3f}", result["perplexity"],
             result["size_bytes"] / 1e6, result["decode_tokens_per_s"])
    return result


def speed_record(metrics: dict[str, Any]) -> dict[str, Any]:
    """The decode-speed part of an artifact's metrics, as another task's artifact with the same key reuses it."""
    return {k: metrics[k] for k in ("decode_tokens_per_s", "device", "speed_measured_on")}


def _measure(cfg: Config, task: TaskConfig, artifact: str, model, tokenizer, examples: list[Example],
             known: dict[str, Any] | None = None) -> dict:
    """Exact match, perplexity and batch-1 decode speed of a loaded model (``known``: a speed record of the same
    form and shapes already measured this run, reused as it is)."""
    ev = cfg.evaluate
    scored = [e for e in examples if e.reference is not None]
    em, outputs = None, []  # text-only test sets have no reference answer: perplexity only
    # one teacher-forced pass gives perplexity and every row greedy decoding would answer exactly; the others
    # are decoded (scoring.exact_match)
    checked = answer_pass(model, tokenizer, scored or examples, cfg.tune.max_seq_len, ev.batch_size,
                          task.max_new_tokens if scored else None)
    if scored:
        em, outputs = exact_match(model, tokenizer, scored, task.max_new_tokens, ev.batch_size,
                                  desc=f"{task.name}/{artifact}", checked=checked)
    ppl = checked.perplexity
    prompt = render_prompt(tokenizer, scored[0]) if scored else examples[0].text or ""
    speed, on, measured_on = None, _runs_on(cfg, artifact), task.name
    if known is not None:
        speed, on, measured_on = known["decode_tokens_per_s"], known["device"], known["speed_measured_on"]
    elif artifact == "gguf":  # llama.cpp's own speed on the file, when the bench extra installed it
        from exporters.gguf import llama_cpp_decode_speed
        from pipeline.gguf_build import model_file

        speed = llama_cpp_decode_speed(model_file(artifact_path(cfg, task, artifact)),
                                       tokenizer(prompt, add_special_tokens=False)["input_ids"],
                                       ev.speed_new_tokens, ev.speed_repeats, set_threads(cfg.num_threads))
        on = on if speed is None else "llama.cpp"
    if speed is None:
        speed = decode_speed(model, tokenizer, prompt, ev.speed_new_tokens, ev.speed_repeats)
    return {
        "exact_match": None if em is None else round(em, 4),
        "perplexity": round(ppl, 4),
        "decode_tokens_per_s": round(speed, 2),
        "rows": len(scored),
        "device": on,
        "speed_measured_on": measured_on,
        "mistakes": [o for o in outputs if o["got"] != (o["expected"] or "").strip()][:SHOWN_MISTAKES],
    }


def variant_config(cfg: Config, variant: str) -> Config:
    """``cfg`` with the int4 rounding of ``variant`` (``<gptq|rtn>-b<block>``)."""
    method, _, block = variant.partition("-b")
    return cfg.model_copy(update={"export": cfg.export.model_copy(
        update={"int4_method": method, "int4_block_size": int(block)})})


@contextmanager
def int4_variant(cfg: Config, task: TaskConfig, variant: str) -> Iterator[tuple[Any, Any, int]]:
    """(ONNX model, tokenizer, bytes on disk) of ``task``'s merged model rounded to int4 as ``variant`` says,
    in a scratch folder under the task's eval folder that is deleted afterwards."""
    import shutil

    from exporters.fused_graph import FuseError, write_fused
    from exporters.onnx import TOKENIZER_FILES, load_onnx_model
    from pipeline.onnx_build import FUSED_MAX_LENGTH, fp32_onnx, quantize_onnx

    merged = merged_dir(cfg, task)
    require_stage_output(merged, "merge", task)
    vcfg = variant_config(cfg, variant)
    with scratch_dir(eval_file(cfg, task, "x").parent, f"variant-{variant}") as tmp:
        out = Path(tmp) / "model"
        out.mkdir()
        fp32 = fp32_onnx(cfg, task, Path(tmp) / "fp32")
        calibrate = None
        if vcfg.export.int4_method == "gptq":
            calibrate = (load_model(merged, "cpu"), load_tokenizer(merged), [task])
        log.info("evaluate %s: building the int4 variant %s", task.name, variant)
        quantize_onnx(vcfg, "int4", fp32 / "model.onnx", out / "model.onnx", calibrate=calibrate)
        del calibrate
        for name in (*TOKENIZER_FILES, "config.json"):
            if (fp32 / name).is_file():
                shutil.copy2(fp32 / name, out / name)
        try:  # with its fused sidecar, as the export ships int4: speeds compare like with like
            context = json.loads((out / "config.json").read_text()).get("max_position_embeddings", 2048)
            write_fused(out / "model.onnx", max_length=min(int(context), FUSED_MAX_LENGTH))
        except FuseError as exc:
            log.warning("evaluate %s: the int4 variant %s runs without a fused sidecar: %s", task.name, variant, exc)
        model = load_onnx_model(out, set_threads(cfg.num_threads), providers=onnx_providers(cfg.providers))
        yield model, load_tokenizer(out), dir_size(out)


def evaluate_cached(cfg: Config, task: TaskConfig, artifact: str, examples: list[Example],
                    force: bool, speeds: dict[str, dict[str, Any]] | None = None) -> dict[str, Any]:
    """:func:`evaluate_artifact`, reusing the stored result while artifact, test file and settings are unchanged
    (``speeds``: as there; a stored result adds its own measurement)."""
    if "@" in artifact:  # an int4 variant: made from the merged model (and, calibrated, the training rows)
        variant = artifact.partition("@")[2]
        inputs = {"merged": merged_dir(cfg, task), "test": Path(task.test),
                  **(calibration_inputs(cfg, [task]) if variant.startswith("gptq") else {})}
        from edge.slots import FUSED_FORMAT

        settings = variant + int4_recipe(variant_config(cfg, variant)) + FUSED_FORMAT
    else:
        inputs, settings = {"artifact": artifact_path(cfg, task, artifact), "test": Path(task.test)}, ""
    # where it runs is part of what is measured (speed, and bitsandbytes kernels differ by device)
    fp, _ = fingerprint("evaluate", inputs, cfg.section_hash("evaluate", "num_threads", "providers") + json.dumps(
        [resolve_device(cfg.device), task.name, task.max_new_tokens, cfg.tune.max_seq_len, settings]))
    file = eval_file(cfg, task, artifact)
    if not force and file.is_file():
        cached = json.loads(file.read_text())
        if cached.get("fingerprint") == fp:
            log.info("evaluate %s/%s: up to date, reusing %s", task.name, artifact, file)
            metrics = cached["metrics"]
            if speeds is not None and metrics.get("speed_key") and metrics.get("speed_measured_on"):
                speeds.setdefault(metrics["speed_key"], speed_record(metrics))
            return metrics
    metrics = evaluate_artifact(cfg, task, artifact, examples, speeds)
    file.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(file, {"fingerprint": fp, "metrics": metrics})
    return metrics


def run(cfg: Config, tasks: list[TaskConfig], *, force: bool = False) -> Path:
    """Evaluate every configured artifact of ``tasks``; write the report; return report.json's path."""
    from pipeline.report import write_report

    set_threads(cfg.num_threads)
    results: dict[str, dict[str, Any]] = {}
    speeds: dict[str, dict[str, Any]] = {}  # decode speed, measured once per form and shapes (speed_key)
    for task in tasks:
        examples = load_examples(task.test)
        if cfg.evaluate.max_rows:
            examples = examples[: cfg.evaluate.max_rows]
        artifacts, skipped, failed = {}, {}, {}
        failures = export_failures(cfg, task)
        for artifact in cfg.evaluate.artifacts:
            reason = skip_reason(cfg, task, artifact)
            if reason:
                log.info("evaluate %s/%s: skipped (%s)", task.name, artifact, reason)
                skipped[artifact] = reason
                continue
            if artifact in failures:  # not published: the report shows what its gate measured instead
                log.info("evaluate %s/%s: not published, it failed its fidelity gate", task.name, artifact)
                failed[artifact] = failures[artifact]
                continue
            artifacts[artifact] = evaluate_cached(cfg, task, artifact, examples, force, speeds)
            if artifact == "onnx-int4":  # beside it, the other roundings it could have had
                for variant in cfg.evaluate.int4_variants:
                    name = f"onnx-int4@{variant}"
                    artifacts[name] = evaluate_cached(cfg, task, name, examples, force, speeds)
        results[task.name] = {"test_file": task.test, "test_rows": len(examples), "artifacts": artifacts,
                              "skipped": skipped, "failed": failed, "training": training_record(cfg, task)}
    return write_report(cfg, results)
