"""Multi-node proof of the KubeRay deployment, on one machine.

A 3-node Ray cluster (``ray.cluster_utils.Cluster``): a head node without GPU that runs the
dashboard, the Serve controller and the Router ingress, and two worker nodes that declare one
logical GPU each. The application is deployed the way KubeRay deploys ``serveConfigV2``: the
config document is PUT to the dashboard's ``/api/serve/applications/`` (a ServeDeploySchema),
not ``serve.run`` of a Python object.

The deployed config is serve_config.yaml's application with ``replica.num_gpus: 1`` (as in
k8s/rayservice.yaml) and ``replica.profile: cpu`` (the GPUs are logical: the replica sees no
CUDA device and keeps serve_config.yaml's 140 MB cpu budget). See docs/kuberay.md,
"Multi-node proof", for what this shows and what it cannot.

Tests run in file order on one module-scoped cluster; the last one kills a worker node.
"""

from __future__ import annotations

import copy
import os
import time
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from typing import Any

import httpx
import pytest
import yaml

from tests.serve_harness import ROOT, deep_update, free_port, wait_for

pytestmark = pytest.mark.integration

APP = "memrouter"
PERIOD_S = 0.5
BUDGET = 140_000_000
# Test-only changes to serve_config.yaml's application, on top of the two the brief of this
# proof names (num_gpus 1 as in k8s/, profile cpu because the GPUs are logical):
# - num_cpus 0: worker nodes declare no CPU, so the Router ingress (0.25 CPU) can only be
#   placed on the head and survives the loss of a worker, while the GPU places one replica
#   per worker node.
# - a short routing-stats period so that reports follow the requests quickly.
PATCH = {
    "replica": {
        "num_replicas": 2,
        "num_gpus": 1,
        "num_cpus": 0,
        "profile": "cpu",
        "cpu_budget_bytes": BUDGET,
        "routing_stats_period_s": PERIOD_S,
        "spill_queue_len": 16,  # a queue of 6 slow requests stays on the replica that holds demo-l
        "idle_check_period_s": 0.25,
        # Nothing idles out during the test: placements stay where the requests put them.
        "profile_overrides": {"idle_offload_s": 600, "idle_release_s": 1200},
    },
}
# GCS declares a hard-killed node dead after period * threshold (default 3 s * 5); shortened
# so that the test does not spend its time waiting for the default detection.
SYSTEM_CONFIG = {"health_check_period_ms": 1000, "health_check_failure_threshold": 3}
CLIENT_TIMEOUT_S = 60.0
# Ray Serve's per-worker-node override of the proxy's HTTP port (the head keeps http_options.port).
WORKER_PORT_ENV = "RAY_SERVE_WORKER_PROXY_HTTP_PORT"


def deploy_document(http_port: int) -> dict[str, Any]:
    """serve_config.yaml as a ServeDeploySchema document (what KubeRay PUTs), patched."""
    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    doc = copy.deepcopy(doc)
    doc["http_options"]["port"] = http_port
    (app,) = doc["applications"]
    assert app["name"] == APP and app["import_path"] == "deployments.app:app"
    deep_update(app["args"], PATCH)
    return doc


def serve_details(dash: httpx.Client) -> dict[str, Any]:
    r = dash.get("/api/serve/applications/")
    assert r.status_code == 200, r.text
    return r.json()


def running_replicas(dash: httpx.Client, deployment: str) -> dict[str, dict[str, Any]]:
    """The controller's RUNNING replicas of ``deployment``: replica_id -> details (node_id, pid...)."""
    app = serve_details(dash).get("applications", {}).get(APP)
    if not app:
        return {}
    reps = app["deployments"].get(deployment, {}).get("replicas", [])
    return {r["replica_id"]: r for r in reps if r["state"] == "RUNNING"}


def report_ids(client: httpx.Client) -> set[str]:
    r = client.get("/v1/status")
    assert r.status_code == 200, r.text
    return {x["replica_id"] for x in r.json()["replicas"]}


