"""Benchmark: peak memory and speed of both phases at LLM vocabulary sizes, fused against full logits.

For each vocabulary (32,768, 131,072, 262,144 by default), with a teacher and a student that are tiny
1-layer, 64-wide Llamas (so the vocabulary is almost all of the memory), in one run:

  dump-teacher  default settings (head 4 + 32 tail draws, compact codec), `--dump-batch` rows of `--length`
                tokens per forward, `fused_logits` on and off;
  train-student default settings (KD on that cache), `--batch` rows of `--length` tokens per step,
                `fused_loss` on and off.

Each measurement runs in a fresh child process; its peak RSS is the child's own `ru_maxrss` (os.wait4), so
nothing of the parent or of another measurement is counted. Speeds are tokens per CPU-second of the child
(robust to other load on a shared machine): the whole `dump_teacher` call (model loading included, the same
for both), and the training steps after the first (warm-up). Ratios are fused / unfused in the same run.
`--growth-batch` adds a second, smaller batch at the largest vocabulary, to give the memory per extra token
(the slope between the two batch sizes) and the largest batch × length that fits in `--memory-gib`.

    nice -n 15 python tools/bench_memory.py [--vocab 32768,131072,262144] [--batch 4] [--dump-batch 2] [--length 512]
                                            [--steps 2] [--growth-batch 1] [--memory-gib 24] [--threads 1]
                                            [--fused-only]

`--fused-only` skips the full-logits path, for a size it could not fit (to check that a batch the unfused
path cannot hold trains fused).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPE = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4}


def _setup(workdir: Path, vocab: int, rows: int, length: int) -> None:
    """A teacher directory (model + a `vocab`-token word-level tokenizer), pre-tokenized rows, a student config."""
    import numpy as np
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from kdcache.demo import build_word_tokenizer

    tokenizer = build_word_tokenizer([f"w{index}" for index in range(vocab - 4)])
    assert len(tokenizer) == vocab, len(tokenizer)
    config = LlamaConfig(vocab_size=vocab, num_key_value_heads=4, max_position_embeddings=length, **SHAPE)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(workdir / "teacher")
    tokenizer.save_pretrained(workdir / "teacher")
    (workdir / "student.json").write_text(config.to_json_string())
    rng = np.random.default_rng(0)
    (workdir / "rows.jsonl").write_text("".join(
        json.dumps({"input_ids": rng.integers(4, vocab, size=length).tolist()}) + "\n" for _ in range(rows)))


def _child(args) -> None:
    """One measurement; prints its tokens per CPU-second as JSON (the machine may be shared: CPU time of this
    process, all its threads, is what the work cost, whatever else runs)."""
    import time

    import torch
    torch.set_num_threads(args.threads)
    from kdcache import DumpSettings, TrainHooks, TrainSettings, dump_teacher, train_student
    workdir = Path(args.workdir)
    if args.child == "dump":
        started = time.process_time()
        manifest = dump_teacher(str(workdir / "teacher"), str(workdir / "rows.jsonl"), workdir / f"cache-{int(args.fused)}",
                                DumpSettings(batch_size=args.batch, max_length=args.length, fused_logits=args.fused),
                                progress=False)
        print(json.dumps({"tokens_per_second": manifest.stats["tokens"] / (time.process_time() - started)}))
        return
    stamps = []
    hooks = TrainHooks(on_step=lambda step, tokens: stamps.append((time.process_time(), tokens)) and False)
    train_student(workdir / "cache-1", workdir / f"student-{int(args.fused)}-{args.batch}",
                  student_config=str(workdir / "student.json"), progress=False, hooks=hooks,
                  settings=TrainSettings(batch_size=args.batch, max_steps=args.steps, fused_loss=args.fused,
                                         verify=False, prefetch=0, log_every=1000))
    (first_time, first_tokens), (last_time, last_tokens) = stamps[0], stamps[-1]
    print(json.dumps({"tokens_per_second": (last_tokens - first_tokens) / (last_time - first_time)}))


def _measure(phase: str, workdir: Path, fused: bool, batch: int, args) -> dict:
    """Run one child; (peak RSS in MiB, tokens/s)."""
    command = [sys.executable, __file__, "--child", phase, "--workdir", str(workdir), "--fused", str(int(fused)),
               "--batch", str(batch), "--length", str(args.length), "--steps", str(args.steps),
               "--threads", str(args.threads)]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONWARNINGS": "ignore"}
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
    output = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    if status != 0:
        raise SystemExit(f"{phase} (fused={fused}, batch={batch}) failed with status {status}")
    return {"peak_mib": usage.ru_maxrss / 1024, **json.loads(output.strip().splitlines()[-1])}


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vocab", default="32768,131072,262144")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--dump-batch", type=int, default=2)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--growth-batch", type=int, default=1)
    parser.add_argument("--memory-gib", type=float, default=24.0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--child", choices=("dump", "train"), default=None)
    parser.add_argument("--fused", type=int, default=1)
    parser.add_argument("--fused-only", action="store_true",
                        help="measure only the fused path: for sizes whose full logits would not fit in memory")
    return parser


def main() -> None:
    args = command_line().parse_args()
    if args.child:
        args.fused = bool(args.fused)
        return _child(args)

    vocabs = [int(v) for v in args.vocab.split(",")]
    print(f"tiny 1-layer 64-wide Llamas, train-student {args.batch} x {args.length} tokens per step, dump-teacher "
          f"{args.dump_batch} x {args.length} per forward, {args.threads} thread(s), float32; peak RSS of each "
          f"child process, speed in tokens per CPU-second", flush=True)
    rows, growth = [], {}
    with tempfile.TemporaryDirectory(dir=args.workdir) as scratch:
        for vocab in vocabs:
            workdir = Path(scratch) / str(vocab)
            workdir.mkdir()
            _setup(workdir, vocab, rows=args.batch * max(args.steps, 2), length=args.length)
            # the fused dump first: it writes the cache the students train on
            plan = [("dump", args.dump_batch), ("train", args.batch)]
            if vocab == max(vocabs) and args.growth_batch:
                plan.append(("train", args.growth_batch))
            for phase, batch in plan:
                runs = {}
                for fused in (True,) if args.fused_only else (True, False):
                    runs[fused] = _measure(phase, workdir, fused, batch, args)
                    print(f"  {phase} vocab {vocab} batch {batch} fused={fused}: {runs[fused]}", flush=True)
                rows.append((phase, vocab, batch, runs))
                if vocab == max(vocabs) and phase == "train":
                    growth[batch] = runs
    print("\n| phase | vocabulary | tokens per step | peak RSS unfused | peak RSS fused | fused / unfused RSS "
          "| tokens/s unfused | tokens/s fused | fused / unfused speed |")
    print("|---|---|---|---|---|---|---|---|---|")
    for phase, vocab, batch, runs in rows:
        fused, unfused = runs[True], runs.get(False)
        compared = (f"{unfused['peak_mib']:,.0f} MiB | {fused['peak_mib']:,.0f} MiB | "
                    f"{fused['peak_mib'] / unfused['peak_mib']:.2f} | {unfused['tokens_per_second']:,.0f} | "
                    f"{fused['tokens_per_second']:,.0f} | {fused['tokens_per_second'] / unfused['tokens_per_second']:.2f}"
                    if unfused else f"not run | {fused['peak_mib']:,.0f} MiB | | not run | "
                                    f"{fused['tokens_per_second']:,.0f} |")
        print(f"| {'dump-teacher' if phase == 'dump' else 'train-student'} | {vocab:,} "
              f"| {batch} x {args.length} | {compared} |")
    if len(growth) == 2 and not args.fused_only:
        small, large = sorted(growth)
        extra = (large - small) * args.length
        budget = args.memory_gib * 1024
        print(f"\ntrain-student at vocabulary {max(vocabs):,}, per extra token (between {small} x {args.length} "
              f"and {large} x {args.length}):")
        for fused in (False, True):
            slope = (growth[large][fused]["peak_mib"] - growth[small][fused]["peak_mib"]) / extra
            base = growth[large][fused]["peak_mib"] - slope * large * args.length
            fits = (budget - base) / slope if slope > 0 else float("inf")
            print(f"  {'fused' if fused else 'unfused'}: {slope * 1024:,.1f} KiB per token, so about "
                  f"{fits:,.0f} tokens per step fit in {args.memory_gib:g} GiB (extrapolated)")


if __name__ == "__main__":
    main()
