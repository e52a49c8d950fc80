"""ModelReplica: one per GPU. Owns a PipelineCache sized by the hardware profile.

Runs one pipeline at a time (acquire -> run -> release under a semaphore): a GPU gains
little from concurrent diffusion runs and the budget stays predictable; queued requests
wait here (bounded by ``max_ongoing_requests``) and show up as queue length to the router.

Errors are returned, not raised, as ``{"error": {"code", "message"}, "status": N}`` so that
the ingress maps them to HTTP statuses without depending on how Ray wraps exceptions.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import io
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve

from deployments import pipelines
from deployments.backend import TorchBackend
from deployments.cache import CacheConfig, CacheReport, PipelineCache, Shortfall
from deployments.config import AppConfig
from deployments.faults import Fault, FaultInjector
from deployments.metrics import ReplicaMetrics
from deployments.service_times import ServiceTimes
from router import profiles
from router.api import ResolvedRequest
from router.estimator import EstimateError, Estimator
from router.registry import UnknownCheckpointError

log = logging.getLogger("memrouter.replica")

TIMELINE_SAMPLES = 4096


def available_ram_bytes() -> int:
    """MemAvailable from /proc/meminfo, else total physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def error(status: int, code: str, message: str, **extra: Any) -> dict[str, Any]:
    return {"status": status, "error": {"code": code, "message": message}, **extra}


def encode_png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


_FAILED_LOAD_MEMORY_S = 60.0  # how long a failed load (not out of memory) is answered without trying again


