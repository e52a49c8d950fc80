"""Prometheus metrics of one replica through ``ray.serve.metrics``.

Gauges mirror the last report; the cache's cumulative counters are exported as Counters
incremented by their delta since the previous observation (Prometheus counters only rise).
Serve adds the ``deployment``, ``replica`` and ``application`` tags itself (``replica`` is
reserved), so these metrics declare only their own tags.
"""

from __future__ import annotations

import threading
from typing import Any

from ray.serve import metrics

COUNTERS = ("hits", "host_reloads", "disk_loads", "evictions", "offloads", "releases",
            "host_full_releases", "shortfalls", "load_failures", "oom_recoveries")


class ReplicaMetrics:
    def __init__(self) -> None:
        self._device_used = metrics.Gauge("memrouter_device_used_bytes", "Device bytes in use (weights + workspace).")
        self._device_budget = metrics.Gauge("memrouter_device_budget_bytes", "Device byte budget.")
        self._host_used = metrics.Gauge("memrouter_host_used_bytes", "Host RAM bytes held by offloaded pipelines.")
        self._leaked = metrics.Gauge("memrouter_leaked_modules", "Modules of freed pipelines still alive.")
        self._counters = {
            name: metrics.Counter(f"memrouter_{name}_total", f"Pipeline cache {name.replace('_', ' ')}.")
            for name in COUNTERS
        }
        self._load_s = metrics.Histogram(
            "memrouter_load_seconds", "Seconds to load (disk) or reload (host) a pipeline.",
            boundaries=[0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 40, 80], tag_keys=("source",),
        )
        self._last: dict[str, int] = dict.fromkeys(COUNTERS, 0)
        self._lock = threading.Lock()

    def observe(self, report: dict[str, Any]) -> None:
        """Update from a replica report (the dict record_routing_stats returns)."""
        with self._lock:
            self._device_used.set(report["device_used_bytes"])
            self._device_budget.set(report["device_budget_bytes"])
            self._host_used.set(report["host_used_bytes"])
            self._leaked.set(report["leaked_modules"])
            for name in COUNTERS:
                value = report["counters"].get(name, 0)
                delta = value - self._last[name]
                if delta > 0:
                    self._counters[name].inc(delta)
                self._last[name] = value

    def load_seconds(self, seconds: float, source: str) -> None:
        self._load_s.observe(seconds, tags={"source": source})
