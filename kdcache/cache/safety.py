"""A received cache is attacker-controlled input: its paths and its manifest are checked before use.

Caches travel between teams, so a manifest may name `/usr/lib/.../x.pth` or `../../.bashrc` as a
shard, put a string where a number belongs, or claim 250M tokens for a 33 KB file. Everything a
manifest says is checked here, once, when it is parsed (`check_manifest`), and every path built from
it goes through `contained_file`, which refuses anything that could leave the cache directory
(absolute paths, `..`, odd characters, symlinks, device files) before anything is read or written.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import stat
import urllib.parse
from collections.abc import Callable
from pathlib import Path, PurePosixPath
from typing import Any, BinaryIO

from ..errors import KDCacheError
from .codecs import LOGPROB_TYPES, Codec
from .format import (FORMAT_VERSION, MAX_SAMPLES, OPTIONAL_COLUMNS, SHARD_SUFFIX, TARGET_TYPES, TEACHERS_DIR,
                     sha256_file)

# One path component: letters, digits and `._+-`, not starting with a dot (no `.`, `..`, hidden files),
# so a name means the same on every filesystem and in every URL.
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,199}")
_SHA256 = re.compile(r"[0-9a-f]{64}")
TEACHER_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_-]{0,63}")  # a teacher of a multi-teacher cache, as `teachers` names it
MAX_VOCAB = 2**31 - 1  # ids are stored as int32 tokens / uint32 targets
# Every row stores an int64 sample id and every token an int32 id, so an uncompressed shard of
# `bytes` bytes holds at most this many of each: a manifest claiming more is lying about the file.
MIN_ROW_BYTES, MIN_TOKEN_BYTES = 8, 4
# The most a compressed (zstd) shard may expand, decoded bytes per file byte: far above what zstd
# achieves on kdcache's columns (1.5 to 5 times), far below what a decompression bomb needs.
MAX_EXPANSION = 256
# Caps on what a manifest may hold, far above what any real cache writes (a billion-token cache's manifest,
# per-batch hashes included, is a few MB; its deepest field, a merged cache's sources of sources, a dozen levels).
MAX_MANIFEST_BYTES = 64 << 20
MAX_CARD_BYTES = 1 << 20  # README.md: a generated card is a few KB
MAX_DEPTH = 32  # nested JSON objects and arrays
MAX_STRING = 1 << 16  # characters of one manifest string (keys included)
MAX_LENGTH = 1 << 20  # tokens of one row (settings.max_length)
MAX_TOP_K = 1 << 16  # ids listed per position
COPY_CHUNK = 1 << 22
# One tokenizer file (the largest real ones, 250k-token vocabularies: ~35 MB): the bound of a download or copy
# when the manifest declares no size (`tokenizer.file_bytes`; caches from before it), and of a declared size.
MAX_TOKENIZER_FILE_BYTES = 256 << 20


def check_relative(relative: Any, what: str = "path", *, under: str | None = None) -> str:
    """`relative` if it is a plain relative path of safe names (e.g. `data/shard-00000-00000.arrow`),
    inside the cache's directory `under` when that is given (`kdcache copy` and `merge` publish shards
    under `data/` and tokenizer files under `tokenizer/` only)."""
    if not isinstance(relative, str):
        raise KDCacheError(f"{what} {relative!r} is not a path")
    parts = relative.split("/")
    if not all(_NAME.fullmatch(part) for part in parts):
        raise KDCacheError(f"{what} {_quoted(relative)} is not a plain relative path inside the cache "
                           f"(absolute, `..`, hidden or unusual names are refused)")
    if under is not None and (len(parts) < 2 or parts[0] != under):
        raise KDCacheError(f"{what} {_quoted(relative)} is not inside the cache's {under}/ directory")
    return relative


def contained_file(root: Path, relative: str) -> Path | None:
    """`root/relative` if it is a regular file reached without symlinks; None if it does not exist.

    Checked component by component with `lstat`, so a symlinked `data/` or shard pointing outside the
    cache, a FIFO that would block a reader, or a directory are refused, not followed.
    """
    path = Path(root)
    parts = PurePosixPath(check_relative(relative)).parts
    for index, part in enumerate(parts):
        path = path / part
        try:
            mode = path.lstat().st_mode
        except FileNotFoundError:
            return None
        except OSError as error:
            raise KDCacheError(f"cannot read {relative} in {root}: {error.strerror or error}") from None
        last = index == len(parts) - 1
        if stat.S_ISLNK(mode):
            raise KDCacheError(f"{relative} in {root} goes through a symlink ({path.name}): refused, a cache's "
                               f"files must lie inside it")
        if not (stat.S_ISREG(mode) if last else stat.S_ISDIR(mode)):
            raise KDCacheError(f"{relative} in {root} is not a regular file")
    return path


def open_contained(root: Path, relative: str) -> BinaryIO:
    """Open `root/relative` for reading, each component opened relative to the last with O_NOFOLLOW: the
    file read is the one checked, even if a symlink is swapped in after `contained_file` looked (refused)."""
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    parts = PurePosixPath(check_relative(relative)).parts
    descriptor = os.open(root, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        for part in parts[:-1]:
            inner = os.open(part, flags | getattr(os, "O_DIRECTORY", 0), dir_fd=descriptor)
            os.close(descriptor)
            descriptor = inner
        inner = os.open(parts[-1], flags | getattr(os, "O_NONBLOCK", 0), dir_fd=descriptor)
    except OSError as error:
        raise KDCacheError(f"cannot open {relative} in {root} ({error.strerror or error}): a cache's files must be "
                           f"regular files inside it, reached without symlinks") from None
    finally:
        os.close(descriptor)
    if not stat.S_ISREG(os.fstat(inner).st_mode):
        os.close(inner)
        raise KDCacheError(f"{relative} in {root} is not a regular file")
    return os.fdopen(inner, "rb")


def tokenizer_file_limit(tokenizer: dict, name: str) -> int:
    """The most bytes tokenizer file `name` may have: its declared size (`tokenizer.file_bytes`), else, for
    caches from before sizes were recorded, `MAX_TOKENIZER_FILE_BYTES` (its sha256 still decides)."""
    return tokenizer.get("file_bytes", {}).get(name, MAX_TOKENIZER_FILE_BYTES)


def copy_contained(root: Path, relative: str, target: Path, sha256: str | None, limit: int) -> None:
    """Copy `root/relative` (opened by `open_contained`) to `target`, hashing the bytes copied: refused if
    they are not those the manifest fingerprints (`sha256`; None for caches from before fingerprints) or
    exceed `limit`. What is copied is what was checked, not what a path points to afterwards."""
    with open_contained(root, relative) as source, open(target, "wb") as sink:
        digest = copy_capped(source, sink, limit, f"{relative} in {root}")
    if sha256 is not None and digest != sha256:
        raise KDCacheError(f"{relative} in {root} differs from its sha256 in the manifest (it changed after it was "
                           f"checked): refused")


def copy_capped(source, sink, limit: int, what: str, progress: Callable[[int], None] = lambda size: None) -> str:
    """Copy file object `source` to `sink`, stopping at the first byte beyond `limit` (the size the manifest
    declares, or a documented cap) with a one-line refusal: a server that never ends a file cannot fill the
    disk. Returns the sha256 of what was copied; `progress(bytes)` after each chunk."""
    digest, size = hashlib.sha256(), 0
    while chunk := source.read(min(COPY_CHUNK, limit + 1 - size)):
        size += len(chunk)
        if size > limit:
            raise KDCacheError(f"{printable(what)} is larger than {limit:,} bytes: refused, stopped reading")
        digest.update(chunk)
        sink.write(chunk)
        progress(len(chunk))
    return digest.hexdigest()


def read_capped(handle, limit: int, what: str) -> bytes:
    """All of `handle` (a file object), refused as soon as it holds more than `limit` bytes: a manifest or card
    from elsewhere is read whole only when it is small."""
    data = bytearray()
    while chunk := handle.read(min(COPY_CHUNK, limit + 1 - len(data))):  # a stream returns what has arrived
        data += chunk
        if len(data) > limit:
            raise KDCacheError(f"{printable(what)} is larger than {limit:,} bytes: refused")
    return bytes(data)


def check_tokenizer_files(directory: Path, expected: dict[str, str], vocab_size: int) -> None:
    """The tokenizer directory holds exactly the regular files the manifest fingerprints, with their sha256,
    and enough bytes for the manifest's `vocab_size`.

    A student is built with and ships this tokenizer: a swapped vocabulary entry, an added file or a
    symlink is refused, naming it. `expected` is empty for caches from before file fingerprints;
    then only the directory's shape is checked (the vocabulary hash is still compared on load).
    Every format stores each token in at least one byte, so a vocabulary larger than the files is a lie
    that would size arrays and embeddings (one float per class) before the tokenizer is ever loaded.
    """
    if directory.is_symlink() or not directory.is_dir():
        raise KDCacheError(f"the cache has no tokenizer directory ({directory})")
    entries = {entry.name: entry for entry in directory.iterdir()}
    for name, entry in entries.items():
        if entry.is_symlink() or not entry.is_file():
            raise KDCacheError(f"tokenizer entry {_quoted(name)} in {directory} is not a regular file: refused")
    stored = sum(entry.stat().st_size for entry in entries.values())
    if vocab_size > stored:
        raise KDCacheError(f"the manifest's `tokenizer.vocab_size` {vocab_size:,} is more than the cache's tokenizer "
                           f"files can hold ({stored:,} bytes): refused")
    if not expected:
        return
    differences = [f"{_quoted(name)} is not in the manifest" for name in sorted(set(entries) - set(expected))]
    differences += [f"{name} is missing" for name in sorted(set(expected) - set(entries))]
    differences += [f"{name} differs from its sha256 in the manifest" for name in sorted(expected)
                    if name in entries and sha256_file(entries[name]) != expected[name]]
    if differences:
        raise KDCacheError(f"the cache's tokenizer does not match its manifest: {'; '.join(differences)}")


# Query parameters that carry credentials: presigned S3/GCS/Azure URLs, API keys, tokens. Matched on the
# lower-cased name: exactly, or (`x-amz-`, `x-goog-`) as a prefix.
_SECRET_PARAMETERS = {"token", "access_token", "auth", "authorization", "sig", "signature", "key", "api_key", "apikey",
                      "password", "passwd", "pwd", "secret", "client_secret", "credential", "credentials",
                      "session_token", "security_token", "code", "googleaccessid", "awsaccesskeyid"}
_SECRET_PREFIXES = ("x-amz-", "x-goog-", "x-ms-")
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def redact_url(location: Any) -> str:
    """`location` without what would leak a credential if written down: the user info
    (`https://user:token@host`) and credential-like query parameters (`?X-Amz-Signature=...`, `?token=...`),
    each replaced by `REDACTED`. A local path is returned as it is. Every URL that reaches a manifest, a
    card, a student's metadata, a log or an error message goes through here."""
    text = str(location)
    if "://" not in text:
        return text
    try:
        parts = urllib.parse.urlsplit(text)
        netloc = parts.netloc
        if "@" in netloc:
            netloc = "REDACTED@" + netloc.rsplit("@", 1)[1]
        query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return text.split("://", 1)[0] + "://REDACTED"
    if not query and netloc == parts.netloc:
        return text
    kept = [(name, "REDACTED" if _secret(name) else value) for name, value in query]
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc, query=urllib.parse.urlencode(kept, safe="/:")))


