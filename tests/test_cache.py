"""PipelineCache policy: exact eviction orders, pins, tiers, idle timers (fake clock)."""

from __future__ import annotations

import pytest

from deployments.cache import CacheConfig, Lease, PipelineCache, Shortfall, Tier
from tests.fakes import FakeBackend, FakeClock

SIZES = {"a": 30, "b": 30, "c": 30, "d": 50, "big": 120, "q": 25}


def make(budget=100, host=100, host_tier=True, max_resident=16, offload_s=10.0, release_s=100.0, **kw):
    clock = FakeClock()
    backend = FakeBackend(dict(SIZES), **kw)
    cfg = CacheConfig(device_budget_bytes=budget, host_budget_bytes=host, idle_offload_s=offload_s,
                      idle_release_s=release_s, max_resident=max_resident, host_tier=host_tier)
    return PipelineCache(cfg, backend, clock), backend, clock


def use(cache, clock, name, ws=0, offloadable=True):
    lease = cache.acquire(name, weights_bytes=SIZES[name], workspace_bytes=ws, offloadable=offloadable)
    assert isinstance(lease, Lease), lease
    lease.release()
    clock.advance(1)
    return lease


def tiers(cache):
    return {e.name: e.tier for e in cache.report().entries}


def test_lru_evicts_least_recently_used_first_and_offloads_to_host():
    cache, backend, clock = make()
    for n in ("a", "b", "c"):
        use(cache, clock, n)
    use(cache, clock, "a")  # a becomes most recent: LRU order is now b, c, a
    backend.calls.clear()
    lease = use(cache, clock, "d")  # needs 50, free 10: evict b then c
    assert backend.calls == [("to_host", "b"), ("to_host", "c"), ("load", "d")]
    assert lease.served_from is Tier.DISK
    assert tiers(cache) == {"a": "device", "b": "host", "c": "host", "d": "device"}
    rep = cache.report()
    assert rep.device_used_bytes == 80 and rep.host_used_bytes == 60
    assert rep.counters["evictions"] == 2 and rep.counters["offloads"] == 2 and rep.counters["disk_loads"] == 4


def test_host_reload_then_hit_counters():
    cache, backend, clock = make()
    for n in ("a", "b", "c", "d"):  # d evicts a, b
        use(cache, clock, n)
    backend.calls.clear()
    assert use(cache, clock, "a").served_from is Tier.HOST  # evicts c (LRU) for 30 bytes
    assert backend.calls == [("to_host", "c"), ("to_device", "a")]
    assert use(cache, clock, "a").served_from is Tier.DEVICE
    c = cache.report().counters
    assert (c["hits"], c["host_reloads"], c["disk_loads"]) == (1, 1, 4)


def test_host_tier_full_releases_lru_host_entries_first():
    cache, backend, clock = make(host=60)
    for n in ("a", "b", "c"):
        use(cache, clock, n)
    use(cache, clock, "d")  # a, b -> host (60 of 60)
    backend.calls.clear()
    use(cache, clock, "q")  # 25 needed, free 20: evict c (LRU device); host full -> free a (LRU host)
    assert backend.calls == [("free", "a"), ("to_host", "c"), ("load", "q")]
    assert tiers(cache) == {"b": "host", "c": "host", "d": "device", "q": "device"}
    assert cache.report().counters["releases"] == 1


def test_host_reload_into_a_full_host_tier_never_drops_the_entry_being_reloaded():
    # a on host (30 of 40); reloading a evicts b, whose offload needs host room. a is the
    # only host entry but must not be released for it: b is released instead (counted).
    cache, backend, clock = make(budget=60, host=40)
    for n in ("a", "b", "c"):  # c evicts a -> host
        use(cache, clock, n)
    assert tiers(cache) == {"a": "host", "b": "device", "c": "device"}
    backend.calls.clear()
    assert use(cache, clock, "a").served_from is Tier.HOST
    assert backend.calls == [("free", "b"), ("to_device", "a")]
    assert tiers(cache) == {"c": "device", "a": "device"}
    c = cache.report().counters
    assert (c["host_full_releases"], c["evictions"], c["host_reloads"], c["releases"]) == (1, 2, 1, 1)


