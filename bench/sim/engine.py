"""Discrete-event simulation of a replica fleet under four caching/routing policies.

What is real and what is modeled:
- REAL: router.fleet_index.FleetIndex over router.placement's scoring (policies a, c, d;
  ``rank_limit`` 0: the stateless rank_indices instead), router.ledger.Ledger overlays,
  router.request_router.view_from_report (views from reports), and one
  deployments.cache.PipelineCache per replica (all policies) doing all bookkeeping:
  LRU order, byte budgets, max_resident, host tier, pins, idle timers, counters; and one
  deployments.service_times.ServiceTimes per replica fed the simulated load and inference
  durations, whose figures go into the reports (``service_times``), so the holder gate
  runs as deployed, with ``evict_for_held`` once a request waited
  ``holder_wait_s``.
- MODELED: the backend (bench/sim/backend.py) returns instantly; the seconds its loads
  and moves would take (bytes / bandwidth) are charged on the simulated clock. Inference
  time per request is a per-variant constant divided by a per-profile speed factor.

Replica model (as deployments/replica.py): one request runs at a time; acquire -> run ->
release. At most ``max_ongoing`` requests (running + queued) per replica, as Ray's
``max_ongoing_requests``; a request no replica can take waits at the router and is
retried, oldest first, when a replica frees a slot. Device I/O is serialized per replica
(the cache's I/O lock): a load waits for an offload still in progress.

Router model for a, c, d (as router/request_router.py): every ``report_period_s`` each
replica's cache.report() becomes its routing stats, the ledger forgets placements that
report reflects, and a replica's view is ``ledger.overlay(view_from_report(report))``
with queue lengths beside it; the request goes to the first of the ``rank_limit`` ranked
replicas with queue room, else waits. The simulator keeps one Ledger per replica (every Ledger
method filters by replica id, so this is the same state as one shared Ledger) and reuses a
replica's overlaid view until its report, queue length or ledger changes: the views
``rank`` sees are exactly those the router would build. A view is rebuilt when its
replica's state changed (a new ``report_seq``) or the ledger changed; a report where only
time passed keeps the view, as rank_for does (``keep_views``; off: every report builds a
view, as rank_for did before reports carried ``report_seq``). Building the views from
reports and the ledger is timed as view upkeep.

Policy b models Ray Serve model multiplexing (ray/serve/_private/request_router): replicas
holding the model, else those with the fewest models, else any; power-of-two least-queue
among those with room. Each replica is a count-limited LRU (a PipelineCache with
``max_resident = (budget - largest workspace) // largest weights`` over the checkpoints it
can hold, no host tier): it can never over-commit. Ray has no notion of which replicas can
hold a checkpoint; the model is given the same eligibility filter as policy a so that it is
not charged for it.
"""

from __future__ import annotations

import dataclasses
import heapq
import random
import time
from bisect import bisect_left, insort
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from bench.sim.backend import SimBackend
from bench.sim.model import Checkpoint, ReplicaSpec, Request
from deployments.cache import CacheConfig, Lease, PipelineCache, Shortfall
from deployments.service_times import ServiceTimes
from router.ledger import Ledger
from router.fleet_index import FleetIndex
from router.placement import ReplicaView, rank, rank_indices

POLICIES = {
    "a": "router: placement.rank + byte-budget LRU with host tier",
    "b": "Ray multiplexing: count-limited LRU, multiplex routing",
    "c": "unload after every request",
    "d": "offload to host after every request",
}

NEVER = 1e12  # idle timers that never fire within a simulation


