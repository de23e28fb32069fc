"""Zipping a labeled stream with an unlabeled one, for semi-supervised trainers.

``SemiSupervisedLoader(labeled, unlabeled)`` yields ``SemiSupervisedBatch(labeled=(images,
labels), unlabeled=(images, labels))``: one labeled batch and one unlabeled batch per step,
as Meta Pseudo Labels, FixMatch and the like consume them. Both parts are
``InMemoryLoader`` training streams; images stay uint8 (the trainer normalises/augments).

**Epochs.** An epoch is one pass over the labeled loader, so ``len(loader) ==
len(labeled)``. The unlabeled loader (usually several times larger, or with a larger
batch) cycles on its own, independently of the labeled epochs: with ``L = len(labeled)``
and ``U = len(unlabeled)`` batches per epoch, labeled position (epoch ``e``, batch ``b``)
is global step ``c = e * L + b``, and the unlabeled batch served there is batch ``c % U``
of unlabeled epoch ``c // U``. Every unlabeled epoch is its own seeded permutation (as
``InMemoryLoader`` draws by epoch), so over the run the unlabeled stream is the
concatenation of unlabeled epochs 0, 1, 2, ... whatever ``L`` and ``U`` are.

**Exact resume without state.** ``InMemoryLoader`` derives epoch ``e``'s permutation
from ``seed * 1_000_003 + e`` alone, so the labeled batch at ``(e, b)`` is a pure function
of ``(labeled seed, e, b)``. The unlabeled batch there is a pure function of ``(unlabeled
seed, c // U, c % U)`` with ``c`` computed from ``(e, b)`` as above. Nothing random
depends on how the run got to ``(e, b)``, so ``set_epoch(e, start_batch=b)`` reproduces
exactly the batches an uninterrupted run would have seen from there on, and the trainer's
checkpointed ``(epoch, batch_in_epoch)`` is all the state needed. Iterating from
``start_batch`` walks the unlabeled stream by epochs: it positions the unlabeled loader at
``(c // U, c % U)`` once and, at the end of each unlabeled epoch, moves to the next one
(one permutation per unlabeled epoch, never one per batch).

**Sharding.** ``shard(num_replicas, rank, device)`` shards both streams the way
``InMemoryLoader`` does: all ranks compute the same global permutation and each takes its
contiguous ``batch_size // num_replicas`` slice of every global batch, so at each step the
ranks' batches are disjoint and together form the single-process global batch, for both
streams. Both global batch sizes must be divisible by ``num_replicas``; this is checked
for both before either stream is touched.

**Seeds.** The two streams must have different seeds (the constructor raises otherwise;
``from_datasets`` derives the unlabeled seed as ``seed + UNLABELED_SEED_OFFSET``). With
the same seed and the same dataset size the two streams would draw the same permutation
and walk in lock-step; SSL commonly reuses the labeled images inside the unlabeled set
(or both are the same dataset with labels hidden), so the "unlabeled" batch would then be
the labeled batch again (or a fixed function of it), and consistency / pseudo-label losses
would see correlated rather than independent samples.

**Restrictions** (each a ``ValueError`` naming the fix): both streams shuffle and drop
their last incomplete batch (``shuffle=True, drop_last=True``). ``drop_last=False`` would
make the last batch short and, under several processes, pad it with duplicated samples
whose mask this loader does not pass on, so per-rank batches would not be equal real
samples; the unlabeled stream cycles through that short batch every unlabeled epoch.
``shuffle=False`` would not break resume, but it makes every epoch the same order, so when
``U`` divides ``L`` (or the reverse) each labeled batch is paired with the same unlabeled
batches every epoch. A ``batch_sampler`` is rejected: the position math needs a fixed
number of batches per epoch. An empty stream (fewer samples than one global batch) is
rejected too.

The ``unlabeled`` labels are carried only for analysis (e.g. measuring pseudo-label
accuracy against the hidden truth). Trainers must not train on them: that would turn the
semi-supervised run into a fully supervised one and invalidate its results.
"""

from __future__ import annotations

from typing import Iterator, NamedTuple, Optional

import torch

from convrecipes.data.loader import ImageTensorDataset, InMemoryLoader

