"""P x K batches for metric-learning losses (triplet, center, contrastive).

Batch-hard triplet mining needs every anchor to have positives in the same batch, so each
batch holds P classes with K images each (Hermans et al., 2017, "In Defense of the
Triplet Loss for Person Re-Identification").
"""

from __future__ import annotations

import torch


class PKBatchSampler:
    """Global batches of ``p`` distinct classes times ``k`` images each, class-major.

    Implements the ``BatchIndexSampler`` protocol of ``convrecipes.data.loader``: pass it
    as ``InMemoryLoader(..., batch_size=sampler.global_batch_size, batch_sampler=sampler)``.

    Each batch is ordered class-major (``k`` indices of the first class, then ``k`` of the
    second, ...). ``InMemoryLoader`` slices every global batch contiguously per rank, so
    when ``p`` is divisible by the number of processes each rank sees whole K-groups and
    can mine positives locally.

    Within a class, images are drawn from a per-epoch shuffled queue without replacement,
    so an epoch covers a class's images before repeating any; only a class with fewer than
    ``k`` images is sampled with replacement. Classes are chosen uniformly per batch.
    Everything is drawn from a ``torch.Generator`` seeded by ``(seed, epoch)``, never the
    global RNG, so an epoch's batches can be recomputed on resume and are identical on
    every rank.

    Args:
        labels: ``(N,)`` class indices of the dataset.
        p: classes per batch; at most the number of classes present.
        k: images per class in a batch.
        batches_per_epoch: defaults to ``len(labels) // (p * k)``.
        seed: base seed; epoch ``e`` uses ``seed * 1_000_003 + e`` (as ``InMemoryLoader``).

    Raises:
        ValueError: ``p`` or ``k`` below 1, ``p`` above the number of classes, or no batches.
    """

    def __init__(
        self,
        labels: torch.Tensor,
        p: int,
        k: int,
        batches_per_epoch: int | None = None,
        seed: int = 0,
    ) -> None:
        labels = torch.as_tensor(labels).detach().cpu().long()
        if labels.ndim != 1:
            raise ValueError(f"labels must be one-dimensional, got shape {tuple(labels.shape)}")
        if p < 1 or k < 1:
            raise ValueError(f"p and k must be >= 1, got p={p}, k={k}")
        classes = torch.unique(labels)
        if p > len(classes):
            raise ValueError(
                f"p={p} classes per batch but the dataset has only {len(classes)} classes; use p <= {len(classes)}"
            )
        if batches_per_epoch is None:
            batches_per_epoch = len(labels) // (p * k)
        if batches_per_epoch < 1:
            raise ValueError(
                f"{len(labels)} samples give no full batch of p*k={p * k}; lower p or k, or set batches_per_epoch"
            )
        self.p = p
        self.k = k
        self.batches_per_epoch = batches_per_epoch
        self.seed = seed
        self._members = [torch.nonzero(labels == c).flatten() for c in classes]

    @property
    def global_batch_size(self) -> int:
        """Indices per global batch, ``p * k``."""
        return self.p * self.k

    def __len__(self) -> int:
        return self.batches_per_epoch

    def epoch_batches(self, epoch: int) -> list[torch.Tensor]:
        """The ``batches_per_epoch`` global batches of ``epoch``, each ``p * k`` int64 indices."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        queues: list[torch.Tensor | None] = [None] * len(self._members)
        cursors = [0] * len(self._members)
        batches = []
        for _ in range(self.batches_per_epoch):
            chosen = torch.randperm(len(self._members), generator=generator)[: self.p].tolist()
            groups = []
            for c in chosen:
                members = self._members[c]
                n = len(members)
                if n < self.k:
                    groups.append(members[torch.randint(n, (self.k,), generator=generator)])
                    continue
                # Reshuffle when the rest of the queue cannot fill a K-group, so a group
                # never repeats an image (the leftovers come back in the next pass).
                if queues[c] is None or cursors[c] + self.k > n:
                    queues[c] = members[torch.randperm(n, generator=generator)]
                    cursors[c] = 0
                groups.append(queues[c][cursors[c] : cursors[c] + self.k])  # type: ignore[index]
                cursors[c] += self.k
            batches.append(torch.cat(groups))
        return batches
