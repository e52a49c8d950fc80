"""LocalRouter: the Router's request path in the caller's process, without the ingress hop.

The Router ingress is one more Ray actor between a caller and the replica: on the bench
machine a no-op round trip into it costs several milliseconds (bench/results/
router_overhead.md), while the Router's own work (validate, resolve, estimate, admit) is
under half a millisecond. A Python caller that already holds a Ray connection can run
that work itself and call the ModelReplica deployment's handle directly; the memory-aware
request router (router/request_router.py) then runs in this process, as it does in the
ingress, and places the request on the same terms. It lives beside the app (not in
router/) because it is configured by the app's own config (deployments/config.py).

    from deployments.client import LocalRouter
    with LocalRouter(app_config) as router:     # the args the app was deployed with
        response = router.generate({"checkpoint": "demo-s", "prompt": "a red cube"})

Caveats:
- It reads its registry from ``config``: give it the app's own config (serve_config.yaml's
  ``args``), or it can refuse or place what the app would not.
- Its request router keeps its own ledger of in-flight placements: callers beside the
  ingress see each other's requests only through the replicas' reports (up to one report
  period late), as two ingress replicas do.
- Requests reach the replicas without the ingress's HTTP limits (body size); the request
  model's own limits (``GenerateRequest``, the checkpoint's max sizes) still apply.
"""

from __future__ import annotations

from typing import Any

import ray
from ray import serve

from deployments.config import AppConfig
from router.api import GenerateRequest, GenerateResponse, validated
from router.core import REPLICA_DEPLOYMENT, RouterCore, ServiceError

__all__ = ["LocalRouter", "ServiceError"]


class LocalRouter:
    """The Router for one running memrouter Serve app, in this process.

    ``config``: the app's config (a dict as in serve_config.yaml's ``args``, or an
    AppConfig); ``app_name``: the Serve application it was deployed as. Needs a Ray
    connection (``ray.init``) to the app's cluster. Errors are :class:`ServiceError` with
    the HTTP status the ingress would answer.
    """

    def __init__(self, config: dict[str, Any] | AppConfig, *, app_name: str = "memrouter"):
        if not isinstance(app_name, str) or not app_name:
            raise ValueError(f"app_name must be a non-empty string (the Serve application's name), got {app_name!r}")
        cfg = config if isinstance(config, AppConfig) else AppConfig.model_validate(config)
        if not ray.is_initialized():
            # Else Serve's handle lookup would start a new local Ray cluster with no app in it.
            raise RuntimeError("LocalRouter needs a Ray connection to the app's cluster: call "
                               "ray.init(address=...) first")
        self._core = RouterCore(serve.get_deployment_handle(REPLICA_DEPLOYMENT, app_name=app_name),
                                cfg.load_registry(), cfg.ingress)

    async def generate_async(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """Generate in the running event loop; ``request`` as for POST /v1/generate (a
        pydantic ValidationError names a bad field)."""
        return await self._core.generate(validated(request))

    def generate(self, request: GenerateRequest | dict[str, Any]) -> GenerateResponse:
        """Generate from synchronous code: blocks on the replica's answer (inside a running
        event loop, await :meth:`generate_async` instead; Ray refuses the blocking call there).
        A pydantic ValidationError names a bad field; a GenerateRequest is checked again, as
        a dict is (router.api.validated)."""
        return self._core.generate_sync(validated(request))

    def close(self) -> None:
        """Stop this process's request router for the app (its thread and its report
        subscription). Call before ``ray.shutdown()``; the LocalRouter is unusable after."""
        self._core.replicas.shutdown()

    def __enter__(self) -> "LocalRouter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def status(self) -> dict[str, Any]:
        """The replicas' latest reports as this process's request router has them (empty
        before the first request), plus totals."""
        return self._core.status()
