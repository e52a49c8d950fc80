"""The simulated world: checkpoint catalog, replica fleet and request trace.

Every figure here is a MODELED ASSUMPTION, not a measurement; GPU calibration runs replace
them. They are parameters (see ``bench.sim.__main__``), stated in every result file.

Checkpoint sizes (weights at bf16, GB = 1e9 bytes; fine-tunes share their base
architecture's size, so every checkpoint of a variant has exactly the variant's size), the
project's own estimator's figures (bench/results/estimator_accuracy.md, bfloat16 rows,
within 0.5% of the real architectures' weights; hand-set figures before stop 19 were up to
29% under them):
  SD1.5                 2.13 GB
  SDXL                  6.94 GB
  SD3-medium, no T5     5.97 GB  (the table's components less T5)
  SD3-medium + T5-XXL  15.50 GB
  Flux.1 bf16          33.74 GB
  Flux.1 bf16, T5 fp8  28.98 GB  (T5 at half its bf16 bytes)
  Flux.1 nf4 + T5 bf16 16.64 GB  (bitsandbytes: not offloadable, released instead)
  Flux.1 nf4 + T5 nf4   9.79 GB  (idem; T5 at the transformer's nf4/bf16 ratio)
Workspace comes from the real estimator table (router/estimator.py) at the variant's
default resolution, batch 1.

Inference seconds per request on an A100-class GPU (SD1.5 1.5 s at 512^2, SDXL 4 s,
SD3 5 s, Flux 8 s, Flux nf4 10 s at 1024^2), divided by a per-profile speed factor.
"""

from __future__ import annotations

import bisect
import itertools
import random
from dataclasses import dataclass, field

from router import profiles
from router.estimator import Estimator
from router.placement import Need
from router.registry import Family

GB = 1_000_000_000
TWO_BYTE_DTYPES = ("float16", "bfloat16")


@dataclass(frozen=True)
class Variant:
    key: str
    family: Family
    weights_bytes: int
    resolution: int  # square side in pixels of the modeled request
    infer_s: float  # seconds per request on an A100-class GPU (speed factor 1.0)
    offloadable: bool  # False for bitsandbytes-quantized pipelines
    share: float  # fraction of the catalog


VARIANTS: tuple[Variant, ...] = (
    Variant("sd15", Family.SD1, int(2.13 * GB), 512, 1.5, True, 0.40),
    Variant("sdxl", Family.SDXL, int(6.94 * GB), 1024, 4.0, True, 0.30),
    Variant("sd3m", Family.SD3, int(5.97 * GB), 1024, 5.0, True, 0.06),
    Variant("sd3m-t5", Family.SD3, int(15.50 * GB), 1024, 5.0, True, 0.06),
    Variant("flux-bf16", Family.FLUX, int(33.74 * GB), 1024, 8.0, True, 0.06),
    Variant("flux-bf16-t5fp8", Family.FLUX, int(28.98 * GB), 1024, 8.0, True, 0.03),
    Variant("flux-nf4", Family.FLUX, int(16.64 * GB), 1024, 10.0, False, 0.05),
    Variant("flux-nf4-t5nf4", Family.FLUX, int(9.79 * GB), 1024, 10.0, False, 0.04),
)

# Throughput relative to an A100 for diffusion inference (modeled, not measured).
SPEED_FACTORS: dict[str, float] = {
    "T4-16GB": 0.25, "A10G-24GB": 0.45, "L4-24GB": 0.40, "A100-40GB": 0.90,
    "A100-80GB": 1.00, "H100-80GB": 2.00, "H200-141GB": 2.20,
}

DEFAULT_MIX = "T4-16GB:0.15,A10G-24GB:0.25,L4-24GB:0.25,A100-80GB:0.20,H100-80GB:0.15"


@dataclass(frozen=True)
class Checkpoint:
    index: int
    name: str
    variant: Variant
    weights_bytes: int
    workspace_bytes: int
    need: Need = field(repr=False, compare=False)

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.workspace_bytes


@dataclass(frozen=True)
class ReplicaSpec:
    index: int
    replica_id: str
    profile: profiles.HardwareProfile
    speed: float


def _largest_remainder(total: int, shares: list[float]) -> list[int]:
    """Split ``total`` into integer counts proportional to ``shares`` (sum exactly total)."""
    s = sum(shares)
    raw = [total * x / s for x in shares]
    counts = [int(r) for r in raw]
    order = sorted(range(len(shares)), key=lambda i: (raw[i] - counts[i]), reverse=True)
    for i in order[: total - sum(counts)]:
        counts[i] += 1
    return counts


