"""Reference implementation of router.placement.rank, written independently (not used by the router).

A proposal with numbers (see bench/placement_speed.py --experiment), written against the
the ranking semantics of router/placement.py (_static) at the time of writing. ``check_equal`` compares
its output with the real rank on the same inputs, so a divergence (e.g. after placement.py
changes) shows up as mismatches in the results instead of silently wrong timings.

What it changes, all per-view work moved out of the per-decision loop:
1. ``prepare(view)`` once per report / ledger / queue change (not per decision): the device
   entry count and the victim order (unpinned most-idle first, pinned last) do not depend on
   the request. (When _static reaches its eviction loop the requested checkpoint is not on
   the device, so excluding it from the victims never removes anything.)
2. Need.at(dtype) once per dtype per decision instead of once per replica.
3. Sort plain key tuples; build Placement objects (frozen dataclass __init__ costs ~1 us
   each) only for the result, or not at all with ``rank_ids`` (the Ray shell only maps
   placements back to replica ids).
"""

from __future__ import annotations

from typing import Sequence

from router.placement import Need, Placement, Rank, ReplicaView

_RANKS = tuple(Rank)


class Prepared:
    __slots__ = ("view", "rid", "entries", "budget", "free", "dtype", "queue", "max_resident", "resident", "victims")

    def __init__(self, view: ReplicaView):
        self.view = view
        self.rid = view.replica_id
        self.entries = view.entries
        self.budget = view.budget_bytes
        self.free = view.budget_bytes - view.used_bytes
        self.dtype = view.default_dtype
        self.queue = view.queue_len
        self.max_resident = view.max_resident
        dev = [e for e in view.entries.values() if e.tier == "device"]
        self.resident = len(dev)
        # Same order as _static's victim order: unpinned before pinned, most idle first, stable;
        # each victim's last-use time on the report's clock.
        self.victims = tuple((e.bytes, view.reported_at_s - e.idle_s, e.in_use > 0)
                             for e in sorted(dev, key=lambda e: (e.in_use > 0, -e.idle_s)))


def prepare(view: ReplicaView) -> Prepared:
    return Prepared(view)


def _keys(prepared: Sequence[Prepared], need: Need, spill_queue_len: int) -> list[tuple]:
    ck = need.checkpoint
    per_dtype: dict[str, tuple[int, int]] = {}
    out = []
    append = out.append
    for i, p in enumerate(prepared):
        wws = per_dtype.get(p.dtype)
        if wws is None:
            wws = per_dtype[p.dtype] = need.at(p.dtype)
        weights, workspace = wws
        spilled = p.queue >= spill_queue_len
        entry = p.entries.get(ck)
        if entry is not None:
            if entry.tier == "device":
                if entry.bytes + workspace <= p.budget:
                    append((spilled, 0, 0, 0.0, p.queue, i, 0.0))
                continue
            if entry.tier == "host":
                rank_, required = 1, entry.bytes + workspace
            else:
                rank_, required = 2, weights + workspace
        else:
            rank_, required = 2, weights + workspace
        if required > p.budget:
            continue
        free, resident, max_res = p.free, p.resident, p.max_resident
        if free >= required and resident < max_res:
            append((spilled, rank_, 0, 0.0, p.queue, i, 0.0))
            continue
        evicted, used_sum, n, busy = 0, 0.0, 0, False
        for nbytes, last_used, pinned in p.victims:
            if free >= required and resident < max_res:
                break
            free += nbytes
            evicted += nbytes
            used_sum += last_used
            n += 1
            resident -= 1
            busy = busy or pinned
        mean_used = used_sum / n if n else 0.0  # victims used longest ago first
        if busy or not (free >= required and resident < max_res):
            append((spilled, 4, evicted, mean_used, p.queue, i, mean_used))
        else:
            append((spilled, 1 if rank_ == 1 else 3, evicted, mean_used, p.queue, i, mean_used))
    out.sort()  # the index i makes the sort stable in view order, as sorted() is in rank()
    return out


def rank_fast(prepared: Sequence[Prepared], need: Need, *, spill_queue_len: int = 4) -> list[Placement]:
    """Same result as router.placement.rank(views, need) for prepared = map(prepare, views)."""
    if spill_queue_len < 1:
        raise ValueError(f"spill_queue_len must be >= 1, got {spill_queue_len}")
    return [Placement(prepared[i].rid, _RANKS[r], ev, used, q, sp)
            for sp, r, ev, _key, q, i, used in _keys(prepared, need, spill_queue_len)]


def rank_ids(prepared: Sequence[Prepared], need: Need, *, spill_queue_len: int = 4) -> list[str]:
    """Replica ids in rank order: all that rank_for needs from a decision."""
    return [prepared[k[5]].rid for k in _keys(prepared, need, spill_queue_len)]


def check_equal(real: list[Placement], fast: list[Placement]) -> bool:
    return [(p.replica_id, p.rank, p.evict_bytes, p.victims_last_used_s, p.queue_len, p.spilled) for p in real] == \
        [(p.replica_id, p.rank, p.evict_bytes, p.victims_last_used_s, p.queue_len, p.spilled) for p in fast]


