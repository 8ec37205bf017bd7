"""The data contract: a plugin brings a `Reader` (open, read, write its format); the core's `DataModule` does the
rest (files, splits, shards, memory, statistics, loaders, streamed predictions). See docs/writing-a-plugin.md."""
from sciml.data.datasets import Rows, TensorDictDataset, as_tensors, keep_batch
from sciml.data.files import find_files
from sciml.data.module import DataModule
from sciml.data.normalize import Identity, MaxScale, Normalizer, Standardize
from sciml.data.predictions import PredictionWriter
from sciml.data.reader import FileInfo, Reader
from sciml.data.sampler import EpochLoader, EpochShuffle
from sciml.data.splits import shard, split
from sciml.data.store import RowStore

__all__ = ["DataModule", "EpochLoader", "EpochShuffle", "FileInfo", "Identity", "MaxScale", "Normalizer",
           "PredictionWriter",
           "Reader", "RowStore", "Rows", "Standardize", "TensorDictDataset", "as_tensors", "find_files", "keep_batch",
           "shard", "split"]
