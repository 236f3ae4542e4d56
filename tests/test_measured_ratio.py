"""Calibrated ratio prunes of one transformer kind: the removal shared across layers by
measurement (graphprune.pipeline.measured_ratio).

A three-block encoder exported by torch, whose middle block's attention output is scaled
down: its heads matter least, so a measured allocation of a quarter of all heads takes
them there, and lands nearer the original than a quarter of every block's.
"""

from __future__ import annotations

import math
import subprocess
import sys
import warnings

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.errors import UsageError
from graphprune.examples import example_cnn
from graphprune.tables import allocation_lines

HIDDEN, HEADS, HEAD_DIM, MLP, BLOCKS = 32, 4, 8, 64, 3
#: the attention output of each block is scaled by this: the middle one barely matters
ATTENTION_SCALE = (1.0, 0.02, 1.0)


def _export() -> onnx.ModelProto:
    torch = pytest.importorskip("torch")
    nn = torch.nn

    class Block(nn.Module):
        def __init__(self, scale: float) -> None:
            super().__init__()
            self.scale = scale
            self.ln1, self.ln2 = nn.LayerNorm(HIDDEN), nn.LayerNorm(HIDDEN)
            self.q, self.k, self.v, self.o = (nn.Linear(HIDDEN, HIDDEN) for _ in range(4))
            self.fc1, self.fc2 = nn.Linear(HIDDEN, MLP), nn.Linear(MLP, HIDDEN)

        def forward(self, x):
            b, s = x.shape[0], x.shape[1]
            h = self.ln1(x)
            q, k, v = (f(h).view(b, s, HEADS, HEAD_DIM).transpose(1, 2) for f in (self.q, self.k, self.v))
            att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM), dim=-1)
            x = x + self.scale * self.o((att @ v).transpose(1, 2).reshape(b, s, HIDDEN))
            return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))

    class Encoder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = nn.Linear(HIDDEN, HIDDEN)
            self.blocks = nn.ModuleList(Block(s) for s in ATTENTION_SCALE)
            self.head = nn.Linear(HIDDEN, 8)

        def forward(self, x):
            x = self.embed(x)
            for block in self.blocks:
                x = block(x)
            return self.head(x)

    torch.manual_seed(0)
    module = Encoder().eval()
    with torch.no_grad():
        for block in module.blocks:  # sharp attention: each head reads its own positions
            block.q.weight.mul_(4.0)
    import io

    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 6, HIDDEN),), buffer, dynamo=False, input_names=["x"],
                          output_names=["y"], opset_version=17, dynamic_axes={"x": {0: "batch", 1: "sequence"}})
    return onnx.load_from_string(buffer.getvalue())


@pytest.fixture(scope="module")
def encoder() -> onnx.ModelProto:
    return _export()


def _calibration(count: int = 40) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(1).normal(size=(count, 1, 6, HIDDEN)).astype(np.float32)}


def _heads_removed(result) -> list[int]:
    from graphprune.analysis import targets

    kinds = targets.classify_groups(result.analysis)
    removed = {g.group: len(g.remove) for g in result.plan.groups}
    return [removed.get(g.id, 0) for g in result.analysis.groups if kinds.get(g.id) == "head"]


@pytest.fixture(scope="module")
def runs(encoder):
    calib = _calibration()
    measured = graphprune.prune(encoder, ratio=0.0, head_ratio=0.25, mlp_ratio=0.0, calibration=calib)
    uniform = graphprune.prune(encoder, ratio=0.0, head_ratio=0.25, mlp_ratio=0.0, calibration=calib,
                               allocation="uniform")
    return measured, uniform


def test_a_quarter_of_all_heads_goes_where_it_costs_least(runs):
    measured, uniform = runs
    allocation = measured.report["allocation"]
    assert allocation["mode"] == "measured" and allocation["kind"] == "head"
    assert measured.report["mode"] == "ratio" and "budget" not in measured.report
    assert measured.report["verification"]["ok"]
    onnx.checker.check_model(measured.model, full_check=True)
    # the same number of heads as a quarter of every block's, never more than half of one
    assert _heads_removed(uniform) == [1, 1, 1]
    by_block = _heads_removed(measured)
    assert sum(by_block) == 3 == allocation["units_removed"] == allocation["units_removed_uniform"]
    assert max(by_block) <= 2 and allocation["max_share"] == 0.5
    assert by_block[1] == 2  # the block whose attention barely reaches the output
    assert {c["allocation"] for c in allocation["candidates"]} >= {"global", "uniform"}
    # nearer the original on the held-out samples than the uniform prune
    assert measured.report["fidelity"]["rel_l2"] < uniform.report["fidelity"]["rel_l2"]
    assert measured.report["params_after"] == uniform.report["params_after"]
    lines = allocation_lines(allocation)
    assert lines[0].startswith("allocation across 3 head groups by measurement: 3 units removed (uniform: 3)")


