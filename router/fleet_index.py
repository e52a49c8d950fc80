"""FleetIndex: rank_indices for a fleet whose views change a few at a time, sub-linear per decision.

:func:`router.placement.rank_indices` is stateless: every decision visits every view (two
dict lookups and one int per replica, then a sort). At 256 replicas that loop is most of a
decision. FleetIndex keeps, per size class (``Need.size_key``: fine-tunes of one
architecture share it), every replica's answer for a checkpoint it does not hold, sorted by
the part of the sort key that does not move with queues. A decision then scores the
holders of the checkpoint (an index by name), stops there when ``limit`` of them on their
device or host are below the spill line, and else walks that sorted list only until it has
``limit`` places: what :func:`rank_indices` gives, cut to its first ``limit`` (ties, as
there, by queue length then slot). Queue lengths are read only where the walk goes, and at
the replicas whose load time could make them sooner than the best holder (below).

Upkeep is lazy: :meth:`set_view` appends the slot to a change log, and a size class re-sorts
only the slots changed since it was last asked for, on its next decision, less those whose
change no size score reads (placement._same_size_scores: an in-use count that moved, a host
entry). Under a timed holder gate the replicas that would start the request sooner than the
best holder are found by their load times (a stretch of the class's second list, by
``fixed_s``), not by a walk.

Caveats:
- A decision still costs O(replicas) when few replicas qualify: when most are spilled
  (queue at or above ``spill_queue_len``) or dropped by the holder gate, the walk reaches
  the end of the list. It costs O(holders) dict lookups for a checkpoint many replicas hold.
- ``limit`` trades the tail of the order for speed: the Ray shell sends to the first place
  with queue room and backs off when none of the ``limit`` has room, as when none at all has.
- Among more than ``tie_window`` equal replicas the queue order is exact only within a
  rotating window (see :meth:`FleetIndex.rank`).
"""

from __future__ import annotations

import struct
from bisect import bisect_left, insort
from typing import Sequence

from router.placement import (_BUSY, _FIELD_BITS, _FIELD_MASK, _FITS, _LATER, _MISS, _ON_HOST,
                              _SOONER_LOAD_FACTOR, _SPILLED, Need, ReplicaView, _best_wait_s, _fill_memo, _gate, _keep,
                              _later, _rank_floor, _same_size_scores, _Score, _size_score, _sooner, _timed_holders)

_MAX_CLASSES = 512  # size classes kept; past it all are dropped and rebuilt on use


class _Class:
    """Views' static answers to one need, kept sorted. A size class (``holders_of`` None)
    answers for a checkpoint nobody holds, over every slot; a holder class answers for
    the checkpoint ``holders_of``, over the slots whose view has an entry for it."""

    __slots__ = ("holders_of", "memo_key", "order", "by_fixed", "fixed_keys", "scores", "log_pos",
                 "required")

    def __init__(self, need: Need, holders_of: str | None):
        self.holders_of = holders_of
        # Holder classes keep their scores in the views' score_memo too (shared with
        # rank_indices, so neither scores twice). A size class scores a view once per
        # change and keeps the score here: a memo would not be read again.
        self.memo_key = need.memo_key
        # static base | slot, ascending, of the slots that can fit: ints sort as the
        # (base, slot) pairs would (a base's low 64 bits are 0), and compare faster.
        self.order: list[int] = []
        # Size classes only: (_fixed_image(fixed_s) << 32) | slot of the same slots, ascending.
        # Under the holder gate a non-holder is kept only below the best holder's wait, so
        # the candidates are a prefix of this list, often a short one (bench/sim: median
        # 36 of 243).
        self.by_fixed: list[int] = []
        self.fixed_keys: dict[int, int] = {}  # slot -> its by_fixed entry (removal needs no float image)
        self.required: dict[str, tuple[int, int]] = {}  # dtype -> (weights, weights + workspace) bytes
        self.scores: list[_Score | None] = []  # by slot (None: never fits, not a member, or empty)
        self.log_pos = -1  # absolute change-log position synced up to (-1: never built)


