"""A flax linen model with a hand-written gradient, checked with jgradcheck.

``model.init`` returns a variables dict ``{"params": {...}}``; the cost calls ``model.apply``. Your
gradient may have the same form or be the ``"params"`` collection alone (``{"hidden": ...}``):
jgradcheck matches the two by path.

Run: python examples/flax_linen.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import linen as nn

import jgradcheck


class MLP(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(8, name="hidden")(x))
        return nn.Dense(1, name="out")(h)


def make():
    model = MLP()
    x = jax.random.normal(jax.random.key(1), (16, 3))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    variables = model.init(jax.random.key(0), x)
    return model, variables, x, y


def cost(variables, model, x, y):
    """Mean squared error plus an L2 term on the kernels (the full cost, regularization included)."""
    p = variables["params"]
    l2 = 1e-2 * (jnp.sum(p["hidden"]["kernel"] ** 2) + jnp.sum(p["out"]["kernel"] ** 2))
    return jnp.mean((model.apply(variables, x) - y) ** 2) + l2


def my_grad(variables, model, x, y, bug=False):
    """Backprop by hand, returned as the "params" collection alone."""
    p = variables["params"]
    W1, b1, W2, b2 = p["hidden"]["kernel"], p["hidden"]["bias"], p["out"]["kernel"], p["out"]["bias"]
    h = jnp.tanh(x @ W1 + b1)
    dout = 2 * (h @ W2 + b2 - y) / y.size
    dh = dout @ W2.T * (1 - h**2)
    dW1 = x.T @ dh + (0.0 if bug else 2e-2 * W1)  # planted bug: the L2 term forgotten in hidden's kernel
    return {
        "hidden": {"kernel": dW1, "bias": dh.sum(0)},
        "out": {"kernel": h.T @ dout + 2e-2 * W2, "bias": dout.sum(0)},
    }


def main():
    model, variables, x, y = make()
    good = jgradcheck.check_grad(cost, my_grad, variables, model, x, y)
    print(good)
    bad = jgradcheck.check_grad(cost, lambda *a: my_grad(*a, bug=True), variables, model, x, y)
    print(bad)
    return good, bad


if __name__ == "__main__":
    main()
