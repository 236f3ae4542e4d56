"""What ONNX's version converter leaves to new defaults (see :meth:`OpRule.converter_attributes`).

Models below opset 11 are converted before analysis (:func:`graphprune.io.model_io.upgrade_opset`).
The converter renames and re-wires ops, but some ops' newer forms take attributes whose
defaults mean another function: ``Upsample`` (opsets 7-9) becomes a ``Resize`` with
``half_pixel`` coordinates, where ``Upsample`` maps them asymmetrically. The preparation check
(:mod:`graphprune.verify.preparation`) found that on PyTorch opset-9 exports.

:func:`convert` runs the converter. :func:`rewrite` first writes the nodes whose conversion
would change their function another way (``Hardmax``, whose input below opset 13 is flattened
to 2-D; the rules say how). :func:`record` asks each node's rule, before the
conversion, what its converted form needs; :func:`restore` gives it to the node the converter
made in its place (matched by order: the converter renames tensors), where the converter did
not set it.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper, version_converter

from graphprune.io.graph_reads import subgraphs
from graphprune.io.names import fresh_name
from graphprune.rules import registry


def _graphs(graph: onnx.GraphProto) -> list[onnx.GraphProto]:
    """``graph`` and its subgraphs, each before the ones inside it."""
    return [graph, *subgraphs(graph)]


def _constants(graph: onnx.GraphProto) -> dict[str, onnx.TensorProto]:
    """The graph's initializers and Constant-node values held in the proto, by name."""
    found = {t.name: t for t in graph.initializer if t.data_location != onnx.TensorProto.EXTERNAL}
    for node in graph.node:  # a Constant: no input, one output, a tensor "value"
        if node.domain in ("", "ai.onnx") and not node.input and len(node.output) == 1:
            value = next((a.t for a in node.attribute if a.name == "value" and a.type == onnx.AttributeProto.TENSOR),
                         None)
            if value is not None:
                found[node.output[0]] = value
    return found


Needed = list[list[tuple[registry.OpRule, dict[str, object]]]]


def record(model: onnx.ModelProto, opset: int) -> Needed:
    """Per graph (in :func:`_graphs` order), the attributes each node of ``model`` (at
    ``opset``, before conversion) whose rule overrides ``converter_attributes`` needs in its
    converted form, with that rule, in node order."""
    needed: Needed = []
    for graph in _graphs(model.graph):
        found: list[tuple[registry.OpRule, dict[str, object]]] = []
        constants = None
        for node in graph.node:
            rule = registry.overriding_rule(node.domain or "", node.op_type, opset, "converter_attributes")
            if rule is None:
                continue
            if constants is None:
                constants = _constants(graph)
            table = constants

            def constant(name: str, table: dict[str, onnx.TensorProto] = table) -> np.ndarray | None:
                return numpy_helper.to_array(table[name]) if name in table else None

            found.append((rule, rule.converter_attributes(node, constant)))
        needed.append(found)
    return needed


def restore(converted: onnx.ModelProto, needed: Needed, opset: int) -> int:
    """Give each node of ``converted`` (at ``opset``) that took the place of a recorded one
    the attributes it needs and does not set; returns how many nodes changed. The converter
    renames tensors, so nodes are matched by order: the k-th node of a rule in a graph is the
    converted k-th recorded node of that rule (where the counts differ, that graph is left
    as the converter wrote it, for the preparation check to judge)."""
    changed = 0
    for graph, found in zip(_graphs(converted.graph), needed, strict=False):
        if not found:
            continue
        nodes = [(registry.lookup(n.domain or "", n.op_type, opset), n) for n in graph.node]
        for rule in {id(r): r for r, _ in found}.values():
            wanted = [attributes for r, attributes in found if r is rule]
            made = [n for r, n in nodes if r is rule]
            if len(made) != len(wanted):
                continue
            for node, attributes in zip(made, wanted, strict=True):
                present = {a.name for a in node.attribute}
                missing = {k: v for k, v in attributes.items() if k not in present}
                node.attribute.extend(helper.make_attribute(k, v) for k, v in missing.items())
                changed += bool(missing)
    return changed


def rewrite(model: onnx.ModelProto, opset: int) -> int:
    """Replace (in place) each node whose rule writes it another way for the converter
    (:meth:`OpRule.converter_rewrite`); returns how many were replaced."""
    names = {name for graph in _graphs(model.graph) for n in graph.node for name in (*n.input, *n.output)}

    def fresh(hint: str) -> str:
        return fresh_name(hint, names)

    replaced = 0
    written: list[tuple[onnx.GraphProto, list[onnx.NodeProto]]] = []
    for graph in _graphs(model.graph):
        nodes: list[onnx.NodeProto] = []
        count = replaced
        for node in graph.node:
            rule = registry.overriding_rule(node.domain or "", node.op_type, opset, "converter_rewrite")
            rewritten = rule.converter_rewrite(node, fresh) if rule is not None else None
            nodes.extend(rewritten or [node])
            replaced += bool(rewritten)
        if replaced > count:
            written.append((graph, nodes))
    # innermost graphs first: a graph's new node list copies the subgraphs already rewritten
    for graph, nodes in reversed(written):
        copies = [onnx.NodeProto.FromString(n.SerializeToString()) for n in nodes]
        del graph.node[:]
        graph.node.extend(copies)
    return replaced


