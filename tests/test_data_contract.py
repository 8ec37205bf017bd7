"""The core's data layer against references: splits, shards, the row store, normalisation, streamed predictions."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from sciml.data import DataModule, FileInfo, MaxScale, Reader, RowStore, Standardize, shard, split
from sciml.data.predictions import merge_parts
from sciml.errors import SciMLError


@dataclass
class Npz(Reader):
    """A minimal reader: `x` (N, F), optional `y`, a per-row group `g`."""

    features: int = 3
    patterns = ("*.npz",)

    def open(self, path):
        with np.load(path) as f:
            groups = {"g": f["g"]} if "g" in f else {}
            return FileInfo(path, len(f["x"]), (self.features,), labels="y" in f, groups=groups)

    def read(self, info, rows):
        self.reads = getattr(self, "reads", 0) + 1
        with np.load(info.path) as f:
            return {k: f[k][rows] for k in ("x", "y") if k in f}

    def write(self, info, rows, outputs, directory):
        target = directory / f"{info.path.stem}.npz"
        np.savez(target, row=rows, **outputs)
        return [target]


def write(path: Path, n: int, start: int = 0, labels: bool = True, groups=None) -> Path:
    x = (np.arange(start, start + n, dtype=np.float32)[:, None] * [1.0, 10.0, -2.0]).astype(np.float32)
    arrays = {"x": x, **({"y": (np.arange(start, start + n) % 2).astype(np.int64)} if labels else {})}
    if groups is not None:
        arrays["g"] = np.asarray(groups)
    np.savez(path, **arrays)
    return path


# -- splits and shards ------------------------------------------------------------------------------------------
def test_split_by_fraction_is_seeded_disjoint_and_complete():
    a, b = split(100, 0.2, 0.1, seed=3), split(100, 0.2, 0.1, seed=3)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert [len(a[k]) for k in ("train", "val", "test")] == [70, 20, 10]
    assert np.array_equal(np.sort(np.concatenate(list(a.values()))), np.arange(100))
    assert not np.array_equal(split(100, 0.2, 0.1, seed=4)["test"], a["test"])


def test_split_counts_and_time_order():
    parts = split(10, 2, 3, seed=0, order="last")
    assert parts["test"].tolist() == [7, 8, 9] and parts["val"].tolist() == [5, 6]


def test_group_split_keeps_groups_whole():
    days = np.repeat(["2015-05-20", "2015-05-21", "2015-05-22", "2015-05-23", "2015-05-24"], [3, 1, 4, 2, 5])
    parts = split(len(days), 1, 2, seed=0, groups=days, order="last")
    assert set(days[parts["test"]]) == {"2015-05-23", "2015-05-24"} and set(days[parts["val"]]) == {"2015-05-22"}
    random = split(len(days), 1, 1, seed=5, groups=days)
    for name, rows in random.items():
        others = np.concatenate([r for k, r in random.items() if k != name])
        assert not set(days[rows]) & set(days[others]), name
    left_out = split(len(days), 1, 0, seed=0, groups=days, order="last", test_groups=["2015-05-21"])
    assert left_out["test"].tolist() == [3] and set(days[left_out["val"]]) == {"2015-05-24"}


@pytest.mark.parametrize("kwargs, message", [
    ({"val_size": 11}, "a count between 0 and 10"),
    ({"val_size": 1.5}, "a fraction must be in"),
    ({"val_size": 0.5, "test_size": 0.5}, "no rows left for training"),
    ({"test_groups": ["x"]}, "needs data.group_by"),
    ({"order": "time"}, "split_order"),
])
def test_split_errors_name_the_key(kwargs, message):
    args = {"val_size": 0.2, "test_size": 0.2, "seed": 0} | kwargs
    with pytest.raises(SciMLError, match=message):
        split(10, **args)


def test_shards_partition_test_rows_and_equalise_training():
    rows = np.arange(11)
    exact = [shard(rows, r, 3, equal=False) for r in range(3)]
    assert np.array_equal(np.sort(np.concatenate(exact)), rows)
    equal = [shard(rows, r, 3, equal=True) for r in range(3)]
    assert {len(s) for s in equal} == {3} and not set(equal[0]) & set(equal[1])


# -- the row store ----------------------------------------------------------------------------------------------
def test_store_reads_rows_across_files_in_any_order(tmp_path):
    store = RowStore(Npz(), [write(tmp_path / "a.npz", 5), write(tmp_path / "b.npz", 7, start=5)])
    index = np.array([9, 0, 5, 4, 9, 11])
    lazy = store.read(index)
    assert np.array_equal(lazy["x"][:, 0], index) and np.array_equal(lazy["y"], index % 2)
    assert np.array_equal(lazy["index"], index)
    assert store.load(np.arange(12), max_bytes=1e9) and store.in_memory
    reads = store.reader.reads
    held = store.read(index)
    assert store.reader.reads == reads, "rows held in memory are not read again"
    assert all(np.array_equal(lazy[k], held[k]) for k in lazy)


def test_store_falls_back_to_per_batch_reads_when_over_budget(tmp_path):
    store = RowStore(Npz(), [write(tmp_path / "a.npz", 50)])
    assert not store.load(np.arange(50), max_bytes=49 * 3 * 4) and not store.in_memory
    assert store.read(np.array([3]))["x"][0, 1] == 30.0


def test_store_rejects_files_that_disagree(tmp_path):
    write(tmp_path / "a.npz", 5)
    np.savez(tmp_path / "b.npz", x=np.zeros((3, 3), np.float32), y=np.zeros(3, np.int64))
    with pytest.raises(SciMLError, match="b.npz: rows of shape"):
        RowStore(_ShapeFromFile(), [tmp_path / "a.npz", tmp_path / "b.npz"])


@dataclass
class _ShapeFromFile(Npz):
    def open(self, path):
        info = super().open(path)
        with np.load(path) as f:
            info.shape = (f["x"].shape[1], int(f["x"][:, 0].sum() == 0))  # differs between the two files
        return info


def test_unlabelled_files_make_an_unlabelled_store(tmp_path):
    store = RowStore(Npz(), [write(tmp_path / "a.npz", 4), write(tmp_path / "b.npz", 4, labels=False)])
    assert not store.labels and "y" not in store.read(np.arange(8))


# -- normalisation --------------------------------------------------------------------------------------------------
def test_standardize_matches_numpy_over_blocks_and_ranks():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(40, 3, 4, 4)) * np.array([1, 10, 0.1])[None, :, None, None]
    norm = Standardize(3)
    norm.fit(np.array_split(x, 7))
    assert np.allclose(norm.mean.numpy(), x.mean(axis=(0, 2, 3)), rtol=1e-5)
    assert np.allclose(norm.std.numpy(), x.std(axis=(0, 2, 3)), rtol=1e-4)
    halves = [Standardize(3) for _ in range(2)]
    partial = [h.partial(part) for h, part in zip(halves, np.array_split(x, 2))]
    totals = {k: partial[0][k] + partial[1][k] for k in partial[0]}  # what a sum over two ranks gives
    halves[0].finish(totals)
    assert torch.allclose(halves[0].mean, norm.mean) and torch.allclose(halves[0].std, norm.std)
    out = norm(torch.as_tensor(x, dtype=torch.float32))
    assert torch.allclose(out.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-4)


def test_max_scale_keeps_zero_and_survives_a_state_dict_round_trip():
    x = np.abs(np.random.default_rng(1).normal(size=(10, 2, 3, 3)))
    x[:, 1] = 0.0  # an empty channel stays empty
    norm = MaxScale(2)
    assert not norm.fitted
    norm.fit([x])
    restored = MaxScale(2)
    restored.load_state_dict(norm.state_dict())
    out = restored(torch.as_tensor(x, dtype=torch.float32))
    assert restored.fitted and float(out[:, 0].max()) == pytest.approx(1.0) and float(out[:, 1].abs().max()) == 0


# -- the datamodule -----------------------------------------------------------------------------------------------
def test_datamodule_forwards_its_unknown_keys_to_the_reader(tmp_path):
    dm = DataModule(reader=Npz, path=str(write(tmp_path / "a.npz", 20)), features=3)
    assert dm.reader.features == 3
    with pytest.raises(SciMLError, match="data.featurs: unknown key for Npz"):
        DataModule(reader=Npz, featurs=3)
    params = DataModule.config_parameters({"reader": f"{__name__}.Npz"})
    assert "features" in params and "batch_size" in params


def test_datamodule_splits_by_group_and_fits_statistics_on_training_rows(tmp_path):
    groups = np.repeat(np.arange(10), 3)
    path = write(tmp_path / "a.npz", 30, groups=groups)
    dm = DataModule(reader=Npz, path=str(path), group_by="g", val_size=2, test_size=2, split_order="last",
                    normalize="standard", batch_size=4)
    dm.setup("fit")
    assert dm.rows["test"].tolist() == list(range(24, 30)) and dm.rows["val"].tolist() == list(range(18, 24))
    assert np.allclose(dm.normalizer.mean.numpy(), np.arange(18).mean() * np.array([1, 10, -2]), rtol=1e-6)
    batches = list(dm.train_dataloader())
    assert sum(len(b["x"]) for b in batches) == 18
    first_epoch = torch.cat([b["index"] for b in batches])
    again = torch.cat([b["index"] for b in dm.train_dataloader()])
    assert torch.equal(first_epoch, again), "the order is a function of (seed, epoch)"
    dm._position = lambda: (1, 0)  # the loader asks for the epoch when an epoch starts
    assert not torch.equal(torch.cat([b["index"] for b in dm.train_dataloader()]), first_epoch)
    state = dm.state_dict()
    fresh = DataModule(reader=Npz, test_path=str(path), normalize="standard")
    fresh.load_state_dict(state)
    fresh.setup("test")
    batch = fresh.on_after_batch_transfer(next(iter(fresh.test_dataloader())), 0)
    expected = (np.arange(batch["x"].shape[0])[:, None] * [1, 10, -2] - dm.normalizer.mean.numpy()) / \
        dm.normalizer.std.numpy()
    assert np.allclose(batch["x"].numpy(), expected, atol=1e-5)


def test_predict_parts_merge_per_file_in_row_order(tmp_path):
    files = [write(tmp_path / "a.npz", 5), write(tmp_path / "b.npz", 4, start=5, labels=False)]
    store = RowStore(Npz(), files)
    parts_dir = tmp_path / "parts"
    parts_dir.mkdir()
    for rank, index in enumerate([np.array([8, 0, 6, 2]), np.array([1, 3, 5]), np.array([7, 4])]):
        np.savez(parts_dir / f"rank{rank}.npz", index=index, score=index * 10.0)
    out = tmp_path / "out"
    written = merge_parts(sorted(parts_dir.glob("*.npz")), store, out)
    assert [p.name for p in written] == ["a.npz", "b.npz"]
    a, b = np.load(out / "a.npz"), np.load(out / "b.npz")
    assert a["row"].tolist() == [0, 1, 2, 3, 4] and a["score"].tolist() == [0, 10, 20, 30, 40]
    assert b["row"].tolist() == [0, 1, 2, 3] and b["score"].tolist() == [50, 60, 70, 80]


def test_empty_validation_split_is_refused_before_training(tmp_path):
    dm = DataModule(reader=Npz, path=str(write(tmp_path / "a.npz", 10)), val_size=0, test_size=0.2)
    with pytest.raises(SciMLError, match="data.val_size=0: the validation split of .* is empty"):
        dm.setup("fit")


def test_streaming_reads_whole_chunks_and_visits_every_training_row_once_per_epoch(tmp_path):
    files = [write(tmp_path / "a.npz", 230), write(tmp_path / "b.npz", 170, start=230)]
    held = DataModule(reader=Npz, path=[str(f) for f in files], normalize="standard", batch_size=16)
    held.setup("fit")
    streamed = DataModule(reader=Npz, path=[str(f) for f in files], normalize="standard", batch_size=16,
                          max_memory_gb=1e-6, stream_chunk_rows=20, shuffle_buffer_mb=3 * 20 * 12 / 2**20)
    streamed.setup("fit")
    assert streamed.streamed and not streamed.store.in_memory and not held.streamed
    assert np.array_equal(np.sort(streamed.rows["train"]), np.sort(held.rows["train"]))
    assert torch.allclose(streamed.normalizer.mean, held.normalizer.mean)
    epochs = []
    for epoch in (0, 1, 0):
        streamed._position = lambda e=epoch: (e, 0)
        batches = list(streamed.train_dataloader())
        index = torch.cat([b["index"] for b in batches]).numpy()
        assert np.array_equal(np.sort(index), np.sort(streamed.rows["train"])), "every row once per epoch"
        assert len(batches) == len(streamed.train_dataloader())
        for b in batches:  # a batch mixes at most 3 chunks (the buffer), never the whole split
            chunks = {(int(i) // 230, (int(i) - 230 * (int(i) >= 230)) // 20) for i in b["index"]}
            assert len(chunks) <= 3
        epochs.append(index)
    assert not np.array_equal(epochs[0], epochs[1]) and np.array_equal(epochs[0], epochs[2])


def test_streamed_shards_are_equal_and_disjoint_across_ranks(tmp_path):
    from sciml.data.stream import chunks_of, shard_chunks

    store = RowStore(Npz(), [write(tmp_path / "a.npz", 95)])
    chunks = chunks_of(store, np.arange(95), 10)
    assert [len(c) for c in chunks] == [10] * 9 + [5]
    shards = [np.concatenate(shard_chunks(chunks, r, 2)) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 45 and not set(shards[0]) & set(shards[1])


def test_streamed_ranks_run_the_same_number_of_batches(tmp_path):
    """Equal rows are not enough for DDP: with chunks of uneven sizes, batches cut per buffer gave one rank a batch
    more than the other, and the 2-rank run hung in a collective until gloo's 30-minute timeout."""
    from sciml.data.stream import ChunkStream, chunks_of, shard_chunks

    store = RowStore(Npz(), [write(tmp_path / "a.npz", 37), write(tmp_path / "b.npz", 58)])
    store.load(np.arange(95), 1e9)
    chunks = chunks_of(store, np.arange(95), 10)  # files cut into chunks of 10, 7 and 8 rows
    counts = {}
    for rank in range(2):
        stream = ChunkStream(store, shard_chunks(chunks, rank, 2), batch_size=4, buffer_chunks=2, seed=0)
        for epoch in range(3):
            stream.set_epoch(epoch)
            batches = [b["index"].numpy() for b in stream]
            assert len(batches) == len(stream) == -(-stream.rows // 4)
            assert all(len(b) == 4 for b in batches[:-1])
            assert np.array_equal(np.sort(np.concatenate(batches)), np.sort(np.concatenate(stream.chunks)))
            counts.setdefault(epoch, set()).add(len(batches))
    assert all(len(c) == 1 for c in counts.values()), counts


def test_a_sample_of_training_rows_for_the_overtraining_check(tmp_path):
    """The overtraining check scores as many training rows as test rows: a seeded subset of this rank's training
    rows, not a pass over all of them (10 GiB streamed at scale)."""
    dm = DataModule(reader=Npz, path=str(write(tmp_path / "a.npz", 100)), val_size=0.1, test_size=0.1)
    dm.setup("fit")
    rows = [np.concatenate([b["index"].numpy() for b in dm.train_sample_dataloader(n)]) for n in (30, 30, 1000)]
    assert len(rows[0]) == 30 and np.array_equal(rows[0], rows[1]) and np.all(np.diff(rows[0]) > 0)
    assert set(rows[0]) < set(dm.rows["train"].tolist()) and np.array_equal(rows[2], np.sort(dm.rows["train"]))


# -- data larger than memory: bounded buffers, open files and copies ------------------------------------------
def test_streaming_buffer_is_a_quarter_of_the_memory_budget_and_kept_in_checkpoints(tmp_path):
    """Under a memory budget smaller than the configured shuffle buffer, a buffer holds at most a quarter of the
    budget (its read, its batches queued, headroom); the choice travels in checkpoints, since the order depends on
    it."""
    from types import SimpleNamespace

    path = [str(write(tmp_path / "a.npz", 1000))]  # 12 kB of rows, more than the budget
    budget_gb = 4 * 5 * 20 * 12 / 2**30  # a quarter of it: 5 chunks of 20 rows of 12 bytes
    dm = DataModule(reader=Npz, path=path, max_memory_gb=budget_gb, stream_chunk_rows=20, shuffle_buffer_mb=256,
                    num_workers=0)
    dm.setup("fit")
    assert dm.streamed and dm._streaming_buffer() == 5
    stream = dm.train_dataloader().dataset
    assert stream.buffer_chunks == 5
    dm.trainer = SimpleNamespace(state=SimpleNamespace(fn="fit"), current_epoch=0,
                                 fit_loop=SimpleNamespace(epoch_loop=SimpleNamespace(
                                     batch_progress=SimpleNamespace(current=SimpleNamespace(processed=3)))))
    state = dm.state_dict()
    assert state["buffer_chunks"] == 5
    resumed = DataModule(reader=Npz, path=path, max_memory_gb=10 * budget_gb, stream_chunk_rows=20,
                         shuffle_buffer_mb=256, num_workers=0)
    resumed.trainer = dm.trainer
    resumed.load_state_dict(state)
    resumed.trainer = None
    resumed.setup("fit")
    assert resumed._streaming_buffer() == 5, "a resumed run keeps the buffer (and so the order) it started with"


def test_num_workers_auto_reads_streamed_rows_in_a_worker_only_where_a_cpu_is_spare(tmp_path, monkeypatch):
    """auto: a reading worker for streamed rows when the rank has a CPU its torch threads leave free, none when the
    threads take them all (the worker would slow them) and none for rows held in memory."""
    import sciml.data.module as module
    from sciml.resources import CPUs

    monkeypatch.setattr(module, "usable_cpus", lambda: CPUs(4, {"affinity": 4}))
    path = [str(write(tmp_path / "a.npz", 400))]
    streamed = DataModule(reader=Npz, path=path, max_memory_gb=1e-6, stream_chunk_rows=20)
    held = DataModule(reader=Npz, path=path)
    for dm in (streamed, held):
        dm.setup("fit")
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        loader = streamed.train_dataloader()
        assert loader.num_workers == 1 and loader.prefetch_factor >= 2
        assert streamed._workers(streamed=True)[1] == "a spare CPU: 4 usable CPU(s) / 1 local rank(s), 3 torch thread(s)"
        torch.set_num_threads(4)
        assert streamed.train_dataloader().num_workers == 0
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two ranks on the node: 2 CPUs each
        torch.set_num_threads(1)
        assert streamed.train_dataloader().num_workers == 1
        torch.set_num_threads(2)
        assert streamed.train_dataloader().num_workers == 0
    finally:
        torch.set_num_threads(threads)
    assert held.train_dataloader().num_workers == 0 and streamed.val_dataloader().num_workers == 0
    assert DataModule(reader=Npz, path=path, num_workers=2)._workers(streamed=True) == (2, "data.num_workers")
    assert len(torch.cat([b["index"] for b in loader])) == len(streamed.rows["train"])
    with pytest.raises(SciMLError, match="data.num_workers: expected auto or a number >= 0, got 'two'"):
        DataModule(reader=Npz, path=path, num_workers="two")


def test_open_files_are_bounded_least_recently_used_closed_first():
    class Handle:
        def __init__(self, path):
            self.path, self.closed = path, False

        def close(self):
            self.closed = True

    reader = Npz()
    reader.max_open_files = 2
    a, b = reader.handle(Path("a"), Handle), reader.handle(Path("b"), Handle)
    assert reader.handle(Path("a"), Handle) is a  # a is now the most recently used
    c = reader.handle(Path("c"), Handle)
    assert b.closed and not a.closed and not c.closed
    assert reader.handle(Path("b"), Handle) is not b and a.closed  # reopened; a was the oldest


def test_rows_of_several_files_are_gathered_into_one_array_or_a_list_when_shapes_differ(tmp_path):
    @dataclass
    class Volumes(Npz):
        def read(self, info, rows):
            size = 2 if info.path.stem == "a" else 3
            return {"x": np.stack([np.full((1, size), r, np.float32) for r in rows]),
                    "y": np.asarray(rows) % 2}

    files = [write(tmp_path / "a.npz", 3), write(tmp_path / "b.npz", 2), write(tmp_path / "c.npz", 2)]
    same = RowStore(Npz(), files)
    batch = same.read(np.array([0, 3, 4, 6]))
    assert isinstance(batch["x"], np.ndarray) and batch["x"][:, 0].tolist() == [0, 0, 1, 1]
    mixed = RowStore(Volumes(), files)._read_sorted(np.array([1, 2, 3, 5]))
    assert [x.shape for x in mixed["x"]] == [(1, 2), (1, 2), (1, 3), (1, 3)]
    assert [float(x[0, 0]) for x in mixed["x"]] == [1, 2, 0, 0] and mixed["y"].tolist() == [1, 0, 0, 0]


def test_class_counts_of_streamed_rows_read_labels_only(tmp_path):
    @dataclass
    class LabelsApart(Npz):
        def read_labels(self, info, rows):
            self.label_reads = getattr(self, "label_reads", 0) + 1
            with np.load(info.path) as f:
                return f["y"][rows]

    files = [str(write(tmp_path / "a.npz", 230)), str(write(tmp_path / "b.npz", 170, start=230))]
    held = DataModule(reader=Npz, path=files)
    streamed = DataModule(reader=LabelsApart, path=files, max_memory_gb=1e-6)
    for dm in (held, streamed):
        dm.setup("fit")
    reads = getattr(streamed.reader, "reads", 0)
    assert np.array_equal(streamed.class_frequencies(), held.class_frequencies())
    assert getattr(streamed.reader, "reads", 0) == reads and streamed.reader.label_reads >= 2, "labels read without inputs"


def test_streamed_chunks_group_small_file_chunks_to_a_few_megabytes(tmp_path):
    from sciml.data.stream import CHUNK_BYTES, chunks_of

    @dataclass
    class Frames(Npz):
        features: int = 2**18  # 1 MiB rows, stored one row per file chunk (one time step per chunk, as netCDF)

        def open(self, path):
            info = super().open(path)
            info.meta["chunk_rows"] = 1
            return info

    store = RowStore(Frames(), [write(tmp_path / "a.npz", 9)])
    assert CHUNK_BYTES == 2 * 2**20 and [len(c) for c in chunks_of(store, np.arange(9), None)] == [2] * 4 + [1]
    assert [len(c) for c in chunks_of(store, np.arange(9), 4)] == [4, 4, 1]
