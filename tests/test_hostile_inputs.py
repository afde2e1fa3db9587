"""Untrusted input, round two (issue 25): every size bounded before it is allocated, the manifest parsed against
its schema, what people open escaped, no credential written down, columns checked before Arrow slices them,
files opened rather than paths trusted twice. Each attack is forged through tests/hostile.py, hashes recomputed,
so kdcache's own checks, not a stale hash, must catch it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from hostile import (
    copy_cache,
    corrupt_list_offsets,
    edit_manifest,
    endless,
    rehash,
    redirecting,
    rewrite_shard,
    serve,
    with_userinfo,
    written_files,
)
from test_security import one_line_error, run
from test_streaming import RangeRequestHandler

from kdcache.cache.codecs import Codec, Limits, decode_targets
from kdcache.cache.format import Manifest
from kdcache.cache.safety import MAX_DEPTH, copy_contained, redact, redact_url
from kdcache.errors import KDCacheError

REPO = Path(__file__).resolve().parents[1]
SECRET = "s3cr3t-t0ken"


@pytest.fixture()
def hostile(tmp_path, cache_dir):
    return copy_cache(cache_dir, tmp_path / "hostile")


def cli(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    """The CLI in its own process: a native crash (SIGABRT) is a return code here, not the end of the test run."""
    return subprocess.run([sys.executable, "-m", "kdcache", *map(str, args), "--quiet"], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"})


def one_line_failure(result: subprocess.CompletedProcess, fragment: str) -> None:
    assert result.returncode == 1, (result.returncode, result.stderr[-2000:])
    assert "Traceback" not in result.stderr and fragment in result.stderr.replace("`", ""), result.stderr[-2000:]


# 1. Every size is bounded before it is allocated ----------------------------------------------------------------

def test_a_position_listing_thousands_of_ids_is_refused_before_padding():
    """One position of 20,000 ids among 8-id positions: padding the batch to 20,000 slots per position would take
    GBs; the decoder refuses it from the stored entries' count, before allocating."""
    positions = 4096
    lengths = np.full(positions, 8, dtype=np.int64)
    lengths[0] = 20_000
    gaps = np.ones(int(lengths.sum()), dtype=np.uint32)
    def row_list(values, type_):
        return pa.array([values.tolist()], type=pa.list_(type_))
    batch = pa.RecordBatch.from_pydict({
        "topk_lengths": row_list(lengths, pa.uint16()), "topk_ids": row_list(gaps, pa.uint32()),
        "topk_logprobs": row_list(np.full(len(gaps), -1.0, dtype=np.float32), pa.float32()),
        "tail_logprob": row_list(np.full(positions, -1.0, dtype=np.float32), pa.float32())})
    codec = Codec(layout="compact", logprobs="float32")
    with pytest.raises(KDCacheError, match="a position lists 20000 entries .* refused"):
        decode_targets(batch, codec, Limits(vocab_size=100_000, top_k=30_000, draws=None), "shard")
    lengths[0] = 8  # the same batch with every position at 8 decodes
    batch = batch.set_column(0, "topk_lengths", row_list(lengths, pa.uint16()))
    batch = batch.set_column(1, "topk_ids", row_list(np.ones(int(lengths.sum()), dtype=np.uint32), pa.uint32()))
    batch = batch.set_column(2, "topk_logprobs", row_list(np.full(int(lengths.sum()), -1.0, np.float32), pa.float32()))
    columns, _ = decode_targets(batch, codec, Limits(vocab_size=100_000, top_k=30_000, draws=None), "shard")
    assert columns["topk_ids"][1].shape == (positions, 8)


