"""A run directory belongs to one run, `best` survives a kill between the two writes, no
temp files linger, and bad values are refused before training (exit code 2, one message)."""

from __future__ import annotations

import json
import os
import socket
import time

import pytest
import torch

from convrecipes.checkpoint import load_checkpoint, read_metadata, save_checkpoint, write_atomic
from convrecipes.cli import main
from convrecipes.errors import CheckpointError, RecipeError
from convrecipes.recipe import load_recipe
from convrecipes.run import LOCK_NAME, RunDirError, evaluate_run, train_recipe
from convrecipes.trainers.metrics_log import read_jsonl

TINY = ["model.kwargs.width=4", "trainer.progress=false", "data.subset_per_class=30", "data.batch_size=16",
        "schedule.warmup_epochs=0", "trainer.epochs=2"]


def _train(run_dir, *extra, **kw):
    return train_recipe(load_recipe("quickstart", TINY + list(extra)), run_dir, **kw)


def test_a_finished_run_is_never_overwritten(tmp_path):
    run_dir = tmp_path / "run"
    first = _train(run_dir)
    before = (run_dir / "best.safetensors").read_bytes(), (run_dir / "results.json").read_text()
    with pytest.raises(RunDirError, match="holds a finished run.*--overwrite"):
        _train(run_dir, "optimizer.lr=5.0")
    assert ((run_dir / "best.safetensors").read_bytes(), (run_dir / "results.json").read_text()) == before
    again = _train(run_dir, overwrite=True)
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "results.json").read_text() == before[1]
    assert again.results["test_final"] == first.results["test_final"]  # same recipe, same result
    assert not (run_dir / LOCK_NAME).exists(), "the lock is released at the end"


