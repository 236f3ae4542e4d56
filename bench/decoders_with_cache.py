#!/usr/bin/env python3
"""Hugging Face decoders exported for generation: the KV cache as graph inputs and outputs.

Each causal-LM architecture is built from a tiny config (2 layers, hidden 64, 4 query heads,
2 KV heads where the architecture has grouped-query attention) with HF's own code and
initialisation, wrapped so that the cache is ``past_key_values.N.key`` / ``.value`` in and
``present.N.key`` / ``.value`` out (as Optimum and hand-written exports give it), and
exported by the TorchScript exporter (dynamic batch, sequence and past length, named as
Optimum names them: the mask is ``past_sequence_length + sequence_length`` wide) and the
dynamo exporter (``dynamic_shapes`` on the same axes; at opset 18, and at opset 23 where
``scaled_dot_product_attention`` becomes ONNX ``Attention``). Pruned by the CLI in a fresh
process, verification on::

    graphprune prune M.onnx -o P.onnx --head-ratio 0.5 --mlp-ratio 0.5 --report R.json

Then, independently of the tool: ``onnx.checker`` (full check), and 8 tokens generated
greedily by both models through their own cache (a prompt of 5 tokens with an empty cache,
then one token at a time, ``present`` fed back as ``past``): the pruned model's cache must
keep the original's shape at every step. Recorded: exit code, parameters after/before, query
heads before/after in the first layer's attention, and the first reason that keeps heads
frozen where none prune.

Usage (exports go to ``bench/cache/decoders_with_cache/``, git-ignored)::

    python bench/decoders_with_cache.py                  # -> bench/results/decoders_with_cache.json
    python bench/decoders_with_cache.py --only llama,qwen2 --exporters torchscript
    python bench/decoders_with_cache.py --large          # + a Qwen2.5-0.5B-shaped export (1.66 GB)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "decoders_with_cache"
RESULTS = HERE / "results" / "decoders_with_cache.json"
EXPORTERS = ("torchscript", "dynamo", "dynamo-opset23")
LAYERS, VOCAB = 2, 128

_BASE = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=LAYERS,
             num_attention_heads=4, max_position_embeddings=256)
_GQA = dict(_BASE, num_key_value_heads=2)
#: model type -> config overrides (query heads 4; KV heads 2 under grouped-query attention)
SPECS: dict[str, dict] = {
    "llama": _GQA,
    "mistral": dict(_GQA, sliding_window=None),
    "qwen2": _GQA,
    "qwen3": dict(_GQA, head_dim=16),
    "phi3": dict(_GQA, pad_token_id=0),
    "gemma": dict(_GQA, head_dim=16),
    "gemma2": dict(_GQA, head_dim=16, sliding_window=64),
    "granite": _GQA,
    "olmo2": _GQA,
    "stablelm": _GQA,
    "starcoder2": dict(_GQA, sliding_window=None),
    "falcon": dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=LAYERS, num_attention_heads=4,
                   multi_query=True, new_decoder_architecture=False, alibi=False, parallel_attn=True),
    "gpt2": dict(vocab_size=VOCAB, n_embd=64, n_layer=LAYERS, n_head=4, n_positions=256),
    "gpt_neox": dict(_BASE, rotary_pct=0.5),
    "phi": _BASE,
    "opt": dict(vocab_size=VOCAB, hidden_size=64, ffn_dim=128, num_hidden_layers=LAYERS,
                num_attention_heads=4, max_position_embeddings=256, word_embed_proj_dim=64),
}


def _cache_layers(cache) -> list[tuple]:
    """``(keys, values)`` per layer of a transformers cache object."""
    return [(layer.keys, layer.values) for layer in cache.layers]


#: ``--large``: Qwen2.5-0.5B's shape (14 query heads over 2 KV heads: 7 per group), a 32 k
#: vocabulary; 415 M parameters, 1.66 GB in float32
LARGE = dict(vocab_size=32000, hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
             num_attention_heads=14, num_key_value_heads=2, max_position_embeddings=4096)


def export(name: str, exporter: str, spec: dict | None = None, tag: str = "") -> tuple[Path, tuple[int, int]]:
    """The export and the cache's ``(KV heads, head size)``."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(name, **(spec or SPECS[name]))
    layers = config.num_hidden_layers
    config._attn_implementation = "eager" if exporter != "dynamo-opset23" else "sdpa"
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():
        probe = model(input_ids=torch.ones(1, 2, dtype=torch.long), use_cache=True).past_key_values
    _, kv_heads, _, head_size = _cache_layers(probe)[0][0].shape

    class WithCache(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, input_ids, attention_mask, past):
            cache = transformers.DynamicCache(config=config)
            for i in range(layers):
                cache.update(past[2 * i], past[2 * i + 1], i)
            out = self.m(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
            return (out.logits, *(t for kv in _cache_layers(out.past_key_values) for t in kv))

    cache_names = [f"past_key_values.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    outputs = ["logits", *(n.replace("past_key_values", "present") for n in cache_names)]
    ids, past_len = torch.randint(0, VOCAB, (2, 3)), 5
    args = (ids, torch.ones(2, past_len + 3, dtype=torch.long),
            tuple(torch.randn(2, kv_heads, past_len, head_size) for _ in cache_names))
    path = CACHE / f"{name}{tag}_{exporter}.onnx"
    CACHE.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            # Optimum's names: the mask's width is the arithmetic of the other two
            total = "past_sequence_length + sequence_length"
            axes = {"input_ids": {0: "batch_size", 1: "sequence_length"},
                    "attention_mask": {0: "batch_size", 1: total},
                    **{n: {0: "batch_size", 2: "past_sequence_length"} for n in cache_names},
                    **{n: {0: "batch_size", 2: total} for n in outputs[1:]},
                    "logits": {0: "batch_size", 1: "sequence_length"}}
            torch.onnx.export(WithCache(), args, str(path), input_names=["input_ids", "attention_mask", *cache_names],
                              output_names=outputs, opset_version=17, dynamo=False, dynamic_axes=axes)
        else:
            dim = torch.export.Dim
            batch, seq, past = dim("batch", max=64), dim("sequence", max=128), dim("past", max=128)
            shapes = ({0: batch, 1: seq}, {0: batch, 1: dim("total", max=256)},
                      tuple({0: batch, 2: past} for _ in cache_names))
            torch.onnx.export(WithCache(), args, str(path), input_names=["input_ids", "attention_mask", *cache_names],
                              output_names=outputs, dynamo=True, external_data=False, verbose=False,
                              dynamic_shapes=shapes, opset_version=23 if exporter == "dynamo-opset23" else 18)
    return path, (int(kv_heads), int(head_size))


def generate(path: Path, cache: tuple[int, int], steps: int = 8) -> tuple[list[int], list[tuple]]:
    """Greedy tokens through the model's own cache, and the cache shapes at every step."""
    import numpy as np
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs() if i.name.startswith("past_key_values")]
    past = {n: np.zeros((1, *cache[:1], 0, cache[1]), np.float32) for n in names}
    ids = np.array([[3, 17, 42, 7, 99]], np.int64)
    tokens, shapes, total = [], [], 0
    for _ in range(steps):
        total += ids.shape[1]
        out = session.run(None, {"input_ids": ids, "attention_mask": np.ones((1, total), np.int64), **past})
        token = int(out[0][0, -1].argmax())
        tokens.append(token)
        shapes.append(tuple(out[1].shape))
        past = dict(zip(names, out[1:], strict=True))
        ids = np.array([[token]], np.int64)
    return tokens, shapes


#: runs its arguments as a child and reports the child's own peak RSS. A process's peak
#: includes the pages of the process it was forked from (the kernel keeps the old image's
#: high-water mark across exec), and this benchmark holds torch and a model: the prune is
#: started from this small process instead.
_MEASURED = ("import os, subprocess, sys\n"
             "child = subprocess.Popen(sys.argv[1:])\n"
             "_, status, usage = os.wait4(child.pid, 0)\n"
             "sys.stderr.write(f'\\npeak_rss_kb {usage.ru_maxrss}\\n')\n"
             "sys.exit(os.waitstatus_to_exitcode(status))\n")


def prune_cli(path: Path, out: Path, timeout: float) -> tuple[dict, dict | None]:
    """``graphprune prune ... --head-ratio 0.5 --mlp-ratio 0.5`` in a fresh process: wall
    time, exit code, its peak RSS and the report."""
    report = path.with_suffix(".report.json")
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _MEASURED, sys.executable, "-m", "graphprune", "prune", str(path),
                           "-o", str(out), "--head-ratio", "0.5", "--mlp-ratio", "0.5", "--report", str(report)],
                          capture_output=True, text=True, timeout=timeout)
    lines = proc.stderr.strip().splitlines() or ["?"]
    ran: dict = {"prune_s": round(time.perf_counter() - t0, 1), "rc": proc.returncode}
    if lines[-1].startswith("peak_rss_kb "):
        ran["peak_rss_gb"] = round(int(lines.pop().split()[1]) / 1e6, 3)
    if proc.returncode != 0:
        ran["error"] = (lines or ["?"])[-1][:200]
        return ran, None
    return ran, json.loads(report.read_text())


