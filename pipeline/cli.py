"""The ``edgetune`` command line: the whole pipeline, each stage on its own, and method listing.

Every user error ends with one ``edgetune: error: ...`` line and exit status 2; nothing that
looks complete is left behind (stages write through temporary folders). A run whose stages all
finished but whose exports failed a fidelity gate ends with exit status 3 ("completed with failed
gates"): those artifacts are not published, everything else is, and the report lists them.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
import typing
from collections.abc import Callable, Sequence

from edge import cli as edge_cli  # torch-free, like everything `run-edge` touches
from pipeline import distributed
from pipeline.errors import EXIT_FAILED_GATES, EdgetuneError

log = logging.getLogger("edgetune")

STAGES = ("tune", "merge", "quantize", "export", "evaluate")
_EPILOG = """examples:
  edgetune pipeline --config configs/default.yaml
  edgetune pipeline --config configs/default.yaml --set tune.max_steps=50 --task sentiment
  edgetune tune --config my.yaml --resume        # continue an interrupted training run
  edgetune evaluate --config configs/default.yaml --force
  edgetune methods
  edgetune run-edge runs/default/export/edge --adapter sentiment "Review: great kettle. Label the sentiment."
  edgetune serve --backend onnx --bundle runs/default/export/edge

exit status: 0 done; 2 error (nothing half-written); 3 completed with failed gates (those artifacts are not
published, report.json lists them with their numbers); 130 interrupted.
"""


def _add_common(p: argparse.ArgumentParser, *, resume: bool = False) -> None:
    p.add_argument("--config", default="configs/default.yaml",
                   help="YAML config (default: %(default)s); README.md documents every key")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set tune.max_steps=50 (repeatable)")
    p.add_argument("--task", dest="tasks", action="append", default=[], metavar="NAME",
                   help="only this task from the config (repeatable; default: all)")
    p.add_argument("--force", action="store_true", help="redo stages even if their outputs are up to date")
    if resume:
        p.add_argument("--resume", action="store_true",
                       help="continue training from the last checkpoint of an interrupted run")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edgetune",
        description="Fine-tune a small LLM per task, merge, quantize (int8/NF4), export (safetensors, ONNX) "
                    "and evaluate every artifact. Outputs go to <out_dir>/<run>/ (default runs/default/).",
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("pipeline", help="run tune → merge → quantize → export → evaluate for every task")
    _add_common(p, resume=True)
    p.add_argument("--stages", default=",".join(STAGES),
                   help="comma-separated subset of stages to run, in pipeline order (default: all)")
    helps = {
        "tune": "train each task's adapter (PEFT format), evaluated on validation rows every tune.eval_steps, "
                "stopped early and kept at its best evaluation → runs/<run>/adapters/<task>/",
        "merge": "merge each adapter into the base, checked for fidelity → runs/<run>/merged/<task>/",
        "quantize": "bitsandbytes int8 and NF4 of each merged model → runs/<run>/quantized/<task>-<fmt>/",
        "export": "safetensors, ONNX fp32/int8/int4, GGUF for llama.cpp/Ollama (each gated on fidelity) and the edge bundle → runs/<run>/export/",
        "evaluate": "score base and every artifact; write runs/<run>/report.{json,md}",
    }
    for stage in STAGES:
        _add_common(sub.add_parser(stage, help=helps[stage]), resume=stage == "tune")
    sv = sub.add_parser("serve", help="OpenAI-compatible server: one frozen base, many adapters chosen per request",
                        description="Serve the base and every adapter under --adapters over an OpenAI-compatible "
                                    "API (completions, chat, streaming), with /v1/adapters to load, replace and "
                                    "unload adapters at run time. With --backend onnx it serves an edge bundle (--bundle) on ONNX "
                                    "Runtime instead, with the bundle's adapters, and needs no PyTorch. Each flag can "
                                    "also come from the environment as "
                                    "EDGETUNE_SERVE_<NAME> (e.g. EDGETUNE_SERVE_API_KEY).")
    _add_settings_flags(sv)
    edge_cli.add_arguments(sub.add_parser("run-edge", help=edge_cli.HELP, description=edge_cli.DESCRIPTION,
                                          epilog=edge_cli.EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter))
    m = sub.add_parser("methods", help="list the fine-tuning methods (with --config: trainable parameters on its base)")
    m.add_argument("--config", default=None, help="count each method's trainable parameters on this config's base")
    m.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (repeatable)")
    return parser


def _add_settings_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per :class:`ServeSettings` field: ``--kebab-name``, help from its docstring and its default.

    Values are passed on as given (None: not given) and ServeSettings parses and checks them against the
    field's annotation, so a bad flag reads like a bad environment variable: one ``edgetune: error:``
    naming the field. A bool field is a switch away from its default (``--no-preload``).
    """
    from serve.settings import ServeSettings  # pydantic only: no torch, no yaml

    for name, field in ServeSettings.model_fields.items():
        flag, doc = name.replace("_", "-"), _help_text(field.description or "")
        if field.annotation is bool:
            on = bool(field.default)
            parser.add_argument(f"--no-{flag}" if on else f"--{flag}", dest=name, action="store_const",
                                const=not on, default=None,
                                help=f"{doc} This flag turns it {'off' if on else 'on'} (default: {'on' if on else 'off'})")
        else:
            parser.add_argument(f"--{flag}", dest=name, default=None, metavar=_metavar(name, field.annotation),
                                help=f"{doc} (default: {_shown(field.default)})")


