"""graphprune inside other tools' pipelines.

* :mod:`graphprune.integrations.onnx_ir`: ``PrunePass``, an onnx-ir pass for
  ``onnx_ir.passes.PassManager`` (``pip install 'graphprune[onnx-ir]'``).
* :mod:`graphprune.integrations.olive`: ``GraphPrunePass``, a Microsoft Olive pass
  (``pip install 'graphprune[olive]'``; see ``examples/olive/``).

Each module imports its tool when it is imported; ``import graphprune`` never does.
"""
