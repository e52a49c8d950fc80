"""What only a CUDA device can show: device memory as the allocator sees it.

Marked ``gpu`` and skipped without CUDA (CI and the development machines have none). Run
them where a GPU is lent: ``python -m pytest -q -m gpu``. Each compares the project's
books (measured bytes, cache reports, the out-of-memory path) with
``torch.cuda.memory_allocated``, the caching allocator's count of live tensor bytes, so a
failure here is a finding about real device memory, not about a fake.

Caveat: the allocator rounds each tensor up to a 512-byte block, so the checks use the
largest demo checkpoint (about 100 MB, hundreds of tensors) and a 3% tolerance; a tiny one
would be dominated by the rounding.
"""

from __future__ import annotations

import gc

import pytest
import torch

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

MIB = 1024**2
BIG = "demo-l"


def _allocated() -> int:
    gc.collect()
    torch.cuda.synchronize()
    return torch.cuda.memory_allocated()


def _entries(demo_dir, **changes) -> list[dict]:
    from deployments.demo import demo_registry_entries

    root = next(iter(demo_dir.values())).parent
    return [dict(e, **changes) for e in demo_registry_entries(root)]


@pytest.fixture()
def registry(demo_dir):
    from router.registry import Registry

    return Registry.from_entries(_entries(demo_dir))


@pytest.fixture()
def backend(registry):
    from deployments.backend import TorchBackend

    b = TorchBackend(registry, default_dtype="float16", device="cuda")
    yield b
    torch.cuda.empty_cache()


def test_measured_bytes_are_what_the_allocator_holds_and_the_estimate_is_within_half_a_percent(registry, backend):
    from router.estimator import Estimator

    before = _allocated()
    obj = backend.load(BIG)
    delta = _allocated() - before
    measured = backend.measure(obj)
    assert abs(measured - delta) <= 0.03 * delta, (measured, delta)
    est = Estimator().estimate(registry.get(BIG), dtype=backend.dtype_for(BIG), width=64, height=64)
    assert abs(est.weights_bytes - measured) <= 0.005 * measured, (est.weights_bytes, measured)
    backend.free(obj)
    del obj
    assert _allocated() - before <= MIB  # freed: nothing of it left on the device
    assert backend.leaked() == 0


def test_offload_gives_the_device_bytes_back_and_a_reload_serves_from_pinned_host_memory(registry, backend):
    from deployments import pipelines
    from deployments.cache import CacheConfig, Lease, PipelineCache, Tier
    from router.estimator import Estimator

    est = Estimator().estimate(registry.get(BIG), dtype=backend.dtype_for(BIG), width=64, height=64)
    cache = PipelineCache(CacheConfig(device_budget_bytes=4 * 1024 * MIB, host_budget_bytes=4 * 1024 * MIB,
                                      host_tier=True), backend)
    base = _allocated()
    lease = cache.acquire(BIG, weights_bytes=est.weights_bytes)
    assert isinstance(lease, Lease) and lease.served_from is Tier.DISK
    obj = lease.obj
    lease.release()
    on_device = _allocated() - base
    entry_bytes = cache.report().entry(BIG).bytes
    assert abs(entry_bytes - on_device) <= 0.03 * on_device
    assert cache.offload(BIG) == [(BIG, "offload")]
    assert _allocated() - base <= 0.03 * on_device  # the device copy is gone
    host = [t for m in pipelines.module_components(obj.pipe).values() for t in m.parameters()]
    assert host and all(t.device.type == "cpu" and t.is_pinned() for t in host)
    lease = cache.acquire(BIG, weights_bytes=est.weights_bytes)
    assert lease.served_from is Tier.HOST
    assert all(t.device.type == "cuda" for m in pipelines.module_components(obj.pipe).values() for t in m.parameters())
    lease.release()
    assert cache.release() == [BIG]
    assert _allocated() - base <= MIB and cache.report().device_used_bytes == 0


def test_inference_stays_within_the_estimated_workspace(registry, backend):
    from deployments import pipelines
    from router.estimator import Estimator

    est = Estimator().estimate(registry.get(BIG), dtype=backend.dtype_for(BIG), width=128, height=128)
    obj = backend.load(BIG)
    try:
        weights = _allocated()
        torch.cuda.reset_peak_memory_stats()
        images = pipelines.run_pipeline(obj.pipe, prompt="a test", width=128, height=128, num_inference_steps=2,
                                        guidance_scale=5.0, seed=0, num_images=1, device="cuda")
        assert len(images) == 1
        peak_workspace = torch.cuda.max_memory_allocated() - weights
        assert peak_workspace <= est.workspace_bytes, (peak_workspace, est.workspace_bytes)
    finally:
        backend.free(obj)


def test_a_real_out_of_memory_load_is_reported_as_such_and_leaves_nothing_behind(demo_dir):
    from deployments import pipelines

    base = _allocated()
    free_bytes, _ = torch.cuda.mem_get_info()
    try:
        hog = torch.empty(max(0, free_bytes - 64 * MIB), dtype=torch.uint8, device="cuda")  # 64 MiB left
    except torch.OutOfMemoryError:
        pytest.skip("could not take the device's free memory in one block")
    try:
        with pytest.raises(pipelines.PipelineLoadError) as info:
            pipelines.load_pipeline(demo_dir[BIG], dtype="float32", device="cuda")  # about 100 MB
        assert info.value.out_of_memory and pipelines.is_out_of_memory(info.value)
    finally:
        del hog
        torch.cuda.empty_cache()
    assert _allocated() - base <= MIB  # the partial load went back with the error


@pytest.mark.parametrize("quantization", ["nf4", "int8"])
def test_a_quantized_load_is_measured_with_its_quantization_state_and_a_release_frees_it(demo_dir, quantization):
    from deployments.backend import TorchBackend
    from router.registry import Registry

    registry = Registry.from_entries(_entries(demo_dir, quantization=quantization, dtype="float16"))
    backend = TorchBackend(registry, default_dtype="float16", device="cuda")
    assert not backend.offloadable(BIG)  # bitsandbytes weights are released, not moved
    before = _allocated()
    obj = backend.load(BIG)
    delta = _allocated() - before
    measured = backend.measure(obj)
    assert abs(measured - delta) <= 0.03 * delta, (measured, delta)  # absmax / SCB counted
    backend.free(obj)
    del obj
    assert _allocated() - before <= MIB


def test_a_replica_on_cuda_detects_its_profile_and_serves_from_the_device(demo_dir):
    from deployments import pipelines
    from deployments.replica import ModelReplica
    from router import profiles

    rep = ModelReplica({"registry": _entries(demo_dir), "replica": {"profile": "auto", "num_gpus": 1}})
    try:
        assert rep.device == "cuda" and rep.profile.is_cuda
        name, total = pipelines.cuda_device_info()
        assert rep.profile == profiles.detect(name, total)
        r = rep._generate_sync({"checkpoint": "demo-xs", "prompt": "a test", "negative_prompt": None, "width": 64,
                                "height": 64, "num_inference_steps": 2, "guidance_scale": 7.5, "seed": 0,
                                "num_images": 1})
        assert r["status"] == 200, r
        report = rep.memory_report()
        assert report["device"] == "cuda" and report["cuda"]["total"] == total
        assert report["device_used_bytes"] <= report["device_budget_bytes"] < total
    finally:
        rep.shutdown()
