"""bench/trace.py: the throughput benchmark's trace generator (pure; no Ray, no torch)."""

import math
import subprocess
import sys

import pytest

from bench.trace import DEFAULT_POPULARITY, TraceParams, generate_trace, trace_summary, zipf_weights


def test_same_seed_same_trace_other_seed_other_trace():
    p = TraceParams(requests=300, seed=3)
    assert generate_trace(p) == generate_trace(p)
    assert generate_trace(p) != generate_trace(TraceParams(requests=300, seed=4))


def test_arrivals_increase_and_requests_are_numbered():
    trace = generate_trace(TraceParams(requests=500, seed=1))
    assert [r.index for r in trace] == list(range(500))
    assert all(b.at_s > a.at_s for a, b in zip(trace, trace[1:]))
    assert {r.checkpoint for r in trace} <= set(DEFAULT_POPULARITY)


def test_zipf_weights_follow_rank_power_law():
    w = zipf_weights(5, 1.1)
    assert math.isclose(sum(w), 1.0)
    for r in range(1, 5):
        assert math.isclose(w[0] / w[r], (r + 1) ** 1.1)


def test_zipf_shape_of_a_long_trace():
    p = TraceParams(requests=20000, seed=0, zipf_s=1.1)
    counts = trace_summary(generate_trace(p), p)["per_checkpoint"]
    shares = [counts[n] / p.requests for n in p.popularity]
    assert shares == sorted(shares, reverse=True)
    for got, want in zip(shares, zipf_weights(len(p.popularity), 1.1)):
        assert abs(got - want) < 0.015


def test_poisson_rate_and_burst():
    p = TraceParams(requests=4000, rate_rps=5.0, seed=2, burst_at_s=100.0, burst_len_s=50.0, burst_factor=4.0)
    trace = generate_trace(p)
    inside = [r for r in trace if r.in_burst]
    assert all(100.0 <= r.at_s < 150.0 for r in inside)
    assert abs(len(inside) / 50.0 - 20.0) < 2.5  # 4x the base rate in the window
    before = [r for r in trace if r.at_s < 100.0]
    assert abs(len(before) / 100.0 - 5.0) < 0.8
    gaps = [b.at_s - a.at_s for a, b in zip(before, before[1:])]
    mean = sum(gaps) / len(gaps)
    cv = math.sqrt(sum((g - mean) ** 2 for g in gaps) / len(gaps)) / mean
    assert 0.8 < cv < 1.2  # exponential gaps: coefficient of variation ~1


def test_catalog_sizes_differ_by_at_least_10x():
    # The sizes the demo specs produce (float32 weights, bytes), recorded from
    # bench.trace.weights_bytes; the generated bench-xl is the largest.
    from deployments.demo import DEMO_CHECKPOINTS

    from bench.trace import _xl_spec

    def params(spec):  # UNet width dominates; the ratio of the widest channels squared is a lower bound
        return max(spec.unet_block_out_channels) ** 2

    names = {s.name for s in DEMO_CHECKPOINTS} | {"bench-xl"}
    assert set(DEFAULT_POPULARITY) == names
    smallest = min(params(s) for s in DEMO_CHECKPOINTS)
    assert params(_xl_spec()) / smallest >= 10


def test_bad_parameters_are_refused():
    with pytest.raises(ValueError):
        TraceParams(requests=0)
    with pytest.raises(ValueError):
        TraceParams(popularity=("a", "a"))
    with pytest.raises(ValueError):
        TraceParams(rate_rps=0)


def test_trace_module_imports_neither_ray_nor_torch():
    code = "import sys, bench.trace as t; t.generate_trace(t.TraceParams()); print('ray' in sys.modules, 'torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "False"]


def test_built_catalog_weights_span_at_least_10x():
    """From the safetensors headers, where the checkpoints are built (no tensor data read)."""
    from deployments.demo import demo_registry_entries
    from pathlib import Path

    from bench.trace import bench_dir, weights_bytes

    entries = demo_registry_entries()
    xl = bench_dir() / "bench-xl"
    if not all((Path(e["path"]) / "model_index.json").is_file() for e in entries) or not (xl / "model_index.json").is_file():
        pytest.skip("catalog not built here (python -m bench.throughput builds it)")
    entries.append({**entries[0], "name": "bench-xl", "path": str(xl)})
    sizes = weights_bytes(entries)
    assert max(sizes.values()) / min(sizes.values()) >= 10
    assert max(sizes, key=sizes.get) == "bench-xl"


