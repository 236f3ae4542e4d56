"""PyTorch frontend: module -> ONNX -> prune -> apply_plan -> the module equals the pruned ONNX.

Models are small and defined here: a ResNet-style CNN, a MobileNet-style CNN (depthwise
convs, inverted residuals), transformers (hand-written attention, ``nn.MultiheadAttention``,
``nn.TransformerEncoderLayer``) and a mixed bag of layers (Conv1d/3d, ConvTranspose,
GroupNorm, PReLU, Embedding). Each round trip checks the pruned module against the pruned
ONNX (ONNX Runtime) at 1e-4 relative and runs a few optimiser steps on it.
"""

from __future__ import annotations

import copy
import logging

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
from graphprune.frontends import torch as gpt  # noqa: E402
from torch import nn  # noqa: E402

import graphprune  # noqa: E402
from graphprune.errors import UsageError  # noqa: E402
from graphprune.planning.plan import GroupPlan, Plan  # noqa: E402

pytestmark = pytest.mark.torch

logging.getLogger("torch.onnx").setLevel(logging.ERROR)


# ----------------------------------------------------------------------------- models


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + identity)


class ResNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.layer1 = nn.Sequential(BasicBlock(16, 16), BasicBlock(16, 16))
        self.layer2 = nn.Sequential(BasicBlock(16, 32, 2), BasicBlock(32, 32))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, classes)

    def forward(self, x):
        x = self.layer2(self.layer1(self.stem(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, 4 * width, 1, bias=False), nn.BatchNorm2d(4 * width)
        self.downsample = None
        if stride != 1 or cin != 4 * width:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, 4 * width, 1, stride, bias=False), nn.BatchNorm2d(4 * width)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return torch.relu(self.bn3(self.conv3(y)) + identity)


class DeepResNet(nn.Module):
    """ResNet-50's layout in miniature: stem, Bottleneck stages [3, 2, 2], fc."""

    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for index, (count, width) in enumerate(((3, 8), (2, 16), (2, 16))):
            for b in range(count):
                blocks.append(Bottleneck(cin, width, 2 if index and not b else 1))
                cin = 4 * width
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x):
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.blocks(self.stem(x)), 1), 1))


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, expand: int) -> None:
        super().__init__()
        hidden = cin * expand
        self.use_res = stride == 1 and cin == cout
        self.block = nn.Sequential(
            nn.Conv2d(cin, hidden, 1, bias=False), nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), nn.ReLU6(),
            nn.Conv2d(hidden, cout, 1, bias=False), nn.BatchNorm2d(cout),
        )

    def forward(self, x):
        y = self.block(x)
        return x + y if self.use_res else y


class MobileNetish(nn.Module):
    def __init__(self, classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16), nn.Hardswish()),
            InvertedResidual(16, 16, 1, 2),
            InvertedResidual(16, 24, 2, 4),
            InvertedResidual(24, 24, 1, 4),
            nn.Sequential(nn.Conv2d(24, 64, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU6()),
        )
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class Attention(nn.Module):
    """Hand-written attention; heads come from the tensor size, so pruning heads just works."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.head_dim = dim // heads
        self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x):
        b, t, _ = x.shape
        q, k, v = (f(x).view(b, t, -1, self.head_dim).transpose(1, 2) for f in (self.q, self.k, self.v))
        weights = torch.softmax(q @ k.transpose(-1, -2) / self.head_dim**0.5, dim=-1)
        return self.out((weights @ v).transpose(1, 2).reshape(b, t, -1))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, attention: str) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.kind = attention
        if attention == "mha":
            self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        else:
            self.attn = Attention(dim, heads)
        self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

    def forward(self, x):
        y = self.ln1(x)
        y = self.attn(y, y, y, need_weights=False)[0] if self.kind == "mha" else self.attn(y)
        x = x + y
        return x + self.fc2(nn.functional.gelu(self.fc1(self.ln2(x))))


class TinyTransformer(nn.Module):
    def __init__(self, attention: str = "custom", vocab: int = 50, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        if attention == "encoder_layer":
            self.blocks = nn.Sequential(
                *[nn.TransformerEncoderLayer(dim, heads, 4 * dim, 0.0, batch_first=True) for _ in range(2)]
            )
        else:
            self.blocks = nn.Sequential(*[Block(dim, heads, attention) for _ in range(2)])
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 5)

    def forward(self, ids):
        return self.head(self.norm(self.blocks(self.emb(ids))).mean(1))


class Mixed(nn.Module):
    """Conv1d, GroupNorm, PReLU, ConvTranspose1d, Conv3d with BatchNorm3d."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv1d(4, 16, 3, padding=1)
        self.gn = nn.GroupNorm(4, 16)
        self.act = nn.PReLU(16)
        self.up = nn.ConvTranspose1d(16, 12, 4, stride=2, padding=1)
        self.c2 = nn.Conv1d(12, 6, 1)
        self.v1 = nn.Conv3d(2, 8, 3, padding=1)
        self.bn3 = nn.BatchNorm3d(8)
        self.v2 = nn.Conv3d(8, 3, 1)

    def forward(self, x, v):
        y = self.c2(torch.relu(self.up(self.act(self.gn(self.c1(x))))))
        w = self.v2(torch.relu(self.bn3(self.v1(v))))
        return y, w


