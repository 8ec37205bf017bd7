"""The core's datamodule: everything a domain needs from its data, once, around a plugin's `Reader`.

It finds the files (`path`, `test_path`: a file, folder, glob or list; null = the plugin's embedded sample), splits
the rows with a seed (by fraction or count, by groups such as days or cases, or in time order), gives each DDP rank
its own shard (equal shards for training and validation, an exact partition for test and prediction, so metrics
count every row once), keeps a rank's rows in memory when they fit the memory the process may use (otherwise reads
them per batch), fits the input normalisation once on the training rows (kept in checkpoints), hands the input
shape to the model config, and serves batches whole. Files without labels are predicted, not scored.

Keys it does not own are the reader's options (`data.weight_key=null` sets the reader's `weight_key`).
"""
from __future__ import annotations

import inspect
import logging
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch
from hydra.utils import get_class
from torch.utils.data import DataLoader, Dataset

from sciml.data.datasets import Rows, keep_batch
from sciml.data.normalize import NORMALIZERS, Normalizer
from sciml.data.reader import Reader
from sciml.data.sampler import EpochLoader, EpochShuffle
from sciml.data.splits import shard, split
from sciml.data.stream import ChunkStream, chunks_of, shard_chunks, worker_init
from sciml.errors import SciMLError
from sciml.resources import local_ranks, usable_cpus, usable_memory

log = logging.getLogger(__name__)
STAGES = ("train", "val", "test")


def memory_budget_bytes(devices=None) -> float:
    """Bytes this process may fill with data rows: half of what it may really use (its cgroup limit or the memory
    available, whichever is smaller), divided among the ranks on the node; the other half is headroom for the
    network, activations, loaders and Python."""
    return 0.5 * usable_memory(local_ranks(devices)[0]).bytes


