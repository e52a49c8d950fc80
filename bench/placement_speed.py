"""Router overhead, pure part: time of one placement decision at 10 / 100 / 1000 replicas.

    python -m bench.placement_speed            # writes bench/results/placement_speed.{json,md}

Each replica gets a realistic report: its real PipelineCache (deployments/cache.py, with the
instant simulated backend) is driven with Zipf-popular acquires from a 200-checkpoint catalog
until it holds 3-10 entries (device + host, as budgets allow); replicas with a queue hold
one lease (in use, workspace in flight). The router's Ledger holds one in-flight placement
per queued request plus a few completed ones not yet in a report (1 s report period).

Layers timed per decision (time.perf_counter_ns, one call each):
  rank            router.placement.rank over views already overlaid (builds Placement objects)
  rank_indices 1 fresh
                  router.placement.rank_indices, the router's hot path and the pure decision
                  the target is about: queue lengths beside the views, and one view replaced
                  by a new object (its score memo empty) before each decision, untimed
  FleetIndex 1 fresh
                  router.fleet_index.FleetIndex.rank, what rank_for calls: the first 16 places
                  of rank_indices' order, from views kept across decisions; one view
                  replaced per decision (untimed set_view; its re-scoring is timed)
  rank_for        MemoryAwareRequestRouter.rank_for (router/request_router.py) on fake
                  candidates, the full per-request work of the Ray shell, with Ray's own
                  ReplicaID and ReplicaQueueLengthCache. Ray passes the same candidate list
                  object until its next broadcast of replicas; with it, rank_for re-views
                  only the replicas its ledger touched, and a new list takes a full pass:
    steady        nothing changed since the last decision
    1 placed      before each decision (untimed), the ledger records a placement on one
                  replica, as choose_replicas does for every decision: the common case
    all changed   every view rebuilt per decision (every report new, a new list): the worst case
    broadcast     before each decision (untimed), a new candidate list and every replica's
                  stats in a new dict, as Ray's long-poll broadcast delivers them after any
                  one replica's report; one of them is a new report (new report_seq), the
                  rest are copies of the last one: a full pass that rebuilds one view
(Ray itself is imported but not started.) Each size also checks the real rank against the
independent reference implementation in bench/placement_fast.py on 300 decisions.
The target (issue "Router overhead") is <= 100 us per decision at 100 replicas.
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import gc
import io
import itertools
import json
import pstats
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from bench import placement_fast as reference
from bench.machine import machine_info, machine_md
from bench.sim.backend import SimBackend
from bench.sim.model import DEFAULT_MIX, Zipf, build_catalog, build_fleet
from deployments.cache import CacheConfig, Lease, PipelineCache
from router.ledger import Ledger
from router.fleet_index import FleetIndex
from router.placement import ReplicaView, rank, rank_indices

_RANK_LIMIT = 16  # MemoryAwareRequestRouter's default rank_limit

RESULTS = Path(__file__).resolve().parent / "results"
TARGET_US_AT_100 = 100.0


class Clock:
    def __init__(self, t: float = 0.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


@dataclass
class Cluster:
    reports: dict[str, dict[str, Any]]
    queues: dict[str, int]
    ledger: Ledger
    ledger_in_flight: int


def report_dict(cache: PipelineCache, spec: Any, now_s: float) -> dict[str, Any]:
    """The routing-stats fields ModelReplica.memory_report() sends that view_from_report reads."""
    rep = cache.report()
    return {
        "replica_id": spec.replica_id,
        "profile": spec.profile.name,
        "default_dtype": spec.profile.default_dtype,
        "max_resident": spec.profile.max_resident_pipelines,
        "device_budget_bytes": rep.device_budget_bytes,
        "device_used_bytes": rep.device_used_bytes,
        "device_free_bytes": rep.device_free_bytes,
        "workspace_in_flight_bytes": rep.workspace_in_flight_bytes,
        "host_budget_bytes": rep.host_budget_bytes,
        "host_used_bytes": rep.host_used_bytes,
        "entries": [{"name": e.name, "tier": e.tier, "bytes": e.bytes, "estimate_bytes": e.estimate_bytes,
                     "idle_s": e.idle_s, "in_use": e.in_use} for e in rep.entries],
        "in_flight": rep.in_flight,
        "counters": rep.counters,
        "timestamp_s": now_s,
        "report_seq": next(_REPORT_SEQ),
    }


_REPORT_SEQ = itertools.count(1)


def draw_fitting(catalog: list, zipf: Zipf, rng: random.Random, budget: int):
    """A Zipf-popular checkpoint that fits ``budget`` (rejection sampling)."""
    while True:
        c = catalog[zipf.draw(rng)]
        if c.total_bytes <= budget:
            return c


def build_cluster(n_replicas: int, catalog: list, zipf: Zipf, rng: random.Random, mix: str) -> Cluster:
    fleet = build_fleet(n_replicas, mix, rng)
    now = 100_000.0
    reports, queues = {}, {}
    ledger = Ledger()
    in_flight = 0
    rid_seq = 0
    for spec in fleet:
        p = spec.profile
        budget = p.device_budget_bytes
        clock = Clock(now - 3600.0)
        sizes = {c.name: c.weights_bytes for c in catalog}
        backend = SimBackend(sizes, capacity_bytes=budget, disk_bps=2e9, h2d_bps=12e9, d2h_bps=12e9)
        cache = PipelineCache(CacheConfig(device_budget_bytes=budget, host_budget_bytes=p.host_budget_bytes,
                                          idle_offload_s=p.idle_offload_s, idle_release_s=p.idle_release_s,
                                          max_resident=p.max_resident_pipelines), backend, clock)
        target = rng.randint(3, 10)
        for _ in range(400):
            if len(cache.report().entries) >= target:
                break
            c = draw_fitting(catalog, zipf, rng, budget)
            lease = cache.acquire(c.name, weights_bytes=c.weights_bytes, workspace_bytes=c.workspace_bytes,
                                  offloadable=c.variant.offloadable)
            assert isinstance(lease, Lease), lease
            clock.t += rng.uniform(1.0, 240.0) / 2
            lease.release()
            clock.t += rng.uniform(1.0, 240.0) / 2
        clock.t = now
        # Queue: 0 for ~30% of replicas, else 1..8 (max_ongoing_requests = 8).
        q = 0 if rng.random() < 0.3 else rng.randint(1, 8)
        queues[spec.replica_id] = q
        placed = []
        if q:
            # The running request pins one (resident or loaded) checkpoint.
            c = draw_fitting(catalog, zipf, rng, budget)
            lease = cache.acquire(c.name, weights_bytes=c.weights_bytes, workspace_bytes=c.workspace_bytes,
                                  offloadable=c.variant.offloadable)
            assert isinstance(lease, Lease), lease
            placed.append(c)
            placed.extend(draw_fitting(catalog, zipf, rng, budget) for _ in range(q - 1))
        reports[spec.replica_id] = report_dict(cache, spec, now)
        for c in placed:
            ledger.routed(f"req{rid_seq}", spec.replica_id, c.name, weights_bytes=c.weights_bytes,
                          now_s=now - rng.uniform(0.0, 30.0))
            rid_seq += 1
            in_flight += 1
        # Completed since the last report (up to one 1 s period stale): Poisson(0.5).
        k = 0
        while rng.random() < 0.5 / (k + 1):  # cheap bounded Poisson-ish draw, mean ~0.65
            k += 1
        for _ in range(k):
            c = draw_fitting(catalog, zipf, rng, budget)
            ledger.routed(f"req{rid_seq}", spec.replica_id, c.name, weights_bytes=c.weights_bytes, now_s=now - 2.0)
            ledger.completed(f"req{rid_seq}", spec.replica_id, now_s=now + 0.5)
            rid_seq += 1
    return Cluster(reports, queues, ledger, in_flight)


# ---- the three layers ---------------------------------------------------------------------
class FakeRunningReplica:
    """Ray's RunningReplica as rank_for reads it: ``replica_id`` and ``routing_stats`` are
    properties over the replica info, and the id is Ray's own ReplicaID (a dataclass with a
    Python-level __hash__), so the dict lookups cost what they cost under Ray."""

    __slots__ = ("_info",)

    def __init__(self, rid: str, stats: dict[str, Any]):
        from ray.serve.request_router import ReplicaID
        from ray.serve._private.common import DeploymentID

        self._info = (ReplicaID(rid, DeploymentID("ModelReplica", "memrouter")), stats)

    @property
    def replica_id(self) -> Any:
        return self._info[0]

    @property
    def routing_stats(self) -> dict[str, Any]:
        return self._info[1]


def make_router(cluster: Cluster, spill_queue_len: int, tie_window: int = 256):
    """The real MemoryAwareRequestRouter without Ray's constructor: only the state rank_for
    reads, with Ray's own queue-length cache (its get() checks staleness per call)."""
    from ray.serve._private.request_router.common import ReplicaQueueLengthCache

    from router.request_router import MemoryAwareRequestRouter

    router = object.__new__(MemoryAwareRequestRouter)
    router.init_routing_state(spill_queue_len=spill_queue_len, holder_wait_s=2.0, rank_limit=_RANK_LIMIT,
                              ledger=cluster.ledger, tie_window=tie_window)
    candidates = [FakeRunningReplica(rid, stats) for rid, stats in cluster.reports.items()]
    queue_lens = ReplicaQueueLengthCache(staleness_timeout_s=1e9)
    for r in candidates:
        queue_lens.update(r.replica_id, cluster.queues[r.replica_id.unique_id])
    router._replica_queue_len_cache = queue_lens
    return router, candidates


