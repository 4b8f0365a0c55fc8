"""The compiler: graph + concrete input shapes -> Program.

    shapes     every tensor's shape, from each op's shape rule
    kernels    one kernel variant per node (KernelChoice: auto, reference,
               or forced per op type, node name or variant name)
    lifetimes  the step that writes each tensor and the last that reads it
    sharing    aliases (Reshape & co.) and in-place elementwise outputs share
               their input's buffer
    streaming  chains of ops run band by band (qnrt.streaming): only their
               first input and last output are whole tensors
    memory     one arena: tensors and kernel workspaces planned by
               qnrt.planner, which sees only sizes and lifetimes
    views      each tensor and workspace as a view into the arena

A Program runs without allocating activation memory: Session.run copies the
inputs into their views and calls each step's kernel.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from .graph import Graph, GraphError
from .ops import Kernel, get_op
from .planner import ALIGN, READ_AFTER_RUN, Buffer, Plan, plan
from .threads import threaded, threaded_workspace

FLOAT = np.dtype(np.float32).itemsize


@dataclass(frozen=True)
class KernelChoice:
    """Which kernel variant runs each node.

    reference: every op on its reference variant.
    forced: {key: variant name}; a key is an op type ("Conv"), a node name, or
    the variant the automatic choice would take ("conv.dw3x3.padded"). The
    node name wins over the variant name, which wins over the op type.
    """
    reference: bool = False
    forced: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, kernels) -> "KernelChoice":
        """From Session's `kernels` argument: None/"auto", "reference", or a mapping."""
        if kernels is None or kernels == "auto":
            return cls()
        if kernels == "reference":
            return cls(reference=True)
        if isinstance(kernels, Mapping):
            from .ops import all_variants
            known = {v for names in all_variants().values() for v in names}
            for key, name in kernels.items():
                if name != "reference" and name not in known:
                    raise ValueError(f"kernels[{key!r}] = {name!r} is not a kernel variant; "
                                     f"they are {sorted(known)} (or 'reference')")
            return cls(forced=dict(kernels))
        raise ValueError("kernels must be 'auto', 'reference' or a mapping of op type, node "
                         f"name or variant name to a variant name, not {kernels!r}")

    def kernel(self, node, in_shapes, out_shapes, consts) -> Kernel:
        op = get_op(node.op)
        spec = op.spec(node, in_shapes, out_shapes, consts)
        auto = op.reference if self.reference else op.choose(spec)
        name = (self.forced.get(node.name) or self.forced.get(auto.name)
                or self.forced.get(node.op))
        if name == "reference":
            name = op.reference.name
        return op.build(node, spec, variant=name or auto.name)


@dataclass
class Step:
    node_name: str
    op: str  # the node's op, or "Stream" for a streamed group of nodes
    kernel: Kernel
    inputs: list  # arena views or constant arrays (None: omitted)
    outputs: list
    workspace: np.ndarray | None
    members: list = field(default_factory=list)  # (node name, variant) of each node it runs


@dataclass
class Program:
    """Everything a run needs for one set of input shapes, fixed before it runs."""
    shapes: dict
    steps: list[Step]
    memory: Plan
    tensor_buffer: dict  # tensor name -> the buffer it lives in
    views: dict  # tensor name -> arena view (a streamed group's intermediates have none)
    arena: np.ndarray = field(repr=False)
    unfused: Plan | None = None  # the plan without streaming (for reports)
    groups: tuple = ()  # the streamed groups (streaming.GroupChoice)


