"""torchvision's detection models exported with TorchScript, pruned and verified.

    python bench/torchvision_detection.py --python .venv-bench/bin/python [--only ssdlite320_mobilenet_v3_large]

SSDlite, Faster R-CNN (MobileNetV3-320), RetinaNet, FCOS, Mask R-CNN, Keypoint R-CNN: NMS,
``RoiAlign``, ``If`` branches, data-dependent sizes. Each is built without pretrained weights,
its convolutions and linear layers drawn at random (He-scaled) and its BatchNorm statistics
too (PyTorch's own initialisation leaves every score under the 0.05 threshold on any input, so
the outputs are empty and a check compares nothing), the score threshold set to 0, and exported
with ``torch.onnx.export`` (TorchScript; the dynamo exporter stops at their data-dependent
control flow in ``torch.export``) at one 3x320x320 image, in the interpreter given by
``--python`` (one with torchvision). Then ``graphprune prune M.onnx -o P.onnx --ratio 0.5
--json`` runs here, in a process of its own, timed.

Writes ``bench/results/torchvision_detection.json`` (one row per model: exit code, seconds,
parameters and MACs kept, groups pruned, verification, empty outputs, the first error line).
Exports are cached in ``bench/cache/torchvision_detection/``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "torchvision_detection"
RESULTS = HERE / "results" / "torchvision_detection.json"
MODELS = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn", "retinanet_resnet50_fpn",
          "fcos_resnet50_fpn", "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")

EXPORT = r'''
import math, sys, torch, torchvision
from torchvision.models import detection
name, out = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
options = {"weights": None, "weights_backbone": None, ("box_score_thresh" if "rcnn" in name else "score_thresh"): 0.0}
model = getattr(detection, name)(**options).eval()
draw = torch.Generator().manual_seed(1)
with torch.no_grad():
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv2d, torch.nn.Linear, torch.nn.ConvTranspose2d)):
            m.weight.normal_(0, math.sqrt(2.0 / m.weight[0].numel()), generator=draw)
            if m.bias is not None:
                m.bias.normal_(0, 0.1, generator=draw)
        elif isinstance(m, (torch.nn.BatchNorm2d, torchvision.ops.FrozenBatchNorm2d)):
            m.weight.uniform_(0.5, 1.5, generator=draw); m.bias.normal_(0, 0.1, generator=draw)
            m.running_mean.normal_(0, 0.1, generator=draw); m.running_var.uniform_(0.5, 2.0, generator=draw)
torch.onnx.export(model, ([torch.rand(3, 320, 320)],), out, opset_version=17, dynamo=False, input_names=["images"])
'''


def export(python: str, name: str) -> Path:
    path = CACHE / f"{name}.onnx"
    if not path.exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        subprocess.run([python, "-c", EXPORT, name, str(path)], check=True, capture_output=True, timeout=1800)
    return path


def prune(path: Path) -> dict:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o",
                           str(path.with_suffix(".pruned.onnx")), "--ratio", "0.5", "--json"],
                          capture_output=True, text=True, timeout=1800)
    row: dict = {"exit": done.returncode, "seconds": round(time.perf_counter() - started, 1)}
    try:
        report = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {**row, "error": (done.stderr.strip().splitlines() or [""])[-1][:300]}
    if "params_after" not in report:  # the error object of a failed run
        return {**row, "error": str(report.get("error", ""))[:300]}
    verification = report.get("verification") or {}
    macs = report.get("macs_before"), report.get("macs_after")
    return {**row, "params_ratio": round(report["params_after"] / report["params_before"], 3),
            "macs_ratio": round(macs[1] / macs[0], 3) if all(macs) else None, "groups": report.get("groups"),
            "verified": verification.get("ok"), "max_rel_diff": verification.get("max_rel_diff"),
            "accepted": verification.get("scale"), "empty_outputs": verification.get("empty_outputs", []),
            "not_pruned": (report.get("branches") or {}).get("skipped", [])}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", required=True, help="an interpreter with torch and torchvision")
    parser.add_argument("--only", default="", help="comma-separated model names")
    args = parser.parse_args()
    names = [n for n in args.only.split(",") if n] or list(MODELS)
    rows = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    for name in names:
        try:
            path = export(args.python, name)
        except subprocess.CalledProcessError as exc:
            rows[name] = {"export_error": (exc.stderr.decode().strip().splitlines() or [""])[-1][:300]}
            continue
        rows[name] = prune(path)
        print(name, json.dumps(rows[name]), flush=True)
        RESULTS.write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
