"""Entries J never reads (embedding rows no token selects) are not evaluated: their central
difference is exactly 0. The finding must be exact where it applies and conservative elsewhere."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jgradcheck
from jgradcheck._src import check, engine, problem

TOKENS = jnp.array([[1, 4, 4], [6, 0, 1]])  # rows 2, 3, 5, 7 of an 8-row table are never read


def _plain(p, tokens, x):
    return jnp.sum(jnp.tanh(p["E"][tokens] @ p["W"]) * x) + jnp.sum(p["W"] ** 2)


def _params(dtype):
    r = np.random.default_rng(0)
    return {
        "E": jnp.asarray(r.standard_normal((8, 4)), dtype),
        "W": jnp.asarray(r.standard_normal((4, 3)) * 0.5, dtype),
    }


X = jnp.asarray(np.random.default_rng(1).standard_normal((2, 3, 3)), jnp.float32)


def _unread(cost, params, *args):
    """Per leaf path: the engine's mask of entries J never reads (None: all may be read)."""
    with jax.enable_x64(True):
        prob = problem.prepare(cost, params, args, True, False)
        eng = check.make_engine(prob, None, None, "delta")
        return {path: eng.unread((i,)) for i, path in enumerate(prob.paths)}


def test_unread_rows_are_found():
    masks = _unread(_plain, _params(jnp.float32), TOKENS, X)
    assert masks["W"] is None
    rows = np.flatnonzero(masks["E"].reshape(8, 4).all(axis=1))
    assert rows.tolist() == [2, 3, 5, 7]
    assert not masks["E"].reshape(8, 4)[[0, 1, 4, 6]].any()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_skipping_gives_the_same_numbers_as_evaluating(dtype, monkeypatch):
    with jax.enable_x64(dtype == jnp.float64):
        params = _params(dtype)
        fast = jgradcheck.numerical_grad(_plain, params, TOKENS, X, float64=True)
        monkeypatch.setattr(engine, "SKIP_UNREAD", False)
        slow = jgradcheck.numerical_grad(_plain, params, TOKENS, X, float64=True)
    for key in params:
        np.testing.assert_array_equal(fast[key], slow[key])  # the same program, bit for bit
    assert np.all(fast["E"][[2, 3, 5, 7]] == 0.0)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_planted_bugs_at_read_and_unread_rows_fail_there(dtype):
    with jax.enable_x64(dtype == jnp.float64):
        params = _params(dtype)
        good = jax.grad(_plain)
        report = jgradcheck.check_grad(_plain, good, params, TOKENS, X)
        assert report.passed
        # The 16 unread entries were not evaluated: 32 evaluations, less one for J(θ).
        assert "31 evaluations skipped, entries J never reads: E" in str(report)  # 32, less J(θ)
        for row, col in ((5, 1), (4, 2)):  # row 5 is never read; row 4 is, twice

            def bad(p, tokens, x, row=row, col=col):
                g = good(p, tokens, x)
                return {**g, "E": g["E"].at[row, col].add(1e-3 * jnp.max(jnp.abs(g["E"])))}

            report = jgradcheck.check_grad(_plain, bad, params, TOKENS, X)
            assert not report.passed
            assert report.worst[0].name == f"E[{row}, {col}]"
            assert [leaf.path for leaf in report.leaves if leaf.status == "fail"] == ["E"]


def _tied(p, tokens):  # the table is also the output projection: every entry is read
    h = jnp.tanh(p["E"][tokens])
    return jnp.sum(jax.nn.log_softmax(h @ p["E"].T))


def _routed(p, tokens):  # indices computed from a parameter (top-1 routing): not data
    k = jnp.argmax(p["gate"])
    return jnp.sum(jnp.sin(p["E"][tokens + k]))


def _in_scan(p, tokens):  # the gather inside a loop body is not followed
    def step(c, t):
        return c + jnp.sum(jnp.sin(p["E"][t])), None

    return jax.lax.scan(step, 0.0, tokens)[0]


def _take_fill(p, tokens):  # jnp.take inside a jit call, out-of-bounds tokens filled (read nothing)
    return jnp.sum(jnp.nan_to_num(jnp.take(p["E"], tokens, axis=0, mode="fill", fill_value=0.0)) ** 2)


def _take_clip(p, tokens):  # out-of-bounds tokens clipped: they read the last row
    return jnp.sum(jnp.take(p["E"], tokens, axis=0, mode="clip") ** 3)


def test_detection_is_conservative_and_follows_gather_semantics():
    params = {"E": jnp.ones((8, 2)), "gate": jnp.arange(3.0)}
    tokens = jnp.array([0, 2, 9])  # 9 is out of bounds
    assert _unread(_tied, {"E": params["E"]}, tokens)["E"] is None
    assert _unread(_routed, params, tokens)["E"] is None
    assert _unread(_in_scan, {"E": params["E"]}, tokens)["E"] is None
    fill = _unread(_take_fill, {"E": params["E"]}, tokens)["E"].reshape(8, 2)
    assert np.flatnonzero(~fill.all(axis=1)).tolist() == [0, 2]
    clip = _unread(_take_clip, {"E": params["E"]}, tokens)["E"].reshape(8, 2)
    assert np.flatnonzero(~clip.all(axis=1)).tolist() == [0, 2, 7]


