"""PipelineCache: byte-budget LRU bookkeeping over three tiers (DEVICE, HOST, DISK).

Pure policy: no ray, no torch. The backend (load / measure / move / free) and the clock are
injected, so tests drive it with fakes and assert exact eviction orders.

Accounting:
- device used = bytes of DEVICE entries (measured after load) + workspace of leases in
  flight + bytes being loaded (reserved at their estimate) + bytes being moved off.
- An entry in use (pinned by a lease) is never evicted, offloaded or released.
- ``acquire`` never over-commits: if the need cannot fit even after evicting every unpinned
  entry it evicts nothing and returns a :class:`Shortfall` with the numbers. Caveat: the
  room a load evicts for is not reserved while its victims move off; a hit that runs
  concurrently with that eviction may take it. The replica runs one acquire at a time.
- A checkpoint's measured bytes are remembered after its first disk load: the next load
  plans with them where they exceed the estimate (no load that is bound to be given back).
- A backend error while entries move (to host, back, freed) leaves the entries it did not
  finish usable and counted where they were (the failing one on the device): none stays
  claimed, so none is lost to the books.

Concurrency: bookkeeping is guarded by a short lock; device I/O (load, move, free) is
serialized by a second lock, so a cache hit and ``report()`` never wait behind a load.
"""

from __future__ import annotations

import enum
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Protocol


class Tier(str, enum.Enum):
    DEVICE = "device"
    HOST = "host"
    DISK = "disk"


class CacheBackend(Protocol):
    """The torch side, injected. Every method may block; none is called under the lock."""

    def load(self, name: str) -> Any:
        """Load ``name`` from disk onto the device; raise on failure, leaving nothing behind."""

    def measure(self, obj: Any) -> int:
        """Bytes ``obj`` holds on the device."""

    def to_host(self, obj: Any) -> None: ...

    def to_device(self, obj: Any) -> None: ...

    def free(self, obj: Any) -> None:
        """Release everything ``obj`` holds; the cache drops its own reference right after."""

    def leaked(self) -> int:
        """Modules of freed entries still alive (a leak if > 0)."""


@dataclass(frozen=True)
class CacheConfig:
    """Limits of one cache; validated once here.

    ``host_tier=False`` collapses the host tier into the device (CPU-only hosts): idle
    entries are released after ``idle_release_s`` without an offload step.
    """

    device_budget_bytes: int
    host_budget_bytes: int = 0
    idle_offload_s: float = 300.0
    idle_release_s: float = 1800.0
    max_resident: int = 16
    host_tier: bool = True

    def __post_init__(self) -> None:
        if self.device_budget_bytes <= 0:
            raise ValueError(f"device_budget_bytes must be > 0, got {self.device_budget_bytes}")
        if self.host_budget_bytes < 0:
            raise ValueError(f"host_budget_bytes must be >= 0, got {self.host_budget_bytes}")
        if not (self.idle_offload_s > 0 and self.idle_release_s > 0):  # NaN too: it would switch the timers off
            raise ValueError(
                f"idle timeouts must be > 0 s, got idle_offload_s={self.idle_offload_s} idle_release_s={self.idle_release_s}"
            )
        if self.max_resident < 1:
            raise ValueError(f"max_resident must be >= 1, got {self.max_resident}")


