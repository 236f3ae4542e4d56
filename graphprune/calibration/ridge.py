"""The refit's least squares: statistics accumulated in two folds (:class:`Accumulator`),
the ridge solution towards the current weights (:func:`fit`), and two-fold cross-validation
of the ridge strength with every candidate from one eigen-decomposition per fold
(:class:`RidgePath`).

The refit (:func:`fit`) solves, for a fold's statistics ``G = [[A, g], [g^T, n]]``
(inputs and the constant-1 column) and ``C = [[C_x], [c^T]]``,
``(A + lam I) w + g b^T = C_x + lam a`` and ``g^T w + n b^T = c^T`` (the bias is not
regularised; ``a``: the current weights). Eliminating the bias gives
``(A_c + lam I) w = P_0 + lam a`` with ``A_c = A - g g^T / n``; with ``A_c = Q diag(d) Q^T``,
``w = Q z`` and ``z = (P + lam R) / (d + lam)`` (``P = Q^T P_0``, ``R = Q^T a``). The error on
the other fold, ``y2 + w~^T G_o w~ - 2 <w~, C_o>``, is then a quadratic form in
``delta = 1 / (d + lam)`` whose matrices are set up once: each candidate costs ``O(K^2 + K
outputs)`` instead of a solve and a ``K^2 x outputs`` product. The values equal those of an
explicit solve per candidate.
"""

from __future__ import annotations

import hashlib
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

#: ridge strength relative to the mean diagonal of the input Gram (the fit is pulled
#: towards the current weights, not towards zero); chosen per layer by two-fold
#: cross-validation over RIDGE_GRID unless the layer has more than CV_MAX_INPUTS inputs, or
#: more than CV_RICH_INPUTS inputs and at least ROWS_PER_INPUT rows per input (a fit that
#: well determined gains little from tuning the ridge, and each candidate costs a solve
#: cubic in the inputs: the conv layers of a large CNN)
DEFAULT_RIDGE = 1e-2
RIDGE_GRID = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 3e-2, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
CV_MAX_INPUTS = 2048
CV_RICH_INPUTS = 512
#: the ridges a well-determined layer (see above) still chooses from, by the same two-fold
#: validation with one solve per fold and strength: its rows are output positions of few
#: samples, correlated within a sample, so "4 rows per input" can still over-fit (Magika's
#: 960-input convolution: 0.01 -> 1.0 by validation, +1 to +3 points of top-1 agreement)
COARSE_GRID = (DEFAULT_RIDGE, 0.1, 1.0)
#: added to the regularised diagonal (as the explicit solve does)
JITTER = 1e-12
#: rows buffered before they are folded into a Gram (:class:`Accumulator`)
FLUSH_ROWS = 1024


@dataclass
class Accumulator:
    """Gram and cross statistics of one target (one block per conv group), kept in two
    folds (even and odd batches) so that the ridge strength can be cross-validated.

    Rows are buffered per fold and folded in :data:`FLUSH_ROWS` at a time: a batch of a few
    rows (one sentence of a transformer's calibration set) would otherwise rewrite the whole
    ``K x K`` Gram for a handful of rows (memory-bound, ~20x the time); call :meth:`flush`
    before reading ``gram``/``cross``."""

    gram: np.ndarray  # [2, g, K+1, K+1]
    cross: np.ndarray  # [2, g, K+1, og]
    y2: np.ndarray  # [2]
    rows: int = 0
    pending: tuple[list, list] = field(default_factory=lambda: ([], []))

    @classmethod
    def empty(cls, g: int, k: int, og: int) -> Accumulator:
        return cls(np.zeros((2, g, k + 1, k + 1)), np.zeros((2, g, k + 1, og)), np.zeros(2))

    def add(self, fold: int, xt: np.ndarray, y: np.ndarray) -> None:
        """``xt``: ``[R, g, K+1]`` inputs with the constant column, ``y``: ``[R, g, og]``."""
        self.y2[fold] += float(np.square(y, dtype=np.float64).sum())
        self.rows += xt.shape[0]
        buffer = self.pending[fold]
        buffer.append((xt, y))
        if sum(len(x) for x, _ in buffer) >= FLUSH_ROWS:
            self._fold_in(fold)

    def flush(self) -> None:
        for fold in (0, 1):
            self._fold_in(fold)

    def _fold_in(self, fold: int) -> None:
        buffer = self.pending[fold]
        if not buffer:
            return
        xt = buffer[0][0] if len(buffer) == 1 else np.concatenate([x for x, _ in buffer])
        y = buffer[0][1] if len(buffer) == 1 else np.concatenate([v for _, v in buffer])
        buffer.clear()
        if xt.shape[1] > 1:
            self.gram[fold] += np.einsum("rgk,rgl->gkl", xt, xt, optimize=True)
            self.cross[fold] += np.einsum("rgk,rgo->gko", xt, y, optimize=True)
        else:
            self.gram[fold, 0] += xt[:, 0].T @ xt[:, 0]
            self.cross[fold, 0] += xt[:, 0].T @ y[:, 0]


