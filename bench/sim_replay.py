"""Placement decisions of a simulated run, replayed alone: decisions/s without the simulator around them.

``python -m bench.sim`` times ``FleetIndex.rank`` inside the simulation, where the
simulator's own work (events, cache bookkeeping, reports) runs between decisions and
evicts the CPU caches, and where a shared machine's load moves the figure by up to 2x from
one run to the next. This records the index's calls of one policy's run (``set_view`` and
``rank``, in order, with the same arguments) and replays them into a new
``router.fleet_index.FleetIndex`` ``--reps`` times, each time with fresh copies of the
views and needs (empty memos, as the router has them), timing each call.

Reported: rank us per decision (min and median over the repetitions), the same as
decisions/s, the set_view cost per decision, and whether every replay returned the
simulation's own orders (it must: the index is deterministic).

Caveat: a replay's figure is placement alone, with warm caches; the simulator's figure
(bench/results/sim.md) is the one the issue's target names. Both are reported.

``--against REV`` compares the index of another git revision on the same calls, back to
back: ``--pairs`` pairs of replays, each in a fresh process (REV's ``router/`` package from
``git archive``, then this checkout's), timed in CPU time of the replaying thread, which a
shared machine's other processes move less than wall time. Written to
``sim_replay_ab.{json,md}``. The calls are recorded with this checkout's code; where REV
decides otherwise, its replay says so (orders not equal) and times different work.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import inspect
import io
import json
import os
import pickle
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from bench.machine import machine_info, machine_md
from bench.sim.engine import Simulation
from bench.sim.runner import RESULTS, build_world, parser, scenario_from_args
from router.fleet_index import FleetIndex
from router.placement import EntryView, Need, ReplicaView


class RecordingIndex(FleetIndex):
    """A FleetIndex that keeps its calls: ("v", slot, view) and ("r", need, queue_lens, kwargs, order)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[tuple] = []

    def set_view(self, slot: int, view: ReplicaView | None) -> None:
        # A copy, never scored: the original's memos would keep the simulation's working
        # set alive through the replays (one A/B here: 121 vs 110 us per decision at the min).
        self.calls.append(("v", slot, None if view is None else view.with_entries(view.entries, view.used_bytes)))
        super().set_view(slot, view)

    def rank(self, need: Need, queue_lens, **kwargs: Any) -> list[int]:
        order = super().rank(need, queue_lens, **kwargs)
        self.calls.append(("r", need, list(queue_lens), kwargs, order))
        return order


def record(argv: list[str]) -> tuple[list[tuple], str]:
    """Run one policy of the simulator (its own flags) with a RecordingIndex."""
    sc = scenario_from_args(parser().parse_args(argv))
    if len(sc.policies) != 1 or sc.policies not in "acd":
        raise ValueError(f"--policies: give one policy that ranks (a, c or d), got {sc.policies!r}")
    catalog, fleet, trace = build_world(sc)
    sim = Simulation(sc.policies, fleet, catalog, trace, sc.sim_params())
    if sim.index is None:
        raise ValueError("--rank-limit 0 runs the stateless rank_indices: nothing to replay")
    sim.index = RecordingIndex()
    sim.run()
    return sim.index.calls, sc.policies


def _fresh(calls: list[tuple]) -> list[tuple]:
    """The calls with new view and need objects: no memo or lazy value carries over."""
    needs: dict[int, Need] = {}
    out = []
    for c in calls:
        if c[0] == "v":
            v = c[2]
            out.append(("v", c[1], None if v is None else v.with_entries(v.entries, v.used_bytes)))
        else:
            n = c[1]
            fresh = needs.get(id(n))
            if fresh is None:
                fresh = needs[id(n)] = Need(n.checkpoint, n.weights_bytes, n.workspace_bytes)
            out.append(("r", fresh, c[2], c[3], c[4]))
    return out


