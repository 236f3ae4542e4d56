"""Recurrent layers whose exported zero states and final-state reads tie their layers together.

Exporters write a recurrent layer's default (zero) initial state out — TorchScript as one
``ConstantOfShape`` sliced per layer, paddle2onnx as a ``Tile`` of a zero constant by the batch
size, the dynamo exporter as one zero initializer — and a network that reads ``h_n[-1]``
concatenates every layer's final state first. Both couple every layer's hidden units into one
group (or freeze it: the tiled state's size is unknown). Before the analysis, a provably zero
optional input is dropped (``graphprune/io/zero_inputs.py``) and a selection within one input
of a concatenation reads that input (``graphprune/io/concat_selects.py``): every layer prunes
on its own, and the function does not change.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from conftest import (
    CONSUMER,
    PRODUCER,
    assert_prunes_exactly,
    make_model,
    parameter_roles,
    relative_difference,
    run_ort,
)
from onnx import helper

import graphprune
from graphprune.io import ir
from graphprune.io.concat_selects import bypass_concat_selects
from graphprune.io.zero_inputs import drop_zero_inputs

SEQ, BATCH, IN, H, OUT = 6, 3, 5, 16, 4


def _gru_weights(rng: np.random.Generator, n_in: int, dirs: int = 1) -> dict[str, np.ndarray]:
    return {"W": (rng.standard_normal((dirs, 3 * H, n_in)) * 0.3).astype(np.float32),
            "R": (rng.standard_normal((dirs, 3 * H, H)) * 0.3).astype(np.float32),
            "B": (rng.standard_normal((dirs, 6 * H)) * 0.3).astype(np.float32)}


def tiled_state_model(fill: float = 0.0) -> onnx.ModelProto:
    """paddle2onnx's shape: two GRU layers whose initial states are slices of one
    ``Tile(fill [1, 2, H], [batch, 1, 1])`` transposed to ``[2, batch, H]``; the head reads
    the second layer's output."""
    rng = np.random.default_rng(0)
    params: dict[str, object] = {"state": np.full((1, 2, H), fill, np.float32),
                                 "one_one": np.array([1, 1], np.int64),
                                 "s0": np.array([0], np.int64), "s1": np.array([1], np.int64),
                                 "s2": np.array([2], np.int64), "ax0": np.array([0], np.int64),
                                 "ax1": np.array([1], np.int64), "W_head": (H, OUT)}
    for layer, n_in in (("a", IN), ("b", H)):
        params.update({f"{k}_{layer}": v for k, v in _gru_weights(rng, n_in).items()})
    nodes = [
        helper.make_node("Shape", ["x"], ["shape"]),
        helper.make_node("Slice", ["shape", "s1", "s2", "ax0"], ["batch"]),
        helper.make_node("Concat", ["batch", "one_one"], ["repeats"], axis=0),
        helper.make_node("Tile", ["state", "repeats"], ["tiled"]),
        helper.make_node("Transpose", ["tiled"], ["states"], perm=[1, 0, 2]),
        helper.make_node("Slice", ["states", "s0", "s1", "ax0"], ["h0_a"]),
        helper.make_node("Slice", ["states", "s1", "s2", "ax0"], ["h0_b"]),
        helper.make_node("GRU", ["x", "W_a", "R_a", "B_a", "", "h0_a"], ["y_a"], name="gru_a", hidden_size=H),
        helper.make_node("Squeeze", ["y_a", "ax1"], ["x_b"]),
        helper.make_node("GRU", ["x_b", "W_b", "R_b", "B_b", "", "h0_b"], ["y_b"], name="gru_b", hidden_size=H),
        helper.make_node("Squeeze", ["y_b", "ax1"], ["seq"]),
        helper.make_node("MatMul", ["seq", "W_head"], ["out"], name="head"),
    ]
    return make_model(nodes, {"x": [SEQ, "batch", IN]}, {"out": None}, params, opset=17)


