"""The protobuf wire format of ``ModelProto``, just far enough to move weights without
holding them.

:func:`scan_model` reads a model file through a memory map and returns its *skeleton*: the
bytes of the model with every large top-level initializer's ``raw_data`` cut out, and where
in the file each cut tensor's bytes lie. Parsing the skeleton costs the graph, not the
weights; the weights' pages are never read (the store refers to them in the file itself).

:func:`write_inline` is the reverse: it writes a model whose top-level initializers are
external references as one self-contained protobuf file, streaming each tensor's bytes
into its ``raw_data`` field instead of building the message in memory.

:func:`top_level_tensors` reads the dims and element type of the main graph's initializers
without parsing the model (:mod:`graphprune.pipeline.weightless`: does the model hold a weight?).

Field numbers (onnx.proto3): ModelProto.graph = 7; GraphProto.initializer = 5;
TensorProto.raw_data = 9.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_RAW_DATA = 9
_VARINT, _I64, _LEN, _I32 = 0, 1, 2, 5


class WireError(ValueError):
    """The bytes are not a protobuf message this scanner understands."""


def _varint(buf: Any, pos: int, end: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if pos >= end or shift > 63:
            raise WireError("truncated varint")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _fields(buf: Any, start: int, end: int):
    """``(field number, wire type, field start, value start, value end)`` of each field."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos, end)
        number, wire = key >> 3, key & 7
        if number == 0:
            raise WireError("field number 0")
        if wire == _VARINT:
            _, value_end = _varint(buf, pos, end)
        elif wire == _I64:
            value_end = pos + 8
        elif wire == _I32:
            value_end = pos + 4
        elif wire == _LEN:
            length, pos = _varint(buf, pos, end)
            value_end = pos + length
        else:  # groups (3, 4) do not occur in ONNX
            raise WireError(f"wire type {wire}")
        if value_end > end:
            raise WireError("truncated field")
        yield number, wire, field_start, pos, value_end
        pos = value_end


def _len_field(number: int, payload_length: int) -> bytes:
    return encode_varint(number << 3 | _LEN) + encode_varint(payload_length)


@dataclass
class Cut:
    """A top-level initializer whose ``raw_data`` was cut: its index among the graph's
    initializers and where its bytes lie in the file."""

    index: int
    offset: int
    length: int


def scan_model(path: str | os.PathLike[str], threshold: int) -> tuple[bytes, list[Cut]] | None:
    """The skeleton of the model file at ``path`` and the cuts (see the module docstring);
    ``None`` when nothing is worth cutting or the file is not a plain binary ModelProto
    (the caller then parses it the ordinary way, with its ordinary errors)."""
    with open(path, "rb") as stream:
        size = os.fstat(stream.fileno()).st_size
        if size == 0:
            return None
        with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            view = memoryview(mapped)
            try:
                return _scan(view, size, threshold)
            except WireError:
                return None
            finally:
                view.release()
                try:
                    mapped.madvise(mmap.MADV_DONTNEED)  # the pages read go back at once
                except (AttributeError, OSError, ValueError):
                    pass


def _scan(buf: memoryview, size: int, threshold: int) -> tuple[bytes, list[Cut]] | None:
    try:
        graphs = [f for f in _fields(buf, 0, size) if f[0] == _MODEL_GRAPH]
        if len(graphs) != 1 or graphs[0][1] != _LEN:
            return None
        _, _, g_field, g_start, g_end = graphs[0]
        graph = bytearray()
        cuts: list[Cut] = []
        index = 0
        for number, wire, f_start, v_start, v_end in _fields(buf, g_start, g_end):
            if number != _GRAPH_INITIALIZER or wire != _LEN:
                graph += buf[f_start:v_end]
                continue
            raw = [f for f in _fields(buf, v_start, v_end) if f[0] == _TENSOR_RAW_DATA]
            if len(raw) == 1 and raw[0][1] == _LEN and raw[0][4] - raw[0][3] >= threshold:
                _, _, r_field, r_start, r_end = raw[0]
                tensor = bytes(buf[v_start:r_field]) + bytes(buf[r_end:v_end])
                graph += _len_field(_GRAPH_INITIALIZER, len(tensor)) + tensor
                cuts.append(Cut(index, r_start, r_end - r_start))
            else:
                graph += buf[f_start:v_end]
            index += 1
        if not cuts:
            return None
        skeleton = bytearray(buf[:g_field])
        skeleton += _len_field(_MODEL_GRAPH, len(graph)) + graph
        skeleton += buf[g_end:size]
        return bytes(skeleton), cuts
    except IndexError as exc:
        raise WireError(str(exc)) from exc


