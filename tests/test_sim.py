"""The cluster simulator (bench/sim) on its --small preset: completes, safe, deterministic.

Drives the real router.placement.rank and deployments.cache.PipelineCache; runs in seconds.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.sim.runner import main, parser, scenario_from_args, simulate, strip_private


def _volatile_free(res: dict) -> str:
    """Everything but wall-clock measurements, as canonical JSON."""
    clean = strip_private(res)
    clean.pop("wall_s", None)
    for m in clean["policies"].values():
        m.pop("wall", None)
        m.pop("fast_rank_experiment", None)
    return json.dumps(clean, sort_keys=True)


@pytest.fixture(scope="module")
def small() -> dict:
    sc = scenario_from_args(parser().parse_args(["--small"]))
    assert (sc.replicas, sc.checkpoints, sc.requests) == (8, 40, 400)
    return simulate(sc, jobs=1)


def test_every_request_completes_under_every_policy(small):
    assert set(small["policies"]) == {"a", "b", "c", "d"}
    for k, m in small["policies"].items():
        assert m["completed"] == m["requests"] == 400, k
        assert sum(m["served_from"].values()) == 400, k
        assert len(m["_latencies"]) == 400 and min(m["_latencies"]) > 0, k


def test_router_policy_never_overcommits(small):
    a = small["policies"]["a"]
    assert a["oom"] == 0 and a["oom_physical"] == 0 and a["report_overcommits"] == 0
    assert a["cache_counters"]["oom_recoveries"] == 0
    assert len(a["replicas"]) == 8
    for r in a["replicas"]:
        assert 0 < r["peak_report_bytes"] <= r["budget_bytes"], r
        assert r["peak_physical_bytes"] <= r["budget_bytes"], r
    assert a["peak_over_budget_max"] <= 1.0


def test_unload_after_every_request_never_hits(small):
    c = small["policies"]["c"]
    assert c["hit_rate"] == 0.0 and c["served_from"]["device"] == 0 and c["cache_counters"]["hits"] == 0
    assert c["disk_loads"] == 400


def test_router_beats_multiplexing_hit_rate_on_zipf_with_10x_sizes(small):
    variants = small["assumptions"]["variants"]
    used = [v for v in variants if small["world"]["catalog_variants"][v["variant"]] > 0]
    sizes = [v["weights_gb"] for v in used]
    assert max(sizes) / min(sizes) >= 10
    assert small["scenario"]["zipf_s"] == pytest.approx(1.1)
    a, b = small["policies"]["a"], small["policies"]["b"]
    assert a["hit_rate"] > b["hit_rate"], (a["hit_rate"], b["hit_rate"])


def test_offload_policy_reloads_from_host(small):
    d = small["policies"]["d"]
    assert d["hit_rate"] == 0.0
    assert d["host_reloads"] > 0 and d["host_reloads"] + d["disk_loads"] == 400


def test_deterministic_for_a_fixed_seed(small):
    again = simulate(scenario_from_args(parser().parse_args(["--small"])), jobs=1)
    assert _volatile_free(again) == _volatile_free(small)


def test_placement_is_timed_in_wall_and_thread_cpu_time(small):
    w = small["policies"]["a"]["wall"]
    assert small["policies"]["a"]["decisions"] > 0 and w["rank_s"] > 0 and w["rank_cpu_s"] > 0
    # The thread's CPU time within the same intervals cannot exceed them (clock granularity aside).
    assert w["rank_cpu_s"] <= w["rank_s"] * 1.05 + 1e-3, w
    assert w["decisions_per_cpu_s"] == pytest.approx(small["policies"]["a"]["decisions"] / w["rank_cpu_s"])


def outcome(res: dict, k: str) -> str:
    """Policy ``k``'s simulated outcome, less wall-clock figures."""
    m = {key: v for key, v in strip_private(res)["policies"][k].items() if key not in ("wall", "fast_rank_experiment")}
    return json.dumps(m, sort_keys=True)


