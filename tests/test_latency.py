"""The per-operator latency table: specs, measurement sessions, the on-disk cache.

Real ONNX Runtime sessions on tiny ops; nothing here asserts how fast anything is, only
what was measured, what was cached and what was credited to which node.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import make_model
from onnx import helper

from graphprune.planning.latency import LatencyTable, OpSpec, static_shape

OPSET = 17


def _model() -> onnx.ModelProto:
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c"], name="conv", kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Split", ["r", "split"], ["s0", "s1"], name="split", axis=1),
        helper.make_node("Clip", ["s0", "", "hi"], ["k"], name="clip"),
        helper.make_node("MaxPool", ["s1"], ["p"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
        helper.make_node("Reshape", ["k", "shape"], ["flat"], name="reshape"),
    ]
    params = {"w": [32, 16, 3, 3], "b": [32], "split": np.array([16, 16], np.int64),
              "hi": np.array(6.0, np.float32), "shape": np.array([1, -1], np.int64)}
    model = make_model(nodes, {"x": [1, 16, 16, 16]}, {"flat": None, "p": None}, params, opset=OPSET)
    return onnx.shape_inference.infer_shapes(model)


def _graph() -> gs.Graph:
    return gs.import_onnx(_model())


def _nodes(graph: gs.Graph) -> dict[str, gs.Node]:
    return {node.name: node for node in graph.nodes}


def _table(tmp_path: Path, **kwargs) -> LatencyTable:
    return LatencyTable(cache_dir=tmp_path, repeats=2, warmup=0, **kwargs)


def _keys_script() -> str:
    return (
        "import sys\n"
        "sys.path.insert(0, 'tests')\n"
        "from graphprune.planning.latency import OpSpec, static_shape\n"
        "from test_latency import _graph\n"
        "print(' '.join(OpSpec.from_node(n, static_shape, 17).key for n in _graph().nodes))\n"
    )


def test_spec_keys_are_stable_across_processes():
    keys = [OpSpec.from_node(node, static_shape, OPSET).key for node in _graph().nodes]
    out = subprocess.run([sys.executable, "-c", _keys_script()], capture_output=True, text=True, check=True,
                         cwd=Path(__file__).resolve().parent.parent)
    assert out.stdout.split() == keys
    assert len(set(keys)) == len(keys)


def test_equal_nodes_give_equal_specs_and_shapes_change_them():
    graph = _graph()
    conv = _nodes(graph)["conv"]
    first = OpSpec.from_node(conv, static_shape, OPSET)
    again = OpSpec.from_node(_nodes(_graph())["conv"], static_shape, OPSET)
    assert first == again and hash(first) == hash(again) and first.key == again.key

    def pruned(tensor: gs.Tensor) -> list[int] | None:
        shape = static_shape(tensor)
        if tensor.name == "w":
            shape[0] = 24
        if tensor.name == "b":
            shape[0] = 24
        return shape

    smaller = OpSpec.from_node(conv, pruned, OPSET)
    assert smaller is not None and smaller.key != first.key
    assert smaller.inputs[1].shape == (24, 16, 3, 3) and smaller.inputs[1].constant
    assert smaller.inputs[0].constant is False
    assert OpSpec.from_node(conv, static_shape, OPSET + 1).key != first.key
    assert smaller.describe() == "Conv(1x16x16x16, w24x16x3x3, w24)"


def test_small_and_integer_constants_keep_their_values_weights_do_not():
    nodes = _nodes(_graph())
    clip = OpSpec.from_node(nodes["clip"], static_shape, OPSET)
    assert clip.inputs[1] is None  # the omitted min
    assert clip.inputs[2].values == (6.0,)
    assert OpSpec.from_node(nodes["split"], static_shape, OPSET).inputs[1].values == (16, 16)
    assert OpSpec.from_node(nodes["conv"], static_shape, OPSET).inputs[1].values is None
    assert OpSpec.from_node(nodes["pool"], static_shape, OPSET).outputs == (True,)
    assert OpSpec.from_node(nodes["split"], static_shape, OPSET).outputs == (True, True)


def test_unknown_shapes_and_subgraphs_cannot_be_timed():
    graph = _graph()
    conv = _nodes(graph)["conv"]
    assert OpSpec.from_node(conv, lambda tensor: None, OPSET) is None
    assert OpSpec.from_node(conv, lambda tensor: [-1, *static_shape(tensor)[1:]], OPSET) is None
    then = gs.Graph(nodes=[], outputs=[gs.Constant("one", np.ones(1, np.float32))])
    branch = gs.Node("If", "if", {"then_branch": then, "else_branch": then},
                     inputs=[gs.Constant("cond", np.array(True))], outputs=[gs.Variable("o", np.float32)])
    assert OpSpec.from_node(branch, static_shape, OPSET) is None


def test_latency_measures_once_then_answers_from_the_cache(tmp_path):
    graph = _graph()
    specs = [OpSpec.from_node(node, static_shape, OPSET) for node in graph.nodes]
    table = _table(tmp_path)
    seconds = table.latency(specs + specs[:2])  # duplicates measured once
    assert seconds.shape == (len(specs) + 2,) and np.all(seconds >= 0)
    assert seconds[0] > 0  # the conv, replaced by an NCHWc kernel, is still credited to its spec
    assert seconds[-2] == seconds[0]
    assert table.stats["measured"] == len(specs) and table.stats["sessions"] == 1
    assert table.stats["failed"] == 0 and table.stats["cached"] == 0

    data = json.loads(table.cache_path.read_text())
    assert data["fingerprint"] == table.fingerprint
    assert set(data["entries"]) == {spec.key for spec in specs}
    assert data["entries"][specs[0].key]["op"] == "Conv(1x16x16x16, w32x16x3x3, w32)"

    again = _table(tmp_path)
    np.testing.assert_array_equal(again.latency(specs), seconds[: len(specs)])
    assert again.stats["measured"] == 0 and again.stats["sessions"] == 0
    assert again.stats["cached"] == len(specs)


def test_cache_is_per_machine_key_and_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("GRAPHPRUNE_CACHE", str(tmp_path / "root"))
    default = LatencyTable()
    assert default.cache_path.parent == tmp_path / "root" / "latency"
    assert default.cache_path.name.startswith("cpu-")
    assert LatencyTable(threads=1).cache_path != default.cache_path
    assert LatencyTable(threads=1).fingerprint["threads"] == 1


def test_two_tables_merge_into_one_cache_file(tmp_path):
    graph = _graph()
    specs = [OpSpec.from_node(node, static_shape, OPSET) for node in graph.nodes]
    first, second = _table(tmp_path), _table(tmp_path)
    assert first.entries == {}  # loaded before the other one writes
    second.latency(specs[:2])
    first.latency(specs[2:4])
    stored = json.loads(first.cache_path.read_text())["entries"]
    assert set(stored) == {spec.key for spec in specs[:4]}


def test_a_spec_that_cannot_run_is_isolated_and_reported(tmp_path):
    graph = _graph()

    def wrong(tensor: gs.Tensor) -> list[int] | None:  # a pruned input, an unpruned shape literal
        shape = static_shape(tensor)
        return [1, 15] if tensor.name == "k" else shape

    nodes = _nodes(graph)
    bad = OpSpec.from_node(gs.Node("Reshape", "r2", inputs=[nodes["reshape"].inputs[0],
                                                            gs.Constant("s", np.array([7, 7], np.int64))],
                                   outputs=[gs.Variable("o", np.float32)]), wrong, OPSET)
    good = [OpSpec.from_node(node, static_shape, OPSET) for node in graph.nodes]
    table = _table(tmp_path)
    seconds = table.latency([*good[:3], bad, *good[3:]])
    assert table.failed(bad) and seconds[3] == 0
    assert not any(table.failed(spec) for spec in good)
    assert table.stats["failed"] == 1 and table.stats["measured"] == len(good)
    assert table.stats["sessions"] > 1
    assert json.loads(table.cache_path.read_text())["entries"][bad.key]["seconds"] is None


def test_estimate_sums_the_nodes_and_lists_the_untimed(tmp_path):
    graph = _graph()
    table = _table(tmp_path)
    per_node = table.node_latencies(graph, static_shape, OPSET)
    assert set(per_node) == {node.name for node in graph.nodes}
    assert table.untimed == {}
    assert table.estimate(graph, static_shape, OPSET) == pytest.approx(sum(per_node.values()))

    def no_pool(tensor: gs.Tensor) -> list[int] | None:
        return None if tensor.name == "s1" else static_shape(tensor)

    total = table.estimate(graph, no_pool, OPSET)
    assert set(table.untimed) == {"pool"}
    assert total == pytest.approx(sum(v for name, v in per_node.items() if name != "pool"))


def test_measurement_model_runs_every_spec_as_its_own_node():
    from graphprune.planning.latency import _build

    graph = _graph()
    specs = [OpSpec.from_node(node, static_shape, OPSET) for node in graph.nodes]
    built = _build(specs + specs)
    marked = [node for node in built.model.graph.node if node.name.startswith("gpspec")]
    assert len(marked) == 2 * len(specs)
    assert len(built.external) == 2  # the conv weight, once per copy; small constants stay inline
    activations = {(op.shape, op.dtype) for spec in specs for op in spec.inputs if op is not None and not op.constant}
    assert len(built.feeds) == len(activations)  # inputs of equal shape and dtype share one tensor
    # 4-D float activations come from a layout carrier, a Conv outside every spec
    carriers = [node for node in built.model.graph.node if not node.name.startswith("gpspec")]
    assert len(carriers) == sum(1 for shape, dtype in activations if len(shape) == 4 and dtype == "float32") > 0
    assert {node.op_type for node in carriers} == {"Conv"}
    options = ort.SessionOptions()
    handles = [ort.OrtValue.ortvalue_from_numpy(array) for array in built.external.values()]
    options.add_external_initializers(list(built.external), handles)
    session = ort.InferenceSession(built.model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    outputs = dict(zip((o.name for o in session.get_outputs()), session.run(None, built.feeds), strict=True))
    assert len(outputs) == 2 * sum(len(spec.outputs) for spec in specs) + len(carriers)
    assert outputs["gpspec0x_out0"].shape == (1, 32, 16, 16)


def test_fused_nodes_cost_what_their_costliest_member_costs(tmp_path):
    table = _table(tmp_path)
    fusions = table.fusions(_model())
    assert fusions == {"conv": "conv", "relu": "conv"}  # Conv+Relu become one FusedConv
    graph = _graph()
    alone = table.node_latencies(graph, static_shape, OPSET)
    fused = table.node_latencies(graph, static_shape, OPSET, fusions)
    costliest = max(("conv", "relu"), key=alone.get)
    assert fused[costliest] == alone[costliest]
    assert fused[({"conv", "relu"} - {costliest}).pop()] == 0.0
    assert {name: fused[name] for name in fused if name not in fusions} == {
        name: alone[name] for name in alone if name not in fusions}
    assert table.estimate(graph, static_shape, OPSET, fusions) == pytest.approx(sum(fused.values()))


def test_a_weight_behind_an_exporters_identity_is_a_constant():
    weight = gs.Constant("w", np.ones((8, 4, 1, 1), np.float32))
    through = gs.Variable("w_identity", np.float32, (8, 4, 1, 1))
    identity = gs.Node("Identity", "identity", inputs=[weight], outputs=[through])
    data = gs.Variable("x", np.float32, (1, 4, 8, 8))
    conv = gs.Node("Conv", "conv", inputs=[data, through], outputs=[gs.Variable("y", np.float32)])
    gs.Graph(nodes=[identity, conv], inputs=[data], outputs=conv.outputs)
    spec = OpSpec.from_node(conv, static_shape, OPSET)
    assert spec.inputs[1].constant and spec.inputs[1].values is None
    assert not spec.inputs[0].constant


def test_specs_of_different_opsets_are_measured_in_separate_models(tmp_path):
    reduce_13 = gs.Node("ReduceMean", "mean13", {"axes": [1], "keepdims": 1},
                        inputs=[gs.Variable("x", np.float32, (1, 8, 4, 4))], outputs=[gs.Variable("y", np.float32)])
    reduce_18 = gs.Node("ReduceMean", "mean18", {"keepdims": 1},
                        inputs=[gs.Variable("x", np.float32, (1, 8, 4, 4)), gs.Constant("axes", np.array([1]))],
                        outputs=[gs.Variable("y", np.float32)])
    specs = [OpSpec.from_node(reduce_13, static_shape, 13), OpSpec.from_node(reduce_18, static_shape, 18)]
    table = _table(tmp_path)
    table.latency(specs)
    assert table.stats["sessions"] == 2 and table.stats["failed"] == 0


def test_a_candidate_whose_two_timings_disagree_is_reported() -> None:
    """FaceBoxes (TF.js, NMS in a ``Loop``) with ``--target-latency 0.6``: the same candidate timed
    0.78 of the original in its round and 0.08 side by side, since its run time follows the boxes
    it outputs; the report now says the measured fraction may not hold on real inputs."""
    from graphprune.pipeline.latency_rounds import unstable_timing

    steady = [{"measured_ratio": 0.62, "side_by_side_ratio": 0.58}, {"measured_ratio": 0.55}]
    assert unstable_timing(steady) is None
    flaky = [*steady, {"measured_ratio": 0.78, "side_by_side_ratio": 0.08}]
    note = unstable_timing(flaky)
    assert note is not None and "0.78" in note and "0.08" in note
