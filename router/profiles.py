"""Hardware profiles: how many bytes a replica may hold, as data.

Pure: no torch, no ray. The torch shell (deployments/pipelines.py) reads the CUDA device
name and total memory and passes them to :func:`detect`; tests pass them by hand.

Caveats:
- ``reserve_bytes`` covers the CUDA context, cuBLAS/cuDNN workspaces and allocator
  fragmentation. The figures are conservative defaults, not measurements; override them in
  config after a GPU calibration run (bench/).
- ``max_resident_pipelines`` is a safety cap on top of the byte budget, not the main limit.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Mapping

GIB = 1024**3
MIB = 1024**2

DTYPES = ("float16", "bfloat16", "float32")


@dataclass(frozen=True)
class HardwareProfile:
    """Memory limits of one replica's device.

    ``device_budget_bytes`` (total - reserve) is what the pipeline cache may fill with
    weights plus the workspace of requests in flight.
    """

    name: str
    total_bytes: int
    reserve_bytes: int
    default_dtype: str
    max_resident_pipelines: int
    host_budget_bytes: int
    idle_offload_s: float
    idle_release_s: float
    is_cuda: bool = True

    def __post_init__(self) -> None:
        # Validated once here so that every profile, table or override, is sound.
        for f in dataclasses.fields(self):
            _check_kind(f"profile {self.name!r}: {f.name}", f.name, getattr(self, f.name))
        if self.total_bytes <= 0:
            raise ValueError(f"profile {self.name!r}: total_bytes must be > 0, got {self.total_bytes}")
        if not 0 <= self.reserve_bytes < self.total_bytes:
            raise ValueError(
                f"profile {self.name!r}: reserve_bytes must be in [0, total_bytes), "
                f"got {self.reserve_bytes} of {self.total_bytes}"
            )
        if self.default_dtype not in DTYPES:
            raise ValueError(f"profile {self.name!r}: default_dtype must be one of {DTYPES}, got {self.default_dtype!r}")
        if self.max_resident_pipelines < 1:
            raise ValueError(f"profile {self.name!r}: max_resident_pipelines must be >= 1")
        if self.host_budget_bytes < 0:
            raise ValueError(f"profile {self.name!r}: host_budget_bytes must be >= 0")
        if not (self.idle_offload_s > 0 and self.idle_release_s > 0):  # NaN too: it would switch the timers off
            raise ValueError(f"profile {self.name!r}: idle timeouts must be > 0 seconds (inf: never), got "
                             f"idle_offload_s={self.idle_offload_s}, idle_release_s={self.idle_release_s}")

    @property
    def device_budget_bytes(self) -> int:
        return self.total_bytes - self.reserve_bytes

    def with_overrides(self, overrides: Mapping[str, Any] | None) -> "HardwareProfile":
        """Return a copy with config overrides applied; unknown keys are a ValueError."""
        if not overrides:
            return self
        check_overrides(overrides)
        return dataclasses.replace(self, **dict(overrides))

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["device_budget_bytes"] = self.device_budget_bytes
        return d


# Each field's kind: config YAML gives strings for "2GiB" or "2.5e9", which must be refused
# naming the field, not fail later in arithmetic.
_KINDS: dict[str, str] = {
    "name": "str", "total_bytes": "bytes", "reserve_bytes": "bytes", "default_dtype": "str",
    "max_resident_pipelines": "int", "host_budget_bytes": "bytes", "idle_offload_s": "seconds",
    "idle_release_s": "seconds", "is_cuda": "bool",
}


def _check_kind(label: str, field: str, value: Any) -> None:
    kind = _KINDS[field]
    if kind in ("bytes", "int"):
        ok = isinstance(value, int) and not isinstance(value, bool)
        want = "an integer number of bytes (2.5 GB: 2500000000)" if kind == "bytes" else "an integer"
    elif kind == "seconds":
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        want = "a number of seconds"
    elif kind == "bool":
        ok, want = isinstance(value, bool), "true or false"
    else:
        ok, want = isinstance(value, str), "a string"
    if not ok:
        raise ValueError(f"{label} must be {want}, got {value!r} ({type(value).__name__})")


def check_overrides(overrides: Mapping[str, Any]) -> None:
    """Refuse unknown fields, values of the wrong kind and values out of the ranges that hold
    on every device in ``profile_overrides`` (ValueError naming the field); what depends on
    the device (reserve below total) is checked when the override is applied to the
    replica's profile."""
    if not isinstance(overrides, Mapping):
        raise ValueError(f"profile_overrides must be a mapping of HardwareProfile fields, got {type(overrides).__name__}")
    unknown = sorted(set(overrides) - set(_KINDS))
    if unknown:
        raise ValueError(f"profile override: unknown field(s) {unknown}; known fields are {sorted(_KINDS)}")
    for field, value in overrides.items():
        label = f"profile override {field}"
        _check_kind(label, field, value)
        # The ranges that hold on every device (HardwareProfile checks them again, with the
        # device's own: reserve below total).
        if field == "default_dtype" and value not in DTYPES:
            raise ValueError(f"{label} must be one of {DTYPES}, got {value!r}")
        if field in ("total_bytes", "max_resident_pipelines") and value < 1:
            raise ValueError(f"{label} must be >= 1, got {value}")
        if field in ("reserve_bytes", "host_budget_bytes") and value < 0:
            raise ValueError(f"{label} must be >= 0, got {value}")
        if field in ("idle_offload_s", "idle_release_s") and not value > 0:  # NaN too
            raise ValueError(f"{label} must be > 0 seconds (inf: never), got {value}")