def infer_shapes(graph: Graph, input_shapes: dict[str, tuple] | None = None) -> dict[str, tuple]:
    """Concrete shape of every tensor, given concrete input shapes.

    Each op's shape rule lives beside its kernels in qnrt/ops/<op>.
    """
    shapes: dict[str, tuple] = {k: tuple(v.shape) for k, v in graph.initializers.items()}
    for vi in graph.inputs:
        shape = tuple((input_shapes or {}).get(vi.name, vi.shape))
        if any(not isinstance(d, (int, np.integer)) or d < 1 for d in shape):
            raise GraphError(f"input '{vi.name}' needs a concrete shape, got {shape}")
        shapes[vi.name] = tuple(int(d) for d in shape)
    for node in graph.nodes:
        in_shapes = [shapes[i] if i else None for i in node.inputs]
        try:
            outs = get_op(node.op).infer(node, in_shapes, graph.initializers)
        except GraphError:
            raise
        except Exception as exc:  # a rule's assertion becomes a named error
            raise GraphError(f"{node.where()}: cannot infer output shape from inputs "
                             f"{in_shapes}: {exc}") from exc
        for name, shape in zip(node.outputs, outs):
            if any(int(d) < 0 for d in shape):
                raise GraphError(f"{node.where()} gives '{name}' an invalid shape {shape}")
            shapes[name] = tuple(int(d) for d in shape)
    return shapes


def check_tensor_limits(graph: Graph, shapes: dict, limits: Limits) -> None:
    """LimitError for an activation tensor beyond the limits, in Python
    integers (a product of dims cannot overflow here, unlike np.prod)."""
    for name, shape in shapes.items():
        if name in graph.initializers:
            continue
        big = [d for d in shape if d > limits.max_dim]
        if big:
            raise LimitError(f"tensor '{name}' would have shape {tuple(shape)}: dimension "
                             f"{big[0]:,} is more than Limits.max_dim={limits.max_dim:,}")
        size = FLOAT
        for d in shape:
            size *= int(d)
        if size > limits.max_tensor_bytes:
            raise LimitError(f"tensor '{name}' would have shape {tuple(shape)}: {mib(size)}, "
                             f"more than Limits.max_tensor_bytes={limits.max_tensor_bytes:,}")


def last_uses(graph: Graph) -> dict[str, int]:
    """tensor -> index of the last step that reads it."""
    last = {}
    for i, node in enumerate(graph.nodes):
        for t in node.inputs:
            if t:
                last[t] = i
    return last


def nbytes(shape) -> int:
    return FLOAT * int(np.prod(shape, dtype=np.int64))


from .errors import ArenaLimitError, LimitError, Limits, mib  # noqa: E402  (re-exported)


@dataclass
class Layout:
    """Buffers for a schedule: each tensor's buffer, each step's workspace."""
    buffers: dict  # buffer name -> Buffer
    tensor_buffer: dict  # tensor -> buffer name
    workspaces: dict  # first node index of a step -> Buffer
    group_at: dict  # first node index of a group -> GroupChoice

    def plan(self, steps: int) -> Plan:
        return plan(list(self.buffers.values()) + list(self.workspaces.values()), steps)


def _layout(graph: Graph, shapes: dict, kernels: list, groups=()) -> Layout:
    """Lifetimes of every buffer when `groups` (streaming.GroupChoice) are
    streamed: a group's intermediates have no buffer, its input and output are
    live through all its nodes, its band buffers are its workspace."""
    last_use = last_uses(graph)
    outputs = {v.name for v in graph.outputs}
    tensor_buffer: dict[str, str] = {}
    buffers: dict[str, Buffer] = {}
    members: dict[str, list[str]] = {}
    group_at = {g.links[0].index: g for g in groups}
    in_group = {link.index: g for g in groups for link in g.links}

    def end_of(tensor, default):
        return READ_AFTER_RUN if tensor in outputs else last_use.get(tensor, default)

    def new_buffer(tensor, first):
        buffers[tensor] = Buffer(tensor, nbytes(shapes[tensor]), first, end_of(tensor, first))
        tensor_buffer[tensor] = tensor
        members[tensor] = [tensor]

    def join(tensor, buf):  # tensor shares buf's bytes
        tensor_buffer[tensor] = buf
        members[buf].append(tensor)
        buffers[buf].last = max(buffers[buf].last, end_of(tensor, 0))

    for v in graph.inputs:
        new_buffer(v.name, -1)
    workspaces = {}
    for i, node in enumerate(graph.nodes):
        group = in_group.get(i)
        if group is not None:
            first, last = group.links[0].index, group.links[-1].index
            if i == first:
                source = buffers[tensor_buffer[node.inputs[0]]]
                source.last = max(source.last, last)
                new_buffer(group.links[-1].node.outputs[0], first)
                workspaces[i] = Buffer(f"{node.name or node.outputs[0]}:stream", group.workspace,
                                       first, last)
            continue
        op = get_op(node.op)
        in_shapes = [shapes[t] if t else None for t in node.inputs]
        out_shapes = [shapes[t] for t in node.outputs]
        buf = tensor_buffer.get(node.inputs[0] if node.inputs else "")
        for k, out in enumerate(node.outputs):
            if k == 0 and buf and op.alias:
                join(out, buf)
            elif (k == 0 and buf and (op.inplace or kernels[i].inplace)
                  and out_shapes[0] == in_shapes[0]
                  and all(last_use.get(t, -1) <= i and t not in outputs for t in members[buf])):
                join(out, buf)
            else:
                new_buffer(out, i)
        if kernels[i].workspace:
            workspaces[i] = Buffer(f"{node.name or node.outputs[0]}:workspace",
                                   int(kernels[i].workspace), i, i)
    return Layout(buffers, tensor_buffer, workspaces, group_at)


