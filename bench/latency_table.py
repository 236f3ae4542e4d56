#!/usr/bin/env python3
"""The per-operator latency table (graphprune.planning.latency) on ResNet-50: cost and accuracy.

Three parts, results merged into ``bench/results/latency_table.json``:

``table``     The table a budget run needs for ResNet-50: every node at full width, and
              every prunable node at a grid of widths (input and output channels each at
              1, 7/8, 3/4, 5/8, 1/2, 3/8, 1/4 of the original, plus the multiples of 8 and
              16 below an unaligned width), built by scaling the channel axes of the node's
              inputs. Measured into an empty cache folder (first run), then answered by a
              fresh table object from that folder (second run).
``alignment`` A 3x3 conv (C -> C channels, 56x56) at C = 256, 252, 250, 200, 192, 128.
``accuracy``  For a few zoo models pruned at ratio 0.3 and 0.5: the table's estimated
              latency ratio (pruned / original, sum over nodes) against the measured
              whole-model ratio (ONNX Runtime CPU, interleaved), and their correlation.

Run from the repository root (``PYTHONPATH=. python bench/latency_table.py [parts...]``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import graphprune  # noqa: E402
from graphprune.io.ir import prepare  # noqa: E402
from graphprune.io.model_io import default_opset, load_model  # noqa: E402
from graphprune.planning.latency import LatencyTable, OpSpec, static_shape  # noqa: E402
from graphprune.rules import registry  # noqa: E402
from graphprune.verify.timing import time_models  # noqa: E402

RESULTS = HERE / "results" / "latency_table.json"
RESNET50 = HERE / "cache" / "resnet50__torchscript.onnx"
FRACTIONS = (Fraction(1), Fraction(7, 8), Fraction(3, 4), Fraction(5, 8), Fraction(1, 2),
             Fraction(3, 8), Fraction(1, 4))
ACCURACY_MODELS = ("resnet50__torchscript", "mobilenet_v2__torchscript", "regnet_y_400mf__torchscript",
                   "efficientnet_b0__torchscript", "convnext_tiny__torchscript", "resnet18__dynamo")


def widths(full: int) -> list[int]:
    """Candidate widths of an axis of ``full`` channels (largest first)."""
    found = set()
    for fraction in FRACTIONS:
        width = max(1, round(full * fraction))
        found.add(width)
        for multiple in (8, 16):
            if width % multiple and width > multiple:
                found.add(width // multiple * multiple)
    return sorted(found, reverse=True)


def _graph(model) -> tuple[gs.Graph, int, onnx.ModelProto]:
    """The graph as graphprune analyses it (named nodes, constants folded, shapes inferred),
    its opset and the prepared model."""
    model = prepare(model)
    return gs.import_onnx(model), default_opset(model), model


def _scaled(node: gs.Node, axes: dict[str, dict[int, int]]) -> Callable[[gs.Tensor], list[int] | None]:
    """shape_of for ``node``: its static shapes with the given (tensor -> axis -> size) changes."""

    def shape_of(tensor: gs.Tensor) -> list[int] | None:
        shape = static_shape(tensor)
        if shape is None:
            return None
        for axis, size in axes.get(tensor.name, {}).items():
            shape[axis] = size
        return shape

    return shape_of


def grid_specs(node: gs.Node, opset: int) -> list[OpSpec]:
    """Specs of ``node`` at the candidate widths of its channels (empty: not prunable here)."""
    rule = registry.lookup(node.domain or "", node.op, opset)
    info = rule.linear(node) if rule is not None else None
    specs = []
    if info is not None and info.group == 1:
        data, weight = node.inputs[info.data], node.inputs[info.weight]
        data_shape, weight_shape = static_shape(data), static_shape(weight)
        if data_shape is None or weight_shape is None:
            return []
        bias = node.inputs[info.bias] if info.bias is not None and info.bias < len(node.inputs) else None
        for c_in in widths(data_shape[info.data_axis]):
            for c_out in widths(weight_shape[info.out_axis]):
                axes = {data.name: {info.data_axis: c_in}, weight.name: {info.in_axis: c_in, info.out_axis: c_out}}
                if bias is not None and not bias.is_empty():
                    axes[bias.name] = {0: c_out}
                spec = OpSpec.from_node(node, _scaled(node, axes), opset)
                if spec is not None:
                    specs.append(spec)
        return specs
    if info is not None:
        return []  # grouped convs: the width decides the group count (left to the planner)
    first = static_shape(node.inputs[0]) if node.inputs else None
    if first is None or len(first) < 2:
        return []
    channels = first[1]
    for width in widths(channels):
        axes: dict[str, dict[int, int]] = {}
        for tensor in node.inputs:
            shape = static_shape(tensor) if not tensor.is_empty() else None
            if shape and len(shape) >= 3 and shape[-3] == channels and len(shape) <= len(first):
                axes[tensor.name] = {len(shape) - len(first) + 1: width}
        spec = OpSpec.from_node(node, _scaled(node, axes), opset)
        if spec is not None:
            specs.append(spec)
    return specs


def part_table(model_path: Path, repeats: int | None = None) -> dict:
    graph, opset, _ = _graph(load_model(model_path))
    specs = []
    for node in graph.nodes:
        full = OpSpec.from_node(node, static_shape, opset)
        if full is not None:
            specs.append(full)
        specs.extend(grid_specs(node, opset))
    unique = len({spec.key for spec in specs})
    with tempfile.TemporaryDirectory(prefix="latency-cache-") as folder:
        options = {} if repeats is None else {"repeats": repeats}
        first = LatencyTable(cache_dir=folder, **options)
        start = time.perf_counter()
        seconds_first = first.latency(specs)
        first_s = time.perf_counter() - start
        second = LatencyTable(cache_dir=folder, **options)  # a fresh object: answers come from the file
        start = time.perf_counter()
        seconds_second = second.latency(specs)
        second_s = time.perf_counter() - start
        cache_bytes = second.cache_path.stat().st_size
    assert np.array_equal(seconds_first, seconds_second)
    result = {
        "model": model_path.name, "repeats": first.repeats, "nodes": len(graph.nodes), "specs": len(specs), "unique_specs": unique,
        "first_run_s": round(first_s, 2), "first_run_stats": first.stats,
        "second_run_s": round(second_s, 3), "second_run_stats": second.stats,
        "cache_file_bytes": cache_bytes,
    }
    print(json.dumps(result, indent=1))
    return result


def part_alignment(channels=(256, 252, 250, 200, 192, 128), size: int = 56, threads: int | None = None) -> dict:
    import onnx
    from onnx import TensorProto, helper

    rows = []
    table = LatencyTable(threads=threads, cache_dir=tempfile.mkdtemp(prefix="latency-align-"), repeats=9)
    specs = []
    for width in channels:
        weight = gs.Constant("w", np.zeros((width, width, 3, 3), np.float32))
        data = gs.Variable("x", np.float32, (1, width, size, size))
        node = gs.Node("Conv", "conv", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, inputs=[data, weight],
                       outputs=[gs.Variable("y", np.float32)])
        specs.append(OpSpec.from_node(node, static_shape, 17))
    seconds = table.latency(specs)
    # the same convs as whole one-node models, timed interleaved, to check the table
    models = []
    for width in channels:
        conv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[3, 3], pads=[1, 1, 1, 1])
        w = onnx.numpy_helper.from_array(np.random.default_rng(0).standard_normal((width, width, 3, 3), np.float32), "w")
        g = helper.make_graph([conv], f"conv{width}", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, width, size, size])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w])
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        models.append(m)
    whole = time_models(models, runs=15, warmup=3, threads=threads)
    for width, value, timing in zip(channels, seconds, whole, strict=True):
        macs = width * width * 9 * size * size
        rows.append({"channels": width, "table_ms": round(value * 1e3, 2), "model_ms": round(timing.median_ms, 2),
                     "table_gmacs_per_s": round(macs / value / 1e9, 1)})
    print(json.dumps(rows, indent=1))
    return {"conv": f"3x3, C -> C, 1xCx{size}x{size}, pads 1", "threads": threads, "rows": rows}


def part_accuracy(names=ACCURACY_MODELS, ratios=(0.3, 0.5), runs: int = 15, threads: int | None = None,
                  statistic: str = "min", repeats: int = 7) -> dict:
    rows = []
    for name in names:
        path = HERE / "cache" / f"{name}.onnx"
        if not path.exists():
            continue
        original = load_model(path)
        pruned = [graphprune.prune(original, ratio=ratio, criterion="l1").model for ratio in ratios]
        graphs = [_graph(model) for model in (original, *pruned)]
        table = LatencyTable(threads=threads, cache_dir=tempfile.mkdtemp(prefix="latency-acc-"), repeats=repeats,
                             statistic=statistic)
        # every variant's specs in the same sessions: measured side by side
        all_specs = [[s for s in (OpSpec.from_node(n, static_shape, opset) for n in graph.nodes) if s is not None]
                     for graph, opset, _ in graphs]
        table.latency([spec for specs in all_specs for spec in specs])
        plain = [table.estimate(graph, static_shape, opset) for graph, opset, _ in graphs]
        # each variant's own fused groups (pruning keeps the op patterns)
        estimates = [table.estimate(graph, static_shape, opset, table.fusions(model))
                     for graph, opset, model in graphs]
        timings = time_models([original, *pruned], runs=runs, warmup=3, threads=threads)
        for ratio, estimate, unfused, timing in zip(ratios, estimates[1:], plain[1:], timings[1:], strict=True):
            rows.append({"model": name, "ratio": ratio,
                         "estimated_ratio": round(estimate / estimates[0], 3),
                         "unfused_ratio": round(unfused / plain[0], 3),
                         "measured_ratio": round(timing.median_ms / timings[0].median_ms, 3),
                         "estimated_ms": round(estimate * 1e3, 2), "measured_ms": round(timing.median_ms, 2),
                         "original_estimated_ms": round(estimates[0] * 1e3, 2),
                         "original_measured_ms": round(timings[0].median_ms, 2),
                         "untimed": len(table.untimed)})
            print(json.dumps(rows[-1]))
    estimated = np.array([row["estimated_ratio"] for row in rows])
    measured = np.array([row["measured_ratio"] for row in rows])
    unfused = np.array([row["unfused_ratio"] for row in rows])
    summary = {
        "pearson_r": round(float(np.corrcoef(estimated, measured)[0, 1]), 3) if len(rows) > 2 else None,
        "pearson_r_unfused": round(float(np.corrcoef(unfused, measured)[0, 1]), 3) if len(rows) > 2 else None,
        "median_abs_error_unfused": round(float(np.median(np.abs(unfused - measured))), 3) if rows else None,
        "median_abs_error": round(float(np.median(np.abs(estimated - measured))), 3) if rows else None,
        "max_abs_error": round(float(np.max(np.abs(estimated - measured))), 3) if rows else None,
    }
    print(json.dumps(summary))
    return {"threads": threads, "statistic": statistic, "repeats": repeats, "rows": rows, "summary": summary}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("parts", nargs="*", default=["table", "alignment", "accuracy"],
                        choices=["table", "alignment", "accuracy"])
    parser.add_argument("--model", type=Path, default=RESNET50)
    parser.add_argument("--only", nargs="*", help="accuracy: these zoo entries")
    parser.add_argument("--threads", type=int, default=None, help="ORT intra-op threads (default: ORT's)")
    parser.add_argument("--statistic", default="min", choices=["min", "median", "mean"])
    parser.add_argument("--repeats", type=int, default=None, help="timed runs (table: LatencyTable's default; accuracy: 7)")
    args = parser.parse_args(argv)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for part in args.parts:
        if part == "table":
            results["table"] = part_table(args.model, args.repeats)
        elif part == "alignment":
            results[f"alignment_threads{args.threads or 'default'}"] = part_alignment(threads=args.threads)
        else:
            repeats = args.repeats or 7
            key = f"accuracy_threads{args.threads or 'default'}_{args.statistic}" + ("" if repeats == 7 else f"_x{repeats}")
            results[key] = part_accuracy(tuple(args.only) if args.only else ACCURACY_MODELS, threads=args.threads,
                                         statistic=args.statistic, repeats=repeats)
    results["machine"] = LatencyTable().fingerprint
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
