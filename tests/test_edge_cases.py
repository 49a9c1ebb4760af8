"""Edge cases a demanding user hits: kinks at θ, lost steps, casts, bfloat16, typed keys, bad options."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import engine


def test_kinks_at_theta_do_not_hide_a_real_bug():
    # Five exact zeros put |w| on its kink at θ; the noise probe must not mistake that for noise.
    w = jnp.concatenate([jnp.zeros(5), jnp.linspace(0.1, 1.0, 10)])

    def cost(p):
        return 0.1 * jnp.sum(jnp.abs(p["w"])) + jnp.sum(jnp.sin(p["w"]) ** 2)

    def grad(p):
        return {"w": jax.grad(cost)(p)["w"].at[7].multiply(1.05)}

    assert jgradcheck.check_grad(cost, jax.grad(cost), {"w": w}).passed
    report = jgradcheck.check_grad(cost, grad, {"w": w})
    assert report.status == "failed", str(report)
    assert [leaf.path for leaf in report.failed_leaves] == ["w"] and report.leaf("w").n_failed == 1
    assert report.worst[0].name == "w[7]"


def test_a_noise_probe_through_a_kink_does_not_hide_a_bug():
    # Most entries sit on |k|'s kink, so the noise probe's line starts at one: a line through
    # the kink would read the jump in slope as noise, loosen every tolerance and pass w's bug.
    params = {"k": jnp.zeros(200), "w": jnp.linspace(0.1, 1.0, 4)}

    def cost(p):
        return 0.1 * jnp.sum(jnp.abs(p["k"])) + jnp.sum(jnp.sin(p["w"]) ** 2)

    def grad(p):
        g = jax.grad(cost)(p)
        # 1%: inside the 2.5% tolerance that a kink read as noise would give.
        return {**g, "w": g["w"].at[2].multiply(1.01)}

    report = jgradcheck.check_grad(cost, grad, params)
    assert report.status == "failed", str(report)
    assert [leaf.path for leaf in report.failed_leaves] == ["w"] and report.leaf("w").n_failed == 1
    assert report.worst[0].name == "w[2]"


def test_relu_exactly_at_zero_everywhere_is_kinks_not_bugs():
    def cost(p):
        return jnp.sum(jax.nn.relu(p["w"]))

    report = jgradcheck.check_grad(cost, jax.grad(cost), {"w": jnp.zeros(6)})
    assert report.passed
    assert len(report.kinks) == 6 == report.leaf("w").n_kinks


def test_kinks_do_not_crowd_out_the_failing_entry():
    x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 20)))

    def cost(p):
        return jnp.sum(jax.nn.relu(p["W"] @ x + p["b"][:, None]))

    params = {"W": jnp.zeros((4, 3)), "b": jnp.array([0.0, 0.3, 0.0, 0.0])}  # many exact zeros

    def grad(p):
        g = jax.grad(cost)(p)
        return {**g, "b": g["b"].at[1].multiply(1.02)}

    report = jgradcheck.check_grad(cost, grad, params, top_k=3)
    assert report.status == "failed", str(report)
    assert [leaf.path for leaf in report.failed_leaves] == ["b"] and report.leaf("b").n_failed == 1
    assert report.worst[0].name == "b[1]"
    assert all(e.status != "kink" for e in report.worst)
    assert len(report.kinks) == sum(leaf.n_kinks for leaf in report.leaves)


def test_a_step_lost_to_rounding_raises_instead_of_passing():
    def cost(p):
        return jnp.sum(p["w"] ** 2)

    params = {"w": jnp.full((3,), 3.0)}
    with pytest.raises(ValueError, match=r"lost in float32 at w\[0\]"):
        jgradcheck.check_grad(cost, lambda p: {"w": 5 * p["w"]}, params, x64=False, eps=1e-7)


def test_casts_through_the_delta_engine_match_full_reevaluation():
    def cost(p):
        w = p["w"]
        return (
            jnp.sum(w.astype(jnp.int32)).astype(w.dtype)
            + jnp.sum(jax.lax.reduce_precision(w, 8, 2) ** 2)
            + jnp.sum(jnp.broadcast_to(w, (2, 3)).astype(jnp.bfloat16).astype(w.dtype))
            + jnp.sum(w**2)
        )

    params = {"w": jnp.array([1.0 - 2.0**-18, 0.3, 2.5])}
    fast = jgradcheck.numerical_grad(cost, params, strategy="delta")
    ref = jgradcheck.numerical_grad(cost, params, strategy="vmap")
    np.testing.assert_allclose(fast["w"], ref["w"], rtol=1e-9, atol=1e-9)


def test_bfloat16_parameters_and_gradients():
    params = {"w": jnp.linspace(-1, 1, 5).astype(jnp.bfloat16)}

    def cost(p):
        return jnp.sum(jnp.sin(p["w"].astype(jnp.float32)))

    def grad(p):
        return {"w": jnp.cos(p["w"].astype(jnp.float32)).astype(p["w"].dtype)}

    # Promoted, the bfloat16 parameter becomes float64 and J (cast to float32 inside) resolves it;
    # without promotion the steps are bfloat16 and no step resolves 1%: inconclusive, with its reason.
    promoted = jgradcheck.check_grad(cost, grad, params)
    assert promoted.status == "passed", str(promoted)
    assert "promoted from bfloat16" in promoted.precision
    report = jgradcheck.check_grad(cost, grad, params, x64=False)
    assert report.status == "inconclusive", str(report)
    assert report.leaf("w").status == "inconclusive" and "x64=True" in report.leaf("w").note
    assert "bfloat16" in report.precision
    bad = jgradcheck.check_grad(cost, lambda p: {"w": 2 * grad(p)["w"]}, params)
    assert bad.status == "failed"


def test_cost_closing_over_a_typed_key():
    key = jax.random.key(0)

    def cost(p):
        return jnp.sum(p["w"] * jax.random.normal(key, (5,)))

    assert jgradcheck.check_grad(cost, jax.grad(cost), {"w": jnp.ones(5)}).passed


@pytest.mark.parametrize(
    ("option", "match"),
    [
        ({"sample_size": 0}, "sample_size must be a positive integer"),
        ({"screen_directions": 0}, "screen_directions must be a positive integer"),
        ({"chunk_size": 0}, "chunk_size must be a positive integer"),
        ({"top_k": 1.5}, "top_k must be a positive integer"),
        ({"devices": []}, "devices is empty"),
        ({"safety": -1.0}, "safety must be a positive number"),
        ({"atol": -1e-3}, "atol must be a non-negative number"),
        ({"eps": True}, "eps must be a positive finite number"),
        ({"eps": np.float32(0)}, "eps must be a positive finite number"),
    ],
)
def test_bad_options_are_rejected(option, match):
    def cost(p):
        return jnp.sum(p["w"] ** 2)

    with pytest.raises(ValueError, match=match):
        jgradcheck.check_grad(cost, lambda p: {"w": 2 * p["w"]}, {"w": jnp.ones(3)}, **option)


def test_screen_mode_headline_uses_the_screened_directions():
    def cost(p):
        return jnp.sum(jnp.sin(p["a"])) + jnp.sum(p["b"] ** 3)

    params = {"a": jnp.linspace(0, 1, 50), "b": jnp.linspace(-1, 1, 40)}

    def bad(p):
        g = jax.grad(cost)(p)
        return {**g, "b": 1.5 * g["b"]}

    good = jgradcheck.check_grad(cost, jax.grad(cost), params, mode="screen")
    assert good.passed and all(leaf.how == "screened" for leaf in good.leaves)
    assert 0 < good.difference < 1e-6
    wrong = jgradcheck.check_grad(cost, bad, params, mode="screen")
    assert wrong.status == "failed", str(wrong)
    assert [leaf.path for leaf in wrong.failed_leaves] == ["b"]


def test_screening_again_reuses_the_compiled_programs():
    def cost(p):
        return jnp.sum(jnp.tanh(p["a"])) + jnp.sum(p["b"] ** 2)

    grad = jax.grad(cost)
    params = {"a": jnp.linspace(0, 1, 30), "b": jnp.linspace(-1, 1, 20)}
    jgradcheck.check_grad(cost, grad, params, mode="screen")
    sizes = engine._group_line_block._cache_size(), engine._group_delta_block._cache_size()
    params2 = jax.tree.map(lambda x: 0.5 * x, params)
    jgradcheck.check_grad(cost, grad, params2, mode="screen")
    jgradcheck.check_grad(cost, grad, params2, mode="full")
    jgradcheck.check_grad(cost, grad, params, mode="full")
    assert engine._group_line_block._cache_size() == sizes[0]
    assert engine._group_delta_block._cache_size() <= sizes[1] + 1  # the full mode's one program


def test_nan_cost_with_several_programs_raises_the_probe_error():
    # A big leaf gets its own program; the probe rides in the small leaves' program, and the
    # error a user sees must be the probe's, not a waiting thread's.
    params = {"big": jnp.ones((80, 80)), "small": jnp.ones(3)}

    def cost(p):
        return jnp.sum(p["big"]) + jnp.log(p["small"][0] - 1.0)  # log(0) at θ

    with pytest.raises(ValueError, match="NaN/Inf|-inf"):
        jgradcheck.check_grad(cost, jax.grad(cost), params)


def test_your_gradient_runs_in_its_own_thread_under_the_check_precision():
    # Yours is computed while the check compiles its programs: in another thread, where JAX's
    # thread-local x64 context must still hold.
    seen = []

    def grad(p):
        seen.append(p["w"].dtype)
        return {"w": 2 * p["w"]}

    params = {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32)}
    assert jgradcheck.check_grad(lambda p: jnp.sum(p["w"] ** 2), grad, params).passed
    assert seen and all(d == jnp.float64 for d in seen)


def test_an_error_in_your_gradient_stops_a_running_check_and_is_raised():
    params = {"w": jnp.ones((300, 200)), "b": jnp.ones(7)}  # two programs, threads

    def cost(p):
        return jnp.sum(jnp.tanh(p["w"]) ** 2) + jnp.sum(p["b"] ** 3)

    def grad(p):
        raise RuntimeError("my gradient is broken")

    with pytest.raises(RuntimeError, match="my gradient is broken"):
        jgradcheck.check_grad(cost, grad, params)
    with pytest.raises(RuntimeError, match="my gradient is broken"):
        jgradcheck.check_grad(cost, grad, {"w": jnp.ones(5), "b": jnp.ones(2)})  # one program


def test_a_mesh_set_by_the_caller_reaches_your_gradient_and_the_check():
    # jax.set_mesh is thread-local: the check keeps the work in your thread under it.
    from jax.sharding import PartitionSpec

    mesh = jax.make_mesh((1,), ("x",), axis_types=(jax.sharding.AxisType.Auto,))

    def cost(p, x):
        h = jax.lax.with_sharding_constraint(x @ p["w"], PartitionSpec("x"))
        return jnp.sum(jnp.tanh(h)) + jnp.sum(p["b"] ** 2) + jnp.sum(p["big"] ** 2)

    params = {"w": jnp.ones((3, 2)) * 0.3, "b": jnp.ones(2), "big": jnp.ones((80, 80)) * 0.01}
    with jax.set_mesh(mesh):
        assert jgradcheck.check_grad(cost, jax.grad(cost), params, jnp.ones((4, 3))).passed
