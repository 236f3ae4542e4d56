"""``SplitToSequence`` read back by ``SequenceAt``: the unoptimised dynamo export of ``chunk``.

The PyTorch frontend exports with the dynamo exporter's optimiser off, which writes
``gate, up = x.chunk(2, -1)`` (Phi-3's MLP, the experts of Mixtral-style MoEs) as a
``SplitToSequence`` and two ``SequenceAt``. No rule follows channels through a sequence, so
the MLP's width froze ("no rule for SplitToSequence"). The normalisation now writes each
read as the ``Slice`` it stands for (``graphprune.io.sequences``).
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import assert_prunes_exactly, group_with, make_model
from onnx import helper

import graphprune

HIDDEN, INNER = 8, 12


def chunked(split: np.ndarray, positions: tuple[int, int] = (0, 1), extra_reader: bool = False) -> onnx.ModelProto:
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["h"]),
        helper.make_node("SplitToSequence", ["h", "split"], ["parts"], axis=-1, name="chunk"),
        helper.make_node("SequenceAt", ["parts", "p_gate"], ["gate"], name="take_gate"),
        helper.make_node("SequenceAt", ["parts", "p_up"], ["up"], name="take_up"),
        helper.make_node("Sigmoid", ["gate"], ["sig"]),
        helper.make_node("Mul", ["gate", "sig"], ["silu"]),
        helper.make_node("Mul", ["silu", "up"], ["act"]),
        helper.make_node("MatMul", ["act", "W2"], ["out"]),
    ]
    outputs: dict = {"out": None}
    if extra_reader:  # a reader that is no SequenceAt: the sequence stays
        nodes.append(helper.make_node("SequenceLength", ["parts"], ["count"]))
        outputs["count"] = None
    params = {"W1": (HIDDEN, 2 * INNER), "W2": (INNER, HIDDEN), "split": split,
              "p_gate": np.array(positions[0], np.int64), "p_up": np.array(positions[1], np.int64)}
    model = make_model(nodes, {"x": (5, HIDDEN)}, {"out": (5, HIDDEN)}, params, check=False)
    if extra_reader:
        model.graph.output.append(helper.make_tensor_value_info("count", onnx.TensorProto.INT64, []))
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("split, positions", [
    (np.array(INNER, np.int64), (0, 1)),                    # torch.chunk: chunks of INNER
    (np.array([INNER, INNER], np.int64), (0, -1)),          # torch.split with sizes, from the end
])
def test_sequence_reads_become_slices_and_the_mlp_prunes(split, positions) -> None:
    model = chunked(split, positions)
    analysis = graphprune.analyze(model)
    assert analysis.normalised.get("sequences_sliced") == 1
    group = group_with(analysis, "W1", 1)
    assert group.prunable and group.num_units == INNER, group.frozen
    result = assert_prunes_exactly(model, 0.5)
    assert result.report["normalised"]["sequences_sliced"] == 1
    assert not any(n.op_type.startswith("Sequence") or n.op_type == "SplitToSequence"
                   for n in result.model.graph.node)


def test_a_sequence_with_another_reader_stays_and_freezes_with_the_reason() -> None:
    analysis = graphprune.analyze(chunked(np.array(INNER, np.int64), extra_reader=True))
    assert "sequences_sliced" not in analysis.normalised
    group = group_with(analysis, "W1", 1)
    assert not group.prunable and any("SplitToSequence" in r for r in group.frozen), group.frozen