def final_state_model(index: int = -1, slice_range: tuple[int, int] | None = None) -> onnx.ModelProto:
    """Three stacked GRUs (zero-state inputs absent); their final states ``[1, batch, H]`` are
    concatenated along axis 0 and the head reads ``Gather(index)`` of it, or a
    ``Slice(slice_range)`` flattened."""
    rng = np.random.default_rng(1)
    params: dict[str, object] = {"ax1": np.array([1], np.int64), "W_head": (H, OUT),
                                 "idx": np.array(index, np.int64)}
    nodes = []
    x = "x"
    for layer, n_in in zip("abc", (IN, H, H), strict=True):
        params.update({f"{k}_{layer}": v for k, v in _gru_weights(rng, n_in).items()})
        nodes.append(helper.make_node("GRU", [x, f"W_{layer}", f"R_{layer}", f"B_{layer}"],
                                      [f"y_{layer}", f"h_{layer}"], name=f"gru_{layer}", hidden_size=H))
        nodes.append(helper.make_node("Squeeze", [f"y_{layer}", "ax1"], [f"seq_{layer}"]))
        x = f"seq_{layer}"
    nodes.append(helper.make_node("Concat", ["h_a", "h_b", "h_c"], ["h_n"], axis=0))
    if slice_range is None:
        nodes.append(helper.make_node("Gather", ["h_n", "idx"], ["last"], axis=0))
    else:
        params.update({"start": np.array([slice_range[0]], np.int64), "end": np.array([slice_range[1]], np.int64),
                       "ax0": np.array([0], np.int64), "flat": np.array([-1, H], np.int64)})
        nodes.append(helper.make_node("Slice", ["h_n", "start", "end", "ax0"], ["part"]))
        nodes.append(helper.make_node("Reshape", ["part", "flat"], ["last"]))
    nodes.append(helper.make_node("MatMul", ["last", "W_head"], ["out"], name="head"))
    return make_model(nodes, {"x": [SEQ, BATCH, IN]}, {"out": None}, params, opset=17)


def roles(model: onnx.ModelProto) -> dict[tuple[str, int], str]:
    """The test's own reading of which weight axes a GRU hidden unit owns (rows of W, R and
    B for each gate, columns of R and of the next layer's W), with the MatMul head's."""
    out = parameter_roles(model)
    for layer in "abc":
        out.update({(f"W_{layer}", 1): PRODUCER, (f"R_{layer}", 1): PRODUCER, (f"B_{layer}", 1): PRODUCER,
                    (f"R_{layer}", 2): CONSUMER, (f"W_{layer}", 2): CONSUMER})
    return out


def feeds(model: onnx.ModelProto, seed: int = 0) -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(seed).standard_normal((SEQ, BATCH, IN)).astype(np.float32)}


def recurrent_groups(model: onnx.ModelProto) -> list:
    """The analysis's prunable groups that hold a recurrent layer's hidden units."""
    analysis = graphprune.analyze(model)
    groups = []
    for group in analysis.prunable_groups:
        names = {dim[0] for dim in group.dims}
        if any(name.startswith("R_") for name in names):
            groups.append(names)
    return groups


def test_tiled_zero_state_is_dropped_and_each_layer_prunes_on_its_own():
    model = tiled_state_model()
    prepared = ir.prepare(model)
    assert [n.op_type for n in prepared.graph.node].count("Tile") == 0
    grus = [n for n in prepared.graph.node if n.op_type == "GRU"]
    assert all(len(n.input) < 6 or not n.input[5] for n in grus)
    np.testing.assert_allclose(run_ort(prepared, feeds(model))[0], run_ort(model, feeds(model))[0], rtol=1e-6, atol=1e-6)
    groups = recurrent_groups(model)
    assert len(groups) == 2 and not any({"R_a", "R_b"} <= g for g in groups), groups
    assert_prunes_exactly(model, 0.5, feeds=feeds(model), roles=roles(model))


def test_a_non_zero_state_is_kept():
    """A state filled with 0.5 is not the default: the GRUs keep reading it (their hidden
    units stay tied through it, frozen by the unknown size of the tiled state)."""
    model = tiled_state_model(fill=0.5)
    prepared = ir.prepare(model)
    assert any(n.op_type == "Tile" for n in prepared.graph.node)
    assert all(len(n.input) > 5 and n.input[5] for n in prepared.graph.node if n.op_type == "GRU")
    graph = ir.import_graph(model)
    assert drop_zero_inputs(graph, 17) == 0
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    np.testing.assert_allclose(run_ort(result.model, feeds(model))[0].shape, (SEQ, BATCH, OUT))


@pytest.mark.parametrize("index", [-1, 2, 0, 1])
def test_final_state_read_by_index_reads_that_layer(index):
    model = final_state_model(index)
    graph = ir.import_graph(ir.prepare(model, fold=False))
    assert not any(n.op == "Concat" for n in graph.nodes), "the dead Concat was not cleaned up"
    assert relative_difference(run_ort(model, feeds(model)), run_ort(ir.prepare(model), feeds(model))) < 1e-6
    groups = recurrent_groups(model)
    assert len(groups) == index % 3 + 1, groups  # the layers after the one read are dead code
    assert_prunes_exactly(model, 0.5, roles=roles(model))


def test_slice_within_one_input_reads_it_and_one_across_two_does_not():
    inside = final_state_model(slice_range=(2, 3))
    across = final_state_model(slice_range=(1, 3))
    for model in (inside, across):
        assert relative_difference(run_ort(model, feeds(model)), run_ort(ir.prepare(model), feeds(model))) < 1e-6
    graph = ir.import_graph(ir.prepare(across, fold=False))
    assert sum(n.op == "Concat" for n in graph.nodes) == 1  # it still joins all three states
    assert len(recurrent_groups(inside)) == 3
    assert len(recurrent_groups(across)) == 1
    assert_prunes_exactly(inside, 0.5, roles=roles(inside))
    assert_prunes_exactly(across, 0.5, roles=roles(across))


