"""What unary ops compute, as the rules of :mod:`graphprune.rules.elementwise` read it: the
value of an op on a channel that is a constant (lossless pruning's zero analysis), and an op's
output RMS estimate from its input's (depth pruning's data-free block scores,
:mod:`graphprune.rules.scale`)."""

from __future__ import annotations

import math

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.rules.scale import halved_energy

#: unary ops with f(0) == 0
ZERO_PRESERVING_UNARY = (
    "Relu", "LeakyRelu", "Tanh", "Elu", "Selu", "Mish", "Gelu", "Erf", "Sqrt", "Neg", "Abs",
    "HardSwish", "Identity", "Dropout", "Cast", "Sign", "Ceil", "Floor", "Round", "Sin",
    "Asin", "Atan", "Sinh", "Asinh", "Atanh", "Tan", "Relu6", "Celu", "ThresholdedRelu",
    "Shrink", "Softsign", "CastLike", "Swish",
)
#: unary ops with f(0) a non-zero constant (or undefined)
CONSTANT_UNARY = (
    "Sigmoid", "HardSigmoid", "Softplus", "Exp", "Log", "Reciprocal", "Cos", "Cosh",
    "Acos", "Acosh", "Not", "IsNaN", "IsInf", "BitwiseNot",
)


def _attr(node: gs.Node, name: str, default: float) -> np.float32:
    return np.float32(node.attrs.get(name, default))


def _softplus(x: np.ndarray) -> np.ndarray:
    return np.logaddexp(np.float32(0), x)


_erf = np.vectorize(math.erf, otypes=[np.float64])


def _gelu(x: np.ndarray, node: gs.Node) -> np.ndarray:
    if node.attrs.get("approximate", "none") in ("tanh", b"tanh"):
        inner = np.float32(math.sqrt(2 / math.pi)) * (x + np.float32(0.044715) * x**3)
        return np.float32(0.5) * x * (1 + np.tanh(inner))
    return (0.5 * x * (1 + _erf(x / math.sqrt(2)))).astype(np.float32)


#: f(x) in float32, for a channel that is the constant x. Ops not listed here keep only
#: f(0) = 0 (``ZERO_PRESERVING_UNARY``) and know nothing else.
UNARY_FUNCTIONS = {
    "Relu": lambda x, n: np.maximum(x, np.float32(0)),
    "LeakyRelu": lambda x, n: np.where(x < 0, x * _attr(n, "alpha", 0.01), x),
    "Sigmoid": lambda x, n: np.float32(1) / (np.float32(1) + np.exp(-x)),
    "HardSigmoid": lambda x, n: np.clip(x * _attr(n, "alpha", 0.2) + _attr(n, "beta", 0.5), 0, 1),
    "HardSwish": lambda x, n: x * np.clip(x / np.float32(6) + np.float32(0.5), 0, 1),
    "Tanh": lambda x, n: np.tanh(x),
    "Elu": lambda x, n: np.where(x < 0, _attr(n, "alpha", 1.0) * (np.exp(x) - 1), x),
    "Selu": lambda x, n: _attr(n, "gamma", 1.05070102214813232421875) * np.where(
        x <= 0, _attr(n, "alpha", 1.67326319217681884765625) * (np.exp(x) - 1), x
    ),
    "Celu": lambda x, n: np.maximum(x, 0) + np.minimum(
        0, _attr(n, "alpha", 1.0) * (np.exp(x / _attr(n, "alpha", 1.0)) - 1)
    ),
    "Softplus": lambda x, n: _softplus(x),
    "Softsign": lambda x, n: x / (1 + np.abs(x)),
    "Mish": lambda x, n: x * np.tanh(_softplus(x)),
    "Gelu": lambda x, n: _gelu(x, n),
    "Erf": lambda x, n: _erf(x).astype(np.float32),
    "ThresholdedRelu": lambda x, n: np.where(x > _attr(n, "alpha", 1.0), x, 0),
    "Shrink": lambda x, n: np.where(
        x < -_attr(n, "lambd", 0.5), x + _attr(n, "bias", 0.0),
        np.where(x > _attr(n, "lambd", 0.5), x - _attr(n, "bias", 0.0), 0),
    ),
    "Identity": lambda x, n: x,
    "Neg": lambda x, n: -x,
    "Abs": lambda x, n: np.abs(x),
    "Exp": lambda x, n: np.exp(x),
    "Log": lambda x, n: np.log(x),
    "Sqrt": lambda x, n: np.sqrt(x),
    "Reciprocal": lambda x, n: np.float32(1) / x,
    "Sin": lambda x, n: np.sin(x),
    "Cos": lambda x, n: np.cos(x),
    "Floor": lambda x, n: np.floor(x),
    "Ceil": lambda x, n: np.ceil(x),
    "Round": lambda x, n: np.round(x),
    "Sign": lambda x, n: np.sign(x),
}


def _gate(r: np.ndarray) -> np.ndarray:
    return np.full(r.size, 0.5)


#: output RMS from the input's, per channel (data-free depth-pruning estimate): rectifiers
#: keep about half the energy of a zero-mean input, gates sit near 0.5, Tanh saturates at 1
RMS_FUNCTIONS = {
    **dict.fromkeys(
        ("Relu", "LeakyRelu", "Clip", "HardSwish", "Elu", "Selu", "Celu", "Gelu", "Mish",
         "Softplus"),
        halved_energy,
    ),
    "Sigmoid": _gate,
    "HardSigmoid": _gate,
    "Tanh": lambda r: np.minimum(r, 1.0),
    # bounded by 1: a GELU written as x * (1 + Erf(x / sqrt 2)) / 2; tf2onnx's Atan2 of a
    # rotation then Sin and Cos of it; signs
    **dict.fromkeys(("Erf", "Sin", "Cos"), lambda r: np.minimum(r, 1.0)),
    "Sign": lambda r: np.minimum(r, 1.0),
}


def constant_clip_bound(node: gs.Node) -> float | None:
    """The largest magnitude a ``Clip`` lets through (``None``: a bound is open or computed)."""
    if "min" in node.attrs or "max" in node.attrs:  # opset < 11
        lo, hi = float(node.attrs.get("min", -np.inf)), float(node.attrs.get("max", np.inf))
    else:
        values = []
        for index in (1, 2):
            t = node.inputs[index] if index < len(node.inputs) and node.inputs[index].name else None
            if t is not None and (not isinstance(t, gs.Constant) or np.size(t.values) != 1):
                return None
            values.append(None if t is None else float(np.asarray(t.values).reshape(-1)[0]))
        lo = -np.inf if values[0] is None else values[0]
        hi = np.inf if values[1] is None else values[1]
    bound = max(abs(lo), abs(hi))
    return bound if np.isfinite(bound) else None
