"""Fault injection: a TEST SEAM, off by default, for the reliability tests on CPU hosts.

A CPU host cannot run out of GPU memory on demand, and a replica cannot be killed "mid-load"
unless the load takes long enough to aim at. So the replica consults a
:class:`FaultInjector` at two sites, only when ``replica.fault_injection: true`` is set in the
app's args (never in serve_config.yaml or k8s/):

- ``"load"``: in the cache backend's ``load`` (loading a checkpoint from disk), and
- ``"inference"``: right before the pipeline runs, with the lease held.

Each armed :class:`Fault` either raises an out-of-memory error (the replica shell raises
``torch.OutOfMemoryError``) or sleeps ``delay_s`` seconds, ``times`` times, optionally only
for one checkpoint. Pure policy: no torch, no ray; the caller applies the returned fault.

Caveat: an injected out-of-memory error at ``"load"`` is raised after a real load finished
(the loaded pipeline is freed first, as ``pipelines.load_pipeline`` does on a real failure),
so it exercises the cache's and replica's recovery, not the allocator's behaviour.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass
from typing import Any

SITES = ("load", "inference")
KINDS = ("oom", "delay")


@dataclass(frozen=True)
class Fault:
    """One armed fault. ``checkpoint=None`` matches every checkpoint."""

    site: str
    kind: str
    times: int = 1
    delay_s: float = 0.0
    checkpoint: str | None = None

    def __post_init__(self) -> None:
        if self.site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {self.site!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        # Kinds first: a float times (1.5) never counted down to 0 and fired forever.
        if not isinstance(self.times, int) or isinstance(self.times, bool) or self.times < 1:
            raise ValueError(f"times must be an integer >= 1, got {self.times!r}")
        if not isinstance(self.delay_s, (int, float)) or isinstance(self.delay_s, bool):
            raise ValueError(f"delay_s must be a number of seconds, got {self.delay_s!r}")
        if self.kind == "delay" and not 0 < self.delay_s <= 600:
            raise ValueError(f"delay_s must be in (0, 600] for a delay fault, got {self.delay_s}")
        if self.checkpoint is not None and not isinstance(self.checkpoint, str):
            raise ValueError(f"checkpoint must be a checkpoint name or null, got {self.checkpoint!r}")

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "Fault":
        """Build from a plain dict (what crosses a DeploymentHandle); ValueError names bad keys."""
        unknown = set(raw) - {"site", "kind", "times", "delay_s", "checkpoint"}
        if unknown:
            raise ValueError(f"unknown fault fields {sorted(unknown)}; use site, kind, times, delay_s, checkpoint")
        return cls(**raw)


class FaultInjector:
    """Armed faults, consumed in arming order. Thread-safe.

    ``active`` names the faults being applied right now (a delay in progress), so that a test
    can see which replica is stuck mid-load before it kills it.
    """

    def __init__(self) -> None:
        self._armed: list[list[Any]] = []  # [fault, remaining]
        self._active: dict[int, dict[str, Any]] = {}
        self._fired: dict[str, int] = {f"{s}:{k}": 0 for s in SITES for k in KINDS}
        self._lock = threading.Lock()
        self._next = 0

    def arm(self, fault: Fault) -> None:
        with self._lock:
            self._armed.append([fault, fault.times])

    def clear(self) -> None:
        with self._lock:
            self._armed.clear()

    def take(self, site: str, checkpoint: str) -> Fault | None:
        """The first armed fault matching (site, checkpoint), consumed once; None if none."""
        if site not in SITES:
            raise ValueError(f"site must be one of {SITES}, got {site!r}")
        with self._lock:
            for slot in self._armed:
                fault, remaining = slot
                if fault.site == site and fault.checkpoint in (None, checkpoint):
                    slot[1] = remaining - 1
                    if slot[1] <= 0:
                        self._armed.remove(slot)
                    self._fired[f"{site}:{fault.kind}"] += 1
                    return fault
        return None

    def begin(self, fault: Fault, checkpoint: str) -> int:
        """Record that ``fault`` is being applied to ``checkpoint``; returns a token for :meth:`end`."""
        with self._lock:
            self._next += 1
            self._active[self._next] = {"site": fault.site, "kind": fault.kind, "checkpoint": checkpoint}
            return self._next

    def end(self, token: int) -> None:
        with self._lock:
            self._active.pop(token, None)

    def state(self) -> dict[str, Any]:
        with self._lock:
            return {
                "armed": [asdict(f) | {"remaining": n} for f, n in self._armed],
                "active": list(self._active.values()),
                "fired": dict(self._fired),
            }
