"""The public API: everything in `kdcache.__all__` is importable from `kdcache`, which stays light."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import kdcache


@pytest.mark.parametrize("name", kdcache.__all__)
def test_every_public_name_resolves_and_is_documented(name):
    value = getattr(kdcache, name)
    assert value is not None
    if callable(value):
        assert value.__doc__, f"kdcache.{name} has no docstring"


def test_import_kdcache_does_not_import_torch():
    """`import kdcache` (and so `kdcache --help`) must not pay for torch and transformers."""
    code = "import sys, kdcache; kdcache.KDCacheError; print(sorted({'torch', 'transformers'} & set(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"


def test_reading_a_cache_needs_no_torch(cache_dir):
    """The cache side is numpy/pyarrow only: another team can inspect and stream a cache without torch."""
    code = ("import sys, kdcache; cache = kdcache.open_cache(sys.argv[1]); cache.verify(progress=False); "
            "rows = list(cache.sequences(shuffle=True)); print(len(rows), 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(cache_dir)], capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["48", "False"]


def test_cache_subset_and_split_read_only_their_rows(cache_dir):
    cache = kdcache.open_cache(cache_dir)
    assert len(cache) == 48 and str(cache) == str(cache_dir)
    split = cache.split(0.25)
    heldout = cache.subset(split.heldout)
    assert len(heldout) == 12 and set(heldout.sample_ids().tolist()) == split.heldout
    assert {s.sample_id for s in heldout.sequences(shuffle=True, seed=3)} == split.heldout
    assert [s.sample_id for s in cache.sequences(sample_ids=split.heldout)] == sorted(split.heldout) == \
        [s.sample_id for s in heldout.sequences()], "unshuffled: shard order"
    assert heldout.split(0.5).heldout < split.heldout, "a subset splits its own rows"


def test_to_dataset_is_the_shards_as_a_datasets_table(cache_dir, tmp_path):
    cache = kdcache.open_cache(cache_dir)
    dataset = cache.to_dataset(cache_dir=str(tmp_path / "hf"))
    assert dataset.num_rows == 48
    assert {"sample_id", "input_ids", "topk_ids", "topk_logprobs", "tail_logprob"} <= set(dataset.column_names)
    first = next(iter(cache.sequences()))
    row = dataset[0]
    assert row["sample_id"] == first.sample_id and row["input_ids"] == first.input_ids.tolist()
    np.testing.assert_array_equal(np.array(row["topk_ids"]), first.topk_ids)
    heldout = cache.split(0.25).heldout
    assert sorted(cache.subset(heldout).to_dataset(cache_dir=str(tmp_path / "hf"))["sample_id"]) == sorted(heldout)


def test_lazily_exported_names_are_never_shadowed_by_submodules():
    """A package's lazy export must not share its name with one of its submodules: importing the submodule
    would put the module where the function was (`kdcache.student.evaluate` once named both)."""
    import importlib
    import pkgutil
    import types

    import kdcache
    for info in pkgutil.walk_packages(kdcache.__path__, "kdcache."):
        if not info.name.endswith("__main__"):
            importlib.import_module(info.name)
    for package in (kdcache, importlib.import_module("kdcache.student"), importlib.import_module("kdcache.teacher")):
        for name in package.__all__:
            if name != "__version__":
                assert not isinstance(getattr(package, name), types.ModuleType), f"{package.__name__}.{name}"
