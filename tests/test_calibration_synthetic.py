"""``--calibration random[:N]``: synthetic feeds when there is no data (calibration/synthetic.py)."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.calibration import synthetic
from graphprune.errors import UsageError
from graphprune.io.feeds import InputSpec, input_specs
from graphprune.verify.validate import session

VOCAB = 50


def token_model(seed: int = 0) -> onnx.ModelProto:
    """int32 token ids -> Cast -> embedding Gather (50 rows) -> MLP, masked by an int64 mask."""
    rng = np.random.default_rng(seed)
    inits = [
        numpy_helper.from_array(rng.standard_normal((VOCAB, 16)).astype(np.float32), "table"),
        numpy_helper.from_array(rng.standard_normal((16, 32)).astype(np.float32) / 4, "w1"),
        numpy_helper.from_array(rng.standard_normal(32).astype(np.float32), "b1"),
        numpy_helper.from_array(rng.standard_normal((32, 8)).astype(np.float32) / 6, "w2"),
        numpy_helper.from_array(np.array([-1], np.int64), "last"),
    ]
    nodes = [
        helper.make_node("Cast", ["input_ids"], ["ids64"], to=TensorProto.INT64, name="cast_ids"),
        helper.make_node("Gather", ["table", "ids64"], ["emb"], name="embed"),
        helper.make_node("Cast", ["attention_mask"], ["maskf"], to=TensorProto.FLOAT, name="cast_mask"),
        helper.make_node("Unsqueeze", ["maskf", "last"], ["mask3"], name="mask_axis"),
        helper.make_node("Mul", ["emb", "mask3"], ["masked"], name="apply_mask"),
        helper.make_node("MatMul", ["masked", "w1"], ["h"], name="up"),
        helper.make_node("Add", ["h", "b1"], ["hb"], name="up_bias"),
        helper.make_node("Relu", ["hb"], ["a"], name="act"),
        helper.make_node("MatMul", ["a", "w2"], ["y"], name="down"),
    ]
    graph = helper.make_graph(
        nodes, "tokens",
        [helper.make_tensor_value_info("input_ids", TensorProto.INT32, [1, "seq"]),
         helper.make_tensor_value_info("attention_mask", TensorProto.INT64, [1, "seq"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, "seq", 8])], inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_spec_parsing(tmp_path, monkeypatch):
    assert synthetic.parse("random") == synthetic.Spec(synthetic.DEFAULT_COUNT)
    assert synthetic.parse("random:16") == synthetic.Spec(16)
    assert synthetic.parse("random:16:-1,1.5") == synthetic.Spec(16, (-1.0, 1.5))
    assert synthetic.parse("calib.npz") is None
    assert synthetic.parse(["random"]) is None
    for bad, message in [("random:1", "at least 2"), ("random:8:1,0", "LO < HI"), ("random:x", "random:N:LO,HI")]:
        with pytest.raises(UsageError, match=message):
            synthetic.parse(bad)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "random").mkdir()  # a folder of that name is calibration data, not the spec
    assert synthetic.parse("random") is None


def test_a_float_range_gives_uniform_floats():
    spec = InputSpec("image", [1, 1, 8, 8], np.dtype(np.float32))
    feeds = synthetic.synthetic_feeds([spec], {"image": (1, 1, 8, 8)}, {}, count=8, float_range=(0.0, 1.0))
    values = np.stack([f["image"] for f in feeds])
    assert values.dtype == np.float32 and values.min() >= 0 and values.max() <= 1 and values.std() > 0.2
    assert synthetic.describe(feeds, {}, (0.0, 1.0)) == "random (8 synthetic feeds: image [1, 1, 8, 8] uniform [0, 1])"
    assert synthetic.describe(synthetic.synthetic_feeds([spec], {"image": (1, 1, 8, 8)}, {}, count=2), {}).endswith(
        "image [1, 1, 8, 8] normal)")


def test_index_bounds_are_found_through_casts():
    graph = gs.import_onnx(token_model())
    assert synthetic.index_bounds(graph, 17) == {"input_ids": VOCAB}


def test_feeds_index_the_table_and_attend_everywhere():
    model = token_model()
    feeds = synthetic.synthetic_feeds(input_specs(model), {"input_ids": (1, 12), "attention_mask": (1, 12)},
                                      {"input_ids": VOCAB}, count=20)
    ids = np.stack([f["input_ids"] for f in feeds])
    assert ids.dtype == np.int32 and ids.min() >= 0 and ids.max() < VOCAB
    assert len(np.unique(ids)) > VOCAB // 2  # the whole table, not verification's {0, 1}
    assert all((f["attention_mask"] == 1).all() and f["attention_mask"].dtype == np.int64 for f in feeds)
    again = synthetic.synthetic_feeds(input_specs(model), {"input_ids": (1, 12), "attention_mask": (1, 12)},
                                      {"input_ids": VOCAB}, count=20)
    assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(feeds, again, strict=True))


def _rel_l2(model: onnx.ModelProto, reference: onnx.ModelProto, feeds: list[dict]) -> float:
    got = np.concatenate([session(model).run(None, f)[0].ravel() for f in feeds])
    want = np.concatenate([session(reference).run(None, f)[0].ravel() for f in feeds])
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def test_random_calibration_refits_and_beats_the_data_free_prune():
    model = token_model()
    calibrated = graphprune.prune(model, ratio=0.5, calibration="random:48")
    report = calibrated.report["calibration"]
    assert report["source"] == "random (48 synthetic feeds: input_ids [1, 8] ids < 50, attention_mask [1, 8] = 1)"
    assert report["used"] + report["held_out"] == 48
    assert report["passes"]["RefitPass"]["layers"] >= 1
    assert calibrated.report["verification"]["ok"]
    data_free = graphprune.prune(model, ratio=0.5)
    # judged on other random token sequences (seed 7, longer), never seen by the refit
    fresh = synthetic.synthetic_feeds(input_specs(model), {"input_ids": (1, 20), "attention_mask": (1, 20)},
                                      {"input_ids": VOCAB}, count=16, seed=7)
    assert _rel_l2(calibrated.model, model, fresh) < 0.7 * _rel_l2(data_free.model, model, fresh)  # 0.30 vs 0.58


def test_cli_random_calibration(tmp_path):
    src, out = tmp_path / "m.onnx", tmp_path / "p.onnx"
    onnx.save(token_model(), src)
    run = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(src), "-o", str(out), "--ratio", "0.5",
                          "--calibration", "random:16", "--html", str(tmp_path / "r.html")],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert "random inputs" in run.stdout and out.exists()
    assert "Measured on held-out synthetic inputs (random (16 synthetic feeds" in (tmp_path / "r.html").read_text()
    bad = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(src), "-o", str(tmp_path / "q.onnx"),
                          "--calibration", "random:1"], capture_output=True, text=True)
    assert bad.returncode == 2 and "at least 2" in bad.stderr and not (tmp_path / "q.onnx").exists()


def test_lengths_and_sample_rates_get_plausible_values():
    specs = [InputSpec("token_ids", [1, "seq"], np.dtype(np.int64)), InputSpec("length", [1], np.dtype(np.int64)),
             InputSpec("audio", [1, "time", 40], np.dtype(np.float32)), InputSpec("sr", [], np.dtype(np.int64)),
             InputSpec("x_lens", [1], np.dtype(np.int32))]
    shapes = {"token_ids": (1, 12), "length": (1,), "audio": (1, 30, 40), "sr": (), "x_lens": (1,)}
    (feed,) = synthetic.synthetic_feeds(specs, shapes, {"token_ids": 100}, count=1)
    assert feed["length"].tolist() == [12] and feed["x_lens"].tolist() == [12]  # the token ids' length
    assert int(feed["sr"]) == 16000
    (feed,) = synthetic.synthetic_feeds(specs[1:], {k: v for k, v in shapes.items() if k != "token_ids"}, {}, count=1)
    assert feed["length"].tolist() == [30]  # no token ids: the longest second axis
    assert synthetic.describe([feed], {}).endswith("sr [] = 16000, x_lens [1] = 30)")


def rate_switched_model() -> onnx.ModelProto:
    """``h = MLP(x)`` for ``x [1, T, 4]``; at ``sr == 16000`` the output sums ``h`` in frames of
    16 steps (``Reshape [1, -1, 64]``: T must be a multiple of 16), else per step. Like Silero
    VAD v6, whose 16 kHz branch needs 512 samples where its 8 kHz one runs on 128."""
    rng = np.random.default_rng(0)

    def const(name: str, value: np.ndarray) -> onnx.NodeProto:
        return helper.make_node("Constant", [], [name], value=numpy_helper.from_array(value, name))

    axes = np.array([2], np.int64)
    framed = helper.make_graph(
        [const("frame_shape", np.array([1, -1, 64], np.int64)), const("axes_a", axes),
         helper.make_node("Reshape", ["h", "frame_shape"], ["frames"]),
         helper.make_node("ReduceSum", ["frames", "axes_a"], ["ya"], keepdims=0)],
        "framed", [], [helper.make_tensor_value_info("ya", TensorProto.FLOAT, None)])
    stepped = helper.make_graph(
        [const("axes_b", axes), helper.make_node("ReduceSum", ["h", "axes_b"], ["yb"], keepdims=0)],
        "stepped", [], [helper.make_tensor_value_info("yb", TensorProto.FLOAT, None)])
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["h"]),
             helper.make_node("Equal", ["sr", "rate"], ["is_16k"]),
             helper.make_node("If", ["is_16k"], ["y"], then_branch=framed, else_branch=stepped)]
    graph = helper.make_graph(
        nodes, "rate_switched",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "T", 4]),
         helper.make_tensor_value_info("sr", TensorProto.INT64, [])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, None])],
        [numpy_helper.from_array(rng.standard_normal((4, 32)).astype(np.float32), "w1"),
         numpy_helper.from_array(rng.standard_normal((32, 4)).astype(np.float32), "w2"),
         numpy_helper.from_array(np.array(16000, np.int64), "rate")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model, full_check=True)
    return model


def test_synthetic_feeds_run_at_sizes_chosen_with_their_own_values():
    """The synthetic 16000 takes the framed branch, which cannot run at the guessed T = 8:
    the sizes are chosen with that value (verification feeds it too: the graph tests ``sr``
    for 16000)."""
    result = graphprune.prune(rate_switched_model(), ratio=0.5, calibration="random:8")
    assert result.report["verification"]["ok"]
    source = result.report["calibration"]["source"]
    assert "x [1, 16, 4]" in source and "sr [] = 16000" in source, source
    assert result.report["channels"]["removed"] > 0


def test_tested_values_are_found_through_casts_for_small_integer_inputs():
    """``Equal(Cast(sr), 16000)`` and ``Equal(flag, True)`` name their constants; a token-id
    matrix compared with a pad id is no mode switch, and neither is a comparison of two
    computed values."""
    nodes = [helper.make_node("Cast", ["sr"], ["sr32"], to=TensorProto.INT32),
             helper.make_node("Equal", ["sr32", "rate"], ["is_16k"]),
             helper.make_node("Equal", ["sr32", "rate8"], ["is_8k"]),
             helper.make_node("Equal", ["flag", "yes"], ["on"]),
             helper.make_node("Equal", ["ids", "pad"], ["is_pad"]),
             helper.make_node("Equal", ["other", "sr"], ["same"])]
    graph = helper.make_graph(
        nodes, "switches",
        [helper.make_tensor_value_info("sr", TensorProto.INT64, []),
         helper.make_tensor_value_info("flag", TensorProto.BOOL, [1]),
         helper.make_tensor_value_info("ids", TensorProto.INT64, [1, "seq"]),
         helper.make_tensor_value_info("other", TensorProto.INT64, [])],
        [helper.make_tensor_value_info(n, TensorProto.BOOL, None) for n in ("is_16k", "is_8k", "on", "is_pad", "same")],
        [numpy_helper.from_array(np.array(16000, np.int32), "rate"),
         numpy_helper.from_array(np.array([8000], np.int32), "rate8"),
         numpy_helper.from_array(np.array(True), "yes"), numpy_helper.from_array(np.array(0, np.int64), "pad")])
    found = synthetic.tested_values(gs.import_onnx(helper.make_model(graph)), 17)
    assert found == {"sr": [16000, 8000], "flag": [True]}
    specs = [InputSpec("sr", [], np.dtype(np.int64)), InputSpec("flag", [1], np.dtype(np.bool_))]
    (feed,) = synthetic.synthetic_feeds(specs, {"sr": (), "flag": (1,)}, {}, count=1, tested=found)
    assert feed["sr"].dtype == np.int64 and int(feed["sr"]) == 16000 and feed["flag"].tolist() == [True]


def test_integers_whose_range_no_table_tells_are_held_where_random_ones_do_not_run():
    """A graph network's node -> graph ids index a ``ScatterElements`` into as many graphs as
    another input has rows (minimol: ``batch`` into ``graph_slots[num_graphs]``): random ids
    in {0, 1} with one graph do not run, and ``--calibration random`` stopped with exit 3,
    "the original model does not run". Those integers are now held at the values verification
    runs the original with (said in the source line), the float features random."""
    feat = helper.make_tensor_value_info("feat", TensorProto.FLOAT, ["num_nodes", 6])
    batch = helper.make_tensor_value_info("batch", TensorProto.INT64, ["num_nodes"])
    slots = helper.make_tensor_value_info("graph_slots", TensorProto.FLOAT, ["num_graphs"])
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((6, 16)).astype(np.float32), "w1"),
             numpy_helper.from_array(rng.standard_normal((16, 1)).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1], np.int64), "one")]
    nodes = [helper.make_node("MatMul", ["feat", "w1"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["s2"]), helper.make_node("Squeeze", ["s2", "one"], ["s"]),
             helper.make_node("ScatterElements", ["graph_slots", "batch", "s"], ["y"], axis=0, reduction="add")]
    graph = helper.make_graph(nodes, "gnn", [feat, batch, slots],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["num_graphs"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    result = graphprune.prune(model, ratio=0.5, calibration="random:16")
    source = result.report["calibration"]["source"]
    assert "batch held at the values verification runs the original with" in source, source
    assert result.report["verification"]["ok"] and result.report["params_after"] < result.report["params_before"]


def test_verification_feeds_ids_across_the_table_they_index():
    """Verification fed every integer input 0s and 1s; on chython-rxnmap ids 0 and 1 are
    padding and a ``-inf`` bias, and the original's output was the mask's softmax whatever the
    network computed, so the structural check compared nothing. Ids that index a table now
    span it (where the original runs on them); the mask, indexing nothing, stays 0/1; and a
    model that does not run on such ids keeps 0s and 1s."""
    from graphprune.pipeline.session import Session

    session = Session(token_model())
    feeds = session.feeds(count=2)
    ids = np.concatenate([f["input_ids"].ravel() for f in feeds])
    assert session.index_highs() == {"input_ids": VOCAB}
    assert ids.max() >= 2 and ids.max() < VOCAB and feeds[0]["input_ids"].dtype == np.int32
    assert set(np.concatenate([f["attention_mask"].ravel() for f in feeds])) <= {0, 1}
    # the same ids also scatter into two slots: ids past 1 do not run, so 0s and 1s stay
    model = token_model()
    model.graph.initializer.append(numpy_helper.from_array(np.zeros((1, 2), np.float32), "slots"))
    model.graph.initializer.append(numpy_helper.from_array(np.ones((1, 8), np.float32), "ones"))
    model.graph.node.extend([
        helper.make_node("Cast", ["ones"], ["ones_f"], to=TensorProto.FLOAT),
        helper.make_node("ScatterElements", ["slots", "ids64", "ones_f"], ["scattered"], axis=1)])
    model.graph.output.append(helper.make_tensor_value_info("scattered", TensorProto.FLOAT, None))
    assert Session(model, input_shapes={"input_ids": (1, 8), "attention_mask": (1, 8)}).index_highs() == {}


def test_index_bounds_are_found_through_a_gather_of_the_ids():
    """A decoder reads ``prefix[:, -1]`` (a Gather of the ids) before its embedding: its ids were
    given 0 or 1 (the bound was not found past the Gather), and the refit fit two tokens."""
    model = token_model()
    last = numpy_helper.from_array(np.array(-1, np.int64), "last_token")
    model.graph.initializer.append(last)
    embed = next(n for n in model.graph.node if n.name == "embed")
    model.graph.node.insert(list(model.graph.node).index(embed),
                            helper.make_node("Gather", ["ids64", "last_token"], ["ids_last"], axis=1, name="pick"))
    embed.input[1] = "ids_last"
    graph = gs.import_onnx(model)
    assert synthetic.index_bounds(graph, 17) == {"input_ids": VOCAB}


def _key_padding(true_ignores: bool, ids: bool = False) -> onnx.ModelProto:
    """memory [1, 6, 8] attended under a boolean mask [1, 6]: scores -> Where(mask) -> Softmax ->
    weighted sum. ``true_ignores``: PyTorch's key-padding convention (True = padding), else True = keep;
    ``ids``: memory is the embedding of token ids [1, 6] (an encoder's input)."""
    rng = np.random.default_rng(3)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 1)).astype(np.float32), "q"),
             numpy_helper.from_array(np.array(-1e9, np.float32), "off"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    where = ["mask", "off", "s"] if true_ignores else ["mask", "s", "off"]
    nodes = [helper.make_node("MatMul", ["memory", "q"], ["s3"]),
             helper.make_node("Squeeze", ["s3", "axis2"], ["s"]),
             helper.make_node("Where", where, ["masked"]),
             helper.make_node("Softmax", ["masked"], ["a"], axis=-1),
             helper.make_node("Unsqueeze", ["a", "axis2"], ["a3"]),
             helper.make_node("Mul", ["a3", "memory"], ["weighted"]),
             helper.make_node("ReduceSum", ["weighted", "axis1"], ["y"], keepdims=0)]
    inits.append(numpy_helper.from_array(np.array([1], np.int64), "axis1"))
    first = helper.make_tensor_value_info("memory", TensorProto.FLOAT, [1, 6, 8])
    if ids:
        inits.append(numpy_helper.from_array(rng.standard_normal((VOCAB, 8)).astype(np.float32), "table"))
        nodes.insert(0, helper.make_node("Gather", ["table", "src"], ["memory"]))
        first = helper.make_tensor_value_info("src", TensorProto.INT64, [1, 6])
    graph = helper.make_graph(nodes, "attend", [first, helper.make_tensor_value_info("src_mask", TensorProto.BOOL, [1, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 8])], inits)
    next(n for n in graph.node if n.op_type == "Where").input[0] = "src_mask"
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("ids", [False, True])
@pytest.mark.parametrize("true_ignores", [True, False])
def test_a_boolean_key_padding_mask_is_fed_as_nothing_masked(true_ignores, ids):
    """A romanizer's decoder takes PyTorch's key-padding mask (True = padding): fed all True, every
    source position was masked, the refit fit degenerate attention, and no name decoded as before.
    Which value masks is read from the model: a position marked alone is ignored or not."""
    model = _key_padding(true_ignores, ids)
    specs = input_specs(model)
    first = "src" if ids else "memory"
    feeds = synthetic.synthetic_feeds(specs, {first: (1, 6) if ids else (1, 6, 8), "src_mask": (1, 6)},
                                      {"src": VOCAB} if ids else {}, count=4)
    assert all(f["src_mask"].all() for f in feeds)  # (named like a mask: all True first)
    sess = session(model)
    unmasked, text = synthetic.unmask(specs, feeds, "random", lambda feed: sess.run(None, feed))
    assert all((~f["src_mask"]).all() if true_ignores else f["src_mask"].all() for f in unmasked)
    assert ("src_mask all False" in text) == true_ignores
    assert all(np.array_equal(a[first], b[first]) for a, b in zip(feeds, unmasked, strict=True))
