"""Offline checks of the KubeRay manifests in k8s/: no cluster, no Ray runtime, a few seconds.

What the KubeRay CRD schema (shared/kuberay/, beside the repository) cannot see is checked
here by hand: unknown keys, ``upgradeStrategy.type``, the ``serveConfigV2`` string (Ray's own
schema plus the app's ``AppConfig``), and the consistency between the Serve app and the pods
(GPUs, volume mounts, the admin token Secret, the production overrides vs serve_config.yaml).

Each check is a function returning a list of problems (empty: fine), so that the negative
tests can mutate a copy of a manifest and assert the check notices.
"""

from __future__ import annotations

import copy
import importlib
import json
import re
import shlex
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Any, Iterator

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
K8S = REPO / "k8s"
DOCS = REPO / "docs" / "kuberay.md"
BASE_SERVE_CONFIG = REPO / "serve_config.yaml"
# The CRD schemas live in the repository's sibling folder shared/ (CI clones beside it).
SCHEMA_DIR = Path(__file__).resolve().parents[2] / "shared" / "kuberay"
SCHEMA_FILES = {"RayService": "rayservice.v1.schema.json", "RayCluster": "raycluster.v1.schema.json"}

KNOWN_KINDS = {
    ("ray.io/v1", "RayService"),
    ("ray.io/v1", "RayCluster"),
    ("batch/v1", "Job"),
    ("v1", "PersistentVolumeClaim"),
    ("v1", "Secret"),
}
# The operator accepts these; the CRD schema has no enum for the field.
UPGRADE_TYPES = {"NewCluster", "NewClusterWithIncrementalUpgrade", "None"}
GPU = "nvidia.com/gpu"

# Flattened `args` keys (dotted) in which the production serveConfigV2 differs from
# serve_config.yaml. Exactly these must differ: a key listed here that no longer differs is a
# stale entry. Keep in sync with the comment above serveConfigV2 and docs/kuberay.md.
PRODUCTION_ARG_OVERRIDES = frozenset({
    "registry",
    "replica.num_gpus",
    "replica.profile",
    "replica.cpu_budget_bytes",
    "replica.profile_overrides",
})
# The same for the serve config outside `applications`.
PRODUCTION_TOP_OVERRIDES = frozenset({"http_options.host"})

# Kubernetes ObjectMeta fields (the CRD schema leaves top-level metadata untyped).
OBJECT_META_KEYS = frozenset({
    "name", "generateName", "namespace", "labels", "annotations", "finalizers", "ownerReferences",
    "uid", "resourceVersion", "generation", "creationTimestamp", "deletionTimestamp",
    "deletionGracePeriodSeconds", "managedFields", "selfLink",
})
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")


