"""Where a cache lives: a local directory or a remote URL, behind one small interface.

A cache is a shareable artifact, so students often train from a copy on object storage or a web
server. `CacheStore` reads the manifest, the tokenizer and the shards from either:

- a local directory: shards are memory-mapped, so reading a row touches only its pages;
- an fsspec URL (`s3://`, `gs://`, `hf://`, `http(s)://`, ...): shards are streamed with ranged
  reads, only the record batches a reader decodes are fetched. `http(s)` is fsspec's own (aiohttp)
  filesystem: measured against the stdlib Range reader kdcache had, on a 68 MiB cache served from
  127.0.0.1, it streamed at 276 vs 129 MiB/s and downloaded read-through copies at 244-446 vs
  103-122 MiB/s; neither can stream from a server without Range support (`python -m http.server`),
  where a read-through directory works with both;
- a URL plus a read-through directory: each shard is downloaded once (atomically, size-checked)
  and memory-mapped from there on, which suits repeated epochs over the same remote cache.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import BinaryIO

import fsspec
import pyarrow as pa

from ..errors import KDCacheError, first_line
from .format import MANIFEST_NAME, PARTIAL_SUFFIX, TOKENIZER_DIR, Manifest, sha256_file

REMOTE_BLOCK_SIZE = 1 << 22


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def _filesystem(url: str) -> tuple[fsspec.AbstractFileSystem, tuple[type[Exception], ...]]:
    """The fsspec filesystem for `url`, and the exceptions its failed reads raise.

    Most raise OSError; fsspec's http raises ValueError for a server that ignores Range requests and
    aiohttp's ClientError for an HTTP error status other than 404.
    """
    protocol = url.split("://", 1)[0]
    try:
        fs = fsspec.filesystem(protocol)
    except (ImportError, ValueError) as error:
        raise KDCacheError(f"cannot open {url}: {error}") from None
    if protocol not in ("http", "https"):
        return fs, (OSError,)
    import aiohttp  # fsspec's http needs it, so it is there; imported here to keep local reads light
    return fs, (OSError, ValueError, aiohttp.ClientError)


class CacheStore:
    """Read access to one cache directory, local or remote; cheap to copy into loader workers."""

    def __init__(self, location: str | Path, read_through: str | Path | None = None):
        self.location = str(location).rstrip("/")
        self.remote = is_url(location)
        self.read_through = Path(read_through) if read_through and self.remote else None
        self.fs, self.read_errors = _filesystem(self.location) if self.remote else (None, (OSError,))
        self._tokenizer_copy: tempfile.TemporaryDirectory | None = None

    def __str__(self) -> str:
        return self.location

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer_copy"] = None  # a temporary directory belongs to the process that made it
        return state

    def _url(self, relative: str) -> str:
        return f"{self.location}/{relative}"

    def _local_path(self, relative: str) -> Path | None:
        """The local file to memory-map, fetching it into the read-through directory if needed."""
        if not self.remote:
            return Path(self.location) / relative
        if self.read_through is None:
            return None
        digest = hashlib.sha256(self.location.encode()).hexdigest()[:16]
        path = self.read_through / digest / relative
        expected = self.size(relative)
        if not path.is_file() or path.stat().st_size != expected:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + f"{PARTIAL_SUFFIX}-{os.getpid()}")
            self._guard(lambda: self.fs.get_file(self._url(relative), str(partial)), relative)
            os.replace(partial, path)
        return path

    def _guard(self, action, relative: str):
        try:
            return action()
        except FileNotFoundError:
            raise KDCacheError(f"{relative} is missing from cache {self.location}") from None
        except self.read_errors as error:
            raise KDCacheError(f"cannot read {relative} from cache {self.location}: {first_line(error)}") from None

    def load_manifest(self) -> Manifest:
        if not self.remote:
            return Manifest.load(Path(self.location))
        try:
            text = self.fs.cat_file(self._url(MANIFEST_NAME)).decode()
        except FileNotFoundError:
            raise KDCacheError(f"not a kdcache cache (no {MANIFEST_NAME}): {self.location}") from None
        except Exception as error:  # noqa: BLE001 - first contact: credentials, endpoint, network (any library's type)
            raise KDCacheError(f"cannot read cache {self.location}: {first_line(error)}") from None
        return Manifest.from_json(text, self._url(MANIFEST_NAME))

    def size(self, relative: str) -> int | None:
        """The file's size in bytes, or None when it does not exist."""
        if not self.remote:
            path = Path(self.location) / relative
            return path.stat().st_size if path.is_file() else None
        try:
            return self.fs.info(self._url(relative))["size"]
        except FileNotFoundError:
            return None
        except self.read_errors as error:
            raise KDCacheError(f"cannot read {relative} from cache {self.location}: {first_line(error)}") from None

    def sha256(self, relative: str) -> str:
        local = self._local_path(relative)
        if local is not None:
            return sha256_file(local)
        digest = hashlib.sha256()

        def read() -> None:
            with self.fs.open(self._url(relative), "rb", block_size=REMOTE_BLOCK_SIZE) as handle:
                while chunk := handle.read(REMOTE_BLOCK_SIZE):
                    digest.update(chunk)
        self._guard(read, relative)
        return digest.hexdigest()

    def open_file(self, relative: str) -> BinaryIO:
        """The raw bytes of one cache file, to copy it elsewhere (`kdcache copy`)."""
        if not self.remote:
            return self._guard(lambda: open(Path(self.location) / relative, "rb"), relative)
        return self._guard(lambda: self.fs.open(self._url(relative), "rb", block_size=REMOTE_BLOCK_SIZE), relative)

    def open_shard(self, relative: str, fields: list[int] | None = None) -> pa.RecordBatchFileReader:
        """An Arrow IPC reader: memory-mapped when the shard is local, ranged reads when remote.

        `fields` (schema positions) limits what a record batch loads, e.g. only the sample ids.
        """
        local = self._local_path(relative)
        options = pa.ipc.IpcReadOptions(included_fields=fields) if fields is not None else None
        try:
            if local is not None:
                return pa.ipc.open_file(pa.memory_map(str(local), "r"), options=options)
            handle = self.fs.open(self._url(relative), "rb", block_size=REMOTE_BLOCK_SIZE)
            return pa.ipc.open_file(pa.PythonFile(handle, mode="r"), options=options)
        except (*self.read_errors, pa.ArrowInvalid) as error:
            hint = "; a read-through directory downloads whole shards instead" if self.remote and not local else ""
            raise KDCacheError(f"cannot read shard {self._url(relative)}: {first_line(error)}{hint}") from None

    def tokenizer_dir(self) -> Path:
        """A local directory holding the cache's tokenizer (downloaded once when the cache is remote)."""
        if not self.remote:
            return Path(self.location) / TOKENIZER_DIR
        if self._tokenizer_copy is None:
            copy = tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-")
            files = self._guard(lambda: self.fs.ls(self._url(TOKENIZER_DIR), detail=False), TOKENIZER_DIR)
            for url in files:
                name = url.rstrip("/").rsplit("/", 1)[-1]
                self._guard(lambda: self.fs.get_file(url, str(Path(copy.name) / name)), f"{TOKENIZER_DIR}/{name}")
            self._tokenizer_copy = copy
        return Path(self._tokenizer_copy.name)


def as_store(cache: CacheStore | str | Path) -> CacheStore:
    return cache if isinstance(cache, CacheStore) else CacheStore(cache)
