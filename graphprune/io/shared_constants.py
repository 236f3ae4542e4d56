"""Constants read by several nodes: untie exporters' de-duplication, share subgraph copies.

Exporters store equal tensors once (the TorchScript exporter and the dynamo exporter both
de-duplicate initializers): every all-zero bias of one width, every fresh norm weight, a
Reshape target used by each attention layer becomes one initializer that many nodes read.
Read by several layers, such a vector would couple their channels into one group (a
random-initialised BERT's attention heads with its residual stream: no head prunable).
:func:`untie_shared_constants` gives every reader of a shared vector constant its own copy
(a reference to the same bytes; the values do not change), and :func:`retie_constants` makes
the copies that are still equal after a rewrite one initializer again. Tensors with two or
more axes longer than 1 stay shared: a weight matrix read twice is more likely tied on
purpose (ALBERT's layers, tied embeddings), and its copies would grow the model. A model can
name constants that are shared on purpose in its metadata (:func:`mark_shared`; the PyTorch
frontend marks parameters that several nodes read: one tensor of the module).


Constant folding computes a value read by an ``If``/``Loop`` body (an ``Unsqueeze`` of an
outer LSTM weight, a ``Cast`` of a shared table) inside each body that reads it: two
branches that read one outer weight come out holding one copy each, and the model grows
(silero VAD v5: +40 %). :func:`share_subgraph_constants` finds initializers of subgraphs
that are byte-for-byte equal to another subgraph's or to a main-graph initializer and makes
them one main-graph initializer (visible in every subgraph) that all of them read.

Only subgraph initializers are candidates, and main-graph initializers are read only where
one has the dtype and shape of a candidate: a model without subgraphs costs nothing.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable

import onnx
from onnx import helper

from graphprune.io.graph_reads import rename_reads, subgraphs
from graphprune.io.names import fresh_name

__all__ = ["SHARED_KEY", "TIE", "mark_shared", "readers", "retie_constants", "retie_shapes", "share_subgraph_constants",
           "subgraph_copies", "tied_origin", "untie_shared_constants", "untie_shared_dequantized", "untie_shared_shapes"]

#: the name of a copy made by :func:`untie_shared_constants`: ``NAME__gp_tie``, ``NAME__gp_tie_1``, ...
TIE = "__gp_tie"

#: metadata key of a model: a JSON list of initializers shared on purpose (never untied)
SHARED_KEY = "graphprune.shared"

#: smaller constants are left alone (a scalar or a shape is not worth a shared name)
MIN_ELEMENTS = 64


def _defined(graph: onnx.GraphProto) -> set[str]:
    """Names a graph or any graph inside it defines (they would shadow an outer name)."""
    names = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    names |= {o for n in graph.node for o in n.output}
    for sub in subgraphs(graph):
        names |= {t.name for t in sub.initializer} | {i.name for i in sub.input}
        names |= {o for n in sub.node for o in n.output}
    return names


def _rename(graph: onnx.GraphProto, old: str, new: str) -> None:
    """Make ``graph`` (nested subgraphs included) read ``new`` where it reads ``old``."""
    _rename_all(graph, {old: new})


def _rename_all(graph: onnx.GraphProto, renames: dict[str, str]) -> None:
    """Make ``graph`` (nested subgraphs included) read ``renames[x]`` where it reads ``x``, in
    one pass (one pass per name was 3,824 walks of MAXIM's 40 k nodes: 100 s of a prune)."""
    if not renames:
        return
    rename_reads(graph, renames)
    for each in (graph, *subgraphs(graph)):
        for out in list(each.output):  # an output that was the constant itself
            if out.name in renames:
                each.node.append(helper.make_node("Identity", [renames[out.name]], [out.name]))


def _equal_sets(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], bytes]
                ) -> list[list[tuple[onnx.GraphProto | None, onnx.TensorProto]]]:
    """Sets of byte-for-byte equal initializers, each with a subgraph's among them, as (the
    subgraph holding it or ``None`` for the main graph, the tensor)."""
    subs = [(sub, t) for sub in subgraphs(model.graph) for t in sub.initializer
            if len(t.dims) and math.prod(t.dims) >= MIN_ELEMENTS]
    if not subs:
        return []
    kinds = {(t.data_type, tuple(t.dims)) for _, t in subs}
    main = [t for t in model.graph.initializer if (t.data_type, tuple(t.dims)) in kinds]
    by_key: dict[tuple, list[tuple[onnx.GraphProto | None, onnx.TensorProto]]] = defaultdict(list)
    for owner, tensor in [*((None, t) for t in main), *subs]:
        digest = hashlib.blake2b(read(tensor), digest_size=16).digest()
        by_key[(tensor.data_type, tuple(tensor.dims), digest)].append((owner, tensor))
    return [m for m in by_key.values() if len(m) >= 2 and any(g is not None for g, _ in m)]


