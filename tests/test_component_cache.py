"""Component: the estimator and the PipelineCache over real tiny pipelines loaded from disk (CPU)."""

from __future__ import annotations

import random

import pytest

from deployments import pipelines
from deployments.backend import TorchBackend
from deployments.cache import CacheConfig, Lease, PipelineCache, Shortfall
from deployments.demo import demo_registry_entries
from router.estimator import Estimator
from router.registry import Registry


@pytest.fixture(scope="module")
def registry(demo_dir):
    root = next(iter(demo_dir.values())).parent
    return Registry.from_entries(demo_registry_entries(root))


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_weight_estimate_within_half_percent_of_measured(registry, dtype):
    est = Estimator()
    for spec in registry:
        estimate = est.estimate(spec, dtype=dtype, width=64, height=64)
        pipe = pipelines.load_pipeline(spec.path, dtype=dtype, device="cpu")
        measured = pipelines.measure_bytes(pipe, "cpu")
        for name, est_bytes in estimate.component_bytes().items():
            assert abs(est_bytes - measured[name]) <= 0.005 * measured[name], (spec.name, dtype, name, est_bytes, measured[name])
        total = sum(measured.values())
        assert abs(estimate.weights_bytes - total) <= 0.005 * total, (spec.name, dtype, estimate.weights_bytes, total)
        del pipe


def make_cache(registry, budget_bytes: int):
    backend = TorchBackend(registry, default_dtype="float32", device="cpu")
    cache = PipelineCache(CacheConfig(device_budget_bytes=budget_bytes, host_tier=False, max_resident=8), backend)
    return cache, backend


def test_fifty_switches_under_a_two_checkpoint_budget_leak_nothing(registry):
    est = Estimator()
    names = ["demo-xs", "demo-s", "demo-m"]
    weights = {n: est.estimate(registry.get(n), dtype="float32", width=64, height=64).weights_bytes for n in names}
    # Holds demo-m plus one small one, never all three: every third switch or so evicts.
    budget = weights["demo-m"] + weights["demo-s"] + 1_000_000
    cache, backend = make_cache(registry, budget)
    rng = random.Random(11)
    tracker_refs = []
    for i in range(50):
        name = rng.choice(names)
        lease = cache.acquire(name, weights_bytes=weights[name])
        assert isinstance(lease, Lease), lease
        with lease:
            pipe = lease.obj.pipe
            images = pipelines.run_pipeline(pipe, prompt="x", width=64, height=64, num_inference_steps=1,
                                            guidance_scale=1.0, seed=i, num_images=1)
            assert images[0].size == (64, 64)
            del pipe
        rep = cache.report()
        assert rep.device_used_bytes <= budget
        tracker_refs.append(rep.leaked_modules)
    rep = cache.report()
    assert rep.counters["evictions"] >= 5, rep.counters
    assert rep.counters["releases"] == rep.counters["evictions"]  # no host tier on CPU
    assert rep.leaked_modules == 0 and max(tracker_refs) == 0
    cache.release()
    assert cache.report().entries == () and backend.leaked() == 0


def test_measured_bytes_replace_the_estimate(registry):
    cache, backend = make_cache(registry, 500_000_000)
    with cache.acquire("demo-s", weights_bytes=1) as lease:  # an absurd estimate: the measurement wins
        measured = sum(pipelines.measure_bytes(lease.obj.pipe, "cpu").values())
    entry = cache.report().entry("demo-s")
    assert entry.bytes == measured and entry.estimate_bytes == 1


def test_checkpoint_bigger_than_the_budget_is_a_typed_shortfall_with_numbers(registry):
    est = Estimator().estimate(registry.get("demo-l"), dtype="float32", width=64, height=64)
    cache, backend = make_cache(registry, 50_000_000)
    short = cache.acquire("demo-l", weights_bytes=est.weights_bytes, workspace_bytes=est.workspace_bytes)
    assert isinstance(short, Shortfall) and short.permanent
    msg = short.message()
    assert "demo-l" in msg and str(est.total_bytes) in msg and "50000000" in msg
    assert cache.report().counters["disk_loads"] == 0  # refused before loading


def test_corrupt_checkpoint_fails_cleanly_and_others_keep_serving(registry, demo_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(demo_dir["demo-xs"], bad)
    unet = next((bad / "unet").glob("*.safetensors"))
    unet.write_bytes(unet.read_bytes()[: unet.stat().st_size // 2])
    entries = demo_registry_entries(next(iter(demo_dir.values())).parent)
    entries.append({**entries[0], "name": "bad", "path": str(bad)})
    reg = Registry.from_entries(entries)
    cache, backend = make_cache(reg, 200_000_000)
    with pytest.raises(pipelines.PipelineLoadError, match="bad"):
        cache.acquire("bad", weights_bytes=2_000_000)
    rep = cache.report()
    assert rep.entries == () and rep.device_used_bytes == 0 and rep.counters["load_failures"] == 1
    with cache.acquire("demo-xs", weights_bytes=2_000_000) as lease:
        assert lease.served_from.value == "disk"
    assert backend.leaked() == 0
