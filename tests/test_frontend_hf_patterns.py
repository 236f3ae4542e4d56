"""``prune_module`` -> ``apply_plan`` -> ``check_module`` on the module patterns of Hugging Face's
model families, built here in plain PyTorch (the suite does not install transformers):

- BERT-style self-attention (RemBERT, RoFormer, DPT, YOLOS, GLPN, SwinV2) reshaping by
  ``self.num_attention_heads`` and ``self.all_head_size``, its output projection a sibling;
- GPT-2's transposed linear layer (``Conv1D``: ``weight [in, out]``, width in ``nf``) and an
  attention that splits its fused projection by ``self.split_size`` and reshapes by
  ``self.num_heads`` (GPT-2, OPT, Bloom, Falcon, StableLM keep their counts in attributes);
- Phi-3's attention, which slices its fused q/k/v projection at
  ``self.config.num_attention_heads * head_dim`` (the config is shared by every layer) and
  repeats ``self.num_key_value_heads`` for grouped-query attention;
- ConvNeXt's per-channel ``layer_scale_parameter`` beside its child layers, Swin's table of
  per-head position biases read through an index buffer, and DETR's batch norm whose tensors
  are all buffers;
- a ``Linear`` on a channels-last 4-D input, which the dynamo exporter writes as
  ``MatMul(x, Transpose(weight))``: a graph with nothing else to fold is analysed with the
  ``Transpose`` left in place, and the plan names the weight, not the transposed copy.

Each was refused or failed in ``forward`` before (`docs/frontends.md`, round 42).
"""

from __future__ import annotations

import copy
import types

import numpy as np
import pytest
import torch
from graphprune.frontends.torch import apply_plan, check_module, prune_module
from graphprune.frontends.torch.errors import PlanMappingError
from graphprune.frontends.torch.handlers import handler_for
from torch import nn

HIDDEN, HEADS, HEAD = 32, 4, 8


