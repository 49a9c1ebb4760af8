"""An equinox model with a hand-written gradient, checked with jgradcheck.

``eqx.partition`` splits the model into its arrays and the rest; the cost combines them back. Your
gradient may be a module of the same structure (``eqx.filter_grad`` gives one) or a plain nested
dict with the same names (``{"l1": {"weight": ..., "bias": ...}}``): leaves are matched by path.

Run: python examples/equinox_mlp.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp

import jgradcheck


class MLP(eqx.Module):
    l1: eqx.nn.Linear
    l2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.l1 = eqx.nn.Linear(3, 8, key=k1)
        self.l2 = eqx.nn.Linear(8, 1, key=k2)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def make():
    model = MLP(jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_array)
    x = jax.random.normal(jax.random.key(1), (16, 3))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    return params, static, x, y


def cost(params, static, x, y):
    """Mean squared error of the recombined model."""
    model = eqx.combine(params, static)
    return jnp.mean((jax.vmap(model)(x) - y) ** 2)


def my_grad(params, static, x, y, bug=False):
    """Backprop by hand (equinox's Linear computes weight @ x + bias), returned as a nested dict."""
    W1, b1, W2, b2 = params.l1.weight, params.l1.bias, params.l2.weight, params.l2.bias
    h = jnp.tanh(x @ W1.T + b1)
    dout = 2 * (h @ W2.T + b2 - y) / y.size
    dh = dout @ W2 * (1 - h**2)
    db1 = dh.sum(0)
    if bug:
        db1 = -db1  # planted bug: the sign of l1's bias gradient
    return {"l1": {"weight": dh.T @ x, "bias": db1}, "l2": {"weight": dout.T @ h, "bias": dout.sum(0)}}


def main():
    params, static, x, y = make()
    good = jgradcheck.check_grad(cost, my_grad, params, static, x, y)
    print(good)
    bad = jgradcheck.check_grad(cost, lambda *a: my_grad(*a, bug=True), params, static, x, y)
    print(bad)
    return good, bad


if __name__ == "__main__":
    main()
