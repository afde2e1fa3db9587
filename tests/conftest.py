"""Shared fixtures: a tiny random Llama teacher with a locally built tokenizer, a corpus, a cache.

Nothing is downloaded: models come from configs (`from_config`), the tokenizer is built from the
synthetic language's words, and everything is saved to temporary directories so the real
`from_pretrained` / `load_dataset` code paths are exercised on local paths.
"""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pyarrow as pa
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kdcache.demo.synthetic import SyntheticLanguage, build_word_tokenizer
from kdcache.teacher import DumpSettings, dump_teacher

LANGUAGE = SyntheticLanguage(num_words=60, num_topics=2, branching=6, seed=7)


def tiny_llama_config(vocab_size: int, hidden: int = 32, layers: int = 2, **extra) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=128, **extra)


@pytest.fixture(scope="session")
def tokenizer():
    return build_word_tokenizer(LANGUAGE.words)


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, tokenizer) -> Path:
    """A random 2-layer Llama teacher (hidden 32) whose config pads the vocabulary by 4 rows."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("teacher")
    model = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer) + 4))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    path.write_text("".join(json.dumps({column: text}) + "\n" for text in texts))
    return path


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "corpus.jsonl",
                       LANGUAGE.sentences(48, min_words=4, max_words=20, seed=1))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, teacher_dir, corpus) -> Path:
    """A finished format-1 (plain) cache: top-8, the last hidden layer, several shards. Tests must not modify it."""
    out = tmp_path_factory.mktemp("caches") / "cache"
    dump_teacher(str(teacher_dir), str(corpus), out,
                 DumpSettings(top_k=8, batch_size=8, shard_rows=16, hidden_layers=(-1,), codec="plain"), progress=False)
    return out


@pytest.fixture(scope="session")
def student_config(tmp_path_factory, tokenizer) -> Path:
    """A 1-layer, hidden-16 Llama student config JSON (narrower than the teacher: needs a projection)."""
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(tiny_llama_config(len(tokenizer), hidden=16, layers=1).to_json_string())
    return path


def fail_second_shard_with_disk_full(monkeypatch) -> None:
    """Make the second Arrow shard a dump opens fail with ENOSPC (undo with `monkeypatch.undo()`)."""
    real_new_file, calls = pa.ipc.new_file, []

    def disk_full_on_second_shard(sink, schema, **options):
        calls.append(sink)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_new_file(sink, schema, **options)

    monkeypatch.setattr(pa.ipc, "new_file", disk_full_on_second_shard)
