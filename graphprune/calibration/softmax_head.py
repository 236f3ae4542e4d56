"""Distillation of a softmax (or sigmoid) head: the last linear layer refit to the class
distribution of the original.

A classifier's output is the softmax of its last linear layer (plus per-channel constants).
The least-squares refit (:mod:`.sequential`) makes that layer's *logits* match the
original's, which weighs every class alike: the large negative logits of the classes a
sample is not count as much as the few that decide its label. Where a graph output IS that
softmax (or its logarithm), the layer is refit once more, to the original's output
distribution itself (knowledge distillation of one convex layer):

    theta = argmin  -1/R sum_i sum_j p_ij log softmax(x~_i theta + c)_j  +  lam s / 2 ||theta - theta0||^2

``p_i``: the original model's output on calibration row ``i`` (a sample, or one position of
a sequence of class scores); ``x~ = [x, 1]``: the layer's input in the pruned model;
``theta0``: the weights and bias as they are (after the least-squares refit), towards which
the fit is held; ``s``: the mean square of the inputs (``lam`` is scale-free); ``c``: the
per-channel constants added between the layer and the softmax. The problem is convex; it is
solved by Nesterov's accelerated gradient with a fixed step (the Hessian of the cross-entropy
in the logits is at most 1/2) and adaptive restart. ``lam`` is chosen among
:data:`LAMBDAS` by two-fold cross-validation over the batches (even / odd), and the fit is
written only where it lowers the cross-validated cross-entropy of the weights as they were.
Where the output is ``sigmoid(z + c)`` instead (a multi-label output, a pitch tracker's bins,
a wake-word score), every class is an independent binary cross-entropy to the original's
probability (:class:`SigmoidProblem`), fitted the same way.

The head is found from the graph and confirmed by the numbers: a linear layer with a float
weight of its own (not shared, not quantized, one group) whose output reaches a graph output
without another linear layer on the way, where ``softmax(z + c)`` (or ``log_softmax``) over
the layer's channel axis equals that output on the first calibration batch within
:data:`TOLERANCE`. Logits that are a graph output themselves are left alone unless the user
names that output as class scores (``class_scores``, ``--class-scores``; then ``z + c`` must
equal it): nothing in the graph says they are class scores rather than a regression.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_graphsurgeon as gs

from graphprune.calibration.bias import write_bias
from graphprune.calibration.linear import LinearView, linear_view, select
from graphprune.calibration.residual import is_addition, per_channel

#: relative strengths of the pull towards the current weights, cross-validated
LAMBDAS = (10.0, 1.0, 0.1, 0.01)
#: iterations of the accelerated gradient per fit
ITERATIONS = 200
#: floating-point operations allowed for all the fits of one head (rows are subsampled to fit)
MAX_FLOPS = 1e11
#: fewer rows than this (after subsampling to MAX_FLOPS): the head is not distilled
MIN_ROWS = 64
#: rows gathered at most (over all batches), and input values at most
MAX_ROWS = 16384
MAX_VALUES = 2**25
#: a class is fitted where the original or the current head gives it this probability on a row
ACTIVE = 1e-3
#: largest difference between the graph output and ``softmax(z + c)`` that confirms a head
TOLERANCE = 1e-4
#: rows of the first batch compared
CONFIRM_ROWS = 256
#: nodes looked through from a layer's output towards a graph output
MAX_WALK = 32
#: a fit is written when it lowers the cross-validated cross-entropy by this share at least
MIN_GAIN = 1e-3


@dataclass
class Rows:
    """Rows of one head gathered over the calibration batches."""

    x: list[np.ndarray] = field(default_factory=list)  # [R_b, K] per batch
    p: list[np.ndarray] = field(default_factory=list)  # [R_b, C]
    batch: list[int] = field(default_factory=list)


@dataclass
class Head:
    view: LinearView
    #: the graph output that is the softmax of the layer's output (plus ``offset``)
    output: str
    #: per-channel constants added between the layer and the softmax
    offset: np.ndarray
    #: ``softmax``, ``log_softmax``, ``sigmoid``, or ``logits`` (an output declared to be
    #: class logits)
    kind: str = "softmax"
    #: rows taken from each calibration batch (:func:`rows_per_batch`), and those taken
    per_batch: int = 0
    rows: Rows = field(default_factory=Rows)


def candidates(graph: gs.Graph, opset: int) -> list[Head]:
    """Linear layers that may be a softmax head (to be confirmed by :func:`confirm`)."""
    outputs = {t.name for t in graph.outputs}
    found = []
    for node in graph.nodes:
        view = linear_view(node, opset)
        if view is None or view.stored is not None or view.group != 1 or view.is_transpose:
            continue
        if view.data_tensor is not None or view.output_tensor is not None or view.bias_constant is not None:
            continue  # an integer op standing for a float layer
        if len(view.weight.outputs) != 1:
            continue  # a weight shared with another layer (tied embeddings) is not this head's alone
        for name in _reached_outputs(view, outputs, opset):
            found.append(Head(view, name, _offset(view, opset)))
    return found


def _reached_outputs(view: LinearView, outputs: set[str], opset: int) -> list[str]:
    """Graph outputs reached from the layer's output through no other linear layer."""
    seen: set[str] = set()
    todo, reached, nodes = [view.output], [], 0
    while todo:
        tensor = todo.pop()
        if tensor.name in seen:
            continue
        seen.add(tensor.name)
        if tensor.name in outputs:
            reached.append(tensor.name)
        for reader in tensor.outputs:
            nodes += 1
            if nodes > MAX_WALK:
                return []
            if linear_view(reader, opset) is not None:
                continue
            todo.extend(reader.outputs)
    return reached


