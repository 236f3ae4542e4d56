"""MACs / latency budgets on the project's zoo, checked from outside.

For every cached export (``bench/cache/*.onnx``: CNNs from torchvision/timm/segmentation,
both torch exporters and ONNX-zoo files; ``bench/cache/transformers/*.onnx``), runs

    graphprune prune M.onnx -o P.onnx --target-macs T --report R.json     (T = 0.5, 0.7)

in a fresh process with a timeout, then checks the output itself: ``onnx.checker`` (full,
by path), an ONNX Runtime run, and the MAC fraction counted by **onnx-tool** (an
independent counter: ``onnx_tool.Model(...).graph.profile()``, same input shapes for both
models; the multiply-accumulates of Conv/ConvTranspose/Gemm/MatMul/Einsum nodes, the
definition graphprune's MAC target uses), within +-0.03 of the target. onnx-tool's total
over all operators (elementwise ops weighted by its own per-element costs, e.g. 33 for a
Sigmoid element) is recorded beside it. ``--latency`` runs ``--target-latency 0.5`` on the
latency set of issue 10 and times original vs pruned interleaved (median of 30, ORT CPU).

    .venv-bench/bin/python bench/budget_zoo.py                   # MACs, whole zoo
    .venv-bench/bin/python bench/budget_zoo.py --latency         # latency set
    .venv-bench/bin/python bench/budget_zoo.py --only resnet18,vit_b_16

Results: ``bench/results/budget_zoo.json`` (merged per key) and a table on stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results" / "budget_zoo.json"

LATENCY_SET = ("resnet50", "resnext50_32x4d", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
               "regnet_y_400mf", "densenet121", "convnext_tiny", "ghostnet_100", "vit_b_16")


def models(only: list[str] | None) -> list[Path]:
    found = sorted(CACHE.glob("*.onnx")) + sorted((CACHE / "transformers").glob("*.onnx"))
    if only:
        found = [p for p in found if any(p.name.startswith(o + "__") or p.stem == o for o in only)]
    return found


def _shapes(path: Path) -> dict[str, np.ndarray]:
    """Inputs for onnx-tool: graphprune's own feeds (dynamic dims resolved the same way)."""
    import onnx

    from graphprune.io.feeds import make_feeds

    model = onnx.load(str(path), load_external_data=False)
    return make_feeds(model, count=1, seed=0, batch=1)[0]


#: the operators whose multiply-accumulates graphprune's MAC definition counts
MAC_OPS = ("Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum")


def tool_macs(path: Path, feeds: dict[str, np.ndarray]) -> tuple[float, float]:
    """onnx-tool's counts: (multiply-accumulates of the MAC operators, all operators
    including its elementwise op weights, e.g. 33 per Sigmoid element)."""
    import onnx_tool

    m = onnx_tool.Model(str(path))
    g = m.graph
    g.graph_reorder_nodes()
    g.shape_infer(feeds)
    g.profile()
    total = mac = 0.0
    for node in g.nodemap.values():
        value = float(np.sum(node.macs))
        total += value
        if node.op_type in MAC_OPS:
            mac += value
    return mac, total


def shape_macs(path: Path, feeds: dict[str, np.ndarray]) -> float:
    """Second independent counter, for graphs onnx-tool cannot profile (ORT-fused ops,
    some dynamo exports): ONNX Runtime's symbolic shape inference with the inputs fixed to
    the feeds' shapes, then Conv / ConvTranspose / Gemm / MatMul / com.microsoft
    FusedMatMul and Attention (its QKV projection) from the inferred shapes."""
    import math

    import onnx
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = onnx.load(str(path))
    for inp in model.graph.input:
        if inp.name in feeds:
            dims = inp.type.tensor_type.shape.dim
            for d, size in zip(dims, feeds[inp.name].shape, strict=False):
                d.ClearField("dim_param")
                d.dim_value = int(size)
    model = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    shapes = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = [d.dim_value if d.HasField("dim_value") else None for d in vi.type.tensor_type.shape.dim]
        shapes[vi.name] = dims
    for init in model.graph.initializer:
        shapes[init.name] = list(init.dims)

    def shape(name: str) -> list[int]:
        dims = shapes.get(name)
        if dims is None or any(d is None for d in dims):
            raise ValueError(f"no static shape for '{name}'")
        return dims

    total = 0.0
    for node in model.graph.node:
        op = node.op_type
        if op in ("Conv", "ConvTranspose"):
            w = shape(node.input[1])
            ref = shape(node.output[0]) if op == "Conv" else shape(node.input[0])
            total += math.prod(ref) * math.prod(w[1:])
        elif op in ("MatMul", "FusedMatMul", "Gemm"):
            a, y = shape(node.input[0]), shape(node.output[0])
            trans_a = any(at.name == "transA" and at.i for at in node.attribute)
            k = a[-2] if (op == "Gemm" and trans_a) else a[-1]
            total += math.prod(y) * k
        elif op == "Attention" and node.domain == "com.microsoft":
            x, w = shape(node.input[0]), shape(node.input[1])
            total += math.prod(x[:-1]) * w[0] * w[1]
    return total


