"""Scenario configuration, the command line, and result files for the simulator."""

from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.sim.engine import POLICIES, SimParams, Simulation
from bench.sim.model import DEFAULT_MIX, SPEED_FACTORS, VARIANTS, build_catalog, build_fleet, build_trace

RESULTS = Path(__file__).resolve().parent.parent / "results"


@dataclass(frozen=True)
class Scenario:
    replicas: int = 256
    checkpoints: int = 2000
    requests: int = 30000
    rate: float = 20.0  # mean arrivals per second outside bursts
    zipf_s: float = 1.1
    burst_every_s: float = 300.0
    burst_len_s: float = 30.0
    burst_factor: float = 2.5
    burst_focus: float = 0.5
    mix: str = DEFAULT_MIX
    seed: int = 1
    disk_gbps: float = 2.0
    h2d_gbps: float = 12.0
    d2h_gbps: float = 12.0
    max_ongoing: int = 8
    spill_queue_len: int = 4
    report_period_s: float = 1.0
    tick_period_s: float = 1.0
    idle_timers: bool = True
    age_reports: bool = True
    keep_views: bool = True
    service_times: bool = True
    holder_wait_s: float = 2.0
    backlog: bool = True
    size_error: float = 1.0
    rank_limit: int = 16
    sample_every: int = 100
    policies: str = "abcd"

    def sim_params(self) -> SimParams:
        return SimParams(disk_gbps=self.disk_gbps, h2d_gbps=self.h2d_gbps, d2h_gbps=self.d2h_gbps,
                         max_ongoing=self.max_ongoing, spill_queue_len=self.spill_queue_len,
                         report_period_s=self.report_period_s, tick_period_s=self.tick_period_s,
                         idle_timers=self.idle_timers, age_reports=self.age_reports, keep_views=self.keep_views,
                         service_times=self.service_times, holder_wait_s=self.holder_wait_s, backlog=self.backlog, size_error=self.size_error,
                         rank_limit=self.rank_limit, sample_every=self.sample_every, seed=self.seed)


# 8 replicas (1 T4, 2 A10G, 2 L4, 2 A100-80, 1 H100), 40 checkpoints, 400 requests.
SMALL = dict(replicas=8, checkpoints=40, requests=400, rate=0.6, burst_every_s=200.0, burst_len_s=20.0)


def build_world(sc: Scenario):
    rng = random.Random(sc.seed)
    catalog = build_catalog(sc.checkpoints, rng)
    fleet = build_fleet(sc.replicas, sc.mix, rng)
    trace = build_trace(sc.requests, sc.checkpoints, rng, rate=sc.rate, zipf_s=sc.zipf_s,
                        burst_every_s=sc.burst_every_s, burst_len_s=sc.burst_len_s, burst_factor=sc.burst_factor,
                        burst_focus=sc.burst_focus)
    return catalog, fleet, trace


def run_policy(sc: Scenario, policy: str) -> dict[str, Any]:
    catalog, fleet, trace = build_world(sc)
    return Simulation(policy, fleet, catalog, trace, sc.sim_params()).run()


def _run_policy_star(args: tuple[Scenario, str]) -> dict[str, Any]:
    return run_policy(*args)


def assumptions(sc: Scenario) -> dict[str, Any]:
    return {
        "note": "Modeled figures, not measurements: replace with GPU measurements (bench/) when available.",
        "variants": [{"variant": v.key, "family": v.family.value, "weights_gb": v.weights_bytes / 1e9,
                      "resolution": v.resolution, "infer_s_a100": v.infer_s, "offloadable": v.offloadable,
                      "catalog_share": v.share} for v in VARIANTS],
        "speed_factors_vs_a100": SPEED_FACTORS,
        "bandwidth_gbps": {"disk_to_device": sc.disk_gbps, "host_to_device": sc.h2d_gbps, "device_to_host": sc.d2h_gbps},
        "workspace": "router/estimator.py WORKSPACE_TABLE at the variant's resolution, batch 1",
        "profiles": "router/profiles.py (device budget = total - max(1 GiB, 5%), host budget, max_resident, idle timers)",
    }


