"""TorchBackend: the PipelineCache's injected backend, over deployments/pipelines.py.

Thin on purpose: it maps cache names to registry specs and calls the torch helpers. The
device is ``cuda`` when one is visible, else ``cpu``; on CPU the host tier collapses into
the device, so ``to_host``/``to_device`` are never called there (host_tier=False).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from deployments import pipelines
from router.estimator import resolve_dtype
from router.registry import Quantization, Registry


@dataclass
class LoadedPipeline:
    """What the cache holds: the pipeline and how it was loaded."""

    name: str
    pipe: Any
    dtype: str
    device: str


class TorchBackend:
    def __init__(self, registry: Registry, *, default_dtype: str, device: str):
        self._registry = registry
        self._default_dtype = default_dtype
        self.device = device
        self._tracker = pipelines.LeakTracker()

    def dtype_for(self, name: str) -> str:
        return resolve_dtype(self._registry.get(name), self._default_dtype)

    def load(self, name: str) -> LoadedPipeline:
        spec = self._registry.get(name)
        dtype = self.dtype_for(name)
        pipe = pipelines.load_pipeline(spec.path, dtype=dtype, quantization=spec.quantization.value, device=self.device,
                                       variant=spec.variant)
        return LoadedPipeline(name, pipe, dtype, self.device)

    def measure(self, obj: LoadedPipeline) -> int:
        return sum(pipelines.measure_bytes(obj.pipe, self.device).values())

    def to_host(self, obj: LoadedPipeline) -> None:
        pipelines.move_pipeline(obj.pipe, "cpu", pin_host_memory=self.device == "cuda")

    def to_device(self, obj: LoadedPipeline) -> None:
        pipelines.move_pipeline(obj.pipe, self.device)

    def free(self, obj: LoadedPipeline) -> None:
        pipe, obj.pipe = obj.pipe, None
        pipelines.free_pipeline(pipe, self._tracker)
        del pipe

    def leaked(self) -> int:
        return self._tracker.leaked()

    def offloadable(self, name: str) -> bool:
        # bitsandbytes weights are not proven to free device memory when moved: release them.
        return self._registry.get(name).quantization is Quantization.NONE
