"""Reliability and security against the real app: real Ray Serve, real HTTP (httpx).

One cluster for the module, two applications in it:
- ``memrouter`` (route ``/``): 2 CPU replicas, a registry of 6 good checkpoints (the demo
  four plus two more names for demo folders) and 3 broken ones (a truncated and a corrupt
  safetensors file, a UNet config.json that is not JSON), the fault-injection test seam on (deployments/faults.py), the admin
  token set;
- ``notoken`` (route ``/notoken``): 1 replica, its admin token env var unset (admin off), an
  ingress that holds 3 requests (max_ongoing_requests 2 + max_queued_requests 1).

docs/reliability.md lists every case with the test that checks it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.serve_harness import (ADMIN_TOKEN, admin, deep_update, default_args, free_port, release_all_and_wait,
                                 reports_by_id, status, wait_for)

pytestmark = pytest.mark.integration

REQUEST_TIMEOUT_S = 60.0
BUDGET_BYTES = 140_000_000
GOOD = ["demo-xs", "demo-s", "demo-m", "demo-l", "demo-xs-b", "demo-s-b"]
NO_TOKEN_ENV = "MEMROUTER_RELIABILITY_UNSET_TOKEN"


# ---- fixtures --------------------------------------------------------------------------------
def _registry(tmp: Path) -> list[dict[str, Any]]:
    from deployments.demo import demo_registry_entries, ensure_demo_checkpoints

    ensure_demo_checkpoints()
    entries = {e["name"]: e for e in demo_registry_entries()}
    extra = [dict(entries["demo-xs"], name="demo-xs-b"), dict(entries["demo-s"], name="demo-s-b")]
    # Broken copies of demo-xs: the UNet's data cut in half (header intact: refused by its
    # size before any replica call), a header that is not a safetensors header at all, and a
    # UNet config.json that is not JSON (weights intact: the estimate succeeds, the load fails).
    for name, file, damage in (
            ("demo-trunc", "diffusion_pytorch_model.safetensors", lambda b: b[: len(b) // 2]),
            ("demo-badheader", "diffusion_pytorch_model.safetensors", lambda b: b"garbage!" * 4),
            ("demo-badconfig", "config.json", lambda b: b"{not json")):
        folder = tmp / f"folder-of-{name}"
        shutil.copytree(entries["demo-xs"]["path"], folder)
        damaged = folder / "unet" / file
        damaged.write_bytes(damage(damaged.read_bytes()))
        extra.append(dict(entries["demo-xs"], name=name, path=str(folder)))
    return [*entries.values(), *extra]


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    import ray
    from ray import serve
    from deployments.app import build_app

    tmp = tmp_path_factory.mktemp("reliability")
    registry = _registry(tmp)
    main = deep_update(default_args(), {
        "registry": registry,
        "replica": {"routing_stats_period_s": 0.5, "idle_check_period_s": 0.25, "fault_injection": True,
                    "profile_overrides": {"idle_offload_s": 60, "idle_release_s": 120}},
        "ingress": {"request_timeout_s": REQUEST_TIMEOUT_S},
    })
    no_token = deep_update(default_args(), {
        "registry": registry[:1],
        "replica": {"num_replicas": 1, "num_cpus": 0.25},
        # A small ingress limit (2 + 1 requests held) for the burst test below.
        "ingress": {"admin_token_env": NO_TOKEN_ENV, "num_cpus": 0.1, "max_ongoing_requests": 2,
                    "max_queued_requests": 1},
    })
    os.environ["MEMROUTER_ADMIN_TOKEN"] = ADMIN_TOKEN  # before ray.init: workers inherit it
    os.environ.pop(NO_TOKEN_ENV, None)
    port = free_port()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run_many([
            serve.RunTarget(build_app(main), name="memrouter", route_prefix="/"),
            serve.RunTarget(build_app(no_token), name="notoken", route_prefix="/notoken"),
        ])
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as client:
            wait_for(lambda: len(status(client)["replicas"]) == 2, timeout_s=60, what="two replica reports")
            replicas = serve.get_deployment_handle("ModelReplica", app_name="memrouter")
            yield {"client": client, "replicas": replicas, "port": port, "tmp": tmp, "registry": registry, "args": main}
    finally:
        serve.shutdown()
        ray.shutdown()
        os.environ.pop("MEMROUTER_ADMIN_TOKEN", None)


@pytest.fixture
def client(app):
    client = app["client"]
    arm(app, [], clear=True)
    release_all_and_wait(client)
    return client


# ---- helpers ---------------------------------------------------------------------------------
def arm(app, faults: list[dict[str, Any]], clear: bool = True) -> list[dict[str, Any]]:
    """Arm ``faults`` on every replica (the test seam); returns each replica's injector state."""
    out = []
    for rid in sorted(reports_by_id(app["client"])):
        state = app["replicas"].inject_faults.remote(faults, clear, _target_replica=rid).result(timeout_s=30)
        assert state["status"] == 200, state
        out.append(state)
    return out