def test_keeping_views_across_reports_where_only_time_passed_changes_no_outcome(small):
    """rank_for keeps a replica's view while its report_seq stays (only time passed): the
    simulation with every aged report rebuilt into a new view decides exactly the same."""
    rebuilt = simulate(scenario_from_args(parser().parse_args(["--small", "--policies", "acd", "--no-keep-views"])),
                       jobs=1)

    for k in "acd":
        assert outcome(rebuilt, k) == outcome(small, k), k
    assert small["policies"]["a"]["wall"]["reports_aged"] > 0  # reports where only time passed did occur


def test_the_fleet_index_decides_as_the_stateless_whole_order_does(small):
    """The router ranks with FleetIndex (the first rank_limit places, views kept across
    decisions); the simulation with rank_indices' whole order instead decides the same."""
    whole = simulate(scenario_from_args(parser().parse_args(["--small", "--policies", "acd", "--rank-limit", "0"])),
                     jobs=1)

    for k in "acd":
        assert outcome(whole, k) == outcome(small, k), k


@pytest.mark.parametrize("service_times", [True, False])
def test_reports_carry_measured_service_times_so_the_holder_gate_runs_as_deployed(service_times):
    from bench.sim.engine import Simulation
    from bench.sim.runner import build_world

    args = ["--small"] + ([] if service_times else ["--no-service-times"])
    sc = scenario_from_args(parser().parse_args(args))
    catalog, fleet, trace = build_world(sc)
    sim = Simulation("a", fleet, catalog, trace, sc.sim_params())
    sim.run()
    timed = [r.base_view for r in sim.reps if r.base_view.inference_s > 0]
    if service_times:
        assert timed and all(v.disk_load_bytes_per_s == sc.disk_gbps * 1e9 for v in timed
                             if v.disk_load_bytes_per_s)  # the modeled bandwidth, as measured
    else:
        assert timed == []


def test_command_line_writes_results(tmp_path):
    main(["--small", "--policies", "ab", "--jobs", "1", "--out", str(tmp_path), "--name", "t"])
    data = json.loads((tmp_path / "t.json").read_text())
    assert set(data["policies"]) == {"a", "b"}
    assert (tmp_path / "t.md").read_text().startswith("# Cluster simulation")
    assert (tmp_path / "t_latency_cdf.png").stat().st_size > 0 and (tmp_path / "t_hit_rate.png").stat().st_size > 0


def test_sim_replay_replays_every_decision_with_the_simulations_orders():
    from bench.sim_replay import run

    out = run(["--small", "--policies", "a"], reps=2)
    assert out["decisions"] == 400 and out["set_view_calls"] > 400
    assert out["orders_equal_to_simulation"] is True
    assert len(out["rank_us_per_decision"]["all"]) == 2
    assert out["rank_us_per_decision"]["min"] <= out["rank_us_per_decision"]["median"]


@pytest.mark.parametrize("argv, reps, match", [
    (["--small", "--policies", "b"], 1, "--policies"),
    (["--small", "--policies", "ac"], 1, "--policies"),
    (["--small", "--policies", "a", "--rank-limit", "0"], 1, "rank_indices"),
    (["--small", "--policies", "a"], 0, "--reps"),
])
def test_sim_replay_refuses_what_it_cannot_replay(argv, reps, match):
    from bench.sim_replay import run

    with pytest.raises(ValueError, match=match):
        run(argv, reps)


def test_sim_replay_main_writes_its_results(tmp_path):
    from bench.sim_replay import main

    out = main(["--small", "--reps", "1", "--out", str(tmp_path), "--name", "r"])
    assert out["decisions"] == 400 and out["orders_equal_to_simulation"] is True
    assert json.loads((tmp_path / "r.json").read_text())["decisions"] == 400
    assert (tmp_path / "r.md").read_text().startswith("# Simulated placement decisions, replayed alone")


