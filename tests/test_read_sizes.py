"""Sizes read through ``Shape`` behind arithmetic ONNX inference does not follow
(:func:`graphprune.io.contrib_shapes.annotate_read_sizes`).

A ShuffleNet-V2 unit exported by TorchScript with a dynamic batch splits its input with
``chunk`` (``Slice`` bounds computed from ``Shape``) and shuffles channels with
``x.view(b, groups, c // groups, h, w)``: ONNX inference does not follow ``Div`` and ``Cast``
on sizes, so the channels after the first shuffle stayed open, the next unit's ``Shape`` reads
could not fold, and its split and shuffle froze ("bounds computed at run time", "shape element
computed by arithmetic"): torchvision's ShuffleNet-V2 kept 0.49 of its parameters at ``--ratio
0.5`` through TorchScript against 0.40 through dynamo. ONNX Runtime's symbolic inference,
which keeps the batch a symbol, gives those sizes now.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import graphprune

torch = pytest.importorskip("torch")
nn = torch.nn


def _shuffle(x, groups: int):
    b, c, h, w = x.size()
    return x.view(b, groups, c // groups, h, w).transpose(1, 2).contiguous().view(b, -1, h, w)


class Unit(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        half = c // 2
        self.branch = nn.Sequential(
            nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU(),
            nn.Conv2d(half, half, 3, padding=1, groups=half), nn.BatchNorm2d(half),
            nn.Conv2d(half, half, 1), nn.BatchNorm2d(half), nn.ReLU())

    def forward(self, x):
        a, b = x.chunk(2, dim=1)
        return _shuffle(torch.cat((a, self.branch(b)), 1), 2)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.stem, self.units, self.fc = nn.Conv2d(3, 16, 3, 2, 1), nn.Sequential(Unit(16), Unit(16)), nn.Linear(16, 10)
        for m in self.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)

    def forward(self, x):
        return self.fc(self.units(self.stem(x)).mean((2, 3)))


def test_shuffle_units_with_a_dynamic_batch_prune(tmp_path):
    path = tmp_path / "shuffle.onnx"
    torch.onnx.export(Net().eval(), (torch.randn(2, 3, 16, 16),), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes={"x": {0: "batch"}})
    analysis = graphprune.analyze(str(path))
    frozen = [g.frozen[0] for g in analysis.groups if not g.prunable]
    assert all("graph input" in f or "graph output" in f for f in frozen), frozen
    result = graphprune.prune(str(path), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["params_after"] < 0.5 * result.report["params_before"]
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(0).standard_normal((3, 3, 16, 16)).astype(np.float32)
    assert session.run(None, {"x": x})[0].shape == (3, 10)


def test_size_expressions_too_large_to_simplify_are_kept_as_they_are() -> None:
    """ONNX Runtime's symbolic inference simplifies every size it computes with sympy, whose
    ``simplify`` is exponential in the expression: torchvision's Faster R-CNN counts its
    anchors through a dozen ``floor``s of the padded image size (200 operations, 11 s per
    simplification, 230 s of a 290 s prune). Above ``SIMPLIFY_MAX_OPS`` the expression is
    kept (the same value, unsimplified); small ones still simplify."""
    import sympy

    from graphprune.io import contrib_shapes

    bounded = contrib_shapes._symbolic_shape_infer().sympy
    h, w = (sympy.Symbol(n, integer=True, nonnegative=True) for n in ("h", "w"))
    levels = []
    for side in (h, w):
        size = side
        for _ in range(6):  # six stride-2 stages, as ``(size - 1) // 2 + 1`` in a Conv
            size = sympy.floor((size - 1) / 2) + 1
            levels.append(size)
    anchors = sum(3 * a * b for a, b in zip(levels[:6], levels[6:], strict=True))
    assert sympy.count_ops(anchors) > contrib_shapes.SIMPLIFY_MAX_OPS
    assert bounded.simplify(anchors) is anchors
    assert bounded.simplify(2 * h / 2 + 0 * w) == h
    assert bounded.floor is sympy.floor  # everything else is sympy's own


def test_symbolic_inference_keeps_its_warnings_off_stderr(capfd) -> None:
    """ONNX Runtime's symbolic shape inference warns where it cannot compare two sizes ("Unable
    to determine if a <= b, treat as equal": 11 lines on a successful prune of a post-processing
    graph); its logger reports errors only, so stderr stays for progress and errors."""
    import logging

    from graphprune.io.contrib_shapes import _symbolic_shape_infer

    module = _symbolic_shape_infer()
    module.logger.warning("Unable to determine if a <= b, treat as equal")
    assert "Unable to determine" not in capfd.readouterr().err
    assert module.logger.getEffectiveLevel() == logging.ERROR
