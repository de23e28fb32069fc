"""The loss zoo against independent computations: textbook formulas written out in loops,
or torch/timm built-ins with a known relation. Never against our own earlier output."""

from __future__ import annotations

import math
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from convrecipes.errors import RecipeError, UnknownNameError
from convrecipes.losses import (
    LOSSES,
    AngularHead,
    AngularSoftmaxLoss,
    CenterLoss,
    CrossEntropyLoss,
    LabelSmoothingCrossEntropy,
    LossOutput,
    MultiClassHingeLoss,
    TripletLoss,
    WeightedSumLoss,
    as_loss_output,
    build_loss,
    cos_multiple_angle,
    loss_param_groups,
    sphereface_lambda,
    sphereface_psi,
)
from convrecipes.models.output import ModelOutput

torch.set_num_threads(1)


def _loss_value(value) -> torch.Tensor:
    return as_loss_output(value).loss


# --------------------------------------------------------------------------- hinge


def _cs231n_hinge(scores: torch.Tensor, y: torch.Tensor, delta: float, squared: bool) -> torch.Tensor:
    total = scores.new_zeros(())
    for i in range(scores.shape[0]):
        for j in range(scores.shape[1]):
            if j == int(y[i]):
                continue
            term = torch.clamp(scores[i, j] - scores[i, y[i]] + delta, min=0)
            total = total + (term**2 if squared else term)
    return total / scores.shape[0]


@pytest.mark.parametrize("squared", [False, True])
@pytest.mark.parametrize("margin", [1.0, 0.5])
def test_hinge_value_matches_cs231n_and_multimargin(margin, squared):
    torch.manual_seed(0)
    scores = torch.randn(7, 5, dtype=torch.float64)
    y = torch.randint(0, 5, (7,))
    ours = MultiClassHingeLoss(margin=margin, squared=squared)(scores, y)
    torch.testing.assert_close(ours, _cs231n_hinge(scores, y, margin, squared))
    multimargin = nn.MultiMarginLoss(p=2 if squared else 1, margin=margin)(scores, y) * scores.shape[1]
    torch.testing.assert_close(ours, multimargin)


@pytest.mark.parametrize("squared", [False, True])
def test_hinge_gradient_matches_hand_derivative(squared):
    torch.manual_seed(1)
    scores = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    MultiClassHingeLoss(squared=squared)(ModelOutput(scores, None), y).backward()
    expected = torch.zeros(6, 4, dtype=torch.float64)
    s = scores.detach()
    for i in range(6):
        for j in range(4):
            if j == int(y[i]):
                continue
            m = float(s[i, j] - s[i, y[i]] + 1.0)
            if m > 0:
                g = 2 * m if squared else 1.0
                expected[i, j] += g / 6
                expected[i, y[i]] -= g / 6
    torch.testing.assert_close(scores.grad, expected)


def test_hinge_equal_scores_cost_c_minus_one_margins():
    y = torch.tensor([0, 3, 2])
    assert float(MultiClassHingeLoss(margin=1.0)(torch.zeros(3, 5), y)) == pytest.approx(4.0)


def test_hinge_refuses_soft_targets():
    with pytest.raises(ValueError, match="soft targets"):
        MultiClassHingeLoss()(torch.randn(4, 3), torch.full((4, 3), 1 / 3))


# --------------------------------------------------------------------------- cross-entropy