class DataModule(pl.LightningDataModule):
    """Args (`data.` keys):
        reader: the plugin's `Reader` class (dotted path); the keys below not listed here are its options.
        path: training data (file, folder, glob or list); null = the reader's embedded sample.
        test_path: files that replace the test split (and are predicted); with it, `path` is split into training
            and validation only, and a test-only or predict run opens only these files.
        batch_size: per device. eval_batch_size: for validation, test and prediction (null: batch_size; rows of
            different shapes are evaluated one per batch).
        val_size, test_size: a fraction in [0, 1) or a count, of rows or (with group_by) of groups.
        group_by: null (rows) or a group key of the reader ("file" always exists): whole groups go to one split.
        split_order: random (seeded by split_seed) or last (sorted; the last groups test, those before validate).
        test_groups: names of the test groups (with group_by), e.g. one day to leave out.
        train_split: rest (train on what is not val or test) or all (train on every row: tiny demos only).
        normalize: none, max, standard, or a `Normalizer` class (dotted path); fitted on the training rows.
        max_memory_gb: auto (from the memory this process may use) or a number; a rank's rows beyond it are not held:
            training rows are streamed (chunk-aware shuffling, sciml/data/stream.py), others read per batch.
        stream_chunk_rows: rows per chunk when streaming (null: the file's own chunks, grouped to at least 2 MB).
        shuffle_buffer_mb: rows shuffled together when streaming (a buffer of whole chunks); at most a quarter of
            the memory budget, so that a buffer being read, one being trained on and the loader's queue fit.
        num_workers: DataLoader worker processes (reading and decoding in parallel); auto: for streamed training
            rows one worker (the next buffer is read while the current one trains) where a CPU is spare (training on
            a GPU, or fewer torch threads than the rank's CPUs), none where the training threads take every CPU (a
            worker would slow them more than reading in the loop does); none for rows held in memory.
        seed: the training order (a function of seed and epoch, so a resumed run replays it exactly).
    """

    def __init__(self, reader: str | type[Reader], path=None, test_path=None, batch_size: int = 64,
                 eval_batch_size: int | None = None, val_size: float = 0.15, test_size: float = 0.15,
                 group_by: str | None = None, split_order: str = "random", test_groups: Sequence[str] | None = None,
                 train_split: str = "rest", split_seed: int = 0, normalize: str = "none",
                 max_memory_gb: float | str = "auto", stream_chunk_rows: int | None = None,
                 shuffle_buffer_mb: float = 256, num_workers: int | str = "auto", seed: int = 0, **options):
        super().__init__()
        cls = get_class(reader) if isinstance(reader, str) else reader
        if not (isinstance(cls, type) and issubclass(cls, Reader)):
            raise SciMLError(f"data.reader: {reader} is not a sciml.data.Reader")
        accepted = set(inspect.signature(cls).parameters)
        unknown = sorted(set(options) - accepted)
        if unknown:
            raise SciMLError(f"data.{unknown[0]}: unknown key for {cls.__name__}; data keys are "
                             f"{', '.join(sorted(accepted | set(_own_parameters(type(self)))))}")
        self.reader: Reader = cls(**options)
        if batch_size < 1 or (eval_batch_size is not None and eval_batch_size < 1):
            raise SciMLError(f"data.batch_size={batch_size}, data.eval_batch_size={eval_batch_size}: must be >= 1")
        if test_path and test_groups:  # the named groups would leave training without being tested
            raise SciMLError("data.test_groups and data.test_path both choose the test data: give one of them")
        if train_split not in ("rest", "all"):
            raise SciMLError(f"data.train_split: '{train_split}' is not one of rest, all")
        if max_memory_gb != "auto" and not isinstance(max_memory_gb, (int, float)):
            raise SciMLError(f"data.max_memory_gb: expected auto or a number of GiB, got {max_memory_gb!r}")
        if num_workers != "auto" and (isinstance(num_workers, bool) or not isinstance(num_workers, int)
                                      or num_workers < 0):
            raise SciMLError(f"data.num_workers: expected auto or a number >= 0, got {num_workers!r}")
        self.path, self.test_path = path, test_path
        self.batch_size, self.eval_batch_size, self.num_workers = batch_size, eval_batch_size, num_workers
        self.val_size, self.test_size = val_size, (0 if test_path else test_size)
        self.group_by, self.split_order, self.test_groups = group_by, split_order, test_groups
        self.train_split, self.split_seed, self.seed = train_split, split_seed, seed
        self.normalize, self.max_memory_gb = normalize, max_memory_gb
        self.stream_chunk_rows, self.shuffle_buffer_mb = stream_chunk_rows, shuffle_buffer_mb
        self.streamed = False   # training rows read chunk by chunk (they do not fit in memory)
        self._buffer_chunks: int | None = None  # chunks per streaming buffer: fixed once, kept in checkpoints
        self._train_chunks: list[np.ndarray] = []  # this rank's streamed training chunks
        self.store = None       # the rows of `path`
        self.test_store = None  # the rows tested and predicted (`test_path`, or `store`)
        self.split_rows: dict[str, np.ndarray] = {}  # the rows of each split of `path`, all ranks' (not sharded)
        self.rows: dict[str, np.ndarray] = {}  # this rank's rows of each split (training: the equal shard)
        self.train_rows = np.zeros(0, dtype=np.int64)  # this rank's share of every training row (see setup)
        self.normalizer: Normalizer | None = None
        self._normalizer_state: dict | None = None
        self._resume_at: tuple[int, int] | None = None

    @classmethod
    def config_parameters(cls, node: Mapping) -> dict[str, inspect.Parameter]:
        """The keys `data:` accepts: the module's own and the reader's (for config checks before any data is read)."""
        params = _own_parameters(cls)
        reader = node.get("reader")
        if isinstance(reader, str):
            params |= _resolved(get_class(reader))
        return params

    # -- files and shapes -----------------------------------------------------------------------------------------
    def _open(self, path, key: str):
        from sciml.data.store import RowStore

        if path is None:
            path = self.reader.default_path()
            if path is None:
                raise SciMLError(f"{key}: no files given and {type(self.reader).__name__} has no embedded sample")
        return RowStore(self.reader, self.reader.find(path, key))

    def prepare(self, stage: str = "fit") -> None:
        """Open (validate) the files this stage needs, without reading rows: called before the model is built, so
        that the data's shapes reach the model config."""
        if self.store is None and (stage in ("fit", "validate") or not self.test_path):
            self.store = self._open(self.path, "data.path")
            if stage in ("fit", "validate") and not self.store.labels:
                unlabelled = next(i.path for i in self.store.infos if not i.labels)
                raise SciMLError(f"data.path: {unlabelled} has no labels; training needs them")
        if self.test_store is None:
            self.test_store = self._open(self.test_path, "data.test_path") if self.test_path else self.store
            fixed = type(self.reader).fixed_dims  # the dimensions a trained network is bound to
            if self.store is not None and self.test_store is not self.store and \
                    None not in (self.store.shape, self.test_store.shape) and \
                    self.store.shape[:fixed] != self.test_store.shape[:fixed]:
                raise SciMLError(f"data.test_path: rows of shape {self.test_store.shape}, training data "
                                 f"{self.store.shape}")

    @property
    def input_shape(self) -> tuple[int, ...] | None:
        """One row's input shape, e.g. (C, H, W); None before `prepare` or when rows differ in shape."""
        store = self.store or self.test_store
        return None if store is None else store.shape

    def has_labels(self, split: str = "test") -> bool:
        store = self.test_store if split == "test" else self.store
        return store is not None and store.labels

    # -- splits, shards, memory, statistics ----------------------------------------------------------------------------
    def _rank_and_world(self) -> tuple[int, int]:
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return 0, 1
        # Lightning's DistributedSampler would split each rank's shard again (private attribute: no public accessor)
        if getattr(trainer._accelerator_connector, "use_distributed_sampler", False):
            raise SciMLError("sciml datamodules give each rank its own shard: build the Trainer with "
                             "use_distributed_sampler=False (sciml.run does)")
        return trainer.global_rank, trainer.world_size

    def setup(self, stage: str) -> None:
        """Split (seeded), keep this rank's shards, hold them in memory when they fit (otherwise stream the training
        rows chunk by chunk), fit the normalisation."""
        self.prepare(stage)
        rank, world = self._rank_and_world()
        if self.store is not None and "train" not in self.rows:
            groups = self.store.groups(self.group_by) if self.group_by else None
            where = str(self.path or self.reader.default_path())
            parts = split(len(self.store), self.val_size, self.test_size, self.split_seed, groups,
                          self.split_order, self.test_groups, where)
            if self.train_split == "all":
                log.warning("data.train_split=all: validation and test rows are also trained on; their scores are "
                            "not held-out estimates")
                parts["train"] = np.arange(len(self.store))
            if stage == "fit" and len(parts["train"]) < world:
                raise SciMLError(f"data.path: {len(parts['train'])} training rows in {where}, fewer than the "
                                 f"{world} ranks")
            self.split_rows = {k: v for k, v in parts.items() if k != "test" or not self.test_path}
            validates = getattr(self.trainer, "limit_val_batches", 1) != 0
            if stage == "fit" and len(parts["val"]) == 0 and validates:
                raise SciMLError(f"data.val_size={self.val_size}: the validation split of {where} is empty; "
                                 "training selects its best checkpoint on it (+trainer.limit_val_batches=0 "
                                 "trains without validation)")
            own = sum(len(parts[k]) for k in ("train", "val", "test")
                      if k != "test" or self.test_store is self.store) / world
            self.streamed = own * self.store.row_bytes() > self._budget()
            # `train_rows`: this rank's share of every training row (the ranks' shares hold each once): statistics,
            # and plugins that draw their own samples. rows["train"]: cut to equal shards, because training and
            # validation run through DDP's wrapped model, whose collectives need the same number of batches on
            # every rank.
            if self.streamed:
                chunks = chunks_of(self.store, parts["train"], self.stream_chunk_rows)
                self._train_chunks = shard_chunks(chunks, rank, world)
                self.train_rows = np.concatenate(chunks[rank::world])
                self.rows["train"] = np.concatenate(self._train_chunks)
            else:
                dealt = self.deal_train_rows(parts["train"])
                self.train_rows = shard(dealt, rank, world, equal=False)
                self.rows["train"] = shard(dealt, rank, world, equal=True)
            self.rows["val"] = shard(parts["val"], rank, world, equal=True)
            if not self.test_path:  # test and predict need no equal shards: an exact partition
                self.rows["test"] = shard(parts["test"], rank, world, equal=False)
        if "test" not in self.rows and self.test_store is not None and self.test_store is not self.store:
            self.rows["test"] = shard(np.arange(len(self.test_store)), rank, world, equal=False)
        self._hold_in_memory(stage)
        if stage == "fit":
            self._fit_normalizer()
        where = f" (rank {rank} of {world})" if world > 1 else ""
        log.info("data%s: %s", where, ", ".join(f"{k} {len(v)}" for k, v in self.rows.items()))

    def _budget(self) -> float:
        if self.max_memory_gb == "auto":
            return memory_budget_bytes(getattr(self.trainer, "num_devices", None))
        return float(self.max_memory_gb) * 2**30

    def _hold_in_memory(self, stage: str) -> None:
        budget = self._budget()
        # a test-only or predict run needs only the test rows (not a large training set's)
        needed = ("train", "val", "test") if stage == "fit" else ("val",) if stage == "validate" else ("test",)
        for store, splits in ((self.store, needed), (self.test_store, ("test",))):
            if store is None or store.placed:
                continue
            wanted = [self.train_rows if s == "train" else self.rows[s] for s in splits
                      if s in self.rows and (s != "test" or store is self.test_store)]
            if not wanted:
                continue
            rows = np.unique(np.concatenate(wanted))
            held = not (store is self.store and self.streamed) and store.load(rows, budget)
            store.placed = True
            how = "held in memory" if held else "streamed in chunks" if store is self.store and self.streamed \
                else "read per batch"
            log.info("%d rows of %d file(s): %s (%.2f GiB; budget %.2f GiB%s)", len(rows), len(store.files), how,
                     len(rows) * store.row_bytes() / 2**30, budget / 2**30,
                     " from data.max_memory_gb" if self.max_memory_gb != "auto" else
                     " from this process's memory limit")

    def _make_normalizer(self) -> Normalizer:
        kind = self.normalize
        cls = NORMALIZERS.get(kind) if kind in NORMALIZERS else get_class(kind) if "." in str(kind) else None
        if cls is None or not issubclass(cls, Normalizer):
            raise SciMLError(f"data.normalize: '{kind}' is not one of {', '.join(NORMALIZERS)} or a Normalizer class")
        shape = self.input_shape
        return cls(shape[0] if shape else 1)

    def _ensure_normalizer(self) -> Normalizer:
        """The normaliser, with the checkpoint's statistics when there are any. Built outside inference mode:
        its buffers are updated in place later (a fit, a checkpoint restored after a test)."""
        if self.normalizer is None:
            with torch.inference_mode(False):
                self.normalizer = self._make_normalizer()
        if self._normalizer_state:
            with torch.inference_mode(False):
                self.normalizer.load_state_dict({k: torch.as_tensor(v).clone()
                                                 for k, v in self._normalizer_state.items()})
            self._normalizer_state = None
        return self.normalizer

    def _fit_normalizer(self) -> None:
        self._ensure_normalizer()
        if self.normalizer.fitted:
            return
        rows = np.sort(self.train_rows)
        block = max(1, int(min(64 * 2**20, self._budget() / 8) // self.store.row_bytes()))  # rows per read
        blocks = (self.store.read(rows[i:i + block])["x"] for i in range(0, len(rows), block))
        self.normalizer.fit(blocks, self._reduce)
        log.info("normalisation (%s) fitted on %d training rows: %s", self.normalize, len(rows),
                 {k: np.round(v.numpy(), 4).tolist() for k, v in self.normalizer.state_dict().items()})

    def _reduce(self, value: np.ndarray, op: str) -> np.ndarray:
        """Sum or maximum of `value` over all ranks (every rank calls it)."""
        trainer = self.trainer
        if trainer is None or trainer.world_size == 1:
            return value
        tensor = torch.as_tensor(value, dtype=torch.float64, device=trainer.strategy.root_device)
        return trainer.strategy.reduce(tensor, reduce_op=op).cpu().numpy()

    def class_frequencies(self, rows: np.ndarray | None = None) -> np.ndarray:
        """Label counts per class over the training rows (for class weights), or over `rows` of them (e.g. the
        labelled ones of a semi-supervised run): each rank counts those of its own share, read in blocks, and the
        counts are summed over the ranks."""
        rows = np.sort(self.train_rows if rows is None else np.intersect1d(self.train_rows, rows))
        counts = np.zeros(0)
        for i in range(0, len(rows), 256):
            y = self.store.read_labels(rows[i:i + 256]).astype(np.int64)
            found = np.bincount(y)
            counts = np.pad(counts, (0, max(0, len(found) - len(counts))))
            counts[:len(found)] += found
        # ranks may have seen different highest classes (or no rows): agree on the length before summing
        classes = int(self._reduce(np.array([len(counts)], dtype=np.float64), "max")[0])
        return self._reduce(np.pad(counts, (0, classes - len(counts))), "sum")

    # -- loaders ----------------------------------------------------------------------------------------------
    def deal_train_rows(self, rows: np.ndarray) -> np.ndarray:
        """The training rows (all ranks') in the order they are dealt to the ranks: every world-th row from the
        rank's offset. Plugins may reorder them, e.g. labelled rows first so that each rank gets its share."""
        return rows

    def train_dataset(self, rows: np.ndarray) -> Dataset:
        """The training rows as a dataset (plugins may add per-row keys, e.g. `labeled`)."""
        return Rows(self.store, rows)

    def _workers(self, streamed: bool = False) -> tuple[int, str]:
        """DataLoader workers and why: `num_workers`, or with auto one for the streamed training rows where a CPU is
        spare, none otherwise: on a 2-core node whose two training threads used both cores, a reading worker took
        a core from them (HEP streamed at 0.78x of in memory with one, 1.08x without; docs/performance.md)."""
        if self.num_workers != "auto":
            return int(self.num_workers), "data.num_workers"
        if not streamed:
            return 0, "rows held in memory"
        trainer = self.trainer
        if trainer is not None and trainer.strategy.root_device.type != "cpu":
            return 1, "training on an accelerator: host CPUs are spare"
        cpus = usable_cpus().count
        ranks, _ = local_ranks(trainer.num_devices if trainer is not None else 1)
        spare = cpus // ranks - torch.get_num_threads()
        why = f"{cpus} usable CPU(s) / {ranks} local rank(s), {torch.get_num_threads()} torch thread(s)"
        return (1, f"a spare CPU: {why}") if spare >= 1 else (0, f"no spare CPU: {why}")

    def _loader(self, dataset: Dataset, batch_size: int, sampler=None) -> DataLoader:
        workers, _ = self._workers()
        return DataLoader(dataset, batch_size=batch_size, sampler=sampler, collate_fn=keep_batch,
                          num_workers=workers, persistent_workers=workers > 0, pin_memory=self._pin_memory())

    def _pin_memory(self) -> bool:
        trainer = self.trainer
        return bool(trainer is not None and trainer.strategy.root_device.type == "cuda")

    def _eval_batch_size(self, store) -> int:
        if store is not None and store.shape is None:
            return 1
        return self.eval_batch_size or self.batch_size

    def _position(self) -> tuple[int, int]:
        """(epoch, training batches of it already done) for the iterator being created: once after a restore, where
        the checkpoint was saved; otherwise the trainer's epoch from its start."""
        if self._resume_at is not None:
            position, self._resume_at = self._resume_at, None
            return position
        return getattr(self.trainer, "current_epoch", 0), 0

    def _chunk_rows(self) -> int:
        """Rows of this rank's largest streamed chunk."""
        return max(len(c) for c in self._train_chunks)

    def _streaming_buffer(self) -> int:
        """Chunks per streaming buffer: `shuffle_buffer_mb`, at most a quarter of the memory budget (a buffer being
        read, its copy while it is cut into batches, the batches queued for training, and headroom). Decided once
        per run and kept in checkpoints: the training order depends on it, and a resumed run replays that order."""
        if self._buffer_chunks is None:
            chunk_bytes = self.store.row_bytes() * self._chunk_rows()
            limit = min(self.shuffle_buffer_mb * 2**20, self._budget() / 4)
            self._buffer_chunks = max(1, int(limit // chunk_bytes))
        return self._buffer_chunks

    def train_dataloader(self):
        if self.streamed:
            chunks = self._streaming_buffer()
            stream = ChunkStream(self.store, self._train_chunks, self.batch_size, chunks, self.seed)
            workers, why = self._workers(streamed=True)
            rows = chunks * self._chunk_rows()
            # with workers, the queue holds a buffer's batches: the next buffer is read while this one trains
            prefetch = max(2, -(-rows // self.batch_size)) if workers else None
            log.info("streaming: buffers of %d chunk(s), up to %d rows (%.0f MB), %d loader worker(s) (%s)%s", chunks,
                     rows, rows * self.store.row_bytes() / 2**20, workers, why,
                     f", {prefetch} batches prefetched" if workers else "")
            # workers re-created each epoch: they take the epoch's order with them
            return EpochLoader(stream, batch_size=None, num_workers=workers, worker_init_fn=worker_init,
                               prefetch_factor=prefetch, pin_memory=self._pin_memory(), position=self._position)
        dataset = self.train_dataset(self.rows["train"])
        workers, _ = self._workers()
        return EpochLoader(dataset, batch_size=self.batch_size, sampler=EpochShuffle(len(dataset), self.seed),
                           collate_fn=keep_batch, num_workers=workers, persistent_workers=workers > 0,
                           pin_memory=self._pin_memory(), position=self._position)

    def val_dataloader(self):
        return self._loader(Rows(self.store, self.rows["val"]), self._eval_batch_size(self.store))

    def test_dataloader(self):
        return self._loader(Rows(self.test_store, self.rows.get("test", np.zeros(0, np.int64))),
                            self._eval_batch_size(self.test_store))

    def train_sample_dataloader(self, rows: int, seed: int = 0):
        """At most `rows` of this rank's training rows, a seeded random subset read in row order like the test rows
        (no augmentation): for checks that compare the model on training and test data (the overtraining check)
        without a pass over a training set of any size."""
        train = self.rows.get("train")
        if self.store is None or train is None:
            return None
        if len(train) > rows:
            train = np.sort(np.random.default_rng([self.seed, seed]).choice(train, rows, replace=False))
        return self._loader(Rows(self.store, train), self._eval_batch_size(self.store))

    def predict_dataloader(self):
        return self.test_dataloader()

    # -- on the device ----------------------------------------------------------------------------------------
    def on_after_batch_transfer(self, batch, dataloader_idx):
        self._ensure_normalizer()
        if not self.normalizer.fitted:
            raise SciMLError("no input normalisation statistics: train first, or test from a checkpoint of a "
                             "trained run")
        self.normalizer.to(batch["x"].device)
        batch["x"] = self.normalizer(batch["x"])
        y = batch.get("y")
        if y is not None and not y.is_floating_point() and y.dtype != torch.int64:
            batch["y"] = y.long()  # class labels travel compact (uint8 pixel masks), losses index with int64
        return batch

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_dict(self):
        state = (self._normalizer_state or {}) if self.normalizer is None else \
            {k: v.cpu() for k, v in self.normalizer.state_dict().items()}
        trainer = self.trainer
        position = [trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.processed] \
            if _fitting(trainer) else None
        return {"normalize": str(self.normalize), "normalizer": state, "position": position,
                "buffer_chunks": self._buffer_chunks}

    def load_state_dict(self, state_dict):
        if state_dict.get("position") is not None and _fitting(self.trainer):
            self._resume_at = tuple(state_dict["position"])  # where the training order resumes (EpochLoader)
        self._normalizer_state = state_dict.get("normalizer") or None
        if state_dict.get("buffer_chunks") and _fitting(self.trainer):
            self._buffer_chunks = int(state_dict["buffer_chunks"])
        if self.normalizer is not None:
            self._ensure_normalizer()

    # -- predictions --------------------------------------------------------------------------------------------
    def write_predictions(self, parts: list[Path], directory: Path) -> list[Path]:
        """Merge the per-batch prediction parts of every rank and write them through the reader, one input file
        at a time (memory: one file's predictions)."""
        from sciml.data.predictions import merge_parts

        return merge_parts(parts, self.test_store, directory)

    def teardown(self, stage: str) -> None:
        self.reader.close()


def _fitting(trainer) -> bool:
    state = getattr(trainer, "state", None)
    return state is not None and state.fn == "fit"


def _resolved(function) -> dict[str, inspect.Parameter]:
    """A callable's parameters with their annotations evaluated (modules use `from __future__ import annotations`),
    so that config checks compare values against types, not strings."""
    try:
        hints = typing.get_type_hints(function.__init__ if inspect.isclass(function) else function)
    except Exception:  # noqa: BLE001 -- unresolvable annotations: keep the signature's own
        hints = {}
    return {k: p.replace(annotation=hints.get(k, p.annotation))
            for k, p in inspect.signature(function).parameters.items()
            if k != "self" and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)}


def _own_parameters(cls: type = DataModule) -> dict[str, inspect.Parameter]:
    """The keys of `cls` and of every DataModule class it extends (a plugin's subclass passes the core's on)."""
    return {k: p for c in reversed(cls.__mro__) if issubclass(c, DataModule) for k, p in _resolved(c).items()}