# ---- loading ---------------------------------------------------------------------------------
def load_docs(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


@lru_cache(maxsize=None)
def _all_manifests() -> tuple[tuple[str, dict], ...]:
    return tuple((p.name, doc) for p in sorted(K8S.glob("*.yaml")) for doc in load_docs(p))


def manifests(kind: str | None = None) -> list[tuple[str, dict]]:
    """(file name, a deep copy of the document) for every manifest in k8s/, of ``kind`` if given."""
    return [(f, copy.deepcopy(d)) for f, d in _all_manifests() if kind is None or d.get("kind") == kind]


def ray_manifests() -> list[tuple[str, dict]]:
    return [m for kind in SCHEMA_FILES for m in manifests(kind)]


def the_rayservice() -> dict:
    found = manifests("RayService")
    assert len(found) == 1, f"expected exactly one RayService in k8s/, found {len(found)}"
    return found[0][1]


@lru_cache(maxsize=None)
def _schema(kind: str) -> dict:
    path = SCHEMA_DIR / SCHEMA_FILES[kind]
    return json.loads(path.read_text())


def schema(kind: str) -> dict:
    if not SCHEMA_DIR.is_dir():
        pytest.skip(f"KubeRay CRD schemas not found: {SCHEMA_DIR} is absent (shared/ must sit beside the repository)")
    return _schema(kind)


def serve_config(manifest: dict) -> dict:
    return yaml.safe_load(manifest["spec"]["serveConfigV2"])


def base_serve_config() -> dict:
    return yaml.safe_load(BASE_SERVE_CONFIG.read_text())


# ---- walking a Ray cluster spec --------------------------------------------------------------
def cluster_spec(manifest: dict) -> dict:
    return manifest["spec"]["rayClusterConfig"] if manifest["kind"] == "RayService" else manifest["spec"]


def groups(manifest: dict) -> Iterator[tuple[str, dict]]:
    """("head", headGroupSpec), then ("worker <name>", spec) for each worker group."""
    spec = cluster_spec(manifest)
    yield "head", spec["headGroupSpec"]
    for g in spec.get("workerGroupSpecs") or []:
        yield f"worker {g.get('groupName')}", g


def pod_spec(group: dict) -> dict:
    return group["template"]["spec"]


def containers(pod: dict, *, init: bool = True) -> list[dict]:
    return list(pod.get("containers") or []) + (list(pod.get("initContainers") or []) if init else [])


def gpu_limit(group: dict) -> float:
    return sum(float((c.get("resources") or {}).get("limits", {}).get(GPU, 0)) for c in containers(pod_spec(group)))


def app_configs(manifest: dict) -> list[dict]:
    return serve_config(manifest).get("applications") or []


def _app_config_model():
    from deployments.config import AppConfig

    return AppConfig


def app_args(app: dict):
    """The app's args as a validated AppConfig (defaults filled in)."""
    return _app_config_model().model_validate(app.get("args") or {})


def replica_deployment_override(app: dict) -> dict | None:
    from deployments.app import REPLICA_DEPLOYMENT

    return next((d for d in app.get("deployments") or [] if d.get("name") == REPLICA_DEPLOYMENT), None)


# ---- schema checks ---------------------------------------------------------------------------
def schema_problems(manifest: dict, schema_: dict) -> list[str]:
    from jsonschema import Draft7Validator

    errors = sorted(Draft7Validator(schema_).iter_errors(manifest), key=lambda e: list(map(str, e.absolute_path)))
    return [f"{'.'.join(map(str, e.absolute_path)) or '(root)'}: {e.message}" for e in errors]


def unknown_keys(node: Any, schema_: dict, path: str = "") -> list[str]:
    """Keys of ``node`` that the structural schema does not define.

    Where a schema node gives ``properties``, every key must be one of them (the API server
    would silently prune the others); ``additionalProperties`` gives the schema of map
    values; ``x-kubernetes-preserve-unknown-fields`` lets unknown keys through; ``items`` is
    the schema of list elements; for ``anyOf``/``oneOf`` a value passes if one branch accepts it.
    """
    if not isinstance(schema_, dict):
        return []
    problems: list[str] = []
    for sub in schema_.get("allOf") or []:
        problems += unknown_keys(node, sub, path)
    branches = [b for b in (schema_.get("anyOf") or []) + (schema_.get("oneOf") or []) if isinstance(b, dict)]
    if branches:
        per_branch = [unknown_keys(node, b, path) for b in branches]
        if all(per_branch):
            problems += per_branch[0]
    if isinstance(node, dict):
        props = schema_.get("properties")
        extra = schema_.get("additionalProperties")
        preserve = schema_.get("x-kubernetes-preserve-unknown-fields") is True
        if props is None and not isinstance(extra, dict):
            return problems  # a free-form object: nothing to check against
        for key, value in node.items():
            where = f"{path}.{key}"
            if props is not None and key in props:
                problems += unknown_keys(value, props[key], where)
            elif isinstance(extra, dict):
                problems += unknown_keys(value, extra, where)
            elif not (preserve or extra is True):
                problems.append(f"{where}: unknown key (not in the schema's properties: {', '.join(sorted(props))})"
                                if len(props) <= 12 else f"{where}: unknown key (not in the schema's properties)")
    elif isinstance(node, list) and isinstance(schema_.get("items"), dict):
        for i, item in enumerate(node):
            problems += unknown_keys(item, schema_["items"], f"{path}[{i}]")
    return problems


def object_meta_problems(meta: Any, path: str = ".metadata") -> list[str]:
    """Top-level metadata, which the CRD schema leaves untyped: ObjectMeta keys, string maps, a name."""
    if not isinstance(meta, dict):
        return [f"{path}: must be a mapping"]
    problems = [f"{path}.{k}: unknown ObjectMeta key" for k in meta if k not in OBJECT_META_KEYS]
    if not DNS_SUBDOMAIN.match(str(meta.get("name", ""))):
        problems.append(f"{path}.name: missing or not a DNS-1123 subdomain: {meta.get('name')!r}")
    for field in ("labels", "annotations"):
        value = meta.get(field)
        if value is not None and not (isinstance(value, dict) and all(isinstance(v, str) for v in value.values())):
            problems.append(f"{path}.{field}: must map strings to strings")
    return problems


def upgrade_strategy_problems(manifest: dict) -> list[str]:
    if manifest["kind"] != "RayService":
        return []
    kind = (manifest["spec"].get("upgradeStrategy") or {}).get("type")
    return [] if kind in UPGRADE_TYPES else [f"spec.upgradeStrategy.type: {kind!r} is not one of {sorted(UPGRADE_TYPES)}"]


# ---- serveConfigV2 -----------------------------------------------------------------------------
def _model_keys(model) -> set[str]:
    keys = set()
    for name, field in model.model_fields.items():
        keys.add(name)
        for alias in (field.alias, field.validation_alias):
            if isinstance(alias, str):
                keys.add(alias)
    return keys


def _extra_keys(node: Any, model, path: str) -> list[str]:
    if not isinstance(node, dict):
        return []
    known = _model_keys(model)
    return [f"{path}.{k}: unknown key for {model.__name__}" for k in node if k not in known]


def serve_unknown_keys(cfg: dict) -> list[str]:
    """Ray's serve schema models ignore unknown keys (a typo is silently dropped); not here."""
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import (DeploymentSchema, HTTPOptionsSchema, RayActorOptionsSchema,
                                  ServeApplicationSchema, ServeDeploySchema)

    problems = _extra_keys(cfg, ServeDeploySchema, "serveConfigV2")
    problems += _extra_keys(cfg.get("http_options"), HTTPOptionsSchema, "serveConfigV2.http_options")
    for i, app in enumerate(cfg.get("applications") or []):
        where = f"serveConfigV2.applications[{i}]"
        problems += _extra_keys(app, ServeApplicationSchema, where)
        for j, dep in enumerate(app.get("deployments") or [] if isinstance(app, dict) else []):
            problems += _extra_keys(dep, DeploymentSchema, f"{where}.deployments[{j}]")
            if isinstance(dep, dict):
                problems += _extra_keys(dep.get("autoscaling_config"), AutoscalingConfig,
                                        f"{where}.deployments[{j}].autoscaling_config")
                problems += _extra_keys(dep.get("ray_actor_options"), RayActorOptionsSchema,
                                        f"{where}.deployments[{j}].ray_actor_options")
    return problems


def serve_schema_problems(cfg: dict) -> list[str]:
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    try:
        ServeDeploySchema.model_validate(cfg)
    except ValidationError as exc:
        return [f"serveConfigV2: {'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    return []


def app_problems(app: dict) -> list[str]:
    """import_path imports to a callable builder; args validate as AppConfig; deployments exist."""
    from pydantic import ValidationError

    from deployments.app import INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT

    problems = []
    name = app.get("name")
    module, _, attr = str(app.get("import_path", "")).partition(":")
    try:
        target = getattr(importlib.import_module(module), attr)
        if not callable(target):
            problems.append(f"app {name}: import_path {app.get('import_path')!r} is not callable")
    except (ImportError, AttributeError, ValueError) as exc:
        problems.append(f"app {name}: import_path {app.get('import_path')!r} does not import: {exc}")
    try:
        app_args(app)
    except ValidationError as exc:
        problems += [f"app {name}: args.{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()]
    for dep in app.get("deployments") or []:
        if dep.get("name") not in (INGRESS_DEPLOYMENT, REPLICA_DEPLOYMENT):
            problems.append(f"app {name}: deployments: {dep.get('name')!r} is not a deployment of the app "
                            f"({INGRESS_DEPLOYMENT}, {REPLICA_DEPLOYMENT})")
    return problems


# ---- consistency between the Serve app and the cluster ---------------------------------------
def gpu_problems(manifest: dict) -> list[str]:
    """ModelReplica's num_gpus equals each GPU worker group's GPU limit; the head has no GPU."""
    problems = []
    wanted = set()
    for app in app_configs(manifest):
        n = float(app_args(app).replica.num_gpus)
        wanted.add(n)
        override = (replica_deployment_override(app) or {}).get("ray_actor_options") or {}
        if "num_gpus" in override and float(override["num_gpus"]) != n:
            problems.append(f"app {app.get('name')}: deployments ModelReplica ray_actor_options.num_gpus "
                            f"{override['num_gpus']} != args.replica.num_gpus {n}")
    if len(wanted) > 1:
        problems.append(f"applications disagree on replica.num_gpus: {sorted(wanted)}")
    num_gpus = max(wanted, default=0.0)
    gpu_groups = 0
    for label, group in groups(manifest):
        limit = gpu_limit(group)
        start = (group.get("rayStartParams") or {}).get("num-gpus")
        if label == "head":
            if limit:
                problems.append(f"head: has a {GPU} limit ({limit}); the head must not take a GPU")
            if str(start) != "0":
                problems.append(f"head: rayStartParams num-gpus must be \"0\", got {start!r}")
            continue
        if not limit:
            continue  # a CPU-only worker group
        gpu_groups += 1
        if limit != num_gpus:
            problems.append(f"{label}: {GPU} limit {limit} != replica.num_gpus {num_gpus}")
        if start is not None and float(start) != limit:
            problems.append(f"{label}: rayStartParams num-gpus {start} != {GPU} limit {limit}")
        pod = pod_spec(group)
        for c in containers(pod):
            requested = (c.get("resources") or {}).get("requests", {}).get(GPU)
            if requested is not None and float(requested) != float(c["resources"]["limits"].get(GPU, 0)):
                problems.append(f"{label}: container {c.get('name')}: {GPU} request != limit")
        if not any(t.get("key") == GPU for t in pod.get("tolerations") or []):
            problems.append(f"{label}: no toleration for the {GPU} taint")
        if not (pod.get("nodeSelector") or pod.get("affinity")):
            problems.append(f"{label}: no nodeSelector or affinity to pick the GPU nodes")
    if num_gpus > 0 and gpu_groups == 0:
        problems.append(f"replica.num_gpus is {num_gpus} but no worker group has a {GPU} limit")
    return problems


def _read_only_mounts(pod: dict, container: dict) -> list[PurePosixPath]:
    """mountPaths of read-only mounts of a persistentVolumeClaim volume."""
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    out = []
    for m in container.get("volumeMounts") or []:
        volume = volumes.get(m.get("name")) or {}
        if m.get("readOnly") is True and "persistentVolumeClaim" in volume:
            out.append(PurePosixPath(m["mountPath"]))
    return out


def registry_paths(manifest: dict) -> list[PurePosixPath]:
    paths = []
    for app in app_configs(manifest):
        registry = app_args(app).registry
        entries = registry if isinstance(registry, list) else [{"path": registry}]
        paths += [PurePosixPath(str(e.get("path", ""))) for e in entries]
    return paths


def registry_mount_problems(manifest: dict) -> list[str]:
    """Every registry path lies under a read-only PVC mount of every head and worker container."""
    problems = []
    paths = registry_paths(manifest)
    for p in paths:
        if not p.is_absolute():
            problems.append(f"registry path {str(p)!r} is not absolute (the demo registry does not belong here)")
    for label, group in groups(manifest):
        pod = pod_spec(group)
        for c in containers(pod, init=False):
            mounts = _read_only_mounts(pod, c)
            for p in paths:
                if p.is_absolute() and not any(p == m or m in p.parents for m in mounts):
                    problems.append(f"{label}: container {c.get('name')}: registry path {p} is not under a "
                                    f"read-only volume mount (read-only PVC mounts: {[str(m) for m in mounts]})")
    return problems


def admin_token_env(manifest: dict) -> set[str]:
    return {app_args(app).ingress.admin_token_env for app in app_configs(manifest)}


def admin_token_problems(manifest: dict, secrets: dict[str, set[str]] | None = None) -> list[str]:
    """The admin token env var comes from a secretKeyRef in every Ray container.

    ``secrets`` (name -> keys), when given, must hold the referenced key.
    """
    problems = []
    for name in sorted(admin_token_env(manifest)):
        for label, group in groups(manifest):
            for c in containers(pod_spec(group), init=False):
                env = [e for e in c.get("env") or [] if e.get("name") == name]
                if len(env) != 1:
                    problems.append(f"{label}: container {c.get('name')}: env {name} set {len(env)} times, want 1")
                    continue
                if "value" in env[0]:
                    problems.append(f"{label}: container {c.get('name')}: env {name} has a literal value")
                ref = (env[0].get("valueFrom") or {}).get("secretKeyRef") or {}
                if not ref.get("name") or not ref.get("key"):
                    problems.append(f"{label}: container {c.get('name')}: env {name} is not from a secretKeyRef")
                elif secrets is not None and ref["key"] not in secrets.get(ref["name"], set()):
                    problems.append(f"{label}: container {c.get('name')}: env {name}: no Secret {ref['name']!r} "
                                    f"with key {ref['key']!r} in k8s/")
    return problems


def flatten(node: Any, prefix: str = "") -> dict[str, Any]:
    """Nested mappings to dotted keys; anything else (lists included) is a leaf."""
    if isinstance(node, dict) and node:
        out = {}
        for k, v in node.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: node}


def _diff_keys(a: dict, b: dict) -> set[str]:
    fa, fb = flatten(a), flatten(b)
    return {k for k in fa.keys() | fb.keys() if fa.get(k, ...) != fb.get(k, ...)}


def _covered(key: str, allowed: frozenset[str]) -> str | None:
    return next((o for o in allowed if key == o or key.startswith(o + ".")), None)


def _override_diff(changed: set[str], allowed: frozenset[str], where: str) -> list[str]:
    problems = [f"{where}: {k} differs from serve_config.yaml but is not a documented production override"
                for k in sorted(changed) if _covered(k, allowed) is None]
    used = {_covered(k, allowed) for k in changed}
    problems += [f"{where}: documented production override {o} does not differ from serve_config.yaml (stale)"
                 for o in sorted(allowed - used)]
    return problems


def override_problems(prod: dict, base: dict) -> list[str]:
    """serveConfigV2 == serve_config.yaml except for the documented production overrides."""
    problems = []
    top = lambda cfg: {k: v for k, v in cfg.items() if k != "applications"}  # noqa: E731
    problems += _override_diff(_diff_keys(top(prod), top(base)), PRODUCTION_TOP_OVERRIDES, "serveConfigV2")
    prod_apps = {a.get("name"): a for a in prod.get("applications") or []}
    base_apps = {a.get("name"): a for a in base.get("applications") or []}
    if list(prod_apps) != list(base_apps):
        problems.append(f"application names differ: {list(prod_apps)} vs serve_config.yaml {list(base_apps)}")
    for name in prod_apps.keys() & base_apps.keys():
        p, b = prod_apps[name], base_apps[name]
        for field in ("route_prefix", "import_path"):
            if p.get(field) != b.get(field):
                problems.append(f"app {name}: {field} {p.get(field)!r} != serve_config.yaml {b.get(field)!r}")
        others = (p.keys() | b.keys()) - {"args", "deployments", "name", "route_prefix", "import_path"}
        problems += [f"app {name}: {k} differs from serve_config.yaml" for k in sorted(others) if p.get(k) != b.get(k)]
        problems += _override_diff(_diff_keys(p.get("args") or {}, b.get("args") or {}),
                                   PRODUCTION_ARG_OVERRIDES, f"app {name}: args")
    return problems


def autoscaling_problems(manifest: dict) -> list[str]:
    """ModelReplica autoscales (num_replicas: auto + bounds) within the GPUs the groups can supply."""
    spec = cluster_spec(manifest)
    problems = [] if spec.get("enableInTreeAutoscaling") is True else ["enableInTreeAutoscaling must be true"]
    gpu_capacity = 0.0
    for label, group in groups(manifest):
        if label == "head":
            continue
        lo, n, hi = group.get("minReplicas", 0), group.get("replicas", group.get("minReplicas", 0)), group.get("maxReplicas")
        if hi is None or not lo <= n <= hi:
            problems.append(f"{label}: want minReplicas <= replicas <= maxReplicas, got {lo}, {n}, {hi}")
        gpu_capacity += (hi or 0) * gpu_limit(group)
    for app in app_configs(manifest):
        override = replica_deployment_override(app)
        if override is None:
            problems.append(f"app {app.get('name')}: no deployments entry for ModelReplica")
            continue
        if override.get("num_replicas") != "auto":
            problems.append(f"app {app.get('name')}: ModelReplica num_replicas must be 'auto' (it clears the "
                            f"num_replicas set in code), got {override.get('num_replicas')!r}")
        auto = override.get("autoscaling_config") or {}
        missing = {"min_replicas", "max_replicas", "target_ongoing_requests"} - auto.keys()
        if missing:
            problems.append(f"app {app.get('name')}: ModelReplica autoscaling_config lacks {sorted(missing)}")
            continue
        need = auto["max_replicas"] * float(app_args(app).replica.num_gpus)
        if need > gpu_capacity:
            problems.append(f"app {app.get('name')}: max_replicas {auto['max_replicas']} need {need} GPUs, "
                            f"the worker groups supply at most {gpu_capacity}")
    return problems


def _all_containers(manifest: dict) -> Iterator[tuple[str, dict, dict]]:
    """(label, container, pod spec) for every container of a Ray manifest, autoscaler included."""
    spec = cluster_spec(manifest)
    for label, group in groups(manifest):
        pod = pod_spec(group)
        for c in containers(pod):
            yield f"{label}: container {c.get('name')}", c, pod
    if spec.get("enableInTreeAutoscaling"):
        yield "autoscaler", spec.get("autoscalerOptions") or {}, pod_spec(spec["headGroupSpec"])


def resource_problems(label: str, container: dict) -> list[str]:
    res = container.get("resources") or {}
    return [f"{label}: resources.{kind}.{r} missing"
            for kind in ("requests", "limits") for r in ("cpu", "memory") if r not in (res.get(kind) or {})]


def security_problems(label: str, container: dict, pod: dict) -> list[str]:
    """Non-root, no privilege escalation, no capabilities, read-only root with a writable /tmp."""
    sc, psc = container.get("securityContext") or {}, pod.get("securityContext") or {}
    problems = []
    if not sc.get("runAsNonRoot", psc.get("runAsNonRoot")):
        problems.append(f"{label}: runAsNonRoot is not true")
    if not sc.get("runAsUser", psc.get("runAsUser")):
        problems.append(f"{label}: runAsUser unset or 0")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{label}: allowPrivilegeEscalation is not false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{label}: capabilities.drop lacks ALL")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{label}: readOnlyRootFilesystem is not true")
    else:
        empty_dirs = {v.get("name") for v in pod.get("volumes") or [] if "emptyDir" in v}
        if not any(m.get("mountPath") == "/tmp" and m.get("name") in empty_dirs for m in container.get("volumeMounts") or []):
            problems.append(f"{label}: read-only root filesystem without an emptyDir at /tmp")
    return problems


def dockerfile_ray_version() -> str | None:
    path = K8S / "Dockerfile"
    if not path.is_file():
        return None
    m = re.search(r"^ARG RAY_VERSION=(\S+)$", path.read_text(), re.M)
    return m.group(1) if m else ""


def image_problems(manifest: dict) -> list[str]:
    """One image for every Ray container; rayVersion matches k8s/Dockerfile's base image."""
    images = {c.get("image") for _, group in groups(manifest) for c in containers(pod_spec(group))}
    problems = [] if len(images) == 1 and None not in images else [f"Ray containers use several images: {images}"]
    version = dockerfile_ray_version()
    if version is not None and version != str(cluster_spec(manifest).get("rayVersion")):
        problems.append(f"rayVersion {cluster_spec(manifest).get('rayVersion')!r} != k8s/Dockerfile RAY_VERSION {version!r}")
    return problems


# ---- the other manifests ----------------------------------------------------------------------
def secrets_in_k8s() -> dict[str, set[str]]:
    return {d["metadata"]["name"]: set(d.get("stringData") or {}) | set(d.get("data") or {})
            for _, d in manifests("Secret")}


def pvc_names() -> set[str]:
    return {d["metadata"]["name"] for _, d in manifests("PersistentVolumeClaim")}


def secret_problems(secret: dict) -> list[str]:
    problems = object_meta_problems(secret.get("metadata"))
    if secret.get("type", "Opaque") != "Opaque":
        problems.append(f"Secret {secret['metadata'].get('name')}: type must be Opaque")
    values = {**(secret.get("stringData") or {}), **(secret.get("data") or {})}
    if not values:
        problems.append(f"Secret {secret['metadata'].get('name')}: no stringData/data")
    # An example file: every value must be an obvious placeholder, never a real token.
    problems += [f"Secret {secret['metadata'].get('name')}: {k} is not a REPLACE-ME placeholder"
                 for k, v in values.items() if "REPLACE-ME" not in str(v)]
    return problems


def pvc_problems(pvc: dict) -> list[str]:
    problems = object_meta_problems(pvc.get("metadata"))
    spec = pvc.get("spec") or {}
    modes = spec.get("accessModes") or []
    if not modes or not set(modes) <= {"ReadWriteMany", "ReadOnlyMany"}:
        problems.append(f"PVC: accessModes {modes} must be ReadWriteMany/ReadOnlyMany (pods on several nodes)")
    if not ((spec.get("resources") or {}).get("requests") or {}).get("storage"):
        problems.append("PVC: spec.resources.requests.storage missing")
    return problems


DOWNLOAD = re.compile(r"huggingface-cli download\b")


def fill_job_targets(job: dict) -> tuple[set[str], list[str]]:
    """The /models/<name> folders the Job downloads into, and the script's problems."""
    c = job["spec"]["template"]["spec"]["containers"][0]
    script = "\n".join(c.get("command") or []) + "\n" + "\n".join(c.get("args") or [])
    problems = []
    if not DOWNLOAD.search(script):
        problems.append("Job: no `huggingface-cli download`")
    tokens = shlex.split(script.replace("\\\n", " "), comments=True)
    for i, tok in enumerate(tokens):
        if tok == "--include":
            patterns = []
            for t in tokens[i + 1:]:
                if t.startswith("-") or "$" in t or t in ("}", ";", "&&", "||", "|"):
                    break  # the next option, a shell variable or the end of the command
                patterns.append(t)
            if not any(p.endswith(".safetensors") for p in patterns):
                problems.append(f"Job: --include {patterns} takes no safetensors")
            bad = [p for p in patterns if re.search(r"\.(bin|ckpt|pt|pth|pkl)$|^\*$|\*\.\*$", p)]
            if bad:
                problems.append(f"Job: --include {bad} may fetch pickle weights")
    if "--include" not in tokens:
        problems.append("Job: downloads without --include (would fetch every file, pickles included)")
    # `fetch <repo> <folder>` calls of the script's helper, and any literal --local-dir.
    targets = {f"/models/{m}" for m in re.findall(r"^\s*fetch\s+\S+/\S+\s+(\S+)", script, re.M)}
    targets |= {m for m in re.findall(r"--local-dir\s+\"?(/models/[^\s\"$]+)", script)}
    return targets, problems


def job_problems(job: dict, claims: set[str], needed: list[PurePosixPath]) -> list[str]:
    problems = object_meta_problems(job.get("metadata"))
    tpl = (job.get("spec") or {}).get("template") or {}
    pod = tpl.get("spec") or {}
    if tpl.get("metadata") is not None:
        problems += [p for p in object_meta_problems({"name": "x", **tpl["metadata"]}, ".spec.template.metadata")]
    if pod.get("restartPolicy") not in ("Never", "OnFailure"):
        problems.append("Job: restartPolicy must be Never or OnFailure")
    cs = containers(pod)
    if not cs or not all(c.get("name") and c.get("image") for c in cs):
        problems.append("Job: containers need a name and an image")
        return problems
    for c in cs:
        problems += resource_problems(f"Job container {c['name']}", c)
        problems += security_problems(f"Job container {c['name']}", c, pod)
    volumes = {v.get("name"): v for v in pod.get("volumes") or []}
    rw = [m for m in cs[0].get("volumeMounts") or []
          if "persistentVolumeClaim" in volumes.get(m.get("name"), {}) and not m.get("readOnly")]
    if not rw:
        problems.append("Job: the models PVC is not mounted read-write")
    for m in rw:
        claim = volumes[m["name"]]["persistentVolumeClaim"]
        if claim.get("claimName") not in claims or claim.get("readOnly"):
            problems.append(f"Job: volume {m['name']} must be a writable mount of a PVC defined in k8s/ ({sorted(claims)})")
    env = {e.get("name"): e for e in cs[0].get("env") or []}
    if not ((env.get("HF_TOKEN") or {}).get("valueFrom") or {}).get("secretKeyRef"):
        problems.append("Job: HF_TOKEN must come from a secretKeyRef")
    targets, script_problems = fill_job_targets(job)
    problems += script_problems
    for p in needed:
        if not any(p == PurePosixPath(t) or PurePosixPath(t) in p.parents for t in targets):
            problems.append(f"Job: registry path {p} is not downloaded (Job targets: {sorted(targets)})")
    return problems


# =============================================================================================
# tests
# =============================================================================================
def test_every_manifest_has_a_known_kind_and_metadata():
    found = manifests()
    assert found, "no manifests in k8s/"
    problems = []
    for f, doc in found:
        if (doc.get("apiVersion"), doc.get("kind")) not in KNOWN_KINDS:
            problems.append(f"{f}: unchecked apiVersion/kind {doc.get('apiVersion')}/{doc.get('kind')}")
        problems += [f"{f}: {p}" for p in object_meta_problems(doc.get("metadata"))]
    assert not problems, "\n".join(problems)
    assert {d["kind"] for _, d in found} >= {"RayService", "Job", "PersistentVolumeClaim", "Secret"}


@pytest.mark.parametrize("file,manifest", ray_manifests(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_manifest_validates_against_crd_schema(file, manifest):
    problems = schema_problems(manifest, schema(manifest["kind"]))
    assert not problems, f"{file}:\n" + "\n".join(problems)


def test_schema_validation_reports_wrong_types():
    manifest = the_rayservice()
    cluster_spec(manifest)["enableInTreeAutoscaling"] = "yes"
    cluster_spec(manifest)["workerGroupSpecs"][0]["minReplicas"] = "1"
    cluster_spec(manifest)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]["memory"] = "48 GiB"
    del cluster_spec(manifest)["workerGroupSpecs"][1]["groupName"]
    problems = schema_problems(manifest, schema("RayService"))
    assert len(problems) == 4, problems


@pytest.mark.parametrize("file,manifest", ray_manifests(), ids=lambda x: x if isinstance(x, str) else "")
def test_ray_manifest_has_no_unknown_keys(file, manifest):
    problems = unknown_keys(manifest, schema(manifest["kind"])) + object_meta_problems(manifest.get("metadata"))
    assert not problems, f"{file}:\n" + "\n".join(problems)


@pytest.mark.parametrize("mutate,expected", [
    (lambda m: m["spec"]["rayClusterConfig"].__setitem__("workerGroupSpec", m["spec"]["rayClusterConfig"].pop("workerGroupSpecs")),
     ".spec.rayClusterConfig.workerGroupSpec"),
    (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"].__setitem__(
        "rayStartParam", m["spec"]["rayClusterConfig"]["headGroupSpec"].pop("rayStartParams")),
     ".spec.rayClusterConfig.headGroupSpec.rayStartParam"),
    (lambda m: m["spec"]["rayClusterConfig"]["workerGroupSpecs"][1]["template"]["spec"]["containers"][0].__setitem__(
        "volumeMount", []),
     ".spec.rayClusterConfig.workerGroupSpecs[1].template.spec.containers[0].volumeMount"),
    (lambda m: m["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["metadata"].__setitem__("label", {}),
     ".spec.rayClusterConfig.headGroupSpec.template.metadata.label"),
    (lambda m: m["metadata"].__setitem__("label", {}), ".metadata.label"),
])
def test_unknown_key_walk_reports_misspelled_keys(mutate, expected):
    manifest = copy.deepcopy(the_rayservice())
    mutate(manifest)
    problems = unknown_keys(manifest, schema("RayService")) + object_meta_problems(manifest["metadata"])
    assert any(p.startswith(expected + ":") for p in problems), problems
    assert schema_problems(manifest, schema("RayService")) == []  # the schema alone accepts the typo


def test_unknown_key_walk_handles_maps_lists_and_preserved_fields():
    s = {"type": "object", "properties": {
        "m": {"type": "object", "additionalProperties": {"type": "object", "properties": {"a": {}}}},
        "l": {"type": "array", "items": {"type": "object", "properties": {"b": {}}}},
        "p": {"type": "object", "x-kubernetes-preserve-unknown-fields": True, "properties": {"c": {"properties": {"d": {}}}}},
        "free": {"type": "object"},
    }}
    ok = {"m": {"any": {"a": 1}}, "l": [{"b": 1}], "p": {"whatever": 1, "c": {"d": 1}}, "free": {"x": {"y": 1}}}
    assert unknown_keys(ok, s) == []
    bad = {"m": {"any": {"z": 1}}, "l": [{"b": 1}, {"q": 1}], "p": {"c": {"e": 1}}, "nope": 1}
    assert sorted(p.split(":")[0] for p in unknown_keys(bad, s)) == [".l[1].q", ".m.any.z", ".nope", ".p.c.e"]


def test_upgrade_strategy_type_is_valid():
    for file, manifest in manifests("RayService"):
        assert not upgrade_strategy_problems(manifest), file
    bad = the_rayservice()
    bad["spec"]["upgradeStrategy"]["type"] = "Recreate"
    assert upgrade_strategy_problems(bad)


def test_serve_config_v2_validates_with_ray_serve_schema():
    for file, manifest in manifests("RayService"):
        cfg = serve_config(manifest)
        problems = serve_schema_problems(cfg) + serve_unknown_keys(cfg)
        assert not problems, f"{file}:\n" + "\n".join(problems)


def test_serve_unknown_keys_catch_what_ray_ignores():
    cfg = serve_config(the_rayservice())
    dep = replica_deployment_override(cfg["applications"][0])
    dep["autoscaling_config"]["max_replica"] = dep["autoscaling_config"].pop("max_replicas")
    cfg["applications"][0]["route_prefx"] = "/"
    assert serve_schema_problems(cfg) == []  # Ray drops both typos silently ...
    problems = serve_unknown_keys(cfg)  # ... this does not
    assert any("autoscaling_config.max_replica:" in p for p in problems), problems
    assert any("route_prefx:" in p for p in problems), problems


def test_num_replicas_int_with_autoscaling_is_rejected_by_ray():
    # Why the manifest says `num_replicas: auto`: an int next to autoscaling_config is an error.
    cfg = serve_config(the_rayservice())
    replica_deployment_override(cfg["applications"][0])["num_replicas"] = 2
    assert any("num_replicas" in p for p in serve_schema_problems(cfg))


def test_applications_import_and_args_validate():
    for file, manifest in manifests("RayService"):
        for app in app_configs(manifest):
            problems = app_problems(app)
            assert not problems, f"{file}:\n" + "\n".join(problems)
    bad = app_configs(the_rayservice())[0]
    bad["args"]["replica"]["num_gpu"] = 1
    bad["import_path"] = "deployments.app:nope"
    bad["deployments"][0]["name"] = "Replica"
    problems = app_problems(bad)
    assert len(problems) == 3, problems


def test_production_args_build_the_application(monkeypatch):
    import ray._private.auto_init_hook as auto_init
    from ray.serve import Application

    from deployments.app import app as builder

    monkeypatch.setattr(auto_init, "enable_auto_connect", False, raising=False)  # never start Ray here
    for app in app_configs(the_rayservice()):
        assert isinstance(builder(app["args"]), Application)


def test_serve_merges_the_deployments_section_as_intended(monkeypatch):
    """Replays Serve's merge of the config's `deployments:` over the options set in code.

    Evidence for `num_replicas: auto`: Serve's override_deployment_info() sets num_replicas
    to None for "auto" and builds the autoscaling config from the defaults plus the given
    fields; without it the code's num_replicas=2 would stay beside autoscaling_config. The
    request router configured in code must survive the merge.
    """
    try:
        from ray.serve._private.application_state import override_deployment_info
        from ray.serve._private.build_app import build_app
        from ray.serve._private.deployment_info import DeploymentInfo
    except ImportError as exc:  # private API: moved in another Ray version
        pytest.skip(f"Ray's private merge API is not importable here: {exc}")
    import ray._private.auto_init_hook as auto_init
    from ray.serve.schema import ServeDeploySchema

    from deployments.app import REPLICA_DEPLOYMENT, REQUEST_ROUTER_CLASS
    from deployments.app import app as builder

    monkeypatch.setattr(auto_init, "enable_auto_connect", False, raising=False)  # never start Ray here
    cfg = serve_config(the_rayservice())
    app_cfg = ServeDeploySchema.model_validate(cfg).applications[0]
    args = cfg["applications"][0]["args"]
    built = build_app(builder(args), name=app_cfg.name, default_runtime_env={})
    replica = next(d for d in built.deployments if d.name == REPLICA_DEPLOYMENT)
    assert replica._deployment_config.num_replicas == args["replica"]["num_replicas"]  # set in code
    info = DeploymentInfo(deployment_config=replica._deployment_config, replica_config=replica._replica_config,
                          start_time_ms=0, deployer_job_id="offline")
    merged = override_deployment_info({REPLICA_DEPLOYMENT: info}, app_cfg)[REPLICA_DEPLOYMENT]
    dc = merged.deployment_config
    wanted = replica_deployment_override(cfg["applications"][0])["autoscaling_config"]
    assert dc.num_replicas is None
    assert dc.autoscaling_config is not None
    assert (dc.autoscaling_config.min_replicas, dc.autoscaling_config.max_replicas,
            dc.autoscaling_config.target_ongoing_requests) == (
        wanted["min_replicas"], wanted["max_replicas"], wanted["target_ongoing_requests"])
    assert dc.request_router_config.request_router_class == REQUEST_ROUTER_CLASS
    assert dc.max_ongoing_requests == args["replica"]["max_ongoing_requests"]
    assert merged.replica_config.ray_actor_options["num_gpus"] == args["replica"]["num_gpus"]


def test_gpu_counts_agree():
    manifest = the_rayservice()
    assert gpu_problems(manifest) == []
    bad = copy.deepcopy(manifest)
    cfg = serve_config(bad)
    cfg["applications"][0]["args"]["replica"]["num_gpus"] = 2
    bad["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert any("!= replica.num_gpus 2.0" in p for p in gpu_problems(bad))
    bad = copy.deepcopy(manifest)
    cluster_spec(bad)["workerGroupSpecs"][0]["template"]["spec"]["tolerations"] = []
    cluster_spec(bad)["headGroupSpec"]["rayStartParams"].pop("num-gpus")
    assert len(gpu_problems(bad)) == 2, gpu_problems(bad)


def test_registry_paths_are_on_read_only_mounts():
    manifest = the_rayservice()
    assert registry_paths(manifest), "the production registry is empty"
    assert registry_mount_problems(manifest) == []
    bad = copy.deepcopy(manifest)
    cluster_spec(bad)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["volumeMounts"][0]["readOnly"] = False
    assert any(p.startswith("worker gpu-t4:") for p in registry_mount_problems(bad))
    bad = copy.deepcopy(manifest)
    cluster_spec(bad)["headGroupSpec"]["template"]["spec"]["containers"][0]["volumeMounts"] = []
    assert any(p.startswith("head:") for p in registry_mount_problems(bad))
    bad = copy.deepcopy(manifest)
    cfg = serve_config(bad)
    cfg["applications"][0]["args"]["registry"][0]["path"] = "/elsewhere/sd15"
    bad["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert len(registry_mount_problems(bad)) == 3  # head + two worker groups


def test_admin_token_comes_from_a_secret():
    manifest = the_rayservice()
    assert admin_token_problems(manifest, secrets_in_k8s()) == []
    bad = copy.deepcopy(manifest)
    env = cluster_spec(bad)["workerGroupSpecs"][1]["template"]["spec"]["containers"][0]["env"]
    env[0] = {"name": env[0]["name"], "value": "hunter2"}
    assert any("not from a secretKeyRef" in p for p in admin_token_problems(bad))
    bad = copy.deepcopy(manifest)
    cfg = serve_config(bad)
    cfg["applications"][0]["args"]["ingress"]["admin_token_env"] = "OTHER_TOKEN"
    bad["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    assert len(admin_token_problems(bad)) == 3
    assert admin_token_problems(manifest, {"memrouter-admin": {"other"}})


def test_serve_config_v2_is_serve_config_yaml_plus_documented_overrides():
    assert override_problems(serve_config(the_rayservice()), base_serve_config()) == []


def test_override_check_fails_on_undocumented_or_stale_overrides():
    prod, base = serve_config(the_rayservice()), base_serve_config()
    changed = copy.deepcopy(prod)
    changed["applications"][0]["args"]["ingress"]["request_timeout_s"] = 999
    changed["applications"][0]["import_path"] = "deployments.other:app"
    changed["proxy_location"] = "HeadOnly"
    problems = override_problems(changed, base)
    assert any("ingress.request_timeout_s differs" in p for p in problems), problems
    assert any("import_path" in p for p in problems), problems
    assert any("proxy_location differs" in p for p in problems), problems
    stale = copy.deepcopy(prod)
    stale["applications"][0]["args"]["replica"]["profile"] = base["applications"][0]["args"]["replica"]["profile"]
    assert any("replica.profile does not differ" in p for p in override_problems(stale, base))


def test_production_overrides_are_documented():
    comments = "\n".join(line for line in (K8S / "rayservice.yaml").read_text().splitlines() if line.lstrip().startswith("#"))
    docs = DOCS.read_text()
    for key in sorted(PRODUCTION_ARG_OVERRIDES | PRODUCTION_TOP_OVERRIDES):
        assert re.search(rf"#\s+{re.escape(key)}\s", comments), f"{key} missing from the comment in k8s/rayservice.yaml"
        assert f"`{key}`" in docs, f"{key} missing from docs/kuberay.md"


def test_autoscaling_is_configured_within_capacity():
    manifest = the_rayservice()
    assert autoscaling_problems(manifest) == []
    bad = copy.deepcopy(manifest)
    cfg = serve_config(bad)
    dep = replica_deployment_override(cfg["applications"][0])
    dep["autoscaling_config"]["max_replicas"] = 100
    dep.pop("num_replicas")
    bad["spec"]["serveConfigV2"] = yaml.safe_dump(cfg)
    cluster_spec(bad)["enableInTreeAutoscaling"] = False
    assert len(autoscaling_problems(bad)) == 3, autoscaling_problems(bad)


def test_every_container_has_requests_limits_and_a_locked_down_security_context():
    problems = []
    for file, manifest in ray_manifests():
        for label, c, pod in _all_containers(manifest):
            problems += [f"{file}: {p}" for p in resource_problems(label, c) + security_problems(label, c, pod)]
    assert not problems, "\n".join(problems)
    manifest = the_rayservice()
    c = cluster_spec(manifest)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    del c["resources"]["limits"]["memory"]
    c["securityContext"]["capabilities"]["drop"] = []
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]
    pod = cluster_spec(manifest)["workerGroupSpecs"][0]["template"]["spec"]
    assert len(resource_problems("w", c) + security_problems("w", c, pod)) == 3


def test_one_image_and_ray_version_matches_dockerfile():
    for file, manifest in ray_manifests():
        assert image_problems(manifest) == [], file
    bad = the_rayservice()
    cluster_spec(bad)["rayVersion"] = "0.0.1"
    cluster_spec(bad)["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["image"] = "other:1"
    assert len(image_problems(bad)) == (2 if dockerfile_ray_version() is not None else 1)


def test_volume_claims_exist():
    claims = pvc_names()
    for file, manifest in ray_manifests():
        for label, group in groups(manifest):
            for v in pod_spec(group).get("volumes") or []:
                if "persistentVolumeClaim" in v:
                    assert v["persistentVolumeClaim"]["claimName"] in claims, f"{file}: {label}: unknown PVC"


def test_secret_manifests():
    found = manifests("Secret")
    assert found
    for file, secret in found:
        assert secret["apiVersion"] == "v1"
        assert not secret_problems(secret), (file, secret_problems(secret))
    leaked = copy.deepcopy(found[0][1])
    leaked["stringData"] = {"token": "s3cr3t"}
    assert secret_problems(leaked)


def test_pvc_manifest():
    found = manifests("PersistentVolumeClaim")
    assert len(found) == 1
    assert pvc_problems(found[0][1]) == []
    bad = copy.deepcopy(found[0][1])
    bad["spec"]["accessModes"] = ["ReadWriteOnce"]
    assert pvc_problems(bad)


def test_fill_models_job():
    found = manifests("Job")
    assert len(found) == 1
    job = found[0][1]
    needed = registry_paths(the_rayservice())
    assert job_problems(job, pvc_names(), needed) == []
    hf_ref = job["spec"]["template"]["spec"]["containers"][0]["env"][0]["valueFrom"]["secretKeyRef"]
    assert hf_ref["key"] in secrets_in_k8s().get(hf_ref["name"], set())
    bad = copy.deepcopy(job)
    c = bad["spec"]["template"]["spec"]["containers"][0]
    c["volumeMounts"][0]["readOnly"] = True
    c["args"] = [c["args"][0].replace('"*/*.safetensors"', '"*.bin"')]
    problems = job_problems(bad, pvc_names(), needed + [PurePosixPath("/models/not-downloaded")])
    assert any("read-write" in p for p in problems), problems
    assert any("pickle" in p for p in problems), problems
    assert any("/models/not-downloaded" in p for p in problems), problems
