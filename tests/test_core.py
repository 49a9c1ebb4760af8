"""check_grad and numerical_grad on the seeds' network: verdicts, planted bugs, pytrees, errors."""

from __future__ import annotations

import itertools
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck import Grade

DTYPES = ("float32", "float64")


def _params(net, dtype):
    return net.params32 if dtype == "float32" else net.params64()


@pytest.fixture(scope="session")
def report_of():
    """check_grad(net.cost, net.backprop(bug), params) memoized per (net, bug, dtype)."""
    cache = {}

    def run(net, bug, dtype="float32"):
        key = (id(net), bug, dtype)
        if key not in cache:
            cache[key] = jgradcheck.check_grad(net.cost, net.backprop(bug), _params(net, dtype), *net.args())
        return cache[key]

    return run


# --- the correct gradient ------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
def test_correct_backprop_passes(net, report_of, dtype):
    report = report_of(net, None, dtype)
    assert report.passed
    assert report.failed_leaves == ()
    assert report.grade is Grade.GREAT
    assert report.difference < 1e-7  # the seeds' "great" level
    assert [leaf.path for leaf in report.leaves] == ["W1", "W2", "W3", "b1", "b2", "b3"]
    assert all(leaf.passed and leaf.how == "entries" and leaf.checked == leaf.size for leaf in report.leaves)
    assert {leaf.dtype for leaf in report.leaves} == {dtype}
    assert report.precision.startswith("float64")
    assert ("promoted from float32" in report.precision) == (dtype == "float32")
    assert report.diagnosis is None
    assert report.warnings == ()


def test_report_has_no_truth_value(net, report_of):
    report = report_of(net, None)
    with pytest.raises(TypeError, match="report.passed"):
        bool(report)
    with pytest.raises(KeyError, match="W9"):
        report.leaf("W9")


def _lambda_over_m(diagnosis: str) -> float:
    """The λ/m value a diagnosis quotes ("... (λ/m ≈ 0.0437) ...")."""
    match = re.search(r"λ/m ≈ ([0-9.eE+-]+)", diagnosis)
    assert match, diagnosis
    return float(match.group(1))


# --- planted bugs --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "bug, failing, phrase",
    [
        ("dW2_doubled", {"W2"}, "constant factor: yours ≈ 2 × numerical"),
        ("db1_4_over_m", {"b1"}, "constant factor: yours ≈ 4 × numerical"),
    ],
)
def test_constant_factor_bug_is_located(net, report_of, dtype, bug, failing, phrase):
    report = report_of(net, bug, dtype)
    assert report.status == "failed", str(report)
    assert report.grade is Grade.BUG
    assert {leaf.path for leaf in report.failed_leaves} == failing
    (path,) = failing
    assert report.worst[0].path == path
    assert report.worst[0].status == "fail"
    assert phrase in report.leaf(path).diagnosis
    assert report.leaf(path).n_failed == report.leaf(path).size  # every entry is off by the factor


@pytest.mark.parametrize("dtype", DTYPES)
def test_missing_l2_term_in_dW(net, report_of, dtype):
    report = report_of(net, "no_l2", dtype)
    assert report.status == "failed", str(report)
    assert {leaf.path for leaf in report.failed_leaves} == {"W1", "W2", "W3"}
    for path in ("W1", "W2", "W3"):
        diagnosis = report.leaf(path).diagnosis
        assert "missing L2 term" in diagnosis
        assert _lambda_over_m(diagnosis) == pytest.approx(net.lambd / net.m, rel=5e-3)  # 0.7 / 16
    assert report.worst[0].path.startswith("W")


@pytest.mark.parametrize("dtype", DTYPES)
def test_l2_wrongly_added_to_db(net, report_of, dtype):
    report = report_of(net, "l2_on_b", dtype)
    assert report.status == "failed", str(report)
    assert {leaf.path for leaf in report.failed_leaves} == {"b1", "b2", "b3"}
    assert report.worst[0].path.startswith("b")
    for path in ("b1", "b2"):  # b3 has one entry: any single number is "a constant factor"
        assert "extra L2 term" in report.leaf(path).diagnosis
        assert _lambda_over_m(report.leaf(path).diagnosis) == pytest.approx(net.lambd / net.m, rel=5e-3)


