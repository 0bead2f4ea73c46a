"""Building a task's ONNX files, shared by the export stage and the edge bundle: the fp32 export of
the merged model (the published one when it is current), its quantization, and what an ONNX
export's fingerprint covers.
"""

from __future__ import annotations

import logging
import shutil
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.artifacts import fingerprint, is_fresh
from pipeline.config import ONNX_PRECISIONS, Config, TaskConfig
from pipeline.paths import export_dir, merged_dir

log = logging.getLogger(__name__)


def export_settings(cfg: Config, target: str) -> str:
    """What an export target's output depends on besides its input folder."""
    if target == "safetensors":
        return cfg.export.safetensors_dtype
    from exporters.onnx_quant import RECIPE

    gates = cfg.section_hash("export")  # gates, block size, fidelity rows: any change re-checks
    if target == "gguf":
        from exporters.gguf import FORMAT

        return f"gguf:{gates}:{FORMAT}" + (f":{int4_recipe(cfg)}" if "q4_1" in cfg.export.gguf_types else "")
    from edge.slots import FUSED_FORMAT

    if ONNX_PRECISIONS[target] == "fp32":
        return f"{target}:{gates}:{FUSED_FORMAT}"
    return (f"{target}:{gates}:{RECIPE}:{FUSED_FORMAT}"
            + (f":{int4_recipe(cfg)}" if ONNX_PRECISIONS[target] == "int4" else ""))


def fp32_onnx(cfg: Config, task: TaskConfig, scratch: Path) -> Path:
    """The fp32 ONNX folder of ``task``'s merged model: the published ``onnx`` export when it is current,
    else a fresh export into ``scratch`` (which the caller deletes)."""
    from exporters.onnx import export_onnx_fp32

    published = export_dir(cfg, task, "onnx")
    fp, _ = fingerprint("export", {"merged": merged_dir(cfg, task)}, export_settings(cfg, "onnx"))
    if is_fresh(published, fp):
        return published
    log.info("export %s: exporting the merged model to fp32 ONNX first", task.name)
    return export_onnx_fp32(merged_dir(cfg, task), scratch)


def quantize_onnx(cfg: Config, precision: str, src: Path, dst: Path, *,
                  calibrate: tuple[Any, Any, Sequence[TaskConfig]] | None = None) -> Path:
    """``src`` (an fp32 ONNX file) at ``precision`` into ``dst`` (a file path).

    For int4 with ``export.int4_method: gptq``, ``calibrate`` = (the PyTorch model ``src`` was exported
    from, its tokenizer, the tasks whose training rows calibrate it) is required; other precisions ignore it."""
    from exporters.onnx_quant import quantize_int4, quantize_int8

    if precision == "fp32":
        shutil.copy2(src, dst)
    elif precision == "int8":
        quantize_int8(src, dst, accuracy_level=cfg.export.accuracy_level)
    else:
        calibrated = None
        if cfg.export.int4_method == "gptq":
            if calibrate is None:
                raise ValueError("int4 with export.int4_method=gptq needs the PyTorch model and calibration tasks")
            calibrated = gptq_int4(cfg, *calibrate)
        quantize_int4(src, dst, block_size=cfg.export.int4_block_size, accuracy_level=cfg.export.accuracy_level,
                      calibrated=calibrated)
    return dst


def int4_recipe(cfg: Config) -> str:
    """The int4 rounding recipe (manifest and fingerprint): method, block size, calibration settings."""
    from pipeline.calibration import recipe

    return f"{recipe(cfg.export.int4_method, cfg)}:block={cfg.export.int4_block_size}"


_GPTQ: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
"""PyTorch model -> {(tasks, recipe): GPTQ blocks}: the onnx-int4 and gguf q4_1 exports of one task share one
calibration (about a minute on the default base); entries go with the model."""


def gptq_int4(cfg: Config, model, tokenizer, tasks: Sequence[TaskConfig]) -> dict:
    """GPTQ blocks of every linear layer of ``model``, calibrated on ``tasks``' training rows (computed once per
    model, tasks and recipe)."""
    key = (tuple((t.name, t.train) for t in tasks), int4_recipe(cfg))
    done = _GPTQ.setdefault(model, {})
    if key not in done:
        done[key] = _gptq_int4(cfg, model, tokenizer, tasks)
    return done[key]


def _gptq_int4(cfg: Config, model, tokenizer, tasks: Sequence[TaskConfig]) -> dict:
    import time

    from exporters.gptq import gptq_layers
    from pipeline.calibration import layer_hessians

    hessians = layer_hessians(cfg, model, tasks, tokenizer)
    started = time.perf_counter()
    layers = gptq_layers(model, hessians, cfg.export.int4_block_size)
    log.info("int4: GPTQ rounded %d layers in %.0f s", len(layers), time.perf_counter() - started)
    return layers


FUSED_MAX_LENGTH = 32768
"""The longest sequence a fused sidecar's rotary tables cover (they hold max_length x head_dim floats);
a longer one decodes on the exported graph."""


def add_fused(cfg: Config, task: TaskConfig, path: Path, torch_model, tokenizer, precision: str, what: str, *,
              context_length: int, logits: bool = True) -> dict[str, Any]:
    """Write the fused sidecar of the gated decoder at ``path`` (:func:`exporters.fused_graph.write_fused`) and
    hold it to the same ``precision`` fidelity gate against ``torch_model``; the manifest record (the file,
    its context, its gate metrics). A graph that cannot be fused or a sidecar that fails the gate is not
    kept: the record says why, and the exported graph decodes alone (slower, still gated). ``logits``: as for
    :func:`pipeline.fidelity.check` (False for the bundle's bare base)."""
    from edge.runtime import Decoder
    from edge.slots import fused_path
    from exporters.fused_graph import FuseError, write_fused
    from exporters.onnx import OnnxCausalLM
    from pipeline.device import thread_count
    from pipeline.errors import GateFailed
    from pipeline.fidelity import gate

    try:
        sidecar = write_fused(path, max_length=min(context_length, FUSED_MAX_LENGTH))
        decoder = Decoder(path, threads=thread_count(cfg.num_threads))  # the CPU: the only provider it runs on
        if decoder.fused is None:
            raise FuseError("ONNX Runtime could not open it (see the warning above)")
        metrics = gate(cfg, task, precision, torch_model, OnnxCausalLM(decoder), tokenizer, f"{what} fused",
                       logits=logits)
        return {"file": sidecar.name, "max_length": decoder.fused.max_length, **metrics}
    except (FuseError, GateFailed) as exc:
        fused_path(path).unlink(missing_ok=True)
        log.warning("export %s: no fused sidecar, the exported graph decodes alone: %s", what, exc)
        return {"file": None, "reason": str(exc)}
