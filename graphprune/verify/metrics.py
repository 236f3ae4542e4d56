"""Parameter and MAC counts of an ONNX model.

Shapes are the graph's own; where its inputs leave sizes open (a symbolic height, width or
sequence length), MACs are counted at concrete input shapes when the caller gives them
(:func:`sized_shapes`: what the report and the budget planner use), and otherwise unknown
dims count as 1 — which weighs every layer as if it ran on one position, so the fraction of
a network whose stages run at different resolutions would be wrong.

MACs are the multiply-accumulates each op's rule reports (:meth:`OpRule.macs`: Conv,
ConvTranspose, Gemm, MatMul and Einsum, their quantized and fused forms, a fused
``Attention``'s projection and products, recurrent layers: the ops that dominate CNN and
transformer cost); ops whose rule does not count (elementwise ops, ops without a rule) add
nothing.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.errors import InvalidModelError
from graphprune.io import ir
from graphprune.io.branch_models import BRANCH_ATTRS, branch_models, if_nodes
from graphprune.io.graph_reads import subgraphs_of
from graphprune.rules import registry

__all__ = ["PARAMETER_TYPES", "count_if_macs", "count_macs", "count_macs_pair", "count_params", "counted_shape",
           "is_parameter_dtype", "sized_shapes"]


#: element types whose initializers are parameters: floats, and 16/8/4/2-bit integers and
#: 8/4-bit floats (quantized weights; int16 from ONNX Runtime's 16-bit QDQ). 32- and 64-bit
#: integers are shapes, indices and quantized biases
PARAMETER_TYPES = frozenset({
    onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
    onnx.TensorProto.BFLOAT16, onnx.TensorProto.INT16, onnx.TensorProto.UINT16,
    onnx.TensorProto.INT8, onnx.TensorProto.UINT8, onnx.TensorProto.INT4, onnx.TensorProto.UINT4,
    onnx.TensorProto.INT2, onnx.TensorProto.UINT2, onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2, onnx.TensorProto.FLOAT8E5M2FNUZ,
    onnx.TensorProto.FLOAT4E2M1,
})


def is_parameter_dtype(dtype: Any) -> bool:
    """Whether constants of numpy ``dtype`` count as parameters (:data:`PARAMETER_TYPES`)."""
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) in PARAMETER_TYPES
    except (TypeError, KeyError, ValueError):
        return False


def count_params(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], bytes] | None = None) -> int:
    """Number of elements in the initializers of :data:`PARAMETER_TYPES` (weights, biases,
    norm params, quantized weights), those of If/Loop/Scan bodies included. With ``read`` (a
    tensor's bytes), byte-equal copies of a constant in several bodies count once, as every
    model the tool writes stores them (:func:`graphprune.io.shared_constants.subgraph_copies`)."""
    opset = ir.default_opset(model)
    copies = 0
    if read is not None:
        from graphprune.io.shared_constants import subgraph_copies

        copies = sum(math.prod(t.dims) for t in subgraph_copies(model, read) if t.data_type in PARAMETER_TYPES)

    def packed(graph: onnx.GraphProto) -> dict[str, int]:
        """Initializers that pack several parameters to an element (a rule says how many)."""
        out: dict[str, int] = {}
        for node in graph.node:
            rule = registry.packing_rule(node.domain, node.op_type, opset)
            if rule is None:
                continue
            attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            for index, count in rule.packed_parameters(attrs, [bool(name) for name in node.input]).items():
                if index < len(node.input) and node.input[index]:
                    out[node.input[index]] = count
        return out

    def walk(graph: onnx.GraphProto) -> int:
        held = packed(graph)
        total = sum(held.get(i.name, math.prod(i.dims)) for i in graph.initializer if i.data_type in PARAMETER_TYPES)
        for node in graph.node:
            rule = registry.overriding_rule(node.domain, node.op_type, opset, "attribute_parameters")
            if rule is not None:  # (coefficients of an ONNX-ML op)
                total += rule.attribute_parameters({a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
            for attr in node.attribute:
                if node.op_type == "Constant" and attr.name == "value" and attr.type == onnx.AttributeProto.TENSOR:
                    total += math.prod(attr.t.dims) if attr.t.data_type in PARAMETER_TYPES else 0
                elif attr.type == onnx.AttributeProto.GRAPH:
                    total += walk(attr.g)
                elif attr.type == onnx.AttributeProto.GRAPHS:
                    total += sum(walk(g) for g in attr.graphs)
        return total

    return int(walk(model.graph)) - copies


def counted_shape(tensor: gs.Tensor) -> list[int] | None:
    """The tensor's dims with unknown or symbolic ones as 1 (``None``: no shape known)."""
    shape = tensor.shape
    if shape is None:
        return None
    return [d if isinstance(d, int) and d > 0 else 1 for d in shape]


def custom_symbols(model: onnx.ModelProto, *, varying: bool = False) -> bool:
    """Whether ``model`` has sizes that custom operators give (:mod:`graphprune.io.custom_shapes`):
    they are counted at the sizes their run saw, like open input sizes at the given ones
    (``varying``: only sizes that differed between its two runs, which follow the inputs)."""
    from graphprune.io.custom_shapes import observed_size, varies

    return any(observed_size(d.dim_param) is not None and (not varying or varies(d.dim_param))
               for v in model.graph.value_info if v.type.HasField("tensor_type") for d in v.type.tensor_type.shape.dim)


def sized_shapes(model: onnx.ModelProto, graph: gs.Graph, input_shapes: dict[str, Any] | None,
                 *, or_none: bool = False, data_dir: Any = None) -> Callable[[gs.Tensor], list[int] | None] | None:
    """The shape function for counting ``graph`` (imported from ``model``) at
    ``input_shapes``: every tensor with an open dim gets its concrete shape (from ONNX
    inference, else from folding the shape computations at those sizes:
    :func:`graphprune.analysis.shape_probe.probe_concrete_shapes`, else from a run of the
    model at those sizes, :func:`_run_sizes`; ``data_dir``: where its external weights lie). When a tensor that a
    MAC-counting node reads or writes stays open (an op neither can size upstream of it), no
    tensor gets one — a count with some layers at their real size and others at size 1 would
    be worse than either — and :func:`counted_shape` stays (``or_none``: ``None`` instead)."""
    if not input_shapes and not custom_symbols(model):
        return counted_shape
    input_shapes = input_shapes or {}

    def is_open(t: gs.Tensor) -> bool:
        return t.shape is not None and any(not (isinstance(d, int) and d >= 0) for d in t.shape)

    opset = ir.default_opset(model)
    counted: list[gs.Tensor] = []
    #: tensors of MAC-counting ops without any shape (ONNX inference stopped before them: an
    #: LSTM behind a computed Reshape): sized where the folding below can, else left uncounted
    unknown: list[gs.Tensor] = []
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        if rule is not None and rule.macs(node, counted_shape) is not None:
            counted.extend(t for t in (*node.inputs, *node.outputs) if is_open(t))
        elif rule is not None and type(rule).macs is not registry.OpRule.macs:
            unknown.extend(_unshaped_tensors(node))
    if not counted and not unknown:
        return counted_shape
    from graphprune.io.model_io import concrete_shapes

    def missing(sizes: dict[str, list[int]]) -> bool:
        return any(t.name not in sizes or len(sizes[t.name]) != len(t.shape) for t in counted)

    # sizes a custom operator's run saw that follow the inputs' (an ONNX-ML Scaler's batch) are,
    # at these inputs, what a run at these sizes gives (inference and the probes take the first
    # run's: batch 1 for --input-shape x=8,4)
    follow = input_shapes and custom_symbols(model, varying=True)
    sizes = (_run_sizes(model, [t.name for t in (*counted, *unknown)], input_shapes, data_dir) if follow else {}) \
        or concrete_shapes(model, input_shapes)
    if missing(sizes) or any(t.name not in sizes for t in unknown):  # a computed Reshape target:
        # fold the shape computations at these sizes
        from graphprune.analysis.shape_probe import probe_concrete_shapes

        sizes = {**probe_concrete_shapes(graph, input_shapes), **sizes}
        if missing(sizes) or any(t.name not in sizes for t in unknown):
            # behind a com.microsoft op neither reaches (an int4 MatMulNBits; ORT's fused
            # MatMulIntegerToFloat in a file without value_info: 37.7 M MACs counted for 1.23 G)
            sizes = {**_run_sizes(model, [t.name for t in (*counted, *unknown) if t.name not in sizes],
                                  input_shapes, data_dir), **sizes}
        if missing(sizes):
            return None if or_none else counted_shape
    return lambda t: list(sizes[t.name]) if t.name in sizes else counted_shape(t)


def _run_sizes(model: onnx.ModelProto, names: list[str], input_shapes: dict[str, Any],
               data_dir: Any = None) -> dict[str, list[int]]:
    """The shapes of tensors ``names`` in one ONNX Runtime run of ``model`` (only the nodes
    they need) on random feeds at ``input_shapes``; ``{}`` where that does not run. An SVTR
    recogniser quantized to int4: five decoder tensors behind ``MatMulNBits`` stayed open, so
    every layer was counted at one token (18.5 M MACs for 3.5 G)."""
    from graphprune.calibration import runner  # noqa: PLC0415 (calibration imports verify)
    from graphprune.io.feeds import make_feeds

    try:
        feeds = make_feeds(model, seed=0, count=1, input_shapes=input_shapes)[0]
        sizes = {n: [int(d) for d in np.shape(feeds[n])] for n in names if n in feeds}  # (graph inputs)
        names = [n for n in dict.fromkeys(names) if n not in feeds]
        if names:
            sess = runner.session(runner.exposed_model(model, names), data_dir)
            feeds = {k: v for k, v in feeds.items() if k in {i.name for i in sess.get_inputs()}}
            sizes.update((n, [int(d) for d in np.shape(v)]) for n, v in zip(names, sess.run(names, feeds), strict=True))
        return sizes
    except Exception:  # noqa: BLE001 - unsized: counted as before
        return {}


def _unshaped_tensors(node: gs.Node) -> list[gs.Variable]:
    return [t for t in (*node.inputs, *node.outputs) if isinstance(t, gs.Variable) and t.name and t.shape is None]


def unsized_layers(graph: gs.Graph, opset: int) -> bool:
    """Whether a node that counts MACs in ``graph`` reads or writes a tensor without a shape,
    or with a size that no graph input names (a symbol ONNX inference made up for a size the
    graph computes: tf2onnx flattens a Keras ``Dense`` on a sequence to ``[batch*8, 32]``, and
    its attention reshapes to ``[batch*heads, 8, 8]``). :func:`counted_shape` counts such a
    size as 1, as if the layer ran on one row; :func:`sized_shapes` sizes them when it is
    given input shapes."""
    inputs = {d for t in graph.inputs if t.shape is not None for d in t.shape if isinstance(d, str)}

    def derived(t: gs.Tensor) -> bool:
        return isinstance(t, gs.Variable) and bool(t.name) and (t.shape is None or any(
            not (isinstance(d, int) and d >= 0) and d not in inputs for d in t.shape))

    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        if (rule is not None and type(rule).macs is not registry.OpRule.macs
                and any(derived(t) for t in (*node.inputs, *node.outputs))):
            return True
    return False


def count_macs(model: onnx.ModelProto, store: Any = None, input_shapes: dict[str, Any] | None = None,
               taken: dict[str, set[str]] | None = None) -> int:
    """Multiply-accumulates of one run (the main graph's nodes, as their rules count them; an
    ``If`` counts the costlier of its branches, each as a model of its own at the sizes its
    outer values have).
    ``store``: the weight store that ``model``'s external weights refer to (shapes behind a
    com.microsoft op are derived by probing, which reads the small constants);
    ``input_shapes``: concrete shapes for inputs with open sizes (:func:`sized_shapes`);
    ``taken``: the branches the model's data takes per ``If`` of the main graph (an ``If``
    named there counts the costlier of those)."""
    return _count(model, store, input_shapes, taken)[0]


def count_if_macs(model: onnx.ModelProto, store: Any = None, input_shapes: dict[str, Any] | None = None,
                  taken: dict[str, set[str]] | None = None) -> int:
    """The part of :func:`count_macs` that the main graph's ``If`` nodes hold."""
    return _count(model, store, input_shapes, taken, main=False)[0]


def uncounted_bodies(model: onnx.ModelProto) -> dict[str, int]:
    """Per op type, the nodes of the main graph that repeat a body (``Loop``, ``Scan``: the
    rules' ``repeats_body``) whose bodies hold layers the count would include (a decoder run
    step by step): their MACs are not counted, since how many times a body runs is decided by
    the data (a ``Loop``'s condition) or by an input's length. Recurrent layers exported as
    ``Loop`` are lowered to standard ops first (:mod:`graphprune.io.lowering`) and are counted."""
    opset = ir.default_opset(model)

    def has_layers(graph: onnx.GraphProto) -> bool:
        for node in graph.node:
            rule = registry.lookup(node.domain or "", node.op_type, opset)
            if rule is not None and type(rule).macs is not registry.OpRule.macs:
                return True
            if any(has_layers(sub) for sub in subgraphs_of(node)):
                return True
        return False

    out: dict[str, int] = {}
    for node in model.graph.node:
        rule = registry.lookup(node.domain or "", node.op_type, opset)
        if rule is not None and rule.repeats_body and any(
                has_layers(attr.g) for attr in node.attribute if attr.type == onnx.AttributeProto.GRAPH):
            out[node.op_type] = out.get(node.op_type, 0) + 1
    return out


def count_macs_pair(before: onnx.ModelProto, after: onnx.ModelProto, store: Any = None,
                    input_shapes: dict[str, Any] | None = None,
                    taken: dict[str, set[str]] | None = None) -> tuple[int, int, bool]:
    """MACs of a model before and after a rewrite, both at ``input_shapes`` or — when either
    cannot be sized there (:func:`sized_shapes`) — both as :func:`counted_shape` counts them, so
    that their ratio compares like with like; the flag says whether they were sized."""
    b, sized_b = _count(before, store, input_shapes, taken)
    a, sized_a = _count(after, store, input_shapes, taken)
    if sized_a and sized_b:
        return b, a, True
    if sized_a or sized_b:
        b, a = _count(before, store, None, taken)[0], _count(after, store, None, taken)[0]
    return b, a, False


def _unshaped(model: onnx.ModelProto) -> bool:
    """Whether a node of the main graph that counts MACs writes a tensor without a shape
    (a file as an exporter wrote it, with no ``value_info``; a lossless result keeps only
    the input file's own)."""
    opset = ir.default_opset(model)
    shaped = {v.name for v in (*model.graph.value_info, *model.graph.output, *model.graph.input)
              if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}
    for node in model.graph.node:
        rule = registry.lookup(node.domain or "", node.op_type, opset)
        if (rule is not None and type(rule).macs is not registry.OpRule.macs
                and any(o and o not in shaped for o in node.output)):
            return True
    return False


def _import_shaped(model: onnx.ModelProto, store: Any) -> gs.Graph:
    """``model`` as a graph whose tensors carry ONNX-inferred shapes where the model has
    none: inferred on a weightless skeleton and annotated on the caller's model only for
    the import (its ``value_info`` and output types are put back: counting does not change it)."""
    if not _unshaped(model):
        return ir.import_graph(model, store)
    from graphprune.io import model_io

    saved = [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in model.graph.value_info]
    ends = {field: [onnx.ValueInfoProto.FromString(v.SerializeToString()) for v in getattr(model.graph, field)]
            for field in ("input", "output")}
    try:
        with warnings.catch_warnings():  # a model inference cannot read is counted as it is
            warnings.simplefilter("ignore", RuntimeWarning)
            try:
                model_io.infer_shapes(model, inplace=True)
            except InvalidModelError:
                pass
        return ir.import_graph(model, store)
    finally:
        del model.graph.value_info[:]
        model.graph.value_info.extend(saved)
        for field, values in ends.items():
            target = getattr(model.graph, field)
            for current, value in zip(target, values, strict=True):
                current.CopyFrom(value)


def _count(model: onnx.ModelProto, store: Any, input_shapes: dict[str, Any] | None,
           taken: dict[str, set[str]] | None = None, *, main: bool = True) -> tuple[int, bool]:
    graph = _import_shaped(model, store)
    opset = ir.default_opset(model)
    if any((n.domain or "") not in ("", "ai.onnx") for n in graph.nodes) and any(
            t.shape is None for n in graph.nodes for t in n.outputs):
        from graphprune.analysis.driver import derive_missing_shapes

        derive_missing_shapes(graph, opset)  # ONNX inference stops at com.microsoft ops
    if not input_shapes and unsized_layers(graph, opset):
        # layers of sizes the inputs do not name (the model's own shapes are incomplete):
        # counted at batch 1, every open input size 1, as counted_shape counts the rest
        input_shapes = {t.name: tuple(counted_shape(t)) for t in graph.inputs if t.shape is not None}
    shape = sized_shapes(model, graph, input_shapes, data_dir=getattr(store, "root", None))
    total = 0
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        macs = rule.macs(node, shape) if rule is not None else None
        total += macs or 0
    total = total if main else 0
    sized = shape is not counted_shape
    found = branch_models(model, input_shapes)
    if input_shapes and any(b is None or len(b[1]) < len(b[0].graph.input) for branches in found for b in branches):
        # an outer value ONNX inference leaves open (an If's output whose branches differ
        # in rank; one it gives only a rank): its size from folding the shape computations
        # at these sizes
        from graphprune.analysis.shape_probe import probe_concrete_shapes

        found = branch_models(model, input_shapes, probe_concrete_shapes(graph, input_shapes))
    for node, branches in zip(if_nodes(model.graph), found, strict=True):
        # the branch a run takes depends on a value, not on the graph: its costlier one (of
        # those the data takes, where that is known)
        branches = [b for b, attr in zip(branches, BRANCH_ATTRS, strict=True)
                    if taken is None or node.name not in taken or attr in taken[node.name]] or branches
        counts = [_count(b[0], store, b[1] or None) if b is not None else (0, False) for b in branches]
        total += max(c[0] for c in counts)
        sized = sized or any(c[1] for c in counts)
    return int(total), sized
