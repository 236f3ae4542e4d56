"""keras.applications through the TensorFlow frontend: convert, prune at 0.5, verify exactly.

Each model is built with ``weights=None`` (nothing is downloaded), its BatchNormalization
statistics and affine parameters are randomised (a fresh BN is the identity and would hide
mistakes), converted with :func:`graphprune.frontends.tensorflow.to_onnx`, checked against
Keras, then pruned with ``graphprune.prune(ratio=0.5)``, whose self-check compares the pruned
model with the zeroed original (exact for every exact group).

    python bench/keras_applications.py                      # all models, ~10-15 min on 2 cores
    python bench/keras_applications.py --models MobileNetV2 --size 96

Writes ``bench/results/keras_applications.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from graphprune.frontends import tensorflow as gtf

import graphprune

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

MODELS = ("MobileNetV2", "ResNet50", "EfficientNetB0", "functional",
          # round 26: the other families keras.applications ships (ConvNeXt's depthwise
          # convolutions are Conv2D(groups=channels): refused before, docs/frontends.md). VGG16 is
          # left out: tf2onnx's optimiser keeps a copy of every constant per pass, its 138 M
          # parameters need over 20 GB at 224 (docs/frontends.md)
          "Xception", "ResNet50V2", "InceptionV3", "InceptionResNetV2", "MobileNet",
          "MobileNetV3Large", "DenseNet121", "NASNetMobile", "EfficientNetV2B0", "ConvNeXtTiny")


def build(name: str, size: int):
    import keras

    keras.utils.set_random_seed(0)
    if name == "functional":
        from test_frontend_tf import functional_model

        return functional_model()
    factory = getattr(keras.applications, name)
    return gtf.randomize_batchnorm(factory(weights=None, input_shape=(size, size, 3)), seed=0)


def run(name: str, size: int, ratio: float) -> dict:
    t0 = time.perf_counter()
    model = build(name, size)
    t1 = time.perf_counter()
    proto = gtf.to_onnx(model)
    t2 = time.perf_counter()
    shape = [d.dim_value for d in proto.graph.input[0].type.tensor_type.shape.dim]
    x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    conversion_rel = gtf.check_conversion(model, proto, [x])
    analysis = graphprune.analyze(proto)
    t3 = time.perf_counter()
    result = graphprune.prune(proto, ratio=ratio)
    t4 = time.perf_counter()
    report, verification = result.report, result.report["verification"]
    return {
        "model": name,
        "input": shape,
        "ops": len(proto.graph.node),
        "groups": analysis.summary(),
        "prunable_fraction": report["prunable_fraction"],
        "conversion_max_rel_diff": conversion_rel,
        "verification": {k: verification.get(k) for k in ("ok", "max_abs_diff", "max_rel_diff", "exact_groups_checked")},
        "inexact_groups": len(verification.get("inexact_groups", [])),
        "params_before": report["params_before"],
        "params_after": report["params_after"],
        "macs_before": report["macs_before"],
        "macs_after": report["macs_after"],
        "seconds": {
            "build": round(t1 - t0, 1), "convert": round(t2 - t1, 1),
            "analyze": round(t3 - t2, 1), "prune": round(t4 - t3, 1),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "keras_applications.json"))
    parser.add_argument("--table", metavar="JSON", help="only print the table of a results file")
    args = parser.parse_args()
    if args.table:
        print(table(json.loads(Path(args.table).read_text())["rows"]))
        return
    rows = []
    for name in args.models:
        row = run(name, args.size, args.ratio)
        rows.append(row)
        print(json.dumps(row), flush=True)
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    import tensorflow as tf
    import tf2onnx

    path.write_text(json.dumps({
        "config": vars(args), "rows": rows,
        "versions": {"tensorflow": tf.__version__, "tf2onnx": tf2onnx.__version__},
    }, indent=1))
    print()
    print(table(rows))


def _count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n:,}"


def table(rows: list[dict]) -> str:
    """The Markdown table of ``docs/frontends.md``."""
    lines = [
        "| model | input | groups (prunable/total) | conversion rel diff | params before -> after "
        "| MACs before -> after | verification (max rel diff) | convert s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        g, v = r["groups"], r["verification"]
        lines.append(
            f"| {r['model']} | {'x'.join(map(str, r['input']))} | {g['prunable']}/{g['groups']} | "
            f"{r['conversion_max_rel_diff']:.1e} | {_count(r['params_before'])} -> {_count(r['params_after'])} | "
            f"{_count(r['macs_before'])} -> {_count(r['macs_after'])} | "
            f"{'ok' if v['ok'] else 'FAILED'} ({v['max_rel_diff']:.1e}, {v['exact_groups_checked']} exact groups) | "
            f"{r['seconds']['convert']} |"
        )
    return "\n".join(lines)

if __name__ == "__main__":
    main()
