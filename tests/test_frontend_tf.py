"""TensorFlow/Keras frontend: Keras -> ONNX (tf2onnx) -> prune at 0.5 -> verified exactly.

Skipped when TensorFlow or tf2onnx is not installed (``pip install graphprune[tf]``). The
keras.applications models (MobileNetV2, ResNet50, EfficientNetB0) take minutes to convert
and live in ``bench/keras_applications.py``; these tests use small models built here.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest

tf = pytest.importorskip("tensorflow")
pytest.importorskip("tf2onnx")
keras = pytest.importorskip("keras")

from graphprune.frontends import tensorflow as gtf  # noqa: E402

import graphprune  # noqa: E402
from graphprune.errors import UsageError  # noqa: E402

pytestmark = pytest.mark.tf


def functional_model(seed: int = 0) -> keras.Model:
    """Conv-BN-ReLU, a residual Add, a depthwise branch joined by Concat, Flatten -> Dense."""
    keras.utils.set_random_seed(seed)
    layers = keras.layers
    image = keras.Input((12, 12, 3), name="image")
    x = layers.Conv2D(8, 3, padding="same", use_bias=False, name="stem")(image)
    x = layers.ReLU()(layers.BatchNormalization(name="stem_bn")(x))
    y = layers.Conv2D(8, 3, padding="same", name="res_conv")(x)
    y = layers.BatchNormalization(name="res_bn")(y)
    x = layers.ReLU()(layers.Add(name="residual")([x, y]))
    z = layers.DepthwiseConv2D(3, padding="same", name="dw")(x)
    z = layers.Conv2D(6, 1, name="pw")(z)
    x = layers.Concatenate(name="concat")([x, z])
    x = layers.Conv2D(12, 3, strides=2, padding="same", activation="relu", name="down")(x)
    x = layers.MaxPooling2D(name="pool")(x)
    x = layers.Flatten(name="flatten")(x)
    x = layers.Dense(16, activation="relu", name="hidden")(x)
    out = layers.Dense(5, name="logits")(x)
    return gtf.randomize_batchnorm(keras.Model(image, out, name="functional"), seed)


@pytest.fixture(scope="module")
def functional():
    model = functional_model()
    return model, gtf.to_onnx(model)


def test_functional_model_converts_with_keras_names(functional):
    model, proto = functional
    assert [i.name for i in proto.graph.input] == ["image"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    x = np.random.default_rng(0).standard_normal((1, 12, 12, 3)).astype(np.float32)
    assert gtf.check_conversion(model, proto, [x]) < 1e-5


def test_functional_model_prunes_at_half_and_verifies_exactly(functional):
    _, proto = functional
    result = graphprune.prune(proto, ratio=0.5)
    verification = result.report["verification"]
    assert verification["ok"] and verification["max_rel_diff"] <= 1e-4
    assert verification["exact_groups_checked"] == result.report["groups"]["pruned"] >= 3
    assert result.report["params_after"] < 0.6 * result.report["params_before"]
    # the NHWC flatten feeds the Dense layer: its input rows were pruned with the channels
    ops = {n.op_type for n in proto.graph.node}
    assert {"Concat", "Add", "Reshape", "MatMul"} <= ops


def test_sequential_model_converts():
    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((8, 8, 2)), keras.layers.Conv2D(6, 3, activation="relu"),
         keras.layers.Flatten(), keras.layers.Dense(3)]
    )
    proto = gtf.to_onnx(model)  # from_keras fails here with KeyError 'keras_tensor_...'
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 2)).astype(np.float32)
    assert gtf.check_conversion(model, proto, [x]) < 1e-5
    assert graphprune.prune(proto, ratio=0.5).report["verification"]["ok"]


def test_keras_file_and_saved_model(tmp_path):
    model = functional_model(seed=2)
    path = tmp_path / "model.keras"
    model.save(path)
    proto = gtf.to_onnx(str(path))
    x = np.random.default_rng(2).standard_normal((1, 12, 12, 3)).astype(np.float32)
    assert gtf.check_conversion(model, proto, [x]) < 1e-5
    saved = tmp_path / "saved"
    model.export(str(saved), verbose=False)
    from_saved = gtf.to_onnx(saved)
    got = graphprune.verify.validate.run(from_saved, {from_saved.graph.input[0].name: x}, "saved model")
    np.testing.assert_allclose(got[0], np.asarray(model(x)), rtol=1e-4, atol=1e-5)
    # the command line and resolve_source take the same sources
    from graphprune.frontends.cli import resolve_source

    from graphprune.cli import main

    out = tmp_path / "cli.onnx"
    assert main(["export", "keras", str(path), "-o", str(out)]) == 0
    assert [o.name for o in onnx.load(out).graph.output] == ["logits"]
    assert main(["export", "keras", str(path), "-o", str(path)]) == 2  # never over the input
    assert isinstance(resolve_source(str(saved)), onnx.ModelProto)


def test_values_captured_by_the_trace_become_initializers():
    # Keras 3's Normalization (as in EfficientNet) is captured by value, not as a variable
    keras.utils.set_random_seed(3)
    image = keras.Input((6, 6, 3))
    x = keras.layers.Normalization(mean=[0.1, 0.2, 0.3], variance=[1.0, 2.0, 3.0])(image)
    model = keras.Model(image, keras.layers.Conv2D(4, 3, name="conv")(x))
    proto = gtf.to_onnx(model)
    assert len(proto.graph.input) == 1
    x = np.random.default_rng(3).standard_normal((1, 6, 6, 3)).astype(np.float32)
    assert gtf.check_conversion(model, proto, [x]) < 1e-5


def test_exact_gelu_converts_and_a_keras_transformer_block_prunes():
    """Keras 3's ``gelu`` (exact) computes ``erfc``, which tf2onnx does not convert ("Tensorflow
    op Erfc is not supported"): a Keras transformer block failed to convert. Its heads froze
    ("shape element computed by arithmetic": tf2onnx lowers the attention einsums with
    ``ReduceProd`` / ``Max`` of shape reads merging the batch of 1 with the heads) and its
    hidden size too (tf2onnx lowers LayerNormalization to a GlobalAveragePool over
    ``[batch, tokens, hidden]``: a reduction over the hidden axis, not an image axis)."""
    keras.utils.set_random_seed(4)
    tokens = keras.Input((12, 16))
    h = keras.layers.Dense(32)(tokens)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(4, 8)(h, h))
    f = keras.layers.Dense(32)(keras.layers.Dense(64, activation="gelu")(h))
    h = keras.layers.LayerNormalization()(h + f)
    model = keras.Model(tokens, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling1D()(h)))
    proto = gtf.to_onnx(model)
    assert "Erf" in {n.op_type for n in proto.graph.node}
    x = np.random.default_rng(4).standard_normal((1, 12, 16)).astype(np.float32)
    assert gtf.check_conversion(model, proto, [x]) < 1e-4
    analysis = graphprune.analyze(proto)
    hidden = [g for g in analysis.groups if g.num_units == 32]
    assert len(hidden) == 1 and not hidden[0].frozen
    assert any("GlobalAveragePool reduces this axis" in r for r in hidden[0].inexact)
    result = graphprune.prune(proto, ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["verification"]["max_abs_diff"] < 1e-4
    assert result.report["kinds"]["head"]["prunable"] == 1 and result.report["kinds"]["head"]["units"] == 4
    assert result.report["params_after"] < 0.6 * result.report["params_before"]


def test_keras_attention_heads_prune_with_an_open_batch():
    """With the batch left open, tf2onnx's einsums merge it with the heads as
    ``ReduceProd([B, H])`` of shape reads: a product recomputed at run time, exact after
    pruning where the reshape merges exactly those axes (before: the heads froze)."""
    import onnxruntime as ort

    keras.utils.set_random_seed(5)
    q, kv = keras.Input((12, 16)), keras.Input((7, 20))
    h = keras.layers.Dense(32)(q)
    h = keras.layers.LayerNormalization()(h + keras.layers.MultiHeadAttention(4, 8, value_dim=6)(h, kv))
    model = keras.Model([q, kv], keras.layers.Dense(3)(h))
    proto = gtf.to_onnx(model, batch_size=None)
    result = graphprune.prune(proto, ratio=0.5)
    assert result.report["verification"]["ok"]
    assert result.report["kinds"]["head"]["prunable"] == 1
    session = ort.InferenceSession(result.model.SerializeToString())
    rng = np.random.default_rng(5)
    feeds = {i.name: rng.standard_normal((3, *i.shape[1:])).astype(np.float32) for i in session.get_inputs()}
    batched = session.run(None, feeds)[0]
    single = [session.run(None, {k: v[b:b + 1] for k, v in feeds.items()})[0] for b in range(3)]
    np.testing.assert_allclose(batched, np.concatenate(single), atol=1e-5)


def grouped_model():
    """ConvNeXt's depthwise convolution written as ``Conv2D(groups=channels)`` and a RegNet-style
    grouped one: Keras 3 runs both in a nested XLA function that tf2onnx cannot convert."""
    keras.utils.set_random_seed(3)
    image = keras.Input((10, 10, 8))
    x = keras.layers.Conv2D(16, 1, activation="relu")(image)
    x = keras.layers.Conv2D(16, 7, padding="same", groups=16, name="depthwise")(x)
    x = keras.layers.Conv2D(32, 3, padding="same", groups=4, activation="relu", name="grouped")(x)
    x = keras.layers.Conv2D(8, 1)(x)
    return keras.Model(image, keras.layers.Dense(3)(keras.layers.GlobalAveragePooling2D()(x)))


def test_grouped_convs_convert_to_grouped_onnx_convs_and_prune():
    from keras.src.backend.tensorflow import nn as backend_nn

    conv = backend_nn.conv
    model = grouped_model()
    proto = gtf.to_onnx(model)
    assert backend_nn.conv is conv  # the tracing hook is gone once converted
    groups = sorted(next((a.i for a in n.attribute if a.name == "group"), 1)
                    for n in proto.graph.node if n.op_type == "Conv")
    assert groups == [1, 1, 4, 16]
    x = np.random.default_rng(0).standard_normal((2, 10, 10, 8)).astype(np.float32)
    assert gtf.check_conversion(model, gtf.to_onnx(model, batch_size=2), [x]) < 1e-4
    result = graphprune.prune(proto, ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["groups"]["pruned"] >= 2


def test_a_grouped_conv3d_is_refused_rather_than_converted_wrong():
    """tf2onnx writes a grouped 3-D convolution as an ONNX ``Conv`` without its ``group``
    (ONNX Runtime then refuses the model): it is refused before conversion."""
    volume = keras.Input((6, 6, 6, 4))
    model = keras.Model(volume, keras.layers.Conv3D(4, 3, groups=2, name="grouped3d")(volume))
    with pytest.raises(gtf.ConversionError, match="Conv3D 'grouped3d' has groups=2"):
        gtf.to_onnx(model)


def test_grouped_conv_is_refused_where_keras_has_no_hook(monkeypatch):
    import contextlib

    @contextlib.contextmanager
    def missing():
        yield False

    monkeypatch.setattr(gtf, "_grouped_convs_traced_plain", missing)
    image = keras.Input((8, 8, 4))
    model = keras.Model(image, keras.layers.Conv2D(4, 3, groups=2, name="grouped")(image))
    with pytest.raises(gtf.ConversionError, match="Conv2D 'grouped' has groups=2"):
        gtf.to_onnx(model)


def test_unknown_dimensions_need_input_shapes():
    image = keras.Input((None, None, 3))
    model = keras.Model(image, keras.layers.Conv2D(4, 3)(image))
    with pytest.raises(UsageError, match="input_shapes"):
        gtf.to_onnx(model)
    proto = gtf.to_onnx(model, input_shapes=[(1, 10, 10, 3)])
    assert isinstance(proto, onnx.ModelProto)


def test_bad_paths_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="no such model"):
        gtf.to_onnx(tmp_path / "missing.keras")
    (tmp_path / "model.txt").write_text("x")
    with pytest.raises(UsageError, match="expected a .keras"):
        gtf.to_onnx(tmp_path / "model.txt")
