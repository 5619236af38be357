"""Sampling: greedy is argmax, filters keep what they promise, seeds reproduce, EOS stops."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from refengine.generate import Sampling, filtered_probs, generate, penalize, sample

logit_vectors = st.lists(st.floats(-20, 20), min_size=2, max_size=50).map(lambda v: np.array(v))


@given(logit_vectors)
def test_greedy_is_argmax(z):
    assert sample(z, Sampling(), [], np.random.default_rng(0)) == int(np.argmax(z))


@given(logit_vectors, st.integers(1, 10), st.floats(0.05, 1.0), st.floats(0.1, 3))
@settings(max_examples=200)
def test_filters_keep_their_promise(z, k, p, temp):
    probs = filtered_probs(z, Sampling(temperature=temp, top_k=k, top_p=p))
    assert abs(probs.sum() - 1) < 1e-9
    kept = np.flatnonzero(probs > 0)
    assert len(kept) >= 1
    kth = np.sort(z)[-min(k, len(z))]
    assert np.all(z[kept] >= kth)                                   # top-k: nothing below the k-th logit
    base = filtered_probs(z, Sampling(temperature=temp, top_k=k))
    kept_mass = base[kept].sum()
    assert kept_mass >= p - 1e-9                                     # nucleus reaches top_p ...
    smallest = np.sort(base[kept])[0]
    assert kept_mass - smallest < p + 1e-9                           # ... and is minimal


def test_repetition_penalty_pushes_seen_tokens_down():
    z = np.array([2.0, -1.0, 1.5])
    out = penalize(z, [0, 1], 2.0)
    assert out.tolist() == [1.0, -2.0, 1.5]


def test_seeded_sampling_reproduces():
    z = np.random.default_rng(0).standard_normal(100)
    s = Sampling(temperature=1.0, top_p=0.9, seed=5)
    a = [sample(z, s, [], np.random.default_rng(5)) for _ in range(20)]
    b = [sample(z, s, [], np.random.default_rng(5)) for _ in range(20)]
    assert a == b


def test_generate_stops_on_eos_and_counts():
    table = {(): 3, (3,): 4, (3, 4): 9}                              # a toy model: next token by history
    history: list[int] = []

    def forward(tokens):
        history.extend(tokens)
        nxt = table.get(tuple(history[1:]), 1)
        z = np.zeros((len(tokens), 10))
        z[-1, nxt] = 5
        return z
    assert list(generate(forward, [0], 10, Sampling(), eos_ids=[9])) == [3, 4]


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_p=0), dict(top_k=-2), dict(repetition_penalty=0)])
def test_bad_settings_are_refused(bad):
    with pytest.raises(ValueError):
        Sampling(**bad)