def check(path: Path, feeds: dict[str, np.ndarray]) -> str | None:
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(path), full_check=True)
        sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in sess.get_inputs()}
        sess.run(None, {k: v for k, v in feeds.items() if k in names})
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
    return None


def prune(path: Path, out: Path, args: list[str], timeout: int) -> dict:
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out), "--report",
           str(report), "-q", *args]
    t0 = time.perf_counter()
    try:
        run = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timeout after {timeout} s"}
    wall = round(time.perf_counter() - t0, 1)
    if run.returncode != 0:
        lines = (run.stderr or run.stdout).strip().splitlines()
        return {"ok": False, "error": lines[-1] if lines else f"exit {run.returncode}", "wall_s": wall}
    return {"ok": True, "report": json.loads(report.read_text()), "wall_s": wall}


def time_pair(a: Path, b: Path, runs: int = 30) -> float:
    from graphprune.verify.timing import time_models

    original, pruned = time_models([str(a), str(b)], warmup=5, runs=runs)
    return pruned.median_ms / original.median_ms


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", type=lambda s: s.split(","), default=None)
    ap.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.7])
    ap.add_argument("--latency", action="store_true", help="--target-latency 0.5 on the latency set")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--no-verify", action="store_true",
                    help="pass --no-verify to prune (the output is still checked here: checker, ORT run)")
    ap.add_argument("--skip-done", action="store_true", help="keep results already in --out")
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()
    out_path = Path(args.out)
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    paths = models(args.only or (list(LATENCY_SET) if args.latency else None))
    with tempfile.TemporaryDirectory(prefix="gp-budget-") as tmp:
        for path in paths:
            feeds = _shapes(path)
            base_macs = None
            for target in ([0.5] if args.latency else args.targets):
                kind = "latency" if args.latency else "macs"
                key = f"{path.relative_to(CACHE)}|{kind}={target}"
                if args.skip_done and key in results:
                    continue
                out = Path(tmp) / f"{path.stem}_{kind}_{target}.onnx"
                extra = ["--no-verify"] if args.no_verify else []
                res = prune(path, out, [f"--target-{kind}", str(target), *extra], args.timeout)
                row: dict = {"model": str(path.relative_to(CACHE)), "kind": kind, "target": target,
                             "ok": res["ok"], "wall_s": res.get("wall_s")}
                if res["ok"]:
                    budget = res["report"].get("budget", {})
                    row["tool_achieved"] = budget.get("achieved")
                    row["invalid"] = check(out, feeds)
                    try:
                        base_macs = base_macs or tool_macs(path, feeds)
                        pruned_macs = tool_macs(out, feeds)
                        row["onnx_tool_macs_fraction"] = round(pruned_macs[0] / base_macs[0], 4)
                        row["onnx_tool_all_ops_fraction"] = round(pruned_macs[1] / base_macs[1], 4)
                    except Exception as exc:  # noqa: BLE001
                        row["onnx_tool_error"] = f"{type(exc).__name__}: {str(exc)[:160]}"
                        try:
                            row["shape_infer_macs_fraction"] = round(shape_macs(out, feeds) / shape_macs(path, feeds), 4)
                        except Exception as exc2:  # noqa: BLE001
                            row["shape_infer_error"] = f"{type(exc2).__name__}: {str(exc2)[:160]}"
                    if kind == "latency":
                        row["measured_latency_ratio"] = round(time_pair(path, out), 4)
                        row["rounds"] = budget.get("latency_rounds")
                    frac = row.get("onnx_tool_macs_fraction", row.get("shape_infer_macs_fraction"))
                    row["within"] = (row["measured_latency_ratio"] <= 0.55 if kind == "latency"
                                     else frac is not None and abs(frac - target) <= 0.03)
                else:
                    row["error"] = res["error"]
                    row["within"] = False
                results[key] = row
                print(json.dumps(row), flush=True)
                out_path.parent.mkdir(parents=True, exist_ok=True)
                out_path.write_text(json.dumps(results, indent=1))
                for f in Path(tmp).iterdir():
                    f.unlink()
    rows = [r for r in results.values() if r["kind"] == ("latency" if args.latency else "macs")]
    good = [r for r in rows if r["within"] and r.get("ok") and not r.get("invalid")]
    print(f"\n{len(good)}/{len(rows)} within target and valid")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
