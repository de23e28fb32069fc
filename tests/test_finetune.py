"""Fine-tuning: initial weights from a run or a local timm file, frozen stages and patterns,
unfreezing (across a resume), the backbone LR multiplier, and resolution stages."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from PIL import Image

from convrecipes.build import build, build_model
from convrecipes.checkpoint import load_checkpoint, read_metadata
from convrecipes.errors import CheckpointError, RecipeError
from convrecipes.recipe import load_recipe
from convrecipes.run import evaluate_run, train_recipe

TINY = ["trainer.epochs=1", "data.subset_per_class=30", "model.kwargs.width=4", "trainer.progress=false",
        "schedule.warmup_epochs=0"]
# SGD with momentum and weight decay on every parameter (norms and biases too): a frozen
# parameter that got a gradient, even zero, would move
MOVING = ["optimizer.momentum=0.9", "optimizer.weight_decay=0.01", "optimizer.decay_norm_and_bias=true"]


def recipe(*overrides: str):
    return load_recipe("quickstart", [*TINY, *overrides])


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A finished 1-epoch quickstart run on the digits (10 classes)."""
    run_dir = tmp_path_factory.mktemp("runs") / "digits"
    train_recipe(recipe(), run_dir)
    return run_dir


def _three_class_folder(root):
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["a", "b", "c"]):
        (root / name).mkdir(parents=True)
        for i in range(8):
            Image.fromarray((torch.rand(8, 8, generator=g) * 80 + c * 80).byte().numpy(), "L").save(
                root / name / f"{i}.png")
    return root


# -- initial weights -----------------------------------------------------------------
def test_init_from_our_run_with_other_classes_loads_the_backbone_and_resets_the_head(digits_run, tmp_path):
    folder = _three_class_folder(tmp_path / "images")
    exp = build(recipe("data.name=image_folder", f"data.data_dir={folder}", "data.channels=1", "data.image_size=8",
                       "data.subset_per_class=null", "data.batch_size=8", f"model.init_from={digits_run}"))
    source, _ = load_checkpoint(digits_run / "best.safetensors")
    saved, model = source["model"], exp.trainer.unwrapped_model.state_dict()
    assert model["fc.weight"].shape == (3, 16) and saved["fc.weight"].shape == (10, 16)
    backbone = [k for k in model if not k.startswith("fc.")]
    assert backbone and all(torch.equal(model[k], saved[k]) for k in backbone)
    assert exp.init["classifier"].startswith("re-initialised (10 classes -> 3")
    assert exp.trainer.checkpoint_metadata["init"]["file"] == str((digits_run / "best.safetensors").resolve())


def test_init_from_our_run_with_the_same_classes_loads_the_head_too(digits_run):
    exp = build(recipe(f"model.init_from={digits_run}/last.safetensors"))
    saved = load_checkpoint(digits_run / "last.safetensors")[0]["model"]
    model = exp.trainer.unwrapped_model.state_dict()
    assert all(torch.equal(model[k], saved[k]) for k in model) and exp.init["classifier"] == "loaded"


def test_init_from_another_architecture_or_a_pickle_or_nothing_is_refused(digits_run, tmp_path):
    with pytest.raises(CheckpointError, match="does not fit TinyCNN outside its classifier"):
        build(recipe(f"model.init_from={digits_run}", "model.kwargs.width=8"))
    (tmp_path / "weights.pth").write_bytes(b"\x80")
    with pytest.raises(RecipeError, match="loads no pickle.*save_file"):
        build(recipe(f"model.init_from={tmp_path / 'weights.pth'}"))
    with pytest.raises(RecipeError, match="no such run directory or file"):
        build(recipe(f"model.init_from={tmp_path / 'missing'}"))


def _no_downloads(monkeypatch):
    """timm's download functions raise (as offline); returns the list of attempted calls."""
    import timm.models._builder as builder

    calls = []

    def offline(*args, **kwargs):
        calls.append(args)
        raise OSError("We couldn't connect to 'https://huggingface.co' to load this file")

    monkeypatch.setattr(builder, "load_state_dict_from_hf", offline)
    monkeypatch.setattr(builder, "load_state_dict_from_url", offline)
    monkeypatch.setattr(builder, "download_cached_file", offline)
    return calls