def test_uniform_allocation_says_why(runs, encoder):
    _, uniform = runs
    assert uniform.report["allocation"] == {"mode": "uniform", "why": "allocation 'uniform' asked for",
                                            "kinds": ["head"]}
    assert allocation_lines(uniform.report["allocation"]) == ["allocation: uniform (allocation 'uniform' asked for)"]
    # few held-out samples keep the uniform allocation too
    few = graphprune.prune(encoder, ratio=0.0, head_ratio=0.25, mlp_ratio=0.0, calibration=_calibration(24))
    assert few.report["allocation"]["why"].startswith("5 held-out calibration samples; the choice needs 8")


def test_random_calibration_inputs_are_measured_too(encoder):
    rnd = graphprune.prune(encoder, ratio=0.0, head_ratio=0.25, mlp_ratio=0.0, calibration="random:40")
    assert rnd.report["allocation"]["mode"] == "measured"
    assert rnd.report["verification"]["ok"] and sum(_heads_removed(rnd)) == 3


def test_mlp_neurons_are_measured_only_when_asked(encoder):
    calib = _calibration(40)
    auto = graphprune.prune(encoder, ratio=0.0, head_ratio=0.0, mlp_ratio=0.25, calibration=calib)
    assert auto.report["allocation"]["mode"] == "uniform"
    assert auto.report["allocation"]["why"] == "no head group is cut; allocation 'measured' adds mlp"
    asked = graphprune.prune(encoder, ratio=0.0, head_ratio=0.0, mlp_ratio=0.25, calibration=calib,
                             allocation="measured")
    allocation = asked.report["allocation"]
    assert allocation["mode"] == "measured" and allocation["kind"] == "mlp"
    assert allocation["units_removed"] == allocation["units_removed_uniform"] == 3 * 16
    assert asked.report["verification"]["ok"]
    assert asked.report["params_after"] == auto.report["params_after"]


def test_heads_are_measured_beside_mlp_neurons_cut_by_the_ratio(encoder, runs):
    measured, uniform = runs
    both = graphprune.prune(encoder, ratio=0.25, calibration=_calibration())
    allocation = both.report["allocation"]
    assert allocation["mode"] == "measured" and allocation["kind"] == "head"
    assert allocation["uniform_groups"] == {"mlp": 3}
    assert both.report["verification"]["ok"]
    # the heads as in the heads-only prune, every MLP a quarter
    assert sum(_heads_removed(both)) == 3 and max(_heads_removed(both)) <= 2
    from graphprune.analysis import targets

    kinds = targets.classify_groups(both.analysis)
    mlp = [len(g.remove) for g in both.plan.groups if kinds.get(g.group) == "mlp"]
    assert mlp == [16, 16, 16]
    assert all(c["kept"] and len(c["kept"]) == 3 for c in allocation["candidates"])
    assert "3 mlp groups cut by the ratio in every candidate" in allocation_lines(allocation)[0]
    onnx.checker.check_model(both.model, full_check=True)


def test_cnn_channels_keep_the_ratio_of_every_group():
    model = onnx.shape_inference.infer_shapes(example_cnn())
    x = np.random.default_rng(0).normal(size=(16, 1, 3, 64, 64)).astype(np.float32)
    result = graphprune.prune(model, ratio=0.5, calibration={model.graph.input[0].name: x})
    assert result.report["allocation"]["mode"] == "uniform"
    assert allocation_lines(result.report["allocation"]) == []


def test_allocation_needs_a_calibrated_ratio_prune(encoder, tmp_path):
    with pytest.raises(UsageError, match="allocation applies"):
        graphprune.prune(encoder, head_ratio=0.25, allocation="uniform")
    with pytest.raises(UsageError, match="unknown allocation"):
        graphprune.prune(encoder, head_ratio=0.25, calibration=_calibration(), allocation="greedy")
    path = tmp_path / "m.onnx"
    onnx.save(encoder, path)
    out = tmp_path / "p.onnx"
    proc = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out),
                           "--allocation", "uniform"], capture_output=True, text=True)
    assert proc.returncode == 2 and "--allocation applies" in proc.stderr and not out.exists()


