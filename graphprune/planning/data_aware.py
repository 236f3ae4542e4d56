"""Data-aware importance criteria: scores from calibration statistics of layer inputs.

A unit of a channel group is read by the *consumers* of the group: linear layers whose
weight has the group's axis as its input axis (role ``consumer``). With ``x_c`` the input
channel ``c`` of a consumer over the calibration data (every position of every sample) and
``W[:, c]`` the weights that read it (all outputs and kernel offsets):

- ``activation``: ``sqrt(E[x_c^2])``, the channel's RMS activation;
- ``wanda``: ``sqrt(sum x_c^2) * sum |W[:, c]|`` (Wanda's ``|W| * ||x||``, summed over the
  weights of the channel);
- ``flap``: ``Var(x_c) * ||W[:, c]||^2`` (FLAP's fluctuation: what a constant, the channel's
  mean, cannot compensate);
- ``reconstruction``: ``||W[:, c]||^2 / [G^-1]_cc`` with ``G`` the (ridge-regularised)
  second-moment matrix of the consumer's input channels: the increase of the layer's
  squared output error when channel ``c`` is removed and the remaining channels are refit
  by least squares (the optimal-brain-surgeon saliency of a whole input column). Without a
  Gram (layers wider than :data:`~graphprune.calibration.stats.GRAM_MAX_CHANNELS`) the
  diagonal approximation ``E[x_c^2] ||W[:, c]||^2`` is used;
- ``obs``: the same saliency applied greedily (ZipLM / SlimGPT): remove the unit of least
  saliency, update the remaining columns for the optimal compensation and the inverse Gram
  (rank-``k`` downdate for a unit of ``k`` columns: a head), repeat, one unit per step; a
  unit's score is the saliency at which it went (made non-decreasing), the first half of
  the units greedily and the rest from the saliencies at that point. Layers over
  :data:`GREEDY_MAX_CHANNELS` channels use ``reconstruction``.

``auto`` (the default with calibration data) picks, per group, the candidate criterion whose
removal sets leave the smallest output error in the group's consumers once the kept channels
are refit: ``||W_R^T [G^-1]_RR^-1 W_R||`` summed over the consumers and over removal
fractions :data:`AUTO_FRACTIONS`, relative to each consumer's output energy (the error that
the least-squares refit cannot remove, computed from the Gram alone). The choice per group
is in ``report["calibration"]["criteria_chosen"]``, which also counts the groups scored
data-free for want of statistics.

As for the data-free criteria, the element scores of each consumer member are averaged per
unit and normalised by their mean, and a unit's score is the sum over the members. A group
with no consumer that has statistics falls back to the data-free ``l2`` score.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import CONSUMER, Analysis, ChannelGroup
from graphprune.calibration.held import held_views
from graphprune.calibration.linear import LinearView, linear_view
from graphprune.calibration.recurrent import consumer_views as recurrent_consumers
from graphprune.calibration.stats import ChannelStats, LayerStats
from graphprune.planning.importance import UnitVotes, norm_scores

DATA_CRITERIA = ("activation", "wanda", "flap", "reconstruction", "obs")
#: what ``auto`` is called in the report: a choice among AUTO_CANDIDATES per group
AUTO_CRITERION = "auto"
AUTO_CANDIDATES = ("obs", "reconstruction", "wanda", "flap", "activation")
#: removal fractions at which ``auto`` compares the candidates
AUTO_FRACTIONS = (0.25, 0.5)
#: widest consumer (input channels) scored greedily by ``obs``
GREEDY_MAX_CHANNELS = 1536
#: ridge of the reconstruction criterion, relative to the mean diagonal of the Gram
GRAM_RIDGE = 1e-2


def consumer_views(analysis: Analysis) -> dict[str, LinearView]:
    """The linear layers that consume a prunable group, keyed by their weight's name (and the
    weights of recurrent layers: :class:`~graphprune.calibration.recurrent.RecurrentConsumerView`;
    weights held in attributes: :class:`~graphprune.calibration.held.HeldConsumerView`)."""
    wanted: set[tuple[str, int]] = set()
    for group in analysis.groups:
        if group.prunable:
            wanted.update(d for d in group.params if group.roles.get(d) == CONSUMER)
    views: dict[str, LinearView] = {}
    for node in analysis.graph.nodes:
        linear = linear_view(node, analysis.opset)
        found: list[Any] = [linear] if linear is not None else (
            recurrent_consumers(node, analysis.opset) or held_views(node, analysis.context))
        for view in found:
            if view.group == 1 and view.weight_dim(view.info.in_axis) in wanted:
                views[view.weight.name] = view
    return views


def _columns(view: LinearView) -> np.ndarray:
    """Weights as ``[out, in, kernel]`` (alpha folded in)."""
    mats = view.matrices()[0]  # [out, K] with K = in * kernel
    return mats.reshape(mats.shape[0], view.in_channels(), -1)


def _inverse_gram(stats: ChannelStats) -> np.ndarray | None:
    """Inverse of the ridge-regularised, sample-normalised channel Gram (``None``: none)."""
    if stats.gram is None or not stats.gram_rows:
        return None
    cached = getattr(stats, "_inverse", None)
    if cached is not None:
        return cached
    gram = stats.gram / stats.gram_rows
    if not np.isfinite(gram).all():  # activations that overflow (or are infinite) tell nothing
        return None
    gram = gram + GRAM_RIDGE * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(len(gram))
    try:
        inverse = np.linalg.inv(gram)
    except np.linalg.LinAlgError:
        return None
    stats._inverse = inverse  # type: ignore[attr-defined]
    return inverse


def _rows(view: LinearView) -> np.ndarray:
    """Weights as ``[out * kernel, in]``: one row per output and kernel offset."""
    w = _columns(view)
    return np.ascontiguousarray(w.transpose(0, 2, 1).reshape(-1, w.shape[1]))


def compressed(w: np.ndarray) -> np.ndarray:
    """``w`` (``[rows, C]``) or, with more rows than columns, a ``[C, C]`` factor ``R`` with
    ``R^T R = w^T w`` (Cholesky; the symmetric square root if singular), so every column norm and inner product — all
    that the saliencies and removal errors read — is the same, and a column update
    ``w - w[:, e] A`` maps to ``R - R[:, e] A``; much cheaper for a conv consumer (rows =
    outputs x kernel offsets)."""
    if w.shape[0] <= w.shape[1]:
        return w
    gram = w.T @ w
    try:
        return np.linalg.cholesky(gram).T
    except np.linalg.LinAlgError:  # rank-deficient: the symmetric square root
        values, vectors = np.linalg.eigh(gram)
        return np.sqrt(np.maximum(values, 0.0))[:, None] * vectors.T


def _greedy_columns(w: np.ndarray, hinv: np.ndarray, count: int) -> np.ndarray:
    """Greedy optimal-brain-surgeon removal of ``count`` single columns, one per step; the
    score of every column (see :func:`_greedy`).

    Nothing of size ``C x C`` is rewritten per step: with ``M = w^T w`` (all that the
    saliencies ``M_cc / H_cc`` read), the removal of column ``e`` with ``a = H_e / H_ee``
    updates ``H <- H - H_e H_e^T / H_ee`` and ``M <- M - b a^T - a b^T`` with
    ``b = M_e - M_ee a / 2`` (the columns of ``w`` moving by ``-w_e a^T``, the optimal
    compensation). Both stay their initial value minus the rank-one terms of the steps so
    far; a step forms only the two columns it needs and updates the diagonals, ``O(C t)``
    at step ``t`` instead of ``O(C^2)``."""
    h0 = np.asarray(hinv, dtype=np.float64)
    wc = compressed(np.asarray(w, dtype=np.float64))
    m0 = wc.T @ wc
    size = len(h0)
    # one row per step (contiguous prefixes: ``u_[:t].T @ v`` is one pass over memory)
    u_, a_, b_ = (np.zeros((count, size)) for _ in range(3))
    dh, dm = np.diag(h0).copy(), np.diag(m0).copy()
    alive = np.ones(size, bool)
    score = np.zeros(size)
    level = 0.0
    for t in range(count):
        sal = np.where(alive, dm / np.maximum(dh, 1e-30), np.inf)
        c = int(np.argmin(sal))
        level = max(level, float(sal[c]))
        score[c], alive[c] = level, False
        he = h0[:, c] - u_[:t].T @ u_[:t, c]
        hee = float(he[c])
        if not hee > 0.0:
            continue
        me = m0[:, c] - b_[:t].T @ a_[:t, c] - a_[:t].T @ b_[:t, c]
        a = he / hee
        b = me - 0.5 * float(me[c]) * a
        u_[t], a_[t], b_[t] = he / np.sqrt(hee), a, b
        dh -= he * he / hee
        dm -= 2.0 * a * b
    if alive.any():
        score[alive] = level + dm[alive] / np.maximum(dh[alive], 1e-30)
    return score


def _greedy(w: np.ndarray, hinv: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Greedy optimal-brain-surgeon removal of whole units (see module doc); one score per
    element (its unit's)."""
    units = [np.flatnonzero(labels == u) for u in np.unique(labels) if u >= 0]  # -1: pinned, kept
    if all(len(e) == 1 for e in units):  # one column per unit: its score is the column's
        return _greedy_columns(w, hinv, (len(units) + 1) // 2)
    return _greedy_units(w, hinv, units, len(labels))


def _greedy_units(w: np.ndarray, hinv: np.ndarray, units: list[np.ndarray], size: int) -> np.ndarray:
    """The greedy removal for units of several columns (a head: a rank-``k`` block update
    per step)."""
    n = len(units)
    w = np.ascontiguousarray(compressed(np.asarray(w, dtype=np.float64)), dtype=np.float32)
    h = hinv.astype(np.float32)
    alive = np.ones(n, bool)
    score = np.zeros(n)
    level = 0.0

    by_size: dict[int, list[int]] = {}
    for u, e in enumerate(units):
        by_size.setdefault(len(e), []).append(u)

    def saliency() -> np.ndarray:
        """``w_e H_ee^-1 w_e^T`` of every live unit: one batched solve per unit size (the
        same LAPACK solve per block as one call each, summed in the same element order)."""
        sal = np.full(n, np.inf)
        for k, members in by_size.items():
            live = [u for u in members if alive[u]]
            if not live:
                continue
            cols = np.stack([units[u] for u in live])  # [m, k]
            blocks = h[cols[:, :, None], cols[:, None, :]] + 1e-12 * np.eye(k, dtype=h.dtype)
            rows = np.ascontiguousarray(w[:, cols].transpose(1, 0, 2))  # [m, out, k]
            solved = np.linalg.solve(blocks, rows.transpose(0, 2, 1))  # [m, k, out]
            sal[live] = (rows * solved.transpose(0, 2, 1)).reshape(len(live), -1).sum(axis=1)
        return sal

    removed = 0
    while removed < (n + 1) // 2:
        sal = saliency()
        u = int(np.argsort(sal, kind="stable")[0])
        level = max(level, float(sal[u]))
        score[u] = level
        alive[u] = False
        removed += 1
        e = units[u]
        inv_block = np.linalg.pinv(h[np.ix_(e, e)])
        w -= (w[:, e] @ inv_block) @ h[e, :]
        h -= h[:, e] @ inv_block @ h[e, :]
    if alive.any():
        sal = saliency()
        score[alive] = level + sal[alive]
    out = np.zeros(size)
    for u, e in enumerate(units):
        out[e] = score[u]
    return out


def element_scores(
    view: LinearView, stats: ChannelStats, criterion: str, labels: np.ndarray | None = None
) -> np.ndarray | None:
    """One score per input channel of ``view`` (``labels``: the unit of every channel, for
    ``obs``, which removes whole units)."""
    w = _columns(view)
    if stats.total is None or stats.total.shape[0] != w.shape[1]:
        return None
    if criterion == "activation":
        return np.sqrt(stats.second_moment)
    if criterion == "wanda":
        return np.sqrt(stats.second_moment * stats.count) * np.abs(w).sum(axis=(0, 2))
    squares = np.square(w).sum(axis=(0, 2))
    if criterion == "flap":
        return stats.variance * squares
    if criterion not in ("reconstruction", "obs"):
        raise ValueError(f"unknown data-aware criterion '{criterion}'")
    inverse = _inverse_gram(stats)
    if inverse is None:
        return stats.second_moment * squares
    if criterion == "obs" and len(inverse) <= GREEDY_MAX_CHANNELS:
        units = labels if labels is not None and len(labels) == len(inverse) else np.arange(len(inverse))
        return _greedy(_rows(view), inverse, units)
    return squares / np.maximum(np.diag(inverse), 1e-30)


def removal_error(view: LinearView, stats: ChannelStats, remove: np.ndarray) -> float | None:
    """Relative output error of ``view`` when input channels ``remove`` go and the others
    are refit by least squares: ``tr(W_R [G^-1]_RR^-1 W_R^T) / tr(W G W^T)``; for a consumer
    that nothing refits (``view.refit`` false: a weight held in an attribute), what the removed
    channels carried: ``tr(W_R G_RR W_R^T) / tr(W G W^T)``."""
    inverse = _inverse_gram(stats)
    if inverse is None or not len(remove):
        return None if inverse is None else 0.0
    cached = getattr(stats, "_energy", None)
    gram = stats.gram / max(stats.gram_rows, 1)  # type: ignore[operator]
    if cached is None or cached[0] is not view:
        w = np.ascontiguousarray(compressed(_rows(view)))
        cached = (view, w, float(np.sum(w * (w @ gram))))
        stats._energy = cached  # type: ignore[attr-defined]
    _, w, energy = cached
    wr = w[:, remove]
    if not getattr(view, "refit", True):
        return float(np.sum(wr * (wr @ gram[np.ix_(remove, remove)]))) / max(energy, 1e-30)
    block = inverse[np.ix_(remove, remove)]
    try:
        error = float(np.sum(wr.T * np.linalg.solve(block, wr.T)))
    except np.linalg.LinAlgError:
        return None
    return error / max(energy, 1e-30)


def _consumers(
    group: ChannelGroup, views: dict[str, LinearView], stats: LayerStats
) -> list[tuple[LinearView, ChannelStats, np.ndarray]]:
    """The consumer members of ``group`` that have statistics, with their unit labels."""
    out = []
    for dim in group.params:
        if group.roles.get(dim) != CONSUMER:
            continue
        view = views.get(dim[0])
        if view is None or dim != view.weight_dim(view.info.in_axis):
            continue
        layer = stats.get(view.node.name)
        labels = group.unit_of.get(dim)
        if layer is not None and labels is not None:  # a packed weight's block: its channels
            out.append((view, layer, np.repeat(np.asarray(labels), view.in_block)))
    return out


def group_scores(
    group: ChannelGroup,
    views: dict[str, LinearView],
    stats: LayerStats,
    criterion: str,
    fallback: Callable[[ChannelGroup], np.ndarray],
    tensors: dict[str, gs.Tensor],
) -> np.ndarray:
    """Data-aware scores of every unit of ``group`` (``fallback`` without statistics)."""
    votes = UnitVotes(group, tensors)
    used = 0
    for view, layer, labels in _consumers(group, views, stats):
        values = element_scores(view, layer, criterion, labels)
        if values is None or len(labels) != len(values):
            continue
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0)
        mean = values.mean()
        if mean > 0:
            values = values / mean
        votes.add(labels, values)
        used += 1
    return votes.scores() if used else fallback(group)