@pytest.mark.parametrize("dtype", DTYPES)
def test_transposed_square_dW(square_net, report_of, dtype):
    report = report_of(square_net, "dW2_transposed", dtype)
    assert report.status == "failed", str(report)
    assert {leaf.path for leaf in report.failed_leaves} == {"W2"}
    assert "transposed: yours ≈ numerical.T" in report.leaf("W2").diagnosis
    worst = report.worst[0]
    assert worst.path == "W2" and worst.index[0] != worst.index[1]


def test_fixed_key_dropout_in_cost_and_backprop_passes(dropout_net, report_of):
    report = report_of(dropout_net, None)
    assert report.passed
    assert report.difference < 1e-7


def test_dropout_mask_differing_from_the_cost_fails(dropout_net, report_of):
    report = report_of(dropout_net, "dropout_other_key")
    assert report.status == "failed", str(report)
    assert report.grade is Grade.BUG
    # The masks drop hidden units, so the hidden layers' gradients are the wrong ones.
    assert {"W1", "b1", "W2", "b2"} <= {leaf.path for leaf in report.failed_leaves}


def test_worst_entries_map_back_to_leaf_and_index(net, report_of):
    report = report_of(net, "dW2_doubled", "float64")
    with jax.enable_x64(True):
        mine = jax.jit(net.backprop("dW2_doubled"))(net.params64(), *net.args())
        exact = jax.jit(jax.grad(net.cost))(net.params64(), *net.args())
    failing = [e for e in report.worst if e.status == "fail"]
    assert len(failing) == min(10, net.dims[2] * net.dims[1])  # top_k = 10 worst, all in W2
    for e in failing:
        assert e.path == "W2"
        assert e.name == f"W2[{e.index[0]}, {e.index[1]}]"
        assert e.yours == pytest.approx(float(mine["W2"][e.index]), rel=1e-12)
        assert e.numerical == pytest.approx(float(exact["W2"][e.index]), rel=1e-6, abs=1e-12)
        assert e.abs_error == pytest.approx(abs(e.yours - e.numerical))
        assert e.abs_error > e.error_estimate
    # Ranked: the entry furthest outside its tolerance first.
    ratios = [e.abs_error / e.error_estimate for e in failing]
    assert ratios == sorted(ratios, reverse=True)


def test_report_table_labels_both_sides(net, report_of):
    text = str(report_of(net, "dW2_doubled"))
    assert "yours" in text and "numerical" in text
    assert "FAILED" in text
    for path in ("W1", "W2", "W3", "b1", "b2", "b3"):
        assert re.search(rf"^\s+{path}\s", text, re.M), path
    w2_row = next(line for line in text.splitlines() if line.strip().startswith("W2 "))
    assert "FAIL" in w2_row and "2 × numerical" in w2_row
    w1_row = next(line for line in text.splitlines() if line.strip().startswith("W1 "))
    assert "FAIL" not in w1_row
    passing = str(report_of(net, None))
    assert "PASSED" in passing and "FAIL" not in passing


def test_gradient_pytree_instead_of_function(net):
    grads = net.backprop(None)(net.params32, *net.args())
    report = jgradcheck.check_grad(net.cost, grads, net.params32, *net.args())
    assert report.passed
    # float32 gradient values: good to float32 precision, not better.
    assert report.difference < 1e-6
    bad = {**grads, "b2": -grads["b2"]}
    report = jgradcheck.check_grad(net.cost, bad, net.params32, *net.args())
    assert [leaf.path for leaf in report.failed_leaves] == ["b2"]
    assert "sign flipped" in report.leaf("b2").diagnosis


# --- determinism ---------------------------------------------------------------------------------


def test_new_dropout_key_per_call_is_not_deterministic():
    counter = itertools.count()
    x = jnp.linspace(1.0, 2.0, 64)

    def cost(p, x):  # a new key each time the function is traced: a new mask each time
        mask = jax.random.bernoulli(jax.random.PRNGKey(next(counter)), 0.5, x.shape)
        return jnp.sum((p["w"] * x * mask) ** 2)

    with pytest.raises(ValueError, match="not deterministic"):
        jgradcheck.check_grad(cost, lambda p, x: {"w": 2 * p["w"] * x**2}, {"w": jnp.ones(64)}, x)


def test_numpy_global_rng_dropout_is_not_deterministic():
    x = jnp.linspace(1.0, 2.0, 64)

    def cost(p, x):  # 64 draws: the chance of two equal masks is 2**-64
        mask = np.random.rand(64) < 0.5
        return jnp.sum((p["w"] * x * mask) ** 2)

    with pytest.raises(ValueError, match="not deterministic.*fixed PRNG key"):
        jgradcheck.check_grad(cost, lambda p, x: {"w": 2 * p["w"] * x**2}, {"w": jnp.ones(64)}, x)