@dataclass(frozen=True)
class Shortfall:
    """An expected outcome, not an error: the need does not fit right now (or ever)."""

    checkpoint: str
    need_bytes: int
    budget_bytes: int
    used_bytes: int
    pinned_bytes: int
    reason: str  # "exceeds_budget": never fits here; "in_use": pinned entries hold the room;
    # "entries_in_use": room enough, but every entry slot (max_resident) is pinned
    max_resident: int = 0  # the entry cap, for "entries_in_use"

    @property
    def permanent(self) -> bool:
        return self.reason == "exceeds_budget"

    def message(self) -> str:
        if self.permanent:
            return (
                f"checkpoint {self.checkpoint!r} needs {self.need_bytes} bytes but the device budget is "
                f"{self.budget_bytes} bytes"
            )
        if self.reason == "entries_in_use":
            return (
                f"checkpoint {self.checkpoint!r} needs an entry slot; all {self.max_resident} (max_resident) hold "
                f"pipelines in use by requests in flight"
            )
        return (
            f"checkpoint {self.checkpoint!r} needs {self.need_bytes} bytes; {self.pinned_bytes} of the "
            f"{self.budget_bytes}-byte budget are held by requests in flight"
        )


@dataclass
class CacheCounters:
    hits: int = 0
    host_reloads: int = 0
    disk_loads: int = 0
    evictions: int = 0
    offloads: int = 0
    releases: int = 0
    host_full_releases: int = 0
    shortfalls: int = 0
    load_failures: int = 0
    oom_recoveries: int = 0


@dataclass(frozen=True)
class EntryReport:
    name: str
    tier: str
    bytes: int
    estimate_bytes: int
    idle_s: float
    in_use: int  # leases pinning it, plus 1 while the cache has it claimed (loading or moving)
    loading: str = ""  # being loaded onto the device, from "disk" or "host": a request for it waits for that


@dataclass(frozen=True)
class CacheReport:
    device_budget_bytes: int
    device_used_bytes: int
    device_free_bytes: int
    workspace_in_flight_bytes: int
    host_budget_bytes: int
    host_used_bytes: int
    in_flight: int
    entries: tuple[EntryReport, ...]
    counters: dict[str, int]
    leaked_modules: int

    def entry(self, name: str) -> EntryReport | None:
        return next((e for e in self.entries if e.name == name), None)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["entries"] = [asdict(e) for e in self.entries]
        return d


@dataclass(eq=False)  # identity: entries hold pipelines, never compare them by value
class _Entry:
    name: str
    tier: Tier
    obj: Any
    bytes: int
    estimate_bytes: int
    offloadable: bool
    last_used_s: float
    pins: int = 0
    busy: bool = False  # being loaded or moved: not usable, not evictable
    loading: str = ""  # busy with a load onto the device (not a move off it): "disk" or "host"


@dataclass
class Lease:
    """A pinned entry. Use as a context manager or call :meth:`release` exactly once."""

    name: str
    obj: Any
    served_from: Tier
    workspace_bytes: int
    load_s: float
    _cache: "PipelineCache" = field(repr=False)
    _released: bool = field(default=False, repr=False)

    def release(self) -> None:
        if self._released:
            raise ValueError(f"lease for {self.name!r} released twice; call release() once")
        self._released = True
        self._cache._unpin(self)

    def __enter__(self) -> "Lease":
        return self

    def __exit__(self, *exc: object) -> None:
        if not self._released:
            self.release()


