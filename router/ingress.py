"""The Router deployment: HTTP (FastAPI) and Python-handle ingress.

validate -> resolve the name in the registry -> estimate -> admission -> forward to the
ModelReplica deployment through a DeploymentHandle whose memory-aware RequestRouter
(router/request_router.py) picks the replica.

Both entry points share :meth:`RouterIngress._generate`; the handle method raises
:class:`ServiceError` where HTTP answers ``{"error": {"code", "message"}}`` with a status.
"""


import asyncio
import hmac
import logging
import os
import secrets
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from deployments.config import AppConfig, IngressSettings
from router.api import (AdminRequest, CheckpointInfo, ErrorResponse, GenerateRequest, GenerateResponse,
                        RequestLimitError, resolve_request)
from router.estimator import TARGET_DTYPE_BYTES, EstimateError, Estimator
from router.placement import Need
from router.registry import CheckpointSpec, Dtype, UnknownCheckpointError
from router.request_router import ReportBoard

log = logging.getLogger("memrouter.ingress")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 405, 413, 415, 422, 500, 503, 504)
}


class ServiceError(Exception):
    """An error answer: ``status`` is the HTTP status the same failure gets over HTTP."""

    def __init__(self, status: int, code: str, message: str, retry_after_s: float | None = None):
        self.status, self.code, self.message, self.retry_after_s = status, code, message, retry_after_s
        super().__init__(f"{status} {code}: {message}")

    def __reduce__(self):  # crosses Ray process boundaries intact
        return (ServiceError, (self.status, self.code, self.message, self.retry_after_s))


def error_json(status: int, code: str, message: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, int(retry_after_s)))} if retry_after_s else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ---- pure checks (no Ray; unit-tested in tests/test_reliability_unit.py) -----------------------
BODY_METHODS = ("POST", "PUT", "PATCH")


def body_problem(content_type: str | None, content_length: str | None, max_body_bytes: int) -> tuple[int, str, str] | None:
    """(status, code, message) refusing a request body by its headers, or None to read it.

    JSON only: a declared content type other than ``application/json`` (or ``*+json``) is 415.
    A missing one is read as JSON, as FastAPI does. A declared length above the limit is 413
    before a byte of the body is read; the streamed size is checked again while reading.
    """
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media != "application/json" and not media.endswith("+json"):
            return 415, "unsupported_media_type", f"content type {media[:64]!r} is not accepted; send application/json"
    if content_length is not None:
        try:
            declared = int(content_length)
        except ValueError:
            return 400, "bad_content_length", "Content-Length is not an integer"
        if declared > max_body_bytes:
            return 413, "body_too_large", f"request body of {declared} bytes exceeds the limit of {max_body_bytes} bytes"
    return None


def admin_problem(authorization: str | None, token: str | None, token_env: str) -> tuple[int, str, str] | None:
    """(status, code, message) refusing an admin call, or None to allow it.

    No token configured: the admin routes are off (403), never open. The bearer token is
    compared in constant time. Messages name the env var, never a token.
    """
    if not token:
        return 403, "admin_disabled", f"admin routes are off: set the {token_env} environment variable"
    scheme, _, given = (authorization or "").partition(" ")
    # Compare even when the scheme is wrong, so the time taken does not tell which check failed.
    ok = hmac.compare_digest(given.strip().encode(), token.encode())
    if scheme.lower() != "bearer" or not ok:
        return 401, "unauthorized", "admin routes need 'Authorization: Bearer <token>'"
    return None


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


class BodyLimitMiddleware:
    """ASGI middleware: JSON-only bodies of at most ``max_body_bytes``, checked before parsing.

    Bodies are buffered (they are small by construction) and replayed to the app. The limit
    is a class attribute because Serve runs a frozen copy of the FastAPI app: RouterIngress
    sets it from its config in the replica process.
    """

    max_body_bytes: int = IngressSettings().max_body_bytes

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in BODY_METHODS:
            await self.app(scope, receive, send)
            return
        limit = type(self).max_body_bytes
        headers = Headers(scope=scope)
        problem = body_problem(headers.get("content-type"), headers.get("content-length"), limit)
        if problem is not None:
            await error_json(*problem)(scope, receive, send)
            return
        chunks, total = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return  # the client left; nobody to answer
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > limit:
                await error_json(413, "body_too_large", f"request body exceeds the limit of {limit} bytes")(
                    scope, receive, send)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body, replayed = b"".join(chunks), False

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _field_of(err: dict[str, Any]) -> str:
    loc = [str(p) for p in err.get("loc", ()) if p != "body"]
    return ".".join(loc) or "body"


app = FastAPI(
    title="memrouter",
    version="0.1.0",
    description="Memory-aware multi-model router for diffusers pipelines on Ray Serve.",
)
app.add_middleware(BodyLimitMiddleware)


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_json(400, "malformed_json", "body: malformed JSON")
    # Messages name the field and the rule, never echo the input (pydantic's msg does not).
    problems = [f"{_field_of(e)}: {e.get('msg', 'invalid')}" for e in errors[:10]]
    return error_json(422, "invalid_request", "; ".join(problems))


