"""Writing a linear layer's bias after a refit or a compensation.

The effective bias of a layer (:meth:`LinearView.bias_values`) goes where the layer keeps it:
its bias input (a fresh float constant, or a stored quantized bias re-encoded in place), a float
bias the graph quantizes at run time (:attr:`LinearView.bias_constant`), the constant of the
exporter's bias ``Add`` right after a bias-less ``MatMul``, or else a new ``Add``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.calibration.linear import LinearView
from graphprune.io.names import fresh_name


def write_bias(graph: gs.Graph, view: LinearView, bias: np.ndarray, names: set[str]) -> bool:
    """Give ``view``'s layer the effective bias ``bias`` (creating the input, or an ``Add``
    after a MatMul, when the layer has none). A float bias constant is always a fresh one; a
    stored (quantized) bias that only this layer reads is re-encoded in place. ``False``: the
    layer can take no bias (:attr:`LinearView.bias_fixed`), nothing was written."""
    if view.bias_fixed:
        return False
    node, info = view.node, view.info
    dtype = view.dtype
    if view.bias_after is not None:  # an integer constant added after the layer (QLinearAdd)
        after = view.bias_after
        after.encode(np.asarray(bias).reshape(np.shape(after.constant.values)), grow=True)
        return True
    stored = view.bias_stored
    attached = stored is not None and info.bias is not None and info.bias < len(node.inputs) \
        and node.inputs[info.bias] is stored.constant
    decoded = stored is not None and info.bias is not None and _decoded_for(node, info.bias, stored.constant)
    if stored is not None and info.bias is not None and (not stored.constant.outputs or decoded
                                                         or (attached and len(stored.constant.outputs) == 1)):
        stored.encode(np.asarray(bias / (info.beta if info.beta != 0.0 else 1.0)).reshape(np.shape(stored.constant.values)))
        if info.beta == 0.0:
            node.attrs["beta"] = 1.0
        if not attached and not decoded:  # a stored bias the layer did not have yet (an int32 QLinearConv bias)
            while len(node.inputs) <= info.bias:
                node.inputs.append(gs.Variable.empty())
            node.inputs[info.bias] = stored.constant
        return True
    if view.bias_constant is not None:  # a float bias the graph quantizes at run time
        const = view.bias_constant
        const.values = np.ascontiguousarray(np.asarray(bias).reshape(np.shape(const.values)).astype(const.values.dtype))
        return True
    if info.bias is None and _add_to_next_bias(view, bias):
        return True
    if info.bias is None:  # MatMul: y = x W, then + b in a new Add (a conv: per channel, axis 1)
        out = view.output
        producer = out.inputs[0]
        inner = gs.Variable(fresh_name(f"{out.name}_gp_unbiased", names), dtype=out.dtype)
        if view.is_conv:
            bias = bias.reshape(-1, *([1] * (len(np.shape(view.weight.values)) - 2)))
        const = gs.Constant(fresh_name(f"{node.name}_gp_bias", names), np.ascontiguousarray(bias.astype(dtype)))
        producer.outputs[producer.outputs.index(out)] = inner
        graph.nodes.append(gs.Node("Add", fresh_name(f"{node.name}_gp_bias_add", names), inputs=[inner, const], outputs=[out]))
        return True
    beta = info.beta if info.beta != 0.0 else 1.0
    if info.beta == 0.0:
        node.attrs["beta"] = 1.0
    const = _quantized_bias(graph, view, bias / beta, names) or gs.Constant(
        fresh_name(f"{node.name}_gp_bias", names), np.ascontiguousarray((bias / beta).astype(dtype)))
    while len(node.inputs) <= info.bias:
        node.inputs.append(gs.Variable.empty())
    node.inputs[info.bias] = const
    return True


def _quantized_bias(graph: gs.Graph, view: LinearView, bias: np.ndarray, names: set[str]) -> gs.Variable | None:
    """A new bias for a QDQ layer (input and weight each read through a ``DequantizeLinear``) in
    the form ONNX Runtime fuses into ``QLinearConv``: int32 on the step ``input scale x weight
    scale``, read through a ``DequantizeLinear`` (a float bias took the layer out of the integer
    kernel); ``None`` where the layer is no such one."""
    from graphprune.rules import registry
    from graphprune.rules.quantize import Dequantized

    node, weight = view.node, view.stored
    data = node.inputs[view.info.data] if view.info.data < len(node.inputs) else None
    producer = data.inputs[0] if data is not None and len(data.inputs) == 1 else None
    rule = registry.lookup(producer.domain or "", producer.op, view.opset or 0) if producer is not None else None
    data_step = rule.activation_step(producer) if rule is not None else None
    if not isinstance(weight, Dequantized) or data_step is None:
        return None
    step = data_step * np.asarray(weight.scale, np.float64).reshape(-1)
    if step.size not in (1, bias.size) or not np.all(step > 0):
        return None
    ints = np.clip(np.round(np.asarray(bias, np.float64).reshape(-1) / step), -(2**31), 2**31 - 1).astype(np.int32)
    stem = f"{node.name}_gp_bias"
    q = gs.Constant(fresh_name(f"{stem}_quantized", names), ints)
    scale = gs.Constant(fresh_name(f"{stem}_scale", names), step.astype(np.float32))
    out = gs.Variable(fresh_name(stem, names), dtype=np.float32, shape=[int(bias.size)])
    graph.nodes.append(gs.Node("DequantizeLinear", fresh_name(f"{stem}_dequantize", names), attrs={"axis": 0},
                               inputs=[q, scale], outputs=[out]))
    return out


def _decoded_for(node: gs.Node, index: int, constant: gs.Constant) -> bool:
    """Input ``index`` of ``node`` is decoded from ``constant`` by one node (a QDQ model's int32
    bias and its ``DequantizeLinear``) that nothing else reads, nor ``constant``: the stored bias
    is re-encoded in place (a fresh float bias left the layer out of ORT's QLinearConv fusion)."""
    if index >= len(node.inputs) or isinstance(node.inputs[index], gs.Constant):
        return False
    decoded = node.inputs[index]
    producers = decoded.inputs
    return (len(producers) == 1 and len(decoded.outputs) == 1 and len(constant.outputs) == 1
            and constant.outputs[0] is producers[0] and decoded.outputs[0] is node)


def share_bias(written: LinearView, other: LinearView) -> bool:
    """Give ``other`` the float bias input just written to ``written`` (one constant for
    the readers of a shared weight); ``False`` where the bias is not such an input."""
    slot = written.info.bias
    simple = all(v.bias_stored is None and v.bias_after is None and v.bias_constant is None
                 and v.info.bias == slot and v.info.beta == written.info.beta for v in (written, other))
    if not simple or slot is None or slot >= len(written.node.inputs):
        return False
    constant = written.node.inputs[slot]
    if not isinstance(constant, gs.Constant):
        return False
    while len(other.node.inputs) <= slot:
        other.node.inputs.append(gs.Variable.empty())
    other.node.inputs[slot] = constant
    if "beta" in written.node.attrs:
        other.node.attrs["beta"] = written.node.attrs["beta"]
    return True


def _add_to_next_bias(view: LinearView, bias: np.ndarray) -> bool:
    """Add ``bias`` to the per-channel constant of the addition that already follows a layer
    without a bias input (an exporter's ``MatMul`` then ``Add(b)``), instead of a second
    ``Add``; ``False`` where there is no such constant that only that addition reads."""
    from graphprune.calibration.residual import is_addition, per_channel

    readers = list(view.output.outputs)
    if view.opset is None or len(readers) != 1 or not is_addition(readers[0], view.opset):
        return False
    node = readers[0]
    other = node.inputs[1] if node.inputs[0] is view.output else node.inputs[0]
    if not isinstance(other, gs.Constant) or other is view.output or len(other.outputs) != 1:
        return False
    values = np.asarray(other.values)
    if (not np.issubdtype(values.dtype, np.floating) or values.size != view.out_channels()
            or per_channel(view, values) is None):
        return False
    other.values = np.ascontiguousarray((values + np.asarray(bias).reshape(values.shape)).astype(values.dtype))
    return True