class PipelineCache:
    """LRU pipeline cache with a device byte budget, a host tier, pins and idle timers."""

    def __init__(self, config: CacheConfig, backend: CacheBackend, clock: Callable[[], float] = time.monotonic):
        self.config = config
        self._backend = backend
        self._clock = clock
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._counters = CacheCounters()
        self._workspace_bytes = 0
        self._in_flight = 0
        self._leaving_bytes = 0  # evicted in the books, device memory not yet given back
        self._measured: dict[str, tuple[int, int]] = {}  # name -> (estimate, device bytes) of its last disk load
        self._lock = threading.RLock()
        self._io = threading.Lock()

    # ---- accounting (call with self._lock held) -------------------------------------------
    def _device_used(self) -> int:
        weights = sum(e.bytes for e in self._entries.values() if e.tier is Tier.DEVICE)
        return weights + self._workspace_bytes + self._leaving_bytes

    def _pinned_bytes(self) -> int:
        held = sum(e.bytes for e in self._entries.values() if e.tier is Tier.DEVICE and (e.pins or e.busy))
        return held + self._workspace_bytes + self._leaving_bytes

    def _host_used(self) -> int:
        return sum(e.bytes for e in self._entries.values() if e.tier is Tier.HOST)

    def _lru(self, tier: Tier, exclude: str | None = None) -> list[_Entry]:
        """Unpinned, idle entries of ``tier``, least recently used first (ties: oldest insert)."""
        cands = [e for e in self._entries.values() if e.tier is tier and not e.pins and not e.busy and e.name != exclude]
        return sorted(cands, key=lambda e: e.last_used_s)  # stable: insertion order breaks ties

    def _plan(self, name: str, need_bytes: int, adds_resident: bool, footprint_bytes: int) -> list[_Entry] | Shortfall:
        """Victims to evict (LRU first) so ``need_bytes`` fits, or the shortfall. Changes nothing.

        ``footprint_bytes``: the entry's bytes plus the workspace, resident or not; above the
        budget it can never fit (permanent), whatever ``need_bytes`` is left to find.
        """
        budget = self.config.device_budget_bytes
        used = self._device_used()
        if footprint_bytes > budget:
            return Shortfall(name, footprint_bytes, budget, used, self._pinned_bytes(), "exceeds_budget")
        victims: list[_Entry] = []
        free = budget - used
        resident = sum(1 for e in self._entries.values() if e.tier is Tier.DEVICE) + int(adds_resident)
        for cand in self._lru(Tier.DEVICE, exclude=name):
            if free >= need_bytes and resident <= self.config.max_resident:
                break
            victims.append(cand)
            free += cand.bytes
            resident -= 1
        if free < need_bytes:
            return Shortfall(name, need_bytes, budget, used, self._pinned_bytes(), "in_use")
        if resident > self.config.max_resident:
            return Shortfall(name, need_bytes, budget, used, self._pinned_bytes(), "entries_in_use",
                             self.config.max_resident)
        return victims

    # ---- device I/O (call with self._io held, self._lock NOT held) ----------------------------
    def _claim(self, entries: list[_Entry]) -> list[_Entry]:
        """Mark entries busy (call with self._lock held, in the section that chose them) so
        that no concurrent hit pins them before they move."""
        for e in entries:
            assert not e.pins and not e.busy, f"claiming {e.name!r} in use: this is a bug"
            e.busy = True
        return entries

    def _unclaim(self, entries: list[_Entry]) -> None:
        """Give back claimed entries still in the books, where they are (after a backend error)."""
        with self._lock:
            for e in entries:
                if self._entries.get(e.name) is e:
                    e.busy = False

    def _move_off_device(self, victims: list[_Entry], *, evicting: bool) -> list[tuple[str, str]]:
        """Offload each claimed victim to host (LRU host entries released for room) or release
        it; returns what was done, in order: (name, "offload" or "release"), host entries
        released for room included.

        On a backend error the victims not yet moved, and the failing one (still counted on
        the device), are unclaimed before it propagates.
        """
        done: list[tuple[str, str]] = []
        for i, v in enumerate(victims):
            host_victims: list[_Entry] = []
            try:
                self._move_one_off(v, host_victims, evicting, done)
            except BaseException:
                self._unclaim(host_victims + victims[i:])
                raise
        return done

    def _move_one_off(self, v: _Entry, host_victims: list[_Entry], evicting: bool, done: list[tuple[str, str]]) -> None:
        """Move claimed ``v`` off the device; ``host_victims`` is filled with the host entries
        claimed for its room and emptied as they are dropped; ``done`` gets each move."""
        with self._lock:
            to_host = self.config.host_tier and v.offloadable
            if to_host:
                room = self.config.host_budget_bytes - self._host_used()
                for h in self._lru(Tier.HOST):
                    if room >= v.bytes:
                        break
                    host_victims.append(h)
                    room += h.bytes
                if room < v.bytes:
                    to_host = False
                    host_victims.clear()
                    self._counters.host_full_releases += 1
            self._claim(host_victims)
            if evicting:
                self._counters.evictions += 1
        while host_victims:
            h = host_victims.pop(0)
            self._drop(h)  # out of the books before its free runs
            done.append((h.name, "release"))
        if to_host:
            self._backend.to_host(v.obj)
            with self._lock:
                v.tier, v.busy = Tier.HOST, False
                self._counters.offloads += 1
            done.append((v.name, "offload"))
        else:
            self._drop(v)
            done.append((v.name, "release"))

    def _drop(self, e: _Entry) -> None:
        """Remove ``e`` from the books and free it; its device bytes count until freed."""
        with self._lock:
            if self._entries.get(e.name) is e:
                self._entries.pop(e.name)
            leaving = e.bytes if e.tier is Tier.DEVICE else 0
            self._leaving_bytes += leaving
        obj, e.obj = e.obj, None
        try:
            self._backend.free(obj)
        finally:
            del obj
            with self._lock:
                self._leaving_bytes -= leaving
                self._counters.releases += 1

    # ---- public API -------------------------------------------------------------------------
    def acquire(self, name: str, *, weights_bytes: int, workspace_bytes: int = 0, offloadable: bool = True) -> Lease | Shortfall:
        """Pin ``name`` on the device, loading or reloading it as needed.

        ``weights_bytes`` is the estimate used when loading from disk; ``workspace_bytes`` is
        held for the life of the lease. Returns a :class:`Lease` (a context manager) or a
        :class:`Shortfall` when the need cannot fit. Backend exceptions (load failures,
        out-of-memory) propagate after the books are restored: nothing stays half-resident.
        ``offloadable=False`` entries (bitsandbytes) are released instead of moved to host.
        """
        if weights_bytes <= 0:
            raise ValueError(f"weights_bytes must be > 0, got {weights_bytes}")
        if workspace_bytes < 0:
            raise ValueError(f"workspace_bytes must be >= 0, got {workspace_bytes}")
        lease = self._try_hit(name, workspace_bytes)
        if lease is not None:
            return lease
        with self._io:
            return self._acquire_slow(name, weights_bytes, workspace_bytes, offloadable)

    def _try_hit(self, name: str, workspace_bytes: int) -> Lease | None:
        with self._lock:
            e = self._entries.get(name)
            if e is None or e.tier is not Tier.DEVICE or e.busy:
                return None
            if self.config.device_budget_bytes - self._device_used() < workspace_bytes:
                return None  # the slow path evicts for the workspace, or reports the shortfall
            return self._pin(e, workspace_bytes, Tier.DEVICE, 0.0)

    def _pin(self, e: _Entry, workspace_bytes: int, served_from: Tier, load_s: float) -> Lease:
        e.pins += 1
        e.last_used_s = self._clock()
        self._entries.move_to_end(e.name)
        self._workspace_bytes += workspace_bytes
        self._in_flight += 1
        if served_from is Tier.DEVICE:
            self._counters.hits += 1
        return Lease(e.name, e.obj, served_from, workspace_bytes, load_s, self)

    def _acquire_slow(self, name: str, weights_bytes: int, workspace_bytes: int, offloadable: bool) -> Lease | Shortfall:
        with self._lock:
            e = self._entries.get(name)
            tier = e.tier if e is not None else Tier.DISK
            # A disk load plans with the larger of the estimate and what it measured last time,
            # while the estimate is the one it measured against: a checkpoint whose files were
            # replaced (a new estimate) is planned afresh, not at its old version's size.
            if e is not None:
                entry_bytes = e.bytes
            else:
                estimate, measured = self._measured.get(name, (weights_bytes, 0))
                entry_bytes = max(weights_bytes, measured if estimate == weights_bytes else 0)
            need = workspace_bytes + (0 if tier is Tier.DEVICE else entry_bytes)
            plan = self._plan(name, need, tier is not Tier.DEVICE, entry_bytes + workspace_bytes)
            if isinstance(plan, Shortfall):
                self._counters.shortfalls += 1
                return plan
            self._claim(plan)
            if tier is Tier.HOST:
                # Claim the entry being reloaded too: moving a victim to a full host tier
                # releases LRU host entries, and this one must not be among them
                # (bench/repros/cache_host_self_eviction.py). It still counts as host
                # bytes until it moves, so the victims' host room is judged conservatively.
                self._claim([e])
        try:
            self._move_off_device(plan, evicting=True)
        except BaseException:
            if tier is Tier.HOST:
                self._unclaim([e])
            raise
        with self._lock:
            if tier is Tier.DEVICE:
                return self._pin(e, workspace_bytes, Tier.DEVICE, 0.0)
            if e is None:
                e = _Entry(name, Tier.DEVICE, None, entry_bytes, weights_bytes, offloadable, self._clock())
                self._entries[name] = e
            # Reserved at entry_bytes while it loads.
            e.tier, e.busy, e.loading = Tier.DEVICE, True, "host" if tier is Tier.HOST else "disk"
        start = self._clock()
        try:
            if tier is Tier.HOST:
                self._backend.to_device(e.obj)
            else:
                e.obj = self._backend.load(name)
                measured = self._backend.measure(e.obj)
        except BaseException:
            with self._lock:
                self._counters.load_failures += 1
                if tier is Tier.DISK:
                    self._entries.pop(name, None)
                else:
                    e.tier, e.busy, e.loading = Tier.HOST, False, ""  # the move failed; the host copy stands
            if tier is Tier.DISK and e.obj is not None:
                self._backend.free(e.obj)
            raise
        load_s = self._clock() - start
        with self._lock:
            e.loading = ""  # loaded: still claimed until pinned, below
            if tier is Tier.DISK:
                e.bytes = measured
                self._measured[name] = (weights_bytes, measured)
                self._counters.disk_loads += 1
            else:
                self._counters.host_reloads += 1
            # Still claimed (busy) until pinned: no concurrent hit takes it while an overrun
            # is settled. The lease's own workspace is added at pin time, so it counts here too.
            over = self._device_used() + workspace_bytes - self.config.device_budget_bytes
            never = e.bytes + workspace_bytes > self.config.device_budget_bytes
        if over > 0:
            # Measured above the estimate: evict more, or give the load back.
            try:
                settled = not never and self._evict_for_overrun(e, over)
            except BaseException:
                self._drop(e)
                raise
            if not settled:
                with self._lock:
                    self._counters.shortfalls += 1
                    short = Shortfall(name, e.bytes + workspace_bytes, self.config.device_budget_bytes,
                                      self._device_used(), self._pinned_bytes(), "exceeds_budget" if never else "in_use")
                self._drop(e)
                return short
        with self._lock:
            e.busy = False
            return self._pin(e, workspace_bytes, tier, load_s)

    def _evict_for_overrun(self, e: _Entry, over: int) -> bool:
        with self._lock:
            victims, freed = [], 0
            for cand in self._lru(Tier.DEVICE, exclude=e.name):
                if freed >= over:
                    break
                victims.append(cand)
                freed += cand.bytes
            if freed < over:
                return False
            self._claim(victims)
        self._move_off_device(victims, evicting=True)
        return True

    def _unpin(self, lease: Lease) -> None:
        with self._lock:
            e = self._entries.get(lease.name)
            assert e is not None and e.pins > 0, f"unpin of {lease.name!r} without a pin: this is a bug"
            e.pins -= 1
            e.last_used_s = self._clock()
            self._workspace_bytes -= lease.workspace_bytes
            self._in_flight -= 1
            assert self._workspace_bytes >= 0 and self._in_flight >= 0, "negative in-flight accounting: this is a bug"

    def tick(self) -> list[tuple[str, str]]:
        """Apply idle timeouts; returns the (checkpoint, action) pairs taken, in order.

        Any entry idle >= ``idle_release_s`` is released first; then DEVICE entries idle >=
        ``idle_offload_s`` go to HOST (when there is a host tier and the entry is
        offloadable), releasing LRU host entries for room, or are released when the host
        tier cannot hold them. Releases first, so that their host room counts for the
        offloads (entries claimed for release are no host victims, yet still counted as host
        bytes). The pairs say what each move did: ("x", "release") for an offload that found
        no room. Skips the round (returns []) when a load or move is under way.
        """
        if not self._io.acquire(blocking=False):
            return []
        try:
            now = self._clock()
            with self._lock:
                cfg = self.config
                release = [e for t in (Tier.HOST, Tier.DEVICE) for e in self._lru(t) if now - e.last_used_s >= cfg.idle_release_s]
                offload = [
                    e for e in self._lru(Tier.DEVICE)
                    if cfg.host_tier and e.offloadable and e not in release and now - e.last_used_s >= cfg.idle_offload_s
                ]
                self._claim(release + offload)
            try:
                self._release_entries(release)
            except BaseException:
                self._unclaim(offload)
                raise
            return [(e.name, "release") for e in release] + self._move_off_device(offload, evicting=False)
        finally:
            self._io.release()

    def _release_entries(self, entries: list[_Entry]) -> None:
        for i, e in enumerate(entries):  # claimed by the caller
            try:
                self._drop(e)  # out of the books before its free runs
            except BaseException:
                self._unclaim(entries[i + 1:])
                raise

    def offload(self, name: str | None = None) -> list[tuple[str, str]]:
        """Admin: move idle DEVICE entries (one or all) off the device; returns what was done,
        as :meth:`tick` does: (name, "offload" or "release") in order, host entries released
        for room included.

        Non-offloadable entries, and all entries when there is no host tier or no room in
        it, are released. Entries in use are skipped.
        """
        with self._io:
            with self._lock:
                victims = self._claim([e for e in self._lru(Tier.DEVICE) if name is None or e.name == name])
            return self._move_off_device(victims, evicting=False)

    def release(self, name: str | None = None) -> list[str]:
        """Admin: free idle entries (one or all) from every tier; returns their names."""
        with self._io:
            with self._lock:
                victims = self._claim([e for t in (Tier.DEVICE, Tier.HOST) for e in self._lru(t) if name is None or e.name == name])
            self._release_entries(victims)
            return [v.name for v in victims]

    def record_oom_recovery(self) -> None:
        with self._lock:
            self._counters.oom_recoveries += 1

    def report(self) -> CacheReport:
        """A consistent snapshot (taken under the bookkeeping lock)."""
        leaked = self._backend.leaked()
        with self._lock:
            now = self._clock()
            used = self._device_used()
            # A claimed entry (loading, reloading, or a victim on its way off the device) counts
            # as in use: the router must neither take its bytes for free room nor plan to
            # evict it, as this cache would not (it is on the device at its reserved bytes).
            entries = tuple(
                EntryReport(e.name, e.tier.value, e.bytes, e.estimate_bytes,
                            0.0 if e.pins or e.busy else round(max(0.0, now - e.last_used_s), 3), e.pins + e.busy,
                            e.loading)
                for e in self._entries.values()
            )
            return CacheReport(
                device_budget_bytes=self.config.device_budget_bytes,
                device_used_bytes=used,
                device_free_bytes=self.config.device_budget_bytes - used,
                workspace_in_flight_bytes=self._workspace_bytes,
                host_budget_bytes=self.config.host_budget_bytes,
                host_used_bytes=self._host_used(),
                in_flight=self._in_flight,
                entries=entries,
                counters=asdict(self._counters),
                leaked_modules=leaked,
            )