def subgraph_copies(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], bytes]) -> list[onnx.TensorProto]:
    """The subgraph initializers :func:`share_subgraph_constants` would store once: every
    member of an equal set but one (a main-graph one where the set has one). What a model
    holds counted with them once, as every model the tool writes stores them (the standalone
    model of an ``If`` branch of a prepared model holds a copy per nested branch: silero VAD
    v5's 16 kHz branch counted 442 k parameters for 310 k)."""
    out = []
    for members in _equal_sets(model, read):
        copies = [t for g, t in members if g is not None]
        out.extend(copies if len(copies) < len(members) else copies[1:])
    return out


def share_subgraph_constants(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], bytes]) -> int:
    """Make equal subgraph constants one main-graph initializer (see the module docstring);
    ``read`` gives a tensor's bytes (external ones included). Returns the copies dropped."""
    taken = {t.name for t in model.graph.initializer} | _defined(model.graph)
    dropped = 0
    for members in _equal_sets(model, read):
        copies = [(g, t) for g, t in members if g is not None]
        shared = next((t for g, t in members if g is None), None)
        if shared is None:
            hoisted = onnx.TensorProto()
            hoisted.CopyFrom(copies[0][1])
            hoisted.name = fresh_name(f"{copies[0][1].name}__gp_shared", taken)
            model.graph.initializer.append(hoisted)
            shared = hoisted
        for graph, tensor in copies:
            if shared.name in _defined(graph) - {tensor.name}:
                continue  # the shared name would be shadowed inside this subgraph
            name = tensor.name
            kept = [t for t in graph.initializer if t.name != name]
            del graph.initializer[:]
            graph.initializer.extend(kept)
            _rename(graph, name, shared.name)
            dropped += 1
    return dropped




def tied_origin(name: str) -> str:
    """The name of the constant that ``name`` (a copy made by untying, or any name) copies."""
    return name.split(TIE, 1)[0] if TIE in name else name


def readers(model: onnx.ModelProto, names: Iterable[str]) -> Counter[str]:
    """How many main-graph node inputs read each of the initializers ``names``."""
    wanted = set(names)
    return Counter(name for node in model.graph.node for name in node.input if name in wanted)


def mark_shared(model: onnx.ModelProto, names: Iterable[str]) -> None:
    """Record in ``model``'s metadata that the initializers ``names`` are shared on purpose:
    :func:`untie_shared_constants` leaves them shared (their readers prune together)."""
    names = sorted(set(names) | _marked(model))
    kept = [p for p in model.metadata_props if p.key != SHARED_KEY]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    if names:
        entry = model.metadata_props.add()
        entry.key, entry.value = SHARED_KEY, json.dumps(names)


def _marked(model: onnx.ModelProto) -> set[str]:
    for entry in model.metadata_props:
        if entry.key == SHARED_KEY:
            try:
                return {str(n) for n in json.loads(entry.value)}
            except (ValueError, TypeError):
                return set()
    return set()


