"""Naming the kind of bug from the shape of the discrepancy between yours and numerical.

Each rule fits one simple model of the mistake by least squares and accepts it when the model
explains the discrepancy almost entirely (residual below ``FIT`` of what it explains).
"""

from __future__ import annotations

import numpy as np

# A model "explains" the discrepancy when what it leaves is below this fraction of it.
FIT = 0.05
# A fitted factor this close to 1 is no factor at all; this close to -1 is a sign flip.
NEAR = 0.02


def _explains(residual: np.ndarray, target: np.ndarray) -> bool:
    t = float(np.linalg.norm(target))
    return t > 0 and float(np.linalg.norm(residual)) <= FIT * t


def fitted_factor(yours: np.ndarray, numerical: np.ndarray) -> float | None:
    """c with yours ≈ c × numerical, when that model explains the leaf; else None."""
    nn = float(numerical @ numerical)
    if nn == 0:
        return None
    c = float(yours @ numerical) / nn
    return c if _explains(yours - c * numerical, yours - numerical) else None


def describe_leaf(
    yours: np.ndarray, numerical: np.ndarray, theta: np.ndarray, shape: tuple[int, ...], n_failed: int
) -> str | None:
    """Plain words for what a failing leaf's discrepancy looks like, or None if no rule fits.

    Args:
      yours: your gradient for the leaf's checked entries (flat, float64).
      numerical: the finite-difference gradient for the same entries.
      theta: the parameter values at those entries.
      shape: the leaf's shape when every entry was checked (enables the transpose rule), else ().
      n_failed: how many of these entries failed.
    """
    diff = yours - numerical
    if not np.all(np.isfinite(yours)):
        return "yours has NaN/Inf entries"
    if float(np.linalg.norm(diff)) == 0:
        return None
    nz = numerical != 0
    if np.any(nz) and np.all(yours[nz] == 0):
        return "yours is zero where numerical is not: a missing term, or a parameter not connected in your backprop"
    c = fitted_factor(yours, numerical)
    if c is not None:
        if abs(c + 1) < NEAR:
            return "sign flipped: yours ≈ -1.00 × numerical"
        if c != 1:
            inv = f" (numerical ≈ {1 / c:.4g} × yours)" if c != 0 and abs(c) < 1 else ""
            return f"constant factor: yours ≈ {c:.4g} × numerical{inv}"
    if len(shape) == 2 and shape[0] == shape[1] and yours.size == shape[0] * shape[1]:
        n_mat = numerical.reshape(shape)
        if not np.allclose(n_mat, n_mat.T) and _explains(yours - n_mat.T.ravel(), diff):
            return "transposed: yours ≈ numerical.T"
    tt = float(theta @ theta)
    if tt > 0:
        lam = float(diff @ theta) / tt
        if _explains(diff - lam * theta, diff):
            if lam < 0:
                return f"yours - numerical ≈ {lam:.3g} × parameter: a missing L2 term (λ/m ≈ {-lam:.3g})"
            return f"yours - numerical ≈ {lam:.3g} × parameter: an extra L2 term (λ/m ≈ {lam:.3g}), e.g. on a bias"
    if yours.size >= 10 * n_failed and n_failed <= max(3, yours.size // 100):
        return f"{n_failed} isolated {'entry is' if n_failed == 1 else 'entries are'} wrong; see the worst entries"
    return None


def common_factor(factors: list[float | None], batch_sizes: tuple[int, ...]) -> str | None:
    """A finding across leaves: every leaf off by one common factor, e.g. a missing 1/m."""
    if len(factors) < 2 or any(f is None for f in factors):
        return None
    fs = np.asarray(factors, dtype=np.float64)
    c = float(np.median(fs))
    if abs(c - 1) < NEAR or not np.all(np.abs(fs - c) <= NEAR * abs(c)):
        return None
    msg = f"every leaf is off by one common factor: yours ≈ {c:.4g} × numerical"
    for m in batch_sizes:
        if m > 1 and abs(c - m) <= NEAR * m:
            return msg + f", equal to the batch size m = {m}: a missing 1/m in your gradient (or an extra m)"
        if m > 1 and abs(c * m - 1) <= NEAR:
            return msg + f", 1/m with batch size m = {m}: your gradient divides by m twice, or the cost misses 1/m"
    return msg + ": a scale factor applied to the whole gradient"
