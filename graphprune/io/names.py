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
