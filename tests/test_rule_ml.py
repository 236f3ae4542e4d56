"""ai.onnx.ml ops (graphprune/rules/ml.py): ``Scaler`` in front of an MLP (skl2onnx)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper

import graphprune

#: the op types this file covers (tests/test_op_coverage.py counts them)
OPS_UNDER_TEST = ("ai.onnx.ml::Scaler", "ai.onnx.ml::Normalizer",
                  "ai.onnx.ml::LinearClassifier", "ai.onnx.ml::LinearRegressor",
                  "ai.onnx.ml::SVMClassifier", "ai.onnx.ml::SVMRegressor", "ai.onnx.ml::TreeEnsembleClassifier",
                  "ai.onnx.ml::TreeEnsembleRegressor", "ai.onnx.ml::TreeEnsemble")


def test_a_scaler_in_front_of_an_mlp_hides_nothing() -> None:
    """skl2onnx's ``Scaler`` (ai.onnx.ml) has no ONNX shape inference: every group of the
    MLP behind it was missing (0 groups). It has a rule now (features pass through, its
    offset/scale lists are sliced) and the MatMuls after it derive their shapes."""
    rng = np.random.default_rng(0)
    nodes = [helper.make_node("MatMul", ["x", "w0"], ["h0"]), helper.make_node("Relu", ["h0"], ["r0"]),
             helper.make_node("Scaler", ["r0"], ["s"], domain="ai.onnx.ml",
                              offset=[float(v) for v in rng.standard_normal(6)],
                              scale=[float(v) for v in rng.uniform(0.5, 2, 6)]),
             helper.make_node("MatMul", ["s", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"])]
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w0", (4, 6)), ("w1", (6, 16)), ("b1", (16,)), ("w2", (16, 1)))]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 1])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)], ir_version=8)
    analysis = graphprune.analyze(model)
    assert sorted(g.num_units for g in analysis.groups if g.prunable) == [6, 16]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    scaler = next(n for n in result.model.graph.node if n.op_type == "Scaler")
    assert len(helper.get_attribute_value(scaler.attribute[0])) == 3
    onnx.checker.check_model(result.model)  # (no full check: Scaler has no type inference)


def test_a_scaler_in_front_of_an_mlp_quantized_at_run_time(tmp_path) -> None:
    """The same MLP after ONNX Runtime's ``quantize_dynamic`` (a scikit-learn digits MLP):
    ``Scaler -> Cast -> DynamicQuantizeLinear -> MatMulInteger``. The quantizer gave its
    output no shape, so the layers behind it were hidden: data-free, 0 groups and the model
    written unchanged; a MACs target exited 2 (nothing counted), while with calibration data
    the same file pruned to 0.34x. The Scaler's output shape is learnt by running it; that
    run took the classifier's label too (an ArrayFeatureExtractor after the whole network),
    whose weights, over 4 kB, are in the weight store's files: nothing ran."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    rng = np.random.default_rng(2)
    nodes = [helper.make_node("Scaler", ["x"], ["s"], domain="ai.onnx.ml",
                              offset=[float(v) for v in rng.standard_normal(16)],
                              scale=[float(v) for v in rng.uniform(0.5, 2, 16)]),
             helper.make_node("Cast", ["s"], ["c"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["c", "w1"], ["m"]), helper.make_node("Add", ["m", "b1"], ["a"]),
             helper.make_node("Relu", ["a"], ["r"]), helper.make_node("MatMul", ["r", "w2"], ["y"]),
             # the classifier's label: the class of the arg-max (no shape inference for ArrayFeatureExtractor)
             helper.make_node("ArgMax", ["y"], ["top"], axis=1),
             helper.make_node("ArrayFeatureExtractor", ["classes", "top"], ["picked"], domain="ai.onnx.ml"),
             helper.make_node("Reshape", ["picked", "flat"], ["label"])]
    inits = [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
             for name, shape in (("w1", (16, 300)), ("b1", (300,)), ("w2", (300, 3)))]
    inits += [onnx.numpy_helper.from_array(np.array([3, 5, 7], np.int64), "classes"),
              onnx.numpy_helper.from_array(np.array([-1], np.int64), "flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 16])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 3])], inits)
    # (skl2onnx declares its intermediate tensors' types, no shapes)
    graph.value_info.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("c", "m", "a", "r"))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)
    onnx.save(model, tmp_path / "f.onnx")
    quantize_dynamic(tmp_path / "f.onnx", tmp_path / "q.onnx", weight_type=QuantType.QInt8)
    quantized = onnx.load(tmp_path / "q.onnx")
    assert "MatMulInteger" in {n.op_type for n in quantized.graph.node}
    assert [g.num_units for g in graphprune.analyze(quantized).groups if g.prunable] == [300]
    result = graphprune.prune(quantized, target_macs=0.5)
    assert result.report["verification"]["ok"] is True and result.report["budget"]["met"]
    assert result.report["macs_before"] == 16 * 300 + 300 * 3


def _pipeline() -> onnx.ModelProto:
    """skl2onnx's shape of a ColumnTransformer + MLPClassifier: a string column one-hot
    encoded (``OneHotEncoder``), float columns scaled (``Scaler``), concatenated, an MLP."""
    rng = np.random.default_rng(1)
    nodes = [helper.make_node("OneHotEncoder", ["c"], ["oh"], domain="ai.onnx.ml",
                              cats_strings=["red", "green", "blue"], zeros=1),
             helper.make_node("Reshape", ["oh", "flat"], ["oh2"]),
             helper.make_node("Scaler", ["x"], ["xs"], domain="ai.onnx.ml", offset=[0.1, -0.2, 0.3, 0.0],
                              scale=[1.5, 0.5, 2.0, 1.0]),
             helper.make_node("Concat", ["oh2", "xs"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "w1"], ["m1"]), helper.make_node("Add", ["m1", "b1"], ["a1"]),
             helper.make_node("Relu", ["a1"], ["r1"]),
             helper.make_node("MatMul", ["r1", "w2"], ["m2"]), helper.make_node("Add", ["m2", "b2"], ["a2"]),
             helper.make_node("Relu", ["a2"], ["r2"]),
             helper.make_node("MatMul", ["r2", "w3"], ["m3"]), helper.make_node("Softmax", ["m3"], ["p"], axis=1)]
    inits = [onnx.numpy_helper.from_array(np.array([-1, 3], dtype=np.int64), "flat")]
    inits += [onnx.numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), name)
              for name, shape in (("w1", (7, 32)), ("b1", (32,)), ("w2", (32, 16)), ("b2", (16,)), ("w3", (16, 3)))]
    graph = helper.make_graph(nodes, "pipeline", [helper.make_tensor_value_info("c", TensorProto.STRING, [None, 1]),
                                                  helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT, [None, 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def test_a_one_hot_string_column_in_front_of_an_mlp() -> None:
    """ONNX infers no shape after ``Scaler``, so the ``Concat`` of the encoded columns, and
    the whole MLP behind it, had none: no group found, MACs 0. The ONNX-ML front is now run
    for its output shapes (graphprune.io.custom_shapes) and the MLP is pruned; the string
    column gets random words as probe and calibration values."""
    model = _pipeline()
    result = graphprune.prune(model, ratio=0.5)
    report = result.report
    assert report["verification"]["ok"] and report["groups"]["pruned"] == 2
    assert set(report["normalised"]["shapes_run"]) <= {"ai.onnx.ml::Scaler", "ai.onnx.ml::OneHotEncoder"}
    assert "ai.onnx.ml::Scaler" in report["normalised"]["shapes_run"]
    inits = {t.name: tuple(t.dims) for t in result.model.graph.initializer}
    assert inits["w1"] == (7, 16) and inits["w2"] == (16, 8) and inits["w3"] == (8, 3)
    assert report["macs_after"] / report["macs_before"] == (7 * 16 + 16 * 8 + 8 * 3) / (7 * 32 + 32 * 16 + 16 * 3)
    calibrated = graphprune.prune(model, ratio=0.5, calibration="random").report
    assert "c [1, 1] random words" in calibrated["calibration"]["source"]
    assert calibrated["fidelity"]["cosine"] > calibrated["fidelity"]["without_reconstruction"]["cosine"]


def test_fitted_values_held_in_attributes_are_parameters(tmp_path) -> None:
    """skl2onnx writes a linear model's coefficients, an SVM's support vectors and a tree
    ensemble's thresholds as attributes of ONNX-ML ops, not as constants: a profanity
    classifier (a vectoriser, then ``LinearClassifier`` over 154 k coefficients) read as
    ``params 12``. They count; SVMs and trees stay as they are (nothing in them is pruned)."""
    from graphprune.verify.metrics import count_params

    rng = np.random.default_rng(3)
    coefficients = [float(v) for v in rng.standard_normal(3 * 16)]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("LinearClassifier", ["r"], ["label", "scores"], domain="ai.onnx.ml",
                              coefficients=coefficients, intercepts=[0.1, 0.2, 0.3], classlabels_ints=[0, 1, 2]),
             helper.make_node("LinearRegressor", ["r"], ["value"], domain="ai.onnx.ml",
                              coefficients=coefficients[:16], intercepts=[0.5], targets=1)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [1]),
                               helper.make_tensor_value_info("scores", TensorProto.FLOAT, [1, 3]),
                               helper.make_tensor_value_info("value", TensorProto.FLOAT, [1, 1])],
                              [onnx.numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)
    assert count_params(model) == 4 * 16 + (48 + 3) + (16 + 1)
    # a linear model reads the hidden layer as a MatMul would: its coefficient columns go with it
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    assert result.report["params_before"] == count_params(model)
    assert result.report["params_after"] == count_params(result.model) == 4 * 8 + (24 + 3) + (8 + 1)
    assert "ai.onnx.ml::LinearClassifier" not in graphprune.analyze(model).unsupported

    # a tree ensemble's split values and leaf weights, and an SVM's support vectors
    trees = helper.make_node("TreeEnsembleRegressor", ["x"], ["t"], domain="ai.onnx.ml", n_targets=1,
                             nodes_treeids=[0, 0, 0], nodes_nodeids=[0, 1, 2], nodes_featureids=[0, 0, 0],
                             nodes_modes=["BRANCH_LEQ", "LEAF", "LEAF"], nodes_values=[0.5, 0.0, 0.0],
                             nodes_truenodeids=[1, 0, 0], nodes_falsenodeids=[2, 0, 0],
                             target_treeids=[0, 0], target_nodeids=[1, 2], target_ids=[0, 0],
                             target_weights=[1.0, 2.0])
    svm = helper.make_node("SVMRegressor", ["x"], ["s"], domain="ai.onnx.ml", coefficients=[1.0, -1.0],
                           support_vectors=[float(v) for v in range(8)], rho=[0.1], n_supports=2,
                           kernel_type="LINEAR")
    svc = helper.make_node("SVMClassifier", ["x"], ["c", "cs"], domain="ai.onnx.ml", coefficients=[1.0, -1.0],
                           support_vectors=[float(v) for v in range(8)], rho=[0.1], vectors_per_class=[1, 1],
                           classlabels_ints=[0, 1], kernel_type="LINEAR")
    tree_classes = helper.make_node("TreeEnsembleClassifier", ["x"], ["k", "ks"], domain="ai.onnx.ml",
                                    nodes_treeids=[0], nodes_nodeids=[0], nodes_featureids=[0],
                                    nodes_modes=["LEAF"], nodes_values=[0.0], nodes_truenodeids=[0],
                                    nodes_falsenodeids=[0], class_treeids=[0], class_nodeids=[0], class_ids=[0],
                                    class_weights=[1.0], classlabels_int64s=[0])
    ensemble = helper.make_node("TreeEnsemble", ["x"], ["e"], domain="ai.onnx.ml", n_targets=1,
                                nodes_splits=onnx.numpy_helper.from_array(np.array([0.5], np.float32)),
                                leaf_weights=onnx.numpy_helper.from_array(np.array([1.0, 2.0], np.float32)),
                                nodes_featureids=[0], nodes_modes=onnx.numpy_helper.from_array(np.array([0], np.uint8)),
                                nodes_truenodeids=[0], nodes_trueleafs=[1], nodes_falsenodeids=[1],
                                nodes_falseleafs=[1], leaf_targetids=[0, 0], tree_roots=[0])
    graph = helper.make_graph([trees, svm, svc, tree_classes, ensemble], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "tsce"])
    other = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 5)], ir_version=10)
    # (values, not labels, ids or modes; a threshold only where a node splits, not the 0 of a leaf)
    assert count_params(other) == (1 + 2) + (2 + 8 + 1) + (2 + 8 + 1) + (0 + 1) + (1 + 2)



