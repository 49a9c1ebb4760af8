"""Naming the kind of bug from the shape of the discrepancy between yours and numerical.

Each rule fits one simple model of the mistake and accepts it when the model explains the discrepancy
almost entirely (what it leaves is below ``FIT`` of the discrepancy). ``describe_leaf`` tries the rules
in a fixed order, from the most specific model to the most general, so one bug gets one description.
"""

from __future__ import annotations

import itertools
import math
import re
from collections.abc import Callable, Iterator

import numpy as np

# A model "explains" the discrepancy when what it leaves is below this fraction of it.
FIT = 0.05
# A fitted factor this close to 1 is no factor at all; this close to -1 is a sign flip.
NEAR = 0.02
# A fitted factor below this (or above its inverse) is one side being ≈ 0, not a scale.
NEGLIGIBLE = 1e-3
# An entry below this fraction of the leaf's largest is zero. Where the cost ignores an entry, finite
# differences give exactly 0 (J(θ+h) and J(θ-h) are the same computation); this allows for float64
# finite-difference noise (~1e-8 relative) and float32 rounding of yours (~1e-7) on top.
ZERO = 1e-6
# A singular value or data-term entry below this fraction of the largest counts as absent when telling
# two readings of an L2 term apart: above float32 rounding of yours and float64 finite-difference noise,
# below any real term.
ABSENT = 1e-6
# ... and a reading is simpler only with this share of absent ones (at least 2) where the other has a
# tenth as many: generic arrays of a million entries have a few near-zero entries by chance.
EVIDENCE = 1e-4
# Values matching after sorting to this fraction of the discrepancy: only a permutation gets this close.
# (Unrelated arrays from one distribution sort to within ~sqrt(log n / n) of their difference.)
SORTED = 1e-3
# An entry of the discrepancy above this fraction of its largest is part of where yours is wrong.
PART = 1e-3
# A factor is refuted where the entries it leaves alone agree this many times better than it predicts.
QUIET = 10.0
# Work limits: rules that compare slices pairwise, or take an SVD, skip larger leaves.
MAX_SLICES = 512
MAX_ENTRIES = 1_000_000


def _explains(residual: np.ndarray, target: np.ndarray) -> bool:
    t = float(np.linalg.norm(target))
    return t > 0 and float(np.linalg.norm(residual)) <= FIT * t


def _count(n: int, one: str, many: str) -> str:
    return f"{n} {one if n == 1 else many}"


def _grid(a: np.ndarray, shape: tuple[int, ...]) -> np.ndarray | None:
    """The flat entries in the leaf's shape, when every entry was checked (else the layout is unknown)."""
    return a.reshape(shape) if shape and int(np.prod(shape)) == a.size else None


def _at(axis: int, ndim: int, index: str) -> str:
    """Index text like ``[:, i-1]`` for one axis of an ndim-array."""
    return "[" + ", ".join(index if a == axis else ":" for a in range(ndim)) + "]"


def _noun(axis: int, ndim: int) -> tuple[str, str]:
    """What a slice along axis is called: entries of a vector, rows or columns of a matrix."""
    if ndim == 1:
        return "entry", "entries"
    if ndim == 2:
        return ("row", "rows") if axis == 0 else ("column", "columns")
    return f"index along axis {axis}", f"indices along axis {axis}"


def _list(idx: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in idx[:8])
    return shown + (", …" if idx.size > 8 else "")


def fitted_factor(yours: np.ndarray, numerical: np.ndarray) -> float | None:
    """c with yours ≈ c × numerical, when that model explains the leaf; else None."""
    if not (np.all(np.isfinite(yours)) and np.all(np.isfinite(numerical))):
        return None  # no factor relates NaN/Inf entries (and inf - inf would warn)
    nn = float(numerical @ numerical)
    if nn == 0:
        return None
    c = float(yours @ numerical) / nn
    if not _explains(yours - c * numerical, yours - numerical):
        return None
    # A factor spoils every entry in proportion to numerical. Where the discrepancy is absent (below
    # PART of its largest), the factor predicts (c - 1) × numerical: entries that agree far better than
    # that (a repeated token's row wrong and the rest right) refute it, however small they are beside
    # the wrong ones. Noise cannot fake this: it would have to cancel the prediction on every entry.
    diff = np.abs(yours - numerical)
    quiet = diff <= PART * float(diff.max())
    predicted = float(np.linalg.norm((c - 1) * numerical[quiet]))
    if np.count_nonzero(numerical[quiet]) >= 2 and predicted > QUIET * float(np.linalg.norm(diff[quiet])):
        return None
    return c