def test_pretrained_offline_names_the_local_file_fix(monkeypatch):
    calls = _no_downloads(monkeypatch)
    r = recipe("model.name=test_resnet", "model.kwargs={}", "model.pretrained=true")
    with pytest.raises(RecipeError) as info:
        build_model(r, in_chans=1, num_classes=10)
    assert calls, "timm tried to download (into the mock)"
    message = str(info.value)
    assert "'test_resnet'" in message and "internet" in message and "model.init_from=" in message


def test_timm_weights_from_a_local_file_adapt_the_stem_and_reset_the_classifier(monkeypatch, tmp_path):
    import timm
    from safetensors.torch import save_file

    calls = _no_downloads(monkeypatch)
    torch.manual_seed(1)
    pretrained = timm.create_model("test_resnet", num_classes=1000).state_dict()  # 3 channels, 1000 classes
    save_file(pretrained, str(tmp_path / "model.safetensors"))
    r = recipe("model.name=test_resnet", "model.kwargs={}", "model.pretrained=true",
               f"model.init_from={tmp_path / 'model.safetensors'}")
    exp = build(r)
    model = exp.trainer.unwrapped_model.state_dict()
    assert not calls and exp.init["kind"] == "timm"
    assert torch.equal(model["layer1.0.conv1.weight"], pretrained["layer1.0.conv1.weight"])
    # timm folds a 3-channel stem into 1 channel by summing over the input channels
    torch.testing.assert_close(model["conv1.0.weight"], pretrained["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert model["fc.weight"].shape[0] == 10


# -- freezing ----------------------------------------------------------------------------
def test_frozen_stages_stay_bit_identical_with_their_norm_statistics_while_the_rest_trains():
    exp = build(recipe("model.freeze_stages=2", *MOVING))
    model = exp.trainer.unwrapped_model
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen == ["features.0.0.weight", "features.0.1.weight", "features.0.1.bias",
                      "features.1.0.weight", "features.1.1.weight", "features.1.1.bias"]
    optimized = {id(p) for g in exp.trainer.optimizer.param_groups for p in g["params"]}
    assert optimized == {id(p) for p in model.parameters()}, "the optimizer holds every parameter from the start"
    before = weights(model)
    exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=1)
    after = model.state_dict()
    frozen_state = [k for k in before if k.startswith(("features.0.", "features.1."))]
    assert len(frozen_state) == 12  # per stage: conv weight, BN weight and bias, running mean/var and count
    for key in frozen_state:  # running_mean, running_var and num_batches_tracked included
        assert torch.equal(before[key], after[key]), key
    for key in ("features.3.0.weight", "features.3.1.running_mean", "fc.weight"):
        assert not torch.equal(before[key], after[key]), key
    assert all(model.get_parameter(n).grad is None for n in frozen)


def test_freeze_patterns_and_their_errors():
    exp = build(recipe(r"model.freeze=['re:^features\.[01]\.', 'features.3.1.*']"))
    model = exp.trainer.unwrapped_model
    frozen = {n for n, p in model.named_parameters() if not p.requires_grad}
    assert frozen == {"features.0.0.weight", "features.0.1.weight", "features.0.1.bias", "features.1.0.weight",
                      "features.1.1.weight", "features.1.1.bias", "features.3.1.weight", "features.3.1.bias"}
    with pytest.raises(RecipeError) as info:
        build(recipe("model.freeze=[backbone.*]"))
    assert "'backbone.*'" in str(info.value) and "features.0.0.weight" in str(info.value)
    with pytest.raises(RecipeError, match=r"has 6 stages.*features\.0, features\.1, features\.3"):
        build(recipe("model.freeze_stages=7"))
    with pytest.raises(RecipeError, match="nothing would train"):
        build(recipe("model.freeze=['*']"))
    with pytest.raises(RecipeError, match="nothing is frozen"):
        recipe("trainer.epochs=3", "model.unfreeze_epoch=2")
    with pytest.raises(RecipeError, match="never train"):
        recipe("trainer.epochs=3", "model.freeze_stages=1", "model.unfreeze_epoch=4")


def test_unfreezing_at_an_epoch_trains_them_from_then_on_and_a_resume_gets_it_right(tmp_path):
    args = ("trainer.epochs=3", "model.freeze_stages=2", "model.unfreeze_epoch=3", *MOVING)
    exp = build(recipe(*args), run_dir=tmp_path / "a")
    model = exp.trainer.unwrapped_model
    start = weights(model)
    exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=2)
    after_two = weights(model)
    assert torch.equal(start["features.0.0.weight"], after_two["features.0.0.weight"])
    assert torch.equal(start["features.1.1.running_mean"], after_two["features.1.1.running_mean"])
    assert not torch.equal(start["features.3.0.weight"], after_two["features.3.0.weight"])
    shutil.copy(tmp_path / "a" / "last.safetensors", tmp_path / "epoch2.safetensors")
    exp.trainer.fit(exp.train_loader, exp.val_loader, epochs=3)  # epoch 3: everything trains
    final = weights(model)
    assert not torch.equal(after_two["features.0.0.weight"], final["features.0.0.weight"])
    assert not torch.equal(after_two["features.1.1.running_mean"], final["features.1.1.running_mean"])

    # a fresh process resuming before the unfreeze epoch ends bit-identical
    resumed = build(recipe(*args), run_dir=tmp_path / "b")
    resumed.trainer.fit(resumed.train_loader, resumed.val_loader, epochs=3,
                        resume_from=tmp_path / "epoch2.safetensors")
    again = resumed.trainer.unwrapped_model.state_dict()
    assert all(torch.equal(final[k], again[k]) for k in final)

    # ... and one resuming after it (a longer run) trains everything from its first step
    longer = build(recipe(*args, "trainer.epochs=4"), run_dir=tmp_path / "c")
    assert not longer.trainer.unwrapped_model.features[0][0].weight.requires_grad  # built for epoch 1
    longer.trainer.fit(longer.train_loader, longer.val_loader, epochs=4, resume_from=tmp_path / "a" / "last.safetensors")
    assert all(p.requires_grad for p in longer.trainer.unwrapped_model.parameters())
    assert not torch.equal(final["features.0.0.weight"], longer.trainer.unwrapped_model.state_dict()["features.0.0.weight"])


