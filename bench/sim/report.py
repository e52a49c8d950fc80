"""Markdown table and PNG plots for simulator results."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from bench.machine import machine_md


def _fmt(x: float, nd: int = 2) -> str:
    return f"{x:,.{nd}f}"


def to_markdown(res: dict[str, Any]) -> str:
    sc, world = res["scenario"], res["world"]
    pol = res["policies"]
    lines = [
        "# Cluster simulation: router vs baselines", "",
        machine_md(res["machine"]) if "machine" in res else "", "",
        f"Scenario: {sc['replicas']} replicas ({', '.join(f'{k} x{v}' for k, v in world['fleet'].items())}), "
        f"{sc['checkpoints']} checkpoints ({', '.join(f'{k} {v}' for k, v in world['catalog_variants'].items())}), "
        f"{sc['requests']} requests, Zipf s={sc['zipf_s']}, Poisson {sc['rate']}/s with bursts x{sc['burst_factor']} "
        f"for {sc['burst_len_s']} s every ~{sc['burst_every_s']} s ({sc['burst_focus']:.0%} of burst traffic on one "
        f"checkpoint); offered {world['offered_rps']:.2f} req/s over {world['trace_span_s']:.0f} s; seed {sc['seed']}.",
        f"Modeled: disk->device {sc['disk_gbps']} GB/s, host->device {sc['h2d_gbps']} GB/s, device->host "
        f"{sc['d2h_gbps']} GB/s; max_ongoing {sc['max_ongoing']}, spill_queue_len {sc['spill_queue_len']}, report "
        f"period {sc['report_period_s']} s, idle timers {'on' if sc['idle_timers'] else 'off'} (policy a).", "",
        "| metric | " + " | ".join(f"({k}) {m['description']}" for k, m in pol.items()) + " |",
        "|---|" + "---:|" * len(pol),
    ]

    def row(label: str, f) -> None:
        lines.append(f"| {label} | " + " | ".join(f(m) for m in pol.values()) + " |")

    row("completed / requests", lambda m: f"{m['completed']} / {m['requests']}")
    row("refused (error after 8 replicas' refusals)", lambda m: f"{m.get('refused', 0):,}")
    row("throughput (req / sim s)", lambda m: _fmt(m["throughput_rps"]))
    row("latency p50 s", lambda m: _fmt(m["latency_s"]["p50"]))
    row("latency p95 s", lambda m: _fmt(m["latency_s"]["p95"]))
    row("latency p99 s", lambda m: _fmt(m["latency_s"]["p99"]))
    row("queue wait p50 / p99 s", lambda m: f"{_fmt(m['queue_s']['p50'])} / {_fmt(m['queue_s']['p99'])}")
    row("hit rate (device hits / requests)", lambda m: f"{m['hit_rate']:.3f}")
    row("host reloads", lambda m: f"{m['host_reloads']:,}")
    row("disk loads", lambda m: f"{m['disk_loads']:,}")
    row("GPU-s loading (disk + host->device)", lambda m: _fmt(m["load_gpu_s"], 0))
    row("GPU-s offloading (device->host)", lambda m: _fmt(m["offload_gpu_s"], 0))
    row("evictions", lambda m: f"{m['evictions']:,}")
    row("out-of-memory", lambda m: f"{m['oom']}")
    row("peak device bytes / budget (max replica)", lambda m: f"{m['peak_over_budget_max']:.3f}")
    row("peak device bytes / budget (mean)", lambda m: f"{m['peak_over_budget_mean']:.3f}")
    row("shortfalls (503 + retry)", lambda m: f"{m['shortfalls']}")
    row("acquire errors (500 + retry)", lambda m: f"{sum(m['acquire_errors'].values())}")
    row("router pending max", lambda m: f"{m['router_pending_max']}")
    row("placement decisions", lambda m: f"{m['decisions']:,}")
    row("placement wall s (FleetIndex.rank)", lambda m: _fmt(m["wall"]["rank_s"]) if m["policy"] != "b" else "n/a")
    row("decisions / wall s in placement", lambda m: (_fmt(m["wall"]["decisions_per_s"], 0)
                                                           if m["policy"] != "b" and m["wall"]["decisions_per_s"] else "n/a"))
    row("decisions / CPU s in placement (this thread's CPU time)",
        lambda m: (_fmt(m["wall"]["decisions_per_cpu_s"], 0)
                   if m["policy"] != "b" and m["wall"].get("decisions_per_cpu_s") else "n/a"))
    row("decisions / wall s incl. view upkeep", lambda m: (_fmt(m["wall"]["decisions_per_s_with_views"], 0)
                                                           if m["policy"] != "b" and m["wall"]["decisions_per_s"] else "n/a"))
    row("simulation wall s", lambda m: _fmt(m["wall"]["sim_s"], 1))
    xs = {k: m["fast_rank_experiment"] for k, m in pol.items() if m.get("fast_rank_experiment")}
    if xs:
        lines += ["", "Placement-speed experiment (bench/placement_fast.py, not used by the router) on sampled decisions' "
                  "inputs of this run (all replicas' views), us per decision:", "",
                  "| policy | samples | real rank p50 / p99 | x:rank_fast p50 (equal) | x:rank_ids p50 | "
                  "x:vector_ids p50 / p99 (equal) | views changed / decision | prepare us/view | vector row update us |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for k, x in xs.items():
            lines.append(
                f"| ({k}) | {x['samples']} | {x['rank_us_p50']:.0f} / {x['rank_us_p99']:.0f} | "
                f"{x['rank_fast_us_p50']:.0f} ({x['equal']}/{x['samples']}) | {x['rank_ids_us_p50']:.0f} | "
                f"{x['vector_ids_us_p50']:.0f} / {x['vector_ids_us_p99']:.0f} ({x['vector_equal']}/{x['samples']}) | "
                f"{x['views_changed_per_decision']:.1f} | {x['prepare_us_per_view']:.1f} | {x['vector_update_us_per_view']:.1f} |")
    lines += ["", f"Total wall time {res['wall_s']:.1f} s with {res['jobs']} worker process(es)."]
    b = pol.get("b")
    if b and "mux_capacity" in b:
        c = b["mux_capacity"]
        lines.append(f"Policy (b) max_num_models_per_replica: {c['min']} on every replica (one value per deployment, "
                     f"the largest that over-commits no replica's budget), {c['total']} slots in all.")
    lines += ["", "All figures are simulated from modeled sizes, bandwidths and inference times (see the JSON "
              "'assumptions'); only the decisions/s and wall times are measured on this machine. The CPU-time "
              "interval of each decision encloses its wall-clock one, so it also counts a read of each clock "
              "(the thread clock's is a system call): it can come out slightly below the wall figure.", ""]
    for p in res.get("plots", []):
        lines.append(f"![{p}]({p})")
    return "\n".join(lines) + "\n"


def plot(res: dict[str, Any], out_dir: Path, name: str) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pol = res["policies"]
    files = []
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for k, m in pol.items():
        lat = m["_latencies"]
        n = len(lat)
        if not n:
            continue
        step = max(1, n // 2000)
        xs = lat[::step] + [lat[-1]]
        ys = [i / n for i in range(0, n, step)] + [1.0]
        ax.plot(xs, ys, label=f"({k}) {m['description']}")
    ax.set_xscale("log")
    ax.set_xlabel("request latency, simulated seconds (log)")
    ax.set_ylabel("fraction of requests")
    ax.set_title("Latency CDF per policy")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    p = out_dir / f"{name}_latency_cdf.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)

    fig, axes = plt.subplots(1, 2, figsize=(9, 4))
    keys = list(pol)
    axes[0].bar([f"({k})" for k in keys], [pol[k]["hit_rate"] for k in keys], color="tab:blue")
    axes[0].set_ylim(0, 1)
    axes[0].set_title("device hit rate")
    for i, k in enumerate(keys):
        axes[0].text(i, pol[k]["hit_rate"] + 0.02, f"{pol[k]['hit_rate']:.2f}", ha="center", fontsize=8)
    axes[1].bar([f"({k})" for k in keys], [pol[k]["load_gpu_s"] / 3600 for k in keys], color="tab:orange")
    axes[1].set_title("GPU-hours spent loading")
    fig.suptitle("; ".join(f"({k}) {pol[k]['description']}" for k in keys), fontsize=6)
    fig.tight_layout()
    p = out_dir / f"{name}_hit_rate.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files
