"""The three peer systems of bench/throughput.py, as small Ray Serve deployments.

They reuse the torch side of the real app (deployments/pipelines.py: load_pipeline,
run_pipeline, free_pipeline, measure_bytes) so that only the placement/caching policy
differs from system (a), the memrouter app:

(b) ``mux``: Ray Serve's own ``@serve.multiplexed(max_num_models_per_replica=K)``, requests
    sent with ``handle.options(multiplexed_model_id=name)`` so Ray's request router prefers a
    replica that holds the model. K = (budget - largest workspace) // largest weights: the
    largest count that cannot exceed the byte budget whatever K checkpoints are resident.
    Ray evicts (LRU) before loading and calls the model's ``__del__``, which frees it here.
(c) ``unload``: load from disk, run, free, for every request ("free GPU after each generation").
(d) ``offload``: after every request the pipeline goes to a host copy; the next request for it
    on that replica reloads it from there ("instant offload"); a checkpoint the replica never
    saw is loaded from disk. On CPU the device IS the host, so a move is modeled as what it
    costs on a GPU: a full copy of every weight into freshly allocated, materialized storage
    (``pipelines._rehome`` with ``clone``), the old storage freed. Host copies are unbounded
    (the seed strategy has no host budget); host bytes are reported.

Every replica runs one pipeline at a time (like ModelReplica) and records the same counters
and a (time, device bytes, host bytes, event) timeline. "Device bytes" = measured bytes of
the pipelines held on the device (measure_bytes after load) + the workspace estimate of the
request in flight, the same definition the memrouter cache reports.

A minimal FastAPI ingress per system gives all four the same path: HTTP -> ingress replica ->
DeploymentHandle -> model replica.
"""

import asyncio
import base64
import collections
import io
import threading
import time
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve
from ray.serve.handle import DeploymentHandle

TIMELINE_SAMPLES = 8192


def _encode_png(image: Any) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode("ascii")


class _Held:
    """A pipeline owned by a peer replica; ``__del__`` frees it (Ray's multiplexer calls it on eviction)."""

    def __init__(self, owner: "PeerReplica", name: str, pipe: Any, nbytes: int):
        self.owner, self.name, self.pipe, self.nbytes = owner, name, pipe, nbytes
        self._freed = False
        self._lock = threading.Lock()

    def free(self, counter: str) -> None:
        with self._lock:
            if self._freed:
                return
            self._freed = True
        from deployments import pipelines

        pipe, self.pipe = self.pipe, None
        pipelines.free_pipeline(pipe, self.owner.tracker)
        del pipe
        self.owner._on_freed(self.name, counter)

    def __del__(self) -> None:  # Ray calls it explicitly on LRU eviction; gc may call it again
        try:
            self.free("evictions")
        except Exception:  # noqa: BLE001 - never raise from a finalizer
            pass


