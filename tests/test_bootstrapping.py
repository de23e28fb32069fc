"""Bootstrapping losses (Reed et al. 2015) and ``BootstrappingTrainer`` against independent
computations: softmax, cross-entropy and entropy written out by hand in float64, never the
library's own helpers."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from convrecipes.errors import RecipeError
from convrecipes.losses import LOSSES, build_loss
from convrecipes.losses.bootstrapping import (
    HardBootstrappingLoss,
    SoftBootstrappingLoss,
    hard_bootstrapping_loss,
    soft_bootstrapping_loss,
)
from convrecipes.trainers import TRAINERS
from convrecipes.trainers.bootstrapping import BootstrappingTrainer

torch.set_num_threads(1)

ATOL = 1e-10


# --------------------------------------------------------------------------- hand-written references


def _softmax(z: torch.Tensor) -> torch.Tensor:
    """Row softmax written out: exp(z - max) / sum exp(z - max)."""
    e = torch.exp(z - z.max(dim=1, keepdim=True).values)
    return e / e.sum(dim=1, keepdim=True)


def _onehot(y: torch.Tensor, k: int) -> torch.Tensor:
    out = torch.zeros(y.shape[0], k, dtype=torch.float64)
    out[torch.arange(y.shape[0]), y] = 1.0
    return out


def _ce(target: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Batch-mean cross-entropy -mean_i sum_k t_ik log q_ik, q the explicit softmax."""
    return -(target * torch.log(_softmax(z))).sum(dim=1).mean()


def _entropy(z: torch.Tensor) -> torch.Tensor:
    """Batch-mean entropy H(q) = -mean_i sum_k q_ik log q_ik."""
    q = _softmax(z)
    return -(q * torch.log(q)).sum(dim=1).mean()


def _grad(fn, z: torch.Tensor) -> torch.Tensor:
    z = z.detach().clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(z), z)
    return g


