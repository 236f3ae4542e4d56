"""Time of calibration + reconstruction on ResNet-50 (random weights, plain torch code).

ResNet-50 (bottleneck blocks [3, 4, 6, 3], BatchNorm folded by the TorchScript exporter) is
exported with a dynamic batch axis, ``--samples`` (128) random 224x224 images are written
to a ``.npz`` and the model is pruned at ``--ratio 0.3`` with ``--calibration`` (criterion
``auto``; reconstruction ``auto``: the least-squares refit weighed against the statistics
correction, or ``--reconstruction``). The figure is the wall time of the whole call and of
the calibration stages (statistics, reconstruction, fidelity, stats correction), plus the
peak resident memory.

    python bench/calibration_resnet50.py                 # a few minutes on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

RESULTS = Path(__file__).parent / "results" / "calibration_resnet50.json"


class Bottleneck(nn.Module):
    def __init__(self, cin: int, width: int, stride: int) -> None:
        super().__init__()
        cout = width * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, width, 1, bias=False), nn.BatchNorm2d(width)
        self.conv2, self.bn2 = nn.Conv2d(width, width, 3, stride, 1, bias=False), nn.BatchNorm2d(width)
        self.conv3, self.bn3 = nn.Conv2d(width, cout, 1, bias=False), nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = torch.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return torch.relu(out + (x if self.down is None else self.down(x)))


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), nn.BatchNorm2d(64), nn.ReLU(),
                                  nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for width, blocks, stride in ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)):
            for i in range(blocks):
                layers.append(Bottleneck(cin, width, stride if i == 0 else 1))
                cin = width * 4
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(self.layers(self.stem(x)), 1), 1))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=128)
    parser.add_argument("--ratio", type=float, default=0.3)
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--reconstruction", default="auto", help="auto (default), refit, stats, ...")
    parser.add_argument("--no-cache", action="store_true",
                        help="re-run the graph prefix in every refit wave (the frontier cache off)")
    args = parser.parse_args()
    import graphprune
    from graphprune.calibration import sequential

    sequential.Reconstructor.use_cache = not args.no_cache

    torch.manual_seed(0)
    net = ResNet50().eval()
    with torch.no_grad():  # non-trivial BN statistics, so that folding matters
        for m in net.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.1, 0.1)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.0)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "resnet50.onnx"
        torch.onnx.export(net, (torch.zeros(1, 3, 224, 224),), str(path), dynamo=False, opset_version=17,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
        calib = Path(tmp) / "calib.npz"
        rng = np.random.default_rng(0)
        np.savez(calib, image=rng.standard_normal((args.samples, 1, 3, 224, 224)).astype(np.float32))
        load0 = [round(x, 2) for x in os.getloadavg()]
        t0, c0 = time.perf_counter(), time.process_time()
        result = graphprune.prune(str(path), ratio=args.ratio, calibration=str(calib),
                                  reconstruction=args.reconstruction)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    report = result.report
    timings = report["timings"]
    row = {
        "command": "python bench/calibration_resnet50.py" + (" --no-cache" if args.no_cache else "")
                   + (f" --reconstruction {args.reconstruction}" if args.reconstruction != "auto" else ""),
        "samples": args.samples, "ratio": args.ratio, "frontier_cache": not args.no_cache,
        "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
        "calibration_stages_s": round(sum(timings.get(k, 0.0) for k in
                                          ("calibration", "statistics", "reconstruction", "fidelity",
                                           "stats correction")), 1),
        "timings": timings, "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "macs_ratio": round(report["macs_after"] / report["macs_before"], 3),
        "calibration": report["calibration"], "fidelity": {k: report["fidelity"][k] for k in ("cosine", "rel_l2", "top1_agreement")},
        "load_average_end": [round(x, 2) for x in os.getloadavg()], "load_average_start": load0,
    }
    print(json.dumps(row, indent=1))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(row, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
