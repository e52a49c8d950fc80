"""FleetIndex against rank_indices: the same order, cut to ``limit``, as views change (no cluster)."""

from __future__ import annotations

import dataclasses
import random

import pytest

from router.fleet_index import FleetIndex
from router.placement import Rank, ReplicaView, rank_indices
from tests.test_placement import need, random_views, view


def timed(rng, v: ReplicaView) -> ReplicaView:
    """A view with measured service times (or none), so that the holder gate runs."""
    if rng.random() < 0.2:
        return v
    # inference_s 0.0 with a load measured: a replica that loaded but has not finished an
    # inference yet (its times do not count as measured).
    return dataclasses.replace(v, inference_s=rng.choice([0.0, 0.5, 1.0, 3.0]),
                               disk_load_bytes_per_s=rng.choice([5.0, 20.0, 80.0]),
                               host_reload_bytes_per_s=rng.choice([50.0, 200.0]))


@pytest.mark.parametrize("seed", range(4))
def test_fleet_index_ranks_as_rank_indices_cut_to_the_limit_as_views_change(seed):
    rng = random.Random(100 + seed)
    size_pool = [(rng.randrange(5, 90), rng.randrange(0, 20)) for _ in range(4)]
    views = [timed(rng, v) for v in random_views(rng, rng.randrange(3, 40))]
    fleet = FleetIndex()
    for i, v in enumerate(views):
        fleet.set_view(i, v)
    compared = cut = 0
    for step in range(400):
        for _ in range(rng.randrange(0, 4)):  # reports and placements replace a few views
            i = rng.randrange(len(views))
            views[i] = timed(rng, random_views(rng, 1)[0])
            fleet.set_view(i, views[i])
        w, ws = rng.choice(size_pool)
        nd = need(f"c{rng.randrange(12)}", weights=w, workspace=ws)
        queues = [rng.randrange(0, 7) for _ in views]
        spill, held = rng.randrange(1, 6), rng.random() < 0.5
        limit = rng.choice([None, 1, 2, 5, 16])
        floor = rng.choice([0, min(queues)])  # any lower bound of the queue lengths
        backlog = rng.choice([0, 0, 1, 4, 30])  # requests for the checkpoint waiting at the router
        expected = rank_indices(views, nd, spill_queue_len=spill, queue_lens=queues, evict_for_held=held,
                                backlog=backlog)
        got = fleet.rank(nd, queues, spill_queue_len=spill, evict_for_held=held, limit=limit, min_queue_len=floor,
                         backlog=backlog)
        assert got == expected[:limit], (step, limit)
        compared += 1
        cut += limit is not None and len(expected) > limit
    assert compared == 400 and cut > 50  # the limit did cut orders short


