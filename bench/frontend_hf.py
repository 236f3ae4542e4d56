"""The PyTorch frontend on Hugging Face models: ``prune_module`` -> ``apply_plan`` -> ``check_module``.

For each architecture of ``bench/hf_architectures.py`` with token or image inputs (tiny random
configs, weights re-drawn so that no two are equal), both exporters: export and prune the module
at ``ratio=0.5``, slice a copy of the module by the mapped plan, and compare it with the pruned
ONNX on the example input. A row records the parameters kept (ONNX and module) and the largest
relative difference, or the first error (mapping, a module's ``forward``, or the check).

    python bench/frontend_hf.py                      # ~15 min; bench/results/frontend_hf.json
    python bench/frontend_hf.py --only gpt2,phi3     # merged into the recorded results
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import traceback
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results" / "frontend_hf.json"
KINDS = ("text", "seq2seq", "image")


def run_one(name: str, exporter: str) -> dict:
    import hf_architectures as hf
    import torch
    import transformers
    from graphprune.frontends.torch import apply_plan, check_module, prune_module

    overrides, kind = hf.SPECS[name]
    config = transformers.AutoConfig.for_model(name, **overrides)
    config._attn_implementation = "eager"
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "batched_mm"
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()
    for p in model.parameters():  # HF initialises norms to ones: equal tensors tie layers
        if p.dim() > 0:
            torch.nn.init.normal_(p, std=0.05)

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if kind == "text":
                return self.m(input_ids=x).last_hidden_state
            if kind == "seq2seq":
                return self.m(input_ids=x, decoder_input_ids=x).last_hidden_state
            return self.m(pixel_values=x).last_hidden_state

    wrapped = Wrapped().eval()
    x = torch.randn(1, 3, 64, 64) if kind == "image" else torch.randint(5, 900, (1, 16))
    row: dict = {"model": name, "exporter": exporter}
    try:
        result = prune_module(wrapped, (x,), ratio=0.5, exporter=exporter)
        row["params_onnx"] = round(result.report["params_after"] / result.report["params_before"], 3)
        pruned = apply_plan(copy.deepcopy(wrapped), result.plan)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        row["params_module"] = round(count(pruned) / count(wrapped), 3)
        row["max_rel_diff"] = float(check_module(pruned, result.model, (x,)))
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        where = traceback.extract_tb(exc.__traceback__)[-1]
        row["error"] = (f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:160]} "
                        f"({Path(where.filename).name}:{where.lineno})")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types")
    ap.add_argument("--exporters", default="torchscript,dynamo")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args(argv)
    import hf_architectures as hf

    names = args.only.split(",") if args.only else [n for n, (_, kind) in hf.SPECS.items() if kind in KINDS]
    rows = {(r["model"], r["exporter"]): r for r in
            (json.loads(args.results.read_text())["results"] if args.results.exists() else [])}
    warnings.simplefilter("ignore")
    for name in names:
        for exporter in args.exporters.split(","):
            row = run_one(name, exporter)
            print(json.dumps(row), flush=True)
            rows[(name, exporter)] = row
    results = sorted(rows.values(), key=lambda r: (r["model"], r["exporter"]))
    ok = [r for r in results if "error" not in r and r["max_rel_diff"] < 1e-4]
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps({"matched": len(ok), "runs": len(results), "results": results}, indent=1) + "\n")
    print(f"{len(ok)} / {len(results)} pruned modules match their pruned ONNX")
    return 0


if __name__ == "__main__":
    sys.exit(main())
