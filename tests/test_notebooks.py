"""Execute every numbered notebook headlessly with the smoke profile.

Notebooks run in numeric order (later ones may reuse what earlier ones made), but
each one also makes or finds what it needs, so ``pytest -k 03_`` runs one alone.
Executed notebooks are kept in ``test-artifacts/notebooks/``; a failure names the
notebook, the cell and the error.
"""

from __future__ import annotations

import pytest

from helpers import series

NOTEBOOKS = series.list_notebooks()
CELL_TIMEOUT_S = 300


@pytest.mark.notebooks
@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.stem for p in NOTEBOOKS])
def test_notebook_runs_with_the_smoke_profile(path, artifacts_dir):
    out = artifacts_dir / "notebooks" / path.name
    try:
        series.execute(path, out, {"profile": "smoke"}, cell_timeout=CELL_TIMEOUT_S)
    except series.NotebookFailed as exc:
        pytest.fail(str(exc), pytrace=False)
    series.export_html(out)
