"""An ``If`` branch as a model of its own.

A branch is a graph whose only links to the outside are the outer values it reads and the
outputs it returns. As a standalone model the outer values it reads are graph inputs (their
types from the main graph's inference), the outer constants it reads become initializers of
its own, and its outputs are graph outputs. The pruning of branches
(:mod:`graphprune.pipeline.branches`) prunes such models, and the MAC counter
(:mod:`graphprune.verify.metrics`) counts them at the sizes their outer values have.
"""

from __future__ import annotations

import onnx
from onnx import helper

from graphprune.io.graph_reads import outer_reads, rename_reads

__all__ = ["BRANCH_ATTRS", "IF_OPS", "branch_models", "if_nodes", "standalone_branch"]

BRANCH_ATTRS = ("then_branch", "else_branch")
IF_OPS = ("If",)


def if_nodes(graph: onnx.GraphProto) -> list[onnx.NodeProto]:
    """The ``If`` nodes of ``graph`` (not those of its subgraphs)."""
    return [n for n in graph.node if n.op_type in IF_OPS]


def standalone_branch(model: onnx.ModelProto, node: onnx.NodeProto, attr: str,
                      types: dict[str, onnx.TypeProto], constants: dict[str, onnx.TensorProto],
                      *, private: bool = True, typed_outputs: bool = True
                      ) -> tuple[onnx.ModelProto, list[str]] | None:
    """Branch ``attr`` of the ``If`` ``node`` as a model, and the outer values that became
    its graph inputs; ``None`` when one of them (or, with ``typed_outputs``, an output) has
    no known shape in ``types``. ``constants``: the main graph's initializers by name; with
    ``private`` the outer constants it reads are renamed per branch (the other branch reads
    them too, and each is pruned on its own), else they keep their names (to count, not to
    rewrite). A constant stored outside the model stays a reference to the same bytes."""
    branch = next(a.g for a in node.attribute if a.name == attr)
    graph = onnx.GraphProto()
    graph.CopyFrom(branch)
    graph.name = f"{node.name}_{attr}"
    outer = sorted(outer_reads(branch))
    held = [name for name in outer if name in constants]
    renames = {name: f"{name}__gp_{node.name}_{attr}" if private else name for name in held}
    for name, new in renames.items():
        tensor = onnx.TensorProto()
        tensor.CopyFrom(constants[name])
        tensor.name = new
        graph.initializer.append(tensor)
    if private:
        rename_reads(graph, renames)
    inputs = [name for name in outer if name not in renames]
    stale = [v for v in graph.value_info if v.name not in set(inputs)]  # (an outer value's
    del graph.value_info[:]  # entry in the branch's own value_info would hide its declared shape)
    graph.value_info.extend(stale)
    for name in inputs:
        if name not in types or not types[name].tensor_type.HasField("shape"):
            return None
        graph.input.append(helper.make_value_info(name, types[name]))
    for out in graph.output:  # a branch output without a shape takes the inferred one
        known = types.get(out.name)
        if not out.type.tensor_type.HasField("shape") and known is not None \
                and known.tensor_type.HasField("shape"):
            out.type.CopyFrom(known)
    if typed_outputs and any(not o.type.tensor_type.HasField("shape") for o in graph.output):
        return None
    standalone = helper.make_model(graph, opset_imports=list(model.opset_import),
                                   ir_version=model.ir_version)
    return standalone, inputs


def branch_models(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None,
                  known: dict[str, list[int]] | None = None
                  ) -> list[list[tuple[onnx.ModelProto, dict[str, list[int]]] | None]]:
    """For each ``If`` of the main graph, its branches as standalone models that keep the
    names of the constants they read (to count, not to rewrite) with the concrete sizes of
    their inputs when the main graph's inputs have ``input_shapes`` (ONNX inference on a
    weightless skeleton; ``known``: concrete shapes found otherwise, for the values inference
    leaves open, such as the output of an ``If`` whose branches differ in rank); ``None`` for
    a branch whose outer values have no known shape."""
    from graphprune.io.tensor_protos import _detach

    ifs = if_nodes(model.graph)
    if not ifs:
        return []
    skeleton, _ = _detach(model)
    for value in skeleton.graph.input:
        shape = (input_shapes or {}).get(value.name)
        if shape is not None and value.type.HasField("tensor_type"):
            value.type.tensor_type.shape.ClearField("dim")
            for size in shape:
                value.type.tensor_type.shape.dim.add().dim_value = int(size)
    try:
        inferred = onnx.shape_inference.infer_shapes(skeleton, check_type=False, strict_mode=False,
                                                     data_prop=True)
    except Exception:
        inferred = skeleton
    types = {v.name: v.type for v in (*inferred.graph.input, *inferred.graph.value_info,
                                       *inferred.graph.output)}
    for name, shape in (known or {}).items():
        kind = types.get(name)
        if kind is not None and kind.HasField("tensor_type") and not (  # (a rank alone is not a size)
                kind.tensor_type.HasField("shape")
                and all(d.HasField("dim_value") for d in kind.tensor_type.shape.dim)):
            types[name] = helper.make_tensor_type_proto(kind.tensor_type.elem_type, shape)
    sizes: dict[str, list[int]] = {}
    for name, kind in types.items():
        if kind.HasField("tensor_type") and kind.tensor_type.HasField("shape"):
            dims = kind.tensor_type.shape.dim
            if all(d.HasField("dim_value") and d.dim_value >= 0 for d in dims):
                sizes[name] = [int(d.dim_value) for d in dims]
    constants = {t.name: t for t in model.graph.initializer}
    out: list[list[tuple[onnx.ModelProto, dict[str, list[int]]] | None]] = []
    for node in ifs:
        built = [standalone_branch(model, node, attr, types, constants, private=False, typed_outputs=False)
                 for attr in BRANCH_ATTRS]
        out.append([None if b is None else (b[0], {n: sizes[n] for n in b[1] if n in sizes}) for b in built])
    return out