@dataclass(frozen=True)
class SimParams:
    disk_gbps: float = 2.0  # disk -> device, GB/s
    h2d_gbps: float = 12.0  # host -> device (pinned PCIe), GB/s
    d2h_gbps: float = 12.0  # device -> host, GB/s
    max_ongoing: int = 8  # Ray max_ongoing_requests per replica
    spill_queue_len: int = 4
    report_period_s: float = 1.0  # routing_stats_period_s
    tick_period_s: float = 1.0  # idle_check_period_s
    idle_timers: bool = True  # policy a: profile idle_offload_s / idle_release_s
    age_reports: bool = True  # reuse an unchanged replica's last report, aged (see _refresh_reports)
    keep_views: bool = True  # an unchanged replica's aged report keeps its view, as rank_for does (report_seq)
    service_times: bool = True  # reports carry deployments.service_times figures, so the holder gate runs as deployed
    holder_wait_s: float = 2.0  # MemoryAwareRequestRouter's holder_wait_s: evict_for_held once a request waited this long
    backlog: bool = True  # the holder gate counts the jobs for the checkpoint pending ahead at the router, as rank_for
    size_error: float = 1.0  # actual device bytes of a load / the estimate the router and cache plan with
    rank_limit: int = 16  # places asked of router.fleet_index.FleetIndex per decision, as rank_for (0: rank_indices, whole order)
    sample_every: int = 100  # keep every n-th decision's inputs to time bench/placement_fast.py on (0: off)
    seed: int = 1


@dataclass
class Job:
    req: Request
    ck: Checkpoint
    key: str
    routed_s: float = 0.0
    start_s: float = 0.0
    load_s: float = 0.0
    infer_s: float = 0.0  # this request's modeled inference time on the replica that runs it
    served_from: str = ""
    lease: Lease | None = None
    replica: int = -1
    loaded_s: float = 0.0  # when its load (disk or host) ends; the cache's books have it loaded at once
    bounces: int = 0  # replicas that refused it (503 or 500) so far


@dataclass
class Rep:
    spec: ReplicaSpec
    cache: PipelineCache
    backend: SimBackend
    ledger: Ledger
    queue: deque = field(default_factory=deque)
    running: Job | None = None
    ongoing: int = 0  # running + queued (what Ray's queue-length cache reports)
    io_free_s: float = 0.0
    report_src: dict[str, Any] | None = None  # the last real report's routing stats
    changed: bool = True  # the cache changed since report_src was taken
    base_view: ReplicaView | None = None
    view: ReplicaView | None = None
    view_of: tuple[ReplicaView | None, int] = (None, -1)  # (base view, ledger version) ``view`` was built from
    dirty: bool = True  # its view may need rebuilding (it is in Simulation._dirty_reps)
    peak_report_bytes: int = 0
    report_overcommits: int = 0
    models: frozenset = frozenset()  # device-resident names (what Ray's multiplexed_model_ids reports)
    times: ServiceTimes = field(default_factory=ServiceTimes)  # the replica's measured times (simulated durations)
    reported_loading: bool = False  # its last real report showed a load in progress


class Clock:
    __slots__ = ("t",)

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


_MAX_BOUNCES = 8  # refusals by replicas before a job is answered with the error