def test_a_vocabulary_larger_than_the_tokenizer_is_refused_before_any_model_is_built(hostile, tmp_path,
                                                                                      student_config):
    edit_manifest(hostile, lambda data: data["tokenizer"].update(vocab_size=50_000_000))
    one_line_error(run("verify", hostile), "tokenizer.vocab_size 50,000,000 is more than the cache's tokenizer files")
    started = time.monotonic()
    result = run("train-student", "--cache", hostile, "--student-config", student_config, "--out", tmp_path / "out",
                 "--max-steps", 1, "--no-verify")
    one_line_error(result, "tokenizer.vocab_size 50,000,000")
    assert time.monotonic() - started < 30 and not (tmp_path / "out").exists()


def test_a_row_longer_than_max_length_is_refused_on_read(hostile, tmp_path, student_config):
    edit_manifest(hostile, lambda data: data["settings"].update(max_length=4))
    one_line_error(run("verify", hostile), "more than the manifest's settings.max_length 4")
    result = run("train-student", "--cache", hostile, "--student-config", student_config, "--out", tmp_path / "out",
                 "--max-steps", 2, "--batch-size", 4, "--no-verify")
    one_line_error(result, "more than the manifest's settings.max_length 4")


@pytest.mark.parametrize("edit, fragment", [
    (lambda data: data["settings"].update(max_length=10**12), "settings.max_length must be between 1 and"),
    (lambda data: data["settings"].update(top_k=10**6), "settings.top_k must be between 1 and"),
    (lambda data: data["settings"].update(top_p=7), "settings.top_p must be in (0, 1]"),
    (lambda data: data["teacher"].update(num_parameters="many"), "teacher.num_parameters must be an integer"),
    (lambda data: data["dataset"].update(num_rows=-5), "dataset.num_rows must be between"),
    (lambda data: data["tokenizer"]["file_bytes"].update({"tokenizer.json": 1 << 40}),
     "tokenizer.file_bytes.tokenizer.json must be between 0 and 268435456"),
    (lambda data: data["tokenizer"]["file_bytes"].update({"other.json": 5}), "which tokenizer.files does not"),
])
def test_manifest_numbers_are_range_checked(hostile, edit, fragment):
    edit_manifest(hostile, edit)
    one_line_error(run("info", hostile), fragment)


def test_a_huge_manifest_or_card_is_not_read_whole(hostile, tmp_path):
    """A server streaming a manifest without end: `info` stops past the cap; a 2 MiB card is refused by `copy`."""
    started = time.monotonic()
    with serve(hostile, endless("kdcache.json", extra_mib=80)) as url:
        one_line_error(run("info", url, "--transfer-timeout", 20), "kdcache.json of cache")
    assert time.monotonic() - started < 20
    (hostile / "README.md").write_text("x" * (2 << 20))
    one_line_error(run("copy", hostile, tmp_path / "copy"), "README.md of cache")
    assert not (tmp_path / "copy" / "kdcache.json").exists()


@pytest.mark.parametrize("card, fragment", [(b"\xff\xfe a card \x80", "is not UTF-8 text"),
                                             (b"x" * (2 << 20), "is larger than 1,048,576 bytes")])
def test_info_notes_a_card_copy_would_refuse(hostile, tmp_path, card, fragment):
    """`info` describes the manifest: a card that is not UTF-8 or too big is named on its line, not a traceback;
    `copy` refuses it in one line."""
    (hostile / "README.md").write_bytes(card)
    result = run("info", hostile)
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    [line] = [line for line in result.output.splitlines() if line.startswith("card ")]
    assert f"README.md, unreadable: README.md of cache {hostile} {fragment}" in line
    one_line_error(run("copy", hostile, tmp_path / "copy"), fragment)


