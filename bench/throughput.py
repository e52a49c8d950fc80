"""Placement throughput: the same trace, the same Ray cluster, four systems, side by side.

    flock /tmp/memrouter-ray.lock .venv/bin/python -m bench.throughput            # ~5-7 min
    flock /tmp/memrouter-ray.lock .venv/bin/python -m bench.throughput --quick    # ~2 min

(a) ``memrouter``: the real app (deployments/app.py build_app; serve_config.yaml's args with
    the benchmark's registry, budget and queue limits patched in);
(b) ``mux``: Ray Serve ``@serve.multiplexed(max_num_models_per_replica=K)``;
(c) ``unload``: load, run, free every request; (d) ``offload``: offload to host after every
    request, reload on the next (bench/peers.py says what that models on CPU).

All four: 2 model replicas (num_cpus 0.5, max_ongoing_requests 8, unbounded queues), one
ingress replica, the same per-replica byte budget, HTTP POST /v1/generate through an ingress
deployment. The trace (bench/trace.py) is replayed open-loop: each request is sent at its
arrival time whatever the state of earlier ones, and its latency is measured from that
arrival time to the answer (no coordinated omission). Every system starts cold (fresh
replica processes, nothing loaded).

Writes bench/results/throughput.{json,md}, throughput_latency_cdf.png and
throughput_memory_<system>.png.
"""

from __future__ import annotations

import argparse
import asyncio
import copy
import json
import socket
import statistics
import sys
import time
from pathlib import Path
from typing import Any

from bench.machine import machine_info, machine_md
from bench.trace import DEFAULT_POPULARITY, TraceParams, ensure_catalog, generate_trace, trace_summary, weights_bytes, \
    workspace_bytes

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
SYSTEMS = {
    "a": ("memrouter", "this router (memory-aware placement + byte-budget LRU cache)"),
    "b": ("mux", "Ray Serve @serve.multiplexed, max_num_models_per_replica=K"),
    "c": ("unload", "unload after every request"),
    "d": ("offload", "offload to host after every request, reload on the next"),
}
TARGETS = {"throughput_vs_b": 2.0, "throughput_vs_c": 5.0, "p99_vs_b": 0.5}


