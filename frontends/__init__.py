"""Frontends: lower framework models to ONNX."""
