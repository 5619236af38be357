"""Exact multiple-choice knapsack: pick one option per item, total size <= capacity, least total error.

Method (Pisinger-style core solution with Lagrangian reduced-cost fixing):
 1. Per item keep the Pareto options (no smaller-and-better option exists), then their lower convex
    hull. Sorting every hull step by efficiency (error saved per byte) and taking a prefix gives the
    LP optimum; its first step that no longer fits sets the multiplier lambda.
 2. L(lambda) = sum_j min_o(e_jo + lambda s_jo) - lambda C is a lower bound of the optimum; a greedy
    completion of the LP prefix is a feasible upper bound.
 3. Any solution x has error(x) >= L(lambda) + sum_j r_j(x_j), with reduced costs
    r_jo = e_jo + lambda s_jo - min_o(e_jo + lambda s_jo) >= 0; so an option whose reduced cost
    exceeds UB - L can be in no better solution and is dropped. Most items keep one option.
 4. The few items left are solved exactly by a dominance DP over (size, error) states, pruned by the
    same reduced-cost bound. The result is optimal; `gap` reports UB - L before step 4.
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


def _pareto_hull(sizes: np.ndarray, errors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Indices of the Pareto options (by size) and of their lower convex hull."""
    order = np.lexsort((errors, sizes))
    pareto = []
    best = np.inf
    for i in order:
        if errors[i] < best:
            pareto.append(i)
            best = errors[i]
    hull: list[int] = []
    for i in pareto:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # drop b if it lies on or above the segment a -> i
            cross = (sizes[b] - sizes[a]) * (errors[i] - errors[a]) - (errors[b] - errors[a]) * (sizes[i] - sizes[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return np.asarray(pareto, dtype=np.int64), np.asarray(hull, dtype=np.int64)


@dataclass
class _Prepared:
    sizes: list[np.ndarray]
    errors: list[np.ndarray]
    pareto: list[np.ndarray]
    hull: list[np.ndarray]
    step_item: np.ndarray      # hull steps, sorted by efficiency (best first)
    step_to: np.ndarray        # option index reached by the step
    step_ds: np.ndarray
    step_de: np.ndarray        # error reduction (> 0)
    start: np.ndarray          # smallest option per item
    cls: np.ndarray            # class id per item: items with identical options share one
    pad_idx: np.ndarray        # (items, max Pareto options) option index, -1 where absent
    pad_s: np.ndarray          # sizes of those options (0 where absent)
    pad_e: np.ndarray          # errors of those options (inf where absent)


def _prepare(sizes: Sequence[np.ndarray], errors: Sequence[np.ndarray]) -> _Prepared:
    sizes = [np.asarray(s, dtype=np.int64) for s in sizes]
    errors = [np.asarray(e, dtype=np.float64) for e in errors]
    cache: dict[tuple, tuple[np.ndarray, np.ndarray, int]] = {}
    pareto, hull, cls = [], [], []
    items, tos, dss, des, ranks = [], [], [], [], []
    for j, (s, e) in enumerate(zip(sizes, errors)):
        key = (s.tobytes(), e.tobytes())
        if key not in cache:
            cache[key] = (*_pareto_hull(s, e), len(cache))
        p, h, c = cache[key]
        cls.append(c)
        pareto.append(p)
        hull.append(h)
        if len(h) > 1:
            items.append(np.full(len(h) - 1, j))
            tos.append(h[1:])
            dss.append(s[h[1:]] - s[h[:-1]])
            des.append(e[h[:-1]] - e[h[1:]])
            ranks.append(np.arange(len(h) - 1))
    cat = (lambda xs, dt: np.concatenate(xs).astype(dt) if xs else np.zeros(0, dt))
    item, to, ds, de, rank = (cat(items, np.int64), cat(tos, np.int64), cat(dss, np.int64),
                              cat(des, np.float64), cat(ranks, np.int64))
    eff = de / ds
    order = np.lexsort((rank, item, -eff))
    start = np.array([h[0] for h in hull], dtype=np.int64)
    width = max(len(p) for p in pareto)
    pad_idx = np.full((len(sizes), width), -1, dtype=np.int64)
    pad_s = np.zeros((len(sizes), width), dtype=np.int64)
    pad_e = np.full((len(sizes), width), np.inf)
    for j, p in enumerate(pareto):
        pad_idx[j, :len(p)] = p
        pad_s[j, :len(p)] = sizes[j][p]
        pad_e[j, :len(p)] = errors[j][p]
    return _Prepared(sizes, errors, pareto, hull, item[order], to[order], ds[order], de[order], start,
                     np.asarray(cls, dtype=np.int64), pad_idx, pad_s, pad_e)


def pareto_curve(sizes: Sequence[np.ndarray], errors: Sequence[np.ndarray], with_choices: bool = False) -> Curve:
    """The supported Pareto points from the smallest to the most accurate assignment."""
    prep = _prepare(sizes, errors)
    base_s = sum(int(s[i]) for s, i in zip(prep.sizes, prep.start))
    base_e = sum(float(e[i]) for e, i in zip(prep.errors, prep.start))
    cs = np.concatenate([[base_s], base_s + np.cumsum(prep.step_ds)])
    ce = np.concatenate([[base_e], base_e - np.cumsum(prep.step_de)])
    choices = np.zeros((0, len(prep.sizes)), dtype=np.int64)
    if with_choices:
        choices = np.empty((len(cs), len(prep.sizes)), dtype=np.int64)
        cur = prep.start.copy()
        choices[0] = cur
        for k, (j, to) in enumerate(zip(prep.step_item, prep.step_to)):
            cur[j] = to
            choices[k + 1] = cur
    return Curve(cs, ce, choices)


def _greedy(prep: _Prepared, capacity: int) -> tuple[np.ndarray, int, float]:
    """LP prefix, then any further hull step or Pareto option that still fits; returns lambda too."""
    choice = prep.start.copy()
    size = sum(int(s[i]) for s, i in zip(prep.sizes, choice))
    cum = size + np.cumsum(prep.step_ds)
    k = int(np.searchsorted(cum, capacity, side="right"))       # steps 0..k-1 fit
    lam = float(prep.step_de[k] / prep.step_ds[k]) if k < len(cum) else 0.0
    for j, to in zip(prep.step_item[:k], prep.step_to[:k]):
        choice[j] = to
    size = int(cum[k - 1]) if k else size
    # greedy completion: best error drop per item that fits the remaining capacity, repeated
    improved = True
    while improved:
        improved = False
        for j in range(len(choice)):
            s, e, cur = prep.sizes[j], prep.errors[j], choice[j]
            p = prep.pareto[j]
            fits = p[(s[p] - s[cur] <= capacity - size) & (e[p] < e[cur])]
            if len(fits):
                best = fits[np.argmin(e[fits])]
                size += int(s[best] - s[cur])
                choice[j] = best
                improved = True
    return choice, size, lam


def solve(sizes: Sequence[np.ndarray], errors: Sequence[np.ndarray], capacity: int) -> Optional[Solution]:
    """The least-error assignment within `capacity`, or None when even the smallest does not fit."""
    prep = _prepare(sizes, errors)
    n = len(prep.sizes)
    min_size = sum(int(s[i]) for s, i in zip(prep.sizes, prep.start))
    if min_size > capacity:
        return None
    choice, size, lam = _greedy(prep, capacity)
    ub = float(sum(e[i] for e, i in zip(prep.errors, choice)))
    lag = prep.pad_e + lam * prep.pad_s                      # inf where an item has fewer options
    lb = float(lag.min(axis=1).sum() - lam * capacity)
    lb = min(lb, ub)
    tol = 1e-12 * max(1.0, abs(ub))
    if ub - lb <= tol:
        return Solution(choice, size, ub, lb, True)
    gap = ub - lb + tol
    red = lag - lag.min(axis=1, keepdims=True)
    # Widen the searched reduced-cost budget until it covers UB - L: every solution better than the
    # incumbent has reduced cost below UB - L, so the last search proves optimality.
    trial = gap / 256
    completed = True
    while True:
        found, done = _core_search(prep, red, capacity, lam, trial)
        completed = completed and done
        if found is not None:
            err = float(sum(e[i] for e, i in zip(prep.errors, found)))
            if err < ub - tol:
                ub, choice = err, found
        gap = ub - lb + tol
        if trial >= gap or not completed:
            break
        trial = min(gap, trial * 2)
    size = int(sum(int(s[i]) for s, i in zip(prep.sizes, choice)))
    return Solution(choice, size, ub, lb, completed)


def _compositions(c: int, red: np.ndarray, gap: float, limit: int) -> Optional[np.ndarray]:
    """All counts (n_1..n_m) summing to c with sum n_i red_i <= gap; None past `limit` rows."""
    rows = np.zeros((1, 0), dtype=np.int64)
    used = np.zeros(1)
    left = np.full(1, c, dtype=np.int64)
    for i, r in enumerate(red):
        if i == len(red) - 1:
            n = left
        else:
            top = left if r <= 0 else np.minimum(left, np.floor((gap - used) / r).astype(np.int64))
            reps = np.maximum(top + 1, 0)
            if reps.sum() > limit:
                return None
            base = np.repeat(np.arange(len(rows)), reps)
            n = np.concatenate([np.arange(t + 1) for t in top[reps > 0]]) if reps.sum() else np.zeros(0, np.int64)
            rows, used, left = rows[base], used[base], left[base]
        used = used + n * r
        rows = np.column_stack([rows, n])
        left = left - n
        ok = used <= gap
        rows, used, left = rows[ok], used[ok], left[ok]
    return rows


def _groups(prep: _Prepared, red: np.ndarray, gap: float):
    """Items whose reduced cost keeps several options, merged into classes of identical items.

    A class of c identical items is one DP item whose options are the counts of its members at
    each option (members are interchangeable, so the order does not matter)."""
    ok = red <= gap
    single = ok.sum(axis=1) == 1
    fixed_items = np.flatnonzero(single)
    fixed_opts = prep.pad_idx[fixed_items, ok[fixed_items].argmax(axis=1)]
    classes: dict[int, list[int]] = {}
    for j in np.flatnonzero(~single).tolist():
        classes.setdefault(int(prep.cls[j]), []).append(j)
    groups = []
    for members in classes.values():
        j = members[0]
        keep = ok[j]
        opts, r = prep.pad_idx[j][keep], red[j][keep]
        s, e = prep.pad_s[j][keep], prep.pad_e[j][keep]
        counts = _compositions(len(members), r, gap, 20_000)
        if counts is None:                       # too many: members as separate items
            eye = np.eye(len(opts), dtype=np.int64)
            groups += [([m], opts, eye, s, e, r) for m in members]
        else:
            groups.append((members, opts, counts, counts @ s, counts @ e, counts @ r))
    return fixed_items, fixed_opts, groups


def _core_search(prep: _Prepared, red: np.ndarray, capacity: int, lam: float,
                 gap: float) -> tuple[Optional[np.ndarray], bool]:
    """Exact dominance DP over the items the reduced-cost test could not fix.

    Returns the best assignment with total reduced cost <= gap (None if there is none), and
    whether the search ran to the end."""
    fixed_items, fixed_opts, groups = _groups(prep, red, gap)
    cap = capacity - int(sum(prep.sizes[j][o] for j, o in zip(fixed_items.tolist(), fixed_opts.tolist())))
    groups.sort(key=lambda g: len(g[3]))
    rest = (lambda xs: np.concatenate([np.cumsum(xs[::-1])[::-1], [0]]).astype(np.int64))
    min_rest = rest([int(g[3].min()) for g in groups])
    max_rest = rest([int(g[3].max()) for g in groups])
    if min_rest[0] > cap:
        return None, True
    S, E, R = np.zeros(1, np.int64), np.zeros(1), np.zeros(1)
    history = []
    for t, (_, _, _, gs, ge, gr) in enumerate(groups):
        S2 = (S[:, None] + gs[None, :]).ravel()
        E2 = (E[:, None] + ge[None, :]).ravel()
        R2 = (R[:, None] + gr[None, :]).ravel()
        parent = np.repeat(np.arange(len(S)), len(gs))
        option = np.tile(np.arange(len(gs)), len(S))
        # error = L + reduced cost + lambda * unused bytes, and unused >= cap - S - max_rest
        unused = np.maximum(cap - S2 - max_rest[t + 1], 0)
        ok = (S2 + min_rest[t + 1] <= cap) & (R2 + lam * unused <= gap)
        S2, E2, R2, parent, option = S2[ok], E2[ok], R2[ok], parent[ok], option[ok]
        order = np.lexsort((E2, S2))
        S2, E2, R2, parent, option = S2[order], E2[order], R2[order], parent[order], option[order]
        prev = np.concatenate([[np.inf], np.minimum.accumulate(E2)[:-1]])
        keep = E2 < prev          # strictly better than every state no larger
        S, E, R = S2[keep], E2[keep], R2[keep]
        history.append((parent[keep], option[keep]))
        if len(S) == 0:
            return None, True
        if len(S) > MAX_CORE_STATES:
            return None, False
    choice = np.zeros(len(prep.sizes), dtype=np.int64)
    choice[fixed_items] = fixed_opts
    idx = int(np.argmin(E))
    for (members, opts, counts, *_), (parent, option) in zip(reversed(groups), reversed(history)):
        row = counts[option[idx]]
        choice[members] = np.repeat(opts, row)
        idx = int(parent[idx])
    return choice, True
