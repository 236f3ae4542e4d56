#!/usr/bin/env python3
"""MACs targets on the real-model corpus, counted from outside.

For each entry of ``bench/real_corpus.py`` (fetched into ``bench/cache/real/``), in its own
process with a timeout::

    graphprune.prune(path, target_macs=T)          # data-free, verified against the zeroed original

then the MAC fraction is counted **independently** of graphprune's counter: the original and
the pruned model run in ONNX Runtime (no graph optimisation) on the entry's own probe feed
(``real_corpus.probe_feeds``: its real input sizes, e.g. 48x320 for a text recogniser, not the
sizes graphprune counted at), with every intermediate tensor of the main graph exposed, and
the multiply-accumulates of Conv / ConvTranspose / Gemm / MatMul, their integer forms
(ConvInteger, QLinearConv, MatMulInteger, QLinearMatMul) and LSTM / GRU / RNN (steps x batch x
directions x (W rows x inputs + R rows x hidden)) come from the shapes it computed. An ``If``
is replaced by the branch its condition takes on the feed (evaluated by ONNX Runtime; nested
ones too) before counting, so the work of the branch that runs is counted (graphprune counts
the costlier branch). Work inside ``Loop`` bodies and in contrib kernels
(``DynamicQuantizeLSTM``, ``MatMulNBits``) is not counted by this counter (``indep_note`` says
so where the graph has any): on those entries graphprune's own count (which lowers
recurrences and counts the contrib ops) is the better one.

    python bench/budget_real.py                      # ~15 min on 2 CPU cores, target 0.5
    python bench/budget_real.py --target 0.7 --only ppocrv4_rec,ddddocr_crnn_lstm
    python bench/budget_real.py --given-shapes --only silero_vad_v6   # as a user who gives the sizes

Results: ``bench/results/budget_real.json`` (rows merged per entry and target) and a summary;
with ``--given-shapes`` (graphprune is given the probe feed's shapes, ``--input-shape``, for the
inputs that leave sizes open) ``bench/results/budget_real_given.json``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the checkout's graphprune, whatever is installed
from real_corpus import BY_NAME, CORPUS, model_path, probe_feeds  # noqa: E402

RESULTS = HERE / "results" / "budget_real.json"
#: op types whose work this counter does not see (subgraphs, contrib kernels)
UNSEEN = {"Loop", "Scan", "DynamicQuantizeLSTM", "MatMulNBits", "Attention", "DynamicQuantizeMatMul",
          "MatMulIntegerToFloat", "QAttention", "FusedConv", "FusedMatMul", "FusedGemm"}


def taken_branches(model, feed: dict):
    """``model`` with every ``If`` replaced by the nodes of the branch its condition takes on
    ``feed`` (then an ``Identity`` per output), repeated until none is left."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    flat = onnx.ModelProto()
    flat.CopyFrom(model)
    for _ in range(16):
        ifs = [n for n in flat.graph.node if n.op_type == "If"]
        if not ifs:
            break
        constants = {t.name: numpy_helper.to_array(t) for t in flat.graph.initializer}
        probe = onnx.ModelProto()
        probe.CopyFrom(flat)
        asked = [n.input[0] for n in ifs if n.input[0] not in feed and n.input[0] not in constants]
        del probe.graph.output[:]
        probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in asked)
        values = dict(feed)
        values.update(constants)
        if asked:
            options = ort.SessionOptions()
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            options.log_severity_level = 4
            session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
            inputs = {i.name for i in session.get_inputs()}
            values.update(zip(asked, session.run(asked, {k: v for k, v in feed.items() if k in inputs}), strict=True))
        nodes = []
        for node in flat.graph.node:
            if node.op_type != "If":
                nodes.append(node)
                continue
            attr = "then_branch" if bool(np.asarray(values[node.input[0]]).reshape(-1)[0]) else "else_branch"
            branch = next(a.g for a in node.attribute if a.name == attr)
            nodes.extend(branch.node)
            flat.graph.initializer.extend(branch.initializer)
            nodes.extend(helper.make_node("Identity", [out.name], [name])
                         for out, name in zip(branch.output, node.output, strict=True) if name)
        del flat.graph.node[:]
        flat.graph.node.extend(nodes)
    return flat


