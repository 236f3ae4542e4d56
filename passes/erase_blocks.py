"""Erase residual blocks: ``y = x + branch(x)`` becomes ``y = x`` (depth pruning).

Each block (:class:`~graphprune.analysis.blocks.ResidualBlock`) names its sum node and its
skip input. The sum's readers read the skip instead (a sum that is a graph output becomes
``Identity(skip)``), so the branch is dead and removed with the sum. The result is exactly
the original with the branch multiplied by zero, which is how depth pruning verifies it.

The pass bypasses a node only while it is still a sum whose other operand is neutral at 0
(:meth:`OpRule.neutral_operand`), so a second run is a no-op. Consecutive blocks erase
together: a block's skip is followed through the sums erased before it.
"""

from __future__ import annotations

from collections.abc import Iterable

import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.analysis.blocks import ResidualBlock
from graphprune.io.graph_edits import redirect_uses
from graphprune.io.order import toposort_model
from graphprune.rules import registry

__all__ = ["EraseBlocksPass"]


class EraseBlocksPass(Pass):
    """Bypass the sum of each given residual block (see the module docstring)."""

    def __init__(self, blocks: Iterable[ResidualBlock]) -> None:
        self.blocks = list(blocks)

    def __repr__(self) -> str:
        return f"EraseBlocksPass(blocks={[b.add for b in self.blocks]})"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        nodes = {n.name: n for n in graph.nodes}
        outputs = {t.name for t in graph.outputs}
        erased = 0
        # a bypassed sum's output -> the skip its readers read now: a block right after an
        # erased one reads the earlier skip (two consecutive MobileFaceNet blocks: the second
        # was left in place, its nodes reported erased)
        moved: dict[str, str] = {}
        for block in self.blocks:
            node = nodes.get(block.add)
            skip = block.skip
            while skip in moved:
                skip = moved[skip]
            y = node.outputs[0].name if node is not None and node.outputs else None
            if node is not None and self._bypass(node, skip, outputs, ctx.opset):
                erased += 1
                if y is not None and y not in outputs:
                    moved[y] = skip
        if erased:
            toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        return PassResult(graph, erased > 0, {"blocks_erased": erased})

    @staticmethod
    def _bypass(node: gs.Node, skip_name: str, outputs: set[str], opset: int) -> bool:
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return False
        names = [t.name for t in node.inputs]
        if skip_name not in names:
            return False
        branch = 1 - names.index(skip_name)
        rule = registry.lookup(node.domain or "", node.op, opset)
        if rule is None or rule.neutral_operand(node, branch) != 0.0:
            return False
        skip, y = node.inputs[1 - branch], node.outputs[0]
        if y.name in outputs:
            node.op = "Identity"
            node.attrs.clear()
            node.inputs.clear()
            node.inputs.extend([skip])
            return True
        redirect_uses(y, skip)
        node.inputs.clear()
        node.outputs.clear()
        return True
