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
from functools import cached_property
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
    """One replica as placement sees it: its last report plus this router's ledger.

    Immutable, so what does not depend on the request (device entry count, eviction order)
    is computed once per view and reused by every decision that sees the same view.
    """

    replica_id: str
    budget_bytes: int
    used_bytes: int
    default_dtype: str
    entries: Mapping[str, EntryView] = field(default_factory=dict)
    queue_len: int = 0
    max_resident: int = 1 << 30
    # Measured service times from the replica's report (0: not measured yet). Only the
    # holder gate of rank_indices reads them.
    inference_s: float = 0.0
    disk_load_bytes_per_s: float = 0.0
    host_reload_bytes_per_s: float = 0.0

    @property
    def free_bytes(self) -> int:
        return self.budget_bytes - self.used_bytes

    @cached_property
    def resident_count(self) -> int:
        return sum(1 for e in self.entries.values() if e.tier == "device")

    @cached_property
    def victim_order(self) -> tuple[tuple[int, float, bool], ...]:
        """(bytes, idle_s, in use) of device entries in eviction order: idle before in use,
        most idle first (the cache's LRU order); ties keep report order."""
        dev = sorted((e for e in self.entries.values() if e.tier == "device"), key=lambda e: (e.in_use > 0, -e.idle_s))
        return tuple((e.bytes, e.idle_s, e.in_use > 0) for e in dev)

    @cached_property
    def score_memo(self) -> dict:
        """Need.memo_key -> the queue-independent part of the sort key (see
        placement._static). Private to placement; per view, never shared."""
        return {}


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

    @cached_property
    def memo_key(self) -> str:
        """This need's figures at every dtype as one string: equal needs give equal keys, and
        a str caches its hash, so one decision's lookups in every view's memo hash it once."""
        return repr((self.checkpoint, sorted(self.weights_bytes.items()), sorted(self.workspace_bytes.items())))


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


_MISS = object()
_MEMO_MAX = 4096  # distinct needs remembered per view; a view lives about one report period


def _static(view: ReplicaView, checkpoint: str, weights: int, workspace: int) -> tuple | None:
    """The part of a replica's sort key that does not move with its queue: (rank, evict
    bytes, -victims idle s); None when the need can never fit the budget."""
    entry = view.entries.get(checkpoint)
    if entry is not None and entry.tier == "device":
        if entry.bytes + workspace > view.budget_bytes:
            return None
        return (Rank.ON_DEVICE, 0, -0.0)
    if entry is not None and entry.tier == "host":
        rank_, required = Rank.ON_HOST, entry.bytes + workspace
    else:
        rank_, required = Rank.FITS, weights + workspace
    budget = view.budget_bytes
    if required > budget:
        return None
    free, resident, max_resident = budget - view.used_bytes, view.resident_count, view.max_resident
    if free >= required and resident < max_resident:
        return (rank_, 0, -0.0)
    # The requested checkpoint is not on this device here, so every device entry is a
    # candidate victim.
    evicted, idle_sum, busy = 0, 0.0, False
    for nbytes, idle_s, in_use in view.victim_order:
        if free >= required and resident < max_resident:
            break
        free += nbytes
        evicted += nbytes
        idle_sum += idle_s
        resident -= 1
        busy = busy or in_use
    if busy or not (free >= required and resident < max_resident):
        return (Rank.BUSY, evicted, -idle_sum)
    # Reloading from host keeps its rank: it is cheaper than any disk load, even with evictions.
    return (rank_ if rank_ is Rank.ON_HOST else Rank.EVICT, evicted, -idle_sum)


def _static_memo(view: ReplicaView, need: Need) -> tuple | None:
    """:func:`_static` remembered on the (immutable) view: a router reuses one view for
    every decision until that replica's report or placements change, and popular
    checkpoints are asked for again and again in that time."""
    memo = view.score_memo
    s = memo.get(need.memo_key, _MISS)
    return _fill_memo(view, need) if s is _MISS else s


def _fill_memo(view: ReplicaView, need: Need) -> tuple | None:
    memo = view.score_memo
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    s = memo[need.memo_key] = _static(view, need.checkpoint, *need.at(view.default_dtype))
    return s


def place_one(view: ReplicaView, need: Need, *, spill_queue_len: int) -> Placement | None:
    """Score one replica; None when the need can never fit its budget.

    Resident on the device ranks first whatever the free bytes: the replica runs one
    pipeline at a time and finds workspace room at acquire time, and ``in_use`` in a
    report is stale by up to a period. Otherwise idle entries are evicted most idle first
    (the cache's LRU order); needing entries that are in use ranks BUSY (wait, then evict).
    """
    s = _static_memo(view, need)
    if s is None:
        return None
    rank_, evicted, neg_idle_s = s
    return Placement(view.replica_id, Rank(rank_), evicted, -neg_idle_s, view.queue_len,
                     view.queue_len >= spill_queue_len)


