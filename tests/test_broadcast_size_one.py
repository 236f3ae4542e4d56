"""A size-1 axis met by another size-1 axis in a broadcast does not couple them.

Falcon's dynamo export multiplies each layer's single key head ``[B, 1, T, D]`` with one
rotary table ``[1, 1, T, D]`` that every layer reads. Coupling the size-1 head axes through
the shared table joined both layers' head groups into one, so a ratio applied to both
layers together (the same head indices removed in each). A size-1 axis never loses a unit
(a member of one element is pinned), so such a coupling constrains nothing but the grouping.
"""

from __future__ import annotations

import numpy as np
from conftest import assert_prunes_exactly, group_with, make_model
from onnx import helper

import graphprune


def two_layers_one_shared_table():
    """Per layer: ``a = x @ W [N, 5]``; its last column (``Gather [4]``, ``[N, 1]``) times the
    shared ``table [1, 1]``; the rest through ``Relu`` and ``W_out [5, 3]``; both layers
    summed."""
    nodes = []
    for i in (1, 2):
        nodes += [
            helper.make_node("MatMul", ["x", f"W{i}"], [f"a{i}"]),
            helper.make_node("Gather", [f"a{i}", "last"], [f"k{i}"], axis=1),
            helper.make_node("Mul", [f"k{i}", "table"], [f"m{i}"]),
            helper.make_node("Relu", [f"a{i}"], [f"r{i}"]),
            helper.make_node("MatMul", [f"r{i}", f"W_out{i}"], [f"o{i}"]),
            helper.make_node("Add", [f"o{i}", f"m{i}"], [f"y{i}"]),
        ]
    nodes.append(helper.make_node("Add", ["y1", "y2"], ["y"]))
    params = {"W1": (8, 5), "W2": (8, 5), "W_out1": (5, 3), "W_out2": (5, 3),
              "last": np.array([4], np.int64), "table": np.array([[1.5]], np.float32)}
    return make_model(nodes, {"x": ("N", 8)}, {"y": None}, params)


def test_layers_sharing_a_size_one_table_stay_separate_groups() -> None:
    model = two_layers_one_shared_table()
    analysis = graphprune.analyze(model)
    first, second = group_with(analysis, "W1", 1), group_with(analysis, "W2", 1)
    assert first.id != second.id  # before: one group, through the table's size-1 axis
    for group in (first, second):
        assert group.prunable and group.num_units == 4 and group.pinned_units == 1  # column 4 pinned
    result = assert_prunes_exactly(model, 0.5)
    assert len([g for g in result.plan.groups if g.remove]) == 2
