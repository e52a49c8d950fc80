"""The layering DESIGN.md asks for, checked from the code: the router layer imports nothing of
the application that deploys it, and the pure policy imports neither ray nor torch."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# Policy with sizes and a clock passed in: tested exactly with fakes, no cluster, no device.
PURE = ["router.registry", "router.profiles", "router.estimator", "router.placement", "router.fleet_index",
        "router.ledger", "router.settings", "router.api", "deployments.cache"]


def _imported_modules(path: Path) -> set[str]:
    """Every module an ``import`` or ``from ... import`` names in ``path``, at any depth
    (a function-level import counts: it runs too)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_the_import_scan_sees_function_level_imports(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("import os\ndef g():\n    from deployments.demo import x\n    import deployments.app as a\n")
    assert _imported_modules(f) == {"os", "deployments.demo", "deployments.app"}


@pytest.mark.parametrize("path", sorted((ROOT / "router").glob("*.py")), ids=lambda p: p.name)
def test_router_modules_import_nothing_of_deployments(path):
    upward = sorted(m for m in _imported_modules(path) if m == "deployments" or m.startswith("deployments."))
    assert upward == [], f"{path.name} imports {upward}: the router layer must not depend on the app that deploys it"


def test_pure_policy_modules_import_neither_ray_nor_torch():
    code = (f"import importlib, sys\nfor m in {PURE!r}: importlib.import_module(m)\n"
            "print(sorted(m for m in ('ray', 'torch', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
