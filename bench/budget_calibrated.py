"""Global (budget) allocation vs uniform allocation at equal MACs, with calibration.

For each model and each uniform setting, the uniform prune runs first; its MAC fraction
(counted on the exported model) becomes the ``target_macs`` of the global prune, so both
rows cost the same. Both use the same calibration data, criterion and reconstruction; both
are judged on held-out evaluation data that calibration never saw.

- digits CNN (``bench/calibration_digits.py``: trained here on scikit-learn's digits, both
  torch exporters): test accuracy;
- all-MiniLM-L6-v2 (``bench/calibration_minilm.py``, real weights): mean cosine and
  nearest-neighbour agreement of sentence embeddings on held-out sentences.

    python bench/budget_calibrated.py --models digits          # ~2-4 min
    python bench/budget_calibrated.py --models minilm          # slow (calibrated MiniLM)

Writes ``bench/results/budget_calibrated.json`` (merged per model) and prints one JSON line per run.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "budget_calibrated.json"


def _fractions(report: dict) -> dict:
    return {"macs_ratio": round(report["macs_after"] / report["macs_before"], 4),
            "params_ratio": round(report["params_after"] / report["params_before"], 4)}


def digits(args: argparse.Namespace) -> list[dict]:
    import torch
    from calibration_digits import DigitsCNN, accuracy, data, export, train

    import graphprune

    torch.set_num_threads(2)
    xtr, xte, ytr, yte = data(0)
    net = DigitsCNN()
    train(net, xtr, ytr, args.epochs, 0)
    rng = np.random.default_rng(0)
    calib = {"image": xtr[rng.choice(len(xtr), size=min(512, len(xtr)), replace=False)][:, None]}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for exporter in ("torchscript", "dynamo"):
            path = Path(tmp) / f"digits_{exporter}.onnx"
            export(net, exporter, path)
            base = accuracy(str(path), xte, yte)
            for ratio in args.ratios:
                for calibrated in (True, False):
                    extra = {"calibration": calib} if calibrated else {}
                    t0 = time.perf_counter()
                    uni = graphprune.prune(str(path), ratio=ratio, round_to=1, **extra)
                    t1 = time.perf_counter()
                    f = _fractions(uni.report)
                    glo = graphprune.prune(str(path), target_macs=f["macs_ratio"], round_to=1, **extra)
                    t2 = time.perf_counter()
                    row = {
                        "model": f"digits CNN ({exporter})", "calibrated": calibrated,
                        "original_accuracy": round(base, 2), "uniform_ratio": ratio,
                        "uniform": {**f, "test_accuracy": round(accuracy(uni.model, xte, yte), 2),
                                    "seconds": round(t1 - t0, 2)},
                        "global": {**_fractions(glo.report),
                                   "test_accuracy": round(accuracy(glo.model, xte, yte), 2),
                                   "seconds": round(t2 - t1, 2),
                                   "widths": [(w["units"], w["kept"]) for w in glo.report["budget"]["widths"]]},
                    }
                    print(json.dumps(row), flush=True)
                    rows.append(row)
    return rows


def minilm(args: argparse.Namespace) -> list[dict]:
    from calibration_minilm import (
        calibration_folder,
        corpus,
        embed,
        export,
        nn_agreement,
        tokenizer,
    )

    import graphprune

    sentences = corpus()
    calib_texts, eval_texts = sentences[:150], sentences[150:300]
    tok = tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        path = tmpdir / "minilm.onnx"
        export(path)
        calib = tmpdir / "calib"
        calibration_folder(calib_texts, tok, calib)
        ref = embed(str(path), eval_texts, tok)

        def judge(model) -> dict:
            emb = embed(model, eval_texts, tok)
            return {"cosine": round(float(np.mean(np.sum(emb * ref, axis=1))), 4),
                    "nn_agreement": round(nn_agreement(emb, ref), 4)}

        for mlp in args.mlp_ratios:
            t0 = time.perf_counter()
            uni = graphprune.prune(str(path), head_ratio=0.0, mlp_ratio=mlp, calibration=str(calib))
            t1 = time.perf_counter()
            f = _fractions(uni.report)
            glo = graphprune.prune(str(path), head_ratio=0.0, target_macs=f["macs_ratio"],
                                   calibration=str(calib))
            t2 = time.perf_counter()
            row = {"model": "all-MiniLM-L6-v2", "calibrated": True, "uniform": f"--head-ratio 0 --mlp-ratio {mlp}",
                   "uniform_result": {**f, **judge(uni.model), "seconds": round(t1 - t0, 1)},
                   "global_result": {**_fractions(glo.report), **judge(glo.model), "seconds": round(t2 - t1, 1),
                                     "widths": [(w["units"], w["kept"]) for w in glo.report["budget"]["widths"]]}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits", help="digits,minilm")
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5])
    parser.add_argument("--mlp-ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    results = json.loads(out.read_text()) if out.exists() else {}
    for name in args.models.split(","):
        results[name] = {"digits": digits, "minilm": minilm}[name](args)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
