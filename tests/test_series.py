"""House rules for the committed notebooks (the hygiene test) and the series runner."""

from __future__ import annotations

import asyncio
import copy
import json
import re
from pathlib import Path
from queue import Empty

import pytest

from helpers import series
from helpers.paths import PROJECT_ROOT

NOTEBOOKS = series.list_notebooks()
BAD_FIXTURE = PROJECT_ROOT / "tests" / "fixtures" / "99_bad_notebook.ipynb"


def test_the_series_has_notebooks_in_order():
    assert NOTEBOOKS, "no notebooks/NN_*.ipynb found"
    numbers = [int(p.name[:2]) for p in NOTEBOOKS]
    assert numbers == sorted(numbers) and numbers[0] == 0


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
def test_committed_notebook_follows_the_house_rules(path):
    problems = series.lint_notebook(path)
    assert not problems, f"{path.name}:\n  " + "\n  ".join(problems)


def test_the_bad_fixture_fails_on_every_rule_it_breaks():
    problems = "\n".join(series.lint_notebook(BAD_FIXTURE))
    for expected in ("has no id", "carries outputs", "execution count", "names a device",
                     "edits sys.path", "markdown title cell", "exactly one cell tagged 'parameters'",
                     "Summary", "Exercises", "last cell must be markdown"):
        assert expected in problems, f"hygiene check missed: {expected}\n{problems}"


def _good() -> dict:
    return json.loads((PROJECT_ROOT / "notebooks" / "00_setup.ipynb").read_text(encoding="utf-8"))


def _lint(tmp_path: Path, nb: dict, name: str = "00_setup.ipynb") -> list[str]:
    path = tmp_path / name
    path.write_text(json.dumps(nb), encoding="utf-8")
    return series.lint_notebook(path)


def _first_code(nb: dict) -> dict:
    return next(c for c in nb["cells"] if c["cell_type"] == "code")


BREAKAGES = {
    "outputs": (lambda nb: _first_code(nb).update(outputs=[{"output_type": "stream", "name": "stdout", "text": "x"}]), "carries outputs"),
    "count": (lambda nb: _first_code(nb).update(execution_count=1), "execution count"),
    "no id": (lambda nb: nb["cells"][1].pop("id"), "has no id"),
    "device": (lambda nb: _first_code(nb).update(source="model.cuda()"), "names a device"),
    "syspath": (lambda nb: _first_code(nb).update(source="import sys\nsys.path.append('..')"), "edits sys.path"),
    "long cell": (lambda nb: _first_code(nb).update(source="x = 1\n" * 60), "lines; move long code"),
    "no goals": (lambda nb: nb["cells"][0].update(source="# Title\n\nPrerequisites: none. Runtime smoke workshop full."), "learning goals"),
    "no runtime": (lambda nb: nb["cells"][0].update(source="# T\n\nWhat you will learn: x. Prerequisites: none."), "runtime"),
    "two params": (lambda nb: _first_code(nb).setdefault("metadata", {}).update(tags=["parameters"]), "exactly one cell"),
    "no summary": (lambda nb: nb["cells"][-1].update(source="## Exercises\n\n1. Try it."), "Summary"),
    "no exercises": (lambda nb: nb["cells"][-1].update(source="## Summary\n\nDone."), "Exercises"),
}


@pytest.mark.parametrize("breakage", BREAKAGES, ids=list(BREAKAGES))
def test_each_rule_catches_its_breakage(tmp_path, breakage):
    assert _lint(tmp_path, _good()) == [], "the reference notebook must pass first"
    nb = copy.deepcopy(_good())
    mutate, message = BREAKAGES[breakage]
    mutate(nb)
    problems = _lint(tmp_path, nb)
    assert any(message in p for p in problems), f"{breakage}: {problems}"


def test_bad_file_names_are_reported(tmp_path):
    assert any("NN_topic" in p for p in _lint(tmp_path, _good(), name="Setup Notebook.ipynb"))


def test_series_map_reads_titles_and_summaries():
    first = series.series_map()[0]
    assert first.number == 0 and first.title and len(first.summary) > 20


def test_sliced_wait_returns_a_late_reply_and_still_honours_the_deadline(monkeypatch):
    monkeypatch.setattr(series, "REPLY_SLICE_S", 0.01)
    calls = []

    async def get_msg(timeout=None):
        calls.append(timeout)
        if len(calls) < 4:
            raise Empty
        return {"ok": True}

    assert asyncio.run(series._sliced(get_msg)(timeout=5)) == {"ok": True}
    assert len(calls) == 4 and max(calls) <= 0.01

    async def never(timeout=None):
        await asyncio.sleep(timeout)
        raise Empty

    with pytest.raises(Empty):
        asyncio.run(series._sliced(never)(timeout=0.05))


def test_table_lists_each_notebook_with_status_and_time(tmp_path):
    rows = [series.RunResult("00_setup.ipynb", "ok", 1.25, tmp_path),
            series.RunResult("01_meet_the_data.ipynb", "failed", 3.5, tmp_path, "boom")]
    table = series.format_table(rows)
    assert re.search(r"00_setup.ipynb\s+ok\s+1.2s", table)
    assert re.search(r"01_meet_the_data.ipynb\s+failed\s+3.5s", table)
    assert re.search(r"total\s+4.8s", table)


def test_a_failing_cell_is_named(tmp_path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell("profile = 'x'", metadata={"tags": ["parameters"]}),
                             new_code_cell("x = 1"), new_code_cell("1 / 0")],
                      metadata={"kernelspec": {"name": "python3", "language": "python",
                                               "display_name": "Python 3"}})
    src = tmp_path / "05_broken.ipynb"
    nbformat.write(nb, src)
    with pytest.raises(series.NotebookFailed, match=r"05_broken.ipynb failed in cell .*ZeroDivisionError"):
        series.execute(src, tmp_path / "out" / src.name, {"profile": "smoke"}, cell_timeout=60)
    assert (tmp_path / "out" / src.name).exists(), "the executed notebook must be kept"