def replay(calls: list[tuple], clock: Callable[[], int] = time.perf_counter_ns) -> dict[str, Any]:
    """One replay into a new FleetIndex: times in ns (``clock``'s) and whether every order matched."""
    calls = _fresh(calls)
    index = FleetIndex()
    rank_ns = set_ns = decisions = 0
    equal = True
    gc.collect()
    gc.disable()  # a collection inside one timed call would land on whichever call it hit
    try:
        for c in calls:
            if c[0] == "v":
                t0 = clock()
                index.set_view(c[1], c[2])
                set_ns += clock() - t0
            else:
                t0 = clock()
                order = index.rank(c[1], c[2], **c[3])
                rank_ns += clock() - t0
                decisions += 1
                equal = equal and order == c[4]
    finally:
        gc.enable()
    return {"decisions": decisions, "rank_ns": rank_ns, "set_view_ns": set_ns, "orders_equal": equal}


def run(argv: list[str], reps: int) -> dict[str, Any]:
    if reps < 1:
        raise ValueError(f"--reps must be >= 1, got {reps}")
    t0 = time.perf_counter()
    calls, policy = record(argv)
    record_s = time.perf_counter() - t0
    runs = [replay(calls) for _ in range(reps)]
    n = runs[0]["decisions"]
    rank_us = [r["rank_ns"] / n / 1e3 for r in runs]
    set_us = [r["set_view_ns"] / n / 1e3 for r in runs]
    return {
        "command": "python -m bench.sim_replay " + " ".join(argv + ["--reps", str(reps)]),
        "machine": machine_info(),
        "policy": policy,
        "decisions": n,
        "set_view_calls": sum(1 for c in calls if c[0] == "v"),
        "record_wall_s": round(record_s, 2),
        "rank_us_per_decision": {"min": round(min(rank_us), 1), "median": round(statistics.median(rank_us), 1),
                                 "all": [round(x, 1) for x in rank_us]},
        "decisions_per_s": {"at_min": round(1e6 / min(rank_us)), "at_median": round(1e6 / statistics.median(rank_us))},
        "set_view_us_per_decision": {"min": round(min(set_us), 1), "median": round(statistics.median(set_us), 1)},
        "orders_equal_to_simulation": all(r["orders_equal"] for r in runs),
        "target_decisions_per_s": 10000,
    }


_REPO = Path(__file__).resolve().parent.parent


def _router_at(rev: str, dest: Path) -> None:
    """Revision ``rev``'s ``router/`` package under ``dest``, from git archive."""
    try:
        proc = subprocess.run(["git", "-C", str(_REPO), "archive", "--format=tar", rev, "router"],
                              capture_output=True, check=False)
    except FileNotFoundError:
        raise ValueError("--against needs git on PATH") from None
    if proc.returncode != 0:
        raise ValueError(f"--against {rev!r}: git archive failed: {proc.stderr.decode(errors='replace').strip()}")
    with tarfile.open(fileobj=io.BytesIO(proc.stdout)) as tar:
        tar.extractall(dest, filter="data")