@pytest.mark.parametrize("seed", range(3))
def test_fleet_index_ranks_sooner_first_as_rank_indices_in_large_fleets(seed, monkeypatch):
    # Enough replicas that the gate's candidates outnumber 2 x limit + 32, so that the walk
    # runs (after the replicas sooner by their times are found), and loaded holders, so
    # that the holders' shortcut must check whether a load elsewhere could be sooner.
    import router.fleet_index as fi

    calls = {"sooner_found": 0, "rest_walk": 0, "shortcut_refused": 0}
    walk, possible, stretch = FleetIndex._walk, FleetIndex._sooner_possible, FleetIndex._stretch

    def counting_walk(self, *args):
        calls["rest_walk"] += len(args) == 11 and args[-1] == fi._LATER
        return walk(self, *args)

    def counting_stretch(self, *args):
        out = stretch(self, *args)
        calls["sooner_found"] += bool(args[-1] and out)  # sooner_only
        return out

    def counting_possible(self, *args):
        out = possible(self, *args)
        calls["shortcut_refused"] += out
        return out

    monkeypatch.setattr(FleetIndex, "_walk", counting_walk)
    monkeypatch.setattr(FleetIndex, "_sooner_possible", counting_possible)
    monkeypatch.setattr(FleetIndex, "_stretch", counting_stretch)
    rng = random.Random(300 + seed)

    def fresh() -> ReplicaView:
        # Few holders per checkpoint (60 names), nearly all measured: the gate goes by times.
        v = random_views(rng, 1)[0]
        entries = {f"c{rng.randrange(60)}": e for e in v.entries.values()}
        used = sum(e.bytes for e in entries.values() if e.tier == "device")
        v = v.with_entries(entries, used)
        if rng.random() < 0.05:
            return v
        return dataclasses.replace(v, inference_s=rng.choice([0.5, 1.0, 3.0]),
                                   disk_load_bytes_per_s=rng.choice([5.0, 20.0, 80.0]),
                                   host_reload_bytes_per_s=rng.choice([50.0, 200.0]))

    views = [fresh() for _ in range(160)]
    fleet = FleetIndex()
    for i, v in enumerate(views):
        fleet.set_view(i, v)
    for step in range(150):
        for _ in range(rng.randrange(0, 6)):
            i = rng.randrange(len(views))
            views[i] = fresh()
            fleet.set_view(i, views[i])
        nd = need(f"c{rng.randrange(60)}", weights=rng.randrange(5, 60), workspace=rng.randrange(0, 10))
        queues = [rng.randrange(1, 9) if rng.random() < 0.8 else 0 for _ in views]
        spill, held = rng.randrange(2, 9), rng.random() < 0.5
        limit = rng.choice([1, 2, 5, 16])
        backlog = rng.choice([0, 0, 1, 4, 30])
        expected = rank_indices(views, nd, spill_queue_len=spill, queue_lens=queues, evict_for_held=held,
                                backlog=backlog)
        got = fleet.rank(nd, queues, spill_queue_len=spill, evict_for_held=held, limit=limit, backlog=backlog)
        assert got == expected[:limit], (step, limit)
    assert calls["sooner_found"] > 10 and calls["rest_walk"] > 0 and calls["shortcut_refused"] > 0, calls


def test_fleet_index_ties_go_by_queue_then_slot_and_spilled_last():
    fleet = FleetIndex()
    for i in range(5):
        fleet.set_view(i, view(f"r{i}"))  # all empty: one tie group (FITS, nothing to evict)
    assert fleet.rank(need(), [2, 0, 1, 0, 9], spill_queue_len=4) == [1, 3, 2, 0, 4]
    assert fleet.rank(need(), [2, 0, 1, 0, 9], spill_queue_len=4, limit=2) == [1, 3]


def test_fleet_index_reads_queue_lengths_only_at_the_slots_it_visits():
    class Lazy:
        def __init__(self, n):
            self.n, self.read = n, []

        def __len__(self):
            return self.n

        def __getitem__(self, slot):
            self.read.append(slot)
            return 0

    fleet = FleetIndex()
    for i in range(50):
        fleet.set_view(i, view(f"r{i}"))
    queues = Lazy(50)
    assert fleet.rank(need(), queues, limit=3) == [0, 1, 2]  # all equal: slot order
    assert sorted(set(queues.read)) == [0, 1, 2]  # three zero-queue replicas settle the first three places


def test_a_large_group_of_equal_replicas_is_ranked_by_queue_within_a_rotating_window():
    walk = 64
    fleet = FleetIndex(tie_window=walk)
    for i in range(3 * walk):
        fleet.set_view(i, view(f"r{i}"))  # all empty: one tie group (FITS, nothing to evict)
    ones = [1] * (3 * walk)
    firsts = [fleet.rank(need(), ones, limit=2)[0] for _ in range(3)]
    assert len(set(firsts)) == 3  # each walk starts elsewhere: load spreads over the group
    queues = list(ones)
    queues[walk + 10] = 0  # idle: first if this decision's window covers it
    got = fleet.rank(need(), queues, limit=2)
    start = (fleet._turn % (3 * walk))
    window = [(start + k) % (3 * walk) for k in range(walk)]
    expected = sorted(window, key=lambda s: (queues[s], s))[:2]
    assert got == expected
    # Too few of the window qualify (the rest spilled, queue >= 4): the walk goes on.
    queues = [5] * (3 * walk)
    for s in (3, walk + 1, 2 * walk + 7):
        queues[s] = 2
    assert fleet.rank(need(), queues, limit=3) == [3, walk + 1, 2 * walk + 7]
    # A group of exactly tie_window is ranked exactly, as rank_indices ranks it.
    exact = FleetIndex(tie_window=walk)
    views = [view(f"e{i}") for i in range(walk)]
    for i, v in enumerate(views):
        exact.set_view(i, v)
    queues = [(i * 7) % 3 + 1 for i in range(walk)]
    assert exact.rank(need(), queues, limit=5) == rank_indices(views, need(), queue_lens=queues)[:5]


