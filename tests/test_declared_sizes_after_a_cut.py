"""The size names a file declares for its intermediate tensors stay only where the prune
left that size as it was.

A dynamo export names the head-batched tensors of every attention block ``4*batch``. A
budget that keeps 3 heads in one block and 4 in another (a diffusion U-Net's, from a wheel)
wrote ``4*batch`` back on both: ONNX Runtime's memory planner took a ``[3*batch, ...]``
tensor for the size of a ``[4*batch, ...]`` one and failed ("Shape mismatch attempting to
re-use buffer"), while the verification (planner off) passed."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

import graphprune
from graphprune.planning.plan import Plan


class _Attention(nn.Module):
    def __init__(self, c: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj = heads, nn.Conv1d(c, 3 * c, 1), nn.Conv1d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t = x.shape
        q, k, v = self.qkv(x).reshape(b * self.heads, 3 * c // self.heads, t).split(c // self.heads, dim=1)
        a = torch.einsum("bct,bcs->bts", q, k).softmax(-1)
        return x + self.proj(torch.einsum("bts,bcs->bct", a, v).reshape(b, c, t))


class _TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.a1, self.a2, self.out = nn.Conv1d(8, 32, 1), _Attention(), _Attention(), nn.Conv1d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.a2(self.a1(self.inp(x))))


def _exported(tmp_path) -> onnx.ModelProto:
    torch.manual_seed(0)
    path = tmp_path / "two.onnx"
    torch.onnx.export(_TwoBlocks().eval(), (torch.randn(2, 8, 16),), str(path), input_names=["x"],
                      output_names=["y"], dynamo=True, external_data=False,
                      dynamic_shapes={"x": {0: torch.export.Dim("batch")}})
    return onnx.load(path)


def _one_block(model: onnx.ModelProto) -> Plan:
    """A head of block a1 removed, block a2 whole (as a budget may allocate)."""
    both = graphprune.prune(model, head_ratio=0.25, mlp_ratio=0, ratio=0, verify=False)
    return Plan(groups=[g for g in both.plan.groups if g.remove and g.anchor.startswith("a1.")])


def test_a_head_cut_in_one_block_clears_the_size_names_it_changed(tmp_path) -> None:
    model = _exported(tmp_path)

    def named(m: onnx.ModelProto) -> set[str]:
        return {v.name for v in m.graph.value_info
                if any("*" in d.dim_param for d in v.type.tensor_type.shape.dim)}

    assert named(model)  # the exporter's '4*batch' (its spelling may vary)
    one_block = _one_block(model)
    assert one_block.groups
    result = graphprune.prune(model, plan=one_block)
    assert result.report["verification"]["ok"]
    kept = named(result.model)
    assert kept and kept < named(model)  # block a2's names stay, block a1's cut ones go
    written = tmp_path / "one.onnx"
    onnx.save(result.model, written)
    feeds = {"x": np.ones((2, 8, 16), np.float32)}  # (default session options: the memory planner on)
    out = ort.InferenceSession(str(written), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert out.shape == (2, 8, 16) and np.isfinite(out).all()


def test_the_model_is_run_once_more_as_it_is_written(tmp_path, monkeypatch) -> None:
    """What is written differs from what was verified by what goes back on it after (those
    names). Were they written back on the cut block again, the prune fails (exit 3), naming the
    model as written, instead of writing a file ONNX Runtime cannot run."""
    from graphprune.pipeline import report

    model = _exported(tmp_path)
    plan = _one_block(model)
    monkeypatch.setattr(report, "cut_axes", lambda *a, **k: set())  # (every declared name back)
    try:
        graphprune.prune(model, plan=plan)
    except graphprune.GraphPruneError as exc:
        assert exc.exit_code == 3 and "as written" in str(exc), exc
    else:
        raise AssertionError("a written model that does not run passed")

