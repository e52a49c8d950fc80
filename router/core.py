"""The Router's request path, without a transport: validate -> resolve the name in the
registry -> estimate -> admission -> the ModelReplica deployment's handle, whose memory-aware
RequestRouter (router/request_router.py) picks the replica.

Two shells run it: the ingress deployment (router/ingress.py: HTTP and its own handle
method) and :class:`deployments.client.LocalRouter`, in the caller's process. Failures raise
:class:`ServiceError` carrying the HTTP status the same failure gets over HTTP.
"""

import asyncio
import dataclasses
import logging
import secrets
import time
import uuid
from typing import Any

from ray.exceptions import RayActorError, RayTaskError
from ray.serve import context as serve_context
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle

from router.api import GenerateRequest, GenerateResponse, RequestLimitError, check_image_size, resolve_request
from router.estimator import TARGET_DTYPE_BYTES, EstimateError, Estimator
from router.measured_sizes import MeasuredSizes
from router.placement import Need
from router.registry import CheckpointSpec, Dtype, Registry, UnknownCheckpointError
from router.request_router import ReportBoard
from router.settings import IngressSettings

log = logging.getLogger("memrouter.router")

REPLICA_DEPLOYMENT = "ModelReplica"  # the replica deployment's name in the app (deployments/app.py)
# Timeouts: asyncio's wait_for raises asyncio.TimeoutError, the built-in only from Python
# 3.11 on; on 3.10 it was neither caught (a 500, the replica call not cancelled) nor mapped.
_TIMEOUTS = (TimeoutError, asyncio.TimeoutError)
# What a replica call can fail with, besides an error answer (see RouterCore._failure).
_CALL_ERRORS = (*_TIMEOUTS, BackPressureError, RayTaskError, RayActorError, DeploymentUnavailableError)


