"""``STFT``: a short-time Fourier transform of a signal (audio front ends, the harmonic source
of a vocoder: Kokoro / StyleTTS 2's iSTFTNet, speech enhancers).

``signal [B, L]`` or ``[B, L, 1 | 2]`` (real or complex), read in frames of ``frame_length``
every ``frame_step`` samples through ``window``, gives ``[B, frames, bins, 2]``: ``bins`` is
``frame_length // 2 + 1`` where ``onesided`` (the default), else ``frame_length``; the last
axis is the real and the imaginary part. Only the batch axis passes through; samples,
frames, frequency bins and the complex pair are positions (frozen), and the frame step,
window and length carry no channel.

ONNX shape inference gives the op no shape at all where the signal's length is not a number
(every export with a dynamic length), and everything computed from it then has no rank: in
Kokoro the whole generator after its ``STFT`` froze ("shape unknown at Add"). The rule gives
the output's rank, its batch and, where the window's size is known, its bins
(:meth:`output_shape`, which graphprune's preparation writes for ONNX inference to go on
from: :func:`graphprune.io.contrib_shapes.annotate`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import onnx_graphsurgeon as gs

from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext


@register
class STFTRule(OpRule):
    op_types = ("STFT",)
    since_opset = 17

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        signal = shapes[0] if shapes else None
        window = shapes[2] if len(shapes) > 2 else None
        if not signal or len(signal) not in (2, 3):
            return None
        length = window[0] if window and len(window) == 1 and isinstance(window[0], int) else None
        bins = None if length is None else (length // 2 + 1 if int(attrs.get("onesided", 1)) else length)
        return [signal[0], None, bins, 2], 0

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, y = node.inputs[0], node.outputs[0]
        ranks = ctx.known_ranks(node, x, y)
        if ranks is None:
            return
        rank, out_rank = ranks
        if rank not in (2, 3) or out_rank != 4:
            ctx.freeze_node(node, f"STFT '{node.name}' not understood (ranks {rank} -> {out_rank})")
            return
        ctx.couple(x, 0, y, 0)
        for t in (x, y):
            ctx.spatial(t, [0], "batch")
        ctx.spatial(x, range(1, rank), "signal")
        ctx.spatial(y, [1, 2, 3], "frame, frequency and complex")
        for t in node.inputs[1:]:
            ctx.freeze(t, None, f"frame step, window and length of {node.op} '{node.name}'")
