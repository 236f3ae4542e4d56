"""``If`` whose branches only move the axes of an outer value.

Exporters write ``x.squeeze(d)`` on an axis of unknown size as an ``If`` on ``size(x, d) == 1``
whose then-branch squeezes ``x`` and whose else-branch is ``Identity(x)`` (the TorchScript
exporter of torch 1.x at opset 11 and later; silero VAD v3.1 has one ahead of its attention).
Each output of such an ``If`` holds the elements of one outer value, with axes dropped or
inserted that have size 1; every other axis keeps its place counted from the start, or from
the end, in both branches, so it is coupled with that place of the output. The branches
read no weight and no size that counts channels, so they need no rewrite. An ``If`` whose
branches compute anything else (the whole network of a streaming model, pruned branch by
branch in :mod:`graphprune.pipeline.branches`) freezes what it touches, as before.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import constants as za
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.passes.rewrite_context import RewriteContext

__all__ = ["ViewBranchRule"]

BRANCHES = ("then_branch", "else_branch")
VIEW_OPS = ("Identity", "Squeeze", "Unsqueeze")


def _constant(tensor: gs.Tensor) -> np.ndarray | None:
    """A constant inside a branch: an initializer or a ``Constant`` node's value."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        return None if value is None else np.asarray(value.values)
    return None


def _axes(node: gs.Node) -> list[int] | None:
    """The axes a ``Squeeze``/``Unsqueeze`` drops or inserts; ``None`` when they are not
    given as constants (a ``Squeeze`` without axes drops what the run finds of size 1)."""
    if "axes" in node.attrs:
        return [int(a) for a in node.attrs["axes"]]
    if len(node.inputs) > 1 and node.inputs[1].name:
        value = _constant(node.inputs[1])
        return None if value is None else [int(a) for a in value.reshape(-1)]
    return None


def _view(branch: gs.Graph, output: gs.Tensor, rank_of: dict[str, int]
          ) -> tuple[str, list[int | None], int] | None:
    """The outer value ``output`` of ``branch`` is a view of, where each of its axes lands
    in ``output`` (``None``: dropped) and ``output``'s rank; ``None`` when ``output`` is
    computed otherwise. ``rank_of``: the ranks of the outer values."""
    chain: list[gs.Node] = []
    tensor = output
    produced = {t.name for node in branch.nodes for t in node.outputs}
    while tensor.name in produced:
        node = tensor.inputs[0]
        if node.op not in VIEW_OPS:
            return None
        chain.append(node)
        tensor = node.inputs[0]
    if tensor.name not in rank_of or isinstance(tensor, gs.Constant):
        return None
    places: list[int | None] = list(range(rank_of[tensor.name]))
    rank = len(places)
    for node in reversed(chain):
        if node.op == "Identity":
            continue
        axes = _axes(node)
        if axes is None:
            return None
        if node.op == "Squeeze":
            dropped = {a % rank for a in axes}
            shift = [sum(1 for d in dropped if d < p) for p in range(rank)]
            places = [None if p is None or p in dropped else p - shift[p] for p in places]
            rank -= len(dropped)
        else:
            rank += len(axes)
            inserted = sorted(a % rank for a in axes)
            kept = [a for a in range(rank) if a not in inserted]
            places = [None if p is None else kept[p] for p in places]
    return tensor.name, places, rank


def _read(node: gs.Node) -> dict[str, gs.Tensor]:
    """The tensors the branches of ``node`` read or return, by name."""
    found: dict[str, gs.Tensor] = {}
    for g in (node.attrs.get(attr) for attr in BRANCHES):
        if isinstance(g, gs.Graph):
            for t in (*(t for n in g.nodes for t in n.inputs), *g.outputs):
                found.setdefault(t.name, t)
    return found


