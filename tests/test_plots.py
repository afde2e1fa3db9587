"""Pictures: `kdcache info --plot` reports a cache as one self-contained HTML page or a PNG, and
train-student draws its loss curves; each file holds what it should, and a missing matplotlib is a
one-line hint."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
from click.testing import CliRunner

from kdcache import open_cache
from kdcache.cache.format import MANIFEST_NAME, Manifest
from kdcache.cli import main


def run(*args):
    return CliRunner().invoke(main, [str(arg) for arg in args])


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_html_report_embeds_the_figure_and_its_numbers(tmp_path, cache_dir):
    report = tmp_path / "report.html"
    result = run("info", cache_dir, "--plot", report)
    assert result.exit_code == 0, result.output
    assert f"report       {report}" in result.output
    page = report.read_text()
    [image] = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert png_size(base64.b64decode(image)) == (1500, 420)
    data = json.loads(re.search(r'<script type="application/json" id="kdcache-report">(.*?)</script>', page, re.S)[1])
    manifest = Manifest.load(cache_dir)
    histogram = data["captured_mass"]["histogram"]
    assert len(histogram) == 100 and sum(histogram) == manifest.stats["tokens"]
    profile = data["captured_mass_by_position"]
    longest = max(len(sequence.input_ids) for sequence in open_cache(cache_dir).sequences())
    assert profile["sequences"] == manifest.total_rows and len(profile["mean"]) == longest
    assert profile["count"][0] == manifest.total_rows and all(0 < mass < 1 for mass in profile["mean"])
    assert {"sample_id", "input_ids", "topk_ids", "topk_logprobs", "tail_logprob", "hidden_2", "token_offsets",
            "text"} == set(data["column_bytes"])
    decoded = {}  # the Arrow buffers once read (shards may be zstd-compressed on disk)
    for shard in manifest.shards:
        table = pa.ipc.open_file(cache_dir / shard.file).read_all()
        for name in table.column_names:
            decoded[name] = decoded.get(name, 0) + table.column(name).nbytes
    assert data["column_bytes"] == decoded and data["file_bytes"] == manifest.total_bytes
    assert "Fidelity card" in page and "kl_rest_bucket" in page


def test_a_cache_without_max_length_is_profiled_by_the_rows_read(tmp_path, cache_dir):
    """`settings.max_length` is optional in the manifest (caches from elsewhere): the profile is sized by the rows."""
    cache = shutil.copytree(cache_dir, tmp_path / "cache")
    data = json.loads((cache / MANIFEST_NAME).read_text())
    del data["settings"]["max_length"]
    (cache / MANIFEST_NAME).write_text(json.dumps(data))
    pages = [tmp_path / "with.html", tmp_path / "without.html"]
    for source, page in zip((cache_dir, cache), pages):
        result = run("info", source, "--plot", page)
        assert result.exit_code == 0, result.output
    with_length, without = (json.loads(re.search(r'id="kdcache-report">(.*?)</script>', page.read_text(), re.S)[1])
                            for page in pages)
    assert without["captured_mass_by_position"] == with_length["captured_mass_by_position"]


def test_png_report_and_a_refused_file_name(tmp_path, cache_dir):
    assert run("info", cache_dir, "--plot", tmp_path / "report.png").exit_code == 0
    assert png_size((tmp_path / "report.png").read_bytes()) == (1500, 420)
    refused = run("info", cache_dir, "--plot", tmp_path / "report.txt")
    assert refused.exit_code == 1 and "must end in .html or .png" in refused.output
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report.png"]


def test_train_student_draws_its_curves(tmp_path, cache_dir, student_config):
    out = tmp_path / "student"
    result = run("train-student", "--cache", cache_dir, "--student-config", student_config, "--out", out,
                 "--max-steps", 4, "--batch-size", 4, "--log-every", 1, "--val-fraction", 0.25, "--eval-every", 2,
                 "--quiet")
    assert result.exit_code == 0, result.output
    assert f"curves: {out / 'curves.png'}" in result.output
    assert png_size((out / "curves.png").read_bytes()) == (1100, 400)  # loss terms and the held-out panel


def test_without_matplotlib_the_report_is_refused_with_a_hint(tmp_path, cache_dir):
    """A matplotlib that fails to import stands for one that is not installed."""
    stub = tmp_path / "stub" / "matplotlib"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('not installed')\n")
    path = os.pathsep.join([str(stub.parent), str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-m", "kdcache", "info", str(cache_dir), "--plot",
                             str(tmp_path / "report.html")], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 1
    assert result.stderr.strip() == "Error: plots need matplotlib, which is not installed: pip install 'kdcache[plots]'"
    assert not (tmp_path / "report.html").exists()
