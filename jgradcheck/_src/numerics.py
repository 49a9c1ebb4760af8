"""Numerical choices, each in a small helper with the reason beside it.

References:
  Nocedal & Wright, *Numerical Optimization*, 2nd ed., §8.1 (step sizes for finite differences).
  Moré & Wild, "Estimating computational noise", SIAM J. Sci. Comput. 33(3), 2011 (ECnoise).
  The classic gradient-checking recipe of the deep-learning course notes: the relative difference and its graded scale.
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

# Stencils: name -> (offsets in units of h, weights); the derivative is sum(w * J(θ + o h)) / h.
# Richardson extrapolation of central differences at h and 2h is the classic 5-point 4th-order
# stencil; one more level (4h) gives 6th order.
STENCILS: dict[str, tuple[tuple[int, ...], tuple[float, ...]]] = {
    "central": ((1, -1), (1 / 2, -1 / 2)),
    "central_2h": ((2, -2), (1 / 4, -1 / 4)),
    "central4": ((1, -1, 2, -2), (8 / 12, -8 / 12, -1 / 12, 1 / 12)),
    # Two levels of Richardson extrapolation of D(h), D(2h), D(4h), D(kh) = (J(kh) - J(-kh)) / 2kh:
    # (64 D(h) - 20 D(2h) + D(4h)) / 45, exact up to degree 6 (6th order).
    "richardson": (
        (1, -1, 2, -2, 4, -4),
        (64 / 90, -64 / 90, -20 / 180, 20 / 180, 1 / 360, -1 / 360),
    ),
}

# Order of accuracy of each method: sets the optimal step ~ eps**(1 / (order + 1)) (N&W §8.1).
ORDER = {"central": 2, "central4": 4, "richardson": 6}

# A coordinate is judged against this many times its estimated finite-difference error. The
# estimates are 1-sigma noise and leading-order truncation terms; a real bug is usually
# 1e3-1e9 estimates away, so 10 keeps false alarms rare without hiding 1% errors.
DEFAULT_SAFETY = 10.0

# The user's own gradient has rounding error too: a few hundred ulps of its dtype relative to
# the entry and to the leaf's largest entry (backprop sums many terms; cancellation hides here).
GRAD_ULPS = 256.0

# Seeds' scale for the relative difference: ~1e-7 great, ~1e-5 double-check, >= 1e-3 bug.
GRADE_GREAT = 1e-6
GRADE_BUG = 1e-3


def machine_eps(dtype) -> float:
    """Machine epsilon of a float dtype (bfloat16 included, via jnp.finfo)."""
    return float(jnp.finfo(dtype).eps)


def base_step(theta: np.ndarray, dtype, method: str) -> np.ndarray:
    """Per-coordinate step h_i ~ eps**(1/(p+1)) * max(1, |θ_i|), rounded to a power of two.

    Why: the error of an order-p difference is ~ h**p f^(p+1) + eps |J| / h, smallest near
    h ~ eps**(1/(p+1)) in units of the coordinate's scale (Nocedal & Wright §8.1); for central
    differences that is ∛eps (6e-6 in float64, 5e-3 in float32). With the classic recipe's h = 1e-7 in
    float32, θ + h rounds back to θ for |θ| >~ 1 and the estimate is garbage. A power of two
    at least a few ulps of θ makes θ + k h exact, so the step taken is the step divided by.
    """
    c = machine_eps(dtype) ** (1.0 / (ORDER[method] + 1))
    raw = c * np.maximum(1.0, np.abs(theta))
    return np.exp2(np.round(np.log2(raw)))


def roundoff_factor(method: str) -> float:
    """Sum of |weights|: noise delta in each J gives about delta * this / h in the derivative."""
    return float(sum(abs(w) for w in STENCILS[method][1]))


def ecnoise(values: np.ndarray) -> float:
    """Noise level of J from equally spaced samples along a line (Moré & Wild 2011, simplified).

    Why: round-off in J, not the step, limits finite differences; it is usually far above
    eps |J| (sums of many terms, cancellation). The k-th differences of a smooth function at
    a tiny spacing vanish, leaving noise whose variance is amplified by (2k)!/(k!)**2; we
    undo that amplification for orders 3..6 and take the median, which tolerates one
    order that is still dominated by smoothness or hit by a kink.
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        return float("nan")
    sigmas = []
    d = v
    for k in range(1, 7):
        d = np.diff(d)
        if k >= 3:
            gamma = math.factorial(k) ** 2 / math.factorial(2 * k)
            sigmas.append(math.sqrt(gamma * float(np.mean(d**2))))
    return float(np.median(sigmas))


def noise_spacing(dtype) -> float:
    """Spacing for the noise probe: eps**0.4 (6e-7 in float64, 2e-3 in float32).

    Why: third differences of the smooth part scale like s**3 and must sit below eps |J|:
    s**3 << eps, while s must stay well above eps so the probe points differ at all.
    """
    return machine_eps(dtype) ** 0.4


def relative_difference(a: np.ndarray, b: np.ndarray) -> float:
    """The classic ‖a − b‖₂ / (‖a‖₂ + ‖b‖₂); 0 when both are exactly zero (not NaN)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    num = float(np.linalg.norm(a - b))
    den = float(np.linalg.norm(a)) + float(np.linalg.norm(b))
    if num == 0.0:
        return 0.0
    if den == 0.0 or not math.isfinite(den):
        return float("nan") if not math.isfinite(num) else float("inf")
    return num / den


def is_kink(gap_h: np.ndarray, gap_2h: np.ndarray, noise: np.ndarray) -> np.ndarray:
    """Whether one-sided slopes disagree like a kink rather than like curvature.

    Why: for a smooth J the forward and backward slopes differ by h f'' (so the gap doubles
    from h to 2h); across a kink (ReLU at 0, max ties, abs, clip) they differ by the jump in
    slope, whatever the step (the gap stays put; a kink within h of θ gives a ratio in
    [1, 1.75)). The gap must also exceed its noise.
    """
    same_sign = np.sign(gap_h) == np.sign(gap_2h)
    big = np.abs(gap_h) > noise
    flat = np.abs(gap_2h) < 1.75 * np.abs(gap_h)
    return same_sign & big & flat
