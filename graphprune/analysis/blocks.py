"""Residual blocks and their data-free importance (for depth pruning).

A residual block is ``y = x + branch(x)``: a sum (:meth:`OpRule.summed_operands`: an op
whose operands are both neutral at 0, or ONNX Runtime's ``QLinearAdd``) of a tensor ``x`` and
a branch computed from ``x`` (and from context that does not depend on ``x``: constants, an
attention mask, position tables), whose nodes feed nothing but the sum, with at least one
layer with a weight in the branch. ``x`` is a value, not one tensor: the skip and the branch
may each read it through ops that carry it unchanged (:func:`carried_source`: an
``Identity``, a ``Cast`` to the type it has, which PyTorch 2.13's exporter writes by the
hundred, a ``Dropout`` at inference). Erasing the block leaves ``x`` (a quantized sum:
``x`` requantized to the sum's scale), which is exactly the original with the branch
multiplied by zero.

A branch is scored by how much it adds: per-channel RMS estimates are pushed through the
graph from unit-RMS inputs (each op's rule says how, :meth:`OpRule.propagate_rms`; an op
that does not know passes the estimate of its first input that is no constant through), and
the default score is the branch's output RMS over the skip's (:func:`relative_branch_scales`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.io.order import toposort_model
from graphprune.rules import registry
from graphprune.rules.scale import ScaleContext, rms_of

#: a branch computing less than this share of the model's multiply-accumulates saves nearly
#: nothing when erased (a squeeze-and-excitation gate ``x + x * gate(x)``, a learned scale):
#: depth pruning erases such blocks last
NEAR_FREE_SHARE = 1e-3

__all__ = [
    "NEAR_FREE_SHARE",
    "ResidualBlock",
    "branch_macs_shares",
    "branch_scale",
    "carried_source",
    "find_residual_blocks",
    "shapes_at",
    "propagate_rms",
    "relative_branch_scales",
]


@dataclass
class ResidualBlock:
    """``add = Add(skip, branch_output)`` where the branch starts at ``skip``."""

    add: str
    skip: str
    branch_output: str
    nodes: list[str]
    score: float = math.nan
    #: the blocks inside the branch (a skip over a stage, not erased)
    contains: list[str] = field(default_factory=list)
    #: the share of the model's multiply-accumulates its branch computes (``None``: not counted)
    macs_share: float | None = None

    def to_dict(self) -> dict[str, Any]:
        out = {**asdict(self), "num_nodes": len(self.nodes)}
        if not self.contains:
            out.pop("contains")
        if self.macs_share is None:
            out.pop("macs_share")
        if not math.isfinite(self.score):  # (JSON has no NaN or infinity: unknown)
            out["score"] = None
        return out


def _rule(node: gs.Node, opset: int) -> registry.OpRule | None:
    return registry.lookup(node.domain or "", node.op, opset)


def summed(node: gs.Node, opset: int) -> list[gs.Tensor] | None:
    """The two operands of a sum (``Add``, a two-input ``Sum``, a ``QLinearAdd``:
    :meth:`OpRule.summed_operands`); ``None`` for any other node."""
    rule = _rule(node, opset)
    operands = rule.summed_operands(node) if rule is not None else None
    return None if operands is None else [node.inputs[k] for k in operands]


def _has_weight(node: gs.Node, opset: int) -> bool:
    """A layer with a weight (its rule describes it as linear, float or integer): a branch
    without one (``x + 0.044715 * x**3`` inside a tanh-GELU, ``x + x * sigmoid(x)``) is part of
    an activation, not a block that depth pruning may erase."""
    rule = _rule(node, opset)
    return rule is not None and (rule.linear(node) is not None or rule.rescaled_linear(node) is not None)


def _same_type(source: gs.Tensor, out: gs.Tensor) -> bool:
    """Do ``out`` and ``source`` have one known element type (and, where both are declared,
    one shape)?"""
    if source.dtype is None or out.dtype is None or source.dtype != out.dtype:
        return False
    a, b = source.shape, out.shape
    return a is None or b is None or list(a) == list(b)


def carried_source(node: gs.Node, opset: int) -> gs.Tensor | None:
    """The input that ``node``'s output 0 equals, value for value and of the same type:
    the rule's :meth:`~graphprune.rules.registry.OpRule.aliased_input` (``Identity``), or
    an input whose values the rule says the output holds only cast
    (:meth:`~graphprune.rules.registry.OpRule.carries_values`) through a map (nothing
    moved: ``zero_behaviour == "map"``) to the type it already has (a float->float ``Cast``,
    ``CastLike``, ``Dropout`` at inference). ``None`` for any other node."""
    rule = _rule(node, opset)
    if rule is None or not node.outputs or not node.inputs:
        return None
    k = rule.aliased_input(node)
    if k is None and rule.zero_behaviour == "map":
        out = node.outputs[0]
        k = next((i for i in rule.carries_values(node)
                  if i < len(node.inputs) and _same_type(node.inputs[i], out)), None)
    if k is None or k >= len(node.inputs) or not node.inputs[k].name:
        return None
    return node.inputs[k]


def _carried_root(tensor: gs.Tensor, opset: int) -> gs.Tensor:
    """The earliest tensor that ``tensor`` equals through ops that carry it unchanged
    (:func:`carried_source`): itself when its producer is no such op."""
    seen = {id(tensor)}
    while isinstance(tensor, gs.Variable) and tensor.inputs:
        node = tensor.inputs[0]
        source = carried_source(node, opset) if node.outputs and node.outputs[0] is tensor else None
        if source is None or id(source) in seen:
            break
        seen.add(id(source))
        tensor = source
    return tensor


def _branch(out: gs.Tensor, start: gs.Tensor, order: dict[int, int],
            is_start: Callable[[gs.Tensor], bool] | None = None) -> list[gs.Node] | None:
    """Nodes on the paths from ``start`` to ``out``; ``None`` if ``out`` does not depend on
    ``start``. What else those nodes read is *context* (it does not depend on ``start``: an
    attention mask, rotary tables, constants) and stays outside the branch: erasing the block
    leaves it in place, and the result is still the original with the branch zeroed.
    ``is_start``: which tensors are ``start``'s value (its copies through ops that carry it
    unchanged, :func:`carried_source`; ``start`` is the earliest of them); the ops between
    them stay outside the branch.

    Only nodes after ``start``'s producer in topological order (``order``) can depend on it,
    so the walk never leaves the span between ``start`` and ``out``."""
    first = order.get(id(start.inputs[0]), -1) if start.inputs else -1
    depends: dict[str, bool] = {start.name: True}
    found: dict[int, gs.Node] = {}
    stack: list[tuple[gs.Tensor, bool]] = [(out, False)]
    while stack:
        t, expanded = stack.pop()
        if t.name in depends:
            continue
        if is_start is not None and is_start(t):
            depends[t.name] = True
            continue
        node = t.inputs[0] if not isinstance(t, gs.Constant) and t.inputs else None
        if node is None or order.get(id(node), -1) <= first:
            depends[t.name] = False
            continue
        pending = [x for x in node.inputs if x.name and x.name not in depends]
        if pending and not expanded:
            stack.append((t, True))
            stack.extend((x, False) for x in pending)
            continue
        depends[t.name] = any(depends.get(x.name, False) for x in node.inputs if x.name)
        if depends[t.name]:
            found[id(node)] = node
    if not depends.get(out.name) or not found:
        return None
    return list(found.values())


def _same_shape(skip: gs.Tensor, y: gs.Tensor,
                shape_of: Callable[[gs.Tensor], list[int] | None] | None) -> bool:
    """Is the skip as large as the sum (no broadcast, so erasing the branch keeps the sum's
    shape)? Declared shapes decide where they agree; where they differ only in open dims (two
    exporter-made symbols for what is one size, ``unk__12`` and ``unk__34``) or are not
    declared at all (paddle2onnx), the concrete shapes at the verification sizes
    (``shape_of``) decide."""
    a, b = skip.shape, y.shape
    if a is not None and b is not None:
        if len(a) != len(b):
            return False
        if list(a) == list(b):
            return True
        if any(isinstance(p, int) and isinstance(q, int) and p != q for p, q in zip(a, b, strict=True)):
            return False
    if shape_of is None:
        return False
    ca, cb = shape_of(skip), shape_of(y)
    return (ca is not None and cb is not None and list(ca) == list(cb)
            and (a is None or len(a) == len(ca)) and all(isinstance(d, int) and d > 0 for d in ca))


def shapes_at(model: Any, graph: gs.Graph, input_shapes: dict[str, Any] | None
              ) -> Callable[[gs.Tensor], list[int] | None] | None:
    """Concrete shapes of ``graph``'s tensors (imported from ``model``) when its inputs have
    ``input_shapes`` (ONNX inference, else folding the shape computations at those sizes);
    ``None`` when no input size is open. A tensor left unsized gets ``None``."""
    if not input_shapes:
        return None
    from graphprune.analysis.shape_probe import probe_concrete_shapes
    from graphprune.io.model_io import concrete_shapes

    sizes = concrete_shapes(model, input_shapes)
    sums = [t for n in graph.nodes for t in (*(summed(n, graph.opset) or ()), *n.outputs)
            if summed(n, graph.opset) is not None]
    if any(t.name not in sizes for t in sums if isinstance(t, gs.Variable)):
        sizes = {**probe_concrete_shapes(graph, input_shapes), **sizes}
    return lambda t: sizes.get(t.name)


def find_residual_blocks(graph: gs.Graph, shape_of: Callable[[gs.Tensor], list[int] | None] | None = None,
                         stages: list[ResidualBlock] | None = None) -> list[ResidualBlock]:
    """Every ``Add(x, branch(x))`` whose branch is private (its nodes feed only the Add) and
    holds no other block. The skip and the branch may read ``x`` through ops that carry it
    unchanged (:func:`carried_source`); those ops are no part of the branch, and the block's
    ``skip`` is the sum's own operand. ``shape_of``: concrete shapes at the verification sizes, for skips
    whose declared shape names its open dims differently from the sum's (:func:`_same_shape`).

    A sum whose branch holds blocks is a skip over a stage, not a block: a U-Net's or MAXIM's
    global ``input + backbone(input)`` (erasing it left the identity), or an attention mask
    added to the scores of a later layer, whose "branch" is every layer before (erasing it
    left a softmax of the mask). Blocks are taken innermost first; such sums go to ``stages``
    (when given), each with the blocks it holds in ``contains``."""
    toposort_model(graph)
    order = {id(n): i for i, n in enumerate(graph.nodes)}
    outputs = {t.name for t in graph.outputs}
    roots: dict[int, gs.Tensor] = {}

    def root(t: gs.Tensor) -> gs.Tensor:
        if id(t) not in roots:
            roots[id(t)] = _carried_root(t, graph.opset)
        return roots[id(t)]

    blocks: list[ResidualBlock] = []
    for node in graph.nodes:
        operands = summed(node, graph.opset)
        if operands is None:
            continue
        a, b = operands
        if not all(isinstance(t, gs.Variable) for t in (a, b)) or root(a) is root(b):
            continue
        y = node.outputs[0]
        for skip, out in ((a, b), (b, a)):
            if not _same_shape(skip, y, shape_of):
                continue
            # the branch may start from the skip's value read through an Identity or a Cast to
            # its own type, on either side (the erased sum's readers read the skip itself)
            start = root(skip)
            nodes = _branch(out, start, order, lambda t, start=start: root(t) is start)
            if nodes is None:
                continue
            inside = {id(n) for n in nodes}
            private = all(
                all(id(c) in inside or c is node for c in o.outputs) and o.name not in outputs
                for n in nodes for o in n.outputs
            )
            if not private or not any(_has_weight(n, graph.opset) for n in nodes):
                continue
            nodes.sort(key=lambda n: order[id(n)])
            blocks.append(ResidualBlock(node.name, skip.name, out.name, [n.name for n in nodes]))
            break
    kept: set[str] = set()
    for block in sorted(blocks, key=lambda b: len(b.nodes)):  # innermost first
        inner = [name for name in block.nodes if name in kept]
        if inner:
            block.contains = inner
            if stages is not None:
                stages.append(block)
        else:
            kept.add(block.add)
    return [b for b in blocks if b.add in kept]


def _unit_rms(tensor: gs.Tensor) -> np.ndarray:
    shape = tensor.shape or []
    channels = shape[1] if len(shape) > 1 and isinstance(shape[1], int) else 1
    return np.ones(int(channels))


def propagate_rms(
    nodes: list[gs.Node], rms: dict[str, np.ndarray], opset: int
) -> dict[str, np.ndarray]:
    """Push per-channel RMS estimates through ``nodes`` (in topological order).

    Each node's rule gives its output estimate from its inputs'
    (:meth:`~graphprune.rules.registry.OpRule.propagate_rms`: a Conv/Gemm/MatMul output
    channel gets ``sqrt(sum_i r_i^2 sum_k W[o, i, k]^2 + b_o^2)``, BN scales and shifts,
    rectifiers halve the energy, gates give 0.5, a product multiplies scales and a sum adds
    energies); an op whose rule does not know passes its first input's estimate through
    (the first that is no constant).
    Returns the estimates of ``rms`` and of every output computed.
    """
    def decode(tensor: gs.Tensor) -> np.ndarray | None:
        stored = registry.stored_weight_of(tensor, opset)
        return None if stored is None else np.asarray(stored.decode())

    ctx = ScaleContext(rms, opset, decode)
    for node in nodes:
        if not node.inputs:
            continue
        rule = _rule(node, opset)
        out = rule.propagate_rms(node, ctx) if rule is not None else None
        if out is None:  # the first input that is no constant (a Max(0, x) read x, not the 0)
            live = [t for t in node.inputs if t.name and not isinstance(t, gs.Constant)]
            out = ctx.of(live[0] if live else node.inputs[0])
        each = out if isinstance(out, list) else [out] * len(node.outputs)
        for o, value in zip(node.outputs, each, strict=False):
            ctx.rms[o.name] = np.asarray(value, dtype=np.float64).reshape(-1)
    return ctx.rms


def branch_macs_shares(graph: gs.Graph, blocks: list[ResidualBlock], shape: Callable[[gs.Tensor], Any]) -> None:
    """Set each block's :attr:`ResidualBlock.macs_share`: its branch's multiply-accumulates
    (each op's rule counts them, :meth:`OpRule.macs`, at the sizes ``shape`` gives) over the
    whole graph's; left ``None`` where the graph counts none."""
    macs: dict[str, int] = {}
    for node in graph.nodes:
        rule = _rule(node, graph.opset)
        macs[node.name] = (rule.macs(node, shape) if rule is not None else None) or 0
    total = sum(macs.values())
    if total <= 0:
        return
    for block in blocks:
        block.macs_share = sum(macs.get(name, 0) for name in block.nodes) / total


def branch_scale(graph: gs.Graph, block: ResidualBlock) -> float:
    """Data-free importance: the branch's output RMS for a unit-RMS, zero-mean input (fed
    to the skip and to its copies through ops that carry it unchanged, which the branch
    may read instead)."""
    skip = graph.tensors()[block.skip]
    nodes = {n.name: n for n in graph.nodes}
    branch = [nodes[name] for name in block.nodes]
    start = _carried_root(skip, graph.opset)
    unit = _unit_rms(skip)
    seeds = {t.name: unit for n in branch for t in n.inputs
             if t.name and _carried_root(t, graph.opset) is start}
    rms = propagate_rms(branch, {**seeds, block.skip: unit}, graph.opset)
    return rms_of(rms.get(block.branch_output, np.zeros(1)))


def relative_branch_scales(graph: gs.Graph, blocks: list[ResidualBlock]) -> list[float]:
    """Data-free importance of each block: branch output RMS over skip RMS.

    One RMS estimate is pushed through the whole graph from unit-RMS inputs, so every branch
    is judged against the size of the stream it is added to (the default depth-pruning score).
    """
    toposort_model(graph)
    with np.errstate(over="ignore", invalid="ignore"):
        rms = propagate_rms(
            list(graph.nodes), {t.name: _unit_rms(t) for t in graph.inputs}, graph.opset
        )
        scores = []
        for block in blocks:
            branch = rms_of(rms.get(block.branch_output, np.zeros(1)))
            skip = rms_of(rms.get(block.skip, np.ones(1)))
            # an estimate that overflowed (scales multiplied layer after layer in a network with
            # folded normalisations) ranks nothing: NaN, unknown
            scores.append(branch / skip if skip > 0 and math.isfinite(branch) and math.isfinite(skip)
                          else math.inf if skip == 0 and math.isfinite(branch) else math.nan)
    return scores
