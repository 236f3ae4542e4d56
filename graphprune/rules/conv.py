"""Conv and ConvTranspose (plain, depthwise, grouped; 1-D, 2-D, 3-D).

Conv: ``W[Cout, Cin/g, k...]``. Output channels own ``W`` rows and the bias. With ``g == 1``
input channels own ``W`` columns; with ``g > 1`` input and output channels are tied conv
group by conv group (a unit is one whole conv group; depthwise is ``g == Cin``), the columns
of ``W`` stay, and ``group`` becomes the number of conv groups left.
ConvTranspose: ``W[Cin, Cout/g, k...]``, the same with the roles of the axes swapped.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.analysis.index_maps import Digit, GroupTie, Modulo
from graphprune.analysis.roles import CONSUMER, PRODUCER
from graphprune.passes.rewrite_context import RewriteContext
from graphprune.rules.linear import linear_scale
from graphprune.rules.registry import LinearInfo, OpRule, register, weight_size
from graphprune.rules.scale import ScaleContext

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext


def mark_spatial(ctx: CouplingContext, node: gs.Node, kept: Iterable[int] = ()) -> None:
    """Batch and spatial axes of an NCHW op's input and output are never channels (``kept``:
    input axes left to :meth:`CouplingContext.couple_unless_spatial`)."""
    for t, skip in ((node.inputs[0], set(kept)), (node.outputs[0], set())):
        rank = ctx.rank(t)
        if rank is not None:
            ctx.spatial(t, [0], "batch")
            ctx.spatial(t, [a for a in range(2, rank) if a not in skip])


def full_span_axes(node: gs.Node, x_shape: list | None, w_shape: list | None) -> list[int]:
    """The spatial axes of a Conv's input that its kernel spans whole, unpadded and undilated:
    the output is 1 there, and the conv is a dense layer over that axis, whose positions are
    read like input channels (TensorFlow graphs that concatenate features along an axis the
    next conv reads whole: musicnn's 561 front-end channels, 99.98 % of its MACs, froze as a
    "spatial axis")."""
    if x_shape is None or w_shape is None or len(x_shape) != len(w_shape) or len(x_shape) < 3 \
            or node.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        return []
    spatial = len(x_shape) - 2
    pads = list(node.attrs.get("pads") or [0] * 2 * spatial)
    dilations = list(node.attrs.get("dilations") or [1] * spatial)
    if len(pads) != 2 * spatial or len(dilations) != spatial:
        return []
    return [2 + i for i in range(spatial)
            if isinstance(x_shape[2 + i], int) and isinstance(w_shape[2 + i], int) and x_shape[2 + i] > 1
            and w_shape[2 + i] == x_shape[2 + i] and pads[i] == 0 and pads[i + spatial] == 0 and dilations[i] == 1]


def rewrite_group(node: gs.Node, ctx: RewriteContext, channels_axis_tensor: gs.Tensor) -> None:
    group = int(node.attrs.get("group", 1))
    if group == 1:
        return
    old = ctx.old_size(channels_axis_tensor, 1)
    new = ctx.new_size(channels_axis_tensor, 1)
    if old is None or new is None or old == new:
        return
    per_group = old // group
    node.attrs["group"] = new // per_group


@register
class ConvRule(OpRule):
    op_types = ("Conv",)
    zero_behaviour = "affine"  # zero input channel: contributes nothing; output gets the bias
    #: the inputs that hold the data, the weight and the bias (``ConvInteger`` has no bias:
    #: its third input is a zero point; ``QLinearConv`` interleaves scales and zero points)
    data_index: int = 0
    weight_index: int = 1
    bias_index: int | None = 2

    def required_sizes(self, node: gs.Node) -> dict[tuple[int, int], int]:
        """A stored weight ``[O, C / group, k...]`` fixes the input's channels at ``C``."""
        size = weight_size(node.inputs[self.weight_index] if len(node.inputs) > self.weight_index else None, 1)
        return {(self.data_index, 1): size * int(node.attrs.get("group", 1))} if size else {}

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """``y[o] = b[o] + sum_i x[i] sum_k W[o, i, k]`` over the inputs ``W[o, i]`` reads.

        Known when every read input channel is known, and zero where the conv pads (a
        padded border sees 0, not the constant).
        """
        weight = ctx.const(node.inputs[1])
        bias_t = ctx.present(node, 2)
        bias = ctx.const(bias_t) if bias_t is not None else None
        if weight is None or weight.ndim < 3 or (bias_t is not None and bias is None):
            return [None]
        cout, cin_g = weight.shape[0], weight.shape[1]
        group = int(node.attrs.get("group", 1))
        x = ctx.along(node.inputs[0], 1)
        if x is None:
            x = za.unknown(cin_g * group)
        if x.size != cin_g * group or cout % group:
            return [None]
        padded = za.conv_is_padded(node, weight.shape[2:], ctx.shape(node.inputs[0]))
        rows = weight.reshape(cout, cin_g, -1).astype(np.float64)
        reads = (rows != 0).any(axis=2)
        sums = rows.sum(axis=2)
        first = (np.arange(cout) // (cout // group)) * cin_g
        xin = x[first[:, None] + np.arange(cin_g)[None, :]]
        usable = ~np.isnan(xin) & ((xin == 0) | (not padded))
        ok = (~reads | usable).all(axis=1)
        total = np.where(reads, np.nan_to_num(xin) * sums, 0.0).sum(axis=1)
        b = np.zeros(cout) if bias is None else bias.astype(np.float64).reshape(-1)
        return [za.values(1, np.where(ok, (b + total).astype(np.float32), np.nan))]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, w = node.inputs[self.data_index], node.inputs[self.weight_index]
        k = self.bias_index
        b = node.inputs[k] if k is not None and len(node.inputs) > k and node.inputs[k].name else None
        y = node.outputs[0]
        group = int(node.attrs.get("group", 1))
        x_shape, w_shape = ctx.shape(x), ctx.shape(w)
        if x_shape is not None and w_shape is not None and len(x_shape) == len(w_shape):
            spatial: list[int | None] = [None] * (len(x_shape) - 2)
            if None not in x_shape[2:] and None not in w_shape[2:]:  # behind an op ONNX does not know
                spatial = list(za.conv_geometry(node.attrs, w_shape[2:], x_shape[2:])[3])
            ctx.derive_shape(y, [x_shape[0], w_shape[0], *spatial])
        ctx.couple(w, 0, y, 1)
        ctx.role(w, 0, PRODUCER)
        if b is not None:
            ctx.couple(b, 0, y, 1)
            ctx.role(b, 0, PRODUCER)
        if group == 1:
            ctx.couple(x, 1, w, 1)
            ctx.role(w, 1, CONSUMER)
        elif node.name in ctx.position_convs:
            # prune the same positions in every conv group: group count stays, W shrinks
            # along its input axis; output position p of every group goes together
            per_out = (ctx.size(w, 0) or group) // group
            ctx.couple(w, 1, x, 1, Digit(1))
            ctx.role(w, 1, CONSUMER)
            ctx.couple(y, 1, y, 1, Modulo(per_out))
        else:
            ctx.couple(x, 1, y, 1, GroupTie(group))
        spans = full_span_axes(node, x_shape, w_shape) if node.op == "Conv" and isinstance(w, gs.Constant) else []
        for a in spans:  # a dense layer over that axis: its positions go like input channels, unless it
            ctx.couple_unless_spatial(x, a, w, a, CONSUMER)  # is a convolution's spatial output
        mark_spatial(ctx, node, spans)

    def linear(self, node: gs.Node) -> LinearInfo | None:
        return LinearInfo(
            data=0, data_axis=1, weight=1, in_axis=1, out_axis=0, out_channel_axis=1, bias=2,
            kernel="conv", group=int(node.attrs.get("group", 1)),
        )

    def prunes_by_position(self, node: gs.Node) -> bool:
        """A grouped, not depthwise, conv with a constant weight (see ``couple``)."""
        w = node.inputs[self.weight_index]
        return int(node.attrs.get("group", 1)) > 1 and isinstance(w, gs.Constant) and w.shape[1] > 1

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """Every output element sums ``Cin/g * prod(kernel)`` products."""
        w, y = shape(node.inputs[self.weight_index]), shape(node.outputs[0])
        if w is None or y is None:
            return None
        return math.prod(y) * math.prod(w[1:])

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        return linear_scale(node, self.linear(node), ctx)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        w = node.inputs[self.weight_index]
        kernel = node.attrs.get("kernel_shape")
        if kernel is not None:  # a kernel that spans an axis whole loses the positions removed there
            node.attrs["kernel_shape"] = [int(k) - int(ctx.removed(w, 2 + i).size) for i, k in enumerate(kernel)]
        if int(node.attrs.get("group", 1)) > 1 and ctx.removed(w, 1).size:
            return  # position mode: the group count is unchanged
        rewrite_group(node, ctx, node.inputs[self.data_index])


@register
class ConvTransposeRule(OpRule):
    op_types = ("ConvTranspose",)
    zero_behaviour = "affine"

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Output channel ``o`` is its bias when every input channel it reads is zero."""
        weight = ctx.const(node.inputs[1])
        bias_t = ctx.present(node, 2)
        bias = ctx.const(bias_t) if bias_t is not None else None
        if weight is None or weight.ndim < 3 or (bias_t is not None and bias is None):
            return [None]
        cin, cout_g = weight.shape[0], weight.shape[1]
        group = int(node.attrs.get("group", 1))
        x = ctx.along(node.inputs[0], 1)
        if x is None:
            x = za.unknown(cin)
        if x.size != cin or cin % group:
            return [None]
        cin_g = cin // group
        reads = (weight.reshape(cin, cout_g, -1) != 0).any(axis=2)  # [cin, cout_g]
        known = []
        for o in range(cout_g * group):
            g, local = divmod(o, cout_g)
            part = slice(g * cin_g, (g + 1) * cin_g)
            known.append(bool(((x[part] == 0) | ~reads[part, local]).all()))
        b = np.zeros(cout_g * group) if bias is None else bias.astype(np.float64).reshape(-1)
        return [za.values(1, np.where(np.array(known), b, np.nan))]

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, w = node.inputs[0], node.inputs[1]
        b = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        y = node.outputs[0]
        group = int(node.attrs.get("group", 1))
        ctx.couple(x, 1, w, 0)
        ctx.role(w, 0, CONSUMER)
        if b is not None:
            ctx.couple(b, 0, y, 1)
            ctx.role(b, 0, PRODUCER)
        if group == 1:
            ctx.couple(w, 1, y, 1)
            ctx.role(w, 1, PRODUCER)
        else:
            ctx.couple(x, 1, y, 1, GroupTie(group))
        mark_spatial(ctx, node)

    def linear(self, node: gs.Node) -> LinearInfo | None:
        return LinearInfo(
            data=0, data_axis=1, weight=1, in_axis=0, out_axis=1, out_channel_axis=1, bias=2,
            kernel="conv_transpose", group=int(node.attrs.get("group", 1)),
        )

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """Every input element is scattered through ``Cout/g * prod(kernel)`` products."""
        w, x = shape(node.inputs[1]), shape(node.inputs[0])
        if w is None or x is None:
            return None
        return math.prod(x) * math.prod(w[1:])

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        return linear_scale(node, self.linear(node), ctx)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        rewrite_group(node, ctx, node.inputs[0])
