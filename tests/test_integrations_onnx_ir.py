"""The onnx-ir pass: PrunePass in onnx_ir's PassManager, in memory, truthful `modified`."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common as common_passes
import onnxruntime as ort
import pytest

import graphprune
from graphprune.examples import example_cnn
from graphprune.integrations.onnx_ir import MARK, PrunePass


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    from graphprune.io.feeds import make_feeds

    return make_feeds(model, seed=7)[0]


def test_prune_pass_in_a_pass_manager_matches_graphprune_prune():
    proto = example_cnn()
    model = ir.from_proto(proto)
    prune_pass = PrunePass(ratio=0.5, criterion="l2")
    manager = ir.passes.PassManager(
        [prune_pass, common_passes.RemoveUnusedNodesPass(), common_passes.TopologicalSortPass()],
        steps=2, early_stop=True,
    )
    result = manager(model)
    assert result.modified and result.model is model
    assert prune_pass.report["verification"]["ok"]
    pruned = ir.to_proto(result.model)
    onnx.checker.check_model(pruned, full_check=True)
    # the same as the library on the same model
    expected = graphprune.prune(proto, ratio=0.5, criterion="l2").model
    feeds = feeds_for(proto)
    np.testing.assert_allclose(run(pruned, feeds)[0], run(expected, feeds)[0], rtol=1e-5, atol=1e-6)
    assert graphprune.prune(pruned, ratio=0.0).report["params_before"] == prune_pass.report["params_after"]
    assert MARK in result.model.metadata_props


def test_second_run_is_not_modified_and_prunes_nothing_more():
    model = ir.from_proto(example_cnn())
    first = PrunePass(ratio=0.5)(model)
    assert first.modified
    before = ir.to_proto(model).SerializeToString()
    second = PrunePass(ratio=0.5)(model)
    assert not second.modified and second.model is model
    assert ir.to_proto(model).SerializeToString() == before


def test_nothing_to_remove_is_not_modified():
    model = ir.from_proto(example_cnn())
    before = ir.to_proto(model).SerializeToString()
    result = PrunePass(ratio=0.0)(model)
    assert not result.modified
    assert ir.to_proto(model).SerializeToString() == before
    assert MARK not in model.metadata_props


def test_options_are_those_of_prune_and_the_repr_reads():
    assert repr(PrunePass(ratio=0.3, lossless=False)) == "PrunePass(ratio=0.3, lossless=False)"
    with pytest.raises(TypeError, match="unknown option.*ratoi"):
        PrunePass(ratoi=0.3)


def test_a_bad_option_fails_and_leaves_the_model_unchanged():
    model = ir.from_proto(example_cnn())
    before = ir.to_proto(model).SerializeToString()
    with pytest.raises(graphprune.UsageError, match="criterion"):
        PrunePass(ratio=0.5, criterion="magic")(model)
    assert ir.to_proto(model).SerializeToString() == before


def test_model_with_external_data_loaded_by_onnx_ir(tmp_path):
    path = tmp_path / "ext.onnx"
    onnx.save(example_cnn(), path, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    model = ir.load(path)
    assert any(isinstance(v.const_value, ir.ExternalTensor) for v in model.graph.initializers.values())
    result = PrunePass(ratio=0.5)(model)
    assert result.modified
    pruned = ir.to_proto(result.model)
    onnx.checker.check_model(pruned, full_check=True)
    feeds = feeds_for(pruned)
    assert run(pruned, feeds)[0].shape == run(example_cnn(), feeds)[0].shape


@pytest.mark.torch
@pytest.mark.slow
def test_prunes_the_onnx_ir_model_of_a_torch_dynamo_export():
    torch = pytest.importorskip("torch")
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, padding=1), torch.nn.ReLU(),
                              torch.nn.Conv2d(16, 8, 3, padding=1)).eval()
    program = torch.onnx.export(net, (torch.randn(1, 3, 8, 8),), dynamo=True)
    model = program.model  # an onnx_ir.Model
    assert isinstance(model, ir.Model)
    result = PrunePass(ratio=0.5, round_to=1)(model)
    assert result.modified
    convs = [n for n in result.model.graph if n.op_type == "Conv"]
    assert convs[0].inputs[1].shape[0] == 8  # 16 -> 8 output channels
    onnx.checker.check_model(ir.to_proto(result.model), full_check=True)
