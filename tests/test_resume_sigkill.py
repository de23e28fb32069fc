"""Kill a training process with SIGKILL mid-epoch, resume it, and get bit-identical weights."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from convrecipes.checkpoint import load_checkpoint, read_metadata
from convrecipes.errors import CheckpointError

TRAIN = [sys.executable, "-m", "convrecipes.cli", "train"]
ARGS = ["quickstart", "trainer.epochs=4", "trainer.checkpoint_every_steps=3", "model.kwargs.width=8",
        "trainer.progress=false", "trainer.ema_decay=0.9", "trainer.deterministic=true"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _step_of(path) -> int:
    try:
        return read_metadata(path)["global_step"]
    except (CheckpointError, KeyError):
        return -1


def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    full, cut = tmp_path / "full", tmp_path / "cut"
    subprocess.run(TRAIN + ARGS + ["--run-dir", str(full)], env=ENV, check=True, capture_output=True)

    proc = subprocess.Popen(TRAIN + ARGS + ["--run-dir", str(cut)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    last = cut / "last.safetensors"
    deadline = time.time() + 120
    # 20 optimizer steps per epoch: wait for a step checkpoint inside epoch 2, then kill
    while _step_of(last) < 24 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    if proc.returncode != -signal.SIGKILL:
        pytest.skip("training finished before it could be killed")
    meta = read_metadata(last)
    assert meta["global_step"] % 20 != 0 and meta["global_step"] < 80, "the kill should land mid-epoch"

    resumed = subprocess.run(TRAIN + ["--resume", str(cut)], env=ENV, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, _ = load_checkpoint(full / "last.safetensors")
    b, meta_b = load_checkpoint(last)
    assert meta_b["epoch"] == 4 and meta_b["global_step"] == 80
    for part in ("model", "ema"):
        for name, tensor in a[part].items():
            assert torch.equal(tensor, b[part][name]), f"{part}/{name} differs after resume"
    for k, v in a["optimizer"]["state"].items():
        assert torch.equal(v["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
