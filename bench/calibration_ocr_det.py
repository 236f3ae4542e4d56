#!/usr/bin/env python3
"""Calibrated pruning of real PaddleOCR text detectors on images with text.

PP-OCRv3 and PP-OCRv4 detection models (DBNet, exported by paddle2onnx; from the real-model
corpus, ``bench/real_corpus.py``) end in an up-sampling head of two ConvTranspose layers.
The corpus ships no images, so this script renders them: light, textured backgrounds with
3-8 lines of random words in dark colours at random sizes and places (Pillow's scalable
default font). Calibration and evaluation images come from different seeds and never
overlap. Per model and ratio:

- ``data-free``: ``graphprune.prune(path, ratio=r)`` (l1, no calibration);
- ``calibrated``: ``graphprune.prune(path, ratio=r, calibration=feeds)`` (auto criterion,
  refit of every linear layer downstream of a cut, the ConvTranspose layers included).

With ``--onnxsim`` (needs ``onnxsim==0.8.1``), side by side with onnxsim's structured
pruning (``onnxsim.pruning.apply_structured_pruning``, L2, and
``apply_structured_wanda_pruning`` with the same calibration images) at the same sparsities,
and graphprune at the MACs onnxsim reached (``target_macs``, data-free and calibrated): equal
cost.

Judged on the evaluation images against the original model: mean cosine of the text
probability maps, and the F1 of the text pixels (probability > 0.3, DBNet's threshold)
against the original's. MACs and parameters of every output are counted the same way
(``graphprune.verify.metrics`` on the model with its input fixed at 1x3x320x320).

    .venv-bench/bin/python bench/calibration_ocr_det.py --onnxsim  # needs Pillow; ~4 min here
    .venv-bench/bin/python bench/calibration_ocr_det.py --models ppocrv4_det --ratios 0.3

Results: ``bench/results/calibration_ocr_det.json``.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the checkout's graphprune, whatever is installed
from real_corpus import model_path  # noqa: E402
from vs_onnxsim import _cost  # noqa: E402  (one MAC/parameter counter for both comparisons)

RESULTS = HERE / "results" / "calibration_ocr_det.json"
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32)
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32)
THRESHOLD = 0.3
#: the input shape MACs are counted at
SHAPES = {"x": (1, 3, 320, 320)}


def _word(rng: np.random.Generator) -> str:
    alphabet = string.ascii_letters + string.digits
    return "".join(rng.choice(list(alphabet), size=int(rng.integers(2, 10))))


def render(count: int, seed: int, size: tuple[int, int] = (320, 320)) -> np.ndarray:
    """``[count, 1, 3, H, W]`` normalised images with lines of random words."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    h, w = size
    out = np.empty((count, 1, 3, h, w), dtype=np.float32)
    for i in range(count):
        base = rng.uniform(170, 255, size=3)
        noise = rng.normal(0.0, rng.uniform(2, 12), size=(h, w, 1))
        pixels = np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels, "RGB")
        draw = ImageDraw.Draw(image)
        for _ in range(int(rng.integers(3, 9))):
            font = ImageFont.load_default(size=int(rng.integers(12, 40)))
            text = " ".join(_word(rng) for _ in range(int(rng.integers(1, 5))))
            colour = tuple(int(c) for c in rng.uniform(0, 90, size=3))
            draw.text((int(rng.integers(0, w * 3 // 4)), int(rng.integers(0, h - 20))), text, fill=colour, font=font)
        x = (np.asarray(image, dtype=np.float32) / 255.0 - MEAN) / STD
        out[i, 0] = x.transpose(2, 0, 1)
    return out


def _maps(model, images: np.ndarray) -> np.ndarray:
    from graphprune.verify.validate import session

    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x})[0] for x in images])


