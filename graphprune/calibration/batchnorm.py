"""Data-free expected activations from BatchNormalization statistics.

Where the graph still has BatchNormalization nodes (in inference mode), their running mean
and variance describe the distribution of their inputs on the training data. Treating each
BN input channel as Gaussian with those moments, independent across channels, the expected
value of a tensor computed from BN inputs alone without another linear layer on the way (BN
-> activation -> [pooling, residual additions of other such paths] -> consumer input) is
estimated by running that part of the graph in ONNX Runtime on ``SAMPLES`` synthetic draws
at one spatial position. No calibration data is needed.

:func:`expected_inputs` gives these means as :class:`~.stats.LayerStats` for the consumers of
removed channels, so that the bias compensation (``E[x_c]`` of the removed channels folded
into the consumer bias) runs without data. A consumer whose input depends on a graph input,
on a linear layer after the BN, or on no BN at all is skipped with a reason.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from graphprune.calibration import runner
from graphprune.calibration.linear import LinearView, linear_view
from graphprune.calibration.stats import ChannelStats, LayerStats
from graphprune.errors import VerificationError
from graphprune.io.graph_reads import node_reads
from graphprune.io.order import needed_nodes

#: synthetic draws per BN input channel
SAMPLES = 512


def _statistics(graph: gs.Graph, opset: int) -> dict[str, tuple[np.ndarray, np.ndarray, int]]:
    """BN input name -> (mean, variance, rank) of every node with input statistics."""
    from graphprune.rules import registry

    out: dict[str, tuple[np.ndarray, np.ndarray, int]] = {}
    for node in graph.nodes:
        rule = registry.lookup(node.domain or "", node.op, opset)
        stats = rule.input_statistics(node) if rule is not None else None
        if stats is None or not node.inputs or not node.inputs[0].name:
            continue
        x = node.inputs[0]
        rank = len(x.shape) if getattr(x, "shape", None) is not None else 4
        out[x.name] = (stats[0], stats[1], max(rank, 2))
    return out


def _reason(
    model: onnx.ModelProto, name: str, given: set[str], linear_nodes: set[str]
) -> str | None:
    """Why ``name`` cannot be computed from the BN inputs ``given`` alone (``None``: it can)."""
    graph = model.graph
    needed = needed_nodes(graph, [name], given)
    producers = runner.produced(graph)
    initializers = {t.name for t in graph.initializer}
    read: set[str] = set()
    for index in needed:
        node = graph.node[index]
        if node.name in linear_nodes:
            return f"a linear layer ('{node.name}') lies between the BatchNormalization and the consumer"
        read.update(n for n in node_reads(node) if n)
    if name in given:
        return None
    if not read & given:
        return "no BatchNormalization upstream"
    free = read - producers - initializers - given
    if free:
        return f"depends on graph input '{sorted(free)[0]}'"
    return None


def expected_inputs(
    model: onnx.ModelProto,
    graph: gs.Graph,
    views: list[LinearView],
    opset: int,
    *,
    samples: int = SAMPLES,
    seed: int = 0,
    data_dir: Path | None = None,
) -> tuple[LayerStats, dict[str, str]]:
    """Data-free input means of ``views`` (layers of ``graph``, the graph of ``model``) and
    the layers skipped, with the reason."""
    bn = _statistics(graph, opset)
    skipped: dict[str, str] = {}
    out = LayerStats(samples=samples)
    if not bn:
        return out, {v.node.name: "no BatchNormalization in the graph" for v in views}
    linear_nodes = {n.name for n in graph.nodes if linear_view(n, opset) is not None}
    rng = np.random.default_rng(seed)
    cache = runner.TensorCache()
    for name, (mean, var, rank) in bn.items():
        draws = rng.standard_normal((samples, mean.size)) * np.sqrt(np.maximum(var, 0.0)) + mean
        cache.put(name, 0, draws.astype(np.float32).reshape(samples, mean.size, *([1] * (rank - 2))))
    by_input: dict[str, list[LinearView]] = {}
    for view in views:
        reason = _reason(model, view.data.name, set(bn), linear_nodes)
        if reason is not None:
            skipped[view.node.name] = reason
            continue
        by_input.setdefault(view.data.name, []).append(view)

    def take(_batch: int, name: str, raw: np.ndarray) -> None:
        for view in by_input[name]:
            x = view.read_data(raw)
            axis = 1 if view.is_conv else x.ndim - 1
            rows = np.moveaxis(x, axis, -1).reshape(-1, x.shape[axis])
            out.layers.setdefault(view.node.name, ChannelStats()).add(rows, None)

    feeds = [{}]  # every value the runs read comes from the cache
    try:
        for name in by_input:
            try:
                runner.stream(model, [name], feeds, take, cache=cache, what="the BatchNorm part of the model",
                              data_dir=data_dir)
            except VerificationError as exc:
                for view in by_input[name]:
                    skipped[view.node.name] = str(exc)
    finally:
        cache.close()
    return out, skipped
