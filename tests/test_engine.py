"""The delta interpreter must give the same finite differences as re-evaluating the whole cost.

Each cost below exercises a different kind of primitive: products with the perturbed leaf on
either side, batch dimensions, transposes, gathers (embedding lookups), control flow (scan,
cond, while), custom rules, integer and boolean intermediates, softmax, convolutions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck


def _mlp_rhs(p, x):  # flax-style x @ kernel: the perturbed leaf is the right operand
    h = jnp.tanh(x @ p["k1"] + p["b1"])
    return jnp.mean((h @ p["k2"]) ** 2) + 0.1 * jnp.sum(p["k1"] ** 2)


def _attention(p, x):  # batch dims in dot_general, transposes, softmax (stop_gradient inside)
    q, k, v = x @ p["wq"], x @ p["wk"], x @ p["wv"]
    s = jnp.einsum("bqd,bkd->bqk", q, k) / 2.0
    a = jax.nn.softmax(s, axis=-1)
    return jnp.sum(jnp.einsum("bqk,bkd->bqd", a, v) ** 2)


def _embedding(p, tokens):  # gather with an integer argument
    e = p["table"][tokens]
    return jnp.sum(jnp.sin(e) * p["w"])


def _scan_rnn(p, xs):  # lax.scan
    def step(h, x):
        h = jnp.tanh(p["wh"] @ h + p["wx"] @ x)
        return h, jnp.sum(h)

    _, ys = jax.lax.scan(step, jnp.zeros(3), xs)
    return jnp.sum(ys**2)


def _control(p, x):  # cond, while_loop, integer and boolean intermediates, where/argmax
    s = jnp.sum(p["w"] * x)
    y = jax.lax.cond(s > 0, lambda t: t**2, lambda t: -t, s)
    i = jnp.argmax(p["w"])
    z = jax.lax.fori_loop(0, 3, lambda k, c: c * 0.5 + jnp.cos(c), p["w"])
    return y + p["w"][i] + jnp.sum(jnp.where(p["w"] > 0.1, z, z**2))


@jax.custom_vjp
def _scaled(x):
    return 2.0 * x


_scaled.defvjp(lambda x: (2.0 * x, None), lambda _, g: (2.0 * g,))


def _custom(p, x):  # custom_vjp and custom_jvp (relu) inlined
    return jnp.sum(jax.nn.relu(_scaled(p["w"]) @ x - 0.1)) + jnp.sum(jax.nn.gelu(p["w"]))


def _conv(p, x):  # convolution: no one-hot rule, falls back to the generic rule
    y = jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME")
    return jnp.mean(jnp.tanh(y))


def _cases():
    r = np.random.default_rng(0)

    def a(*shape):
        return jnp.asarray(r.standard_normal(shape) * 0.5, jnp.float32)

    return {
        "mlp_rhs": (_mlp_rhs, {"k1": a(4, 5), "b1": a(5), "k2": a(5, 2)}, (a(6, 4),)),
        "attention": (_attention, {"wq": a(4, 3), "wk": a(4, 3), "wv": a(4, 3)}, (a(2, 5, 4),)),
        "embedding": (_embedding, {"table": a(7, 3), "w": a(3)}, (jnp.array([1, 4, 4, 6, 0]),)),
        "scan_rnn": (_scan_rnn, {"wh": a(3, 3), "wx": a(3, 2)}, (a(4, 2),)),
        "control": (_control, {"w": a(5)}, (a(5),)),
        "custom": (_custom, {"w": a(3, 4)}, (a(4, 2),)),
        "conv": (_conv, {"k": a(2, 1, 3, 3)}, (a(1, 1, 5, 5),)),
    }


CASES = _cases()


@pytest.fixture
def interpreter_only(monkeypatch):
    """Every group through the delta interpreter (no switch to re-evaluation for dense ones)."""
    from jgradcheck._src import engine

    monkeypatch.setattr(engine, "INTERPRET_ALWAYS", True)


@pytest.mark.parametrize("name", sorted(CASES))
def test_delta_matches_full_reevaluation(name, interpreter_only):
    cost, params, args = CASES[name]
    fast = jgradcheck.numerical_grad(cost, params, *args, strategy="delta")
    ref = jgradcheck.numerical_grad(cost, params, *args, strategy="vmap")
    with jax.enable_x64(True):
        exact = jax.grad(cost)(
            jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params),
            *[jnp.asarray(x, jnp.float64) if jnp.issubdtype(x.dtype, jnp.floating) else x for x in args],
        )
    for key in params:
        scale = float(np.max(np.abs(ref[key]))) + 1e-30
        # The two strategies round differently, so they agree to the noise of J over h.
        np.testing.assert_allclose(fast[key], ref[key], atol=1e-8 * max(1.0, scale), rtol=0)
        np.testing.assert_allclose(fast[key], np.asarray(exact[key]), atol=1e-6 * max(1.0, scale), rtol=1e-6)


# Ulps of J by which the delta interpreter's J(θ ± h eᵢ) may differ from whole re-evaluation's
# in float32: J(θ) + ΔJ against J(θ + h eᵢ), the same terms summed in another order. Measured
# (2026-12-02, eps=_H32 = 2⁻⁸, defined below): at most 1.5 ulps of 2|J(θ)| on these costs (a convolution).
_ULPS_DELTA = 8


@pytest.mark.parametrize("name", sorted(CASES))
def test_delta_matches_full_reevaluation_in_float32(name, interpreter_only):
    cost, params, args = CASES[name]
    fast = jgradcheck.numerical_grad(cost, params, *args, strategy="delta", x64=False, eps=_H32, float64=True)
    ref = jgradcheck.numerical_grad(cost, params, *args, strategy="vmap", x64=False, eps=_H32, float64=True)
    with jax.enable_x64(False):
        j0 = abs(float(jax.jit(cost)(params, *args)))
    # The same points (θ ± h rounded to float32; |J| there is below 2|J(θ)| on these costs): the
    # central differences differ by the round-off of J at each point over the step 2h.
    tol = _ULPS_DELTA * 2 * float(np.spacing(np.float32(2 * j0))) / (2 * _H32)
    top = max(float(np.max(np.abs(ref[key]))) for key in params)
    assert tol < 2e-3 * top  # round-off: far below a 2% error of the largest derivative
    for key in params:
        np.testing.assert_allclose(fast[key], ref[key], rtol=0, atol=tol, err_msg=key)


def test_delta_check_catches_a_planted_bug_on_the_right_operand():
    cost, params, args = CASES["mlp_rhs"]
    good = jax.grad(cost)

    def bad(p, x):
        g = good(p, x)
        return {**g, "k1": g["k1"].at[2, 3].add(0.05)}

    assert jgradcheck.check_grad(cost, good, params, *args).passed
    report = jgradcheck.check_grad(cost, bad, params, *args)
    assert not report.passed
    assert report.worst[0].name == "k1[2, 3]"


def test_unknown_strategy_is_rejected():
    cost, params, args = CASES["control"]
    with pytest.raises(ValueError, match="strategy must be"):
        jgradcheck.check_grad(cost, jax.grad(cost), params, *args, strategy="fast")


# Effects and host callbacks (see the docstring of jgradcheck/_src/delta.py): output-less ones
# are dropped from the 2n perturbed evaluations, the others are called once per perturbation.

CALLS = []


def _printing(p, x):
    jax.debug.print("w0 = {a}", a=p["w"][0])
    jax.debug.print("w0 = {a}", a=p["w"][0], ordered=True)
    jax.debug.callback(lambda a: CALLS.append(1), p["w"])

    def step(c, xi):
        jax.debug.print("c = {c}", c=c)
        return c * 0.9 + jnp.sin(xi * p["w"][1]), None

    c, _ = jax.lax.scan(step, p["w"][0], x)
    return jnp.sum(jnp.tanh(p["w"] * x)) + c


def _pure_cb(p, x):  # a host function written for float32, declared with its input's dtype
    y = jax.pure_callback(lambda a: np.sin(a).astype(np.float32), jax.ShapeDtypeStruct(x.shape, x.dtype), x)
    z = jax.pure_callback(lambda a: np.cos(a), jax.ShapeDtypeStruct(p["w"].shape, p["w"].dtype), p["w"])
    return jnp.sum(jnp.tanh(p["w"] * x) * y) + jnp.sum(z * x)


def _io_cb(ordered):
    def cost(p, x):
        from jax.experimental import io_callback

        z = io_callback(lambda a: np.cos(a), jax.ShapeDtypeStruct(p["w"].shape, p["w"].dtype), p["w"], ordered=ordered)
        io_callback(lambda a: CALLS.append(1), None, p["w"], ordered=ordered)
        return jnp.sum(jnp.tanh(p["w"] * x)) + jnp.sum(z * x)

    return cost


EFFECTS = {"printing": _printing, "pure_callback": _pure_cb, "io_ordered": _io_cb(True), "io_unordered": _io_cb(False)}


def _twin(cost):
    """A JAX-only copy of the cost: callbacks replaced by their JAX twins, prints dropped."""

    def twin(p, x):
        out = jnp.sum(jnp.tanh(p["w"] * x))
        if cost is _printing:

            def step(c, xi):
                return c * 0.9 + jnp.sin(xi * p["w"][1]), None

            return out + jax.lax.scan(step, p["w"][0], x)[0]
        if cost is _pure_cb:
            return jnp.sum(jnp.tanh(p["w"] * x) * jnp.sin(x)) + jnp.sum(jnp.cos(p["w"]) * x)
        return out + jnp.sum(jnp.cos(p["w"]) * x)

    return twin


def _reference(cost, p, x):
    """The derivative, from the cost's JAX-only twin in float64."""
    with jax.enable_x64(True):
        w, x = jnp.asarray(p["w"], jnp.float64), jnp.asarray(x, jnp.float64)
        return np.asarray(jax.grad(_twin(cost))({"w": w}, x)["w"])


