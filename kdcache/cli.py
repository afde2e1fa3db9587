"""Command-line interface: parse flags, call the library, turn user errors into one-line messages.

No logic lives here beyond formatting; every command has a library function behind it.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import re
import sys
import time
import typing
import warnings
from pathlib import Path

import click

from .cache.describe import describe_augmentation, describe_targets, fidelity_rows, fidelity_scope, provenance
from .cache.format import MANIFEST_NAME, Manifest
from .cache.safety import printable, redact
from .errors import KDCacheError, KDCacheWarning
from .runtime import configure_threads, quiet_libraries, thread_settings
from .settings import THREADS_HELP
from .sources import check_dump_inputs, check_model_source, check_train_inputs, with_gguf_file
from .student.settings import TrainSettings
from .tasks.names import TASK_NAMES
from .teacher.settings import DumpSettings, RecodeSettings


class _Command(click.Command):
    """Every command takes `--threads`, `--quiet` and `--verbose` (kdcache/runtime.py), applied before it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["--threads"], type=int, default=None, help=THREADS_HELP),
            click.Option(["--quiet"], is_flag=True, help="No progress bars: only results and errors."),
            click.Option(["--verbose"], is_flag=True,
                         help="Also show the progress bars and load reports of transformers, datasets and the hub."),
        ]

    def invoke(self, ctx):
        threads, quiet, verbose = (ctx.params.pop(name) for name in ("threads", "quiet", "verbose"))
        if quiet and verbose:
            raise click.UsageError("--quiet and --verbose exclude each other")
        if not verbose:
            quiet_libraries()
        with thread_settings(), warnings.catch_warnings():
            warnings.simplefilter("always", KDCacheWarning)
            warnings.showwarning = functools.partial(_show_warning, warnings.showwarning)
            try:
                ctx.meta["kdcache.threads"] = configure_threads(threads)
            except KDCacheError as error:
                raise click.BadParameter(str(error).replace("`threads` ", ""), param_hint="--threads") from None
            ctx.meta["kdcache.progress"] = not quiet
            return super().invoke(ctx)


def _show_warning(show_other, message, category, filename, lineno, file=None, line=None) -> None:
    """A `KDCacheWarning` as one `Warning: ...` line on stderr, above any progress bar (tqdm.write);
    other libraries' warnings as `show_other` (what was in place) shows them."""
    if not issubclass(category, KDCacheWarning):
        show_other(message, category, filename, lineno, file, line)
        return
    from tqdm import tqdm
    context = click.get_current_context(silent=True)
    text = str(message) if context is None else _with_flags(str(message), context.find_root().command)
    tqdm.write(f"Warning: {printable(text)}", file=sys.stderr)


class _Group(click.Group):
    """Reports a `KDCacheError` as `Error: <message>` with exit code 1, never a traceback.

    Library messages name settings and arguments as `` `field_name` ``; here they become the flags
    a CLI user types (`--field-name`).
    """

    command_class = _Command

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except KDCacheError as error:
            raise click.ClickException(_with_flags(redact(str(error)), self)) from None  # no credential printed
        except KeyboardInterrupt:  # Ctrl-C: say what survives and how to go on, not click's bare "Aborted!"
            hint = _RESUME_HINTS.get(ctx.invoked_subcommand)
            click.echo("\ninterrupted" + (f": {hint}" if hint else ""), err=True)
            ctx.exit(130)


# What an interrupted command kept, and how to go on from there.
_RESUME_HINTS = {
    "dump-teacher": "the finished shards are kept; rerun the same command to resume",
    "train-student": "rerun with --resume to go on from the latest checkpoint (written every --save-every steps; "
                     "without checkpoints training starts over)",
    "copy": "the shards that arrived are kept; rerun the same command to resume",
}


