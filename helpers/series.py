"""The numbered notebook series: list it, check its house rules, and run it headlessly.

``python -m helpers.series --profile smoke`` executes every ``notebooks/NN_*.ipynb``
in numeric order with papermill, writes the executed notebooks and HTML copies to
``outputs/``, and prints a table of notebook, status and wall time. ``make run``
calls it. ``python -m helpers.series --check`` only checks the house rules.

Why a custom papermill engine: with widget notebooks the Jupyter client sometimes
misses the kernel's "cell finished" reply while it waits on the shell channel with
one long timeout, and then sits out the whole timeout (public reports: nbclient
issue 312, pyzmq issue 2173). Waiting in short slices until the real deadline
bounds such a stall to about a second. Every cell keeps a real timeout too.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from queue import Empty
from time import monotonic
from typing import Any

from helpers.paths import notebooks_dir, outputs_dir

NOTEBOOK_NAME = re.compile(r"^(\d{2})_[a-z0-9_]+\.ipynb$")
REPLY_SLICE_S = 1.0
"""How long one wait on a kernel channel lasts before looking again."""
DEFAULT_CELL_TIMEOUT_S = 600
ENGINE_NAME = "brainmri-sliced"


# --------------------------------------------------------------------------- the series


@dataclass(frozen=True)
class NotebookInfo:
    """One notebook of the series, as its title cell describes it."""

    path: Path
    number: int
    title: str
    summary: str

    @property
    def name(self) -> str:
        return self.path.name


def list_notebooks(folder: str | Path | None = None) -> list[Path]:
    """The numbered notebooks (``NN_topic.ipynb``) in numeric order."""
    folder = Path(folder) if folder is not None else notebooks_dir()
    found = [p for p in folder.glob("*.ipynb") if NOTEBOOK_NAME.match(p.name)]
    return sorted(found, key=lambda p: (int(p.name[:2]), p.name))


def _read(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)


def _source(cell: dict[str, Any]) -> str:
    src = cell.get("source", "")
    return "".join(src) if isinstance(src, list) else src


def describe(path: str | Path) -> NotebookInfo:
    """Title and one-line summary of a notebook, read from its first (title) cell.

    The summary is the first paragraph after the ``# `` title line.
    """
    path = Path(path)
    cells = _read(path).get("cells", [])
    text = _source(cells[0]) if cells else ""
    lines = text.splitlines()
    title = next((ln[2:].strip() for ln in lines if ln.startswith("# ")), path.stem)
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    summary = next(
        (p.replace("\n", " ") for p in paragraphs if not p.startswith("#") and not p.startswith("|")),
        "",
    )
    match = NOTEBOOK_NAME.match(path.name)
    return NotebookInfo(path, int(match.group(1)) if match else -1, title, summary)


def series_map(folder: str | Path | None = None) -> list[NotebookInfo]:
    """Every notebook of the series with its title and one-line summary."""
    return [describe(p) for p in list_notebooks(folder)]


# --------------------------------------------------------------------------- house rules

TITLE_MARKERS = {
    "learning goals": re.compile(r"what you will learn", re.I),
    "prerequisites": re.compile(r"prerequisite", re.I),
    "estimated runtime": re.compile(r"runtime", re.I),
}
DEVICE_LITERAL = re.compile(r"""(["']cuda(:\d+)?["']|\.cuda\(\)|["']mps["'])""")
SYS_PATH_EDIT = re.compile(r"sys\.path\.(insert|append|extend)|sys\.path\s*\+?=")
MAX_CODE_LINES = 40


def lint_notebook(path: str | Path) -> list[str]:
    """Check one notebook against the series' house rules; return the problems found.

    The rules (see ``shared/STYLE.md``): committed without outputs or execution
    counts; every cell has an id; a title cell with learning goals, prerequisites
    and a runtime for each profile; exactly one ``parameters``-tagged cell that
    sets ``profile``; a Summary and Exercises at the end; no device literals and no
    ``sys.path`` edits in code; code cells under about 40 lines.
    """
    path = Path(path)
    problems: list[str] = []
    if not NOTEBOOK_NAME.match(path.name):
        problems.append("file name must look like NN_topic.ipynb (two digits, lower-case topic)")
    try:
        nb = _read(path)
    except (OSError, json.JSONDecodeError) as exc:
        return [f"cannot be read as a notebook: {exc}"]
    cells = nb.get("cells", [])
    if not cells:
        return ["has no cells"]
    if (nb.get("nbformat"), nb.get("nbformat_minor", 0)) < (4, 5):
        problems.append("nbformat must be 4.5 or later (cell ids)")

    for index, cell in enumerate(cells):
        where = f"cell {index}"
        if not cell.get("id"):
            problems.append(f"{where} has no id")
        if cell.get("cell_type") == "code":
            if cell.get("outputs"):
                problems.append(f"{where} carries outputs (clear them before committing)")
            if cell.get("execution_count") is not None:
                problems.append(f"{where} carries an execution count (clear outputs before committing)")
            src = _source(cell)
            if DEVICE_LITERAL.search(src):
                problems.append(f"{where} names a device literally; use helpers.runtime.get_device()")
            if SYS_PATH_EDIT.search(src):
                problems.append(f"{where} edits sys.path; import helpers plainly (pip install -e .)")
            if len(src.splitlines()) > MAX_CODE_LINES:
                problems.append(
                    f"{where} has {len(src.splitlines())} lines; move long code into helpers/"
                )

    first = cells[0]
    title_text = _source(first)
    if first.get("cell_type") != "markdown" or not title_text.lstrip().startswith("# "):
        problems.append("the first cell must be a markdown title cell starting with '# '")
    else:
        for label, marker in TITLE_MARKERS.items():
            if not marker.search(title_text):
                problems.append(f"the title cell lacks {label}")
        for profile in ("smoke", "workshop", "full"):
            if profile not in title_text.lower():
                problems.append(f"the title cell gives no runtime for the {profile} profile")

    tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        problems.append(f"needs exactly one cell tagged 'parameters' (found {len(tagged)})")
    elif tagged[0].get("cell_type") != "code" or not re.search(
        r"^profile\s*=", _source(tagged[0]), re.M
    ):
        problems.append("the 'parameters' cell must be a code cell that sets profile = ...")

    markdown = [_source(c) for c in cells if c.get("cell_type") == "markdown"]
    tail = "\n".join(markdown[-3:])
    if not re.search(r"^#+\s*Summary", tail, re.M | re.I):
        problems.append("must end with a '## Summary' section")
    if not re.search(r"^#+\s*Exercises", markdown[-1] if markdown else "", re.M | re.I):
        problems.append("the last markdown cell must hold '## Exercises'")
    if cells[-1].get("cell_type") != "markdown":
        problems.append("the last cell must be markdown (Summary / Exercises)")
    return problems


# --------------------------------------------------------------------------- execution


def _sliced(get_msg):
    """Wrap a channel's ``get_msg`` so a long wait becomes many short ones."""
    from nbclient.util import ensure_async

    async def get_msg_in_slices(timeout: float | None = None, **kwargs: Any):
        deadline = None if timeout is None else monotonic() + timeout
        while True:
            remaining = None if deadline is None else deadline - monotonic()
            wait = REPLY_SLICE_S if remaining is None else max(0.0, min(REPLY_SLICE_S, remaining))
            try:
                return await ensure_async(get_msg(timeout=wait, **kwargs))
            except Empty:
                if deadline is not None and monotonic() >= deadline:
                    raise

    return get_msg_in_slices


def _register_engine() -> None:
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines

    if ENGINE_NAME in papermill_engines._engines:  # noqa: SLF001 (papermill has no public lookup)
        return

    class SlicedClient(PapermillNotebookClient):
        async def async_start_new_kernel_client(self):
            kc = await super().async_start_new_kernel_client()
            kc.shell_channel.get_msg = _sliced(kc.shell_channel.get_msg)
            kc.iopub_channel.get_msg = _sliced(kc.iopub_channel.get_msg)
            return kc

    class SlicedEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None,
                                     stderr_file=None, start_timeout=60, execution_timeout=None,
                                     **kwargs):
            kwargs.pop("input_path", None)
            kwargs.pop("startup_timeout", None)
            timeout = execution_timeout or kwargs.pop("timeout", None)
            kwargs.pop("timeout", None)
            client = SlicedClient(
                nb_man, timeout=timeout, startup_timeout=start_timeout, kernel_name=kernel_name,
                log_output=log_output, stdout_file=stdout_file, stderr_file=stderr_file, **kwargs,
            )
            return client.execute()

    papermill_engines.register(ENGINE_NAME, SlicedEngine)


