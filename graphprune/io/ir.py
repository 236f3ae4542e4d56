"""The one typed doorway between ONNX protos and onnx-graphsurgeon graphs.

``prepare`` normalises a model for analysis: initializers are removed from the graph inputs
(old exporters list them there), Constant nodes are lifted to initializers, constant
subgraphs (TorchScript's Identity on shared weights, the dynamo exporter's
Shape/Gather/Concat chains over static shapes) are folded (never into a transformed copy of a
weight that another node still reads: a tied embedding's ``Transpose`` stays,
:mod:`graphprune.io.fold_holds`), optional inputs that are provably
zero are dropped (an exported zero initial state) and selections within one input of a
concatenation read that input (``h_n[-1]``), shapes are inferred.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterator
from functools import partial
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io import (
    contrib_shapes,
    converter_semantics,
    custom_shapes,
    declared_shapes,
    fold_holds,
    gs_export,
    lowering,
    model_io,
    value_types,
)
from graphprune.io.concat_selects import bypass_concat_selects, has_concat_selects
from graphprune.io.expansions import record as record_expansions
from graphprune.io.folding import fold_constants, fold_weight_computations
from graphprune.io.graph_reads import subgraphs_of
from graphprune.io.gs_export import as_protos
from graphprune.io.order import sort_proto, toposort_model
from graphprune.io.segments import trim
from graphprune.io.sequences import slice_sequence_reads
from graphprune.io.shared_constants import (
    untie_shared_broadcasts,
    untie_shared_constants,
    untie_shared_dequantized,
    untie_shared_shapes,
)
from graphprune.io.strided_gathers import bypass_identity_gathers, has_indexed_flat_reads
from graphprune.io.weights import graph_constants, release, restore_stubs
from graphprune.io.zero_inputs import drop_zero_inputs, has_zero_defaults
from graphprune.rules import registry

logger = logging.getLogger(__name__)

# gs logs verbosely at import / fold time
gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR


def default_opset(model: onnx.ModelProto) -> int:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return 1


def _used_names(graph: onnx.GraphProto, names: set[str]) -> set[str]:
    for node in graph.node:
        names.update(node.input)
        for sub in subgraphs_of(node):
            _used_names(sub, names)
    names.update(o.name for o in graph.output)
    return names


def strip_initializer_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """Drop initializers from the graph inputs (IR < 4 style) and unused initializers."""
    names = {init.name for init in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in names]
    if len(inputs) != len(model.graph.input):
        del model.graph.input[:]
        model.graph.input.extend(inputs)
        # below IR 4, ONNX's shape inference reads the type of an initializer only from its
        # graph input: without this the weights would have no shape (every conv "unknown rank")
        model.ir_version = max(model.ir_version, 4)
    used = _used_names(model.graph, set())
    if any(init.name not in used for init in model.graph.initializer):
        kept = [init for init in model.graph.initializer if init.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def import_graph(model: onnx.ModelProto, store: Any = None) -> gs.Graph:
    """``model`` as a graphsurgeon graph; with a weight ``store`` its external weights are
    memory-mapped from the store when read."""
    graph = gs_export.import_onnx(model)
    if store is not None:
        store.map_graph(graph)
    return graph


#: numpy (ml_dtypes) dtypes of ONNX's sub-byte element types, one element per byte in numpy,
def export_graph(graph: gs.Graph, template: onnx.ModelProto, store: Any = None) -> onnx.ModelProto:
    """Export ``graph`` keeping the template's opsets, IR version and metadata.

    With a weight ``store``, new large weights are written to the store first and every
    weight is exported as a reference to the store, never copied into the proto."""
    as_protos(graph)
    if store is not None:
        store.spill(graph)
        restore_stubs(graph)
    hidden = value_types.hide(graph)
    try:
        model = gs.export_onnx(graph, do_type_check=False)
    finally:
        value_types.unhide(hidden)
    if store is not None:
        store.hoist_source_stubs(model)
    # graphsurgeon knows only tensors: graph inputs and outputs that are sequences, maps
    # (skl2onnx's ZipMap) or optionals keep the template's type (they never lose channels)
    value_types.restore(model, template)
    value_types.drop_outer_value_info(model)
    # a shape a rule derived behind an op ONNX does not know comes without a type: not a
    # value_info the checker accepts (``CouplingContext.derive_shape``)
    typed = [v for v in model.graph.value_info
             if not (v.type.WhichOneof("value") in (None, "tensor_type")
                     and v.type.tensor_type.elem_type == onnx.TensorProto.UNDEFINED)]
    if len(typed) < len(model.graph.value_info):
        del model.graph.value_info[:]
        model.graph.value_info.extend(typed)
    del model.opset_import[:]
    model.opset_import.extend(copy.deepcopy(list(template.opset_import)))
    # initializers are no longer listed as graph inputs, which IR < 4 requires
    minimum = onnx.helper.find_min_ir_version_for(list(model.opset_import), ignore_unknown=True)
    model.ir_version = max(template.ir_version, minimum, 4)
    model.producer_name = template.producer_name or "graphprune"
    model.producer_version = template.producer_version
    model.domain = template.domain
    model.model_version = template.model_version
    model.doc_string = template.doc_string
    del model.metadata_props[:]
    model.metadata_props.extend(copy.deepcopy(list(template.metadata_props)))
    present = {(f.domain, f.name, getattr(f, "overload", "")) for f in model.functions}
    for function in template.functions:
        if (function.domain, function.name, getattr(function, "overload", "")) not in present:
            model.functions.append(copy.deepcopy(function))
    return model


def name_nodes(model: onnx.ModelProto) -> None:
    """Give every node a unique name (rules, plans and reports refer to nodes by name)."""
    seen: set[str] = set()
    for index, node in enumerate(model.graph.node):
        name = node.name
        if not name or name in seen:
            base = name or f"{node.op_type}_{index}"
            name, k = base, 1
            while name in seen:
                name, k = f"{base}_{k}", k + 1
            node.name = name
        seen.add(name)


def clear_intermediate_shapes(graph: gs.Graph) -> None:
    """Forget inferred shapes of intermediate tensors (they are re-inferred after a rewrite)."""
    boundary = {t.name for t in [*graph.inputs, *graph.outputs]}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in boundary:
            tensor.shape = None
    del_value_info = graph  # noqa: F841 - value_info is rebuilt from tensors on export


#: Constant attributes written as lists or scalars, and the tensor each one stands for
_LIST_CONSTANTS = {
    "value_ints": (np.int64, 1), "value_floats": (np.float32, 1),
    "value_int": (np.int64, 0), "value_float": (np.float32, 0),
}


def tensor_constants(graph: onnx.GraphProto) -> None:
    """Write every ``Constant`` given as ``value_ints``/``value_floats``/``value_int``/
    ``value_float`` as the equal ``value`` tensor (subgraphs included). graphsurgeon cannot
    re-export an empty ``value_ints`` (the dynamo exporter's ``torch.zeros(())`` shape):
    "Could not infer attribute value_ints type from empty iterator"."""
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for k, attr in enumerate(node.attribute):
                kind = _LIST_CONSTANTS.get(attr.name)
                if kind is None:
                    continue
                dtype, rank = kind
                values = onnx.helper.get_attribute_value(attr)
                array = np.array(values, dtype=dtype)
                tensor = onnx.numpy_helper.from_array(array.reshape(-1) if rank else array.reshape(()))
                node.attribute[k].CopyFrom(onnx.helper.make_attribute("value", tensor))
                break
        for sub in subgraphs_of(node):
            tensor_constants(sub)


def _computes_constants(model: onnx.ModelProto) -> bool:
    """Does the model hold a node that exporters use to compute constants (a Constant node,
    an Identity of a shared weight, a Shape of a static shape: ``OpRule.constant_ops``), a
    weight computed in the graph (``OpRule.folds_weights``), or a parameter computed from
    constants (``OpRule.computed_parameters``)?"""
    opset = default_opset(model)
    initializers = {t.name for t in model.graph.initializer}
    for node, computed, constant in _constant_walk(model):
        rule = registry.lookup(node.domain, node.op_type, opset)
        if rule is not None and node.op_type in rule.constant_ops:
            return True
        if rule is not None and rule.folds_weights and computed:
            return True
        if rule is not None and any(k < len(node.input) and node.input[k] in constant
                                    and node.input[k] not in initializers for k in rule.computed_parameters):
            return True
    return False


def _folds_weights(node: gs.Node, opset: int) -> bool:
    """A node of constants that computes a weight (``OpRule.folds_weights``)."""
    rule = registry.lookup(node.domain or "", node.op, opset)
    return rule is not None and rule.folds_weights


def _constant_walk(model: onnx.ModelProto) -> Iterator[tuple[onnx.NodeProto, bool, set[str]]]:
    """Every node in graph order (a node's inputs are decided before it), whether all its
    inputs are constants (stored, or computed from constants by earlier nodes), and the names
    known constant before it."""
    constant = {t.name for t in model.graph.initializer}
    for node in model.graph.node:
        computed = bool(node.input) and all(not name or name in constant for name in node.input)
        yield node, computed, constant
        if computed and not subgraphs_of(node):
            constant.update(node.output)


def _computes_from_weights(model: onnx.ModelProto) -> bool:
    """Does a node compute a floating-point tensor from stored floating-point tensors (and
    other constants) alone? An exporter's own optimiser leaves such chains (the dynamo
    exporter's SwinV2: a position-bias MLP applied to a stored coordinate table, its first
    layer already folded into a ``[1, 7, 7, 512]`` table); folded, the model computes and
    stores less. Only adopted where it does (``_normalise_graph(shrink_only=True)``), and only
    tried where the weights such nodes read are at least SHRINK of the model's (a fold cannot
    save more than they hold: an LLM's stored causal mask is not worth a pass over its graph)."""
    floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE,
              onnx.TensorProto.BFLOAT16}
    stored = {t.name: int(np.prod(t.dims, dtype=np.int64)) for t in model.graph.initializer
              if t.data_type in floats and len(t.dims) >= 1}
    read = {n for node, computed, _ in _constant_walk(model) if computed and not subgraphs_of(node)
            for n in node.input if n in stored}
    return bool(read) and sum(stored[n] for n in read) >= SHRINK * sum(stored.values())