def fresh_reports(client: httpx.Client, after_s: float, replicas: int = 2) -> dict[str, dict[str, Any]]:
    """Reports taken after ``after_s`` with nothing in flight (counters are then final)."""
    def ready():
        reps = reports_by_id(client)
        ok = len(reps) == replicas and all(r["timestamp_s"] > after_s and r["in_flight"] == 0 for r in reps.values())
        return reps if ok else None

    return wait_for(ready, what="fresh reports")


def total(reps: dict[str, dict[str, Any]], counter: str) -> int:
    return sum(r["counters"][counter] for r in reps.values())


def body(**fields: Any) -> dict[str, Any]:
    return {"checkpoint": "demo-xs", "prompt": "a red cube", "seed": 1, **fields}


def post(client: httpx.Client, checkpoint: str, **extra: Any) -> httpx.Response:
    return client.post("/v1/generate", json=body(checkpoint=checkpoint, **extra))


def host_paths(app) -> list[str]:
    """Strings that must never appear in an answer: host paths of checkpoints and temp dirs."""
    from deployments.demo import default_demo_dir

    return [str(default_demo_dir()), str(app["tmp"]), str(Path.home()), "/tmp/"]


def assert_error(r: httpx.Response, status_code: int, code: str, *mentions: str) -> dict[str, Any]:
    assert r.status_code == status_code, (r.status_code, r.text[:500])
    err = r.json()["error"]
    assert err["code"] == code, err
    assert err["message"], err
    for m in mentions:
        assert m in err["message"], (m, err)
    return err


