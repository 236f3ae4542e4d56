"""Sparse initializers (``GraphProto.sparse_initializer``) are read as the dense weights they
stand for: the prune stopped with an internal error ("AttributeError: data_location")."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import graphprune
from graphprune.cli import main
from graphprune.errors import InvalidModelError
from graphprune.examples import example_cnn
from graphprune.io.sparse import densify


def sparse_model(coordinates: bool) -> tuple[onnx.ModelProto, np.ndarray]:
    """The example CNN with half of ``conv2``'s output channels zero and that weight, and a
    BatchNorm scale, stored sparse (linear or coordinate indices)."""
    model = example_cnn()
    inits = {t.name: t for t in model.graph.initializer}
    weight = numpy_helper.to_array(inits["conv2.weight"]).copy()
    weight[::2] = 0.0
    for name, array in (("conv2.weight", weight), ("stem1.bn.weight", numpy_helper.to_array(inits["stem1.bn.weight"]))):
        model.graph.initializer.remove(inits[name])
        where = np.nonzero(array)
        indices = np.stack(where, 1) if coordinates else np.ravel_multi_index(where, array.shape)
        model.graph.sparse_initializer.append(onnx.helper.make_sparse_tensor(
            numpy_helper.from_array(array[where], name), numpy_helper.from_array(indices.astype(np.int64), ""),
            list(array.shape)))
    return model, weight


@pytest.mark.parametrize("coordinates", [False, True])
def test_sparse_weights_prune_and_their_zero_channels_are_found(tmp_path, capsys, coordinates):
    model, weight = sparse_model(coordinates)
    path = tmp_path / "sparse.onnx"
    onnx.save(model, path)
    lossless = graphprune.prune(str(path), lossless=True)
    assert lossless.report["verification"]["ok"]
    assert lossless.report["normalised"]["sparse_densified"] == ["conv2.weight", "stem1.bn.weight"]
    dense, _ = sparse_model(coordinates)
    densify(dense.graph)
    assert lossless.report["channels"] == graphprune.prune(dense, lossless=True).report["channels"]
    assert lossless.report["channels"]["removed"] > 0
    assert not lossless.model.graph.sparse_initializer
    assert main(["prune", str(path), "-o", str(tmp_path / "p.onnx"), "--ratio", "0.5"]) == 0
    assert "sparse initializers stored dense: conv2.weight, stem1.bn.weight" in capsys.readouterr().out
    onnx.checker.check_model(str(tmp_path / "p.onnx"), full_check=True)


def test_densify_restores_the_dense_tensor_and_refuses_a_misfit():
    model, weight = sparse_model(True)
    assert densify(model.graph) == ["conv2.weight", "stem1.bn.weight"]
    restored = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    np.testing.assert_array_equal(restored["conv2.weight"], weight)
    broken, _ = sparse_model(False)
    broken.graph.sparse_initializer[0].dims[0] = 2  # indices beyond the tensor
    with pytest.raises(InvalidModelError, match="sparse initializer 'conv2.weight' cannot be read"):
        densify(broken.graph)
