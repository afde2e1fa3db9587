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
- a URL plus a read-through directory: each shard is downloaded once and memory-mapped from there
  on, which suits repeated epochs over the same remote cache. The copy is named by its sha256 and
  renamed into place only after its size and sha256 match the manifest, so no name from the manifest
  reaches the local filesystem and a file at its final name is always a verified one.

Every path comes from the manifest, which is untrusted: local paths go through `contained_file`
(kdcache/cache/safety.py), which refuses anything outside the cache directory, and URLs are built
from `check_relative` paths only.

The server is untrusted too. Every HTTP request (a HEAD, a ranged read, a whole-file download) has
one overall deadline, `transfer_timeout` (aiohttp's `total` timeout, which covers reading the body),
so a server that trickles a byte every few seconds is given up on; a whole-file download is retried
up to `ATTEMPTS` times within that same deadline. A body shorter than announced is one line ("broke
off after ..."), and a lying or truncated body never trains: read-through copies are checked for size
and sha256 before they are renamed into place, and streamed record batches against the manifest's
per-batch hashes (kdcache/cache/validate.py).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import tempfile
import time
from pathlib import Path
from typing import BinaryIO

import fsspec
import pyarrow as pa

from ..errors import KDCacheError, first_line
from .format import MANIFEST_NAME, PARTIAL_SUFFIX, SHARD_SUFFIX, TOKENIZER_DIR, Manifest, ShardInfo, sha256_file
from .safety import (
    MAX_MANIFEST_BYTES,
    check_relative,
    contained_file,
    copy_capped,
    read_capped,
    redact,
    redact_url,
    tokenizer_file_limit,
)

REMOTE_BLOCK_SIZE = 1 << 22
TRANSFER_TIMEOUT = 600.0  # seconds one HTTP transfer may take (TrainSettings.transfer_timeout's default)
SOCKET_READ_TIMEOUT = 60.0  # the longest wait for one socket read, within the transfer's deadline
ATTEMPTS = 3  # tries of one whole-file download, all within one `transfer_timeout`
STREAM_HINT = "; a read-through directory downloads whole shards instead"


def is_url(location: str | Path) -> bool:
    return "://" in str(location)


def _filesystem(url: str, transfer_timeout: float) -> tuple[fsspec.AbstractFileSystem, tuple[type[BaseException], ...]]:
    """The fsspec filesystem for `url`, and the exceptions its failed reads raise.

    Most raise OSError; fsspec's http raises ValueError for a server that ignores Range requests,
    aiohttp's ClientError for an HTTP error status other than 404 or a body that broke off, and
    asyncio's TimeoutError when a request outlives its deadline.
    """
    protocol = url.split("://", 1)[0]
    if protocol not in ("http", "https"):
        try:
            return fsspec.filesystem(protocol), (OSError,)
        except (ImportError, ValueError) as error:
            raise KDCacheError(f"cannot open {url}: {error}") from None
    import aiohttp  # fsspec's http needs it, so it is there; imported here to keep local reads light
    fs = fsspec.filesystem(protocol, client_kwargs={"timeout": _timeout(transfer_timeout),
                                                    "trace_configs": [_same_origin_redirects()]})
    return fs, (OSError, ValueError, aiohttp.ClientError, asyncio.TimeoutError)


def _same_origin_redirects():
    """An aiohttp trace that stops a redirect to another origin (scheme, host, port) before it is followed: a
    cache's server must not send a reader, and whatever credentials its URL carries, to another server."""
    import aiohttp
    from yarl import URL

    async def check(session, context, params) -> None:
        target = params.url.join(URL(params.response.headers.get("Location", "")))
        if target.origin() != params.url.origin():
            raise aiohttp.ClientError(f"the server redirected to another origin ({redact_url(target.origin())}): "
                                      f"refused, a cache is read from the server named only")
    trace = aiohttp.TraceConfig()
    trace.on_request_redirect.append(check)
    return trace


def _timeout(seconds: float):
    import aiohttp
    return aiohttp.ClientTimeout(total=seconds, sock_read=min(SOCKET_READ_TIMEOUT, seconds))


def _retryable(error: BaseException) -> bool:
    """A failure worth another attempt: no connection, a 5xx, a body that broke off (not a timeout: the
    deadline covers every attempt)."""
    import aiohttp
    if isinstance(error, aiohttp.ClientResponseError):
        return error.status >= 500
    return isinstance(error, (aiohttp.ClientPayloadError, aiohttp.ClientConnectionError)) and \
        not isinstance(error, asyncio.TimeoutError)


class _GuardedFile:
    """A remote file (for pyarrow, or copied) whose failed reads are one-line KDCacheErrors (pyarrow passes them on)."""

    def __init__(self, handle, guard):
        self._handle, self._guard = handle, guard

    def read(self, size: int = -1) -> bytes:
        return self._guard(lambda: self._handle.read(size))

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._guard(lambda: self._handle.seek(offset, whence))

    def __enter__(self) -> _GuardedFile:
        return self

    def __exit__(self, *exc) -> None:
        self._handle.close()

    def __getattr__(self, name):
        return getattr(self._handle, name)


class CacheStore:
    """Read access to one cache directory, local or remote; cheap to copy into loader workers.

    `transfer_timeout`: seconds one remote transfer may take (see the module docstring).
    """

    def __init__(self, location: str | Path, read_through: str | Path | None = None,
                 transfer_timeout: float = TRANSFER_TIMEOUT):
        self.location = str(location).rstrip("/")
        self.remote = is_url(location)
        self.http = self.remote and self.location.split("://", 1)[0] in ("http", "https")
        self.read_through = Path(read_through) if read_through and self.remote else None
        self.transfer_timeout = transfer_timeout
        self.fs, self.read_errors = _filesystem(self.location, transfer_timeout) if self.remote else (None, (OSError,))
        self._tokenizer_copy: tempfile.TemporaryDirectory | None = None

    def __str__(self) -> str:
        """The location with any credential in it redacted: what messages, manifests and records show."""
        return redact_url(self.location)

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_tokenizer_copy"] = None  # a temporary directory belongs to the process that made it
        return state

    def _url(self, relative: str) -> str:
        return f"{self}/{check_relative(relative)}"

    def _local_path(self, shard: ShardInfo) -> Path | None:
        """The local file to memory-map, fetching it into the read-through directory if needed."""
        if not self.remote:
            path = contained_file(Path(self.location), shard.file)
            if path is None:
                raise KDCacheError(f"shard {shard.file} is missing from cache {self}")
            return path
        if self.read_through is None:
            return None
        path = self.read_through / f"{shard.sha256}{SHARD_SUFFIX}"
        if not path.is_file():
            self._guard(lambda: self.read_through.mkdir(parents=True, exist_ok=True), shard.file)
            partial = path.with_name(path.name + f"{PARTIAL_SUFFIX}-{os.getpid()}")
            try:
                digest = self._download(shard.file, partial, shard.bytes)
                if partial.stat().st_size != shard.bytes or digest != shard.sha256:
                    raise KDCacheError(f"shard {shard.file} fails its sha256 check: the downloaded file differs "
                                       f"from the manifest's size or hash")
                os.replace(partial, path)
            finally:
                partial.unlink(missing_ok=True)
        return path

    def _download(self, relative: str, local: Path, limit: int) -> str:
        """Download one whole file with a plain, streamed GET (so a read-through copy works where ranges are
        unsupported), stopping at the first byte beyond `limit` (its declared size); return its sha256.
        Over HTTP, transient failures are retried, all within one `transfer_timeout` (object stores: their
        client's own timeouts and retries)."""
        url, give_up = self._url(relative), time.monotonic() + self.transfer_timeout
        for attempt in range(1, ATTEMPTS + 1):
            # block_size 0: one streamed GET; `size` given: no HEAD request first
            options = ({"block_size": 0, "size": limit, "timeout": _timeout(max(0.01, give_up - time.monotonic()))}
                       if self.http else {})
            try:
                with self.fs.open(url, "rb", **options) as source, open(local, "wb") as sink:
                    return copy_capped(source, sink, limit, f"{relative} from cache {self}")
            except FileNotFoundError:
                raise KDCacheError(f"{relative} is missing from cache {self}") from None
            except self.read_errors as error:
                if not (self.http and _retryable(error)) or attempt == ATTEMPTS or time.monotonic() >= give_up:
                    raise self._failure(error, relative) from None
            time.sleep(min(0.2 * 2**attempt, max(0.0, give_up - time.monotonic())))

    def _describe(self, error: BaseException) -> str:
        if self.http:
            import aiohttp
            if isinstance(error, asyncio.TimeoutError):
                return f"gave up after the {self.transfer_timeout:g}s `transfer_timeout`"
            if isinstance(error, aiohttp.ClientPayloadError):
                return f"the server's response broke off after fewer bytes than it announced ({redact(first_line(error))})"
        return redact(first_line(error))  # a library's message may quote the URL, credentials and all

    def _failure(self, error: BaseException, relative: str, hint: str = "") -> KDCacheError:
        message = self._describe(error) if self.remote else (getattr(error, "strerror", None) or error)
        return KDCacheError(f"cannot read {relative} from cache {self}: {message}{hint}")

    def _guard(self, action, relative: str, hint: str = ""):
        try:
            return action()
        except FileNotFoundError:
            raise KDCacheError(f"{relative} is missing from cache {self}") from None
        except self.read_errors as error:
            raise self._failure(error, relative, hint) from None

    def teacher(self, relative: str, manifest_sha256: str) -> tuple[CacheStore, Manifest]:
        """Another teacher's cache inside this one (`teachers/<name>`, kdcache/cache/teachers.py) and its
        manifest, refused unless its bytes have the sha256 this cache's manifest recorded for it."""
        with self.open_file(f"{check_relative(relative)}/{MANIFEST_NAME}") as handle:
            text = handle.read()
        if hashlib.sha256(text).hexdigest() != manifest_sha256:
            raise KDCacheError(f"{relative}/{MANIFEST_NAME} in cache {self.location} is not the manifest the cache "
                               f"recorded for that teacher (sha256 differs): it was modified or replaced")
        store = CacheStore(self._url(relative) if self.remote else Path(self.location) / relative, self.read_through,
                           self.transfer_timeout)
        return store, Manifest.from_json(text, f"{self.location}/{relative}/{MANIFEST_NAME}")

    def load_manifest(self) -> Manifest:
        if not self.remote:
            return Manifest.load(Path(self.location))
        try:
            text = self._read_capped(MANIFEST_NAME, MAX_MANIFEST_BYTES)
        except KDCacheError:
            raise
        except FileNotFoundError:
            raise KDCacheError(f"not a kdcache cache (no {MANIFEST_NAME}): {self}") from None
        except Exception as error:  # noqa: BLE001 - first contact: credentials, endpoint, network (any library's type)
            reason = self._describe(error) if isinstance(error, self.read_errors) else redact(first_line(error))
            raise KDCacheError(f"cannot read cache {self}: {reason}") from None
        return Manifest.from_json(text, redact_url(self._url(MANIFEST_NAME)))

    def read_small(self, relative: str, limit: int) -> bytes | None:
        """The whole of a small file (the manifest, the card), or None when it does not exist; refused past
        `limit` bytes without reading further: a server cannot make a reader hold a 3 GB manifest."""
        try:
            return self._read_capped(relative, limit)
        except FileNotFoundError:
            return None
        except self.read_errors as error:
            raise self._failure(error, relative) from None

    def read_text(self, relative: str, limit: int) -> str | None:
        """A small UTF-8 text file (the manifest, the card) whole, None when it does not exist; refused in one
        line past `limit` bytes or when it is not UTF-8 text."""
        data = self.read_small(relative, limit)
        try:
            return None if data is None else data.decode()
        except UnicodeDecodeError:
            raise KDCacheError(f"{relative} of cache {self} is not UTF-8 text: refused") from None

    def _read_capped(self, relative: str, limit: int) -> bytes:
        """Over HTTP the body is streamed, so a server without Range support serves it too."""
        if not self.remote:
            path = contained_file(Path(self.location), relative)
            if path is None:
                raise FileNotFoundError(relative)
            opened = open(path, "rb")
        else:
            # over HTTP one streamed GET, `size` given so that no HEAD comes first (whose refused redirect
            # fsspec would report as a missing file)
            opened = self.fs.open(self._url(relative), "rb", **({"block_size": 0, "size": limit} if self.http else {}))
        with opened as handle:
            return read_capped(handle, limit, f"{relative} of cache {self}")

    def size(self, relative: str) -> int | None:
        """The file's size in bytes, or None when it does not exist."""
        if not self.remote:
            path = contained_file(Path(self.location), relative)
            return None if path is None else path.stat().st_size
        try:
            return self.fs.info(self._url(relative))["size"]
        except FileNotFoundError:
            return None
        except self.read_errors as error:
            raise self._failure(error, relative) from None

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

    def open_file(self, relative: str) -> BinaryIO:
        """The raw bytes of one cache file, to copy it elsewhere (`kdcache copy`)."""
        if not self.remote:
            path = contained_file(Path(self.location), relative)
            if path is None:
                raise KDCacheError(f"{relative} is missing from cache {self}")
            return self._guard(lambda: open(path, "rb"), relative)
        # over HTTP one streamed GET (no Range needed); its reader stops at the size the manifest declares
        options = {"block_size": 0} if self.http else {"block_size": REMOTE_BLOCK_SIZE}
        handle = self._guard(lambda: self.fs.open(self._url(relative), "rb", **options), relative)
        return _GuardedFile(handle, lambda action: self._guard(action, relative))

    def source(self, shard: ShardInfo) -> tuple[pa.NativeFile, bool]:
        """The shard's bytes for pyarrow, and whether they are streamed from the remote store (ranged
        reads, checked batch by batch) rather than memory-mapped from a local, whole-file-verified copy.

        Read it through `validate.open_checked` (or `Cache.open_shard`), never with `pa.ipc` directly.
        """
        local = self._local_path(shard)
        if local is not None:
            try:
                return pa.memory_map(str(local), "r"), False
            except OSError as error:
                raise KDCacheError(f"cannot read shard {shard.file} in {self}: {first_line(error)}") from None
        handle = self._guard(lambda: self.fs.open(self._url(shard.file), "rb", block_size=REMOTE_BLOCK_SIZE),
                             shard.file, STREAM_HINT)
        return pa.PythonFile(_GuardedFile(handle, lambda action: self._guard(action, shard.file, STREAM_HINT)),
                             mode="r"), True

    def tokenizer_dir(self, tokenizer: dict) -> Path:
        """A local directory holding the cache's tokenizer (downloaded once when the cache is remote).

        `tokenizer` (the manifest's) names what to download (`files`, their fingerprints) and how big each
        may be (`safety.tokenizer_file_limit`); only caches from before tokenizer fingerprints, which list
        no files, fall back to listing the remote directory.
        """
        files = tokenizer.get("files", {})
        if not self.remote:
            return Path(self.location) / TOKENIZER_DIR
        if self._tokenizer_copy is None:
            copy = tempfile.TemporaryDirectory(prefix="kdcache-tokenizer-")
            names = list(files) or [url.rstrip("/").rsplit("/", 1)[-1] for url in self._guard(
                lambda: self.fs.ls(self._url(TOKENIZER_DIR), detail=False), TOKENIZER_DIR)]
            for name in names:
                relative = check_relative(f"{TOKENIZER_DIR}/{name}", "tokenizer file")
                self._download(relative, Path(copy.name) / name, tokenizer_file_limit(tokenizer, name))
            self._tokenizer_copy = copy
        return Path(self._tokenizer_copy.name)


def as_store(cache: CacheStore | str | Path) -> CacheStore:
    return cache if isinstance(cache, CacheStore) else CacheStore(cache)