class NotebookFailed(RuntimeError):
    """A notebook stopped with an error; the message names the notebook, cell and error."""


@dataclass
class RunResult:
    """The outcome of executing one notebook."""

    notebook: str
    status: str  # "ok" or "failed"
    seconds: float
    output: Path
    error: str = ""


def execute(path: str | Path, output: str | Path, parameters: dict[str, Any] | None = None,
            cell_timeout: float = DEFAULT_CELL_TIMEOUT_S, cwd: str | Path | None = None,
            kernel_name: str = "python3") -> Path:
    """Execute a notebook with papermill; raise :class:`NotebookFailed` on a cell error.

    The executed notebook is written to ``output`` even when a cell fails, so the
    failing cell can be opened there.
    """
    import papermill as pm

    _register_engine()
    path, output = Path(path), Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    try:
        pm.execute_notebook(
            str(path), str(output), parameters=parameters or {}, kernel_name=kernel_name,
            engine_name=ENGINE_NAME, execution_timeout=cell_timeout,
            cwd=str(cwd or path.parent), progress_bar=False, request_save_on_cell_execute=False,
        )
    except pm.PapermillExecutionError as exc:
        raise NotebookFailed(
            f"{path.name} failed in cell {exc.cell_index} (execution count {exc.exec_count}): "
            f"{exc.ename}: {exc.evalue}\nExecuted notebook kept at {output}"
        ) from None
    except Exception as exc:  # timeouts, dead kernels
        raise NotebookFailed(
            f"{path.name} could not finish: {type(exc).__name__}: {exc}\n"
            f"Executed notebook kept at {output}"
        ) from exc
    return output