def test_equinox_embedding_checks_with_unread_rows_skipped():
    model = eqx.nn.Embedding(10, 3, key=jax.random.PRNGKey(0))
    tokens = jnp.array([1, 3, 3])

    def cost(m, t):
        return jnp.sum(jnp.cos(jax.vmap(m)(t)))

    def grad(m, t):  # by hand: only the rows of the tokens get -sin, summed over repeats
        rows = jnp.zeros_like(m.weight).at[t].add(-jnp.sin(m.weight[t]))
        return eqx.tree_at(lambda g: g.weight, m, rows)

    report = jgradcheck.check_grad(cost, grad, model, tokens)
    assert report.passed and "47 evaluations skipped" in report.evaluated  # 8 rows x 3 x 2, less 1

    def wrong(m, t):  # forgot to sum over the repeated token 3
        rows = jnp.zeros_like(m.weight).at[t].set(-jnp.sin(m.weight[t]))
        return eqx.tree_at(lambda g: g.weight, m, rows)

    report = jgradcheck.check_grad(cost, wrong, model, tokens)
    assert not report.passed and report.worst[0].index[0] == 3


def test_a_table_read_elsewhere_too_is_fully_checked():
    # Yours forgets the output projection's share, so it is 0 at rows no token selects: a check
    # that took those rows for unread would pass it.
    params = {"E": jnp.asarray(np.random.default_rng(2).standard_normal((8, 2)), jnp.float32)}
    tokens = jnp.array([0, 2, 2])

    def wrong(p, t):
        return {"E": jax.grad(_tied)(p, t)["E"] * jnp.zeros((8, 1)).at[t].set(1.0)}

    report = jgradcheck.check_grad(_tied, wrong, params, tokens)
    assert not report.passed
    assert report.worst[0].index[0] not in (0, 2)


def test_noise_is_probed_on_entries_j_reads():
    # Rows no token selects would show J perfectly flat: the noise probe draws its coordinates
    # from the entries J reads.
    from jgradcheck._src.probe import probe_entries

    params = {"E": jnp.ones((256, 16)), "W": jnp.ones((16, 2))}
    tokens = jnp.array([5, 9, 9, 200])
    with jax.enable_x64(True):
        prob = problem.prepare(_plain, params, (tokens, jnp.ones((4, 2))), True, False)
        eng = check.make_engine(prob, None, None, "delta")
        group = (prob.paths.index("E"),)
        unread = eng.unread(group)
        for seed in range(20):
            idx, _ = probe_entries(prob, group, seed, unread)
            assert not unread[idx].any()


def test_float32_check_with_mostly_unread_rows_passes_a_correct_gradient():
    # float32 throughout: the tolerances rest on J's measured noise; the unread rows' exact
    # zeros get no finite-difference allowance and must not make the leaf inconclusive.
    r = np.random.default_rng(3)
    params = {"E": jnp.asarray(r.standard_normal((256, 16)), jnp.float32)}
    tokens = jnp.array([5, 9, 9, 200])
    x = jnp.asarray(r.standard_normal((4, 16, 8)), jnp.float32)

    def cost(p, t, x):
        return jnp.sum(jnp.sin(jnp.einsum("td,tdk->tk", p["E"][t], x)))

    report = jgradcheck.check_grad(cost, jax.grad(cost), params, tokens, x, x64=False)
    assert report.passed, str(report)


def test_same_program_text_with_another_data_split_finds_its_own_rows():
    # Two costs whose jaxprs print alike, one taking f as data and one as a parameter: the
    # unread rows must come from each check's own tokens, not from a cached discovery.
    r = np.random.default_rng(4)
    table = jnp.asarray(r.standard_normal((8, 3)))
    f = jnp.array([0.5, -1.0, 2.0])
    t1, t2 = jnp.arange(4), jnp.arange(4, 8)

    def as_data(p, f, t1, t2):
        return jnp.sum(p["emb"][t1] * f)

    def as_param(p, t1, t2):
        return jnp.sum(p["emb"][t1] * p["f"])

    assert jgradcheck.check_grad(as_data, jax.grad(as_data), {"emb": table}, f, t1, t2).passed

    def wrong(p, t1, t2):  # 0 at the rows t1 reads
        g = jax.grad(as_param)(p, t1, t2)
        return {**g, "emb": g["emb"].at[t1].set(0.0)}

    report = jgradcheck.check_grad(as_param, wrong, {"emb": table, "f": f}, t1, t2)
    assert not report.passed and report.worst[0].path == "emb" and report.worst[0].index[0] < 4
