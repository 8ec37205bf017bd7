"""Training on data larger than memory: chunk-aware shuffling, read in DataLoader workers.

Rows that do not fit in memory are read a *buffer* at a time: several chunks of consecutive rows (aligned with the
file's own chunking when the reader reports it, `FileInfo.meta["chunk_rows"]`), read with one sorted read, so that
every compressed chunk is decompressed once per epoch. Each epoch shuffles the order of the chunks (a function of
seed and epoch: a resumed run replays it), and the rows within each buffer.

The randomness trade-off: a batch mixes rows of `buffer_chunks` chunks rather than of the whole split. Chunks are
the file's own chunks grouped to at least 2 MB (HEP images: 128 rows; climate fields: 10 time steps), and a buffer
is at most 256 MB and a quarter of the memory budget (HEP under a 1.25 GiB cap: about 40 chunks): the rows that meet
in a batch change every epoch, but two rows of one chunk are always in the same buffer. Files written in a random
order (as simulation output and most published samples are) lose nothing; files sorted by label or time should be
read with smaller chunks (`data.stream_chunk_rows`). docs/performance.md measures the test metrics against full
shuffling.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from sciml.data.datasets import as_tensors

CHUNK_BYTES = 2 * 2**20  # the least a streamed chunk reads: tiny file chunks (one time step) are grouped


def chunk_size(store, info, chunk_rows: int | None) -> int:
    """Rows per streamed chunk of one file: `chunk_rows`, else whole file chunks (`meta["chunk_rows"]`, else one
    row) grouped to at least CHUNK_BYTES, so that a buffer holds few large reads rather than many small ones."""
    if chunk_rows:
        return int(chunk_rows)
    unit = int(info.meta.get("chunk_rows") or 1)
    return unit * max(1, math.ceil(CHUNK_BYTES / (unit * store.row_bytes())))


def chunks_of(store, rows: np.ndarray, chunk_rows: int | None) -> list[np.ndarray]:
    """`rows` (sorted, global) cut into chunks that never cross a file, aligned with each file's chunking."""
    file_id, local = store.locate(rows)
    sizes = np.array([chunk_size(store, info, chunk_rows) for info in store.infos])
    key = file_id.astype(np.int64) * (1 << 40) + local // sizes[file_id]
    cuts = np.flatnonzero(np.diff(key)) + 1
    return np.split(rows, cuts)


def shard_chunks(chunks: list[np.ndarray], rank: int, world: int) -> list[np.ndarray]:
    """Chunks `rank::world`, cut to the same number of rows on every rank (DDP needs equal batch counts)."""
    mine = chunks[rank::world]
    per_rank = min(sum(len(c) for c in chunks[r::world]) for r in range(world))
    out, total = [], 0
    for chunk in mine:
        take = min(len(chunk), per_rank - total)
        if take <= 0:
            break
        out.append(chunk[:take])
        total += take
    return out


class ChunkStream(IterableDataset):
    """Batches of the training rows `chunks`, read `buffer_chunks` chunks at a time and shuffled within the buffer.
    Each DataLoader worker reads its own buffers (reading and decompression in parallel)."""

    def __init__(self, store, chunks: list[np.ndarray], batch_size: int, buffer_chunks: int, seed: int):
        self.store, self.chunks, self.batch_size = store, chunks, batch_size
        self.buffer_chunks, self.seed, self.epoch = max(1, buffer_chunks), int(seed), 0
        self.rows = int(sum(len(c) for c in chunks))

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def _buffers(self) -> list[np.ndarray]:
        """The epoch's buffers: shuffled chunks, `buffer_chunks` at a time. Every buffer but the last holds whole
        batches (a tail shorter than a batch moves on to the next buffer), so the epoch has ceil(rows / batch)
        batches whatever the chunk sizes: DDP ranks with equal rows then run equal batch counts (a rank with one
        batch more waits in its collective until the timeout)."""
        order = np.random.default_rng([self.seed, self.epoch]).permutation(len(self.chunks))
        groups = [order[i:i + self.buffer_chunks] for i in range(0, len(order), self.buffer_chunks)]
        buffers, tail = [], np.zeros(0, np.int64)
        for number, group in enumerate(groups):
            rows = np.concatenate([tail, *(self.chunks[c] for c in group)])
            whole = len(rows) if number == len(groups) - 1 else len(rows) - len(rows) % self.batch_size
            buffers.append(rows[:whole])
            tail = rows[whole:]
        return buffers

    def __len__(self) -> int:
        return sum(math.ceil(len(b) / self.batch_size) for b in self._buffers())

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        for number, rows in enumerate(self._buffers()):
            if number % workers != worker:
                continue
            data = self.store.read(np.sort(rows))  # one sorted read: each chunk decompressed once
            order = np.random.default_rng([self.seed, self.epoch, number]).permutation(len(rows))
            for start in range(0, len(rows), self.batch_size):
                take = order[start:start + self.batch_size]
                yield as_tensors({k: v[take] for k, v in data.items()})


def worker_init(_):
    """One intra-op thread per DataLoader worker: the workers only read and decompress."""
    torch.set_num_threads(1)
