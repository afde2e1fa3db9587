"""`kdcache demo`: the whole product on a generated language, with an honest comparison.

Trains a small teacher on text from `SyntheticLanguage`, dumps it on a transfer set and on a
held-out set, then trains the same student twice for the same steps on the same sequences: once
from the cached soft targets (KD), once on the text alone (CE). Both are scored on the held-out
cache. Teacher training is the one place kdcache trains without a cache, so it is a plain loop.
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, LlamaConfig

from ..models import load_causal_lm
from ..student.scoring import evaluate
from ..student.train import TrainSettings, train_student
from ..teacher.dump import DumpSettings, dump_teacher
from .synthetic import SyntheticLanguage, build_word_tokenizer

TEACHER_SHAPE = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 4, "num_attention_heads": 4}
STUDENT_SHAPE = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, "num_attention_heads": 4}


def llama_config(vocab_size: int, shape: dict) -> LlamaConfig:
    return LlamaConfig(vocab_size=vocab_size, num_key_value_heads=shape["num_attention_heads"],
                       max_position_embeddings=128, tie_word_embeddings=True, **shape)


def write_jsonl(path: Path, texts: list[str]) -> Path:
    """`texts` as a JSON-lines file with a `text` column, the form `dump_teacher` reads."""
    path.write_text("".join(json.dumps({"text": text}) + "\n" for text in texts))
    return path


def train_demo_teacher(directory: Path, tokenizer, texts: list[str], steps: int, batch_size: int = 32,
                       progress: bool = True) -> None:
    """Next-token CE training of the demo teacher (TEACHER_SHAPE), saved with `tokenizer` to `directory`;
    shuffled sequential batches, AdamW, cosine decay. Public so benchmarks distil the demo's own teacher."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(llama_config(len(tokenizer), TEACHER_SHAPE))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=3e-3, total_steps=steps, pct_start=0.05)
    order = torch.randperm(len(texts)).tolist()
    for step in tqdm(range(steps), desc="train teacher", unit="step", disable=not progress):
        start = step * batch_size % len(texts)
        batch = tokenizer([texts[i] for i in order[start:start + batch_size]], padding=True, return_tensors="pt")
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        loss = model(**batch, labels=labels).loss
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad()
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def _row(name: str, scores: dict) -> str:
    return (f"{name:<24} {scores['nll']:>8.3f} {scores['kl_to_teacher']:>10.3f} "
            f"{scores['top1_agreement']:>10.1%}")


def run_demo(workdir: Path | None = None, *, teacher_steps: int = 400, student_steps: int = 300,
             transfer_sentences: int = 600, progress: bool = True) -> str:
    """Run the pipeline in `workdir` (a temporary directory if None); return the report table."""
    with tempfile.TemporaryDirectory(prefix="kdcache-demo-") as temporary:
        root = Path(workdir or temporary)
        root.mkdir(parents=True, exist_ok=True)
        timings = {}
        language = SyntheticLanguage()
        tokenizer = build_word_tokenizer(language.words)
        tokenizer.padding_side = "right"

        started = time.perf_counter()
        train_demo_teacher(root / "teacher", tokenizer, language.sentences(8000, seed=1), teacher_steps,
                           progress=progress)
        timings["train teacher"] = time.perf_counter() - started

        started = time.perf_counter()
        transfer = write_jsonl(root / "transfer.jsonl", language.sentences(transfer_sentences, seed=2))
        heldout = write_jsonl(root / "heldout.jsonl", language.sentences(300, seed=3))
        settings = DumpSettings(top_k=16, batch_size=32, shard_rows=256)
        manifest = dump_teacher(str(root / "teacher"), str(transfer), root / "cache", settings, progress=progress)
        # The held-out cache scores the students: exact float16 log-probs, so the teacher's argmax is not
        # blurred by ties between 8-bit codes (the transfer cache keeps the compact default).
        dump_teacher(str(root / "teacher"), str(heldout), root / "cache-heldout",
                     dataclasses.replace(settings, codec="plain", logprob_dtype="float16"), progress=progress)
        timings["dump teacher (2 caches)"] = time.perf_counter() - started

        config_file = root / "student-config.json"
        config_file.write_text(llama_config(len(tokenizer), STUDENT_SHAPE).to_json_string())
        scores = {}
        for name, weights in (("KD student", {"kd_weight": 1.0, "ce_weight": 0.0}),
                              ("CE-only student", {"kd_weight": 0.0, "ce_weight": 1.0})):
            started = time.perf_counter()
            train = TrainSettings(max_steps=student_steps, batch_size=16, lr=3e-3, log_every=50, **weights)
            train_student(root / "cache", root / name.split()[0].lower(), student_config=str(config_file),
                          settings=train, progress=progress)
            timings[f"train {name}"] = time.perf_counter() - started
            scores[name] = evaluate(load_causal_lm(str(root / name.split()[0].lower()), "student", "float32"),
                                            root / "cache-heldout")
        teacher_scores = evaluate(load_causal_lm(str(root / "teacher"), "teacher", "float32"), root / "cache-heldout")

        lines = ["", f"kdcache demo  (held-out: {teacher_scores['positions']} positions of unseen sentences)", "",
                 f"{'model':<24} {'NLL':>8} {'KL(T‖S)':>10} {'top-1 agr':>10}",
                 _row("teacher (4 layers, 128)", teacher_scores),
                 _row("KD student (2 layers, 64)", scores["KD student"]),
                 _row("CE-only student (same)", scores["CE-only student"]), "",
                 f"cache: top-{manifest.top_k} + tail, {manifest.total_bytes / manifest.total_tokens:.1f} bytes/token "
                 f"({manifest.total_tokens} tokens, mean top-k mass {manifest.stats['captured_mass']['mean']:.3f})",
                 "time:  " + ", ".join(f"{phase} {seconds:.1f}s" for phase, seconds in timings.items())]
        gap = scores["CE-only student"]["kl_to_teacher"] - scores["KD student"]["kl_to_teacher"]
        lines.append(f"KD {'lowers' if gap > 0 else 'does not lower'} the student's KL to the teacher by {gap:.3f} nats/token "
                     f"for the same {student_steps} steps on the same {transfer_sentences} sentences.")
        if workdir:
            lines.append(f"artifacts kept in {root}")
        return "\n".join(lines)
