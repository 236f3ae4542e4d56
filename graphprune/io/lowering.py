"""Standard ONNX for what an input writes otherwise: local functions and fused kernels.

Two ways an ONNX file hides ordinary layers from the rules:

* **Local functions** (``model.functions``: the TorchScript exporter's
  ``export_modules_as_functions``, onnxscript models): a call is a node of an op type no rule
  knows, so every channel group it touched froze ("no rule for Block").
  :func:`inline_functions` inlines the calls (``onnx.inliner``) of every function that has no
  rule of its own; the model computes the same.
* **Fused kernels** of ONNX Runtime's saved optimisations (``FusedConv``, ``FusedGemm``,
  ``FusedMatMul``: :mod:`graphprune.rules.fused`): their rules say how to write them as the
  standard ops (:meth:`~graphprune.rules.registry.OpRule.lowered`), and :func:`lower_fused`
  replaces each by those. ONNX Runtime fuses them again when it loads the pruned model.

The pruned model keeps the lowered form (what the analysis, the rewrite and the verification
saw), with the same inputs and outputs.
"""

from __future__ import annotations

import onnx
import onnx_graphsurgeon as gs

from graphprune.rules import registry

__all__ = ["has_lowered_ops", "inline_functions", "lower_fused"]


def inline_functions(model: onnx.ModelProto, opset: int) -> tuple[onnx.ModelProto, list[str]]:
    """``model`` with the calls of its local functions inlined (a new message), and the names
    of the functions inlined; ``model`` itself when it defines none. A function that has a
    rule (a user's rule for a custom op that the file also defines as a function) stays a
    call: the rule says how it moves channels."""
    if not model.functions:
        return model, []
    from onnx import inliner

    ruled = [(f.domain, f.name) for f in model.functions if registry.lookup(f.domain or "", f.name, opset)]
    names = sorted(f"{f.domain}::{f.name}" if f.domain else f.name for f in model.functions
                   if (f.domain, f.name) not in ruled)
    if not names:
        return model, []
    return inliner.inline_selected_functions(model, ruled, exclude=True), names


def has_lowered_ops(model: onnx.ModelProto, opset: int) -> bool:
    """Whether a main-graph node's rule writes it as standard ops (cheap: nothing imported)."""
    return any(registry.overriding_rule(node.domain or "", node.op_type, opset, "lowered")
               for node in model.graph.node)


def lower_fused(graph: gs.Graph, opset: int, described: dict[str, str] | None = None) -> dict[str, int]:
    """Replace every main-graph node whose rule lowers it by the standard ops (in place, in
    the node's place in the order); returns how many of each op type were lowered, and
    fills ``described`` with what each op type's lowering is (``OpRule.lowered_as``)."""
    done: dict[str, int] = {}
    nodes: list[gs.Node] = []
    kept = {t.name for t in graph.outputs} | _read_in_subgraphs(graph)
    for node in list(graph.nodes):
        rule = registry.overriding_rule(node.domain or "", node.op, opset, "lowered")
        parts = rule.lowered(node, opset) if rule is not None else None
        if parts and _unwritten(node, parts, kept):
            for part in parts:  # a lowering that leaves a read output unwritten is not taken
                part.inputs.clear()
                part.outputs.clear()
            parts = None
        if not parts:
            nodes.append(node)
            continue
        node.inputs.clear()
        node.outputs.clear()
        nodes.extend(parts)
        done[node.op] = done.get(node.op, 0) + 1
        if described is not None:
            described[node.op] = rule.lowered_as
    graph.nodes = nodes
    return done


def _read_in_subgraphs(graph: gs.Graph) -> set[str]:
    """Names that a subgraph (an ``If`` branch, a ``Loop`` body) reads, at any depth."""
    names: set[str] = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    names |= {t.name for n in sub.nodes for t in n.inputs} | _read_in_subgraphs(sub)
    return names


def _unwritten(node: gs.Node, parts: list[gs.Node], kept: set[str]) -> bool:
    """Whether an output of ``node`` that is read (by a node, a subgraph or as a graph
    output) is written by none of ``parts`` (a ``Loop``'s final loop counter)."""
    written = {id(t) for part in parts for t in part.outputs}
    return any(t.name and id(t) not in written and (t.outputs or t.name in kept) for t in node.outputs)
