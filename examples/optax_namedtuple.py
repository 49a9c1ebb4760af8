"""Parameters in an optax-style NamedTuple, checked at initialization and again after training.

The classic recipe: check at initialization, train a little (no checking inside the loop: it
costs two evaluations of the cost per parameter), check again. Your gradient may be the same
NamedTuple or a dict of its fields: leaves are matched by path (``W1`` either way).

Run: python examples/optax_namedtuple.py
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

import jgradcheck


class Params(NamedTuple):
    W1: jax.Array
    b1: jax.Array
    W2: jax.Array
    b2: jax.Array


def make():
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    params = Params(jax.random.normal(k1, (3, 8)) / 2, jnp.zeros(8), jax.random.normal(k2, (8, 1)) / 3, jnp.zeros(1))
    x = jax.random.normal(k3, (16, 3))
    y = jnp.sin(x.sum(axis=1, keepdims=True))
    return params, x, y


def cost(p, x, y):
    return jnp.mean((jnp.tanh(x @ p.W1 + p.b1) @ p.W2 + p.b2 - y) ** 2)


def my_grad(p, x, y, bug=False):
    """Backprop by hand, returned as the same NamedTuple."""
    h = jnp.tanh(x @ p.W1 + p.b1)
    dout = 2 * (h @ p.W2 + p.b2 - y) / y.size
    dh = dout @ p.W2.T * (1 - h if bug else 1 - h**2)  # planted bug: tanh' written as 1 - h
    return Params(x.T @ dh, dh.sum(0), h.T @ dout, dout.sum(0))


def train(params, x, y, steps=50):
    opt = optax.adam(1e-2)
    state = opt.init(params)
    for _ in range(steps):
        updates, state = opt.update(my_grad(params, x, y), state)
        params = optax.apply_updates(params, updates)
    return params


def main():
    params, x, y = make()
    at_init = jgradcheck.check_grad(cost, my_grad, params, x, y)
    print(at_init)
    trained = train(params, x, y)
    after = jgradcheck.check_grad(cost, my_grad, trained, x, y)
    print(after)
    bad = jgradcheck.check_grad(cost, lambda *a: my_grad(*a, bug=True), trained, x, y)
    print(bad)
    return at_init, after, bad


if __name__ == "__main__":
    main()
