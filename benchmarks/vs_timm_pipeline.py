"""Training throughput: our trainer against a loop fed by timm's own data pipeline.

Ours: ``SupervisedTrainer`` as ``convrecipes train recipes/fashion_mnist.yaml`` builds it
(``augment.preset=standard``), uint8 images in memory, Kornia augmentation on whole batches.
timm's: ``timm.data.create_dataset`` on a folder of Fashion-MNIST PNGs (written once to a
cache folder) + ``timm.data.create_loader(is_training=True)`` with worker processes, feeding
the plain loop of timm's ``train.py`` (``create_optimizer_v2`` SGD, ``CosineLRScheduler``
stepped per update, ``loss.item()`` per step). Both sides train the same model (built by
``convrecipes.models.create_model``, channels-last on both) on batch 128, SGD with Nesterov
momentum 0.9, lr 0.1, weight decay 5e-4 (not on norms and biases), per-step cosine schedule,
cross-entropy.

Same augmentation semantics, per image: random resized crop to 28 x 28 (scale 0.35-1, ratio
3/4-4/3, bilinear), horizontal flip p=0.5, brightness and contrast jitter 0.4 (factor in
[0.6, 1.4]), normalisation by the training set's mean/std; 1 channel on both (timm reads the
PNGs with ``input_img_mode="L"``, its ``train.py --input-img-mode L``; its default would
convert to RGB). Differences: timm crops and jitters 8-bit PIL images (rounding to uint8
after each op), ours float tensors; torchvision's ColorJitter applies brightness and contrast
in a random order, Kornia's in a fixed one; PIL's bilinear resize antialiases when it
shrinks, Kornia's does not. timm's ``use_prefetcher`` is off (it is a CUDA-stream device
prefetcher), so the workers also convert to tensors and normalise.

Every cell of the grid (ours: compute threads; timm: compute threads x loader workers) runs
``--steps`` timed training steps per round after warm-up, and the rounds alternate the order
of the cells so background load hits all alike. A cell's number is the median over rounds;
each side's best cell is compared. Prints a table and writes JSON; a model already in the
JSON with the same settings is skipped (``--fresh`` re-measures), and models measured with
other settings stay in the file (each entry records its settings).

    python benchmarks/vs_timm_pipeline.py                                   # full: 4 models, 3 rounds
    python benchmarks/vs_timm_pipeline.py --steps 5 --rounds 1 --models tiny_cnn   # a quick look
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
import torch.nn.functional as F

from _training_speed import MODELS, fashion_mnist_train, loader_like, model_kwargs, our_trainer, random_subset
from _training_speed import comma_ints, set_threads, timed_fit
from convrecipes.augment import dataset_mean_std
from convrecipes.data import ImageTensorDataset
from convrecipes.models import create_model

RESULT = "benchmarks/results/vs_timm_pipeline.json"
SCALE = (0.35, 1.0)  # the `standard` preset's random-resized-crop scale


def default_cache_dir() -> Path:
    """Where the PNG folder goes by default: ``$XDG_CACHE_HOME/convrecipes`` (``~/.cache``)."""
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "convrecipes"


def write_png_folder(ds: ImageTensorDataset, root: Path) -> Path:
    """Write ``ds`` as ``root/train/<class index>/<i>.png`` (grayscale) once; return ``root``.

    A finished folder holds ``complete`` with the image count; an unfinished one is rewritten.
    Class folders are named ``00``..``09`` so timm's sorted folder order is the label order.
    """
    from PIL import Image

    marker = root / "complete"
    if marker.exists() and marker.read_text().strip() == str(len(ds)):
        return root
    images = ds.images[:, 0].numpy()
    labels = ds.labels.tolist()
    for k in range(ds.num_classes):
        (root / "train" / f"{k:02d}").mkdir(parents=True, exist_ok=True)
    for i, (image, label) in enumerate(zip(images, labels)):
        Image.fromarray(image, mode="L").save(root / "train" / f"{label:02d}" / f"{i:05d}.png")
    marker.write_text(str(len(ds)))
    return root


class TimmLoop:
    """A model trained by the plain loop of timm's ``train.py``, fed by timm's loaders.

    Args:
        model: model name; built like ours (same constructor, kwargs and seed).
        png_root: the folder ``write_png_folder`` wrote.
        mean, std: normalisation (the training set's, like ours).
        workers: the loader worker counts to build loaders for.
        total_steps: length of the cosine schedule in optimizer steps.
    """

    def __init__(self, model: str, png_root: Path, mean: list[float], std: list[float], workers: list[int],
                 batch_size: int = 128, total_steps: int = 100_000, channels_last: bool = True, seed: int = 0) -> None:
        from timm.data import create_dataset, create_loader
        from timm.optim import create_optimizer_v2
        from timm.scheduler import CosineLRScheduler

        torch.manual_seed(seed)
        self.channels_last = channels_last
        self.model = create_model(model, 1, 10, **model_kwargs(model))
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # timm's "sgd" is SGD with Nesterov momentum; weight decay skips norms and biases
        self.optimizer = create_optimizer_v2(self.model, "sgd", lr=0.1, momentum=0.9, weight_decay=5e-4)
        self.scheduler = CosineLRScheduler(self.optimizer, t_initial=total_steps, t_in_epochs=False)
        self.updates = 0
        dataset = create_dataset("", root=str(png_root), split="train", is_training=True, input_img_mode="L")
        self.loaders = {
            w: create_loader(dataset, input_size=(1, 28, 28), batch_size=batch_size, is_training=True, scale=SCALE,
                             hflip=0.5, color_jitter=(0.4, 0.4, 0.0), mean=tuple(mean), std=tuple(std),
                             interpolation="bilinear", num_workers=w, device=torch.device("cpu"),
                             use_prefetcher=False, persistent_workers=w > 0)
            for w in workers
        }
        self._iters: dict[int, Iterator] = {}

    def _next(self, workers: int) -> tuple[torch.Tensor, torch.Tensor]:
        it = self._iters.get(workers)
        if it is not None:
            batch = next(it, None)
            if batch is not None:
                return batch
        self._iters[workers] = iter(self.loaders[workers])
        return next(self._iters[workers])

    def drain(self, workers: int) -> None:
        """Take the batches the workers prefetched while other cells ran, untimed, so a timed
        run starts from the loader's steady state rather than a full queue."""
        loader = self.loaders[workers]
        for _ in range(workers * (loader.prefetch_factor or 0)):
            self._next(workers)

    def train(self, workers: int, steps: int) -> int:
        """``steps`` training steps from the ``workers`` loader; returns the images trained."""
        self.model.train()
        n = 0
        for _ in range(steps):
            x, y = self._next(workers)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            loss = F.cross_entropy(self.model(x), y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.updates += 1
            self.scheduler.step_update(num_updates=self.updates)
            loss.item()  # train.py reads the loss every step (its running average)
            n += x.shape[0]
        return n


def measure_model(model: str, args: argparse.Namespace, png_root: Path, mean: list[float],
                  std: list[float]) -> dict[str, Any]:
    """Median images/s of every grid cell of both sides for ``model``, rounds alternating."""
    load_before = list(os.getloadavg())
    train = fashion_mnist_train()
    set_threads(max(args.ours_threads))
    trainer, loader = our_trainer(model, random_subset(train, args.steps * args.batch_size, seed=1),
                                  batch_size=args.batch_size)
    warm_loader = loader_like(loader, random_subset(train, max(args.warmup, 1) * args.batch_size, seed=2))
    timm_loop = TimmLoop(model, png_root, mean, std, args.timm_workers, batch_size=args.batch_size)
    cells = [("ours", t, None) for t in args.ours_threads]
    cells += [("timm", t, w) for t in args.timm_threads for w in args.timm_workers]
    rates: dict[str, list[float]] = {cell_name(*c): [] for c in cells}
    for r in range(args.rounds):
        for side, threads, workers in (cells if r % 2 == 0 else cells[::-1]):
            set_threads(threads)
            if side == "ours":
                timed_fit(trainer, warm_loader)  # warm-up at this thread count, untimed
                rate = timed_fit(trainer, loader)
            else:
                timm_loop.drain(workers)
                timm_loop.train(workers, args.warmup)
                t0 = time.perf_counter()
                n = timm_loop.train(workers, args.steps)
                rate = n / (time.perf_counter() - t0)
            rates[cell_name(side, threads, workers)].append(rate)
            print(f"  {model} round {r + 1}/{args.rounds} {cell_name(side, threads, workers)}: {rate:.0f} img/s",
                  flush=True)
    del timm_loop  # shuts its workers down
    median = {k: statistics.median(v) for k, v in rates.items()}
    ours_best = max((k for k in median if k.startswith("ours")), key=median.get)
    timm_best = max((k for k in median if k.startswith("timm")), key=median.get)
    return {"settings": settings_of(args), "images_per_s": rates, "median": median,
            "ours_best": {"cell": ours_best, "images_per_s": median[ours_best]},
            "timm_best": {"cell": timm_best, "images_per_s": median[timm_best]},
            "ratio": median[ours_best] / median[timm_best],
            "load_average_before": load_before, "load_average_after": list(os.getloadavg())}


def cell_name(side: str, threads: int, workers: Optional[int]) -> str:
    """``ours t2`` / ``timm t1 w2``: a grid cell's key in the table and the JSON."""
    return f"{side} t{threads}" + (f" w{workers}" if workers is not None else "")


def settings_of(args: argparse.Namespace) -> dict[str, Any]:
    """What makes a model's measurement comparable (a saved one with other settings is redone)."""
    return {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch_size": args.batch_size,
            "ours_threads": args.ours_threads, "timm_threads": args.timm_threads, "timm_workers": args.timm_workers,
            "images": args.images}


def print_table(results: dict[str, Any]) -> None:
    """Per model: each side's best cell, the ratio, and the whole grid."""
    print(f"\n{'model':<24} {'ours img/s':>10} {'timm img/s':>10} {'ratio':>6}   best settings (ours | timm)")
    for model, res in results.items():
        o, t = res["ours_best"], res["timm_best"]
        print(f"{model:<24} {o['images_per_s']:>10.0f} {t['images_per_s']:>10.0f} {res['ratio']:>6.2f}   "
              f"{o['cell']} | {t['cell']}")
    print("\ngrid (median img/s over rounds; t = compute threads, w = loader workers)")
    for model, res in results.items():
        print(f"{model}: " + ", ".join(f"{k} {v:.0f}" for k, v in res["median"].items()))


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=60, help="timed training steps per cell per round")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps before each timed run")
    parser.add_argument("--rounds", type=int, default=3, help="rounds over the grid, alternating the order")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--ours-threads", type=comma_ints, default=[1, 2], help="comma-separated (default 1,2)")
    parser.add_argument("--timm-threads", type=comma_ints, default=[1, 2], help="comma-separated (default 1,2)")
    parser.add_argument("--timm-workers", type=comma_ints, default=[0, 1, 2], help="comma-separated (default 0,1,2)")
    parser.add_argument("--images", type=int, default=60000,
                        help="Fashion-MNIST training images in timm's PNG folder (default: all 60,000)")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="where the PNG folder is written once (default: ~/.cache/convrecipes)")
    parser.add_argument("--out", default=RESULT)
    parser.add_argument("--fresh", action="store_true", help="re-measure models already in --out")
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]
    if args.images < args.batch_size:
        parser.error(f"--images {args.images} is less than one batch of {args.batch_size}")

    out = Path(args.out)
    saved = json.loads(out.read_text()) if out.exists() and not args.fresh else {}
    # every model saved stays in the file; one saved with these settings is not measured again
    results: dict[str, Any] = dict(saved.get("models", {}))
    train = fashion_mnist_train()
    mean, std = dataset_mean_std(train.images)
    cache = (args.cache_dir or default_cache_dir()) / f"fashion_mnist_png_{args.images}"
    t0 = time.perf_counter()
    png_root = write_png_folder(random_subset(train, args.images, seed=0), cache)
    print(f"timm's image folder: {png_root} ({time.perf_counter() - t0:.1f} s to check/write)")
    load_before = list(os.getloadavg())
    for model in models:
        if model in results and results[model].get("settings") == settings_of(args):
            print(f"{model}: measured already in {out} with these settings (--fresh to redo)")
            continue
        results[model] = measure_model(model, args, png_root, mean, std)
        _write(out, results, load_before)
    print_table(results)  # every model in the file, each measured with the settings it records
    _write(out, results, load_before)
    print(f"wrote {out}")


def _write(out: Path, results: dict[str, Any], load_before: list[float]) -> None:
    doc = {"benchmark": "vs_timm_pipeline", "cpu": platform.processor() or platform.machine(),
           "cpu_count": os.cpu_count(), "torch": torch.__version__, "load_average_at_start": load_before,
           "models": results}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(out)


if __name__ == "__main__":
    main()
