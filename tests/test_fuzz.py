"""Fuzzing a small cache: random byte flips and random manifest edits, seeded, a few hundred cases.

Every case must end in success or a `KDCacheError` (never another exception, a hang, or a read or
write outside the cache), and whatever reads successfully must hold finite targets: a NaN may be
refused, never trained on silently. Half the cases are "forged": the manifest is re-hashed to vouch
for the damaged files, so the value checks, not the hashes, must catch them.
"""

from __future__ import annotations

import functools
import http.server
import json
import random
import shutil
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from conftest import skewed_topk_cache
from hostile import rehash

from kdcache import DumpSettings, dump_teacher, import_dataset
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


def attempt(action, outcomes: dict[str, int], case: int) -> bool:
    """Run one case: it succeeds (True) or raises a one-line `KDCacheError` (False), never anything else."""
    try:
        action()
    except KDCacheError as error:
        assert "\n" not in str(error), str(error)
        outcomes["refused"] += 1
        return False
    except Exception as error:  # noqa: BLE001 - any other exception is the bug this test looks for
        pytest.fail(f"case {case}: {type(error).__name__}: {error}")
    outcomes["ok"] += 1
    return True


def read_remote(url: str, downloads: Path) -> None:
    opened = open_cache(url, downloads, transfer_timeout=1.0)
    opened.verify(progress=False)
    sum(1 for _ in opened.sequences())


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


@pytest.fixture(scope="module")
def head_tail_cache(tmp_path_factory, teacher_dir, corpus) -> Path:
    """A compact, zstd, 8-bit head-tail cache: the head, the tail mass and draws from the tail."""
    out = tmp_path_factory.mktemp("head-tail") / "cache"
    dump_teacher(str(teacher_dir), str(corpus), out,
                 DumpSettings(targets="head-tail", top_k=4, samples=16, codec="compact", logprob_dtype="uint8",
                              compression="zstd", limit=12, batch_size=6, shard_rows=6), progress=False)
    return out


@pytest.mark.parametrize("fixture, cases", [("cache_dir", CASES), ("ranked_cache", CASES), ("head_tail_cache", 150)])
def test_fuzzed_caches_fail_cleanly(fixture, cases, request, tmp_path):
    cache_dir = request.getfixturevalue(fixture)
    outside = tmp_path / "outside.arrow"
    outside.write_bytes(b"not part of the cache")
    files = sorted(str(path.relative_to(cache_dir)) for path in cache_dir.rglob("*") if path.is_file())
    previous = signal.signal(signal.SIGALRM, _alarm)
    outcomes = {"ok": 0, "refused": 0}
    try:
        for case in range(cases):
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
                attempt(lambda: exercise(cache), outcomes, case)
            finally:
                signal.alarm(0)
            assert _snapshot(tmp_path, cache) == before, f"case {case} touched a file outside the cache"
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert outcomes["refused"] > cases // 2, outcomes


class Liar(http.server.SimpleHTTPRequestHandler):
    """Each GET of a cache file misbehaves as the request's seed says: the real bytes, a Content-Length that
    lies (longer or shorter), a trickle, a body that never ends, or flipped bytes."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            return super().do_GET()
        data, rng = path.read_bytes(), random.Random(f"{self.server.seed}-{self.path}")
        mode = rng.choice(["real", "long", "short", "trickle", "endless", "flip"])
        if mode == "flip" and data:
            data = bytearray(data)
            data[rng.randrange(len(data))] ^= 0xFF
        self.send_response(200)
        if mode != "endless":
            self.send_header("Content-Length", str(len(data) + {"long": 100, "short": -1}.get(mode, 0)))
        self.end_headers()
        try:
            if mode == "trickle":
                for byte in data[:50]:
                    self.wfile.write(bytes([byte]))
                    self.wfile.flush()
                    time.sleep(0.1)
            else:
                self.wfile.write(bytes(data[:-1]) if mode == "short" else bytes(data))
                if mode == "endless":
                    for _ in range(8):
                        self.wfile.write(bytes(1 << 20))
        except OSError:
            pass
        self.close_connection = True


def test_lying_servers_fail_cleanly_within_the_deadline(cache_dir, tmp_path):
    """A remote cache whose server lies about sizes, trickles, never ends or flips bytes, seeded per case: every
    read ends in success or one line, within the transfer deadline (1 s per transfer here), and nothing lands in
    the read-through directory but verified shards."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Liar, directory=str(cache_dir)))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}"
    outcomes = {"ok": 0, "refused": 0}
    try:
        for case in range(12):
            server.seed = case
            downloads = tmp_path / f"downloads-{case}"
            started = time.monotonic()
            attempt(lambda: read_remote(url, downloads), outcomes, case)
            assert time.monotonic() - started < 30, f"case {case} outlived its deadlines"
            names = {path.name for path in downloads.glob("*")} if downloads.exists() else set()
            shas = {f"{shard.sha256}.arrow" for shard in open_cache(cache_dir).manifest.shards}
            assert names <= shas, f"case {case} left {names - shas}"
    finally:
        server.shutdown()
        server.server_close()
    assert outcomes["refused"] >= 6, outcomes


def test_damaged_imports_fail_cleanly(tmp_path):
    """DistillKit datasets with ragged, mistyped, out-of-range or non-finite rows, seeded: success or one line."""
    import datasets
    from conftest import MINILM_DIR
    odd = [None, [], [[]], "x", [1.5], [[1, 2], [3]], [[-1, 5]], [[10**9, 1]], [[float("nan"), 0.0]], [[1, 2]]]
    outcomes = {"ok": 0, "refused": 0}
    for case in range(30):
        rng = random.Random(case)
        rows = {"input_ids": [[1000, 1001, 1002]] * 3, "token_ids": [[[1000, 1001]] * 3] * 3,
                "top_values": [[[-1.0, -2.0]] * 3] * 3}
        column = rng.choice(sorted(rows))
        rows[column] = list(rows[column])
        rows[column][rng.randrange(3)] = rng.choice(odd)
        source = tmp_path / f"source-{case}"
        try:
            datasets.Dataset.from_dict(rows).save_to_disk(str(source))
        except (ValueError, TypeError, pa.ArrowException):
            continue  # `datasets` itself cannot hold this damage
        out = tmp_path / f"cache-{case}"
        if not attempt(lambda: import_dataset(str(source), out, "distillkit", tokenizer=MINILM_DIR), outcomes, case):
            assert not out.exists(), f"case {case}: a failed import left its output"
    assert outcomes["refused"] >= 5, outcomes
