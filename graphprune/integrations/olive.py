"""graphprune as a Microsoft Olive pass.

Olive (``olive-ai``) finds a pass by its type name in a *package config*; graphprune's pass
is registered in ``examples/olive/package_config.json``::

    {"passes": {"GraphPrune": {"module_path": "graphprune.integrations.olive.GraphPrunePass", ...}}}

and used in a workflow like any other pass (``examples/olive/workflow.json``)::

    "passes": {"prune": {"type": "GraphPrune", "ratio": 0.5, "criterion": "l1"}}

    olive run --config workflow.json --package-config package_config.json

The pass takes an ONNX model and runs the same pipeline as ``graphprune prune`` (analysis,
plan, rewrite, verification: a pruned model that fails verification fails the pass). Its
options are those of :func:`graphprune.prune` that fit in JSON; the pass writes the pruned
model where Olive asks and ``graphprune_report.json`` beside it, and adds a summary of the
report to the output model's ``model_attributes["graphprune"]``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from olive.hardware.accelerator import AcceleratorSpec
from olive.model import ONNXModelHandler
from olive.model.utils import resolve_onnx_path
from olive.passes import Pass
from olive.passes.onnx.common import get_external_data_config, model_proto_to_olive_model
from olive.passes.pass_config import BasePassConfig, PassConfigParam

__all__ = ["GraphPrunePass", "REPORT_NAME"]

#: the report's file name, written beside the pruned model
REPORT_NAME = "graphprune_report.json"

#: the pass options: name -> (type, default, description); all go to graphprune.prune
OPTIONS: dict[str, tuple[Any, Any, str]] = {
    "ratio": (float, None, "Fraction of the units of every prunable channel group to remove, in [0, 1) "
                           "(default: 0.5; with only head_ratio/mlp_ratio given, only those kinds are pruned)."),
    "criterion": (str, None, "Importance criterion: l1, l2 or random; with calibration also auto, "
                  "activation, wanda, flap, reconstruction, obs (default: l1, with calibration auto)."),
    "calibration": (str, None, "Calibration data: a .npz with one array per input (leading sample axis), "
                    "a folder of .npz files, or random[:N[:LO,HI]] (synthetic feeds) when there is no data; "
                    "enables data-aware criteria, reconstruction and the fidelity report."),
    "reconstruction": (str, "auto", "With calibration: auto (the refit, the statistics correction or none, "
                                     "whichever the held-out samples prefer), refit, stats, bias, bn or none."),
    "target_macs": (float, None, "Budget instead of ratio: fraction of the original MACs, in (0, 1)."),
    "target_params": (float, None, "Budget instead of ratio: fraction of the original parameters."),
    "target_latency": (float, None, "Budget instead of ratio: fraction of the measured ORT latency."),
    "round_to": (int, None, "Keep a multiple of N units per group (default: 8 for groups of 32 or more)."),
    "min_channels": (int, 1, "Minimum units kept per group."),
    "keep": (list[str], None, "Node or tensor names whose channels must not be pruned."),
    "lossless": (bool, False, "Only exact removals: zero-invariant groups and zero branches."),
    "erase_blocks": (float, None, "Depth pruning: erase K residual blocks (K >= 1) or that fraction (K < 1)."),
    "head_ratio": (float, None, "Transformers: fraction of attention heads to remove (default: ratio if given, else 0)."),
    "mlp_ratio": (float, None, "Transformers: fraction of MLP neurons to remove (default: ratio if given, else 0)."),
    "hidden_ratio": (float, None, "Transformers: fraction of the hidden size, with prune_hidden."),
    "prune_hidden": (bool, False, "Transformers: also prune the hidden size (inexact)."),
    "tolerance": (float, None, "Largest accepted relative difference in verification."),
    "seed": (int, 0, "Random seed of the 'random' criterion."),
}


class GraphPrunePass(Pass):
    """Structural pruning of an ONNX model with graphprune (see the module docstring)."""

    @classmethod
    def _default_config(cls, accelerator_spec: AcceleratorSpec) -> dict[str, PassConfigParam]:
        config = {
            name: PassConfigParam(type_=kind, default_value=default, description=description)
            for name, (kind, default, description) in OPTIONS.items()
        }
        config.update(get_external_data_config())
        return config

    def _run_for_config(
        self, model: ONNXModelHandler, config: type[BasePassConfig], output_model_path: str
    ) -> ONNXModelHandler:
        from graphprune.api import prune

        options = {name: getattr(config, name) for name in OPTIONS}
        options["keep"] = options["keep"] or ()
        if any(options[name] is not None for name in ("target_macs", "target_params", "target_latency")) \
                or options.get("lossless") or options.get("erase_blocks") is not None:
            options.pop("ratio")  # a budget, lossless mode or erasing blocks replaces the uniform ratio
        erase = options.get("erase_blocks")
        if erase is not None and erase >= 1 and erase == int(erase):
            options["erase_blocks"] = int(erase)
        result = prune(model.model_path, **options)
        output_path = Path(resolve_onnx_path(output_model_path, Path(model.model_path).name))
        output_path.parent.mkdir(parents=True, exist_ok=True)
        (output_path.parent / REPORT_NAME).write_text(json.dumps(result.report, indent=1, default=str))
        pruned = model_proto_to_olive_model(result.model, output_path, config)
        result.close()  # the model is written: its temporary weight folder goes at once
        report = result.report
        pruned.model_attributes = {
            **(model.model_attributes or {}),
            "graphprune": {
                "mode": report.get("mode"),
                "params": [report["params_before"], report["params_after"]],
                "macs": [report["macs_before"], report["macs_after"]],
                "verification": (report.get("verification") or {}).get("reference"),
            },
        }
        return pruned
