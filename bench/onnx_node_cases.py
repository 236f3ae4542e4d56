#!/usr/bin/env python3
"""Every operator test case of the installed ``onnx`` wheel, pruned.

``onnx.backend.test.case.node.collect_testcases()`` builds ONNX's own test models (about 1,900:
every operator, its expanded function bodies, old and new opsets) with their inputs and
expected outputs. Each case's inputs after the first become initializers and stop being graph
inputs (IR 4; weights, shapes, indices: what a real graph holds as constants), so the
preparation folds them and the analysis sees constants (``--inputs``: every input stays one;
``--fp16``: float32 constants and arithmetic converted to float16, inputs and outputs kept).
Then, in this process, each model is pruned twice:

* ``graphprune.prune(model, lossless=True)`` and ``graphprune.prune(model, ratio=0.5)``;
* the result runs in ONNX Runtime on the case's real first input. A lossless result must equal
  the original there (relative 1e-3, absolute 1e-4; float16 1e-2, 1e-3); a ratio prune changes what it computes
  wherever it removes something, so it counts as ``pruned`` when it differs.

What counts as a defect: an internal error (``crash``), exit 3 (a check failed), a written model
that does not run on the real input, a lossless result that differs. Exit 2 (the input refused
with its reason) and cases ONNX Runtime cannot run as given (``skip``) are listed, not defects.

    python bench/onnx_node_cases.py                  # ~1-2 min; bench/results/onnx_node_cases.json
    python bench/onnx_node_cases.py --inputs         # every input fed: onnx_node_cases_inputs.json
    python bench/onnx_node_cases.py --fp16           # float32 constants as float16: onnx_node_cases_fp16.json
    python bench/onnx_node_cases.py --only affine_grid
"""

from __future__ import annotations

import argparse
import collections
import json
import signal
import sys
import time
import warnings
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results" / "onnx_node_cases.json"
DEFECTS = ("crash", "exit 3", "timeout", "does not run", "lossless differs")


class _Timeout(Exception):
    pass


def _alarm(*_: object) -> None:
    raise _Timeout()


def _equal(a: object, b: object, half: bool = False) -> bool:
    """Equal outputs; floats within 1e-3 relative (float16 graphs: 1e-2, graphprune's own float16
    tolerance; ONNX Runtime picks another fp16 kernel where it knows more shapes)."""
    if isinstance(a, list) or isinstance(b, list):  # a sequence output
        return isinstance(a, list) and isinstance(b, list) and len(a) == len(b) and all(
            _equal(x, y, half) for x, y in zip(a, b, strict=True))
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        return False
    if a.dtype.kind in "fc":
        rtol, atol = (1e-2, 1e-3) if half else (1e-3, 1e-4)
        return bool(np.allclose(a, b, rtol=rtol, atol=atol, equal_nan=True))
    return bool(np.array_equal(a, b))


def _samples(feeds: dict[str, np.ndarray], count: int = 8) -> list[dict[str, np.ndarray]]:
    """Calibration samples near the case's own input: floats moved by 10 % noise, the rest as given."""
    rng = np.random.default_rng(0)

    def near(value: np.ndarray) -> np.ndarray:
        if value.dtype.kind != "f":
            return value
        scale = 0.1 * (float(np.abs(value).mean()) if value.size else 0.0) or 0.1
        return (value + scale * rng.standard_normal(value.shape)).astype(value.dtype)

    return [{name: near(value) for name, value in feeds.items()} for _ in range(count)]


