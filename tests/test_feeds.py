"""Tests for graphprune.io.feeds: input specs and deterministic random feeds."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import UsageError
from graphprune.io.feeds import (
    DEFAULT_LENGTH,
    DEFAULT_SPATIAL,
    InputSpec,
    input_specs,
    make_feeds,
    make_feeds_from_specs,
    resolve_shapes,
)


def make_model(
    inputs: list[onnx.ValueInfoProto], initializers: Sequence[onnx.TensorProto] = ()
) -> onnx.ModelProto:
    """Identity on the first input; the other inputs only need to exist."""
    graph = helper.make_graph(
        [helper.make_node("Identity", [inputs[0].name], ["y"])],
        "feeds",
        inputs,
        [helper.make_tensor_value_info("y", inputs[0].type.tensor_type.elem_type, None)],
        list(initializers),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def conv_relu_model() -> onnx.ModelProto:
    weight = np.ones((4, 3, 3, 3), np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        "conv_relu",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, "H", "W_"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight, "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def text_model() -> onnx.ModelProto:
    return make_model(
        [
            helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "seq"]),
            helper.make_tensor_value_info("attention_mask", TensorProto.INT32, ["batch", "seq"]),
            helper.make_tensor_value_info("flags", TensorProto.BOOL, [None, 4]),
            helper.make_tensor_value_info("half", TensorProto.FLOAT16, ["batch", "seq", 16]),
        ]
    )


def test_input_specs_skip_initializers() -> None:
    model = make_model(
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, None]),
            helper.make_tensor_value_info("w", TensorProto.FLOAT, [2]),
        ],
        [numpy_helper.from_array(np.zeros(2, np.float32), "w")],
    )
    assert input_specs(model) == [InputSpec("x", ["N", 3, None], np.dtype(np.float32))]


def test_input_specs_unknown_rank() -> None:
    model = make_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, None)])
    (spec,) = input_specs(model)
    assert spec.shape is None
    with pytest.raises(UsageError, match="no declared rank"):
        make_feeds(model)


def test_non_tensor_input_is_refused() -> None:
    sequence = helper.make_tensor_sequence_value_info("xs", TensorProto.FLOAT, None)
    model = make_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1]), sequence])
    with pytest.raises(UsageError, match="'xs' is a sequence_type"):
        input_specs(model)


def test_image_defaults_and_batch() -> None:
    (feeds,) = make_feeds(conv_relu_model(), batch=2)
    image = feeds["image"]
    assert image.shape == (2, 3, DEFAULT_SPATIAL, DEFAULT_SPATIAL)
    assert image.dtype == np.float32
    assert abs(float(image.mean())) < 0.05 and 0.9 < float(image.std()) < 1.1


def test_channels_last_image() -> None:
    spec = InputSpec("img", [None, "h", "w", 3], np.dtype(np.float32))
    assert resolve_shapes([spec], batch=4) == {"img": (4, 224, 224, 3)}
    spec = InputSpec("img", [1, None, None, None], np.dtype(np.float32))
    assert resolve_shapes([spec]) == {"img": (1, 3, 224, 224)}


def test_integer_pixels_are_an_image_too() -> None:
    """MoveNet multipose (int32) and FaceBoxes (uint8) take ``[1, ?, ?, 3]`` integer images:
    sized 8 x 8 like a sequence, MoveNet's feature pyramid failed to add its levels, and a
    ``--target-latency`` prune of it exited 2."""
    for dtype in (np.uint8, np.int32):
        spec = InputSpec("image", [1, None, "w", 3], np.dtype(dtype))
        assert resolve_shapes([spec]) == {"image": (1, 224, 224, 3)}
    ids = InputSpec("ids", [1, None, None, None], np.dtype(np.int64))  # no declared channels: not an image
    assert resolve_shapes([ids]) == {"ids": (1, DEFAULT_LENGTH, DEFAULT_LENGTH, DEFAULT_LENGTH)}


def test_shared_symbols_and_dtypes() -> None:
    (feeds,) = make_feeds(text_model(), batch=3)
    assert feeds["input_ids"].shape == (3, DEFAULT_LENGTH)
    assert feeds["attention_mask"].shape == (3, DEFAULT_LENGTH)
    assert feeds["flags"].shape == (3, 4)
    assert feeds["half"].shape == (3, DEFAULT_LENGTH, 16)
    assert feeds["input_ids"].dtype == np.int64
    assert feeds["attention_mask"].dtype == np.int32
    assert feeds["flags"].dtype == np.bool_
    assert feeds["half"].dtype == np.float16
    assert set(np.unique(feeds["input_ids"])) <= {0, 1}


def test_question_mark_sizes_are_independent() -> None:
    """paddle2onnx names every open axis '?': a given shape with a different height and width
    is accepted, and the two axes are open dimensions of their own."""
    model = make_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, ["?", 3, "?", "?"])])
    (spec,) = input_specs(model)
    assert spec.shape == [None, 3, None, None]
    assert resolve_shapes([spec], input_shapes={"x": (1, 3, 48, 192)}) == {"x": (1, 3, 48, 192)}
    assert make_feeds(model, input_shapes={"x": (1, 3, 32, 320)})[0]["x"].shape == (1, 3, 32, 320)


def test_given_shapes_win_over_a_symbol_two_inputs_share() -> None:
    """torch's copied ``dynamic_axes`` name unrelated axes alike: LORE's ``[batch, height,
    width]`` on inputs of [1, N, 256] and [1, N, 8]. ONNX Runtime binds no symbol across
    inputs; the given shapes were refused ("another input gives it 256"). Each input takes its
    own, and an input not given takes the first binding."""
    dims = ["batch", "height", "width"]
    model = make_model([helper.make_tensor_value_info(n, TensorProto.FLOAT, dims) for n in ("feat", "dets", "more")])
    specs = input_specs(model)
    shapes = resolve_shapes(specs, input_shapes={"feat": (1, 54, 256), "dets": (1, 54, 8)})
    assert shapes == {"feat": (1, 54, 256), "dets": (1, 54, 8), "more": (1, 54, 256)}


def test_dim_values_and_int_high() -> None:
    (feeds,) = make_feeds(text_model(), dim_values={"seq": 5}, int_high=1000)
    assert feeds["input_ids"].shape == (1, 5)
    assert feeds["half"].shape == (1, 5, 16)
    assert feeds["input_ids"].max() > 1 and feeds["input_ids"].max() < 1000
    assert feeds["input_ids"].min() >= 0


def test_dim_values_override_batch_symbol() -> None:
    (feeds,) = make_feeds(text_model(), batch=2, dim_values={"batch": 6})
    assert feeds["input_ids"].shape[0] == 6


def test_symbol_on_axis_zero_is_batch_everywhere() -> None:
    specs = [
        InputSpec("a", ["n", 2], np.dtype(np.float32)),
        InputSpec("b", [2, "n"], np.dtype(np.float32)),
    ]
    assert resolve_shapes(specs, batch=5) == {"a": (5, 2), "b": (2, 5)}


def test_fixed_dims_are_kept() -> None:
    model = make_model([helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 7])])
    (feeds,) = make_feeds(model, batch=4)
    assert feeds["x"].shape == (1, 7)


def test_deterministic_in_seed() -> None:
    model = text_model()
    first = make_feeds(model, seed=3, count=2)
    again = make_feeds(model, seed=3, count=2)
    other = make_feeds(model, seed=4, count=2)
    assert len(first) == 2
    for a, b in zip(first, again, strict=True):
        for name in a:
            np.testing.assert_array_equal(a[name], b[name])
    assert not np.array_equal(first[0]["half"], other[0]["half"])
    assert not np.array_equal(first[0]["half"], first[1]["half"])


def test_feeds_run_in_onnxruntime() -> None:
    model = conv_relu_model()
    (feeds,) = make_feeds(model, dim_values={"H": 16, "W_": 12})
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, feeds)
    assert output.shape == (1, 4, 16, 12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"count": 0}, "count"),
        ({"batch": 0}, "batch"),
        ({"int_high": 0}, "int_high"),
        ({"dim_values": {"seq": -1}}, "dim_values"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        make_feeds(text_model(), **kwargs)  # type: ignore[arg-type]


def test_unfeedable_dtype() -> None:
    spec = InputSpec("s", [2], np.dtype("M8[s]"))
    with pytest.raises(UsageError, match="cannot make random values for input 's'"):
        make_feeds_from_specs([spec])


def test_string_inputs_get_random_words() -> None:
    """A string input (a tokenizer in the graph) is fed words of lowercase letters."""
    (feed,) = make_feeds_from_specs([InputSpec("text", [2, 3], np.dtype(object))])
    value = feed["text"]
    assert value.shape == (2, 3) and value.dtype == object
    assert all(isinstance(t, str) and 3 <= len(t.split()) <= 12 and t.replace(" ", "").isalpha() for t in value.flat)


def test_a_symbol_that_is_arithmetic_of_others_takes_its_value() -> None:
    """Optimum names a decoder's attention-mask width ``past_sequence_length +
    sequence_length``: it must cover the cache and the new tokens, so it follows from their
    sizes (and is no open dimension of its own for the size search)."""
    from graphprune.analysis.probe_sizes import open_dimensions
    from graphprune.io.feeds import derived_from

    f32, i64 = np.dtype(np.float32), np.dtype(np.int64)
    specs = [InputSpec("input_ids", ["batch_size", "sequence_length"], i64),
             InputSpec("attention_mask", ["batch_size", "past_sequence_length + sequence_length"], i64),
             InputSpec("past_key_values.0.key", ["batch_size", 2, "past_sequence_length", 16], f32)]
    shapes = resolve_shapes(specs, batch=2, input_shapes={"past_key_values.0.key": (2, 2, 5, 16)})
    assert shapes["attention_mask"] == (2, 5 + DEFAULT_LENGTH)
    assert resolve_shapes(specs, dim_values={"sequence_length": 3, "past_sequence_length": 0})["attention_mask"] == (1, 3)
    assert set(open_dimensions(specs)) == {"sequence_length", "past_sequence_length"}
    symbols = {"a", "b", "s0", "s1"}
    assert derived_from("s0 + s1", symbols) == ("s0", "s1")
    assert derived_from("2*a - 1", symbols) == ("a",)
    for plain in ("a", "?", "unk__3", "a + c", "Min(a, b)", "a.b", "__import__('os')"):
        assert derived_from(plain, symbols) == ()
    # ONNX Runtime GenAI's mask width, by its convention, where the other two are symbols too
    genai = {"total_sequence_length", "past_sequence_length", "sequence_length"}
    assert derived_from("total_sequence_length", genai) == ("past_sequence_length", "sequence_length")
    assert derived_from("total_sequence_length", genai - {"past_sequence_length"}) == ()
