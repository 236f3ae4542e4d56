"""ONNX Runtime's fused kernels, as the standard ops they fuse.

A model saved by ONNX Runtime after its extended graph optimisations
(``SessionOptions.optimized_model_filepath``: many published ``*.opt.onnx`` files) replaces
ordinary layers with kernels of the ``com.microsoft`` domain:

* ``FusedConv``: ``act(Conv(X, W, B) + Z)``, the activation named by ``activation`` with its
  ``activation_params`` (Relu, Sigmoid, Tanh, LeakyRelu ``[alpha]``, Clip ``[min, max]``,
  HardSigmoid ``[alpha, beta]``), ``Z`` an optional tensor added before it;
* ``FusedGemm``: ``act(Gemm(A, B, C))``, the activation's attributes prefixed ``activation_``;
* ``FusedMatMul``: ``alpha * op(A) @ op(B)``, ``op`` transposing the last two axes where
  ``transA`` / ``transB`` say so.

ONNX shape inference knows none of them, so every group behind one froze ("coupled with an
axis of unknown rank") and the criteria and the refit, which read linear layers, never saw
the layer inside. :meth:`lowered` writes each as the standard ops; the prepared model is
lowered before the analysis (:func:`graphprune.io.lowering.lower_fused`), and ONNX Runtime
fuses them again when it loads the pruned model. Where an instance has no standard form here
(an activation not listed, ``transBatchA``, an operand of unknown rank or type), it stays and
its groups freeze with the reason.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import TYPE_CHECKING

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis.constants import conv_geometry
from graphprune.rules.registry import OpRule, register

if TYPE_CHECKING:
    from graphprune.analysis.coupling import CouplingContext

MS = "com.microsoft"

#: FusedConv's activations: the standard op and the attributes its ``activation_params`` give
CONV_ACTIVATIONS: dict[str, tuple[str, ...]] = {
    "Relu": (), "Sigmoid": (), "Tanh": (), "LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta"),
    "Clip": ("min", "max"),
}
#: FusedGemm's activations (ONNX Runtime copies the activation node's attributes, prefixed)
GEMM_ACTIVATIONS = frozenset({
    "Relu", "Sigmoid", "Tanh", "LeakyRelu", "HardSigmoid", "Elu", "Selu", "Softplus", "Softsign",
    "ThresholdedRelu",
})


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _intermediate(node: gs.Node, suffix: str) -> gs.Variable:
    y = node.outputs[0]
    return gs.Variable(f"{y.name}__gp_{suffix}", dtype=_numpy_dtype(node))


def _numpy_dtype(node: gs.Node) -> np.dtype | None:
    """The element type of the fused node's output (its inputs', the weight's among them:
    ONNX inference does not know the op, so the output and what another fused kernel wrote
    often have none)."""
    for tensor in (node.outputs[0], *node.inputs):
        try:
            if tensor.dtype is not None:
                return np.dtype(tensor.dtype)
        except TypeError:
            return None
    return None


def _activation(node: gs.Node, op: str, attrs: dict, x: gs.Tensor, opset: int) -> gs.Node:
    """The activation node writing the fused node's output (``Clip``'s bounds as inputs from
    opset 11 on, in the output's element type: :func:`_needs_dtype`)."""
    y = node.outputs[0]
    if op == "Clip" and opset >= 11:
        bounds = [gs.Constant(f"{node.name}__gp_clip_{k}", np.array(attrs[k], dtype=_numpy_dtype(node)))
                  for k in ("min", "max")]
        return gs.Node("Clip", f"{node.name}/activation", inputs=[x, *bounds], outputs=[y])
    return gs.Node(op, f"{node.name}/activation", attrs=attrs, inputs=[x], outputs=[y])


def _broadcast(x: object, y: object) -> object:
    """One broadcast axis: a size of 1 gives way; an unknown size gives way to a known one."""
    if x == 1 or (not isinstance(x, int) and isinstance(y, int) and y != 1):
        return y
    return x


def _needs_dtype(op: str, opset: int) -> bool:
    return op == "Clip" and opset >= 11


class _FusedRule(OpRule):
    """A fused kernel: lowered before the analysis (:meth:`lowered`); one that stays freezes."""

    domain = MS

    def unlowered(self, node: gs.Node) -> str:
        return f"with activation '{_text(node.attrs.get('activation', ''))}' has no standard form here"

    def couple(self, node: gs.Node, ctx: CouplingContext) -> None:
        ctx.freeze_node(node, f"{node.op} '{node.name}' {self.unlowered(node)}")


