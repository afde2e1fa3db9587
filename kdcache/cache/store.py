"""Where a cache lives: a local directory or a remote URL, behind one small interface.

A cache is a shareable artifact, so students often train from a copy on object storage or a web
server. `CacheStore` reads the manifest, the tokenizer and the shards from either:

- a local directory: shards are memory-mapped, so reading a row touches only its pages;
- an fsspec URL (`s3://`, `gs://`, `hf://`, `http(s)://`, ...): shards are streamed with ranged
  reads, only the record batches a reader decodes are fetched;
- a URL plus a read-through directory: each shard is downloaded once and memory-mapped from there
  on, which suits repeated epochs over the same remote cache. The copy is named by its sha256 and
  renamed into place only after its size and sha256 match the manifest, so no name from the manifest
  reaches the local filesystem and a file at its final name is always a verified one.

Every path comes from the manifest, which is untrusted: local paths go through `contained_file`
(kdcache/cache/safety.py), which refuses anything outside the cache directory.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import fsspec
import pyarrow as pa

from ..errors import KDCacheError
from .format import MANIFEST_NAME, PARTIAL_SUFFIX, SHARD_SUFFIX, TOKENIZER_DIR, Manifest, ShardInfo, sha256_file
from .http import DEADLINE_SECONDS
from .safety import check_relative, contained_file

REMOTE_BLOCK_SIZE = 1 << 22


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def _filesystem(url: str, deadline: float) -> fsspec.AbstractFileSystem:
    protocol = url.split("://", 1)[0]
    if protocol in ("http", "https"):
        from .http import HTTPFileSystem
        return HTTPFileSystem(deadline=deadline)
    try:
        return fsspec.filesystem(protocol)
    except (ImportError, ValueError) as error:
        raise KDCacheError(f"cannot open {url}: {error}") from None


class CacheStore:
    """Read access to one cache directory, local or remote; cheap to copy into loader workers."""

    def __init__(self, location: str | Path, read_through: str | Path | None = None,
                 transfer_timeout: float = DEADLINE_SECONDS):
        self.location = str(location).rstrip("/")
        self.remote = is_url(location)
        self.read_through = Path(read_through) if read_through and self.remote else None
        self.fs = _filesystem(self.location, transfer_timeout) if self.remote else None
        self._tokenizer_copy: tempfile.TemporaryDirectory | None = None

    def __str__(self) -> str:
        return self.location

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer_copy"] = None  # a temporary directory belongs to the process that made it
        return state

    def _url(self, relative: str) -> str:
        return f"{self.location}/{check_relative(relative)}"

    def _local_path(self, shard: ShardInfo) -> Path | None:
        """The local file to memory-map, fetching it into the read-through directory if needed."""
        if not self.remote:
            path = contained_file(Path(self.location), shard.file)
            if path is None:
                raise KDCacheError(f"shard {shard.file} is missing from cache {self.location}")
            return path
        if self.read_through is None:
            return None
        path = self.read_through / f"{shard.sha256}{SHARD_SUFFIX}"
        if not path.is_file():
            self.read_through.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + f"{PARTIAL_SUFFIX}-{os.getpid()}")
            try:
                self._guard(lambda: self.fs.get_file(self._url(shard.file), str(partial)), shard.file)
                if partial.stat().st_size != shard.bytes or sha256_file(partial) != shard.sha256:
                    raise KDCacheError(f"shard {shard.file} fails its sha256 check: the downloaded file differs "
                                       f"from the manifest's size or hash")
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        return path

    def _guard(self, action, relative: str):
        try:
            return action()
        except FileNotFoundError:
            raise KDCacheError(f"{relative} is missing from cache {self.location}") from None
        except OSError as error:
            raise KDCacheError(f"cannot read {relative} from cache {self.location}: {error}") from None

    def load_manifest(self) -> Manifest:
        if not self.remote:
            return Manifest.load(Path(self.location))
        try:
            text = self.fs.cat_file(self._url(MANIFEST_NAME)).decode()
        except FileNotFoundError:
            raise KDCacheError(f"not a kdcache cache (no {MANIFEST_NAME}): {self.location}") from None
        except OSError as error:
            raise KDCacheError(f"cannot read cache {self.location}: {error}") from None
        return Manifest.from_json(text, self._url(MANIFEST_NAME))

    def size(self, relative: str) -> int | None:
        """The file's size in bytes, or None when it does not exist."""
        if not self.remote:
            path = contained_file(Path(self.location), relative)
            return None if path is None else path.stat().st_size
        try:
            return self.fs.info(self._url(relative))["size"]
        except FileNotFoundError:
            return None
        except OSError as error:
            raise KDCacheError(f"cannot read {relative} from cache {self.location}: {error}") from None

    def sha256(self, shard: ShardInfo) -> str:
        local = self._local_path(shard)
        if local is not None:
            return sha256_file(local)
        digest = hashlib.sha256()

        def read() -> None:
            with self.fs.open(self._url(shard.file), "rb", block_size=REMOTE_BLOCK_SIZE) as handle:
                while chunk := handle.read(REMOTE_BLOCK_SIZE):
                    digest.update(chunk)
        self._guard(read, shard.file)
        return digest.hexdigest()

    def source(self, shard: ShardInfo) -> tuple[pa.NativeFile, bool]:
        """The shard's bytes for pyarrow, and whether they are streamed from the remote store (ranged
        reads, checked batch by batch) rather than memory-mapped from a local, whole-file-verified copy."""
        local = self._local_path(shard)
        try:
            if local is not None:
                return pa.memory_map(str(local), "r"), False
            handle = self.fs.open(self._url(shard.file), "rb", block_size=REMOTE_BLOCK_SIZE)
            return pa.PythonFile(handle, mode="r"), True
        except (OSError, pa.ArrowInvalid) as error:
            raise KDCacheError(f"cannot read shard {self._url(shard.file)}: {error}") from None

    def tokenizer_dir(self, files: dict[str, str]) -> Path:
        """A local directory holding the cache's tokenizer (downloaded once when the cache is remote).

        `files` (the manifest's tokenizer fingerprints) names what to download; only caches from
        before tokenizer fingerprints, which list no files, fall back to listing the remote directory.
        """
        if not self.remote:
            return Path(self.location) / TOKENIZER_DIR
        if self._tokenizer_copy is None:
            copy = tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-")
            names = list(files) or [url.rstrip("/").rsplit("/", 1)[-1] for url in self._guard(
                lambda: self.fs.ls(self._url(TOKENIZER_DIR), detail=False), TOKENIZER_DIR)]
            for name in names:
                relative = check_relative(f"{TOKENIZER_DIR}/{name}", "tokenizer file")
                self._guard(lambda: self.fs.get_file(self._url(relative), str(Path(copy.name) / name)), relative)
            self._tokenizer_copy = copy
        return Path(self._tokenizer_copy.name)


def as_store(cache: CacheStore | str | Path) -> CacheStore:
    return cache if isinstance(cache, CacheStore) else CacheStore(cache)
