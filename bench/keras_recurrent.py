"""Keras 3 recurrent classifiers through tf2onnx: the ``Loop`` each layer becomes, lowered to
ONNX's LSTM/GRU/RNN (``graphprune/rules/loop_rnn.py``) and pruned, with and without calibration.

Trains four sequence classifiers on scikit-learn's bundled ``load_digits``, each image read as
a sequence of its 8 rows of 8 pixels (Keras 3, fixed seeds, 1,400 training / 397 test images):
``GRU(48)``, ``LSTM(48)``, ``SimpleRNN(48)`` and ``Bidirectional(GRU(32), return_sequences)``
followed by ``GRU(32)``, each under ``Dense(10)``. Each is converted by
``graphprune.frontends.tensorflow.to_onnx`` (tf2onnx writes every Keras 3 recurrent layer as a
``Loop``), then pruned with ``graphprune.prune`` at ``--ratio 0.3`` and ``0.5`` data-free and
with 256 unlabelled training images as calibration, and with ``calibration="random:256"``
(synthetic feeds, no data). Judged on the test images: accuracy and
top-1 agreement with the original. ``before`` runs the same prunes with the Loop lowering
switched off (the rule's ``lowered`` returns nothing: every group around a Loop freezes, as
before round 23).

    python bench/keras_recurrent.py        # ~2 min on 2 CPU cores; bench/results/keras_recurrent.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
from graphprune.frontends import tensorflow as gtf  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402

import graphprune  # noqa: E402
from graphprune.rules import loop_rnn  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "keras_recurrent.json"


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)
    y = digits.target.astype(np.int64)
    order = np.random.default_rng(0).permutation(len(x))
    train, test = order[:1400], order[1400:]
    return x[train], y[train], x[test], y[test]


def build(kind: str):
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    inp = keras.Input((8, 8), name="rows")
    if kind == "gru":
        h = layers.GRU(48)(inp)
    elif kind == "lstm":
        h = layers.LSTM(48)(inp)
    elif kind == "simple_rnn":
        h = layers.SimpleRNN(48)(inp)
    else:
        h = layers.GRU(32)(layers.Bidirectional(layers.GRU(32, return_sequences=True))(inp))
    model = keras.Model(inp, layers.Dense(10, name="logits")(h))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def logits(model, x: np.ndarray) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + 1]})[0] for i in range(len(x))])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="gru,lstm,simple_rnn,bidirectional")
    parser.add_argument("--epochs", type=int, default=40)
    args = parser.parse_args(argv)
    x_train, y_train, x_test, y_test = data()
    calibration = [{"rows": x_train[i:i + 1]} for i in range(256)]
    rows = []
    for kind in args.only.split(","):
        model = build(kind)
        model.fit(x_train, y_train, epochs=args.epochs, batch_size=64, verbose=0)
        proto = gtf.to_onnx(model)
        loops = sum(n.op_type == "Loop" for n in proto.graph.node)
        reference = logits(proto, x_test)
        row = {"model": kind, "loops": loops, "accuracy": float((reference.argmax(1) == y_test).mean()), "runs": []}
        print(f"{kind}: {loops} Loop(s), test accuracy {row['accuracy']:.4f}", file=sys.stderr)
        for code in ("before", "now"):
            for ratio in (0.3, 0.5):
                for calibrated in (False, "random", True):
                    if code == "before" and calibrated:
                        continue  # nothing prunes before: calibration has nothing to refit
                    original = loop_rnn.LoopRule.lowered
                    if code == "before":
                        loop_rnn.LoopRule.lowered = lambda self, node, opset: None
                    start = time.perf_counter()
                    try:
                        feeds = calibration if calibrated is True else "random:256" if calibrated else None
                        result = graphprune.prune(proto, ratio=ratio, round_to=1, calibration=feeds)
                    finally:
                        loop_rnn.LoopRule.lowered = original
                    seconds = time.perf_counter() - start
                    report = result.report
                    got = logits(result.model, x_test)
                    run = {
                        "code": code, "ratio": ratio, "calibration": calibrated,
                        "params": report["params_after"] / report["params_before"],
                        "lowered": report.get("normalised", {}).get("lowered_ops", {}),
                        "verified": bool(report["verification"]["ok"]),
                        "accuracy": float((got.argmax(1) == y_test).mean()),
                        "agreement": float((got.argmax(1) == reference.argmax(1)).mean()),
                        "seconds": round(seconds, 1),
                    }
                    row["runs"].append(run)
                    how = {False: "data-free", "random": "synthetic", True: "calibrated"}[calibrated]
                    print(f"  {code} r{ratio} {how}: params "
                          f"{run['params']:.3f} acc {run['accuracy']:.4f} agree {run['agreement']:.4f} "
                          f"verified {run['verified']} ({seconds:.1f} s)", file=sys.stderr)
        rows.append(row)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    print(f"wrote {RESULTS}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
