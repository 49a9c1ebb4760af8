"""Several hosts under ``jax.distributed``, proven on one machine.

Two Python processes (``multihost_worker.py``) join one JAX cluster through a coordinator on
127.0.0.1, each with its own two CPU devices and gloo for the collectives between them. Both
build the same parameters and data and run ``check_grad(..., devices=jax.devices())`` over
the four global devices: the perturbations are sharded over both processes and the results
gathered back. Their reports must be identical, name the devices of both processes, pass for
the correct gradient and fail the same way for a planted bug; and say what the same checks run
in one process (this one, on its default device, no jax.distributed) say, to the round-off of J.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT_S = 240

pytestmark = pytest.mark.multihost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cluster() -> list[tuple[list[dict], dict]]:
    """Starts both processes; returns each one's reports and numerical gradient (parsed), or
    fails with their output."""
    port = _free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    procs = [
        subprocess.Popen(
            [sys.executable, WORKER, str(port), str(k)],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
        )
        for k in range(2)
    ]
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=TIMEOUT_S)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        logs = "\n".join(f"--- process {k} ---\n{p.communicate()[0][-3000:]}" for k, p in enumerate(procs))
        pytest.fail(f"the two jax.distributed processes did not finish within {TIMEOUT_S} s:\n{logs}")
    for k, (p, out) in enumerate(zip(procs, outs)):
        if p.returncode != 0:
            pytest.fail(f"process {k} exited with {p.returncode}:\n{out[-5000:]}")
    return [
        (
            [json.loads(line[len("REPORT ") :]) for line in out.splitlines() if line.startswith("REPORT ")],
            next(json.loads(line[len("NUMERICAL ") :]) for line in out.splitlines() if line.startswith("NUMERICAL ")),
        )
        for out in outs
    ]


@pytest.fixture(scope="module")
def cluster() -> list[tuple[list[dict], dict]]:
    return _run_cluster()


@pytest.fixture(scope="module")
def reports(cluster) -> list[list[dict]]:
    return [r for r, _ in cluster]


def _worker():
    """``multihost_worker`` as a module (its problem and checks; nothing starts JAX's cluster)."""
    sys.path.insert(0, os.path.dirname(WORKER))
    try:
        import multihost_worker
    finally:
        sys.path.remove(os.path.dirname(WORKER))
    return multihost_worker


@pytest.fixture(scope="module")
def single() -> tuple[list[dict], dict]:
    """The same checks in this process alone, on its default device (no jax.distributed)."""
    return _worker().run()


def _roundoff() -> float:
    """How far another batching of the same float64 evaluations may move one central difference:
    4 ulps of J at each of its two points (|J(θ ± h eᵢ)| ≤ 2|J(θ)|), over the step 2h."""
    import jax

    worker = _worker()
    cost, _, params, args = worker.problem()
    with jax.enable_x64(True):
        j0 = abs(float(jax.jit(cost)(*jax.tree.map(lambda v: np.asarray(v, np.float64), (params, *args)))))
    return 4 * 2 * float(np.spacing(2 * j0)) / (2 * worker.STEP)


def _without_process(r: dict) -> dict:
    return {k: v for k, v in r.items() if k not in ("process_index", "local_devices")}


def test_two_processes_form_one_cluster(reports):
    assert [len(r) for r in reports] == [2, 2]
    for k, (ok, _) in enumerate(reports):
        assert ok["process_index"] == k
        assert ok["process_count"] == 2
        assert ok["device_count"] == 4


def test_reports_name_devices_of_both_processes(reports):
    (ok0, _), (ok1, _) = reports
    assert set(ok0["local_devices"]).isdisjoint(ok1["local_devices"])
    assert set(ok0["devices"]) == set(ok0["local_devices"]) | set(ok1["local_devices"])


def test_correct_gradient_passes_identically(reports):
    (ok0, _), (ok1, _) = reports
    assert ok0["passed"] and ok1["passed"]
    assert ok0["grade"] == "GREAT"
    assert _without_process(ok0) == _without_process(ok1)


def test_planted_bug_fails_identically(reports):
    (_, bug0), (_, bug1) = reports
    assert not bug0["passed"] and not bug1["passed"]
    assert [leaf["path"] for leaf in bug0["leaves"] if not leaf["passed"]] == ["W2"]
    assert _without_process(bug0) == _without_process(bug1)


def test_the_numerical_gradient_is_the_one_of_a_single_process(cluster, single):
    (_, num0), (_, num1) = cluster
    _, alone = single
    tol = _roundoff()
    assert num0 == num1
    for leaf in alone:
        np.testing.assert_allclose(num0[leaf], alone[leaf], rtol=0, atol=tol, err_msg=leaf)
    assert tol < 1e-6 * max(np.max(np.abs(v)) for v in alone.values())  # round-off, not an error


def test_the_cluster_says_what_a_single_process_says(reports, single):
    """Same verdicts, leaf by leaf, and the same differences to the round-off of the numerical
    gradient: ‖g − n‖ / (‖g‖ + ‖n‖) moves by at most 2‖δ‖ / ‖n‖ when n moves by δ, and a second
    look's (4 D(h) − D(2h)) / 3 by 1.5 times the round-off of one difference."""
    (ok0, bug0), _ = reports
    alone, numerical = single
    tol = 1.5 * _roundoff()
    for multi, one in zip((ok0, bug0), alone):
        assert multi["bug"] == one["bug"]
        assert (multi["passed"], multi["grade"]) == (one["passed"], one["grade"]), (multi, one)
        assert [(x["path"], x["passed"], x["checked"], x["n_failed"]) for x in multi["leaves"]] == [
            (x["path"], x["passed"], x["checked"], x["n_failed"]) for x in one["leaves"]
        ]
        for x, y in zip(multi["leaves"], one["leaves"]):
            n = np.asarray(numerical[x["path"]])
            bound = 2 * math.sqrt(n.size) * tol / np.linalg.norm(n)
            assert abs(x["difference"] - y["difference"]) <= bound, (x, y, bound)
            assert abs(x["worst"][1] - y["worst"][1]) <= tol, (x, y, tol)
        assert [d.split(":")[0] for d in one["devices"]] == ["cpu"] and len(multi["devices"]) == 4