def test_fleet_index_emptied_slots_and_holders_follow_set_view():
    fleet = FleetIndex()
    fleet.set_view(0, view("a", used=40, x=("device", 40)))
    fleet.set_view(1, view("b"))
    assert fleet.rank(need("x"), [0, 0]) == [0, 1]
    fleet.set_view(0, view("a2", used=90, y=("device", 90, 1.0)))  # x gone, y must be evicted
    assert fleet.rank(need("x"), [0, 0]) == [1, 0]
    fleet.set_view(1, None)
    assert fleet.rank(need("x"), [0, 0]) == [0]
    assert fleet.rank(need("x"), [0, 0], limit=1) == [0]


def _filled(views: list[ReplicaView]) -> FleetIndex:
    fleet = FleetIndex()
    for i, v in enumerate(views):
        fleet.set_view(i, v)
    return fleet


def test_fleet_index_rebuilds_a_size_class_after_the_change_log_is_cut():
    rng = random.Random(5)
    views = random_views(rng, 6)
    fleet = _filled(views)
    nd = need("c1", 30, 5)
    assert fleet.rank(nd, [0] * 6) == rank_indices(views, nd, queue_lens=[0] * 6)
    for _ in range(200):  # far past the log's bound (8 x slots + 64)
        i = rng.randrange(6)
        views[i] = random_views(rng, 1)[0]
        fleet.set_view(i, views[i])
    assert fleet.rank(nd, [0] * 6) == rank_indices(views, nd, queue_lens=[0] * 6)


def test_a_size_class_in_use_keeps_catching_up_across_cuts_of_the_change_log(monkeypatch):
    """A cut drops the log's older half only: a class synced since re-scores just the slots
    that changed, never all of them (bench/sim: the whole-log cut made every class rebuild)."""
    import router.fleet_index as fleet_index

    rng = random.Random(7)
    views = random_views(rng, 64)
    fleet = _filled(views)
    nd = need("c1", 30, 5)
    queues = [0] * 64
    assert fleet.rank(nd, queues) == rank_indices(views, nd, queue_lens=queues)
    scored = []
    real = fleet_index._size_score
    monkeypatch.setattr(fleet_index, "_size_score", lambda v, *a: scored.append(v) or real(v, *a))
    start = fleet._log_start
    for _ in range(30):  # 1,200 changes, past the log's bound (8 x 64 + 64) twice
        for _ in range(40):
            i = rng.randrange(4)
            views[i] = random_views(rng, 1)[0]
            fleet.set_view(i, views[i])
        scored.clear()
        assert fleet.rank(nd, queues) == rank_indices(views, nd, queue_lens=queues)
        assert 1 <= len(scored) <= 4 and {id(v) for v in scored} <= {id(v) for v in views[:4]}
    assert fleet._log_start > start  # the log was cut meanwhile


