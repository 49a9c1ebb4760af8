"""Assembling the report: per-leaf rows, the worst entries, kinks, diagnosis, warnings."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np

from jgradcheck._src import diagnose, numerics, precision
from jgradcheck._src.engine import Engine
from jgradcheck._src.estimate import Coords
from jgradcheck._src.report import Entry, GradCheckReport, Grade, LeafReport, LeafValues


def _entries(path: str, shape, c: Coords, g: np.ndarray, which: Sequence[int] | np.ndarray) -> list[Entry]:
    out = []
    for j in which:
        index = tuple(int(i) for i in np.unravel_index(int(c.idx[j]), shape)) if shape else ()
        out.append(
            Entry(
                path,
                index,
                float(g[j]),
                float(c.numerical[j]),
                float(c.tol[j]),
                str(c.status[j]),
                float(c.left[j]),
                float(c.right[j]),
                str(c.how[j]) if c.how.size else "",
            )
        )
    return out


def leaf_devs(engine: Engine) -> tuple[str, ...]:
    return tuple(f"{d.platform}:{d.id}" for d in engine.devices)


def _scale(numerical: np.ndarray) -> float:
    """A leaf's gradient scale: the root-mean-square of its numerical gradient."""
    return float(np.sqrt(np.mean(numerical**2))) if numerical.size else 0.0


def _directional(res) -> float:
    """A screened leaf's scale: the root-mean-square of its directional derivatives, yours or numerical."""
    return max(_scale(np.asarray(res.dir_numerical)), _scale(np.asarray(res.dir_yours)))


def _screened_zero(res) -> bool:
    """Whether a screened leaf's directional derivatives, yours and numerical, are within their error bounds of 0."""
    return res.dir_tol is not None and res.dir_tol.size > 0 and _directional(res) <= float(np.max(res.dir_tol))


def _entry_scale(res, theta: np.ndarray) -> float:
    """A screened leaf's gradient scale per entry: its directions are ±max(1, |θ|)/√size per entry,
    so a directional derivative is about the entries' scale times the rms of max(1, |θ|). A leaf
    that is 0 within its bounds counts for nothing."""
    if res.dir_numerical is None or _screened_zero(res):
        return 0.0
    weight = float(np.sqrt(np.mean(np.maximum(1.0, np.abs(np.asarray(theta, np.float64))) ** 2))) or 1.0
    return _directional(res) / weight


def _advice(causes: set[str], problem, opts, leaf: int | None = None) -> str:
    """What to do about an unresolved leaf, from what limited its error estimate: the cost's
    narrowest float on the leaf's path to J where it is narrower than the check's."""
    tips = []
    narrow = None
    if leaf is not None:
        try:
            narrow = precision.path_precision(problem).where[leaf]
        except Exception:  # reading the jaxpr is advice only: never fail a report over it
            narrow = None
    if "rounding" in causes:  # first: it explains the others where J sits at an exact minimum
        tips.append(
            "yours and the numerical gradient are both at the rounding level of the terms they sum here "
            "(J at an exact minimum, e.g. trained to zero loss, where every residual is 0): check at "
            "another point too, at initialization or before training converges"
        )
    if "noise" in causes or "section" in causes:
        if narrow:
            wider = "float64" if narrow.startswith("float32") else "float32 or wider"
            tips.append(
                f"J is computed in {narrow} on this leaf's path, so its values are rounded to that "
                f"precision whatever x64 says: compute that section in {wider} to check it finely"
            )
        elif "off" in problem.precision:
            tips.append("check in float64 (x64=True, the default), unless a warning below says why it could not run")
        else:
            tips.append(
                "J's round-off noise is large against this gradient: a larger batch or a cost in float64 throughout"
            )
    if "truncation" in causes:
        tips.append(
            "the steps did not converge (J steep or not smooth here): "
            + (
                "try the default step (eps=None)"
                if opts.eps is not None
                else "try another step (eps=...) or method='richardson'"
            )
        )
    if "nan" in causes:
        tips.append("J is NaN/Inf at every step tried around these entries")
    return "; ".join(tips)


