"""Where the constants of an export come from, read off graphprune's own dependency analysis.

Exporters move parameters before use: ``MatMul(x, Transpose(weight))`` for a ``Linear`` on a
3-D input, ``Slice``/``Split`` of a packed QKV weight, a ``Reshape`` of a bias. graphprune's
preparation folds those chains into new constants (``val_12``), and a plan made on the
prepared graph cuts them. To map such a cut back to the module:

1. The export is prepared the way graphprune prepares it (:func:`graphprune.io.ir.prepare`:
   Constant nodes lifted, literal shape arithmetic and ``Shape`` reads of static shapes
   folded), except that the module's parameters stand behind graph inputs (type and shape
   only, no data), so folding stops at them. What is left between the parameters and the
   rest of the graph are the *parameter chains*: nodes whose inputs are all parameters,
   chain outputs or literals. The chain outputs read by the rest of the graph are the
   *leaves*: exactly the constants the full preparation creates from parameters.
2. The dependency analysis (:func:`graphprune.analysis.analyze_graph`) runs on the chains
   alone. Each op rule couples the dimensions its op moves with an index map, as it does
   when pruning, so every ``(leaf, axis)`` lands in a channel group with the parameter
   axes it comes from, and ``group.removed_elements(units)`` names the parameter slices a
   cut removes.

Before any of this, a quick look at the export's types (:func:`parameter_sources`) tells
whether a chain can exist at all; in a CNN every parameter meets an activation, nothing
is prepared or analysed, and mapping a plan costs the plan alone.

Nothing here knows an op (the quick look asks the registry which ops read only shapes). A chain through an op without a rule, or through one whose
coupling is not exact (a Softmax over a parameter axis), leaves the leaf's axis outside
every group or its group frozen or inexact; a plan that cuts it, or the parameters it is
computed from, is refused with :class:`PlanMappingError` naming the op (fail closed).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from graphprune.frontends.torch.errors import PlanMappingError
from graphprune.frontends.torch.weightless import without_data
from onnx_graphsurgeon.ir.tensor import LazyValues

from graphprune.analysis import Analysis, ChannelGroup, Dim, analyze_graph, describe_node
from graphprune.io import ir
from graphprune.io.shared_constants import readers
from graphprune.rules import registry

__all__ = ["ParameterSources", "parameter_sources"]

#: ``(parameter name, axis, removed indices)``
ParameterCut = tuple[str, int, list[int]]


@dataclass
class ParameterSources:
    """The parameter chains of an export and their analysis (see the module docstring).

    ``names``: the parameters (``state_dict`` keys that are initializers of the export).
    ``leaves``: chain outputs the rest of the graph reads (folded constants once prepared).
    ``direct``: parameters the rest of the graph reads as they are.
    ``derived_from[t]``: the parameters a chain tensor is computed from; ``made_by[t]``:
    the op that computed it. ``analysis``: the dependency analysis of the chains (``None``
    when there are none). While ``pending`` holds the export, no chain was searched because
    none can exist (:func:`parameter_sources`); :meth:`complete` searches anyway.
    """

    names: list[str]
    leaves: set[str] = field(default_factory=set)
    direct: set[str] = field(default_factory=set)
    derived_from: dict[str, frozenset[str]] = field(default_factory=dict)
    made_by: dict[str, str] = field(default_factory=dict)
    analysis: Analysis | None = None
    #: tensors the prepared export computes from parameters outside any chain
    untraced: set[str] = field(default_factory=set)
    #: literals of the export (constants no parameter owns), known before any chain search
    literals: set[str] = field(default_factory=set)
    #: how many node inputs of the export read each parameter (a vector read twice gets a
    #: copy per reader in the prepared export: :mod:`graphprune.io.shared_constants`)
    readers: dict[str, int] = field(default_factory=dict)
    #: the export without parameter data and the parameters' tensors, while the chains are
    #: still to be searched (see :func:`parameter_sources`)
    pending: tuple[onnx.ModelProto, dict[str, onnx.TensorProto]] | None = field(
        default=None, repr=False
    )

    def __post_init__(self) -> None:
        self._index()

    def _index(self) -> None:
        self._params = set(self.names)
        self._copies: dict[str, list[str]] = {}
        for leaf in sorted(self.leaves):
            for name in self.derived_from.get(leaf, ()):
                self._copies.setdefault(name, []).append(leaf)
        self._chained = set().union(*self.derived_from.values()) if self.derived_from else set()
        groups = self.analysis.groups if self.analysis is not None else []
        self._group_of: dict[Dim, ChannelGroup] = {d: g for g in groups for d in g.dims}

    def complete(self) -> ParameterSources:
        """Search and analyse the chains now if that was put off (returns ``self``)."""
        pending, self.pending = self.pending, None
        if pending is not None:
            full = _analyse_chains(*pending)
            for name in ("leaves", "direct", "derived_from", "made_by", "analysis", "untraced"):
                setattr(self, name, getattr(full, name))
            self._index()
        return self

    # ------------------------------------------------------------------ queries
    @property
    def visible(self) -> set[str]:
        """Constants a plan on the prepared export can name: leaves and direct parameters."""
        return self.leaves | self.direct

    def chained(self, name: str) -> bool:
        """Does a parameter chain read parameter ``name``?"""
        return name in self._chained

    def copies(self, name: str) -> list[str]:
        """The leaves computed from parameter ``name``."""
        return list(self._copies.get(name, []))

    def owners(self, tensor: str) -> frozenset[str]:
        if tensor in self._params:
            return frozenset({tensor})
        return self.derived_from.get(tensor, frozenset())

    def group(self, tensor: str, axis: int, *, why: str = "") -> ChannelGroup:
        """The channel group of ``(tensor, axis)`` in the chains; raises if it cannot map."""
        dim = (tensor, axis)
        group = self._group_of.get(dim)
        problem = None
        if group is None or dim not in group.unit_of:
            problem = "the analysis couples that axis with no parameter axis"
            if group is not None and group.frozen:
                problem = group.frozen[0]
        elif group.frozen:
            problem = group.frozen[0]
        elif group.inexact:
            problem = f"not a copy: {group.inexact[0]}"
        if problem is None and group is not None:
            return group
        leaves = [tensor] if tensor in self.leaves else self.copies(tensor)
        how = sorted({self.made_by.get(t, "?") for t in leaves}) or ["?"]
        owners = sorted(set().union(*(self.owners(t) for t in leaves))) if leaves else [tensor]
        raise PlanMappingError(
            f"{why or f'the plan cuts {tensor!r} axis {axis}'}: {', '.join(leaves[:3]) or tensor} "
            f"is computed from {owners[:5]} by {', '.join(how[:3])}, and no parameter slice "
            f"removes that cut ({problem}); protect it with keep=[...] or export without that "
            "computation"
        )

    # ------------------------------------------------------------------ mapping
    def map_cut(self, tensor: str, axis: int, indices: Iterable[int]) -> list[ParameterCut]:
        """Parameter slices ``(name, axis, indices)`` removed by cutting ``indices`` of ``tensor``.

        A parameter maps to itself; a literal of the exporter (no parameter owns it) to
        nothing; a leaf to the parameter slices its analysis couples it with.
        """
        idx = np.unique(np.asarray(list(indices), dtype=np.int64))
        if idx.size == 0:
            return []
        if tensor in self._params:
            return [(tensor, int(axis), [int(i) for i in idx])]
        if tensor not in self.literals:
            self.complete()  # a constant no quick look explains: search the chains
        if tensor in self.untraced:
            raise PlanMappingError(
                f"the plan cuts '{tensor}', which the export computes from module parameters "
                "outside any chain the analysis could follow; protect it with keep=[...]"
            )
        if tensor not in self.leaves:
            return []  # an exporter constant that no module parameter owns
        group = self.group(tensor, int(axis))
        removed = group.removed_elements(np.unique(group.unit_of[(tensor, int(axis))][idx]))
        return [
            (name, a, [int(i) for i in elements])
            for (name, a), elements in sorted(removed.items())
            if name in self._params
        ]

    def check(
        self,
        onnx_cuts: Mapping[str, Mapping[int, Iterable[int]]],
        param_cuts: Mapping[str, Mapping[int, Iterable[int]]],
        constants: set[str] | None = None,
    ) -> None:
        """Every constant the plan can see loses exactly what its parameters lose.

        ``onnx_cuts``: the plan's cuts on the prepared export; ``param_cuts``: the parameter
        slices they map to. Each channel group of the chains that any of them touches
        removes the union of their units; every leaf and direct parameter in that group must
        be cut by exactly those elements (a parameter used twice, pruned in one use only, is
        refused), and a cut parameter that a chain reads must be coupled to that chain.
        ``constants``: the constants of the graph the plan was made on, where known. A leaf
        that graph computes rather than stores (its preparation folded nothing: a ConvNeXt's
        ``Transpose`` of a ``Linear`` weight stays a node) is no constant a plan can name;
        its cut follows from its parameter's through the op's rule.
        """
        touched: dict[int, set[int]] = {}
        groups: dict[int, ChannelGroup] = {}
        visible = self.visible if constants is None else self.direct | (self.leaves & constants)

        def touch(group: ChannelGroup, dim: Dim, indices: Iterable[int]) -> None:
            idx = np.asarray(sorted(set(indices)), dtype=np.int64)
            if idx.size:
                groups[group.id] = group
                units = np.unique(group.unit_of[dim][idx])
                touched.setdefault(group.id, set()).update(int(u) for u in units)

        for name, axes in param_cuts.items():
            if not self.chained(name):
                continue
            for axis, idx in axes.items():
                why = f"the plan cuts parameter '{name}' axis {axis}"
                touch(self.group(name, int(axis), why=why), (name, int(axis)), idx)
        for tensor, axes in onnx_cuts.items():
            if tensor not in visible:
                continue  # literals; parameters that only chains read came in param_cuts
            for axis, idx in axes.items():
                dim = (tensor, int(axis))
                group = self._group_of.get(dim)
                if group is not None and dim in group.unit_of:
                    touch(group, dim, idx)
        for gid, units in sorted(touched.items()):
            group = groups[gid]
            expected = group.removed_elements(units)
            for dim in group.dims:
                if dim[0] not in visible:
                    continue
                planned = {int(i) for i in onnx_cuts.get(dim[0], {}).get(dim[1], ())}
                wanted = {int(i) for i in expected.get(dim, ())}
                if planned != wanted:
                    self._refuse_difference(dim, planned, wanted)

    def _refuse_difference(self, dim: Dim, planned: set[int], wanted: set[int]) -> None:
        tensor, axis = dim
        detail = (
            f"axis {axis}: the plan removes {len(planned)} indices, its parameters lose "
            f"{len(wanted)}"
        )
        if tensor in self._params:
            raise PlanMappingError(
                f"parameter '{tensor}' is used directly and through copies that would be cut "
                f"differently ({detail}); protect one use with keep=[...]"
            )
        raise PlanMappingError(
            f"'{tensor}' is copied or computed from {sorted(self.owners(tensor))} by "
            f"{self.made_by.get(tensor, '?')}, and the two would be cut differently ({detail}): "
            "a parameter used in two places, pruned in one; protect one use with keep=[...]"
        )


# ----------------------------------------------------------------------------- building


_FLOAT_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT", "DOUBLE", "FLOAT16", "BFLOAT16", "FLOAT8E4M3FN", "FLOAT8E4M3FNUZ",
        "FLOAT8E5M2", "FLOAT8E5M2FNUZ", "FLOAT4E2M1", "COMPLEX64", "COMPLEX128",
    )
    if hasattr(onnx.TensorProto, name)
)


def _quick_look(light: onnx.ModelProto, params: set[str]) -> tuple[set[str], bool]:
    """The export's literals, and whether any node may compute a constant from a parameter.

    ``light`` is the export without parameter data. Folding makes a tensor constant when all
    its inputs are: literals, parameters, or integer shape values (an op whose rule
    ``reads_only_shape``, applied to a static shape, gives a literal). A float tensor
    computed from a graph input is data and never folds; a node reading one is no chain, nor
    is one whose outputs are all integers (an integer leaf still gets its chain searched
    once a plan names it, see :meth:`ParameterSources.map_cut`). Tensors of unknown type
    count as possibly constant and possibly float, so the answer errs towards "may".
    """
    try:
        typed = onnx.shape_inference.infer_shapes(light).graph
    except Exception:  # not inferable: types stay unknown, every parameter reader may chain
        typed = light.graph
    types = {
        vi.name: vi.type.tensor_type.elem_type
        for vi in [*typed.input, *typed.value_info, *typed.output]
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type
    }
    types.update((t.name, t.data_type) for t in light.graph.initializer)
    static = {
        vi.name
        for vi in [*typed.input, *typed.value_info, *typed.output]
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")
        and all(d.HasField("dim_value") for d in vi.type.tensor_type.shape.dim)
    }
    opset = ir.default_opset(light)
    literals = {t.name for t in light.graph.initializer}
    possibly_constant = literals | params
    for node in light.graph.node:  # ONNX nodes are sorted topologically
        inputs = [i for i in node.input if i]
        rule = registry.lookup(node.domain, node.op_type, opset)
        shape_read = rule is not None and rule.reads_only_shape
        if all(i in literals or (shape_read and (i in static or i in params)) for i in inputs):
            literals.update(o for o in node.output if o)  # folds to a literal
            continue
        if all(
            i in literals or i in possibly_constant or types.get(i) not in _FLOAT_TYPES
            for i in inputs
        ):
            outputs = [o for o in node.output if o]
            if any(i in params for i in inputs) and any(
                types.get(o, onnx.TensorProto.FLOAT) in _FLOAT_TYPES for o in outputs
            ):
                return literals, True
            possibly_constant.update(outputs)
    return literals, False


def parameter_sources(model: onnx.ModelProto, names: Iterable[str]) -> ParameterSources:
    """The parameter chains of ``model``, an export whose initializers are named after
    ``names`` (the module's ``state_dict`` keys), and their analysis.

    A quick look at the export decides whether any chain can exist; when none can (a CNN
    whose convolutions read their weights as they are), the search is put off until a plan
    names a constant the look does not explain, and mapping costs nothing but the plan.
    """
    wanted = set(names)
    inits = {t.name: t for t in model.graph.initializer if t.name in wanted}
    light = without_data(model, set(inits))
    literals, may_chain = _quick_look(light, set(inits))
    sources = ParameterSources(
        names=list(inits), direct=set(inits), literals=literals, readers=dict(readers(model, inits)),
        pending=(light, inits),
    )
    return sources.complete() if may_chain else sources


def _analyse_chains(light: onnx.ModelProto, inits: dict[str, onnx.TensorProto]) -> ParameterSources:
    """Prepare the export without parameter data (``light``), find the chains, analyse them;
    ``inits`` are the parameters' tensors (read lazily, if a rule asks for values)."""
    params = list(inits)
    prepared = ir.prepare(light)
    graph = ir.import_graph(prepared)
    tensors = graph.tensors()
    for name in params:
        tensor = tensors.get(name)
        if isinstance(tensor, gs.Variable):
            tensor.to_constant(LazyValues(inits[name]))  # type: ignore[arg-type]

    literal = {n for n, t in tensors.items() if isinstance(t, gs.Constant) and n not in inits}
    derived: dict[str, frozenset[str]] = {p: frozenset({p}) for p in params if p in tensors}
    downstream: set[str] = set(derived)  # anything computed from a parameter
    made_by: dict[str, str] = {}
    chain: list[gs.Node] = []
    for node in graph.nodes:  # prepared graphs are sorted topologically
        inputs = [t.name for t in node.inputs if t.name]
        from_params = [i for i in inputs if i in derived]
        if all(i in literal for i in inputs):  # left unfolded (or no inputs): a literal
            literal.update(o.name for o in node.outputs)
            continue
        if any(i in downstream for i in inputs):
            downstream.update(o.name for o in node.outputs if o.name)
        if not from_params or not all(i in derived or i in literal for i in inputs):
            continue
        chain.append(node)
        owners = frozenset().union(*(derived[i] for i in from_params))
        for out in node.outputs:
            if out.name:
                derived[out.name] = owners
                made_by[out.name] = describe_node(node)

    chain_ids = {id(n) for n in chain}
    outputs = {t.name for t in graph.outputs}
    leaves: set[str] = set()
    direct: set[str] = set()
    for name in derived:
        tensor = tensors[name]
        read = name in outputs or any(id(c) not in chain_ids for c in tensor.outputs)
        if read:
            (direct if name in inits else leaves).add(name)
    analysis = None
    if chain:
        sub = gs.Graph(nodes=chain, opset=graph.opset, name="parameter_chains")
        analysis = analyze_graph(sub, ir.default_opset(prepared), folded=True)
    untraced = {n for n in downstream if n not in derived}
    return ParameterSources(
        names=params,
        leaves=leaves,
        direct=direct,
        derived_from={t: o for t, o in derived.items() if t not in inits},
        made_by=made_by,
        analysis=analysis,
        untraced=untraced,
    )
