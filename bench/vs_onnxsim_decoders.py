#!/usr/bin/env python3
"""onnxsim 0.8's structured pruning on the decoders exported with their KV cache.

The exports of ``bench/decoders_with_cache.py`` (run it first: 16 architectures, TorchScript
and dynamo at opsets 18 and 23), pruned by onnxsim three ways at sparsity 0.5:
``apply_structured_pruning`` (MLP channels), ``apply_attention_head_pruning`` (heads of fused
attention ops) and both in turn. Each output is checked as graphprune's are: ``onnx.checker``
(full, by path) and 4 tokens generated greedily through the model's own cache. Parameters
(float initializers) after / before beside graphprune's from ``decoders_with_cache.json``::

    .venv-bench/bin/pip install onnxsim==0.8.1
    .venv-bench/bin/python bench/vs_onnxsim_decoders.py    # -> bench/results/vs_onnxsim_decoders.json
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import decoders_with_cache as decoders  # noqa: E402

RESULTS = HERE / "results" / "vs_onnxsim_decoders.json"


def _params(model: onnx.ModelProto) -> int:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16)
    return sum(int(np.prod(t.dims)) for t in model.graph.initializer if t.data_type in floats)


def main() -> int:
    import onnxsim.pruning as sim

    ways = {
        "structured": lambda m: sim.apply_structured_pruning(m, sparsity=0.5),
        "heads": lambda m: sim.apply_attention_head_pruning(m, sparsity=0.5),
        "both": lambda m: sim.apply_attention_head_pruning(sim.apply_structured_pruning(m, sparsity=0.5), sparsity=0.5),
    }
    ours = {f"{r['model']}_{r['exporter']}": r for r in json.loads(decoders.RESULTS.read_text())["results"]}
    rows = []
    scratch = Path(tempfile.mkdtemp(prefix="vs-onnxsim-")) / "out.onnx"
    for path in sorted(decoders.CACHE.glob("*.onnx")):
        if ".pruned" in path.name or path.stem not in ours:
            continue
        model = onnx.load(str(path))
        dims = next(i for i in model.graph.input if i.name.startswith("past_key_values")).type.tensor_type.shape.dim
        cache = (dims[1].dim_value, dims[3].dim_value)
        row: dict = {"export": path.stem, "graphprune": ours[path.stem].get("params")}
        for name, way in ways.items():
            try:
                out = way(onnx.load(str(path)))
                onnx.save(out, str(scratch))
                onnx.checker.check_model(str(scratch), full_check=True)
                decoders.generate(scratch, cache, steps=4)
                row[name] = round(_params(out) / _params(model), 3)
            except Exception as exc:  # noqa: BLE001 - recorded: the output is not usable
                row[name] = f"invalid: {type(exc).__name__}: {str(exc).splitlines()[0][:100]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    valid = [r for r in rows if any(isinstance(r[w], float) for w in ways)]
    reduced = [r for r in valid if min(r[w] for w in ways if isinstance(r[w], float)) < 1]
    summary = {"exports": len(rows), "onnxsim_reduced": len(reduced),
               "onnxsim_invalid": {w: sum(isinstance(r[w], str) for r in rows) for w in ways},
               "onnxsim_heads_reduced": sum(isinstance(r["heads"], float) and r["heads"] < 1 for r in rows),
               "graphprune_reduced": sum((r["graphprune"] or 1) < 1 for r in rows)}
    print(json.dumps(summary))
    RESULTS.write_text(json.dumps({"summary": summary, "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