def reports(client: httpx.Client) -> dict[str, dict[str, Any]]:
    r = client.get("/v1/status")
    assert r.status_code == 200, r.text
    return {x["replica_id"]: x for x in r.json()["replicas"]}


def generate(client: httpx.Client, checkpoint: str, seed: int = 0) -> dict[str, Any]:
    r = client.post("/v1/generate", json={"checkpoint": checkpoint, "prompt": "a red cube", "seed": seed})
    assert r.status_code == 200, r.text
    return r.json()


def settle(client: httpx.Client, checkpoint: str, replica: str) -> dict[str, dict[str, Any]]:
    """Wait until the reports show ``checkpoint`` on ``replica``'s device and nothing in flight."""
    def done():
        reps = reports(client)
        if replica not in reps:
            return None
        entry = next((e for e in reps[replica]["entries"] if e["name"] == checkpoint), None)
        ok = entry is not None and entry["tier"] == "device" and all(r["in_flight"] == 0 for r in reps.values())
        return reps if ok else None

    return wait_for(done, what=f"{checkpoint} resident on {replica}")


@pytest.fixture(scope="module")
def cluster():
    from ray.cluster_utils import Cluster

    from deployments.demo import ensure_demo_checkpoints

    ensure_demo_checkpoints()  # the replicas find them built (default cache dir)
    import ray
    from ray import serve

    dash_port, http_port = free_port(), free_port()
    started = time.monotonic()
    c = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": True, "dashboard_host": "127.0.0.1",
        "dashboard_port": dash_port, "_system_config": SYSTEM_CONFIG,
    })
    try:
        workers, worker_ports = [], {}
        for _ in range(2):
            # Each worker node's Serve proxy gets a port of its own (on Kubernetes each pod has
            # its own IP), so that the client below talks to the head's proxy only.
            port = free_port()
            os.environ[WORKER_PORT_ENV] = str(port)  # inherited by the node's raylet and workers
            try:
                workers.append(c.add_node(num_cpus=0, num_gpus=1))
            finally:
                os.environ.pop(WORKER_PORT_ENV, None)
            worker_ports[workers[-1].node_id] = port
        c.wait_for_nodes()
        ray.init(address=c.address, log_to_driver=False, configure_logging=False)
        dash = httpx.Client(base_url=f"http://127.0.0.1:{dash_port}", timeout=CLIENT_TIMEOUT_S)
        client = httpx.Client(base_url=f"http://127.0.0.1:{http_port}", timeout=CLIENT_TIMEOUT_S)
        try:
            def dashboard_up():
                try:
                    return dash.get("/api/serve/applications/").status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(dashboard_up, timeout_s=120, period_s=0.5, what="the dashboard's Serve REST API")
            # What KubeRay does with serveConfigV2 (YAML -> JSON, PUT).
            r = dash.put("/api/serve/applications/", json=deploy_document(http_port))
            assert r.status_code == 200, r.text

            def app_running():
                app = serve_details(dash).get("applications", {}).get(APP)
                if app and app["status"] in ("DEPLOY_FAILED", "UNHEALTHY"):
                    raise AssertionError(f"deploy failed: {app['message']}")
                return app is not None and app["status"] == "RUNNING"

            wait_for(app_running, timeout_s=150, period_s=1.0, what="application RUNNING")
            wait_for(lambda: len(report_ids(client)) == 2, timeout_s=30, what="two replica reports")
            print(f"cluster + REST deploy ready in {time.monotonic() - started:.1f} s")
            yield {"cluster": c, "head": c.head_node, "workers": workers, "worker_ports": worker_ports,
                   "dash": dash, "client": client}
        finally:
            client.close()
            dash.close()
    finally:
        try:
            if ray.is_initialized():
                serve.shutdown()
        finally:
            ray.shutdown()
            c.shutdown()


