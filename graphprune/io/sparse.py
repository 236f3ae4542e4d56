"""Sparse initializers (``GraphProto.sparse_initializer``) written out as dense ones.

ONNX lets a graph store a constant as a :class:`onnx.SparseTensorProto` (its non-zero values
and their indices, linear ``[NNZ]`` or coordinates ``[NNZ, rank]``). Nothing downstream
reads them (graphsurgeon imports initializers only, the rules read dense weights), so on
intake each becomes the dense initializer it stands for, under the same name; the report
names them (the written model stores them dense).
"""

from __future__ import annotations

import os

import numpy as np
import onnx
from onnx import numpy_helper

from graphprune.errors import InvalidModelError
from graphprune.io.graph_reads import subgraphs_of


def _dense(sparse: onnx.SparseTensorProto, base_dir: str) -> np.ndarray:
    values = numpy_helper.to_array(sparse.values, base_dir=base_dir).reshape(-1)
    indices = numpy_helper.to_array(sparse.indices, base_dir=base_dir).astype(np.int64)
    dims = tuple(int(d) for d in sparse.dims)
    dense = np.zeros(dims, dtype=values.dtype)
    if indices.ndim == 1:
        dense.reshape(-1)[indices] = values
    elif indices.ndim == 2 and indices.shape[1] == len(dims):
        dense[tuple(indices.T)] = values
    else:
        raise ValueError(f"indices of shape {list(indices.shape)} for a tensor of shape {list(dims)}")
    return dense


def densify(graph: onnx.GraphProto, base_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """Replace (in place) the sparse initializers of ``graph`` and of its subgraphs with dense
    ones; return their names. A sparse tensor that does not fit its own shape is an
    :class:`~graphprune.errors.InvalidModelError`."""
    names: list[str] = []
    where = os.fspath(base_dir) if base_dir is not None else ""
    for sparse in graph.sparse_initializer:
        name = sparse.values.name
        try:
            dense = _dense(sparse, where)
        except (ValueError, IndexError, OSError) as exc:
            raise InvalidModelError(f"sparse initializer '{name}' cannot be read: {exc}") from exc
        graph.initializer.append(numpy_helper.from_array(dense, name))
        names.append(name)
    del graph.sparse_initializer[:]
    for node in graph.node:
        for sub in subgraphs_of(node):
            names.extend(densify(sub, base_dir))
    return names