def independent_macs(model, feed: dict) -> int:
    """Multiply-accumulates of ``model`` on ``feed`` from the shapes ONNX Runtime computes."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    weights = {i.name: tuple(i.dims) for i in probe.graph.initializer}
    exposed = {o.name for o in probe.graph.output}
    for node in probe.graph.node:
        for name in node.output:
            if name and name not in exposed:
                probe.graph.output.append(helper.make_empty_tensor_value_info(name))
                exposed.add(name)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 4
    session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
    values = dict(zip([o.name for o in session.get_outputs()], session.run(None, feed), strict=True))

    def shape(name: str) -> tuple[int, ...]:
        if name in weights:
            return weights[name]
        return tuple(np.shape(feed[name] if name in feed else values[name]))

    total = 0
    for node in probe.graph.node:
        op = node.op_type
        if op in ("Conv", "ConvInteger", "QLinearConv"):
            w = shape(node.input[3] if op == "QLinearConv" else node.input[1])
            total += int(np.prod(shape(node.output[0]))) * int(np.prod(w[1:]))
        elif op == "ConvTranspose":
            total += int(np.prod(shape(node.input[0]))) * int(np.prod(shape(node.input[1])[1:]))
        elif op in ("MatMul", "Gemm", "MatMulInteger", "QLinearMatMul"):
            a = shape(node.input[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            total += int(np.prod(shape(node.output[0]))) * int(a[0] if trans_a else a[-1])
        elif op in ("LSTM", "GRU", "RNN"):
            x, w, r = shape(node.input[0]), shape(node.input[1]), shape(node.input[2])
            total += int(x[0] * x[1] * w[0] * (w[1] * w[2] + r[1] * r[2]))
    return total


def open_inputs(model) -> set[str]:
    """Graph inputs with a dimension left open (a symbol, -1 or nothing)."""
    inits = {i.name for i in model.graph.initializer}
    found = set()
    for value in model.graph.input:
        if value.name in inits or not value.type.HasField("tensor_type"):
            continue
        dims = value.type.tensor_type.shape.dim
        if not value.type.tensor_type.HasField("shape") or any(not d.HasField("dim_value") or d.dim_value < 0
                                                                for d in dims):
            found.add(value.name)
    return found


def worker(name: str, target: float, given_shapes: bool = False) -> dict:
    import numpy as np
    import onnx

    import graphprune

    path = model_path(name)
    original = onnx.load(str(path))
    feed = probe_feeds(original, BY_NAME[name].probe, seed=1, count=1)[0]
    row: dict = {"entry": name, "target": target, "feed": {k: list(v.shape) for k, v in feed.items()}}
    given = ({k: list(v.shape) for k, v in feed.items() if k in open_inputs(original) and np.ndim(v)}
             if given_shapes else None)
    if given:
        row["given_shapes"] = given
    try:
        result = graphprune.prune(str(path), target_macs=target, input_shapes=given or None)
    except Exception as exc:  # a GraphPruneError is a clean refusal, anything else a crash
        row.update(ok=False, crash=not isinstance(exc, graphprune.GraphPruneError),
                   error=f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:300]}")
        return row
    report, budget = result.report, result.report.get("budget") or {}
    flat = taken_branches(original, feed)
    before, after = independent_macs(flat, feed), independent_macs(taken_branches(result.model, feed), feed)
    unseen = sorted({n.op_type for n in flat.graph.node} & UNSEEN)
    row.update(ok=True, verified=bool((report.get("verification") or {}).get("ok")),
               achieved=budget.get("achieved"), met=budget.get("met"), measured_by=budget.get("measured_by"),
               counted_at=report.get("macs_input_shapes"), indep_macs_before=before,
               indep_fraction=round(after / before, 4) if before else None)
    if unseen:
        row["indep_note"] = "this counter does not see " + ", ".join(unseen)
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated entry names")
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--timeout", type=int, default=600)
    parser.add_argument("--given-shapes", action="store_true",
                        help="give graphprune the probe feed's shapes of the inputs with open sizes")
    parser.add_argument("--worker", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print("ROW " + json.dumps(worker(args.worker, args.target, args.given_shapes), default=str))
        return 0
    results = RESULTS.with_name("budget_real_given.json") if args.given_shapes else RESULTS
    names = [n for n in args.only.split(",") if n] or [e.name for e in CORPUS if model_path(e.name).exists()]
    rows = []
    for name in names:
        cmd = ["nice", "-n", "10", sys.executable, __file__, "--worker", name, "--target", str(args.target),
               *(["--given-shapes"] if args.given_shapes else [])]
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout).stdout
            found = [line[4:] for line in out.splitlines() if line.startswith("ROW ")]
            row = json.loads(found[-1]) if found else {"entry": name, "target": args.target, "ok": False,
                                                       "crash": True, "error": "no result (the worker died)"}
        except subprocess.TimeoutExpired:
            row = {"entry": name, "target": args.target, "ok": False, "crash": False,
                   "error": f"timeout {args.timeout} s"}
        rows.append(row)
        print(json.dumps(row, default=str), flush=True)
    old = json.loads(results.read_text()).get("rows", []) if results.exists() else []
    fresh = {(r["entry"], r["target"]): r for r in rows}
    merged = [fresh.pop((r["entry"], r["target"]), r) for r in old] + list(fresh.values())
    summary = {}
    for target in sorted({r["target"] for r in merged}):
        these = [r for r in merged if r["target"] == target]
        seen = [r for r in these if r.get("indep_fraction") is not None and "indep_note" not in r]
        summary[str(target)] = {
            "entries": len(these), "valid_and_verified": sum(bool(r.get("ok") and r.get("verified")) for r in these),
            "met_by_own_count": sum(bool(r.get("met")) for r in these),
            "independently_counted": len(seen),
            "within_0.03_independently": sum(abs(r["indep_fraction"] - target) <= 0.03 for r in seen),
            "crashes": sum(bool(r.get("crash")) for r in these)}
    print(json.dumps(summary))
    results.parent.mkdir(parents=True, exist_ok=True)
    command = "python bench/budget_real.py" + (" --given-shapes" if args.given_shapes else "")
    results.write_text(json.dumps({"command": command, "summary": summary, "rows": merged}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
