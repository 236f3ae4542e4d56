"""Groups whose members hold different channels: how a ratio spreads over them.

A residual stream widened by zero-padding its channels (BlazeFace, MediaPipe's detectors and
landmark models: ``Pad`` on the channel axis before the ``Add``) or a dense block (every layer
reads the ``Concat`` of all earlier ones) is one channel group whose members hold different
units: a narrow early layer holds the first channels, a wide late one all of them. Scoring a
unit by the *sum* of its members' votes (the scoring before round 24) ranks it by how many
members hold it, so a ratio removes the late layers' channels and leaves the early, costly
layers whole (MediaPipe's face detector at ``--ratio 0.5``: 0.79x MACs). Round 24 scores such a
unit by the *mean* vote of the members that hold it (``planning.importance.UnitVotes``).

This benchmark trains three small digits networks of those shapes (scikit-learn's bundled digits,
8x8, 75 % train / 25 % test), exports them with the TorchScript exporter and prunes them at
ratios 0.2-0.7 (``--round-to 1``) and at ``--target-macs`` 0.5 and 0.3, data-free (``l1``) and
calibrated (512 unlabelled training images, ``auto`` + refit), with three scorings: ``sum``
(before), ``mean`` (every group balanced) and ``now`` (balanced where a stream is widened, the
sums elsewhere). Since the scorings reach different MACs at one ratio, the ratio runs are
compared at equal MACs: test accuracy interpolated along each curve.

    python bench/offset_groups.py          # ~8 min on 2 CPU cores

``--real`` does the same comparison (``sum`` vs ``now``) on the corpus models whose groups it
changes (``bench/real_corpus.py --fetch`` first), fed with real photographs: 64 random crops of
six (scikit-learn's china and flower, scikit-image's coffee, chelsea, rocket and cat) as
calibration, and fidelity judged on 16 crops of two others (scikit-image's astronaut and
matplotlib's Grace Hopper portrait, both faces): the mean cosine between the original's and the
pruned model's outputs (the worst output of a detector's several; scalar outputs skipped).

    python bench/offset_groups.py --real   # ~15 min; needs pillow, scikit-image, matplotlib
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
from calibration_digits import accuracy, data, export, train  # noqa: E402

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "offset_groups.json"
RATIOS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
LEVELS = (0.8, 0.6, 0.5, 0.4, 0.3)
TARGETS = (0.5, 0.3)  # --target-macs: global allocation, then the same scores order each group


class BlazeBlock(nn.Module):
    """Depthwise 3x3 + pointwise 1x1; the shortcut zero-padded to the block's width."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.dw = nn.Sequential(nn.Conv2d(cin, cin, 3, stride, 1, groups=cin, bias=False), nn.BatchNorm2d(cin))
        self.pw = nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))
        self.stride, self.pad = stride, cout - cin

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = F.max_pool2d(x, 2) if self.stride == 2 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, 0, self.pad))
        return torch.relu(self.pw(self.dw(x)) + short)


class BlazeNet(nn.Module):
    """A BlazeFace-shaped digits classifier: one residual stream widened 16 -> 64 by padding."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        widths = ((16, 16, 1), (16, 24, 1), (24, 32, 2), (32, 48, 1), (48, 64, 2))
        self.blocks = nn.Sequential(*(BlazeBlock(a, b, s) for a, b, s in widths))
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


class DenseNet(nn.Module):
    """Two dense blocks (4 pre-activation 3x3 layers, growth 12) and a 1x1 transition."""

    def __init__(self, growth: int = 12) -> None:
        super().__init__()

        def layer(c: int) -> nn.Sequential:
            return nn.Sequential(nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, growth, 3, padding=1, bias=False))

        self.stem = nn.Conv2d(1, 16, 3, padding=1, bias=False)
        self.block1 = nn.ModuleList(layer(16 + i * growth) for i in range(4))
        self.trans = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU(), nn.Conv2d(64, 32, 1, bias=False), nn.AvgPool2d(2))
        self.block2 = nn.ModuleList(layer(32 + i * growth) for i in range(4))
        self.norm = nn.Sequential(nn.BatchNorm2d(80), nn.ReLU())
        self.head = nn.Linear(80, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        for f in self.block1:
            x = torch.cat([x, f(x)], 1)
        x = self.trans(x)
        for f in self.block2:
            x = torch.cat([x, f(x)], 1)
        return self.head(self.norm(x).mean(dim=(2, 3)))


class OptionABlock(nn.Module):
    """A CIFAR ResNet basic block with the "option A" shortcut (He et al.; the popular CIFAR
    ResNet-20/56 code): where the stage widens, the shortcut subsamples and zero-pads the
    channels on both sides."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout))
        self.stride, self.pad = stride, (cout - cin) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        short = x[:, :, ::2, ::2] if self.stride == 2 else x
        if self.pad:
            short = F.pad(short, (0, 0, 0, 0, self.pad, self.pad))
        return torch.relu(self.body(x) + short)


