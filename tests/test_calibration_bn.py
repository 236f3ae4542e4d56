"""Data-free bias compensation from BatchNormalization statistics (opt-in pass)."""

from __future__ import annotations

import numpy as np
import onnx
from graphprune.passes.base import PassContext, PassManager
from graphprune.passes.bn_compensation import BatchNormCompensationPass
from graphprune.passes.prune_channels import removed_elements
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.calibration import runner
from graphprune.pipeline.ratio import channel_passes
from graphprune.pipeline.session import Session
from graphprune.planning.planner import plan_ratio


def _bn_cnn(trained: bool) -> onnx.ModelProto:
    """Conv(3->16) BN Relu Conv(16->8) BN Relu GAP Flatten Gemm(8->4), BN kept (not folded).
    ``trained``: the BN running statistics are the conv outputs' actual moments on the
    input distribution (standard normal images), as after training."""
    rng = np.random.default_rng(0)

    def init(name, shape, scale=1.0, offset=0.0):
        return numpy_helper.from_array((rng.standard_normal(shape) * scale + offset).astype(np.float32), name)

    inits = [init("w1", (16, 3, 3, 3), 0.4), init("w2", (8, 16, 3, 3), 0.2), init("wf", (4, 8), 0.5),
             init("bf", (4,), 0.1)]
    for k, c in ((1, 16), (2, 8)):
        inits += [init(f"g{k}", (c,), 0.3, 1.0), init(f"be{k}", (c,), 0.5, 0.3),
                  numpy_helper.from_array(np.zeros(c, np.float32), f"m{k}"),
                  numpy_helper.from_array(np.ones(c, np.float32), f"v{k}")]
    nodes = [
        helper.make_node("Conv", ["x", "w1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "g1", "be1", "m1", "v1"], ["n1"], name="bn1"),
        helper.make_node("Relu", ["n1"], ["r1"], name="relu1"),
        helper.make_node("Conv", ["r1", "w2"], ["c2"], name="conv2", pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c2", "g2", "be2", "m2", "v2"], ["n2"], name="bn2"),
        helper.make_node("Relu", ["n2"], ["r2"], name="relu2"),
        helper.make_node("GlobalAveragePool", ["r2"], ["p"], name="gap"),
        helper.make_node("Flatten", ["p"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "wf", "bf"], ["logits"], name="fc", transB=1),
    ]
    graph = helper.make_graph(nodes, "bncnn", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    if trained:  # set each BN's statistics to its input's moments, in order
        feeds = [{"x": _images(64, 7)}]
        for k in (1, 2):
            (out,) = runner.outputs(_with_outputs(model, [f"c{k}"]), feeds)[0]
            values = np.moveaxis(out, 1, -1).reshape(-1, out.shape[1])
            stats = {f"m{k}": values.mean(0), f"v{k}": values.var(0)}
            for t in model.graph.initializer:
                if t.name in stats:
                    t.CopyFrom(numpy_helper.from_array(stats[t.name].astype(np.float32), t.name))
    return model


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in names)
    return out


def _images(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 8, 8)).astype(np.float32)


def _prune(model: onnx.ModelProto, compensate: bool):
    s = Session(model)
    analysis = s.analyze()
    plan = plan_ratio(analysis, ratio=0.5, round_to=1, criterion="l1")
    s.apply(channel_passes(analysis, plan))
    stats: tuple = ()
    if compensate:
        bn_pass = BatchNormCompensationPass(s.prepared, removed_elements(analysis, plan), store=s.store)
        assert "BatchNormCompensationPass(removed=" in repr(bn_pass)
        PassManager([bn_pass]).run(s.graph, PassContext(opset=s.opset, debug=True))
        stats = bn_pass.stats, bn_pass.skipped
    out = s.export()
    onnx.checker.check_model(out, full_check=True)
    return out, stats


def _mean_error(model: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
    feeds = [{"x": _images(64, 11)}]
    ref = runner.outputs(model, feeds)[0][0]
    got = runner.outputs(pruned, feeds)[0][0]
    return float(np.linalg.norm((got - ref).mean(0)))


def test_bn_statistics_compensate_the_removed_channels_mean():
    model = _bn_cnn(trained=True)
    plain, _ = _prune(model, False)
    compensated, (layer_stats, skipped) = _prune(model, True)
    assert set(layer_stats.layers) == {"conv2", "fc"} and not skipped
    assert _mean_error(model, compensated) < 0.5 * _mean_error(model, plain)


def test_no_batchnorm_nothing_to_start_from():
    from test_calibration_passes import cnn

    s = Session(cnn())
    analysis = s.analyze()
    plan = plan_ratio(analysis, ratio=0.5, round_to=1)
    s.apply(channel_passes(analysis, plan))
    bn_pass = BatchNormCompensationPass(s.prepared, removed_elements(analysis, plan), store=s.store)
    PassManager([bn_pass]).run(s.graph, PassContext(opset=s.opset))
    assert bn_pass.skipped and all("no BatchNormalization" in v for v in bn_pass.skipped.values())


def test_bn_reconstruction_is_opt_in():
    model = _bn_cnn(trained=True)
    plain = graphprune.prune(model, ratio=0.5, round_to=1)
    again = graphprune.prune(model, ratio=0.5, round_to=1)
    assert "calibration" not in plain.report
    assert plain.model.SerializeToString() == again.model.SerializeToString()
    calib = {"x": _images(20, 3)[:, None]}
    bn = graphprune.prune(model, ratio=0.5, round_to=1, criterion="l1", calibration=calib, reconstruction="bn")
    assert bn.report["calibration"]["passes"]["BatchNormCompensationPass"]["layers"] == 2
