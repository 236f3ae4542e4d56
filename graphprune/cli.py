"""The ``graphprune`` command line: analyze, prune, bench, demo (and export, from frontends).

Errors are one line on stderr and a non-zero exit code (2: bad input or usage, 3: a
verification failure, 1: anything else); outputs are written atomically and never over
the input. Tables go to stdout for people; ``--json`` prints JSON for programs instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

from graphprune.errors import GraphPruneError, UsageError
from graphprune.tables import human, table


class _Progress:
    """Stage progress on stderr (``[2/5] analysis``), silent with --quiet."""

    def __init__(self, enabled: bool, stages: Sequence[str]) -> None:
        # progress is for people watching a terminal; logs and pipes get the final report only
        self.enabled = enabled and (sys.stderr.isatty() or os.environ.get("GRAPHPRUNE_PROGRESS") == "1")
        self.stages = list(stages)
        self.start = time.perf_counter()

    def __call__(self, stage: str) -> None:
        if not self.enabled:
            return
        index = self.stages.index(stage) + 1 if stage in self.stages else 0
        total = len(self.stages)
        elapsed = time.perf_counter() - self.start
        prefix = f"[{index}/{total}]" if index else "[..]"
        print(f"{prefix} {stage} (+{elapsed:.1f}s)", file=sys.stderr, flush=True)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``graphprune: error: ...``) and exit code 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"graphprune: error: {message} (see '{self.prog} --help')\n")


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"ratio must be a number, got '{text}'") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"ratio must be in [0, 1), got {value}")
    return value


def _dump(data: Any) -> str:
    return json.dumps(data, indent=1, default=str)


def _source(args: argparse.Namespace) -> Any:
    """The model to work on: an ONNX path, or a framework model exported on the fly
    (``MODULE:FACTORY`` with ``--input-shape``, a ``.keras``/``.h5`` file, a SavedModel)."""
    try:
        from graphprune.frontends.cli import resolve_source
    except ImportError:
        return args.model
    model = resolve_source(args.model, input_shapes=args.input_shape or None,
                           exporter=args.exporter)
    return args.model if model is None else model


def _add_source_options(p: argparse.ArgumentParser) -> None:
    try:
        from graphprune.frontends.cli import parse_shape
    except ImportError:
        return
    p.add_argument("--input-shape", type=parse_shape, action="append", metavar="1,3,224,224",
                   help="framework sources: an example input shape (repeat per input)")
    p.add_argument("--exporter", choices=["dynamo", "torchscript"], default="dynamo",
                   help="PyTorch sources: which torch.onnx exporter")


# ----------------------------------------------------------------------------- analyze
def cmd_analyze(args: argparse.Namespace) -> int:
    from graphprune.api import analyze, prunable_fraction

    analysis = analyze(_source(args), keep=args.keep or ())
    groups = [g.summary() for g in analysis.groups]
    if args.json:
        print(_dump({
            "summary": analysis.summary(),
            "prunable_fraction": prunable_fraction(analysis),
            "groups": groups,
            "unsupported": analysis.unsupported,
        }))
        return 0
    rows = []
    for g in analysis.groups:
        status = "prunable" if g.prunable else ("frozen" if g.is_frozen else "fixed")
        if g.prunable and not g.is_exact:
            status = "prunable*"
        reason = g.frozen[0] if g.frozen else (g.inexact[0] if g.inexact else "")
        rows.append([g.id, f"{g.anchor[0]}:{g.anchor[1]}", g.num_units, len(g.dims),
                     len(set(g.nodes)), status, reason[:70]])
    print(table(["group", "anchor", "units", "members", "ops", "status", "reason"], rows,
                align="rlrrrll"))
    s = analysis.summary()
    print(f"\n{s['groups']} channel groups: {s['prunable']} prunable "
          f"({s['inexact']} inexact, marked *), {s['frozen']} frozen; "
          f"prunable conv channels: {prunable_fraction(analysis):.1%}")
    if analysis.unsupported:
        ops = ", ".join(f"{k} x{len(v)}" for k, v in sorted(analysis.unsupported.items()))
        print(f"ops without a rule (their dimensions are frozen): {ops}")
    return 0


# ----------------------------------------------------------------------------- prune
def _check_paths(model: str, output: str) -> None:
    if not output:
        raise UsageError("an output path is required (-o OUT.onnx)")
    if os.path.exists(model) and os.path.exists(output) and os.path.samefile(model, output):
        raise UsageError(f"output path is the input path: {output}")
    if os.path.realpath(model) == os.path.realpath(output):
        raise UsageError(f"output path is the input path: {output}")
    parent = Path(output).resolve().parent
    if not parent.is_dir():
        raise UsageError(f"output folder does not exist: {parent}")


def _result_rows(report: dict[str, Any]) -> list[list[object]]:
    pb, pa = report["params_before"], report["params_after"]
    mb, ma = report["macs_before"], report["macs_after"]
    return [
        ["params", human(pb), human(pa), f"{pa / pb:.3f}" if pb else "-"],
        ["MACs", human(mb), human(ma), f"{ma / mb:.3f}" if mb else "-"],
    ]


def _print_prune_report(report: dict[str, Any]) -> None:
    print(table(["", "before", "after", "ratio"], _result_rows(report)))
    g = report.get("groups", {})
    ch = report.get("channels", {})
    if "total" in g:
        print(f"\ngroups: {g.get('total', 0)} found, {g.get('pruned', 0)} pruned, "
              f"{g.get('frozen', 0)} frozen; units removed: {ch.get('removed', 0)} of "
              f"{ch.get('prunable', 0)} prunable; prunable conv channels: "
              f"{report.get('prunable_fraction', 0):.1%}")
    else:
        print(f"\ngroups pruned: {g.get('pruned', 0)}; units removed: {ch.get('removed', 0)}")
    if report.get("mode"):
        print(f"mode: {report['mode']}")
    erased = report.get("erased_nodes")
    if erased:
        print(f"operators erased: {erased if isinstance(erased, int) else len(erased)}")
    blocks = report.get("blocks_erased") or (report.get("depth") or {}).get("blocks_erased")
    if blocks:
        names = blocks if isinstance(blocks, list) else []
        print(f"residual blocks erased: {len(names) if names else blocks}"
              + (f" ({', '.join(map(str, names[:8]))}{' ...' if len(names) > 8 else ''})" if names else ""))
    v = report.get("verification", {})
    if v.get("skipped"):
        print("verification: skipped (--no-verify)")
    elif v.get("ok"):
        print(f"verification: ok (checker, ORT, shapes; max abs diff {v['max_abs_diff']:.3g}, "
              f"max rel diff {v['max_rel_diff']:.3g})")
        for entry in v.get("inexact_groups", [])[:5]:
            print(f"  inexact group {entry['anchor']} not compared: {entry['why'][0] if entry['why'] else ''}")
    else:
        print(f"verification: FAILED {v.get('error', '')}")
    t = report.get("timings", {})
    print("time: " + ", ".join(f"{k} {v:.2f}s" for k, v in t.items()))


def cmd_prune(args: argparse.Namespace) -> int:
    from graphprune.io import model_io
    from graphprune.api import prune

    _check_paths(args.model, args.output)
    stages = ["load", "analysis", "plan", "prune", "verify"]
    progress = _Progress(not args.quiet and not args.json, stages)
    source = _source(args)
    result = prune(
        source, ratio=args.ratio, criterion=args.criterion, round_to=args.round_to,
        min_channels=args.min_channels, keep=args.keep or (), plan=args.plan,
        verify=not args.no_verify, tolerance=args.tolerance, seed=args.seed,
        progress=progress, head_ratio=args.head_ratio, mlp_ratio=args.mlp_ratio,
        hidden_ratio=args.hidden_ratio, prune_hidden=args.prune_hidden,
        lossless=args.lossless, erase_blocks=_erase_count(args.erase_blocks),
        debug=args.debug,
    )
    model_io.save_model(result.model, args.output,
                        input_path=args.model if os.path.isfile(args.model) else None)
    if args.report:
        from graphprune.io._atomic import atomic_write_text

        atomic_write_text(Path(args.report), _dump(result.report))
    if args.save_plan:
        result.plan.save(args.save_plan)
    if args.json:
        print(_dump({"output": args.output, **result.report}))
    else:
        _print_prune_report(result.report)
        print(f"wrote {args.output}")
    return 0


def _erase_count(text: str | None) -> int | float | None:
    if text is None:
        return None
    try:
        k = float(text)
    except ValueError:
        raise UsageError(f"--erase-blocks takes a count or a fraction, got '{text}'") from None
    return int(k) if k >= 1 and k == int(k) else k


# ----------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from graphprune.verify.timing import time_models

    for path in args.models:
        if not Path(path).is_file():
            raise UsageError(f"no such file: {path}")
    progress = None
    if not args.quiet and not args.json:
        def progress(done: int, total: int) -> None:
            print(f"\rtiming {done}/{total}", end="" if done < total else "\n",
                  file=sys.stderr, flush=True)
    results = time_models(args.models, provider=args.provider, warmup=args.warmup,
                          runs=args.runs, batch=args.batch, progress=progress)
    if args.json:
        print(_dump([r.to_dict() for r in results]))
        return 0
    base = results[0].median_ms
    rows = [[r.name, f"{r.median_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.median_ms / base:.3f}"]
            for r in results]
    print(table(["model", "median ms", "p90 ms", "vs first"], rows))
    print(f"\nprovider {args.provider}, batch {args.batch}, {args.runs} runs after "
          f"{args.warmup} warm-up, interleaved")
    return 0


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from graphprune.io import model_io
    from graphprune.api import prune
    from graphprune.examples import example_cnn
    from graphprune.verify.timing import time_models

    model = example_cnn()
    progress = _Progress(not args.quiet and not args.json,
                         ["load", "analysis", "plan", "prune", "verify"])
    result = prune(model, ratio=args.ratio, progress=progress)
    out_dir = Path(args.output_dir) if args.output_dir else Path(tempfile.mkdtemp(prefix="graphprune-demo-"))
    out_dir.mkdir(parents=True, exist_ok=True)
    original_path = out_dir / "example_cnn.onnx"
    pruned_path = out_dir / "example_cnn_pruned.onnx"
    model_io.save_model(model, original_path)
    model_io.save_model(result.model, pruned_path, input_path=original_path)
    if not args.quiet and not args.json:
        print("[..] timing with ONNX Runtime (CPU)", file=sys.stderr, flush=True)
    timing = time_models([original_path, pruned_path], warmup=5, runs=args.runs)
    report = result.report
    if args.json:
        print(_dump({**report, "latency_ms": [t.median_ms for t in timing],
                     "files": [str(original_path), str(pruned_path)]}))
        return 0
    rows = _result_rows(report)
    t0, t1 = timing[0].median_ms, timing[1].median_ms
    rows.append(["ORT CPU latency (ms)", f"{t0:.3f}", f"{t1:.3f}", f"{t1 / t0:.3f}"])
    print(f"graphprune demo: built-in example CNN pruned at ratio {args.ratio}\n")
    print(table(["", "original", "pruned", "ratio"], rows))
    v = report["verification"]
    print(f"\nverification: {'ok' if v.get('ok') else 'FAILED'} (onnx.checker, ORT run, output "
          f"shapes, pruned vs zeroed original: max rel diff {v.get('max_rel_diff', 0):.2g})")
    g = report["groups"]
    print(f"channel groups: {g['total']} found, {g['pruned']} pruned, {g['frozen']} frozen "
          f"(graph input/output)")
    print(f"models written to {out_dir}")
    return 0


# ----------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    from graphprune import __version__

    parser = _Parser(
        prog="graphprune", description="Structural pruning of neural networks on ONNX graphs.")
    parser.add_argument("--version", action="version", version=f"graphprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    p = sub.add_parser("analyze", help="show channel groups, frozen groups and reasons")
    p.add_argument("model", help="an .onnx file (or a framework model: see --input-shape)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--keep", nargs="+", metavar="NAME", help="protected node or tensor names")
    _add_source_options(p)
    p.set_defaults(func=cmd_analyze)

    p = sub.add_parser("prune", help="prune a model and verify the result")
    p.add_argument("model")
    p.add_argument("-o", "--output", required=True, help="output .onnx path (never the input)")
    p.add_argument("--ratio", type=_ratio, default=0.5, help="fraction of each group to remove")
    p.add_argument("--head-ratio", type=_ratio, default=None,
                   help="transformers: fraction of attention heads (default: --ratio)")
    p.add_argument("--mlp-ratio", type=_ratio, default=None,
                   help="transformers: fraction of MLP neurons (default: --ratio)")
    p.add_argument("--hidden-ratio", type=_ratio, default=None,
                   help="transformers: fraction of the hidden size, with --prune-hidden")
    p.add_argument("--prune-hidden", action="store_true",
                   help="transformers: also prune the hidden size (inexact)")
    p.add_argument("--criterion", default="l1", help="importance criterion: l1, l2, random")
    p.add_argument("--round-to", type=int, default=None,
                   help="kept counts a multiple of N (default: 8 for groups of >= 32 units)")
    p.add_argument("--min-channels", type=int, default=1, help="minimum units kept per group")
    p.add_argument("--keep", nargs="+", metavar="NAME", help="protected node or tensor names")
    p.add_argument("--plan", help="replay a saved plan (JSON) instead of planning")
    p.add_argument("--save-plan", help="write the plan that was applied (JSON)")
    p.add_argument("--report", help="write the report (JSON)")
    p.add_argument("--lossless", action="store_true",
                   help="only exact removals: zero-invariant groups and zero branches")
    p.add_argument("--erase-blocks", metavar="K",
                   help="depth pruning: erase the K (or fraction K) least important residual blocks")
    p.add_argument("--no-verify", action="store_true", help="skip the self-check (not advised)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="max relative difference (default 1e-4; 1e-5 with --lossless/--erase-blocks)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    _add_source_options(p)
    p.set_defaults(func=cmd_prune)

    p = sub.add_parser("bench", help="ORT latency of one or more models (interleaved)")
    p.add_argument("models", nargs="+")
    p.add_argument("--provider", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("demo", help="prune the built-in example CNN and show before/after")
    p.add_argument("--ratio", type=_ratio, default=0.5)
    p.add_argument("--runs", type=int, default=30)
    p.add_argument("--output-dir", help="where to write the two models (default: a temp dir)")
    p.add_argument("--json", action="store_true")
    p.add_argument("-q", "--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    try:
        from graphprune.frontends import cli as frontend_cli
    except ImportError:
        frontend_cli = None
    if frontend_cli is not None and hasattr(frontend_cli, "add_export_parser"):
        frontend_cli.add_export_parser(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except GraphPruneError as exc:
        if args.debug:
            raise
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"graphprune: error: {message}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("graphprune: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # an internal error: still one line, traceback with --debug
        if args.debug:
            raise
        print(f"graphprune: internal error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} "
              "(run with --debug for a traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
