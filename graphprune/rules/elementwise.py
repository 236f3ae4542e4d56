"""Elementwise ops: every axis of the output is the same axis of each (broadcast) input.

Unary ops pass every dimension through. Binary and variadic ops follow numpy broadcasting:
an input axis of size 1 against a larger output axis is broadcast and not coupled; a
per-channel constant (``[C, 1, 1]``) is coupled and sliced with the channels.
Softmax-like ops normalise over an axis: pruning it is allowed but inexact.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import zero_analysis as za
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis import CouplingContext
    from graphprune.analysis.zero_analysis import ChannelValues, ConstantContext

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


def _attr(node: gs.Node, name: str, default: float) -> np.float32:
    return np.float32(node.attrs.get(name, default))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0), x)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray, node: gs.Node) -> np.ndarray:
    if node.attrs.get("approximate", "none") in ("tanh", b"tanh"):
        inner = np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x**3)
        return np.float32(0.5) * x * (1 + np.tanh(inner))
    return (0.5 * x * (1 + _erf(x / math.sqrt(2)))).astype(np.float32)


#: f(x) in float32, for a channel that is the constant x. Ops not listed here keep only
#: f(0) = 0 (``ZERO_PRESERVING_UNARY``) and know nothing else.
UNARY_FUNCTIONS = {
    "Relu": lambda x, n: np.maximum(x, np.float32(0)),
    "LeakyRelu": lambda x, n: np.where(x < 0, x * _attr(n, "alpha", 0.01), x),
    "Sigmoid": lambda x, n: np.float32(1) / (np.float32(1) + np.exp(-x)),
    "HardSigmoid": lambda x, n: np.clip(x * _attr(n, "alpha", 0.2) + _attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / np.float32(6) + np.float32(0.5), 0, 1),
    "Tanh": lambda x, n: np.tanh(x),
    "Elu": lambda x, n: np.where(x < 0, _attr(n, "alpha", 1.0) * (np.exp(x) - 1), x),
    "Selu": lambda x, n: _attr(n, "gamma", 1.05070102214813232421875) * np.where(
        x <= 0, _attr(n, "alpha", 1.67326319217681884765625) * (np.exp(x) - 1), x
    ),
    "Celu": lambda x, n: np.maximum(x, 0) + np.minimum(
        0, _attr(n, "alpha", 1.0) * (np.exp(x / _attr(n, "alpha", 1.0)) - 1)
    ),
    "Softplus": lambda x, n: _softplus(x),
    "Softsign": lambda x, n: x / (1 + np.abs(x)),
    "Mish": lambda x, n: x * np.tanh(_softplus(x)),
    "Gelu": lambda x, n: _gelu(x, n),
    "Erf": lambda x, n: _erf(x).astype(np.float32),
    "ThresholdedRelu": lambda x, n: np.where(x > _attr(n, "alpha", 1.0), x, 0),
    "Shrink": lambda x, n: np.where(
        x < -_attr(n, "lambd", 0.5), x + _attr(n, "bias", 0.0),
        np.where(x > _attr(n, "lambd", 0.5), x - _attr(n, "bias", 0.0), 0),
    ),
    "Identity": lambda x, n: x,
    "Neg": lambda x, n: -x,
    "Abs": lambda x, n: np.abs(x),
    "Exp": lambda x, n: np.exp(x),
    "Log": lambda x, n: np.log(x),
    "Sqrt": lambda x, n: np.sqrt(x),
    "Reciprocal": lambda x, n: np.float32(1) / x,
    "Sin": lambda x, n: np.sin(x),
    "Cos": lambda x, n: np.cos(x),
    "Floor": lambda x, n: np.floor(x),
    "Ceil": lambda x, n: np.ceil(x),
    "Round": lambda x, n: np.round(x),
    "Sign": lambda x, n: np.sign(x),
}


def _clip_bounds(node: gs.Node, ctx: ConstantContext) -> tuple[float, float] | None:
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        return float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    bounds = []
    for index, default in ((1, -np.inf), (2, np.inf)):
        t = ctx.present(node, index)
        if t is None:
            bounds.append(default)
            continue
        value = ctx.const(t)
        if value is None or value.size != 1:
            return None
        bounds.append(float(value.reshape(-1)[0]))
    return bounds[0], bounds[1]


@register
class UnaryRule(OpRule):
    op_types = ZERO_PRESERVING_UNARY + CONSTANT_UNARY + ("Clip",)
    zero_behaviour = "map"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        state = ctx.state(node.inputs[0])
        outs: list[ChannelValues | None] = [None] * len(node.outputs)
        if state is None:
            return outs
        op = node.op
        if op == "Dropout":
            mode_t = ctx.present(node, 2)
            mode = ctx.const(mode_t) if mode_t is not None else np.zeros(1)
            if mode is None or bool(mode.reshape(-1)[0]):  # training mode, or not constant
                return outs
            op = "Identity"
        if op == "Clip":
            bounds = _clip_bounds(node, ctx)
            if bounds is None:
                return outs
            lo, hi = bounds
            outs[0] = za.carry(state, za.float32(lambda x: np.clip(x, lo, hi)))
        elif op in ("Cast", "CastLike"):
            target = self._cast_target(node, ctx)
            if target is not None and target.kind == "f":
                outs[0] = za.carry(state, lambda x: x.astype(target).astype(np.float64))
            else:  # to an integer or bool type: only an exact zero is certain
                outs[0] = za.carry(state, lambda x: np.where(x == 0, 0.0, np.nan))
        elif op in UNARY_FUNCTIONS:
            fn = UNARY_FUNCTIONS[op]
            outs[0] = za.carry(state, za.float32(lambda x: fn(x, node)))
        elif op in ZERO_PRESERVING_UNARY:
            outs[0] = za.carry(state, lambda x: np.where(x == 0, 0.0, np.nan))
        return outs

    @staticmethod
    def _cast_target(node: gs.Node, ctx: ConstantContext) -> np.dtype | None:
        import onnx

        if node.op == "Cast":
            try:
                return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(int(node.attrs["to"])))
            except Exception:
                return None
        like = node.inputs[1] if len(node.inputs) > 1 else None
        dtype = getattr(like, "dtype", None)
        return np.dtype(dtype) if dtype is not None else None

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

    zero_behaviour = "map"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.couple_broadcast(list(node.inputs), node.outputs[0])

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        fn = BROADCAST_FUNCTIONS.get(node.op)
        if fn is None:
            return [None]
        return za.elementwise(node, ctx, za.float32(fn), absorbing_zero=node.op == "Mul")


def _prelu(x: np.ndarray, slope: np.ndarray) -> np.ndarray:
    return np.where(x < 0, x * slope, x)


#: the value of a broadcasting op on constant channels, in float32 (NaN: unknown channel)
BROADCAST_FUNCTIONS = {
    "Add": lambda a, b: a + b,
    "Sub": lambda a, b: a - b,
    "Mul": lambda a, b: a * b,
    "Div": lambda a, b: a / b,
    "Pow": lambda a, b: np.power(a, b),
    "Max": lambda *xs: np.maximum.reduce(xs),
    "Min": lambda *xs: np.minimum.reduce(xs),
    "Sum": lambda *xs: np.add.reduce(xs),
    "Mean": lambda *xs: np.add.reduce(xs) / np.float32(len(xs)),
    "PRelu": _prelu,
}


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
