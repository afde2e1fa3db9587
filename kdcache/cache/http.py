"""A small read-only fsspec filesystem for caches served over plain HTTP(S).

fsspec's own `http` filesystem needs `aiohttp`, which `datasets` no longer pulls in; a cache
only needs four operations (size, ranged read, whole-file download, list one flat directory),
so kdcache does them with the standard library instead of adding a dependency. Shards are read
with `Range` requests, so a reader fetches only the record batches it decodes.

The server is untrusted. Every transfer (a HEAD, a ranged read, a whole-file download) has one
overall deadline, retries included, so a server that trickles a byte every few seconds is given up
on; a body shorter than announced is retried, then reported as one `OSError` line (and a download
that never completed is never handed on: the read-through store also checks size and sha256).
"""

from __future__ import annotations

import http.client
import re
import time
import urllib.error
import urllib.parse
import urllib.request

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

TIMEOUT_SECONDS = 60  # the longest wait for one socket read
DEADLINE_SECONDS = 600.0  # the longest one transfer may take, retries included
ATTEMPTS = 3
CHUNK = 1 << 20
_LINK = re.compile(r'href\s*=\s*["\']([^"\'?#]+)["\']', re.IGNORECASE)


class _Retry(Exception):
    """A failure worth another attempt: no connection, a 5xx, a stalled or truncated body."""


def _attempt(url: str, give_up: float, method: str, headers: dict[str, str], sink) -> tuple[int, dict, bytes]:
    remaining = give_up - time.monotonic()
    try:
        response = urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers),
                                          timeout=max(0.01, min(TIMEOUT_SECONDS, remaining)))
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise FileNotFoundError(url) from None
        if error.code >= 500:
            raise _Retry(f"HTTP {error.code}") from None
        raise OSError(f"HTTP {error.code} for {url}") from None
    except (urllib.error.URLError, OSError, http.client.HTTPException) as error:
        raise _Retry(getattr(error, "reason", None) or error) from None
    with response:
        announced = response.headers.get("Content-Length")
        received, parts = 0, []
        try:
            while method != "HEAD" and (chunk := response.read1(CHUNK)):
                received += len(chunk)
                sink(chunk) if sink else parts.append(chunk)
                if time.monotonic() > give_up:
                    raise _Retry("too slow")
        except (OSError, http.client.HTTPException) as error:
            raise _Retry(f"the body broke off after {received} bytes ({type(error).__name__})") from None
        if method != "HEAD" and announced is not None and received != int(announced):
            raise _Retry(f"the body broke off after {received} of {announced} bytes")
        return response.status, dict(response.headers), b"".join(parts)


def _request(url: str, deadline: float, *, method: str = "GET", headers: dict[str, str] | None = None,
             open_sink=None) -> tuple[int, dict, bytes]:
    """(status, headers, body) of one transfer, tried up to `ATTEMPTS` times within `deadline` seconds.

    `open_sink()` returns a fresh `write` for each attempt (a download restarts from byte 0); without
    it the body is returned.
    """
    give_up = time.monotonic() + deadline
    for attempt in range(1, ATTEMPTS + 1):
        try:
            return _attempt(url, give_up, method, headers or {}, open_sink() if open_sink else None)
        except _Retry as error:
            problem = error
        if time.monotonic() >= give_up:
            break
        time.sleep(min(0.2 * 2**attempt, max(0.0, give_up - time.monotonic())))
    raise OSError(f"{url}: {problem} (gave up after {attempt} attempts, {deadline:g}s deadline)")


class HTTPFileSystem(AbstractFileSystem):
    """Files addressed by full `http(s)://` URLs; directories are the links of an index page.

    `deadline`: seconds one transfer may take, retries included.
    """

    protocol = ("http", "https")

    def __init__(self, deadline: float = DEADLINE_SECONDS, **kwargs):
        super().__init__(**kwargs)
        self.deadline = deadline

    @classmethod
    def _strip_protocol(cls, path):
        return path  # the URL is the path

    def info(self, path, **kwargs):
        _, headers, _ = _request(path, self.deadline, method="HEAD")
        size = headers.get("Content-Length")
        return {"name": path, "size": int(size) if size is not None else None, "type": "file"}

    def ls(self, path, detail=True, **kwargs):
        """Files linked from the directory's index page (what `python -m http.server`, nginx autoindex serve)."""
        base = path.rstrip("/") + "/"
        page = _request(base, self.deadline)[2].decode("utf-8", errors="replace")
        names = sorted({urllib.parse.urljoin(base, link) for link in _LINK.findall(page)})
        files = [name for name in names if name.startswith(base) and name != base and not name.endswith("/")]
        return [self.info(name) for name in files] if detail else files

    def cat_file(self, path, start=None, end=None, **kwargs):
        if start is None and end is None:
            return _request(path, self.deadline)[2]
        return super().cat_file(path, start=start, end=end, **kwargs)

    def get_file(self, rpath, lpath, **kwargs):
        """Download with one plain GET, so a read-through copy works even where ranges are unsupported."""
        with open(lpath, "wb") as local:
            def restart():
                local.seek(0)
                local.truncate()
                return local.write
            _request(rpath, self.deadline, open_sink=restart)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if mode != "rb":
            raise NotImplementedError("HTTP caches are read-only")
        return _RangeFile(self, path, mode, block_size=block_size or "default", size=self.info(path)["size"])


class _RangeFile(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        if start >= end:
            return b""
        status, _, body = _request(self.path, self.fs.deadline, headers={"Range": f"bytes={start}-{end - 1}"})
        if status != 206:
            raise OSError(f"{self.path}: the server ignores HTTP range requests; "
                          "use a read-through directory to download whole shards")
        return body
