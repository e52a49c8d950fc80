"""Pure placement: rank replicas for one request from their memory reports.

No ray, no torch: the Ray shell (router/request_router.py) turns running replicas into
:class:`ReplicaView` and calls :func:`rank`.

Ranking (lower is better), per the design:
  1. the checkpoint is resident on the replica's device,
  2. resident in the replica's host RAM,
  3. fits in the replica's free device budget,
  4. fits after evicting idle entries: fewest bytes evicted, then the victims used
     longest ago (the earliest mean last-use time),
  5. needs entries that are in use right now evicted: it waits for them, then evicts,
  6. can never fit (bigger than the replica's budget) -- not returned.
Queue length breaks ties (for holders with measured times, the expected wait: see
rank_indices). A replica whose queue is at or above ``spill_queue_len`` is ranked after
every replica below it, so a hot checkpoint spreads to a second replica only when the
first one is busy.
"""

from __future__ import annotations

import enum
import struct
from bisect import bisect_left
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Mapping, NamedTuple, Sequence


class Rank(enum.IntEnum):
    ON_DEVICE = 0
    ON_HOST = 1
    FITS = 2
    EVICT = 3
    BUSY = 4


# Rank values as plain ints for the hot paths: an enum member lookup (Rank.FITS) costs
# about 120 ns on CPython 3.11, and scoring a view took several.
_ON_DEVICE, _ON_HOST, _FITS, _EVICT, _BUSY = (int(r) for r in Rank)


_IDLE_S = attrgetter("idle_s")


class _lazy:
    """functools.cached_property without its lock: CPython 3.11 takes an RLock on every
    first access, which doubled the cost of scoring a new view. A race computes the same
    value twice (the views are immutable), which is harmless."""

    def __init__(self, fn):
        self.fn, self.name, self.__doc__ = fn, fn.__name__, fn.__doc__

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        value = obj.__dict__[self.name] = self.fn(obj)
        return value


@dataclass(frozen=True, slots=True)
class EntryView:
    tier: str  # "device" | "host"
    bytes: int
    idle_s: float = 0.0
    in_use: int = 0
    # On the device in the books but still being loaded there (the ledger's placements not
    # yet in a report, or a report's entry mid-load): a request for it waits for the load.
    # Where from: "disk" or "host" ("": not loading).
    loading: str = ""


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
    # The report's own clock (its timestamp_s): an entry was last used at reported_at_s -
    # idle_s. Victims are compared by that time, not by idle_s: reports arrive at different
    # times, and a last-use time stays true as time passes, so a view built from an older
    # report of an unchanged replica ranks as one built from its newest (request_router
    # keeps such views). Caveat: an entry in use reports idle 0 (in use now), so in a kept
    # view its last use is the older report's time; it only orders BUSY replicas.
    reported_at_s: float = 0.0

    @_lazy
    def device_entries(self) -> list[EntryView]:
        """The entries on the device, in report order. Host entries are most of a large
        catalog's (bench/sim: 65 entries, 8 on the device), and three readers walk these."""
        return [e for e in self.entries.values() if e.tier == "device"]

    @_lazy
    def resident_count(self) -> int:
        # Not from evict_plan: most answers need only the count, and the plan costs a sort.
        return len(self.device_entries)

    @_lazy
    def evict_plan(self) -> tuple[list[int], list[float], int, list[int | None]]:
        """The eviction order as running sums, for every need at once: (bytes freed by the
        first n victims, the sum of their last-use times on the report's clock, for n =
        0..device entries; how many victims are idle; per n, the sort key's eviction fields
        once some need has asked for them, else None: see _evicting). Victims are the device entries, idle
        before in use, most idle first (the cache's LRU order), ties in report order. A need
        evicts the shortest prefix that makes room, so each size class scores a view by
        bisection instead of a walk over its entries; the sums are added in victim order,
        as such a walk would add them (the same floats)."""
        idle, busy = [], []
        for e in self.device_entries:
            (busy if e.in_use > 0 else idle).append(e)
        # reverse=True keeps equal keys in their original order (Python's sort is stable both ways).
        idle.sort(key=_IDLE_S, reverse=True)
        busy.sort(key=_IDLE_S, reverse=True)
        at = self.reported_at_s
        freed, used, f, u = [0], [0.0], 0, 0.0
        for group in (idle, busy):
            for e in group:
                f += e.bytes
                u += at - e.idle_s
                freed.append(f)
                used.append(u)
        return freed, used, len(idle), [None] * len(freed)

    # Need.memo_key -> this view's queue-independent answer to a need for a checkpoint it
    # holds (a placement._Score, or None: never fits); Need.size_key -> the answer to a need
    # for a checkpoint it does not hold, which depends on the sizes alone (fine-tunes of
    # one architecture share them). Private to placement; per view (dataclasses.replace
    # starts them empty), never shared.
    score_memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)
    size_memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def with_entries(self, entries: Mapping[str, EntryView], used_bytes: int) -> "ReplicaView":
        """This view with other entries and used bytes, memos empty: dataclasses.replace
        without its walk over the fields (the ledger overlays a view per placement). A test
        holds it equal to dataclasses.replace for every field."""
        return ReplicaView(self.replica_id, self.budget_bytes, used_bytes, self.default_dtype, entries,
                           self.queue_len, self.max_resident, self.inference_s, self.disk_load_bytes_per_s,
                           self.host_reload_bytes_per_s, self.reported_at_s)


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

    @_lazy
    def memo_key(self) -> str:
        """This need's figures at every dtype as one string: equal needs give equal keys, and
        a str caches its hash, so one decision's lookups in every view's memo hash it once."""
        return repr((self.checkpoint, sorted(self.weights_bytes.items()), sorted(self.workspace_bytes.items())))

    @_lazy
    def size_key(self) -> str:
        """:attr:`memo_key` without the checkpoint name."""
        return repr((sorted(self.weights_bytes.items()), sorted(self.workspace_bytes.items())))


