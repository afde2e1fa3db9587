"""The README's quickstart runs as written: its files and its commands, in order, on a tiny teacher
with a real sub-word tokenizer (so the README cannot drift from the CLI)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import MINILM_DIR, tiny_llama_config
from kdcache.cli import main

README = Path(__file__).resolve().parents[1] / "README.md"


def quickstart() -> tuple[str, str, list[str]]:
    """(corpus.jsonl, student.json, commands) as the README's quickstart shows them."""
    text = README.read_text().split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    corpus, student = re.findall(r"```json\n(.*?)```", text, re.S)
    commands = re.search(r"<!-- quickstart:.*?-->\n```bash\n(.*?)```", text, re.S).group(1)
    return corpus, student, [line for line in commands.splitlines() if line.strip()]


def test_the_quickstart_runs_as_written(tmp_path, monkeypatch):
    corpus, student, commands = quickstart()
    monkeypatch.chdir(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(MINILM_DIR)
    torch.manual_seed(0)
    teacher = AutoModelForCausalLM.from_config(tiny_llama_config(len(tokenizer), layers=4))
    teacher.save_pretrained("teacher")
    tokenizer.save_pretrained("teacher")
    Path("corpus.jsonl").write_text(corpus)
    Path("student.json").write_text(student)
    outputs = []
    for command in commands:
        words = shlex.split(command)
        assert words[0] == "kdcache", command
        result = CliRunner().invoke(main, words[1:])
        assert result.exit_code == 0, f"{command}\n{result.output}"
        outputs.append(result.output)
    assert "wrote cache" in outputs[0] and "bytes/token" in outputs[0]
    assert "top-32" in outputs[1]
    assert all((tmp_path / name / "config.json").is_file() for name in ("student", "carved", "carved-student"))
    assert "KL(T‖S)" in outputs[-1] and "./student " in outputs[-1] and "./carved-student " in outputs[-1]
