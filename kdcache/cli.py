"""Command-line interface: parse flags, call the library, turn user errors into one-line messages.

No logic lives here beyond formatting; every command has a library function behind it.
"""

from __future__ import annotations

import json
from pathlib import Path

import click

from .cache.format import Manifest
from .errors import KDCacheError
from .losses import DIVERGENCES, TAIL_MODES
from .tasks import CAUSAL_LM
from .tasks import TASKS as TASK_NAMES


class _Group(click.Group):
    """Reports a `KDCacheError` as `Error: <message>` with exit code 1, never a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KDCacheError as error:
            raise click.ClickException(str(error)) from None


def _int_list(ctx, param, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like '0,-1', got '{value}'") from None


@click.group(cls=_Group)
@click.version_option(package_name="kdcache")
def main():
    """kdcache: dump a teacher's soft targets once, train students from the cache."""


@main.command("dump-teacher")
@click.option("--teacher", required=True, help="Teacher (causal LM or classifier): local directory or hub id.")
@click.option("--data", required=True, help="Anything `datasets` loads: jsonl/json/csv/parquet/txt, save_to_disk dir, hub id.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache directory to create.")
@click.option("--split", default="train", show_default=True)
@click.option("--task", type=click.Choice(list(TASK_NAMES)), default=None,
              help="Default: inferred from the teacher config's architectures.")
@click.option("--text-column", default="text", show_default=True,
              help="Causal LM and sequence classification; a causal LM uses an input_ids column instead when present.")
@click.option("--text-pair-column", default=None, help="Sequence classification: the second text of pairs.")
@click.option("--label-column", default=None, help="Sequence classification gold labels (default: 'label' if present).")
@click.option("--tokens-column", default="tokens", show_default=True, help="Token classification: lists of words.")
@click.option("--labels-column", default=None,
              help="Token classification gold labels per word, ids or names (default: 'ner_tags' if present).")
@click.option("--max-length", default=1024, show_default=True, help="Truncate sequences to this many tokens.")
@click.option("--batch-size", default=8, show_default=True)
@click.option("--top-k", default=64, show_default=True, help="Teacher log-probs kept per position.")
@click.option("--hidden-layers", default="", callback=_int_list, help="Hidden states to cache, HF indexing (0 = embeddings, -1 = last), e.g. '-1' or '4,8'.")
@click.option("--limit", type=int, default=None, help="Dump only the first N rows.")
@click.option("--dtype", type=click.Choice(["auto", "float32", "bfloat16", "float16"]), default="auto", show_default=True)
@click.option("--logprob-dtype", type=click.Choice(["float16", "float32"]), default="float16", show_default=True)
@click.option("--shard-rows", default=10_000, show_default=True,
              help="Sequences per shard file; also the unit of work lost when a dump is killed and resumed.")
@click.option("--device-map", default=None,
              help="Spread a teacher too big for one device over the machine's devices, e.g. 'auto' (one process).")
@click.option("--skip-nonfinite", is_flag=True,
              help="Commit the cache without the sequences whose targets are NaN/inf (listed in the manifest).")
@click.option("--pooled", is_flag=True, help="Encoders: also cache the pooler's output ('pooled' column).")
@click.option("--targets", type=click.Choice(["topk", "sampled", "both"]), default="topk", show_default=True,
              help="Top-k log-probs + exact tail, ids sampled from the teacher with counts, or both "
                   "(causal LM only: classification caches store every label's probability).")
@click.option("--samples", default=50, show_default=True, help="Draws per position for sampled targets (T=1).")
@click.option("--seed", default=0, show_default=True, help="Seed of the draws (combined with each sample id).")
@click.option("--fidelity-every", default=8, show_default=True,
              help="The fidelity card measures every N-th target position of each batch (1 = all; costs dump speed).")
