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
in the logits is at most 1/2) and adaptive restart, at most :data:`ITERATIONS` steps. Its
steps stay in the row space of the inputs, so a head with fewer rows than inputs is solved in
the rows' coordinates (one ``[R, R]`` product per step instead of two ``[R, K]`` ones); the
fits of every strength are solved side by side (one product for all), and a fit stops where
it reaches a fixed point of its float32 arithmetic. ``lam`` is chosen among
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
#: floating-point operations allowed for all the fits of the heads of one model, shared alike
#: (rows are subsampled to fit): per head, a chord recogniser's four heads took 48 s of a
#: 142 s prune, twice (the refit's and the statistics correction's reconstruction)
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


class _Rows:
    """The rows ``x`` of one fit, prepared for :func:`_regularised` (once for every strength).

    Every step of the accelerated gradient from ``theta0`` moves the fitted weights (all
    but the bias where it is fixed: the columns ``a`` of ``x``) by ``a.T @ (...)``: the
    gradient is ``a.T @ residual`` plus the pull towards ``theta0``, itself such a sum. Where
    a head has fewer rows than inputs, the fit is therefore solved in the rows' coordinates,
    ``theta = theta0 + a.T @ alpha``: its logits are ``z0 + gram @ alpha`` (``gram = a @ a.T``)
    and ``||theta - theta0||^2 = <alpha, gram @ alpha>``, the same iterates at one
    ``[n, n]`` product per step instead of two ``[n, K]`` ones. Otherwise (``gram`` is
    ``None``) over the weights themselves."""

    def __init__(self, x: np.ndarray, fixed_bias: bool) -> None:
        self.x = x
        self.fitted = x.shape[1] - 1 if fixed_bias else x.shape[1]  # rows of theta fitted
        a = x[:, :self.fitted].astype(np.float64)
        n = max(len(x), 1)
        self.gram: np.ndarray | None = None
        if len(x) < self.fitted:
            gram = a @ a.T
            full = gram + np.outer(x[:, -1], x[:, -1]) if fixed_bias else gram
            self.gram = gram.astype(x.dtype)
        else:
            full = x.astype(np.float64).T @ x.astype(np.float64)
        #: the largest eigenvalue of ``x.T @ x / n`` (every column: the bound the step is
        #: taken from), from the smaller of the two Gram matrices
        self.top = float(np.linalg.eigvalsh(full / n)[-1]) if full.size else 0.0
        #: the mean square of every input (the scale of the pull towards ``theta0``)
        self.mean_square = float(np.mean(np.square(x)))


class _Fit:
    """What :class:`Problem` and :class:`SigmoidProblem` share: the rows of each fit, prepared
    once for the cross-validated strengths (:class:`_Rows`)."""

    x: np.ndarray

    def _rows(self, rows: np.ndarray, fixed_bias: bool) -> _Rows:
        cache = self.__dict__.setdefault("_prepared", {})
        key = (rows.tobytes(), fixed_bias)
        if key not in cache:
            if len(cache) >= 2:  # the two folds alternate, then the final fit on every row
                del cache[next(iter(cache))]
            cache[key] = _Rows(self.x[rows], fixed_bias)
        return cache[key]


def _lse(z: np.ndarray, rest_max: np.ndarray, rest_lse: np.ndarray) -> np.ndarray:
    """The log-normaliser over every class: the active logits ``z`` and the rest's constant."""
    top = np.maximum(z.max(axis=1), rest_max)
    return top + np.log(np.exp(z - top[:, None]).sum(axis=1) + np.exp(rest_lse - top))