def test_entry_larger_than_host_budget_is_released_and_counted():
    cache, backend, clock = make(host=20)
    for n in ("a", "b", "c", "d"):
        use(cache, clock, n)
    assert "a" not in tiers(cache) and "b" not in tiers(cache)
    assert cache.report().counters["host_full_releases"] == 2


def test_pinned_entries_are_never_evicted_and_shortfall_changes_nothing():
    cache, backend, clock = make()
    la = cache.acquire("a", weights_bytes=30)
    lb = cache.acquire("b", weights_bytes=30)
    use(cache, clock, "c")
    backend.calls.clear()
    short = cache.acquire("d", weights_bytes=50)  # only c (30) evictable: 10 + 30 < 50
    assert isinstance(short, Shortfall)
    assert short.reason == "in_use" and not short.permanent
    assert (short.need_bytes, short.budget_bytes, short.used_bytes, short.pinned_bytes) == (50, 100, 90, 60)
    assert backend.calls == []  # nothing evicted for a request that cannot fit
    assert tiers(cache) == {"a": "device", "b": "device", "c": "device"}
    la.release()
    lease = cache.acquire("d", weights_bytes=50)  # now a (30) + c: LRU is a? a last used at pin time
    assert isinstance(lease, Lease)
    assert tiers(cache)["b"] == "device"  # still pinned
    lb.release()
    lease.release()


def test_bigger_than_budget_is_a_permanent_shortfall():
    cache, backend, clock = make()
    short = cache.acquire("big", weights_bytes=120)
    assert isinstance(short, Shortfall) and short.permanent
    assert "120 bytes" in short.message() and "100 bytes" in short.message()
    assert cache.report().counters["shortfalls"] == 1


def test_workspace_counts_while_in_flight_and_is_returned():
    cache, backend, clock = make()
    lease = cache.acquire("a", weights_bytes=30, workspace_bytes=40)
    rep = cache.report()
    assert (rep.device_used_bytes, rep.workspace_in_flight_bytes, rep.in_flight) == (70, 40, 1)
    short = cache.acquire("d", weights_bytes=50)  # 30 free, a pinned
    assert isinstance(short, Shortfall)
    lease.release()
    rep = cache.report()
    assert (rep.device_used_bytes, rep.workspace_in_flight_bytes, rep.in_flight) == (30, 0, 0)


def test_hit_that_needs_workspace_room_evicts_lru():
    cache, backend, clock = make()
    for n in ("a", "b", "c"):
        use(cache, clock, n)
    backend.calls.clear()
    lease = cache.acquire("c", weights_bytes=30, workspace_bytes=30)  # 10 free: evict a
    assert lease.served_from is Tier.DEVICE
    assert backend.calls == [("to_host", "a")]
    lease.release()


def test_measured_above_estimate_evicts_more():
    cache, backend, clock = make(measured_delta={"d": 25})  # d measures 75
    for n in ("a", "b"):
        use(cache, clock, n)
    backend.calls.clear()
    use(cache, clock, "d")  # planned for 50 (free 40 -> evict a), measured 75 -> 105 used -> evict b too
    assert backend.calls == [("to_host", "a"), ("load", "d"), ("to_host", "b")]
    rep = cache.report()
    assert rep.device_used_bytes == 75 <= rep.device_budget_bytes


def test_measured_overrun_that_cannot_fit_gives_the_load_back():
    cache, backend, clock = make(measured_delta={"d": 60})  # d measures 110 > budget
    short = cache.acquire("d", weights_bytes=50)
    assert isinstance(short, Shortfall)
    assert short.permanent and short.need_bytes == 110  # 413, not a 503 to retry into the same load
    assert backend.calls == [("load", "d"), ("free", "d")]
    assert cache.report().entries == () and cache.report().device_used_bytes == 0
    again = cache.acquire("d", weights_bytes=50)  # the measured 110 is remembered: no second load
    assert isinstance(again, Shortfall) and again.permanent and again.need_bytes == 110
    assert backend.calls == [("load", "d"), ("free", "d")]


