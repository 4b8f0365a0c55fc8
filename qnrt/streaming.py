"""Row streaming: a chain of ops run band by band through a few rows each.

A group is a run of consecutive ops in which each op reads only the previous
one's output (plus constants), has a RowWindow (qnrt.ops) and a band-invariant
kernel (Kernel.row_block > 0). Only the group's input and output are whole
tensors in the arena; each intermediate lives as a few rows in the group's
workspace:

    window[j]  the input rows op j's next band reads (two slots: the rows
               two bands share are copied from one slot to the other)
    out[j]     op j's latest band of output rows

Op j computes its output rows [o0, o1) by running a kernel of the same
variant, built for fewer input rows with the same pads, on input rows
[i0, i1). The window starts early enough that every kept row's taps are real
rows or the real padding, at an output row that is a multiple of the kernel's
row_block (its BLAS blocking), and ends where the kept rows' last block ends;
the rows computed above o0 and below o1 are dropped. So every kept element is
computed by the same code, from the same values, in the same order as in the
whole run: a streamed group's outputs are bit-identical to the unfused plan's
(tests/test_streaming.py).

Which runs become groups, and with how many rows per band, is chosen by
`choose_schedule`: the lowest peak whose estimated cost stays within a budget
of the unfused plan's, or the cheapest one under an arena limit.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
import numpy as np

from .graph import GraphError, Node
from .ops import Kernel, OpDef, RowWindow, get_op
from .ops._common import split_ranges
from .planner import Buffer, aligned, place
from .threads import parallel as threading_run

FLOAT = np.dtype(np.float32).itemsize
BANDS = (1, 2, 4, 8, 16)  # output rows per band the schedule tries
SPEED_BUDGET = 0.10  # default: the estimated extra time of all groups, of the plan's
MAX_GROUP = 48  # ops per group (bounds the schedule search)
SEARCH_FROM_BYTES = 1 << 20  # without an arena limit, smaller unfused arenas are kept as they are
ESTIMATE_SCALE = 0.8  # simulate() / the workspace estimate, measured on QuickNet
# The cost model: rough, for ranking schedules; tools/bench_memory.py measures.
NS_PER_TAP = 0.03  # one multiply-add (most are BLAS's)
NS_PER_BYTE = 0.05  # a row copied between band buffers
NS_PER_CALL = 6000.0  # one band's kernel call, from Python
NS_PER_COPY = 5000.0  # one copy between band buffers, from Python
COPIES_PER_BAND = 1.5  # the estimate's (simulate() counts them)
REFINE_ROUNDS = 8  # schedule picks checked by simulation
SECOND_LOOKS = 4  # groups that might lower the peak reached, simulated too


@dataclass(frozen=True)
class BandWindow:
    """How op computes one band: output rows from `first` (those above the band
    are computed and dropped), from input rows [i0, i1), with the op's own row
    pads (pads None) or with these (top, bottom) pads."""
    first: int
    i0: int
    i1: int
    pads: tuple | None = None

    @property
    def rows_in(self) -> int:
        return self.i1 - self.i0

    @property
    def key(self) -> tuple:
        return (self.i1 - self.i0, self.pads)


@dataclass(eq=False)
class Link:
    """One op of a chain, as the streamer sees it."""
    index: int  # step (node) index in the graph
    node: Node
    op: OpDef
    variant: str
    window: RowWindow
    block: int  # the kernel's row_block
    band_pads: bool  # the kernel's: band kernels may take the band's own row pads
    in_shape: tuple
    out_shape: tuple
    consts: list  # inputs 1.. : constant arrays (or None for an omitted input)
    workspace: int  # the whole-run kernel's bytes (an upper bound for a band's)
    _rows_out: dict = field(default_factory=dict, repr=False)
    _kernels: dict = field(default_factory=dict, repr=False)

    @property
    def row_in_bytes(self) -> int:
        n, c, _, w = self.in_shape
        return FLOAT * n * c * w

    @property
    def row_out_bytes(self) -> int:
        n, c, _, w = self.out_shape
        return FLOAT * n * c * w

    def band_node(self, pads: tuple | None) -> Node:
        """The node with its pads explicit (auto_pad resolved for the whole
        input), the row pads replaced by `pads` if given."""
        attrs = dict(self.node.attrs)
        if self.window.pads:
            top, left, bottom, right = self.window.pads
            if pads is not None:
                top, bottom = pads
            attrs.pop("auto_pad", None)
            attrs["pads"] = [top, left, bottom, right]
        return dataclasses.replace(self.node, attrs=attrs)

    def _band_shapes(self, rows_in: int) -> list:
        n, c, _, w = self.in_shape
        return [(n, c, rows_in, w)] + [None if a is None else tuple(np.shape(a))
                                       for a in self.consts]

    def _const_map(self) -> dict:
        return {t: a for t, a in zip(self.node.inputs[1:], self.consts) if t and a is not None}

    def rows_out(self, win: BandWindow) -> int:
        """Output rows the band kernel of this window computes."""
        if win.key not in self._rows_out:
            shape = self.op.infer(self.band_node(win.pads), self._band_shapes(win.rows_in),
                                  self._const_map())[0]
            self._rows_out[win.key] = int(shape[2])
        return self._rows_out[win.key]

    def kernel(self, win: BandWindow) -> Kernel:
        """The kernel of the same variant for this window."""
        if win.key not in self._kernels:
            node, consts = self.band_node(win.pads), self._const_map()
            in_shapes = self._band_shapes(win.rows_in)
            n, c, _, w = self.out_shape
            out_shape = (n, c, self.rows_out(win), w)
            spec = self.op.spec(node, in_shapes, [out_shape], consts)
            kernel = self.op.build(node, spec, self.variant)
            if kernel.row_block != self.block:
                raise NotStreamable(f"{node.where()}: a band kernel blocks rows differently")
            self._kernels[win.key] = kernel
        return self._kernels[win.key]

    def window_of(self, o0: int, o1: int) -> BandWindow:
        """The window for output rows [o0, o1) (o0 a multiple of the row block)."""
        w, oh, h = self.window, self.out_shape[2], self.in_shape[2]
        if self.band_pads:  # exactly the band: real rows where they exist, pads elsewhere
            top = o0 * w.stride - w.pad_begin
            bottom = (o1 - 1) * w.stride - w.pad_begin + w.extent
            i0, i1 = max(0, top), min(h, bottom)
            if i1 <= i0:
                raise NotStreamable(f"{self.node.where()}: rows {o0}..{o1} read only padding")
            return BandWindow(o0, i0, i1, (i0 - top, bottom - i1))
        lead = -(-w.pad_begin // w.stride)  # rows above o0 whose taps reach the padding
        first = (o0 - lead) // self.block * self.block if o0 >= lead else 0
        end = min(oh, -(-o1 // self.block) * self.block)
        i0 = first * w.stride
        i1 = min(h, (end - 1) * w.stride - w.pad_begin + w.extent)
        if i1 <= i0:
            raise NotStreamable(f"{self.node.where()}: rows {o0}..{o1} read only padding")
        return BandWindow(first, i0, i1)


class NotStreamable(Exception):
    """A link or band the streamer cannot run exactly (never leaves this module's
    callers: such a group is simply not chosen)."""


# --- which ops can stream -------------------------------------------------------

def links_of(graph, kernels, shapes, consts) -> list[Link | None]:
    """A Link for every node that could be a group member, else None."""
    out = []
    for i, (node, kernel) in enumerate(zip(graph.nodes, kernels)):
        out.append(_link(i, node, kernel, shapes, consts))
    return out


def _link(i, node, kernel, shapes, consts) -> Link | None:
    op = get_op(node.op)
    if op.rows is None or kernel.row_block < 1 or len(node.outputs) != 1 or not node.inputs:
        return None
    if any(t and t not in consts for t in node.inputs[1:]) or not node.inputs[0]:
        return None
    x, y = shapes[node.inputs[0]], shapes[node.outputs[0]]
    if len(x) != 4 or len(y) != 4 or x[0] != y[0]:
        return None
    in_shapes = [shapes[t] if t else None for t in node.inputs]
    window = op.rows(op.spec(node, in_shapes, [y], consts))
    if window is None:
        return None
    return Link(i, node, op, kernel.name, window, kernel.row_block, kernel.band_pads, tuple(x),
                tuple(y), [consts.get(t) if t else None for t in node.inputs[1:]],
                kernel.workspace)


def chains(graph, links: list, keep: set) -> list[list[Link]]:
    """Maximal runs of consecutive streamable nodes, each reading the previous
    one's output, which nothing else reads (and which is not in `keep`)."""
    consumers: dict[str, int] = {}
    for node in graph.nodes:
        for t in node.inputs:
            consumers[t] = consumers.get(t, 0) + 1
    runs, run = [], []
    for i, link in enumerate(links):
        joins = (link is not None and run and run[-1].index == i - 1
                 and link.node.inputs[0] == run[-1].node.outputs[0]
                 and consumers.get(run[-1].node.outputs[0], 0) == 1
                 and run[-1].node.outputs[0] not in keep)
        if joins:
            run.append(link)
            continue
        if len(run) >= 2:
            runs.append(run)
        run = [link] if link is not None else []
    if len(run) >= 2:
        runs.append(run)
    return runs