class ServiceError(Exception):
    """An error answer: ``status`` is the HTTP status the same failure gets over HTTP."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None):
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s
        super().__init__(f"{status} {code}: {message}")

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (ServiceError, (self.status, self.code, self.message, self.retry_after_s))


def remote_as_own_request(method: Any, *args: Any, **kwargs: Any) -> Any:
    """``method.remote(*args, **kwargs)`` under a Serve request id of its own.

    Ray Serve gives every call made while serving one request that request's
    ``internal_request_id``, and its request router keeps waiting calls by that id: two
    concurrent calls of one caller's request (a deployment fanning out several generations
    through this app's handle) can swap replicas, one sent where the other's checkpoint was
    placed, and Ray names only the id when a call finishes (read in the installed Ray 2.60:
    RequestRouter._add_pending_request_to_indices keeps the first call per id). A fresh id
    makes each call its own, in Ray's routing and in this router's ledger.

    Caveats: it sets Serve's private request context (ray.serve.context, 2.60) for the
    duration of the ``remote()`` call, which reads it (where that context is not as in 2.60,
    the call goes out unchanged, sharing the parent's id). Ray tracks a parent's children by
    the parent's id to cancel them with it; RouterCore does not rely on that and cancels the
    call itself, on its own cancellation and on its timeout (tests/test_reliability.py: an
    HTTP client that goes away, and a timeout, each cancel the replica call).
    """
    var = getattr(serve_context, "_serve_request_context", None)
    current = var.get() if var is not None else None
    if current is None or not dataclasses.is_dataclass(current) or not hasattr(current, "_internal_request_id"):
        # Outside a request (a driver: Ray makes a fresh id per call anyway), or a Serve
        # whose private context differs from 2.60's: the call goes out as Ray would send it.
        return method.remote(*args, **kwargs)
    token = var.set(dataclasses.replace(current, _internal_request_id=uuid.uuid4().hex))
    try:
        return method.remote(*args, **kwargs)
    finally:
        var.reset(token)


def admission_problem(need: Need, reports: dict[str, dict[str, Any]]) -> str | None:
    """Why ``need`` fits no replica's device budget at that replica's dtype, or None if one fits.

    No reports (startup): None; the replica's cache still refuses what cannot fit there.
    """
    if not reports:
        return None
    largest_budget, estimate = 0, 0
    for r in reports.values():
        weights, workspace = need.at(r["default_dtype"])
        if weights + workspace <= r["device_budget_bytes"]:
            return None
        if r["device_budget_bytes"] >= largest_budget:
            largest_budget, estimate = r["device_budget_bytes"], weights + workspace
    return (f"checkpoint {need.checkpoint!r} needs an estimated {estimate} bytes (weights + workspace for this "
            f"request shape) but the largest replica budget is {largest_budget} bytes")


def _cancel_on_our_timeout(exc: TimeoutError, response: Any) -> None:
    """Cancel ``response`` (a DeploymentResponse) when ``exc`` is our own wait's timeout:
    giving up on a response does not cancel it (Serve's __await__ and result()), and the
    replica would load and run for an answer nobody reads. Not for a TimeoutError the replica
    raised itself (Ray makes a replica's exception an instance of its cause's class too):
    that call has answered."""
    if not isinstance(exc, RayTaskError):
        response.cancel()


class RouterCore:
    """One Router: its registry, settings, estimator and the replica deployment's handle.

    Not a deployment: the ingress holds one per ingress replica, LocalRouter one per
    caller. Admission reads the replica reports that reach this process's request router
    (router.request_router.ReportBoard), so it judges only after the first call through
    ``replicas`` has built that router (:meth:`ensure_reports` primes it).
    """

    def __init__(self, replicas: DeploymentHandle, registry: Registry, settings: IngressSettings):
        self.settings = settings
        self.registry = registry
        self.estimator = Estimator()
        # What replicas measured above the estimate (their 413s): later needs are raised to it.
        self.measured = MeasuredSizes()
        self.replicas = replicas
        # The request router for this handle publishes under the same key (request_router.py).
        self._board_key = (replicas.app_name, replicas.deployment_name)

    def reports(self) -> dict[str, dict[str, Any]]:
        """The replicas' latest reports as this process's request router has them (by replica id)."""
        return ReportBoard.reports(self._board_key)

    def need(self, spec: CheckpointSpec, width: int, height: int, batch: int) -> tuple[Need, str]:
        """Estimates at each dtype a replica might use (its profile default when auto), and
        the checkpoint's family (resolved from its files when the registry says auto)."""
        dtypes = list(TARGET_DTYPE_BYTES) if spec.dtype is Dtype.AUTO else [spec.dtype.value]
        weights, workspace = {}, {}
        for d in dtypes:
            est = self.estimator.estimate(spec, dtype=d, width=width, height=height, batch=batch)
            weights[d], workspace[d] = est.weights_bytes, est.workspace_bytes
        if spec.dtype is not Dtype.AUTO:  # every replica serves it at the spec's dtype
            weights = dict.fromkeys(TARGET_DTYPE_BYTES, weights[dtypes[0]])
            workspace = dict.fromkeys(TARGET_DTYPE_BYTES, workspace[dtypes[0]])
        return self.measured.adjust(Need(spec.name, weights, workspace)), est.family

    async def admit(self, need: Need) -> None:
        """Refuse, before any load, a request that fits no replica's budget (413 with numbers).

        Before the first reports reach this process, prime the request router (a cheap report
        call) so that the first requests are judged too; if none come, the replica's cache
        still refuses what cannot fit with the same numbers.
        """
        if not self.reports():
            await self.ensure_reports()
        self._judge(need)

    def admit_sync(self, need: Need) -> None:
        """:meth:`admit` for synchronous callers (not inside an event loop)."""
        if not self.reports():
            self.ensure_reports_sync()
        self._judge(need)

    def _judge(self, need: Need) -> None:
        problem = admission_problem(need, self.reports())
        if problem is not None:
            raise ServiceError(413, "exceeds_every_budget", problem)

    async def generate(self, req: GenerateRequest) -> GenerateResponse:
        """Serve one validated request; raises :class:`ServiceError`.

        A replica that measured the checkpoint above the estimate and over its own budget
        answers 413 with what it measured: the call is made once more with the need raised
        to it (admission first: 413 ``exceeds_every_budget`` when no replica fits it), so a
        replica with room serves it, and so do later requests at once (:class:`MeasuredSizes`).
        Both calls share one ``request_timeout_s``."""
        payload, need, received_s = self._prepare(req)
        deadline_s = time.monotonic() + self.settings.request_timeout_s
        for _ in range(2):
            await self.admit(need)
            response = self._send(payload, need, deadline_s)
            try:
                result = await self.reply(response, deadline_s - time.monotonic())
            except _CALL_ERRORS as exc:
                raise self._failure(exc) from None
            need = self.measured.learn(result, need)
            if need is None:
                break
        return self._finish(result, received_s)

    def _send(self, payload: dict[str, Any], need: Need, deadline_s: float) -> Any:
        """One replica call, stamped with its own send time (the replica's queue time is
        counted from it: a second call after a 413 must not count the first one's load),
        or 504 once the request's time is spent (before a second call)."""
        if time.monotonic() >= deadline_s:
            raise ServiceError(504, "timeout", f"no answer within {self.settings.request_timeout_s} s")
        return remote_as_own_request(self.replicas.generate, payload | {"sent_at_s": time.time()}, need)

    async def reply(self, response: Any, timeout_s: float | None = None) -> Any:
        """The answer of a replica call (a DeploymentResponse) within ``timeout_s`` (default
        request_timeout_s). A call given up on is cancelled at the replica too: on our
        caller's cancellation (an HTTP client gone) and on our timeout (see
        _cancel_on_our_timeout)."""
        timeout_s = self.settings.request_timeout_s if timeout_s is None else max(timeout_s, 0.0)
        try:
            return await asyncio.wait_for(response, timeout=timeout_s)
        except asyncio.CancelledError:
            response.cancel()
            raise
        except _TIMEOUTS as exc:
            _cancel_on_our_timeout(exc, response)
            raise

    def reply_sync(self, response: Any, timeout_s: float | None = None) -> Any:
        """:meth:`reply` for synchronous callers: blocks on the handle's result(), and cancels
        the call on our timeout in the same way."""
        timeout_s = self.settings.request_timeout_s if timeout_s is None else max(timeout_s, 0.0)
        try:
            return response.result(timeout_s=timeout_s)
        except _TIMEOUTS as exc:
            _cancel_on_our_timeout(exc, response)
            raise

    def generate_sync(self, req: GenerateRequest) -> GenerateResponse:
        """:meth:`generate` for synchronous callers (not inside an event loop): blocks on the
        handle's result instead of awaiting it, without an event loop of its own."""
        payload, need, received_s = self._prepare(req)
        deadline_s = time.monotonic() + self.settings.request_timeout_s
        for _ in range(2):  # as generate: once more with a need raised to a replica's measure
            self.admit_sync(need)
            response = self._send(payload, need, deadline_s)
            try:
                result = self.reply_sync(response, deadline_s - time.monotonic())
            except _CALL_ERRORS as exc:
                raise self._failure(exc) from None
            need = self.measured.learn(result, need)
            if need is None:
                break
        return self._finish(result, received_s)

    def _prepare(self, req: GenerateRequest) -> tuple[dict[str, Any], Need, float]:
        """(payload for the replica, placement need, time received) or ServiceError."""
        received_s = time.time()
        try:
            spec = self.registry.get(req.checkpoint)
        except UnknownCheckpointError as exc:
            raise ServiceError(404, "unknown_checkpoint", str(exc)) from None
        try:
            resolved = resolve_request(req, spec, default_seed=secrets.randbelow(2**31))
        except RequestLimitError as exc:
            raise ServiceError(422, "invalid_request", str(exc)) from None
        try:
            need, family = self.need(spec, resolved.width, resolved.height, resolved.num_images)
        except EstimateError as exc:
            raise ServiceError(500, "checkpoint_unreadable", str(exc)) from None
        try:
            check_image_size(resolved, family)
        except RequestLimitError as exc:
            if getattr(req, exc.field) is None:  # the registry's default, not the client's choice
                raise ServiceError(500, "checkpoint_misconfigured",
                                   f"checkpoint {spec.name!r}: its default {exc}: set default_{exc.field} in the "
                                   f"registry to a multiple, or send {exc.field}") from None
            raise ServiceError(422, "invalid_request", str(exc)) from None
        return resolved.model_dump() | {"sent_at_s": time.time()}, need, received_s

    def _failure(self, exc: BaseException) -> ServiceError:
        """The answer to a failed replica call (one of _CALL_ERRORS). Cancelling a call given
        up on is :meth:`reply`'s and :meth:`reply_sync`'s."""
        # RayTaskError first: Ray makes a replica's exception an instance of its cause's class
        # too, so a TimeoutError raised inside the replica is one as well, and is no gateway timeout.
        if isinstance(exc, RayTaskError):  # a bug in replica code: not the client's fault, not transient
            log.error("replica raised: %s", exc)
            return ServiceError(500, "internal_error", "the replica failed while serving the request")
        if isinstance(exc, _TIMEOUTS):  # asyncio's and the handle's result() timeout alike
            return ServiceError(504, "timeout", f"no answer within {self.settings.request_timeout_s} s")
        if isinstance(exc, BackPressureError):
            return ServiceError(503, "overloaded", "too many requests queued; retry later", 1)
        # RayActorError, DeploymentUnavailableError: died or unreachable
        log.warning("replica unavailable: %s: %s", type(exc).__name__, exc)
        return ServiceError(503, "replica_unavailable", "the replica serving this request went away; retry", 1)

    def _finish(self, result: dict[str, Any], received_s: float) -> GenerateResponse:
        status = result.get("status", 500)
        if status != 200:
            err = result["error"]
            raise ServiceError(status, err["code"], err["message"], result.get("retry_after_s"))
        result = {k: v for k, v in result.items() if k != "status"}
        result["timings_ms"]["total"] = round((time.time() - received_s) * 1000, 3)
        return GenerateResponse.model_validate(result)

    async def ensure_reports(self, wait_s: float = 3.0) -> None:
        """Ray builds the request router on the first call through the handle; before that no
        reports reach this process. Prime it with a cheap call and wait for the reports."""
        if self.reports():
            return
        try:
            await asyncio.wait_for(self.replicas.report.remote(), timeout=wait_s)
        except Exception as exc:  # noqa: BLE001 - status stays empty; the caller sees that
            # The type too: a timeout's text is empty.
            log.warning("priming the request router failed (%s within %s s): %s", type(exc).__name__, wait_s, exc)
            return
        deadline = time.monotonic() + wait_s
        while not self.reports() and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def ensure_reports_sync(self, wait_s: float = 3.0) -> None:
        """:meth:`ensure_reports` for synchronous callers."""
        if self.reports():
            return
        try:
            self.replicas.report.remote().result(timeout_s=wait_s)
        except Exception as exc:  # noqa: BLE001 - status stays empty; the caller sees that
            # The type too: a timeout's text is empty.
            log.warning("priming the request router failed (%s within %s s): %s", type(exc).__name__, wait_s, exc)
            return
        deadline = time.monotonic() + wait_s
        while not self.reports() and time.monotonic() < deadline:
            time.sleep(0.1)

    def status(self) -> dict[str, Any]:
        """Every replica's latest report as this process's request router has it, plus totals."""
        reports = sorted(self.reports().values(), key=lambda r: r["replica_id"])
        keys = ("device_budget_bytes", "device_used_bytes", "host_used_bytes", "leaked_modules", "in_flight")
        totals = {k: sum(r[k] for r in reports) for k in keys}
        totals["replicas"] = len(reports)
        # This process's request router: decisions made, and views of replicas it built for
        # them (one per replica whose state or placements changed, not one per report).
        return {"replicas": reports, "totals": totals, "router": ReportBoard.router_counters(self._board_key)}
