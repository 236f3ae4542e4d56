"""A heatmap read by its peak: beside the decisions kept at 0.5, where its arg-max went."""

from __future__ import annotations

import numpy as np

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