# The step of the float32 comparisons (``eps=``): a power of two near the default ∛ε·max(1, |θ|).
_H32 = 2.0**-8
# How many ulps of J each evaluation of a strategy may differ from the twin's at the same point:
# the same float32 operations, summed in another order (or an XLA sin against NumPy's).
_ULPS = 4


def _float32_differences(cost, p, x):
    """What a strategy must give for ``eps=_H32`` in float32 (x64=False), and the round-off it
    may differ by, per entry: the twin's (J(θ + h eᵢ) − J(θ − h eᵢ)) / (2h) at the points the
    check takes (θ ± h rounded to float32), each J in float32; a difference in J of ``_ULPS``
    ulps of J at each point moves it by ``_ULPS`` (ulp(J₊) + ulp(J₋)) / 2h. Truncation is the
    same for both (the same points), so this bound is round-off only."""
    twin = jax.jit(_twin(cost))
    with jax.enable_x64(False):
        theta = np.asarray(p["w"], np.float64)
        fd, tol = np.zeros(theta.size), np.zeros(theta.size)
        for i in range(theta.size):
            ends = []
            for o in (1, -1):
                w = np.asarray(p["w"], np.float32).copy()
                w[i] = np.float32(theta[i] + o * _H32)
                ends.append((np.float64(w[i]), np.float32(twin({"w": jnp.asarray(w)}, jnp.asarray(x, jnp.float32)))))
            (w_plus, j_plus), (w_minus, j_minus) = ends
            step = w_plus - w_minus
            fd[i] = (np.float64(j_plus) - np.float64(j_minus)) / step
            tol[i] = _ULPS * (np.spacing(abs(j_plus)) + np.spacing(abs(j_minus))) / step
    return fd, tol


