"""Elementwise ops: every axis of the output is the same axis of each (broadcast) input.

Unary ops pass every dimension through. Binary and variadic ops follow numpy broadcasting:
an input axis of size 1 against a larger output axis is broadcast and not coupled; a
per-channel constant (``[C, 1, 1]``) is coupled and sliced with the channels.
Softmax-like ops normalise over an axis: pruning it is allowed but inexact.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis import CouplingContext

#: unary ops with f(0) == 0
ZERO_PRESERVING_UNARY = (
    "Relu", "LeakyRelu", "Tanh", "Elu", "Selu", "Mish", "Gelu", "Erf", "Sqrt", "Neg", "Abs",
    "HardSwish", "Identity", "Dropout", "Cast", "Sign", "Ceil", "Floor", "Round", "Sin",
    "Asin", "Atan", "Sinh", "Asinh", "Atanh", "Tan", "Relu6", "Celu", "ThresholdedRelu",
    "Shrink", "Softsign", "CastLike",
)
#: unary ops with f(0) a non-zero constant (or undefined)
CONSTANT_UNARY = (
    "Sigmoid", "HardSigmoid", "Softplus", "Exp", "Log", "Reciprocal", "Cos", "Cosh",
    "Acos", "Acosh", "Not", "IsNaN", "IsInf", "BitwiseNot",
)


@register
class UnaryRule(OpRule):
    op_types = ZERO_PRESERVING_UNARY + CONSTANT_UNARY + ("Clip",)
    zero_behaviour = "zero"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple_all_axes(x, y)
        for extra in node.outputs[1:]:  # Dropout mask
            if extra.outputs:
                ctx.couple_all_axes(x, extra)
        if node.op == "Clip":
            for bound in node.inputs[1:]:
                if bound.name and ctx.rank(bound) not in (0, None):
                    ctx.freeze_node(node, f"non-scalar Clip bound at Clip '{node.name}'")


@register
class BroadcastRule(OpRule):
    op_types = (
        "Add", "Sub", "Mul", "Div", "Max", "Min", "Pow", "Sum", "Mean", "Where", "PRelu",
        "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor",
        "Mod", "BitwiseAnd", "BitwiseOr", "BitwiseXor",
    )

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.couple_broadcast(list(node.inputs), node.outputs[0])


@register
class SoftmaxRule(OpRule):
    op_types = ("Softmax", "LogSoftmax", "Hardmax")

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.couple_all_axes(x, y)
        rank = ctx.rank(x)
        if rank is None:
            return
        default = -1 if ctx.opset >= 13 else 1
        axis = int(node.attrs.get("axis", default)) % rank
        axes = [axis] if ctx.opset >= 13 else list(range(axis, rank))
        for a in axes:
            ctx.inexact(x, a, f"{node.op} normalises this axis")
