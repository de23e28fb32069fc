"""The loss zoo and the cyclic schedule used from research code: plain tensors in, tensors
out (with their parts), the functional forms, settable centers, ``ignore_index``,
float32-accurate pairwise distances, and ``CyclicSchedule`` built with torch's arguments.
Every value is checked against torch or a computation written out here."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim import lr_scheduler as torch_sched

import convrecipes.losses as losses
from convrecipes.embedding_metrics import recall_at_1
from convrecipes.errors import RecipeError
from convrecipes.losses import (
    LOSSES,
    AngularSoftmaxLoss,
    CenterLoss,
    CrossEntropyLoss,
    HardBootstrappingLoss,
    LabelSmoothingCrossEntropy,
    LossOutput,
    MultiClassHingeLoss,
    SoftBootstrappingLoss,
    TripletLoss,
    WeightedSumLoss,
    angular_softmax_loss,
    build_loss,
    center_loss,
    distillation_kl,
    label_smoothing_cross_entropy,
    loss_param_groups,
    multi_class_hinge_loss,
    pairwise_distances,
    triplet_loss,
)
from convrecipes.models import ModelOutput
from convrecipes.schedulers import CyclicSchedule, build_scheduler

torch.set_num_threads(1)


def _batch(seed: int = 0, n: int = 12, d: int = 5, c: int = 4, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.arange(n) % c
    return x, y


# --------------------------------------------------------------------------- losses return tensors


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_returns_a_tensor_with_its_parts(name):
    torch.manual_seed(0)
    loss_fn = build_loss({"name": name}, num_classes=4, embedding_dim=3)
    head = AngularSoftmaxLoss.make_head(3, 4)
    x = torch.randn(8, 3, requires_grad=True)
    out = loss_fn(head(x), torch.tensor([0, 1, 2, 3] * 2))
    assert isinstance(out, torch.Tensor) and isinstance(out, LossOutput) and out.dim() == 0
    assert list(out.parts) == [name]  # a single term is its own part, named after the loss
    torch.testing.assert_close(out.parts[name], out.detach())
    out.backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_loss_output_behaves_as_a_plain_tensor():
    x = torch.tensor([1.0, 2.0], requires_grad=True)
    value = (x * x).sum()
    out = LossOutput(value, {"a": value.detach()}, {"s": torch.tensor(0.5)})
    assert float(out.detach()) == 5.0 and out.detach().item() == 5.0 and out.requires_grad
    # derived values are plain tensors: the parts no longer describe them
    assert type(0.5 * out) is torch.Tensor and type(out + 1) is torch.Tensor and type(out.detach()) is torch.Tensor
    assert type(out.loss) is torch.Tensor and out.loss.grad_fn is not None
    (0.5 * out).backward()
    torch.testing.assert_close(x.grad, x.detach())  # d/dx 0.5 * sum x^2 = x
    copied = copy.deepcopy(LossOutput(torch.tensor(3.0), {"a": torch.tensor(3.0)}))
    assert isinstance(copied, LossOutput) and float(copied) == 3.0 and float(copied.parts["a"]) == 3.0
    original = LossOutput(torch.tensor(2.0), {"a": torch.tensor(2.0)}, {"s": torch.tensor(1.0)})
    restored = pickle.loads(pickle.dumps(original))
    assert isinstance(restored, LossOutput) and float(restored) == 2.0 and float(restored.stats["s"]) == 1.0
    assert "parts={a=5}" in repr(out)
    with pytest.raises(ValueError, match="scalar"):
        LossOutput(torch.ones(3), {})
    assert LossOutput(torch.ones(1), {}).dim() == 0  # a (1,) scalar is accepted as 0-dim


def test_weighted_sum_is_a_tensor_whose_parts_sum_to_it():
    x, y = _batch(1, n=8, d=3, c=4)
    logits = torch.randn(8, 4, dtype=torch.float64, requires_grad=True)
    emb = x.clone().requires_grad_(True)
    loss_fn = WeightedSumLoss([("ce", 1.0, CrossEntropyLoss()), ("center", 0.1, CenterLoss(4, 3).double())])
    out = loss_fn(ModelOutput(logits, emb), y)
    assert isinstance(out, torch.Tensor) and set(out.parts) == {"ce", "center"}
    torch.testing.assert_close(sum(out.parts.values()), out.detach())
    expected = F.cross_entropy(logits, y) + 0.1 * 0.5 * (emb**2).sum(1).mean()  # centers start at zero
    torch.testing.assert_close(out.loss, expected)
    out.backward()
    assert emb.grad is not None and logits.grad is not None


# --------------------------------------------------------------------------- plain embeddings


def test_triplet_and_center_take_plain_embeddings():
    x, y = _batch(2)
    logits = torch.randn(12, 4, dtype=torch.float64)
    for make in (lambda: TripletLoss(mining="batch_all"), lambda: CenterLoss(4, 5).double()):
        plain = make()(x, y)
        wrapped = make()(ModelOutput(logits, x), y)
        torch.testing.assert_close(plain.loss, wrapped.loss)
    # independent values: the center term from the definition (centers at zero), and triplet
    # batch-all from a loop over all valid triplets with distances from torch.cdist
    torch.testing.assert_close(CenterLoss(4, 5).double()(x, y).loss, 0.5 * (x**2).sum(1).mean())
    d = torch.cdist(x, x)
    terms = [
        max(0.0, float(d[a, p] - d[a, n]) + 0.2)
        for a in range(12) for p in range(12) for n in range(12)
        if p != a and y[p] == y[a] and y[n] != y[a]
    ]
    assert float(TripletLoss(mining="batch_all")(x, y)) == pytest.approx(sum(terms) / len(terms), rel=1e-9)


def _a_softmax_by_hand(x, weight, y, m, lam):
    """A-Softmax cross-entropy in a loop, with acos (fine away from cos = +-1)."""
    total = 0.0
    w_hat = weight / weight.norm(dim=1, keepdim=True)
    for i in range(x.shape[0]):
        norm = float(x[i].norm())
        logits = []
        for j in range(w_hat.shape[0]):
            cos = float(x[i] @ w_hat[j]) / norm
            if j == int(y[i]):
                theta = math.acos(cos)
                k = min(int(theta * m / math.pi), m - 1)
                psi = (-1) ** k * math.cos(m * theta) - 2 * k
                logits.append((lam * norm * cos + norm * psi) / (1 + lam))
            else:
                logits.append(norm * cos)
        log_z = math.log(sum(math.exp(v) for v in logits))
        total += log_z - logits[int(y[i])]
    return total / x.shape[0]


def test_angular_softmax_with_its_own_head_takes_plain_embeddings():
    torch.manual_seed(3)
    x, y = _batch(3, n=10, d=6, c=3)
    loss_fn = AngularSoftmaxLoss.with_head(6, 3, m=4, base=0.0, lambda_min=0.0).double()
    out = loss_fn(x, y)
    assert float(out.detach()) == pytest.approx(_a_softmax_by_hand(x, loss_fn.head.weight.detach(), y, 4, 0.0),
                                                rel=1e-9)
    # the same as the model-side head with the same weights, and a ModelOutput's own logits are ignored
    model_head = AngularSoftmaxLoss.make_head(6, 3).double()
    model_head.weight.data.copy_(loss_fn.head.weight.data)
    model_side = AngularSoftmaxLoss(m=4, base=0.0, lambda_min=0.0)(model_head(x), y)
    torch.testing.assert_close(out.loss, model_side.loss)
    torch.testing.assert_close(loss_fn(ModelOutput(torch.zeros(10, 3), x), y).loss, out.loss)
    # margin-free logits for predictions: ||x|| cos(theta_j)
    w_hat = loss_fn.head.weight / loss_fn.head.weight.norm(dim=1, keepdim=True)
    torch.testing.assert_close(loss_fn.logits(x), x @ w_hat.T.detach())
    # the class weights are the loss's parameters: they get a gradient and an optimizer group
    out.backward()
    assert loss_fn.head.weight.grad is not None and loss_fn.head.weight.grad.abs().sum() > 0
    groups = loss_param_groups(loss_fn)
    assert len(groups) == 1 and groups[0]["params"] == [loss_fn.head.weight]
    assert set(loss_fn.state_dict()) == {"iteration", "head.weight"}
    # the recipe form keeps no head and no extra state
    assert set(AngularSoftmaxLoss().state_dict()) == {"iteration"}


def test_angular_softmax_without_a_head_refuses_a_plain_tensor():
    with pytest.raises(ValueError, match="with_head"):
        AngularSoftmaxLoss()(torch.randn(4, 3), torch.tensor([0, 1, 0, 1]))
    with pytest.raises(ValueError, match="with_head"):
        AngularSoftmaxLoss().logits(torch.randn(4, 3))


def test_a_model_output_without_embeddings_is_still_refused():
    for loss_fn in (TripletLoss(), CenterLoss(2, 3), AngularSoftmaxLoss.with_head(3, 2)):
        with pytest.raises(ValueError, match="embeddings"):
            loss_fn(ModelOutput(torch.randn(4, 2), None), torch.tensor([0, 1, 0, 1]))


# --------------------------------------------------------------------------- functional forms


def test_every_exported_name_imports_and_the_functional_forms_are_there():
    for name in losses.__all__:
        assert getattr(losses, name) is not None, name
    for name in ("distillation_kl", "hint_mse", "center_loss", "angular_softmax_loss", "triplet_loss",
                 "label_smoothing_cross_entropy", "multi_class_hinge_loss", "soft_bootstrapping_loss",
                 "hard_bootstrapping_loss", "pairwise_distances"):
        assert name in losses.__all__, name
    from convrecipes.trainers.distillation import distillation_kl as trainer_kl

    assert trainer_kl is distillation_kl  # one implementation, importable from both places


def test_distillation_kl_from_the_losses_package_is_hintons_term():
    s, t = _batch(4, n=6, d=5)[0], _batch(5, n=6, d=5)[0]
    temperature = 3.0
    p_t = torch.softmax(t / temperature, dim=1)
    log_p_s = torch.log_softmax(s / temperature, dim=1)
    expected = temperature**2 * (p_t * (p_t.log() - log_p_s)).sum(1).mean()  # sum over classes, mean over batch
    torch.testing.assert_close(distillation_kl(s, t, temperature).double(), expected, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="temperature"):
        distillation_kl(s, t, 0.0)


def test_center_loss_and_angular_softmax_functions():
    x, y = _batch(6, n=8, d=3, c=4)
    centers = torch.randn(4, 3, dtype=torch.float64)
    by_hand = sum(0.5 * float(((x[i] - centers[y[i]]) ** 2).sum()) for i in range(8)) / 8
    assert float(center_loss(x, y, centers)) == pytest.approx(by_hand, rel=1e-12)
    with pytest.raises(ValueError, match="centers"):
        center_loss(x, y, torch.zeros(4, 2))
    head = AngularSoftmaxLoss.make_head(3, 4).double()
    got = angular_softmax_loss(head(x).logits, x, y, m=3, lam=2.0)
    assert float(got.detach()) == pytest.approx(_a_softmax_by_hand(x, head.weight.detach(), y, 3, 2.0), rel=1e-9)


# --------------------------------------------------------------------------- set_centers


def test_set_centers_places_the_centers_and_the_update_starts_from_them():
    x, y = _batch(7, n=6, d=2, c=3, dtype=torch.float32)
    loss_fn = CenterLoss(3, 2, alpha=0.5)
    loss_fn(x * 10, y)  # a pending update measured from the old (zero) centers ...
    new = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, -1.0]], dtype=torch.float64)
    loss_fn.set_centers(new)  # ... is discarded
    assert loss_fn.centers.dtype == torch.float32
    torch.testing.assert_close(loss_fn.centers, new.float())
    value = loss_fn(x, y)
    expected = sum(0.5 * float(((x[i] - new[y[i]].float()) ** 2).sum()) for i in range(6)) / 6
    assert float(value) == pytest.approx(expected, rel=1e-6)
    loss_fn.post_step()
    # Wen et al.: c_j -= alpha * sum_{y_i = j} (c_j - x_i) / (1 + n_j), from the set centers
    for j in range(3):
        members = x[y == j]
        delta = (new[j].float() - members).sum(0) / (1 + len(members))
        torch.testing.assert_close(loss_fn.centers[j], new[j].float() - 0.5 * delta)
    with pytest.raises(ValueError, match=r"\(num_classes, embedding_dim\) = \(3, 2\), got \(2, 3\)"):
        loss_fn.set_centers(torch.zeros(2, 3))
    with pytest.raises(ValueError, match="finite"):
        loss_fn.set_centers(torch.full((3, 2), float("nan")))
    restored = CenterLoss(3, 2)
    restored.load_state_dict(loss_fn.state_dict())  # the set centers are checkpointed state
    torch.testing.assert_close(restored.centers, loss_fn.centers)


# --------------------------------------------------------------------------- ignore_index


def _logits_and_targets(seed=8, n=10, c=5, ignore=-100, ignored=(1, 4, 7)):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, c, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, c, (n,), generator=g)
    y[list(ignored)] = ignore
    return logits, y


@pytest.mark.parametrize("ignore", [-100, 2])
@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("weighted", [False, True])
def test_cross_entropy_ignore_index_matches_torch(ignore, eps, weighted):
    logits, y = _logits_and_targets(ignore=ignore)
    weights = [0.5, 1.0, 2.0, 1.5, 0.25] if weighted else None
    if eps:
        ours_fn = LabelSmoothingCrossEntropy(eps, weights, ignore_index=ignore)
    else:
        ours_fn = CrossEntropyLoss(weights, ignore)
    ours = ours_fn(logits, y)
    w = None if weights is None else torch.tensor(weights, dtype=torch.float64)
    ref = F.cross_entropy(logits, y, weight=w, ignore_index=ignore, label_smoothing=eps)
    torch.testing.assert_close(ours.loss, ref)
    g_ours, = torch.autograd.grad(ours, logits)
    g_ref, = torch.autograd.grad(ref, logits)
    torch.testing.assert_close(g_ours, g_ref)
    assert torch.all(g_ours[y == ignore] == 0)


def test_hinge_ignore_index_matches_a_hand_computation():
    logits, y = _logits_and_targets(seed=9, ignored=(0, 5))
    kept = [i for i in range(10) if int(y[i]) != -100]
    scores = logits.detach()
    total = 0.0
    for i in kept:
        for j in range(5):
            if j != int(y[i]):
                total += max(0.0, float(scores[i, j] - scores[i, y[i]]) + 1.0)
    ours = MultiClassHingeLoss()(logits, y)
    assert float(ours.detach()) == pytest.approx(total / len(kept), rel=1e-12)
    assert float(multi_class_hinge_loss(scores, y, ignore_index=-100)) == pytest.approx(total / len(kept), rel=1e-12)
    ours.backward()
    assert torch.all(logits.grad[[0, 5]] == 0) and logits.grad[kept].abs().sum() > 0


@pytest.mark.parametrize(("cls", "beta"), [(SoftBootstrappingLoss, 0.95), (HardBootstrappingLoss, 0.8)])
def test_bootstrapping_ignore_index_leaves_the_sample_out(cls, beta):
    logits, y = _logits_and_targets(seed=10, ignored=(2, 3))
    kept = [i for i in range(10) if int(y[i]) != -100]
    q = torch.softmax(logits.detach(), dim=1)
    total = 0.0
    for i in kept:
        guess = q[i] if cls is SoftBootstrappingLoss else F.one_hot(q[i].argmax(), 5).double()
        target = beta * F.one_hot(y[i], 5).double() + (1 - beta) * guess
        total += -float((target * q[i].log()).sum())
    ours = cls(beta)(logits, y)
    assert float(ours.detach()) == pytest.approx(total / len(kept), rel=1e-12)
    ours.backward()
    assert torch.all(logits.grad[[2, 3]] == 0)


def test_ignore_index_edge_cases():
    logits = torch.randn(3, 4, requires_grad=True)
    everything_ignored = torch.full((3,), -100)
    for loss_fn in (CrossEntropyLoss(), LabelSmoothingCrossEntropy(), CrossEntropyLoss([1.0, 2.0, 1.0, 1.0]),
                    MultiClassHingeLoss(), SoftBootstrappingLoss(), HardBootstrappingLoss()):
        out = loss_fn(logits, everything_ignored)
        assert float(out.detach()) == 0.0, loss_fn  # torch would give NaN
        grad, = torch.autograd.grad(out, logits)
        assert torch.all(grad == 0)
    # soft targets have no index: nothing is ignored
    soft = torch.softmax(torch.randn(3, 4), dim=1)
    torch.testing.assert_close(CrossEntropyLoss()(logits, soft).loss, -(soft * logits.log_softmax(1)).sum(1).mean())
    # the recipe layer takes it like any parameter; a bad value names the fix
    assert build_loss({"name": "hinge", "params": {"ignore_index": 3}}, num_classes=4).ignore_index == 3
    with pytest.raises(RecipeError, match="ignore_index must be an integer"):
        build_loss({"name": "cross_entropy", "params": {"ignore_index": "none"}}, num_classes=4)
    # ignore_index=None ignores nothing; label_smoothing_cross_entropy is the same as the module
    y = torch.tensor([0, 1, 2])
    torch.testing.assert_close(label_smoothing_cross_entropy(logits, y, 0.0, ignore_index=None),
                               F.cross_entropy(logits, y))


# --------------------------------------------------------------------------- pairwise distances


def _max_relative_error(d: torch.Tensor, ref: torch.Tensor) -> float:
    off_diagonal = ~torch.eye(ref.shape[0], dtype=torch.bool)
    return float(((d.double() - ref).abs() / ref)[off_diagonal].max())


def test_pairwise_distances_are_accurate_in_float32_with_a_large_shared_offset():
    g = torch.Generator().manual_seed(11)
    spread = 0.1 * torch.randn(64, 16, generator=g, dtype=torch.float64)
    offset = torch.randn(16, generator=g, dtype=torch.float64)
    x = (spread + 30.0 * offset / offset.norm()).float()  # the offset has norm 30
    ref = torch.cdist(x.double(), x.double())  # float64, from the same float32 inputs
    error = _max_relative_error(pairwise_distances(x), ref)
    assert error < 2e-6, error  # measured 2.3e-7 (uncentred: 1.3e-3)
    # the uncentred |a|^2 + |b|^2 - 2 a.b in float32, which this guards against, is far off
    sq = (x * x).sum(1)
    uncentred = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp(min=0).sqrt()
    assert _max_relative_error(uncentred, ref) > 1e-4
    squared = pairwise_distances(x, squared=True).double()
    assert _max_relative_error(squared, ref**2) < 4e-6
    # the triplet loss does not move when the whole batch is shifted
    y = torch.arange(64) % 8
    shifted = triplet_loss(x, y, mining="batch_all")
    centred = triplet_loss(spread.float(), y, mining="batch_all")
    assert float(shifted) == pytest.approx(float(centred), rel=1e-5, abs=1e-7)


def test_pairwise_distance_gradient_is_unchanged_by_centring():
    x, _ = _batch(12, n=7, d=3)
    x = x.requires_grad_(True)
    weights = torch.rand(7, 7, dtype=torch.float64)
    g_ours, = torch.autograd.grad((pairwise_distances(x) * weights).sum(), x)
    direct = ((x[:, None, :] - x[None, :, :]) ** 2).sum(-1).add(1e-12).sqrt()
    g_ref, = torch.autograd.grad((direct * weights).sum(), x)
    torch.testing.assert_close(g_ours, g_ref)


def test_recall_at_1_is_exact_in_float32_with_a_large_shared_offset():
    g = torch.Generator().manual_seed(0)
    y = torch.arange(200) % 20
    centers = 0.3 * torch.randn(20, 8, generator=g, dtype=torch.float64)
    x = (centers[y] + 0.2 * torch.randn(200, 8, generator=g, dtype=torch.float64) + 100.0).float()
    reference = recall_at_1(x.double(), y)
    assert recall_at_1(x, y) == reference
    sq = (x * x).sum(1)  # the uncentred float32 ranking picks other neighbours here
    scores = sq[None, :] - 2 * x @ x.T
    scores.fill_diagonal_(float("inf"))
    assert float((y[scores.argmin(1)] == y).double().mean()) != reference


# --------------------------------------------------------------------------- cyclic schedule


def _lrs(optimizer, scheduler, steps):
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


def _optimizer(lr=0.5):
    return torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=lr, momentum=0.9)


@pytest.mark.parametrize(
    ("mode", "gamma", "step_size_down"),
    [("triangular", 1.0, None), ("triangular2", 1.0, None), ("exp_range", 0.997, None), ("triangular", 1.0, 3),
     ("triangular2", 1.0, 11)],
)
def test_cyclic_with_torch_arguments_gives_torchs_exact_lr_sequence(mode, gamma, step_size_down):
    kwargs = dict(base_lr=0.001, max_lr=0.1, step_size_up=7, step_size_down=step_size_down, mode=mode, gamma=gamma)
    ours_opt, ref_opt = _optimizer(), _optimizer()
    ours = CyclicSchedule(ours_opt, **kwargs)  # no total_steps: like torch, the cycle has no end
    ref = torch_sched.CyclicLR(ref_opt, cycle_momentum=False, **kwargs)
    n = 7 * 2 * 4 + 5
    ours_lrs, ref_lrs = _lrs(ours_opt, ours, n), _lrs(ref_opt, ref, n)
    assert ours_lrs == ref_lrs  # the same floats, not just close
    peak = 0.001 + 0.099 * (gamma**7 if mode == "exp_range" else 1.0)  # the top of the first cycle, step 7
    assert ours_lrs[0] == 0.001 and ours_lrs[7] == pytest.approx(peak, rel=1e-12)
    assert ours.get_last_lr() == ref.get_last_lr()
    assert ours.total_steps is None


def test_cyclic_own_arguments_and_torch_names_agree():
    a_opt, b_opt = _optimizer(0.01), _optimizer(0.01)
    a = build_scheduler("cyclic", a_opt, 100, 10, max_lr=0.1, step_size_epochs=0.5, mode="triangular2")
    b = build_scheduler("cyclic", b_opt, 100, 10, max_lr=0.1, step_size_up=5, mode="triangular2")
    assert _lrs(a_opt, a, 40) == _lrs(b_opt, b, 40)
    state = b.state_dict()
    resumed_opt = _optimizer(0.01)
    resumed = CyclicSchedule(resumed_opt, max_lr=0.1, step_size_up=5, mode="triangular2")
    resumed.load_state_dict(state)
    assert resumed_opt.param_groups[0]["lr"] == b_opt.param_groups[0]["lr"]


def test_cyclic_torch_style_mistakes_name_the_fix():
    with pytest.raises(RecipeError, match="by keyword"):
        CyclicSchedule(_optimizer(), 0.001, 0.1)  # torch's positional (base_lr, max_lr)
    with pytest.raises(RecipeError, match="cycle_momentum=False"):
        CyclicSchedule(_optimizer(), base_lr=0.001, max_lr=0.1, step_size_up=4, cycle_momentum=True)
    with pytest.raises(RecipeError, match="got both: step_size_iters=4 and step_size_up=4"):
        CyclicSchedule(_optimizer(0.01), max_lr=0.1, step_size_iters=4, step_size_up=4)
    with pytest.raises(RecipeError, match="step_size_down must be >= 1"):
        CyclicSchedule(_optimizer(0.01), max_lr=0.1, step_size_up=4, step_size_down=0)
    CyclicSchedule(_optimizer(), base_lr=0.001, max_lr=0.1, step_size_up=4, cycle_momentum=False)
