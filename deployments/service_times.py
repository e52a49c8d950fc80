"""Measured service times of one replica, for its report: mean inference seconds and the
bandwidth its loads reach (disk -> device, host -> device).

The router's holder gate (router/placement.rank_indices) compares "wait for the replica
that holds the checkpoint" with "load it here" from these figures, so they are what this
replica really did, not profile constants. Exponentially weighted (``alpha`` per sample),
so they follow a change of load (another resolution, a noisy neighbour) within a few
requests. Pure: durations are passed in.

Caveat: one mean over every checkpoint and resolution this replica served; a replica that
serves SD1.5 and Flux alternately reports something between the two.
"""

from __future__ import annotations

import threading
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class ServiceTimesReport:
    inference_s: float  # 0.0 until the first inference
    disk_load_bytes_per_s: float  # 0.0 until the first disk load
    host_reload_bytes_per_s: float  # 0.0 until the first host reload
    inferences: int
    disk_loads: int
    host_reloads: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


class ServiceTimes:
    """Thread-safe: inference runs in a worker thread while reports are read on the loop."""

    def __init__(self, alpha: float = 0.2):
        if not 0.0 < alpha <= 1.0:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self._alpha = alpha
        self._lock = threading.Lock()
        self._mean = {"inference_s": 0.0, "disk": 0.0, "host": 0.0}
        self._count = {"inference_s": 0, "disk": 0, "host": 0}

    def _observe(self, key: str, value: float) -> None:
        with self._lock:
            n = self._count[key]
            # The first sample sets the mean; later ones move it by alpha.
            self._mean[key] = value if n == 0 else self._mean[key] + self._alpha * (value - self._mean[key])
            self._count[key] = n + 1

    def inference(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"seconds must be >= 0, got {seconds}")
        self._observe("inference_s", seconds)

    def load(self, tier: str, nbytes: int, seconds: float) -> None:
        """One load of ``nbytes`` from ``tier`` ("disk" or "host") that took ``seconds``.
        Loads too short to time (< 1 ms) are skipped: their bandwidth is noise."""
        if tier not in ("disk", "host"):
            raise ValueError(f"tier must be 'disk' or 'host', got {tier!r}")
        if nbytes <= 0 or seconds < 1e-3:
            return
        self._observe(tier, nbytes / seconds)

    def report(self) -> ServiceTimesReport:
        with self._lock:
            return ServiceTimesReport(self._mean["inference_s"], self._mean["disk"], self._mean["host"],
                                      self._count["inference_s"], self._count["disk"], self._count["host"])
