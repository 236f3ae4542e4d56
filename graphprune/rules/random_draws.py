"""Ops that draw random numbers (``RandomNormal``, ``RandomUniform``, their ``Like`` forms,
``Multinomial``, ``Bernoulli``): a VITS vocoder's flow noise ``m + randn_like(m) * exp(logs)``,
a decoder that samples its next token. Without a ``seed`` attribute every ONNX Runtime
session draws anew, so a model compared with itself differs, and no prune of it could be
checked. With one, each fresh session draws the same numbers (two runs of one session do not:
the generator goes on), so a pruned model can be compared with its zeroed original run for run.

:func:`seed_unseeded` gives every unseeded one a seed of its own for the work, from a range
:func:`unseed` recognises, which takes them off the model written: it draws anew as it came.
These ops have no dependency rule (their groups stay frozen); this module only says which
nodes draw."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import chain

import onnx

from graphprune.io.graph_reads import subgraphs

#: ops of the default domain that draw random numbers
DRAWING = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"})
#: the seeds given (``FIRST_SEED + k`` for the k-th op): recognised by :func:`unseed`
FIRST_SEED = 918_273.0
SEEDS = 4096


def _nodes(graph: onnx.GraphProto) -> Iterator[onnx.NodeProto]:
    return chain(graph.node, *(sub.node for sub in subgraphs(graph)))


def _draws(node: onnx.NodeProto) -> bool:
    return node.domain in ("", "ai.onnx") and node.op_type in DRAWING


def seed_unseeded(model: onnx.ModelProto) -> list[str]:
    """Give every drawing node of ``model`` (subgraphs included) that has no ``seed`` one of
    its own, in place; the op types seeded, one per node."""
    seeded = []
    for node in _nodes(model.graph):
        if _draws(node) and not any(a.name == "seed" for a in node.attribute) and len(seeded) < SEEDS:
            node.attribute.append(onnx.helper.make_attribute("seed", FIRST_SEED + len(seeded)))
            seeded.append(node.op_type)
    return seeded


def unseed(model: onnx.ModelProto) -> int:
    """Take the seeds :func:`seed_unseeded` gave off ``model``'s drawing nodes, in place; how many."""
    taken = 0
    for node in _nodes(model.graph):
        if not _draws(node):
            continue
        for k, attribute in enumerate(node.attribute):
            if attribute.name == "seed" and FIRST_SEED <= attribute.f < FIRST_SEED + SEEDS \
                    and float(attribute.f).is_integer():
                del node.attribute[k]
                taken += 1
                break
    return taken
