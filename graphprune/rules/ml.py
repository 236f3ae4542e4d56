"""Traditional-ML ops of the ``ai.onnx.ml`` domain (scikit-learn through skl2onnx).

``LinearClassifier`` / ``LinearRegressor``: ``y = x @ coefficients.T + intercepts`` with the
coefficients an attribute of ``[targets, features]`` row-major: a consumer of the features
(a PCA's components, an MLP's last hidden layer), which lose their columns. ``SVMClassifier``
/ ``SVMRegressor`` read them likewise through their support vectors (exactly under linear,
polynomial and sigmoid kernels; under RBF the groups are inexact).

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

from graphprune.analysis.roles import CONSUMER
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
    """Tree ensembles, whose fitted values are attributes: not pruned (``couples`` false: their
    dimensions are frozen; a split on a removed feature is not a split on a zeroed one), and
    their values counted as parameters (skl2onnx's linear models and SVMs hold theirs in
    attributes too: a profanity classifier's 154 k coefficients read as 12)."""

    op_types = ("TreeEnsembleClassifier", "TreeEnsembleRegressor", "TreeEnsemble")
    domain = "ai.onnx.ml"
    couples = False
    #: the attributes that hold fitted values (not labels, ids or modes)
    FITTED = ("nodes_values", "nodes_values_as_tensor", "target_weights", "target_weights_as_tensor",
              "class_weights", "class_weights_as_tensor", "base_values", "base_values_as_tensor",
              "nodes_splits", "leaf_weights")

    def attribute_parameters(self, attrs: dict) -> int:
        """The fitted values; a node's threshold only where the node splits (``nodes_values``
        has an entry, 0, for every leaf too: an XGBoost regressor's 1,991 of 5,724)."""
        modes = attrs.get("nodes_modes")
        leaves = sum(1 for m in modes if (m.decode() if isinstance(m, bytes) else str(m)) == "LEAF") \
            if isinstance(modes, (list, tuple)) else 0
        return fitted_values(attrs, self.FITTED) - leaves


def _feature_weight(node: gs.Node, ctx: CouplingContext, values: list, label: str) -> bool:
    """Couple the features (the input's last axis) with ``values`` read as ``[rows, features]``
    (an attribute-held weight, :meth:`CouplingContext.attribute_weight`), and the rows of a 2-D
    input with the outputs'; ``False`` (the node frozen) where the sizes do not fit."""
    x = node.inputs[0]
    rank = ctx.rank(x)
    features = ctx.size(x, -1) if rank in (1, 2) else None
    if features is None or not values or len(values) % features:
        ctx.freeze_node(node, f"{len(values)} {label} for {'an unknown number of' if features is None else features} "
                              f"features at {node.op} '{node.name}'")
        return False
    weight = ctx.attribute_weight(node, label, np.asarray(values, np.float32).reshape(-1, features))
    ctx.couple(x, rank - 1, weight, 1)
    ctx.role(weight, 1, CONSUMER)  # (the data-aware criteria read it: calibration/held.py)
    if rank == 2:
        for y in node.outputs:
            if ctx.rank(y) in (1, 2):
                ctx.couple(x, 0, y, 0)
    return True


def _drop_features(node: gs.Node, ctx: RewriteContext, name: str) -> None:
    """Remove the removed features' columns of the attribute ``name`` (``[rows, features]``)."""
    x = node.inputs[0]
    removed, features = ctx.removed(x, -1), ctx.old_size(x, -1)
    if removed.size and features:
        columns = np.asarray(node.attrs[name], dtype=np.float64).reshape(-1, features)
        node.attrs[name] = [float(v) for v in np.delete(columns, removed, axis=1).ravel()]


@register
class LinearModelRule(OpRule):
    """A linear model over the last axis of its input: each feature is one column of the
    coefficients (removing it is zeroing it, exactly); rows of the batch pass through."""

    op_types = ("LinearClassifier", "LinearRegressor")
    domain = "ai.onnx.ml"
    FITTED = ("coefficients", "intercepts")

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        # the coefficients ([targets, features]) scored as the weight that reads the features
        # (a PCA's components are orthonormal: on their own norms they tie)
        _feature_weight(node, ctx, node.attrs.get("coefficients") or [], "coefficients")

    def attribute_parameters(self, attrs: dict) -> int:
        return fitted_values(attrs, self.FITTED)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        _drop_features(node, ctx, "coefficients")


@register
class SupportVectorRule(OpRule):
    """``SVMClassifier`` / ``SVMRegressor``: a kernel of the input with each support vector (a
    row of ``support_vectors``), or without support vectors the linear weights
    (``coefficients``, one row per class). Linear, polynomial and sigmoid kernels read the
    input through dot products: a removed feature is a zeroed one. The RBF kernel reads
    ``||x - s||^2``: a removed feature drops ``(x_f - s_f)^2`` where a zeroed one leaves
    ``s_f^2`` (inexact: pruned, checked apart)."""

    op_types = ("SVMClassifier", "SVMRegressor")
    domain = "ai.onnx.ml"
    FITTED = ("coefficients", "support_vectors", "rho", "prob_a", "prob_b", "kernel_params")

    @staticmethod
    def _held(node: gs.Node) -> str:
        return "support_vectors" if node.attrs.get("support_vectors") else "coefficients"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        held = self._held(node)
        if not _feature_weight(node, ctx, node.attrs.get(held) or [], held):
            return
        kernel = node.attrs.get("kernel_type", "LINEAR")
        kernel = kernel.decode() if isinstance(kernel, bytes) else str(kernel)
        if held == "support_vectors" and kernel not in ("LINEAR", "POLY", "SIGMOID"):
            ctx.inexact(node.inputs[0], -1, f"an {kernel} kernel reads the distance to each support vector")

    def attribute_parameters(self, attrs: dict) -> int:
        return fitted_values(attrs, self.FITTED)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        _drop_features(node, ctx, self._held(node))


@register
class NormalizerRule(OpRule):
    """``Normalizer``: each row divided by its L1 or L2 norm, or its maximum. A zero entry
    adds nothing to a norm, so removing it is zeroing it; not to a maximum (a zero is the
    maximum of a row of negatives): the axis is then inexact."""

    op_types = ("Normalizer",)
    domain = "ai.onnx.ml"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.derive_shape(y, ctx.shape(x))
        ctx.couple_all_axes(x, y)
        norm = node.attrs.get("norm", "MAX")
        norm = norm.decode() if isinstance(norm, bytes) else str(norm)
        if norm not in ("L1", "L2") and ctx.rank(x):
            ctx.inexact(x, -1, f"a {norm} normaliser over the pruned axis")


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