def _assert_matches(got, cost, p, x, x64):
    if x64:  # float64: against the derivative itself (its error is ~1e-10 here)
        np.testing.assert_allclose(got, _reference(cost, p, x), atol=1e-7, rtol=1e-7)
        return
    fd, tol = _float32_differences(cost, p, x)
    err = np.abs(np.asarray(got, np.float64) - fd)
    assert np.all(err <= tol), (err / tol, got, fd)
    # The bound is round-off: a fraction of a percent of the derivative, never 2% of it.
    assert np.all(tol < 0.02 * np.max(np.abs(fd))), (tol, fd)


@pytest.mark.parametrize("strategy", ["delta", "vmap"])
@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("name", sorted(EFFECTS))
def test_effects_and_callbacks(name, x64, strategy, interpreter_only):
    cost = EFFECTS[name]
    p = {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32)}
    x = jnp.linspace(0.5, 1.5, 5, dtype=jnp.float32)
    CALLS.clear()
    got = jgradcheck.numerical_grad(cost, p, x, strategy=strategy, x64=x64, eps=None if x64 else _H32)["w"]
    assert not CALLS  # output-less callbacks never run in the perturbed evaluations
    _assert_matches(got, cost, p, x, x64)


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("name", sorted(EFFECTS))
def test_effects_and_callbacks_in_the_compiled_loop(name, x64, monkeypatch):
    from jgradcheck._src import engine

    ran = []
    loop = engine.Engine._loop
    monkeypatch.setattr(engine.Engine, "_loop", lambda self, *a: ran.append(1) or loop(self, *a))
    cost = EFFECTS[name]
    p = {"w": jnp.linspace(-1.0, 1.0, 5, dtype=jnp.float32)}
    x = jnp.linspace(0.5, 1.5, 5, dtype=jnp.float32)
    CALLS.clear()
    got = jgradcheck.numerical_grad(cost, p, x, x64=x64, eps=None if x64 else _H32)["w"]  # tiny: J per perturbation
    assert ran and not CALLS
    _assert_matches(got, cost, p, x, x64)


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("name", sorted(CASES))
def test_the_compiled_loop_matches_whole_cost_reevaluation(name, x64):
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.problem import precision_scope, prepare
    from jgradcheck._src.progress import Progress

    cost, params, args = CASES[name]
    with precision_scope(x64):
        problem = prepare(cost, params, args, x64, check_determinism=False)
        group = tuple(range(len(problem.floats)))
        base = np.concatenate([np.asarray(problem.floats[g]).ravel() for g in group])
        idx = np.random.default_rng(0).permutation(base.size)  # every entry, out of order
        got = {}
        for strategy in ("delta", "vmap"):
            engine = make_engine(problem, None, None, strategy)
            got[strategy] = engine.costs(group, idx, base[idx] + 0.37, Progress(idx.size, False))
            got[strategy + " ran"] = sorted(set(engine.ran.values()))
    assert got["delta ran"] == ["loop"] and got["vmap ran"] == ["vmap"]
    eps = np.finfo(np.float64 if x64 else np.float32).eps
    scale = max(1.0, float(np.max(np.abs(got["vmap"]))))
    np.testing.assert_allclose(got["delta"], got["vmap"], rtol=0, atol=32 * eps * scale)


