"""Benchmark: does training from the cache cost what the student alone costs?

Same student, same sequences, same batch size, in one run, tokens/s of
  (a) the student with plain next-token CE on the cached text (the ceiling: the student alone),
  (b) `train_student` from the cache with KD (reader, prefetch worker, collation, sparse loss, Accelerate),
      the cache in dump-teacher's default codec (head 4 + 32 tail draws, 8-bit log-probs, zstd),
  (b1) the same from a top-64 cache in the format-1 layout (plain ids, float16 log-probs, no compression),
      the layout every cache had before the compact codec: the reference for the codec's cost,
  (b2) the same from a top-64 cache in the compact codec (gap-coded ids, 8-bit log-probs, zstd): same loss
      as (b1), so b2/b1 is the cost of decoding alone,
  (c) online KD: the teacher (about 3x the student) runs in the loop, full-vocabulary logits, dense_kd_loss,
  (d) TRL's GKDTrainer with lmbda=0 (teacher in the loop, supervised KD), only when `trl` is importable
      (it is a benchmark-only tool, not a kdcache dependency; see `trl_gkd` for how it is made comparable),
then b/a, b/c (b/d), b/b1 and b2/b1; the reader alone (each cache) (positions/s) against the rate (b) consumes; and the peak RSS of
a process streaming one epoch of a 1x and of a 10x cache (the 10x cache repeats the 1x shards).

The machine may be shared with other work, so (a)-(d) are measured in interleaved rounds and
the median of each is reported, twice: by wall clock, and per CPU-second of this process (robust to
other load; (b) then runs with --prefetch 0 so that reading is counted too, and the bench times it
with `time.process_time` from train_student's `on_step` hook). The first steps of every measurement
are warm-up.

    python tools/bench_train.py [--workdir DIR] [--rows 512] [--steps 24] [--rounds 3] [--threads 1] [--teacher PATH]

`--teacher PATH` replaces the random teacher by a local one (e.g. the SmolLM2 GGUF file): the cache is
its top-64 on the same synthetic sentences, (c)/(d) run it in the loop, the student keeps its shape.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdcache import (DumpSettings, TrainHooks, TrainSettings, dense_kd_loss, dump_teacher,  # noqa: E402
                     next_token_ce, open_cache, train_student)
from kdcache.cache.format import Manifest, ShardInfo  # noqa: E402
from kdcache.demo import SyntheticLanguage, build_word_tokenizer, llama_config  # noqa: E402
from kdcache.student.feed import CacheBatches  # noqa: E402
from kdcache.models import load_causal_lm, load_tokenizer  # noqa: E402

STUDENT = {"hidden_size": 256, "intermediate_size": 768, "num_hidden_layers": 4, "num_attention_heads": 4}
TEACHER = {"hidden_size": 384, "intermediate_size": 1152, "num_hidden_layers": 6, "num_attention_heads": 6}
WARMUP_STEPS = 5
BATCH_SIZE = 16
LR = 1e-3
MAX_LENGTH = 128


def parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


CACHES = {  # (b) and its codec references, each spelt out so the bench does not move with dump-teacher's default
    "b": {},
    "b1": {"targets": "topk", "top_k": 64, "codec": "plain", "logprob_dtype": "float16", "compression": "none"},
    "b2": {"targets": "topk", "top_k": 64, "codec": "compact", "logprob_dtype": "uint8", "compression": "zstd"},
}


def build(workdir: Path, rows: int, teacher: str | None) -> tuple[str, dict[str, Path], Path]:
    """A teacher (`teacher`, any local one a dump takes, a .gguf file included; default: a random one
    ~3x the student), a synthetic corpus, its caches (`CACHES`), and the student config (the teacher's vocabulary)."""
    language = SyntheticLanguage(num_words=5000, num_topics=1, seed=0)
    if teacher is None:
        tokenizer = build_word_tokenizer(language.words)
        torch.manual_seed(0)
        AutoModelForCausalLM.from_config(llama_config(len(tokenizer), TEACHER)).save_pretrained(workdir / "teacher")
        tokenizer.save_pretrained(workdir / "teacher")
        teacher = str(workdir / "teacher")
    corpus = workdir / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": text}) + "\n" for text in language.sentences(rows, seed=1)))
    caches = {name: workdir / f"cache-{name}" for name in CACHES}
    for name, codec in CACHES.items():
        manifest = dump_teacher(teacher, str(corpus), caches[name],
                                DumpSettings(batch_size=32, shard_rows=256, max_length=MAX_LENGTH, **codec),
                                progress=False)
    config = workdir / "student.json"
    config.write_text(llama_config(manifest.vocab_size, STUDENT).to_json_string())
    return teacher, caches, config


def cache_batches(cache: Path, epochs: int | None) -> CacheBatches:
    """The batches train_student reads (same seed, batch size, shuffle buffer), in order."""
    return CacheBatches(open_cache(cache), batch_size=BATCH_SIZE, seed=0, shuffle_buffer=1024,
                        process_index=0, num_processes=1, hidden_layers=[], epochs=epochs)


def batches_for(cache: Path, steps: int) -> list:
    """The batches every in-loop variant trains on, held in memory so (a) and (c) pay no reading."""
    return [batch for _, _, batch in itertools.islice(cache_batches(cache, None), steps)]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def timed_loop(batches: list, step) -> dict[str, float]:
    """tokens/s of `step(batch)` over the batches after the warm-up ones, by each clock."""
    tokens, elapsed = 0.0, dict.fromkeys(CLOCKS, 0.0)
    for index, batch in enumerate(batches):
        started = {name: clock() for name, clock in CLOCKS.items()}
        step(batch)
        if index >= WARMUP_STEPS:
            elapsed = {name: elapsed[name] + clock() - started[name] for name, clock in CLOCKS.items()}
            tokens += batch.num_tokens
    return {name: tokens / seconds for name, seconds in elapsed.items()}


def fresh_student(config: Path):
    """The student every variant starts from: same shape, same seed, same initial weights."""
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(llama_config(json.loads(config.read_text())["vocab_size"], STUDENT))


def student_trainer(config: Path, loss_of):
    """A fresh student and one AdamW step per batch on `loss_of(student_logits, batch)`."""
    student = fresh_student(config)
    optimizer = torch.optim.AdamW(student.parameters(), lr=LR, weight_decay=0.01)

    def step(batch):
        logits = student(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits[batch.valid]
        loss_of(logits, batch).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
    return student, step


def plain_ce(config: Path, batches: list) -> dict[str, float]:
    _, step = student_trainer(config, lambda logits, batch: next_token_ce(logits, batch.next_token_labels()))
    return timed_loop(batches, step)


def online_kd(config: Path, teacher_dir: str, batches: list) -> dict[str, float]:
    teacher = load_causal_lm(teacher_dir, "teacher", "float32").eval()

    def loss_of(logits, batch):
        with torch.inference_mode():
            teacher_logits = teacher(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        return dense_kd_loss(logits, teacher_logits[batch.valid].clone())
    _, step = student_trainer(config, loss_of)
    return timed_loop(batches, step)


def from_cache(config: Path, cache: Path, workdir: Path, steps: int, clock: str) -> float:
    """tokens/s of train_student after the warm-up steps, timed by `clock` from its `on_step` hook.

    By CPU time, reading runs in the training process (--prefetch 0), so every CPU-second it spends
    is counted.
    """
    out = Path(tempfile.mkdtemp(dir=workdir)) / "student"
    marks = {}  # (tokens, clock) at the end of the warm-up and at the last step

    def on_step(step: int, tokens: int) -> None:
        marks["warm" if step == WARMUP_STEPS else "last"] = (tokens, CLOCKS[clock]())
    train_student(cache, out, student_config=str(config), progress=False, hooks=TrainHooks(on_step=on_step),
                  settings=TrainSettings(max_steps=steps, batch_size=BATCH_SIZE, lr=LR, verify=False,
                                         prefetch=4 if clock == "wall" else 0))
    shutil.rmtree(out.parent)
    (first_tokens, first_time), (last_tokens, last_time) = marks["warm"], marks["last"]
    return (last_tokens - first_tokens) / (last_time - first_time)


def reader_alone(cache: Path) -> dict[str, float]:
    """Positions/s of reading + collating one epoch the way training does (no worker, no model), by each clock."""
    started, positions = {name: clock() for name, clock in CLOCKS.items()}, 0
    for _, _, batch in cache_batches(cache, epochs=1):
        positions += batch.num_tokens
    return {name: positions / (clock() - started[name]) for name, clock in CLOCKS.items()}


def repeated_cache(cache: Path, out: Path, times: int) -> Path:
    """A cache `times` as large: the same shards listed `times` over (hard links; the reader only reads)."""
    manifest = Manifest.load(cache)
    shutil.copytree(cache, out, ignore=shutil.ignore_patterns("data"))
    (out / "data").mkdir()
    shards = []
    for copy in range(times):
        for shard in manifest.shards:
            name = f"data/copy{copy:02d}-{Path(shard.file).name}"
            os.link(cache / shard.file, out / name)
            shards.append(ShardInfo(**{**shard.__dict__, "file": name}))
    manifest.shards = shards
    manifest.save(out)
    return out


def peak_rss_mib(cache: Path) -> float:
    """Peak RSS of a fresh process that streams one whole epoch of `cache` into batches.

    Read from VmHWM: `getrusage().ru_maxrss` survives fork+exec on Linux, so a child would report
    this (larger) benchmark process's peak instead of its own.
    """
    code = ("import re, sys; sys.path.insert(0, sys.argv[2]); sys.path.insert(0, sys.argv[3]);"
            "from bench_train import cache_batches; from pathlib import Path;"
            "n = sum(b.num_tokens for _, _, b in cache_batches(Path(sys.argv[1]), epochs=1));"
            "print(int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)) / 1024)")
    result = subprocess.run([sys.executable, "-c", code, str(cache), str(REPO), str(REPO / "tools")],
                            capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def trl_gkd(config: Path, teacher_dir: str, batches: list, workdir: Path) -> dict[str, float] | None:
    """tokens/s of TRL's GKDTrainer with lmbda=0 (supervised KD, teacher in the loop), or None without `trl`.

    Parity with (a)/(c): the same student init (seed 0), AdamW (lr, weight decay 0.01, constant schedule,
    clip 1.0), float32 without activation checkpointing (TRL's SFT defaults are bf16 and checkpointing;
    bf16 autocast on this CPU made steps ~17x slower), beta=0 (forward KL, as dense_kd_loss) and the
    very same padded batches, handed over by a collator (dataset rows are batch indices; labels are
    input_ids with padding at -100), so TRL's tokenisation and padding are not timed, as (a)/(c) time no
    collation either. Steps are timed from the
    Trainer's on_step_begin to on_step_end (forward, teacher forward, loss, backward, clip, optimizer step).
    What TRL does differently is its own design and counts against it: its loss runs log_softmax over
    every padded position of both models' [B, L, V] logits and the Trainer's bookkeeping runs every step.
    The Trainer shuffles the batch order; the tokens of each step are those of the batch it was handed.
    """
    try:
        from datasets import Dataset
        from transformers import TrainerCallback
        from trl.experimental.gkd import GKDConfig, GKDTrainer
    except ImportError:
        return None
    handed = []  # batch indices in the order the collator handed them out (= the order steps run them)

    def collate(rows):
        (row,) = rows
        handed.append(row["batch"])
        batch = batches[row["batch"]]
        return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask,
                "labels": batch.input_ids.masked_fill(~batch.valid, -100)}

    tokens, elapsed = [0.0], dict.fromkeys(CLOCKS, 0.0)

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.started = {name: clock() for name, clock in CLOCKS.items()}

        def on_step_end(self, args, state, control, **kwargs):
            if state.global_step > WARMUP_STEPS:
                for name, clock in CLOCKS.items():
                    elapsed[name] += clock() - self.started[name]
                tokens[0] += batches[handed[state.global_step - 1]].num_tokens

    settings = GKDConfig(output_dir=str(workdir / "gkd"), lmbda=0.0, beta=0.0, seq_kd=False, temperature=1.0,
                         per_device_train_batch_size=1, max_steps=len(batches), learning_rate=LR,
                         weight_decay=0.01, max_grad_norm=1.0, lr_scheduler_type="constant", warmup_steps=0,
                         use_cpu=True, dataloader_num_workers=0, report_to="none", save_strategy="no",
                         logging_strategy="no", disable_tqdm=True, seed=0,
                         bf16=False, gradient_checkpointing=False)
    trainer = GKDTrainer(model=fresh_student(config), teacher_model=load_causal_lm(teacher_dir, "teacher", "float32"),
                         args=settings, data_collator=collate,
                         train_dataset=Dataset.from_dict({"batch": list(range(len(batches)))}),
                         processing_class=load_tokenizer(teacher_dir), callbacks=[StepClock()])
    trainer.train()
    return {name: tokens[0] / seconds for name, seconds in elapsed.items()}


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--teacher", default=None, help="a local teacher (directory or .gguf file) instead of the "
                                                         "random one; the student keeps its shape, with its vocabulary")
    parser.add_argument("--rows", type=int, default=512, help="sequences in the 1x cache")
    parser.add_argument("--steps", type=int, default=24, help="optimizer steps per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch compute threads; more threads than free cores make OpenMP spin, which "
                             "inflates CPU time, so the default suits a shared machine")
    return parser


def main() -> None:
    args = command_line().parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    teacher_dir, caches, config = build(workdir, args.rows, args.teacher)
    cache = caches["b"]
    manifest = Manifest.load(caches["b1"])
    teacher_params = manifest.teacher["num_parameters"]
    student_params = parameters(AutoModelForCausalLM.from_config(llama_config(manifest.vocab_size, STUDENT)))
    sizes = ", ".join(f"({name}) {Manifest.load(path).total_bytes / manifest.total_tokens:.1f}" for name, path in caches.items())
    print(f"caches: {manifest.total_rows} sequences, {manifest.total_tokens} tokens, B/token {sizes}, "
          f"vocab {manifest.vocab_size}; student {student_params / 1e6:.2f}M, teacher {teacher_params / 1e6:.2f}M "
          f"({teacher_params / student_params:.1f}x); batch {BATCH_SIZE}, {args.steps} steps x {args.rounds} rounds, "
          f"{torch.get_num_threads()} threads")

    batches = batches_for(cache, args.steps)
    rates = {clock: {"a": [], "b": [], "b1": [], "b2": [], "c": [], "d": []} for clock in CLOCKS}
    for round_index in range(args.rounds):
        for clock, rate in plain_ce(config, batches).items():
            rates[clock]["a"].append(rate)
        for clock in CLOCKS:
            for name in CACHES:
                rates[clock][name].append(from_cache(config, caches[name], workdir, args.steps, clock))
        for clock, rate in online_kd(config, teacher_dir, batches).items():
            rates[clock]["c"].append(rate)
        for clock, rate in (trl_gkd(config, teacher_dir, batches, workdir) or {}).items():
            rates[clock]["d"].append(rate)
        print(f"round {round_index + 1}: " + "; ".join(
            f"{clock}: " + ", ".join(f"{name} {values[-1]:.0f}" for name, values in by_name.items() if values)
            for clock, by_name in rates.items()) + " tokens/s", flush=True)
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
    print(f"{'tokens/s':34s} {'wall clock':>12s} {'per CPU-second':>15s}")
    median = {clock: {name: statistics.median(values) for name, values in by_name.items() if values}
              for clock, by_name in rates.items()}
    with_trl = bool(rates["wall"]["d"])
    for name, label in [("a", "(a) plain CE student"), ("b", "(b) train-student, default cache"),
                        ("b1", "(b1) top-64 f16 plain (format 1)"), ("b2", "(b2) top-64 u8 zstd"),
                        ("c", "(c) online KD, teacher in the loop"), ("d", "(d) TRL GKDTrainer, lmbda=0")]:
        if name in median["wall"]:
            print(f"{label:34s} {median['wall'][name]:12.0f} {median['cpu'][name]:15.0f}")
    if not with_trl:
        print("(d) TRL GKDTrainer lmbda=0: skipped, `trl` is not installed")
    for clock in CLOCKS:  # ratios within a round (same conditions), then the median over rounds
        ratio = lambda x, y: statistics.median(p / q for p, q in zip(rates[clock][x], rates[clock][y]))
        versus_trl = f"   b/d = {ratio('b', 'd'):.2f}" if with_trl else ""
        print(f"{clock:5s}: b/a = {ratio('b', 'a'):.3f}   b/c = {ratio('b', 'c'):.2f}{versus_trl}"
              f"   b/b1 = {ratio('b', 'b1'):.3f}   b2/b1 = {ratio('b2', 'b1'):.3f}   (median of per-round ratios)")

    for name in CACHES:
        reader = [reader_alone(caches[name]) for _ in range(3)]
        for clock in CLOCKS:
            rate = statistics.median(r[clock] for r in reader)
            print(f"reader alone, ({name}) cache, {clock:4s}: {rate:.0f} positions/s = "
                  f"{rate / median[clock][name]:.0f}x what ({name}) consumes")
    big = repeated_cache(cache, workdir / "cache-10x", 10)
    small_rss, big_rss = peak_rss_mib(cache), peak_rss_mib(big)
    print(f"peak RSS streaming one epoch: 1x {small_rss:.0f} MiB, 10x {big_rss:.0f} MiB "
          f"({(big_rss / small_rss - 1) * 100:+.1f}%)")


if __name__ == "__main__":
    main()
