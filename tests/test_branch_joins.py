"""Branch joins (FractalNet mean join, freeze-drop-path sum) and the branch schedules, against
sums and counts computed here."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from convrecipes.models.branch_joins import (
    BranchCycle,
    FreezeDropPathJoin,
    JoinError,
    MeanJoin,
    branch_shares,
    draw_branch,
    local_keep_mask,
)


class Recorder(nn.Module):
    """conv-BN branch that counts its calls."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.conv = nn.Conv2d(2, 2, 3, padding=1)
        self.bn = nn.BatchNorm2d(2)
        self.calls = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.bn(self.conv(x))


def _join(n: int = 4) -> FreezeDropPathJoin:
    return FreezeDropPathJoin([Recorder(i) for i in range(n)])


def test_active_branch_output_is_the_sum_of_branches_up_to_it_and_eval_sums_all():
    join = _join()
    x = torch.randn(3, 2, 5, 5)
    for b in range(4):
        join.train()
        join.active = b
        out = join(x)
        # reference: branch b in train mode, branches below in eval mode (frozen), each on its own
        expected = join.branches[b](x)
        for i in range(b):
            join.branches[i].eval()
            expected = expected + join.branches[i](x)
            join.branches[i].train()
        torch.testing.assert_close(out, expected)
    join.eval()
    torch.testing.assert_close(join(x), sum(branch(x) for branch in join.branches))


def test_branches_above_the_active_one_are_never_called():
    join = _join()
    join.train()
    join.active = 1
    join(torch.randn(2, 2, 4, 4))
    assert [b.calls for b in join.branches] == [1, 1, 0, 0]


def test_frozen_branches_do_not_move_under_momentum_and_weight_decay():
    join = _join()
    optimizer = torch.optim.SGD(join.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    x = torch.randn(4, 2, 5, 5)
    join.train()
    # a first step with every branch active once, so momentum buffers exist for all of them
    for b in range(4):
        join.active = b
        join(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    before = {k: v.clone() for k, v in join.state_dict().items()}
    join.active = 2
    join(x).square().mean().backward()
    assert all(p.grad is None for i in (0, 1, 3) for p in join.branches[i].parameters())
    optimizer.step()
    after = join.state_dict()
    for key, value in before.items():
        branch = int(key.split(".")[1])
        if branch == 2:
            continue
        assert torch.equal(after[key], value), key  # weights, BN running stats and counters
    assert not torch.equal(after["branches.2.conv.weight"], before["branches.2.conv.weight"])
    assert not torch.equal(after["branches.2.bn.running_mean"], before["branches.2.bn.running_mean"])


def test_draw_frequencies_match_the_squared_shares():
    g = torch.Generator().manual_seed(0)
    n = 4
    draws = torch.tensor([draw_branch(n, g) for _ in range(10_000)])
    shares = [(b + 1) ** 2 / sum((k + 1) ** 2 for k in range(n)) for b in range(n)]
    assert branch_shares(n) == pytest.approx(shares)
    for b in range(n):
        assert abs(float((draws == b).float().mean()) - shares[b]) < 0.02
    # the same generator state gives the same draws (what keeps ranks in agreement)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert [draw_branch(n, g1) for _ in range(50)] == [draw_branch(n, g2) for _ in range(50)]


def test_cycle_has_the_same_shares_and_repeats():
    cycle = BranchCycle(3)
    period = 1 + 4 + 9
    assert cycle.period == period
    first = [cycle.branch(s) for s in range(period)]
    assert [first.count(b) for b in range(3)] == [1, 4, 9]
    assert [cycle.branch(s) for s in range(period, 2 * period)] == first
    # spread out: the most frequent branch never runs more than twice in a row
    runs = max(len(run) for run in "".join(map(str, first * 2)).replace("0", " ").replace("1", " ").split())
    assert runs <= 2


def test_local_drop_keeps_at_least_one_and_drops_at_rate_p():
    g = torch.Generator().manual_seed(0)
    masks = torch.stack([local_keep_mask(3, 0.15, g) for _ in range(20_000)])
    assert bool(masks.any(dim=1).all())
    # P(kept) = 0.85 + P(all dropped) * 1/3
    expected = 0.85 + 0.15 ** 3 / 3
    assert abs(float(masks.float().mean()) - expected) < 0.01
    heavy = torch.stack([local_keep_mask(2, 0.95, g) for _ in range(2000)])
    assert bool(heavy.any(dim=1).all())


def test_mean_join_divides_by_the_survivors():
    join = MeanJoin(3)
    a, b, c = torch.full((2,), 1.0), torch.full((2,), 2.0), torch.full((2,), 6.0)
    torch.testing.assert_close(join([a, b, c]), torch.full((2,), 3.0))
    torch.testing.assert_close(join([a, b, c], keep=torch.tensor([True, False, True])), torch.full((2,), 3.5))
    torch.testing.assert_close(join([a, b, c], keep=torch.tensor([False, True, False])), b)


def test_bad_input_names_the_cause():
    with pytest.raises(JoinError, match="at least 2 branches"):
        MeanJoin(1)
    with pytest.raises(JoinError, match="at least 2 branches"):
        FreezeDropPathJoin([nn.Identity()])
    with pytest.raises(JoinError, match=r"in \[0, 1\)"):
        local_keep_mask(3, 1.0)
    with pytest.raises(JoinError, match=r"in \[0, 1\)"):
        local_keep_mask(3, -0.1)
    join = _join(3)
    join.only = 3
    with pytest.raises(JoinError, match="out of range.*0..2"):
        join(torch.randn(1, 2, 4, 4))
    join.only = 1
    torch.testing.assert_close(join.eval()(torch.ones(1, 2, 4, 4)), join.branches[1](torch.ones(1, 2, 4, 4)))
    with pytest.raises(JoinError, match="at least one True"):
        MeanJoin(2)([torch.ones(1), torch.ones(1)], keep=torch.tensor([False, False]))
