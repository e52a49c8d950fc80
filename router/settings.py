"""The Router's own settings (the ``ingress`` section of the app's args).

Here, beside the router, so that the router layer needs nothing of the application that
deploys it: deployments/config.py nests these in its AppConfig.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, field_validator


class IngressSettings(BaseModel):
    """One Router: its ingress deployment (replicas, CPUs, queue limits) and its request path
    (timeout, body cap, admin token)."""

    model_config = ConfigDict(extra="forbid")

    num_replicas: int = Field(default=1, ge=1)
    num_cpus: float = Field(default=0.25, ge=0)
    max_ongoing_requests: int = Field(default=256, ge=1)
    max_queued_requests: int = Field(
        default=512, ge=-1,
        description="An ingress replica holds max_ongoing_requests + max_queued_requests HTTP requests and answers "
                    "503 overloaded (Retry-After: 1) past them. -1: unbounded (not recommended); 0 is refused by Serve.")
    # Bounded: "no timeout" as inf (or 1e10) broke the synchronous path (time_t overflow).
    request_timeout_s: float = Field(default=120.0, gt=0, le=86400)
    max_body_bytes: int = Field(default=64 * 1024, gt=0)
    admin_token_env: str = Field(default="MEMROUTER_ADMIN_TOKEN", pattern=r"^[A-Z_][A-Z0-9_]*$")

    @field_validator("max_queued_requests")
    @classmethod
    def _queue_bound(cls, v: int) -> int:
        return queue_bound(v)


def queue_bound(v: int) -> int:
    """A Serve ``max_queued_requests``: -1 (unbounded) or >= 1; Serve refuses 0 only when
    the app deploys, so it is refused here, naming the field."""
    if v == 0:
        raise ValueError("must be -1 (unbounded) or >= 1; Serve refuses 0")
    return v
