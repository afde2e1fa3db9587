"""Fuzzing a small cache: random byte flips and random manifest edits, seeded, a few hundred cases.

Every case must end in success or a `KDCacheError` (never another exception, a hang, or a read or
write outside the cache), and whatever reads successfully must hold finite targets: a NaN may be
refused, never trained on silently. Half the cases are "forged": the manifest is re-hashed to vouch
for the damaged files, so the value checks, not the hashes, must catch them.
"""

from __future__ import annotations

import json
import random
import signal
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import skewed_topk_cache
from hostile import rehash

from kdcache.cache.cache import open_cache
from kdcache.cache.format import MANIFEST_NAME
from kdcache.errors import KDCacheError
from kdcache.teacher.recode import recode_cache

CASES = 300
ODD_VALUES = [None, -1, 0, 1, 2**63, -(2**40), 1.5, float("inf"), True, "", "x", "../../outside.arrow",
              "/etc/passwd", "\x1b[31m", [], {}, [1, 2], {"a": 1}, "9" * 400]


def _paths(value, prefix=()):
    """Every (container path) inside a JSON value, so an edit can land anywhere in the manifest."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, prefix + (key,))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, prefix + (index,))


def edit_manifest_randomly(data: dict, rng: random.Random) -> None:
    """Edit one value anywhere in the manifest: first a top-level key, then a place under it, so the many
    leaves of `stats` (captured-mass histogram, per-shard accumulators) do not drown the other fields."""
    paths = [path for path in _paths(data) if path]
    top = rng.choice(sorted({str(path[0]) for path in paths}))
    path = rng.choice([path for path in paths if str(path[0]) == top])
    parent = data
    for key in path[:-1]:
        parent = parent[key]
    old, key = parent[path[-1]], path[-1]
    if isinstance(parent, dict) and rng.random() < 0.2:
        del parent[key]
    elif isinstance(old, int) and not isinstance(old, bool) and rng.random() < 0.5:
        parent[key] = old + rng.choice([-1, 1, old, -2 * old - 1, 1000])
    else:
        parent[key] = rng.choice(ODD_VALUES)


def flip_bytes(path: Path, rng: random.Random) -> None:
    data = bytearray(path.read_bytes())
    for _ in range(rng.randint(1, 8)):
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))


def exercise(cache: Path) -> None:
    """What a receiving team does: read the manifest, verify, split, then read every row."""
    opened = open_cache(cache)
    manifest = opened.manifest
    try:
        opened.verify(progress=False)
        verified = True
    except KDCacheError:
        verified = False
    opened.split(0.25)
    for sequence in opened.sequences(hidden_layers=manifest.hidden_layers):
        for values in (sequence.topk_logprobs, sequence.tail_logprob, *sequence.hidden.values()):
            assert not np.isnan(values).any(), f"NaN read silently (verify {'passed' if verified else 'failed'})"


def _snapshot(root: Path, cache: Path) -> dict[str, tuple[int, int]]:
    return {str(path): (path.stat().st_size, path.stat().st_mtime_ns) for path in root.rglob("*")
            if path.is_file() and cache not in path.parents}


def _alarm(signum, frame):
    raise TimeoutError("a fuzz case hung")


@pytest.fixture(scope="module")
def ranked_cache(tmp_path_factory) -> Path:
    """A compact cache whose ids a recode ranked (format 4): numbers, not ids, in its id columns."""
    root = tmp_path_factory.mktemp("ranked")
    ranked = recode_cache(skewed_topk_cache(root / "skewed", seed=0), root / "ranked", progress=False)
    assert ranked.codec.id_ranking
    return root / "ranked"


@pytest.mark.parametrize("fixture", ["cache_dir", "ranked_cache"])
def test_fuzzed_caches_fail_cleanly(fixture, request, tmp_path):
    cache_dir = request.getfixturevalue(fixture)
    outside = tmp_path / "outside.arrow"
    outside.write_bytes(b"not part of the cache")
    files = sorted(str(path.relative_to(cache_dir)) for path in cache_dir.rglob("*") if path.is_file())
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"ok": 0, "refused": 0}
    try:
        for case in range(CASES):
            rng = random.Random(case)
            cache = tmp_path / "cache"
            shutil.rmtree(cache, ignore_errors=True)
            shutil.copytree(cache_dir, cache)
            before = _snapshot(tmp_path, cache)
            if rng.random() < 0.5:
                data = json.loads((cache / MANIFEST_NAME).read_text())
                for _ in range(rng.randint(1, 3)):
                    edit_manifest_randomly(data, rng)
                (cache / MANIFEST_NAME).write_text(json.dumps(data))
            else:
                flip_bytes(cache / rng.choice(files), rng)
                if rng.random() < 0.5:
                    try:
                        rehash(cache)
                    except (OSError, ValueError, KeyError, TypeError, AttributeError, IndexError):
                        pass  # the forger's own tools choke on this damage: the cache stays as damaged
                    except Exception as error:  # noqa: BLE001 - pyarrow refuses to read the damaged shard
                        if "pyarrow" not in type(error).__module__ and "Arrow" not in type(error).__name__:
                            raise
            signal.alarm(10)
            try:
                exercise(cache)
                outcomes["ok"] += 1
            except KDCacheError as error:
                assert "\n" not in str(error), str(error)
                outcomes["refused"] += 1
            except Exception as error:
                pytest.fail(f"case {case}: {type(error).__name__}: {error}")
            finally:
                signal.alarm(0)
            assert _snapshot(tmp_path, cache) == before, f"case {case} touched a file outside the cache"
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["refused"] > CASES // 2, outcomes
