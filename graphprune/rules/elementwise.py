"""Elementwise ops: every axis of the output is the same axis of each (broadcast) input.

Unary ops pass every dimension through. Binary and variadic ops follow numpy broadcasting:
an input axis of size 1 against a larger output axis is broadcast and not coupled; a
per-channel constant (``[C, 1, 1]``) is coupled and sliced with the channels.
Softmax-like ops normalise over an axis: pruning it is allowed but inexact.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.shape_trace import (
    UNKNOWN,
    QuotientRead,
    ScaledRead,
    ShapeLiteral,
    ShapeRead,
    literals,
    product_of_reads,
)
from graphprune.rules.registry import OpRule, StoredWeight, register
from graphprune.rules.scale import ScaleContext, halved_energy
from graphprune.rules.unary_maps import (
    CONSTANT_UNARY,
    RMS_FUNCTIONS,
    UNARY_FUNCTIONS,
    ZERO_PRESERVING_UNARY,
    constant_clip_bound,
)

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.analysis.shape_trace import ShapeSource, ShapeTrace

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


#: ONNX Runtime's Sigmoid (MLAS) is off by up to 1.35e-7 absolute over [-20, 20], however small
#: its result; 2**-22 bounds that
SIGMOID_ABSOLUTE_ERROR = 2.0**-22


@register
class UnaryRule(OpRule):
    op_types = ZERO_PRESERVING_UNARY + CONSTANT_UNARY + ("Clip",)
    zero_behaviour = "map"
    constant_ops = frozenset({"Identity"})  # TorchScript's Identity on a shared weight

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """Identity and Cast pass a shape through; other maps keep only its length."""
        if node.op in ("Identity", "Cast"):
            return trace.input(node, 0)
        return trace.unknown(output)

    def zero_filled(self, node: gs.Node, zero: Callable[[gs.Tensor], bool]) -> bool:
        """``f(0) = 0`` of a zero input (one output: Dropout's mask is not zero)."""
        return node.op in ZERO_PRESERVING_UNARY and len(node.outputs) == 1 and zero(node.inputs[0])

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
                outs[0] = za.carry(state, za.zeros_only)
        elif op in UNARY_FUNCTIONS:
            fn = UNARY_FUNCTIONS[op]
            outs[0] = za.carry(state, za.float32(lambda x: fn(x, node)))
        elif op in ZERO_PRESERVING_UNARY:
            outs[0] = za.carry(state, za.zeros_only)
        return outs

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        fn = RMS_FUNCTIONS.get(node.op)
        if fn is None:
            return None
        out = fn(ctx.of(node.inputs[0]))
        if node.op == "Clip":  # bounded: HardSwish written as x * Clip(x + 3, 0, 6) / 6 is no square
            bound = constant_clip_bound(node)
            if bound is not None:
                out = np.minimum(out, bound)
        return out

    @staticmethod
    def _cast_target(node: gs.Node, ctx: ConstantContext) -> np.dtype | None:
        if node.op == "Cast":
            return _cast_dtype(node)
        like = node.inputs[1] if len(node.inputs) > 1 else None
        dtype = getattr(like, "dtype", None)
        return np.dtype(dtype) if dtype is not None else None

    def aliased_input(self, node: gs.Node) -> int | None:
        """``Identity``, and a ``Cast`` of a constant to the type it has (TorchScript writes
        one for every ``torch.nn.utils.prune`` mask when it does not fold constants)."""
        if node.op == "Identity":
            return 0
        source = node.inputs[0] if node.op == "Cast" and node.inputs else None
        if isinstance(source, gs.Constant) and source.dtype is not None and _cast_dtype(node) == np.dtype(source.dtype):
            return 0
        return None

    def stored_weight(self, node: gs.Node, opset: int) -> StoredWeight | None:
        """A float weight cast to another float type, refit in its stored type."""
        if not _casts_a_weight(node) or is_quantized_weight(node.inputs[0]):
            return None
        target = _cast_dtype(node)
        return CastWeight(node.inputs[0], target) if target is not None else None

    def carries_values(self, node: gs.Node) -> tuple[int, ...]:
        return (0,) if node.op in ("Identity", "Cast", "CastLike", "Dropout") else ()

    def absolute_error(self, node: gs.Node) -> float | None:
        return SIGMOID_ABSOLUTE_ERROR if node.op == "Sigmoid" else None

    def unfolded_inputs(self, node: gs.Node) -> tuple[int, ...]:
        """A Cast of an int8 weight stays: the weight stays int8 in the file, and the
        analysis follows the cast and the scale applied after it (``couple``); so does a
        float weight cast to another float type (ONNX Runtime's saved float16 models for
        the CPU cast every weight to float32): folded, the file would hold both."""
        return (0,) if _casts_a_weight(node) else ()

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ctx.derive_shape(y, ctx.shape(x))
        ctx.couple_all_axes(x, y)
        if _casts_a_weight(node):
            ctx.weight_expression(y, x)  # an int8 or float weight cast to float (kept unfolded)
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
    shape_scaling_ops = frozenset({"Mul"})

    def masks_weight(self, node: gs.Node) -> bool:
        if node.op != "Mul" or len(node.inputs) != 2 or not all(
                isinstance(t, gs.Constant) and t.shape is not None and t.dtype is not None for t in node.inputs):
            return False
        a, b = node.inputs
        if tuple(a.shape) != tuple(b.shape) or np.dtype(a.dtype) != np.dtype(b.dtype) or np.dtype(a.dtype).kind != "f":
            return False
        return any(np.isin(np.asarray(t.values), (0, 1)).all() for t in (a, b))

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.derive_shape(node.outputs[0], ctx.broadcast_shape(node.inputs))
        ctx.couple_broadcast(list(node.inputs), node.outputs[0])
        if node.op in ("Mul", "Div"):
            # a scale applied to a weight expression: still the weight, zero where it is zero
            # (an offset is not: zeroing the integer weight would leave the offset, so an
            # offset weight stays a computed weight that the zeroed original zeroes itself)
            weights = [t for t in node.inputs if ctx.is_weight_expression(t)]
            if len(weights) == 1 and all(t is weights[0] or isinstance(t, gs.Constant) for t in node.inputs):
                ctx.weight_expression(node.outputs[0], weights[0])
                from graphprune.rules.quantize import cast_scaled

                decoded = cast_scaled(node)  # Mul(Cast(int8), scale): scored as q * scale
                if decoded is not None:
                    ctx.decoded(decoded.constant, decoded.scale, decoded.zero_point)

    def trace_shape(self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace) -> list[ShapeSource] | None:
        """Arithmetic on shapes keeps the length and loses the values, except five idioms:
        ``Shape`` reads times a constant (``Mul``), reads times reads (``Mul``: a product of
        reads, :func:`product_of_reads`), a read divided by a literal (``Div``:
        quotient reads), TorchScript's ``Where(Equal(s, -1), ones, s)`` (``Where``) and the
        broadcast size of two reads one of which is 1 (``Max``: tf2onnx's einsum)."""
        found = None
        if node.op == "Where":
            found = _trace_where_minus_one(node, trace)
        elif node.op == "Mul":
            found = _trace_scaled(node, trace) or _trace_product(node, trace)
        elif node.op == "Div":
            found = _trace_quotient(node, trace)
        elif node.op == "Max" and len(node.inputs) == 2:
            found = _trace_broadcast_max(node, trace)
        return found if found is not None else trace.unknown(output)

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        fn = BROADCAST_FUNCTIONS.get(node.op)
        if fn is None:
            return [None]
        return za.elementwise(node, ctx, za.float32(fn), absorbing_zero=node.op == "Mul")

    def tested_value(self, node: gs.Node, index: int) -> np.ndarray | None:
        """``Equal(x, c)`` with a constant ``c`` of one element: ``c`` for ``x``."""
        if node.op != "Equal" or len(node.inputs) != 2 or index not in (0, 1):
            return None
        other = node.inputs[1 - index]
        if not isinstance(other, gs.Constant) and len(other.inputs) == 1 and other.inputs[0].op == "Constant":
            other = other.inputs[0].attrs.get("value")  # an unfolded Constant node (a model as loaded)
        if not isinstance(other, gs.Constant):
            return None
        value = np.asarray(other.values)
        return value.reshape(()) if value.size == 1 else None

    def neutral_operand(self, node: gs.Node, index: int) -> float | None:
        if len(node.inputs) != 2:
            return None
        neutral = NEUTRAL_OPERANDS.get(node.op)
        return None if neutral is None else neutral[index]

    def affine_operands(self, node: gs.Node) -> tuple[int, ...]:
        """The constant operand of ``x * c``, ``x / c``, ``x + c``, ``x - c`` or ``c - x``."""
        if node.op not in ("Add", "Sub", "Mul", "Div") or len(node.inputs) != 2:
            return ()
        constant = [i for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant)]
        if len(constant) != 1 or (node.op == "Div" and constant[0] == 0):
            return ()
        return (constant[0],)

    def broadcasts(self, node: gs.Node, index: int) -> bool:
        if node.op not in BROADCAST_FUNCTIONS:
            return False
        return node.op != "PRelu" or index == 1  # PRelu's slope broadcasts to x, not x itself

    def stored_weight(self, node: gs.Node, opset: int) -> StoredWeight | None:
        """``Mul(Cast(int8 constant), scale)``: an int8 weight an exporter decodes in the graph."""
        from graphprune.rules.quantize import cast_scaled

        return cast_scaled(node)

    def parameter_inputs(self, node: gs.Node) -> tuple[int, ...]:
        """A constant operand of Mul / Add is taken for a learned scale / shift (a layer
        scale, an exporter's decomposed norm)."""
        if node.op not in ("Mul", "Add"):
            return ()
        return tuple(k for k, t in enumerate(node.inputs) if isinstance(t, gs.Constant))

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        """A product multiplies the operands' scales, a sum adds their energies, ``Max`` /
        ``Min`` against a constant 0 rectifies."""
        if node.op in ("Mul", "Div") and len(node.inputs) == 2:
            a, b = ctx.resized([ctx.of(t) for t in node.inputs])
            return a * b if node.op == "Mul" else a / np.maximum(b, 1e-12)
        if node.op in ("Add", "Sub", "Sum"):
            parts = ctx.resized([ctx.of(t) for t in node.inputs])
            return np.sqrt(sum(np.square(p) for p in parts))
        if node.op in ("Max", "Min") and len(node.inputs) == 2:
            # against a constant 0 a rectifier (a PReLU written as Min(0, x) a + Max(0, x));
            # of two activations, about half of their energies each
            live = [t for t in node.inputs if not isinstance(t, gs.Constant)]
            if len(live) == 1:
                other = node.inputs[1 - node.inputs.index(live[0])]
                zero = np.size(other.values) == 1 and float(np.asarray(other.values).reshape(-1)[0]) == 0.0
                return halved_energy(ctx.of(live[0])) if zero else ctx.of(live[0])
            a, b = ctx.resized([ctx.of(t) for t in node.inputs])
            return np.sqrt((np.square(a) + np.square(b)) / 2)
        return None


