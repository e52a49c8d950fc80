"""Loading speed vs the limit: cold load vs a raw read of the same bytes; warm reload vs H2D bandwidth.

    python -m bench.load_speed                 # demo checkpoints + one SD1.5-size fp16 pipeline
    python -m bench.load_speed --no-large      # demo checkpoints only (fast)
    python -m bench.load_speed --reps 5

Writes bench/results/load_speed.{json,md,png}.

Cold load (every machine). For each checkpoint: the raw read of all its ``*.safetensors``
bytes with the page cache warm (every file read twice with ``open().read()``, the second
pass timed), then the project's real loader ``deployments.pipelines.load_pipeline(path,
dtype=<stored dtype>, quantization="none", device=...)`` at the checkpoint's stored dtype (no
conversion). ``ratio = raw_read_s / load_s`` (target >= 0.8: the load runs at >= 80% of raw
read speed). Medians over ``--reps``. Where the time goes: ``load_sub_model`` per component
(diffusers/transformers from_pretrained, file read included), ``_materialize`` (copying
mmap-backed tensors to private memory), the rest of ``DiffusionPipeline.from_pretrained``
(model_index, tokenizer, scheduler), and ``move_pipeline`` on CUDA. A reference
"safetensors floor" is measured too: ``safetensors.torch.load(open(f).read())`` for every file
(read + one deserializing copy; what a disable_mmap load cannot beat), and on CPU the
loader used before (``disable_mmap=True``, the "read path") beside the current one.

The large checkpoint is a full StableDiffusionPipeline at SD1.5 size (UNet 860M + CLIP-L +
VAE, random fp16 weights, ~2.1 GB) generated once under ``~/.cache/memrouter/bench`` (never in
the repository); its tokenizer and scheduler are the demo's.

Warm reload (CUDA only; skipped with a note elsewhere): pinned vs pageable host->device
bandwidth of torch tensors (1 GiB, CUDA events), host copies that are mmap-backed (a tensor
over a mapped safetensors file) vs materialized pageable vs pinned, and the project's
``move_pipeline(pipe, "cuda")`` reload from pinned and from pageable host copies, each against
the pinned bandwidth (target >= 0.8).
"""

from __future__ import annotations

import argparse
import gc
import json
import mmap
import os
import shutil
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from bench.estimator_accuracy import extended_machine_info, machine_line
from deployments import pipelines as P

RESULTS = Path(__file__).resolve().parent / "results"
BENCH_CACHE = Path.home() / ".cache" / "memrouter" / "bench"
LARGE_NAME = "sd15-size-fp16-v1"
TARGET = 0.8
GB = 1e9


# ---- checkpoints -----------------------------------------------------------------------------
def safetensors_files(path: Path) -> list[Path]:
    return sorted(path.rglob("*.safetensors"))


def stored_dtype(path: Path) -> str:
    """The dtype of the checkpoint's float tensors (first float tensor of the denoiser's header)."""
    from router.estimator import read_safetensors_header

    names = {"F32": "float32", "F16": "float16", "BF16": "bfloat16"}
    for f in safetensors_files(path):
        for t in read_safetensors_header(f):
            if t.dtype in names:
                return names[t.dtype]
    return "float32"


