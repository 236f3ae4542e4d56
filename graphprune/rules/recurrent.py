"""Recurrent layers: LSTM, GRU and RNN (ONNX's fused ops).

One *hidden unit* ``h`` is the unit of pruning: it owns, in every direction,

- the rows ``g*H + h`` of ``W [dirs, G*H, input]`` and ``R [dirs, G*H, H]`` for each of the
  ``G`` gates (LSTM 4: i, o, f, c; GRU 3: z, r, h; RNN 1) and the entries ``g*H + h`` of
  ``B [dirs, 2*G*H]`` (``Wb`` then ``Rb``) and of the LSTM peepholes ``P [dirs, 3*H]``;
- column ``h`` of ``R`` (the recurrence reads the previous hidden state);
- channel ``h`` of the initial states ``initial_h``/``initial_c`` and of the outputs ``Y``,
  ``Y_h`` and ``Y_c``.

The input size (``W``'s last axis) is a consumer axis coupled to ``X``'s feature axis, so
the layer before the recurrent one can lose features. ``hidden_size`` is rewritten.

Exactness: with its producer rows, biases and peepholes zeroed, a unit's gates are
constants (sigmoid(0), tanh(0) = 0, or whatever the activations give at 0) and its value
reaches the rest of the network only through consumer weights that are zeroed too (``R``'s
column, the next layer's inputs), so removing it equals zeroing it. Graph inputs and
outputs (a streaming model's states) freeze the hidden size, as everywhere.

``layout = 1`` (batch first, opset 14) freezes: ONNX Runtime does not run it, so a rewrite
could not be verified. So does anything else the rule does not recognise (a hidden size
that does not match the weights, an unknown rank).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.index_maps import Digit
from graphprune.analysis.roles import CHANNELWISE, CONSUMER, PRODUCER
from graphprune.io.tensors import present_input as _present
from graphprune.rules.registry import (
    OpRule,
    PairSummed,
    RecurrentInfo,
    StoredWeight,
    register,
    weight_size,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    from graphprune.analysis.coupling import CouplingContext
    from graphprune.passes.rewrite_context import RewriteContext

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _float_constant(tensor: gs.Tensor) -> bool:
    return isinstance(tensor, gs.Constant) and np.asarray(tensor.values).dtype.kind == "f"


def _output(node: gs.Node, index: int) -> gs.Tensor | None:
    if len(node.outputs) > index and node.outputs[index].name:
        return node.outputs[index]
    return None


@register
class RecurrentRule(OpRule):
    op_types = ("LSTM", "GRU", "RNN")
    computed_parameters = (1, 2, 3)  # W, R, B
    #: the axis of ``R`` that indexes hidden units (ONNX: ``R [dirs, G*H, H]``)
    hidden_axis = 2
    #: the axis of ``W`` that indexes the input's features (ONNX: ``W [dirs, G*H, input]``)
    input_axis = 2

    def required_sizes(self, node: gs.Node) -> dict[tuple[int, int], int]:
        """A stored ``W`` fixes the features of ``X`` (``[seq, batch, input]``; layout 1 ``[batch, seq, input]``)."""
        size = weight_size(node.inputs[1] if len(node.inputs) > 1 else None, self.input_axis)
        return {(0, 2): size} if size else {}

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        gates = GATES[node.op]
        hidden = int(node.attrs.get("hidden_size", 0) or 0)
        layout = int(node.attrs.get("layout", 0))
        x, w, r = node.inputs[0], node.inputs[1], node.inputs[2]
        b, h0 = _present(node, 3), _present(node, 5)
        c0 = _present(node, 6) if node.op == "LSTM" else None
        p = _present(node, 7) if node.op == "LSTM" else None
        y, y_h = _output(node, 0), _output(node, 1)
        y_c = _output(node, 2) if node.op == "LSTM" else None
        w_shape, r_shape = ctx.shape(w), ctx.shape(r)
        if (
            hidden < 1 or layout != 0 or ctx.rank(x) != 3
            or w_shape is None or len(w_shape) != 3 or r_shape is None or len(r_shape) != 3
            or w_shape[1] != gates * hidden or r_shape[1:] != [gates * hidden, hidden]
        ):
            ctx.freeze_node(node, f"{node.op} '{node.name}' not understood "
                                  f"(hidden_size {hidden}, layout {layout}, W {w_shape}, R {r_shape})")
            return
        where = f"{node.op} '{node.name}'"
        # the hidden axis of Y (or of R's columns when Y is not used) names the unit
        self.couple_weights(ctx, x, w, r)
        self.couple_unit_members(node, ctx, b, p, (h0, c0, y_h, y_c), y, where)

    def couple_weights(self, ctx: CouplingContext, x: gs.Tensor, w: gs.Tensor, r: gs.Tensor) -> None:
        """The gate axis of W and R (``3 - hidden_axis``) produces the hidden units that R's
        hidden axis reads; W's other axis reads the input features of ``x``."""
        hidden, gates = self.hidden_axis, 3 - self.hidden_axis
        ctx.couple(r, hidden, w, gates, Digit(1))
        ctx.couple(r, hidden, r, gates, Digit(1))
        ctx.role(w, gates, PRODUCER)
        ctx.role(r, gates, PRODUCER)
        ctx.role(r, hidden, CONSUMER)
        ctx.couple(x, 2, w, hidden)
        ctx.role(w, hidden, CONSUMER)
        ctx.role(x, 2, CONSUMER)
        ctx.spatial(x, [0, 1], "sequence/batch")

    def couple_unit_members(self, node: gs.Node, ctx: CouplingContext, b: gs.Tensor | None,
                            p: gs.Tensor | None, states: tuple[gs.Tensor | None, ...],
                            y: gs.Tensor | None, where: str) -> None:
        """Bias, peepholes, initial and final states and ``Y`` follow the hidden unit
        (``R``'s hidden axis); sequence lengths freeze."""
        r, hidden = node.inputs[2], self.hidden_axis
        if b is not None:
            ctx.couple(r, hidden, b, 1, Digit(1))
            ctx.role(b, 1, PRODUCER)
        if p is not None:
            ctx.couple(r, hidden, p, 1, Digit(1))
            ctx.role(p, 1, CHANNELWISE)
        for state in states:  # [dirs, batch, H]
            if state is not None:
                ctx.couple(state, 2, r, hidden)
                ctx.spatial(state, [0, 1], "direction/batch")
        if y is not None:  # [seq, dirs, batch, H]
            ctx.couple(y, 3, r, hidden)
            ctx.spatial(y, [0, 1, 2], "sequence/direction/batch")
        if _present(node, 4) is not None:
            ctx.freeze(node.inputs[4], None, f"sequence lengths of {where}")

    def recurrent(self, node: gs.Node) -> RecurrentInfo | str:
        """The layer in ONNX's layout, and why its input projection ``W x_t + Wb`` cannot be
        refit where ``W``, ``R`` or ``B`` is no float constant (the dynamo exporter computes a
        bidirectional layer's ``W`` in the graph: its gates reordered by ``Slice``s and its
        directions stacked by ``Concat``); ``layout`` 1: a string."""
        if int(node.attrs.get("layout", 0)) != 0:
            return f"{node.op} with layout 1"
        w, r = (t if _float_constant(t) else None for t in node.inputs[1:3])
        bias = _present(node, 3)
        reason = ("" if w is not None and r is not None and (bias is None or _float_constant(bias))
                  else f"{node.op} weights are not float constants")
        gru_reset = node.op == "GRU" and not int(node.attrs.get("linear_before_reset", 0))
        return RecurrentInfo(GATES[node.op], int(node.attrs.get("hidden_size", 0) or 0), reason, w, r,
                             reverse=_reverse(node), state_gates=(0, 1) if gru_reset else None)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        r = node.inputs[2]
        old, new = ctx.old_size(r, self.hidden_axis), ctx.new_size(r, self.hidden_axis)
        if old and new and old != new:
            node.attrs["hidden_size"] = int(new)

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """``seq * batch * dirs * G*H * (input + H)``: the input and recurrent products."""
        x, w, r = shape(node.inputs[0]), shape(node.inputs[1]), shape(node.inputs[2])
        if x is None or w is None or r is None or len(x) != 3 or len(w) != 3 or len(r) != 3:
            return None
        gates_axis, input_axis = 3 - self.hidden_axis, self.hidden_axis
        return math.prod(x[:2]) * w[0] * w[gates_axis] * (w[input_axis] + r[self.hidden_axis])

    def zero_default_inputs(self, node: gs.Node) -> tuple[int, ...]:
        """The initial states (absent: zeros). Exporters build a zero state from the batch
        size for all layers at once and slice it per layer, which couples the hidden units
        of every layer (and, behind a computed ``Tile``, leaves their size unknown)."""
        return (5, 6) if node.op.endswith("LSTM") else (5,)

    def parameter_inputs(self, node: gs.Node) -> tuple[int, ...]:
        return tuple(i for i in (1, 2, 3, 7) if _present(node, i) is not None
                     and (i != 7 or node.op == "LSTM"))