@dataclass(frozen=True)
class Placement:
    replica_id: str
    rank: Rank
    evict_bytes: int
    victims_last_used_s: float  # mean last-use time of the victims, on the report's clock (0.0: none)
    queue_len: int
    spilled: bool


_MISS = object()
_MEMO_MAX = 4096  # distinct needs remembered per view; a view lives about one report period

# A decision sorts one int per replica instead of nested tuples: at 256 replicas the sort
# took about 150 us with tuples and about 20 us with ints (CPython 3.11, bench machine).
# The int orders exactly as the tuple
# (spilled, later, rank, evict bytes, victims' mean last-use s, queue length, view index) would:
#   bit 256          spilled (queue at or above spill_queue_len; see _timed_holder_key)
#   bit 255          later: set by rank_indices's holder gate, once the holders' times are
#                    measured, on every replica not expected to start the request sooner
#                    than the best holder (see rank_indices)
#   bits 192..194    rank
#   bits 128..191    evict bytes
#   bits 64..127     victims' mean last-use s, as an ordered 64-bit image of the float
#   bits 32..63      queue length (a holder with measured times: its expected wait in ms)
#   bits 0..31       index into the views
_FIELD_BITS = 32
_FIELD_MASK = (1 << _FIELD_BITS) - 1
_U64 = (1 << 64) - 1
_SPILLED = 1 << 256
_LATER = 1 << 255
_DOUBLE = struct.Struct("<d")
_UINT64 = struct.Struct("<Q")


def _ordered_u64(x: float) -> int:
    """An unsigned 64-bit int that orders as the float does (IEEE 754: set the sign bit of
    positives, flip every bit of negatives). NaN has no place in the order."""
    if x == 0.0:
        x = 0.0  # -0.0 == 0.0 as floats (and in tuples): give them one image
    (b,) = _UINT64.unpack(_DOUBLE.pack(x))
    return (b ^ _U64) if b >> 63 else (b | (1 << 63))


_new_tuple = tuple.__new__  # a NamedTuple's own __new__ is a Python function: slower

# A _Score.base is (rank << _RANK_SHIFT) | fields, the fields being (evict bytes << 128) |
# (image of the victims' mean last use << 64). The common case, nothing to evict, needs no
# float-to-int image.
_RANK_SHIFT = 192
_NO_EVICTION_FIELDS = _ordered_u64(0.0) << 64
_BASE_NO_EVICTION = tuple((r << _RANK_SHIFT) | _NO_EVICTION_FIELDS for r in range(len(Rank)))


def _rank_floor(rank_: int) -> int:
    """The smallest static base (a _Score.base) of a rank: for indexes kept in base order."""
    return rank_ << _RANK_SHIFT


