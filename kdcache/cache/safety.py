"""A received cache is attacker-controlled input: its paths and its manifest are checked before use.

Caches travel between teams, so a manifest may name `/usr/lib/.../x.pth` or `../../.bashrc` as a
shard, put a string where a number belongs, or claim 250M tokens for a 33 KB file. Everything a
manifest says is checked here, once, when it is parsed (`check_manifest`), and every path built from
it goes through `contained_file`, which refuses anything that could leave the cache directory
(absolute paths, `..`, odd characters, symlinks, device files) before anything is read or written.
"""

from __future__ import annotations

import re
import stat
from pathlib import Path, PurePosixPath
from typing import Any

from ..errors import KDCacheError
from .codecs import LOGPROB_TYPES, Codec
from .format import FORMAT_VERSION, OPTIONAL_COLUMNS, SHARD_SUFFIX, TARGET_TYPES, TEACHERS_DIR, sha256_file

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


def check_tokenizer_files(directory: Path, expected: dict[str, str]) -> None:
    """The tokenizer directory holds exactly the regular files the manifest fingerprints, with their sha256.

    A student is built with and ships this tokenizer: a swapped vocabulary entry, an added file or a
    symlink is refused, naming it. `expected` is empty for caches from before file fingerprints;
    then only the directory's shape is checked (the vocabulary hash is still compared on load).
    """
    if directory.is_symlink() or not directory.is_dir():
        raise KDCacheError(f"the cache has no tokenizer directory ({directory})")
    entries = {entry.name: entry for entry in directory.iterdir()}
    for name, entry in entries.items():
        if entry.is_symlink() or not entry.is_file():
            raise KDCacheError(f"tokenizer entry {_quoted(name)} in {directory} is not a regular file: refused")
    if not expected:
        return
    differences = [f"{_quoted(name)} is not in the manifest" for name in sorted(set(entries) - set(expected))]
    differences += [f"{name} is missing" for name in sorted(set(expected) - set(entries))]
    differences += [f"{name} differs from its sha256 in the manifest" for name in sorted(expected)
                    if name in entries and sha256_file(entries[name]) != expected[name]]
    if differences:
        raise KDCacheError(f"the cache's tokenizer does not match its manifest: {'; '.join(differences)}")


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


def check_manifest(data: Any, source: str) -> None:
    """Refuse a manifest whose fields a reader would trip over, or that claims more than its files hold.

    Runs before `Manifest.from_dict`, so every later use of a manifest value (shapes, dtypes, ids,
    allocation sizes, paths) can rely on its type and range.
    """
    check = _Checker(source)
    data = check.mapping(data, "manifest")
    version = check.integer(data.get("format_version", FORMAT_VERSION), "format_version", 1, 2**31)
    if version > FORMAT_VERSION:
        raise KDCacheError(f"cache format version {version} is newer than this kdcache supports "
                           f"({FORMAT_VERSION}); upgrade kdcache")
    for name in ("task", "dump_fingerprint"):
        check.string(data.get(name), name)
    for name in ("kdcache_version", "created_at"):
        check.string(data.get(name, ""), name)
    for name in ("teacher", "dataset", "stats"):
        check.mapping(data.get(name), name, optional=name == "stats")
    tokenizer = check.mapping(data.get("tokenizer"), "tokenizer")
    check.integer(tokenizer.get("vocab_size"), "tokenizer.vocab_size", 1, MAX_VOCAB)
    check.string(tokenizer.get("hash"), "tokenizer.hash", _SHA256)
    for name, digest in check.mapping(tokenizer.get("files"), "tokenizer.files", optional=True).items():
        check_relative(name, "tokenizer file")
        check.string(digest, f"tokenizer.files.{name}", _SHA256)
    labels = check.strings(data.get("labels", []), "labels")
    classes = len(labels) or tokenizer["vocab_size"]

    settings = check.mapping(data.get("settings"), "settings")
    check.integer(settings.get("top_k"), "settings.top_k", 1, classes)
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

    sources = data.get("sources", [])
    if not isinstance(sources, list):
        raise check.fail("sources", "must be a list")
    for index, entry in enumerate(sources):  # their shard fingerprints vouch for merged and cut shards
        check.strings(check.mapping(entry, f"sources[{index}]").get("shard_fingerprints", []),
                      f"sources[{index}].shard_fingerprints")

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