def _trace_broadcast_max(node: gs.Node, trace: ShapeTrace) -> list[ShapeSource] | None:
    """``Max(a, b)`` of two shape vectors (the size two axes broadcast to; tf2onnx's einsum),
    per element: the same read twice, that read; a read and a 1 (a read or a literal), the
    read; two reads of one static size greater than 1, the first (axes broadcast together
    are equal or 1, and the op that broadcasts them couples them); a read and a literal of
    its static size (a folded ``Shape``), the literal, which the rewrite then writes."""
    a, b = trace.input(node, 0), trace.input(node, 1)
    if a is None or b is None or len(a) != len(b):
        return None
    return [_broadcast_size(x, y) for x, y in zip(a, b, strict=True)]


def _broadcast_size(x: ShapeSource, y: ShapeSource) -> ShapeSource:
    if isinstance(y, ShapeRead) and not isinstance(x, ShapeRead):
        x, y = y, x
    if not isinstance(x, ShapeRead):
        return UNKNOWN
    if isinstance(y, ShapeRead):
        if x == y or (x.size == y.size and x.size is not None and x.size > 1):
            return x
        return product_of_reads([x, y]) if 1 in (x.size, y.size) else UNKNOWN
    if isinstance(y, ShapeLiteral):
        if y.value == 1:
            return x
        if x.size is not None and y.value == x.size:
            return y
    return UNKNOWN