class PeerReplica:
    """Shared bookkeeping; ``policy`` picks the behaviour ("mux", "unload" or "offload")."""

    policy = "base"

    def __init__(self, entries: list[dict[str, Any]], budget_bytes: int, max_models: int = 1):
        from deployments import pipelines
        from router.estimator import Estimator
        from router.registry import Registry

        pipelines.quiet_progress_bars()
        self.registry = Registry.from_entries(entries)
        # The same start-up warm-up as ModelReplica (replica.warm_up, on by default), so
        # that no system's first requests pay for the imports the others do not.
        pipelines.warm_up(spec.path for spec in self.registry)
        self.budget_bytes = int(budget_bytes)
        self.max_models = int(max_models)
        self.tracker = pipelines.LeakTracker()
        self._estimator = Estimator()
        self._slot = asyncio.Lock()
        self._after_tasks: set[asyncio.Future] = set()  # after-answer work in flight (kept referenced)
        self.after_answer_s, self.after_answers = 0.0, 0  # time the replica spent on it, and how often
        self._book = threading.Lock()
        self.device: dict[str, int] = {}  # name -> measured bytes held on the device
        self.host: dict[str, int] = {}  # name -> bytes of host copies (offload policy)
        self.workspace = 0
        self.counters = {"hits": 0, "disk_loads": 0, "host_reloads": 0, "evictions": 0, "offloads": 0,
                         "releases": 0, "oom": 0, "failures": 0}
        self.peak_device_bytes = 0
        self.peak_host_bytes = 0
        self.timeline: collections.deque = collections.deque(maxlen=TIMELINE_SAMPLES)
        try:
            self.replica_id = serve.get_replica_context().replica_id.unique_id
        except Exception:  # noqa: BLE001
            self.replica_id = "local"
        self._sample("start")

    # ---- bookkeeping -----------------------------------------------------------------------
    def _sample(self, event: str) -> None:
        with self._book:
            dev = sum(self.device.values()) + self.workspace
            host = sum(self.host.values())
            self.peak_device_bytes = max(self.peak_device_bytes, dev)
            self.peak_host_bytes = max(self.peak_host_bytes, host)
            self.timeline.append((time.time(), dev, host, event))

    def _count(self, key: str) -> None:
        with self._book:
            self.counters[key] += 1

    def _on_loaded(self, name: str, nbytes: int) -> None:
        with self._book:
            self.device[name] = nbytes
            self.counters["disk_loads"] += 1
        self._sample(f"load:{name}")

    def _on_freed(self, name: str, counter: str) -> None:
        with self._book:
            self.device.pop(name, None)
            self.counters[counter] += 1
        self._sample(f"{counter}:{name}")

    def _load(self, name: str) -> _Held:
        from deployments import pipelines

        spec = self.registry.get(name)
        pipe = pipelines.load_pipeline(spec.path, dtype=spec.dtype.value, device="cpu", variant=spec.variant)
        nbytes = sum(pipelines.measure_bytes(pipe, "cpu").values())
        held = _Held(self, name, pipe, nbytes)
        self._on_loaded(name, nbytes)
        return held

    def _workspace_for(self, body: dict[str, Any]) -> int:
        spec = self.registry.get(body["checkpoint"])
        return self._estimator.estimate(spec, dtype=spec.dtype.value, width=int(body["width"]),
                                        height=int(body["height"])).workspace_bytes

    def _run(self, held: _Held, body: dict[str, Any]) -> tuple[list[str], float]:
        from deployments import pipelines

        ws = self._workspace_for(body)
        with self._book:
            self.workspace = ws
        self._sample(f"run:{held.name}")
        t = time.perf_counter()
        try:
            images = pipelines.run_pipeline(
                held.pipe, prompt=body["prompt"], negative_prompt=None, width=int(body["width"]),
                height=int(body["height"]), num_inference_steps=int(body["num_inference_steps"]),
                guidance_scale=float(body["guidance_scale"]), seed=int(body["seed"]), num_images=1, device="cpu")
        finally:
            with self._book:
                self.workspace = 0
        inference_ms = (time.perf_counter() - t) * 1000
        self._sample(f"done:{held.name}")
        return [_encode_png(im) for im in images], inference_ms

    def _answer(self, body: dict[str, Any], images: list[str], served_from: str, load_ms: float, inference_ms: float,
                queue_ms: float) -> dict[str, Any]:
        return {"status": 200, "images": images, "checkpoint": body["checkpoint"], "replica": self.replica_id,
                "served_from": served_from,
                "timings_ms": {"queue": round(queue_ms, 3), "load": round(load_ms, 3), "inference": round(inference_ms, 3)}}

    async def generate(self, body: dict[str, Any]) -> dict[str, Any]:
        """One request, one pipeline at a time (like ModelReplica). A policy's work after the
        request (free, offload) runs after the answer is returned but still holds the slot: the
        next request waits for it, as it would for device memory on a GPU, while this
        request's latency does not include it."""
        sent = float(body.get("sent_at_s", time.time()))
        await self._slot.acquire()
        after = None
        try:
            queue_ms = (time.time() - sent) * 1000
            try:
                answer, after = await self._serve(body, queue_ms)
                return answer
            except Exception as exc:  # noqa: BLE001
                from deployments import pipelines

                self._count("oom" if pipelines.is_out_of_memory(exc) else "failures")
                return {"status": 500, "error": {"code": type(exc).__name__, "message": str(exc)[:300]}}
        finally:
            if after is None:
                self._slot.release()
            else:
                self._after_tasks.add(asyncio.ensure_future(self._finish_after(after)))

    async def _finish_after(self, after: Callable[[], None]) -> None:
        t = time.perf_counter()
        try:
            await asyncio.get_running_loop().run_in_executor(None, after)
            with self._book:
                self.after_answer_s += time.perf_counter() - t
                self.after_answers += 1
        except Exception:  # noqa: BLE001 - counted; the slot must come back
            self._count("failures")
        finally:
            self._slot.release()
            self._after_tasks.discard(asyncio.current_task())

    async def _serve(self, body: dict[str, Any], queue_ms: float) -> tuple[dict[str, Any], Callable[[], None] | None]:
        """(the answer, work to run after it with the slot held, or None)."""
        raise NotImplementedError

    async def report(self, timeline: bool = False) -> dict[str, Any]:
        with self._book:
            rep = {"replica_id": self.replica_id, "policy": self.policy, "budget_bytes": self.budget_bytes,
                   "max_models": self.max_models, "counters": dict(self.counters),
                   "device_used_bytes": sum(self.device.values()) + self.workspace,
                   "host_used_bytes": sum(self.host.values()), "peak_device_bytes": self.peak_device_bytes,
                   "peak_host_bytes": self.peak_host_bytes, "resident": sorted(self.device),
                   "after_answer_s": self.after_answer_s, "after_answers": self.after_answers}
            if timeline:
                rep["timeline"] = list(self.timeline)
        rep["leaked_modules"] = self.tracker.leaked()
        return rep


