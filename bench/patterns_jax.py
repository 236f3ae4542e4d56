"""Architecture patterns built in JAX (Flax NNX) and exported by jax2onnx.

A third exporter family beside torch and tf2onnx (``bench/architecture_patterns.py`` runs
them when ``jax2onnx`` and ``flax`` import; they are not test dependencies): NHWC
convolutions with ``feature_group_count``, Flax's ``MultiHeadAttention`` (its ``DotGeneral``
lowered to ``MatMul``/``Einsum``), RMSNorm, token mixing, transposed convolutions, an embedding
table and a scanned GRU cell. Random weights (``nnx.Rngs(0)``); each model is exported with the
batch fixed to 1 (``jax2onnx``) and left open (``jax2onnx_dynamic_batch``, a symbolic ``B``).

    /tmp/jaxvenv/bin/python bench/architecture_patterns.py --only jax_cnn_residual,...
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any


def jax_patterns() -> dict[str, tuple[Callable[[], Any], list[tuple[tuple[int, ...], str]]]]:
    """Name -> (builder, inputs as (shape with the batch first, dtype)). Raises ImportError
    without flax and jax2onnx."""
    import jax
    import jax.numpy as jnp
    import jax2onnx  # noqa: F401 - the exporter must be there too
    from flax import nnx

    class CnnResidual(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.c1 = nnx.Conv(3, 16, (3, 3), rngs=rngs)
            self.bn1 = nnx.BatchNorm(16, rngs=rngs)
            self.c2 = nnx.Conv(16, 32, (3, 3), strides=(2, 2), rngs=rngs)
            self.c3 = nnx.Conv(32, 32, (3, 3), rngs=rngs)
            self.bn3 = nnx.BatchNorm(32, rngs=rngs)
            self.head = nnx.Linear(32, 10, rngs=rngs)

        def __call__(self, x):
            x = nnx.relu(self.bn1(self.c1(x)))
            x = nnx.relu(self.c2(x))
            x = x + nnx.relu(self.bn3(self.c3(x)))
            return self.head(x.mean(axis=(1, 2)))

    class Separable(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.stem = nnx.Conv(3, 24, (3, 3), rngs=rngs)
            self.dw = nnx.Conv(24, 24, (3, 3), feature_group_count=24, rngs=rngs)
            self.pw = nnx.Conv(24, 48, (1, 1), rngs=rngs)
            self.gn = nnx.GroupNorm(48, num_groups=8, rngs=rngs)
            self.head = nnx.Linear(48, 6, rngs=rngs)

        def __call__(self, x):
            x = nnx.swish(self.stem(x))
            x = nnx.swish(self.gn(self.pw(nnx.relu(self.dw(x)))))
            return self.head(x.max(axis=(1, 2)))

    class Block(nnx.Module):
        def __init__(self, d: int, rngs: nnx.Rngs) -> None:
            self.ln1 = nnx.LayerNorm(d, rngs=rngs)
            self.att = nnx.MultiHeadAttention(num_heads=4, in_features=d, qkv_features=d, decode=False, rngs=rngs)
            self.ln2 = nnx.LayerNorm(d, rngs=rngs)
            self.f1 = nnx.Linear(d, 4 * d, rngs=rngs)
            self.f2 = nnx.Linear(4 * d, d, rngs=rngs)

        def __call__(self, x):
            x = x + self.att(self.ln1(x))
            return x + self.f2(nnx.gelu(self.f1(self.ln2(x))))

    class Encoder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.emb = nnx.Linear(12, 32, rngs=rngs)
            self.blocks = nnx.List([Block(32, rngs), Block(32, rngs)])
            self.head = nnx.Linear(32, 5, rngs=rngs)

        def __call__(self, x):
            x = self.emb(x)
            for block in self.blocks:
                x = block(x)
            return self.head(x.mean(axis=1))

    class TokenEncoder(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.embed = nnx.Embed(100, 32, rngs=rngs)
            self.block = Block(32, rngs)
            self.head = nnx.Linear(32, 3, rngs=rngs)

        def __call__(self, ids):
            return self.head(self.block(self.embed(ids))[:, 0])

    class SwiGLU(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.norm = nnx.RMSNorm(32, rngs=rngs)
            self.gate = nnx.Linear(32, 64, use_bias=False, rngs=rngs)
            self.up = nnx.Linear(32, 64, use_bias=False, rngs=rngs)
            self.down = nnx.Linear(64, 32, use_bias=False, rngs=rngs)
            self.head = nnx.Linear(32, 4, rngs=rngs)

        def __call__(self, x):
            h = self.norm(x)
            x = x + self.down(nnx.silu(self.gate(h)) * self.up(h))
            return self.head(x)

    class Mixer(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.tok1 = nnx.Linear(16, 32, rngs=rngs)
            self.tok2 = nnx.Linear(32, 16, rngs=rngs)
            self.ch1 = nnx.Linear(24, 48, rngs=rngs)
            self.ch2 = nnx.Linear(48, 24, rngs=rngs)
            self.norm = nnx.LayerNorm(24, rngs=rngs)
            self.head = nnx.Linear(24, 5, rngs=rngs)

        def __call__(self, x):  # [B, 16 tokens, 24 channels]
            t = jnp.swapaxes(self.norm(x), 1, 2)
            x = x + jnp.swapaxes(self.tok2(nnx.gelu(self.tok1(t))), 1, 2)
            x = x + self.ch2(nnx.gelu(self.ch1(self.norm(x))))
            return self.head(x.mean(axis=1))

    class UpSample(nnx.Module):
        def __init__(self, rngs: nnx.Rngs) -> None:
            self.down = nnx.Conv(3, 16, (3, 3), strides=(2, 2), rngs=rngs)
            self.mid = nnx.Conv(16, 32, (3, 3), rngs=rngs)
            self.up = nnx.ConvTranspose(32, 16, (2, 2), strides=(2, 2), rngs=rngs)
            self.out = nnx.Conv(16, 2, (1, 1), rngs=rngs)

        def __call__(self, x):
            return self.out(nnx.relu(self.up(nnx.relu(self.mid(nnx.relu(self.down(x)))))))

    class ScanGRU(nnx.Module):
        """A GRU written as ``jax.lax.scan`` over the steps (jax2onnx: a ``Scan``/``Loop``)."""

        def __init__(self, rngs: nnx.Rngs) -> None:
            self.inp = nnx.Linear(8, 16, rngs=rngs)
            self.wx = nnx.Linear(16, 72, rngs=rngs)
            self.wh = nnx.Linear(24, 72, use_bias=False, rngs=rngs)
            self.head = nnx.Linear(24, 4, rngs=rngs)

        def __call__(self, x):  # [B, steps, 8]
            wx, bx, wh = self.wx.kernel.value, self.wx.bias.value, self.wh.kernel.value

            def step(h, xt):
                gx, gh = xt @ wx + bx, h @ wh
                z = jax.nn.sigmoid(gx[:, :24] + gh[:, :24])
                r = jax.nn.sigmoid(gx[:, 24:48] + gh[:, 24:48])
                n = jnp.tanh(gx[:, 48:] + r * gh[:, 48:])
                h = (1 - z) * n + z * h
                return h, h

            h0 = jnp.zeros((x.shape[0], 24), x.dtype)
            h, _ = jax.lax.scan(step, h0, jnp.swapaxes(nnx.relu(self.inp(x)), 0, 1))
            return self.head(h)

    image = [((1, 16, 16, 3), "float32")]
    return {
        "jax_cnn_residual": (lambda: CnnResidual(nnx.Rngs(0)), image),
        "jax_separable_groupnorm": (lambda: Separable(nnx.Rngs(0)), image),
        "jax_transformer": (lambda: Encoder(nnx.Rngs(0)), [((1, 10, 12), "float32")]),
        "jax_token_encoder": (lambda: TokenEncoder(nnx.Rngs(0)), [((1, 10), "int32")]),
        "jax_swiglu_rmsnorm": (lambda: SwiGLU(nnx.Rngs(0)), [((1, 10, 32), "float32")]),
        "jax_mixer": (lambda: Mixer(nnx.Rngs(0)), [((1, 16, 24), "float32")]),
        "jax_conv_transpose": (lambda: UpSample(nnx.Rngs(0)), image),
        "jax_scan_gru": (lambda: ScanGRU(nnx.Rngs(0)), [((1, 6, 8), "float32")]),
    }


def export_jax(name: str, spec: tuple[Callable[[], Any], list], folder: Path) -> dict[str, Path]:
    """jax2onnx with the batch fixed to 1 and left open (``B``)."""
    import jax
    import onnx
    from jax2onnx import to_onnx

    build, inputs = spec
    model = build()
    out = {}
    for label, batch in (("jax2onnx", 1), ("jax2onnx_dynamic_batch", "B")):
        shapes = [jax.ShapeDtypeStruct(
            (batch, *shape[1:]) if batch == 1 else jax.export.symbolic_shape(", ".join(["B", *map(str, shape[1:])])),
            dtype) for shape, dtype in inputs]
        proto = to_onnx(model, shapes)
        path = folder / f"{name}__{label}.onnx"
        onnx.save(proto, str(path))
        out[label] = path
    return out
