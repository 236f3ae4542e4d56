"""One contract over every registered pass (issue 8): every :class:`Pass` subclass in the
``graphprune.passes`` package has a case here, built on a small real model where the pass
has real work to do, and each case must show that

(a) a run through a :class:`PassManager` reports ``modified is True`` and a stats dict;
(b) the rewritten graph, exported, passes the full ``onnx.checker`` and runs in ONNX Runtime
    with the original's output names and shapes on the same feed;
(c) a second run is a no-op;
(d) debug mode calls the debug check after the pass (after the pass that completes it,
    for a pass whose ``valid_after`` is False);
(e) ``requires`` and ``ensures`` accept the valid input and output.

A new pass without a case here fails :func:`test_every_pass_has_a_case`.
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

import graphprune.passes
import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from conftest import conv_node, default_feeds, group_with, make_model
from graphprune.passes.base import Pass, PassContext, PassManager
from graphprune.passes.bias_compensation import BiasCompensationPass
from graphprune.passes.bn_compensation import BatchNormCompensationPass
from graphprune.passes.cleanup import DeadCodeEliminationPass, IdentityEliminationPass
from graphprune.passes.drop_concat_inputs import DropConcatInputsPass
from graphprune.passes.erase_blocks import EraseBlocksPass
from graphprune.passes.erase_operators import EraseOperatorsPass
from graphprune.passes.fold_constants import FoldConstantsPass, constant_folds
from graphprune.passes.prune_channels import PruneChannelsPass, removed_elements
from graphprune.passes.refit import RefitPass
from graphprune.passes.softmax_head import SoftmaxHeadPass
from graphprune.passes.stats_correction import StatsCorrectionPass
from onnx import helper
from test_calibration_bn import _bn_cnn
from test_calibration_passes import _pruned_session, cnn, images, mlp, tokens
from test_lossless import resnet_like, vector, weight
from test_lossless_passes import sigmoid_into_1x1
from test_passes import _model
from test_softmax_head import _classifier, _inputs

from graphprune.analysis.blocks import find_residual_blocks
from graphprune.analysis.zero_analysis import analyze_constants, find_zero_groups
from graphprune.calibration import runner, stats
from graphprune.calibration.data import load_calibration
from graphprune.calibration.linear import linear_view
from graphprune.io import ir
from graphprune.pipeline.session import Session
from graphprune.planning.plan import Plan
from graphprune.planning.planner import group_plan, plan_ratio


@dataclass
class Case:
    """A session whose working graph the pass rewrites; ``then``: the passes that complete
    a pass whose ``valid_after`` is False (run after it, before any validity check)."""

    session: Session
    graph: gs.Graph
    p: Pass
    then: list[Pass] = field(default_factory=list)

    @property
    def opset(self) -> int:
        return self.session.opset


def _session(model: onnx.ModelProto) -> tuple[Session, gs.Graph]:
    session = Session(model)
    return session, session.import_graph()


# --------------------------------------------------------------------------- cases
def prune_channels() -> Case:
    session, graph = _session(_model())
    analysis = session.analyze()
    plan = plan_ratio(analysis, ratio=0.5)
    assert plan.groups, "the plan removes channels"
    return Case(session, graph, PruneChannelsPass(analysis, plan))


def identity_elimination() -> Case:
    session, graph = _session(_model(identity=True))
    return Case(session, graph, IdentityEliminationPass())


def dead_code_elimination() -> Case:
    session, graph = _session(_model(dead=True))
    return Case(session, graph, DeadCodeEliminationPass())


def erase_operators() -> Case:
    # Sub(x2, z) with z a zeroed convolution: the Sub is bypassed
    model = make_model(
        [
            conv_node("x", "wz", "z", "bz"),
            conv_node("x", "w", "x2", "b"),
            helper.make_node("Sub", ["x2", "z"], ["d"], name="sub"),
            conv_node("d", "w3", "out", "b3"),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        {"wz": weight(4, 3, zero_rows=range(4)), "bz": np.zeros(4, np.float32),
         "w": weight(4, 3, seed=1), "b": vector(4), "w3": weight(2, 4), "b3": vector(2)},
    )
    session, graph = _session(model)
    return Case(session, graph, EraseOperatorsPass())


def fold_constants() -> Case:
    session, graph = _session(sigmoid_into_1x1())
    analysis = session.analyze()
    folds = constant_folds(find_zero_groups(analysis, analyze_constants(graph, session.opset)))
    assert folds, "there is a constant to fold"
    return Case(session, graph, FoldConstantsPass(folds))


def drop_concat_inputs() -> Case:
    model = make_model(
        [
            conv_node("x", "wa", "a", "ba"),
            conv_node("x", "wb", "b", "bb"),
            helper.make_node("Relu", ["b"], ["br"]),
            helper.make_node("Concat", ["a", "br"], ["c"], name="cat", axis=1),
            conv_node("c", "wc", "out", "bc"),
        ],
        {"x": [1, 3, 6, 6]},
        {"out": None},
        {"wa": weight(4, 3), "ba": vector(4), "wb": weight(3, 3, zero_rows=range(3)),
         "bb": np.zeros(3, np.float32), "wc": weight(2, 7), "bc": vector(2)},
    )
    session, graph = _session(model)
    analysis = session.analyze()
    group = group_with(analysis, "br", 1)
    units = sorted({int(u) for u in group.unit_of[("br", 1)]})
    plan = Plan(groups=[group_plan(group, units, analysis.context.tensors)])
    return Case(session, graph, DropConcatInputsPass({("cat", "br")}),
                then=[PruneChannelsPass(analysis, plan)])


def erase_blocks() -> Case:
    session, graph = _session(resnet_like(blocks=2))
    blocks = find_residual_blocks(graph)
    assert blocks, "the model has residual blocks"
    return Case(session, graph, EraseBlocksPass([blocks[-1]]))


def _batches(session: Session, samples) -> runner.Batches:
    data_dir = session.store.root if getattr(session, "store", None) else None
    return runner.batches(session.prepared, samples, 8, data_dir)


def refit() -> Case:
    session, analysis, plan = _pruned_session(cnn())
    calib = load_calibration({"x": images(16)}, session.prepared)
    p = RefitPass(session.prepared, _batches(session, calib.samples),
                  removed_elements(analysis, plan), store=session.store)
    return Case(session, session.graph, p)


def stats_correction() -> Case:
    session, analysis, plan = _pruned_session(cnn())
    calib = load_calibration({"x": images(16)}, session.prepared, holdout=0.0)
    p = StatsCorrectionPass(session.prepared, _batches(session, calib.samples),
                            removed_elements(analysis, plan), store=session.store)
    return Case(session, session.graph, p)


def softmax_head() -> Case:
    """The pruned classifier as the structural rewrite leaves it: its softmax head has room."""
    session, _, _ = _pruned_session(_classifier("softmax"), ratio=0.6)
    calib = load_calibration({"x": _inputs(256, 1)}, session.prepared, holdout=0.0)
    p = SoftmaxHeadPass(session.prepared, _batches(session, calib.samples), store=session.store)
    return Case(session, session.graph, p)


def bias_compensation() -> Case:
    session, analysis, plan = _pruned_session(mlp())
    calib = load_calibration({"x": tokens(16)}, session.prepared, holdout=0.0)
    batches = runner.Batches(calib.samples, [1] * calib.total, False)
    original = ir.import_graph(session.prepared, session.store)
    down = linear_view(next(n for n in original.nodes if n.name == "down"), session.opset)
    data_dir = session.store.root if getattr(session, "store", None) else None
    layer_stats = stats.collect(session.prepared, [down], batches, gram=False, data_dir=data_dir)
    p = BiasCompensationPass(original, layer_stats, removed_elements(analysis, plan))
    return Case(session, session.graph, p)


def bn_compensation() -> Case:
    session, analysis, plan = _pruned_session(_bn_cnn(trained=False))
    p = BatchNormCompensationPass(session.prepared, removed_elements(analysis, plan), store=session.store)
    return Case(session, session.graph, p)


CASES: dict[str, Callable[[], Case]] = {
    "PruneChannelsPass": prune_channels,
    "IdentityEliminationPass": identity_elimination,
    "DeadCodeEliminationPass": dead_code_elimination,
    "EraseOperatorsPass": erase_operators,
    "FoldConstantsPass": fold_constants,
    "DropConcatInputsPass": drop_concat_inputs,
    "EraseBlocksPass": erase_blocks,
    "RefitPass": refit,
    "StatsCorrectionPass": stats_correction,
    "SoftmaxHeadPass": softmax_head,
    "BiasCompensationPass": bias_compensation,
    "BatchNormCompensationPass": bn_compensation,
}


# --------------------------------------------------------------------------- discovery
def registered_passes() -> dict[str, type[Pass]]:
    """Every Pass subclass defined in a module of the ``graphprune.passes`` package."""
    found: dict[str, type[Pass]] = {}
    for info in pkgutil.iter_modules(graphprune.passes.__path__):
        module = importlib.import_module(f"graphprune.passes.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls is not Pass and issubclass(cls, Pass) and cls.__module__ == module.__name__:
                found[cls.__name__] = cls
    return found


def test_every_pass_has_a_case():
    passes = registered_passes()
    missing = sorted(set(passes) - set(CASES))
    assert not missing, f"passes without a case in CASES: {', '.join(missing)}"
    stale = sorted(set(CASES) - set(passes))
    assert not stale, f"CASES names passes that no longer exist: {', '.join(stale)}"


# --------------------------------------------------------------------------- the contract
def _outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    return {name: value.shape for name, value in zip(names, sess.run(None, feeds), strict=True)}


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_contract(name):
    case = CASES[name]()
    p, session, graph = case.p, case.session, case.graph
    assert type(p).__name__ == name
    assert bool(case.then) is (not p.valid_after), "a pass invalid on its own needs a completion"

    # (e) requires accepts the valid input
    assert p.requires(graph, PassContext(opset=case.opset)) is None

    # (a) the first run changes the graph and reports stats
    first = PassManager([p]).run(graph, PassContext(opset=case.opset))
    assert first.modified is True, f"{name} had work to do but changed nothing"
    assert isinstance(first.stats, dict)
    assert isinstance(first.stats.get(name, {}), dict)
    graph = first.graph
    if case.then:
        graph = PassManager(case.then).run(graph, PassContext(opset=case.opset)).graph

    # (e) ensures holds on the output
    assert p.ensures(graph, PassContext(opset=case.opset)) is None

    # (c) a second run is a no-op
    second = PassManager([p]).run(graph, PassContext(opset=case.opset))
    assert second.modified is False, f"{name} changed the graph again on a second run"
    graph = second.graph

    # (b) the rewritten graph is a valid model computing outputs of the original's names/shapes
    session.graph = graph
    model = session.materialize(session.export())
    onnx.checker.check_model(model, full_check=True)
    reference = session.materialize(session.prepared)
    feeds = default_feeds(reference, seed=3, batch=1)
    assert _outputs(model, feeds) == _outputs(reference, feeds)


@pytest.mark.parametrize("name", sorted(CASES))
def test_pass_debug_check(name):
    """(d): debug mode verifies (a real export, checker and ORT session) after the pass."""
    case = CASES[name]()
    p = case.p
    seen: list[str] = []

    def check(graph: gs.Graph, pass_name: str) -> None:
        seen.append(pass_name)
        case.session._debug_check(graph, pass_name)

    ctx = PassContext(opset=case.opset, debug=True, debug_check=check)
    result = PassManager([p, *case.then]).run(case.graph, ctx)
    assert result.modified is True
    if p.valid_after:
        assert seen == [name]
    else:
        # a pass invalid on its own is checked once, after the sequence that completes it
        assert seen == [" + ".join([name, *(type(q).__name__ for q in case.then)])]
