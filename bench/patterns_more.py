"""The second batch of architecture patterns (round 18): diffusion U-Net blocks, ConvNeXt,
detection heads, causal SDPA, padding modes, space-to-depth, maxout, attention pooling,
size-driven up-sampling, a CRNN with a bidirectional LSTM, masked attention, Ghost and Res2Net
modules, channel attention, non-local blocks, in-place slice assignment, multiple outputs,
tabular BatchNorm1d, channel multipliers and adaptive pooling to a grid. Registered into
``architecture_patterns.MODELS`` (one module, one pattern each, random weights).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMG = (1, 3, 32, 32)


class DiffusionRes(nn.Module):  # U-Net ResBlock with a time embedding added per channel
    def __init__(self):
        super().__init__()
        self.c0 = nn.Conv2d(3, 32, 3, padding=1)
        self.t1 = nn.Linear(16, 64)
        self.t2 = nn.Linear(64, 48)
        self.n1 = nn.GroupNorm(8, 32)
        self.c1 = nn.Conv2d(32, 48, 3, padding=1)
        self.n2 = nn.GroupNorm(8, 48)
        self.c2 = nn.Conv2d(48, 48, 3, padding=1)
        self.skip = nn.Conv2d(32, 48, 1)
        self.o = nn.Conv2d(48, 3, 3, padding=1)

    def forward(self, x, t):  # t: [B, 1] time step
        half = 8
        freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / half)
        arg = t * freqs[None]
        emb = self.t2(F.silu(self.t1(torch.cat([arg.sin(), arg.cos()], -1))))
        h0 = self.c0(x)
        h = self.c1(F.silu(self.n1(h0)))
        h = h + emb[:, :, None, None]
        h = self.c2(F.silu(self.n2(h)))
        return self.o(h + self.skip(h0))


class ChannelsFirstLN(nn.Module):  # ConvNeXt's LayerNorm over channels, written by hand
    def __init__(self, c):
        super().__init__()
        self.w = nn.Parameter(torch.rand(c) + 0.5)
        self.b = nn.Parameter(torch.randn(c) * 0.1)

    def forward(self, x):
        u = x.mean(1, keepdim=True)
        s = (x - u).pow(2).mean(1, keepdim=True)
        x = (x - u) / torch.sqrt(s + 1e-6)
        return self.w[:, None, None] * x + self.b[:, None, None]


class ConvNeXt(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 32, 4, stride=4)
        self.ln0 = ChannelsFirstLN(32)
        self.dw = nn.Conv2d(32, 32, 7, padding=3, groups=32)
        self.ln = nn.LayerNorm(32)
        self.pw1 = nn.Linear(32, 128)
        self.pw2 = nn.Linear(128, 32)
        self.gamma = nn.Parameter(torch.rand(32))
        self.down_ln = ChannelsFirstLN(32)
        self.down = nn.Conv2d(32, 64, 2, stride=2)
        self.head = nn.Linear(64, 10)

    def forward(self, x):
        h = self.ln0(self.stem(x))
        y = self.dw(h).permute(0, 2, 3, 1)
        y = self.pw2(F.gelu(self.pw1(self.ln(y)))) * self.gamma
        h = h + y.permute(0, 3, 1, 2)
        h = self.down(self.down_ln(h))
        return self.head(h.mean((-2, -1)))


class YoloHead(nn.Module):  # anchors x (5 + classes) per cell, decoded in the graph
    def __init__(self):
        super().__init__()
        self.b = nn.Sequential(nn.Conv2d(3, 32, 3, 2, 1), nn.SiLU(), nn.Conv2d(32, 32, 3, 1, 1), nn.SiLU())
        self.det = nn.Conv2d(32, 3 * 7, 1)
        self.register_buffer("anchors", torch.tensor([[10.0, 13.0], [16.0, 30.0], [33.0, 23.0]]))

    def forward(self, x):
        p = self.det(self.b(x))
        B, _, H, W = p.shape
        p = p.view(B, 3, 7, H, W).permute(0, 1, 3, 4, 2).sigmoid()
        gy, gx = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
        grid = torch.stack((gx, gy), 2).view(1, 1, H, W, 2).float()
        xy = (p[..., 0:2] * 2 - 0.5 + grid) * 2
        wh = (p[..., 2:4] * 2) ** 2 * self.anchors.view(1, 3, 1, 1, 2)
        return torch.cat((xy, wh, p[..., 4:]), -1).view(B, -1, 7)


class CausalSDPA(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(50, 32)
        self.qkv = nn.Linear(32, 96)
        self.proj = nn.Linear(32, 32)
        self.mlp = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 32))
        self.ln1, self.ln2 = nn.LayerNorm(32), nn.LayerNorm(32)
        self.head = nn.Linear(32, 50)

    def forward(self, ids):
        h = self.emb(ids)
        B, T, C = h.shape
        q, k, v = self.qkv(self.ln1(h)).split(C, -1)
        q, k, v = (z.view(B, T, 4, C // 4).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.proj(y.transpose(1, 2).reshape(B, T, C))
        h = h + self.mlp(self.ln2(h))
        return self.head(h)


class PadModes(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1, padding_mode="reflect")
        self.c2 = nn.Conv2d(16, 16, 3, padding=1, padding_mode="circular")
        self.c3 = nn.Conv2d(16, 16, 3, padding=1, padding_mode="replicate")
        self.o = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        h = F.relu(self.c2(h)) + h
        return self.o(F.relu(self.c3(F.pad(h, (1, 1, 1, 1), mode="constant", value=0.5))))


class SpaceToDepth(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.pu = nn.PixelUnshuffle(2)
        self.c2 = nn.Conv2d(32, 24, 3, padding=1)
        self.o = nn.Conv2d(24, 4, 1)

    def forward(self, x):
        return self.o(F.relu(self.c2(self.pu(F.relu(self.c1(x))))))


class Maxout(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 3, padding=1)
        self.c2 = nn.Conv2d(16, 16, 3, padding=1)
        self.o = nn.Linear(16, 5)

    def forward(self, x):
        h = self.c1(x)
        B, C, H, W = h.shape
        h = h.view(B, C // 2, 2, H, W).max(2)[0]
        return self.o(F.relu(self.c2(h)).mean((2, 3)))


class AttnPool(nn.Module):  # CLIP's AttentionPool2d
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 4, stride=4)
        self.pos = nn.Parameter(torch.randn(65, 32) * 0.1)
        self.att = nn.MultiheadAttention(32, 4)
        self.o = nn.Linear(32, 6)

    def forward(self, x):
        h = F.relu(self.c(x)).flatten(2).permute(2, 0, 1)  # [HW, B, C]
        h = torch.cat([h.mean(0, keepdim=True), h], 0) + self.pos[:, None, :]
        y, _ = self.att(h[:1], h, h, need_weights=False)
        return self.o(y[0])


class SizeUpsample(nn.Module):  # top-down path sized from the skip's shape
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.lat = nn.Conv2d(16, 32, 1)
        self.o = nn.Conv2d(32, 2, 3, padding=1)

    def forward(self, x):
        a = F.relu(self.c1(x))
        b = F.relu(self.c2(a))
        up = F.interpolate(b, size=a.shape[-2:], mode="bilinear", align_corners=False)
        return self.o(up + self.lat(a))


class CRNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(1, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 32, 3, padding=1)
        self.rnn = nn.LSTM(32 * 4, 24, bidirectional=True, batch_first=True)
        self.o = nn.Linear(48, 11)

    def forward(self, x):  # [B, 1, 16, 40]
        h = F.max_pool2d(F.relu(self.c1(x)), 2)
        h = F.max_pool2d(F.relu(self.c2(h)), (2, 1))  # [B, 32, 4, 20]
        B, C, H, W = h.shape
        h = h.permute(0, 3, 1, 2).reshape(B, W, C * H)
        y, _ = self.rnn(h)
        return self.o(y).log_softmax(-1)


class MaskedAttn(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(30, 32)
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)
        self.proj = nn.Linear(32, 32)
        self.o = nn.Linear(32, 2)

    def forward(self, ids, mask):  # mask: [B, T] float of 0/1
        h = self.emb(ids)
        B, T, C = h.shape
        q, k, v = (m(h).view(B, T, 2, 16).transpose(1, 2) for m in (self.q, self.k, self.v))
        s = q @ k.transpose(-1, -2) / 4.0
        s = s.masked_fill(mask[:, None, None, :] < 0.5, -1e4)
        y = (s.softmax(-1) @ v).transpose(1, 2).reshape(B, T, C)
        h = h + self.proj(y)
        pooled = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
        return self.o(pooled)


class Ghost(nn.Module):  # GhostNet: primary conv + cheap depthwise, concatenated and sliced
    def __init__(self):
        super().__init__()
        self.primary = nn.Sequential(nn.Conv2d(3, 12, 1), nn.BatchNorm2d(12), nn.ReLU())
        self.cheap = nn.Sequential(nn.Conv2d(12, 12, 3, padding=1, groups=12), nn.BatchNorm2d(12), nn.ReLU())
        self.primary2 = nn.Conv2d(20, 16, 1)
        self.cheap2 = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.o = nn.Conv2d(30, 3, 1)

    def forward(self, x):
        a = self.primary(x)
        h = torch.cat([a, self.cheap(a)], 1)[:, :20]
        b = self.primary2(h)
        g = torch.cat([b, self.cheap2(b)], 1)[:, :30]
        return self.o(g)


class Res2Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 32, 1)
        self.convs = nn.ModuleList(nn.Conv2d(8, 8, 3, padding=1) for _ in range(3))
        self.c3 = nn.Conv2d(32, 32, 1)
        self.o = nn.Conv2d(32, 4, 1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        xs = torch.split(h, 8, 1)
        ys, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = xs[i] if sp is None else sp + xs[i]
            sp = F.relu(conv(sp))
            ys.append(sp)
        ys.append(xs[3])
        return self.o(F.relu(self.c3(torch.cat(ys, 1)) + h))


class ChannelAttn(nn.Module):  # DANet's channel attention: a C x C affinity
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gamma = nn.Parameter(torch.tensor(0.5))
        self.o = nn.Conv2d(16, 3, 1)

    def forward(self, x):
        h = F.relu(self.c1(x))
        B, C, H, W = h.shape
        q = h.view(B, C, -1)
        energy = torch.bmm(q, q.permute(0, 2, 1))
        att = torch.softmax(energy.amax(-1, keepdim=True).expand_as(energy) - energy, -1)
        out = torch.bmm(att, q).view(B, C, H, W)
        return self.o(self.gamma * out + h)


class NonLocal(nn.Module):
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 32, 3, stride=2, padding=1)
        self.theta, self.phi, self.g = nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 1), nn.Conv2d(32, 16, 1)
        self.w = nn.Conv2d(16, 32, 1)
        self.o = nn.Conv2d(32, 2, 1)

    def forward(self, x):
        h = F.relu(self.c(x))
        B, C, H, W = h.shape
        t = self.theta(h).flatten(2).transpose(1, 2)
        p = self.phi(h).flatten(2)
        g = self.g(h).flatten(2).transpose(1, 2)
        y = (torch.softmax(t @ p, -1) @ g).transpose(1, 2).reshape(B, 16, H, W)
        return self.o(h + self.w(y))


class SliceAssign(nn.Module):  # YOLO-style in-place edits of some channels
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(16, 8, 1)

    def forward(self, x):
        y = self.c2(F.relu(self.c1(x))).sigmoid()
        y = y.clone()
        y[:, :2] = y[:, :2] * 2.0 - 0.5
        y[:, 2:4] = (y[:, 2:4] * 2.0) ** 2
        return y


class MultiOut(nn.Module):  # logits and the features they were computed from
    def __init__(self):
        super().__init__()
        self.f = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU())
        self.emb = nn.Linear(32, 24)
        self.cls = nn.Linear(24, 7)

    def forward(self, x):
        h = self.f(x).mean((2, 3))
        e = F.relu(self.emb(h))
        return self.cls(e), e


class TabularMLP(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(20, 64)
        self.b1 = nn.BatchNorm1d(64)
        self.l2 = nn.Linear(64, 32)
        self.b2 = nn.BatchNorm1d(32)
        self.o = nn.Linear(32, 3)

    def forward(self, x):
        return self.o(F.relu(self.b2(self.l2(F.relu(self.b1(self.l1(x)))))))


class Multiplier(nn.Module):  # depthwise with a channel multiplier of 2
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.dw = nn.Conv2d(16, 32, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(32, 24, 1)
        self.o = nn.Conv2d(24, 3, 1)

    def forward(self, x):
        return self.o(F.relu(self.pw(F.relu(self.dw(F.relu(self.c1(x)))))))


class GridPool(nn.Module):  # adaptive pooling to 2 x 2, flattened into a dense layer
    def __init__(self):
        super().__init__()
        self.c = nn.Conv2d(3, 16, 3, padding=1)
        self.fc = nn.Linear(16 * 4, 32)
        self.o = nn.Linear(32, 5)

    def forward(self, x):
        h = F.adaptive_avg_pool2d(F.relu(self.c(x)), 2).flatten(1)
        return self.o(F.relu(self.fc(h)))


MODELS = {
    "diffusion_resblock": (DiffusionRes, [IMG, (1, 1)]),
    "convnext_block": (ConvNeXt, [IMG]),
    "yolo_head": (YoloHead, [IMG]),
    "causal_sdpa": (CausalSDPA, [("long", (1, 12))]),
    "pad_modes": (PadModes, [IMG]),
    "space_to_depth": (SpaceToDepth, [IMG]),
    "maxout": (Maxout, [IMG]),
    "attention_pool": (AttnPool, [IMG]),
    "size_upsample": (SizeUpsample, [IMG]),
    "crnn_bilstm": (CRNN, [(1, 1, 16, 40)]),
    "masked_attention": (MaskedAttn, [("long", (1, 10)), ("mask", (1, 10))]),
    "ghost": (Ghost, [IMG]),
    "res2net": (Res2Net, [IMG]),
    "channel_attention": (ChannelAttn, [IMG]),
    "non_local": (NonLocal, [IMG]),
    "slice_assign": (SliceAssign, [IMG]),
    "multi_output": (MultiOut, [IMG]),
    "tabular_bn1d": (TabularMLP, [(4, 20)]),
    "channel_multiplier": (Multiplier, [IMG]),
    "grid_pool": (GridPool, [IMG]),
}


def keras_patterns() -> dict:
    """The second batch of Keras models for tf2onnx (built when TensorFlow is installed)."""
    import keras
    from keras import layers as kl

    def unet():
        x = keras.Input((32, 32, 3))
        a = kl.Conv2D(16, 3, padding="same", activation="relu")(x)
        b = kl.Conv2D(32, 3, padding="same", activation="relu")(kl.MaxPooling2D()(a))
        u = kl.UpSampling2D(interpolation="bilinear")(b)
        h = kl.Conv2D(16, 3, padding="same", activation="relu")(kl.Concatenate()([u, a]))
        return keras.Model(x, kl.Conv2D(2, 1)(h))

    def group_norm():
        x = keras.Input((32, 32, 3))
        h = kl.Conv2D(32, 3, padding="same")(x)
        r = kl.Activation("swish")(kl.GroupNormalization(8)(h))
        r = kl.Conv2D(32, 3, padding="same")(r)
        h = kl.Add()([h, r])
        return keras.Model(x, kl.Conv2D(3, 1)(kl.Activation("swish")(kl.GroupNormalization(4)(h))))

    def convnext():
        x = keras.Input((32, 32, 3))
        h = kl.Conv2D(32, 4, strides=4)(x)
        y = kl.LayerNormalization(epsilon=1e-6)(kl.DepthwiseConv2D(7, padding="same")(h))
        y = kl.Dense(32)(kl.Dense(128, activation="gelu")(y))
        h = kl.Add()([h, y])
        return keras.Model(x, kl.Dense(10)(kl.GlobalAveragePooling2D()(kl.LayerNormalization()(h))))

    def tabular():
        x = keras.Input((20,))
        h = kl.Dropout(0.2)(kl.BatchNormalization()(kl.Dense(64, activation="relu")(x)))
        h = kl.BatchNormalization()(kl.Dense(32, activation="relu")(h))
        return keras.Model(x, kl.Dense(3, activation="softmax")(h))

    def luong_attention():
        q, v = keras.Input((8, 16)), keras.Input((12, 16))
        qh, vh = kl.Dense(24)(q), kl.Dense(24)(v)
        c = kl.Attention()([qh, vh])
        h = kl.Concatenate()([qh, c])
        return keras.Model([q, v], kl.Dense(4)(kl.GlobalAveragePooling1D()(h)))

    def conv3d():
        x = keras.Input((4, 16, 16, 3))
        h = kl.Conv3D(16, 3, padding="same", activation="relu")(x)
        h = kl.Conv3D(24, (1, 3, 3), padding="same", activation="relu")(h)
        return keras.Model(x, kl.Dense(5)(kl.GlobalAveragePooling3D()(h)))

    def activations():
        x = keras.Input((32, 32, 3))
        h = kl.PReLU(shared_axes=[1, 2])(kl.Conv2D(16, 3, padding="same")(x))
        h = kl.LeakyReLU(0.1)(kl.Conv2D(16, 3, padding="same")(h))
        h = kl.ELU()(kl.Conv2D(16, 3, padding="same")(kl.ZeroPadding2D(1)(kl.Cropping2D(1)(h))))
        return keras.Model(x, kl.Conv2D(2, 1)(h))

    def separable_1d():
        x = keras.Input((64, 6))
        h = kl.SeparableConv1D(24, 5, padding="same", activation="relu")(x)
        h = kl.MaxPooling1D(2)(kl.Conv1D(32, 3, activation="relu")(h))
        return keras.Model(x, kl.Dense(3)(kl.GlobalMaxPooling1D()(h)))

    return {"keras_" + f.__name__: f for f in (unet, group_norm, convnext, tabular, luong_attention,
                                                 conv3d, activations, separable_1d)}
