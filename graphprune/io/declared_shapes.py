"""What the models the tool writes declare about their shapes.

An output dimension the user's file leaves open stays open (:func:`keep_open_outputs`).

The size names ONNX shape inference invents (``unk__N``) are kept from ONNX Runtime. Where inference cannot compute a size, it names it ``unk__N``, and it reuses that name
wherever it knows two sizes are equal. The analysis reads those equalities. ONNX Runtime's
graph optimizer reads them too and folds shape computations on them: a ``Reshape`` whose
target is computed as ``[Shape(a)[0], Shape(a)[1]]`` becomes ``[0, -1]``, which ORT cannot
apply to a tensor with no element ("The input tensor cannot be reshaped"). torchvision's
Faster R-CNN, Mask R-CNN and Keypoint R-CNN (TorchScript) as exported run on an image with
no region proposal; the same graphs with inferred shapes failed there. A model handed to
ONNX Runtime, and a model the tool returns, carry the exporter's size names only
(:func:`invented_cleared` for a moment, :func:`forget_invented` for good); the rank and the fixed sizes stay.
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


def forget_invented(model: onnx.ModelProto) -> int:
    """Clear the invented size names of ``model``'s intermediate shapes (in place); how many."""
    found = _invented(model)
    for dim, _ in found:
        dim.ClearField("dim_param")
    return len(found)


@contextlib.contextmanager
def invented_cleared(model: onnx.ModelProto) -> Iterator[onnx.ModelProto]:
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


def keep_open_outputs(model: onnx.ModelProto, declared: dict[str, onnx.TypeProto]) -> None:
    """An output dimension the user's file leaves open (named or unknown; ``declared``: its
    outputs' types) stays open in ``model`` (in place): shape inference with data propagation
    can find its size at the probe shapes (tf2onnx's SAME padding of a dynamic input), and the
    written model would declare a fixed size its original did not promise."""
    for value in model.graph.output:
        before = declared.get(value.name)
        if before is None or not before.HasField("tensor_type") or not value.type.HasField("tensor_type") \
                or not before.tensor_type.HasField("shape"):
            continue
        dims, open_dims = value.type.tensor_type.shape.dim, before.tensor_type.shape.dim
        if len(dims) == len(open_dims):
            for dim, was in zip(dims, open_dims, strict=True):
                if not was.HasField("dim_value"):
                    dim.CopyFrom(was)
