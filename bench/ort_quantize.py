"""ONNX Runtime's int8 quantizers as the benchmarks use them (one helper, one set of defaults)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path


def quantize(src: Path, out: Path, kind: str, feeds: Iterable[dict] = (), *, per_channel: bool = True,
             u8s8: bool = True) -> Path:
    """``src`` quantized to int8 into ``out``: ``dynamic`` (``quantize_dynamic``: int8 weights,
    activations quantized at run time), or ``qdq`` / ``qop`` (``quantize_static`` in QDQ or
    QOperator format, calibrated on ``feeds``). ``u8s8``: int8 weights and uint8 activations
    (else the quantizer's defaults)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    types = {"weight_type": QuantType.QInt8} if u8s8 else {}
    if kind == "dynamic":
        quantize_dynamic(str(src), str(out), per_channel=per_channel, **types)
        return out
    if kind not in ("qdq", "qop"):
        raise ValueError(f"unknown quantization {kind!r}")
    items = iter(feeds)

    class Reader(CalibrationDataReader):
        def get_next(self) -> dict | None:
            return next(items, None)

    if u8s8:
        types["activation_type"] = QuantType.QUInt8
    quantize_static(str(src), str(out), Reader(), per_channel=per_channel,
                    quant_format=QuantFormat.QOperator if kind == "qop" else QuantFormat.QDQ, **types)
    return out
