"""Residual-stream targets of the refit (ZipLM / SlimGPT style).

A linear layer whose output, after per-channel constants (its bias), is added to a residual
stream ``r`` (``s = W x + c + r``: the attention output projection and the second MLP
layer of a transformer block, the last conv of a ResNet block) can compensate not only its
own input change but also the drift that earlier layers left on ``r``: its refit target
is then ``s_original - r_pruned - c`` instead of the original layer output, so that the
stream after the block, which every later layer reads, matches the original's.

The chain is found through the rule registry only: an *addition* is a two-input node whose
both operands are neutral at 0 (``OpRule.neutral_operand``); per-channel constants on the
way are summed into ``offset``. Anything else (several readers, a constant that is not
per-channel, the stream changing in the same wave) keeps the plain layer target.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.calibration.linear import LinearView
from graphprune.io.tensors import from_constants

#: constant additions followed from the layer output to the residual addition
MAX_CHAIN = 3


@dataclass
class Residual:
    #: the residual operand ``r`` (read from the pruned model)
    stream: str
    #: the sum ``s`` (read from the original model)
    total: str
    #: per-channel constant added on the way (size ``C`` or 1)
    offset: np.ndarray
    #: the sum is normalised per position over its channels (LayerNorm: ``True``, centred;
    #: RMSNorm: ``False``); ``None``: it is not
    normalised: bool | None = None

    def row_weights(self, total: np.ndarray) -> np.ndarray | None:
        """Weights of the rows (positions) of the original sum ``total`` (``[R, C]``) that
        make the squared error of the fit the error after the normalisation: an error
        ``d`` of the sum reaches a LayerNorm's output as ``d / sigma`` (``sigma``: the
        position's standard deviation), so the rows of large-norm positions (a transformer's
        outlier tokens) do not dominate the fit."""
        if self.normalised is None:
            return None
        total = np.asarray(total, dtype=np.promote_types(total.dtype, np.float32))  # no float16 overflow
        spread = total.var(axis=1) if self.normalised else np.square(total).mean(axis=1)
        spread = np.maximum(spread.astype(np.float64), 1e-6 * max(float(np.median(spread)), 1e-30))
        return 1.0 / spread


def is_addition(node: gs.Node, opset: int) -> bool:
    from graphprune.rules import registry

    rule = registry.lookup(node.domain or "", node.op, opset)
    if rule is None or len(node.inputs) != 2 or len(node.outputs) != 1:
        return False
    return rule.neutral_operand(node, 0) == 0.0 and rule.neutral_operand(node, 1) == 0.0


def per_channel(view: LinearView, value: np.ndarray) -> np.ndarray | None:
    """``value`` as a per-output-channel vector when it broadcasts that way, else ``None``."""
    value = np.asarray(value, dtype=np.float64)
    channels = view.out_channels()
    if value.size == 1:
        return value.reshape(1)
    trailing = (len(np.shape(view.weight.values)) - 2) if view.is_conv else 0
    shape = list(value.shape)
    if len(shape) < trailing + 1 or any(d != 1 for d in shape[len(shape) - trailing :]):
        return None
    lead = shape[: len(shape) - trailing]
    if lead[-1] != channels or any(d != 1 for d in lead[:-1]):
        return None
    return value.reshape(channels)


def residual_of(view: LinearView, opset: int) -> Residual | None:
    """The residual addition after ``view``'s layer, if there is one."""
    tensor = view.output
    offset = np.zeros(1)
    for _ in range(MAX_CHAIN + 1):
        readers = list(tensor.outputs)
        if len(readers) != 1 or not is_addition(readers[0], opset):
            return None
        node = readers[0]
        other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
        if other is tensor:
            return None
        if isinstance(other, gs.Constant):
            channel = per_channel(view, other.values)
            if channel is None:
                return None
            offset = offset + channel
            tensor = node.outputs[0]
            continue
        if not other.name or from_constants(other):
            return None  # a bias the graph computes from constants is no residual stream
        if _broadcasts(other, node.outputs[0]):
            return None  # one row for many (position embeddings [1, T, C]): rows do not align
        return Residual(other.name, node.outputs[0].name, offset, _normalised(view, node.outputs[0], opset))
    return None


def _broadcasts(operand: gs.Tensor, total: gs.Tensor) -> bool:
    """Does ``operand`` broadcast in the sum ``total`` (a size-1 or missing axis where the sum
    has more)? Unknown shapes say no: the refit checks the sizes it reads as well."""
    if operand.shape is None or total.shape is None:
        return False
    if len(operand.shape) != len(total.shape):
        return True
    return any(a == 1 and b != 1 for a, b in zip(operand.shape, total.shape, strict=True))


def _normalised(view: LinearView, total: gs.Tensor, opset: int) -> bool | None:
    """Whether the sum's one reader normalises it per position over the layer's output
    channels (the last axis), centred or not (see :attr:`Residual.normalised`)."""
    from graphprune.rules import registry

    readers = list(total.outputs)
    if view.is_conv or len(readers) != 1 or readers[0].inputs[0] is not total:
        return None
    rule = registry.lookup(readers[0].domain or "", readers[0].op, opset)
    found = rule.normalisation(readers[0]) if rule is not None else None
    if found is None:
        return None
    axis, centred = found
    rank = len(total.shape) if total.shape is not None else None
    if axis != -1 and (rank is None or axis % rank != rank - 1):
        return None
    return centred
