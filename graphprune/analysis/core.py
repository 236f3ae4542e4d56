"""Dependency analysis: which tensor dimensions must lose the same channels.

The graph is an ``nx.Graph`` whose nodes are *dimensions* ``(tensor name, axis)``. Op rules
(:mod:`graphprune.rules`) add edges between the dimensions an op couples, each carrying an
index map. A *channel group* is a connected component that contains at least one parameter
dimension. Inside a group, the index maps are expanded to element level and unioned: each
resulting equivalence class is a *unit*, the smallest set of elements (across every member
tensor) that can be removed together. For a plain group a unit is one channel; a Concat
group's unit is one channel of one input; a grouped conv's unit is one conv group; a head
is one unit once attention is understood.

Fail closed: a node without a rule, a rule that raises, an index map that does not fit the
shapes, an unknown size, a graph input or output, a protected (``keep``) tensor — each
freezes the dimensions it touches, with a reason naming the node.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune import rules as _builtin_rules  # noqa: F401  (registers built-ins)
from graphprune.analysis.index_maps import IDENTITY, Digit, IndexMap
from graphprune.rules import registry
from graphprune.io.tensors import const_value, static_shape, static_size

Dim = tuple[str, int]

from graphprune.analysis.roles import CHANNELWISE, CONSUMER, PRODUCER  # noqa: E402,F401


def describe_node(node: gs.Node) -> str:
    return f"{node.op} '{node.name}'"


@dataclass(frozen=True)
class ShapeElement:
    """Element ``element`` of input ``input_index`` of ``node`` must equal the size of ``dim``."""

    node_name: str
    input_index: int
    element: int
    dim: Dim


@dataclass(frozen=True)
class Coupling:
    a: Dim
    b: Dim
    imap: IndexMap
    exact: bool
    node: str


@dataclass
class ChannelGroup:
    """A connected component of coupled dimensions that carries parameters."""

    id: int
    dims: list[Dim]
    sizes: dict[Dim, int | None]
    params: list[Dim]
    roles: dict[Dim, str]
    nodes: list[str]
    frozen: list[str] = field(default_factory=list)
    inexact: list[str] = field(default_factory=list)
    shape_elements: list[ShapeElement] = field(default_factory=list)
    #: per member dimension: the unit id of each of its elements
    unit_of: dict[Dim, np.ndarray] = field(default_factory=dict)
    num_units: int = 0

    @property
    def is_frozen(self) -> bool:
        return bool(self.frozen)

    @property
    def is_exact(self) -> bool:
        return not self.inexact

    @property
    def producers(self) -> list[Dim]:
        return [d for d in self.params if self.roles.get(d) == PRODUCER]

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.num_units >= 2 and bool(self.producers)

    @property
    def anchor(self) -> Dim:
        """A stable member that names the group (first producer parameter, else first param)."""
        return (self.producers or self.params or self.dims)[0]

    def removed_elements(self, units: Iterable[int]) -> dict[Dim, np.ndarray]:
        """Map removed unit ids to the element indices each member loses."""
        units = np.asarray(sorted(set(units)), dtype=np.int64)
        out: dict[Dim, np.ndarray] = {}
        for dim, labels in self.unit_of.items():
            idx = np.nonzero(np.isin(labels, units))[0]
            if idx.size:
                out[dim] = idx
        return out

    def units_of_elements(self, dim: Dim, elements: Iterable[int]) -> list[int]:
        labels = self.unit_of[dim]
        return sorted({int(labels[i]) for i in elements})

    def summary(self) -> dict[str, object]:
        return {
            "id": self.id,
            "anchor": f"{self.anchor[0]}:{self.anchor[1]}",
            "size": self.num_units,
            "channels": self.sizes.get(self.anchor),
            "members": len(self.dims),
            "params": len(self.params),
            "ops": sorted({n for n in self.nodes})[:50],
            "num_ops": len(set(self.nodes)),
            "prunable": self.prunable,
            "frozen": self.frozen[:10],
            "inexact": self.inexact[:10],
        }


class CouplingContext:
    """What an op rule sees and calls while it describes one node."""

    def __init__(self, graph: gs.Graph, opset: int) -> None:
        self.graph = graph
        self.opset = opset
        self.tensors: dict[str, gs.Tensor] = graph.tensors()
        self.dim_graph = nx.Graph()
        self.couplings: list[Coupling] = []
        self.dim_freeze: dict[Dim, list[str]] = defaultdict(list)
        self.tensor_freeze: dict[str, list[str]] = defaultdict(list)
        self.dim_inexact: dict[Dim, list[str]] = defaultdict(list)
        self.roles: dict[Dim, str] = {}
        self.spatial_dims: set[Dim] = set()
        self.shape_elements: list[ShapeElement] = []
        self.node: gs.Node | None = None
        self.options: dict[str, object] = {}
        #: tensor name -> its shape in two shape-inference probes with concrete input sizes
        self.probes: dict[str, tuple[list, list]] = {}
        self.head_dims: set[Dim] = set()
        self._component_facts: dict[Dim, frozenset[str]] | None = None
        self._spatial_components: set[Dim] | None = None

    # ------------------------------------------------------------------ queries
    shape = staticmethod(static_shape)
    size = staticmethod(static_size)
    const = staticmethod(const_value)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    @staticmethod
    def is_param(tensor: gs.Tensor) -> bool:
        return isinstance(tensor, gs.Constant)

    def where(self) -> str:
        return describe_node(self.node) if self.node is not None else "graph"

    # ------------------------------------------------------------------ couplings
    def _dim(self, tensor: gs.Tensor, axis: int) -> Dim | None:
        rank = self.rank(tensor)
        if rank is None:
            self.freeze(tensor, None, f"rank of '{tensor.name}' unknown at {self.where()}")
            return None
        if not -rank <= axis < rank:
            self.freeze(tensor, None, f"axis {axis} outside rank {rank} at {self.where()}")
            return None
        return (tensor.name, axis % rank)

    def couple(
        self,
        a: gs.Tensor,
        axis_a: int,
        b: gs.Tensor,
        axis_b: int,
        imap: IndexMap = IDENTITY,
        *,
        exact: bool = True,
    ) -> None:
        """Dimension ``(a, axis_a)`` and ``(b, axis_b)`` lose channels together via ``imap``."""
        if a is None or b is None or a.name == "" or b.name == "":
            return
        da, db = self._dim(a, axis_a), self._dim(b, axis_b)
        if da is None or db is None:
            return
        na, nb = self.size(a, axis_a), self.size(b, axis_b)
        self.dim_graph.add_edge(da, db)
        node_name = self.node.name if self.node is not None else ""
        self.couplings.append(Coupling(da, db, imap, exact, node_name))
        if na is None or nb is None:
            reason = f"size of a coupled axis unknown at {self.where()}"
            self.dim_freeze[da].append(reason)
            self.dim_freeze[db].append(reason)
            return
        problem = imap.check(na, nb)
        if problem is not None:
            reason = f"{problem} at {self.where()}"
            self.dim_freeze[da].append(reason)
            self.dim_freeze[db].append(reason)

    def couple_all_axes(self, a: gs.Tensor, b: gs.Tensor, *, exact_axes: bool = True) -> None:
        """Elementwise pass-through: every axis of ``a`` with the same axis of ``b``."""
        ra, rb = self.rank(a), self.rank(b)
        if ra is None or rb is None or ra != rb:
            self.freeze(a, None, f"rank unknown or changed at {self.where()}")
            self.freeze(b, None, f"rank unknown or changed at {self.where()}")
            return
        for axis in range(ra):
            self.couple(a, axis, b, axis, exact=exact_axes)

    def couple_broadcast(self, inputs: list[gs.Tensor], output: gs.Tensor) -> None:
        """Numpy-style broadcasting: each input axis equal to the output axis is coupled."""
        out_shape = self.shape(output)
        if out_shape is None:
            for t in [*inputs, output]:
                self.freeze(t, None, f"shape unknown at {self.where()}")
            return
        rank = len(out_shape)
        for t in inputs:
            if t is None or t.name == "":
                continue
            shape = self.shape(t)
            if shape is None:
                self.freeze(t, None, f"shape unknown at {self.where()}")
                self.freeze(output, None, f"input shape unknown at {self.where()}")
                continue
            lead = rank - len(shape)
            for axis, n in enumerate(shape):
                o = axis + lead
                if n == 1 and out_shape[o] != 1:
                    continue  # broadcast: the size-1 axis stays valid
                if n is None or out_shape[o] is None:
                    if n is None and out_shape[o] is None and isinstance(t, gs.Variable):
                        self.couple(t, axis, output, o)
                    else:
                        self.freeze(t, axis, f"cannot tell broadcasting at {self.where()}")
                        self.freeze(output, o, f"cannot tell broadcasting at {self.where()}")
                    continue
                self.couple(t, axis, output, o)
                if isinstance(t, gs.Constant):
                    self.role(t, axis, CHANNELWISE)

    def role(self, tensor: gs.Tensor, axis: int, role: str) -> None:
        dim = self._dim(tensor, axis)
        if dim is not None and isinstance(tensor, gs.Constant):
            self.roles.setdefault(dim, role)

    def freeze(self, tensor: gs.Tensor | None, axis: int | None, reason: str) -> None:
        """Never prune ``axis`` of ``tensor`` (all axes when ``axis`` is None)."""
        if tensor is None or tensor.name == "":
            return
        if axis is None:
            self.tensor_freeze[tensor.name].append(reason)
            return
        rank = self.rank(tensor)
        if rank is None:
            self.tensor_freeze[tensor.name].append(reason)
            return
        dim = (tensor.name, axis % rank)
        self.dim_graph.add_node(dim)
        self.dim_freeze[dim].append(reason)

    def freeze_node(self, node: gs.Node, reason: str) -> None:
        for t in [*node.inputs, *node.outputs]:
            self.freeze(t, None, reason)

    def inexact(self, tensor: gs.Tensor, axis: int, reason: str) -> None:
        """Pruning this axis is allowed but is not equivalent to zeroing the channels."""
        dim = self._dim(tensor, axis)
        if dim is not None:
            self.dim_graph.add_node(dim)
            self.dim_inexact[dim].append(f"{reason} at {self.where()}")

    def spatial(self, tensor: gs.Tensor, axes: Iterable[int], what: str = "spatial") -> None:
        """Mark axes that are never channels (batch, spatial); they are frozen."""
        rank = self.rank(tensor)
        if rank is None:
            return
        for axis in axes:
            if -rank <= axis < rank:
                dim = (tensor.name, axis % rank)
                self.dim_graph.add_node(dim)
                self.spatial_dims.add(dim)
                self.dim_freeze[dim].append(f"{what} axis")

    def is_spatial(self, tensor: gs.Tensor, axis: int) -> bool:
        """Phase 2 only: does this dimension belong to a spatial/batch component?"""
        rank = self.rank(tensor)
        if rank is None:
            return False
        dim = (tensor.name, axis % rank)
        if self._spatial_components is None:
            return dim in self.spatial_dims
        return dim in self._spatial_components

    def mark_head(self, tensor: gs.Tensor, axis: int) -> None:
        """``axis`` of ``tensor`` counts attention heads (a batch axis of an attention product)."""
        dim = self._dim(tensor, axis)
        if dim is not None:
            self.dim_graph.add_node(dim)
            self.head_dims.add(dim)

    def component_facts(self, tensor: gs.Tensor, axis: int) -> frozenset[str]:
        """Phase 2 only: ``"head"`` / ``"frozen"`` when the dimension's phase-1 component
        holds an attention head axis / a frozen dimension. Reshape rules use it to pick the
        factor of a split axis that carries channels (heads, not the q/k/v index)."""
        rank = self.rank(tensor)
        if rank is None or self._component_facts is None:
            return frozenset()
        return self._component_facts.get((tensor.name, axis % rank), frozenset())

    def _freeze_spatial_snapshot(self) -> None:
        spatial: set[Dim] = set()
        for comp in nx.connected_components(self.dim_graph):
            if comp & self.spatial_dims:
                spatial |= comp
        self._spatial_components = spatial
        self._component_facts = self._facts_preview()

    def _facts_preview(self) -> dict[Dim, frozenset[str]]:
        """Head/frozen facts per phase-1 component, previewing the scalar Gathers of phase 2
        (``qkv[0]`` selects q: the selected axis is frozen, the others pass through)."""
        preview = self.dim_graph.copy()
        selected: set[Dim] = set()
        for node in self.graph.nodes:
            if node.op != "Gather" or not isinstance(node.inputs[1], gs.Constant):
                continue
            data, y = node.inputs[0], node.outputs[0]
            rank = self.rank(data)
            if rank is None or np.ndim(node.inputs[1].values) != 0 or self.rank(y) != rank - 1:
                continue
            axis = int(node.attrs.get("axis", 0)) % rank
            selected.add((data.name, axis))
            for a in range(rank):
                if a != axis:
                    preview.add_edge((data.name, a), (y.name, a if a < axis else a - 1))
        facts: dict[Dim, frozenset[str]] = {}
        for comp in nx.connected_components(preview):
            found = set()
            if comp & self.head_dims:
                found.add("head")
            if comp & selected or any(
                self.dim_freeze.get(d) or self.tensor_freeze.get(d[0]) for d in comp
            ):
                found.add("frozen")
            if found:
                facts.update(dict.fromkeys(comp, frozenset(found)))
        return facts

    # ------------------------------------------------------------------ shape tensors
    def trace_shape(self, tensor: gs.Tensor, depth: int = 0) -> list[tuple] | None:
        """Element sources of a 1-D int shape tensor.

        Each element is ``("const", node_name, input_index, element, value)`` for a literal
        in a constant input of ``node_name``, ``("dim", tensor_name, axis)`` for a
        ``Shape`` read, or ``("unknown",)``. Returns ``None`` when the length is unknown.
        """
        if depth > 32:
            return None
        if isinstance(tensor, gs.Constant):
            return None  # only reached through a consumer; handled by _trace_input
        producers = tensor.inputs
        if not producers:
            return None
        node = producers[0]
        op = node.op

        def inp(i: int) -> list[tuple] | None:
            if i >= len(node.inputs):
                return None
            t = node.inputs[i]
            if isinstance(t, gs.Constant):
                values = np.asarray(t.values).reshape(-1)
                return [("const", node.name, i, k, int(v)) for k, v in enumerate(values)]
            return self.trace_shape(t, depth + 1)

        if op == "Shape":
            src = node.inputs[0]
            rank = self.rank(src)
            if rank is None:
                return None
            start = int(node.attrs.get("start", 0))
            end = node.attrs.get("end", rank)
            start, end = _clamp(start, rank), _clamp(int(end), rank)
            return [("dim", src.name, a) for a in range(start, end)]
        if op in ("Identity", "Cast"):
            return inp(0)
        if op == "Concat":
            parts = [inp(i) for i in range(len(node.inputs))]
            if any(p is None for p in parts):
                return None
            return [e for p in parts for e in p]  # type: ignore[union-attr]
        if op in ("Unsqueeze", "Squeeze"):
            return inp(0)
        if op == "Gather":
            data = inp(0)
            idx = self.const(node.inputs[1])
            if data is None or idx is None or int(node.attrs.get("axis", 0)) != 0:
                return None
            flat = np.asarray(idx).reshape(-1)
            return [data[int(i)] if -len(data) <= int(i) < len(data) else ("unknown",)
                    for i in flat]
        if op == "Slice":
            data = inp(0)
            starts, ends = self.const(node.inputs[1]), self.const(node.inputs[2])
            steps = self.const(node.inputs[4]) if len(node.inputs) > 4 else None
            if data is None or starts is None or ends is None:
                return None
            step = int(steps.reshape(-1)[0]) if steps is not None else 1
            return data[slice(int(starts.reshape(-1)[0]), int(ends.reshape(-1)[0]), step)]
        if op == "Reshape" and self.rank(tensor) == 1:  # a 1-D shape re-viewed as 1-D
            return inp(0)
        if op == "Where":
            where = self._trace_where_minus_one(node, inp)
            if where is not None:
                return where
        if op == "Mul":
            scaled = self._trace_scaled(node, inp)
            if scaled is not None:
                return scaled
        # arithmetic on shapes (Mul, Add, Div ...): elementwise; keep the length, lose values
        if self.rank(tensor) == 0:
            return [("unknown",)]
        rank = self.size(tensor, 0)
        if rank is None:
            return None
        return [("unknown",)] * rank

    def _trace_scaled(self, node: gs.Node, inp) -> list[tuple] | None:
        """``Shape`` reads times a constant (``num_kv_heads * n_rep``): ``("scaled", tensor,
        axis, factor)`` elements; the product follows the read size when heads are pruned."""
        for data_index in (0, 1):
            factor = self.const(node.inputs[1 - data_index])
            data = inp(data_index)
            if factor is None or data is None or factor.size not in (1, len(data)):
                continue
            factors = np.broadcast_to(factor.reshape(-1), (len(data),))
            out: list[tuple] = []
            for element, f in zip(data, factors, strict=True):
                if element[0] == "dim" and int(f) == f and f >= 1:
                    out.append(("scaled", element[1], element[2], int(f)))
                elif element[0] == "scaled" and int(f) == f and f >= 1:
                    out.append(("scaled", element[1], element[2], element[3] * int(f)))
                else:
                    out.append(("unknown",))
            return out
        return None

    def _trace_where_minus_one(self, node: gs.Node, inp) -> list[tuple] | None:
        """TorchScript's Expand idiom ``Where(Equal(shape, -1), ones, shape)``: each element
        is ``ones[k]`` where ``shape[k]`` is the literal -1, ``shape[k]`` otherwise."""
        cond, shape = node.inputs[0], node.inputs[2]
        equal = cond.inputs[0] if cond.inputs else None
        if equal is None or equal.op != "Equal" or equal.inputs[0] is not shape:
            return None
        probe = self.const(equal.inputs[1])
        a, b = inp(1), inp(2)
        if probe is None or a is None or b is None or len(a) != len(b):
            return None
        probe = np.broadcast_to(probe.reshape(-1), (len(b),))
        out: list[tuple] = []
        for k, element in enumerate(b):
            value = int(probe[k])
            if element[0] == "const":
                out.append(a[k] if element[4] == value else element)
            elif element[0] == "dim" and value < 0:
                out.append(element)  # a size is never negative
            else:
                out.append(("unknown",))
        return out

    def track_shape(
        self,
        node: gs.Node,
        input_index: int,
        dims: list[tuple[gs.Tensor, int] | None],
        *,
        special_zero: bool = True,
    ) -> None:
        """Element ``k`` of ``node.inputs[input_index]`` gives the size of ``dims[k]``.

        Literal elements are recorded so the rewrite writes the new size; elements read
        through ``Shape`` couple their source dimension; unknown elements freeze the
        dimension. ``None`` entries (and -1/0 literals) are not tracked.
        """
        t = node.inputs[input_index]
        if isinstance(t, gs.Constant):
            values = np.asarray(t.values).reshape(-1)
            elements: list[tuple] | None = [
                ("const", node.name, input_index, k, int(v)) for k, v in enumerate(values)
            ]
        else:
            elements = self.trace_shape(t)
        if elements is None or len(elements) != len(dims):
            for entry in dims:
                if entry is not None:
                    self.freeze(entry[0], entry[1], f"shape input not understood at {self.where()}")
            return
        for element, entry in zip(elements, dims, strict=True):
            if entry is None:
                continue
            tensor, axis = entry
            rank = self.rank(tensor)
            if rank is None:
                continue
            dim = (tensor.name, axis % rank)
            if element[0] == "const":
                value = element[4]
                if value == -1 or (value == 0 and special_zero):
                    continue
                self.shape_elements.append(ShapeElement(element[1], element[2], element[3], dim))
                self.dim_graph.add_node(dim)
            elif element[0] == "dim":
                src = self.tensors.get(element[1])
                if src is not None:
                    self.couple(src, element[2], tensor, axis)
            elif element[0] == "scaled":
                # size(tensor, axis) = size(src) * factor: each source index owns ``factor``
                # consecutive indices (repeat_kv: KV head k serves query heads k*n .. k*n+n-1)
                src = self.tensors.get(element[1])
                if src is not None:
                    self.couple(src, element[2], tensor, axis, Digit(element[3]))
            else:
                self.freeze(tensor, axis, f"shape element computed by arithmetic at {self.where()}")


def _clamp(value: int, rank: int) -> int:
    if value < 0:
        value += rank
    return max(0, min(rank, value))


@dataclass
class Analysis:
    """The result of :func:`analyze_graph`."""

    graph: gs.Graph
    opset: int
    groups: list[ChannelGroup]
    unsupported: dict[str, list[str]]
    context: CouplingContext

    def group_of(self, dim: Dim) -> ChannelGroup | None:
        for group in self.groups:
            if dim in group.unit_of or dim in group.sizes:
                return group
        return None

    @property
    def prunable_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.prunable]

    @property
    def frozen_groups(self) -> list[ChannelGroup]:
        return [g for g in self.groups if g.is_frozen]

    def summary(self) -> dict[str, object]:
        return {
            "groups": len(self.groups),
            "prunable": len(self.prunable_groups),
            "frozen": len(self.frozen_groups),
            "inexact": sum(1 for g in self.groups if g.prunable and not g.is_exact),
            "unsupported_ops": {k: len(v) for k, v in sorted(self.unsupported.items())},
        }


def _subgraph_outer_names(node: gs.Node, outer: dict[str, gs.Tensor]) -> set[str]:
    names: set[str] = set()
    for value in node.attrs.values():
        graphs = value if isinstance(value, list) else [value]
        for sub in graphs:
            if isinstance(sub, gs.Graph):
                for sub_node in sub.nodes:
                    for t in sub_node.inputs:
                        if t.name in outer:
                            names.add(t.name)
                    names |= _subgraph_outer_names(sub_node, outer)
    return names


#: constants with more elements than this are replaced by typed inputs for shape probing
_PROBE_CONST_LIMIT = 4096


def _probe_shapes(model: onnx.ModelProto, sizes: dict[tuple[str, int], int]) -> dict[str, list]:
    """Shapes ONNX inference finds when graph input axis ``(name, axis)`` has ``sizes[...]``."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.input:
        dims = value.type.tensor_type.shape.dim
        for axis, dim in enumerate(dims):
            if (value.name, axis) in sizes:
                dim.Clear()
                dim.dim_value = sizes[(value.name, axis)]
    shapes: dict[str, list] = {}
    if any(n.domain == "com.microsoft" for n in probe.graph.node):
        contrib = _contrib_shapes(probe)
        if contrib is not None:
            return contrib
    for _ in range(12):  # infer, fold the shape computations that became constant, repeat
        inferred = onnx.shape_inference.infer_shapes(
            probe, check_type=False, strict_mode=False, data_prop=True
        )
        # later rounds know more; tensors that folding removed keep their earlier shapes
        for value in [*inferred.graph.value_info, *inferred.graph.output]:
            t = value.type.tensor_type
            if t.HasField("shape"):
                shapes[value.name] = [
                    d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
                ]
        folded = gs.import_onnx(inferred)
        count = len(folded.nodes)
        folded.fold_constants(fold_shapes=True, size_threshold=_PROBE_CONST_LIMIT)
        folded.cleanup(remove_unused_graph_inputs=False)
        if len(folded.nodes) == count:
            break
        probe = gs.export_onnx(folded, do_type_check=False)
    return shapes


