#!/usr/bin/env python3
"""LLMs written by ONNX Runtime's own model builder (``onnxruntime_genai``), pruned.

The builder is how ONNX Runtime ships LLMs (Phi, Llama, Qwen, Mistral, Gemma ... "-onnx" models):
fused com.microsoft ops (``GroupQueryAttention`` with a packed query/key/value projection and a
KV cache as graph inputs and outputs, ``SkipSimplifiedLayerNormalization``, ``MatMulNBits`` for
int4), ``SimplifiedLayerNormalization`` in the ONNX domain, external data. For each architecture
a small random-weight Hugging Face model (hidden 256, 4 heads of 64, 2 KV heads, MLP 512, 2
layers, vocabulary 1,000; seeded) is saved locally and built at ``int4`` (``MatMulNBits``, blocks
of 32) and ``fp32`` on CPU, then pruned in a fresh process with
``graphprune prune --head-ratio 0.5 --mlp-ratio 0.5`` (verification on) at the shapes of a
decode step (8 new tokens after 8 cached, ``--input-shape``) and checked independently:
``onnx.checker`` by path, ONNX Runtime at those shapes, output shapes as the original's; the
same prune without ``--input-shape`` (the sizes verification finds itself: the cache's head
size is what ``GroupQueryAttention`` requires, ``OpRule.required_sizes``); and, where the GenAI
runtime imports, 16 tokens generated greedily through ``onnxruntime_genai`` itself with the
pruned model and the builder's ``genai_config.json`` (random weights: the tokens differ from the
original's; the point is that the runtime runs it, cache and all). Then the same prune with
``--calibration`` (64 steps of 32 random tokens after a random cache, 13 held out): the
data-aware criteria and the refit through the ``MatMulNBits`` layers, with the held-out
fidelity of the logits with and without the reconstruction. The KV cache is part of the
graph's inputs and outputs, so KV heads stay; a unit of attention is one query head of every
KV group (``num_heads`` 4 -> 2, ``kv_num_heads`` 2 as before).

    python bench/genai_builder.py          # ~6 min; bench/results/genai_builder.json
    python bench/genai_builder.py --large  # TinyLlama-1.1B's shape at int4: time and peak memory
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "genai"
SITE = CACHE / "site"
RESULTS = HERE / "results" / "genai_builder.json"
GENAI = "onnxruntime-genai==0.18.0"
ARCHS = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM", "Phi3ForCausalLM",
         "GemmaForCausalLM", "Gemma2ForCausalLM", "GraniteForCausalLM", "OlmoForCausalLM", "SmolLM3ForCausalLM")
PRECISIONS = ("int4", "fp32")
#: what every architecture is pruned with (``--large``: the MLP only, as measured before)
RATIOS = ("--head-ratio", "0.5", "--mlp-ratio", "0.5")


def install() -> None:
    if not (SITE / "onnxruntime_genai").exists():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                        "--target", str(SITE), GENAI], check=True)


#: ``--large``: TinyLlama-1.1B's shape (hidden, MLP, layers, heads, KV heads, vocabulary)
LARGE = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
             num_key_value_heads=4, vocab_size=32000, head_dim=64, max_position_embeddings=2048)


def save_hf(arch: str, folder: Path, shape: dict | None = None) -> None:
    """A small random-weight model of ``arch`` (or of ``shape``) and a word-level tokenizer
    (the builder saves one)."""
    import torch
    import transformers
    from tokenizers import Tokenizer, models, pre_tokenizers

    config_cls = getattr(transformers, arch.replace("ForCausalLM", "Config"))
    # pad_token_id inside the small vocabulary; Gemma 2's sliding window (4,096 by default: the
    # builder's cache input must hold it) small enough for a probe-sized cache
    extra: dict = {"sliding_window": PAST} if "Gemma2" in arch else {}
    if "Phi3" in arch:  # a short-context Phi-3 (a longer max than the original means LongRoPE)
        extra["original_max_position_embeddings"] = 256
    sizes = shape or dict(vocab_size=1000, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=64, max_position_embeddings=256)
    config = config_cls(**sizes, pad_token_id=0, **extra)
    torch.manual_seed(0)
    getattr(transformers, arch)(config).save_pretrained(folder)
    vocab = {f"w{i}": i for i in range(sizes["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0", bos_token="w1",
                                         eos_token="w2").save_pretrained(folder)


def build(arch: str, precision: str, large: bool = False) -> Path:
    tag = f"{arch}_large" if large else arch
    folder, out = CACHE / "hf" / tag, CACHE / "onnx" / f"{tag}_{precision}"
    if (out / "model.onnx").exists():
        return out / "model.onnx"
    if not (folder / "config.json").exists():
        save_hf(arch, folder, LARGE if large else None)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "onnxruntime_genai.models.builder", "-i", str(folder), "-o", str(out),
                           "-p", precision, "-e", "cpu", "-c", str(CACHE / "builder_cache")],
                          capture_output=True, text=True, env=env, timeout=900)
    if proc.returncode != 0 or not (out / "model.onnx").exists():
        raise RuntimeError((proc.stderr.strip().splitlines() or ["?"])[-1][:200])
    return out / "model.onnx"


#: a decode step with a cache: 8 new tokens after 8 cached ones (head size 64)
PROMPT, PAST, HEAD = 8, 8, 64


def shapes(path: Path) -> dict[str, list[int]]:
    """Input shapes of that step (the builder leaves every size open; the cache's last axis
    must be the head size, which no probe guesses)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    out = {}
    for value in model.graph.input:
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in value.type.tensor_type.shape.dim]
        if value.name == "attention_mask":
            out[value.name] = [1, PROMPT + PAST]
        elif value.name in ("input_ids", "position_ids"):
            out[value.name] = [1, PROMPT]
        else:  # past key/value [batch, kv heads, past, head size]
            out[value.name] = [1, dims[1] if isinstance(dims[1], int) else 2, PAST, HEAD]
    return out