@pytest.mark.parametrize("name", ["shard", "tokenizer.json", "undeclared tokenizer.json"])
def test_a_download_stops_at_the_first_byte_beyond_its_size(hostile, tmp_path, name):
    """A server that never ends a file: a read-through shard stops past the manifest's size, a tokenizer file past
    its declared size (`tokenizer.file_bytes`) or, in a cache from before sizes were recorded, past the fixed cap;
    no file is renamed into place, and it ends long before the transfer deadline."""
    shard = Manifest.load(hostile).shards[0]
    declared = Manifest.load(hostile).tokenizer["file_bytes"]["tokenizer.json"]
    if name == "undeclared tokenizer.json":
        edit_manifest(hostile, lambda data: data["tokenizer"].pop("file_bytes") and None)
    served = Path(shard.file).name if name == "shard" else "tokenizer.json"
    downloads = tmp_path / "downloads"
    started = time.monotonic()
    with serve(hostile, endless(served, extra_mib=300 if name.startswith("undeclared") else 1)) as url:
        result = run("verify", url) if name != "shard" else None
        if name == "shard":
            result = run("copy", url, tmp_path / "copy", "--shards", 0)
            one_line_error(result, f"{shard.file} from {url} is larger than {shard.bytes:,} bytes")
            from kdcache.cache.cache import open_cache
            with pytest.raises(KDCacheError, match="is larger than"):
                open_cache(url, downloads).verify(progress=False)
            assert not list(downloads.glob("*.arrow"))
        else:
            one_line_error(result, "tokenizer/tokenizer.json from cache")
            assert f"is larger than {declared if name == 'tokenizer.json' else 256 << 20:,} bytes" in result.output
    assert time.monotonic() - started < 60


# 2. The manifest is parsed against a schema before anything uses it ---------------------------------------------

STATS_EDITS = {
    "fidelity-list": (lambda data: data["stats"].update(fidelity=[1, 2]), "stats.fidelity must be a JSON object"),
    "unknown-target-kind": (lambda data: data["stats"]["fidelity"].update(magic={"x": 1}),
                            "stats.fidelity must be one of topk, sampled, head-tail"),
    "shard-stats-list": (lambda data: data["stats"]["shard_stats"].update({"data/shard-00000-00000.arrow": []}),
                         "must be a JSON object"),
    "null-samples": (lambda data: data["columns"].update(targets=["head-tail"]) or data["settings"].update(samples=None),
                     "settings.samples must be an integer"),
    "histogram-strings": (lambda data: data["stats"]["captured_mass"].update(histogram=["a"]),
                          "stats.captured_mass.histogram must be an integer"),
    "nan-nll": (lambda data: data["stats"].update(teacher_nll=float("nan")), "stats.teacher_nll must be a finite"),
    "sources-string": (lambda data: data.update(sources=[{"rows": "all"}]), "sources[0].rows must be an integer"),
}


@pytest.mark.parametrize("case", sorted(STATS_EDITS))
@pytest.mark.parametrize("command", ["info", "verify", "merge"])
def test_malformed_fields_are_one_line_errors_everywhere(hostile, tmp_path, cache_dir, case, command):
    edit, fragment = STATS_EDITS[case]
    edit_manifest(hostile, edit)
    args = {"info": ["info", hostile], "verify": ["verify", hostile],
            "merge": ["merge", cache_dir, hostile, "--out", tmp_path / "merged"]}[command]
    one_line_error(run(*args), fragment)
    assert not (tmp_path / "merged").exists()


@pytest.mark.parametrize("depth, fragment", [(MAX_DEPTH + 5, f"deeper than {MAX_DEPTH} levels"),
                                             (200_000, "nested too deeply")])
def test_deeply_nested_manifests_are_refused(hostile, depth, fragment):
    text = (hostile / "kdcache.json").read_text()
    nested = "[" * depth + "]" * depth
    (hostile / "kdcache.json").write_text(text.replace('"dataset": {', f'"dataset": {{"nested": {nested}, ', 1))
    one_line_error(run("info", hostile), fragment)


def test_a_resumed_run_refuses_a_malformed_manifest(hostile, tmp_path, student_config):
    edit_manifest(hostile, lambda data: data["stats"].update(skipped_sample_ids={"a": 1}))
    result = run("train-student", "--cache", hostile, "--student-config", student_config, "--out", tmp_path / "out",
                 "--max-steps", 1, "--resume")
    one_line_error(result, "stats.skipped_sample_ids must be a list of integers")


