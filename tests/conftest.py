"""Shared fixtures: the seeds' L-layer network with a hand-written backprop, and planted bugs.

Column-major like the seed notes: X has shape (n_x, m), W_l (n_l, n_{l-1}), b_l (n_l, 1).
ReLU hidden layers, a sigmoid output, the cross-entropy cost averaged over m, the L2 term
λ/(2m)·Σ‖W_l‖², and optional inverted dropout on the hidden layers whose masks come from a
PRNG key passed as an argument (the seeds' "fix the pattern of dropped nodes").

``Net.backprop(bug)`` returns the hand-written gradient, correct for ``bug=None`` and with one
planted mistake otherwise (see ``BUGS``). Every cost and backprop is built once per session, so
checks that share them also share the library's compiled evaluators.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

# `pytest` run as a bare command (not `python -m pytest`) does not put the repo root on sys.path.
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

BUGS = (
    None,
    "dW2_doubled",  # dW2 = 2 × the right value
    "db1_4_over_m",  # db1 computed with 4/m instead of 1/m
    "no_l2",  # forgot λ/m·W in every dW
    "l2_on_b",  # added λ/m·b to every db
    "dropout_other_key",  # backprop's dropout mask drawn from a different key than the cost's
    "dW2_transposed",  # dW2 returned transposed (needs a square W2)
    "missing_1_over_m",  # every gradient is m times too large
)


def _masks(key, keep_prob: float, shapes) -> list[jax.Array]:
    """One inverted-dropout mask per hidden layer, from a fixed key (same in cost and backprop)."""
    return [jax.random.bernoulli(jax.random.fold_in(key, k), keep_prob, s) for k, s in enumerate(shapes)]


def _layers(params) -> int:
    return len(params) // 2


@dataclasses.dataclass(frozen=True, eq=False)
class Net:
    """The seeds' network: ``cost(params, X, Y, key)`` and ``backprop(bug)(params, X, Y, key)``."""

    dims: tuple[int, ...]
    lambd: float
    keep_prob: float
    m: int
    X: np.ndarray  # float32, (n_x, m)
    Y: np.ndarray  # float32, (1, m)
    key: jax.Array
    params32: dict[str, jax.Array]
    cost: Callable[..., jax.Array]
    _backprops: dict[Any, Callable[..., Any]] = dataclasses.field(default_factory=dict)

    @property
    def L(self) -> int:
        return len(self.dims) - 1

    def params64(self) -> dict[str, jax.Array]:
        """The same parameters as float64 arrays (made in a scoped x64 context)."""
        with jax.enable_x64(True):
            return {k: jnp.asarray(np.asarray(v), jnp.float64) for k, v in self.params32.items()}

    def backprop(self, bug: str | None = None) -> Callable[..., Any]:
        """The hand-written gradient, with ``bug`` planted (memoized: one function per bug)."""
        if bug not in self._backprops:
            self._backprops[bug] = _make_backprop(self, bug)
        return self._backprops[bug]

    def args(self):
        return (self.X, self.Y, self.key)


def _forward(params, X, key, keep_prob, L):
    caches = []
    A = X
    hidden = [(params[f"W{k}"].shape[0], X.shape[1]) for k in range(1, L)]
    masks = _masks(key, keep_prob, hidden) if keep_prob < 1.0 else [None] * (L - 1)
    for k in range(1, L):
        Z = params[f"W{k}"] @ A + params[f"b{k}"]
        A_new = jnp.maximum(Z, 0.0)
        D = masks[k - 1]
        if D is not None:
            A_new = A_new * D / keep_prob
        caches.append((A, Z, D))
        A = A_new
    ZL = params[f"W{L}"] @ A + params[f"b{L}"]
    AL = jax.nn.sigmoid(ZL)
    caches.append((A, ZL, None))
    return AL, caches


def make_net(dims, *, m=16, lambd=0.0, keep_prob=1.0, seed=0, bias=0.1) -> Net:
    """Builds the network, its data and float32 parameters (He init, biases nonzero)."""
    dims = tuple(dims)
    L = len(dims) - 1
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((dims[0], m)).astype(np.float32)
    Y = (rng.random((1, m)) > 0.5).astype(np.float32)
    params = {}
    for k in range(1, L + 1):
        W = rng.standard_normal((dims[k], dims[k - 1])) * np.sqrt(2.0 / dims[k - 1])
        # Biases nonzero: with b = 0 an L2 term wrongly added to db would be invisible.
        b = bias * (1.0 + rng.random((dims[k], 1)))
        params[f"W{k}"] = jnp.asarray(W, jnp.float32)
        params[f"b{k}"] = jnp.asarray(b, jnp.float32)

    def cost(params, X, Y, key):
        L = _layers(params)
        m = X.shape[1]
        AL, _ = _forward(params, X, key, keep_prob, L)
        ce = -jnp.sum(Y * jnp.log(AL) + (1 - Y) * jnp.log(1 - AL)) / m
        l2 = sum(jnp.sum(jnp.square(params[f"W{k}"])) for k in range(1, L + 1))
        return ce + lambd / (2 * m) * l2

    return Net(dims, lambd, keep_prob, m, X, Y, jax.random.PRNGKey(42), params, cost)


def _make_backprop(net: Net, bug: str | None):
    if bug not in BUGS:
        raise ValueError(f"unknown bug {bug!r}")
    keep_prob, lambd = net.keep_prob, net.lambd

    def backprop(params, X, Y, key):
        L = _layers(params)
        m = X.shape[1]
        # The planted dropout bug: the backprop draws its masks from another key.
        fkey = jax.random.fold_in(key, 7) if bug == "dropout_other_key" else key
        AL, caches = _forward(params, X, fkey, keep_prob, L)
        inv_m = 1.0 if bug == "missing_1_over_m" else 1.0 / m
        grads = {}
        dZ = AL - Y
        for k in range(L, 0, -1):
            A_prev, _, _ = caches[k - 1]
            W = params[f"W{k}"]
            dW = inv_m * dZ @ A_prev.T
            if bug != "no_l2":
                dW = dW + (lambd * inv_m) * W
            db = inv_m * jnp.sum(dZ, axis=1, keepdims=True)
            if bug == "l2_on_b":
                db = db + (lambd / m) * params[f"b{k}"]
            if bug == "dW2_doubled" and k == 2:
                dW = 2.0 * dW
            if bug == "db1_4_over_m" and k == 1:
                db = 4.0 * db
            if bug == "dW2_transposed" and k == 2:
                dW = dW.T
            grads[f"W{k}"], grads[f"b{k}"] = dW, db
            if k > 1:
                dA = W.T @ dZ
                _, Z_prev, D_prev = caches[k - 2]
                if D_prev is not None:
                    dA = dA * D_prev / keep_prob
                dZ = dA * (Z_prev > 0)
        return grads

    return backprop


@pytest.fixture(scope="session")
def net() -> Net:
    """A 3-layer network, 49 parameters, L2 on (λ = 0.7), no dropout, m = 16."""
    return make_net([3, 5, 4, 1], m=16, lambd=0.7)


@pytest.fixture(scope="session")
def square_net() -> Net:
    """A network whose W2 is square (4 × 4), for the transposed-gradient bug."""
    return make_net([3, 4, 4, 1], m=16, lambd=0.0, seed=1)


@pytest.fixture(scope="session")
def dropout_net() -> Net:
    """The network with inverted dropout (keep_prob = 0.8) from a fixed key."""
    return make_net([3, 5, 4, 1], m=16, lambd=0.0, keep_prob=0.8, seed=2)


@pytest.fixture(scope="session")
def net_factory():
    return make_net
