"""The size names ONNX shape inference invents (``unk__N``), kept from ONNX Runtime.

Where inference cannot compute a size, it names it ``unk__N``, and it reuses that name
wherever it knows two sizes are equal. The analysis reads those equalities. ONNX Runtime's
graph optimizer reads them too and folds shape computations on them: a ``Reshape`` whose
target is computed as ``[Shape(a)[0], Shape(a)[1]]`` becomes ``[0, -1]``, which ORT cannot
apply to a tensor with no element ("The input tensor cannot be reshaped"). torchvision's
Faster R-CNN, Mask R-CNN and Keypoint R-CNN (TorchScript) as exported run on an image with
no region proposal; the same graphs with inferred shapes failed there. A model handed to
ONNX Runtime, and a model the tool returns, carry the exporter's size names only
(:func:`cleared` for a moment, :func:`forget` for good); the rank and the fixed sizes stay.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import onnx

INVENTED = "unk__"


def _invented(model: onnx.ModelProto) -> list[tuple[onnx.TensorShapeProto.Dimension, str]]:
    found = []
    for value in model.graph.value_info:
        if value.type.HasField("tensor_type"):
            for dim in value.type.tensor_type.shape.dim:
                if dim.HasField("dim_param") and dim.dim_param.startswith(INVENTED):
                    found.append((dim, dim.dim_param))
    return found


def forget(model: onnx.ModelProto) -> int:
    """Clear the invented size names of ``model``'s intermediate shapes (in place); how many."""
    found = _invented(model)
    for dim, _ in found:
        dim.ClearField("dim_param")
    return len(found)


@contextlib.contextmanager
def cleared(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
    """``model`` without its invented size names while the block runs (in place: no copy
    of its weights), with them again after."""
    found = _invented(model)
    for dim, _ in found:
        dim.ClearField("dim_param")
    try:
        yield model
    finally:
        for dim, name in found:
            dim.dim_param = name