def test_a_measured_overrun_is_planned_for_on_the_next_load():
    cache, backend, clock = make(measured_delta={"d": 25})  # d measures 75
    use(cache, clock, "d")
    cache.release("d")
    for n in ("a", "b"):
        use(cache, clock, n)
    backend.calls.clear()
    use(cache, clock, "d")  # plans for 75 (not the estimate 50): both victims before the load
    assert backend.calls == [("to_host", "a"), ("to_host", "b"), ("load", "d")]


def test_a_replaced_checkpoint_is_planned_at_its_new_estimate_not_its_old_measured_size():
    """Its files replaced (a new estimate), the old version's measurement no longer applies:
    it made a permanent 413 of a checkpoint that now fits, until the replica restarted."""
    cache, backend, clock = make(measured_delta={"d": 60})  # this version of d measures 110 > budget
    assert isinstance(cache.acquire("d", weights_bytes=50), Shortfall)
    again = cache.acquire("d", weights_bytes=50)  # same estimate: the measurement stands
    assert isinstance(again, Shortfall) and again.permanent and again.need_bytes == 110
    backend.measured_delta.clear()
    backend.sizes["d"] = 20  # the folder replaced by a smaller version: its estimate is 20
    lease = cache.acquire("d", weights_bytes=20)
    assert isinstance(lease, Lease) and lease.served_from is Tier.DISK
    lease.release()
    assert cache.report().entry("d").bytes == 20


def test_a_resident_entry_whose_workspace_can_never_fit_is_a_permanent_shortfall():
    cache, backend, clock = make()
    use(cache, clock, "d")  # 50 resident
    short = cache.acquire("d", weights_bytes=50, workspace_bytes=60)  # 110 > 100 whatever is evicted
    assert isinstance(short, Shortfall) and short.permanent and short.need_bytes == 110
    assert tiers(cache) == {"d": "device"}


def test_a_failed_move_to_host_during_a_reload_leaves_every_entry_usable():
    cache, backend, clock = make(budget=60, host=200)
    use(cache, clock, "d")
    use(cache, clock, "a")  # d (50) -> host to make room
    assert tiers(cache) == {"d": "host", "a": "device"}
    backend.fail_to_host.add("a")
    with pytest.raises(RuntimeError, match="injected to_host"):
        cache.acquire("d", weights_bytes=50)  # reload d: evicting a fails
    assert tiers(cache) == {"d": "host", "a": "device"}  # where they were, counted there
    assert not any(e.busy for e in cache._entries.values())  # none left claimed
    assert cache.report().device_used_bytes == 30
    lease = cache.acquire("d", weights_bytes=50)  # works once the backend does
    assert isinstance(lease, Lease) and lease.served_from is Tier.HOST
    lease.release()
    assert tiers(cache) == {"a": "host", "d": "device"}


def test_a_failed_free_during_a_release_leaves_the_other_entries_usable():
    cache, backend, clock = make()
    for n in ("a", "b", "c"):
        use(cache, clock, n)
    backend.fail_free.add("a")
    with pytest.raises(RuntimeError, match="injected free"):
        cache.release()
    # a is out of the books (its free was attempted); b and c stay, unclaimed.
    assert tiers(cache) == {"b": "device", "c": "device"}
    assert not any(e.busy for e in cache._entries.values())
    assert cache.release() == ["b", "c"]
    assert cache.report().device_used_bytes == 0


def test_a_failed_offload_in_tick_leaves_its_releases_usable():
    cache, backend, clock = make(offload_s=10, release_s=20)
    use(cache, clock, "a")
    use(cache, clock, "b")
    cache.offload("a")  # a on host
    clock.advance(25)  # a past release, b past offload... and release: both release
    use(cache, clock, "c")
    clock.advance(15)  # c past offload only
    backend.fail_to_host.add("c")
    with pytest.raises(RuntimeError, match="injected to_host"):
        cache.tick()  # the releases ran first
    assert not any(e.busy for e in cache._entries.values())
    assert tiers(cache) == {"c": "device"}
    backend.fail_to_host.clear()
    assert cache.tick() == [("c", "offload")]