def _batch(seed: int = 0, b: int = 6, k: int = 5, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    logits = scale * torch.randn(b, k, generator=g, dtype=torch.float64)
    y = torch.randint(0, k, (b,), generator=g)
    soft = torch.rand(b, k, generator=g, dtype=torch.float64)
    soft = soft / soft.sum(dim=1, keepdim=True)
    return logits, y, soft


# --------------------------------------------------------------------------- soft bootstrapping: value


@pytest.mark.parametrize("beta", [0.95, 0.5, 0.0, 1.0])
def test_soft_value_matches_hand_formula_for_class_indices(beta):
    """L = -mean_i sum_k [beta t_ik + (1-beta) q_ik] log q_ik with t = onehot(y), written out."""
    logits, y, _ = _batch(0)
    q = _softmax(logits)
    expected = -((beta * _onehot(y, 5) + (1 - beta) * q) * torch.log(q)).sum(dim=1).mean()
    got = soft_bootstrapping_loss(logits, y, beta)
    assert got.dtype == torch.float64
    assert torch.allclose(got, expected, atol=ATOL, rtol=0)
    assert torch.allclose(SoftBootstrappingLoss(beta)(logits, y), expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("beta", [0.95, 0.3])
def test_soft_value_matches_hand_formula_for_soft_targets(beta):
    """Soft (B, K) targets (mixup) enter the same formula as t directly."""
    logits, _, soft = _batch(1)
    q = _softmax(logits)
    expected = -((beta * soft + (1 - beta) * q) * torch.log(q)).sum(dim=1).mean()
    assert torch.allclose(soft_bootstrapping_loss(logits, soft, beta), expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- soft bootstrapping: gradient


@pytest.mark.parametrize("beta", [0.95, 0.6])
def test_soft_gradient_is_ce_plus_entropy_not_scaled_ce(beta):
    """q is attached, so the gradient is that of beta*CE(t, q) + (1-beta)*H(q), which is NOT
    beta times cross-entropy's gradient (the entropy term pushes towards confident outputs)."""
    logits, y, _ = _batch(2)
    t = _onehot(y, 5)
    got = _grad(lambda z: soft_bootstrapping_loss(z, y, beta), logits)
    reference = _grad(lambda z: beta * _ce(t, z) + (1 - beta) * _entropy(z), logits)
    assert torch.allclose(got, reference, atol=ATOL, rtol=0)
    scaled_ce = _grad(lambda z: beta * _ce(t, z), logits)
    assert (got - scaled_ce).abs().max() > 1e-3


def test_soft_gradient_with_soft_targets_is_ce_plus_entropy():
    """The same decomposition holds for soft (B, K) targets."""
    beta = 0.8
    logits, _, soft = _batch(3)
    got = _grad(lambda z: soft_bootstrapping_loss(z, soft, beta), logits)
    reference = _grad(lambda z: beta * _ce(soft, z) + (1 - beta) * _entropy(z), logits)
    assert torch.allclose(got, reference, atol=ATOL, rtol=0)


def test_detached_q_gradient_is_exactly_beta_times_ce_gradient():
    """Why q must stay attached: with q detached the (1-beta) q log q part has gradient
    sum(q) q - q = 0, so the 'bootstrapped' loss trains exactly like beta * cross-entropy
    (the same run as plain CE under Adam). The library's gradient must differ from that."""
    beta = 0.9
    logits, y, _ = _batch(4)
    t = _onehot(y, 5)

    def detached(z):
        q = _softmax(z)
        return -((beta * t + (1 - beta) * q.detach()) * torch.log(q)).sum(dim=1).mean()

    g_detached = _grad(detached, logits)
    g_ce = _grad(lambda z: _ce(t, z), logits)
    assert torch.allclose(g_detached, beta * g_ce, atol=ATOL, rtol=0)
    # analytic CE gradient (q - t) / B as a check on the reference itself
    assert torch.allclose(g_ce, (_softmax(logits) - t) / logits.shape[0], atol=ATOL, rtol=0)
    g_library = _grad(lambda z: soft_bootstrapping_loss(z, y, beta), logits)
    assert (g_library - g_detached).abs().max() > 1e-3


# --------------------------------------------------------------------------- hard bootstrapping


def _hard_target(logits: torch.Tensor, y: torch.Tensor, beta: float) -> torch.Tensor:
    k = logits.shape[1]
    return beta * _onehot(y, k) + (1 - beta) * _onehot(_softmax(logits).argmax(dim=1), k)


# rows with a clear argmax at column 2, 0, 4: labels that disagree / agree with it
_HARD_LOGITS = torch.tensor([[0.1, -0.3, 2.5, 0.0, 0.4],
                             [3.0, 0.2, -1.0, 0.5, 0.1],
                             [-0.2, 0.3, 0.0, 0.1, 1.9]], dtype=torch.float64)


@pytest.mark.parametrize("y,agrees", [(torch.tensor([0, 3, 1]), False), (torch.tensor([2, 0, 4]), True)],
                         ids=["argmax-differs", "argmax-equals-label"])
@pytest.mark.parametrize("beta", [0.8, 0.5])
def test_hard_value_and_gradient_are_fixed_target_ce(y, agrees, beta):
    """L = CE against beta*onehot(y) + (1-beta)*onehot(argmax q), a fixed target (argmax has
    no gradient); when argmax q == y it is plain cross-entropy against y."""
    logits = _HARD_LOGITS
    assert bool((_softmax(logits).argmax(1) == y).all()) is agrees
    target = _hard_target(logits, y, beta)
    expected = -(target * torch.log(_softmax(logits))).sum(dim=1).mean()
    got = hard_bootstrapping_loss(logits, y, beta)
    assert torch.allclose(got, expected, atol=ATOL, rtol=0)
    assert torch.allclose(HardBootstrappingLoss(beta)(logits, y), expected, atol=ATOL, rtol=0)
    g_got = _grad(lambda z: hard_bootstrapping_loss(z, y, beta), logits)
    g_ref = _grad(lambda z: _ce(target, z), logits)
    assert torch.allclose(g_got, g_ref, atol=ATOL, rtol=0)
    assert torch.allclose(g_got, (_softmax(logits) - target) / logits.shape[0], atol=ATOL, rtol=0)
    plain_ce = _ce(_onehot(y, 5), logits)
    if agrees:
        assert torch.allclose(got, plain_ce, atol=ATOL, rtol=0)
    else:
        assert (got - plain_ce).abs() > 1e-3


def test_hard_value_with_soft_targets():
    """Soft targets replace onehot(y) in the hard target too."""
    beta = 0.8
    logits, _, soft = _batch(5)
    k = logits.shape[1]
    target = beta * soft + (1 - beta) * _onehot(_softmax(logits).argmax(1), k)
    expected = -(target * torch.log(_softmax(logits))).sum(dim=1).mean()
    assert torch.allclose(hard_bootstrapping_loss(logits, soft, beta), expected, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- argument checks and registry


@pytest.mark.parametrize("beta", [-0.1, 1.01, 2.0])
def test_beta_outside_unit_interval_raises(beta):
    """beta is a mixing weight: outside [0, 1] the target is no distribution."""
    logits, y, _ = _batch(0)
    for fn in (soft_bootstrapping_loss, hard_bootstrapping_loss):
        with pytest.raises(ValueError, match="beta"):
            fn(logits, y, beta)
    for cls in (SoftBootstrappingLoss, HardBootstrappingLoss):
        with pytest.raises(ValueError, match="beta"):
            cls(beta)


@pytest.mark.parametrize("shape", [(6, 4), (6, 6), (5, 5)])
def test_soft_targets_of_wrong_shape_raise(shape):
    """A (B, K) soft target must match the logits' shape exactly."""
    logits, _, _ = _batch(0)  # (6, 5)
    bad = torch.full(shape, 1.0 / shape[1], dtype=torch.float64)
    for fn in (soft_bootstrapping_loss, hard_bootstrapping_loss):
        with pytest.raises(ValueError, match="shape"):
            fn(logits, bad)


def test_registered_names_and_default_betas():
    """Both losses are in the registry and build from a recipe spec with Reed et al.'s betas."""
    assert "soft_bootstrapping" in LOSSES
    assert "hard_bootstrapping" in LOSSES
    soft = build_loss({"name": "soft_bootstrapping"}, num_classes=10)
    hard = build_loss({"name": "hard_bootstrapping"}, num_classes=10)
    assert isinstance(soft, SoftBootstrappingLoss) and soft.beta == 0.95
    assert isinstance(hard, HardBootstrappingLoss) and hard.beta == 0.8
    custom = build_loss({"name": "soft_bootstrapping", "params": {"beta": 0.7}}, num_classes=10)
    assert custom.beta == 0.7


def test_build_loss_rejects_bad_beta_as_recipe_error():
    """A bad beta in a recipe spec is a recipe error, not a crash."""
    with pytest.raises(RecipeError):
        build_loss({"name": "hard_bootstrapping", "params": {"beta": 1.5}}, num_classes=10)


def test_trainers_registry_has_bootstrapping():
    assert "bootstrapping" in TRAINERS
    assert TRAINERS.get("bootstrapping") is BootstrappingTrainer


# --------------------------------------------------------------------------- BootstrappingTrainer


def _linear_trainer(**kw) -> BootstrappingTrainer:
    torch.manual_seed(0)
    model = nn.Linear(12, 4)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    return BootstrappingTrainer(model, opt, nn.CrossEntropyLoss(), progress=False, **kw)


def _fixed_batch():
    g = torch.Generator().manual_seed(7)
    return torch.randn(16, 12, generator=g), torch.randint(0, 4, (16,), generator=g)


def test_trainer_uses_ce_during_warmup_then_hard_bootstrapping():
    """warmup_epochs=1: epoch 0 trains on the recipe's loss (CE), epoch 1 on the hard target."""
    trainer = _linear_trainer(bootstrap="hard", warmup_epochs=1)
    x, y = _fixed_batch()
    with torch.no_grad():
        z = trainer.model(x).double()
    ce = _ce(_onehot(y, 4), z)
    hard = -(_hard_target(z, y, 0.8) * torch.log(_softmax(z))).sum(dim=1).mean()
    assert (ce - hard).abs() > 1e-3  # the batch tells them apart

    trainer.epoch = 0
    assert not trainer.bootstrapping
    with torch.no_grad():
        step0 = trainer.training_step((x, y))
    assert abs(float(step0.loss) - float(ce)) < 1e-5

    for epoch in (1, 3):
        trainer.epoch = epoch
        assert trainer.bootstrapping
        with torch.no_grad():
            step = trainer.training_step((x, y))
        assert abs(float(step.loss) - float(hard)) < 1e-5


def test_trainer_soft_without_warmup_and_custom_beta():
    """warmup_epochs=0 bootstraps from the first epoch; soft uses q attached, beta as given."""
    trainer = _linear_trainer(bootstrap="soft", beta=0.7)
    assert trainer.bootstrap_loss.beta == 0.7
    assert _linear_trainer(bootstrap="soft").bootstrap_loss.beta == 0.95
    assert _linear_trainer().bootstrap_loss.beta == 0.8  # hard by default
    x, y = _fixed_batch()
    with torch.no_grad():
        z = trainer.model(x).double()
        q = _softmax(z)
        expected = -((0.7 * _onehot(y, 4) + 0.3 * q) * torch.log(q)).sum(dim=1).mean()
        trainer.epoch = 0
        assert trainer.bootstrapping
        step = trainer.training_step((x, y))
    assert abs(float(step.loss) - float(expected)) < 1e-5


def test_trainer_fits_two_epochs_across_the_warmup_boundary(blobs):
    """A short fit crossing from warm-up to bootstrapping runs and logs finite losses."""
    from convrecipes.data.loader import InMemoryLoader

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    trainer = BootstrappingTrainer(model, torch.optim.SGD(model.parameters(), lr=0.05), nn.CrossEntropyLoss(),
                                   progress=False, bootstrap="hard", warmup_epochs=1)
    history = trainer.fit(InMemoryLoader(blobs, 32, seed=0), epochs=2)
    assert trainer.epoch == 2
    assert len(history) == 2
    assert all(torch.isfinite(torch.tensor(float(row["train_loss"]))) for row in history)


@pytest.mark.parametrize("kwargs", [{"bootstrap": "medium"}, {"warmup_epochs": -1}, {"warmup_epochs": 1.5},
                                    {"beta": 1.2}, {"bootstrap": "soft", "beta": -0.5}])
def test_trainer_rejects_bad_parameters_as_recipe_errors(kwargs):
    """Unknown bootstrap kind, negative/non-integer warm-up, beta outside [0, 1]: RecipeError."""
    with pytest.raises(RecipeError):
        _linear_trainer(**kwargs)


def test_trainer_unknown_kind_message_lists_valid_kinds():
    with pytest.raises(RecipeError, match="hard") as info:
        _linear_trainer(bootstrap="medium")
    assert "soft" in str(info.value) and "medium" in str(info.value)
