#!/usr/bin/env python3
"""Calibrated pruning of real PaddleOCR text recognisers, judged by the text they read.

PP-OCRv4, PP-OCRv5 and PP-OCRv6-small recognisers (SVTR-style, exported by paddle2onnx; from
the real-model corpus, ``bench/real_corpus.py``) carry their character table in the model's
metadata (``character``), so their CTC output decodes to text without anything else. The
corpus ships no images, so this script renders word crops: one or two random words (letters
and digits) in dark colours on a light, noisy background, cropped and resized to height 48
and padded to 48 x 320 the way PaddleOCR prepares a crop. Calibration and evaluation crops
come from different seeds and never overlap. Per model and ratio:

- ``data-free``: ``graphprune.prune(path, ratio=r)`` (l1, no calibration);
- ``calibrated``: ``graphprune.prune(path, ratio=r, calibration=feeds)`` (auto criterion,
  least-squares refit and the softmax-head distillation: the defaults with calibration);
- with ``--ablate-head``, ``calibrated, no softmax head``: the same without the distillation
  of the CTC head (``passes/softmax_head.py``, round 25), as before it.

With ``--onnxsim`` (needs ``onnxsim==0.8.1``), side by side with onnxsim's structured pruning
(L2, and Wanda with the same calibration crops) at the same sparsity, and graphprune at the
MACs onnxsim reached (``target_macs``; data-free and calibrated): equal cost.

Judged on the evaluation crops: the share of crops whose decoded text equals the original
model's (``same_text``), the character error rate against the original's text (edit
distance / length, ``cer``), and the share read correctly (``accuracy``, against the text
that was rendered; the original's own figure is the ceiling). MACs and parameters are counted
the same way for every output (``graphprune.verify.metrics`` at 1 x 3 x 48 x 320).

    .venv-bench/bin/python bench/calibration_ocr_rec.py --onnxsim   # needs Pillow
    .venv-bench/bin/python bench/calibration_ocr_rec.py --models ppocrv6_rec_small --ratios 0.3
    python bench/calibration_ocr_rec.py --ablate-head --out bench/results/calibration_ocr_rec_head.json

Results: ``bench/results/calibration_ocr_rec.json``.
"""

from __future__ import annotations

import argparse
import json
import string
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the checkout's graphprune, whatever is installed
from judged_bench import JudgedBench  # noqa: E402  (pruning runs, onnxsim side by side)
from real_corpus import model_path  # noqa: E402

RESULTS = HERE / "results" / "calibration_ocr_rec.json"
HEIGHT, WIDTH = 48, 320
SHAPES = {"x": (1, 3, HEIGHT, WIDTH)}
ALPHABET = string.ascii_letters + string.digits


def render(count: int, seed: int) -> tuple[np.ndarray, list[str]]:
    """``[count, 1, 3, 48, 320]`` normalised crops and the text each one shows."""
    from PIL import Image, ImageDraw, ImageFont

    rng = np.random.default_rng(seed)
    crops = np.zeros((count, 1, 3, HEIGHT, WIDTH), dtype=np.float32)
    texts = []
    for i in range(count):
        words = ["".join(rng.choice(list(ALPHABET), size=int(rng.integers(3, 9))))
                 for _ in range(int(rng.integers(1, 3)))]
        text = " ".join(words)
        font = ImageFont.load_default(size=int(rng.integers(28, 44)))
        left, top, right, bottom = font.getbbox(text)
        margin = int(rng.integers(3, 10))
        w, h = right - left + 2 * margin, bottom - top + 2 * margin
        base = rng.uniform(170, 255, size=3)
        noise = rng.normal(0.0, rng.uniform(2, 10), size=(h, w, 1))
        image = Image.fromarray(np.clip(base[None, None, :] + noise, 0, 255).astype(np.uint8), "RGB")
        colour = tuple(int(c) for c in rng.uniform(0, 90, size=3))
        ImageDraw.Draw(image).text((margin - left, margin - top), text, fill=colour, font=font)
        width = min(WIDTH, max(1, round(w * HEIGHT / h)))
        resized = np.asarray(image.resize((width, HEIGHT), Image.BILINEAR), dtype=np.float32)
        crops[i, 0, :, :, :width] = ((resized / 255.0 - 0.5) / 0.5).transpose(2, 0, 1)
        texts.append(text)
    return crops, texts


def characters(path: Path) -> list[str]:
    """The model's character table: CTC class 0 is the blank, class k the (k-1)-th entry,
    and a space after the table (PaddleOCR's ``use_space_char``)."""
    import onnx

    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    return ["", *meta["character"].splitlines(), " "]


def read(model, crops: np.ndarray, table: list[str]) -> list[str]:
    """Greedy CTC decoding: best class per step, repeats merged, blanks dropped."""
    from graphprune.verify.validate import session

    sess = session(model)
    name = sess.get_inputs()[0].name
    texts = []
    for x in crops:
        best = sess.run(None, {name: x})[0][0].argmax(-1)
        keep = [int(k) for j, k in enumerate(best) if k != 0 and (j == 0 or k != best[j - 1])]
        texts.append("".join(table[k] if k < len(table) else "?" for k in keep))
    return texts


def _distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        previous, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            previous, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, previous + (ca != cb))
    return row[-1]


def judge(reference: list[str], texts: list[str], truth: list[str]) -> dict:
    cer = sum(_distance(r, t) for r, t in zip(reference, texts, strict=True)) / max(
        1, sum(len(r) for r in reference))
    return {"same_text": round(float(np.mean([r == t for r, t in zip(reference, texts, strict=True)])), 4),
            "cer": round(cer, 4),
            "accuracy": round(float(np.mean([t == g for t, g in zip(texts, truth, strict=True)])), 4)}


class Bench(JudgedBench):
    input_name = "x"
    shapes = SHAPES

    def __init__(self, name: str, calib: np.ndarray, crops: np.ndarray, truth: list[str]) -> None:
        import onnx

        super().__init__(name, calib)
        self.crops, self.truth = crops, truth
        self.table = characters(model_path(name))
        self.reference = read(onnx.load(str(model_path(name))), crops, self.table)
        self.original_accuracy = judge(self.truth, self.reference, self.truth)["accuracy"]

    def judge(self, model) -> dict:
        return {**judge(self.reference, read(model, self.crops, self.table), self.truth),
                "original_accuracy": self.original_accuracy}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="ppocrv4_rec,ppocrv5_rec,ppocrv6_rec_small")
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5])
    parser.add_argument("--calibration", type=int, default=64, help="calibration crops (seed 1)")
    parser.add_argument("--evaluation", type=int, default=200, help="evaluation crops (seed 2)")
    parser.add_argument("--onnxsim", action="store_true", help="side by side with onnxsim.pruning")
    parser.add_argument("--ablate-head", action="store_true",
                        help="also run each calibrated prune without the softmax-head distillation (round 25)")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    (calib, _), (crops, truth) = render(args.calibration, seed=1), render(args.evaluation, seed=2)
    rows = []
    for name in args.models.split(","):
        bench = Bench(name, calib, crops, truth)
        bench.ablate_head = args.ablate_head
        print(f"{name}: the original reads {bench.original_accuracy:.1%} of the crops", flush=True)
        for ratio in args.ratios:
            rows.extend(bench.run(ratio, args.onnxsim))
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