# 3. Everything shown to a person is escaped for where it is shown ----------------------------------------------

EVIL_TEACHER = "evil</title><script>alert(1)</script>\n## Use\n<img src=x onerror=alert(2)> $\\frac{1}{$ `code`"


def test_html_reports_escape_the_manifest_and_matplotlib_parses_no_math(hostile, tmp_path):
    pytest.importorskip("matplotlib")
    edit_manifest(hostile, lambda data: data["teacher"].update(name_or_path=EVIL_TEACHER))
    result = run("info", hostile, "--plot", tmp_path / "report.html")
    assert result.exit_code == 0, result.output
    page = (tmp_path / "report.html").read_text()
    assert "<script>alert" not in page and "<img src=x" not in page and "&lt;script&gt;alert(1)" in page
    embedded = page.split('id="kdcache-report">', 1)[1].split("</script>", 1)[0]
    assert json.loads(embedded)["teacher"] == EVIL_TEACHER  # the numbers block keeps the value, as data


def test_cards_escape_markdown_so_a_teacher_name_cannot_add_sections(hostile, cache_dir, tmp_path):
    edit_manifest(hostile, lambda data: data["teacher"].update(name_or_path=EVIL_TEACHER))
    result = run("merge", cache_dir, hostile, "--out", tmp_path / "merged")
    assert result.exit_code == 0, result.output
    card = (tmp_path / "merged" / "README.md").read_text()
    assert card.count("\n## Use\n") == 1 and "<script>" not in card and "<img" not in card
    assert "\\`code\\`" not in card.split("- model: ")[1].split("\n")[0]  # a code span: no backtick to close it


def test_a_location_with_backticks_cannot_close_the_cards_code_block(cache_dir, tmp_path):
    out = tmp_path / "x````\n## Injected"  # a legal directory name: backticks, a newline and a heading
    result = run("copy", cache_dir, out, "--rows", 8)
    assert result.exit_code == 0, result.output
    use = (out / "README.md").read_text().split("\n## Use\n", 1)[1]
    fence = use.split("\n", 1)[0]
    assert set(fence) == {"`"} and len(fence) > 4  # longer than the location's run of four
    block, after = use.split("\n" + fence + "\n", 1)[0], use.split("\n" + fence + "\n", 1)[1]
    assert "kdcache info" in block and "\n## Injected" not in use and after.startswith("The shards are Arrow")


# 4. No credential is ever written or printed ----------------------------------------------------------------------

def test_redaction_strips_user_info_and_credential_parameters():
    assert redact_url("https://user:tok@host/cache") == "https://REDACTED@host/cache"
    assert redact_url("https://bucket.s3.amazonaws.com/c?X-Amz-Signature=abc&X-Amz-Credential=k&part=1") == \
        "https://bucket.s3.amazonaws.com/c?X-Amz-Signature=REDACTED&X-Amz-Credential=REDACTED&part=1"
    assert redact_url("/local/path?token=x") == "/local/path?token=x"  # a path, not a URL
    assert SECRET not in redact(f"404, url='https://a:{SECRET}@h/x?sig={SECRET}&api_key={SECRET}'")


def test_copy_merge_and_training_never_write_the_url_credentials(cache_dir, tmp_path, student_config):
    outputs = [tmp_path / name for name in ("subset", "merged", "student")]
    with serve(cache_dir, RangeRequestHandler) as url:
        secret_url = with_userinfo(url, SECRET)
        results = [run("copy", secret_url, outputs[0], "--rows", 20),
                   run("merge", secret_url, outputs[0], "--out", outputs[1]),
                   run("train-student", "--cache", secret_url, "--student-config", student_config, "--out",
                       outputs[2], "--max-steps", 1, "--batch-size", 4),
                   run("info", secret_url + "/missing")]
    assert all(result.exit_code == 0 for result in results[:3]), [result.output for result in results]
    assert results[3].exit_code == 1 and SECRET not in results[3].output and "REDACTED" in results[3].output
    assert all(SECRET not in result.output for result in results)
    leaked = [path for path, data in written_files(*outputs).items() if SECRET.encode() in data]
    assert not leaked, leaked
    assert Manifest.load(outputs[0]).sources[0]["location"] == "http://REDACTED@" + url.split("://")[1]
    assert json.loads((outputs[2] / "kdcache_training.json").read_text())["cache"].startswith("http://REDACTED@")