@register
class FusedConvRule(_FusedRule):
    op_types = ("FusedConv",)

    def lowered(self, node: gs.Node, opset: int) -> list[gs.Node] | None:
        act = _text(node.attrs.get("activation", ""))
        names = CONV_ACTIVATIONS.get(act)
        params = [float(p) for p in node.attrs.get("activation_params", [])]
        if names is None or len(params) < len(names) and act != "LeakyRelu":
            return None
        if _needs_dtype(act, opset) and _numpy_dtype(node) is None:
            return None  # every check before the first node is built: nodes attach to tensors
        attrs = dict(zip(names, params, strict=False))
        if act == "LeakyRelu":
            attrs.setdefault("alpha", 0.01)
        conv_attrs = {k: v for k, v in node.attrs.items() if k not in ("activation", "activation_params")}
        inputs = list(node.inputs[:3])
        z = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        pre = _intermediate(node, "conv")
        nodes = [gs.Node("Conv", node.name, attrs=conv_attrs, inputs=inputs, outputs=[pre])]
        if z is not None:
            summed = _intermediate(node, "sum")
            nodes.append(gs.Node("Add", f"{node.name}/add", inputs=[pre, z], outputs=[summed]))
            pre = summed
        return [*nodes, _activation(node, act, attrs, pre, opset)]

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        """``[N, W[0], spatial...]``, the spatial sizes by the conv's geometry."""
        x, w = shapes[0], shapes[1] if len(shapes) > 1 else None
        if not x or not w or len(x) != len(w) or len(x) < 3:
            return None
        sizes = [*x[2:], *w[2:]]
        spatial = (list(conv_geometry(attrs, w[2:], x[2:])[3]) if all(isinstance(d, int) for d in sizes)
                   else [None] * (len(x) - 2))
        return [x[0], w[0], *spatial], 0

    def macs(self, node: gs.Node, shape: Callable[[gs.Tensor], list[int] | None]) -> int | None:
        """As the Conv it stands for (a file ONNX Runtime saved, counted before its lowering:
        MarbleNet's six FusedConv counted 0)."""
        w, y = shape(node.inputs[1]), shape(node.outputs[0])
        if w is None or y is None:
            return None
        return math.prod(y) * math.prod(w[1:])



@register
class FusedGemmRule(_FusedRule):
    op_types = ("FusedGemm",)

    def lowered(self, node: gs.Node, opset: int) -> list[gs.Node] | None:
        act = _text(node.attrs.get("activation", ""))
        if act not in GEMM_ACTIVATIONS:
            return None
        prefix = "activation_"
        attrs = {k[len(prefix):]: float(v) for k, v in node.attrs.items()
                 if k.startswith(prefix) and k != "activation"}
        gemm_attrs = {k: v for k, v in node.attrs.items() if not k.startswith("activation")}
        pre = _intermediate(node, "gemm")
        gemm = gs.Node("Gemm", node.name, attrs=gemm_attrs, inputs=list(node.inputs), outputs=[pre])
        return [gemm, _activation(node, act, attrs, pre, opset)]

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        """``[M, N]``."""
        a, b = shapes[0], shapes[1] if len(shapes) > 1 else None
        if not a or not b or len(a) != 2 or len(b) != 2:
            return None
        m = a[1] if int(attrs.get("transA", 0)) else a[0]
        return [m, b[0] if int(attrs.get("transB", 0)) else b[1]], 0



@register
class FusedMatMulRule(_FusedRule):
    op_types = ("FusedMatMul",)

    def lowered(self, node: gs.Node, opset: int) -> list[gs.Node] | None:
        if int(node.attrs.get("transBatchA", 0)) or int(node.attrs.get("transBatchB", 0)):
            return None
        alpha = float(node.attrs.get("alpha", 1.0))
        y = node.outputs[0]
        flags = [bool(int(node.attrs.get(flag, 0))) for flag in ("transA", "transB")]
        ranks = [len(t.shape) if t.shape is not None else 0 for t in node.inputs[:2]]
        if (alpha != 1.0 and _numpy_dtype(node) is None) or any(f and r < 2 for f, r in zip(flags, ranks, strict=True)):
            return None  # every check before the first node is built: nodes attach to tensors
        nodes: list[gs.Node] = []
        operands = []
        for index, (t, flag, rank) in enumerate(zip(node.inputs[:2], flags, ranks, strict=True)):
            if not flag:
                operands.append(t)
                continue
            perm = [*range(rank - 2), rank - 1, rank - 2]
            out = gs.Variable(f"{t.name}__gp_T_{node.name}", dtype=t.dtype)
            nodes.append(gs.Node("Transpose", f"{node.name}/transpose_{index}", attrs={"perm": perm},
                                 inputs=[t], outputs=[out]))
            operands.append(out)
        if alpha == 1.0:
            return [*nodes, gs.Node("MatMul", node.name, inputs=operands, outputs=[y])]
        pre = _intermediate(node, "matmul")
        scale = gs.Constant(f"{node.name}__gp_alpha", np.array(alpha, dtype=_numpy_dtype(node)))
        return [*nodes, gs.Node("MatMul", node.name, inputs=operands, outputs=[pre]),
                gs.Node("Mul", f"{node.name}/alpha", inputs=[pre, scale], outputs=[y])]

    def output_shape(self, op: str, attrs: dict, shapes: list[list | None]) -> tuple[list, int] | None:
        """The batch axes broadcast, then ``[M, N]`` of the (transposed) operands."""
        a, b = shapes[0], shapes[1] if len(shapes) > 1 else None
        if (not a or not b or len(a) < 2 or len(b) < 2 or int(attrs.get("transBatchA", 0))
                or int(attrs.get("transBatchB", 0))):
            return None
        m = a[-1] if int(attrs.get("transA", 0)) else a[-2]
        n = b[-2] if int(attrs.get("transB", 0)) else b[-1]
        batch_a, batch_b = list(a[:-2]), list(b[:-2])
        rank = max(len(batch_a), len(batch_b))
        batch_a, batch_b = [1] * (rank - len(batch_a)) + batch_a, [1] * (rank - len(batch_b)) + batch_b
        return [_broadcast(x, y) for x, y in zip(batch_a, batch_b, strict=True)] + [m, n], 0

    def unlowered(self, node: gs.Node) -> str:
        return "(batch transposes, or an operand of unknown rank or type) has no standard form here"
