"""The Router deployment: HTTP (FastAPI) and Python-handle ingress over router.core.RouterCore.

validate -> resolve the name in the registry -> estimate -> admission -> forward to the
ModelReplica deployment through a DeploymentHandle whose memory-aware RequestRouter
(router/request_router.py) picks the replica.

Both entry points share :meth:`RouterCore.generate`; the handle method raises
:class:`ServiceError` where HTTP answers ``{"error": {"code", "message"}}`` with a status.
deployments.client.LocalRouter runs the same core in the caller's process, without this hop.
"""


import asyncio
import hmac
import json
import logging
import os
from typing import Any, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send
from ray import serve
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException

from router.api import (AdminRequest, CheckpointInfo, ErrorResponse, GenerateRequest, GenerateResponse, problems_message,
                        validated)
from router.core import RouterCore, ServiceError, remote_as_own_request
from router.estimator import EstimateError
from router.registry import Dtype, Registry
from router.settings import IngressSettings

log = logging.getLogger("memrouter.ingress")

ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorResponse} for code in (400, 401, 403, 404, 405, 413, 415, 422, 500, 503, 504)
}


def admin_answer(out: dict[str, Any]) -> dict[str, Any] | JSONResponse:
    """An admin route's answer from the per-replica outcomes: 200 when every replica acted;
    else 503 ``admin_incomplete`` with ``Retry-After: 1``, naming the replicas that did not,
    and the outcomes in ``replicas`` still (a review found 200 for a release that no replica
    did: under load the admin calls wait in the replicas' queues with generate traffic)."""
    failed = [r for r in out["replicas"] if "error" in r]
    if not failed:
        return out
    named = ", ".join(f"{r['replica']} ({r['error']})" for r in failed[:8]) + (" ..." if len(failed) > 8 else "")
    message = f"{len(failed)} of {len(out['replicas'])} replicas did not act: {named}; retry later"
    return JSONResponse({"error": {"code": "admin_incomplete", "message": message}, **out}, status_code=503,
                        headers={"Retry-After": "1"})


def error_json(status: int, code: str, message: str, retry_after_s: float | None = None) -> JSONResponse:
    headers = {"Retry-After": str(max(1, int(retry_after_s)))} if retry_after_s else None
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


# ---- pure checks (no Ray; unit-tested in tests/test_reliability_unit.py) -----------------------
BODY_METHODS = ("POST", "PUT", "PATCH")
_ADMIN_CONCURRENCY = 8  # admin calls to replicas in flight at once (see RouterIngress._admin)


