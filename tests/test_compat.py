"""The engine on the JAX its users have: params read through ``compat``, and params it cannot
read (a JAX release that lays them out anew) evaluated whole instead of crashing the check.

Each planted layout is one a future JAX could ship: a param renamed, a tuple turned into an
object. The check must still pass, and ``report.evaluated`` must say which equations were
evaluated whole. Shapes here are unique to this file, so no compiled program of another test
(traced with readable params) stands in for the planted one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import compat, delta, engine


def _gru(p, xs):  # a scan whose body multiplies by the loop's weights (constants of the body)
    def step(h, x):
        z = jax.nn.sigmoid(x @ p["wz"] + h @ p["uz"] + p["bz"])
        c = jnp.tanh(x @ p["wh"] + (z * h) @ p["uh"])
        h = (1 - z) * h + z * c
        return h, jnp.sum(h**2)

    h, ys = jax.lax.scan(step, jnp.zeros((xs.shape[1], p["uz"].shape[0]), xs.dtype) + p["h0"], xs)
    return jnp.sum(h) + jnp.mean(ys)


def _mlp(p, x):  # products inside a jitted call
    inner = jax.jit(lambda w, b, x: jnp.tanh(x @ w + b))
    return jnp.sum(inner(p["w"], p["b"], x) ** 2)


def _arrays(shapes, seed):
    r = np.random.default_rng(seed)
    return {k: jnp.asarray(r.standard_normal(s) * 0.5, jnp.float32) for k, s in shapes.items()}


def _gru_case(seed):
    p = _arrays({"wz": (3, 5), "uz": (5, 5), "bz": (5,), "wh": (3, 5), "uh": (5, 5), "h0": (5,)}, seed)
    xs = jnp.asarray(np.random.default_rng(seed + 1).standard_normal((6, 2, 3)), jnp.float32)
    return p, (xs,)


def _planted(prims, change):
    """``compat.params`` with ``change`` applied to the params of every equation of ``prims``."""
    real = compat.params

    def params(eqn):
        prm = real(eqn)
        return change(dict(prm)) if eqn.primitive.name in prims else prm

    return params


def _scan_layout_unknown(prm):
    for key in ("num_consts", "num_carry", "ft_in"):
        prm.pop(key, None)
    prm["in_layout"] = object()  # a name and a shape no release of JAX has had
    return prm


class _Dims:
    """Dimension numbers as an object, not the ((lc, rc), (lb, rb)) tuple JAX has used."""

    def __init__(self, dn):
        self.dn = dn


def _dims_unknown(prm):
    prm["dimension_numbers"] = _Dims(prm["dimension_numbers"])
    return prm


def _body_unknown(prm):
    prm["jaxpr"] = "a body this jgradcheck cannot open"
    return prm


@pytest.fixture
def interpret(monkeypatch):
    """Every group through the delta interpreter (no small-check shortcut to a plain loop)."""
    monkeypatch.setattr(engine, "INTERPRET_ALWAYS", True)


def test_scan_params_are_read_on_this_jax():
    p, (xs,) = _gru_case(0)
    closed = jax.make_jaxpr(_gru)(p, xs)
    (eqn,) = [e for e in closed.jaxpr.eqns if e.primitive.name == "scan"]
    scan = compat.scan_params(eqn)
    assert scan.num_carry == 1  # h
    assert len(eqn.invars) - scan.num_consts - scan.num_carry == 1  # xs
    assert len(scan.body.invars) == len(eqn.invars) and scan.length == 6 and scan.reverse is False
    assert delta.fallbacks(closed.jaxpr) == ()


def test_a_check_on_readable_params_names_no_fallback(interpret):
    p, args = _gru_case(10)
    report = jgradcheck.check_grad(_gru, jax.grad(_gru), p, *args)
    assert report.passed, report
    assert "changes only (delta)" in report.evaluated
    assert "evaluated whole" not in report.evaluated


@pytest.mark.parametrize("x64", [False, True], ids=["float32", "float64"])
def test_unknown_scan_params_fall_back_to_whole_evaluation_and_pass(interpret, monkeypatch, x64):
    p, args = _gru_case(20 + x64)
    monkeypatch.setattr(compat, "params", _planted({"scan"}, _scan_layout_unknown))
    report = jgradcheck.check_grad(_gru, jax.grad(_gru), p, *args, x64=x64)
    assert report.passed, report
    assert "changes only (delta)" in report.evaluated
    assert "evaluated whole, params unknown to jgradcheck on jax" in report.evaluated
    assert "scan ('num_consts' is missing)" in report.evaluated or "scan ('ft_in' is missing)" in report.evaluated


def test_a_planted_bug_is_still_found_where_the_scan_is_evaluated_whole(interpret, monkeypatch):
    p, args = _gru_case(30)
    monkeypatch.setattr(compat, "params", _planted({"scan"}, _scan_layout_unknown))

    def wrong(p, xs):
        g = jax.grad(_gru)(p, xs)
        return {**g, "uh": g["uh"].at[1, 2].multiply(1.5)}

    report = jgradcheck.check_grad(_gru, wrong, p, *args)
    assert not report.passed
    assert [leaf.path for leaf in report.failed_leaves] == ["uh"]


@pytest.mark.parametrize(
    ("prims", "change", "named"),
    [
        ({"dot_general"}, _dims_unknown, "dot_general ('dimension_numbers' is not ((lc, rc), (lb, rb))"),
        ({"jit", "pjit"}, _body_unknown, "('jaxpr' is a str)"),
    ],
    ids=["dot_dimension_numbers", "call_body"],
)
def test_unknown_params_of_products_and_calls_fall_back_and_pass(interpret, monkeypatch, prims, change, named):
    p = _arrays({"w": (7, 3), "b": (3,)}, 40 + len(named))
    x = jnp.asarray(np.random.default_rng(41).standard_normal((4, 7)), jnp.float32)
    monkeypatch.setattr(compat, "params", _planted(prims, change))
    report = jgradcheck.check_grad(_mlp, jax.grad(_mlp), p, x)
    assert report.passed, report
    assert named in report.evaluated


def test_fallback_gives_the_same_perturbed_costs_as_the_rules(monkeypatch):
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.problem import precision_scope, prepare
    from jgradcheck._src.progress import Progress

    p, args = _gru_case(50)

    def costs():
        with precision_scope(True):
            problem = prepare(_gru, p, args, True, check_determinism=False)
            eng = make_engine(problem, None, None, "delta")
            group = (problem.paths.index("uz"),)
            base = np.asarray(problem.floats[group[0]]).ravel()
            idx = np.arange(base.size)
            return delta.fallbacks(eng.program.jaxpr), eng.costs(group, idx, base + 0.3, Progress(idx.size, False))

    monkeypatch.setattr(engine, "INTERPRET_ALWAYS", True)
    read, by_rules = costs()
    assert read == ()
    jax.clear_caches()  # the same program text: trace it again with the planted params
    engine._PLANS.clear()
    monkeypatch.setattr(compat, "params", _planted({"scan"}, _scan_layout_unknown))
    fell_back, whole = costs()
    assert any(f.startswith("scan (") for f in fell_back), fell_back
    np.testing.assert_allclose(whole, by_rules, rtol=1e-12, atol=1e-12)


def test_unsupported_says_what_and_how_to_fix():
    closed = jax.make_jaxpr(lambda a, b: a @ b)(jnp.ones((2, 3)), jnp.ones((3, 4)))
    eqn = closed.jaxpr.eqns[0]
    with pytest.raises(compat.Unsupported, match=r"dot_general: param 'no_such' is missing .*upgrade jgradcheck"):
        compat.param(eqn, "no_such")
    assert compat.dot_dimension_numbers(eqn) == (((1,), (0,)), ((), ()))


def test_enable_x64_is_scoped():
    before = bool(jax.config.read("jax_enable_x64"))
    with compat.enable_x64(True):
        assert jnp.zeros(()).dtype == jnp.float64
    assert bool(jax.config.read("jax_enable_x64")) == before


def test_two_traces_of_one_cost_read_the_same_where_a_callback_is_a_new_function():
    # jax before 0.10.1 prints a callback's address in the jaxpr: the same cost traced twice
    # (a fresh lambda each time) must still read as one program, or the check calls it random.
    def cost(w):
        z = jax.pure_callback(lambda a: np.cos(a), jax.ShapeDtypeStruct(w.shape, w.dtype), w)
        return jnp.sum(z * w)

    # Both kept alive (two addresses), each traced anew (a new wrapper: no cached trace).
    keep = [jax.make_jaxpr(lambda w: cost(w))(jnp.ones(3)) for _ in range(2)]
    assert compat.jaxpr_text(keep[0]) == compat.jaxpr_text(keep[1])
    assert compat.jaxpr_text("<function f at 0x7f00aa>") == "<function f at 0xXXXXXX>"


def test_checks_run_where_xla_has_no_lean_compile_option(monkeypatch):
    """jaxlib 0.12's XLA:CPU rejects ``xla_cpu_use_fusion_emitters`` ("No such compile option");
    there every program compiles with XLA's defaults (probed once, ``compat.lean_compile_ok``)."""
    import jax
    import jax.numpy as jnp

    import jgradcheck
    from jgradcheck._src import compat, engine, problem, vector

    assert isinstance(compat.lean_compile_ok(), bool)
    monkeypatch.setattr(compat, "_LEAN_OK", [False])

    # As jaxlib 0.12 does: any program compiled with the lean option is refused.
    def refused(*args, **kwargs):
        raise RuntimeError("INVALID_ARGUMENT: No such compile option: 'xla_cpu_use_fusion_emitters'")

    for name in ("_group_block", "_group_delta_block", "_group_block_quick", "_group_delta_block_quick", "_one_cost"):
        monkeypatch.setattr(engine, name, refused)
    monkeypatch.setattr(problem, "_grad_jit_quick_lean", refused)
    monkeypatch.setattr(vector, "QUICK_LEAN_COMPILE", {"xla_no_such_option_in_this_test": False})
    w = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
    x = jnp.linspace(0.5, 1.5, 6).reshape(2, 3)

    def cost(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]) ** 2)

    assert jgradcheck.check_grad(cost, jax.grad(cost), {"w": w}, x).passed
    assert jgradcheck.check_rules(lambda v: jnp.sin(v) * v, jnp.linspace(0.1, 1.0, 5)).passed