def _computed_parameters(graph: gs.Graph, stored: set[str], opset: int) -> bool:
    """Does a linear layer read a folded constant (not one of ``stored``) as its weight or
    bias (``OpRule.linear``)? Such a weight was computed in the graph from the stored one
    (sliced, split, transposed, dequantised); the rules follow that computation to the stored
    weight, which the pruned model and the frontends' parameter maps keep, so an optional
    fold leaves it alone."""
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        info = rule.linear(node) if rule is not None else None
        if info is None:
            continue
        for k in (info.weight, info.bias):
            tensor = node.inputs[k] if k is not None and k < len(node.inputs) else None
            if isinstance(tensor, gs.Constant) and tensor.name not in stored:
                return True
    return False


def _masked_weights(graph: gs.Graph, opset: int) -> set[str]:
    """Outputs of nodes that apply a pruning mask to a stored weight (``OpRule.masks_weight``:
    ``torch.nn.utils.prune``'s ``weight_orig * weight_mask``, which the dynamo exporter leaves
    unfolded above its size limit). Their fold is kept although a layer then reads a folded
    weight (:func:`_computed_parameters`): the file holds one tensor instead of two, and the
    analysis sees the channels the mask zeroes (lossless mode removes them) and can refit the
    layer; the torch frontend maps the product back to both (``frontends.torch.provenance``)."""
    found: set[str] = set()
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        if rule is not None and rule.masks_weight(node):
            found.add(node.outputs[0].name)
    return found