def build_catalog(n: int, rng: random.Random, *, variants: tuple[Variant, ...] = VARIANTS) -> list[Checkpoint]:
    """``n`` checkpoints in proportion to the variants' shares, in a seeded random order
    (the order is the popularity rank: index 0 is the most popular)."""
    est = Estimator()
    counts = _largest_remainder(n, [v.share for v in variants])
    kinds = [v for v, c in zip(variants, counts) for _ in range(c)]
    rng.shuffle(kinds)
    out = []
    for i, v in enumerate(kinds):
        ws = est.workspace_bytes(v.family, dtype="bfloat16", width=v.resolution, height=v.resolution, batch=1)
        name = f"{v.key}-{i:04d}"
        need = Need(name, {d: v.weights_bytes for d in TWO_BYTE_DTYPES}, {d: ws for d in TWO_BYTE_DTYPES})
        out.append(Checkpoint(i, name, v, v.weights_bytes, ws, need))
    return out


def parse_mix(mix: str) -> list[tuple[str, float]]:
    pairs = []
    for part in mix.split(","):
        name, _, share = part.partition(":")
        name = name.strip()
        if name not in profiles.PROFILES:
            raise ValueError(f"--mix: unknown profile {name!r}; known: {sorted(profiles.PROFILES)}")
        if name not in SPEED_FACTORS:
            raise ValueError(f"--mix: no speed factor for {name!r}")
        pairs.append((name, float(share or 1.0)))
    return pairs


def build_fleet(n: int, mix: str, rng: random.Random) -> list[ReplicaSpec]:
    pairs = parse_mix(mix)
    counts = _largest_remainder(n, [s for _, s in pairs])
    names = [name for (name, _), c in zip(pairs, counts) for _ in range(c)]
    rng.shuffle(names)
    return [ReplicaSpec(i, f"r{i:04d}", profiles.PROFILES[p], SPEED_FACTORS[p]) for i, p in enumerate(names)]


class Zipf:
    """P(rank k) proportional to 1 / (k+1)^s over ``n`` ranks."""

    def __init__(self, n: int, s: float):
        self.cum = list(itertools.accumulate(1.0 / (k + 1) ** s for k in range(n)))

    def draw(self, rng: random.Random) -> int:
        return bisect.bisect_left(self.cum, rng.random() * self.cum[-1])


@dataclass(frozen=True)
class Request:
    index: int
    arrival_s: float
    checkpoint: int  # catalog index
    burst: bool


def build_trace(
    n_requests: int, n_checkpoints: int, rng: random.Random, *, rate: float, zipf_s: float,
    burst_every_s: float, burst_len_s: float, burst_factor: float, burst_focus: float,
) -> list[Request]:
    """Poisson arrivals at ``rate``/s with bursts.

    Bursts start as a Poisson process (mean gap ``burst_every_s``) and last ``burst_len_s``;
    during one the rate is ``rate * burst_factor`` and a fraction ``burst_focus`` of its
    requests name one checkpoint drawn uniformly from the catalog (usually a cold one: a
    newly published fine-tune going viral). Other requests follow Zipf(``zipf_s``).
    """
    zipf = Zipf(n_checkpoints, zipf_s)
    out: list[Request] = []
    t = 0.0
    next_burst = rng.expovariate(1.0 / burst_every_s) if burst_every_s > 0 and burst_factor > 0 else float("inf")
    burst_end, hot = -1.0, -1
    while len(out) < n_requests:
        in_burst = t < burst_end
        lam = rate * (burst_factor if in_burst else 1.0)
        t_next = t + rng.expovariate(lam)
        boundary = burst_end if in_burst else next_burst
        if t_next >= boundary:
            # Memoryless: restart the draw at the boundary with the new rate.
            t = boundary
            if not in_burst:
                burst_end = t + burst_len_s
                hot = rng.randrange(n_checkpoints)
                next_burst = burst_end + rng.expovariate(1.0 / burst_every_s)
            continue
        t = t_next
        if in_burst and rng.random() < burst_focus:
            ck = hot
        else:
            ck = zipf.draw(rng)
        out.append(Request(len(out), t, ck, in_burst))
    return out