def _secret(name: str) -> bool:
    name = name.lower()
    return name in _SECRET_PARAMETERS or name.startswith(_SECRET_PREFIXES)


def redact(text: Any) -> str:
    """`text` (a message, a log line) with every URL in it redacted (`redact_url`)."""
    return _URL.sub(lambda match: redact_url(match.group(0)), str(text))


def printable(text: Any) -> str:
    """`text` with control characters escaped, so a manifest cannot drive the terminal that prints it."""
    return "".join(char if char.isprintable() else repr(char)[1:-1] for char in str(text))


def _quoted(value: Any) -> str:
    return repr(printable(value)[:200])


class _Checker:
    """Type and range checks on a parsed manifest, each failure one line naming the field."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, field: str, message: str) -> KDCacheError:
        return KDCacheError(f"invalid manifest {self.source}: `{field}` {message}")

    def mapping(self, data: Any, field: str, optional: bool = False) -> dict:
        if data is None and optional:
            return {}
        if not isinstance(data, dict):
            raise self.fail(field, "must be a JSON object")
        return data

    def integer(self, value: Any, field: str, low: int = 0, high: int = 2**62) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(field, f"must be an integer, got {_quoted(value)}")
        if not low <= value <= high:
            raise self.fail(field, f"must be between {low} and {high}, got {value}")
        return value

    def string(self, value: Any, field: str, pattern: re.Pattern | None = None,
               choices: tuple[str, ...] | None = None) -> str:
        if not isinstance(value, str) or (pattern is not None and not pattern.fullmatch(value)):
            raise self.fail(field, f"is not a valid value: {_quoted(value)}")
        if choices is not None and value not in choices:
            raise self.fail(field, f"must be one of {', '.join(choices)}, got {_quoted(value)}")
        return value

    def strings(self, value: Any, field: str) -> list[str]:
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise self.fail(field, "must be a list of strings")
        return value

    def integers(self, value: Any, field: str, low: int = -2**62) -> list[int]:
        if not isinstance(value, list):
            raise self.fail(field, "must be a list of integers")
        return [self.integer(item, field, low) for item in value]

    def number(self, value: Any, field: str, optional: bool = False) -> float | None:
        if value is None and optional:
            return None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(field, f"must be a finite number, got {_quoted(value)}")
        return value

    def numbers(self, data: Any, field: str) -> None:
        """A JSON object of numbers (a fidelity card's figures, a shard's sums)."""
        for name, value in self.mapping(data, field).items():
            self.number(value, f"{field}.{name}")

    def shape(self, data: Any) -> None:
        """Nesting depth and string lengths, walked without recursion (a deep manifest must not recurse)."""
        pending = [(data, 1)]
        while pending:
            value, depth = pending.pop()
            if depth > MAX_DEPTH:
                raise self.fail("manifest", f"nests objects and arrays deeper than {MAX_DEPTH} levels")
            if isinstance(value, dict):
                for key in value:
                    if len(key) > MAX_STRING:
                        raise self.fail("manifest", f"has a key longer than {MAX_STRING} characters")
                pending += [(item, depth + 1) for item in value.values()]
            elif isinstance(value, list):
                pending += [(item, depth + 1) for item in value]
            elif isinstance(value, str) and len(value) > MAX_STRING:
                raise self.fail("manifest", f"has a string longer than {MAX_STRING} characters")


def check_manifest(data: Any, source: str) -> None:
    """Refuse a manifest whose fields a reader would trip over, or that claims more than its files hold.

    Runs before `Manifest.from_dict`, so every later use of a manifest value (shapes, dtypes, ids,
    allocation sizes, paths) can rely on its type and range.
    """
    check = _Checker(source)
    data = check.mapping(data, "manifest")
    check.shape(data)
    version = check.integer(data.get("format_version", FORMAT_VERSION), "format_version", 1, 2**31)
    if version > FORMAT_VERSION:
        raise KDCacheError(f"cache format version {version} is newer than this kdcache supports "
                           f"({FORMAT_VERSION}); upgrade kdcache")
    for name in ("task", "dump_fingerprint"):
        check.string(data.get(name), name)
    for name in ("kdcache_version", "created_at"):
        check.string(data.get(name, ""), name)
    teacher = check.mapping(data.get("teacher"), "teacher")
    for name in ("name_or_path", "model_type", "weights_sha256", "config_sha256"):
        if teacher.get(name) is not None:
            check.string(teacher[name], f"teacher.{name}")
    for name in ("num_parameters", "num_hidden_layers"):
        if teacher.get(name) is not None:
            check.integer(teacher[name], f"teacher.{name}")
    dataset = check.mapping(data.get("dataset"), "dataset")
    for name in ("num_rows", "rows_dumped"):
        if dataset.get(name) is not None:
            check.integer(dataset[name], f"dataset.{name}")
    tokenizer = check.mapping(data.get("tokenizer"), "tokenizer")
    check.integer(tokenizer.get("vocab_size"), "tokenizer.vocab_size", 1, MAX_VOCAB)
    check.string(tokenizer.get("hash"), "tokenizer.hash", _SHA256)
    files = check.mapping(tokenizer.get("files"), "tokenizer.files", optional=True)
    for name, digest in files.items():
        check_relative(name, "tokenizer file")
        check.string(digest, f"tokenizer.files.{name}", _SHA256)
    for name, size in check.mapping(tokenizer.get("file_bytes"), "tokenizer.file_bytes", optional=True).items():
        if name not in files:
            raise check.fail("tokenizer.file_bytes", f"names {_quoted(name)}, which tokenizer.files does not")
        check.integer(size, f"tokenizer.file_bytes.{name}", 0, MAX_TOKENIZER_FILE_BYTES)
    labels = check.strings(data.get("labels", []), "labels")
    classes = len(labels) or tokenizer["vocab_size"]

    settings = check.mapping(data.get("settings"), "settings")
    check.integer(settings.get("top_k"), "settings.top_k", 1, min(classes, MAX_TOP_K))
    for name, low, high in (("max_length", 1, MAX_LENGTH), ("limit", 0, 2**62), ("seed", -2**63, 2**64)):
        if settings.get(name) is not None:
            check.integer(settings[name], f"settings.{name}", low, high)
    if settings.get("top_p") is not None and not 0 < check.number(settings["top_p"], "settings.top_p") <= 1:
        raise check.fail("settings.top_p", f"must be in (0, 1], got {settings['top_p']}")
    check.string(settings.get("logprob_dtype"), "settings.logprob_dtype", choices=LOGPROB_TYPES)
    columns = check.mapping(data.get("columns"), "columns")
    try:
        codec = Codec.from_manifest(columns, settings)
    except KDCacheError as error:
        raise check.fail("columns.codec", str(error)) from None
    if codec.id_ranking and max(codec.id_ranking) >= classes:
        raise check.fail("columns.codec", f"id_ranking lists id {max(codec.id_ranking)}, outside the {classes} classes")
    expansion = MAX_EXPANSION if codec.compression == "zstd" else 1
    targets = check.strings(columns.get("targets", ["topk"]), "columns.targets")
    if not targets or not set(targets) <= set(TARGET_TYPES) or len(set(targets)) != len(targets):
        raise check.fail("columns.targets", f"must list some of {', '.join(TARGET_TYPES)}")
    for layer, size in check.mapping(columns.get("hidden_sizes"), "columns.hidden_sizes", optional=True).items():
        if not layer.isdigit() or len(layer) > 4:
            raise check.fail("columns.hidden_sizes", f"has a layer that is not a small integer: {_quoted(layer)}")
        check.integer(size, f"columns.hidden_sizes.{layer}", 1, 2**20)
    if not set(check.strings(columns.get("optional", []), "columns.optional")) <= set(OPTIONAL_COLUMNS):
        raise check.fail("columns.optional", f"must list some of {', '.join(OPTIONAL_COLUMNS)}")
    if columns.get("pooled_size") is not None:
        check.integer(columns["pooled_size"], "columns.pooled_size", 1, 2**20)
    if "sampled" in targets or "head-tail" in targets:
        check.integer(settings.get("samples"), "settings.samples", 1, MAX_SAMPLES)
        check.string(settings.get("sampling", "independent"), "settings.sampling",
                     choices=("independent", "systematic", "proportional"))
    _check_stats(check, check.mapping(data.get("stats"), "stats", optional=True))

    sources = data.get("sources", [])
    if not isinstance(sources, list):
        raise check.fail("sources", "must be a list")
    for index, entry in enumerate(sources):  # their shard fingerprints vouch for merged and cut shards
        field = f"sources[{index}]"
        entry = check.mapping(entry, field)
        check.strings(entry.get("shard_fingerprints", []), f"{field}.shard_fingerprints")
        check.strings(entry.get("shards", []), f"{field}.shards")
        for name in ("id_offset", "rows"):
            check.integer(entry.get(name, 0), f"{field}.{name}", -2**62)
        check.integers(entry.get("sample_ids", []), f"{field}.sample_ids")
        if entry.get("location") is not None:
            check.string(entry["location"], f"{field}.location")

    _check_teachers(check, data.get("teachers", []))

    shards = data.get("shards")
    if not isinstance(shards, list):
        raise check.fail("shards", "must be a list")
    files = set()
    for index, shard in enumerate(shards):
        field = f"shards[{index}]"
        shard = check.mapping(shard, field)
        name = check_relative(shard.get("file"), f"{field}.file")
        if not name.endswith(SHARD_SUFFIX) or name in files:
            raise check.fail(f"{field}.file", f"{_quoted(name)} is not a distinct {SHARD_SUFFIX} file")
        files.add(name)
        size = check.integer(shard.get("bytes"), f"{field}.bytes")
        rows = check.integer(shard.get("rows"), f"{field}.rows")
        tokens = check.integer(shard.get("tokens"), f"{field}.tokens")
        if rows * MIN_ROW_BYTES + tokens * MIN_TOKEN_BYTES > size * expansion:
            raise check.fail(field, f"claims {rows} rows / {tokens} tokens, more than its {size} bytes can hold")
        check.string(shard.get("sha256"), f"{field}.sha256", _SHA256)
        for digest in check.strings(shard.get("batch_sha256", []), f"{field}.batch_sha256"):
            check.string(digest, f"{field}.batch_sha256", _SHA256)
        unknown = set(shard) - {"file", "bytes", "rows", "tokens", "sha256", "batch_sha256"}
        if unknown:
            raise check.fail(field, f"has unknown fields {sorted(map(printable, unknown))}")


def _check_teachers(check: _Checker, teachers: Any) -> None:
    """A multi-teacher cache's `teachers`: distinct names, the first this cache's own (path ""), every other a
    complete cache at `teachers/<name>` whose manifest's sha256 is recorded (so it cannot be swapped)."""
    if not isinstance(teachers, list) or len(teachers) == 1 or len(teachers) > 64:
        raise check.fail("teachers", "must be a list of 2 to 64 teachers (absent for a cache of one)")
    names = set()
    for index, entry in enumerate(teachers):
        field = f"teachers[{index}]"
        entry = check.mapping(entry, field)
        name = check.string(entry.get("name"), f"{field}.name", TEACHER_NAME)
        if name in names:
            raise check.fail(f"{field}.name", f"repeats {name}")
        names.add(name)
        path = check.string(entry.get("path"), f"{field}.path")
        if path != ("" if index == 0 else f"{TEACHERS_DIR}/{name}"):
            raise check.fail(f"{field}.path", f"must be {'empty' if index == 0 else f'{TEACHERS_DIR}/{name}'}, "
                                              f"got {_quoted(path)}")
        if index:
            check.string(entry.get("manifest_sha256"), f"{field}.manifest_sha256", _SHA256)


