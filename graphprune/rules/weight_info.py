"""What a rule says about how an op uses its weights: the descriptors the calibration, the
refit and the scale propagation read (:class:`LinearInfo` of a linear op, :class:`RecurrentInfo`
of a fused recurrent op, :class:`StoredWeight` of a weight decoded from constant inputs,
:class:`PairSummed`, :class:`RescaledLinear`). Rules return them from the hooks of
:class:`graphprune.rules.registry.OpRule`, which re-exports them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import onnx_graphsurgeon as gs


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


@dataclass(frozen=True)
class RecurrentInfo:
    """A fused recurrent op (ONNX ``LSTM``, ``GRU``, ``RNN``) in ONNX's layout, for the
    calibration (:mod:`graphprune.calibration.recurrent`). Inputs are ONNX's: ``X`` 0 (``[seq,
    batch, input]``), ``W`` 1 (``[dirs, gates*hidden, input]``), ``R`` 2 (``[dirs,
    gates*hidden, hidden]``), ``B`` 3 (``[dirs, 2*gates*hidden]``: ``Wb`` then ``Rb``); output
    ``Y`` 0 (``[seq, dirs, batch, hidden]``). Every gate reads the step's input through
    ``W x_t + Wb``, a linear layer applied at every step, whatever the gate's activation and
    whatever it reads of the previous state. ``not_refit``: why a refit cannot rewrite that
    projection (empty: it can)."""

    gates: int
    hidden: int
    not_refit: str = ""
    #: ``W`` and ``R`` where they are float constants (``None``: computed in the graph)
    input_weight: gs.Constant | None = None
    recurrence: gs.Constant | None = None
    #: ``W`` and ``R`` decoded from the constants an integer layer stores (in ONNX's layout;
    #: then ``input_weight`` and ``recurrence`` are ``None``)
    stored_input: StoredWeight | None = None
    stored_recurrence: StoredWeight | None = None
    #: per direction, whether it runs backwards (its previous state is the next step's)
    reverse: tuple[bool, ...] = (False,)
    #: the gates whose rows of ``R`` read the previous state itself (``None``: all of them;
    #: a GRU with ``linear_before_reset`` 0 reads ``r * h`` in its third gate)
    state_gates: tuple[int, ...] | None = None


class StoredWeight:
    """A float weight that a node decodes from constant inputs (a dequantized integer weight,
    :meth:`OpRule.stored_weight`). ``constant`` holds the stored values: the tensor that
    pruning slices and that a refit rewrites."""

    constant: gs.Constant
    #: input channels per index of the stored weight's input axis (a packed weight that is
    #: cut a block of inputs at a time: its block size)
    in_block: int = 1

    @property
    def dtype(self) -> np.dtype:
        """The float dtype of the decoded weight."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, ...]:
        """The decoded weight's shape (``constant``'s unless the values are packed)."""
        return tuple(self.constant.shape)

    def constants(self) -> list[gs.Constant]:
        """Every constant :meth:`encode` may rewrite (so that a caller can restore them)."""
        return [self.constant]

    def axis_of(self, axis: int) -> int:
        """The axis of :attr:`constant` that axis ``axis`` of the decoded weight reads."""
        return axis

    def decode(self) -> np.ndarray:
        """The float weight (:attr:`shape`)."""
        raise NotImplementedError

    def encode_fit(self, values: np.ndarray, gram: np.ndarray | None,
                   in_axis: int | None = None) -> tuple[float, np.ndarray | None]:
        """Store ``values`` fitted by least squares under the input second moments ``gram``
        (``[K, K]`` of a dense layer whose input channels are axis ``in_axis`` of ``values``;
        ``None``: unknown). The default rounds like
        :meth:`encode` with ``grow``; an encoding with few levels may spread each element's
        rounding error over the elements not rounded yet (:mod:`graphprune.io.block_quant`)."""
        return self.encode(values, grow=True)

    def encode(self, values: np.ndarray, grow: bool = False) -> tuple[float, np.ndarray | None]:
        """Store float ``values`` (``constant``'s shape) as near as the encoding allows.
        With ``grow``, an encoding step (a quantization scale) that this weight alone uses
        may grow so that the values fit its range. Returns the share of elements clipped to
        the range and the factor each step grew by (``None``: no step changed)."""
        raise NotImplementedError

    def rescale(self, factor: np.ndarray) -> bool:
        """Multiply the encoding step by ``factor`` (what :meth:`encode` returned for the
        weight whose step this one is derived from: a bias quantized with the product of
        the input's and the weight's scale), keeping the values. ``False``: it cannot."""
        return False


@dataclass
class PairSummed:
    """The constants of an integer kernel that ONNX Runtime's x86 u8 x s8 code computes by
    adding the products of adjacent input channels in saturating 16-bit arithmetic
    (:meth:`OpRule.pair_summed`): its int8 ``weight`` (zero point 0), the float ``scale`` its
    result is rescaled with, and an int32 ``bias`` whose step is that scale times the input's."""

    weight: gs.Constant
    scale: gs.Constant
    bias: gs.Constant | None = None


@dataclass
class RescaledLinear:
    """An integer linear op as the float layer it stands for (:meth:`OpRule.rescaled_linear`):
    it reads the tensor ``data``, applies ``weight`` (an integer constant decoded as a
    :class:`StoredWeight`) as ``info`` says, and ``output`` is the tensor that carries the
    result. ``data`` is a float tensor the graph quantizes at run time, or an integer
    activation read as the float ``(q - zero_point) * scale`` (``data_decoding``); likewise
    ``output`` (``output_decoding``: the op requantizes its result)."""

    info: LinearInfo
    data: gs.Tensor
    output: gs.Tensor
    weight: StoredWeight
    #: a float bias constant that the graph quantizes at run time and adds in the integer
    #: domain (``None``: none inside the pattern)
    bias: gs.Constant | None = None
    #: ``(scale, zero_point)`` of an integer ``data`` / ``output`` (``None``: a float tensor)
    data_decoding: tuple[float, float] | None = None
    output_decoding: tuple[float, float] | None = None
    #: the bias input ``info.bias`` as a stored (integer) weight; its constant may not be an
    #: input yet (a layer without a bias: the first bias written attaches it)
    bias_stored: StoredWeight | None = None
    #: a stored bias added to the op's result by the node that produces ``output`` (a
    #: ``QLinearAdd`` of an integer constant), read and written with its own encoding
    bias_after: StoredWeight | None = None
    #: the layer has no bias and none can be given to it (its output is an integer tensor
    #: read as it is): a refit keeps the bias at zero, a bias compensation skips it
    bias_fixed: bool = False
    #: ``output``'s quantization reads no negative value (its zero point at the integer type's
    #: minimum: a ``ReLU`` folded into it, :func:`~graphprune.rules.quantize.clips_at_zero`)
    rectified: bool = False
