"""Repro: PipelineCache drops the very host entry it is reloading when the host tier is full.

    python -m bench.repros.cache_host_self_eviction

acquire(X) with X on HOST plans device victims; moving a victim to a full host tier
releases LRU host entries, and X itself (HOST, unpinned, not busy) is a candidate. X is
freed (obj=None, removed from the books), then _acquire_slow calls to_device(None).
Found by bench/placement_speed.py at 1000 replicas (seed 1). Exits 1 while the bug is there.
"""

from __future__ import annotations

import sys

from deployments.cache import CacheConfig, Lease, PipelineCache
from tests.fakes import FakeBackend, FakeClock


def main() -> int:
    sizes = {"a": 50, "b": 50, "c": 50}
    clock, backend = FakeClock(), FakeBackend(dict(sizes))
    cache = PipelineCache(CacheConfig(device_budget_bytes=100, host_budget_bytes=60), backend, clock)
    for name in ("a", "b", "c"):  # c evicts a to host: host 50 of 60 used
        lease = cache.acquire(name, weights_bytes=sizes[name])
        assert isinstance(lease, Lease)
        lease.release()
        clock.advance(1)
    print("before:", [(e.name, e.tier) for e in cache.report().entries])
    try:
        lease = cache.acquire("a", weights_bytes=50)  # a on host; evicting b needs host room -> drops a
    except Exception as exc:  # noqa: BLE001
        print(f"BUG: acquire('a') raised {type(exc).__name__}: {exc}")
        print("backend calls:", backend.calls[-4:])
        print("after:", [(e.name, e.tier) for e in cache.report().entries])
        return 1
    print("ok:", lease.served_from, [(e.name, e.tier) for e in cache.report().entries])
    return 0


if __name__ == "__main__":
    sys.exit(main())
