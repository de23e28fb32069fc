"""Batching a dataset held in memory as one uint8 tensor, by index.

No per-sample Python runs in the hot loop: each epoch draws one permutation (seeded by
``seed`` and the epoch, so it needs no RNG state to resume) and each batch is one
``index_select``. Under several processes every rank takes its own slice of the same
permutation.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Protocol

import torch


@dataclass
class ImageTensorDataset:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64, plus class names.

    Optional per-image facts, carried through ``subset``: ``clean_labels`` (the true labels
    when label noise was injected: ``labels`` are then the noisy ones), ``origin`` (each
    image's index in the split it was loaded from, so a subset still names its images) and
    ``files`` (``image_folder``: each image's path relative to the data directory).
    """

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    clean_labels: Optional[torch.Tensor] = None
    origin: Optional[torch.Tensor] = None
    files: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, C, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        n = self.images.shape[0]
        if self.labels.shape != (n,):
            raise ValueError(f"labels must be ({n},), got {tuple(self.labels.shape)}")
        self.labels = self.labels.long()
        for name in ("clean_labels", "origin"):
            value = getattr(self, name)
            if value is not None:
                if value.shape != (n,):
                    raise ValueError(f"{name} must be ({n},), got {tuple(value.shape)}")
                setattr(self, name, value.long())
        if self.files is not None and len(self.files) != n:
            raise ValueError(f"files must name {n} images, got {len(self.files)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return tuple(self.images.shape[1:])  # type: ignore[return-value]

    @property
    def indices(self) -> torch.Tensor:
        """Each image's index in the split it was loaded from (``origin``, else ``0..N-1``)."""
        return self.origin if self.origin is not None else torch.arange(len(self))

    def subset(self, indices: torch.Tensor) -> "ImageTensorDataset":
        """A new dataset holding the rows ``indices`` (copied, so the parent can be freed)."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        clean = self.clean_labels[indices].clone() if self.clean_labels is not None else None
        files = [self.files[i] for i in indices.tolist()] if self.files is not None else None
        return ImageTensorDataset(self.images[indices].clone(), self.labels[indices].clone(), list(self.classes),
                                  clean_labels=clean, origin=self.indices[indices].clone(), files=files)


class EpochLoader(Protocol):
    """What the trainer needs of a loader to shard it, resume it exactly and size an epoch.

    ``InMemoryLoader`` and ``SemiSupervisedLoader`` implement it; any other iterable is
    handed to Accelerate (``prepare_data_loader``) and resumed with ``skip_first_batches``.
    What it yields is not inspected by the base loop: the trainer's ``prepare_train_batch``
    turns it into what ``training_step`` takes.
    """

    def __len__(self) -> int:
        """Batches per epoch on each process."""
        ...

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select epoch ``epoch``'s order and the first batch to yield (resume)."""
        ...

    def shard(self, num_replicas: int, rank: int, device: Optional[torch.device]) -> None:
        """Point the loader at this process's shard and device."""
        ...

    def __iter__(self) -> Iterator[Any]:
        ...


class BatchIndexSampler(Protocol):
    """Produces the global batches of one epoch as index tensors (the same on every rank)."""

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """Global batches of ``global_batch_size`` indices for ``epoch``."""
        ...


class InMemoryLoader:
    """Iterate ``(images_uint8, labels)`` batches of an ``ImageTensorDataset``.

    Args:
        dataset: the data.
        batch_size: the GLOBAL batch size; each of ``num_replicas`` ranks gets
            ``batch_size // num_replicas`` samples per batch.
        shuffle: draw a new seeded permutation each epoch (training); else keep the order.
        drop_last: drop the last incomplete batch (training). For evaluation leave it False:
            the last shard is padded and ``valid_mask`` tells the padding apart, so a gather
            across ranks counts every sample exactly once.
        seed: permutation seed; epoch ``e`` uses ``seed * 1_000_003 + e``.
        num_replicas, rank: sharding across processes.
        device: move each batch there (non_blocking from pinned memory when on CUDA).
        batch_sampler: optional sampler of whole batches (e.g. P x K), replacing the
            permutation.
    """

    def __init__(
        self,
        dataset: ImageTensorDataset,
        batch_size: int,
        shuffle: bool = True,
        drop_last: bool = True,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        device: Optional[torch.device] = None,
        batch_sampler: Optional[BatchIndexSampler] = None,
    ) -> None:
        if batch_size % num_replicas:
            raise ValueError(
                f"global batch size {batch_size} is not divisible by {num_replicas} processes; "
                f"choose a batch size that is a multiple of the process count"
            )
        self.dataset = dataset
        self.batch_size = batch_size
        self.local_batch_size = batch_size // num_replicas
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.seed = seed
        self.num_replicas = num_replicas
        self.rank = rank
        self.device = device
        self.batch_sampler = batch_sampler
        self.epoch = 0
        self.start_batch = 0  # first batch to yield in the current epoch (resume)
        if device is not None and torch.device(device).type == "cuda":
            self.dataset.images = self.dataset.images.pin_memory()

    def shard(self, num_replicas: int, rank: int, device: Optional[torch.device]) -> None:
        """Point the loader at this process's shard and device (called by the trainer)."""
        if self.batch_size % num_replicas:
            raise ValueError(
                f"global batch size {self.batch_size} is not divisible by {num_replicas} processes; "
                f"choose a batch size that is a multiple of the process count"
            )
        self.num_replicas, self.rank = num_replicas, rank
        self.local_batch_size = self.batch_size // num_replicas
        if device is not None and self.device != device:
            self.device = device
            if torch.device(device).type == "cuda" and not self.dataset.images.is_pinned():
                self.dataset.images = self.dataset.images.pin_memory()

    # -- sizing -----------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on each rank."""
        if self.batch_sampler is not None:
            return len(self.batch_sampler.epoch_batches(self.epoch))
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples in the dataset (each counted once across all ranks)."""
        return len(self.dataset)

    # -- order ------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select the epoch's permutation and, when resuming, the first batch to yield."""
        self.epoch = epoch
        self.start_batch = start_batch

    def _order(self) -> torch.Tensor:
        n = len(self.dataset)
        if not self.shuffle:
            return torch.arange(n)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(n, generator=generator)

    def _global_batches(self) -> list[torch.Tensor]:
        if self.batch_sampler is not None:
            return self.batch_sampler.epoch_batches(self.epoch)
        order = self._order()
        return list(order[: len(self) * self.batch_size].split(self.batch_size)) if self.drop_last else list(
            order.split(self.batch_size)
        )

    def _local(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of a global batch, padded to equal size, and its valid mask."""
        per_rank = math.ceil(len(batch) / self.num_replicas)
        valid = torch.ones(per_rank * self.num_replicas, dtype=torch.bool)
        if len(batch) < per_rank * self.num_replicas:  # only the last eval batch
            pad = per_rank * self.num_replicas - len(batch)
            valid[len(batch):] = False
            batch = torch.cat([batch, batch[:1].expand(pad)])
        sl = slice(self.rank * per_rank, (self.rank + 1) * per_rank)
        return batch[sl], valid[sl]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for images, labels, _ in self.iter_with_mask():
            yield images, labels

    def iter_with_mask(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Like iteration, also yielding the mask of samples that are not padding."""
        batches = self._global_batches()
        start, self.start_batch = self.start_batch, 0
        for batch in batches[start:]:
            idx, valid = self._local(batch)
            images = self.dataset.images.index_select(0, idx)
            labels = self.dataset.labels.index_select(0, idx)
            if self.device is not None:
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
                valid = valid.to(self.device, non_blocking=True)
            yield images, labels, valid


def is_epoch_loader(loader: Any) -> bool:
    """Whether ``loader`` implements ``EpochLoader`` (sharding and exact resume by position)."""
    return all(callable(getattr(loader, name, None)) for name in ("set_epoch", "shard", "__len__", "__iter__"))