def _pca_classifier(norm: str = "L1") -> tuple[onnx.ModelProto, np.ndarray]:
    """skl2onnx's ``StandardScaler + PCA + LogisticRegression``: ``Scaler``, ``Sub`` the mean,
    ``MatMul`` the orthonormal components, ``LinearClassifier``, ``Normalizer``; and inputs
    whose variance falls from the first component to the last, as a PCA's does."""
    rng = np.random.default_rng(4)
    features, components, classes = 12, 8, 3
    basis = np.linalg.qr(rng.standard_normal((features, features)))[0][:, :components].astype(np.float32)
    spread = np.linspace(3.0, 0.2, components)
    x = (rng.standard_normal((96, components)) * spread) @ basis.T + rng.standard_normal((96, features)) * 0.05
    coefficients = rng.standard_normal((classes, components))
    nodes = [helper.make_node("Scaler", ["X"], ["s"], domain="ai.onnx.ml", offset=[0.0] * features,
                              scale=[1.0] * features),
             helper.make_node("Sub", ["s", "mean"], ["c"]), helper.make_node("MatMul", ["c", "components"], ["z"]),
             helper.make_node("LinearClassifier", ["z"], ["label", "raw"], domain="ai.onnx.ml",
                              coefficients=[float(v) for v in coefficients.ravel()],
                              intercepts=[0.1, -0.2, 0.05], classlabels_ints=[0, 1, 2], post_transform="LOGISTIC"),
             helper.make_node("Normalizer", ["raw"], ["probabilities"], domain="ai.onnx.ml", norm=norm)]
    inits = [onnx.numpy_helper.from_array(np.zeros(features, np.float32), "mean"),
             onnx.numpy_helper.from_array(basis, "components")]
    graph = helper.make_graph(nodes, "pca", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, features])],
                              [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                               helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes])],
                              inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)
    return model, x.astype(np.float32)