def _smoothed_ce_loops(logits: torch.Tensor, q: torch.Tensor, eps: float) -> torch.Tensor:
    """-sum_k q'_k log softmax_k with q' = (1 - eps) q + eps / K, written out per sample."""
    batch, k_classes = logits.shape
    total = logits.new_zeros(())
    for i in range(batch):
        log_z = torch.log(sum(torch.exp(logits[i, k]) for k in range(k_classes)))
        for k in range(k_classes):
            target = (1 - eps) * float(q[i, k]) + eps / k_classes
            total = total - target * (logits[i, k] - log_z)
    return total / batch


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_label_smoothing_matches_torch_and_explicit_distribution(eps):
    torch.manual_seed(2)
    logits = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 5, (6,))
    ours = LabelSmoothingCrossEntropy(eps=eps)(logits, y)
    reference = F.cross_entropy(logits, y, label_smoothing=eps)
    torch.testing.assert_close(ours, reference)
    explicit = _smoothed_ce_loops(logits, F.one_hot(y, 5).double(), eps)
    torch.testing.assert_close(ours.double(), explicit, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(reference, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)


def test_label_smoothing_matches_timm():
    from timm.loss import LabelSmoothingCrossEntropy as TimmLSCE

    torch.manual_seed(3)
    logits, y = torch.randn(8, 10), torch.randint(0, 10, (8,))
    torch.testing.assert_close(LabelSmoothingCrossEntropy(0.1)(logits, y), TimmLSCE(smoothing=0.1)(logits, y))


def test_label_smoothing_soft_targets_are_smoothed_too():
    torch.manual_seed(4)
    logits = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    q = torch.softmax(torch.randn(5, 4, dtype=torch.float64) * 2, dim=1)
    ours = LabelSmoothingCrossEntropy(eps=0.2)(logits, q)
    explicit = _smoothed_ce_loops(logits, q, 0.2)
    torch.testing.assert_close(ours.double(), explicit, rtol=1e-6, atol=1e-6)
    (g_ours,) = torch.autograd.grad(ours, logits)
    (g_ref,) = torch.autograd.grad(explicit, logits)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-5, atol=1e-6)
    # torch smooths probability targets the same way
    torch.testing.assert_close(ours.double(), F.cross_entropy(logits, q, label_smoothing=0.2), rtol=1e-6, atol=1e-6)


def test_cross_entropy_indices_and_soft_targets():
    torch.manual_seed(5)
    logits = torch.randn(6, 3)
    y = torch.randint(0, 3, (6,))
    q = torch.softmax(torch.randn(6, 3), dim=1)
    loss = LOSSES.get("cross_entropy")()
    torch.testing.assert_close(loss(logits, y), F.cross_entropy(logits, y))
    torch.testing.assert_close(loss(ModelOutput(logits, None), q), F.cross_entropy(logits, q))
    torch.testing.assert_close(loss(logits, F.one_hot(y, 3).float()), loss(logits, y))


def test_class_weights_match_torch_and_one_hot_equals_indices():
    torch.manual_seed(6)
    logits, y = torch.randn(8, 4), torch.randint(0, 4, (8,))
    w = [0.5, 2.0, 1.0, 3.0]
    for eps in (0.0, 0.1):
        loss = LabelSmoothingCrossEntropy(eps=eps, class_weights=w)
        expected = F.cross_entropy(logits, y, weight=torch.tensor(w), label_smoothing=eps)
        torch.testing.assert_close(loss(logits, y), expected)
        torch.testing.assert_close(loss(logits, F.one_hot(y, 4).float()), expected)
    assert "class_weights" not in CrossEntropyLoss(class_weights=w).state_dict()
    with pytest.raises(ValueError, match="class_weights"):
        CrossEntropyLoss(class_weights=[1.0, 2.0])(logits, y)


def test_label_smoothing_rejects_bad_eps():
    with pytest.raises(ValueError, match="eps"):
        LabelSmoothingCrossEntropy(eps=1.0)


# --------------------------------------------------------------------------- triplet


def _dist(a: torch.Tensor, b: torch.Tensor, squared: bool) -> torch.Tensor:
    sq = ((a - b) ** 2).sum()
    return sq if squared else torch.sqrt(sq + 1e-12)


