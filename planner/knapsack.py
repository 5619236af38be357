"""Exact multiple-choice knapsack: pick one option per item, total size <= capacity, least total error.

Method (Pisinger-style core solution with Lagrangian reduced-cost fixing):
 1. Items with identical option arrays form one class (a model repeats each tensor shape per layer).
    Per class keep the Pareto options (no smaller-and-better option exists), then their lower convex
    hull. Sorting every hull step by efficiency (error saved per byte) and taking a prefix gives the
    LP optimum; its first step that no longer fits sets the multiplier lambda.
 2. L(lambda) = sum_j min_o(e_jo + lambda s_jo) - lambda C is a lower bound of the optimum; the LP
    prefix, topped up greedily with the bytes left, is a feasible upper bound (the incumbent).
 3. Any solution x has error(x) = L(lambda) + sum_j r_j(x_j) + lambda * (unused bytes), with
    reduced costs r_jo = e_jo + lambda s_jo - min_o(e_jo + lambda s_jo) >= 0; so a solution with
    error <= B uses no option (and no class composition) whose reduced cost exceeds B - L. For small
    B most classes keep a single option.
 4. The classes left open are solved exactly by a dominance DP over (size, error) states. A class
    of c identical members is one DP group whose options are the Pareto set of its compositions
    (members per option; members are interchangeable, so only the counts matter). A state is dropped
    when its error plus the LP relaxation of the groups not yet in it exceeds B. Two such DPs grow
    from the narrow and from the wide groups and meet in the middle. Rounding the LP of the
    remaining groups down gives every state a feasible completion, which can improve the incumbent
    (and so lower B) while the DP runs.
 5. The budget B starts at a fraction of the gap and doubles until it reaches the incumbent: a
    search that finds no solution within B proves the optimum exceeds B; one whose B reached the
    incumbent proves the incumbent optimal. `lower_bound` reports L(lambda).
The supported Pareto curve falls out of step 1: every prefix of the sorted hull steps is optimal for
a capacity equal to its own size.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

MAX_CORE_STATES = 2_000_000   # a dominance list beyond this stops the exact phase (never seen in practice)


@dataclass(frozen=True)
class Solution:
    choice: np.ndarray       # option index per item (into the caller's arrays)
    size: int
    error: float
    lower_bound: float       # L(lambda): no solution within the capacity has less error
    exact: bool              # proven optimal (False only if the core DP hit MAX_CORE_STATES)


@dataclass(frozen=True)
class Curve:
    """Supported Pareto points: sizes[k] bytes buy the least possible error errors[k]."""

    sizes: np.ndarray
    errors: np.ndarray
    choices: np.ndarray      # (points, items) option index per item, only if asked for


# ---------------------------------------------------------------------------------------------
# Preparation: classes of identical items, Pareto options and convex hulls (vectorized over rows)


@dataclass
class _Prepared:
    cls: np.ndarray            # (items,) class id: items with identical options share one
    by_class: np.ndarray       # item ids sorted by class (ascending within a class)
    start: np.ndarray          # (classes,) where each class begins in by_class
    count: np.ndarray          # (classes,) members per class
    idx: np.ndarray            # (classes, w) caller's index of each Pareto option (by size), -1 if absent
    s: np.ndarray              # (classes, w) sizes of the Pareto options (0 where absent)
    e: np.ndarray              # (classes, w) errors of the Pareto options (inf where absent)
    hull: np.ndarray           # (classes, w) option lies on the lower convex hull

    def members(self, k: int) -> np.ndarray:
        """Item ids of class k, ascending."""
        return self.by_class[self.start[k]:self.start[k] + self.count[k]]


def _padded(rows: Sequence, dtype, fill) -> np.ndarray:
    """The rows as one (items, options) array, short rows padded with fill."""
    rows = [np.asarray(r, dtype=dtype).ravel() for r in rows]
    width = max(len(r) for r in rows)
    if all(len(r) == width for r in rows):
        return np.array(rows, dtype=dtype).reshape(len(rows), width)
    out = np.full((len(rows), width), fill, dtype=dtype)
    for j, r in enumerate(rows):
        out[j, :len(r)] = r
    return out


def _left(mask: np.ndarray, *arrays: np.ndarray) -> list[np.ndarray]:
    """Per row, move the entries where mask is set to the front (keeping their order)."""
    order = np.argsort(~mask, axis=1, kind="stable")
    return [np.take_along_axis(a, order, axis=1) for a in arrays]


def _hull_mask(s: np.ndarray, e: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Per row, which valid points (sizes rising, errors falling) are vertices of the lower hull.

    Gift wrapping from the smallest point, all rows at once: the next vertex is the later point
    of least slope (the farthest among equal slopes, so points on a hull edge are not vertices)."""
    rows, w = s.shape
    sf = s.astype(np.float64)
    ef = np.where(valid, e, 0.0)
    col = np.arange(w)
    mask = np.zeros((rows, w), dtype=bool)
    rr = np.flatnonzero(valid.any(axis=1))
    cur = np.argmax(valid[rr], axis=1)
    mask[rr, cur] = True
    while len(rr):
        later = valid[rr] & (col > cur[:, None])
        with np.errstate(divide="ignore", invalid="ignore"):
            slope = (ef[rr] - ef[rr, cur][:, None]) / (sf[rr] - sf[rr, cur][:, None])
        slope = np.where(later, slope, np.inf)
        least = slope.min(axis=1)
        go = least < np.inf
        rr, cur, slope, least = rr[go], cur[go], slope[go], least[go]
        cur = w - 1 - np.argmax((slope == least[:, None])[:, ::-1], axis=1)
        mask[rr, cur] = True
    return _strictly_convex(s, e, mask)


