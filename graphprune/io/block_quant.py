"""Block-wise integer quantization of a float weight ``[rows, K]``: ``bits``-bit fields, one
scale (and zero point) per row and block of ``block`` inputs, as ``MatMulNBits`` stores it.

Rounding each weight to its nearest level (round-to-nearest, RTN) ignores how the layer's
inputs correlate. Given the inputs' second-moment matrix ``H = E[x x^T]`` (``[K, K]``), the
output error of a row ``w`` quantized to ``q`` is ``(w - q)^T H (w - q)``; quantizing the
inputs one at a time and moving each one's rounding error onto the inputs not yet quantized,
in proportion to the inverse of ``H`` (the optimal-brain-surgeon update; GPTQ, Frantar et al.
2023), makes that error much smaller than RTN's at the same bits. Each block's scale and zero
point are set from the block's values when the sweep reaches it (min-max over the block, with
0 inside the range). Columns go in chunks with one matrix product per chunk for the rest.
"""

from __future__ import annotations

import numpy as np

#: damping of ``H``, relative to its mean diagonal (GPTQ's default)
DAMP = 1e-2
#: columns rounded between two updates of the remaining ones
CHUNK = 128


def _block_params(w: np.ndarray, maxq: int, zero: np.ndarray | None, dtype: np.dtype | type) -> tuple[np.ndarray, np.ndarray]:
    """Scale (``dtype``-representable, as float64) and zero point per row of ``w``
    (``[rows, block]``): min-max with 0 in range; ``zero`` given: that zero point kept."""
    low, high = np.minimum(w.min(axis=1), 0.0), np.maximum(w.max(axis=1), 0.0)
    if zero is None:
        scale = (high - low) / maxq
        scale = np.where(scale > 0, scale, 1.0).astype(dtype).astype(np.float64)
        z = np.clip(np.rint(-low / scale), 0, maxq)
    else:
        z = zero.astype(np.float64)
        up = np.where(maxq - z > 0, high / np.maximum(maxq - z, 1e-30), 0.0)
        down = np.where(z > 0, -low / np.maximum(z, 1e-30), 0.0)
        scale = np.maximum(up, down)
        scale = np.where(scale > 0, scale, 1.0).astype(dtype).astype(np.float64)
    return scale, z


def _lower_inverse(low: np.ndarray) -> np.ndarray:
    """The inverse of a lower triangular matrix, by halves (two triangular inverses and two
    products a level: a third of the work of a general inverse, in matrix products)."""
    k = len(low)
    if k <= 128:
        return np.tril(np.linalg.inv(low))
    m = k // 2
    top, bottom = _lower_inverse(low[:m, :m]), _lower_inverse(low[m:, m:])
    out = np.zeros_like(low)
    out[:m, :m], out[m:, m:] = top, bottom
    out[m:, :m] = -(bottom @ low[m:, :m]) @ top
    return out


def inverse_cholesky_upper(h: np.ndarray) -> np.ndarray:
    """``U`` upper triangular with ``U^T U = H^-1`` (the Cholesky factor of ``H^-1``,
    transposed) without inverting ``H``: with the reversal ``P``, ``P H P = L L^T`` gives
    ``H^-1 = (P L^-1 P)^T (P L^-1 P)``, and ``P L^-1 P`` is upper triangular with a positive
    diagonal (the factor is unique). One Cholesky and one triangular inverse: about 1 K^3
    operations where ``cholesky(inv(H))`` takes 2.3 K^3 (an LLM's 8192-input layer)."""
    low = np.linalg.cholesky(np.ascontiguousarray(h[::-1, ::-1]))
    return np.ascontiguousarray(_lower_inverse(low)[::-1, ::-1])


def quantize_blocks(
    w: np.ndarray, bits: int, block: int, *, gram: np.ndarray | None = None,
    zero: np.ndarray | None = None, scale_dtype: np.dtype | type = np.float32,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(q [rows, K] uint8, scale [rows, blocks], zero [rows, blocks] uint8)`` for ``w``.

    ``gram``: the inputs' second moments (error feedback as in the module doc; ``None``: RTN);
    ``zero``: fixed zero points ``[rows, blocks]`` (a symmetric encoding, whose zero point is
    not stored), else one per block is chosen. ``K`` must be a whole number of blocks."""
    w = np.array(w, dtype=np.float64)  # a copy: the sweep updates it
    rows, k = w.shape
    blocks, maxq = k // block, (1 << bits) - 1
    q = np.zeros((rows, k), np.uint8)
    scale = np.zeros((rows, blocks))
    zeros = np.zeros((rows, blocks))
    u = None
    if gram is not None:
        h = np.array(gram, dtype=np.float64)
        dead = np.diag(h) <= 0
        h[dead, dead] = 1.0
        w[:, dead] = 0.0
        h[np.diag_indices(k)] += DAMP * max(float(np.mean(np.diag(h))), 1e-30)
        try:  # upper Cholesky factor of H^-1: row i spreads column i's error over i+1..
            u = inverse_cholesky_upper(h)
        except np.linalg.LinAlgError:
            u = None
    chunk = max(block, CHUNK // block * block)
    for c0 in range(0, k, chunk):
        c1 = min(c0 + chunk, k)
        part = w[:, c0:c1]
        errors = np.zeros_like(part)
        for i in range(c1 - c0):
            col = c0 + i
            if col % block == 0:
                b = col // block
                fixed = None if zero is None else zero[:, b]
                scale[:, b], zeros[:, b] = _block_params(part[:, i:i + block], maxq, fixed, scale_dtype)
            s, z = scale[:, col // block], zeros[:, col // block]
            level = np.clip(np.rint(part[:, i] / s) + z, 0, maxq)
            q[:, col] = level
            if u is None:
                continue
            err = (part[:, i] - (level - z) * s) / u[col, col]
            part[:, i:] -= np.outer(err, u[col, col:c1])
            errors[:, i] = err
        if u is not None and c1 < k:
            w[:, c1:] -= errors @ u[c0:c1, c1:]
    return q, scale.astype(scale_dtype), zeros.astype(np.uint8)


def dequantize_blocks(q: np.ndarray, scale: np.ndarray, zero: np.ndarray, block: int) -> np.ndarray:
    """``(q - zero) * scale`` per block, float64 ``[rows, K]``."""
    rows, k = q.shape
    grid = q.reshape(rows, k // block, block).astype(np.float64) - np.asarray(zero, np.float64)[..., None]
    return (grid * np.asarray(scale, np.float64)[..., None]).reshape(rows, k)