def _brute_triplet(emb, labels, margin, mining, squared, normalize, soft):
    """Every (a, p, n) written out; returns (loss, active, mined, fallbacks)."""
    x = F.normalize(emb, dim=1) if normalize else emb
    b = x.shape[0]
    lab = [int(v) for v in labels]

    def f(gap):
        return F.softplus(gap) if soft else torch.clamp(gap + margin, min=0)

    terms, fallbacks = [], 0
    for a in range(b):
        pos = [p for p in range(b) if p != a and lab[p] == lab[a]]
        neg = [n for n in range(b) if lab[n] != lab[a]]
        if not pos or not neg:
            continue
        if mining == "batch_hard":
            hp = max((_dist(x[a], x[p], squared) for p in pos), key=lambda t: float(t.detach()))
            hn = min((_dist(x[a], x[n], squared) for n in neg), key=lambda t: float(t.detach()))
            terms.append(f(hp - hn))
            continue
        for p in pos:
            d_ap = _dist(x[a], x[p], squared)
            d_an = [_dist(x[a], x[n], squared) for n in neg]
            if mining == "semi_hard":
                farther = [d for d in d_an if float(d.detach()) > float(d_ap.detach())]
                if farther:
                    chosen = min(farther, key=lambda t: float(t.detach()))
                else:
                    chosen = max(d_an, key=lambda t: float(t.detach()))
                    fallbacks += 1
                terms.append(f(d_ap - chosen))
            else:
                terms.extend(f(d_ap - d) for d in d_an)
    active = sum(1 for t in terms if float(t.detach()) > 0)
    total = sum(terms)
    if mining == "batch_all_nonzero":
        loss = total / max(active, 1)
    else:
        loss = total / len(terms)
    return loss, active, len(terms), fallbacks


def _triplet_batch():
    torch.manual_seed(7)
    # 4 classes x 3 images, plus one singleton (class 9): an anchor with no positive.
    labels = torch.tensor([0, 1, 2, 3] * 3 + [9])
    emb = (torch.randn(13, 6, dtype=torch.float64) * 0.6 + F.one_hot(labels % 6, 6).double()).requires_grad_()
    return emb, labels


