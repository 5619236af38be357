"""Streaming's copy schedule (gpuengine/schedule.py) against a simulated link: every dependency a GPU relies
on holds (a layer runs on its slot only after its copy lands, no copy overwrites a slot in use, no wait on an
unrecorded event), overlapped copies are never slower than serial ones, and they approach the larger of the
link's and the compute's time where serial copies take the sum. No GPU: the times are inputs."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gpuengine.schedule import COMPUTE, COPY, Op, ScheduleError, StreamSchedule, simulate, step_seconds


@st.composite
def streams(draw):
    layers = draw(st.integers(1, 12))
    streamed = draw(st.sets(st.integers(0, layers - 1)))
    times = st.floats(1e-4, 1e-2)
    copy_s = {i: draw(times) for i in range(layers)}
    compute_s = {i: draw(times) for i in range(layers)}
    return layers, streamed, copy_s, compute_s, draw(st.floats(0, 1e-2))


@settings(max_examples=300, deadline=None)
@given(case=streams(), overlap=st.booleans(), steps=st.integers(1, 4))
def test_every_schedule_keeps_the_dependencies_a_gpu_needs(case, overlap, steps):
    layers, streamed, copy_s, compute_s, tail = case
    sched = StreamSchedule(layers, streamed, overlap)
    simulate(sched.step(layers), copy_s, compute_s, steps, tail)          # raises ScheduleError otherwise


@settings(max_examples=300, deadline=None)
@given(case=streams())
def test_overlap_is_never_slower_and_never_beats_the_link_or_the_compute(case):
    layers, streamed, copy_s, compute_s, tail = case
    serial = step_seconds(layers, streamed, False, copy_s, compute_s, tail)
    overlapped = step_seconds(layers, streamed, True, copy_s, compute_s, tail)
    link = sum(copy_s[i] for i in streamed)
    compute = sum(compute_s.values()) + tail
    assert overlapped <= serial * (1 + 1e-12)
    assert overlapped >= max(link, compute) * (1 - 1e-12)
    assert serial == pytest.approx(link + compute)


@pytest.mark.parametrize("copy_ms, compute_ms", [(2.0, 0.1), (0.1, 2.0), (1.0, 1.0)])
def test_all_layers_streamed_approach_the_larger_of_link_and_compute(copy_ms, compute_ms):
    """32 layers, every one streamed: serial takes the sum; overlapped the larger total, plus one unhidden
    copy (the first) and one unhidden layer (the last)."""
    n = 32
    copy_s = {i: copy_ms / 1e3 for i in range(n)}
    compute_s = {i: compute_ms / 1e3 for i in range(n)}
    serial = step_seconds(n, range(n), False, copy_s, compute_s)
    overlapped = step_seconds(n, range(n), True, copy_s, compute_s)
    assert serial == pytest.approx(n * (copy_ms + compute_ms) / 1e3)
    assert overlapped == pytest.approx((max(copy_ms, compute_ms) * (n - 1) + copy_ms + compute_ms) / 1e3)


def test_slots_alternate_over_the_streamed_layers_and_resident_layers_copy_nothing():
    sched = StreamSchedule(6, {1, 2, 4}, overlap=True)
    assert sched.slot == {1: 0, 2: 1, 4: 0}
    assert sched.before(0) == [] and sched.before(3) == [] and sched.after(5) == []
    assert StreamSchedule(4, set(), overlap=True).step(4) == [Op("compute", COMPUTE, i) for i in range(4)]


def test_the_simulation_catches_broken_schedules():
    """Without the wait for `freed`, copying layer 2 into slot 0 overwrites layer 0 while it runs; without the
    wait for `loaded`, a layer runs before its weights land; a wait on an event never recorded is no wait."""
    good = StreamSchedule(3, range(3), overlap=True).step(3)
    times = {i: 1.0 for i in range(3)}
    simulate(good, times, times)
    no_freed = [op for op in good if op != Op("wait", COPY, event="freed/0")]
    with pytest.raises(ScheduleError, match="overlaps layer 0"):
        simulate(no_freed, times, {i: 5.0 for i in range(3)})
    no_loaded = [op for op in good if op != Op("wait", COMPUTE, event="loaded/1")]
    with pytest.raises(ScheduleError, match="layer 1 runs on slot 1 before its copy has landed"):
        simulate(no_loaded, times, {i: 0.1 for i in range(3)})
    with pytest.raises(ScheduleError, match="never recorded"):
        simulate([Op("wait", COPY, event="start"), *good], times, times)
