"""Tests of ``SemiSupervisedLoader``: epochs, the cycling unlabeled stream, exact resume, sharding, errors.

Every sample's image encodes its index (pixel [0, 0, 0] = index % 256, pixel [0, 0, 1] =
index // 256), so batches are identified by what they hold. Expected unlabeled orders are
computed independently with ``torch.randperm`` and the documented seed formula
``seed * 1_000_003 + epoch``, not taken from the loaders under test.
"""

from __future__ import annotations

import pytest
import torch

from convrecipes.data import ImageTensorDataset, InMemoryLoader, PKBatchSampler, SemiSupervisedBatch, SemiSupervisedLoader
from convrecipes.data.loader import is_epoch_loader
from convrecipes.data.semi_supervised import UNLABELED_SEED_OFFSET


def indexed_dataset(n: int, num_classes: int = 3) -> ImageTensorDataset:
    images = torch.zeros(n, 1, 2, 2, dtype=torch.uint8)
    idx = torch.arange(n)
    images[:, 0, 0, 0] = (idx % 256).to(torch.uint8)
    images[:, 0, 0, 1] = (idx // 256).to(torch.uint8)
    return ImageTensorDataset(images, idx % num_classes, [f"c{i}" for i in range(num_classes)])


def indices(images: torch.Tensor) -> list[int]:
    return (images[:, 0, 0, 0].long() + 256 * images[:, 0, 0, 1].long()).tolist()


def expected_epoch_batches(n: int, batch: int, seed: int, epoch: int) -> list[list[int]]:
    """Global batches of a shuffled drop_last epoch, from the documented seed formula."""
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
    return [b.tolist() for b in perm[: n // batch * batch].split(batch)]


N_L, B_L, SEED_L = 23, 4, 5   # 5 labeled batches per epoch (3 samples dropped)
N_U, B_U, SEED_U = 70, 8, 9   # 8 unlabeled batches per epoch (6 dropped): cycles out of phase with the labeled


def make_loader(num_replicas: int = 1, rank: int = 0) -> SemiSupervisedLoader:
    loader = SemiSupervisedLoader(
        InMemoryLoader(indexed_dataset(N_L), B_L, seed=SEED_L),
        InMemoryLoader(indexed_dataset(N_U), B_U, seed=SEED_U),
    )
    if num_replicas > 1:
        loader.shard(num_replicas, rank, None)
    return loader


def run_epochs(loader: SemiSupervisedLoader, epochs: int) -> list[tuple[list[int], list[int]]]:
    """(labeled indices, unlabeled indices) per step over ``epochs`` uninterrupted epochs."""
    steps = []
    for e in range(epochs):
        loader.set_epoch(e)
        steps += [(indices(b.labeled[0]), indices(b.unlabeled[0])) for b in loader]
    return steps


def test_protocol_and_sizes():
    loader = make_loader()
    assert is_epoch_loader(loader)
    assert len(loader) == N_L // B_L == 5
    assert loader.num_samples == N_L and loader.unlabeled_num_samples == N_U
    assert loader.batch_size == B_L and loader.unlabeled_batch_size == B_U
    batch = next(iter(loader))
    assert isinstance(batch, SemiSupervisedBatch)
    (xl, yl), (xu, yu) = batch
    assert xl.dtype == xu.dtype == torch.uint8
    assert xl.shape == (B_L, 1, 2, 2) and xu.shape == (B_U, 1, 2, 2)
    # labels travel with their images (the unlabeled ones too, for analysis only)
    assert yl.tolist() == [i % 3 for i in indices(xl)] and yu.tolist() == [i % 3 for i in indices(xu)]


def test_epoch_is_one_pass_over_the_labeled_data():
    loader = make_loader()
    for e in range(3):
        loader.set_epoch(e)
        batches = [indices(b.labeled[0]) for b in loader]
        assert len(batches) == len(loader)
        flat = sum(batches, [])
        assert len(flat) == len(set(flat)) == len(loader) * B_L  # no repeats; only the drop_last remainder missing
        assert batches == expected_epoch_batches(N_L, B_L, SEED_L, e)
    loader.set_epoch(0)
    first = [indices(b.labeled[0]) for b in loader]
    loader.set_epoch(1)
    assert [indices(b.labeled[0]) for b in loader] != first  # a new permutation each epoch


def test_unlabeled_stream_cycles_through_consecutive_epochs():
    epochs = 7  # 35 steps = 4 full unlabeled epochs and 3 batches of a fifth
    got = [u for _, u in run_epochs(make_loader(), epochs)]
    expected = []
    ue = 0
    while len(expected) < len(got):
        expected += expected_epoch_batches(N_U, B_U, SEED_U, ue)
        ue += 1
    assert got == expected[: len(got)]
    # and the same via a fresh unlabeled InMemoryLoader, epoch by epoch
    fresh = InMemoryLoader(indexed_dataset(N_U), B_U, seed=SEED_U)
    walk = []
    for ue in range(5):
        fresh.set_epoch(ue)
        walk += [indices(x) for x, _ in fresh]
    assert got == walk[: len(got)]


def test_position_math():
    loader = make_loader()
    assert loader.unlabeled_position(0, 0) == (0, 0)
    assert loader.unlabeled_position(1, 3) == divmod(1 * 5 + 3, 8) == (1, 0)
    assert loader.unlabeled_position(6, 4) == divmod(34, 8)


@pytest.mark.parametrize("epoch,start", [(0, 1), (0, 4), (1, 0), (1, 3), (2, 2), (4, 1), (6, 4), (6, 5)])
def test_exact_resume_from_any_position(epoch, start):
    epochs = 7
    full = run_epochs(make_loader(), epochs)
    resumed = make_loader()  # a fresh process: no state but the position
    resumed.set_epoch(epoch, start_batch=start)
    tail = [(indices(b.labeled[0]), indices(b.unlabeled[0])) for b in resumed]
    for e in range(epoch + 1, epochs):
        resumed.set_epoch(e)
        tail += [(indices(b.labeled[0]), indices(b.unlabeled[0])) for b in resumed]
    assert tail == full[epoch * len(resumed) + start:]


def test_start_batch_is_consumed_by_one_pass():
    loader = make_loader()
    loader.set_epoch(2, start_batch=3)
    assert len(list(loader)) == 2
    assert len(list(loader)) == len(loader)  # a second pass without set_epoch is the whole epoch
    loader.set_epoch(2, start_batch=len(loader))
    assert list(loader) == []  # a checkpoint written after the epoch's last batch


def test_sharding_splits_both_global_batches():
    epochs = 3
    single = run_epochs(make_loader(), epochs)
    ranks = [run_epochs(make_loader(num_replicas=2, rank=r), epochs) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single)
    for step, (lab, unl) in enumerate(single):
        (l0, u0), (l1, u1) = ranks[0][step], ranks[1][step]
        assert len(l0) == len(l1) == B_L // 2 and len(u0) == len(u1) == B_U // 2
        assert not set(l0) & set(l1) and not set(u0) & set(u1)
        assert l0 + l1 == lab and u0 + u1 == unl


def test_shard_resume_on_a_rank():
    full = run_epochs(make_loader(num_replicas=2, rank=1), 3)
    resumed = make_loader(num_replicas=2, rank=1)
    resumed.set_epoch(1, start_batch=2)
    tail = [(indices(b.labeled[0]), indices(b.unlabeled[0])) for b in resumed]
    assert tail == full[len(resumed) + 2: 2 * len(resumed)]


def test_from_datasets_offsets_the_unlabeled_seed():
    loader = SemiSupervisedLoader.from_datasets(indexed_dataset(N_L), indexed_dataset(N_U), B_L, B_U, seed=3)
    assert loader.labeled.seed == 3 and loader.unlabeled.seed == 3 + UNLABELED_SEED_OFFSET
    assert loader.labeled.shuffle and loader.labeled.drop_last and loader.unlabeled.shuffle and loader.unlabeled.drop_last
    # same dataset on both sides: the two streams do not walk in lock-step
    same = SemiSupervisedLoader.from_datasets(indexed_dataset(N_L), indexed_dataset(N_L), B_L, B_L, seed=3)
    pairs = [(indices(b.labeled[0]), indices(b.unlabeled[0])) for b in same]
    assert any(lab != unl for lab, unl in pairs)


# -- errors -----------------------------------------------------------------------------


def test_empty_streams_are_rejected():
    with pytest.raises(ValueError, match=r"labeled loader yields no batches: 3 samples .* global batch size 4"):
        SemiSupervisedLoader(InMemoryLoader(indexed_dataset(3), 4, seed=0), InMemoryLoader(indexed_dataset(N_U), B_U, seed=1))
    with pytest.raises(ValueError, match=r"unlabeled loader yields no batches: 5 samples .* lower its batch size"):
        SemiSupervisedLoader(InMemoryLoader(indexed_dataset(N_L), B_L, seed=0), InMemoryLoader(indexed_dataset(5), 8, seed=1))


def test_indivisible_batch_sizes_are_rejected():
    with pytest.raises(ValueError, match="not divisible by 2 processes"):  # InMemoryLoader's own check
        InMemoryLoader(indexed_dataset(N_L), 5, seed=0, num_replicas=2)
    loader = SemiSupervisedLoader(InMemoryLoader(indexed_dataset(N_L), 4, seed=0),
                                  InMemoryLoader(indexed_dataset(N_U), 6, seed=1))
    with pytest.raises(ValueError, match="unlabeled global batch size 6 is not divisible by 4 processes"):
        loader.shard(4, 0, None)
    # neither stream was touched by the failed shard
    assert loader.labeled.num_replicas == loader.unlabeled.num_replicas == 1
    with pytest.raises(ValueError, match="labeled global batch size 4 is not divisible by 3 processes"):
        loader.shard(3, 0, None)
    loader.shard(2, 1, None)
    assert (loader.labeled.local_batch_size, loader.unlabeled.local_batch_size) == (2, 3)


def test_non_training_streams_are_rejected():
    lab, unl = indexed_dataset(N_L), indexed_dataset(N_U)
    with pytest.raises(ValueError, match=r"unlabeled loader does not shuffle .* shuffle=True"):
        SemiSupervisedLoader(InMemoryLoader(lab, B_L, seed=0), InMemoryLoader(unl, B_U, shuffle=False, seed=1))
    with pytest.raises(ValueError, match=r"labeled loader keeps its last incomplete batch .* drop_last=True"):
        SemiSupervisedLoader(InMemoryLoader(lab, B_L, drop_last=False, seed=0), InMemoryLoader(unl, B_U, seed=1))
    sampler = PKBatchSampler(lab.labels, p=2, k=2, seed=0)
    with pytest.raises(ValueError, match="labeled loader has a batch_sampler"):
        SemiSupervisedLoader(InMemoryLoader(lab, sampler.global_batch_size, batch_sampler=sampler),
                             InMemoryLoader(unl, B_U, seed=1))
    with pytest.raises(TypeError, match="unlabeled stream must be an InMemoryLoader"):
        SemiSupervisedLoader(InMemoryLoader(lab, B_L, seed=0), [1, 2, 3])  # type: ignore[arg-type]


def test_same_seed_and_mismatched_shards_are_rejected():
    lab, unl = indexed_dataset(N_L), indexed_dataset(N_U)
    with pytest.raises(ValueError, match=r"same seed \(4\).* lock-step.* different seed"):
        SemiSupervisedLoader(InMemoryLoader(lab, B_L, seed=4), InMemoryLoader(unl, B_U, seed=4))
    with pytest.raises(ValueError, match="rank 1 of 2 but the unlabeled one as rank 0 of 1"):
        SemiSupervisedLoader(InMemoryLoader(lab, B_L, seed=0, num_replicas=2, rank=1), InMemoryLoader(unl, B_U, seed=1))


def test_bad_positions_are_rejected():
    loader = make_loader()
    with pytest.raises(ValueError, match="must be >= 0"):
        loader.set_epoch(-1)
    with pytest.raises(ValueError, match="must be >= 0"):
        loader.set_epoch(0, start_batch=-2)
    with pytest.raises(ValueError, match=r"start_batch=6 is past the end of an epoch of 5 batches"):
        loader.set_epoch(0, start_batch=6)
