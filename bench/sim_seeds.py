"""The simulator's outcomes over several trace seeds: one seed's p99 is one burst's story.

``python -m bench.sim_seeds [--seeds 8] [--jobs 2] [bench.sim flags]`` runs the four
policies of ``python -m bench.sim`` on seeds 1..N (each seed its own trace and fleet
order, the scenario otherwise the same) and writes ``sim_seeds.{json,md}`` under
bench/results: per seed and policy p50/p99, hit rate, GPU-s loading, the router's largest
backlog; then per policy the median and worst over the seeds, and (a)'s p99 as a ratio of
each other policy's, seed by seed (the issue's target: at most 0.5 of (b)'s).

Outcomes only: decisions/s are timed by ``python -m bench.sim`` alone (several policies in
parallel processes share the machine).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path
from typing import Any

from bench.machine import machine_info, machine_md
from bench.sim.runner import RESULTS, parser as sim_parser, scenario_from_args, simulate

_ROWS = (("p50 s", lambda m: m["latency_s"]["p50"]), ("p99 s", lambda m: m["latency_s"]["p99"]),
         ("hit rate", lambda m: m["hit_rate"]), ("GPU-s loading", lambda m: m["load_gpu_s"]),
         ("router backlog max", lambda m: m["router_pending_max"]))


def run(seeds: int, jobs: int, sim_argv: list[str]) -> dict[str, Any]:
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    per_seed = {}
    for seed in range(1, seeds + 1):
        sc = scenario_from_args(sim_parser().parse_args([*sim_argv, "--seed", str(seed), "--sample-every", "0"]))
        res = simulate(sc, jobs=jobs)
        per_seed[seed] = {p: {name: get(m) for name, get in _ROWS} for p, m in res["policies"].items()}
        print(f"seed {seed}: " + ", ".join(f"({p}) p99 {v['p99 s']:.1f} s" for p, v in per_seed[seed].items()),
              flush=True)
    policies = list(next(iter(per_seed.values())))
    summary = {p: {name: {"median": statistics.median(per_seed[s][p][name] for s in per_seed),
                          "worst": (min if name == "hit rate" else max)(per_seed[s][p][name] for s in per_seed)}
                   for name, _ in _ROWS} for p in policies}
    ratios = {}
    if "a" in policies:
        for p in policies:
            if p != "a":
                ratios[p] = [round(per_seed[s]["a"]["p99 s"] / per_seed[s][p]["p99 s"], 3) for s in per_seed]
    return {"command": "python -m bench.sim_seeds " + " ".join(sys.argv[1:]), "machine": machine_info(),
            "scenario": {k: v for k, v in scenario_from_args(sim_parser().parse_args(sim_argv)).__dict__.items()
                         if k not in ("seed", "sample_every")},
            "seeds": per_seed, "summary": summary, "a_p99_over": ratios}


def markdown(out: dict[str, Any]) -> str:
    policies = list(next(iter(out["seeds"].values())))
    L = ["# Simulator outcomes over trace seeds", "", machine_md(out["machine"]), "", f"Command: `{out['command']}`",
         "", "Scenario as `python -m bench.sim` (see bench/results/sim.md), one trace seed per row; simulated "
         "seconds, not timings of this machine.", ""]
    for name, _ in _ROWS:
        L += [f"## {name}", "", "| seed | " + " | ".join(f"({p})" for p in policies) + " |",
              "|---:|" + "---:|" * len(policies)]
        for s, row in out["seeds"].items():
            L.append(f"| {s} | " + " | ".join(_fmt(row[p][name]) for p in policies) + " |")
        L.append("| median | " + " | ".join(_fmt(out["summary"][p][name]["median"]) for p in policies) + " |")
        L.append("| worst | " + " | ".join(_fmt(out["summary"][p][name]["worst"]) for p in policies) + " |")
        L.append("")
    if out["a_p99_over"]:
        L += ["## (a)'s p99 over each other policy's, per seed", "",
              "| over | " + " | ".join(str(s) for s in out["seeds"]) + " | seeds at or below 0.5 |",
              "|---|" + "---:|" * (len(out["seeds"]) + 1)]
        for p, r in out["a_p99_over"].items():
            L.append(f"| ({p}) | " + " | ".join(f"{x:.2f}" for x in r) + f" | {sum(x <= 0.5 for x in r)} of {len(r)} |")
        L.append("")
    return "\n".join(L)


def _fmt(x: float) -> str:
    return f"{x:.3f}" if isinstance(x, float) and x < 1 else (f"{x:,.1f}" if isinstance(x, float) else f"{x:,}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_seeds", description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, default=8, help="seeds 1..N (default 8)")
    ap.add_argument("--jobs", type=int, default=2, help="policies in parallel processes per seed (default 2)")
    ap.add_argument("--out", default=str(RESULTS))
    ap.add_argument("--name", default="sim_seeds")
    a, sim_argv = ap.parse_known_args(argv)
    if a.jobs < 1:
        ap.error(f"--jobs must be >= 1, got {a.jobs}")
    try:
        out = run(a.seeds, a.jobs, sim_argv)
    except ValueError as exc:
        ap.error(str(exc))
    folder = Path(a.out)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{a.name}.json").write_text(json.dumps(out, indent=1) + "\n")
    (folder / f"{a.name}.md").write_text(markdown(out) + "\n")
    print(markdown(out))
    return out


if __name__ == "__main__":
    main()
