"""Several hosts under ``jax.distributed``, proven on one machine.

Two Python processes (``multihost_worker.py``) join one JAX cluster through a coordinator on
127.0.0.1, each with its own two CPU devices and gloo for the collectives between them. Both
build the same parameters and data and run ``check_grad(..., devices=jax.devices())`` over
the four global devices: the perturbations are sharded over both processes and the results
gathered back. Their reports must be identical, name the devices of both processes, pass for
the correct gradient and fail the same way for a planted bug.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import pytest

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "multihost_worker.py")
TIMEOUT_S = 240

pytestmark = pytest.mark.multihost


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_cluster() -> list[list[dict]]:
    """Starts both processes; returns each one's reports (parsed), or fails with their output."""
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
        [json.loads(line[len("REPORT ") :]) for line in out.splitlines() if line.startswith("REPORT ")] for out in outs
    ]


@pytest.fixture(scope="module")
def reports() -> list[list[dict]]:
    return _run_cluster()


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
