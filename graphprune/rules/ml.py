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
import onnx_graphsurgeon as gs

from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.passes.rewrite_context import RewriteContext

SCALER_LISTS = ("offset", "scale")


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

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        removed = ctx.removed(node.inputs[0], -1)
        if not removed.size:
            return
        for name in SCALER_LISTS:
            values = node.attrs.get(name)
            if values is not None and len(values) > 1:
                node.attrs[name] = [float(v) for v in np.delete(np.asarray(values), removed)]
