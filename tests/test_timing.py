"""Tests for graphprune.verify.timing (no speed assertions: only the contract)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from graphprune.errors import InvalidModelError, UsageError
from graphprune.verify import timing
from graphprune.verify.timing import TimingResult, time_models


def conv_relu_model(channels: int, name: str) -> onnx.ModelProto:
    weight = np.random.default_rng(channels).standard_normal((channels, 3, 3, 3))
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["x", "W"], ["c"], pads=[1, 1, 1, 1]),
            helper.make_node("Relu", ["c"], ["y"]),
        ],
        name,
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(weight.astype(np.float32), "W")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)], ir_version=8)


def test_times_paths_and_protos(tmp_path: Path) -> None:
    path = tmp_path / "wide.onnx"
    onnx.save_model(conv_relu_model(16, "wide"), os.fspath(path))
    calls: list[tuple[int, int]] = []
    results = time_models(
        [path, conv_relu_model(4, "narrow")],
        warmup=1,
        runs=5,
        batch=2,
        threads=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    assert [r.name for r in results] == [os.fspath(path), "narrow"]
    for result in results:
        assert isinstance(result, TimingResult)
        assert result.median_ms > 0 and result.p90_ms > 0 and result.mean_ms > 0
        assert result.p90_ms >= result.median_ms
        assert (result.runs, result.batch, result.provider) == (5, 2, "cpu")
    assert calls == [(step, 6) for step in range(1, 7)]


def test_large_proto_goes_through_a_file(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing, "EXTERNAL_DATA_THRESHOLD", 100)
    written: list[Path] = []
    real = timing.save_model

    def spy(model: onnx.ModelProto, path: Path, **kwargs: object) -> Path:
        written.append(real(model, path, **kwargs))  # type: ignore[arg-type]
        return written[-1]

    monkeypatch.setattr(timing, "save_model", spy)
    (result,) = time_models([conv_relu_model(16, "big")], warmup=0, runs=2)
    assert result.median_ms > 0
    assert len(written) == 1 and not written[0].exists()  # the temporary folder is gone


def test_to_dict_and_frozen() -> None:
    (result,) = time_models([conv_relu_model(4, "m")], warmup=0, runs=3)
    data = result.to_dict()
    assert set(data) == {"name", "provider", "median_ms", "p90_ms", "mean_ms", "runs", "batch",
                         "threads", "input_shapes"}
    assert data["runs"] == 3
    with pytest.raises(AttributeError):
        result.median_ms = 0.0  # type: ignore[misc]


def test_models_share_feeds(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[np.ndarray] = []
    real = ort.InferenceSession.run

    def spy(self: ort.InferenceSession, names: object, feeds: dict[str, np.ndarray]) -> object:
        seen.append(feeds["x"])
        return real(self, names, feeds)

    monkeypatch.setattr(ort.InferenceSession, "run", spy)
    time_models([conv_relu_model(4, "a"), conv_relu_model(8, "b")], warmup=0, runs=2)
    assert len(seen) == 5  # a trial run of the first model (does it run at these sizes?), then 2 rounds of 2
    assert all(array is seen[0] for array in seen)


def fixed_batch_model(batch: int) -> onnx.ModelProto:
    model = conv_relu_model(4, "fixed")
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    return model


def test_a_fixed_batch_model_reports_the_batch_it_ran() -> None:
    results = time_models([conv_relu_model(4, "open"), fixed_batch_model(1)], batch=4,
                          warmup=0, runs=2)
    assert [r.batch for r in results] == [4, 1]


def test_threads_are_recorded() -> None:
    (result,) = time_models([conv_relu_model(4, "m")], warmup=0, runs=2, threads=1)
    assert result.threads == 1
    (result,) = time_models([conv_relu_model(4, "m")], warmup=0, runs=2)
    assert result.threads is None


def test_run_on_provider_and_agreement_on_the_cpu() -> None:
    model = conv_relu_model(4, "m")
    feeds = [{"x": np.ones((1, 3, 16, 16), np.float32)}]
    (outputs,) = timing.run_on_provider(model, feeds)
    expected = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds[0])
    np.testing.assert_allclose(outputs[0], expected[0], rtol=1e-6)
    agreement = timing.provider_agreement(model, feeds, provider="cpu")
    assert agreement["max_rel_diff"] == 0.0 and agreement["samples"] == 1


@pytest.mark.skipif(
    "CUDAExecutionProvider" in ort.get_available_providers(), reason="CUDA is available here"
)
def test_cuda_without_onnxruntime_gpu_is_a_usage_error() -> None:
    with pytest.raises(UsageError, match="install onnxruntime-gpu"):
        time_models([conv_relu_model(4, "m")], provider="cuda", runs=1)


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs CUDA"
)
def test_cuda_agrees_with_the_cpu() -> None:
    model = conv_relu_model(16, "m")
    feeds = [{"x": np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)}]
    agreement = timing.provider_agreement(model, feeds, provider="cuda")
    assert agreement["provider"] == "cuda"
    assert agreement["max_rel_diff"] <= timing.PROVIDER_TOLERANCE


def test_cuda_needs_cuda_provider(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(timing.ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    with pytest.raises(UsageError, match="CUDAExecutionProvider"):
        time_models([conv_relu_model(4, "m")], provider="cuda", runs=1)


@pytest.mark.skipif(
    "CUDAExecutionProvider" not in ort.get_available_providers(), reason="needs CUDA"
)
def test_cuda_runs() -> None:
    (result,) = time_models([conv_relu_model(4, "m")], provider="cuda", warmup=1, runs=3)
    assert result.provider == "cuda" and result.median_ms > 0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"provider": "tpu"}, "unknown provider"),
        ({"runs": 0}, "runs >= 1"),
        ({"warmup": -1}, "warmup >= 0"),
        ({"threads": 0}, "threads"),
    ],
)
def test_bad_arguments(kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(UsageError, match=message):
        time_models([conv_relu_model(4, "m")], **kwargs)  # type: ignore[arg-type]


def test_no_models() -> None:
    with pytest.raises(UsageError, match="no models"):
        time_models([])


def test_missing_and_broken_models(tmp_path: Path) -> None:
    with pytest.raises(InvalidModelError, match="no such file"):
        time_models([tmp_path / "absent.onnx"], runs=1)
    broken = tmp_path / "broken.onnx"
    broken.write_text("not a model")
    with pytest.raises(InvalidModelError, match="cannot load"):
        time_models([broken], runs=1)


def test_models_are_timed_on_like_inputs(tmp_path, capsys) -> None:
    """A model that fixes an input's shape beside one that leaves it open: both run at the
    fixed shape (a dynamo export at 64 tokens beside a TorchScript one at the guessed 8 read
    "2.96x slower"), and each result carries the shapes it was fed; `bench` prints them, or
    says where the models' inputs still differ."""
    from graphprune.cli import main

    weight = numpy_helper.from_array(np.random.default_rng(0).standard_normal((16, 16)).astype(np.float32), "w")
    paths = []
    for name, dims in (("fixed", [1, 64, 16]), ("open", [1, "s", 16]), ("other", [1, 32, 16])):
        graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], name,
                                  [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [weight])
        paths.append(tmp_path / f"{name}.onnx")
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), paths[-1])
    results = timing.time_models([str(p) for p in paths[:2]], warmup=0, runs=2)
    assert [r.input_shapes for r in results] == [{"x": [1, 64, 16]}] * 2
    assert timing.time_models([str(paths[1])], warmup=0, runs=1)[0].input_shapes == {"x": [1, 8, 16]}
    assert main(["bench", str(paths[0]), str(paths[1]), "--runs", "2", "--warmup", "0"]) == 0
    assert "inputs: x=1x64x16" in capsys.readouterr().out
    assert main(["bench", str(paths[0]), str(paths[2]), "--runs", "2", "--warmup", "0"]) == 0
    assert "note: the models ran at different input sizes" in capsys.readouterr().out
