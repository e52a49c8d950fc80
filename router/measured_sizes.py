"""Weights a replica measured above the estimate, so that the router plans with them.

A replica measures every checkpoint it loads from disk (deployments/cache.py) and plans its
own later loads with the larger of that figure and the estimate. The router only had the
estimate: when a load measured above it and over a replica's whole budget, that replica
answered 413 ``exceeds_replica_budget`` and the router kept ranking it by the estimate, so
every request for the checkpoint met the same 413 although a replica with a larger budget
could have served it. The replica's 413 now carries what it measured
(``measured_weights_bytes``, ``estimate_weights_bytes``); :meth:`MeasuredSizes.learn` keeps
it, and :meth:`MeasuredSizes.adjust` raises each later :class:`Need` to it, for as long as
the estimate stays the one it was measured against (replaced files give a new estimate,
planned afresh, as the cache does).

Pure: no ray, no torch. Caveats: each router process learns for itself (every ingress
replica, every LocalRouter), from 413s only: a load that measured above the estimate but
fitted is not reported, so the router ranks that replica's peers by the estimate still.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Any, Mapping

from router.placement import Need

SHORTFALL_CODE = "exceeds_replica_budget"  # the replica's 413 code (deployments/replica.py)


class MeasuredSizes:
    """(checkpoint, estimated weights bytes) -> measured weights bytes, the ``max_entries``
    most recently learned. Keyed by the estimate, not the dtype: a need carries a figure per
    replica default dtype, and one measured load applies to every dtype key whose estimate
    it was planned with (a checkpoint of a fixed dtype has the same figure under every key;
    float16 and bfloat16 share theirs). Thread-safe: a router serves handle and synchronous
    callers alike."""

    def __init__(self, max_entries: int = 4096):
        if int(max_entries) < 1:
            raise ValueError(f"max_entries must be >= 1, got {max_entries}")
        self._max = int(max_entries)
        self._lock = threading.Lock()
        self._sizes: OrderedDict[tuple[str, int], int] = OrderedDict()

    def __len__(self) -> int:
        return len(self._sizes)

    def learn(self, result: Mapping[str, Any], need: Need) -> Need | None:
        """``need`` raised to what a replica measured, when ``result`` (the replica's answer
        to ``need``) is a 413 ``exceeds_replica_budget`` whose measured weights are above the
        estimate it planned with, and that estimate is one of ``need``'s; None otherwise
        (nothing new to plan with: a checkpoint whose estimate alone is over the budget,
        or files that changed between the two estimates)."""
        if result.get("status") != 413 or (result.get("error") or {}).get("code") != SHORTFALL_CODE:
            return None
        measured, estimate = result.get("measured_weights_bytes"), result.get("estimate_weights_bytes")
        if not isinstance(measured, int) or not isinstance(estimate, int):
            return None  # a replica of an older version: nothing measured to learn
        if measured <= estimate or estimate not in need.weights_bytes.values():
            return None
        with self._lock:
            key = (need.checkpoint, estimate)
            self._sizes[key] = measured
            self._sizes.move_to_end(key)
            while len(self._sizes) > self._max:
                self._sizes.popitem(last=False)
        return self.adjust(need)

    def adjust(self, need: Need) -> Need:
        """``need`` with each dtype's weights raised to what was measured against that
        estimate; ``need`` itself when nothing applies (the common case: no figure at all,
        or one dict probe per dtype)."""
        sizes = self._sizes
        if not sizes:
            return need
        raised = None
        for dtype, weights in need.weights_bytes.items():
            measured = sizes.get((need.checkpoint, weights))
            if measured is not None:
                if raised is None:
                    raised = dict(need.weights_bytes)
                raised[dtype] = measured
        if raised is None:
            return need
        return Need(need.checkpoint, raised, dict(need.workspace_bytes))