def _contrib_shapes(model: onnx.ModelProto) -> dict[str, list] | None:
    """Shapes of a graph with com.microsoft ops (which ONNX inference does not know), from
    ONNX Runtime's symbolic shape inference when it is available (it needs sympy)."""
    try:
        from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

        # its ``infer_shapes`` writes a file into the working directory when some shape
        # stays unknown; run its loop directly and keep the partial result instead
        engine = SymbolicShapeInference(2**31 - 1, True, False, 0)
        engine._preprocess(model)
        while engine.run_:
            engine._infer_impl()
        engine._update_output_from_vi()
        inferred = engine.out_mp_
    except Exception:  # optional (it needs sympy): fused graphs keep their unknown sizes
        return None
    shapes: dict[str, list] = {}
    for value in [*inferred.graph.value_info, *inferred.graph.output]:
        t = value.type.tensor_type
        if t.HasField("shape"):
            shapes[value.name] = [
                d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim
            ]
    return shapes


def refine_shapes(graph: gs.Graph) -> dict[str, tuple[list, list]]:
    """Fill in dimensions that ONNX inference leaves symbolic but that do not depend on inputs.

    Symbolic input sizes hide static sizes downstream: a Reshape to ``[B, S, -1, D]`` (the head
    count computed from ``H*D / D``), or a broadcast between two unrelated symbols. Shapes are
    inferred twice with concrete sizes for every symbolic input axis; an axis with the same
    size in both probes is static and gets that size (with static inputs, one probe fills in
    sizes hidden behind computed shapes). Returns both probes per tensor name
    (rules use them to match re-factored dynamic axes). Nothing changes when inference fails.
    """
    symbolic = [
        (t.name, axis)
        for t in graph.inputs
        for axis, d in enumerate(t.shape or [])
        if not (isinstance(d, int) and d >= 0)
    ]
    if not symbolic and all(
        t.shape is not None and all(isinstance(d, int) and d >= 0 for d in t.shape)
        for t in graph.tensors().values()
        if isinstance(t, gs.Variable)
    ):
        return {}
    # one pair of sizes per symbol: batch axes 2/3, image axes 224/288 (+32 per symbol),
    # other axes (sequences) 16/24 (+8 per symbol): distinct within a probe, small enough for
    # position tables, large enough that downsampling does not collapse them
    chosen: dict[object, tuple[int, int]] = {}
    sizes_a: dict[tuple[str, int], int] = {}
    sizes_b: dict[tuple[str, int], int] = {}
    by_name = {t.name: t for t in graph.inputs}
    for key in symbolic:
        t = by_name[key[0]]
        symbol = t.shape[key[1]] if isinstance(t.shape[key[1]], str) else key
        if symbol not in chosen:
            k = len(chosen)
            image = len(t.shape) == 4 and np.issubdtype(np.dtype(t.dtype), np.floating)
            chosen[symbol] = (
                (2, 3) if key[1] == 0 else (224 + 32 * k, 288 + 32 * k) if image
                else (16 + 8 * k, 24 + 8 * k)
            )
        sizes_a[key], sizes_b[key] = chosen[symbol]
    try:
        light = graph.copy()
        for t in list(light.tensors().values()):
            if isinstance(t, gs.Constant) and int(np.prod(t.shape)) > _PROBE_CONST_LIMIT:
                dtype, shape = t.dtype, list(t.shape)
                t.to_variable(dtype=dtype, shape=shape)
                t.type = "tensor_type"  # to_variable leaves it unset
                light.inputs.append(t)
        model = gs.export_onnx(light, do_type_check=False)
        import onnxruntime

        # folding runs ORT sessions whose optimizers warn about shape-only subgraphs
        onnxruntime.set_default_logger_severity(3)
        try:
            probe_a = _probe_shapes(model, sizes_a)
            # static inputs: one probe (of folded shape computations) says it all
            probe_b = _probe_shapes(model, sizes_b) if symbolic else probe_a
        finally:
            onnxruntime.set_default_logger_severity(2)  # ORT's default
    except Exception:  # a refinement only; the analysis copes with unknown sizes
        return {}
    for name, tensor in graph.tensors().items():
        if not isinstance(tensor, gs.Variable):
            continue
        a, b = probe_a.get(name), probe_b.get(name)
        if a is None or b is None or len(a) != len(b):
            continue
        shape = list(tensor.shape) if tensor.shape is not None else None
        if shape is not None and len(shape) != len(a):
            continue
        if shape is None:
            shape = [None] * len(a)
        changed = False
        for axis, (da, db) in enumerate(zip(a, b, strict=True)):
            if isinstance(shape[axis], int) and shape[axis] >= 0:
                continue
            if da is not None and da == db and da > 0:  # 0: a size collapsed in both probes
                shape[axis] = da
                changed = True
            elif shape[axis] is None:
                shape[axis] = f"gp_{name}_{axis}"
        if changed or tensor.shape is None:
            tensor.shape = shape
    return {n: (a, probe_b[n]) for n, a in probe_a.items() if n in probe_b}


def analyze_graph(
    graph: gs.Graph,
    opset: int,
    *,
    keep: Iterable[str] = (),
    position_convs: frozenset[str] = frozenset(),
    _probes: dict[str, tuple[list, list]] | None = None,
) -> Analysis:
    """Run every op rule over ``graph`` and form channel groups with their units.

    Grouped convolutions are first tied conv group by conv group (a unit is a whole conv
    group). Where that collapses a channel group to a single unit (a channel shuffle after
    a grouped conv, as in ShuffleNet v1), those convs are re-analysed position by position.
    """
    keep = tuple(keep)
    # a retry analyses the same graph, whose shapes were refined by the first pass
    probes = refine_shapes(graph) if _probes is None else _probes
    ctx = CouplingContext(graph, opset)
    ctx.probes = probes
    ctx.options["position_convs"] = position_convs
    unsupported: dict[str, list[str]] = defaultdict(list)
    deferred: list[tuple[gs.Node, registry.OpRule]] = []

    def run(node: gs.Node, rule: registry.OpRule) -> None:
        ctx.node = node
        try:
            rule.couple(node, ctx)
        except Exception as exc:  # a rule bug must freeze, never guess
            ctx.freeze_node(node, f"rule for {describe_node(node)} failed: {exc}")

    for node in graph.nodes:
        ctx.node = node
        outer = _subgraph_outer_names(node, ctx.tensors)
        for name in outer:
            ctx.tensor_freeze[name].append(f"used inside a subgraph of {describe_node(node)}")
        rule = registry.lookup(node.domain or "", node.op, opset)
        if rule is None:
            domain = node.domain or ""
            key = f"{domain}::{node.op}" if domain not in ("", "ai.onnx") else node.op
            unsupported[key].append(node.name)
            ctx.freeze_node(node, f"no rule for {describe_node(node)}")
            continue
        if rule.phase == 1:
            run(node, rule)
        else:
            deferred.append((node, rule))
    ctx._freeze_spatial_snapshot()
    for node, rule in deferred:
        run(node, rule)
    ctx.node = None

    for t in graph.inputs:
        ctx.freeze(t, None, f"graph input '{t.name}'")
    for t in graph.outputs:
        ctx.freeze(t, None, f"graph output '{t.name}'")
    keep_set = set(keep)
    if keep_set:
        for node in graph.nodes:
            if node.name in keep_set:
                ctx.freeze_node(node, f"protected by keep: {describe_node(node)}")
        for name in keep_set & set(ctx.tensors):
            ctx.freeze(ctx.tensors[name], None, f"protected by keep: tensor '{name}'")

    groups = _form_groups(ctx)
    if not position_convs:
        collapsed = _collapsed_grouped_convs(graph, groups)
        if collapsed:
            return analyze_graph(
                graph, opset, keep=keep, position_convs=collapsed, _probes=probes
            )
    return Analysis(graph, opset, groups, dict(unsupported), ctx)


