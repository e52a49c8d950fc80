"""The application's config: the ``args`` of serve_config.yaml, validated once here."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router import profiles
from router.registry import Registry
from router.settings import IngressSettings, queue_bound


class ReplicaSettings(BaseModel):
    """The ModelReplica deployment: one per GPU."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=2, ge=1)
    num_gpus: float = Field(default=0, ge=0, description="1 on GPU clusters; 0 on the CPU default.")
    num_cpus: float = Field(default=0.5, ge=0)
    max_ongoing_requests: int = Field(default=8, ge=1)
    max_queued_requests: int = Field(default=64, ge=-1, description="-1: unbounded (not recommended).")
    profile: str = Field(default="auto", description="'auto', 'cpu' or a profile name (router/profiles.py).")
    profile_overrides: dict[str, Any] = Field(default_factory=dict, description="Any HardwareProfile field.")
    cpu_budget_bytes: int | None = Field(default=None, gt=0, description="The cpu profile's device budget.")
    idle_check_period_s: float = Field(default=1.0, gt=0)
    routing_stats_period_s: float = Field(default=1.0, gt=0)
    routing_stats_timeout_s: float = Field(default=5.0, gt=0)
    spill_queue_len: int = Field(default=4, ge=1, description="Queue length at which a hot checkpoint spreads.")
    holder_wait_s: float = Field(
        default=2.0, ge=0,
        description="Until the replicas have measured service times (their first inference and load), how long a "
                    "request for a checkpoint some replica holds waits for that replica (or one with free room) "
                    "before another replica may evict to load it. 0: never wait. Once measured, the router compares "
                    "the expected wait at the holder with the expected load elsewhere instead.")
    rank_limit: int = Field(
        default=16, ge=1,
        description="Replicas ranked per placement decision, best first. Ray sends to the first with queue room "
                    "and backs off when none of them has room.")
    tie_window: int = Field(
        default=256, ge=1,
        description="Among more than this many replicas that serve a request equally well (e.g. all with free "
                    "room), the least loaded is sought within a window of this many, which rotates per decision; "
                    "up to this many are ranked exactly. Larger: closer to exact, slower at many replicas.")
    warm_up: bool = Field(
        default=True,
        description="At start, before taking requests, import the pipeline and component classes the registered "
                    "checkpoints name (model_index.json only, no weights): a first load in a fresh process "
                    "otherwise pays for those imports (seconds). Reported as warm_up in each replica's report.")
    fault_injection: bool = Field(
        default=False,
        description="TEST SEAM (deployments/faults.py): lets ModelReplica.inject_faults arm injected out-of-memory "
                    "errors and delays. Off by default; never enable it in production configs.")

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, v: int) -> int:
        return queue_bound(v)

    @field_validator("profile")
    @classmethod
    def _known_profile(cls, v: str) -> str:
        known = ("auto", profiles.CPU_PROFILE_NAME, *profiles.PROFILES)
        if v not in known:
            raise ValueError(f"unknown profile {v!r}; use one of {list(known)}")
        return v

    @model_validator(mode="after")
    def _profile_needs_its_gpu(self) -> "ReplicaSettings":
        # A table profile on a replica with no GPU would take the board's budget of host RAM.
        if self.profile in profiles.PROFILES and self.num_gpus == 0:
            raise ValueError(f"profile {self.profile!r} is a GPU profile but num_gpus is 0: give the replica "
                             f"num_gpus: 1, or use profile 'auto' or 'cpu'")
        return self

    @field_validator("profile_overrides")
    @classmethod
    def _overrides(cls, v: dict[str, Any]) -> dict[str, Any]:
        profiles.check_overrides(v)  # at build time, not in each replica's constructor
        return v


class AppConfig(BaseModel):
    """``registry`` is ``"demo"`` (the embedded tiny checkpoints), a YAML path, or a list."""

    model_config = ConfigDict(extra="forbid")

    registry: str | list[dict[str, Any]] = "demo"
    replica: ReplicaSettings = Field(default_factory=ReplicaSettings)
    ingress: IngressSettings = Field(default_factory=IngressSettings)

    @model_validator(mode="after")
    def _registry_kind(self) -> "AppConfig":
        if isinstance(self.registry, str) and self.registry != "demo" and not self.registry.endswith((".yaml", ".yml")):
            raise ValueError("registry must be 'demo', a path to a .yaml file, or a list of checkpoints")
        if isinstance(self.registry, list):
            # The entries, not their files (those may be readable only where the replicas
            # run): a typo'd field fails the build, and an in-place update with it is refused
            # while the running app keeps serving, instead of every new replica failing to start.
            Registry.from_entries(self.registry, check_files=False)
        return self

    def load_registry(self, *, base_dir: Path | None = None) -> Registry:
        """Build the registry; for ``demo`` this materializes the demo checkpoints first."""
        if self.registry == "demo":
            from deployments.demo import demo_registry_entries, ensure_demo_checkpoints

            ensure_demo_checkpoints()
            return Registry.from_entries(demo_registry_entries())
        if isinstance(self.registry, str):
            path = Path(self.registry)
            if not path.is_absolute() and base_dir is not None:
                path = base_dir / path
            return Registry.from_yaml(path)
        return Registry.from_entries(self.registry, base_dir=base_dir)
