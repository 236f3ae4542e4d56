"""Verification and measurement: checker, ONNX Runtime comparison, parameter/MAC counts, timing."""
