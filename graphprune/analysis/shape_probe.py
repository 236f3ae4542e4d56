"""Shape probes: static sizes that ONNX shape inference leaves symbolic.

Symbolic input sizes hide static sizes downstream (a head count computed as ``H*D / D``).
:func:`refine_shapes` infers shapes twice with concrete sizes for every symbolic input axis
and keeps the sizes that agree; both probes stay available to the rules
(``CouplingContext.probes``), which match re-factored dynamic axes with them.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.analysis.dims import BATCH_PROBE
from graphprune.io import gs_export
from graphprune.io.contrib_shapes import contrib_shapes
from graphprune.io.folding import fold_constants
from graphprune.io.graph_reads import node_reads, reads_of
from graphprune.io.runtime import quiet_ort

#: constants with more elements than this are replaced by typed inputs for shape probing
_PROBE_CONST_LIMIT = 4096
_BODIES = (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)


def _probe_shapes(model: onnx.ModelProto, sizes: dict[tuple[str, int], int]) -> dict[str, list]:
    """Shapes ONNX inference finds when graph input axis ``(name, axis)`` has ``sizes[...]``.

    Infers, folds the shape computations that became constant, and repeats. A round folds
    the part of the graph that can fold at all (:func:`_fold_shape_part`: ``Shape`` and what
    is computed from shapes and constants alone), which on a large graph is a small part (a
    40 k-node MAXIM: a round over its whole graph took 3 s, seven rounds per probe and five
    probes per prune); where that part folds no further, one round folds the whole graph
    (:func:`_fold_whole`: the bodies of ``If`` and ``Loop`` nodes and the model's functions fold
    there, and an ``If`` on a constant condition is inlined), and the rounds go
    on if it folded something. Without bodies and functions, the part is all that can fold."""
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
        contrib = contrib_shapes(probe)
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
        for init in inferred.graph.initializer:  # constants have their exact shapes
            if None in shapes.get(init.name, [None]):
                shapes[init.name] = [int(d) for d in init.dims]
        folded = _fold_shape_part(inferred, shapes)
        if folded is None and (inferred.functions or any(
                a.type in _BODIES for node in inferred.graph.node for a in node.attribute)):
            folded = _fold_whole(inferred, shapes)
        if folded is None:
            break
        probe = folded
    return shapes


def _record_constants(tensors: Mapping[str, gs.Tensor], shapes: dict[str, list]) -> None:
    """A tensor folded into a constant has its exact shape."""
    for name, tensor in tensors.items():
        if None in shapes.get(name, [None]) and isinstance(tensor, gs.Constant):
            shapes[name] = [int(d) for d in tensor.shape]


def _fold_whole(inferred: onnx.ModelProto, shapes: dict[str, list]) -> onnx.ModelProto | None:
    """One folding round over the whole graph; ``None`` where nothing folded."""
    folded = gs_export.import_onnx(inferred)
    before = [(n.op, [t.name for t in n.outputs]) for n in folded.nodes]
    tensors = folded.tensors()
    fold_constants(folded, fold_shapes=True, size_threshold=_PROBE_CONST_LIMIT)
    _record_constants(tensors, shapes)
    # one computed from constants alone is kept (as an output of the probe) for the next
    # inference to size: a zero initial state ``ConstantOfShape([layers, batch, hidden])``
    # sliced per layer, whose slices folded away
    for name, tensor in tensors.items():
        if None not in shapes.get(name, [None]) or isinstance(tensor, gs.Constant):
            continue
        if tensor.inputs and all(isinstance(t, gs.Constant) for t in tensor.inputs[0].inputs) \
                and tensor not in folded.outputs:
            folded.outputs.append(tensor)
    folded.cleanup(remove_unused_graph_inputs=False)
    if [(n.op, [t.name for t in n.outputs]) for n in folded.nodes] == before:
        return None  # (an If inlined as the one node of its branch leaves the count)
    return gs_export.export_onnx(folded)


def _fold_shape_part(inferred: onnx.ModelProto, shapes: dict[str, list]) -> onnx.ModelProto | None:
    """One folding round over the part of the graph that can fold: ``Shape`` nodes and the
    nodes (without subgraphs) whose inputs are constants or computed from those alone,
    folded as a model of their own (its inputs the tensors whose shapes the ``Shape`` nodes
    read, with the shapes inference gave them; its outputs what the rest of the graph reads
    and every tensor without a shape yet, so that what does not fold stays for the next
    inference to size) and put back in place of that part. ``None`` where nothing folded."""
    graph = inferred.graph
    known = {init.name for init in graph.initializer} | {""}
    part: list[int] = []
    for index, node in enumerate(graph.node):
        if any(a.type in _BODIES for a in node.attribute):
            continue
        if (node.domain in ("", "ai.onnx") and node.op_type == "Shape") or all(i in known for i in node.input):
            part.append(index)
            known.update(o for o in node.output if o)
    if not part:
        return None
    nodes = [graph.node[i] for i in part]
    produced = {o for node in nodes for o in node.output if o}
    initializers = {init.name: init for init in graph.initializer}
    types = {v.name: v for v in (*graph.input, *graph.value_info, *graph.output)}
    read = {i for node in nodes for i in node.input if i} - produced
    taken = set(part)
    # its outputs: what the rest reads, the model's outputs, and what has no shape yet
    wanted = reads_of(n for i, n in enumerate(graph.node) if i not in taken) | {v.name for v in graph.output}
    sub = onnx.helper.make_graph(
        nodes, "gp_shape_part",
        [types[n] if n in types else onnx.helper.make_empty_tensor_value_info(n)
         for n in sorted(read - initializers.keys())],
        [types[n] if n in types else onnx.helper.make_empty_tensor_value_info(n)
         for node in nodes for n in node.output if n and (n in wanted or None in shapes.get(n, [None]))],
        [initializers[n] for n in sorted(read & initializers.keys())],
    )
    part_model = onnx.helper.make_model(sub, opset_imports=inferred.opset_import, ir_version=inferred.ir_version)
    part_model.functions.extend(inferred.functions)
    folded = gs_export.import_onnx(part_model)
    count = len(folded.nodes)
    tensors = folded.tensors()
    fold_constants(folded, fold_shapes=True, size_threshold=_PROBE_CONST_LIMIT)
    _record_constants(tensors, shapes)
    folded.cleanup(remove_unused_graph_inputs=False)
    if len(folded.nodes) == count:
        return None
    done = gs_export.export_onnx(folded).graph
    # the rest of the graph and what is left of the part, in an order that runs
    rest = [node for i, node in enumerate(graph.node) if i not in taken]
    ordered = _toposorted([*rest, *done.node], set(initializers) | {v.name for v in graph.input})
    if ordered is None:
        return _fold_whole(inferred, shapes)
    probe = onnx.ModelProto()
    probe.CopyFrom(inferred)
    del probe.graph.node[:]
    probe.graph.node.extend(ordered)
    used = reads_of(probe.graph.node) | {v.name for v in probe.graph.output}
    have = set(initializers)
    probe.graph.initializer.extend(init for init in done.initializer if init.name not in have and init.name in used)
    # the part's tensors carry the types its folding gave them (a cast it elided)
    retyped = {v.name: v for v in done.output if v.type.HasField("tensor_type")}
    for value in probe.graph.value_info:
        if value.name in retyped:
            value.CopyFrom(retyped[value.name])
    return probe


def _toposorted(nodes: list[onnx.NodeProto], ready: set[str]) -> list[onnx.NodeProto] | None:
    """``nodes`` in an order in which each runs after the producers of what it (and its
    subgraphs) reads; ``None`` where none exists."""
    producer = {o: i for i, node in enumerate(nodes) for o in node.output if o}
    needs: list[set[int]] = []
    readers: dict[int, list[int]] = {}
    for i, node in enumerate(nodes):
        names = node_reads(node)
        deps = {producer[n] for n in names if n in producer and n not in ready and producer[n] != i}
        needs.append(deps)
        for d in deps:
            readers.setdefault(d, []).append(i)
    order = [i for i, deps in enumerate(needs) if not deps]
    for i in order:  # grows while it is walked
        for r in readers.get(i, ()):
            needs[r].discard(i)
            if not needs[r]:
                order.append(r)
    return [nodes[i] for i in order] if len(order) == len(nodes) else None


def _custom_cuts(graph: gs.Graph) -> list[gs.Variable]:
    """Outputs of custom operators (no schema; a tokenizer in front of a text encoder) whose
    rank is known (:mod:`graphprune.io.custom_shapes` ran them): the probes treat them as
    inputs, with sizes of their own for their open axes."""
    from graphprune.io.custom_shapes import opaque

    return [t for node in graph.nodes if opaque(node.domain, node.op) for t in node.outputs
            if isinstance(t, gs.Variable) and t.shape is not None]


def _probe_inputs(graph: gs.Graph) -> list[gs.Variable]:
    return [*graph.inputs, *_custom_cuts(graph)]


def _probe_model(graph: gs.Graph) -> onnx.ModelProto:
    """``graph`` for shape probing: large constants become inputs (only their shapes count),
    small ones carry their bytes (ORT folds them in memory; a weight-store reference cannot
    be followed from an in-memory model); custom operators' outputs become inputs."""
    probe_graph = graph.copy()
    cuts = _custom_cuts(probe_graph)
    for t in cuts:
        t.inputs.clear()
    probe_graph.inputs.extend(cuts)
    for t in list(probe_graph.tensors().values()):
        if isinstance(t, gs.Variable) and t.shape is not None and any(
                isinstance(d, int) and d < 0 for d in t.shape):
            # paddle2onnx writes -1 for a dynamic size: ONNX inference keeps it as a size
            # (a Reshape target then folds to a negative count) instead of inferring one
            t.shape = [d if not (isinstance(d, int) and d < 0) else None for d in t.shape]
        if isinstance(t, gs.Constant) and int(np.prod(t.shape)) > _PROBE_CONST_LIMIT:
            t.to_variable(dtype=t.dtype, shape=list(t.shape))
            t.type = "tensor_type"  # to_variable leaves it unset
            probe_graph.inputs.append(t)
        elif isinstance(t, gs.Constant) and isinstance(t._values, gs.ir.tensor.LazyValues):
            t.values = np.array(t._values.load())
    return gs_export.export_onnx(probe_graph)


