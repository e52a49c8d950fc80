"""Machine facts recorded next to every benchmark result."""

from __future__ import annotations

import datetime as _dt
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
    }


def machine_md(info: dict[str, Any]) -> str:
    return (f"Machine: {info['cpu_model']} ({info['cpu_count']} CPUs), {info['implementation']} {info['python']}, "
            f"{info['platform']}, {info['date_utc']}")