class ModelReplica:
    """The GPU-side deployment. ``config`` is the app's args (validated as AppConfig)."""

    def __init__(self, config: dict[str, Any]):
        cfg = AppConfig.model_validate(config)
        self._settings = cfg.replica
        pipelines.quiet_progress_bars()
        self._registry = cfg.load_registry()
        cuda = pipelines.cuda_device_info()
        self.profile = profiles.resolve(
            cfg.replica.profile, cuda_device=cuda, available_ram_bytes=available_ram_bytes(),
            cpu_budget_bytes=cfg.replica.cpu_budget_bytes, overrides=cfg.replica.profile_overrides,
            gpu_fraction=min(1.0, cfg.replica.num_gpus) if cfg.replica.num_gpus > 0 else 1.0,
        )
        self.device = "cuda" if cuda is not None and self.profile.is_cuda else "cpu"
        # The fault-injection test seam exists only when the config asks for it (off by default).
        self._faults = FaultInjector() if cfg.replica.fault_injection else None
        backend_cls = TorchBackend if self._faults is None else _FaultyBackend
        self._backend = backend_cls(self._registry, default_dtype=self.profile.default_dtype, device=self.device)
        if self._faults is not None:
            self._backend.faults = self._faults
        self.cache = PipelineCache(
            CacheConfig(
                device_budget_bytes=self.profile.device_budget_bytes,
                host_budget_bytes=self.profile.host_budget_bytes,
                idle_offload_s=self.profile.idle_offload_s,
                idle_release_s=self.profile.idle_release_s,
                max_resident=self.profile.max_resident_pipelines,
                host_tier=self.device == "cuda",
            ),
            self._backend,
        )
        self._estimator = Estimator()
        # checkpoint -> (its folder's signature, the message, when) of a load that failed for a
        # reason other than memory: refused again without evicting anything while the folder
        # is unchanged, for up to _FAILED_LOAD_MEMORY_S (the estimate fits, so each retry
        # evicted the warm set for a load that would fail; the bound lets a transient cause,
        # a network filesystem's error, be retried).
        self._failed_loads: dict[str, tuple[tuple, str, float]] = {}
        # Before the first request: Serve routes to a replica only once its constructor returns.
        self._warm_up = pipelines.warm_up(spec.path for spec in self._registry) if cfg.replica.warm_up else None
        if self._warm_up is not None and self._warm_up.failures:
            log.warning("warm-up could not import: %s", "; ".join(self._warm_up.failures))
        # report_seq: advances only when the report changes in more than what time alone
        # moves (_routing_fingerprint; that covers everything the request router reads). Ray hands the router a new copy of every replica's
        # stats on each broadcast, and an unchanged replica reports every period; by this the
        # router keeps a view (and its scores) until the replica really changed. It starts
        # at a random number, so that a restarted process does not repeat the seqs of the
        # one before it.
        self._report_seq = random.getrandbits(48)
        self._report_fingerprint: str | None = None
        self._report_lock = threading.Lock()
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # constructed outside Serve (component tests)
            self.replica_id = f"local-{os.getpid()}"
        self._run_slot = threading.Semaphore(1)
        self._cancelled = 0  # requests skipped because their caller had given up (see generate)
        self._timeline: collections.deque = collections.deque(maxlen=TIMELINE_SAMPLES)
        # The largest device_used_bytes of any timeline sample or report since start: the
        # timeline is a ring, and a long run would drop the samples that held the peak.
        self._peak_device_used_bytes = 0
        self._metrics = ReplicaMetrics()
        self._service_times = ServiceTimes()
        self._stop = threading.Event()
        self._monitor = threading.Thread(target=self._idle_loop, name="memrouter-idle", daemon=True)
        self._monitor.start()
        self._sample("start")
        log.info("replica %s: profile %s, device %s, budget %d bytes, warm-up %s", self.replica_id,
                 self.profile.name, self.device, self.profile.device_budget_bytes,
                 self._warm_up.as_dict() if self._warm_up is not None else "off")

    # ---- background --------------------------------------------------------------------------
    def _idle_loop(self) -> None:
        while not self._stop.wait(self._settings.idle_check_period_s):
            try:
                if self.cache.tick():
                    self._sample("idle")
            except Exception:  # keep the monitor alive; the next round retries
                log.exception("idle monitor round failed")

    def _sample(self, event: str) -> CacheReport:
        rep = self.cache.report()
        self._timeline.append((time.time(), rep.device_used_bytes, rep.host_used_bytes, event))
        self._peak_device_used_bytes = max(self._peak_device_used_bytes, rep.device_used_bytes)
        return rep

    # ---- requests ----------------------------------------------------------------------------
    async def generate(self, request: dict[str, Any], need: Any = None) -> dict[str, Any]:
        """Run one resolved request (``ResolvedRequest`` fields + ``sent_at_s``).

        ``need`` is the placement need the request router read; the replica re-estimates
        at its own dtype (it is the authority on what it holds).

        Cancellation (the caller timed out or went away; Serve cancels this coroutine): the
        worker thread cannot be stopped, but it checks before it loads and before it runs
        the pipeline, so a request given up on while it queued for the run slot costs
        neither. Caveat: a pipeline already running finishes.
        """
        cancelled = threading.Event()
        try:
            return await asyncio.get_running_loop().run_in_executor(None, self._generate_sync, request, cancelled)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    def _skip_cancelled(self, cancelled: threading.Event | None, checkpoint: str, where: str) -> dict[str, Any] | None:
        if cancelled is None or not cancelled.is_set():
            return None
        with self._report_lock:
            self._cancelled += 1
        log.info("skipped %s %s: its caller had given up", where, checkpoint)
        return error(499, "cancelled", f"the request for {checkpoint!r} was cancelled before {where}")

    def _remembered_failure(self, checkpoint: str, path: Path) -> dict[str, Any] | None:
        """The 500 of a load of ``checkpoint`` that failed (not out of memory) under
        _FAILED_LOAD_MEMORY_S ago, while its folder is unchanged; None: try it."""
        failed = self._failed_loads.get(checkpoint)
        if failed is None:
            return None
        if time.monotonic() - failed[2] < _FAILED_LOAD_MEMORY_S and pipelines.folder_signature(path) == failed[0]:
            return error(500, "checkpoint_load_failed", f"{failed[1]} (its files are unchanged since that load "
                         f"failed, under {_FAILED_LOAD_MEMORY_S:.0f} s ago: fix them to retry now)")
        self._failed_loads.pop(checkpoint, None)  # changed, or long ago: try again
        return None

    def _generate_sync(self, request: dict[str, Any], cancelled: threading.Event | None = None) -> dict[str, Any]:
        sent_at_s = float(request.get("sent_at_s", time.time()))
        req = ResolvedRequest.model_validate({k: v for k, v in request.items() if k != "sent_at_s"})
        try:
            spec = self._registry.get(req.checkpoint)
            dtype = self._backend.dtype_for(req.checkpoint)
            est = self._estimator.estimate(spec, dtype=dtype, width=req.width, height=req.height, batch=req.num_images)
        except UnknownCheckpointError as exc:
            return error(404, "unknown_checkpoint", str(exc))
        except EstimateError as exc:
            return error(500, "checkpoint_unreadable", str(exc))
        refused = self._remembered_failure(req.checkpoint, spec.path)
        if refused is not None:
            return refused
        with self._run_slot:
            started_s = time.time()
            # Again in the slot: requests that queued behind the load that failed would each
            # evict for it and fail the same way.
            refused = self._remembered_failure(req.checkpoint, spec.path)
            if refused is not None:
                return refused
            for attempt in (1, 2):
                try:
                    return self._run_once(req, est, queue_ms=(started_s - sent_at_s) * 1000, cancelled=cancelled)
                except Exception as exc:  # noqa: BLE001 - classified below
                    if not pipelines.is_out_of_memory(exc):
                        if isinstance(exc, pipelines.PipelineLoadError):
                            # Named by its registry name; the reason names only the folder's
                            # last component, never the host path.
                            message = f"checkpoint {req.checkpoint!r} could not be loaded: {exc.reason}"
                            self._failed_loads[req.checkpoint] = (pipelines.folder_signature(spec.path), message,
                                                                  time.monotonic())
                            return error(500, "checkpoint_load_failed", message)
                        log.exception("generate failed for %s", req.checkpoint)
                        return error(500, "inference_failed", f"{type(exc).__name__} while running {req.checkpoint!r}")
                    log.warning("out of memory serving %s (attempt %d): %s", req.checkpoint, attempt, type(exc).__name__)
                if attempt == 2:
                    self._sample("oom")
                    break  # no retry follows: nothing to free for
                # Only an out-of-memory error gets here (every other outcome returned above).
                # Recover outside the handler: the exception's traceback holds the failed
                # frames (and on CUDA their intermediate tensors) until the block ends.
                # Move every other idle entry off the device (released on CPU hosts) and
                # return the allocator's free blocks, then retry once. This request's own
                # entry stays if resident: reloading it would not make room.
                self.cache.record_oom_recovery()
                self._free_for_retry(req.checkpoint)
                self._sample("oom")
            return error(503, "out_of_memory", f"out of device memory for {req.checkpoint!r} after freeing idle "
                         "pipelines and retrying once; retry later", retry_after_s=5)

    def _free_for_retry(self, keep: str) -> list[str]:
        """Offload (or, without a host tier, release) every idle entry but ``keep``; empty the allocator cache."""
        moved = []
        for entry in self.cache.report().entries:
            if entry.name != keep and not entry.in_use and entry.tier == "device":
                moved += [name for name, _ in self.cache.offload(entry.name)]
        pipelines.empty_device_cache()
        return moved

    def _inject(self, site: str, checkpoint: str) -> None:
        """The fault-injection seam (no-op unless ``replica.fault_injection``); see deployments/faults.py."""
        if self._faults is not None:
            _apply_fault(self._faults, site, checkpoint)

    def _run_once(self, req: ResolvedRequest, est: Any, *, queue_ms: float,
                  cancelled: threading.Event | None = None) -> dict[str, Any]:
        skipped = self._skip_cancelled(cancelled, req.checkpoint, "it started")
        if skipped is not None:
            return skipped
        t0 = time.perf_counter()
        lease = self.cache.acquire(req.checkpoint, weights_bytes=est.weights_bytes, workspace_bytes=est.workspace_bytes,
                                   offloadable=self._backend.offloadable(req.checkpoint))
        if isinstance(lease, Shortfall):
            self._sample("shortfall")
            status = 413 if lease.permanent else 503
            code = "exceeds_replica_budget" if lease.permanent else "replica_busy"
            # A 413 says what it measured (its footprint less this request's workspace): the
            # router plans with it from now on and asks a replica with room (router/measured_sizes.py).
            measured = {"measured_weights_bytes": lease.need_bytes - est.workspace_bytes,
                        "estimate_weights_bytes": est.weights_bytes} if lease.permanent else {}
            return error(status, code, lease.message(), need_bytes=lease.need_bytes, budget_bytes=lease.budget_bytes,
                         retry_after_s=None if lease.permanent else 1, **measured)
        load_ms = (time.perf_counter() - t0) * 1000
        if lease.served_from.value != "device":
            self._metrics.load_seconds(load_ms / 1000, lease.served_from.value)
            self._service_times.load(lease.served_from.value, est.weights_bytes, lease.load_s)
        self._sample(f"acquire:{req.checkpoint}")
        with lease:
            skipped = self._skip_cancelled(cancelled, req.checkpoint, "its inference")
            if skipped is not None:
                return skipped  # the pipeline stays cached: the load was not wasted
            t1 = time.perf_counter()
            self._inject("inference", req.checkpoint)
            images = pipelines.run_pipeline(
                lease.obj.pipe, prompt=req.prompt, negative_prompt=req.negative_prompt, width=req.width,
                height=req.height, num_inference_steps=req.num_inference_steps, guidance_scale=req.guidance_scale,
                seed=req.seed, num_images=req.num_images, device=self.device,
            )
            inference_ms = (time.perf_counter() - t1) * 1000
            self._service_times.inference(inference_ms / 1000)
        self._sample(f"release:{req.checkpoint}")
        return {
            "status": 200,
            "images": [encode_png(im) for im in images],
            "checkpoint": req.checkpoint,
            "replica": self.replica_id,
            "served_from": lease.served_from.value,
            "timings_ms": {"queue": round(queue_ms, 3), "load": round(load_ms, 3), "inference": round(inference_ms, 3)},
            "estimate_bytes": est.total_bytes,
            "seed": req.seed,
        }

    # ---- reports and admin -------------------------------------------------------------------
    def memory_report(self) -> dict[str, Any]:
        """The replica report (JSON-serializable); see DESIGN.md."""
        rep = self.cache.report()
        cuda = pipelines.cuda_memory_bytes()
        self._peak_device_used_bytes = max(self._peak_device_used_bytes, rep.device_used_bytes)
        report = {
            "replica_id": self.replica_id,
            "profile": self.profile.name,
            "device": self.device,
            "default_dtype": self.profile.default_dtype,
            "max_resident": self.profile.max_resident_pipelines,
            "device_total_bytes": self.profile.total_bytes,
            "device_budget_bytes": rep.device_budget_bytes,
            "device_used_bytes": rep.device_used_bytes,
            "device_free_bytes": rep.device_free_bytes,
            "peak_device_used_bytes": self._peak_device_used_bytes,
            "workspace_in_flight_bytes": rep.workspace_in_flight_bytes,
            "host_budget_bytes": rep.host_budget_bytes,
            "host_used_bytes": rep.host_used_bytes,
            "entries": [
                {"name": e.name, "tier": e.tier, "bytes": e.bytes, "estimate_bytes": e.estimate_bytes,
                 "idle_s": e.idle_s, "in_use": e.in_use, "loading": e.loading}
                for e in rep.entries
            ],
            "in_flight": rep.in_flight,
            "counters": rep.counters,
            "requests_cancelled": self._cancelled,
            "service_times": self._service_times.report().as_dict(),
            "leaked_modules": rep.leaked_modules,
            "warm_up": self._warm_up.as_dict() if self._warm_up is not None else None,
            "cuda": cuda,
            "timestamp_s": time.time(),
        }
        fingerprint = _routing_fingerprint(report)
        with self._report_lock:  # Serve's stats call and admin report() may overlap
            if fingerprint != self._report_fingerprint:
                self._report_seq += 1
                self._report_fingerprint = fingerprint
            report["report_seq"] = self._report_seq
        return report

    def record_routing_stats(self) -> dict[str, Any]:
        """Called by Serve every ``request_routing_stats_period_s``; feeds the request router."""
        report = self.memory_report()
        self._metrics.observe(report)
        return report

    async def report(self, timeline: bool = False, _target_replica: str | None = None) -> dict[str, Any]:
        rep = self.memory_report()
        if timeline:
            rep["timeline"] = list(self._timeline)
        return rep

    async def offload(self, checkpoint: str | None = None, _target_replica: str | None = None) -> dict[str, Any]:
        # In a worker thread: the cache waits behind a load in progress (its I/O lock), and on
        # this event loop that wait would stop reports, report() and new requests for as long.
        moves = await asyncio.to_thread(self.cache.offload, checkpoint)
        self._sample("admin-offload")
        # What each move did: released when the host tier had no room (or there is none).
        return {"replica": self.replica_id, "offloaded": [n for n, a in moves if a == "offload"],
                "released": [n for n, a in moves if a == "release"]}

    async def release(self, checkpoint: str | None = None, _target_replica: str | None = None) -> dict[str, Any]:
        names = await asyncio.to_thread(self.cache.release, checkpoint)  # as offload: off this loop
        self._sample("admin-release")
        return {"replica": self.replica_id, "released": names}

    async def inject_faults(self, faults: list[dict[str, Any]] | None = None, clear: bool = False,
                            _target_replica: str | None = None) -> dict[str, Any]:
        """TEST SEAM: arm faults (see deployments/faults.py) and return the injector's state.

        Refused (status 403) unless the app's args set ``replica.fault_injection: true``.
        Reachable only through a DeploymentHandle, never over HTTP.
        """
        if self._faults is None:
            return error(403, "fault_injection_disabled", "fault injection is off (replica.fault_injection: false)")
        if clear:
            self._faults.clear()
        try:
            for raw in faults or ():
                self._faults.arm(Fault.from_dict(raw))
        except (TypeError, ValueError) as exc:
            return error(422, "invalid_fault", str(exc))
        return {"status": 200, "replica": self.replica_id, **self._faults.state()}

    def shutdown(self) -> None:
        """Stop the idle monitor and free every pipeline (outside Serve; Serve calls __del__)."""
        self._stop.set()
        self._monitor.join(timeout=5)
        self.cache.release()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)  # absent when the constructor failed early
        if stop is not None:
            stop.set()


