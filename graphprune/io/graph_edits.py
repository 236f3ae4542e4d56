"""Small edits of an onnx-graphsurgeon graph shared by the preparation, folding and the passes."""

from __future__ import annotations

import onnx_graphsurgeon as gs

__all__ = ["redirect_uses"]


def redirect_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new
