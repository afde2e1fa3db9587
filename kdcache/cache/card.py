"""The cache card: `README.md` in the Hugging Face dataset-card format, generated from the manifest.

A shared cache is found and judged before it is downloaded, so it carries a card a person can read
(what teacher, what data, how faithful the targets are, the command that trains from it) and that
tools understand: the YAML front matter's `configs`/`data_files` point `datasets.load_dataset(<dir or
repo>)` at the Arrow shards, and the Hub renders the card and its metadata. Everything in it comes from
the manifest, so it never disagrees with the cache; the manifest stays the authority.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .describe import describe_augmentation, draws_phrase, fidelity_rows, fidelity_scope
from .format import DATA_DIR, MANIFEST_NAME, SHARD_SUFFIX, TOKENIZER_DIR, Manifest, write_bytes_atomic
from .safety import printable

CARD_NAME = "README.md"
# the Hub's task_categories for what each kdcache task's targets teach
_TASK_CATEGORIES = {"causal-lm": "text-generation", "token-classification": "token-classification",
                    "sequence-classification": "text-classification"}


# Characters that start Markdown or HTML markup inside a line (links, images, code, tags, entities, table cells);
# line-level markup (a heading, a list item, a YAML key) needs a line break, which `printable` escapes.
_MARKUP = str.maketrans({char: f"\\{char}" for char in "\\`[]|"} | {"<": "&lt;", ">": "&gt;", "&": "&amp;"})


def _text(value) -> str:
    """A manifest value as one line of Markdown text: a teacher name cannot add a section, a link or a tag."""
    return printable(value).translate(_MARKUP)


def _code(value) -> str:
    """A manifest value inside a code span (`...`): one line, and no backtick to close the span early."""
    return printable(value).replace("`", "'")


def _fenced(lines: list[str]) -> list[str]:
    """`lines` as a fenced code block whose fence is longer than any backtick run in them: a location cannot close
    the block early and turn the rest of its text into Markdown."""
    longest = max((len(run) for line in lines for run in re.findall("`+", line)), default=0)
    fence = "`" * max(3, longest + 1)
    return [fence, *lines, fence]


def _yaml_front_matter(manifest: Manifest) -> str:
    """License, task and configs. The licence is the teacher's and the data's, which the manifest
    does not know: `other`, and the body says so. Values are JSON strings, which YAML reads as-is.

    `datasets` keys its on-disk copy of a folder by the folder's name and a hash of the card's configs,
    not by the files: two caches named `cache` in different places, or a cache rewritten in place,
    would share one entry and the second load would return the first one's rows. The config's
    `description` carries the shards' fingerprint, so each content gets its own entry."""
    lines = ["---", "license: other", "license_name: see-teacher-and-data",
             "task_categories:", f"- {_TASK_CATEGORIES.get(manifest.task, 'other')}",
             "tags:", "- knowledge-distillation", "- kdcache",
             "configs:", "- config_name: default",
             f"  description: {json.dumps(f'kdcache shards sha256 {manifest.data_fingerprint}')}",
             "  data_files:", "  - split: train", f"    path: {DATA_DIR}/*{SHARD_SUFFIX}"]
    language = manifest.dataset.get("language")
    if language:
        lines[3:3] = ["language:", f"- {json.dumps(printable(language))}"]  # a JSON string: YAML reads it as is
    return "\n".join(lines + ["---", ""])


def _targets(manifest: Manifest) -> list[str]:
    settings = manifest.settings
    lines = []
    if "topk" in manifest.target_types:
        lines.append(f"- top-{manifest.top_k} log-probabilities ({settings['logprob_dtype']}, token ids "
                     f"{_text(manifest.columns.get('topk_ids', ''))}) normalised over the whole vocabulary at temperature 1, "
                     f"sorted descending, plus the exact tail mass `tail_logprob` (nothing is renormalised)")
    if "sampled" in manifest.target_types:
        lines.append(f"- ids sampled from the teacher with counts ({settings.get('samples')} per position, "
                     f"{draws_phrase(settings)} at temperature 1, seed {settings.get('seed')})")
    if "head-tail" in manifest.target_types:
        lines.append(f"- the exact top-{manifest.top_k} head ({settings['logprob_dtype']} log-probabilities) and tail "
                     f"mass `tail_logprob`, plus ids drawn from the tail renormalised without the head, with counts "
                     f"({settings.get('samples')} per position{' at most' if settings.get('sampling') == 'proportional' else ''}"
                     f", {draws_phrase(settings)} at temperature 1, seed "
                     f"{settings.get('seed')}): the head plus tail mass × count / draws is an unbiased estimate of "
                     f"the teacher's distribution")
    if manifest.hidden_layers:
        lines.append(f"- hidden states of layers {', '.join(map(str, manifest.hidden_layers))} (float16)")
    return lines


def _fidelity(manifest: Manifest) -> list[str]:
    try:
        rows = fidelity_rows(manifest)
    except ValueError:
        return ["Unreadable (malformed statistics in the manifest)."]
    if rows is None:
        return ["Not recorded for this cache."]
    scope = fidelity_scope(manifest)
    return ["| targets | captured mass | KL(teacher ‖ ·) (nats) | TV |", "|---|---|---|---|",
            *(f"| {_text(row.targets)} | {row.captured_mass:.4f} | {row.kl:.4f} ({row.kl_of}) | {row.tv:.4f} |"
              for row in rows),
            f"\n{_text(scope[:1].upper() + scope[1:])}."]