def ensure_large_checkpoint(root: Path, demo_folder: Path) -> Path:
    """An SD1.5-size StableDiffusionPipeline (random fp16 weights) at ``root/LARGE_NAME``; built once."""
    target = root / LARGE_NAME
    if (target / ".complete").exists():
        return target
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTokenizer

    from bench.arch_configs import ARCHS, build_component
    from diffusers import EulerDiscreteScheduler

    tmp = root / f".{LARGE_NAME}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    gen = torch.Generator().manual_seed(1234)
    mods = {}
    old = torch.get_default_dtype()
    for comp in ARCHS["sd15"].components:
        torch.set_default_dtype(torch.float16)
        try:
            with torch.device("meta"):
                m = build_component(comp)
        finally:
            torch.set_default_dtype(old)
        m = m.to_empty(device="cpu")
        with torch.no_grad():
            for t in m.parameters():
                t.normal_(0.0, 0.02, generator=gen)
            for name, b in m.named_buffers():
                if b.is_floating_point():
                    b.normal_(0.0, 0.02, generator=gen)
                else:  # CLIP position_ids
                    b.copy_(torch.arange(b.shape[-1]).expand_as(b))
        mods[comp.name] = m.eval()
    pipe = StableDiffusionPipeline(
        vae=mods["vae"], text_encoder=mods["text_encoder"], unet=mods["unet"],
        tokenizer=CLIPTokenizer.from_pretrained(str(demo_folder / "tokenizer")),
        scheduler=EulerDiscreteScheduler.from_pretrained(str(demo_folder / "scheduler")),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.save_pretrained(str(tmp), safe_serialization=True)
    for extra in ("vocab.json", "merges.txt"):
        if (demo_folder / "tokenizer" / extra).exists():
            shutil.copy(demo_folder / "tokenizer" / extra, tmp / "tokenizer" / extra)
    (tmp / ".complete").write_text("ok\n")
    del pipe, mods
    gc.collect()
    if target.exists():
        shutil.rmtree(target)
    os.rename(tmp, target)
    return target


# ---- timing helpers --------------------------------------------------------------------------
def raw_read(files: list[Path]) -> tuple[float, int]:
    """Seconds to read every file whole (``open().read()``), and the bytes read."""
    t0 = time.perf_counter()
    n = 0
    for f in files:
        with open(f, "rb") as fh:
            n += len(fh.read())
    return time.perf_counter() - t0, n


def mapped_copy(files: list[Path]) -> float:
    """Seconds to copy every file from the page cache into fresh private torch memory via a
    memory map (``torch.frombuffer(mmap).clone()``): the least work that ends with the bytes
    in this process's own memory, a tighter limit than ``open().read()`` on this machine."""
    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            src = torch.frombuffer(mm, dtype=torch.uint8)
            dst = src.clone()
            del src, dst
    return time.perf_counter() - t0


def safetensors_floor(files: list[Path]) -> float:
    """Seconds for read + deserialize of every file (``safetensors.torch.load(bytes)``)."""
    from safetensors.torch import load

    t0 = time.perf_counter()
    for f in files:
        with open(f, "rb") as fh:
            sd = load(fh.read())
        del sd
    return time.perf_counter() - t0


class PhaseTimer:
    """Wraps functions of the loader path to record where load time goes (this process only)."""

    def __init__(self) -> None:
        self.times: dict[str, float] = {}

    @contextmanager
    def wrap(self, module: Any, attr: str, label: Callable[..., str]) -> Iterator[None]:
        orig = getattr(module, attr)

        def timed(*a: Any, **kw: Any) -> Any:
            t0 = time.perf_counter()
            try:
                return orig(*a, **kw)
            finally:
                key = label(*a, **kw)
                self.times[key] = self.times.get(key, 0.0) + time.perf_counter() - t0

        setattr(module, attr, timed)
        try:
            yield
        finally:
            setattr(module, attr, orig)


def mmap_backed_bytes(pipe: Any) -> dict[str, int]:
    """Bytes per component still backed by a mapped safetensors file (what _materialize copies)."""
    ranges = P._safetensors_mappings() or []
    out = {}
    for name, module in P.module_components(pipe).items():
        seen, n = set(), 0
        for t in P._tensors(module):
            s = t.untyped_storage()
            if t.device.type == "cpu" and P._in_ranges(t, ranges) and s.data_ptr() not in seen:
                seen.add(s.data_ptr())
                n += s.nbytes()
        out[name] = n
    return out


def timed_load(path: Path, dtype: str, device: str) -> tuple[float, dict[str, Any], Any]:
    """Seconds of one load_pipeline, per-phase seconds (+ ``mmap_backed_bytes`` per component), the pipeline."""
    import diffusers.pipelines.pipeline_utils as pu

    pt = PhaseTimer()
    backed: dict[str, int] = {}
    orig_materialize = P._materialize

    def counting_materialize(pipe: Any) -> None:
        backed.update(mmap_backed_bytes(pipe))
        return orig_materialize(pipe)
    with pt.wrap(pu, "load_sub_model", lambda *a, **kw: f"component:{kw.get('name', '?')}"), \
            pt.wrap(P, "move_pipeline", lambda *a, **kw: "move_to_device"):
        P._materialize = counting_materialize
        pt_ctx = pt.wrap(P, "_materialize", lambda *a, **kw: "materialize (incl. finding mmap-backed tensors)")
        pt_ctx.__enter__()
        t0 = time.perf_counter()
        pipe = P.load_pipeline(path, dtype=dtype, quantization="none", device=device)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        total = time.perf_counter() - t0
        pt_ctx.__exit__(None, None, None)
        P._materialize = orig_materialize
    pt.times["other (model_index, tokenizer, scheduler, pipeline init)"] = total - sum(pt.times.values())
    pt.times["mmap_backed_bytes"] = backed  # type: ignore[assignment]
    return total, pt.times, pipe


def timed_read_load(path: Path, dtype: str) -> tuple[float, int]:
    """The loader this project used before (CPU), for comparison: the same from_pretrained
    call with ``disable_mmap=True`` (each file read into a bytes object, then deserialized:
    two copies), then _materialize for the components that map their files regardless
    (transformers' text encoders). Returns seconds and how many tensors are still
    file-backed afterwards (0 = the same guarantee as load_pipeline)."""
    from diffusers import DiffusionPipeline

    t0 = time.perf_counter()
    pipe = DiffusionPipeline.from_pretrained(str(path), dtype=P.torch_dtype(dtype), use_safetensors=True, local_files_only=True,
                                             trust_remote_code=False, disable_mmap=True)
    P._materialize(pipe)
    t = time.perf_counter() - t0
    backed = sum(max(0, P.file_backed_tensors(m)) for m in P.module_components(pipe).values())
    free(pipe)
    return t, backed


def free(pipe: Any) -> None:
    P.free_pipeline(pipe, None)
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def cold_load_rows(name: str, path: Path, reps: int, device: str) -> dict[str, Any]:
    files = safetensors_files(path)
    dtype = stored_dtype(path)
    raw_read(files)  # warm the page cache
    reads, floors, loads, phases, read_path, copies = [], [], [], [], [], []
    backed: dict[str, int] = {}
    read_backed = 0
    nbytes = 0
    resident = None
    for _ in range(reps):
        t, nbytes = raw_read(files)
        reads.append(t)
        copies.append(mapped_copy(files))
        floors.append(safetensors_floor(files))
        gc.collect()
        load_s, ph, pipe = timed_load(path, dtype, device)
        backed = ph.pop("mmap_backed_bytes")
        loads.append(load_s)
        phases.append(ph)
        if resident is None:
            resident = sum(P.measure_bytes(pipe).values())
        free(pipe)
        if device == "cpu":
            t_p, read_backed = timed_read_load(path, dtype)
            read_path.append(t_p)
    keys = sorted({k for ph in phases for k in ph})
    phase_med = {k: round(med([ph.get(k, 0.0) for ph in phases]), 4) for k in keys}
    r, l = med(reads), med(loads)
    return {
        "checkpoint": name, "dtype": dtype, "device": device, "files": len(files), "file_bytes": nbytes,
        "resident_bytes": resident, "reps": reps,
        "raw_read_s": round(r, 4), "raw_read_GBps": round(nbytes / r / GB, 3),
        "mapped_copy_s": round(med(copies), 4), "mapped_copy_ratio": round(med(copies) / l, 4),
        "safetensors_floor_s": round(med(floors), 4), "safetensors_floor_GBps": round(nbytes / med(floors) / GB, 3),
        "load_s": round(l, 4), "load_GBps": round(nbytes / l / GB, 3),
        "ratio": round(r / l, 4), "floor_ratio": round(r / med(floors), 4), "meets_target": r / l >= TARGET,
        "load_s_all": [round(x, 4) for x in loads], "raw_read_s_all": [round(x, 4) for x in reads],
        "phases_median_s": phase_med, "mmap_backed_bytes_before_materialize": backed,
        "read_path_s": round(med(read_path), 4) if read_path else None,
        "read_path_ratio": round(r / med(read_path), 4) if read_path else None,
        "read_path_file_backed_tensors_after": read_backed if read_path else None,
    }


# ---- CUDA: host -> device ----------------------------------------------------------------------
def h2d_seconds(src: torch.Tensor, reps: int = 5) -> float:
    """Median seconds of ``src.to('cuda', non_blocking=True)`` timed with CUDA events."""
    times = []
    for _ in range(reps + 1):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst = src.to("cuda", non_blocking=True)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1000)
        del dst
    return med(times[1:])