def _schedule(graph, shapes, kernels, consts, unfused: Layout, unfused_plan: Plan,
              arena_limit: int | None, choice, forced=None):
    """The groups to stream (qnrt.streaming) and the layout they give: the
    forced groups, else the cached answer for this graph and shape
    (qnrt.plan_cache), else the search's."""
    from . import streaming

    keep = {v.name for v in graph.outputs}
    links = streaming.links_of(graph, kernels, shapes, consts)
    runs = streaming.chains(graph, links, keep)
    steps = len(graph.nodes)
    if not runs:
        if forced:
            raise GraphError("the graph has no chain of ops that can stream")
        return (), unfused, unfused_plan
    sizes = {name: b.size for name, b in unfused.buffers.items()}
    sizes.update({b.name: b.size for b in unfused.workspaces.values()})
    live = unfused_plan.live_per_step[1:]  # [0] is before the first step
    step_tensors = [[(name, sizes[name]) for name in names] for names in live]
    live_bytes = [sum(size for _, size in pairs) for pairs in step_tensors]
    tensor_bytes = {t: nbytes(shapes[t]) for t in shapes}
    base = streaming.base_ns(shapes, graph, links)
    args = (runs, live_bytes, step_tensors, tensor_bytes, base)
    excluded: set = set()

    def pick(limit):
        while True:
            if forced is not None:
                sched = streaming.forced_schedule(runs, forced)
            elif limit == "smallest":
                sched = streaming.smallest_schedule(*args, excluded=frozenset(excluded))
            else:
                sched = streaming.choose_schedule(*args, arena_limit=limit,
                                                  excluded=frozenset(excluded))
            bad, done = None, []
            for group in sched.groups:
                try:
                    if group.program is None or group.program.offsets is None:
                        streaming.check_kernels(group)
                        group = streaming.finalize(group)
                    done.append(group)
                except (streaming.NotStreamable, GraphError):
                    bad = group
                    break
            if bad is None:
                return dataclasses.replace(sched, groups=tuple(done))
            if forced is not None:
                raise GraphError(f"nodes {bad.links[0].node.name!r} .. "
                                 f"{bad.links[-1].node.name!r} cannot stream exactly")
            excluded.update((id(link), rows) for link, rows in zip(bad.links, bad.rows))

    def laid_out(sched):
        layout = _layout(graph, shapes, kernels, sched.groups)
        return layout, layout.plan(steps)

    def search():
        if arena_limit is None:
            sched = pick(None)
            layout, memory = laid_out(sched)
            return sched.groups, layout, memory
        limit = arena_limit
        for _ in range(8):  # the estimate counts live bytes; the planner may need a little more
            sched = pick(limit)
            if sched.peak_estimate < 0:
                break
            layout, memory = laid_out(sched)
            if memory.arena_bytes <= arena_limit:
                return sched.groups, layout, memory
            limit -= memory.arena_bytes - arena_limit
        sched = pick("smallest")
        layout, memory = laid_out(sched)
        if memory.arena_bytes <= arena_limit:
            return sched.groups, layout, memory
        smallest = min(memory.arena_bytes, unfused_plan.arena_bytes)
        raise ArenaLimitError(
            f"no schedule fits arena_limit={arena_limit:,} bytes ({arena_limit / 2**20:,.2f} "
            f"MiB) at input shapes {dict((v.name, shapes[v.name]) for v in graph.inputs)}; the "
            f"smallest arena reachable is {smallest:,} bytes ({smallest / 2**20:,.2f} MiB)",
            smallest)

    if forced is not None:
        sched = pick(None)
        layout, memory = laid_out(sched)
        return sched.groups, layout, memory
    from . import plan_cache
    key = plan_cache.key(graph, {v.name: shapes[v.name] for v in graph.inputs}, choice,
                         arena_limit)
    cached = plan_cache.load(key)
    if cached is not None:  # planned before: checked and simulated again, not searched
        try:
            specs = [streaming.GroupSpec(first, last, band, rows=rows)
                     for first, last, band, rows in cached]
            groups, layout, memory = _schedule(graph, shapes, kernels, consts, unfused,
                                               unfused_plan, None, choice, specs)
            if arena_limit is None or memory.arena_bytes <= arena_limit:
                return groups, layout, memory
        except GraphError:
            pass  # stale: search again
    groups, layout, memory = search()
    plan_cache.store(key, groups)
    return groups, layout, memory


