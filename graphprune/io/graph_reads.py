"""What the nodes of an ONNX graph read, their subgraphs included.

An ``If`` branch or a ``Loop``/``Scan`` body reads values of the graph around it by name,
without listing them among its node's inputs. Whatever orders nodes, cuts a graph into
parts, or drops unused values must count those reads as reads of the node that holds the
subgraph. These are the walks every such place uses.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import onnx

__all__ = ["all_reads", "node_reads", "outer_reads", "reads_of", "rename_reads", "subgraphs", "subgraphs_of"]


def subgraphs_of(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    """The subgraphs ``node`` holds (its ``GRAPH`` and ``GRAPHS`` attributes), not nested ones."""
    out: list[onnx.GraphProto] = []
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            out.append(attr.g)
        elif attr.type == onnx.AttributeProto.GRAPHS:
            out.extend(attr.graphs)
    return out


def subgraphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """Every subgraph of ``graph``, nested ones included."""
    for node in graph.node:
        for sub in subgraphs_of(node):
            yield sub
            yield from subgraphs(sub)


def outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a graph reads from outside itself (nested subgraphs included)."""
    made = {i.name for i in graph.initializer} | {i.name for i in graph.input}
    made |= {o for n in graph.node for o in n.output}
    used: set[str] = set()
    for node in graph.node:
        used |= node_reads(node)
    return used - made


def node_reads(node: onnx.NodeProto) -> set[str]:
    """Names ``node`` reads: its inputs and what its subgraphs read from the outer scope."""
    names = {n for n in node.input if n}
    for sub in subgraphs_of(node):
        names |= outer_reads(sub)
    return names


def reads_of(nodes: Iterable[onnx.NodeProto]) -> set[str]:
    """Names ``nodes`` read (:func:`node_reads` of each)."""
    names: set[str] = set()
    for node in nodes:
        names |= node_reads(node)
    return names


def all_reads(graph: onnx.GraphProto) -> set[str]:
    """Names the nodes of ``graph`` and of its nested subgraphs read (wherever made)."""
    used: set[str] = set()
    for node in graph.node:
        used |= {i for i in node.input if i}
        for sub in subgraphs_of(node):
            used |= all_reads(sub)
    return used


def rename_reads(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Rename the values ``graph`` (and its nested subgraphs) reads, in place."""
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in renames:
                node.input[k] = renames[name]
        for sub in subgraphs_of(node):
            rename_reads(sub, renames)
