"""Calibrated pruning of a digits CNN: accuracy without fine-tuning.

Trains a small CNN (three conv-BN-ReLU blocks, two max-pools, a linear classifier) on
scikit-learn's bundled ``load_digits`` (8x8 images, 10 classes; 75 % train / 25 % test),
exports it with both torch exporters (TorchScript folds BatchNorm into the convs; dynamo
keeps BatchNormalization nodes), and prunes every export at ``--ratio 0.3 --round-to 1``:

- data-free (``l1``), as before;
- calibrated: ``--calibration`` with ``--samples`` (512) unlabelled *training* images written
  to a ``.npz`` and passed to the ``graphprune prune`` command line (defaults: criterion
  ``auto``, least-squares refit); the statistics correction alone (the analogue of
  re-estimating BatchNorm statistics) through the API, and with ``--all`` every data-aware
  criterion and reconstruction.

Test accuracy is measured on the held-out test split (never seen by training or
calibration). Writes ``bench/results/calibration_digits.json`` and prints a Markdown table.

    python bench/calibration_digits.py                  # ~1-2 min on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "calibration_digits.json"


class DigitsCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        self.features = nn.Sequential(
            block(1, 32), block(32, 64), nn.MaxPool2d(2), block(64, 64), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(64 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


class DigitsResNet(nn.Module):
    """A deeper digits network for allocation studies: a stem, three residual stages (32, 64,
    128 channels at 8x8, 4x4, 2x2; one basic block each, strided convs between them), global
    average pooling and a linear classifier. Six channel groups of very different cost per
    channel and sensitivity (three block-internal, three residual streams)."""

    def __init__(self) -> None:
        super().__init__()

        def cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
            )

        def body(c: int) -> nn.Sequential:
            return nn.Sequential(cbr(c, c), nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))

        self.stem = cbr(1, 32)
        self.bodies = nn.ModuleList([body(32), body(64), body(128)])
        self.downs = nn.ModuleList([cbr(32, 64, 2), cbr(64, 128, 2)])
        self.head = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for i, b in enumerate(self.bodies):
            x = torch.relu(x + b(x))
            if i < len(self.downs):
                x = self.downs[i](x)
        return self.head(x.mean(dim=(2, 3)))


ARCHS = {"cnn": DigitsCNN, "resnet": DigitsResNet}


def data(seed: int = 0) -> tuple[np.ndarray, ...]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y))


def train(model: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> None:
    import math

    torch.manual_seed(seed)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps = epochs * math.ceil(len(x) / 64)
    step = 0
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            for group in opt.param_groups:
                group["lr"] = 0.05 * 0.5 * (1 + math.cos(math.pi * step / steps))
            loss = nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    model.eval()


def export(model: nn.Module, exporter: str, path: Path) -> None:
    example = (torch.zeros(1, 1, 8, 8),)
    if exporter == "torchscript":
        torch.onnx.export(model, example, str(path), dynamo=False, input_names=["image"],
                          output_names=["logits"], dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17)
    else:
        batch = torch.export.Dim("batch", min=1, max=1024)
        torch.onnx.export(model, example, str(path), dynamo=True, input_names=["image"],
                          output_names=["logits"], dynamic_shapes=({0: batch},), opset_version=18,
                          optimize=True)


def accuracy(model: onnx.ModelProto | str, x: np.ndarray, y: np.ndarray) -> float:
    from graphprune.verify.validate import session

    sess = session(model if isinstance(model, onnx.ModelProto) else onnx.load(model))
    name = sess.get_inputs()[0].name
    logits = np.concatenate([sess.run(None, {name: x[i : i + 256]})[0] for i in range(0, len(x), 256)])
    return float((logits.argmax(1) == y).mean() * 100)


def quantized(path: Path, kind: str, images: np.ndarray) -> Path:
    """``path`` quantized to int8 by ONNX Runtime: ``dynamic`` (``ConvInteger``/``MatMulInteger``),
    or static per-channel ``qdq`` / ``qop`` (QOperator: ``QLinearConv``, the ReLUs folded into
    the output ranges) calibrated on 128 of ``images`` (training images)."""
    from ort_quantize import quantize

    feeds = ({"image": images[i : i + 1]} for i in range(min(len(images), 128)))
    # (dynamic: per tensor, as quantize_dynamic's default)
    return quantize(path, path.with_name(f"{path.stem}_{kind}.onnx"), kind, feeds, per_channel=kind != "dynamic")


def quantization_aware(net: nn.Module, x: np.ndarray, y: np.ndarray, epochs: int, seed: int) -> nn.Module:
    """``net`` fine-tuned with PyTorch's eager-mode quantization-aware training (conv-BN-ReLU
    fused, per-channel int8 weights, uint8 activations, plain ``FakeQuantize`` modules: the
    fused observer does not export): its export quantizes the float weights in the graph
    (``QuantizeLinear -> DequantizeLinear`` of each float weight, the BatchNorms kept)."""
    import copy

    import torch.ao.quantization as tq

    model = copy.deepcopy(net).train()
    for index, block in enumerate(model.features):
        if isinstance(block, nn.Sequential):
            tq.fuse_modules_qat(model.features[index], [["0", "1", "2"]], inplace=True)
    model.qconfig = tq.QConfig(activation=tq.default_fake_quant, weight=tq.default_per_channel_weight_fake_quant)
    tq.prepare_qat(model, inplace=True)
    train(model, x, y, epochs, seed)
    model.apply(tq.disable_observer)
    return model.eval()


def cli_prune(src: Path, out: Path, calib: Path | None, extra: list[str]) -> dict:
    report = out.with_suffix(".json")
    cmd = [sys.executable, "-m", "graphprune", "prune", str(src), "-o", str(out), "--ratio", "0.3",
           "--round-to", "1", "--report", str(report), *extra]
    if calib is not None:
        cmd += ["--calibration", str(calib)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    data = json.loads(report.read_text())
    data["wall_s"] = round(time.perf_counter() - t0, 2)
    return data


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--api-only", action="store_true", help="skip the command-line runs")
    parser.add_argument("--all", action="store_true",
                        help="also every data-aware criterion and reconstruction through the API")
    parser.add_argument("--quantize", choices=("dynamic", "qdq", "qop", "qat"), default=None,
                        help="prune each export quantized to int8 by ONNX Runtime (static ones calibrated on "
                             "128 training images) instead, or (qat) the network after 5 epochs of PyTorch's "
                             "quantization-aware training, exported with its weights quantized in the graph; "
                             "results default to calibration_digits_<kind>.json")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    if args.out is None:
        args.out = str(RESULTS if not args.quantize else RESULTS.with_name(f"calibration_digits_{args.quantize}.json"))
    torch.set_num_threads(2)
    import graphprune

    xtr, xte, ytr, yte = data(args.seed)
    net = DigitsCNN()
    train(net, xtr, ytr, args.epochs, args.seed)
    rng = np.random.default_rng(args.seed)
    calib_images = xtr[rng.choice(len(xtr), size=min(args.samples, len(xtr)), replace=False)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        calib = tmpdir / "calib.npz"
        np.savez(calib, image=calib_images[:, None])  # [samples, 1, 1, 8, 8]: batch-1 feeds
        qat = quantization_aware(net, xtr, ytr, 5, args.seed) if args.quantize == "qat" else None
        for exporter in ("torchscript", "dynamo"):
            path = tmpdir / f"digits_{exporter}.onnx"
            export(net, exporter, path)
            row = {"exporter": exporter}
            if qat is not None:
                row["float_accuracy"] = round(accuracy(str(path), xte, yte), 2)
                row["quantized"] = "qat"
                path = tmpdir / f"digits_qat_{exporter}.onnx"
                try:
                    export(qat, exporter, path)
                except Exception as exc:  # torch.export cannot trace FakeQuantize's data-dependent branch
                    row["export_error"] = re.sub(r"\x1b\[[0-9;]*m", "", str(exc).splitlines()[0])[:200]
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    continue
            elif args.quantize:
                row["float_accuracy"] = round(accuracy(str(path), xte, yte), 2)
                path = quantized(path, args.quantize, xtr)
                row["quantized"] = args.quantize
            base = accuracy(str(path), xte, yte)
            row["original_accuracy"] = round(base, 2)
            runs: list[tuple[str, dict]] = [("l1 (data-free)", {"criterion": "l1"})]
            if args.api_only:  # (otherwise the command-line run below is this one)
                runs.append(("auto + refit (calibrated, the defaults)", {"criterion": "auto", "calibration": str(calib)}))
            runs.append(("l1 + statistics correction", {"criterion": "l1", "calibration": str(calib), "reconstruction": "stats"}))
            # data-free: BatchNorm statistics (the calibration samples are not read by it)
            runs.append(("l1 + BatchNorm compensation (data-free, bn)",
                         {"criterion": "l1", "calibration": str(calib), "reconstruction": "bn"}))
            if args.all:
                runs.append(("l1 + bias compensation", {"criterion": "l1", "calibration": str(calib), "reconstruction": "bias"}))
                runs.append(("l1 + refit", {"criterion": "l1", "calibration": str(calib), "reconstruction": "refit"}))
                for criterion in ("activation", "wanda", "flap", "reconstruction", "obs"):
                    runs.append((f"{criterion} + refit", {"criterion": criterion, "calibration": str(calib)}))
            results = []
            for label, kwargs in runs:
                t0 = time.perf_counter()
                res = graphprune.prune(str(path), ratio=0.3, round_to=1, **kwargs)
                wall = time.perf_counter() - t0
                acc = accuracy(res.model, xte, yte)
                fid = res.report.get("fidelity", {})
                results.append({
                    "run": label,
                    "test_accuracy": round(acc, 2),
                    "macs_ratio": round(res.report["macs_after"] / res.report["macs_before"], 4),
                    "params_ratio": round(res.report["params_after"] / res.report["params_before"], 4),
                    "criterion": res.report.get("calibration", {}).get("criterion", kwargs["criterion"]),
                    "holdout_top1": fid.get("top1_agreement"),
                    "holdout_cosine": fid.get("cosine"),
                    "verified": bool(res.report["verification"].get("ok")),
                    "seconds": round(wall, 2),
                    "passes": res.report.get("calibration", {}).get("passes"),
                })
                print(json.dumps({"exporter": exporter, **results[-1]}), flush=True)
            row["runs"] = results
            if not args.api_only:
                out = tmpdir / f"pruned_{exporter}.onnx"
                rep = cli_prune(path, out, calib, [])
                row["cli"] = {
                    "command": f"graphprune prune digits_{exporter}.onnx -o pruned.onnx --ratio 0.3 --round-to 1 --calibration calib.npz",
                    "test_accuracy": round(accuracy(str(out), xte, yte), 2),
                    "macs_ratio": round(rep["macs_after"] / rep["macs_before"], 4),
                    "criterion": rep.get("calibration", {}).get("criterion"),
                    "criteria_chosen": rep.get("calibration", {}).get("criteria_chosen"),
                    "wall_s": rep["wall_s"],
                }
                print(json.dumps({"exporter": exporter, "cli": row["cli"]}), flush=True)
            rows.append(row)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"samples": len(calib_images), "test_images": len(xte),
                                          "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