# ---- fault-injection seam (tests only; see deployments/faults.py) ---------------------------
def _apply_fault(faults: FaultInjector, site: str, checkpoint: str) -> None:
    """Apply the next armed fault for (site, checkpoint): sleep, or raise torch.OutOfMemoryError."""
    fault = faults.take(site, checkpoint)
    if fault is None:
        return
    token = faults.begin(fault, checkpoint)
    try:
        if fault.kind == "delay":
            time.sleep(fault.delay_s)
        else:
            import torch

            raise torch.OutOfMemoryError(f"injected out-of-memory error at {site} of {checkpoint!r} (test seam)")
    finally:
        faults.end(token)


class _FaultyBackend(TorchBackend):
    """TorchBackend with the ``"load"`` injection site; used only with ``replica.fault_injection``.

    An injected out-of-memory error is raised after a real load, once the loaded pipeline
    has been freed through the leak tracker, so a reference kept by the failure path would
    show up as leaked modules in the report.
    """

    faults: FaultInjector

    def load(self, name: str) -> Any:
        fault = self.faults.take("load", name)
        if fault is None:
            return super().load(name)
        token = self.faults.begin(fault, name)
        try:
            if fault.kind == "delay":
                time.sleep(fault.delay_s)
                return super().load(name)
            obj = super().load(name)
            self.free(obj)
            del obj
            import torch

            raise torch.OutOfMemoryError(f"injected out-of-memory error at load of {name!r} (test seam)")
        finally:
            self.faults.end(token)


# Report fields that change without the replica's state changing: the report's own time and
# the driver's view of device memory (other processes move it). Entries' idle_s also grows
# with time alone; the router reads it as a last-use time (timestamp_s - idle_s), which
# does not.
_UNROUTED_FIELDS = frozenset({"timestamp_s", "cuda", "report_seq", "requests_cancelled", "peak_device_used_bytes"})


def _routing_fingerprint(report: dict[str, Any]) -> str:
    """The report as the request router sees it, less what moves with time alone: equal
    fingerprints give views that rank alike (router.placement.ReplicaView.reported_at_s)."""
    fields = sorted((k, v) for k, v in report.items() if k not in _UNROUTED_FIELDS and k != "entries")
    entries = [sorted((k, v) for k, v in e.items() if k != "idle_s") for e in report["entries"]]
    return repr((fields, entries))
