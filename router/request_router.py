"""MemoryAwareRequestRouter: the Ray Serve RequestRouter shell around router/placement.py.

Configured on the ModelReplica deployment (``request_router_config``); Ray instantiates it
inside every caller's process (here: the Router ingress replica) and runs it on that
process's router event loop, so nothing here may block.

- ``choose_replicas`` reads the placement need from the call's arguments
  (``generate(payload, need)``), overlays the ledger on each replica's last report and
  returns one rank per replica, best first: Ray's base class then sends to the first one
  with queue room (below ``max_ongoing_requests``), else the next.
- Calls without a need (reports, admin) go to ``_target_replica`` when given, else to all
  replicas in one rank (least queue length wins), which is also the fallback before the
  first reports arrive.
- Reports arrive through ``update_replicas`` (Ray's long-poll broadcast of routing stats);
  they also fill :class:`ReportBoard`, which the ingress reads for ``/v1/status``.

Request ids (Ray 2.60 alpha API): Ray gives every call made while serving one request that
request's ``internal_request_id``, keeps waiting calls by it (a second concurrent call with
the same id can be handed the replica chosen for the first), and names only the id when a
call finishes. RouterCore therefore sends each replica call under an id of its own
(router.core.remote_as_own_request). The ledger does not rely on that: it keeps a record per
call (one ``PendingRequest`` across a call's routing retries) and matches a completion to a
running call of that id on that replica, accepted ones first.
"""

from __future__ import annotations

import itertools
import logging
import time
import weakref
from typing import Any, NamedTuple, Optional

from ray.serve.request_router import PendingRequest, ReplicaID, RequestRouter, RunningReplica

from router.fleet_index import FleetIndex
from router.ledger import Ledger
from router.report_board import ReportBoard
from router.placement import EntryView, Need, ReplicaView

log = logging.getLogger("memrouter.request_router")


def view_from_report(replica_id: str, report: dict[str, Any], queue_len: int) -> ReplicaView:
    entries = {
        e["name"]: EntryView(e["tier"], int(e["bytes"]), float(e["idle_s"]), int(e["in_use"]),
                             _LOAD_SOURCES.get(e.get("loading") or "", "disk"))
        for e in report.get("entries", ())
    }
    times = report.get("service_times") or {}
    return ReplicaView(
        replica_id=replica_id,
        budget_bytes=int(report["device_budget_bytes"]),
        used_bytes=int(report["device_used_bytes"]),
        default_dtype=str(report["default_dtype"]),
        entries=entries,
        queue_len=queue_len,
        max_resident=int(report.get("max_resident", 1 << 30)),
        inference_s=float(times.get("inference_s", 0.0)),
        disk_load_bytes_per_s=float(times.get("disk_load_bytes_per_s", 0.0)),
        host_reload_bytes_per_s=float(times.get("host_reload_bytes_per_s", 0.0)),
        reported_at_s=float(report.get("timestamp_s", 0.0)),
    )


class _Seen(NamedTuple):
    """A replica's report as this router last took it."""

    stats: dict[str, Any]  # the routing stats object (Ray's dict)
    ledger_version: int  # the ledger's version for the replica when ``view`` was overlaid
    view: ReplicaView  # ``base`` with this router's placements overlaid (what the fleet holds)
    report_seq: Any  # the report's report_seq (None: an older replica without one)
    base: ReplicaView  # the view from the report alone


