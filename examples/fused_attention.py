"""A fused attention layer with a hand-written backward pass, checked end to end with jgradcheck.

Fused attention kernels (FlashAttention and its kin) are written as one forward and one
backward: the forward saves what the backward needs, and the backward computes dx, dWq, dWk,
dWv by hand, softmax backward included. Autodiff never sees the inside, so nothing checks
that backward but you. This example writes a small multi-head softmax attention layer

    q, k, v = x Wq, x Wk, x Wv  (split into heads);  out = softmax(q kᵀ / √d) v  (heads merged)

as a ``jax.custom_vjp`` with such a backward, and checks it three ways:

(a) ``check_vjp(attention, attention_vjp, x, Wq, Wk, Wv)``: the backward alone, as a VJP,
    against central differences of the plain forward (every input entry perturbed);
(b) ``check_rules(attention_custom, x, Wq, Wk, Wv, modes=("rev",))``: the custom_vjp function
    itself, as JAX differentiates it;
(c) ``check_grad`` of a scalar loss built on the layer, with ``jax.grad`` as the gradient.

Then it plants two typical bugs in the backward and prints what the report says: the softmax
backward forgetting to subtract the row sum (``ds = p * dp`` instead of
``p * (dp - Σ p dp)``), and dWk transposed. Each report names the input leaves that are wrong,
their worst entries, and the disagreeing Jacobian entries with their output index.

Inputs are float32; jgradcheck differentiates in float64 (its default ``x64=True``).

Run: python examples/fused_attention.py  (about half a minute on a laptop CPU)
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

import jgradcheck

T, D, HEADS = 8, 16, 2  # sequence length, model width, heads (head width D // HEADS)
DH = D // HEADS


def _split(a):
    """(T, D) -> (HEADS, T, DH)."""
    return a.reshape(a.shape[0], HEADS, DH).transpose(1, 0, 2)


def _merge(a):
    """(HEADS, T, DH) -> (T, D)."""
    return a.transpose(1, 0, 2).reshape(a.shape[1], HEADS * DH)


def attention(x, wq, wk, wv):
    """The plain forward: what the layer computes, differentiated by nobody but the checker."""
    q, k, v = _split(x @ wq), _split(x @ wk), _split(x @ wv)
    p = jax.nn.softmax(q @ k.transpose(0, 2, 1) / np.sqrt(DH), axis=-1)
    return _merge(p @ v)


def _forward(x, wq, wk, wv):
    """The fused forward: the output, and what the backward needs (inputs, q, k, v, probabilities)."""
    q, k, v = _split(x @ wq), _split(x @ wk), _split(x @ wv)
    s = q @ k.transpose(0, 2, 1) / np.sqrt(DH)
    p = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    p = p / jnp.sum(p, axis=-1, keepdims=True)
    return _merge(p @ v), (x, wq, wk, wv, q, k, v, p)


def _backward(saved, g, bug=None):
    """The hand-written backward: cotangents of (x, wq, wk, wv) from the output's cotangent g."""
    x, wq, wk, wv, q, k, v, p = saved
    do = _split(g)
    dv = p.transpose(0, 2, 1) @ do  # out = p v
    dp = do @ v.transpose(0, 2, 1)
    if bug == "softmax_row_sum":
        ds = p * dp  # forgets that every probability depends on every score of its row
    else:
        ds = p * (dp - jnp.sum(p * dp, axis=-1, keepdims=True))  # softmax backward
    ds = ds / np.sqrt(DH)
    dq = ds @ k  # s = q kᵀ / √d
    dk = ds.transpose(0, 2, 1) @ q
    dq, dk, dv = _merge(dq), _merge(dk), _merge(dv)
    dwq, dwk, dwv = x.T @ dq, x.T @ dk, x.T @ dv
    if bug == "dwk_transposed":
        dwk = dwk.T
    dx = dq @ wq.T + dk @ wk.T + dv @ wv.T
    return dx, dwq, dwk, dwv


