"""torchvision models exported with a dynamic batch, pruned and verified.

    python bench/torchvision_dynamic.py --python /tmp/tvenv/bin/python [--only vit_b_16,swin_t]
                                        [--exporters torchscript,dynamo] [--ratio 0.5]

Users export with a dynamic batch (``dynamic_axes={"x": {0: "batch"}}`` through TorchScript,
``dynamic_shapes`` through torch.export); the zoo of ``bench/export_zoo.py`` exports fixed
shapes. Each model gets random weights and random BatchNorm statistics, is exported in the
interpreter given by ``--python`` (one with torchvision: it does not import beside the CPU
torch wheel of the test environment; ``pip install torch==2.14.1 torchvision==0.29.1 onnx
onnxscript`` in a venv), then ``graphprune prune M.onnx -o P.onnx --ratio R --json`` runs here
and the pruned model is run at batch 3, a size the export never saw.

Writes ``bench/results/torchvision_dynamic.json`` (one row per model and exporter: exit code,
parameters and MACs kept, verification, prunable groups per kind, seconds) and prints a
Markdown table. Exports are cached in ``bench/cache/torchvision_dynamic/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "torchvision_dynamic"
RESULTS = HERE / "results" / "torchvision_dynamic.json"

MODELS = (
    "vit_b_16", "swin_t", "swin_v2_t", "maxvit_t", "convnext_tiny", "resnet50", "resnext50_32x4d",
    "wide_resnet50_2", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
    "regnet_y_400mf", "densenet121", "shufflenet_v2_x1_0", "googlenet", "inception_v3", "squeezenet1_1",
    "mnasnet1_0", "vgg11_bn", "alexnet", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large",
    "fcn_resnet50", "r3d_18",
)
SEGMENTATION = {"deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large", "fcn_resnet50"}
VIDEO = {"r3d_18"}

EXPORT = r'''
import sys, warnings, logging
import torch, torchvision
warnings.simplefilter("ignore"); logging.disable(logging.WARNING)
name, exporter, out, segmentation, video = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", sys.argv[5] == "1"
torch.manual_seed(0)
extra = dict(weights_backbone=None, num_classes=21, aux_loss=False) if segmentation else {}
model = torchvision.models.get_model(name, weights=None, **extra).eval()
for m in model.modules():  # random statistics: every channel counts in the verification
    if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
        m.running_mean.uniform_(-0.5, 0.5); m.running_var.uniform_(0.5, 2.0)
        if m.weight is not None:
            m.weight.data.uniform_(0.5, 1.5); m.bias.data.uniform_(-0.2, 0.2)
class Plain(torch.nn.Module):  # one tensor out (segmentation models return a dict)
    def __init__(self, m): super().__init__(); self.m = m
    def forward(self, x):
        y = self.m(x)
        return y["out"] if isinstance(y, dict) else y
size = 299 if name == "inception_v3" else 224
x = torch.randn(2, 3, 8, 112, 112) if video else torch.randn(2, 3, size, size)
if exporter == "torchscript":
    torch.onnx.export(Plain(model), (x,), out, dynamo=False, opset_version=17, input_names=["x"],
                      output_names=["y"], dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}})
else:
    torch.onnx.export(Plain(model), (x,), out, dynamo=True, external_data=False, input_names=["x"],
                      output_names=["y"], dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=64)}})
'''


def export(python: str, name: str, exporter: str, timeout: float) -> tuple[Path | None, str]:
    path = CACHE / f"{name}__{exporter}.onnx"
    if path.exists():
        return path, ""
    CACHE.mkdir(parents=True, exist_ok=True)
    args = [python, "-c", EXPORT, name, exporter, str(path), str(int(name in SEGMENTATION)), str(int(name in VIDEO))]
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, f"export timed out after {timeout:.0f} s"
    if done.returncode or not path.exists():
        return None, (done.stderr.strip().splitlines() or ["?"])[-1][:200]
    return path, ""


def prune(path: Path, ratio: float, timeout: float) -> dict:
    out = path.with_suffix(".pruned.onnx")
    start = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out), "--ratio", str(ratio),
                           "--json"], capture_output=True, text=True, timeout=timeout)
    row: dict = {"rc": done.returncode, "seconds": round(time.perf_counter() - start, 1)}
    if done.returncode:
        row["error"] = (done.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    report = json.loads(done.stdout)
    row.update(params=round(report["params_after"] / report["params_before"], 3),
               macs=round(report["macs_after"] / report["macs_before"], 3),
               verified=bool(report["verification"].get("ok")),
               prunable={k: v.get("prunable") for k, v in report.get("kinds", {}).items()})
    import onnxruntime as ort

    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feed = session.get_inputs()[0]
    shape = [3 if not isinstance(d, int) else d for d in feed.shape]
    row["batch_3_output"] = list(session.run(None, {feed.name: np.zeros(shape, np.float32)})[0].shape)
    out.unlink(missing_ok=True)
    return row


def table(rows: dict) -> str:
    lines = ["| model | exporter | exit | params kept | MACs kept | verified | prunable groups (heads) | runs at batch 3 |",
             "|---|---|---|---|---|---|---|---|"]
    for key in sorted(rows):
        r = rows[key]
        name, exporter = key.split("__")
        if r.get("rc") != 0:
            lines.append(f"| {name} | {exporter} | {r.get('rc', '-')} | | | | {r.get('error', '')[:80]} | |")
            continue
        groups = sum(v for v in r["prunable"].values() if v)
        heads = r["prunable"].get("head")
        lines.append(f"| {name} | {exporter} | 0 | {r['params']:.3f} | {r['macs']:.3f} | {r['verified']} | "
                     f"{groups}{f' ({heads})' if heads else ''} | {r['batch_3_output'][0] == 3} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="an interpreter with torch and torchvision")
    parser.add_argument("--only", default="", help="comma-separated model names")
    parser.add_argument("--exporters", default="torchscript,dynamo")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--timeout", type=float, default=900.0)
    args = parser.parse_args(argv)
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    rows = json.loads(RESULTS.read_text())["rows"] if RESULTS.exists() else {}
    for name in names:
        for exporter in args.exporters.split(","):
            path, error = export(args.python, name, exporter, args.timeout)
            row = {"rc": "export", "error": error} if path is None else prune(path, args.ratio, args.timeout)
            rows[f"{name}__{exporter}"] = row
            print(name, exporter, row, flush=True)
            RESULTS.write_text(json.dumps({"ratio": args.ratio, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
