"""A tensor split into a sequence and read back part by part: slices of the tensor.

The dynamo exporter without its optimiser (``optimize=False``, what the PyTorch frontend
exports with) writes ``torch.chunk`` and ``torch.split`` as ``SplitToSequence`` followed by
one ``SequenceAt`` per part used: a SwiGLU MLP's ``gate, up = x.chunk(2, -1)`` (Phi-3, the
experts of Mixtral-style MoEs). No rule follows channels through a sequence, so the MLP's
width froze. When every reader of the sequence is a ``SequenceAt`` at a constant position
and the split sizes are constants, :func:`slice_sequence_reads` writes each read as the
``Slice`` of the input it stands for (part ``p`` of chunks of ``c``: ``[p c, (p + 1) c)``,
the last chunk cut short by the axis end as ``SplitToSequence`` cuts it), and drops the
sequence. The model computes the same values.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from graphprune.io.graph_reads import subgraphs
from graphprune.io.names import fresh_name

__all__ = ["slice_sequence_reads"]


def _constant(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of a small integer constant (an initializer held in the file's message, or a
    ``Constant`` node); ``None`` for anything else."""
    found = [t for t in graph.initializer if t.name == name]
    found += [a.t for n in graph.node if n.op_type == "Constant" and n.output[0] == name
              for a in n.attribute if a.name == "value"]
    if len(found) != 1 or found[0].data_location == onnx.TensorProto.EXTERNAL:
        return None
    if found[0].data_type not in (onnx.TensorProto.INT64, onnx.TensorProto.INT32):
        return None
    return numpy_helper.to_array(found[0])


def _bounds(split: np.ndarray, position: int) -> tuple[int, int] | None:
    """``[start, end)`` of part ``position`` (``None``: a position outside the parts)."""
    if split.ndim == 0:
        chunk = int(split)
        if chunk <= 0 or position < 0:
            return None
        return position * chunk, (position + 1) * chunk
    sizes = [int(s) for s in split.reshape(-1)]
    if position < 0:
        position += len(sizes)
    if not 0 <= position < len(sizes) or min(sizes, default=0) < 0:
        return None
    start = sum(sizes[:position])
    return start, start + sizes[position]


def slice_sequence_reads(graph: onnx.GraphProto) -> int:
    """Rewrite (in place) every ``SplitToSequence`` whose parts are only read by
    ``SequenceAt`` at constant positions as one ``Slice`` per read; returns how many
    sequences went."""
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    kept = {o.name for o in graph.output} | {name for sub in subgraphs(graph) for n in sub.node for name in n.input}
    taken = {t.name for t in graph.initializer} | {o for n in graph.node for o in n.output} | {
        i.name for i in graph.input}
    done = 0
    for node in list(graph.node):
        if node.op_type != "SplitToSequence" or node.domain not in ("", "ai.onnx"):
            continue
        sequence = node.output[0]
        split = _constant(graph, node.input[1]) if len(node.input) > 1 and node.input[1] else None
        reads = readers.get(sequence, [])
        if split is None or sequence in kept or not reads:
            continue
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        plans = []
        for read in reads:
            position = _constant(graph, read.input[1]) if read.op_type == "SequenceAt" else None
            bounds = None if position is None or position.size != 1 else _bounds(split, int(position.reshape(-1)[0]))
            if bounds is None:
                break
            plans.append((read, bounds))
        else:
            for read, (start, end) in plans:
                names = [fresh_name(f"{read.output[0]}_{part}", taken) for part in ("start", "end", "axis")]
                taken.update(names)
                for name, value in zip(names, (start, end, axis), strict=True):
                    graph.initializer.append(numpy_helper.from_array(np.array([value], np.int64), name))
                sliced = helper.make_node("Slice", [node.input[0], *names], [read.output[0]], name=read.name)
                read.CopyFrom(sliced)
            graph.node.remove(node)
            done += 1
    return done