def _constant_bytes(graph: gs.Graph) -> int:
    """Bytes of the floating-point constants of ``graph`` by their shapes and types (nothing
    is read; shapes and indices that a fold turns into constants do not count)."""
    total = 0
    for tensor in graph_constants(graph):
        if tensor.shape is None or tensor.dtype is None:
            continue
        try:
            dtype = np.dtype(tensor.dtype)
        except TypeError:  # a type numpy does not know (bfloat16, float8): 2 bytes or fewer
            dtype = np.dtype(np.float16)
        if dtype.kind == "f":
            total += int(np.prod(tensor.shape, dtype=np.int64)) * dtype.itemsize
    return total


def prepare(
    model: onnx.ModelProto, *, fold: bool = True, copy_model: bool = True, store: Any = None,
    notes: dict[str, Any] | None = None, expansions: dict[str, Any] | None = None,
) -> onnx.ModelProto:
    """Return a normalised, shape-inferred copy of ``model`` ready for analysis.

    ``copy_model=False`` normalises the caller's model in place (no copy of its weights);
    ``store`` (a :class:`graphprune.io.weights.WeightStore`) holds the weights of a model
    whose tensors are external stubs of the store. ``notes`` (a dict) receives what the
    normalisation rewrote in ways a reader of the result should know: the local functions
    inlined (``inlined_functions``), the fused kernels lowered (``lowered_ops``,
    :mod:`graphprune.io.lowering`), the operators run for their output shapes
    (``shapes_run``, :mod:`graphprune.io.custom_shapes`) and the tensors split into a sequence
    that are read as slices now (``sequences_sliced``, :mod:`graphprune.io.sequences`).
    ``expansions`` (a dict) receives the folded tensors far larger than what they were
    computed from, for the written model to compute them again
    (:mod:`graphprune.io.expansions`).
    """
    value_types.refuse_unwritable(model)
    if copy_model:
        model = copy.deepcopy(model)
    model, inlined = lowering.inline_functions(model, default_opset(model))
    strip_initializer_inputs(model)
    declared_shapes.open_negative_sizes(model)
    declared_shapes.open_traced_output_sizes(model, contrib_shapes.symbolic_inference)
    sort_proto(model.graph)  # (ONNX inference reads the nodes in order)
    name_nodes(model)
    tensor_constants(model.graph)
    sequences = slice_sequence_reads(model.graph)
    model = model_io.infer_shapes(model, inplace=True)
    if converter_semantics.unwrap_flattened(model, partial(contrib_shapes.symbolic_ranks, model)):
        # (an old Softmax as ONNX's version converter wrote it, flattened)
        model = model_io.infer_shapes(model, inplace=True)
    if value_types.reshape_scalar_reads(model, default_opset(model)):
        model = model_io.infer_shapes(model, inplace=True)
    if contrib_shapes.annotate(model):  # a com.microsoft op stopped ONNX inference
        model = model_io.infer_shapes(model, inplace=True)
    if contrib_shapes.annotate_ranks(model):  # a Reshape to a computed shape stopped it
        model = model_io.infer_shapes(model, inplace=True)
    if contrib_shapes.annotate_read_sizes(model, default_opset(model), partial(_probes, store=store)):
        model = model_io.infer_shapes(model, inplace=True)
    ran: dict[str, int] = {}
    if custom_shapes.annotate(model, ran):  # a custom op (a tokenizer in front) stopped it: run them
        model = model_io.infer_shapes(model, inplace=True)
    lowered: dict[str, int] = {}
    described: dict[str, str] = {}
    if lowering.has_lowered_ops(model, default_opset(model)):
        model, lowered = _lower(model, store, described)
    if notes is not None:
        if inlined:
            notes["inlined_functions"] = inlined
        if lowered:
            notes["lowered_ops"] = lowered
            notes["lowered_as"] = described
        if ran:
            notes["shapes_run"] = ran
        if sequences:
            notes["sequences_sliced"] = sequences
    folding = fold and _computes_constants(model)
    shrinking = fold and not folding and _computes_from_weights(model)
    opset = default_opset(model)
    if folding or shrinking or has_zero_defaults(model, opset) or has_concat_selects(model, opset) \
            or has_indexed_flat_reads(model, opset):
        model = _normalise_graph(model, store, folding or shrinking, shrink_only=shrinking, expansions=expansions)
        for _ in range(FOLD_ROUNDS if folding else 0):  # what the folded values let inference size
            if not _reads_static_shapes(model):
                break
            size = len(model.graph.node)
            model = _normalise_graph(model, store, True, expansions=expansions)
            if len(model.graph.node) >= size:
                break
    untie_shared_dequantized(model)
    untie_shared_broadcasts(model)  # (before the others: the copies' shapes and constants are untied too)
    untie_shared_constants(model)
    untie_shared_shapes(model)
    return model