def _help_text(doc: str) -> str:
    """A field docstring as one line of argparse help (no reST markup; ``%`` escaped for argparse)."""
    return " ".join(doc.replace("``", "").split()).replace("%", "%%")


def _metavar(name: str, hint: object) -> str:
    if typing.get_origin(hint) is typing.Literal:
        return "{" + ",".join(map(str, typing.get_args(hint))) + "}"
    if typing.get_origin(hint) is tuple:
        return "NAME,..."
    return {int: "N", float: "SECONDS" if name.endswith("_s") else "X"}.get(hint, name.upper())


def _shown(default: object) -> str:
    if default is None:
        return "unset"
    if isinstance(default, tuple):
        return ",".join(default) or "none"
    return str(default)


def _stage_runner(stage: str) -> Callable:
    """The stage's public entry point (imported lazily: torch is slow to import)."""
    import importlib

    module = importlib.import_module(f"pipeline.{stage}")
    return module.run


def run_stages(cfg, stages: Sequence[str], tasks: Sequence[str], *, force: bool, resume: bool) -> None:
    """Run ``stages`` in order for the selected tasks (evaluate covers all selected tasks at once)."""
    from pipeline.artifacts import check_writable, remove_stale_temporaries
    from pipeline.device import check_placement

    selected = [cfg.task(name) for name in tasks] if tasks else list(cfg.tasks)
    check_writable(cfg.run_dir)
    if distributed.is_main_process():  # what killed runs left (a live concurrent run's files are kept)
        remove_stale_temporaries(cfg.run_dir)
    log.info("running on %s", check_placement(cfg.device, cfg.tune.precision, cfg.providers))
    for stage in stages:
        runner = _stage_runner(stage)
        started = time.perf_counter()
        if stage == "evaluate":
            runner(cfg, selected, force=force)
        else:
            for task in selected:
                kwargs = {"resume": resume} if stage == "tune" else {}
                runner(cfg, task, force=force, **kwargs)
        log.info("stage %s finished in %.0f s", stage, time.perf_counter() - started)