@register
class DynamicQuantizeLSTMRule(RecurrentRule):
    """ONNX Runtime's ``com.microsoft`` ``DynamicQuantizeLSTM``: an LSTM whose int8 weights
    are stored transposed (``W [dirs, input, 4H]``, ``R [dirs, H, 4H]``) with per-direction
    (or per-column) scales and zero points; it quantizes its input and its hidden state at run
    time over all their channels. A hidden unit owns the gate columns ``g*H + h`` of ``W``,
    ``R``, the bias and per-column scales, and row ``h`` of ``R``; a removed unit is exactly 0
    (as in :class:`RecurrentRule`), which quantizes to the zero point and so neither sets the
    run-time range nor contributes. Removed input channels are zeroed in the zeroed original
    where the op reads them (their range), and a weight's zero is its zero point."""

    op_types = ("DynamicQuantizeLSTM",)
    computed_parameters = ()
    quantizes_at_run_time = True
    domain = "com.microsoft"
    hidden_axis = 1  # R [dirs, H, 4H]
    input_axis = 1  # W [dirs, input, 4H]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        hidden = int(node.attrs.get("hidden_size", 0) or 0)
        x, w, r = node.inputs[0], node.inputs[1], node.inputs[2]
        b, h0, c0, p = _present(node, 3), _present(node, 5), _present(node, 6), _present(node, 7)
        quant = [_present(node, k) for k in range(8, 12)]  # W scale, W zp, R scale, R zp
        y, y_h, y_c = _output(node, 0), _output(node, 1), _output(node, 2)
        w_shape, r_shape = ctx.shape(w), ctx.shape(r)
        if (
            hidden < 1 or ctx.rank(x) != 3 or not isinstance(w, gs.Constant) or not isinstance(r, gs.Constant)
            or w_shape is None or len(w_shape) != 3 or r_shape is None or len(r_shape) != 3
            or w_shape[2] != 4 * hidden or r_shape[1:] != [hidden, 4 * hidden]
            or any(t is not None and not isinstance(t, gs.Constant) for t in quant)
            or any(t is not None and ctx.rank(t) not in (1, 2) for t in quant)
        ):
            ctx.freeze_node(node, f"DynamicQuantizeLSTM '{node.name}' not understood "
                                  f"(hidden_size {hidden}, W {w_shape}, R {r_shape})")
            return
        where = f"DynamicQuantizeLSTM '{node.name}'"
        self.couple_weights(ctx, x, w, r)
        ctx.zero_in_reference(x)  # quantized over all its channels at run time
        for weight, scale, zero in ((w, quant[0], quant[1]), (r, quant[2], quant[3])):
            zp = None
            for t in (scale, zero):
                if t is not None and ctx.rank(t) == 2:  # per column [dirs, 4H]
                    ctx.couple(r, 1, t, 1, Digit(1))
                    ctx.role(t, 1, CHANNELWISE)
                    if t is zero:
                        ctx.integer_param(t)
            if zero is not None:
                values = np.asarray(zero.values)
                zp = values.reshape(values.shape[0], 1, -1)  # broadcasts over [dirs, rows, cols]
            ctx.integer_param(weight, zp)
        self.couple_unit_members(node, ctx, b, p, (h0, c0, y_h, y_c), y, where)

    def output_shapes(self, op: str, attrs: dict, shapes: list[list | None]) -> list[tuple[list, int] | None]:
        """``Y [seq, dirs, batch, H]``, ``Y_h`` and ``Y_c [dirs, batch, H]``, as ONNX's LSTM
        (ONNX Runtime's symbolic inference does not know the op and stopped at it: the shapes
        computed from ``Y`` stayed unknown and froze the layer's input features)."""
        x, w = (shapes[k] if len(shapes) > k else None for k in (0, 1))
        hidden = attrs.get("hidden_size")
        if not x or len(x) != 3 or not w or len(w) != 3 or not isinstance(hidden, int):
            return [None]
        seq, batch, dirs = x[0], x[1], w[0]
        return [([seq, dirs, batch, hidden], 0), ([dirs, batch, hidden], 0), ([dirs, batch, hidden], 0)]

    def recurrent(self, node: gs.Node) -> RecurrentInfo | str:
        """``W`` and ``R`` decoded from their int8 values, scale and zero point (per direction
        ``[dirs]`` or per gate column ``[dirs, 4H]``) and read in ONNX's layout (``[dirs, 4H,
        input]``, :class:`_TransposedWeight`): the criteria read them as consumers, and a
        refit of the input projection stores its values on that grid, the scale grown where
        they would not fit."""
        w, r = node.inputs[1], node.inputs[2]
        stored_w, stored_r = _transposed(w, _present(node, 8), _present(node, 9)), _transposed(r, _present(node, 10), _present(node, 11))
        hidden = int(node.attrs.get("hidden_size", 0) or 0)
        bias = _present(node, 3)
        if stored_w is None:
            reason = "DynamicQuantizeLSTM weight, scale or zero point not understood (not refit)"
        elif bias is not None and not _float_constant(bias):
            reason = "DynamicQuantizeLSTM bias is not a float constant (not refit)"
        else:
            reason = ""
        return RecurrentInfo(4, hidden, reason, None, None, stored_w, stored_r, reverse=_reverse(node))

    def parameter_inputs(self, node: gs.Node) -> tuple[int, ...]:
        return ()  # quantized: nothing a float optimiser trains

    def pair_summed(self, node: gs.Node) -> tuple[PairSummed, ...] | None:
        """``W`` and ``R`` where int8 with zero points 0: ONNX Runtime multiplies them with the
        input and the hidden state quantized to u8 in saturating pairs (an AMD EPYC without
        VNNI: the pruned int8 LSTM differed from the zeroed original by 0.017 where the
        channels re-paired)."""
        kernels = []
        for weight, scale, zero in ((1, 8, 9), (2, 10, 11)):
            q, s, z = node.inputs[weight], _present(node, scale), _present(node, zero)
            if (isinstance(q, gs.Constant) and isinstance(s, gs.Constant) and np.asarray(q.values).dtype == np.int8
                    and len(s.outputs) == 1 and (z is None or (isinstance(z, gs.Constant) and not np.any(z.values)))):
                kernels.append(PairSummed(q, s))
        return tuple(kernels) or None