def _judge(reference: np.ndarray, pruned: np.ndarray) -> dict:
    a, b = reference.reshape(len(reference), -1), pruned.reshape(len(pruned), -1)
    cosine = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
    ta, tb = a > THRESHOLD, b > THRESHOLD
    tp = (ta & tb).sum(1)
    f1 = 2 * tp / np.maximum(ta.sum(1) + tb.sum(1), 1)
    return {"cosine": round(float(cosine.mean()), 4), "text_f1": round(float(f1.mean()), 4),
            "text_share": round(float(ta.mean()), 4)}


def _row(name: str, ratio: float, kind: str, model, base: tuple[int, int], evaluation: np.ndarray,
         reference: np.ndarray, started: float, **extra) -> dict:
    macs, params = _cost(model, SHAPES)
    row = {"model": name, "ratio": ratio, "run": kind, "macs_ratio": round(macs / base[0], 4),
           "params_ratio": round(params / base[1], 4), **_judge(reference, _maps(model, evaluation)),
           "seconds": round(time.perf_counter() - started, 1), **extra}
    print(json.dumps(row), flush=True)
    return row


def _graphprune(name: str, level: float, kind: str, calib: np.ndarray | None, base: tuple[int, int],
                evaluation: np.ndarray, reference: np.ndarray, **options) -> dict:
    import graphprune

    started = time.perf_counter()
    if calib is not None:
        options["calibration"] = {"x": calib}
    result = graphprune.prune(str(model_path(name)), **options)
    report = result.report
    extra: dict = {"verified": bool(report["verification"]["ok"])}
    if calib is not None:
        calibration = report["calibration"]
        refit = calibration.get("passes", {}).get("RefitPass", {})
        extra.update(criteria=calibration.get("criteria_chosen"), refit_layers=refit.get("layers"),
                     not_refit=refit.get("not_refit", 0), holdout_cosine=report["fidelity"].get("cosine"))
    return _row(name, level, kind, result.model, base, evaluation, reference, started, **extra)


def run(name: str, ratio: float, calib: np.ndarray, evaluation: np.ndarray, reference: np.ndarray,
        base: tuple[int, int], onnxsim: bool) -> list[dict]:
    rows = [_graphprune(name, ratio, "data-free", None, base, evaluation, reference, ratio=ratio),
            _graphprune(name, ratio, "calibrated", calib, base, evaluation, reference, ratio=ratio)]
    if not onnxsim:
        return rows
    import onnx
    import onnxsim.pruning as pruning

    original = onnx.load(str(model_path(name)))
    for kind, call in (("onnxsim l2", lambda: pruning.apply_structured_pruning(original, sparsity=ratio)),
                       ("onnxsim wanda", lambda: pruning.apply_structured_wanda_pruning(
                           original, calibration_data=[{"x": x} for x in calib], sparsity=ratio))):
        started = time.perf_counter()
        row = _row(name, ratio, kind, call(), base, evaluation, reference, started)
        rows.append(row)
        if row["macs_ratio"] < 0.9999:  # graphprune at the same cost, with and without the data
            for label, data in (("data-free", None), ("calibrated", calib)):
                rows.append(_graphprune(name, ratio, f"{label} at {kind}'s MACs", data, base, evaluation,
                                        reference, target_macs=row["macs_ratio"]))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ppocrv3_det,ppocrv4_det")
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5])
    parser.add_argument("--calibration", type=int, default=64, help="calibration images (seed 1)")
    parser.add_argument("--evaluation", type=int, default=32, help="evaluation images (seed 2)")
    parser.add_argument("--onnxsim", action="store_true", help="side by side with onnxsim.pruning")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    calib, evaluation = render(args.calibration, seed=1), render(args.evaluation, seed=2)
    rows = []
    for name in args.models.split(","):
        import onnx

        original = onnx.load(str(model_path(name)))
        reference, base = _maps(original, evaluation), _cost(original, SHAPES)
        for ratio in args.ratios:
            rows.extend(run(name, ratio, calib, evaluation, reference, base, args.onnxsim))
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
