"""Numerical choices, each in a small helper with the reason beside it.

References:
  Nocedal & Wright, *Numerical Optimization*, 2nd ed., §8.1 (step sizes for finite differences).
  Moré & Wild, "Estimating computational noise", SIAM J. Sci. Comput. 33(3), 2011 (ECnoise).
  The classic gradient-checking recipe of the deep-learning course notes: the relative difference and its graded scale.
"""

from __future__ import annotations

import math
import warnings

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
# the entry and to the leaf's largest entry (backprop sums many terms; cancellation hides here),
# but never more than GRAD_REL_CAP of either (see ``grad_rounding``).
GRAD_ULPS = 256.0
GRAD_REL_CAP = 1e-3
# Whatever the cap, an entry may be off by its own final rounding and one more operation.
GRAD_ENTRY_ULPS = 2.0

# A pass must be able to see errors this large relative to the leaf's gradient: a check whose
# finite-difference error estimate exceeds 1% of the gradient's scale is inconclusive, not passed.
RESOLUTION_BOUND = 1e-2

# Steps that adapt: a suspect whose error estimate does not converge at h is re-evaluated at
# h/4, h/16, ... (STEP_LEVELS levels, 2 evaluations each) and judged at the level whose
# estimated error (truncation + round-off) is smallest.
STEP_SHRINK = 4.0
STEP_LEVELS = 10

# Seeds' scale for the relative difference: ~1e-7 great, ~1e-5 double-check, >= 1e-3 bug.
GRADE_GREAT = 1e-6
GRADE_BUG = 1e-3


def machine_eps(dtype) -> float:
    """Machine epsilon of a float dtype (bfloat16 included, via jnp.finfo)."""
    return float(jnp.finfo(dtype).eps)


def base_step(theta: np.ndarray, dtype, method: str, eps: np.ndarray | None = None) -> np.ndarray:
    """Per-coordinate step h_i ~ eps**(1/(p+1)) * max(1, |θ_i|), rounded to a power of two.

    ``eps`` (per coordinate) is the machine epsilon J is actually computed in along the
    coordinate's path (``precision.path_precision``: a float32 softmax or a bfloat16 section inside
    a float64 check); by default the check dtype's.

    Why: the error of an order-p difference is ~ h**p f^(p+1) + eps |J| / h, smallest near
    h ~ eps**(1/(p+1)) in units of the coordinate's scale (Nocedal & Wright §8.1); for central
    differences that is ∛eps (6e-6 in float64, 5e-3 in float32). With the classic recipe's h = 1e-7 in
    float32, θ + h rounds back to θ for |θ| >~ 1 and the estimate is garbage. A power of two
    at least a few ulps of θ makes θ + k h exact, so the step taken is the step divided by.
    """
    e = np.maximum(machine_eps(dtype), 0.0 if eps is None else np.asarray(eps, np.float64))
    c = e ** (1.0 / (ORDER[method] + 1))
    raw = c * np.maximum(1.0, np.abs(theta))
    return np.exp2(np.round(np.log2(raw)))