def fused_attention(bug=None):
    """The layer as a ``jax.custom_vjp`` with the hand-written backward (``bug`` plants a mistake)."""

    @jax.custom_vjp
    def attention_custom(x, wq, wk, wv):
        return _forward(x, wq, wk, wv)[0]

    attention_custom.defvjp(_forward, functools.partial(_backward, bug=bug))
    return attention_custom


def attention_vjp(x, wq, wk, wv, bug=None):
    """The backward wrapped as a VJP with ``jax.vjp``'s signature, for ``check_vjp``."""
    out, saved = _forward(x, wq, wk, wv)
    return out, lambda g: _backward(saved, g, bug)


def loss(params, x, y, attention_fn):
    """A scalar loss on the layer: mean squared error against a target."""
    out = attention_fn(x, params["wq"], params["wk"], params["wv"])
    return jnp.mean((out - y) ** 2)


def data(seed=0):
    """float32 inputs, weights scaled so the softmax is neither uniform nor one-hot."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((T, D)).astype(np.float32)
    w = [(rng.standard_normal((D, D)) / np.sqrt(D)).astype(np.float32) for _ in range(3)]
    y = rng.standard_normal((T, D)).astype(np.float32)
    return x, w, y


def _verdict(report) -> str:
    leaves = ", ".join(f"{row.path} {'ok' if row.passed else 'FAIL'}" for row in report.leaves)
    return f"{'PASSED' if report.passed else 'FAILED'}  ({leaves})"


def _title(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}")


def main() -> dict[str, jgradcheck.GradCheckReport]:
    x, (wq, wk, wv), y = data()
    params = {"wq": wq, "wk": wk, "wv": wv}
    print(f"Fused attention: x {x.shape}, Wq/Wk/Wv {wq.shape}, {HEADS} heads, float32 inputs.")
    reports = {}

    _title("Correct backward")
    reports["vjp"] = jgradcheck.check_vjp(attention, attention_vjp, x, wq, wk, wv)
    print(f"(a) check_vjp(attention, attention_vjp, ...):   {_verdict(reports['vjp'])}")
    reports["rules"] = jgradcheck.check_rules(fused_attention(), x, wq, wk, wv, modes=("rev",))
    print(f"(b) check_rules(attention_custom, modes=rev):   {_verdict(reports['rules'])}")
    custom_loss = functools.partial(loss, attention_fn=fused_attention())
    reports["grad"] = jgradcheck.check_grad(custom_loss, jax.grad(custom_loss), params, x, y)
    print(f"(c) check_grad(loss, jax.grad(loss), params):   {_verdict(reports['grad'])}")
    print()
    print(reports["vjp"])

    for bug, what in [
        ("softmax_row_sum", "softmax backward without the row sum: ds = p * dp"),
        ("dwk_transposed", "dWk transposed"),
    ]:
        _title(f"Planted bug: {what}")
        buggy_vjp = functools.partial(attention_vjp, bug=bug)
        reports[f"vjp:{bug}"] = jgradcheck.check_vjp(attention, buggy_vjp, x, wq, wk, wv)
        reports[f"rules:{bug}"] = jgradcheck.check_rules(fused_attention(bug), x, wq, wk, wv, modes=("rev",))
        buggy_loss = functools.partial(loss, attention_fn=fused_attention(bug))
        reports[f"grad:{bug}"] = jgradcheck.check_grad(buggy_loss, jax.grad(buggy_loss), params, x, y)
        print(f"(a) check_vjp:   {_verdict(reports[f'vjp:{bug}'])}")
        print(f"(b) check_rules: {_verdict(reports[f'rules:{bug}'])}")
        print(f"(c) check_grad:  {_verdict(reports[f'grad:{bug}'])}")
        print("\nThe check_vjp report:\n")
        print(reports[f"vjp:{bug}"])
    return reports


if __name__ == "__main__":
    main()
