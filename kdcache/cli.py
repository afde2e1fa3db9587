"""Command-line interface: parse flags, call the library, turn user errors into one-line messages.

No logic lives here beyond formatting; every command has a library function behind it.
"""

from __future__ import annotations

import dataclasses
import json
import re
import time
import typing
from pathlib import Path

import click

from .cache.format import MANIFEST_NAME, Manifest
from .cache.safety import printable, redact
from .errors import KDCacheError
from .runtime import configure_threads, quiet_libraries, thread_settings
from .student.settings import TrainSettings
from .tasks import TASKS as TASK_NAMES
from .teacher.settings import DumpSettings, RecodeSettings


class _Command(click.Command):
    """Every command takes `--threads`, `--quiet` and `--verbose` (kdcache/runtime.py), applied before it runs."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.params += [
            click.Option(["--threads"], type=int, default=None,
                         help="CPU threads for torch (default: the free physical cores; OMP_NUM_THREADS is respected)."),
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
        with thread_settings():
            try:
                ctx.meta["kdcache.threads"] = configure_threads(threads)
            except KDCacheError as error:
                raise click.BadParameter(str(error).replace("`threads` ", ""), param_hint="--threads") from None
            ctx.meta["kdcache.progress"] = not quiet
            return super().invoke(ctx)


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
    started = time.time()
    manifest = dump_teacher(teacher, data, out, settings_from(DumpSettings, values), progress=_progress())
    if not PartialState().is_main_process:
        return
    if (Path(out) / MANIFEST_NAME).stat().st_mtime < started:
        click.echo(f"cache complete, nothing to do: {out} already holds this cache (same teacher, data and settings)")
        return
    click.echo(f"wrote {out}: {manifest.total_rows} sequences, {manifest.total_tokens} tokens, "
               f"{manifest.total_bytes / manifest.total_tokens:.0f} bytes/token")
    click.echo("\n".join(_fidelity_lines(manifest) + _dropped_lines(manifest)))


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
    """The fidelity card (see kdcache/fidelity.py), one line per stored target type."""
    card = manifest.stats.get("fidelity")
    if card is None:
        return ["fidelity     not recorded (cache dumped before fidelity cards)"]
    try:
        return _card_lines(card)
    except (KeyError, TypeError, ValueError):
        return ["fidelity     unreadable (malformed statistics in the manifest)"]


def _card_lines(card: dict) -> list[str]:
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


def _alignment_line(report: dict) -> str:
    """Cross-tokenizer alignment statistics (student/crosstok.py `CrossTokenizer.report`) in one line."""
    return (f"alignment    {report['aligned_share']:.1%} of student positions aligned, {report['inside_share']:.1%} "
            f"inside a teacher token ({report['skipped_share']:.1%} skipped), {report['exact_mass_share']:.1%} of the "
            f"teacher's mass maps exactly ({report['mapped_mass_share']:.1%} in all), {report['exact_vocabulary_share']:.1%} "
            f"of its vocabulary ({report['mapped_vocabulary_share']:.1%})  ({report['rows']} rows, "
            f"{report['student_positions']} positions)")


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
    click.echo(f"wrote {out}: {_describe_targets(manifest)}; {manifest.total_bytes / manifest.total_tokens:.1f} "
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
    from .cache.card import CARD_NAME
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
        f"{dataset.get('rows_dumped')} of {dataset.get('num_rows')} rows",
        f"targets      {_describe_targets(manifest)}; "
        f"hidden layers: {', '.join(map(str, manifest.hidden_layers)) or 'none'}",
        f"size         {len(manifest.shards)} shards, {manifest.total_rows} sequences, {manifest.total_tokens} tokens, "
        f"{manifest.total_bytes:,} bytes ({manifest.total_bytes / max(manifest.total_tokens, 1):.1f} bytes/token)",
        *([f"top-k mass   mean {mass.get('mean')}, p5 {mass.get('p5')}, p50 {mass.get('p50')}, p95 {mass.get('p95')}"]
          if mass else []),
        f"teacher NLL  {manifest.stats.get('teacher_nll')} "
        + ("nats/target (on gold labels)" if manifest.labels else "nats/token"),
        *_fidelity_lines(manifest),
        *_dropped_lines(manifest),
        *([f"sources      made from {len(manifest.sources)} other cache(s): "
           + ", ".join(str(source.get("location")) for source in manifest.sources)] if manifest.sources else []),
        f"card         {CARD_NAME if store.size(CARD_NAME) is not None else 'none'}",
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


def _count(value) -> str:
    """A count from the manifest (untrusted: maybe not a number) with thousands separators when it is one."""
    return f"{value:,}" if isinstance(value, int) else str(value)


def _describe_targets(manifest: Manifest) -> str:
    settings = manifest.settings
    head = (f"top-{manifest.top_k}" + (f" (mass-adaptive, p {settings['top_p']})" if settings.get("top_p") else "")
            + f" {settings['logprob_dtype']} log-probs + exact tail")
    draws = f"{settings.get('samples')} draws/position at T=1, seed {settings.get('seed')}"
    kinds = {"topk": head, "sampled": f"ids sampled with counts ({draws})",
             "head-tail": f"{head} + ids sampled from the tail ({draws})"}
    codec = manifest.codec
    return (" and ".join(kinds[kind] for kind in manifest.target_types)
            + f"; {codec.layout} codec" + (f", {codec.compression}" if codec.compression != "none" else "")
            + (", ids ranked by frequency" if codec.id_ranking else ""))


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
                        workers=workers)
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
def merge_command(caches, out):
    """Merge CACHES (directories or URLs) of the same teacher, tokenizer and target settings into one cache.

    Shards are hard-linked or copied, never re-encoded; when sample ids collide, each source's ids are
    shifted (its shards rewritten with the new ids) and the manifest's `sources` records the offsets.
    """
    from .cache.merge import merge_caches
    manifest = merge_caches(list(caches), out)
    shifted = [source for source in manifest.sources if source["id_offset"]]
    click.echo(f"wrote {out}: {len(manifest.shards)} shards, {manifest.total_rows} sequences, "
               f"{manifest.total_tokens} tokens from {len(caches)} caches"
               + (f"; sample ids of {len(shifted)} source(s) shifted (see `sources` in the manifest)" if shifted
                  else "; sample ids kept"))


@main.command("export")
@click.option("--format", "fmt", required=True, type=click.Choice(["axolotl", "distillkit"]),
              help="Target tool (its offline-KD dataset format; what each loses: see kdcache/interop.py).")
@click.argument("cache")
@click.argument("out", type=click.Path(path_type=Path))
def export_command(fmt, cache, out):
    """Write CACHE's top-k targets to OUT as a `datasets.save_to_disk` dataset in FORMAT."""
    from .interop import export_cache
    rows = export_cache(cache, out, fmt)
    click.echo(f"wrote {out}: {rows} rows in {fmt} format")


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
               + (f"; skipped {len(skipped)} rows without a target at every position" if skipped else ""))


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
    from .student import train_student
    summary = train_student(cache, out, student=student, student_config=student_config,
                            settings=settings_from(TrainSettings, values), resume=resume, resume_from=resume_from,
                            overwrite=overwrite, progress=_progress())
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
@click.option("--json", "as_json", is_flag=True,
              help="Print a JSON list of results, one object per student (its name under 'student').")
def eval_command(cache, students, batch_size, split_fraction, verify, as_json):
    """Score each STUDENT against the teacher targets in CACHE; print one table comparing them."""
    from .cache.cache import open_cache
    from .student import evaluate
    from .student.comparison import comparison_table
    from .student.loading import load_pretrained_student
    opened = open_cache(cache)
    if verify:
        opened.verify(progress=_progress())
    else:
        opened.check_files()
    heldout = None if split_fraction is None else opened.split(split_fraction, setting="split_fraction").heldout
    scored = opened if heldout is None else opened.subset(heldout)
    results = {student: evaluate(load_pretrained_student(student, opened.manifest), scored, batch_size=batch_size)
               for student in students}
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