class _Score(NamedTuple):
    """One view's answer to one need, remembered in its score_memo (a tuple: cheap to
    build on the misses that follow every new report)."""

    base: int  # the sort key's static fields (rank, evict bytes, victims' last use), shifted in place
    rank: int  # a Rank as a plain int: enum members are slow to compare in the hot loops
    evict_bytes: int
    last_used_s: float  # victims' mean last-use time; 0.0 without victims
    # Seconds this replica adds before it could start the request, besides its queue:
    # a holder's host reload (0.0 on the device), a non-holder's disk load of the weights
    # and of what it evicts. None: the replica has not measured its times yet.
    fixed_s: float | None


def _static(view: ReplicaView, checkpoint: str, weights: int, workspace: int) -> tuple | None:
    """The part of a replica's sort key that does not move with its queue: (rank, the sort
    key's eviction fields, evict bytes, victims' mean last-use s), the rank a plain int (see
    _evicting); None when the need can never fit the budget.

    Resident on the device ranks first whatever the free bytes: the replica runs one
    pipeline at a time and finds workspace room at acquire time, and ``in_use`` in a
    report is stale by up to a period. Otherwise idle entries are evicted most idle first
    (the cache's LRU order); needing entries that are in use ranks BUSY (wait, then evict).
    Between replicas that evict the same bytes, the one whose victims were used longest
    ago on average goes first: a mean of last-use times orders the same at every instant
    (a sum of idle times would not, for different victim counts), so it does not depend on
    when each report was made.
    """
    entry = view.entries.get(checkpoint)
    if entry is not None and entry.tier == "device":
        if entry.bytes + workspace > view.budget_bytes:
            return None
        return (_ON_DEVICE, _NO_EVICTION_FIELDS, 0, 0.0)
    if entry is not None and entry.tier == "host":
        rank_, required = _ON_HOST, entry.bytes + workspace
    else:
        rank_, required = _FITS, weights + workspace
    budget = view.budget_bytes
    if required > budget:
        return None
    if budget - view.used_bytes >= required and view.resident_count < view.max_resident:
        return (rank_, _NO_EVICTION_FIELDS, 0, 0.0)
    return _evicting(view, rank_, required)


def _evicting(view: ReplicaView, rank_: int, required: int) -> tuple[int, int, int, float]:
    """(rank, the sort key's eviction fields, evict bytes, victims' mean last-use s) of a
    replica that must evict to find ``required`` bytes (it has less free, or no free entry
    slot under ``max_resident``); a _Score.base is ``(rank << _RANK_SHIFT) | fields``.

    The requested checkpoint is not on this device here, so every device entry is a
    candidate victim, taken in victim order: the shortest prefix that frees enough bytes
    and leaves an entry slot. BUSY when that prefix has an entry in use, or when evicting
    every entry is not enough (a report is stale by up to a period: it may be by then).
    A view has a handful of prefixes and many needs (size classes) ask for the same one, so
    each prefix's fields (a float-to-int image and shifts) are built once per view."""
    freed, used, idle, fields = view.evict_plan
    victims = len(freed) - 1  # every device entry: resident_count
    n = bisect_left(freed, required - (view.budget_bytes - view.used_bytes))
    over = victims - view.max_resident + 1  # victims the entry-count cap needs
    if over > n:
        n = over
    if n > victims:
        n, rank_ = victims, _BUSY
    else:
        assert n > 0, "_evicting called for a need that fits without evicting: this is a bug"
        if n > idle:
            rank_ = _BUSY
        elif rank_ != _ON_HOST:  # reloading from host keeps its rank: cheaper than any disk load
            rank_ = _EVICT
    evicted, mean_used_s = freed[n], used[n] / n if n else 0.0
    f = fields[n]
    if f is None:
        assert 0 <= evicted <= _U64, f"evict bytes {evicted} out of range: this is a bug"
        f = fields[n] = ((evicted << 64) | _ordered_u64(mean_used_s)) << 64
    return rank_, f, evicted, mean_used_s


