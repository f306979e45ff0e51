"""Shared test fixtures. Tests never touch the network and write only to temp folders
and to ``test-artifacts/`` (git-ignored), where executed notebooks are kept."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from helpers.paths import PROJECT_ROOT

ARTIFACTS = Path(os.environ.get("BRAINMRI_TEST_ARTIFACTS", PROJECT_ROOT / "test-artifacts"))


@pytest.fixture(scope="session")
def artifacts_dir() -> Path:
    """Folder kept after the run (executed notebooks, screenshots) for reading failures."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS
