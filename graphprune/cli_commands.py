"""What the ``graphprune`` subcommands do (the parser and error handling: :mod:`graphprune.cli`).

Each ``cmd_*`` takes the parsed arguments, prints tables (or JSON with ``--json``) and
returns the exit code; errors are raised as :class:`~graphprune.errors.GraphPruneError`
subclasses that :func:`graphprune.cli.main` maps to exit codes. Every output path is
checked before anything is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from graphprune import crash_guard
from graphprune.analysis.explain import domain_notes, unranked_layers
from graphprune.errors import UsageError
from graphprune.io import scratch
from graphprune.tables import ANALYZE_LEGEND, normalised_lines, prune_summary, result_rows, table

#: timed runs per model of prune's latency measurement (--latency, --html; a latency target's own)
LATENCY_RUNS = 20
#: where stderr is not a terminal (a log, a pipe, a notebook cell), stage lines start once a
#: run has taken this long: a quick run, or an input error, prints only its result
PROGRESS_AFTER = 10.0


class _Progress:
    """Stage progress on stderr (``[2/5] analysis (+0.4s)``), silent with --quiet. On a
    terminal from the start; elsewhere from :data:`PROGRESS_AFTER` seconds into the run.
    ``GRAPHPRUNE_PROGRESS=1`` prints every stage anywhere, ``=0`` none."""

    def __init__(self, enabled: bool, stages: Sequence[str]) -> None:
        setting = os.environ.get("GRAPHPRUNE_PROGRESS")
        self.enabled = enabled and setting != "0"
        self.after = 0.0 if setting == "1" or sys.stderr.isatty() else PROGRESS_AFTER
        self.stages = list(stages)
        self.start = time.perf_counter()
        self.last = ""
        self.reached = 0  # the furthest stage numbered so far: the count never goes back

    def __call__(self, stage: str) -> None:
        elapsed = time.perf_counter() - self.start
        if not self.enabled or elapsed < self.after or stage == self.last:  # (a stage entered again at once)
            return
        self.last = stage
        index = self.stages.index(stage) + 1 if stage in self.stages else 0
        if index < self.reached:  # entered again later (the check of the preparation after the final refit)
            index = 0
        self.reached = max(self.reached, index)
        total = len(self.stages)
        prefix = f"[{index}/{total}]" if index else "[..]"
        print(f"{prefix} {stage} (+{elapsed:.1f}s)", file=sys.stderr, flush=True)


def _dump(data: Any) -> str:
    return json.dumps(data, indent=1, default=str)


# ----------------------------------------------------------------------------- sources
def _source(args: argparse.Namespace) -> Any:
    """The model to work on: an ONNX path, or a framework model exported on the fly
    (``MODULE:FACTORY`` with ``--input-shape``, a ``.keras``/``.h5`` file, a SavedModel)."""
    try:
        from graphprune.frontends.cli import resolve_source
    except ImportError:
        return args.model
    model = resolve_source(args.model, input_shapes=_shapes(args)[0] or None,
                           exporter=args.exporter)
    return args.model if model is None else model


def _shapes(args: argparse.Namespace) -> tuple[list[tuple[int, ...]], dict[str, tuple[int, ...]]]:
    """``--input-shape`` values: unnamed (framework sources) and ``NAME=...`` (ONNX inputs)."""
    given = getattr(args, "input_shape", None) or []
    names = [v[0] for v in given if isinstance(v[0], str)]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:  # (the last one silently won)
        raise UsageError(f"--input-shape given more than once for {', '.join(map(repr, twice))}")
    named = dict(v for v in given if isinstance(v[0], str))
    return [v for v in given if not isinstance(v[0], str)], named


# ----------------------------------------------------------------------------- analyze
def cmd_analyze(args: argparse.Namespace) -> int:
    from graphprune.api import analyze, prunable_fraction
    from graphprune.pipeline.report import prunable_label

    analysis = analyze(_source(args), keep=args.keep or (), input_shapes=_shapes(args)[1] or None)
    groups = [g.summary() for g in analysis.groups]
    # a model that holds no weight tensor says so (graphprune.pipeline.weightless)
    weightless = getattr(analysis, "nothing_prunable", None)
    if args.json:
        print(_dump({
            "summary": analysis.summary(),
            "prunable_fraction": prunable_fraction(analysis),
            "prunable_fraction_of": prunable_label(analysis),
            "groups": groups,
            "unsupported": analysis.unsupported,
            "normalised": analysis.normalised,
            **({"nothing_prunable": weightless} if weightless else {}),
        }))
        return 0
    rows = []
    for g in analysis.groups:
        status = "prunable" if g.prunable else ("frozen" if g.is_frozen else "fixed")
        if g.prunable and not g.is_exact:
            status = "prunable*"
        reason = g.frozen[0] if g.frozen else (g.inexact[0] if g.inexact else "")
        if not g.prunable and not g.frozen:
            reason = ("one unit" if g.num_units < 2 else "a weight's own axis, no channel"
                      if analysis.weight_only(g) else "no weight creates these channels")
        if g.pinned_units and not g.frozen:
            reason = f"{g.pinned_units} units pinned: {g.pinned[0]}"
        # (a frozen group whose units were never told apart: its channels, not 0)
        units = g.num_units or (f"{g.sizes[g.anchor]} ch" if g.sizes.get(g.anchor) else "?")
        rows.append([g.id, f"{g.anchor[0]}:{g.anchor[1]}", units, len(g.dims),
                     len(set(g.nodes)), status, reason[:70]])
    print(table(["group", "anchor", "units", "members", "ops", "status", "reason"], rows,
                align="rlrrrll"))
    s = analysis.summary()
    print(f"\n{s['groups']} channel groups: {s['prunable']} prunable "
          f"({s['inexact']} inexact, marked *), {s['frozen']} frozen; "
          f"prunable {prunable_label(analysis)}: {prunable_fraction(analysis):.1%}")
    for line in normalised_lines(analysis.normalised):
        print(line)
    if weightless:
        print(weightless)
    if analysis.unsupported:
        ops = ", ".join(f"{k} x{len(v)}" for k, v in sorted(analysis.unsupported.items()))
        print(f"ops without a rule (their dimensions are frozen): {ops}")
        for note in domain_notes(analysis.unsupported):
            print(f"  {note}")
    if unranked := unranked_layers(analysis):
        print(f"layers no group holds, the rank of their input unknown (give --input-shape, or shapes in the file): "
              f"{unranked}")
    if not args.no_legend:
        print("\n" + ANALYZE_LEGEND)
    return 0


# ----------------------------------------------------------------------------- prune
def _check_paths(model: str, output: str) -> None:
    if not output:
        raise UsageError("an output path is required (-o OUT.onnx)")
    try:
        same = os.path.exists(model) and os.path.exists(output) and os.path.samefile(model, output)
    except OSError as exc:
        raise UsageError(f"-o: cannot use {_short(output)}: {exc.strerror or exc}") from None
    if same or os.path.realpath(model) == os.path.realpath(output):
        raise UsageError(f"output path is the input path: {output}")
    _check_writable("-o", output, suffix=len(".data"))


def _short(value: str, keep: int = 60) -> str:
    return value if len(value) <= keep else f"{value[:keep]}... ({len(value)} characters)"


def _check_writable(option: str, value: str, suffix: int = 0) -> None:
    """``value`` can be written by an atomic write (:mod:`graphprune.io._atomic`), checked before
    any work: its folder exists and takes a new file (one is created and removed: ``os.access``
    says yes to root on a read-only or virtual file system), and its name (with ``suffix`` more
    bytes: an external data file's) fits the file system's limit."""
    from graphprune.io._atomic import TEMPORARY_NAME_EXTRA, try_writing

    path = Path(value)
    if value.endswith(("/", os.sep)):  # (a Path drops the slash: 'sub/' became a file named 'sub')
        raise UsageError(f"{option} {value} names a folder (it ends with '/'), not a file path")
    try:
        if path.is_dir():
            raise UsageError(f"{option} {value} is a directory, not a file path")
        parent = path.resolve().parent
        if not parent.is_dir():
            raise UsageError(f"{option}: folder does not exist: {parent}")
        limit = os.pathconf(parent, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
    except OSError as exc:
        raise UsageError(f"{option}: cannot use {_short(value)}: {exc.strerror or exc}") from None
    length, extra = len(os.fsencode(path.name)), suffix + TEMPORARY_NAME_EXTRA
    if length + extra > limit:
        raise UsageError(f"{option}: file name too long: {length} bytes, at most {limit - extra} in this folder "
                         f"(the files written beside it add {extra} to it): {_short(path.name)}")
    try:
        try_writing(path)
        if suffix:  # (the weights' file beside it: a FIFO there was found only when the model was saved)
            try_writing(path.with_name(path.name + ".data"))
    except OSError as exc:
        raise UsageError(f"{option}: folder is not writable: {parent} ({exc.strerror or exc})") from None


def _check_folder(option: str, value: str) -> None:
    """``value`` can be an output folder (made if missing), checked before any work: a folder or
    nothing, its missing names within the file system's limit, the nearest existing folder
    takes a new file."""
    from graphprune.io._atomic import try_writing

    path = Path(value)
    try:
        if path.exists() and not path.is_dir():
            raise UsageError(f"{option} {value} is a file, not a folder")
        existing, missing = path.absolute(), []
        while not existing.exists():
            missing.append(existing.name)
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"{option}: {existing} is a file, not a folder")
        limit = os.pathconf(existing, "PC_NAME_MAX") if hasattr(os, "pathconf") else 255
        long = next((name for name in missing if len(os.fsencode(name)) > limit), None)
        if long is not None:
            raise UsageError(f"{option}: folder name too long: {len(os.fsencode(long))} bytes, at most {limit}: "
                             f"{_short(long)}")
        try_writing(existing / "graphprune-check")
    except OSError as exc:
        raise UsageError(f"{option}: cannot use {_short(value)}: {exc.strerror or exc}") from None


def _check_side_outputs(args: argparse.Namespace, options: Sequence[str]) -> None:
    """Every extra output (``--report``, ``--save-plan``, ``--html``) must be writable and
    distinct from the model paths, checked before anything is written."""
    taken = {os.path.realpath(args.model): "the input", os.path.realpath(args.output): "-o"}
    for option in options:
        value = getattr(args, option.lstrip("-").replace("-", "_"), None)
        if not value:
            continue
        _check_writable(option, value)
        real = os.path.realpath(value)
        if real in taken:
            raise UsageError(f"{option} {value} is the same path as {taken[real]}")
        taken[real] = option


def _measure_latency(models: list[Any], provider: str, threads: int | None, runs: int,
                     input_shapes: dict[str, Any] | None = None, data: dict[str, Any] | None = None) -> dict[str, Any]:
    """Both models timed side by side, at ``input_shapes`` (the sizes the MACs were counted
    at, where the inputs leave sizes open) or at sizes the original runs at; on ``data`` (a
    calibration sample) where the original does not run on generated inputs."""
    from graphprune.verify.timing import time_models

    before, after = time_models(models, provider=provider, warmup=5, runs=runs, threads=threads,
                                input_shapes=input_shapes, data=data)
    return {"before": before.to_dict(), "after": after.to_dict()}


def cmd_prune(args: argparse.Namespace) -> int:
    from graphprune.api import prune

    _check_paths(args.model, args.output)
    _check_side_outputs(args, ["--report", "--save-plan", "--html"])
    if args.provider != "cpu":
        from graphprune.verify.timing import resolve_providers

        resolve_providers(args.provider)  # a one-line error before any work
    targets = {k: getattr(args, f"target_{k}", None) for k in ("macs", "params", "latency")}
    budget = any(v is not None for v in targets.values())
    if budget and args.ratio is not None:
        raise UsageError("--ratio and --target-macs/--target-params/--target-latency are exclusive")
    if (args.max_ratio is not None or args.allow_depth) and not budget:
        raise UsageError("--max-ratio and --allow-depth apply with --target-macs/--target-params/"
                         "--target-latency only")
    if args.allocation != "auto" and (budget or not args.calibration):
        raise UsageError("--allocation applies to a ratio prune with --calibration only")
    if args.final_refit != "auto" and not args.calibration:
        raise UsageError("--final-refit applies with --calibration only")
    timed = args.latency or args.html or args.provider != "cpu"
    if args.latency_runs is not None and not (timed or targets["latency"] is not None):
        raise UsageError("--latency-runs applies with --latency, --html, --provider cuda or --target-latency: "
                         "nothing is timed")
    stages = ["load", "analysis", "plan", "prune", "verify"]
    if args.calibration:
        stages = ["load", "calibration", "analysis", "statistics", "plan", "prune", "verify",
                  "reconstruction", "fidelity", "stats correction", "final refit"]
    progress = _Progress(not args.quiet and not args.json, stages)
    source = _source(args)
    result = prune(
        source, ratio=args.ratio, criterion=args.criterion,
        round_to=args.round_to,
        min_channels=args.min_channels, keep=args.keep or (), plan=args.plan,
        verify=not args.no_verify, tolerance=args.tolerance, seed=args.seed,
        progress=progress, head_ratio=args.head_ratio, mlp_ratio=args.mlp_ratio,
        hidden_ratio=args.hidden_ratio, prune_hidden=args.prune_hidden,
        lossless=args.lossless, erase_blocks=args.erase_blocks,
        debug=args.debug, calibration=args.calibration, reconstruction=args.reconstruction,
        holdout=args.holdout, class_scores=args.class_scores or (), target_macs=targets["macs"], target_params=targets["params"],
        target_latency=targets["latency"], max_ratio=args.max_ratio, allow_depth=args.allow_depth,
        search=args.search, allocation=args.allocation, final_refit=args.final_refit,
        provider=args.provider, threads=args.threads, input_shapes=_shapes(args)[1] or None,
        latency_runs=args.latency_runs if targets["latency"] is not None else None,
    )
    report = result.report
    original = source if not isinstance(source, str) else None
    if args.provider != "cpu" and not args.no_verify:
        _check_on_provider(result.model, args.provider, report)
    latency = None
    if args.html or args.latency or args.provider != "cpu":
        progress("latency")
        # verified on calibration samples or inputs generated by name: timed on one of them
        data = result.verification_feeds[0] if result.verification_feeds else None
        latency = _measure_latency([source if original is not None else args.model, result.model],
                                   args.provider, args.threads, args.latency_runs or LATENCY_RUNS,
                                   {**(report.get("macs_input_shapes") or {}), **_shapes(args)[1]} or None, data)
        report["latency"] = latency
    new = [Path(p) for p in (args.output, f"{args.output}.data", args.report, args.save_plan, args.html)
           if p and not os.path.lexists(p)]
    try:
        result.save(args.output, input_path=args.model if os.path.isfile(args.model) else None)
        if args.report:
            from graphprune.io._atomic import atomic_write_text

            atomic_write_text(Path(args.report), _dump(report))
        if args.save_plan:
            result.plan.save(args.save_plan)
        if args.html:
            _write_html(args, report, latency, original, getattr(result, "skeleton", None) or result.model)
    except (UsageError, OSError, KeyboardInterrupt):  # (checked before the work; a disk that filled up since;
        for path in new:  # Ctrl-C) what this call wrote is taken back: an exit 2 or 130 writes nothing
            path.unlink(missing_ok=True)
        raise
    crash_guard.commit()  # (a Ctrl-C from here on no longer undoes the command: its files are written)
    if args.json:
        print(_dump({"output": args.output, **report}))
    else:
        print(prune_summary(report, latency))
        print(f"wrote {args.output}" + (f" and {args.html}" if args.html else ""))
    return 0


def _check_on_provider(model: Any, provider: str, report: dict[str, Any]) -> None:
    """The pruned model must compute the same on ``provider`` as on the CPU, where it was verified."""
    from graphprune.errors import VerificationError
    from graphprune.io.feeds import make_feeds
    from graphprune.verify.timing import PROVIDER_TOLERANCE, provider_agreement

    agreement = provider_agreement(model, make_feeds(model, count=2, seed=3), provider=provider)
    agreement["tolerance"] = PROVIDER_TOLERANCE
    agreement["ok"] = agreement["max_rel_diff"] <= PROVIDER_TOLERANCE
    report["provider_check"] = agreement
    if not agreement["ok"]:
        raise VerificationError(
            f"the pruned model computes differently on {provider} than on the CPU: max relative "
            f"difference {agreement['max_rel_diff']:.3g} > {PROVIDER_TOLERANCE:g}")


def _write_html(args: argparse.Namespace, report: dict[str, Any], latency: Any,
                original: Any, pruned: Any) -> None:
    from graphprune.html_report import layer_widths, render_prune_report
    from graphprune.io import model_io
    from graphprune.io._atomic import atomic_write_text

    # widths come from weight shapes: neither model needs its weights loaded
    before = original if original is not None else model_io.load_model(args.model, load_external_data=False)
    page = render_prune_report(report, widths=layer_widths(before, pruned), latency=latency,
                               title=f"graphprune: {Path(args.model).name}",
                               source=args.model, output=args.output)
    atomic_write_text(Path(args.html), page)


# ----------------------------------------------------------------------------- bench
def cmd_bench(args: argparse.Namespace) -> int:
    from graphprune.verify.timing import time_models

    for path in args.models:
        if not Path(path).is_file():
            raise UsageError(f"no such file: {path}")
    progress = None
    if not args.quiet and not args.json and os.environ.get("GRAPHPRUNE_PROGRESS") != "0":
        terminal, start, shown = sys.stderr.isatty() or os.environ.get("GRAPHPRUNE_PROGRESS") == "1", time.perf_counter(), [0.0]

        def progress(done: int, total: int) -> None:
            if terminal:  # one line rewritten in place
                print(f"\rtiming {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)
                return
            elapsed = time.perf_counter() - start  # a log or a pipe: a line now and then, once it takes a while
            if elapsed >= PROGRESS_AFTER and elapsed - shown[0] >= PROGRESS_AFTER:
                shown[0] = elapsed
                print(f"timing {done}/{total} (+{elapsed:.0f}s)", file=sys.stderr, flush=True)
    if _shapes(args)[0]:
        raise UsageError("bench --input-shape takes NAME=d0,d1,... (a graph input's name)")
    results = time_models(args.models, provider=args.provider, warmup=args.warmup,
                          runs=args.runs, batch=args.batch, threads=args.threads,
                          progress=progress, input_shapes=_shapes(args)[1] or None)
    if args.json:
        print(_dump([{**r.to_dict(), "requested_batch": args.batch} for r in results]))
        return 0
    base = results[0].median_ms
    rows = [[r.name, f"{r.median_ms:.3f}", f"{r.p90_ms:.3f}", f"{r.median_ms / base:.3f}", r.batch]
            for r in results]
    print(table(["model", "median ms", "p90 ms", "vs first", "batch"], rows))
    threads = f"{args.threads} intra-op threads" if args.threads else "ORT's default threads"
    print(f"\nprovider {args.provider}, {threads}, {args.runs} runs after {args.warmup} "
          "warm-up, interleaved")
    for r in results:
        if r.batch != args.batch:
            print(f"note: {r.name} ran batch {r.batch}, not {args.batch} (a fixed batch axis, the sizes "
                  "given, or the only batch it runs at)")
    sizes = [", ".join(f"{k}={'x'.join(map(str, v))}" for k, v in r.input_shapes.items()) for r in results]
    if len(set(sizes)) > 1:  # (the models' inputs differ: unlike work, said rather than hidden)
        print("note: the models ran at different input sizes: "
              + "; ".join(f"{r.name}: {text}" for r, text in zip(results, sizes, strict=True)))
    else:
        print(f"inputs: {sizes[0]}")
    return 0


# ----------------------------------------------------------------------------- sweep
def cmd_sweep(args: argparse.Namespace) -> int:
    from graphprune import sweep

    common: dict[str, Any] = {"keep": args.keep or (), "round_to": args.round_to,
                              "tolerance": args.tolerance, "input_shapes": _shapes(args)[1] or None}
    if getattr(args, "calibration", None):
        common["calibration"] = args.calibration
    targets = {name: getattr(args, name) for name in sweep.TARGET_OPTIONS
               if getattr(args, name, None)}
    ratios = args.ratios if args.ratios is not None else ([] if targets else [0.25, 0.5])
    points = sweep.sweep_points(ratios=ratios, criteria=args.criteria, targets=targets)
    _check_folder("-o", args.output)
    progress = None
    if not args.quiet and not args.json:
        def progress(message: str) -> None:
            print(f"[..] {message}", file=sys.stderr, flush=True)
    source = _source(args)
    data = sweep.run_sweep(
        source, args.output, points, common=common, jobs=args.jobs,
        ray_address=args.ray, runs=args.runs, provider=args.provider, threads=args.threads,
        progress=progress,
    )
    # every point failed: the command failed (it said "wrote ... 1 points" and exited 0), as a prune would
    failed = [p for p in data["points"] if not p.get("ok")]
    code = failed[0].get("exit_code", 1) if failed and len(failed) == len(data["points"]) else 0
    if args.json:
        print(_dump(data))
        return code
    print(sweep.summary_table(data))
    print(f"\nwrote {Path(args.output) / 'sweep.json'}, sweep.svg and sweep.html "
          f"({len(data['points'])} points, engine: {data['engine']})")
    if code:
        print(f"graphprune: error: every point failed, the first: {failed[0].get('error', '')}", file=sys.stderr)
    return code


# ----------------------------------------------------------------------------- demo
def cmd_demo(args: argparse.Namespace) -> int:
    from graphprune.api import prune
    from graphprune.examples import example_cnn

    if args.provider != "cpu":
        from graphprune.verify.timing import resolve_providers

        resolve_providers(args.provider)  # a one-line error before any work
    if args.output_dir:
        _check_folder("--output-dir", args.output_dir)
    model = example_cnn()
    progress = _Progress(not args.quiet and not args.json,
                         ["load", "analysis", "plan", "prune", "verify"])
    result = prune(model, ratio=args.ratio, progress=progress)
    if args.output_dir:
        out_dir = Path(args.output_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        return _demo_report(args, model, result, out_dir, keep=True)
    with scratch.Folder("graphprune-demo-") as temporary:
        return _demo_report(args, model, result, Path(temporary), keep=False)


def _demo_report(args: argparse.Namespace, model: Any, result: Any, out_dir: Path, *, keep: bool) -> int:
    from graphprune.io import model_io
    from graphprune.verify.timing import time_models

    original_path = out_dir / "example_cnn.onnx"
    pruned_path = out_dir / "example_cnn_pruned.onnx"
    model_io.save_model(model, original_path)
    model_io.save_model(result.model, pruned_path, input_path=original_path)
    if not args.quiet and not args.json:
        print(f"[..] timing with ONNX Runtime ({args.provider})", file=sys.stderr, flush=True)
    timing = time_models([original_path, pruned_path], warmup=5, runs=args.runs,
                         provider=args.provider, threads=args.threads)
    report = result.report
    if args.json:
        print(_dump({**report, "latency_ms": [t.median_ms for t in timing],
                     "files": [str(original_path), str(pruned_path)] if keep else []}))
        return 0
    rows = result_rows(report)
    t0, t1 = timing[0].median_ms, timing[1].median_ms
    rows.append([f"ORT {args.provider.upper()} latency (ms)", f"{t0:.3f}", f"{t1:.3f}", f"{t1 / t0:.3f}"])
    print(f"graphprune demo: built-in example CNN pruned at ratio {args.ratio}\n")
    print(table(["", "original", "pruned", "ratio"], rows))
    v = report["verification"]
    print(f"\nverification: {'ok' if v.get('ok') else 'FAILED'} (onnx.checker, ORT run, output "
          f"shapes; compared with {v.get('reference', 'the zeroed original')}: max rel diff "
          f"{v.get('max_rel_diff', 0):.2g})")
    g = report["groups"]
    print(f"channel groups: {g['total']} found, {g['pruned']} pruned, {g['frozen']} frozen "
          f"(graph input/output)")
    print(f"models written to {out_dir}" if keep else
          "models not kept (pass --output-dir DIR to keep them)")
    return 0
