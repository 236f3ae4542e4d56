"""Models with operators that ONNX Runtime runs only from a custom-op library.

onnxruntime-extensions' ``ai.onnx.contrib`` operators (here ``NegPos``, which splits a tensor
into its negative and positive parts: post-processing written into the graph) load by
themselves when the package is installed; another library is named with ``--custom-ops LIB``
/ ``graphprune.register_custom_ops``. Every session graphprune builds (verification,
calibration, size probes, timing) loads the registered libraries; the groups that reach the
custom operator are frozen (it has no rule), the rest is pruned and verified.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.cli import main
from graphprune.io import runtime

extensions = pytest.importorskip("onnxruntime_extensions")


def _model(domain: str = runtime.EXTENSIONS_DOMAIN, op: str = "NegPos") -> onnx.ModelProto:
    """Conv -> Relu -> Conv -> Relu -> Conv -> custom op (two outputs)."""
    rng = np.random.default_rng(0)

    def weight(name: str, *shape: int) -> onnx.TensorProto:
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.2).astype(np.float32), name)

    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["a"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("Conv", ["r", "w2", "b2"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r2"]),
             helper.make_node("Conv", ["r2", "w3", "b3"], ["d"], pads=[1, 1, 1, 1]),
             helper.make_node(op, ["d"], ["neg", "pos"], domain=domain, name="custom")]
    out = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 16, 16]) for n in ("neg", "pos")]
    graph = helper.make_graph(
        nodes, "custom_ops", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])], out,
        [weight("w1", 16, 3, 3, 3), weight("b1", 16), weight("w2", 32, 16, 3, 3), weight("b2", 32),
         weight("w3", 4, 32, 3, 3), weight("b3", 4)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
    model.ir_version = 8
    return model


@pytest.fixture
def fresh_registry(monkeypatch):
    """No library registered (the registry lives for the process)."""
    monkeypatch.setattr(runtime, "_LIBRARIES", [])


def _run(path: Path, x: np.ndarray) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.register_custom_ops_library(extensions.get_library_path())
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"]).run(None, {"x": x})


def test_extensions_ops_load_by_themselves(tmp_path, fresh_registry):
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(_model(), src)
    result = graphprune.prune(str(src), ratio=0.5)
    report = result.report
    assert report["verification"]["ok"]
    assert report["groups"]["pruned"] == 2
    frozen = json.dumps(report["frozen"])
    assert "graph output" in frozen or "NegPos" in frozen  # conv3's channels reach the custom op
    result.save(out)
    pruned = onnx.load(out)
    assert {o.domain for o in pruned.opset_import} >= {runtime.EXTENSIONS_DOMAIN}
    assert pruned.graph.node[-1].op_type == "NegPos"
    x = np.random.default_rng(1).standard_normal((1, 3, 16, 16)).astype(np.float32)
    neg, pos = _run(out, x)
    assert neg.shape == pos.shape == (1, 4, 16, 16)
    assert (neg <= 0).all() and (pos >= 0).all()
    assert report["params_after"] < report["params_before"]


def test_calibrated_prune_runs_the_custom_op(tmp_path, fresh_registry):
    x = np.random.default_rng(2).standard_normal((24, 1, 3, 16, 16)).astype(np.float32)
    result = graphprune.prune(_model(), ratio=0.5, calibration={"x": x})
    report = result.report
    assert report["verification"]["ok"]
    assert report["calibration"]["reconstruction"] == "refit"
    assert report["fidelity"]["cosine"] > report["fidelity"]["without_reconstruction"]["cosine"]


def test_unknown_custom_op_says_which_library_is_missing(tmp_path, capsys, fresh_registry):
    src = tmp_path / "m.onnx"
    onnx.save(_model(domain="mmdeploy", op="TRTBatchedNMS"), src)
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "mmdeploy::TRTBatchedNMS needs the custom-op library" in err[0] and "--custom-ops" in err[0]
    assert not (tmp_path / "p.onnx").exists()


def test_custom_ops_option(tmp_path, capsys, fresh_registry):
    src = tmp_path / "m.onnx"
    onnx.save(_model(), src)
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--custom-ops", str(tmp_path / "no.so")]) == 2
    assert "custom-op library not found" in capsys.readouterr().err
    not_a_library = tmp_path / "fake.so"
    not_a_library.write_bytes(b"not a library")
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--custom-ops", str(not_a_library)]) == 2
    assert "cannot load the custom-op library" in capsys.readouterr().err
    library = runtime.extensions_library()
    assert library == str(Path(extensions.get_library_path()))
    assert main(["prune", str(src), "-o", str(tmp_path / "p.onnx"), "--custom-ops", library, "--quiet"]) == 0
    assert runtime.libraries() == (str(Path(library).resolve()),)


def test_bench_registers_the_extensions_for_a_path(tmp_path, capsys, fresh_registry):
    src = tmp_path / "m.onnx"
    onnx.save(_model(), src)
    assert main(["bench", str(src), "--runs", "2", "--warmup", "1", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows
    assert runtime.libraries()


# --------------------------------------------------------------------------- a tokenizer in front


def _tokenizer_model() -> onnx.ModelProto:
    """Text in, a tokenizer (onnxruntime-extensions' ``BertTokenizer``, letters as word
    pieces), an embedding and a two-layer MLP out: how an end-to-end text model ships. ONNX
    inference knows no shape after the tokenizer; its token count depends on the text."""
    letters = [chr(c) for c in range(97, 123)]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *letters, *("##" + c for c in letters)]
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("BertTokenizer", ["text"], ["ids", "types", "mask"], domain=runtime.EXTENSIONS_DOMAIN,
                              vocab_file="\n".join(vocab), do_lower_case=1, name="tokenizer"),
             helper.make_node("Unsqueeze", ["ids", "zero"], ["ids2"]),
             helper.make_node("Gather", ["emb", "ids2"], ["x"]),
             helper.make_node("MatMul", ["x", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [numpy_helper.from_array(np.array([0], dtype=np.int64), "zero"),
             numpy_helper.from_array(rng.standard_normal((len(vocab), 16)).astype(np.float32), "emb"),
             numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((32, 16)).astype(np.float32), "w2")]
    graph = helper.make_graph(nodes, "text_e2e", [helper.make_tensor_value_info("text", TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "n", 16])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid(runtime.EXTENSIONS_DOMAIN, 1)])
    model.ir_version = 8
    return model


def _widths(result) -> tuple[int, int]:
    inits = {t.name: t for t in result.model.graph.initializer}
    return int(inits["w1"].dims[0]), int(inits["w1"].dims[1])


def test_network_behind_a_tokenizer_is_analysed_and_counted(fresh_registry):
    """The tokenizer's outputs get their rank from two runs (custom_shapes): the network
    behind it is analysed, pruned and its MACs counted like any text model's (before: no shape
    after the tokenizer, and the pruned model's MACs counted as 0)."""
    result = graphprune.prune(_tokenizer_model(), ratio=0.5)
    report = result.report
    assert report["verification"]["ok"]
    hidden, mlp = _widths(result)
    assert (hidden, mlp) == (8, 16)  # the embedding width and the MLP, both halved
    assert report["normalised"]["shapes_run"] == {"ai.onnx.contrib::BertTokenizer": 1}
    # x @ w1 and r @ w2 per token, the same token count before and after
    assert report["macs_after"] / report["macs_before"] == pytest.approx((hidden * mlp + mlp * 16) / (2 * 16 * 32))
    text = np.array(["graphprune prunes the network behind a tokenizer"], dtype=object)
    options = ort.SessionOptions()
    options.register_custom_ops_library(extensions.get_library_path())
    (y,) = ort.InferenceSession(result.model.SerializeToString(), options,
                                providers=["CPUExecutionProvider"]).run(None, {"text": text})
    assert y.shape[0] == 1 and y.shape[2] == 16 and y.shape[1] > 10


