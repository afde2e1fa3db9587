"""Which cached targets teach best? Same teacher, student init and tokens; only the targets differ.

Trains the demo's teacher on the generated language, dumps it on a transfer set as top-k (+ exact
tail) and as sampled targets, then trains the same student (same seed, so the same init; same
batches in the same order) for the same steps five ways:

  online full KD   teacher in the loop, full-vocabulary forward KL (dense_kd_loss): the ceiling
  top-k + rest     forward KL on the k listed ids + the exact rest bucket (kdcache's default)
  top-k renorm     forward KL on the k ids renormalised, tail dropped (what peers do)
  sampled          forward KL on count / N of N draws per position (Random-Sampling KD)
  CE only          next-token cross-entropy on the text: the floor

Each student is scored on held-out sentences dumped with k = vocabulary, so its "KL to teacher"
is the exact full-vocabulary KL. "gap closed" = (KL_CE − KL) / (KL_CE − KL_online), measured in
this run. Usage: python tools/bench_targets.py [--steps 300] [--top-k 16] [--samples 50]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, get_cosine_schedule_with_warmup

from kdcache import DumpSettings, TrainSettings, dense_kd_loss, dump_teacher, evaluate, open_cache, train_student
from kdcache.cache.format import Manifest
from kdcache.demo import (STUDENT_SHAPE, SyntheticLanguage, build_word_tokenizer, llama_config, train_demo_teacher,
                          write_jsonl)
from kdcache.models import load_causal_lm
from kdcache.student.batching import collate


def train_online(root: Path, cache: Path, teacher_dir: Path, config_file: Path, settings: TrainSettings) -> Path:
    """Online KD with the teacher in the loop, on the same batches and schedule as `train_student`.

    One epoch-free pass over the cache rows in train_student's shuffle order (same seed), so the
    student sees exactly the tokens the cached runs see; only the targets come from the live teacher.
    """
    manifest = Manifest.load(cache)
    torch.manual_seed(settings.seed)
    student = AutoModelForCausalLM.from_config(llama_config(manifest.vocab_size, STUDENT_SHAPE))
    teacher = load_causal_lm(str(teacher_dir), "teacher", "float32").eval()
    optimizer = torch.optim.AdamW(student.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    schedule = get_cosine_schedule_with_warmup(optimizer, int(settings.warmup_ratio * settings.max_steps),
                                               settings.max_steps)
    vocab, step, epoch = manifest.vocab_size, 0, 0
    while step < settings.max_steps:
        pending = []
        for sequence in open_cache(cache).sequences(shuffle=True, seed=settings.seed, epoch=epoch,
                                                    shuffle_buffer=settings.shuffle_buffer):
            pending.append(sequence)
            if len(pending) < settings.batch_size:
                continue
            batch, pending = collate(pending), []
            with torch.no_grad():
                teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
            loss = dense_kd_loss(logits[batch.valid][:, :vocab], teacher_logits[batch.valid][:, :vocab])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), settings.max_grad_norm)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad()
            step += 1
            if step == settings.max_steps:
                break
        epoch += 1
    student.save_pretrained(root / "students" / "online")
    return root / "students" / "online"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--top-k", type=int, default=16)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as temporary:
        root = args.workdir or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        language = SyntheticLanguage()
        tokenizer = build_word_tokenizer(language.words)
        tokenizer.padding_side = "right"
        train_demo_teacher(root / "teacher", tokenizer, language.sentences(8000, seed=1), args.teacher_steps)
        teacher = str(root / "teacher")
        transfer = write_jsonl(root / "transfer.jsonl", language.sentences(600, seed=2))
        heldout = write_jsonl(root / "heldout.jsonl", language.sentences(300, seed=3))
        common = {"batch_size": 32, "shard_rows": 256}
        dump_teacher(teacher, str(transfer), root / "topk", DumpSettings(top_k=args.top_k, **common), progress=False)
        dump_teacher(teacher, str(transfer), root / "sampled",
                     DumpSettings(targets="sampled", samples=args.samples, **common), progress=False)
        dump_teacher(teacher, str(heldout), root / "heldout", DumpSettings(top_k=len(tokenizer), **common),
                     progress=False)
        config_file = root / "student.json"
        config_file.write_text(llama_config(len(tokenizer), STUDENT_SHAPE).to_json_string())

        base = TrainSettings(max_steps=args.steps, batch_size=16, lr=3e-3, log_every=50, verify=False)
        runs = {
            "top-k + rest": ("topk", {"tail": "rest-bucket"}),
            "top-k renorm": ("topk", {"tail": "renormalize"}),
            "sampled": ("sampled", {"targets": "sampled"}),
            "CE only": ("topk", {"kd_weight": 0.0, "ce_weight": 1.0}),
        }
        students = {"online full KD": train_online(root, root / "topk", root / "teacher", config_file, base)}
        for name, (cache, changes) in runs.items():
            out = root / "students" / name.replace(" ", "_").replace("+", "plus")
            train_student(root / cache, out, student_config=str(config_file), progress=False,
                          settings=TrainSettings(**{**base.__dict__, **changes}))
            students[name] = out
        scores = {name: evaluate(load_causal_lm(str(path), "student", "float32"), root / "heldout")
                  for name, path in students.items()}
        teacher_scores = evaluate(load_causal_lm(teacher, "teacher", "float32"), root / "heldout")

        size = {name: Manifest.load(root / name) for name in ("topk", "sampled")}
        bytes_per_token = {"top-k + rest": size["topk"], "top-k renorm": size["topk"], "sampled": size["sampled"]}
        floor, ceiling = scores["CE only"]["kl_to_teacher"], scores["online full KD"]["kl_to_teacher"]
        print(f"\nsame teacher, student init and {args.steps} steps × 16 sequences; held-out: "
              f"{teacher_scores['positions']} positions, exact full-vocabulary KL")
        print(f"teacher NLL {teacher_scores['nll']:.3f}; top-{args.top_k} mean mass "
              f"{size['topk'].stats['fidelity']['topk']['captured_mass']:.3f}; sampled: {args.samples} draws, "
              f"{size['sampled'].stats['fidelity']['sampled']['distinct_ids']:.1f} distinct ids/position\n")
        print(f"{'targets':<16} {'KL(T‖S)':>8} {'NLL':>7} {'top-1':>7} {'gap closed':>11} {'bytes/token':>12}")
        for name, result in scores.items():
            closed = (floor - result["kl_to_teacher"]) / (floor - ceiling)
            manifest = bytes_per_token.get(name)
            stored = f"{manifest.total_bytes / manifest.total_tokens:.1f}" if manifest else "—"
            print(f"{name:<16} {result['kl_to_teacher']:>8.3f} {result['nll']:>7.3f} "
                  f"{result['top1_agreement']:>7.1%} {closed:>11.1%} {stored:>12}")
        print(f"\n({time.perf_counter() - started:.0f}s)")


if __name__ == "__main__":
    main()
