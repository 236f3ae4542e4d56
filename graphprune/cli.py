"""The ``graphprune`` command line: analyze, prune, bench, sweep, demo (and export, from frontends).

Errors are one line on stderr and a non-zero exit code (2: bad input or usage, 3: a
verification failure, 1: anything else, 141: stdout closed early, e.g. piped into ``head``).
With ``--json`` the error is a JSON object on stdout instead, ``{"error": MESSAGE,
"exit_code": N, "type": KIND}``, and nothing is written to stderr. Outputs are written
atomically and never over the input; every output path is checked before anything is
written. Tables go to stdout for people; ``--json`` prints JSON for programs instead.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

from graphprune import crash_guard
from graphprune.cli_commands import cmd_analyze, cmd_bench, cmd_demo, cmd_prune, cmd_sweep
from graphprune.errors import GraphPruneError
from graphprune.tables import ANALYZE_LEGEND

#: exit code when stdout is closed under us (128 + SIGPIPE, as C tools exit)
BROKEN_PIPE_EXIT = 141
#: exit code after SIGTERM (128 + 15, as the default handler would report it)
TERMINATED_EXIT = 143


class _Terminated(BaseException):
    """SIGTERM, raised in the main thread so the work unwinds as on Ctrl-C: the temporary
    weight folders and half-written files are removed (the default handler ends the process
    at once and leaves them, a model's weights among them, in the temporary directory).
    A ``BaseException``, so that no ``except Exception`` on the way takes it for a failure."""


def _raise_terminated(signum: int, frame: Any) -> None:
    raise _Terminated()


@contextmanager
def _terminate_unwinds() -> Iterator[None]:
    """Turn SIGTERM into :class:`_Terminated` while the command runs, where the process
    still has the default handler (an application embedding ``main`` keeps its own)."""
    if threading.current_thread() is not threading.main_thread() or \
            signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        yield
        return
    signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _error_json(message: str, exit_code: int, kind: str) -> str:
    return json.dumps({"error": message, "exit_code": exit_code, "type": kind})


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``graphprune: error: ...``) and exit code 2; a JSON
    error on stdout when ``--json`` is on the command line."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        text = f"{message} (see '{self.prog} --help')"
        if _Parser.json_errors:
            print(_error_json(text, 2, "UsageError"))
            self.exit(2)
        self.exit(2, f"graphprune: error: {text}\n")


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Keeps the examples in epilogs as written."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30)


# ----------------------------------------------------------------------------- argument types
def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, got '{text}'") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"target must be a number, got '{text}'") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"target must be a fraction in (0, 1), got {value}")
    return value


def _int_at_least(low: int) -> Any:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    return parse


def _tolerance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"tolerance must be a number, got '{text}'") from None
    if not value >= 0.0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"tolerance must be a finite number >= 0, got {text}")
    return value


def _erase_count(text: str) -> int | float:
    try:
        k = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--erase-blocks takes a count or a fraction, got '{text}'") from None
    if not k > 0:
        raise argparse.ArgumentTypeError(f"--erase-blocks must be > 0, got {text}")
    return int(k) if k >= 1 and k == int(k) else k


def _float_list(low: float, high: float, what: str) -> Any:
    def parse(text: str) -> list[float]:
        values = []
        for part in text.split(","):
            try:
                value = float(part)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{what}: '{part}' is not a number") from None
            if not low <= value < high:
                raise argparse.ArgumentTypeError(f"{what} must be in [{low:g}, {high:g}), got {value:g}")
            values.append(value)
        return values

    return parse


def _name_list(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


# ----------------------------------------------------------------------------- sources
def _input_shape(text: str) -> tuple[int, ...] | tuple[str, tuple[int, ...]]:
    """``--input-shape NAME=1,3,48,320`` (an ONNX graph input) or ``1,3,224,224`` (the
    next input of a framework source)."""
    name, sep, dims = text.rpartition("=")
    try:
        shape = tuple(int(d) for d in dims.replace("x", ",").split(",") if d.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--input-shape takes NAME=d0,d1,... (or d0,d1,... for a framework model), got '{text}'"
        ) from None
    if not shape or any(d <= 0 for d in shape) or (sep and not name):
        raise argparse.ArgumentTypeError(f"--input-shape needs positive sizes (NAME=1,3,48,320), got '{text}'")
    return (name, shape) if sep else shape


def _add_custom_ops_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--custom-ops", action="append", metavar="LIB",
                   help="a custom-op shared library ONNX Runtime needs to run the model (repeat "
                        "per library; onnxruntime-extensions' ai.onnx.contrib ops load by "
                        "themselves when that package is installed)")


def _add_source_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input-shape", type=_input_shape, action="append", metavar="NAME=1,3,48,320",
                   help="the shape to verify an ONNX input with (repeat per input; open sizes "
                        "are chosen so the model runs); framework sources (MODULE:FACTORY): "
                        "1,3,224,224, once per input")
    _add_custom_ops_option(p)
    try:
        import graphprune.frontends.cli  # noqa: F401
    except ImportError:
        return
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="PyTorch sources: which torch.onnx exporter (default: %(default)s)")


def _wants_user_module(args: argparse.Namespace) -> bool:
    """Whether the command imports a ``MODULE:FACTORY`` the user named."""
    spec = getattr(args, "factory", None) or getattr(args, "model", None)
    return isinstance(spec, str) and ":" in spec and not os.path.exists(spec)


def _explain_import_failure(exc: BaseException) -> str:
    """A hint for a ``MODULE:FACTORY`` that did not import (empty when not that case)."""
    cause = exc.__cause__
    if not isinstance(cause, ModuleNotFoundError) or not cause.name:
        return ""
    cwd = os.getcwd()
    return (f" (looked in the current directory {cwd} and the installed packages; run from the "
            f"folder that holds {cause.name.split('.')[0]}.py or the package, or name the file: "
            "path/to/file.py:FACTORY; if it is a dependency, install it)")


# ----------------------------------------------------------------------------- parser
MAIN_EPILOG = """\
examples:
  graphprune demo                                   prune the built-in example CNN
  graphprune analyze model.onnx                     channel groups, what is frozen and why
  graphprune prune model.onnx -o small.onnx --ratio 0.5 --html report.html
  graphprune bench model.onnx small.onnx --threads 1
  graphprune sweep model.onnx -o sweep/ --ratios 0.2,0.4,0.6 --jobs 2

exit codes: 0 success, 2 bad input or usage (one line, nothing written), 3 verification
failed, 1 internal error, 141 stdout closed early. With --json an error is printed as
{"error": ..., "exit_code": ..., "type": ...} on stdout (nothing on stderr).
Each command has its own --help."""

ANALYZE_EPILOG = """\
examples:
  graphprune analyze model.onnx
  graphprune analyze model.onnx --keep head.weight --json

""" + ANALYZE_LEGEND

PRUNE_EPILOG = """\
examples:
  graphprune prune model.onnx -o small.onnx --ratio 0.5 --report report.json
  graphprune prune model.onnx -o small.onnx --plan plan.json        replay a saved plan
  graphprune prune model.onnx -o exact.onnx --lossless              only exact removals
  graphprune prune model.onnx -o shallow.onnx --erase-blocks 2      depth pruning
  graphprune prune bert.onnx -o small.onnx --head-ratio 0.5 --mlp-ratio 0.25
  graphprune prune model.onnx -o small.onnx --html report.html      a page with charts

verification: the pruned model is compared with a reference on random inputs; the summary
names it. Ratio pruning compares with "the zeroed original" (the original with the removed
channels set to zero), which checks that the rewrite is exact; --erase-blocks compares
with the original with the erased branches zeroed and also prints the real difference to
the original; --lossless compares with the original itself."""

BENCH_EPILOG = """\
examples:
  graphprune bench model.onnx small.onnx                 interleaved, median and p90
  graphprune bench model.onnx small.onnx --threads 1 --runs 200
  graphprune bench model.onnx --batch 8 --provider cuda
  graphprune bench rec.onnx small.onnx --input-shape x=1,3,48,320        sizes the model runs at

A model whose batch axis is fixed runs its own batch; the table's batch column says which. Where
the first model does not run at the guessed sizes (images 224, sequences 8), sizes it runs at
are chosen (and a mode switch the graph tests, such as a sample rate, gets the tested value)."""

SWEEP_EPILOG = """\
examples:
  graphprune sweep model.onnx -o sweep/ --ratios 0.2,0.4,0.6
  graphprune sweep model.onnx -o sweep/ --ratios 0.3,0.5 --criteria l1,l2 --jobs 2
  graphprune sweep model.onnx -o sweep/ --ratios 0.2,0.4,0.6 --ray             local Ray
  graphprune sweep model.onnx -o sweep/ --ratios 0.2,0.4,0.6 --ray ray://head:10001

Each point (ratio x criterion) is pruned and verified as a job of its own (a process pool
with --jobs, Ray tasks with --ray); the latencies are then measured together, interleaved,
on this machine. Writes DIR/sweep.json, DIR/sweep.svg (the trade-off) and DIR/sweep.html,
and DIR/point-NN.onnx for each point. Fidelity: the pruned model against the original on
random inputs (cosine of the outputs, relative L2; top-1 agreement for class scores)."""

DEMO_EPILOG = """\
examples:
  graphprune demo
  graphprune demo --ratio 0.3 --output-dir demo/      keep the two models

Without --output-dir the models go to a temporary folder that is removed at exit."""


def _add_timing_options(p: argparse.ArgumentParser, *, runs: int) -> None:
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="ONNX Runtime execution provider for timing (cuda needs onnxruntime-gpu; "
                        "default: %(default)s)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                   help="ONNX Runtime intra-op threads, >= 1 (default: ORT's choice, one per core)")
    p.add_argument("--runs", type=_int_at_least(1), default=runs, metavar="N",
                   help="timed runs per model, >= 1 (default: %(default)s)")


def _add_output_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print JSON for programs instead of tables (errors too, on stdout)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress lines on stderr")


def _add_prune_parser(sub: Any) -> None:
    from graphprune.planning.importance import CRITERIA

    p = sub.add_parser("prune", help="prune a model and verify the result",
                       description="Prune a model and verify the result.", epilog=PRUNE_EPILOG,
                       formatter_class=_HelpFormatter)
    p.add_argument("model", help="an .onnx file (or a framework model: see --input-shape)")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (never the input)")
    p.add_argument("--ratio", type=_ratio, default=None, metavar="R",
                   help="fraction of the units of every prunable group to remove, in [0, 1); "
                        "exclusive with --target-*, --lossless and --erase-blocks (default: 0.5; "
                        "with only --head-ratio/--mlp-ratio given, 0: only those kinds are pruned)")
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--target-macs", type=_fraction, default=None, metavar="F",
                        help="prune to F of the original's multiply-accumulates, 0 < F < 1, with "
                             "global (non-uniform) allocation across groups; exclusive with --ratio")
    budget.add_argument("--target-params", type=_fraction, default=None, metavar="F",
                        help="prune to F of the original's parameters, 0 < F < 1 (global allocation)")
    budget.add_argument("--target-latency", type=_fraction, default=None, metavar="F",
                        help="prune to F of the original's measured ONNX Runtime latency on "
                             "--provider, 0 < F < 1: per-operator latencies measured and cached "
                             "on disk, fast widths chosen from them, the result timed and the "
                             "allocation redone when it misses")
    p.add_argument("--allow-depth", action="store_true",
                   help="with --target-macs/--target-params: when width alone cannot reach the "
                        "target within --max-ratio, erase the least important residual blocks too")
    p.add_argument("--search", type=_int_at_least(0), default=None, metavar="N",
                   help="with --calibration and --target-macs/--target-params: allocations tried "
                        "beyond greedy, uniform and a blend, each rewritten and reconstructed "
                        "(default: as many as fit in about a minute by their estimated cost, at most 12)")
    p.add_argument("--max-ratio", type=_ratio, default=None, metavar="R",
                   help="with a --target-*: largest share of any one group removed, in [0, 1) "
                        "(default: 0.9)")
    p.add_argument("--head-ratio", type=_ratio, default=None, metavar="R",
                   help="transformers: fraction of attention heads to remove, in [0, 1); 0: "
                        "none (default: --ratio if given, else 0)")
    p.add_argument("--mlp-ratio", type=_ratio, default=None, metavar="R",
                   help="transformers: fraction of MLP neurons to remove, in [0, 1) (default: --ratio if "
                        "given, else 0)")
    p.add_argument("--hidden-ratio", type=_ratio, default=None, metavar="R",
                   help="transformers: fraction of the hidden size to remove, with --prune-hidden "
                        "(default: --ratio)")
    p.add_argument("--prune-hidden", action="store_true",
                   help="transformers: also prune the hidden size (residual stream; inexact)")
    p.add_argument("--criterion", default=None, metavar="NAME",
                   help=f"importance criterion: {', '.join(CRITERIA)}; with --calibration also "
                        "auto, activation, wanda, flap, reconstruction, obs (default: l1, with "
                        "--calibration auto: a choice per group, and where cheap the whole plans of auto, "
                        "wanda and l1 weighed on the held-out samples)")
    p.add_argument("--calibration", metavar="CALIB",
                   help="calibration data: a .npz with one array per graph input (leading sample "
                        "axis; one unnamed array, or a .npy, for a one-input model) or a folder of "
                        ".npz files (one feed each); or random[:N[:LO,HI]] "
                        "with no data (N synthetic feeds, default 128: normal floats, or uniform "
                        "in [LO, HI]; token ids over the embedding table); enables data-aware "
                        "criteria, reconstruction and the fidelity report")
    p.add_argument("--reconstruction", choices=["auto", "refit", "stats", "bias", "bn", "none"], default="auto",
                   help="with --calibration: least-squares refit of the affected layers, "
                        "statistics correction, bias compensation, bias compensation from "
                        "BatchNormalization statistics (bn, data-free), or none; auto: the refit, "
                        "the statistics correction or none, whichever leaves the held-out samples "
                        "nearest the original (default: %(default)s)")
    p.add_argument("--class-scores", nargs="+", default=None, metavar="OUTPUT",
                   help="with --calibration: graph outputs that are class logits (a classifier "
                        "exported without its softmax); the layer computing each is refit to the "
                        "original's class distribution, as it is where the softmax is in the graph")
    p.add_argument("--allocation", choices=["auto", "measured", "uniform"], default="auto",
                   help="with --calibration and a ratio: auto shares the removal of attention "
                        "heads across layers by measurement (--head-ratio 0.25: a quarter of all "
                        "heads, not of each layer's), measured does so for MLP neurons too, uniform "
                        "cuts each group by the ratio (default: %(default)s)")
    p.add_argument("--final-refit", choices=["auto", "on", "off"], default="auto",
                   help="with --calibration: once the reconstruction is kept, run it again with every "
                        "sample, the held-out ones too, and write that model (the fidelity reported "
                        "stays the one measured without them); auto: where one reconstruction is "
                        "estimated, and took, 30 s or less (default: %(default)s)")
    p.add_argument("--holdout", type=_ratio, default=0.2, metavar="F",
                   help="with --calibration: share of the samples held out for the fidelity "
                        "report and the choices made on it (the final refit uses them too: "
                        "--final-refit) (default: %(default)s)")
    p.add_argument("--round-to", type=_int_at_least(1), default=None, metavar="N",
                   help="keep a multiple of N units per group, N >= 1; 1 turns rounding off "
                        "(default: 8 for groups of 32 units or more, else 1)")
    p.add_argument("--min-channels", type=_int_at_least(1), default=1, metavar="N",
                   help="minimum units kept per group, >= 1 (default: %(default)s)")
    p.add_argument("--keep", nargs="+", metavar="NAME",
                   help="node or tensor names whose channels must not be pruned")
    p.add_argument("--plan", metavar="PLAN.json", help="replay a saved plan instead of planning")
    p.add_argument("--save-plan", metavar="PLAN.json", help="write the plan that was applied (JSON)")
    p.add_argument("--report", metavar="REPORT.json", help="write the full report (JSON)")
    p.add_argument("--html", metavar="REPORT.html",
                   help="write a self-contained HTML report (tables, per-layer widths chart, "
                        "verification, latency); measures latency")
    p.add_argument("--lossless", action="store_true",
                   help="only exact removals: zero-invariant groups and zero branches")
    p.add_argument("--erase-blocks", type=_erase_count, metavar="K",
                   help="depth pruning: erase the K least important residual blocks (K >= 1), "
                        "or that fraction of them (0 < K < 1)")
    p.add_argument("--no-verify", action="store_true", help="skip the verification (not advised)")
    p.add_argument("--tolerance", type=_tolerance, default=None, metavar="T",
                   help="largest accepted relative difference in verification, >= 0 "
                        "(default: 1e-4; 1e-2 for float16 models)")
    p.add_argument("--seed", type=int, default=0,
                   help="random seed of the 'random' criterion (default: %(default)s)")
    p.add_argument("--latency", action="store_true",
                   help="also measure the ORT latency of the original and the pruned model")
    p.add_argument("--latency-runs", type=_int_at_least(1), default=None, metavar="N",
                   help="timed runs per model for the latency, >= 1 (default: 20)")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu",
                   help="cuda: also run the pruned model on CUDA (onnxruntime-gpu) and check it "
                        "agrees with the verified CPU run, and time it there (default: %(default)s)")
    p.add_argument("--threads", type=_int_at_least(1), default=None, metavar="N",
                   help="ONNX Runtime intra-op threads for the latency (default: ORT's choice)")
    _add_output_options(p)
    _add_source_options(p)
    p.set_defaults(func=cmd_prune)


def _add_sweep_parser(sub: Any) -> None:
    from graphprune import sweep
    from graphprune.planning.importance import CRITERIA

    p = sub.add_parser("sweep", help="prune at several settings; trade-off table, JSON and plot",
                       description="Prune at several settings and compare them.",
                       epilog=SWEEP_EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("model", help="an .onnx file (or a framework model: see --input-shape)")
    p.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="output folder (created; sweep.json, sweep.svg, sweep.html, point models)")
    p.add_argument("--ratios", type=_float_list(0.0, 1.0, "ratio"), default=None,
                   metavar="R,R,...",
                   help="ratios to try, each in [0, 1) (default: 0.25,0.5 unless targets are given)")
    p.add_argument("--criteria", type=_name_list, default=["l1"], metavar="NAME,...",
                   help=f"criteria to try: {', '.join(CRITERIA)} (default: l1)")
    for name in sweep.supported_targets():
        flag = "--" + name.replace("_", "-")
        p.add_argument(flag, dest=name, type=_float_list(0.0, 1.0, flag), default=None,
                       metavar="F,F,...",
                       help=f"{name.split('_')[1]} targets to try (fractions of the original, "
                            "in (0, 1)), instead of --ratios")
    if sweep.api_accepts("calibration"):
        p.add_argument("--calibration", metavar="CALIB",
                       help="calibration data (.npz, a folder of .npz, or random[:N]), passed to every point")
    p.add_argument("--round-to", type=_int_at_least(1), default=None, metavar="N",
                   help="as in prune: kept units a multiple of N (default: automatic)")
    p.add_argument("--keep", nargs="+", metavar="NAME", help="as in prune: protected names")
    p.add_argument("--tolerance", type=_tolerance, default=None, metavar="T",
                   help="as in prune: verification tolerance, >= 0 (default: 1e-4)")
    p.add_argument("--jobs", type=_int_at_least(1), default=1, metavar="N",
                   help="points pruned at once in a local process pool (or Ray CPUs), >= 1 "
                        "(default: %(default)s)")
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="run each point as a Ray task (pip install 'graphprune[ray]'); without "
                        "ADDRESS a local Ray instance is started and stopped")
    _add_timing_options(p, runs=20)
    _add_output_options(p)
    _add_source_options(p)
    p.set_defaults(func=cmd_sweep)


def build_parser() -> argparse.ArgumentParser:
    from graphprune import __version__

    parser = _Parser(prog="graphprune", description="Structural pruning of neural networks on "
                     "ONNX graphs.", epilog=MAIN_EPILOG, formatter_class=_HelpFormatter)
    parser.add_argument("--version", action="version", version=f"graphprune {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="show tracebacks on errors, same exit codes (and check the graph after every pass)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser,
                                metavar="COMMAND")

    p = sub.add_parser("analyze", help="show channel groups, frozen groups and reasons",
                       description="Show the channel groups of a model, what is frozen and why.",
                       epilog=ANALYZE_EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("model", help="an .onnx file (or a framework model: see --input-shape)")
    p.add_argument("--keep", nargs="+", metavar="NAME",
                   help="node or tensor names whose channels must not be pruned")
    p.add_argument("--no-legend", action="store_true", help="do not explain the columns")
    p.add_argument("--json", action="store_true",
                   help="print JSON for programs instead of a table (errors too, on stdout)")
    _add_source_options(p)
    p.set_defaults(func=cmd_analyze)

    _add_prune_parser(sub)

    p = sub.add_parser("bench", help="ORT latency of one or more models (interleaved)",
                       description="Time models with ONNX Runtime: the same random inputs, runs "
                       "interleaved so that machine load hits all alike.", epilog=BENCH_EPILOG,
                       formatter_class=_HelpFormatter)
    p.add_argument("models", nargs="+", metavar="MODEL", help=".onnx files to time; the first is "
                   "the baseline of the 'vs first' column")
    _add_timing_options(p, runs=50)
    p.add_argument("--warmup", type=_int_at_least(0), default=10, metavar="N",
                   help="untimed runs first, >= 0 (default: %(default)s)")
    p.add_argument("--batch", type=_int_at_least(1), default=1, metavar="N",
                   help="batch size for models with an open batch axis, >= 1 (default: %(default)s)")
    p.add_argument("--input-shape", type=_input_shape, action="append", metavar="NAME=1,3,48,320",
                   help="the shape to time an input at (repeat per input; open sizes not given are "
                        "guessed, or chosen so the first model runs)")
    _add_custom_ops_option(p)
    _add_output_options(p)
    p.set_defaults(func=cmd_bench)

    _add_sweep_parser(sub)

    p = sub.add_parser("demo", help="prune the built-in example CNN and show before/after",
                       description="Prune the built-in example CNN, verify and time it.",
                       epilog=DEMO_EPILOG, formatter_class=_HelpFormatter)
    p.add_argument("--ratio", type=_ratio, default=0.5, metavar="R",
                   help="fraction of each group to remove, in [0, 1) (default: %(default)s)")
    p.add_argument("--output-dir", metavar="DIR",
                   help="keep the two models in DIR (default: a temporary folder, removed at exit)")
    _add_timing_options(p, runs=30)
    _add_output_options(p)
    p.set_defaults(func=cmd_demo)

    try:
        from graphprune.frontends import cli as frontend_cli
    except ImportError:
        frontend_cli = None
    if frontend_cli is not None and hasattr(frontend_cli, "add_export_parser"):
        frontend_cli.add_export_parser(sub)
    return parser


# ----------------------------------------------------------------------------- main
def _fail(message: str, exit_code: int, kind: str, json_mode: bool) -> int:
    if json_mode:
        print(_error_json(message, exit_code, kind))
    else:
        print(f"graphprune: {'internal ' if kind == 'internal' else ''}error: {message}",
              file=sys.stderr)
    return exit_code


def _quiet_stdout() -> None:
    """After a broken pipe: send what is left for stdout to /dev/null (no second error at exit)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a real file (tests)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    arguments = list(sys.argv[1:] if argv is None else argv)
    json_mode = "--json" in arguments
    _Parser.json_errors = json_mode
    crash_guard.commit(False)
    try:
        with _terminate_unwinds():
            code = _main(arguments, json_mode)
        sys.stdout.flush()  # a reader that went away shows here, not at interpreter exit
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return BROKEN_PIPE_EXIT
    except KeyboardInterrupt:  # (in the work, or while the parser is built: its imports; after the files: done)
        return 0 if crash_guard.committed() else _fail("interrupted", 130, "KeyboardInterrupt", json_mode)
    except _Terminated:
        return _fail("terminated", TERMINATED_EXIT, "Terminated", json_mode)


def guarded_main(blame: Callable[[], str | None] | None = None) -> int:
    """The ``graphprune`` command: :func:`main` in a child process whose crash in native code
    (ONNX Runtime's segmentation fault on a model it cannot run) is said in one line
    (:mod:`graphprune.crash_guard`; ``blame``: see :func:`graphprune.command.input_crashes`)."""
    json_mode = "--json" in sys.argv[1:]
    return crash_guard.guarded(main, lambda message, code: _fail(message, code, "Crash", json_mode), blame)


def _main(arguments: list[str], json_mode: bool) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(arguments)
    except SystemExit as exc:  # --help, --version, usage errors (already printed)
        return exc.code if isinstance(exc.code, int) else 0 if exc.code is None else 2
    if _wants_user_module(args) and os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())  # as `python -m` does: modules in the current folder import
    try:
        if getattr(args, "custom_ops", None):
            from graphprune.io.runtime import register_custom_ops

            for library in args.custom_ops:
                register_custom_ops(library)
        return int(args.func(args) or 0)
    except GraphPruneError as exc:
        if args.debug:  # the traceback, and the exit code all the same
            traceback.print_exc()
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _fail(message + _explain_import_failure(exc), exc.exit_code, type(exc).__name__,
                     json_mode)
    except BrokenPipeError:
        raise
    except Exception as exc:  # an internal error: still one line, traceback with --debug
        if args.debug:
            traceback.print_exc()
        detail = str(exc).splitlines()[0] if str(exc) else ""
        return _fail(f"{type(exc).__name__}: {detail} (run with --debug for a traceback)", 1,
                     "internal", json_mode)


if __name__ == "__main__":
    raise SystemExit(main())
