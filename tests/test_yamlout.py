"""The fast YAML writer: whatever it writes, yaml.safe_load reads back unchanged."""
from __future__ import annotations

import math

import yaml
from hypothesis import given, settings, strategies as st

from planner.yamlout import dump

scalars = st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.text(max_size=20) | \
    st.floats(allow_nan=False)
data = st.recursive(scalars, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids, max_size=4),
                    max_leaves=30)


@given(data)
@settings(max_examples=500, deadline=None)
def test_round_trip(x):
    assert yaml.safe_load(dump(x)) == x


def test_special_floats():
    back = yaml.safe_load(dump({"a": float("inf"), "b": -float("inf"), "c": float("nan"), "d": 1e-05, "e": 3e20}))
    assert back["a"] == math.inf and back["b"] == -math.inf and math.isnan(back["c"])
    assert back["d"] == 1e-05 and back["e"] == 3e20