def test_components_read_by_a_linear_classifier_are_pruned(tmp_path) -> None:
    """A PCA in front of a linear classifier: its components were frozen (``LinearClassifier``
    and ``Normalizer`` had no rule). They prune now, exactly (a removed component is a zeroed
    one: its coefficient column goes), and are ranked with the coefficients that read them
    (orthonormal components alone tie: the first, the largest, went first), and with
    calibration data by what they carry."""
    model, x = _pca_classifier()
    analysis = graphprune.analyze(model)
    assert not analysis.unsupported
    assert [g.num_units for g in analysis.groups if g.prunable] == [8]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True
    kept = onnx.numpy_helper.to_array(next(t for t in result.model.graph.initializer if t.name == "components"))
    assert kept.shape == (12, 4)
    basis = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == "components"))
    coefficients = np.asarray(helper.get_attribute_value(
        next(a for a in model.graph.node[3].attribute if a.name == "coefficients"))).reshape(3, 8)
    strongest = np.sort(np.argsort(-np.linalg.norm(coefficients, axis=0))[:4])
    np.testing.assert_array_equal(kept, basis[:, strongest])
    classifier = next(n for n in result.model.graph.node if n.op_type == "LinearClassifier")
    written = next(a for a in classifier.attribute if a.name == "coefficients")
    assert len(helper.get_attribute_value(written)) == 3 * 4

    # with calibration data the features' statistics count too: the coefficients are read as a
    # consumer that nothing refits, and the components kept carry the most of the scores
    np.savez(tmp_path / "calib.npz", X=x[:, None])
    from graphprune.planning.data_aware import NO_STATISTICS

    calibrated = graphprune.prune(model, ratio=0.5, calibration=str(tmp_path / "calib.npz"))
    assert NO_STATISTICS not in calibrated.report["calibration"]["criteria_chosen"]
    carried = ((x @ basis) ** 2).mean(axis=0) * (coefficients**2).sum(axis=0)
    kept = onnx.numpy_helper.to_array(next(t for t in calibrated.model.graph.initializer if t.name == "components"))
    np.testing.assert_array_equal(kept, basis[:, np.sort(np.argsort(-carried)[:4])])
    assert not np.array_equal(np.sort(np.argsort(-carried)[:4]), strongest)  # (the data changed the choice)

    # the class ids are compared as what they are: the share that agrees
    report = graphprune.prune(model, ratio=0.25, calibration=str(tmp_path / "calib.npz")).report
    label = report["fidelity"]["outputs"]["label"]
    assert label["cosine"] is None and label["pooled_rel_l2"] is None and 0.5 <= label["agreement"] <= 1
    probabilities = report["fidelity"]["outputs"]["probabilities"]
    assert "deciding_rel_l2" not in report["fidelity"]  # (one float output: its own figure decides)
    assert report["fidelity"]["pooled_rel_l2"] == probabilities["pooled_rel_l2"] > 0


