"""Integration: the real Serve app in-process, 2 CPU replicas, real HTTP and handle calls.

One cluster for the module. Each test starts from released replicas (admin release) and
waits for reports instead of sleeping fixed times where it can.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from router.api import GenerateRequest, GenerateResponse
from tests.serve_harness import (ADMIN_TOKEN, admin, generate, release_all_and_wait, reports_by_id, running_app,
                                 status, wait_for)

pytestmark = pytest.mark.integration

PERIOD_S = 0.5
PATCH = {
    "replica": {
        "num_replicas": 2,
        "max_ongoing_requests": 16,
        # A burst of 10 for one checkpoint stays on one replica unless its queue reaches 16.
        "spill_queue_len": 16,
        "routing_stats_period_s": PERIOD_S,
        "idle_check_period_s": 0.25,
        "profile_overrides": {"idle_offload_s": 4, "idle_release_s": 8},
    },
}


@pytest.fixture(scope="module")
def app():
    with running_app(PATCH, env={"MEMROUTER_ADMIN_TOKEN": ADMIN_TOKEN}) as (client, handle):
        wait_for(lambda: len(status(client)["replicas"]) == 2, timeout_s=60, what="two replica reports")
        yield client, handle


@pytest.fixture
def client(app):
    client, _ = app
    release_all_and_wait(client)
    return client


def settle(client, checkpoint: str, replica: str) -> None:
    """Wait until the reports show ``checkpoint`` on ``replica``'s device and nothing in flight."""
    def done() -> bool:
        reps = reports_by_id(client)
        entry = next((e for e in reps[replica]["entries"] if e["name"] == checkpoint), None)
        return entry is not None and entry["tier"] == "device" and all(r["in_flight"] == 0 for r in reps.values())

    wait_for(done, what=f"{checkpoint} resident on {replica}")


def test_resident_checkpoint_gets_95_percent_of_requests(client):
    first = generate(client, "demo-s")
    settle(client, "demo-s", first["replica"])
    replicas = [generate(client, "demo-s", seed=i)["replica"] for i in range(50)]
    share = replicas.count(first["replica"]) / len(replicas)
    assert share >= 0.95, f"only {share:.0%} of requests went to the replica holding demo-s"


def test_burst_for_cold_checkpoint_loads_it_once(client):
    before = {rid: r["counters"]["disk_loads"] for rid, r in reports_by_id(client).items()}
    with ThreadPoolExecutor(10) as pool:
        results = list(pool.map(lambda i: generate(client, "demo-m", seed=i), range(10)))
    assert {r["checkpoint"] for r in results} == {"demo-m"}

    def loads_settled():
        reps = reports_by_id(client)
        if any(r["in_flight"] for r in reps.values()):
            return None
        return {rid: r["counters"]["disk_loads"] - before[rid] for rid, r in reps.items()}

    time.sleep(2 * PERIOD_S)
    loads = wait_for(loads_settled, what="reports after the burst")
    assert sum(loads.values()) == 1, f"demo-m was loaded {loads} times across replicas"
    holders = [rid for rid, r in reports_by_id(client).items() if any(e["name"] == "demo-m" for e in r["entries"])]
    assert len(holders) == 1
    assert sum(1 for r in results if r["served_from"] == "disk") == 1


def test_full_replica_sends_new_checkpoint_to_the_one_with_room(client):
    big = generate(client, "demo-l")  # ~104 MB of a 140 MB budget
    settle(client, "demo-l", big["replica"])
    other = generate(client, "demo-m")  # 30 MB + workspace: fits only on the other replica
    assert other["replica"] != big["replica"]
    assert other["served_from"] == "disk"
    settle(client, "demo-m", other["replica"])
    reps = reports_by_id(client)
    assert [e["name"] for e in reps[big["replica"]]["entries"]] == ["demo-l"]  # nothing evicted


def test_idle_entries_are_released_and_memory_returns_to_baseline(client):
    generate(client, "demo-xs")
    generate(client, "demo-s")
    wait_for(lambda: any(r["entries"] for r in status(client)["replicas"]), what="entries resident")

    def back_to_baseline() -> bool:
        reps = status(client)["replicas"]
        return all(not r["entries"] and r["device_used_bytes"] == 0 for r in reps)

    wait_for(back_to_baseline, timeout_s=30, what="idle release (idle_release_s=8)")
    counters = [r["counters"] for r in status(client)["replicas"]]
    assert sum(c["releases"] for c in counters) >= 2
    assert all(r["leaked_modules"] == 0 for r in status(client)["replicas"])


