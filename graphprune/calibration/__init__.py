"""Calibration: data-aware pruning and reconstruction without fine-tuning.

- :mod:`.data`: read, validate and split calibration samples;
- :mod:`.runner`: run them through ONNX Runtime with intermediate tensors exposed;
- :mod:`.linear`: linear layers as matrices (im2col rows for convolutions);
- :mod:`.stats`: per-channel moments and Gram statistics of layer inputs;
- :mod:`.sequential`: wave-by-wave least-squares refit and statistics correction;
- :mod:`.fidelity`: how close the pruned model stays to the original on held-out samples.
"""

from graphprune.calibration.data import CalibrationSet, load_calibration

__all__ = ["CalibrationSet", "load_calibration"]