class MemoryAwareRequestRouter(RequestRouter):
    def initialize_state(self, spill_queue_len: int = 4, holder_wait_s: float = 2.0, rank_limit: int = 16,
                         tie_window: int = 256, **kwargs: Any) -> None:
        self.init_routing_state(spill_queue_len=spill_queue_len, holder_wait_s=holder_wait_s, rank_limit=rank_limit,
                                tie_window=tie_window, ledger=Ledger())
        self._deployment = (self._deployment_id.app_name, self._deployment_id.name)  # ReportBoard's key
        ReportBoard.register_router_counters(self._deployment, self._counters)

    def init_routing_state(self, *, spill_queue_len: int, holder_wait_s: float, rank_limit: int,
                           ledger: Ledger, tie_window: int = 256) -> None:
        """The state rank_for reads, without Ray (initialize_state calls it; benchmarks and
        unit tests call it on an instance made without Ray's constructor)."""
        if int(spill_queue_len) < 1:
            raise ValueError(f"spill_queue_len must be >= 1, got {spill_queue_len}")
        if int(rank_limit) < 1:
            raise ValueError(f"rank_limit must be >= 1, got {rank_limit}")
        self._spill_queue_len = int(spill_queue_len)
        self._holder_wait_s = float(holder_wait_s)
        # Places returned per decision: Ray sends to the first with queue room and backs off
        # when none has room; past the first few, ranking every replica is wasted work.
        self._rank_limit = int(rank_limit)
        self._ledger = ledger
        self._calls: dict[int, tuple[weakref.ref, int]] = {}  # id(PendingRequest) -> (ref, ledger key)
        self._call_seq = 0
        # Views by slot, kept across decisions: a decision re-scores only the views that
        # changed since its size class was last asked for. A slot per replica id; a freed
        # slot is reused.
        self._fleet = FleetIndex(tie_window=int(tie_window))
        self._slots: dict[str, int] = {}
        self._free_slots: list[int] = []
        # The last full pass over the candidates (see rank_for): its candidate list, the
        # replica per slot, the candidates without a report, decisions since, and the
        # ledger's mark when this router last looked.
        self._pass_of: list[RunningReplica] | None = None
        self._by_slot: list[RunningReplica | None] = []
        self._unreported: list[RunningReplica] = []
        self._since_pass = 0
        self._ledger_mark = 0
        # replica id -> what this router last made of its report: a view is rebuilt only when
        # its report or this router's placements on it change,
        # not per decision. Ray gives every replica a new stats dict on each broadcast
        # (measured: 4 replicas reporting every 1 s gave 13 new dicts/s for 3.25 new
        # reports/s), and a replica reports every period even when only time passed; a
        # replica's report_seq moves only when its state did (ModelReplica.memory_report),
        # and a view ranks by last-use times, which do not move with time alone.
        self._views: dict[str, _Seen] = {}
        # Shown in the ingress's /v1/status: decisions made and views built for them.
        self._counters = {"decisions": 0, "views_built": 0}

    # ---- Ray hooks ---------------------------------------------------------------------------
    def update_replicas(self, replicas: list[RunningReplica]) -> None:
        before = {r.unique_id for r in self.curr_replicas}
        super().update_replicas(replicas)
        # A replica Ray removed without its actor dying (downscale, redeploy, rolling update)
        # gets no on_replica_actor_died: its ledger records would stay forever.
        for rid in before - {r.replica_id.unique_id for r in replicas}:
            self._ledger.replica_gone(rid)
        reports = {}
        for r in replicas:
            stats = r.routing_stats
            if stats:
                rid = r.replica_id.unique_id
                reports[rid] = stats
                self._ledger.report_arrived(rid, float(stats.get("timestamp_s", 0.0)))
        ReportBoard.publish(self._deployment, reports)

    def on_request_routed(self, pending_request: PendingRequest, replica_id: ReplicaID, result: Any) -> None:
        need = _need_of(pending_request)
        replica = self.curr_replicas.get(replica_id)
        # A replica update_replicas already removed (draining) is forgotten: a record made
        # for it now would never be cleared (it sends no more reports).
        if need is not None and replica is not None:
            self._record(pending_request, need, replica, replica_id.unique_id)

    def on_request_completed(self, replica_id: ReplicaID, internal_request_id: str) -> None:
        self._ledger.completed(internal_request_id, replica_id.unique_id, now_s=time.time())

    def _record(self, pending_request: PendingRequest, need: Need, replica: RunningReplica | None, rid: str,
                tentative: bool = False) -> None:
        dtype = (replica.routing_stats if replica is not None else {}).get("default_dtype", "float16")
        self._ledger.routed(self._call_key(pending_request), rid, need.checkpoint, weights_bytes=need.at(dtype)[0],
                            now_s=time.time(), tentative=tentative,
                            request_id=pending_request.metadata.internal_request_id)

    def _call_key(self, pending_request: PendingRequest) -> int:
        """The ledger's key for one handle call: Ray keeps one PendingRequest across a call's
        routing retries (choose_replicas, then on_request_routed). Kept by the object's
        id while it lives (a weak reference: nothing here keeps a finished call alive)."""
        calls = self._calls
        got = calls.get(id(pending_request))
        if got is not None and got[0]() is pending_request:
            return got[1]
        self._call_seq += 1
        ident = id(pending_request)

        def forget(ref: weakref.ref, ident: int = ident) -> None:
            if calls.get(ident, (None,))[0] is ref:
                del calls[ident]

        calls[ident] = (weakref.ref(pending_request, forget), self._call_seq)
        return self._call_seq

    def on_replica_actor_died(self, replica_id: ReplicaID) -> None:
        super().on_replica_actor_died(replica_id)
        self._ledger.replica_gone(replica_id.unique_id)
        self._views.pop(replica_id.unique_id, None)
        self._release_slot(replica_id.unique_id)
        reports = ReportBoard.reports(self._deployment)
        reports.pop(replica_id.unique_id, None)
        ReportBoard.publish(self._deployment, reports)

    # ---- routing -----------------------------------------------------------------------------
    async def choose_replicas(
        self, candidate_replicas: list[RunningReplica], pending_request: Optional[PendingRequest] = None
    ) -> list[list[RunningReplica]]:
        if pending_request is not None:
            # Without this, Ray re-calls us in a tight loop while every replica is full.
            pending_request.routing_context.should_backoff = True
        target = pending_request.kwargs.get("_target_replica") if pending_request is not None else None
        if target is not None:
            return [[r for r in candidate_replicas if r.replica_id.unique_id == target]]
        need = _need_of(pending_request) if pending_request is not None else None
        if need is None:
            return [list(candidate_replicas)]
        # A request for a held checkpoint goes to a replica that must load it only when that
        # is expected to be quicker than waiting for a holder (measured service times);
        # before times are measured, it waits up to holder_wait_s for a holder (or a
        # replica with free room) rather than making another replica evict for it.
        waited_s = time.time() - pending_request.created_at
        ranks = self.rank_for(candidate_replicas, need, evict_for_held=waited_s >= self._holder_wait_s,
                              backlog=self._backlog(pending_request, need.checkpoint))
        if ranks and len(ranks[0]) == 1:
            # Tentative: the next request of a burst must see this placement now, not after
            # the replica accepts; on_request_routed moves it if Ray sends elsewhere.
            best = ranks[0][0]
            self._record(pending_request, need, best, best.replica_id.unique_id, tentative=True)
        return ranks

    def _backlog(self, pending_request: PendingRequest, checkpoint: str) -> int:
        """Requests for ``checkpoint`` that wait in this router, not yet sent, and came before
        ``pending_request``: the holder gate counts them in the holders' wait
        (placement.rank_indices). Read from Ray 2.60's index of unsent requests, a private
        attribute of its RequestRouter (0 where a Ray version has none); at most
        _BACKLOG_SCAN of them are looked at per decision. Caveat: other routers' (other
        ingress replicas') backlogs are not seen."""
        pending = getattr(self, "_pending_requests_by_id", None)
        if not pending:
            return 0
        created = pending_request.created_at
        n = 0
        for pr in itertools.islice(pending.values(), _BACKLOG_SCAN):
            if pr is not pending_request and pr.created_at < created and not pr.future.done():
                other = _need_of(pr)
                n += other is not None and other.checkpoint == checkpoint
        return n

    def rank_for(self, candidates: list[RunningReplica], need: Need,
                 evict_for_held: bool = True, backlog: int = 0) -> list[list[RunningReplica]]:
        """One rank per replica, best first, at most ``rank_limit`` of them (then the
        replicas without a report yet, in one rank).

        Per decision it looks only at what changed: Ray hands every call the same candidate
        list object until its next broadcast of replicas (``update_replicas`` builds a new
        one; routing stats change only that way), so with the same list only the replicas
        this router's ledger touched since the last decision are re-viewed. A new list, or
        every ``_FULL_PASS_EVERY`` decisions (a net under that reading of Ray), takes a full
        pass over the candidates.
        """
        touched = None
        if candidates is self._pass_of and self._since_pass < _FULL_PASS_EVERY:
            touched = self._ledger.touched_since(self._ledger_mark)
        built = self._full_pass(candidates) if touched is None else self._ledger_pass(touched)
        self._since_pass += 1
        counters = self._counters
        counters["views_built"] += built
        counters["decisions"] += 1
        by_slot = self._by_slot
        if not self._slots:
            return self._rank_unreported(candidates, need)
        order = self._fleet.rank(need, _QueueLens(by_slot, self.replica_queue_len_cache),
                                 spill_queue_len=self._spill_queue_len, evict_for_held=evict_for_held,
                                 limit=self._rank_limit, backlog=backlog)
        ranks = [[by_slot[i]] for i in order]
        if self._unreported:
            ranks.append(list(self._unreported))
        if not ranks:
            # Fits no replica: send anyway so that a replica answers with the numbers
            # instead of the request waiting here forever.
            return [list(candidates)]
        return ranks

    def _full_pass(self, candidates: list[RunningReplica]) -> int:
        """Re-read every candidate's report; returns the views built."""
        fleet, slots = self._fleet, self._slots
        by_slot: list[RunningReplica | None] = [None] * len(fleet)
        unreported = []
        cache, versions, ledger = self._views, self._ledger.versions, self._ledger
        built = seen = 0
        for r in candidates:
            stats = r.routing_stats
            if not stats:
                unreported.append(r)
                continue
            rid = r.replica_id.unique_id
            v = versions.get(rid, 0)
            cached = cache.get(rid)
            view = None  # None: the fleet has this replica's view
            if cached is not None and (cached.stats is stats or (
                    cached.report_seq is not None and cached.report_seq == stats.get("report_seq"))):
                # The same report, or the same replica state in a new dict (a copy from Ray's
                # broadcast, or a report where only time passed).
                if cached.ledger_version != v:
                    view = ledger.overlay(cached.base)
                    cache[rid] = cached._replace(stats=stats, ledger_version=v, view=view)
                    built += 1
                elif cached.stats is not stats:
                    cache[rid] = cached._replace(stats=stats)
            else:
                base = view_from_report(rid, stats, 0)
                view = ledger.overlay(base)
                cache[rid] = _Seen(stats, v, view, stats.get("report_seq"), base)
                built += 1
            slot = slots.get(rid)
            if slot is None:
                slot = self._take_slot(rid)
                if slot >= len(by_slot):
                    by_slot.extend([None] * (slot + 1 - len(by_slot)))
                view = cache[rid].view
            if view is not None:
                fleet.set_view(slot, view)
            by_slot[slot] = r
            seen += 1
        if seen < len(slots):
            # Replicas not among this call's candidates (gone, or not offered this time) must
            # not be ranked: free their slots (a returning replica takes a new one).
            for rid in [rid for rid, slot in slots.items() if by_slot[slot] is None]:
                self._release_slot(rid)
        if len(cache) > 2 * len(candidates) + 8:  # replicas that left: drop their views
            live = {r.replica_id.unique_id for r in candidates}
            self._views = {k: v for k, v in cache.items() if k in live}
        self._by_slot, self._unreported = by_slot, unreported
        self._pass_of, self._since_pass, self._ledger_mark = candidates, 0, self._ledger.mark()
        return built

    def _ledger_pass(self, touched: list[str]) -> int:
        """Re-view the replicas whose placements changed (same candidates, same reports)."""
        built = 0
        slots, cache, ledger = self._slots, self._views, self._ledger
        for rid in dict.fromkeys(touched):
            slot = slots.get(rid)
            cached = cache.get(rid)
            if slot is None or cached is None:
                continue  # not a reported candidate: the next full pass sees it
            v = ledger.version(rid)
            if cached.ledger_version != v:
                view = ledger.overlay(cached.base)
                cache[rid] = cached._replace(ledger_version=v, view=view)
                self._fleet.set_view(slot, view)
                built += 1
        self._ledger_mark = ledger.mark()
        return built

    def _take_slot(self, rid: str) -> int:
        slot = self._free_slots.pop() if self._free_slots else len(self._fleet)
        self._slots[rid] = slot
        return slot

    def _release_slot(self, rid: str) -> None:
        slot = self._slots.pop(rid, None)
        if slot is not None:
            self._fleet.set_view(slot, None)
            self._free_slots.append(slot)
            self._pass_of = None  # the next decision takes a full pass (by_slot is stale)

    def _rank_unreported(self, candidates: list[RunningReplica], need: Need) -> list[list[RunningReplica]]:
        """Startup, before any report: least queue length first, as Ray's default router
        would, except that a replica this router already sent the checkpoint to goes first.

        One replica per rank, so that choose_replicas records the pick in the ledger at
        once and the rest of a cold burst follows it instead of loading the checkpoint on
        every replica. Without queue lengths (none probed yet) the candidates keep their
        order.
        """
        queue_lens = self.replica_queue_len_cache

        def key(ir: tuple[int, RunningReplica]) -> tuple[bool, int, int]:
            i, r = ir
            placed = any(ck == need.checkpoint for ck, _ in self._ledger.pending(r.replica_id.unique_id))
            return (not placed, queue_lens.get(r.replica_id) or 0, i)

        return [[r] for _, r in sorted(enumerate(candidates), key=key)]


