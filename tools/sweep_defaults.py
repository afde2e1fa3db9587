"""Sweep: which `train-student` settings give the lowest held-out KL to the teacher for a step budget?

The defaults of `TrainSettings` are chosen from this sweep (docs/train.md, "Defaults"). For each
task, at a fixed budget of optimizer steps, it scores points by the held-out KL(teacher ‖ student)
that `kdcache.evaluate` reports on a cache the student never trained on, 3 seeds per point:

- demo-fresh:  the demo language's transfer cache, a fresh 2-layer 64-wide Llama student (the demo's),
- demo-carved: the same cache, a student carved from the demo teacher by `init_student` (layers 0 and 3,
  the teacher's width, 128), to see whether the best learning rate moves with the student's width,
- demo-fresh-wide: a fresh student of the carved one's shape (2 layers, 128 wide), which tells the
  width apart from the carved student's pretrained start.

The sweep is coordinate-wise, because a full grid does not fit a shared 2-core machine: by default the
learning rate at batch 16, then the batch size at the best learning rate, the learning rate again at
the best batch, then the KD temperature, the warm-up share and a CE term, each at the best point so
far (`--stages lr` sweeps the learning rate alone).
Every point sets all swept fields explicitly; the row "defaults" sets only the budget and the seed, so
it measures what a user who gives nothing else gets from the `TrainSettings` defaults of this checkout.
Each point's scores are appended to `--results` (JSON lines) and reused by a rerun (the defaults' are
measured every time).

    python tools/sweep_defaults.py [--workdir DIR] [--tasks demo-fresh,demo-fresh-wide,demo-carved] [--stages lr,...] [--steps 100] [--seeds 0,1,2]

The demo's teacher and caches are built once in DIR by `kdcache.demo.run_demo` (as `kdcache demo --workdir DIR`),
at the demo's sizes unless `--demo-teacher-steps`, `--demo-student-steps` or `--demo-sentences` say otherwise.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from kdcache import TrainSettings, evaluate, init_student, train_student  # noqa: E402
from kdcache.demo import STUDENT_SHAPE, llama_config, run_demo  # noqa: E402
from kdcache.models import load_causal_lm, load_tokenizer  # noqa: E402

LRS = (3e-4, 1e-3, 3e-3, 1e-2)
VALUES = {"lr": LRS, "batch_size": (8, 16, 32), "temperature": (1.0, 2.0), "warmup_ratio": (0.0, 0.05, 0.2),
          "ce_weight": (0.0, 0.5)}
STAGES = "lr,batch_size,lr,temperature,warmup_ratio,ce_weight"
START = {"lr": 3e-3, "batch_size": 16, "temperature": 1.0, "warmup_ratio": 0.05, "ce_weight": 0.0}
SWEPT = tuple(START)
WIDE = {"hidden_size": 128, "intermediate_size": 384}  # the teacher's width, as a carved student has


def demo_tasks(workdir: Path, demo_sizes: dict[str, int]) -> dict[str, dict]:
    """The demo's cache and held-out cache with a fresh and a carved student (built on first use, with
    `demo_sizes` as `run_demo`'s keyword arguments)."""
    if not (workdir / "teacher").is_dir():
        run_demo(workdir, progress=False, **demo_sizes)
    vocab_size = len(load_tokenizer(str(workdir / "teacher")))
    configs = {}
    for name, shape in (("fresh", STUDENT_SHAPE), ("fresh-wide", {**STUDENT_SHAPE, **WIDE})):
        configs[name] = workdir / f"{name}-student.json"
        if not configs[name].exists():  # sweeps of other tasks may be reading it
            configs[name].write_text(llama_config(vocab_size, shape).to_json_string())
    carved = workdir / "carved"
    if not carved.is_dir():
        init_student(str(workdir / "teacher"), carved, [0, 3])
    common = {"cache": workdir / "cache", "heldout": workdir / "cache-heldout"}
    return {"demo-fresh": {**common, "student_config": str(configs["fresh"])},
            "demo-fresh-wide": {**common, "student_config": str(configs["fresh-wide"])},
            "demo-carved": {**common, "student": str(carved)}}


def score(task: dict, settings: TrainSettings) -> float:
    """Held-out KL(teacher ‖ student) after training with `settings`."""
    with tempfile.TemporaryDirectory(prefix="kdcache-sweep-") as scratch:
        out = Path(scratch) / "student"
        train_student(task["cache"], out, student=task.get("student"), student_config=task.get("student_config"),
                      settings=settings, progress=False)
        return evaluate(load_causal_lm(str(out), "student", "float32"), task["heldout"])["kl_to_teacher"]


def key(task_name: str, point: dict | None, steps: int, seed: int) -> str:
    described = "defaults" if point is None else ",".join(f"{name}={point[name]:g}" for name in SWEPT)
    return f"{task_name}|{steps}|{described}|{seed}"


