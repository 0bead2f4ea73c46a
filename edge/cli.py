"""``edgetune run-edge BUNDLE --adapter NAME "prompt"``: answer a prompt from an edge bundle.

Needs only numpy, onnxruntime and tokenizers (no PyTorch, no transformers): what a device has.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

HELP = "answer a prompt with an edge bundle (ONNX Runtime only; no PyTorch needed)"
DESCRIPTION = """Run an edge bundle (runs/<run>/export/edge, made by `edgetune export` or `make pipeline`) on
this machine with ONNX Runtime. The prompt is sent as one user turn in the model's chat format
(--raw sends it as is). Text is printed as it is generated. Every file is checked against the
bundle's sha256 manifest first (--no-verify skips that)."""
EPILOG = """examples:
  edgetune run-edge runs/default/export/edge --list
  edgetune run-edge runs/default/export/edge --adapter sentiment "Review: great kettle.\\nLabel the sentiment."
  edgetune run-edge runs/default/export/edge "What is the capital of France?" --max-tokens 40
  edgetune run-edge runs/default/export/edge --providers cuda,cpu "Hello"   # onnxruntime-gpu
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("bundle", help="the edge bundle folder (holds manifest.json)")
    p.add_argument("prompt", nargs="?", help="the prompt (read from stdin when omitted)")
    p.add_argument("--adapter", default=None, help="task adapter to apply (default: the bare base); see --list")
    p.add_argument("--list", action="store_true", help="list the bundle's adapters and exit")
    p.add_argument("--max-tokens", type=int, default=128, help="most new tokens (default %(default)s)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default); > 0 samples")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0)")
    p.add_argument("--seed", type=int, default=None, help="seed for sampling (repeatable output)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: one per core)")
    p.add_argument("--providers", default="cpu", metavar="NAME,...",
                   help="ONNX Runtime execution providers in order of preference, comma-separated: cpu, cuda "
                        "(cuda needs the gpu extra: pip install 'edgetune[gpu]'); the CPU is always the last "
                        "fallback (default: %(default)s)")
    p.add_argument("--raw", action="store_true", help="send the prompt as is, without the chat format")
    p.add_argument("--no-verify", dest="verify", action="store_false", help="skip the sha256 check of the files")


def run(args: argparse.Namespace) -> int:
    """Execute the parsed command; user errors print one ``edgetune: error:`` line and return 2."""
    from edge.bundle import BundleError, EdgeRunner, load_bundle
    from edge.generation import Sampling

    try:
        if args.max_tokens < 1:
            raise BundleError(f"--max-tokens must be >= 1, got {args.max_tokens}")
        sampling = Sampling(args.temperature, args.top_p, args.seed)  # checks --temperature and --top-p
        bundle = load_bundle(args.bundle, verify=args.verify)
        if args.list:
            for name, entry in sorted(bundle.adapters.items()):
                print(f"{name}\t{entry.kind}\t{entry.file}")
            return 0
        prompt = args.prompt if args.prompt is not None else sys.stdin.read()
        if not prompt.strip():
            raise BundleError("the prompt is empty: pass it as an argument or on stdin")
        providers = [name for name in args.providers.split(",") if name.strip()]
        runner = EdgeRunner(bundle, threads=args.threads, providers=providers)
        ids = runner.tokenizer.encode(prompt, add_special_tokens=False).ids if args.raw else runner.encode_chat(prompt)
        for piece in runner.stream_text(ids, args.max_tokens, adapter=args.adapter, sampling=sampling):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    except (BundleError, FileNotFoundError, ValueError) as exc:
        print(f"edgetune: error: {exc}", file=sys.stderr)
        return 2


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="edgetune run-edge", description=DESCRIPTION, epilog=EPILOG,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return run(parser.parse_intermixed_args(argv))


if __name__ == "__main__":
    sys.exit(main())