def test_check_grad_with_callbacks_finds_a_planted_bug():
    p = {"w": jnp.linspace(-1.0, 1.0, 5)}
    x = jnp.linspace(0.5, 1.5, 5)
    good = {"w": jnp.asarray(_reference(_io_cb(True), p, x))}
    assert jgradcheck.check_grad(_io_cb(True), good, p, x).passed
    bad = {"w": good["w"].at[3].add(0.01)}
    report = jgradcheck.check_grad(_io_cb(True), bad, p, x)
    assert not report.passed and report.worst[0].name == "w[3]"


def test_same_cost_as_a_new_closure_does_not_compile_again():
    from jgradcheck._src import engine

    x = jnp.linspace(-1.0, 1.0, 6)
    data = jnp.arange(6.0)  # a closed-over array: a constant of the jaxpr, passed at run time

    def make(d):
        return lambda p, x: jnp.sum(jnp.sin(p["w"] * x) * d) + jnp.sum(p["b"] ** 2)

    p = {"w": jnp.linspace(0.1, 0.6, 6), "b": jnp.ones(3)}

    def grad_of(d):
        return lambda p, x: {"w": jnp.cos(p["w"] * x) * x * d, "b": 2 * p["b"]}

    programs = (  # lean and fused (XLA's defaults: costs with loops, a jaxlib without the lean option)
        engine._group_delta_block,
        engine._group_delta_block_quick,
        engine._group_block,
        engine._group_block_quick,
        engine._group_delta_block_fused,
        engine._group_delta_block_quick_fused,
        engine._group_block_fused,
        engine._group_block_quick_fused,
        engine._group_line_block,
        engine._one_cost,
        engine._one_cost_fused,
    )
    start = [f._cache_size() for f in programs]
    assert jgradcheck.check_grad(make(data), grad_of(data), p, x).passed
    before = [f._cache_size() for f in programs]
    assert before != start  # the first check compiled something
    assert jgradcheck.check_grad(make(data + 1.0), grad_of(data + 1.0), p, x).passed
    assert [f._cache_size() for f in programs] == before


# Rules that keep the change small, each against re-evaluating the whole cost: the perturbed
# costs J(θ + v e_i) of both strategies must agree to the rounding of J itself.

_NHWC = ("NHWC", "HWIO", "NHWC")


