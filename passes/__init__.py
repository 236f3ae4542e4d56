"""Rewrite passes over ONNX graphs (installed as ``graphprune.passes``)."""
