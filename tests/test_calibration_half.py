"""Calibration of a float16 model: ONNX Runtime 1.32 crashes the process (a segmentation
fault) building a session of a float16 graph that ends in ``Transpose -> MatMul``, which the
calibration's truncated graphs can do where a refit layer reads a transposed activation
(``nn.MultiheadAttention`` converted to float16, at ``--target-macs`` with calibration).
Their sessions leave out the fusion that breaks (``runner.HALF_DISABLED``). Sessions and
prunes run in child processes, so a crash fails a test instead of ending the suite.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import onnx
from conftest import make_model
from onnx import TensorProto, helper

from graphprune.calibration import runner


def half_model():
    rng = np.random.default_rng(0)
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
        helper.make_node("MatMul", ["xh", "W1"], ["m"]),
        helper.make_node("Add", ["b1", "m"], ["h"]),
        helper.make_node("Transpose", ["h"], ["t"], perm=[1, 0, 2]),
        helper.make_node("MatMul", ["t", "W2"], ["p"]),
        helper.make_node("Add", ["p", "b2"], ["q"]),
        helper.make_node("Cast", ["q"], ["y"], to=TensorProto.FLOAT),
    ]
    params = {name: rng.standard_normal(shape).astype(np.float16) * 0.3
              for name, shape in (("W1", (16, 32)), ("b1", (32,)), ("W2", (32, 8)), ("b2", (8,)))}
    return make_model(nodes, {"x": [1, 10, 16]}, {"y": None}, params)


def test_a_truncated_half_graph_gets_a_session(tmp_path):
    model = half_model()
    assert runner.computes_half(model)
    # the graph the calibration cuts at the refit layer's output: Transpose -> MatMul last
    cut = helper.make_graph(list(model.graph.node[:5]), "cut", list(model.graph.input),
                            [helper.make_tensor_value_info("p", TensorProto.FLOAT16, None)],
                            list(model.graph.initializer))
    data = helper.make_model(cut, opset_imports=list(model.opset_import)).SerializeToString()
    code = textwrap.dedent("""
        import sys
        from graphprune.calibration import runner
        runner.session(open(sys.argv[1], "rb").read(), half=True)
    """)
    path = tmp_path / "cut.onnx"
    path.write_bytes(data)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]


def test_calibrated_prune_of_a_half_model_runs_and_verifies(tmp_path):
    path = tmp_path / "half.onnx"
    onnx.save(half_model(), str(path))
    code = textwrap.dedent("""
        import sys, json
        import numpy as np
        import graphprune
        rng = np.random.default_rng(1)
        feeds = [{"x": rng.standard_normal((1, 10, 16)).astype(np.float32)} for _ in range(24)]
        report = graphprune.prune(sys.argv[1], ratio=0.5, calibration=feeds).report
        print(json.dumps({"ok": report["verification"]["ok"],
                          "layers": report["calibration"]["passes"]["RefitPass"]["layers"],
                          "params": [report["params_before"], report["params_after"]]}))
    """)
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-500:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ok"] and result["layers"] >= 1
    assert result["params"][1] < result["params"][0]


def test_float16_activation_moments_do_not_overflow():
    """A float16 activation's per-channel sum of squares over a feature map passes float16's
    65,504 long before a real image model's activations do anything unusual (ISNet at
    1024x1024: variances came out NaN and the criteria scored NaN); the moments are summed in
    float32 at least and match numpy's float64 sums of the same float16 values."""
    import onnx_graphsurgeon as gs

    from graphprune.calibration import stats
    from graphprune.calibration.linear import linear_view

    rng = np.random.default_rng(2)
    nodes = [
        helper.make_node("Cast", ["x"], ["xh"], to=TensorProto.FLOAT16),
        helper.make_node("Conv", ["xh", "W1"], ["c"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["a"]),
        helper.make_node("Conv", ["a", "W2"], ["d"], name="conv2"),
        helper.make_node("Cast", ["d"], ["y"], to=TensorProto.FLOAT),
    ]
    params = {"W1": (rng.standard_normal((6, 3, 3, 3)) * 0.5).astype(np.float16),
              "W2": (rng.standard_normal((4, 6, 1, 1)) * 0.1).astype(np.float16)}
    model = make_model(nodes, {"x": [1, 3, 96, 96]}, {"y": None}, params)
    view = linear_view(next(n for n in gs.import_onnx(model).nodes if n.name == "conv2"), 17)
    feeds = [{"x": (rng.standard_normal((1, 3, 96, 96)) * 40).astype(np.float32)} for _ in range(3)]
    layer = stats.collect(model, [view], runner.Batches(feeds, [1] * 3, False)).get("conv2")
    cut = onnx.ModelProto()
    cut.CopyFrom(model)
    cut.graph.output.append(helper.make_tensor_value_info("a", TensorProto.FLOAT16, None))
    acts = np.concatenate([o[1] for o in runner.outputs(cut, feeds)])
    assert acts.dtype == np.float16 and float(np.square(acts.astype(np.float64)).max()) > 65504
    per_channel = np.moveaxis(acts, 1, -1).reshape(-1, 6).astype(np.float64)
    assert np.all(np.isfinite(layer.variance))
    np.testing.assert_allclose(layer.mean, per_channel.mean(0), rtol=1e-3)
    np.testing.assert_allclose(layer.variance, per_channel.var(0), rtol=1e-3)