#: ``from_datasets`` gives the unlabeled stream seed ``seed + UNLABELED_SEED_OFFSET``.
UNLABELED_SEED_OFFSET = 1


class SemiSupervisedBatch(NamedTuple):
    """One step's data: ``labeled`` and ``unlabeled`` are each ``(images_uint8, labels)``.

    ``unlabeled[1]`` holds the true labels of the unlabeled images for analysis only
    (e.g. pseudo-label accuracy); trainers must never compute a training loss on them.
    """

    labeled: tuple[torch.Tensor, torch.Tensor]
    unlabeled: tuple[torch.Tensor, torch.Tensor]


def _check_stream(loader: InMemoryLoader, name: str) -> None:
    if not isinstance(loader, InMemoryLoader):
        raise TypeError(f"the {name} stream must be an InMemoryLoader, got {type(loader).__name__}")
    if loader.batch_sampler is not None:
        raise ValueError(
            f"the {name} loader has a batch_sampler; SemiSupervisedLoader needs a fixed number of batches per "
            f"epoch for its position math, so build the {name} InMemoryLoader without batch_sampler"
        )
    if not loader.shuffle:
        raise ValueError(
            f"the {name} loader does not shuffle (shuffle=False); a training stream must draw a new permutation "
            f"every epoch, so build it with shuffle=True"
        )
    if not loader.drop_last:
        raise ValueError(
            f"the {name} loader keeps its last incomplete batch (drop_last=False), which would give short or "
            f"padded batches with unequal real samples per process; build it with drop_last=True"
        )
    if len(loader) == 0:
        raise ValueError(
            f"the {name} loader yields no batches: {loader.num_samples} samples are fewer than its global batch "
            f"size {loader.batch_size} (incomplete batches are dropped); lower its batch size or add {name} data"
        )