class Problem(_Fit):
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
        return z, _lse(z, self.rest_max[rows], self.rest_lse[rows])

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
        return self.fits(rows, (lam,), fixed_bias)[0]

    def fits(self, rows: np.ndarray, lams: tuple[float, ...], fixed_bias: bool) -> list[np.ndarray]:
        """:meth:`fit` for each of ``lams``, solved side by side (:func:`_regularised`)."""
        p, rest_mass = self.p[rows][:, None, :], self.rest_mass[rows][:, None]
        rest_max, rest_lse = self.rest_max[rows][:, None], self.rest_lse[rows][:, None]

        def data(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            top = np.maximum(z.max(axis=2), rest_max)  # [n, L]
            lse = top + np.log(np.exp(z - top[..., None]).sum(axis=2) + np.exp(rest_lse - top))
            loss = (p * -(z - lse[..., None])).sum(axis=(0, 2), dtype=np.float64) + (rest_mass * lse).sum(
                axis=0, dtype=np.float64)
            return loss, np.exp(z - lse[..., None]) - p

        return _regularised(self._rows(rows, fixed_bias), self.theta0, self.offset, lams, 0.5, data)


class SigmoidProblem(_Fit):
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
        return self.fits(rows, (lam,), fixed_bias)[0]

    def fits(self, rows: np.ndarray, lams: tuple[float, ...], fixed_bias: bool) -> list[np.ndarray]:
        """:meth:`fit` for each of ``lams``, solved side by side (:func:`_regularised`)."""
        p = self.p[rows][:, None, :]

        def data(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return (np.logaddexp(0.0, z) - p * z).sum(axis=(0, 2), dtype=np.float64), _sigmoid(z) - p

        return _regularised(self._rows(rows, fixed_bias), self.theta0, self.offset, lams, 0.25, data)


def _regularised(rows: _Rows, theta0: np.ndarray, offset: np.ndarray, lams: tuple[float, ...], curvature: float,
                 data: Any) -> list[np.ndarray]:
    """Minimise ``loss(theta) / n + lam s / 2 ||theta - theta0||^2`` from ``theta0`` for each
    ``lam`` of ``lams`` over the fitted rows of ``theta`` (all but the bias where it is fixed).
    ``data(z)`` gives, for the logits ``z = x @ theta + offset`` of ``L`` fits (``[n, L, C]``),
    the summed loss of each over the ``n`` rows of ``x`` (``[L]``) and its gradient in the
    logits (``[n, L, C]``); ``curvature`` bounds the loss's second derivative in a logit (1/2
    for the softmax cross-entropy, 1/4 for the sigmoid's): the step is the inverse of the
    gradient's Lipschitz constant. Solved in the rows' coordinates where there are fewer rows
    than inputs (:class:`_Rows`), and every ``lam`` at once: one product with the rows per
    step (two over the weights) for all of them."""
    n, c, dtype = len(rows.x), theta0.shape[1], theta0.dtype
    reg = np.asarray(lams, dtype=np.float64) * rows.mean_square
    step = 1.0 / (curvature * rows.top + reg + 1e-30)
    z0 = (rows.x @ theta0 + offset)[:, None, :]
    a = rows.x[:, :rows.fitted]
    gram = rows.gram

    def value_and_grad(beta: np.ndarray, fits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Objective (``[l]``) and gradient (``[r, l, C]``) of the fits ``fits`` at ``beta``
        (``alpha`` in the rows' coordinates: the gradient's image there)."""
        count = len(fits)
        pull = reg[fits].astype(dtype)[:, None]
        if gram is not None:  # theta - theta0 = a.T @ alpha
            moved = (gram @ beta.reshape(n, count * c)).reshape(n, count, c)
            loss, residual = data(z0 + moved)
            norm = (beta * moved).sum(axis=(0, 2), dtype=np.float64)
            return loss / n + 0.5 * reg[fits] * norm, residual / n + pull * beta
        k = a.shape[1]
        loss, residual = data(z0 + (a @ beta.reshape(k, count * c)).reshape(n, count, c))
        grad = (a.T @ residual.reshape(n, count * c)).reshape(k, count, c) / n + pull * beta
        return loss / n + 0.5 * reg[fits] * np.square(beta).sum(axis=(0, 2), dtype=np.float64), grad

    size = n if gram is not None else a.shape[1]
    beta = _accelerated(value_and_grad, np.zeros((size, len(lams), c), dtype=dtype), step)
    flat = beta.reshape(size, len(lams) * c)
    change = (flat if gram is None else a.T @ flat).reshape(rows.fitted, len(lams), c)
    thetas = []
    for k in range(len(lams)):
        theta = theta0.copy()
        theta[:rows.fitted] += change[:, k]
        thetas.append(theta)
    return thetas


def _accelerated(value_and_grad: Any, beta0: np.ndarray, step: np.ndarray) -> np.ndarray:
    """Nesterov's accelerated gradient from ``beta0`` (``[r, L, C]``: ``L`` independent fits,
    ``step`` the fixed step of each) with adaptive restart, every fit on its own:
    :data:`ITERATIONS` steps at most (the cap is part of the fit's regularisation where the
    pull towards ``theta0`` is weak). A fit stops early at a fixed point of its arithmetic,
    where every later iteration would repeat the last: the point evaluated is the current
    one, and the step leaves it as it is or its value restarts (a strong pull gets there in
    tens of steps, its value then as low as float32 can tell). ``value_and_grad(beta,
    fits)`` gives the objectives and gradients of the fits ``fits`` (indices) at ``beta``
    (theirs)."""
    theta, momentum = beta0.copy(), beta0.copy()
    t = np.ones(beta0.shape[1])
    running = np.arange(beta0.shape[1])
    value, grad = value_and_grad(momentum, running)  # the first step's point is ``beta0`` too
    last = value.copy()
    for i in range(ITERATIONS):
        if i:
            value, grad = value_and_grad(momentum[:, running], running)
        now = momentum[:, running]
        nxt = now - step[running][None, :, None].astype(now.dtype) * grad
        restart = value > last[running]  # the momentum overshot: back to the last point
        current = theta[:, running]
        # at the current point, a restart (the same point, the same value) or a step that
        # leaves it as it is repeats itself to the last iteration
        done = (now == current).all(axis=(0, 2)) & (restart | (nxt == current).all(axis=(0, 2)))
        restart &= ~done
        go = ~restart & ~done
        t_now = t[running]
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t_now * t_now))
        ahead = nxt + ((t_now - 1.0) / t_next)[None, :, None].astype(now.dtype) * (nxt - current)
        moved, restarted = running[go], running[restart]
        theta[:, moved], momentum[:, moved] = nxt[:, go], ahead[:, go]
        t[moved], last[moved] = t_next[go], value[go]
        momentum[:, restarted], t[restarted] = theta[:, restarted], 1.0
        running = running[~done]
        if not len(running):
            break
    return theta


def distil(head: Head, graph: gs.Graph, names: set[str], share: float = 1.0) -> dict[str, Any]:
    """Cross-validate ``lam``, fit on every row, and write the weights and bias of the
    layer in ``graph`` where the fit pays (within ``share`` of :data:`MAX_FLOPS`: one of the
    model's heads). Returns what was done (``written``: whether the layer changed)."""
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
    keep = select(len(x), int(MAX_FLOPS * share / per_row), seed=0)
    info.update({"active_classes": active, "rows": int(len(keep))})
    if len(keep) < MIN_ROWS:
        info["reason"] = f"{len(keep)} rows (at least {MIN_ROWS} needed)"
        return done(False)
    folds = folds[keep]
    if not all((folds == f).any() for f in (0, 1)):  # one batch: the rows alternate
        folds = np.arange(len(keep)) % 2
    split = [keep[folds == 0], keep[folds == 1]]

    def held_out(lams: tuple[float, ...]) -> list[tuple[float, float]]:
        """Cross-validated cross-entropy and top-1 agreement of each of ``lams`` (none:
        the weights as they are), the fits of one fold solved side by side."""
        ce, top = np.zeros(max(len(lams), 1)), np.zeros(max(len(lams), 1))
        for train, test in ((split[0], split[1]), (split[1], split[0])):
            thetas = problem.fits(train, lams, view.bias_fixed) if lams else [problem.theta0]
            for k, theta in enumerate(thetas):
                c, a = problem.cross_entropy(test, theta)
                ce[k], top[k] = ce[k] + c * len(test), top[k] + a * len(test)
        return [(float(c) / len(keep), float(a) / len(keep)) for c, a in zip(ce, top, strict=True)]

    before = held_out(())[0]
    scores = dict(zip(LAMBDAS, held_out(LAMBDAS), strict=True))
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
