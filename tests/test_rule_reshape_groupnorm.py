"""GroupNorm over a dynamic length as the TorchScript exporter writes it: ``Reshape [B, G, -1]
-> InstanceNormalization -> Reshape`` back, where ``-1`` merges the channels of a group with the
dynamic time axis. The group's channels are pruned a whole GroupNorm group at a time (FCPE's
512-channel input stack froze: "dynamic axes re-factored at Reshape"). Real ONNX Runtime runs."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest

import graphprune

torch = pytest.importorskip("torch")


class _Net(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1 = torch.nn.Conv1d(16, 32, 3, padding=1)
        self.g = torch.nn.GroupNorm(4, 32)
        self.c2 = torch.nn.Conv1d(32, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.g(self.c1(x.transpose(1, 2))))).transpose(1, 2)


@pytest.mark.parametrize("dynamic", [True, False])
def test_groupnorm_over_a_dynamic_length_prunes_whole_groups(tmp_path, dynamic: bool) -> None:
    torch.manual_seed(0)
    net = _Net().eval()
    torch.nn.init.normal_(net.g.weight)
    torch.nn.init.normal_(net.g.bias)
    path = tmp_path / "gn.onnx"
    axes = {"x": {0: "B", 1: "T"}} if dynamic else None
    torch.onnx.export(net, torch.randn(1, 20, 16), str(path), dynamo=False, opset_version=17,
                      input_names=["x"], dynamic_axes=axes)
    analysis = graphprune.analyze(str(path))
    group = next(g for g in analysis.groups if any(d[0] == "c1.bias" for d in g.dims))
    assert not group.is_frozen and group.num_units == 4, group.frozen
    result = graphprune.prune(str(path), ratio=0.5)
    assert result.report["verification"]["ok"] and result.report["verification"]["max_rel_diff"] < 1e-5
    assert result.report["params_after"] < 0.6 * result.report["params_before"]
    session = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"])
    length = 37 if dynamic else 20
    assert session.run(None, {"x": np.random.default_rng(0).random((1, length, 16), np.float32)})[0].shape == (1, length, 8)