def _fixed_s(view: ReplicaView, checkpoint: str, rank_: int, weights: int, evicted: int) -> float | None:
    if view.inference_s <= 0:
        return None
    if rank_ == _ON_DEVICE:
        entry = view.entries[checkpoint]
        if not entry.loading:
            return 0.0
        # The load's whole time, a bound from above of what is left of it (when it started
        # is not known here): a holder still loading was taken for a free one, and a burst
        # queued on it (bench/sim seed 4). At the speed of where it loads from.
        bps = view.host_reload_bytes_per_s if entry.loading == "host" else view.disk_load_bytes_per_s
        return entry.bytes / bps if bps > 0 else None
    if rank_ == _ON_HOST:
        bps = view.host_reload_bytes_per_s
        return view.entries[checkpoint].bytes / bps if bps > 0 else None
    bps = view.disk_load_bytes_per_s
    return (weights + evicted) / bps if bps > 0 else None


def _fill_memo(view: ReplicaView, need: Need, memo: dict, key: str) -> _Score | None:
    if len(memo) >= _MEMO_MAX:
        memo.clear()
    s = memo[key] = _new_score(view, need)
    return s


def _new_score(view: ReplicaView, need: Need) -> _Score | None:
    weights, workspace = need.at(view.default_dtype)
    if need.checkpoint not in view.entries:
        return _size_score(view, weights, weights + workspace)
    st = _static(view, need.checkpoint, weights, workspace)
    if st is None:
        return None
    rank_, fields, evicted, last_used_s = st
    return _new_tuple(_Score, ((rank_ << _RANK_SHIFT) | fields, rank_, evicted, last_used_s,
                               _fixed_s(view, need.checkpoint, rank_, weights, evicted)))


def _size_score(view: ReplicaView, weights: int, required: int) -> _Score | None:
    """The score of a replica with no entry for the checkpoint (a non-holder), from the
    sizes alone: ``weights`` and ``required`` (weights + workspace) bytes at the view's
    dtype. What _new_score gives for it, without the general path's calls: a size class
    re-scores every changed view, and most of the decision's time went there."""
    budget = view.budget_bytes
    if required > budget:
        return None
    bps = view.disk_load_bytes_per_s
    measured = view.inference_s > 0 and bps > 0  # _fixed_s's conditions
    if budget - view.used_bytes >= required and view.resident_count < view.max_resident:
        return _new_tuple(_Score, (_BASE_NO_EVICTION[_FITS], _FITS, 0, 0.0, weights / bps if measured else None))
    rank_, fields, evicted, last_used_s = _evicting(view, _FITS, required)
    return _new_tuple(_Score, ((rank_ << _RANK_SHIFT) | fields, rank_, evicted, last_used_s,
                               (weights + evicted) / bps if measured else None))


def _same_size_scores(a: ReplicaView, b: ReplicaView) -> bool:
    """Whether every _size_score of view ``b`` equals view ``a``'s. What the holder gate
    reads of a non-holder's view besides its score (inference_s) is read from the newest
    view, so only whether it is measured counts here.

    The inputs are compared, not the scores: views of one replica often differ only where no
    size score looks (bench/sim: 37% of the view changes, nearly all an entry's in-use count
    moving while its busy state did not). Keep in step with _size_score, _evicting and
    ReplicaView.evict_plan."""
    if a.budget_bytes != b.budget_bytes or a.used_bytes != b.used_bytes or a.max_resident != b.max_resident \
            or a.default_dtype != b.default_dtype or (a.inference_s > 0) != (b.inference_s > 0) \
            or a.disk_load_bytes_per_s != b.disk_load_bytes_per_s or a.reported_at_s != b.reported_at_s:
        return False
    # The device entries in report order (evict_plan keeps it for ties): their count, sizes,
    # last use and whether in use. Names, host entries and in-use counts do not matter.
    ea, eb = a.device_entries, b.device_entries
    if len(ea) != len(eb):
        return False
    for x, y in zip(ea, eb):
        if x is not y and (x.bytes != y.bytes or x.idle_s != y.idle_s or (x.in_use > 0) != (y.in_use > 0)):
            return False
    return True


