"""Sweeps: prune one model at several settings and show the trade-off.

>>> points = sweep_points(ratios=[0.2, 0.4, 0.6], criteria=["l1"])       # doctest: +SKIP
>>> data = run_sweep("model.onnx", "sweep/", points, jobs=2)               # doctest: +SKIP
>>> data = run_sweep("model.onnx", "sweep/", points, ray_address="local")  # doctest: +SKIP

Every point is an independent job: :func:`run_point` prunes and verifies the model with
:func:`graphprune.api.prune` and measures its fidelity to the original (ONNX Runtime, the
same random inputs for every point). Jobs run in this process (``jobs=1``), in a local
process pool (``jobs=N``) or as Ray tasks (``ray_address``: ``"local"`` starts a local Ray
instance and stops it afterwards; any other value is passed to ``ray.init(address=...)``,
whose workers need graphprune installed). Latency is measured afterwards, on this machine,
for the original and every point together, with the runs interleaved so that machine load
hits all of them alike: points pruned in parallel are never timed in parallel.

Outputs, in the sweep folder: ``sweep.json`` (``{"points": [...]}`` plus the baseline),
``sweep.svg`` (fidelity and latency against MACs), ``sweep.html`` (both, with the table),
and ``point-NN.onnx`` for each point.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphprune.errors import GraphPruneError, UsageError
from graphprune.io.scratch import make as make_scratch

__all__ = ["TARGET_OPTIONS", "api_accepts", "fidelity", "run_point", "run_sweep",
           "summary_table", "supported_targets", "sweep_points"]

#: budget options of :func:`graphprune.api.prune` a sweep can vary (where the API has them)
TARGET_OPTIONS = ("target_macs", "target_params", "target_latency")

#: random inputs used to compare every point with the original
FIDELITY_SAMPLES = 4


def api_accepts(name: str) -> bool:
    """Whether :func:`graphprune.api.prune` takes the keyword ``name``."""
    from graphprune.api import prune

    return name in inspect.signature(prune).parameters


def supported_targets() -> list[str]:
    return [name for name in TARGET_OPTIONS if api_accepts(name)]


def _label(options: Mapping[str, Any]) -> str:
    parts = [str(options.get("criterion", ""))]
    for key, value in options.items():
        if key != "criterion":
            short = {"ratio": "r"}.get(key, key.replace("target_", ""))
            parts.append(f"{short}={value:g}" if isinstance(value, float) else f"{short}={value}")
    return " ".join(p for p in parts if p)


def sweep_points(
    *,
    ratios: Sequence[float] = (),
    criteria: Sequence[str] = ("l1",),
    targets: Mapping[str, Sequence[float]] | None = None,
) -> list[dict[str, Any]]:
    """The prune options of every point: each criterion with each ratio and each target."""
    from graphprune.planning.importance import CRITERIA

    if not criteria:
        raise UsageError("a sweep needs at least one criterion")
    for criterion in criteria:
        if criterion not in CRITERIA:
            raise UsageError(f"unknown criterion '{criterion}' (choose from {', '.join(CRITERIA)})")
    points: list[dict[str, Any]] = []
    for criterion in criteria:
        for ratio in ratios:
            points.append({"ratio": float(ratio), "criterion": criterion})
        for name, values in (targets or {}).items():
            if name not in TARGET_OPTIONS or not api_accepts(name):
                raise UsageError(f"this graphprune cannot prune to a target '{name}'")
            for value in values:
                points.append({name: float(value), "criterion": criterion})
    if not points:
        raise UsageError("a sweep needs at least one ratio or target")
    return points


# ----------------------------------------------------------------------------- one point
def fidelity(original: Any, pruned: Any, *, count: int = FIDELITY_SAMPLES, seed: int = 1,
             input_shapes: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """How close ``pruned`` computes to ``original`` on ``count`` random inputs (at
    ``input_shapes`` where given): mean and smallest cosine of the outputs, largest relative
    L2 difference, and top-1 agreement for outputs shaped like class scores ``[batch, classes]``."""
    from graphprune.calibration.fidelity import pair_figures
    from graphprune.calibration.output_kinds import feature_outputs, unit_rows
    from graphprune.io.feeds import integers_zeroed, make_feeds
    from graphprune.verify import validate

    reference_model = original if isinstance(original, onnx.ModelProto) else onnx.load(original)
    feeds = make_feeds(reference_model, seed=seed, count=count, input_shapes=dict(input_shapes or {}) or None)
    inputs = f"{count} random inputs (seed {seed})"
    reference, failure = None, None
    try:
        reference = validate.run_many(original, feeds, "the original")
    except GraphPruneError as exc:
        failure = exc
    if reference is None and any(np.issubdtype(v.dtype, np.integer) for v in feeds[0].values()):
        try:  # ids into an open count of rows (a GNN's atoms), as the prune's verification feeds them
            zeros = [integers_zeroed(f) for f in feeds]
            reference, feeds, inputs = validate.run_many(original, zeros, "the original"), zeros, inputs + ", integers 0"
        except GraphPruneError:
            pass
    if reference is None:  # (at sizes the probe finds, as the prune's verification: ICLabel runs at batch 4)
        from graphprune.analysis.probe_sizes import choose_input_shapes
        from graphprune.io.feeds import input_specs, make_feeds_from_specs

        specs = input_specs(reference_model)
        shapes = choose_input_shapes(None, specs, session=validate.session(reference_model), seed=seed)
        if not shapes:
            assert failure is not None
            raise failure
        feeds = [make_feeds_from_specs(specs, seed=seed + k, input_shapes=shapes)[0] for k in range(count)]
        reference = validate.run_many(original, feeds, "the original")
    outputs = validate.run_many(pruned, feeds, "the pruned model")
    cosines, relative, top1 = [], [], []
    # an embedding's arg-max names no class (a normalisation at its end, or rows of length 1)
    names = [o.name for o in reference_model.graph.output]
    embeddings = feature_outputs(reference_model) | unit_rows(names, reference)
    for ref_list, out_list in zip(reference, outputs, strict=True):
        for name, ref, out in zip(names, ref_list, out_list, strict=True):
            if ref.dtype.kind not in "fc" or ref.size == 0:
                continue
            cosine, rel = pair_figures(ref, out)  # another shape (a decoder's other length): 0, 1
            if ref.size > 1:  # (of one number, the cosine is its sign: 1.0 at a relative L2 of 106)
                cosines.append(cosine)
            relative.append(rel)
            if ref.shape == out.shape and ref.ndim == 2 and ref.shape[1] > 1 and name not in embeddings:
                top1.append(float(np.mean(np.argmax(ref, 1) == np.argmax(out, 1))))
    return {
        "inputs": inputs,
        "input_shapes": {k: list(np.shape(v)) for k, v in feeds[0].items()},
        "cosine_mean": float(np.mean(cosines)) if cosines else None,
        "cosine_min": float(np.min(cosines)) if cosines else None,
        "rel_l2_max": float(np.max(relative)) if relative else None,
        "top1_agreement": float(np.mean(top1)) if top1 else None,
    }


def held_out_figures(found: Mapping[str, Any] | None) -> dict[str, Any] | None:
    """A calibrated point's figures on the calibration's held-out samples (its report's
    ``fidelity``) as :func:`fidelity` gives them; ``None`` without (a point pruned without data
    is compared on random inputs: khmersm's best point read cosine 0.19 there, 0.991 held out)."""
    if not found or not found.get("samples") or found.get("cosine") is None and found.get("rel_l2") is None:
        return None
    smallest = [e["min_cosine"] for e in (found.get("outputs") or {}).values() if e.get("min_cosine") is not None]
    return {"inputs": f"{found['samples']} held-out calibration samples", "cosine_mean": found.get("cosine"),
            "cosine_min": min(smallest) if smallest else None, "rel_l2_max": found.get("rel_l2"),
            "top1_agreement": found.get("top1_agreement")}


def run_point(source: Any, options: Mapping[str, Any], common: Mapping[str, Any]) -> dict[str, Any]:
    """Prune ``source`` (path or serialised model) with ``options`` and ``common``; verify,
    measure fidelity. Returns the point's record and, under ``"model"``, the pruned model as
    bytes (``None`` when the point failed: its ``error`` says why)."""
    from graphprune.api import prune
    from graphprune.io import model_io

    start = time.perf_counter()
    record: dict[str, Any] = {"options": dict(options), "label": _label(options)}
    result = None
    try:
        original = model_io.load_model(source)
        result = prune(original, **{k: v for k, v in common.items() if v is not None}, **options)
        report = result.report
        record.update({
            "ok": True,
            "params_before": report["params_before"], "params_after": report["params_after"],
            "params_ratio": report["params_after"] / report["params_before"] if report["params_before"] else None,
            "macs_before": report["macs_before"], "macs_after": report["macs_after"],
            "macs_ratio": report["macs_after"] / report["macs_before"] if report["macs_before"] else None,
            "units_removed": (report.get("channels") or {}).get("removed"),
            "verification": {k: report["verification"].get(k) for k in
                             ("ok", "reference", "max_abs_diff", "max_rel_diff", "tolerance")},
            "fidelity": held_out_figures(report.get("fidelity"))
            or fidelity(original, result.model, input_shapes=common.get("input_shapes")),
        })
        for section in ("fidelity", "calibration", "target", "budget"):
            if section in report:
                record[f"report_{section}"] = report[section]
        data: bytes | None = result.model.SerializeToString()
    except GraphPruneError as exc:
        result = result or getattr(exc, "result", None)  # a verification failure carries one
        record.update({"ok": False, "error": str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                       "exit_code": exc.exit_code})
        data = None
    finally:
        if result is not None:  # a Ray worker ends without exit handlers: its weight folder goes now
            result.close()
    record["seconds"] = round(time.perf_counter() - start, 3)
    record["model"] = data
    return record


# ----------------------------------------------------------------------------- engines
def _run_local(source: Any, points: Sequence[Mapping[str, Any]], common: Mapping[str, Any],
               jobs: int, progress: Callable[[str], None] | None) -> list[dict[str, Any]]:
    results: list[dict[str, Any] | None] = [None] * len(points)
    if jobs <= 1:
        for index, options in enumerate(points):
            results[index] = run_point(source, options, common)
            _tell(progress, index, results, len(points))
        return [r for r in results if r is not None]
    # spawn: a fresh interpreter per worker (forking a process that holds ORT threads is unsafe)
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context) as pool:
        futures = {pool.submit(run_point, source, options, common): index
                   for index, options in enumerate(points)}
        for future in concurrent.futures.as_completed(futures):
            index = futures[future]
            results[index] = future.result()
            _tell(progress, index, results, len(points))
    return [r for r in results if r is not None]


