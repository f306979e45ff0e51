"""A cache of preprocessed tensors, so training reads each case in milliseconds.

Preprocessing a scan (reorient, resample, skull strip, normalise...) takes from
a tenth of a second to several seconds; a training run reads every case many
times. The cache stores each preprocessed case once as a ``.pt`` file:

- **keyed by the settings**: the folder is named after
  :meth:`helpers.preprocess.PreprocessConfig.hash`, so changing any setting
  gives a new, empty cache and never a stale tensor;
- **keyed by the source files**: each entry's name is a hash of the case's file
  paths, sizes and modification times, so an edited scan is preprocessed again;
- **checked**: each entry holds a checksum of its tensors; an entry that cannot
  be read or does not match is reported and rebuilt;
- **written atomically** (:func:`helpers.io.atomic_path`): an interrupted run
  never leaves a half-written entry.

Default location: ``data/cache/tensors/<config hash>/`` (``BRAINMRI_DATA`` moves it).

Example:
    >>> cache = TensorCache(PreprocessConfig(spacing=2.0, shape=(64, 64, 64)))  # doctest: +SKIP
    >>> item = cache.get(table, 0)                                # doctest: +SKIP
    >>> item["image"].shape                                       # doctest: +SKIP
    torch.Size([3, 64, 64, 64])
"""

from __future__ import annotations

import argparse
import hashlib
import os
import sys
import warnings
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from helpers.io import atomic_path, write_json
from helpers.paths import data_dir
from helpers.preprocess import PreprocessConfig, load_case

FORMAT_VERSION = 1


def _checksum(tensors: Sequence[torch.Tensor | None]) -> int:
    crc = 0
    for t in tensors:
        if t is not None:
            crc = zlib.crc32(t.contiguous().numpy().tobytes(), crc)
    return crc


def source_signature(table: Any, row: Any) -> list[tuple[str, int, int]]:
    """``(path, size, mtime_ns)`` of every file a case is read from (images and mask)."""
    cols = list(dict.fromkeys([*table.modalities, "mask"]))
    out = []
    for col in cols:
        value = str(row.get(col, "") or "")
        if value:
            st = os.stat(value)
            out.append((value, st.st_size, st.st_mtime_ns))
    return sorted(set(out))