def grad_rounding(g: np.ndarray, g_eps: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Your gradient's own rounding error, per entry, from its dtype and magnitude.

    Why: a gradient stored in a dtype with machine epsilon ε is off by up to ε/2 of each entry
    (its final rounding), and backprop's sums may lose a few hundred ulps to cancellation, relative
    to the leaf's largest entry. Those ulps are capped at 0.1% of the entry and of the leaf's scale:
    256 ulps are 3e-5 in float32 but 200% in bfloat16 (ε = 2^-7), which would pass any bug. The
    entry's own two ulps are never capped (1.6% in bfloat16, so a 5% error is still seen).
    """
    g_eps = np.asarray(g_eps, np.float64)
    rel = np.minimum(GRAD_ULPS * g_eps, GRAD_REL_CAP)
    entry = np.maximum(GRAD_ENTRY_ULPS * g_eps, rel)
    return entry * np.abs(g) + rel * np.asarray(scale, np.float64)


def section_rounding(g: np.ndarray, section_eps: float, scale: np.ndarray) -> np.ndarray:
    """What a narrow section anywhere in J (a float32 softmax in a float64 check) leaves in any
    gradient of J: one ulp of that dtype, relative to the entry and to its leaf's scale.

    Why: such a J is defined only to that precision. Your gradient's program rounds the section's
    values differently from the check's programs (another fusion, another order of the softmax's
    sums), so every leaf whose gradient reads them, upstream or downstream, differs by a fraction of
    an ulp of the section's dtype (measured: up to 0.3 ulp of float32 on a transformer block's MLP,
    output and value weights, relative to the leaf's largest entry). Errors below one ulp of the
    section cannot be told from that: 1e-7 of a float64 leaf behind a float32 softmax is not seen.
    """
    return section_eps * (np.abs(g) + np.asarray(scale, np.float64))


# ... and at 4h, 16h, ... 4^6 h: where J's noise is far above what the step was chosen for (a
# gradient ~1e-9 of J near a minimum, a cost quantized by cancellation), the best step is larger
# than ∛eps; steps that adapt go up as far as truncation (and ``step_cap``) allows.
STEP_UP_LEVELS = 6

# The largest trial step: an eighth of the coordinate's scale max(1, |θ|). Beyond it a difference
# no longer describes J near θ.
STEP_CAP = 0.125


def step_cap(theta: np.ndarray) -> np.ndarray:
    return STEP_CAP * np.maximum(1.0, np.abs(np.asarray(theta, np.float64)))


def no_information(
    d: np.ndarray, jp: np.ndarray, jm: np.ndarray, steps: np.ndarray, noise: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Ladder levels whose two values of J are equal, where a larger level saw J change.

    Why: J(θ + s) = J(θ − s) exactly, while J changed over a larger step, means J's change over
    2s was lost in the rounding of J's values: the level says nothing about the derivative (it
    is not a derivative of 0), and the grid J's values sit on is at least that change,
    2s·|D| for the slope |D| the larger levels saw. Such levels are dropped (NaN), and each
    entry's noise is raised to half that grid, so the round-off bound of every level accounts
    for it. A J that does not change at any level (an exactly flat or even J) is left alone.
    """
    finite = np.isfinite(d)
    zero = finite & (jp == jm)
    moving = finite & ~zero
    # Largest step first: a zero level counts where some larger level moved.
    above = np.cumsum(moving, axis=0) - moving > 0
    lost = zero & above
    if not lost.any():
        return d, np.asarray(noise)
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns: entries with no lost level
        ref = np.nanmedian(np.where(moving, np.abs(d), np.nan), axis=0)
        grid = np.nanmax(np.where(lost, steps * ref[None, :], np.nan), axis=0)
        # The smallest change J was seen to make is at most a few of its grid's steps: where smaller
        # steps were lost, the levels just above them moved by a quantum or two (a cancellation
        # against a term near 1 that no probe of two coordinates saw), so their slopes are round-off,
        # not a derivative, and kinks must not be read into them.
        seen = np.nanmin(np.where(moving, np.abs(jp - jm), np.nan), axis=0)
        grid = np.where(lost.any(axis=0), np.fmax(grid, 0.5 * seen), grid)
    return np.where(lost, np.nan, d), np.maximum(noise, np.nan_to_num(grid, nan=0.0))


def step_ladder(h: np.ndarray, levels: int = STEP_LEVELS, up: int = STEP_UP_LEVELS) -> np.ndarray:
    """Steps 16h, 4h, h, h/4, h/16, ... (shape (up + levels + 1, k); row ``up`` is h).

    Why 4: one level per factor 4 reaches a curvature 10^6 times sharper in 10 levels, and
    Richardson's (16 D(h/4) − D(h)) / 15 cancels the h² term between neighbours. Powers of
    two keep θ ± step exact.
    """
    return np.asarray(h, np.float64)[None, :] * STEP_SHRINK ** (up - np.arange(up + levels + 1))[:, None]


# The smallest ladder levels whose central differences measure an entry's own noise.
LADDER_NOISE_LEVELS = 4


def ladder_noise(d: np.ndarray, steps: np.ndarray) -> np.ndarray:
    """Each entry's own noise level, read off the smallest steps of its ladder.

    Why: the probe measures J's noise along two coordinates, but noise differs per coordinate:
    one that feeds a cancellation (a pre-activation near 0 computed from terms near 1) sees
    rounding many orders above what a coordinate acting at the end of J sees. At the smallest
    steps truncation has vanished, and D(s/4) − D(s) is the noise of D(s/4), σ/(√2·s/4) in
    size: σ ≈ √2·(s/4)·|D(s) − D(s/4)|, the largest over the last levels.
    """
    last = slice(-LADDER_NOISE_LEVELS - 1, None)
    dd, ss = d[last], steps[last]
    with np.errstate(invalid="ignore", over="ignore"):
        sigma = np.sqrt(2.0) * ss[1:] * np.abs(dd[:-1] - dd[1:])
    # The largest over the levels: rounding can make two neighbouring levels agree by chance,
    # so a median errs small. Levels that left J's domain (NaN) do not count.
    return np.max(np.where(np.isfinite(sigma), sigma, 0.0), axis=0) if sigma.size else np.zeros(d.shape[1:])


