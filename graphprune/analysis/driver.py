"""Dependency analysis: which tensor dimensions must lose the same channels.

The graph is an ``nx.Graph`` whose nodes are *dimensions* ``(tensor name, axis)``. Op rules
(:mod:`graphprune.rules`) add edges between the dimensions an op couples, each carrying an
index map (:mod:`graphprune.analysis.coupling`). A *channel group* is a connected component
that contains at least one parameter dimension; its *units* are the sets of elements that
go together (:mod:`graphprune.analysis.groups`).

Fail closed: a node without a rule, a rule that raises, an index map that does not fit the
shapes, an unknown size, a graph input or output, a protected (``keep``) tensor — each
freezes the dimensions it touches, with a reason naming the node.

This is the one module of the analysis that imports the rule registry.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field

import onnx_graphsurgeon as gs

from graphprune.analysis.coupling import CouplingContext
from graphprune.analysis.dims import Dim, describe_node
from graphprune.analysis.groups import ChannelGroup, form_groups
from graphprune.analysis.shape_probe import refine_shapes
from graphprune.io.shared_constants import tied_origin
from graphprune.io.tensors import from_constants
from graphprune.rules import registry


@dataclass
class Analysis:
    """The result of :func:`analyze_graph`."""

    graph: gs.Graph
    opset: int
    groups: list[ChannelGroup]
    unsupported: dict[str, list[str]]
    context: CouplingContext

    def group_of(self, dim: Dim) -> ChannelGroup | None:
        for group in self.groups:
            if dim in group.unit_of or dim in group.sizes:
                return group
        return None

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    #: a prunable group holds an activation axis without a static size: channels merged
    #: with a dynamic batch (``[B*H, ...]``), laid out ``b * H + h``. Batch 1 cannot tell
    #: that layout from another, so verification runs such a model at batch 2. Set when the
    #: groups are formed (a rewrite clears the intermediate shapes later)
    merges_batch: bool = False
    #: what the normalisation rewrote before the analysis (``report["normalised"]``: local
    #: functions inlined, ops lowered); filled by :func:`graphprune.api.analyze`
    normalised: dict = field(default_factory=dict)

    @property
    def frozen_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.is_frozen]

    def weight_only(self, group: ChannelGroup) -> bool:
        """No activation has this group's axis: it couples a weight with its own decoding
        only (the kernel axes of an int8 weight and its ``DequantizeLinear``), not a channel."""
        tensors = self.context.tensors
        return all(t is None or from_constants(t) for t in (tensors.get(name) for name, _ in group.dims))

    @property
    def unprunable_groups(self) -> list[ChannelGroup]:
        """Groups of two or more units of an activation axis that nothing froze but no weight
        creates (no producer), so that nothing removes them: reported, never silent."""
        return [g for g in self.groups
                if not g.frozen and not g.prunable and g.num_units >= 2 and not self.weight_only(g)]

    def summary(self) -> dict[str, object]:
        return {
            "groups": len(self.groups),
            "prunable": len(self.prunable_groups),
            "frozen": len(self.frozen_groups),
            "inexact": sum(1 for g in self.groups if g.prunable and not g.is_exact),
            "unsupported_ops": {k: len(v) for k, v in sorted(self.unsupported.items())},
            **({"unranked_layers": {k: len(set(v)) for k, v in sorted(self.context.unranked.items())}}
               if self.context.unranked else {}),
        }


def _subgraph_outer_names(node: gs.Node, outer: dict[str, gs.Tensor]) -> set[str]:
    names: set[str] = set()
    for value in node.attrs.values():
        graphs = value if isinstance(value, list) else [value]
        for sub in graphs:
            if isinstance(sub, gs.Graph):
                for sub_node in sub.nodes:
                    for t in sub_node.inputs:
                        if t.name in outer:
                            names.add(t.name)
                    names |= _subgraph_outer_names(sub_node, outer)
    return names


def derive_missing_shapes(graph: gs.Graph, opset: int) -> None:
    """Give tensors that ONNX shape inference cannot reach (behind a com.microsoft op) the
    shapes the rules derive, written onto ``graph``'s tensors (what the MAC counter reads;
    the coupling itself is thrown away)."""
    def rule_for(node: gs.Node) -> registry.OpRule | None:
        return registry.lookup(node.domain or "", node.op, opset)

    refine_shapes(graph)
    ctx = CouplingContext(graph, opset, rule_for, probes={})
    for node in graph.nodes:
        rule = rule_for(node)
        if rule is None or not rule.couples:
            continue
        ctx.node = node
        try:
            rule.couple(node, ctx) if rule.phase == 1 else rule.derive_shapes(node, ctx)
        except Exception:  # noqa: BLE001, S112 - a rule that fails derives nothing
            continue


def analyze_graph(
    graph: gs.Graph,
    opset: int,
    *,
    keep: Iterable[str] = (),
    position_convs: frozenset[str] = frozenset(),
    folded: bool = False,
    input_shapes: Mapping[str, Sequence[int]] | None = None,
    _probes: dict[str, tuple[list, list]] | None = None,
    probe_cache: dict | None = None,
) -> Analysis:
    """Run every op rule over ``graph`` and form channel groups with their units
    (``folded``: ``graph`` is a chain that preparation folds into constants,
    :attr:`CouplingContext.folded`; ``input_shapes``: sizes the user gave for open input
    axes, tried where the probe sizes leave shapes unknown: :func:`refine_shapes`;
    ``probe_cache``: its probes kept for the next graph imported from the same model).

    Grouped convolutions are first tied conv group by conv group (a unit is a whole conv
    group). Where that leaves a channel group unprunable (one unit, or frozen), those convs
    are re-analysed position by position, and that analysis is kept if it prunes more.
    """
    keep = tuple(keep)
    # a retry analyses the same graph, whose shapes were refined by the first pass
    probes = refine_shapes(graph, input_shapes, probe_cache) if _probes is None else _probes

    def rule_for(node: gs.Node) -> registry.OpRule | None:
        return registry.lookup(node.domain or "", node.op, opset)

    ctx = CouplingContext(graph, opset, rule_for, probes=probes, position_convs=position_convs, folded=folded)
    unsupported: dict[str, list[str]] = defaultdict(list)
    deferred: list[tuple[gs.Node, registry.OpRule]] = []

    def run(node: gs.Node, rule: registry.OpRule) -> None:
        ctx.node = node
        try:
            rule.couple(node, ctx)
        except Exception as exc:  # a rule bug must freeze, never guess
            ctx.freeze_node(node, f"rule for {describe_node(node)} failed: {exc}")

    for node in graph.nodes:
        ctx.node = node
        rule = rule_for(node)
        if rule is None or not rule.couples or not rule.couples_subgraph_reads(node, ctx):
            for name in _subgraph_outer_names(node, ctx.tensors):
                ctx.tensor_freeze[name].append(f"used inside a subgraph of {describe_node(node)}")
        if rule is None or not rule.couples:
            domain = node.domain or ""
            key = f"{domain}::{node.op}" if domain not in ("", "ai.onnx") else node.op
            unsupported[key].append(node.name)
            why = rule.unlowered_reason(node) if rule is not None else ""
            ctx.freeze_node(node, f"no rule for {describe_node(node)}" + (f" ({why})" if why else ""))
            continue
        if rule.phase == 1:
            run(node, rule)
        else:
            try:
                rule.derive_shapes(node, ctx)
            except Exception:  # noqa: BLE001 - no shape: its couple freezes what it needs
                pass
            deferred.append((node, rule))
    ctx.node = None
    ctx.start_phase_two([rule.preview_couplings(node, ctx) for node, rule in deferred])
    for node, rule in deferred:
        run(node, rule)
    ctx.node = None
    ctx.resolve_role_links()

    for t in graph.inputs:
        ctx.freeze(t, None, f"graph input '{t.name}'")
    for t in graph.outputs:
        ctx.freeze(t, None, f"graph output '{t.name}'")
    keep_set = set(keep)
    if keep_set:
        for node in graph.nodes:
            if node.name in keep_set:
                ctx.freeze_node(node, f"protected by keep: {describe_node(node)}")
        for name in ctx.tensors:  # a kept constant's copies (one per reader) are kept too
            if name in keep_set or tied_origin(name) in keep_set:
                ctx.freeze(ctx.tensors[name], None, f"protected by keep: tensor '{tied_origin(name)}'")

    groups = form_groups(ctx)
    if not position_convs:
        collapsed = _collapsed_position_nodes(graph, groups, rule_for)
        if collapsed:
            retry = analyze_graph(graph, opset, keep=keep, position_convs=collapsed, folded=folded, _probes=probes)
            if _prunable_units(retry.groups) > _prunable_units(groups):
                return retry
    merges = any(
        ctx.size(t, axis) is None
        for g in groups if g.prunable for name, axis in g.dims
        if isinstance(t := ctx.tensors.get(name), gs.Variable)
    )
    return Analysis(graph, opset, groups, dict(unsupported), ctx, merges)


def _collapsed_position_nodes(
    graph: gs.Graph, groups: list[ChannelGroup], rule_for: Callable[[gs.Node], registry.OpRule | None]
) -> frozenset[str]:
    """Nodes that tie units group by group but could prune by position
    (:meth:`OpRule.prunes_by_position`: grouped, not depthwise, convolutions) inside
    groups that cannot prune that way: frozen (SqueezeBERT's grouped 1-D convolutions read
    and write the residual stream, which a graph output freezes: tied by conv group, the MLP
    width is frozen with it), left with one unit (a channel shuffle after a grouped conv,
    as in ShuffleNet v1), or inexact with no more units than a conv has groups. The caller
    keeps the retry only where it prunes more units."""
    # each candidate's conv group count (its rule's LinearInfo)
    conv_groups = {
        n.name: (info.group if (info := rule.linear(n)) is not None else 1) for n in graph.nodes
        if (rule := rule_for(n)) is not None and rule.prunes_by_position(n)
    }
    candidates = set(conv_groups)
    names: set[str] = set()
    for group in groups:
        if not group.producers:
            continue
        inside = {name for name in group.nodes if name in candidates}
        # or prunable only inexactly and by whole conv groups (SVTRv2's grouped mixer convs read
        # and write its LayerNorm'd residual stream: 4 units, the conv groups, where each
        # mixer's inner channels prune exactly position by position, as onnxsim prunes them)
        if not group.prunable or (group.inexact and any(group.num_units <= conv_groups[name] for name in inside)):
            names |= inside
    return frozenset(names)


def _prunable_units(groups: list[ChannelGroup]) -> int:
    return sum(g.num_units - g.pinned_units for g in groups if g.prunable)
