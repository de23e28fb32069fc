"""Two real DDP processes on CPU (`accelerate launch --multi_gpu` with ACCELERATE_USE_CPU=1,
the command FIELD_NOTES.md verified; `--cpu --num_processes 2` would start only one)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

from tests.conftest import run_launched

ROOT = Path(__file__).parent.parent
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
          "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}


def test_two_processes_train_in_sync_and_evaluate_each_sample_once(tmp_path):
    out = tmp_path / "ddp.json"
    result = run_launched(LAUNCH + [str(ROOT / "tests" / "ddp_worker.py"), str(out)], env=ENV,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["num_processes"] == 2
    r0, r1 = sorted(report["ranks"], key=lambda r: r["rank"])
    assert r0["params"] == r1["params"], "DDP keeps the replicas identical"
    assert r0["aug"] != r1["aug"], "each process draws its own augmentations"
    # 96 samples / global batch 32 = 3 steps per epoch, whatever the process count
    assert report["steps"] == 6
    # 13 samples in global batches of 4 over 2 processes: padding removed, order kept
    assert report["targets"] == report["expected"]
    assert report["top1"] == pytest.approx(report["top1_check"])


def test_cli_train_under_accelerate_launch(tmp_path):
    run_dir = tmp_path / "run"
    result = run_launched(
        LAUNCH + ["-m", "convrecipes.cli", "train", "quickstart", "trainer.epochs=2", "model.kwargs.width=4",
                  "trainer.progress=false", "--run-dir", str(run_dir)],
        env=ENV, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-4000:]
    results = json.loads((run_dir / "results.json").read_text())
    assert results["num_processes"] == 2 and results["global_batch_size"] == 64
    assert result.stdout.count("epoch 2/2") == 1, "only the main process prints"