def plan_error(
    group: ChannelGroup, consumers: list[tuple[LinearView, ChannelStats, np.ndarray]], scores: np.ndarray
) -> float | None:
    """Sum over :data:`AUTO_FRACTIONS` and consumers of the relative error left after refit
    when the lowest-scoring units go (``None``: not measurable)."""
    order = np.argsort(scores, kind="stable")
    total = 0.0
    for fraction in AUTO_FRACTIONS:
        gone = order[: int(round(fraction * group.num_units))]
        for view, layer, labels in consumers:
            error = removal_error(view, layer, np.flatnonzero(np.isin(labels, gone)))
            if error is None:
                return None
            total += error
    return total


#: the ``criteria_chosen`` entry for groups no consumer with statistics reads (a consumer
#: that is no float linear layer, e.g. a QOperator integer kernel): scored data-free
NO_STATISTICS = "l2 (data-free: no consumer with statistics)"


class DataAwareScorer:
    """``group -> scores`` for the planner; ``auto`` chooses a criterion per group
    (``chosen``: groups per criterion)."""

    def __init__(self, analysis: Analysis, views: dict[str, LinearView], stats: LayerStats, criterion: str) -> None:
        self.views, self.stats, self.criterion = views, stats, criterion
        self.tensors = analysis.context.tensors
        self.chosen: dict[str, int] = {}

    def fallback(self, group: ChannelGroup) -> np.ndarray:
        return norm_scores(group, self.tensors, 2)

    def __call__(self, group: ChannelGroup) -> np.ndarray:
        consumers = _consumers(group, self.views, self.stats)
        if not consumers:  # said in the report: these groups were not scored from data
            self.chosen[NO_STATISTICS] = self.chosen.get(NO_STATISTICS, 0) + 1
            return self.fallback(group)
        if self.criterion != AUTO_CRITERION:
            return group_scores(group, self.views, self.stats, self.criterion, self.fallback, self.tensors)
        best: tuple[float, str, np.ndarray] | None = None
        seen: dict[bytes, float] = {}
        for name in AUTO_CANDIDATES:
            scores = group_scores(group, self.views, self.stats, name, self.fallback, self.tensors)
            key = np.argsort(scores, kind="stable").tobytes()
            error = seen.get(key)
            if error is None:
                error = plan_error(group, consumers, scores) if consumers else None
                if error is None:  # nothing to compare: the first candidate
                    self.chosen[name] = self.chosen.get(name, 0) + 1
                    return scores
                seen[key] = error
            if best is None or error < best[0]:
                best = (error, name, scores)
        assert best is not None
        self.chosen[best[1]] = self.chosen.get(best[1], 0) + 1
        return best[2]


def make_scorer(
    analysis: Analysis, views: dict[str, LinearView], stats: LayerStats, criterion: str
) -> DataAwareScorer:
    """``group -> scores`` for the planner."""
    return DataAwareScorer(analysis, views, stats, criterion)