def _offset(view: LinearView, opset: int) -> np.ndarray:
    """The per-channel constants added to the layer's output on its way (an exporter's bias
    ``Add`` after a ``MatMul``)."""
    tensor, offset = view.output, np.zeros(1)
    while len(tensor.outputs) == 1 and is_addition(tensor.outputs[0], opset):
        node = tensor.outputs[0]
        other = node.inputs[1] if node.inputs[0] is tensor else node.inputs[0]
        channel = per_channel(view, other.values) if isinstance(other, gs.Constant) else None
        if channel is None:
            break
        offset = offset + channel
        tensor = node.outputs[0]
    return offset


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def confirm(head: Head, z: np.ndarray, out: np.ndarray, logits: bool = False) -> bool:
    """Is ``out`` (the graph output) the softmax (or log-softmax) of the layer's output
    ``z`` plus the head's offset over the channel axis — or, for an output the user declared
    to be class ``logits``, that sum itself? Sets ``head.kind``."""
    if np.shape(z) != np.shape(out) or np.asarray(out).dtype.kind != "f":
        return False
    rows = np.arange(min(head.view.output_positions(np.shape(z)), CONFIRM_ROWS))
    logits_of = head.view.output_rows(np.asarray(z, dtype=np.float64), rows).astype(np.float64) + head.offset
    given = head.view.output_rows(np.asarray(out, dtype=np.float64), rows).astype(np.float64)
    if not (np.isfinite(logits_of).all() and np.isfinite(given).all()):
        return False
    if np.abs(_sigmoid(logits_of) - given).max() <= TOLERANCE and not logits:
        head.kind = "sigmoid"
        return True
    if logits_of.shape[1] < 2:  # a softmax over one class is 1 whatever the layer does
        return False
    scale = max(1.0, float(np.abs(given).max()))
    if logits:
        head.kind = "logits"
        return bool(np.abs(logits_of - given).max() <= TOLERANCE * scale)
    if np.abs(_softmax(logits_of) - given).max() <= TOLERANCE:
        head.kind = "softmax"
        return True
    if np.abs(_log_softmax(logits_of) - given).max() <= TOLERANCE * scale:
        head.kind = "log_softmax"
        return True
    return False