def test_fleet_index_misuse_names_the_parameter():
    fleet = FleetIndex()
    fleet.set_view(0, view("a"))
    with pytest.raises(ValueError, match="queue_lens has 2 entries for 1 slots"):
        fleet.rank(need(), [0, 0])
    with pytest.raises(ValueError, match="limit must be >= 1"):
        fleet.rank(need(), [0], limit=0)
    with pytest.raises(ValueError, match="queue lengths must be in"):
        fleet.rank(need(), [-1])
    with pytest.raises(ValueError, match=r"must be in \[min_queue_len=2, .*got 1"):
        fleet.rank(need(), [1], min_queue_len=2)  # not a lower bound: would cut ties wrongly
    with pytest.raises(ValueError, match="min_queue_len must be >= 0"):
        fleet.rank(need(), [0], min_queue_len=-1)
    with pytest.raises(ValueError, match="tie_window must be >= 1"):
        FleetIndex(tie_window=0)
    with pytest.raises(ValueError, match="slot must be >= 0"):
        fleet.set_view(-1, view("b"))
    with pytest.raises(ValueError, match="'x' has no estimate at dtype 'bfloat16'"):
        fleet.set_view(0, view("a", dtype="bfloat16"))
        fleet.rank(need("x"), [0])
    fleet.set_view(0, view("a"))  # the failed size class is rebuilt, not left half-updated
    assert fleet.rank(need("x"), [0]) == [0]


def test_a_busy_holder_is_not_sooner_and_the_shortcut_stays_exact():
    # Found by a review: B holds x in host memory but must wait for entries in use (BUSY);
    # its estimate (3.8 s) leaves that wait out, so it ranks after the holder A (waits 4 s),
    # and FleetIndex's holders-only shortcut (limit 1) agrees with rank_indices.
    from router.placement import EntryView, Need

    nd = Need("x", {"float16": 20}, {"float16": 0})
    a = ReplicaView("A", 100, 20, "float16", {"x": EntryView("device", 20)}, 0,
                    inference_s=1.0, disk_load_bytes_per_s=1.0, host_reload_bytes_per_s=1.0)
    b = ReplicaView("B", 30, 30, "float16", {"x": EntryView("host", 18), "y": EntryView("device", 18, 0.0, 1),
                                             "z": EntryView("device", 12, 0.0, 1)},
                    0, inference_s=1.0, disk_load_bytes_per_s=10.0, host_reload_bytes_per_s=10.0)
    fleet = FleetIndex()
    for i, v in enumerate([a, b]):
        fleet.set_view(i, v)
    assert rank_indices([a, b], nd, queue_lens=[4, 0], spill_queue_len=8) == [0, 1]
    assert fleet.rank(nd, [4, 0], spill_queue_len=8, limit=1) == [0]
    assert fleet.rank(nd, [4, 0], spill_queue_len=8) == [0, 1]


def test_a_change_no_size_score_reads_is_not_rescored_by_the_size_classes(monkeypatch):
    """An in-use count that moves while the entry stays in use (a second request for a
    checkpoint in use) leaves every size score as it was: the size classes pass the change
    over, and the order stays rank_indices's. Its busy state moving is re-scored."""
    import router.fleet_index as fleet_index

    views = [view("a", used=90, budget=100, x=("device", 50, 1.0, 1), y=("device", 40, 3.0)),
             view("b", used=60, budget=100, z=("device", 60, 2.0))]
    fleet = _filled(views)
    nd = need("w", 30, 5)  # held by neither: the size class ranks both (a evicts y, b fits)
    assert fleet.rank(nd, [0, 0]) == rank_indices(views, nd, queue_lens=[0, 0]) == [1, 0]
    scored = []
    real = fleet_index._size_score
    monkeypatch.setattr(fleet_index, "_size_score", lambda v, *a: scored.append(v.replica_id) or real(v, *a))

    views[0] = view("a", used=90, budget=100, x=("device", 50, 1.0, 2), y=("device", 40, 3.0))
    fleet.set_view(0, views[0])
    assert fleet.rank(nd, [0, 0]) == rank_indices(views, nd, queue_lens=[0, 0]) == [1, 0]
    assert scored == []

    views[0] = view("a", used=90, budget=100, x=("device", 50, 1.0, 2), y=("device", 40, 3.0, 1))
    fleet.set_view(0, views[0])  # y in use now: a must wait for it (BUSY)
    assert fleet.rank(nd, [0, 0]) == rank_indices(views, nd, queue_lens=[0, 0]) == [1, 0]
    assert scored == ["a"]
    assert fleet._synced(nd).scores[0].rank == Rank.BUSY