def _scored(views: Sequence[ReplicaView], need: Need, spill_queue_len: int,
            queue_lens: Sequence[int] | None) -> tuple[list[int], list[_Score], Sequence[int], list[int]]:
    """(sort keys, scores, queue lengths, holders) of every replica that could ever serve
    ``need``, in view order; the key's low bits are the view's index, so ties keep view
    order. Holders: the positions in keys and scores of the replicas that hold the
    checkpoint on their device or host."""
    if spill_queue_len < 1:
        raise ValueError(f"spill_queue_len must be >= 1, got {spill_queue_len}")
    if queue_lens is None:
        queue_lens = [v.queue_len for v in views]
    elif len(queue_lens) != len(views):
        raise ValueError(f"queue_lens has {len(queue_lens)} entries for {len(views)} views; pass one per view or None")
    if len(views) > _FIELD_MASK:
        raise ValueError(f"at most {_FIELD_MASK} views per decision, got {len(views)}")
    if queue_lens and not 0 <= min(queue_lens) <= max(queue_lens) <= _FIELD_MASK:
        raise ValueError(f"queue lengths must be in [0, {_FIELD_MASK}], got {min(queue_lens)}..{max(queue_lens)}")
    checkpoint, memo_key, size_key = need.checkpoint, need.memo_key, need.size_key
    keys: list[int] = []
    scores: list[_Score] = []
    held: list[int] = []
    add_key, add_score = keys.append, scores.append
    # The hot loop of every decision: two dict lookups and one int per replica. A view
    # that does not hold the checkpoint answers from the sizes alone (its size_memo):
    # every new report brings new views with empty memos, and a large catalog brings names
    # a view has not seen, but fine-tunes of one architecture share their sizes.
    for i, (v, q) in enumerate(zip(views, queue_lens)):
        if checkpoint in v.entries:
            s = v.score_memo.get(memo_key, _MISS)
            if s is _MISS:
                s = _fill_memo(v, need, v.score_memo, memo_key)
            if s is not None and s.rank <= _ON_HOST:
                held.append(len(keys))
        else:
            s = v.size_memo.get(size_key, _MISS)
            if s is _MISS:
                s = _fill_memo(v, need, v.size_memo, size_key)
        if s is not None:
            add_key((s.base | (q << _FIELD_BITS) | i) if q < spill_queue_len
                    else (s.base | (q << _FIELD_BITS) | i | _SPILLED))
            add_score(s)
    return keys, scores, queue_lens, held


def rank(views: Sequence[ReplicaView], need: Need, *, spill_queue_len: int = 4) -> list[Placement]:
    """All replicas that could ever serve ``need``, best first. Empty: fits none of them."""
    views = list(views)
    keys, scores, queue_lens, _ = _scored(views, need, spill_queue_len, None)
    out = []
    for k, s in sorted(zip(keys, scores)):  # keys are unique (they end in the view index)
        i = k & _FIELD_MASK
        q = queue_lens[i]
        out.append(Placement(views[i].replica_id, Rank(s.rank), s.evict_bytes, s.last_used_s, q, q >= spill_queue_len))
    return out


