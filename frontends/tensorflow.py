"""TensorFlow / Keras frontend: a Keras 3 model, a ``.keras``/``.h5`` file or a SavedModel -> ONNX.

The conversion goes through tf2onnx, with three known problems handled here:

- **Output names.** ``tf2onnx.convert.from_keras`` looks a Keras 3 model's outputs up by
  name and fails on Sequential models (``KeyError: 'keras_tensor_3'``). We trace our own
  ``tf.function`` that returns a dict keyed by the output layers' names and convert it
  with ``from_function``: graph inputs and outputs are named after the Keras inputs and
  output layers, for Sequential and functional models alike.
- **Grouped convolutions.** Keras 3 runs a ``Conv1D/2D/3D`` with ``groups > 1`` (ConvNeXt's
  depthwise convolutions, RegNet's and ResNeXt's grouped ones) inside a nested XLA-compiled
  function (TensorFlow's CPU kernel cannot run it), which tf2onnx leaves as a
  ``StatefulPartitionedCall`` that no runtime runs. The conversion traces the model with
  those convolutions as plain ``tf.nn.convolution`` (:func:`_grouped_convs_traced_plain`;
  the trace is converted, never run), which tf2onnx writes as an ONNX ``Conv`` with its
  ``group``. A ``Conv3D`` with groups (tf2onnx drops its ``group``), and any grouped
  convolution where that hook is missing (another Keras), is refused up front with
  :class:`ConversionError` naming the layer; any result with an op outside ONNX is refused too.
- **Layout.** Keras is NHWC; tf2onnx inserts Transposes around the NCHW ONNX Conv and
  pushes most of them away. ``Flatten`` before ``Dense`` flattens an NHWC tensor, so the
  features are ordered H, W, C and channel ``c`` owns every ``C``-th feature; graphprune's
  Reshape rule couples that (a ``Digit`` map with the channel as the inner factor).

tf2onnx folds BatchNormalization into the preceding Conv where it can; the export is for
pruning and deployment, not for mapping back to Keras variables (left for later).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from graphprune.errors import GraphPruneError, UsageError

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

__all__ = [
    "DEFAULT_OPSET",
    "ConversionError",
    "check_conversion",
    "load",
    "prune_model",
    "randomize_batchnorm",
    "to_onnx",
]

#: tf2onnx's opset when none is given (LayerNormalization, current Resize, ...)
DEFAULT_OPSET = 17
KERAS_SUFFIXES = (".keras", ".h5", ".hdf5")


class ConversionError(GraphPruneError):
    """tf2onnx could not convert the model, or produced ops no ONNX runtime knows."""


def _keras() -> Any:
    import keras

    return keras


def load(source: str | os.PathLike[str]) -> Any:
    """A Keras model from a ``.keras``/``.h5`` file, or a loaded SavedModel directory."""
    path = Path(source)
    if not path.exists():
        raise UsageError(f"no such model: {path}")
    try:
        if path.is_dir():
            if not (path / "saved_model.pb").exists():
                raise UsageError(f"'{path}' is a directory without saved_model.pb")
            return tf.saved_model.load(str(path))
        if path.suffix.lower() in KERAS_SUFFIXES:
            return _keras().models.load_model(str(path), compile=False)
    except GraphPruneError:
        raise
    except Exception as exc:
        raise ConversionError(f"cannot load '{path}': {_first_line(exc)}") from exc
    raise UsageError(f"'{path}': expected a .keras/.h5 file or a SavedModel directory")


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _all_layers(model: Any) -> Iterable[Any]:
    stack = list(getattr(model, "layers", []))
    while stack:
        layer = stack.pop(0)
        yield layer
        stack.extend(getattr(layer, "layers", []))


@contextlib.contextmanager
def _grouped_convs_traced_plain() -> Iterator[bool]:
    """While tracing, Keras' TensorFlow backend computes a grouped convolution (the kernel's
    input channels fewer than the input's) with ``tf.nn.convolution`` itself instead of its
    XLA-compiled wrapper; every other convolution as before. Yields whether the hook exists."""
    try:
        from keras.src.backend.tensorflow import nn as backend_nn
    except ImportError:
        yield False
        return
    original = getattr(backend_nn, "conv", None)
    to_tf = getattr(backend_nn, "_convert_data_format", None)
    standard = getattr(getattr(backend_nn, "backend", None), "standardize_data_format", None)
    if original is None or to_tf is None or standard is None:
        yield False
        return

    def conv(inputs, kernel, strides=1, padding="valid", data_format=None, dilation_rate=1):
        last = standard(data_format) == "channels_last"
        channels = inputs.shape[-1] if last else inputs.shape[1]
        if channels == kernel.shape[-2] or len(inputs.shape) > 4:  # tf2onnx drops a 3-D one's group
            return original(inputs, kernel, strides, padding, data_format, dilation_rate)
        return tf.nn.convolution(inputs, kernel, strides, padding.upper(),
                                 data_format=to_tf(data_format, len(inputs.shape)), dilations=dilation_rate)

    backend_nn.conv = conv
    try:
        yield True
    finally:
        backend_nn.conv = original


def _refuse_grouped_convs(model: Any, hooked: bool) -> None:
    """Refuse the grouped convolutions that do not convert: every one without the tracing
    hook, a 3-D one with it (tf2onnx writes its ONNX ``Conv`` without the ``group``)."""
    keras = _keras()
    plain = (keras.layers.Conv3D,) if hooked else (keras.layers.Conv1D, keras.layers.Conv2D, keras.layers.Conv3D)
    for layer in _all_layers(model):
        if isinstance(layer, plain) and int(getattr(layer, "groups", 1)) > 1:
            raise ConversionError(
                f"{type(layer).__name__} '{layer.name}' has groups={layer.groups}: this grouped "
                "convolution does not convert to ONNX (tf2onnx leaves a StatefulPartitionedCall"
                + (" or drops the group" if hooked else "") + "); use a depthwise layer or split it"
            )


def _specs(
    shapes: Sequence[Sequence[int | None]],
    dtypes: Sequence[Any],
    names: Sequence[str],
    input_shapes: Sequence[Sequence[int]] | None,
    batch_size: int | None,
) -> list[tf.TensorSpec]:
    if input_shapes is not None and len(input_shapes) != len(shapes):
        raise UsageError(f"the model has {len(shapes)} inputs, {len(input_shapes)} shapes were given")
    specs = []
    for i, (shape, dtype, name) in enumerate(zip(shapes, dtypes, names, strict=True)):
        dims = list(input_shapes[i]) if input_shapes is not None else list(shape)
        if input_shapes is None and dims and dims[0] is None:
            dims[0] = batch_size
        if any(d is None for d in dims[1:]):
            raise UsageError(
                f"input '{name}' has unknown dimensions {tuple(dims)}: give input_shapes"
            )
        specs.append(tf.TensorSpec(dims, dtype, name=name))
    return specs


def _unique(names: Iterable[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for name in names:
        clean = name.replace("/", "_").replace(":", "_") or "output"
        n = seen.get(clean, 0)
        seen[clean] = n + 1
        out.append(clean if n == 0 else f"{clean}_{n}")
    return out


def _output_name(tensor: Any, index: int) -> str:
    """The name of the layer that produces a Keras output tensor."""
    history = getattr(tensor, "_keras_history", None)
    operation = getattr(history, "operation", None)
    return getattr(operation, "name", None) or f"output_{index}"


def _keras_function(model: Any, input_shapes, batch_size) -> tuple[Any, list[tf.TensorSpec]]:
    inputs = list(model.inputs)
    names = _unique(getattr(t, "name", f"input_{i}").split(":")[0] for i, t in enumerate(inputs))
    specs = _specs(
        [tuple(t.shape) for t in inputs], [t.dtype for t in inputs], names, input_shapes, batch_size
    )
    out_names = _unique(_output_name(t, i) for i, t in enumerate(model.outputs))

    @tf.function(input_signature=specs)
    def function(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        result = model(list(args) if len(args) > 1 else args[0], training=False)
        flat = tf.nest.flatten(result)
        return dict(zip(out_names, flat, strict=True))

    return function, specs


def _saved_model_function(loaded: Any, input_shapes, batch_size, signature: str) -> tuple[Any, list[tf.TensorSpec]]:
    signatures = getattr(loaded, "signatures", {})
    if signature not in signatures:
        raise ConversionError(f"the SavedModel has no signature '{signature}' (has {sorted(signatures)})")
    concrete = signatures[signature]
    declared = concrete.structured_input_signature[1]
    names = sorted(declared)
    specs = _specs(
        [tuple(declared[n].shape) for n in names], [declared[n].dtype for n in names],
        names, input_shapes, batch_size,
    )

    @tf.function(input_signature=specs)
    def function(*args: tf.Tensor) -> dict[str, tf.Tensor]:
        return dict(concrete(**dict(zip(names, args, strict=True))))

    return function, specs


def _check_ops(model: onnx.ModelProto) -> None:
    bad = sorted(
        {
            f"{n.op_type} '{n.name}'"
            for n in model.graph.node
            if not onnx.defs.has(n.op_type, n.domain or "")
        }
    )
    if bad:
        hint = ""
        if any("conv" in b.lower() for b in bad):
            hint = " (a grouped Conv2D converts to this; use DepthwiseConv2D or split it)"
        raise ConversionError(f"tf2onnx left ops that are not ONNX: {', '.join(bad[:5])}{hint}")


def _erfc(ctx: Any, node: Any, name: str, args: list[Any]) -> None:
    """tf2onnx handler for ``Erfc`` (Keras 3's exact ``gelu`` computes ``erfc``; tf2onnx
    has no handler for it): ``1 - Erf(x)``."""
    from tf2onnx import utils

    x = node.input[0]
    dtype = utils.map_onnx_to_numpy_type(ctx.get_dtype(x))
    erf = ctx.make_node("Erf", [x])
    one = ctx.make_const(utils.make_name(f"{node.name}_one"), np.array(1, dtype=dtype))
    node.type = "Sub"
    ctx.replace_inputs(node, [one.output[0], erf.output[0]])


#: TensorFlow ops tf2onnx does not convert, written as ONNX ops here
CUSTOM_OPS = {"Erfc": (_erfc, [])}


def to_onnx(
    model: Any,
    *,
    input_shapes: Sequence[Sequence[int]] | None = None,
    batch_size: int | None = 1,
    opset: int = DEFAULT_OPSET,
    signature: str = "serving_default",
) -> onnx.ModelProto:
    """Convert a Keras model, a ``.keras``/``.h5`` path or a SavedModel (path or loaded).

    Unknown batch dimensions become ``batch_size`` (``None`` keeps them symbolic); other
    unknown dimensions need ``input_shapes`` (full shapes, batch included, one per input).
    """
    if isinstance(model, str | os.PathLike):
        model = load(model)
    import tf2onnx

    keras_model = isinstance(model, _keras().Model)
    traced = _grouped_convs_traced_plain() if keras_model else contextlib.nullcontext(True)
    if keras_model:
        if not getattr(model, "built", True) or not getattr(model, "inputs", None):
            raise UsageError("the Keras model has no defined inputs: build or call it first")
        function, specs = _keras_function(model, input_shapes, batch_size)
        what = f"Keras model '{model.name}'"
    else:
        function, specs = _saved_model_function(model, input_shapes, batch_size, signature)
        what = "SavedModel"
    try:
        with traced as hooked:
            if keras_model:
                _refuse_grouped_convs(model, hooked)
            proto, _ = tf2onnx.convert.from_function(function, input_signature=specs, opset=opset,
                                                     custom_op_handlers=CUSTOM_OPS)
            _freeze_captured_inputs(proto, function.get_concrete_function(*specs), len(specs))
    except GraphPruneError:
        raise
    except Exception as exc:
        raise ConversionError(f"tf2onnx could not convert the {what}: {_first_line(exc)}") from exc
    _check_ops(proto)
    return proto


def _freeze_captured_inputs(proto: onnx.ModelProto, concrete: Any, real_inputs: int) -> None:
    """Turn graph inputs that are captured tensors into initializers.

    ``from_function`` freezes captured *variables* but leaves tensors captured by value
    (the mean and variance of Keras 3's ``Normalization`` layer in EfficientNet) as extra
    graph inputs; give them their captured values.
    """
    placeholders = list(concrete.inputs)[real_inputs:]
    captured = list(concrete.captured_inputs)
    values = {
        p.name: np.asarray(c.numpy())
        for p, c in zip(placeholders, captured, strict=False)
        if c.dtype != tf.resource and hasattr(c, "numpy")
    }
    extra = [i for i in proto.graph.input if i.name in values]
    if not extra:
        return
    for value in extra:
        proto.graph.initializer.append(onnx.numpy_helper.from_array(values[value.name], value.name))
        proto.graph.input.remove(value)


def randomize_batchnorm(model: Any, seed: int = 0) -> Any:
    """Give every BatchNormalization non-trivial statistics and affine parameters.

    A fresh BN (mean 0, variance 1, scale 1, shift 0) is nearly the identity and hides
    mistakes in how pruning treats it; benches and tests randomise it first.
    """
    keras = _keras()
    rng = np.random.default_rng(seed)
    draw = {
        "gamma": lambda n: rng.uniform(0.5, 1.5, n),
        "beta": lambda n: rng.normal(0.0, 0.2, n),
        "moving_mean": lambda n: rng.normal(0.0, 0.2, n),
        "moving_variance": lambda n: rng.uniform(0.5, 2.0, n),
    }
    for layer in _all_layers(model):
        if not isinstance(layer, keras.layers.BatchNormalization):
            continue
        for weight in layer.weights:
            key = weight.path.split("/")[-1] if hasattr(weight, "path") else weight.name
            fn = draw.get(key.split(":")[0])
            if fn is not None:
                weight.assign(np.asarray(fn(tuple(weight.shape)), dtype=np.float32))
    return model


def check_conversion(
    model: Any, proto: onnx.ModelProto, inputs: Sequence[np.ndarray], *, tolerance: float = 1e-4
) -> float:
    """Largest relative difference between the Keras model and its ONNX on ``inputs``."""
    from graphprune.errors import VerificationError
    from graphprune.verify.validate import differences, run

    result = model([tf.constant(x) for x in inputs] if len(inputs) > 1 else tf.constant(inputs[0]), training=False)
    expected = [np.asarray(t) for t in tf.nest.flatten(result)]
    names = [i.name for i in proto.graph.input]
    got = run(proto, dict(zip(names, inputs, strict=True)), "the converted model")
    _, rel = differences(expected, got)
    if rel > tolerance:
        raise VerificationError(f"ONNX and Keras outputs differ: max relative difference {rel:.3g}")
    return rel


def prune_model(model: Any, *, convert: dict[str, Any] | None = None, **prune_options: Any) -> Any:
    """Convert with :func:`to_onnx` (``convert`` holds its options) and run ``graphprune.prune``."""
    from graphprune.api import prune

    return prune(to_onnx(model, **(convert or {})), **prune_options)