def mux_capacity(budget: int, eligible: list[Checkpoint]) -> int:
    """Ray multiplexing's max_num_models_per_replica for one replica: never over-commits."""
    if not eligible:
        return 1
    largest_w = max(c.weights_bytes for c in eligible)
    largest_ws = max(c.workspace_bytes for c in eligible)
    return max(1, (budget - largest_ws) // largest_w)


class Simulation:
    def __init__(self, policy: str, fleet: list[ReplicaSpec], catalog: list[Checkpoint], trace: list[Request],
                 params: SimParams):
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {sorted(POLICIES)}, got {policy!r}")
        from router.request_router import view_from_report  # imports ray (not started)

        self._view_from_report = view_from_report
        self.policy, self.fleet, self.catalog, self.trace, self.p = policy, fleet, catalog, trace, params
        self.clock = Clock()
        self.rng = random.Random(params.seed * 1009 + ord(policy))
        if not params.size_error > 0:
            raise ValueError(f"size_error must be > 0, got {params.size_error}")
        # What a load measures: the estimate, or off by size_error (bench/results: the
        # estimator is within 0.5% on real weights; bitsandbytes' state once was 12.5% out).
        sizes = {c.name: int(c.weights_bytes * params.size_error) for c in catalog}
        self.reps: list[Rep] = []
        # Eligibility: which checkpoints each replica's budget can ever hold (weights + workspace).
        self.eligible: list[bytearray] = [bytearray(c.total_bytes <= s.profile.device_budget_bytes for c in catalog)
                                          for s in fleet]
        self.mux_cap: list[int] = []
        # @serve.multiplexed takes one max_num_models_per_replica for the whole deployment: the
        # largest that over-commits no replica's budget, i.e. the least of the per-replica
        # figures (per replica, the big boards took 2 and sent every cold model to the small
        # ones, each of which then held 1: a setting Ray cannot express, and worse for (b)).
        uniform_cap = min((mux_capacity(s.profile.device_budget_bytes, [c for c, ok in zip(catalog, elig) if ok])
                           for s, elig in zip(fleet, self.eligible)), default=1) if policy == "b" else 1
        for spec in fleet:
            prof = spec.profile
            budget = prof.device_budget_bytes
            if policy == "a":
                cfg = CacheConfig(device_budget_bytes=budget, host_budget_bytes=prof.host_budget_bytes,
                                  idle_offload_s=prof.idle_offload_s if params.idle_timers else NEVER,
                                  idle_release_s=prof.idle_release_s if params.idle_timers else NEVER,
                                  max_resident=prof.max_resident_pipelines, host_tier=True)
            elif policy == "b":
                cap = uniform_cap
                self.mux_cap.append(cap)
                cfg = CacheConfig(device_budget_bytes=budget, host_budget_bytes=0, idle_offload_s=NEVER,
                                  idle_release_s=NEVER, max_resident=cap, host_tier=False)
            elif policy == "c":
                cfg = CacheConfig(device_budget_bytes=budget, host_budget_bytes=0, idle_offload_s=NEVER,
                                  idle_release_s=NEVER, max_resident=prof.max_resident_pipelines, host_tier=False)
            else:
                cfg = CacheConfig(device_budget_bytes=budget, host_budget_bytes=prof.host_budget_bytes,
                                  idle_offload_s=NEVER, idle_release_s=NEVER,
                                  max_resident=prof.max_resident_pipelines, host_tier=True)
            backend = SimBackend(sizes, capacity_bytes=budget, disk_bps=params.disk_gbps * 1e9,
                                 h2d_bps=params.h2d_gbps * 1e9, d2h_bps=params.d2h_gbps * 1e9)
            self.reps.append(Rep(spec, PipelineCache(cfg, backend, self.clock), backend, Ledger()))
        if any(not any(e[c.index] for e in self.eligible) for c in catalog):
            raise ValueError("some checkpoint fits no replica of the fleet; add a larger profile to --mix")
        self.events: list[tuple[float, int, int, Any]] = []
        self._seq = 0
        self.pending: deque[Job] = deque()
        # Per checkpoint index, the arrival times of its pending jobs, sorted: a decision's
        # backlog is how many of them arrived before the job placed (the router's own queue,
        # which the replicas' queue lengths do not show; request_router reads Ray's).
        self._pending_arrivals: dict[int, list[float]] = {}
        self.done: list[Job] = []
        self.refused: list[Job] = []  # answered with an error after _MAX_BOUNCES refusals
        self.decisions = 0
        self.rank_ns = 0
        self.rank_cpu_ns = 0  # the same calls in this thread's CPU time: other processes' load moves it less
        self.view_ns = 0
        self.shortfalls = 0
        self.pending_max = 0
        self.uses_rank = policy in ("a", "c", "d")
        self.real_reports = 0
        self.aged_reports = 0
        self.views_rebuilt = 0
        self.acquire_errors: dict[str, int] = {}
        self.samples: list[tuple[list[ReplicaView], Any]] = []
        self.index = FleetIndex() if params.rank_limit else None
        self._dirty_reps: list[Rep] = list(self.reps)  # all start dirty
        self._view_list: list[ReplicaView | None] = [None] * len(self.reps)

    def _dirty(self, r: Rep) -> None:
        if not r.dirty:
            r.dirty = True
            self._dirty_reps.append(r)

    # ---- event queue -------------------------------------------------------------------------
    ARRIVE, COMPLETE, REPORT, TICK, RETRY = 0, 1, 2, 3, 4

    def _push(self, t: float, kind: int, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self.events, (t, kind, self._seq, payload))

    # ---- router side -------------------------------------------------------------------------
    def _refresh_reports(self) -> None:
        """Every report period: each replica's routing stats, as ModelReplica.memory_report().

        A replica whose cache did nothing since its last real report (no acquire, release,
        tick action or admin call) would report the same entries, only idler: its last real
        report is reused with every unpinned entry's ``idle_s`` aged by the time elapsed
        (equal to a fresh report up to its 1 ms rounding), which saves most report() calls.
        """
        now = self.clock.t
        for r in self.reps:
            # ModelReplica reports an entry being loaded as loading (the cache claims it for the
            # load); here the books have it loaded at once and the load is modeled time: the
            # running job's checkpoint until its load ends.
            job = r.running
            loading = job.ck.name if job is not None and job.served_from != "device" and now < job.loaded_s else None
            source = job.served_from if loading else ""
            if r.changed or r.report_src is None or not self.p.age_reports or loading or r.reported_loading:
                r.reported_loading = loading is not None
                rep = r.cache.report()
                prof = r.spec.profile
                stats = {
                    "default_dtype": prof.default_dtype,
                    "max_resident": prof.max_resident_pipelines,
                    "device_budget_bytes": rep.device_budget_bytes,
                    "device_used_bytes": rep.device_used_bytes,
                    "entries": [{"name": e.name, "tier": e.tier, "bytes": e.bytes, "idle_s": e.idle_s,
                                 "in_use": e.in_use, "loading": e.loading or (source if e.name == loading else "")} for e in rep.entries],
                    "timestamp_s": now,
                }
                if self.p.service_times:
                    stats["service_times"] = r.times.report().as_dict()
                self._check_report(r, rep.device_used_bytes, rep.device_budget_bytes, rep.counters)
                r.report_src, r.changed = stats, False
                self.real_reports += 1
            elif self.p.keep_views:
                # Only time passed: the replica's report_seq stays, and rank_for keeps the view
                # it has (a view ranks by last-use times, which time alone does not move).
                stats = None
                self.aged_reports += 1
            else:
                src = r.report_src
                dt = now - src["timestamp_s"]
                stats = dict(src, timestamp_s=now, entries=[
                    e if e["in_use"] else dict(e, idle_s=round(e["idle_s"] + dt, 3)) for e in src["entries"]])
                self.aged_reports += 1
            if stats is not None:
                t0 = time.perf_counter_ns()  # the router builds this view from the report too: view upkeep
                r.base_view = self._view_from_report(r.spec.replica_id, stats, 0)
                self.view_ns += time.perf_counter_ns() - t0
            r.ledger.report_arrived(r.spec.replica_id, now)
            self._dirty(r)

    def _check_report(self, r: Rep, used: int, budget: int, counters: dict[str, int]) -> None:
        if used > r.peak_report_bytes:
            r.peak_report_bytes = used
        if used > budget or counters.get("oom_recoveries", 0):
            r.report_overcommits += 1

    def _views(self) -> list[ReplicaView]:
        """What rank_for keeps (router/request_router.py): each replica's
        ``ledger.overlay(view_from_report(stats))``, rebuilt only when its report or its
        ledger changed, and looked at only when something about the replica changed (rank_for
        re-views only the replicas its ledger touched, and all on a broadcast, which comes with
        every report period here); queue lengths go beside the views.
        """
        t0 = time.perf_counter_ns()
        out = self._view_list
        index = self.index
        for r in self._dirty_reps:
            of = (r.base_view, r.ledger.version(r.spec.replica_id))
            if of[0] is not r.view_of[0] or of[1] != r.view_of[1]:
                r.view = out[r.spec.index] = r.ledger.overlay(r.base_view)
                r.view_of = of
                self.views_rebuilt += 1
                if index is not None:
                    index.set_view(r.spec.index, r.view)  # spec.index: the position in reps
            r.dirty = False
        self._dirty_reps.clear()
        self.view_ns += time.perf_counter_ns() - t0
        return out

    def _choose_rank(self, job: Job) -> int | None:
        views = self._views()
        reps = self.reps
        queues = [r.ongoing for r in reps]
        evict_for_held = self.clock.t - job.req.arrival_s >= self.p.holder_wait_s
        backlog = self._backlog(job) if self.p.backlog else 0
        c0 = time.thread_time_ns()
        t0 = time.perf_counter_ns()
        if self.index is not None:
            order = self.index.rank(job.ck.need, queues, spill_queue_len=self.p.spill_queue_len,
                                    evict_for_held=evict_for_held, limit=self.p.rank_limit, backlog=backlog)
        else:
            order = rank_indices(views, job.ck.need, spill_queue_len=self.p.spill_queue_len, queue_lens=queues,
                                 evict_for_held=evict_for_held, backlog=backlog)
        self.rank_ns += time.perf_counter_ns() - t0
        self.rank_cpu_ns += time.thread_time_ns() - c0
        self.decisions += 1
        if self.p.sample_every and self.decisions % self.p.sample_every == 0:
            self.samples.append(([dataclasses.replace(v, queue_len=q) for v, q in zip(views, queues)], job.ck.need))
        cap = self.p.max_ongoing
        for i in order:
            if reps[i].ongoing < cap:
                return i
        return None

    def _choose_mux(self, job: Job) -> int | None:
        ck = job.ck.index
        cap = self.p.max_ongoing
        elig = [i for i, e in enumerate(self.eligible) if e[ck]]
        name = job.ck.name
        reps = self.reps
        holding = [i for i in elig if name in reps[i].models]
        tiers = []
        if holding:
            tiers.append(holding)
        fewest = min(len(reps[i].models) for i in elig)
        tiers.append([i for i in elig if len(reps[i].models) == fewest])
        tiers.append(elig)
        self.decisions += 1
        for cands in tiers:
            room = [i for i in cands if self.reps[i].ongoing < cap]
            if not room:
                continue
            if len(room) == 1:
                return room[0]
            a, b = self.rng.sample(room, 2)
            return a if self.reps[a].ongoing <= self.reps[b].ongoing else b
        return None

    def _route(self, job: Job) -> bool:
        now = self.clock.t
        i = self._choose_rank(job) if self.uses_rank else self._choose_mux(job)
        if i is None:
            return False
        r = self.reps[i]
        job.replica, job.routed_s = i, now
        if self.uses_rank:
            r.ledger.routed(job.key, r.spec.replica_id, job.ck.name, weights_bytes=job.ck.need.at(r.spec.profile.default_dtype)[0],
                            now_s=now)
        r.ongoing += 1
        self._dirty(r)
        if r.running is None:
            self._start(r, job)
        else:
            r.queue.append(job)
        return True

    def _add_pending(self, job: Job, *, front: bool = False) -> None:
        if front:
            self.pending.appendleft(job)
        else:
            self.pending.append(job)
        insort(self._pending_arrivals.setdefault(job.ck.index, []), job.req.arrival_s)
        if len(self.pending) > self.pending_max:
            self.pending_max = len(self.pending)

    def _backlog(self, job: Job) -> int:
        """Pending jobs for ``job``'s checkpoint that arrived before it (it is not pending here)."""
        arrivals = self._pending_arrivals.get(job.ck.index)
        return bisect_left(arrivals, job.req.arrival_s) if arrivals else 0

    def _retry_pending(self, freed: int) -> None:
        """A slot freed on replica ``freed``: route the oldest pending job that can use it."""
        elig = self.eligible[freed]
        for k, job in enumerate(self.pending):
            if elig[job.ck.index]:
                del self.pending[k]
                arrivals = self._pending_arrivals[job.ck.index]
                del arrivals[bisect_left(arrivals, job.req.arrival_s)]
                if not self._route(job):  # the placement may still send it nowhere (its holder gate)
                    self._add_pending(job, front=True)
                return

    # ---- replica side ------------------------------------------------------------------------
    def _bounce(self, r: Rep, job: Job) -> None:
        """The replica could not start ``job`` (an error or a shortfall): it leaves the
        replica, goes back to the router, and the replica takes its next job."""
        r.backend.drain()
        r.changed = True
        r.ongoing -= 1
        self._dirty(r)
        # Retried after a report period, as the ingress retries a 503: at once, with the
        # same views, the same replica was picked again, recursing until RecursionError
        # wherever a shortfall persists (measured bytes above the estimate). A job refused
        # _MAX_BOUNCES times is answered with the error (counted as refused).
        job.bounces += 1
        if job.bounces >= _MAX_BOUNCES:
            self.refused.append(job)
        else:
            self._push(self.clock.t + self.p.report_period_s, self.RETRY, job)
        self._next(r)

    def _start(self, r: Rep, job: Job) -> None:
        now = self.clock.t
        ck = job.ck
        try:
            lease = r.cache.acquire(ck.name, weights_bytes=ck.weights_bytes, workspace_bytes=ck.workspace_bytes,
                                    offloadable=ck.variant.offloadable)
        except Exception as exc:  # noqa: BLE001 - a backend error: the replica answers 500
            # Counted by exception type; the client retries the request. (The host-tier
            # self-eviction bug of bench/repros/cache_host_self_eviction.py showed up here.)
            self.acquire_errors[type(exc).__name__] = self.acquire_errors.get(type(exc).__name__, 0) + 1
            self._bounce(r, job)
            return
        if isinstance(lease, Shortfall):
            # The replica answers 503; the ingress retries: back to the router.
            self.shortfalls += 1
            self._bounce(r, job)
            return
        r.changed = True
        io = r.backend.drain()
        begin = max(now, r.io_free_s)
        r.io_free_s = begin + io
        r.backend.set_workspace(ck.workspace_bytes)
        rep = r.cache.report()
        self._check_report(r, rep.device_used_bytes, rep.device_budget_bytes, rep.counters)
        if self.policy == "b":
            r.models = frozenset(e.name for e in rep.entries if e.tier == "device")
        job.lease, job.start_s, job.load_s, job.loaded_s = lease, now, io, begin + io
        job.infer_s = ck.variant.infer_s / r.spec.speed
        job.served_from = lease.served_from.value
        if job.served_from == "disk":  # what ModelReplica measures: the load alone, not the moves before it
            r.times.load("disk", ck.weights_bytes, ck.weights_bytes / r.backend.disk_bps)
        elif job.served_from == "host":
            r.times.load("host", ck.weights_bytes, ck.weights_bytes / r.backend.h2d_bps)
        r.running = job
        self._dirty(r)
        self._push(begin + io + job.infer_s, self.COMPLETE, r.spec.index)

    def _complete(self, r: Rep) -> None:
        now = self.clock.t
        job = r.running
        r.running = None
        job.lease.release()
        job.lease = None
        r.times.inference(job.infer_s)
        r.changed = True
        r.backend.set_workspace(0)
        if self.policy == "c":
            r.cache.release(job.ck.name)
        elif self.policy == "d":
            r.cache.offload(job.ck.name)
        io = r.backend.drain()
        if io:
            r.io_free_s = max(now, r.io_free_s) + io
        if self.uses_rank:
            r.ledger.completed(job.key, r.spec.replica_id, now_s=now)
        r.ongoing -= 1
        self._dirty(r)
        self.done.append(job)
        self._latency.append(now - job.req.arrival_s)
        self._next(r)
        self._retry_pending(r.spec.index)

    def _next(self, r: Rep) -> None:
        if r.running is None and r.queue:
            self._start(r, r.queue.popleft())

    def _tick(self) -> None:
        now = self.clock.t
        for r in self.reps:
            if r.io_free_s > now:
                continue  # a load or move holds the cache's I/O lock: tick() would skip
            if r.cache.tick():
                r.changed = True
                io = r.backend.drain()
                if io:
                    r.io_free_s = now + io
                self._dirty(r)

    # ---- main loop ---------------------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        wall0 = time.perf_counter()
        self._latency: list[float] = []
        for req in self.trace:
            self._push(req.arrival_s, self.ARRIVE, req)
        if self.uses_rank:
            self._refresh_reports()
            self._push(self.p.report_period_s, self.REPORT, None)
        if self.policy == "a" and self.p.idle_timers:
            self._push(self.p.tick_period_s, self.TICK, None)
        n = len(self.trace)
        while self.events and len(self.done) + len(self.refused) < n:
            t, kind, _, payload = heapq.heappop(self.events)
            self.clock.t = t
            if kind == self.ARRIVE:
                job = Job(payload, self.catalog[payload.checkpoint], f"q{payload.index}")
                if not self._route(job):
                    self._add_pending(job)
            elif kind == self.COMPLETE:
                self._complete(self.reps[payload])
            elif kind == self.RETRY:
                if not self._route(payload):
                    self._add_pending(payload)
            elif kind == self.REPORT:
                self._refresh_reports()
                self._push(t + self.p.report_period_s, self.REPORT, None)
            else:
                self._tick()
                self._push(t + self.p.tick_period_s, self.TICK, None)
        self.end_s = self.clock.t
        self.wall_s = time.perf_counter() - wall0
        return self.metrics()

    # ---- results -----------------------------------------------------------------------------
    def metrics(self) -> dict[str, Any]:
        from bench.sim.stats import percentile

        n = len(self.trace)
        lat = sorted(self._latency)
        served = {"device": 0, "host": 0, "disk": 0}
        for j in self.done:
            served[j.served_from] += 1
        counters: dict[str, int] = {}
        for r in self.reps:
            for k, v in r.cache.report().counters.items():
                counters[k] = counters.get(k, 0) + v
        be = [r.backend for r in self.reps]
        ratios = [max(r.peak_report_bytes, r.backend.peak_bytes) / r.spec.profile.device_budget_bytes for r in self.reps]
        queue_s = sorted(j.start_s - j.req.arrival_s for j in self.done)
        load_s = sorted(j.load_s for j in self.done)
        out = {
            "policy": self.policy,
            "description": POLICIES[self.policy],
            "requests": n,
            "completed": len(self.done),
            "refused": len(self.refused),
            "sim_end_s": round(self.end_s, 3),
            "throughput_rps": len(self.done) / self.end_s if self.end_s else 0.0,
            "latency_s": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
                          "mean": sum(lat) / len(lat) if lat else 0.0, "max": lat[-1] if lat else 0.0},
            "queue_s": {"p50": percentile(queue_s, 50), "p99": percentile(queue_s, 99)},
            "load_wait_s": {"p50": percentile(load_s, 50), "p99": percentile(load_s, 99)},
            "hit_rate": served["device"] / n,
            "served_from": served,
            "host_reloads": sum(b.host_reloads for b in be),
            "disk_loads": sum(b.disk_loads for b in be),
            "load_gpu_s": sum(b.load_s for b in be),
            "offload_gpu_s": sum(b.offload_s for b in be),
            "evictions": counters.get("evictions", 0),
            "cache_counters": counters,
            "oom": sum(b.oom_events for b in be) + sum(r.report_overcommits for r in self.reps),
            "oom_physical": sum(b.oom_events for b in be),
            "report_overcommits": sum(r.report_overcommits for r in self.reps),
            "peak_over_budget_max": max(ratios),
            "peak_over_budget_mean": sum(ratios) / len(ratios),
            "shortfalls": self.shortfalls,
            "acquire_errors": dict(self.acquire_errors),
            "router_pending_max": self.pending_max,
            "decisions": self.decisions,
            "leaked": sum(r.cache.report().leaked_modules for r in self.reps),
        }
        out["replicas"] = [
            {"id": r.spec.replica_id, "profile": r.spec.profile.name, "budget_bytes": r.spec.profile.device_budget_bytes,
             "peak_report_bytes": r.peak_report_bytes, "peak_physical_bytes": r.backend.peak_bytes,
             "oom_physical": r.backend.oom_events, "report_overcommits": r.report_overcommits}
            for r in self.reps]
        if self.policy == "b":
            out["mux_capacity"] = {"min": min(self.mux_cap), "max": max(self.mux_cap),
                                   "total": sum(self.mux_cap)}
        out["wall"] = {
            "sim_s": round(self.wall_s, 3),
            "rank_s": self.rank_ns / 1e9,
            "reports_real": self.real_reports,
            "reports_aged": self.aged_reports,
            "view_s": self.view_ns / 1e9,
            "decisions_per_s": (self.decisions / (self.rank_ns / 1e9)) if self.rank_ns else None,
            "rank_cpu_s": self.rank_cpu_ns / 1e9,
            "decisions_per_cpu_s": (self.decisions / (self.rank_cpu_ns / 1e9)) if self.rank_cpu_ns else None,
            "decisions_per_s_with_views": (self.decisions / ((self.rank_ns + self.view_ns) / 1e9))
            if self.rank_ns else None,
        }
        if self.uses_rank and self.samples:
            out["fast_rank_experiment"] = self.fast_check()
        out["_latencies"] = lat
        return out

    def fast_check(self) -> dict[str, Any]:
        """Time the real rank against bench/placement_fast.py on sampled decisions' inputs."""
        from bench import placement_fast as fast
        from bench.sim.stats import percentile

        sp = self.p.spill_queue_len
        real_ns, fast_ns, ids_ns, vec_ns, equal, vec_equal = [], [], [], [], 0, 0
        prep_ns, prep_n, upd_ns = 0, 0, 0
        clock = time.perf_counter_ns
        for views, need in self.samples:
            t0 = clock()
            prepared = [fast.prepare(v) for v in views]
            prep_ns += clock() - t0
            prep_n += len(views)
            t0 = clock()
            a = rank(views, need, spill_queue_len=sp)
            t1 = clock()
            b = fast.rank_fast(prepared, need, spill_queue_len=sp)
            t2 = clock()
            fast.rank_ids(prepared, need, spill_queue_len=sp)
            t3 = clock()
            vec = fast.VectorRanker(views)
            vec.rank_ids(need, spill_queue_len=sp)  # warm up
            t4 = clock()
            ids = vec.rank_ids(need, spill_queue_len=sp)
            t5 = clock()
            vec.update(0, views[0])
            upd_ns += clock() - t5
            real_ns.append(t1 - t0)
            fast_ns.append(t2 - t1)
            ids_ns.append(t3 - t2)
            vec_ns.append(t5 - t4)
            equal += fast.check_equal(a, b)
            vec_equal += ids == [p.replica_id for p in a]
        real_ns.sort(), fast_ns.sort(), ids_ns.sort(), vec_ns.sort()
        prep_us = prep_ns / prep_n / 1e3
        rebuilt = self.views_rebuilt / self.decisions
        ids_p50 = percentile(ids_ns, 50) / 1e3
        return {
            "samples": len(self.samples), "equal": equal,
            "rank_us_p50": percentile(real_ns, 50) / 1e3, "rank_us_p99": percentile(real_ns, 99) / 1e3,
            "rank_fast_us_p50": percentile(fast_ns, 50) / 1e3, "rank_fast_us_p99": percentile(fast_ns, 99) / 1e3,
            "rank_ids_us_p50": ids_p50, "rank_ids_us_p99": percentile(ids_ns, 99) / 1e3,
            "vector_equal": vec_equal,
            "vector_ids_us_p50": percentile(vec_ns, 50) / 1e3, "vector_ids_us_p99": percentile(vec_ns, 99) / 1e3,
            "vector_update_us_per_view": upd_ns / len(self.samples) / 1e3,
            "prepare_us_per_view": prep_us,
            "views_changed_per_decision": rebuilt,
            "real_rank_decisions_per_s_p50": 1e6 / (percentile(real_ns, 50) / 1e3),
            "vector_decisions_per_s_p50": 1e6 / (percentile(vec_ns, 50) / 1e3),
        }
