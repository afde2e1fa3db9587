"""Command-line interface: parse flags, call the library, turn user errors into one-line messages.

No logic lives here beyond formatting; every command has a library function behind it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import typing
from pathlib import Path

import click

from .cache.format import Manifest
from .errors import KDCacheError
from .student.settings import TrainSettings
from .tasks import CAUSAL_LM
from .tasks import TASKS as TASK_NAMES
from .teacher.settings import DumpSettings


class _Group(click.Group):
    """Reports a `KDCacheError` as `Error: <message>` with exit code 1, never a traceback.

    Library messages name settings and arguments as `` `field_name` ``; here they become the flags
    a CLI user types (`--field-name`).
    """

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KDCacheError as error:
            raise click.ClickException(_with_flags(str(error), self)) from None


def _with_flags(message: str, group: click.Group) -> str:
    flags = {param.name: param.opts[0] for command in group.commands.values() for param in command.params
             if isinstance(param, click.Option)}
    return re.sub(r"`([a-z_][a-z0-9_]*)`", lambda match: flags.get(match[1], match[1]), message)


def _int_list(ctx, param, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        return tuple(int(part) for part in value.split(","))
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers like '0,-1', got '{value}'") from None


_CLICK_TYPES = {int: click.INT, float: click.FLOAT, str: click.STRING}


def settings_options(settings_class):
    """Decorate a command with one option per field of `settings_class` (kdcache/settings.py): the name,
    type, default, choices and help come from the field, so each setting is spelled once."""
    hints = typing.get_type_hints(settings_class)

    def decorate(command):
        for field in reversed(dataclasses.fields(settings_class)):
            if not field.metadata.get("cli", True):
                continue
            flag = "--" + field.name.replace("_", "-")
            kind = hints[field.name]
            arguments = [t for t in typing.get_args(kind) if t is not type(None)] or [kind]
            options = {"help": field.metadata.get("help"), "default": field.default,
                       "show_default": field.default is not None and field.default is not False and field.default != ()}
            if kind is bool:
                declaration = [flag] if field.default is False else [f"{flag}/--no-{flag[2:]}"]
                options |= {"is_flag": True}
                command = click.option(*declaration, field.name, **options)(command)
                continue
            if typing.get_origin(kind) is tuple:
                options |= {"callback": _int_list, "default": ",".join(map(str, field.default)) or None,
                            "metavar": "I,J,..."}
            elif field.metadata.get("choices"):
                options["type"] = click.Choice(list(field.metadata["choices"]))
            else:
                options["type"] = _CLICK_TYPES[arguments[0]]
            command = click.option(flag, field.name, **options)(command)
        return command

    return decorate


def settings_from(settings_class, values: dict):
    """Take the settings fields out of a command's keyword arguments and build the settings."""
    names = [field.name for field in dataclasses.fields(settings_class) if field.metadata.get("cli", True)]
    return settings_class(**{name: values.pop(name) for name in names})


@click.group(cls=_Group)
@click.version_option(package_name="kdcache")
def main():
    """kdcache: dump a teacher's soft targets once, train students from the cache."""


@main.command("dump-teacher")
@click.option("--teacher", required=True,
              help="Teacher (causal LM or classifier): local directory, hub id or .gguf file.")
@click.option("--data", required=True, help="Anything `datasets` loads: jsonl/json/csv/parquet/txt, save_to_disk dir, hub id.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Cache directory to create.")
@settings_options(DumpSettings)
def dump_teacher_command(teacher, data, out, **values):
    """Run TEACHER once over DATA and write its top-k and/or sampled targets to a cache.

    Rerunning the same command after an interruption resumes it. Under `accelerate launch` the
    processes share the work and write one cache.
    """
    from accelerate import PartialState

    from .teacher import dump_teacher
    manifest = dump_teacher(teacher, data, out, settings_from(DumpSettings, values))
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
        *([f"teacher file {gguf['file']}  ({gguf['bytes']:,} bytes, GGUF, sha256 {gguf['sha256'][:12]})"]
          if (gguf := manifest.teacher.get("gguf")) else []),
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
    from .cache.reader import verify_cache
    manifest = Manifest.load(cache)
    verify_cache(cache, manifest)
    click.echo(f"ok: {len(manifest.shards)} shards, {manifest.total_rows} sequences, {manifest.total_tokens} tokens")


@main.command("train-student")
@click.option("--cache", required=True, help="Cache directory or fsspec URL (s3://, gs://, hf://, http(s)://).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the trained student.")
@click.option("--student", default=None, help="Pretrained student (directory or hub id).")
@click.option("--student-config", default=None, help="transformers config JSON (with model_type) for a fresh student.")
@settings_options(TrainSettings)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT.partial/checkpoints (start fresh if none).")
@click.option("--resume-from", type=click.Path(path_type=Path), default=None, help="Continue from this checkpoint directory.")
def train_student_command(cache, out, student, student_config, resume, resume_from, **values):
    """Train a student from a cache; the teacher is not needed."""
    from .student import train_student
    summary = train_student(cache, out, student=student, student_config=student_config,
                            settings=settings_from(TrainSettings, values), resume=resume, resume_from=resume_from)
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
    from .cache.split import split_cache
    from .student import evaluate_student
    from .student.loading import load_pretrained_student
    manifest = Manifest.load(cache)
    heldout = None if split_fraction is None else split_cache(cache, manifest, split_fraction,
                                                              setting="split_fraction").heldout
    model = load_pretrained_student(student, manifest)
    result = evaluate_student(model, cache, batch_size=batch_size, sample_ids=heldout)
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
@click.option("--teacher", required=True, help="Teacher directory, hub id or .gguf file.")
@click.option("--layers", required=True, callback=_int_list,
              help="Teacher layers to copy, 0-based, e.g. '0,2,4' (with --hidden-size: only their count matters).")
@click.option("--hidden-size", type=int, default=None, help="Build a fresh, narrower model of this width instead.")
@click.option("--task", type=click.Choice(list(TASK_NAMES)), default=None,
              help="Model class to build (default: the teacher's own class).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the student.")
@click.option("--gguf-file", default=None, help="A GGUF teacher: the .gguf file inside the --teacher directory.")
def init_student_command(teacher, layers, hidden_size, task, out, gguf_file):
    """Build a student from TEACHER's layers (DistilBERT style) or a narrower fresh model of its type."""
    from .student import init_student
    record = init_student(teacher, out, list(layers), hidden_size=hidden_size, task=task, gguf_file=gguf_file)
    click.echo(f"wrote {out}: {record['class']}, {len(record['layers'])} layers, hidden {record['hidden_size']}, "
               f"{record['num_parameters']:,} parameters ({record['mode']})")


@main.command("demo")
@click.option("--workdir", type=click.Path(path_type=Path), default=None,
              help="Keep the teacher, caches and students here (default: a temporary directory).")
def demo_command(workdir):
    """Run the whole pipeline on a generated language and show what KD buys (CPU, a few minutes)."""
    from .demo import run_demo
    click.echo(run_demo(workdir))