def run_one(name: str, exporter: str, timeout: float) -> dict:
    import onnx

    entry: dict = {"model": name, "exporter": exporter}
    try:
        path, cache = export(name, exporter)
        original = generate(path, cache)
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        entry["export"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return entry
    out = path.with_suffix(".pruned.onnx")
    ran, rep = prune_cli(path, out, timeout)
    entry.update(ran)
    if rep is None:
        return entry
    entry["params"] = round(rep["params_after"] / rep["params_before"], 3)
    kinds = rep.get("kinds") or {}
    entry["kinds"] = {k: [v["prunable"], v["units"]] for k, v in sorted(kinds.items())}
    entry["heads_pruned"] = bool(kinds.get("head", {}).get("prunable"))
    if not kinds.get("head", {}).get("prunable"):
        heads = [g for g in rep["frozen"] if g.get("kind") == "head"] or rep["frozen"]
        reasons = [r for g in heads for r in g["reasons"]]
        entry["heads_frozen_by"] = reasons[0][:160] if reasons else "?"
    entry["verified"] = bool(rep.get("verification", {}).get("ok"))
    try:
        onnx.checker.check_model(str(out), full_check=True)
        tokens, shapes = generate(out, cache)
        entry["generates"] = shapes == original[1]
        entry["cache_shapes"] = "kept" if shapes == original[1] else f"{shapes[-1]} vs {original[1][-1]}"
    except Exception as exc:  # noqa: BLE001
        entry["generates"] = False
        entry["check"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    return entry


def run_large(timeout: float) -> dict:
    """``--large``: the Qwen2.5-0.5B-shaped export, pruned in a fresh process; wall time and
    the child's peak RSS against the file's size. The export runs in a process of its own
    and both models are run only after the prune: a child forked from a parent that holds a
    model counts the parent's pages in its peak."""
    path = CACHE / "qwen2_0.5b_torchscript.onnx"
    if not path.exists():
        subprocess.run([sys.executable, "-c", "import decoders_with_cache as d; "
                        "d.export('qwen2', 'torchscript', d.LARGE, tag='_0.5b')"], cwd=HERE, check=True)
    out = path.with_suffix(".pruned.onnx")
    ran, rep = prune_cli(path, out, timeout)
    entry: dict = {"model": "qwen2 (Qwen2.5-0.5B shape)", "exporter": "torchscript", **ran,
                   "size_gb": round(path.stat().st_size / 1e9, 2)}
    if rep is not None:
        cache = (LARGE["num_key_value_heads"], LARGE["hidden_size"] // LARGE["num_attention_heads"])
        entry |= {"params": round(rep["params_after"] / rep["params_before"], 3),
                  "kinds": {k: [v["prunable"], v["units"]] for k, v in sorted((rep.get("kinds") or {}).items())},
                  "verified": bool(rep.get("verification", {}).get("ok")),
                  "generates": generate(out, cache, steps=4)[1] == generate(path, cache, steps=4)[1]}
    out.unlink(missing_ok=True)
    return entry


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types")
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--large", action="store_true",
                    help="also the Qwen2.5-0.5B-shaped export (1.66 GB, TorchScript; ~2 min)")
    args = ap.parse_args(argv)
    names = args.only.split(",") if args.only else list(SPECS)
    large = run_large(args.timeout) if args.large else None  # first: no model in this process yet
    if large is not None:
        print(json.dumps(large), flush=True)
    results = []
    for name in names:
        for exporter in args.exporters.split(","):
            t0 = time.perf_counter()
            entry = run_one(name, exporter, args.timeout)
            entry["total_s"] = round(time.perf_counter() - t0, 1)
            results.append(entry)
            shown = {k: v for k, v in entry.items() if k not in ("model", "exporter")}
            print(f"{name:12s} {exporter:15s} {json.dumps(shown)}", flush=True)
    ran = [r for r in results if "rc" in r]
    summary = {"entries": len(results), "exported": len(ran), "pruned_rc0": sum(r["rc"] == 0 for r in ran),
               "verified": sum(bool(r.get("verified")) for r in ran),
               "heads_pruned": sum(bool(r.get("heads_pruned")) for r in ran),
               "generate": sum(bool(r.get("generates")) for r in ran)}
    print(json.dumps(summary))
    payload: dict = {"summary": summary, "results": results}
    if large is not None:
        payload["large"] = large
    args.results.parent.mkdir(parents=True, exist_ok=True)
    args.results.write_text(json.dumps(payload, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
