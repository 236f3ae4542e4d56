"""Operator erasure: remove computation whose result is known without running it.

The zero-invariance analysis (:mod:`graphprune.analysis.zero_analysis`) finds tensors whose every
channel is a known constant for every input ("fully known"): a branch whose last producer
has zero weights, a Conv whose input channels are all zero (its output is its bias), a
``Mul`` by an all-zero tensor, and everything downstream of those until a live input joins
in. At that *frontier* — a consumer that also reads live data — the pass replaces the fully
known tensor, which makes its producing chain dead:

- an operand equal to the op's neutral value (:meth:`OpRule.neutral_operand`: ``Add(x, 0)``,
  ``Sub(x, 0)``, ``Mul(x, 1)``, ``Div(x, 1)``) is bypassed: the op becomes ``x`` (a residual
  branch that is identically zero disappears);
- an operand read with broadcasting (:meth:`OpRule.broadcasts`) becomes a small per-channel
  constant (``[C, 1, 1]``) instead of the branch (a constant gate, a branch reduced to its
  bias);
- other consumers read ``Expand(constant[1, C, 1, 1], shape)``: a Conv with no live input
  channels becomes its bias, broadcast;
- an input of a concatenation (:meth:`OpRule.concat_axis`) with no channels (size 0 on the
  concat axis) is dropped, and a split (:meth:`OpRule.split_axis`) with one live output
  becomes a ``Slice``.

What an op does with an operand is asked of its rule (:mod:`graphprune.rules`); an op whose
rule does not say is left alone.

Then dead code is removed, and the whole repeats to a fixed point. Every rewrite is exact
(equal outputs for every finite input). A second run finds nothing: the replacements are
constants or ``Expand`` of constants, which are never rewritten again.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs
from graphprune.passes.base import Pass, PassContext, PassResult

from graphprune.analysis.constants import ChannelValues, ConstantContext
from graphprune.analysis.zero_analysis import analyze_constants, ensure_shapes
from graphprune.io.graph_edits import redirect_uses
from graphprune.io.names import fresh_name
from graphprune.io.order import toposort_model
from graphprune.rules import registry


def _static(shape: Any) -> list[int] | None:
    if shape is None or any(not isinstance(d, int) or d < 0 for d in shape):
        return None
    return [int(d) for d in shape]


def _dims(shape: Any) -> list[int | str] | None:
    """Shape as comparable tokens: ints and named symbolic dims (``None`` if any is unnamed)."""
    if shape is None:
        return None
    dims: list[int | str] = []
    for d in shape:
        if isinstance(d, int) and d >= 0:
            dims.append(d)
        elif isinstance(d, str) and d:
            dims.append(d)
        else:
            return None
    return dims


def _broadcast(shapes: list[list[int | str]]) -> list[int | str] | None:
    """Numpy broadcasting over int and symbolic dims (a symbol only matches itself or 1)."""
    rank = max(len(s) for s in shapes)
    out: list[int | str] = []
    for k in range(rank):
        dims = {s[len(s) - rank + k] for s in shapes if len(s) - rank + k >= 0} - {1}
        if len(dims) > 1:
            return None
        out.append(dims.pop() if dims else 1)
    return out


def _is_canonical(tensor: gs.Tensor) -> bool:
    """A constant already materialised by this pass: ``Expand(Constant, Constant)``."""
    producers = tensor.inputs
    return bool(producers) and producers[0].op == "Expand" and all(
        isinstance(t, gs.Constant) for t in producers[0].inputs
    )


def _live(graph: gs.Graph) -> set[str]:
    """Names of tensors that depend on a graph input."""
    live = {t.name for t in graph.inputs}
    for node in graph.nodes:  # topologically sorted
        if any(t.name in live for t in node.inputs):
            live.update(o.name for o in node.outputs)
    return live


class EraseOperatorsPass(Pass):
    """Erase operators and branches whose contribution is identically known (see module doc)."""

    def __init__(self, *, keep: Iterable[str] = (), max_iterations: int = 100) -> None:
        #: node or tensor names that must survive: their outputs count as graph outputs
        self.keep = tuple(keep)
        self.max_iterations = max_iterations

    def __repr__(self) -> str:
        return f"EraseOperatorsPass(keep={list(self.keep)})" if self.keep else "EraseOperatorsPass()"

    def run(self, graph: gs.Graph, ctx: PassContext) -> PassResult:
        stats: dict[str, Any] = {
            "bypassed": 0, "constant_operands": 0, "expanded": 0, "concat_inputs_dropped": 0,
            "splits_sliced": 0,
        }
        before = {id(n): n.name for n in graph.nodes}
        self._opset = ctx.opset
        self._names = set(graph.tensors()) | {n.name for n in graph.nodes}
        modified = self._run(graph, ctx, stats)
        after = {id(n) for n in graph.nodes}
        erased = [name for key, name in before.items() if key not in after]
        stats["nodes_erased"] = len(erased)
        stats["erased"] = erased
        return PassResult(graph, modified, stats)

    def _rule(self, node: gs.Node) -> registry.OpRule | None:
        return registry.lookup(node.domain or "", node.op, self._opset)

    def _protected(self, graph: gs.Graph) -> set[str]:
        """Tensors downstream of a kept node or tensor: replacing them could erase it."""
        if not self.keep:
            return set()
        keep = set(self.keep)
        protected = set(keep)
        for node in graph.nodes:  # topologically sorted
            if node.name in keep or any(t.name in protected for t in node.inputs):
                protected.update(o.name for o in node.outputs)
        return protected

    def _run(self, graph: gs.Graph, ctx: PassContext, stats: dict[str, Any]) -> bool:
        modified = False
        for _ in range(self.max_iterations):
            changed = self._drop_empty_concat_inputs(graph, stats)
            ensure_shapes(graph, ctx.opset)
            changed |= self._split_to_slice(graph, ctx.opset, stats)
            constants = analyze_constants(graph, ctx.opset)
            changed |= self._rewrite_frontier(graph, constants, stats)
            if not changed:
                break
            modified = True
            toposort_model(graph.cleanup(remove_unused_graph_inputs=False))
        return modified

    # ------------------------------------------------------------------ rewrites
    def _drop_empty_concat_inputs(self, graph: gs.Graph, stats: dict[str, Any]) -> bool:
        changed = False
        for node in graph.nodes:
            rule = self._rule(node)
            axis = rule.concat_axis(node) if rule is not None else None
            if axis is None or len(node.inputs) < 2:
                continue
            keep = []
            for t in node.inputs:
                shape = ConstantContext.shape(t)
                empty = shape is not None and -len(shape) <= axis < len(shape) and shape[axis] == 0
                if not empty:
                    keep.append(t)
            if keep and len(keep) < len(node.inputs):
                stats["concat_inputs_dropped"] += len(node.inputs) - len(keep)
                node.inputs.clear()
                node.inputs.extend(keep)
                changed = True
        return changed

    def _split_to_slice(self, graph: gs.Graph, opset: int, stats: dict[str, Any]) -> bool:
        """A Split with one live output is a Slice (its dead outputs' channels become free)."""
        outputs = {t.name for t in graph.outputs}
        changed = False
        for node in graph.nodes:
            rule = self._rule(node)
            split_axis = rule.split_axis(node) if rule is not None else None
            if split_axis is None or len(node.outputs) < 2 or opset < 10:
                continue
            used = [k for k, o in enumerate(node.outputs) if o.outputs or o.name in outputs]
            if len(used) != 1:
                continue
            shape = ConstantContext.shape(node.inputs[0])
            if shape is None:
                continue
            axis = split_axis % len(shape)
            out_shapes = [ConstantContext.shape(o) for o in node.outputs]
            sizes = [None if s is None or len(s) <= axis else s[axis] for s in out_shapes]
            if any(n is None for n in sizes):
                continue
            start = int(sum(sizes[: used[0]]))  # type: ignore[arg-type]
            end = start + int(sizes[used[0]])  # type: ignore[arg-type]
            data, kept = node.inputs[0], node.outputs[used[0]]
            consts = [
                gs.Constant(self._fresh(f"{node.name or 'split'}_gp_{what}"), np.array([v], dtype=np.int64))
                for what, v in (("starts", start), ("ends", end), ("axes", axis))
            ]
            node.op = "Slice"
            node.attrs.clear()
            node.inputs.clear()
            node.inputs.extend([data, *consts])
            node.outputs.clear()
            node.outputs.append(kept)
            stats["splits_sliced"] += 1
            changed = True
        return changed

    def _rewrite_frontier(self, graph: gs.Graph, constants: ConstantContext, stats: dict[str, Any]) -> bool:
        outputs = {t.name for t in graph.outputs}
        live = _live(graph)
        known = {name for name, s in constants.states.items() if s.fully_known}
        if not known:
            return False
        expanded: dict[str, gs.Variable] = {}
        changed = False
        protected = self._protected(graph)
        known -= protected
        for tensor in list(graph.outputs):
            if self._materialise_output(graph, tensor, known, live, constants):
                stats["expanded"] += 1
                changed = True
        for node in list(graph.nodes):
            if not any(t.name in known for t in node.inputs):
                continue
            if not any(o.outputs or o.name in outputs for o in node.outputs):
                continue  # dead already
            if all(o.name in known and o.name not in outputs for o in node.outputs if o.name):
                continue  # inside a constant chain: the frontier is further down
            for index, tensor in enumerate(list(node.inputs)):
                if (
                    tensor.name not in known or tensor.name not in live or tensor.name in outputs
                    or not isinstance(tensor, gs.Variable) or _is_canonical(tensor)
                    or node.inputs[index] is not tensor
                ):
                    continue
                state = constants.states[tensor.name]
                dtype = np.dtype(tensor.dtype) if tensor.dtype is not None else None
                if dtype is None or dtype.kind != "f":
                    continue
                if self._bypass(graph, node, index, state, outputs):
                    stats["bypassed"] += 1
                    changed = True
                    break  # the node is gone
                if self._constant_operand(node, index, tensor, state, dtype):
                    stats["constant_operands"] += 1
                    changed = True
                    continue
                replacement = expanded.get(tensor.name) or self._expand(graph, tensor, state, dtype)
                if replacement is None:
                    continue
                expanded[tensor.name] = replacement
                for k, t in enumerate(node.inputs):
                    if t is tensor:
                        node.inputs[k] = replacement
                stats["expanded"] += 1
                changed = True
        return changed

    def _materialise_output(
        self, graph: gs.Graph, tensor: gs.Tensor, known: set[str], live: set[str],
        constants: ConstantContext,
    ) -> bool:
        """A graph output that is fully known is computed by ``Expand`` of a constant."""
        if (
            tensor.name not in known or tensor.name not in live or not isinstance(tensor, gs.Variable)
            or not tensor.inputs or _is_canonical(tensor) or _static(tensor.shape) is None
            or tensor.dtype is None or np.dtype(tensor.dtype).kind != "f"
        ):
            return False
        state = constants.states[tensor.name]
        dtype = np.dtype(tensor.dtype)
        producer = tensor.inputs[0]
        slot = next(k for k, o in enumerate(producer.outputs) if o is tensor)
        producer.outputs[slot] = gs.Variable(self._fresh(f"{tensor.name}_gp_dead"), dtype=dtype, shape=tensor.shape)
        shape = _static(tensor.shape) or []
        target = list(shape)
        target[state.axis] = 1
        small = self._small(tensor, state, dtype, len(shape))
        shape_const = gs.Constant(self._fresh(f"{tensor.name}_gp_shape"), np.array(target, dtype=np.int64))
        graph.nodes.append(
            gs.Node("Expand", name=self._fresh(f"{tensor.name}_gp_expand"),
                    inputs=[small, shape_const], outputs=[tensor])
        )
        return True

    def _bypass(
        self, graph: gs.Graph, node: gs.Node, index: int, state: ChannelValues, outputs: set[str]
    ) -> bool:
        """``Add(x, 0)``, ``Sub(x, 0)``, ``Mul(x, 1)``, ``Div(x, 1)`` -> ``x``."""
        if len(node.inputs) != 2 or len(node.outputs) != 1:
            return False
        rule = self._rule(node)
        neutral = rule.neutral_operand(node, index) if rule is not None else None
        if neutral is None or state.uniform() != neutral:
            return False
        other, y = node.inputs[1 - index], node.outputs[0]
        if _dims(other.shape) is None or _dims(other.shape) != _dims(y.shape):
            return False
        if other.dtype is not None and y.dtype is not None and np.dtype(other.dtype) != np.dtype(y.dtype):
            return False
        if y.name in outputs:
            node.op = "Identity"
            node.attrs.clear()
            node.inputs.clear()
            node.inputs.extend([other])
            return True
        redirect_uses(y, other)
        node.inputs.clear()
        node.outputs.clear()
        return True

    def _fresh(self, base: str) -> str:
        return fresh_name(base, self._names)

    def _small(self, tensor: gs.Tensor, state: ChannelValues, dtype: np.dtype, rank: int) -> gs.Constant:
        shape = [1] * rank
        shape[state.axis] = state.values.size
        values = state.values.astype(dtype).reshape(shape)
        return gs.Constant(self._fresh(f"{tensor.name}_gp_value"), np.ascontiguousarray(values))

    def _constant_operand(
        self, node: gs.Node, index: int, tensor: gs.Variable, state: ChannelValues, dtype: np.dtype
    ) -> bool:
        """A broadcasting op reads ``[C, 1, 1]`` instead of the constant branch."""
        rule = self._rule(node)
        if rule is None or not rule.broadcasts(node, index):
            return False
        out_shape = _dims(node.outputs[0].shape)
        shape = _dims(tensor.shape)
        if out_shape is None or shape is None:
            return False
        others = [_dims(t.shape) for k, t in enumerate(node.inputs) if k != index and t.name]
        if not others or any(s is None for s in others) or _broadcast(others) != out_shape:  # type: ignore[arg-type]
            return False
        node.inputs[index] = self._small(tensor, state, dtype, len(shape))
        return True

    def _expand(
        self, graph: gs.Graph, tensor: gs.Variable, state: ChannelValues, dtype: np.dtype
    ) -> gs.Variable | None:
        """``Expand(constant[1, C, 1, 1], shape)``, equal to ``tensor`` for every input."""
        shape = _static(tensor.shape)
        if shape is None:
            return None
        small = self._small(tensor, state, dtype, len(shape))
        target = list(shape)
        target[state.axis] = 1  # the channel count lives in the constant only
        shape_const = gs.Constant(self._fresh(f"{tensor.name}_gp_shape"), np.array(target, dtype=np.int64))
        out = gs.Variable(self._fresh(f"{tensor.name}_gp_expanded"), dtype=dtype, shape=shape)
        graph.nodes.append(
            gs.Node("Expand", name=self._fresh(f"{tensor.name}_gp_expand"),
                    inputs=[small, shape_const], outputs=[out])
        )
        return out