def test_http_and_handle_give_identical_images(app, client):
    _, handle = app
    http = generate(client, "demo-xs", seed=1234, width=64, height=64, num_inference_steps=2)
    via_handle = handle.generate.remote(GenerateRequest(checkpoint="demo-xs", prompt="a red cube", seed=1234, width=64,
                                                        height=64, num_inference_steps=2)).result(timeout_s=120)
    assert isinstance(via_handle, GenerateResponse)
    assert via_handle.images == http["images"]
    other_seed = generate(client, "demo-xs", seed=1235, width=64, height=64, num_inference_steps=2)
    assert other_seed["images"] != http["images"]


def test_a_deployment_fanning_out_through_the_app_handle_gets_every_answer(app):
    """Concurrent calls from inside one request share its Serve request id; the Router
    sends each replica call under its own (router.core.remote_as_own_request)."""
    from ray import serve

    from deployments.app import INGRESS_DEPLOYMENT

    @serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
    class FanOut:
        def __init__(self) -> None:
            self.router = serve.get_deployment_handle(INGRESS_DEPLOYMENT, app_name="memrouter")

        async def __call__(self, checkpoints: list[str]) -> list[tuple[str, int]]:
            import asyncio

            answers = await asyncio.gather(*(
                self.router.generate.remote(GenerateRequest(checkpoint=c, prompt="p", seed=i, width=64, height=64,
                                                            num_inference_steps=1))
                for i, c in enumerate(checkpoints)))
            return [(a.checkpoint, a.seed) for a in answers]

    fan_out = serve.run(FanOut.bind(), name="fanout", route_prefix=None)
    try:
        wanted = ["demo-xs", "demo-s", "demo-xs", "demo-s", "demo-m", "demo-xs"]
        assert fan_out.remote(wanted).result(timeout_s=120) == [(c, i) for i, c in enumerate(wanted)]
    finally:
        serve.delete("fanout")


def test_handle_errors_are_typed(app):
    from router.ingress import ServiceError

    _, handle = app
    with pytest.raises(ServiceError) as info:
        handle.generate.remote(GenerateRequest(checkpoint="no-such", prompt="x")).result(timeout_s=60)
    assert info.value.status == 404 and info.value.code == "unknown_checkpoint"
    # A bad field is a 422 naming it, as over HTTP: from a dict (pydantic's ValidationError
    # cannot cross to the caller), and from a request whose fields skipped validation.
    good = GenerateRequest(checkpoint="demo-xs", prompt="x", width=64, height=64)
    for bad, field in (({"checkpoint": "demo-xs"}, "prompt: Field required"),
                       ({"checkpoint": "demo-xs", "prompt": "x", "width": "64"}, "width: Input should be a valid integer"),
                       (good.model_copy(update={"num_images": 0}), "num_images: Input should be greater than or equal to 1"),
                       (good.model_copy(update={"guidance_scale": float("nan")}), "guidance_scale: ")):
        with pytest.raises(ServiceError) as info:
            handle.generate.remote(bad).result(timeout_s=60)
        assert (info.value.status, info.value.code) == (422, "invalid_request"), bad
        assert field in info.value.message, (field, info.value.message)


def test_local_router_serves_from_this_process_as_the_ingress_does(client):
    """deployments.client.LocalRouter: the Router's path in the test process, the replica
    deployment's handle called directly (its request router runs here)."""
    from deployments.client import LocalRouter
    from tests.serve_harness import default_args, deep_update

    with LocalRouter(deep_update(default_args(), PATCH)) as local:
        _check_local_router(local, client)


def _check_local_router(local, client) -> None:
    from pydantic import ValidationError

    from deployments.client import ServiceError

    body = {"checkpoint": "demo-xs", "prompt": "a red cube", "seed": 1234, "width": 64, "height": 64,
            "num_inference_steps": 2}
    via_ingress = generate(client, **{k: v for k, v in body.items() if k != "prompt"})
    got = local.generate(body)
    assert isinstance(got, GenerateResponse) and got.checkpoint == "demo-xs"
    assert got.images == via_ingress["images"]
    import asyncio

    assert asyncio.run(local.generate_async(body)).images == via_ingress["images"]
    st = local.status()  # this process's request router: the reports and its own decisions
    assert st["totals"]["replicas"] == 2 and st["router"]["decisions"] >= 2
    with pytest.raises(ServiceError) as info:
        local.generate({"checkpoint": "no-such", "prompt": "x"})
    assert (info.value.status, info.value.code) == (404, "unknown_checkpoint")
    with pytest.raises(ServiceError) as info:
        local.generate(dict(body, width=4096, height=4096))  # past demo-xs's max size
    assert (info.value.status, info.value.code) == (422, "invalid_request")
    with pytest.raises(ValidationError, match="prompt"):
        local.generate({"checkpoint": "demo-xs"})
    skipped = GenerateRequest(**body).model_copy(update={"num_images": 0})  # model_copy does not validate
    with pytest.raises(ValidationError, match="num_images"):
        local.generate(skipped)


