"""The torch side: load, measure, move, free and run a diffusers pipeline.

This is the only module that touches torch devices; everything above it (the cache, the
replica) deals in names and byte counts.

Loading never unpickles: weights are read from safetensors only (``use_safetensors=True``),
remote code is never trusted, and nothing is fetched from a hub (``local_files_only=True``).
Weights are mapped from the page cache and copied once to where they live (the device, or
private host memory); when :func:`load_pipeline` returns, no weight stays memory-mapped from
its file, so rewriting or deleting a checkpoint folder on disk cannot change (or crash, via
SIGBUS on truncation) a pipeline already in memory.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import itertools
import logging
import os
import threading
import time
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch

from router.estimator import read_model_index

log = logging.getLogger("memrouter.pipelines")

_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
_QUANT_BACKENDS = {"int8": "bitsandbytes_8bit", "nf4": "bitsandbytes_4bit"}
_DENOISERS = ("unet", "transformer")


class PipelineLoadError(RuntimeError):
    """A checkpoint folder could not be loaded as a pipeline.

    ``checkpoint`` is the folder's last path component (never the full host path, which
    would leak into client-facing errors); ``reason`` says what went wrong.
    ``out_of_memory`` is True when the load failed for lack of device or host memory, so
    that callers can free memory and retry (see :func:`is_out_of_memory`).
    """

    def __init__(self, checkpoint: str, reason: str, *, out_of_memory: bool = False):
        self.checkpoint = checkpoint
        self.reason = reason
        self.out_of_memory = out_of_memory
        super().__init__(f"cannot load checkpoint {checkpoint!r}: {reason}")


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype for ``"float16"``, ``"bfloat16"`` or ``"float32"``; ValueError otherwise."""
    try:
        return _DTYPES[name]
    except (KeyError, TypeError):
        raise ValueError(f"dtype must be one of {sorted(_DTYPES)}, got {name!r}") from None


# ---- loading ---------------------------------------------------------------------------------
def _denoiser_name(path: Path) -> str:
    """``unet`` or ``transformer``, whichever component model_index.json declares."""
    index = read_model_index(path)
    for name in _DENOISERS:
        if isinstance(index.get(name), list) and index[name][0] is not None:
            return name
    raise ValueError(f"model_index.json declares no denoiser (none of {', '.join(_DENOISERS)}) to quantize")


