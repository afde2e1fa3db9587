"""Writing a dump's shards on a background thread, so the teacher never waits for Arrow or the disk.

The dump loop hands each batch's targets over as soon as their device→host copies are queued
(`start_host_copy`: pinned buffers and `non_blocking` on CUDA) and goes on with the next forward
pass. The writer thread waits for the copies, splits the rows, sets aside rows with non-finite
log-probs, keeps the statistics and the fidelity card of the rows it writes, restores sample-id
order within each window of length-sorted batches, writes the shard and, once the shard file is
in place, its resume record. The queue is bounded: when writing falls behind, the dump loop
blocks (back-pressure) instead of piling device outputs up in host memory.
"""

from __future__ import annotations

import dataclasses
import queue
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import torch

from ..cache.codecs import Codec
from ..cache.format import hidden_column
from ..cache.stats import StreamingSummary
from ..cache.writer import CachedSequence, Ragged, ShardWriter, open_for_writing
from ..errors import KDCacheError
from ..tasks import Annotation
from .fidelity import FidelityCard
from .progress import ShardRecord, write_record

RESUME_HINT = "the finished shards are kept: fix the cause (e.g. free disk space) and rerun the same command to resume"


@dataclasses.dataclass
class HostBatch:
    """One teacher batch on its way to the host: per target position, flattened over the batch.

    A causal LM has a target at every token; a classification row has one per entry of its
    annotation's `target_positions`, which, with its labels and token types, travels along.
    """

    sample_ids: list[int]
    token_lists: list[list[int]]
    tensors: dict[str, torch.Tensor]  # tail, next_logprob, finite, fidelity.*; ids, logprobs (top-k);
                                      # sampled_ids, sampled_counts, sampled_offsets (sampled, ragged);
                                      # hidden_<i> per token, pooled per row
    ready: torch.cuda.Event | None    # recorded after the copies; None when already on the host
    annotations: list[Annotation] | None = None  # targets positions, labels, spans: see Annotation


def start_host_copy(sample_ids: list[int], token_lists: list[list[int]], tensors: dict[str, torch.Tensor],
                    annotations: list[Annotation] | None = None) -> HostBatch:
    """Queue the copies of `tensors` to the host without waiting for them (CUDA); copy otherwise."""
    device = next(iter(tensors.values())).device
    if device.type == "cpu":
        return HostBatch(sample_ids, token_lists, tensors, None, annotations)
    if device.type != "cuda":
        return HostBatch(sample_ids, token_lists, {name: t.cpu() for name, t in tensors.items()}, None, annotations)
    host = {}
    for name, tensor in tensors.items():
        host[name] = torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu", pin_memory=True)
        host[name].copy_(tensor, non_blocking=True)
    ready = torch.cuda.Event()
    ready.record()
    return HostBatch(sample_ids, token_lists, host, ready, annotations)


@dataclasses.dataclass
class _OpenShard:
    index: int
    writer: ShardWriter
    fidelity: FidelityCard
    captured: StreamingSummary = dataclasses.field(default_factory=StreamingSummary)
    window: list[CachedSequence] = dataclasses.field(default_factory=list)
    nll_sum: float = 0.0
    nll_count: int = 0
    nonfinite_positions: int = 0
    nonfinite_sample_ids: list[int] = dataclasses.field(default_factory=list)
    dropped: dict[str, list[int]] = dataclasses.field(default_factory=dict)


