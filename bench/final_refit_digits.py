"""The final refit on every calibration sample, side by side with the model fitted without the
held-out ones, on the digits networks of ``bench/calibration_digits.py`` (the 3-conv CNN and
the residual net, TorchScript exports, 3 training/split/calibration seeds, 128 calibration
images of which 26 held out, ``--ratio 0.5`` and ``0.7 --round-to 1``). Judged on the 450
test images, which calibration never saw: relative L2 of the logits to the original's and
test accuracy.

    python bench/final_refit_digits.py          # ~3 min on 2 CPU cores

Results: ``bench/results/final_refit_digits.json``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))
import calibration_digits as cd  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "final_refit_digits.json"


def main() -> int:
    import graphprune
    from graphprune.verify.validate import session

    torch.set_num_threads(2)
    rows = []
    for seed in (0, 1, 2):
        xtr, xte, ytr, yte = cd.data(seed)
        for arch in ("cnn", "resnet"):
            net = cd.ARCHS[arch]()
            cd.train(net, xtr, ytr, 30, seed)
            calib = xtr[np.random.default_rng(seed).choice(len(xtr), size=128, replace=False)][:, None]
            with tempfile.TemporaryDirectory() as tmp:
                path = Path(tmp) / "digits.onnx"
                cd.export(net, "torchscript", path)
                reference = session(str(path)).run(None, {"image": xte})[0]
                for ratio in (0.5, 0.7):
                    row = {"seed": seed, "arch": arch, "ratio": ratio}
                    for mode in ("off", "on"):
                        res = graphprune.prune(str(path), ratio=ratio, round_to=1, calibration={"image": calib},
                                               final_refit=mode)
                        logits = session(res.model).run(None, {"image": xte})[0]
                        row[mode] = {
                            "test_accuracy": round(float((logits.argmax(1) == yte).mean()), 4),
                            "test_logit_rel_l2": round(float(np.linalg.norm(logits - reference)
                                                             / np.linalg.norm(reference)), 4),
                            "final_refit": res.report["calibration"].get("final_refit"),
                        }
                    rows.append(row)
                    print(json.dumps({k: row[k] for k in ("seed", "arch", "ratio")}
                                     | {m: {k: row[m][k] for k in ("test_accuracy", "test_logit_rel_l2")}
                                        for m in ("off", "on")}), flush=True)
    nearer = sum(r["on"]["test_logit_rel_l2"] < r["off"]["test_logit_rel_l2"] for r in rows)
    acc = [np.sign(r["on"]["test_accuracy"] - r["off"]["test_accuracy"]) for r in rows]
    summary = {"runs": len(rows), "logits_nearer_with_final_refit": int(nearer),
               "accuracy_better_tie_worse": [int(sum(a > 0 for a in acc)), int(sum(a == 0 for a in acc)),
                                             int(sum(a < 0 for a in acc))]}
    print(json.dumps(summary))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"command": "python bench/final_refit_digits.py", "summary": summary,
                                   "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