# ---- vectorized variant (numpy) -------------------------------------------------------------
class VectorRanker:
    """rank() over arrays: per-replica rows updated when a view changes, one numpy pass per need.

    Same result as router.placement.rank (``check_equal``). Row layout per replica i:
    free, budget, resident, max_resident, queue; prefix sums over its victims (in _static's
    order) of bytes, last-use times and "a pinned entry was taken"; and an inverted index
    checkpoint -> (replica, tier, bytes) for the entries in its view.
    """

    def __init__(self, views: Sequence[ReplicaView], max_victims: int | None = None):
        import numpy as np

        self.np = np
        n = len(views)
        vmax = max_victims or max([sum(e.tier == "device" for e in v.entries.values()) for v in views] + [1])
        self.vmax = vmax
        self.rids = [v.replica_id for v in views]
        self.index = {rid: i for i, rid in enumerate(self.rids)}
        self.dtypes: list[str] = []
        i64 = np.int64
        self.budget = np.zeros(n, i64)
        self.free = np.zeros(n, i64)
        self.resident = np.zeros(n, i64)
        self.max_res = np.zeros(n, i64)
        self.queue = np.zeros(n, i64)
        self.dtype_idx = np.zeros(n, np.intp)
        self.nvict = np.zeros(n, i64)
        self.cum_bytes = np.zeros((n, vmax + 1), i64)
        self.cum_used = np.zeros((n, vmax + 1), np.float64)
        self.cum_pinned = np.zeros((n, vmax + 1), bool)
        self.steps = np.arange(vmax + 1, dtype=i64)
        self.order = np.arange(n, dtype=i64)
        self.by_name: dict[str, dict[int, tuple[str, int]]] = {}
        self.names: list[tuple[str, ...]] = [()] * n
        for i, v in enumerate(views):
            self.update(i, v)

    def _widen(self, vmax: int) -> None:
        """More victims than columns (ledger overlays can exceed max_resident): grow the rows."""
        np = self.np
        pad = vmax - self.vmax
        self.cum_bytes = np.concatenate([self.cum_bytes, np.repeat(self.cum_bytes[:, -1:], pad, axis=1)], axis=1)
        self.cum_used = np.concatenate([self.cum_used, np.repeat(self.cum_used[:, -1:], pad, axis=1)], axis=1)
        self.cum_pinned = np.concatenate([self.cum_pinned, np.repeat(self.cum_pinned[:, -1:], pad, axis=1)], axis=1)
        self.vmax = vmax
        self.steps = np.arange(vmax + 1, dtype=np.int64)

    def _dtype(self, d: str) -> int:
        if d not in self.dtypes:
            self.dtypes.append(d)
        return self.dtypes.index(d)

    def update(self, i: int, v: ReplicaView) -> None:
        np = self.np
        dev = [e for e in v.entries.values() if e.tier == "device"]
        if len(dev) > self.vmax:
            self._widen(len(dev))
        self.budget[i] = v.budget_bytes
        self.free[i] = v.budget_bytes - v.used_bytes
        self.resident[i] = len(dev)
        self.max_res[i] = min(v.max_resident, 1 << 62)
        self.queue[i] = v.queue_len
        self.dtype_idx[i] = self._dtype(v.default_dtype)
        vict = sorted(dev, key=lambda e: (e.in_use > 0, -e.idle_s))
        k = len(vict)
        self.nvict[i] = k
        row_b, row_i, row_p = self.cum_bytes[i], self.cum_used[i], self.cum_pinned[i]
        row_b[:] = 0
        row_i[:] = 0.0
        row_p[:] = False
        if k:
            row_b[1:k + 1] = np.cumsum([e.bytes for e in vict])
            # Sequential sums, as _static adds last-use times one victim at a time.
            acc, used = 0.0, []
            for e in vict:
                acc += v.reported_at_s - e.idle_s
                used.append(acc)
            row_i[1:k + 1] = used
            row_p[1:k + 1] = np.cumsum([e.in_use > 0 for e in vict]) > 0
            row_b[k + 1:] = row_b[k]
            row_i[k + 1:] = row_i[k]
            row_p[k + 1:] = row_p[k]
        for name in self.names[i]:
            self.by_name[name].pop(i, None)
        names = []
        for name, e in v.entries.items():
            if e.tier in ("device", "host"):
                self.by_name.setdefault(name, {})[i] = (e.tier, e.bytes)
                names.append(name)
        self.names[i] = tuple(names)

    def rank_ids(self, need: Need, *, spill_queue_len: int = 4) -> list[str]:
        np = self.np
        w_by = np.array([need.at(d)[0] for d in self.dtypes], np.int64)
        ws_by = np.array([need.at(d)[1] for d in self.dtypes], np.int64)
        ws = ws_by[self.dtype_idx]
        required = w_by[self.dtype_idx] + ws
        rank_ = np.full(len(self.rids), 2, np.int64)
        on_device = []
        for i, (tier, nbytes) in self.by_name.get(need.checkpoint, {}).items():
            if tier == "device":
                on_device.append(i)
            else:
                rank_[i] = 1
                required[i] = nbytes + ws[i]
        eligible = required <= self.budget
        ok = ((self.free[:, None] + self.cum_bytes) >= required[:, None]) \
            & ((self.resident[:, None] - self.steps) < self.max_res[:, None]) \
            & (self.steps <= self.nvict[:, None])
        found = ok.any(axis=1)
        k = np.where(found, ok.argmax(axis=1), self.nvict)
        rows = self.order
        evicted = self.cum_bytes[rows, k]
        used = self.cum_used[rows, k] / np.maximum(k, 1)  # victims' mean last use (0.0: none)
        busy = self.cum_pinned[rows, k] | ~found
        final = np.where(busy, 4, np.where(k == 0, rank_, np.where(rank_ == 1, 1, 3)))
        for i in on_device:
            ok_dev = self.by_name[need.checkpoint][i][1] + ws[i] <= self.budget[i]
            eligible[i] = ok_dev
            final[i], evicted[i], used[i] = 0, 0, 0.0
        spilled = self.queue >= spill_queue_len
        sel = np.flatnonzero(eligible)
        order = np.lexsort((sel, self.queue[sel], used[sel], evicted[sel], final[sel], spilled[sel]))
        rids = self.rids
        return [rids[j] for j in sel[order].tolist()]