def probe_concrete_shapes(graph: gs.Graph, input_shapes: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Shapes of ``graph``'s tensors with every dim known when its inputs have
    ``input_shapes``, folding the shape computations that become constant round by round:
    sizes that ONNX inference alone leaves open behind a computed ``Reshape`` target (an OCR
    recogniser's sequence length ``W / 8``). ``{}`` when probing fails."""
    sizes = {(t.name, axis): int(input_shapes[t.name][axis])
             for t in graph.inputs if t.name in input_shapes
             for axis, d in enumerate(t.shape or []) if not (isinstance(d, int) and d >= 0)}
    from graphprune.io.custom_shapes import observed_size

    # custom operators' outputs (a tokenizer's ids): at the sizes their run on random data gave
    sizes.update({(t.name, axis): observed_size(d) for t in _custom_cuts(graph)
                  for axis, d in enumerate(t.shape or []) if observed_size(d) is not None})
    try:
        with quiet_ort():
            shapes = _probe_shapes(_probe_model(graph), sizes)
    except Exception:  # a refinement only: the caller keeps what ONNX inference gave
        return {}
    return {name: [int(d) for d in shape] for name, shape in shapes.items()
            if all(isinstance(d, int) and d >= 0 for d in shape)}


#: pairs of sizes for open image axes (base a, base b, step per further symbol), tried in
#: order while a probe leaves tensors unsized: 224/288 first (large enough that downsampling
#: does not collapse them), then small ones for models that only run at small sizes (an OCR
#: recogniser's height 32 or 48, pooled to 1 before its sequence neck: at 224 its shapes stop
#: at the neck, and every group after it loses its rank)
IMAGE_PROBES = ((224, 288, 32), (32, 48, 16), (48, 64, 16), (16, 24, 8))


def _image_axes(graph: gs.Graph, symbolic: list[tuple[str, int]]) -> list[bool]:
    """Per open input axis: is it a spatial axis of a 4-D float input (an image axis)?"""
    by_name = {t.name: t for t in _probe_inputs(graph)}
    return [key[1] != 0 and len(by_name[key[0]].shape) == 4
            and np.issubdtype(np.dtype(by_name[key[0]].dtype), np.floating) for key in symbolic]


def _probe_sizes(graph: gs.Graph, symbolic: list[tuple[str, int]], image_sizes: tuple[int, int, int]
                 ) -> tuple[dict[tuple[str, int], int], dict[tuple[str, int], int]]:
    """One pair of sizes per symbol: batch axes 2/3, image axes ``image_sizes`` (+ a step per
    symbol), other axes (sequences) 16/24 (+8 per symbol): distinct within a probe, small
    enough for position tables."""
    chosen: dict[object, tuple[int, int]] = {}
    sizes_a: dict[tuple[str, int], int] = {}
    sizes_b: dict[tuple[str, int], int] = {}
    by_name = {t.name: t for t in _probe_inputs(graph)}
    base_a, base_b, step = image_sizes
    images = 0
    for key, image in zip(symbolic, _image_axes(graph, symbolic), strict=True):
        t = by_name[key[0]]
        symbol = t.shape[key[1]] if isinstance(t.shape[key[1]], str) else key
        if symbol not in chosen:
            # the first pair steps with every symbol (as it always has), the small ones with
            # the image symbols only: a height that must stay small stays small
            k = len(chosen) if image_sizes == IMAGE_PROBES[0] else images
            images += bool(image)
            chosen[symbol] = (
                BATCH_PROBE if key[1] == 0 else (base_a + step * k, base_b + step * k) if image
                else (16 + 8 * len(chosen), 24 + 8 * len(chosen))
            )
        sizes_a[key], sizes_b[key] = chosen[symbol]
    return sizes_a, sizes_b


def _known(shape: Sequence[int | None] | None) -> bool:
    """A probed shape with every size known."""
    return shape is not None and all(d is not None for d in shape)


def refine_shapes(graph: gs.Graph, given: Mapping[str, Sequence[int]] | None = None,
                  cache: dict | None = None) -> dict[str, tuple[list, list]]:
    """Fill in dimensions that ONNX inference leaves symbolic but that do not depend on inputs.

    Symbolic input sizes hide static sizes downstream: a Reshape to ``[B, S, -1, D]`` (the head
    count computed from ``H*D / D``), or a broadcast between two unrelated symbols. Shapes are
    inferred twice with concrete sizes for every symbolic input axis; an axis with the same
    size in both probes is static and gets that size (with static inputs, one probe fills in
    sizes hidden behind computed shapes). Where the probe sizes leave tensors unsized and the
    user ``given`` the input sizes the model runs at, those are tried (:func:`_pin_given`: a
    spectrogram's frequency axis that a dense layer fixes, left open in the file). Returns
    both probes per tensor name (rules use them to match re-factored dynamic axes). Nothing
    changes when inference fails. ``cache``: where the probes of this graph, as imported from
    one model, are kept for the next graph imported from it (a budget's candidates: with the
    sizes given, each took a second of ONNX Runtime inference on an 80 k-parameter VAD).
    """
    symbolic = [
        (t.name, axis)
        for t in _probe_inputs(graph)
        for axis, d in enumerate(t.shape or [])
        if not (isinstance(d, int) and d >= 0)
    ]
    if not symbolic and all(
        t.shape is not None and all(isinstance(d, int) and d >= 0 for d in t.shape)
        for t in graph.tensors().values()
        if isinstance(t, gs.Variable)
    ):
        return {}
    inputs = {t.name for t in _probe_inputs(graph)}
    variables = {n: t for n, t in graph.tensors().items() if isinstance(t, gs.Variable) and n not in inputs}
    # no size known (no rank, or only the rank ONNX Runtime's symbolic inference gave it:
    # ``contrib_shapes.annotate_ranks``): what other image sizes may size
    rankless = [n for n, t in variables.items() if t.shape is None or not any(isinstance(d, int) for d in t.shape)]
    if cache is not None and "probes" in cache:
        found = cache["probes"]
    else:
        found = _probes(graph, symbolic, variables, rankless, given)
        if cache is not None:
            cache["probes"] = found
    if found is None:
        return {}
    return _apply_probes(graph, *found)


def _probes(graph: gs.Graph, symbolic: list[tuple[str, int]], variables: Mapping[str, gs.Variable],
            rankless: list[str], given: Mapping[str, Sequence[int]] | None) -> tuple | None:
    """The two probes of :func:`refine_shapes`, the third that confirms sizes (or None) and the
    input sizes of the two; None when inference fails."""
    try:
        model = _probe_model(graph)
        best: tuple[int, dict, dict, tuple[int, int, int]] | None = None
        for image_sizes in IMAGE_PROBES if symbolic else IMAGE_PROBES[:1]:
            sizes_a, sizes_b = _probe_sizes(graph, symbolic, image_sizes)
            with quiet_ort():
                probe_a = _probe_shapes(model, sizes_a)
                # static inputs: one probe (of folded shape computations) says it all
                probe_b = _probe_shapes(model, sizes_b) if symbolic else probe_a
            sized = sum(1 for n in variables if _known(probe_a.get(n)) and _known(probe_b.get(n)))
            if best is None or sized > best[0]:
                best = (sized, probe_a, probe_b, image_sizes)
            if all(_known(probe_a.get(n)) and _known(probe_b.get(n)) for n in rankless) \
                    or not any(_image_axes(graph, symbolic)):
                break  # nothing left without a rank that other image sizes could give one
        _, probe_a, probe_b, image_sizes = best  # type: ignore[misc]
        sizes_a, sizes_b = _probe_sizes(graph, symbolic, image_sizes)
        pinned = _pin_given(graph, model, symbolic, given, (sizes_a, sizes_b)) if given else None
        confirm = None
        if pinned is not None:
            sizes_a, sizes_b, probe_a, probe_b = pinned
        elif image_sizes != IMAGE_PROBES[0]:
            # small sizes collapse downsampled axes to equal sizes in both probes (32 and 48
            # pooled by 32 are both 1): a size is static only where a third, larger probe agrees
            base_a, base_b, step = image_sizes
            with quiet_ort():
                confirm = _probe_shapes(model, _probe_sizes(graph, symbolic, (base_b + base_b - base_a, 0, step))[0])
    except Exception:  # a refinement only; the analysis copes with unknown sizes
        return None
    return probe_a, probe_b, confirm, sizes_a, sizes_b


def _apply_probes(graph: gs.Graph, probe_a: dict, probe_b: dict, confirm: dict | None, sizes_a: dict, sizes_b: dict
                  ) -> dict[str, tuple[list, list]]:
    """Give ``graph``'s tensors the sizes both probes agree on (see :func:`refine_shapes`)."""
    for name, tensor in graph.tensors().items():
        if not isinstance(tensor, gs.Variable):
            continue
        a, b = probe_a.get(name), probe_b.get(name)
        if a is None or b is None or len(a) != len(b):
            continue
        c = confirm.get(name) if confirm is not None else None
        if c is not None and len(c) == len(a):  # a size the third probe contradicts stays open
            b = [db if c[axis] == db else None for axis, db in enumerate(b)]
        shape: list | None = list(tensor.shape) if tensor.shape is not None else None
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
    probes = {n: (a, probe_b[n]) for n, a in probe_a.items() if n in probe_b}
    # the graph's inputs at the sizes the probes gave them (a Reshape of an input)
    for t in _probe_inputs(graph):
        if t.name not in probes and t.shape is not None:
            probes[t.name] = tuple(  # type: ignore[assignment]
                [sizes.get((t.name, axis), d if isinstance(d, int) and d >= 0 else None)
                 for axis, d in enumerate(t.shape)]
                for sizes in (sizes_a, sizes_b)
            )
    return probes


def _pin_given(graph: gs.Graph, model: onnx.ModelProto, symbolic: list[tuple[str, int]],
               given: Mapping[str, Sequence[int]], sizes: tuple[dict, dict]) -> tuple[dict, dict, dict, dict] | None:
    """Probe sizes with the ``given`` input sizes where the generic ones are sizes the model
    cannot run at (strict ONNX inference finds incompatible shapes: madmom's note CNN flattens
    its spectrogram's 144 bins into a dense layer) and the given ones are not: every given
    axis at its given size in both probes (static), except those that can be set free again
    with the inference as clean (their generic pair, else the given size and twice it), so
    that only the axes the model cannot run without stay static. ``(sizes_a, sizes_b,
    probe_a, probe_b)``, or ``None`` where the given sizes do not help."""
    by_name = {t.name: t for t in _probe_inputs(graph)}
    groups: dict[object, list[tuple[str, int]]] = {}
    for key in symbolic:
        shape = given.get(key[0])
        if shape is not None and len(shape) == len(by_name[key[0]].shape or ()) and int(shape[key[1]]) > 0:
            dim = by_name[key[0]].shape[key[1]]
            groups.setdefault(dim if isinstance(dim, str) else key, []).append(key)
    if not groups:
        return None
    generic_a, generic_b = sizes

    def at(pairs: dict[object, tuple[int, int] | None]) -> tuple[dict, dict]:
        a, b = dict(generic_a), dict(generic_b)
        for symbol, pair in pairs.items():
            for key in groups[symbol]:
                a[key], b[key] = pair if pair is not None else (generic_a[key], generic_b[key])
        return a, b

    value = {symbol: int(given[keys[0][0]][keys[0][1]]) for symbol, keys in groups.items()}
    pinned = {symbol: (v, v) for symbol, v in value.items()}
    freer = [(symbol, pair) for symbol, v in value.items() for pair in (None, (v, 2 * v))]
    # one run of the checks: the generic sizes, all pinned, and each axis set free alone
    trials = [(generic_a, generic_b), at(pinned), *(at({**pinned, symbol: pair}) for symbol, pair in freer)]
    found = _inference_errors(model, [sizes for pair in trials for sizes in pair])
    errors = [max(found[2 * i], found[2 * i + 1]) for i in range(len(trials))]
    if not errors[0] or errors[1] >= errors[0]:
        return None
    pairs = dict(pinned)
    for (symbol, pair), count in zip(freer, errors[2:], strict=True):
        if pinned.get(symbol) == pairs[symbol] and count <= errors[1]:
            pairs[symbol] = pair
    a, b = at(pairs)
    if sum(pairs[symbol] != pinned[symbol] for symbol in pairs) > 1 and max(_inference_errors(model, [a, b])) > errors[1]:
        a, b = at(pinned)  # the axes are free one at a time, not together
    return a, b, _probe_shapes(model, a), _probe_shapes(model, b)


def _inference_errors(model: onnx.ModelProto, size_sets: list[dict[tuple[str, int], int]]) -> list[int]:
    """Per entry of ``size_sets`` (graph input axis ``(name, axis)`` -> size), how many nodes
    strict ONNX inference finds fault with at those sizes (the outputs' declared shapes left
    out: an exporter's may be stale); 0 where it finds none. Shape computations are propagated
    (``data_prop``): a reshape to a shape made by Shape/Slice/Concat leaves sizes that a later
    reshape with a size baked in cannot take otherwise unseen (a dynamo-exported bi-LSTM). It runs in a process of its own:
    at sizes a model cannot take, ONNX's inference can abort the process (a C++ assertion in
    a ``std::clamp`` on madmom's onset CNN at 2 frames); such an entry counts as a fault
    everywhere, and the entries after it are checked in a new process."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.output:
        value.type.tensor_type.ClearField("shape")
    del probe.graph.value_info[:]
    body = probe.SerializeToString()
    out: list[int] = []
    while len(out) < len(size_sets):
        todo = [[[name, axis, int(size)] for (name, axis), size in sizes.items()] for sizes in size_sets[len(out):]]
        header = json.dumps(todo).encode()
        try:
            done = subprocess.run([sys.executable, "-c", _STRICT_INFERENCE], capture_output=True, check=False,
                                  input=len(header).to_bytes(8, "little") + header + body, timeout=_STRICT_TIMEOUT)
            lines = done.stdout.decode(errors="replace").split()
        except (OSError, subprocess.TimeoutExpired):
            lines = []
        counts = [int(x) for x in lines if x.isdigit()][: len(todo)]
        out += counts
        if len(counts) < len(todo):
            out.append(_ABORTED)  # the entry it died on
    return out


#: strict inference of the model read from stdin at each list of ``[input, axis, size]``
#: (its JSON ahead of the model, after its length): one count per line, as it goes
_STRICT_INFERENCE = """
import json, sys, onnx
data = sys.stdin.buffer.read()
n = int.from_bytes(data[:8], "little")
model = onnx.load_from_string(data[8 + n:])
for entry in json.loads(data[8:8 + n]):
    sizes = {(name, axis): size for name, axis, size in entry}
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for value in probe.graph.input:
        for axis, dim in enumerate(value.type.tensor_type.shape.dim):
            if (value.name, axis) in sizes:
                dim.Clear()
                dim.dim_value = sizes[(value.name, axis)]
    try:
        onnx.shape_inference.infer_shapes(probe, strict_mode=True, data_prop=True)
        count = 0
    except Exception as exc:
        count = max(1, str(exc).count("node name:"))
    print(count, flush=True)
"""
_STRICT_TIMEOUT = 300
#: the fault count of an inference that aborted its process (or could not run)
_ABORTED = 10**6