def _replay_in_child(calls_path: Path, router_dir: Path | None) -> dict[str, Any]:
    """One replay in a fresh interpreter, with the ``router`` package of ``router_dir``
    (its cwd: first on sys.path) or of this checkout (None)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(_REPO)] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    proc = subprocess.run([sys.executable, "-m", "bench.sim_replay", "--child", str(calls_path)],
                          cwd=str(router_dir or _REPO), env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"replay child failed (router from {router_dir or _REPO}):\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _portable(calls: list[tuple]) -> list[tuple]:
    """The calls in plain types (dicts, tuples, numbers, strings): the revision's classes
    may lay their objects out otherwise (slots, new fields), so a pickle of this checkout's
    objects would not load there. Views keep their init fields by name, and their entries
    every field by name."""
    out = []
    for c in calls:
        if c[0] == "v":
            v = c[2]
            if v is not None:
                v = {f.name: getattr(v, f.name) for f in dataclasses.fields(v) if f.init}
                v["entries"] = {n: {f.name: getattr(e, f.name) for f in dataclasses.fields(e)}
                                for n, e in v["entries"].items()}
            out.append(("v", c[1], v))
        else:
            n = c[1]
            out.append(("r", (n.checkpoint, dict(n.weights_bytes), dict(n.workspace_bytes)), c[2], c[3], c[4]))
    return out


def _from_portable(data: list[tuple]) -> list[tuple]:
    """:func:`_portable`'s calls rebuilt with the classes this interpreter imported. Fields
    and rank arguments this revision does not have are left out: its replay then decides
    without them, and says so where its orders differ."""
    entry_fields = {f.name for f in dataclasses.fields(EntryView)}
    view_fields = {f.name for f in dataclasses.fields(ReplicaView) if f.init}
    rank_args = set(inspect.signature(FleetIndex.rank).parameters)
    out = []
    for c in data:
        if c[0] == "v":
            v = c[2]
            if v is not None:
                entries = {n: EntryView(**{k: x for k, x in e.items() if k in entry_fields})
                           for n, e in v["entries"].items()}
                v = ReplicaView(**{k: x for k, x in v.items() if k in view_fields and k != "entries"}, entries=entries)
            out.append(("v", c[1], v))
        else:
            out.append(("r", Need(*c[1]), c[2], {k: x for k, x in c[3].items() if k in rank_args}, c[4]))
    return out


def _child(calls_path: str) -> None:
    with open(calls_path, "rb") as f:
        calls = _from_portable(pickle.load(f))
    out = replay(calls, clock=time.thread_time_ns)
    here = Path(sys.modules[FleetIndex.__module__].__file__).resolve().parent.parent
    out["router"] = "this checkout" if here == _REPO else "git archive of the revision"
    print(json.dumps(out))


def run_ab(argv: list[str], against: str, pairs: int) -> dict[str, Any]:
    """``pairs`` pairs of replays of one recorded run: revision ``against``'s index, then
    this checkout's, each in its own process."""
    if pairs < 1:
        raise ValueError(f"--pairs must be >= 1, got {pairs}")
    with tempfile.TemporaryDirectory(prefix="memrouter-ab-") as tmp:
        other = Path(tmp) / "tree"
        other.mkdir()
        _router_at(against, other)
        calls, policy = record(argv)
        calls_path = Path(tmp) / "calls.pkl"
        with open(calls_path, "wb") as f:
            pickle.dump(_portable(calls), f, protocol=pickle.HIGHEST_PROTOCOL)
        runs = []
        for _ in range(pairs):
            runs.append((_replay_in_child(calls_path, other), _replay_in_child(calls_path, None)))
    n = runs[0][0]["decisions"]

    def side(r: dict[str, Any]) -> dict[str, Any]:
        return {"rank_us": round(r["rank_ns"] / n / 1e3, 1), "set_view_us": round(r["set_view_ns"] / n / 1e3, 1),
                "orders_equal": r["orders_equal"], "router": r["router"]}

    rows = [{"against": side(a), "this": side(b)} for a, b in runs]
    assert all(r["against"]["router"] != r["this"]["router"] for r in rows), \
        "both replays imported the same router package: this is a bug"
    med = {side: {k: statistics.median(r[side][k] for r in rows) for k in ("rank_us", "set_view_us")}
           for side in ("against", "this")}
    return {
        "command": "python -m bench.sim_replay " + " ".join(argv + ["--against", against, "--pairs", str(pairs)]),
        "machine": machine_info(),
        "policy": policy,
        "against": against,
        "decisions": n,
        "clock": "CPU time of the replaying thread (time.thread_time_ns)",
        "pairs": rows,
        "median": med,
        "rank_ratio_this_over_against": round(med["this"]["rank_us"] / med["against"]["rank_us"], 3),
    }