def untie_shared_constants(model: onnx.ModelProto) -> int:
    """Give each main-graph node that reads a shared vector initializer (exactly one axis
    longer than 1) its own copy; returns the copies made. A constant that a subgraph reads,
    that is a graph output, or that the model marks as shared (:func:`mark_shared`) stays as
    it is."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name in inits:
                readers[name].append((node, k))
    shared = [name for name, slots in readers.items()
              if len(slots) > 1 and sum(d > 1 for d in inits[name].dims) == 1]
    if not shared:
        return 0
    inner: set[str] = set()
    for sub in subgraphs(graph):
        inner |= {name for node in sub.node for name in node.input}
    keep = inner | {o.name for o in graph.output} | _marked(model)
    taken = _defined(graph)
    made = 0
    for name in shared:
        if name in keep:
            continue
        for node, k in readers[name][1:]:
            copy_ = onnx.TensorProto()
            copy_.CopyFrom(inits[name])
            copy_.name = fresh_name(f"{name}{TIE}", taken)
            graph.initializer.append(copy_)
            node.input[k] = copy_.name
            made += 1
    return made


def _dequantized_vectors(graph: onnx.GraphProto, opset: int) -> list[onnx.NodeProto]:
    """The main graph's nodes that decode a stored constant (``DequantizeLinear``:
    ``OpRule.decodes_constants``) of initializers alone whose integer input is a vector (exactly
    one axis longer than 1)."""
    from graphprune.rules import registry

    inits = {t.name: t for t in graph.initializer}

    def decodes(node: onnx.NodeProto) -> bool:
        rule = registry.lookup(node.domain or "", node.op_type, opset)
        return rule is not None and node.op_type in rule.decodes_constants

    return [node for node in graph.node if node.input and all(not name or name in inits for name in node.input)
            and sum(d > 1 for d in inits[node.input[0]].dims) == 1 and decodes(node)]


def untie_shared_dequantized(model: onnx.ModelProto) -> int:
    """A shared vector stored quantized: a QDQ quantizer's ``DequantizeLinear`` of an integer
    initializer whose output several nodes read (ONNX Runtime's ``quantize_static`` of a
    TorchScript export: the de-duplicated zero bias of every layer, read through one
    ``Identity`` per layer, quantized once). Each further reader gets its own
    ``DequantizeLinear`` of the same constants, which :func:`untie_shared_constants` then
    copies; :func:`retie_constants` makes the copies one node again. Before, a random-initialised
    BERT's QDQ copy coupled its heads and an MLP with its residual stream (one prunable group of
    five, where the float file has four). Returns the nodes made."""
    from graphprune.io.model_io import default_opset

    graph = model.graph
    nodes = _dequantized_vectors(graph, default_opset(model))
    if not nodes:
        return 0
    slots: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for k, name in enumerate(node.input):
            slots[name].append((node, k))
    inner: set[str] = set()
    for sub in subgraphs(graph):
        inner |= {name for node in sub.node for name in node.input}
    keep = inner | {o.name for o in graph.output} | _marked(model)
    taken, names = _defined(graph), {n.name for n in graph.node}
    copies: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for dq in nodes:
        out = dq.output[0]
        if len(slots[out]) < 2 or out in keep or dq.input[0] in keep:
            continue
        for node, k in slots[out][1:]:
            copy_ = onnx.NodeProto()
            copy_.CopyFrom(dq)
            copy_.name = fresh_name(f"{dq.name or out}{TIE}", names)
            copy_.output[0] = fresh_name(f"{out}{TIE}", taken)
            names.add(copy_.name)
            node.input[k] = copy_.output[0]
            copies[id(dq)].append(copy_)
    return _insert_after(graph, copies)


def _insert_after(graph: onnx.GraphProto, copies: dict[int, list[onnx.NodeProto]]) -> int:
    """Put the nodes ``copies`` holds right after the node (by ``id``) they follow; how many."""
    if not copies:
        return 0
    ordered = [m for node in graph.node for m in (node, *copies.get(id(node), ()))]
    del graph.node[:]
    graph.node.extend(ordered)
    return sum(len(c) for c in copies.values())


def _slots(graph: onnx.GraphProto) -> tuple[dict[str, list[tuple[onnx.NodeProto, int]]], set[str]]:
    """Every main-graph input slot ``(node, index)`` by the name it reads, and the names no copy
    may replace (read inside a subgraph, or a graph output)."""
    slots: dict[str, list[tuple[onnx.NodeProto, int]]] = defaultdict(list)
    for node in graph.node:
        for k, name in enumerate(node.input):
            if name:
                slots[name].append((node, k))
    inner: set[str] = set()
    for sub in subgraphs(graph):
        inner |= {name for node in sub.node for name in node.input}
    return slots, inner | {o.name for o in graph.output}


#: nodes followed back from a value several layers read to the one that replicates it (a mask's reshapes)
MAX_BROADCAST_CHAIN = 8


def untie_shared_broadcasts(model: onnx.ModelProto) -> int:
    """A value that several nodes read, replicated along a new axis (``Expand``, ``Tile``:
    :attr:`~graphprune.rules.registry.OpRule.replicates`) and then only moved or mapped value
    by value (reshapes, a cast: rules whose ``zero_behaviour`` is ``move`` or ``map``; a
    quantizer's ``QuantizeLinear`` / ``DequantizeLinear``: ``OpRule.recodes``; a QDQ copy's mask
    passes them): each further reader gets its own copy of
    that chain, from the replicating node on; returns the nodes made. torch.export expands a
    padding mask to ``[B, H, 1, T]`` once for an ``nn.TransformerEncoder`` and every layer adds
    it to its scores: the mask's head axis tied all layers' heads into one group. The copies
    read the same inputs (their shapes are untied after: :func:`untie_shared_shapes`), so the
    values do not change; :func:`retie_shapes` merges those still equal after a rewrite."""
    from graphprune.io.model_io import default_opset
    from graphprune.rules import registry

    graph = model.graph
    opset = default_opset(model)
    producer = {out: node for node in graph.node for out in node.output if out}
    slots, keep = _slots(graph)

    def chain(name: str) -> list[onnx.NodeProto]:
        """The nodes from the one that replicates ``name``'s value to its producer, or none."""
        found: list[onnx.NodeProto] = []
        for _ in range(MAX_BROADCAST_CHAIN):
            node = producer.get(name)
            rule = registry.lookup(node.domain or "", node.op_type, opset) if node is not None else None
            if rule is None or len(node.output) != 1 or not node.input or (
                    rule.zero_behaviour not in ("move", "map") and node.op_type not in rule.recodes):
                return []
            found.append(node)
            if node.op_type in rule.replicates:
                return found[::-1]
            name = node.input[0]
        return []

    def reads_values(node: onnx.NodeProto) -> bool:  # (a Shape of the value stays with the first reader)
        rule = registry.lookup(node.domain or "", node.op_type, opset)
        return rule is None or not rule.reads_only_shape

    taken, names = _defined(graph), {n.name for n in graph.node}
    copies: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # after the node they follow
    for name, slots_of in slots.items():
        readers = [(node, k) for node, k in slots_of if reads_values(node)]
        nodes = chain(name) if len(readers) > 1 and name not in keep else []
        for node, k in readers[1:] if nodes else ():
            made = {}
            for original in nodes:
                copy_ = onnx.NodeProto()
                copy_.CopyFrom(original)
                copy_.name = fresh_name(f"{original.name or original.output[0]}{TIE}", names)
                names.add(copy_.name)
                for j, read in enumerate(copy_.input):
                    copy_.input[j] = made.get(read, read)
                copy_.output[0] = made[original.output[0]] = fresh_name(f"{original.output[0]}{TIE}", taken)
                copies[id(nodes[-1])].append(copy_)
            node.input[k] = made[name]
    return _insert_after(graph, copies)


