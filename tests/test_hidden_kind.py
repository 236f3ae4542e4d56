"""The hidden size is the residual stream, not whatever group a norm makes inexact.

LightGlue's feed-forward blocks normalise their neurons (``Linear -> LayerNorm -> GELU ->
Linear``) and never the residual stream. Every inexact group was typed ``hidden``: the
feed-forward neurons (63 % of its weights) were left whole by ``--ratio`` and ``--mlp-ratio``
without a word, and ``--mlp-ratio`` pruned the residual stream instead.
"""

from __future__ import annotations

import io
import subprocess
import sys

import numpy as np
import onnx
import pytest

import graphprune
from graphprune.analysis import targets
from graphprune.pipeline.session import Session

D, HEADS, FFN = 32, 4, 64


def _export(project: bool = True, norm_stream: bool = True) -> onnx.ModelProto:
    """Two blocks of attention and a feed-forward block that normalises its neurons; with
    ``norm_stream`` a LayerNorm before the attention normalises the residual stream too."""
    torch = pytest.importorskip("torch")
    nn = torch.nn
    torch.manual_seed(0)

    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
            self.ffn = nn.Sequential(nn.Linear(D, FFN), nn.LayerNorm(FFN), nn.GELU(), nn.Linear(FFN, D))
            self.norm = nn.LayerNorm(D) if norm_stream else nn.Identity()

        def forward(self, x):
            b, s, _ = x.shape
            q, k, v = self.qkv(self.norm(x)).reshape(b, s, 3, HEADS, D // HEADS).permute(2, 0, 3, 1, 4)
            a = torch.softmax(q @ k.transpose(-1, -2) / (D // HEADS) ** 0.5, -1) @ v
            x = x + self.out(a.transpose(1, 2).reshape(b, s, D))
            return x + self.ffn(x)

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(16, D) if project else nn.Identity()
            self.b1, self.b2, self.head = Block(), Block(), nn.Linear(D, 5)

        def forward(self, x):
            return self.head(self.b2(self.b1(self.proj(x))))

    buffer = io.BytesIO()
    torch.onnx.export(Model().eval(), (torch.randn(2, 10, 16 if project else D),), buffer, dynamo=False,
                      opset_version=17, input_names=["x"], output_names=["y"])
    return onnx.load_from_string(buffer.getvalue())


def _kinds(model: onnx.ModelProto) -> dict[str, list[int]]:
    analysis = Session(model).analyze()
    by_kind: dict[str, list[int]] = {}
    for group in analysis.groups:
        if group.prunable:
            by_kind.setdefault(targets.classify_groups(analysis)[group.id], []).append(group.num_units)
    return by_kind


def test_neurons_behind_a_norm_are_mlp_and_the_stream_hidden():
    """Both the stream and the neurons are normalised (inexact); only the stream carries the sums."""
    model = _export()
    kinds = _kinds(model)
    assert sorted(kinds["mlp"]) == [FFN, FFN] and kinds["hidden"] == [D] and sorted(kinds["head"]) == [HEADS, HEADS]
    result = graphprune.prune(model, mlp_ratio=0.5, head_ratio=0.0)
    assert result.report["verification"]["ok"]
    widths = {g.size: len(g.remove) for g in result.plan.groups}
    assert widths == {FFN: FFN // 2}  # the neurons halve, the residual stream stays whole
    x = np.random.default_rng(0).standard_normal((2, 10, 16)).astype(np.float32)  # (the export's sizes)
    import onnxruntime as ort

    y = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    assert y.shape == (2, 10, 5) and np.isfinite(y).all()
    hidden = graphprune.prune(model, mlp_ratio=0.5, head_ratio=0.0, prune_hidden=True)
    assert {g.size for g in hidden.plan.groups} == {FFN, D}  # asked for: the stream prunes too


def test_the_stream_left_whole_is_said(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(_export(), str(path))
    done = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(tmp_path / "p.onnx"),
                           "--ratio", "0.5"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert f"hidden size (residual stream): 1 group(s), {D} channels, left whole (--prune-hidden prunes it)" in done.stdout


def test_a_stream_that_is_the_graph_input_leaves_the_neurons_prunable():
    """Without an input projection the stream is the graph input (frozen); the neurons still prune
    (they were typed hidden, and nothing-prunable blamed the ratio and the rounding)."""
    result = graphprune.prune(_export(project=False), mlp_ratio=0.5, head_ratio=0.0)
    assert result.report["verification"]["ok"] and result.report.get("nothing_prunable") is None
    assert {g.size: len(g.remove) for g in result.plan.groups} == {FFN: FFN // 2}


def test_an_unnormalised_stream_prunes_as_before():
    """LightGlue's stream is never normalised: exact, it prunes with the neurons, as it did (a
    hybrid's convolutional residual channels are such groups too)."""
    kinds = _kinds(_export(norm_stream=False))
    assert sorted(kinds["mlp"]) == [D, FFN, FFN] and "hidden" not in kinds