# --- one op at one band height: what it costs -------------------------------------

@dataclass(frozen=True)
class BandStats:
    window_rows: int  # the largest input window
    out_rows: int  # the largest band of output rows (kept and dropped)
    calls: int
    extra_rows: int  # output rows computed and dropped, in all
    copied_rows: int  # input rows copied into windows, in all
    windows: tuple  # a BandWindow of each kind (one band kernel each)


def cadence(links: list[Link], band: int) -> tuple:
    """Output rows per band of each op: the last op's `band`, and each earlier
    op's the input rows its consumer's band newly reads, each rounded up to
    the op's row block (so that a band's rows are used as soon as they exist)."""
    rows = [0] * len(links)
    need = band
    for k in range(len(links) - 1, -1, -1):
        link = links[k]
        rows[k] = min(link.out_shape[2], -(-need // link.block) * link.block)
        need = rows[k] * link.window.stride
    return tuple(rows)


def uniform(links: list[Link], band: int) -> tuple:
    """`band` output rows per band for every op, rounded up to its row block
    (fewer rows per tensor than cadence() past strided ops, more calls)."""
    return tuple(min(l.out_shape[2], -(-band // l.block) * l.block) for l in links)


ROW_POLICIES = (cadence, uniform)


def band_stats(link: Link, rows: int) -> BandStats:
    """What op `link` does with `rows` output rows per band."""
    oh = link.out_shape[2]
    win = out = calls = extra = copied = 0
    windows = {}
    for o0 in range(0, oh, rows):
        o1 = min(oh, o0 + rows)
        band = link.window_of(o0, o1)
        produced = link.rows_out(band)
        if produced < (min(oh, -(-o1 // link.block) * link.block) - band.first):
            raise NotStreamable(f"{link.node.where()}: a window gives too few rows")
        win, out = max(win, band.rows_in), max(out, produced)
        calls += 1
        extra += produced - (o1 - o0)
        copied += band.rows_in  # every window row is copied in (from the source or the last window)
        windows[band.key] = band
    return BandStats(win, out, calls, extra, copied, tuple(windows.values()))


@dataclass(frozen=True)
class GroupChoice:
    """A group of consecutive links whose last op makes `band` rows per band
    (`rows`: each op's rows per band, by cadence())."""
    links: tuple
    band: int
    rows: tuple
    workspace: int  # bytes: band buffers and the largest kernel workspace (estimated
    #                 until finalize() records the program)
    extra_ns: float  # estimated time above the unfused plan's
    program: "GroupProgram | None" = field(default=None, repr=False, compare=False)
    row_parts: tuple = field(default=(), repr=False, compare=False)  # RowPart, by split_rows


class Stats:
    """band_stats, once per (link, rows); None where the band cannot stream exactly."""

    def __init__(self, excluded=frozenset()):
        self._cache: dict = {}
        self.excluded = excluded

    def __call__(self, link: Link, rows: int) -> BandStats | None:
        key = (id(link), rows)
        if key not in self._cache:
            try:
                self._cache[key] = None if key in self.excluded else band_stats(link, rows)
            except (NotStreamable, GraphError):
                self._cache[key] = None
        return self._cache[key]


def _held(link: Link, producer: BandStats) -> int:
    """Bytes of op `link`'s input kept between its bands: a band of its
    producer's waiting to be read, and the rows two bands share."""
    halo = max(0, link.window.extent - link.window.stride)
    return aligned(producer.out_rows * link.row_in_bytes) + aligned(halo * link.row_in_bytes)


def _transient(link: Link, st: BandStats) -> int:
    """Bytes alive while op `link` runs a band: its window and its output band."""
    return aligned(st.window_rows * link.row_in_bytes) + aligned(st.out_rows * link.row_out_bytes)


def _extra_ns(link: Link, st: BandStats) -> float:
    """Estimated time op `link` spends on top of its whole run: dropped rows,
    copies into windows, one call per band."""
    per_row = link.row_out_bytes // FLOAT * link.window.taps
    return (st.extra_rows * per_row * NS_PER_TAP + st.copied_rows * link.row_in_bytes * NS_PER_BYTE
            + st.calls * (NS_PER_CALL + COPIES_PER_BAND * NS_PER_COPY))


def _last_ns(link: Link) -> float:
    """The last op's bands copied into the group's output."""
    return link.out_shape[2] * link.row_out_bytes * NS_PER_BYTE


def _kernel_ws(link: Link, st: BandStats) -> int:
    """A band kernel's workspace, estimated: most scale with the rows they
    see (NHWC copies, padded planes), none exceeds the whole run's."""
    rows = link.in_shape[2]
    return min(link.workspace, -(-link.workspace * st.window_rows // rows) + 4096)


def _estimate(held: int, transient: int, kernel_ws: int) -> int:
    return int(ESTIMATE_SCALE * (held + transient)) + aligned(kernel_ws)


def group_choice(links: list[Link], band: int, stats: Stats,
                 policy=cadence) -> GroupChoice | None:
    """A group with its estimated workspace (simulate() gives the exact one,
    about ESTIMATE_SCALE of this on QuickNet): per op, what it keeps between
    bands, plus the largest window and band."""
    rows = policy(links, band)
    per_op = [stats(link, r) for link, r in zip(links, rows)]
    if any(st is None for st in per_op):
        return None
    held = sum(_held(link, per_op[k - 1]) for k, link in enumerate(links) if k)
    transient = max(_transient(link, st) for link, st in zip(links, per_op))
    kernel_ws = max(_kernel_ws(link, st) for link, st in zip(links, per_op))
    extra = sum(_extra_ns(link, st) for link, st in zip(links, per_op)) + _last_ns(links[-1])
    return GroupChoice(tuple(links), band, rows, _estimate(held, transient, kernel_ws), extra)


def base_ns(shapes, graph, links) -> float:
    """The estimated time of the unfused plan (for the speed budget)."""
    total = 0.0
    for node, link in zip(graph.nodes, links):
        elems = sum(int(np.prod(shapes[t], dtype=np.int64)) for t in node.outputs)
        total += elems * (link.window.taps if link is not None else 1) * NS_PER_TAP
        total += NS_PER_CALL / 4  # one step
    return total


# --- the group as one step --------------------------------------------------------

def check_kernels(choice: GroupChoice) -> None:
    """Build every band kernel the group needs (NotStreamable or GraphError if
    one cannot be), before any arena is allocated."""
    for link, rows in zip(choice.links, choice.rows):
        for band in band_stats(link, rows).windows:
            link.kernel(band)


@dataclass(frozen=True)
class Rows:
    """Rows [r0, r1) of a block of memory: the group's whole input ("x0") or
    output ("xm"), or a (N, C, rows, W) block at `offset` floats into the
    group's workspace ("ws"), whose row k is tensor row `first` + k."""
    where: str
    r0: int
    r1: int
    offset: int = 0
    shape: tuple = ()
    first: int = 0


class _Workspace:
    """The band buffers of a simulated group: each allocation's lifetime in
    actions, planned afterwards like the arena (greedy by size), so short-lived
    bands share memory without fragmenting it."""

    def __init__(self, actions: list):
        self.actions = actions
        self.buffers: list[Buffer] = []

    def alloc(self, size: int, what: str = "") -> int:
        """A buffer of `size` floats, written by the next action; its id."""
        self.buffers.append(Buffer(what or str(len(self.buffers)), FLOAT * size,
                                   len(self.actions), len(self.actions)))
        return len(self.buffers) - 1

    def free(self, ident: int) -> None:
        """The buffer is read by no action after the last one recorded."""
        self.buffers[ident].last = max(self.buffers[ident].first, len(self.actions) - 1)

    def _lifetimes(self) -> None:
        """Each buffer lives at least from the first to the last action that
        touches it (a band read by no later band is never freed explicitly)."""
        for index, action in enumerate(self.actions):
            for rows in action[1:]:
                if isinstance(rows, Rows) and rows.where == "ws":
                    buf = self.buffers[rows.offset]
                    buf.first, buf.last = min(buf.first, index), max(buf.last, index)

    def plan(self) -> tuple[list[int], int]:
        """(float offset of each buffer, floats in all)."""
        self._lifetimes()
        arena = place(self.buffers, len(self.actions) + 1)
        return [b.offset // FLOAT for b in self.buffers], arena // FLOAT

    def live_peak(self) -> int:
        """Floats of the largest set of buffers alive at once: what a plan
        needs at least (and about what the greedy plan takes), found in
        O(n log n) for the schedule search."""
        self._lifetimes()
        events = sorted([(b.first, aligned(b.size)) for b in self.buffers]
                        + [(b.last + 1, -aligned(b.size)) for b in self.buffers],
                        key=lambda e: (e[0], e[1]))
        live = peak = 0
        for _, delta in events:
            live += delta
            peak = max(peak, live)
        return peak // FLOAT


@dataclass
class GroupProgram:
    """A group's band-by-band run, recorded: kernel calls and row copies over
    `Rows`, bound to memory by `bind`."""
    actions: list  # ("copy", dst Rows, src Rows) | ("run", link, rows_in, src Rows, dst Rows)
    workspace_floats: int
    offsets: list | None  # float offset of each band buffer (Rows.offset is its index
    #                       here); None: simulated for its peak only, not placed


def first_rows(links, band_rows, start: int) -> list[int]:
    """The first output row of each op when the last op starts at `start`:
    the row block where the first rows its consumer's first band reads lie."""
    first = [0] * len(links)
    first[-1] = start
    for j in range(len(links) - 1, 0, -1):
        link = links[j]
        if first[j] == 0:
            break
        win = link.window_of(first[j], min(link.out_shape[2], first[j] + band_rows[j]))
        block = links[j - 1].block
        first[j - 1] = win.i0 // block * block
    return first


def simulate(choice: GroupChoice, place: bool = True, rows: tuple | None = None) -> GroupProgram:
    """Run the group on paper. Each op pulls the rows its next band reads from
    its producer (which runs as many bands as that takes), copies them into
    one window (or reads them in place when its kernel takes strided input
    and one buffer holds them all), runs, and frees what no later band
    reads: so only a few rows of each intermediate are alive at once.
    rows (start, end): only those output rows of the last op (start a
    multiple of its row block); each op then starts at the first row block
    the next one reads."""
    links, band_rows = list(choice.links), choice.rows
    m = len(links)
    actions: list = []
    mem = _Workspace(actions)
    pieces: list[list[Rows]] = [[] for _ in range(m)]  # rows of op j's input, by op j-1
    end = links[-1].out_shape[2] if rows is None else rows[1]
    next_row = first_rows(links, band_rows, 0 if rows is None else rows[0])
    produced = [links[0].in_shape[2]] + next_row  # op j's input rows made (or not needed)

    def release(j: int, later: int | None, row_floats: int) -> list:
        """Op j's input pieces after a band: those no later band reads freed, the
        rows a later band shares with this one copied to a smaller buffer."""
        keep = []
        for p in pieces[j]:
            if later is None or p.r1 <= later:
                mem.free(p.offset)
            elif p.r0 < later:
                at = mem.alloc(row_floats * (p.r1 - later), f"halo {j} rows {later}:{p.r1}")
                halo = Rows("ws", later, p.r1, at, (p.shape[0], p.shape[1], p.r1 - later,
                                                   p.shape[3]), later)
                actions.append(("copy", halo, dataclasses.replace(p, r0=later)))
                mem.free(p.offset)
                keep.append(halo)
            else:
                keep.append(p)
        return keep

    def produce(j: int) -> None:
        link = links[j]
        oh = link.out_shape[2] if j < m - 1 else end
        o0 = next_row[j]
        o1 = min(oh, o0 + band_rows[j])
        next_row[j] = o1
        band = link.window_of(o0, o1)
        i0, i1 = band.i0, band.i1
        while produced[j] < i1:
            produce(j - 1)
        n, c, _, w = link.in_shape
        sources = ([Rows("x0", 0, link.in_shape[2])] if j == 0 else pieces[j])
        holder = next((p for p in sources if p.r0 <= i0 and i1 <= p.r1), None)
        whole = (holder is not None and holder.where == "ws" and holder.first == i0
                 and holder.shape[2] == i1 - i0)  # a band buffer that is exactly the window
        if holder is not None and (whole or link.kernel(band).strided_input):
            window, owned = dataclasses.replace(holder, r0=i0, r1=i1), None
        else:
            owned = mem.alloc(n * c * (i1 - i0) * w, f"window {j} rows {i0}:{i1}")
            window = Rows("ws", i0, i1, owned, (n, c, i1 - i0, w), i0)
            r = i0
            for p in sources:
                lo, hi = max(r, p.r0), min(i1, p.r1)
                if lo < hi and lo == r:
                    actions.append(("copy", dataclasses.replace(window, r0=lo, r1=hi),
                                    dataclasses.replace(p, r0=lo, r1=hi)))
                    r = hi
            assert r == i1, "a row was freed before it was read"
        later = link.window_of(o1, min(oh, o1 + band_rows[j])).i0 if o1 < oh else None
        if j > 0 and owned is not None:  # copied: what no later band reads goes now
            pieces[j] = release(j, later, n * c * w)
        rows_out = link.rows_out(band)
        n2, c2, _, w2 = link.out_shape
        out_at = mem.alloc(n2 * c2 * rows_out * w2, f"out {j} rows {band.first}+{rows_out}")
        out = Rows("ws", o0, o1, out_at, (n2, c2, rows_out, w2), band.first)
        actions.append(("run", link, band, window, out))
        if owned is not None:
            mem.free(owned)
        elif j > 0:  # read in place: freed once the run has read it
            pieces[j] = release(j, later, n * c * w)
        if j == m - 1:
            actions.append(("copy", Rows("xm", o0, o1), out))
            mem.free(out_at)
        else:
            pieces[j + 1].append(out)
            produced[j + 1] = o1

    while next_row[m - 1] < end:
        produce(m - 1)
    if not place:  # the schedule search: the peak, without offsets
        return GroupProgram(actions, mem.live_peak(), None)
    offsets, floats = mem.plan()
    return GroupProgram(actions, floats, offsets)


def bind(program: GroupProgram, x0: np.ndarray, xm: np.ndarray,
         workspace: np.ndarray) -> list:
    """The recorded actions as (function, args) over views of real memory."""
    band_bytes = aligned(FLOAT * program.workspace_floats)
    band_flat = workspace[:band_bytes].view(np.float32)
    kernel_ws = workspace[band_bytes:]

    def view(rows: Rows) -> np.ndarray:
        if rows.where == "x0":
            return x0[:, :, rows.r0:rows.r1]
        if rows.where == "xm":
            return xm[:, :, rows.r0:rows.r1]
        size, at = int(np.prod(rows.shape)), program.offsets[rows.offset]
        block = band_flat[at:at + size].reshape(rows.shape)
        return block[:, :, rows.r0 - rows.first:rows.r1 - rows.first]

    out = []
    for action in program.actions:
        if action[0] == "copy":
            out.append((np.copyto, (view(action[1]), view(action[2]))))
            continue
        _, link, band, src, dst = action
        kernel = link.kernel(band)
        whole = dataclasses.replace(dst, r0=dst.first, r1=dst.first + dst.shape[2])
        args = ([view(src)] + list(link.consts), [view(whole)],
                kernel_ws if kernel.workspace else None)
        if kernel.run_rows is not None:  # only the rows the band keeps
            out.append((kernel.run_rows, args + (dst.r0 - dst.first, dst.r1 - dst.first)))
        else:
            out.append((kernel.run, args))
    return out


def finalize(choice: GroupChoice, place: bool = True) -> GroupChoice:
    """The group with its recorded program and exact workspace: the band
    buffers' high-water mark, then the largest band kernel's workspace
    (place=False: their live peak, for the search)."""
    program = simulate(choice, place)
    kernel_ws = max((link.kernel(b).workspace for link, rows in zip(choice.links, choice.rows)
                     for b in band_stats(link, rows).windows), default=0)
    extra = 0.0  # the cost model, on the recorded actions
    for action in program.actions:
        if action[0] == "copy":
            dst = action[1]
            n, c, _, w = dst.shape if dst.shape else choice.links[-1].out_shape
            extra += NS_PER_COPY + (dst.r1 - dst.r0) * n * c * w * FLOAT * NS_PER_BYTE
        else:
            extra += NS_PER_CALL
    for link, rows in zip(choice.links, choice.rows):
        st = band_stats(link, rows)
        extra += st.extra_rows * link.row_out_bytes // FLOAT * link.window.taps * NS_PER_TAP
    return dataclasses.replace(choice, program=program, extra_ns=extra,
                               workspace=aligned(FLOAT * program.workspace_floats)
                               + aligned(kernel_ws))


@dataclass(frozen=True)
class RowPart:
    """Output rows [start, end) of a group's last op for images [n0, n1),
    simulated on their own: their program, and the bytes of its band buffers
    and of its largest band kernel's scratch (one after the other in the
    group's workspace)."""
    start: int
    end: int
    program: GroupProgram
    band_bytes: int
    kernel_bytes: int
    images: tuple | None = None  # (n0, n1); None: every image


def _part(choice: GroupChoice, rows: tuple | None, images: tuple | None) -> RowPart:
    program = simulate(choice, True, rows)
    kernel_ws = max((action[1].kernel(action[2]).workspace for action in program.actions
                     if action[0] == "run"), default=0)
    start, end = rows if rows is not None else (0, choice.links[-1].out_shape[2])
    return RowPart(start, end, program, aligned(FLOAT * program.workspace_floats),
                   aligned(kernel_ws), images)


def split_rows(choice: GroupChoice, parts: int) -> GroupChoice:
    """The finalized group with its last op's output rows in `parts` ranges,
    each a program of its own over its own band buffers, for as many threads.
    Each range starts at a multiple of the last op's row block, and each op's
    bands at multiples of its own, so every row comes out of the same band
    kernels' arithmetic: the same bits as one range (the rows where ranges
    meet are computed by both, and written by one). The workspace is the
    ranges' own, added up."""
    last = choice.links[-1]
    oh, block = last.out_shape[2], last.block
    starts = sorted({min(oh, round(oh * k / parts / block) * block) for k in range(parts)})
    ranges = [(a, b) for a, b in zip(starts, starts[1:] + [oh]) if a < b]
    if len(ranges) < 2:
        return choice
    pieces = [_part(choice, r, None) for r in ranges]
    return dataclasses.replace(choice, row_parts=tuple(pieces),
                               workspace=sum(p.band_bytes + p.kernel_bytes for p in pieces))


def split_images(choice: GroupChoice, parts: int) -> GroupChoice:
    """The finalized group with its images in `parts` ranges, each run band by
    band through band buffers for its own images only: so the ranges' buffers
    add up to about one range's for every image, and a batch spreads over
    threads without a larger arena. A band kernel computes each image as it
    does in a batch (checked bit for bit by tests/test_threads.py)."""
    n = choice.links[0].in_shape[0]
    ranges = [(a, b) for a, b in split_ranges(n, min(parts, n)) if a < b]
    if len(ranges) < 2:
        return choice
    pieces = []
    for n0, n1 in ranges:
        links = tuple(_with_images(link, n1 - n0) for link in choice.links)
        pieces.append(_part(dataclasses.replace(choice, links=links, program=None), None,
                            (n0, n1)))
    return dataclasses.replace(choice, row_parts=tuple(pieces),
                               workspace=sum(p.band_bytes + p.kernel_bytes for p in pieces))


def _with_images(link: Link, n: int) -> Link:
    """The link for a batch of n of its images (its band kernels built anew)."""
    return dataclasses.replace(link, in_shape=(n,) + link.in_shape[1:],
                               out_shape=(n,) + link.out_shape[1:], _rows_out={}, _kernels={})


def row_split_candidates(group: GroupChoice, threads: int):
    """The group split for `threads`: by images where it has several, then by
    rows in its own bands, then in lower ones (of two rows or more)."""
    if group.links[0].in_shape[0] > 1:
        try:
            split = split_images(group, threads)
        except (NotStreamable, GraphError):
            split = group
        if split.row_parts:
            yield split
    split = split_rows(group, threads)
    if not split.row_parts:
        return
    yield split
    links = list(group.links)
    # not bands of one row: they make more calls than a second thread saves
    # (QuickNet at 224x224 on 2 threads: 47 ms, against 37.5 ms unsplit)
    for band in (b for b in (group.band // 2, group.band // 4) if b >= 2):
        for policy in (cadence, uniform):
            try:
                choice = group_choice(links, band, Stats(), policy)
                if choice is None:
                    continue
                check_kernels(choice)
                split = split_rows(finalize(choice), threads)
            except (NotStreamable, GraphError):
                continue
            if split.row_parts:
                yield split


def group_kernel(choice: GroupChoice, x0: np.ndarray, xm: np.ndarray,
                 workspace: np.ndarray, pool=None) -> Kernel:
    """A finalized group as one step over its views in the arena (bound once:
    the views are the program's). With row parts (split_rows) and a pool,
    each range of rows runs on a thread of its own."""
    names = " > ".join(link.variant for link in choice.links)
    name = f"stream({names}; {choice.band} rows)"
    if choice.row_parts and pool is not None and pool.threads > 1:
        bound, at = [], 0
        for part in choice.row_parts:
            size = part.band_bytes + part.kernel_bytes
            images = slice(*part.images) if part.images else slice(None)
            bound.append(bind(part.program, x0[images], xm[images], workspace[at:at + size]))
            at += size

        def run_parts(p0, p1, ins, outs, _workspace):  # each range has its own memory
            for part in range(p0, p1):
                for fn, args in bound[part]:
                    fn(*args)
        run = threading_run(run_parts, len(bound), pool)
        return Kernel(run, workspace=choice.workspace, name=name, parts=len(bound),
                      run_parts=run_parts)
    actions = bind(choice.program, x0, xm, workspace)  # band kernels' parts in order

    def run(ins, outs, _workspace):
        for fn, args in actions:
            fn(*args)
    return Kernel(run, workspace=choice.workspace, name=name)


# --- the schedule ----------------------------------------------------------------

@dataclass(frozen=True)
class Schedule:
    groups: tuple  # of GroupChoice
    peak_estimate: int  # bytes: the tensor-level bound of the streamed plan, estimated

    @property
    def extra_ns(self) -> float:
        return sum(g.extra_ns for g in self.groups)


class Candidate:
    """A group the search may choose, estimated; made a GroupChoice only if chosen."""
    __slots__ = ("run", "a", "b", "band", "rows", "workspace", "extra_ns")
    program = None  # never simulated

    def __init__(self, run, a, b, band, rows, workspace, extra_ns):
        self.run, self.a, self.b, self.band, self.rows = run, a, b, band, rows
        self.workspace, self.extra_ns = workspace, extra_ns

    def choice(self) -> GroupChoice:
        return GroupChoice(tuple(self.run[self.a:self.b]), self.band,
                           tuple(self.rows[self.a:self.b]), self.workspace, self.extra_ns)

    @property
    def links(self):
        return self.run[self.a:self.b]


def _candidates(run: list[Link], stats: Stats) -> dict:
    """(start, stop) -> [GroupChoice for each band and row policy that streams
    exactly], the sums kept running as groups grow (O(n^2) in the chain)."""
    m = len(run)
    out: dict = {}

    def add(a, b, band, rows, st, held, transient, kernel_ws, extra):
        out.setdefault((a, b + 1), []).append(Candidate(
            run, a, b + 1, band, rows, _estimate(held, transient, kernel_ws),
            extra + _last_ns(run[b])))

    for band in BANDS:
        rows = uniform(run, band)  # each op's rows do not depend on the group
        st = [stats(link, r) for link, r in zip(run, rows)]
        for a in range(m):
            if st[a] is None:
                continue
            held, transient = 0, _transient(run[a], st[a])
            kernel_ws, extra = _kernel_ws(run[a], st[a]), _extra_ns(run[a], st[a])
            for b in range(a + 1, min(m, a + MAX_GROUP)):
                if st[b] is None:
                    break
                held += _held(run[b], st[b - 1])
                transient = max(transient, _transient(run[b], st[b]))
                kernel_ws = max(kernel_ws, _kernel_ws(run[b], st[b]))
                extra += _extra_ns(run[b], st[b])
                add(a, b, band, rows, st, held, transient, kernel_ws, extra)
        for b in range(1, m):  # cadence: each op's rows follow from the group's last op
            lo = max(0, b - MAX_GROUP + 1)
            rows = [0] * lo + list(cadence(run[lo:b + 1], band))
            st = [None] * lo + [stats(link, r) for link, r in zip(run[lo:b + 1], rows[lo:])]
            if st[b] is None:
                continue
            held, transient = 0, _transient(run[b], st[b])
            kernel_ws, extra = _kernel_ws(run[b], st[b]), _extra_ns(run[b], st[b])
            for a in range(b - 1, lo - 1, -1):
                if st[a] is None:
                    break
                held += _held(run[a + 1], st[a])
                transient = max(transient, _transient(run[a], st[a]))
                kernel_ws = max(kernel_ws, _kernel_ws(run[a], st[a]))
                extra += _extra_ns(run[a], st[a])
                add(a, b, band, rows, st, held, transient, kernel_ws, extra)
    return out


def choose_schedule(runs: list[list[Link]], live_bytes: list[int], step_tensors: list,
                    tensor_bytes: dict, base: float, arena_limit: int | None = None,
                    budget: float | None = None, excluded: frozenset = frozenset()) -> Schedule:
    """The groups to stream.

    live_bytes[i]: bytes live at step i in the unfused plan; step_tensors[i]:
    the (tensor or workspace, bytes) pairs live then, so a group's peak counts
    what else is alive during it. With `arena_limit`, the cheapest schedule
    whose estimated peak fits it; else the lowest peak whose estimated extra
    time is within `budget` (SPEED_BUDGET) of `base`.
    """
    stats = Stats(excluded)
    options = []  # per run: {(a, b): [(peak, GroupChoice)]}
    for run in runs:
        cands = _candidates(run, stats)
        with_peak = {}
        for (a, b), choices in cands.items():
            inner = {l.node.outputs[0] for l in run[a:b - 1]}
            x0, xm = run[a].node.inputs[0], run[b - 1].node.outputs[0]
            mine = inner | {x0, xm} | {f"{l.node.name or l.node.outputs[0]}:workspace"
                                       for l in run[a:b]}
            others = max(sum(size for name, size in step_tensors[l.index] if name not in mine)
                         for l in run[a:b])
            whole = tensor_bytes[x0] + tensor_bytes[xm]
            # [peak, choice, bytes besides the group's workspace]: refine() makes them exact
            with_peak[a, b] = sorted(([others + whole + c.workspace, c, others + whole]
                                      for c in choices), key=lambda e: e[0])
        options.append(with_peak)
    entry_of = {id(e[1]): e for opts in options for v in opts.values() for e in v}

    def refine(groups) -> bool:
        """Simulate the chosen groups not yet simulated (exact workspace and
        cost); False if all were exact already."""
        changed = False
        for g in groups:
            if g.program is not None:
                continue
            entry, changed = entry_of.pop(id(g)), True
            try:
                choice = g.choice()
                check_kernels(choice)
                exact = finalize(choice, place=False)
            except (NotStreamable, GraphError):  # cannot run exactly: never chosen again
                entry[0] = float("inf")
                continue
            entry[0], entry[1] = entry[2] + exact.workspace, exact
            entry_of[id(exact)] = entry
        for opts in options:  # the lists stay sorted by peak for best()
            for key, entries in opts.items():
                entries.sort(key=lambda e: e[0])
        return changed
    in_runs = {l.index for run in runs for l in run}
    floor = max((live_bytes[i] for i in range(len(live_bytes)) if i not in in_runs), default=0)

    def best(limit: int):
        """The cheapest schedule with every step's peak <= limit (None if none)."""
        groups, total = [], 0.0
        for run, opts in zip(runs, options):
            m = len(run)
            cost = [0.0] + [float("inf")] * m
            back: list = [None] * (m + 1)
            for i in range(m):
                if cost[i] == float("inf"):
                    continue
                if live_bytes[run[i].index] <= limit and cost[i] < cost[i + 1]:
                    cost[i + 1], back[i + 1] = cost[i], (i, None)
                for k in range(i + 2, min(m, i + MAX_GROUP) + 1):
                    for peak, choice, _ in opts.get((i, k), ()):
                        if peak > limit:
                            break  # sorted by peak
                        if cost[i] + choice.extra_ns < cost[k]:
                            cost[k], back[k] = cost[i] + choice.extra_ns, (i, choice)
            if cost[m] == float("inf"):
                return None
            k = m
            while k > 0:
                i, choice = back[k]
                if choice is not None:
                    groups.append(choice)
                k = i
            total += cost[m]
        return groups, total

    allowed = (SPEED_BUDGET if budget is None else budget) * base

    def select() -> Schedule:
        if arena_limit is not None:
            found = best(arena_limit)
            if found is None:
                return Schedule((), -1)  # the caller reports the smallest reachable
            return Schedule(tuple(sorted(found[0], key=lambda g: g.links[0].index)),
                            arena_limit)
        peaks = sorted({e[0] for e in entry_of.values() if e[0] != float("inf")}
                       | {live_bytes[l.index] for run in runs for l in run} | {floor})
        peaks = [p for p in peaks if p >= floor]
        lo, hi = 0, len(peaks) - 1  # the largest peak streams nothing: always allowed
        while lo < hi:
            mid = (lo + hi) // 2
            found = best(peaks[mid])
            if found is not None and found[1] <= allowed:
                hi = mid
            else:
                lo = mid + 1
        found = best(peaks[lo])
        groups = found[0] if found is not None and found[1] <= allowed else []
        return Schedule(tuple(sorted(groups, key=lambda g: g.links[0].index)), peaks[lo])

    def settle(sched: Schedule) -> Schedule:
        for _ in range(REFINE_ROUNDS):  # estimates pick, simulation checks, until they agree
            if not refine(sched.groups):
                return sched
            sched = select()
        refine(sched.groups)
        return Schedule(tuple(g for g in sched.groups if g.program is not None),
                        sched.peak_estimate)

    sched = settle(select())
    if arena_limit is None and sched.groups:
        # the estimates run high: simulate the groups that would lower the peak
        # reached if their exact cost came in within budget, least costly first
        chosen = {id(link) for g in sched.groups for link in g.links}
        near = sorted((e for e in entry_of.values()
                       if e[1].program is None and e[0] * ESTIMATE_SCALE < sched.peak_estimate
                       and e[1].extra_ns * ESTIMATE_SCALE <= allowed
                       and any(id(link) in chosen for link in e[1].links)), key=lambda e: e[0])
        if refine([e[1] for e in near[:SECOND_LOOKS]]):
            sched = settle(select())
    return sched


@dataclass(frozen=True)
class GroupSpec:
    """A group named by hand (tests, tools): nodes `first` .. `last` (names),
    `band` rows per band of the last, each op's rows by `policy`."""
    first: str
    last: str
    band: int
    policy: str = "uniform"  # or "cadence"
    rows: tuple = ()  # each op's rows per band, given (the policy is then not used)


def forced_schedule(runs: list[list[Link]], specs) -> Schedule:
    """The Schedule for GroupSpecs; GraphError for one that is not a streamable chain."""
    groups = []
    for spec in specs:
        for run in runs:
            names = [link.node.name for link in run]
            if spec.first in names and spec.last in names:
                a, b = names.index(spec.first), names.index(spec.last) + 1
                policy = {"uniform": uniform, "cadence": cadence}[spec.policy]
                if spec.rows:
                    if len(spec.rows) != b - a:
                        break
                    policy = (lambda rows: lambda links, band: tuple(rows))(spec.rows)
                choice = group_choice(run[a:b], spec.band, Stats(), policy) if b - a >= 2 else None
                if choice is None:
                    break
                groups.append(choice)
                break
        else:
            raise GraphError(f"nodes {spec.first!r} .. {spec.last!r} are not one streamable chain")
        if not groups or groups[-1].links[0].node.name != spec.first:
            raise GraphError(f"nodes {spec.first!r} .. {spec.last!r} cannot stream "
                             f"{spec.band} rows per band")
    return Schedule(tuple(groups), 0)


def smallest_schedule(runs, live_bytes, step_tensors, tensor_bytes, base,
                      excluded: frozenset = frozenset()) -> Schedule:
    """The lowest-peak schedule, whatever it costs."""
    return choose_schedule(runs, live_bytes, step_tensors, tensor_bytes, base,
                           budget=float("inf"), excluded=excluded)
