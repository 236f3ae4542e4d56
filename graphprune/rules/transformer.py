"""Transformer ops: Einsum, fused norms and activations, index ops (fused attention:
:mod:`graphprune.rules.attention`).

Plain exports need no rule here: attention is MatMul/Softmax/Reshape/Transpose (see
:mod:`graphprune.rules.linear` and :func:`graphprune.rules.reshape.couple_reshape`). This
module covers what optimised graphs use instead.

**Norms** normalise the hidden axis (inexact, like LayerNormalization): ONNX
``RMSNormalization``, ``SimplifiedLayerNormalization`` (ORT registers it in both domains),
com.microsoft ``SkipLayerNormalization``, ``SkipSimplifiedLayerNormalization`` and
``EmbedLayerNormalization`` (whose embedding tables produce the hidden features).

**Einsum** couples every repeated subscript across operands and output; with a constant
operand, contracted subscripts read channels (consumer) and subscripts only the constant
and the output share create them (producer).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.roles import CHANNELWISE, CONSUMER, PRODUCER
from graphprune.io.tensors import present_input as _present
from graphprune.rules.norm import LayerNormRule
from graphprune.rules.registry import OpRule, register
from graphprune.rules.scale import ScaleContext

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext

MS = "com.microsoft"


def _used_output(node: gs.Node, index: int) -> gs.Tensor | None:
    """Output ``index`` when something reads it (graph outputs are frozen anyway)."""
    if index < len(node.outputs) and node.outputs[index].name and node.outputs[index].outputs:
        return node.outputs[index]
    return None


# ----------------------------------------------------------------------------- norms


@register
class RMSNormRule(LayerNormRule):
    op_types = ("RMSNormalization",)
    centred = False
    since_opset = 23


@register
class SimplifiedLayerNormRule(LayerNormRule):
    op_types = ("SimplifiedLayerNormalization",)
    centred = False


@register
class MsSimplifiedLayerNormRule(LayerNormRule):
    op_types = ("SimplifiedLayerNormalization", "LayerNormalization")
    domain = MS

    def normalisation(self, node: gs.Node) -> tuple[int, bool] | None:
        return int(node.attrs.get("axis", -1)), node.op == "LayerNormalization"


@register
class SkipLayerNormRule(OpRule):
    """``out = norm(input + skip + bias) * gamma (+ beta)``; output 3 is the sum."""

    op_types = ("SkipLayerNormalization", "SkipSimplifiedLayerNormalization")
    domain = MS
    normalizes_features = True

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        x, skip, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ranks = ctx.known_ranks(node, x)
        if ranks is None:
            return
        rank = ranks[0]
        ctx.couple_broadcast([x, skip], y)
        params = [2, 3, 4] if node.op == "SkipLayerNormalization" else [2, 3]
        for index in params:
            p = _present(node, index)
            if p is not None:
                ctx.couple(p, 0, y, rank - 1)
                ctx.role(p, 0, CHANNELWISE)
        ctx.inexact(y, rank - 1, f"{node.op} normalises this axis")
        for index in (1, 2):
            if _used_output(node, index) is not None:
                ctx.freeze_node(node, f"statistics outputs used at {node.op} '{node.name}'")
        total = _used_output(node, 3)
        if total is not None:
            ctx.couple_all_axes(y, total)


@register
class EmbedLayerNormRule(OpRule):
    """Word + position + segment embeddings, then LayerNorm: the tables produce hidden."""

    op_types = ("EmbedLayerNormalization",)
    domain = MS
    normalizes_features = True

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        y = node.outputs[0]
        for index in (2, 3, 4):  # word, position, segment tables [rows, hidden]
            table = _present(node, index)
            if table is None:
                continue
            ctx.freeze(table, 0, f"embedding rows at EmbedLayerNormalization '{node.name}'")
            ctx.couple(table, 1, y, 2)
            ctx.role(table, 1, PRODUCER)
        for index in (5, 6):
            p = _present(node, index)
            if p is not None:
                ctx.couple(p, 0, y, 2)
                ctx.role(p, 0, CHANNELWISE)
        ctx.couple(node.inputs[0], 0, y, 0)
        ctx.couple(node.inputs[0], 1, y, 1)
        ctx.inexact(y, 2, "EmbedLayerNormalization normalises this axis")
        total = _used_output(node, 2)
        if total is not None:
            ctx.couple_all_axes(y, total)

    def index_bound(self, node: gs.Node, index: int) -> int | None:
        """Input ids index the word table (input 2), segment ids the segment table (4)."""
        table = _present(node, {0: 2, 1: 4}[index]) if index in (0, 1) else None
        if not isinstance(table, gs.Constant) or not table.shape:
            return None
        return int(table.shape[0])


# ----------------------------------------------------------------------------- activations


@register
class MsActivationRule(OpRule):
    """Fused activations with an optional bias along the last axis."""

    op_types = ("FastGelu", "BiasGelu", "Gelu", "QuickGelu", "BiasAdd", "BiasSoftmax")
    domain = MS

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | None:
        """The Gelu variants keep about half the energy of a zero-mean input."""
        if node.op not in ("FastGelu", "BiasGelu", "Gelu", "QuickGelu"):
            return None
        return ctx.of(node.inputs[0]) / np.sqrt(2)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        y = node.outputs[0]
        if node.op == "BiasSoftmax":
            ctx.freeze_node(node, f"BiasSoftmax '{node.name}' not modelled")
            return
        ctx.couple_broadcast([t for t in node.inputs if t.name], y)


# ----------------------------------------------------------------------------- einsum


def _einsum_terms(equation: str, ranks: list[int | None]) -> tuple[list[str], str] | None:
    """Operand and output subscripts with ``...`` expanded to digits (right-aligned)."""
    equation = equation.replace(" ", "")
    lhs, _, rhs = equation.partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks) or any(r is None for r in ranks):
        return None
    widths = [r - (len(t) - 3) if "..." in t else 0 for t, r in zip(terms, ranks, strict=True)]  # type: ignore[operator]
    width = max(widths, default=0)
    digits = "0123456789"[:width]
    out_terms = []
    for term, w in zip(terms, widths, strict=True):
        out_terms.append(term.replace("...", digits[width - w :]) if "..." in term else term)
    if "->" in equation:
        output = rhs.replace("...", digits)
    else:
        counts = {c: "".join(out_terms).count(c) for c in "".join(out_terms)}
        output = digits + "".join(sorted(c for c, n in counts.items() if n == 1 and c.isalpha()))
    if any(len(t) != r for t, r in zip(out_terms, ranks, strict=True)):
        return None
    return out_terms, output


@register
class EinsumRule(OpRule):
    op_types = ("Einsum",)
    zero_behaviour = "affine"

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """A product of two or more operands: one multiply-accumulate per combination of all
        its subscripts (``btgi,gih->btgh``: ``b t g i h``); one operand alone (a transpose, a
        trace) multiplies nothing."""
        shapes = [shape(t) for t in node.inputs]
        y = shape(node.outputs[0])
        if len(shapes) < 2 or y is None or any(s is None for s in shapes):
            return None
        equation = node.attrs.get("equation", "")
        parsed = _einsum_terms(equation.decode() if isinstance(equation, bytes) else str(equation),
                               [len(s) for s in shapes])
        if parsed is None or len(parsed[1]) != len(y):
            return None
        sizes: dict[str, int] = {}
        for term, dims in zip([*parsed[0], parsed[1]], [*shapes, y], strict=True):
            for label, size in zip(term, dims, strict=True):
                sizes[label] = max(sizes.get(label, 1), int(size))
        return math.prod(sizes.values())

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        equation = node.attrs.get("equation", "")
        equation = equation.decode() if isinstance(equation, bytes) else str(equation)
        inputs, y = list(node.inputs), node.outputs[0]
        parsed = _einsum_terms(equation, [ctx.rank(t) for t in inputs])
        if parsed is None or ctx.rank(y) != len(parsed[1]):
            ctx.freeze_node(node, f"Einsum '{node.name}' equation '{equation}' not understood")
            return
        terms, output = parsed
        if any(len(set(t)) != len(t) for t in [*terms, output]):
            ctx.freeze_node(node, f"Einsum '{node.name}' takes a diagonal")
            return
        constant = [isinstance(t, gs.Constant) for t in inputs]
        attention = len(inputs) == 2 and not any(constant)
        for label in {c for t in [*terms, output] for c in t}:
            places = [(t, term.index(label)) for t, term in zip(inputs, terms, strict=True) if label in term]
            if label in output:
                places.insert(0, (y, output.index(label)))
            sizes = [ctx.size(t, a) for t, a in places]
            full = max((s for s in sizes if s is not None), default=None)
            anchor = next(((t, a) for (t, a), s in zip(places, sizes, strict=True) if s != 1 or full == 1), None)
            if anchor is None:
                continue
            for (t, a), s in zip(places, sizes, strict=True):
                if (t, a) != anchor and not (s == 1 and full != 1):
                    ctx.couple(anchor[0], anchor[1], t, a)
            in_output = label in output
            holders = [i for i, term in enumerate(terms) if label in term]
            for i in holders:
                if not constant[i]:
                    continue
                others = [j for j in holders if j != i and not constant[j]]
                if not in_output and others:
                    ctx.role(inputs[i], terms[i].index(label), CONSUMER)
                elif in_output and not others:
                    ctx.role(inputs[i], terms[i].index(label), PRODUCER)
            if attention and in_output and len(holders) == 2:  # batch or head subscript
                for t, a in places:
                    if a > 0 or ctx.rank(t) == 3:
                        ctx.mark_head(t, a)
            elif attention:  # sequence or head_dim inside attention: never a channel
                for t, a in places:
                    ctx.freeze(t, a, f"subscript '{label}' inside attention at {ctx.where()}")


# ----------------------------------------------------------------------------- index ops


@register
class RangeRule(OpRule):
    """``Range`` makes an index sequence (positions, masks): never a channel."""

    op_types = ("Range",)
    strict_scalar_inputs = (0, 1, 2)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.freeze(node.outputs[0], None, f"index sequence from Range '{node.name}'")


@register
class GatherElementsRule(OpRule):
    """``GatherElements`` picks, along ``axis``, the element each index names; every other
    axis of data, indices and output is element for element (DeBERTa's relative-position
    lookups ``gather(c2p, -1, pos.expand(B*H, S, S))`` keep their heads). The gathered axis
    of data is frozen, and the indices' and output's ``axis`` are positions, never channels."""

    op_types = ("GatherElements",)

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        data, indices, y = node.inputs[0], node.inputs[1], node.outputs[0]
        ranks = ctx.known_ranks(node, data, indices, y)
        if ranks is None:
            return
        rank = ranks[0]
        axis = int(node.attrs.get("axis", 0)) % rank
        reason = f"indexed by computed positions at {node.op} '{node.name}'"
        for a in range(rank):
            if a == axis:
                ctx.freeze(data, a, reason)
                ctx.freeze(indices, a, reason)
                ctx.freeze(y, a, reason)
                continue
            # member sizes: a merged dynamic [B*H] axis counts by the shape probe
            sizes = {ctx.member_size(t, a) for t in (data, indices, y)}
            if len(sizes) != 1 or None in sizes:  # a smaller or unknown index extent
                for t in (data, indices, y):
                    ctx.freeze(t, a, reason)
                continue
            ctx.couple(data, a, y, a)
            ctx.couple(indices, a, y, a)