@pytest.mark.parametrize("soft_margin", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("distance", ["euclidean", "squared"])
@pytest.mark.parametrize("mining", ["batch_hard", "batch_all", "batch_all_nonzero", "semi_hard"])
def test_triplet_matches_brute_force(mining, distance, normalize, soft_margin):
    emb, labels = _triplet_batch()
    margin = 0.2 if normalize else 0.5
    loss_fn = TripletLoss(margin=margin, mining=mining, distance=distance, normalize=normalize, soft_margin=soft_margin)
    out = loss_fn(ModelOutput(torch.zeros(13, 10), emb), labels)
    assert isinstance(out, LossOutput)
    ref, active, mined, fallbacks = _brute_triplet(
        emb, labels, margin, mining, distance == "squared", normalize, soft_margin
    )
    torch.testing.assert_close(out.loss.double(), ref, rtol=1e-4, atol=1e-5)
    (g_ours,) = torch.autograd.grad(out.loss, emb)
    (g_ref,) = torch.autograd.grad(ref, emb)
    torch.testing.assert_close(g_ours, g_ref, rtol=1e-3, atol=1e-5)
    assert float(out.stats["anchors_without_positive"]) == 1.0
    assert float(out.stats["active_fraction"]) == pytest.approx(active / mined)
    if mining == "semi_hard":
        assert float(out.stats["fallback_fraction"]) == pytest.approx(fallbacks / mined)


def test_triplet_fixture_exercises_both_semi_hard_branches_and_partial_activity():
    emb, labels = _triplet_batch()
    _, _, mined, fallbacks = _brute_triplet(emb, labels, 0.5, "semi_hard", False, False, False)
    assert 0 < fallbacks < mined
    _, active, mined, _ = _brute_triplet(emb, labels, 0.5, "batch_all", False, False, False)
    assert 0 < active < mined  # so batch_all and batch_all_nonzero really differ


def test_triplet_no_positive_anywhere_is_zero_not_nan():
    emb = torch.randn(5, 4, requires_grad=True)
    for mining in ("batch_hard", "batch_all", "batch_all_nonzero", "semi_hard"):
        out = TripletLoss(mining=mining)(ModelOutput(torch.zeros(5, 5), emb), torch.arange(5))
        (grad,) = torch.autograd.grad(out.loss, emb)
        assert float(out.loss.detach()) == 0.0 and torch.all(grad == 0)
        assert float(out.stats["anchors_without_positive"]) == 5


def test_triplet_euclidean_gradient_finite_at_zero_distance():
    emb = torch.tensor([[1.0, 2.0], [1.0, 2.0], [0.0, 0.0], [0.0, 0.1]], requires_grad=True)
    out = TripletLoss(mining="batch_all")(ModelOutput(torch.zeros(4, 2), emb), torch.tensor([0, 0, 1, 1]))
    out.loss.backward()
    assert torch.isfinite(emb.grad).all()


def test_triplet_needs_embeddings_and_indices():
    # A plain tensor is the embeddings (tests/test_losses_research_api.py); a ModelOutput
    # without embeddings is refused.
    with pytest.raises(ValueError, match="ModelOutput"):
        TripletLoss()(ModelOutput(torch.randn(4, 3), None), torch.tensor([0, 0, 1, 1]))
    with pytest.raises(ValueError, match="soft targets"):
        TripletLoss()(ModelOutput(torch.randn(4, 3), torch.randn(4, 2)), torch.full((4, 3), 1 / 3))
    with pytest.raises(ValueError, match="mining"):
        TripletLoss(mining="hardest")


# --------------------------------------------------------------------------- center loss


def _centers_after_paper_update(centers: torch.Tensor, x: torch.Tensor, y: torch.Tensor, alpha: float):
    new = centers.clone()
    for j in range(centers.shape[0]):
        members = [i for i in range(len(y)) if int(y[i]) == j]
        delta = torch.zeros(centers.shape[1], dtype=centers.dtype)
        for i in members:
            delta += centers[j] - x[i]
        new[j] = centers[j] - alpha * delta / (1 + len(members))
    return new


def test_center_loss_value_and_gradient():
    torch.manual_seed(8)
    loss_fn = CenterLoss(num_classes=4, embedding_dim=3)
    loss_fn.centers.copy_(torch.randn(4, 3))
    c = loss_fn.centers.clone()
    x = torch.randn(6, 3, requires_grad=True)
    y = torch.tensor([0, 1, 1, 3, 0, 1])
    value = loss_fn(ModelOutput(torch.zeros(6, 4), x), y)
    expected = sum(0.5 * float(((x[i].detach() - c[y[i]]) ** 2).sum()) for i in range(6)) / 6
    assert float(value.detach()) == pytest.approx(expected, rel=1e-6)
    value.backward()
    expected_grad = torch.stack([(x[i].detach() - c[y[i]]) / 6 for i in range(6)])
    torch.testing.assert_close(x.grad, expected_grad)
    assert list(loss_fn.parameters()) == [] and not loss_fn.centers.requires_grad
    assert set(loss_fn.state_dict()) == {"centers"}


def test_center_update_rule_and_absent_class_stays_put():
    torch.manual_seed(9)
    loss_fn = CenterLoss(num_classes=5, embedding_dim=3, alpha=0.5)
    loss_fn.centers.copy_(torch.randn(5, 3))
    before = loss_fn.centers.clone()
    x = torch.randn(7, 3)
    y = torch.tensor([0, 0, 0, 1, 3, 3, 1])  # classes 2 and 4 absent
    loss_fn(ModelOutput(torch.zeros(7, 5), x), y)
    torch.testing.assert_close(loss_fn.centers, before)  # nothing moves before post_step
    loss_fn.post_step()
    torch.testing.assert_close(loss_fn.centers, _centers_after_paper_update(before, x, y, 0.5))
    assert torch.equal(loss_fn.centers[2], before[2]) and torch.equal(loss_fn.centers[4], before[4])
    loss_fn.post_step()  # nothing pending: no movement
    torch.testing.assert_close(loss_fn.centers, _centers_after_paper_update(before, x, y, 0.5))


def test_center_two_micro_batches_equal_one_combined_batch():
    torch.manual_seed(10)
    x = torch.randn(10, 4)
    y = torch.randint(0, 3, (10,))
    start = torch.randn(3, 4)
    split, combined = CenterLoss(3, 4, alpha=0.6), CenterLoss(3, 4, alpha=0.6)
    split.centers.copy_(start)
    combined.centers.copy_(start)
    split(ModelOutput(torch.zeros(4, 3), x[:4]), y[:4])
    split(ModelOutput(torch.zeros(6, 3), x[4:]), y[4:])
    split.post_step()
    combined(ModelOutput(torch.zeros(10, 3), x), y)
    combined.post_step()
    torch.testing.assert_close(split.centers, combined.centers)
    torch.testing.assert_close(combined.centers, _centers_after_paper_update(start, x, y, 0.6))


def test_center_eval_mode_does_not_accumulate_and_state_round_trips():
    loss_fn = CenterLoss(2, 2).eval()
    loss_fn(ModelOutput(torch.zeros(2, 2), torch.ones(2, 2)), torch.tensor([0, 1]))
    loss_fn.post_step()
    assert torch.all(loss_fn.centers == 0)
    loss_fn.train()
    loss_fn(ModelOutput(torch.zeros(2, 2), torch.ones(2, 2)), torch.tensor([0, 1]))
    loss_fn.post_step()
    restored = CenterLoss(2, 2)
    restored.load_state_dict(loss_fn.state_dict())
    torch.testing.assert_close(restored.centers, torch.full((2, 2), 0.25))  # 0.5 * (1 - 0) / 2


def test_center_refuses_soft_targets_and_missing_embeddings():
    with pytest.raises(ValueError, match="soft targets"):
        CenterLoss(3, 2)(ModelOutput(torch.zeros(2, 3), torch.zeros(2, 2)), torch.full((2, 3), 1 / 3))
    with pytest.raises(ValueError, match="embeddings"):
        CenterLoss(3, 2)(ModelOutput(torch.zeros(2, 3), None), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="embedding_dim"):
        CenterLoss(3, 2)(ModelOutput(torch.zeros(2, 3), torch.zeros(2, 5)), torch.tensor([0, 1]))


def _ddp_center_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        gen = torch.Generator().manual_seed(11)
        x, y, start = torch.randn(8, 3, generator=gen), torch.randint(0, 4, (8,), generator=gen), torch.randn(4, 3, generator=gen)
        loss_fn = CenterLoss(4, 3, alpha=0.5)
        loss_fn.centers.copy_(start)
        half = slice(0, 4) if rank == 0 else slice(4, 8)
        loss_fn(ModelOutput(torch.zeros(4, 4), x[half]), y[half])
        loss_fn.post_step()
        np.save(os.path.join(out_dir, f"rank{rank}.npy"), loss_fn.centers.numpy())
    finally:
        dist.destroy_process_group()


def test_center_update_is_all_reduced_under_ddp(tmp_path):
    import torch.multiprocessing as mp

    mp.start_processes(
        _ddp_center_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, start_method="fork"
    )
    rank0, rank1 = (torch.from_numpy(np.load(tmp_path / f"rank{r}.npy")) for r in (0, 1))
    gen = torch.Generator().manual_seed(11)
    x, y, start = torch.randn(8, 3, generator=gen), torch.randint(0, 4, (8,), generator=gen), torch.randn(4, 3, generator=gen)
    assert torch.equal(rank0, rank1)
    torch.testing.assert_close(rank0, _centers_after_paper_update(start, x, y, 0.5))


# --------------------------------------------------------------------------- A-Softmax


def _psi_reference(theta: float, m: int) -> float:
    k = min(int(math.floor(theta * m / math.pi)), m - 1)
    return (-1) ** k * math.cos(m * theta) - 2 * k


def test_psi_known_values_and_formula():
    ones = torch.tensor([1.0, -1.0], dtype=torch.float64)
    for m in (1, 2, 3, 4):
        torch.testing.assert_close(sphereface_psi(ones, m), torch.tensor([1.0, 1.0 - 2 * m], dtype=torch.float64))
    thetas = np.linspace(0.0, math.pi, 181)
    for m in (1, 2, 3, 4):
        ours = sphereface_psi(torch.cos(torch.tensor(thetas, dtype=torch.float64)), m)
        expected = torch.tensor([_psi_reference(t, m) for t in thetas], dtype=torch.float64)
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-9)
        assert torch.all(ours[1:] < ours[:-1])  # monotone decreasing in theta
    c = torch.tensor([0.3, -0.7, 0.95], dtype=torch.float64)
    for m in (1, 2, 3, 4):
        expected = torch.tensor([math.cos(m * math.acos(v)) for v in c.tolist()], dtype=torch.float64)
        torch.testing.assert_close(cos_multiple_angle(c, m), expected)


