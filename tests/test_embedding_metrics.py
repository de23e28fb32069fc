"""Embedding metrics against small examples computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from convrecipes.embedding_metrics import angular_spread, plot_embeddings_2d, recall_at_1, spread_ratio

torch.set_num_threads(1)


def test_recall_at_1_hand_example():
    # On a line: 0.0(a) 0.1(a) 1.0(b) 1.05(b) 0.6(a) 2.0(b)
    # nearest: 0.0->0.1 a ok; 0.1->0.0 ok; 1.0->1.05 ok; 1.05->1.0 ok; 0.6->1.0 (0.4 < 0.5) wrong;
    # 2.0->1.05 ok.  5 / 6.
    x = torch.tensor([[0.0], [0.1], [1.0], [1.05], [0.6], [2.0]])
    y = torch.tensor([0, 0, 1, 1, 0, 1])
    assert recall_at_1(x, y) == pytest.approx(5 / 6)
    assert recall_at_1(x.numpy(), y.numpy().tolist()) == pytest.approx(5 / 6)


def test_recall_at_1_excludes_self_and_singleton_classes():
    # Duplicate points: self must not count as its own neighbour.
    x = torch.tensor([[0.0, 0.0], [0.0, 0.0], [5.0, 5.0], [5.0, 5.1], [0.0, 0.05]])
    y = torch.tensor([0, 1, 2, 2, 7])  # 0 and 1 and 7 are singletons: only class 2's queries count
    assert recall_at_1(x, y) == 1.0
    with pytest.raises(ValueError, match="two or more"):
        recall_at_1(torch.randn(3, 2), torch.tensor([0, 1, 2]))


def test_recall_at_1_chunked_equals_brute_force():
    torch.manual_seed(0)
    x = torch.randn(300, 5, dtype=torch.float64)
    y = torch.randint(0, 6, (300,))
    d = torch.cdist(x, x)
    d.fill_diagonal_(math.inf)
    brute = float((y[d.argmin(dim=1)] == y).double().mean())
    for chunk in (1, 7, 300, 4096):
        assert recall_at_1(x, y, chunk_size=chunk) == pytest.approx(brute)


def test_recall_at_1_large_input_runs_in_chunks():
    gen = torch.Generator().manual_seed(1)
    y = torch.arange(10_000) % 10
    x = torch.randn(10_000, 16, generator=gen) * 0.1 + torch.nn.functional.one_hot(y, 16).float()
    assert recall_at_1(x, y) == 1.0


def test_spread_ratio_hand_example():
    x = torch.tensor([[0.0, 0.0], [2.0, 0.0], [10.0, 0.0], [10.0, 4.0]])
    y = torch.tensor([0, 0, 1, 1])
    out = spread_ratio(x, y)
    # centers (1, 0) and (10, 2); distances to centers 1, 1, 2, 2
    assert out["within"] == pytest.approx(1.5)
    assert out["between"] == pytest.approx(math.sqrt(85))
    assert out["ratio"] == pytest.approx(1.5 / math.sqrt(85))
    # three classes: between = mean of the three pairwise center distances
    x3 = torch.cat([x, torch.tensor([[1.0, 3.0]])])
    out3 = spread_ratio(x3, torch.tensor([0, 0, 1, 1, 5]))
    assert out3["within"] == pytest.approx(6.0 / 5)
    assert out3["between"] == pytest.approx((math.sqrt(85) + 3.0 + math.sqrt(82)) / 3)


def _unit(deg: float, r: float = 1.0) -> list[float]:
    return [r * math.cos(math.radians(deg)), r * math.sin(math.radians(deg))]


def test_angular_spread_hand_example():
    # class 0 at 0 and 20 deg (center direction 10), class 1 at 90 and 110 (center 100),
    # class 2 alone at 180; lengths differ, which must not matter.
    x = torch.tensor([_unit(0, 1.0), _unit(20, 3.0), _unit(90, 0.5), _unit(110, 2.0), _unit(180, 4.0)])
    y = torch.tensor([0, 0, 1, 1, 2])
    out = angular_spread(x, y)
    assert out["max_within_deg"] == pytest.approx(10.0)
    assert out["min_between_deg"] == pytest.approx(80.0)  # 100 -> 180
    assert out["ratio"] == pytest.approx(10.0 / 80.0)


def test_metrics_need_two_classes_and_matching_shapes():
    with pytest.raises(ValueError, match="two classes"):
        spread_ratio(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="two classes"):
        angular_spread(torch.randn(4, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        recall_at_1(torch.randn(4, 2), torch.zeros(3, dtype=torch.long))


@pytest.mark.parametrize("dim", [2, 5])
def test_plot_embeddings_2d_writes_png(tmp_path, dim):
    torch.manual_seed(2)
    x = torch.randn(60, dim)
    y = torch.arange(60) % 3
    path = plot_embeddings_2d(x, y, tmp_path / "sub" / "emb.png", class_names=["cat", "dog", "owl"])
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000
    assert np.isfinite(x.numpy()).all()