# --- the rules, most specific first ---------------------------------------------------------------


def _factor(yours: np.ndarray, numerical: np.ndarray) -> str | None:
    """yours ≈ c × numerical: a sign, a missing 1/m, a doubled term scale the whole leaf."""
    c = fitted_factor(yours, numerical)
    if c is None or abs(c) < NEGLIGIBLE or abs(c) > 1 / NEGLIGIBLE:
        return None  # no factor, or one side ≈ 0: see _negligible
    if abs(c + 1) < NEAR:
        return "sign flipped: yours ≈ -1.00 × numerical"
    if yours.size < 2 and c != 1:
        # One entry is always "a factor" of another: only say so as a ratio, not as a finding.
        return f"yours = {c:.4g} × numerical (a single entry: a factor cannot be told from another error)"
    if c != 1:
        inv = f" (numerical ≈ {1 / c:.4g} × yours)" if c != 0 and abs(c) < 1 else ""
        return f"constant factor: yours ≈ {c:.4g} × numerical{inv}"
    return None


def _negligible(yours: np.ndarray, numerical: np.ndarray) -> str | None:
    """One side ≈ 0 beside the other: a ratio then says nothing about a scale, so name the zero side.

    Why after the structural rules: every small yours is "≈ 0", so this reading is the most general;
    an exact structure in it (one value per slice, the mean of numerical's) says more.
    """
    c = fitted_factor(yours, numerical)
    if c is not None and abs(c) < NEGLIGIBLE:
        return "yours is ≈ 0 where numerical is not: a missing term, or a parameter not connected in your backprop"
    if c is not None and abs(c) > 1 / NEGLIGIBLE:
        return (
            "numerical is ≈ 0 where yours is not: J (almost) does not depend on these entries; a term in yours J lacks"
        )
    return None


