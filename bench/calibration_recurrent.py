"""Calibrated pruning of recurrent classifiers: the refit of the recurrent layers' input
projections (round 20, ``graphprune/calibration/recurrent.py``) against the refit without it.

Trains a small sequence classifier on scikit-learn's bundled ``load_digits``, read as a
sequence of its 8 rows of 8 pixels: ``Linear(8->64) ReLU -> {LSTM, GRU}(64->96, 2 layers) ->
Linear(96->10)`` on the last step (torch, fixed seeds, 60 epochs; 1,400 training / 397 test
images), exports it with the TorchScript exporter (one ONNX ``LSTM``/``GRU`` node per layer)
and prunes it at ``--ratio 0.3`` and ``0.5`` (``--round-to 1``) with 256 unlabelled training
images as calibration: once as the tool runs, once with the recurrent refit switched off (the
benchmark replaces ``recurrent.find_targets`` by one that finds nothing: the linear refit of
round 19). Judged on the test images: accuracy, top-1 agreement with the original and the
relative L2 of the logits.

    python bench/calibration_recurrent.py       # ~1 min on 2 CPU cores
"""

from __future__ import annotations

import io
import json
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from sklearn.datasets import load_digits

import graphprune
from graphprune.calibration import recurrent

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "calibration_recurrent.json"


class Net(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.inp = torch.nn.Linear(8, 64)
        self.rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](64, 96, num_layers=2)
        self.out = torch.nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [steps, batch, 8]
        h, _ = self.rnn(torch.relu(self.inp(x)))
        return self.out(h[-1])


def train(kind: str, x: np.ndarray, y: np.ndarray) -> onnx.ModelProto:
    torch.manual_seed(0)
    net = Net(kind)
    opt = torch.optim.Adam(net.parameters(), 3e-3)
    xt, yt = torch.tensor(x).permute(1, 0, 2), torch.tensor(y)
    for _ in range(60):
        perm = torch.randperm(len(y))
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            loss = torch.nn.functional.cross_entropy(net(xt[:, b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    net.eval()
    buf = io.BytesIO()
    torch.onnx.export(net, (xt[:, :1],), buf, input_names=["x"], output_names=["logits"], dynamo=False,
                      opset_version=17)
    return onnx.load_from_string(buf.getvalue())


def logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return np.concatenate([sess.run(None, {"x": s[:, None, :]})[0] for s in x])


def main() -> None:
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8)
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, test_idx = order[:1400], order[1400:]
    calib = {"x": images[train_idx[:256]][:, :, None, :]}  # [n, steps, batch 1, 8]
    rows = []
    real_find = recurrent.find_targets
    for kind in ("lstm", "gru"):
        model = train(kind, images[train_idx], labels[train_idx])
        ref = logits(model, images[test_idx])
        base = float((ref.argmax(1) == labels[test_idx]).mean())
        for ratio in (0.3, 0.5):
            for refit in (True, False):
                recurrent.find_targets = real_find if refit else (lambda *a, **k: [])
                start = time.perf_counter()
                result = graphprune.prune(model, ratio=ratio, round_to=1, calibration=calib)
                seconds = time.perf_counter() - start
                got = logits(result.model, images[test_idx])
                passes = result.report["calibration"]["passes"]["RefitPass"]
                rows.append({
                    "model": kind, "ratio": ratio, "recurrent_refit": refit,
                    "params": round(result.report["params_after"] / max(result.report["params_before"], 1), 3),
                    "accuracy_original": round(base, 4),
                    "accuracy": round(float((got.argmax(1) == labels[test_idx]).mean()), 4),
                    "top1_agreement": round(float((got.argmax(1) == ref.argmax(1)).mean()), 4),
                    "logit_rel_l2": round(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), 4),
                    "recurrent": passes.get("recurrent"), "seconds": round(seconds, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    recurrent.find_targets = real_find
    print("\n| model | ratio | params | refit | accuracy (original) | top-1 agreement | logit rel. L2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model'].upper()} | {r['ratio']} | {r['params']} | {'linear + recurrent' if r['recurrent_refit'] else 'linear only'} "
              f"| {100 * r['accuracy']:.1f} % ({100 * r['accuracy_original']:.1f} %) | {100 * r['top1_agreement']:.1f} % "
              f"| {r['logit_rel_l2']:.3f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
