"""Statistics correction of kept channels after upstream pruning (no fine-tuning).

The ONNX equivalent of re-estimating BatchNorm statistics on calibration data, which also
works where the exporter folded BatchNorm into the convolution: every linear layer whose
input changed because of pruning gets a per-output-channel affine correction
``y' = s y + t`` (folded into its weight rows and bias) so that each kept channel's mean
and variance on the calibration samples match the original model's, wave by wave in
topological order (``s = sigma_original / sigma_pruned``, clipped to [0.1, 10];
``t = mu_original - s mu_pruned``). See :mod:`graphprune.calibration.sequential`.
"""

from __future__ import annotations

from graphprune.passes.refit import RefitPass


class StatsCorrectionPass(RefitPass):
    """Match the per-channel mean and variance of every affected linear layer's output."""

    mode = "affine"

    def __repr__(self) -> str:
        return f"{self.name}(samples={sum(self.batches.sizes)})"