def test_rest_deploy_puts_replicas_on_the_gpu_workers_and_the_ingress_on_the_head(cluster):
    dash = cluster["dash"]
    head_id = cluster["head"].node_id
    worker_ids = {w.node_id for w in cluster["workers"]}
    details = serve_details(dash)
    app = details["applications"][APP]
    assert app["deployed_app_config"]["args"]["replica"]["num_gpus"] == 1
    replicas = running_replicas(dash, "ModelReplica")
    assert len(replicas) == 2
    # One replica per worker node: each needs the node's only (logical) GPU.
    assert sorted(r["node_id"] for r in replicas.values()) == sorted(worker_ids)
    (router,) = running_replicas(dash, "Router").values()
    assert router["node_id"] == head_id
    assert details["controller_info"]["node_id"] == head_id
    # The replicas' own reports: same ids as the controller's, cpu profile, 140 MB each.
    reps = reports(cluster["client"])
    assert set(reps) == set(replicas)
    for rep in reps.values():
        assert (rep["profile"], rep["device"], rep["device_budget_bytes"]) == ("cpu", "cpu", BUDGET)
    # A proxy on every node (proxy_location: EveryNode), each answering on its own port.
    proxies = details["proxies"]
    assert sorted(proxies) == sorted([head_id, *worker_ids])
    assert {p["status"] for p in proxies.values()} == {"HEALTHY"}
    assert cluster["client"].get("/healthz").json() == {"status": "ok"}
    for port in cluster["worker_ports"].values():
        assert httpx.get(f"http://127.0.0.1:{port}/healthz", timeout=CLIENT_TIMEOUT_S).json() == {"status": "ok"}


def test_requests_are_routed_by_memory_across_the_two_nodes(cluster):
    client, dash = cluster["client"], cluster["dash"]
    node_of = {rid: r["node_id"] for rid, r in running_replicas(dash, "ModelReplica").items()}
    big = generate(client, "demo-l")  # ~104 MB of a 140 MB budget
    assert big["served_from"] == "disk"
    settle(client, "demo-l", big["replica"])
    other = generate(client, "demo-m")  # 30 MB + workspace does not fit beside demo-l: the other node
    assert other["replica"] != big["replica"]
    assert node_of[other["replica"]] != node_of[big["replica"]]
    assert other["served_from"] == "disk"
    reps = settle(client, "demo-m", other["replica"])
    assert [e["name"] for e in reps[big["replica"]]["entries"]] == ["demo-l"]  # nothing evicted
    assert [e["name"] for e in reps[other["replica"]]["entries"]] == ["demo-m"]
    assert reps[big["replica"]]["device_used_bytes"] > 90_000_000
    # Resident checkpoints keep going to the node that holds them.
    assert {generate(client, "demo-l", seed=i)["replica"] for i in range(3)} == {big["replica"]}
    assert {generate(client, "demo-m", seed=i)["replica"] for i in range(3)} == {other["replica"]}