def _cnn(p, x):  # one-hot kernel entries, a slab (one channel) into the second conv, pooling
    h = jax.nn.relu(jax.lax.conv_general_dilated(x, p["k1"], (1, 1), "SAME", dimension_numbers=_NHWC) + p["b1"])
    h = jnp.tanh(jax.lax.conv_general_dilated(h, p["k2"], (2, 1), "VALID", dimension_numbers=_NHWC) + p["b2"])
    b, hh, ww, c = h.shape
    h = h.reshape(b, hh // 2, 2, ww // 2, 2, c).mean(axis=(2, 4))
    return jnp.sum(h.reshape(b, -1) @ p["w"])


def _conv_nchw_input(p, k):  # the image is the parameter: a one-hot input entry
    y = jax.lax.conv_general_dilated(p["img"], k, (1, 1), ((1, 0), (0, 2)), rhs_dilation=(1, 2))
    return jnp.sum(jnp.sin(y))


def _conv_layouts(p, x, x1):  # the kernel entry as a shifted input channel, in every layout
    y = jax.lax.conv_general_dilated(x, p["k"], (2, 1), ((1, 0), (0, 2)), rhs_dilation=(1, 2))  # NCHW, OIHW
    z = jax.lax.conv_general_dilated(x1, p["k1d"], (3,), ((2, 1),), dimension_numbers=("NWC", "WIO", "NWC"))
    u = jax.lax.conv_general_dilated(  # transposed layouts, strides in both axes, negative padding
        jnp.transpose(x, (1, 2, 0, 3)), p["ku"], (2, 2), ((0, -1), (1, 1)), dimension_numbers=("CHNW", "HWOI", "WNHC")
    )
    t = jax.lax.conv_general_dilated(x, p["kt"], (1, 1), ((1, 1), (0, 1)), lhs_dilation=(2, 1))  # transposed
    # y's change is one channel: into a second convolution, in other layouts
    y2 = jax.lax.conv_general_dilated(
        jnp.tanh(y), p["k2"], (1, 2), ((2, 0), (1, 1)), rhs_dilation=(2, 1), dimension_numbers=("NCHW", "HWIO", "NHWC")
    )
    t2 = jax.lax.conv_general_dilated(jnp.sin(t), p["k2"][:, :, :2], (1, 1), ((0, 1), (1, 0)), lhs_dilation=(1, 2))
    out = jnp.sum(jnp.sin(y)) + jnp.sum(z**2) + jnp.sum(jnp.tanh(u) * 0.5) + jnp.sum(jnp.cos(t))
    return out + jnp.sum(jnp.tanh(y2)) + jnp.sum(t2**2)


def _conv_edges(p, x, long):  # an empty output with strides; a kernel too long to unroll by position
    e = jax.lax.conv_general_dilated(x[:, :4], p["k"], (2,), "VALID", dimension_numbers=_NWC)  # width 0
    h = jnp.tanh(jax.lax.conv_general_dilated(x, p["k"], (1,), "SAME", dimension_numbers=_NWC))  # a channel
    # (a data kernel: as a parameter, the float64 reference under vmap is a grouped convolution
    # that XLA:CPU runs for minutes)
    y = jax.lax.conv_general_dilated(h, long, (2,), "SAME", dimension_numbers=_NWC)  # 70 taps
    return jnp.sum(e) + jnp.sum(y**2) + jnp.sum(p["k"] ** 2)


_NWC = ("NWC", "WIO", "NWC")


def _gru(p, xs):  # scan whose body multiplies by the loop's weights (constants of the body)
    def step(h, x):
        z = jax.nn.sigmoid(x @ p["wz"] + h @ p["uz"] + p["bz"])
        c = jnp.tanh(x @ p["wh"] + (z * h) @ p["uh"])
        h = (1 - z) * h + z * c
        return h, jnp.sum(h**2)

    h, ys = jax.lax.scan(step, jnp.zeros((xs.shape[1], p["uz"].shape[0]), xs.dtype) + p["h0"], xs)
    return jnp.sum(h) + jnp.mean(ys)


def _gelu_mlp(p, x):  # two changes in the same column meet: x and x³ in GELU, h·σ(h) in swish
    h = jax.nn.gelu(x @ p["w1"] + p["b1"])
    g = x @ p["w3"]
    g = g * jax.nn.sigmoid(g) + jax.nn.gelu(g, approximate=False)
    return jnp.sum(jnp.tanh(h @ p["w2"])) + jnp.sum(g**2)


def _flatten_dense(p, x):  # NHWC features flattened before dense layers, either side, w or wᵀ
    h = jnp.tanh(jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=_NHWC))
    f = h.reshape(h.shape[0], -1)  # the channel axis is the minor end of the flattened axis
    a = f @ p["w"]  # (B, M·C) @ (M·C, K)
    b = jax.lax.dot_general(p["v"], f, (((1,), (1,)), ((), ())))  # (J, M·C) · (B, M·C): on the right
    c = jnp.sin(f) @ p["w"]  # an elementwise step first: the change is made dense
    return jnp.sum(jnp.tanh(a)) + jnp.sum(b**2) + jnp.sum(c) + jnp.sum(f @ p["u"].T)