def fit(gram: np.ndarray, cross: np.ndarray, anchor: np.ndarray, lam: float) -> np.ndarray:
    """Ridge solution towards ``anchor`` (the bias row is not regularised)."""
    k = gram.shape[0] - 1
    reg = gram.copy()
    reg[np.arange(k), np.arange(k)] += lam + 1e-12
    rhs = cross.copy()
    rhs[:k] += lam * anchor[:k]
    try:
        return np.linalg.solve(reg, rhs)
    except np.linalg.LinAlgError:
        return np.linalg.lstsq(reg, rhs, rcond=None)[0]


def fit_fixed_bias(gram: np.ndarray, cross: np.ndarray, anchor: np.ndarray, lam: float) -> np.ndarray:
    """Ridge solution towards ``anchor`` with the bias row held at the anchor's (a layer
    that can take no other bias)."""
    k = gram.shape[0] - 1
    reg = gram[:k, :k].copy()
    reg[np.arange(k), np.arange(k)] += lam + 1e-12
    rhs = cross[:k] - np.outer(gram[:k, k], anchor[k]) + lam * anchor[:k]
    try:
        w = np.linalg.solve(reg, rhs)
    except np.linalg.LinAlgError:
        w = np.linalg.lstsq(reg, rhs, rcond=None)[0]
    return np.concatenate([w, anchor[k:k + 1]], axis=0)


def fit_error(gram: np.ndarray, cross: np.ndarray, y2: float, w: np.ndarray) -> float:
    """``sum ||y - w^T x~||^2`` from the statistics."""
    return float(y2 + np.sum(w * (gram @ w)) - 2 * np.sum(w * cross))


def bias_for(gram: np.ndarray, cross: np.ndarray, w: np.ndarray) -> np.ndarray:
    """The least-squares bias row for the weights ``w[:k]`` held fixed (``[K+1, og]`` layout)."""
    k = gram.shape[0] - 1
    n = float(gram[k, k])
    return (cross[k] - gram[k, :k] @ w[:k]) / n if n > 0 else w[k]


@dataclass
class GramBasis:
    """What a :class:`RidgePath` takes from the two folds' Grams alone: the eigen-decomposition
    of the centred fitting Gram and the held-out Gram in its basis. Layers that read one input
    at the same rows (a transformer's query, key and value projections; its gate and up
    projections: every position is a row of a short sequence) have equal Grams and share it."""

    d: np.ndarray
    q: np.ndarray  # eigenvectors, as columns
    n: float
    qg: np.ndarray  # q^T g (the fitting fold's input sums)
    h: np.ndarray  # q^T g_o (the held-out fold's)
    hq: np.ndarray  # q^T A_o q
    no: float

    @classmethod
    def of(cls, gram: np.ndarray, gram_o: np.ndarray) -> GramBasis:
        k = gram.shape[0] - 1
        a, g, n = gram[:k, :k], gram[:k, k], float(gram[k, k])
        if n <= 0:
            raise np.linalg.LinAlgError("empty fold")
        d, q = np.linalg.eigh(a - np.outer(g, g) / n)
        return cls(d, q, n, q.T @ g, q.T @ gram_o[:k, k], q.T @ gram_o[:k, :k] @ q, float(gram_o[k, k]))

    @property
    def nbytes(self) -> int:
        return self.q.nbytes + self.hq.nbytes