def _retie_dequantized(graph: onnx.GraphProto, opset: int) -> int:
    """Make the ``DequantizeLinear`` copies :func:`untie_shared_dequantized` made one node again
    where they still read the same constants (after :func:`retie_constants` made those one)."""
    same: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for node in _dequantized_vectors(graph, opset):
        same[(tuple(node.input), tuple(a.SerializeToString() for a in node.attribute))].append(node)
    renames: dict[str, str] = {}
    dropped: set[int] = set()
    for members in same.values():
        if len(members) < 2 or not any(TIE in n.name for n in members):
            continue
        survivor = min(members, key=lambda n: (TIE in n.name, len(n.name), n.name))
        for node in members:
            if node is not survivor and TIE in node.name:
                renames[node.output[0]] = survivor.output[0]
                dropped.add(id(node))
    if not dropped:
        return 0
    kept = [n for n in graph.node if id(n) not in dropped]
    del graph.node[:]
    graph.node.extend(kept)
    _rename_all(graph, renames)
    infos = [v for v in graph.value_info if v.name not in renames]
    del graph.value_info[:]
    graph.value_info.extend(infos)
    return len(dropped)


#: longest shape tensor :func:`untie_shared_shapes` copies (a shape has one entry per axis)
MAX_SHAPE_LENGTH = 16


