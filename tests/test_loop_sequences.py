"""A ``Loop`` that carries a sequence: TorchScript's Python loop appending to a list
(``SequenceEmpty -> Loop(SequenceInsert) -> ConcatFromSequence``). Constant folding evaluated
``SequenceEmpty`` as a tensor (ONNX Runtime refused it, and every run warned "constant folding
skipped" and left Constant-node axes unfolded), and the calibration's cache between refit waves
fed the sequence back as a tensor: ``--calibration`` exited 3."""

from __future__ import annotations

import logging

import numpy as np
import onnx
import pytest

import graphprune

torch = pytest.importorskip("torch")


def _loop_model(tmp_path) -> str:
    from typing import List  # noqa: UP035 (TorchScript reads it)

    class Net(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = torch.nn.Conv1d(3, 16, 3, padding=1)
            self.c = torch.nn.Conv1d(16, 8, 3, padding=1)
            self.b = torch.nn.Conv1d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            h = torch.relu(self.c(torch.relu(self.a(x))))
            outs: List[torch.Tensor] = []  # noqa: UP006
            for t in range(h.size(2)):
                outs.append(h[:, :, t] * 2.0)
            return self.b(torch.stack(outs, 2))

    torch.manual_seed(0)
    path = str(tmp_path / "loop.onnx")
    torch.onnx.export(torch.jit.script(Net().eval()), (torch.randn(1, 3, 16),), path, dynamo=False, opset_version=17,
                      input_names=["x"], output_names=["y"], dynamic_axes={"x": {2: "t"}, "y": {2: "t"}})
    assert {"SequenceEmpty", "Loop", "ConcatFromSequence"} <= {n.op_type for n in onnx.load(path).graph.node}
    return path


def test_a_loop_carrying_a_sequence_prunes_in_every_mode(tmp_path, caplog) -> None:
    path = _loop_model(tmp_path)
    shapes = {"x": (1, 3, 16)}
    with caplog.at_level(logging.WARNING):
        ratio = graphprune.prune(path, ratio=0.5, input_shapes=shapes)
    assert not [r for r in caplog.records if "constant folding skipped" in r.getMessage()]
    assert ratio.report["verification"]["ok"] and ratio.report["params_after"] < ratio.report["params_before"]
    calibrated = graphprune.prune(path, ratio=0.3, calibration="random:8", input_shapes=shapes)
    assert calibrated.report["verification"]["ok"]
    assert calibrated.report["fidelity"]["pooled_rel_l2"] < calibrated.report["fidelity"]["without_reconstruction"]["pooled_rel_l2"]
    import onnxruntime as ort

    x = np.random.default_rng(1).standard_normal((1, 3, 40)).astype(np.float32)  # (another length than analysed)
    (y,) = ort.InferenceSession(calibrated.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    assert y.shape == (1, 2, 40)