def ab_markdown(out: dict[str, Any]) -> str:
    L = ["# Simulated placement decisions replayed: this checkout against " + out["against"], "",
         machine_md(out["machine"]), "", f"Command: `{out['command']}`", "",
         f"Policy ({out['policy']}): {out['decisions']:,} decisions recorded once with this checkout's code, "
         f"replayed in pairs, each replay in a fresh process; {out['clock']}.", "",
         f"| pair | rank us/decision, {out['against']} | rank us/decision, this | set_view us/decision, "
         f"{out['against']} | set_view us/decision, this | orders equal ({out['against']} / this) |",
         "|---:|---:|---:|---:|---:|---|"]
    for i, r in enumerate(out["pairs"], 1):
        a, b = r["against"], r["this"]
        L.append(f"| {i} | {a['rank_us']} | {b['rank_us']} | {a['set_view_us']} | {b['set_view_us']} | "
                 f"{a['orders_equal']} / {b['orders_equal']} |")
    m = out["median"]
    L += ["", f"Medians: rank {m['against']['rank_us']:.1f} against {m['this']['rank_us']:.1f} us per decision "
          f"(this / {out['against']}: {out['rank_ratio_this_over_against']}); set_view "
          f"{m['against']['set_view_us']:.1f} against {m['this']['set_view_us']:.1f} us.", ""]
    return "\n".join(L)


def to_markdown(out: dict[str, Any]) -> str:
    r, d = out["rank_us_per_decision"], out["decisions_per_s"]
    side = "above" if d["at_median"] >= out["target_decisions_per_s"] else "below"
    return "\n".join([
        "# Simulated placement decisions, replayed alone",
        "",
        machine_md(out["machine"]),
        "",
        f"Command: `{out['command']}`",
        "",
        f"Policy ({out['policy']}): {out['decisions']:,} decisions and {out['set_view_calls']:,} view changes recorded "
        f"from one simulated run, replayed {len(r['all'])} times into a new FleetIndex with fresh views and needs.",
        "",
        "| figure | min | median |",
        "|---|---:|---:|",
        f"| FleetIndex.rank us / decision | {r['min']} | {r['median']} |",
        f"| decisions / s | {d['at_min']:,} | {d['at_median']:,} |",
        f"| set_view us / decision | {out['set_view_us_per_decision']['min']} | "
        f"{out['set_view_us_per_decision']['median']} |",
        "",
        f"Every replay returned the simulation's orders: {out['orders_equal_to_simulation']}. "
        f"Against the {out['target_decisions_per_s']:,} decisions/s target: {side} it here at the median. The "
        "issue's target names the simulator's own figure (sim.md), which times the same calls inside the "
        "simulation and is lower: this one is placement alone, with warm caches.",
        "",
    ])


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(prog="python -m bench.sim_replay",
                                 description="Replay one simulated run's placement decisions; other flags go to "
                                             "python -m bench.sim (default --policies a).")
    ap.add_argument("--reps", type=int, default=5, help="replays (default 5)")
    ap.add_argument("--out", default=str(RESULTS), help="results folder")
    ap.add_argument("--name", default=None, help="result file stem (default sim_replay, or sim_replay_ab)")
    ap.add_argument("--against", metavar="REV", help="also replay git revision REV's index, in pairs")
    ap.add_argument("--pairs", type=int, default=4, help="with --against: pairs of replays (default 4)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a, rest = ap.parse_known_args(sys.argv[1:] if argv is None else argv)
    if a.child:
        _child(a.child)
        return {}
    if "--policies" not in rest:
        rest += ["--policies", "a"]
    if a.against:
        out, markdown, name = run_ab(rest, a.against, a.pairs), ab_markdown, a.name or "sim_replay_ab"
    else:
        out, markdown, name = run(rest, a.reps), to_markdown, a.name or "sim_replay"
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / f"{name}.json").write_text(json.dumps(out, indent=2) + "\n")
    (out_dir / f"{name}.md").write_text(markdown(out))
    print((out_dir / f"{name}.md").read_text())
    return out


if __name__ == "__main__":
    main()