def test_killing_a_worker_node_leaves_the_service_answering(cluster):
    c, client, dash = cluster["cluster"], cluster["client"], cluster["dash"]
    replicas = running_replicas(dash, "ModelReplica")
    victim_rid = generate(client, "demo-l")["replica"]  # resident there since the previous test
    (survivor_rid,) = set(replicas) - {victim_rid}
    victim_node = next(w for w in cluster["workers"] if w.node_id == replicas[victim_rid]["node_id"])
    victim_port = cluster["worker_ports"][victim_node.node_id]
    survivor_port = next(p for n, p in cluster["worker_ports"].items() if n != victim_node.node_id)

    def attempt(checkpoint: str, seed: int, **extra: Any) -> tuple[int | str, float, str | None]:
        t0 = time.monotonic()
        try:
            # Through the head's proxy; a new connection per request.
            with httpx.Client(base_url=client.base_url, timeout=CLIENT_TIMEOUT_S) as one:
                r = one.post("/v1/generate", json={"checkpoint": checkpoint, "prompt": "p", "seed": seed, **extra})
            code: int | str = r.status_code
            detail = r.json().get("replica") if code == 200 else r.json()["error"]["code"]
        except httpx.HTTPError as exc:
            code, detail = type(exc).__name__, None
        return code, time.monotonic() - t0, detail

    # Requests in flight on the victim when its node dies: six slow ones (10 steps, the demo's
    # maximum) for demo-l, which is resident there, so the router queues them all on the
    # victim (6 < spill_queue_len and < max_ongoing_requests); it runs one at a time. The
    # node is killed as soon as the first answers: the other five are running or queued.
    slow = {"num_inference_steps": 10}
    pool = ThreadPoolExecutor(6)
    in_flight = [pool.submit(attempt, "demo-l", 100 + i, **slow) for i in range(6)]
    done, _ = futures_wait(in_flight, timeout=CLIENT_TIMEOUT_S, return_when=FIRST_COMPLETED)
    first = next(iter(done)).result()
    assert first[0] == 200 and first[2] == victim_rid, first

    killed_s = time.monotonic()
    c.remove_node(victim_node, allow_graceful=False)  # SIGKILL: the node is lost, not drained
    interrupted = [f.result() for f in in_flight]
    pool.shutdown()
    print(f"victim {victim_rid}, survivor {survivor_rid}; in flight at the kill: {interrupted}; "
          f"all answered {time.monotonic() - killed_s:.2f} s after the kill")
    assert all(code in (200, 503) for code, _, _ in interrupted), interrupted
    # The requests still on the victim when its node died cannot have succeeded there.
    assert sum(code == 503 for code, _, _ in interrupted) >= 2, interrupted
    assert all(detail == victim_rid for code, _, detail in interrupted if code == 200), interrupted
    assert all(detail == "replica_unavailable" for code, _, detail in interrupted if code == 503), interrupted
    assert max(t for _, t, _ in interrupted) < CLIENT_TIMEOUT_S

    # The dead node's proxy is gone with it (a Kubernetes Service drops such a pod); the
    # surviving worker's proxy still answers.
    def refused() -> bool:
        try:
            httpx.get(f"http://127.0.0.1:{victim_port}/healthz", timeout=5)
        except httpx.ConnectError:
            return True
        return False

    wait_for(refused, timeout_s=30, what="the dead node's proxy port to refuse connections")
    assert httpx.get(f"http://127.0.0.1:{survivor_port}/healthz", timeout=CLIENT_TIMEOUT_S).status_code == 200

    with ThreadPoolExecutor(6) as pool:
        answers = list(pool.map(lambda i: attempt(("demo-l", "demo-m", "demo-xs")[i % 3], i), range(6)))
    print(f"after the kill ({time.monotonic() - killed_s:.1f} s): {answers}")
    assert all(code in (200, 503) for code, _, _ in answers), answers
    assert all(detail == survivor_rid for code, _, detail in answers if code == 200), answers
    assert max(t for _, t, _ in answers) < CLIENT_TIMEOUT_S

    # The router drops the dead replica; the controller lists only the survivor as running
    # (its replacement cannot be placed: no GPU left).
    wait_for(lambda: report_ids(client) == {survivor_rid}, timeout_s=60, what="status without the dead replica")
    wait_for(lambda: set(running_replicas(dash, "ModelReplica")) == {survivor_rid}, timeout_s=60,
             what="the controller to list only the survivor as running")
    print(f"dead replica dropped {time.monotonic() - killed_s:.1f} s after the kill")
    app = serve_details(dash)["applications"][APP]
    states = sorted(r["state"] for r in app["deployments"]["ModelReplica"]["replicas"])
    print(f"app {app['status']}, ModelReplica {app['deployments']['ModelReplica']['status']}, replicas {states}")

    # And the service works again on the remaining node, for every checkpoint.
    for name in ("demo-l", "demo-m", "demo-xs"):
        body = generate(client, name, seed=7)
        assert body["replica"] == survivor_rid
    done_s = time.time()
    print(f"report right after: leaked_modules {reports(client)[survivor_rid]['leaked_modules']}")

    def settled():  # a report taken after the last request, with nothing in flight
        reps = reports(client)
        rep = reps.get(survivor_rid)
        return reps if rep and rep["timestamp_s"] > done_s and rep["in_flight"] == 0 else None

    final = wait_for(settled, what="a report after the last request")
    assert set(final) == {survivor_rid}
    assert final[survivor_rid]["device_used_bytes"] <= BUDGET
    assert final[survivor_rid]["leaked_modules"] == 0
