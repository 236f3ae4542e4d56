"""Plant zeros the way a group-sparse optimiser leaves them, to measure lossless pruning.

:func:`plant_zeros` zeroes whole channel units (producer weights and biases, and the scale
and shift of the norm that follows) and whole residual branches (every learned parameter of
the branch); :meth:`PlantRecord.measure` says how much of that a pruned model still has.
Which inputs of an op are learned parameters is asked of its rule
(:meth:`OpRule.parameter_inputs`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis import PRODUCER, ChannelGroup, Dim, analyze_graph
from graphprune.analysis.blocks import find_residual_blocks
from graphprune.analysis.roles import CHANNELWISE
from graphprune.analysis.zero_analysis import consumer_nodes
from graphprune.pipeline.session import Session
from graphprune.rules import registry

__all__ = ["PlantRecord", "plant_zeros"]


@dataclass
class PlantRecord:
    """What :func:`plant_zeros` zeroed, to measure what a lossless run removes."""

    #: per planted group: producer parameter dims (name, axis) -> planted element indices
    groups: list[dict[str, Any]] = field(default_factory=list)
    #: per planted branch: the Add node name and the branch node names
    branches: list[dict[str, Any]] = field(default_factory=list)

    @property
    def planted_units(self) -> int:
        return sum(int(g["units"]) for g in self.groups)

    def measure(self, pruned: onnx.ModelProto) -> dict[str, Any]:
        """How many planted units and branches are gone from ``pruned``."""
        inits = {t.name: t for t in pruned.graph.initializer}
        node_names = {n.name for n in pruned.graph.node}
        removed_units = 0
        for g in self.groups:
            remaining = None
            for name, axis, _ in g["producers"]:
                if name in inits:
                    w = onnx.numpy_helper.to_array(inits[name])
                    rows = np.moveaxis(w, axis, 0).reshape(w.shape[axis], -1)
                    remaining = int((~(rows != 0).any(axis=1)).sum())
                    break
            remaining = 0 if remaining is None else min(remaining, int(g["units"]))
            removed_units += int(g["units"]) - remaining
        removed_branches = sum(
            1 for b in self.branches if b["add"] not in node_names and not set(b["producers"]) & node_names
        )
        return {
            "planted_units": self.planted_units,
            "removed_units": removed_units,
            "planted_branches": len(self.branches),
            "removed_branches": removed_branches,
        }


def _parameters(node: gs.Node, opset: int) -> tuple[int, ...]:
    rule = registry.lookup(node.domain or "", node.op, opset)
    return rule.parameter_inputs(node) if rule is not None else ()


def plant_zeros(
    model: Any,
    *,
    groups: float = 0.3,
    units: float = 0.3,
    branches: int = 2,
    seed: int = 0,
) -> tuple[onnx.ModelProto, PlantRecord]:
    """Zero what a group-sparse optimiser would: channels and whole residual branches.

    A fraction ``groups`` of the exact prunable channel groups lose a fraction ``units`` of
    their units (``units >= 1``: all of them): producer weights and biases and the scale and
    shift of the norm that follows (a norm's parameters, or Mul/Add constants) are zeroed.
    ``branches`` residual blocks get every learned parameter of their branch zeroed (weights,
    biases, norm scale and shift). Returns the (prepared) planted model and what was planted.
    """
    rng = np.random.default_rng(seed)
    session = Session(model)
    graph = session.import_graph()
    analysis = analyze_graph(graph, session.opset)
    tensors = analysis.context.tensors
    users = consumer_nodes(graph)
    record = PlantRecord()

    blocks = find_residual_blocks(graph)
    order = rng.permutation(len(blocks))
    taken: set[str] = set()
    nodes = {n.name: n for n in graph.nodes}
    for i in order:
        if len(record.branches) >= branches:
            break
        block = blocks[int(i)]
        if block.add in taken or taken & set(block.nodes):
            continue
        taken |= {block.add, *block.nodes}
        branch_producers: list[str] = []
        for name in block.nodes:
            node = nodes[name]
            slots = _parameters(node, session.opset)
            for slot in slots:
                if slot < len(node.inputs) and isinstance(node.inputs[slot], gs.Constant):
                    c = node.inputs[slot]
                    c.values = np.zeros_like(np.asarray(c.values))
            if slots:
                branch_producers.append(name)
        record.branches.append({"add": block.add, "producers": branch_producers})

    candidates = [
        g for g in analysis.groups
        if g.prunable and g.is_exact and not (set(g.nodes) & taken)
    ]
    chosen = rng.permutation(len(candidates))[: int(round(groups * len(candidates)))]
    for i in sorted(int(c) for c in chosen):
        group = candidates[i]
        n = group.num_units if units >= 1 else min(group.num_units - 1, max(1, int(round(units * group.num_units))))
        picked = sorted(int(u) for u in rng.choice(group.num_units, size=n, replace=False))
        removed = group.removed_elements(picked)
        producers: list[tuple[str, int, list[int]]] = []
        for dim, idx in removed.items():
            t = tensors.get(dim[0])
            if not isinstance(t, gs.Constant) or not _plantable(dim, group, users, session.opset):
                continue
            values = np.array(t.values, copy=True)
            index: list[Any] = [slice(None)] * values.ndim
            index[dim[1]] = idx
            values[tuple(index)] = 0
            t.values = values
            if group.roles.get(dim) == PRODUCER and values.ndim >= 2:
                producers.append((dim[0], dim[1], [int(e) for e in idx]))
        if producers:
            record.groups.append({"anchor": f"{group.anchor[0]}:{group.anchor[1]}", "units": n, "producers": producers})
    planted = session.materialize(session.export())  # the weights in the proto
    return planted, record


def _plantable(dim: Dim, group: ChannelGroup, users: dict[str, list[gs.Node]], opset: int) -> bool:
    """Producer axes, and per-channel parameters (a norm's scale and shift, Mul/Add constants)."""
    role = group.roles.get(dim)
    if role == PRODUCER:
        return True
    if role != CHANNELWISE:
        return False
    for node in users.get(dim[0], []):
        params = _parameters(node, opset)
        if any(node.inputs[i].name == dim[0] for i in params if i < len(node.inputs)):
            return True
    return False