class TensorCache:
    """Preprocessed cases of a :class:`helpers.datasets.CaseTable`, stored as tensors.

    Args:
        config: the preprocessing; its hash names the cache folder.
        root: parent folder (default ``data/cache/tensors``).
        verbose: print when entries are rebuilt.

    Attributes:
        folder: where the entries of this config live.
        stats: counts of ``hits``, ``built`` and ``rebuilt`` (corrupt) entries.
    """

    def __init__(self, config: PreprocessConfig, root: str | os.PathLike | None = None, verbose: bool = True):
        self.config = config
        self.root = Path(root) if root is not None else data_dir() / "cache" / "tensors"
        self.folder = self.root / config.hash()
        self.verbose = verbose
        self.stats = {"hits": 0, "built": 0, "rebuilt": 0}
        self.folder.mkdir(parents=True, exist_ok=True)
        settings = self.folder / "config.json"
        if not settings.exists():
            write_json(settings, {"format": FORMAT_VERSION, "config": config.to_dict()})

    def key(self, table: Any, row: Any) -> str:
        """The entry name of one case: a hash of its id and source-file signature."""
        text = repr((str(row["case"]), source_signature(table, row), FORMAT_VERSION))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def path(self, table: Any, row: Any) -> Path:
        return self.folder / f"{self.key(table, row)}.pt"

    def _read(self, path: Path, key: str) -> dict[str, Any] | None:
        try:
            item = torch.load(path, map_location="cpu", weights_only=False)
        except Exception as exc:  # noqa: BLE001 (truncated, zeroed, not a torch file...)
            self._report(path, f"unreadable ({type(exc).__name__})")
            return None
        if not isinstance(item, dict) or item.get("key") != key:
            self._report(path, "belongs to another case or format")
            return None
        if _checksum([item.get("image"), item.get("mask")]) != item.get("checksum"):
            self._report(path, "checksum mismatch (the file was damaged)")
            return None
        return item

    def _report(self, path: Path, problem: str) -> None:
        self.stats["rebuilt"] += 1
        if self.verbose:
            warnings.warn(f"{path}: cache entry {problem}; rebuilding it", stacklevel=3)

    def get(self, table: Any, row: Any) -> dict[str, Any]:
        """The preprocessed case: ``image`` float32 tensor (C, ...), ``mask`` (int64 or None),
        ``label`` (class index or -1), ``case``, ``geometry`` (dict, see :class:`helpers.preprocess.Geometry`)."""
        if not hasattr(row, "index"):
            row = table.df.iloc[int(row)]
        key = self.key(table, row)
        path = self.folder / f"{key}.pt"
        if path.exists():
            item = self._read(path, key)
            if item is not None:
                self.stats["hits"] += 1
                return item
        out = load_case(table, row, self.config)
        label = str(row.get("label", "") or "")
        item = {
            "key": key,
            "case": str(row["case"]),
            "image": torch.from_numpy(np.ascontiguousarray(out.image)),
            "mask": None if out.mask is None else torch.from_numpy(np.ascontiguousarray(out.mask).astype(np.int64)),
            "label": table.classes.index(label) if label in table.classes else -1,
            "geometry": out.geometry.to_dict(),
        }
        item["checksum"] = _checksum([item["image"], item["mask"]])
        with atomic_path(path) as tmp:
            torch.save(item, tmp)
        self.stats["built"] += 1
        return item

    def build(self, table: Any, splits: Sequence[str] = ("train", "val", "test"), progress: bool = True,
              workers: int = 1) -> dict[str, int]:
        """Fill the cache for every case of ``splits``; returns the stats.

        ``workers > 1`` preprocesses cases in that many processes (each writes its
        own entries atomically); useful on machines with many CPU cores.
        """
        rows = table.df[table.df["split"].isin(list(splits))]
        if workers > 1 and len(rows) > 1:
            from concurrent.futures import ProcessPoolExecutor

            jobs = [(self.config.to_dict(), str(self.root), table, row) for _, row in rows.iterrows()]
            with ProcessPoolExecutor(max_workers=workers) as pool:
                for stats in pool.map(_build_one, jobs, chunksize=max(1, len(jobs) // (4 * workers))):
                    for k, v in stats.items():
                        self.stats[k] += v
            return dict(self.stats)
        iterator = rows.iterrows()
        if progress:
            from tqdm.auto import tqdm

            iterator = tqdm(iterator, total=len(rows), desc="preprocessing", leave=False)
        for _, row in iterator:
            self.get(table, row)
        return dict(self.stats)

    def size_bytes(self) -> int:
        """Disk space used by this config's entries."""
        return sum(p.stat().st_size for p in self.folder.glob("*.pt"))

    def clear(self) -> int:
        """Delete this config's entries; returns how many."""
        files = list(self.folder.glob("*.pt"))
        for p in files:
            p.unlink(missing_ok=True)
        return len(files)


def _build_one(job: tuple[dict[str, Any], str, Any, Any]) -> dict[str, int]:
    """One case in a worker process (see :meth:`TensorCache.build`)."""
    config, root, table, row = job
    cache = TensorCache(PreprocessConfig.from_dict(config), root, verbose=False)
    cache.get(table, row)
    return cache.stats


class CaseDataset(torch.utils.data.Dataset):
    """A PyTorch dataset over one split of a case table, read through a :class:`TensorCache`.

    Each item is a dict: ``image`` (C, ...) float32, ``mask`` (if any) int64,
    ``label`` int (class index, -1 if none), ``case`` str.

    Example:
        >>> ds = CaseDataset(table, "train", TensorCache(cfg))      # doctest: +SKIP
        >>> loader = torch.utils.data.DataLoader(ds, batch_size=4, shuffle=True)  # doctest: +SKIP
    """

    def __init__(self, table: Any, split: str, cache: TensorCache):
        self.table = table
        self.rows = table.split(split).reset_index(drop=True)
        self.cache = cache

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.cache.get(self.table, self.rows.iloc[i])
        out = {"image": item["image"], "label": item["label"], "case": item["case"]}
        if item["mask"] is not None:
            out["mask"] = item["mask"]
        return out


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m helpers.cache DATASET [--config cfg.json]``: fill the tensor cache of a dataset."""
    from helpers.datasets import load_dataset

    parser = argparse.ArgumentParser(prog="python -m helpers.cache", description=main.__doc__)
    parser.add_argument("source", help="dataset folder or CSV manifest")
    parser.add_argument("--config", help="a PreprocessConfig JSON (default: RAS, zscore, crop)")
    parser.add_argument("--root", default=None, help="cache parent folder (default data/cache/tensors)")
    parser.add_argument("--workers", type=int, default=1, help="processes preprocessing in parallel")
    args = parser.parse_args(argv)
    cfg = PreprocessConfig.load(args.config) if args.config else PreprocessConfig()
    table = load_dataset(args.source)
    cache = TensorCache(cfg, args.root)
    stats = cache.build(table, workers=args.workers)
    print(f"{cache.folder}: {stats}, {cache.size_bytes() / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