class OptionANet(nn.Module):
    """Stem 16 and three stages of two option-A blocks (16, 32, 64 channels at 8, 4, 2 px)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            blocks += [OptionABlock(cin, cout, stride), OptionABlock(cout, cout, 1)]
            cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(64, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.stem(x)).mean(dim=(2, 3)))


ARCHS = {"blaze": BlazeNet, "dense": DenseNet, "option_a": OptionANet}


@contextlib.contextmanager
def scoring_as(scoring: str) -> Iterator[None]:
    """``now``: the package's scoring; ``sum``: the scoring before round 24 (no group
    balanced); ``mean``: every group balanced."""
    from graphprune.planning import importance

    original = importance.widened_stream
    if scoring != "now":
        importance.widened_stream = lambda group, tensors: scoring == "mean"  # type: ignore[assignment]
    try:
        yield
    finally:
        importance.widened_stream = original  # type: ignore[assignment]


def prune_curve(path: Path, calib: Path | None, scoring: str, xte: np.ndarray, yte: np.ndarray,
                budget: bool = False) -> list[dict]:
    import graphprune

    with scoring_as(scoring):
        rows = []
        for level in TARGETS if budget else RATIOS:
            kwargs: dict = {"calibration": str(calib)} if calib is not None else {"criterion": "l1"}
            kwargs["target_macs" if budget else "ratio"] = level
            res = graphprune.prune(str(path), round_to=1, **kwargs)
            rep = res.report
            rows.append({"target_macs" if budget else "ratio": level, "macs": rep["macs_after"] / rep["macs_before"],
                         "params": rep["params_after"] / rep["params_before"],
                         "accuracy": accuracy(res.model, xte, yte)})
        return rows


def at_macs(rows: list[dict], level: float) -> float | None:
    """Test accuracy interpolated at ``level`` x MACs along a curve (``None``: out of range)."""
    pts = sorted((r["macs"], r["accuracy"]) for r in rows)
    xs, ys = [p[0] for p in pts], [p[1] for p in pts]
    if not xs[0] <= level <= xs[-1]:
        return None
    return float(np.interp(level, xs, ys))


REAL = ("mediapipe_face_detection", "mediapipe_face_detection_back", "mediapipe_face_landmark",
        "mediapipe_hand_recrop", "mediapipe_iris_landmark", "mediapipe_palm_detection",
        "mediapipe_palm_detection_lite", "nudenet_yolov8n", "ddddocr_yolox_det")


def photos() -> tuple[list[np.ndarray], list[np.ndarray]]:
    """(calibration photos, held-out photos), uint8 HxWx3."""
    import os

    import matplotlib
    import skimage.data as sd
    from PIL import Image
    from sklearn.datasets import load_sample_images

    calib = list(load_sample_images().images) + [sd.coffee(), sd.chelsea(), sd.rocket(), sd.cat()]
    hopper = os.path.join(os.path.dirname(matplotlib.__file__), "mpl-data", "sample_data", "grace_hopper.jpg")
    return calib, [sd.astronaut(), np.asarray(Image.open(hopper).convert("RGB"))]


def crops(images: list[np.ndarray], n: int, shape: tuple[int, ...], nhwc: bool, signed: bool,
          rng: np.random.Generator) -> np.ndarray:
    """``n`` random square-ish crops resized to the model's input ``shape`` (one feed each)."""
    from PIL import Image

    h, w = (shape[1], shape[2]) if nhwc else (shape[2], shape[3])
    out = []
    for i in range(n):
        img = images[i % len(images)]
        side = int(rng.uniform(0.4, 1.0) * min(img.shape[:2]))
        y, x = rng.integers(0, img.shape[0] - side + 1), rng.integers(0, img.shape[1] - side + 1)
        pic = np.asarray(Image.fromarray(img[y:y + side, x:x + side]).resize((w, h)), dtype=np.float32) / 255.0
        pic = pic * 2 - 1 if signed else pic
        out.append(pic[None] if nhwc else pic.transpose(2, 0, 1)[None])
    return np.stack(out)


