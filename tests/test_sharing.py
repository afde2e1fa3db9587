"""Sharing caches against a real S3 API: moto's S3 server on 127.0.0.1, reached by s3fs over HTTP.

Nothing of kdcache is mocked: the server speaks the S3 protocol (with IAM authentication switched on,
so wrong credentials are refused as AWS refuses them), and s3fs finds it through the standard AWS
environment variables, exactly as a user's `kdcache copy` would.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import urllib.request
import uuid
from pathlib import Path

import boto3
import datasets
import numpy as np
import pytest
import s3fs
from click.testing import CliRunner
from conftest import LANGUAGE, skewed_topk_cache, write_jsonl
from moto.server import ThreadedMotoServer

from kdcache.cache.card import CARD_NAME
from kdcache.cache.format import MANIFEST_NAME, Manifest
from kdcache.cache.merge import merge_caches
from kdcache import open_cache
from kdcache.cache.reader import content_sha256
from kdcache.cache.transfer import COPY_MARKER, copy_cache
from kdcache.cli import main
from kdcache.errors import KDCacheError
from kdcache.student import TrainSettings, train_student
from kdcache.teacher import DumpSettings, dump_teacher

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3 endpoint with one IAM user; its credentials go into the environment for the session."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
    port = _free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1",
                       aws_access_key_id="setup", aws_secret_access_key="setup")
    iam.create_user(UserName="team")
    policy = iam.create_policy(PolicyName="all", PolicyDocument=json.dumps(
        {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}))
    iam.attach_user_policy(UserName="team", PolicyArn=policy["Policy"]["Arn"])
    key = iam.create_access_key(UserName="team")["AccessKey"]
    urllib.request.urlopen(urllib.request.Request(f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST",
                                                  headers={"Content-Type": "text/plain"}))  # authenticate from now on
    environment = {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"],
                   "AWS_ENDPOINT_URL_S3": endpoint, "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {name: os.environ.get(name) for name in environment}
    os.environ.update(environment)
    yield environment
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
    server.stop()


@pytest.fixture
def bucket(s3_server):
    """A fresh bucket, and an s3fs handle of its own to play the other side (another team, a failing disk)."""
    fs = s3fs.S3FileSystem(skip_instance_cache=True)
    name = f"kd-{uuid.uuid4().hex[:12]}"
    fs.mkdir(name)
    return name, fs


def files_under(directory: Path) -> set[str]:
    return {str(path.relative_to(directory)) for path in directory.rglob("*") if path.is_file()}


def run_cli(*args, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kdcache", *map(str, args)], check=False, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=120)


def invoke(*args) -> subprocess.CompletedProcess:
    """The CLI in this process (the S3 credentials are those of the session)."""
    result = CliRunner().invoke(main, [str(arg) for arg in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.exception
    return subprocess.CompletedProcess(args, result.exit_code, result.stdout, result.stderr)


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one line a failed command prints after its progress bars (and no traceback)."""
    assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
    return result.stderr.strip().splitlines()[-1]


def test_push_info_pull_and_train_from_s3(cache_dir, bucket, student_config, tmp_path):
    name, fs = bucket
    url = f"s3://{name}/team-a/cache"
    pushed = copy_cache(cache_dir, url, progress=False)
    manifest = Manifest.load(cache_dir)
    assert pushed.copied == sorted(shard.file for shard in manifest.shards) and not pushed.skipped
    assert not fs.exists(f"{name}/team-a/cache/{COPY_MARKER}")
    assert fs.cat(f"{name}/team-a/cache/{MANIFEST_NAME}") == (cache_dir / MANIFEST_NAME).read_bytes()

    info = CliRunner().invoke(main, ["info", url])
    assert info.exit_code == 0, info.output
    assert f"{len(manifest.shards)} shards, {manifest.total_rows} sequences" in info.stdout
    assert f"card         {CARD_NAME}" in info.stdout

    pulled = tmp_path / "pulled"
    copy_cache(url, pulled, progress=False)
    assert files_under(pulled) == files_under(cache_dir)
    open_cache(pulled).verify(progress=False)

    summary = train_student(url, tmp_path / "student", student_config=str(student_config), progress=False,
                            settings=TrainSettings(max_steps=2, batch_size=4, shuffle_buffer=4))
    assert summary["steps"] == 2


