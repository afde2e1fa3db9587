"""The streaming reader: disjoint equal shares per process, deterministic seeded order, exact positions,
remote caches over HTTP, and real 2-process training under `accelerate launch`."""

from __future__ import annotations

import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import threading
from collections import Counter
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM

from kdcache import open_cache
from kdcache.cache.format import Manifest
from kdcache.cache.sharding import process_spans
from kdcache.errors import KDCacheError
from kdcache.student import TrainSettings, train_student

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("shard_rows,processes", [([16, 16, 16], 2), ([16, 16, 16], 5), ([7], 3), ([5, 9, 1, 30], 4)])
def test_process_shares_are_disjoint_equal_and_cover_the_epoch(shard_rows, processes):
    for epoch in range(3):
        shares = [[(span.shard, row) for span in process_spans(shard_rows, process_index=rank, num_processes=processes,
                                                               shuffle=True, seed=5, epoch=epoch)
                   for row in range(span.start, span.stop)] for rank in range(processes)]
        rows = [row for share in shares for row in share]
        assert len(set(rows)) == len(rows), "a row is read twice in one epoch"
        assert {len(share) for share in shares} == {sum(shard_rows) // processes}, "unequal shares hang collectives"
        assert all(0 <= row < shard_rows[shard] for shard, row in rows)


def sample_ids(cache_dir, **options) -> list[int]:
    return [sequence.sample_id for sequence in open_cache(cache_dir).sequences(**options)]


def test_shuffled_epoch_is_seeded_and_split_across_processes(cache_dir):
    options = dict(shuffle=True, seed=1, shuffle_buffer=8)
    shares = [sample_ids(cache_dir, epoch=0, process_index=rank, num_processes=3, **options) for rank in range(3)]
    assert sorted(sum(shares, [])) == list(range(48)) and {len(share) for share in shares} == {16}
    assert shares[0] == sample_ids(cache_dir, epoch=0, process_index=0, num_processes=3, **options)
    assert shares[0] != sample_ids(cache_dir, epoch=1, process_index=0, num_processes=3, **options)
    assert sample_ids(cache_dir, **options) != sorted(sample_ids(cache_dir, **options)), "not shuffled"


@pytest.mark.parametrize("start", [0, 1, 7, 20, 23, 24, 30])
def test_reading_from_a_position_continues_the_same_order(cache_dir, start):
    options = dict(shuffle=True, seed=2, epoch=1, shuffle_buffer=6, process_index=1, num_processes=2)
    full = list(open_cache(cache_dir).sequences(**options))
    tail = list(open_cache(cache_dir).sequences(start=start, **options))
    assert [s.sample_id for s in tail] == [s.sample_id for s in full[start:]]
    assert all((a.topk_logprobs == b.topk_logprobs).all() for a, b in zip(tail, full[start:]))


def test_only_rows_still_to_come_are_decoded(cache_dir, tmp_path):
    """Reading from a position decodes only the record batches holding rows still to come. The first two
    shards are rewritten without their hidden-state column: reading any of their rows fails (the checked
    reader refuses their schema), so reading from the start does, while reading the last rows does not."""
    damaged = tmp_path / "damaged"
    shutil.copytree(cache_dir, damaged)
    manifest = Manifest.load(damaged)
    hidden = {"hidden_layers": manifest.hidden_layers}
    for shard in manifest.shards[:2]:
        table = pa.ipc.open_file(cache_dir / shard.file).read_all().drop_columns([f"hidden_{manifest.hidden_layers[0]}"])
        with pa.ipc.new_file(damaged / shard.file, table.schema) as writer:
            writer.write_table(table)
    with pytest.raises(KDCacheError, match="does not match the manifest"):
        list(open_cache(damaged).sequences(**hidden))
    tail = list(open_cache(damaged).sequences(start=44, **hidden))
    # the dump writes a record batch per window of batches: here the whole 16-row last shard
    assert [s.sample_id for s in tail] == [44, 45, 46, 47] and all(s.hidden for s in tail)
    assert all(s.hidden == {} for s in open_cache(cache_dir).sequences(start=44)), \
        "hidden states are decoded only when asked for"


class RangeRequestHandler(http.server.SimpleHTTPRequestHandler):
    """`python -m http.server` plus single `Range: bytes=a-b` requests, like any object store or CDN."""

    def log_message(self, *args):
        pass

    def send_head(self):
        spec = self.headers.get("Range")
        path = Path(self.translate_path(self.path))
        if not spec or not path.is_file():
            return super().send_head()
        first, last = spec.removeprefix("bytes=").split("-")
        data = path.read_bytes()
        body = data[int(first):int(last) + 1]
        self.send_response(206)
        self.send_header("Content-Range", f"bytes {first}-{int(first) + len(body) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        return __import__("io").BytesIO(body)


def serve(directory: Path, handler) -> tuple[http.server.ThreadingHTTPServer, str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler, directory=str(directory)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, f"http://127.0.0.1:{server.server_address[1]}"


@pytest.fixture()
def served_cache(cache_dir):
    server, url = serve(cache_dir, RangeRequestHandler)
    yield url
    server.shutdown()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    """Exactly `python -m http.server`: no `Range` support."""

    def log_message(self, *args):
        pass


def test_a_server_without_ranges_needs_a_read_through_directory(cache_dir, tmp_path):
    server, url = serve(cache_dir, QuietHandler)
    try:
        with pytest.raises(KDCacheError, match="support range requests.*a read-through directory downloads"):
            next(open_cache(url).sequences())
        assert len(list(open_cache(url, read_through=tmp_path).sequences())) == 48
    finally:
        server.shutdown()


def weights(path: Path) -> dict[str, torch.Tensor]:
    return AutoModelForCausalLM.from_pretrained(path).state_dict()


@pytest.mark.slow
def test_cache_served_over_http_trains_like_the_local_copy(cache_dir, served_cache, student_config, tmp_path):
    settings = dict(max_steps=4, batch_size=4, hidden_weight=1.0, shuffle_buffer=8)
    train_student(cache_dir, tmp_path / "local", student_config=str(student_config), progress=False,
                  settings=TrainSettings(**settings))
    train_student(served_cache, tmp_path / "remote", student_config=str(student_config), progress=False,
                  settings=TrainSettings(**settings))
    train_student(served_cache, tmp_path / "read-through", student_config=str(student_config), progress=False,
                  settings=TrainSettings(**settings, read_through=str(tmp_path / "downloads")))
    local = weights(tmp_path / "local")
    for other in ("remote", "read-through"):
        assert all(torch.equal(local[name], value) for name, value in weights(tmp_path / other).items()), other
    assert len(list((tmp_path / "downloads").rglob("*.arrow"))) == len(Manifest.load(cache_dir).shards)
    assert (tmp_path / "remote" / "tokenizer.json").is_file()


def test_missing_remote_cache_is_a_one_line_error(served_cache, student_config, tmp_path):
    with pytest.raises(KDCacheError, match="not a kdcache cache"):
        train_student(served_cache + "/nowhere", tmp_path / "out", student_config=str(student_config), progress=False)


def train_in_two_processes(cache_dir, student_config, out: Path, log: Path, **settings) -> dict[int, list[tuple[int, int]]]:
    """Run train_student in two gloo processes; return each rank's logged (epoch, sample id) pairs."""
    # `accelerate launch --cpu --num_processes 2` starts ONE process in accelerate 1.x (multi-CPU goes
    # through mpirun); the torchrun launcher plus ACCELERATE_USE_CPU gives two gloo processes.
    settings = json.dumps({"epochs": 2, "batch_size": 5, "verify": False, **settings})
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
               "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               str(REPO / "tests" / "launched_training.py"), str(cache_dir), str(student_config), str(out), str(log),
               settings]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "ACCELERATE_USE_CPU": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (out / "config.json").is_file()
    return {rank: [tuple(map(int, line.split())) for line in Path(f"{log}.rank{rank}").read_text().splitlines()]
            for rank in (0, 1)}


@pytest.mark.slow
def test_two_processes_see_every_example_exactly_once_per_epoch(cache_dir, student_config, tmp_path):
    seen = train_in_two_processes(cache_dir, student_config, tmp_path / "student", tmp_path / "samples")
    assert len(seen[0]) == len(seen[1]) == 2 * 24, "both processes take the same number of examples"
    for epoch in (0, 1):
        ids = Counter(sample for rank in (0, 1) for e, sample in seen[rank] if e == epoch)
        assert sorted(ids) == list(range(48)) and set(ids.values()) == {1}


@pytest.mark.slow
def test_two_processes_with_a_validation_split_never_train_on_heldout_rows(cache_dir, student_config, tmp_path):
    """36 training rows: 18 per process per epoch, each exactly once; validation, checkpoints and a learned
    16→32 hidden-state projection (a DDP-wrapped module) under two processes."""
    out = tmp_path / "student"
    seen = train_in_two_processes(cache_dir, student_config, out, tmp_path / "samples", val_fraction=0.25,
                                  eval_every=3, save_every=3, hidden_weight=0.5)
    train = open_cache(cache_dir).split(0.25).train
    assert len(seen[0]) == len(seen[1]) == 2 * 18
    for epoch in (0, 1):
        ids = Counter(sample for rank in (0, 1) for e, sample in seen[rank] if e == epoch)
        assert set(ids) == train and set(ids.values()) == {1}
    record = json.loads((out / "kdcache_training.json").read_text())
    assert record["summary"]["steps"] == 8 and record["summary"]["validation"]["heldout_sequences"] == 12
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-00000003", "step-00000006"]
    assert (out / "kdcache_projections.pt").is_file()

def test_kept_rows_are_dealt_in_equal_shares_and_resume_exactly(cache_dir):
    """A training split: processes share exactly the kept rows, equally, and positions count kept rows."""
    cache = open_cache(cache_dir)
    train = cache.split(0.25).train
    subset = cache.subset(train)
    options = dict(shuffle=True, seed=4, epoch=1, shuffle_buffer=6, num_processes=3)
    ids = lambda **more: [sequence.sample_id for sequence in subset.sequences(**options, **more)]
    shares = [ids(process_index=rank) for rank in range(3)]
    assert sorted(sum(shares, [])) == sorted(train) and {len(share) for share in shares} == {12}
    for start in (0, 5, 11):
        assert ids(process_index=1, start=start) == shares[1][start:]