def test_tick_releases_before_it_offloads_so_the_released_host_room_counts():
    """a (host) is due for release, b (device) for offload into a host tier a fills: b goes
    to host in a's room. Offloads ran first: b found no room (a still counted, yet claimed),
    was freed and reported as offloaded."""
    cache, backend, clock = make(host=30, offload_s=10, release_s=100)
    use(cache, clock, "a")
    cache.offload("a")
    clock.advance(94)
    use(cache, clock, "b")
    clock.advance(9)  # a idle 104 s, b idle 10 s
    assert cache.tick() == [("a", "release"), ("b", "offload")]
    assert tiers(cache) == {"b": "host"}
    assert [c for c in backend.calls[-2:]] == [("free", "a"), ("to_host", "b")]
    assert cache.report().counters["host_full_releases"] == 0


def test_tick_reports_the_host_entries_an_offload_released_and_an_offload_that_found_no_room():
    cache, backend, clock = make(host=60, offload_s=10, release_s=100)
    use(cache, clock, "a")
    cache.offload("a")  # a on host, the LRU host entry
    use(cache, clock, "c")
    cache.offload("c")  # c on host; the host tier is full
    use(cache, clock, "b")
    clock.advance(9)  # b idle 10 s: due for offload; a and c are not due for release
    assert cache.tick() == [("a", "release"), ("b", "offload")]  # a made room, and says so
    assert tiers(cache) == {"c": "host", "b": "host"}
    # Admin offload says the same of each move.
    use(cache, clock, "d")  # d (50) on device; the host holds c and b (60 of 60)
    assert cache.offload("d") == [("c", "release"), ("b", "release"), ("d", "offload")]
    cache2, backend2, clock2 = make(host=0, offload_s=10, release_s=100)
    use(cache2, clock2, "a")
    clock2.advance(9)
    assert cache2.tick() == [("a", "release")]  # no host room: freed, and said so
    assert cache2.report().counters["host_full_releases"] == 1


def test_load_failure_leaves_nothing_behind():
    cache, backend, clock = make(fail_load={"a"})
    with pytest.raises(RuntimeError, match="injected"):
        cache.acquire("a", weights_bytes=30)
    rep = cache.report()
    assert rep.entries == () and rep.device_used_bytes == 0 and rep.counters["load_failures"] == 1
    use(cache, clock, "b")  # the cache still works


def test_max_resident_cap_evicts_by_count():
    cache, backend, clock = make(max_resident=2, budget=1000)
    for n in ("a", "b", "c"):
        use(cache, clock, n)
    assert tiers(cache) == {"a": "host", "b": "device", "c": "device"}


def test_a_pinned_entry_cap_says_so_not_bytes():
    cache, backend, clock = make(max_resident=1)
    lease = cache.acquire("a", weights_bytes=30)
    short = cache.acquire("b", weights_bytes=30)
    assert isinstance(short, Shortfall) and short.reason == "entries_in_use" and not short.permanent
    assert "entry slot" in short.message() and "max_resident" in short.message()
    lease.release()


def test_idle_timers_offload_then_release():
    cache, backend, clock = make(offload_s=10, release_s=100)
    use(cache, clock, "a")  # last used at t0, clock now t0+1
    use(cache, clock, "b")  # last used at t0+1
    assert cache.tick() == []
    clock.advance(8)  # a idle 10 s, b idle 9 s
    assert cache.tick() == [("a", "offload")]
    clock.advance(1)
    assert cache.tick() == [("b", "offload")]
    assert tiers(cache) == {"a": "host", "b": "host"}
    clock.advance(88)  # a idle 99 s
    assert cache.tick() == []
    clock.advance(1)
    assert cache.tick() == [("a", "release")]
    clock.advance(1)
    assert cache.tick() == [("b", "release")]
    rep = cache.report()
    assert rep.entries == () and rep.device_used_bytes == 0 and rep.host_used_bytes == 0


def test_idle_timers_skip_entries_in_use():
    cache, backend, clock = make(offload_s=10, release_s=100)
    lease = cache.acquire("a", weights_bytes=30)
    clock.advance(500)
    assert cache.tick() == []
    assert cache.report().entry("a").idle_s == 0.0
    lease.release()
    clock.advance(10)
    assert cache.tick() == [("a", "offload")]


