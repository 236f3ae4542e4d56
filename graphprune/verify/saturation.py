"""Comparing integer models free of ONNX Runtime's saturating pair sums.

ONNX Runtime's x86 kernels for u8 activations x s8 weights (``QLinearConv``, ``QLinearMatMul``,
``QGemm``, ``ConvInteger``, ``MatMulInteger``, ``DynamicQuantizeLSTM``: rules whose :meth:`OpRule.pair_summed` finds
the kernel's constants) multiply adjacent input channels in pairs and add each pair in
saturating 16-bit arithmetic (``vpmaddubsw``; CPUs with VNNI do not). Removing a channel
re-pairs the channels after it, so a pruned model and the original with that channel zeroed can
differ wherever a pair sum saturated — by many quantization steps after a few layers, although
both compute the same function in ONNX's exact integer semantics.

The structural check compares *copies* of both models whose int8 weights are halved (their
scales doubled, an int32 bias halved with them): products of a u8 and a 7-bit weight cannot
saturate a pair sum (2 x 255 x 64 < 32,767), so the two copies agree when the rewrite is right,
on any CPU. The copies compute a slightly different function than the models (each weight
rounded to 7 bits); what they check is that pruning equals zeroing. The pruned model itself
still loads and runs, as deployed (:func:`graphprune.verify.validate.compare`).
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.io import gs_export
from graphprune.io.ir import default_opset
from graphprune.rules.registry import OpRule, lookup

#: how each kind of tensor changes in the copies
WEIGHT, SCALE, BIAS = "weight", "scale", "bias"


def _kernels(graph: gs.Graph, opset: int) -> list:
    found = []
    for node in graph.nodes:
        rule = lookup(node.domain or "", node.op, opset)
        kernel = rule.pair_summed(node) if rule is not None else None
        if kernel is not None:
            found.extend(kernel if isinstance(kernel, tuple) else (kernel,))
    return found


def may_saturate(model: onnx.ModelProto) -> bool:
    """Whether ``model`` (a skeleton will do) has an op whose rule knows pair-summing kernels
    (a cheap test before loading the weights)."""
    opset = default_opset(model)
    for node in model.graph.node:
        rule = lookup(node.domain or "", node.op_type, opset)
        if rule is not None and type(rule).pair_summed is not OpRule.pair_summed:
            return True
    return False


def paired_tensors(model: onnx.ModelProto) -> dict[str, str]:
    """Constant name -> kind (``weight``, ``scale``, ``bias``) of the int8 weights of the
    kernels that saturate pair sums on u8 activations, with their scales and int32 biases.
    A constant that any node outside those kernels reads as well is left out with every
    kernel that names it (those kernels then keep their weights: the copies stay equivalent to
    each other, only those kernels are not protected). One weight may serve several kernels
    (an unrolled decoder's recurrence, read once per step): each kernel's reader of it (the
    kernel itself, or for a scale its rescaling) counts, and every reader must be one."""
    graph = gs_export.import_onnx(model)
    kernels = _kernels(graph, default_opset(model))
    named: dict[str, set[str]] = {}
    counts: dict[str, int] = {}
    readers: dict[str, int] = {}
    for kernel in kernels:
        for kind, constant in ((WEIGHT, kernel.weight), (SCALE, kernel.scale), (BIAS, kernel.bias)):
            if constant is not None:
                named.setdefault(constant.name, set()).add(kind)
                counts[constant.name] = counts.get(constant.name, 0) + 1
                readers[constant.name] = len(constant.outputs)
    found: dict[str, str] = {}
    for kernel in kernels:
        constants = [(WEIGHT, kernel.weight), (SCALE, kernel.scale), (BIAS, kernel.bias)]
        if all(c is None or (len(named[c.name]) == 1 and counts[c.name] == readers[c.name]) for _, c in constants):
            found.update((c.name, kind) for kind, c in constants if c is not None)
    return found


def halve(kind: str, values: np.ndarray) -> np.ndarray:
    """A tensor of ``kind`` as the copies hold it (see the module docstring)."""
    array = np.asarray(values)
    if kind == SCALE:
        return (array * 2).astype(array.dtype)
    return np.rint(array.astype(np.float64) / 2).astype(array.dtype)


def pair_safe_copy(model: onnx.ModelProto, tensors: dict[str, str]) -> onnx.ModelProto:
    """``model`` (weights loaded) with ``tensors`` halved (:func:`halve`): initializers and
    ``Constant`` nodes alike."""
    from onnx import numpy_helper

    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    for init in copy.graph.initializer:
        kind = tensors.get(init.name)
        if kind is not None:
            init.CopyFrom(numpy_helper.from_array(halve(kind, numpy_helper.to_array(init)), init.name))
    for node in copy.graph.node:
        if node.op_type == "Constant" and node.output[0] in tensors:
            for attr in node.attribute:
                if attr.name == "value":
                    attr.t.CopyFrom(numpy_helper.from_array(
                        halve(tensors[node.output[0]], numpy_helper.to_array(attr.t)), node.output[0]))
    return copy