# --- pytrees -------------------------------------------------------------------------------------


class Linear(NamedTuple):
    w: jax.Array
    b: jax.Array


def _nested_params():
    rng = np.random.default_rng(3)
    return {
        "layers": [
            Linear(jnp.asarray(rng.standard_normal((3, 4)) * 0.5, jnp.float32), jnp.full((4,), 0.1)),
            Linear(jnp.asarray(rng.standard_normal((4, 2)) * 0.5, jnp.float32), jnp.full((2,), -0.2)),
        ],
        "head": (jnp.array([1.0, -2.0]),),
        "step": jnp.array(3, jnp.int32),
        "key": jax.random.PRNGKey(5),
    }


_SEEN_INT_LEAVES: list = []


def _nested_cost(p, x):
    _SEEN_INT_LEAVES.append((p["step"].dtype, p["key"].dtype, p["key"].shape))
    h = x
    for layer in p["layers"]:
        h = jnp.tanh(h @ layer.w + layer.b)
    # Draw in float32 explicitly: the same noise whether the check runs in float32 or float64.
    noise = jax.random.normal(p["key"], h.shape, jnp.float32)  # uses the uint32 key
    scale = 1.0 + 0.1 * p["step"]  # uses the int32 counter
    return scale * jnp.sum((h + 0.1 * noise) ** 2) + jnp.sum(jnp.cos(p["head"][0]))


def _nested_grad(p, x):
    """Hand-written backprop through the two tanh layers (int leaves omitted)."""
    acts = [x]
    h = x
    for layer in p["layers"]:
        h = jnp.tanh(h @ layer.w + layer.b)
        acts.append(h)
    noise = jax.random.normal(p["key"], h.shape, jnp.float32)
    scale = 1.0 + 0.1 * p["step"]
    dh = scale * 2 * (h + 0.1 * noise)
    grads = [None, None]
    for i in (1, 0):
        dz = dh * (1 - acts[i + 1] ** 2)
        grads[i] = Linear(acts[i].T @ dz, jnp.sum(dz, axis=0))
        dh = dz @ p["layers"][i].w.T
    return {"layers": grads, "head": (-jnp.sin(p["head"][0]),)}


def test_nested_pytree_with_integer_leaves():
    params = _nested_params()
    before = jax.tree_util.tree_map(np.asarray, params)
    x = jnp.asarray(np.random.default_rng(4).standard_normal((5, 3)), jnp.float32)
    _SEEN_INT_LEAVES.clear()
    report = jgradcheck.check_grad(_nested_cost, _nested_grad, params, x)
    assert report.passed, str(report)
    assert [leaf.path for leaf in report.leaves] == [
        "head[0]",
        "layers[0].w",
        "layers[0].b",
        "layers[1].w",
        "layers[1].b",
    ]
    assert "step" not in str(report) and "key" not in [leaf.path for leaf in report.leaves]
    # The integer leaves reach cost_fn with their own dtypes (never promoted or perturbed) ...
    assert _SEEN_INT_LEAVES and set(_SEEN_INT_LEAVES) == {(np.dtype("int32"), np.dtype("uint32"), (2,))}
    # ... and the user's tree is left as it was.
    after = jax.tree_util.tree_map(np.asarray, params)
    jax.tree_util.tree_map(np.testing.assert_array_equal, before, after)

    # A planted bug deep in the tree is named by its readable path.
    def bad(p, x):
        g = _nested_grad(p, x)
        first = g["layers"][0]
        return {**g, "layers": [first._replace(b=jnp.zeros_like(first.b)), g["layers"][1]]}

    report = jgradcheck.check_grad(_nested_cost, bad, params, x)
    assert [leaf.path for leaf in report.failed_leaves] == ["layers[0].b"]
    assert report.worst[0].name.startswith("layers[0].b[")
    assert "zero where numerical is not" in report.leaf("layers[0].b").diagnosis


def test_integer_leaves_may_be_returned_by_grad_fn():
    """jax.grad(allow_int=True) returns float0 at integer leaves: accepted and ignored."""
    params = _nested_params()
    x = jnp.ones((2, 3))
    grad_fn = jax.grad(_nested_cost, allow_int=True)
    report = jgradcheck.check_grad(_nested_cost, grad_fn, params, x)
    assert report.passed
    assert len(report.leaves) == 5