# -- learning rates ------------------------------------------------------------------------
def test_backbone_lr_mult_gives_the_groups_their_lrs_through_the_schedule():
    plain = build(recipe("trainer.epochs=3"))
    scaled = build(recipe("trainer.epochs=3", "optimizer.backbone_lr_mult=0.1"))
    groups = scaled.trainer.optimizer.param_groups
    names = {id(p): n for n, p in scaled.trainer.unwrapped_model.named_parameters()}
    head = [g for g in groups if any(names[id(p)].startswith("fc.") for p in g["params"])]
    assert groups[:2] == head and {names[id(p)] for g in head for p in g["params"]} == {"fc.weight", "fc.bias"}
    assert sum(len(g["params"]) for g in groups) == len(names)
    for step in range(3 * len(scaled.train_loader)):
        reference = plain.trainer.optimizer.param_groups[0]["lr"]
        if step == 0:
            assert reference == pytest.approx(0.05)
        for group in groups:
            mult = 1.0 if group in head else 0.1
            assert math.isclose(group["lr"], reference * mult, rel_tol=1e-9, abs_tol=1e-15), (step, group["lr"])
        plain.trainer.scheduler.step()
        scaled.trainer.scheduler.step()
    assert plain.trainer.optimizer.param_groups[0]["lr"] < 0.05 * 0.01  # the cosine ran to its end


