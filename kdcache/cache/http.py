"""A small read-only fsspec filesystem for caches served over plain HTTP(S).

fsspec's own `http` filesystem needs `aiohttp`, which `datasets` no longer pulls in; a cache
only needs four operations (size, ranged read, whole-file download, list one flat directory),
so kdcache does them with the standard library instead of adding a dependency. Shards are read
with `Range` requests, so a reader fetches only the record batches it decodes.
"""

from __future__ import annotations

import re
import shutil
import urllib.error
import urllib.parse
import urllib.request

from fsspec.spec import AbstractBufferedFile, AbstractFileSystem

TIMEOUT_SECONDS = 60
_LINK = re.compile(r'href\s*=\s*["\']([^"\'?#]+)["\']', re.IGNORECASE)


def _request(url: str, *, method: str = "GET", headers: dict[str, str] | None = None):
    try:
        return urllib.request.urlopen(urllib.request.Request(url, method=method, headers=headers or {}),
                                      timeout=TIMEOUT_SECONDS)
    except urllib.error.HTTPError as error:
        if error.code == 404:
            raise FileNotFoundError(url) from None
        raise OSError(f"HTTP {error.code} for {url}") from None
    except urllib.error.URLError as error:
        raise OSError(f"cannot reach {url}: {error.reason}") from None


class HTTPFileSystem(AbstractFileSystem):
    """Files addressed by full `http(s)://` URLs; directories are the links of an index page."""

    protocol = ("http", "https")

    @classmethod
    def _strip_protocol(cls, path):
        return path  # the URL is the path

    def info(self, path, **kwargs):
        with _request(path, method="HEAD") as response:
            size = response.headers.get("Content-Length")
        return {"name": path, "size": int(size) if size is not None else None, "type": "file"}

    def ls(self, path, detail=True, **kwargs):
        """Files linked from the directory's index page (what `python -m http.server`, nginx autoindex serve)."""
        base = path.rstrip("/") + "/"
        with _request(base) as response:
            page = response.read().decode("utf-8", errors="replace")
        names = sorted({urllib.parse.urljoin(base, link) for link in _LINK.findall(page)})
        files = [name for name in names if name.startswith(base) and name != base and not name.endswith("/")]
        return [self.info(name) for name in files] if detail else files

    def cat_file(self, path, start=None, end=None, **kwargs):
        if start is None and end is None:
            with _request(path) as response:
                return response.read()
        return super().cat_file(path, start=start, end=end, **kwargs)

    def get_file(self, rpath, lpath, **kwargs):
        """Download with one plain GET, so a read-through copy works even where ranges are unsupported."""
        with _request(rpath) as response, open(lpath, "wb") as local:
            shutil.copyfileobj(response, local, length=1 << 22)

    def _open(self, path, mode="rb", block_size=None, **kwargs):
        if mode != "rb":
            raise NotImplementedError("HTTP caches are read-only")
        return _RangeFile(self, path, mode, block_size=block_size or "default", size=self.info(path)["size"])


class _RangeFile(AbstractBufferedFile):
    def _fetch_range(self, start, end):
        if start >= end:
            return b""
        with _request(self.path, headers={"Range": f"bytes={start}-{end - 1}"}) as response:
            if response.status != 206:
                raise OSError(f"{self.path}: the server ignores HTTP range requests; "
                              "use a read-through directory to download whole shards")
            return response.read()
