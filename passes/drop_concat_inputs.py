"""Drop inputs of concatenations.

Lossless pruning never empties a channel group: when every channel a Concat input brings is
being removed, the input is dropped from the Concat instead (and its producing chain dies).
The pass takes the ``(concat node, input tensor)`` pairs to drop; an op joins its inputs when
its rule says along which axis (:meth:`OpRule.concat_axis`). It never drops the last input.

Dropping an input shortens the concatenation, so the pass is one half of a channel removal:
run it together with the :class:`~graphprune.passes.prune_channels.PruneChannelsPass` that
removes the same channels from the Concat's consumers (the lossless driver runs both in one
pass pipeline). A second run is a no-op: the dropped inputs are gone.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.rules import registry

__all__ = ["DropConcatInputsPass"]


class DropConcatInputsPass(Pass):
    """Remove the given ``(node name, input name)`` pairs from concatenations.

    The graph is whole again only once channel removal has cut the dropped inputs' groups:
    ``valid_after`` is False, so debug mode checks after that pass instead.
    """

    valid_after = False

    def __init__(self, drops: Iterable[tuple[str, str]]) -> None:
        self.drops = set(drops)

    def __repr__(self) -> str:
        return f"DropConcatInputsPass(drops={len(self.drops)})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        wanted = {node for node, _ in self.drops}
        dropped = 0
        for node in graph.nodes:
            if node.name not in wanted:
                continue
            rule = registry.lookup(node.domain or "", node.op, ctx.opset)
            if rule is None or rule.concat_axis(node) is None:
                continue
            keep = [t for t in node.inputs if (node.name, t.name) not in self.drops]
            if keep and len(keep) < len(node.inputs):
                dropped += len(node.inputs) - len(keep)
                node.inputs.clear()
                node.inputs.extend(keep)
        return PassResult(graph, dropped > 0, {"concat_inputs_dropped": dropped})
