"""Erase residual blocks: ``y = x + branch(x)`` becomes ``y = x`` (depth pruning).

Each block (:class:`~graphprune.analysis.blocks.ResidualBlock`) names its sum node and its
skip input. The sum's readers read the skip instead (a sum that is a graph output becomes
``Identity(skip)``), so the branch is dead and removed with the sum. The result is exactly
the original with the branch multiplied by zero, which is how depth pruning verifies it.

The pass bypasses a node only while it is still a sum whose other operand is neutral at 0
(:meth:`OpRule.neutral_operand`), so a second run is a no-op. A quantized sum
(``QLinearAdd``) requantizes its skip to its own scale, so it stays, reading its zero point
(:meth:`OpRule.zero_operand`) where the branch was: exactly the original with the branch
zeroed. Consecutive blocks erase together: a block's skip is followed through the sums
erased before it.
"""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
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
            readers_read = self._erase(node, skip, outputs, ctx.opset) if node is not None else None
            if readers_read is not None:
                erased += 1
                if y is not None and y not in outputs and readers_read != y:
                    moved[y] = readers_read
        if erased:
            toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        return PassResult(graph, erased > 0, {"blocks_erased": erased})

    @staticmethod
    def _erase(node: gs.Node, skip_name: str, outputs: set[str], opset: int) -> str | None:
        """Erase the branch of the sum ``node``; the name its readers read now (the skip where
        the sum is bypassed, its own output where a quantized sum stays to requantize the
        skip), ``None`` when there is nothing to erase."""
        rule = registry.lookup(node.domain or "", node.op, opset)
        operands = rule.summed_operands(node) if rule is not None else None
        names = [node.inputs[k].name for k in operands] if operands is not None else []
        if skip_name not in names:
            return None
        branch = operands[1 - names.index(skip_name)]
        skip, y = node.inputs[operands[names.index(skip_name)]], node.outputs[0]
        zero = rule.zero_operand(node, branch)
        if zero is not None:
            if isinstance(node.inputs[branch], gs.Constant):  # erased before
                return None
            node.inputs[branch] = gs.Constant(f"{node.name}_gp_erased", np.asarray(zero))
            return y.name
        if rule.neutral_operand(node, branch) != 0.0:
            return None
        if y.name in outputs:
            node.op = "Identity"
            node.attrs.clear()
            node.inputs.clear()
            node.inputs.extend([skip])
            return skip.name
        redirect_uses(y, skip)
        node.inputs.clear()
        node.outputs.clear()
        return skip.name
