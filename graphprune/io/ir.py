"""The one typed doorway between ONNX protos and onnx-graphsurgeon graphs.

``prepare`` normalises a model for analysis: initializers are removed from the graph inputs
(old exporters list them there), Constant nodes are lifted to initializers, constant
subgraphs (TorchScript's Identity on shared weights, the dynamo exporter's
Shape/Gather/Concat chains over static shapes) are folded, shapes are inferred.
"""

from __future__ import annotations

import copy
import logging

import onnx
import onnx_graphsurgeon as gs

from graphprune.io import model_io

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
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.GRAPH:
                _used_names(attr.g, names)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                for sub in attr.graphs:
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
    used = _used_names(model.graph, set())
    if any(init.name not in used for init in model.graph.initializer):
        kept = [init for init in model.graph.initializer if init.name in used]
        del model.graph.initializer[:]
        model.graph.initializer.extend(kept)
    return model


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    return gs.import_onnx(model)


def export_graph(graph: gs.Graph, template: onnx.ModelProto) -> onnx.ModelProto:
    """Export ``graph`` keeping the template's opsets, IR version and metadata."""
    model = gs.export_onnx(graph, do_type_check=False)
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


def redirect_uses(old: gs.Tensor, new: gs.Tensor) -> None:
    """Make every node that reads ``old`` read ``new`` instead."""
    for consumer in list(old.outputs):
        for index, tensor in enumerate(consumer.inputs):
            if tensor is old:
                consumer.inputs[index] = new


def clear_intermediate_shapes(graph: gs.Graph) -> None:
    """Forget inferred shapes of intermediate tensors (they are re-inferred after a rewrite)."""
    boundary = {t.name for t in [*graph.inputs, *graph.outputs]}
    for tensor in graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in boundary:
            tensor.shape = None
    del_value_info = graph  # noqa: F841 - value_info is rebuilt from tensors on export


def prepare(model: onnx.ModelProto, *, fold: bool = True) -> onnx.ModelProto:
    """Return a normalised, shape-inferred copy of ``model`` ready for analysis."""
    model = copy.deepcopy(model)
    strip_initializer_inputs(model)
    name_nodes(model)
    model = model_io.infer_shapes(model, inplace=True)
    has_constant_nodes = any(n.op_type in ("Constant", "Identity", "Shape") for n in model.graph.node)
    if fold and has_constant_nodes:
        graph = import_graph(model)
        try:
            import onnxruntime as ort

            ort.set_default_logger_severity(3)  # folding runs ORT; its optimizer warnings are noise
            graph.fold_constants(fold_shapes=True, size_threshold=None, error_ok=False)
        except Exception as exc:  # folding is an optimisation; analysis copes without it
            logger.warning("constant folding skipped: %s", exc)
            graph = import_graph(model)
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        model = export_graph(graph, model)
        model = model_io.infer_shapes(model, inplace=True)
    return model
