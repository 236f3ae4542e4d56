"""The held-out relative L2 that decides whether a reconstruction stays is pooled over the
samples. Averaged per sample, a crop without text (a seal detector's map ~0 there) made it
5.99 -> 4109 while the cosine rose from 0.19 to 0.54: the reconstruction was undone, and the
model written was worse on real images (cosine 0.186; kept: 0.334)."""

import numpy as np

from graphprune.calibration.fidelity import compare_outputs


def test_a_near_zero_sample_does_not_decide_the_pooled_figure():
    rng = np.random.default_rng(0)
    maps = [rng.random((1, 1, 16, 16)).astype(np.float32) for _ in range(4)]
    maps.append(np.full((1, 1, 16, 16), 1e-6, np.float32))  # nothing to detect
    close = [m + 0.05 * rng.standard_normal(m.shape).astype(np.float32) for m in maps]
    result = compare_outputs(["map"], [[m] for m in maps], [[c] for c in close])
    entry = result["outputs"]["map"]
    assert entry["rel_l2"] > 1000  # the empty map's error, relative to ~0, dominates the mean
    assert entry["pooled_rel_l2"] < 0.2  # pooled: 0.05 noise on maps of RMS ~0.58
    assert result["pooled_rel_l2"] == entry["pooled_rel_l2"]
    same = compare_outputs(["map"], [[m] for m in maps], [[m] for m in maps])
    assert same["pooled_rel_l2"] == 0.0


def test_a_sigmoid_output_reports_its_decisions_at_one_half():
    """A word segmenter's per-character boundary probability ``[n, 1]`` (DeepCut): no class to
    take an arg-max of, and a cosine of 0.97 beside 4 % of its decisions flipped. The share of
    elements on the same side of 0.5 is reported; not where the values leave [0, 1], where the
    original decides one way only, or where a top-1 agreement applies."""
    rng = np.random.default_rng(0)
    y = [rng.uniform(0, 1, (40, 1)) for _ in range(4)]
    p = [v.copy() for v in y]
    for v in p:
        v[:4] = 1 - v[:4]  # 4 of 40 elements cross 0.5 where they were away from it
    flipped = np.mean([np.mean((a > 0.5) == (b > 0.5)) for a, b in zip(y, p, strict=True)])
    figures = compare_outputs(["prob"], [[v] for v in y], [[v] for v in p])
    assert figures["outputs"]["prob"]["threshold_agreement"] == round(float(flipped), 6) < 1
    assert figures["threshold_agreement"] == figures["outputs"]["prob"]["threshold_agreement"]
    assert "top1_agreement" not in figures["outputs"]["prob"]

    scaled = compare_outputs(["x"], [[2 * v] for v in y], [[2 * v] for v in p])  # not in [0, 1]
    assert "threshold_agreement" not in scaled["outputs"]["x"]
    low = compare_outputs(["x"], [[v / 4] for v in y], [[v / 4] for v in p])  # below 0.5 everywhere
    assert "threshold_agreement" not in low["outputs"]["x"]
    scores = [rng.dirichlet(np.ones(5))[None] for _ in range(4)]  # one row of class probabilities
    classes = compare_outputs(["c"], [[v] for v in scores], [[v] for v in scores])
    assert classes["outputs"]["c"]["top1_agreement"] == 1 and "threshold_agreement" not in classes["outputs"]["c"]