@app.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
    codes = {400: "malformed_json", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large",
             415: "unsupported_media_type"}
    message = str(exc.detail)
    if exc.status_code == 400:  # FastAPI's answer to a body it cannot decode (e.g. not UTF-8)
        message = f"body: malformed JSON ({exc.detail})"
    elif exc.status_code == 405:
        allow = (exc.headers or {}).get("Allow", "")
        message = f"method {request.method} is not allowed on this route" + (f"; use {allow}" if allow else "")
    elif exc.status_code == 404:
        message = "no such route; see /docs"
    response = error_json(exc.status_code, codes.get(exc.status_code, "http_error"), message)
    if exc.status_code == 405 and exc.headers:
        response.headers.update(exc.headers)
    return response


@app.exception_handler(ServiceError)
async def _service_error(request: Request, exc: ServiceError) -> JSONResponse:
    return error_json(exc.status, exc.code, exc.message, exc.retry_after_s)


@serve.ingress(app)
class RouterIngress:
    """The ingress deployment class; ``replicas`` is the ModelReplica deployment handle."""

    def __init__(self, replicas: DeploymentHandle, config: dict[str, Any]):
        cfg = AppConfig.model_validate(config)
        self._settings = cfg.ingress
        self._registry = cfg.load_registry()
        self._estimator = Estimator()
        self._replicas = replicas
        self._replica_deployment = "ModelReplica"
        self._token = os.environ.get(cfg.ingress.admin_token_env) or None
        self._token_env = cfg.ingress.admin_token_env
        BodyLimitMiddleware.max_body_bytes = cfg.ingress.max_body_bytes

    # ---- shared core -------------------------------------------------------------------------
    def _need(self, spec: CheckpointSpec, width: int, height: int, batch: int) -> Need:
        """Estimates at each dtype a replica might use (its profile default when auto)."""
        dtypes = list(TARGET_DTYPE_BYTES) if spec.dtype is Dtype.AUTO else [spec.dtype.value]
        weights, workspace = {}, {}
        for d in dtypes:
            est = self._estimator.estimate(spec, dtype=d, width=width, height=height, batch=batch)
            weights[d], workspace[d] = est.weights_bytes, est.workspace_bytes
        if spec.dtype is not Dtype.AUTO:  # every replica serves it at the spec's dtype
            weights = dict.fromkeys(TARGET_DTYPE_BYTES, weights[dtypes[0]])
            workspace = dict.fromkeys(TARGET_DTYPE_BYTES, workspace[dtypes[0]])
        return Need(spec.name, weights, workspace)

    async def _admit(self, need: Need) -> None:
        """Refuse, before any load, a request that fits no replica's budget (413 with numbers).

        Before the first reports reach this process, prime the request router (a cheap report
        call) so that the first requests are judged too; if none come, the replica's cache
        still refuses what cannot fit with the same numbers.
        """
        if not ReportBoard.reports(self._replica_deployment):
            await self._ensure_reports()
        problem = admission_problem(need, ReportBoard.reports(self._replica_deployment))
        if problem is not None:
            raise ServiceError(413, "exceeds_every_budget", problem)

    async def _generate(self, req: GenerateRequest) -> GenerateResponse:
        received_s = time.time()
        try:
            spec = self._registry.get(req.checkpoint)
        except UnknownCheckpointError as exc:
            raise ServiceError(404, "unknown_checkpoint", str(exc)) from None
        try:
            resolved = resolve_request(req, spec, default_seed=secrets.randbelow(2**31))
        except RequestLimitError as exc:
            raise ServiceError(422, "invalid_request", str(exc)) from None
        try:
            need = self._need(spec, resolved.width, resolved.height, resolved.num_images)
        except EstimateError as exc:
            raise ServiceError(500, "checkpoint_unreadable", str(exc)) from None
        await self._admit(need)
        payload = resolved.model_dump() | {"sent_at_s": time.time()}
        try:
            result = await asyncio.wait_for(
                self._replicas.generate.remote(payload, need), timeout=self._settings.request_timeout_s)
        except asyncio.TimeoutError:
            raise ServiceError(504, "timeout", f"no answer within {self._settings.request_timeout_s} s") from None
        except BackPressureError:
            raise ServiceError(503, "overloaded", "too many requests queued; retry later", 1) from None
        except RayTaskError as exc:  # a bug in replica code: not the client's fault, not transient
            log.error("replica raised: %s", exc)
            raise ServiceError(500, "internal_error", "the replica failed while serving the request") from None
        except (RayActorError, DeploymentUnavailableError) as exc:  # died or unreachable
            log.warning("replica unavailable: %s: %s", type(exc).__name__, exc)
            raise ServiceError(503, "replica_unavailable", "the replica serving this request went away; retry", 1) from None
        status = result.get("status", 500)
        if status != 200:
            err = result["error"]
            raise ServiceError(status, err["code"], err["message"], result.get("retry_after_s"))
        result = {k: v for k, v in result.items() if k != "status"}
        result["timings_ms"]["total"] = round((time.time() - received_s) * 1000, 3)
        return GenerateResponse.model_validate(result)

    # ---- Python handle API -------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """``handle.generate.remote(GenerateRequest(...))``; raises :class:`ServiceError`."""
        if not isinstance(request, GenerateRequest):
            request = GenerateRequest.model_validate(request)
        return await self._generate(request)

    # ---- HTTP --------------------------------------------------------------------------------
    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
    async def http_generate(self, body: GenerateRequest) -> GenerateResponse:
        """Generate images with a registered checkpoint."""
        return await self._generate(body)

    @app.get("/v1/checkpoints", response_model=list[CheckpointInfo])
    async def http_checkpoints(self) -> list[CheckpointInfo]:
        """The registry, each checkpoint with its estimate at its default request shape."""
        reports = ReportBoard.reports(self._replica_deployment)
        default_dtype = next((r["default_dtype"] for r in reports.values()), "float16")
        out = []
        for spec in self._registry:
            dtype = default_dtype if spec.dtype is Dtype.AUTO else spec.dtype.value
            try:
                est = self._estimator.estimate(spec, dtype=dtype, width=spec.width, height=spec.height)
            except EstimateError as exc:  # listed checkpoints must be servable; requests for it get the error
                log.warning("checkpoint %s left out of the listing: %s", spec.name, exc)
                continue
            out.append(CheckpointInfo(
                name=spec.name, dtype=dtype, quantization=spec.quantization.value, family=est.family,
                weights_bytes=est.weights_bytes, workspace_bytes=est.workspace_bytes, total_bytes=est.total_bytes,
                default_width=spec.width, default_height=spec.height, max_width=spec.max_width,
                max_height=spec.max_height, max_steps=spec.max_steps, max_batch=spec.max_batch,
            ))
        return out

    @app.get("/v1/status")
    async def http_status(self) -> dict[str, Any]:
        """Every replica's latest memory report plus totals."""
        await self._ensure_reports()
        return self.status()

    async def _ensure_reports(self, wait_s: float = 3.0) -> None:
        """Ray builds the request router on the first call through the handle; before that no
        reports reach this process. Prime it with a cheap call and wait for the reports."""
        if ReportBoard.reports(self._replica_deployment):
            return
        try:
            await asyncio.wait_for(self._replicas.report.remote(), timeout=wait_s)
        except Exception as exc:  # noqa: BLE001 - status stays empty; the caller sees that
            log.warning("priming the request router failed: %s", exc)
            return
        deadline = time.monotonic() + wait_s
        while not ReportBoard.reports(self._replica_deployment) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def status(self) -> dict[str, Any]:
        reports = sorted(ReportBoard.reports(self._replica_deployment).values(), key=lambda r: r["replica_id"])
        keys = ("device_budget_bytes", "device_used_bytes", "host_used_bytes", "leaked_modules", "in_flight")
        totals = {k: sum(r[k] for r in reports) for k in keys}
        totals["replicas"] = len(reports)
        # This ingress's request router: decisions made, and views of replicas it built for
        # them (one per replica whose state or placements changed, not one per report).
        return {"replicas": reports, "totals": totals, "router": ReportBoard.router_counters(self._replica_deployment)}

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    # ---- admin -------------------------------------------------------------------------------
    def _check_admin(self, request: Request) -> None:
        problem = admin_problem(request.headers.get("authorization"), self._token, self._token_env)
        if problem is not None:
            raise ServiceError(*problem)

    async def _admin(self, method: str, body: AdminRequest) -> dict[str, Any]:
        if body.checkpoint is not None and body.checkpoint not in self._registry:
            raise ServiceError(404, "unknown_checkpoint", f"unknown checkpoint {body.checkpoint[:64]!r}")
        await self._ensure_reports()
        results = []
        # One call at a time: Ray keys pending requests by the parent request's id, which
        # every child call of this request shares, so concurrent targeted calls could swap.
        for rid in sorted(ReportBoard.reports(self._replica_deployment)):
            try:
                call = getattr(self._replicas, method).remote(body.checkpoint, _target_replica=rid)
                results.append(await asyncio.wait_for(call, timeout=self._settings.request_timeout_s))
            except Exception as exc:  # noqa: BLE001 - report per replica, keep going
                results.append({"replica": rid, "error": type(exc).__name__})
        return {"replicas": results}

    @app.post("/v1/admin/offload", responses=ERROR_RESPONSES)
    async def http_offload(self, body: AdminRequest, request: Request) -> dict[str, Any]:
        """Move idle pipelines (one checkpoint or all) off every replica's device."""
        self._check_admin(request)
        return await self._admin("offload", body)

    @app.post("/v1/admin/release", responses=ERROR_RESPONSES)
    async def http_release(self, body: AdminRequest, request: Request) -> dict[str, Any]:
        """Free idle pipelines (one checkpoint or all) on every replica."""
        self._check_admin(request)
        return await self._admin("release", body)
