"""Request traces and the checkpoint catalog for bench/throughput.py.

Pure: the trace generator imports neither ray nor torch (tests/test_bench_throughput.py
checks it without a cluster). Building the extra checkpoint imports torch lazily.

Trace: Zipf popularity (weight of rank r is 1 / r**s) over the catalog in the order given by
``popularity`` (rank 1 first), Poisson arrivals at ``rate_rps``, and one burst window in
which the rate is multiplied by ``burst_factor``. Fixed seed: the same parameters give the
same trace, byte for byte.

Catalog: the four embedded demo checkpoints (about 2, 8, 30 and 100 MB) plus one larger
generated pipeline, ``bench-xl`` (about 210 MB), built the same way as the demo ones
(deployments/demo.py: configs with a fixed seed) into ``~/.cache/memrouter/bench`` (or
``$MEMROUTER_BENCH_DIR``), never into the repository.
"""

from __future__ import annotations

import bisect
import math
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

BENCH_DIR_ENV = "MEMROUTER_BENCH_DIR"

# Rank 1 first. "Mixed": the hottest is small (demo-s), the second is large (demo-l), the
# largest (bench-xl) is fourth: hot sizes span 2 to 100 MB, so neither "hot = small" nor
# "hot = large" decides the result alone.
DEFAULT_POPULARITY: tuple[str, ...] = ("demo-s", "demo-l", "demo-xs", "bench-xl", "demo-m")


@dataclass(frozen=True)
class TraceParams:
    requests: int = 240
    rate_rps: float = 6.0
    zipf_s: float = 1.1
    seed: int = 0
    burst_at_s: float | None = None  # default: 40 % into the nominal duration (requests / rate)
    burst_len_s: float = 5.0
    burst_factor: float = 2.0
    popularity: tuple[str, ...] = DEFAULT_POPULARITY
    width: int = 64
    height: int = 64
    steps: int = 1
    guidance_scale: float = 7.5

    def __post_init__(self) -> None:
        if self.requests < 1:
            raise ValueError(f"requests must be >= 1, got {self.requests}")
        if self.rate_rps <= 0 or self.burst_factor <= 0 or self.burst_len_s < 0:
            raise ValueError("rate_rps and burst_factor must be > 0 and burst_len_s >= 0")
        if self.zipf_s < 0:
            raise ValueError(f"zipf_s must be >= 0, got {self.zipf_s}")
        if len(set(self.popularity)) != len(self.popularity) or not self.popularity:
            raise ValueError(f"popularity must name distinct checkpoints, got {self.popularity}")

    @property
    def burst_start_s(self) -> float:
        if self.burst_at_s is not None:
            return self.burst_at_s
        return 0.4 * self.requests / self.rate_rps


@dataclass(frozen=True)
class TraceRequest:
    index: int
    at_s: float  # arrival time from the start of the replay
    checkpoint: str
    seed: int  # the image seed sent with the request
    in_burst: bool

    def body(self, params: TraceParams) -> dict[str, Any]:
        """The JSON body of POST /v1/generate (the same for every system)."""
        return {"checkpoint": self.checkpoint, "prompt": "a red cube on a table", "seed": self.seed,
                "width": params.width, "height": params.height, "num_inference_steps": params.steps,
                "guidance_scale": params.guidance_scale}


def zipf_weights(n: int, s: float) -> list[float]:
    """Normalized Zipf weights for ranks 1..n: p(r) = r**-s / H(n, s)."""
    raw = [1.0 / (r ** s) for r in range(1, n + 1)]
    total = sum(raw)
    return [w / total for w in raw]


def generate_trace(params: TraceParams) -> list[TraceRequest]:
    """The request trace: piecewise-Poisson arrivals (exact: exponential gaps are memoryless,
    so a gap crossing a rate boundary is redrawn from the boundary) and Zipf checkpoints."""
    rng = random.Random(params.seed)
    weights = zipf_weights(len(params.popularity), params.zipf_s)
    cum = [sum(weights[: i + 1]) for i in range(len(weights))]
    b0, b1 = params.burst_start_s, params.burst_start_s + params.burst_len_s
    out: list[TraceRequest] = []
    t = 0.0
    while len(out) < params.requests:
        in_burst = b0 <= t < b1
        rate = params.rate_rps * (params.burst_factor if in_burst else 1.0)
        gap = rng.expovariate(rate)
        boundary = b0 if t < b0 else (b1 if t < b1 else math.inf)
        if t + gap >= boundary:
            t = boundary
            continue
        t += gap
        rank = min(bisect.bisect_left(cum, rng.random() * cum[-1]), len(cum) - 1)
        out.append(TraceRequest(len(out), round(t, 6), params.popularity[rank], rng.randrange(2**31), b0 <= t < b1))
    return out


def trace_summary(trace: Sequence[TraceRequest], params: TraceParams) -> dict[str, Any]:
    counts: dict[str, int] = {}
    for r in trace:
        counts[r.checkpoint] = counts.get(r.checkpoint, 0) + 1
    return {
        "params": asdict(params),
        "requests": len(trace),
        "duration_s": round(trace[-1].at_s, 3) if trace else 0.0,
        "burst_requests": sum(r.in_burst for r in trace),
        "burst_window_s": [round(params.burst_start_s, 3), round(params.burst_start_s + params.burst_len_s, 3)],
        "per_checkpoint": {name: counts.get(name, 0) for name in params.popularity},
        "zipf_weights": dict(zip(params.popularity, (round(w, 4) for w in zipf_weights(len(params.popularity), params.zipf_s)))),
    }


# ---- catalog ----------------------------------------------------------------------------------
def _xl_spec() -> Any:
    from deployments.demo import DemoSpec

    return DemoSpec("bench-xl", seed=1005, unet_block_out_channels=(128, 256, 384), unet_layers_per_block=1,
                    unet_attention_head_dim=8, unet_norm_num_groups=32, vae_block_out_channels=(32, 64, 128, 256),
                    vae_norm_num_groups=16, text_hidden_size=384, text_layers=4, text_intermediate_size=1024,
                    text_attention_heads=6)


def bench_dir() -> Path:
    env = os.environ.get(BENCH_DIR_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "memrouter" / "bench"


def ensure_catalog(include_xl: bool = True) -> list[dict[str, Any]]:
    """Registry entries (dicts) for the demo checkpoints (+ bench-xl), building what is missing."""
    from deployments import demo

    demo.ensure_demo_checkpoints()
    entries = demo.demo_registry_entries()
    if include_xl:
        spec = _xl_spec()
        target = demo.ensure_checkpoint(spec, bench_dir())
        fields = {k: v for k, v in entries[0].items() if k not in ("name", "path")}
        entries.append({"name": spec.name, "path": str(target), **fields})
    return entries


def weights_bytes(entries: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Estimated weight bytes per checkpoint from safetensors headers (no tensor data read)."""
    from router.estimator import Estimator
    from router.registry import Registry

    reg = Registry.from_entries(list(entries))
    est = Estimator()
    return {spec.name: est.estimate(spec, dtype=spec.dtype.value, width=64, height=64).weights_bytes for spec in reg}


def workspace_bytes(entries: Sequence[dict[str, Any]], width: int, height: int) -> dict[str, int]:
    from router.estimator import Estimator
    from router.registry import Registry

    reg = Registry.from_entries(list(entries))
    est = Estimator()
    return {spec.name: est.estimate(spec, dtype=spec.dtype.value, width=width, height=height).workspace_bytes
            for spec in reg}