def fidelity(original: object, pruned: object, feeds: list[dict]) -> float:
    """Mean over feeds of the cosine between outputs, the worst of the outputs (those of more
    than one element: a face-presence score has no direction)."""
    from graphprune.verify.validate import session

    a, b = session(original), session(pruned)
    cosines = []
    for feed in feeds:
        row = []
        for x, y in zip(a.run(None, feed), b.run(None, feed), strict=True):
            if np.size(x) < 2:
                continue
            x, y = np.ravel(x).astype(np.float64), np.ravel(y).astype(np.float64)
            row.append(float(x @ y / max(np.linalg.norm(x) * np.linalg.norm(y), 1e-30)))
        cosines.append(row)
    return float(np.asarray(cosines).mean(axis=0).min())


def real_models(names: list[str], seed: int) -> dict:
    import onnx
    from real_corpus import model_path

    import graphprune

    calib_photos, held_photos = photos()
    out = {}
    for name in names:
        path = model_path(name)
        model = onnx.load(str(path))
        inits = {i.name for i in model.graph.initializer}
        (inp,) = [i for i in model.graph.input if i.name not in inits]
        dims = [d.dim_value or 1 for d in inp.type.tensor_type.shape.dim]
        if dims[2] <= 1 or dims[3] <= 1:
            dims = [1, 3, 320, 320]  # open sizes (nudenet's YOLOv8n): its usual input
        nhwc = dims[-1] == 3
        signed = name.startswith("mediapipe")  # TFLite models take [-1, 1]; the torch ones [0, 1]
        rng = np.random.default_rng(seed)
        calib_x = crops(calib_photos, 64, tuple(dims), nhwc, signed, rng)
        held = [{inp.name: x} for x in crops(held_photos, 16, tuple(dims), nhwc, signed, rng)]
        with tempfile.TemporaryDirectory() as tmp:
            calib = Path(tmp) / "calib.npz"
            np.savez(calib, **{inp.name: calib_x})
            rows = {}
            for scoring in ("sum", "now"):
                with scoring_as(scoring):
                    for label, kwargs in (("ratio 0.5, data-free", {"ratio": 0.5}),
                                          ("ratio 0.5, calibrated", {"ratio": 0.5, "calibration": str(calib)}),
                                          ("target-macs 0.5, data-free", {"target_macs": 0.5}),
                                          ("target-macs 0.5, calibrated",
                                           {"target_macs": 0.5, "calibration": str(calib)})):
                        res = graphprune.prune(str(path), **kwargs)
                        rep = res.report
                        row = {"macs": rep["macs_after"] / rep["macs_before"],
                               "params": rep["params_after"] / rep["params_before"],
                               "cosine": fidelity(model, res.model, held)}
                        rows[f"{label}/{scoring}"] = row
                        print(name, label, scoring, f"M {row['macs']:.3f} P {row['params']:.3f} "
                              f"cos {row['cosine']:.4f}", flush=True)
        out[name] = rows
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--samples", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", help="blaze,dense,option_a")
    parser.add_argument("--out", default=str(RESULTS))
    parser.add_argument("--real", nargs="?", const=",".join(REAL), default=None,
                        help="corpus models fed with photographs instead (default: the nine it changes)")
    args = parser.parse_args()
    torch.set_num_threads(2)
    if args.real:
        out = Path(args.out if args.out != str(RESULTS) else RESULTS.with_name("offset_groups_real.json"))
        result = real_models(args.real.split(","), args.seed)
        out.write_text(json.dumps(result, indent=1) + "\n")
        print("\n| model | " + " | ".join(k.split("/")[0] for k in next(iter(result.values()))
                                         if k.endswith("/sum")) + " |")
        print("|---|" + "---|" * 4)
        for name, rows in result.items():
            cells = []
            for key in rows:
                if key.endswith("/sum"):
                    a, b = rows[key], rows[key[:-4] + "/now"]
                    cells.append(f"{a['macs']:.2f}x · {a['cosine']:.3f} → {b['macs']:.2f}x · **{b['cosine']:.3f}**")
            print(f"| {name} | " + " | ".join(cells) + " |")
        return 0
    xtr, xte, ytr, yte = data(args.seed)
    rng = np.random.default_rng(args.seed)
    calib_images = xtr[rng.choice(len(xtr), size=min(args.samples, len(xtr)), replace=False)]
    result: dict = {"ratios": RATIOS, "levels": LEVELS, "models": {}}
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        calib = tmpdir / "calib.npz"
        np.savez(calib, image=calib_images[:, None])
        for name, cls in ARCHS.items():
            if args.only and name not in args.only.split(","):
                continue
            torch.manual_seed(args.seed)
            net = cls()
            train(net, xtr, ytr, args.epochs, args.seed)
            path = tmpdir / f"{name}.onnx"
            export(net, "torchscript", path)
            entry = {"unpruned": accuracy(str(path), xte, yte), "curves": {}}
            for mode, c in (("data-free", None), ("calibrated", calib)):
                for scoring in ("sum", "mean", "now"):
                    rows = prune_curve(path, c, scoring, xte, yte)
                    entry["curves"][f"{mode}/{scoring}"] = rows
                    print(name, mode, scoring, " ".join(f"r{r['ratio']}:M{r['macs']:.2f}/{r['accuracy']:.1f}"
                                                      for r in rows), flush=True)
                    rows = prune_curve(path, c, scoring, xte, yte, budget=True)
                    entry["curves"][f"{mode}/{scoring}/budget"] = rows
                    print(name, mode, scoring, "budget", " ".join(
                        f"t{r['target_macs']}:M{r['macs']:.2f}/{r['accuracy']:.1f}" for r in rows), flush=True)
            result["models"][name] = entry
    if args.only and Path(args.out).exists():  # a partial run replaces its models, keeps the others
        kept = json.loads(Path(args.out).read_text()).get("models", {})
        result["models"] = {**kept, **result["models"]}
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print("\n| model | mode | scoring | " + " | ".join(f"acc @ {lv}x MACs" for lv in LEVELS) + " | MACs at ratio 0.5 |")
    print("|---|---|---|" + "---|" * (len(LEVELS) + 1))
    for name, entry in result["models"].items():
        for key, rows in entry["curves"].items():
            if key.endswith("/budget"):
                continue
            mode, scoring = key.split("/")
            cells = [at_macs(rows, lv) for lv in LEVELS]
            half = next(r["macs"] for r in rows if r["ratio"] == 0.5)
            print(f"| {name} ({entry['unpruned']:.1f} %) | {mode} | {scoring} | "
                  + " | ".join("–" if v is None else f"{v:.1f} %" for v in cells) + f" | {half:.2f} |")
    print("\n| model | mode | scoring | " + " | ".join(f"--target-macs {t}: MACs, accuracy" for t in TARGETS) + " |")
    print("|---|---|---|" + "---|" * len(TARGETS))
    for name, entry in result["models"].items():
        for key, rows in entry["curves"].items():
            if key.endswith("/budget"):
                mode, scoring, _ = key.split("/")
                print(f"| {name} | {mode} | {scoring} | "
                      + " | ".join(f"{r['macs']:.2f}x, {r['accuracy']:.1f} %" for r in rows) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
