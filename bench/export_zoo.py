#!/usr/bin/env python3
"""Export the graphprune benchmark zoo to ONNX.

Every model gets random weights (``torch.manual_seed(0)``, no pretrained downloads) and is
exported with both torch exporters:

* ``torchscript``: ``torch.onnx.export(model, args, path, dynamo=False, opset_version=17)``
* ``dynamo``:      ``torch.onnx.export(model, args, path, dynamo=True, external_data=False)``
  (default opset, ``optimize=True``; ``external_data=False`` only so each model is one file)

BatchNorm running stats and affine parameters are randomised so that pruning verification
compares outputs that actually depend on every channel (see ``randomise_norms``).

The nine "real" ONNX model-zoo topologies that the ``onnx`` wheel ships as test data are
added as exporter ``onnxzoo``: their weights are ``ConstantOfShape`` placeholders, which are
replaced by random initializers (He init for weights, sensible BN/scale/bias values) while
the rest of the graph (IR version, opset, node list) is kept as shipped.

Output: ``bench/cache/<model>__<exporter>.onnx`` and ``bench/cache/manifest.json``;
``bench/cache/op_inventory.json`` summarises the op types per exporter.

Run with the bench venv (torch, torchvision, timm, segmentation-models-pytorch, onnx,
onnxruntime, onnxscript)::

    python bench/export_zoo.py                       # everything not yet cached
    python bench/export_zoo.py --only resnet18,vgg11_bn --exporter dynamo --force
    python bench/export_zoo.py --inventory-only      # rebuild op_inventory.json

Each export runs in its own subprocess with a timeout, so one crash or hang is recorded as
a failed entry and the rest continue.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_CACHE = HERE / "cache"
INPUT_SHAPE = (1, 3, 224, 224)
TORCH_EXPORTERS = ("torchscript", "dynamo")
ALL_EXPORTERS = (*TORCH_EXPORTERS, "onnxzoo")

# --------------------------------------------------------------------------------------
# Model registry. Builders run inside the worker subprocess (imports are lazy).
# name -> (family, builder-id, kwargs)
# --------------------------------------------------------------------------------------

TORCHVISION = [
    "resnet18",
    "resnet50",
    "resnext50_32x4d",
    "wide_resnet50_2",
    "vgg11_bn",
    "mobilenet_v2",
    "mobilenet_v3_small",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "efficientnet_v2_s",
    "densenet121",
    "googlenet",
    "regnet_x_400mf",
    "regnet_y_400mf",
    "shufflenet_v2_x1_0",
    "squeezenet1_1",
    "mnasnet1_0",
    "convnext_tiny",
]
TORCHVISION_SEG = ["fcn_resnet50", "deeplabv3_mobilenet_v3_large", "lraspp_mobilenet_v3_large"]
SMP = ["unetplusplus_resnet18"]
# preferred timm name first, fallbacks after
TIMM = {
    "ghostnet_100": ["ghostnet_100"],
    "repvgg_a0": ["repvgg_a0", "repvgg_a1", "repvgg_b0"],
    "cspdarknet53": ["cspdarknet53", "cspresnet50"],
}
# onnx wheel: onnx/backend/test/data/real/test_<name>/data.json -> data/light/light_<name>.onnx
ONNXZOO = [
    "bvlc_alexnet",
    "densenet121",
    "inception_v1",
    "inception_v2",
    "resnet50",
    "shufflenet",
    "squeezenet",
    "vgg19",
    "zfnet512",
]


def torch_model_names() -> list[str]:
    return [*TORCHVISION, *TORCHVISION_SEG, *SMP, *TIMM]


def family_of(model: str, exporter: str) -> str:
    if exporter == "onnxzoo":
        return "onnxzoo"
    if model in TORCHVISION:
        return "torchvision"
    if model in TORCHVISION_SEG:
        return "torchvision.segmentation"
    if model in SMP:
        return "smp"
    if model in TIMM:
        return "timm"
    raise KeyError(model)


def all_entries() -> list[tuple[str, str]]:
    out = [(m, e) for m in torch_model_names() for e in TORCH_EXPORTERS]
    out += [(m, "onnxzoo") for m in ONNXZOO]
    return out


def entry_name(model: str, exporter: str) -> str:
    return f"{model}__{exporter}"


# --------------------------------------------------------------------------------------
# Worker side: build, randomise, export, check.
# --------------------------------------------------------------------------------------


def randomise_norms(model, seed: int = 0) -> dict:
    """Randomise BatchNorm stats/affine (and ConvNeXt layer scale) deterministically.

    running_mean ~ N(0, 0.1), running_var ~ U(0.5, 1.5), weight ~ U(0.5, 1.5), bias ~ N(0, 0.1).
    torchvision's ConvNeXt initialises its per-block ``layer_scale`` to 1e-6, which would make
    every residual branch (and so every prunable channel) invisible at the output; it is
    drawn from U(0.5, 1.5) as well. LayerNorm/GroupNorm affine params get the same treatment
    as BN affine params.
    """
    import torch
    from torch import nn

    g = torch.Generator().manual_seed(seed + 12345)
    counts = Counter()

    def uni(t, lo, hi):
        t.copy_(torch.rand(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * (hi - lo) + lo)

    def nrm(t, std):
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float32).to(t.dtype) * std)

    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.modules.batchnorm._BatchNorm):
                if mod.running_mean is not None:
                    nrm(mod.running_mean, 0.1)
                    uni(mod.running_var, 0.5, 1.5)
                if mod.weight is not None:
                    uni(mod.weight, 0.5, 1.5)
                    nrm(mod.bias, 0.1)
                counts["batchnorm"] += 1
            elif (
                isinstance(mod, (nn.LayerNorm, nn.GroupNorm))
                and getattr(mod, "weight", None) is not None
            ):
                uni(mod.weight, 0.5, 1.5)
                if mod.bias is not None:
                    nrm(mod.bias, 0.1)
                counts[type(mod).__name__.lower()] += 1
            ls = getattr(mod, "layer_scale", None)
            if isinstance(ls, nn.Parameter):
                uni(ls, 0.5, 1.5)
                counts["layer_scale"] += 1
    return dict(counts)


def build_torch_model(model: str):
    from torch import nn

    notes: list[str] = []
    if model in TORCHVISION:
        import torchvision

        kwargs: dict = {"weights": None}
        if model == "googlenet":
            kwargs.update(aux_logits=False, init_weights=True)
        net = getattr(torchvision.models, model)(**kwargs)
    elif model in TORCHVISION_SEG:
        import torchvision

        seg = torchvision.models.segmentation
        kwargs = {"weights": None, "weights_backbone": None}
        if model != "lraspp_mobilenet_v3_large":
            kwargs["aux_loss"] = False
        net = getattr(seg, model)(**kwargs)
    elif model in SMP:
        import segmentation_models_pytorch as smp

        net = smp.UnetPlusPlus(encoder_name="resnet18", encoder_weights=None, classes=2)
    elif model in TIMM:
        import timm

        available = set(timm.list_models())
        for cand in TIMM[model]:
            if cand in available:
                if cand != model:
                    notes.append(f"timm has no {model}; used {cand}")
                net = timm.create_model(cand, pretrained=False)
                break
        else:
            raise RuntimeError(f"none of {TIMM[model]} in timm {timm.__version__}")
    else:
        raise KeyError(model)

    if model in TORCHVISION_SEG:  # dict output -> plain tensor

        class OutOnly(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.m = m

            def forward(self, x):
                return self.m(x)["out"]

        net = OutOnly(net)
        notes.append("wrapped to return the 'out' tensor of the dict output")
    return net.eval(), notes


def _float_params(onnx_model) -> int:
    import numpy as np
    from onnx import TensorProto

    total = 0
    for t in onnx_model.graph.initializer:
        if t.data_type in (
            TensorProto.FLOAT,
            TensorProto.FLOAT16,
            TensorProto.BFLOAT16,
            TensorProto.DOUBLE,
        ):
            total += int(np.prod(t.dims)) if len(t.dims) else 1
    return total


def shape_constants(g) -> dict:
    """Constant operands of ops that index or reshape channels (what a pruner must rewrite).

    Reshape targets, Slice (starts, ends, axes), Split (axis, sizes) and Gather (axis,
    indices shape) whose operands are initializers or Constant nodes; ``dynamic`` counts the
    ones computed at run time (Shape -> ... chains).
    """
    from onnx import helper, numpy_helper

    consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    for n in g.node:
        if n.op_type == "Constant":
            for a in n.attribute:
                if a.name == "value":
                    consts[n.output[0]] = numpy_helper.to_array(a.t)
                elif a.name == "value_ints":
                    consts[n.output[0]] = list(a.ints)
                elif a.name == "value_int":
                    consts[n.output[0]] = [a.i]

    def val(name):
        v = consts.get(name)
        if v is None:
            return None
        return [int(x) for x in (v.ravel().tolist() if hasattr(v, "ravel") else v)]

    def attr(n, name, default=None):
        for a in n.attribute:
            if a.name == name:
                return helper.get_attribute_value(a)
        return default

    out: dict = {"Reshape": [], "Slice": [], "Split": [], "Gather": [], "dynamic": Counter()}
    for n in g.node:
        if n.op_type == "Reshape":
            v = val(n.input[1])
            if v is None:
                out["dynamic"]["Reshape"] += 1
            else:
                out["Reshape"].append(v)
        elif n.op_type == "Slice":
            args = [val(x) if x else None for x in list(n.input[1:5])]
            if any(a is None for a in args[:2]) or (
                len(args) > 2 and args[2] is None and len(n.input) > 3 and n.input[3]
            ):
                out["dynamic"]["Slice"] += 1
            else:
                out["Slice"].append(
                    {"starts": args[0], "ends": args[1], "axes": args[2] if len(args) > 2 else None}
                )
        elif n.op_type == "Split":
            sizes = val(n.input[1]) if len(n.input) > 1 and n.input[1] else attr(n, "split")
            out["Split"].append(
                {
                    "axis": attr(n, "axis", 0),
                    "split": list(sizes) if sizes is not None else None,
                    "num_outputs": len(n.output),
                }
            )
        elif n.op_type == "Gather":
            idx = consts.get(n.input[1])
            out["Gather"].append(
                {
                    "axis": attr(n, "axis", 0),
                    "indices_shape": list(idx.shape) if hasattr(idx, "shape") else None,
                    "data_is_constant": n.input[0] in consts,
                }
            )
    out["dynamic"] = dict(out["dynamic"])
    return {k: v for k, v in out.items() if v}


def describe_onnx(path: Path) -> dict:
    """Static facts about an exported file (for the manifest and the op inventory)."""
    import numpy as np
    import onnx
    from onnx import helper

    m = onnx.load(str(path), load_external_data=False)
    g = m.graph
    init_names = {t.name for t in g.initializer}
    ops = Counter()
    conv_groups = Counter()
    for n in g.node:
        key = n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}::{n.op_type}"
        ops[key] += 1
        if n.op_type in ("Conv", "ConvTranspose"):
            grp = next((helper.get_attribute_value(a) for a in n.attribute if a.name == "group"), 1)
            conv_groups["group=1" if grp == 1 else "grouped(group>1)"] += 1
    has_subgraphs = any(
        a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
        for n in g.node
        for a in n.attribute
    )
    shaping = shape_constants(g)
    inits_by_name = {t.name: t for t in g.initializer}
    shared = Counter()
    for n in g.node:
        for i in n.input:
            t = inits_by_name.get(i)
            if (
                t is not None
                and t.data_type == onnx.TensorProto.FLOAT
                and len(t.dims) >= 1
                and int(np.prod(t.dims)) > 1
            ):
                shared[i] += 1
    identity_on_init = sum(
        1 for n in g.node if n.op_type == "Identity" and n.input[0] in inits_by_name
    )

    def shape(vi):
        return [
            d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
            for d in vi.type.tensor_type.shape.dim
        ]

    return {
        "ir_version": m.ir_version,
        "opsets": {(o.domain or "ai.onnx"): o.version for o in m.opset_import},
        "n_nodes": len(g.node),
        "n_initializers": len(g.initializer),
        "n_functions": len(m.functions),
        "function_names": [f"{f.domain}::{f.name}" for f in m.functions],
        "has_subgraphs": has_subgraphs,
        "initializers_as_inputs": sum(1 for i in g.input if i.name in init_names),
        "inputs": [
            {"name": i.name, "shape": shape(i)} for i in g.input if i.name not in init_names
        ],
        "outputs": [{"name": o.name, "shape": shape(o)} for o in g.output],
        "params": _float_params(m),
        "op_counts": dict(sorted(ops.items())),
        "conv_groups": dict(conv_groups),
        "producer": f"{m.producer_name} {m.producer_version}".strip(),
        "identity_on_initializer": identity_on_init,
        "float_tensors_shared_by_several_nodes": sum(1 for c in shared.values() if c > 1),
        "shape_constants": shaping,
    }


def ort_check(path: Path, x, reference=None) -> dict:
    """Run the file with onnxruntime (CPU) on ``x``; compare with ``reference`` if given."""
    import numpy as np
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feeds = {sess.get_inputs()[0].name: x}
    outs = sess.run(None, feeds)
    y = outs[0]
    res = {
        "output_shape": list(y.shape),
        "finite": bool(np.isfinite(y).all()),
        "out_abs_mean": float(np.abs(y).mean()),
        "out_abs_max": float(np.abs(y).max()),
    }
    if reference is not None:
        diff = np.abs(y.astype(np.float64) - reference.astype(np.float64))
        res["max_abs_diff_vs_torch"] = float(diff.max())
        res["max_rel_diff_vs_torch"] = float(diff.max() / max(np.abs(reference).max(), 1e-12))
    return res


def export_torch(model: str, exporter: str, out: Path) -> dict:
    import numpy as np
    import torch

    torch.manual_seed(0)
    np.random.seed(0)
    threads = int(os.environ.get("GP_BENCH_THREADS", "0"))
    if threads > 0:
        torch.set_num_threads(threads)
    net, notes = build_torch_model(model)
    norm_counts = randomise_norms(net)
    x = torch.randn(*INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = net(x).detach().numpy()
    tmp = out.with_name(out.name + ".tmp")
    t0 = time.perf_counter()
    if exporter == "torchscript":
        torch.onnx.export(net, (x,), str(tmp), dynamo=False, opset_version=17)
    elif exporter == "dynamo":
        torch.onnx.export(net, (x,), str(tmp), dynamo=True, external_data=False)
    else:
        raise ValueError(exporter)
    secs = time.perf_counter() - t0
    stray = tmp.with_name(tmp.name + ".data")
    if stray.exists():  # external data despite external_data=False: keep it next to the model
        notes.append("exporter wrote external data")
    os.replace(tmp, out)
    if stray.exists():
        os.replace(stray, out.with_name(out.name + ".data"))
    info = describe_onnx(out)
    info["export_seconds"] = round(secs, 2)
    info["ort_check"] = ort_check(out, x.numpy(), ref)
    info["torch_params"] = int(sum(p.numel() for p in net.parameters()))
    info["randomised"] = norm_counts
    info["notes"] = notes
    return info


# ---- onnx model-zoo "light" test models --------------------------------------------------


def onnxzoo_source(model: str) -> Path:
    import onnx

    data = Path(onnx.__file__).resolve().parent / "backend" / "test" / "data"
    meta = json.loads((data / "real" / f"test_{model}" / "data.json").read_text())
    # url is relative to site-packages, e.g. "onnx/backend/test/data/light/light_vgg19.onnx"
    site = Path(onnx.__file__).resolve().parent.parent
    cand = site / meta["url"]
    if not cand.exists():
        cand = data / "real" / f"test_{model}" / "model.onnx"
    if not cand.exists():
        raise FileNotFoundError(f"no model file for {model} ({meta.get('url')})")
    return cand


def _role_value(name: str, shape: tuple, uses: list, consumers: dict, rng):
    """Random values for one weight, picked from how the graph uses it."""
    import numpy as np

    def pos():
        return rng.uniform(0.5, 1.5, size=shape).astype(np.float32)

    def small():
        return (rng.standard_normal(size=shape) * 0.1).astype(np.float32)

    if len(shape) >= 2:
        fan_in = int(np.prod(shape[1:]))
        for node, idx in uses:
            if node.op_type == "Gemm" and idx == 1:
                trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
                fan_in = shape[1] if trans_b else shape[0]
            elif node.op_type == "MatMul" and idx == 1:
                fan_in = shape[0]
        fan_in = max(int(fan_in), 1)
        return (rng.standard_normal(size=shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    # follow shape-only wrappers (Unsqueeze/Reshape) to the real consumer
    frontier = list(uses)
    seen = 0
    while frontier and seen < 8:
        seen += 1
        nxt = []
        for node, idx in frontier:
            if node.op_type == "BatchNormalization":
                return {1: pos, 2: small, 3: small, 4: pos}.get(idx, small)()
            if node.op_type in ("Mul", "Div"):
                return pos()
            if node.op_type in ("Add", "Sum", "Sub", "Conv", "Gemm"):
                return small()
            if node.op_type in ("Unsqueeze", "Reshape", "Identity", "Cast") and idx == 0:
                nxt += consumers.get(node.output[0], [])
        frontier = nxt
    low = name.lower()
    if any(k in low for k in ("var", "riv", "scale", "_s_0", "bn_s", "bn_w", "sc_w", "gamma")):
        return pos()
    return small()


def export_onnxzoo(model: str, out: Path) -> dict:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    src = onnxzoo_source(model)
    t0 = time.perf_counter()
    m = onnx.load(str(src))
    g = m.graph
    rng = np.random.default_rng(0)
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list] = {}
    for n in g.node:
        for i, name in enumerate(n.input):
            consumers.setdefault(name, []).append((n, i))
    used = set(consumers)

    notes: list[str] = []
    placeholders = []
    for n in g.node:
        if (
            n.op_type == "ConstantOfShape"
            and n.input
            and n.input[0] in inits
            and n.input[0].endswith("__SHAPE")
        ):
            placeholders.append(n)
    replaced: dict[str, np.ndarray] = {}
    for n in placeholders:
        shape = tuple(int(d) for d in numpy_helper.to_array(inits[n.input[0]]))
        name = n.output[0]
        replaced[name] = _role_value(name, shape, consumers.get(name, []), consumers, rng)

    refilled = 0
    for t in list(g.initializer):
        if t.data_type != TensorProto.FLOAT or t.name not in used or t.name.endswith("__SHAPE"):
            continue
        shape = tuple(t.dims)
        arr = _role_value(t.name, shape, consumers.get(t.name, []), consumers, rng)
        t.CopyFrom(numpy_helper.from_array(arr, t.name))
        refilled += 1

    # remove the placeholder nodes and their __SHAPE initializers (+ their graph inputs)
    drop_nodes = {id(n) for n in placeholders}
    shape_names = {n.input[0] for n in placeholders}
    still_used = {i for n in g.node if id(n) not in drop_nodes for i in n.input}
    shape_names -= still_used
    keep = [n for n in g.node if id(n) not in drop_nodes]
    del g.node[:]
    g.node.extend(keep)
    keep_inits = [t for t in g.initializer if t.name not in shape_names]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    keep_inputs = [i for i in g.input if i.name not in shape_names]
    del g.input[:]
    g.input.extend(keep_inputs)
    inits_as_inputs = m.ir_version < 4 or len({i.name for i in g.input} & set(inits)) > 0
    for name, arr in replaced.items():
        g.initializer.append(numpy_helper.from_array(arr, name))
        if inits_as_inputs:  # IR<4: every initializer must also be a graph input (as shipped)
            g.input.append(helper.make_tensor_value_info(name, TensorProto.FLOAT, arr.shape))
    unused_float = [
        t.name for t in g.initializer if t.data_type == TensorProto.FLOAT and t.name not in used
    ]
    if unused_float:
        notes.append(f"unused float initializers left untouched: {unused_float}")
    notes.append(
        f"{len(replaced)} ConstantOfShape weight placeholders -> random initializers; "
        f"{refilled} shipped float initializers refilled"
    )
    if m.ir_version < 4:
        notes.append(f"IR version {m.ir_version}: initializers are also graph inputs (kept)")
    hard_reshapes = [n.input[1] for n in g.node if n.op_type == "Reshape" and n.input[1] in inits]
    if hard_reshapes:
        notes.append(f"{len(hard_reshapes)} Reshape(s) with constant target shape")
    onnx.checker.check_model(m)
    tmp = out.with_name(out.name + ".tmp")
    onnx.save(m, str(tmp))
    os.replace(tmp, out)
    secs = time.perf_counter() - t0
    info = describe_onnx(out)
    info["export_seconds"] = round(secs, 2)
    info["source"] = str(src)
    x = np.random.default_rng(1).standard_normal(INPUT_SHAPE).astype(np.float32)
    info["ort_check"] = ort_check(out, x)
    info["notes"] = notes
    return info


def worker_main(model: str, exporter: str, out: str, result: str) -> int:
    import warnings

    warnings.filterwarnings("ignore")
    res: dict
    try:
        if exporter == "onnxzoo":
            res = export_onnxzoo(model, Path(out))
        else:
            res = export_torch(model, exporter, Path(out))
        res["status"] = "ok"
        rc = 0
    except BaseException as exc:  # noqa: BLE001 - anything goes into the manifest
        res = {
            "status": "failed",
            "error": f"{type(exc).__name__}: {exc}"[:4000],
            "traceback": traceback.format_exc()[-6000:],
        }
        rc = 1
    Path(result).write_text(json.dumps(res, default=str))
    return rc


# --------------------------------------------------------------------------------------
# Driver side.
# --------------------------------------------------------------------------------------


def env_versions() -> dict:
    out = {"python": platform.python_version(), "platform": platform.platform()}
    code = (
        "import json, importlib\n"
        "v={}\n"
        "for m in ['torch','torchvision','timm','segmentation_models_pytorch','onnx',"
        "'onnxruntime','onnxscript','numpy']:\n"
        "    try: v[m]=importlib.import_module(m).__version__\n"
        "    except Exception as e: v[m]='missing: '+type(e).__name__\n"
        "print(json.dumps(v))\n"
    )
    try:
        p = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=300
        )
        out.update(json.loads(p.stdout.strip().splitlines()[-1]))
    except Exception as exc:  # noqa: BLE001
        out["versions_error"] = str(exc)
    return out


class Manifest:
    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        if path.exists():
            self.data = json.loads(path.read_text())
        else:
            self.data = {}
        self.data.setdefault("format", 1)
        self.data.setdefault("input_shape", list(INPUT_SHAPE))
        self.data.setdefault("entries", [])
        self.by_name = {e["name"]: e for e in self.data["entries"]}

    def get(self, name: str) -> dict | None:
        return self.by_name.get(name)

    def put(self, entry: dict) -> None:
        with self.lock:
            self.by_name[entry["name"]] = entry
            self.data["entries"] = sorted(
                self.by_name.values(), key=lambda e: (e["model"], e["exporter"])
            )
            self.save_locked()

    def save_locked(self) -> None:
        self.data["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str) + "\n")
        os.replace(tmp, self.path)


def run_one(model: str, exporter: str, cache: Path, timeout: float, threads: int) -> dict:
    name = entry_name(model, exporter)
    out = cache / f"{name}.onnx"
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    fd, result = tempfile.mkstemp(prefix=name, suffix=".json", dir=logs)
    os.close(fd)
    env = dict(os.environ)
    if threads > 0:
        env["GP_BENCH_THREADS"] = str(threads)
        env.setdefault("OMP_NUM_THREADS", str(threads))
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_worker",
        model,
        exporter,
        str(out),
        result,
    ]
    t0 = time.perf_counter()
    with open(logs / f"{name}.log", "w") as log:
        try:
            p = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, timeout=timeout, env=env)
            rc: int | str = p.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    wall = time.perf_counter() - t0
    try:
        res = json.loads(Path(result).read_text() or "{}")
    except (OSError, json.JSONDecodeError):
        res = {}
    finally:
        Path(result).unlink(missing_ok=True)
    if not res:
        tail = (logs / f"{name}.log").read_text(errors="replace")[-2000:]
        reason = (
            f"timeout after {timeout:.0f} s"
            if rc == "timeout"
            else f"worker exited with {rc} without a result"
        )
        res = {"status": "failed", "error": f"{reason}; log tail: {tail}"}
    entry = {
        "name": name,
        "model": model,
        "exporter": exporter,
        "family": family_of(model, exporter),
        "path": out.name,
        "wall_seconds": round(wall, 2),
        **res,
    }
    if entry["status"] == "ok":
        entry["file_size"] = out.stat().st_size
        entry["error"] = None
    else:
        entry.setdefault("export_seconds", None)
        entry["file_size"] = None
        for stale in (out, out.with_name(out.name + ".tmp")):
            if stale.exists():
                stale.unlink()
    return entry


def hazards(manifest: dict) -> dict:
    """Per exporter: graph features a channel pruner must handle, with the models showing them."""
    out: dict = {}

    def add(ex, key, model, n=1):
        d = out.setdefault(ex, {}).setdefault(key, {"nodes": 0, "models": []})
        d["nodes"] += n
        if model not in d["models"]:
            d["models"].append(model)

    for e in manifest["entries"]:
        if e.get("status") != "ok":
            continue
        ex, model = e["exporter"], e["model"]
        sc = e.get("shape_constants", {})
        for shp in sc.get("Reshape", []):
            key = (
                "Reshape to constant [N, C] (flatten before the classifier)"
                if len(shp) == 2
                else "Reshape to constant rank>2 shape with channel counts (channel shuffle)"
                if len(shp) > 2
                else "Reshape to constant [-1]"
            )
            add(ex, key, model)
        for sl in sc.get("Slice", []):
            ax = sl.get("axes")
            add(ex, f"Slice with constant starts/ends on axes {ax}", model)
        for sp in sc.get("Split", []):
            add(
                ex,
                f"Split axis={sp['axis']} "
                + (
                    "equal parts (num_outputs, no sizes)"
                    if sp["split"] is None
                    else "constant sizes"
                ),
                model,
            )
        for ga in sc.get("Gather", []):
            add(ex, "Gather with constant indices" if ga["indices_shape"] else "Gather", model)
        for op, n in sc.get("dynamic", {}).items():
            add(ex, f"{op} with run-time computed operands (Shape->Gather->... chain)", model, n)
        if e.get("identity_on_initializer"):
            add(
                ex,
                "Identity on an initializer (exporter de-duplicated equal tensors)",
                model,
                e["identity_on_initializer"],
            )
        if e.get("float_tensors_shared_by_several_nodes"):
            add(
                ex,
                "float tensor initializer (size > 1) read by several nodes "
                "(de-duplicated equal weights, e.g. all-zero biases)",
                model,
                e["float_tensors_shared_by_several_nodes"],
            )
        if e.get("initializers_as_inputs"):
            add(
                ex,
                "initializers also listed as graph inputs (IR < 4)",
                model,
                e["initializers_as_inputs"],
            )
        if e.get("conv_groups", {}).get("grouped(group>1)"):
            add(
                ex,
                "Conv with group > 1 (depthwise/grouped)",
                model,
                e["conv_groups"]["grouped(group>1)"],
            )
        if e.get("n_functions"):
            add(ex, "model-local functions", model, e["n_functions"])
    return out


def build_inventory(manifest: dict) -> dict:
    inv: dict = {"per_exporter": {}, "all": {}}
    totals: dict[str, Counter] = {}
    models: dict[str, Counter] = {}
    for e in manifest["entries"]:
        if e.get("status") != "ok":
            continue
        ex = e["exporter"]
        totals.setdefault(ex, Counter())
        models.setdefault(ex, Counter())
        for op, c in e.get("op_counts", {}).items():
            totals[ex][op] += c
            models[ex][op] += 1
    union_t: Counter = Counter()
    union_m: Counter = Counter()
    for ex in sorted(totals):
        n_models = sum(
            1 for e in manifest["entries"] if e["exporter"] == ex and e.get("status") == "ok"
        )
        inv["per_exporter"][ex] = {
            "n_models": n_models,
            "opsets": sorted(
                {
                    json.dumps(e.get("opsets"))
                    for e in manifest["entries"]
                    if e["exporter"] == ex and e.get("status") == "ok"
                }
            ),
            "ops": {
                op: {"nodes": totals[ex][op], "models": models[ex][op]}
                for op in sorted(totals[ex], key=lambda o: (-totals[ex][o], o))
            },
        }
        union_t.update(totals[ex])
        union_m.update(models[ex])
    inv["all"] = {
        op: {"nodes": union_t[op], "models": union_m[op]}
        for op in sorted(union_t, key=lambda o: (-union_t[o], o))
    }
    inv["pruning_hazards"] = hazards(manifest)
    inv["per_model"] = {
        e["name"]: sorted(e.get("op_counts", {}))
        for e in manifest["entries"]
        if e.get("status") == "ok"
    }
    return inv


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default="", help="comma-separated model names")
    ap.add_argument(
        "--exporter",
        default="all",
        choices=["torchscript", "dynamo", "both", "onnxzoo", "all"],
        help="both = torchscript+dynamo; all = both + the onnx model-zoo copies",
    )
    ap.add_argument("--force", action="store_true", help="re-export cached entries")
    ap.add_argument("--cache", default=str(DEFAULT_CACHE))
    ap.add_argument("--jobs", type=int, default=1, help="parallel export subprocesses")
    ap.add_argument("--timeout", type=float, default=900.0, help="seconds per export")
    ap.add_argument("--list", action="store_true", help="list entries and exit")
    ap.add_argument("--inventory-only", action="store_true")
    ap.add_argument(
        "--redescribe",
        action="store_true",
        help="recompute the static facts of cached ok entries (no re-export)",
    )
    ap.add_argument(
        "--_worker", nargs=4, metavar=("MODEL", "EXPORTER", "OUT", "RESULT"), help=argparse.SUPPRESS
    )
    args = ap.parse_args(argv)

    if args._worker:
        return worker_main(*args._worker)

    cache = Path(args.cache).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    manifest = Manifest(cache / "manifest.json")

    if args.redescribe:
        for e in list(manifest.data["entries"]):
            if e.get("status") == "ok" and (cache / e["path"]).exists():
                manifest.put({**e, **describe_onnx(cache / e["path"])})
        print(f"re-described {len(manifest.data['entries'])} entries")

    if not args.inventory_only and not args.redescribe:
        exporters = {
            "both": TORCH_EXPORTERS,
            "all": ALL_EXPORTERS,
        }.get(args.exporter, (args.exporter,))
        only = {s.strip() for s in args.only.split(",") if s.strip()}
        known = set(torch_model_names()) | set(ONNXZOO)
        unknown = only - known
        if unknown:
            ap.error(f"unknown model(s): {sorted(unknown)}; known: {sorted(known)}")
        todo = [(m, e) for m, e in all_entries() if e in exporters and (not only or m in only)]
        if args.list:
            for m, e in todo:
                cached = manifest.get(entry_name(m, e))
                print(f"{entry_name(m, e):45s} {cached['status'] if cached else '-'}")
            return 0
        run = []
        for m, e in todo:
            prev = manifest.get(entry_name(m, e))
            if (
                not args.force
                and prev
                and prev.get("status") == "ok"
                and (cache / prev["path"]).exists()
            ):
                print(f"[cached] {entry_name(m, e)}")
                continue
            run.append((m, e))
        with manifest.lock:
            manifest.data["env"] = env_versions()
            manifest.save_locked()
        threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
        print(
            f"exporting {len(run)} entries with {args.jobs} job(s), {threads} thread(s) each",
            flush=True,
        )
        t_all = time.perf_counter()
        done = [0]

        def task(me):
            m, e = me
            entry = run_one(m, e, cache, args.timeout, threads)
            manifest.put(entry)
            done[0] += 1
            if entry["status"] == "ok":
                chk = entry.get("ort_check", {})
                rel = chk.get("max_rel_diff_vs_torch")
                msg = (
                    f"ok {entry['export_seconds']:.1f}s {entry['file_size'] / 1e6:.1f}MB "
                    f"opset={entry.get('opsets', {}).get('ai.onnx')} "
                    f"nodes={entry.get('n_nodes')} finite={chk.get('finite')}"
                    + (f" rel_diff_vs_torch={rel:.2e}" if rel is not None else "")
                )
            else:
                msg = "FAILED " + entry["error"].splitlines()[0][:300]
            print(
                f"[{done[0]}/{len(run)}] {entry['name']}: {msg} "
                f"(wall {entry['wall_seconds']:.0f}s)",
                flush=True,
            )

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            list(pool.map(task, run))
        print(f"done in {time.perf_counter() - t_all:.0f}s", flush=True)

    inv = build_inventory(manifest.data)
    (cache / "op_inventory.json").write_text(json.dumps(inv, indent=1) + "\n")
    entries = manifest.data["entries"]
    ok = [e for e in entries if e.get("status") == "ok"]
    bad = [e for e in entries if e.get("status") != "ok"]
    print(f"manifest: {len(ok)} ok, {len(bad)} failed -> {manifest.path}")
    for e in bad:
        print(f"  FAILED {e['name']}: {str(e.get('error')).splitlines()[0][:200]}")
    for ex, d in inv["per_exporter"].items():
        print(
            f"ops[{ex}] ({d['n_models']} models): "
            + ", ".join(f"{op}={v['nodes']}" for op, v in d["ops"].items())
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
