"""The planner against a brute-force check of its own invariants and bounds."""
from hypothesis import given, settings, strategies as st

from qnrt.planner import ALIGN, Buffer, check, plan


def test_chain_reuses_memory():
    # a -> b -> c -> d: only two neighbours are ever live, so two slots suffice
    bufs = [Buffer(n, 1000, i - 1, i) for i, n in enumerate("abcd")]
    p = plan(bufs, 4)
    check(p)
    assert p.lower_bound == 2000
    assert p.arena_bytes == 2 * 1024  # two slots, each rounded up to the alignment
    assert p.naive_bytes == 4 * 1024


def test_disjoint_lifetimes_share_offset_zero():
    p = plan([Buffer("a", 4096, 0, 1), Buffer("b", 4096, 2, 3)], 4)
    assert [b.offset for b in p.buffers] == [0, 0]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 5000), st.integers(-1, 12), st.integers(0, 6)),
                min_size=1, max_size=25))
def test_random_plans_are_valid_and_bounded(specs):
    bufs = [Buffer(f"t{i}", size, first, first + span)
            for i, (size, first, span) in enumerate(specs)]
    p = plan(bufs, 20)
    check(p)  # no two live-together buffers overlap; every offset aligned
    assert all(b.offset % ALIGN == 0 for b in bufs)
    assert p.lower_bound <= p.arena_bytes <= p.naive_bytes
    # the reported bound really is a set of buffers live at one step
    for names in p.live_per_step:
        assert sum(b.size for b in bufs if b.name in names) <= p.lower_bound
