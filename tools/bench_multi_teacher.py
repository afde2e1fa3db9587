"""Benchmark: a student distilled from two teachers' mixture vs students from each teacher alone.

On the demo language (kdcache/demo): teachers A and B, the demo's teacher shape, trained for the same steps on
the two halves of one corpus; both dumped (top-16 + tail, the demo's settings) on one transfer set and joined
with `merge --teachers`; students of the demo's student shape trained for the same steps and batches on the
same rows from A alone, B alone, and the 0.5/0.5 mixture (`teachers a:0.5,b:0.5`), each with 3 seeds. Every
student is scored on held-out sentences dumped by both teachers: NLL of the text, KL to A, KL to B (top-k +
rest bucket, exact float16 caches). Printed: the teachers' own held-out NLL (and the NLL of their exact mixture,
from the full distributions), mean ± sd over the seeds, the ensemble students' ratios to each single-teacher
baseline measured in the same run, and the bytes per token the second teacher adds to the cache.

    python tools/bench_multi_teacher.py [--workdir DIR] [--teacher-steps 300] [--student-steps 200] [--seeds 3]
                                        [--corpus-sentences 8000] [--transfer-sentences 600] [--heldout-sentences 300]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdcache import (DumpSettings, TrainSettings, dump_teacher, evaluate, join_teachers,  # noqa: E402
                     open_cache, train_student)
from kdcache.demo.run import STUDENT_SHAPE, llama_config, train_demo_teacher, write_jsonl  # noqa: E402
from kdcache.demo.synthetic import SyntheticLanguage, build_word_tokenizer  # noqa: E402
from kdcache.models import load_causal_lm  # noqa: E402
from kdcache.student.batching import chunked, collate  # noqa: E402

STUDENTS = {"teacher A alone": "a:1", "teacher B alone": "b:1", "ensemble A+B (0.5/0.5)": "a:0.5,b:0.5"}


@torch.inference_mode()
def mixture_nll(teachers: list[Path], heldout: Path) -> float:
    """Held-out NLL of the 0.5/0.5 mixture of the two teachers' full distributions (the ensemble itself)."""
    models = [load_causal_lm(str(path), "teacher", "float32").eval() for path in teachers]
    total = count = 0.0
    for rows in chunked(open_cache(heldout).sequences(), 32):
        batch = collate(rows)
        logprobs = [torch.log_softmax(model(**batch.model_inputs()).logits[batch.valid], -1) for model in models]
        mixed = torch.logsumexp(torch.stack(logprobs), 0) - torch.log(torch.tensor(2.0))
        labels = batch.next_token_labels()
        kept = labels != -100
        total += float(-mixed[kept].gather(1, labels[kept, None]).sum())
        count += float(kept.sum())
    return total / count


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--teacher-steps", type=int, default=300)
    parser.add_argument("--student-steps", type=int, default=200)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--corpus-sentences", type=int, default=8000, help="the teachers' corpus (half each)")
    parser.add_argument("--transfer-sentences", type=int, default=600, help="dumped by both teachers, trained on")
    parser.add_argument("--heldout-sentences", type=int, default=300, help="dumped by both teachers, scored on")
    return parser