def body_problem(content_type: str | None, content_length: str | None, max_body_bytes: int) -> tuple[int, str, str] | None:
    """(status, code, message) refusing a request body by its headers, or None to read it.

    JSON only: a declared content type other than ``application/json`` (or ``*+json``) is 415;
    a body without one is refused as 415 too, once read (:class:`BodyLimitMiddleware`: FastAPI
    0.165 leaves it unparsed, and the route then answered a 422 about a missing object). A
    declared length above the limit is 413 before a byte of the body is read; the streamed
    size is checked again while reading. (A Content-Length that is not an integer never gets
    here over HTTP: Serve's proxy answers it first, with a plain-text 400.)
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


def admin_body(raw: bytes) -> AdminRequest:
    """An admin route's body: none (or JSON null) is every checkpoint; malformed JSON is 400
    ``malformed_json``, a bad field 422 ``invalid_request``, as for generate (ServiceError)."""
    if not raw.strip():
        return AdminRequest()
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError):  # JSONDecodeError is a ValueError
        raise ServiceError(400, "malformed_json", "body: malformed JSON") from None
    if data is None:
        return AdminRequest()
    try:
        return AdminRequest.model_validate(data)
    except ValidationError as exc:
        raise ServiceError(422, "invalid_request", problems_message(exc.errors())) from None


_ADMIN_BODY_DOC = {"requestBody": {"required": False, "content": {
    "application/json": {"schema": AdminRequest.model_json_schema()}}}}


def admin_token_from_env(env_name: str) -> str | None:
    """The admin token from ``env_name``, surrounding whitespace removed (a Kubernetes secret
    written from a file often ends in a newline, which would refuse every admin call); None
    (admin off) when unset or blank."""
    return (os.environ.get(env_name) or "").strip() or None


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


def ingress_limit(settings: IngressSettings) -> int:
    """Requests one ingress replica holds before it answers 503 ``overloaded`` (-1: no limit)."""
    if settings.max_queued_requests < 0:
        return -1
    return settings.max_ongoing_requests + settings.max_queued_requests


def ingress_serve_limits(settings: IngressSettings) -> tuple[int, int]:
    """(max_ongoing_requests, max_queued_requests) for Serve's ingress deployment: room
    above :func:`ingress_limit` so that the ingress itself refuses, in the documented shape
    (Serve's refusal is plain text without Retry-After). Both get it: Serve counts a
    request as queued while it is being routed to an ingress replica, so a burst that
    arrives at once fills Serve's queue before any of it reaches the ingress. The headroom
    takes a burst while the refusals, which are quick, are answered; only past twice the
    limit and more does Serve refuse."""
    limit = ingress_limit(settings)
    if limit < 0:
        return settings.max_ongoing_requests, -1
    room = limit + max(16, limit // 8)
    return room, max(settings.max_queued_requests, room)


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
        if headers.get("content-type") is None and body.strip():
            await error_json(415, "unsupported_media_type", "a request body needs 'Content-Type: application/json'")(
                scope, receive, send)
            return

        async def replay() -> dict[str, Any]:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def route_path(scope: Scope) -> str:
    """The request's path within the app: Serve mounts it under its route prefix (the
    scope's ``root_path``), e.g. ``/memrouter/v1/generate`` is ``/v1/generate`` here."""
    path, root = scope.get("path", ""), scope.get("root_path", "")
    if root and path.startswith(root) and (len(path) == len(root) or path[len(root)] == "/"):
        return path[len(root):]
    return path


class InflightLimitMiddleware:
    """ASGI middleware: at most ``limit`` generate requests in this ingress replica at once
    (HTTP, and handle calls through :meth:`enter`); past it, 503 ``overloaded`` with
    ``Retry-After: 1`` in the documented error shape.

    Serve's own ingress queue answers a plain-text 503 without Retry-After when it is full,
    so build_app gives Serve's limits headroom above this one (deployments/app.py:
    ``ingress_serve_limits``) and the refusal happens here. ``limit`` is the config's
    ``max_ongoing_requests + max_queued_requests`` (-1: unbounded), set by RouterIngress in
    the replica process (a class attribute: Serve runs a frozen copy of the app). The
    ingress awaits replicas, so requests past ``max_ongoing_requests`` wait there rather
    than in a queue of their own. Only ``POST /v1/generate`` counts and is refused: status,
    listing, health and the admin routes stay open when generate traffic is at the limit,
    which is when an operator needs them."""

    limit: int = -1
    _inflight: int = 0

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cls = type(self)
        if scope["type"] != "http" or route_path(scope) != "/v1/generate":
            await self.app(scope, receive, send)
            return
        refused = cls.enter()
        if refused is not None:
            await error_json(refused.status, refused.code, refused.message, refused.retry_after_s)(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            cls._inflight -= 1

    @classmethod
    def enter(cls) -> ServiceError | None:
        """Count one generate request in (the caller decrements ``_inflight`` when it ends),
        or the 503 ``overloaded`` to answer at the limit. HTTP requests and handle calls to
        RouterIngress.generate count alike: both take Serve's slots of this replica (a
        review found handle traffic pushing HTTP callers into Serve's plain-text 503).
        One event loop runs both: no lock needed."""
        if 0 <= cls.limit <= cls._inflight:
            return ServiceError(503, "overloaded",
                                f"the router holds {cls._inflight} requests, its limit; retry later", 1)
        cls._inflight += 1
        return None


app = FastAPI(
    title="memrouter",
    version="0.1.0",
    description="Memory-aware multi-model router for diffusers pipelines on Ray Serve.",
)
app.add_middleware(BodyLimitMiddleware)
app.add_middleware(InflightLimitMiddleware)  # added last: runs first, before a body is read


@app.exception_handler(RequestValidationError)
async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    if any(e.get("type") == "json_invalid" for e in errors):
        return error_json(400, "malformed_json", "body: malformed JSON")
    return error_json(422, "invalid_request", problems_message(errors))


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


@app.exception_handler(Exception)
async def _unexpected_error(request: Request, exc: Exception) -> JSONResponse:
    # A bug here still answers in the documented error shape (not a plain-text 500); the
    # message says nothing of the cause, the log has it.
    log.error("unexpected %s on %s %s", type(exc).__name__, request.method, request.url.path, exc_info=exc)
    return error_json(500, "internal_error", "the router failed while handling the request")


@serve.ingress(app)
class RouterIngress:
    """The ingress deployment class.

    ``replicas``: the ModelReplica deployment handle; ``load_registry``: builds the registry
    in this replica's process, where the checkpoints' files must be readable (the estimator
    reads their headers), e.g. ``AppConfig.load_registry``; ``settings``: this Router's.
    """

    def __init__(self, replicas: DeploymentHandle, load_registry: Callable[[], Registry], settings: IngressSettings):
        if not isinstance(settings, IngressSettings):
            settings = IngressSettings.model_validate(settings)
        self._core = RouterCore(replicas, load_registry(), settings)
        self._token = admin_token_from_env(settings.admin_token_env)
        self._token_env = settings.admin_token_env
        BodyLimitMiddleware.max_body_bytes = settings.max_body_bytes
        InflightLimitMiddleware.limit = ingress_limit(settings)

    # ---- Python handle API -------------------------------------------------------------------
    async def generate(self, request: GenerateRequest) -> GenerateResponse:
        """``handle.generate.remote(GenerateRequest(...))`` (or the same fields as a dict);
        raises :class:`ServiceError`, a bad field as 422 ``invalid_request`` as over HTTP
        (pydantic's ValidationError cannot cross to a handle caller: Ray cannot wrap it)."""
        try:
            request = validated(request)
        except ValidationError as exc:
            raise ServiceError(422, "invalid_request", problems_message(exc.errors())) from None
        refused = InflightLimitMiddleware.enter()  # the same limit as HTTP's generate
        if refused is not None:
            raise refused
        try:
            return await self._core.generate(request)
        finally:
            InflightLimitMiddleware._inflight -= 1

    # ---- HTTP --------------------------------------------------------------------------------
    @app.post("/v1/generate", response_model=GenerateResponse, responses=ERROR_RESPONSES)
    async def http_generate(self, body: GenerateRequest) -> GenerateResponse:
        """Generate images with a registered checkpoint."""
        return await self._core.generate(body)

    @app.get("/v1/checkpoints", response_model=list[CheckpointInfo])
    async def http_checkpoints(self) -> list[CheckpointInfo]:
        """The registry, each checkpoint with its estimate at its default request shape."""
        await self._core.ensure_reports()  # a dtype: auto entry is listed at the replicas' dtype
        reports = self._core.reports()
        default_dtype = next((r["default_dtype"] for r in reports.values()), "float16")
        out = []
        for spec in self._core.registry:
            dtype = default_dtype if spec.dtype is Dtype.AUTO else spec.dtype.value
            try:
                est = self._core.estimator.estimate(spec, dtype=dtype, width=spec.width, height=spec.height)
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
        await self._core.ensure_reports()
        return self.status()

    def status(self) -> dict[str, Any]:
        return self._core.status()

    @app.get("/healthz")
    async def healthz(self) -> dict[str, str]:
        return {"status": "ok"}

    # ---- admin -------------------------------------------------------------------------------
    def _check_admin(self, request: Request) -> None:
        problem = admin_problem(request.headers.get("authorization"), self._token, self._token_env)
        if problem is not None:
            raise ServiceError(*problem)

    async def _admin(self, method: str, body: AdminRequest) -> dict[str, Any]:
        if body.checkpoint is not None and body.checkpoint not in self._core.registry:
            raise ServiceError(404, "unknown_checkpoint", f"unknown checkpoint {body.checkpoint[:64]!r}")
        await self._core.ensure_reports()

        # A few replicas at a time: each targeted call goes out under a request id of its own,
        # so Ray, which keeps waiting calls by request id, cannot swap them; the bound keeps a
        # large fleet's admin calls, each waiting for its replica's room, from taking every
        # routing task of this process from generate traffic.
        slots = asyncio.Semaphore(_ADMIN_CONCURRENCY)

        async def one(rid: str) -> dict[str, Any]:
            async with slots:
                try:
                    return await self._core.reply(remote_as_own_request(
                        getattr(self._core.replicas, method), body.checkpoint, _target_replica=rid))
                except Exception as exc:  # noqa: BLE001 - report per replica, keep going
                    return {"replica": rid, "error": type(exc).__name__}

        return {"replicas": list(await asyncio.gather(*(one(rid) for rid in sorted(self._core.reports()))))}

    # The body is read by hand, after the token: a FastAPI body parameter was parsed and
    # validated first, so a caller without the token got 400/422 naming the body's rules.
    @app.post("/v1/admin/offload", responses=ERROR_RESPONSES, openapi_extra=_ADMIN_BODY_DOC)
    async def http_offload(self, request: Request) -> dict[str, Any]:
        """Move idle pipelines (one checkpoint or all) off every replica's device."""
        self._check_admin(request)
        return admin_answer(await self._admin("offload", admin_body(await request.body())))

    @app.post("/v1/admin/release", responses=ERROR_RESPONSES, openapi_extra=_ADMIN_BODY_DOC)
    async def http_release(self, request: Request) -> dict[str, Any]:
        """Free idle pipelines (one checkpoint or all) on every replica."""
        self._check_admin(request)
        return admin_answer(await self._admin("release", admin_body(await request.body())))
