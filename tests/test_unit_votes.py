"""How the units of a group whose members hold different channels are scored.

A residual stream widened by ``Pad`` (BlazeFace and MediaPipe's other TFLite models) is one
group: the early blocks hold its first channels, the late ones all of them. Summing the
members' votes ranked the early channels above every late one, so ``--ratio 0.5`` left the
early (costly) blocks whole (MediaPipe's face detector: 0.79x MACs). A dense block's
``Concat`` keeps its sums (each channel has one writer; an early channel reaches more layers).
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_prunes_exactly, initializer, make_model
from onnx import helper

import graphprune
from graphprune.planning.importance import UnitVotes, widened_stream

HW = 6
WIDTHS = (8, 8, 12, 16, 24)  # the stream's width after each block


def blaze_stream(both_sides: bool = False) -> object:
    """stem (8) -> four blocks ``relu(pw(dw(x)) + pad_channels(x))`` widening 8 -> 24 -> head;
    ``both_sides``: the pad split before and after the channels (a CIFAR ResNet's "option A"
    shortcut), so the stream's first channels sit in the middle of the late blocks'."""
    nodes = [helper.make_node("Conv", ["x", "W_stem", "B_stem"], ["s0"], name="stem",
                              kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    params: dict[str, object] = {"W_stem": (WIDTHS[0], 3, 3, 3), "B_stem": (WIDTHS[0],)}
    for k in range(1, len(WIDTHS)):
        cin, cout, x = WIDTHS[k - 1], WIDTHS[k], f"s{k - 1}"
        nodes += [
            helper.make_node("Conv", [x, f"W_dw{k}", f"B_dw{k}"], [f"d{k}"], name=f"dw{k}", group=cin,
                             kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
            helper.make_node("Conv", [f"d{k}", f"W_pw{k}", f"B_pw{k}"], [f"p{k}"], name=f"pw{k}",
                             kernel_shape=[1, 1]),
        ]
        params |= {f"W_dw{k}": (cin, 1, 3, 3), f"B_dw{k}": (cin,), f"W_pw{k}": (cout, cin, 1, 1),
                   f"B_pw{k}": (cout,)}
        short = x
        if cout > cin:
            nodes.append(helper.make_node("Pad", [x, f"pads{k}"], [f"sp{k}"], name=f"pad{k}", mode="constant"))
            before = (cout - cin) // 2 if both_sides else 0
            params[f"pads{k}"] = np.array([0, before, 0, 0, 0, cout - cin - before, 0, 0], dtype=np.int64)
            short = f"sp{k}"
        nodes += [helper.make_node("Add", [f"p{k}", short], [f"r{k}"], name=f"add{k}"),
                  helper.make_node("Relu", [f"r{k}"], [f"s{k}"], name=f"relu{k}")]
    last = f"s{len(WIDTHS) - 1}"
    nodes.append(helper.make_node("Conv", [last, "W_head", "B_head"], ["y"], name="head", kernel_shape=[1, 1]))
    params |= {"W_head": (4, WIDTHS[-1], 1, 1), "B_head": (4,)}
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params)


def dense_block() -> object:
    """stem (8) -> three 3x3 layers of growth 4, each reading the Concat of all before -> head."""
    nodes = [helper.make_node("Conv", ["x", "W_stem"], ["c0"], name="stem", kernel_shape=[3, 3], pads=[1, 1, 1, 1])]
    params: dict[str, object] = {"W_stem": (8, 3, 3, 3)}
    width = 8
    for k in range(1, 4):
        nodes += [
            helper.make_node("Relu", [f"c{k - 1}"], [f"a{k}"], name=f"relu{k}"),
            helper.make_node("Conv", [f"a{k}", f"W{k}"], [f"f{k}"], name=f"conv{k}", kernel_shape=[3, 3],
                             pads=[1, 1, 1, 1]),
            helper.make_node("Concat", [f"c{k - 1}", f"f{k}"], [f"c{k}"], name=f"cat{k}", axis=1),
        ]
        params[f"W{k}"] = (4, width, 3, 3)
        width += 4
    nodes.append(helper.make_node("Conv", ["c3", "W_head"], ["y"], name="head", kernel_shape=[1, 1]))
    params["W_head"] = (4, width, 1, 1)
    return make_model(nodes, {"x": [1, 3, HW, HW]}, {"y": None}, params)


def stream_group(analysis):
    return next(g for g in analysis.groups if ("W_pw1", 0) in g.params)


def test_unit_votes_sum_or_balance():
    """Full coverage keeps plain sums; a balanced group scores a partly held unit by its mean
    vote, scaled to the most members any unit has."""
    analysis = graphprune.analyze(blaze_stream())
    group = stream_group(analysis)
    votes = UnitVotes(group, analysis.context.tensors)
    assert votes.balance
    labels = np.arange(group.num_units)
    votes.add(labels, np.ones(group.num_units))
    votes.add(labels[:8], np.full(8, 3.0))
    assert np.allclose(votes.scores()[:8], 4.0) and np.allclose(votes.scores()[8:], 2.0)
    votes.balance = False
    assert np.allclose(votes.scores()[8:], 1.0)


def test_widened_stream_is_told_from_a_dense_concat():
    blaze = graphprune.analyze(blaze_stream())
    assert widened_stream(stream_group(blaze), blaze.context.tensors)
    dense = graphprune.analyze(dense_block())
    cat = next(g for g in dense.groups if ("W_head", 1) in g.params)
    assert cat.num_units == 20 and not widened_stream(cat, dense.context.tensors)


@pytest.mark.parametrize("both_sides", [False, True], ids=["blazeface", "option_a"])
def test_ratio_halves_every_block_of_a_widened_stream(both_sides):
    """At ratio 0.5 every block of the stream loses about half of its channels (before: the
    eight channels every block holds were all kept, the late blocks' lost all theirs)."""
    model = blaze_stream(both_sides)
    res = assert_prunes_exactly(model, 0.5, round_to=1)
    assert initializer(res.model, "W_stem").shape[0] <= 6  # of 8
    for k in range(1, len(WIDTHS)):
        kept = initializer(res.model, f"W_pw{k}").shape[0]
        assert 0.25 * WIDTHS[k] <= kept <= 0.75 * WIDTHS[k], (k, kept)
    macs = res.report["macs_after"] / res.report["macs_before"]
    assert macs < 0.5, macs


def test_calibrated_ratio_halves_every_block_of_a_widened_stream():
    """The data-aware scores (consumer votes only) are balanced the same way."""
    res = graphprune.prune(blaze_stream(), ratio=0.5, round_to=1, calibration="random:16")
    assert res.report["verification"]["ok"] is True
    assert initializer(res.model, "W_stem").shape[0] <= 6
    for k in range(1, len(WIDTHS)):
        kept = initializer(res.model, f"W_pw{k}").shape[0]
        assert 0.25 * WIDTHS[k] <= kept <= 0.75 * WIDTHS[k], (k, kept)