def _trace_quotient(node: gs.Node, trace: ShapeTrace) -> list[ShapeSource] | None:
    """A ``Shape`` read divided by one integer literal (``q.size(0) // num_heads``)."""
    divisor = node.inputs[1]
    if not isinstance(divisor, gs.Constant) or np.asarray(divisor.values).size != 1:
        return None
    if not np.issubdtype(np.asarray(divisor.values).dtype, np.integer):
        return None
    data = trace.input(node, 0)
    if data is None:
        return None
    literal = literals(node, 1)[0]
    return [QuotientRead(e.tensor, e.axis, literal) if isinstance(e, ShapeRead) and literal.value > 0
            else UNKNOWN for e in data]


def _trace_scaled(node: gs.Node, trace: ShapeTrace) -> list[ShapeSource] | None:
    """``Shape`` reads times a constant (``num_kv_heads * n_rep``): scaled reads, whose
    product follows the read size when heads are pruned."""
    for data_index in (0, 1):
        factor = trace.const(node.inputs[1 - data_index])
        data = trace.input(node, data_index)
        if factor is None or data is None or factor.size not in (1, len(data)):
            continue
        factors = np.broadcast_to(factor.reshape(-1), (len(data),))
        literal = literals(node, 1 - data_index)[0] if factor.size == 1 else None
        out: list[ShapeSource] = []
        for element, f in zip(data, factors, strict=True):
            if isinstance(element, ShapeRead) and int(f) == f and f >= 1:
                out.append(ScaledRead(element.tensor, element.axis, int(f), literal))
            elif isinstance(element, ScaledRead) and int(f) == f and f >= 1:
                out.append(ScaledRead(element.tensor, element.axis, element.factor * int(f)))
            else:
                out.append(UNKNOWN)
        return out
    return None


