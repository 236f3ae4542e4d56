"""Group-sparse training on scikit-learn's digits, then lossless pruning.

For each seed: train a small CNN densely, and train the same CNN (same data, same schedule)
with :class:`graphprune.frontends.sparsity.GroupSparsity` (proximal group lasso over the
units graphprune's analysis finds on the export). Then export the sparse model, prune it
with ``graphprune.pipeline.lossless.prune_lossless`` and check that the outputs are identical, and
remove the same zero units from the PyTorch module with ``apply_plan``.

    python bench/group_sparsity_digits.py                 # 3 seeds, ~2-4 min on 2 CPU cores
    python bench/group_sparsity_digits.py --seeds 0 --epochs 20

Writes ``bench/results/group_sparsity_digits.json`` (``--out``) and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import onnx
import torch
from graphprune.frontends import torch as gpt
from graphprune.frontends.sparsity import GroupSparsity
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

import graphprune
from graphprune.verify.metrics import count_macs, count_params
from graphprune.verify.validate import differences, session


class DigitsCNN(nn.Module):
    """Three conv-BN-ReLU blocks, two max-pools, Flatten -> Linear (80 prunable channels)."""

    def __init__(self) -> None:
        super().__init__()

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())

        self.features = nn.Sequential(
            block(1, 16), block(16, 32), nn.MaxPool2d(2), block(32, 32), nn.MaxPool2d(2)
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 2 * 2, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def data(seed: int = 0) -> tuple[torch.Tensor, ...]:
    digits = load_digits()
    x = (digits.images / 16.0).astype(np.float32)[:, None]
    y = digits.target.astype(np.int64)
    xtr, xte, ytr, yte = train_test_split(x, y, test_size=0.25, random_state=seed, stratify=y)
    return tuple(torch.from_numpy(a) for a in (xtr, ytr, xte, yte))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean()) * 100


def predict(model: onnx.ModelProto, x: torch.Tensor) -> np.ndarray:
    """Run a batch-1 ONNX model over ``x`` one sample at a time."""
    sess = session(model)
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i : i + 1].numpy()})[0] for i in range(len(x))])


def train(
    model: nn.Module,
    xtr: torch.Tensor,
    ytr: torch.Tensor,
    *,
    epochs: int,
    seed: int,
    reg: GroupSparsity | None = None,
    lr: float = 0.05,
    freeze_at: float = 1.0,
) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4, nesterov=True)
    steps_per_epoch = math.ceil(len(xtr) / 64)
    total = epochs * steps_per_epoch
    step = 0
    loss_fn = nn.CrossEntropyLoss()
    for epoch in range(epochs):
        if reg is not None and epoch == round(freeze_at * epochs):
            reg.freeze()  # keep the zero units at zero, let the rest recover
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), 64):
            idx = order[i : i + 64]
            current = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            for g in opt.param_groups:
                g["lr"] = current
            loss = loss_fn(model(xtr[idx]), ytr[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            if reg is not None:
                reg.step(max(current, lr * 0.05))
            step += 1


def run_seed(
    seed: int, epochs: int, strength: float, target: float, per_group: bool, freeze_at: float
) -> dict:
    xtr, ytr, xte, yte = data(0)
    torch.manual_seed(seed)
    init = DigitsCNN()

    dense = copy.deepcopy(init)
    t0 = time.perf_counter()
    train(dense, xtr, ytr, epochs=epochs, seed=seed)
    dense_time = time.perf_counter() - t0

    sparse = copy.deepcopy(init)
    reg = GroupSparsity.from_module(
        sparse, (xte[:1],), strength=strength, target=target, per_group=per_group
    )
    t0 = time.perf_counter()
    train(sparse, xtr, ytr, epochs=epochs, seed=seed, reg=reg, freeze_at=freeze_at)
    sparse_time = time.perf_counter() - t0
    summary = reg.summary()

    # lossless pruning of the trained sparse model's export
    # batch 1: the lossless pass does not yet follow zeros through a Flatten with a
    # symbolic batch (see docs/frontends.md); per-sample runs are cheap at this size
    exported = gpt.to_onnx(sparse, (xte[:1],))
    from graphprune.pipeline.lossless import prune_lossless

    lossless = prune_lossless(exported)
    before, after = predict(exported, xte), predict(lossless.model, xte)
    max_abs, max_rel = differences([before], [after])
    onnx_acc = float((after.argmax(1) == yte.numpy()).mean()) * 100

    # the same zero units removed from the PyTorch module
    small = copy.deepcopy(sparse)
    small_reg = GroupSparsity(small, reg.analysis, reg.model, strength=strength, target=target)
    plan = small_reg.prune_module()
    with torch.no_grad():
        small.eval()
        sparse.eval()
        torch_diff = float((small(xte) - sparse(xte)).abs().max())
    small_export = gpt.to_onnx(small, (xte[:1],))
    plan_result = graphprune.prune(exported, plan=reg.plan())

    return {
        "seed": seed,
        "dense_accuracy": round(accuracy(dense, xte, yte), 2),
        "sparse_accuracy": round(accuracy(sparse, xte, yte), 2),
        "lossless_accuracy": round(onnx_acc, 2),
        "pruned_module_accuracy": round(accuracy(small, xte, yte), 2),
        "units": summary["units"],
        "zero_units": summary["zero_units"],
        "zero_fraction": summary["zero_fraction"],
        "zero_by_group": summary["zero_by_group"],
        "lossless_max_abs_diff": max_abs,
        "lossless_max_rel_diff": max_rel,
        "lossless_channels_removed": lossless.report["channels"]["removed"],
        "plan_prune_max_rel_diff": plan_result.report["verification"]["max_rel_diff"],
        "module_max_abs_diff": torch_diff,
        "params_before": lossless.report["params_before"],
        "params_after": lossless.report["params_after"],
        "macs_before": lossless.report["macs_before"],
        "macs_after": lossless.report["macs_after"],
        "module_params_before": sum(p.numel() for p in sparse.parameters()),
        "module_params_after": sum(p.numel() for p in small.parameters()),
        "module_export_params": count_params(small_export),
        "module_export_macs": count_macs(small_export),
        "channels_left": [m.out_channels for m in small.modules() if isinstance(m, nn.Conv2d)],
        "plan_units": plan.units_removed,
        "train_seconds": {"dense": round(dense_time, 1), "sparse": round(sparse_time, 1)},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--strength", type=float, default=0.05)
    parser.add_argument("--target", type=float, default=0.5)
    parser.add_argument("--global-target", action="store_true",
                        help="take the target share over all units (default: within each group)")
    parser.add_argument("--freeze-at", type=float, default=0.7, help="fraction of epochs with shrinking")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "group_sparsity_digits.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for seed in args.seeds:
        row = run_seed(
            seed, args.epochs, args.strength, args.target, not args.global_target, args.freeze_at
        )
        rows.append(row)
        print(json.dumps({k: v for k, v in row.items() if k != "zero_by_group"}))
    mean = {
        k: round(float(np.mean([r[k] for r in rows])), 3)
        for k in ("dense_accuracy", "sparse_accuracy", "lossless_accuracy", "zero_fraction")
    }
    out = {
        "config": vars(args),
        "rows": rows,
        "mean": mean,
        "versions": {"torch": torch.__version__, "graphprune": graphprune.__version__},
    }
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1))
    print()
    print("| seed | dense acc % | sparse acc % | lossless acc % | zero units | params before -> after | MACs before -> after | max abs diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['seed']} | {r['dense_accuracy']:.2f} | {r['sparse_accuracy']:.2f} | "
            f"{r['lossless_accuracy']:.2f} | {r['zero_units']}/{r['units']} ({100 * r['zero_fraction']:.1f} %) | "
            f"{r['params_before']:,} -> {r['params_after']:,} | {r['macs_before']:,} -> {r['macs_after']:,} | "
            f"{r['lossless_max_abs_diff']:.1e} |"
        )
    print(f"\nmean: {mean}")


if __name__ == "__main__":
    main()
