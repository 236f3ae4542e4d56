"""Weights held in attributes (an ONNX-ML linear model's coefficients, an SVM's support
vectors) as consumers for the data-aware criteria and their statistics.

:class:`HeldConsumerView` duck-types the parts of
:class:`~graphprune.calibration.linear.LinearView` that :mod:`graphprune.planning.data_aware`
and :func:`graphprune.calibration.stats.collect` read, as
:class:`~graphprune.calibration.recurrent.RecurrentConsumerView` does: the weight is the constant
the op's rule gave the analysis (``CouplingContext.attribute_weights``, ``[rows, features]``), read as one
dense layer over the rows of the op's input. Statistics are kept under a name of its own
(``<node>/<weight>``). Not a refit target: the refit writes constants of the graph, and an
SVM's kernel is no linear layer (its scores are a heuristic there, as a linear layer's are).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.calibration.linear import dense_rows

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext


@dataclass(frozen=True)
class _Named:
    name: str


@dataclass(frozen=True)
class _Info:
    in_axis: int = 1


class HeldConsumerView:
    """``weight`` (``[rows, features]``) over the last axis of ``node``'s input 0."""

    is_conv = False
    group = 1
    stored = None
    in_block = 1
    #: nothing refits it: ``auto`` weighs the criteria by what the removed channels carried
    #: (:func:`graphprune.planning.data_aware.removal_error`)
    refit = False

    def __init__(self, node: gs.Node, weight: gs.Constant) -> None:
        self.layer, self.weight, self.data = node, weight, node.inputs[0]
        self.node = _Named(f"{node.name}/{weight.name}")
        self.info = _Info()

    def read_data(self, x: np.ndarray) -> np.ndarray:
        return x

    def in_channels(self) -> int:
        return int(np.shape(self.weight.values)[1])

    def weight_dim(self, axis: int) -> tuple[str, int]:
        return self.weight.name, axis

    def matrices(self) -> np.ndarray:
        return np.asarray(self.weight.values, dtype=np.float64)[None]

    def channel_rows(self, x: np.ndarray, limit: int, seed: int) -> np.ndarray:
        return dense_rows(x, limit, seed)


def held_views(node: gs.Node, context: CouplingContext) -> list[HeldConsumerView]:
    """``node``'s attribute-held weights as consumers (the analysis's ``context``, where the rule's
    :meth:`~graphprune.analysis.coupling.CouplingContext.attribute_weight` put them)."""
    if not node.inputs or isinstance(node.inputs[0], gs.Constant):
        return []
    return [HeldConsumerView(node, weight) for name, (owner, _) in context.attribute_weights.items()
            if owner == node.name and isinstance(weight := context.tensors.get(name), gs.Constant)]