def test_interrupted_push_resumes_and_skips_what_arrived(cache_dir, bucket):
    name, fs = bucket
    url = f"s3://{name}/cache"
    arrived = []

    def stop_after_two_shards(relative):
        arrived.append(relative)
        if len(arrived) == 2:
            raise RuntimeError("connection lost")

    with pytest.raises(RuntimeError, match="connection lost"):
        copy_cache(cache_dir, url, workers=1, progress=False, on_file=stop_after_two_shards)
    assert not fs.exists(f"{name}/cache/{MANIFEST_NAME}")  # no reader sees a half-published cache
    assert fs.exists(f"{name}/cache/{COPY_MARKER}")

    resumed = copy_cache(cache_dir, url, progress=False)
    assert resumed.skipped == sorted(arrived)
    assert len(resumed.copied) == len(Manifest.load(cache_dir).shards) - 2
    open_cache(url).verify(progress=False)
    again = copy_cache(cache_dir, url, progress=False)  # a finished copy: nothing to move
    assert not again.copied


def test_a_shard_corrupted_on_the_server_is_caught_and_not_kept(cache_dir, bucket, tmp_path):
    name, fs = bucket
    url = f"s3://{name}/cache"
    copy_cache(cache_dir, url, progress=False)
    shard = Manifest.load(cache_dir).shards[1]
    data = bytearray(fs.cat(f"{name}/cache/{shard.file}"))
    data[len(data) // 2] ^= 0xFF
    fs.pipe(f"{name}/cache/{shard.file}", bytes(data))

    assert error_line(invoke("copy", url, tmp_path / "pulled")) == (
        f"Error: {shard.file} from {url} fails its check ({shard.bytes} bytes, the manifest says {shard.bytes}; "
        f"sha256 differs): the source is corrupt or was modified; nothing was kept")
    pulled = files_under(tmp_path / "pulled")
    assert shard.file not in pulled and MANIFEST_NAME not in pulled
    assert not [path for path in pulled if path.endswith(".partial")]


def test_wrong_credentials_missing_cache_and_vanished_bucket_are_one_line_errors(cache_dir, bucket, tmp_path):
    name, fs = bucket
    url = f"s3://{name}/cache"
    copy_cache(cache_dir, url, progress=False)

    denied = run_cli("copy", url, tmp_path / "a", env={"AWS_ACCESS_KEY_ID": "AKIAWRONG",
                                                       "AWS_SECRET_ACCESS_KEY": "wrong"})
    assert error_line(denied).startswith(f"Error: cannot read cache {url}: ")
    assert not (tmp_path / "a").exists()

    missing = invoke("copy", f"s3://{name}/nothing-here", tmp_path / "b")
    assert error_line(missing) == f"Error: not a kdcache cache (no {MANIFEST_NAME}): s3://{name}/nothing-here"

    def delete_the_bucket(relative):
        fs.rm(name, recursive=True)

    with pytest.raises(KDCacheError, match="disappeared from|missing from") as error:
        copy_cache(url, tmp_path / "c", workers=1, progress=False, on_file=delete_the_bucket)
    assert "\n" not in str(error.value)
    left = files_under(tmp_path / "c")
    assert MANIFEST_NAME not in left and not [path for path in left if path.endswith(".partial")]


def test_pulled_subsets_are_valid_caches_with_exact_statistics(cache_dir, tmp_path):
    source = Manifest.load(cache_dir)
    rows = source.shards[0].rows + 5  # the second shard is cut
    copy_cache(cache_dir, tmp_path / "rows", rows=rows, progress=False)
    subset = Manifest.load(tmp_path / "rows")
    open_cache(tmp_path / "rows").verify(progress=False)
    assert subset.total_rows == rows == subset.dataset["rows_dumped"]
    ids = open_cache(cache_dir).sample_ids()[:rows]
    assert open_cache(tmp_path / "rows").sample_ids().tolist() == ids.tolist()
    assert subset.stats["content_sha256"] == content_sha256(tmp_path / "rows", subset, subset.shards)
    assert subset.sources[0]["selection"] == {"rows": rows}
    assert subset.dump_fingerprint != source.dump_fingerprint
    assert subset.stats["fidelity"]["positions"] < source.stats["fidelity"]["positions"]  # whole shards only

    wanted = [int(i) for i in open_cache(cache_dir).sample_ids()[::7]]
    copy_cache(cache_dir, tmp_path / "ids", sample_ids=wanted, progress=False)
    open_cache(tmp_path / "ids").verify(progress=False)
    assert sorted(sequence.sample_id for sequence in open_cache(tmp_path / "ids").sequences()) == sorted(wanted)

    every_shard = list(range(len(source.shards)))  # a "subset" of every shard: statistics combine exactly
    copy_cache(cache_dir, tmp_path / "all", shards=every_shard, progress=False)
    whole = Manifest.load(tmp_path / "all")
    for key in ("tokens", "captured_mass", "fidelity", "teacher_nll", "content_sha256"):
        assert whole.stats[key] == source.stats[key], key


def test_copy_refuses_a_destination_holding_something_else(cache_dir, tmp_path):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    with pytest.raises(KDCacheError, match="is not empty and holds no kdcache cache"):
        copy_cache(cache_dir, tmp_path / "busy", progress=False)
    copy_cache(cache_dir, tmp_path / "subset", rows=3, progress=False)
    with pytest.raises(KDCacheError, match="already holds a different cache"):
        copy_cache(cache_dir, tmp_path / "subset", rows=4, progress=False)


def test_card_loads_with_datasets_and_describes_the_cache(cache_dir):
    card = (cache_dir / CARD_NAME).read_text()
    manifest = Manifest.load(cache_dir)
    assert card.startswith("---\n") and "path: data/*.arrow" in card and "task_categories:" in card
    assert manifest.dump_fingerprint in card and f"kdcache train-student --cache {cache_dir}" in card
    loaded = datasets.load_dataset(str(cache_dir), split="train")
    assert loaded.num_rows == manifest.total_rows
    assert sorted(loaded["sample_id"]) == sorted(open_cache(cache_dir).sample_ids().tolist())


def test_load_dataset_never_serves_another_caches_rows(cache_dir, tmp_path):
    """`datasets` keys its copy of a folder by the folder's name: two caches called `cache`, and a cache
    rewritten in place, must still each load their own rows (the card carries the shards' fingerprint)."""
    hf_cache = tmp_path / "hf"
    for parent, rows in (("x1", 3), ("x2", 5)):
        copy_cache(cache_dir, tmp_path / parent / "cache", rows=rows, progress=False)
    for parent, rows in (("x1", 3), ("x2", 5), ("x1", 3)):
        loaded = datasets.load_dataset(str(tmp_path / parent / "cache"), split="train", cache_dir=str(hf_cache))
        assert loaded.num_rows == rows, parent
    shutil.rmtree(tmp_path / "x1" / "cache")
    copy_cache(cache_dir, tmp_path / "x1" / "cache", rows=4, progress=False)
    loaded = datasets.load_dataset(str(tmp_path / "x1" / "cache"), split="train", cache_dir=str(hf_cache))
    assert loaded.num_rows == 4
    assert sorted(loaded["sample_id"]) == sorted(open_cache(tmp_path / "x1" / "cache").sample_ids().tolist())


def test_hf_urls_go_through_the_same_fsspec_path_offline(tmp_path):
    """No network here: an hf:// cache resolves to huggingface_hub's filesystem and fails in one line."""
    result = run_cli("info", "hf://datasets/kdcache/no-such-cache", env={"HF_HUB_OFFLINE": "1"})
    assert result.stderr.strip().splitlines() == [error_line(result)] and result.stderr.startswith("Error: ")


def test_merging_parts_of_one_dump_links_shards_and_reproduces_its_statistics(cache_dir, tmp_path):
    source = Manifest.load(cache_dir)
    copy_cache(cache_dir, tmp_path / "a", shards=[0], progress=False)
    copy_cache(cache_dir, tmp_path / "b", shards=list(range(1, len(source.shards))), progress=False)
    result = invoke("merge", tmp_path / "a", tmp_path / "b", "--out", tmp_path / "merged")
    assert result.returncode == 0, result.stderr
    assert "sample ids kept" in result.stdout
    merged = Manifest.load(tmp_path / "merged")
    open_cache(tmp_path / "merged").verify(progress=False)
    for key in ("tokens", "captured_mass", "fidelity", "teacher_nll", "content_sha256"):
        assert merged.stats[key] == source.stats[key], key
    first = merged.sources[0]["shards"][0]
    assert (tmp_path / "merged" / first).stat().st_ino == (tmp_path / "a" / source.shards[0].file).stat().st_ino


def test_merging_dumps_of_different_data_shifts_colliding_ids(cache_dir, teacher_dir, tmp_path):
    corpus = write_jsonl(tmp_path / "other.jsonl", LANGUAGE.sentences(20, min_words=4, max_words=12, seed=9))
    other = dump_teacher(str(teacher_dir), str(corpus), tmp_path / "other",
                         DumpSettings(top_k=8, batch_size=8, shard_rows=16, hidden_layers=(-1,), codec="plain", compression="none"), progress=False)
    first = Manifest.load(cache_dir)
    merged = merge_caches([cache_dir, tmp_path / "other"], tmp_path / "merged", progress=False)
    open_cache(tmp_path / "merged").verify(progress=False)
    offset = merged.sources[1]["id_offset"]
    assert merged.sources[0]["id_offset"] == 0 and offset == int(open_cache(cache_dir).sample_ids().max()) + 1
    ids = open_cache(tmp_path / "merged").sample_ids()
    assert len(set(ids.tolist())) == len(ids) == first.total_rows + other.total_rows
    rows = {sequence.sample_id: sequence for sequence in open_cache(tmp_path / "merged").sequences()}
    for sequence in open_cache(tmp_path / "other").sequences():  # the same targets, under the shifted id
        shifted = rows[sequence.sample_id + offset]
        assert (shifted.topk_logprobs == sequence.topk_logprobs).all() and (shifted.topk_ids == sequence.topk_ids).all()
    positions = first.stats["fidelity"]["positions"] + other.stats["fidelity"]["positions"]
    assert merged.stats["fidelity"]["positions"] == positions
    assert merged.stats["tokens"] == first.stats["tokens"] + other.stats["tokens"]


def test_merge_refuses_caches_of_different_teachers_and_leaves_nothing(cache_dir, tmp_path):
    copy_cache(cache_dir, tmp_path / "other-teacher", rows=5, progress=False)
    manifest_path = tmp_path / "other-teacher" / MANIFEST_NAME
    manifest = json.loads(manifest_path.read_text())
    manifest["teacher"]["weights_sha256"] = "0" * 64
    manifest_path.write_text(json.dumps(manifest))
    result = invoke("merge", cache_dir, tmp_path / "other-teacher", "--out", tmp_path / "merged")
    assert error_line(result).startswith("Error: cannot merge caches of different teachers, tokenizers or target "
                                         "settings: they differ in teacher weights (weights_sha256)")
    assert not (tmp_path / "merged").exists()


def test_head_tail_caches_merge_only_with_the_same_draws(teacher_dir, corpus, tmp_path):
    """Two halves of a head-tail dump merge, keeping its fidelity card (draws included); a half whose draws were
    made another way (`sampling`) is refused, naming it."""
    def head_tail(out, sampling, limit):
        return dump_teacher(str(teacher_dir), str(corpus), out, DumpSettings(
            targets="head-tail", top_k=4, samples=16, sampling=sampling, limit=limit, batch_size=4, shard_rows=4),
            progress=False)
    source = head_tail(tmp_path / "whole", "proportional", 8)
    copy_cache(tmp_path / "whole", tmp_path / "a", shards=[0], progress=False)
    copy_cache(tmp_path / "whole", tmp_path / "b", shards=[1], progress=False)
    merged = merge_caches([tmp_path / "a", tmp_path / "b"], tmp_path / "merged", progress=False)
    assert merged.stats["fidelity"] == source.stats["fidelity"]
    assert merged.stats["fidelity"]["head-tail"]["draws"] == 16
    head_tail(tmp_path / "systematic", "systematic", 4)
    with pytest.raises(KDCacheError, match=r"differ in sampling \("):
        merge_caches([tmp_path / "a", tmp_path / "systematic"], tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()



def test_caches_whose_ids_two_recodes_ranked_do_not_merge(tmp_path):
    """Each recode ranks the ids its own cache lists, so two ranked caches number ids differently: refused,
    naming the ranking; merged before recoding they are fine."""
    from kdcache.teacher.recode import RecodeSettings, recode_cache
    ranked = [recode_cache(skewed_topk_cache(tmp_path / f"part{seed}", seed=seed), tmp_path / f"ranked{seed}",
                           RecodeSettings(), progress=False) for seed in (0, 1)]
    assert ranked[0].codec.id_ranking != ranked[1].codec.id_ranking
    with pytest.raises(KDCacheError, match=r"differ in id ranking \(merge before `recode`\)"):
        merge_caches([tmp_path / "ranked0", tmp_path / "ranked1"], tmp_path / "refused", progress=False)
    assert not (tmp_path / "refused").exists()
    merge_caches([tmp_path / "part0", tmp_path / "part1"], tmp_path / "merged", progress=False)
    assert recode_cache(tmp_path / "merged", tmp_path / "merged-ranked", RecodeSettings(), progress=False).format_version == 4


@pytest.mark.parametrize("fmt", ["distillkit", "axolotl"])
def test_export_and_import_round_trip(cache_dir, tmp_path, fmt):
    source = Manifest.load(cache_dir)
    exported = invoke("export", "--format", fmt, cache_dir, tmp_path / fmt)
    assert exported.returncode == 0, exported.stderr
    rows = datasets.load_from_disk(str(tmp_path / fmt))
    ids_column, logprobs_column = ("token_ids", "top_values") if fmt == "distillkit" else (
        "target_token_ids", "target_logprobs")
    assert rows.num_rows == source.total_rows
    assert {"input_ids", ids_column, logprobs_column} <= set(rows.column_names)

    imported = invoke("import", "--format", fmt, "--tokenizer", cache_dir / "tokenizer", tmp_path / fmt,
                      tmp_path / "back")
    assert imported.returncode == 0, imported.stderr
    back = Manifest.load(tmp_path / "back")
    open_cache(tmp_path / "back").verify(progress=False)
    assert back.tokenizer["hash"] == source.tokenizer["hash"] and back.top_k == source.top_k
    for before, after in zip(open_cache(cache_dir).sequences(), open_cache(tmp_path / "back").sequences()):
        assert (before.input_ids == after.input_ids).all() and (before.topk_ids == after.topk_ids).all()
        logprobs = before.topk_logprobs.astype(np.float32)
        if fmt == "distillkit":  # full-vocabulary log-probs, the head scaled to 1 - tail: values and tail survive
            np.testing.assert_allclose(after.topk_logprobs, logprobs, atol=2e-3)
            np.testing.assert_allclose(np.exp(after.tail_logprob), np.exp(before.tail_logprob), atol=2e-3)
        else:  # axolotl renormalises the top-k: the tail is lost
            np.testing.assert_allclose(np.exp(after.topk_logprobs).sum(axis=1), 1, atol=1e-5)
            assert np.isneginf(after.tail_logprob).all()
