"""Large-model benchmark: verified pruning of LLaMA-architecture exports of 0.1-1.1 B parameters.

Exports LLaMA-architecture decoders (RMSNorm, rotary attention with grouped KV heads, SwiGLU
MLP; random weights, seeded) with the PyTorch dynamo exporter and external data, then runs
``graphprune prune M.onnx -o P.onnx --head-ratio 0.5 --mlp-ratio 0.5`` (verification on) in
a subprocess and records wall time, peak RSS (``ru_maxrss`` of the child) and the time of
each stage from the report. Results: ``bench/results/llm_scale.json`` and
``docs/large_models.md``.

    python bench/llm_scale.py --export --sizes 125m,500m,600m,1b   # once (minutes, ~9 GB disk)
    python bench/llm_scale.py --run --sizes 125m,600m,1b           # prune + measure

Models live in ``bench/cache/llm/<size>/model.onnx`` (+ ``model.onnx.data``), git-ignored.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "llm"
RESULTS = HERE / "results" / "llm_scale.json"
DOC = HERE.parent / "docs" / "large_models.md"

#: name -> (hidden, layers, heads, kv_heads, intermediate, vocab)
SIZES = {
    "125m": (768, 12, 12, 4, 2048, 32000),
    "500m": (1536, 16, 12, 4, 4096, 32000),
    "600m": (1536, 20, 12, 4, 4096, 32000),
    "1b": (2048, 22, 32, 4, 5632, 32000),  # TinyLlama-1.1B shape
}


def build(hidden: int, layers: int, heads: int, kv_heads: int, inter: int, vocab: int):
    import torch
    from torch import nn

    head_dim = hidden // heads

    class RMSNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(hidden))

        def forward(self, x):
            var = x.pow(2).mean(-1, keepdim=True)
            return self.weight * (x * torch.rsqrt(var + 1e-5))

    def rotate(x):
        a, b = x[..., : head_dim // 2], x[..., head_dim // 2:]
        return torch.cat((-b, a), dim=-1)

    class Attention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.q_proj = nn.Linear(hidden, heads * head_dim, bias=False)
            self.k_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.v_proj = nn.Linear(hidden, kv_heads * head_dim, bias=False)
            self.o_proj = nn.Linear(heads * head_dim, hidden, bias=False)

        def forward(self, x, cos, sin):
            b, s, _ = x.shape
            q = self.q_proj(x).view(b, s, heads, head_dim).transpose(1, 2)
            k = self.k_proj(x).view(b, s, kv_heads, head_dim).transpose(1, 2)
            v = self.v_proj(x).view(b, s, kv_heads, head_dim).transpose(1, 2)
            q = q * cos + rotate(q) * sin
            k = k * cos + rotate(k) * sin
            rep = heads // kv_heads
            k = k[:, :, None].expand(b, kv_heads, rep, s, head_dim).reshape(b, heads, s, head_dim)
            v = v[:, :, None].expand(b, kv_heads, rep, s, head_dim).reshape(b, heads, s, head_dim)
            att = (q @ k.transpose(-1, -2)) / head_dim**0.5
            mask = torch.full((s, s), float("-inf")).triu(1)
            att = torch.softmax(att + mask, dim=-1)
            out = (att @ v).transpose(1, 2).reshape(b, s, heads * head_dim)
            return self.o_proj(out)

    class MLP(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gate_proj = nn.Linear(hidden, inter, bias=False)
            self.up_proj = nn.Linear(hidden, inter, bias=False)
            self.down_proj = nn.Linear(inter, hidden, bias=False)

        def forward(self, x):
            return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))

    class Layer(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.input_layernorm = RMSNorm()
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm()
            self.mlp = MLP()

        def forward(self, x, cos, sin):
            x = x + self.self_attn(self.input_layernorm(x), cos, sin)
            return x + self.mlp(self.post_attention_layernorm(x))

    class Llama(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed_tokens = nn.Embedding(vocab, hidden)
            self.layers = nn.ModuleList(Layer() for _ in range(layers))
            self.norm = RMSNorm()
            self.lm_head = nn.Linear(hidden, vocab, bias=False)
            inv = 1.0 / (10000 ** (torch.arange(0, head_dim, 2).float() / head_dim))
            self.register_buffer("inv_freq", inv, persistent=False)

        def forward(self, input_ids):
            s = input_ids.shape[1]
            t = torch.arange(s, dtype=torch.float32)
            freqs = torch.outer(t, self.inv_freq)
            emb = torch.cat((freqs, freqs), dim=-1)
            cos, sin = emb.cos()[None, None], emb.sin()[None, None]
            x = self.embed_tokens(input_ids)
            for layer in self.layers:
                x = layer(x, cos, sin)
            return self.lm_head(self.norm(x))

    torch.manual_seed(0)
    model = Llama().eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02)
    return model


def export(size: str, force: bool = False) -> Path:
    import torch

    out = CACHE / size / "model.onnx"
    if out.exists() and not force:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    model = build(*SIZES[size])
    ids = torch.randint(0, SIZES[size][5], (1, 128))
    t0 = time.perf_counter()
    with torch.no_grad():
        program = torch.onnx.export(model, (ids,), dynamo=True, external_data=True,
                                    input_names=["input_ids"], output_names=["logits"])
        program.save(str(out), external_data=True)
    params = sum(p.numel() for p in model.parameters())
    print(f"{size}: {params / 1e6:.0f} M params exported in {time.perf_counter() - t0:.0f} s -> {out}",
          flush=True)
    return out


def _size_on_disk(path: Path) -> int:
    return sum(f.stat().st_size for f in path.parent.iterdir() if f.name.startswith(path.name))


def run_one(size: str, extra: list[str]) -> dict:
    model = CACHE / size / "model.onnx"
    out_dir = CACHE / size / "pruned"
    out_dir.mkdir(exist_ok=True)
    out = out_dir / "pruned.onnx"
    report = out_dir / "report.json"
    for f in out_dir.iterdir():
        f.unlink()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--measure", "prune", str(model),
           "-o", str(out), "--head-ratio", "0.5", "--mlp-ratio", "0.5", "--report", str(report),
           "-q", *extra]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    size_bytes = _size_on_disk(model)
    peak = [ln for ln in done.stdout.splitlines() if ln.startswith("PEAK_RSS_KIB ")]
    peak_bytes = int(peak[-1].split()[1]) * 1024 if peak else 0
    row = {
        "size": size, "args": extra, "rc": int(done.stderr.split("RC ")[-1]) if "RC " in done.stderr else done.returncode,
        "wall_s": round(wall, 1), "model_bytes": size_bytes, "peak_rss_bytes": peak_bytes,
        "peak_rss_x_model": round(peak_bytes / size_bytes, 2),
        "stderr": [ln for ln in done.stderr.strip().splitlines() if not ln.startswith("RC ")][-1:],
    }
    if report.exists():
        rep = json.loads(report.read_text())
        row["timings"] = rep.get("timings")
        row["verification"] = {k: rep.get("verification", {}).get(k)
                               for k in ("ok", "reference", "max_rel_diff")}
        row["params"] = [rep.get("params_before"), rep.get("params_after")]
    if done.returncode == 0:
        check = subprocess.run(
            [sys.executable, "-c",
             "import onnx, onnxruntime as ort, sys; onnx.checker.check_model(sys.argv[1]);"
             "ort.InferenceSession(sys.argv[1], providers=['CPUExecutionProvider']); print('ok')",
             str(out)], capture_output=True, text=True)
        row["output_checker_and_ort"] = check.stdout.strip() == "ok"
        row["output_bytes"] = _size_on_disk(out)
    return row


def measure(argv: list[str]) -> None:
    """Run the graphprune CLI in this process and print its peak RSS (ru_maxrss, KiB)."""
    from graphprune.cli import main as cli_main

    rc = cli_main(argv)
    print(f"PEAK_RSS_KIB {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}", flush=True)
    print(f"RC {rc}", file=sys.stderr, flush=True)
    sys.exit(rc)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--measure":
        measure(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="125m", help=f"comma list of {', '.join(SIZES)}")
    ap.add_argument("--export", action="store_true", help="export the models (cached)")
    ap.add_argument("--force", action="store_true", help="re-export even if cached")
    ap.add_argument("--run", action="store_true", help="prune each model in a fresh process")
    ap.add_argument("--no-verify", action="store_true", help="also pass --no-verify")
    args = ap.parse_args()
    sizes = [s for s in args.sizes.split(",") if s]
    for s in sizes:
        if s not in SIZES:
            ap.error(f"unknown size {s}")
    if args.export:
        for s in sizes:
            # one process per export: the exporter's memory is returned to the OS
            subprocess.run([sys.executable, "-c",
                            f"import sys; sys.path.insert(0, {str(HERE)!r}); import llm_scale;"
                            f" llm_scale.export({s!r}, {args.force})"], check=True)
    if args.run:
        rows = []
        for s in sizes:  # each in its own process: ru_maxrss of children grows monotonically,
            # so run the sizes smallest first to attribute the peak to the largest so far
            rows.append(run_one(s, ["--no-verify"] if args.no_verify else []))
            print(json.dumps(rows[-1]), flush=True)
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        old = json.loads(RESULTS.read_text()) if RESULTS.exists() else []
        RESULTS.write_text(json.dumps(old + rows, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    main()
