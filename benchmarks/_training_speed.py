"""What the training-speed benchmarks share: our trainer as ``convrecipes train`` builds it.

- ``MODELS``: the benchmarked models and their constructor kwargs.
- ``fashion_mnist_train()``: the Fashion-MNIST training split (uint8 ``(N, 1, 28, 28)``), loaded once.
- ``our_trainer(model, ...)``: ``convrecipes.build.build`` of ``recipes/fashion_mnist.yaml`` with the
  ``standard`` augmentation (random resized crop + flip + jitter), no random erasing, no validation
  split, on a given training subset: the ``SupervisedTrainer`` (Accelerate, Kornia batch augment,
  in-memory uint8 loader) that ``convrecipes train`` would run.
- ``timed_fit(trainer, loader)``: one ``fit`` epoch over ``loader``, returning images/s.
- ``set_threads(n)``: torch's compute threads (intra-op) for what follows.

The scripts put ``benchmarks/`` on ``sys.path`` (Python does, for a script) and import this as
``_training_speed``.
"""

from __future__ import annotations

import contextlib
import functools
import io
import time
from pathlib import Path
from typing import Any, Optional

import torch

from convrecipes.build import Datasets, build
from convrecipes.data import ImageTensorDataset, InMemoryLoader, load_dataset
from convrecipes.recipe import load_recipe
from convrecipes.trainers import Trainer

#: model name -> constructor kwargs (ResNet-8 at width 32 is recipes/fashion_mnist.yaml's model)
MODELS: dict[str, dict[str, Any]] = {
    "tiny_cnn": {},
    "small_resnet8": {"width": 32},
    "mobilenetv3_small_100": {},
    "resnet18": {},
}
RECIPE = Path(__file__).resolve().parents[1] / "recipes" / "fashion_mnist.yaml"


def model_kwargs(name: str) -> dict[str, Any]:
    """Constructor kwargs of a benchmarked model (none for a model not in ``MODELS``)."""
    return dict(MODELS.get(name, {}))


@functools.lru_cache(maxsize=1)
def fashion_mnist_train() -> ImageTensorDataset:
    """Fashion-MNIST's 60,000 training images (uint8, 1 x 28 x 28) and labels."""
    return load_dataset("fashion_mnist", "train")


def random_subset(ds: ImageTensorDataset, n: int, seed: int = 0) -> ImageTensorDataset:
    """``n`` images of ``ds`` drawn without replacement (all of them when ``n >= len(ds)``)."""
    if n >= len(ds):
        return ds
    order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed))
    return ds.subset(order[:n])


def set_threads(threads: int) -> None:
    """Run torch's compute on ``threads`` intra-op threads from here on."""
    torch.set_num_threads(threads)


def our_trainer(model: str, train: ImageTensorDataset, batch_size: int = 128, epochs: int = 1000,
                channels_last: bool = True, seed: int = 0) -> tuple[Trainer, InMemoryLoader]:
    """The trainer ``convrecipes train recipes/fashion_mnist.yaml`` builds, for ``model``.

    Overrides: ``augment.preset=standard`` (random resized crop, scale 0.35-1, + flip +
    brightness/contrast jitter 0.4), ``augment.random_erasing=0``, ``data.val_fraction=0``,
    no warm-up epoch, no progress bar, no run directory (nothing written).

    Args:
        model: a ``MODELS`` name (or any timm model name; its kwargs then are empty).
        train: the training images; the returned loader yields ``len(train) // batch_size``
            batches per epoch.
        epochs: the schedule's length in epochs of ``train`` (cosine over all of them).

    Returns:
        The trainer and its training loader.
    """
    recipe = load_recipe(str(RECIPE), [
        f"model.name={model}", "model.kwargs={}", "augment.preset=standard", "augment.random_erasing=0", "data.val_fraction=0",
        f"data.batch_size={batch_size}", f"trainer.epochs={epochs}", "schedule.warmup_epochs=0",
        "trainer.progress=false", f"model.channels_last={str(channels_last).lower()}", f"seed={seed}",
    ])
    recipe.model.kwargs = model_kwargs(model)
    exp = build(recipe, datasets=Datasets(train=train, val=None, test=train))
    return exp.trainer, exp.train_loader


def loader_like(loader: InMemoryLoader, dataset: ImageTensorDataset) -> InMemoryLoader:
    """A training loader over ``dataset`` with ``loader``'s batch size, seed and device."""
    return InMemoryLoader(dataset, loader.batch_size, shuffle=True, drop_last=True, seed=loader.seed,
                          device=loader.device)


def _sync(device: Optional[torch.device]) -> None:
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def timed_fit(trainer: Trainer, loader: InMemoryLoader) -> float:
    """Train one epoch of ``loader`` with ``trainer.fit`` (everything ``fit`` does per epoch
    included) and return the images/s of that call."""
    _sync(trainer.device)
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):  # the epoch line; the caller prints a table
        trainer.fit(loader, epochs=trainer.epoch + 1)
    _sync(trainer.device)
    return len(loader) * loader.batch_size / (time.perf_counter() - t0)


def comma_ints(text: str) -> list[int]:
    """``"1,2"`` -> ``[1, 2]`` (a command-line list of counts)."""
    return [int(x) for x in text.split(",") if x.strip()]
