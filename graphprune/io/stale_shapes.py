"""Declared intermediate shapes that contradict the graph: dropped before analysis.

A model's ``value_info`` is a hint: the nodes define the shapes. A file edited after export
(a tool that cut channels but left the old ``value_info``; a hand-made graph) can declare a
tensor ``[N, 35, 32, 32]`` that its Conv computes as ``[N, 32, 32, 32]``. ONNX Runtime merges
leniently and runs it, but ONNX shape inference stops at the contradiction and leaves
everything after it without a rank, so every group it touches would be frozen ("coupled
with an axis of unknown rank"). Here the main graph is inferred once without its declared
``value_info``; a declaration whose element type, rank or a fixed size contradicts the
inferred one is dropped (a symbolic size against a number is no contradiction, and a
tensor inference cannot reach, such as a custom operator's output, keeps its declaration).
A declaration of an initializer is checked against the initializer itself.
"""

from __future__ import annotations

import onnx

from graphprune.io.order import sort_proto
from graphprune.io.tensor_protos import _detach


def _contradicts(declared: onnx.TypeProto, inferred: onnx.TypeProto) -> bool:
    if declared.WhichOneof("value") != "tensor_type" or inferred.WhichOneof("value") != "tensor_type":
        return False
    mine, theirs = declared.tensor_type, inferred.tensor_type
    if mine.elem_type and theirs.elem_type and mine.elem_type != theirs.elem_type:
        return True
    if not (mine.HasField("shape") and theirs.HasField("shape")):
        return False
    if len(mine.shape.dim) != len(theirs.shape.dim):
        return True
    return any(a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value != b.dim_value
               for a, b in zip(mine.shape.dim, theirs.shape.dim, strict=True))


def drop_stale(model: onnx.ModelProto) -> list[str]:
    """Remove (in place) the main graph's ``value_info`` entries that contradict ONNX shape
    inference run without them; return their names (none when inference fails)."""
    if not len(model.graph.value_info):
        return []
    skeleton, _ = _detach(model)
    del skeleton.graph.value_info[:]
    sort_proto(skeleton.graph)  # (ONNX inference reads the nodes in order; a float16 converter left an input's Cast last)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception:  # noqa: BLE001 - the ordinary inference reports it
        return []
    shapes = {v.name: v.type for v in inferred.graph.value_info}
    for init in model.graph.initializer:  # a weight's declaration is its own type (a float16
        # converter rewrote the weights and left their float declarations)
        shapes[init.name] = onnx.helper.make_tensor_type_proto(init.data_type, list(init.dims))
    stale = [v.name for v in model.graph.value_info
             if v.name in shapes and _contradicts(v.type, shapes[v.name])]
    if stale:
        dropped = set(stale)
        kept = [v for v in model.graph.value_info if v.name not in dropped]
        del model.graph.value_info[:]
        model.graph.value_info.extend(kept)
    return stale
