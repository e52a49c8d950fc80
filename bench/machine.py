"""Machine facts recorded next to every benchmark result."""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import platform
import sys
from typing import Any


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "python": sys.version.split()[0],
        "implementation": platform.python_implementation(),
        "platform": platform.platform(),
        "date_utc": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "code_sha256_12": code_versions(),
    }


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CODE_UNDER_TEST = ("router/placement.py", "router/ledger.py", "router/request_router.py", "deployments/cache.py")


def code_versions() -> dict[str, str]:
    """Content hashes of the code the benchmarks drive (it changes while others work)."""
    out = {}
    for rel in CODE_UNDER_TEST:
        try:
            with open(os.path.join(ROOT, rel), "rb") as f:
                out[rel] = hashlib.sha256(f.read()).hexdigest()[:12]
        except OSError:
            out[rel] = "missing"
    return out


def machine_md(info: dict[str, Any]) -> str:
    return (f"Machine: {info['cpu_model']} ({info['cpu_count']} CPUs), {info['implementation']} {info['python']}, "
            f"{info['platform']}, {info['date_utc']}; load average {info['loadavg_1_5_15']} at the end of the run "
            f"(the machine is shared: timings under load).")