class _QueueLens:
    """Queue lengths by slot, read from Ray's queue-length cache only at the slots a decision
    visits (FleetIndex.rank reads few): each read of that cache hashes a ReplicaID and asks
    the clock, about 0.7 us (bench/placement_speed.py profile). A stale or missing entry
    reads 0, as Ray's own routers take an unknown queue."""

    __slots__ = ("_replicas", "_cache", "_read")

    def __init__(self, replicas: list[RunningReplica | None], cache: Any):
        self._replicas, self._cache, self._read = replicas, cache, {}

    def __len__(self) -> int:
        return len(self._replicas)

    def __getitem__(self, slot: int) -> int:
        q = self._read.get(slot)
        if q is None:
            r = self._replicas[slot]
            q = self._read[slot] = (self._cache.get(r.replica_id) or 0) if r is not None else 0
        return q


_LOAD_SOURCES = {"": "", "disk": "disk", "host": "host"}  # a report's loading; anything else truthy: disk
_FULL_PASS_EVERY = 64  # decisions between full passes over the same candidate list (see rank_for)
_BACKLOG_SCAN = 4096  # unsent requests looked at per decision for the backlog (see _backlog)


def _need_of(pending_request: PendingRequest | None) -> Need | None:
    if pending_request is None:
        return None
    for arg in pending_request.args[1:2]:
        if isinstance(arg, Need):
            return arg
    need = pending_request.kwargs.get("need")
    return need if isinstance(need, Need) else None