class MuxReplica(PeerReplica):
    """(b) Ray Serve model multiplexing: count-limited LRU, routed by multiplexed model id.

    ``max_num_models_per_replica`` must be fixed at class definition time, so the deployment
    class is made by :func:`mux_deployment_class` for a given K.
    """

    policy = "mux"

    async def _serve(self, body: dict[str, Any], queue_ms: float) -> tuple[dict[str, Any], None]:
        name = body["checkpoint"]
        model_id = serve.get_multiplexed_model_id()
        if model_id != name:
            return {"status": 400, "error": {"code": "model_id_mismatch", "message": f"{model_id!r} != {name!r}"}}, None
        before = self.counters["disk_loads"]
        t = time.perf_counter()
        held = await self.get_model(model_id)  # type: ignore[attr-defined] - added by mux_deployment_class
        load_ms = (time.perf_counter() - t) * 1000
        loaded = self.counters["disk_loads"] > before
        if not loaded:
            self._count("hits")
        images, inference_ms = await asyncio.get_running_loop().run_in_executor(None, self._run, held, body)
        return self._answer(body, images, "disk" if loaded else "device", load_ms, inference_ms, queue_ms), None


def mux_deployment_class(max_models: int) -> type:
    class MuxReplicaK(MuxReplica):
        @serve.multiplexed(max_num_models_per_replica=max_models)
        async def get_model(self, model_id: str) -> _Held:
            return await asyncio.get_running_loop().run_in_executor(None, self._load, model_id)

    MuxReplicaK.__name__ = MuxReplicaK.__qualname__ = f"MuxReplicaK{max_models}"
    return MuxReplicaK


class UnloadReplica(PeerReplica):
    """(c) Load from disk, run, free: every request."""

    policy = "unload"

    def _serve_sync(self, body: dict[str, Any], queue_ms: float) -> tuple[dict[str, Any], Callable[[], None]]:
        t = time.perf_counter()
        held = self._load(body["checkpoint"])
        load_ms = (time.perf_counter() - t) * 1000
        try:
            images, inference_ms = self._run(held, body)
        except BaseException:
            held.free("releases")
            raise
        # Freed after the answer, before the next request (it holds the slot).
        return self._answer(body, images, "disk", load_ms, inference_ms, queue_ms), lambda: held.free("releases")

    async def _serve(self, body: dict[str, Any], queue_ms: float) -> tuple[dict[str, Any], Callable[[], None]]:
        return await asyncio.get_running_loop().run_in_executor(None, self._serve_sync, body, queue_ms)


