"""helpers.cache: entries keyed by settings and source files, corrupt entries rebuilt, atomic."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from datafixtures import head, make_bids, write_nifti

from helpers.cache import CaseDataset, TensorCache
from helpers.datasets import load_dataset
from helpers.preprocess import PreprocessConfig


@pytest.fixture
def table(tmp_path):
    return load_dataset(make_bids(tmp_path / "bids", n_subjects=6))


CFG = PreprocessConfig(shape=(12, 12, 12))


def test_second_read_is_a_hit_with_the_same_tensors(table, tmp_path):
    cache = TensorCache(CFG, tmp_path / "cache")
    first = cache.get(table, 0)
    again = cache.get(table, 0)
    assert cache.stats == {"hits": 1, "built": 1, "rebuilt": 0}
    assert torch.equal(first["image"], again["image"]) and first["image"].shape == (2, 12, 12, 12)
    assert first["mask"].dtype == torch.int64 and first["label"] in (0, 1)
    assert (cache.folder / "config.json").exists()
    assert not list(cache.folder.glob(".*tmp*"))  # no temporary files left behind


def test_changing_a_setting_gives_a_new_cache(table, tmp_path):
    a = TensorCache(CFG, tmp_path / "cache")
    b = TensorCache(PreprocessConfig(shape=(12, 12, 12), normalise="percentile"), tmp_path / "cache")
    assert a.folder != b.folder
    a.get(table, 0)
    b.get(table, 0)
    assert b.stats["built"] == 1 and b.stats["hits"] == 0


def test_changed_source_file_gives_a_new_entry(table, tmp_path):
    cache = TensorCache(CFG, tmp_path / "cache")
    before = cache.get(table, 0)
    path = table.df.loc[0, "T1w"]
    write_nifti(type(cache.folder)(path), head(99) * 3)
    os.utime(path, ns=(os.stat(path).st_atime_ns, os.stat(path).st_mtime_ns + 10**9))
    after = cache.get(table, 0)
    assert cache.stats["built"] == 2
    assert not torch.equal(before["image"], after["image"])


@pytest.mark.parametrize("damage", ["truncate", "flip_bytes", "garbage"])
def test_corrupt_entry_is_detected_and_rebuilt(table, tmp_path, damage):
    cache = TensorCache(CFG, tmp_path / "cache")
    good = cache.get(table, 1)
    entry = cache.path(table, table.df.iloc[1])
    raw = bytearray(entry.read_bytes())
    if damage == "truncate":
        entry.write_bytes(bytes(raw[: len(raw) // 2]))
    elif damage == "garbage":
        entry.write_bytes(b"not a tensor file")
    else:  # change tensor bytes but keep the file loadable: only the checksum can tell
        item = torch.load(entry, weights_only=False)
        item["image"] = item["image"] + 1
        torch.save(item, entry)
    with pytest.warns(UserWarning, match="cache entry"):
        again = cache.get(table, 1)
    assert cache.stats["rebuilt"] == 1
    assert torch.equal(again["image"], good["image"])
    assert cache.get(table, 1) is not None and cache.stats["hits"] == 1


def test_dataset_and_loader(table, tmp_path):
    cache = TensorCache(CFG, tmp_path / "cache", verbose=False)
    stats = cache.build(table, progress=False)
    assert stats["built"] == len(table.df)
    ds = CaseDataset(table, "train", cache)
    loader = torch.utils.data.DataLoader(ds, batch_size=2)
    batch = next(iter(loader))
    assert batch["image"].shape[1:] == (2, 12, 12, 12) and batch["mask"].shape[1:] == (12, 12, 12)
    assert cache.stats["hits"] >= 2
    assert cache.size_bytes() > 0 and cache.clear() == len(table.df)
    assert np.isfinite(batch["image"].numpy()).all()


def test_build_with_worker_processes_gives_the_same_entries(table, tmp_path):
    serial = TensorCache(CFG, tmp_path / "serial", verbose=False)
    serial.build(table, progress=False)
    parallel = TensorCache(CFG, tmp_path / "parallel", verbose=False)
    stats = parallel.build(table, workers=2)
    assert stats["built"] == len(table.df)
    for i in range(len(table.df)):
        assert torch.equal(serial.get(table, i)["image"], parallel.get(table, i)["image"])
    assert parallel.stats["hits"] == len(table.df)


def test_command_line_fills_a_cache(table, tmp_path, capsys):
    from helpers import cache as cache_module

    CFG.save(tmp_path / "cfg.json")
    assert cache_module.main([str(table.source), "--config", str(tmp_path / "cfg.json"),
                              "--root", str(tmp_path / "c")]) == 0
    assert "'built': 6" in capsys.readouterr().out


def test_2d_image_folder_through_the_cache(tmp_path):
    from datafixtures import make_imagefolder

    table2d = load_dataset(make_imagefolder(tmp_path / "img", with_splits=True))
    cache = TensorCache(PreprocessConfig(shape=(1, 16, 16)), tmp_path / "cache", verbose=False)
    batch = next(iter(torch.utils.data.DataLoader(CaseDataset(table2d, "train", cache), batch_size=3)))
    assert batch["image"].shape == (3, 1, 16, 16) and "mask" not in batch
    assert set(batch["label"].tolist()) <= {0, 1, 2}
