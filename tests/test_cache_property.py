"""Property: random acquire/release/tick/admin sequences keep the cache's invariants."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deployments.cache import CacheConfig, Lease, PipelineCache, Shortfall
from tests.fakes import FakeBackend, FakeClock

SIZES = {"m0": 10, "m1": 25, "m2": 40, "m3": 60, "m4": 90, "m5": 130}
BUDGET = 120

op = st.one_of(
    st.tuples(st.just("acquire"), st.sampled_from(sorted(SIZES)), st.integers(0, 30), st.booleans()),
    st.tuples(st.just("release"), st.integers(0, 10)),
    st.tuples(st.just("tick"), st.floats(0, 40)),
    st.tuples(st.just("offload"), st.sampled_from([None, *sorted(SIZES)])),
    st.tuples(st.just("free"), st.sampled_from([None, *sorted(SIZES)])),
)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(op, max_size=40), host_tier=st.booleans(), delta=st.integers(-5, 15),
       host_budget=st.sampled_from([30, 60, 100]))
def test_random_sequences_keep_invariants(ops, host_tier, delta, host_budget):
    clock = FakeClock()
    backend = FakeBackend(dict(SIZES), measured_delta={"m3": delta})
    cache = PipelineCache(
        CacheConfig(device_budget_bytes=BUDGET, host_budget_bytes=host_budget, idle_offload_s=10, idle_release_s=30,
                    max_resident=3, host_tier=host_tier),
        backend, clock,
    )
    leases: list[Lease] = []
    for step in ops:
        kind = step[0]
        if kind == "acquire":
            _, name, ws, offloadable = step
            pinned_before = {e.name for e in cache.report().entries if e.in_use}
            result = cache.acquire(name, weights_bytes=SIZES[name], workspace_bytes=ws, offloadable=offloadable)
            if isinstance(result, Lease):
                leases.append(result)
                assert result.obj.name == name and not result.obj.freed and result.obj.where == "device"
            else:
                assert isinstance(result, Shortfall)
            # Pinned entries are never evicted: each is still on the device.
            after = {e.name: e for e in cache.report().entries}
            for p in pinned_before:
                assert after[p].tier == "device" and after[p].in_use
        elif kind == "release" and leases:
            leases.pop(step[1] % len(leases)).release()
        elif kind == "tick":
            clock.advance(step[1])
            cache.tick()
        elif kind == "offload":
            cache.offload(step[1])
        elif kind == "free":
            cache.release(step[1])
        rep = cache.report()
        assert rep.device_used_bytes <= rep.device_budget_bytes
        assert rep.host_used_bytes <= rep.host_budget_bytes or not host_tier
        assert rep.device_used_bytes == sum(e.bytes for e in rep.entries if e.tier == "device") + rep.workspace_in_flight_bytes
        assert rep.in_flight == len(leases) == sum(e.in_use for e in rep.entries)
        assert sum(1 for e in rep.entries if e.tier == "device") <= 3
        c = rep.counters
        loaded = c["disk_loads"]
        alive = len(rep.entries)
        # every disk load is still alive or was released exactly once (shortfall give-backs included)
        assert loaded - c["releases"] == alive
        assert c["hits"] + c["host_reloads"] + c["disk_loads"] >= len(leases)
    for lease in leases:
        lease.release()
    assert cache.report().in_flight == 0
