"""Builds the Serve application from serve_config.yaml's ``args`` (an application builder).

``serve run serve_config.yaml`` imports ``deployments.app:app`` and calls it with the args;
the replicas get the args and validate them as :class:`AppConfig`; the Router ingress gets
its own part (router.settings.IngressSettings) and the registry's loader.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application
from ray.serve.config import RequestRouterConfig

from deployments.config import AppConfig
from deployments.replica import ModelReplica
from router.core import REPLICA_DEPLOYMENT
from router.ingress import RouterIngress, ingress_serve_limits

INGRESS_DEPLOYMENT = "Router"
REQUEST_ROUTER_CLASS = "router.request_router:MemoryAwareRequestRouter"


def build_app(args: dict[str, Any] | None = None) -> Application:
    """The application: the Router ingress bound to the ModelReplica deployment."""
    args = dict(args or {})
    cfg = AppConfig.model_validate(args)  # fail fast, before any replica starts
    r, i = cfg.replica, cfg.ingress
    replica = serve.deployment(ModelReplica, name=REPLICA_DEPLOYMENT).options(
        num_replicas=r.num_replicas,
        max_ongoing_requests=r.max_ongoing_requests,
        max_queued_requests=r.max_queued_requests,
        ray_actor_options={"num_gpus": r.num_gpus, "num_cpus": r.num_cpus},
        request_router_config=RequestRouterConfig(
            request_router_class=REQUEST_ROUTER_CLASS,
            request_router_kwargs={"spill_queue_len": r.spill_queue_len, "holder_wait_s": r.holder_wait_s,
                                   "rank_limit": r.rank_limit, "tie_window": r.tie_window},
            request_routing_stats_period_s=r.routing_stats_period_s,
            request_routing_stats_timeout_s=r.routing_stats_timeout_s,
        ),
    )
    serve_ongoing, serve_queued = ingress_serve_limits(i)  # the ingress refuses first, as documented
    ingress = serve.deployment(RouterIngress, name=INGRESS_DEPLOYMENT).options(
        num_replicas=i.num_replicas,
        max_ongoing_requests=serve_ongoing,
        max_queued_requests=serve_queued,
        ray_actor_options={"num_cpus": i.num_cpus},
    )
    # The registry loads in the ingress's own process (its files must be readable there); the
    # loader is the validated config's bound method, pickled with the app.
    return ingress.bind(replica.bind(args), cfg.load_registry, cfg.ingress)


app = build_app