def test_no_host_tier_releases_after_idle_release():
    cache, backend, clock = make(host=0, host_tier=False, offload_s=10, release_s=100)
    for n in ("a", "b", "c", "d"):
        use(cache, clock, n)
    assert tiers(cache) == {"c": "device", "d": "device"}  # a, b released to make room
    assert [c for c in backend.calls if c[0] != "load"] == [("free", "a"), ("free", "b")]
    clock.advance(50)
    assert cache.tick() == []  # no offload step without a host tier
    clock.advance(50)
    assert cache.tick() == [("c", "release"), ("d", "release")]


def test_non_offloadable_entries_are_released_not_moved():
    cache, backend, clock = make()
    use(cache, clock, "a", offloadable=False)
    use(cache, clock, "b")
    use(cache, clock, "c")
    backend.calls.clear()
    use(cache, clock, "d")
    assert backend.calls == [("free", "a"), ("to_host", "b"), ("load", "d")]
    clock.advance(20)
    assert ("a", "offload") not in cache.tick()


def test_admin_offload_and_release_skip_in_use():
    cache, backend, clock = make()
    use(cache, clock, "a")
    lease = cache.acquire("b", weights_bytes=30)
    assert cache.offload() == [("a", "offload")]
    assert tiers(cache) == {"a": "host", "b": "device"}
    assert cache.release() == ["a"]
    assert tiers(cache) == {"b": "device"}
    lease.release()
    assert cache.release("b") == ["b"]
    assert cache.report().entries == ()


def test_lease_released_twice_is_misuse():
    cache, backend, clock = make()
    lease = cache.acquire("a", weights_bytes=30)
    lease.release()
    with pytest.raises(ValueError, match="released twice"):
        lease.release()


def test_context_manager_releases():
    cache, backend, clock = make()
    with cache.acquire("a", weights_bytes=30, workspace_bytes=5) as lease:
        assert lease.obj.name == "a" and cache.report().in_flight == 1
    assert cache.report().in_flight == 0


@pytest.mark.parametrize("kwargs, field", [
    ({"device_budget_bytes": 0}, "device_budget_bytes"),
    ({"device_budget_bytes": 1, "host_budget_bytes": -1}, "host_budget_bytes"),
    ({"device_budget_bytes": 1, "idle_offload_s": 0}, "idle"),
    ({"device_budget_bytes": 1, "max_resident": 0}, "max_resident"),
])
def test_config_misuse_names_the_parameter(kwargs, field):
    with pytest.raises(ValueError, match=field):
        CacheConfig(**kwargs)


def test_acquire_misuse_names_the_parameter():
    cache, _, _ = make()
    with pytest.raises(ValueError, match="weights_bytes"):
        cache.acquire("a", weights_bytes=0)
    with pytest.raises(ValueError, match="workspace_bytes"):
        cache.acquire("a", weights_bytes=1, workspace_bytes=-1)


def test_an_entry_being_loaded_or_moved_reports_in_use():
    """A report taken mid-load or mid-eviction shows the claimed entries in use: the router
    must not count a loading checkpoint's bytes as evictable, nor a victim already leaving."""
    seen = {}

    class Watching(FakeBackend):
        def load(self, name):
            seen[("load", name)] = {e.name: (e.tier, e.in_use, e.idle_s) for e in cache.report().entries}
            return super().load(name)

        def to_host(self, obj):
            seen[("to_host", obj.name)] = {e.name: (e.tier, e.in_use, e.idle_s) for e in cache.report().entries}
            super().to_host(obj)

    clock = FakeClock()
    cfg = CacheConfig(device_budget_bytes=100, host_budget_bytes=100, idle_offload_s=10.0, idle_release_s=100.0)
    cache = PipelineCache(cfg, Watching(dict(SIZES)), clock)
    use(cache, clock, "a")
    use(cache, clock, "b")
    clock.advance(5)
    assert seen[("load", "b")] == {"a": ("device", 0, 1.0), "b": ("device", 1, 0.0)}
    lease = cache.acquire("d", weights_bytes=SIZES["d"])  # 50 needed, 40 free: a (LRU) goes to host
    assert seen[("to_host", "a")] == {"a": ("device", 1, 0.0), "b": ("device", 0, 6.0)}
    assert seen[("load", "d")] == {"a": ("host", 0, 7.0), "b": ("device", 0, 6.0), "d": ("device", 1, 0.0)}
    lease.release()
    assert {e.name: e.in_use for e in cache.report().entries} == {"a": 0, "b": 0, "d": 0}


