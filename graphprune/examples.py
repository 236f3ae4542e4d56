"""Built-in example models, written with ``onnx.helper`` (no framework needed).

``example_cnn()`` is a small image classifier with the structures graphprune must handle:
Conv+BN+Relu stems, residual blocks (coupled channels across an Add), a depthwise-separable
block, a concat of two branches, a squeeze-excitation gate (Mul by a per-channel sigmoid),
global pooling and Flatten into a Gemm classifier. Weights are random but seeded, BN
statistics are randomised so that verification is meaningful.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

EXAMPLE_OPSET = 17
EXAMPLE_IR_VERSION = 8


class _Builder:
    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.count = 0

    def name(self, prefix: str) -> str:
        self.count += 1
        return f"{prefix}{self.count}"

    def param(self, name: str, values: np.ndarray) -> str:
        self.inits.append(numpy_helper.from_array(values.astype(np.float32), name))
        return name

    def conv(self, x: str, cin: int, cout: int, k: int = 3, stride: int = 1, group: int = 1,
             bn: bool = True, act: str | None = "Relu", prefix: str = "conv") -> str:
        n = self.name(prefix)
        fan_in = cin // group * k * k
        w = self.rng.standard_normal((cout, cin // group, k, k)) * np.sqrt(2.0 / fan_in)
        inputs = [x, self.param(f"{n}.weight", w)]
        if not bn:
            inputs.append(self.param(f"{n}.bias", self.rng.standard_normal(cout) * 0.1))
        y = f"{n}_out"
        self.nodes.append(helper.make_node(
            "Conv", inputs, [y], name=n, kernel_shape=[k, k], strides=[stride, stride],
            pads=[k // 2] * 4, group=group,
        ))
        if bn:
            b = f"{n}.bn"
            params = [
                self.param(f"{b}.weight", self.rng.uniform(0.5, 1.5, cout)),
                self.param(f"{b}.bias", self.rng.standard_normal(cout) * 0.1),
                self.param(f"{b}.running_mean", self.rng.standard_normal(cout) * 0.1),
                self.param(f"{b}.running_var", self.rng.uniform(0.5, 1.5, cout)),
            ]
            self.nodes.append(helper.make_node("BatchNormalization", [y, *params], [f"{b}_out"], name=b))
            y = f"{b}_out"
        if act:
            out = f"{n}_{act.lower()}"
            self.nodes.append(helper.make_node(act, [y], [out], name=f"{n}.{act.lower()}"))
            y = out
        return y

    def op(self, op: str, inputs: list[str], **attrs: object) -> str:
        n = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [f"{n}_out"], name=n, **attrs))
        return f"{n}_out"


def example_cnn(seed: int = 0, *, image_size: int = 64, num_classes: int = 10) -> onnx.ModelProto:
    """A small residual CNN classifier, input ``[batch, 3, H, W]`` (batch is dynamic)."""
    b = _Builder(seed)
    x = b.conv("image", 3, 32, stride=2, prefix="stem")
    # residual stage: two blocks sharing the 32-channel stream
    for _ in range(2):
        h = b.conv(x, 32, 48)
        h = b.conv(h, 48, 32, act=None)
        x = b.op("Relu", [b.op("Add", [x, h])])
    # depthwise-separable downsampling block
    x = b.conv(x, 32, 32, stride=2, group=32, prefix="dw")
    x = b.conv(x, 32, 64, k=1, prefix="pw")
    # two branches concatenated
    left = b.conv(x, 64, 32, k=1, prefix="left")
    right = b.conv(b.conv(x, 64, 24, k=1, prefix="right"), 24, 32, prefix="right")
    x = b.op("Concat", [left, right], axis=1)
    # squeeze-excitation gate
    s = b.op("GlobalAveragePool", [x])
    s = b.conv(s, 64, 16, k=1, bn=False, prefix="se")
    s = b.conv(s, 16, 64, k=1, bn=False, act="Sigmoid", prefix="se")
    x = b.op("Mul", [x, s])
    x = b.conv(x, 64, 96, k=1, prefix="head")
    x = b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1)
    w = b.rng.standard_normal((num_classes, 96)) * np.sqrt(1.0 / 96)
    logits = b.op("Gemm", [x, b.param("fc.weight", w), b.param("fc.bias", np.zeros(num_classes))],
                  transB=1)
    b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="output"))
    graph = helper.make_graph(
        b.nodes, "graphprune_example_cnn",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, image_size, image_size])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", num_classes])],
        b.inits,
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", EXAMPLE_OPSET)],
        ir_version=EXAMPLE_IR_VERSION, producer_name="graphprune.examples",
    )
    onnx.checker.check_model(model, full_check=True)
    return model