class GramBases:
    """The :class:`GramBasis` of recent Gram pairs, by their bytes' digest, up to
    ``limit`` bytes (a reconstruction keeps one for its layers)."""

    def __init__(self, limit: int = 256 << 20) -> None:
        self.limit = limit
        self._held: OrderedDict[bytes, GramBasis] = OrderedDict()
        self.hits = 0

    def get(self, gram: np.ndarray, gram_o: np.ndarray) -> GramBasis:
        digest = hashlib.blake2b(digest_size=20)
        for m in (gram, gram_o):
            digest.update(str((m.shape, m.dtype.str)).encode())
            digest.update(np.ascontiguousarray(m).data)
        key = digest.digest()
        basis = self._held.get(key)
        if basis is not None:
            self._held.move_to_end(key)
            self.hits += 1
            return basis
        basis = GramBasis.of(gram, gram_o)
        self._held[key] = basis
        while len(self._held) > 1 and sum(b.nbytes for b in self._held.values()) > self.limit:
            self._held.popitem(last=False)
        return basis


@dataclass
class RidgeChoices:
    """Per refit layer, the ridge its cross-validation chose and whether that fit paid on
    held-out rows (and, for a weight stored on an integer grid, whether the rounded fit paid:
    :func:`rounding_pays`). A reconstruction records them; the final refit of the same rewrite on every
    sample (:mod:`graphprune.pipeline.calibrated`) recalls them instead of validating again
    (``recall``): its two folds would hold the same rows and more, and the eigen-decompositions
    of a wide layer's Grams cost more than its fit (an SVTRv2's validation: a quarter of its
    reconstruction)."""

    chosen: dict[str, Any] = field(default_factory=dict)
    recall: bool = False

    def choose(self, key: str, validate: Callable[[], Any]) -> Any:
        if self.recall and key in self.chosen:
            return self.chosen[key]
        self.chosen[key] = choice = validate()
        return choice


class RidgePath:
    """Validation error on fold ``o`` of the ridge fit on fold ``f``, for any strength."""

    def __init__(self, gram: np.ndarray, cross: np.ndarray, anchor: np.ndarray,
                 gram_o: np.ndarray, cross_o: np.ndarray, y2_o: float, basis: GramBasis | None = None) -> None:
        k = gram.shape[0] - 1
        basis = basis or GramBasis.of(gram, gram_o)
        q, g, n = basis.q, gram[:k, k], basis.n
        self.d, self.n, self.y2 = basis.d, n, float(y2_o)
        self.p = q.T @ (cross[:k] - np.outer(g, cross[k]) / n)
        self.r = q.T @ anchor[:k]
        self.c = cross[k]
        self.q, self.h = basis.qg, basis.h
        self.f = q.T @ cross_o[:k]
        self.co, self.no = cross_o[k], basis.no
        h = basis.hq
        m = self.p @ self.r.T
        self.t0, self.t1, self.t2 = h * (self.p @ self.p.T), h * (m + m.T), h * (self.r @ self.r.T)

    def error(self, lam: float) -> float:
        delta = 1.0 / (self.d + lam + JITTER)
        z = (self.p + lam * self.r) * delta[:, None]
        quad = float(delta @ ((self.t0 + lam * self.t1 + lam * lam * self.t2) @ delta))
        b = (self.c - z.T @ self.q) / self.n
        return float(self.y2 + quad + 2.0 * b @ (z.T @ self.h) + self.no * b @ b
                     - 2.0 * (np.sum(z * self.f) + b @ self.co))


