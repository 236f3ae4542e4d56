"""The dynamo exporter's ``as_strided`` with a dynamic batch (:mod:`graphprune.io.strided_gathers`).

A ConvNeXt-style head (a layer-scaled residual block, global pooling, a channels-first
LayerNorm written with permutes) exported with a dynamic batch reads the pooled features as
``Gather(Reshape(x, [-1]), Range(0, batch) * C + arange(C))``: the identity, but a gather by
computed indices froze the channels it reads ("gathered axis"), so the last stage of
torchvision's ConvNeXt could not be pruned (ConvNeXt-T: parameters 0.41 of the original at
``--ratio 0.5`` against 0.26 through TorchScript). The preparation now reads ``x`` there.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.io import ir

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

WIDTH = 16


class ChannelsFirstNorm(nn.LayerNorm):
    def forward(self, x):
        return F.layer_norm(x.permute(0, 2, 3, 1), self.normalized_shape, self.weight, self.bias,
                            self.eps).permute(0, 3, 1, 2)


class Block(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 4 * c), nn.Linear(4 * c, c)
        self.layer_scale = nn.Parameter(torch.full((c, 1, 1), 0.5))

    def forward(self, x):
        y = self.dw(x).permute(0, 2, 3, 1)
        return self.layer_scale * self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2) + x


class Head(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.block = nn.Conv2d(3, WIDTH, 4, 4), Block(WIDTH)
        self.pool, self.norm, self.fc = nn.AdaptiveAvgPool2d(1), ChannelsFirstNorm(WIDTH), nn.Linear(WIDTH, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.norm(self.pool(self.block(self.stem(x)))), 1))


def _export(path) -> onnx.ModelProto:
    torch.onnx.export(Head().eval(), (torch.randn(2, 3, 32, 32),), str(path), dynamo=True, external_data=False,
                      input_names=["x"], dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    return onnx.load(str(path))


def test_an_identity_strided_gather_reads_its_source(tmp_path):
    model = _export(tmp_path / "head.onnx")
    assert "Gather" in {n.op_type for n in model.graph.node}  # the lowered as_strided
    assert "Gather" not in {n.op_type for n in ir.prepare(model).graph.node}
    analysis = graphprune.analyze(str(tmp_path / "head.onnx"))
    (width,) = [g for g in analysis.groups if g.num_units == WIDTH]
    assert width.prunable, width.frozen
    result = graphprune.prune(str(tmp_path / "head.onnx"), ratio=0.5)
    assert result.report["verification"]["ok"]
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 32, 32)).astype(np.float32)
    assert session.run(None, {"x": x})[0].shape == (3, 10)


def _reversed_gather() -> onnx.ModelProto:
    """``Gather(Reshape(x, [-1]), Range(0, B) * 4 + [3, 2, 1, 0])``: each row reversed."""
    nodes = [helper.make_node("Relu", ["x"], ["r"]),
             helper.make_node("Reshape", ["r", "flat_shape"], ["flat"]),
             helper.make_node("Shape", ["x"], ["b"], start=0, end=1),
             helper.make_node("Squeeze", ["b"], ["bs"]),
             helper.make_node("Range", ["zero", "bs", "one"], ["rows"]),
             helper.make_node("Mul", ["rows", "four"], ["starts"]),
             helper.make_node("Unsqueeze", ["starts", "axis1"], ["starts2"]),
             helper.make_node("Add", ["starts2", "within"], ["idx"]),
             helper.make_node("Gather", ["flat", "idx"], ["y"], axis=0)]
    inits = [numpy_helper.from_array(np.array([-1], np.int64), "flat_shape"),
             numpy_helper.from_array(np.array(0, np.int64), "zero"),
             numpy_helper.from_array(np.array(1, np.int64), "one"),
             numpy_helper.from_array(np.array(4, np.int64), "four"),
             numpy_helper.from_array(np.array([1], np.int64), "axis1"),
             numpy_helper.from_array(np.array([[3, 2, 1, 0]], np.int64), "within")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["B", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["B", 4])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_a_gather_in_another_order_stays():
    model = _reversed_gather()
    prepared = ir.prepare(model)
    assert "Gather" in {n.op_type for n in prepared.graph.node}
    x = np.arange(12, dtype=np.float32).reshape(3, 4)
    run = [ort.InferenceSession(m.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
           for m in (model, prepared)]
    np.testing.assert_array_equal(run[0], x[:, ::-1])
    np.testing.assert_array_equal(run[1], run[0])
