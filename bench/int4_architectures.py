#!/usr/bin/env python3
"""Transformers quantized to 4 bits by ONNX Runtime (``MatMulNBits``), pruned like their floats.

For each Hugging Face architecture export of ``bench/hf_architectures.py`` (both exporters,
cached in ``bench/cache/hf_architectures/``; run that first), ONNX Runtime's weight-only
quantizer (``MatMulNBitsQuantizer``: 4 bits, asymmetric, blocks of 16 — the test configs'
``head_dim`` — so that a head is one block, as a real model's 64 or 128 wide heads are several
blocks of 32) writes every MatMul with a constant weight as a packed ``MatMulNBits``. Each is
then pruned in a fresh process with ``graphprune prune --ratio 0.5`` (verification on) and
checked independently (full checker by path, ONNX Runtime at two sequence lengths: the
``independent_check`` of ``hf_architectures.py``). The row records what pruned (heads, MLP
neurons: prunable / units), the parameter fraction (packed weights counted as ``N x K``), how
many ``MatMulNBits`` the quantizer wrote, and the float export's prunable kinds beside it.

    python bench/int4_architectures.py                # ~15 min; bench/results/int4_architectures.json
    python bench/int4_architectures.py --only llama,qwen2
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from hf_architectures import CACHE, EXPORTERS, independent_check, prune_cli  # noqa: E402

RESULTS = HERE / "results" / "int4_architectures.json"
FLOAT_RESULTS = HERE / "results" / "hf_architectures.json"
#: decoder LLMs first (the models int4 is made for), then encoders, seq2seq, vision, speech
MODELS = ("llama", "mistral", "qwen2", "qwen3", "phi3", "phi", "gemma", "gemma2", "granite", "olmo",
          "stablelm", "starcoder2", "cohere", "gpt2", "gpt_neox", "gptj", "gpt_neo", "opt", "bloom",
          "falcon", "codegen", "xglm", "gpt_bigcode", "bert", "roberta", "distilbert", "electra",
          "albert", "mpnet", "t5", "bart", "marian", "whisper", "vit", "deit", "dinov2", "swin",
          "clip_text_model", "wav2vec2", "hubert")
BLOCK = 16


def quantize(source: Path, out: Path) -> int:
    import logging

    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    logging.getLogger("onnxruntime.quantization").setLevel(logging.WARNING)  # a line per node
    quantizer = MatMulNBitsQuantizer(onnx.load(str(source)), bits=4, block_size=BLOCK, is_symmetric=False)
    quantizer.process()
    model = quantizer.model.model
    onnx.save(model, str(out))
    return sum(1 for n in model.graph.node if n.op_type == "MatMulNBits")


def run_one(name: str, exporter: str, timeout: float) -> dict:
    entry: dict = {"model": name, "exporter": exporter}
    source = CACHE / f"{name}_{exporter}.onnx"
    if not source.exists():
        entry["skipped"] = "no float export in the cache (run bench/hf_architectures.py)"
        return entry
    path = CACHE / f"{name}_{exporter}.int4.onnx"
    try:
        entry["matmulnbits"] = quantize(source, path)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        entry["skipped"] = f"quantizer: {type(exc).__name__}: {str(exc).splitlines()[0][:140]}"
        return entry
    out = path.with_suffix(".pruned.onnx")
    ran, rep = prune_cli(path, out, timeout)
    entry.update(ran)
    if rep is None:
        if "the input model does not run" in entry["error"]:  # the exporter's fault (the float too)
            entry = {k: v for k, v in entry.items() if k not in ("rc", "prune_s", "error")}
            entry["skipped"] = "the export does not run in ONNX Runtime (nor does its float original)"
        return entry
    entry["params"] = round(rep["params_after"] / rep["params_before"], 3)
    entry["kinds"] = {k: [v["prunable"], v["units"]] for k, v in sorted((rep.get("kinds") or {}).items())}
    entry["verified"] = bool(rep["verification"]["ok"])
    entry["check"] = independent_check(path, out)
    return entry


def float_kinds() -> dict[tuple[str, str], dict]:
    if not FLOAT_RESULTS.exists():
        return {}
    data = json.loads(FLOAT_RESULTS.read_text())
    rows = data["results"] if isinstance(data, dict) else data
    return {(r["model"], r["exporter"]): r.get("kinds", {}) for r in rows if r.get("attention", "eager") == "eager"}


def summary(results: list[dict]) -> dict:
    done = [r for r in results if "rc" in r]
    ok = [r for r in done if r["rc"] == 0 and r.get("check") == "ok" and r.get("verified")]

    def prunable(r: dict, kind: str) -> bool:
        return bool(r.get("kinds", {}).get(kind, [0])[0])

    params = sorted(r["params"] for r in ok)
    return {"runs": len(done), "ok": len(ok),
            "with_heads": sum(1 for r in ok if "head" in r.get("kinds", {})),
            "heads_prunable": sum(1 for r in ok if prunable(r, "head")),
            "with_mlp": sum(1 for r in ok if "mlp" in r.get("kinds", {})),
            "mlp_prunable": sum(1 for r in ok if prunable(r, "mlp")),
            "same_kinds_as_float": sum(1 for r in ok if r.get("float_kinds") is not None
                                       and {k for k, v in r["kinds"].items() if v[0]}
                                       == {k for k, v in r["float_kinds"].items() if v[0]}),
            "median_params": params[len(params) // 2] if params else None}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated architectures")
    parser.add_argument("--timeout", type=float, default=600)
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(MODELS)
    floats = float_kinds()
    previous = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() and args.only else []
    results = [r for r in previous if r["model"] not in names]
    for name in names:
        for exporter in EXPORTERS:
            row = run_one(name, exporter, args.timeout)
            if (name, exporter) in floats:
                row["float_kinds"] = floats[(name, exporter)]
            results.append(row)
            kinds = " ".join(f"{k} {v[0]}/{v[1]}" for k, v in row.get("kinds", {}).items())
            status = row.get("skipped") or row.get("error") or row.get("check")
            print(f"{name:18s} {exporter:11s} {status[:60]:60s} {kinds}", flush=True)
    order = {m: i for i, m in enumerate(MODELS)}
    results.sort(key=lambda r: (order.get(r["model"], len(order)), r["exporter"]))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out = {"block_size": BLOCK, "summary": summary(results), "results": results}
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    print(json.dumps(out["summary"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
