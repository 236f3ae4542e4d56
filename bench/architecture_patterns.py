"""Architecture patterns: 58 small PyTorch modules (and 15 Keras models for tf2onnx, where
TensorFlow is installed), each built around one pattern that real models use (pixel shuffle,
channel shuffle, U-Net skips, GLU, Instance/GroupNorm, einsum attention, shifted windows,
token mixing, 3D convolutions, weight norm, a head shared by the levels of a feature
pyramid, top-2 mixture of experts, FiLM, CondConv, Perceiver latents, MobileViT unfolding,
relative position bias, SwiGLU with RMSNorm, Keras multi-head attention, and the second
batch of ``patterns_more.py``: diffusion ResBlocks, ConvNeXt, detection heads, causal SDPA,
Ghost and Res2Net modules, channel and non-local attention, ...), exported with both torch
exporters and pruned every way the tool offers. Random weights: this probes robustness and
coverage (does every mode run and verify; what is frozen and why; what the refit
restores), not accuracy. ``--variant`` re-runs the torch patterns' TorchScript exports at
opset 9 or 11, in float16, or quantized by ONNX Runtime (QDQ, dynamic int8).

    python bench/architecture_patterns.py [--only a,b]
    python bench/architecture_patterns.py --variant qdq     # opset9|opset11|fp16|fp16-io|qdq|dynamic
    python bench/architecture_patterns.py --tables          # the docs' tables from the results

Keras models are converted by ``graphprune.frontends.tensorflow`` twice: with the batch
fixed to 1 (the frontend's default) and left open. Per export: the analysis (groups,
prunable, frozen reasons other than the graph's inputs and outputs, inexact reasons);
``--ratio 0.5`` data-free, ``--lossless``, ``--target-params 0.6``, and with 48 random
calibration feeds ``--ratio 0.5`` (refit vs no reconstruction: held-out cosine per output)
and ``--target-macs 0.6``. Results: ``bench/results/architecture_patterns.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrizations as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
import patterns_jax  # noqa: E402 - Flax models through jax2onnx, where installed
import patterns_more  # noqa: E402 - the second batch of patterns, beside this file

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results" / "architecture_patterns.json"


class PixelShuffleSR(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 5, padding=2)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.c3 = nn.Conv2d(32, 3 * 4, 3, padding=1)
        self.ps = nn.PixelShuffle(2)
        self.c4 = nn.Conv2d(32, 64, 3, padding=1)
        self.ps2 = nn.PixelShuffle(2)
        self.c5 = nn.Conv2d(16, 3, 3, padding=1)

    def forward(self, x):
        h = torch.tanh(self.c2(torch.tanh(self.c1(x))))
        a = self.ps(self.c3(h))
        b = self.c5(F.relu(self.ps2(self.c4(h))))
        return a + b


class ShuffleBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 48, 3, padding=1)
        self.b = nn.Sequential(
            nn.Conv2d(24, 24, 1),
            nn.BatchNorm2d(24),
            nn.ReLU(),
            nn.Conv2d(24, 24, 3, padding=1, groups=24),
            nn.BatchNorm2d(24),
            nn.Conv2d(24, 24, 1),
            nn.ReLU(),
        )
        self.head = nn.Linear(48, 10)

    def forward(self, x):
        x = self.stem(x)
        a, b = x.chunk(2, dim=1)
        x = torch.cat([a, self.b(b)], 1)
        n, c, h, w = x.shape
        x = x.view(n, 2, c // 2, h, w).transpose(1, 2).reshape(n, c, h, w)
        return self.head(x.mean((2, 3)))


class UNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.e1 = nn.Conv2d(3, 16, 3, padding=1)
        self.e2 = nn.Conv2d(16, 32, 3, padding=1, stride=2)
        self.m = nn.Conv2d(32, 32, 3, padding=1)
        self.up = nn.ConvTranspose2d(32, 16, 2, stride=2)
        self.d1 = nn.Conv2d(32, 16, 3, padding=1)
        self.o = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        a = F.relu(self.e1(x))
        b = F.relu(self.e2(a))
        b = F.relu(self.m(b))
        u = self.up(b)
        return self.o(F.relu(self.d1(torch.cat([u, a], 1))))


class ConformerConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(40, 64)
        self.ln = nn.LayerNorm(64)
        self.pw1 = nn.Conv1d(64, 128, 1)
        self.dw = nn.Conv1d(64, 64, 7, padding=3, groups=64)
        self.gn = nn.GroupNorm(8, 64)
        self.pw2 = nn.Conv1d(64, 64, 1)
        self.out = nn.Linear(64, 10)

    def forward(self, x):  # x [B,T,40]
        h = self.inp(x)
        y = self.ln(h).transpose(1, 2)
        y = F.glu(self.pw1(y), dim=1)
        y = self.pw2(F.silu(self.gn(self.dw(y))))
        h = h + y.transpose(1, 2)
        return self.out(h)


class NormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.n1 = nn.InstanceNorm2d(32, affine=True)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1)
        self.n2 = nn.GroupNorm(4, 32)
        self.c3 = nn.Conv2d(32, 8, 1)

    def forward(self, x):
        return self.c3(F.relu(self.n2(self.c2(F.relu(self.n1(self.c1(x)))))))


class EinsumAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.q = nn.Linear(32, 64)
        self.k = nn.Linear(32, 64)
        self.v = nn.Linear(32, 64)
        self.o = nn.Linear(64, 32)
        self.ff = nn.Sequential(nn.Linear(32, 96), nn.GELU(), nn.Linear(96, 32))

    def forward(self, x):
        B, T, _ = x.shape
        q = self.q(x).view(B, T, 4, 16)
        k = self.k(x).view(B, T, 4, 16)
        v = self.v(x).view(B, T, 4, 16)
        a = torch.einsum("bthd,bshd->bhts", q, k).softmax(-1)
        o = torch.einsum("bhts,bshd->bthd", a, v).reshape(B, T, 64)
        x = x + self.o(o)
        return x + self.ff(x)


class SwinLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Conv2d(3, 32, 4, stride=4)
        self.ln = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.emb(x).permute(0, 2, 3, 1)  # B,H,W,C  H=W=8
        B, H, W, C = x.shape
        y = torch.roll(self.ln(x), shifts=(-2, -2), dims=(1, 2))
        y = y.view(B, 2, 4, 2, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(-1, 16, C)
        q, k, v = self.qkv(y).chunk(3, -1)
        a = (q @ k.transpose(-1, -2) / 5.6).softmax(-1)
        y = self.proj(a @ v)
        y = y.view(B, 2, 2, 4, 4, C).permute(0, 1, 3, 2, 4, 5).reshape(B, H, W, C)
        y = torch.roll(y, shifts=(2, 2), dims=(1, 2))
        x = x + y
        x = x + self.mlp(self.ln(x))
        return self.head(x.mean((1, 2)))


class Mixer(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Conv2d(3, 32, 4, stride=4)
        self.ln1 = nn.LayerNorm(32)
        self.tok = nn.Sequential(nn.Linear(16, 48), nn.GELU(), nn.Linear(48, 16))
        self.ln2 = nn.LayerNorm(32)
        self.ch = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = self.emb(x).flatten(2).transpose(1, 2)  # B,16,32
        x = x + self.tok(self.ln1(x).transpose(1, 2)).transpose(1, 2)
        x = x + self.ch(self.ln2(x))
        return self.head(x.mean(1))


class PointNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv1d(3, 64, 1)
        self.b1 = nn.BatchNorm1d(64)
        self.c2 = nn.Conv1d(64, 128, 1)
        self.b2 = nn.BatchNorm1d(128)
        self.f1 = nn.Linear(128, 64)
        self.f2 = nn.Linear(64, 4)

    def forward(self, x):
        x = F.relu(self.b2(self.c2(F.relu(self.b1(self.c1(x))))))
        x = x.max(2)[0]
        return self.f2(F.relu(self.f1(x)))


class TCN(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(8, 32, 1)
        self.l = nn.ModuleList([nn.Conv1d(32, 32, 3, padding=d, dilation=d) for d in (1, 2, 4)])
        self.out = nn.Conv1d(32, 2, 1)

    def forward(self, x):
        x = self.inp(x)
        for c in self.l:
            x = x + F.relu(c(x))
        return self.out(x)


class CBAM(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, padding=1)
        self.fc1 = nn.Conv2d(32, 8, 1)
        self.fc2 = nn.Conv2d(8, 32, 1)
        self.sp = nn.Conv2d(2, 1, 7, padding=3)
        self.o = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = F.relu(self.c(x))
        ca = torch.sigmoid(
            self.fc2(F.relu(self.fc1(x.mean((2, 3), keepdim=True))))
            + self.fc2(F.relu(self.fc1(x.amax((2, 3), keepdim=True))))
        )
        x = x * ca
        sa = torch.sigmoid(
            self.sp(torch.cat([x.mean(1, keepdim=True), x.amax(1, keepdim=True)], 1))
        )
        return self.o(x * sa)


class ECA(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, padding=1)
        self.k = nn.Conv1d(1, 1, 3, padding=1, bias=False)
        self.o = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        x = F.relu(self.c(x))
        y = x.mean((2, 3), keepdim=True)
        y = self.k(y.squeeze(-1).transpose(-1, -2)).transpose(-1, -2).unsqueeze(-1)
        return self.o(x * torch.sigmoid(y))


class TextCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(100, 32)
        self.cs = nn.ModuleList([nn.Conv1d(32, 24, k) for k in (2, 3, 4)])
        self.fc = nn.Linear(72, 3)

    def forward(self, t):
        x = self.e(t).transpose(1, 2)
        return self.fc(torch.cat([F.relu(c(x)).max(2)[0] for c in self.cs], 1))


class VAEDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(16, 32 * 4 * 4)
        self.d1 = nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1)
        self.d2 = nn.ConvTranspose2d(16, 3, 4, stride=2, padding=1)

    def forward(self, z):
        return torch.sigmoid(self.d2(F.relu(self.d1(F.relu(self.fc(z)).view(-1, 32, 4, 4)))))


class SplitHeads(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, padding=1)
        self.h = nn.Conv2d(32, 4 + 1 + 6, 1)
        self.h2 = nn.Conv2d(4, 4, 1)

    def forward(self, x):
        y = self.h(F.relu(self.c(x)))
        box, obj, cls = torch.split(y, [4, 1, 6], 1)
        return self.h2(box), torch.sigmoid(obj), cls.softmax(1)


class Upsamp(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.c2 = nn.Conv2d(32, 32, 3, stride=2, padding=1)
        self.l = nn.Conv2d(32, 32, 1)
        self.o = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        u = F.interpolate(b, scale_factor=2, mode="bilinear", align_corners=False) + self.l(a)
        return self.o(F.interpolate(u, size=x.shape[-2:], mode="nearest"))


class Siamese(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 8)

    def embed(self, x):
        return self.fc(F.relu(self.c2(F.relu(self.c(x)))).mean((2, 3)))

    def forward(self, a, b):
        return (self.embed(a) - self.embed(b)).pow(2).sum(1)


class TiedLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.e = nn.Embedding(50, 32)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.ln = nn.LayerNorm(32)

    def forward(self, t):
        h = self.e(t)
        h = h + self.ff(self.ln(h))
        return h @ self.e.weight.t()


class SliceChannels(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = F.relu(self.c(x))
        return self.a(y[:, :16]) + self.b(y[:, 16:])


class Video3D(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv3d(3, 16, 3, padding=1)
        self.b1 = nn.BatchNorm3d(16)
        self.c2 = nn.Conv3d(16, 32, (1, 3, 3), padding=(0, 1, 1), stride=(1, 2, 2))
        self.b2 = nn.BatchNorm3d(32)
        self.up = nn.ConvTranspose3d(32, 8, 2, stride=2)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        a = F.relu(self.b1(self.c1(x)))
        b = F.relu(self.b2(self.c2(a)))
        return self.fc(b.mean((2, 3, 4))), self.up(b)


class MHA(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32))
        self.o = nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        a, _ = self.att(h, h, h, need_weights=False)
        h = h + a
        h = h + self.ff(h)
        return self.o(h)


class TEL(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True),
            2,
            enable_nested_tensor=False,
        )
        self.o = nn.Linear(32, 3)

    def forward(self, x):
        return self.o(self.enc(self.inp(x)))


class WeightNormAudio(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = P.weight_norm(nn.Conv1d(1, 32, 7, padding=3))
        self.c2 = P.weight_norm(nn.Conv1d(32, 32, 3, padding=1, dilation=1))
        self.up = P.weight_norm(nn.ConvTranspose1d(32, 16, 4, stride=2, padding=1))
        self.o = P.weight_norm(nn.Conv1d(16, 1, 7, padding=3))

    def forward(self, x):
        h = F.leaky_relu(self.c1(x), 0.1)
        h = h + self.c2(F.leaky_relu(h, 0.1))
        return torch.tanh(self.o(F.leaky_relu(self.up(h), 0.1)))


class DWTranspose(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.dt = nn.ConvTranspose2d(32, 32, 4, stride=2, padding=1, groups=32)
        self.gt = nn.ConvTranspose2d(32, 16, 3, padding=1, groups=4)
        self.o = nn.Conv2d(16, 2, 1)

    def forward(self, x):
        return self.o(F.relu(self.gt(F.relu(self.dt(F.relu(self.c(x)))))))


class CellLoop(nn.Module):
    def __init__(self):
        super().__init__()
        self.cell = nn.GRUCell(8, 24)
        self.o = nn.Linear(24, 2)

    def forward(self, x):  # [B,T,8], T=5
        h = torch.zeros(x.shape[0], 24)
        for t in range(5):
            h = self.cell(x[:, t], h)
        return self.o(h)


class PReLUNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, padding=1)
        self.p = nn.PReLU(32)
        self.c2 = nn.Conv2d(32, 32, 3, padding=1, groups=32)
        self.h = nn.Hardswish()
        self.o = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        return self.o(self.h(self.c2(self.p(self.c(x)))))


class GatedTCN(nn.Module):  # WaveNet-style gated activation
    def __init__(self):
        super().__init__()
        self.inp = nn.Conv1d(1, 16, 1)
        self.dil = nn.ModuleList([nn.Conv1d(16, 32, 2, dilation=d, padding=d) for d in (1, 2)])
        self.res = nn.ModuleList([nn.Conv1d(16, 16, 1) for _ in range(2)])
        self.skip = nn.ModuleList([nn.Conv1d(16, 24, 1) for _ in range(2)])
        self.o = nn.Conv1d(24, 4, 1)

    def forward(self, x):
        h = self.inp(x)
        T = x.shape[-1]
        sk = 0
        for d, r, k in zip(self.dil, self.res, self.skip, strict=True):
            z = d(h)[..., :T]
            a, b = z.chunk(2, 1)
            g = torch.tanh(a) * torch.sigmoid(b)
            h = h + r(g)
            sk = sk + k(g)
        return self.o(F.relu(sk))


class ClassTokenViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.pe = nn.Conv2d(3, 32, 8, stride=8)
        self.cls = nn.Parameter(torch.randn(1, 1, 32))
        self.pos = nn.Parameter(torch.randn(1, 17, 32) * 0.1)
        self.enc = nn.TransformerEncoder(
            nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True, norm_first=True),
            2,
            enable_nested_tensor=False,
        )
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        t = self.pe(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(x.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.enc(t)[:, 0])


class FPN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, 2, 1)
        self.c2 = nn.Conv2d(16, 32, 3, 2, 1)
        self.c3 = nn.Conv2d(32, 64, 3, 2, 1)
        self.l1 = nn.Conv2d(16, 24, 1)
        self.l2 = nn.Conv2d(32, 24, 1)
        self.l3 = nn.Conv2d(64, 24, 1)
        self.o = nn.Conv2d(24, 3, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        c = F.relu(self.c3(b))
        p3 = self.l3(c)
        p2 = self.l2(b) + F.interpolate(p3, scale_factor=2.0)
        p1 = self.l1(a) + F.interpolate(p2, scale_factor=2.0)
        return self.o(p1), self.o(p2), self.o(p3)


class MoE(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.gate = nn.Linear(32, 4)
        self.experts = nn.ModuleList(
            [nn.Sequential(nn.Linear(32, 48), nn.GELU(), nn.Linear(48, 32)) for _ in range(4)]
        )
        self.o = nn.Linear(32, 3)

    def forward(self, x):  # [T,16]
        h = self.inp(x)
        w = self.gate(h).softmax(-1)
        top, idx = w.topk(2, -1)
        out = torch.zeros_like(h)
        for e, ex in enumerate(self.experts):
            m = ((idx == e).float() * top).sum(-1, keepdim=True)
            out = out + m * ex(h)
        return self.o(h + out)


class FiLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, padding=1)
        self.cond = nn.Linear(6, 64)
        self.c2 = nn.Conv2d(32, 16, 3, padding=1)
        self.o = nn.Conv2d(16, 2, 1)

    def forward(self, x, z):
        h = F.relu(self.c(x))
        g, b = self.cond(z).chunk(2, -1)
        h = h * g[:, :, None, None] + b[:, :, None, None]
        return self.o(F.relu(self.c2(h)))


class CondConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.experts = nn.Parameter(torch.randn(3, 24, 16, 3, 3) * 0.1)
        self.route = nn.Linear(16, 3)
        self.o = nn.Conv2d(24, 2, 1)

    def forward(self, x):  # batch 1
        h = F.relu(self.c(x))
        r = torch.sigmoid(self.route(h.mean((2, 3))))[0]
        w = (r[:, None, None, None, None] * self.experts).sum(0)
        return self.o(F.relu(F.conv2d(h, w, padding=1)))


class Perceiver(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.lat = nn.Parameter(torch.randn(1, 8, 32))
        self.att = nn.MultiheadAttention(32, 4, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.o = nn.Linear(32, 5)

    def forward(self, x):
        kv = self.inp(x)
        q = self.lat.expand(x.shape[0], -1, -1)
        a, _ = self.att(q, kv, kv, need_weights=False)
        h = q + a
        h = h + self.ff(h)
        return self.o(h.mean(1))


class PosEnc(nn.Module):
    def __init__(self):
        super().__init__()
        self.freq = 2.0 ** torch.arange(6).float()
        self.l1 = nn.Linear(3 + 36, 64)
        self.l2 = nn.Linear(64, 64)
        self.o = nn.Linear(64 + 39, 4)

    def forward(self, p):  # [N,3]
        e = (p[..., None] * self.freq).flatten(-2)
        enc = torch.cat([p, e.sin(), e.cos()], -1)
        h = F.relu(self.l2(F.relu(self.l1(enc))))
        return self.o(torch.cat([h, enc], -1))


class MobileViTBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 24, 3, padding=1)
        self.proj = nn.Conv2d(24, 32, 1)
        self.ln = nn.LayerNorm(32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.SiLU(), nn.Linear(64, 32))
        self.back = nn.Conv2d(32, 24, 1)
        self.fuse = nn.Conv2d(48, 24, 3, padding=1)
        self.o = nn.Conv2d(24, 2, 1)

    def forward(self, x):
        h = F.silu(self.c(x))
        y = self.proj(h)
        B, C, H, W = y.shape
        p = (
            y.reshape(B, C, H // 2, 2, W // 2, 2)
            .permute(0, 3, 5, 2, 4, 1)
            .reshape(B * 4, (H // 2) * (W // 2), C)
        )
        p = p + self.mlp(self.ln(p))
        y = p.reshape(B, 2, 2, H // 2, W // 2, C).permute(0, 5, 3, 1, 4, 2).reshape(B, C, H, W)
        return self.o(F.silu(self.fuse(torch.cat([h, self.back(y)], 1))))


class RelPosBias(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.table = nn.Parameter(torch.randn(2 * 8 - 1, 4) * 0.1)
        self.proj = nn.Linear(16, 16)
        self.o = nn.Linear(16, 3)
        idx = torch.arange(8)
        self.register_buffer("rel", (idx[:, None] - idx[None, :] + 7))

    def forward(self, x):  # [1,8,16]
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, 4, 4).permute(2, 0, 3, 1, 4)
        att = (q @ k.transpose(-1, -2)) * 0.5 + self.table[self.rel].permute(2, 0, 1)[None]
        y = (att.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        return self.o(x + self.proj(y))


class Unfold(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 9, 16)
        self.o = nn.Linear(16, 2)

    def forward(self, x):
        h = F.relu(self.c(x))
        u = F.unfold(h, 3, padding=1).transpose(1, 2)
        return self.o(F.relu(self.fc(u)))


class Gated(nn.Module):  # SwiGLU MLP + RMSNorm on a CNN stream
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(16, 32)
        self.w = nn.Parameter(torch.ones(32))
        self.up = nn.Linear(32, 64, bias=False)
        self.g = nn.Linear(32, 64, bias=False)
        self.down = nn.Linear(64, 32, bias=False)
        self.o = nn.Linear(32, 3)

    def forward(self, x):
        h = self.inp(x)
        n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6) * self.w
        h = h + self.down(F.silu(self.g(n)) * self.up(n))
        return self.o(h)


IMG = (1, 3, 32, 32)
MODELS = {
    "pixelshuffle_sr": (PixelShuffleSR, [IMG]),
    "shufflenet_block": (ShuffleBlock, [IMG]),
    "unet": (UNet, [IMG]),
    "conformer_conv": (ConformerConv, [(1, 20, 40)]),
    "instance_group_norm": (NormNet, [IMG]),
    "einsum_attention": (EinsumAttn, [(1, 10, 32)]),
    "swin_window": (SwinLike, [IMG]),
    "mlp_mixer": (Mixer, [(1, 3, 16, 16)]),
    "pointnet": (PointNet, [(1, 3, 100)]),
    "tcn": (TCN, [(1, 8, 50)]),
    "cbam": (CBAM, [IMG]),
    "eca": (ECA, [IMG]),
    "textcnn": (TextCNN, [("long", (1, 20))]),
    "vae_decoder": (VAEDec, [(1, 16)]),
    "split_heads": (SplitHeads, [IMG]),
    "upsample": (Upsamp, [IMG]),
    "siamese": (Siamese, [IMG, IMG]),
    "tied_lm": (TiedLM, [("long", (1, 12))]),
    "slice_channels": (SliceChannels, [IMG]),
    "video3d": (Video3D, [(1, 3, 4, 16, 16)]),
    "mha": (MHA, [(1, 10, 16)]),
    "transformer_encoder": (TEL, [(1, 10, 16)]),
    "weight_norm_audio": (WeightNormAudio, [(1, 1, 64)]),
    "dw_transpose": (DWTranspose, [IMG]),
    "grucell_loop": (CellLoop, [(1, 5, 8)]),
    "prelu_hardswish": (PReLUNet, [IMG]),
    "wavenet_gated": (GatedTCN, [(1, 1, 64)]),
    "vit_cls": (ClassTokenViT, [IMG]),
    "fpn_shared_head": (FPN, [IMG]),
    "moe_topk": (MoE, [(10, 16)]),
    "film": (FiLM, [(1, 3, 16, 16), (1, 6)]),
    "condconv": (CondConv, [(1, 3, 16, 16)]),
    "perceiver": (Perceiver, [(1, 20, 12)]),
    "posenc_nerf": (PosEnc, [(50, 3)]),
    "mobilevit": (MobileViTBlock, [(1, 3, 16, 16)]),
    "relpos_bias": (RelPosBias, [(1, 8, 16)]),
    "unfold": (Unfold, [(1, 3, 8, 8)]),
    "swiglu_rmsnorm": (Gated, [(1, 10, 16)]),
}
MODELS.update(patterns_more.MODELS)


def keras_patterns() -> dict:
    """Keras models for tf2onnx (built when TensorFlow is installed)."""
    import keras
    from keras import layers as kl

    def transformer():
        x = keras.Input((12, 16))
        h = kl.Dense(32)(x)
        h = kl.LayerNormalization()(h + kl.MultiHeadAttention(4, 8)(h, h))
        f = kl.Dense(32)(kl.Dense(64, activation="gelu")(h))
        h = kl.LayerNormalization()(h + f)
        return keras.Model(x, kl.Dense(3)(kl.GlobalAveragePooling1D()(h)))

    def cross_attention():
        q, kv = keras.Input((12, 16)), keras.Input((7, 20))
        h = kl.Dense(32)(q)
        h = kl.LayerNormalization()(h + kl.MultiHeadAttention(4, 8, value_dim=6)(h, kv))
        return keras.Model([q, kv], kl.Dense(3)(h))

    def separable():
        x = keras.Input((32, 32, 3))
        h = kl.SeparableConv2D(24, 3, padding="same", activation="relu")(x)
        h = kl.BatchNormalization()(kl.DepthwiseConv2D(3, padding="same")(h))
        h = kl.Conv2D(16, 1, activation="relu")(h)
        return keras.Model(x, kl.Conv2D(2, 1)(kl.Conv2DTranspose(8, 3, strides=2, padding="same")(h)))

    def causal_conv1d():
        x = keras.Input((64, 4))
        h = kl.Conv1D(16, 5, padding="causal", dilation_rate=2, activation="relu")(x)
        h = kl.LayerNormalization()(kl.Conv1DTranspose(8, 4, strides=2, padding="same")(h))
        return keras.Model(x, kl.Dense(2)(h))

    def text_cnn():
        x = keras.Input((20,), dtype="int32")
        h = kl.Conv1D(32, 3, activation="relu")(kl.Embedding(100, 24)(x))
        return keras.Model(x, kl.Dense(5, activation="softmax")(kl.GlobalMaxPooling1D()(h)))

    def se_residual():
        x = keras.Input((32, 32, 3))
        h = kl.Conv2D(32, 3, padding="same", activation="relu")(x)
        s = kl.Dense(32, activation="sigmoid")(kl.Dense(8, activation="relu")(kl.GlobalAveragePooling2D()(h)))
        h2 = kl.Multiply()([h, kl.Reshape((1, 1, 32))(s)])
        h = kl.Concatenate()([kl.Add()([h, kl.Conv2D(32, 3, padding="same")(h2)]), kl.Conv2D(16, 1)(x)])
        return keras.Model(x, kl.Dense(10)(kl.Flatten()(kl.MaxPooling2D(4)(h))))

    def bidirectional_rnn():
        x = keras.Input((10, 8))
        h = kl.Bidirectional(kl.GRU(12))(kl.Bidirectional(kl.LSTM(16, return_sequences=True))(x))
        return keras.Model(x, kl.Dense(4)(h))

    models = {"keras_" + f.__name__: f for f in (transformer, cross_attention, separable, causal_conv1d,
                                                   text_cnn, se_residual, bidirectional_rnn)}
    return {**models, **patterns_more.keras_patterns()}


def export_keras(name: str, build, folder: Path) -> dict[str, Path]:
    """tf2onnx with the batch fixed to 1 (the frontend's default) and left open."""
    import keras
    import onnx
    from graphprune.frontends import tensorflow as gtf

    keras.utils.set_random_seed(0)
    model = build()
    out = {}
    for label, batch in (("tf2onnx", 1), ("tf2onnx_dynamic_batch", None)):
        path = folder / f"{name}__{label}.onnx"
        onnx.save(gtf.to_onnx(model, batch_size=batch), str(path))
        out[label] = path
    return out


#: ``--variant``: the TorchScript export at an older opset, converted to float16 (weights and
#: compute; ``fp16-io``: inputs and outputs too), or quantized by ONNX Runtime (QDQ, dynamic)
VARIANTS = ("opset9", "opset11", "fp16", "fp16-io", "qdq", "dynamic")


def export_variant(name: str, folder: Path, variant: str) -> dict[str, Path]:
    """One file of pattern ``name`` in ``variant`` (an exporter or quantizer that cannot
    make it raises: the row records why)."""
    import onnx

    opset = int(variant.removeprefix("opset")) if variant.startswith("opset") else 17
    path = export(name, folder, exporters=(("torchscript", False),), opset=opset)["torchscript"]
    out = folder / f"{name}__{variant}.onnx"
    if variant.startswith("fp16"):
        from onnxruntime.transformers.float16 import convert_float_to_float16

        onnx.save(convert_float_to_float16(onnx.load(str(path)), keep_io_types=variant == "fp16"), str(out))
    elif variant in ("qdq", "dynamic"):
        from ort_quantize import quantize

        quantize(path, out, variant, feeds_for(path, 16, seed=5))
    else:
        path.rename(out)
    return {variant: out}


def export(name: str, folder: Path, exporters=(("torchscript", False), ("dynamo", True)),
           opset: int | None = None) -> dict[str, Path]:
    cls, specs = MODELS[name]
    torch.manual_seed(0)
    model = cls().eval()
    for module in model.modules():
        if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    args = tuple(
        torch.randint(0, 20, s[1]) if s[0] == "long"
        else (torch.rand(*s[1]) > 0.3).float() if s[0] == "mask"
        else torch.randn(*s)
        for s in specs
    )
    names = [f"in{i}" for i in range(len(args))]
    out = {}
    for exporter, dynamo in exporters:
        path = folder / f"{name}__{exporter}.onnx"
        torch.onnx.export(
            model,
            args,
            str(path),
            dynamo=dynamo,
            opset_version=opset or (18 if dynamo else 17),
            input_names=names,
        )
        out[exporter] = path
    return out


def feeds_for(path: Path, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for value in graph.input:
            tensor = value.type.tensor_type
            shape = [d.dim_value or 1 for d in tensor.shape.dim]
            if tensor.elem_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
                dtype = np.int64 if tensor.elem_type == onnx.TensorProto.INT64 else np.int32
                feed[value.name] = rng.integers(0, 20, shape).astype(dtype)
            else:
                half = tensor.elem_type == onnx.TensorProto.FLOAT16
                feed[value.name] = rng.standard_normal(shape).astype(np.float16 if half else np.float32)
        feeds.append(feed)
    return feeds


def measure(path: Path) -> dict:
    import graphprune

    row: dict = {}
    analysis = graphprune.analyze(str(path))
    summary = analysis.summary()
    row["groups"], row["prunable"] = summary["groups"], summary["prunable"]
    row["frozen"] = sorted(
        {
            g.frozen[0][:120]
            for g in analysis.groups
            if g.frozen and not g.frozen[0].startswith(("graph input", "graph output"))
        }
    )
    row["inexact"] = sorted({g.inexact[0][:120] for g in analysis.groups if g.inexact})
    feeds = feeds_for(path, 48)
    runs = {
        "ratio": {"ratio": 0.5},
        "lossless": {"lossless": True},
        "target_params": {"target_params": 0.6},
        "calibrated": {"ratio": 0.5, "calibration": feeds},
        "calibrated_none": {"ratio": 0.5, "calibration": feeds, "reconstruction": "none"},
        "calibrated_macs": {"target_macs": 0.6, "calibration": feeds},
    }
    for label, kwargs in runs.items():
        try:
            report = graphprune.prune(str(path), **kwargs).report
        except Exception as exc:  # noqa: BLE001 - recorded, the probe goes on
            row[label] = {"error": f"{type(exc).__name__}: {exc}"[:300]}
            continue
        entry = {"verified": bool(report.get("verification", {}).get("ok"))}
        budget = report.get("budget")
        if budget:
            entry["achieved"], entry["met"] = budget.get("achieved"), budget.get("met")
        fidelity = report.get("fidelity")
        if fidelity:
            entry["cosine"] = {k: v.get("cosine") for k, v in fidelity.get("outputs", {}).items()}
            refit = report.get("calibration", {}).get("passes", {}).get("RefitPass", {})
            entry["refit_layers"], entry["not_refit"] = (
                refit.get("layers"),
                refit.get("not_refit", 0),
            )
        row[label] = entry
    return row


def _worst(row: dict, label: str) -> float | None:
    """The lowest held-out cosine over the outputs of one run."""
    return min(row.get(label, {}).get("cosine", {}).values(), default=None)


def _reasons(row: dict) -> list[str]:
    """Frozen and inexact reasons without their locations, in first-seen order."""
    out: list[str] = []
    for reason in [*row.get("frozen", []), *row.get("inexact", [])]:
        short = reason.split(" at ")[0]
        if short not in out:
            out.append(short)
    return out


def tables(rows: dict) -> str:
    """The markdown tables of ``docs/architecture_patterns.md`` from the results' rows."""

    def cell(exporters: tuple[str, str], name: str, what) -> str:
        return " · ".join(what(rows[f"{name}__{e}"]) for e in exporters if f"{name}__{e}" in rows)

    def groups(r: dict) -> str:
        return f"{r['groups']}/{r['prunable']}"

    def cosine(r: dict) -> str:
        none, refit = _worst(r, "calibrated_none"), _worst(r, "calibrated")
        return "—" if none is None or refit is None else f"{none:.3f} → **{refit:.3f}**"

    def verified(name: str, exporters: tuple[str, str]) -> str:
        runs = [v for e in exporters for v in rows.get(f"{name}__{e}", {}).values() if isinstance(v, dict)]
        return f"{sum(1 for v in runs if v.get('verified'))}/{len(runs)}"

    names = list(dict.fromkeys(k.split("__")[0] for k in rows))
    torch_names = [n for n in names if not n.startswith(("keras_", "jax_"))]
    keras_names = [n for n in names if n.startswith("keras_")]
    jax_names = [n for n in names if n.startswith("jax_")]
    lines = [
        "| pattern | groups / prunable (TorchScript · dynamo) | verified runs | held-out cosine at ratio 0.5: "
        "no reconstruction → refit (worst output, TorchScript · dynamo) | frozen or inexact (besides the "
        "graph's inputs and outputs) |",
        "|---|---|---|---|---|",
    ]
    pair = ("torchscript", "dynamo")
    for name in torch_names:
        reasons = "; ".join(dict.fromkeys(x for e in pair for x in _reasons(rows.get(f"{name}__{e}", {})))) or "—"
        lines.append(f"| {name} | {cell(pair, name, groups)} | {verified(name, pair)} | "
                     f"{cell(pair, name, cosine)} | {reasons} |")
    lines += [
        "",
        "Keras 3 through tf2onnx (`graphprune.frontends.tensorflow.to_onnx`), batch fixed to 1 · left open:",
        "",
        "| pattern | groups / prunable (batch 1 · open) | verified runs | held-out cosine: no reconstruction → "
        "refit (batch 1 · open) | frozen or inexact, batch 1 | frozen, open batch only |",
        "|---|---|---|---|---|---|",
    ]
    for title, prefix, pair, family in (
        ("Keras 3 through tf2onnx (`graphprune.frontends.tensorflow.to_onnx`)", "keras_",
         ("tf2onnx", "tf2onnx_dynamic_batch"), keras_names),
        ("Flax NNX through jax2onnx (`bench/patterns_jax.py`)", "jax_",
         ("jax2onnx", "jax2onnx_dynamic_batch"), jax_names),
    ):
        if not family:
            continue
        lines += [
            "",
            f"{title}, batch fixed to 1 · left open:",
            "",
            "| pattern | groups / prunable (batch 1 · open) | verified runs | held-out cosine: no reconstruction → "
            "refit (batch 1 · open) | frozen or inexact, batch 1 | frozen, open batch only |",
            "|---|---|---|---|---|---|",
        ]
        for name in family:
            fixed = _reasons(rows.get(f"{name}__{pair[0]}", {}))
            open_only = [x for x in _reasons(rows.get(f"{name}__{pair[1]}", {})) if x not in fixed]
            lines.append(f"| {name.removeprefix(prefix)} | {cell(pair, name, groups)} | {verified(name, pair)} | "
                         f"{cell(pair, name, cosine)} | {'; '.join(fixed) or '—'} | {'; '.join(open_only) or '—'} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated pattern names")
    parser.add_argument("--tables", action="store_true", help="print the markdown tables of the results and stop")
    parser.add_argument("--variant", choices=VARIANTS, default=None,
                        help="the torch patterns' TorchScript export at an older opset, in float16 or "
                             "quantized (results: architecture_patterns_VARIANT.json)")
    args = parser.parse_args()
    results = RESULTS if args.variant is None else RESULTS.with_name(f"architecture_patterns_{args.variant}.json")
    if args.tables:
        print(tables(json.loads(RESULTS.read_text())["rows"]), end="")
        return 0
    try:
        keras_models = keras_patterns() if args.variant is None else {}
    except ImportError:  # no TensorFlow here: the torch patterns only
        keras_models = {}
    try:  # Flax models through jax2onnx, where both are installed (patterns_jax.py)
        jax_models = patterns_jax.jax_patterns() if args.variant is None else {}
    except ImportError:
        jax_models = {}
    names = [n for n in args.only.split(",") if n] or [*MODELS, *keras_models, *jax_models]
    unknown = [n for n in names if n not in MODELS and n not in keras_models and n not in jax_models]
    if unknown:  # (a wrong name used to leave a "NAME__None" row in the results)
        parser.error(f"unknown pattern(s) {', '.join(unknown)} (or their exporter is not installed here)")
    rows = {}
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            try:
                exports = (export_keras(name, keras_models[name], Path(tmp)) if name in keras_models
                           else patterns_jax.export_jax(name, jax_models[name], Path(tmp)) if name in jax_models
                           else export(name, Path(tmp)) if args.variant is None
                           else export_variant(name, Path(tmp), args.variant))
            except Exception as exc:  # noqa: BLE001 - the exporter or quantizer cannot: recorded
                rows[f"{name}__{args.variant}"] = {"skipped": f"{type(exc).__name__}: {exc}"[:200]}
                print(f"{name:38s} skipped: {rows[f'{name}__{args.variant}']['skipped'][:100]}", flush=True)
                continue
            for exporter, path in exports.items():
                key = f"{name}__{exporter}"
                rows[key] = measure(path)
                r = rows[key]
                runs = [k for k in r if isinstance(r[k], dict)]
                ok = sum(1 for k in runs if r[k].get("verified"))
                print(
                    f"{key:38s} groups {r['groups']:2d} prunable {r['prunable']:2d}  verified {ok}/{len(runs)}  "
                    f"cosine refit {_worst(r, 'calibrated')} / none {_worst(r, 'calibrated_none')}",
                    flush=True,
                )
    previous = json.loads(results.read_text()).get("rows", {}) if results.exists() else {}
    previous.update(rows)
    results.write_text(
        json.dumps(
            {
                "command": "python bench/architecture_patterns.py " + " ".join(sys.argv[1:]),
                "rows": previous,
            },
            indent=1,
            default=str,
        )
        + "\n"
    )
    runs = [v for r in rows.values() for v in r.values() if isinstance(v, dict)]
    print(
        json.dumps(
            {
                "exports": sum(1 for r in rows.values() if "skipped" not in r),
                "skipped": sum(1 for r in rows.values() if "skipped" in r),
                "runs": len(runs),
                "verified": sum(1 for v in runs if v.get("verified")),
                "errors": sum(1 for v in runs if "error" in v),
                "seconds": round(time.time() - started),
            }
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