def _gate_status(cfg, stages: Sequence[str], tasks: Sequence[str]) -> int:
    """0, or :data:`EXIT_FAILED_GATES` after naming every artifact left unpublished by its fidelity gate
    (export and evaluate runs: the report, already written, lists them with their measurements)."""
    from pipeline.stage_outputs import failed_gates

    if not {"export", "evaluate"} & set(stages) or not distributed.is_main_process():
        return 0
    failed = failed_gates(cfg, [cfg.task(name) for name in tasks] if tasks else list(cfg.tasks))
    if not failed:
        return 0
    lines = "\n".join(f"  {what}: {reason}" for what, reason in failed.items())
    print(f"edgetune: completed with failed gates: {len(failed)} artifact(s) not published, everything else "
          f"was (exit status {EXIT_FAILED_GATES}; report.json lists them with their numbers):\n{lines}", file=sys.stderr)
    return EXIT_FAILED_GATES


def _print_methods(cfg=None) -> None:
    """One line per method; with a config, its trainable parameters (count and share) on cfg.base."""
    from pipeline.methods import METHODS

    counts = _trainable_counts(cfg) if cfg is not None else {}
    width = max(len(n) for n in METHODS)
    for name, method in METHODS.items():
        merge = "mergeable" if method.mergeable else "adapter-only"
        count = f"{counts[name][0]:>12,} ({100 * counts[name][0] / counts[name][1]:6.3f}%)  " if counts else ""
        print(f"{name:<{width}}  {merge:<12}  {count}{method.description}")
    if counts:
        print(f"\ntrainable parameters on base {cfg.base!r} with this config's settings")


def _trainable_counts(cfg) -> dict[str, tuple[int, int]]:
    """(trainable, total) parameters of every method applied to a fresh copy of cfg.base."""
    from pipeline.methods import METHODS
    from pipeline.models import resolve_base
    from pipeline.tune import load_base_for_training, parameter_counts

    base = resolve_base(cfg.base)
    counts = {}
    for name, method in METHODS.items():
        model = method.apply(load_base_for_training(method, base, "cpu"), cfg)
        counts[name] = parameter_counts(model)
    return counts


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["run-edge"]:  # its own parser: options may come after the prompt, and no torch is imported
        return edge_cli.main(argv[1:])
    args = build_parser().parse_args(argv)
    # under torchrun / accelerate launch every rank logs: say which one
    rank = f"[rank {distributed.rank()}] " if distributed.world_size() > 1 else ""
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format=f"%(asctime)s {rank}%(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        if args.command == "serve":  # before pipeline.config: the ONNX backend runs without yaml or torch
            from serve.settings import ServeSettings

            flags = {k: v for k, v in vars(args).items() if k not in ("command", "verbose")}
            settings = ServeSettings.from_sources(flags)  # checked before the server's imports
            from serve.app import serve

            return serve(settings)
        from pipeline.config import load_config

        if args.command == "methods":
            _print_methods(load_config(args.config, args.overrides) if args.config else None)
            return 0

        cfg = load_config(args.config, args.overrides)
        if args.command == "pipeline":
            stages = [s.strip() for s in args.stages.split(",") if s.strip()]
            unknown = [s for s in stages if s not in STAGES]
            if unknown:
                raise EdgetuneError(f"--stages: unknown stage(s) {unknown}; choose from {', '.join(STAGES)}")
            stages = [s for s in STAGES if s in stages]
        else:
            stages = [args.command]
        _quiet_libraries()
        run_stages(cfg, stages, args.tasks, force=args.force, resume=getattr(args, "resume", False))
        return _gate_status(cfg, stages, args.tasks)
    except EdgetuneError as exc:
        print(f"edgetune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("edgetune: interrupted; finished stages are kept, unfinished ones left nothing behind",
              file=sys.stderr)
        return 130


def _quiet_libraries() -> None:
    """Keep our logs readable: libraries' info chatter off, their warnings on."""
    import warnings

    import transformers

    transformers.logging.set_verbosity_warning()
    for name in ("optimum", "onnxruntime", "accelerate"):
        logging.getLogger(name).setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", message=".*TypedStorage is deprecated.*")


if __name__ == "__main__":
    sys.exit(main())