def _keys(views: Sequence[ReplicaView], need: Need, spill_queue_len: int,
          queue_lens: Sequence[int] | None) -> list[tuple]:
    """Sorted (spilled, (rank, evict bytes, -victims idle s), queue length, index) of every
    replica that could ever serve ``need``. The index makes ties keep view order."""
    if spill_queue_len < 1:
        raise ValueError(f"spill_queue_len must be >= 1, got {spill_queue_len}")
    if queue_lens is not None and len(queue_lens) != len(views):
        raise ValueError(f"queue_lens has {len(queue_lens)} entries for {len(views)} views; pass one per view or None")
    memo_key = need.memo_key
    keys: list[tuple] = []
    append = keys.append
    # The hot loop of every decision: one memo lookup and one small tuple per replica.
    if queue_lens is None:
        queue_lens = [v.queue_len for v in views]
    for i, (v, q) in enumerate(zip(views, queue_lens)):
        s = v.score_memo.get(memo_key, _MISS)
        if s is _MISS:
            s = _fill_memo(v, need)
        if s is not None:
            append((q >= spill_queue_len, s, q, i))
    keys.sort()
    return keys


def rank(views: Sequence[ReplicaView], need: Need, *, spill_queue_len: int = 4) -> list[Placement]:
    """All replicas that could ever serve ``need``, best first. Empty: fits none of them."""
    views = list(views)
    return [Placement(views[i].replica_id, Rank(r), ev, -neg_idle_s, q, sp)
            for sp, (r, ev, neg_idle_s), q, i in _keys(views, need, spill_queue_len, None)]


def rank_indices(views: Sequence[ReplicaView], need: Need, *, spill_queue_len: int = 4,
                 queue_lens: Sequence[int] | None = None, evict_for_held: bool = True) -> list[int]:
    """The order :func:`rank` gives, as indices into ``views``, less the replicas that should
    not load the checkpoint while another holds it: the router's hot path.

    ``queue_lens`` (one per view) overrides each view's ``queue_len``, so that a cached view
    can be reused while only its queue length moves.

    The holder gate, when some replica holds the checkpoint (device or host): under overload
    the holder's queue fills, and sending the overflow to a replica that loads it (evicting
    its own working set) makes both replicas thrash. So a replica that would have to load
    is kept only if that is expected to finish sooner than waiting for the best holder:
    ``queue x inference_s + (weights + evicted bytes) / disk_load_bytes_per_s`` (the evicted
    bytes are counted once more because what is evicted tends to be loaded back) against
    ``queue x inference_s (+ host reload)`` on the holder. The caller waits (Ray backs off
    and asks again) rather than send it elsewhere. Where either side has no measured times
    yet, the rule is by rank instead: replicas with free room are kept, replicas that must
    evict only once ``evict_for_held`` (the caller has waited long enough, as Ray's
    multiplexing waits a bounded time for a replica holding the model).

    Caveat: the estimate is per replica, not per checkpoint (one mean inference time), and
    assumes the queue ahead runs at that mean.
    """
    keys = _keys(views, need, spill_queue_len, queue_lens)
    if any(k[1][0] <= Rank.ON_HOST for k in keys):
        keys = _gate_for_holders(keys, views, need, evict_for_held)
    return [k[3] for k in keys]


def _holder_wait_s(view: ReplicaView, checkpoint: str, queue_len: int) -> float | None:
    """Expected seconds before a holder could start this request; None: not measured."""
    if view.inference_s <= 0:
        return None
    wait_s = queue_len * view.inference_s
    entry = view.entries.get(checkpoint)
    if entry is not None and entry.tier == "host":
        if view.host_reload_bytes_per_s <= 0:
            return None
        wait_s += entry.bytes / view.host_reload_bytes_per_s
    return wait_s


def _load_elsewhere_s(view: ReplicaView, weights_bytes: int, evicted_bytes: int, queue_len: int) -> float | None:
    """Expected seconds before a non-holder could start it, counting the evicted bytes'
    reload as a cost of this choice; None: not measured."""
    if view.inference_s <= 0 or view.disk_load_bytes_per_s <= 0:
        return None
    return queue_len * view.inference_s + (weights_bytes + evicted_bytes) / view.disk_load_bytes_per_s


def _gate_for_holders(keys: list[tuple], views: Sequence[ReplicaView], need: Need, evict_for_held: bool) -> list[tuple]:
    checkpoint = need.checkpoint
    waits = [_holder_wait_s(views[k[3]], checkpoint, k[2]) for k in keys if k[1][0] <= Rank.ON_HOST]
    best_wait_s = None if None in waits else min(waits)
    kept = []
    for k in keys:
        rank_ = k[1][0]
        if rank_ <= Rank.ON_HOST:
            kept.append(k)
            continue
        v = views[k[3]]
        cost_s = None if best_wait_s is None else _load_elsewhere_s(v, need.at(v.default_dtype)[0], k[1][1], k[2])
        if cost_s is not None:
            if cost_s < best_wait_s:
                kept.append(k)
        elif evict_for_held or rank_ <= Rank.FITS:
            kept.append(k)
    return kept


def largest_budget(views: Sequence[ReplicaView]) -> int:
    return max((v.budget_bytes for v in views), default=0)
