"""Model I/O: load and save ONNX models (external data included), the graph doorway, tensor queries and input feeds."""