def base_views(cluster: Cluster) -> list[ReplicaView]:
    from router.request_router import view_from_report

    return [view_from_report(rid, rep, cluster.queues[rid]) for rid, rep in cluster.reports.items()]


def time_calls(fn: Callable[[Any], Any], needs: list, warmup: int,
               prepare: Callable[[], None] | None = None) -> list[int]:
    """ns per ``fn(need)``; ``prepare()`` (untimed) runs before each call."""
    for need in needs[:warmup]:
        if prepare is not None:
            prepare()
        fn(need)
    out = []
    clock = time.perf_counter_ns
    for need in needs:
        if prepare is not None:
            prepare()
        t0 = clock()
        fn(need)
        out.append(clock() - t0)
    return out


def pct(xs: list[int], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(round(q / 100 * (len(s) - 1))))]


def summarize(ns: list[int]) -> dict[str, float]:
    return {"n": len(ns), "p50_us": pct(ns, 50) / 1e3, "p99_us": pct(ns, 99) / 1e3,
            "mean_us": statistics.fmean(ns) / 1e3, "max_us": max(ns) / 1e3}


def run(sizes: list[int], *, seed: int, catalog_size: int, zipf_s: float, mix: str, budget_s: float,
        spill_queue_len: int, profile_at: int | None) -> dict[str, Any]:
    rng = random.Random(seed)
    catalog = build_catalog(catalog_size, rng)
    zipf = Zipf(catalog_size, zipf_s)
    results, profile_text = [], None
    for n in sizes:
        cluster = build_cluster(n, catalog, zipf, random.Random(seed + n), mix)
        views = base_views(cluster)
        overlaid = [cluster.ledger.overlay(v) for v in views]
        router, candidates = make_router(cluster, spill_queue_len)
        rids = [v.replica_id for v in views]
        churn = random.Random(seed + 3 * n)

        queues = [cluster.queues[rid] for rid in rids]
        pure_views = list(overlaid)

        fleet = FleetIndex()
        for i, v in enumerate(pure_views):
            fleet.set_view(i, v)

        def fresh_view() -> None:
            # A new report or placement on one replica: its view is a new object, so its
            # score memo starts empty (untimed: building the view is the shell's work).
            i = churn.randrange(n)
            pure_views[i] = dataclasses.replace(pure_views[i])
            fleet.set_view(i, pure_views[i])

        # Ray hands rank_for the same candidate list object until its next broadcast of
        # replicas, which brings a new list (rank_for then takes a full pass).
        live = [candidates]

        def placed() -> None:
            # choose_replicas records each decision's pick in the ledger: one replica's
            # placements change per decision (one request id per replica keeps it bounded).
            rid = rids[churn.randrange(n)]
            cluster.ledger.routed(f"bench-{rid}", rid, "bench-ck", weights_bytes=1 << 20, now_s=0.0)

        def all_changed() -> None:
            router._views.clear()
            live[0] = list(candidates)

        def broadcast() -> None:
            # Ray's broadcast after one replica's report: a new candidate list, and every
            # replica's stats in a new dict; one is a new report, the others copies of the last.
            j = churn.randrange(n)
            for k, c in enumerate(candidates):
                stats = dict(c.routing_stats)
                if k == j:
                    stats["report_seq"] = next(_REPORT_SEQ)
                c._info = (c._info[0], stats)
            live[0] = list(candidates)

        def shell(need: Any) -> Any:
            return router.rank_for(live[0], need)

        layers: dict[str, Callable[[Any], Any]] = {
            "rank": lambda need: rank(overlaid, need, spill_queue_len=spill_queue_len),
            "rank_indices 1 fresh": lambda need: rank_indices(pure_views, need, spill_queue_len=spill_queue_len,
                                                              queue_lens=queues),
            "FleetIndex 1 fresh": lambda need: fleet.rank(need, queues, spill_queue_len=spill_queue_len,
                                                          limit=_RANK_LIMIT),
            "rank_for steady": shell,
            "rank_for 1 placed": shell,
            "rank_for all changed": shell,
            "rank_for broadcast": shell,
        }
        prepares = {"rank_indices 1 fresh": fresh_view, "FleetIndex 1 fresh": fresh_view,
                    "rank_for 1 placed": placed, "rank_for all changed": all_changed, "rank_for broadcast": broadcast}
        row: dict[str, Any] = {
            "replicas": n,
            "entries_per_report_mean": statistics.fmean(len(r["entries"]) for r in cluster.reports.values()),
            "device_entries_per_report_mean": statistics.fmean(
                sum(e["tier"] == "device" for e in r["entries"]) for r in cluster.reports.values()),
            "queue_len_mean": statistics.fmean(cluster.queues.values()),
            "ledger_placements": len(cluster.ledger),
            "ledger_in_flight": cluster.ledger_in_flight,
            "layers": {},
        }
        need_rng = random.Random(seed * 7 + n)
        for layer, fn in layers.items():
            # Size the sample to the time budget: a probe of 20 calls sets the count.
            probe = [catalog[zipf.draw(need_rng)].need for _ in range(20)]
            prepare = prepares.get(layer)
            t0 = time.perf_counter()
            for need in probe:
                if prepare is not None:
                    prepare()
                fn(need)
            per = (time.perf_counter() - t0) / len(probe)
            count = int(max(200, min(20000, budget_s / max(per, 1e-9))))
            needs = [catalog[zipf.draw(need_rng)].need for _ in range(count)]
            gc.collect()
            row["layers"][layer] = summarize(time_calls(fn, needs, warmup=min(100, count // 10), prepare=prepare))
        # The real rank against the independent reference on the same inputs, and rank_for
        # against rank (same order of replica ids).
        needs = [catalog[zipf.draw(need_rng)].need for _ in range(300)]
        prepared = [reference.prepare(v) for v in overlaid]
        exact_router, exact_candidates = make_router(cluster, spill_queue_len, tie_window=n + 1)
        now = [cluster.ledger.overlay(v) for v in views]
        row["equal_to_reference"] = {
            "decisions": len(needs),
            "rank": sum(reference.check_equal(rank(overlaid, nd, spill_queue_len=spill_queue_len),
                                              reference.rank_fast(prepared, nd, spill_queue_len=spill_queue_len))
                        for nd in needs),
            # rank_for returns the first rank_limit places (FleetIndex); the rest of rank's
            # order is not asked for. Over the ledger as the layers left it, and with a tie
            # window past the fleet size (exact queue order in every tie group).
            "rank_for": sum([c[0].replica_id.unique_id for c in exact_router.rank_for(exact_candidates, nd)]
                            == [p.replica_id for p in rank(now, nd, spill_queue_len=spill_queue_len)][:_RANK_LIMIT]
                            for nd in needs),
        }
        results.append(row)
        if profile_at == n:
            prof = cProfile.Profile()
            needs = [catalog[zipf.draw(need_rng)].need for _ in range(300)]
            prof.enable()
            for need in needs:
                placed()
                layers["rank_for 1 placed"](need)
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(14)
            profile_text = (f"cProfile of 300 rank_for decisions (1 placement before each) at {n} replicas "
                            "(sorted by tottime):\n" + buf.getvalue())
    return {"results": results, "profile": profile_text}


def to_markdown(out: dict[str, Any]) -> str:
    lines = ["# Placement decision time", "", machine_md(out["machine"]), "",
             f"Catalog {out['params']['catalog_size']} checkpoints, Zipf s={out['params']['zipf_s']}, "
             f"spill_queue_len={out['params']['spill_queue_len']}, seed {out['params']['seed']}. "
             f"Target: <= {TARGET_US_AT_100:.0f} us per decision at 100 replicas.", "",
             "| replicas | entries/report | ledger size | layer | n | p50 us | p99 us | mean us |",
             "|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in out["results"]:
        for layer, s in r["layers"].items():
            lines.append(f"| {r['replicas']} | {r['entries_per_report_mean']:.1f} | {r['ledger_placements']} | {layer} | "
                         f"{s['n']} | {s['p50_us']:.1f} | {s['p99_us']:.1f} | {s['mean_us']:.1f} |")
    lines += ["", "Layers: `rank` = router.placement.rank on pre-overlaid views (builds Placement objects); "
              "`rank_indices 1 fresh` = router.placement.rank_indices, the stateless whole order, with queue lengths "
              "beside the views and one view replaced by a new object (empty score memo) before each decision, "
              "untimed; `FleetIndex 1 fresh` = router.fleet_index.FleetIndex.rank, the router's hot path: the first "
              f"{_RANK_LIMIT} places of the same order from views kept across decisions, one view replaced per "
              "decision (set_view untimed, the re-scoring it causes timed); "
              "`rank_for steady` = "
              "MemoryAwareRequestRouter.rank_for with its view cache warm (no report or placement changed since the "
              "last decision; Ray passes the same candidate list until its next broadcast, and rank_for then "
              "re-views only what its ledger touched); `rank_for 1 placed` = before each decision (untimed) the "
              "ledger records a placement on one replica, as choose_replicas does per decision (the common case); "
              "`rank_for all changed` = every view rebuilt from its report and the ledger per decision (the worst "
              "case); `rank_for broadcast` = before each decision (untimed) a new candidate list and every "
              "replica's stats dict replaced, as Ray's broadcast after any one replica's report delivers them, one "
              "of them a new report (new `report_seq`): a full pass that keeps the other views.", "",
              "| replicas | rank equal to reference | rank_for order equal to rank |", "|---:|---:|---:|"]
    for r in out["results"]:
        e = r["equal_to_reference"]
        lines.append(f"| {r['replicas']} | {e['rank']}/{e['decisions']} | {e['rank_for']}/{e['decisions']} |")
    lines.append("")
    lines += ["Code under test (sha256, 12 hex): " + ", ".join(f"{k} {v}" for k, v in out["machine"]["code_sha256_12"].items()), ""]
    verdict = out.get("verdict")
    if verdict:
        lines += [verdict, ""]
    if out.get("profile"):
        lines += ["```", out["profile"].strip(), "```", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.placement_speed", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10,100,1000", help="replica counts (comma-separated)")
    ap.add_argument("--catalog", type=int, default=200, dest="catalog_size")
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--mix", default=DEFAULT_MIX)
    ap.add_argument("--spill-queue-len", type=int, default=4)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--budget-s", type=float, default=4.0, help="seconds of timed calls per layer and size")
    ap.add_argument("--profile-at", type=int, default=100, help="cProfile rank_for at this size (0: off)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    a = ap.parse_args(argv)
    sizes = [int(x) for x in a.sizes.split(",")]
    res = run(sizes, seed=a.seed, catalog_size=a.catalog_size, zipf_s=a.zipf_s, mix=a.mix, budget_s=a.budget_s,
              spill_queue_len=a.spill_queue_len, profile_at=a.profile_at or None)
    out = {"machine": machine_info(),
           "params": {"sizes": sizes, "catalog_size": a.catalog_size, "zipf_s": a.zipf_s, "mix": a.mix,
                      "spill_queue_len": a.spill_queue_len, "seed": a.seed, "budget_s": a.budget_s},
           **res}
    at100 = next((r for r in out["results"] if r["replicas"] == 100), None)
    if at100:
        stateless = at100["layers"]["rank_indices 1 fresh"]["p50_us"]
        pure = at100["layers"]["FleetIndex 1 fresh"]["p50_us"]
        shell = at100["layers"]["rank_for 1 placed"]["p50_us"]
        worst = at100["layers"]["rank_for all changed"]["p50_us"]
        bcast = at100["layers"]["rank_for broadcast"]["p50_us"]
        out["target_met_at_100"] = pure <= TARGET_US_AT_100
        out["verdict"] = (f"At 100 replicas a pure placement decision (router/fleet_index.py FleetIndex.rank, the "
                          f"router's hot path, one view new per decision) takes p50 {pure:.1f} us: target "
                          f"{'met' if pure <= TARGET_US_AT_100 else 'MISSED'} ({TARGET_US_AT_100:.0f} us); the "
                          f"stateless rank_indices (whole order) p50 {stateless:.1f} us. "
                          f"The whole Ray-shell decision (rank_for, one placement since the last, Ray's ReplicaID and "
                          f"queue-length cache) takes p50 {shell:.1f} us; with every view rebuilt (every report new) p50 {worst:.1f} us; "
                          f"the first decision after a Ray broadcast (every stats dict new, one new report) p50 "
                          f"{bcast:.1f} us.")
    dest = Path(a.out)
    dest.mkdir(parents=True, exist_ok=True)
    (dest / "placement_speed.json").write_text(json.dumps(out, indent=2) + "\n")
    (dest / "placement_speed.md").write_text(to_markdown(out))
    print(to_markdown(out))
    return out


if __name__ == "__main__":
    main()
