"""Importance criteria: one score per unit of a channel group (higher = more important).

Data-free criteria read the parameters of every member of the group:

- ``l1`` / ``l2``: for each weight member (a Conv/Gemm/MatMul weight, rank >= 2), the L1 / L2
  norm of each slice along the member axis, normalised by the member's mean so that layers
  of different scale weigh the same; a unit's score is the sum over members of the mean
  normalised norm of its elements (:class:`UnitVotes`). Groups without rank-2 weights use their
  1-D parameters. A per-channel scale or shift is no weight, whatever its rank (``group.affine``:
  tf2onnx's ``[1, C, 1, 1]`` BatchNorm ``Mul`` and ``Add``, a bias ``Add``): its values do not
  rank channels (measured on real data: ``docs/vs_onnxsim.md``, round 27).
  A quantized (integer) weight is scored as the float weight it decodes to (its per-channel
  scales and zero points applied); one without a known decoding is not scored.
- ``random``: seeded uniform scores (a baseline).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import ChannelGroup
from graphprune.analysis.dims import Dim
from graphprune.errors import UsageError
from graphprune.io.blocks import axis_norms
from graphprune.io.tensors import unpack_bits
from graphprune.io.weights import release

CRITERIA = ("l1", "l2", "random")


def widened_stream(group: ChannelGroup, tensors: dict[str, gs.Tensor]) -> bool:
    """Whether some units of ``group`` are written by more weights than others: a residual
    stream that a ``Pad`` widens (BlazeFace: every block writes the channels it holds; the
    channels padded in later exist only in the later blocks). Producer members of rank >= 2
    count (all producers where no weight holds a unit). A dense block's ``Concat`` is not one:
    each of its channels has one writer, however many later layers read it."""
    producers = group.producers
    weights = [d for d in producers if len(getattr(tensors.get(d[0]), "shape", None) or ()) >= 2]
    counts = np.zeros(group.num_units, dtype=np.int64)
    for dims in (weights, producers):
        for dim in dims:
            labels = group.unit_of.get(dim)
            if labels is not None:
                counts[np.unique(labels[labels >= 0])] += 1
        if counts.any():
            break
    held = counts[counts > 0]
    return held.size > 0 and bool((held != held[0]).any())


class UnitVotes:
    """Per-unit scores of a group: the sum over its members of each member's vote, the mean
    score of the unit's elements in that member (a member's votes are normalised by the
    caller). In a widened residual stream (:func:`widened_stream`) a sum would rank a unit by
    how many blocks hold it: a ratio would empty the late blocks' channels and leave the early,
    costly ones whole (MediaPipe's face detector at ratio 0.5: 0.79x MACs). There a unit that
    only some members hold is scored by its mean vote, scaled to the largest member count
    (``bench/offset_groups.py``). Elsewhere the sum stands: a dense block's early channel
    that every later layer reads is worth more than a late one that one layer reads."""

    def __init__(self, group: ChannelGroup, tensors: dict[str, gs.Tensor]) -> None:
        self.sums = np.zeros(group.num_units, dtype=np.float64)
        self.voters = np.zeros(group.num_units, dtype=np.int64)
        self.balance = widened_stream(group, tensors)

    def add(self, labels: np.ndarray, values: np.ndarray) -> None:
        """One member's element scores; ``labels[i]``: the unit of element ``i`` (-1: pinned)."""
        free = labels >= 0
        n = len(self.sums)
        sums = np.bincount(labels[free], weights=values[free], minlength=n).astype(np.float64)
        counts = np.bincount(labels[free], minlength=n)
        self.sums += np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        self.voters += counts > 0

    def scores(self) -> np.ndarray:
        out = self.sums.copy()
        if self.balance:
            full = self.voters.max(initial=0)
            partial = (self.voters > 0) & (self.voters < full)
            out[partial] *= full / self.voters[partial]
        return out


def weight_members(group: ChannelGroup, tensors: dict[str, gs.Tensor]) -> list[Dim]:
    """The members of ``group`` that are weights: constants of rank >= 2 that no op reads as a
    per-channel scale or shift (``group.affine``)."""
    return [d for d in group.params if isinstance(t := tensors.get(d[0]), gs.Constant)
            and len(t.shape or ()) >= 2 and d[0] not in group.affine]


def norm_scores(group: ChannelGroup, tensors: dict[str, gs.Tensor], order: int) -> np.ndarray:
    votes = UnitVotes(group, tensors)
    members = [d for d in group.params if isinstance(tensors.get(d[0]), gs.Constant)]
    weights = weight_members(group, tensors)
    for dim in weights or members:
        values = tensors[dim[0]].values  # a memory map stays one: its pages are released as read
        if not np.issubdtype(values.dtype, np.floating):
            decoding = group.decodings.get(dim[0])
            if decoding is None:
                continue
            scale, zero, bits = decoding  # a quantized weight: score the float weight it stands for
            values = (unpack_bits(values, bits) if bits < 8 else values).astype(np.float32)
            values -= zero.astype(np.float32)  # in place: one float copy of the weight, not three
            values *= scale.astype(np.float32)
        norms = axis_norms(values, dim[1], order)  # a block at a time: a mapped weight's pages go back as read
        if not np.isfinite(norms).all():  # a -inf row (an attention bias's "no path") is no magnitude
            if np.isnan(norms).any() and dim[0] not in group.non_finite:  # (NaN: a broken weight, said)
                group.non_finite.append(dim[0])
            norms = axis_norms(np.where(np.isfinite(values), values, 0), dim[1], order)
        release(tensors[dim[0]].values)  # and a decoded one's source
        mean = norms.mean()
        if mean > 0:
            norms = norms / mean
        votes.add(group.unit_of[dim], norms)
    return votes.scores()


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
