"""Checking a hand-written gradient inside research code.

A small classifier (two ReLU hidden layers, softmax cross-entropy, L2 on the weights) whose
gradient is written by hand: the backprop you would write for a new layer, a custom loss or
a paper's update rule. The check runs where bugs hide:

1. at initialization;
2. after a few hundred training steps taken *with that gradient* (a gradient can be right at
   small random weights and wrong once ReLUs saturate or weights grow);
3. with a planted bug (the L2 term forgotten in dW2), to see what a failure looks like; the
   report is also drawn to ``examples/check.png``.

Run: python examples/research_code.py
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp

import jgradcheck

DIMS = (6, 16, 8, 3)  # inputs, hidden, hidden, classes
LAMBDA = 0.5  # L2 strength: J = mean cross-entropy + λ/(2m) Σ‖W‖²


def init(key):
    params = {}
    for k in range(1, len(DIMS)):
        key, sub = jax.random.split(key)
        params[f"W{k}"] = jax.random.normal(sub, (DIMS[k - 1], DIMS[k])) * jnp.sqrt(2.0 / DIMS[k - 1])
        params[f"b{k}"] = jnp.full((DIMS[k],), 0.1)
    return params


def forward(params, X):
    acts = [X]
    for k in (1, 2):
        acts.append(jax.nn.relu(acts[-1] @ params[f"W{k}"] + params[f"b{k}"]))
    return acts, acts[-1] @ params["W3"] + params["b3"]


def cost(params, X, Y):
    """J = mean cross-entropy over the m examples + λ/(2m) Σ‖W‖² (one-hot labels Y)."""
    m = X.shape[0]
    _, logits = forward(params, X)
    ce = -jnp.sum(Y * jax.nn.log_softmax(logits)) / m
    return ce + LAMBDA / (2 * m) * sum(jnp.sum(params[f"W{k}"] ** 2) for k in (1, 2, 3))


def backprop(params, X, Y, forget_l2_in_W2=False):
    """The hand-written gradient of ``cost``: the thing being checked."""
    m = X.shape[0]
    acts, logits = forward(params, X)
    dZ = (jax.nn.softmax(logits) - Y) / m
    grads = {}
    for k in (3, 2, 1):
        grads[f"W{k}"] = acts[k - 1].T @ dZ
        if not (forget_l2_in_W2 and k == 2):
            grads[f"W{k}"] += LAMBDA / m * params[f"W{k}"]
        grads[f"b{k}"] = dZ.sum(axis=0)
        if k > 1:
            dZ = (dZ @ params[f"W{k}"].T) * (acts[k - 1] > 0)
    return grads


def data(key, m=64):
    kx, kw = jax.random.split(key)
    X = jax.random.normal(kx, (m, DIMS[0]))
    labels = jnp.argmax(X @ jax.random.normal(kw, (DIMS[0], DIMS[-1])), axis=1)
    return X, jax.nn.one_hot(labels, DIMS[-1])


@jax.jit
def sgd_step(params, X, Y, lr=0.5):
    grads = backprop(params, X, Y)
    return jax.tree_util.tree_map(lambda p, g: p - lr * g, params, grads)


def main() -> None:
    X, Y = data(jax.random.PRNGKey(1))
    params = init(jax.random.PRNGKey(0))

    print("1. At initialization")
    report = jgradcheck.check_grad(cost, backprop, params, X, Y)
    print(report, "\n")

    for _ in range(300):
        params = sgd_step(params, X, Y)
    print(f"2. After 300 training steps (J = {float(cost(params, X, Y)):.4f})")
    report = jgradcheck.check_grad(cost, backprop, params, X, Y)
    print(report, "\n")

    print("3. A planted bug: the L2 term forgotten in dW2")

    def buggy(p, X, Y):
        return backprop(p, X, Y, forget_l2_in_W2=True)

    report = jgradcheck.check_grad(cost, buggy, params, X, Y)
    print(report)
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "check.png")
    report.plot(path)
    print(f"\nthe picture of this report: {path}")


if __name__ == "__main__":
    main()