def simulate(sc: Scenario, *, jobs: int = 1) -> dict[str, Any]:
    for p in sc.policies:
        if p not in POLICIES:
            raise ValueError(f"--policies: unknown policy {p!r}; known: {''.join(POLICIES)}")
    catalog, fleet, trace = build_world(sc)
    wall0 = time.perf_counter()
    work = [(sc, p) for p in sc.policies]
    if jobs > 1 and len(work) > 1:
        # The slow policies (those that rank) first, so that two workers finish together.
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(min(jobs, len(work))) as pool:
            per = pool.map(_run_policy_star, work, chunksize=1)
    else:
        per = [_run_policy_star(w) for w in work]
    profiles_count: dict[str, int] = {}
    for f in fleet:
        profiles_count[f.profile.name] = profiles_count.get(f.profile.name, 0) + 1
    span = trace[-1].arrival_s if trace else 0.0
    return {
        "scenario": dataclasses.asdict(sc),
        "assumptions": assumptions(sc),
        "world": {
            "fleet": profiles_count,
            "catalog_variants": {v.key: sum(c.variant is v for c in catalog) for v in VARIANTS},
            "trace_span_s": span,
            "offered_rps": len(trace) / span if span else 0.0,
            "burst_requests": sum(r.burst for r in trace),
        },
        "policies": {m["policy"]: m for m in per},
        "wall_s": time.perf_counter() - wall0,
        "jobs": jobs,
    }


# ---- command line ---------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    d = Scenario()
    ap = argparse.ArgumentParser(prog="python -m bench.sim", description="Cluster-scale router/cache simulator "
                                 "(defaults: 256 replicas x 2000 checkpoints).")
    ap.add_argument("--small", action="store_true", help=f"test preset: {SMALL}")
    for f in dataclasses.fields(Scenario):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            ap.add_argument(flag, action=argparse.BooleanOptionalAction, default=None)
        else:
            typ = {"int": int, "float": float, "str": str}[f.type if isinstance(f.type, str) else f.type.__name__]
            ap.add_argument(flag, type=typ, default=None, help=f"default {getattr(d, f.name)!r}")
    ap.add_argument("--jobs", type=int, default=1,
                    help="policies simulated in parallel processes (default 1: a policy run beside another shares "
                         "the machine, and its timed decisions with it)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--name", default="sim", help="result file stem (sim -> sim.json, sim.md, sim_*.png)")
    ap.add_argument("--no-plots", action="store_true")
    return ap


def scenario_from_args(a: argparse.Namespace) -> Scenario:
    base = dict(SMALL) if a.small else {}
    for f in dataclasses.fields(Scenario):
        v = getattr(a, f.name)
        if v is not None:
            base[f.name] = v
    return Scenario(**base)


def strip_private(res: dict[str, Any]) -> dict[str, Any]:
    out = dict(res)
    out["policies"] = {k: {kk: vv for kk, vv in m.items() if not kk.startswith("_")} for k, m in res["policies"].items()}
    return out


def write_results(res: dict[str, Any], out_dir: Path, name: str, *, plots: bool = True) -> list[Path]:
    from bench.machine import machine_info
    from bench.sim.report import plot, to_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    res = dict(res)
    res["machine"] = machine_info()
    files = []
    pngs = plot(res, out_dir, name) if plots else []
    clean = strip_private(res)
    clean["plots"] = [p.name for p in pngs]
    (out_dir / f"{name}.json").write_text(json.dumps(clean, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(to_markdown(clean))
    files += [out_dir / f"{name}.json", out_dir / f"{name}.md", *pngs]
    return files


def main(argv: list[str] | None = None) -> dict[str, Any]:
    a = parser().parse_args(argv)
    sc = scenario_from_args(a)
    res = simulate(sc, jobs=a.jobs)
    files = write_results(res, Path(a.out), a.name, plots=not a.no_plots)
    print((Path(a.out) / f"{a.name}.md").read_text())
    print("wrote", ", ".join(str(f) for f in files))
    return res
