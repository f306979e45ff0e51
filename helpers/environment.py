"""What is installed and what this machine can do: the checks behind notebook 00.

Example:
    >>> rows = package_versions()
    >>> rows[0]["package"]
    'python'
"""

from __future__ import annotations

import importlib.metadata as md
import os
import platform
import shutil
import warnings
from pathlib import Path
from typing import Any

from helpers.paths import PROJECT_ROOT, data_dir, outputs_dir

CORE_PACKAGES = (
    "torch", "torchvision", "numpy", "scipy", "pandas", "matplotlib", "scikit-learn",
    "nibabel", "nilearn", "jupyterlab", "ipykernel", "ipywidgets", "papermill", "tqdm",
)


def pinned_versions(requirements: str | Path = PROJECT_ROOT / "requirements.txt") -> dict[str, str]:
    """The ``name==version`` pins of a requirements file, names lower-cased."""
    pins: dict[str, str] = {}
    path = Path(requirements)
    if not path.exists():
        return pins
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[name.strip().lower()] = version.strip()
    return pins


def package_versions(packages: tuple[str, ...] = CORE_PACKAGES) -> list[dict[str, str]]:
    """One row per package: installed version, pinned version, and whether they agree."""
    pins = pinned_versions()
    rows = [{"package": "python", "installed": platform.python_version(), "pinned": "3.11",
             "status": "ok" if platform.python_version().startswith("3.11") else "untested"}]
    for name in packages:
        try:
            installed = md.version(name)
        except md.PackageNotFoundError:
            installed = ""
        pinned = pins.get(name.lower(), "")
        if not installed:
            status = "MISSING"
        elif pinned and installed.split("+")[0] != pinned:
            status = "differs"
        else:
            status = "ok"
        rows.append({"package": name, "installed": installed or "-", "pinned": pinned or "-",
                     "status": status})
    return rows


def machine_facts() -> dict[str, Any]:
    """CPU, memory, disk and accelerator facts for the setup notebook."""
    import torch

    from helpers.runtime import cpu_supports_bf16

    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "CPU cores": os.cpu_count(),
        "PyTorch threads": torch.get_num_threads(),
        "CPU native bf16": cpu_supports_bf16(),
        "CUDA GPU": torch.cuda.is_available(),
        "huge pages (GLIBC_TUNABLES)": "glibc.malloc.hugetlb=1" in os.environ.get("GLIBC_TUNABLES", ""),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        get_capability = getattr(torch.backends.cpu, "get_cpu_capability", None)
        facts["CPU vector instructions"] = get_capability() if get_capability else "unknown"
    try:
        memory = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        facts["memory (GiB)"] = round(memory / 2**30, 1)
    except (ValueError, OSError, AttributeError):
        facts["memory (GiB)"] = "unknown"
    folder = data_dir()
    probe = folder if folder.exists() else PROJECT_ROOT
    facts["free disk at data/ (GiB)"] = round(shutil.disk_usage(probe).free / 2**30, 1)
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            props = torch.cuda.get_device_properties(index)
            facts[f"GPU {index}"] = f"{props.name}, {props.total_memory / 2**30:.0f} GiB"
    return facts


def default_data_status() -> dict[str, Any]:
    """Whether the default simulated cohort has been generated yet, and where."""
    root = data_dir() / "simulated"
    found = root.glob("**/dataset_description.json") if root.exists() else []
    # A cohort's derivatives (derivatives/labels) carry their own description: not a cohort.
    cohorts = sorted(p.parent for p in found if "derivatives" not in p.relative_to(root).parts)
    return {"folder": root, "exists": bool(cohorts), "cohorts": cohorts}


def setup_problems(min_free_gib: float = 2.0, min_memory_gib: float = 4.0) -> list[str]:
    """Everything that would stop the series from running here, each with what to do."""
    problems = []
    for row in package_versions():
        if row["status"] == "MISSING":
            problems.append(
                f"{row['package']} is not installed: run `make setup` (or "
                f"`pip install -r requirements.txt`) from the project folder."
            )
    facts = machine_facts()
    if isinstance(facts["memory (GiB)"], float) and facts["memory (GiB)"] < min_memory_gib:
        problems.append(
            f"Only {facts['memory (GiB)']} GiB of memory: use PROFILE=smoke, which needs about 2 GiB."
        )
    if facts["free disk at data/ (GiB)"] < min_free_gib:
        problems.append(
            f"Only {facts['free disk at data/ (GiB)']} GiB free where data/ lives: the workshop "
            f"cohort needs about 1 GiB. Free some space or set BRAINMRI_DATA to another disk."
        )
    try:
        outputs_dir().mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problems.append(f"Cannot write to {outputs_dir()}: {exc}. Set BRAINMRI_OUTPUTS elsewhere.")
    return problems