def dump_teacher_command(teacher, data, out, split, task, text_column, text_pair_column, label_column, tokens_column,
                         labels_column, max_length, batch_size, top_k, hidden_layers, limit, dtype, logprob_dtype,
                         shard_rows, device_map, skip_nonfinite, pooled, targets, samples, seed, fidelity_every):
    """Run TEACHER once over DATA and write its top-k and/or sampled targets to a cache.

    Rerunning the same command after an interruption resumes it. Under `accelerate launch` the
    processes share the work and write one cache.
    """
    from accelerate import PartialState

    from .teacher import DumpSettings, dump_teacher
    settings = DumpSettings(top_k=top_k, max_length=max_length, batch_size=batch_size, hidden_layers=hidden_layers,
                            limit=limit, dtype=dtype, logprob_dtype=logprob_dtype, shard_rows=shard_rows,
                            split=split, text_column=text_column, device_map=device_map,
                            skip_nonfinite=skip_nonfinite, targets=targets, samples=samples, seed=seed,
                            fidelity_every=fidelity_every, task=task, tokens_column=tokens_column, labels_column=labels_column,
                            label_column=label_column, text_pair_column=text_pair_column, pooled=pooled)
    manifest = dump_teacher(teacher, data, out, settings)
    if not PartialState().is_main_process:
        return
    click.echo(f"wrote {out}: {manifest.total_rows} sequences, {manifest.total_tokens} tokens, "
               f"{manifest.total_bytes / manifest.total_tokens:.0f} bytes/token")
    click.echo("\n".join(_fidelity_lines(manifest)))
    if manifest.stats["skipped_sample_ids"]:
        click.echo(f"skipped {len(manifest.stats['skipped_sample_ids'])} sequences with NaN/inf targets "
                   f"({manifest.stats['nonfinite_positions']} positions); their ids are in the manifest")


def _fidelity_lines(manifest: Manifest) -> list[str]:
    """The fidelity card (see kdcache/fidelity.py), one line per stored target type."""
    card = manifest.stats.get("fidelity")
    if card is None:
        return ["fidelity     not recorded (cache dumped before fidelity cards)"]
    lines = []
    if "topk" in card:
        topk = card["topk"]
        lines.append(f"fidelity     top-{topk['top_k']} + tail: captured mass {topk['captured_mass']:.4f}, "
                     f"KL(teacher ‖ rest-bucket reconstruction) {topk['kl_rest_bucket']:.4f} nats, "
                     f"TV {topk['tv_rest_bucket']:.4f}")
    if "sampled" in card:
        sampled = card["sampled"]
        lines.append(f"fidelity     sampled ({sampled['draws']} draws, {sampled['distinct_ids']:.1f} distinct ids): "
                     f"captured mass {sampled['captured_mass']:.4f}, KL on support {sampled['kl_on_support']:.4f} "
                     f"nats, TV {sampled['tv']:.4f}")
    return [line + f"  ({card['positions']} positions)" for line in lines]


@main.command("info")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def info_command(cache, as_json):
    """Summarise the cache at CACHE."""
    manifest = Manifest.load(cache)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    mass = manifest.stats.get("captured_mass", {})
    lines = [
        f"cache        {cache}  (format {manifest.format_version}, kdcache {manifest.kdcache_version}, {manifest.created_at})",
        f"task         {manifest.task}",
        f"teacher      {manifest.teacher['name_or_path']}  ({manifest.teacher['model_type']}, "
        f"{manifest.teacher['num_parameters']:,} parameters)",
        f"tokenizer    {manifest.tokenizer['class']}, {manifest.vocab_size} tokens, hash {manifest.tokenizer['hash'][:12]}",
        f"data         {manifest.dataset['source']} [{manifest.dataset['split']}], "
        f"{manifest.dataset['rows_dumped']} of {manifest.dataset['num_rows']} rows",
        f"targets      {_describe_targets(manifest)}; "
        f"hidden layers: {', '.join(map(str, manifest.hidden_layers)) or 'none'}",
        f"size         {len(manifest.shards)} shards, {manifest.total_rows} sequences, {manifest.total_tokens} tokens, "
        f"{manifest.total_bytes:,} bytes ({manifest.total_bytes / max(manifest.total_tokens, 1):.1f} bytes/token)",
        *([f"top-k mass   mean {mass.get('mean')}, p5 {mass.get('p5')}, p50 {mass.get('p50')}, p95 {mass.get('p95')}"]
          if mass else []),
        f"teacher NLL  {manifest.stats.get('teacher_nll')} "
        + ("nats/target (on gold labels)" if manifest.labels else "nats/token"),
        *_fidelity_lines(manifest),
    ]
    if manifest.labels:
        lines[1] += f"  (labels: {', '.join(manifest.labels)})"
    click.echo("\n".join(lines))