class Conv1D(nn.Module):
    """GPT-2's linear layer: ``x @ weight + bias`` with ``weight [nx, nf]``."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.2)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.size()[:-1] + (self.nf,)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.softmax(q @ k.transpose(-1, -2) / HEAD**0.5, dim=-1) @ v


class GPT2Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed_dim, self.num_heads, self.head_dim = HIDDEN, HEADS, HEAD
        self.split_size = HIDDEN
        self.c_attn = Conv1D(3 * HIDDEN, HIDDEN)
        self.c_proj = Conv1D(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split_size, dim=2)
        q, k, v = (t.view(b, s, self.num_heads, self.head_dim).transpose(1, 2) for t in (q, k, v))
        out = _attend(q, k, v).transpose(1, 2).reshape(b, s, self.num_heads * self.head_dim)
        return self.c_proj(out)


class Phi3Attention(nn.Module):
    """Query heads read from the shared config; key/value heads from an attribute."""

    def __init__(self, config: types.SimpleNamespace) -> None:
        super().__init__()
        self.config, self.head_dim = config, HEAD
        self.num_key_value_heads = config.num_key_value_heads
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.qkv_proj = nn.Linear(HIDDEN, (config.num_attention_heads + 2 * self.num_key_value_heads) * HEAD,
                                  bias=False)
        self.o_proj = nn.Linear(config.num_attention_heads * HEAD, HIDDEN, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        qkv = self.qkv_proj(x)
        q_end = self.config.num_attention_heads * self.head_dim
        kv = self.num_key_value_heads * self.head_dim
        q, k, v = qkv[..., :q_end], qkv[..., q_end:q_end + kv], qkv[..., q_end + kv:]
        q, k, v = (t.view(b, s, -1, self.head_dim).transpose(1, 2) for t in (q, k, v))
        k = k.repeat_interleave(self.num_key_value_groups, dim=1)
        v = v.repeat_interleave(self.num_key_value_groups, dim=1)
        return self.o_proj(_attend(q, k, v).transpose(1, 2).reshape(b, s, -1))


class Block(nn.Module):
    def __init__(self, attention: nn.Module) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(HIDDEN)
        self.attn = attention
        self.fc1, self.fc2 = nn.Linear(HIDDEN, 64), nn.Linear(64, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm(x))
        return x + self.fc2(torch.relu(self.fc1(x)))


class Decoder(nn.Module):
    def __init__(self, make: type) -> None:
        super().__init__()
        self.config = types.SimpleNamespace(num_attention_heads=HEADS, num_key_value_heads=2)
        self.blocks = nn.ModuleList(
            Block(make(self.config) if make is Phi3Attention else make()) for _ in range(2))
        for p in self.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _prune(model: nn.Module, x: torch.Tensor, exporter: str, **options: object) -> tuple[nn.Module, object]:
    result = prune_module(model, (x,), exporter=exporter, **options)
    pruned = apply_plan(copy.deepcopy(model), result.plan)
    assert check_module(pruned, result.model, (x,)) < 1e-4
    return pruned, result


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_gpt2_attention_with_transposed_linear_layers_loses_whole_heads(exporter):
    torch.manual_seed(0)
    model = Decoder(GPT2Attention).eval()
    pruned, result = _prune(model, torch.randn(1, 6, HIDDEN), exporter, ratio=0.5)
    assert result.report["kinds"]["head"]["prunable"] >= 1
    attn = pruned.blocks[0].attn
    assert attn.num_heads < HEADS and attn.split_size == attn.num_heads * HEAD
    assert attn.c_attn.nf == attn.c_attn.weight.shape[1] == 3 * attn.split_size
    assert attn.c_proj.nx == attn.c_proj.weight.shape[0] == attn.split_size


def test_phi3_attention_gets_its_own_config_with_its_counts():
    torch.manual_seed(1)
    model = Decoder(Phi3Attention).eval()
    pruned, _ = _prune(model, torch.randn(1, 6, HIDDEN), "dynamo", ratio=0.5)
    for block in pruned.blocks:
        attn = block.attn
        q = attn.o_proj.in_features // HEAD
        assert attn.config.num_attention_heads == q < HEADS
        assert attn.num_key_value_heads == attn.config.num_key_value_heads
        assert attn.num_key_value_groups == q // attn.num_key_value_heads
        assert attn.config is not pruned.config
    assert pruned.config.num_attention_heads == HEADS  # the model's own config is left alone


def test_a_cut_of_part_of_a_head_is_refused_before_anything_changes():
    model = Decoder(GPT2Attention)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    plan = {"blocks.0.attn.c_proj.weight": {0: [0, 1, 2]}, "blocks.0.attn.c_attn.weight": {1: [0, 1, 2]},
            "blocks.0.attn.c_attn.bias": {0: [0, 1, 2]}}
    with pytest.raises(PlanMappingError, match="not whole heads of 8"):
        apply_plan(model, plan)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert model.blocks[0].attn.num_heads == HEADS


class BertSelfAttention(nn.Module):
    """RemBERT's, RoFormer's, DPT's: q, k, v here, the output projection in a sibling module."""

    def __init__(self) -> None:
        super().__init__()
        self.num_attention_heads, self.attention_head_size = HEADS, HEAD
        self.all_head_size = HEADS * HEAD
        self.query, self.key, self.value = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.size()[:-1] + (self.num_attention_heads, self.attention_head_size)
        q, k, v = (f(x).view(shape).transpose(1, 2) for f in (self.query, self.key, self.value))
        out = _attend(q, k, v).transpose(1, 2).contiguous()
        return out.view(out.size()[:-2] + (self.all_head_size,))


class BertAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self = BertSelfAttention()
        self.output = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.output(self.self(x))


def test_a_self_attention_whose_output_projection_is_a_sibling():
    torch.manual_seed(5)
    model = Decoder(BertAttention).eval()
    pruned, _ = _prune(model, torch.randn(1, 6, HIDDEN), "torchscript", ratio=0.5)
    attn = pruned.blocks[0].attn.self
    assert attn.num_attention_heads < HEADS and attn.all_head_size == attn.num_attention_heads * HEAD


class OneHeadAttention(nn.Module):
    """SegFormer's first stage: one head, reshaped by ``self.head_dim``."""

    def __init__(self) -> None:
        super().__init__()
        self.num_attention_heads, self.head_dim = 1, HIDDEN
        self.scaling = HIDDEN**-0.5
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.o_proj = nn.Linear(HIDDEN, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, -1, self.head_dim).transpose(1, 2) for f in (self.q_proj, self.k_proj, self.v_proj))
        out = torch.softmax(q @ k.transpose(-1, -2) * self.scaling, dim=-1) @ v
        return self.o_proj(out.transpose(1, 2).reshape(b, s, -1))