def test_a_max_normalizer_is_inexact() -> None:
    """A ``Normalizer`` divides by a row's L1 or L2 norm, to which a zeroed entry adds nothing;
    its maximum is not (a zero is the maximum of a row of negatives): that axis is inexact."""
    from graphprune.verify.metrics import count_params

    rng = np.random.default_rng(5)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]),
             helper.make_node("Normalizer", ["h"], ["n"], domain="ai.onnx.ml", norm="MAX"),
             helper.make_node("MatMul", ["n", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])],
                              [onnx.numpy_helper.from_array(rng.standard_normal(s).astype(np.float32), n)
                               for n, s in (("w", (4, 8)), ("w2", (8, 2)))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)
    [group] = [g for g in graphprune.analyze(model).groups if g.prunable]
    assert group.inexact and "MAX normaliser" in group.inexact[0]
    result = graphprune.prune(model, ratio=0.5)
    assert result.report["verification"]["ok"] is True and count_params(result.model) == 4 * 4 + 4 * 2


def test_support_vector_models_read_their_features_through_the_support_vectors() -> None:
    """``SVMClassifier`` behind a hidden layer: each support vector is a row over the
    features. A linear (or polynomial) kernel reads them by dot products, so a removed
    feature is a zeroed one (exact); an RBF kernel reads distances, so the group is inexact:
    pruned, and the prune is reported as not compared."""
    rng = np.random.default_rng(6)

    def model(kernel: str) -> onnx.ModelProto:
        nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                 helper.make_node("SVMClassifier", ["r"], ["label", "scores"], domain="ai.onnx.ml",
                                  kernel_type=kernel, kernel_params=[0.1, 0.0, 2.0],
                                  support_vectors=[float(v) for v in rng.standard_normal(4 * 10)],
                                  coefficients=[float(v) for v in rng.standard_normal(4)], rho=[0.1],
                                  vectors_per_class=[2, 2], classlabels_ints=[0, 1])]
        graph = helper.make_graph(nodes, "svm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 6])],
                                  [helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
                                   helper.make_tensor_value_info("scores", TensorProto.FLOAT, [None, 2])],
                                  [onnx.numpy_helper.from_array(rng.standard_normal((6, 10)).astype(np.float32), "w")])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                       helper.make_opsetid("ai.onnx.ml", 1)], ir_version=8)

    for kernel, exact in (("LINEAR", True), ("POLY", True), ("RBF", False)):
        m = model(kernel)
        [group] = [g for g in graphprune.analyze(m).groups if g.prunable]
        assert group.is_exact == exact, kernel
        result = graphprune.prune(m, ratio=0.5)
        verification = result.report["verification"]
        assert verification["ok"] is True and verification["exact_groups_checked"] == int(exact), kernel
        svm = next(n for n in result.model.graph.node if n.op_type == "SVMClassifier")
        vectors = next(a for a in svm.attribute if a.name == "support_vectors")
        assert len(helper.get_attribute_value(vectors)) == 4 * 5, kernel