def _trace_product(node: gs.Node, trace: ShapeTrace) -> list[ShapeSource] | None:
    """Shape reads multiplied element by element (an LSTM output's ``directions * hidden``,
    which ONNX Runtime's transpose optimiser reads as ``Gather(Shape(Y), perm)``): the read
    where the other factor is a size-1 axis, else the product of the reads."""
    if len(node.inputs) != 2:
        return None
    a, b = trace.input(node, 0), trace.input(node, 1)
    if a is None or b is None or (len(a) != len(b) and 1 not in (len(a), len(b))):
        return None
    size = max(len(a), len(b))
    a, b = a * size if len(a) == 1 else a, b * size if len(b) == 1 else b
    out = [product_of_reads([x, y]) for x, y in zip(a, b, strict=True)]
    return None if all(element is UNKNOWN for element in out) else out


def _trace_where_minus_one(node: gs.Node, trace: ShapeTrace) -> list[ShapeSource] | None:
    """TorchScript's Expand idiom ``Where(Equal(shape, -1), ones, shape)``: each element
    is ``ones[k]`` where ``shape[k]`` is the literal -1, ``shape[k]`` otherwise."""
    cond, shape = node.inputs[0], node.inputs[2]
    equal = cond.inputs[0] if cond.inputs else None
    if equal is None or equal.op != "Equal" or equal.inputs[0] is not shape:
        return None
    probe = trace.const(equal.inputs[1])
    a, b = trace.input(node, 1), trace.input(node, 2)
    if probe is None or a is None or b is None or len(a) != len(b):
        return None
    probe = np.broadcast_to(probe.reshape(-1), (len(b),))
    out: list[ShapeSource] = []
    for k, element in enumerate(b):
        value = int(probe[k])
        if isinstance(element, ShapeLiteral):
            out.append(a[k] if element.value == value else element)
        elif isinstance(element, ShapeRead) and value < 0:
            out.append(element)  # a size is never negative
        else:
            out.append(UNKNOWN)
    return out


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