def extra_machine_info() -> dict[str, Any]:
    import ray
    import torch

    info = machine_info()
    gpu = None
    if torch.cuda.is_available():
        gpu = torch.cuda.get_device_name(0)
    driver = None
    try:
        import subprocess

        driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    info.update({"gpu": gpu or "none (CPU only)", "gpu_driver": driver or "n/a", "torch": torch.__version__,
                 "ray": ray.__version__, "torch_threads": torch.get_num_threads()})
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        pass
    return info


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(xs: list[float], q: float) -> float | None:
    """Linear-interpolated percentile (q in [0, 100]); None for an empty list."""
    if not xs:
        return None
    s = sorted(xs)
    k = (len(s) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


# ---- replay ------------------------------------------------------------------------------------
async def replay(base_url: str, trace: list[Any], params: TraceParams, timeout_s: float) -> tuple[list[dict[str, Any]], float]:
    import httpx

    results: list[dict[str, Any]] = []
    limits = httpx.Limits(max_connections=2048, max_keepalive_connections=256)
    async with httpx.AsyncClient(base_url=base_url, timeout=timeout_s, limits=limits) as client:
        t0 = time.perf_counter()
        wall0 = time.time()

        async def one(req: Any) -> None:
            delay = req.at_s - (time.perf_counter() - t0)
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter() - t0
            rec: dict[str, Any] = {"index": req.index, "checkpoint": req.checkpoint, "at_s": req.at_s,
                                   "sent_s": round(sent, 4), "in_burst": req.in_burst}
            try:
                r = await client.post("/v1/generate", json=req.body(params))
                rec["status"] = r.status_code
                data = r.json()
                if r.status_code == 200:
                    rec.update(served_from=data.get("served_from"), replica=data.get("replica"),
                               timings_ms=data.get("timings_ms"))
                else:
                    rec["error"] = (data.get("error") or {}).get("code")
            except Exception as exc:  # noqa: BLE001 - counted as a failure
                rec["status"] = -1
                rec["error"] = type(exc).__name__
            done = time.perf_counter() - t0
            rec["done_s"] = round(done, 4)
            rec["latency_s"] = round(done - req.at_s, 4)
            results.append(rec)

        await asyncio.gather(*(one(r) for r in trace))
    results.sort(key=lambda r: r["index"])
    return results, wall0


def wait_http(base_url: str, path: str, timeout_s: float = 120.0) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(base_url + path, timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{base_url}{path} did not answer 200 within {timeout_s} s")


# ---- per-system deploy / collect ---------------------------------------------------------------
def memrouter_args(entries: list[dict[str, Any]], budget: int, max_ongoing: int) -> dict[str, Any]:
    import yaml

    doc = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    args = copy.deepcopy(doc["applications"][0]["args"])
    args["registry"] = entries
    args["replica"].update(num_replicas=2, num_gpus=0, num_cpus=0.5, max_ongoing_requests=max_ongoing,
                           max_queued_requests=-1, profile="cpu", cpu_budget_bytes=budget)
    args["ingress"].update(num_replicas=1, max_queued_requests=-1, request_timeout_s=600)
    return args


def collect_memrouter(app_name: str, base_url: str) -> list[dict[str, Any]]:
    import httpx
    from ray import serve

    time.sleep(1.5)  # one routing-stats period, so that /v1/status lists both replicas
    ids = [r["replica_id"] for r in httpx.get(base_url + "/v1/status", timeout=30).json()["replicas"]]
    handle = serve.get_deployment_handle("ModelReplica", app_name=app_name)
    reps = [handle.report.remote(timeline=True, _target_replica=rid).result(timeout_s=60) for rid in sorted(ids)]
    return reps


def collect_peer(app_name: str, deployment: str, replicas: int = 2) -> list[dict[str, Any]]:
    from ray import serve

    handle = serve.get_deployment_handle(deployment, app_name=app_name)
    seen: dict[str, dict[str, Any]] = {}
    for _ in range(60):
        rep = handle.report.remote(timeline=True).result(timeout_s=60)
        seen[rep["replica_id"]] = rep
        if len(seen) >= replicas:
            break
    return [seen[k] for k in sorted(seen)]


def run_system(key: str, app: Any, app_name: str, port: int, trace: list[Any], params: TraceParams,
               collect: Any, health_path: str) -> dict[str, Any]:
    from ray import serve

    t = time.perf_counter()
    serve.run(app, name=app_name, route_prefix=f"/{app_name}")
    base = f"http://127.0.0.1:{port}/{app_name}"
    wait_http(base, health_path)
    deploy_s = time.perf_counter() - t
    print(f"[{key}] {app_name} deployed in {deploy_s:.1f} s; replaying {len(trace)} requests", flush=True)
    t = time.perf_counter()
    results, wall0 = asyncio.run(replay(base, trace, params, timeout_s=900))
    replay_s = time.perf_counter() - t
    reports = collect(app_name, base)
    serve.delete(app_name)
    time.sleep(2.0)  # let the replica processes exit before the next system starts
    ok = sum(1 for r in results if r["status"] == 200)
    print(f"[{key}] done in {replay_s:.1f} s: {ok}/{len(results)} ok", flush=True)
    return {"deploy_s": round(deploy_s, 2), "replay_s": round(replay_s, 2), "wall0": wall0, "requests": results,
            "reports": reports}


def warmup(entries: list[dict[str, Any]], budget: int, port: int, params: TraceParams) -> None:
    """Unmeasured: warm the cluster, the page cache (checkpoint files, libraries) and the
    proxy with a throwaway (c) app that loads every checkpoint once, so that whichever
    system runs first does not pay for it. Each measured system still starts its own fresh
    replica processes (cold: imports and first torch calls are part of every system's run)."""
    import httpx
    from ray import serve

    from bench.peers import build_peer_app
    from bench.trace import TraceRequest

    t = time.perf_counter()
    serve.run(build_peer_app("unload", entries, budget), name="warmup", route_prefix="/warmup")
    base = f"http://127.0.0.1:{port}/warmup"
    wait_http(base, "/healthz")
    for i, e in enumerate(entries):
        body = TraceRequest(i, 0.0, e["name"], i, False).body(params)
        httpx.post(base + "/v1/generate", json=body, timeout=300)
    serve.delete("warmup")
    time.sleep(2.0)
    print(f"warm-up done in {time.perf_counter() - t:.1f} s", flush=True)


# ---- metrics -----------------------------------------------------------------------------------
def summarize(key: str, raw: dict[str, Any], budget: int) -> dict[str, Any]:
    reqs = raw["requests"]
    ok = [r for r in reqs if r["status"] == 200]
    lat = [r["latency_s"] for r in ok]
    makespan = max((r["done_s"] for r in reqs), default=0.0)
    errors: dict[str, int] = {}
    for r in reqs:
        if r["status"] != 200:
            k = f"{r['status']}:{r.get('error')}"
            errors[k] = errors.get(k, 0) + 1
    served: dict[str, int] = {}
    for r in ok:
        served[r.get("served_from") or "?"] = served.get(r.get("served_from") or "?", 0) + 1
    reps = raw["reports"]
    timelines = {}
    if key == "a":
        c = {k: sum(r["counters"].get(k, 0) for r in reps) for k in reps[0]["counters"]} if reps else {}
        counters = {"disk_loads": c.get("disk_loads", 0), "host_reloads": c.get("host_reloads", 0),
                    "evictions": c.get("evictions", 0), "frees_after_request": 0, "offloads": c.get("offloads", 0),
                    "idle_releases": c.get("releases", 0) - c.get("evictions", 0),  # releases count every free
                    "oom": c.get("oom_recoveries", 0),
                    "hits": c.get("hits", 0)}
        peaks, budgets = [], []
        for r in reps:
            tl = r.get("timeline", [])
            timelines[r["replica_id"]] = [(t, d, h) for t, d, h, _ in tl]
            # The replica's running peak: its timeline is a ring that a long run overflows.
            peaks.append(max(r.get("peak_device_used_bytes", 0), max((d for _, d, _, _ in tl), default=0),
                             r["device_used_bytes"]))
            budgets.append(r["device_budget_bytes"])
        leaked = sum(r.get("leaked_modules", 0) for r in reps)
    else:
        c = {k: sum(r["counters"].get(k, 0) for r in reps) for k in reps[0]["counters"]} if reps else {}
        counters = {"disk_loads": c.get("disk_loads", 0), "host_reloads": c.get("host_reloads", 0),
                    "evictions": c.get("evictions", 0), "frees_after_request": c.get("releases", 0),
                    "offloads": c.get("offloads", 0), "idle_releases": 0, "oom": c.get("oom", 0),
                    "hits": c.get("hits", 0)}
        peaks = [r["peak_device_bytes"] for r in reps]
        budgets = [r["budget_bytes"] for r in reps]
        for r in reps:
            timelines[r["replica_id"]] = [(t, d, h) for t, d, h, _ in r.get("timeline", [])]
        leaked = sum(r.get("leaked_modules", 0) for r in reps)
    oom_answers = sum(1 for r in reqs if r.get("error") in ("out_of_memory",))
    timings = [r.get("timings_ms") or {} for r in ok]

    def mean_of(field: str) -> float | None:
        xs = [t[field] for t in timings if field in t]
        return round(statistics.fmean(xs), 1) if xs else None

    peak = max(peaks, default=0)
    after_n = sum(r.get("after_answers", 0) for r in reps)
    after_ms = round(1000 * sum(r.get("after_answer_s", 0.0) for r in reps) / after_n, 1) if after_n else None
    return {
        "system": key, "name": SYSTEMS[key][0], "description": SYSTEMS[key][1],
        "requests": len(reqs), "ok": len(ok), "errors": errors,
        "makespan_s": round(makespan, 3),
        "throughput_rps": round(len(ok) / makespan, 4) if makespan else 0.0,
        "latency_s": {"p50": percentile(lat, 50), "p95": percentile(lat, 95), "p99": percentile(lat, 99),
                      "mean": round(statistics.fmean(lat), 4) if lat else None, "max": max(lat, default=None)},
        "served_from": served,
        "counters": counters,
        "out_of_memory": counters["oom"] + oom_answers,
        "peak_device_bytes": peak,
        "peak_device_bytes_per_replica": peaks,
        "budget_bytes": budget,
        "replica_budget_bytes": budgets,
        "peak_over_budget": round(peak / budget, 4) if budget else None,
        "peak_host_bytes": max((r.get("peak_host_bytes", 0) for r in reps), default=0) if key != "a" else None,
        "leaked_modules": leaked,
        "mean_ms": {"queue": mean_of("queue"), "load": mean_of("load"), "inference": mean_of("inference"),
                    "total_in_ingress": mean_of("total"),
                    # (c)'s free, (d)'s offload: after the answer, holding the replica (None: no such work)
                    "after_answer": after_ms},
        "deploy_s": raw["deploy_s"], "replay_s": raw["replay_s"],
        "_timelines": timelines, "_wall0": raw["wall0"], "_latencies": lat,
    }


def ratios(summ: dict[str, dict[str, Any]]) -> dict[str, Any]:
    a = summ.get("a")
    out: dict[str, Any] = {}
    if not a:
        return out
    for k in ("b", "c", "d"):
        s = summ.get(k)
        if not s:
            continue
        out[f"throughput_a_over_{k}"] = round(a["throughput_rps"] / s["throughput_rps"], 3) if s["throughput_rps"] else None
        for q in ("p50", "p95", "p99"):
            av, sv = a["latency_s"][q], s["latency_s"][q]
            out[f"{q}_a_over_{k}"] = round(av / sv, 3) if av is not None and sv else None
    return out


def verdict(summ: dict[str, dict[str, Any]], rat: dict[str, Any]) -> list[dict[str, Any]]:
    a = summ.get("a")
    rows = []

    def add(name: str, target: str, value: Any, ok: bool | None) -> None:
        rows.append({"target": name, "wanted": target, "measured": value, "met": ok})

    if a:
        if "throughput_a_over_b" in rat:
            v = rat["throughput_a_over_b"]
            add("throughput vs (b)", ">= 2.0x", v, v is not None and v >= TARGETS["throughput_vs_b"])
        if "throughput_a_over_c" in rat:
            v = rat["throughput_a_over_c"]
            add("throughput vs (c)", ">= 5x", v, v is not None and v >= TARGETS["throughput_vs_c"])
        if "p99_a_over_b" in rat:
            v = rat["p99_a_over_b"]
            add("p99 vs (b)", "<= 0.5x", v, v is not None and v <= TARGETS["p99_vs_b"])
        add("out-of-memory (a)", "0", a["out_of_memory"], a["out_of_memory"] == 0)
        add("peak / budget (a)", "<= 1.0", a["peak_over_budget"], a["peak_over_budget"] is not None and a["peak_over_budget"] <= 1.0)
        add("failed requests (a)", "0", a["requests"] - a["ok"], a["requests"] == a["ok"])
    return rows


def auto_notes(doc: dict[str, Any]) -> list[str]:
    """Facts that explain the ratios, computed from the run (no interpretation beyond arithmetic)."""
    s, t = doc["systems"], doc["trace"]
    notes = []
    offered = t["requests"] / t["duration_s"] if t["duration_s"] else 0
    notes.append(f"Offered load {offered:.2f} req/s on average (trace length {t['duration_s']} s); a system that keeps up "
                 "has throughput ~ offered load, so a throughput ratio above 1 needs the peer to fall behind.")
    for k in "abcd":
        if k not in s:
            continue
        x = s[k]
        sf = x["served_from"]
        hit = sf.get("device", 0) / x["ok"] if x["ok"] else 0
        m = x["mean_ms"]
        after = (f", then {m['after_answer']} ms of work after the answer (free or offload, holding the replica)"
                 if m.get("after_answer") is not None else "")
        notes.append(f"({k}) {x['name']}: {hit:.0%} of requests found their pipeline on the device; mean per request: "
                     f"queue {m['queue']} ms, load/reload {m['load']} ms, inference {m['inference']} ms{after}; "
                     f"makespan {x['makespan_s']} s for {x['ok']} requests.")
    return notes


def _service_ms(x: dict[str, Any]) -> float | None:
    m = x["mean_ms"]
    if m["load"] is None or m["inference"] is None:
        return None
    return m["load"] + m["inference"]


def missed_targets(doc: dict[str, Any]) -> list[str]:
    """One line per missed target: the shortfall and the arithmetic behind it, from this run's numbers."""
    s, t = doc["systems"], doc["trace"]
    out = []
    a = s.get("a")
    if not a:
        return out
    offered = t["requests"] / t["duration_s"] if t["duration_s"] else 0.0
    kept_up = a["makespan_s"] <= 1.1 * t["duration_s"] + 2.0
    for v in doc["verdict"]:
        if v["met"] is not False or v["measured"] is None:
            continue
        if v["target"].startswith("throughput vs"):
            k = v["target"][-2]
            x = s[k]
            want = TARGETS[f"throughput_vs_{k}"]
            line = (f"throughput vs ({k}): {v['measured']}x, {want}x wanted ({v['measured'] / want:.0%} of the target; "
                    f"(a) would need {want * x['throughput_rps']:.2f} req/s, it did {a['throughput_rps']:.2f}). ")
            if kept_up:
                line += (f"(a) kept up with the offered load ({offered:.2f} req/s average; makespan {a['makespan_s']} s for a "
                         f"{t['duration_s']} s trace), so its throughput here is the offered load, not its capacity. ")
            sa, sx = _service_ms(a), _service_ms(x)
            if sa and sx and sx <= sa:
                line += (f"Per request (mean over all requests, hits count 0 ms of load), (a) spent {a['mean_ms']['load']} ms "
                         f"loading + {a['mean_ms']['inference']} ms inferring vs ({k})'s {x['mean_ms']['load']} + "
                         f"{x['mean_ms']['inference']} ms; (a) served {a['served_from'].get('disk', 0)} of {a['ok']} requests "
                         f"from disk (({k}): {x['served_from'].get('disk', 0)}). ")
                if a["mean_ms"]["load"] >= x["mean_ms"]["load"]:
                    line += "(a) loaded at least as much per request: its placement broke down in this run (see Notes); " \
                            "that, not the peers' cost, is the gap to close."
                else:
                    line += (f"(a) loaded less per request; its inference took longer ({a['mean_ms']['inference']} vs "
                             f"{x['mean_ms']['inference']} ms), and that, not placement, is the gap.")
            elif sa and sx:
                c = s.get("c")
                cost = (f" ({c['mean_ms']['load']} ms mean disk load vs {c['mean_ms']['inference']} ms mean inference in "
                        f"(c): {c['mean_ms']['load'] / c['mean_ms']['inference']:.1f}x)"
                        if c and c["mean_ms"]["load"] and c["mean_ms"]["inference"] else "")
                line += (f"Per request (mean over all requests, hits count 0 ms of load), ({k}) spends {x['mean_ms']['load']} "
                         f"ms loading + {x['mean_ms']['inference']} ms inferring vs (a)'s {a['mean_ms']['load']} + "
                         f"{a['mean_ms']['inference']} ms: a service-time ratio of {sx / sa:.2f}x (not counting work after the "
                         "answer: (c)'s free and (d)'s offload, which hold the replica; see Notes), about the ceiling of the throughput ratio when both are saturated. On this CPU a "
                         f"disk load of these checkpoints (page cache warm) costs only a few inferences{cost}, while "
                         "on a GPU loading an SD-class pipeline costs several inferences; the serving stack's per-request CPU "
                         "(proxy, ingress, replica, PNG) also shares the same 2 cores as inference and caps (a). Would close "
                         "it: CPU checkpoints whose load/inference cost ratio matches a GPU's, or a GPU run; this "
                         "harness runs all four systems on the CPU (a GPU mode is not built yet).")
            inf_a, inf_x = a["mean_ms"]["inference"], x["mean_ms"]["inference"]
            if inf_a and inf_x and inf_a > 1.3 * inf_x:
                line += (f" Here (a)'s mean inference took {inf_a / inf_x:.2f}x ({k})'s ({inf_a} vs {inf_x} ms) for the "
                         f"same requests: (a)'s replicas inferred nearly all the time, side by side on the same cores, "
                         f"while ({k})'s spent part of theirs loading, which left the cores to the other's inference. On "
                         "GPUs each replica has its own device and inference does not slow with the other replica's.")
            out.append(line)
        elif v["target"] == "p99 vs (b)":
            out.append(f"p99 vs (b): {v['measured']}x, <= 0.5x wanted.")
        else:
            out.append(f"{v['target']}: {v['measured']}, {v['wanted']} wanted.")
    return out


def report_only(path: Path) -> int:
    """Rewrite throughput.md from an existing throughput.json (after a change to the report text)."""
    doc = json.loads(path.read_text(encoding="utf-8"))
    write_markdown(path.with_suffix(".md"), doc)
    print(path.with_suffix(".md").read_text())
    return 0


# ---- output ------------------------------------------------------------------------------------
def mb(x: float | None) -> str:
    return "-" if x is None else f"{x / 1e6:.1f}"


def fmt_s(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def write_markdown(path: Path, doc: dict[str, Any]) -> None:
    s = doc["systems"]
    L = ["# Placement throughput: four systems, one trace, one Ray cluster", ""]
    L.append(machine_md(doc["machine"]) + f" GPU: {doc['machine']['gpu']}; torch {doc['machine']['torch']}, "
             f"ray {doc['machine']['ray']}, diffusers {doc['machine'].get('diffusers', '?')}.")
    L.append("")
    L.append("CPU run: absolute times are NOT GPU figures and the machine is shared (noisy); read the ratios, "
             "which come from one run of the same trace against each system in turn.")
    L.append("")
    L.append(f"Command: `{doc['command']}`")
    L.append("")
    t, cfg = doc["trace"], doc["config"]
    L.append("## Setup")
    L.append(f"- Trace: {t['requests']} requests over {t['duration_s']} s, Poisson {t['params']['rate_rps']} req/s with a "
             f"{t['params']['burst_factor']}x burst in {t['burst_window_s']} s ({t['burst_requests']} requests), Zipf s="
             f"{t['params']['zipf_s']}, seed {t['params']['seed']}; {t['params']['width']}x{t['params']['height']}, "
             f"{t['params']['steps']} step(s), guidance {t['params']['guidance_scale']}.")
    L.append("- Popularity (rank 1 first; mixed sizes): " + ", ".join(
        f"{n} ({mb(cfg['weights_bytes'][n])} MB, p={t['zipf_weights'][n]}, {t['per_checkpoint'][n]} req)"
        for n in t['params']['popularity']) + f". Largest/smallest weights: {cfg['size_ratio']:.0f}x.")
    L.append(f"- Per replica budget {mb(cfg['budget_bytes'])} MB (cpu profile `cpu_budget_bytes`); catalog total "
             f"{mb(sum(cfg['weights_bytes'].values()))} MB; workspace estimate {mb(cfg['workspace_bytes'])} MB per request. "
             f"(b) K = (budget - workspace) // largest = {cfg['mux_k']}.")
    L.append(f"- All systems: 2 model replicas (num_cpus 0.5, max_ongoing_requests {cfg['max_ongoing']}, one pipeline run "
             "at a time per replica, unbounded queues), 1 ingress replica, HTTP POST through the ingress, open-loop "
             "replay, latency from scheduled arrival. Each system starts cold.")
    L.append("- (d) on CPU: the device IS the host, so each offload and each reload is modeled as a full copy of every "
             "weight into fresh, materialized storage (the old storage freed) - the copy a GPU<->host move costs, not "
             "the PCIe transfer time. Host copies are unbounded (peak host bytes below).")
    L.append("")
    L.append("## Results")
    L.append("| system | ok/requests | throughput req/s | p50 s | p95 s | p99 s | disk loads | host reloads | evictions | "
             "frees/offloads after request | OOM | peak MB / budget MB (ratio) | mean load ms | mean inference ms |")
    L.append("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for k in "abcd":
        if k not in s:
            continue
        x = s[k]
        c = x["counters"]
        after = c["frees_after_request"] or c["offloads"]
        L.append(f"| ({k}) {x['name']} | {x['ok']}/{x['requests']} | {x['throughput_rps']:.3f} | {fmt_s(x['latency_s']['p50'])} | "
                 f"{fmt_s(x['latency_s']['p95'])} | {fmt_s(x['latency_s']['p99'])} | {c['disk_loads']} | {c['host_reloads']} | "
                 f"{c['evictions']} | {after} | {x['out_of_memory']} | {mb(x['peak_device_bytes'])} / {mb(x['budget_bytes'])} "
                 f"({x['peak_over_budget']}) | {x['mean_ms']['load']} | {x['mean_ms']['inference']} |")
    L.append("")
    if "a" in s:
        a = s["a"]
        L.append(f"(a) also: {a['counters']['hits']} cache hits, {a['counters']['idle_releases']} idle releases, "
                 f"leaked modules {a['leaked_modules']}; served from {a['served_from']}.")
    for k in "bcd":
        if k in s:
            x = s[k]
            extra = f", peak host copies {mb(x['peak_host_bytes'])} MB" if k == "d" else ""
            L.append(f"({k}) served from {x['served_from']}; hits {x['counters']['hits']}{extra}; errors {x['errors'] or 0}.")
    L.append("")
    L.append("## Ratios vs targets")
    L.append("| target | wanted | measured | met |")
    L.append("|---|---|---|---|")
    for v in doc["verdict"]:
        met = "yes" if v["met"] else ("no" if v["met"] is not None else "-")
        L.append(f"| {v['target']} | {v['wanted']} | {v['measured']} | {met} |")
    L.append("")
    L.append("All ratios (a over x): " + ", ".join(f"{k} {v}" for k, v in doc["ratios"].items()))
    L.append("")
    missed = missed_targets(doc)
    if missed:
        L.append("## Missed targets: by how much, why, what would close it")
        for m in missed:
            L.append(f"- {m}")
        L.append("")
    if doc.get("notes"):
        L.append("## Notes")
        for n in doc["notes"]:
            L.append(f"- {n}")
        L.append("")
    L.append("Plots: " + ", ".join(f"`{p}`" for p in doc.get("plots", [])) + ".")
    path.write_text("\n".join(L) + "\n", encoding="utf-8")


def plots(summ: dict[str, dict[str, Any]], out: Path, budget: int, name: str = "throughput") -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k in "abcd":
        if k not in summ:
            continue
        lat = sorted(summ[k]["_latencies"])
        if lat:
            ax.step(lat, [(i + 1) / len(lat) for i in range(len(lat))], where="post",
                    label=f"({k}) {summ[k]['name']}")
    ax.set_xscale("log")
    ax.set_xlabel("latency from arrival (s, log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF, same trace (CPU)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    p = out / f"{name}_latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p.name)
    for k in "abcd":
        if k not in summ:
            continue
        x = summ[k]
        fig, ax = plt.subplots(figsize=(7, 4))
        for i, (rid, tl) in enumerate(sorted(x["_timelines"].items())):
            if not tl:
                continue
            ts = [t - x["_wall0"] for t, _, _ in tl]
            ax.step(ts, [d / 1e6 for _, d, _ in tl], where="post", label=f"replica {i + 1} device")
            if k == "d":
                ax.step(ts, [h / 1e6 for _, _, h in tl], where="post", linestyle=":", label=f"replica {i + 1} host copies")
        ax.axhline(budget / 1e6, color="red", linestyle="--", label="device budget")
        ax.set_xlim(left=0)
        ax.set_xlabel("s since replay start")
        ax.set_ylabel("MB")
        ax.set_title(f"({k}) {x['name']}: device bytes per replica" + (" (+ host copies, no budget)" if k == "d" else ""))
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        p = out / f"{name}_memory_{x['name']}.png"
        fig.savefig(p, dpi=110)
        plt.close(fig)
        files.append(p.name)
    return files


# ---- main --------------------------------------------------------------------------------------
def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.throughput", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="a short trace (~2 min in all)")
    ap.add_argument("--requests", type=int, default=None, help="default 240 (--quick: 60)")
    ap.add_argument("--rate", type=float, default=None, help="Poisson rate, req/s (default 6.0)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--zipf-s", type=float, default=1.1)
    ap.add_argument("--burst-factor", type=float, default=2.0)
    ap.add_argument("--burst-len", type=float, default=5.0, help="seconds")
    ap.add_argument("--burst-at", type=float, default=None, help="seconds (default: 40%% of requests/rate)")
    ap.add_argument("--popularity", default=",".join(DEFAULT_POPULARITY), help="checkpoint names, hottest first")
    ap.add_argument("--steps", type=int, default=1)
    ap.add_argument("--size", type=int, default=64, help="image side in pixels")
    ap.add_argument("--budget-mb", type=float, default=300.0, help="per-replica device budget, MB (1e6 bytes)")
    ap.add_argument("--max-ongoing", type=int, default=8)
    ap.add_argument("--systems", default="abcd", help="subset of abcd, run in this order")
    ap.add_argument("--no-xl", action="store_true", help="demo checkpoints only (no generated bench-xl)")
    ap.add_argument("--no-warmup", action="store_true", help="skip the unmeasured warm-up app")
    ap.add_argument("--report-only", action="store_true", help="rewrite throughput.md from throughput.json; no run")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="throughput", help="file name prefix of the results (e.g. throughput_overload)")
    ap.add_argument("--ray-cpus", type=int, default=4, help="logical CPUs given to Ray (the replicas ask 0.5 each)")
    args = ap.parse_args(argv)
    # Refused here, before Ray starts: a value that would be replaced by a default (0 is
    # falsy), fail minutes in, or hang (Serve waits for CPUs forever).
    if args.requests is not None and args.requests < 1:
        ap.error(f"--requests must be >= 1, got {args.requests}")
    if args.rate is not None and not args.rate > 0:
        ap.error(f"--rate must be > 0 req/s, got {args.rate}")
    if not args.systems or set(args.systems) - set(SYSTEMS) or len(set(args.systems)) != len(args.systems):
        ap.error(f"--systems must be distinct letters of {''.join(SYSTEMS)}, got {args.systems!r}")
    if args.ray_cpus < 2:  # 2 replicas x 0.5 + the ingress's 0.25
        ap.error(f"--ray-cpus must be >= 2 (each app asks 1.25 CPUs), got {args.ray_cpus}")
    if args.size < 8 or args.size % 8:
        ap.error(f"--size must be a multiple of 8 (the request API's rule), got {args.size}")
    if args.steps < 1:
        ap.error(f"--steps must be >= 1, got {args.steps}")
    return args


def _check_workload(popularity: tuple[str, ...], entries: list[dict[str, Any]], size: int, steps: int) -> None:
    """Every system must run the same work: names the catalog (``entries``) has, sizes and
    steps within the registry's limits (memrouter refuses what the peers would run)."""
    known = {e["name"] for e in entries}
    missing = [n for n in popularity if n not in known]
    if missing or not popularity:
        raise SystemExit(f"--popularity: {missing or 'empty'} not in the catalog {sorted(known)}")
    for e in (e for e in entries if e["name"] in popularity):
        if size > min(e["max_width"], e["max_height"]) or steps > e["max_steps"]:
            raise SystemExit(f"--size {size} / --steps {steps} exceed checkpoint {e['name']!r}'s limits "
                             f"({e['max_width']}x{e['max_height']}, {e['max_steps']} steps)")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.report_only:
        path = Path(args.out) / f"{args.name}.json"
        if not path.is_file():
            raise SystemExit(f"--report-only: no results at {path} (run the benchmark first, or check --out/--name)")
        return report_only(path)
    requests = args.requests if args.requests is not None else (60 if args.quick else 240)
    rate = args.rate if args.rate is not None else 6.0
    popularity = tuple(n.strip() for n in args.popularity.split(",") if n.strip())
    if args.no_xl:
        popularity = tuple(n for n in popularity if n != "bench-xl")
    params = TraceParams(requests=requests, rate_rps=rate, zipf_s=args.zipf_s, seed=args.seed,
                         burst_at_s=args.burst_at, burst_len_s=args.burst_len, burst_factor=args.burst_factor,
                         popularity=popularity, width=args.size, height=args.size, steps=args.steps)
    trace = generate_trace(params)
    catalog = ensure_catalog(include_xl=not args.no_xl)
    _check_workload(popularity, catalog, args.size, args.steps)
    entries = [e for e in catalog if e["name"] in popularity]
    wbytes = weights_bytes(entries)
    wsbytes = max(workspace_bytes(entries, args.size, args.size).values())
    budget = int(args.budget_mb * 1e6)
    largest = max(wbytes.values())
    k_mux = max(1, (budget - wsbytes) // largest)
    if largest + wsbytes > budget:
        raise SystemExit(f"budget {budget} cannot hold the largest checkpoint ({largest} + workspace {wsbytes})")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"trace: {len(trace)} requests over {trace[-1].at_s:.1f} s; budget {budget}; K={k_mux}; "
          f"weights {wbytes}", flush=True)

    import ray
    from ray import serve

    from bench.peers import build_peer_app
    from deployments.app import build_app

    port = free_port()
    t_start = time.perf_counter()
    ray.init(num_cpus=args.ray_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    raw: dict[str, dict[str, Any]] = {}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        if not args.no_warmup:
            warmup(entries, budget, port, params)
        for key in args.systems:
            name = SYSTEMS[key][0]
            if key == "a":
                app = build_app(memrouter_args(entries, budget, args.max_ongoing))
                raw[key] = run_system(key, app, name, port, trace, params, collect_memrouter, "/healthz")
            else:
                policy = {"b": "mux", "c": "unload", "d": "offload"}[key]
                app = build_peer_app(policy, entries, budget, max_models=k_mux, max_ongoing_requests=args.max_ongoing)
                dep = f"Peer-{policy}"
                raw[key] = run_system(key, app, name, port, trace, params,
                                      lambda app_name, base, dep=dep: collect_peer(app_name, dep), "/healthz")
    finally:
        serve.shutdown()
        ray.shutdown()

    print(f"cluster time {time.perf_counter() - t_start:.1f} s", flush=True)
    summ = {k: summarize(k, v, budget) for k, v in raw.items()}
    rat = ratios(summ)
    ver = verdict(summ, rat)
    info = extra_machine_info()
    doc = {
        "benchmark": "placement throughput (issue 6, section 1)",
        "command": "python -m bench.throughput " + " ".join(argv if argv is not None else sys.argv[1:]),
        "machine": info,
        "trace": trace_summary(trace, params),
        "config": {"budget_bytes": budget, "weights_bytes": wbytes, "workspace_bytes": wsbytes, "mux_k": k_mux,
                   "size_ratio": largest / min(wbytes.values()), "max_ongoing": args.max_ongoing, "replicas": 2,
                   "memrouter_args": {k: v for k, v in memrouter_args(entries, budget, args.max_ongoing).items()
                                      if k != "registry"}},
        "systems": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("_")} for k, v in summ.items()},
        "ratios": rat,
        "verdict": ver,
        "notes": [],  # filled below
        "requests": {k: v["requests"] for k, v in raw.items()},
        "timelines": {k: v["_timelines"] for k, v in summ.items()},
    }
    doc["notes"] = auto_notes(doc)
    doc["name"] = args.name
    doc["plots"] = plots(summ, out, budget, args.name)
    (out / f"{args.name}.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    write_markdown(out / f"{args.name}.md", doc)
    print((out / f"{args.name}.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