@pytest.mark.parametrize("m", [2, 3, 4])
def test_psi_continuous_at_interval_boundaries(m):
    for k in range(1, m):
        boundary = k * math.pi / m
        left, right = (torch.cos(torch.tensor(boundary + s, dtype=torch.float64)) for s in (-1e-7, 1e-7))
        assert abs(float(sphereface_psi(left, m) - sphereface_psi(right, m))) < 1e-5


def test_psi_and_loss_gradients_finite_at_cos_plus_minus_one():
    c = torch.tensor([1.0, -1.0], requires_grad=True)
    sphereface_psi(c, 4).sum().backward()
    assert torch.isfinite(c.grad).all()
    torch.testing.assert_close(c.grad, torch.tensor([16.0, 16.0]))  # dT_4/dc = 32c^3 - 16c; -(-16) at c = -1

    head = AngularHead(3, 2)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]))
    x = torch.tensor([[2.0, 0.0, 0.0], [-3.0, 0.0, 0.0]], requires_grad=True)  # cos_y = +1 and -1
    out = AngularSoftmaxLoss(base=0.0, lambda_min=0.0)(head(x), torch.tensor([0, 0]))
    out.loss.backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(head.weight.grad).all()
    assert x.grad.abs().sum() > 0


def test_lambda_schedule_values_and_resume():
    assert float(sphereface_lambda(0)) == pytest.approx(1000.0)
    assert float(sphereface_lambda(1)) == pytest.approx(1000.0 / 1.12)
    assert float(sphereface_lambda(100)) == pytest.approx(1000.0 / 13.0)
    assert float(sphereface_lambda(10_000)) == pytest.approx(5.0)  # 1000 / 1201 < 5
    assert float(sphereface_lambda(10, base=50.0, gamma=0.5, power=2.0, lambda_min=0.0)) == pytest.approx(50.0 / 36.0)
    loss_fn = AngularSoftmaxLoss()
    for _ in range(3):
        loss_fn.post_step()
    assert float(loss_fn.current_lambda()) == pytest.approx(1000.0 / 1.36)
    resumed = AngularSoftmaxLoss()
    resumed.load_state_dict(loss_fn.state_dict())
    assert int(resumed.iteration) == 3 and float(resumed.current_lambda()) == pytest.approx(1000.0 / 1.36)


