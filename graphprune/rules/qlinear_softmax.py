"""com.microsoft ``QLinearSoftmax``: ONNX Runtime's quantized softmax, whose ``opset``
attribute says whose Softmax it computes (before 13: every axis from ``axis`` on, flattened)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.rules.elementwise import SoftmaxRule, couple_softmax
from graphprune.rules.qlinear import QLinearUnaryRule, _derive_output, _ScalarQuantized
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from collections.abc import Callable

    from graphprune.analysis.coupling import CouplingContext
    from graphprune.rules.scale import ScaleContext


@register
class QLinearSoftmaxRule(_ScalarQuantized, OpRule):
    """com.microsoft ``QLinearSoftmax(X, X_scale, x_zp, y_scale, y_zp)``: a Softmax (the
    ``opset`` attribute says whose: before 13 it normalises every axis from ``axis`` on)."""

    op_types = ("QLinearSoftmax",)
    domain = "com.microsoft"
    scalar_inputs = (1, 2, 3, 4)
    output_shape = QLinearUnaryRule.output_shape
    converter_unwrap = SoftmaxRule.converter_unwrap

    def converter_rewrite(self, node: onnx.NodeProto, fresh: Callable[[str], str]) -> list[onnx.NodeProto] | None:
        """Below opset 13 (its ``opset`` attribute) as ``Flatten(axis) -> QLinearSoftmax(axis=-1,
        opset=13) -> Reshape(Shape(x))``, which says the same at any opset; the preparation
        undoes the wrapping where ``axis`` is the last (:meth:`converter_unwrap`). ONNX's
        version converter leaves a contrib op as it is, and ONNX Runtime's optimizer moves
        Transposes across it as the model's new opset reads a softmax: a `quantize_static`
        RivaGAN decoder at opset 10, converted, computed another function once optimised."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.domain != "com.microsoft" or not isinstance(attrs.get("opset"), int) or attrs["opset"] >= 13:
            return None
        axis = int(attrs.get("axis", 1))
        same = onnx.NodeProto.FromString(node.SerializeToString())
        next(a for a in same.attribute if a.name == "opset").i = 13
        if axis == -1:  # the last axis alone either way
            return [same]
        if axis < 0:
            return None
        x, y, name = node.input[0], node.output[0], node.name or node.output[0]
        flat, soft, shape = fresh(f"{y}_flat"), fresh(f"{y}_2d"), fresh(f"{y}_shape")
        same.input[0], same.output[0] = flat, soft
        axis_attr = next((a for a in same.attribute if a.name == "axis"), None)
        if axis_attr is None:
            same.attribute.append(onnx.helper.make_attribute("axis", -1))
        else:
            axis_attr.i = -1
        return [onnx.helper.make_node("Flatten", [x], [flat], axis=axis, name=f"{name}_flatten"), same,
                onnx.helper.make_node("Shape", [x], [shape], name=f"{name}_shape"),
                onnx.helper.make_node("Reshape", [soft, shape], [y], name=f"{name}_reshape")]

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        """The float Softmax's bound, ``1 / sqrt(n)``."""
        return SoftmaxRule.propagate_rms(self, node, ctx)  # type: ignore[arg-type]

    def couple_data(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        if ctx.known_ranks(node, x) is None:
            return
        _derive_output(self, node, ctx)
        couple_softmax(node, ctx, x, y, int(node.attrs.get("opset", 13)))
