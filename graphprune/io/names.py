"""Fresh tensor and node names for what a rewrite adds to a graph; names a model cannot hold."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx


def fresh_name(base: str, taken: set[str]) -> str:
    """``base``, or ``base_1``, ``base_2``, ... whichever is not in ``taken``; the name is added
    to ``taken``."""
    name, k = base, 0
    while name in taken:
        k += 1
        name = f"{base}_{k}"
    taken.add(name)
    return name


def unreadable_names(graph: onnx.GraphProto, model: onnx.ModelProto | None = None) -> str | None:
    """A name (or the model's producer, domain or doc string, which its copies carry) that is not
    UTF-8 text (protobuf hands it over as bytes: a damaged file ended in an internal error), or a
    tensor that two nodes of one graph write (not single assignment:
    ``analyze`` went on, ``prune`` failed at the checker); ``None`` when neither."""
    written: set[str] = set()
    for node in graph.node:
        for name in (node.name, node.op_type, node.domain, *node.input, *node.output):
            if isinstance(name, bytes):
                return f"the name {name[:60]!r} is not UTF-8 text"
        for name in node.output:
            if name and name in written:
                return f"two nodes write '{name}' (a graph assigns each tensor once)"
            written.add(name)
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                problem = unreadable_names(sub)
                if problem is not None:
                    return problem
    texts = (model.producer_name, model.producer_version, model.domain, model.doc_string) if model is not None else ()
    for text in (*texts, graph.doc_string):
        if isinstance(text, bytes):
            return f"its producer, domain or doc string {text[:60]!r} is not UTF-8 text"
    for name in (graph.name, *(t.name for t in graph.initializer),
                 *(v.name for v in (*graph.input, *graph.output, *graph.value_info))):
        if isinstance(name, bytes):
            return f"the name {name[:60]!r} is not UTF-8 text"
    return None


def undefined_reads(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> str | None:
    """A tensor that a node (or the graph's outputs) reads and that nothing provides: no node
    of the graph writes it, it is no graph input or initializer, and no enclosing graph has it
    (what a subgraph may read). A node rewired to a name that does not exist: the checker and
    ONNX Runtime refuse such a file, and the preparation had dropped the branch it was on and
    written a model that was no pruned copy of the input. ``None`` when every read is
    provided (in whatever order the nodes come)."""
    known = set(outer)
    known.update(t.name for t in graph.input)
    known.update(t.name for t in graph.initializer)
    known.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        known.update(node.output)
    for node in graph.node:
        for name in node.input:
            if name and name not in known:
                return f"node '{node.name or node.op_type}' ({node.op_type}) reads '{name}', which no node, " \
                       "graph input or initializer provides"
        for attribute in node.attribute:
            for sub in (*([attribute.g] if attribute.HasField("g") else []), *attribute.graphs):
                problem = undefined_reads(sub, frozenset(known))
                if problem is not None:
                    return problem
    for output in graph.output:
        if output.name and output.name not in known:
            return f"the graph output '{output.name}' is written by no node and is no input or initializer"
    return None

