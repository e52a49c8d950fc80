"""ReportBoard: the replicas' latest reports, shared between the request router and the ingress.

A module of its own on purpose: Ray ships the request router's module to callers pickled
*by value*, so a class defined there is a copy in each process, not the class the ingress
imports. Classes in this module are pickled by reference, so both see the same board.

Process-local: Ray constructs the router itself (no object can be handed to it), and the
ingress in the same process reads the same reports for /v1/status and admission.
"""

from __future__ import annotations

import threading
from typing import Any


class ReportBoard:
    """Latest replica reports seen by this process's routers, by deployment: the key is
    ``(app name, deployment name)``, so that two apps' routers in one process (two
    LocalRouters, say) do not read each other's replicas.

    Process-local on purpose: Ray constructs the router itself (no way to hand it an
    object), and the ingress in the same process needs the same reports for /v1/status.
    """

    _lock = threading.Lock()
    _reports: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    _router_counters: dict[tuple[str, str], dict[str, int]] = {}

    @classmethod
    def publish(cls, deployment: tuple[str, str], reports: dict[str, dict[str, Any]]) -> None:
        with cls._lock:
            cls._reports[deployment] = dict(reports)

    @classmethod
    def reports(cls, deployment: tuple[str, str]) -> dict[str, dict[str, Any]]:
        with cls._lock:
            return dict(cls._reports.get(deployment, {}))

    @classmethod
    def register_router_counters(cls, deployment: tuple[str, str], counters: dict[str, int]) -> None:
        """The request router's own counters dict, which it keeps updating in place (no
        per-decision publishing); the latest router registered for a deployment wins."""
        with cls._lock:
            cls._router_counters[deployment] = counters

    @classmethod
    def router_counters(cls, deployment: tuple[str, str]) -> dict[str, int]:
        with cls._lock:
            return dict(cls._router_counters.get(deployment, {}))
