#!/usr/bin/env python3
"""Quantized models in ONNX Runtime's three formats, pruned like their float originals.

For each base model (a zoo export in ``bench/cache/`` and a real trained classifier of the
real-model corpus in ``bench/cache/real/models/``), ONNX Runtime's quantizer writes:

* ``qdq``: ``quantize_static(..., QuantFormat.QDQ, per_channel=True)`` (QuantizeLinear /
  DequantizeLinear pairs around float ops);
* ``qop``: ``quantize_static(..., QuantFormat.QOperator, per_channel=True)`` (QLinearConv,
  QLinearMatMul, com.microsoft QGemm / QLinearAdd / QLinearGlobalAveragePool ...);
* ``dynamic``: ``quantize_dynamic(..., per_channel=True)`` (DynamicQuantizeLinear ->
  ConvInteger / MatMulInteger).

Each (and the float model) is pruned with ``graphprune.prune(path, ratio=0.5)`` (data-free,
``l1``; verification on) and compared with its own unpruned original on 8 random inputs that
the static quantizer did not calibrate on: output cosine and top-1 agreement. A quantized model
should be planned like its float original (the data-free criteria score the float weights the
integer ones decode to) and keep about the same fidelity.

``--zoo`` adds a QOperator sweep over more zoo architectures (depthwise and grouped convs,
QLinearConcat, squeeze-excitation with QLinearSigmoid/QLinearMul, LayerNorm): each quantized
after ONNX Runtime's ``quant_pre_process`` and pruned at ratio 0.5 (``zoo_rows``).

    python bench/quantized_formats.py            # ~2 min; writes bench/results/quantized_formats.json
    python bench/quantized_formats.py --zoo      # + ~6 min
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "quantized_formats.json"
BASES = [HERE / "cache" / "resnet18__torchscript.onnx",
         HERE / "cache" / "real" / "models" / "pplcnet_orientation.onnx"]


def _feeds(model, count: int, seed: int) -> list[dict]:
    inp = model.graph.input[0]
    shape = [d.dim_value if d.dim_value > 0 else 1 for d in inp.type.tensor_type.shape.dim]
    rng = np.random.default_rng(seed)
    return [{inp.name: rng.standard_normal(shape).astype(np.float32)} for _ in range(count)]


def _quantize(base: Path, kind: str, out: Path) -> Path:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        quantize_dynamic,
        quantize_static,
    )

    if kind == "float":
        return base
    if kind == "dynamic":
        quantize_dynamic(str(base), str(out), per_channel=True)
        return out
    feeds = _feeds(onnx.load(str(base)), 8, seed=1)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.items = iter(feeds)

        def get_next(self):
            return next(self.items, None)

    fmt = QuantFormat.QDQ if kind == "qdq" else QuantFormat.QOperator
    quantize_static(str(base), str(out), Reader(), quant_format=fmt, per_channel=True)
    return out


ZOO = ("mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0", "densenet121", "googlenet",
       "shufflenet_v2_x1_0", "squeezenet1_1", "regnet_y_400mf", "resnext50_32x4d", "convnext_tiny")


def _zoo_row(name: str, tmp: Path) -> dict | None:
    """One zoo export quantized in QOperator format (after ORT's pre-processing) and pruned."""
    import collections

    import onnx
    from onnxruntime.quantization.shape_inference import quant_pre_process

    import graphprune

    src = HERE / "cache" / f"{name}__torchscript.onnx"
    if not src.exists():
        return None
    pre = tmp / f"{name}_pre.onnx"
    quant_pre_process(str(src), str(pre), skip_symbolic_shape=True)
    path = _quantize(pre, "qop", tmp / f"{name}_qop.onnx")
    ops = collections.Counter(n.op_type for n in onnx.load(str(path)).graph.node if n.op_type.startswith("Q"))
    t0 = time.perf_counter()
    result = graphprune.prune(str(path), ratio=0.5)
    rep, ver = result.report, result.report["verification"]
    return {"model": name, "format": "qop", "groups_pruned": rep["groups"]["pruned"], "groups": rep["groups"]["total"],
            "params_ratio": round(rep["params_after"] / rep["params_before"], 3),
            "macs_ratio": round(rep["macs_after"] / rep["macs_before"], 3) if rep["macs_before"] else None,
            "verified": bool(ver.get("ok")), "max_abs_diff": ver.get("max_abs_diff"),
            "seconds": round(time.perf_counter() - t0, 1), "quantized_ops": dict(ops)}


def _outputs(path, feeds: list[dict]) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return np.stack([session.run(None, f)[0].reshape(-1) for f in feeds])


def main() -> int:
    import onnx

    import graphprune

    rows, zoo_rows = [], []
    with tempfile.TemporaryDirectory() as tmp:
        if "--zoo" in sys.argv[1:]:
            for name in ZOO:
                row = _zoo_row(name, Path(tmp))
                if row is not None:
                    zoo_rows.append(row)
                    print(json.dumps(row), flush=True)
        for base in BASES:
            if not base.exists():
                print(f"{base}: not in the cache (bench/export_zoo.py, bench/real_corpus.py --fetch)", file=sys.stderr)
                continue
            feeds = _feeds(onnx.load(str(base)), 8, seed=7)
            for kind in ("float", "qdq", "qop", "dynamic"):
                path = _quantize(base, kind, Path(tmp) / f"{base.stem}_{kind}.onnx")
                t0 = time.perf_counter()
                result = graphprune.prune(str(path), ratio=0.5)
                wall = time.perf_counter() - t0
                pruned = Path(tmp) / f"{base.stem}_{kind}_pruned.onnx"
                result.save(pruned)
                a, b = _outputs(path, feeds), _outputs(pruned, feeds)
                cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
                rep, ver = result.report, result.report["verification"]
                row = {
                    "model": base.stem, "format": kind,
                    "groups_pruned": rep["groups"]["pruned"], "groups": rep["groups"]["total"],
                    "params_ratio": round(rep["params_after"] / rep["params_before"], 3),
                    "macs_ratio": round(rep["macs_after"] / rep["macs_before"], 3) if rep["macs_before"] else None,
                    "verified": bool(ver.get("ok")), "max_abs_diff": ver.get("max_abs_diff"),
                    "accepted_as": ver.get("scale", "exact" if ver.get("max_rel_diff") == 0 else "within tolerance"),
                    "cosine": round(float(cos.mean()), 4),
                    "top1_agreement": float((a.argmax(1) == b.argmax(1)).mean()),
                    "seconds": round(wall, 1),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"ratio": 0.5, "criterion": "l1", "inputs": "8 random, not calibrated on",
                                   "rows": rows, "zoo_rows": zoo_rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