def feeds(path: Path, tokens: int = PROMPT, rng=None) -> dict:
    """One step of ``tokens`` random tokens after a random cache of ``PAST``."""
    import numpy as np

    rng = np.random.default_rng(0) if rng is None else rng
    out = {}
    for name, shape in shapes(path).items():
        if name == "input_ids":
            out[name] = rng.integers(3, 999, (1, tokens)).astype(np.int64)
        elif name == "attention_mask":
            out[name] = np.ones((1, PAST + tokens), np.int64)
        elif name == "position_ids":
            out[name] = (PAST + np.arange(tokens, dtype=np.int64))[None]
        else:
            out[name] = rng.standard_normal(shape).astype(np.float32)
    return out


def independent_check(original: Path, pruned: Path) -> str:
    import onnx
    import onnxruntime as ort

    import graphprune.io  # noqa: F401  (ONNX Runtime's ONNX-domain ops for the checker)

    try:
        onnx.checker.check_model(str(pruned))
        inputs = feeds(original)
        a = ort.InferenceSession(str(original)).run(None, inputs)
        b = ort.InferenceSession(str(pruned)).run(None, inputs)
        if [x.shape for x in a] != [x.shape for x in b]:
            return "output shapes differ"
        return "ok"
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def run_one(arch: str, precision: str) -> dict:
    row: dict = {"arch": arch, "precision": precision}
    try:
        path = build(arch, precision)
    except Exception as exc:  # noqa: BLE001
        row["build"] = f"{type(exc).__name__}: {str(exc)[:160]}"
        return row
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    ops: dict[str, int] = {}
    for node in model.graph.node:
        key = f"{node.domain + '.' if node.domain else ''}{node.op_type}"
        ops[key] = ops.get(key, 0) + 1
    row["fused_ops"] = {k: v for k, v in sorted(ops.items()) if k.startswith("com.microsoft") or "Simplified" in k}
    out, report = path.parent / "pruned.onnx", path.parent / "report.json"
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    given = [arg for name, shape in shapes(path).items()
             for arg in ("--input-shape", f"{name}={','.join(map(str, shape))}")]
    proc = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out),
                           *RATIOS, "--report", str(report), *given],
                          capture_output=True, text=True, timeout=900)
    row["prune_s"] = round(time.perf_counter() - t0, 1)
    row["rc"] = proc.returncode
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    rep = json.loads(report.read_text())
    row["params"] = round(rep["params_after"] / rep["params_before"], 3)
    row["groups"] = rep["groups"]
    row["kinds"] = {k: [v["prunable"], v["units"]] for k, v in sorted((rep.get("kinds") or {}).items())}
    row["verified"] = bool(rep["verification"]["ok"])
    row["max_rel_diff"] = rep["verification"].get("max_rel_diff")
    row["frozen_by"] = sorted({r.split(" at ")[0] for g in rep["frozen"] for r in g["reasons"]})[:6]
    row["check"] = independent_check(path, out)
    row["heads"] = [_heads(path), _heads(out)]
    row["generated"] = generate(path.parent, out)
    bare = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(path.parent / "bare.onnx"),
                           *RATIOS], capture_output=True, text=True, timeout=900)
    row["without_input_shape"] = "ok" if bare.returncode == 0 else (bare.stderr.strip().splitlines() or ["?"])[-1][:200]
    row["calibrated"] = calibrated(path, given)
    return row