class OffloadReplica(PeerReplica):
    """(d) Offload to host after every request; reload from the host copy on the next one."""

    policy = "offload"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self._host_copies: dict[str, _Held] = {}

    @staticmethod
    def _move(held: _Held) -> None:
        """A device<->host move, modeled on CPU as a full copy into fresh storage (old one freed)."""
        from deployments import pipelines

        for module in pipelines.module_components(held.pipe).values():
            pipelines._rehome(list(pipelines._tensors(module)), lambda s: s.clone())

    def _serve_sync(self, body: dict[str, Any], queue_ms: float) -> dict[str, Any]:
        name = body["checkpoint"]
        t = time.perf_counter()
        held = self._host_copies.pop(name, None)
        if held is None:
            held = self._load(name)
            served_from = "disk"
        else:
            self._move(held)  # host -> device
            with self._book:
                self.host.pop(name, None)
                self.device[name] = held.nbytes
                self.counters["host_reloads"] += 1
            self._sample(f"reload:{name}")
            served_from = "host"
        load_ms = (time.perf_counter() - t) * 1000
        try:
            images, inference_ms = self._run(held, body)
        except BaseException:
            self._offload(name, held)
            raise
        # Offloaded "instantly" after the request: after the answer, before the next request.
        return self._answer(body, images, served_from, load_ms, inference_ms, queue_ms), lambda: self._offload(name, held)

    def _offload(self, name: str, held: _Held) -> None:
        self._move(held)  # device -> host
        with self._book:
            self.device.pop(name, None)
            self.host[name] = held.nbytes
            self.counters["offloads"] += 1
        self._host_copies[name] = held
        self._sample(f"offload:{name}")

    async def _serve(self, body: dict[str, Any], queue_ms: float) -> tuple[dict[str, Any], Callable[[], None]]:
        return await asyncio.get_running_loop().run_in_executor(None, self._serve_sync, body, queue_ms)


# ---- ingress -----------------------------------------------------------------------------------
peer_api = FastAPI(title="memrouter-bench-peer")

_REQUIRED = ("checkpoint", "prompt", "seed", "width", "height", "num_inference_steps", "guidance_scale")


@serve.ingress(peer_api)
class PeerIngress:
    """POST /v1/generate with the trace's body; ``multiplexed`` sets Ray's model id (system b)."""

    def __init__(self, replicas: DeploymentHandle, multiplexed: bool, request_timeout_s: float = 600.0):
        self._replicas = replicas
        self._multiplexed = multiplexed
        self._timeout = request_timeout_s

    @peer_api.post("/v1/generate")
    async def http_generate(self, request: Request) -> JSONResponse:
        received = time.time()
        body = await request.json()
        if not isinstance(body, dict) or any(k not in body for k in _REQUIRED):
            return JSONResponse({"error": {"code": "invalid_request", "message": f"needs {_REQUIRED}"}}, status_code=422)
        handle = self._replicas
        if self._multiplexed:
            handle = handle.options(multiplexed_model_id=str(body["checkpoint"]))
        try:
            result = await asyncio.wait_for(handle.generate.remote(body | {"sent_at_s": time.time()}), timeout=self._timeout)
        except asyncio.TimeoutError:
            return JSONResponse({"error": {"code": "timeout", "message": "timeout"}}, status_code=504)
        except Exception as exc:  # noqa: BLE001 - backpressure, replica died, ...
            return JSONResponse({"error": {"code": type(exc).__name__, "message": str(exc)[:300]}}, status_code=503)
        status = result.pop("status", 500)
        if status != 200:
            return JSONResponse({"error": result.get("error")}, status_code=status)
        result["timings_ms"]["total"] = round((time.time() - received) * 1000, 3)
        return JSONResponse(result)

    @peer_api.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}


PEER_CLASSES = {"unload": UnloadReplica, "offload": OffloadReplica}


def build_peer_app(policy: str, entries: list[dict[str, Any]], budget_bytes: int, *, max_models: int = 1,
                   num_replicas: int = 2, num_cpus: float = 0.5, max_ongoing_requests: int = 8,
                   max_queued_requests: int = -1, ingress_num_cpus: float = 0.25,
                   ingress_max_ongoing_requests: int = 256, request_timeout_s: float = 600.0) -> Any:
    """The peer application: PeerIngress bound to a replica deployment of ``policy``."""
    cls = mux_deployment_class(max_models) if policy == "mux" else PEER_CLASSES[policy]
    replica = serve.deployment(cls, name=f"Peer-{policy}").options(
        num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
        max_queued_requests=max_queued_requests, ray_actor_options={"num_cpus": num_cpus})
    ingress = serve.deployment(PeerIngress, name=f"PeerIngress-{policy}").options(
        num_replicas=1, max_ongoing_requests=ingress_max_ongoing_requests, max_queued_requests=-1,
        ray_actor_options={"num_cpus": ingress_num_cpus})
    return ingress.bind(replica.bind(entries, budget_bytes, max_models), policy == "mux", request_timeout_s)