def richardson_levels(
    d: np.ndarray, steps: np.ndarray, noise: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Richardson estimates over a ladder of central differences, with their error estimates.

    ``d[j]`` is the central difference at ``steps[j]`` (ratio STEP_SHRINK between levels).
    Returns (estimate, truncation, round-off), each (levels, k): level j combines d[j], d[j+1].

    Why: (16 D(h/4) − D(h)) / 15 is 4th order; its truncation error is bounded by the change
    from level j to j+1 (|D_j − D_{j+1}| / 15, the h² term removed) and by the change to the
    closer of the neighbouring extrapolations (which catches levels outside the asymptotic
    range: steep curvature, a kink crossed; two of three levels must agree). Round-off: noise / step through the weights 16/15 and 1/15.
    """
    r = STEP_SHRINK**2
    est = (r * d[1:] - d[:-1]) / (r - 1)
    first = np.abs(d[:-1] - d[1:]) / (r - 1)
    prev = np.full_like(est, np.nan)
    prev[1:] = np.abs(est[1:] - est[:-1])
    nxt = np.full_like(est, np.nan)
    nxt[:-1] = np.abs(est[:-1] - est[1:])
    with np.errstate(invalid="ignore"):
        neighbour = np.where(
            np.isfinite(prev) & np.isfinite(nxt), np.minimum(prev, nxt), np.where(np.isfinite(prev), prev, nxt)
        )
    trunc = np.maximum(first, neighbour)
    roundoff = noise * (r / steps[1:] + 1 / steps[:-1]) / (r - 1)
    return est, trunc, roundoff


def one_sided_levels(
    j0: float, js: np.ndarray, steps: np.ndarray, side: float, noise: float | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-sided second-order estimates where only one side of θ is in J's domain.

    ``js[j]`` is J(θ + side · steps[j]). A parabola through θ, θ ± a/4 and θ ± a gives
    f' ≈ (16 (J(a/4) − J0) − (J(a) − J0)) / (3a) (error O(a²)); its truncation is bounded by
    the change to the next level, its round-off by 32 noise / 3a.
    """
    a = side * steps[:-1]
    est = (STEP_SHRINK**2 * (js[1:] - j0) - (js[:-1] - j0)) / ((STEP_SHRINK - 1) * a)
    trunc = np.full_like(est, np.nan)
    trunc[:-1] = np.abs(est[:-1] - est[1:])
    roundoff = noise * 2 * STEP_SHRINK**2 / ((STEP_SHRINK - 1) * steps[:-1])
    return est, trunc, roundoff


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


def looks_like_noise(values: np.ndarray) -> bool:
    """Whether a probe line's difference table is dominated by noise (Moré & Wild's test, simplified).

    Why: ECnoise only measures noise when the smooth part of J has vanished from the k-th
    differences; a steep J (exp(10^6 θ)) or a spacing too coarse leaves them all of one sign and
    shrinking with the order, and reading that as noise would loosen every tolerance. Too fine a
    spacing (inputs rounded inside J) leaves most values equal. Noise changes the sign of the third
    differences and gives estimates that agree across orders (within a factor of 10 here: 9 points
    leave each estimate a few samples).
    """
    v = np.asarray(values, dtype=np.float64)
    if not np.all(np.isfinite(v)):
        return False
    if np.count_nonzero(np.diff(v)) < (v.size - 1) / 2:
        return False
    d3 = np.diff(v, 3)
    if not (np.any(d3 > 0) and np.any(d3 < 0)):
        return False
    sigmas, d = [], v
    for k in range(1, 7):
        d = np.diff(d)
        if k >= 3:
            sigmas.append(math.sqrt(math.factorial(k) ** 2 / math.factorial(2 * k) * float(np.mean(d**2))))
    return max(sigmas) <= 10 * min(sigmas)


# The noise probe also runs its lines at spacings 2^-10 and 2^-20 times the designed one: the
# first whose lines look like noise is used (a J steep at the scale of the designed spacing).
NOISE_SPACING_FACTORS = (1.0, 2.0**-10, 2.0**-20)


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


def is_kink(gap_h: np.ndarray, gap_2h: np.ndarray, noise: np.ndarray, ratio: float = 2.0) -> np.ndarray:
    """Whether one-sided slopes disagree like a kink rather than like curvature.

    Why: for a smooth J the forward and backward slopes differ by h f'' (so the gap grows with
    the step: doubles from h to 2h); across a kink (ReLU at 0, max ties, abs, clip) they differ
    by the jump in slope, whatever the step (the gap stays put; a kink within h of θ gives a
    ratio in [1, 1.75) for steps h and 2h). ``ratio`` is the ratio of the two steps; the gap must
    grow by less than 7/8 of it, and exceed its noise.
    """
    same_sign = np.sign(gap_h) == np.sign(gap_2h)
    big = np.abs(gap_h) > noise
    flat = np.abs(gap_2h) < 0.875 * ratio * np.abs(gap_h)
    return same_sign & big & flat


def percent(x: float) -> str:
    """A resolution as a percentage a person reads ("12%", "0.3%"); never "inf%"."""
    if not math.isfinite(x):
        return "any size"
    return f"{x:.0%}" if x >= 0.1 else f"{x:.1%}" if x >= 0.001 else f"{x:.1e}"


def plural(n: int, word: str, words: str | None = None) -> str:
    """``1 entry``, ``2 entries``: counts in user-facing text agree with their noun."""
    return f"{n} {word if n == 1 else (words or word + 's')}"