def _gpu(name: str, total_gib: float, *, bf16: bool, max_resident: int, host_gib: int) -> HardwareProfile:
    total = int(total_gib * GIB)
    # CUDA context (~0.5 GiB) + cuBLAS workspaces + fragmentation headroom: 1 GiB or 5%.
    reserve = max(GIB, total // 20)
    return HardwareProfile(
        name=name,
        total_bytes=total,
        reserve_bytes=reserve,
        default_dtype="bfloat16" if bf16 else "float16",
        max_resident_pipelines=max_resident,
        host_budget_bytes=host_gib * GIB,
        idle_offload_s=300.0,
        idle_release_s=1800.0,
    )


# Total bytes are the memory CUDA reports for the board, rounded to what the vendor sells;
# detection below matches on the name first and uses the measured total to split variants.
PROFILES: dict[str, HardwareProfile] = {
    p.name: p
    for p in (
        _gpu("T4-16GB", 15.0, bf16=False, max_resident=4, host_gib=32),  # Turing: no bf16
        _gpu("A10G-24GB", 22.0, bf16=True, max_resident=6, host_gib=48),
        _gpu("L4-24GB", 22.0, bf16=True, max_resident=6, host_gib=48),
        _gpu("A100-40GB", 39.5, bf16=True, max_resident=10, host_gib=96),
        _gpu("A100-80GB", 79.0, bf16=True, max_resident=16, host_gib=160),
        _gpu("H100-80GB", 79.0, bf16=True, max_resident=16, host_gib=160),
        _gpu("H200-141GB", 139.5, bf16=True, max_resident=24, host_gib=256),
    )
}

CPU_PROFILE_NAME = "cpu"
GENERIC_GPU_NAME = "gpu-generic"


def cpu_profile(*, available_ram_bytes: int, budget_bytes: int | None = None, fraction: float = 0.25) -> HardwareProfile:
    """The CPU profile: the device is the CPU and there is no separate host tier.

    ``budget_bytes`` is the configured device budget; without it a ``fraction`` of the
    available RAM is used. CPU math defaults to float32 (fp16 kernels are slow or missing).
    """
    if budget_bytes is None:
        if not 0 < fraction <= 1:
            raise ValueError(f"cpu profile: fraction must be in (0, 1], got {fraction}")
        budget_bytes = int(available_ram_bytes * fraction)
    if budget_bytes <= 0:
        raise ValueError(f"cpu profile: budget_bytes must be > 0, got {budget_bytes}")
    return HardwareProfile(
        name=CPU_PROFILE_NAME,
        total_bytes=budget_bytes,
        reserve_bytes=0,
        default_dtype="float32",
        max_resident_pipelines=8,
        host_budget_bytes=0,  # the host tier collapses into the device
        idle_offload_s=60.0,
        idle_release_s=300.0,
        is_cuda=False,
    )


def detect(device_name: str, total_bytes: int) -> HardwareProfile:
    """Pick a GPU profile from the CUDA device name and its measured total memory.

    An unknown GPU gets a generic profile built from its measured total (fp16 default,
    since bf16 support cannot be assumed). When the board reports less than the table's
    total (MIG slices, vGPU), the profile takes the measured total, a reserve by the table's
    rule on it (or the board's reserve scaled by its share, if larger), and the board's host
    budget and resident cap scaled by its share. Caveat:
    the host RAM is the node's, shared by every slice's replica; set host_budget_bytes in
    profile_overrides where the node has less than the board's row assumes.
    """
    if total_bytes <= 0:
        raise ValueError(f"detect: total_bytes must be > 0, got {total_bytes}")
    upper = device_name.upper()
    if "H200" in upper:
        key = "H200-141GB"
    elif "H100" in upper:
        key = "H100-80GB"
    elif "A100" in upper:
        # A MIG slice of an 80 GB board reports the slice's total: the name tells the board.
        key = "A100-80GB" if total_bytes > 60 * GIB or "80GB" in upper else "A100-40GB"
    elif "A10G" in upper:
        key = "A10G-24GB"
    elif "L4" in upper.split() or upper.endswith(" L4"):
        key = "L4-24GB"
    elif "T4" in upper.split() or upper.endswith(" T4"):
        key = "T4-16GB"
    else:
        key = None
    if key is not None:
        base = PROFILES[key]
        return _slice(base, total_bytes) if total_bytes < base.total_bytes else base
    return dataclasses.replace(
        _gpu(GENERIC_GPU_NAME, total_bytes / GIB, bf16=False, max_resident=4, host_gib=32),
        total_bytes=total_bytes,
    )


# A named table profile on a device that reports at least this share of the row's total is
# taken to be that board (CUDA reports a little less than the rounded figure, e.g. a T4's
# 14.7 of 15.0 GiB); below it, a smaller device, refused.
_OWN_BOARD_SHARE = 0.9


def _slice(base: HardwareProfile, total_bytes: int) -> HardwareProfile:
    """``base`` cut to ``total_bytes`` of its board (a MIG slice, a vGPU, a fractional GPU):
    its own CUDA context reserve (the table's rule on its total, at most half), and its
    share of the host tier and of the resident cap, so that the slices of one board
    together hold what the board would."""
    share = total_bytes / base.total_bytes
    reserve = max(GIB, total_bytes // 20, int(base.reserve_bytes * share))  # a board's own reserve, shared
    return dataclasses.replace(
        base, total_bytes=total_bytes, reserve_bytes=min(reserve, total_bytes // 2),
        host_budget_bytes=int(base.host_budget_bytes * share),
        max_resident_pipelines=max(1, round(base.max_resident_pipelines * share)))


def resolve(
    name: str,
    *,
    cuda_device: tuple[str, int] | None,
    available_ram_bytes: int,
    cpu_budget_bytes: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    gpu_fraction: float = 1.0,
) -> HardwareProfile:
    """Resolve the configured profile name (``auto``, a table key or ``cpu``).

    ``cuda_device`` is ``(name, total_bytes)`` of the visible CUDA device or None.
    ``auto`` detects the GPU when one is visible, else the cpu profile. ``gpu_fraction``:
    the replica's share of its GPU (Ray's num_gpus, when below 1): a GPU profile becomes
    that share of the board, with a reserve of its own (each process has its own CUDA
    context), so that replicas sharing one board do not each budget all of it. Overrides
    describe the whole board: the share is taken after them.

    A CUDA profile needs a device at least as large (after ``overrides``): ValueError
    otherwise, since its budget would be a promise of memory the device does not have. A
    table profile on a device a little smaller than its row (within 10%: CUDA reports less
    than the rounded figure) takes the device's own total. A ``reserve_bytes`` override
    with a fraction is taken as the board's, and the replica gets its share of it.
    """
    if not 0 < gpu_fraction <= 1:
        raise ValueError(f"gpu_fraction must be in (0, 1], got {gpu_fraction}")
    if name == "auto":
        profile = detect(*cuda_device) if cuda_device else cpu_profile(available_ram_bytes=available_ram_bytes, budget_bytes=cpu_budget_bytes)
    elif name == CPU_PROFILE_NAME:
        profile = cpu_profile(available_ram_bytes=available_ram_bytes, budget_bytes=cpu_budget_bytes)
    elif name in PROFILES:
        profile = PROFILES[name]
        if cuda_device is None:
            raise ValueError(f"profile {name!r} is a GPU profile but this replica sees no CUDA device: give it "
                             f"num_gpus: 1, or use profile 'auto' or 'cpu'")
    else:
        raise ValueError(f"profile: unknown name {name!r}; use 'auto', 'cpu' or one of {sorted(PROFILES)}")
    profile = profile.with_overrides(overrides)
    if profile.is_cuda and cuda_device is not None and cuda_device[1] < profile.total_bytes:
        device_name, device_total = cuda_device
        if name in PROFILES and "total_bytes" not in (overrides or {}) and \
                device_total >= _OWN_BOARD_SHARE * profile.total_bytes:
            # The board itself, reporting a little under the table's rounded total (a T4:
            # 14.7 of 15.0 GiB): its own total, as detect takes it.
            profile = _slice(profile, device_total)
        else:
            raise ValueError(
                f"profile {name!r} assumes {profile.total_bytes / GIB:.1f} GiB, but the visible CUDA device "
                f"{device_name!r} has {device_total / GIB:.1f} GiB: use profile 'auto' (it takes the device's own "
                f"total) or set total_bytes in profile_overrides to at most that")
    if profile.is_cuda and gpu_fraction < 1:
        reserve = (overrides or {}).get("reserve_bytes")
        profile = _slice(profile, int(profile.total_bytes * gpu_fraction))
        if reserve is not None:  # a calibrated reserve of the board: its share, without the rule's floors
            profile = dataclasses.replace(profile, reserve_bytes=int(reserve * gpu_fraction))
    return profile