def _reverse(node: gs.Node) -> tuple[bool, ...]:
    """Per direction of the layer, whether it runs backwards."""
    direction = node.attrs.get("direction", "forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    return {"reverse": (True,), "bidirectional": (False, True)}.get(direction, (False,))


def _transposed(q: gs.Tensor, scale: gs.Tensor | None, zero: gs.Tensor | None) -> _TransposedWeight | None:
    """The int8 constant ``q`` ``[dirs, inputs, rows]`` with a scale and zero point per
    direction or per row, decoded and read as ``[dirs, rows, inputs]`` (``None``: not so)."""
    from graphprune.rules.quantize import Dequantized

    if not all(isinstance(t, gs.Constant) for t in (q, scale, zero)):
        return None
    qv, sv, zv = (np.asarray(t.values) for t in (q, scale, zero))
    if (qv.ndim != 3 or qv.dtype.kind not in "iu" or sv.dtype.kind != "f" or not np.all(np.isfinite(sv))
            or np.any(sv <= 0) or sv.shape != zv.shape or sv.shape not in ((qv.shape[0],), (qv.shape[0], qv.shape[2]))):
        return None
    shape = (qv.shape[0], 1, -1 if sv.ndim == 2 else 1)
    return _TransposedWeight(Dequantized(q, scale, sv.astype(np.float64).reshape(shape), zv.astype(np.float64).reshape(shape)))


class _TransposedWeight(StoredWeight):
    """A weight stored ``[dirs, input, rows]`` (``DynamicQuantizeLSTM``'s) read as ONNX's
    ``[dirs, rows, input]``: the stored weight's axes 1 and 2 swapped both ways."""

    def __init__(self, stored: StoredWeight) -> None:
        self.stored = stored
        self.constant = stored.constant

    @property
    def dtype(self) -> np.dtype:
        return self.stored.dtype

    @property
    def shape(self) -> tuple[int, ...]:
        dirs, inputs, rows = self.stored.shape
        return dirs, rows, inputs

    def constants(self) -> list[gs.Constant]:
        return self.stored.constants()

    def axis_of(self, axis: int) -> int:
        return self.stored.axis_of({1: 2, 2: 1}.get(axis, axis))

    def decode(self) -> np.ndarray:
        return np.swapaxes(self.stored.decode(), 1, 2)

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        return self.stored.encode(np.swapaxes(np.asarray(values), 1, 2), grow=grow)