def _a_softmax_reference(x: torch.Tensor, w: torch.Tensor, y: torch.Tensor, m: int, lam: float) -> torch.Tensor:
    """Per sample: logits ||x|| cos(theta_j), the true one replaced, then -log softmax."""
    total = x.new_zeros(())
    for i in range(x.shape[0]):
        norm = torch.sqrt((x[i] ** 2).sum())
        logits = []
        for j in range(w.shape[0]):
            cos = (x[i] * w[j]).sum() / (norm * torch.sqrt((w[j] ** 2).sum()))
            if j == int(y[i]):
                theta = math.acos(float(cos.detach()))
                k = min(int(math.floor(theta * m / math.pi)), m - 1)
                psi = (-1) ** k * torch.cos(m * torch.acos(cos)) - 2 * k
                logits.append((lam * norm * cos + norm * psi) / (1 + lam))
            else:
                logits.append(norm * cos)
        log_z = torch.log(sum(torch.exp(v) for v in logits))
        total = total - (logits[int(y[i])] - log_z)
    return total / x.shape[0]


@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("iteration", [None, 0, 200])
def test_a_softmax_matches_explicit_formula(m, iteration):
    torch.manual_seed(12)
    head = AngularSoftmaxLoss.make_head(5, 4).double()
    x = torch.randn(6, 5, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, 4, (6,))
    if iteration is None:  # lambda = 0: the bare A-Softmax (pytorch-metric-learning's SphereFaceLoss, scale 1)
        loss_fn, lam = AngularSoftmaxLoss(m=m, base=0.0, lambda_min=0.0), 0.0
    else:
        loss_fn = AngularSoftmaxLoss(m=m)
        loss_fn.iteration.fill_(iteration)
        lam = max(5.0, 1000.0 * (1 + 0.12 * iteration) ** -1.0)
    ours = loss_fn(head(x), y)
    assert float(ours.stats["lambda"]) == pytest.approx(lam)
    ref = _a_softmax_reference(x, head.weight, y, m, lam)
    torch.testing.assert_close(ours.loss.double(), ref, rtol=1e-5, atol=1e-6)
    g_ours = torch.autograd.grad(ours.loss, (x, head.weight))
    g_ref = torch.autograd.grad(ref, (x, head.weight))
    for a, b in zip(g_ours, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_angular_head_logits_are_norm_times_cosine():
    torch.manual_seed(13)
    head = AngularHead(4, 3)
    x = torch.randn(5, 4)
    out = head(x)
    assert out.embeddings is x
    w_hat = head.weight / head.weight.norm(dim=1, keepdim=True)
    cos = (x @ w_hat.T) / x.norm(dim=1, keepdim=True)
    torch.testing.assert_close(out.logits, x.norm(dim=1, keepdim=True) * cos)
    assert AngularSoftmaxLoss.needs_embeddings is True


def test_a_softmax_errors():
    for m in (0, 5, 2.5):
        with pytest.raises(ValueError, match="1..4"):
            AngularSoftmaxLoss(m=m)
    linear_logits = torch.tensor([[10.0, 0.0]])
    with pytest.raises(ValueError, match="make_head"):
        AngularSoftmaxLoss()(ModelOutput(linear_logits, torch.tensor([[1.0, 0.0]])), torch.tensor([0]))
    with pytest.raises(ValueError, match="soft targets"):
        AngularSoftmaxLoss()(ModelOutput(torch.zeros(2, 2), torch.ones(2, 2)), torch.full((2, 2), 0.5))


# --------------------------------------------------------------------------- composite and build_loss


def test_weighted_sum_parts_sum_to_total_and_hooks_forward():
    torch.manual_seed(14)
    head = AngularHead(3, 4)
    x = torch.randn(8, 3, requires_grad=True)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    ce, center, triplet, angular = CrossEntropyLoss(), CenterLoss(4, 3), TripletLoss(), AngularSoftmaxLoss()
    loss_fn = WeightedSumLoss([("ce", 1.0, ce), ("center", 0.01, center), ("triplet", 0.5, triplet), ("a", 2.0, angular)])
    assert loss_fn.needs_embeddings
    out = loss_fn(head(x), y)
    assert set(out.parts) == {"ce", "center", "triplet", "a"}
    torch.testing.assert_close(sum(out.parts.values()), out.loss.detach())
    separate = (
        F.cross_entropy(head(x).logits, y)
        + 0.01 * 0.5 * (x**2).sum(1).mean()  # centers start at zero
        + 0.5 * triplet(head(x), y).loss
        + 2.0 * angular(head(x), y).loss
    )
    torch.testing.assert_close(out.loss, separate)
    assert "triplet/active_fraction" in out.stats and "a/lambda" in out.stats
    loss_fn.post_step()
    assert int(angular.iteration) == 1 and center.centers.abs().sum() > 0
    assert set(loss_fn.state_dict()) == {"terms.center.centers", "terms.a.iteration"}
    assert not WeightedSumLoss([("ce", 1.0, CrossEntropyLoss())]).needs_embeddings


def test_loss_param_groups_use_each_loss_lr():
    class Learned(nn.Module):
        needs_embeddings = False
        lr = 0.05

        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(()))

        def forward(self, output, target):
            return self.scale * F.cross_entropy(output, target)

    learned = Learned()
    groups = loss_param_groups(WeightedSumLoss([("ce", 1.0, CrossEntropyLoss()), ("learned", 1.0, learned)]))
    assert len(groups) == 1 and groups[0]["lr"] == 0.05 and groups[0]["params"][0] is learned.scale
    assert loss_param_groups(CenterLoss(2, 2)) == []


