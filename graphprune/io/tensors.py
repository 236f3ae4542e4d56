"""Static facts about onnx-graphsurgeon tensors, shared by every analysis context."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs


def static_shape(tensor: gs.Tensor | None) -> list[int | None] | None:
    """Static shape with ``None`` for unknown dims, or ``None`` if the rank is unknown."""
    if tensor is None:
        return None
    if isinstance(tensor, gs.Constant):
        return [int(d) for d in tensor.shape]
    if tensor.shape is None:
        return None
    return [d if isinstance(d, int) and d >= 0 else None for d in tensor.shape]


def static_size(tensor: gs.Tensor | None, axis: int) -> int | None:
    shape = static_shape(tensor)
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    return shape[axis]


def const_value(tensor: gs.Tensor | None) -> np.ndarray | None:
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None