def _lower(model: onnx.ModelProto, store: Any, described: dict[str, str]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """``model`` with its fused kernels as standard ops (:func:`lowering.lower_fused`), shapes
    inferred again through them. The kernels' rules give their output shapes
    (:meth:`OpRule.output_shape`) to ONNX Runtime's symbolic inference
    (:func:`contrib_shapes.annotate`, run before), so a kernel behind another has the ranks and
    types its lowering needs; one that still lacks them waits for the next round."""
    lowered: dict[str, int] = {}
    while lowering.has_lowered_ops(model, default_opset(model)):
        graph = import_graph(model, store)
        done = lowering.lower_fused(graph, default_opset(model), described)
        if not done:
            break
        for op, count in done.items():
            lowered[op] = lowered.get(op, 0) + count
        toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        model = export_graph(graph, model, store)
        del graph
        model = model_io.infer_shapes(model, inplace=True)
    return model, lowered


#: more folding rounds at most, each after shape inference learnt what the previous one folded
FOLD_ROUNDS = 4


def _reads_static_shapes(model: onnx.ModelProto) -> bool:
    """Is the shape of a fully sized tensor still read by a node (``OpRule.reads_only_shape``)?
    One fold cannot see it where inference sized the tensor only from values that fold computed:
    a TorchScript export's window partition reshapes by ``Shape -> Gather -> Div`` of its own
    input (Swin, SAM), and the padding behind it stayed computed ("pads not constant")."""
    static = {vi.name for vi in [*model.graph.value_info, *model.graph.input]
              if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
              and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)}
    static.update(t.name for t in model.graph.initializer)
    opset = default_opset(model)
    for node in model.graph.node:
        rule = registry.lookup(node.domain, node.op_type, opset)
        if rule is not None and rule.reads_only_shape and node.input and node.input[0] in static:
            return True
    return False