def _views(node: gs.Node, rank_of: dict[str, int]
           ) -> list[tuple[str, list[tuple[list[int | None], int]]]] | None:
    """For each output of ``node``: the outer value it is a view of in both branches, and per
    branch where that value's axes land and the output's rank; ``None`` unless every output
    is such a view of one value (every other node of a branch makes a constant)."""
    found: list[tuple[str, list[tuple[list[int | None], int]]]] = []
    graphs = [node.attrs.get(attr) for attr in BRANCHES]
    if not all(isinstance(g, gs.Graph) for g in graphs):
        return None
    for g in graphs:
        if any(n.op not in VIEW_OPS + ("Constant",) for n in g.nodes):
            return None
    for k in range(len(node.outputs)):
        views = [_view(g, g.outputs[k], rank_of) if k < len(g.outputs) else None for g in graphs]
        if any(v is None for v in views) or len({v[0] for v in views}) != 1:  # type: ignore[index]
            return None
        found.append((views[0][0], [(v[1], v[2]) for v in views]))  # type: ignore[index]
    return found


@register
class ViewBranchRule(OpRule):
    """An ``If`` whose outputs are views of outer values (a squeeze on a dynamic size)."""

    op_types = ("If",)
    # (not "move": what the defaults of data movement read from input 0, the If reads from
    # its branches; ``zero_output`` says what passes through)
    zero_behaviour = "none"

    @staticmethod
    def _ranks(node: gs.Node, ctx: CouplingContext | ConstantContext) -> dict[str, int]:
        """The ranks of the values the branches read or return, where known."""
        ranks: dict[str, int] = {}
        for name, t in _read(node).items():
            shape = ctx.shape(t) if not isinstance(t, gs.Constant) else None
            if shape is not None:
                ranks[name] = len(shape)
        return ranks

    def couples_subgraph_reads(self, node: gs.Node, ctx: CouplingContext) -> bool:
        return _views(node, self._ranks(node, ctx)) is not None

    @staticmethod
    def _placed(places: list[tuple[list[int | None], int]], axis: int, rank: int) -> int | None:
        """Where ``axis`` of the outer value lands in an output of rank ``rank``: the same
        place counted from the start, or from the end, in both branches; ``None`` when the
        branches disagree or drop it."""
        (p, rp), (q, rq) = places
        if p[axis] is None or q[axis] is None:
            return None
        if p[axis] == q[axis]:
            return p[axis]
        if p[axis] - rp == q[axis] - rq:
            return rank - (rp - p[axis])
        return None

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        views = _views(node, self._ranks(node, ctx))
        if views is None:
            ctx.freeze_node(node, f"If '{node.name}': its branches compute more than views of one "
                                  "value (pruned as models of their own where they hold weights)")
            return
        tensors = _read(node)
        for out, (source, places) in zip(node.outputs, views, strict=True):
            x = tensors[source]
            rank = ctx.rank(out)
            if rank is None:
                ranks = {r for _, r in places}
                rank = ranks.pop() if len(ranks) == 1 else None
            if rank is None:
                ctx.freeze_node(node, f"rank unknown at If '{node.name}'")
                return
            for axis in range(len(places[0][0])):
                place = self._placed(places, axis, rank)
                if place is None or not 0 <= place < rank:
                    ctx.freeze(x, axis, f"axis {axis} of '{x.name}' lands at different places in "
                                        f"the branches of If '{node.name}'")
                    continue
                ctx.couple(x, axis, out, place)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        """The branches' own tensors lose their declared shapes (they held the old channel
        counts): ONNX inference gives them from the outer values again."""
        for g in (node.attrs.get(attr) for attr in BRANCHES):
            if isinstance(g, gs.Graph):
                for n in g.nodes:
                    for t in n.outputs:
                        t.shape = None

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        views = _views(node, self._ranks(node, ctx))
        if views is None:
            return [None] * len(node.outputs)
        tensors = _read(node)
        states: list[ChannelValues | None] = []
        for out, (source, places) in zip(node.outputs, views, strict=True):
            state, shape = ctx.state(tensors[source]), ctx.shape(out)
            if state is None or shape is None:
                states.append(None)
                continue
            states.append(za.moved(state, self._placed(places, state.axis, len(shape))))
        return states