def _progress() -> bool:
    """False under --quiet: the library's progress bars stay off."""
    return click.get_current_context().meta.get("kdcache.progress", True)


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
    threads, _ = click.get_current_context().meta["kdcache.threads"]  # what --threads (or its default) chose
    return settings_class(**{name: values.pop(name) for name in names}, threads=threads)


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
    settings = settings_from(DumpSettings, values)
    check_dump_inputs(teacher, data, settings.gguf_file)  # before importing torch: a typo fails in a moment
    from accelerate import PartialState

    from .teacher import dump_teacher
    started = time.time()
    manifest = dump_teacher(teacher, data, out, settings, progress=_progress())
    if not PartialState().is_main_process:
        return
    if (Path(out) / MANIFEST_NAME).stat().st_mtime < started:
        click.echo(f"cache complete, nothing to do: {out} already holds this cache (same teacher, data and settings)")
        return
    click.echo(f"wrote {out}: {manifest.total_rows} sequences, {manifest.total_tokens} tokens, "
               f"{manifest.total_bytes / manifest.total_tokens:.0f} bytes/token")
    if manifest.stats.get("resumed_shards"):
        click.echo(f"resumed: {manifest.stats['resumed_shards']} of {len(manifest.shards)} shards were already "
                   f"written by the interrupted run and kept")
    click.echo("\n".join(_fidelity_lines(manifest) + _unknown_lines(manifest) + _dropped_lines(manifest)))



def _unknown_lines(manifest: Manifest) -> list[str]:
    """The share of the data's tokens that are the tokenizer's unknown token (tasks/unknown.py), when recorded:
    caches dumped before it was, imported or made from other caches, and byte-level tokenizers have none."""
    count = manifest.stats.get("unknown_tokens")
    if not isinstance(count, dict):
        return []
    try:
        return [f"unknown      {float(count['share']):.2%} of the data's tokens are {count['token']} "
                f"({int(count['unknown'])} of {int(count['tokens'])} in the first {int(count['rows'])} rows)"]
    except (KeyError, TypeError, ValueError):
        return ["unknown      unreadable (malformed statistics in the manifest)"]


def _dropped_lines(manifest: Manifest) -> list[str]:
    """Why the cache holds fewer rows than the data: `limit`, rows with nothing to target, NaN/inf targets."""
    lines = []
    limit = manifest.settings.get("limit")
    if limit is not None and limit < manifest.dataset["num_rows"]:
        lines.append(f"dropped      the rows after the first {limit} (--limit)")
    for reason, entry in manifest.stats.get("dropped_rows", {}).items():
        shown = ", ".join(map(str, entry["sample_ids"][:5])) + (", ..." if entry["count"] > 5 else "")
        lines.append(f"dropped      {entry['count']} rows: {reason} (sample ids {shown})")
    skipped = manifest.stats.get("skipped_sample_ids", [])
    if skipped:
        lines.append(f"dropped      {len(skipped)} rows with NaN/inf targets ({manifest.stats['nonfinite_positions']} "
                     f"positions; --skip-nonfinite)")
    return lines


def _fidelity_lines(manifest: Manifest) -> list[str]:
    """The fidelity card (kdcache/cache/describe.py), one line per stored target type."""
    try:
        rows = fidelity_rows(manifest)
    except ValueError:
        return ["fidelity     unreadable (malformed statistics in the manifest)"]
    if rows is None:
        return ["fidelity     not recorded (cache dumped before fidelity cards)"]
    return [f"fidelity     {row.targets}: captured mass {row.captured_mass:.4f}, KL(teacher ‖ {row.kl_of}) "
            f"{row.kl:.4f} nats, TV {row.tv:.4f}" for row in rows] + [f"             {fidelity_scope(manifest)}"]


def _alignment_line(report: dict) -> str:
    """Cross-tokenizer alignment statistics (student/crosstok.py `CrossTokenizer.report`) in one line."""
    return (f"alignment    {report['aligned_share']:.1%} of student positions aligned, {report['inside_share']:.1%} "
            f"inside a teacher token ({report['skipped_share']:.1%} skipped), {report['exact_mass_share']:.1%} of the "
            f"teacher's mass maps exactly ({report['mapped_mass_share']:.1%} in all), {report['exact_vocabulary_share']:.1%} "
            f"of its vocabulary ({report['mapped_vocabulary_share']:.1%}); mass on the true next token by its casing: "
            + ", ".join(f"{name} {mass:.1%} ({report['true_token_positions'][name]:.0%} of positions)"
                        for name, mass in report["true_token_mass"].items())
            + f"  ({report['rows']} rows, {report['student_positions']} positions)")