# -- the command line: --init-from and resolution stages -----------------------------------
def test_init_from_option_and_two_stage_command_record_both_stages(digits_run, tmp_path, capsys):
    from convrecipes.cli import main

    staged = tmp_path / "staged"
    assert main(["train", "quickstart", *TINY, "--run-dir", str(staged),
                 "--then", "data.image_size=16", "optimizer.lr=0.01"]) == 0
    out = capsys.readouterr().out
    assert "stage 2 (data.image_size=16 optimizer.lr=0.01) test results" in out
    summary = json.loads((staged / "results.json").read_text())
    first, second = summary["stages"]
    assert first["image_size"] is None and second["image_size"] == 16
    for stage in (first, second):
        stored = json.loads((staged / f"stage{stage['stage']}" / "results.json").read_text())
        assert stage["test_final"]["test_top1"] == stored["test_final"]["test_top1"]
    meta = read_metadata(staged / "stage2" / "last.safetensors")
    assert meta["init"]["file"] == str((staged / "stage1" / "best.safetensors").resolve())
    assert meta["recipe"]["data"]["image_size"] == 16 and meta["recipe"]["optimizer"]["lr"] == 0.01
    # test_init: the stage-1 model on 16x16 test images, before any fine-tuning
    direct = evaluate_run(staged / "stage1", overrides=["data.image_size=16"])
    assert second["test_init"]["test_top1"] == pytest.approx(direct["test_top1"])
    assert "test_init" not in first

    single = tmp_path / "single"
    assert main(["train", "quickstart", *TINY, "--init-from", str(digits_run), "--run-dir", str(single)]) == 0
    assert read_metadata(single / "last.safetensors")["init"]["from"] == str(digits_run)
    assert json.loads((single / "results.json").read_text())["test_final"]["test_top1"] >= 0
    capsys.readouterr()
    assert main(["train", "--resume", str(single), "--init-from", str(digits_run)]) == 2
    assert "--init-from and --then do not apply" in capsys.readouterr().err
    with pytest.raises(RecipeError, match="only the data section"):
        evaluate_run(single, overrides=["model.kwargs.width=8"])


def test_a_killed_multi_stage_run_resumes_to_the_same_weights_and_summary(tmp_path, monkeypatch, capsys):
    import convrecipes.trainers.base as base
    from convrecipes.checkpoint import load_checkpoint
    from convrecipes.cli import main

    then = ["--then", "data.image_size=16", "trainer.epochs=2", "optimizer.lr=0.01"]
    reference, killed = tmp_path / "reference", tmp_path / "killed"
    assert main(["train", "quickstart", *TINY, "--run-dir", str(reference), *then]) == 0

    real, writes = base.write_atomic, []

    def kill_after_stage2_epoch1(path, data):
        out = real(path, data)
        writes.append(path)
        if path == killed / "stage2" / "last.safetensors":
            raise KeyboardInterrupt  # as if killed right after stage 2's first epoch was saved
        return out

    monkeypatch.setattr(base, "write_atomic", kill_after_stage2_epoch1)
    assert main(["train", "quickstart", *TINY, "--run-dir", str(killed), *then]) == 130
    monkeypatch.setattr(base, "write_atomic", real)
    assert not (killed / "results.json").exists() and (killed / "stage1" / "results.json").exists()
    assert read_metadata(killed / "stage2" / "last.safetensors")["epoch"] == 1

    # training into it again is refused with the way to continue; overrides on resume are refused
    assert main(["train", "quickstart", *TINY, "--run-dir", str(killed), *then]) == 2
    assert f"convrecipes train --resume {killed}" in capsys.readouterr().err
    assert main(["train", "--resume", str(killed), "trainer.epochs=3"]) == 2
    assert "multi-stage run" in capsys.readouterr().err

    assert main(["train", "--resume", str(killed)]) == 0
    assert "stage 2 (data.image_size=16 trainer.epochs=2 optimizer.lr=0.01) test results" in capsys.readouterr().out
    ref_state, _ = load_checkpoint(reference / "stage2" / "last.safetensors")
    got_state, meta = load_checkpoint(killed / "stage2" / "last.safetensors")
    assert meta["epoch"] == 2
    for name, tensor in ref_state["model"].items():
        assert torch.equal(tensor, got_state["model"][name]), name
    ref_summary = json.loads((reference / "results.json").read_text())
    got_summary = json.loads((killed / "results.json").read_text())
    for ref_entry, got_entry in zip(ref_summary["stages"], got_summary["stages"]):
        for key in ("test_final", "test_init", "image_size", "epochs", "overrides"):
            assert ref_entry.get(key) == got_entry.get(key), key
    assert "test_init" in got_summary["stages"][1]
