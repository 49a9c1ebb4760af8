"""One of the processes of ``test_multihost.py``: a check_grad over the global device list.

Run as ``python tests/multihost_worker.py <coordinator port> <process id>``; checks a correct
gradient, then one with a planted bug (the L2 term missing from dW2), and prints one line
``REPORT <json>`` with each report's numbers, then one line ``NUMERICAL <json>`` with the
numerical gradient over the global devices. Only this process's JAX config is changed (gloo
for cross-process collectives on CPU), never a user's.

``problem()`` and ``numbers()`` import nothing at module level that starts JAX, so that
``test_multihost.py`` runs the same check in its own single process to compare with.
"""

from __future__ import annotations

import functools
import json
import os
import sys

# The step of every check here (eps=): a power of two near the default ∛ε for float64, so that
# the test can bound the round-off of a central difference (J's ulps over 2h).
STEP = 2.0**-17
BUGS = (None, "no_l2")


def problem():
    """The cost, the hand-written gradient (``bug=`` plants one), the parameters and the data:
    the same numbers in every process (numpy, fixed generator)."""
    import jax.numpy as jnp
    import numpy as np

    rng = np.random.default_rng(0)
    X = rng.standard_normal((32, 6)).astype(np.float32)
    y = rng.standard_normal((32, 1)).astype(np.float32)
    params = {
        "W1": jnp.asarray(rng.standard_normal((6, 8)) / np.sqrt(6), jnp.float32),
        "b1": jnp.asarray(0.1 * rng.standard_normal(8), jnp.float32),
        "W2": jnp.asarray(rng.standard_normal((8, 1)) / np.sqrt(8), jnp.float32),
    }
    lam = 0.1

    def cost(p, X, y):
        h = jnp.tanh(X @ p["W1"] + p["b1"])
        r = h @ p["W2"] - y
        return 0.5 * jnp.mean(r**2) + 0.5 * lam * jnp.sum(p["W2"] ** 2)

    def grad(p, X, y, bug=None):
        m = X.shape[0]
        h = jnp.tanh(X @ p["W1"] + p["b1"])
        r = h @ p["W2"] - y
        dW2 = h.T @ r / m + (0.0 if bug == "no_l2" else lam * p["W2"])
        dz = (r @ p["W2"].T) * (1 - h**2) / m
        return {"W1": X.T @ dz, "b1": dz.sum(0), "W2": dW2}

    return cost, grad, params, (X, y)


def run(devices=None) -> tuple[list[dict], dict[str, list[float]]]:
    """Each bug's report numbers and the numerical gradient, over ``devices`` (None: the default)."""
    import jgradcheck

    cost, grad, params, args = problem()
    reports = [
        numbers(jgradcheck.check_grad(cost, functools.partial(grad, bug=bug), params, *args, eps=STEP, devices=devices))
        | {"bug": bug}
        for bug in BUGS
    ]
    numerical = jgradcheck.numerical_grad(cost, params, *args, eps=STEP, devices=devices, float64=True)
    return reports, {k: [float(v) for v in numerical[k].ravel()] for k in sorted(numerical)}


def main() -> None:
    port, process_id = int(sys.argv[1]), int(sys.argv[2])
    # Before JAX starts: this process's own CPU devices (two), and gloo for collectives between processes.
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=2").strip()
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(
        coordinator_address=f"127.0.0.1:{port}",
        num_processes=2,
        process_id=process_id,
        initialization_timeout=120,
    )
    reports, numerical = run(jax.devices())
    for report in reports:
        print("REPORT " + json.dumps(report), flush=True)
    print("NUMERICAL " + json.dumps(numerical), flush=True)
    jax.distributed.shutdown()


def numbers(report) -> dict:
    import jax

    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "device_count": jax.device_count(),
        "local_devices": [f"{d.platform}:{d.id}" for d in jax.local_devices()],
        "passed": report.passed,
        "difference": report.difference,
        "grade": report.grade.name,
        "devices": list(report.devices),
        "evaluations": report.evaluations,
        "leaves": [
            {
                "path": leaf.path,
                "passed": leaf.passed,
                "difference": leaf.difference,
                "checked": leaf.checked,
                "n_failed": leaf.n_failed,
                "worst": None if leaf.worst is None else [leaf.worst.yours, leaf.worst.numerical],
                "diagnosis": leaf.diagnosis,
            }
            for leaf in report.leaves
        ],
    }


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
