"""The routing ledger: what this router placed that the replicas' reports may not show yet.

Reports are up to one period stale. Without the ledger, a burst of requests for one cold
checkpoint would see "not resident anywhere" on every replica and load it everywhere. The
ledger overlays each placement on the replica's last report until a report taken after the
request completed has arrived (that report shows the checkpoint where it really is).

Placements are indexed by replica, so one replica's overlay costs its own placements, not
the whole ledger's (a decision overlays every replica: O(total) instead of
O(replicas x total)). ``version(replica_id)`` changes whenever that replica's placements
do, so callers may cache an overlaid view until it changes.

Pure: times are passed in (wall-clock seconds, since reports come from other processes).
"""

from __future__ import annotations

import types
from bisect import bisect_right
from dataclasses import dataclass
from operator import attrgetter
from typing import Hashable, Mapping

from router.placement import EntryView, ReplicaView


_LOG_MAX = 4096  # touches remembered for touched_since
# Completions that matched no running call (see completed), kept this long and this many.
_EARLY_MAX_AGE_S = 60.0
_EARLY_MAX = 4096
_ACCEPTED_FIRST = attrgetter("tentative", "routed_s")


@dataclass
class _Placed:
    replica_id: str
    checkpoint: str
    weights_bytes: int
    routed_s: float
    completed_s: float | None = None
    tentative: bool = False  # picked by the router, not yet accepted by a replica
    request_id: Hashable = None  # what a completion names (several calls may share it)


