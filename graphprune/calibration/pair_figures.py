"""Figures of one output of the pruned model against the original's: cosine and relative L2
(:func:`pair_figures`), per channel where channel sizes lie far apart (:func:`channel_spread`,
:func:`balanced_cosine`, :func:`channel_squares`), and the Spearman correlation of a few scores
over the samples (:func:`rank_correlation`). :mod:`graphprune.calibration.fidelity` gathers them."""

from __future__ import annotations

import numpy as np

from graphprune.verify.validate import finite_pair


def channel_spread(y: np.ndarray) -> float:
    """How far apart the sizes (RMS) of an output's channels (axis 1) are: the largest over the
    smallest non-zero one; 1 for an output of rank below 3. A detector's ``[1, 4 + C, anchors]``
    holds box coordinates in pixels beside class scores in [0, 1]: its cosine measures the boxes."""
    if y.ndim < 3 or y.shape[1] < 2 or not y.size:
        return 1.0
    rms = np.sqrt(np.mean(np.square(np.moveaxis(y.astype(np.float64), 1, 0).reshape(y.shape[1], -1)), axis=1))
    live = rms[rms > 0]
    return float(live.max() / live.min()) if live.size >= 2 else 1.0


def balanced_cosine(y: np.ndarray, p: np.ndarray) -> float | None:
    """Cosine with every channel (axis 1) scaled to the original's RMS 1 first, so that each
    channel counts alike (``None``: no channel with a size)."""
    a = np.moveaxis(y.astype(np.float64), 1, 0).reshape(y.shape[1], -1)
    b = np.moveaxis(p.astype(np.float64), 1, 0).reshape(p.shape[1], -1)
    rms = np.sqrt(np.mean(np.square(a), axis=1))
    live = rms > 0
    if not live.any():
        return None
    a, b = a[live] / rms[live, None], b[live] / rms[live, None]
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    return float(np.sum(a * b) / (na * nb)) if na > 0 and nb > 0 else float(na == nb)


#: channel sizes this far apart (largest RMS over the smallest) get a ``balanced_cosine``
SPREAD = 100.0
def ranks(values: np.ndarray) -> np.ndarray:
    """Ranks from 0, ties given their average rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    average = np.cumsum(counts) - (counts + 1) / 2.0
    return average[inverse]


def rank_correlation(y: np.ndarray, p: np.ndarray) -> float | None:
    """Spearman correlation over the samples (rows of ``y``, the original's, and ``p``) of
    each column with the same column of the other, averaged over the columns the original
    varies in; ``None`` when it varies in none."""
    found = []
    for a, b in zip(y.T.astype(np.float64), p.T.astype(np.float64), strict=True):
        if np.ptp(a) == 0:
            continue
        ra, rb = ranks(a), ranks(b)
        ra, rb = ra - ra.mean(), rb - rb.mean()
        scale = float(np.sqrt(np.sum(ra * ra) * np.sum(rb * rb)))
        found.append(float(np.sum(ra * rb) / scale) if scale > 0 else 0.0)
    return float(np.mean(found)) if found else None


def pair_figures(y: np.ndarray, p: np.ndarray) -> tuple[float, float]:
    """Cosine and relative L2 of one float output ``p`` against the original's ``y``; an output
    of another shape (a decoder loop that stops at another step) is (0, 1)."""
    if y.shape != p.shape:
        return 0.0, 1.0
    a, b = finite_pair(y, p)
    if a is None:  # non-finite where the original is not, or the other way round
        return 0.0, 1.0
    na, nb = float(np.linalg.norm(a)), float(np.linalg.norm(b))
    cosine = float(a @ b / (na * nb)) if na > 0 and nb > 0 else float(na == nb)
    return cosine, (float(np.linalg.norm(a - b) / na) if na > 0 else float(nb > 0))


def channel_squares(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per channel (axis 1): the squared error and the original's squared size."""
    a = np.moveaxis(y.astype(np.float64), 1, 0).reshape(y.shape[1], -1)
    b = np.moveaxis(p.astype(np.float64), 1, 0).reshape(p.shape[1], -1)
    return np.square(b - a).sum(axis=1), np.square(a).sum(axis=1)