def test_gather_of_indices_out_of_one_input_is_left_alone():
    """Two indices across two layers' states (``h_n[[1, 2]]``) select no single input."""
    model = final_state_model()
    graph = ir.import_graph(model)
    gather = next(n for n in graph.nodes if n.op == "Gather")
    gather.inputs[1] = gs.Constant("two", np.array([1, 2], np.int64))
    assert bypass_concat_selects(graph, 17) == 0


@pytest.mark.torch
@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript", "dynamo"])
def test_torch_stacked_lstm_reading_h_n_last(tmp_path, dynamo):
    """``nn.LSTM(num_layers=3)`` without initial states, read as ``h_n[-1]`` (a speaker or
    sequence classifier): both exporters give three groups of hidden units, not one."""
    torch = pytest.importorskip("torch")

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(IN, H, 3)
            self.head = torch.nn.Linear(H, OUT)

        def forward(self, x):
            _, (h_n, _) = self.lstm(x)
            return self.head(h_n[-1])

    torch.manual_seed(0)
    path = tmp_path / "lstm.onnx"
    x = torch.randn(SEQ, BATCH, IN)
    torch.onnx.export(Encoder().eval(), (x,), str(path), input_names=["x"], output_names=["out"],
                      dynamo=dynamo, **({} if dynamo else {"dynamic_axes": {"x": {1: "batch"}}}))
    model = onnx.load(str(path))
    analysis = graphprune.analyze(model)
    hidden = [g for g in analysis.prunable_groups if g.num_units == H]
    assert len(hidden) == 3, [(g.anchor, g.num_units) for g in analysis.groups]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    assert result.report["groups"]["pruned"] == 3
    out = run_ort(result.model, {"x": x.numpy()})[0]
    assert out.shape == (BATCH, OUT)


@pytest.mark.parametrize(("chain", "dropped"), [
    ("pad0", True), ("pad1", False), ("relu", True), ("sigmoid", False), ("concat", True),
])
def test_which_computed_states_are_zero(chain, dropped):
    """Each rule's ``zero_filled``: a zero state padded with zeros, through ``Relu`` or joined
    with zeros is still zero and is dropped; padded with ones or through ``Sigmoid`` it is 0.5
    or 1 somewhere and stays (the model computes the same either way)."""
    rng = np.random.default_rng(2)
    params: dict[str, object] = {**{f"{k}_a": v for k, v in _gru_weights(rng, IN).items()},
                                 "zshape": np.array([1, BATCH, H - 2], np.int64),
                                 "half": np.array([1, BATCH, H // 2], np.int64),
                                 "pads": np.array([0, 0, 1, 0, 0, 1], np.int64),
                                 "one": np.array(1.0, np.float32), "W_head": (H, OUT)}
    zero = helper.make_tensor("z", onnx.TensorProto.FLOAT, [1], [0.0])
    nodes = {
        "pad0": [helper.make_node("ConstantOfShape", ["zshape"], ["z0"], value=zero),
                 helper.make_node("Pad", ["z0", "pads"], ["h0"])],
        "pad1": [helper.make_node("ConstantOfShape", ["zshape"], ["z0"], value=zero),
                 helper.make_node("Pad", ["z0", "pads", "one"], ["h0"])],
        "relu": [helper.make_node("ConstantOfShape", ["zshape"], ["z0"], value=zero),
                 helper.make_node("Pad", ["z0", "pads"], ["p0"]), helper.make_node("Relu", ["p0"], ["h0"])],
        "sigmoid": [helper.make_node("ConstantOfShape", ["zshape"], ["z0"], value=zero),
                    helper.make_node("Pad", ["z0", "pads"], ["p0"]), helper.make_node("Sigmoid", ["p0"], ["h0"])],
        "concat": [helper.make_node("ConstantOfShape", ["half"], ["z0"]),
                   helper.make_node("Concat", ["z0", "z0"], ["h0"], axis=2)],
    }[chain]
    nodes += [helper.make_node("GRU", ["x", "W_a", "R_a", "B_a", "", "h0"], ["y_a", "h_a"], name="gru_a", hidden_size=H),
              helper.make_node("Squeeze", ["h_a", "zero_axis"], ["last"]),
              helper.make_node("MatMul", ["last", "W_head"], ["out"], name="head")]
    params["zero_axis"] = np.array([0], np.int64)
    model = make_model(nodes, {"x": [SEQ, BATCH, IN]}, {"out": None}, params, opset=17)
    graph = ir.import_graph(model)
    assert drop_zero_inputs(graph, 17) == int(dropped)
    prepared = ir.prepare(model)
    assert relative_difference(run_ort(model, feeds(model)), run_ort(prepared, feeds(model))) < 1e-6