def test_a_removed_component_that_reads_an_offset_is_checked_against_zeroed_coefficients() -> None:
    """skl2onnx's ``PCA -> MinMaxScaler -> LogisticRegression``: after the components, ``Mul``
    and ``Add`` of the per-component minimum, so that a removed (zeroed) component reads its
    offset, not 0. Every prune exited 3 ("differs from the zeroed original") though the file
    was exact: no mask reached the classifier's coefficients, an attribute. The zeroed original
    now zeroes their columns in the attribute, as a MatMul consumer's weight rows are."""
    model, _ = _pca_classifier()
    rng = np.random.default_rng(7)
    graph = model.graph
    matmul = next(n for n in graph.node if n.op_type == "MatMul")
    matmul.output[0] = "z_raw"
    at = list(graph.node).index(matmul) + 1
    graph.node.insert(at, helper.make_node("Mul", ["z_raw", "minmax_scale"], ["z_scaled"]))
    graph.node.insert(at + 1, helper.make_node("Add", ["z_scaled", "minmax_min"], ["z"]))
    graph.initializer.extend([onnx.numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "minmax_scale"),
                              onnx.numpy_helper.from_array(rng.uniform(0.5, 2, 8).astype(np.float32), "minmax_min")])
    onnx.checker.check_model(model)
    for kwargs in ({"ratio": 0.5}, {"target_params": 0.8}):
        result = graphprune.prune(model, **kwargs)
        assert result.report["verification"]["ok"] is True, kwargs
        assert result.report["verification"]["max_rel_diff"] < 1e-5


