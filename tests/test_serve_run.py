"""`serve run serve_config.yaml`, as a user types it, answers /healthz and one generate."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml

from tests.serve_harness import ROOT

pytestmark = pytest.mark.integration


def test_serve_run_of_the_config_file_serves(tmp_path):
    cfg = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    base = f"http://{cfg['http_options']['host']}:{cfg['http_options']['port']}"
    serve_bin = shutil.which("serve", path=str(Path(sys.executable).parent)) or "serve"
    log = (tmp_path / "serve-run.log").open("w")
    env = {**os.environ, "RAY_DEDUP_LOGS": "0"}
    proc = subprocess.Popen([serve_bin, "run", "serve_config.yaml"], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + 240
        healthy = False
        with httpx.Client(base_url=base, timeout=60) as client:
            while time.monotonic() < deadline and proc.poll() is None:
                try:
                    if client.get("/healthz").status_code == 200:
                        healthy = True
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(1)
            assert healthy, f"serve run never became healthy (exit {proc.poll()}):\n" + (tmp_path / "serve-run.log").read_text()[-4000:]
            r = client.post("/v1/generate", json={"checkpoint": "demo-xs", "prompt": "a boat", "seed": 1}, timeout=180)
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["checkpoint"] == "demo-xs" and len(body["images"]) == 1 and body["served_from"] == "disk"
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C does: serve run shuts the app and its cluster down
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        log.close()
