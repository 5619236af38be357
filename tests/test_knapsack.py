"""The exact multiple-choice knapsack: brute force agreement, monotonicity, Pareto points."""
from __future__ import annotations

import itertools

import numpy as np
from hypothesis import given, settings, strategies as st

from planner.knapsack import pareto_curve, solve


@st.composite
def instances(draw, max_items=5, max_options=5):
    n = draw(st.integers(1, max_items))
    sizes, errors = [], []
    copies = draw(st.integers(1, 3))            # identical items: the hard, tie-heavy case
    for _ in range(n):
        m = draw(st.integers(1, max_options))
        s = draw(st.lists(st.integers(1, 30), min_size=m, max_size=m))
        e = draw(st.lists(st.sampled_from([0.0, 0.1, 0.5, 1.0, 2.0, 3.3]) | st.floats(0, 10, allow_subnormal=False), min_size=m, max_size=m))
        for _ in range(copies if draw(st.booleans()) else 1):
            sizes.append(np.array(s))
            errors.append(np.array(e))
    return sizes[:7], errors[:7], draw(st.integers(0, 120))


def brute(sizes, errors, cap):
    best = None
    for comb in itertools.product(*[range(len(s)) for s in sizes]):
        size = sum(s[o] for s, o in zip(sizes, comb))
        if size <= cap:
            err = sum(e[o] for e, o in zip(errors, comb))
            best = err if best is None else min(best, err)
    return best


@given(instances())
@settings(max_examples=400, deadline=None)
def test_equals_brute_force(inst):
    sizes, errors, cap = inst
    want = brute(sizes, errors, cap)
    got = solve(sizes, errors, cap)
    if want is None:
        assert got is None
        return
    assert got is not None and got.exact
    assert got.size <= cap
    assert abs(got.error - want) <= 1e-9 * max(1, abs(want))
    assert got.lower_bound <= want + 1e-9
    assert got.size == sum(s[o] for s, o in zip(sizes, got.choice))


@given(instances(), st.integers(0, 60))
@settings(max_examples=200, deadline=None)
def test_more_capacity_never_more_error(inst, extra):
    sizes, errors, cap = inst
    a, b = solve(sizes, errors, cap), solve(sizes, errors, cap + extra)
    if a is not None:
        assert b is not None and b.error <= a.error + 1e-12


@given(instances())
@settings(max_examples=150, deadline=None)
def test_pareto_points_are_optimal_for_their_size(inst):
    sizes, errors, _ = inst
    curve = pareto_curve(sizes, errors, with_choices=True)
    assert np.all(np.diff(curve.sizes) > 0) and np.all(np.diff(curve.errors) <= 0)
    for size, err, choice in zip(curve.sizes, curve.errors, curve.choices):
        assert sum(s[o] for s, o in zip(sizes, choice)) == size
        assert abs(brute(sizes, errors, int(size)) - err) <= 1e-9 * max(1, abs(err))


def test_large_instance_is_proven_optimal(db):
    from planner.optimize import _items
    items = _items(db.find_model("llama2-13b"), None)
    for bpw in (2.3, 3.0, 4.5, 6.0):
        sol = solve(items.sizes, items.errors, int(bpw * items.params / 8))
        assert sol.exact and sol.size <= int(bpw * items.params / 8)
        assert sol.error - sol.lower_bound >= -1e-9
