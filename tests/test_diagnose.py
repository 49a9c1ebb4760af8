"""Diagnosis breadth: textbook layers with planted bugs, each named in the right plain words.

Every case is a small JAX layer, its exact gradient from ``jax.grad`` in float64 (standing in for the
finite-difference estimate: ``describe_leaf`` only sees arrays), and a planted mutation of it that a
hand-written backprop really makes. Correct gradients and noise must get no diagnosis at all.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jgradcheck._src import diagnose


@dataclasses.dataclass(frozen=True)
class Case:
    """One failing leaf as ``build_report`` hands it over, plus the words it must (not) get."""

    yours: np.ndarray
    numerical: np.ndarray
    theta: np.ndarray
    shape: tuple[int, ...]
    path: str
    words: tuple[str, ...]  # all must appear; () means "no diagnosis at all"
    not_words: tuple[str, ...] = ()

    @property
    def n_failed(self) -> int:
        """Entries outside a tolerance like the checker's (relative 1e-6 of the leaf's scale)."""
        tol = 1e-6 * float(np.max(np.abs(self.numerical))) + 1e-12
        return int(np.sum(np.abs(self.yours - self.numerical) > tol))


def _grads(cost: Callable, params: dict) -> dict[str, np.ndarray]:
    """jax.grad in float64 (scoped x64), as numpy arrays."""
    with jax.enable_x64(True):
        p = {k: jnp.asarray(v, jnp.float64) for k, v in params.items()}
        return {k: np.asarray(v, np.float64) for k, v in jax.grad(cost)(p).items()}


def _case(params, grads, leaf, yours, words=(), not_words=(), path=None) -> Case:
    g = grads[leaf]
    return Case(
        np.asarray(yours, np.float64).ravel(),
        g.ravel(),
        np.asarray(params[leaf], np.float64).ravel(),
        g.shape,
        path or leaf,
        tuple(words),
        tuple(not_words),
    )


_LAM = 0.05
_CAUSAL = np.tril(np.ones((4, 4), bool))
_IDS = np.array([1, 3, 3, 7, 2])
_PAD_IDS = np.array([0, 3, 5, 0, 2])
_SY = np.array([0, 2, 1, 5])


class _Layers:
    """The layers' data and parameters, drawn from ``seed`` (seed 0 is the suite's historical draw)."""

    def __init__(self, seed: int):
        r = np.random.default_rng(seed)
        # dense: tanh(X W + b), squared error, L2 term λ‖W‖²; a batch of 3 < the layer's widths
        self.DX, self.DY = r.standard_normal((3, 6)), r.standard_normal((3, 5))
        self.DENSE = {"W": 0.5 * r.standard_normal((6, 5)), "b": 0.3 + 0.5 * r.standard_normal(5)}
        # conv: valid 3×3 correlation of an 8×8 image, tanh, weighted sum
        self.CONV = {"x": r.standard_normal((8, 8)), "k": r.standard_normal((3, 3))}
        self.CT = r.standard_normal((6, 6))
        # batchnorm: normalise over the batch axis, scale and shift
        self.BN = {"x": 1.0 + 2.0 * r.standard_normal((6, 4)), "gamma": 1.0 + r.random(4), "beta": r.standard_normal(4)}
        self.BT = r.standard_normal((6, 4))
        # softmax cross-entropy over 6 classes, batch of 4
        self.SX = r.standard_normal((4, 5))
        self.SM = {"W": 0.5 * r.standard_normal((5, 6)), "b": 0.2 * r.standard_normal(6)}
        # embedding: 10 tokens × 4, a padding token 0 masked out of the cost
        self.EV, self.EW = r.standard_normal(4), r.standard_normal(5)
        self.EMB = {"E": r.standard_normal((10, 4))}
        # attention: causal softmax(Q Kᵀ/√d + B) V, 4 steps, d = 3
        self.AQ, self.AR = r.standard_normal((4, 3)), r.standard_normal((4, 3))
        self.ATT = {
            "K": r.standard_normal((4, 3)),
            "V": r.standard_normal((4, 3)),
            "B": 0.3 * r.standard_normal((4, 4)),
        }
        self.rng = r  # the cases draw further data from the same stream

    def dense_cost(self, lam):
        def cost(p):
            r = jnp.tanh(self.DX @ p["W"] + p["b"]) - self.DY
            return 0.5 * jnp.mean(r**2) + lam * jnp.sum(p["W"] ** 2)

        return cost

    @staticmethod
    def wide_cost(p, lam=_LAM):
        r = jnp.tanh(p["X"] @ p["W"] + p["b"]) - 0.5
        return 0.5 * jnp.mean(r**2) + lam * jnp.sum(p["W"] ** 2)

    def conv_cost(self, p):
        out = sum(p["k"][i, j] * p["x"][i : i + 6, j : j + 6] for i in range(3) for j in range(3))
        return jnp.sum(jnp.tanh(0.3 * out) * self.CT)

    def bn_cost(self, p):
        x = p["x"]
        xh = (x - jnp.mean(x, 0)) / jnp.sqrt(jnp.var(x, 0) + 1e-5)
        return jnp.sum(jnp.tanh(p["gamma"] * xh + p["beta"]) * self.BT)

    def sm_cost(self, lam):
        def cost(p):
            z = self.SX @ p["W"] + p["b"]
            ce = jnp.mean(jax.nn.logsumexp(z, axis=1) - z[jnp.arange(4), _SY])
            return ce + lam * jnp.sum(p["W"] ** 2)

        return cost

    def emb_cost(self, lam, ids=_IDS, mask=None):
        mask = np.ones(len(ids)) if mask is None else mask

        def cost(p):
            return jnp.sum(jnp.tanh(p["E"][ids] @ self.EV) * self.EW * mask) + lam * jnp.sum(p["E"] ** 2)

        return cost

    def att_cost(self, p):
        s = jnp.where(_CAUSAL, self.AQ @ p["K"].T / np.sqrt(3.0) + p["B"], -jnp.inf)
        return jnp.sum(jnp.tanh(jax.nn.softmax(s, axis=1) @ p["V"]) * self.AR)


def _rolled(g, step, axis, edge=0.0):
    """np.roll with the wrapped edge overwritten: a loop that starts one index off."""
    out = np.roll(g, step, axis)
    sl = [slice(None)] * g.ndim
    sl[axis] = 0 if step == 1 else -1
    out[tuple(sl)] = edge
    return out


@functools.cache
def _build(seed: int = 0) -> dict[str, Case]:
    d = _Layers(seed)
    cases: dict[str, Case] = {}
    noise = np.random.default_rng(seed + 1)

    # dense
    g, g0 = _grads(d.dense_cost(_LAM), d.DENSE), _grads(d.dense_cost(0.0), d.DENSE)
    W, b = d.DENSE["W"], d.DENSE["b"]
    cases["dense W: factor 2"] = _case(d.DENSE, g, "W", 2 * g["W"], ["constant factor: yours ≈ 2 × numerical"])
    cases["dense b: sign"] = _case(d.DENSE, g, "b", -g["b"], ["sign flipped"])
    cases["dense W: zero"] = _case(d.DENSE, g, "W", 0 * g["W"], ["yours is zero where numerical is not"])
    cases["dense W: half L2"] = _case(
        d.DENSE, g, "W", g0["W"] + _LAM * W, ["half the L2 term's gradient", "2λW"], ["missing L2 term", "cannot tell"]
    )
    cases["dense W: missing L2"] = _case(d.DENSE, g, "W", g0["W"], ["a missing L2 term", "λ/m ≈ 0.1"], ["half"])
    cases["dense W: L2 counted twice"] = _case(d.DENSE, g, "W", g0["W"] + 4 * _LAM * W, ["counted twice"], ["bias"])
    cases["dense W: extra L2 on a weight"] = _case(
        d.DENSE, g0, "W", g0["W"] + 0.1 * W, ["an extra L2 term (λ/m ≈ 0.1)"], ["bias", "twice"]
    )
    cases["dense b: extra L2 on a bias"] = _case(
        d.DENSE, g, "b", g["b"] + 0.1 * b, ["an extra L2 term (λ/m ≈ 0.1)", "e.g. on a bias"]
    )
    cases["dense W: C vs F order"] = _case(
        d.DENSE, g, "W", g["W"].ravel(order="F").reshape(6, 5), ["entries permuted", "transpose where a reshape"]
    )
    cases["dense W: reshape for transpose"] = _case(
        d.DENSE, g, "W", g["W"].reshape(5, 6).T, ["entries permuted", "reshape where a transpose"]
    )
    cases["dense b: mean where a vector was due"] = _case(
        d.DENSE, g, "b", np.full(5, g["b"].mean()), ["constant along axis 0", "mean of numerical"]
    )
    cases["dense W: sum over the wrong axis"] = _case(
        d.DENSE, g, "W", np.broadcast_to(g["W"].sum(0), (6, 5)), ["constant along axis 0", "sum of numerical"]
    )
    wide = {"W": d.DENSE["W"], "b": d.DENSE["b"], "X": d.rng.standard_normal((12, 6))}  # batch 12 > widths
    gw, gw0 = _grads(d.wide_cost, wide), _grads(lambda p: d.wide_cost(p, 0.0), wide)
    cases["dense W: missing or half L2, batch too large to tell"] = _case(
        wide,
        gw,
        "W",
        gw0["W"] + _LAM * W,
        ["a missing L2 term (λ/m ≈ 0.05)", "or half the L2 term's gradient", "cannot tell"],
    )
    cases["dense W: extra L2 on a bias named by its path"] = _case(
        d.DENSE, g0, "W", g0["W"] + 0.1 * W, ["an extra L2 term (λ/m ≈ 0.1), e.g. on a bias"], path="layers[0].bias"
    )
    keep = d.rng.random((3, 6)) < 0.7
    keep[2, 1] = False  # at least one dropped unit (else the rolled mask is the same: no bug planted)
    drop = {"x": d.DX, "W": d.DENSE["W"]}
    gd = _grads(lambda p: jnp.sum(jnp.tanh((p["x"] * keep / 0.7) @ p["W"]) * d.DY), drop)
    d_a = np.asarray(jax.grad(lambda a: jnp.sum(jnp.tanh(a @ d.DENSE["W"]) * d.DY))(d.DX * keep / 0.7))
    other = np.roll(keep, 1, axis=1)  # the backprop's mask, as if drawn from another key
    cases["dense x: dropout mask from another key"] = _case(
        drop, gd, "x", d_a * other / 0.7, ["zero on different entries"]
    )
    wrong = g["W"].copy()
    wrong[4, 1] += 1.0
    cases["dense W: one entry"] = _case(d.DENSE, g, "W", wrong, ["1 isolated entry is wrong"])

    # conv
    g = _grads(d.conv_cost, d.CONV)
    x = g["x"]
    cases["conv x: off by one (columns)"] = _case(d.CONV, g, "x", _rolled(x, 1, 1), ["off by one along axis 1"])
    cases["conv x: off by one (rows)"] = _case(d.CONV, g, "x", _rolled(x, -1, 0, 3.0), ["off by one along axis 0"])
    bordered = x.copy()
    bordered[0], bordered[-1], bordered[:, 0], bordered[:, -1] = 0, 0, 0, 0
    cases["conv x: padding's gradient dropped"] = _case(
        d.CONV, g, "x", bordered, ["yours is zero on 28 entries where numerical is not", "border"]
    )
    window = x.copy()
    window[2:5, 3:6] += 0.5
    cases["conv x: one window wrong"] = _case(d.CONV, g, "x", window, ["wrong only in", "[2:5, 3:6]"])
    rows = x.copy()
    rows[[0, 7]] *= 2.0
    cases["conv x: edge rows wrong"] = _case(d.CONV, g, "x", rows, ["wrong only in", "rows 0, 7"])
    cases["conv k: kernel flipped"] = _case(d.CONV, g, "k", g["k"][::-1, ::-1], ["flipped along axes (0, 1)"])
    cases["conv k: transposed"] = _case(d.CONV, g, "k", g["k"].T, ["transposed: yours ≈ numerical.T"])
    cases["conv k: missing 1/9"] = _case(d.CONV, g, "k", 9 * g["k"], ["constant factor: yours ≈ 9 × numerical"])

    # batchnorm
    g = _grads(d.bn_cost, d.BN)
    cases["bn gamma: one mean for all features"] = _case(
        d.BN, g, "gamma", np.full(4, g["gamma"].mean()), ["constant along axis 0", "mean of numerical"]
    )
    cases["bn beta: mean for sum"] = _case(d.BN, g, "beta", g["beta"] / 6, ["constant factor", "6 × yours"])
    cases["bn gamma: sign"] = _case(d.BN, g, "gamma", -g["gamma"], ["sign flipped"])
    cases["bn x: sum over features"] = _case(
        d.BN, g, "x", np.broadcast_to(g["x"].sum(1, keepdims=True), (6, 4)), ["constant along axis 1", "sum of"]
    )
    cases["bn x: features swapped"] = _case(d.BN, g, "x", g["x"][:, [0, 2, 1, 3]], ["columns 1 and 2", "swapped"])

    # softmax cross-entropy
    g, g0 = _grads(d.sm_cost(_LAM), d.SM), _grads(d.sm_cost(0.0), d.SM)
    cases["softmax W: missing 1/m"] = _case(d.SM, g, "W", 4 * g["W"], ["constant factor: yours ≈ 4 × numerical"])
    cases["softmax W: class index off by one"] = _case(d.SM, g, "W", _rolled(g["W"], 1, 1), ["off by one along axis 1"])
    cases["softmax b: zero"] = _case(d.SM, g, "b", 0 * g["b"], ["yours is zero where numerical is not"])
    cases["softmax W: half L2"] = _case(
        d.SM, g, "W", g0["W"] + _LAM * d.SM["W"], ["half the L2 term's gradient"], ["cannot tell"]
    )
    cases["softmax W: F order"] = _case(d.SM, g, "W", g["W"].ravel(order="F").reshape(5, 6), ["entries permuted"])

    # embedding
    g, g0 = _grads(d.emb_cost(0.1), d.EMB), _grads(d.emb_cost(0.0), d.EMB)
    E = d.EMB["E"]
    cases["embedding: half L2"] = _case(
        d.EMB, g, "E", g0["E"] + 0.1 * E, ["half the L2 term's gradient"], ["cannot tell"]
    )
    cases["embedding: missing L2"] = _case(d.EMB, g, "E", g0["E"], ["a missing L2 term (λ/m ≈ 0.2)"], ["half"])
    cases["embedding: rows off by one"] = _case(d.EMB, g0, "E", _rolled(g0["E"], 1, 0), ["off by one along axis 0"])
    once = g0["E"].copy()
    once[3] = jax.grad(lambda e: jnp.tanh(e @ d.EV) * d.EW[1])(E[3])  # `.set` where `.add` was due
    cases["embedding: repeated token not accumulated"] = _case(d.EMB, g0, "E", once, ["wrong only in", "row 3"])
    mask = (_PAD_IDS != 0).astype(float)
    gp, gu = _grads(d.emb_cost(0.0, _PAD_IDS, mask), d.EMB), _grads(d.emb_cost(0.0, _PAD_IDS), d.EMB)
    cases["embedding: padding mask forgotten"] = _case(d.EMB, gp, "E", gu["E"], ["forgotten mask", "row 0"])

    # attention
    g = _grads(d.att_cost, d.ATT)
    leak = g["B"] + np.where(_CAUSAL, 0.0, noise.standard_normal((4, 4)))
    cases["attention B: causal mask forgotten"] = _case(
        d.ATT, g, "B", leak, ["forgotten mask", "upper triangle above the diagonal"]
    )
    cases["attention V: transpose re-reshaped"] = _case(
        d.ATT, g, "V", g["V"].T.reshape(4, 3), ["entries permuted", "transpose where a reshape"]
    )
    cases["attention K: missing 1/√d"] = _case(d.ATT, g, "K", np.sqrt(3) * g["K"], ["constant factor: yours ≈ 1.732"])
    cases["attention K: rows swapped"] = _case(d.ATT, g, "K", g["K"][[0, 2, 1, 3]], ["rows 1 and 2", "swapped"])
    cases["attention V: step off by one"] = _case(d.ATT, g, "V", _rolled(g["V"], 1, 0), ["off by one along axis 0"])
    win = g["B"].copy()
    win[1:3, 0:2] += 0.3
    cases["attention B: one window wrong"] = _case(d.ATT, g, "B", win, ["wrong only in", "[1:3, 0:2]"])
    return cases


@functools.cache
def _negatives(seed: int = 0) -> dict[str, Case]:
    """Correct gradients (finite-difference-sized noise), noisy and unrelated ones: no rule may fire."""
    d = _Layers(seed)
    rng = np.random.default_rng(seed + 7)
    grads = {
        "dense W": (_grads(d.dense_cost(_LAM), d.DENSE)["W"], d.DENSE["W"]),
        "conv x": (_grads(d.conv_cost, d.CONV)["x"], d.CONV["x"]),
        "bn x": (_grads(d.bn_cost, d.BN)["x"], d.BN["x"]),
        "softmax W": (_grads(d.sm_cost(_LAM), d.SM)["W"], d.SM["W"]),
        "embedding E": (_grads(d.emb_cost(0.1), d.EMB)["E"], d.EMB["E"]),
        "attention K": (_grads(d.att_cost, d.ATT)["K"], d.ATT["K"]),
    }
    out = {}
    for name, (g, theta) in grads.items():
        scale = float(np.abs(g).max())
        variants = {
            "correct": g + 1e-10 * scale * rng.standard_normal(g.shape),
            "10% noise": g + 0.1 * scale * rng.standard_normal(g.shape),
            "unrelated": scale * rng.standard_normal(g.shape),
        }
        for what, yours in variants.items():
            out[f"{name}: {what}"] = Case(yours.ravel(), g.ravel(), theta.ravel(), g.shape, name.split()[-1], ())
    # A bug with no recognizable shape: batchnorm's input gradient without the two centering terms.
    g = _grads(d.bn_cost, d.BN)["x"]
    x = d.BN["x"]
    sd = np.sqrt(x.var(0) + 1e-5)
    xh = (x - x.mean(0)) / sd
    d_xh = np.asarray(jax.grad(lambda h: jnp.sum(jnp.tanh(d.BN["gamma"] * h + d.BN["beta"]) * d.BT))(xh))
    out["bn x: centering terms left out"] = Case((d_xh / sd).ravel(), g.ravel(), x.ravel(), g.shape, "x", ())
    return out


# The planted bugs and their negatives are drawn afresh for each of these seeds (the layers' data,
# parameters, masks and noise); a rule tuned to one draw shows up as a failure at another. Seeds 9,
# 10, 18 and 19 are draws where a sweep over seeds 0-39 found a misnamed bug (16, 28 and 29 like them).
SEEDS = (0, 9, 10, 18, 19)
CASES = _build(0)
NEGATIVES = _negatives(0)


def _planted_params():
    for name in CASES:
        for seed in SEEDS:
            yield pytest.param(name, seed, id=f"{name}-seed{seed}")


def diagnosis_of(case: Case, describe=diagnose.describe_leaf) -> str | None:
    return describe(case.yours, case.numerical, case.theta, case.shape, case.n_failed, path=case.path)


def right_words(case: Case, text: str | None) -> bool:
    if not case.words:
        return text is None
    return text is not None and all(w in text for w in case.words) and not any(w in text for w in case.not_words)


def as_checked(case: Case, dtype: str) -> Case:
    """The case as the checker sees it: yours in ``dtype``, numerical with finite-difference noise.

    Noise of 1e-9 of the leaf's scale on every entry the cost depends on; entries it ignores stay
    exactly zero, as finite differences leave them.
    """
    rng = np.random.default_rng(sum(map(ord, case.path)))
    scale = float(np.max(np.abs(case.numerical)))
    noise = 1e-9 * scale * rng.standard_normal(case.numerical.shape) * (case.numerical != 0)
    yours = case.yours.astype(dtype).astype(np.float64)
    return dataclasses.replace(case, yours=yours, numerical=case.numerical + noise)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize(("name", "seed"), list(_planted_params()))
def test_planted_bug_gets_the_right_words(name, seed, dtype):
    case = as_checked(_build(seed)[name], dtype)
    text = diagnosis_of(case)
    assert right_words(case, text), f"{name} (seed {seed}): {text!r}"


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", list(NEGATIVES))
def test_correct_or_noisy_gradient_gets_no_diagnosis(name, dtype, seed):
    case = as_checked(_negatives(seed)[name], dtype)
    text = diagnosis_of(case)
    assert text is None, f"{name} (seed {seed}): {text!r}"


def test_generic_l2_difference_is_not_forced_into_one_reading():
    """A large generic leaf has near-zero entries by chance: they must not decide missing vs half an L2 term."""
    rng = np.random.default_rng(5)
    numerical, theta = rng.standard_normal(300 * 300), rng.standard_normal(300 * 300)
    text = diagnose.describe_leaf(numerical - 0.1 * theta, numerical, theta, (300, 300), 300 * 300, path="W")
    assert "a missing L2 term (λ/m ≈ 0.1)" in text and "cannot tell which" in text, text


@pytest.mark.parametrize("factors", [[0.0, 0.0, 0.0], [0.0, 0.0], [0.0, -0.0, 0.0]])
def test_a_common_factor_of_zero_is_no_finding(factors):
    """Every leaf's yours ≈ 0 × numerical (yours all zero, or round-off at an exact minimum): the
    per-leaf reading says so; a common factor of 0 is no finding (it divided by zero, a crash)."""
    assert diagnose.common_factor(factors, (4, 8)) is None


def test_a_common_factor_still_names_the_batch_size():
    assert "batch size m = 8" in diagnose.common_factor([8.0, 8.0, 8.0], (8,))
