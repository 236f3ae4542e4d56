"""Traditional-ML ops of the ``ai.onnx.ml`` domain (scikit-learn through skl2onnx).

``Scaler``: ``y = (x - offset) * scale`` feature by feature along the last axis, with
``offset`` and ``scale`` as float-list attributes of one entry per feature (or one for all).
Features pass through one to one; pruned features lose their attribute entries. ONNX shape
inference gives ``Scaler`` no output shape: the rule derives it (the input's), so the layers
after it are not hidden.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.passes.rewrite_context import RewriteContext

SCALER_LISTS = ("offset", "scale")


def fitted_values(attrs: dict, names: tuple[str, ...]) -> int:
    """How many values the attributes ``names`` of ``attrs`` hold (lists and tensors)."""
    total = 0
    for name in names:
        value = attrs.get(name)
        if isinstance(value, (list, tuple)):
            total += len(value)
        elif isinstance(value, onnx.TensorProto):
            total += int(np.prod(value.dims, dtype=np.int64))
    return total


@register
class FittedModelRule(OpRule):
    """ONNX-ML models whose fitted values are attributes (skl2onnx's linear models, SVMs and
    tree ensembles): not pruned (``couples`` false: their dimensions are frozen), and their
    values counted as parameters (a profanity classifier's 154 k coefficients read as 12)."""

    op_types = ("LinearClassifier", "LinearRegressor", "SVMClassifier", "SVMRegressor", "TreeEnsembleClassifier",
                "TreeEnsembleRegressor", "TreeEnsemble")
    domain = "ai.onnx.ml"
    couples = False
    #: the attributes that hold fitted values (not labels, ids or modes)
    FITTED = ("coefficients", "intercepts", "support_vectors", "rho", "prob_a", "prob_b", "kernel_params",
              "nodes_values", "nodes_values_as_tensor", "target_weights", "target_weights_as_tensor",
              "class_weights", "class_weights_as_tensor", "base_values", "base_values_as_tensor",
              "nodes_splits", "leaf_weights")

    def attribute_parameters(self, attrs: dict) -> int:
        return fitted_values(attrs, self.FITTED)


@register
class ScalerRule(OpRule):
    op_types = ("Scaler",)
    domain = "ai.onnx.ml"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.derive_shape(y, ctx.shape(x))
        features = ctx.size(x, -1)
        for name in SCALER_LISTS:
            values = node.attrs.get(name)
            if values is not None and len(values) not in (1, features):
                ctx.freeze_node(node, f"{name} of {len(values)} entries for {features} features "
                                      f"at Scaler '{node.name}'")
                return
        ctx.couple_all_axes(x, y)

    def attribute_parameters(self, attrs: dict) -> int:
        return fitted_values(attrs, SCALER_LISTS)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        removed = ctx.removed(node.inputs[0], -1)
        if not removed.size:
            return
        for name in SCALER_LISTS:
            values = node.attrs.get(name)
            if values is not None and len(values) > 1:
                node.attrs[name] = [float(v) for v in np.delete(np.asarray(values), removed)]
