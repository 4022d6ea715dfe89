"""The driver: ``graphopt run|report|passes|emitters|verify|golden|bench|demo`` and the commands
plugins add (``backends``).

Exit codes: 0 success; 1 the run finished but something did not verify; 2 bad input or
any other GraphoptError (one line on stderr, traceback only with --debug).
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Sequence

from graphopt.errors import GraphoptError, UsageError

EXIT_OK, EXIT_UNVERIFIED, EXIT_ERROR = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse's own errors: one line, exit 2
        raise UsageError(f"{message} (see {self.prog} --help)")


def _common() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--plugin", action="append", default=[], metavar="PATH.py|module",
                   help="load an extra plugin from a file or module (repeatable)")
    p.add_argument("-p", dest="block", action="append", default=[], metavar="no:NAME",
                   help="block a plugin by name, e.g. -p no:fold-bn (repeatable)")
    p.add_argument("--quiet", action="store_true", help="print nothing but errors")
    p.add_argument("--json", action="store_true", help="print the result as JSON on stdout")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    return p


def build_parser(registry=None) -> argparse.ArgumentParser:
    """The whole parser; plugins in ``registry`` add their options and commands."""
    common = _common()
    parser = _Parser(prog="graphopt", description="Optimize a PyTorch model for devices: "
                     "fx capture, verified passes, ONNX/TorchScript-Lite/TFLite/ExecuTorch artifacts.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", parents=[common], conflict_handler="resolve",   # features may share an option
                         help="optimize a model and emit verified artifacts")
    run.add_argument("model", help="path/to/file.py:callable or package.module:callable returning an nn.Module")
    run.add_argument("--input-shape", action="append", required=True, metavar="1x3x224x224",
                     help="shape of one input (repeat for several inputs)")
    run.add_argument("--weights", help="state_dict file to load (torch.load weights_only=True)")
    run.add_argument("--pipeline", help="pass pipeline, e.g. cleanup,fold-bn (default: the default pipeline)")
    run.add_argument("--emit", default="onnx", help="comma-separated formats (see graphopt emitters)")
    run.add_argument("--out", default="out", help="output directory for artifacts (default: out)")
    run.add_argument("--name", type=_name, help="the artifacts' base name (default: the callable's name, as in "
                                                "path/to/file.py:NAME)")
    run.add_argument("--report", metavar="FILE.json|FILE.html",
                     help="write the run's report here: JSON, or one self-contained HTML page for .html")
    run.add_argument("--seed", type=int, default=0, help="seed of the example inputs")
    run.add_argument("--example", metavar="DATA.npz", help="take the example inputs from the first samples of this "
                     "file (as --calib reads it) instead of seeded Gaussian ones")
    run.add_argument("--leaf-module", action="append", default=[], metavar="QUALNAME",
                     help="keep this submodule opaque to fx (repeatable)")
    run.add_argument("--no-verify", action="store_true", help="skip verify-each between passes")
    run.add_argument("--verify-inputs", type=_count, default=3, metavar="N",
                     help="verify passes and artifacts on the example input and on N seeded random inputs and "
                          "up to N calibration samples; the worst is reported (default: 3; 0: the example only)")
    run.add_argument("--print-ir-after", action="append", default=[], metavar="PASS|all",
                     help="print the graph code after this pass (repeatable)")
    run.add_argument("--explain", action="append", default=[], metavar="PASS",
                     help="list each candidate rewrite of PASS, applied or rejected, and why")
    run.add_argument("--bench", action="store_true",
                     help="time the artifacts beside the unoptimized model (eager and each format); "
                          "writes bench.json and bench.png into --out")
    _timing(run)

    bench = sub.add_parser("bench", parents=[common], help="time artifacts in their runtimes, side by side")
    bench.add_argument("artifacts", nargs="+", help="artifact files (format from the suffix)")
    src = bench.add_mutually_exclusive_group(required=True)
    src.add_argument("--reference", metavar="CASE.npz", help="inputs and reference outputs (a golden npz)")
    src.add_argument("--golden", metavar="NAME", help="golden model name in the manifest")
    src.add_argument("--input-shape", action="append", metavar="1x3x224x224",
                     help="random inputs of this shape; errors are then relative to the first artifact")
    bench.add_argument("--golden-dir", default="golden", help="folder of manifest.json (default: golden)")
    bench.add_argument("--plot", default="bench.png", help="PNG plot to write (default: bench.png)")
    bench.add_argument("--save", default="bench.json", help="JSON results to write (default: bench.json)")
    _timing(bench)

    report = sub.add_parser("report", parents=[common], help="turn a run's report JSON into an HTML page")
    report.add_argument("report", metavar="REPORT.json", help="a report written by graphopt run --report")
    report.add_argument("-o", "--output", metavar="FILE.html", help="the page to write (default: REPORT.html)")

    sub.add_parser("passes", parents=[common], help="list the registered passes")
    sub.add_parser("emitters", parents=[common], help="list the registered output formats")

    verify = sub.add_parser("verify", parents=[common], help="run artifacts in their runtimes against golden outputs")
    verify.add_argument("artifacts", nargs="+", help="artifact files (format from the suffix)")
    src = verify.add_mutually_exclusive_group(required=True)
    src.add_argument("--golden", metavar="NAME", help="golden model name in the manifest")
    src.add_argument("--reference", metavar="CASE.npz", help="a golden npz (input.* and output.* arrays)")
    verify.add_argument("--golden-dir", default="golden", help="folder of manifest.json (default: golden)")

    golden = sub.add_parser("golden", parents=[common], help="record or check golden references")
    golden.add_argument("action", choices=("record", "check"))
    golden.add_argument("names", nargs="*", help="models to record/check (default: all in the manifest)")
    golden.add_argument("--dir", default="golden", help="golden folder (default: golden)")
    golden.add_argument("--model", help="record: add NAME with this model spec")
    golden.add_argument("--input-shape", action="append", default=[], metavar="1x3x224x224")
    golden.add_argument("--pipeline", help="record: pipeline for this model's checks")
    golden.add_argument("--formats", default="onnx", help="record: formats to check (default: onnx)")

    demo = sub.add_parser("demo", parents=[common], help="train a small digits CNN and take it through every format")
    demo.add_argument("--out", default="out/demo", help="output directory (default: out/demo)")
    demo.add_argument("--pipeline", help="pipeline (default: cleanup,prune(ratio=0.5),finetune(epochs=8),"
                                         "fold-bn,fuse,quantize(prefer=size); finetune trains on the digits, "
                                         "quantize calibrates on 512 of them)")
    if registry is not None:
        registry.hook.graphopt_add_options(command="run", parser=run)
        registry.hook.graphopt_add_commands(subparsers=sub, parents=[common])
    return parser


def _count(text: str) -> int:
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"takes a whole number >= 0, got {text!r}")
    return int(text)


def _name(text: str) -> str:
    if not text or text in (".", "..") or any(c in text for c in '/\\\0'):
        raise argparse.ArgumentTypeError(f"takes a file name without folders, got {text!r}")
    return text


def _timing(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=1, help="intra-op threads of every runtime (default: 1)")
    p.add_argument("--runs", type=int, default=50, help="timed runs per artifact after warm-up (default: 50)")
    p.add_argument("--eval", metavar="DATA.npz", help="labelled data (x or one array per input, and y) for accuracy")


def _registry(argv: list[str]):
    """The plugins ``--plugin`` and ``-p no:NAME`` in ``argv`` ask for (read before the whole
    command line, whose options plugins add)."""
    from graphopt.plugins import load_plugins
    args, _ = _Parser(add_help=False, parents=[_common()]).parse_known_args(argv)
    blocked = []
    for b in args.block:
        if not b.startswith("no:") or len(b) == 3:
            raise UsageError(f"-p takes no:NAME to block a plugin, got {b!r}")
        blocked.append(b[3:])
    return load_plugins(args.plugin, blocked)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        registry = _registry(argv)
        args = build_parser(registry).parse_args(argv)
        from . import commands
        handler = getattr(args, "handler", None) or getattr(commands, f"cmd_{args.command}")
        return handler(args, registry)
    except GraphoptError as exc:
        if debug:
            raise
        print(f"graphopt: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("graphopt: interrupted", file=sys.stderr)
        return 130


def dump_json(data) -> None:
    json.dump(data, sys.stdout, indent=2)
    sys.stdout.write("\n")
