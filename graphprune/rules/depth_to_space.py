"""DepthToSpace: channel blocks move into space.

``x [N, C, H, W] -> y [N, C/b², H*b, W*b]`` with block size ``b``. ONNX views the input
channel axis as three factors and moves two of them into the spatial axes:

- ``DCR`` (the default): ``C = (b, b, C/b²)``, input channel ``(i*b + j)*C' + c`` lands at
  output channel ``c`` (``C' = C/b²``): ``c`` is the *inner* factor,
  ``x[ic] <-> y[ic % C']``, an index map ``Digit(1)``;
- ``CRD``: ``C = (C/b², b, b)``, input channel ``c*b² + i*b + j``: ``c`` is the *outer*
  factor, ``x[ic] <-> y[ic // b²]``, an index map ``Digit(b²)``.

Either way one output channel owns ``b²`` input channels (a unit), so the producer loses
``b²`` channels per removed output channel. Removing whole units keeps the layout of the
kept channels in both modes, so the block size and the mode stay as they are: no rewrite.
The op only moves data, so a constant output channel is the value its ``b²`` input
channels share (``zero_output``), and its RMS is their mean energy (``propagate_rms``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants
from graphprune.analysis.index_maps import Digit
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.rules.scale import ScaleContext


def _mode(node: gs.Node) -> str:
    """``"DCR"`` or ``"CRD"`` (the attribute exists from opset 11; before, always DCR)."""
    mode = node.attrs.get("mode", "DCR")
    return (mode.decode() if isinstance(mode, bytes) else str(mode)).upper()


def _blocks(vector: np.ndarray, block: int, mode: str) -> np.ndarray:
    """An input channel vector as ``[C/b², b²]``: row ``c`` holds output channel ``c``'s inputs."""
    if mode == "DCR":
        return vector.reshape(block * block, -1).T
    return vector.reshape(-1, block * block)


@register
class DepthToSpaceRule(OpRule):
    op_types = ("DepthToSpace",)
    zero_behaviour = "move"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        block = int(node.attrs.get("blocksize", 0))
        mode = _mode(node)
        if ctx.rank(x) != 4 or ctx.rank(y) != 4 or block < 1 or mode not in ("DCR", "CRD"):
            ctx.freeze_node(node, f"DepthToSpace '{node.name}' not understood (mode {mode})")
            return
        ctx.couple(x, 0, y, 0)
        # y is the factor, x the merged axis (x channel ic belongs to y channel (ic // s) % C')
        ctx.couple(y, 1, x, 1, Digit(1 if mode == "DCR" else block * block))
        for t in (x, y):  # (axis 0 passes through as it is: after a Transpose it can hold
            ctx.spatial(t, [2, 3])  # channels, tf2onnx's dilated convolution)

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """Output channel ``c`` is constant when its ``b²`` input channels share one value."""
        block = int(node.attrs.get("blocksize", 0))
        x = ctx.along(node.inputs[0], 1)
        if x is None or block < 1 or x.size % (block * block):
            return [None]
        rows = _blocks(x, block, _mode(node))
        same = (rows == rows[:, :1]).all(axis=1)  # NaN never equals: unknown stays unknown
        return [constants.values(1, np.where(same, rows[:, 0], np.nan))]

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        """Output channel ``c`` interleaves its ``b²`` input channels: their mean energy."""
        block = int(node.attrs.get("blocksize", 0))
        shape = node.inputs[0].shape or []
        channels = shape[1] if len(shape) == 4 else None
        if not isinstance(channels, int) or block < 1 or channels % (block * block):
            return None
        rows = _blocks(ctx.of(node.inputs[0], channels), block, _mode(node))
        return np.sqrt(np.mean(np.square(rows), axis=1))