def _quantization_config(path: Path, quantization: str, dtype: torch.dtype) -> Any:
    """A diffusers PipelineQuantizationConfig for the denoiser only, or None for ``"none"``."""
    if quantization == "none":
        return None
    from diffusers import PipelineQuantizationConfig

    if quantization == "int8":
        quant_kwargs: dict[str, Any] = {"load_in_8bit": True}
    else:
        quant_kwargs = {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4", "bnb_4bit_compute_dtype": dtype}
    return PipelineQuantizationConfig(
        quant_backend=_QUANT_BACKENDS[quantization],
        quant_kwargs=quant_kwargs,
        components_to_quantize=[_denoiser_name(path)],
    )


def _safetensors_mappings() -> list[tuple[int, int]] | None:
    """Address ranges of ``*.safetensors`` files mapped into this process.

    None where ``/proc/self/maps`` cannot be read (not Linux): callers must then assume any
    CPU tensor may be file-backed.
    """
    ranges = []
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                if len(fields) == 6 and fields[5].rstrip("\n").endswith(".safetensors"):
                    start, end = fields[0].split("-")
                    ranges.append((int(start, 16), int(end, 16)))
    except OSError:
        return None
    return ranges


def file_backed_tensors(module: torch.nn.Module) -> int:
    """How many parameters/buffers of ``module`` point into a mapped safetensors file.

    Linux only (reads ``/proc/self/maps``); returns -1 where that cannot be checked.
    """
    ranges = _safetensors_mappings()
    if ranges is None:
        return -1
    return sum(1 for t in _tensors(module) if t.device.type == "cpu" and _in_ranges(t, ranges))


def _in_ranges(t: torch.Tensor, ranges: list[tuple[int, int]]) -> bool:
    ptr = t.untyped_storage().data_ptr()
    return any(start <= ptr < end for start, end in ranges)


def _tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """Each parameter and buffer of ``module`` once (shared Parameter objects deduplicated)."""
    seen: set[int] = set()
    for t in (*module.parameters(), *module.buffers()):
        if id(t) not in seen:
            seen.add(id(t))
            yield t


def _quant_state_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    """The bitsandbytes quantization state of ``module``'s layers, which lives beside the
    parameters, not in them: a 4-bit weight's ``quant_state`` (absmax and code, and the
    nested pair under double quantization), an 8-bit weight's and layer state's ``SCB`` and
    ``CB``. Read by attribute (bitsandbytes is not imported): nf4 without double
    quantization keeps a float32 absmax per 64 weights, 12.5% on top of the packed weights."""
    for m in module.modules():
        holders = [getattr(m, "state", None)]
        for p in m.parameters(recurse=False):
            holders.append(p)
            qs = getattr(p, "quant_state", None)
            while qs is not None:
                yield from (t for t in (getattr(qs, "absmax", None), getattr(qs, "code", None),
                                        getattr(qs, "offset", None)) if isinstance(t, torch.Tensor))
                qs = getattr(qs, "state2", None)
        for h in holders:
            for attr in ("SCB", "CB"):
                t = getattr(h, attr, None)
                if isinstance(t, torch.Tensor):
                    yield t


def _rehome(tensors: list[torch.Tensor], make_storage: Callable[[torch.UntypedStorage], torch.UntypedStorage]) -> None:
    """Point each tensor at a new storage made from its old one, in place (``.data``).

    Tensors that shared a storage share the new one: tied weights stay tied. Parameter
    objects keep their identity, so optimizers, hooks and module attributes stay valid.
    """
    fresh: dict[tuple[str, int], torch.UntypedStorage] = {}
    for t in tensors:
        old = t.untyped_storage()
        key = (str(old.device), old.data_ptr())
        if key not in fresh:
            fresh[key] = make_storage(old)
        view = torch.empty(0, dtype=t.dtype, device=fresh[key].device)
        view.set_(fresh[key], t.storage_offset(), t.size(), t.stride())
        t.data = view


def _materialize(pipe: Any) -> None:
    """Copy into private memory every CPU tensor that is still backed by a safetensors mmap
    (one copy each; tensors sharing a storage keep sharing the copy)."""
    ranges = _safetensors_mappings()
    for module in module_components(pipe).values():
        backed = [t for t in _tensors(module) if t.device.type == "cpu" and (ranges is None or _in_ranges(t, ranges))]
        if backed:
            _rehome(backed, lambda s: s.clone())


def _redact(text: str, path: Path) -> str:
    """``text`` with the folder's host path replaced by its last component."""
    for form in {str(path.resolve()), str(path.absolute()), str(path)}:
        text = text.replace(form, path.name)
    return text


def folder_signature(path: Path) -> tuple:
    """(relative path, size, mtime ns) of every file under ``path``, sorted, links followed
    (a folder reached twice, as through a link to a parent, is walked once): a cheap test
    of whether a checkpoint folder changed (a few dozen stat calls), without reading a byte
    of it. Unreadable entries count by their name alone."""
    out = []
    seen: set[str] = set()
    for root, dirs, files in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            dirs[:] = []
            continue
        seen.add(real)
        for name in files:
            p = Path(root) / name
            try:
                st = p.stat()
                out.append((str(p.relative_to(path)), st.st_size, st.st_mtime_ns))
            except OSError:
                out.append((str(p.relative_to(path)), -1, -1))
    return tuple(sorted(out))


def load_pipeline(path: Path, *, dtype: str, quantization: str = "none", device: str = "cpu",
                  variant: str | None = None) -> Any:
    """Load the diffusers pipeline in folder ``path`` onto ``device``.

    Safetensors only, local files only, no remote code. ``quantization`` is ``"none"``,
    ``"int8"`` or ``"nf4"`` (bitsandbytes, denoiser only; bitsandbytes needs a CUDA GPU,
    so on a CPU-only host these fail with PipelineLoadError). ``variant`` (``"fp16"``) loads
    a component's variant files where it has them, its plain ones elsewhere
    (router/layout.py, which the estimate reads the same way).

    The files are memory-mapped (one copy from the page cache to the destination, where
    reading them first costs a read plus a deserializing copy: bench/load_speed.py measures
    both), then every tensor left on CPU is materialized into private memory before this
    returns. A file truncated at rest fails safetensors' size check like any corrupt file;
    caveat: a file truncated *while* it is being loaded can end the process with SIGBUS
    (Serve then restarts the replica), so replace checkpoint files by rename, not in place.

    Raises ValueError for a bad ``dtype``/``quantization`` argument and PipelineLoadError
    (naming only the folder's last path component) for any failure to load. A failed load
    keeps no reference to what was partially loaded: the error is raised outside the
    handler, so it carries no traceback of the loading frames.
    """
    dt = torch_dtype(dtype)
    if quantization != "none" and quantization not in _QUANT_BACKENDS:
        raise ValueError(f"quantization must be one of {['none', *_QUANT_BACKENDS]}, got {quantization!r}")
    path = Path(path)
    # Checked up front: a missing folder would otherwise be tried as a hub repo id (in the
    # local hub cache), which could load something other than what was registered.
    if not (path / "model_index.json").is_file():
        raise PipelineLoadError(path.name, "no model_index.json in the folder (missing, or not a diffusers pipeline)")

    from diffusers import DiffusionPipeline

    pipe = None
    failure: tuple[str, bool] | None = None
    try:
        pipe = DiffusionPipeline.from_pretrained(
            str(path),
            dtype=dt,  # diffusers 0.42 deprecates the torch_dtype spelling
            use_safetensors=True,
            local_files_only=True,
            trust_remote_code=False,
            disable_mmap=False,
            variant=variant,
            quantization_config=_quantization_config(path, quantization, dt),
        )
        if device != "cpu":
            move_pipeline(pipe, device)  # straight from the page cache: one copy
        _materialize(pipe)  # whatever stays on the host (all of it on a cpu replica)
    except Exception as exc:  # noqa: BLE001 - every load failure becomes a PipelineLoadError
        failure = (_redact(f"{type(exc).__name__}: {exc}", path), is_out_of_memory(exc))
    if failure is not None:
        # Outside the except block, so that the new error has no __context__ holding the
        # old traceback (whose frames hold the partially loaded modules).
        pipe = None
        empty_device_cache()
        raise PipelineLoadError(path.name, failure[0], out_of_memory=failure[1])
    return pipe


@dataclass(frozen=True)
class WarmUp:
    """What :func:`warm_up` did: the classes it imported (``library.Class``, sorted), the
    ones it could not (each with the first checkpoint that names it and why), and its
    wall time."""

    classes: tuple[str, ...]
    failures: tuple[str, ...]
    elapsed_s: float

    def as_dict(self) -> dict[str, Any]:
        return {"classes": len(self.classes), "failures": list(self.failures), "elapsed_ms": round(self.elapsed_s * 1e3, 1)}


def _pipeline_classes(path: Path) -> list[tuple[str, str]]:
    """(library, class name) of the pipeline in ``path`` and of each of its components, as
    its model_index.json names them; the pipeline's own library is ``diffusers``."""
    index = read_model_index(Path(path))
    out = [("diffusers", index["_class_name"])]
    for value in index.values():
        # Components are [library, class]; [null, null] marks an absent optional one.
        if isinstance(value, list) and len(value) == 2 and all(isinstance(v, str) for v in value):
            out.append((value[0], value[1]))
    return out


def _import_class(library: str, class_name: str) -> None:
    import importlib

    try:
        module = importlib.import_module(library)
    except ImportError:
        # diffusers names components of its own pipeline packages by the package alone
        # (e.g. ["stable_diffusion", "StableDiffusionSafetyChecker"]).
        module = importlib.import_module(f"diffusers.pipelines.{library}")
    getattr(module, class_name)  # the lazy modules of diffusers and transformers import here


def warm_up(paths: Iterable[Path]) -> WarmUp:
    """Import the pipeline and component classes that the checkpoint folders in ``paths``
    name, so that a replica's first load does not pay for them.

    diffusers and transformers import a model's code on first use of its class: on the
    bench machine that took about 2.1 of the 2.3 s of the first load of a demo checkpoint in
    a fresh process (a later load of it: about 70 ms). A replica calls this before it takes
    requests, so that cost moves from its first request to its start.

    Reads each folder's model_index.json only (no weights). Never raises for a checkpoint:
    an unreadable index or a class that does not import is recorded in ``failures`` (the
    request for that checkpoint will fail to load, with the reason, as it would have
    without this). Caveat: it does not warm what a first run costs beyond the imports
    (kernel selection, on CUDA the first use of cuBLAS/cuDNN).
    """
    t0 = time.perf_counter()
    seen: dict[tuple[str, str], str] = {}  # (library, class) -> the first folder naming it
    failures: list[str] = []
    for path in paths:
        try:
            for lib_cls in _pipeline_classes(path):
                seen.setdefault(lib_cls, Path(path).name)
        except (ValueError, KeyError, TypeError) as exc:  # read_model_index: an OSError is an EstimateError
            # _redact: reports are shown to clients (/v1/status), host paths are not.
            failures.append(f"{Path(path).name}: model_index.json: {_redact(f'{type(exc).__name__}: {exc}', Path(path))}")
    imported = []
    for (library, class_name), folder in sorted(seen.items()):
        try:
            _import_class(library, class_name)
            imported.append(f"{library}.{class_name}")
        except Exception as exc:  # noqa: BLE001 - recorded; the load of that checkpoint will say it again
            failures.append(f"{folder}: {library}.{class_name}: {type(exc).__name__}: {exc}")
    return WarmUp(tuple(imported), tuple(failures), time.perf_counter() - t0)


# ---- inspection and movement -----------------------------------------------------------------
def module_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's components that are ``torch.nn.Module`` s (denoiser, VAE, encoders)."""
    return {name: c for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def measure_bytes(pipe: Any, device: str | None = None) -> dict[str, int]:
    """Bytes of parameters + buffers + bitsandbytes quantization state per module
    component, each storage counted once.

    ``device`` (``"cpu"``/``"cuda"``, a device type) restricts the count to tensors there.
    A storage shared by two components is counted in the first one only. Caveats: counts
    whole storages (a view of a larger tensor counts the larger one), and misses other
    tensors that are neither parameters nor buffers (attributes a custom layer keeps).
    """
    seen: set[tuple[str, int]] = set()
    out: dict[str, int] = {}
    for name, module in module_components(pipe).items():
        total = 0
        for t in itertools.chain(_tensors(module), _quant_state_tensors(module)):
            if t.device.type == "meta" or (device is not None and t.device.type != device):
                continue
            storage = t.untyped_storage()
            key = (str(t.device), storage.data_ptr())
            if key not in seen:
                seen.add(key)
                total += storage.nbytes()
        out[name] = total
    return out


def move_pipeline(pipe: Any, device: str, *, pin_host_memory: bool = False) -> None:
    """Move every module component to ``device``.

    With ``device="cpu"`` and ``pin_host_memory=True``, parameters and buffers are then put
    in page-locked memory so that moving back to the GPU is faster; ignored without CUDA
    (pinning needs a CUDA context). Pinned memory cannot be swapped out: size the host
    budget accordingly.

    All or nothing: when a move fails (out of memory on the device, say), the components
    already moved, and the one that failed part way, go back where they were before the
    error propagates, so the pipeline stays whole where the cache books it.
    """
    moved: list[tuple[Any, torch.device]] = []
    try:
        for module in module_components(pipe).values():
            first = next(_tensors(module), None)
            if first is not None:
                moved.append((module, first.device))
            module.to(device)
            if device == "cpu" and pin_host_memory and torch.cuda.is_available():
                unpinned = [t for t in _tensors(module) if t.device.type == "cpu" and not t.is_pinned()]
                if unpinned:
                    _rehome(unpinned, lambda s: s.pin_memory())
    except BaseException:
        for module, home in reversed(moved):
            try:
                module.to(home)
            except Exception:  # noqa: BLE001 - the first error is the one to raise
                log.exception("moving %s back to %s after a failed move", type(module).__name__, home)
        raise


# ---- freeing ---------------------------------------------------------------------------------
def quiet_progress_bars() -> None:
    """Turn off diffusers' and transformers' tqdm bars in this process (replica logs)."""
    import diffusers.utils.logging as dlog
    import transformers.utils.logging as tlog

    dlog.disable_progress_bar()
    tlog.disable_progress_bar()


class LeakTracker:
    """Watches modules of freed pipelines, to count those that stay alive (leaks).

    Holds weak references only, so watching never keeps anything alive. Thread-safe.
    Caveat: a module is "leaked" only if it is still alive when :meth:`leaked` runs; track
    pipelines just before freeing them, not while they are in use.
    """

    def __init__(self) -> None:
        self._refs: list[weakref.ref] = []
        self._lock = threading.Lock()

    @staticmethod
    def refs_of(pipe: Any) -> list[weakref.ref]:
        """Weak references to every module (each component and all its submodules) of ``pipe``."""
        return [weakref.ref(m) for c in module_components(pipe).values() for m in c.modules()]

    def watch(self, refs: list[weakref.ref]) -> None:
        with self._lock:
            self._refs.extend(refs)

    def track(self, pipe: Any) -> None:
        """Watch every module of ``pipe`` from now on."""
        self.watch(self.refs_of(pipe))

    def leaked(self) -> int:
        """Forget modules that died and return how many watched modules are alive.

        gc runs only when some watched module is still alive (a cycle may hold it): reports
        call this every second, and a full collection costs ~100 ms in a torch process.
        """
        with self._lock:
            self._refs = [r for r in self._refs if r() is not None]
            if not self._refs:
                return 0
        gc.collect()
        with self._lock:
            self._refs = [r for r in self._refs if r() is not None]
            return len(self._refs)

    def tracked(self) -> int:
        """How many modules are being watched (not yet seen dead by :meth:`leaked`)."""
        with self._lock:
            return len(self._refs)


def free_pipeline(pipe: Any, tracker: LeakTracker | None) -> None:
    """Release ``pipe``'s modules: remove accelerate hooks, track, unlink components, gc.

    Afterwards ``pipe`` is an empty shell (its components are None) and the modules are
    gone unless something else still refers to them, which ``tracker`` then reports.
    """
    components = module_components(pipe)
    if hasattr(pipe, "remove_all_hooks"):
        pipe.remove_all_hooks()
    try:
        from accelerate.hooks import remove_hook_from_module
    except ImportError:  # accelerate absent: no hooks can have been added either
        remove_hook_from_module = None
    if remove_hook_from_module is not None:
        for module in components.values():
            remove_hook_from_module(module, recurse=True)
    # Watched only once the free is done: a report taken meanwhile (another thread) would
    # count modules that are merely on their way out as leaked.
    refs = LeakTracker.refs_of(pipe) if tracker is not None else []
    for name in list(pipe.components):
        setattr(pipe, name, None)
    del components
    empty_device_cache()
    if tracker is not None:
        tracker.watch(refs)


def empty_device_cache() -> None:
    """gc, then return the CUDA caching allocator's free blocks to the driver (if CUDA),
    and the C heap's free memory to the OS (glibc only)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    _trim_host_heap()


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's malloc_trim, or None where the C library is not glibc (resolved once)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_host_heap() -> None:
    """glibc keeps freed heap memory for reuse: a cpu replica that released its pipelines
    still held all of their RAM (review: 0.0 MB back after three releases; malloc_trim gave
    back 142.9 MB), while its report said 0 used. A no-op where the C library is not glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` means "out of device or host memory" (worth freeing and retrying)."""
    if isinstance(exc, PipelineLoadError):
        return exc.out_of_memory
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    # Some allocators report as plain RuntimeError (cuBLAS/cuDNN init, CPU allocator).
    return isinstance(exc, RuntimeError) and ("out of memory" in str(exc) or "can't allocate memory" in str(exc))


# ---- running ---------------------------------------------------------------------------------
def run_pipeline(
    pipe: Any,
    *,
    prompt: str,
    negative_prompt: str | None = None,
    width: int,
    height: int,
    num_inference_steps: int,
    guidance_scale: float,
    seed: int,
    num_images: int,
    device: str = "cpu",
) -> list[Any]:
    """Generate ``num_images`` PIL images for ``prompt``.

    The noise comes from a CPU ``torch.Generator`` seeded with ``seed``, so a seed gives the
    same starting noise on any replica or device (pixels may still differ slightly between
    CPU and GPU arithmetic). ``device`` is where the pipeline is expected to be; a mismatch
    raises RuntimeError, since running an offloaded pipeline would be a cache bug.
    """
    if pipe.device.type != torch.device(device).type:
        raise RuntimeError(f"run_pipeline: pipeline is on {pipe.device.type}, expected {device}")
    generator = torch.Generator(device="cpu").manual_seed(seed)
    pipe.set_progress_bar_config(disable=True)
    with torch.inference_mode():
        result = pipe(
            prompt=prompt,
            negative_prompt=negative_prompt,
            width=width,
            height=height,
            num_inference_steps=num_inference_steps,
            guidance_scale=guidance_scale,
            num_images_per_prompt=num_images,
            generator=generator,
            output_type="pil",
        )
    return list(result.images)


# ---- CUDA facts ------------------------------------------------------------------------------
def cuda_device_info() -> tuple[str, int] | None:
    """(name, total memory in bytes) of the current CUDA device, or None without CUDA."""
    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return props.name, int(props.total_memory)


def cuda_memory_bytes() -> dict[str, int] | None:
    """``{free, total, reserved, allocated}`` bytes of the current CUDA device; None without CUDA.

    ``free``/``total`` come from the driver (all processes); ``reserved``/``allocated`` are
    this process's caching allocator.
    """
    if not torch.cuda.is_available():
        return None
    free, total = torch.cuda.mem_get_info()
    return {
        "free": int(free),
        "total": int(total),
        "reserved": int(torch.cuda.memory_reserved()),
        "allocated": int(torch.cuda.memory_allocated()),
    }