def randomise_batchnorm(module: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN statistics and affine parameters (fresh BN is the identity)."""
    gen = torch.Generator().manual_seed(seed)
    for m in module.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm | nn.GroupNorm | nn.LayerNorm):
            with torch.no_grad():
                if getattr(m, "weight", None) is not None:
                    m.weight.uniform_(0.5, 1.5, generator=gen)
                    m.bias.normal_(0, 0.2, generator=gen)
                if getattr(m, "running_mean", None) is not None:
                    m.running_mean.normal_(0, 0.2, generator=gen)
                    m.running_var.uniform_(0.5, 2.0, generator=gen)
    return module


def train_steps(module: nn.Module, inputs: tuple, steps: int = 3) -> list[float]:
    """A few SGD steps on the (pruned) module; returns the losses."""
    module.train()
    opt = torch.optim.SGD(module.parameters(), lr=0.01, momentum=0.9)
    losses = []
    for _ in range(steps):
        out = module(*inputs)
        outs = out if isinstance(out, tuple) else (out,)
        loss = sum(o.float().pow(2).mean() for o in outs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    module.eval()
    assert all(np.isfinite(losses))
    return losses


def round_trip(module: nn.Module, inputs: tuple, **options) -> tuple[nn.Module, gpt.TorchPruneResult]:
    module.eval()
    result = gpt.prune_module(module, inputs, **options)
    pruned = gpt.apply_plan(copy.deepcopy(module), result.plan)
    gpt.check_module(pruned, result.model, inputs, tolerance=1e-4)
    return pruned, result


def count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ----------------------------------------------------------------------------- export


@pytest.fixture(scope="module")
def resnet():
    """A pruned ResNet-style model: (original, inputs, pruned module, prune result)."""
    torch.manual_seed(0)
    model = randomise_batchnorm(ResNetish())
    x = torch.randn(2, 3, 16, 16)
    pruned, result = round_trip(model, (x,), ratio=0.5)
    return model, (x,), pruned, result


def test_dynamo_export_keeps_state_dict_names_and_batchnorm(resnet):
    exported = resnet[3].exported
    inits = {t.name for t in exported.graph.initializer}
    assert {"stem.0.weight", "stem.1.running_var", "layer2.0.downsample.0.weight"} <= inits
    assert any(n.op_type == "BatchNormalization" for n in exported.graph.node)


def test_torchscript_export_splits_deduplicated_initializers():
    model = ResNetish()  # fresh BNs: all weights equal, TorchScript stores them once
    exported = gpt.to_onnx(model, (torch.randn(1, 3, 16, 16),), exporter="torchscript")
    inits = {t.name for t in exported.graph.initializer}
    bn = {n for n in model.state_dict() if n.endswith((".weight", ".bias")) and ".1." in n}
    assert bn <= inits


def test_export_rejects_unknown_exporter_and_wrong_dynamic_argument():
    with pytest.raises(UsageError):
        gpt.to_onnx(nn.Linear(2, 2), (torch.randn(1, 2),), exporter="jit")
    with pytest.raises(UsageError):
        gpt.to_onnx(nn.Linear(2, 2), (torch.randn(1, 2),), dynamic_axes={"x": {0: "b"}})


def test_torchscript_dynamic_axes_name_forwards_parameters_or_fail():
    """TorchScript ignored a ``dynamic_axes`` key that names no input (with a warning) and
    exported fixed sizes; the inputs are now named after ``forward``'s parameters, and an
    unknown key is a usage error."""
    class Scale(nn.Module):
        def forward(self, features):
            return features * 2

    model = gpt.to_onnx(Scale(), (torch.randn(2, 3),), exporter="torchscript",
                        dynamic_axes={"features": {0: "batch"}})
    assert model.graph.input[0].name == "features"
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    with pytest.raises(UsageError, match="'x'"):
        gpt.to_onnx(Scale(), (torch.randn(2, 3),), exporter="torchscript", dynamic_axes={"x": {0: "batch"}})


@pytest.mark.parametrize("exporter", gpt.EXPORTERS)
def test_export_failure_is_a_graphprune_error(exporter):
    class Bad(nn.Module):
        def forward(self, x):
            return torch.special.airy_ai(x)  # no ONNX translation

    with pytest.raises(gpt.ExportError, match=f"{exporter} export of Bad failed: .*airy") as info:
        gpt.to_onnx(Bad(), (torch.randn(2),), exporter=exporter)
    assert "\x1b" not in str(info.value)


# ----------------------------------------------------------------------------- round trips


def test_resnet_style_round_trip_and_training(resnet):
    _, (x,), pruned, result = resnet
    pruned = copy.deepcopy(pruned)
    assert result.report["params_after"] < 0.5 * result.report["params_before"]
    assert pruned.layer2[0].conv1.out_channels == 16
    assert pruned.layer2[0].bn1.num_features == 16
    assert pruned.fc.in_features == pruned.layer2[1].conv2.out_channels
    names = dict(pruned.named_parameters())
    onnx_params = {t.name: tuple(t.dims) for t in result.model.graph.initializer if t.name in names}
    assert onnx_params == {n: tuple(p.shape) for n, p in names.items()}
    train_steps(pruned, (x,))


def test_resnet_style_torchscript_exporter_and_keep_by_module_name():
    torch.manual_seed(1)
    model = randomise_batchnorm(ResNetish())
    x = torch.randn(1, 3, 16, 16)
    pruned, _ = round_trip(model, (x,), ratio=0.5, exporter="torchscript", keep=["layer1.0.conv1"])
    assert pruned.layer1[0].conv1.out_channels == 16  # protected
    assert pruned.layer1[1].conv1.out_channels == 8
    train_steps(pruned, (x,))


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_layers_pruned_with_torch_masks_round_trip(exporter):
    """``torch.nn.utils.prune`` keeps ``weight_orig`` and ``weight_mask`` and multiplies them
    in a forward pre-hook; the plan cuts both, and the handlers know only ``weight``:
    apply_plan refused ("cannot cut weight_mask"); through TorchScript (which writes a
    ``Cast`` of each mask to its own type) the map refused too ("the two would be cut
    differently"). The masked channels are the ones cut, and the module with the plan
    applied computes what the pruned export does."""
    from torch.nn.utils import prune as torch_prune

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 64, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(64, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(32, 10))
    for layer in (model[2], model[4]):
        torch_prune.ln_structured(layer, "weight", amount=0.5, n=2, dim=0)
    masked = {i for i in range(64) if not model[2].weight_mask[i].any()}
    model.eval()
    x = torch.randn(1, 3, 16, 16)
    result = gpt.prune_module(model, (x,), ratio=0.5, exporter=exporter)
    cut = set(next(gp.remove for gp in result.plan.groups if "0" in gp.channels.get("2.weight_orig", {})))
    assert cut == masked  # the l1 criterion sees the masked weight
    gpt.apply_plan(model, result.plan)  # in place: torch cannot deepcopy a masked module
    assert model[2].weight_orig.shape[0] == model[2].weight_mask.shape[0] == model[2].out_channels == 32
    gpt.check_module(model, result.model, (x,), tolerance=1e-4)


def test_mobilenet_style_round_trip_depthwise():
    torch.manual_seed(2)
    model = randomise_batchnorm(MobileNetish())
    x = torch.randn(2, 3, 16, 16)
    pruned, result = round_trip(model, (x,), ratio=0.5)
    dw = pruned.features[2].block[3]
    assert dw.groups == dw.in_channels == dw.out_channels == 32  # 64 expanded, half kept
    assert pruned.classifier[2].in_features == 32
    train_steps(pruned, (x,))


@pytest.mark.parametrize(
    ("attention", "exporter"),
    [("custom", "dynamo"), ("mha", "dynamo"), ("encoder_layer", "torchscript")],
)
def test_transformer_round_trip(attention, exporter, tmp_path):
    torch.manual_seed(3)
    model = randomise_batchnorm(TinyTransformer(attention))
    ids = torch.randint(0, 50, (2, 7))
    # the hidden size (residual stream) is pruned only on request
    pruned, result = round_trip(model, (ids,), ratio=0.5, exporter=exporter, prune_hidden=True)
    names = set(model.state_dict())
    assert all(set(gp.channels) <= names for gp in result.plan.groups)
    # Linear weights reach MatMul transposed: the ONNX plan cuts folded copies ("val_12")
    assert any(name not in names for gp in result.onnx_plan.groups for name in gp.channels)
    sources = gpt.parameter_sources(result.exported, names)
    assert sources.pending is None and sources.analysis is not None  # chains found, analysed
    fc1 = "blocks.0.linear1.weight" if attention == "encoder_layer" else "blocks.0.fc1.weight"
    assert len(sources.copies(fc1)) == 1  # its transposed copy, read by a MatMul
    result.plan.save(tmp_path / "plan.json")
    replayed = gpt.apply_plan(copy.deepcopy(model), Plan.load(tmp_path / "plan.json"))
    gpt.check_module(replayed, result.model, (ids,))
    assert pruned.emb.embedding_dim == 16  # the residual stream lost half its width
    assert pruned.norm.normalized_shape == (16,)
    if attention == "custom":
        assert pruned.blocks[0].attn.q.out_features == 16  # two of four heads left
    if attention in ("mha", "encoder_layer"):
        attn = pruned.blocks[0].attn if attention == "mha" else pruned.blocks[0].self_attn
        assert isinstance(attn, gpt.PrunedMultiheadAttention)
    train_steps(pruned, (ids,))


class StackedRNN(nn.Module):
    """A sequence classifier: a Linear, a stacked (bidirectional) LSTM/GRU without initial
    states, read as its last layer's final states (``h_n[-1]``, or both directions'
    ``h_n[-2:]``), and a Linear head."""

    def __init__(self, cell: type[nn.Module], bidirectional: bool) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 12)
        self.rnn = cell(12, 16, 3, bidirectional=bidirectional)
        self.head = nn.Linear(32 if bidirectional else 16, 4)
        self.bidirectional = bidirectional

    def forward(self, x):
        state = self.rnn(torch.relu(self.inp(x)))[1]
        h = state[0] if isinstance(state, tuple) else state
        last = torch.cat((h[-2], h[-1]), dim=1) if self.bidirectional else h[-1]
        return self.head(last)


@pytest.mark.parametrize("cell", [nn.LSTM, nn.GRU, nn.RNN], ids=["lstm", "gru", "rnn"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["forward", "bidirectional"])
def test_stacked_recurrent_round_trip(cell, bidirectional):
    """Each layer prunes on its own (the exported zero state and the final-state read no
    longer tie them), every layer keeps as many units at a ratio, and the module keeps one
    hidden_size: the sliced module computes what the pruned ONNX computes, and trains."""
    torch.manual_seed(3)
    model = StackedRNN(cell, bidirectional)
    x = torch.randn(7, 2, 6)
    if cell is nn.RNN and bidirectional:
        # the dynamo exporter unrolls nn.RNN into matrix products: each layer's two directions
        # are one group of 32 units, cut unevenly between them, which one hidden_size cannot hold
        result = gpt.prune_module(model.eval(), (x,), ratio=0.5)
        with pytest.raises(gpt.PlanMappingError, match="one hidden_size"):
            gpt.apply_plan(copy.deepcopy(model), result.plan)
        return
    pruned, result = round_trip(model, (x,), ratio=0.5)
    assert result.report["groups"]["pruned"] == 4  # the input Linear and three recurrent layers
    assert pruned.rnn.hidden_size == 8 and pruned.rnn.input_size == pruned.inp.out_features == 6
    assert pruned.head.in_features == (16 if bidirectional else 8)
    train_steps(pruned, (x,))


def test_recurrent_layers_kept_at_different_widths_are_refused():
    model = StackedRNN(nn.GRU, False)
    cuts = {"rnn.weight_hh_l0": {1: [0, 1]}, "rnn.weight_hh_l1": {1: [0]}}
    with pytest.raises(gpt.PlanMappingError, match="one hidden_size"):
        gpt.apply_plan(model, cuts)
    assert model.rnn.hidden_size == 16 and model.rnn.weight_hh_l0.shape == (48, 16)


def test_mixed_layers_round_trip():
    torch.manual_seed(4)
    model = randomise_batchnorm(Mixed())
    inputs = (torch.randn(2, 4, 10), torch.randn(1, 2, 4, 5, 5))
    pruned, _ = round_trip(model, inputs, ratio=0.5, exporter="torchscript")
    assert pruned.gn.num_groups == 2 and pruned.gn.num_channels == 8
    assert pruned.act.num_parameters == 8 and pruned.up.in_channels == 8
    assert pruned.up.out_channels == pruned.c2.in_channels == 6
    assert pruned.v1.out_channels == pruned.bn3.num_features == pruned.v2.in_channels == 4
    train_steps(pruned, inputs)




def test_map_plan_maps_every_removed_channel_of_a_deep_residual_network():
    torch.manual_seed(5)
    model = randomise_batchnorm(DeepResNet()).eval()
    x = torch.randn(1, 3, 32, 32)
    pruned, result = round_trip(model, (x,), ratio=0.5)  # module == pruned ONNX (ORT), 1e-4
    assert result.report["params_after"] < 0.5 * result.report["params_before"]
    names = set(model.state_dict())
    # the dynamo export reads every CNN parameter as it is: a quick look at the export says
    # that no chain can exist, so none is searched (and searching anyway finds none)
    sources = gpt.parameter_sources(result.exported, names)
    assert sources.pending is not None and sources.leaves == set() and sources.analysis is None
    assert sources.complete().leaves == set() and sources.pending is None
    # the module plan is the ONNX plan's parameter cuts, group by group, index by index
    assert len(result.plan.groups) == len(result.onnx_plan.groups)
    for onnx_group, group in zip(result.onnx_plan.groups, result.plan.groups, strict=True):
        expected = {t: a for t, a in onnx_group.channels.items() if t in names} if onnx_group.remove else {}
        assert group.channels == expected
    unmapped = {t for g in result.onnx_plan.groups if g.remove for t in g.channels} - names
    assert set(result.plan.meta.get("unmapped", [])) == unmapped
    # a residual stream ties the stage's conv3/bn3, downsample and the next blocks' conv1
    stream = next(g for g in result.plan.groups if "0" in g.channels.get("blocks.3.downsample.0.weight", {}))
    assert {"blocks.3.conv3.weight", "blocks.3.bn3.running_mean", "blocks.4.conv1.weight"} <= set(stream.channels)
    assert stream.channels["blocks.4.conv1.weight"] == {"1": stream.channels["blocks.3.conv3.weight"]["0"]}
    # every state_dict entry of the pruned module is the kept slice of the original
    state, cuts = model.state_dict(), gpt.module_cuts(result.plan)
    for name, tensor in pruned.state_dict().items():
        expected_tensor = state[name]
        for axis, idx in cuts.get(name, {}).items():
            kept = np.setdiff1d(np.arange(expected_tensor.shape[axis]), idx)
            expected_tensor = expected_tensor.index_select(axis, torch.as_tensor(kept))
        assert torch.equal(tensor, expected_tensor), name


# ----------------------------------------------------------------------------- apply_plan


def test_apply_plan_refuses_unknown_names_and_leaves_the_module_alone():
    model = ResNetish()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(gpt.PlanMappingError, match="map_plan"):
        gpt.apply_plan(model, {"val_3": {0: [0]}})
    with pytest.raises(gpt.PlanMappingError, match="every slice"):
        gpt.apply_plan(model, {"fc.bias": {0: list(range(10))}, "stem.0.weight": {0: [0]}})
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name])


def test_apply_plan_refuses_unsupported_modules_and_axes():
    class Scale(nn.Module):  # a float buffer of its width that the plan leaves whole: refused
        def __init__(self):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4, 1))
            self.register_buffer("shift", torch.zeros(4))

        def forward(self, x):
            return x * self.gain.T + self.shift

    model = nn.Sequential(nn.Linear(3, 4), Scale())
    with pytest.raises(gpt.PlanMappingError, match="Scale '1' keeps \\['shift'\\] whole"):
        gpt.apply_plan(model, {"1.gain": {0: [1]}})
    grouped = nn.Conv2d(4, 4, 3, groups=2)
    with pytest.raises(gpt.PlanMappingError, match="grouped"):
        gpt.apply_plan(grouped, {"weight": {1: [0]}})


def test_registered_handlers_for_custom_layers_and_containers():
    class Scale(nn.Module):
        def __init__(self, n):
            super().__init__()
            self.gain = nn.Parameter(torch.ones(n))
            self.n = n

    class Heads(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.heads = 4

    class ScaleHandler(gpt.ModuleHandler):
        module_types = (Scale,)
        axes = {"gain": (0,)}

        def update(self, module, cuts, old):
            module.n = module.gain.shape[0]

    class HeadsHandler(gpt.ModuleHandler):
        module_types = (Heads,)
        container = True

        def update(self, module, cuts, old):
            module.heads = module.proj.out_features // 2

    gpt.register_module_handler(ScaleHandler)
    gpt.register_module_handler(HeadsHandler)
    try:
        model = nn.Sequential(Scale(4), Heads())
        gpt.apply_plan(model, {"0.gain": {0: [1]}, "1.proj.weight": {0: [0, 1]}, "1.proj.bias": {0: [0, 1]}})
        assert model[0].n == 3 and model[1].heads == 3
        with pytest.raises(UsageError):
            gpt.register_module_handler(ScaleHandler)
    finally:
        for cls in (Scale, Heads):
            gpt._HANDLERS.pop(cls, None)


def test_tied_parameters_are_sliced_once():
    emb = nn.Embedding(10, 6)
    head = nn.Linear(6, 10, bias=False)
    head.weight = emb.weight
    model = nn.ModuleDict({"emb": emb, "head": head})
    gpt.apply_plan(model, {"emb.weight": {1: [0, 2]}, "head.weight": {1: [0, 2]}})
    assert model["head"].weight is model["emb"].weight
    assert model["emb"].embedding_dim == 4 and model["head"].in_features == 4
    with pytest.raises(gpt.PlanMappingError, match="tied"):
        gpt.apply_plan(model, {"emb.weight": {1: [0]}, "head.weight": {1: [1]}})


def test_embedding_rows_move_padding_idx():
    emb = nn.Embedding(6, 3, padding_idx=4)
    gpt.apply_plan(emb, {"weight": {0: [0, 2]}})
    assert emb.num_embeddings == 4 and emb.padding_idx == 2


# ----------------------------------------------------------------------------- attention


def _mha_inputs(batch_first: bool):
    torch.manual_seed(0)
    q = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kv = torch.randn(2, 7, 16) if batch_first else torch.randn(7, 2, 16)
    return q, kv


@pytest.mark.parametrize("batch_first", [True, False])
def test_pruned_mha_forward_matches_stock_semantics(batch_first):
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(16, 4, batch_first=batch_first).eval()
    ours = copy.deepcopy(stock)
    gpt.PrunedMultiheadAttention.convert(ours, {w: np.zeros(0, np.int64) for w in "qkv"})
    q, kv = _mha_inputs(batch_first)
    attn_mask = torch.rand(5, 7) > 0.7
    attn_mask[:, 0] = False
    padding = torch.zeros(2, 7, dtype=torch.bool)
    padding[1, -2:] = True
    for kwargs in (
        {},
        {"attn_mask": attn_mask},
        {"key_padding_mask": padding, "average_attn_weights": False},
        {"attn_mask": torch.randn(5, 7)},
    ):
        expected, expected_w = stock(q, kv, kv, **kwargs)
        got, got_w = ours(q, kv, kv, **kwargs)
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(got_w, expected_w, rtol=1e-5, atol=1e-6)
    unbatched = q[0] if batch_first else q[:, 0]
    torch.testing.assert_close(ours(unbatched, unbatched, unbatched)[0], stock(unbatched, unbatched, unbatched)[0])


def test_mha_head_pruning_equals_zeroing_the_heads():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(16, 4, batch_first=True).eval()
    reference = copy.deepcopy(mha)
    with torch.no_grad():
        reference.out_proj.weight[:, 4:8] = 0  # head 1 contributes nothing
        reference.out_proj.weight[:, 12:16] = 0  # head 3
    heads = [4, 5, 6, 7, 12, 13, 14, 15]
    rows = heads + [16 + h for h in heads] + [32 + h for h in heads]
    gpt.apply_plan(mha, {"in_proj_weight": {0: rows}, "in_proj_bias": {0: rows}, "out_proj.weight": {1: heads}})
    assert isinstance(mha, gpt.PrunedMultiheadAttention)
    assert mha.num_heads == 2 and mha.in_proj_weight.shape == (24, 16)
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(mha(x, x, x)[0], reference(x, x, x)[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(gpt.PlanMappingError, match="unevenly"):
        gpt.apply_plan(copy.deepcopy(mha), {"in_proj_weight": {0: [0]}})


def test_pruned_encoder_layer_never_takes_the_fused_fast_path():
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(16, 4, 32, 0.0, batch_first=True).eval()
    gpt.apply_plan(layer, {"self_attn.in_proj_weight": {1: [0, 1]}, "norm1.weight": {0: [0, 1]}})
    assert layer.self_attn._qkv_same_embed_dim is False


# ----------------------------------------------------------------------------- mapping


def _chain_model(nodes: list, outputs: list[str], extra_inits: tuple = ()) -> onnx.ModelProto:
    """``w`` (3x4) reaches MatMuls (inputs ``x``, ``x2``, ``x3``) through ``nodes``."""
    from onnx import TensorProto, numpy_helper

    graph = onnx.helper.make_graph(
        nodes, "g",
        [onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4]) for n in ("x", "x2", "x3")],
        [onnx.helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs],
        [
            numpy_helper.from_array(np.arange(12, dtype=np.float32).reshape(3, 4), "w"),
            numpy_helper.from_array(np.array([1], np.int64), "s"),
            numpy_helper.from_array(np.array([3], np.int64), "e"),
            numpy_helper.from_array(np.array([0], np.int64), "a"),
            numpy_helper.from_array(np.zeros((2, 3), np.float32), "c"),
            numpy_helper.from_array(np.array(2, np.float32), "two"),
            *extra_inits,
        ],
    )
    opsets = [onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("test.graphprune", 1)]
    return onnx.helper.make_model(graph, opset_imports=opsets)


def _copies_of_w(with_mul: bool = True) -> onnx.ModelProto:
    nodes = [
        onnx.helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        onnx.helper.make_node("Slice", ["wt", "s", "e", "a"], ["ws"]),
        onnx.helper.make_node("Concat", ["ws", "c"], ["wc"], axis=0),
        onnx.helper.make_node("MatMul", ["x", "wc"], ["y"]),
    ]
    if with_mul:
        nodes += [
            onnx.helper.make_node("Mul", ["wt", "two"], ["wm"]),
            onnx.helper.make_node("MatMul", ["x2", "wm"], ["y2"]),
        ]
    return _chain_model(nodes, ["y", "y2"] if with_mul else ["y"])


def test_parameter_sources_follow_transpose_slice_and_concat():
    """Folded copies of a parameter map back through the analysis of the export's chains:
    ``wc = Concat(Slice(w^T, rows 1..2), c)``, ``wm = 2 * w^T``."""
    model = _copies_of_w()
    sources = gpt.parameter_sources(model, ["w"])
    assert sources.leaves == {"wc", "wm"} and sources.direct == set()
    assert sources.copies("w") == ["wc", "wm"]
    assert sources.map_cut("wc", 1, [2]) == [("w", 0, [2])]
    assert sources.map_cut("wc", 0, [0, 3]) == [("w", 1, [1])]  # row 3 is the literal c
    assert sources.map_cut("wm", 0, [0]) == [("w", 1, [0])]  # a scaled copy is still a copy
    assert sources.map_cut("c", 0, [1]) == []  # an exporter literal: no parameter owns it
    # keep=[parameter or module] protects the folded copies too; ONNX and unknown names stay
    from graphprune.frontends.torch.prune import expand_keep

    keep = expand_keep(["w", "MatMul_3", "nothing"], ["w"], sources, {"MatMul_3"})
    assert keep == ["w", "wc", "wm", "MatMul_3", "nothing"]
    plan = Plan(groups=[GroupPlan(0, "wc:1", 3, [2], {"wc": {"1": [2]}})])
    with pytest.raises(gpt.PlanMappingError, match="computed from"):
        gpt.map_plan(plan, model, ["w"])  # wm = 2 * w^T would lose its column 2 too
    both = Plan(groups=[GroupPlan(0, "wc:1", 3, [2], {"wc": {"1": [2]}, "wm": {"1": [2]}})])
    assert gpt.map_plan(both, model, ["w"]).groups[0].channels == {"w": {"0": [2]}}
    model = _copies_of_w(with_mul=False)
    assert gpt.map_plan(plan, model, ["w"]).groups[0].channels == {"w": {"0": [2]}}
    plan = Plan(groups=[GroupPlan(0, "wc:1", 3, [2], {"wc": {"1": [2]}, "w": {"0": [1]}})])
    with pytest.raises(gpt.PlanMappingError, match="cut differently"):
        gpt.map_plan(plan, model, ["w"])
    literal = Plan(groups=[GroupPlan(0, "c:0", 2, [1], {"c": {"0": [1]}})])
    assert gpt.map_plan(literal, model, ["w"]).meta["unmapped"] == ["c"]


def test_parameter_chains_the_analysis_cannot_follow_are_refused():
    """Fail closed: an op without a rule, or a normalisation over a parameter axis."""
    nodes = [
        onnx.helper.make_node("Scramble", ["w"], ["wx"], domain="test.graphprune"),
        onnx.helper.make_node("MatMul", ["x", "wx"], ["y"]),
        onnx.helper.make_node("Transpose", ["w"], ["wt"], perm=[1, 0]),
        onnx.helper.make_node("MatMul", ["x2", "wt"], ["y2"]),
    ]
    sources = gpt.parameter_sources(_chain_model(nodes, ["y", "y2"]), ["w"])
    with pytest.raises(gpt.PlanMappingError, match="Scramble"):
        sources.map_cut("wx", 1, [0])
    with pytest.raises(gpt.PlanMappingError, match="no rule for Scramble"):
        sources.map_cut("wt", 1, [0])  # a plain copy, but 'w' also feeds the unknown op
    nodes = [
        onnx.helper.make_node("Softmax", ["w"], ["wn"], axis=0),
        onnx.helper.make_node("Transpose", ["wn"], ["wnt"], perm=[1, 0]),
        onnx.helper.make_node("MatMul", ["x", "wnt"], ["y"]),
    ]
    model = _chain_model(nodes, ["y"])
    sources = gpt.parameter_sources(model, ["w"])
    with pytest.raises(gpt.PlanMappingError, match="Softmax"):
        sources.map_cut("wnt", 1, [0])  # rows of w are normalised together: not a slice
    assert sources.map_cut("wnt", 0, [1, 3]) == [("w", 1, [1, 3])]
    plan = Plan(groups=[GroupPlan(0, "w:0", 3, [0], {"w": {"0": [0]}})])
    with pytest.raises(gpt.PlanMappingError, match="parameter 'w' axis 0"):
        gpt.map_plan(plan, model, ["w"])


# ----------------------------------------------------------------------------- group sparsity


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(1, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8)
        self.c2, self.b2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(8 * 4 * 4, 3)

    def forward(self, x):
        x = torch.relu(self.b1(self.c1(x)))
        x = self.pool(torch.relu(self.b2(self.c2(x))))
        return self.fc(torch.flatten(x, 1))


def test_group_sparsity_zeroes_whole_units_that_lossless_pruning_removes():
    from graphprune.frontends.sparsity import GroupSparsity

    from graphprune.pipeline.lossless import prune_lossless

    torch.manual_seed(0)
    model = randomise_batchnorm(SmallCNN()).train()
    x = torch.randn(4, 1, 8, 8)
    reg = GroupSparsity.from_module(model, (x[:1],), strength=0.5, target=0.5, exporter="torchscript")
    assert len(reg.units) == 16  # c1 and c2 output channels
    slices = {s[0] for u in reg.units for s in u.slices}
    assert slices == {"c1.weight", "b1.weight", "b1.bias", "c2.weight", "c2.bias", "b2.weight", "b2.bias"}
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(30):
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        reg.step(0.1)
    summary = reg.summary()
    assert summary["zero_units"] == 8 and summary["zero_fraction"] == 0.5
    for unit in reg.zero_units():
        for name, axis, idx in unit.slices:
            assert torch.count_nonzero(dict(model.named_parameters())[name].index_select(axis, torch.tensor(idx))) == 0
    model.eval()
    exported = gpt.to_onnx(model, (x[:1],), exporter="torchscript")
    lossless = prune_lossless(exported)
    assert lossless.report["channels"]["removed"] == 8
    replayed = graphprune.prune(exported, plan=reg.plan())
    assert replayed.report["verification"]["max_rel_diff"] <= 1e-6
    expected = model(x).detach()
    reg.prune_module()
    assert model.c1.out_channels + model.c2.out_channels == 8
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-6)
    gpt.check_module(model, lossless.model, (x[:1],), tolerance=1e-5)


def test_group_sparsity_penalty_is_differentiable_and_arguments_are_checked():
    from graphprune.frontends.sparsity import GroupSparsity

    model = SmallCNN()
    reg = GroupSparsity.from_module(model, (torch.randn(1, 1, 8, 8),), exporter="torchscript")
    penalty = reg.penalty()
    penalty.backward()
    assert penalty.item() > 0 and model.c1.weight.grad is not None
    with pytest.raises(UsageError):
        GroupSparsity(model, reg.analysis, reg.model, target=1.5)


def test_lossless_follows_zero_channels_through_a_dynamic_batch_flatten():
    from graphprune.pipeline.lossless import prune_lossless

    model = randomise_batchnorm(SmallCNN()).eval()
    with torch.no_grad():
        model.c2.weight[:3] = 0
        model.c2.bias[:3] = 0
        model.b2.weight[:3] = 0
        model.b2.bias[:3] = 0
    exported = gpt.to_onnx(
        model, (torch.randn(2, 1, 8, 8),), exporter="torchscript",
        input_names=["x"], dynamic_axes={"x": {0: "batch"}},
    )
    assert prune_lossless(exported).report["channels"]["removed"] == 3


# ----------------------------------------------------------------------------- command line

FACTORY = """
import torch.nn as nn


def make(width=8):
    return nn.Sequential(
        nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(), nn.Conv2d(width, 4, 1)
    )
"""


def test_cli_export_torch_then_prune(tmp_path, capsys):
    from graphprune.cli import main

    source = tmp_path / "factory.py"
    source.write_text(FACTORY)
    out = tmp_path / "model.onnx"
    argv = ["export", "torch", f"{source}:make", "--input-shape", "2,3,8,8", "--kwargs", '{"width": 6}',
            "--dynamic-batch", "-o", str(out)]
    assert main(argv) == 0
    assert f"wrote {out} (torch dynamo" in capsys.readouterr().out
    model = onnx.load(out)
    assert {t.name: tuple(t.dims) for t in model.graph.initializer}["0.weight"] == (6, 3, 3, 3)
    assert not model.graph.input[0].type.tensor_type.shape.dim[0].HasField("dim_value")
    pruned = tmp_path / "pruned.onnx"
    assert main(["prune", str(out), "-o", str(pruned), "--ratio", "0.5", "-q"]) == 0
    assert main(["export", "torch", f"{source}:make", "--input-shape", "1,3,8,8", "--exporter",
                 "torchscript", "--opset", "17", "-o", str(tmp_path / "ts.onnx")]) == 0


@pytest.mark.parametrize(
    ("factory", "message"),
    [
        ("no_colon", "MODULE:FACTORY"),
        ("missing_module_xyz:make", "cannot import"),
        ("{source}:nope", "no attribute 'nope'"),
    ],
)
def test_cli_export_torch_errors_are_one_line_usage_errors(tmp_path, capsys, factory, message):
    from graphprune.cli import main

    source = tmp_path / "factory.py"
    source.write_text(FACTORY)
    argv = ["export", "torch", factory.format(source=source), "--input-shape", "1,3,8,8",
            "-o", str(tmp_path / "m.onnx")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "m.onnx").exists()


def test_resolve_source_exports_factories_and_passes_onnx_paths(tmp_path):
    from graphprune.frontends.cli import resolve_source

    source = tmp_path / "factory.py"
    source.write_text(FACTORY)
    model = resolve_source(f"{source}:make", input_shapes=[(1, 3, 8, 8)], exporter="torchscript")
    assert isinstance(model, onnx.ModelProto)
    assert resolve_source(str(tmp_path / "model.onnx")) is None
    with pytest.raises(UsageError, match="input-shape"):
        resolve_source(f"{source}:make")


class _FakeQuantConv(nn.Conv2d):
    """A conv whose weight is fake-quantized per output channel, with the scale a literal
    (``scale_from_weight=False``) or computed from the weight in ``forward``."""

    def __init__(self, *args, scale_from_weight: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.scale_from_weight = scale_from_weight

    def forward(self, x):
        if self.scale_from_weight:
            scale = self.weight.detach().abs().amax((1, 2, 3)) / 127
        else:
            scale = torch.full((self.weight.shape[0],), 0.01)
        zero = torch.zeros_like(scale, dtype=torch.int32)
        w = torch.fake_quantize_per_channel_affine(self.weight, scale, zero, 0, -128, 127)
        return nn.functional.conv2d(x, w, self.bias, self.stride, self.padding)


def _fake_quant_net(scale_from_weight: bool) -> nn.Module:
    torch.manual_seed(0)
    conv = [_FakeQuantConv(3, 16, 3, padding=1, scale_from_weight=scale_from_weight),
            _FakeQuantConv(16, 16, 3, padding=1, scale_from_weight=scale_from_weight),
            _FakeQuantConv(16, 4, 1, scale_from_weight=scale_from_weight)]
    return nn.Sequential(conv[0], nn.ReLU(), conv[1], nn.BatchNorm2d(16), nn.ReLU(), conv[2]).eval()


def test_a_fake_quantized_module_maps_its_plan_and_matches_the_pruned_onnx() -> None:
    module = _fake_quant_net(scale_from_weight=False)
    example = (torch.randn(2, 3, 8, 8),)
    result = gpt.prune_module(module, example, ratio=0.5)
    pruned = gpt.apply_plan(copy.deepcopy(module), result.plan)
    assert pruned[0].weight.shape[0] == 8 and pruned[2].weight.shape[1] == 8
    gpt.check_module(pruned, result.model, example)


def test_a_scale_folded_from_the_weight_is_refused_not_mismatched() -> None:
    """The export's ``ReduceMax(Abs(W)) / 127`` is folded into a constant by preparation, from
    the whole weight; the module recomputes it from the sliced one. A ``ReduceMax`` of values
    >= 0 is exact where the graph computes it at run time, not in a folded chain: mapping a
    plan that cuts the reduced axis is refused (with the change to the reduction alone, the
    module and the pruned ONNX differed by 0.2 %)."""
    module = _fake_quant_net(scale_from_weight=True)
    with pytest.raises(gpt.PlanMappingError, match="ReduceMax reduces this axis"):
        gpt.prune_module(module, (torch.randn(2, 3, 8, 8),), ratio=0.5)
