"""Two-fold cross-validation of the refit's ridge strength, every candidate from one
eigen-decomposition per fold.

The refit (:func:`.sequential._fit`) solves, for a fold's statistics ``G = [[A, g], [g^T, n]]``
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

import numpy as np

#: added to the regularised diagonal (as the explicit solve does)
JITTER = 1e-12


class RidgePath:
    """Validation error on fold ``o`` of the ridge fit on fold ``f``, for any strength."""

    def __init__(self, gram: np.ndarray, cross: np.ndarray, anchor: np.ndarray,
                 gram_o: np.ndarray, cross_o: np.ndarray, y2_o: float) -> None:
        k = gram.shape[0] - 1
        a, g, n = gram[:k, :k], gram[:k, k], float(gram[k, k])
        if n <= 0:
            raise np.linalg.LinAlgError("empty fold")
        d, q = np.linalg.eigh(a - np.outer(g, g) / n)
        self.d, self.n, self.y2 = d, n, float(y2_o)
        self.p = q.T @ (cross[:k] - np.outer(g, cross[k]) / n)
        self.r = q.T @ anchor[:k]
        self.c = cross[k]
        self.q = q.T @ g
        self.h = q.T @ gram_o[:k, k]
        self.f = q.T @ cross_o[:k]
        self.co, self.no = cross_o[k], float(gram_o[k, k])
        h = q.T @ gram_o[:k, :k] @ q
        m = self.p @ self.r.T
        self.t0, self.t1, self.t2 = h * (self.p @ self.p.T), h * (m + m.T), h * (self.r @ self.r.T)

    def error(self, lam: float) -> float:
        delta = 1.0 / (self.d + lam + JITTER)
        z = (self.p + lam * self.r) * delta[:, None]
        quad = float(delta @ ((self.t0 + lam * self.t1 + lam * lam * self.t2) @ delta))
        b = (self.c - z.T @ self.q) / self.n
        return float(self.y2 + quad + 2.0 * b @ (z.T @ self.h) + self.no * b @ b
                     - 2.0 * (np.sum(z * self.f) + b @ self.co))
