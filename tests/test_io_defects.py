"""Regression tests for I/O defects found on real third-party models (issue 12).

* inputs declared ``-1`` (older paddle2onnx) made probe feeds fail with "negative dimensions
  are not allowed";
* a scalar bool input (an ``If`` condition, a flag) got a numpy bool scalar that ONNX Runtime
  refuses;
* saved models, reports and plans were created with mode 0600 whatever the umask;
* an unwritable report/plan path raised a bare OSError instead of a one-line UsageError.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import conv_node, make_model
from onnx import TensorProto, helper

import graphprune
from graphprune.errors import UsageError
from graphprune.io._atomic import atomic_write_text
from graphprune.io.feeds import input_specs, make_feeds, resolve_shapes
from graphprune.io.model_io import save_model


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def conv_chain(input_shape: list) -> onnx.ModelProto:
    """Conv -> Relu -> Conv on an image input of ``input_shape`` (dims may be -1)."""
    model = make_model(
        [conv_node("x", "w1", "a", "b1"), helper.make_node("Relu", ["a"], ["r"]),
         conv_node("r", "w2", "y", "b2")],
        {"x": [1, 3, 16, 16]}, {"y": [1, 4, 16, 16]},
        {"w1": [16, 3, 3, 3], "b1": [16], "w2": [4, 16, 3, 3], "b2": [4]},
    )
    dims = model.graph.input[0].type.tensor_type.shape.dim
    for dim, size in zip(dims, input_shape, strict=True):
        dim.Clear()
        if isinstance(size, int):
            dim.dim_value = size
        elif isinstance(size, str):
            dim.dim_param = size
    for dim in model.graph.output[0].type.tensor_type.shape.dim:
        dim.Clear()
    return model


# --------------------------------------------------------------------------- -1 dims


class TestNegativeDims:
    def test_minus_one_is_unknown(self) -> None:
        (spec,) = input_specs(conv_chain([-1, 3, -1, -1]))
        assert spec.shape == [None, 3, None, None]

    def test_feeds_run(self) -> None:
        model = conv_chain([-1, 3, -1, -1])
        (feeds,) = make_feeds(model)
        assert feeds["x"].shape == (1, 3, 224, 224)
        (out,) = _session(model).run(None, feeds)
        assert out.shape == (1, 4, 224, 224)

    def test_resolve_shapes_takes_minus_one_as_unknown(self) -> None:
        (spec,) = input_specs(conv_chain([1, 3, 16, 16]))
        spec = spec._replace(shape=[-1, -1, -1, 3])  # channels-last with -1 elsewhere
        assert resolve_shapes([spec], batch=2) == {"x": (2, 224, 224, 3)}

    def test_prune_end_to_end(self) -> None:
        model = conv_chain([-1, 3, -1, -1])
        result = graphprune.prune(model, ratio=0.5)
        assert result.report["params_after"] < result.report["params_before"]
        onnx.checker.check_model(result.model, full_check=True)
        (feeds,) = make_feeds(model)
        (out,) = _session(result.model).run(None, feeds)
        assert out.shape == (1, 4, 224, 224)


# --------------------------------------------------------------------------- scalar bool


def flag_model() -> onnx.ModelProto:
    """y = Where(flag, conv(relu(conv(x))), 0) with ``flag`` a scalar bool graph input."""
    model = make_model(
        [conv_node("x", "w1", "a", "b1"), helper.make_node("Relu", ["a"], ["r"]),
         conv_node("r", "w2", "c", "b2"), helper.make_node("Where", ["flag", "c", "zero"], ["y"])],
        {"x": [1, 3, 8, 8]}, {"y": [1, 4, 8, 8]},
        {"w1": [16, 3, 3, 3], "b1": [16], "w2": [4, 16, 3, 3], "b2": [4],
         "zero": np.zeros((1,), np.float32)},
        check=False,
    )
    model.graph.input.append(helper.make_tensor_value_info("flag", TensorProto.BOOL, []))
    onnx.checker.check_model(model, full_check=True)
    return model


class TestScalarBool:
    def test_feed_is_an_ndarray_ort_accepts(self) -> None:
        model = flag_model()
        (feeds,) = make_feeds(model)
        assert isinstance(feeds["flag"], np.ndarray)
        assert feeds["flag"].shape == () and feeds["flag"].dtype == np.bool_
        _session(model).run(None, feeds)

    @pytest.mark.parametrize("dtype", [TensorProto.BOOL, TensorProto.FLOAT, TensorProto.INT64])
    def test_every_scalar_feed_is_an_ndarray(self, dtype: int) -> None:
        model = flag_model()
        model.graph.input.append(helper.make_tensor_value_info("s", dtype, []))
        (feeds,) = make_feeds(model)
        assert isinstance(feeds["s"], np.ndarray) and feeds["s"].shape == ()

    def test_prune_end_to_end(self) -> None:
        result = graphprune.prune(flag_model(), ratio=0.5)
        assert result.report["params_after"] < result.report["params_before"]
        assert result.report["verification"]["ok"]

    def test_timing(self) -> None:
        from graphprune.verify.timing import time_models

        (timing,) = time_models([flag_model()], warmup=0, runs=1)
        assert timing is not None


# --------------------------------------------------------------------------- file modes


@pytest.fixture
def umask() -> Iterator[None]:
    previous = os.umask(0o027)
    try:
        yield
    finally:
        os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.skipif(os.name != "posix", reason="POSIX file modes")
@pytest.mark.usefixtures("umask")
class TestFileModes:
    def test_saved_model_respects_umask(self, tmp_path: Path) -> None:
        path = save_model(conv_chain([1, 3, 16, 16]), tmp_path / "m.onnx")
        assert _mode(path) == 0o640

    def test_external_data_respects_umask(self, tmp_path: Path) -> None:
        path = save_model(conv_chain([1, 3, 16, 16]), tmp_path / "m.onnx", external_data=True)
        assert _mode(path) == 0o640
        assert _mode(tmp_path / "m.onnx.data") == 0o640

    def test_overwrite_keeps_the_existing_mode(self, tmp_path: Path) -> None:
        path = tmp_path / "m.onnx"
        path.write_bytes(b"old")
        path.chmod(0o604)
        save_model(conv_chain([1, 3, 16, 16]), path)
        assert _mode(path) == 0o604
        assert onnx.load(str(path)).graph.node

    def test_report_and_plan_respect_umask(self, tmp_path: Path) -> None:
        atomic_write_text(tmp_path / "report.json", "{}")
        assert _mode(tmp_path / "report.json") == 0o640
        result = graphprune.prune(conv_chain([1, 3, 16, 16]), ratio=0.5)
        result.plan.save(tmp_path / "plan.json")
        assert _mode(tmp_path / "plan.json") == 0o640

    def test_no_temporary_left_behind(self, tmp_path: Path) -> None:
        save_model(conv_chain([1, 3, 16, 16]), tmp_path / "m.onnx")
        atomic_write_text(tmp_path / "r.json", "{}")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "r.json"]


def test_unwritable_report_path_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match=r"cannot write .*missing.*report\.json") as info:
        atomic_write_text(tmp_path / "missing" / "report.json", "{}")
    assert "\n" not in str(info.value)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- given shapes


class TestInputShapes:
    """``input_shapes``: probe shapes a model can run with (an OCR recogniser whose height
    must be 48), for inputs whose unknown dims have no symbol to name in ``dim_values``."""

    def test_whole_shape_for_unnamed_dims(self) -> None:
        model = conv_chain([-1, 3, -1, -1])
        (feeds,) = make_feeds(model, input_shapes={"x": (1, 3, 48, 320)})
        assert feeds["x"].shape == (1, 3, 48, 320)
        (out,) = _session(model).run(None, feeds)
        assert out.shape == (1, 4, 48, 320)

    def test_symbols_bound_for_other_inputs(self) -> None:
        specs = [spec._replace(shape=["batch", "seq"]) for spec in input_specs(flag_model())[:1]]
        specs.append(specs[0]._replace(name="mask"))
        shapes = resolve_shapes(specs, input_shapes={"x": (2, 5)})
        assert shapes == {"x": (2, 5), "mask": (2, 5)}

    @pytest.mark.parametrize(("given", "match"), [
        ({"nope": (1, 3, 8, 8)}, "not a graph input"),
        ({"x": (1, 3, 8)}, "rank 3"),
        ({"x": (1, 4, 8, 8)}, "declares 3"),
        ({"x": (1, 3, -8, 8)}, "non-negative"),
    ])
    def test_bad_shapes_are_usage_errors(self, given: dict, match: str) -> None:
        with pytest.raises(UsageError, match=match):
            make_feeds(conv_chain([-1, 3, -1, -1]), input_shapes=given)


def test_callers_external_data_model_stays_loadable_while_a_result_lives(tmp_path):
    """The weight store once hard-linked the caller's external data file: onnx refuses a data
    file with several links, so onnx.load / onnx.checker on the caller's own model failed
    ("multiple hard links") for as long as the prune result was alive."""
    import onnx

    import graphprune
    from graphprune.examples import example_cnn

    path = tmp_path / "m.onnx"
    onnx.save(example_cnn(), path, save_as_external_data=True, location="m.data", size_threshold=0)
    result = graphprune.prune(str(path), ratio=0.5)
    onnx.load(str(path))  # loads its external data
    onnx.checker.check_model(str(path), full_check=True)
    assert result.model is not None and result.report["verification"]["ok"]


# --------------------------------------------------------------------------- IR 3


def test_ir3_initializers_listed_as_inputs_are_weights(tmp_path: Path) -> None:
    """IR 3 lists every initializer as a graph input (old exporters; tools that write IR 3
    whatever the opset). The analysis strips them but kept IR 3, where ONNX's rules take an
    initializer's type only from its input: with opset 11 or later every weight lost its
    shape for the MAC count (144 MACs, those of nothing but the biases, before and after)."""
    model = conv_chain([1, 3, 16, 16])
    model.ir_version, model.opset_import[0].version = 3, 11
    for init in model.graph.initializer:
        model.graph.input.append(helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
    onnx.checker.check_model(model)
    src, out = tmp_path / "ir3.onnx", tmp_path / "out.onnx"
    onnx.save(model, src)
    result = graphprune.prune(str(src), ratio=0.5)
    result.save(out)
    assert result.report["groups"]["pruned"] == 1
    assert 0 < result.report["macs_after"] < result.report["macs_before"]
    pruned = onnx.load(out)
    onnx.checker.check_model(pruned)
    assert [i.name for i in pruned.graph.input] == ["x"]  # the weights are no longer inputs
    assert pruned.ir_version >= 4
    feed = {"x": np.random.default_rng(0).standard_normal((1, 3, 16, 16), dtype=np.float32)}
    assert _session(pruned).run(None, feed)[0].shape == (1, 4, 16, 16)


def test_an_ir_version_newer_than_onnx_reads_is_one_line(tmp_path: Path, capsys) -> None:
    """IR 99: exit 2 with the reason alone (a constant-folding warning from ONNX Runtime came
    first, then a blank line), nothing written."""
    from graphprune.cli import main

    model = make_model([conv_node("x", "w", "y")], {"x": [1, 3, 8, 8]}, {"y": None}, {"w": (4, 3, 3, 3)})
    model.ir_version = 99
    path, out = tmp_path / "ir99.onnx", tmp_path / "out.onnx"
    onnx.save(model, path)
    assert main(["prune", str(path), "-o", str(out), "--ratio", "0.5"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "IR version 99" in err[0], err
    assert not out.exists()


def test_nan_weights_are_reported() -> None:
    """One NaN filter makes every output of the model NaN. Scored as zeros, the filter is cut
    and the pruned model is finite, checked against the zeroed original: the report says the
    original held NaN weights (it said nothing)."""
    from graphprune.tables import prune_summary

    rng = np.random.default_rng(0)
    w = rng.standard_normal((8, 4, 3, 3)).astype(np.float32)
    w[3] = np.nan
    model = make_model([conv_node("x", "w", "a"), onnx.helper.make_node("Relu", ["a"], ["b"]),
                        conv_node("b", "w2", "y", k=1)], {"x": [1, 4, 8, 8]}, {"y": None},
                       {"w": w, "w2": (4, 8, 1, 1)})
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["nan_weights"] == ["w"]
    assert "warning: NaN weights in w" in prune_summary(result.report)
    clean = graphprune.prune(make_model([conv_node("x", "w", "y")], {"x": [1, 3, 8, 8]}, {"y": None},
                                        {"w": (4, 3, 3, 3)}), ratio=0.5)
    assert "nan_weights" not in clean.report
