"""Model I/O: load and save ONNX models (external data included), the graph doorway, tensor queries and input feeds."""

from graphprune.io.ort_schemas import register as _register_ort_schemas

_register_ort_schemas()  # onnx.checker accepts ONNX Runtime's ops in the ONNX domain