#: per input, the value that makes a binary op return its other operand (None: none)
NEUTRAL_OPERANDS: dict[str, tuple[float | None, float | None]] = {
    "Add": (0.0, 0.0),
    "Sum": (0.0, 0.0),
    "Sub": (None, 0.0),
    "Mul": (1.0, 1.0),
    "Div": (None, 1.0),
}


@register
class SoftmaxRule(OpRule):
    op_types = ("Softmax", "LogSoftmax", "Hardmax")

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        couple_softmax(node, ctx, node.inputs[0], node.outputs[0], ctx.opset)

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        """At most ``1 / sqrt(n)`` over ``n`` entries that sum to 1, whatever the input (an
        additive attention mask of -3.4e38 passed through made every stream after it 1e39)."""
        shape = node.inputs[0].shape
        if node.op == "LogSoftmax":
            return None
        if not shape:  # (entries in [0, 1] whatever their number)
            return np.ones(1)
        axis = int(node.attrs.get("axis", -1))  # (before opset 13 the default was 1, flattened: a wider
        size = shape[axis] if -len(shape) <= axis < len(shape) else None  # n, a looser bound)
        return np.ones(1) / np.sqrt(size) if isinstance(size, int) and size > 0 else np.ones(1)

    def converter_rewrite(self, node: onnx.NodeProto, fresh: Callable[[str], str]) -> list[onnx.NodeProto] | None:
        """An old ``Hardmax`` (2-D at ``axis``; the converter's reads one axis) as Flatten -> Hardmax -> Reshape."""
        axis = next((onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == "axis"), 1)
        if node.op_type != "Hardmax" or node.domain not in ("", "ai.onnx") or axis < 0:  # < 0: invalid here
            return None
        x, y, name = node.input[0], node.output[0], node.name or node.output[0]
        flat, top, shape = fresh(f"{y}_flat"), fresh(f"{y}_2d"), fresh(f"{y}_shape")
        return [onnx.helper.make_node("Flatten", [x], [flat], axis=axis, name=f"{name}_flatten"),
                onnx.helper.make_node("Hardmax", [flat], [top], axis=1, name=name),
                onnx.helper.make_node("Shape", [x], [shape], name=f"{name}_shape"),
                onnx.helper.make_node("Reshape", [top, shape], [y], name=f"{name}_reshape")]


    def converter_unwrap(self, node: onnx.NodeProto, producer: Callable[[str], onnx.NodeProto | None],
                         readers: Callable[[str], list[onnx.NodeProto] | None],
                         rank: Callable[[str, str], int | None]
                         ) -> tuple[onnx.NodeProto, onnx.NodeProto, list[onnx.NodeProto]] | None:
        """Below opset 13 the op normalises every axis from ``axis`` on, flattened: the
        converter writes ``Reshape(op(Flatten(x, axis=k), axis=-1), Shape(x))``. Where ``k`` is
        ``x``'s last axis that is ``op(x, axis=-1)``."""
        flat = producer(node.input[0]) if node.input else None
        after = readers(node.output[0])
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
        if flat is None or flat.op_type != "Flatten" or not after or len(after) != 1 or axis not in (1, -1):
            return None
        reshape, x = after[0], flat.input[0]
        shape = producer(reshape.input[1]) if reshape.op_type == "Reshape" and len(reshape.input) == 2 else None
        at = next((a.i for a in flat.attribute if a.name == "axis"), 1)
        if (shape is None or shape.op_type != "Shape" or shape.attribute or shape.input[0] != x
                or [id(n) for n in readers(flat.output[0]) or ()] != [id(node)] or at < 1
                or rank(x, shape.output[0]) != at + 1):
            return None
        replacement = onnx.NodeProto.FromString(node.SerializeToString())  # other inputs and attributes kept
        replacement.input[0], replacement.output[0] = x, reshape.output[0]
        replacement.name = node.name or reshape.name
        next(a for a in replacement.attribute if a.name == "axis").i = -1
        dead = [node, flat, *([shape] if [id(n) for n in readers(shape.output[0]) or ()] == [id(reshape)] else [])]
        return reshape, replacement, dead