def bandwidth_rows(nbytes: int, mmap_file: Path | None) -> dict[str, Any]:
    out: dict[str, Any] = {"bytes": nbytes}
    pageable = torch.empty(nbytes, dtype=torch.uint8)
    pageable.random_(0, 255)
    out["pageable_GBps"] = round(nbytes / h2d_seconds(pageable) / GB, 3)
    pinned = pageable.pin_memory()
    out["pinned_GBps"] = round(nbytes / h2d_seconds(pinned) / GB, 3)
    dev = pinned.to("cuda")
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    pinned.copy_(dev, non_blocking=True)
    torch.cuda.synchronize()
    out["pinned_d2h_GBps"] = round(nbytes / (time.perf_counter() - t0) / GB, 3)
    del pinned, dev, pageable
    if mmap_file is not None:
        size = mmap_file.stat().st_size
        with open(mmap_file, "rb") as f:
            mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            f.read()  # page cache warm
            t = torch.frombuffer(memoryview(mm), dtype=torch.uint8)  # read-only mmap: torch warns, never writes
            out["mmap_bytes"] = size
            out["mmap_backed_GBps"] = round(size / h2d_seconds(t) / GB, 3)
            mat = t.clone()
            out["materialized_pageable_GBps"] = round(size / h2d_seconds(mat) / GB, 3)
            pin = mat.pin_memory()
            out["materialized_pinned_GBps"] = round(size / h2d_seconds(pin) / GB, 3)
            del t, mat, pin
            gc.collect()
            try:
                mm.close()
            except BufferError:
                pass  # a view is still alive; closed at exit
    torch.cuda.empty_cache()
    return out