def build_report(
    problem, grads, per_leaf, warnings, slopes, opts, mode_note, engine, top_k, seconds
) -> GradCheckReport:
    rows: list[LeafReport] = []
    all_entries: list[tuple] = []
    kinks: list[Entry] = []
    factors: list[float | None] = []
    ys_parts: list[np.ndarray] = []
    ns_parts: list[np.ndarray] = []
    values: list[LeafValues | None] = []  # every compared entry, for report.plot()
    # The whole gradient's scale: the fallback for a leaf whose numerical gradient is all zeros.
    pooled = [
        r.coords.numerical[np.isfinite(r.coords.numerical) & (r.coords.status != "kink")]
        for r in per_leaf
        if r.coords is not None
    ]
    pooled_yours = [
        grads[i][r.coords.idx][np.isfinite(r.coords.numerical) & (r.coords.status != "kink")]
        for i, r in enumerate(per_leaf)
        if r.coords is not None
    ]
    global_scale = max(
        _scale(np.concatenate(pooled)) if pooled else 0.0,
        _scale(np.concatenate(pooled_yours)) if pooled_yours else 0.0,
        *(_entry_scale(r, problem.host(i)) for i, r in enumerate(per_leaf) if r.coords is None),
    )
    for i, (path, f) in enumerate(zip(problem.paths, problem.floats)):
        res = per_leaf[i]
        shape = tuple(f.shape)
        g = grads[i]
        slope = None if slopes is None else slopes[i]
        if res.coords is None:  # screened and passed: directions only
            ys_parts.append(res.dir_yours)
            ns_parts.append(res.dir_numerical)
            resolution = res.resolution
            # As for entries (below): directional derivatives that are 0 to within their bounds, yours
            # and numerical alike (a key bias under softmax: exactly 0), are judged against the other
            # leaves' scale per entry.
            zero = _screened_zero(res)
            if zero and global_scale > 0:
                resolution = float(np.median(res.dir_tol)) / global_scale
            blind = not resolution <= numerics.RESOLUTION_BOUND
            rows.append(
                LeafReport(
                    path,
                    shape,
                    problem.orig_dtypes[i],
                    res.difference,
                    passed=not blind,
                    checked=res.n_dirs,
                    how="screened",
                    n_failed=0,
                    n_kinks=0,
                    worst=None,
                    resolution=resolution,
                    taylor_slope=slope,
                    status="inconclusive" if blind else "ok",
                    note=(
                        f"its random directions were compared to within {numerics.percent(resolution)} "
                        f"only: {_advice({'noise'}, problem, opts)}"
                    )
                    if blind
                    else (
                        f"its gradient along random directions (about {_directional(res):.1e}) is within its "
                        f"error bound ({float(np.max(res.dir_tol)):.1e}): judged against the scale of the other leaves"
                    )
                    if zero and global_scale > 0
                    else None,
                    zero=zero,
                )
            )
            factors.append(None)
            values.append(None)
            continue
        c = dataclasses.replace(res.coords, status=res.coords.status.copy())
        gi = g[c.idx]
        values.append(
            LeafValues(
                np.asarray(c.idx, np.int64).copy(),
                np.asarray(gi, np.float64).copy(),
                np.asarray(c.numerical, np.float64).copy(),
                np.asarray(c.tol, np.float64).copy(),
                problem.host(i).astype(np.float64)[c.idx],
                np.asarray(c.status).astype(str),
            )
        )
        finite = np.isfinite(c.numerical)
        kink = c.status == "kink"
        compared = finite & ~kink & (c.status != "nan")  # kinks are judged by their slopes
        ys_parts.append(gi[compared])
        ns_parts.append(c.numerical[compared])
        # The leaf's gradient scale, from both sides: a numerical gradient of 0 (every difference
        # lost in J's rounding) is judged against yours, never waved through.
        scale = max(_scale(c.numerical[compared]), _scale(gi[compared])) or global_scale
        # Every entry that passed must have been compared finely enough to see a 1% error.
        fd = c.fd_tol if c.fd_tol.size else c.tol
        # A derivative that is 0 to within what the differences resolve, yours and numerical alike
        # (tanh'' at 0: exactly 0 against round-off), has no scale of its own to be relative to: it
        # is judged against the scale of the other derivatives in the check.
        # (The leaf's own scale, yours and numerical alike, is below its largest error bound: after
        # training, a saturated layer's weights next to a bias of gradient ~1.)
        own = max(_scale(c.numerical[compared]), _scale(gi[compared]))
        # Not where a measured rounding (an exact minimum, a narrow section: estimate.check_entries)
        # set the bound: that leaf's gradient is not 0, it is not resolved.
        measured = c.cause.size > 0 and bool(np.isin(c.cause[compared], ("rounding", "section")).any())
        zero = bool(compared.any()) and own <= float(np.max(fd[compared])) and not measured
        if zero:
            scale = max(scale, global_scale)
        unresolved = (c.status == "ok") & ~(fd <= numerics.RESOLUTION_BOUND * scale)
        if scale == 0:  # every derivative, yours and numerical, is exactly 0 everywhere: nothing to be relative to
            unresolved[:] = False
        judged = np.flatnonzero(c.status == "ok")
        if judged.size == 0:
            judged = np.flatnonzero(compared)
        resolution = (
            float(np.max(fd[judged])) / scale if judged.size and scale > 0 else (0.0 if judged.size else math.nan)
        )
        causes = {str(x) for x in (c.cause[unresolved] if c.cause.size else [])}
        unverifiable = np.flatnonzero(c.status == "nan")
        if unverifiable.size:
            causes.add("nan")
        c.status[unresolved] = "inconclusive"
        fails = np.flatnonzero(c.status == "fail")
        kink_idx = np.flatnonzero(kink | (c.how == "kink nearby") if c.how.size else kink)
        # How far outside its tolerance each entry is: kinks rank last, unverifiable first.
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            ratio = np.abs(gi - c.numerical) / np.where(c.tol > 0, c.tol, np.inf)
        ratio = np.nan_to_num(ratio, nan=np.inf, posinf=np.inf)
        ratio[kink] = -1.0
        worst_j = int(np.argmax(ratio)) if ratio.size and ratio.max() >= 0 else None
        leaf_worst = _entries(path, shape, c, gi, [worst_j])[0] if worst_j is not None else None
        all_entries.append((ratio, path, shape, c, gi))
        kinks += _entries(path, shape, c, gi, kink_idx)
        failed = fails.size > 0 or res.extra_failures > 0
        status = "fail" if failed else ("inconclusive" if unresolved.any() or unverifiable.size else "ok")
        passed = status == "ok"
        diag = None
        fac = None
        if failed:
            full = c.idx.size == f.size
            theta = problem.host(i).astype(np.float64)[c.idx]
            sel = compared
            n_bad = int(np.sum(c.status[sel] == "fail"))
            if n_bad:
                diag = diagnose.describe_leaf(
                    gi[sel], c.numerical[sel], theta[sel], shape if full else (), n_bad, path=path
                )
                fac = diagnose.fitted_factor(gi[sel], c.numerical[sel])
            if res.note:
                diag = (diag + "; " if diag else "") + res.note
        notes = []
        if unverifiable.size:
            notes.append(
                f"J is NaN/Inf at θ ± h and at every smaller step for {numerics.plural(int(unverifiable.size), 'entry', 'entries')}: "
                "they could not be checked"
            )
        if zero and status == "ok" and scale > own:
            notes.append(
                f"its gradient (about {own:.1e}) is within its error bound ({float(np.max(fd[compared])):.1e}): "
                "judged against the scale of the other leaves"
            )
        if status == "inconclusive" and unresolved.any():
            notes.append(
                f"{numerics.plural(int(unresolved.sum()), 'entry', 'entries')} "
                f"{'agrees' if unresolved.sum() == 1 else 'agree'} only to within "
                f"{numerics.percent(resolution)} of its gradient: {_advice(causes, problem, opts, i)}"
            )
        if c.how.size:
            n_small = int(np.sum(c.how == "smaller step"))
            n_side = int(np.sum(c.how == "one-sided"))
            n_near = int(np.sum(c.how == "kink nearby"))
            if n_side:
                notes.append(
                    f"{numerics.plural(n_side, 'entry', 'entries')} at a domain edge (J is NaN/Inf on one side of θ ± h): "
                    "judged with one-sided differences"
                )
            if n_small:
                sel_small = c.how == "smaller step"
                notes.append(
                    f"{numerics.plural(n_small, 'entry', 'entries')} judged with smaller steps "
                    f"(down to {float(np.min(c.step[sel_small])):.2g}: J steep, or NaN/Inf at θ ± h)"
                )
            if n_near:
                notes.append(
                    f"{numerics.plural(n_near, 'entry', 'entries')} with a kink closer to θ than the step: "
                    "judged with steps that stay on one side of it"
                )
        user = opts.atol + opts.rtol * np.abs(c.numerical[compared])
        if scale > 0 and user.size and float(np.max(user)) > numerics.RESOLUTION_BOUND * scale:
            warnings.append(
                f"{path}: your atol/rtol allow errors up to {numerics.percent(float(np.max(user)) / scale)} "
                "of its gradient (your choice: the pass does not see errors below that)."
            )
        factors.append(fac if failed else None)
        rows.append(
            LeafReport(
                path,
                shape,
                problem.orig_dtypes[i],
                numerics.relative_difference(c.numerical[compared], gi[compared]),
                passed,
                int(c.idx.size),
                res.how,
                int(fails.size) + res.extra_failures,
                int(np.sum(kink)),
                leaf_worst,
                resolution,
                diag,
                slope,
                status=status,
                n_unresolved=int(unresolved.sum()) + int(unverifiable.size),
                note="; ".join(notes) or None,
                scale=scale,
                zero=zero and not unverifiable.size,
            )
        )
    # The classic relative difference over everything compared: entries, and screened leaves' directions.
    ys = np.concatenate(ys_parts) if ys_parts else np.zeros(0)
    ns = np.concatenate(ns_parts) if ns_parts else np.zeros(0)
    difference = numerics.relative_difference(ns, ys)
    if not np.all(np.isfinite(ys)):
        difference = math.nan
    # k worst entries over all of θ, ranked by how far outside their tolerance they are.
    cand = []
    for ratio, path, shape, c, gi in all_entries:
        top = [j for j in np.argsort(-ratio)[:top_k] if ratio[j] >= 0]
        cand += [(float(ratio[j]), e) for j, e in zip(top, _entries(path, shape, c, gi, top))]
    cand.sort(key=lambda t: -t[0])
    worst = tuple(e for _, e in cand[:top_k])
    passed = all(r.passed for r in rows)
    failing = [f for f, r in zip(factors, rows) if r.status == "fail"]
    cross = diagnose.common_factor(failing, problem.batch_sizes) if len(failing) == len(rows) else None
    return GradCheckReport(
        passed,
        difference,
        Grade.of(difference),
        tuple(rows),
        worst,
        tuple(kinks),
        cross,
        tuple(warnings),
        problem.precision,
        opts.method if opts.eps is None else f"{opts.method} (eps = {opts.eps:g})",
        mode_note,
        engine.evaluations,
        leaf_devs(engine),
        seconds,
        evaluated=engine.describe(problem.paths),
        entry_values=tuple(values),
    )
