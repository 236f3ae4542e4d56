"""Model I/O: load and save ONNX models (external data included), the graph doorway, tensor queries and input feeds."""

from graphprune.io import ort_schemas

ort_schemas.register()  # onnx.checker accepts ONNX Runtime's ops in the ONNX domain