def warm_reload_rows(name: str, path: Path, reps: int, pinned_GBps: float) -> dict[str, Any]:
    dtype = stored_dtype(path)
    pipe = P.load_pipeline(path, dtype=dtype, device="cpu")
    nbytes = sum(P.measure_bytes(pipe).values())
    out: dict[str, Any] = {"checkpoint": name, "dtype": dtype, "bytes": nbytes}
    for pin in (True, False):
        times = []
        for _ in range(reps):
            P.move_pipeline(pipe, "cpu", pin_host_memory=pin)
            gc.collect()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            P.move_pipeline(pipe, "cuda")
            torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        t = med(times)
        key = "pinned" if pin else "pageable"
        out[f"reload_{key}_s"] = round(t, 4)
        out[f"reload_{key}_GBps"] = round(nbytes / t / GB, 3)
        out[f"reload_{key}_ratio"] = round(nbytes / t / GB / pinned_GBps, 4)
    out["meets_target"] = out["reload_pinned_ratio"] >= TARGET
    free(pipe)
    return out


# ---- report ------------------------------------------------------------------------------------
def write_md(path: Path, res: dict[str, Any]) -> None:
    L = ["# Loading speed vs the limit", "", machine_line(res["machine"]), "",
         f"Command: `{res['command']}`. Medians of {res['reps']} repetitions. Target: ratio >= {TARGET}.", "",
         "## Cold load (disk -> device) vs raw read of the same safetensors bytes, page cache warm", "",
         "`ratio = raw_read_s / load_s` (1.0 = the load runs at raw read speed). `floor` = safetensors.torch.load "
         "of the file bytes (read + one deserializing copy), the best a disable_mmap (read-path) loader can do.", "",
         "| checkpoint | dtype | device | files | MB | raw read s | raw GB/s | floor s | load s | load GB/s | ratio | floor ratio | >= 0.8 | read-path s | read-path ratio | mapped copy s | load vs mapped copy |",
         "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|"]
    for r in res["cold"]:
        L.append(f"| {r['checkpoint']} | {r['dtype']} | {r['device']} | {r['files']} | {r['file_bytes'] / 1e6:.1f} | {r['raw_read_s']:.4f} | "
                 f"{r['raw_read_GBps']:.2f} | {r['safetensors_floor_s']:.4f} | {r['load_s']:.4f} | {r['load_GBps']:.3f} | {r['ratio']:.3f} | "
                 f"{r['floor_ratio']:.3f} | {'yes' if r['meets_target'] else '**no**'} | "
                 f"{'-' if r.get('read_path_s') is None else format(r['read_path_s'], '.4f')} | "
                 f"{'-' if r.get('read_path_ratio') is None else format(r['read_path_ratio'], '.3f')} | "
                 f"{r['mapped_copy_s']:.4f} | {r['mapped_copy_ratio']:.3f} |")
    L += ["", "`load` = load_pipeline: from_pretrained with the files memory-mapped, then `_materialize` (one copy from "
          "the page cache into private memory). `read-path` = the loader used before, for comparison: the same call with "
          "`disable_mmap=True` (read + deserializing copy), then `_materialize`. `mapped copy` = every file copied from the page "
          "cache into fresh torch memory through a memory map, no parsing: a tighter limit than `open().read()`, which on "
          "this machine is slower than the mapped copy; `load vs mapped copy` = mapped_copy_s / load_s. File-backed "
          "tensors after the read path: " + ", ".join(f"{r['checkpoint']} {r.get('read_path_file_backed_tensors_after')}" for r in res["cold"]) + ".",
          "", "### Where the load time goes (median seconds)", "", "| checkpoint | phase | s | share |", "|---|---|---:|---:|"]
    for r in res["cold"]:
        for k, v in sorted(r["phases_median_s"].items(), key=lambda kv: -kv[1]):
            L.append(f"| {r['checkpoint']} | {k} | {v:.4f} | {100 * v / r['load_s']:.0f}% |")
    L += ["", "Bytes mmap-backed after from_pretrained, copied by _materialize: "
          + "; ".join(f"{r['checkpoint']}: " + (", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in r["mmap_backed_bytes_before_materialize"].items() if v) or "none")
                      for r in res["cold"])]
    L += ["", "## Warm reload (host -> device) vs pinned H2D bandwidth", ""]
    if res.get("bandwidth"):
        b = res["bandwidth"]
        L += [f"H2D {b['bytes'] / 2**30:.1f} GiB: pageable {b['pageable_GBps']} GB/s, pinned {b['pinned_GBps']} GB/s, pinned D2H {b['pinned_d2h_GBps']} GB/s.",
              "" if "mmap_backed_GBps" not in b else
              f"Host copies of a {b['mmap_bytes'] / 1e6:.0f} MB safetensors file: mmap-backed {b['mmap_backed_GBps']} GB/s, "
              f"materialized pageable {b['materialized_pageable_GBps']} GB/s, materialized pinned {b['materialized_pinned_GBps']} GB/s.", "",
              "| checkpoint | MB | reload pinned s | GB/s | ratio | reload pageable s | GB/s | ratio | >= 0.8 (pinned) |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in res["warm"]:
            L.append(f"| {r['checkpoint']} | {r['bytes'] / 1e6:.1f} | {r['reload_pinned_s']:.4f} | {r['reload_pinned_GBps']:.2f} | {r['reload_pinned_ratio']:.3f} | "
                     f"{r['reload_pageable_s']:.4f} | {r['reload_pageable_GBps']:.2f} | {r['reload_pageable_ratio']:.3f} | {'yes' if r['meets_target'] else '**no**'} |")
    else:
        L.append(f"Not measured: {res['warm_note']}")
    if res.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in res["notes"]]
    path.write_text("\n".join(L) + "\n")


def plot(path: Path, res: dict[str, Any]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cold = res["cold"]
    names = [r["checkpoint"] for r in cold]
    x = list(range(len(cold)))
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    axes[0].bar(x, [r["ratio"] for r in cold], 0.5, label="load_pipeline")
    axes[0].plot(x, [r["floor_ratio"] for r in cold], "k^", label="safetensors.torch.load floor")
    if all(r.get("read_path_ratio") for r in cold):
        axes[0].plot(x, [r["read_path_ratio"] for r in cold], "gs", label="read path (disable_mmap=True), the loader before")
    axes[0].axhline(TARGET, color="red", ls="--", lw=1, label=f"target {TARGET}")
    axes[0].set_xticks(x, names, fontsize=8)
    axes[0].set_ylabel("raw read time / load time")
    axes[0].set_title("Cold load vs raw read (page cache warm)")
    axes[0].legend(fontsize=8)
    axes[1].bar([i - 0.2 for i in x], [r["raw_read_GBps"] for r in cold], 0.4, label="raw read")
    axes[1].bar([i + 0.2 for i in x], [r["load_GBps"] for r in cold], 0.4, label="load_pipeline")
    axes[1].set_xticks(x, names, fontsize=8)
    axes[1].set_ylabel("GB/s (file bytes)")
    axes[1].set_yscale("log")
    axes[1].legend(fontsize=8)
    axes[1].set_title("Throughput")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--no-large", action="store_true", help="skip the generated SD1.5-size checkpoint")
    ap.add_argument("--large-root", default=str(BENCH_CACHE))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--bw-bytes", type=int, default=1 << 30)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args(argv)
    if args.reps < 1:
        ap.error(f"--reps must be >= 1, got {args.reps}")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: this torch sees no CUDA device (torch {torch.__version__})")
    if args.bw_bytes < 1:
        ap.error(f"--bw-bytes must be >= 1, got {args.bw_bytes}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    P.quiet_progress_bars()
    t_start = time.perf_counter()

    from deployments.demo import ensure_demo_checkpoints

    ckpts = dict(ensure_demo_checkpoints())
    notes = []
    if not args.no_large:
        root = Path(args.large_root)
        root.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        ckpts["sd15-size-fp16"] = ensure_large_checkpoint(root, ckpts["demo-xs"])
        notes.append(f"sd15-size-fp16: generated/verified in {time.perf_counter() - t0:.1f} s under {root} (random fp16 weights, SD1.5 configs).")

    cold = []
    for name, path in ckpts.items():
        r = cold_load_rows(name, path, args.reps, args.device)
        cold.append(r)
        print(f"{name:16s} {r['file_bytes'] / 1e6:8.1f} MB raw {r['raw_read_s']:.4f}s ({r['raw_read_GBps']:.2f} GB/s) "
              f"floor {r['safetensors_floor_s']:.4f}s load {r['load_s']:.4f}s ratio {r['ratio']:.3f}", flush=True)

    bandwidth: dict[str, Any] = {}
    warm: list[dict[str, Any]] = []
    warm_note = ""
    if torch.cuda.is_available() and args.device.startswith("cuda"):
        biggest = max(ckpts.values(), key=lambda p: sum(f.stat().st_size for f in safetensors_files(p)))
        bigfile = max(safetensors_files(biggest), key=lambda f: f.stat().st_size)
        bandwidth = bandwidth_rows(args.bw_bytes, bigfile)
        for name, path in ckpts.items():
            warm.append(warm_reload_rows(name, path, args.reps, bandwidth["pinned_GBps"]))
    else:
        warm_note = ("no CUDA device on this machine: pinned/pageable H2D bandwidth, mmap-backed vs materialized host "
                     "copies and the move_pipeline warm reload run only on a GPU (python -m bench.load_speed there).")

    notes.append("On CPU the 'device' is the CPU: load_pipeline(device='cpu') = from_pretrained (files memory-mapped) + _materialize; "
                 "there is no separate host tier to reload from.")
    res = {"machine": extended_machine_info(), "command": "python -m bench.load_speed " + " ".join(argv if argv is not None else sys.argv[1:]),
           "reps": args.reps, "target": TARGET, "cold": cold, "bandwidth": bandwidth, "warm": warm, "warm_note": warm_note,
           "notes": notes, "elapsed_s": round(time.perf_counter() - t_start, 1)}
    (out / "load_speed.json").write_text(json.dumps(res, indent=2))
    write_md(out / "load_speed.md", res)
    plot(out / "load_speed.png", res)
    print(f"wrote {out}/load_speed.{{json,md,png}} in {res['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
