"""Every framework's pytrees, both ways: params and yours as NNX State or pure dict, linen variables or
their 'params' collection, equinox modules or dicts, NamedTuples or dicts; and the examples that show each."""

from __future__ import annotations

import importlib.util
import os

import jax
import jax.numpy as jnp
import pytest

import jgradcheck

nnx = pytest.importorskip("flax.nnx")
pytest.importorskip("equinox")
pytest.importorskip("optax")

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _example(name):
    spec = importlib.util.spec_from_file_location(f"example_{name}", os.path.join(EXAMPLES, f"{name}.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "wrong", "words"),
    [
        ("flax_nnx", "l2.kernel.value", "yours ≈ 16 × numerical"),
        ("flax_linen", "params.hidden.kernel", "L2 term"),
        ("equinox_mlp", "l1.bias", "sign flipped"),
    ],
)
def test_each_framework_example_passes_then_shows_its_planted_bug(name, wrong, words, capsys):
    good, bad = _example(name).main()
    assert good.passed, str(good)
    assert not bad.passed
    assert [leaf.path for leaf in bad.failed_leaves] == [wrong]
    assert words in bad.leaf(wrong).diagnosis
    assert "FAILED" in capsys.readouterr().out


def test_namedtuple_example_checks_after_training_too(capsys):
    at_init, after, bad = _example("optax_namedtuple").main()
    assert at_init.passed, str(at_init)
    assert after.passed, str(after)
    assert [leaf.path for leaf in bad.failed_leaves] == ["W1", "b1"]  # tanh' enters the first layer only


class MLP(nnx.Module):
    def __init__(self, rngs):
        self.l1 = nnx.Linear(3, 4, rngs=rngs)
        self.l2 = nnx.Linear(4, 1, rngs=rngs)

    def __call__(self, x):
        return self.l2(jnp.tanh(self.l1(x)))


@pytest.fixture(scope="module")
def nnx_model():
    graphdef, state = nnx.split(MLP(nnx.Rngs(0)))
    x = jax.random.normal(jax.random.key(1), (5, 3))
    return graphdef, state, x


def _nnx_cost(state, graphdef, x):
    return jnp.mean(nnx.merge(graphdef, state)(x) ** 2)


@pytest.mark.parametrize("x64", [True, False])
def test_nnx_state_params_with_yours_as_its_pure_dict(nnx_model, x64):
    graphdef, state, x = nnx_model
    exact = jax.grad(_nnx_cost)

    def pure(s, graphdef, x):
        return nnx.to_pure_dict(exact(s, graphdef, x))

    report = jgradcheck.check_grad(_nnx_cost, pure, state, graphdef, x, x64=x64)
    assert report.passed, str(report)
    assert [leaf.path for leaf in report.leaves] == [
        "l1.bias.value",
        "l1.kernel.value",
        "l2.bias.value",
        "l2.kernel.value",
    ]


def test_pure_dict_params_with_yours_as_an_nnx_state(nnx_model):
    graphdef, state, x = nnx_model

    def cost(pure, graphdef, x):
        s = nnx.State(state)
        nnx.replace_by_pure_dict(s, pure)
        return _nnx_cost(s, graphdef, x)

    yours = jax.grad(_nnx_cost)(state, graphdef, x)  # a State, given as a pytree
    report = jgradcheck.check_grad(cost, yours, nnx.to_pure_dict(state), graphdef, x)
    assert report.passed, str(report)
    assert report.leaf("l2.kernel") is not None


def test_nnx_yours_in_neither_form_says_which_forms_fit(nnx_model):
    graphdef, state, x = nnx_model

    def half(s, graphdef, x):
        return {"l1": nnx.to_pure_dict(jax.grad(_nnx_cost)(s, graphdef, x))["l1"]}

    with pytest.raises(ValueError, match=r"neither params' own form .*l1\.bias\.value.* nor its pure-dict form") as e:
        jgradcheck.check_grad(_nnx_cost, half, state, graphdef, x)
    assert "nnx.to_pure_dict(state)" in str(e.value) and "nnx.split" in str(e.value)
    assert "lacks l2.bias, l2.kernel" in str(e.value)


def _linen():
    from flax import linen as nn

    model = nn.Dense(2)
    x = jax.random.normal(jax.random.key(1), (4, 3))
    variables = model.init(jax.random.key(0), x)

    def cost(v, x):
        return jnp.sum(jnp.tanh(model.apply(v, x)))

    return model, variables, x, cost


def test_linen_variables_with_yours_as_the_params_collection_and_back():
    _, variables, x, cost = _linen()
    g = jax.grad(cost)(variables, x)
    assert jgradcheck.check_grad(cost, lambda v, x: jax.grad(cost)(v, x)["params"], variables, x).passed

    def inner_cost(p, x):
        return cost({"params": p}, x)

    assert jgradcheck.check_grad(inner_cost, g, variables["params"], x).passed  # yours has the wrapper, params not


def test_linen_yours_in_neither_form_names_the_collection():
    _, variables, x, cost = _linen()
    with pytest.raises(ValueError, match=r"'params'-collection form .*variables\['params'\]"):
        jgradcheck.check_grad(cost, {"params": {"bias": jnp.zeros(2)}}, variables, x)


def test_numerical_grad_of_an_nnx_state_is_a_state(nnx_model):
    graphdef, state, x = nnx_model
    g = jgradcheck.numerical_grad(_nnx_cost, state, graphdef, x)
    assert type(g) is type(state)
    exact = jax.grad(_nnx_cost)(state, graphdef, x)
    assert jnp.allclose(g["l1"]["kernel"][...], exact["l1"]["kernel"][...], atol=1e-5)


def test_plain_dict_mismatch_keeps_the_missing_leaves_message():
    with pytest.raises(ValueError, match="missing leaves that params has: b"):
        jgradcheck.check_grad(
            lambda p: jnp.sum(p["a"] ** 2 + p["b"]), {"a": jnp.ones(2)}, {"a": jnp.ones(2), "b": jnp.ones(2)}
        )


def test_check_hvp_of_an_nnx_state_with_yours_as_its_pure_dict(nnx_model):
    graphdef, state, x = nnx_model
    grad = jax.grad(_nnx_cost)

    def hvp(s, v):
        return nnx.to_pure_dict(jax.jvp(lambda t: grad(t, graphdef, x), (s,), (v,))[1])

    report = jgradcheck.check_hvp(lambda s: _nnx_cost(s, graphdef, x), hvp, state)
    assert report.passed, str(report)

    def doubled(s, v):
        hv = hvp(s, v)
        return {**hv, "l2": {**hv["l2"], "kernel": 2 * hv["l2"]["kernel"]}}

    report = jgradcheck.check_hvp(lambda s: _nnx_cost(s, graphdef, x), doubled, state)
    assert report.status == "failed", str(report)
