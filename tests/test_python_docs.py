"""docs/python.md's snippets run verbatim, in order, in one namespace, on a tiny teacher with a real sub-word
tokenizer, with the files they name made first (so the Python guide cannot drift from the API)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from conftest import LANGUAGE, MINILM_DIR, tiny_llama_config, write_jsonl
from transformers import AutoModelForCausalLM, AutoTokenizer

PYTHON_MD = Path(__file__).resolve().parents[1] / "docs" / "python.md"


def test_the_python_guide_runs_as_written(tmp_path, monkeypatch):
    snippets = re.findall(r"```python\n(.*?)```", PYTHON_MD.read_text(), re.S)
    assert len(snippets) == 2
    monkeypatch.chdir(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR)
    torch.manual_seed(0)
    for name, layers in (("teacher", 2), ("minilm-student", 1)):
        AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), layers=layers)).save_pretrained(name)
    tokenizer.save_pretrained("teacher")
    tokenizer.save_pretrained("minilm-tokenizer")
    write_jsonl(Path("corpus.jsonl"), LANGUAGE.sentences(40, min_words=4, max_words=16, seed=5))
    Path("student.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 32, "intermediate_size": 64,
                                                "num_hidden_layers": 1, "num_attention_heads": 2,
                                                "num_key_value_heads": 2}))
    namespace: dict = {}
    for snippet in snippets:
        exec(compile(snippet, str(PYTHON_MD), "exec"), namespace)  # noqa: S102 - our own documentation
    assert (tmp_path / "student" / "config.json").is_file() and (tmp_path / "cache-ranked" / "kdcache.json").is_file()
    assert torch.isfinite(namespace["loss"]) and torch.isfinite(namespace["targets"].logprobs.exp().sum())