def run_case(case: object, onnx: object, ort: object, graphprune: object, seconds: int,
             constants: bool = True, half: bool = False, calibrated: bool = False) -> dict[str, list[str]]:
    from onnx import numpy_helper

    from graphprune.errors import GraphPruneError

    inputs, _ = case.data_sets[0]
    model = onnx.ModelProto()
    model.CopyFrom(case.model)
    graph = model.graph
    if len(inputs) != len(graph.input) or not all(isinstance(x, np.ndarray) for x in inputs) \
            or not all(i.type.HasField("tensor_type") for i in graph.input):
        return {"": ["skip", "inputs that are not tensors"]}
    names = [i.name for i in graph.input]
    kept = 1 if constants else len(names)
    for name, value in zip(names[kept:], inputs[kept:], strict=True):
        if name:
            graph.initializer.append(numpy_helper.from_array(value, name))
    if len(graph.input) > kept:  # constants, not inputs that happen to have a default (IR 4 and later)
        del graph.input[kept:]
        model.ir_version = max(model.ir_version, 4)
    feeds = {n: v for n, v in zip(names[:kept], inputs[:kept], strict=True) if n}
    if half:  # float32 weights and arithmetic in float16, float32 inputs and outputs kept
        if not any(t.data_type == onnx.TensorProto.FLOAT for t in graph.initializer):
            return {"": ["skip", "no float32 constant to convert"]}
        from onnxruntime.transformers.float16 import convert_float_to_float16

        try:
            model = convert_float_to_float16(model, keep_io_types=True)
        except Exception as exc:
            return {"": ["skip", f"float16 conversion: {str(exc).splitlines()[0][:160]}"]}

    def run(m: object) -> list:
        return ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)

    try:
        reference = run(model)
    except Exception as exc:  # ONNX Runtime cannot run the case as given
        return {"": ["skip", f"ONNX Runtime: {str(exc).splitlines()[0][:160]}"]}
    out: dict[str, list[str]] = {}
    modes = (("lossless", {"lossless": True}), ("ratio", {"ratio": 0.5})) if not calibrated else \
        (("calibrated", {"ratio": 0.5, "calibration": _samples(feeds)}),)
    for mode, options in modes:
        signal.alarm(seconds)
        try:
            result = graphprune.prune(model, **options)
            signal.alarm(0)
            try:
                same = all(_equal(a, b, half) for a, b in zip(reference, run(result.model), strict=True))
                status = "ok" if same else ("lossless differs" if mode == "lossless" else "pruned")
                out[mode] = [status, ""]
            except Exception as exc:
                out[mode] = ["does not run", str(exc).splitlines()[0][:200]]
        except GraphPruneError as exc:
            signal.alarm(0)
            out[mode] = [f"exit {exc.exit_code}", str(exc).splitlines()[0][:200]]
        except _Timeout:
            out[mode] = ["timeout", f"over {seconds} s"]
        except Exception as exc:
            signal.alarm(0)
            out[mode] = ["crash", f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"]
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="cases whose name contains this")
    parser.add_argument("--seconds", type=int, default=120, help="time limit per prune")
    parser.add_argument("--inputs", action="store_true",
                        help="keep every input a graph input (verification feeds generated values to all)")
    parser.add_argument("--fp16", action="store_true",
                        help="cases with float32 constants converted to float16 (inputs and outputs kept float32)")
    parser.add_argument("--calibration", action="store_true",
                        help="a calibrated ratio prune instead (8 samples near the case's own input): statistics, "
                             "data-aware criteria, refit and fidelity on every case")
    parser.add_argument("--results", type=Path, default=None)
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    import onnx
    import onnxruntime as ort
    from onnx.backend.test.case.node import collect_testcases

    import graphprune

    ort.set_default_logger_severity(3)
    signal.signal(signal.SIGALRM, _alarm)
    cases = [c for c in collect_testcases() if c.kind == "node" and c.data_sets
             and (args.only is None or args.only in c.name)]
    started, rows = time.time(), {}
    for index, case in enumerate(cases):
        for mode, entry in run_case(case, onnx, ort, graphprune, args.seconds, not args.inputs, args.fp16,
                                     args.calibration).items():
            rows[f"{case.name} {mode}".strip()] = entry
            if entry[0] in DEFECTS or entry[0].startswith("exit 3"):
                print(f"[{index + 1}/{len(cases)}] {case.name} {mode}: {entry[0]} {entry[1]}", flush=True)
    counts = collections.Counter(v[0] for v in rows.values())
    summary = {"cases": len(cases), "inputs": "all graph inputs" if args.inputs else "the first; the others initializers",
               "float16": args.fp16, "calibrated": args.calibration,
               "runs (skip: per case)": dict(sorted(counts.items())),
               "defects": sum(n for k, n in counts.items() if k in DEFECTS),
               "onnx": onnx.__version__, "onnxruntime": ort.__version__,
               "wall_s": round(time.time() - started, 1)}
    suffix = ("_inputs" if args.inputs else "") + ("_fp16" if args.fp16 else "") + ("_calibrated" if args.calibration else "")
    results = args.results or RESULTS.with_name(f"onnx_node_cases{suffix}.json")
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps({"summary": summary, "rows": rows}, indent=0, sort_keys=True) + "\n")
    print(json.dumps(summary, indent=1))
    return 1 if summary["defects"] else 0


if __name__ == "__main__":
    sys.exit(main())