def main() -> None:
    args = command_line().parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="kdcache-bench-multi-") as temporary:
        root = args.workdir or Path(temporary)
        root.mkdir(parents=True, exist_ok=True)
        started = time.perf_counter()
        language = SyntheticLanguage()
        tokenizer = build_word_tokenizer(language.words)
        tokenizer.padding_side = "right"
        corpus = language.sentences(args.corpus_sentences, seed=1)
        half = args.corpus_sentences // 2
        halves = {"a": corpus[:half], "b": corpus[half:]}
        for name, texts in halves.items():
            train_demo_teacher(root / f"teacher-{name}", tokenizer, texts, args.teacher_steps, progress=False)
        transfer = write_jsonl(root / "transfer.jsonl", language.sentences(args.transfer_sentences, seed=2))
        heldout = write_jsonl(root / "heldout.jsonl", language.sentences(args.heldout_sentences, seed=3))
        settings = DumpSettings(top_k=16, batch_size=32, shard_rows=256)
        manifests = {}
        for name in halves:
            manifests[name] = dump_teacher(str(root / f"teacher-{name}"), str(transfer), root / f"cache-{name}",
                                           settings, progress=False)
            dump_teacher(str(root / f"teacher-{name}"), str(heldout), root / f"heldout-{name}",
                         DumpSettings(top_k=16, batch_size=32, codec="plain", logprob_dtype="float16"), progress=False)
        joined = join_teachers([root / "cache-a", root / "cache-b"], ["a", "b"], root / "cache-ab", progress=False)
        config = root / "student.json"
        config.write_text(llama_config(len(tokenizer), STUDENT_SHAPE).to_json_string())

        scores: dict[str, list[dict]] = {name: [] for name in STUDENTS}
        for seed in range(args.seeds):
            for name, teachers in STUDENTS.items():
                out = root / f"student-{teachers.replace(':', '').replace(',', '-')}-{seed}"
                train_student(root / "cache-ab", out, student_config=str(config), progress=False,
                              settings=TrainSettings(teachers=teachers, max_steps=args.student_steps, batch_size=16,
                                                     lr=3e-3, seed=seed, log_every=100))
                model = load_causal_lm(str(out), "student", "float32")
                on_a, on_b = evaluate(model, root / "heldout-a"), evaluate(model, root / "heldout-b")
                scores[name].append({"nll": on_a["nll"], "kl_a": on_a["kl_to_teacher"],
                                     "kl_b": on_b["kl_to_teacher"]})
                print(f"seed {seed} {name}: NLL {on_a['nll']:.4f}, KL to A {on_a['kl_to_teacher']:.4f}, "
                      f"KL to B {on_b['kl_to_teacher']:.4f}", flush=True)
        teacher_nll = {name: evaluate(load_causal_lm(str(root / f"teacher-{name}"), "teacher", "float32"),
                                      root / f"heldout-{name}")["nll"] for name in halves}
        ensemble_nll = mixture_nll([root / "teacher-a", root / "teacher-b"], root / "heldout-a")
        elapsed = time.perf_counter() - started

    def stat(name: str, key: str) -> str:
        values = [entry[key] for entry in scores[name]]
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.mean(values):.4f} ± {spread:.4f}"

    def mean(name: str, key: str) -> float:
        return statistics.mean(entry[key] for entry in scores[name])

    tokens = joined.total_tokens
    print(f"\nteachers (demo shape) on the two halves of {args.corpus_sentences} sentences, {args.teacher_steps} steps "
          f"each; students {args.student_steps} steps x 16 sequences, {args.seeds} seeds; held-out: "
          f"{args.heldout_sentences} sentences")
    print(f"teacher NLL on held-out: A {teacher_nll['a']:.4f}, B {teacher_nll['b']:.4f}, "
          f"their 0.5/0.5 mixture {ensemble_nll:.4f}")
    print(f"\n{'student from':<24} {'NLL':>17} {'KL to A':>17} {'KL to B':>17}")
    for name in STUDENTS:
        print(f"{name:<24} {stat(name, 'nll'):>17} {stat(name, 'kl_a'):>17} {stat(name, 'kl_b'):>17}")
    ensemble = "ensemble A+B (0.5/0.5)"
    for baseline in ("teacher A alone", "teacher B alone"):
        print(f"ensemble / {baseline}: NLL {mean(ensemble, 'nll') / mean(baseline, 'nll'):.3f}, "
              f"KL to A {mean(ensemble, 'kl_a') / mean(baseline, 'kl_a'):.3f}, "
              f"KL to B {mean(ensemble, 'kl_b') / mean(baseline, 'kl_b'):.3f}")
    second = manifests["b"].total_bytes
    print(f"\ncache: teacher A {manifests['a'].total_bytes / tokens:.1f} bytes/token; the second teacher adds "
          f"{second / tokens:.1f} bytes/token ({second:,} bytes for {tokens:,} tokens; joined cache "
          f"{(joined.total_bytes + second) / tokens:.1f} bytes/token)")
    print(f"time: {elapsed:.0f}s")


if __name__ == "__main__":
    main()