def _check_stats(check: _Checker, stats: dict) -> None:
    """The statistics `info`, the card, `merge` and `copy` read: their types, so none of them trips over one."""
    fidelity = stats.get("fidelity")
    if fidelity is not None:
        card = check.mapping(fidelity, "stats.fidelity")
        for name in ("positions", "every"):
            check.integer(card.get(name, 1), f"stats.fidelity.{name}")
        if "measured_on" in card:  # a subset's copy of its source's card
            check.string(card["measured_on"], "stats.fidelity.measured_on", choices=("source",))
        for kind, figures in card.items():
            if kind not in ("positions", "every", "measured_on"):
                check.string(kind, "stats.fidelity", choices=TARGET_TYPES)
                check.numbers(figures, f"stats.fidelity.{kind}")
    mass = check.mapping(stats.get("captured_mass"), "stats.captured_mass", optional=True)
    for name, value in mass.items():
        if name == "histogram":
            check.integers(value, "stats.captured_mass.histogram", 0)
        else:
            check.number(value, f"stats.captured_mass.{name}")
    check.number(stats.get("teacher_nll"), "stats.teacher_nll", optional=True)
    if stats.get("teacher_nll_measured_on") is not None:
        check.string(stats["teacher_nll_measured_on"], "stats.teacher_nll_measured_on", choices=("source",))
    if stats.get("content_sha256") is not None:
        check.string(stats["content_sha256"], "stats.content_sha256", _SHA256)
    check.integers(stats.get("skipped_sample_ids", []), "stats.skipped_sample_ids")
    check.integer(stats.get("nonfinite_positions", 0), "stats.nonfinite_positions")
    for reason, entry in check.mapping(stats.get("dropped_rows"), "stats.dropped_rows", optional=True).items():
        entry = check.mapping(entry, f"stats.dropped_rows.{reason}")
        check.integer(entry.get("count"), f"stats.dropped_rows.{reason}.count")
        check.integers(entry.get("sample_ids"), f"stats.dropped_rows.{reason}.sample_ids")
    for file, entry in check.mapping(stats.get("shard_stats"), "stats.shard_stats", optional=True).items():
        field = f"stats.shard_stats.{_quoted(file)}"
        entry = check.mapping(entry, field)
        check.number(entry.get("nll_sum"), f"{field}.nll_sum")
        check.integer(entry.get("nll_count"), f"{field}.nll_count")
        card = check.mapping(entry.get("fidelity"), f"{field}.fidelity")
        check.integer(card.get("positions"), f"{field}.fidelity.positions")
        for kind, sums in check.mapping(card.get("sums"), f"{field}.fidelity.sums").items():
            check.string(kind, f"{field}.fidelity.sums", choices=TARGET_TYPES)
            check.numbers(sums, f"{field}.fidelity.sums.{kind}")
