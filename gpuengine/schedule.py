"""When streamed layers are copied to the device, and what orders the copies and the kernels.

A layer that is not resident travels from pinned host memory into one of two device slots when it runs
(planner: two stream buffers). Serial: the copy goes on the compute stream just before the layer's
kernels, so copies and compute take turns. Overlapped: the copies go on a second stream, and layer m+1 of
the streamed ones is copied while layer m computes (double buffering), so a step's time approaches the
larger of the link's time and the compute's, where serial is their sum. Events order the two streams:

- `start`: recorded on the compute stream as a step begins; the copy stream waits for it before its
  first copy (the previous step is done with both slots; in a captured graph this is the fork that brings
  the copy stream into the capture);
- `loaded/<slot>`: recorded after a copy into the slot; the compute stream waits for it before the
  layer's kernels;
- `freed/<slot>`: recorded after the kernels of the slot's layer; the copy stream waits for it before
  copying the slot's next layer over it.

Every copy is waited for by the compute stream, which so joins the copy stream back before the step ends.
Pure Python: `Op`s are what gpuengine.model issues with CuPy streams and events, and what `simulate`
times and checks against a link and compute of given speeds (tests/test_schedule.py).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Mapping

COMPUTE, COPY = "compute", "copy"


@dataclass(frozen=True)
class Op:
    kind: str               # "copy" (layer into slot), "record" / "wait" (event on a stream)
    stream: str             # COMPUTE or COPY
    layer: int = -1
    slot: int = -1
    event: str = ""


class StreamSchedule:
    """The ops around each layer of one step: `start()` first, then for each layer in order `before(i)`,
    the layer's kernels, `after(i)`."""

    def __init__(self, num_layers: int, streamed: Iterable[int], overlap: bool):
        self.order = [i for i in range(num_layers) if i in set(streamed)]
        self.slot = {layer: m % 2 for m, layer in enumerate(self.order)}   # fixed per layer: a graph replays
        self.overlap = overlap and bool(self.order)
        self._next = {a: b for a, b in zip(self.order, self.order[1:])}
        self._prev = {b: a for a, b in zip(self.order, self.order[1:])}

    def start(self) -> list[Op]:
        if not self.overlap:
            return []
        first = self.order[0]
        return [Op("record", COMPUTE, event="start"), Op("wait", COPY, event="start"), *self._copy(first)]

    def before(self, i: int) -> list[Op]:
        if i not in self.slot:
            return []
        if not self.overlap:
            return [Op("copy", COMPUTE, i, self.slot[i])]
        ops = [Op("wait", COMPUTE, event=f"loaded/{self.slot[i]}")]
        nxt = self._next.get(i)
        if nxt is not None:
            if i in self._prev:           # nxt's slot held the layer before i: wait until its kernels are done
                ops.append(Op("wait", COPY, event=f"freed/{self.slot[nxt]}"))
            ops += self._copy(nxt)
        return ops

    def after(self, i: int) -> list[Op]:
        if not self.overlap or i not in self.slot:
            return []
        return [Op("record", COMPUTE, event=f"freed/{self.slot[i]}")]

    def _copy(self, layer: int) -> list[Op]:
        slot = self.slot[layer]
        return [Op("copy", COPY, layer, slot), Op("record", COPY, event=f"loaded/{slot}")]

    def step(self, num_layers: int) -> list[Op]:
        """One step's ops in issue order, with Op("compute", COMPUTE, i) for layer i's kernels."""
        ops = self.start()
        for i in range(num_layers):
            ops += self.before(i) + [Op("compute", COMPUTE, i, self.slot.get(i, -1))] + self.after(i)
        return ops


class ScheduleError(AssertionError):
    """A schedule that would let the GPU read a slot before its copy lands, or overwrite it in use."""


def simulate(ops: list[Op], copy_s: Mapping[int, float], compute_s: Mapping[int, float],
             steps: int = 1, tail_s: float = 0.0) -> float:
    """Seconds for `steps` repetitions of one step's ops, each stream running its ops in issue order, a copy
    taking copy_s[layer], a layer's kernels compute_s[layer] (tail_s more on the compute stream after the
    last layer: head and final norm). Checks every dependency a GPU would rely on: waits are on recorded
    events, and each layer's kernels run on its slot only after its copy has landed and before the next copy
    into that slot begins. Raises ScheduleError otherwise."""
    clock = {COMPUTE: 0.0, COPY: 0.0}
    events: dict[str, float] = {}
    copies: dict[int, list[tuple[float, float, int]]] = {}      # slot -> (start, end, layer)
    reads: list[tuple[int, int, float, float]] = []             # (slot, layer, start, end)
    for _ in range(steps):
        for op in ops:
            if op.kind == "record":
                events[op.event] = clock[op.stream]
            elif op.kind == "wait":
                if op.event not in events:
                    raise ScheduleError(f"{op.stream} waits on {op.event!r}, never recorded: no wait at all on a GPU")
                clock[op.stream] = max(clock[op.stream], events[op.event])
            elif op.kind == "copy":
                t0 = clock[op.stream]
                clock[op.stream] = t0 + copy_s[op.layer]
                copies.setdefault(op.slot, []).append((t0, clock[op.stream], op.layer))
            elif op.kind == "compute":
                t0 = clock[COMPUTE]
                clock[COMPUTE] = t0 + compute_s[op.layer]
                if op.slot >= 0:
                    reads.append((op.slot, op.layer, t0, clock[COMPUTE]))
        clock[COMPUTE] += tail_s
    for slot, layer, r0, r1 in reads:
        landed = [c for c in copies.get(slot, []) if c[1] <= r0]
        if not landed or max(landed)[2] != layer:
            raise ScheduleError(f"layer {layer} runs on slot {slot} before its copy has landed")
        if any(r0 < c0 < r1 or c0 <= r0 < c1 for c0, c1, _ in copies[slot] if (c0, c1) != max(landed)[:2]):
            raise ScheduleError(f"a copy into slot {slot} overlaps layer {layer}'s kernels reading it")
    return max(clock.values())


def step_seconds(num_layers: int, streamed: Iterable[int], overlap: bool, copy_s: Mapping[int, float],
                 compute_s: Mapping[int, float], tail_s: float = 0.0, steps: int = 4) -> float:
    """Seconds per step in a steady state of `steps` (the schedule simulated, then divided)."""
    sched = StreamSchedule(num_layers, streamed, overlap)
    return simulate(sched.step(num_layers), copy_s, compute_s, steps, tail_s) / steps


