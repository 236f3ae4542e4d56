"""Models from both torch exporters: the TorchScript exporter (``dynamo=False``: BN folded into
Conv, Shape/Gather/Concat Reshape targets under dynamic axes) and the dynamo exporter
(``dynamo=True``; ``optimize=False`` keeps BatchNormalization; dynamic spatial sizes compute
Reshape targets through Shape/Concat)."""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import pytest
from conftest import assert_prunes_exactly, initializer, nodes_of

import graphprune

torch = pytest.importorskip("torch")
nn = torch.nn

pytestmark = pytest.mark.torch


class Block(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)

    def forward(self, x):
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(x + self.bn2(self.conv2(h)))


class TinyResNet(nn.Module):
    """conv-bn-relu stem, one residual block, a strided conv, flatten (view) into a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.block = Block(16)
        self.down = nn.Sequential(nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.BatchNorm2d(24),
                                  nn.ReLU())
        self.fc = nn.Linear(24 * 4 * 4, 10)

    def forward(self, x):
        x = self.down(self.block(self.stem(x)))
        return self.fc(x.view(x.size(0), -1))


class ShuffleUnit(nn.Module):
    """ShuffleNet v2 style: concat two branches, then a channel shuffle, then a conv."""

    def __init__(self, groups: int = 2) -> None:
        super().__init__()
        self.groups = groups
        self.left = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.right = nn.Sequential(nn.Conv2d(3, 8, 1, bias=False), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Conv2d(16, 4, 3, padding=1)

    def forward(self, x):
        y = torch.cat([self.left(x), self.right(x)], 1)
        b, c, h, w = y.size()
        y = y.view(b, self.groups, c // self.groups, h, w).transpose(1, 2).contiguous()
        return self.head(y.view(b, c, h, w))


def randomized(cls: type) -> nn.Module:
    """An instance with seeded weights and non-trivial BN statistics, in eval mode."""
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    module = cls()
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=generator)
                m.bias.normal_(0, 0.1, generator=generator)
                m.running_mean.normal_(0, 0.1, generator=generator)
                m.running_var.uniform_(0.5, 1.5, generator=generator)
    return module.eval()


def export(module: nn.Module, *, dynamo: bool, dynamic: str | None = None, **kwargs) -> onnx.ModelProto:
    """Export with input 'x' [1, 3, 8, 8]; ``dynamic``: None, 'batch' or 'batch+spatial'."""
    x = torch.randn(1, 3, 8, 8)
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if dynamo:
            if dynamic:
                axes = {0: torch.export.Dim("batch")}
                if dynamic == "batch+spatial":
                    axes |= {2: torch.export.Dim("h", min=2, max=64),
                             3: torch.export.Dim("w", min=2, max=64)}
                kwargs["dynamic_shapes"] = {"x": axes}
            torch.onnx.export(module, (x,), buffer, dynamo=True, input_names=["x"],
                              output_names=["y"], verbose=False, **kwargs)
        else:
            if dynamic:
                axes = {0: "batch"} | ({2: "h", 3: "w"} if dynamic == "batch+spatial" else {})
                kwargs["dynamic_axes"] = {"x": axes, "y": {0: "batch"}}
            torch.onnx.export(module, (x,), buffer, dynamo=False, input_names=["x"],
                              output_names=["y"], opset_version=17, **kwargs)
    return onnx.load_from_string(buffer.getvalue())


def torch_agrees(module: nn.Module, model: onnx.ModelProto) -> None:
    """The export itself is faithful (so a pruning failure is ours, not the exporter's)."""
    from conftest import run_ort

    x = np.random.default_rng(1).standard_normal((1, 3, 8, 8)).astype(np.float32)
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(run_ort(model, {"x": x})[0], expected, rtol=1e-4, atol=1e-4)


def gemm_weight(model: onnx.ModelProto) -> np.ndarray:
    gemm = nodes_of(model, "Gemm")[0]
    return initializer(model, gemm.input[1])


@pytest.mark.parametrize("dynamic", [None, "batch"], ids=["static", "dynamic_batch"])
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_tiny_resnet_prunes_and_verifies(dynamo, dynamic):
    module = randomized(TinyResNet)
    model = export(module, dynamo=dynamo, dynamic=dynamic)
    torch_agrees(module, model)
    if dynamic and not dynamo:
        ops = {n.op_type for n in model.graph.node}
        assert {"Shape", "Gather", "Concat"} <= ops, "the Reshape target is computed"
    analysis = graphprune.analyze(model)
    assert len(analysis.prunable_groups) == 3  # stem + residual, block inside, strided conv
    assert analysis.unsupported == {}
    res = assert_prunes_exactly(model, 0.5)
    assert res.report["groups"]["pruned"] == 3
    assert res.report["macs_after"] < 0.35 * res.report["macs_before"]
    weight = gemm_weight(res.model)
    assert weight.shape == (10, 12 * 16)


def test_dynamo_without_optimisation_keeps_batch_normalization():
    model = export(randomized(TinyResNet), dynamo=True, dynamic="batch", optimize=False)
    assert len(nodes_of(model, "BatchNormalization")) == 4
    res = assert_prunes_exactly(model, 0.5)
    for bn in nodes_of(res.model, "BatchNormalization"):
        channels = initializer(res.model, bn.input[1]).shape[0]
        assert channels in (8, 12)
        for name in bn.input[2:5]:
            assert initializer(res.model, name).shape == (channels,)


@pytest.mark.parametrize(
    ("dynamo", "dynamic"),
    [(False, None), (False, "batch"), (True, None), (True, "batch+spatial")],
    ids=["torchscript", "torchscript_dynamic", "dynamo", "dynamo_dynamic_spatial"],
)
def test_channel_shuffle_module(dynamo, dynamic):
    module = randomized(ShuffleUnit)
    model = export(module, dynamo=dynamo, dynamic=dynamic)
    torch_agrees(module, model)
    if dynamo and dynamic:
        assert nodes_of(model, "Shape") and nodes_of(model, "Concat")
    group = graphprune.analyze(model).prunable_groups
    assert len(group) == 1 and group[0].num_units == 8, [g.frozen for g in group]
    shape = (2, 3, 6, 10) if dynamic == "batch+spatial" else (2, 3, 8, 8)
    feeds = {"x": np.random.default_rng(0).standard_normal(shape).astype(np.float32)}
    res = assert_prunes_exactly(model, 0.5, feeds=feeds if dynamic else None)
    convs = nodes_of(res.model, "Conv")
    assert [initializer(res.model, c.input[1]).shape[0] for c in convs[:2]] == [4, 4]
    assert initializer(res.model, convs[-1].input[1]).shape[1] == 8
