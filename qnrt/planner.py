"""Static activation-memory planning: buffers with lifetimes in, offsets into
one arena out. Knows nothing about kernels; it sees only sizes and the steps
at which each buffer is first written and last read.

Offsets are assigned greedy-by-size (Pisarchyk & Lee, 2020; TFLite's
GreedyMemoryPlanner): largest buffer first, each placed at the lowest
aligned offset that does not collide with an already placed buffer whose
lifetime overlaps. The same first fit in greedy-by-breadth order (buffers of
the largest live sets first) is tried too, and the smaller arena kept.
"""
from __future__ import annotations

from dataclasses import dataclass, field

ALIGN = 64  # bytes: cache-line aligned, and what SIMD loads like
READ_AFTER_RUN = 1 << 30  # `last` of a buffer read after the last step (graph outputs)


@dataclass
class Buffer:
    name: str
    size: int  # bytes
    first: int  # step that writes it (-1: live before step 0, e.g. graph inputs)
    last: int  # last step that reads it (READ_AFTER_RUN: read after the run)
    offset: int = -1


@dataclass
class Plan:
    buffers: list[Buffer]
    arena_bytes: int
    naive_bytes: int  # every buffer its own allocation
    lower_bound: int  # bytes of the largest set of buffers live at one step
    live_per_step: list[list[str]] = field(default_factory=list)

    def offsets(self) -> dict[str, int]:
        return {b.name: b.offset for b in self.buffers}


def aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def _overlap(a: Buffer, b: Buffer) -> bool:
    return a.first <= b.last and b.first <= a.last


def plan(buffers: list[Buffer], steps: int) -> Plan:
    """Offsets for `buffers` over steps -1 .. steps - 1 (see the module doc):
    greedy by size, and greedy by size within the largest live sets first
    (greedy by breadth); the smaller arena wins."""
    by_size = sorted(buffers, key=lambda b: (-b.size, b.first, b.name))
    best = _place(by_size, steps)
    if len(buffers) <= BREADTH_MAX_BUFFERS:
        load = [0] * (steps + 2)
        for b in buffers:
            for s in range(max(b.first, -1), min(b.last, steps - 1) + 1):
                load[s + 1] += b.size
        by_breadth = sorted(buffers, key=lambda b: (
            -max(load[max(b.first, -1) + 1:min(b.last, steps - 1) + 2], default=0),
            -b.size, b.first, b.name))
        offsets = _place(by_breadth, steps)
        if _arena(buffers, offsets) < _arena(buffers, best):
            best = offsets
    for b in buffers:
        b.offset = best[id(b)]
    return _summary(buffers, steps)


BREADTH_MAX_BUFFERS = 4096  # the second order's live-set scan is O(buffers x steps)


def place(buffers: list[Buffer], steps: int) -> int:
    """Greedy by size only, setting each offset; returns the arena bytes. For
    many short-lived buffers whose per-step live sets nobody reads (a streamed
    group's bands)."""
    offsets = _place(sorted(buffers, key=lambda b: (-b.size, b.first, b.name)), steps)
    for b in buffers:
        b.offset = offsets[id(b)]
    return _arena(buffers, offsets)


def _arena(buffers, offsets) -> int:
    return max((aligned(offsets[id(b)] + b.size) for b in buffers), default=0)


def _place(order: list[Buffer], steps: int) -> dict[int, int]:
    """First fit in `order`: each buffer at the lowest aligned offset clear of
    the placed buffers whose lifetimes overlap its own. Clashes are looked up
    in buckets of steps, so thousands of short-lived buffers (a streamed
    group's bands) stay fast."""
    width = max(1, (steps + 1) // 512)

    def span(b):  # the buckets a buffer's lifetime touches
        return range((b.first + 1) // width, (min(b.last, steps) + 1) // width + 1)

    buckets: dict[int, list[Buffer]] = {}
    offsets: dict[int, int] = {}
    for buf in order:
        near = {id(p): p for k in span(buf) for p in buckets.get(k, ())}
        clashes = sorted((p for p in near.values() if _overlap(p, buf)),
                         key=lambda p: offsets[id(p)])
        offset = 0
        for p in clashes:
            if offset + buf.size <= offsets[id(p)]:
                break  # fits in the gap before p
            offset = max(offset, aligned(offsets[id(p)] + p.size))
        offsets[id(buf)] = offset
        for k in span(buf):
            buckets.setdefault(k, []).append(buf)
    return offsets


def _summary(buffers: list[Buffer], steps: int) -> Plan:
    arena = max((aligned(b.offset + b.size) for b in buffers), default=0)
    live: list[list[str]] = [[] for _ in range(steps + 1)]
    for b in buffers:
        for s in range(max(b.first, -1), min(b.last, steps - 1) + 1):
            live[s + 1].append(b.name)
    sizes = {b.name: b.size for b in buffers}
    bound = max((sum(sizes[n] for n in names) for names in live), default=0)
    naive = sum(aligned(b.size) for b in buffers)
    return Plan(buffers, arena, naive, bound, live)


def check(plan: Plan) -> None:
    """No two buffers that are live together share a byte; all are aligned."""
    for i, a in enumerate(plan.buffers):
        assert a.offset % ALIGN == 0 and a.offset + a.size <= plan.arena_bytes, a
        for b in plan.buffers[i + 1:]:
            if _overlap(a, b):
                assert a.offset + a.size <= b.offset or b.offset + b.size <= a.offset, (a, b)
