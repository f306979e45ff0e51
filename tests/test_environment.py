"""The pinned environment: requirements.txt, environment.yml and the editable install agree."""

from __future__ import annotations

import importlib.metadata as md
import re
from pathlib import Path

import yaml

from helpers.paths import PROJECT_ROOT

PIN = re.compile(r"^[A-Za-z0-9_.\-\[\]]+==[A-Za-z0-9_.+\-]+$")


def _requirement_lines(path: Path) -> list[str]:
    lines = []
    for raw in path.read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def test_requirements_are_pinned_exactly():
    for name in ("requirements.txt", "requirements-test.txt"):
        for line in _requirement_lines(PROJECT_ROOT / name):
            assert PIN.match(line), f"{name}: '{line}' is not pinned with =="


def test_requirements_hold_the_stack_the_series_needs():
    names = {line.split("==")[0].lower() for line in _requirement_lines(PROJECT_ROOT / "requirements.txt")}
    needed = {"torch", "torchvision", "jupyterlab", "ipykernel", "ipywidgets", "matplotlib",
              "nibabel", "scikit-learn", "scipy", "papermill", "nilearn", "tqdm"}
    assert needed <= names, f"missing from requirements.txt: {sorted(needed - names)}"


def test_environment_yml_matches_requirements():
    env = yaml.safe_load((PROJECT_ROOT / "environment.yml").read_text(encoding="utf-8"))
    deps = env["dependencies"]
    assert "python=3.11" in deps, "environment.yml must pin python=3.11"
    assert "pip" in deps, "environment.yml must list pip"
    pip_lists = [d["pip"] for d in deps if isinstance(d, dict) and "pip" in d]
    assert len(pip_lists) == 1, "environment.yml needs exactly one pip: list"
    assert pip_lists[0] == _requirement_lines(PROJECT_ROOT / "requirements.txt"), (
        "environment.yml's pip list differs from requirements.txt: keep them identical"
    )


def test_installed_versions_match_the_pins():
    for line in _requirement_lines(PROJECT_ROOT / "requirements.txt"):
        name, version = line.split("==")
        assert md.version(name).split("+")[0] == version, f"{name}: installed {md.version(name)}, pinned {version}"


def test_helpers_is_installed_as_a_package_not_found_by_path_tricks():
    dist = md.distribution("brain-mri-helpers")
    assert dist.version
    import helpers

    assert Path(helpers.__file__).resolve().parent == PROJECT_ROOT / "helpers"


def test_readme_opens_with_the_two_commands_and_ci_calls_make_test():
    readme = (PROJECT_ROOT / "README.md").read_text(encoding="utf-8")
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert first_block, "README needs a code block with the two commands"
    assert first_block.group(1).split() == ["make", "run", "make", "test"]
    ci = (PROJECT_ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert re.search(r"^make test\s*$", ci, re.M)
    makefile = (PROJECT_ROOT / "Makefile").read_text(encoding="utf-8")
    assert "GLIBC_TUNABLES" in makefile and "glibc.malloc.hugetlb=1" in makefile