def _strictly_convex(s: np.ndarray, e: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Drop hull vertices whose two steps do not have strictly falling efficiency as computed
    (error saved / bytes, the formula every later use applies): with nearly collinear points,
    rounding could otherwise order a class's steps out of rank, and a prefix of the sorted steps
    would no longer be a consistent assignment."""
    while True:
        hpos, = _left(mask, np.broadcast_to(np.arange(s.shape[1]), s.shape))
        nh = mask.sum(axis=1)
        r = np.arange(len(s))[:, None]
        with np.errstate(divide="ignore", invalid="ignore"):
            eff = (e[r, hpos[:, :-1]] - e[r, hpos[:, 1:]]) / (s[r, hpos[:, 1:]] - s[r, hpos[:, :-1]])
        inner = np.arange(1, s.shape[1] - 1) < (nh - 1)[:, None]       # vertex t has steps t-1, t
        bad = inner & ~(eff[:, :-1] > eff[:, 1:])
        if not bad.any():
            return mask
        i, t = np.nonzero(bad)
        mask = mask.copy()
        mask[i, hpos[i, t + 1]] = False


def _classes(S: np.ndarray, E: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Class id per row (rows with identical sizes and errors share one) and a row of each class."""
    keys = np.ascontiguousarray(np.concatenate([S, E.view(np.int64)], axis=1))
    raw, width = keys.tobytes(), keys.shape[1] * 8
    ids: dict[bytes, int] = {}
    cls = np.array([ids.setdefault(raw[j * width:(j + 1) * width], len(ids)) for j in range(len(S))],
                   dtype=np.int64)
    first = np.zeros(len(ids), dtype=np.int64)
    first[cls[::-1]] = np.arange(len(S) - 1, -1, -1)      # the lowest row of each class
    return cls, first


def _prepare(sizes: Sequence[np.ndarray], errors: Sequence[np.ndarray]) -> _Prepared:
    """Classes of identical items, each with its Pareto options sorted by size and their hull."""
    S = _padded(sizes, np.int64, 0)
    E = _padded(errors, np.float64, np.inf)
    E = np.where(np.isnan(E), np.inf, E)                  # padding (and NaN) is never Pareto
    cls, first = _classes(S, E)
    S, E = S[first], E[first]
    order = np.lexsort((E, S), axis=-1)
    S, E = np.take_along_axis(S, order, axis=1), np.take_along_axis(E, order, axis=1)
    best = np.minimum.accumulate(E, axis=1)
    pareto = np.concatenate([E[:, :1] < np.inf, E[:, 1:] < best[:, :-1]], axis=1)
    idx, S, E = _left(pareto, order, S, E)
    width = int(pareto.sum(axis=1).max())
    valid = np.arange(width) < pareto.sum(axis=1)[:, None]
    idx = np.where(valid, idx[:, :width], -1)
    S, E = np.where(valid, S[:, :width], 0), np.where(valid, E[:, :width], np.inf)
    count = np.bincount(cls, minlength=len(first))
    return _Prepared(cls, np.argsort(cls, kind="stable"), np.cumsum(count) - count, count, idx, S, E,
                     _hull_mask(S, E, valid))


def _hull_steps(prep: _Prepared) -> tuple[np.ndarray, ...]:
    """Per class and hull step (class-major, rank-minor): class, from/to position, bytes, error saved."""
    hpos, = _left(prep.hull, np.broadcast_to(np.arange(prep.s.shape[1]), prep.s.shape))
    nh = prep.hull.sum(axis=1)
    ok = np.arange(hpos.shape[1] - 1) < (nh - 1)[:, None]
    k = np.broadcast_to(np.arange(len(nh))[:, None], ok.shape)[ok]
    frm, to = hpos[:, :-1][ok], hpos[:, 1:][ok]
    return k, frm, to, prep.s[k, to] - prep.s[k, frm], prep.e[k, frm] - prep.e[k, to]


def pareto_curve(sizes: Sequence[np.ndarray], errors: Sequence[np.ndarray], with_choices: bool = False) -> Curve:
    """The supported Pareto points from the smallest to the most accurate assignment."""
    prep = _prepare(sizes, errors)
    n = len(prep.cls)
    k, _, to, ds, de = _hull_steps(prep)
    # every member of a class takes its class's steps; ties in efficiency go by item, then rank
    per_class = np.bincount(k, minlength=len(prep.count))
    first = np.concatenate([[0], np.cumsum(per_class)[:-1]])
    item = np.repeat(np.arange(n), per_class[prep.cls])
    step = np.arange(len(item)) - np.repeat(np.cumsum(per_class[prep.cls]) - per_class[prep.cls],
                                            per_class[prep.cls]) + first[prep.cls[item]]
    order = np.argsort(-(de[step] / ds[step]), kind="stable")
    item, step = item[order], step[order]
    base_s, base_e = int(prep.s[prep.cls, 0].sum()), float(prep.e[prep.cls, 0].sum())
    cs = np.concatenate([[base_s], base_s + np.cumsum(ds[step])])
    ce = np.concatenate([[base_e], base_e - np.cumsum(de[step])])
    choices = np.zeros((0, n), dtype=np.int64)
    if with_choices:
        choices = np.empty((len(cs), n), dtype=np.int64)
        cur = prep.idx[prep.cls, 0].copy()
        choices[0] = cur
        for j, (i, t) in enumerate(zip(item.tolist(), step.tolist())):
            cur[i] = prep.idx[k[t], to[t]]
            choices[j + 1] = cur
    return Curve(cs, ce, choices)


# ---------------------------------------------------------------------------------------------
# LP relaxation, Lagrangian bound and the incumbent


@dataclass
class _Incumbent:
    """The best solution known: a Pareto position per item, and its error."""
    pos: np.ndarray
    error: float


def _lp(prep: _Prepared, capacity: int) -> tuple[np.ndarray, float]:
    """Pareto position per item of the LP prefix (whole steps only), and the LP multiplier lambda."""
    k, frm, to, ds, de = _hull_steps(prep)
    order = np.argsort(-(de / ds), kind="stable")        # best first; ties by class, then rank
    k, to, ds, de = k[order], to[order], ds[order], de[order]
    cum = int(prep.s[:, 0] @ prep.count) + np.cumsum(ds * prep.count[k])
    whole = int(np.searchsorted(cum, capacity, side="right"))     # class steps 0..whole-1 fit
    lam = float(de[whole] / ds[whole]) if whole < len(cum) else 0.0
    hpos, = _left(prep.hull, np.broadcast_to(np.arange(prep.s.shape[1]), prep.s.shape))
    taken = np.bincount(k[:whole], minlength=len(prep.count))
    pos = hpos[prep.cls, taken[prep.cls]]
    if whole < len(cum):                 # some members of the next class step still fit
        room = capacity - (int(cum[whole - 1]) if whole else int(prep.s[:, 0] @ prep.count))
        part = prep.members(k[whole])[:room // int(ds[whole])]
        pos[part] = to[whole]
    return pos, lam


def _fill(prep: _Prepared, pos: np.ndarray, room: int) -> np.ndarray:
    """Spend spare bytes: repeatedly make the one option change that fits and saves the most error."""
    s, e = prep.s[prep.cls], prep.e[prep.cls]
    rows = np.arange(len(pos))
    while True:
        cur_s, cur_e = s[rows, pos], e[rows, pos]
        gain = np.where(s - cur_s[:, None] <= room, cur_e[:, None] - e, -np.inf)
        j, o = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if not gain[j, o] > 0:
            return pos
        room -= int(s[j, o] - cur_s[j])
        pos[j] = o


def _error(prep: _Prepared, pos: np.ndarray) -> float:
    return float(prep.e[prep.cls, pos].sum())


def _size(prep: _Prepared, pos: np.ndarray) -> int:
    return int(prep.s[prep.cls, pos].sum())


def solve(sizes: Sequence[np.ndarray], errors: Sequence[np.ndarray], capacity: int) -> Optional[Solution]:
    """The least-error assignment within `capacity`, or None when even the smallest does not fit."""
    prep = _prepare(sizes, errors)
    if int(prep.s[:, 0] @ prep.count) > capacity:
        return None
    pos, lam = _lp(prep, capacity)
    pos = _fill(prep, pos, capacity - _size(prep, pos))
    inc = _Incumbent(pos, _error(prep, pos))
    lag = prep.e + lam * prep.s                            # inf where a class has fewer options
    low = lag.min(axis=1)
    lb = min(float(low @ prep.count - lam * capacity), inc.error)
    red = lag - low[:, None]
    tol = 1e-12 * max(1.0, abs(inc.error))
    # Grow the error budget until it reaches the incumbent: each search proves that no solution
    # has error <= budget, or finds the optimum (or at least improves the incumbent on the way).
    # A search's cost climbs steeply with its budget, so start small (early searches are cheap:
    # few classes stay open) and grow geometrically, overshooting the optimum by at most 3x.
    budget = lb + (inc.error - lb) / 256
    allowed = (red <= inc.error - lb).sum(axis=1)
    if allowed[allowed > 1].sum() <= 16:      # few options open even then: one search is cheaper
        budget = inc.error
    exact = True
    while inc.error - lb > tol:
        exact = _search(prep, red, capacity, lb, budget, inc, tol)
        if not exact or budget >= inc.error - tol:
            break
        budget = min(inc.error, lb + 3 * (budget - lb))
    choice = prep.idx[prep.cls, inc.pos]
    return Solution(choice, _size(prep, inc.pos), inc.error, lb, exact)


# ---------------------------------------------------------------------------------------------
# Core search: dominance DP over the classes the reduced-cost test leaves open


@dataclass
class _Group:
    """A class left open by the reduced-cost test: one DP layer."""
    members: np.ndarray        # item ids of the class
    opts: np.ndarray           # its Pareto positions still allowed
    S: np.ndarray              # Pareto set of the class's compositions: total size,
    E: np.ndarray              # total error,
    counts: np.ndarray         # and members per allowed option (one row per composition)
    hull: np.ndarray           # Pareto positions on the lower hull of the allowed options
    hull_s: np.ndarray         # their sizes and errors (per member)
    hull_e: np.ndarray


def _pareto(S: np.ndarray, E: np.ndarray, U: Optional[np.ndarray] = None) -> np.ndarray:
    """Indices of the (size, error) Pareto points, by size: strictly better than all no larger
    (and, given U, with the same U)."""
    if U is None:
        order = np.lexsort((E, S))
        Es = E[order]
        keep = np.empty(len(Es), dtype=bool)
        keep[:1] = True
        keep[1:] = Es[1:] < np.minimum.accumulate(Es)[:-1]
        return order[keep]
    # rank the errors (exact, ties share a rank) and shift each U's ranks below all smaller U's, so
    # one running minimum restarts at every U
    order = np.lexsort((E, S, U))
    key = np.unique(E, return_inverse=True)[1].ravel()[order] - U[order] * (len(E) + 1)
    keep = np.empty(len(key), dtype=bool)
    keep[:1] = True
    keep[1:] = key[1:] < np.minimum.accumulate(key)[:-1]
    return order[keep]


def _spread(top: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For rows with counts 0..top[i] each: the row of every (row, count) pair and its count."""
    reps = top + 1
    row = np.repeat(np.arange(len(top)), reps)
    return row, np.arange(len(row)) - np.repeat(np.cumsum(reps) - reps, reps)


def _compositions(s, e, r, c: int, r_max: float, s_max: int):
    """Pareto set of (size, error) over the ways to give c identical members one option each, with
    reduced cost <= r_max and size <= s_max; returns sizes, errors and counts per option.

    The two options of least reduced cost (the class's LP choice and usually its neighbour) may take
    any number of members, the others only a few, as each member there costs reduced cost. So list
    those few "deviations" first, keeping per number of deviating members only the multisets that
    nothing with as many beats in both size and error (the rest of a composition does not depend on
    which ones they are), then split the remaining members between the two cheap options."""
    if c == 1:
        return s, e, np.eye(len(s), dtype=np.int64)
    line = np.argsort(r, kind="stable")[:2]
    least = int(s.min())
    U, S, E, R = np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1), np.zeros(1)
    C = np.zeros((1, len(s)), dtype=np.int64)
    for o in sorted(set(range(len(s))) - set(line.tolist())):
        top = c - U
        if r[o] > 0:
            top = np.minimum(top, np.floor((r_max - R) / r[o]).astype(np.int64))
        top = np.maximum(top, 0)
        if not top.any():
            continue
        row, n = _spread(top)
        U, S, E, R, C = U[row] + n, S[row] + n * s[o], E[row] + n * e[o], R[row] + n * r[o], C[row]
        C[:, o] += n
        ok = np.flatnonzero((R <= r_max) & (S + (c - U) * least <= s_max))
        if len(ok) > 64:                         # (pruning few is not worth its cost)
            ok = ok[_pareto(S[ok], E[ok], U[ok])]
        U, S, E, R, C = U[ok], S[ok], E[ok], R[ok], C[ok]
    z0, z1 = line.tolist()
    rest = c - U
    R = R + rest * r[z0]
    step = r[z1] - r[z0]
    top = rest if step <= 0 else np.minimum(rest, np.floor((r_max - R) / step).astype(np.int64))
    ok = np.flatnonzero(R <= r_max)
    row, m = _spread(top[ok])
    row = ok[row]
    S = S[row] + rest[row] * s[z0] + m * (s[z1] - s[z0])
    E = E[row] + rest[row] * e[z0] + m * (e[z1] - e[z0])
    keep = np.flatnonzero(S <= s_max)
    keep = keep[_pareto(S[keep], E[keep])]
    counts = C[row[keep]]
    counts[:, z1] += m[keep]
    counts[:, z0] += rest[row[keep]] - m[keep]
    return S[keep], E[keep], counts


def _groups(prep: _Prepared, red: np.ndarray, r_max: float, capacity: int):
    """Position per item for the classes fixed at one option; the open classes as DP groups; and the
    bytes left for the groups (None if even their smallest options do not fit)."""
    allowed = red <= r_max
    fixed_pos = np.argmax(allowed, axis=1)                 # the only option, where only one is left
    open_ = np.flatnonzero(allowed.sum(axis=1) > 1)
    fixed = np.ones(len(prep.count), dtype=bool)
    fixed[open_] = False
    room = capacity - int(prep.s[fixed, fixed_pos[fixed]] @ prep.count[fixed])
    smallest = prep.s[open_, fixed_pos[open_]] * prep.count[open_]
    if smallest.sum() > room:
        return fixed_pos[prep.cls], [], None
    hull = _hull_mask(prep.s[open_], prep.e[open_], allowed[open_])
    groups = []
    for k, least, h in zip(open_.tolist(), smallest.tolist(), hull):
        opts = np.flatnonzero(allowed[k])
        s, e, r = prep.s[k, opts], prep.e[k, opts], red[k, opts]
        # the other open classes need at least their smallest options
        S, E, counts = _compositions(s, e, r, int(prep.count[k]), r_max, room - int(smallest.sum()) + least)
        h = np.flatnonzero(h)
        groups.append(_Group(prep.members(k), opts, S, E, counts, h, prep.s[k, h], prep.e[k, h]))
    groups.sort(key=lambda g: len(g.S))
    return fixed_pos[prep.cls], groups, room


@dataclass
class _Steps:
    """Hull steps of every group of a search, best first (ties by group, then rank), and a final
    sentinel step (group -1) that never fits."""
    gid: np.ndarray            # group of each step
    us: np.ndarray             # bytes and error saved by one member taking the step
    ue: np.ndarray
    eff: np.ndarray            # error saved per byte
    step_s: np.ndarray         # the same for all members of the group: the LP moves them together
    step_e: np.ndarray
    base_s: np.ndarray         # per group: all members at the smallest allowed option
    base_e: np.ndarray

    @staticmethod
    def of(groups: list[_Group]) -> "_Steps":
        gid = np.repeat(np.arange(len(groups)), [len(g.hull) - 1 for g in groups])
        us = np.concatenate([np.diff(g.hull_s) for g in groups])
        ue = np.concatenate([-np.diff(g.hull_e) for g in groups])
        c = np.array([len(g.members) for g in groups], dtype=np.int64)
        eff = ue / us
        order = np.argsort(-eff, kind="stable")
        gid, us, ue, eff = gid[order], us[order], ue[order], eff[order]
        return _Steps(np.append(gid, -1), np.append(us, 1).astype(np.float64), np.append(ue, 0.0),
                      np.append(eff, 0.0),
                      np.append(us * c[gid], np.inf).astype(np.float64), np.append(ue * c[gid], 0.0),
                      c * np.array([g.hull_s[0] for g in groups], dtype=np.int64),
                      c * np.array([g.hull_e[0] for g in groups]))


@dataclass
class _Rest:
    """LP relaxation of the groups not yet decided, as a function of the bytes b left for them.

    The LP takes the groups' hull steps, best first, whole while they fit, then a fraction of the
    next. The same prefix without the widest group's steps, with the next step taken by as many
    single members as fit, plus the widest group's best composition in the bytes then left, is a
    feasible completion. Arrays over steps end with the sentinel step; arrays over prefixes
    (first k steps, k = 0 .. steps) start at k = 0."""
    groups: list               # all groups of the search
    ids: list                  # the undecided ones; the last (widest) is completed exactly
    base_s: int                # the undecided groups at their smallest allowed option
    base_e: float
    done_s: np.ndarray         # per prefix: bytes used and error saved
    done_e: np.ndarray
    mid_s: np.ndarray          # per prefix: the same, counting the steps of groups but the last
    mid_e: np.ndarray
    group: np.ndarray          # per step: its group (sentinel: -1)
    us: np.ndarray             # per step: bytes and error saved by one member taking it
    ue: np.ndarray
    eff: np.ndarray            # per step: error saved per byte
    split: np.ndarray          # per step: of a group but the last (the completion splits it)
    last_s: int                # the last group at its smallest allowed option
    last_e: float

    @staticmethod
    def of(groups: list[_Group], steps: _Steps, ids: list[int]) -> "_Rest":
        ids = sorted(ids)                     # groups are sorted by width: the widest comes last
        sel = np.zeros(len(groups) + 1, dtype=bool)
        sel[ids] = True
        sel[-1] = True                        # the sentinel
        keep = sel[steps.gid]
        gid, step_s, step_e = steps.gid[keep], steps.step_s[keep], steps.step_e[keep]
        split = (gid != (ids[-1] if ids else -1)) & (gid >= 0)
        prefix = lambda v: np.concatenate(([0.0], np.cumsum(v)))
        last = len(groups[ids[-1]].members) if ids else 0
        return _Rest(groups, ids, int(steps.base_s[ids].sum()), float(steps.base_e[ids].sum()),
                     prefix(step_s), prefix(step_e),
                     prefix(np.where(split, step_s, 0.0)), prefix(np.where(split, step_e, 0.0)),
                     gid, steps.us[keep], steps.ue[keep], steps.eff[keep], split,
                     last * int(groups[ids[-1]].hull_s[0]) if ids else 0,
                     last * float(groups[ids[-1]].hull_e[0]) if ids else 0.0)

    def prefix(self, b: np.ndarray):
        """Bytes left for the steps, how many whole steps fit, and the bytes left after them."""
        x = b - self.base_s
        k = np.searchsorted(self.done_s[1:], x, side="right")
        return x, k, x - self.done_s[k]

    def middle(self, k, left):
        """Members taking step k (if it is split), and the bytes and error saved by the prefix's
        steps of groups but the last."""
        part = np.where(self.split[k], left // self.us[k], 0.0)
        return part, self.mid_s[k] + part * self.us[k], self.mid_e[k] + part * self.ue[k]

    def evaluate(self, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """LP bound and feasible completion error for each b (inf where nothing fits)."""
        x, k, left = self.prefix(b)
        lp = self.base_e - self.done_e[k] - left * self.eff[k]
        lp[x < 0] = np.inf
        if not self.ids:
            return lp, lp
        last = self.groups[self.ids[-1]]
        _, used, saved = self.middle(k, left)
        j = np.searchsorted(last.S, x + self.last_s - used, side="right") - 1
        comp = self.base_e - self.last_e - saved + last.E[j]
        comp[(j < 0) | (x < 0)] = np.inf
        return lp, comp


@dataclass
class _States:
    """Pareto states of a DP over some groups (ids, in order); history[t] holds each state's
    parent (in layer t - 1) and its composition of group ids[t]."""
    S: np.ndarray
    E: np.ndarray
    ids: list
    history: list

    def assign(self, groups: list[_Group], pos: np.ndarray, idx: int) -> None:
        """Write state idx's compositions into pos."""
        for i, (parent, option) in zip(reversed(self.ids), reversed(self.history)):
            g = groups[i]
            pos[g.members] = np.repeat(g.opts, g.counts[option[idx]])
            idx = int(parent[idx])


def _search(prep: _Prepared, red: np.ndarray, capacity: int, lb: float, budget: float,
            inc: _Incumbent, tol: float) -> bool:
    """Exact search among the solutions with error <= min(budget, incumbent - tol).

    Any such solution has reduced cost <= its error - lb, which bounds the options and the class
    compositions that can occur. Meet in the middle: one DP takes the narrow groups, one the wide
    ones, each growing where it costs less; then each state of the first meets the best state of
    the second that fits. The incumbent becomes the best solution found (within the budget or
    not); returns False only if the state limit stopped the search."""
    limit = lambda: min(budget, inc.error - tol)
    base, groups, room = _groups(prep, red, limit() - lb + tol, capacity)
    if room is not None and not groups:
        _offer(prep, base, capacity, inc, tol)
    if room is None or not groups:
        return True
    outside = base.copy()
    outside[np.concatenate([g.members for g in groups])] = -1
    fixed_e = float(prep.e[prep.cls, base][outside >= 0].sum())
    steps = _Steps.of(groups)
    sides = [_States(np.zeros(1, np.int64), np.zeros(1), [], []) for _ in range(2)]
    lo, hi = 0, len(groups)                       # groups[lo:hi] are not yet in either DP
    while True:
        narrow = len(sides[0].S) * len(groups[lo].S) <= len(sides[1].S) * len(groups[hi - 1].S)
        side, other = (sides[0], sides[1]) if narrow else (sides[1], sides[0])
        if hi - lo == 1:
            break
        g = lo if narrow else hi - 1
        lo, hi = (lo + 1, hi) if narrow else (lo, hi - 1)
        rest = _Rest.of(groups, steps, list(range(lo, hi)) + other.ids)
        if not _extend(prep, side, g, rest, base, room, capacity, fixed_e, limit, inc, tol):
            return False
        if len(side.S) == 0:
            return True
    # the last group joins the two DPs: each state of one side with each of its compositions,
    # and the best state of the other side in the bytes left
    g = groups[lo]
    if len(side.S) * len(g.S) > 8 * MAX_CORE_STATES:
        return False
    S2 = (side.S[:, None] + g.S[None, :]).ravel()
    j = np.searchsorted(other.S, room - S2, side="right") - 1
    total = np.where(j >= 0, (side.E[:, None] + g.E[None, :]).ravel() + other.E[j], np.inf)
    best = int(np.argmin(total))
    if fixed_e + total[best] < inc.error - tol:
        pos = base.copy()
        state, option = divmod(best, len(g.S))
        side.assign(groups, pos, state)
        pos[g.members] = np.repeat(g.opts, g.counts[option])
        other.assign(groups, pos, int(j[best]))
        _offer(prep, pos, capacity, inc, tol)
    return True


def _extend(prep, run, gi, rest, base, room, capacity, fixed_e, limit, inc, tol) -> bool:
    """One DP layer: add group gi to the run's states, keeping those that are Pareto in (size,
    error) and whose error plus the LP of the rest stays within the limit; the best completion
    may improve the incumbent (and so tighten the limit). False if the state limit was hit."""
    g = rest.groups[gi]
    if len(run.S) * len(g.S) > 8 * MAX_CORE_STATES:
        return False
    S2 = (run.S[:, None] + g.S[None, :]).ravel()
    E2 = (run.E[:, None] + g.E[None, :]).ravel()
    lp, comp = rest.evaluate((room - S2).astype(np.float64))
    ok = np.flatnonzero(E2 + lp <= limit() - fixed_e + tol)
    ok = ok[_pareto(S2[ok], E2[ok])]
    run.S, run.E, comp = S2[ok], E2[ok], comp[ok]
    run.ids.append(gi)
    run.history.append(np.divmod(ok, len(g.S)))
    if len(ok) > MAX_CORE_STATES:
        return False
    if len(ok) and rest.ids:
        best = int(np.argmin(run.E + comp))
        if fixed_e + run.E[best] + comp[best] < inc.error - tol:
            _complete(prep, run, rest, base, best, room - int(run.S[best]), capacity, inc, tol)
    return True


def _complete(prep, run, rest, base, idx, b, capacity, inc, tol) -> None:
    """Offer state idx of the run, completed as in _Rest with b bytes left."""
    groups = rest.groups
    pos = base.copy()
    run.assign(groups, pos, idx)
    x, k, left = rest.prefix(np.array([float(b)]))
    k = int(k[0])
    taken = np.bincount(rest.group[:k], minlength=len(groups))
    for i in rest.ids[:-1]:
        pos[groups[i].members] = groups[i].hull[taken[i]]
    part, used, _ = rest.middle(k, left[0])
    if part > 0:
        i = int(rest.group[k])
        pos[groups[i].members[:int(part)]] = groups[i].hull[taken[i] + 1]
    last = groups[rest.ids[-1]]
    j = int(np.searchsorted(last.S, x[0] + rest.last_s - used, side="right")) - 1
    if j >= 0:
        pos[last.members] = np.repeat(last.opts, last.counts[j])
        _offer(prep, pos, capacity, inc, tol)


def _offer(prep, pos, capacity, inc, tol) -> None:
    """pos becomes the incumbent if it fits and, topped up greedily, is better (the check also
    guards against rounding in the tables)."""
    size = _size(prep, pos)
    if size <= capacity:
        pos = _fill(prep, pos, capacity - size)
        err = _error(prep, pos)
        if err < inc.error - tol:
            inc.pos, inc.error = pos, err