def _rules_cases():
    r = np.random.default_rng(1)

    def a(*shape, s=0.5):
        return jnp.asarray(r.standard_normal(shape) * s, jnp.float32)

    return {
        "cnn": (
            _cnn,
            {"k1": a(3, 3, 2, 4), "b1": a(4), "k2": a(3, 2, 4, 3), "b2": a(3), "w": a(18, 2)},
            (a(2, 9, 7, 2),),
        ),
        "flatten_dense": (
            _flatten_dense,
            {"k": a(3, 3, 2, 3), "w": a(36, 2), "v": a(4, 36), "u": a(5, 36)},
            (a(2, 3, 4, 2),),
        ),
        "gelu_mlp": (_gelu_mlp, {"w1": a(4, 6), "b1": a(6), "w2": a(6, 3), "w3": a(4, 5)}, (a(2, 7, 4),)),
        "conv_layouts": (
            _conv_layouts,
            {"k": a(3, 2, 2, 3), "k1d": a(4, 2, 3), "ku": a(2, 3, 3, 2), "kt": a(2, 2, 3, 2), "k2": a(2, 2, 3, 2)},
            (a(2, 2, 7, 6), a(2, 11, 2)),
        ),
        "conv_edges": (_conv_edges, {"k": a(5, 2, 2)}, (a(2, 80, 2), a(70, 2, 3, s=0.1))),
        "conv_input": (_conv_nchw_input, {"img": a(2, 3, 5, 4)}, (a(4, 3, 2, 2),)),
        "gru": (
            _gru,
            {"wz": a(3, 4), "uz": a(4, 4), "bz": a(4), "wh": a(3, 4), "uh": a(4, 4), "h0": a(4)},
            (a(5, 2, 3),),
        ),
    }


RULES = _rules_cases()


def _perturbed_costs(cost, params, args, strategy, x64):
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.problem import precision_scope, prepare
    from jgradcheck._src.progress import Progress

    with precision_scope(x64):
        problem = prepare(cost, params, args, x64, check_determinism=False)
        engine = make_engine(problem, None, None, strategy)
        leaves = range(len(problem.floats))
        # The delta rules on each leaf alone (in a group every leaf carries a change, and most
        # rules need a single one); the reference re-evaluates all leaves in one program.
        groups = [(i,) for i in leaves] if strategy == "delta" else [tuple(leaves)]
        out = []
        for group in groups:
            base = np.concatenate([np.asarray(problem.floats[g]).ravel() for g in group])
            idx = np.arange(base.size)
            out.append(
                np.stack([engine.costs(group, idx, base + v, Progress(idx.size, False)) for v in (0.37, -0.21)], axis=1)
            )
        return np.concatenate(out)


@pytest.mark.parametrize("x64", [True, False])
@pytest.mark.parametrize("name", sorted(RULES))
def test_rules_match_whole_cost_reevaluation(name, x64, interpreter_only):
    cost, params, args = RULES[name]
    fast = _perturbed_costs(cost, params, args, "delta", x64)
    ref = _perturbed_costs(cost, params, args, "vmap", x64)
    eps = np.finfo(np.float64 if x64 else np.float32).eps
    # J(θ) + ΔJ against J(θ + v e_i): the same sums in another order, a few ulps of the terms.
    np.testing.assert_allclose(fast, ref, rtol=0, atol=32 * eps * max(1.0, float(np.max(np.abs(ref)))))


def test_a_column_change_stays_a_column_through_gelu_and_swish():
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.delta import dense_work
    from jgradcheck._src.problem import precision_scope, prepare

    cost, params, args = RULES["gelu_mlp"]
    with precision_scope(True):
        problem = prepare(cost, params, args, True, check_determinism=False)
        engine = make_engine(problem, None, None, "delta")
        for leaf in ("w1", "b1", "w3"):
            w, log = dense_work(problem.trace, engine.flat, (problem.paths.index(leaf),))
            names = [e.primitive.name for e, _ in log]
            assert "logistic" not in names and "erf" not in names and "tanh" not in names[:1], (leaf, names)
            assert w < 2 * 7 * 6 * 3, (leaf, w)  # never the whole (14, 6) @ (6, 3) product again


