"""Where the series keeps its files.

Every folder is found the same way, in this order (the nilearn convention):

1. an explicit argument,
2. an environment variable (``BRAINMRI_DATA``, ``BRAINMRI_OUTPUTS``, ``BRAINMRI_RUNS``),
3. a default folder inside the project checkout (``data/``, ``outputs/``, ``runs/``).

Example:
    >>> from helpers.paths import data_dir
    >>> data_dir("/tmp/my-data").name
    'my-data'
"""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parents[1]
"""The checkout that holds ``helpers/`` (an editable install points here)."""


def _resolve(explicit: str | os.PathLike | None, env_var: str, default: str) -> Path:
    if explicit is not None:
        return Path(explicit).expanduser().resolve()
    from_env = os.environ.get(env_var)
    if from_env:
        return Path(from_env).expanduser().resolve()
    return PROJECT_ROOT / default


def data_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder for datasets (the simulated cohort lives in ``data/simulated/``)."""
    return _resolve(path, "BRAINMRI_DATA", "data")


def outputs_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder for executed notebooks, HTML exports and figures."""
    return _resolve(path, "BRAINMRI_OUTPUTS", "outputs")


def runs_dir(path: str | os.PathLike | None = None) -> Path:
    """Folder for trained models: one sub-folder per run (checkpoint, history, metrics)."""
    return _resolve(path, "BRAINMRI_RUNS", "runs")


def notebooks_dir() -> Path:
    """The folder of numbered notebooks."""
    return PROJECT_ROOT / "notebooks"
