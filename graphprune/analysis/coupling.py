"""The coupling context: what an op rule sees and calls while it describes one node.

A rule states which dimensions travel together (``couple``, each with an index map), what a
parameter axis does (``role``), what must never be pruned (``freeze``, ``spatial``), what
is allowed but not exact (``inexact``), which axes count attention heads (``mark_head``)
and which shape literals count channels (``track_shape``, see
:mod:`graphprune.analysis.shape_trace`). The context collects these facts; the driver
(:mod:`graphprune.analysis.driver`) turns them into channel groups
(:mod:`graphprune.analysis.groups`).

Rules run in two phases. Between them, :meth:`CouplingContext.start_phase_two` takes a
snapshot of the phase-1 components, so that phase-2 rules (Reshape, Flatten, Gather) can ask
whether an axis is spatial (:meth:`~CouplingContext.is_spatial`) or belongs to a component
with heads or frozen dimensions (:meth:`~CouplingContext.component_facts`).

This module does not import the rules: the driver hands the context its rule lookup.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from typing import Any

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from graphprune.analysis import shape_trace
from graphprune.analysis.dims import BATCH_PROBE, Coupling, Dim, ShapeElement, describe_node
from graphprune.analysis.index_maps import IDENTITY, IndexMap
from graphprune.analysis.roles import CHANNELWISE, CONSUMER, PRODUCER
from graphprune.io.tensors import const_value, static_shape, static_size


class CouplingContext:
    """What an op rule sees and calls while it describes one node.

    ``rules`` looks up the rule of a node (shape tensors are traced through the rules of
    their producers); ``probes`` holds the shapes of two shape-inference probes per tensor
    (:func:`graphprune.analysis.shape_probe.refine_shapes`); ``position_convs`` names the
    grouped convolutions to couple position by position instead of conv group by conv group.
    """

    def __init__(
        self,
        graph: gs.Graph,
        opset: int,
        rules: shape_trace.RuleLookup,
        *,
        probes: dict[str, tuple[list, list]] | None = None,
        position_convs: frozenset[str] = frozenset(),
        folded: bool = False,
    ) -> None:
        self.opset = opset
        #: the graph is computed once, from constants, before any pruning (a chain that
        #: preparation folds): a value reduced over an axis keeps what the removed elements
        #: gave it, where a graph that computes it at run time recomputes it
        self.folded = folded
        self.tensors: dict[str, gs.Tensor] = graph.tensors()
        self._graph_outputs = {t.name for t in graph.outputs}
        self._graph_inputs = {t.name for t in graph.inputs}
        self.probes: dict[str, tuple[list, list]] = probes or {}
        self.position_convs = position_convs
        #: the node whose rule is running (messages name it)
        self.node: gs.Node | None = None
        # the facts rules state
        self.dim_graph = nx.Graph()
        self.couplings: list[Coupling] = []
        self.dim_freeze: dict[Dim, list[str]] = defaultdict(list)
        self.tensor_freeze: dict[str, list[str]] = defaultdict(list)
        self.dim_inexact: dict[Dim, list[str]] = defaultdict(list)
        self.roles: dict[Dim, str] = {}
        #: roles stated for axes of computed tensors (a dequantized weight), and the
        #: constants that take them over (:meth:`share_roles`)
        self.variable_roles: dict[Dim, str] = {}
        self.role_links: list[tuple[str, gs.Tensor, str | None, list[int] | None]] = []
        #: tensors that are a float weight moved by data movement (:meth:`weight_view`)
        self.view_values: set[str] = set()
        #: integer constants that are parameters all the same (quantized weights)
        self.quantized_params: set[str] = set()
        #: quantized weights whose zero is not 0: name -> the zero point's value, which
        #: broadcasts against the weight (a zeroed weight takes it, so it reads as 0)
        self.zero_points: dict[str, np.ndarray] = {}
        #: quantized weights' float readings: name -> ``(scale, zero_point)`` broadcastable
        #: against the integer values (:meth:`decoded`), what the data-free criteria score
        self.decodings: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        #: activations whose removed channels the zeroed original zeroes themselves
        self.zeroed_activations: set[str] = set()
        #: (tensor, axis) whose removed channels the zeroed original zeroes on that axis only
        #: (:meth:`zero_in_reference` with an axis)
        self.zeroed_axes: set[tuple[str, int]] = set()
        #: weights held in attributes (:meth:`attribute_weight`): name -> (node, attribute)
        self.attribute_weights: dict[str, tuple[str, str]] = {}
        #: variables that are weights computed from constants (:meth:`weight_expression`)
        self.weight_values: set[str] = set()
        #: layers (nodes that read a weight) whose rule saw a rank unknown: op -> node names
        self.unranked: dict[str, list[str]] = {}
        self.spatial_dims: set[Dim] = set()
        self.head_dims: set[Dim] = set()
        self.shape_elements: list[ShapeElement] = []
        self._literal_dims: dict[tuple[str, int, int], Dim] = {}  # a literal's first dimension
        self._rules = rules
        # phase-2 snapshot of the phase-1 components
        self._component_facts: dict[Dim, frozenset[str]] | None = None
        self._spatial_components: set[Dim] | None = None
        #: couplings decided when phase 2 starts (:meth:`couple_unless_spatial`)
        self._unless_spatial: list[tuple[gs.Node | None, gs.Tensor, int, gs.Tensor, int, str]] = []

    # ------------------------------------------------------------------ queries
    shape = staticmethod(static_shape)
    size = staticmethod(static_size)
    const = staticmethod(const_value)

    def rank(self, tensor: gs.Tensor) -> int | None:
        shape = self.shape(tensor)
        return None if shape is None else len(shape)

    def known_ranks(self, node: gs.Node, *tensors: gs.Tensor) -> list[int] | None:
        """The ranks of ``tensors``; ``None`` when one is unknown, after freezing every
        tensor of ``node`` with the reason (a rule cannot couple axes it cannot count)."""
        ranks = [self.rank(t) for t in tensors]
        if any(r is None for r in ranks):
            self.freeze_node(node, f"rank unknown at {node.op} '{node.name}'")
            if self._is_layer(node):  # no group holds its weight: the report says so
                self.unranked.setdefault(node.op, []).append(node.name)
            return None
        return ranks  # type: ignore[return-value]

    def _is_layer(self, node: gs.Node) -> bool:
        """``node`` applies a weight (its rule's :meth:`~graphprune.rules.registry.OpRule.linear`
        or :meth:`~graphprune.rules.registry.OpRule.rescaled_linear` says so)."""
        rule = self._rules(node)
        try:
            return rule is not None and (rule.linear(node) is not None or rule.rescaled_linear(node) is not None)
        except Exception:  # noqa: BLE001 - a rule that cannot tell: no layer
            return False

    def member_size(self, tensor: gs.Tensor, axis: int) -> int | None:
        """The size of an axis as a group member: the static size, or for an activation
        axis that holds a dynamic batch (the merged ``[B*H]`` axis of an attention; the two
        shape probes give it different sizes), its size in the first probe. Units are
        labelled on it; activations are never sliced (their shapes are inferred again after
        a rewrite), and a map to a static axis is still checked against that size."""
        size = self.size(tensor, axis)
        if size is not None or not isinstance(tensor, gs.Variable):
            return size
        probe = self.probes.get(tensor.name)
        if probe is None or not all(-len(p) <= axis < len(p) for p in probe):
            return None
        first, second = probe[0][axis], probe[1][axis]
        if isinstance(first, int) and isinstance(second, int) and first != second:
            return int(first)
        return None

    def virtual(self, node: gs.Node, label: str, size: int) -> gs.Variable:
        """A dimension that no tensor of the graph has (the head index of a fused op, the
        heads of a width that a reshape moves into the batch): a 1-D tensor of ``size``
        known to the analysis only."""
        name = f"{node.name or node.op}::{label}"
        tensor = gs.Variable(name, dtype=np.float32, shape=[size])
        self.tensors[name] = tensor
        return tensor

    def attribute_weight(self, node: gs.Node, label: str, values: np.ndarray) -> gs.Constant:
        """A weight the op holds in its attribute ``label`` (an ONNX-ML linear model's
        coefficients, ``values`` the attribute's list shaped as the analysis reads it) as the
        analysis sees it: a constant that no node of the graph reads, which the criteria score
        with the group it joins and the zeroed original zeroes in the attribute
        (:attr:`attribute_weights`); the rule's rewrite slices the attribute itself."""
        name = f"{node.name or node.op}::{label}"
        tensor = gs.Constant(name, values)
        self.tensors[name] = tensor
        self.attribute_weights[name] = (node.name, label)
        return tensor

    def is_batch(self, tensor: gs.Tensor, axis: int) -> bool:
        """Does an activation axis hold the batch alone: static size 1, or the sizes an open
        batch takes in the shape probes (a merged ``[B*H]`` axis takes a multiple)?"""
        if self.size(tensor, axis) == 1:
            return True
        probe = self.probes.get(tensor.name)
        if probe is None or not all(-len(p) <= axis < len(p) for p in probe):
            return False
        return (probe[0][axis], probe[1][axis]) == BATCH_PROBE

    def derive_shape(self, output: gs.Tensor, shape: list[int | None] | None) -> None:
        """Give ``output`` the shape its rule derives (``None`` for unknown dims) where shape
        inference left it none, or only its rank (ONNX Runtime's symbolic inference gives that
        much: ``contrib_shapes.annotate_ranks``), the sizes the rule knows: one op ONNX cannot
        infer (GroupNormalization-21, a custom domain op) would otherwise hide every group
        after it."""
        if shape is None or not isinstance(output, gs.Variable):
            return
        current = output.shape if output.shape is not None else [None] * len(shape)
        if len(current) != len(shape) or any(isinstance(d, int) and d >= 0 for d in current):
            return
        output.shape = [d if d is not None else c if c is not None else f"gp_unk_{output.name}_{k}"
                        for k, (d, c) in enumerate(zip(shape, current, strict=True))]

    def fill_shape(self, output: gs.Tensor, sizes: list[int | None]) -> None:
        """Give the axes of ``output`` that shape inference left unknown the sizes a rule
        derives exactly (``None``: still unknown); known sizes and the rank stay as they are."""
        current = output.shape if isinstance(output, gs.Variable) else None
        if current is None or len(current) != len(sizes):
            return
        output.shape = [s if s is not None and not (isinstance(c, int) and c >= 0) else c
                        for c, s in zip(current, sizes, strict=True)]

    def broadcast_shape(self, tensors: Iterable[gs.Tensor]) -> list[int | None] | None:
        """The numpy broadcast of the tensors' shapes (``None``: a rank is unknown)."""
        shapes = [self.shape(t) for t in tensors if t is not None and t.name]
        if not shapes or any(s is None for s in shapes):
            return None
        rank = max(len(s) for s in shapes)
        out: list[int | None] = []
        for axis in range(rank):
            dims = [s[axis - rank + len(s)] for s in shapes if axis - rank + len(s) >= 0]
            known = [d for d in dims if d is not None and d != 1]
            if known:
                out.append(known[0])
            elif any(d is None for d in dims):
                out.append(None)
            else:
                out.append(1)
        return out

    def where(self) -> str:
        return describe_node(self.node) if self.node is not None else "graph"

    def rule_for(self, node: gs.Node) -> shape_trace.TracesShapes | None:
        """The rule of ``node`` (``None``: it has none)."""
        return self._rules(node)

    def at_boundary(self, tensor: gs.Tensor | None) -> bool:
        """``tensor`` is a graph input (fed by the caller) or a graph output: its sizes are
        part of the model's interface, which a prune never changes."""
        return tensor is not None and (tensor.name in self._graph_inputs or tensor.name in self._graph_outputs)

    # ------------------------------------------------------------------ couplings
    def _unread(self, tensor: gs.Tensor) -> bool:
        """A computed tensor that no node reads and that is not a graph output."""
        return (isinstance(tensor, gs.Variable) and not tensor.outputs
                and tensor.name not in self._graph_outputs)

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
            # one side has no dimension to join (rank unknown): the other must not prune alone,
            # unless that side is an output nothing reads (its shape does not matter)
            reason = f"coupled with an axis of unknown rank at {self.where()}"
            for d, other in ((da, b), (db, a)):
                if d is not None and not self._unread(other):
                    self.dim_graph.add_node(d)
                    self.dim_freeze[d].append(reason)
            return
        na, nb = self.member_size(a, axis_a), self.member_size(b, axis_b)
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
        several = sum(1 for t in inputs if t is not None and t.name) > 1
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
                if n == 1 and out_shape[o] == 1 and several:
                    # a size-1 axis never loses a unit (a member of one element is pinned):
                    # coupling it would only join groups through a tensor both read (the
                    # rotary table every layer's one key head is multiplied with)
                    continue
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
        elif dim is not None:
            self.variable_roles.setdefault(dim, role)

    def share_roles(self, source: gs.Tensor, target: gs.Tensor, weight_freeze: str | None = None) -> None:
        """The constant ``target`` takes, axis by axis, the role its consumers give to
        ``source`` (a quantized weight and its dequantized value); with ``weight_freeze``,
        an axis that would be a producer or consumer axis freezes with that reason instead
        (zeroing it would not zero the weight). Resolved by :meth:`resolve_role_links`."""
        self.role_links.append((source.name, target, weight_freeze, None))
        if isinstance(target, gs.Constant):
            self.quantized_params.add(target.name)

    def weight_view(self, value: gs.Tensor, source: gs.Tensor, axes: list[int | None] | None = None) -> None:
        """``value`` is the float weight ``source`` (or a view of one) moved by data movement
        the exporter left in the graph (the dynamo exporter splits and transposes
        ``nn.MultiheadAttention``'s packed ``in_proj_weight`` when query and key differ):
        ``source`` takes the roles ``value``'s consumers give it, its axis ``k`` the role of
        axis ``axes[k]`` of ``value`` (default: the same axis; ``None``: no role, an axis the
        view does not keep)."""
        self.view_values.add(value.name)
        self.role_links.append((value.name, source, None, axes))

    def is_weight_view(self, tensor: gs.Tensor) -> bool:
        """A float constant, or a view of one (:meth:`weight_view`)."""
        if isinstance(tensor, gs.Constant):
            return np.issubdtype(np.asarray(tensor.values).dtype, np.floating)
        return tensor.name in self.view_values

    def weight_expression(self, value: gs.Tensor, source: gs.Tensor) -> None:
        """``value`` is a weight computed from the weight ``source`` (an integer weight cast to
        float, then scaled: the form some quantizers store weights in, kept unfolded so the
        file stays small): ``source`` takes the roles ``value``'s consumers give it."""
        self.weight_values.add(value.name)
        self.share_roles(value, source)

    def is_weight_expression(self, tensor: gs.Tensor) -> bool:
        return tensor.name in self.weight_values

    def is_weight_value(self, tensor: gs.Tensor) -> bool:
        """A weight in any of the forms above, or the value a constant decodes to (a
        dequantized integer weight: :meth:`share_roles` with that constant)."""
        return (self.is_weight_view(tensor) or self.is_weight_expression(tensor)
                or any(source == tensor.name and isinstance(target, gs.Constant)
                       for source, target, _, _ in self.role_links))

    def integer_param(self, tensor: gs.Tensor, zero_point: np.ndarray | None = None) -> None:
        """``tensor`` (an integer constant) is a parameter all the same: a quantized weight
        that an integer op (``MatMulInteger``, ``ConvInteger``) reads directly. A non-zero
        ``zero_point`` (broadcastable against it) is the value that reads as 0."""
        self.quantized_params.add(tensor.name)
        if zero_point is not None and np.any(zero_point):
            self.zero_points[tensor.name] = zero_point

    def decoded(self, tensor: gs.Tensor, scale: Any, zero_point: Any = 0, bits: int = 8) -> None:
        """The integer constant ``tensor`` reads as ``(tensor - zero_point) * scale`` (both
        broadcastable against it; a per-channel scale makes channels of equal integers differ):
        the float weight the data-free criteria score instead of the raw integers. ``bits`` < 8:
        ``tensor``'s bytes pack ``8 // bits`` fields each (:func:`~graphprune.io.tensors.
        unpack_bits`), and ``scale`` and ``zero_point`` broadcast against the unpacked fields."""
        scale, zero_point = np.asarray(scale), np.asarray(zero_point)  # views stay views: no copy
        if not np.issubdtype(scale.dtype, np.floating):
            scale = scale.astype(np.float64)
        self.decodings[tensor.name] = (scale, zero_point, bits)

    def zero_in_reference(self, tensor: gs.Tensor, axis: int | None = None) -> None:
        """The zeroed original zeroes the removed channels of ``tensor`` itself, not only the
        weights that make them: the op reading it computes from all its channels at once
        (``DynamicQuantizeLinear``'s range), where a removed channel that is not 0 (after a
        BatchNormalization, a Sigmoid) would still count. With ``axis``, on that axis only
        (the axis a product of two activations sums over: a removed channel's bias, which no
        consumer weight absorbs there, would still count)."""
        if axis is None:
            self.zeroed_activations.add(tensor.name)
            return
        rank = self.rank(tensor)
        if rank:
            self.zeroed_axes.add((tensor.name, axis % rank))

    def resolve_role_links(self) -> None:
        """Apply :meth:`share_roles` once every rule has stated its roles: last link first,
        so a chain (``MatMul`` <- ``Mul`` by a scale <- ``Cast`` <- int8 weight; rules state
        links in graph order) hands the roles down to the constant."""
        for source, target, weight_freeze, axes in reversed(self.role_links):
            for axis in range(self.rank(target) or 0):
                if axes and axes[axis] is None:
                    continue
                role = self.variable_roles.get((source, axes[axis] if axes else axis))
                if role is None:
                    continue
                if weight_freeze and role in (PRODUCER, CONSUMER):
                    self.freeze(target, axis, weight_freeze)
                elif isinstance(target, gs.Constant):
                    self.roles.setdefault((target.name, axis), role)
                else:
                    self.variable_roles.setdefault((target.name, axis), role)

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
                self.dim_freeze[dim].append(f"{what} axis at {self.where()}")

    def mark_head(self, tensor: gs.Tensor, axis: int) -> None:
        """``axis`` of ``tensor`` counts attention heads (a batch axis of an attention product)."""
        dim = self._dim(tensor, axis)
        if dim is not None:
            self.dim_graph.add_node(dim)
            self.head_dims.add(dim)

    # ------------------------------------------------------------------ shape tensors
    def track_shape(
        self,
        node: gs.Node,
        input_index: int,
        dims: list[tuple[gs.Tensor, int] | None],
        *,
        special_zero: bool = True,
    ) -> None:
        """Element ``k`` of ``node.inputs[input_index]`` gives the size of ``dims[k]``
        (see :func:`graphprune.analysis.shape_trace.track_shape`)."""
        shape_trace.track_shape(self, node, input_index, dims, special_zero=special_zero)

    def add_shape_element(self, element: ShapeElement) -> None:
        """A literal that gives the size of ``element.dim``: the rewrite writes the new size.
        One literal that gives the sizes of two dimensions (a ``batch * H`` computed once
        and read by several Reshapes) couples them: they must keep equal sizes."""
        key = (element.node_name, element.input_index, element.element)
        first = self._literal_dims.setdefault(key, element.dim)
        if first != element.dim:
            a, b = self.tensors.get(first[0]), self.tensors.get(element.dim[0])
            if a is not None and b is not None:
                self.couple(a, first[1], b, element.dim[1])
        self.shape_elements.append(element)
        self.dim_graph.add_node(element.dim)

    # ------------------------------------------------------------------ phase 2
    def start_phase_two(self, previewed: Iterable[tuple[list[tuple[Dim, Dim]], list[Dim]]]) -> None:
        """Snapshot the phase-1 components for the phase-2 queries.

        ``previewed``: per phase-2 node, the couplings and frozen dimensions its rule will
        add (:meth:`OpRule.preview_couplings`), so that the facts already include them.
        """
        spatial: set[Dim] = set()
        for comp in nx.connected_components(self.dim_graph):
            if comp & self.spatial_dims:
                spatial |= comp
        self._spatial_components = spatial
        for node, x, x_axis, w, w_axis, role in self._unless_spatial:
            self.node = node
            if self._dim(x, x_axis) in spatial:  # (its component is already spatial: it stays so)
                self.spatial(x, [x_axis])
            else:
                self.couple(x, x_axis, w, w_axis)
                self.role(w, w_axis, role)
        self.node = None
        self._component_facts = self._facts(previewed)

    def couple_unless_spatial(self, x: gs.Tensor, x_axis: int, w: gs.Tensor, w_axis: int, role: str) -> None:
        """Couple ``x``'s axis with ``w``'s (``w``'s axis taking ``role``) unless the phase-1
        components find ``x``'s axis spatial, where it is marked so: a conv kernel that spans
        an axis whole reads it like channels where the axis carries features (a transposed
        channel axis), not where it is a convolution's spatial output. Decided when phase 2
        starts."""
        self._unless_spatial.append((self.node, x, x_axis, w, w_axis, role))

    def _facts(self, previewed: Iterable[tuple[list[tuple[Dim, Dim]], list[Dim]]]) -> dict[Dim, frozenset[str]]:
        """Head/frozen facts per phase-1 component, with the previewed couplings added."""
        preview = self.dim_graph.copy()
        selected: set[Dim] = set()
        for pairs, frozen in previewed:
            selected.update(frozen)
            preview.add_edges_from(pairs)
        facts: dict[Dim, frozenset[str]] = {}
        for comp in nx.connected_components(preview):
            found = set()
            if comp & self.head_dims:
                found.add("head")
            if comp & selected or any(
                self.dim_freeze.get(d) or self.tensor_freeze.get(d[0]) for d in comp
            ):
                found.add("frozen")
            if any(d[0] in self._graph_inputs or d[0] in self._graph_outputs for d in comp):
                found.add("interface")
            if found:
                facts.update(dict.fromkeys(comp, frozenset(found)))
        return facts

    def is_spatial(self, tensor: gs.Tensor, axis: int) -> bool:
        """Phase 2 only: does this dimension belong to a spatial/batch component?"""
        rank = self.rank(tensor)
        if rank is None:
            return False
        dim = (tensor.name, axis % rank)
        if self._spatial_components is None:
            return dim in self.spatial_dims
        return dim in self._spatial_components

    def component_facts(self, tensor: gs.Tensor, axis: int) -> frozenset[str]:
        """Phase 2 only: ``"head"`` / ``"frozen"`` / ``"interface"`` when the dimension's
        phase-1 component holds an attention head axis / a frozen dimension / a dimension of
        a graph input or output (frozen once phase 2 ends). Reshape rules use it to pick the
        factor of a split axis that carries channels (heads, not the q/k/v index)."""
        rank = self.rank(tensor)
        if rank is None or self._component_facts is None:
            return frozenset()
        return self._component_facts.get((tensor.name, axis % rank), frozenset())
