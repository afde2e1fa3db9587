"""dump-teacher: cached targets equal a direct transformers forward; the files meet the contract."""

from __future__ import annotations

import json

import datasets
import numpy as np
import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kdcache import open_cache
from kdcache.cache.format import Manifest


def test_cached_targets_equal_a_direct_forward(cache_dir, teacher_dir, corpus):
    model = AutoModelForCausalLM.from_pretrained(teacher_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()]
    vocab = len(tokenizer)
    sequences = {s.sample_id: s for s in open_cache(cache_dir).sequences(hidden_layers=[2])}
    assert sorted(sequences) == list(range(len(texts)))
    for sample_id in (0, 17, len(texts) - 1):
        ids = tokenizer(texts[sample_id])["input_ids"]
        with torch.no_grad():
            output = model(torch.tensor([ids]), output_hidden_states=True)
        # padded vocabulary rows (config vocab 64 > tokenizer 60) are excluded from the distribution
        logprobs = torch.log_softmax(output.logits[0, :, :vocab].double(), dim=-1)
        expected_lp, expected_ids = logprobs.topk(8, dim=-1)
        cached = sequences[sample_id]
        assert cached.input_ids.tolist() == ids
        np.testing.assert_allclose(cached.topk_logprobs.astype(np.float64), expected_lp.numpy(), rtol=2e-3, atol=2e-3)
        # ids agree wherever the teacher's probabilities are not tied at float16 resolution
        assert (cached.topk_ids[:, :3].astype(np.int64) == expected_ids[:, :3].numpy()).mean() > 0.95
        expected_tail = torch.logsumexp(logprobs.scatter(1, expected_ids, float("-inf")), dim=-1)
        np.testing.assert_allclose(cached.tail_logprob, expected_tail.numpy(), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(cached.hidden[2].astype(np.float32), output.hidden_states[2][0].numpy(),
                                   rtol=1e-2, atol=1e-2)


def test_cache_layout_and_manifest(cache_dir):
    manifest = Manifest.load(cache_dir)
    assert (cache_dir / "tokenizer" / "tokenizer.json").is_file()
    assert len(manifest.shards) == 3 and manifest.total_rows == 48
    assert manifest.tokenizer["vocab_size"] == 64 and manifest.tokenizer["model_vocab_size"] == 68
    assert manifest.settings["hidden_layers"] == [2] and manifest.hidden_sizes == {2: 32}
    for shard in manifest.shards:
        assert (cache_dir / shard.file).stat().st_size == shard.bytes
        assert len(shard.sha256) == 64
    mass = manifest.stats["captured_mass"]
    assert 0 < mass["p5"] <= mass["p50"] <= mass["p95"] <= 1
    assert manifest.stats["tokens"] == manifest.total_tokens
    assert not list(cache_dir.rglob("*.partial")) and not (cache_dir / "kdcache.dump.json").exists()


def test_shards_are_plain_arrow_and_load_with_datasets(cache_dir):
    files = sorted(str(path) for path in (cache_dir / "data").glob("*.arrow"))
    table = pa.ipc.open_file(files[0]).read_all()
    assert table.schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint16(), 8))
    assert table.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), 8))
    rows = datasets.load_dataset("arrow", data_files=files, split="train")
    assert len(rows) == 48
    first = rows[0]
    assert len(first["topk_ids"]) == len(first["input_ids"]) == len(first["tail_logprob"])
    lp = np.array(first["topk_logprobs"], dtype=np.float64)
    assert np.all(np.diff(lp, axis=1) <= 0), "log-probs sorted descending"
    total = np.exp(lp).sum(axis=1) + np.exp(np.array(first["tail_logprob"]))
    np.testing.assert_allclose(total, 1.0, atol=5e-3)


@pytest.mark.parametrize("source_kind", ["csv", "save_to_disk", "pretokenized"])
def test_other_data_sources(tmp_path, teacher_dir, corpus, source_kind, tokenizer):
    from kdcache.teacher import DumpSettings, dump_teacher
    texts = [json.loads(line)["text"] for line in corpus.read_text().splitlines()][:6]
    if source_kind == "csv":
        source = tmp_path / "data.csv"
        datasets.Dataset.from_dict({"body": texts}).to_csv(source)
        column = "body"
    elif source_kind == "save_to_disk":
        source = tmp_path / "saved"
        datasets.Dataset.from_dict({"text": texts}).save_to_disk(source)
        column = "text"
    else:
        source = tmp_path / "tok.parquet"
        datasets.Dataset.from_dict({"input_ids": tokenizer(texts)["input_ids"]}).to_parquet(source)
        column = "text"
    manifest = dump_teacher(str(teacher_dir), str(source), tmp_path / "cache",
                            DumpSettings(top_k=4, text_column=column, limit=5), progress=False)
    assert manifest.total_rows == 5
    first = next(open_cache(tmp_path / "cache").sequences())
    assert first.input_ids.tolist() == tokenizer(texts[0])["input_ids"]