def _normalise_graph(model: onnx.ModelProto, store: Any, folding: bool, *,
                     shrink_only: bool = False, expansions: dict[str, Any] | None = None) -> onnx.ModelProto:
    """Fold constant subgraphs (``folding``; with ``shrink_only``, kept only where the
    constants then take at least SHRINK less space and no learned parameter of a node is a
    folded value), drop optional inputs that are provably zero
    (:func:`graphprune.io.zero_inputs.drop_zero_inputs`) and read selections within one input
    of a concatenation from that input (:func:`graphprune.io.concat_selects.bypass_concat_selects`)
    and a flattened tensor gathered back in its own order as that tensor
    (:func:`graphprune.io.strided_gathers.bypass_identity_gathers`); ``model`` itself when
    nothing changes."""
    graph = import_graph(model, store)
    before = _constant_bytes(graph) if shrink_only else 0
    stored = {t.name for t in graph_constants(graph)} if shrink_only else set()
    if folding:
        if store is not None:
            _load_fold_inputs(graph)
        try:
            from graphprune.io.runtime import quiet_ort

            # flatten_subgraphs=False: inlining an If with a constant condition drops
            # branch outputs used later (the result fails the checker)
            fold_holds.read_aliases_directly(graph, default_opset(model))
            held = []
            if shrink_only:  # a weight and its pruning mask: folded, the product is the weight
                stored |= _masked_weights(graph, default_opset(model))
                held = fold_holds.hold_layer_weights(graph, default_opset(model), stored)
            held += fold_holds.hold_unfolded(graph, default_opset(model))
            held += fold_holds.hold_tied_weights(graph, default_opset(model))
            sequences_back = fold_holds.hold_sequences(graph)
            opset = default_opset(model)
            for _ in range(2):  # again where a weight computation onnx-graphsurgeon leaves was folded
                with quiet_ort():
                    fold_constants(graph, fold_shapes=True, size_threshold=_fold_limit(graph), error_ok=False,
                                   flatten_subgraphs=False)
                if not fold_weight_computations(graph, partial(_folds_weights, opset=opset), opset):
                    break
            for node, index, constant in held:
                node.inputs[index] = constant
            sequences_back()
        except Exception as exc:  # folding is an optimisation; analysis copes without it
            logger.warning("constant folding skipped: %s", exc)
            graph, folding = import_graph(model, store), False
        if folding and shrink_only:
            graph.cleanup()
            if (_constant_bytes(graph) > (1 - SHRINK) * before
                    or _computed_parameters(graph, stored, default_opset(model))):
                graph, folding = import_graph(model, store), False  # as it came: see _computes_from_weights
        if folding and expansions is not None:
            expansions.update(_expansions(model, graph, expansions))
    changed = drop_zero_inputs(graph, default_opset(model))
    changed += bypass_concat_selects(graph, default_opset(model))
    changed += bypass_identity_gathers(graph, default_opset(model))
    if not changed and not folding:
        return model
    toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
    for tensor in graph_constants(graph):  # the weights folding read go back to the kernel
        release(tensor._values)
    model = export_graph(graph, model, store)
    del graph
    model = model_io.infer_shapes(model, inplace=True)
    trim()  # and what the folding session freed
    return model