def test_auto_leaves_a_costly_measurement_to_allocation_measured(encoder, monkeypatch):
    from graphprune.pipeline import measured_ratio

    monkeypatch.setattr(measured_ratio, "AUTO_CANDIDATE_SECONDS", 1e-3)
    calib = _calibration()
    auto = graphprune.prune(encoder, ratio=0.0, head_ratio=0.25, mlp_ratio=0.0, calibration=calib)
    why = auto.report["allocation"]["why"]
    assert auto.report["allocation"]["mode"] == "uniform"
    assert why.startswith("a measured allocation reconstructs at least 4 candidates, estimated at ")
    assert why.endswith("s each here; --allocation measured runs it")
    asked = graphprune.prune(encoder, ratio=0.0, head_ratio=0.25, mlp_ratio=0.0, calibration=calib,
                             allocation="measured")
    assert asked.report["allocation"]["mode"] == "measured" and asked.report["verification"]["ok"]


def test_dynamic_int8_heads_are_measured(encoder, tmp_path):
    """``quantize_dynamic``'s int8 weights (``MatMulInteger``) are masked around their zero
    point in the sensitivity sweep: every head group is measured, not left to the median."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(encoder, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)  # uint8: a zero point off 0
    quantized = onnx.load(str(dst))
    assert any(n.op_type == "MatMulInteger" for n in quantized.graph.node)
    result = graphprune.prune(quantized, ratio=0.0, head_ratio=0.25, mlp_ratio=0.0, calibration=_calibration())
    allocation = result.report["allocation"]
    assert allocation["mode"] == "measured" and result.report["verification"]["ok"]
    assert allocation["sensitivity"]["groups_measured"] == 3
    assert sum(_heads_removed(result)) == 3


def _int4(encoder):
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    quantizer = MatMulNBitsQuantizer(encoder, block_size=16, is_symmetric=False)
    quantizer.process()
    return quantizer.model.model


def _uint8(encoder, tmp_path):
    from onnxruntime.quantization import QuantType, quantize_dynamic

    src, dst = tmp_path / "f.onnx", tmp_path / "q.onnx"
    onnx.save(encoder, src)
    quantize_dynamic(str(src), str(dst), weight_type=QuantType.QUInt8)
    return onnx.load(str(dst))


@pytest.mark.parametrize("kind", ["uint8", "int4"])
def test_the_sweep_masks_integer_weights_as_the_zeroed_original_zeroes_them(encoder, tmp_path, kind):
    """The sweep model with one group's mask at zero computes what the zeroed original of that
    removal computes, on ``quantize_dynamic``'s uint8 weights (zero point 128-ish) and on packed
    4-bit ``MatMulNBits`` weights with a zero point per block."""
    from graphprune.pipeline.session import Session
    from graphprune.planning import budget, sensitivity
    from graphprune.planning.importance import score_group
    from graphprune.verify import zeroed
    from graphprune.verify.validate import session as ort_session

    model = _uint8(encoder, tmp_path) if kind == "uint8" else _int4(encoder)
    session = Session(model)
    analysis = session.analyze()
    tensors = analysis.context.tensors
    rng = np.random.default_rng(0)
    states = budget.build_states(analysis, lambda g: score_group(g, tensors, "l1", rng), eligible=lambda g: True)
    masked, sweep = sensitivity.masked_model(session.prepared, analysis, states)
    measured = [(st, masks) for st, masks in zip(states, sweep.masks, strict=True) if masks]
    inits = {i.name: i for i in session.prepared.graph.initializer}
    integer = [(st, masks) for st, masks in measured
               if any(dim[0] in inits and inits[dim[0]].data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)
                      for g, _ in st.members for dim in g.unit_of)]
    assert integer  # groups whose only weights are integers are measured
    x = {"x": np.random.default_rng(2).normal(size=(1, 6, HIDDEN)).astype(np.float32)}
    ones = {name: np.ones(st.group.num_units, np.float32) for st, masks in measured for name, _ in masks}
    sweep_session = ort_session(session.path_of(masked))
    for st, masks in integer:
        m = st.steps[len(st.steps) // 2]
        feed = dict(ones)
        removed = {}
        for name, order in masks:
            feed[name] = np.ones(st.group.num_units, np.float32)
            feed[name][order[:m]] = 0.0
        for group, order in st.members:
            removed.update(group.removed_elements(sorted(int(u) for u in order[:m])))
        got = sweep_session.run(None, {**x, **feed})[0]
        reference = zeroed.zeroed_reference(session.prepared, analysis, removed)
        want = ort_session(reference, optimize=False).run(None, x)[0]
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
        full = ort_session(session.prepared).run(None, x)[0]
        assert np.abs(full - want).max() > 1e-3  # the removal changes the output