def test_a_channel_change_stays_strided_through_the_flatten_before_a_dense_layer():
    from jgradcheck._src import delta
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.delta import dense_work
    from jgradcheck._src.problem import precision_scope, prepare

    def cost(p, x):
        h = jnp.tanh(jax.lax.conv_general_dilated(x, p["k"], (1, 1), "SAME", dimension_numbers=_NHWC))
        return jnp.sum(jnp.tanh(h.reshape(h.shape[0], -1) @ p["w"]))

    params = {"k": jnp.ones((3, 3, 2, 8)) * 0.1, "w": jnp.ones((16 * 8, 4)) * 0.1}
    with precision_scope(True):
        problem = prepare(cost, params, (jnp.ones((2, 4, 4, 2)),), True, check_determinism=False)
        engine = make_engine(problem, None, None, "delta")
        used = []
        rule = delta._strided_rule

        def spy(*a):
            used.append(rule(*a))
            return used[-1]

        with pytest.MonkeyPatch.context() as m:
            m.setattr(delta, "_strided_rule", spy)
            dense_work(problem.trace, engine.flat, (problem.paths.index("k"),))
        # the (2, 128) @ (128, 4) product read at the 16 rows of w of one channel
        assert len(used) == 1 and used[0] is not None


def test_a_kernel_entry_is_a_shifted_channel_and_a_channel_change_reads_its_kernel_slice():
    from jgradcheck._src import delta_rules
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.delta import dense_work
    from jgradcheck._src.problem import precision_scope, prepare

    cost, params, args = RULES["cnn"]
    used: dict[str, int] = {}
    with precision_scope(True), pytest.MonkeyPatch.context() as m:
        for name in ("_shifted_channel", "_channel_conv"):
            rule = getattr(delta_rules, name)

            def spy(*a, _rule=rule, _name=name):
                used[_name] = used.get(_name, 0) + 1
                return _rule(*a)

            m.setattr(delta_rules, name, spy)
        problem = prepare(cost, params, args, True, check_determinism=False)
        engine = make_engine(problem, None, None, "delta")
        w, log = dense_work(problem.trace, engine.flat, (problem.paths.index("k1"),))
    # k1's entry: a shifted input channel; that channel into the second convolution: its slice
    assert used == {"_shifted_channel": 1, "_channel_conv": 1}, used
    from jgradcheck._src.delta import work

    convs = [(e, w) for e, w in log if e.primitive.name == "conv_general_dilated"]
    assert len(convs) == 1 and convs[0][1] * 4 == work(convs[0][0])  # one input channel of 4


def test_dense_groups_are_re_evaluated_and_sparse_ones_interpreted():
    from jgradcheck._src.check import make_engine as _engine
    from jgradcheck._src.problem import precision_scope as _scope
    from jgradcheck._src.problem import prepare as _prepare

    def cost(p, x):  # w0 scales everything: its change is dense throughout; w1's stays one entry
        return jnp.sum(jnp.sin(x * p["w0"]) ** 2) + jnp.sum(p["w1"] ** 2)

    p = {"w0": jnp.ones((1, 1)) * 0.1, "w1": jnp.ones((5,))}
    with _scope(True):
        problem = _prepare(cost, p, (jnp.ones((6, 30)),), True, check_determinism=False)
        engine = _engine(problem, None, None, "delta")
        with pytest.MonkeyPatch.context() as m:
            m.setattr("jgradcheck._src.engine.COMPILE_SECONDS", 0.0)  # not the small-check shortcuts
            m.setattr("jgradcheck._src.engine.LOOP_SECONDS", 0.0)
            assert engine.strategy_for((0,)) == "vmap"
            assert engine.strategy_for((1,)) == "delta"
        # tiny: J compiled alone and called per perturbation costs less than any batched program
        assert engine.strategy_for((1,)) == "loop"
        with pytest.MonkeyPatch.context() as m:
            m.setattr("jgradcheck._src.engine.LOOP_SECONDS", 0.0)
            assert engine.strategy_for((1,)) == "vmap"  # compiling the interpreter would cost more


