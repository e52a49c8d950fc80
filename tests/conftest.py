"""Shared fixtures. Component tests build real (tiny) diffusers checkpoints on disk."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four demo checkpoints, built once per session into a temp dir: name -> folder."""
    from deployments.demo import ensure_demo_checkpoints

    return ensure_demo_checkpoints(tmp_path_factory.mktemp("demo-checkpoints"))
