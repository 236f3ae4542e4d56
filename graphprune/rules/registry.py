"""The operator rule registry: everything graphprune knows about an ONNX op lives here.

A rule is a small class registered for ``(domain, op_type)`` and an opset range. It states

- ``couple(node, ctx)``: which input and output dimensions travel together, each with an
  index map (see :mod:`graphprune.analysis.index_maps`), which parameter axes a pruned channel
  removes (role ``producer``, ``consumer`` or ``channelwise``), which axes must never be
  pruned (``ctx.freeze``) and which shape constants count channels (``ctx.track_shape``);
- ``rewrite(node, ctx)``: how to fix the node's attributes and non-parameter inputs once
  channels are gone (a grouped Conv's ``group``, Split sizes, Slice bounds ...). Parameter
  slicing and tracked shape constants are handled generically by the channel-removal pass.

An op without a rule fails closed: the analysis freezes every dimension it touches and
records the node. The registry refuses a second rule for an overlapping opset range, so a
user's custom rule for a custom op can never silently shadow a built-in one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

from graphprune.errors import GraphPruneError

if TYPE_CHECKING:
    import onnx_graphsurgeon as gs

    from graphprune.analysis import CouplingContext
    from graphprune.passes.rewrite_context import RewriteContext
    from graphprune.analysis.zero_analysis import ChannelValues, ConstantContext

DEFAULT_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True)
class LinearInfo:
    """How a linear op (Conv, ConvTranspose, Gemm, MatMul with a weight) uses its weight.

    ``y = alpha * (x (*) W) + beta * bias``: ``x`` is input ``data`` read along ``data_axis``
    (its channel axis), ``W`` is input ``weight`` with ``in_axis`` reading the input
    channels and ``out_axis`` producing the output channels, written along the output's
    ``out_channel_axis``. ``bias`` is the input index of the bias (``None``: the op cannot
    take one). ``kernel`` is ``"conv"`` (weight ``[out, in/group, *k]``), ``"conv_transpose"``
    (``[in, out/group, *k]``) or ``"dense"`` (a 2-D matrix). ``group`` > 1 only for convs.
    """

    data: int
    data_axis: int
    weight: int
    in_axis: int
    out_axis: int
    out_channel_axis: int
    bias: int | None
    kernel: str
    group: int = 1
    alpha: float = 1.0
    beta: float = 1.0


class OpRule:
    """Base class for op rules. Subclasses set ``op_types`` and override ``couple``."""

    op_types: ClassVar[tuple[str, ...]] = ()
    domain: ClassVar[str] = ""
    since_opset: ClassVar[int] = 1
    until_opset: ClassVar[int] = 10_000
    #: rules in phase 2 run after the first coupling pass, so they may ask whether an axis
    #: is spatial (Reshape/Flatten choose which factor of a merged axis carries channels).
    phase: ClassVar[int] = 1
    #: zero invariance, in one word (``zero_output`` has the per-node detail):
    #: "move" (data movement: a zero or constant channel keeps its value), "map" (each channel
    #: goes through a known function: Relu(0) = 0, Sigmoid(0) = 0.5, BN shifts it), "affine"
    #: (output channels are a bias plus a linear map of the inputs: zero weights give the bias)
    #: or "none" (unknown: nothing is claimed).
    zero_behaviour: ClassVar[str] = "none"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        raise NotImplementedError

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """What constant channels on the inputs become on the outputs.

        Returns one :class:`~graphprune.analysis.zero_analysis.ChannelValues` (or ``None``: nothing
        known) per output. The default knows nothing, so an op without this method fails
        closed. See :mod:`graphprune.analysis.zero_analysis` for the maths.
        """
        return [None] * len(node.outputs)

    def rewrite(self, node: gs.Node, ctx: RewriteContext) -> None:
        """Fix attributes / non-parameter inputs after channel removal. Default: nothing."""

    def linear(self, node: gs.Node) -> LinearInfo | None:
        """How the node applies a weight to its input channels (see :class:`LinearInfo`).

        ``None`` (the default) means "not a linear layer with a weight": bias folding,
        reconstruction and MAC counting then leave the node alone (fail closed).
        """
        return None

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(self.op_types)})"


class RuleRegistryError(GraphPruneError):
    """A rule registration conflicts with an existing one."""


_RULES: dict[tuple[str, str], list[OpRule]] = {}


def _norm_domain(domain: str) -> str:
    return "" if domain in DEFAULT_DOMAINS else domain


def register(rule_cls: type[OpRule]) -> type[OpRule]:
    """Class decorator: register one instance of ``rule_cls`` for each of its op types."""
    rule = rule_cls()
    for op_type in rule_cls.op_types:
        key = (_norm_domain(rule_cls.domain), op_type)
        for other in _RULES.get(key, []):
            if rule.since_opset <= other.until_opset and other.since_opset <= rule.until_opset:
                raise RuleRegistryError(
                    f"{rule!r} overlaps {other!r} for {key[0] or 'ai.onnx'}::{op_type}"
                )
        _RULES.setdefault(key, []).append(rule)
    return rule_cls


def unregister(rule_cls: type[OpRule]) -> None:
    """Remove every registration of ``rule_cls`` (for tests and user overrides)."""
    for key, rules in list(_RULES.items()):
        kept = [r for r in rules if type(r) is not rule_cls]
        if kept:
            _RULES[key] = kept
        else:
            del _RULES[key]


def lookup(domain: str, op_type: str, opset: int) -> OpRule | None:
    for rule in _RULES.get((_norm_domain(domain), op_type), []):
        if rule.since_opset <= opset <= rule.until_opset:
            return rule
    return None


def registered_ops() -> list[str]:
    return sorted(f"{d + '::' if d else ''}{op}" for d, op in _RULES)
