"""Shared fixtures. Component tests build real (tiny) diffusers checkpoints on disk."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The four demo checkpoints, built once per session into a temp dir: name -> folder."""
    from deployments.demo import ensure_demo_checkpoints

    return ensure_demo_checkpoints(tmp_path_factory.mktemp("demo-checkpoints"))


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Run the multi-node cluster test first. Started after other modules' Ray clusters in
    the same process, its head's dashboard did not answer within a minute in one full run
    (it passes on its own); a fresh process avoids whatever state they leave behind."""
    items.sort(key=lambda item: 0 if item.nodeid.startswith("tests/test_multinode.py") else 1)