def test_missed_targets_names_inference_slowed_by_a_shared_machine():
    from bench.throughput import missed_targets

    def system(rps, load_ms, inference_ms, disk):
        return {"throughput_rps": rps, "makespan_s": 43.0, "ok": 480, "served_from": {"disk": disk},
                "mean_ms": {"load": load_ms, "inference": inference_ms}}

    doc = {"trace": {"requests": 480, "duration_s": 14.9},
           "systems": {"a": system(11.17, 32.5, 140.8, 19), "b": system(8.41, 136.3, 65.8, 244)},
           "verdict": [{"target": "throughput vs (b)", "wanted": ">= 2.0x", "measured": 1.328, "met": False}]}
    (line,) = missed_targets(doc)
    assert line.startswith("throughput vs (b): 1.328x, 2.0x wanted (66% of the target; (a) would need 16.82 req/s")
    assert "a service-time ratio of 1.17x" in line
    assert "(a)'s mean inference took 2.14x (b)'s (140.8 vs 65.8 ms)" in line
    doc["systems"]["a"]["mean_ms"]["inference"] = 70.0  # no slower than (b)'s: not blamed
    assert "mean inference took" not in missed_targets(doc)[0]
    assert "this harness runs all four systems on the CPU" in line  # not "a GPU run" it cannot make


def test_missed_targets_blames_placement_only_when_a_loaded_as_much():
    """bench/results/throughput_saturated.md said (a)'s "placement broke down" while it
    loaded 40 times to (b)'s 268: its service time was longer because its inference was."""
    from bench.throughput import missed_targets

    def system(load_ms, inference_ms, disk):
        return {"throughput_rps": 9.0, "makespan_s": 50.0, "ok": 480, "served_from": {"disk": disk},
                "mean_ms": {"load": load_ms, "inference": inference_ms}}

    doc = {"trace": {"requests": 480, "duration_s": 20.0},
           "systems": {"a": system(38.5, 170.1, 40), "b": system(111.1, 78.3, 268)},
           "verdict": [{"target": "throughput vs (b)", "wanted": ">= 2.0x", "measured": 0.97, "met": False}]}
    (line,) = missed_targets(doc)
    assert "placement broke down" not in line
    assert "(a) loaded less per request; its inference took longer (170.1 vs 78.3 ms)" in line
    doc["systems"]["a"]["mean_ms"] = {"load": 120.0, "inference": 80.0}
    doc["systems"]["a"]["served_from"]["disk"] = 290
    assert "its placement broke down in this run" in missed_targets(doc)[0]


@pytest.mark.parametrize("argv, match", [
    (["--rate", "0"], "--rate must be > 0"),  # 0 was replaced by the default, and recorded as given
    (["--requests", "0"], "--requests must be >= 1"),
    (["--systems", "x"], "--systems must be distinct letters of abcd"),  # a KeyError minutes in
    (["--systems", "aa"], "--systems must be distinct"),
    (["--ray-cpus", "1"], "--ray-cpus must be >= 2"),  # Serve waited for CPUs forever
    (["--size", "60"], "--size must be a multiple of 8"),
    (["--steps", "0"], "--steps must be >= 1"),
])
def test_bench_arguments_are_refused_before_ray_starts(argv, match, capsys):
    from bench.throughput import parse

    with pytest.raises(SystemExit):
        parse(argv)
    assert match in capsys.readouterr().err


def test_a_workload_the_systems_would_not_run_alike_is_refused():
    from bench.throughput import _check_workload

    entries = [{"name": "demo-s", "max_width": 256, "max_height": 256, "max_steps": 10},
               {"name": "other", "max_width": 64, "max_height": 64, "max_steps": 1}]
    _check_workload(("demo-s",), entries, 256, 10)  # "other" is not in the trace: its limits do not apply
    with pytest.raises(SystemExit, match=r"--popularity: \['demo-typo'\] not in the catalog \['demo-s', 'other'\]"):
        _check_workload(("demo-s", "demo-typo"), entries, 64, 1)
    with pytest.raises(SystemExit, match="exceed checkpoint 'demo-s''s limits"):
        _check_workload(("demo-s",), entries, 512, 1)
