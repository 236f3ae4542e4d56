"""Ops that draw random numbers (a VITS vocoder's flow noise ``m + randn_like(m) * exp(logs)``,
GPT-SoVITS's sampled next token): without a seed every ONNX Runtime session draws anew, so no
prune could be checked (GPT-SoVITS's decoder exited 3 blaming the preparation, its vocoder 2
after 463 s). They are seeded for the work and written without the seeds."""

from __future__ import annotations

import numpy as np
import onnx
from conftest import make_model
from onnx import helper

import graphprune
from graphprune.rules import random_draws


def _noisy_cnn(seed: float | None = None) -> onnx.ModelProto:
    """x [1, 8, 20] -> conv 16 -> relu -> conv 16 -> m + randn_like(m) * 0.1 -> conv 8."""
    noise = helper.make_node("RandomNormalLike", ["m"], ["n"], dtype=onnx.TensorProto.FLOAT,
                             **({} if seed is None else {"seed": seed}))
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], pads=[1, 1]), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["m"], pads=[1, 1]), noise,
             helper.make_node("Mul", ["n", "scale"], ["ns"]), helper.make_node("Add", ["m", "ns"], ["z"]),
             helper.make_node("Conv", ["z", "w3", "b3"], ["y"], pads=[1, 1])]
    params = {"w1": [16, 8, 3], "b1": [16], "w2": [16, 16, 3], "b2": [16], "w3": [8, 16, 3], "b3": [8],
              "scale": np.array([0.1], np.float32)}
    return make_model(nodes, {"x": [1, 8, 20]}, {"y": [1, 8, 20]}, params)


def _seeds(model: onnx.ModelProto) -> list:
    return [a.f for n in model.graph.node for a in n.attribute if n.op_type.startswith("Random") and a.name == "seed"]


def test_a_model_that_draws_random_numbers_prunes_and_is_written_without_the_seed(tmp_path):
    model = _noisy_cnn()
    for options in ({"ratio": 0.5}, {"lossless": True}, {"ratio": 0.3, "calibration": "random:16"}):
        result = graphprune.prune(model, **options)
        assert result.report["verification"]["ok"], result.report["verification"]
        assert _seeds(result.model) == [] and _seeds(model) == []  # (the caller's model untouched)
        onnx.checker.check_model(result.model, full_check=True)
    assert graphprune.prune(model, ratio=0.5).report["params_after"] < graphprune.prune(model, ratio=0.0).report[
        "params_after"]
    # a seed the model came with stays
    seeded = graphprune.prune(_noisy_cnn(seed=3.0), ratio=0.5)
    assert _seeds(seeded.model) == [3.0] and seeded.report["verification"]["ok"]


def test_seeds_are_given_to_every_drawing_node_and_taken_back_from_those_only():
    model = _noisy_cnn()
    inner = helper.make_graph([helper.make_node("RandomUniform", [], ["u"], shape=[2])], "inner", [],
                              [helper.make_tensor_value_info("u", onnx.TensorProto.FLOAT, [2])])
    model.graph.node.append(helper.make_node("If", ["flag"], ["w"], then_branch=inner, else_branch=inner))
    assert random_draws.seed_unseeded(model) == ["RandomNormalLike", "RandomUniform", "RandomUniform"]
    assert len(set(_seeds(model))) == 1 and random_draws.seed_unseeded(model) == []  # (only the main graph's listed)
    assert random_draws.unseed(model) == 3 and random_draws.seed_unseeded(model)


def test_the_size_probe_of_a_drawing_model_keeps_the_smallest_sizes_that_run(tmp_path):
    """GPT-SoVITS's vocoder needs 705 samples of reference audio (a reflect pad); the text axes
    do not. Its draws never reproduce in one session, so the probe kept the first sizes that ran:
    every axis at 1024 (5x the verification's time, 2.4x its memory). It keeps the smallest."""
    from graphprune.analysis.probe_sizes import choose_input_shapes
    from graphprune.io.feeds import input_specs

    pads = np.array([0, 12, 0, 12], np.int64)
    nodes = [helper.make_node("Pad", ["audio", "pads"], ["padded"], mode="reflect"),
             helper.make_node("RandomNormalLike", ["padded"], ["noise"], dtype=onnx.TensorProto.FLOAT),
             helper.make_node("Add", ["padded", "noise"], ["y"]), helper.make_node("Relu", ["text"], ["t"])]
    model = make_model(nodes, {"audio": [1, "samples"], "text": [1, "tokens"]}, {"y": None, "t": None},
                       {"pads": pads})
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    shapes = choose_input_shapes(path, input_specs(model))
    assert shapes == {"audio": (1, 16), "text": (1, 8)}, shapes