class SemiSupervisedLoader:
    """Yield a ``SemiSupervisedBatch`` per step: a labeled batch zipped with an unlabeled one.

    Implements ``EpochLoader``: ``len()`` is the labeled loader's batches per epoch,
    ``set_epoch(e, start_batch=b)`` positions both streams (the unlabeled one at global
    step ``e * len(labeled) + b`` of its own cycle), ``shard`` shards both. See the module
    docstring for the position math and why it resumes exactly.

    Args:
        labeled: training ``InMemoryLoader`` over the labeled data (its ``batch_size`` is
            the global labeled batch).
        unlabeled: training ``InMemoryLoader`` over the unlabeled data (its ``batch_size``
            is the global unlabeled batch); its labels are for analysis only.

    Raises:
        TypeError: a stream is not an ``InMemoryLoader``.
        ValueError: a stream has no batches, does not shuffle, keeps its last incomplete
            batch, uses a ``batch_sampler``; the two have the same seed; or they were
            built for different process counts or ranks.
    """

    def __init__(self, labeled: InMemoryLoader, unlabeled: InMemoryLoader) -> None:
        _check_stream(labeled, "labeled")
        _check_stream(unlabeled, "unlabeled")
        if labeled.seed == unlabeled.seed:
            raise ValueError(
                f"the labeled and unlabeled loaders have the same seed ({labeled.seed}); with equal dataset sizes "
                f"they would draw the same permutations and walk in lock-step, so give the unlabeled loader a "
                f"different seed (e.g. seed + {UNLABELED_SEED_OFFSET}, as SemiSupervisedLoader.from_datasets does)"
            )
        if (labeled.num_replicas, labeled.rank) != (unlabeled.num_replicas, unlabeled.rank):
            raise ValueError(
                f"the labeled loader is sharded as rank {labeled.rank} of {labeled.num_replicas} but the unlabeled "
                f"one as rank {unlabeled.rank} of {unlabeled.num_replicas}; build both with the same num_replicas "
                f"and rank (or leave the defaults and let the trainer call shard())"
            )
        self.labeled = labeled
        self.unlabeled = unlabeled
        self.epoch = 0
        self.start_batch = 0  # first batch to yield in the current epoch (resume)

    @classmethod
    def from_datasets(
        cls,
        labeled: ImageTensorDataset,
        unlabeled: ImageTensorDataset,
        batch_size: int,
        unlabeled_batch_size: int,
        seed: int = 0,
        num_replicas: int = 1,
        rank: int = 0,
        device: Optional[torch.device] = None,
    ) -> "SemiSupervisedLoader":
        """Build both training streams: labeled seed ``seed``, unlabeled ``seed + UNLABELED_SEED_OFFSET``."""
        return cls(
            InMemoryLoader(labeled, batch_size, shuffle=True, drop_last=True, seed=seed,
                           num_replicas=num_replicas, rank=rank, device=device),
            InMemoryLoader(unlabeled, unlabeled_batch_size, shuffle=True, drop_last=True,
                           seed=seed + UNLABELED_SEED_OFFSET, num_replicas=num_replicas, rank=rank, device=device),
        )

    # -- sharding ---------------------------------------------------------------
    def shard(self, num_replicas: int, rank: int, device: Optional[torch.device]) -> None:
        """Point both streams at this process's shard and device (called by the trainer)."""
        for name, loader in (("labeled", self.labeled), ("unlabeled", self.unlabeled)):
            if loader.batch_size % num_replicas:
                raise ValueError(
                    f"the {name} global batch size {loader.batch_size} is not divisible by {num_replicas} "
                    f"processes; choose a {name} batch size that is a multiple of the process count"
                )
        self.labeled.shard(num_replicas, rank, device)
        self.unlabeled.shard(num_replicas, rank, device)

    # -- sizing -----------------------------------------------------------------
    def __len__(self) -> int:
        """Batches per epoch on each rank: one pass over the labeled loader."""
        return len(self.labeled)

    @property
    def num_samples(self) -> int:
        """Labeled samples (each counted once across all ranks)."""
        return self.labeled.num_samples

    @property
    def unlabeled_num_samples(self) -> int:
        """Unlabeled samples (each counted once across all ranks)."""
        return self.unlabeled.num_samples

    @property
    def batch_size(self) -> int:
        """Global labeled batch size."""
        return self.labeled.batch_size

    @property
    def unlabeled_batch_size(self) -> int:
        """Global unlabeled batch size."""
        return self.unlabeled.batch_size

    # -- order ------------------------------------------------------------------
    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """Select labeled epoch ``epoch`` and, when resuming, the first step to yield.

        ``start_batch == len(self)`` is allowed (the epoch yields nothing, as when a
        checkpoint was written after an epoch's last batch).
        """
        if epoch < 0 or start_batch < 0:
            raise ValueError(f"epoch and start_batch must be >= 0, got epoch={epoch}, start_batch={start_batch}")
        if start_batch > len(self):
            raise ValueError(
                f"start_batch={start_batch} is past the end of an epoch of {len(self)} batches; the position does "
                f"not belong to this loader (was the batch size or dataset changed since the checkpoint?)"
            )
        self.epoch = epoch
        self.start_batch = start_batch

    def unlabeled_position(self, epoch: int, batch: int) -> tuple[int, int]:
        """``(unlabeled epoch, unlabeled batch)`` served at labeled position ``(epoch, batch)``."""
        return divmod(epoch * len(self.labeled) + batch, len(self.unlabeled))

    def _unlabeled_stream(self, epoch: int, batch: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """The unlabeled batches from ``(epoch, batch)`` on, crossing unlabeled epochs forever."""
        while True:
            self.unlabeled.set_epoch(epoch, start_batch=batch)
            yield from self.unlabeled
            epoch, batch = epoch + 1, 0

    def __iter__(self) -> Iterator[SemiSupervisedBatch]:
        epoch, start = self.epoch, self.start_batch
        self.start_batch = 0  # like InMemoryLoader: a later pass without set_epoch is the whole epoch
        self.labeled.set_epoch(epoch, start_batch=start)
        unlabeled = self._unlabeled_stream(*self.unlabeled_position(epoch, start))
        labeled = iter(self.labeled)
        try:
            for labeled_batch in labeled:
                yield SemiSupervisedBatch(labeled=labeled_batch, unlabeled=next(unlabeled))
        finally:
            unlabeled.close()
            labeled.close()  # type: ignore[attr-defined]
