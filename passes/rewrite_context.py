"""What a rule's ``rewrite`` sees: the channels removed from every dimension."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

Dim = tuple[str, int]


class RewriteContext:
    """Sizes before and after channel removal, and helpers to replace constant inputs."""

    def __init__(
        self,
        graph: gs.Graph,
        removed: dict[Dim, np.ndarray],
        shapes: dict[str, list[int | None] | None],
        opset: int,
    ) -> None:
        self.graph = graph
        self._removed = removed
        self._shapes = shapes
        self.opset = opset
        self._counter = 0

    def _dim(self, tensor: gs.Tensor, axis: int) -> Dim | None:
        shape = self._shapes.get(tensor.name)
        if shape is None:
            return None
        return (tensor.name, axis % len(shape))

    def removed(self, tensor: gs.Tensor, axis: int) -> np.ndarray:
        dim = self._dim(tensor, axis)
        if dim is None:
            return np.zeros(0, dtype=np.int64)
        return self._removed.get(dim, np.zeros(0, dtype=np.int64))

    def old_shape(self, tensor: gs.Tensor) -> list[int | None] | None:
        """The shape of ``tensor`` before channel removal (``None``: rank unknown)."""
        return self._shapes.get(tensor.name)

    def old_size(self, tensor: gs.Tensor, axis: int) -> int | None:
        shape = self._shapes.get(tensor.name)
        if shape is None or not -len(shape) <= axis < len(shape):
            return None
        return shape[axis]

    def new_size(self, tensor: gs.Tensor, axis: int) -> int | None:
        old = self.old_size(tensor, axis)
        if old is None:
            return None
        return old - int(self.removed(tensor, axis).size)

    def changed(self, tensor: gs.Tensor) -> bool:
        shape = self._shapes.get(tensor.name)
        if shape is None:
            return False
        return any((tensor.name, a) in self._removed for a in range(len(shape)))

    def set_input(self, node: gs.Node, index: int, values: np.ndarray) -> None:
        """Give ``node`` a private constant at input ``index`` (others sharing it keep theirs)."""
        self._counter += 1
        name = f"{node.name or node.op}_gp_{index}_{self._counter}"
        # ascontiguousarray would make a scalar (a divisor, a head count) 1-D
        const = gs.Constant(name, np.ascontiguousarray(values).reshape(np.shape(values)))
        while len(node.inputs) <= index:
            node.inputs.append(gs.Variable.empty())
        node.inputs[index] = const
