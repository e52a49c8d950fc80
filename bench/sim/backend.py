"""A PipelineCache backend whose operations are instant but whose durations are modeled.

The real cache (deployments/cache.py) calls ``load``/``to_host``/``to_device``/``free``; this
backend records each call with the modeled seconds it would take on the GPU
(bytes / bandwidth) so the simulator charges them on the simulated clock. It also tracks
what is physically on the device, independently of the cache's books, so an over-commit
shows up as an out-of-memory event even if the books were wrong.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(eq=False)
class SimObject:
    name: str
    bytes: int
    where: str = "device"  # "device" | "host" | "freed"


class SimBackend:
    def __init__(self, sizes: dict[str, int], *, capacity_bytes: int, disk_bps: float, h2d_bps: float, d2h_bps: float):
        self._sizes = sizes  # actual (measured) bytes by checkpoint name
        self.capacity_bytes = capacity_bytes
        self.disk_bps, self.h2d_bps, self.d2h_bps = disk_bps, h2d_bps, d2h_bps
        self.device_bytes = 0  # weights physically on the device
        self.host_bytes = 0
        self.workspace_bytes = 0  # set by the simulator while a request runs
        self.peak_bytes = 0
        self.oom_events = 0
        self.pending_s = 0.0  # modeled seconds of I/O since the simulator last drained it
        self.load_s = 0.0  # disk->device + host->device seconds (the part a request waits for)
        self.offload_s = 0.0  # device->host seconds
        self.disk_loads = 0
        self.host_reloads = 0
        self.offloads = 0
        self.frees = 0

    def _grow(self, nbytes: int) -> None:
        self.device_bytes += nbytes
        self._observe()

    def _observe(self) -> None:
        now = self.device_bytes + self.workspace_bytes
        if now > self.peak_bytes:
            self.peak_bytes = now
        if now > self.capacity_bytes:
            self.oom_events += 1

    def set_workspace(self, nbytes: int) -> None:
        self.workspace_bytes = nbytes
        self._observe()

    def drain(self) -> float:
        s, self.pending_s = self.pending_s, 0.0
        return s

    # ---- CacheBackend protocol -------------------------------------------------------------
    def load(self, name: str) -> SimObject:
        obj = SimObject(name, self._sizes[name])
        self._grow(obj.bytes)
        dt = obj.bytes / self.disk_bps
        self.pending_s += dt
        self.load_s += dt
        self.disk_loads += 1
        return obj

    def measure(self, obj: SimObject) -> int:
        return obj.bytes

    def to_host(self, obj: SimObject) -> None:
        assert obj.where == "device", obj
        obj.where = "host"
        self.device_bytes -= obj.bytes
        self.host_bytes += obj.bytes
        dt = obj.bytes / self.d2h_bps
        self.pending_s += dt
        self.offload_s += dt
        self.offloads += 1

    def to_device(self, obj: SimObject) -> None:
        assert obj.where == "host", obj
        obj.where = "device"
        self.host_bytes -= obj.bytes
        self._grow(obj.bytes)
        dt = obj.bytes / self.h2d_bps
        self.pending_s += dt
        self.load_s += dt
        self.host_reloads += 1

    def free(self, obj: SimObject) -> None:
        assert obj.where != "freed", obj
        if obj.where == "device":
            self.device_bytes -= obj.bytes
        else:
            self.host_bytes -= obj.bytes
        obj.where = "freed"
        self.frees += 1

    def leaked(self) -> int:
        return 0
