"""The classic gradient-checking recipe of the deep-learning course notes, end to end, with jgradcheck.

An L-layer network (ReLU ... ReLU, sigmoid), cross-entropy cost with L2 regularization and
inverted dropout, and a hand-written backprop — the thing we want to verify. Then:

1. check the gradient at initialization (dropout off: keep_prob = 1.0);
2. plant a classic bug (dW2 doubled) and let the report point at it;
3. train briefly with dropout on (no gradient checking inside the loop: it costs 2n evaluations);
4. check again after training, dropout off, and once more with a fixed dropout mask.

Run: python examples/classic_recipe.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

import jgradcheck

LAYERS = [12, 8, 6, 1]  # n_x, hidden..., output


def init_params(key, dims):
    params = {}
    for layer in range(1, len(dims)):
        key, k_w = jax.random.split(key)
        params[f"W{layer}"] = jax.random.normal(k_w, (dims[layer], dims[layer - 1])) * jnp.sqrt(2.0 / dims[layer - 1])
        params[f"b{layer}"] = jnp.zeros((dims[layer], 1))
    return params


def forward(params, X, keep_prob, key):
    """Returns AL and the caches backprop needs. Dropout masks come from `key` (fixed => deterministic)."""
    L = len(params) // 2
    A, caches = X, []
    for layer in range(1, L + 1):
        A_prev = A
        Z = params[f"W{layer}"] @ A_prev + params[f"b{layer}"]
        if layer < L:
            A = jnp.maximum(Z, 0)
            key, k_d = jax.random.split(key)
            D = jax.random.bernoulli(k_d, keep_prob, A.shape).astype(A.dtype)
            A = A * D / keep_prob  # inverted dropout
        else:
            A, D = jax.nn.sigmoid(Z), None
        caches.append((A_prev, Z, D))
    return A, caches


def cost(params, X, Y, lambd, keep_prob, key):
    """J = cross-entropy + λ/(2m) Σ ||W||²: the full cost, regularization included."""
    m = X.shape[1]
    AL, _ = forward(params, X, keep_prob, key)
    ce = -jnp.sum(Y * jnp.log(AL) + (1 - Y) * jnp.log(1 - AL)) / m
    L = len(params) // 2
    l2 = sum(jnp.sum(jnp.square(params[f"W{layer}"])) for layer in range(1, L + 1))
    return ce + lambd / (2 * m) * l2


def backprop(params, X, Y, lambd, keep_prob, key, bug=None):
    """Hand-written gradient of `cost`. `bug="dW2x2"` plants the classic mistake."""
    m = X.shape[1]
    L = len(params) // 2
    AL, caches = forward(params, X, keep_prob, key)
    grads = {}
    dZ = AL - Y
    for layer in range(L, 0, -1):
        A_prev, Z, _ = caches[layer - 1]
        grads[f"W{layer}"] = dZ @ A_prev.T / m + lambd / m * params[f"W{layer}"]
        grads[f"b{layer}"] = jnp.sum(dZ, axis=1, keepdims=True) / m
        if layer > 1:
            _, Z_prev, D_prev = caches[layer - 2]
            dA = params[f"W{layer}"].T @ dZ
            dA = dA * D_prev / keep_prob
            dZ = dA * (Z_prev > 0)
    if bug == "dW2x2":
        grads["W2"] = 2 * grads["W2"]
    return grads


def main():
    key = jax.random.PRNGKey(0)
    k_x, k_y, k_p, k_drop = jax.random.split(key, 4)
    X = jax.random.normal(k_x, (LAYERS[0], 32))
    Y = (jax.random.uniform(k_y, (1, 32)) > 0.5).astype(jnp.float32)
    params = init_params(k_p, LAYERS)
    lambd = 0.7

    print("1) Check at initialization, dropout off (keep_prob = 1.0)")
    report = jgradcheck.check_grad(cost, backprop, params, X, Y, lambd, 1.0, k_drop)
    print(report, end="\n\n")

    print("2) A planted bug: dW2 doubled. The report names the leaf and the kind of bug.")
    buggy = lambda p, *a: backprop(p, *a, bug="dW2x2")  # noqa: E731
    report = jgradcheck.check_grad(cost, buggy, params, X, Y, lambd, 1.0, k_drop)
    print(report, end="\n\n")
    assert not report.passed and report.worst[0].path == "W2"

    print("3) Train briefly with dropout on (keep_prob = 0.8); no gradient checking in the loop.")
    step = jax.jit(lambda p, k: jax.tree.map(lambda w, g: w - 0.3 * g, p, backprop(p, X, Y, lambd, 0.8, k)))
    for i in range(300):
        params = step(params, jax.random.fold_in(k_drop, i))
    print(f"   cost after training: {float(cost(params, X, Y, lambd, 1.0, k_drop)):.4f}\n")

    print("4) Check again after training (W, b have moved away from their initial values)")
    report = jgradcheck.check_grad(cost, backprop, params, X, Y, lambd, 1.0, k_drop)
    print(report.summary(), f"(difference {report.difference:.1e})")
    print("   ... and with dropout on but a fixed mask (the same key in cost and backprop):")
    report_drop = jgradcheck.check_grad(cost, backprop, params, X, Y, lambd, 0.8, k_drop)
    print(report_drop.summary(), f"(difference {report_drop.difference:.1e})")
    assert report.passed and report_drop.passed


if __name__ == "__main__":
    main()