def test_the_size_of_a_single_head_follows_its_cut():
    torch.manual_seed(4)
    model = Decoder(OneHeadAttention).eval()
    pruned, _ = _prune(model, torch.randn(1, 6, HIDDEN), "torchscript", ratio=0.5)
    attn = pruned.blocks[0].attn
    assert attn.num_attention_heads == 1 and attn.head_dim == attn.o_proj.in_features < HIDDEN


class LayerScaleBlock(nn.Module):
    """ConvNeXt's layer: child layers and a per-channel scale of its own."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.pwconv1, self.pwconv2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.layer_scale_parameter = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dwconv(x).permute(0, 2, 3, 1)
        y = self.layer_scale_parameter * self.pwconv2(torch.relu(self.pwconv1(y)))
        return x + y.permute(0, 3, 1, 2)


class ConvNeXtLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 2, stride=2)
        self.layers = nn.Sequential(LayerScaleBlock(16), LayerScaleBlock(16))
        self.head = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.layers(self.stem(x)))


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_channels_last_linear_layers_and_a_layer_scale_beside_child_layers(exporter):
    torch.manual_seed(2)
    model = ConvNeXtLike().eval()
    pruned, result = _prune(model, torch.randn(1, 3, 16, 16), exporter, ratio=0.5)
    scale = pruned.layers[0].layer_scale_parameter
    assert scale.shape[0] < 16 and scale.shape[0] == pruned.stem.out_channels  # the stream was cut
    assert pruned.layers[0].pwconv1.out_features < 64


class FrozenBatchNorm2d(nn.Module):
    """DETR's backbone norm: statistics and affine are all buffers."""

    def __init__(self, n: int) -> None:
        super().__init__()
        self.register_buffer("weight", torch.rand(n) + 0.5)
        self.register_buffer("bias", torch.randn(n) * 0.1)
        self.register_buffer("running_mean", torch.randn(n) * 0.1)
        self.register_buffer("running_var", torch.rand(n) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + 1e-5).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.reshape(1, -1, 1, 1) + shift.reshape(1, -1, 1, 1)


def test_a_norm_whose_tensors_are_all_buffers():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), FrozenBatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 4, 1)).eval()
    pruned, _ = _prune(model, torch.randn(1, 3, 8, 8), "torchscript", ratio=0.5)
    assert pruned[1].running_var.shape[0] == pruned[0].out_channels < 16


class RelativePositionBias(nn.Module):
    """Swin's table of per-head biases, read through an index buffer."""

    def __init__(self, heads: int, window: int) -> None:
        super().__init__()
        self.window_area = window * window
        self.table = nn.Parameter(torch.randn((2 * window - 1) ** 2, heads) * 0.5)
        coords = torch.stack(torch.meshgrid(torch.arange(window), torch.arange(window), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + window - 1
        self.register_buffer("index", (rel[..., 0] * (2 * window - 1) + rel[..., 1]).flatten(), persistent=False)

    def forward(self) -> torch.Tensor:
        return self.table[self.index].view(self.window_area, self.window_area, -1).permute(2, 0, 1)


class WindowAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.out = nn.Linear(HIDDEN, HIDDEN)
        self.bias = RelativePositionBias(HEADS, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q, k, v = (f(x).view(b, s, -1, HEAD).transpose(1, 2) for f in (self.q, self.k, self.v))
        scores = q @ k.transpose(-1, -2) / HEAD**0.5 + self.bias()
        return self.out((torch.softmax(scores, -1) @ v).transpose(1, 2).reshape(b, s, -1))


def test_a_table_of_per_head_biases_read_through_an_index_buffer():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(HIDDEN, HIDDEN), WindowAttention(), nn.Linear(HIDDEN, 4)).eval()
    pruned, _ = _prune(model, torch.randn(2, 9, HIDDEN), "torchscript", ratio=0.5)
    assert pruned[1].bias.table.shape[1] == pruned[1].out.in_features // HEAD < HEADS


def test_a_module_keeping_the_width_it_loses_is_refused():
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.width = 8
            self.gamma = nn.Parameter(torch.ones(8))
            self.inner = nn.Linear(8, 8)

    module = Scale()
    assert handler_for(module) is not None
    with pytest.raises(PlanMappingError, match="keeps its width in \\['width'\\]"):
        apply_plan(module, {"gamma": {0: np.array([1, 2])}})