def _heads(path: Path) -> list[list[int]]:
    """``[num_heads, kv_num_heads]`` of the first ``GroupQueryAttention``."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    node = next((n for n in model.graph.node if n.op_type == "GroupQueryAttention"), None)
    return [] if node is None else [onnx.helper.get_attribute_value(a) for a in node.attribute
                                    if a.name in ("num_heads", "kv_num_heads")]


GENERATE = """
import sys
import numpy as np
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(max_length=20, do_sample=False)
gen = og.Generator(model, params)
gen.append_tokens(np.array([[5, 17, 290, 33]], dtype=np.int32))
while not gen.is_done():
    gen.generate_next_token()
print(len(gen.get_sequence(0)))
"""


def generate(folder: Path, pruned: Path) -> str:
    """16 tokens generated by ``onnxruntime_genai`` with ``pruned`` in place of the builder's
    model (its config and tokenizer as written): "ok", or why not."""
    import shutil

    work = folder.parent / f"{folder.name}_genai"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    for item in folder.iterdir():
        if item.suffix in (".json",) and not item.name.startswith("report"):
            shutil.copy(item, work / item.name)
    config = json.loads((work / "genai_config.json").read_text())  # the random configs' special
    vocab = config["model"]["vocab_size"]                              # tokens lie outside their
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):      # small vocabularies
        value = config["model"].get(key)
        if isinstance(value, list):
            config["model"][key] = [v if v < vocab else 2 for v in value]
        elif isinstance(value, int) and value >= vocab:
            config["model"][key] = 2
    (work / "genai_config.json").write_text(json.dumps(config))
    shutil.copy(pruned, work / "model.onnx")
    for data in pruned.parent.glob(pruned.name + ".data"):
        shutil.copy(data, work / data.name)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(SITE), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-c", GENERATE, str(work)], capture_output=True, text=True, env=env,
                          timeout=300)
    shutil.rmtree(work, ignore_errors=True)
    if proc.returncode != 0:
        return (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    return "ok" if proc.stdout.strip().splitlines()[-1] == "20" else f"generated {proc.stdout.strip()}"


def calibrated(path: Path, given: list[str], samples: int = 64, tokens: int = 32) -> dict:
    """The same prune with ``--calibration``: ``samples`` steps of ``tokens`` random tokens after
    a random cache of ``PAST`` (13 held out), the logits' fidelity to the original with and
    without the reconstruction, and what the refit did (random weights and tokens: a robustness
    figure for the path through the packed layers, not a quality one)."""
    import numpy as np

    rng = np.random.default_rng(1)
    steps = [feeds(path, tokens, rng) for _ in range(samples)]
    calib, out, report = path.parent / "calib.npz", path.parent / "pruned_cal.onnx", path.parent / "report_cal.json"
    np.savez(calib, **{k: np.stack([s[k] for s in steps]) for k in steps[0]})
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out), *RATIOS,
                           "--calibration", str(calib), "--report", str(report), *given],
                          capture_output=True, text=True, timeout=900)
    row: dict = {"rc": proc.returncode, "prune_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return row
    rep = json.loads(report.read_text())
    fidelity = rep.get("fidelity") or {}
    logits = (fidelity.get("outputs") or {}).get("logits") or {}
    without = fidelity.get("without_reconstruction") or {}
    refit = (rep.get("calibration", {}).get("passes") or {}).get("RefitPass") or {}
    row.update(logits_rel_l2=logits.get("rel_l2"), rel_l2=fidelity.get("rel_l2"),
               rel_l2_without=without.get("rel_l2"), criteria=rep.get("calibration", {}).get("criteria_chosen"),
               refit_layers=refit.get("layers"), quantized_layers=refit.get("quantized_layers"),
               kept_weights=refit.get("kept_weights"), verified=bool(rep["verification"]["ok"]),
               check=independent_check(path, out))
    return row


def run_large() -> dict:
    """TinyLlama-1.1B's shape at int4 (0.9 GB): pruned with ``--mlp-ratio 0.5`` in a child
    process, wall time and peak RSS (``ru_maxrss`` of the child) beside the size on disk."""
    import resource

    path = build("LlamaForCausalLM", "int4", large=True)
    size = sum(p.stat().st_size for p in path.parent.glob("model.onnx*"))
    out, report = path.parent / "pruned.onnx", path.parent / "report.json"
    given = [arg for name, shape in shapes(path).items()
             for arg in ("--input-shape", f"{name}={','.join(map(str, shape))}")]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out),
                           "--mlp-ratio", "0.5", "--report", str(report), *given], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    row = {"model": "LlamaForCausalLM, TinyLlama-1.1B shape, int4 (MatMulNBits, blocks of 32)", "rc": proc.returncode,
           "size_gb": round(size / 1e9, 3), "wall_s": round(wall, 1), "peak_rss_gb": round(peak / 1e9, 3),
           "peak_over_size": round(peak / size, 2)}
    if proc.returncode == 0:
        rep = json.loads(report.read_text())
        row.update(params=round(rep["params_after"] / rep["params_before"], 3), verified=rep["verification"]["ok"],
                   stages=rep.get("timings"), check=independent_check(path, out))
    else:
        row["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", help="comma-separated architectures (e.g. LlamaForCausalLM)")
    parser.add_argument("--large", action="store_true", help="only the 1.1 B int4 run (build ~3 min, 5 GB of disk)")
    args = parser.parse_args(argv)
    install()
    if args.large:
        row = run_large()
        data = json.loads(RESULTS.read_text()) if RESULTS.exists() else {"builder": GENAI}
        data["large"] = row
        RESULTS.write_text(json.dumps(data, indent=1) + "\n")
        print(json.dumps(row))
        return 0
    previous = json.loads(RESULTS.read_text())["results"] if RESULTS.exists() and args.only else []
    rows = [r for r in previous if r["arch"] not in (args.only or "").split(",")]
    for arch in args.only.split(",") if args.only else ARCHS:
        for precision in PRECISIONS:
            row = run_one(arch, precision)
            rows.append(row)
            status = row.get("build") or row.get("error") or row.get("check")
            print(f"{arch:22s} {precision:5s} {status[:70]:70s} params {row.get('params')} "
                  f"mlp {row.get('kinds', {}).get('mlp')}", flush=True)
    order = {a: i for i, a in enumerate(ARCHS)}
    rows.sort(key=lambda r: (order.get(r["arch"], len(order)), PRECISIONS.index(r["precision"])))
    ok = [r for r in rows if r.get("check") == "ok" and r.get("verified")]
    cal = [r["calibrated"] for r in rows if (r.get("calibrated") or {}).get("check") == "ok"]
    summary = {"runs": len(rows), "built": sum(1 for r in rows if "build" not in r), "ok": len(ok),
               "mlp_pruned": sum(1 for r in ok if r.get("kinds", {}).get("mlp", [0])[0]),
               "heads_pruned": sum(1 for r in ok if len(r.get("heads", [])) == 2 and r["heads"][1][:1] < r["heads"][0][:1]),
               "generated": sum(1 for r in ok if r.get("generated") == "ok"),
               "without_input_shape": sum(1 for r in ok if r.get("without_input_shape") == "ok"),
               "calibrated_ok": len(cal),
               # where the allocation of heads was measured, candidates are compared reconstructed or not,
               # and no "without reconstruction" figure is kept
               "calibrated_nearer": sum(1 for c in cal if (c.get("rel_l2") or 1) < (c.get("rel_l2_without") or 0)),
               "calibrated_without_figure": sum(1 for c in cal if c.get("rel_l2_without") is None)}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    large = json.loads(RESULTS.read_text()).get("large") if RESULTS.exists() else None
    data = {"builder": GENAI, "summary": summary, "results": rows, **({"large": large} if large else {})}
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