def test_calibration_with_text(tmp_path, fresh_registry):
    """Calibration data for a string input: numpy str arrays (np.savez keeps them without
    pickles), or --calibration random (random words)."""
    words = ["pruning", "graph", "tokens", "model", "onnx", "runtime", "data", "layers", "weights", "text"]
    rng = np.random.default_rng(3)
    texts = np.array([[" ".join(rng.choice(words, size=int(rng.integers(3, 12))))] for _ in range(40)])
    assert texts.dtype.kind == "U"
    np.savez(tmp_path / "calib.npz", text=texts)
    src = tmp_path / "m.onnx"
    onnx.save(_tokenizer_model(), src)
    result = graphprune.prune(str(src), ratio=0.5, calibration=str(tmp_path / "calib.npz"))
    report = result.report
    assert report["verification"]["ok"] and report["calibration"]["held_out"] == 8
    assert report["fidelity"]["rel_l2"] < report["fidelity"]["without_reconstruction"]["rel_l2"]
    random = graphprune.prune(str(src), ratio=0.5, calibration="random").report
    assert "random words" in random["calibration"]["source"]
    assert random["fidelity"]["samples"] > 0


def test_bench_times_a_text_model(tmp_path, capsys, fresh_registry):
    """``graphprune bench`` (and sweep's timing) feeds a string input random words."""
    src = tmp_path / "text.onnx"
    onnx.save(_tokenizer_model(), src)
    assert main(["bench", str(src), "--runs", "2", "--warmup", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)