#: a fold that only an exporter's left-over weight computation asks for is kept when the
#: constants shrink by at least this share (else the graph stays as it came)
SHRINK = 0.01
#: a folded tensor may hold this many float32s per element of the largest stored tensor
#: (a weight's dtype cast, dequantisation or a concatenation of three projections stays
#: foldable) and never fewer bytes than FOLD_FLOOR (shapes, indices, small tables)
FOLD_GROWTH = 3
FOLD_FLOOR = 1 << 12


def _fold_limit(graph: gs.Graph) -> int:
    """Bytes above which a computed constant is left to its subgraph: a fold that makes a
    tensor several times larger than anything the model stores (a relative-position bias or a
    causal mask of a fixed sequence length, computed from a small table) would write the
    expansion into the pruned model, which could then be larger than the original."""
    largest = max((int(np.prod(t.shape, dtype=np.int64)) for t in graph_constants(graph)
                   if t.shape is not None), default=0)
    return max(FOLD_FLOOR, FOLD_GROWTH * 4 * largest)


def _expansions(model: onnx.ModelProto, graph: gs.Graph, earlier: dict[str, Any]) -> dict[str, Any]:
    """The folds of ``graph`` (folded from ``model``) that
    :func:`graphprune.io.expansions.record` keeps."""
    stored = {t.name for t in model.graph.initializer}
    folded = {tensor.name: tuple(int(d) for d in tensor.shape) for tensor in graph_constants(graph)
              if tensor.name not in stored and tensor.shape is not None and tensor.outputs}  # (read: not an intermediate)
    return record_expansions(model, folded, default_opset(model), earlier)


def _load_fold_inputs(graph: gs.Graph) -> None:
    """Map every weight of the store before folding: folding runs ONNX Runtime on an
    in-memory model of the foldable part, which cannot follow references into the store.
    Mapping costs nothing until a weight is read, and only folded ones are."""
    for tensor in graph_constants(graph):
        _ = tensor.values


def _probes(model: onnx.ModelProto, *, store: Any) -> dict[str, tuple[list, list]]:
    """The two shape probes of ``model`` (:func:`graphprune.analysis.shape_probe.refine_shapes`)."""
    from graphprune.analysis.shape_probe import refine_shapes

    return refine_shapes(import_graph(model, store))
