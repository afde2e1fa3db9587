"""Hostile caches and servers for the security tests: a real cache, copied and edited as an attacker would.

The attacker controls every byte of a received cache, manifest included, so `rehash` makes the
manifest agree with the edited files (sizes, sha256, per-batch hashes, tokenizer fingerprints):
what must catch the lie is kdcache's own checks, not a stale hash.
"""

from __future__ import annotations

import functools
import http.server
import json
import shutil
import threading
import time
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow as pa

from kdcache.cache.format import MANIFEST_NAME, TOKENIZER_DIR, sha256_file, tokenizer_files
from kdcache.cache.validate import batch_digests


def copy_cache(cache_dir: Path, target: Path) -> Path:
    shutil.copytree(cache_dir, target)
    return target


def edit_manifest(cache: Path, edit: Callable[[dict], object]) -> None:
    """Apply `edit` to the manifest's JSON; if it returns something other than None, that becomes the manifest."""
    path = cache / MANIFEST_NAME
    data = json.loads(path.read_text())
    replaced = edit(data)
    path.write_text(json.dumps(data if replaced is None else replaced))


def rehash(cache: Path) -> None:
    """Make the manifest vouch for whatever the files now hold, as a forger would."""
    def update(data: dict) -> None:
        for shard in data["shards"]:
            path = cache / shard["file"]
            if path.is_file() and not path.is_symlink():
                shard.update(bytes=path.stat().st_size, sha256=sha256_file(path), batch_sha256=batch_digests(path))
        if (cache / TOKENIZER_DIR).is_dir():
            data["tokenizer"].update(tokenizer_files(cache / TOKENIZER_DIR))
    edit_manifest(cache, update)


def map_values(array: pa.Array, change: Callable[[np.ndarray], np.ndarray]) -> pa.Array:
    """`array` (lists nested any depth) with its innermost values replaced by `change(values)`."""
    if pa.types.is_list(array.type):
        return pa.ListArray.from_arrays(array.offsets, map_values(array.values, change))
    if pa.types.is_fixed_size_list(array.type):
        return pa.FixedSizeListArray.from_arrays(map_values(array.values, change), array.type.list_size)
    return pa.array(change(array.to_numpy(zero_copy_only=False).copy()), type=array.type)


def drop_last_of_first_row(array: pa.Array) -> pa.Array:
    """`array` (a list column) with the last item of its first row removed: lengths no longer agree."""
    offsets = array.offsets.to_numpy().copy()
    keep = np.delete(np.arange(len(array.values)), offsets[1] - 1)
    offsets[1:] -= 1
    return pa.ListArray.from_arrays(pa.array(offsets), array.values.take(pa.array(keep)))


def rewrite_shard(cache: Path, index: int, column: str, change: Callable[[pa.Array], pa.Array], *,
                  compression: str | None = None, target: Path | None = None) -> Path:
    """Rewrite shard `index`, batch by batch (same boundaries, same schema), with `column` replaced by
    `change(column)`; written to `target` (default: in place)."""
    path = cache / json.loads((cache / MANIFEST_NAME).read_text())["shards"][index]["file"]
    reader = pa.ipc.open_file(pa.BufferReader(path.read_bytes()))  # not a memory map: the file is rewritten
    batches = []
    for number in range(reader.num_record_batches):
        batch = reader.get_batch(number)
        columns = [change(batch.column(name)) if name == column else batch.column(name) for name in batch.schema.names]
        batches.append(pa.RecordBatch.from_arrays(columns, schema=reader.schema))
    target = target or path
    options = pa.ipc.IpcWriteOptions(compression=compression)
    with pa.OSFile(str(target), "wb") as sink, pa.ipc.new_file(sink, reader.schema, options=options) as writer:
        for batch in batches:
            writer.write_batch(batch)
    return target


@contextmanager
def serve(directory: Path, handler_class: type[http.server.BaseHTTPRequestHandler]):
    """Serve `directory` on 127.0.0.1 with `handler_class` until the block ends; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(handler_class,
                                                                                 directory=str(directory)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


class ShardMisbehaviour(http.server.SimpleHTTPRequestHandler):
    """Serves a cache normally, except that shard (`.arrow`) bodies go through `send_shard`."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if path.suffix != ".arrow" or not path.is_file():
            return super().do_GET()
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.send_shard(data)

    def send_shard(self, data: bytes) -> None:
        raise NotImplementedError


class Trickle(ShardMisbehaviour):
    """One byte of a shard every 0.2 s (for at most 20 s): each read succeeds, the transfer never ends."""

    def send_shard(self, data: bytes) -> None:
        for byte in data[:100]:
            try:
                self.wfile.write(bytes([byte]))
                self.wfile.flush()
            except OSError:
                return
            time.sleep(0.2)


class Truncate(ShardMisbehaviour):
    """Half of each shard, then the connection closes."""

    def send_shard(self, data: bytes) -> None:
        self.wfile.write(data[:len(data) // 2])
        self.close_connection = True


class Endless(http.server.SimpleHTTPRequestHandler):
    """Serves a cache normally, except that the files named in `endless` never end: zeros after their real
    bytes, with no Content-Length (`extra_mib` MiB more, so a failing test still ends)."""

    endless: tuple[str, ...] = ()
    extra_mib = 1

    def log_message(self, *args):
        pass

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if path.name not in self.endless or not path.is_file():
            return super().do_GET()
        self.send_response(200)
        self.end_headers()
        try:
            self.wfile.write(path.read_bytes())
            for _ in range(self.extra_mib):
                self.wfile.write(bytes(1 << 20))
        except OSError:
            pass
        self.close_connection = True


def endless(*names: str, extra_mib: int) -> type[Endless]:
    return type("EndlessHere", (Endless,), {"endless": names, "extra_mib": extra_mib})


def redirecting(target: str) -> type[http.server.BaseHTTPRequestHandler]:
    """A server that answers every request with a redirect to the same path on `target` (another origin)."""
    class Redirect(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            self.send_response(302)
            self.send_header("Location", target + self.path)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_HEAD = do_GET
    return Redirect


def with_userinfo(url: str, secret: str) -> str:
    """`url` carrying credentials an attacker (or a log reader) must never see written down."""
    scheme, rest = url.split("://", 1)
    return f"{scheme}://reader:{secret}@{rest}"


def written_files(*roots: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for root in roots for path in Path(root).rglob("*") if path.is_file()}


def corrupt_list_offsets(column: pa.Array) -> pa.Array:
    """`column` (a list column) whose second offset points far past its values (the first and last, which Arrow's
    cheap validation looks at, are intact): Arrow slicing it unchecked reads or aborts outside the buffer."""
    offsets = column.offsets.to_numpy().astype(np.int32).copy()
    offsets[1] = 10_000_000
    return pa.Array.from_buffers(column.type, len(column), [None, pa.py_buffer(offsets.tobytes())],
                                 children=[column.values])