def test_a_redirect_to_another_origin_is_not_followed(cache_dir):
    with serve(cache_dir, RangeRequestHandler) as real, serve(cache_dir, redirecting(real)) as redirector:
        one_line_error(run("info", redirector), "redirected to another origin")


# 5. Every column is validated before native code slices it ------------------------------------------------------

@pytest.mark.parametrize("command", ["copy-shards", "merge", "recode"])
def test_list_offsets_past_their_data_are_one_line_errors_not_crashes(hostile, cache_dir, tmp_path, command):
    rewrite_shard(hostile, 0, "input_ids", corrupt_list_offsets)
    rehash(hostile)
    out = tmp_path / "out"
    args = {"copy-shards": ["copy", hostile, out, "--shards", 0], "merge": ["merge", cache_dir, hostile, "--out", out],
            "recode": ["recode", hostile, "--out", out]}[command]
    one_line_failure(cli(*args), "is malformed")
    assert not (out / "kdcache.json").exists()
    if command in ("merge", "recode"):
        assert not out.exists()


# 6. Files are opened, not paths trusted twice ----------------------------------------------------------------------

def test_a_symlinked_manifest_is_refused(hostile, tmp_path):
    outside = tmp_path / "elsewhere.json"
    (hostile / "kdcache.json").rename(outside)
    (hostile / "kdcache.json").symlink_to(outside)
    one_line_error(run("info", hostile), "kdcache.json in")
    one_line_error(run("verify", hostile), "goes through a symlink")


def test_a_tokenizer_file_swapped_for_a_symlink_after_its_check_is_not_copied(hostile, tmp_path):
    """`copy_contained` is how copy, merge and recode copy tokenizer files after `verify`: a symlink swapped in
    after the check (here: before the call) is refused, and so is a regular file whose bytes changed."""
    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    tokenizer = hostile / "tokenizer" / "tokenizer.json"
    expected = Manifest.load(hostile).tokenizer["files"]["tokenizer.json"]
    copy_contained(hostile / "tokenizer", "tokenizer.json", tmp_path / "ok.json", expected, 1 << 30)
    assert (tmp_path / "ok.json").read_bytes() == tokenizer.read_bytes()
    tokenizer.write_text("{}")
    with pytest.raises(KDCacheError, match="differs from its sha256"):
        copy_contained(hostile / "tokenizer", "tokenizer.json", tmp_path / "changed.json", expected, 1 << 30)
    tokenizer.unlink()
    tokenizer.symlink_to(secret)
    with pytest.raises(KDCacheError, match="reached without symlinks"):
        copy_contained(hostile / "tokenizer", "tokenizer.json", tmp_path / "stolen.json", None, 1 << 30)
    assert not (tmp_path / "stolen.json").exists()


# 7. Importers: someone else's dataset is untrusted too ------------------------------------------------------------

def test_a_ragged_distillkit_import_is_one_line(tmp_path):
    import datasets

    from conftest import MINILM_DIR
    rows = {"input_ids": [[1000, 1001, 1002]], "token_ids": [[[1000, 1001], [1002]]],
            "top_values": [[[-1.0, -2.0], [-1.0]]]}
    datasets.Dataset.from_dict(rows).save_to_disk(str(tmp_path / "ragged"))
    result = run("import", tmp_path / "ragged", tmp_path / "cache", "--format", "distillkit",
                 "--tokenizer", MINILM_DIR)
    one_line_error(result, "must be [positions][k] lists of the same shape")
    assert not (tmp_path / "cache").exists()