def test_registry_names():
    assert LOSSES.names() == sorted(["cross_entropy", "label_smoothing_ce", "hinge", "triplet", "center", "angular_softmax",
                                           "soft_bootstrapping", "hard_bootstrapping"])


def test_build_loss_single_and_composite():
    assert type(build_loss({"name": "hinge"}, num_classes=3)) is MultiClassHingeLoss
    assert type(build_loss([{"name": "cross_entropy"}], num_classes=3)) is CrossEntropyLoss
    assert isinstance(build_loss({"name": "hinge", "weight": 2.0}, num_classes=3), WeightedSumLoss)
    ls = build_loss({"name": "label_smoothing_ce", "params": {"eps": 0.2}}, num_classes=3)
    assert ls.eps == 0.2
    loss_fn = build_loss(
        [{"name": "cross_entropy"}, {"name": "center", "weight": 0.003, "params": {"alpha": 0.5}}],
        num_classes=7,
        embedding_dim=16,
    )
    center = loss_fn.terms["center"]
    assert loss_fn.weights == {"cross_entropy": 1.0, "center": 0.003}
    assert center.centers.shape == (7, 16) and center.alpha == 0.5 and loss_fn.needs_embeddings
    twice = build_loss([{"name": "triplet"}, {"name": "triplet", "params": {"mining": "batch_all"}}], num_classes=2)
    assert list(twice.terms) == ["triplet", "triplet_2"]


