"""Importance criteria: one score per unit of a channel group (higher = more important).

Data-free criteria read the parameters of every member of the group:

- ``l1`` / ``l2``: for each weight member (a Conv/Gemm/MatMul weight, rank >= 2), the L1 / L2
  norm of each slice along the member axis, normalised by the member's mean so that layers
  of different scale weigh the same; a unit's score is the sum over members of the mean
  normalised norm of its elements. Groups without rank-2 weights use their 1-D parameters.
  A quantized (integer) weight is scored as the float weight it decodes to (its per-channel
  scales and zero points applied); one without a known decoding is not scored.
- ``random``: seeded uniform scores (a baseline).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import ChannelGroup
from graphprune.errors import UsageError
from graphprune.io.tensors import unpack_bits
from graphprune.io.weights import release

CRITERIA = ("l1", "l2", "random")


def _slice_norms(values: np.ndarray, axis: int, order: int) -> np.ndarray:
    """Per-slice L1/L2 norms along ``axis``, in chunks (no full-size temporaries)."""
    values = np.asarray(values)
    moved = np.moveaxis(values, axis, 0)
    out = np.empty(moved.shape[0], dtype=np.float64)
    chunk = max(1, (1 << 22) // max(1, moved[0].size))
    for start in range(0, moved.shape[0], chunk):
        block = np.asarray(moved[start : start + chunk], dtype=np.float32).reshape(
            min(chunk, moved.shape[0] - start), -1
        )
        if order == 1:
            out[start : start + chunk] = np.abs(block).sum(axis=1, dtype=np.float64)
        else:
            out[start : start + chunk] = np.sqrt(np.square(block).sum(axis=1, dtype=np.float64))
    return out


def norm_scores(group: ChannelGroup, tensors: dict[str, gs.Tensor], order: int) -> np.ndarray:
    scores = np.zeros(group.num_units, dtype=np.float64)
    members = [d for d in group.params if isinstance(tensors.get(d[0]), gs.Constant)]
    weights = [d for d in members if np.asarray(tensors[d[0]].values).ndim >= 2]
    for dim in weights or members:
        values = np.asarray(tensors[dim[0]].values)
        if not np.issubdtype(values.dtype, np.floating):
            decoding = group.decodings.get(dim[0])
            if decoding is None:
                continue
            scale, zero, bits = decoding  # a quantized weight: score the float weight it stands for
            values = (unpack_bits(values, bits) if bits < 8 else values).astype(np.float32)
            values -= zero.astype(np.float32)  # in place: one float copy of the weight, not three
            values *= scale.astype(np.float32)
        norms = _slice_norms(values, dim[1], order)
        release(tensors[dim[0]].values)  # a mapped weight's pages go back to the kernel
        mean = norms.mean()
        if mean > 0:
            norms = norms / mean
        labels = group.unit_of[dim]
        free = labels >= 0  # -1: a pinned element (no unit)
        sums = np.bincount(labels[free], weights=norms[free], minlength=group.num_units).astype(np.float64)
        counts = np.bincount(labels[free], minlength=group.num_units)
        scores += np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
    return scores


def score_group(
    group: ChannelGroup, tensors: dict[str, gs.Tensor], criterion: str, rng: np.random.Generator
) -> np.ndarray:
    if criterion == "l1":
        return norm_scores(group, tensors, 1)
    if criterion == "l2":
        return norm_scores(group, tensors, 2)
    if criterion == "random":
        return rng.random(group.num_units)
    raise UsageError(f"unknown criterion '{criterion}' (choose from {', '.join(CRITERIA)})")


def get_criterion(name: str) -> Callable[..., np.ndarray]:
    if name not in CRITERIA:
        raise UsageError(f"unknown criterion '{name}' (choose from {', '.join(CRITERIA)})")
    return score_group