def test_the_cli_refuses_with_exit_code_2(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(run_dir)
    assert main(["train", "quickstart", *TINY, "--run-dir", str(run_dir)]) == 2
    assert "holds a finished run" in capsys.readouterr().err


def test_a_running_run_holds_the_lock_and_a_dead_ones_lock_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    live = {"pid": os.getpid(), "host": socket.gethostname(), "started": "now"}
    (run_dir / LOCK_NAME).write_text(json.dumps(live))
    with pytest.raises(RunDirError, match=f"in use by process {os.getpid()}"):
        _train(run_dir)
    dead = dict(live, pid=2 ** 22 + 12345)  # above the default pid_max: no such process
    (run_dir / LOCK_NAME).write_text(json.dumps(dead))
    _train(run_dir)
    assert (run_dir / "results.json").is_file() and not (run_dir / LOCK_NAME).exists()


def test_a_read_only_run_directory_is_refused_before_training(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root can write anywhere")
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o500)
    with pytest.raises(RunDirError, match="cannot create the run directory|not writable"):
        _train(parent / "run")


def test_best_is_written_before_last_so_a_kill_between_them_is_harmless(tmp_path, monkeypatch):
    import convrecipes.trainers.base as base

    writes = []
    real = base.write_atomic
    monkeypatch.setattr(base, "write_atomic", lambda path, data: (writes.append(path.name), real(path, data))[1])
    _train(tmp_path / "run", "trainer.epochs=1")
    assert writes[-2:] == ["best.safetensors", "last.safetensors"]
    # both hold the same state: the metadata of each names the same epoch and step
    best, last = read_metadata(tmp_path / "run" / "best.safetensors"), read_metadata(tmp_path / "run" / "last.safetensors")
    assert (best["epoch"], best["global_step"]) == (last["epoch"], last["global_step"])


def test_temp_files_of_killed_writes_are_removed_and_files_share_a_mode(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "trainer.epochs=1")
    stale = run_dir / ".last.safetensors.tmp-99999"
    stale.write_bytes(b"half a checkpoint")
    _train(run_dir, "trainer.epochs=2", resume_from=run_dir)
    assert not stale.exists()
    assert not [p for p in run_dir.iterdir() if ".tmp" in p.name]
    modes = {p.name: p.stat().st_mode & 0o777 for p in run_dir.glob("*.safetensors")}
    assert len(set(modes.values())) == 1, modes


def test_a_failed_write_keeps_the_old_file_and_says_why(tmp_path, monkeypatch):
    path = tmp_path / "x.safetensors"
    save_checkpoint(path, {"model": {"w": torch.ones(2)}})
    good = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(CheckpointError, match="No space left on device.*previous file is intact"):
        write_atomic(path, b"new")
    assert path.read_bytes() == good and not list(tmp_path.glob(".*tmp*"))


def test_a_torn_last_metrics_line_is_dropped_and_resume_works(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "trainer.epochs=1", "trainer.checkpoint_every_steps=2")
    with open(run_dir / "metrics.jsonl", "a") as fh:
        fh.write('{"epoch": 2, "train_lo')
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 1
    (run_dir / "results.json").unlink()
    result = _train(run_dir, "trainer.epochs=2", resume_from=run_dir)
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert result.results["wall_time_s"] > 0


def test_wall_time_counts_the_whole_run_across_resumes(tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "trainer.epochs=1")
    first = json.loads((run_dir / "results.json").read_text())["wall_time_s"]
    state, _ = load_checkpoint(run_dir / "last.safetensors")
    assert state["registered"]["wall_clock"]["elapsed_s"] > 0
    (run_dir / "results.json").unlink()
    t0 = time.perf_counter()
    resumed = _train(run_dir, "trainer.epochs=2", resume_from=run_dir)
    this_call = time.perf_counter() - t0
    before = state["registered"]["wall_clock"]["elapsed_s"]
    assert 0 < before <= first
    # the resumed total is the time before the checkpoint plus (nearly all of) this call
    assert resumed.results["wall_time_s"] >= round(before + 0.8 * this_call, 1) - 0.1


def test_a_checkpoint_without_model_weights_is_a_clear_error(tmp_path):
    path = tmp_path / "empty.safetensors"
    save_checkpoint(path, {"optimizer": {}}, {"recipe": {"name": "x"}, "classes": ["a"]})
    with pytest.raises(CheckpointError, match="holds no model weights"):
        evaluate_run(path)


BAD_VALUES = [
    ("data.batch_size=0", "'data.batch_size' must be an integer >= 1"),
    ("data.batch_size=-8", "'data.batch_size' must be an integer >= 1"),
    ("optimizer.lr=-0.1", "'optimizer.lr' must be a number > 0"),
    ("optimizer.momentum=-0.5", "'optimizer.momentum' must be in [0, 1)"),
    ("optimizer.weight_decay=-1e-4", "'optimizer.weight_decay' must be >= 0"),
    ("data.val_fraction=1.5", "'data.val_fraction' must be in [0, 1)"),
    ("data.subset_fraction=2", "'data.subset_fraction' must be in (0, 1]"),
    ("data.subset_per_class=0", "'data.subset_per_class' must be an integer >= 1"),
    ("trainer.grad_accum_steps=0", "'trainer.grad_accum_steps' must be an integer >= 1"),
    ("trainer.grad_clip=-1", "'trainer.grad_clip' must be a number > 0"),
    ("schedule.warmup_epochs=-1", "'schedule.warmup_epochs' must be >= 0"),
    ("trainer.epochs=0", "'trainer.epochs' must be an integer >= 1"),
    ("model.kwargs.width=0", "width must be a positive integer"),
]


@pytest.mark.parametrize("override,message", BAD_VALUES)
def test_bad_values_are_refused_before_training_with_exit_2(override, message, tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(["train", "quickstart", override, "trainer.progress=false", "--run-dir", str(run_dir)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err
    assert not (run_dir / "last.safetensors").exists()


def test_an_empty_recipe_file_is_refused(tmp_path):
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(RecipeError, match="is empty"):
        load_recipe(str(empty))


def test_resume_takes_safe_overrides_refuses_others_and_extends_a_finished_run(tmp_path, capsys):
    run_dir = tmp_path / "run"
    _train(run_dir, "trainer.epochs=1")
    assert main(["train", "--resume", str(run_dir), "trainer.epochs=2", "optimizer.lr=0.01"]) == 2
    assert "'optimizer.lr' cannot change on --resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run_dir), "trainer.epochs=2"]) == 0
    assert [r["epoch"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [1, 2]
    assert read_metadata(run_dir / "last.safetensors")["recipe"]["trainer"]["epochs"] == 2


def test_a_pk_batch_larger_than_the_data_is_refused(tmp_path, capsys):
    assert main(["train", "quickstart", "data.pk=[50,4]", "trainer.progress=false", "--run-dir",
                 str(tmp_path / "run")]) == 2
    assert "data.pk=[50, 4] does not fit the training data" in capsys.readouterr().err


def test_an_explicit_fashion_mnist_dir_that_lacks_the_files_is_refused(tmp_path):
    from convrecipes.data import load_dataset
    from convrecipes.errors import DataError

    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "train-images-idx3-ubyte.gz").write_bytes(b"")
    with pytest.raises(DataError, match="does not hold the four Fashion-MNIST IDX files.*fix the path"):
        load_dataset("fashion_mnist", "test", data_dir=str(tmp_path / "partial"))


def test_a_rank_whose_launcher_died_stops(monkeypatch):
    from convrecipes.errors import ConvrecipesError
    from convrecipes.run import StopWhenOrphaned

    guard = StopWhenOrphaned()

    class FakeTrainer:
        class accelerator:
            process_index = 1

    guard.on_step_start(FakeTrainer, 3)  # the launcher is alive: nothing happens
    monkeypatch.setattr(os, "getppid", lambda: 1)  # re-parented to init: the launcher is gone
    with pytest.raises(ConvrecipesError, match="launcher of this process .* is gone; rank 1 stops before step 4"):
        guard.on_step_start(FakeTrainer, 4)


def test_the_collective_timeout_reaches_the_process_group_settings():
    from accelerate.utils import InitProcessGroupKwargs

    from convrecipes.build import make_accelerator

    acc = make_accelerator(load_recipe("quickstart", ["trainer.collective_timeout_s=42"]))
    handler = acc.init_handler
    assert isinstance(handler, InitProcessGroupKwargs) and handler.timeout.total_seconds() == 42


def test_a_stalled_rank_stops_the_others_after_the_timeout_naming_the_step():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parent.parent
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    t0 = time.perf_counter()
    result = subprocess.run(launch + [str(root / "tests" / "stall_worker.py"), "90"], env=env, capture_output=True,
                            text=True, timeout=240, cwd=root)
    elapsed = time.perf_counter() - t0
    assert result.returncode != 0
    assert "rank 0: process 0 waited too long for the others at epoch 1, batch 3/" in result.stdout, result.stdout[-2000:]
    assert "trainer.collective_timeout_s" in result.stdout
    # rank 1 sleeps 90 s; the 4 s timeout ends the run long before (start-up included)
    assert elapsed < 75, f"took {elapsed:.0f} s"


def test_killing_the_launcher_stops_the_ranks(tmp_path):
    import signal
    import subprocess
    import sys
    from pathlib import Path

    import psutil

    root = Path(__file__).parent.parent
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(launch + ["-m", "convrecipes.cli", "train", "quickstart", "trainer.epochs=50",
                                      "model.kwargs.width=4", "trainer.progress=false", "--run-dir", str(run_dir)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=root)
    deadline = time.time() + 120
    while not (run_dir / "last.safetensors").exists() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.2)
    ranks = [c for c in psutil.Process(proc.pid).children(recursive=True) if "python" in c.name().lower()]
    assert len(ranks) >= 2, "two ranks are training"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    gone, alive = psutil.wait_procs(ranks, timeout=10)  # the next step notices (without the check: ~30 s)
    for p in alive:
        p.kill()
    assert not alive, "orphaned ranks kept training after the launcher was killed"