class Ledger:
    def __init__(self) -> None:
        self._by_replica: dict[str, dict[Hashable, _Placed]] = {}  # replica id -> call -> placement
        self._where: dict[Hashable, str] = {}  # call -> replica id
        self._versions: dict[str, int] = {}
        self._versions_view = types.MappingProxyType(self._versions)  # live, read-only
        self._last_version = 0
        # Every touch, in order (versions consecutive): what touched_since reads. Bounded:
        # the oldest half goes past _LOG_MAX, and a mark older than what is kept reads None.
        self._log_versions: list[int] = []
        self._log_replicas: list[str] = []
        # (request id, replica id) -> when a completion came that matched no running call:
        # the call's acceptance there may still be on its way (see routed).
        self._early: dict[tuple[Hashable, str], float] = {}

    def _touch(self, replica_id: str) -> None:
        # Versions are unique across replicas and never reused, even after replica_gone.
        v = self._last_version = self._last_version + 1
        self._versions[replica_id] = v
        self._log_versions.append(v)
        self._log_replicas.append(replica_id)
        if len(self._log_versions) > _LOG_MAX:
            del self._log_versions[:_LOG_MAX // 2]
            del self._log_replicas[:_LOG_MAX // 2]

    def routed(self, call: Hashable, replica_id: str, checkpoint: str, *, weights_bytes: int, now_s: float,
               tentative: bool = False, request_id: Hashable = None) -> None:
        """Record (or move) the placement of one call. Called when the router picks a replica
        (``tentative``: the next request of a burst must see it at once) and again when the
        replica accepts, which may be another replica. A call still waiting for room is
        picked again at every retry, which renews its tentative record; one that gave up
        (cancelled, timed out) is picked no more, and its record goes after
        ``tentative_max_age_s`` (see :meth:`report_arrived`).

        ``call`` identifies one call across its retries; ``request_id`` (default: ``call``)
        is what :meth:`completed` will name. They differ under Ray: its completion callback
        names only the request id, which every call made while serving one request shares
        (a fan-out), so concurrent calls need their own keys here.

        A replica that answers at once can complete a call before its acceptance is
        recorded (Ray runs the completion callback while it still awaits the acceptance):
        accepted where its tentative record already completed, or where a completion of its
        request id matched no running call (no tentative record there: Ray went past the
        pick, or the pick was a group), the call is recorded completed; recorded as running,
        nothing would end it but ``max_age_s`` (10 min of a phantom request in use).
        Caveat: the completion of an attempt the same replica rejected looks the same, so a
        call accepted there on a retry that did not renew its tentative record shows
        finished until the replica's next report."""
        old = self._where.get(call)
        if old is not None and old != replica_id:
            placed = self._by_replica.get(old)
            if placed is not None:
                placed.pop(call, None)
                self._touch(old)
        self._where[call] = replica_id
        here = self._by_replica.setdefault(replica_id, {})
        prev = here.get(call)
        rid = call if request_id is None else request_id
        done_s = None
        if tentative:
            # A retry of this call (it was routed before) picked here: a completion remembered
            # for its id here was an earlier attempt's (rejected), not this one's. Not on a
            # first pick: that completion may be a sibling call's (a shared id) still owed
            # to its acceptance.
            if old is not None:
                self._early.pop((rid, replica_id), None)
        else:
            done_s = self._early.pop((rid, replica_id), None)
            if prev is not None and prev.tentative and prev.completed_s is not None:
                done_s = prev.completed_s
        here[call] = _Placed(replica_id, checkpoint, weights_bytes, now_s, done_s, tentative, rid)
        self._touch(replica_id)

    def completed(self, request_id: Hashable, replica_id: str, *, now_s: float) -> None:
        """A call of ``request_id`` on ``replica_id`` finished: of the calls of that id still
        running there, the oldest one a replica accepted, else the oldest tentative one (a
        tentative record may be a call still waiting for room; where Ray sends without
        rejection, it calls back only on completion, so tentative records are all there is).
        Calls that share a request id on one replica are told apart by that alone; the
        replica holds their checkpoints until its next report says otherwise either way.

        Caveat: Ray calls back for an attempt a replica rejected too, from another thread,
        possibly after the same call was accepted by that replica on a retry; that marks the
        running call finished early, and its checkpoint shows idle until the replica's next
        report (one report period)."""
        p = min((q for q in self._by_replica.get(replica_id, {}).values()
                 if q.request_id == request_id and q.completed_s is None), key=_ACCEPTED_FIRST, default=None)
        if p is not None:
            p.completed_s = now_s
            self._touch(replica_id)
            return
        # No running call of that id there: its acceptance may still come (see routed), or
        # it was a call this ledger never records (no need: reports, admin). Bounded.
        early = self._early
        early[(request_id, replica_id)] = now_s
        while early:
            oldest = next(iter(early))
            if len(early) <= _EARLY_MAX and early[oldest] >= now_s - _EARLY_MAX_AGE_S:
                break
            del early[oldest]

    def replica_gone(self, replica_id: str) -> None:
        """Forget ``replica_id``: its placements and its version (touched once more first, so
        that :meth:`touched_since` names it)."""
        for request_id in self._by_replica.pop(replica_id, {}):
            self._where.pop(request_id, None)
        for key in [k for k in self._early if k[1] == replica_id]:
            del self._early[key]
        self._touch(replica_id)
        del self._versions[replica_id]

    def report_arrived(self, replica_id: str, report_s: float, *, max_age_s: float = 600.0,
                       tentative_max_age_s: float = 30.0) -> None:
        """Forget placements on ``replica_id`` that completed before its report was taken,
        any older than ``max_age_s`` (a completion callback that never came), and tentative
        ones not renewed for ``tentative_max_age_s`` (a request that gave up while waiting for
        room: Ray then calls back neither on routing nor on completion; a waiting request is
        picked again at least every max backoff, 0.5 s by default)."""
        placed = self._by_replica.get(replica_id)
        if not placed:
            return
        oldest_s, oldest_tentative_s = report_s - max_age_s, report_s - tentative_max_age_s
        gone = [k for k, p in placed.items()
                if (p.completed_s is not None and p.completed_s < report_s) or p.routed_s < oldest_s
                or (p.tentative and p.routed_s < oldest_tentative_s)]
        for k in gone:
            del placed[k]
            self._where.pop(k, None)
        if gone:
            self._touch(replica_id)

    def version(self, replica_id: str) -> int:
        """Changes whenever ``replica_id``'s placements change (0: never had any)."""
        return self._versions.get(replica_id, 0)

    def mark(self) -> int:
        """The newest version handed out (0: none yet), for :meth:`touched_since`."""
        return self._last_version

    def touched_since(self, mark: int) -> list[str] | None:
        """Replica ids whose placements changed after ``mark`` (an earlier :meth:`mark`),
        oldest first, with repeats; None when the record no longer reaches back to ``mark``
        (the caller must then treat every replica as changed)."""
        versions = self._log_versions
        if mark >= self._last_version:
            return []
        if not versions or versions[0] > mark + 1:
            return None
        return self._log_replicas[bisect_right(versions, mark):]

    @property
    def versions(self) -> Mapping[str, int]:
        """replica id -> :meth:`version` (absent: 0), for a hot loop that reads many. Read-only."""
        return self._versions_view

    def pending(self, replica_id: str) -> list[tuple[str, int]]:
        """(checkpoint, in-flight count) placed on ``replica_id`` and not yet reflected."""
        counts: dict[str, int] = {}
        for p in self._by_replica.get(replica_id, {}).values():
            counts[p.checkpoint] = counts.get(p.checkpoint, 0) + (p.completed_s is None)
        return sorted(counts.items())

    def overlay(self, view: ReplicaView) -> ReplicaView:
        """``view`` with this router's unreflected placements applied (``view`` itself when
        there are none).

        A checkpoint placed here but not on the device in the report counts as resident (at
        its estimated weights) and in use while requests for it are in flight. Workspace is
        not added per request: a replica runs one pipeline at a time and queued requests
        show in the queue length, which ranks and spills.
        """
        placed = self._by_replica.get(view.replica_id)
        if not placed:
            return view
        entries = dict(view.entries)
        used = view.used_bytes
        for p in placed.values():
            current = entries.get(p.checkpoint)
            if current is None or current.tier != "device":
                # Loading until a report shows it (or its request is done: then it loaded),
                # from the host where the report had it there, else from disk.
                source = ("host" if current is not None else "disk") if p.completed_s is None else ""
                entries[p.checkpoint] = EntryView("device", p.weights_bytes, 0.0, int(p.completed_s is None), source)
                used += p.weights_bytes
            elif p.completed_s is None:
                # EntryView(...) rather than dataclasses.replace: an overlay runs per placement.
                entries[p.checkpoint] = EntryView(current.tier, current.bytes, 0.0, current.in_use + 1, current.loading)
        return view.with_entries(entries, used)

    def __len__(self) -> int:
        return len(self._where)