def describe_teacher(entry: dict, tokens: int) -> str:
    """One teacher of a multi-teacher cache in one line (for `info` and the card): what it is, what it stored,
    how faithful (its own fidelity card) and what it costs. The entry is untrusted: every value is only shown."""
    teacher = entry.get("teacher") if isinstance(entry.get("teacher"), dict) else {}
    parameters = teacher.get("num_parameters")
    fidelity = entry.get("fidelity") if isinstance(entry.get("fidelity"), dict) else {}
    kl = next((figures.get(key) for figures in fidelity.values() if isinstance(figures, dict)
               for key in ("kl_rest_bucket", "kl_on_support") if key in figures), None)
    size = entry.get("bytes")
    return (f"{entry.get('name')}: {teacher.get('name_or_path')} ({teacher.get('model_type')}"
            + (f", {parameters:,} parameters" if isinstance(parameters, int) else "") + "), "
            + f"{'/'.join(map(str, entry.get('targets') or []))} targets (top_k {entry.get('top_k')}), "
            + (f"KL to the teacher {kl:.4f} nats, " if isinstance(kl, (int, float)) else "fidelity not recorded, ")
            + (f"{size / max(tokens, 1):.1f} bytes/token" if isinstance(size, int) else "size not recorded")
            + f"; fingerprint {str(entry.get('dump_fingerprint'))[:12]}"
            + (f" in {entry['path']}/" if entry.get("path") else " (this cache's own shards)"))


def render_card(manifest: Manifest, location: str) -> str:
    """The card of the cache described by `manifest`, to be published at `location`."""
    teacher, dataset, tokens = manifest.teacher, manifest.dataset, max(manifest.total_tokens, 1)
    parameters = teacher.get("num_parameters")
    mass = manifest.stats.get("captured_mass")
    nll = manifest.stats.get("teacher_nll")
    body = [
        f"# kdcache: soft targets of {_text(teacher.get('name_or_path'))}",
        "",
        ("A kdcache cache: a teacher's soft targets, dumped once, to train students "
        "by knowledge distillation without running the teacher again. This card is generated from "
        f"`{MANIFEST_NAME}`, which is authoritative."),
        "",
        "## Teacher",
        f"- model: `{_code(teacher.get('name_or_path'))}` ({_text(teacher.get('model_type'))}"
        + (f", {parameters:,} parameters)" if parameters else ")"),
        f"- dump fingerprint: `{_code(manifest.dump_fingerprint)}`",
        f"- weights sha256: `{_code(teacher.get('weights_sha256'))}`",
        (f"- tokenizer: {_text(manifest.tokenizer.get('class'))}, {manifest.vocab_size} tokens, "
        f"hash `{manifest.tokenizer.get('hash')}` (files in `{TOKENIZER_DIR}/`)"),
        "",
        *(["## Teachers",
           f"{len(manifest.teachers)} teachers' targets for the same rows (`teachers` in the manifest; train from "
           f"their mixture with `train-student --teachers`):",
           *[f"- {_text(describe_teacher(entry, tokens))}" for entry in manifest.teachers], ""] if manifest.teachers else []),
        "## Data",
        f"- source: `{_code(dataset.get('source'))}` [{_text(dataset.get('split'))}]",
        (f"- {manifest.total_rows} sequences, {manifest.total_tokens} tokens in {len(manifest.shards)} shards, "
        f"{manifest.total_bytes:,} bytes ({manifest.total_bytes / tokens:.1f} bytes/token)"),
        *([f"- made from {len(manifest.sources)} other caches (`sources` in the manifest)"] if manifest.sources else []),
        *([f"- {_text(augmented)}"] if (augmented := describe_augmentation(manifest)) else []),
        "",
        "## Targets",
        f"- task: {manifest.task}" + (f" (labels: {', '.join(map(_text, manifest.labels))})" if manifest.labels else ""),
        *_targets(manifest),
        *([f"- captured top-k mass: mean {mass.get('mean')}, p5 {mass.get('p5')}, p50 {mass.get('p50')}, "
           f"p95 {mass.get('p95')}"]
          if mass else []),
        *([f"- teacher NLL: {nll} nats per target"] if nll is not None else []),
        "",
        "## Fidelity card",
        *_fidelity(manifest),
        "",
        "## Use",
        *_fenced([f"kdcache info {printable(location)}",
                  f"kdcache train-student --cache {printable(location)} --student-config student.json --out student"]),
        ("The shards are Arrow IPC files: `datasets.load_dataset(<this directory or repository>)` reads them "
        "through the `configs` above, `pyarrow.ipc.open_file` reads one directly."),
        "",
        "## License",
        "Not recorded by kdcache: the teacher's and the data's licences apply to these targets.",
        "",
    ]
    return _yaml_front_matter(manifest) + "\n".join(body)


def write_card(cache_dir: Path | str, manifest: Manifest) -> None:
    """Write the card of a local cache (before its manifest: the manifest is always written last)."""
    write_bytes_atomic(Path(cache_dir) / CARD_NAME, render_card(manifest, str(cache_dir)).encode())
