"""Pass contract: ``run(graph, ctx) -> PassResult(graph, modified, stats)``, a truthful
``modified`` (a second run returns False), a readable repr, and PassManager timings."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs
import pytest
from conftest import conv_node, make_model
from graphprune.passes.base import Pass, PassContext, PassManager, PassResult
from graphprune.passes.cleanup import DeadCodeEliminationPass, IdentityEliminationPass
from graphprune.passes.prune_channels import PruneChannelsPass
from onnx import helper

from graphprune.analysis import analyze_graph
from graphprune.api import load_and_prepare
from graphprune.io import ir
from graphprune.planning.plan import Plan
from graphprune.planning.planner import plan_ratio

C = 8


def _model(identity: bool = False, dead: bool = False):
    nodes = [conv_node("x", "W1", "a", "B1", name="conv1")]
    src = "a"
    if identity:
        nodes.append(helper.make_node("Identity", ["a"], ["a_id"], name="identity"))
        src = "a_id"
    nodes += [
        helper.make_node("Relu", [src], ["r"], name="relu"),
        conv_node("r", "W2", "y", name="conv2"),
    ]
    if dead:
        nodes.append(helper.make_node("Sigmoid", ["r"], ["unused"], name="dead"))
    return make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None},
                      {"W1": (C, 3, 3, 3), "B1": (C,), "W2": (4, C, 3, 3)})


def _graph(model):
    prep = load_and_prepare(model)
    return ir.import_graph(prep.prepared), prep.opset


def _readable(p: object) -> None:
    text = repr(p)
    assert "object at 0x" not in text and text.startswith(type(p).__name__)


# --------------------------------------------------------------------------- PruneChannelsPass


def test_prune_channels_pass_contract():
    graph, opset = _graph(_model())
    analysis = analyze_graph(graph, opset)
    plan = plan_ratio(analysis, ratio=0.5)
    assert len(plan.groups) == 1
    prune = PruneChannelsPass(analysis, plan)
    assert repr(prune) == "PruneChannelsPass(groups=1)"
    ctx = PassContext(opset=opset)

    first = prune.run(graph, ctx)
    assert isinstance(first, PassResult) and first.graph is graph
    assert first.modified is True
    assert first.stats["units_removed"] == 4
    tensors = graph.tensors()
    assert tensors["W1"].values.shape == (4, 3, 3, 3)
    assert tensors["B1"].values.shape == (4,)
    assert tensors["W2"].values.shape == (4, 4, 3, 3)

    second = prune.run(graph, ctx)
    assert second.modified is False
    assert graph.tensors()["W1"].values.shape == (4, 3, 3, 3), "a second run removes nothing"


def test_prune_channels_pass_with_an_empty_plan_changes_nothing():
    graph, opset = _graph(_model())
    analysis = analyze_graph(graph, opset)
    before = {n: np.asarray(t.values).shape for n, t in graph.tensors().items()
              if isinstance(t, gs.Constant)}
    result = PruneChannelsPass(analysis, Plan()).run(graph, PassContext(opset=opset))
    assert result.modified is False
    after = {n: np.asarray(t.values).shape for n, t in graph.tensors().items()
             if isinstance(t, gs.Constant)}
    assert after == before
    _readable(PruneChannelsPass(analysis, Plan()))


# --------------------------------------------------------------------------- cleanup passes


def test_identity_elimination_removes_an_identity():
    graph, opset = _graph(_model(identity=True))
    graph.nodes.append(gs.Node("Identity", "kept", inputs=[graph.tensors()["a"]],
                               outputs=[gs.Variable("a_copy", dtype=np.float32)]))
    graph.outputs.append(graph.tensors()["a_copy"])
    identity = IdentityEliminationPass()
    first = identity.run(graph, PassContext(opset=opset))
    assert first.modified is True and first.stats == {"identities_removed": 1}
    assert [n.name for n in graph.nodes if n.op == "Identity"] == ["kept"]
    assert identity.run(graph, PassContext(opset=opset)).modified is False


def test_identity_elimination_keeps_identities_that_produce_graph_outputs():
    nodes = [
        conv_node("x", "W1", "a", name="conv1"),
        helper.make_node("Identity", ["a"], ["y"], name="to_output"),
    ]
    model = make_model(nodes, {"x": [1, 3, 8, 8]}, {"y": None}, {"W1": (C, 3, 3, 3)})
    graph = ir.import_graph(model)
    identity = IdentityEliminationPass()
    result = identity.run(graph, PassContext(opset=17))
    assert result.modified is False
    assert [n.op for n in graph.nodes] == ["Conv", "Identity"]
    assert repr(identity) == "IdentityEliminationPass()"


def test_dead_code_elimination_contract():
    graph, opset = _graph(_model(dead=True))
    assert "dead" in {n.name for n in graph.nodes}
    dce = DeadCodeEliminationPass()
    assert repr(dce) == "DeadCodeEliminationPass()"
    first = dce.run(graph, PassContext(opset=opset))
    assert first.modified is True and first.stats == {"nodes_removed": 1}
    assert "dead" not in {n.name for n in graph.nodes}
    second = dce.run(graph, PassContext(opset=opset))
    assert second.modified is False and second.stats == {"nodes_removed": 0}


# --------------------------------------------------------------------------- PassManager


class CountdownPass(Pass):
    """Changes the graph ``times`` times (a node attribute), then nothing (it converges)."""

    def __init__(self, times: int) -> None:
        self.left = times
        self.runs = 0

    def run(self, graph, ctx):
        self.runs += 1
        if self.left:
            self.left -= 1
            graph.nodes[0].attrs["gp_countdown"] = self.left
            return PassResult(graph, True, {"changes": 1})
        return PassResult(graph, False)


class LyingPass(Pass):
    """Claims a change it never makes, or hides one it makes."""

    def __init__(self, change: bool) -> None:
        self.change = change

    def run(self, graph, ctx):
        if self.change:
            graph.nodes[0].name = graph.nodes[0].name + "_x"
        return PassResult(graph, not self.change)


def test_modified_is_derived_from_the_graph_not_from_the_pass():
    graph, opset = _graph(_model())
    assert PassManager([LyingPass(change=False)]).run(graph, PassContext(opset=opset)).modified is False
    assert PassManager([LyingPass(change=True)]).run(graph, PassContext(opset=opset)).modified is True


class _Refusing(Pass):
    def requires(self, graph, ctx):
        return "needs a miracle"

    def run(self, graph, ctx):  # pragma: no cover - never reached
        raise AssertionError("requires() must stop the pass")


class _Breaking(Pass):
    def run(self, graph, ctx):
        graph.nodes[0].attrs["gp_broken"] = 1
        return PassResult(graph, True)

    def ensures(self, graph, ctx):
        return "attribute gp_broken set" if "gp_broken" in graph.nodes[0].attrs else None


def test_requires_and_ensures_are_checked():
    from graphprune.errors import RewriteError

    graph, opset = _graph(_model())
    with pytest.raises(RewriteError, match="_Refusing cannot run: needs a miracle"):
        PassManager([_Refusing()]).run(graph, PassContext(opset=opset))
    with pytest.raises(RewriteError, match="_Breaking broke its postcondition"):
        PassManager([_Breaking()]).run(graph, PassContext(opset=opset))


def test_debug_mode_checks_the_graph_after_each_modifying_pass():
    graph, opset = _graph(_model())
    seen = []
    ctx = PassContext(opset=opset, debug=True, debug_check=lambda g, name: seen.append(name))
    PassManager([CountdownPass(1), LyingPass(change=False)]).run(graph, ctx)
    assert seen == ["CountdownPass"], "checked after the pass that changed the graph only"


def test_pass_manager_times_each_pass_and_merges_stats():
    graph, opset = _graph(_model(dead=True))
    ctx = PassContext(opset=opset)
    manager = PassManager([IdentityEliminationPass(), DeadCodeEliminationPass()])
    result = manager.run(graph, ctx)
    assert result.modified is True
    assert set(ctx.timings) == {"IdentityEliminationPass", "DeadCodeEliminationPass"}
    assert all(t >= 0 for t in ctx.timings.values())
    assert ctx.stats["DeadCodeEliminationPass"] == {"nodes_removed": 1}
    assert repr(manager) == "PassManager(IdentityEliminationPass(), DeadCodeEliminationPass())"
    # the pipeline's own second run is a no-op too
    assert manager.run(graph, PassContext(opset=opset)).modified is False


def test_pass_manager_runs_to_a_fixed_point():
    graph, opset = _graph(_model())
    countdown = CountdownPass(3)
    ctx = PassContext(opset=opset)
    result = PassManager([countdown], fixed_point=True).run(graph, ctx)
    assert result.modified is True
    assert countdown.runs == 4, "three changing runs and one that confirms the fixed point"
    assert ctx.stats["CountdownPass"] == {"changes": 3}, "counters add up over iterations"

    capped = CountdownPass(100)
    PassManager([capped], fixed_point=True, max_iterations=5).run(graph, PassContext(opset=opset))
    assert capped.runs == 5

    once = CountdownPass(3)
    PassManager([once]).run(graph, PassContext(opset=opset))
    assert once.runs == 1


def test_base_pass_is_abstract_and_readable():
    with pytest.raises(NotImplementedError):
        Pass().run(gs.Graph(), PassContext(opset=17))
    assert repr(CountdownPass(1)) == "CountdownPass()"
    assert CountdownPass(1).name == "CountdownPass"
