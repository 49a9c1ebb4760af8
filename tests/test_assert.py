"""assert_grad_correct: the assertion layer for pytest and chex tests."""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck

PREFIX = "[jgradcheck] Assertion assert_grad_correct failed: "

_X = jnp.asarray(np.random.default_rng(0).standard_normal((4, 3)), jnp.float32)
_PARAMS = {"w": jnp.array([0.5, -1.0, 0.25]), "b": jnp.array([0.1])}


def _cost(p, x):
    return jnp.sum(jnp.tanh(x @ p["w"] + p["b"]) ** 2)


def _grad(p, x):
    t = jnp.tanh(x @ p["w"] + p["b"])
    dz = 2 * t * (1 - t**2)
    return {"w": x.T @ dz, "b": jnp.sum(dz, keepdims=True)}


def _buggy_grad(p, x):
    g = _grad(p, x)
    return {**g, "b": 2 * g["b"]}  # dJ/db doubled


def test_passes_silently_for_a_correct_gradient():
    assert jgradcheck.assert_grad_correct(_cost, _grad, _PARAMS, _X) is None


def test_raises_with_the_answer_first_for_a_buggy_gradient():
    with pytest.raises(AssertionError) as info:
        jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X, custom_message="layer 1 backprop")
    message = str(info.value)
    lines = message.splitlines()
    assert lines[0] == PREFIX + "layer 1 backprop"
    assert lines[1].startswith("FAILED: your gradient disagrees with the numerical one in b")
    assert "yours" in message and "numerical" in message
    b_row = next(line for line in lines if line.strip().startswith("b "))
    assert "FAIL" in b_row
    w_row = next(line for line in lines if line.strip().startswith("w "))
    assert "FAIL" not in w_row and " ok " in w_row
    assert any(line.strip().startswith("worst: b[0]") for line in lines)
    diagnosis = next(line for line in lines if line.strip().startswith("diagnosis:"))
    assert "2 × numerical" in diagnosis
    assert next(line for line in lines if line.strip().startswith("next:")).count("b[0]") == 1
    # The full report travels with the error.
    assert info.value.report.failed_leaves[0].path == "b"  # type: ignore[attr-defined]


def _message(*args, **kwargs) -> str:
    with pytest.raises(AssertionError) as info:
        jgradcheck.assert_grad_correct(*args, **kwargs)
    return str(info.value)


def _fits(message: str) -> None:
    lines = message.splitlines()
    assert len(lines) <= 15, message
    assert max(len(line) for line in lines) <= 100, message


def test_a_planted_bug_in_a_six_leaf_network_fits_15_lines_of_100_columns(net):
    """The seeds' network without its L2 term: the table, the worst entries, the diagnosis and the
    next step, all within 15 lines of at most 100 columns."""
    message = _message(net.cost, net.backprop("no_l2"), net.params32, *net.args())
    _fits(message)
    lines = message.splitlines()
    assert lines[0] == "[jgradcheck] Assertion assert_grad_correct failed: FAILED in W1, W2, W3"
    header = next(k for k, line in enumerate(lines) if line.split()[:2] == ["leaf", "shape"])
    assert lines[header].split() == ["leaf", "shape", "status", "difference", "worst", "yours", "numerical"]
    rows = [line.split()[0] for line in lines[header + 1 : header + 4]]
    assert rows == ["W1", "W2", "W3"]  # the failing leaves first
    assert "... 3 more leaves: 3 ok" in message
    assert sum(line.strip().startswith(("worst:", "W")) for line in lines if "tolerance" in line) == 3
    assert "missing L2 term" in message
    assert any(line.startswith("  next: fix how your gradient computes W") for line in lines)
    assert lines[-1].startswith("  ran in float64")


def test_a_diagnosis_across_leaves_is_the_next_step(net):
    message = _message(net.cost, net.backprop("missing_1_over_m"), net.params32, *net.args())
    _fits(message)
    assert "missing 1/m" in message
    assert "next: fix what the diagnosis names in your gradient" in message


def test_long_leaf_paths_are_shortened_to_fit():
    params = {"encoder": {"layers_0": {"attention": {"query_projection_kernel_with_a_long_name": jnp.ones(3)}}}}
    cost = lambda p: jnp.sum(jax.tree_util.tree_leaves(p)[0] ** 2)  # noqa: E731
    wrong = lambda p: jax.tree_util.tree_map(lambda w: 3 * w, p)  # noqa: E731
    message = _message(cost, wrong, params)
    _fits(message)
    assert "…" in message and "query_projection_kernel_with_a_long_name" in message  # the path's end is kept


def test_a_failing_vjp_names_jacobian_entries():
    def layer(x, w):
        return jnp.tanh(x @ w)

    def layer_vjp(x, w):
        y = jnp.tanh(x @ w)
        return y, lambda dy: ((dy * (1 - y**2)) @ w.T, 2 * x.T @ (dy * (1 - y**2)))  # dw doubled

    with pytest.raises(AssertionError) as info:
        jgradcheck.assert_vjp_correct(layer, layer_vjp, jnp.ones((2, 3)), jnp.full((3, 4), 0.1))
    message = str(info.value)
    _fits(message)
    assert message.splitlines()[1].startswith("FAILED: your VJP disagrees with the numerical one in w")
    assert "worst: d out[" in message and "/ d w[" in message
    assert "jgradcheck.check_vjp(...)" in message