def rank_indices(views: Sequence[ReplicaView], need: Need, *, spill_queue_len: int = 4,
                 queue_lens: Sequence[int] | None = None, evict_for_held: bool = True,
                 backlog: int = 0) -> list[int]:
    """The order :func:`rank` gives, as indices into ``views``, less the replicas that should
    not load the checkpoint while another holds it: the router's hot path.

    ``queue_lens`` (one per view, each in [0, 2**32)) overrides each view's ``queue_len``,
    so that a cached view can be reused while only its queue length moves.

    The holder gate, when some replica holds the checkpoint (device or host): under overload
    the holder's queue fills, and sending the overflow to a replica that loads it (evicting
    its own working set) makes both replicas thrash. So a replica that would have to load
    is kept only if that is expected to finish sooner than waiting for the best holder:
    ``queue x inference_s + (weights + evicted bytes) / disk_load_bytes_per_s`` (the evicted
    bytes are counted once more because what is evicted tends to be loaded back) against
    ``queue x inference_s (+ host reload)`` on the holder, plus ``backlog``: the requests for
    the checkpoint that wait ahead of this one at the router, drained at the holders' summed rates (a
    replica's queue length stops at max_ongoing_requests, so under a burst the queues alone
    said the holders would be free soon while hundreds of requests waited for them: bench/sim
    seeds 2 and 4). The caller waits (Ray backs off and asks again) rather than send it
    elsewhere. Where either side has no measured times
    yet, the rule is by rank instead: replicas with free room are kept, replicas that must
    evict only once ``evict_for_held`` (the caller has waited long enough, as Ray's
    multiplexing waits a bounded time for a replica holding the model).

    Sooner first: once every holder on its device or host has measured times, a replica
    that would start the request sooner than the best holder by more than its load takes
    (``queue x inference_s + 2 x load < best wait``; not one that ranks BUSY, whose wait for
    entries in use is not in the estimate) ranks before the holders and every other replica
    (those carry the key's ``later`` bit); each group in the order above: by rank, then
    queue, not by expected start. A holder whose queue makes a load elsewhere that much
    quicker so stops taking the checkpoint's requests before its queue reaches
    ``spill_queue_len``. See _SOONER_LOAD_FACTOR for what it did in the simulator.

    Holders by wait: once every holder on its device or host has measured times, those
    holders order by expected wait (``queue x inference_s``) instead of queue length, and
    are past the spill line once that wait reaches ``spill_queue_len`` requests at the
    fastest holder's time (see _timed_holder_key). :func:`rank` (no times) keeps the order
    by queue length.

    Caveat: the estimate is per replica, not per checkpoint (one mean inference time), and
    assumes the queue ahead runs at that mean.
    """
    if backlog < 0:
        raise ValueError(f"backlog must be >= 0, got {backlog}")
    keys, scores, queue_lens, held = _scored(views, need, spill_queue_len, queue_lens)
    if held and all(scores[j].fixed_s is not None for j in held):  # timed holders: by expected wait
        indices = [keys[j] & _FIELD_MASK for j in held]
        timed_keys, best_wait_s = _timed_holders(
            [(scores[j], queue_lens[i], views[i], i) for j, i in zip(held, indices)], spill_queue_len, backlog)
        for j, key in zip(held, timed_keys):
            keys[j] = key
    else:
        best_wait_s = _best_wait_s(((scores[j], queue_lens[keys[j] & _FIELD_MASK], views[keys[j] & _FIELD_MASK])
                                    for j in held), backlog)
    if held and (best_wait_s is not None or not evict_for_held):  # else the gate keeps every replica
        # Filtering before the sort: under load most non-holders drop out here.
        keys = _gate(keys, scores, views, queue_lens, best_wait_s, evict_for_held)
    keys.sort()
    return [k & _FIELD_MASK for k in keys]


_INF = float("inf")


def _best_wait_s(held, backlog: int = 0) -> float | None:
    """The holder gate's best wait over (score, queue length, view) of the holders on their
    device or host: the least ``queue x inference_s + fixed_s``, plus ``backlog`` requests
    for the checkpoint waiting ahead of this one at the router (not yet in any replica's
    queue, which holds at most max_ongoing_requests), drained at the holders' summed rates
    (the sum of 1 / inference_s); None once one of them has no measured times (the gate
    then goes by rank); inf for none.

    Summed rates, not the fastest holder's rate times their count: a slow holder drains
    the backlog at its own pace, and the fastest holder's figure made the backlog look
    cleared sooner than it could be, so a burst stayed on its holders while every other
    replica could have loaded it (bench/sim, policy a, seeds 1 to 8: p99 median 72.2 ->
    65.8 s, seed 4 96.6 -> 80.4 s, no seed worse). Each holder's rate is its mean over
    every checkpoint it served (the caveat of rank_indices)."""
    best = _INF
    rate = 0.0
    for s, q, v in held:
        fixed_s = s.fixed_s
        if fixed_s is None:
            return None
        inference_s = v.inference_s
        wait_s = q * inference_s + fixed_s
        if wait_s < best:  # min() without its call: this runs per holder per decision
            best = wait_s
        rate += 1.0 / inference_s  # > 0 here: _fixed_s is None for a view without it
    if backlog and rate:
        best += backlog / rate
    return best


def _timed_holders(held: list[tuple[_Score, int, "ReplicaView", int]], spill_queue_len: int,
                   backlog: int) -> tuple[list[int], float]:
    """(sort keys, best wait) of the holders on their device or host, given as (score, queue
    length, view, index) in index order, when every one has measured times: the keys by
    _timed_holder_key, with the spill line at ``spill_queue_len`` requests at the fastest
    holder's inference time, and the best wait as _best_wait_s gives it (the same floats
    in the same order). rank_indices and FleetIndex.rank both take them from here."""
    line_s = spill_queue_len * min(v.inference_s for _, _, v, _ in held)
    keys = []
    best = _INF
    rate = 0.0
    for s, q, v, i in held:
        inference_s = v.inference_s
        wait_s = q * inference_s + s.fixed_s
        if wait_s < best:
            best = wait_s
        rate += 1.0 / inference_s
        keys.append(_timed_holder_key(s.base, q, inference_s, i, line_s))
    if backlog and rate:
        best += backlog / rate
    return keys, best


