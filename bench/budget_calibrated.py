"""Global (budget) allocation vs uniform allocation at equal MACs, with calibration.

For each model and each uniform setting, the uniform prune runs first; its MAC fraction
(counted on the exported model) becomes the ``target_macs`` of the global prune, so both
rows cost the same. Both use the same calibration data, criterion and reconstruction; both
are judged on held-out evaluation data that calibration never saw.

- digits CNN (``bench/calibration_digits.py``: trained here on scikit-learn's digits, both
  torch exporters; ``--arch resnet``: the six-group residual network of that file): test
  accuracy;
- all-MiniLM-L6-v2 (``bench/calibration_minilm.py``, real weights): mean cosine and
  nearest-neighbour agreement of sentence embeddings on held-out sentences.

The global row is what ``target_macs`` does with calibration: sensitivity measured after each
consumer's refit on held-out calibration samples, greedy allocation, then a choice among the
greedy, the uniform-at-equal-cost and a blended allocation and the default number of searched
perturbations of the best (``graphprune.planning.search``) by their fidelity on the held-out
calibration samples after reconstruction (``report["budget"]["candidates"]``, recorded here).

    python bench/budget_calibrated.py --models digits                    # 3 seeds x 2 exporters x 2 levels
    python bench/budget_calibrated.py --models digits --arch resnet --ratios 0.5,0.7,0.8
    python bench/budget_calibrated.py --models minilm --mlp-ratios 0.25  # slow (calibrated MiniLM)

Writes ``bench/results/budget_calibrated.json`` (rows merged by model and setting; the digits
results of this session went to ``--out bench/results/budget_calibrated_digits.json``) and prints
one JSON line per run.
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


def _exact_macs(report: dict) -> float:
    """The uniform prune's MAC fraction unrounded: the global prune's target, so that its
    uniform candidate is the ratio driver's allocation itself (a rounded target moved a group
    by one unit)."""
    return report["macs_after"] / report["macs_before"]


def _fractions(report: dict) -> dict:
    return {"macs_ratio": round(report["macs_after"] / report["macs_before"], 4),
            "params_ratio": round(report["params_after"] / report["params_before"], 4)}


def _chosen(report: dict) -> dict:
    budget = report["budget"]
    return {"chosen": budget.get("chosen"), "candidates": budget.get("candidates"),
            "holdout_rel_l2": (report.get("fidelity") or {}).get("rel_l2")}


NAMES = {"cnn": "CNN", "resnet": "ResNet"}


def digits(args: argparse.Namespace) -> list[dict]:
    import torch
    from calibration_digits import ARCHS, data, export, train

    import graphprune
    from graphprune.verify.validate import session

    def logits(model, x):
        import onnx

        sess = session(model if isinstance(model, onnx.ModelProto) else onnx.load(model))
        name = sess.get_inputs()[0].name
        return np.concatenate([sess.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])

    torch.set_num_threads(1)  # two threads thrash on a loaded machine
    rows = []
    for seed in args.seeds:
        xtr, xte, ytr, yte = data(seed)
        net = ARCHS[args.arch]()
        train(net, xtr, ytr, args.epochs, seed)
        rng = np.random.default_rng(seed)
        calib = {"image": xtr[rng.choice(len(xtr), size=min(512, len(xtr)), replace=False)][:, None]}
        with tempfile.TemporaryDirectory() as tmp:
            for exporter in ("torchscript", "dynamo"):
                path = Path(tmp) / f"digits_{exporter}.onnx"
                export(net, exporter, path)
                ref = logits(str(path), xte)

                def judge(model, ref=ref, yte=yte, xte=xte) -> dict:
                    out = logits(model, xte)
                    rel = np.linalg.norm(out - ref, axis=1) / np.linalg.norm(ref, axis=1)
                    return {"test_accuracy": round(float((out.argmax(1) == yte).mean() * 100), 2),
                            "test_logit_rel_l2": round(float(rel.mean()), 4)}

                for ratio in args.ratios:
                    for calibrated in (True, False) if args.data_free else (True,):
                        extra = {"calibration": calib} if calibrated else {}
                        t0 = time.perf_counter()
                        uni = graphprune.prune(str(path), ratio=ratio, round_to=1, **extra)
                        t1 = time.perf_counter()
                        f = _fractions(uni.report)
                        glo = graphprune.prune(str(path), target_macs=_exact_macs(uni.report), round_to=1, **extra)
                        t2 = time.perf_counter()
                        row = {
                            "model": f"digits {NAMES[args.arch]} ({exporter})", "seed": seed, "calibrated": calibrated,
                            "original_accuracy": round(float((ref.argmax(1) == yte).mean() * 100), 2),
                            "uniform_ratio": ratio,
                            "uniform": {**f, **judge(uni.model), "seconds": round(t1 - t0, 2),
                                        "holdout_rel_l2": (uni.report.get("fidelity") or {}).get("rel_l2")},
                            "global": {**_fractions(glo.report), **judge(glo.model), "seconds": round(t2 - t1, 2),
                                       "widths": [(w["units"], w["kept"]) for w in glo.report["budget"]["widths"]],
                                       **(_chosen(glo.report) if calibrated else {})},
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
            glo = graphprune.prune(str(path), head_ratio=0.0, target_macs=_exact_macs(uni.report),
                                   calibration=str(calib))
            t2 = time.perf_counter()
            row = {"model": "all-MiniLM-L6-v2", "calibrated": True, "uniform": f"--head-ratio 0 --mlp-ratio {mlp}",
                   "uniform_result": {**f, **judge(uni.model), "seconds": round(t1 - t0, 1),
                                      "holdout_rel_l2": (uni.report.get("fidelity") or {}).get("rel_l2")},
                   "uniform_ratio": mlp,
                   "global_result": {**_fractions(glo.report), **judge(glo.model), "seconds": round(t2 - t1, 1),
                                     "widths": [(w["units"], w["kept"]) for w in glo.report["budget"]["widths"]],
                                     **_chosen(glo.report)}}
            print(json.dumps(row), flush=True)
            rows.append(row)
    return rows


def _key(row: dict) -> tuple:
    return (row["model"], row.get("seed"), row.get("calibrated"), row.get("uniform_ratio"))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="digits", help="digits,minilm")
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.5, 0.7],
                        help="digits: uniform ratios (0.5, 0.7: about 0.25x and 0.10x MACs)")
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2],
                        help="digits: training / split / calibration seeds")
    parser.add_argument("--arch", default="cnn", choices=("cnn", "resnet"),
                        help="digits: the 3-conv CNN of calibration_digits.py or the 6-group residual net")
    parser.add_argument("--data-free", action="store_true", help="digits: also the pair without calibration")
    parser.add_argument("--mlp-ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    out = Path(args.out)
    for name in args.models.split(","):
        rows = {"digits": digits, "minilm": minilm}[name](args)
        fresh = {_key(r) for r in rows}
        results = json.loads(out.read_text()) if out.exists() else {}  # read now: runs may overlap
        results[name] = [r for r in results.get(name, []) if _key(r) not in fresh] + rows
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