# --- bad inputs ----------------------------------------------------------------------------------


def _J(p):
    return jnp.sum(p["a"] ** 2) + jnp.sum(jnp.sin(p["b"]))


def _dJ(p):
    return {"a": 2 * p["a"], "b": jnp.cos(p["b"])}


_P = {"a": jnp.arange(3.0), "b": jnp.ones((2, 3))}


@pytest.mark.parametrize(
    "cost_fn, grad_fn, params, kwargs, exc, match",
    [
        pytest.param(lambda p: p["a"] ** 2, _dJ, _P, {}, ValueError, r"scalar.*shape \(3,\)", id="cost-not-scalar"),
        pytest.param(_J, lambda p: {"a": 2 * p["a"]}, _P, {}, ValueError, r"missing leaves.*: b\b", id="missing-leaf"),
        pytest.param(
            _J,
            lambda p: {**_dJ(p), "c": jnp.ones(2)},
            _P,
            {},
            ValueError,
            r"leaves that params does not: c\b",
            id="extra-leaf",
        ),
        pytest.param(
            _J,
            lambda p: {"a": 2 * p["a"], "b": jnp.ones(6)},
            _P,
            {},
            ValueError,
            r"'b' has shape \(6,\) but the parameter has shape \(2, 3\)",
            id="wrong-shape",
        ),
        pytest.param(
            _J,
            lambda p: {"a": 2 * p["a"], "b": jnp.ones((3, 2))},
            _P,
            {},
            ValueError,
            r"'b' has shape \(3, 2\).*\(2, 3\) \(transposed\?\)",
            id="transposed-shape",
        ),
        pytest.param(
            lambda p: jnp.sum(jnp.log(p["a"] - 1.0)), _dJ, _P, {}, ValueError, r"nan.*NaN/Inf cost", id="nan-cost"
        ),
        pytest.param(
            lambda p: jnp.sum(p["i"]) * 1.0,
            lambda p: p,
            {"i": jnp.arange(3)},
            {},
            ValueError,
            r"no floating-point leaves.*int32",
            id="no-float-leaves",
        ),
        pytest.param(3.0, _dJ, _P, {}, TypeError, r"cost_fn must be a function.*float", id="cost-not-callable"),
        pytest.param(_J, _dJ, _P, {"mode": "fast"}, ValueError, r"mode must be one of .*'fast'", id="bad-mode"),
        pytest.param(
            _J, _dJ, _P, {"method": "forward"}, ValueError, r"method must be one of .*'forward'", id="bad-method"
        ),
        pytest.param(_J, _dJ, _P, {"eps": 0.0}, ValueError, r"eps must be a positive finite number", id="eps-zero"),
        pytest.param(_J, _dJ, _P, {"eps": -1e-3}, ValueError, r"eps must be a positive", id="eps-negative"),
        pytest.param(_J, _dJ, _P, {"eps": float("nan")}, ValueError, r"eps must be a positive finite", id="eps-nan"),
        pytest.param(_J, _dJ, _P, {"eps": "1e-7"}, ValueError, r"eps must be a positive finite", id="eps-str"),
    ],
)
def test_bad_inputs_raise_clear_errors(cost_fn, grad_fn, params, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        jgradcheck.check_grad(cost_fn, grad_fn, params, **kwargs)


@pytest.mark.parametrize(
    "kwargs, match",
    [({"method": "forward"}, "method must be one of"), ({"eps": 0}, "eps must be a positive")],
)
def test_numerical_grad_rejects_bad_options(kwargs, match):
    with pytest.raises(ValueError, match=match):
        jgradcheck.numerical_grad(_J, _P, **kwargs)


def test_numpy_scalar_eps_is_accepted():
    report = jgradcheck.check_grad(_J, _dJ, _P, eps=np.float32(1e-4))
    assert report.passed


def test_nan_in_your_gradient_is_a_failing_report_not_an_exception():
    report = jgradcheck.check_grad(_J, lambda p: {"a": 2 * p["a"], "b": jnp.full((2, 3), jnp.nan)}, _P)
    assert report.status == "failed", str(report)
    assert [leaf.path for leaf in report.failed_leaves] == ["b"]
    assert report.grade is Grade.BUG
    assert "NaN" in report.leaf("b").diagnosis


def test_both_gradients_exactly_zero():
    report = jgradcheck.check_grad(
        lambda p: jnp.sum(p["w"] * 0.0), lambda p: {"w": jnp.zeros(3)}, {"w": jnp.arange(3.0)}
    )
    assert report.passed
    assert report.difference == 0.0  # not NaN (0 / 0)
    assert report.grade is Grade.GREAT


def test_correct_gradient_near_a_minimum_passes():
    """Entries ~1e-9: the seeds' relative difference is meaningless here, the error-aware verdict is not."""
    w0 = np.array([0.3, -1.2, 2.5])
    with jax.enable_x64(True):
        target = jnp.asarray(w0)
        w = jnp.asarray(w0 + 5e-10)
        cost = lambda p: jnp.sum((p["w"] - target) ** 2)  # noqa: E731
        report = jgradcheck.check_grad(cost, lambda p: {"w": 2 * (p["w"] - target)}, {"w": w})
        wrong = jgradcheck.check_grad(cost, lambda p: {"w": 4 * (p["w"] - target)}, {"w": w})
    assert report.passed, str(report)
    assert abs(report.leaves[0].worst.yours) < 2e-9
    assert wrong.status == "failed", str(wrong)  # ... and a factor-2 bug at that scale is still seen
    assert [leaf.path for leaf in wrong.failed_leaves] == ["w"]


# --- numerical_grad ------------------------------------------------------------------------------


def test_numerical_grad_matches_jax_grad_in_float64(net):
    params = net.params64()
    numerical = jgradcheck.numerical_grad(net.cost, params, *net.args())
    with jax.enable_x64(True):
        exact = jax.grad(net.cost)(params, *net.args())
    assert set(numerical) == set(params)
    for k in params:
        assert isinstance(numerical[k], type(params[k]))  # typed and placed like params
        assert numerical[k].dtype == params[k].dtype == np.float64 and numerical[k].shape == params[k].shape
        np.testing.assert_allclose(
            numerical[k], np.asarray(exact[k]), rtol=1e-8, atol=1e-8 * float(np.max(np.abs(exact[k])))
        )


def test_numerical_grad_gives_float0_for_integer_leaves():
    params = _nested_params()
    x = jnp.ones((2, 3))
    numerical = jgradcheck.numerical_grad(_nested_cost, params, x)
    assert jax.tree_util.tree_structure(numerical) == jax.tree_util.tree_structure(params)
    assert numerical["step"].dtype == jax.dtypes.float0 and numerical["step"].shape == ()
    assert numerical["key"].dtype == jax.dtypes.float0 and numerical["key"].shape == (2,)
    exact = jax.grad(_nested_cost, allow_int=True)(params, x)
    np.testing.assert_allclose(numerical["layers"][1].w, exact["layers"][1].w, rtol=1e-5)


# --- no global side effects, no recompilation ----------------------------------------------------


def test_global_x64_flag_is_untouched(net, report_of):
    assert jax.config.jax_enable_x64 is False
    report = jgradcheck.check_grad(net.cost, net.backprop(None), net.params32, *net.args())
    assert report.precision.startswith("float64")  # it did run in float64 ...
    assert jax.config.jax_enable_x64 is False  # ... without flipping the user's flag
    assert jnp.ones(2).dtype == jnp.float32
    jgradcheck.numerical_grad(net.cost, net.params32, *net.args())
    assert jax.config.jax_enable_x64 is False and jnp.ones(2).dtype == jnp.float32


def test_recheck_at_new_values_does_not_recompile():
    traces = []
    x = jnp.linspace(-1.0, 1.0, 8)

    def cost(p, x):
        traces.append(1)  # runs once per trace, not per evaluation
        return jnp.sum(jnp.sin(p["w"]) * x) + jnp.sum(p["v"] ** 2) + jnp.sum(jnp.tanh(p["m"]))

    def grad(p, x):
        return {"w": jnp.cos(p["w"]) * x, "v": 2 * p["v"], "m": 1 - jnp.tanh(p["m"]) ** 2}

    counts = []
    for i in range(3):
        p = {"w": jnp.full((8,), 0.1 * i), "v": jnp.full((3,), 1.0 + i), "m": jnp.full((2, 2), -0.5 * i)}
        before = len(traces)
        assert jgradcheck.check_grad(cost, grad, p, x).passed
        counts.append(len(traces) - before)
    first, second, third = counts
    assert second == third  # a constant: the determinism probe and the jaxpr inspection ...
    assert second <= first  # ... while the compiled evaluators are reused (keyed by the jaxpr: see test_engine)
    assert second <= 4


def test_precomputed_gradient_with_fixed_key_dropout_passes(dropout_net):
    """The classic flow: gradients = backward_propagation(...); gradient_check(parameters, gradients, ...).

    A float32 gradient given as a pytree, a cost with dropout masks from a fixed key: the float64
    check runs the cost as you run it (the same masks), so the precomputed gradient passes, in every
    leaf, and so does the same backprop given as a function.
    """
    args = dropout_net.args()
    grads = dropout_net.backprop(None)(dropout_net.params32, *args)
    report = jgradcheck.check_grad(dropout_net.cost, grads, dropout_net.params32, *args)
    assert report.status == "passed", str(report)
    assert report.precision.startswith("float64")
    as_function = jgradcheck.check_grad(dropout_net.cost, dropout_net.backprop(None), dropout_net.params32, *args)
    assert as_function.status == "passed", str(as_function)
    # ... while a precomputed gradient whose masks came from another key still fails where they act.
    other = dropout_net.backprop("dropout_other_key")(dropout_net.params32, *args)
    wrong = jgradcheck.check_grad(dropout_net.cost, other, dropout_net.params32, *args)
    assert wrong.status == "failed", str(wrong)
    assert [leaf.path for leaf in wrong.failed_leaves] == ["W1", "W2", "W3", "b1", "b2", "b3"]  # every layer


def test_precomputed_float32_gradient_with_dropout_without_promotion_is_inconclusive(dropout_net):
    """In float32 the cost's log(1 − sigmoid) makes J noisy at ~1e-5 and a ReLU kink sits within
    reach of the larger steps: no step resolves 1% errors, so the verdict says so rather than pass."""
    args = dropout_net.args()
    grads = dropout_net.backprop(None)(dropout_net.params32, *args)
    report = jgradcheck.check_grad(dropout_net.cost, grads, dropout_net.params32, *args, x64=False)
    assert report.status == "inconclusive", str(report)
    assert report.failed_leaves == ()


def test_numerical_grad_returns_arrays_typed_and_placed_like_params():
    params = {"w": jnp.arange(1.0, 4.0), "n": np.arange(3.0, dtype=np.float32), "k": jnp.int32(3)}

    def cost(p):
        return jnp.sum(p["w"] ** 2) + jnp.sum(p["n"] ** 3)

    g = jgradcheck.numerical_grad(cost, params)
    assert isinstance(g["w"], jax.Array) and g["w"].dtype == jnp.float32
    assert g["w"].sharding == params["w"].sharding
    assert isinstance(g["n"], np.ndarray) and g["n"].dtype == np.float32
    assert g["k"].dtype == jax.dtypes.float0
    np.testing.assert_allclose(g["w"], [2.0, 4.0, 6.0], rtol=1e-6)
    g64 = jgradcheck.numerical_grad(cost, params, float64=True)
    assert isinstance(g64["w"], np.ndarray) and g64["w"].dtype == np.float64


def test_keyword_arguments_reach_both_functions():
    def cost(p, x, lam=0.0):
        return jnp.sum((x @ p["w"]) ** 2) + lam * jnp.sum(p["w"] ** 2)

    def grad(p, x, lam=0.0):
        return {"w": 2 * x.T @ (x @ p["w"]) + 2 * lam * p["w"]}

    p, x = {"w": jnp.arange(1.0, 5.0)}, jnp.ones((3, 4))
    assert jgradcheck.check_grad(cost, grad, p, x, lam=0.5).passed
    wrong = jgradcheck.check_grad(cost, lambda p, x, lam: {"w": 2 * x.T @ (x @ p["w"])}, p, x, lam=0.5)
    assert wrong.status == "failed", str(wrong)
    assert [leaf.path for leaf in wrong.failed_leaves] == ["w"] and "missing L2" in wrong.leaf("w").diagnosis
    with pytest.raises(TypeError, match="keyword argument.*'lamb'.*functools.partial"):
        jgradcheck.check_grad(cost, grad, p, x, lamb=0.5)
    np.testing.assert_allclose(jgradcheck.numerical_grad(cost, p, x, lam=0.5)["w"], grad(p, x, 0.5)["w"], rtol=1e-5)