def _transposed(yours: np.ndarray, numerical: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """yours ≈ numerical.T for a square matrix: the shapes agree, so nothing else flags the mistake."""
    n = _grid(numerical, shape)
    if n is None or n.ndim != 2 or shape[0] != shape[1] or np.allclose(n, n.T):
        return None
    return "transposed: yours ≈ numerical.T" if _explains(yours - n.T.ravel(), yours - numerical) else None


def _off_by_one(yours: np.ndarray, numerical: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """yours ≈ numerical moved one step along an axis, the wrapped edge aside: an index off by one.

    Why: a loop or slice that starts one too early or late (``range(1, n)``, ``x[t - 1]`` for ``x[t]``)
    hands every entry its neighbour's gradient; the edge slice holds anything (zero, a wrapped value).
    """
    y, n = _grid(yours, shape), _grid(numerical, shape)
    if y is None or n is None:
        return None
    for axis, length in enumerate(shape):
        if length < 3:  # with two entries "shifted" and "swapped" are the same; the permutation rule says it
            continue
        for step, src in ((1, "i-1"), (-1, "i+1")):
            inner = [slice(None)] * y.ndim
            inner[axis] = slice(1, None) if step == 1 else slice(None, -1)
            moved = np.roll(n, step, axis)
            if _explains((y - moved)[tuple(inner)], (y - n)[tuple(inner)]):
                return (
                    f"off by one along axis {axis}: yours{_at(axis, y.ndim, 'i')} ≈ "
                    f"numerical{_at(axis, y.ndim, src)} (the edge aside): an index, a loop or a window one step off"
                )
    return None


def _reorderings(shape: tuple[int, ...]) -> Iterator[tuple[np.ndarray, str]]:
    """Index maps (yours = numerical.ravel()[map]) for the reorderings code commonly makes, with their words."""
    size = int(np.prod(shape))
    idx = np.arange(size).reshape(shape)
    nd = len(shape)
    for p in itertools.permutations(range(nd)):
        if p == tuple(range(nd)):
            continue
        pshape = tuple(shape[a] for a in p)
        tr = ".T" if nd == 2 else f".transpose{p}"
        order = " (C vs F order)" if p == tuple(reversed(range(nd))) else ""
        yield (
            idx.transpose(p).ravel(),
            f"yours ≈ numerical{tr}.reshape{shape}: a transpose where a reshape was due{order}",
        )
        back = np.arange(size).reshape(pshape).transpose(np.argsort(p)).ravel()
        yield back, f"yours ≈ numerical.reshape{pshape}{tr}: a reshape where a transpose was due{order}"
    axes = [a for a in range(nd) if shape[a] >= 2]
    for r in range(1, len(axes) + 1):
        for sub in itertools.combinations(axes, r):
            what = (
                f"flipped along axes {sub}: e.g. a kernel not flipped between convolution and correlation"
                if r > 1
                else f"reversed along axis {sub[0]}: an index running the wrong way"
            )
            yield np.flip(idx, sub).ravel(), f"yours ≈ numerical {what}"
    for a in axes:
        if shape[a] <= 64:
            for k in range(2, shape[a] - 1):
                yield np.roll(idx, k, a).ravel(), f"yours ≈ np.roll(numerical, {k}, axis={a}): indices shifted by {k}"


def _reordered_slices(yours: np.ndarray, numerical: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """Each slice of yours along an axis is another slice of numerical: rows or classes swapped."""
    y, n = _grid(yours, shape), _grid(numerical, shape)
    if y is None or n is None:
        return None
    for axis, length in enumerate(shape):
        if not 2 <= length <= MAX_SLICES:
            continue
        ys = np.moveaxis(y, axis, 0).reshape(length, -1)
        ns = np.moveaxis(n, axis, 0).reshape(length, -1)
        dist = (ys**2).sum(1)[:, None] + (ns**2).sum(1)[None, :] - 2 * ys @ ns.T
        src = np.argmin(dist, axis=1)
        if np.unique(src).size != length or np.all(src == np.arange(length)):
            continue
        if not _explains(ys - ns[src], ys - ns):
            continue
        moved = [(i, int(j)) for i, j in enumerate(src) if i != j]
        one, many = _noun(axis, y.ndim)
        if len(moved) == 2:
            (i, j), _ = moved
            return f"entries permuted: {many} {i} and {j} (axis {axis}) swapped"
        pairs = ", ".join(
            f"yours{_at(axis, y.ndim, str(i))} ≈ numerical{_at(axis, y.ndim, str(j))}" for i, j in moved[:3]
        )
        return f"entries permuted: the {many} along axis {axis} reordered ({pairs}{', …' if len(moved) > 3 else ''})"
    return None


def _permuted(yours: np.ndarray, numerical: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """yours holds numerical's values in another order: a reshape/transpose order, a flip, swapped slices.

    Why: the values are right but land on the wrong entries. Named reorderings are tried first; any other
    permutation is reported only when the sorted values agree far more closely than unrelated arrays can.
    """
    diff = yours - numerical
    gap = float(np.linalg.norm(np.sort(yours) - np.sort(numerical)))
    if yours.size < 2 or gap > FIT * float(np.linalg.norm(diff)):
        return None
    if _grid(yours, shape) is not None:
        for perm, words in _reorderings(shape):
            if _explains(yours - numerical[perm], diff):
                return "entries permuted: " + words
        found = _reordered_slices(yours, numerical, shape)
        if found:
            return found
    if yours.size >= 3 and gap <= SORTED * float(np.linalg.norm(diff)):
        return "entries permuted: yours has numerical's values in another order (wrong indexing or reshaping)"
    return None


def _looks_like_bias(shape: tuple[int, ...], path: str) -> bool:
    """A bias is a vector, an (n, 1) column, or named b/bias: an L2 term rarely belongs on one."""
    names = re.findall(r"[A-Za-z_][A-Za-z0-9_]*", path)
    last = names[-1].lower() if names else ""
    named = re.fullmatch(r"(b|bias|beta)\d*|.*_(b|bias)\d*", last) is not None
    return named or len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)


def _structure(g: np.ndarray, shape: tuple[int, ...]) -> tuple[int, int]:
    """How far g is from a generic array: (missing rank for a matrix, absent entries).

    Why: a data term's gradient is often simpler than a weight matrix (rank at most the batch size for
    a dense layer; zero rows for unused embeddings or dead units), so the reading of an L2 mistake that
    leaves the simpler data term is the one that happened.
    """
    scale = float(np.max(np.abs(g))) if g.size else 0.0
    if scale == 0:
        return 0, g.size
    absent = int(np.sum(np.abs(g) <= ABSENT * scale))
    m = _grid(g, shape)
    if m is None or m.ndim != 2 or min(m.shape) < 2 or m.size > MAX_ENTRIES:
        return 0, absent
    s = np.linalg.svd(m, compute_uv=False)
    return int(np.sum(s <= ABSENT * s[0])), absent


def _which_reading(
    numerical: np.ndarray, theta: np.ndarray, shape: tuple[int, ...], t1: float, t2: float
) -> int | None:
    """0 or 1: which of numerical = data + t·parameter leaves the simpler data term; None if neither.

    A missing singular value is strong evidence (a generic matrix almost never has one); absent entries
    count only in numbers that chance does not produce (``EVIDENCE``), against a tenth as many.
    """
    (r1, z1), (r2, z2) = _structure(numerical - t1 * theta, shape), _structure(numerical - t2 * theta, shape)
    if min(r1, r2) == 0 < max(r1, r2):
        return int(r2 > r1)
    need = max(2, int(EVIDENCE * numerical.size))
    if max(z1, z2) < need or 10 * min(z1, z2) > max(z1, z2):
        return None
    return int(z2 > z1)


def _l2_term(
    yours: np.ndarray, numerical: np.ndarray, theta: np.ndarray, shape: tuple[int, ...], path: str
) -> str | None:
    """yours - numerical ≈ λ × parameter: an L2 term missing, halved, doubled, or where none belongs.

    Why: only the cost knows how much L2 it has, and the arrays show only the difference. With λ < 0,
    either yours lacks the term (numerical = data + |λ|·W) or has half of it (data + 2|λ|·W, yours |λ|·W:
    d/dW of λ‖W‖² is 2λW). With λ > 0, either the cost has none (e.g. on a bias) or yours counts it twice.
    The reading whose data term is simpler (``_structure``) wins; when neither is, both are said.
    """
    diff = yours - numerical
    tt = float(theta @ theta)
    if tt == 0:
        return None
    lam = float(diff @ theta) / tt
    if not _explains(diff - lam * theta, diff):
        return None
    head = f"yours - numerical ≈ {lam:.3g} × parameter: "
    a = abs(lam)
    if lam < 0:
        missing = f"a missing L2 term (λ/m ≈ {a:.3g})"
        half = (
            "half the L2 term's gradient (d/dW of λ‖W‖² is 2λW): yours {} "
            + f"{a:.3g} × parameter where {2 * a:.3g} × is due"
        )
        pick = _which_reading(numerical, theta, shape, a, 2 * a)
        if pick == 0:
            return head + missing
        if pick == 1:
            return (
                head + half.format("has") + " (numerical less that term is a simpler array: lower rank or more zeros)"
            )
        return head + f"{missing}, or {half.format('would have')}; the arrays alone cannot tell which"
    extra = f"an extra L2 term (λ/m ≈ {a:.3g})"
    if _looks_like_bias(shape, path):
        return head + extra + ", e.g. on a bias"
    twice = "the L2 term's gradient counted twice: yours {} " + f"{2 * a:.3g} × parameter where {a:.3g} × is due"
    pick = _which_reading(numerical, theta, shape, 0.0, a)
    if pick == 0:
        return head + extra + " that the cost does not have"
    if pick == 1:
        return head + twice.format("has")
    return (
        head
        + f"{extra} that the cost does not have, or {twice.format('would have')}; the arrays alone cannot tell which"
    )


def _constant_along(yours: np.ndarray, numerical: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """yours does not vary along an axis where numerical does: a reduction over the wrong axis.

    Why: ``sum``/``mean`` with the wrong ``axis`` (or ``keepdims``) then broadcast back gives one value
    per slice; when that value is numerical's mean or sum along the axis, say which.
    """
    y, n = _grid(yours, shape), _grid(numerical, shape)
    if y is None or n is None:
        return None
    diff = y - n
    for axis, length in enumerate(shape):
        if length < 2:
            continue
        spread_n = float(np.linalg.norm(n - n.mean(axis, keepdims=True)))
        spread_y = float(np.linalg.norm(y - y.mean(axis, keepdims=True)))
        if spread_n == 0 or spread_y > FIT * spread_n:
            continue
        head = f"yours is constant along axis {axis} where numerical varies"
        for name, ref in (("mean", n.mean(axis, keepdims=True)), ("sum", n.sum(axis, keepdims=True))):
            if _explains(y - ref, diff):
                return f"{head}, ≈ the {name} of numerical along it: a {name} over the wrong axis, broadcast back"
        # Without that exact match, only say so where numerical's variation is a real part of the
        # discrepancy (a sum of a nearly constant numerical is matched above, not guessed here).
        if spread_n >= 0.25 * float(np.linalg.norm(diff)):
            return f"{head}: a sum or mean over the wrong axis, or a reduced value broadcast back"
    return None


def _where(mask: np.ndarray, fill: float) -> str | None:
    """Words for a structured set of entries: whole rows/columns, a triangle, a block, a border, a range.

    ``fill`` is the fraction of a named region that must be in the set (1 for exact zero patterns).
    """
    nd = mask.ndim
    total = int(mask.sum())
    if nd >= 2:
        for axis in range(nd):
            if mask.shape[axis] < 2:
                continue
            hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(nd) if a != axis)))
            if hit.size < mask.shape[axis] and total >= fill * hit.size * (mask.size // mask.shape[axis]):
                one, many = _noun(axis, nd)
                return f"{one if hit.size == 1 else many} {_list(hit)}" + (f" (axis {axis})" if nd > 2 else "")
        if mask.shape[-1] == mask.shape[-2]:
            tri = np.ones(mask.shape[-2:], bool)
            for k, words in (
                (1, "the upper triangle above the diagonal"),
                (-1, "the lower triangle below the diagonal"),
            ):
                part = np.triu(tri, k) if k > 0 else np.tril(tri, k)
                if np.array_equal(mask, np.broadcast_to(part, mask.shape)):
                    return words
    box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(mask))
    if total >= fill * mask[box].size and mask[box].size < mask.size:
        text = ", ".join(":" if (s.start, s.stop) == (0, n) else f"{s.start}:{s.stop}" for s, n in zip(box, mask.shape))
        return f"the block [{text}]"
    inside = ~mask
    if inside.any():
        box = tuple(slice(int(i.min()), int(i.max()) + 1) for i in np.nonzero(inside))
        # A border surrounds its inside: the inner block stays off the edges of every longer axis.
        framed = [0 < s.start and s.stop < n for s, n in zip(box, mask.shape) if n >= 3]
        if framed and all(framed) and inside.sum() == inside[box].size:
            text = ", ".join(f"{s.start}:{s.stop}" for s in box)
            return f"the border outside [{text}], e.g. padding"
    return None


def _zero_pattern(yours: np.ndarray, numerical: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """yours and numerical are zero on different entries and agree elsewhere: a mask on one side only.

    Why: where the cost ignores an entry (padding, a causal mask, a dropped unit), numerical is exactly
    zero; a backprop that forgets the mask is not. A backprop that masks what the cost does not is zero
    where numerical is not.
    """
    scale = max(float(np.max(np.abs(numerical))), float(np.max(np.abs(yours))))
    zy, zn = np.abs(yours) <= ZERO * scale, np.abs(numerical) <= ZERO * scale
    only_y, only_n = zy & ~zn, zn & ~zy
    off = only_y | only_n
    diff = yours - numerical
    if not off.any() or off.all() or not _explains(np.where(off, 0.0, diff), diff):
        return None

    def place(m: np.ndarray) -> str:
        grid = _grid(m, shape)
        where = _where(grid, 1.0) if grid is not None else None
        return f" ({where})" if where else ""

    if not only_y.any():
        k = int(only_n.sum())
        return (
            f"yours is not zero on {_count(k, 'entry', 'entries')} where numerical is{place(only_n)}, and right "
            "elsewhere: a forgotten mask (the cost ignores those entries: padding, a causal or attention mask)"
        )
    if not only_n.any():
        k = int(only_y.sum())
        return (
            f"yours is zero on {_count(k, 'entry', 'entries')} where numerical is not{place(only_y)}, and right "
            "elsewhere: a mask your gradient applies that the cost does not (or a term missing there)"
        )
    return (
        f"yours and numerical are zero on different entries ({int(off.sum())} of {off.size}), and agree elsewhere: "
        "a mask with another pattern than the cost's (e.g. dropout from another key, a ReLU mask from the wrong input)"
    )


def _confined(yours: np.ndarray, numerical: np.ndarray, shape: tuple[int, ...]) -> str | None:
    """The discrepancy sits in whole rows/columns, one block or the border, and nowhere else.

    Why: a window, a stride, padding or a mask handled wrong spoils a structured region and leaves the
    rest right; naming the region points at the loop that produced it.
    """
    diff = yours - numerical
    d = _grid(np.abs(diff), shape)
    if d is None or d.max() == 0:
        return None
    part = d > PART * d.max()
    k = int(part.sum())
    if k < 2 or k > part.size // 2 or not _explains(np.where(part.ravel(), 0.0, diff), diff):
        return None
    where = _where(part, 0.75)
    if where is None:
        return None
    return (
        f"wrong only in {where} ({k} of {part.size} entries), right elsewhere: "
        "a window, a stride, padding or a mask handled wrong there"
    )


def _isolated(size: int, n_failed: int) -> str | None:
    """A few scattered entries fail: an indexing slip, not a systematic mistake."""
    if 1 <= n_failed and size >= 10 * n_failed and n_failed <= max(3, size // 100):
        return f"{_count(n_failed, 'isolated entry is', 'isolated entries are')} wrong; see the worst entries"
    return None


def describe_leaf(
    yours: np.ndarray,
    numerical: np.ndarray,
    theta: np.ndarray,
    shape: tuple[int, ...],
    n_failed: int,
    *,
    path: str = "",
) -> str | None:
    """Plain words for what a failing leaf's discrepancy looks like, or None if no rule fits.

    The rules run from the most specific model to the most general, and the first that explains the
    discrepancy almost entirely speaks: NaN/Inf; all zero; a constant factor or sign; a transpose; an
    index off by one; permuted entries; a term ∝ the parameter (L2); constant along an axis; one side
    ≈ 0; a mask on one side only; a confined region; a few isolated entries.

    Args:
      yours: your gradient for the leaf's checked entries (flat, float64).
      numerical: the finite-difference gradient for the same entries.
      theta: the parameter values at those entries.
      shape: the leaf's shape when every entry was checked (enables the rules that need the layout), else ().
      n_failed: how many of these entries failed.
      path: the leaf's path (e.g. ``layers[0].b``), used to tell a bias from a weight.

    Returns:
      One description, or None when no model explains the discrepancy.
    """
    if not np.all(np.isfinite(yours)):
        return "yours has NaN/Inf entries"
    if yours.size == 0 or float(np.linalg.norm(yours - numerical)) == 0:
        return None
    nz = numerical != 0
    if np.any(nz) and np.all(yours[nz] == 0):
        return "yours is zero where numerical is not: a missing term, or a parameter not connected in your backprop"
    rules: list[Callable[[], str | None]] = [
        lambda: _factor(yours, numerical),
        lambda: _transposed(yours, numerical, shape),
        lambda: _off_by_one(yours, numerical, shape),
        lambda: _permuted(yours, numerical, shape),
        lambda: _l2_term(yours, numerical, theta, shape, path),
        lambda: _constant_along(yours, numerical, shape),
        lambda: _negligible(yours, numerical),
        lambda: _zero_pattern(yours, numerical, shape),
        lambda: _confined(yours, numerical, shape),
        lambda: _isolated(yours.size, n_failed),
    ]
    for rule in rules:
        found = rule()
        if found:
            return found
    return None


def common_factor(factors: list[float | None], batch_sizes: tuple[int, ...]) -> str | None:
    """A finding across leaves: every leaf off by one common factor, e.g. a missing 1/m.

    ``batch_sizes`` are the counts the cost averages over (``problem.averaged_counts``): only those
    are called "the batch size m", and a factor that is m over another whole number k is a mean
    over k entries where the cost takes it over m.
    """
    if len(factors) < 2 or any(f is None for f in factors):
        return None
    fs = np.asarray(factors, dtype=np.float64)
    c = float(np.median(fs))
    # A factor of 0 is yours ≈ 0 everywhere: each leaf's own reading says so (no ratio to name).
    if c == 0 or not math.isfinite(c) or abs(c - 1) < NEAR or not np.all(np.abs(fs - c) <= NEAR * abs(c)):
        return None
    msg = f"every leaf is off by one common factor: yours ≈ {c:.4g} × numerical"
    for m in batch_sizes:
        if m > 1 and abs(c - m) <= NEAR * m:
            return msg + f", equal to the batch size m = {m}: a missing 1/m in your gradient (or an extra m)"
        if m > 1 and abs(c * m - 1) <= NEAR:
            return msg + f", 1/m with batch size m = {m}: your gradient divides by m twice, or the cost misses 1/m"
    for m in batch_sizes:
        k = m / c
        if c > 1 and k > 1 and abs(k - round(k)) <= NEAR * k:
            return msg + (
                f": the cost averages over m = {m} entries, your gradient divides by {round(k)} (a mean over "
                f"one axis where the cost's is over all {m}?)"
            )
    return msg + ": a scale factor applied to the whole gradient"