def untie_shared_shapes(model: onnx.ModelProto) -> int:
    """Give each main-graph node that reads a shape joined in the graph (a 1-D integer
    ``Concat`` of literals and read sizes: ``[1, num_kv_heads, n_rep, seq, head_size]``, the
    ``Expand`` target of grouped-query attention), or a shape scaled by a literal (the
    dynamo exporter's ``batch * num_heads`` of ``nn.MultiheadAttention``) and the single
    values carried on from it, its own copy of the joining or scaling node; returns the
    copies made. An exporter that computes such a shape once for every layer (the dynamo
    exporter's common-subexpression pass) would otherwise tie the layers' heads into one
    group: a literal of the shared shape gives the size of every axis it sets. The copy reads
    the same inputs, so the values do not change; :func:`retie_shapes` merges the copies
    that are still equal after a rewrite."""
    from graphprune.io.model_io import default_opset
    from graphprune.rules import registry

    graph = model.graph
    opset = default_opset(model)
    readers_of, keep = _slots(graph)
    info = {v.name: v for v in graph.value_info}
    literals = {t.name for t in graph.initializer if math.prod(t.dims) <= MAX_SHAPE_LENGTH
                and t.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32)}
    taken = _defined(graph) | {n.name for n in graph.node}

    def int_value(name: str, scalar_ok: bool) -> onnx.ValueInfoProto | None:
        """The value info of an integer shape (1-D, short) or, with ``scalar_ok``, a scalar."""
        value = info.get(name)
        tensor = value.type.tensor_type if value is not None and value.type.HasField("tensor_type") else None
        if tensor is None or tensor.elem_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
            return None
        dims = tensor.shape.dim
        if len(dims) == 1 and 0 < dims[0].dim_value <= MAX_SHAPE_LENGTH:
            return value
        return value if scalar_ok and (not dims or (len(dims) == 1 and dims[0].dim_value == 1)) else None

    # the copyable nodes and their outputs' value info: joins, what a literal scales, and the
    # single values carried on from it (``Reshape(b * H, [-1])``)
    scaled: set[str] = set()
    copyable: dict[int, onnx.ValueInfoProto] = {}
    for node in graph.node:
        if len(node.output) != 1:
            continue
        rule = registry.lookup(node.domain or "", node.op_type, opset)
        value = None
        if rule is not None and type(rule).concat_axis is not registry.OpRule.concat_axis:
            value = int_value(node.output[0], False)
        elif (rule is not None and node.op_type in rule.shape_scaling_ops
              and any(name in literals for name in node.input)) \
                or (any(name in scaled for name in node.input)
                    and sum(name not in literals for name in node.input if name) == 1):
            value = int_value(node.output[0], True)
            if value is not None:
                scaled.add(node.output[0])
        if value is not None:
            copyable[id(node)] = value
    made = 0
    copies: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for node in reversed(list(graph.node)):  # readers first: a copied reader reads its own copy
        value = copyable.get(id(node))
        if value is None or node.output[0] in keep or len(readers_of[node.output[0]]) < 2:
            continue
        for reader, k in readers_of[node.output[0]][1:]:
            copy_ = onnx.NodeProto()
            copy_.CopyFrom(node)
            copy_.name = fresh_name(f"{node.name or node.op_type}{TIE}", taken)
            copy_.output[0] = fresh_name(f"{node.output[0]}{TIE}", taken)
            taken |= {copy_.name, copy_.output[0]}
            shape = onnx.ValueInfoProto()
            shape.CopyFrom(value)
            shape.name = copy_.output[0]
            graph.value_info.append(shape)
            copies[id(node)].append(copy_)  # right after the node it copies: the order stays topological
            reader.input[k] = copy_.output[0]
            for j, name in enumerate(copy_.input):
                if name:
                    readers_of[name].append((copy_, j))
            made += 1
        readers_of[node.output[0]] = readers_of[node.output[0]][:1]
    if made:
        ordered = [n for node in graph.node for n in (node, *copies.get(id(node), ()))]
        del graph.node[:]
        graph.node.extend(ordered)
    return made


