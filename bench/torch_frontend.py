"""Time the PyTorch frontend stage by stage on a plain-torch ResNet-50.

    python bench/torch_frontend.py [--ratio 0.5] [--exporter dynamo] [--repeat 1]
                                   [--update-docs docs/frontends.md]

The network is written here (Bottleneck blocks [3, 4, 6, 3], BatchNorm, 1000 classes, input
1x3x224x224; torchvision is not needed) with random weights and randomised BatchNorm
statistics. Stages, each timed on its own:

- ``export``: :func:`graphprune.frontends.torch.to_onnx`;
- ``load`` / ``analysis`` / ``plan`` / ``rewrite`` / ``verify``: :func:`graphprune.prune` on the
  export (its own report timings);
- ``map_plan``: the plan re-keyed by ``state_dict`` names;
- ``apply_plan``: slicing a copy of the module;
- ``prune_module``: the whole :func:`prune_module` call, minus the time spent inside
  ``torch.onnx.export`` (the figure the frontend is judged by).

The pruned module is then compared with the pruned ONNX (:func:`check_module`). With
``--update-docs`` the table replaces the one between the ``torch-frontend-bench`` markers.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import re
import sys
import time
from pathlib import Path

import torch
from graphprune.frontends import torch as gpt
from torch import nn

import graphprune

logging.getLogger("torch.onnx").setLevel(logging.ERROR)

BEGIN, END = "<!-- torch-frontend-bench:begin -->", "<!-- torch-frontend-bench:end -->"


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int = 1) -> None:
        super().__init__()
        cout = width * self.expansion
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        y = self.relu(self.bn1(self.conv1(x)))
        y = self.relu(self.bn2(self.conv2(y)))
        return self.relu(self.bn3(self.conv3(y)) + identity)


class ResNet50(nn.Module):
    def __init__(self, classes: int = 1000, layers: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        cin = 64
        stages = []
        for index, (blocks, width) in enumerate(zip(layers, (64, 128, 256, 512), strict=True)):
            stride = 1 if index == 0 else 2
            stage = []
            for b in range(blocks):
                stage.append(Bottleneck(cin, width, stride if b == 0 else 1))
                cin = width * Bottleneck.expansion
            stages.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0, 0.2, generator=gen)
                m.running_mean.normal_(0, 0.2, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
    return model.eval()


class ExportClock:
    """Adds up the seconds spent inside ``torch.onnx.export`` while installed."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._original = torch.onnx.export

    def __enter__(self) -> ExportClock:
        def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return self._original(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - t0

        torch.onnx.export = timed
        return self

    def __exit__(self, *exc: object) -> None:
        torch.onnx.export = self._original


def _progress(stage: str, seconds: float) -> None:
    print(f"  {stage}: {seconds:.2f} s", file=sys.stderr, flush=True)


def run(ratio: float, exporter: str) -> dict[str, float | str]:
    torch.manual_seed(0)
    model = randomised(ResNet50())
    x = torch.randn(1, 3, 224, 224)
    out: dict[str, float | str] = {}

    t0 = time.perf_counter()
    exported = gpt.to_onnx(model, (x,), exporter=exporter)
    out["export"] = time.perf_counter() - t0
    _progress("export", out["export"])

    result = graphprune.prune(exported, ratio=ratio)
    timings = result.report.get("timings", {})
    for stage in ("load", "analysis", "plan", "prune", "verify"):
        if stage in timings:
            out["rewrite" if stage == "prune" else stage] = float(timings[stage])
    _progress("graphprune.prune", float(timings.get("total", 0.0)))

    t0 = time.perf_counter()
    mapped = gpt.map_plan(result.plan, exported, model)
    out["map_plan"] = time.perf_counter() - t0
    _progress("map_plan", out["map_plan"])

    pruned = copy.deepcopy(model)
    t0 = time.perf_counter()
    gpt.apply_plan(pruned, mapped)
    out["apply_plan"] = time.perf_counter() - t0
    _progress("apply_plan", out["apply_plan"])

    with ExportClock() as clock:
        t0 = time.perf_counter()
        whole = gpt.prune_module(model, (x,), ratio=ratio, exporter=exporter)
        total = time.perf_counter() - t0
    out["prune_module"] = total - clock.seconds
    out["prune_module_export"] = clock.seconds
    _progress("prune_module (without its export)", out["prune_module"])

    out["check_rel_diff"] = gpt.check_module(pruned, result.model, (x,))
    again = gpt.apply_plan(copy.deepcopy(model), whole.plan)
    gpt.check_module(again, whole.model, (x,))
    params = result.report
    out["params"] = f"{params['params_before'] / 1e6:.1f}M -> {params['params_after'] / 1e6:.1f}M"
    return out


COLUMNS = ("export", "load", "analysis", "plan", "rewrite", "verify", "map_plan", "apply_plan",
           "prune_module")


def table(rows: list[tuple[str, dict[str, float | str]]]) -> str:
    head = "| code | " + " | ".join(COLUMNS) + " | params | module vs ONNX |"
    lines = [head, "|" + "---|" * (len(COLUMNS) + 3)]
    for label, r in rows:
        cells = [f"{r[c]:.2f}" if isinstance(r.get(c), float) else "-" for c in COLUMNS]
        check = r.get("check_rel_diff")
        lines.append(
            f"| {label} | " + " | ".join(cells) + f" | {r.get('params', '-')} | "
            + (f"{check:.1e}" if isinstance(check, float) else "-") + " |"
        )
    return "\n".join(lines)


def update_docs(path: Path, text: str) -> None:
    doc = path.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{path} has no {BEGIN} ... {END} markers")
    path.write_text(pattern.sub(lambda _: f"{BEGIN}\n{text}\n{END}", doc))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--exporter", choices=gpt.EXPORTERS, default="dynamo")
    parser.add_argument("--repeat", type=int, default=1, help="runs; the fastest is kept per stage")
    parser.add_argument("--label", default="this checkout")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument(
        "--also", action="append", default=[], metavar="LABEL=JSON",
        help="add the row of an earlier run (its --json file) to the table, e.g. another checkout",
    )
    parser.add_argument("--update-docs", type=Path, help="replace the table in this markdown file")
    args = parser.parse_args(argv)
    runs = [run(args.ratio, args.exporter) for _ in range(max(1, args.repeat))]
    best: dict[str, float | str] = dict(runs[0])
    for r in runs[1:]:
        for k, v in r.items():
            if isinstance(v, float) and k != "check_rel_diff":
                best[k] = min(float(best[k]), v)
    rows: list[tuple[str, dict[str, float | str]]] = []
    for entry in args.also:
        label, _, path = entry.partition("=")
        rows.append((label, json.loads(Path(path).read_text())))
    text = table([*rows, (args.label, best)])
    print(text)
    print(f"python {platform.python_version()}, torch {torch.__version__}, "
          f"{args.exporter} exporter, ratio {args.ratio}", file=sys.stderr)
    if args.json:
        args.json.write_text(json.dumps(best, indent=1))
    if args.update_docs:
        update_docs(args.update_docs, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