class FleetIndex:
    """Views by slot (0..n-1, the caller's stable numbering), kept across decisions.

    Not thread-safe: one router event loop owns it, as it owns the ledger.
    """

    def __init__(self, tie_window: int = 256) -> None:
        """``tie_window``: members of one group of equal replicas ranked by queue length per
        decision (see :meth:`rank`); a group this size or smaller is ranked exactly. 256:
        exact for fleets of up to 256 replicas (bench/sim: a rotating window of 64 there
        changed outcomes and was slower); bounded reads of Ray's queue cache beyond, but
        for the replicas sooner than the best holder, found by their load times (see
        :meth:`_sooner_bounds`)."""
        if tie_window < 1:
            raise ValueError(f"tie_window must be >= 1, got {tie_window}")
        self._tie_window = tie_window
        self._views: list[ReplicaView | None] = []
        self._holders: dict[str, set[int]] = {}  # checkpoint -> slots whose view has an entry for it
        self._classes: dict[str, _Class] = {}  # Need.size_key -> size class
        self._holder_classes: dict[str, _Class] = {}  # Need.memo_key -> holder class
        self._log: list[int] = []  # slots changed, oldest first (~slot: no size score changed)
        self._log_start = 0  # absolute position of _log[0]
        self._turn = 0  # rotates where a walk of a large tie group starts

    def __len__(self) -> int:
        return len(self._views)

    def set_view(self, slot: int, view: ReplicaView | None) -> None:
        """Put ``view`` at ``slot`` (None empties it). Cheap: classes catch up on their next use."""
        if slot < 0:
            raise ValueError(f"slot must be >= 0, got {slot}")
        views = self._views
        if slot >= len(views):
            views.extend([None] * (slot + 1 - len(views)))
        old = views[slot]
        if old is view:
            return
        # The holder index follows the names that came or went (usually none: a new report
        # or placement mostly changes sizes, idle times and use counts).
        old_names = old.entries.keys() if old is not None else ()
        new_names = view.entries.keys() if view is not None else ()
        holders = self._holders
        for name in (old_names - new_names if old is not None and view is not None else old_names):
            held = holders.get(name)
            if held is not None:
                held.discard(slot)
                if not held:
                    del holders[name]
        for name in (new_names - old_names if old is not None and view is not None else new_names):
            held = holders.get(name)
            if held is None:
                holders[name] = {slot}
            else:
                held.add(slot)
        views[slot] = view
        log = self._log
        # ~slot (negative): the change leaves every size score as it was, so size classes
        # pass it over; holder classes (scores per checkpoint) read every entry.
        log.append(~slot if old is not None and view is not None and _same_size_scores(old, view) else slot)
        if len(log) > 8 * len(views) + 64:
            # Bounded memory: the older half goes, and only classes not synced since it was
            # written rebuild in full on their next use. (Cutting the whole log made every
            # class rebuild after each cut: bench/sim, 18% of the size classes' re-scoring.)
            cut = len(log) // 2
            del log[:cut]
            self._log_start += cut

    def _synced(self, need: Need, holders_of: str | None = None) -> _Class:
        """The size class of ``need`` (``holders_of`` None), or the holder class of the
        checkpoint ``holders_of``, caught up with the change log."""
        key = need.size_key if holders_of is None else need.memo_key
        classes = self._classes if holders_of is None else self._holder_classes
        cls = classes.get(key)
        if cls is None:
            if len(classes) >= _MAX_CLASSES:
                classes.clear()
            cls = classes[key] = _Class(need, holders_of)
        views, end = self._views, self._log_start + len(self._log)
        try:
            if cls.log_pos != end or len(cls.scores) != len(views):
                self._catch_up(cls, need, end)
        except BaseException:
            del classes[key]  # half-updated: rebuilt in full on its next use
            raise
        return cls

    def _catch_up(self, cls: _Class, need: Need, end: int) -> None:
        """Bring ``cls`` to change-log position ``end``: the slots changed since, or all."""
        views, scores, order = self._views, cls.scores, cls.order
        if len(scores) < len(views):
            scores.extend([None] * (len(views) - len(scores)))
        holders_of = cls.holders_of
        members = None if holders_of is None else self._holders.get(holders_of, ())
        if cls.log_pos < self._log_start or (members is not None and end - cls.log_pos > 4 * len(members) + 16):
            # Never built, or the log was cut past it; or a holder class whose backlog is
            # longer than rebuilding from its holders (a checkpoint seldom asked for): rebuild.
            slots = range(len(views)) if members is None else sorted(members)
            for key in order:  # the slots with a score (None: not in order)
                scores[key & _FIELD_MASK] = None
            order.clear()
            cls.by_fixed.clear()
            cls.fixed_keys.clear()
        else:
            changed = self._log[cls.log_pos - self._log_start:]
            if members is None:
                slots = dict.fromkeys(slot for slot in changed if slot >= 0)
            else:
                slots = dict.fromkeys(slot if slot >= 0 else ~slot for slot in changed)
        self._resync(cls, slots, need)
        cls.log_pos = end

    def _resync(self, cls: _Class, slots, need: Need) -> None:
        """Re-score the changed ``slots`` in ``cls`` and move them in its sorted lists."""
        views, scores, order, by_fixed, required = self._views, cls.scores, cls.order, cls.by_fixed, cls.required
        fixed_keys = cls.fixed_keys
        memo_key, holders_of = cls.memo_key, cls.holders_of
        mask = _FIELD_MASK
        sized = holders_of is None
        for slot in slots:
            old = scores[slot]
            v = views[slot]
            if v is None:
                s = None
            elif sized:
                dtype = v.default_dtype
                sizes = required.get(dtype)
                if sizes is None:  # the class's needs share these figures (its key)
                    weights, workspace = need.at(dtype)
                    sizes = required[dtype] = (weights, weights + workspace)
                s = _size_score(v, sizes[0], sizes[1])
            elif holders_of in v.entries:
                s = v.score_memo.get(memo_key, _MISS)
                if s is _MISS:
                    s = _fill_memo(v, need, v.score_memo, memo_key)
            else:
                s = None
            scores[slot] = s
            # Each list moves only where its own key changed: order by base, by_fixed by
            # fixed_s (bench/sim: most moves change one of the two, e.g. the victims' last
            # use and not the bytes evicted).
            one_side = old is None or s is None
            moved_base = one_side or old.base != s.base
            moved_fixed = sized and (one_side or old.fixed_s != s.fixed_s)
            if (old is None and s is None) or not (moved_base or moved_fixed):
                continue  # in neither list, or the same place in both (a view that still fits, say)
            if moved_base:
                if old is not None:
                    i = bisect_left(order, old.base | slot)
                    assert order[i] & mask == slot, "FleetIndex order lost a slot: this is a bug"
                    del order[i]
                if s is not None:
                    insort(order, s.base | slot)
            if moved_fixed:
                if old is not None:
                    key = fixed_keys.pop(slot)
                    i = bisect_left(by_fixed, key)
                    assert by_fixed[i] == key, "FleetIndex by_fixed lost a slot: this is a bug"
                    del by_fixed[i]
                if s is not None:
                    key = fixed_keys[slot] = (_fixed_image(s.fixed_s) << _FIELD_BITS) | slot
                    insort(by_fixed, key)

    def rank(self, need: Need, queue_lens: Sequence[int], *, spill_queue_len: int = 4,
             evict_for_held: bool = True, limit: int | None = None, min_queue_len: int = 0,
             backlog: int = 0) -> list[int]:
        """``rank_indices(views, need, queue_lens=..., ...)[:limit]`` over the slots' views
        (slot = index), without visiting every view; ``limit`` None gives the whole order.

        ``queue_lens`` has one entry per slot, each in [0, 2**32), and is read only at the
        slots a decision visits (a lazy sequence works). ``backlog``: as for rank_indices. ``min_queue_len``: a lower bound of
        them (0 is always right); a tighter one lets a decision stop earlier in a large
        group of equal replicas (ties go by queue length).

        Caveat, the one departure from rank_indices: within a group of more than
        ``tie_window`` (256) replicas with equal static scores (typically many with free room
        for the need), the order by queue length is exact only within a window of that many
        of them, which starts at a different member each time such a group is walked; the
        window grows only when too few of it qualify. Ranking all of them exactly would
        read every queue length, each a read of Ray's cache: the cost this index avoids.
        Replicas placed first because they are sooner than the best holder are the
        exception to the exception: all are found and ranked exactly."""
        views = self._views
        if spill_queue_len < 1:
            raise ValueError(f"spill_queue_len must be >= 1, got {spill_queue_len}")
        if len(queue_lens) != len(views):
            raise ValueError(f"queue_lens has {len(queue_lens)} entries for {len(views)} slots; pass one per slot")
        if min_queue_len < 0:
            raise ValueError(f"min_queue_len must be >= 0, got {min_queue_len}")
        if limit is not None and limit < 1:
            raise ValueError(f"limit must be >= 1 or None, got {limit}")
        if backlog < 0:
            raise ValueError(f"backlog must be >= 0, got {backlog}")
        if len(views) > _FIELD_MASK:
            raise ValueError(f"at most {_FIELD_MASK} slots, got {len(views)}")
        want = limit if limit is not None else len(views)
        holders = self._holders.get(need.checkpoint)

        # Holders: scored per checkpoint (their view's score_memo), as rank_indices does,
        # and kept sorted across decisions as the size classes are.
        held: list[int] = []  # static base | slot of the holders that can serve
        hscores: Sequence[_Score | None] = ()
        on_device_or_host: list[int] = []
        timed = False  # every holder on its device or host has measured times (placement._timed_holder_key)
        if holders:
            hcls = self._synced(need, need.checkpoint)
            held, hscores = hcls.order, hcls.scores
            timed = True
            for key in held:
                slot = key & _FIELD_MASK
                s = hscores[slot]
                if s.rank <= _ON_HOST:
                    on_device_or_host.append(slot)
                    if s.fixed_s is None:
                        timed = False
            timed = timed and bool(on_device_or_host)
            if not timed:
                # A holder on its device or host that is below the spill line places before every
                # other replica (they rank FITS or worse) and passes the holder gate: when want of
                # them are certain, the decision is made without reading every holder's queue
                # (a popular checkpoint has many holders) or looking at anyone else.
                ranked, spilled = self._walk(held, None, hscores, queue_lens, spill_queue_len, want, _NO_GATE,
                                             evict_for_held, min_queue_len, _AFTER_ON_HOST)
                if spilled is None and not self._sooner_possible(need, ranked, hscores, backlog):
                    ranked.sort()
                    return [k & _FIELD_MASK for k in ranked[:want]]

        hkeys: list[int] = []
        if timed:
            # Every holder's queue is read: they order by expected wait (in slot order, as
            # rank_indices takes them by view index: the same best wait to the last bit).
            timed_holders = []
            for slot in sorted(on_device_or_host):
                q = queue_lens[slot]
                if not min_queue_len <= q <= _FIELD_MASK:
                    raise _bad_queue(q, min_queue_len)
                timed_holders.append((hscores[slot], q, views[slot], slot))
            hkeys, best_wait_s = _timed_holders(timed_holders, spill_queue_len, backlog)
            below = [key for key in hkeys if not key & _SPILLED]
            for key in held:  # the holders that rank below their host keep queue-length keys
                slot = key & _FIELD_MASK
                if hscores[slot].rank > _ON_HOST:
                    q = queue_lens[slot]
                    if not min_queue_len <= q <= _FIELD_MASK:
                        raise _bad_queue(q, min_queue_len)
                    hkeys.append(key | (q << _FIELD_BITS) | (_SPILLED if q >= spill_queue_len else 0))
            # The same shortcut by the holders' expected waits: want of them below the spill
            # line place before every other replica unless one could be sooner than the best.
            if len(below) >= want and not self._sooner_possible_at(need, best_wait_s):
                below.sort()
                return [k & _FIELD_MASK for k in below[:want]]
        else:
            for key in held:
                q = queue_lens[key & _FIELD_MASK]
                if not min_queue_len <= q <= _FIELD_MASK:
                    raise _bad_queue(q, min_queue_len)
                hkeys.append(key | (q << _FIELD_BITS) | (_SPILLED if q >= spill_queue_len else 0))
            best_wait_s = _best_wait_s(((hscores[slot], queue_lens[slot], views[slot]) for slot in on_device_or_host),
                                       backlog)
        gate = bool(on_device_or_host) and (best_wait_s is not None or not evict_for_held)
        if gate:
            hkeys = _gate(hkeys, [hscores[key & _FIELD_MASK] for key in hkeys], views, queue_lens, best_wait_s,
                          evict_for_held)
        # The size class only now: a decision the holders made leaves its backlog to the next
        # (a slot changed twice meanwhile is scored once).
        cls = self._synced(need)
        # Past this base the gate keeps no non-holder: without measured times and before
        # evict_for_held, only a replica with free room is kept.
        stop = _AFTER_FITS if gate and best_wait_s is None and not evict_for_held else _NO_STOP
        prefix = bisect_left(cls.by_fixed, _fixed_image(best_wait_s) << _FIELD_BITS) \
            if gate and best_wait_s is not None else _NO_PREFIX
        if prefix <= 2 * want + 32:
            # Few can pass the gate: all of them, in any order, rather than a walk past the rest.
            ranked, spilled = self._stretch(cls, 0, prefix, holders, queue_lens, spill_queue_len, best_wait_s,
                                            evict_for_held, min_queue_len, False), None
        elif gate and best_wait_s is not None:
            # Sooner first (rank_indices): the replicas that pass the gate by their times
            # place before all others (the holders too), so they are found first, and the
            # rest walked only when fewer than want of them are below the spill line.
            # They are found by their load times (a stretch of by_fixed), not by a walk: all
            # of them are read, and nothing past them.
            first, end = self._sooner_bounds(cls.by_fixed, best_wait_s)
            sooner = self._stretch(cls, first, end, holders, queue_lens, spill_queue_len, best_wait_s,
                                   evict_for_held, min_queue_len, True)
            ranked = [key for key in sooner if not key & _SPILLED]
            if len(ranked) >= want:
                spilled = None
            else:
                spilled = [key for key in sooner if key & _SPILLED]
                skip = holders
                if sooner:
                    skip = set(holders or ()).union(key & _FIELD_MASK for key in sooner)
                more, more_spilled = self._walk(cls.order, skip, cls.scores, queue_lens, spill_queue_len,
                                                want - len(ranked), best_wait_s, evict_for_held, min_queue_len,
                                                stop, _LATER)
                ranked.extend(more)
                spilled = None if more_spilled is None else spilled + more_spilled
        else:
            ranked, spilled = self._walk(cls.order, holders, cls.scores, queue_lens, spill_queue_len, want,
                                         best_wait_s if gate else _NO_GATE, evict_for_held, min_queue_len, stop)
        if spilled is not None:  # fewer than want places below the spill line: the spilled ones follow
            ranked.extend(spilled)
        ranked.extend(hkeys)
        ranked.sort()
        return [k & _FIELD_MASK for k in ranked[:want]]

    def _stretch(self, cls: _Class, start: int, end: int, holders: set[int] | None, queue_lens: Sequence[int],
                 spill_queue_len: int, best_wait_s: float, evict_for_held: bool, qmin: int,
                 sooner_only: bool) -> list[int]:
        """Sort keys (unsorted, spilled ones marked) of the non-holders in
        ``cls.by_fixed[start:end]`` that pass the holder gate, ``later`` marked; with
        ``sooner_only``, of those that placement._sooner places first (kept by the gate too)."""
        views, scores = self._views, cls.scores
        keys = []
        for key in cls.by_fixed[start:end]:
            slot = key & _FIELD_MASK
            if holders and slot in holders:
                continue
            s, q, v = scores[slot], queue_lens[slot], views[slot]
            if not qmin <= q <= _FIELD_MASK:
                raise _bad_queue(q, qmin)
            if sooner_only:
                if not _sooner(s, q, v, best_wait_s):
                    continue
                later = 0
            elif _keep(s, q, v, best_wait_s, evict_for_held):
                later = _later(s, q, v, best_wait_s)
            else:
                continue
            keys.append(s.base | (q << _FIELD_BITS) | slot | (_SPILLED if q >= spill_queue_len else 0) | later)
        return keys

    @staticmethod
    def _sooner_bounds(by_fixed: list[int], best_wait_s: float) -> tuple[int, int]:
        """The stretch of ``by_fixed`` that holds every replica placement._sooner can place
        first: measured, with a load time (fixed_s) below best_wait_s / _SOONER_LOAD_FACTOR.
        Inclusive of fl(wait / factor): rounding is monotone, so each sooner one is at or
        below it even where the division rounds (subnormal waits); _sooner decides."""
        first = bisect_left(by_fixed, 1 << _FIELD_BITS)  # the first measured one (image >= 1)
        end = bisect_left(by_fixed, (_fixed_image(best_wait_s / _SOONER_LOAD_FACTOR) + 1) << _FIELD_BITS, first)
        return first, end

    def _sooner_possible(self, need: Need, ranked: list[int], hscores: Sequence[_Score | None],
                         backlog: int) -> bool:
        """Whether a replica that must load could pass the holder gate by its times, given
        ``ranked``, keys of holders on their device or host (rank's shortcut): then it
        would place before them (rank_indices: sooner first) and the shortcut is wrong.

        False when one of them has no measured times (the gate does not go by times), or when
        the least wait among them (a bound from above of the best holder's wait) is no more
        than the least measured load time of the size class (a bound from below of every
        other replica's) times _SOONER_LOAD_FACTOR: the common case of an idle holder is a
        wait of 0. Holders that rank BUSY are not walked by the shortcut and cannot be
        sooner (placement._later).
        The class's first few entries that cannot be sooner (holders, BUSY) are passed over;
        past 8 of them the answer is a safe True (the full path decides)."""
        views = self._views
        # With backlog, over fewer holders than rank's own figure: still a bound from above.
        wait_s = _best_wait_s(((hscores[key & _FIELD_MASK], (key >> _FIELD_BITS) & _FIELD_MASK,
                                views[key & _FIELD_MASK]) for key in ranked), backlog)
        return self._sooner_possible_at(need, wait_s)

    def _sooner_possible_at(self, need: Need, wait_s: float | None) -> bool:
        """:meth:`_sooner_possible` given ``wait_s``, a bound from above of the best holder's
        wait (None: a holder without measured times)."""
        if wait_s is None or wait_s == 0.0:
            return False
        cls = self._synced(need)
        by_fixed, scores = cls.by_fixed, cls.scores
        holders = self._holders.get(need.checkpoint, ())
        i, end = self._sooner_bounds(by_fixed, wait_s)
        for key in by_fixed[i:min(end, i + 8)]:
            slot = key & _FIELD_MASK
            if slot not in holders and scores[slot].rank < _BUSY:
                return True
        return end > i + 8  # 8 passed over: unknown beyond, so not the shortcut

    def _walk(self, order: list[int], skip: set[int] | None, scores: Sequence[_Score | None],
              queue_lens: Sequence[int], spill_queue_len: int, want: int, best_wait_s: float | None | object,
              evict_for_held: bool, qmin: int, stop: int,
              later: int = 0) -> tuple[list[int], list[int] | None]:
        """Sort keys (unsorted) of the replicas in ``order`` (ascending static base | slot,
        less ``skip``) that can be in the first ``want`` places: (keys below the spill line,
        None) once ``want`` of those are certain, else (those, the spilled keys) after the
        whole list or at the first base >= ``stop``. ``best_wait_s`` _NO_GATE: the holder
        gate is off; else ``scores[slot]`` feeds it. ``later`` (0 or _LATER) is set in
        every key: the walk after the sooner stretch (whose replicas it skips) marks the rest."""
        views = self._views
        gate = best_wait_s is not _NO_GATE
        wait_known = gate and best_wait_s is not None
        # A tie group (equal base) at a time. Members of a group order by queue length, then
        # slot: a group is walked until ``want`` places are certain, which is when the places
        # before it plus its members at the smallest queue length (qmin: none can beat them)
        # reach ``want``; a light load's big group of empty replicas stops early that way. A
        # group larger than tie_window is the exception (see rank).
        window = self._tie_window
        n = len(order)
        ranked: list[int] = []
        spilled: list[int] = []
        i = 0
        while i < n:
            base = order[i] & ~_FIELD_MASK
            if len(ranked) >= want:
                return ranked, None
            if base >= stop:
                break
            end = i + 1
            if end < n and order[end] & ~_FIELD_MASK == base:
                end = bisect_left(order, base + _FIELD_MASK + 1, i)
            if end - i > window:
                # Walk from a rotating start (wrapping) and stop once ``window`` members
                # are seen and want places found: least queue within that window.
                self._turn += 1
                start = i + self._turn % (end - i)
                members, capped = order[start:end] + order[i:start], True
            else:
                members, capped = order[i:end], False
            before, at_qmin, seen = len(ranked), 0, 0
            for key in members:
                slot = key & _FIELD_MASK
                if capped:
                    seen += 1
                    if seen > window and len(ranked) >= want:
                        return ranked, None
                if skip and slot in skip:
                    continue
                if wait_known:
                    # The gate's queue-free test first (_keep's): under load most fail it, and
                    # a queue length read costs a read of Ray's cache.
                    s = scores[slot]
                    fixed_s = s.fixed_s
                    if fixed_s is not None and fixed_s >= best_wait_s and s.rank > _ON_HOST:
                        continue
                q = queue_lens[slot]
                if not qmin <= q <= _FIELD_MASK:
                    raise _bad_queue(q, qmin)
                if gate and not _keep(scores[slot], q, views[slot], best_wait_s, evict_for_held):
                    continue
                if q < spill_queue_len:
                    ranked.append(base | (q << _FIELD_BITS) | slot | later)
                    if q == qmin:
                        at_qmin += 1
                        if before + at_qmin >= want:
                            return ranked, None
                else:
                    spilled.append(base | (q << _FIELD_BITS) | slot | _SPILLED | later)
            i = end
        if len(ranked) >= want:
            return ranked, None
        return ranked, spilled


_DOUBLE = struct.Struct("<d").pack
_FLOAT_BITS = struct.Struct("<Q").unpack


def _fixed_image(fixed_s: float | None) -> int:
    """An int that orders as fixed_s does, for fixed_s >= 0 (seconds), below them all for
    None (not measured): the IEEE 754 bits of a non-negative double order as its value
    (+ 0.0 turns -0.0 into 0.0). A by_fixed entry is ``(image << 32) | slot``."""
    if fixed_s is None:
        return 0
    assert fixed_s >= 0.0, f"fixed_s {fixed_s} < 0: this is a bug"
    return _FLOAT_BITS(_DOUBLE(fixed_s + 0.0))[0] + 1


def _bad_queue(q: int, min_queue_len: int) -> ValueError:
    return ValueError(f"queue lengths must be in [min_queue_len={min_queue_len}, {_FIELD_MASK}], got {q}")


_NO_GATE = object()
_NO_PREFIX = 1 << 62
_AFTER_FITS = _rank_floor(_FITS + 1)
_AFTER_ON_HOST = _rank_floor(_ON_HOST + 1)
_NO_STOP = 1 << 1024

