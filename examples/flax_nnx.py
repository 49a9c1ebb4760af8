"""A flax NNX model with a hand-written gradient, checked with jgradcheck.

The model is split with ``nnx.split`` into its graph and its ``nnx.State``; the cost merges them
back. Your gradient may come back as an ``nnx.State`` (the same structure) or as the plain nested
dict that ``nnx.to_pure_dict(state)`` gives: jgradcheck matches the two by path (``l1.kernel.value``
is ``l1.kernel`` in the pure dict).

Run: python examples/flax_nnx.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import jgradcheck


class MLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.l1 = nnx.Linear(3, 8, rngs=rngs)
        self.l2 = nnx.Linear(8, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


def make():
    model = MLP(nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    x = jax.random.normal(jax.random.key(1), (16, 3))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    return graphdef, state, x, y


def cost(state, graphdef, x, y):
    """Mean squared error of the merged model."""
    return jnp.mean((nnx.merge(graphdef, state)(x) - y) ** 2)


def my_grad(state, graphdef, x, y, bug=False):
    """Backprop by hand, returned as a pure dict (the form nnx.to_pure_dict gives)."""
    p = nnx.to_pure_dict(state)
    W1, b1, W2, b2 = p["l1"]["kernel"], p["l1"]["bias"], p["l2"]["kernel"], p["l2"]["bias"]
    h = jnp.tanh(x @ W1 + b1)
    dout = 2 * (h @ W2 + b2 - y) / y.size
    dh = dout @ W2.T * (1 - h**2)
    dW2 = h.T @ dout
    if bug:
        dW2 = h.T @ dout * y.size  # planted bug: the mean's 1/m forgotten in l2's kernel
    return {"l1": {"kernel": x.T @ dh, "bias": dh.sum(0)}, "l2": {"kernel": dW2, "bias": dout.sum(0)}}


def main():
    graphdef, state, x, y = make()
    good = jgradcheck.check_grad(cost, my_grad, state, graphdef, x, y)
    print(good)
    bad = jgradcheck.check_grad(cost, lambda *a: my_grad(*a, bug=True), state, graphdef, x, y)
    print(bad)
    return good, bad


if __name__ == "__main__":
    main()
