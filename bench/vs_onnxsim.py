#!/usr/bin/env python3
"""graphprune side by side with onnxsim 0.8's structured pruning on real third-party files.

For each entry of the real-model corpus (``bench/real_corpus.py``: paddle2onnx OCR and
layout models, YOLO detectors, CRNNs with LSTMs, Silero VAD with ``If``, openWakeWord,
skl2onnx and Keras models, int8/QDQ/QOperator/fp16 MiniLMs and PP-LCNets), in its own
subprocess with a timeout:

1. ``onnxsim``: ``onnxsim.pruning.apply_structured_pruning(model, sparsity=0.5)`` (L2, data
   free), or the format-specific function for quantized graphs
   (``apply_structured_pruning_qdq`` / ``_qoperator`` / ``_dynamic_quantize_matmul`` /
   ``_dynamic_quantize_conv``: each is tried where the plain function changes nothing);
2. ``graphprune``: ``graphprune.prune(path, ratio=0.5)`` (data free, verified);
3. ``graphprune at onnxsim's MACs``: ``graphprune.prune(path, target_macs=F)`` with F the
   MAC fraction onnxsim reached, where it reduced the MACs at all (equal cost).

Every output is checked the same way: ``onnx.checker`` (full), an ONNX Runtime session, the
same output shapes as the original on the entry's probe feeds; MACs and parameters by one
counter for all (``graphprune.verify.metrics`` on the model with its inputs fixed at the probe
shapes and its shapes inferred); fidelity to the original (mean cosine of the outputs over 4
random probe feeds: the corpus ships no real inputs, so this is a weak figure — see
``bench/calibration_ocr_det.py`` and ``bench/calibration_minilm.py`` for real data).

    .venv-bench/bin/python bench/vs_onnxsim.py                   # needs onnxsim==0.8.1; ~6 min
    .venv-bench/bin/python bench/vs_onnxsim.py --only ppocrv4_det,minilm_l6_qdq
    .venv-bench/bin/python bench/vs_onnxsim.py --digits          # the Keras digits CNN on real digits

``--digits``: the corpus's Keras digits CNN (tf2onnx, BatchNorm, a residual add) on
scikit-learn's digits, 256 images for calibration and the other 1,541 for evaluation: onnxsim
L2 and calibrated Wanda at sparsities 0.3 and 0.5, graphprune data-free and calibrated at the
MACs onnxsim reached, and graphprune's own ratio prunes; top-1 agreement with the original
and accuracy on the evaluation images (``bench/results/vs_onnxsim_digits.json``).

Results: ``bench/results/vs_onnxsim.json``; the table is in ``docs/vs_onnxsim.md``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the checkout's graphprune, whatever is installed
from real_corpus import BY_NAME, CORPUS, model_path, probe_feeds  # noqa: E402

RESULTS = HERE / "results" / "vs_onnxsim.json"
SPARSITY = 0.5
QUANTIZED = ("apply_structured_pruning_qdq", "apply_structured_pruning_qoperator",
             "apply_structured_pruning_dynamic_quantize_matmul", "apply_structured_pruning_dynamic_quantize_conv")


def _first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _cost(model, shapes: dict) -> tuple[int | None, int]:
    """MACs at the probe shapes and parameters, the same counter for every output (an ``If``
    by its costlier branch). No MACs for a graph with a loop (``Loop``/``Scan``): the counter
    does not read their bodies, and a rewrite that unrolls one would look like more work."""
    import onnx

    from graphprune.verify.metrics import count_params as params_of

    if any(n.op_type in ("Loop", "Scan") for n in model.graph.node):
        return None, params_of(model)

    from graphprune.io import model_io
    from graphprune.verify.metrics import count_macs, count_params

    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for value in fixed.graph.input:
        shape = shapes.get(value.name)
        if shape is None or not value.type.HasField("tensor_type"):
            continue
        value.type.tensor_type.shape.ClearField("dim")
        for size in shape:
            value.type.tensor_type.shape.dim.add().dim_value = int(size)
    del fixed.graph.value_info[:]
    for value in fixed.graph.output:
        if value.type.HasField("tensor_type"):
            value.type.tensor_type.ClearField("shape")
    # input_shapes: sizes that ONNX inference leaves open are folded at these (a computed Reshape)
    return count_macs(model_io.infer_shapes(fixed), input_shapes=shapes), count_params(model)


def _outputs(model, feeds: list[dict]) -> list[list]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]
    return [sess.run(None, {k: v for k, v in feed.items() if k in names}) for feed in feeds]


def _cosine(reference: list[list], candidate: list[list]) -> float | None:
    import numpy as np

    values = []
    for ref, cand in zip(reference, candidate, strict=True):
        for a, b in zip(ref, cand, strict=True):
            a, b = np.asarray(a), np.asarray(b)
            if not np.issubdtype(a.dtype, np.floating) or a.shape != b.shape or not a.size:
                continue
            a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
            norm = np.linalg.norm(a) * np.linalg.norm(b)
            values.append(float(a @ b / norm) if norm > 0 else float(np.allclose(a, b)))
    return round(float(np.mean(values)), 4) if values else None


def _judge(model, original, feeds: list[dict], reference: list[list], base: tuple[int, int], shapes: dict,
           started: float) -> dict:
    import onnx

    row: dict = {"seconds": round(time.perf_counter() - started, 1)}
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.onnx"
        onnx.save(model, path)
        try:
            onnx.checker.check_model(str(path), full_check=True)
            row["checker"] = True
        except Exception as exc:
            row["checker"] = False
            row["checker_error"] = _first_line(exc)
    try:
        outputs = _outputs(model, feeds)
    except Exception as exc:
        return {**row, "valid": False, "error": _first_line(exc)}
    same = all(len(a) == len(b) and all(getattr(x, "shape", None) == getattr(y, "shape", None)
                                        for x, y in zip(a, b, strict=True)) for a, b in zip(reference, outputs, strict=True))
    macs, params = _cost(model, shapes)
    row.update(valid=bool(row["checker"] and same), same_output_shapes=same,
               macs_ratio=round(macs / base[0], 4) if base[0] and macs is not None else None,
               params_ratio=round(params / base[1], 4) if base[1] else None,
               cosine=_cosine(reference, outputs))
    return row


def worker(name: str) -> dict:
    import onnx
    import onnxsim.pruning as pruning

    import graphprune

    path = str(model_path(name))
    original = onnx.load(path)
    feeds = probe_feeds(original, BY_NAME[name].probe, seed=3, count=4)
    shapes = {k: tuple(v.shape) for k, v in feeds[0].items()}
    reference = _outputs(original, feeds)
    base = _cost(original, shapes)
    row: dict = {"entry": name, "macs": base[0], "params": base[1]}

    from graphprune.verify.metrics import count_params

    started = time.perf_counter()
    result = None
    for function in ("apply_structured_pruning", *QUANTIZED):
        try:
            candidate = getattr(pruning, function)(original, sparsity=SPARSITY)
        except Exception as exc:
            row.setdefault("onnxsim_errors", {})[function] = _first_line(exc)
            continue
        changed = count_params(candidate) < count_params(original)
        if changed or result is None:
            result = (function, candidate)
        if changed:
            break
    if result is None:
        row["onnxsim"] = {"valid": False, "error": "every function raised"}
    else:
        row["onnxsim"] = {"function": result[0], **_judge(result[1], original, feeds, reference, base, shapes, started)}

    def ours(**options) -> dict:
        started = time.perf_counter()
        try:  # at the probe shapes; where verification's random values cannot run there (a
            # sample-rate input choosing a branch), at the sizes graphprune chooses itself
            try:
                pruned = graphprune.prune(path, input_shapes=shapes, **options)
            except graphprune.GraphPruneError:
                pruned = graphprune.prune(path, **options)
        except Exception as exc:
            return {"valid": False, "error": _first_line(exc)}
        judged = _judge(pruned.model, original, feeds, reference, base, shapes, started)
        return {**judged, "verified": bool(pruned.report["verification"].get("ok"))}

    row["graphprune"] = ours(ratio=SPARSITY)
    fraction = row["onnxsim"].get("macs_ratio")
    if fraction is not None and fraction < 0.999:
        row["graphprune_at_onnxsim_macs"] = ours(target_macs=fraction)
    return row


def run_one(name: str, timeout: int) -> dict:
    try:
        done = subprocess.run([sys.executable, __file__, "--worker", name], capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"entry": name, "error": f"timeout after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if not lines:
        return {"entry": name, "error": (done.stderr.strip().splitlines() or ["no output"])[-1][:300]}
    return json.loads(lines[-1])


def summary(rows: list[dict]) -> dict:
    def reduced(part: dict | None) -> bool:
        return bool(part and part.get("valid") and (part.get("macs_ratio") or 1.0) < 0.999)

    both = [r for r in rows if "graphprune_at_onnxsim_macs" in r]
    better = sum(1 for r in both if reduced(r["graphprune_at_onnxsim_macs"])
                 and (r["graphprune_at_onnxsim_macs"].get("cosine") or 0) >= (r["onnxsim"].get("cosine") or 0))
    return {
        "entries": len(rows),
        "onnxsim_valid": sum(1 for r in rows if (r.get("onnxsim") or {}).get("valid")),
        "onnxsim_reduced_macs": sum(1 for r in rows if reduced(r.get("onnxsim"))),
        "graphprune_valid": sum(1 for r in rows if (r.get("graphprune") or {}).get("valid")),
        "graphprune_reduced_macs": sum(1 for r in rows if reduced(r.get("graphprune"))),
        "equal_macs_pairs": len(both),
        "equal_macs_graphprune_cosine_at_least_onnxsim": better,
    }


def digits() -> list[dict]:
    import numpy as np
    import onnx
    import onnxsim.pruning as pruning
    from sklearn.datasets import load_digits

    import graphprune

    data = load_digits()
    images = (data.images / 16.0).astype(np.float32)[..., None]  # NHWC, as trained
    order = np.random.default_rng(0).permutation(len(images))
    calib, held = order[:256], order[256:]
    name = "keras_digits_cnn"
    path = str(model_path(name))
    original = onnx.load(path)
    shapes = {"image": (1, 8, 8, 1)}
    base = _cost(original, shapes)

    def logits(model) -> np.ndarray:
        import onnxruntime as ort

        sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return sess.run(None, {"image": images[held]})[0]

    reference = logits(original).argmax(1)
    feeds = [{"image": images[i : i + 1]} for i in calib]
    rows = []

    def judge(kind: str, level: float, model, started: float, **extra) -> dict:
        macs, params = _cost(model, shapes)
        top1 = logits(model).argmax(1)
        row = {"model": name, "sparsity": level, "run": kind, "macs_ratio": round(macs / base[0], 4),
               "params_ratio": round(params / base[1], 4),
               "top1_agreement": round(float((top1 == reference).mean()), 4),
               "accuracy": round(float((top1 == data.target[held]).mean()), 4),
               "seconds": round(time.perf_counter() - started, 1), **extra}
        print(json.dumps(row), flush=True)
        rows.append(row)
        return row

    started = time.perf_counter()
    judge("original", 0.0, original, started)
    for level in (0.3, 0.5):
        for kind, function, extra in (("onnxsim l2", pruning.apply_structured_pruning, {}),
                                      ("onnxsim wanda", pruning.apply_structured_wanda_pruning,
                                       {"calibration_data": feeds})):
            started = time.perf_counter()
            row = judge(kind, level, function(original, sparsity=level, **extra), started)
            if row["macs_ratio"] < 0.999:
                for label, options in (("data-free", {}), ("calibrated", {"calibration": feeds})):
                    started = time.perf_counter()
                    result = graphprune.prune(path, target_macs=row["macs_ratio"], **options)
                    judge(f"graphprune {label} at {kind}'s MACs", level, result.model, started,
                          verified=bool(result.report["verification"]["ok"]))
        for label, options in (("data-free", {}), ("calibrated", {"calibration": feeds})):
            started = time.perf_counter()
            result = graphprune.prune(path, ratio=level, **options)
            judge(f"graphprune {label}, ratio", level, result.model, started,
                  verified=bool(result.report["verification"]["ok"]))
    (HERE / "results" / "vs_onnxsim_digits.json").write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return rows


def _cell(part: dict | None, *, function: bool = False, digits: int = 3) -> str:
    """One table cell: ``function · valid · MACs · params · cosine`` (the function for onnxsim)."""
    if not part:
        return "—"
    head = [part.get("function", "").replace("apply_structured_pruning", "").lstrip("_") or "plain"] if function else []
    if not part.get("valid"):
        why = part.get("error") or part.get("checker_error") or ""
        return " · ".join([*head, f"**invalid**: {why[:60]}"])

    def number(key: str, places: int = 3) -> str:
        value = part.get(key)
        return "n/a" if value is None else f"{value:.{places}f}"

    return " · ".join([*head, "✓", number("macs_ratio"), number("params_ratio"), number("cosine", digits)])


def markdown(rows: list[dict]) -> str:
    """The per-entry table of ``docs/vs_onnxsim.md``."""
    lines = ["| entry | onnxsim: function · valid · MACs · params · cosine | graphprune `ratio=0.5`: valid · MACs · "
             "params · cosine | graphprune at onnxsim's MACs: MACs · params · cosine |", "|---|---|---|---|"]
    for row in rows:
        at = row.get("graphprune_at_onnxsim_macs")
        at_cell = "—" if not at else " · ".join(_cell(at, digits=4).split(" · ")[1:]) if at.get("valid") else _cell(at)
        lines.append(f"| {row['entry']} | {_cell(row.get('onnxsim'), function=True)} | {_cell(row.get('graphprune'))} "
                     f"| {at_cell} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--digits", action="store_true", help="the Keras digits CNN on real digits")
    parser.add_argument("--markdown", action="store_true", help="print the table of the results file (--only: those rows)")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.markdown:
        rows = json.loads(RESULTS.read_text())["rows"]
        wanted = set(args.only.split(",")) if args.only else None
        print(markdown([r for r in rows if wanted is None or r["entry"] in wanted]))
        return 0
    if args.digits:
        digits()
        return 0
    if args.worker:
        print(json.dumps(worker(args.worker)), flush=True)
        return 0
    names = args.only.split(",") if args.only else [e.name for e in CORPUS]
    rows = []
    for name in names:
        row = run_one(name, args.timeout)
        print(json.dumps(row), flush=True)
        rows.append(row)
    merged = {r["entry"]: r for r in (json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() and args.only else [])}
    merged.update({r["entry"]: r for r in rows})
    ordered = [merged[e.name] for e in CORPUS if e.name in merged]
    RESULTS.write_text(json.dumps({"summary": summary(ordered), "rows": ordered}, indent=1) + "\n")
    print(json.dumps(summary(ordered)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