def _describe_targets(manifest: Manifest) -> str:
    kinds = {"topk": f"top-{manifest.top_k} {manifest.settings['logprob_dtype']} log-probs + exact tail",
             "sampled": f"ids sampled with counts ({manifest.settings.get('samples')} draws/position at T=1, "
                        f"seed {manifest.settings.get('seed')})"}
    return " and ".join(kinds[kind] for kind in manifest.target_types)


@main.command("verify")
@click.argument("cache", type=click.Path(path_type=Path))
def verify_command(cache):
    """Re-hash every shard of CACHE and check schema and counts against the manifest."""
    from .cache.cache import open_cache
    opened = open_cache(cache)
    opened.verify()
    manifest = opened.manifest
    click.echo(f"ok: {len(manifest.shards)} shards, {manifest.total_rows} sequences, {manifest.total_tokens} tokens")


@main.command("train-student")
@click.option("--cache", required=True, help="Cache directory or fsspec URL (s3://, gs://, hf://, http(s)://).")
@click.option("--out", required=True, type=click.Path(path_type=Path))
@click.option("--student", default=None, help="Pretrained student (directory or hub id).")
@click.option("--student-config", default=None, help="transformers config JSON (with model_type) for a fresh student.")
@click.option("--loss", type=click.Choice(DIVERGENCES), default="forward_kl", show_default=True)
@click.option("--tail", type=click.Choice(TAIL_MODES), default="rest-bucket", show_default=True)
@click.option("--temperature", default=1.0, show_default=True)
@click.option("--ce-weight", default=0.0, show_default=True, help="Weight of next-token cross-entropy on the text.")
@click.option("--kd-weight", default=1.0, show_default=True, help="Weight of T²·KD(teacher ‖ student).")
@click.option("--hidden-weight", default=0.0, show_default=True, help="Weight of hidden-state matching.")
@click.option("--hidden-loss", type=click.Choice(["mse", "cosine"]), default="mse", show_default=True,
              help="Hidden-state matching: mean squared error or 1 - cosine similarity per position.")
@click.option("--pooled-weight", default=0.0, show_default=True,
              help="Weight of matching the student's pooled output to the cached one (same loss as --hidden-loss).")
@click.option("--layer-map", default=None, help="student:teacher hidden layer pairs, e.g. '2:6,4:12'.")
@click.option("--lr", default=5e-4, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--grad-accum", default=1, show_default=True)
@click.option("--max-steps", type=int, default=None, help="Optimizer steps (default: one epoch).")
@click.option("--epochs", type=int, default=None)
@click.option("--seed", default=0, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "bfloat16", "float16"]), default="float32", show_default=True,
              help="Mixed precision through Accelerate.")
@click.option("--log-every", default=10, show_default=True)
@click.option("--no-verify", is_flag=True, help="Check shard sizes only instead of re-hashing the cache.")
@click.option("--targets", type=click.Choice(["topk", "sampled"]), default="topk", show_default=True,
              help="Which cached target type feeds the KD loss.")
@click.option("--val-fraction", default=0.0, show_default=True,
              help="Hold out this fraction of the cache (by sample id) for validation; never trained on.")
@click.option("--eval-every", type=int, default=None, help="Score the held-out split every N steps (and at the end).")
@click.option("--early-stopping", type=int, default=None,
              help="Stop after this many evaluations without a lower held-out KL; the best state is saved.")
