"""RMS scale estimates: the vocabulary of :meth:`OpRule.propagate_rms`.

Depth pruning scores a residual branch data-free by the size of what it adds: one RMS
estimate per channel is pushed through the graph from unit-RMS inputs (see
:mod:`graphprune.analysis.blocks`). Each op rule says how its output RMS follows from its
inputs' (``OpRule.propagate_rms(node, ctx)``); :class:`ScaleContext` holds the estimates
made so far and reads an input's, resized to the channel count the op needs.

The estimates assume independent, zero-mean inputs: a linear map of a channel vector with
RMS ``r`` has RMS ``sqrt(sum_i W[o, i]^2 r_i^2)``, a sum adds energies, a product
multiplies scales. They rank branches; they are not exact.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

__all__ = ["ScaleContext", "halved_energy", "rms_of"]


def halved_energy(r: np.ndarray) -> np.ndarray:
    """A rectifier's output RMS estimate: about half the energy of a zero-mean input."""
    return r / np.sqrt(2)


def rms_of(values: np.ndarray) -> float:
    """The root mean square of ``values`` (0 for an empty array)."""
    return float(np.sqrt(np.mean(np.square(values)))) if values.size else 0.0


class ScaleContext:
    """Per-channel RMS estimates by tensor name (a tensor not seen yet counts as RMS 1)."""

    def __init__(self, rms: dict[str, np.ndarray], opset: int | None = None,
                 decode: Callable[[gs.Tensor], np.ndarray | None] | None = None) -> None:
        """``opset``: the model's (rules that ask other rules); ``decode``: the float values of
        a weight a node computes from constants (``None``: not one), see :meth:`weight_values`."""
        self.rms = dict(rms)
        self.opset = opset
        self._decode = decode
        self._decoded: dict[str, np.ndarray | None] = {}

    def weight_values(self, tensor: gs.Tensor) -> np.ndarray | None:
        """The float values of a weight: a constant's, or those a node decodes from constants
        (a ``DequantizeLinear`` of an int8 weight in a QDQ model: the integers times their
        scales, not the integers); ``None`` for an activation."""
        if isinstance(tensor, gs.Constant):
            return np.asarray(tensor.values)
        if self._decode is None or len(tensor.inputs) != 1:
            return None
        if tensor.name not in self._decoded:
            values = self._decode(tensor)
            shape = tensor.shape
            if values is not None and shape is not None and (len(shape) != values.ndim or any(
                    isinstance(d, int) and d != v for d, v in zip(shape, values.shape, strict=True))):
                values = None
            self._decoded[tensor.name] = values
        return self._decoded[tensor.name]

    def of(self, tensor: gs.Tensor, size: int | None = None) -> np.ndarray:
        """The per-channel RMS of ``tensor``; with ``size``, a vector of that length.

        A constant, or a weight decoded from constants (:meth:`weight_values`), gives its
        absolute values when they are ``size`` channels, else its RMS; an estimate of another
        length is replaced by its overall RMS, repeated ``size`` times.
        """
        weight = self.weight_values(tensor)
        if weight is not None:
            values = np.abs(np.asarray(weight, dtype=np.float64))
            if size is not None and values.ndim >= 1 and values.size == size:
                return values.reshape(-1)
            return np.array([rms_of(values.reshape(-1))])
        estimate = self.rms.get(tensor.name, np.ones(1))
        if size is not None and estimate.size != size:
            return np.full(size, rms_of(estimate))
        return estimate

    @staticmethod
    def resized(vectors: list[np.ndarray]) -> list[np.ndarray]:
        """The vectors at the longest one's length (others replaced by their repeated RMS)."""
        n = max(v.size for v in vectors)
        return [v if v.size == n else np.full(n, rms_of(v)) for v in vectors]
