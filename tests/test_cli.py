"""The CLI end to end: train, evaluate, and one clear message with exit code 2 for user errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from convrecipes.checkpoint import load_checkpoint, save_checkpoint

CLI = [sys.executable, "-m", "convrecipes.cli"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TINY = ["trainer.epochs=2", "model.kwargs.width=4", "trainer.progress=false"]


def run(*args, cwd=None):
    return subprocess.run(CLI + [str(a) for a in args], env=ENV, capture_output=True, text=True, cwd=cwd)


def assert_user_error(result, *fragments):
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1, result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "quick"
    result = run("train", "quickstart", *TINY, "--run-dir", run_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return run_dir, result


def test_train_writes_a_complete_run_directory(trained_run):
    run_dir, result = trained_run
    for name in ("recipe.yaml", "metrics.jsonl", "curves.png", "last.safetensors", "best.safetensors", "results.json"):
        assert (run_dir / name).is_file(), name
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_processes"] == 1 and 0 <= results["test_final"]["test_top1"] <= 100
    assert "epoch 2/2" in result.stdout and "test results" in result.stdout


def test_evaluate_prints_test_metrics(trained_run):
    run_dir, _ = trained_run
    result = run("evaluate", run_dir, "--json", "--weights", "last")
    assert result.returncode == 0, result.stderr
    metrics = json.loads(result.stdout.strip().splitlines()[-1])
    stored = json.loads((run_dir / "results.json").read_text())["test_final"]
    assert metrics["test_top1"] == pytest.approx(stored["test_top1"])


def test_evaluate_reports_no_accuracy_when_the_test_classes_are_unseen(trained_run, monkeypatch, capsys):
    # font_glyphs' test classes are disjoint from its training classes; pretend the digits are too
    import convrecipes.data.datasets as datasets
    from convrecipes.cli import main

    run_dir, _ = trained_run
    monkeypatch.setattr(datasets, "UNSEEN_TEST_CLASSES", frozenset({"digits"}))
    assert main(["evaluate", str(run_dir), "--weights", "last"]) == 0
    out = capsys.readouterr().out
    assert "no test accuracy" in out and "test_recall_at_1" in out
    assert "test_top1" not in out.replace("test_recall_at_1", "") and "test_loss" in out
    monkeypatch.setattr(datasets, "UNSEEN_TEST_CLASSES", frozenset())
    assert main(["evaluate", str(run_dir), "--weights", "last"]) == 0
    assert "test_top1" in capsys.readouterr().out


def test_train_reports_no_accuracy_when_the_test_classes_are_unseen(tmp_path, monkeypatch, capsys):
    import convrecipes.data.datasets as datasets
    from convrecipes.cli import main

    monkeypatch.setattr(datasets, "UNSEEN_TEST_CLASSES", frozenset({"digits"}))
    assert main(["train", "quickstart", *TINY, "--run-dir", str(tmp_path / "run")]) == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert "test_loss" in results["test_final"] and "test_top1" not in results["test_final"]
    out = capsys.readouterr().out
    assert "no test accuracy" in out and "test_top1" not in out


def run_in_process(capsys, *args):
    """``run`` without a new interpreter (the same ``main``, its exit code and stderr)."""
    from types import SimpleNamespace

    from convrecipes.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return SimpleNamespace(returncode=code, stdout=captured.out, stderr=captured.err)


def test_unknown_key_wrong_type_and_unknown_names_exit_2(capsys):
    # one real process (exit status and stderr as a shell sees them), the rest in this one
    assert_user_error(run("train", "quickstart", "data.batchsize=3"), "data.batchsize", "batch_size")
    cases = [(("optimizer.lr=abc",), ("optimizer.lr", "number")),
             (("data.name=mnist",), ("unknown dataset 'mnist'", "fashion_mnist")),
             (("loss.name=focal",), ("unknown loss 'focal'", "hinge")),
             (("schedule.name=poly",), ("unknown schedule 'poly'", "cosine")),
             (("model.name=resnet1800",), ("unknown model", "resnet18"))]
    for overrides, fragments in cases:
        assert_user_error(run_in_process(capsys, "train", "quickstart", *overrides), *fragments)


def test_missing_dataset_exits_2_with_the_fix(tmp_path):
    assert_user_error(run("train", "quickstart", "data.name=cifar10", f"data.data_dir={tmp_path}"),
                      str(tmp_path), "download")


def test_corrupt_image_is_reported_by_path_and_training_goes_on(tmp_path):
    root = tmp_path / "images"
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["cat", "dog"]):
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = (torch.rand(10, 10, 3, generator=g) * 80 + c * 150).byte().numpy()
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    bad = root / "dog" / "broken.jpg"
    bad.write_bytes(b"not a jpeg at all")
    result = run("train", "quickstart", *TINY, "data.name=image_folder", f"data.data_dir={root}",
                 "data.image_size=8", "data.channels=3", "data.batch_size=8", "data.val_fraction=0.2",
                 "--run-dir", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    assert str(bad) in result.stderr


def test_truncated_and_foreign_checkpoints_exit_2(trained_run, tmp_path):
    run_dir, _ = trained_run
    data = (run_dir / "last.safetensors").read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    assert_user_error(run("evaluate", tmp_path / "cut.safetensors"), "truncated")
    assert_user_error(run("train", "--resume", tmp_path / "cut.safetensors"), "truncated")
    assert_user_error(run("evaluate", tmp_path / "nothing-here"), "no run directory or checkpoint")


def test_checkpoint_of_another_architecture_exits_2(trained_run, tmp_path):
    run_dir, _ = trained_run
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    meta["recipe"]["model"]["name"] = "small_resnet8"  # the recipe says ResNet, the weights are tiny_cnn
    save_checkpoint(tmp_path / "mixed.safetensors", state, meta)
    assert_user_error(run("evaluate", tmp_path / "mixed.safetensors"), "does not fit this model", "architecture")


def test_nan_loss_exits_2_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "nan"
    result = run("train", "quickstart", *TINY, "optimizer.lr=1e12", "optimizer.momentum=0",
                 "trainer.checkpoint_every_steps=1", "--run-dir", run_dir)
    assert_user_error(result, "became", "lower the learning rate", "last good checkpoint is intact")
    state, meta = load_checkpoint(run_dir / "last.safetensors")
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    assert meta["global_step"] >= 1


def test_recipes_command_lists_recipes():
    result = run("recipes")
    assert result.returncode == 0 and "quickstart" in result.stdout and "fashion_mnist" in result.stdout