def test_mixed_run_never_exceeds_budget_and_answers_everything(client):
    names = ["demo-xs", "demo-s", "demo-m", "demo-l"]
    weights = [8, 4, 2, 1]
    import random

    rng = random.Random(3)
    work = rng.choices(names, weights=weights, k=200)
    before = {k: sum(r["counters"][k] for r in status(client)["replicas"]) for k in ("disk_loads", "hits")}
    over: list[dict] = []
    seen = []
    stop = threading.Event()

    def watch():
        while not stop.wait(0.1):
            for r in status(client)["replicas"]:
                seen.append(r["device_used_bytes"])
                if r["device_used_bytes"] > r["device_budget_bytes"]:
                    over.append(r)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        with ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(
                lambda item: client.post("/v1/generate", json={"checkpoint": item[1], "prompt": "p", "seed": item[0]}).status_code,
                enumerate(work)))
    finally:
        stop.set()
        watcher.join()
    assert codes.count(200) == 200, {c: codes.count(c) for c in set(codes)}
    assert len(seen) > 10 and max(seen) > 0
    assert over == []
    done_s = time.time()
    final = wait_for(lambda: (reps := status(client)["replicas"]) and all(
        r["timestamp_s"] > done_s and r["in_flight"] == 0 for r in reps) and reps, what="reports after the run")
    assert all(r["leaked_modules"] == 0 for r in final)
    # The four checkpoints (~144 MB + workspace) exceed one 140 MB budget: placement splits
    # them across the two replicas instead of thrashing one, so almost every request hits.
    loads = sum(r["counters"]["disk_loads"] for r in final) - before["disk_loads"]
    hits = sum(r["counters"]["hits"] for r in final) - before["hits"]
    print(f"mixed run: {loads} disk loads, {hits} hits, evictions {[r['counters']['evictions'] for r in final]}")
    assert loads <= 8 and loads + hits == 200


def test_status_checkpoints_and_health(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    cps = client.get("/v1/checkpoints").json()
    assert [c["name"] for c in cps] == ["demo-xs", "demo-s", "demo-m", "demo-l"]
    sizes = [c["weights_bytes"] for c in cps]
    assert sizes == sorted(sizes) and sizes[-1] > 40 * sizes[0]
    st = status(client)
    assert st["totals"]["replicas"] == 2
    assert st["totals"]["device_budget_bytes"] == 2 * 140_000_000


def test_router_rebuilds_only_the_view_of_the_replica_that_changed(client):
    """Ray hands the router a new stats dict for every replica on each broadcast (any one
    replica's report causes one); a replica whose state did not change keeps its view."""
    first = generate(client, "demo-xs")
    settle(client, "demo-xs", first["replica"])
    time.sleep(4 * PERIOD_S)  # several reports of both replicas, and broadcasts
    before = status(client)["router"]
    second = generate(client, "demo-xs")
    after = status(client)["router"]
    assert second["replica"] == first["replica"] and second["served_from"] == "device"
    assert after["decisions"] - before["decisions"] >= 1
    # The holder's view is rebuilt (it loaded, ran and released demo-xs since its last view);
    # the other replica did nothing and keeps its view through every broadcast.
    assert after["views_built"] - before["views_built"] == 1, (before, after)


def test_admin_offload_and_release_need_the_token(client):
    generate(client, "demo-xs")
    assert client.post("/v1/admin/release", json={}).status_code == 401
    assert client.post("/v1/admin/release", json={}, headers={"Authorization": "Bearer wrong"}).status_code == 401
    r = admin(client, "/v1/admin/release", {"checkpoint": "demo-xs"})
    assert r.status_code == 200
    released = [n for rep in r.json()["replicas"] for n in rep.get("released", [])]
    assert released == ["demo-xs"]
    # The replicas are asked at once; each answer comes from the replica it was sent to.
    assert [rep["replica"] for rep in r.json()["replicas"]] == sorted(reports_by_id(client))
    assert admin(client, "/v1/admin/offload", {"checkpoint": "nope"}).status_code == 404
    # No body at all: every checkpoint (the README's {checkpoint?}), after the token check.
    assert client.post("/v1/admin/release").status_code == 401
    token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    r = client.post("/v1/admin/release", headers=token)
    assert r.status_code == 200 and len(r.json()["replicas"]) == 2, r.text
