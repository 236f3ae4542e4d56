#!/usr/bin/env python3
"""Breadth check: 142 Hugging Face architectures as their own code initialises them, both exporters.

Each architecture is built from a tiny config (2 layers, hidden 64, 4 heads where it has
them) with ``AutoModel.from_config`` and **HF's own initialisation** (zero biases, unit
norm weights: exactly what the exporters de-duplicate into shared initializers, unlike
``bench/transformers_zoo.py``, which adds noise to every weight first), exported by the
TorchScript exporter (opset 17, dynamic batch and sequence for text) and the dynamo
exporter, and pruned by the CLI in a fresh process::

    graphprune prune M.onnx -o P.onnx --ratio 0.5 --report R.json     # verification on

Then, independently of the tool: ``onnx.checker`` (full check) on the written file, ONNX
Runtime on it at the export's shape and (text models) at another sequence length, output
shapes against the original's. Recorded per model: exit code, parameters after/before,
prunable groups and units per kind (head / mlp / hidden / channel), and the first reason
that keeps heads frozen where none are prunable.

Usage (exports go to ``bench/cache/hf_architectures/``, git-ignored)::

    python bench/hf_architectures.py                       # -> bench/results/hf_architectures.json
    python bench/hf_architectures.py --only bert,gpt2 --exporters dynamo
    python bench/hf_architectures.py --markdown-only       # -> docs/hf_architectures.md
    python bench/hf_architectures.py --attention sdpa --results R.json --markdown R.md
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
ROOT = HERE.parent
CACHE = HERE / "cache" / "hf_architectures"
RESULTS = HERE / "results" / "hf_architectures.json"
DOC = ROOT / "docs" / "hf_architectures.md"
EXPORTERS = ("torchscript", "dynamo")

_TXT = dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=128)
_VIT = dict(image_size=64, patch_size=16, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128)
_AUDIO = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
              conv_dim=[32, 32], conv_stride=[5, 2], conv_kernel=[10, 3],
              num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4)
_SEQ2SEQ = dict(vocab_size=1000, d_model=64, encoder_layers=1, decoder_layers=1,
                encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
                decoder_ffn_dim=128, max_position_embeddings=128)


_T5 = dict(vocab_size=1000, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=1, num_heads=4)
_RESNET = {"model_type": "resnet", "hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "embedding_size": 16,
           "out_features": ["stage4"]}
_DETR = dict(use_timm_backbone=False, backbone=None, use_pretrained_backbone=False, backbone_config=_RESNET, d_model=64,
             encoder_layers=1, decoder_layers=1, encoder_attention_heads=4, decoder_attention_heads=4,
             encoder_ffn_dim=128, decoder_ffn_dim=128, num_queries=10)


def _txt(**kw: object) -> dict:
    return {**_TXT, **kw}


#: model_type -> (config overrides, input kind)
SPECS: dict[str, tuple[dict, str]] = {
    "bert": (_txt(), "text"),
    "roberta": (_txt(), "text"),
    "xlm-roberta": (_txt(), "text"),
    "camembert": (_txt(), "text"),
    "distilbert": (dict(vocab_size=1000, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                        max_position_embeddings=128), "text"),
    "albert": (_txt(embedding_size=32), "text"),
    "electra": (_txt(embedding_size=32), "text"),
    "mobilebert": (_txt(embedding_size=32, intra_bottleneck_size=32, true_hidden_size=32,
                        num_feedforward_networks=2), "text"),
    "mpnet": (_txt(), "text"),
    "deberta-v2": (_txt(relative_attention=True, position_buckets=32,
                        pos_att_type=["p2c", "c2p"]), "text"),
    "convbert": (_txt(embedding_size=64), "text"),
    "clip_text_model": (_txt(), "text"),
    "bart": (_SEQ2SEQ, "seq2seq"),
    "gpt2": (dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128), "text"),
    "gpt_neox": (_txt(rotary_pct=0.25), "text"),
    "gptj": (dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, rotary_dim=8,
                  n_positions=128), "text"),
    "gpt_bigcode": (dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                         multi_query=True), "text"),
    "opt": (dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                 ffn_dim=128, word_embed_proj_dim=64, max_position_embeddings=128), "text"),
    "bloom": (dict(vocab_size=1000, hidden_size=64, n_layer=2, n_head=4), "text"),
    "falcon": (dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2,
                    num_attention_heads=4), "text"),
    "phi": (_txt(), "text"),
    "llama": (_txt(num_key_value_heads=2), "text"),
    "qwen2": (_txt(num_key_value_heads=2), "text"),
    "mistral": (_txt(num_key_value_heads=2), "text"),
    "gemma": (_txt(num_key_value_heads=2, head_dim=16), "text"),
    "vit": (_VIT, "image"),
    "deit": (_VIT, "image"),
    "beit": ({**_VIT, "use_relative_position_bias": True}, "image"),
    "dinov2": ({k: v for k, v in _VIT.items() if k != "intermediate_size"}, "image"),
    "clip_vision_model": (_VIT, "image"),
    "swin": (dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4],
                  window_size=4), "image"),
    "levit": (dict(image_size=64, hidden_sizes=[32, 48, 64], num_attention_heads=[2, 3, 4],
                   depths=[1, 1, 1], key_dim=[8, 8, 8]), "image"),
    "mobilevit": (dict(image_size=64, hidden_sizes=[32, 48, 64],
                       neck_hidden_sizes=[8, 8, 16, 16, 24, 32, 64], num_attention_heads=4), "image"),
    "segformer": (dict(hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 2, 4, 8],
                       depths=[1, 1, 1, 1], decoder_hidden_size=64), "image"),
    "convnext": (dict(image_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]), "image"),
    "resnet": (dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1]), "image"),
    "regnet": (dict(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                    groups_width=8), "image"),
    "mobilenet_v2": (dict(image_size=64, depth_multiplier=0.35), "image"),
    "poolformer": (dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]), "image"),
    "wav2vec2": (_AUDIO, "audio"),
    "hubert": (_AUDIO, "audio"),
    # round 13: 40 more architectures
    "t5": (_T5, "seq2seq"),
    "mt5": ({**_T5, "feed_forward_proj": "gated-gelu"}, "seq2seq"),
    "marian": ({**_SEQ2SEQ, "pad_token_id": 0, "decoder_start_token_id": 0}, "seq2seq"),
    "pegasus": (_SEQ2SEQ, "seq2seq"),
    "mbart": (_SEQ2SEQ, "seq2seq"),
    "blenderbot-small": (_SEQ2SEQ, "seq2seq"),
    "m2m_100": (_SEQ2SEQ, "seq2seq"),
    "whisper": (dict(vocab_size=1000, d_model=64, encoder_layers=2, decoder_layers=1, encoder_attention_heads=4,
                     decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128, num_mel_bins=16,
                     max_source_positions=32, max_target_positions=64, pad_token_id=0, eos_token_id=1,
                     bos_token_id=2, decoder_start_token_id=2, suppress_tokens=[], begin_suppress_tokens=[]),
                "speech_seq2seq"),
    "gpt_neo": (dict(vocab_size=1000, hidden_size=64, num_layers=2, num_heads=4, max_position_embeddings=128,
                     attention_types=[[["global", "local"], 1]], window_size=8), "text"),
    "codegen": (dict(vocab_size=1000, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128, n_ctx=128),
                "text"),
    "xglm": (dict(vocab_size=1000, d_model=64, num_layers=2, attention_heads=4, ffn_dim=128,
                  max_position_embeddings=128), "text"),
    "stablelm": (_txt(num_key_value_heads=2), "text"),
    "phi3": (_txt(num_key_value_heads=2, pad_token_id=0), "text"),
    "olmo": (_txt(num_key_value_heads=2), "text"),
    "granite": (_txt(num_key_value_heads=2), "text"),
    "starcoder2": (_txt(num_key_value_heads=2), "text"),
    "qwen3": (_txt(num_key_value_heads=2, head_dim=16), "text"),
    "gemma2": (_txt(num_key_value_heads=2, head_dim=16), "text"),
    "cohere": (_txt(num_key_value_heads=2), "text"),
    "roformer": (_txt(embedding_size=64), "text"),
    "squeezebert": (_txt(embedding_size=64), "text"),
    "layoutlm": (_txt(), "text"),
    "ernie": (_txt(), "text"),
    "xlnet": (dict(vocab_size=1000, d_model=64, n_layer=2, n_head=4, d_inner=128), "text"),
    "swinv2": (dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
               "image"),
    "convnextv2": (dict(image_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]), "image"),
    "bit": (dict(embedding_size=16, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1], num_groups=8), "image"),
    "pvt_v2": (dict(hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1]),
               "image"),
    "focalnet": (dict(image_size=64, embed_dim=16, depths=[1, 1], focal_levels=[2, 2], focal_windows=[3, 3]),
                 "image"),
    "yolos": ({**_VIT, "image_size": [64, 64], "num_detection_tokens": 4}, "image"),
    "vit_msn": (_VIT, "image"),
    "mobilenet_v1": (dict(image_size=64, depth_multiplier=0.25), "image"),
    "efficientnet": (dict(image_size=64, width_coefficient=0.25, depth_coefficient=0.2, hidden_dim=320), "image"),
    "mobilevitv2": (dict(image_size=64, width_multiplier=0.25), "image"),
    "glpn": (dict(hidden_sizes=[16, 32, 64, 128], num_attention_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1],
                  decoder_hidden_size=16), "image"),
    "wavlm": (_AUDIO, "audio"),
    "data2vec-audio": (_AUDIO, "audio"),
    "sew": (_AUDIO, "audio"),
    "unispeech": (_AUDIO, "audio"),
    "audio-spectrogram-transformer": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, num_mel_bins=16, max_length=64, patch_size=16,
                                           frequency_stride=10, time_stride=10), "spectrogram"),
    # mixtures of experts (exported with the "batched_mm" experts: see export()), state spaces
    "mixtral": (_txt(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), "text"),
    "qwen2_moe": (_txt(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       shared_expert_intermediate_size=128), "text"),
    "olmoe": (_txt(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2), "text"),
    "qwen3_moe": (_txt(num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
                       moe_intermediate_size=64), "text"),
    "granitemoe": (_txt(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), "text"),
    "phimoe": (_txt(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2), "text"),
    "jetmoe": (dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, num_key_value_heads=2, kv_channels=16,
                    intermediate_size=128, num_local_experts=4, num_experts_per_tok=2), "text"),
    "mamba": (dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2), "text"),
    "gpt_oss": (_txt(num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=2,
                     layer_types=["sliding_attention", "full_attention"], sliding_window=8), "text"),
    "deepseek_v3": (_txt(num_key_value_heads=4, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                         n_shared_experts=1, first_k_dense_replace=1, q_lora_rank=32, kv_lora_rank=16,
                         qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, n_group=1, topk_group=1), "text"),
    "hunyuan_v1_moe": (_txt(num_key_value_heads=2, num_experts=4, moe_topk=2, head_dim=16), "text"),
    "ernie4_5_moe": (_txt(num_key_value_heads=2, moe_num_experts=4, moe_k=2, moe_intermediate_size=64), "text"),
    "jamba": (_txt(num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, attn_layer_period=2,
                   attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1, mamba_d_state=8,
                   mamba_expand=2, use_mamba_kernels=False), "text"),
    "bamba": (_txt(num_key_value_heads=2, attn_layer_indices=[1], mamba_n_heads=8, mamba_d_head=16,
                   mamba_d_state=8, mamba_expand=2), "text"),
    "mamba2": (dict(vocab_size=1000, hidden_size=64, num_hidden_layers=2, state_size=8, expand=2, head_dim=16,
                    num_heads=8, n_groups=1), "text"),
    "olmo2": (_txt(num_key_value_heads=2), "text"),
    "gemma3_text": (_txt(num_key_value_heads=2, head_dim=16), "text"),
    "mpt": (dict(vocab_size=1000, d_model=64, n_layers=2, n_heads=4, max_seq_len=128), "text"),
    "persimmon": (_txt(), "text"),
    "biogpt": (_txt(), "text"),
    "ibert": (_txt(), "text"),
    "rembert": (_txt(input_embedding_size=32, output_embedding_size=32), "text"),
    "siglip_vision_model": (_VIT, "image"),
    "dpt": ({**_VIT, "neck_hidden_sizes": [16, 32, 64, 64], "fusion_hidden_size": 32,
             "backbone_out_indices": [0, 1, 1, 1]}, "image"),
    # round 42: detection transformers (a ResNet backbone, encoder-decoder over object queries),
    # newer vision backbones, encoders and decoders
    "detr": (_DETR, "image"),
    "conditional_detr": (_DETR, "image"),
    "table-transformer": (_DETR, "image"),
    "dab-detr": ({**_DETR, "hidden_size": 64}, "image"),
    "deformable_detr": ({**_DETR, "backbone_config": {**_RESNET, "out_features": ["stage2", "stage3", "stage4"]},
                         "num_feature_levels": 3, "encoder_n_points": 2, "decoder_n_points": 2}, "image"),
    "data2vec-vision": (_VIT, "image"),
    "ijepa": (_VIT, "image"),
    "aimv2_vision_model": (_VIT, "image"),
    "dinov3_vit": ({**_VIT, "num_register_tokens": 2}, "image"),
    "dinov3_convnext": (dict(hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1]), "image"),
    "pvt": (dict(image_size=64, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1], num_attention_heads=[1, 2, 4, 8],
                 sequence_reduction_ratios=[8, 4, 2, 1], patch_sizes=[4, 2, 2, 2], strides=[4, 2, 2, 2],
                 mlp_ratios=[2, 2, 2, 2]), "image"),
    "swin2sr": (dict(image_size=64, patch_size=1, embed_dim=32, depths=[1, 1], num_heads=[2, 2], window_size=8,
                     upscale=2, upsampler="pixelshuffle"), "image"),
    "donut-swin": (dict(image_size=64, patch_size=4, embed_dim=16, depths=[1, 1], num_heads=[2, 4], window_size=4),
                   "image"),
    "swiftformer": (dict(depths=[1, 1, 1, 1], embed_dims=[16, 32, 64, 128]), "image"),
    "textnet": ({}, "image"),
    "longt5": ({**_T5, "local_radius": 4}, "seq2seq"),
    "umt5": (_T5, "seq2seq"),
    "esm": (_txt(pad_token_id=1), "text"),
    "big_bird": (_txt(attention_type="original_full"), "text"),
    "luke": (_txt(entity_vocab_size=100, entity_emb_size=32), "text"),
    "megatron-bert": (_txt(), "text"),
    "xlm": (dict(vocab_size=1000, emb_dim=64, n_layers=2, n_heads=4, max_position_embeddings=128), "text"),
    "canine": (dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                    downsampling_rate=4, num_hash_buckets=64, num_hash_functions=4), "text"),
    "nemotron": (_txt(num_key_value_heads=2), "text"),
    "cohere2": (_txt(num_key_value_heads=2, sliding_window=8), "text"),
    "helium": (_txt(num_key_value_heads=2, head_dim=16), "text"),
    "arcee": (_txt(num_key_value_heads=2), "text"),
    "exaone4": (_txt(num_key_value_heads=2, sliding_window=8), "text"),
    "seed_oss": (_txt(num_key_value_heads=2, head_dim=16), "text"),
    "apertus": (_txt(num_key_value_heads=2), "text"),
    "ministral": (_txt(num_key_value_heads=2, head_dim=16), "text"),
    "lfm2": (_txt(num_key_value_heads=2, layer_types=["conv", "full_attention"]), "text"),
    "minimax": (_txt(num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2, head_dim=16), "text"),
    "recurrent_gemma": (_txt(num_key_value_heads=1, lru_width=64, attention_window_size=8,
                             block_types=["recurrent", "attention"]), "text"),
    "wav2vec2-conformer": (_AUDIO, "audio"),
    "unispeech-sat": (_AUDIO, "audio"),
    "sew-d": ({**_AUDIO, "squeeze_factor": 2}, "audio"),
}


# ------------------------------------------------------------------------------ export


def export(name: str, exporter: str, attention: str = "eager", opset: int | None = None,
           dynamic: bool = False) -> Path:
    import torch
    import transformers

    overrides, kind = SPECS[name]
    config = transformers.AutoConfig.for_model(name, **overrides)
    if attention != "default":
        config._attn_implementation = attention
    if hasattr(config, "_experts_implementation"):  # the per-expert loop does not export (aten::histc,
        config._experts_implementation = "batched_mm"  # data-dependent shapes); this one does
    torch.manual_seed(0)
    model = transformers.AutoModel.from_config(config).eval()

    class Wrapped(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, *args: torch.Tensor) -> torch.Tensor:
            if kind == "text":
                out = self.m(input_ids=args[0], attention_mask=args[1])
            elif kind == "seq2seq":
                out = self.m(input_ids=args[0], attention_mask=args[1], decoder_input_ids=args[0])
            elif kind == "speech_seq2seq":
                out = self.m(input_features=args[0], decoder_input_ids=args[1])
            elif kind == "image":
                out = self.m(pixel_values=args[0])
            else:  # audio, spectrogram
                out = self.m(input_values=args[0])
            return out.last_hidden_state

    ids = torch.randint(5, 900, (1, 16))
    feeds = {"text": ((ids, torch.ones(1, 16, dtype=torch.long)), ["input_ids", "attention_mask"]),
             "image": ((torch.randn(1, 3, 64, 64),), ["pixel_values"]),
             "audio": ((torch.randn(1, 1600),), ["input_values"]),
             "speech_seq2seq": ((torch.randn(1, 16, 64), ids[:, :8]), ["input_features", "decoder_input_ids"]),
             "spectrogram": ((torch.randn(1, 64, 16),), ["input_values"])}
    args, names = feeds["text" if kind == "seq2seq" else kind]
    suffix = ("" if attention == "eager" else "_" + attention) + (f"_op{opset}" if opset and exporter == "dynamo" else "")
    suffix += "_dyn" if dynamic and exporter == "dynamo" and kind in ("text", "seq2seq") else ""
    path = CACHE / f"{name}_{exporter}{suffix}.onnx"
    CACHE.mkdir(parents=True, exist_ok=True)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if exporter == "torchscript":
            dynamic = {n: {0: "batch", 1: "sequence"} for n in names} if kind in ("text", "seq2seq") else None
            torch.onnx.export(Wrapped().eval(), args, str(path), input_names=names, output_names=["out"],
                              opset_version=17, dynamo=False, dynamic_axes=dynamic)
        else:
            torch.onnx.export(Wrapped().eval(), args, str(path), input_names=names, output_names=["out"],
                              dynamo=True, external_data=False, verbose=False,
                              **({"opset_version": opset} if opset else {}), **_dynamic_shapes(kind, names, dynamic))
    return path


def _dynamic_shapes(kind: str, names: list[str], dynamic: bool) -> dict:
    """``dynamic_shapes`` for the dynamo exporter: an open sequence length on text inputs."""
    if not dynamic or kind not in ("text", "seq2seq"):
        return {}
    import torch

    seq = torch.export.Dim("sequence", min=2, max=128)
    return {"dynamic_shapes": (({1: seq},) * len(names),)}  # forward(*args): one entry, the args


# ------------------------------------------------------------------------------ check


def independent_check(original: Path, pruned: Path) -> str:
    """``ok`` or the first problem: full checker, ORT runs, output shapes."""
    import numpy as np
    import onnx
    import onnxruntime as ort

    try:
        onnx.checker.check_model(str(pruned), full_check=True)
        a, b = ort.InferenceSession(str(original)), ort.InferenceSession(str(pruned))
        text = "attention_mask" in [i.name for i in a.get_inputs()]
        rng = np.random.default_rng(0)
        skipped = ""
        for seq in ((16, 9) if text else (None,)):
            feeds = {}
            for i in a.get_inputs():
                shape = [d if isinstance(d, int) else (seq if k else 1) for k, d in enumerate(i.shape)]
                if "int" in i.type:
                    feeds[i.name] = (np.ones(shape, np.int64) if i.name == "attention_mask"
                                     else rng.integers(5, 900, shape).astype(np.int64))
                else:
                    feeds[i.name] = rng.standard_normal(shape).astype(np.float32)
            try:
                reference = a.run(None, feeds)[0]
            except Exception:  # noqa: BLE001 - the exporter fixed that length: not the prune's
                if seq is None or seq == 16:
                    raise
                skipped = f" (the original itself does not run at sequence {seq})"
                continue
            if reference.shape != b.run(None, feeds)[0].shape:
                return f"output shape differs at sequence {seq}"
        return "ok" + skipped
    except Exception as exc:  # noqa: BLE001 - recorded, the run goes on
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"


def prune_cli(path: Path, out: Path, timeout: float) -> tuple[dict, dict | None]:
    """``graphprune prune PATH -o OUT --ratio 0.5`` in a fresh process: ``prune_s`` and ``rc``
    (and ``error``, the last line it printed) and the report (``None`` when it failed)."""
    report = path.with_suffix(".report.json")
    report.unlink(missing_ok=True)
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "graphprune", "prune", str(path), "-o", str(out),
                           "--ratio", "0.5", "--report", str(report)],
                          capture_output=True, text=True, timeout=timeout)
    ran: dict = {"prune_s": round(time.perf_counter() - t0, 1), "rc": proc.returncode}
    if proc.returncode != 0:
        ran["error"] = (proc.stderr.strip().splitlines() or ["?"])[-1][:200]
        return ran, None
    return ran, json.loads(report.read_text())


def run_one(name: str, exporter: str, timeout: float, attention: str = "eager", opset: int | None = None,
            dynamic: bool = False) -> dict:
    entry: dict = {"model": name, "exporter": exporter, "attention": attention}
    if opset and exporter == "dynamo":
        entry["opset"] = opset
    if dynamic and exporter == "dynamo":
        entry["dynamic_sequence"] = True
    t0 = time.perf_counter()
    try:
        path = export(name, exporter, attention, opset, dynamic)
    except Exception as exc:  # noqa: BLE001
        entry["export"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
        return entry
    entry["export_s"] = round(time.perf_counter() - t0, 1)
    out = path.with_suffix(".pruned.onnx")
    ran, rep = prune_cli(path, out, timeout)
    entry.update(ran)
    if rep is None:
        if "the input model does not run" in entry["error"]:  # the exporter's fault: not a prune
            entry = {k: v for k, v in entry.items() if k not in ("rc", "prune_s")}
            entry["export"] = "does not run in ONNX Runtime: " + entry.pop("error").split("Runtime: ", 1)[-1][:140]
        return entry
    entry["params"] = round(rep["params_after"] / rep["params_before"], 3)
    entry["kinds"] = {k: [v["prunable"], v["units"]] for k, v in sorted((rep.get("kinds") or {}).items())}
    if "head" in entry["kinds"] and not entry["kinds"]["head"][0]:
        heads = [g for g in rep["frozen"] if g.get("kind") == "head"] or rep["frozen"]
        reasons = [r for g in heads for r in g["reasons"] if "graph output" not in r]
        entry["heads_frozen_by"] = reasons[0][:160] if reasons else "?"
    entry["check"] = independent_check(path, out)
    return entry


# ------------------------------------------------------------------------------ report


def summary(results: list[dict]) -> dict:
    done = [r for r in results if "rc" in r]
    ok = [r for r in done if r["rc"] == 0 and str(r.get("check", "")).startswith("ok")]
    with_heads = [r for r in ok if "head" in r.get("kinds", {})]
    params = sorted(r["params"] for r in ok)
    return {"exports": len(done), "ok": len(ok), "with_heads": len(with_heads),
            "heads_prunable": sum(1 for r in with_heads if r["kinds"]["head"][0]),
            "median_params": params[len(params) // 2] if params else None}


def markdown(results: list[dict], previous: dict | list[dict] | None = None) -> str:
    done = [r for r in results if "rc" in r]
    ok = [r for r in done if r["rc"] == 0 and str(r.get("check", "")).startswith("ok")]
    with_heads = [r for r in ok if "head" in r.get("kinds", {})]
    heads = [r for r in with_heads if r["kinds"]["head"][0]]
    lines = [
        "# Hugging Face architectures as initialised by their own code",
        "",
        "Generated by `bench/hf_architectures.py` from `bench/results/hf_architectures.json`; do not edit.",
        "Tiny configs (2 layers, hidden 64, 4 heads), `AutoModel.from_config` with HF's own "
        "initialisation (zero biases and unit norm weights, which both exporters store once and "
        "share between layers), TorchScript (opset 17) and dynamo exports, "
        "`graphprune prune --ratio 0.5` with verification, then `onnx.checker` (full) and ONNX "
        "Runtime on the written file at the export's and another sequence length.",
        "",
        f"**{len(ok)} / {len(done)} exports pruned, verified and checked**; attention heads prunable in "
        f"{len(heads)} of the {len(with_heads)} with heads; {len(results) - len(done)} failed to export.",
        "",
    ]
    now = summary(results)
    lines.append(f"Median parameters after/before: {now['median_params']}.")
    for earlier in ([previous] if isinstance(previous, dict) else previous or []):
        label = earlier.get("label", "before untying the exporters' shared constants")
        lines.append(f"{label[0].upper()}{label[1:]} ({earlier['commit']}, same configurations): "
                     f"{earlier['ok']} / {earlier['exports']} checked, heads prunable in "
                     f"{earlier['heads_prunable']} of {earlier['with_heads']}, median parameters "
                     f"after/before {earlier['median_params']}.")
    lines += [
        "",
        "| model | exporter | exit | check | params after/before | prunable groups · units per kind | heads frozen by |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        if "rc" not in r:
            lines.append(f"| {r['model']} | {r['exporter']} | – | export failed: {r.get('export', '?')} | | | |")
            continue
        kinds = ", ".join(f"{k} {v[0]} · {v[1]}" for k, v in r.get("kinds", {}).items())
        lines.append(f"| {r['model']} | {r['exporter']} | {r['rc']} | {r.get('check', r.get('error', ''))} | "
                     f"{r.get('params', '')} | {kinds} | {r.get('heads_frozen_by', '')} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", help="comma-separated model types")
    ap.add_argument("--exporters", default=",".join(EXPORTERS))
    ap.add_argument("--timeout", type=float, default=600)
    ap.add_argument("--attention", default="eager",
                    help="attn_implementation: eager (math ops), sdpa, or default (the config's)")
    ap.add_argument("--opset", type=int, default=None,
                    help="dynamo exporter: this opset (23 writes ONNX Attention, RMSNormalization and "
                         "RotaryEmbedding); default: the exporter's")
    ap.add_argument("--dynamic", action="store_true",
                    help="dynamo exporter: text inputs with an open sequence length (the exporter then "
                         "fuses rotary embeddings into RotaryEmbedding at opset 23)")
    ap.add_argument("--results", type=Path, default=RESULTS)
    ap.add_argument("--markdown", type=Path, default=DOC)
    ap.add_argument("--markdown-only", action="store_true")
    args = ap.parse_args(argv)
    if not args.markdown_only:
        names = args.only.split(",") if args.only else list(SPECS)
        old = {(r["model"], r["exporter"]): r for r in
               (json.loads(args.results.read_text())["results"] if args.results.exists() else [])}
        for name in names:
            for exporter in args.exporters.split(","):
                entry = run_one(name, exporter, args.timeout, args.attention, args.opset, args.dynamic)
                print(json.dumps(entry), flush=True)
                old[(name, exporter)] = entry
        order = {n: i for i, n in enumerate(SPECS)}
        results = sorted(old.values(), key=lambda r: (order.get(r["model"], 99), r["exporter"]))
        import transformers

        args.results.parent.mkdir(parents=True, exist_ok=True)
        kept = json.loads(args.results.read_text()) if args.results.exists() else {}
        args.results.write_text(json.dumps({**kept, "transformers": transformers.__version__,
                                            "results": results}, indent=1) + "\n")
    data = json.loads(args.results.read_text())
    args.markdown.write_text(markdown(data["results"], data.get("previous")))
    return 0


if __name__ == "__main__":
    sys.exit(main())
