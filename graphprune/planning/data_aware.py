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
  diagonal approximation ``E[x_c^2] ||W[:, c]||^2`` is used.

As for the data-free criteria, the element scores of each consumer member are averaged per
unit and normalised by their mean, and a unit's score is the sum over the members. A group
with no consumer that has statistics falls back to the data-free ``l2`` score.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from graphprune.analysis import CONSUMER, Analysis, ChannelGroup
from graphprune.calibration.linear import LinearView, linear_view
from graphprune.calibration.stats import ChannelStats, LayerStats
from graphprune.planning.importance import norm_scores

DATA_CRITERIA = ("activation", "wanda", "flap", "reconstruction")
#: the criterion ``auto`` resolves to (see docs/calibration.md for the measurements)
AUTO_CRITERION = "reconstruction"
#: ridge of the reconstruction criterion, relative to the mean diagonal of the Gram
GRAM_RIDGE = 1e-2


def consumer_views(analysis: Analysis) -> dict[str, LinearView]:
    """The linear layers that consume a prunable group, keyed by their weight's name."""
    wanted: set[tuple[str, int]] = set()
    for group in analysis.groups:
        if group.prunable:
            wanted.update(d for d in group.params if group.roles.get(d) == CONSUMER)
    views: dict[str, LinearView] = {}
    for node in analysis.graph.nodes:
        view = linear_view(node, analysis.opset)
        if view is None or view.group != 1:
            continue
        if (view.weight.name, view.info.in_axis) in wanted:
            views[view.weight.name] = view
    return views


def _columns(view: LinearView) -> np.ndarray:
    """Weights as ``[out, in, kernel]`` (alpha folded in)."""
    mats = view.matrices()[0]  # [out, K] with K = in * kernel
    return mats.reshape(mats.shape[0], view.in_channels(), -1)


def element_scores(view: LinearView, stats: ChannelStats, criterion: str) -> np.ndarray | None:
    """One score per input channel of ``view``."""
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
    if criterion == "reconstruction":
        if stats.gram is None or not stats.gram_rows:
            return stats.second_moment * squares
        gram = stats.gram / stats.gram_rows
        gram = gram + GRAM_RIDGE * max(float(np.mean(np.diag(gram))), 1e-12) * np.eye(len(gram))
        try:
            inverse_diag = np.diag(np.linalg.inv(gram))
        except np.linalg.LinAlgError:
            return stats.second_moment * squares
        return squares / np.maximum(inverse_diag, 1e-30)
    raise ValueError(f"unknown data-aware criterion '{criterion}'")


def group_scores(
    group: ChannelGroup,
    views: dict[str, LinearView],
    stats: LayerStats,
    criterion: str,
    fallback: Callable[[ChannelGroup], np.ndarray],
) -> np.ndarray:
    """Data-aware scores of every unit of ``group`` (``fallback`` without statistics)."""
    scores = np.zeros(group.num_units, dtype=np.float64)
    used = 0
    for dim in group.params:
        if group.roles.get(dim) != CONSUMER:
            continue
        view = views.get(dim[0])
        if view is None or dim[1] != view.info.in_axis:
            continue
        layer = stats.get(view.node.name)
        if layer is None:
            continue
        values = element_scores(view, layer, criterion)
        labels = group.unit_of.get(dim)
        if values is None or labels is None or len(labels) != len(values):
            continue
        values = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=0.0)
        mean = values.mean()
        if mean > 0:
            values = values / mean
        sums = np.bincount(labels, weights=values, minlength=group.num_units)
        counts = np.bincount(labels, minlength=group.num_units)
        scores += np.divide(sums, counts, out=np.zeros_like(sums), where=counts > 0)
        used += 1
    return scores if used else fallback(group)


def make_scorer(
    analysis: Analysis, views: dict[str, LinearView], stats: LayerStats, criterion: str
) -> Callable[[ChannelGroup], np.ndarray]:
    """``group -> scores`` for the planner."""
    tensors = analysis.context.tensors

    def fallback(group: ChannelGroup) -> np.ndarray:
        return norm_scores(group, tensors, 2)

    def scorer(group: ChannelGroup) -> np.ndarray:
        return group_scores(group, views, stats, criterion, fallback)

    return scorer
