"""The softmax-head distillation's solver: the fit in the row space of the inputs, the fits of
every strength side by side, and the early stop give the fit of the plain accelerated
gradient over every weight (the solver as it was), in a fraction of the products."""

from __future__ import annotations

import numpy as np
import pytest

from graphprune.calibration import softmax_head as heads


def _reference(problem, rows: np.ndarray, lam: float, curvature: float, fixed_bias: bool) -> np.ndarray:
    """The plain solver: Nesterov over every weight, the step from ``eigvalsh(x.T x / n)``,
    :data:`~heads.ITERATIONS` steps, no early stop."""
    x = problem.x[rows].astype(np.float64)
    theta0 = problem.theta0.astype(np.float64)
    p = problem.p[rows].astype(np.float64)
    n = len(x)
    reg = lam * float(np.mean(np.square(x)))
    step = 1.0 / (curvature * float(np.linalg.eigvalsh(x.T @ x / n)[-1]) + reg)
    sigmoid = isinstance(problem, heads.SigmoidProblem)

    def value_and_grad(theta):
        z = x @ theta + problem.offset
        if sigmoid:
            loss, residual = float((np.logaddexp(0.0, z) - p * z).sum()), heads._sigmoid(z) - p
        else:  # every class active in these problems
            lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
            loss, residual = float((-(p * (z - lse[:, None]))).sum()), np.exp(z - lse[:, None]) - p
        diff = theta - theta0
        grad = x.T @ residual / n + reg * diff
        if fixed_bias:
            grad[-1] = 0.0
        return loss / n + 0.5 * reg * float(np.square(diff).sum()), grad

    theta, momentum, t = theta0.copy(), theta0.copy(), 1.0
    last = value_and_grad(theta)[0]
    for _ in range(heads.ITERATIONS):
        value, grad = value_and_grad(momentum)
        if value > last:
            momentum, t = theta.copy(), 1.0
            continue
        nxt = momentum - step * grad
        t_next = 0.5 * (1.0 + np.sqrt(1.0 + 4.0 * t * t))
        momentum = nxt + ((t - 1.0) / t_next) * (nxt - theta)
        theta, t, last = nxt, t_next, value
    return theta


def _problem(kind: str, rows: int, inputs: int, classes: int, seed: int = 0, repeat: int = 1):
    rng = np.random.default_rng(seed)
    x = np.concatenate([rng.standard_normal((rows // repeat, inputs)), np.ones((rows // repeat, 1))], axis=1)
    x = np.repeat(x, repeat, axis=0)  # repeated rows: a singular Gram matrix
    theta0 = rng.standard_normal((inputs + 1, classes)) * 0.3
    teacher = theta0 + rng.standard_normal(theta0.shape) * 0.3
    z = x @ teacher
    if kind == "sigmoid":
        p = heads._sigmoid(z)
        return heads.SigmoidProblem(x, p, theta0, np.zeros((1, classes))), 0.25
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    problem = heads.Problem(x, p, theta0, np.zeros((1, classes)))
    assert problem.active.all()
    return problem, 0.5


@pytest.mark.parametrize("kind", ["sigmoid", "softmax"])
@pytest.mark.parametrize("shape", [(60, 150, 1), (60, 150, 3), (200, 20, 1)],
                         ids=["fewer-rows-than-inputs", "repeated-rows", "more-rows"])
@pytest.mark.parametrize("fixed_bias", [False, True])
def test_the_fit_is_the_plain_solvers(kind, shape, fixed_bias):
    """Fewer rows than inputs: solved in the rows' coordinates (the step never leaves the
    row space); more rows: over the weights themselves. Either way the plain solver's fit,
    for each strength of the pull, solved side by side."""
    problem, curvature = _problem(kind, shape[0], shape[1], 6, repeat=shape[2])
    rows = np.arange(0, shape[0], 1)
    fits = problem.fits(rows, heads.LAMBDAS, fixed_bias)
    for lam, fitted in zip(heads.LAMBDAS, fits, strict=True):
        expected = _reference(problem, rows, lam, curvature, fixed_bias)
        scale = float(np.abs(expected - problem.theta0).max())
        assert np.abs(fitted - expected).max() <= 1e-5 * scale + 1e-9, lam
        if fixed_bias:
            assert np.array_equal(fitted[-1], problem.theta0[-1])
        assert np.abs(problem.fit(rows, lam, fixed_bias) - fitted).max() <= 1e-6 * scale + 1e-9


def test_a_strong_pull_stops_early_and_every_strength_shares_the_products(monkeypatch):
    """The fits of the four strengths are one product with the rows per step, and those that
    converge (the strong pulls, in tens of steps) drop out before :data:`ITERATIONS`."""
    problem, _ = _problem("sigmoid", 80, 300, 5, seed=3)
    calls: list[int] = []
    original = heads._accelerated

    def counted(value_and_grad, *args):
        def counting(beta, fits):
            calls.append(len(fits))
            return value_and_grad(beta, fits)
        return original(counting, *args)

    monkeypatch.setattr(heads, "_accelerated", counted)
    problem.fits(np.arange(80), heads.LAMBDAS, False)
    assert len(calls) <= heads.ITERATIONS
    assert calls[0] == len(heads.LAMBDAS) and min(calls) < len(heads.LAMBDAS)
    calls.clear()
    problem.fit(np.arange(80), 10.0, False)
    assert len(calls) < heads.ITERATIONS // 2