def test_macs_behind_an_onnx_ml_op_are_counted_at_the_given_batch() -> None:
    """ONNX does not size a ``Scaler``'s output: its shape is learnt from two runs (batch 1
    and 2), and the layers after it were counted at the first run's batch 1 for
    ``--input-shape x=8,4`` (112 MACs; 896 without the Scaler)."""
    rng = np.random.default_rng(0)
    graph = helper.make_graph(
        [helper.make_node("Scaler", ["x"], ["s"], domain="ai.onnx.ml", offset=[0.1] * 4, scale=[2.0] * 4),
         helper.make_node("MatMul", ["s", "w1"], ["a"]), helper.make_node("Relu", ["a"], ["r"]),
         helper.make_node("MatMul", ["r", "w2"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
        [onnx.numpy_helper.from_array(rng.standard_normal((4, 16)).astype(np.float32), "w1"),
         onnx.numpy_helper.from_array(rng.standard_normal((16, 3)).astype(np.float32), "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    for options in ({"ratio": 0.5}, {"lossless": True}):
        report = graphprune.prune(model, input_shapes={"x": (8, 4)}, **options).report
        assert report["macs_before"] == 8 * (4 * 16 + 16 * 3), (options, report["macs_before"])
        assert report["macs_after"] == (8 * (4 * 8 + 8 * 3) if "ratio" in options else report["macs_before"])