@pytest.mark.parametrize("limit", [1, 2])
def test_sooner_replicas_are_found_where_halving_the_wait_rounds(limit):
    """A best holder wait so small (subnormal) that wait / 2 rounds down: a replica with a
    load time of 0.0 is still sooner (0 + 2 x 0.0 < wait), in the shortcut's check
    (limit 1) and in the stretch of by_fixed (limit 2). Found by a review's fuzzer."""
    from router.placement import EntryView, Need

    holder = ReplicaView("h", 100, 40, "float16", {"x": EntryView("device", 40)}, inference_s=5e-324,
                         disk_load_bytes_per_s=1.0, host_reload_bytes_per_s=1.0)
    views = [holder] + [ReplicaView(f"r{i}", 100, 0, "float16", {}, inference_s=1.0, disk_load_bytes_per_s=10.0)
                        for i in range(40)]
    nd = Need("x", {"float16": 0}, {"float16": 10})  # weights 0: each load time is 0.0
    queues = [1] + [0] * 40
    expected = rank_indices(views, nd, spill_queue_len=2, queue_lens=queues)[:limit]
    assert expected == [1, 2][:limit]
    assert _filled(views).rank(nd, queues, spill_queue_len=2, limit=limit) == expected


# ---- cases found by mutating the policy (each failed one mutant the tests above let live) ----
F16 = "float16"


def _x_need(weights=40, workspace=10):
    from router.placement import Need

    return Need("x", {F16: weights}, {F16: workspace})


def test_a_view_whose_used_bytes_alone_changed_is_scored_again():
    # A request's workspace raises used bytes while the entries stay as they were.
    from router.placement import EntryView

    a = ReplicaView("a", 100, 40, F16, {"y": EntryView("device", 40, 5.0)}, 0)
    b = ReplicaView("b", 100, 40, F16, {"z": EntryView("device", 40, 5.0)}, 0)
    fleet = FleetIndex()
    fleet.set_view(0, a)
    fleet.set_view(1, b)
    assert fleet.rank(_x_need(), [0, 0]) == rank_indices([a, b], _x_need(), queue_lens=[0, 0]) == [0, 1]
    a2 = a.with_entries(a.entries, 90)  # 10 free: a must now evict y for x
    fleet.set_view(0, a2)
    assert rank_indices([a2, b], _x_need(), queue_lens=[0, 0]) == fleet.rank(_x_need(), [0, 0]) == [1, 0]


def test_a_replica_that_must_wait_for_entries_in_use_is_not_placed_before_the_holder():
    from router.placement import EntryView

    h = ReplicaView("h", 100, 40, F16, {"x": EntryView("device", 40)}, 0, inference_s=1.0, disk_load_bytes_per_s=1e9)
    n = ReplicaView("n", 100, 90, F16, {"y": EntryView("device", 90, 0.0, 1)}, 0, inference_s=1.0,
                    disk_load_bytes_per_s=1e9)  # must wait for y (in use): BUSY, though its load is ~0 s
    assert rank_indices([h, n], _x_need(), queue_lens=[3, 0]) == [0, 1]


def test_the_holders_shortcut_is_not_taken_past_eight_holders_before_a_sooner_replica():
    from router.placement import EntryView

    holders = [ReplicaView(f"h{i}", 100, 40, F16, {"x": EntryView("device", 40)}, 0, inference_s=1.0,
                           disk_load_bytes_per_s=1e12) for i in range(9)]
    sooner = ReplicaView("n", 100, 0, F16, {}, 0, inference_s=1.0, disk_load_bytes_per_s=40.0)  # loads in 1 s
    views = holders + [sooner]
    queues = [3] * 9 + [0]  # every holder waits 3 s; n starts after 1 s of loading (2 x 1 < 3)
    assert rank_indices(views, _x_need(), queue_lens=queues)[0] == 9
    fleet = FleetIndex()
    for i, v in enumerate(views):
        fleet.set_view(i, v)
    assert fleet.rank(_x_need(), queues, limit=1) == [9]