def _timed_holder_key(base: int, queue_len: int, inference_s: float, index: int, line_s: float) -> int:
    """The sort key of a holder on its device or host once every such holder has measured
    times: ordered by its expected wait (``queue x inference_s``, in ms) instead of its queue
    length, and past the spill line once that wait reaches ``line_s`` (so, at least, from
    ``spill_queue_len`` requests on). By queue length alone a slow holder (an L4 at 25 s a
    Flux image) with 3 queued placed before a fast one (an H100 at 5 s) with 4, and before
    any replica that would load the checkpoint: a burst queued up to max_ongoing_requests
    deep on it (bench/sim seed 5: 130 s in one replica's queue). Policy a, seeds 1 to 8: p99
    median 65.8 -> 64.4 s, lower on 6 seeds (seed 4: 80.4 -> 67.9 s), higher on seeds 2 and 8
    (64.4 -> 66.5, 59.7 -> 62.3 s); p50 lower on 5, the same on the other 3."""
    wait_s = queue_len * inference_s
    key = base | (min(int(wait_s * 1000.0), _FIELD_MASK) << _FIELD_BITS) | index
    return key | _SPILLED if wait_s >= line_s else key


def _gate(keys: list[int], scores: list[_Score], views: Sequence[ReplicaView], queue_lens: Sequence[int],
          best_wait_s: float | None, evict_for_held: bool) -> list[int]:
    """The holder gate of rank_indices: the keys of the replicas it keeps, in view order,
    with the ``later`` bit set where it applies (see rank_indices: sooner first)."""
    kept = []
    add = kept.append
    later = 0 if best_wait_s is None else _LATER
    for k, s in zip(keys, scores):
        if s.rank <= _ON_HOST:  # inline: most keys under load are holders or fail the first test
            add(k | later)
        else:
            i = k & _FIELD_MASK
            if _keep(s, queue_lens[i], views[i], best_wait_s, evict_for_held):
                add(k | _later(s, queue_lens[i], views[i], best_wait_s))
    return kept


# Sooner first asks a load elsewhere to save more time than the load costs: the replica's
# own time spent loading is time its later requests wait for. bench/sim, policy a, seeds 1
# to 8, against the spill rule alone: with 1 (start sooner at all) p50 fell 11 to 32% and
# p99 rose in 5 of 8 seeds (up to 38%) for 18 to 31% more GPU-s loading; with 2, p50 fell
# 13 to 23%, p99 moved from -22% to +25% (4 better, 4 worse), loading rose 6 to 14%.
# A power of two, so that factor x fixed_s is exact: FleetIndex finds every replica with
# factor x fixed_s < wait among those with fixed_s <= fl(wait / factor) (a bisection;
# rounding is monotone, so this holds where the division rounds too), then tests each.
_SOONER_LOAD_FACTOR = 2.0


def _later(s: _Score, queue_len: int, view: ReplicaView, best_wait_s: float | None) -> int:
    """The ``later`` bit of a replica that must load and that the holder gate kept: not set
    when, both sides measured, it would start the request sooner than the best holder by
    more than its load takes (``queue x inference_s + 2 x fixed_s < best wait``). Set for
    one that ranks BUSY: its fixed_s leaves out the wait for its entries in use (reported
    with up to a period's delay), so it is not known to be sooner."""
    if best_wait_s is None:
        return 0
    return 0 if _sooner(s, queue_len, view, best_wait_s) else _LATER


def _sooner(s: _Score, queue_len: int, view: ReplicaView, best_wait_s: float) -> bool:
    fixed_s = s.fixed_s
    return fixed_s is not None and s.rank < _BUSY and \
        queue_len * view.inference_s + _SOONER_LOAD_FACTOR * fixed_s < best_wait_s


def _keep(s: _Score, queue_len: int, view: ReplicaView, best_wait_s: float | None, evict_for_held: bool) -> bool:
    """One replica's verdict at the holder gate (see rank_indices)."""
    rank_, fixed_s = s.rank, s.fixed_s
    if rank_ <= _ON_HOST:
        return True
    if best_wait_s is None or fixed_s is None:
        return evict_for_held or rank_ <= _FITS
    # Cheap test first: the queue only adds to it.
    return fixed_s < best_wait_s and queue_len * view.inference_s + fixed_s < best_wait_s
