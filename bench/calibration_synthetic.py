#!/usr/bin/env python3
"""No data at all: ``--calibration random`` against the data-free prune and real calibration.

Each model is pruned three or four ways at the same setting: data-free (``l1``, the default without
``--calibration``), calibrated on ``random:128`` synthetic feeds (``graphprune/calibration/synthetic.py``:
standard normal floats, token ids over the embedding table, masks of ones), on
``random:128:LO,HI`` (floats uniform over the inputs' real range, where a user would know it),
and calibrated on 128 real samples. Judged on real held-out data the calibration never saw:

* the digits CNN and residual net of ``bench/calibration_digits.py`` (trained here on
  scikit-learn's digits, TorchScript export): test accuracy;
* the 2-layer LSTM / GRU digits classifiers of ``bench/calibration_recurrent.py``: test accuracy;
* all-MiniLM-L6-v2 (``bench/calibration_minilm.py``: docstring sentences): mean cosine of the
  sentence embeddings to the original's and nearest-neighbour agreement;
* PaddleOCR's PP-OCRv5 recogniser (real-model corpus; ``bench/calibration_ocr_rec.py``'s
  rendered word crops, needs Pillow): the share of 200 crops read as the original reads them;
* scikit-learn's MLP digits classifier through skl2onnx (real-model corpus): test accuracy.

    python bench/calibration_synthetic.py          # ~10 min on 2 CPU cores
    python bench/calibration_synthetic.py --only minilm

Results: ``bench/results/calibration_synthetic.json`` (and a markdown table on stdout).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))
RESULTS = HERE / "results" / "calibration_synthetic.json"
SAMPLES = 128


def digits_rows(arch: str, tmp: Path) -> list[dict]:
    import calibration_digits as cd
    import torch

    import graphprune

    torch.set_num_threads(2)
    xtr, xte, ytr, yte = cd.data(0)
    net = cd.DigitsCNN() if arch == "cnn" else cd.DigitsResNet()
    cd.train(net, xtr, ytr, 30, 0)
    path = tmp / f"digits_{arch}.onnx"
    cd.export(net, "torchscript", path)
    original = cd.accuracy(str(path), xte, yte)
    real = xtr[np.random.default_rng(0).choice(len(xtr), SAMPLES, replace=False)]
    sources = {"data-free (l1)": None, f"random:{SAMPLES}": f"random:{SAMPLES}",
               f"random:{SAMPLES}:0,1": f"random:{SAMPLES}:0,1",
               f"{SAMPLES} real images": [{"image": im[None]} for im in real]}
    rows = []
    for ratio in (0.3, 0.5):
        for label, source in sources.items():
            started = time.perf_counter()
            res = graphprune.prune(str(path), ratio=ratio, round_to=1, calibration=source,
                                   **({"criterion": "l1"} if source is None else {}))
            rows.append({"model": f"digits {arch}", "setting": f"--ratio {ratio} --round-to 1", "run": label,
                         "macs": round(res.report["macs_after"] / res.report["macs_before"], 3),
                         "metric": "test accuracy", "original": round(original, 2),
                         "value": round(cd.accuracy(res.model, xte, yte), 2),
                         "report_cosine": (res.report.get("fidelity") or {}).get("cosine"),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def recurrent_rows(kind: str) -> list[dict]:
    import calibration_recurrent as cr
    from sklearn.datasets import load_digits

    import graphprune

    images, labels = load_digits(return_X_y=True)
    images = (images / 16.0).astype(np.float32).reshape(-1, 8, 8)
    order = np.random.default_rng(0).permutation(len(images))
    train_idx, test_idx = order[:1400], order[1400:]
    model = cr.train(kind, images[train_idx], labels[train_idx])
    ref = cr.logits(model, images[test_idx])
    original = float((ref.argmax(1) == labels[test_idx]).mean()) * 100
    sources = {"data-free (l1)": None, f"random:{SAMPLES}": f"random:{SAMPLES}",
               f"random:{SAMPLES}:0,1": f"random:{SAMPLES}:0,1",
               f"{SAMPLES} real sequences": {"x": images[train_idx[:SAMPLES]][:, :, None, :]}}
    rows = []
    for label, source in sources.items():
        started = time.perf_counter()
        res = graphprune.prune(model, ratio=0.5, round_to=1, calibration=source,
                               **({"criterion": "l1"} if source is None else {}))
        got = cr.logits(res.model, images[test_idx])
        rows.append({"model": f"digits {kind.upper()}", "setting": "--ratio 0.5 --round-to 1", "run": label,
                     "macs": round(res.report["params_after"] / res.report["params_before"], 3),
                     "metric": "test accuracy", "original": round(original, 2),
                     "value": round(float((got.argmax(1) == labels[test_idx]).mean()) * 100, 2),
                     "report_cosine": (res.report.get("fidelity") or {}).get("cosine"),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def ocr_rows() -> list[dict]:
    """PP-OCRv5's recogniser (real-model corpus) on rendered word crops: share read the same."""
    import calibration_ocr_rec as co
    import onnx
    from real_corpus import model_path

    import graphprune

    (calib, _), (crops, truth) = co.render(SAMPLES, seed=1), co.render(200, seed=2)
    path = model_path("ppocrv5_rec")
    table = co.characters(path)
    reference = co.read(onnx.load(str(path)), crops, table)
    sources = {"data-free (l1)": None, f"random:{SAMPLES}": f"random:{SAMPLES}",
               f"random:{SAMPLES}:-1,1": f"random:{SAMPLES}:-1,1",
               f"{SAMPLES} real samples": [{"x": c} for c in calib]}
    rows = []
    for label, source in sources.items():
        started = time.perf_counter()
        res = graphprune.prune(str(path), ratio=0.3, calibration=source,
                               **({"criterion": "l1"} if source is None else {}))
        judged = co.judge(reference, co.read(res.model, crops, table), truth)
        rows.append({"model": "PP-OCRv5 rec", "setting": "--ratio 0.3", "run": label,
                     "macs": round(res.report["params_after"] / res.report["params_before"], 3),
                     "metric": "same text", "original": 100.0, "value": round(100 * judged["same_text"], 1),
                     "report_cosine": (res.report.get("fidelity") or {}).get("cosine"),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def sklearn_rows() -> list[dict]:
    """scikit-learn's MLP classifier through skl2onnx (real-model corpus): test accuracy of
    its label output on the digits it was not trained on (raw pixel counts 0-16)."""
    import onnx
    from real_corpus import model_path
    from sklearn.datasets import load_digits

    import graphprune
    from graphprune.verify.validate import session

    images, labels = load_digits(return_X_y=True)
    images = images.astype(np.float32)
    model = onnx.load(str(model_path("sklearn_digits_mlp")))

    def accuracy(m: onnx.ModelProto) -> float:
        return float((np.asarray(session(m).run(None, {"X": images[1000:]})[0]) == labels[1000:]).mean()) * 100

    sources = {"data-free (l1)": None, f"random:{SAMPLES}": f"random:{SAMPLES}",
               f"random:{SAMPLES}:0,16": f"random:{SAMPLES}:0,16",
               f"{SAMPLES} real samples": [{"X": images[i:i + 1]} for i in range(SAMPLES)]}
    rows = []
    for label, source in sources.items():
        started = time.perf_counter()
        res = graphprune.prune(model, ratio=0.5, calibration=source, **({"criterion": "l1"} if source is None else {}))
        rows.append({"model": "scikit-learn MLP (skl2onnx)", "setting": "--ratio 0.5", "run": label,
                     "macs": round(res.report["params_after"] / res.report["params_before"], 3),
                     "metric": "test accuracy", "original": round(accuracy(model), 2), "value": round(accuracy(res.model), 2),
                     "report_cosine": (res.report.get("fidelity") or {}).get("cosine"),
                     "seconds": round(time.perf_counter() - started, 1)})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def minilm_rows(tmp: Path) -> list[dict]:
    import calibration_minilm as cm
    import onnx

    import graphprune

    sentences = cm.corpus()
    calib_texts, eval_texts = sentences[:SAMPLES], sentences[150:300]
    tok = cm.tokenizer()
    path = tmp / "minilm.onnx"
    cm.export(path)
    calib = tmp / "calib"
    cm.calibration_folder(calib_texts, tok, calib)
    reference = cm.embed(onnx.load(str(path)), eval_texts, tok)
    sources = {"data-free (l1)": None, f"random:{SAMPLES}": f"random:{SAMPLES}",
               f"{SAMPLES} real sentences": str(calib)}
    rows = []
    for flags, ratios in cm.SETTINGS:
        for label, source in sources.items():
            started = time.perf_counter()
            res = graphprune.prune(str(path), ratio=0.0, **ratios, calibration=source,
                                   **({"criterion": "l1"} if source is None else {}))
            pruned = cm.embed(res.model, eval_texts, tok)
            cos = (reference * pruned).sum(1)
            rows.append({"model": "all-MiniLM-L6-v2", "setting": flags, "run": label,
                         "macs": round(res.report["params_after"] / res.report["params_before"], 3),
                         "metric": "mean cosine", "original": 1.0, "value": round(float(cos.mean()), 4),
                         "nn_agreement": round(cm.nn_agreement(reference, pruned), 4),
                         "report_cosine": (res.report.get("fidelity") or {}).get("cosine"),
                         "seconds": round(time.perf_counter() - started, 1)})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def table(rows: list[dict]) -> str:
    lines = ["| model | setting | original | data-free (l1) | `--calibration random:128` | `random:128:LO,HI` (the inputs' range) "
             "| 128 real samples | held-out cosine the report gives (random inputs) |",
             "|---|---|---:|---:|---:|---:|---:|---:|"]
    keys = list(dict.fromkeys((r["model"], r["setting"]) for r in rows))
    for model, setting in keys:
        group = [r for r in rows if r["model"] == model and r["setting"] == setting]

        def cell(r: dict | None) -> str:
            if r is None:
                return "—"
            text = f"{r['value']:.4f}" if r["metric"] == "mean cosine" else f"{r['value']:.1f} %"
            text += " same text" if r["metric"] == "same text" else ""
            return text + (f" · NN {100 * r['nn_agreement']:.1f} %" if "nn_agreement" in r else "")

        def kind(run: str) -> str:
            if run.startswith("data-free"):
                return "free"
            if run.startswith("random"):
                return "range" if run.count(":") == 2 else "random"
            return "real"

        by = {kind(r["run"]): r for r in group}
        ranged = by.get("range")
        original = "1" if group[0]["metric"] == "mean cosine" else f"{group[0]['original']:.1f} %"
        rc = by["random"].get("report_cosine")
        lines.append(f"| {model} | `{setting}` | {original} | {cell(by['free'])} | **{cell(by['random'])}** "
                     f"| {cell(ranged)}{'' if ranged is None else ' (' + ranged['run'].split(':', 2)[2] + ')'} "
                     f"| {cell(by['real'])} | {rc if rc is None else round(rc, 4)} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default="", help="comma-separated: cnn, resnet, lstm, gru, minilm, ocr, sklearn")
    args = parser.parse_args()
    chosen = set(filter(None, args.only.split(","))) or {"cnn", "resnet", "lstm", "gru", "minilm", "ocr", "sklearn"}
    rows: list[dict] = []
    if RESULTS.exists() and args.only:
        kept = json.loads(RESULTS.read_text())["rows"]
        rows = [r for r in kept if r["model"].split()[-1].lower() not in chosen
                and not (r["model"].startswith("all-MiniLM") and "minilm" in chosen)
                and not (r["model"].startswith("PP-OCR") and "ocr" in chosen)
                and not (r["model"].startswith("scikit") and "sklearn" in chosen)]
    with tempfile.TemporaryDirectory() as tmp:
        for arch in ("cnn", "resnet"):
            if arch in chosen:
                rows += digits_rows(arch, Path(tmp))
        for kind in ("lstm", "gru"):
            if kind in chosen:
                rows += recurrent_rows(kind)
        if "minilm" in chosen:
            rows += minilm_rows(Path(tmp))
        if "ocr" in chosen:
            rows += ocr_rows()
        if "sklearn" in chosen:
            rows += sklearn_rows()
    print()
    print(table(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": " ".join(["python", *sys.argv]), "samples": SAMPLES,
                                   "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