# --- inconclusive ----------------------------------------------------------------------------------

# eps = 1e-7 in float32: θ ± h is a few ulps of θ, a correct gradient is inconclusive.
_SQ = lambda p: jnp.sum(p["w"] ** 2)  # noqa: E731
_SQ_GRAD = lambda p: {"w": 2 * p["w"]}  # noqa: E731
_SQ_ARGS = (_SQ, _SQ_GRAD, {"w": jnp.ones(3)})
_SQ_OPTS = {"eps": 1e-7, "x64": False}


def test_an_inconclusive_check_fails_by_default_and_says_what_to_do():
    message = _message(*_SQ_ARGS, **_SQ_OPTS)
    _fits(message)
    lines = message.splitlines()
    assert lines[0] == PREFIX + "INCONCLUSIVE in w"
    assert lines[1].startswith("INCONCLUSIVE (not a pass)")
    assert "FAIL " not in message
    assert "x64=True" in message and "allow_inconclusive=True" in message


def test_allow_inconclusive_passes_with_a_warning_that_points_at_your_call():
    with pytest.warns(jgradcheck.InconclusiveWarning, match=r"passed as INCONCLUSIVE .* could not resolve w") as rec:
        assert jgradcheck.assert_grad_correct(*_SQ_ARGS, allow_inconclusive=True, **_SQ_OPTS) is None
    assert rec[0].filename == __file__
    assert issubclass(jgradcheck.InconclusiveWarning, UserWarning)


def test_allow_inconclusive_does_not_pass_a_failure():
    with pytest.raises(AssertionError, match="FAILED in b"):
        jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X, allow_inconclusive=True)


def test_allow_inconclusive_is_silent_on_a_pass(recwarn):
    jgradcheck.assert_grad_correct(_cost, _grad, _PARAMS, _X, allow_inconclusive=True)
    assert not [w for w in recwarn if issubclass(w.category, jgradcheck.InconclusiveWarning)]


@pytest.mark.parametrize(
    "name",
    ["assert_grad_correct", "assert_vjp_correct", "assert_jvp_correct", "assert_rules_correct", "assert_hvp_correct"],
)
def test_every_assertion_takes_allow_inconclusive_and_hides_its_frames(name):
    import inspect

    from jgradcheck._src import asserts

    fn = getattr(jgradcheck, name)
    param = inspect.signature(fn).parameters["allow_inconclusive"]
    assert param.kind is inspect.Parameter.KEYWORD_ONLY and param.default is False
    assert "__tracebackhide__" in fn.__code__.co_varnames
    assert "__tracebackhide__" in asserts._raise_unless_passed.__code__.co_varnames


def test_allow_inconclusive_on_a_vector_check():
    f = lambda x: x**2  # noqa: E731
    vjp = lambda x: (f(x), lambda g: (2 * x * g,))  # noqa: E731
    with pytest.raises(AssertionError, match="INCONCLUSIVE"):
        jgradcheck.assert_vjp_correct(f, vjp, jnp.ones(3), eps=1e-7, x64=False)
    with pytest.warns(jgradcheck.InconclusiveWarning, match="assert_vjp_correct"):
        jgradcheck.assert_vjp_correct(f, vjp, jnp.ones(3), eps=1e-7, x64=False, allow_inconclusive=True)


def test_exception_type_is_honored():
    with pytest.raises(ValueError, match=r"^\[jgradcheck\] Assertion assert_grad_correct failed: "):
        jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X, exception_type=ValueError)


def test_check_kwargs_are_passed_through():
    # A 1e-6 relative error fails at the defaults and passes with rtol = 1e-4.
    off = lambda p, x: jax.tree_util.tree_map(lambda g: g * (1 + 1e-6), _grad(p, x))  # noqa: E731
    with pytest.raises(AssertionError, match="FAILED"):
        jgradcheck.assert_grad_correct(_cost, off, _PARAMS, _X)
    jgradcheck.assert_grad_correct(_cost, off, _PARAMS, _X, rtol=1e-4)
    with pytest.raises(ValueError, match="mode must be one of"):
        jgradcheck.assert_grad_correct(_cost, _grad, _PARAMS, _X, mode="nope")


def test_chex_disable_asserts_makes_it_a_no_op():
    chex.disable_asserts()
    try:
        assert jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X) is None
    finally:
        chex.enable_asserts()
    with pytest.raises(AssertionError):
        jgradcheck.assert_grad_correct(_cost, _buggy_grad, _PARAMS, _X)


class ChexVariantsTest(chex.TestCase):
    """The user's grad_fn wrapped by chex variants (jitted or not) is checked like any other."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_correct_gradient(self):
        jgradcheck.assert_grad_correct(_cost, self.variant(_grad), _PARAMS, _X)

    @chex.variants(with_jit=True, without_jit=True)
    def test_buggy_gradient(self):
        with self.assertRaisesRegex(AssertionError, r"\[jgradcheck\] Assertion assert_grad_correct failed: "):
            jgradcheck.assert_grad_correct(_cost, self.variant(_buggy_grad), _PARAMS, _X)
