"""Datasets held in memory as one uint8 tensor, batched by index.

``load_dataset(name, split)`` gives an ``ImageTensorDataset``; ``InMemoryLoader`` batches
it (optionally through a ``PKBatchSampler``); ``stratified_split`` and ``subset_indices``
carve holdouts and small subsets.
"""

from convrecipes.data.datasets import DATASETS, load_dataset
from convrecipes.data.loader import ImageTensorDataset, InMemoryLoader
from convrecipes.data.pk_sampler import PKBatchSampler
from convrecipes.data.semi_supervised import SemiSupervisedBatch, SemiSupervisedLoader
from convrecipes.data.splits import stratified_split, subset_indices

__all__ = [
    "DATASETS",
    "ImageTensorDataset",
    "InMemoryLoader",
    "PKBatchSampler",
    "SemiSupervisedBatch",
    "SemiSupervisedLoader",
    "load_dataset",
    "stratified_split",
    "subset_indices",
]