def test_sim_replay_against_a_revision_replays_both_indexes_in_pairs(tmp_path):
    """--against: the revision's router package (git archive) and this checkout's, each in
    its own process, on the same recorded calls. HEAD's index is this one's, so both
    replay the simulation's orders."""
    import shutil

    from bench.sim_replay import main

    if shutil.which("git") is None or not (Path(__file__).resolve().parent.parent / ".git").exists():
        pytest.skip("needs a git checkout")
    out = main(["--small", "--against", "HEAD", "--pairs", "2", "--out", str(tmp_path)])
    assert out["decisions"] == 400 and len(out["pairs"]) == 2
    for pair in out["pairs"]:
        assert pair["against"]["router"] == "git archive of the revision"
        assert pair["this"]["router"] == "this checkout"
        assert pair["against"]["orders_equal"] is True and pair["this"]["orders_equal"] is True
        assert pair["against"]["rank_us"] > 0 and pair["this"]["rank_us"] > 0
    assert (tmp_path / "sim_replay_ab.md").read_text().startswith("# Simulated placement decisions replayed")


def test_sim_replay_hands_a_revision_its_calls_in_plain_types():
    """A revision's classes may differ in layout (EntryView gained slots, and a pickle of
    the new objects failed to load under the old one), so the calls travel as plain
    values and are rebuilt with the replaying interpreter's classes, equal to the originals."""
    import pickle
    import pickletools

    from bench.sim_replay import _from_portable, _portable, record

    calls, _ = record(["--small", "--policies", "a"])
    blob = pickle.dumps(_portable(calls), protocol=pickle.HIGHEST_PROTOCOL)
    globals_used = {arg for op, arg, _ in pickletools.genops(blob) if op.name in ("GLOBAL", "STACK_GLOBAL")}
    assert not any("router" in str(g) for g in globals_used)
    back = _from_portable(pickle.loads(blob))
    assert len(back) == len(calls)
    for old, new in zip(calls, back):
        if old[0] == "v":
            assert new[2] == old[2]  # every compared field, entries included
        else:
            assert (new[1].checkpoint, new[1].weights_bytes, new[1].workspace_bytes) == \
                (old[1].checkpoint, old[1].weights_bytes, old[1].workspace_bytes)
            assert new[2:] == old[2:]


def test_sim_replay_against_an_unknown_revision_names_it():
    from bench.sim_replay import run_ab

    with pytest.raises(ValueError, match="no-such-rev"):
        run_ab(["--small", "--policies", "a"], "no-such-rev", 1)


def test_sim_seeds_reports_each_seed_and_a_over_the_others(tmp_path):
    from bench.sim_seeds import main as seeds_main

    out = seeds_main(["--seeds", "2", "--small", "--policies", "ab", "--jobs", "1", "--out", str(tmp_path)])
    assert list(out["seeds"]) == [1, 2] and set(out["seeds"][1]) == {"a", "b"}
    p99 = [out["seeds"][s]["a"]["p99 s"] / out["seeds"][s]["b"]["p99 s"] for s in (1, 2)]
    assert out["a_p99_over"]["b"] == [round(x, 3) for x in p99]
    assert out["summary"]["a"]["p99 s"]["worst"] == max(out["seeds"][s]["a"]["p99 s"] for s in (1, 2))
    text = (tmp_path / "sim_seeds.md").read_text()
    assert text.startswith("# Simulator outcomes over trace seeds") and "seeds at or below 0.5" in text
    with pytest.raises(SystemExit):
        seeds_main(["--seeds", "0", "--out", str(tmp_path)])


def test_loads_measuring_above_their_estimate_are_retried_not_recursed():
    """--size-error 1.05: every load measures 5% above the estimate the router placed it by.
    A replica's refusal went straight back to the router at the same instant, with the same
    views, which picked the same replica: RecursionError in all four policies."""
    sc = scenario_from_args(parser().parse_args(["--small", "--size-error", "1.05", "--sample-every", "0"]))
    res = simulate(sc, jobs=1)
    for p, m in res["policies"].items():
        assert m["completed"] + m["refused"] == 400 and m["oom"] == 0, p
    for p in "bcd":
        assert res["policies"][p]["shortfalls"] > 0, p  # refusals happened, and were retried
    # (a)'s cache evicts more for a load's measured overrun: it answers more of them than (c)
    # does (a checkpoint 5% over a replica's whole budget is refused there whatever it evicts).
    assert res["policies"]["a"]["refused"] < res["policies"]["c"]["refused"]