@click.option("--read-through", default=None, type=click.Path(), help="For a remote cache: download each shard once to this directory and memory-map it.")
@click.option("--prefetch", type=int, default=None, help="Batches a background worker reads ahead; 0: read in the training process (default: 4 on an accelerator, 0 on CPU).")
@click.option("--save-every", type=int, default=None, help="Write a checkpoint to OUT.partial/checkpoints every N steps.")
@click.option("--keep-checkpoints", default=2, show_default=True, help="How many of the latest checkpoints to keep.")
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT.partial/checkpoints (start fresh if none).")
@click.option("--resume-from", type=click.Path(path_type=Path), default=None, help="Continue from this checkpoint directory.")
def train_student_command(cache, out, student, student_config, loss, tail, temperature, ce_weight, kd_weight,
                          hidden_weight, hidden_loss, pooled_weight, layer_map, lr, batch_size, grad_accum, max_steps,
                          epochs, seed, dtype, log_every, no_verify, targets, val_fraction, eval_every, early_stopping,
                          read_through, prefetch, save_every, keep_checkpoints, resume, resume_from):
    """Train a student from a cache; the teacher is not needed."""
    from .student import TrainSettings, train_student
    settings = TrainSettings(temperature=temperature, ce_weight=ce_weight, kd_weight=kd_weight,
                             hidden_weight=hidden_weight, hidden_loss=hidden_loss, pooled_weight=pooled_weight,
                             layer_map=layer_map, loss=loss, tail=tail, lr=lr,
                             batch_size=batch_size, grad_accum=grad_accum, max_steps=max_steps, epochs=epochs,
                             seed=seed, dtype=dtype, log_every=log_every, verify=not no_verify, targets=targets,
                             val_fraction=val_fraction, eval_every=eval_every, early_stopping=early_stopping,
                             read_through=read_through, prefetch=prefetch, save_every=save_every,
                             keep_checkpoints=keep_checkpoints)
    summary = train_student(cache, out, student=student, student_config=student_config, settings=settings,
                            resume=resume, resume_from=resume_from)
    click.echo(f"saved student to {out} after {summary['steps']} steps ({summary['tokens']} tokens, "
               f"{summary['seconds']:.1f}s); final loss {summary['final'].get('loss', float('nan')):.4f}")
    if "validation" in summary:
        validation = summary["validation"]
        click.echo(f"kept the state of step {validation['best_step']} (held-out KL "
                   f"{validation['best_val_kl_to_teacher']:.4f})"
                   + ("; stopped early" if validation["stopped_early"] else ""))


@main.command("eval")
@click.option("--cache", required=True, type=click.Path(path_type=Path), help="Cache holding the evaluation targets.")
@click.option("--student", required=True, help="Student directory or hub id.")
@click.option("--batch-size", default=16, show_default=True)
@click.option("--split-fraction", type=float, default=None,
              help="Score only the held-out fraction of CACHE (the rows train-student --val-fraction holds out).")
@click.option("--json", "as_json", is_flag=True)
def eval_command(cache, student, batch_size, split_fraction, as_json):
    """Score STUDENT against the teacher targets in CACHE."""
    from .cache.cache import open_cache
    from .student import evaluate
    from .student.loading import load_pretrained_student
    opened = open_cache(cache)
    heldout = None if split_fraction is None else opened.split(split_fraction, flag="--split-fraction").heldout
    model = load_pretrained_student(student, opened.manifest)
    result = evaluate(model, opened, batch_size=batch_size, sample_ids=heldout)
    if as_json:
        click.echo(json.dumps(result, indent=2))
        return
    if result.get("task", CAUSAL_LM) != CAUSAL_LM:
        from .student.classification_eval import format_table
        click.echo(format_table(result))
        return
    for name, value in result.items():
        click.echo(f"{name:16s} {value:.4f}" if isinstance(value, float) else f"{name:16s} {value}")


@main.command("init-student")
@click.option("--teacher", required=True, help="Teacher directory or hub id.")
@click.option("--layers", required=True, callback=_int_list,
              help="Teacher layers to copy, 0-based, e.g. '0,2,4' (with --hidden-size: only their count matters).")
@click.option("--hidden-size", type=int, default=None, help="Build a fresh, narrower model of this width instead.")
@click.option("--task", type=click.Choice(list(TASK_NAMES)), default=None,
              help="Model class to build (default: the teacher's own class).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the student.")
def init_student_command(teacher, layers, hidden_size, task, out):
    """Build a student from TEACHER's layers (DistilBERT style) or a narrower fresh model of its type."""
    from .student import init_student
    record = init_student(teacher, out, list(layers), hidden_size=hidden_size, task=task)
    click.echo(f"wrote {out}: {record['class']}, {len(record['layers'])} layers, hidden {record['hidden_size']}, "
               f"{record['num_parameters']:,} parameters ({record['mode']})")


@main.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Keep the teacher, caches and students here (default: a temporary directory).")
def demo_command(workdir):
    """Run the whole pipeline on a generated language and show what KD buys (CPU, a few minutes)."""
    from .demo import run_demo
    click.echo(run_demo(workdir))