def remember(results: Path, known: dict[str, float], name: str, kl: float) -> None:
    known[name] = kl
    with results.open("a") as file:
        file.write(json.dumps({"key": name, "kl": kl}) + "\n")


def measure(task_name: str, task: dict, point: dict | None, steps: int, seeds: list[int], results: Path,
            known: dict[str, float]) -> list[float]:
    """The KL of `point` (None: the defaults) at each seed, from `known` or trained now (and appended)."""
    scores = []
    for seed in seeds:
        name = key(task_name, point, steps, seed)
        if name not in known or point is None:  # the defaults are those of this checkout: always measured
            started = time.perf_counter()
            fields = {} if point is None else point
            remember(results, known, name, score(task, TrainSettings(max_steps=steps, seed=seed, verify=False,
                                                                     log_every=steps, **fields)))
            print(f"  {name}: KL {known[name]:.4f} ({time.perf_counter() - started:.0f}s)", flush=True)
        scores.append(known[name])
    return scores


def describe(point: dict | None) -> str:
    if point is None:
        return "defaults (budget only)"
    return (f"lr {point['lr']:.0e} batch {point['batch_size']} T {point['temperature']:g} "
            f"warmup {point['warmup_ratio']:g} ce {point['ce_weight']:g}")


def sweep(task_name: str, task: dict, stages: list[str], steps: int, seeds: list[int], results: Path,
          known: dict) -> str:
    table: dict[str, list[float]] = {}
    best = dict(START)
    for field in stages:
        stage = {}
        for value in VALUES[field]:
            point = {**best, field: value}
            stage[value] = statistics.mean(table.setdefault(describe(point), measure(
                task_name, task, point, steps, seeds, results, known)))
        best[field] = min(stage, key=stage.get)
    defaults = describe(None)
    table[defaults] = measure(task_name, task, None, steps, seeds, results, known)
    lowest = min(statistics.mean(kls) for name, kls in table.items() if name != defaults)
    if "student" in task:  # a carved student starts near the teacher: how near, before any step
        name = f"{task_name}|untrained"
        if name not in known:
            remember(results, known, name, evaluate(load_causal_lm(task["student"], "student", "float32"),
                                                   task["heldout"])["kl_to_teacher"])
        table["untrained (as carved, not a swept point)"] = [known[name]]
    lines = [f"\n{task_name}: held-out KL(teacher ‖ student) after {steps} steps, seeds {','.join(map(str, seeds))}",
             f"{'point':<50} {'KL mean ± std':>16} {'/ best':>7}"]
    for name, kls in sorted(table.items(), key=lambda item: statistics.mean(item[1])):
        mean = statistics.mean(kls)
        spread = statistics.stdev(kls) if len(kls) > 1 else 0.0
        lines.append(f"{name:<50} {mean:>8.4f} ± {spread:<6.4f} {mean / lowest:>7.2f}")
    lines.append(f"best swept point: {describe(best)}; the defaults land at "
                 f"{statistics.mean(table[defaults]) / lowest:.2f}x its KL (goal: within 1.10x)")
    return "\n".join(lines)


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", type=Path, default=Path(tempfile.gettempdir()) / "kdcache-sweep-defaults")
    parser.add_argument("--tasks", default="demo-fresh,demo-fresh-wide,demo-carved")
    parser.add_argument("--stages", default=STAGES, help="fields swept in turn, each at the best point so far")
    parser.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in LRS), help="the learning rates swept")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--results", type=Path, default=None, help="JSON lines of scores (default: WORKDIR/sweep.jsonl)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--demo-teacher-steps", type=int, default=400, help="the demo teacher's training steps")
    parser.add_argument("--demo-student-steps", type=int, default=300, help="the demo's own students' steps")
    parser.add_argument("--demo-sentences", type=int, default=600, help="the demo's transfer set (the swept cache)")
    return parser


def main() -> None:
    args = command_line().parse_args()
    torch.set_num_threads(args.threads)
    args.workdir.mkdir(parents=True, exist_ok=True)
    results = args.results or args.workdir / "sweep.jsonl"
    known = {}
    if results.exists():
        known = {row["key"]: row["kl"] for row in map(json.loads, results.read_text().splitlines())}
    VALUES["lr"] = tuple(float(lr) for lr in args.lrs.split(","))
    tasks = demo_tasks(args.workdir, {"teacher_steps": args.demo_teacher_steps, "student_steps": args.demo_student_steps,
                                      "transfer_sentences": args.demo_sentences})
    seeds = [int(seed) for seed in args.seeds.split(",")]
    for name in args.tasks.split(","):
        print(sweep(name, tasks[name], args.stages.split(","), args.steps, seeds, results, known), flush=True)


if __name__ == "__main__":
    main()