def test_leaves_dense_through_j_share_the_whole_cost_program(monkeypatch):
    from jgradcheck._src import engine as eng
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.problem import precision_scope, prepare

    m = jnp.asarray(np.random.default_rng(0).standard_normal((30, 30)))

    def cost(p, x):  # a and s scale the input: dense through the product; b is added after it
        return jnp.sum(jnp.tanh(jnp.tanh(x * p["a"] * p["s"]) @ m + p["b"]))

    p = {"a": jnp.ones(30), "s": jnp.ones(30) * 0.5, "b": jnp.zeros((6, 30))}
    monkeypatch.setattr(eng, "COMPILE_SECONDS", 0.0)  # no sharing for compilation's sake alone
    monkeypatch.setattr(eng, "LOOP_SECONDS", 0.0)  # nor J called once per perturbation
    with precision_scope(True):
        problem = prepare(cost, p, (jnp.ones((6, 30)),), True, check_determinism=False)
        flat = jax.tree_util.tree_leaves(problem.inputs)
        plan = eng._plan_groups(problem.trace, flat, [0, 1, 2], 4096)
        names = sorted(tuple(problem.paths[i] for i in g) for g in plan)
        assert names == [("a", "s"), ("b",)]
        assert make_engine(problem, None, None, "delta").strategy_for((0, 2)) == "vmap"


@pytest.mark.parametrize(("seconds_per_eval", "chunks"), [(1e-4, [32, 32]), (1.0, [32, 8])], ids=["fast", "slow"])
def test_a_second_look_reuses_the_compiled_chunk_at_the_measured_speed(seconds_per_eval, chunks, monkeypatch):
    from jgradcheck._src import engine as eng
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.problem import precision_scope, prepare
    from jgradcheck._src.progress import Progress

    def cost(p, x):
        return jnp.sum(jnp.tanh(x @ p["w"]) ** 2)

    params = {"w": jnp.asarray(np.random.default_rng(3).standard_normal((20, 15)))}
    x = jnp.ones((4, 20))
    # The work model says one evaluation takes hours: only a measured speed can justify reuse.
    monkeypatch.setattr(eng, "WORK_RATE", 1e-3)
    monkeypatch.setattr(eng, "BLOCK_EVALS", 64)
    # The measurement is pinned, not taken: the engine's clock advances by one evaluation's
    # seconds times the evaluations timed (the 300 - 64 after the first block) at each reading,
    # and no earlier check's chunks or speeds are seen.
    clock = iter(np.arange(1000.0) * seconds_per_eval * (300 - 64))
    monkeypatch.setattr(eng, "_clock", lambda: next(clock))
    monkeypatch.setattr(eng, "_SPEED", {})
    monkeypatch.setattr(eng, "_CHUNKS", {})
    with precision_scope(True):
        problem = prepare(cost, params, (x,), True, check_determinism=False)
        engine = make_engine(problem, None, 32, "vmap")  # the work model: all of J per evaluation
        chosen = []
        chunk = engine._chunk
        monkeypatch.setattr(engine, "_chunk", lambda *a: chosen.append(chunk(*a)) or chosen[-1])
        base = np.asarray(params["w"]).ravel()
        engine.costs((0,), np.arange(300), base[:300] + 0.1, Progress(300, False))  # 5 blocks of 64
        assert list(eng._SPEED.values()) == [pytest.approx(seconds_per_eval)]
        engine.costs((0,), np.arange(5), base[:5] - 0.1, Progress(5, False))
    # Fast: padding 5 entries to 32 (27 evaluations) costs less than compiling a chunk of 8.
    # Slow: 27 s of padding against a compilation: a new program for a chunk of 8.
    assert chosen == chunks


@pytest.mark.parametrize("name", ["gru", "scan_rnn"])
def test_measuring_a_scan_without_tracing_its_body_gives_the_same_dense_work(name, monkeypatch):
    from jgradcheck._src import delta
    from jgradcheck._src.check import make_engine
    from jgradcheck._src.problem import precision_scope, prepare

    cost, params, args = RULES[name] if name in RULES else CASES[name]
    with precision_scope(True):
        problem = prepare(cost, params, args, True, check_determinism=False)
        engine = make_engine(problem, None, None, "delta")
        groups = [(i,) for i in range(len(problem.floats))] + [tuple(range(len(problem.floats)))]
        fast = [delta.dense_work(problem.trace, engine.flat, g) for g in groups]
        monkeypatch.setattr(delta, "MEASURE_SCAN_BODIES", True)
        full = [delta.dense_work(problem.trace, engine.flat, g) for g in groups]
    for (w_fast, log_fast), (w_full, log_full) in zip(fast, full):
        assert w_fast == w_full and [e for e, _ in log_fast] == [e for e, _ in log_full]
    assert any(e.primitive.name == "scan" for _, log in fast for e, _ in log)
