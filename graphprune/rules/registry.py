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

import importlib
import pkgutil
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, ClassVar

from graphprune.errors import GraphPruneError
from graphprune.rules.weight_info import (
    LinearInfo,
    PairSummed,
    RecurrentInfo,
    RescaledLinear,
    StoredWeight,
)

if TYPE_CHECKING:
    from collections.abc import Callable

    import numpy as np
    import onnx
    import onnx_graphsurgeon as gs

    from graphprune.analysis.constants import ChannelValues, ConstantContext
    from graphprune.analysis.coupling import CouplingContext
    from graphprune.analysis.dims import Dim
    from graphprune.analysis.shape_trace import ShapeSource, ShapeTrace
    from graphprune.passes.rewrite_context import RewriteContext
    from graphprune.rules.scale import ScaleContext

DEFAULT_DOMAINS = ("", "ai.onnx")


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
    #: the op quantizes its input with a range computed from the data at run time (ORT's
    #: dynamic quantization): verification allows one quantization step of difference
    quantizes_at_run_time: ClassVar[bool] = False
    #: the op reads only the shapes of its inputs, never their values (``Shape``): a channel
    #: that reaches it reaches nothing
    reads_only_shape: ClassVar[bool] = False
    #: op types of this rule that scale a shape value by a literal (``batch * num_heads``:
    #: :meth:`trace_shape` gives a ``ScaledRead``, whose literal a rewrite may change): a
    #: node computed once and read for several layers is copied per reader
    #: (:func:`graphprune.io.shared_constants.untie_shared_shapes`)
    shape_scaling_ops: ClassVar[frozenset[str]] = frozenset()
    #: op types of this rule that exporters use to compute constants (a ``Constant`` node,
    #: an ``Identity`` of a shared weight, a ``Shape`` of a static shape): a model with one
    #: is constant-folded before the analysis
    constant_ops: ClassVar[frozenset[str]] = frozenset()
    #: op types of this rule that decode an integer constant into the float weight it stores
    #: (``DequantizeLinear``): a vector so stored that several nodes read is decoded once per
    #: reader before the analysis (:func:`graphprune.io.shared_constants.untie_shared_dequantized`)
    decodes_constants: ClassVar[frozenset[str]] = frozenset()
    #: op types of this rule that replicate their input along axes (``Expand``, ``Tile``): a value so
    #: replicated once and read by several nodes (a padding mask for every layer's heads) is
    #: computed once per reader before the analysis (:func:`graphprune.io.shared_constants.untie_shared_broadcasts`)
    replicates: ClassVar[frozenset[str]] = frozenset()
    #: op types of this rule that only re-encode each value (``QuantizeLinear``, ``DequantizeLinear``):
    #: a replicated value read by several nodes may pass them (``untie_shared_broadcasts``)
    recodes: ClassVar[frozenset[str]] = frozenset()
    #: a node of this op whose inputs are all computed from constants is a weight computed in the graph, and the
    #: model is constant-folded before the analysis (weight standardization the dynamo exporter leaves unfolded)
    folds_weights: ClassVar[bool] = False
    #: inputs that must be scalars, which ONNX Runtime runs as 1-D tensors only while their shape is unknown (Range's)
    strict_scalar_inputs: ClassVar[tuple[int, ...]] = ()
    #: input indices of parameters that exporters may compute from constants in the graph (the
    #: dynamo exporter reorders a bidirectional LSTM's gates with ``Slice`` and ``Concat``): a
    #: model with such a node is constant-folded before the analysis, so that the parameter is
    #: a constant the criteria and the refit can read
    computed_parameters: ClassVar[tuple[int, ...]] = ()
    #: ``False``: the rule only lowers the op (:meth:`lowered`); an instance that stays is an op
    #: without a rule to the analysis (its groups freeze, it is listed as unsupported)
    couples: ClassVar[bool] = True
    #: what a lowering by :meth:`lowered` is, as the command line says it
    lowered_as: ClassVar[str] = "fused kernels written as standard ops (ONNX Runtime fuses them again at load)"
    #: the op runs its body graph as many times as the data decides (``Loop``'s condition,
    #: ``Scan``'s sequence length): the layers inside are left out of the MAC count, and the
    #: report says so (:func:`graphprune.verify.metrics.uncounted_bodies`)
    repeats_body: ClassVar[bool] = False
    #: the op rescales each sample's features to fixed statistics (a LayerNorm, an L2
    #: normalisation, the BatchNorm a face embedder ends with): a fixed-width output computed
    #: from one with no linear layer after it is an embedding, whose arg-max names no class
    #: (:func:`graphprune.calibration.output_kinds.feature_outputs`)
    normalizes_features: ClassVar[bool] = False

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        raise NotImplementedError

    # ---- what the coupling analysis asks besides ``couple`` (all fail closed) -----------
    def trace_shape(
        self, node: gs.Node, output: gs.Tensor, trace: ShapeTrace
    ) -> list[ShapeSource] | None:
        """Where each element of ``output``, a 1-D integer shape tensor the node computes,
        comes from (see :mod:`graphprune.analysis.shape_trace`); ``trace.input(node, i)``
        gives the sources of input ``i``. ``None``: even the length is unknown.

        The default keeps the length and loses every value (arithmetic on shapes), so each
        dimension the shape sets freezes.
        """
        return trace.unknown(output)

    def shape_value(self, attrs: dict, dims: Sequence[int]) -> np.ndarray | None:
        """For an op that reads only the shape of its input (:attr:`reads_only_shape`): the
        value it computes from an input of shape ``dims``. Default: not known."""
        return None

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        """For an op ONNX shape inference does not know: the shape of output 0 from the
        inputs' shapes (``None``: unknown or absent; a dim that is no ``int`` is unknown) and the
        attributes, with the input whose element type the output has. One definition serves
        the coupling (``ctx.derive_shape``) and ONNX Runtime's symbolic shape inference, which
        the shape probe teaches these ops. Default: not known."""
        return None

    def output_shapes(self, op: str, attrs: dict, shapes: list[list | None]) -> list[tuple[list, int] | None]:
        """:meth:`output_shape` for every output (an op with several, a recurrent kernel's
        ``Y``, ``Y_h``, ``Y_c``, gives each). Default: output 0's."""
        return [self.output_shape(op, attrs, shapes)]

    def lowered(self, node: gs.Node, opset: int) -> list[gs.Node] | None:
        """The node written as standard ONNX ops that compute the same outputs (new nodes
        that read the node's inputs and write its output tensors; every check is made
        before the first is built, since a built node attaches to its tensors), for a fused
        kernel whose parts the rules know (ONNX Runtime's ``FusedConv``: a Conv and an
        activation): the prepared model is lowered before the analysis
        (:func:`graphprune.io.lowering.lower_fused`). ``None`` (the default): the node stays."""
        return None

    def unlowered_reason(self, node: gs.Node) -> str:
        """Why a node this rule could only lower (``couples`` false) stayed, for its freeze
        reason. Default: nothing to add."""
        return ""

    def derive_shapes(self, node: gs.Node, ctx: CouplingContext) -> None:
        """Give outputs that ONNX shape inference left without a shape the shape the op
        gives them (``ctx.derive_shape``), in graph order before any rule couples: a phase-2
        op behind an op ONNX does not know (a com.microsoft one) would otherwise leave the
        phase-1 ops after it without ranks. Default: nothing (phase-1 rules may derive
        shapes in ``couple``)."""

    def preview_couplings(
        self, node: gs.Node, ctx: CouplingContext
    ) -> tuple[list[tuple[Dim, Dim]], list[Dim]]:
        """Phase-2 rules: the couplings (pairs of dimensions) and the frozen dimensions that
        ``couple`` will add and that phase-2 rules running before this one should already
        see through ``ctx.component_facts``. Default: none."""
        return [], []

    def prunes_by_position(self, node: gs.Node) -> bool:
        """Can the node, which ties its units group by group (a grouped Conv: one unit is a
        whole conv group), remove the same positions in every group instead, when it is
        listed in ``ctx.position_convs``? The analysis retries that way where tying by group
        leaves a channel group with one unit (a channel shuffle) or frozen (grouped convs
        that read and write a residual stream), and keeps the retry where it prunes more
        units. Default: no."""
        return False

    def zero_output(self, node: gs.Node, ctx: ConstantContext) -> list[ChannelValues | None]:
        """What constant channels on the inputs become on the outputs.

        Returns one :class:`~graphprune.analysis.constants.ChannelValues` (or ``None``: nothing
        known) per output. The default knows nothing, so an op without this method fails
        closed. See :mod:`graphprune.analysis.constants` for the maths.
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

    def activation_step(self, node: gs.Node) -> float | None:
        """Where the node's output is an activation decoded from integers on one step (a QDQ
        model's ``DequantizeLinear`` of a computed tensor), that step: a bias given to the
        layer that reads it is quantized on it times the weight's (:mod:`graphprune.calibration.bias`).
        ``None`` (the default): no such output."""
        return None

    def recurrent(self, node: gs.Node) -> RecurrentInfo | str | None:
        """The node as :class:`RecurrentInfo`, for a recurrent op in ONNX's float layout; a
        string says why the calibration cannot read it; ``None`` (the default): not a
        recurrent op."""
        return None

    def rescaled_linear(self, node: gs.Node) -> RescaledLinear | None:
        """The float layer an integer linear op (data quantized at run time, integer weight,
        result rescaled to float) stands for (:class:`RescaledLinear`). ``None`` (the default):
        none, or the pattern around the node is not the one the rule knows."""
        return None

    def pair_summed(self, node: gs.Node) -> PairSummed | tuple[PairSummed, ...] | None:
        """The node as an integer kernel whose result depends on which input channels its
        x86 implementation pairs (u8 activations x s8 weights: :class:`PairSummed`,
        ``verify/saturation.py``); a tuple where it has several such weights (an int8 LSTM's
        input and recurrence weights). ``None`` (the default): no such kernel."""
        return None

    def stored_weight(self, node: gs.Node, opset: int) -> StoredWeight | None:
        """Output 0 as a float weight decoded from constant inputs that a refit can read
        and write back (:class:`StoredWeight`; ``opset``: the model's, for a rule that asks
        the rule of its input's producer). ``None`` (the default): it is no such weight."""
        return None

    # ---- what rewrites and metrics ask about a node (all fail closed) ----------------
    def input_statistics(self, node: gs.Node) -> tuple[np.ndarray, np.ndarray] | None:
        """Per-channel mean and variance (axis 1) that the node assumes for its input 0: the
        running statistics of an inference-mode BatchNormalization. ``None`` (the default):
        none (the data-free BatchNorm compensation then has nothing to start from)."""
        return None

    def normalisation(self, node: gs.Node) -> tuple[int, bool] | None:
        """How output 0 normalises input 0 at every position: ``(axis, centred)``, the axes
        from ``axis`` on are divided by their standard deviation (``centred``: LayerNorm)
        or root mean square (RMSNorm), so an error of input 0 reaches the output divided by
        it. ``None`` (the default): the node is no such normalisation."""
        return None

    def affine_operands(self, node: gs.Node) -> tuple[int, ...]:
        """Constant inputs that scale or shift the channels of another input, one value per
        channel or one for all (a ``Mul`` or ``Add`` by a constant: the BatchNorm tf2onnx writes
        as ``[1, C, 1, 1]`` scale and shift, a bias ``Add``). They are no weights: magnitude
        criteria do not read their values as a channel's size. Default: none."""
        return ()

    def neutral_operand(self, node: gs.Node, index: int) -> float | None:
        """The constant that, as input ``index``, makes the node return its other operand
        (``Add(x, 0)``, ``Sub(x, 0)``, ``Mul(x, 1)``, ``Div(x, 1)``); ``None``: there is none."""
        return None

    def summed_operands(self, node: gs.Node) -> tuple[int, int] | None:
        """The inputs of a sum ``y = a + b`` (where depth pruning finds a residual block's skip
        and branch). Default: the two inputs of a two-input node whose operands are both
        neutral at 0 (``Add``, a two-input ``Sum``); ``None``: the node is no sum."""
        if (len(node.inputs) == 2 and len(node.outputs) == 1
                and all(self.neutral_operand(node, k) == 0.0 for k in (0, 1))):
            return (0, 1)
        return None

    def zero_operand(self, node: gs.Node, index: int) -> np.ndarray | None:
        """A sum whose other operand does not pass through unchanged (a quantized sum
        requantizes it): the constant that, as input ``index``, adds nothing (the operand's
        zero point), which an erased branch is replaced with. ``None`` (the default): the sum
        is bypassed, its readers read the other operand (:meth:`neutral_operand`)."""
        return None

    def broadcasts(self, node: gs.Node, index: int) -> bool:
        """Is input ``index`` read with numpy broadcasting, so that a smaller tensor that
        broadcasts to the same output shape (a ``[C, 1, 1]`` constant) gives the same result?"""
        return False

    def concat_axis(self, node: gs.Node) -> int | None:
        """The axis along which the node joins its inputs (``None``: it does not)."""
        return None

    def split_axis(self, node: gs.Node) -> int | None:
        """The axis along which the outputs are consecutive parts of input 0 (``None``: they
        are not)."""
        return None

    def zero_filled(self, node: gs.Node, zero: Callable[[gs.Tensor], bool]) -> bool:
        """Is every element of every output 0 when ``zero(tensor)`` tells which inputs are
        all zeros? Default: data movement (``zero_behaviour == "move"``) of a zero input 0;
        for any other op, not known (False)."""
        return self.zero_behaviour == "move" and bool(node.inputs) and zero(node.inputs[0])

    def ranks_inputs(self, node: gs.Node) -> tuple[int, ...]:
        """Inputs whose values the op ranks to choose positions (``TopK``, ``ArgMax``): what is
        computed from its choice jumps when rounding flips a near-tie, so the structural check
        compares such outputs on further inputs (:mod:`graphprune.pipeline.ratio`). Default:
        none."""
        return ()

    def ranked_axis(self, node: gs.Node) -> int | None:
        """The axis along which :meth:`ranks_inputs` are ranked (``ArgMax``'s ``axis``). Default:
        none."""
        return None

    def zero_default_inputs(self, node: gs.Node) -> tuple[int, ...]:
        """Optional inputs that mean zeros when absent (a recurrent layer's initial state):
        one that is provably all zeros is dropped before the analysis
        (:func:`graphprune.io.zero_inputs.drop_zero_inputs`). Default: none."""
        return ()

    def selected_range(self, node: gs.Node) -> tuple[int, int, int, bool] | None:
        """``(axis, start, stop, squeezed)`` when output 0 is the index range ``start:stop``
        (step 1) of input 0 along ``axis``, that axis dropped when ``squeezed`` (a ``Gather``
        of a constant scalar index, a ``Slice`` with constant bounds); ``None``: it is not
        (known). A selection within one input of a concatenation reads that input directly
        (:mod:`graphprune.io.concat_selects`)."""
        return None

    def indexed_rows(self, node: gs.Node) -> bool:
        """Whether output 0 holds the elements of input 0 (along axis 0) that the index
        tensor input 1 names (``Gather``): the dynamo exporter's ``as_strided`` lowering
        (:mod:`graphprune.io.strided_gathers`). Default: no."""
        return False

    def row_major_flat(self, node: gs.Node) -> bool:
        """Whether output 0 is input 0 read in row-major order as one axis (a ``Reshape`` to
        rank 1). Default: no."""
        return False

    def aliased_input(self, node: gs.Node) -> int | None:
        """The input that output 0 equals unchanged (``Identity``): a constant read
        through it is read directly instead of being folded into a second copy."""
        return None

    def sums_in_thread_order(self, node: gs.Node) -> bool:
        """Whether ONNX Runtime's result depends on how it splits the work over its threads (a
        scatter that adds into repeated indices: a GNN's messages summed per atom in another
        order each run), so that verification runs such a model on one thread. Default: no."""
        return False

    def masks_weight(self, node: gs.Node) -> bool:
        """Whether output 0 is a stored float weight with a stored 0/1 mask of its shape
        applied (``torch.nn.utils.prune``'s ``weight_orig * weight_mask``): preparation folds
        it into one weight, as ``prune.remove`` does (:func:`graphprune.io.ir.prepare`)."""
        return False

    def index_bound(self, node: gs.Node, index: int) -> int | None:
        """The number of entries of the table that input ``index`` indexes (a ``Gather`` of
        a table of static size: its rows), so its values lie in ``[0, bound)``: what a synthetic
        calibration feed gives a graph input read this way (token ids). ``None`` (the
        default): the input is no such index."""
        return None

    def couples_subgraph_reads(self, node: gs.Node, ctx: CouplingContext) -> bool:
        """Whether :meth:`couple` accounts for every outer value ``node``'s subgraphs read (an
        ``If`` whose branches only move an input's axes), so that the analysis does not
        freeze them for being read inside a subgraph. Default: ``False``."""
        return False

    def value_range(self, node: gs.Node, index: int) -> tuple[float, float] | None:
        """The range of real values that input ``index`` (a float) is meant to lie in, where
        the node says (a ``QuantizeLinear`` with constant scale and zero point represents
        ``[(qmin - zp) * scale, (qmax - zp) * scale]``; ONNX Runtime's static quantizer puts
        one on every float input, calibrated on the data the model was made for): what
        verification and synthetic calibration feed a graph input read this way, uniform
        across it, instead of standard normal values that quantize to one or two levels
        (an input quantized for 0-255 pixels: every output 0, and every check compared
        zeros). ``None`` (the default): no range known."""
        return None

    def absolute_error(self, node: gs.Node) -> float | None:
        """How far ONNX Runtime's kernel may put output 0 from the exact value where that
        error is absolute, whatever the value's size: ``Sigmoid`` is computed at the scale of
        its range (MLAS rounds to steps of ~3e-8 and is off by up to 1.35e-7, so a saturated
        score of 6e-7 comes out 20 % off, where float32 itself would be exact to 1e-13).
        Verification holds a tensor read through such an op to at least this much noise.
        ``None`` (the default): the kernel's error is relative to the value."""
        return None

    def tested_value(self, node: gs.Node, index: int) -> np.ndarray | None:
        """The constant that input ``index`` is tested for equality with (``Equal(sr, 16000)``
        ahead of an ``If``: a mode switch), so that value is one the input is meant to take:
        what verification and synthetic calibration feed a small integer graph input read
        this way, instead of a random 0 or 1 that takes a branch no real feed takes. ``None``
        (the default): no such test."""
        return None

    def required_sizes(self, node: gs.Node) -> dict[tuple[int, int], int]:
        """Sizes the op requires of axes of its inputs, ``{(input index, axis): size}``, that
        only its attributes and other inputs fix (a KV cache's head count and head size): what
        verification, timing and synthetic calibration feed a graph input read here whose
        declaration leaves that size open, instead of a guess the op refuses. Empty (the
        default): nothing required."""
        return {}

    def converter_attributes(self, node: onnx.NodeProto, constant: Callable[[str], np.ndarray | None]) -> dict[str, object]:
        """Attributes ``node`` (below opset 11) needs after ONNX's version converter to compute what it did, where
        the converter leaves defaults meaning another function (:mod:`graphprune.io.converter_semantics`)."""
        return {}

    def converter_rewrite(self, node: onnx.NodeProto, fresh: Callable[[str], str]) -> list[onnx.NodeProto] | None:
        """Nodes at the model's opset (below 11) computing what ``node`` does that the converter
        converts faithfully where it would not convert ``node`` so; ``fresh(hint)`` names a tensor."""
        return None

    def converter_unwrap(self, node: onnx.NodeProto, producer: Callable[[str], onnx.NodeProto | None],
                         readers: Callable[[str], list[onnx.NodeProto] | None],
                         rank: Callable[[str, str], int | None]
                         ) -> tuple[onnx.NodeProto, onnx.NodeProto, list[onnx.NodeProto]] | None:
        """Where ONNX's version converter wrapped ``node`` (at the new opset) in nodes that keep
        its old meaning, and the wrapping changes nothing here: ``(last, replacement, dead)``,
        the node written in place of the wrapping's last node and the nodes left unread
        (:func:`graphprune.io.converter_semantics.unwrap_flattened`). ``producer(name)``: the
        node making a tensor; ``readers(name)``: the nodes reading it (``None``: a graph
        output); ``rank(x, shape_of_x)``: ``x``'s rank, where known. ``None`` (the default):
        nothing to undo."""
        return None

    def carries_values(self, node: gs.Node) -> tuple[int, ...]:
        """Inputs whose values output 0 holds unchanged, only moved or cast (a ``Reshape``,
        ``Unsqueeze``, ``Cast``): an index bound found past the node applies to them.
        Default: input 0 of data movement (``zero_behaviour == "move"``), every input of a
        concatenation; nothing for other ops."""
        if self.zero_behaviour != "move" or not node.inputs:
            return ()
        return tuple(range(len(node.inputs))) if self.concat_axis(node) is not None else (0,)

    def unfolded_inputs(self, node: gs.Node) -> tuple[int, ...]:
        """Constant inputs that constant folding must not fold through this node (an int8
        weight cast to float: folding would store it as float, 4x the bytes)."""
        return ()

    def parameter_inputs(self, node: gs.Node) -> tuple[int, ...]:
        """Inputs that hold learned parameters (weights, biases, norm scale and shift; not
        running statistics): what a (group-sparse) optimiser drives to zero. Default: a
        linear layer's weight and bias (:meth:`linear`), nothing for other ops."""
        info = self.linear(node)
        if info is None:
            return ()
        return (info.weight,) if info.bias is None else (info.weight, info.bias)

    def packed_parameters(self, attrs: dict, present: Sequence[bool]) -> dict[int, int]:
        """Constant inputs whose parameter count is not their element count (a 4-bit weight,
        two to a byte), as input index -> parameters held, for the node's attributes ``attrs``
        and which inputs are ``present``. An input may be counted with another (0 here, its
        count in the other's): a budget then shrinks it with that one. Default: none."""
        return {}

    def attribute_parameters(self, attrs: dict) -> int:
        """Learned values the node stores in its attributes (``attrs``: name -> value), not in
        constants: a scikit-learn model's coefficients in an ONNX-ML ``LinearClassifier``.
        Default: none."""
        return 0

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """Multiply-accumulates of one run (``shape(tensor)``: static dims, unknown ones as 1;
        ``None`` when not known). ``None`` (the default): not counted."""
        return None

    def propagate_rms(self, node: gs.Node, ctx: ScaleContext) -> np.ndarray | list[np.ndarray] | None:
        """Per-channel RMS of output 0 (every output gets it), or a list with one per output,
        from the inputs' estimates (``ctx.of(tensor, size)``; see :mod:`graphprune.rules.scale`).
        ``None`` (the default): unknown, and the caller passes input 0's estimate through."""
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


def overriding_rule(domain: str, op_type: str, opset: int, method: str) -> OpRule | None:
    """The op's rule when it overrides ``OpRule.<method>`` (it has something to say there),
    else ``None``: cheap scans of a model ask only these rules."""
    rule = lookup(domain, op_type, opset)
    if rule is None or getattr(type(rule), method) is getattr(OpRule, method):
        return None
    return rule


def packing_rule(domain: str, op_type: str, opset: int) -> OpRule | None:
    """The rule of an op whose constants may pack several parameters to an element (it
    overrides :meth:`OpRule.packed_parameters`), else ``None``: parameter counts ask only these."""
    return overriding_rule(domain, op_type, opset, "packed_parameters")


def stored_weight_of(tensor: gs.Tensor, opset: int) -> StoredWeight | None:
    """``tensor`` as a weight decoded from constants by the one node that computes it and
    read by one node only (``None``: it is not, or its producer's rule does not say)."""
    if len(tensor.inputs) != 1 or len(tensor.outputs) != 1:  # a constant has no producer
        return None
    producer = tensor.inputs[0]
    rule = lookup(producer.domain or "", producer.op, opset)
    return rule.stored_weight(producer, opset) if rule is not None else None


def shape_rules() -> dict[str, OpRule]:
    """op type -> the rule that gives its output shapes (:meth:`OpRule.output_shape`,
    :meth:`OpRule.output_shapes`)."""
    return {op: rule for (_, op), rules in _RULES.items() for rule in rules
            if type(rule).output_shape is not OpRule.output_shape
            or type(rule).output_shapes is not OpRule.output_shapes}


def registered_ops() -> list[str]:
    """Every op type with a rule, ``domain::op`` outside the default domain, sorted."""
    return sorted(f"{d + '::' if d else ''}{op}" for d, op in _RULES)


def discover(package: str, path: Iterable[str]) -> tuple[str, ...]:
    """Import every module of ``package`` (found on ``path``), so that its ``@register``
    decorators run; return the module names, in the (sorted) order they were imported.

    ``graphprune.rules`` calls this on itself: a new file under ``rules/`` is registered
    without being listed anywhere. Names starting with ``_`` are skipped. A module that
    extends another rule imports it itself, so the order never matters.
    """
    names = sorted(
        info.name for info in pkgutil.iter_modules(list(path)) if not info.name.startswith("_")
    )
    for name in names:
        importlib.import_module(f"{package}.{name}")
    return tuple(f"{package}.{name}" for name in names)


def weight_size(tensor: gs.Tensor | None, axis: int) -> int | None:
    """The size of a stored weight's ``axis`` (``None``: not a constant, or not sized there):
    what :meth:`OpRule.required_sizes` reads a layer's input width from."""
    import numbers

    import onnx_graphsurgeon as gs  # noqa: PLC0415 (the registry imports no graph library at load)

    shape = tensor.shape if isinstance(tensor, gs.Constant) else None
    if shape is None or not -len(shape) <= axis < len(shape):
        return None
    size = shape[axis]
    return int(size) if isinstance(size, numbers.Integral) and size > 0 else None