def couple_softmax(node: gs.Node, ctx: CouplingContext, x: gs.Tensor, y: gs.Tensor, opset: int) -> None:
    """A softmax from ``x`` to ``y`` as ONNX ``opset`` defines it: every axis maps to itself;
    the normalised axis (from opset 13; before, every axis from ``axis`` on, flattened) is
    inexact."""
    ctx.couple_all_axes(x, y)
    rank = ctx.rank(x)
    if rank is None:
        return
    axis = int(node.attrs.get("axis", -1 if opset >= 13 else 1)) % (rank or 1)
    for a in [axis] if opset >= 13 else range(axis, rank):
        ctx.inexact(x, a, f"{node.op} normalises this axis")


#: integer types quantizers store weights in
QUANTIZED_WEIGHT_TYPES = frozenset({np.dtype(np.int8), np.dtype(np.uint8)})
#: smaller integer constants are lookup tables or shape arithmetic, folded as usual
QUANTIZED_WEIGHT_MIN_ELEMENTS = 64


class CastWeight(StoredWeight):
    """A float constant read through a Cast to another float type (a float16 weight computed
    in float32): decoded by the cast; new values are stored in the constant's own type,
    clipped to its finite range."""

    def __init__(self, constant: gs.Constant, target: np.dtype) -> None:
        self.constant = constant
        self._dtype = target

    @property
    def dtype(self) -> np.dtype:
        return self._dtype

    def decode(self) -> np.ndarray:
        return np.asarray(self.constant.values).astype(self._dtype)

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        stored = np.asarray(self.constant.values).dtype
        limit = float(np.finfo(stored).max)
        values = np.asarray(values, dtype=np.float64)
        clipped = float(np.mean(np.abs(values) > limit)) if values.size else 0.0
        self.constant.values = np.clip(values, -limit, limit).astype(stored)
        return clipped, None


def _casts_a_weight(node: gs.Node) -> bool:
    """A Cast of an int8 weight, or of a float constant to another float type (a weight
    stored in float16 and computed in float32: ONNX Runtime's ``InsertedPrecisionFreeCast``)."""
    if node.op != "Cast" or not isinstance(node.inputs[0], gs.Constant):
        return False
    if is_quantized_weight(node.inputs[0]):
        return True
    try:
        source = np.dtype(node.inputs[0].dtype)
    except TypeError:
        return False
    target = _cast_dtype(node)
    # (a cast to the type the weight has is no cast: TorchScript writes one for every
    # torch.nn.utils.prune mask when it does not fold constants)
    return (source.kind == "f" and target is not None and target.kind == "f" and target != source
            and len(node.inputs[0].shape or ()) > 0)


def _cast_dtype(node: gs.Node) -> np.dtype | None:
    """The numpy type a ``Cast`` converts to (``None``: one numpy has not)."""
    from onnx.helper import tensor_dtype_to_np_dtype

    try:
        return np.dtype(tensor_dtype_to_np_dtype(int(node.attrs["to"])))
    except Exception:  # noqa: BLE001 - an unknown or missing type
        return None


def is_quantized_weight(tensor: gs.Tensor) -> bool:
    """An 8-bit integer constant large enough to be a weight (rather than a table)."""
    if not isinstance(tensor, gs.Constant):
        return False
    shape = getattr(tensor, "shape", None) or ()
    try:
        dtype = np.dtype(tensor.dtype)
    except TypeError:
        return False
    return dtype in QUANTIZED_WEIGHT_TYPES and int(np.prod(shape)) >= QUANTIZED_WEIGHT_MIN_ELEMENTS