def test_build_loss_errors():
    with pytest.raises(RecipeError, match=r"'alpa' \(did you mean 'alpha'\?\) \(loss.params\); valid params: alpha"):
        build_loss({"name": "center", "params": {"alpa": 0.5}}, num_classes=3, embedding_dim=2)
    with pytest.raises(RecipeError, match=r"'hinge' has no parameter 'num_classes'.*valid params: ignore_index, margin, squared"):
        build_loss({"name": "hinge", "params": {"num_classes": 3}}, num_classes=3)
    with pytest.raises(UnknownNameError, match="angular_softmax, center, cross_entropy"):
        build_loss({"name": "focal"}, num_classes=3)
    with pytest.raises(RecipeError, match="embedding_dim"):
        build_loss({"name": "center"}, num_classes=3)
    with pytest.raises(RecipeError, match="mining"):
        build_loss({"name": "triplet", "params": {"mining": "hardest"}}, num_classes=3)
    with pytest.raises(RecipeError, match="unknown key 'weigth' \\(did you mean 'weight'\\?\\)"):
        build_loss({"name": "hinge", "weigth": 1.0}, num_classes=3)
    with pytest.raises(RecipeError, match="1..4"):
        build_loss({"name": "angular_softmax", "params": {"m": 6}}, num_classes=3)
    with pytest.raises(RecipeError, match="contradicts"):
        build_loss({"name": "center", "params": {"num_classes": 4}}, num_classes=3, embedding_dim=2)
    with pytest.raises(RecipeError, match="weight must be a number"):
        build_loss({"name": "hinge", "weight": "high"}, num_classes=3)


@pytest.mark.parametrize("name", LOSSES.names())
def test_every_registered_loss_trains_and_round_trips(name):
    torch.manual_seed(15)
    loss_fn = build_loss({"name": name}, num_classes=4, embedding_dim=3)
    assert isinstance(type(loss_fn).needs_embeddings, bool)
    head = AngularHead(3, 4)
    x = torch.randn(8, 3, requires_grad=True)
    out = loss_fn(head(x), torch.tensor([0, 1, 2, 3] * 2))
    value = _loss_value(out)
    assert value.dim() == 0 and torch.isfinite(value)
    value.backward()
    assert torch.isfinite(x.grad).all()
    if hasattr(loss_fn, "post_step"):
        loss_fn.post_step()
    clone = build_loss({"name": name}, num_classes=4, embedding_dim=3)
    clone.load_state_dict(loss_fn.state_dict())
    for key, tensor in loss_fn.state_dict().items():
        assert torch.equal(clone.state_dict()[key], tensor)