def test_a_bad_queue_length_of_a_busy_holder_is_refused_as_rank_indices_refuses_it():
    from router.placement import EntryView

    v = ReplicaView("v", 100, 90, F16, {"x": EntryView("host", 40), "y": EntryView("device", 90, 0.0, 1)}, 0)
    with pytest.raises(ValueError, match="queue lengths"):
        rank_indices([v], _x_need(), queue_lens=[-1])
    fleet = FleetIndex()
    fleet.set_view(0, v)
    with pytest.raises(ValueError, match="queue lengths"):
        fleet.rank(_x_need(), [-1])


def test_a_tie_group_larger_than_the_window_compares_a_whole_window():
    # tie_window=2 over 3 equal replicas: each decision compares 2 consecutive members from a
    # rotating start (white box: FleetIndex._turn), and the least queue of the 2 wins.
    fleet = FleetIndex(tie_window=2)
    for i in range(3):
        fleet.set_view(i, ReplicaView(f"r{i}", 100, 0, F16, {}, 0))
    for _ in range(6):
        queues = [1, 1, 1]
        second = ((fleet._turn + 1) % 3 + 1) % 3  # the second member of the next window
        queues[second] = 0
        assert fleet.rank(_x_need(), queues, limit=1) == [second]


def test_requests_waiting_at_the_router_count_in_the_holders_wait():
    """A replica's queue stops at max_ongoing_requests: under a burst the holder looked free
    in 8 x 3 s while hundreds of requests waited at the router for it (bench/sim seeds 2 and
    4: p99 181 and 262 s, worse than Ray's multiplexing). With the backlog counted, past
    a point the burst's later requests load the checkpoint elsewhere."""
    from router.placement import EntryView

    holder = ReplicaView("h", 100, 40, F16, {"x": EntryView("device", 40)}, 0, inference_s=3.0,
                         disk_load_bytes_per_s=1e9)
    other = ReplicaView("o", 100, 0, F16, {}, 0, inference_s=3.0, disk_load_bytes_per_s=40 / 30)  # loads in 30 s
    views, queues = [holder, other], [8, 0]
    fleet = FleetIndex()
    for i, v in enumerate(views):
        fleet.set_view(i, v)
    for backlog, expected in [(0, [0]), (2, [0]), (3, [1, 0]), (30, [1, 0])]:
        # wait 24 s + backlog x 3 s: kept once it passes the 30 s load, and first (the
        # holder's queue is past the spill line)
        assert rank_indices(views, _x_need(), queue_lens=queues, backlog=backlog) == expected, backlog
        assert fleet.rank(_x_need(), queues, backlog=backlog) == expected, backlog
    with pytest.raises(ValueError, match="backlog must be >= 0"):
        fleet.rank(_x_need(), queues, backlog=-1)
    with pytest.raises(ValueError, match="backlog must be >= 0"):
        rank_indices(views, _x_need(), queue_lens=queues, backlog=-1)


def test_the_backlog_drains_at_the_holders_summed_rates():
    """Two holders, 1 s and 9 s per inference, and 20 requests waiting at the router: they
    drain in 20 / (1 + 1/9) = 18 s, not in 20 x 1 s / 2 = 10 s (the fastest holder's pace
    for both, which kept a burst on its holders: bench/sim seed 4, p99 96.6 -> 80.4 s). A
    replica that loads in 15 s is kept at 20 waiting; at 11 (9.9 s) it is not."""
    from router.placement import EntryView

    fast = ReplicaView("fast", 100, 40, F16, {"x": EntryView("device", 40)}, 0, inference_s=1.0,
                       disk_load_bytes_per_s=1e9)
    slow = ReplicaView("slow", 100, 40, F16, {"x": EntryView("device", 40)}, 0, inference_s=9.0,
                       disk_load_bytes_per_s=1e9)
    other = ReplicaView("o", 100, 0, F16, {}, 0, inference_s=1.0, disk_load_bytes_per_s=40 / 15)  # loads in 15 s
    views, queues = [fast, slow, other], [4, 0, 0]  # best holder wait: 0 s (slow's queue)
    fleet = FleetIndex()
    for i, v in enumerate(views):
        fleet.set_view(i, v)
    for backlog, expected in [(11, [1, 0]), (20, [1, 2, 0])]:
        # kept, after the idle holder (by rank) and before the spilled one
        assert rank_indices(views, _x_need(), queue_lens=queues, backlog=backlog) == expected, backlog
        assert fleet.rank(_x_need(), queues, backlog=backlog) == expected, backlog