def rows_per_batch(head: Head, batches: int) -> int:
    """Rows taken from each batch: at most :data:`MAX_ROWS` in all, and at most
    :data:`MAX_VALUES` input values."""
    k = head.view.in_channels() + 1
    return max(min(MAX_ROWS, MAX_VALUES // k) // max(batches, 1), 1)


def take_rows(head: Head, batch: int, *, x: np.ndarray | None = None, out: np.ndarray | None = None) -> None:
    """Add batch ``batch``'s rows to ``head.rows``: the layer's input ``x`` (pruned model) or
    the original's output ``out``; the same ``head.per_batch`` positions for both (a
    deterministic choice per batch)."""
    view, rows, per_batch = head.view, head.rows, head.per_batch
    if x is not None:
        selected = select(view.positions(np.shape(x)), per_batch, seed=batch)
        rows.x.append(view.input_rows(view.read_data(x), selected)[:, 0, :].astype(np.float64))
        rows.batch.append(batch)
    if out is not None:
        selected = select(view.output_positions(np.shape(out)), per_batch, seed=batch)
        p = view.output_rows(np.asarray(out), selected).astype(np.float64)
        rows.p.append(np.exp(p) if head.kind == "log_softmax" else _softmax(p) if head.kind == "logits" else p)


def current(view: LinearView) -> np.ndarray:
    """``theta0``: ``[K + 1, C]``, the effective weights and the bias (zeros where the layer
    has no bias input: the bias written is then added after it)."""
    w = view.matrices()[0]  # [C, K]
    bias = view.bias_values()
    bias = np.zeros(w.shape[0]) if bias is None else bias
    return np.concatenate([w.T, bias[None, :]], axis=0)


class Problem:
    """The fit restricted to the *active* classes: those the original or the current head
    give a probability of :data:`ACTIVE` on some row. The other classes keep their weights;
    their logits are fixed per row and enter the normaliser as one constant, so a
    recogniser's 18,000 characters cost what its few hundred active ones cost."""

    def __init__(self, x: np.ndarray, p: np.ndarray, theta0: np.ndarray, offset: np.ndarray) -> None:
        logits = x @ theta0 + offset
        top = logits.max(axis=1, keepdims=True)
        shifted = np.exp(logits - top)  # one pass over every class: the normaliser and the rest's share
        total = shifted.sum(axis=1, dtype=np.float64)
        # the current head's probability of a class reaches ACTIVE on some row
        current_max = (shifted / total[:, None].astype(shifted.dtype)).max(axis=0)
        active = (p.max(axis=0) >= ACTIVE) | (current_max >= ACTIVE)
        if active.sum() < 2:
            active[np.argsort(-(p.max(axis=0) + current_max))[:2]] = True
        self.active = active
        self.x, self.theta0, self.offset = x, theta0[:, active], offset[:, active]
        self.p = p[:, active]
        rest = ~active
        if rest.any():
            mass = shifted[:, rest].sum(axis=1, dtype=np.float64)
            self.rest_lse = (top[:, 0] + np.log(np.maximum(mass, 1e-300))).astype(x.dtype)
            masked = np.where(rest[None, :], logits, -np.inf)
            self.rest_arg = masked.argmax(axis=1)
            self.rest_max = logits[np.arange(len(x)), self.rest_arg]
            self.rest_cross = (p[:, rest] * logits[:, rest]).sum(axis=1)  # sum_j p_ij z_ij over the rest
        else:
            self.rest_lse = np.full(len(x), -np.inf, x.dtype)
            self.rest_max, self.rest_arg = np.full(len(x), -np.inf, x.dtype), np.zeros(len(x), np.int64)
            self.rest_cross = np.zeros(len(x), x.dtype)
        self.rest_mass = 1.0 - self.p.sum(axis=1)
        self.label = p.argmax(axis=1)

    def log_q(self, rows: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Active logits and the log-normaliser over every class, for ``rows``."""
        z = self.x[rows] @ theta + self.offset
        top = np.maximum(z.max(axis=1), self.rest_max[rows])
        lse = top + np.log(np.exp(z - top[:, None]).sum(axis=1) + np.exp(self.rest_lse[rows] - top))
        return z, lse

    def cross_entropy(self, rows: np.ndarray, theta: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy over every class, and the share of rows whose arg-max class is
        the original's."""
        z, lse = self.log_q(rows, theta)
        ce = -(self.p[rows] * z).sum(axis=1) - self.rest_cross[rows] + lse
        best = np.where(z.max(axis=1) >= self.rest_max[rows], np.flatnonzero(self.active)[z.argmax(axis=1)],
                        self.rest_arg[rows])
        return float(ce.mean()), float(np.mean(best == self.label[rows]))

    def fit(self, rows: np.ndarray, lam: float, fixed_bias: bool) -> np.ndarray:
        """The regularised cross-entropy fit (module doc) from ``theta0``, on ``rows``."""
        p, rest_mass = self.p[rows], self.rest_mass[rows]

        def data(theta: np.ndarray) -> tuple[float, np.ndarray]:
            z, lse = self.log_q(rows, theta)
            loss = float((p * -(z - lse[:, None])).sum() + (rest_mass * lse).sum())
            return loss, np.exp(z - lse[:, None]) - p

        return _regularised(self.x[rows], self.theta0, lam, 0.5, fixed_bias, data)


class SigmoidProblem:
    """The fit of a sigmoid head: every class an independent binary cross-entropy to the
    original's probability (a multi-label output, a pitch tracker's bins, a wake-word score);
    the same interface as :class:`Problem`, every class fitted."""

    def __init__(self, x: np.ndarray, p: np.ndarray, theta0: np.ndarray, offset: np.ndarray) -> None:
        self.x, self.p, self.theta0, self.offset = x, np.clip(p, 0.0, 1.0), theta0, offset
        self.active = np.ones(p.shape[1], dtype=bool)

    def _z(self, rows: np.ndarray, theta: np.ndarray) -> np.ndarray:
        return self.x[rows] @ theta + self.offset

    def _loss(self, z: np.ndarray, p: np.ndarray) -> np.ndarray:
        """Per-row binary cross-entropy summed over the classes (``log(1 + e^z) - p z``)."""
        return (np.logaddexp(0.0, z) - p * z).sum(axis=1)

    def cross_entropy(self, rows: np.ndarray, theta: np.ndarray) -> tuple[float, float]:
        """Mean binary cross-entropy and the share of rows whose strongest class (with one
        class: whether it is above 0.5) is the original's."""
        z, p = self._z(rows, theta), self.p[rows]
        agree = (z.argmax(axis=1) == p.argmax(axis=1)) if z.shape[1] > 1 else ((z[:, 0] > 0) == (p[:, 0] > 0.5))
        return float(self._loss(z, p).mean()), float(np.mean(agree))

    def fit(self, rows: np.ndarray, lam: float, fixed_bias: bool) -> np.ndarray:
        """The regularised binary cross-entropy fit from ``theta0``, on ``rows``."""
        x, p = self.x[rows], self.p[rows]

        def data(theta: np.ndarray) -> tuple[float, np.ndarray]:
            z = x @ theta + self.offset
            return float(self._loss(z, p).sum()), _sigmoid(z) - p

        return _regularised(x, self.theta0, lam, 0.25, fixed_bias, data)


def _regularised(x: np.ndarray, theta0: np.ndarray, lam: float, curvature: float, fixed_bias: bool,
                 data: Any) -> np.ndarray:
    """Minimise ``loss(theta) / n + lam s / 2 ||theta - theta0||^2`` from ``theta0``, where
    ``data(theta)`` gives the summed loss over the ``n`` rows of ``x`` and its gradient in the
    logits (``[n, C]``); ``curvature`` bounds the loss's second derivative in a logit (1/2 for
    the softmax cross-entropy, 1/4 for the sigmoid's): the step is the inverse of the
    gradient's Lipschitz constant."""
    n = len(x)
    reg = lam * float(np.mean(np.square(x)))
    step = 1.0 / (curvature * float(np.linalg.eigvalsh(x.T @ x / n)[-1]) + reg + 1e-30)

    def value_and_grad(theta: np.ndarray) -> tuple[float, np.ndarray]:
        loss, residual = data(theta)
        diff = theta - theta0
        grad = x.T @ residual / n + reg * diff
        if fixed_bias:
            grad[-1] = 0.0
        return loss / n + 0.5 * reg * float(np.square(diff).sum()), grad

    return _accelerated(value_and_grad, theta0, step)


def _accelerated(value_and_grad: Any, theta0: np.ndarray, step: float) -> np.ndarray:
    """Nesterov's accelerated gradient from ``theta0`` with a fixed step and adaptive restart
    (:data:`ITERATIONS` steps)."""
    theta, momentum, t = theta0.copy(), theta0.copy(), 1.0
    last = value_and_grad(theta)[0]
    for _ in range(ITERATIONS):
        value, grad = value_and_grad(momentum)
        if value > last:  # adaptive restart: the momentum overshot
            momentum, t = theta.copy(), 1.0
            continue
        nxt = momentum - step * grad
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        momentum = nxt + ((t - 1.0) / t_next) * (nxt - theta)
        theta, t, last = nxt, t_next, value
    return theta


def distil(head: Head, graph: gs.Graph, names: set[str]) -> dict[str, Any]:
    """Cross-validate ``lam``, fit on every row, and write the weights and bias of the
    layer in ``graph`` where the fit pays. Returns what was done (``written``: whether the
    layer changed)."""
    started = time.perf_counter()
    view, rows = head.view, head.rows
    x = np.concatenate(rows.x)
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    p = np.concatenate(rows.p)
    folds = np.concatenate([np.full(len(r), b % 2) for r, b in zip(rows.x, rows.batch, strict=True)])
    theta0 = current(view)
    offset = np.broadcast_to(np.asarray(head.offset, dtype=np.float64).reshape(1, -1), (1, p.shape[1]))
    info: dict[str, Any] = {"layer": view.node.name, "output": head.output, "kind": head.kind,
                            "classes": int(p.shape[1])}

    def done(written: bool) -> dict[str, Any]:
        info["written"], info["seconds"] = written, round(time.perf_counter() - started, 2)
        return info

    # float32 for the fits (the cross-entropies compared are means over rows)
    f32 = np.float32
    kind = SigmoidProblem if head.kind == "sigmoid" else Problem
    problem = kind(x.astype(f32), p.astype(f32), theta0.astype(f32), offset.astype(f32))
    active = int(problem.active.sum())
    # rows within MAX_FLOPS for the cross-validated fits (each on half the rows) and the final one
    per_row = 4.0 * x.shape[1] * active * ITERATIONS * (len(LAMBDAS) + 1)
    keep = select(len(x), int(MAX_FLOPS / per_row), seed=0)
    info.update({"active_classes": active, "rows": int(len(keep))})
    if len(keep) < MIN_ROWS:
        info["reason"] = f"{len(keep)} rows (at least {MIN_ROWS} needed)"
        return done(False)
    folds = folds[keep]
    if not all((folds == f).any() for f in (0, 1)):  # one batch: the rows alternate
        folds = np.arange(len(keep)) % 2
    split = [keep[folds == 0], keep[folds == 1]]

    def held_out(lam: float | None) -> tuple[float, float]:
        ce, top = 0.0, 0.0
        for train, test in ((split[0], split[1]), (split[1], split[0])):
            theta = problem.theta0 if lam is None else problem.fit(train, lam, view.bias_fixed)
            c, a = problem.cross_entropy(test, theta)
            ce, top = ce + c * len(test), top + a * len(test)
        return ce / len(keep), top / len(keep)

    before = held_out(None)
    scores = {lam: held_out(lam) for lam in LAMBDAS}
    lam = min(scores, key=lambda k: scores[k][0])
    info.update({"lambda": lam, "cv_cross_entropy": [round(before[0], 6), round(scores[lam][0], 6)],
                 "cv_top1_agreement": [round(before[1], 4), round(scores[lam][1], 4)]})
    if not scores[lam][0] < before[0] * (1.0 - MIN_GAIN):
        return done(False)
    fitted = problem.fit(keep, lam, view.bias_fixed)
    if not np.isfinite(fitted).all():
        return done(False)
    theta = theta0.copy()
    theta[:, problem.active] = fitted.astype(np.float64)
    view.store(theta[:-1].T[None])
    if not view.bias_fixed:
        write_bias(graph, view, theta[-1], names)
    return done(True)
