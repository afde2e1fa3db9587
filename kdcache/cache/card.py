"""The cache card: `README.md` in the Hugging Face dataset-card format, generated from the manifest.

A shared cache is found and judged before it is downloaded, so it carries a card a person can read
(what teacher, what data, how faithful the targets are, the command that trains from it) and that
tools understand: the YAML front matter's `configs`/`data_files` point `datasets.load_dataset(<dir or
repo>)` at the Arrow shards, and the Hub renders the card and its metadata. Everything in it comes from
the manifest, so it never disagrees with the cache; the manifest stays the authority.
"""

from __future__ import annotations

import json
from pathlib import Path

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


def _yaml_front_matter(manifest: Manifest) -> str:
    """License, task and configs. The licence is the teacher's and the data's, which the manifest
    does not know: `other`, and the body says so. Values are JSON strings, which YAML reads as-is."""
    lines = ["---", "license: other", "license_name: see-teacher-and-data",
             "task_categories:", f"- {_TASK_CATEGORIES.get(manifest.task, 'other')}",
             "tags:", "- knowledge-distillation", "- kdcache",
             "configs:", "- config_name: default", "  data_files:", "  - split: train",
             f"    path: {DATA_DIR}/*{SHARD_SUFFIX}"]
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
                     f"{_draws(settings)} at temperature 1, seed {settings.get('seed')})")
    if "head-tail" in manifest.target_types:
        lines.append(f"- the exact top-{manifest.top_k} head ({settings['logprob_dtype']} log-probabilities) and tail "
                     f"mass `tail_logprob`, plus ids drawn from the tail renormalised without the head, with counts "
                     f"({settings.get('samples')} per position{' at most' if settings.get('sampling') == 'proportional' else ''}"
                     f", {_draws(settings)} at temperature 1, seed "
                     f"{settings.get('seed')}): the head plus tail mass × count / draws is an unbiased estimate of "
                     f"the teacher's distribution")
    if manifest.hidden_layers:
        lines.append(f"- hidden states of layers {', '.join(map(str, manifest.hidden_layers))} (float16)")
    return lines


def _draws(settings: dict) -> str:
    """How the draws were placed (`sampling`; caches from before the setting hold independent draws)."""
    return {"systematic": "systematic draws", "proportional": "systematic draws in proportion to the tail mass"}.get(
        settings.get("sampling"), "independent draws")


def _fidelity(manifest: Manifest) -> list[str]:
    card = manifest.stats.get("fidelity")
    if not card:
        return ["Not recorded for this cache."]
    try:
        return _fidelity_table(card)
    except (KeyError, TypeError, ValueError):  # figures the manifest's schema allows but that do not fit together
        return ["Unreadable (malformed statistics in the manifest)."]


def _fidelity_table(card: dict) -> list[str]:
    lines = ["| targets | captured mass | KL to the teacher (nats) | TV |", "|---|---|---|---|"]
    if "topk" in card:
        topk = card["topk"]
        lines.append(f"| top-{topk['top_k']} + tail (rest-bucket reconstruction) | {topk['captured_mass']:.4f} "
                     f"| {topk['kl_rest_bucket']:.4f} | {topk['tv_rest_bucket']:.4f} |")
    for kind, label in (("sampled", "sampled ({draws} draws"), ("head-tail", "head {top_k} + {draws} tail draws")):
        if kind in card:
            figures = card[kind]
            lines.append(f"| {label.format(**figures)}; KL on the stored ids) | {figures['captured_mass']:.4f} "
                         f"| {figures['kl_on_support']:.4f} | {figures['tv']:.4f} |")
    lines.append(f"\nMeasured at dump time on {card['positions']} target positions (every {card['every']}-th).")
    return lines


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
        "## Data",
        f"- source: `{_code(dataset.get('source'))}` [{_text(dataset.get('split'))}]",
        (f"- {manifest.total_rows} sequences, {manifest.total_tokens} tokens in {len(manifest.shards)} shards, "
        f"{manifest.total_bytes:,} bytes ({manifest.total_bytes / tokens:.1f} bytes/token)"),
        *([f"- made from {len(manifest.sources)} other caches (`sources` in the manifest)"] if manifest.sources else []),
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
        "```",
        f"kdcache info {printable(location)}",
        f"kdcache train-student --cache {printable(location)} --student-config student.json --out student",
        "```",
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