def write_inline(model: Any, stream: Any, copy_bytes: Callable[[Any, Any], int],
                 is_external: Callable[[Any], bool], nbytes: Callable[[Any], int]) -> None:
    """Write ``model`` (a ``ModelProto`` whose top-level initializers may be external
    references) to ``stream`` as one self-contained message: each external initializer's
    bytes are streamed by ``copy_bytes(stub, stream)`` into its ``raw_data`` field.

    The graph is written after the model's other fields and the initializers after the
    graph's other fields (protobuf messages may list fields in any order); their own order
    is kept. ``model`` is not modified."""
    import onnx

    shell = onnx.ModelProto()
    shell.CopyFrom(model)
    shell.ClearField("graph")
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    del graph.initializer[:]
    parts: list[tuple[bytes, Any, int]] = []  # (tensor bytes without raw_data, stub, length)
    for tensor in model.graph.initializer:
        if is_external(tensor):
            head = onnx.TensorProto()
            head.CopyFrom(tensor)
            head.ClearField("data_location")
            del head.external_data[:]
            parts.append((head.SerializeToString(), tensor, nbytes(tensor)))
        else:
            parts.append((tensor.SerializeToString(), None, 0))
    graph_bytes = graph.SerializeToString()
    del graph

    def entry_length(head: bytes, stub: Any, length: int) -> int:
        payload = len(head) + (len(_len_field(_TENSOR_RAW_DATA, length)) + length if stub is not None else 0)
        return payload

    total = len(graph_bytes)
    for head, stub, length in parts:
        payload = entry_length(head, stub, length)
        total += len(_len_field(_GRAPH_INITIALIZER, payload)) + payload
    stream.write(shell.SerializeToString())
    stream.write(_len_field(_MODEL_GRAPH, total))
    stream.write(graph_bytes)
    for head, stub, length in parts:
        stream.write(_len_field(_GRAPH_INITIALIZER, entry_length(head, stub, length)))
        stream.write(head)
        if stub is not None:
            stream.write(_len_field(_TENSOR_RAW_DATA, length))
            written = copy_bytes(stub, stream)
            if written != length:
                raise OSError(f"external data of '{stub.name}' has {written} bytes, expected {length}")


# ------------------------------------------------------------------ tensor headers

#: GraphProto.sparse_initializer; TensorProto.dims, data_type; SparseTensorProto.values, dims
_GRAPH_SPARSE_INITIALIZER = 15
_TENSOR_DIMS, _TENSOR_DATA_TYPE, _SPARSE_VALUES, _SPARSE_DIMS = 1, 2, 1, 3


def _integers(buf: Any, wire: int, start: int, end: int) -> list[int]:
    """The values of a repeated integer field: one (varint) or packed."""
    if wire == _VARINT:
        return [_varint(buf, start, end)[0]]
    values, pos = [], start
    while pos < end:
        value, pos = _varint(buf, pos, end)
        values.append(value)
    return values


def _tensor_header(buf: Any, start: int, end: int, dims_field: int) -> tuple[list[int], int]:
    """The dims and element type of a serialized tensor (``dims_field``: 1 for a
    ``TensorProto``, 3 for a ``SparseTensorProto``, whose element type is its values')."""
    dims: list[int] = []
    data_type = 0  # (UNDEFINED)
    for number, wire, _, v_start, v_end in _fields(buf, start, end):
        if number == dims_field and wire in (_VARINT, _LEN):
            dims += _integers(buf, wire, v_start, v_end)
        elif dims_field == _TENSOR_DIMS and number == _TENSOR_DATA_TYPE and wire == _VARINT:
            data_type = _varint(buf, v_start, v_end)[0]
        elif dims_field == _SPARSE_DIMS and number == _SPARSE_VALUES and wire == _LEN:
            data_type = _tensor_header(buf, v_start, v_end, _TENSOR_DIMS)[1]
    return dims, data_type


def top_level_tensors(buf: Any):
    """``(dims, element type)`` of each of the main graph's initializers and sparse
    initializers of a serialized ``ModelProto``, read from the wire format (nothing parsed,
    no tensor's data read); raises :class:`WireError` (or ``IndexError``) on bytes it does not
    understand."""
    for number, wire, _, start, end in _fields(buf, 0, len(buf)):
        if number != _MODEL_GRAPH or wire != _LEN:
            continue
        for field, kind, _, v_start, v_end in _fields(buf, start, end):
            if kind == _LEN and field in (_GRAPH_INITIALIZER, _GRAPH_SPARSE_INITIALIZER):
                yield _tensor_header(buf, v_start, v_end,
                                     _TENSOR_DIMS if field == _GRAPH_INITIALIZER else _SPARSE_DIMS)


def in_file(path: str | os.PathLike[str], read: Callable[[memoryview], Any]) -> Any:
    """``read`` of a file's bytes through a memory map (``None``: an empty or unreadable
    file, which the ordinary load reports)."""
    try:
        with open(path, "rb") as stream:
            if os.fstat(stream.fileno()).st_size == 0:
                return None
            with mmap.mmap(stream.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
                view = memoryview(mapped)
                try:
                    return read(view)
                finally:
                    view.release()
    except (OSError, ValueError):
        return None