def _collapsed_grouped_convs(graph: gs.Graph, groups: list[ChannelGroup]) -> frozenset[str]:
    """Grouped (not depthwise) convs inside unfrozen groups that ended with one unit."""
    convs = {
        n.name for n in graph.nodes
        if n.op == "Conv" and int(n.attrs.get("group", 1)) > 1
        and isinstance(n.inputs[1], gs.Constant) and n.inputs[1].shape[1] > 1
    }
    names: set[str] = set()
    for group in groups:
        if group.frozen or group.num_units >= 2 or not group.producers:
            continue
        names |= {name for name in group.nodes if name in convs}
    return frozenset(names)


def _form_groups(ctx: CouplingContext) -> list[ChannelGroup]:
    edges_by_dim: dict[Dim, list[Coupling]] = defaultdict(list)
    for c in ctx.couplings:
        edges_by_dim[c.a].append(c)
    shape_by_dim: dict[Dim, list[ShapeElement]] = defaultdict(list)
    for s in ctx.shape_elements:
        shape_by_dim[s.dim].append(s)

    groups: list[ChannelGroup] = []
    components = [sorted(c) for c in nx.connected_components(ctx.dim_graph)]
    components.sort()
    for comp in components:
        params = [d for d in comp if _is_float_param(ctx.tensors.get(d[0]))]
        if not params:
            continue
        sizes = {d: ctx.size(ctx.tensors[d[0]], d[1]) for d in comp if d[0] in ctx.tensors}
        frozen: list[str] = []
        inexact: list[str] = []
        nodes: list[str] = []
        couplings: list[Coupling] = []
        for d in comp:
            frozen.extend(ctx.dim_freeze.get(d, []))
            frozen.extend(ctx.tensor_freeze.get(d[0], []))
            inexact.extend(ctx.dim_inexact.get(d, []))
            if sizes.get(d) is None:
                frozen.append(f"size of '{d[0]}' axis {d[1]} unknown")
            for c in edges_by_dim.get(d, []):
                couplings.append(c)
                nodes.append(c.node)
                if not c.exact:
                    inexact.append(f"not channel-separable at node '{c.node}'")
        group = ChannelGroup(
            id=len(groups),
            dims=comp,
            sizes=sizes,
            params=params,
            roles={d: ctx.roles[d] for d in params if d in ctx.roles},
            nodes=sorted(set(nodes)),
            frozen=list(dict.fromkeys(frozen)),
            inexact=list(dict.fromkeys(inexact)),
            shape_elements=[s for d in comp for s in shape_by_dim.get(d, [])],
        )
        if all(sizes.get(d) is not None for d in comp):
            try:
                _compute_units(group, couplings)
            except Exception as exc:  # inconsistent maps: never guess
                group.frozen.append(f"index maps inconsistent: {exc}")
                group.unit_of = {}
                group.num_units = 0
        groups.append(group)
    return groups