@main.command("recode")
@click.argument("cache", type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory of the new cache.")
@settings_options(RecodeSettings)
def recode_command(cache, out, **values):
    """Rewrite CACHE into another codec (smaller k, 8-bit log-probs, compact layout, zstd, ids ranked by frequency)
    without the teacher."""
    from .teacher.recode import recode_cache
    manifest = recode_cache(cache, out, settings_from(RecodeSettings, values), progress=_progress())
    source = Manifest.load(cache)
    click.echo(f"wrote {out}: {describe_targets(manifest)}; {manifest.total_bytes / manifest.total_tokens:.1f} "
               f"bytes/token (was {source.total_bytes / source.total_tokens:.1f})")


@main.command("info")
@click.argument("cache")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@click.option("--plot", type=click.Path(path_type=Path), default=None,
              help="Also write a picture of the cache to this .html (self-contained) or .png file: captured-mass "
                   "histogram and profile by position, fidelity card, bytes per column (needs kdcache[plots]).")
@click.option("--student-tokenizer", default=None,
              help="Also report how a student with this tokenizer aligns to the cache (cross-tokenizer training).")
@click.option("--rows", default=1000, show_default=True, type=click.IntRange(min=1),
              help="With --student-tokenizer: measure on the first ROWS rows.")
@click.option("--transfer-timeout", default=600.0, show_default=True, type=click.FloatRange(min=0, min_open=True),
              help="For a remote cache: give up on one transfer (the manifest, a shard) after this many seconds.")
def info_command(cache, as_json, plot, student_tokenizer, rows, transfer_timeout):
    """Summarise the cache at CACHE (a directory or URL): reads its manifest and card only, no shard
    (unless a plot or a student tokenizer's alignment is asked for).

    The manifest comes from elsewhere: its text is printed with control characters escaped.
    """
    from .cache.cache import Cache
    from .cache.card import describe_teacher
    from .cache.store import CacheStore
    store = CacheStore(cache, transfer_timeout=transfer_timeout)
    manifest = store.load_manifest()
    if plot is not None:
        from .plots import write_cache_report
        write_cache_report(Cache(store, manifest), plot)
    if as_json:
        click.echo(json.dumps(manifest.to_dict(), indent=2))
        return
    mass = manifest.stats.get("captured_mass", {})
    teacher, dataset = manifest.teacher, manifest.dataset
    parameters = teacher.get("num_parameters")
    augmented = describe_augmentation(manifest)
    lines = [
        f"cache        {store}  (format {manifest.format_version}, kdcache {manifest.kdcache_version}, {manifest.created_at})",
        f"task         {manifest.task}",
        f"teacher      {teacher.get('name_or_path')}  ({teacher.get('model_type')}, "
        + (f"{parameters:,} parameters)" if isinstance(parameters, int) else
           f"{parameters} parameters)" if parameters else "parameters not recorded)"),
        *([f"teacher file {gguf.get('file')}  ({_count(gguf.get('bytes'))} bytes, GGUF, "
           f"sha256 {str(gguf.get('sha256'))[:12]})"] if isinstance(gguf := teacher.get("gguf"), dict) else []),
        f"tokenizer    {manifest.tokenizer.get('class')}, {manifest.vocab_size} tokens, hash {manifest.tokenizer['hash'][:12]}",
        f"data         {dataset.get('source')} [{dataset.get('split')}], "
        f"{dataset.get('rows_dumped')} of {dataset.get('num_rows')} rows"
        + (" and their variants" if augmented else ""),
        *([f"augmented    {augmented}"] if augmented else []),
        f"targets      {describe_targets(manifest)}; "
        f"hidden layers: {', '.join(map(str, manifest.hidden_layers)) or 'none'}",
        f"size         {len(manifest.shards)} shards, {manifest.total_rows} sequences, {manifest.total_tokens} tokens, "
        f"{manifest.total_bytes:,} bytes ({manifest.total_bytes / max(manifest.total_tokens, 1):.1f} bytes/token)",
        *([f"top-k mass   mean {mass.get('mean')}, p5 {mass.get('p5')}, p50 {mass.get('p50')}, p95 {mass.get('p95')}"]
          if mass else []),
        f"teacher NLL  {manifest.stats.get('teacher_nll')} "
        + ("nats/target (on gold labels)" if manifest.labels else "nats/token")
        + (" (of the source cache)" if manifest.stats.get("teacher_nll_measured_on") == "source" else ""),
        *_fidelity_lines(manifest),
        *_unknown_lines(manifest),
        *[f"teacher {index + 1}    {describe_teacher(entry, manifest.total_tokens)}"
          for index, entry in enumerate(manifest.teachers)],
        *_dropped_lines(manifest),
        *([f"sources      {provenance(manifest)}"] if manifest.sources else []),
        f"card         {_card(store)}",
    ]
    if manifest.labels:
        lines[1] += f"  (labels: {', '.join(manifest.labels)})"
    if student_tokenizer:
        import itertools

        from .student.crosstok import CrossTokenizer
        opened = Cache(store, manifest)
        report = CrossTokenizer.from_path(opened, student_tokenizer).report(itertools.islice(opened.sequences(), rows))
        lines.append(_alignment_line(report) + f" for {student_tokenizer}")
    click.echo("\n".join(printable(redact(line)) for line in lines))
    if plot is not None:
        click.echo(f"report       {printable(plot)}")


def _card(store) -> str:
    """Whether the cache has a card, and whether `copy` could carry it (capped, UTF-8): a damaged card is noted,
    not fatal, since the manifest, not the card, is what `info` describes."""
    from .cache.card import CARD_NAME
    from .cache.safety import MAX_CARD_BYTES
    try:
        return CARD_NAME if store.read_text(CARD_NAME, MAX_CARD_BYTES) is not None else "none"
    except KDCacheError as error:
        return f"{CARD_NAME}, unreadable: {error}"


def _count(value) -> str:
    """A count from the manifest (untrusted: maybe not a number) with thousands separators when it is one."""
    return f"{value:,}" if isinstance(value, int) else str(value)


@main.command("verify")
@click.argument("cache")
def verify_command(cache):
    """Re-hash every shard and tokenizer file of CACHE (a directory or URL) and check every value against the manifest."""
    from .cache.cache import open_cache
    opened = open_cache(cache)
    opened.verify(progress=_progress())
    manifest = opened.manifest
    click.echo(f"ok: {len(manifest.shards)} shards, {manifest.total_rows} sequences, {manifest.total_tokens} tokens")


def _sample_id_file(ctx, param, value: Path | None) -> list[int] | None:
    if value is None:
        return None
    try:
        return [int(part) for part in re.split(r"[\s,]+", value.read_text().strip()) if part]
    except ValueError:
        raise click.BadParameter(f"{value} must hold integers separated by spaces, commas or newlines") from None


@main.command("copy")
@click.argument("source")
@click.argument("destination")
@click.option("--shards", callback=_int_list, default=None, metavar="I,J,...",
              help="Copy only these shards (numbers as listed by `kdcache info --json`).")
@click.option("--rows", type=int, default=None, help="Copy only the first N sequences (in shard order).")
@click.option("--sample-ids", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              callback=_sample_id_file, help="Copy only the sequences whose sample ids this file lists.")
@click.option("--workers", type=int, default=8, show_default=True, help="Shards transferred in parallel.")
def copy_command(source, destination, shards, rows, sample_ids, workers):
    """Copy the cache at SOURCE to DESTINATION: push (DIR → URL), pull (URL → DIR) or select a subset.

    Either side may be a directory or an fsspec URL (s3://, gs://, hf://datasets/..., file://; http(s)
    as a source). Every shard is checked against the manifest on arrival, the manifest is written
    last, and rerunning an interrupted copy skips what already arrived.
    """
    from .cache.transfer import copy_cache
    report = copy_cache(source, destination, shards=shards or None, rows=rows, sample_ids=sample_ids,
                        workers=workers, progress=_progress())
    manifest = report.manifest
    click.echo(f"copied {len(report.copied)} shards ({report.bytes_copied:,} bytes), "
               f"{len(report.skipped)} already there and intact")
    click.echo(f"{report.destination}: {len(manifest.shards)} shards, {manifest.total_rows} sequences, "
               f"{manifest.total_tokens} tokens" + (" (a subset: see `sources` in its manifest)"
                                                     if manifest.sources and manifest.sources[0].get("selection")
                                                     else ""))


@main.command("merge")
@click.argument("caches", nargs=-1, required=True)
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the merged cache.")
@click.option("--teachers", default=None, metavar="A,B,...",
              help="Join caches of the same rows dumped by different teachers into one multi-teacher cache, "
                   "naming each teacher (in the order of CACHES; the first is the cache's own).")
def merge_command(caches, out, teachers):
    """Merge CACHES (directories or URLs) of the same teacher, tokenizer and target settings into one cache.

    Shards are hard-linked or copied, never re-encoded; when sample ids collide, each source's ids are
    shifted (its shards rewritten with the new ids) and the manifest's `sources` records the offsets.
    With --teachers, CACHES hold the same rows dumped by different teachers, and the result holds every
    teacher's targets for them (train-student --teachers mixes them).
    """
    if teachers is not None:
        from .cache.teachers import join_teachers
        manifest = join_teachers(list(caches), [name.strip() for name in teachers.split(",")], out,
                                 progress=_progress())
        click.echo(f"wrote {out}: {len(manifest.teachers)} teachers ({', '.join(manifest.teacher_names)}) of "
                   f"{manifest.total_rows} sequences, {manifest.total_tokens} tokens")
        return
    from .cache.merge import merge_caches
    manifest = merge_caches(list(caches), out, progress=_progress())
    shifted = [source for source in manifest.sources if source["id_offset"]]
    click.echo(f"wrote {out}: {len(manifest.shards)} shards, {manifest.total_rows} sequences, "
               f"{manifest.total_tokens} tokens from {len(caches)} caches"
               + (f"; sample ids of {len(shifted)} source(s) shifted (see `sources` in the manifest)" if shifted
                  else "; sample ids kept"))


@main.command("export")
@click.option("--format", "fmt", required=True, type=click.Choice(["axolotl", "distillkit"]),
              help="Target tool (its offline-KD dataset format; what each loses: see kdcache/interop.py).")
@click.option("--kd-temperature", type=float, default=1.0, show_default=True,
              help="axolotl only: the `kd_temperature` of the axolotl config that will train on OUT (axolotl takes "
                   "the targets as given and tempers only the student, so they are written at this temperature).")
@click.argument("cache")
@click.argument("out", type=click.Path(path_type=Path))
def export_command(fmt, kd_temperature, cache, out):
    """Write CACHE's top-k targets (a head-tail cache's head and tail) to OUT as a `datasets.save_to_disk`
    dataset in FORMAT."""
    from .interop import export_cache
    rows = export_cache(cache, out, fmt, kd_temperature=kd_temperature)
    click.echo(f"wrote {out}: {rows} rows in {fmt} format"
               + (f"; set `kd_temperature: {kd_temperature:g}` in the axolotl config" if fmt == "axolotl" else ""))
    from .cache.store import CacheStore
    teachers = CacheStore(cache).load_manifest().teacher_names
    if teachers:  # the formats hold one teacher's targets
        click.echo(printable(f"the targets of teacher {teachers[0]}, the cache's own; export another teacher from "
                             f"its cache, {cache}/teachers/<name> ({', '.join(teachers[1:])})"))


@main.command("import")
@click.option("--format", "fmt", required=True, type=click.Choice(["axolotl", "distillkit"]),
              help="Source format (its offline-KD dataset format; what each loses: see kdcache/interop.py).")
@click.option("--tokenizer", required=True, help="The tokenizer whose ids the dataset holds (directory or hub id).")
@click.option("--teacher", default=None, help="Name of the teacher that produced the targets, for the manifest.")
@click.option("--split", default="train", show_default=True, help="Split of SOURCE to import.")
@click.argument("source")
@click.argument("out", type=click.Path(path_type=Path))
def import_command(fmt, tokenizer, teacher, split, source, out):
    """Make a cache in OUT from SOURCE, an axolotl or DistillKit dataset (anything `datasets` loads)."""
    from .interop import import_dataset
    manifest = import_dataset(source, out, fmt, tokenizer=tokenizer, teacher=teacher, split=split)
    skipped = manifest.stats["skipped_sample_ids"]
    click.echo(f"wrote {out}: {manifest.total_rows} sequences, {manifest.total_tokens} tokens, top-{manifest.top_k}"
               + (f"; skipped {len(skipped)} rows without usable targets (listed in `stats.skipped_sample_ids`)"
                  if skipped else ""))


@main.command("train-student")
@click.option("--cache", required=True, help="Cache directory or fsspec URL (s3://, gs://, hf://, http(s)://).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Directory for the trained student.")
@click.option("--student", default=None, help="Pretrained student (directory or hub id).")
@click.option("--student-config", default=None, help="transformers config JSON (with model_type) for a fresh student.")
@settings_options(TrainSettings)
@click.option("--resume", is_flag=True, help="Continue from the latest checkpoint in OUT.partial/checkpoints (start fresh if none).")
@click.option("--resume-from", type=click.Path(path_type=Path), default=None, help="Continue from this checkpoint directory.")
@click.option("--overwrite", is_flag=True, help="Replace a student kdcache wrote to OUT earlier (once the new one is saved).")
def train_student_command(cache, out, student, student_config, resume, resume_from, overwrite, **values):
    """Train a student from a cache; the teacher is not needed."""
    settings = settings_from(TrainSettings, values)
    check_train_inputs(cache, student, student_config)  # before importing torch: a typo fails in a moment
    from .student import train_student
    summary = train_student(cache, out, student=student, student_config=student_config, settings=settings,
                            resume=resume, resume_from=resume_from, overwrite=overwrite, progress=_progress())
    if "resumed_from_step" in summary:
        click.echo(f"resumed from step {summary['resumed_from_step']} of the checkpoint {summary['resumed_from']}")
    click.echo(f"saved student to {out} after {summary['steps']} steps ({summary['tokens']} tokens, "
               f"{summary['seconds']:.1f}s); final loss {summary['final'].get('loss', float('nan')):.4f}")
    if "cross_tokenizer" in summary:
        click.echo(_alignment_line(summary["cross_tokenizer"]))
    from .plots import CURVES_FILE, PLOTS_HINT
    click.echo(f"curves: {out / CURVES_FILE}" if (out / CURVES_FILE).is_file()
               else f"no {CURVES_FILE}: plots need matplotlib ({PLOTS_HINT})")
    if "validation" in summary:
        validation = summary["validation"]
        click.echo(f"kept the state of step {validation['best_step']} (held-out KL "
                   f"{validation['best_val_kl_to_teacher']:.4f})"
                   + ("; stopped early" if validation["stopped_early"] else ""))


@main.command("eval")
@click.option("--cache", required=True, help="Cache holding the evaluation targets (directory or fsspec URL).")
@click.option("--student", "students", required=True, multiple=True,
              help="Student directory or hub id; repeat to compare several in one table.")
@click.option("--batch-size", default=16, show_default=True, help="Sequences per forward pass.")
@click.option("--split-fraction", type=float, default=None,
              help="Score only the held-out fraction of CACHE (the rows train-student --val-fraction holds out).")
@click.option("--verify/--no-verify", default=True, show_default=True,
              help="Re-hash every shard before scoring (off: check shard sizes only).")
@click.option("--baseline", default=None,
              help="A student trained without the soft targets (CE only) on the same budget: scored too, and each "
                   "STUDENT not clearly closer to the teacher than it is named in a warning.")
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of results, one object per student (its name under 'student').")
def eval_command(cache, students, batch_size, split_fraction, verify, baseline, as_json):
    """Score each STUDENT against the teacher targets in CACHE; print one table comparing them."""
    from .cache.cache import open_cache
    opened = open_cache(cache)
    for student in students:  # before importing torch: a typo fails in a moment
        check_model_source(student, "student")
    from .student import evaluate
    from .student.comparison import comparison_table, warn_far_from_teacher
    from .student.loading import load_pretrained_student
    if verify:
        opened.verify(progress=_progress())
    else:
        opened.check_files()
    heldout = None if split_fraction is None else opened.split(split_fraction, setting="split_fraction").heldout
    scored = opened if heldout is None else opened.subset(heldout)
    results = {student: evaluate(load_pretrained_student(student, opened.manifest), scored, batch_size=batch_size)
               for student in students + ((baseline,) if baseline and baseline not in students else ())}
    if baseline:
        warn_far_from_teacher(results, baseline)
    if as_json:
        click.echo(json.dumps([{"student": student, **result} for student, result in results.items()], indent=2))
        return
    click.echo(comparison_table(results))


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
    check_model_source(with_gguf_file(teacher, gguf_file), "teacher")  # before importing torch
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
    click.echo(run_demo(workdir, progress=_progress()))
    threads, why = click.get_current_context().meta["kdcache.threads"]
    click.echo(f"threads: {threads} ({why}); set --threads to choose")
