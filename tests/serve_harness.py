"""Shared helpers for tests that start the real Serve app in-process (one cluster per module)."""

from __future__ import annotations

import copy
import socket
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import yaml

ROOT = Path(__file__).resolve().parent.parent
ADMIN_TOKEN = "test-admin-token-0123456789"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def default_args() -> dict[str, Any]:
    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    return copy.deepcopy(doc["applications"][0]["args"])


def deep_update(base: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    for k, v in patch.items():
        if isinstance(v, dict) and isinstance(base.get(k), dict):
            deep_update(base[k], v)
        else:
            base[k] = v
    return base


@contextmanager
def running_app(patch: dict[str, Any], *, num_cpus: int = 4, env: dict[str, str] | None = None) -> Iterator[tuple[httpx.Client, Any]]:
    """Start Ray + Serve + the app with serve_config.yaml's args patched; yield (client, handle)."""
    import os

    import ray
    from ray import serve

    from deployments.app import build_app

    for k, v in (env or {}).items():
        os.environ[k] = v  # before ray.init: workers inherit the environment
    port = free_port()
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        handle = serve.run(build_app(deep_update(default_args(), patch)), name="memrouter", route_prefix="/")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            yield client, handle
    finally:
        serve.shutdown()
        ray.shutdown()
        for k in env or {}:
            os.environ.pop(k, None)


def wait_for(predicate: Callable[[], Any], timeout_s: float = 30.0, period_s: float = 0.2, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout_s
    last = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(period_s)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}; last value {last!r}")


def status(client: httpx.Client) -> dict[str, Any]:
    r = client.get("/v1/status")
    assert r.status_code == 200, r.text
    return r.json()


def reports_by_id(client: httpx.Client) -> dict[str, dict[str, Any]]:
    return {r["replica_id"]: r for r in status(client)["replicas"]}


def generate(client: httpx.Client, checkpoint: str, seed: int = 0, **extra: Any) -> dict[str, Any]:
    r = client.post("/v1/generate", json={"checkpoint": checkpoint, "prompt": "a red cube", "seed": seed, **extra})
    assert r.status_code == 200, r.text
    return r.json()


def admin(client: httpx.Client, path: str, body: dict[str, Any] | None = None) -> httpx.Response:
    return client.post(path, json=body or {}, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})


def release_all_and_wait(client: httpx.Client, replicas: int = 2) -> None:
    """Free every idle pipeline and wait until reports show empty replicas."""
    r = admin(client, "/v1/admin/release")
    assert r.status_code == 200, r.text
    released_s = time.time()

    def empty() -> bool:
        # Only reports taken after the release count: an older one may predate requests
        # that the release freed, and counters read from it would be stale.
        reps = status(client)["replicas"]
        return len(reps) == replicas and all(
            x["timestamp_s"] > released_s and not x["entries"] and x["device_used_bytes"] == 0 for x in reps)

    wait_for(empty, what="empty replicas after release")
