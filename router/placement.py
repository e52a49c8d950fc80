"""Pure placement: rank replicas for one request from their memory reports.

No ray, no torch: the Ray shell (router/request_router.py) turns running replicas into
:class:`ReplicaView` and calls :func:`rank`.

Ranking (lower is better), per the design:
  1. the checkpoint is resident on the replica's device,
  2. resident in the replica's host RAM,
  3. fits in the replica's free device budget,
  4. fits after evicting idle entries: fewest bytes evicted, then the most idle victims,
  5. needs entries that are in use right now evicted: it waits for them, then evicts,
  6. can never fit (bigger than the replica's budget) -- not returned.
Queue length breaks ties. A replica whose queue is at or above ``spill_queue_len`` is
ranked after every replica below it, so a hot checkpoint spreads to a second replica only
when the first one is busy.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Iterable, Mapping, Sequence


class Rank(enum.IntEnum):
    ON_DEVICE = 0
    ON_HOST = 1
    FITS = 2
    EVICT = 3
    BUSY = 4


@dataclass(frozen=True)
class EntryView:
    tier: str  # "device" | "host"
    bytes: int
    idle_s: float = 0.0
    in_use: int = 0


@dataclass(frozen=True)
class ReplicaView:
    """One replica as placement sees it: its last report plus this router's ledger."""

    replica_id: str
    budget_bytes: int
    used_bytes: int
    default_dtype: str
    entries: Mapping[str, EntryView] = field(default_factory=dict)
    queue_len: int = 0
    max_resident: int = 1 << 30

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes


@dataclass(frozen=True)
class Need:
    """What one request needs, per compute dtype (replicas of different profiles differ)."""

    checkpoint: str
    weights_bytes: Mapping[str, int]
    workspace_bytes: Mapping[str, int]

    def at(self, dtype: str) -> tuple[int, int]:
        """(weights, workspace) bytes at ``dtype``; ValueError names a dtype we have no figure for."""
        try:
            return self.weights_bytes[dtype], self.workspace_bytes[dtype]
        except KeyError:
            raise ValueError(f"need for {self.checkpoint!r} has no estimate at dtype {dtype!r}; "
                             f"have {sorted(self.weights_bytes)}") from None


@dataclass(frozen=True)
class Placement:
    replica_id: str
    rank: Rank
    evict_bytes: int
    victims_idle_s: float
    queue_len: int
    spilled: bool

    def key(self) -> tuple:
        # Most idle victims are cheapest to lose, hence the negative idle time.
        return (self.spilled, self.rank, self.evict_bytes, -self.victims_idle_s, self.queue_len)


def place_one(view: ReplicaView, need: Need, *, spill_queue_len: int) -> Placement | None:
    """Score one replica; None when the need can never fit its budget.

    Resident on the device ranks first whatever the free bytes: the replica runs one
    pipeline at a time and finds workspace room at acquire time, and ``in_use`` in a
    report is stale by up to a period. Otherwise idle entries are evicted most idle first
    (the cache's LRU order); needing entries that are in use ranks BUSY (wait, then evict).
    """
    weights, workspace = need.at(view.default_dtype)
    entry = view.entries.get(need.checkpoint)
    spilled = view.queue_len >= spill_queue_len
    if entry is not None and entry.tier == "device":
        if entry.bytes + workspace > view.budget_bytes:
            return None
        return Placement(view.replica_id, Rank.ON_DEVICE, 0, 0.0, view.queue_len, spilled)
    if entry is not None and entry.tier == "host":
        rank_, required = Rank.ON_HOST, entry.bytes + workspace
    else:
        rank_, required = Rank.FITS, weights + workspace
    if required > view.budget_bytes:
        return None
    resident = sum(1 for e in view.entries.values() if e.tier == "device")

    def fits(free: int, resident: int) -> bool:
        return free >= required and resident < view.max_resident

    if fits(view.free_bytes, resident):
        return Placement(view.replica_id, rank_, 0, 0.0, view.queue_len, spilled)
    victims = sorted(
        ((name, e) for name, e in view.entries.items() if e.tier == "device" and name != need.checkpoint),
        key=lambda ne: (ne[1].in_use > 0, -ne[1].idle_s),
    )
    free, evicted, idle_sum, busy = view.free_bytes, 0, 0.0, False
    for _, e in victims:
        if fits(free, resident):
            break
        free += e.bytes
        evicted += e.bytes
        idle_sum += e.idle_s
        resident -= 1
        busy = busy or e.in_use > 0
    if busy or not fits(free, resident):
        return Placement(view.replica_id, Rank.BUSY, evicted, idle_sum, view.queue_len, spilled)
    # Reloading from host keeps its rank: it is cheaper than any disk load, even with evictions.
    return Placement(view.replica_id, rank_ if rank_ is Rank.ON_HOST else Rank.EVICT, evicted, idle_sum,
                     view.queue_len, spilled)


def rank(views: Iterable[ReplicaView], need: Need, *, spill_queue_len: int = 4) -> list[Placement]:
    """All replicas that could ever serve ``need``, best first. Empty: fits none of them."""
    if spill_queue_len < 1:
        raise ValueError(f"spill_queue_len must be >= 1, got {spill_queue_len}")
    scored = [p for v in views if (p := place_one(v, need, spill_queue_len=spill_queue_len)) is not None]
    return sorted(scored, key=Placement.key)


def largest_budget(views: Sequence[ReplicaView]) -> int:
    return max((v.budget_bytes for v in views), default=0)
