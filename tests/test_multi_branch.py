"""FractalNet, the stagewise boosting network and FreezeDropPathTrainer: the fractal against
its recursive definition, drop-path counts, frozen branches bit-identical after real
trainer steps, and the errors a user can cause."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn

from convrecipes.build import build
from convrecipes.errors import RecipeError
from convrecipes.models import count_parameters, create_model
from convrecipes.models.branch_joins import BranchCycle, FreezeDropPathJoin, JoinError, MeanJoin
from convrecipes.models.fractalnet import FractalBlock, FractalNet
from convrecipes.models.sbn import StagewiseBoostingNet
from convrecipes.recipe import load_recipe
from convrecipes.trainers import TRAINERS, FreezeDropPathTrainer, Trainer
from convrecipes.trainers.freeze_drop_path import freeze_drop_path_joins
from tests.conftest import run_launched

ROOT = Path(__file__).parent.parent


# -- FractalNet ---------------------------------------------------------------------------
def _recursive(block: FractalBlock, c: int, z: torch.Tensor, next_layer: dict[int, int]) -> list[torch.Tensor]:
    """Larsson et al.'s rule, written recursively: f_1(z) = conv(z), f_{C}(z) = join(f_{C-1}(f_{C-1}(z)),
    conv(z)), returning the inputs of the (merged) last join. f_C uses the deepest C columns."""
    n = block.num_columns

    def layer(column: int, x: torch.Tensor) -> torch.Tensor:
        i = next_layer[column]
        next_layer[column] += 1
        return block.columns[column][i](x)

    if c == 1:
        return [layer(n - 1, z)]
    inner = torch.stack(_recursive(block, c - 1, z, next_layer)).mean(0)
    outer = _recursive(block, c - 1, inner, next_layer)
    return outer + [layer(n - c, z)]


@pytest.mark.parametrize("columns", [2, 3, 4])
def test_fractal_block_matches_the_recursive_expansion_rule(columns):
    torch.manual_seed(0)
    block = FractalBlock(2, 3, columns).eval()
    x = torch.randn(2, 2, 6, 6)
    expected = torch.stack(_recursive(block, columns, x, {c: 0 for c in range(columns)})).mean(0)
    torch.testing.assert_close(block(x), expected)
    assert block.joins[str(block.depth)].num_inputs == columns  # the merged last join takes every column
    # every layer of every column is used exactly once
    assert sum(len(col) for col in block.columns) == 2 ** columns - 1


def _record_joins(model: nn.Module) -> list[tuple[list, torch.Tensor, torch.Tensor]]:
    calls: list = []

    def hook(module, args, output):
        inputs, keep = args
        calls.append((list(inputs), keep, output))

    for m in model.modules():
        if isinstance(m, MeanJoin):
            m.register_forward_hook(hook)
    return calls


def test_local_drop_path_keeps_at_least_one_input_and_averages_the_survivors():
    torch.manual_seed(0)
    model = FractalNet(in_chans=1, num_classes=3, columns=3, blocks=2, width=4, drop_path_rate=0.9,
                       global_drop_share=0.0)
    model.path_generator = torch.Generator().manual_seed(1)
    calls = _record_joins(model)
    for _ in range(20):
        model(torch.randn(2, 1, 8, 8))
        assert model.last_drop == "local"
    dropped_some = False
    for inputs, keep, output in calls:
        assert keep.any(), "at least one input kept"
        assert [x is not None for x in inputs] == keep.tolist(), "a dropped input's layer is not run"
        kept = [x for x in inputs if x is not None]
        torch.testing.assert_close(output, torch.stack(kept).sum(0) / len(kept))
        dropped_some |= not bool(keep.all())
    assert dropped_some


def test_global_drop_path_runs_exactly_one_column_in_every_block():
    torch.manual_seed(0)
    model = FractalNet(in_chans=1, num_classes=3, columns=3, blocks=2, width=4, drop_path_rate=0.15,
                       global_drop_share=1.0)
    model.path_generator = torch.Generator().manual_seed(0)
    ran: set = set()
    for block in model.blocks:
        for c, column in enumerate(block.columns):
            for layer in column:
                layer.register_forward_hook(lambda m, a, o, c=c: ran.add(c))
    calls = _record_joins(model)
    seen = set()
    x = torch.randn(2, 1, 8, 8)
    for _ in range(12):
        ran.clear()
        out = model(x)
        column = int(model.last_drop.split(":")[1])
        assert ran == {column}, "one column for the whole network"
        seen.add(column)
        reference = FractalNet(in_chans=1, num_classes=3, columns=3, blocks=2, width=4)
        reference.load_state_dict(model.state_dict())
        reference.train()
        reference.set_column(column)
        torch.testing.assert_close(out, reference(x))
    assert not calls, "no join runs under global drop-path"
    assert seen == {0, 1, 2}


def test_drop_path_draws_come_from_the_shared_generator_and_repeat():
    def draws(seed):
        torch.manual_seed(123)
        model = FractalNet(in_chans=1, num_classes=3, width=4, blocks=1, drop_path_rate=0.5)
        model.path_generator = torch.Generator().manual_seed(seed)
        out = []
        for _ in range(10):
            torch.manual_seed(len(out))  # the global generator does not decide anything
            model(torch.randn(1, 1, 8, 8))
            out.append(model.last_drop)
        return out

    assert draws(0) == draws(0)
    assert draws(0) != draws(1)


def test_trainer_gives_fractalnet_its_shared_generator():
    exp = build(load_recipe("quickstart", ["model.name=fractalnet", "model.kwargs={width: 4, blocks: 2}",
                                           "model.drop_path_rate=0.15", "trainer.progress=false"]))
    assert exp.trainer.unwrapped_model.path_generator is exp.trainer.shared_generator


def test_single_column_evaluation_and_its_bad_index():
    torch.manual_seed(0)
    model = create_model("fractalnet", in_chans=1, num_classes=3, width=4, column=2).eval()
    x = torch.randn(2, 1, 8, 8)
    whole = create_model("fractalnet", in_chans=1, num_classes=3, width=4).eval()
    whole.load_state_dict(model.state_dict())
    assert not torch.allclose(model(x), whole(x))
    whole.set_column(2)
    torch.testing.assert_close(model(x), whole(x))
    with pytest.raises(JoinError, match=r"column 3 is out of range: this FractalNet has columns 0\.\.2"):
        whole.set_column(3)
    with pytest.raises(RecipeError, match="column"):
        create_model("fractalnet", in_chans=1, num_classes=3, column=5)


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_drop_path_rate_outside_zero_one_is_refused(rate):
    with pytest.raises(RecipeError, match=r"drop_path_rate.*\[0, 1\)"):
        create_model("fractalnet", in_chans=1, num_classes=3, drop_path_rate=rate)


def test_one_column_fractal_is_refused():
    with pytest.raises(RecipeError, match="columns"):
        create_model("fractalnet", in_chans=1, num_classes=3, columns=1)


@pytest.mark.parametrize("name,limit", [("fractalnet", 1_000_000), ("sbn", 1_000_000)])
def test_defaults_are_under_a_million_parameters(name, limit):
    for chans, size in [(1, 28), (3, 32)]:
        model = timm.create_model(name, in_chans=chans, num_classes=10)
        assert count_parameters(model) < limit
        assert model(torch.randn(2, chans, size, size)).shape == (2, 10)


# -- SBN ------------------------------------------------------------------------------------
def _sbn(seed: int = 0, **kwargs) -> StagewiseBoostingNet:
    torch.manual_seed(seed)
    return StagewiseBoostingNet(in_chans=1, num_classes=3, stages=2, branches=3, width=4, **kwargs)


def test_sbn_trained_normally_sums_every_branch_and_single_branch_runs_alone():
    model = _sbn().eval()
    x = torch.randn(2, 1, 8, 8)
    join = model.joins[0]
    h = join(x)
    torch.testing.assert_close(h, sum(branch(x) for branch in join.branches))
    for b in range(3):
        model.set_branch(b)
        alone = model.joins[0](x)
        torch.testing.assert_close(alone, join.branches[b](x))
    with pytest.raises(JoinError, match=r"branch 3 is out of range: this join has branches 0\.\.2"):
        model.set_branch(3)
    with pytest.raises(RecipeError, match="norm"):
        create_model("sbn", in_chans=1, num_classes=3, norm="layer")
    with pytest.raises(RecipeError, match="freeze-drop-path"):
        create_model("sbn", in_chans=1, num_classes=3, drop_path_rate=0.1)


# -- FreezeDropPathTrainer --------------------------------------------------------------------
def _fdp_trainer(model: nn.Module, **kwargs) -> FreezeDropPathTrainer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=0.01)
    kwargs.setdefault("mixed_precision", "no")
    return FreezeDropPathTrainer(model, optimizer, nn.CrossEntropyLoss(), progress=False, **kwargs)


def _branch_state(join: FreezeDropPathJoin, b: int) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in join.branches[b].state_dict().items()}


@pytest.mark.parametrize("extra", [{}, {"mixed_precision": "bf16", "ema_decay": 0.9, "grad_clip": 1.0}],
                         ids=["fp32", "bf16-ema-clip"])
def test_frozen_and_dropped_branches_are_bit_identical_after_real_steps_while_the_active_one_moves(extra):
    trainer = _fdp_trainer(_sbn(), **extra)
    generator = torch.Generator().manual_seed(0)
    batch = (torch.randint(0, 256, (8, 1, 8, 8), dtype=torch.uint8, generator=generator),
             torch.randint(0, 3, (8,), generator=generator))
    seen = set()
    for _ in range(80):  # momentum buffers fill up: a zero gradient would now move weights
        before = [[_branch_state(join, b) for b in range(3)] for join in trainer.joins]
        trainer.train_step([batch])
        b = trainer.active_branch
        seen.add(b)
        for j, join in enumerate(trainer.joins):
            for other in range(3):
                after = join.branches[other].state_dict()
                same = all(torch.equal(before[j][other][k], after[k]) for k in after)
                if other == b:
                    weights = [k for k in after if k.endswith("weight")]
                    assert not all(torch.equal(before[j][other][k], after[k]) for k in weights), "active moved"
                    assert not torch.equal(before[j][other]["1.running_mean"], after["1.running_mean"])
                else:
                    assert same, f"branch {other} changed (weights or BatchNorm buffers) while {b} was active"
                    assert all(p.grad is None for p in join.branches[other].parameters())
    assert seen == {0, 1, 2}
    if trainer.ema is not None:  # the EMA follows the trained weights and is evaluated with every branch
        assert trainer.evaluate([batch], model=trainer.ema.module)["top1"] >= 0


def test_active_branch_output_is_the_sum_up_to_it_inside_the_trainer():
    trainer = _fdp_trainer(_sbn())
    model = trainer.unwrapped_model
    x = torch.randn(4, 1, 8, 8)
    model.train()
    for b in range(3):
        trainer.set_active_branch(b)
        join = model.joins[0]
        out = join(x)
        with torch.no_grad():
            reference = sum(branch.eval()(x) for branch in join.branches[:b])
        join.branches[b].train()
        partial = join.branches[b](x)
        torch.testing.assert_close(out, partial + reference if b else partial)
        assert out.requires_grad


def test_cycle_order_follows_the_deterministic_cycle():
    trainer = _fdp_trainer(_sbn(), branch_order="cycle")
    batch = (torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8), torch.randint(0, 3, (4,)))
    got = []
    for _ in range(20):
        trainer.train_step([batch])
        got.append(trainer.active_branch)
    cycle = BranchCycle(3)
    assert got == [cycle.branch(i) for i in range(20)]


def test_random_order_uses_the_shared_generator_which_checkpoints_carry(tmp_path):
    def draws(trainer, n):
        batch = (torch.randint(0, 256, (4, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)),
                 torch.tensor([0, 1, 2, 0]))
        out = []
        for _ in range(n):
            trainer.train_step([batch])
            out.append(trainer.active_branch)
        return out

    a = _fdp_trainer(_sbn(), seed=3)
    first = draws(a, 10)
    a.save_checkpoint(tmp_path / "ck.safetensors")
    rest = draws(a, 10)
    b = _fdp_trainer(_sbn(), seed=3)
    b.load_checkpoint(tmp_path / "ck.safetensors")
    assert draws(b, 10) == rest
    c = _fdp_trainer(_sbn(), seed=3)
    assert draws(c, 20) == first + rest


def test_epoch_metrics_hold_each_branchs_share_of_steps():
    exp = build(load_recipe("quickstart", ["trainer.name=freeze_drop_path", "model.name=sbn",
                                           "model.kwargs={width: 4}", "trainer.epochs=2", "trainer.progress=false",
                                           "trainer.params.branch_order=cycle", "data.batch_size=16"]))
    exp.trainer.fit(exp.train_loader, epochs=2)
    steps = exp.trainer.global_step
    cycle = BranchCycle(3)
    expected = [sum(cycle.branch(i) == b for i in range(steps)) for b in range(3)]
    per_epoch = len(exp.train_loader)
    counted = [sum(round(h[f"branch_{b}"] * per_epoch) for h in exp.trainer.history) for b in range(3)]
    assert counted == expected


def test_trainer_refuses_models_without_freeze_drop_path_joins_and_bad_orders():
    with pytest.raises(RecipeError, match="has none; use trainer.name=supervised"):
        _fdp_trainer(nn.Sequential(nn.Flatten(), nn.Linear(64, 3)))
    with pytest.raises(RecipeError, match="unknown branch_order 'sometimes'.*random, cycle"):
        _fdp_trainer(_sbn(), branch_order="sometimes")
    with pytest.raises(RecipeError, match="model.kwargs.branch"):
        _fdp_trainer(_sbn(branch=1))
    assert freeze_drop_path_joins(_sbn()) and TRAINERS.get("freeze_drop_path") is FreezeDropPathTrainer


class _TwoProcessAccelerator:
    """Just enough of an Accelerator for the check that runs before DDP wraps anything."""

    num_processes = 2
    ddp_handler = None
    device = torch.device("cpu")


@pytest.mark.parametrize("kind", ["fdp", "fractal"])
def test_several_processes_without_find_unused_parameters_name_the_fix(kind):
    accelerator = _TwoProcessAccelerator()
    model = _sbn() if kind == "fdp" else FractalNet(in_chans=1, num_classes=3, width=4, drop_path_rate=0.15)
    cls = FreezeDropPathTrainer if kind == "fdp" else Trainer
    with pytest.raises(RecipeError, match="set trainer.find_unused_parameters=true"):
        cls(model, torch.optim.SGD(model.parameters(), lr=0.1), nn.CrossEntropyLoss(), accelerator=accelerator)


def test_freeze_drop_path_recipe_makes_its_accelerator_find_unused_parameters():
    from convrecipes.build import make_accelerator

    accelerator = make_accelerator(load_recipe("quickstart", ["trainer.name=freeze_drop_path", "model.name=sbn"]))
    assert accelerator.ddp_handler is not None and accelerator.ddp_handler.find_unused_parameters


LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def test_two_processes_draw_the_same_branches_and_keep_frozen_branches_unchanged(tmp_path):
    import os

    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    args = LAUNCH + [str(ROOT / "tests" / "fdp_ddp_worker.py"), str(tmp_path)]
    result = run_launched(args, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert reports[0]["branches"] == reports[1]["branches"]
    assert len(set(reports[0]["branches"])) == 3 and len(reports[0]["branches"]) == reports[0]["steps"]
    for report in reports:
        assert report["frozen_violations"] == [], report["frozen_violations"][:5]
        assert report["active_moved"] == report["steps"]
    assert reports[0]["weights_sha"] == reports[1]["weights_sha"], "DDP kept the ranks' weights identical"
    # rank 0's BatchNorm buffers are the ones DDP broadcasts: every rank's frozen branches hold them
    assert reports[0]["frozen_buffer_hashes"] == reports[1]["frozen_buffer_hashes"]


def test_evaluate_can_rebuild_a_run_with_its_deepest_column_alone(tmp_path):
    from convrecipes.checkpoint import load_checkpoint, model_weights_of
    from convrecipes.loading import find_checkpoint
    from convrecipes.cli import main
    from convrecipes.run import evaluate_run, train_recipe

    run = tmp_path / "run"
    train_recipe(load_recipe("quickstart", ["model.name=fractalnet", "model.kwargs={width: 4, blocks: 2}",
                                            "model.drop_path_rate=0.15", "trainer.epochs=2", "trainer.progress=false"]),
                 run)
    whole = evaluate_run(run, "last")
    alone = evaluate_run(run, "last", model_kwargs={"column": 2})
    assert alone["model_kwargs"] == {"column": 2}
    # the same number computed here: the run's weights in a model running column 2 only
    exp = build(load_recipe("quickstart", ["model.name=fractalnet", "model.kwargs={width: 4, blocks: 2}",
                                           "trainer.progress=false"]))
    state, _ = load_checkpoint(find_checkpoint(run, prefer="last"))
    exp.trainer.unwrapped_model.load_state_dict(model_weights_of(state, run))
    exp.trainer.unwrapped_model.set_column(2)
    assert alone["test_top1"] == pytest.approx(exp.trainer.evaluate(exp.test_loader)["top1"])
    assert alone["test_loss"] != whole["test_loss"]
    assert main(["evaluate", str(run), "--weights", "last", "--model-kwarg", "column=9"]) != 0