def _tell(progress: Callable[[str], None] | None, index: int, results: list[Any], total: int) -> None:
    if progress is not None:
        done = sum(r is not None for r in results)
        progress(f"point {done}/{total} done: {results[index]['label']}")


def _run_ray(source: bytes, points: Sequence[Mapping[str, Any]], common: Mapping[str, Any],
             address: str, jobs: int, progress: Callable[[str], None] | None) -> tuple[list[dict[str, Any]], str]:
    try:
        import ray
    except ImportError as exc:
        raise UsageError("--ray needs Ray: pip install 'graphprune[ray]'") from exc
    started, scratch = False, None
    if not ray.is_initialized():
        options: dict[str, Any] = {"include_dashboard": False, "logging_level": logging.ERROR,
                                   "log_to_driver": False}
        if address == "local":
            scratch = str(make_scratch("gp-ray-"))
            cpus = jobs if jobs > 1 else (os.cpu_count() or 1)
            ray.init(num_cpus=cpus, _temp_dir=scratch, **options)
        else:
            ray.init(address=address, **options)
        started = True
    where = "local Ray instance" if address == "local" else f"Ray at {address}"
    try:
        task = ray.remote(num_cpus=1)(run_point)
        model_ref = ray.put(source)  # once in the object store, shared by every task
        pending = {task.remote(model_ref, options, dict(common)): index
                   for index, options in enumerate(points)}
        results: list[dict[str, Any] | None] = [None] * len(points)
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            index = pending.pop(ready[0])
            results[index] = ray.get(ready[0])
            _tell(progress, index, results, len(points))
        cpus = int(ray.cluster_resources().get("CPU", 0))
    finally:
        if started:
            ray.shutdown()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return [r for r in results if r is not None], f"ray ({where}, {cpus} CPUs)"


