"""``memrouter demo``: the service on the embedded demo checkpoints, end to end.

Starts a local Ray cluster and the Serve app from serve_config.yaml, sends a mixed workload
over HTTP, prints one line per request and the final replica reports, writes the images
and one PNG memory timeline per replica (sampled from GET /v1/status), and shuts down.
``--local`` runs the same replica code in this process without Ray.
"""

from __future__ import annotations

import base64
import json
import random
import socket
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = ROOT / "serve_config.yaml"  # the checkout's; not in an installed wheel (see find_config)
# Zipf-like popularity over the demo checkpoints: the small ones are hot, the big one cold.
WEIGHTS = {"demo-xs": 8, "demo-s": 4, "demo-m": 2, "demo-l": 1}


def say(msg: str) -> None:
    print(f"[memrouter] {msg}", flush=True)


def workload(n: int, seed: int = 7) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    names = list(WEIGHTS)
    picks = rng.choices(names, weights=[WEIGHTS[k] for k in names], k=n)
    return [{"checkpoint": c, "prompt": f"a lighthouse at dusk #{i}", "seed": i} for i, c in enumerate(picks)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def find_config(config_path: Path | None = None) -> Path:
    """``config_path``, else the checkout's serve_config.yaml, else ./serve_config.yaml.

    A package installed without ``-e`` has no checkout beside it: FileNotFoundError then
    says where it looked and how to pass one.
    """
    candidates = [config_path] if config_path is not None else [DEFAULT_CONFIG, Path.cwd() / "serve_config.yaml"]
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(f"no serve config at {', '.join(str(c) for c in candidates)}: pass --config PATH "
                            "(the repository's serve_config.yaml), or run from a checkout (pip install -e .)")


def load_app_args(config_path: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the Serve config document, its first application's args); ValueError naming the
    file when it is no Serve config (OSError when it cannot be read)."""
    try:
        doc = yaml.safe_load(config_path.read_text())
    except yaml.YAMLError as exc:
        raise ValueError(f"{config_path}: invalid YAML ({exc})") from None
    apps = doc.get("applications") if isinstance(doc, dict) else None
    if not isinstance(apps, list) or not apps or not isinstance(apps[0], dict):
        raise ValueError(f"{config_path}: no 'applications' list with an application in it (not a Serve config)")
    return doc, dict(apps[0].get("args") or {})


MANIFEST_NAME = ".memrouter-demo-files"


class DemoOutput:
    """The demo's output folder. Every file a run writes is listed in a manifest there once
    written (its name, size and modification time); a new run first removes the files the
    last run listed that are still as it left them, so that two runs' images and plots do
    not mix. Nothing else is touched: a folder may hold the user's own files (``--out .``),
    and a hand-edited or unreadable manifest, or one that is a link, removes nothing."""

    def __init__(self, out_dir: str | Path):
        self.root = Path(out_dir)
        (self.root / "images").mkdir(parents=True, exist_ok=True)
        self._manifest = self.root / MANIFEST_NAME
        for rel, size, mtime_ns in self._listed():
            old = self.root / rel
            try:
                st = old.lstat()
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and (st.st_size, st.st_mtime_ns) == (size, mtime_ns):
                old.unlink()
        if self._manifest.is_symlink():
            self._manifest.unlink()  # replaced, never written through
        self._manifest.write_text("", encoding="utf-8")

    def _listed(self) -> list[tuple[str, int, int]]:
        if self._manifest.is_symlink() or not self._manifest.is_file():
            return []
        out = []
        for line in self._manifest.read_text(encoding="utf-8", errors="replace").splitlines():
            parts = line.split("\t")
            if len(parts) != 3 or not parts[0].isdigit() or not parts[1].isdigit():
                continue
            rel = Path(parts[2])
            if rel.is_absolute() or ".." in rel.parts or not rel.parts:
                continue
            out.append((parts[2], int(parts[0]), int(parts[1])))
        return out

    def wrote(self, rel: str) -> Path:
        """List ``rel`` (written under the folder just now) in the manifest; its path."""
        path = self.root / rel
        st = path.stat()
        with self._manifest.open("a", encoding="utf-8") as f:
            f.write(f"{st.st_size}\t{st.st_mtime_ns}\t{rel}\n")
        return path

    def write_bytes(self, rel: str, data: bytes) -> Path:
        (self.root / rel).write_bytes(data)
        return self.wrote(rel)

    def write_text(self, rel: str, text: str) -> Path:
        (self.root / rel).write_text(text, encoding="utf-8")
        return self.wrote(rel)


def print_row(i: int, r: dict[str, Any]) -> None:
    if "error" in r:
        say(f"{i:>3} {r.get('checkpoint', '?'):<8} -> ERROR {r['error']}")
        return
    t = r["timings_ms"]
    say(f"{i:>3} {r['checkpoint']:<8} -> replica {r['replica'][:8]:<8} {r['served_from']:<6} "
        f"total {t['total']:8.1f} ms  load {t['load']:8.1f} ms  inference {t['inference']:7.1f} ms")


def plot_timelines(samples: dict[str, list[tuple[float, int, int]]], budgets: dict[str, int], out: DemoOutput) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    t0 = min((s[0][0] for s in samples.values() if s), default=0.0)
    for rid, pts in sorted(samples.items()):
        if not pts:
            continue
        fig, ax = plt.subplots(figsize=(7, 3))
        ax.step([p[0] - t0 for p in pts], [p[1] / 1e6 for p in pts], where="post", label="device used")
        if any(p[2] for p in pts):
            ax.step([p[0] - t0 for p in pts], [p[2] / 1e6 for p in pts], where="post", label="host used")
        ax.axhline(budgets[rid] / 1e6, color="red", linestyle="--", label="budget")
        ax.set_xlabel("seconds")
        ax.set_ylabel("MB")
        ax.set_title(f"replica {rid[:8]}: memory timeline")
        ax.legend(loc="upper left")
        fig.tight_layout()
        rel = f"memory-timeline-{rid[:8]}.png"
        fig.savefig(out.root / rel, dpi=100)
        plt.close(fig)
        paths.append(out.wrote(rel))
    return paths


def post_generate(client: Any, body: dict[str, Any], *, sleep: Any = time.sleep) -> dict[str, Any]:
    """POST ``body`` to /v1/generate with ``client`` (an httpx.Client): the app's JSON answer
    when 200, else ``{"checkpoint", "error"}`` naming the status and code. A 503 with
    Retry-After is retried twice (waiting at most 5 s), as a client should; an answer that
    is not the app's JSON (Serve's proxy answers some in plain text) or a transport error is
    an error row too, not an exception that ends the demo."""
    import httpx

    for attempt in range(3):
        try:
            resp = client.post("/v1/generate", json=body)
        except httpx.HTTPError as exc:
            return {"checkpoint": body["checkpoint"], "error": f"{type(exc).__name__}: {exc}"}
        retry_after = resp.headers.get("retry-after")
        if resp.status_code != 503 or retry_after is None or attempt == 2:
            break
        sleep(min(float(retry_after) if retry_after.isdigit() else 1.0, 5.0))
    try:
        data = resp.json()
    except ValueError:
        data = None
    if resp.status_code == 200 and isinstance(data, dict):
        return data
    code = ((data.get("error") or {}).get("code") if isinstance(data, dict) else None) or \
        resp.text[:80].strip() or "no body"
    return {"checkpoint": body["checkpoint"], "error": f"{resp.status_code} {code}"}


def run_demo(*, out_dir: str, n_requests: int, config_path: Path | None = None, concurrency: int = 4) -> int:
    config_path = find_config(config_path)  # before anything starts
    import httpx
    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.demo import ensure_demo_checkpoints

    out = DemoOutput(out_dir)
    say("building the demo checkpoints (first run only) ...")
    paths = ensure_demo_checkpoints()
    for name, p in paths.items():
        size = sum(f.stat().st_size for f in p.rglob("*.safetensors"))
        say(f"  {name:<8} {size / 1e6:7.1f} MB of safetensors")
    doc, args = load_app_args(config_path)
    port = free_port()
    say(f"starting Ray and Serve (HTTP on 127.0.0.1:{port}) ...")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    base = f"http://127.0.0.1:{port}"
    samples: dict[str, list[tuple[float, int, int]]] = {}
    budgets: dict[str, int] = {}
    stop = threading.Event()
    try:
        serve.run(build_app(args), name="memrouter", route_prefix="/")
        say("application running; sending the workload")
        with httpx.Client(base_url=base, timeout=180) as client:
            def poll() -> None:
                while not stop.wait(0.25):
                    try:
                        for r in client.get("/v1/status").json()["replicas"]:
                            samples.setdefault(r["replica_id"], []).append(
                                (r["timestamp_s"], r["device_used_bytes"], r["host_used_bytes"]))
                            budgets[r["replica_id"]] = r["device_budget_bytes"]
                    except Exception:  # noqa: BLE001 - sampling is best effort
                        pass

            poller = threading.Thread(target=poll, daemon=True)
            poller.start()
            results: list[dict[str, Any]] = []

            def send(item: tuple[int, dict[str, Any]]) -> dict[str, Any]:
                i, body = item
                data = post_generate(client, body)
                if "error" in data:
                    return data
                for k, img in enumerate(data["images"]):
                    out.write_bytes(f"images/{i:03d}-{data['checkpoint']}-{k}.png", base64.b64decode(img))
                return data

            t_start = time.perf_counter()
            with ThreadPoolExecutor(concurrency) as pool:
                for i, r in enumerate(pool.map(send, enumerate(workload(n_requests)))):
                    print_row(i, r)
                    results.append(r)
            wall_s = time.perf_counter() - t_start
            time.sleep(1.5)  # one more report period, so the final reports include the last request
            stop.set()
            poller.join()
            status = client.get("/v1/status").json()
        ok = [r for r in results if "error" not in r]
        served = {k: sum(1 for r in ok if r["served_from"] == k) for k in ("device", "host", "disk")}
        say(f"{len(ok)}/{len(results)} requests answered 200 in {wall_s:.1f} s; served from {served}")
        for rep in status["replicas"]:
            c = rep["counters"]
            entries = ", ".join(f"{e['name']}:{e['tier']}:{e['bytes'] / 1e6:.1f}MB" for e in rep["entries"])
            say(f"replica {rep['replica_id'][:8]} [{rep['profile']}] used {rep['device_used_bytes'] / 1e6:.1f} of "
                f"{rep['device_budget_bytes'] / 1e6:.1f} MB; hits {c['hits']} disk loads {c['disk_loads']} "
                f"evictions {c['evictions']} releases {c['releases']} leaked {rep['leaked_modules']}; [{entries}]")
        out.write_text("final_status.json", json.dumps(status, indent=2))
        for p in plot_timelines(samples, budgets, out):
            say(f"wrote {p}")
        say(f"images in {out.root / 'images'}")
        return 0 if len(ok) == len(results) else 1
    finally:
        stop.set()
        serve.shutdown()
        ray.shutdown()
        say("shut down")


def run_local_demo(*, out_dir: str, n_requests: int, config_path: Path | None = None) -> int:
    """The replica's cache and pipelines in this process, no Ray: one replica, sequential."""
    config_path = find_config(config_path)
    from deployments.replica import ModelReplica
    from router.api import GenerateRequest, resolve_request

    out = DemoOutput(out_dir)
    _, args = load_app_args(config_path)
    say("building the demo checkpoints (first run only) and starting one local replica ...")
    replica = ModelReplica(args)
    failures = 0
    try:
        for i, body in enumerate(workload(n_requests)):
            spec = replica._registry.get(body["checkpoint"])
            resolved = resolve_request(GenerateRequest(**body), spec, default_seed=0)
            t0 = time.perf_counter()
            r = replica._generate_sync(resolved.model_dump())
            if r["status"] != 200:
                failures += 1
                print_row(i, {"checkpoint": body["checkpoint"], "error": r["error"]["code"]})
                continue
            r["timings_ms"]["total"] = (time.perf_counter() - t0) * 1000
            print_row(i, r)
            out.write_bytes(f"images/{i:03d}-{r['checkpoint']}.png", base64.b64decode(r["images"][0]))
        rep = replica.memory_report()
        say(f"final: used {rep['device_used_bytes'] / 1e6:.1f} of {rep['device_budget_bytes'] / 1e6:.1f} MB; "
            f"counters {rep['counters']}; leaked modules {rep['leaked_modules']}")
        return 0 if failures == 0 else 1
    finally:
        replica.shutdown()