# ---- bad input catalog -----------------------------------------------------------------------
BIG = 10 * 1024 * 1024
NAN_BODY = '{"checkpoint": "demo-xs", "prompt": "p", "guidance_scale": %s}'
# (id, method, path, request kwargs, status, code, text the message must contain)
CATALOG: list[tuple[str, str, str, dict[str, Any], int, str, str]] = [
    # names: only registry names; anything path-, URL- or hub-shaped is refused by shape
    ("unknown checkpoint", "POST", "/v1/generate", {"json": body(checkpoint="no-such-model")}, 404, "unknown_checkpoint", "no-such-model"),
    ("unknown checkpoint, valid shape, near miss", "POST", "/v1/generate", {"json": body(checkpoint="demo-xss")}, 404, "unknown_checkpoint", "demo-xs"),
    ("name ../", "POST", "/v1/generate", {"json": body(checkpoint="../demo-xs")}, 422, "invalid_request", "checkpoint"),
    ("name with ../ inside", "POST", "/v1/generate", {"json": body(checkpoint="demo-xs/../../etc")}, 422, "invalid_request", "checkpoint"),
    ("name ..", "POST", "/v1/generate", {"json": body(checkpoint="..")}, 422, "invalid_request", "checkpoint"),
    ("absolute path", "POST", "/v1/generate", {"json": body(checkpoint="/etc/passwd")}, 422, "invalid_request", "checkpoint"),
    ("home path", "POST", "/v1/generate", {"json": body(checkpoint="~/.cache/memrouter/demo-v1/demo-xs")}, 422, "invalid_request", "checkpoint"),
    ("file URL", "POST", "/v1/generate", {"json": body(checkpoint="file:///etc/passwd")}, 422, "invalid_request", "checkpoint"),
    ("https URL", "POST", "/v1/generate", {"json": body(checkpoint="https://huggingface.co/org/model")}, 422, "invalid_request", "checkpoint"),
    ("hub id org/model", "POST", "/v1/generate", {"json": body(checkpoint="runwayml/stable-diffusion-v1-5")}, 422, "invalid_request", "checkpoint"),
    ("windows path", "POST", "/v1/generate", {"json": body(checkpoint="C:\\models\\x")}, 422, "invalid_request", "checkpoint"),
    ("NUL byte after name", "POST", "/v1/generate", {"json": body(checkpoint="demo-xs\x00")}, 422, "invalid_request", "checkpoint"),
    ("NUL byte only", "POST", "/v1/generate", {"json": body(checkpoint="\x00")}, 422, "invalid_request", "checkpoint"),
    ("10 KB name", "POST", "/v1/generate", {"json": body(checkpoint="a" * 10240)}, 422, "invalid_request", "checkpoint"),
    ("cyrillic look-alike", "POST", "/v1/generate", {"json": body(checkpoint="d\u0435mo-xs")}, 422, "invalid_request", "checkpoint"),
    ("unicode hyphen look-alike", "POST", "/v1/generate", {"json": body(checkpoint="demo\u2010xs")}, 422, "invalid_request", "checkpoint"),
    ("fullwidth look-alike", "POST", "/v1/generate", {"json": body(checkpoint="\uff44emo-xs")}, 422, "invalid_request", "checkpoint"),
    ("upper case", "POST", "/v1/generate", {"json": body(checkpoint="DEMO-XS")}, 422, "invalid_request", "checkpoint"),
    ("empty name", "POST", "/v1/generate", {"json": body(checkpoint="")}, 422, "invalid_request", "checkpoint"),
    # missing, extra and mistyped fields
    ("missing checkpoint", "POST", "/v1/generate", {"json": {"prompt": "p"}}, 422, "invalid_request", "checkpoint: Field required"),
    ("missing prompt", "POST", "/v1/generate", {"json": {"checkpoint": "demo-xs"}}, 422, "invalid_request", "prompt: Field required"),
    ("extra field trust_remote_code", "POST", "/v1/generate", {"json": body(trust_remote_code=True)}, 422, "invalid_request", "trust_remote_code"),
    ("extra field path", "POST", "/v1/generate", {"json": body(path="/tmp/evil")}, 422, "invalid_request", "path: Extra inputs"),
    ("checkpoint is a number", "POST", "/v1/generate", {"json": body(checkpoint=5)}, 422, "invalid_request", "checkpoint"),
    ("checkpoint is a list", "POST", "/v1/generate", {"json": body(checkpoint=["demo-xs"])}, 422, "invalid_request", "checkpoint"),
    ("prompt is a number", "POST", "/v1/generate", {"json": body(prompt=42)}, 422, "invalid_request", "prompt"),
    ("width is a string", "POST", "/v1/generate", {"json": body(width="64")}, 422, "invalid_request", "width"),
    ("width is a float", "POST", "/v1/generate", {"json": body(width=64.5)}, 422, "invalid_request", "width"),
    ("seed is a bool", "POST", "/v1/generate", {"json": body(seed=True)}, 422, "invalid_request", "seed"),
    ("num_images is null", "POST", "/v1/generate", {"json": body(num_images=None)}, 422, "invalid_request", "num_images"),
    # sizes, steps, guidance, images, seed
    ("width 0", "POST", "/v1/generate", {"json": body(width=0)}, 422, "invalid_request", "width"),
    ("width negative", "POST", "/v1/generate", {"json": body(width=-64)}, 422, "invalid_request", "width"),
    ("width not a multiple of 8", "POST", "/v1/generate", {"json": body(width=65)}, 422, "invalid_request", "width"),
    ("width 100000", "POST", "/v1/generate", {"json": body(width=100000)}, 422, "invalid_request", "width"),
    ("width above the checkpoint's limit", "POST", "/v1/generate", {"json": body(width=512)}, 422, "invalid_request", "width: 512 exceeds the limit 256"),
    ("height 0", "POST", "/v1/generate", {"json": body(height=0)}, 422, "invalid_request", "height"),
    ("height negative", "POST", "/v1/generate", {"json": body(height=-8)}, 422, "invalid_request", "height"),
    ("height not a multiple of 8", "POST", "/v1/generate", {"json": body(height=100)}, 422, "invalid_request", "height"),
    ("height 100000", "POST", "/v1/generate", {"json": body(height=100000)}, 422, "invalid_request", "height"),
    ("steps 0", "POST", "/v1/generate", {"json": body(num_inference_steps=0)}, 422, "invalid_request", "num_inference_steps"),
    ("steps 10^6", "POST", "/v1/generate", {"json": body(num_inference_steps=10**6)}, 422, "invalid_request", "num_inference_steps"),
    ("steps above the checkpoint's limit", "POST", "/v1/generate", {"json": body(num_inference_steps=11)}, 422, "invalid_request", "num_inference_steps: 11 exceeds"),
    ("guidance NaN", "POST", "/v1/generate", {"content": NAN_BODY % "NaN", "headers": {"content-type": "application/json"}}, 422, "invalid_request", "guidance_scale"),
    ("guidance Infinity", "POST", "/v1/generate", {"content": NAN_BODY % "Infinity", "headers": {"content-type": "application/json"}}, 422, "invalid_request", "guidance_scale"),
    ("guidance -Infinity", "POST", "/v1/generate", {"content": NAN_BODY % "-Infinity", "headers": {"content-type": "application/json"}}, 422, "invalid_request", "guidance_scale"),
    ("guidance 1e999 (overflows to inf)", "POST", "/v1/generate", {"content": NAN_BODY % "1e999", "headers": {"content-type": "application/json"}}, 422, "invalid_request", "guidance_scale"),
    ("guidance negative", "POST", "/v1/generate", {"json": body(guidance_scale=-1)}, 422, "invalid_request", "guidance_scale"),
    ("num_images 0", "POST", "/v1/generate", {"json": body(num_images=0)}, 422, "invalid_request", "num_images"),
    ("num_images 1000", "POST", "/v1/generate", {"json": body(num_images=1000)}, 422, "invalid_request", "num_images"),
    ("num_images above the checkpoint's limit", "POST", "/v1/generate", {"json": body(num_images=8)}, 422, "invalid_request", "num_images: 8 exceeds"),
    ("seed negative", "POST", "/v1/generate", {"json": body(seed=-1)}, 422, "invalid_request", "seed"),
    ("seed 2^64", "POST", "/v1/generate", {"json": body(seed=2**64)}, 422, "invalid_request", "seed"),
    ("seed 10^30", "POST", "/v1/generate", {"json": body(seed=10**30)}, 422, "invalid_request", "seed"),
    ("NUL in prompt", "POST", "/v1/generate", {"json": body(prompt="a\x00b")}, 422, "invalid_request", "prompt"),
    ("NUL in negative prompt", "POST", "/v1/generate", {"json": body(negative_prompt="\x00")}, 422, "invalid_request", "negative_prompt"),
    ("prompt over 2000 chars", "POST", "/v1/generate", {"json": body(prompt="x" * 3000)}, 422, "invalid_request", "prompt"),
    # body size, encoding and content type
    ("1 MB prompt", "POST", "/v1/generate", {"json": body(prompt="x" * 1024 * 1024)}, 413, "body_too_large", "65536"),
    ("10 MB body", "POST", "/v1/generate", {"content": b"{" + b" " * BIG + b"}", "headers": {"content-type": "application/json"}}, 413, "body_too_large", "65536"),
    ("10 MB body, chunked (no Content-Length)", "POST", "/v1/generate",
     {"content": "chunked", "headers": {"content-type": "application/json"}}, 413, "body_too_large", "65536"),
    ("malformed JSON", "POST", "/v1/generate", {"content": b'{"checkpoint": "demo-xs", ', "headers": {"content-type": "application/json"}}, 400, "malformed_json", "malformed JSON"),
    ("not UTF-8", "POST", "/v1/generate", {"content": b'{"checkpoint": "\xff\xfe"}', "headers": {"content-type": "application/json"}}, 400, "malformed_json", "malformed JSON"),
    ("JSON array body", "POST", "/v1/generate", {"json": [body()]}, 422, "invalid_request", "body"),
    ("JSON string body", "POST", "/v1/generate", {"json": "demo-xs"}, 422, "invalid_request", "body"),
    ("empty body", "POST", "/v1/generate", {"content": b"", "headers": {"content-type": "application/json"}}, 422, "invalid_request", "body"),
    ("text/plain", "POST", "/v1/generate", {"content": json.dumps(body()), "headers": {"content-type": "text/plain"}}, 415, "unsupported_media_type", "application/json"),
    ("form-urlencoded", "POST", "/v1/generate", {"data": {"checkpoint": "demo-xs", "prompt": "p"}}, 415, "unsupported_media_type", "application/json"),
    ("multipart", "POST", "/v1/generate", {"files": {"f": ("a.json", b"{}")}}, 415, "unsupported_media_type", "application/json"),
    # FastAPI 0.165 leaves a body without a content type unparsed: it was a 422 about a missing object.
    ("JSON without a content type", "POST", "/v1/generate", {"content": json.dumps(body())}, 415,
     "unsupported_media_type", "Content-Type: application/json"),
    # methods and routes
    ("GET on POST /v1/generate", "GET", "/v1/generate", {}, 405, "method_not_allowed", "POST"),
    ("PUT on POST /v1/generate", "PUT", "/v1/generate", {"json": body()}, 405, "method_not_allowed", "POST"),
    ("DELETE on POST /v1/generate", "DELETE", "/v1/generate", {}, 405, "method_not_allowed", "POST"),
    ("GET on POST /v1/admin/release", "GET", "/v1/admin/release", {}, 405, "method_not_allowed", "POST"),
    ("POST on GET /v1/checkpoints", "POST", "/v1/checkpoints", {"json": {}}, 405, "method_not_allowed", "GET"),
    ("unknown route", "POST", "/v1/nope", {"json": body()}, 404, "not_found", "route"),
    # admin bodies are validated the same way
    ("admin: path as checkpoint", "POST", "/v1/admin/release",
     {"json": {"checkpoint": "../../etc"}, "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}}, 422, "invalid_request", "checkpoint"),
    ("admin: extra field", "POST", "/v1/admin/offload",
     {"json": {"path": "/x"}, "headers": {"Authorization": f"Bearer {ADMIN_TOKEN}"}}, 422, "invalid_request", "path"),
    ("admin: malformed JSON", "POST", "/v1/admin/offload", {"content": b'{"checkpoint": ', "headers": {
        "Authorization": f"Bearer {ADMIN_TOKEN}", "content-type": "application/json"}}, 400, "malformed_json", "malformed"),
    # the token before the body: no rule of the body is told to a caller without it
    ("admin: bad body, no token", "POST", "/v1/admin/release", {"json": {"checkpoint": "../../etc"}}, 401,
     "unauthorized", "Bearer"),
    ("admin: malformed JSON, no token", "POST", "/v1/admin/release",
     {"content": b"{", "headers": {"content-type": "application/json"}}, 401, "unauthorized", "Bearer"),
]


def _send(client: httpx.Client, method: str, path: str, kwargs: dict[str, Any]) -> httpx.Response:
    kwargs = dict(kwargs)
    if kwargs.get("content") == "chunked":
        def chunks():
            for _ in range(BIG // 65536):
                yield b" " * 65536
        kwargs["content"] = chunks()
    return client.request(method, path, **kwargs)


def test_bad_input_catalog_is_answered_4xx_and_loads_nothing(app, client):
    assert len(CATALOG) >= 40
    before_s = time.time()
    before = fresh_reports(client, before_s - 1)
    failures, statuses = [], []
    forbidden = host_paths(app) + [ADMIN_TOKEN]
    for case_id, method, path, kwargs, want_status, want_code, mention in CATALOG:
        r = _send(client, method, path, kwargs)
        statuses.append(r.status_code)
        try:
            err = r.json()["error"]
            problems = []
            if r.status_code != want_status or err["code"] != want_code:
                problems.append(f"got {r.status_code} {err['code']}")
            if mention not in err["message"]:
                problems.append(f"message lacks {mention!r}")
            problems += [f"message leaks {f!r}" for f in forbidden if f in r.text]
        except (ValueError, KeyError, TypeError):
            problems = [f"not an error body: {r.status_code} {r.text[:200]!r}"]
        if problems:
            failures.append((case_id, problems, r.text[:300]))
    print(f"catalog: {len(CATALOG)} cases, statuses {sorted(set(statuses))}")
    assert failures == []
    assert all(400 <= s < 500 for s in statuses)
    # The service still answers, and no rejected request loaded (or tried to load) a checkpoint.
    assert client.get("/healthz").json() == {"status": "ok"}
    after = fresh_reports(client, time.time())
    for counter in ("disk_loads", "host_reloads", "load_failures", "hits"):
        assert total(after, counter) == total(before, counter), counter
    assert all(not r["entries"] for r in after.values())
    ok = post(client, "demo-xs")
    assert ok.status_code == 200, ok.text


# ---- admission control -----------------------------------------------------------------------
def test_request_over_every_budget_is_refused_before_any_load_with_the_numbers(app, client):
    from router.estimator import Estimator
    from router.registry import Registry

    spec = Registry.from_entries(app["registry"]).get("demo-xs")
    est = Estimator().estimate(spec, dtype="float32", width=256, height=256, batch=4)
    assert est.total_bytes > BUDGET_BYTES  # the workspace of 4 images at 256x256 does not fit
    before = fresh_reports(client, time.time())
    r = post(client, "demo-xs", width=256, height=256, num_images=4)
    assert_error(r, 413, "exceeds_every_budget", str(est.total_bytes), str(BUDGET_BYTES))
    after = fresh_reports(client, time.time())
    assert total(after, "disk_loads") == total(before, "disk_loads")
    assert total(after, "shortfalls") == total(before, "shortfalls")  # refused at the ingress, not a replica


def test_request_that_fits_a_profile_but_no_replica_now_waits_and_is_served(app, client):
    # Both replicas busy, each request held at inference (8 s, 4 s): demo-l (~129 MB of the
    # 140 MB budget) on one, then demo-m (~56 MB), which fits only on the other. A third request
    # (demo-xs with 3 images at 128x128, ~124 MB) fits a profile but neither replica right
    # now: it waits for one to finish, evicts, loads, and is served; never out of memory,
    # never over budget.
    arm(app, [{"site": "inference", "kind": "delay", "delay_s": 8.0, "checkpoint": "demo-l"},
              {"site": "inference", "kind": "delay", "delay_s": 4.0, "checkpoint": "demo-m"}])
    results: dict[str, httpx.Response] = {}

    def send(checkpoint):
        results[checkpoint] = post(client, checkpoint)

    def active() -> int:
        return sum(bool(s["active"]) for s in arm(app, [], clear=False))

    threads = []
    for checkpoint, busy in (("demo-l", 1), ("demo-m", 2)):
        threads.append(threading.Thread(target=send, args=(checkpoint,)))
        threads[-1].start()
        wait_for(lambda: active() >= busy, timeout_s=20, what=f"{busy} replica(s) busy")
    started = time.monotonic()
    late = post(client, "demo-xs", width=128, height=128, num_images=3)
    waited_s = time.monotonic() - started
    for t in threads:
        t.join()
    assert {k: v.status_code for k, v in results.items()} == {"demo-l": 200, "demo-m": 200}
    assert results["demo-l"].json()["replica"] != results["demo-m"].json()["replica"]
    assert late.status_code == 200, late.text
    assert late.json()["served_from"] == "disk" and len(late.json()["images"]) == 3
    assert waited_s > 0.5, "the third request did not wait for a busy replica"
    reps = fresh_reports(client, time.time())
    assert total(reps, "evictions") >= 1  # it made room by evicting what the finished request left
    for rid, rep in reps.items():
        timeline = app["replicas"].report.remote(True, _target_replica=rid).result(timeout_s=30)["timeline"]
        assert max(sample[1] for sample in timeline) <= rep["device_budget_bytes"]


# ---- out-of-memory recovery ------------------------------------------------------------------
@pytest.mark.parametrize("site", ["load", "inference"])
def test_one_out_of_memory_error_is_recovered(app, client, site):
    # An idle entry on each replica for recovery to free: demo-l on one, then demo-m, which
    # no longer fits beside it, on the other.
    holders = {}
    for checkpoint in ("demo-l", "demo-m"):
        r = post(client, checkpoint)
        assert r.status_code == 200, r.text
        holders[checkpoint] = r.json()["replica"]
        fresh_reports(client, time.time())
    assert len(set(holders.values())) == 2, holders
    before = fresh_reports(client, time.time())
    arm(app, [{"site": site, "kind": "oom", "times": 1, "checkpoint": "demo-xs"}])
    r = post(client, "demo-xs")
    assert r.status_code == 200, r.text
    rid = r.json()["replica"]
    arm(app, [], clear=True)
    after = fresh_reports(client, time.time())
    assert after[rid]["counters"]["oom_recoveries"] == before[rid]["counters"]["oom_recoveries"] + 1
    assert all(rep["leaked_modules"] == 0 for rep in after.values())
    assert [e["name"] for e in before[rid]["entries"]] in (["demo-l"], ["demo-m"])
    assert [e["name"] for e in after[rid]["entries"]] == ["demo-xs"], "the other idle entry is freed for the retry"
    other = next(x for x in after if x != rid)
    assert after[other]["counters"]["oom_recoveries"] == before[other]["counters"]["oom_recoveries"]
    if site == "load":
        assert after[rid]["counters"]["load_failures"] == before[rid]["counters"]["load_failures"] + 1
        assert r.json()["served_from"] == "disk"
    assert post(client, "demo-xs", seed=2).status_code == 200


def test_out_of_memory_twice_answers_503_and_the_replica_stays_healthy(app, client):
    before = fresh_reports(client, time.time())
    armed = {s["replica"]: s["fired"]["load:oom"] for s in arm(app, [{"site": "load", "kind": "oom", "times": 2,
                                                                      "checkpoint": "demo-m"}])}
    r = post(client, "demo-m")
    err = assert_error(r, 503, "out_of_memory", "'demo-m'", "retrying once")
    assert r.headers["Retry-After"] == "5"
    fired = {s["replica"]: s["fired"]["load:oom"] - armed[s["replica"]] for s in arm(app, [], clear=False)}
    assert sorted(fired.values()) == [0, 2], fired  # one replica, both attempts
    rid = next(x for x, n in fired.items() if n == 2)
    arm(app, [], clear=True)
    mid = fresh_reports(client, time.time())
    assert mid[rid]["counters"]["oom_recoveries"] == before[rid]["counters"]["oom_recoveries"] + 1  # one retry
    assert mid[rid]["entries"] == [] and mid[rid]["device_used_bytes"] == 0, "nothing half-resident"
    assert all(rep["leaked_modules"] == 0 for rep in mid.values())
    assert client.get("/healthz").status_code == 200
    again = post(client, "demo-m")
    assert again.status_code == 200, again.text
    print("503 message:", err["message"])


# ---- corrupt checkpoints ---------------------------------------------------------------------
@pytest.mark.parametrize("path", ["sync", "async"])
def test_a_request_that_times_out_is_cancelled_at_the_replica(app, client, path):
    """The Router gives up after request_timeout_s (504) and cancels the replica call: the
    replica, still loading, keeps the load and skips the inference nobody would read."""
    from deployments.client import LocalRouter, ServiceError

    def cancelled() -> int:
        return sum(r["requests_cancelled"] for r in reports_by_id(client).values())

    before = cancelled()
    arm(app, [{"site": "load", "kind": "delay", "delay_s": 6, "checkpoint": "demo-m"}])
    body = {"checkpoint": "demo-m", "prompt": "p", "width": 64, "height": 64, "num_inference_steps": 1}
    with LocalRouter(deep_update(app["args"], {"ingress": {"request_timeout_s": 2.0}}), app_name="memrouter") as local:
        t0 = time.monotonic()
        with pytest.raises(ServiceError) as info:
            local.generate(body) if path == "sync" else asyncio.run(local.generate_async(body))
        assert info.value.status == 504 and time.monotonic() - t0 < 6
    wait_for(lambda: cancelled() == before + 1, timeout_s=60, what="the replica skipping the timed-out request")
    reports = reports_by_id(client).values()
    assert any("demo-m" in [e["name"] for e in r["entries"]] for r in reports)  # the load was kept
    assert all(r["in_flight"] == 0 for r in fresh_reports(client, time.time()).values())


def test_an_http_client_that_goes_away_cancels_the_replica_call(app, client):
    """The proxy cancels the ingress's request when its HTTP client disconnects, and the
    replica call with it (its replica call runs under a Serve request id of its own): the
    replica keeps the load and skips the inference nobody will read."""
    def cancelled() -> int:
        return sum(r["requests_cancelled"] for r in reports_by_id(client).values())

    before = cancelled()
    arm(app, [{"site": "load", "kind": "delay", "delay_s": 6, "checkpoint": "demo-m"}])
    t0 = time.monotonic()
    with pytest.raises(httpx.ReadTimeout):
        client.post("/v1/generate", json=body(checkpoint="demo-m", width=64, height=64, num_inference_steps=1),
                    timeout=1.5)
    wait_for(lambda: cancelled() == before + 1, timeout_s=60, what="the replica skipping the abandoned request")
    assert time.monotonic() - t0 < 30
    reports = reports_by_id(client).values()
    assert any("demo-m" in [e["name"] for e in r["entries"]] for r in reports)  # the load was kept
    assert all(r["in_flight"] == 0 for r in fresh_reports(client, time.time()).values())


def test_broken_checkpoints_answer_a_clear_error_and_others_keep_serving(app, client):
    assert post(client, "demo-s").status_code == 200
    before = fresh_reports(client, time.time())
    r = post(client, "demo-trunc")  # refused by its file size at the ingress: no replica evicts for it
    err = assert_error(r, 500, "checkpoint_unreadable", "'demo-trunc'", "unet/", "truncated")
    assert not any(p in r.text for p in host_paths(app)), err
    bad = post(client, "demo-badheader")
    err2 = assert_error(bad, 500, "checkpoint_unreadable", "'demo-badheader'", "unet/")
    assert not any(p in bad.text for p in host_paths(app)), err2
    cfg = post(client, "demo-badconfig")  # estimated fine; its load fails on the replica
    err3 = assert_error(cfg, 500, "checkpoint_load_failed", "'demo-badconfig'")
    assert not any(p in cfg.text for p in host_paths(app)), err3
    assert post(client, "demo-s", seed=3).status_code == 200
    assert post(client, "demo-xs").status_code == 200
    after = fresh_reports(client, time.time())
    assert total(after, "load_failures") == total(before, "load_failures") + 1  # demo-badconfig's only
    names = {e["name"] for rep in after.values() for e in rep["entries"]}
    assert names == {"demo-s", "demo-xs"}, "nothing of a failed load stays resident"
    assert all(rep["leaked_modules"] == 0 for rep in after.values())
    listed = [c["name"] for c in client.get("/v1/checkpoints").json()]
    assert "demo-badheader" not in listed and "demo-trunc" not in listed and set(GOOD) <= set(listed)


# ---- security --------------------------------------------------------------------------------
def test_admin_routes_need_the_bearer_token_and_never_echo_it(app, client):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {ADMIN_TOKEN}"},
                    {"Authorization": ADMIN_TOKEN}, {"Authorization": f"Bearer {ADMIN_TOKEN}x"}):
        r = client.post("/v1/admin/release", json={}, headers=headers)
        assert_error(r, 401, "unauthorized", "Bearer")
        assert ADMIN_TOKEN not in r.text and "wrong" not in r.text
    assert admin(client, "/v1/admin/release").status_code == 200


def test_admin_routes_are_off_when_no_token_is_configured(app):
    client = app["client"]
    for headers in ({}, {"Authorization": f"Bearer {ADMIN_TOKEN}"}, {"Authorization": "Bearer x"}):
        for route in ("/notoken/v1/admin/release", "/notoken/v1/admin/offload"):
            r = client.post(route, json={}, headers=headers)
            assert_error(r, 403, "admin_disabled", NO_TOKEN_ENV)
    assert client.get("/notoken/healthz").json() == {"status": "ok"}


def test_fault_injection_seam_is_off_by_default(app):
    from ray import serve

    handle = serve.get_deployment_handle("ModelReplica", app_name="notoken")
    r = handle.inject_faults.remote([{"site": "load", "kind": "oom"}]).result(timeout_s=30)
    assert r["status"] == 403 and r["error"]["code"] == "fault_injection_disabled"


# ---- load and backpressure -------------------------------------------------------------------
def test_a_burst_past_the_ingress_limit_is_refused_in_the_documented_shape(app):
    """12 requests at once at an ingress that holds 3: the rest are 503 overloaded, JSON,
    Retry-After: 1, from the ingress itself. Serve's own refusal (its queue full) is plain
    text without Retry-After; build_app gives Serve's limits room above the ingress's."""
    port = app["port"]
    body = {"checkpoint": "demo-xs", "prompt": "p", "width": 128, "height": 128, "num_inference_steps": 10}
    answers: list[httpx.Response] = []
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120,
                      limits=httpx.Limits(max_connections=20, max_keepalive_connections=20)) as c:
        assert c.post("/notoken/v1/generate", json=dict(body, num_inference_steps=1)).status_code == 200  # warm
        threads = [threading.Thread(target=lambda: answers.append(c.post("/notoken/v1/generate", json=body)))
                   for _ in range(12)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    codes = sorted(r.status_code for r in answers)
    assert len(answers) == 12 and set(codes) <= {200, 503} and codes.count(200) >= 3, codes
    for r in answers:
        assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.text[:200])
        if r.status_code == 503:
            assert r.headers.get("retry-after") == "1" and r.json()["error"]["code"] == "overloaded", r.text[:200]
    assert codes.count(503) >= 1, codes


N_LOAD = 500


def test_500_concurrent_requests_get_200_or_503_and_nothing_is_lost(app, client):
    port = app["port"]
    seen_over: list[dict[str, Any]] = []
    stop = threading.Event()

    def watch():
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as c:
            while not stop.wait(0.25):
                try:
                    reps = c.get("/v1/status").json()["replicas"]
                except (httpx.HTTPError, ValueError):
                    continue
                seen_over.extend(r for r in reps if r["device_used_bytes"] > r["device_budget_bytes"])

    async def one(c: httpx.AsyncClient, i: int) -> tuple[int, dict[str, Any], str | None]:
        r = await c.post("/v1/generate", json=body(checkpoint=GOOD[i % len(GOOD)], seed=i))
        return r.status_code, r.json(), r.headers.get("retry-after")

    async def run() -> list[Any]:
        limits = httpx.Limits(max_connections=N_LOAD, max_keepalive_connections=N_LOAD)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", limits=limits, timeout=90) as c:
            return await asyncio.wait_for(
                asyncio.gather(*(one(c, i) for i in range(N_LOAD)), return_exceptions=True), timeout=150)

    watcher = threading.Thread(target=watch)
    watcher.start()
    started = time.monotonic()
    try:
        results = asyncio.run(run())
    finally:
        stop.set()
        watcher.join()
    elapsed_s = time.monotonic() - started
    errors = [r for r in results if isinstance(r, BaseException)]
    assert errors == [], errors[:3]  # none lost, none hung past the client timeout
    codes = [status_code for status_code, _, _ in results]
    summary = {c: codes.count(c) for c in sorted(set(codes))}
    print(f"load: {N_LOAD} requests in {elapsed_s:.1f} s: {summary}")
    assert set(codes) <= {200, 503}, summary
    assert codes.count(200) >= 16, summary  # at least the replicas' ongoing capacity was served
    for status_code, payload, retry_after in results:
        if status_code == 503:
            assert payload["error"]["code"] == "overloaded" and retry_after == "1", payload
        else:
            assert payload["checkpoint"] in GOOD and payload["images"]
    assert seen_over == []
    reps = fresh_reports(client, time.time())
    assert all(r["leaked_modules"] == 0 for r in reps.values())
    for rid, rep in reps.items():
        timeline = app["replicas"].report.remote(True, _target_replica=rid).result(timeout_s=30)["timeline"]
        assert max(sample[1] for sample in timeline) <= rep["device_budget_bytes"]
    assert post(client, "demo-xs").status_code == 200
    print(f"load: max device bytes per replica {[max(x[1] for x in app['replicas'].report.remote(True, _target_replica=rid).result(timeout_s=30)['timeline']) for rid in reps]}")


# ---- replica death ---------------------------------------------------------------------------
def _kill_replica_holding(app, checkpoint: str, site: str) -> dict[str, Any]:
    """Start a request for ``checkpoint`` held 15 s at ``site``, kill the replica serving it."""
    import ray

    client = app["client"]
    arm(app, [{"site": site, "kind": "delay", "delay_s": 15.0, "checkpoint": checkpoint}])
    out: dict[str, Any] = {}

    def send():
        started = time.monotonic()
        out["response"] = post(client, checkpoint)
        out["elapsed_s"] = time.monotonic() - started

    sender = threading.Thread(target=send)
    sender.start()

    def stuck_replica():
        return next((s["replica"] for s in arm(app, [], clear=False) if s["active"]), None)

    victim = wait_for(stuck_replica, timeout_s=20, what=f"a replica stuck at {site}")
    name = next(a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"].endswith(victim))
    ray.kill(ray.get_actor(name, namespace="serve"), no_restart=True)
    killed_s = time.monotonic()
    sender.join(timeout=REQUEST_TIMEOUT_S + 10)
    assert not sender.is_alive(), "the request hung past the request timeout"
    out["victim"], out["after_kill_s"] = victim, time.monotonic() - killed_s
    # Right away (before Serve replaces it), new requests go to the surviving replica only.
    survivors = {post(client, "demo-xs", seed=i).json().get("replica") for i in range(4)}
    out["survivors"] = survivors
    arm_survivor = [rid for rid in reports_by_id(client) if rid != victim]
    for rid in arm_survivor:
        app["replicas"].inject_faults.remote([], True, _target_replica=rid).result(timeout_s=30)
    return out


@pytest.mark.parametrize("site", ["load", "inference"])
def test_replica_killed_mid_request_answers_503_and_is_replaced(app, client, site):
    out = _kill_replica_holding(app, "demo-s", site)
    r = out["response"]
    print(f"killed mid-{site}: {r.status_code} {r.text[:200]} after {out['elapsed_s']:.1f} s "
          f"({out['after_kill_s']:.1f} s after the kill); next requests served by {out['survivors']}")
    if r.status_code == 503:  # answered at once, not after the request timeout
        assert_error(r, 503, "replica_unavailable", "retry")
        assert r.headers["Retry-After"] == "1"
        assert out["after_kill_s"] < 10
    else:  # Serve retried it on the other replica (where the delay was armed too)
        assert r.status_code == 200, r.text
        assert r.json()["replica"] != out["victim"]
    assert out["elapsed_s"] < REQUEST_TIMEOUT_S + 5
    assert out["victim"] not in out["survivors"] and None not in out["survivors"], out["survivors"]
    # Serve replaces the dead replica; the router reports two live replicas again.
    reps = wait_for(lambda: (r := reports_by_id(client)) and len(r) == 2 and out["victim"] not in r and r,
                    timeout_s=90, what="a replacement replica")
    assert all(rep["leaked_modules"] == 0 for rep in reps.values())
    assert post(client, "demo-s").status_code == 200