def test_measured_holders_order_by_expected_wait_and_spill_by_time():
    """A slow holder (25 s an image) with 1 queued placed before a fast one (1 s) with 3, by
    queue length, and a burst filled it max_ongoing_requests deep (bench/sim seed 5: 130 s in
    one replica's queue). Measured, they order by queue x inference_s, and the slow one is
    past the spill line (4 requests at the fastest holder's 1 s): a replica that loads the
    checkpoint in 2 s is placed before it."""
    from router.placement import EntryView

    fast = ReplicaView("fast", 100, 40, F16, {"x": EntryView("device", 40)}, 0, inference_s=1.0,
                       disk_load_bytes_per_s=1e9)
    slow = ReplicaView("slow", 100, 40, F16, {"x": EntryView("device", 40)}, 0, inference_s=25.0,
                       disk_load_bytes_per_s=1e9)
    other = ReplicaView("o", 100, 0, F16, {}, 0, inference_s=1.0, disk_load_bytes_per_s=40 / 2)  # loads in 2 s
    views, queues = [slow, fast, other], [1, 3, 0]
    fleet = FleetIndex()
    for i, v in enumerate(views):
        fleet.set_view(i, v)
    assert rank_indices(views, _x_need(), queue_lens=queues) == [1, 2, 0]
    for limit in (None, 1, 2):
        assert fleet.rank(_x_need(), queues, limit=limit) == [1, 2, 0][:limit], limit
    # Without the fast holder's times (no inference yet) the order is by queue length
    unmeasured = dataclasses.replace(fast, inference_s=0.0)
    views[1] = unmeasured
    fleet.set_view(1, unmeasured)
    assert rank_indices(views, _x_need(), queue_lens=queues) == [0, 1, 2]
    assert fleet.rank(_x_need(), queues) == [0, 1, 2]


def test_a_holder_still_loading_the_checkpoint_waits_for_its_load():
    """The ledger's placement (and a report taken mid-load) has the entry on the device: it
    was a holder with nothing left to load, and a burst queued on it (bench/sim seed 4)."""
    from router.placement import EntryView

    def holder(loading):
        return ReplicaView("h", 100, 40, F16, {"x": EntryView("device", 40, 0.0, 1, loading)}, 0, inference_s=1.0,
                           disk_load_bytes_per_s=1.0)  # its load: 40 s
    other = ReplicaView("o", 100, 0, F16, {}, 0, inference_s=1.0, disk_load_bytes_per_s=4.0)  # loads in 10 s
    assert rank_indices([holder(""), other], _x_need(), queue_lens=[1, 0]) == [0]  # 1 s vs a 10 s load
    assert rank_indices([holder("disk"), other], _x_need(), queue_lens=[1, 0]) == [1, 0]  # 41 s: sooner elsewhere
    # A reload from the host at its own speed (100 bytes/s here): 1.4 s, the holder stays first.
    assert rank_indices([dataclasses.replace(holder("host"), host_reload_bytes_per_s=100.0), other], _x_need(),
                        queue_lens=[1, 0]) == [0]
    fleet = FleetIndex()
    fleet.set_view(0, holder("disk"))
    fleet.set_view(1, other)
    assert fleet.rank(_x_need(), [1, 0]) == [1, 0]
