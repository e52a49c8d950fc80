"""The routing ledger: what this router placed that the replicas' reports may not show yet.

Reports are up to one period stale. Without the ledger, a burst of requests for one cold
checkpoint would see "not resident anywhere" on every replica and load it everywhere. The
ledger overlays each placement on the replica's last report until a report taken after the
request completed has arrived (that report shows the checkpoint where it really is).

Pure: times are passed in (wall-clock seconds, since reports come from other processes).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from router.placement import EntryView, ReplicaView


@dataclass
class _Placed:
    replica_id: str
    checkpoint: str
    weights_bytes: int
    routed_s: float
    completed_s: float | None = None


class Ledger:
    def __init__(self) -> None:
        self._placed: dict[str, _Placed] = {}  # request id -> placement

    def routed(self, request_id: str, replica_id: str, checkpoint: str, *, weights_bytes: int, now_s: float) -> None:
        """Record (or move) ``request_id``'s placement. Called when the router picks a replica
        (tentative: the next request of a burst must see it at once) and again when the
        replica accepts, which may be another replica."""
        self._placed[request_id] = _Placed(replica_id, checkpoint, weights_bytes, now_s)

    def completed(self, request_id: str, replica_id: str, *, now_s: float) -> None:
        p = self._placed.get(request_id)
        if p is not None and p.replica_id == replica_id and p.completed_s is None:
            p.completed_s = now_s

    def replica_gone(self, replica_id: str) -> None:
        self._placed = {k: p for k, p in self._placed.items() if p.replica_id != replica_id}

    def report_arrived(self, replica_id: str, report_s: float, *, max_age_s: float = 600.0) -> None:
        """Forget placements on ``replica_id`` that completed before its report was taken,
        and any older than ``max_age_s`` (a completion callback that never came)."""
        def keep(p: _Placed) -> bool:
            if p.replica_id != replica_id:
                return True
            done = p.completed_s is not None and p.completed_s < report_s
            return not done and p.routed_s >= report_s - max_age_s

        self._placed = {k: p for k, p in self._placed.items() if keep(p)}

    def pending(self, replica_id: str) -> list[tuple[str, int]]:
        """(checkpoint, in-flight count) placed on ``replica_id`` and not yet reflected."""
        counts: dict[str, int] = {}
        for p in self._placed.values():
            if p.replica_id == replica_id:
                counts[p.checkpoint] = counts.get(p.checkpoint, 0) + (p.completed_s is None)
        return sorted(counts.items())

    def overlay(self, view: ReplicaView) -> ReplicaView:
        """``view`` with this router's unreflected placements applied.

        A checkpoint placed here but not on the device in the report counts as resident (at
        its estimated weights) and in use while requests for it are in flight. Workspace is
        not added per request: a replica runs one pipeline at a time and queued requests
        show in the queue length, which ranks and spills.
        """
        entries = dict(view.entries)
        used = view.used_bytes
        for p in self._placed.values():
            if p.replica_id != view.replica_id:
                continue
            current = entries.get(p.checkpoint)
            if current is None or current.tier != "device":
                entries[p.checkpoint] = EntryView("device", p.weights_bytes, 0.0, int(p.completed_s is None))
                used += p.weights_bytes
            elif p.completed_s is None:
                entries[p.checkpoint] = dataclasses.replace(current, in_use=current.in_use + 1, idle_s=0.0)
        return dataclasses.replace(view, entries=entries, used_bytes=used)

    def __len__(self) -> int:
        return len(self._placed)