class BackgroundShardWriter:
    """Turns `HostBatch`es into planned shards and their resume records, on its own thread.

    Lifecycle, from the dump loop: for each planned shard `begin_shard(i)`, then `submit()` its
    batches with `end_window(dropped)` after each window, then `end_shard()`; finally `close()` (waits,
    re-raises any write error) or, when the loop fails, `abort()` (drops the shard in progress).
    """

    def __init__(self, out: Path, schema: pa.Schema, *, shard_rows: int, rank: int, id_dtype, logprob_dtype,
                 hidden_layers: list[int], new_card: Callable[[], FidelityCard], codec: Codec = Codec(),
                 queue_size: int = 8, open_shard: Callable[[Path], BinaryIO] = open_for_writing):
        self.out = Path(out)
        self.codec = codec
        self.open_shard = open_shard
        self.schema = schema
        self.shard_rows = shard_rows
        self.prefix = f"shard-{rank:05d}"
        self.id_dtype = id_dtype
        self.logprob_dtype = logprob_dtype
        self.hidden_layers = hidden_layers
        self.new_card = new_card
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._shard: _OpenShard | None = None
        self._error: BaseException | None = None
        self._aborting = threading.Event()
        self._thread = threading.Thread(target=self._run, name="kdcache-shard-writer", daemon=True)
        self._thread.start()

    # ---- dump loop side -------------------------------------------------------------------------
    def begin_shard(self, index: int) -> None:
        self._put("begin_shard", index)

    def submit(self, batch: HostBatch) -> None:
        self._put("batch", batch)

    def end_window(self, dropped: dict[str, list[int]]) -> None:
        """The window's batches are all submitted; `dropped` lists its rows that had nothing to target."""
        self._put("end_window", dropped)

    def end_shard(self) -> None:
        self._put("end_shard", None)

    def close(self) -> None:
        self._put("stop", None)
        self._thread.join()
        self._raise_worker_error()

    def abort(self) -> None:
        self._aborting.set()
        if self._thread.is_alive():
            self._queue.put(("stop", None))
            self._thread.join()

    def _put(self, kind: str, payload) -> None:
        """Blocks while the queue is full (back-pressure), but never on a writer that has died."""
        while True:
            self._raise_worker_error()
            try:
                self._queue.put((kind, payload), timeout=0.2)
                return
            except queue.Full:
                continue

    def _raise_worker_error(self) -> None:
        if self._error is not None:
            if isinstance(self._error, (KDCacheError, OSError)):
                raise KDCacheError(f"{self._error}; {RESUME_HINT}") from None
            raise self._error

    # ---- writer thread side ---------------------------------------------------------------------
    def _run(self) -> None:
        try:
            while True:
                kind, payload = self._queue.get()
                if kind == "stop":
                    break
                if not self._aborting.is_set():
                    getattr(self, f"_on_{kind}")(payload)
        except BaseException as error:  # noqa: BLE001 - handed to the dump loop, which re-raises it
            self._error = error
        if self._shard is not None and (self._error is not None or self._aborting.is_set()):
            self._shard.writer.abort()

    def _on_begin_shard(self, index: int) -> None:
        self._shard = _OpenShard(index, ShardWriter(self.out, self.schema, shard_rows=self.shard_rows,
                                                     prefix=self.prefix, start_index=index, codec=self.codec,
                                                     open_file=self.open_shard), self.new_card())

    def _on_batch(self, batch: HostBatch) -> None:
        if batch.ready is not None:
            batch.ready.synchronize()
        host = {name: tensor.numpy() for name, tensor in batch.tensors.items()}
        lengths = np.array([len(tokens) for tokens in batch.token_lists])
        token_starts = np.concatenate([[0], np.cumsum(lengths)])
        if batch.annotations is not None:
            lengths = np.array([len(tokens) if annotation.target_positions is None else len(annotation.target_positions)
                                for tokens, annotation in zip(batch.token_lists, batch.annotations)])
        starts = np.concatenate([[0], np.cumsum(lengths)])
        bad_positions = np.add.reduceat((~host["finite"]).astype(np.int64), starts[:-1])
        good_rows = bad_positions == 0
        shard = self._shard
        shard.nonfinite_positions += int(bad_positions.sum())
        shard.nonfinite_sample_ids += [sid for sid, good in zip(batch.sample_ids, good_rows) if not good]

        good_positions = np.repeat(good_rows, lengths)
        shard.captured.add(-np.expm1(host["tail"][good_positions]))
        next_logprob = host["next_logprob"][good_positions]
        has_next = ~np.isnan(next_logprob)
        shard.nll_sum -= float(next_logprob[has_next].sum())
        shard.nll_count += int(has_next.sum())
        shard.fidelity.add({name: values[good_positions] for name, values in host.items()
                            if name.startswith("fidelity.")})

        topk = "ids" in host
        if topk:
            ids = host["ids"].astype(self.id_dtype)
            logprobs = host["logprobs"].astype(self.logprob_dtype, copy=False)
        sampled = "sampled_offsets" in host
        if sampled:
            drawn_ids = Ragged(host["sampled_ids"].astype(self.id_dtype), host["sampled_offsets"])
            drawn_counts = Ragged(host["sampled_counts"].astype(np.uint16), host["sampled_offsets"])
        annotations = batch.annotations or [None] * len(batch.sample_ids)
        for row, (sample_id, tokens, annotation) in enumerate(zip(batch.sample_ids, batch.token_lists, annotations)):
            if not good_rows[row]:
                continue
            span = slice(starts[row], starts[row + 1])
            token_span = slice(token_starts[row], token_starts[row + 1])
            shard.window.append(CachedSequence(
                sample_id=sample_id, input_ids=np.asarray(tokens, dtype=np.int32),
                topk_ids=ids[span] if topk else None, topk_logprobs=logprobs[span] if topk else None,
                tail_logprob=host["tail"][span] if topk else None,
                hidden={layer: host[hidden_column(layer)][token_span] for layer in self.hidden_layers},
                sampled_ids=drawn_ids.positions(span) if sampled else None,
                sampled_counts=drawn_counts.positions(span) if sampled else None,
                pooled=host["pooled"][row][None] if "pooled" in host else None,
                **({} if annotation is None else vars(annotation))))

    def _on_end_window(self, dropped: dict[str, list[int]]) -> None:
        """Rows were computed longest first; they are written in sample-id order."""
        self._shard.writer.write(sorted(self._shard.window, key=lambda sequence: sequence.sample_id))
        self._shard.window = []
        for reason, sample_ids in dropped.items():
            self._shard.dropped.setdefault(reason, []).extend(sample_ids)

    def _on_end_shard(self, _) -> None:
        shard = self._shard
        files = shard.writer.close()
        write_record(self.out, ShardRecord(index=shard.index, shard=files[0] if files else None,
                                           captured=shard.captured.state(), fidelity=shard.fidelity.state(),
                                           nll_sum=shard.nll_sum,
                                           nll_count=shard.nll_count, nonfinite_positions=shard.nonfinite_positions,
                                           nonfinite_sample_ids=shard.nonfinite_sample_ids, dropped=shard.dropped))
        self._shard = None
