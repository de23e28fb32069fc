"""Shared test fixtures: a fresh Accelerate state per test, tiny data, one thread."""

from __future__ import annotations

import os

import pytest
import torch

from convrecipes.data.loader import ImageTensorDataset

torch.set_num_threads(1)  # deterministic and fair on the 2-core CI machine
# ... and kept at 1 when a test builds a trainer: build() sets the thread count from
# trainer.threads, else OMP_NUM_THREADS, else the physical cores (convrecipes.threads)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Accelerate keeps process-wide singletons; reset them so each test can pick its own settings."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def make_blobs_dataset(n: int = 96, num_classes: int = 4, size: int = 8, channels: int = 1, seed: int = 0) -> ImageTensorDataset:
    """Learnable synthetic images: each class is a bright square at its own position, plus noise."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % num_classes
    images = torch.randint(0, 60, (n, channels, size, size), generator=g)
    half = size // 2
    for c in range(num_classes):
        r, col = (c // 2) % 2 * half, c % 2 * half
        images[labels == c, :, r : r + half, col : col + half] += 150
    return ImageTensorDataset(images.clamp(0, 255).to(torch.uint8), labels, [f"c{i}" for i in range(num_classes)])


@pytest.fixture
def blobs() -> ImageTensorDataset:
    return make_blobs_dataset()


def ddp_worker_setup(n: int = 96):
    """What the ``accelerate launch`` workers start from: an ``Accelerator``, ``n`` blobs, a
    width-4 tiny_cnn seeded with 0 and its SGD (lr 0.05, momentum 0.9)."""
    from accelerate import Accelerator

    from convrecipes.models import create_model

    accelerator = Accelerator()
    ds = make_blobs_dataset(n=n)
    torch.manual_seed(0)
    model = create_model("tiny_cnn", 1, ds.num_classes, width=4)
    return accelerator, ds, model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)


#: what a rank prints when it aborts in C++ at process-group teardown (a thread still joinable
#: at exit). Seen about once in 20 two-process runs on the 2-core machine; not in our code.
TEARDOWN_ABORT = "terminate called without an active exception"


def run_launched(args, **kwargs):
    """``subprocess.run(args, **kwargs)`` for a multi-process launch, once more if a rank
    aborted at teardown (``TEARDOWN_ABORT``). The caller still checks the result in full."""
    import subprocess

    result = subprocess.run(args, **kwargs)
    if result.returncode != 0 and TEARDOWN_ABORT in (result.stderr or ""):
        result = subprocess.run(args, **kwargs)
    return result
