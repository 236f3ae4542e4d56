"""Fold constant input channels into the consumer's bias.

A channel ``u`` that reads the same constant ``c`` at every position (``Sigmoid(0) = 0.5``, a
BN shift, a bias left after its weights were zeroed) contributes a constant to each output
channel ``o`` of a linear consumer (:meth:`OpRule.linear`)::

    y[o] = alpha * (... + sum_k W[o, u, k] c) + beta * b[o]
         = alpha * (...) + beta * (b[o] + alpha / beta * c * sum_k W[o, u, k])

so adding ``alpha / beta * c sum_k W[o, u, k]`` to the bias (created when absent) and zeroing
``W[:, u]`` leaves the output unchanged. That is exact for a dense layer (Gemm) and for an
ungrouped Conv that never pads (a padded border would read 0, not ``c``: the constant would
depend on the position). Afterwards ``u`` is read by zero weights only: a zero unit that
lossless pruning removes.

The folds come from the zero-invariance analysis (:func:`constant_folds` turns its findings
into :class:`ConstantFold` values); the pass refuses any fold it cannot do exactly. A second
run is a no-op: the folded weights are zero.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.analysis.constants import conv_is_padded
from graphprune.io.names import fresh_name
from graphprune.rules import registry

if TYPE_CHECKING:
    from graphprune.analysis.zero_analysis import GroupZeros

__all__ = ["ConstantFold", "FoldConstantsPass", "constant_folds"]


@dataclass(frozen=True)
class ConstantFold:
    """Input channels ``channels`` of consumer ``node`` (along ``axis`` of its weight
    ``weight``) read the constants ``values``."""

    node: str
    weight: str
    axis: int
    channels: tuple[int, ...]
    values: tuple[float, ...]


def constant_folds(findings: Iterable[GroupZeros]) -> list[ConstantFold]:
    """The folds that make each finding's ``constant_units`` zero units."""
    folds: list[ConstantFold] = []
    for info in findings:
        if not info.constant_units or info.skipped:
            continue
        removed = info.group.removed_elements(info.constant_units)
        for use, read in zip(info.consumers, info.inputs, strict=True):
            w_idx = removed.get(use.param)
            if w_idx is None or read is None or use.activation is None:
                continue
            x_idx = removed.get(use.activation)
            if x_idx is None or not np.array_equal(x_idx, w_idx):
                continue
            values = read[x_idx]
            if np.isnan(values).any():
                continue
            folds.append(ConstantFold(
                use.node.name, use.param[0], use.param[1],
                tuple(int(i) for i in w_idx), tuple(float(v) for v in values),
            ))
    return folds


def _given(node: gs.Node, index: int) -> bool:
    return index < len(node.inputs) and bool(node.inputs[index].name)


class FoldConstantsPass(Pass):
    """Fold constant input channels into consumer biases (see the module docstring)."""

    def __init__(self, folds: Iterable[ConstantFold]) -> None:
        self.folds = list(folds)

    def __repr__(self) -> str:
        return f"FoldConstantsPass(folds={len(self.folds)})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes = {n.name: n for n in graph.nodes}
        names = set(graph.tensors())
        folded = 0
        for fold in self.folds:
            node = nodes.get(fold.node)
            if node is not None and self._fold(node, fold, names, ctx.opset):
                folded += 1
        return PassResult(graph, folded > 0, {"constants_folded": folded})

    @staticmethod
    def _fold(node: gs.Node, fold: ConstantFold, names: set[str], opset: int) -> bool:
        rule = registry.lookup(node.domain or "", node.op, opset)
        info = rule.linear(node) if rule is not None else None
        if info is None or info.bias is None:
            return False  # no linear weight, or no bias to fold into
        weight = node.inputs[info.weight]
        if not isinstance(weight, gs.Constant) or weight.name != fold.weight or len(weight.outputs) > 1:
            return False
        shape = [int(d) for d in weight.shape]
        if fold.axis != info.in_axis % len(shape):
            return False
        if info.kernel == "conv":
            if info.group != 1 or conv_is_padded(node, shape[2:], node.inputs[info.data].shape):
                return False  # a padded border reads 0, not the constant
        elif info.kernel != "dense":
            return False
        if _given(node, info.bias) and (
            info.beta == 0.0 or not isinstance(node.inputs[info.bias], gs.Constant)
        ):
            return False
        w = np.array(weight.values, copy=True)
        channels = np.asarray(fold.channels, dtype=np.int64)
        values = np.asarray(fold.values, dtype=np.float64)
        taken = np.take(w, channels, axis=info.in_axis).astype(np.float64)
        if not (values != 0).any() or not taken.any():
            return False  # nothing to fold (a second run ends here)
        per_output = np.moveaxis(taken, (info.out_axis, info.in_axis), (0, 1))
        per_output = per_output.reshape(per_output.shape[0], per_output.shape[1], -1).sum(axis=2)
        delta = info.alpha * (per_output @ values)
        _add_bias(node, info.bias, delta, names, w.dtype, beta=info.beta if info.beta != 0.0 else 1.0)
        index: list[Any] = [slice(None)] * w.ndim
        index[info.in_axis] = channels
        w[tuple(index)] = 0
        weight.values = w
        return True


def _add_bias(
    node: gs.Node, index: int, delta: np.ndarray, names: set[str], dtype: np.dtype, beta: float
) -> None:
    """``node.inputs[index] += delta / beta`` as a private constant (created when absent)."""
    delta = delta / beta
    if _given(node, index):
        current = np.asarray(node.inputs[index].values).astype(np.float64)
        shape = np.broadcast_shapes(current.shape, delta.shape)
        value = np.broadcast_to(current, shape) + delta.reshape([1] * (len(shape) - 1) + [-1])
    else:
        value = delta
    const = gs.Constant(fresh_name(f"{node.name or 'node'}_gp_bias", names), np.ascontiguousarray(value.astype(dtype)))
    while len(node.inputs) <= index:
        node.inputs.append(gs.Variable.empty())
    node.inputs[index] = const