# ----------------------------------------------------------------------------- the sweep
def _prepare_folder(out_dir: str | os.PathLike[str]) -> Path:
    folder = Path(out_dir)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"sweep output {folder} exists and is not a folder")
    if not folder.resolve().parent.is_dir():
        raise UsageError(f"output folder's parent does not exist: {folder.resolve().parent}")
    folder.mkdir(exist_ok=True)
    return folder


def run_sweep(
    model: Any,
    out_dir: str | os.PathLike[str],
    points: Sequence[Mapping[str, Any]],
    *,
    common: Mapping[str, Any] | None = None,
    jobs: int = 1,
    ray_address: str | None = None,
    runs: int = 20,
    provider: str = "cpu",
    threads: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run every point, time them all, write ``sweep.json``, ``sweep.svg``, ``sweep.html`` and
    the point models into ``out_dir``; return the JSON data (see the module docstring).

    ``model`` is a path, bytes or ``onnx.ModelProto``; ``common`` holds prune options shared by
    every point (``keep``, ``round_to``, ``tolerance``, ``calibration``, ...).
    """
    from graphprune.io import model_io
    from graphprune.io.tensor_protos import uses_external_data
    from graphprune.verify.metrics import count_macs, count_params
    from graphprune.verify.timing import resolve_providers, time_models

    if jobs < 1:
        raise UsageError(f"jobs must be at least 1, got {jobs}")
    resolve_providers(provider)
    common = dict(common or {})
    is_path = isinstance(model, str | os.PathLike)
    original = model_io.load_model(model)  # a bad model fails here, once, before any job
    folder = _prepare_folder(out_dir)
    data_bytes = original.SerializeToString()
    if ray_address is not None:
        records, engine = _run_ray(data_bytes, points, common, ray_address, jobs, progress)
    else:
        source = os.fspath(model) if is_path else data_bytes
        records = _run_local(source, points, common, jobs, progress)
        engine = f"process pool ({jobs} jobs)" if jobs > 1 else "in process"

    paths: list[Path] = []
    # weights in a data file beside each point where the input kept them so (as prune writes them)
    external = True if is_path and uses_external_data(model) else None
    for index, record in enumerate(records):
        data = record.pop("model")
        if data is not None:
            path = model_io.save_model(onnx.load_from_string(data), folder / f"point-{index:02d}.onnx",
                                       external_data=external)
            record["file"] = path.name
            paths.append(path)
    if progress is not None:
        progress(f"timing the original and {len(paths)} points ({provider}, interleaved)")
    # the original twice: its time against its own is the timing's noise on this machine (a shared
    # one moved a point 1.44x -> 0.83x between runs without a word)
    first = os.fspath(model) if is_path else original
    timings = time_models([first, first, *paths], provider=provider,
                          warmup=3, runs=runs, threads=threads, input_shapes=common.get("input_shapes"))
    baseline = timings[0]
    by_file = {path.name: timing for path, timing in zip(paths, timings[2:], strict=True)}
    for record in records:
        timing = by_file.get(record.get("file", ""))
        if timing is not None:
            record["latency_ms"] = timing.median_ms
            record["latency_p90_ms"] = timing.p90_ms
            record["latency_ratio"] = timing.median_ms / baseline.median_ms
    result = {
        "model": os.fspath(model) if is_path else "<in memory>",
        "engine": engine,
        "latency": {"provider": provider, "runs": runs, "threads": threads, "batch": baseline.batch,
                    "input_shapes": baseline.input_shapes,
                    "how": "ONNX Runtime, original and all points interleaved, after pruning",
                    "original_against_itself": round(timings[1].median_ms / baseline.median_ms, 4)},
        # the pipeline's own counts (on the prepared model), so that ratios agree with points
        "baseline": {"params": next((r["params_before"] for r in records if r.get("ok")), None)
                     or count_params(original),
                     "macs": next((r["macs_before"] for r in records if r.get("ok")), None)
                     or count_macs(model_io.infer_shapes(original)),
                     "latency_ms": baseline.median_ms},
        "common": {k: (list(v) if isinstance(v, tuple) else v) for k, v in common.items()},
        "points": records,
    }
    _write_outputs(folder, result)
    return result


def _write_outputs(folder: Path, data: dict[str, Any]) -> None:
    import json

    from graphprune.io._atomic import atomic_write_text

    atomic_write_text(folder / "sweep.json", json.dumps(data, indent=1, default=str))
    svg = sweep_svg(data["points"])
    atomic_write_text(folder / "sweep.svg", svg)
    atomic_write_text(folder / "sweep.html", sweep_html(data, svg))


def _plot_points(points: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    return [{"label": p["label"], "macs_ratio": p.get("macs_ratio"),
             "cosine": (p.get("fidelity") or {}).get("cosine_mean"),
             "latency_ratio": p.get("latency_ratio")} for p in points if p.get("ok")]


def sweep_svg(points: Sequence[Mapping[str, Any]]) -> str:
    """One standalone SVG: fidelity against MACs, and latency against MACs."""
    from graphprune.html_report import STYLE, scatter_svg

    rows = _plot_points(points)
    left = scatter_svg(rows, x="macs_ratio", y="cosine", x_label="MACs (fraction of the original)",
                       y_label="output cosine to the original")
    right = scatter_svg(rows, x="macs_ratio", y="latency_ratio",
                        x_label="MACs (fraction of the original)",
                        y_label="latency (fraction of the original)")
    return ('<svg xmlns="http://www.w3.org/2000/svg" width="1060" height="360" viewBox="0 0 1060 360">'
            f"<style>{STYLE}</style>"
            + left.replace("<svg ", '<svg x="0" ', 1) + right.replace("<svg ", '<svg x="540" ', 1)
            + "</svg>\n")


def summary_table(data: Mapping[str, Any]) -> str:
    """The points as a text table."""
    from graphprune.tables import table

    def fmt(value: Any, spec: str = ".3f") -> str:
        return "-" if value is None else format(value, spec)

    rows = []
    for point in data["points"]:
        fid = point.get("fidelity") or {}
        if point.get("ok"):
            rows.append([point["label"], fmt(point.get("params_ratio")), fmt(point.get("macs_ratio")),
                         fmt(point.get("latency_ms")), fmt(point.get("latency_ratio")),
                         fmt(fid.get("cosine_mean"), ".4f"), fmt(fid.get("rel_l2_max"), ".3g"),
                         fmt(fid.get("top1_agreement"), ".2f"),
                         "ok" if (point.get("verification") or {}).get("ok") else "unverified"])
        else:
            rows.append([point["label"], "-", "-", "-", "-", "-", "-", "-", f"failed: {point.get('error', '')[:50]}"])
    missed = [f"{p['label']} MISSED its target: achieved {b['achieved']:.3f} of the asked {b['fraction']:g}"
              for p in data["points"] if p.get("ok") and (b := p.get("report_budget") or {})
              and b.get("met") is False and isinstance(b.get("achieved"), (int, float))]
    return table(["point", "params", "MACs", "latency ms", "latency", "cosine", "rel L2 max", "top-1", "verified"],
                 rows, align="lrrrrrrrl") + "".join(f"\nnote: {line}" for line in missed) + (
        f"\n\nbaseline latency {data['baseline']['latency_ms']:.3f} ms ({data['latency']['provider']}); "
        "params, MACs and latency as fractions of the original; cosine (outputs of more than one number), "
        "largest relative L2 and top-1 vs the original on "
        + ("the calibration's held-out samples" if any("held-out" in str((p.get("fidelity") or {}).get("inputs"))
                                                      for p in data["points"]) else "random inputs") + _noise_line(data["latency"].get("original_against_itself")))


def _noise_line(itself: float | None) -> str:
    """How far the timing moves on its own: the original timed against a second copy of itself."""
    if itself is None:
        return ""
    spread = abs(itself - 1.0)
    return (f"\nthe original timed against itself: {itself:.3f}x (latency ratios within {spread:.0%} of 1 are this "
            "machine's noise" + ("; give --threads, on a quiet machine" if spread > NOISY else "") + ")")


#: a spread of the original against itself above which the table advises a quieter measurement
NOISY = 0.05


def sweep_html(data: Mapping[str, Any], svg: str) -> str:
    """A self-contained page: the plot and the table."""
    import html

    from graphprune.html_report import STYLE

    table_text = summary_table(data)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>graphprune sweep"
            f"</title><style>{STYLE}</style></head><body><h1>graphprune sweep</h1>"
            f"<p class=\"note\">{html.escape(str(data['model']))} · {html.escape(data['engine'])}</p>"
            f"{svg}<pre>{html.escape(table_text)}</pre></body></html>\n")