def convert(model: onnx.ModelProto, opset: int, target: int) -> onnx.ModelProto:
    """``model`` (at ``opset``) converted to ``target`` by ONNX's version converter: nodes it
    would convert into another function written another way first (:func:`rewrite`; ``model``
    is changed), each converted node given what its rule says it needs (:func:`record`,
    :func:`restore`)."""
    rewrite(model, opset)
    needed = record(model, opset)
    converted = version_converter.convert_version(model, target)
    restore(converted, needed, target)
    same_interface(model, converted)
    return converted


def unwrap_flattened(model: onnx.ModelProto, more_ranks: Callable[[], dict[str, int]] = dict) -> int:
    """Write each node that ONNX's version converter wrapped to keep an old meaning, where its
    rule says the wrapping changes nothing (:meth:`OpRule.converter_unwrap`: an old
    ``Softmax(axis=3)`` written as ``Flatten -> Softmax -> Reshape(Shape(x))`` over the last
    axis), as one node again, in place (at opset 13 or later, shapes inferred); return how
    many. The converter wraps where it does not know the input's rank (a Reshape to a
    computed shape at opset 9 has none), and the flattening merged the heads of an attention
    with its batch and queries: they froze. ``more_ranks()``: ranks found otherwise (ONNX
    Runtime's symbolic inference), asked once, where inference and the ``Shape`` give none."""
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    if opset < 13:
        return 0
    done = 0
    found: list[dict[str, int]] = []  # (more_ranks(), once)
    for graph in _graphs(model.graph):
        shapes = {v.name: v.type.tensor_type.shape.dim for v in (*graph.input, *graph.value_info, *graph.output)
                  if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}

        def rank(x: str, shape_of_x: str, shapes: dict = shapes) -> int | None:
            """``x``'s rank: inferred, else the length of its ``Shape`` (``shape_of_x``), else
            ``more_ranks``' (ONNX inference does not rank a Reshape to a computed shape)."""
            if x in shapes:
                return len(shapes[x])
            length = shapes.get(shape_of_x)
            if length is not None and len(length) == 1 and length[0].HasField("dim_value"):
                return int(length[0].dim_value)
            if not found:
                found.append(more_ranks())
            return found[0].get(x)

        made = {o: n for n in graph.node for o in n.output}
        readers: dict[str, list[onnx.NodeProto]] = {}
        for n in graph.node:
            for name in n.input:
                readers.setdefault(name, []).append(n)
        outputs = {o.name for o in graph.output}

        def read_by(name: str, readers: dict = readers, outputs: set = outputs) -> list[onnx.NodeProto] | None:
            """The nodes that read ``name``; ``None`` for a graph output (read outside too)."""
            return None if name in outputs else readers.get(name, [])

        gone: set[int] = set()
        for node in list(graph.node):
            rule = registry.overriding_rule(node.domain or "", node.op_type, opset, "converter_unwrap")
            if rule is None or id(node) in gone:
                continue
            found_here = rule.converter_unwrap(node, made.get, read_by, rank)
            if found_here is None:
                continue
            last, replacement, dead = found_here
            last.CopyFrom(replacement)
            gone |= {id(n) for n in dead}
            done += 1
        if gone:
            kept = [onnx.NodeProto.FromString(n.SerializeToString()) for n in graph.node if id(n) not in gone]
            del graph.node[:]
            graph.node.extend(kept)
    return done


def _declared(graph: onnx.GraphProto) -> dict[str, list[int | str | None]]:
    return {v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
            for v in (*graph.input, *graph.output)
            if v.type.HasField("tensor_type") and v.type.tensor_type.HasField("shape")}


def same_interface(model: onnx.ModelProto, converted: onnx.ModelProto) -> None:
    """A ``ValueError`` where the converter changed a graph input or output's declared rank or
    size: ``Scan`` below opset 9 has a batch axis, and the converter drops it from the graph's
    inputs (``x: 1x3x2`` becomes ``3x2``), so the converted model no longer takes the user's
    inputs. Names it does not keep are left to the checks that follow."""
    before, after = _declared(model.graph), _declared(converted.graph)
    for name, dims in before.items():
        now = after.get(name)
        if now is not None and (len(now) != len(dims) or any(a is not None and b is not None and a != b
                                                              for a, b in zip(dims, now, strict=True))):
            show = lambda d: "x".join("?" if x is None else str(x) for x in d) or "scalar"  # noqa: E731
            raise ValueError(f"ONNX's version converter changes the graph's '{name}' from {show(dims)} "
                             f"to {show(now)}, so the converted model would not take the model's inputs")
