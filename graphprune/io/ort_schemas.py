"""Schemas of the ops ONNX Runtime registers in the ONNX domain itself, so that
``onnx.checker`` accepts the models that use them.

ONNX Runtime's model builder for generative models (``onnxruntime_genai``) and its transformer
optimizer write ``SimplifiedLayerNormalization`` (RMSNorm) in the default domain, and the
optimizer writes ``LayerNormalization`` there for opsets before 17, where ONNX has none. ONNX
Runtime runs these models; ``onnx.checker`` refuses them ("No Op registered for
SimplifiedLayerNormalization with domain_version of 22"), so the check of the pruned model
failed on the input's account. :func:`register` adds their schemas (as ONNX Runtime declares
them, without a shape inference function: the shapes come from ONNX Runtime's symbolic
inference, :mod:`graphprune.io.contrib_shapes`) to ``onnx.defs``, once per process; ONNX's own
schemas are never replaced.
"""

from __future__ import annotations

from onnx import defs

#: op types ONNX Runtime registers in the ONNX domain (since version 1) that ONNX may lack
ORT_ONNX_DOMAIN_OPS = ("SimplifiedLayerNormalization", "LayerNormalization")

_FLOATS = ["tensor(float)", "tensor(float16)", "tensor(double)", "tensor(bfloat16)"]
_registered = False


def _norm_schema(name: str) -> defs.OpSchema:
    """``Y, Mean?, InvStdDev? = op(X, Scale, B?)`` with ``axis``, ``epsilon``, ``stash_type``
    (``SimplifiedLayerNormalization`` has no ``B`` and no ``Mean`` in ONNX Runtime, but an
    optional slot does no harm to a checker)."""
    param = defs.OpSchema.FormalParameter
    optional = defs.OpSchema.FormalParameterOption.Optional
    attr = defs.OpSchema.Attribute
    kinds = defs.OpSchema.AttrType
    inputs = [param("X", "T"), param("scale", "V")]
    outputs = [param("Y", "V")]
    if name == "LayerNormalization":
        inputs.append(param("B", "V", param_option=optional))
        outputs.append(param("Mean", "U", param_option=optional))
    outputs.append(param("InvStdDev", "U", param_option=optional))
    return defs.OpSchema(
        name, "", 1, f"ONNX Runtime's {name} in the ONNX domain (schema added by graphprune)",
        inputs=inputs, outputs=outputs,
        type_constraints=[("T", _FLOATS, ""), ("V", _FLOATS, ""), ("U", ["tensor(float)", "tensor(double)",
                                                                       "tensor(bfloat16)"], "")],
        attributes=[attr("axis", kinds.INT, "", required=False), attr("epsilon", kinds.FLOAT, "", required=False),
                    attr("stash_type", kinds.INT, "", required=False)])


def register() -> None:
    """Add the schemas ONNX lacks (idempotent; ONNX's own are kept)."""
    global _registered
    if _registered:
        return
    _registered = True
    for name in ORT_ONNX_DOMAIN_OPS:
        try:
            if defs.get_schema(name, 1, "").since_version == 1:
                continue  # ONNX has this version already
        except defs.SchemaError:
            pass
        try:
            defs.register_schema(_norm_schema(name))
        except Exception:  # noqa: BLE001 - an onnx without this API keeps refusing these models
            pass
