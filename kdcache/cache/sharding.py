"""Which rows each process reads in an epoch, and in what order: pure functions of integers.

Both are computed without touching the data, so a reader can resume at any position of an epoch
by replaying them (cheap integer work) instead of re-reading what was already consumed.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Iterator


@dataclasses.dataclass(frozen=True)
class RowSpan:
    """Rows `start` (inclusive) to `stop` (exclusive) of shard number `shard` of the manifest."""

    shard: int
    start: int
    stop: int


def epoch_rng(seed: int, epoch: int) -> random.Random:
    return random.Random(seed * 1_000_003 + epoch)


def process_spans(shard_rows: list[int], *, process_index: int, num_processes: int, shuffle: bool,
                  seed: int, epoch: int) -> list[RowSpan]:
    """This process's share of an epoch: a contiguous slice of the (shuffled) shard sequence.

    The shards, in a seeded per-epoch order, are laid end to end and cut into `num_processes`
    slices of exactly `total // num_processes` rows. So shares are disjoint, every process gets
    the same number of rows (the same number of steps: no collective waits forever), each process
    reads whole shards except at most two cut at its slice's ends, and with fewer shards than
    processes the cut falls inside shards (row-level fallback). The `total % num_processes` rows
    left over are the end of that epoch's last shard, a different one each epoch.
    """
    order = list(range(len(shard_rows)))
    if shuffle:
        epoch_rng(seed, epoch).shuffle(order)
    per_process = sum(shard_rows) // num_processes
    begin, end = process_index * per_process, (process_index + 1) * per_process
    spans, offset = [], 0
    for shard in order:
        low, high = max(begin, offset), min(end, offset + shard_rows[shard])
        if low < high:
            spans.append(RowSpan(shard, low - offset, high - offset))
        offset += shard_rows[shard]
    return spans


class BufferedShuffle:
    """A bounded shuffle buffer over input positions 0..count-1: yields the position to emit next.

    It works on positions, not data, so its whole state is the buffer (at most `buffer_size`
    integers) and the next input position; after replaying `n` outputs, exactly the positions in
    `buffer` and those from `next_input` on are still to come. `buffer_size` 1 keeps the order.
    """

    def __init__(self, count: int, buffer_size: int, rng: random.Random):
        self.count = count
        self.buffer_size = max(1, buffer_size)
        self.rng = rng
        self.buffer: list[int] = []
        self.next_input = 0

    def __iter__(self) -> Iterator[int]:
        while self.next_input < self.count:
            position = self.next_input
            self.next_input += 1
            if len(self.buffer) < self.buffer_size:
                self.buffer.append(position)
                continue
            slot = self.rng.randrange(len(self.buffer))
            self.buffer[slot], position = position, self.buffer[slot]
            yield position
        if self.buffer_size > 1:
            self.rng.shuffle(self.buffer)
        while self.buffer:
            yield self.buffer.pop(0)
