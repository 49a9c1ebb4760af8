"""Error-aware verdicts: kinks, scales, float32 resolution, stencils, Taylor test, diagnosis, grades."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck import Grade

# --- kinks ---------------------------------------------------------------------------------------

_W_KINK = jnp.array([0.0, 0.5, -0.7, 1.3])  # w[0] sits exactly on the kink
_COEF = jnp.arange(1.0, 5.0)


def _relu_cost(p):
    return jnp.sum(jax.nn.relu(p["w"]) * _COEF)


def _abs_cost(p):
    return jnp.sum(jnp.abs(p["w"]) * _COEF)


@pytest.mark.parametrize("cost", [_relu_cost, _abs_cost], ids=["relu", "abs"])
def test_one_sided_derivative_at_a_kink_is_accepted(cost):
    report = jgradcheck.check_grad(cost, jax.grad(cost), {"w": _W_KINK})
    assert report.passed, str(report)
    assert len(report.kinks) == 1
    kink = report.kinks[0]
    assert (kink.path, kink.index, kink.status) == ("w", (0,), "kink")
    assert min(kink.left, kink.right) <= kink.yours <= max(kink.left, kink.right)
    assert kink.right - kink.left == pytest.approx(1.0 if cost is _relu_cost else 2.0, rel=1e-6)
    assert report.leaf("w").n_kinks == 1
    assert "kink" in str(report)


@pytest.mark.parametrize("cost", [_relu_cost, _abs_cost], ids=["relu", "abs"])
def test_wrong_value_at_a_kink_fails(cost):
    wrong = lambda p: {"w": jax.grad(cost)(p)["w"].at[0].set(5.0)}  # noqa: E731
    report = jgradcheck.check_grad(cost, wrong, {"w": _W_KINK})
    assert report.status == "failed", str(report)
    assert [leaf.path for leaf in report.failed_leaves] == ["w"] and report.leaf("w").n_failed == 1
    assert report.worst[0].index == (0,) and report.worst[0].status == "fail"
    assert report.worst[0].yours == 5.0


def _relu_layer_cost(p, x):
    return jnp.sum(jnp.tanh(jax.nn.relu(p["W"] @ x + p["b"])) * jnp.array([[1.0], [2.0]]))


def test_relu_network_with_a_pre_activation_exactly_zero():
    W = jnp.array([[1.0, -1.0], [0.5, 2.0]])
    b = jnp.array([[0.0], [0.3]])
    x = jnp.array([[1.0], [1.0]])  # unit 0: 1 - 1 + 0 == 0 exactly
    assert float((W @ x + b)[0, 0]) == 0.0
    report = jgradcheck.check_grad(_relu_layer_cost, jax.grad(_relu_layer_cost), {"W": W, "b": b}, x)
    assert report.passed, str(report)
    # Every parameter feeding unit 0 is on the kink; jax's relu'(0) = 0 is one of the one-sided slopes.
    assert {(e.path, e.index) for e in report.kinks} == {("W", (0, 0)), ("W", (0, 1)), ("b", (0, 0))}
    assert all(e.yours == 0.0 for e in report.kinks)

    # A backprop that uses relu'(0) = 7 at the kink is wrong.
    def bad(p, x):
        g = jax.grad(_relu_layer_cost)(p, x)
        return {**g, "b": g["b"].at[0, 0].set(7.0)}

    report = jgradcheck.check_grad(_relu_layer_cost, bad, {"W": W, "b": b}, x)
    assert [leaf.path for leaf in report.failed_leaves] == ["b"]


# --- scales --------------------------------------------------------------------------------------


def _big_cost(p):
    return 0.5 * jnp.sum(p["w"] ** 2) + 1e3 * jnp.sum(jnp.sin(p["w"] / 1e3))


_BIG = {"w": jnp.array([1000.0, -2000.0, 1500.0])}


def test_large_scales_correct_gradient_passes():
    assert float(_big_cost(_BIG)) > 1e6
    report = jgradcheck.check_grad(_big_cost, jax.grad(_big_cost), _BIG)
    assert report.passed, str(report)
    wrong = jgradcheck.check_grad(_big_cost, lambda p: {"w": jax.grad(_big_cost)(p)["w"] * 1.01}, _BIG)
    assert wrong.status == "failed", str(wrong)
    assert [leaf.path for leaf in wrong.failed_leaves] == ["w"] and wrong.leaf("w").n_failed == 3


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_one_percent_error_in_one_leaf_fails(net_factory, seed):
    net = net_factory([3, 5, 4, 1], m=16, lambd=0.7, seed=seed)
    right = net.backprop(None)

    def off(params, X, Y, key):
        g = right(params, X, Y, key)
        return {**g, "W1": g["W1"] * 1.01}

    report = jgradcheck.check_grad(net.cost, off, net.params32, *net.args())
    assert report.status == "failed", str(report)
    assert [leaf.path for leaf in report.failed_leaves] == ["W1"]
    assert "constant factor: yours ≈ 1.01 × numerical" in report.leaf("W1").diagnosis


# --- float32 without promotion -------------------------------------------------------------------


def _regression(seed):
    """A float32 tanh regression drawn from ``seed``: parameters, inputs, targets."""
    rng = np.random.default_rng(seed)
    A = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)
    y = jnp.asarray(rng.standard_normal(6), jnp.float32)
    p = {"w": jnp.asarray(rng.standard_normal(4) * 0.5, jnp.float32), "b": jnp.full((1,), 0.1, jnp.float32)}
    return p, A, y


_P32, _A, _Y = _regression(0)


def _reg_cost(p, A, y):
    r = jnp.tanh(A @ p["w"] + p["b"]) - y
    return 0.5 * jnp.mean(r**2)


def _reg_wrong(p, A, y):
    g = jax.grad(_reg_cost)(p, A, y)
    return {**g, "w": g["w"] * 1.01}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_float32_without_promotion_is_honest(seed):
    p, A, y = _regression(seed)
    ok = jgradcheck.check_grad(_reg_cost, jax.grad(_reg_cost), p, A, y, x64=False)
    wrong = jgradcheck.check_grad(_reg_cost, _reg_wrong, p, A, y, x64=False)
    for report in (ok, wrong):
        assert report.precision == "float32 (promotion to float64 off)"
    assert ok.passed, str(ok)
    # The 1% bug is caught in float32, in w only, by a check that claims to see 1% errors there.
    assert wrong.status == "failed", str(wrong)
    assert [leaf.path for leaf in wrong.failed_leaves] == ["w"]
    assert wrong.leaf("w").resolution < 1e-2
    assert "constant factor: yours ≈ 1.01 × numerical" in wrong.leaf("w").diagnosis


def test_float32_with_the_seeds_eps_is_inconclusive():
    """eps = 1e-7 in float32: θ ± h is a few ulps of θ; the report must not pretend (a pass
    that could not see 1% errors used to pass with a warning: it is now inconclusive)."""
    cost = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
    report = jgradcheck.check_grad(cost, lambda p: {"w": 2 * p["w"]}, {"w": jnp.ones(3)}, eps=1e-7, x64=False)
    assert report.status == "inconclusive", str(report)
    assert report.leaf("w").status == "inconclusive"
    assert report.leaf("w").resolution > 1e-2
    assert "INCONCLUSIVE" in str(report) and "x64=True" in str(report)


@pytest.mark.parametrize("kind", ["numpy", "jax"])
def test_x64_false_reports_the_precision_it_ran_in(kind):
    seen = []

    def cost(p):
        seen.append(str(p["w"].dtype))
        return jnp.sum(jnp.sin(p["w"]))

    w = np.array([0.1, 0.2, 0.3])
    if kind == "jax":
        with jax.enable_x64(True):
            w = jnp.asarray(w)
    report = jgradcheck.check_grad(cost, lambda p: {"w": jnp.cos(p["w"])}, {"w": w}, x64=False)
    assert set(seen) == {report.precision.split()[0]}


# --- stencils ------------------------------------------------------------------------------------


def _smooth_cost(p):
    return jnp.sum(jnp.sin(p["w"])) + jnp.sum(jnp.exp(0.5 * p["w"]))


_W_SMOOTH = jnp.asarray(np.random.default_rng(1).standard_normal(6) * 0.7, jnp.float32)


def _stencil_errors(**kwargs):
    with jax.enable_x64(True):
        exact = np.asarray(jax.grad(_smooth_cost)({"w": jnp.asarray(np.asarray(_W_SMOOTH), jnp.float64)})["w"])
    out = {}
    for method in ("central", "central4", "richardson"):
        ng = jgradcheck.numerical_grad(_smooth_cost, {"w": _W_SMOOTH}, method=method, float64=True, **kwargs)["w"]
        out[method] = float(np.max(np.abs(ng - exact)) / np.max(np.abs(exact)))
    return out


def test_higher_order_stencils_are_more_accurate_with_a_large_eps():
    err = _stencil_errors(eps=1e-2)  # float64: truncation dominates
    assert err["central"] > 1e-6
    assert err["central4"] < err["central"] / 100
    assert err["richardson"] < err["central4"] / 100


def test_higher_order_stencils_are_more_accurate_in_float32():
    err = _stencil_errors(x64=False)
    assert err["central4"] < err["central"] / 3
    assert err["richardson"] < err["central"] / 3


@pytest.mark.parametrize(
    "method",
    [
        "central4",
        "richardson",
    ],
)
def test_higher_order_methods_pass_and_catch_bugs(net, method):
    report = jgradcheck.check_grad(net.cost, net.backprop(None), net.params32, *net.args(), method=method)
    assert report.passed and report.method == method
    report = jgradcheck.check_grad(net.cost, net.backprop("dW2_doubled"), net.params32, *net.args(), method=method)
    assert [leaf.path for leaf in report.failed_leaves] == ["W2"]


def test_the_seeds_eps_is_accepted_and_reported(net):
    report = jgradcheck.check_grad(net.cost, net.backprop(None), net.params32, *net.args(), eps=1e-7)
    assert report.passed
    assert report.method == "central (eps = 1e-07)"
    assert "eps = 1e-07" in str(report)


# --- Taylor test ---------------------------------------------------------------------------------


def test_taylor_slopes():
    ok = jgradcheck.check_grad(_reg_cost, jax.grad(_reg_cost), _P32, _A, _Y, taylor_test=True)
    wrong = jgradcheck.check_grad(_reg_cost, _reg_wrong, _P32, _A, _Y, taylor_test=True)
    for leaf in ok.leaves:
        assert 1.8 <= leaf.taylor_slope <= 2.3, leaf
    assert wrong.leaf("w").taylor_slope < 1.5
    assert 1.8 <= wrong.leaf("b").taylor_slope <= 2.3
    assert "Taylor slope" in str(wrong)
    plain = jgradcheck.check_grad(_reg_cost, jax.grad(_reg_cost), _P32, _A, _Y)
    assert all(leaf.taylor_slope is None for leaf in plain.leaves)


# --- what finite differences cannot see ----------------------------------------------------------

_PV = {"w": jnp.array([0.3, -0.4, 0.9]), "v": jnp.array([1.0, 2.0])}


def _stopped_cost(p):
    return jnp.sum(p["w"] ** 2 * jax.lax.stop_gradient(jnp.sum(p["v"]))) + jnp.sum(p["v"] ** 3)


def test_stop_gradient_is_warned_about():
    report = jgradcheck.check_grad(_stopped_cost, jax.grad(_stopped_cost), _PV)
    assert report.status == "failed", str(report)  # jax.grad ignores the stopped path, finite differences do not
    assert [leaf.path for leaf in report.failed_leaves] == ["v"]
    assert any("stop_gradient" in w for w in report.warnings)


@jax.custom_vjp
def _bad_sin(x):
    return jnp.sin(x)


def _bad_sin_fwd(x):
    return jnp.sin(x), x


def _bad_sin_bwd(x, g):
    return (2.0 * jnp.cos(x) * g,)  # wrong: twice the derivative


_bad_sin.defvjp(_bad_sin_fwd, _bad_sin_bwd)


def test_wrong_custom_vjp_rule_fails_and_is_named():
    cost = lambda p: jnp.sum(_bad_sin(p["w"])) + jnp.sum(p["v"] ** 2)  # noqa: E731
    report = jgradcheck.check_grad(cost, jax.grad(cost), _PV)
    assert report.status == "failed", str(report)
    assert [leaf.path for leaf in report.failed_leaves] == ["w"]
    assert "constant factor: yours ≈ 2 × numerical" in report.leaf("w").diagnosis
    assert any("custom_vjp" in w and "_bad_sin" in w for w in report.warnings)


def test_jax_library_rules_are_not_warned_about():
    cost = lambda p: jnp.sum(jax.nn.relu(p["w"])) + jnp.sum(jax.nn.softplus(p["v"])) + jnp.sum(jax.nn.gelu(p["w"]))  # noqa: E731
    report = jgradcheck.check_grad(cost, jax.grad(cost), _PV)
    assert report.passed
    assert not any("custom_jvp" in w or "custom_vjp" in w for w in report.warnings)


def test_softmax_cross_entropy_gets_no_stop_gradient_warning():
    y = jnp.array([0.0, 1.0, 0.0])
    cost = lambda p: -jnp.sum(y * jax.nn.log_softmax(p["w"])) + jax.nn.logsumexp(p["v"])  # noqa: E731
    report = jgradcheck.check_grad(cost, jax.grad(cost), _PV)
    assert report.passed
    assert not any("stop_gradient" in w for w in report.warnings), report.warnings


# --- diagnosis -----------------------------------------------------------------------------------

_M = jnp.asarray(np.random.default_rng(2).standard_normal((4, 4)), jnp.float32)
_PD = {
    "W": jnp.asarray(np.random.default_rng(3).standard_normal((4, 4)), jnp.float32),
    "b": jnp.array([0.5, -1.0, 2.0]),
}
_LAM = 0.3


def _diag_cost(p):
    return jnp.sum(jnp.sin(p["W"] @ _M)) + jnp.sum(jnp.cos(p["b"])) + 0.5 * _LAM * jnp.sum(p["W"] ** 2)


def _diag_grad(p):
    return jax.grad(_diag_cost)(p)


_DIAGNOSES = {
    "factor": (lambda g, p: {**g, "W": 3.0 * g["W"]}, "W", "constant factor: yours ≈ 3 × numerical"),
    "sign": (lambda g, p: {**g, "b": -g["b"]}, "b", "sign flipped"),
    "zeros": (lambda g, p: {**g, "W": jnp.zeros_like(g["W"])}, "W", "yours is zero where numerical is not"),
    "transpose": (lambda g, p: {**g, "W": g["W"].T}, "W", "transposed: yours ≈ numerical.T"),
    "missing-l2": (lambda g, p: {**g, "W": g["W"] - _LAM * p["W"]}, "W", "missing L2 term (λ/m ≈ 0.3)"),
    "extra-l2": (lambda g, p: {**g, "b": g["b"] + 0.05 * p["b"]}, "b", "extra L2 term (λ/m ≈ 0.05)"),
    "isolated": (lambda g, p: {**g, "W": g["W"].at[1, 2].add(1.0)}, "W", "1 isolated entry is wrong"),
}


@pytest.mark.parametrize("rule", list(_DIAGNOSES))
def test_diagnosis_names_the_kind_of_bug(rule):
    mutate, leaf, phrase = _DIAGNOSES[rule]
    report = jgradcheck.check_grad(_diag_cost, lambda p: mutate(_diag_grad(p), p), _PD)
    assert [r.path for r in report.failed_leaves] == [leaf]
    assert phrase in report.leaf(leaf).diagnosis, report.leaf(leaf).diagnosis
    assert phrase in str(report)
    if rule == "isolated":
        assert report.worst[0].index == (1, 2)


def test_missing_one_over_m_across_all_leaves(net):
    report = jgradcheck.check_grad(net.cost, net.backprop("missing_1_over_m"), net.params32, *net.args())
    assert len(report.failed_leaves) == len(report.leaves)
    assert "common factor" in report.diagnosis
    assert f"batch size m = {net.m}" in report.diagnosis
    assert "missing 1/m" in report.diagnosis
    assert f"diagnosis: {report.diagnosis}" in " ".join(str(report).split())  # however the text wraps


def test_no_cross_leaf_diagnosis_when_one_leaf_fails(net):
    report = jgradcheck.check_grad(net.cost, net.backprop("dW2_doubled"), net.params32, *net.args())
    assert report.diagnosis is None


# --- grades and tolerances -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "difference, grade",
    [
        (0.0, Grade.GREAT),
        (5e-8, Grade.GREAT),
        (9.9e-7, Grade.GREAT),
        (1.01e-6, Grade.DOUBLE_CHECK),
        (5e-6, Grade.DOUBLE_CHECK),
        (9.9e-4, Grade.DOUBLE_CHECK),
        (1.01e-3, Grade.BUG),
        (2e-3, Grade.BUG),
        (float("inf"), Grade.BUG),
        (float("nan"), Grade.BUG),
    ],
)
def test_grade_bands(difference, grade):
    assert Grade.of(difference) is grade


def _exp_cost(p):
    return jnp.sum(jnp.exp(p["w"]))


def _exp_off(delta):
    return lambda p: {"w": jnp.exp(p["w"]) + delta}


def _check64(grad_fn, **kwargs):
    with jax.enable_x64(True):
        w = jnp.array([0.5, -1.5, 2.0, 0.25])
        return jgradcheck.check_grad(_exp_cost, grad_fn, {"w": w}, **kwargs)


def test_atol_sets_the_tolerance():
    """yours off by exactly 1e-6 everywhere: fails unless atol allows it."""
    tight = _check64(_exp_off(1e-6), atol=1e-7)
    loose = _check64(_exp_off(1e-6), atol=1e-5)
    assert tight.status == "failed", str(tight)
    assert [leaf.path for leaf in tight.failed_leaves] == ["w"]
    assert loose.passed
    assert all(e.error_estimate >= 1e-5 for e in loose.worst)
    assert all(e.abs_error == pytest.approx(1e-6, rel=1e-3) for e in tight.worst)


def test_safety_factor_scales_the_tolerance():
    """An error of 1e-8 is far outside the estimate at the default safety, inside at safety = 1000."""
    default = _check64(_exp_off(1e-8))
    lenient = _check64(_exp_off(1e-8), safety=1000.0)
    assert default.status == "failed", str(default)
    assert [leaf.path for leaf in default.failed_leaves] == ["w"]
    assert lenient.passed
    assert lenient.worst[0].error_estimate > 10 * default.worst[0].error_estimate
    # Far below the tolerance at the default: a correct gradient passes with a wide margin.
    exact = _check64(_exp_off(0.0))
    assert exact.passed
    assert exact.worst[0].abs_error < exact.worst[0].error_estimate / 3


def test_rtol_sets_a_relative_tolerance():
    off = lambda p: {"w": jnp.exp(p["w"]) * (1 + 1e-6)}  # noqa: E731
    wrong = _check64(off)
    assert wrong.status == "failed", str(wrong)
    assert [leaf.path for leaf in wrong.failed_leaves] == ["w"]
    assert _check64(off, rtol=1e-5).passed