# ---- cases found by mutating the policy (each failed one mutant the tests above let live) ----
def test_a_need_of_exactly_the_budget_fits():
    cache, backend, _ = make()
    backend.sizes["full"] = 100
    lease = cache.acquire("full", weights_bytes=100)  # 100 of 100: not a permanent 413
    assert isinstance(lease, Lease)
    lease.release()


def test_bytes_being_freed_still_count_as_used_until_freed():
    cache, backend, clock = make(host=0)  # no host room: a release frees
    use(cache, clock, "a")
    use(cache, clock, "d")
    seen = []
    real_free = backend.free
    backend.free = lambda obj: (seen.append(cache.report().device_used_bytes), real_free(obj))
    cache.release("a")
    assert seen == [80] and cache.report().device_used_bytes == 50  # a's 30 counted while freed
    cache2, backend2, clock2 = make(host=100)
    use(cache2, clock2, "a")
    cache2.offload("a")
    seen2 = []
    real2 = backend2.free
    backend2.free = lambda obj: (seen2.append(cache2.report().device_used_bytes), real2(obj))
    cache2.release("a")
    assert seen2 == [0]  # a host entry's free holds no device bytes


def test_an_overrun_of_exactly_one_victim_evicts_that_one():
    cache, backend, clock = make(measured_delta={"c": 40})  # c measures 70: 30 over after a and b
    for n in ("a", "b"):
        use(cache, clock, n)
    backend.calls.clear()
    use(cache, clock, "c")
    assert backend.calls == [("load", "c"), ("to_host", "a")]


def test_a_load_whose_measure_fails_is_freed():
    cache, backend, clock = make()

    def bad_measure(obj):
        raise RuntimeError("measure failed")

    backend.measure = bad_measure
    with pytest.raises(RuntimeError, match="measure failed"):
        cache.acquire("a", weights_bytes=30)
    assert backend.calls == [("load", "a"), ("free", "a")] and cache.report().entries == ()


def test_a_failed_reload_from_host_keeps_the_host_copy():
    cache, backend, clock = make(fail_to_device={"a"})
    use(cache, clock, "a")
    cache.offload("a")
    with pytest.raises(RuntimeError, match="injected to_device failure"):
        cache.acquire("a", weights_bytes=30)
    assert tiers(cache) == {"a": Tier.HOST} and cache.report().host_used_bytes == 30
    use(cache, clock, "a")  # and the next request reloads it from there
    assert cache.report().counters["host_reloads"] == 1 and cache.report().counters["disk_loads"] == 1


def test_idle_offloads_are_not_counted_as_evictions():
    cache, backend, clock = make()
    use(cache, clock, "a")
    clock.advance(20)
    assert cache.tick() == [("a", "offload")]
    assert cache.report().counters["evictions"] == 0


def test_ties_in_last_use_evict_the_entry_not_just_used():
    cache, backend, clock = make(host=0)
    for n in ("a", "b", "c", "a"):  # a coarse clock: all at one instant, a used again last
        cache.acquire(n, weights_bytes=SIZES[n]).release()
    backend.calls.clear()
    use(cache, clock, "d")  # 10 free, needs 50: two victims, the least recently used
    assert [n for op, n in backend.calls if op == "free"] == ["b", "c"]


def test_an_entry_being_loaded_is_reported_as_loading_until_it_is_on_the_device():
    """The router's holder gate counts a holder's load as part of its wait (it took a
    replica still loading for one with nothing left to load, and queued a burst on it)."""
    cache, backend, clock = make()
    seen = []
    real_load, real_to_device = backend.load, backend.to_device
    backend.load = lambda name: (seen.append(cache.report().entry(name)), real_load(name))[1]
    backend.to_device = lambda obj: (seen.append(cache.report().entry(obj.name)), real_to_device(obj))[1]
    use(cache, clock, "a")  # from disk
    cache.offload("a")
    use(cache, clock, "a")  # from the host
    assert [(e.tier, e.in_use, e.loading) for e in seen] == [("device", 1, "disk"), ("device", 1, "host")]
    assert cache.report().entry("a").loading == ""
    cache.offload("a")  # a move off the device is not a load
    assert cache.report().entry("a").loading == ""