SPLIT_SLACK = 32  # a split group may grow the one-thread arena by 1/32 of it


def _rows_on_threads(graph, shapes, kernels, groups, layout, memory, threads: int,
                     arena_limit: int | None):
    """Streamed groups split into one range per thread: by images where there
    are several (streaming.split_images), else by output rows
    (streaming.split_rows), each range in bands of the group's height or, if
    the ranges' band buffers together would make the arena larger than
    arena_limit (or, without one, than the one-thread arena and SPLIT_SLACK
    of it: each thread's band kernels have scratch of their own), of a half or
    a quarter of it: a small arena is what streaming is for."""
    from . import streaming
    budget = (max(memory.arena_bytes, arena_limit) if arena_limit is not None
              else memory.arena_bytes + memory.arena_bytes // SPLIT_SLACK)
    groups = list(groups)
    for i, group in enumerate(groups):
        for candidate in streaming.row_split_candidates(group, threads):
            trial = groups[:i] + [candidate] + groups[i + 1:]
            trial_layout = _layout(graph, shapes, kernels, trial)
            trial_memory = trial_layout.plan(len(graph.nodes))
            if trial_memory.arena_bytes <= budget:
                groups, layout, memory = trial, trial_layout, trial_memory
                break
    return tuple(groups), layout, memory


def compile_program(graph: Graph, consts: dict, input_shapes: dict,
                    choice: KernelChoice = KernelChoice(), *, streaming: bool = True,
                    arena_limit: int | None = None, groups=None,
                    limits: Limits = Limits(), pool=None) -> Program:
    """The program for `graph` (toposorted, rewritten) at these input shapes.

    streaming: let qnrt.streaming run chains of ops band by band (the default
    schedule: the lowest peak within streaming.SPEED_BUDGET of the unfused
    plan's estimated time); arena_limit (bytes): the cheapest schedule whose
    arena fits, else ArenaLimitError naming the smallest reachable; groups
    (streaming.GroupSpec list, for tests and tools): exactly these groups;
    limits: LimitError before allocating beyond them; pool (qnrt.threads.WorkerPool):
    the threads that run the parts of kernels that split (the plan and the
    arithmetic are the same without it)."""
    check_tensor_limits(graph, {k: tuple(v) for k, v in input_shapes.items()}, limits)
    shapes = infer_shapes(graph, input_shapes)
    check_tensor_limits(graph, shapes, limits)
    kernels = []
    for node in graph.nodes:
        in_shapes = [shapes[t] if t else None for t in node.inputs]
        out_shapes = [shapes[t] for t in node.outputs]
        kernels.append(choice.kernel(node, in_shapes, out_shapes, consts))
        if kernels[-1].workspace > limits.max_workspace_bytes:
            raise LimitError(f"{node.where()} needs {mib(kernels[-1].workspace)} of scratch "
                             f"at inputs {input_shapes}, more than Limits.max_workspace_bytes="
                             f"{limits.max_workspace_bytes:,}")
    unfused = _layout(graph, shapes, kernels)
    unfused_plan = unfused.plan(len(graph.nodes))
    layout, memory = unfused, unfused_plan
    forced, groups = groups, ()
    from .streaming import SEARCH_FROM_BYTES
    wanted = streaming and unfused_plan.arena_bytes > SEARCH_FROM_BYTES
    if wanted or arena_limit is not None or forced is not None:
        groups, layout, memory = _schedule(graph, shapes, kernels, consts, unfused,
                                           unfused_plan, arena_limit, choice, forced)
    if groups and pool is not None and pool.threads > 1:
        groups, layout, memory = _rows_on_threads(graph, shapes, kernels, groups, layout, memory,
                                                  pool.threads, arena_limit)
    if pool is not None and pool.threads > 1:  # a share of scratch for each thread
        wider = [dataclasses.replace(k, workspace=threaded_workspace(k, pool.threads))
                 for k in kernels]
        if any(a.workspace != b.workspace for a, b in zip(wider, kernels)):
            wide_layout = _layout(graph, shapes, wider, groups)
            wide_memory = wide_layout.plan(len(graph.nodes))
            if arena_limit is None or wide_memory.arena_bytes <= arena_limit:
                layout, memory = wide_layout, wide_memory
            else:  # the limit leaves no room for it: steps run their parts in turn
                pool = None
    if arena_limit is not None and memory.arena_bytes > arena_limit:
        raise ArenaLimitError(f"no schedule fits arena_limit={arena_limit:,} bytes; the "
                              f"smallest arena reachable is {memory.arena_bytes:,} bytes",
                              memory.arena_bytes)
    if memory.arena_bytes > limits.max_arena_bytes:
        raise LimitError(f"the activation arena for inputs {input_shapes} needs "
                         f"{mib(memory.arena_bytes)}, more than Limits.max_arena_bytes="
                         f"{limits.max_arena_bytes:,} (Session(limits=...) raises it; "
                         "arena_limit= streams to need less)")
    try:
        arena = aligned_empty(memory.arena_bytes)
    except (MemoryError, ValueError):
        raise GraphError(f"the activation arena for inputs {input_shapes} needs "
                         f"{memory.arena_bytes / 2**20:,.1f} MiB, more than this machine "
                         "can allocate") from None
    offsets = memory.offsets()
    views = {t: arena[offsets[b]:offsets[b] + nbytes(shapes[t])]
             .view(np.float32).reshape(shapes[t]) for t, b in layout.tensor_buffer.items()}
    steps = []
    skip_until = -1
    for i, (node, kernel) in enumerate(zip(graph.nodes, kernels)):
        if i <= skip_until:
            continue
        b = layout.workspaces.get(i)  # by step: node names need not be unique
        ws = arena[b.offset:b.offset + b.size] if b else None
        group = layout.group_at.get(i)
        if group is not None:
            from .streaming import group_kernel
            last = group.links[-1].node
            x0, xm = views[node.inputs[0]], views[last.outputs[0]]
            steps.append(Step(node.name, "Stream", group_kernel(group, x0, xm, ws, pool),
                              [x0], [xm],
                              ws, members=[(link.node.name, link.variant) for link in group.links]))
            skip_until = group.links[-1].index
            continue
        ins = [views[t] if t in views else consts.get(t) if t else None for t in node.inputs]
        outs = [views[t] for t in node.outputs]
        steps.append(Step(node.name, node.op, threaded(kernel, pool), ins, outs, ws,
                          members=[(node.name, kernel.name)]))
    return Program(shapes, steps, memory, layout.tensor_buffer, views, arena,
                   unfused=unfused_plan, groups=tuple(groups))


def smallest_program(graph: Graph, consts: dict, input_shapes: dict,
                     choice: KernelChoice = KernelChoice()) -> Program:
    """The program with the smallest arena the schedule search reaches."""
    try:
        return compile_program(graph, consts, input_shapes, choice, arena_limit=1)
    except ArenaLimitError as exc:
        return compile_program(graph, consts, input_shapes, choice, arena_limit=exc.smallest)


def aligned_empty(nbytes: int) -> np.ndarray:
    raw = np.empty(max(nbytes, 1) + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes]