def export_html(executed: str | Path, html: str | Path | None = None) -> Path:
    """Write an HTML copy of an executed notebook (figures included)."""
    import nbformat
    from nbconvert import HTMLExporter

    from helpers.io import write_text

    executed = Path(executed)
    html = Path(html) if html is not None else executed.with_suffix(".html")
    nb = nbformat.read(executed, as_version=4)
    # Live widgets in HTML need JavaScript from a CDN, which offline copies cannot load
    # (the widget area stays blank). Without the saved widget state nbconvert shows
    # each widget output's static fallback instead (helpers.viewer adds an image/png).
    nb.metadata.pop("widgets", None)
    body, _ = HTMLExporter().from_notebook_node(nb)
    return write_text(html, body)


def run_series(profile: str = "workshop", notebooks: Iterable[str | Path] | None = None,
               out: str | Path | None = None, html: bool = True,
               cell_timeout: float = DEFAULT_CELL_TIMEOUT_S) -> list[RunResult]:
    """Execute notebooks in numeric order with ``profile`` injected; keep going past failures."""
    out = outputs_dir(out)
    paths = [Path(p) for p in notebooks] if notebooks is not None else list_notebooks()
    results: list[RunResult] = []
    for path in paths:
        target = out / path.name
        start = time.perf_counter()
        print(f"-> {path.name} (profile {profile})", flush=True)
        try:
            execute(path, target, {"profile": profile}, cell_timeout=cell_timeout)
            if html:
                export_html(target)
            results.append(RunResult(path.name, "ok", time.perf_counter() - start, target))
        except NotebookFailed as exc:
            results.append(RunResult(path.name, "failed", time.perf_counter() - start, target, str(exc)))
            print(str(exc), file=sys.stderr, flush=True)
    return results


def format_table(results: Sequence[RunResult]) -> str:
    """A plain-text table: notebook, status, wall time."""
    width = max([len("notebook")] + [len(r.notebook) for r in results])
    lines = [f"{'notebook':<{width}}  {'status':<6}  {'wall time':>9}", "-" * (width + 19)]
    for r in results:
        lines.append(f"{r.notebook:<{width}}  {r.status:<6}  {r.seconds:>8.1f}s")
    total = sum(r.seconds for r in results)
    lines.append("-" * (width + 19))
    lines.append(f"{'total':<{width}}  {'':<6}  {total:>8.1f}s")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.series",
        description="Execute the numbered notebooks headlessly, or check their house rules.",
    )
    parser.add_argument("--profile", default="workshop", help="smoke, workshop, full or auto")
    parser.add_argument("--out", default=None, help="folder for executed notebooks (default outputs/)")
    parser.add_argument("--no-html", action="store_true", help="skip the HTML copies")
    parser.add_argument("--cell-timeout", type=float, default=DEFAULT_CELL_TIMEOUT_S)
    parser.add_argument("--check", action="store_true", help="only check the house rules")
    parser.add_argument("notebooks", nargs="*", help="notebooks to run (default: all, in order)")
    args = parser.parse_args(argv)

    chosen = args.notebooks or list_notebooks()
    if args.check:
        bad = 0
        for path in chosen:
            for problem in lint_notebook(path):
                bad += 1
                print(f"{Path(path).name}: {problem}")
        print("house rules: all notebooks pass" if not bad else f"house rules: {bad} problem(s)")
        return 1 if bad else 0

    from helpers.runtime import resolve_profile_name

    profile = resolve_profile_name(args.profile)
    results = run_series(profile, chosen, args.out, html=not args.no_html,
                         cell_timeout=args.cell_timeout)
    print()
    print(format_table(results))
    print(f"\nExecuted notebooks and HTML are in {outputs_dir(args.out)}")
    return 0 if all(r.status == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
