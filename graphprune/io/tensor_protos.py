"""ONNX tensor protos: walking every tensor of a model, sizes, external-data stubs, and
weight-free skeletons of a model for C++ round trips (shape inference, conversion).

Kept apart from :mod:`graphprune.io.model_io` (load/save) so each module has one job.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from typing import Any

import onnx
from google.protobuf.message import Message
from onnx import external_data_helper

from graphprune.errors import InvalidModelError

_DETACH_THRESHOLD = 2**20
"""Tensors this large are detached (left out) when a model goes through C++ (inference, conversion)."""

_DETACHED_LOCATION = "graphprune-detached:"

_PACKED = {  # element types stored several to a byte, and how many
    getattr(onnx.TensorProto, name): per_byte
    for name, per_byte in (("INT4", 2), ("UINT4", 2), ("FLOAT4E2M1", 2), ("INT2", 4), ("UINT2", 4))
    if hasattr(onnx.TensorProto, name)
}


# --------------------------------------------------------------------------- tensor walks


def _graph_tensors(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    """Every tensor stored in ``graph``: initializers, sparse parts, attributes, subgraphs."""
    yield from graph.initializer
    for sparse in graph.sparse_initializer:
        yield sparse.values
        yield sparse.indices
    for node in graph.node:
        yield from _node_tensors(node)


def _node_tensors(node: onnx.NodeProto) -> Iterator[onnx.TensorProto]:
    for attribute in node.attribute:
        if attribute.HasField("t"):
            yield attribute.t
        yield from attribute.tensors
        if attribute.HasField("sparse_tensor"):
            yield attribute.sparse_tensor.values
            yield attribute.sparse_tensor.indices
        if attribute.HasField("g"):
            yield from _graph_tensors(attribute.g)
        for graph in attribute.graphs:
            yield from _graph_tensors(graph)


def _model_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            yield from _node_tensors(node)


def _external_tensors(model: onnx.ModelProto) -> Iterator[onnx.TensorProto]:
    return (t for t in _model_tensors(model) if external_data_helper.uses_external_data(t))


def uses_external_data(path: Any) -> bool:
    """Whether the model file at ``path`` keeps tensors in external data files (not loaded)."""
    return next(_external_tensors(onnx.load_model(os.fspath(path), load_external_data=False)), None) is not None


# --------------------------------------------------------------------------- skeletons


def _is_repeated(field: Any) -> bool:
    flag = getattr(field, "is_repeated", None)  # protobuf >= 6
    if flag is not None:
        return bool(flag)
    return bool(field.label == field.LABEL_REPEATED)


def _copy_except(message: Message, skip: tuple[str, ...]) -> Any:
    """A copy of ``message`` without the fields named in ``skip`` (which are not even read).

    Not ``ListFields()``: it would materialize every bytes field, and reading ``raw_data``
    copies the whole tensor.
    """
    result = type(message)()
    for field in message.DESCRIPTOR.fields:
        name = field.name
        if name in skip:
            continue
        if _is_repeated(field):
            values = getattr(message, name)
            if len(values):
                getattr(result, name).extend(values)
        elif message.HasField(name):  # onnx.proto is proto2: every singular field has presence
            if field.message_type is not None:
                getattr(result, name).CopyFrom(getattr(message, name))
            else:
                setattr(result, name, getattr(message, name))
    return result


TensorConverter = Callable[[onnx.TensorProto], onnx.TensorProto | None]
"""Returns a replacement for an initializer, or None to keep (copy) it as it is."""


def _copy_graph(graph: onnx.GraphProto, convert: TensorConverter) -> onnx.GraphProto:
    result: onnx.GraphProto = _copy_except(graph, ("initializer", "node"))
    for tensor in graph.initializer:
        replacement = convert(tensor)
        result.initializer.append(tensor if replacement is None else replacement)
    for node in graph.node:
        if any(a.HasField("g") or len(a.graphs) for a in node.attribute):
            result.node.append(_copy_node(node, convert))
        else:
            result.node.append(node)
    return result


def _copy_node(node: onnx.NodeProto, convert: TensorConverter) -> onnx.NodeProto:
    result: onnx.NodeProto = _copy_except(node, ("attribute",))
    for attribute in node.attribute:
        new: onnx.AttributeProto = _copy_except(attribute, ("g", "graphs"))
        if attribute.HasField("g"):
            new.g.CopyFrom(_copy_graph(attribute.g, convert))
        for graph in attribute.graphs:
            new.graphs.append(_copy_graph(graph, convert))
        result.attribute.append(new)
    return result


def _copy_model(model: onnx.ModelProto, convert: TensorConverter) -> onnx.ModelProto:
    """Copy ``model``, replacing initializers (also in subgraphs) through ``convert``."""
    result: onnx.ModelProto = _copy_except(model, ("graph",))
    if model.HasField("graph"):
        result.graph.CopyFrom(_copy_graph(model.graph, convert))
    return result


def nbytes(tensor: onnx.TensorProto) -> int:
    """Bytes of ``tensor``'s data from its dims and type (external or not)."""
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return 0
    count = 1
    for dim in tensor.dims:
        count *= dim
    per_byte = _PACKED.get(tensor.data_type)
    return -(-count // per_byte) if per_byte is not None else count * itemsize


#: element types whose one value takes two entries of their typed field (real and imaginary parts)
_PAIRED = {onnx.TensorProto.COMPLEX64, onnx.TensorProto.COMPLEX128}


def data_misfit(tensor: onnx.TensorProto, raw_length: int | None = None) -> str | None:
    """Why ``tensor``'s data cannot be its shape (``None``: it can, or it is not known here):
    ``raw_length`` bytes of ``raw_data`` (read by the caller: reading it copies it; ``None``:
    the typed fields hold the data, or it is external and its stated length is compared)."""
    if tensor.HasField("segment"):
        return None
    count = 1
    for dim in tensor.dims:
        count *= dim
    shape = f"shape {list(tensor.dims)} of {onnx.TensorProto.DataType.Name(tensor.data_type)}" \
        if tensor.data_type in onnx.TensorProto.DataType.values() else None
    if shape is None or tensor.data_type == onnx.TensorProto.STRING and raw_length is not None:
        return None
    if external_data_helper.uses_external_data(tensor):
        try:
            length = external_data_helper.ExternalDataInfo(tensor).length
        except ValueError:
            return None  # (the loader says what is wrong with it)
        need = nbytes(tensor)
        return (f"its external data is {length} bytes, its {shape} needs {need}"
                if length is not None and need and length != need else None)
    if raw_length is not None:
        need = nbytes(tensor)
        return f"it holds {raw_length} bytes, its {shape} needs {need}" if need and raw_length != need else None
    try:  # (the field onnx stores the type's values in)
        field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    except Exception:  # noqa: BLE001 - an undefined element type: not known here
        return None
    held = len(getattr(tensor, field))
    packed = _PACKED.get(tensor.data_type)
    need = -(-count // packed) if packed else count * (2 if tensor.data_type in _PAIRED else 1)
    return f"it holds {held} values in {field}, its {shape} needs {need}" if held != need else None


def check_fits(tensor: onnx.TensorProto, raw_length: int | None) -> None:
    """An :class:`~graphprune.errors.InvalidModelError` where ``tensor``'s data cannot be its
    shape (:func:`data_misfit`; onnx.checker does not look, and decoding it later fails deep
    inside the analysis)."""
    problem = data_misfit(tensor, raw_length)
    if problem is not None:
        raise InvalidModelError(f"the model is not valid: tensor '{tensor.name}': {problem}")


def _raw_size(tensor: onnx.TensorProto) -> int:
    """Length of ``tensor.raw_data`` (0 if unset), from its dims when possible.

    Reading ``raw_data`` copies it, which matters for tensors of gigabytes.
    """
    if not tensor.HasField("raw_data"):
        return 0
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except Exception:
        return len(tensor.raw_data)
    count = 1
    for dim in tensor.dims:
        count *= dim
    per_byte = _PACKED.get(tensor.data_type)
    if per_byte is not None:
        return -(-count // per_byte)
    return count * itemsize


def _external_stub(
    tensor: onnx.TensorProto, location: str, offset: int | None = None, length: int | None = None
) -> onnx.TensorProto:
    """A copy of ``tensor`` without its data, pointing to ``location`` instead."""
    stub: onnx.TensorProto = _copy_except(tensor, ("raw_data", "external_data", "data_location"))
    stub.data_location = onnx.TensorProto.EXTERNAL
    entries = [("location", location)]
    if offset is not None:
        entries.append(("offset", str(offset)))
    if length is not None:
        entries.append(("length", str(length)))
    for key, value in entries:
        entry = stub.external_data.add()
        entry.key, entry.value = key, value
    return stub


def _detach(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[onnx.TensorProto]]:
    """A skeleton of ``model`` whose large tensors are marked external; returns it and them."""
    detached: list[onnx.TensorProto] = []

    def convert(tensor: onnx.TensorProto) -> onnx.TensorProto | None:
        if _raw_size(tensor) < _DETACH_THRESHOLD:
            return None
        detached.append(tensor)
        return _external_stub(tensor, f"{_DETACHED_LOCATION}{len(detached) - 1}")

    return _copy_model(model, convert), detached


def _reattach(model: onnx.ModelProto, detached: list[onnx.TensorProto]) -> None:
    """Put the bytes of the tensors :func:`_detach` took away back into ``model`` (in place)."""
    if not detached:
        return
    for tensor in _model_tensors(model):
        if not external_data_helper.uses_external_data(tensor):
            continue
        location = external_data_helper.ExternalDataInfo(tensor).location
        if not location.startswith(_DETACHED_LOCATION):
            continue
        index = int(location[len(_DETACHED_LOCATION) :])
        tensor.raw_data = detached[index].raw_data
        tensor.ClearField("data_location")
        del tensor.external_data[:]
