"""Conv kernels stored flattened, ``[out, in * kh * kw]``, and reshaped to ``[out, in, kh,
kw]`` in the graph (OpenCV Zoo's "int8bq" files: a blocked int8 ``DequantizeLinear`` of the
2-D weight, then ``Reshape``, then ``Conv``). The Reshape makes the weight a view of the stored
one: its rows are the output channels, its columns the input channels a kernel's worth at a
time. Before, every group read "no weight creates these channels" and nothing pruned (an SFace
face embedder: 0 of 29 groups)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune


def _model(form: str) -> onnx.ModelProto:
    """x [1, 8, 12, 12] -> Conv 48x8x3x3 -> Relu -> Conv 16x48x1x1: the kernels stored as
    ``form`` (``dense``: 4-D floats; ``flat``: 2-D floats + Reshape; ``rows``: int8 2-D with a
    scale per row; ``blocks``: int8 2-D with a scale per row and block of 8 columns)."""
    rng = np.random.default_rng(4)
    nodes, inits = [], []

    def kernel(name: str, w: np.ndarray) -> str:
        if form == "dense":
            inits.append(numpy_helper.from_array(w, name))
            return name
        flat = w.reshape(len(w), -1)
        inits.append(numpy_helper.from_array(np.array(w.shape, np.int64), f"{name}_shape"))
        source = f"{name}_flat"
        if form == "flat":
            inits.append(numpy_helper.from_array(flat, source))
        else:
            block = 8 if form == "blocks" else flat.shape[1]
            cells = flat.reshape(len(flat), -1, block)
            scale = (np.abs(cells).max(axis=2) / 127).astype(np.float32)
            q = np.round(cells / scale[..., None]).astype(np.int8).reshape(flat.shape)
            attrs = {"axis": 1, "block_size": block} if form == "blocks" else {"axis": 0}
            inits.extend([numpy_helper.from_array(q, f"{name}_q"),
                          numpy_helper.from_array(scale if form == "blocks" else scale[:, 0], f"{name}_s")])
            nodes.append(helper.make_node("DequantizeLinear", [f"{name}_q", f"{name}_s"], [source], **attrs))
        nodes.append(helper.make_node("Reshape", [source, f"{name}_shape"], [name]))
        return name

    a = kernel("wa", rng.standard_normal((48, 8, 3, 3)).astype(np.float32))
    b = kernel("wb", rng.standard_normal((16, 48, 1, 1)).astype(np.float32))
    nodes += [helper.make_node("Conv", ["x", a], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
              helper.make_node("Conv", ["r", b], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 12, 12])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


@pytest.mark.parametrize("form", ["flat", "rows", "blocks"])
def test_a_kernel_reshaped_from_its_stored_rows_prunes_as_the_dense_one(form: str) -> None:
    model = _model(form)
    hidden = [g for g in graphprune.analyze(model).groups if ("h", 1) in g.dims]
    assert len(hidden) == 1 and hidden[0].prunable, [g.frozen for g in hidden]
    result = graphprune.prune(model, ratio=0.5, round_to=1)
    dense = graphprune.prune(_model("dense"), ratio=0.5, round_to=1)
    assert result.report["verification"]["ok"], result.report["verification"]
    assert result.report["macs_after"] == dense.report["macs_after"]
    assert result.report["params_after"] / result.report["params_before"] < 0.52
    inits = {t.name: t for t in result.model.graph.initializer}
    assert tuple(inits["wa_flat" if form == "flat" else "wa_q"].dims) == (24, 72)
    reshape = next(n for n in result.model.graph.node if n.op_type == "Reshape" and n.output[0] == "wa")
    assert tuple(numpy_helper.to_array(inits[reshape.input[1]])) == (24, 8, 3, 3)
    onnx.checker.check_model(result.model, full_check=True)


def test_a_calibrated_prune_refits_the_reshaped_int8_kernel() -> None:
    """The refit reads the kernel through the Reshape (decoded from its int8 rows and written
    back on its blocks' grid): the second conv is a refit layer, not left as it was."""
    rng = np.random.default_rng(5)
    calib = {"x": rng.standard_normal((24, 1, 8, 12, 12)).astype(np.float32)}
    result = graphprune.prune(_model("blocks"), ratio=0.5, round_to=1, calibration=calib, reconstruction="refit")
    refit = result.report["calibration"]["passes"]["RefitPass"]
    assert result.report["verification"]["ok"] and refit["layers"] >= 1 and refit.get("quantized_layers", 0) >= 1, refit
    assert result.report["calibration"]["criteria_chosen"] and "data-free" not in str(result.report["calibration"]["criteria_chosen"])