def choose_ridge(a: Accumulator, cur: np.ndarray, scale: list[float], fixed: float | None,
                 rows_per_input: int, bases: GramBases | None = None) -> tuple[float, bool]:
    """The ridge (relative to the mean Gram diagonal, ``fixed`` if given) with the smallest
    two-fold cross-validated error, and whether that fit beats the current weights ``cur`` on
    the rows it was not fitted on (``True`` where nothing is validated: a fixed ridge, an empty
    fold, a layer wider than :data:`CV_MAX_INPUTS`). Layers over :data:`CV_RICH_INPUTS` inputs
    with ``rows_per_input`` rows each choose from :data:`COARSE_GRID` by direct solves.
    ``bases``: the eigen-decompositions of Grams seen before (layers reading one input)."""
    g, k1 = a.gram.shape[1], a.gram.shape[2]
    inputs = (k1 - 1) * g
    if fixed is not None or not (a.y2 > 0).all() or inputs > CV_MAX_INPUTS:
        return (DEFAULT_RIDGE if fixed is None else fixed), True
    if inputs > CV_RICH_INPUTS and a.rows >= rows_per_input * (k1 - 1):
        return coarse_ridge(a, cur, scale, COARSE_GRID, DEFAULT_RIDGE)
    try:  # every candidate from one eigen-decomposition per fold and group
        paths = [(RidgePath(a.gram[f, j], a.cross[f, j], cur[j], a.gram[1 - f, j], a.cross[1 - f, j],
                            a.y2[1 - f], bases.get(a.gram[f, j], a.gram[1 - f, j]) if bases else None), scale[j])
                 for f in (0, 1) for j in range(g)]
    except np.linalg.LinAlgError:
        return DEFAULT_RIDGE, True
    best, best_error, worse = DEFAULT_RIDGE, math.inf, 0
    for ridge in sorted(RIDGE_GRID, reverse=True):  # the error is unimodal in the ridge:
        # walk down from the strongest and stop once it has risen twice
        total = sum(path.error(ridge * s) for path, s in paths)
        if total < best_error:
            best, best_error, worse = ridge, total, 0
        else:
            worse += 1
            if worse == 2:
                break
    current = sum(fit_error(a.gram[1 - f, j], a.cross[1 - f, j], float(a.y2[1 - f]), cur[j])
                  for f in (0, 1) for j in range(g))
    return best, best_error < current


def coarse_ridge(a: Accumulator, cur: np.ndarray, scale: list[float], grid: tuple[float, ...],
                 default: float) -> tuple[float, bool]:
    """The strength of ``grid`` with the smallest two-fold validation error, each fit
    solved directly (no eigen-decomposition), and whether it beats ``cur`` there; ``default``
    when a fold is empty."""
    g, k = a.gram.shape[1], a.gram.shape[2] - 1
    if (a.gram[:, :, k, k] <= 0).any():
        return default, True
    best, best_error = default, math.inf
    for ridge in grid:
        total = sum(fit_error(a.gram[1 - f, j], a.cross[1 - f, j], 0.0,
                              fit(a.gram[f, j], a.cross[f, j], cur[j], ridge * scale[j]))
                    for f in (0, 1) for j in range(g))
        if total < best_error:
            best, best_error = ridge, total
    current = sum(fit_error(a.gram[1 - f, j], a.cross[1 - f, j], 0.0, cur[j]) for f in (0, 1) for j in range(g))
    return best, best_error < current


def rounding_pays(a: Accumulator, cur: np.ndarray, ridge: float, scale: list[float],
                  rounded: Callable[[np.ndarray, int], np.ndarray], bias_free: bool) -> bool:
    """Whether a refit stored on an integer grid beats the current (stored) weights on rows it
    was not fitted on: for each fold, fit on it (``ridge``), round the weights as the encoding
    stores them (``rounded(w, fold)``: ``[g, K+1, og]`` in, the rounded weights out), refit the
    bias for them (``bias_free``), and compare the error on the other fold with the current
    weights'. A fit to too few rows gains on them what the rounding then adds everywhere else:
    a fresh rounding error on every weight of a layer that would otherwise keep the original's
    integers. ``True`` when a fold is empty (no test)."""
    g, k = a.gram.shape[1], a.gram.shape[2] - 1
    if (a.gram[:, :, k, k] <= 0).any():
        return True
    new = old = 0.0
    solve = fit if bias_free else fit_fixed_bias
    for f, o in ((0, 1), (1, 0)):
        w = rounded(np.stack([solve(a.gram[f, j], a.cross[f, j], cur[j], ridge * scale[j]) for j in range(g)]), f)
        if bias_free:
            w[:, k, :] = np.stack([bias_for(a.gram[f, j], a.cross[f, j], w[j]) for j in range(g)])
        new += sum(fit_error(a.gram[o, j], a.cross[o, j], 0.0, w[j]) for j in range(g))
        old += sum(fit_error(a.gram[o, j], a.cross[o, j], 0.0, cur[j]) for j in range(g))
    return new < old