def _is_float_param(tensor: gs.Tensor | None) -> bool:
    if not isinstance(tensor, gs.Constant):
        return False
    dtype = getattr(tensor, "dtype", None)
    try:
        return bool(np.issubdtype(np.dtype(dtype), np.floating))
    except TypeError:
        return True


def _compute_units(group: ChannelGroup, couplings: list[Coupling]) -> None:
    dims = group.dims
    sizes = [int(group.sizes[d]) for d in dims]  # type: ignore[arg-type]
    if len(set(sizes)) == 1 and all(c.imap.is_identity for c in couplings):
        n = sizes[0]
        group.unit_of = {d: np.arange(n, dtype=np.int64) for d in dims}
        group.num_units = n
        return
    offsets: dict[Dim, int] = {}
    total = 0
    for d, n in zip(dims, sizes, strict=True):
        offsets[d] = total
        total += n
    a_parts, b_parts = [], []
    for c in couplings:
        na, nb = int(group.sizes[c.a]), int(group.sizes[c.b])  # type: ignore[arg-type]
        if c.imap.check(na, nb) is not None:
            raise ValueError(c.imap.check(na, nb))
        ia, ib = c.imap.pairs(na, nb)
        a_parts.append(ia + offsets[c.a])
        b_parts.append(ib + offsets[c.b])
    parent = np.arange(total, dtype=np.int64)
    if a_parts:
        pa, pb = np.concatenate(a_parts), np.concatenate(b_parts)
        while True:
            parent = _compress(parent)
            ra, rb = parent[pa], parent[pb]
            diff = ra != rb
            if not diff.any():
                break
            hi = np.maximum(ra[diff], rb[diff])
            lo = np.minimum(ra[diff], rb[diff])
            np.minimum.at(parent, hi, lo)
    labels = _compress(parent)
    _, unit = np.unique(labels, return_inverse=True)
    group.unit_of = {d: unit[offsets[d] : offsets[d] + n] for d, n in zip(dims, sizes, strict=True)}
    group.num_units = int(unit.max()) + 1 if total else 0


def _compress(parent: np.ndarray) -> np.ndarray:
    while True:
        grand = parent[parent]
        if np.array_equal(grand, parent):
            return parent
        parent = grand