def retie_shapes(model: onnx.ModelProto) -> int:
    """Merge the copies :func:`untie_shared_shapes` and :func:`untie_shared_broadcasts` made
    that still compute the same thing (same op, inputs and attributes) back into one node,
    until none is left (a chain of copies merges from its first node on); returns the copies
    dropped."""
    dropped = total = _retie_shapes_once(model)
    while dropped:
        dropped = _retie_shapes_once(model)
        total += dropped
    return total


def _retie_shapes_once(model: onnx.ModelProto) -> int:
    """One pass of :func:`retie_shapes`."""
    graph = model.graph
    origins = {tied_origin(o) for n in graph.node for o in n.output if TIE in o}
    if not origins:
        return 0
    small = {t.name: t for t in graph.initializer
             if math.prod(t.dims) <= MAX_SHAPE_LENGTH and not t.external_data}

    def operand(name: str) -> tuple:
        """An input by its value where it is a small constant (a rewrite gives each copy its
        own literal tensor), else by its name."""
        t = small.get(name)
        return ("name", name) if t is None else ("value", t.data_type, tuple(t.dims), _values(t))

    families: dict[tuple, list[onnx.NodeProto]] = defaultdict(list)
    for node in graph.node:
        if len(node.output) == 1 and tied_origin(node.output[0]) in origins:
            attrs = tuple(a.SerializeToString(deterministic=True) for a in node.attribute)
            key = (tied_origin(node.output[0]), node.domain, node.op_type, tuple(map(operand, node.input)), attrs)
            families[key].append(node)
    outputs = {o.name for o in graph.output}
    dropped: set[str] = set()
    renames: dict[str, str] = {}
    for members in families.values():
        if len(members) < 2 or not any(TIE in n.output[0] for n in members):
            continue
        survivor = min(members, key=lambda n: (TIE in n.output[0], len(n.output[0]), n.output[0]))
        for node in members:
            if node is not survivor and node.output[0] not in outputs:
                renames[node.output[0]] = survivor.output[0]
                dropped.add(node.output[0])
    _rename_all(graph, renames)
    if dropped:
        gone = [n for n in graph.node if len(n.output) == 1 and n.output[0] in dropped]
        kept = [n for n in graph.node if not (len(n.output) == 1 and n.output[0] in dropped)]
        del graph.node[:]
        graph.node.extend(kept)
        values = [v for v in graph.value_info if v.name not in dropped]
        del graph.value_info[:]
        graph.value_info.extend(values)
        read = {name for n in kept for name in n.input}
        for sub in subgraphs(graph):
            read |= {name for n in sub.node for name in n.input}
        unread = {name for n in gone for name in n.input if name in small and name not in read}
        if unread:  # the literals only the merged copies read
            inits = [t for t in graph.initializer if t.name not in unread]
            del graph.initializer[:]
            graph.initializer.extend(inits)
    return len(dropped)


def _values(tensor: onnx.TensorProto) -> tuple:
    from onnx import numpy_helper

    return tuple(numpy_helper.to_array(tensor).reshape(-1).tolist())


def retie_constants(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], bytes]) -> int:
    """Make the copies :func:`untie_shared_constants` made one initializer again where they
    are still equal (the original's name first); returns the copies dropped."""
    graph = model.graph
    families: dict[str, list[onnx.TensorProto]] = defaultdict(list)
    for tensor in graph.initializer:
        families[tied_origin(tensor.name)].append(tensor)
    dropped: set[str] = set()
    renames: dict[str, str] = {}
    for members in families.values():
        if len(members) < 2 or not any(TIE in t.name for t in members):
            continue
        equal: dict[tuple, list[onnx.TensorProto]] = defaultdict(list)
        for tensor in members:
            digest = hashlib.blake2b(read(tensor), digest_size=16).digest()
            equal[(tensor.data_type, tuple(tensor.dims), digest)].append(tensor)
        for same in equal.values():
            survivor = min(same, key=lambda t: (TIE in t.name, len(t.name), t.name))
            for tensor in same:
                if tensor is not survivor:
                    renames[tensor.name] = survivor.name
                    dropped.add(tensor.name)
    _rename_all(graph, renames)
    if dropped:
        kept = [t for t in graph.initializer if t.name not in dropped]
        del graph.initializer[:]
        graph.initializer.extend(kept)
        from graphprune.io.model_io import default_opset

        _retie_dequantized(graph, default_opset(model))
    return len(dropped)
