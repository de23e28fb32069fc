"""The GPU suite: ResNet-50 at 224 px, one script, under 8 minutes on one GPU.

Cells, each a fixed number of timed steps after warm-up steps (``torch.cuda.synchronize()``
before and after the timed part), in images/s:

- augmentation alone: Kornia's ``standard`` preset batched on the device against
  torchvision v2 per-image transforms (the same random-resized-crop, flip and colour jitter)
  in DataLoader workers, both from in-memory uint8 images;
- the loop, bf16, channels-last: convrecipes' ``SupervisedTrainer`` (in-memory uint8 loader,
  Kornia on the device) against a hand-written loop (same model, optimizer, augmentation) and
  against timm's loader path (``timm.data.create_dataset`` + ``create_loader`` on an image
  folder of JPEGs, per-image transforms in worker processes, timm's prefetcher on CUDA);
- precision: the trainer in fp32, bf16 autocast, fp16 with the gradient scaler;
- memory format and compilation: the trainer with channels-last on and off, ``torch.compile``
  on and off.

The images are smooth random pictures (random 14x14 colours upsampled), made here: no
download. ``--budget-s`` (default 450) stops adding cells once the next one might not fit.

    python benchmarks/gpu_suite.py                 # the suite (CUDA)
    python benchmarks/gpu_suite.py --tiny          # a small model at 32 px, 2 steps a cell; runs on CPU

``--tiny`` checks that every cell runs: cells that need CUDA (fp16 with the gradient scaler)
are skipped with a "needs CUDA" note, and on CPU ``torch.compile`` uses the ``eager`` backend
(the compile path without code generation, which would take minutes on a CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.augment import build_augment
from convrecipes.data import InMemoryLoader
from convrecipes.data.loader import ImageTensorDataset
from convrecipes.models import create_model
from convrecipes.trainers import SupervisedTrainer

#: ImageNet's mean and std: what a ResNet-50 recipe at 224 px would normalise with
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
#: the ``standard`` preset's crop scale, used by all three pipelines
CROP_SCALE = (0.35, 1.0)


@dataclass
class Setup:
    """What every cell shares."""

    model: str
    image_size: int
    batch_size: int
    steps: int
    warmup: int
    workers: int
    num_classes: int
    device: torch.device
    compile_backend: str
    images: torch.Tensor = field(repr=False)  # (N, 3, S, S) uint8, N = batch_size * steps
    labels: torch.Tensor = field(repr=False)


@dataclass
class Cell:
    """One measurement: a ``run(setup) -> (images/s, extra)`` with its place in the table."""

    group: str
    name: str
    run: Callable[[Setup], tuple[float, dict[str, Any]]]
    needs_cuda: bool = False
    compiles: bool = False


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def make_images(n: int, size: int, num_classes: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` smooth random RGB uint8 images (random 14x14 colours, bilinearly upsampled: they
    compress as JPEG like photos rather than noise) and random labels."""
    g = torch.Generator().manual_seed(seed)
    low = torch.rand(n, 3, 14, 14, generator=g)
    images = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return (images * 255).round().clamp(0, 255).to(torch.uint8), torch.randint(0, num_classes, (n,), generator=g)


def fresh_accelerate_state() -> None:
    """Accelerate keeps process-wide singletons: reset them so each cell picks its own precision."""
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def new_model(s: Setup, channels_last: bool, compiled: bool) -> nn.Module:
    torch.manual_seed(0)
    model = create_model(s.model, 3, s.num_classes).to(s.device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model, backend=s.compile_backend) if compiled else model


def sgd(model: nn.Module) -> tuple[torch.optim.Optimizer, Any]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-5)
    return opt, torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)


def kornia_standard(s: Setup) -> nn.Module:
    return build_augment("standard", (s.image_size, s.image_size), 3, MEAN, STD, s.num_classes).to(s.device)


def timed(s: Setup, warmup: Callable[[], Any], measured: Callable[[], int]) -> float:
    """images/s of ``measured()`` (which returns the images it processed) after ``warmup()``."""
    warmup()
    sync(s.device)
    t0 = time.perf_counter()
    n = measured()
    sync(s.device)
    return n / (time.perf_counter() - t0)


# -- augmentation alone ----------------------------------------------------------------------
def aug_kornia(s: Setup) -> tuple[float, dict[str, Any]]:
    aug = kornia_standard(s)
    images, labels = s.images.to(s.device), s.labels.to(s.device)

    def run(steps: int) -> int:
        for b in range(steps):
            sl = slice(b * s.batch_size, (b + 1) * s.batch_size)
            aug(images[sl].float().div_(255), labels[sl])
        return steps * s.batch_size

    return timed(s, lambda: run(min(s.warmup, s.steps)), lambda: run(s.steps)), {"where": str(s.device)}


class _PerImage(torch.utils.data.Dataset):
    """In-memory uint8 images through a per-image transform (what DataLoader workers run)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable) -> None:
        self.images, self.labels, self.transform = images, labels, transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.transform(self.images[i]), self.labels[i]


def torchvision_loader(s: Setup) -> torch.utils.data.DataLoader:
    from torchvision.transforms import v2

    transform = v2.Compose([
        v2.RandomResizedCrop(s.image_size, scale=CROP_SCALE, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.ColorJitter(0.4, 0.4, 0.4),
        v2.ToDtype(torch.float32, scale=True),
        v2.Normalize(MEAN, STD),
    ])
    return torch.utils.data.DataLoader(
        _PerImage(s.images, s.labels, transform), batch_size=s.batch_size, shuffle=True, drop_last=True,
        num_workers=s.workers, persistent_workers=s.workers > 0, pin_memory=s.device.type == "cuda")


def cycle_batches(loader: Any, steps: int, consume: Callable[[torch.Tensor, torch.Tensor], None]) -> int:
    """Feed ``steps`` batches of ``loader`` (epoch after epoch) to ``consume``; images fed."""
    done = n = 0
    while done < steps:
        for x, y in loader:
            consume(x, y)
            n += len(x)
            done += 1
            if done == steps:
                break
    return n


def aug_torchvision(s: Setup) -> tuple[float, dict[str, Any]]:
    loader = torchvision_loader(s)

    def to_device(x: torch.Tensor, y: torch.Tensor) -> None:
        x.to(s.device, non_blocking=True), y.to(s.device, non_blocking=True)

    rate = timed(s, lambda: cycle_batches(loader, max(s.warmup, 1), to_device),
                 lambda: cycle_batches(loader, s.steps, to_device))
    return rate, {"workers": s.workers}


# -- the loop --------------------------------------------------------------------------------
def trainer_cell(precision: str = "bf16", channels_last: bool = True, compiled: bool = False):
    """A cell running ``SupervisedTrainer.fit`` over the in-memory uint8 images (one epoch is
    ``steps`` steps; the warm-up is one epoch of ``warmup`` steps on the first images)."""

    def run(s: Setup) -> tuple[float, dict[str, Any]]:
        fresh_accelerate_state()
        model = new_model(s, channels_last, compiled)
        opt, sched = sgd(model)
        trainer = SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, augment=kornia_standard(s),
                                    mixed_precision=precision, channels_last=channels_last, progress=False)
        data = ImageTensorDataset(s.images, s.labels, [str(c) for c in range(s.num_classes)])
        warm = InMemoryLoader(data.subset(torch.arange(s.batch_size * max(s.warmup, 1))), s.batch_size, seed=0)
        loader = InMemoryLoader(data, s.batch_size, seed=1)
        rate = timed(s, lambda: trainer.fit(warm, epochs=1), lambda: (trainer.fit(loader, epochs=2),
                                                                    len(loader) * s.batch_size)[1])
        extra: dict[str, Any] = {"mixed_precision": trainer.accelerator.mixed_precision}
        if trainer.accelerator.scaler is not None:
            extra["grad_scale_at_end"] = trainer.accelerator.scaler.get_scale()
        return rate, extra

    return run


def hand_written(s: Setup) -> tuple[float, dict[str, Any]]:
    """The loop a practitioner writes: slice, float, augment on the device, bf16 autocast, step."""
    model = new_model(s, channels_last=True, compiled=False)
    opt, sched = sgd(model)
    aug = kornia_standard(s)
    images, labels = s.images, s.labels

    def run(steps: int, seed: int) -> int:
        model.train()
        order = torch.randperm(len(images), generator=torch.Generator().manual_seed(seed))
        for b in range(steps):
            idx = order[b * s.batch_size:(b + 1) * s.batch_size]
            x = images.index_select(0, idx).to(s.device, non_blocking=True).float().div_(255)
            y = labels.index_select(0, idx).to(s.device, non_blocking=True)
            x, y = aug(x, y)
            x = x.contiguous(memory_format=torch.channels_last)
            with torch.autocast(s.device.type, dtype=torch.bfloat16):  # bf16 autocasts on CPU too
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        return steps * s.batch_size

    return timed(s, lambda: run(max(s.warmup, 1), 0), lambda: run(s.steps, 1)), {"mixed_precision": "bf16"}


def write_image_folder(s: Setup, root: Path) -> Path:
    """The images as JPEG files in class folders (what timm's ``train.py`` reads)."""
    from PIL import Image

    for i, (img, label) in enumerate(zip(s.images, s.labels.tolist())):
        folder = root / f"class_{label:03d}"
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img.permute(1, 2, 0).numpy()).save(folder / f"{i:06d}.jpg", quality=90)
    return root


def timm_loader_path(s: Setup) -> tuple[float, dict[str, Any]]:
    """timm's ``train.py`` data path: ``create_dataset`` + ``create_loader`` (decode and
    per-image random-resized-crop, flip, colour jitter in ``workers`` processes; on CUDA the
    prefetcher normalises on the device), then the same model step as the hand-written loop."""
    from timm.data import create_dataset, create_loader

    model = new_model(s, channels_last=True, compiled=False)
    opt, sched = sgd(model)
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        root = write_image_folder(s, Path(tmp))
        write_s = time.perf_counter() - t0
        dataset = create_dataset("", root=str(root), split="train", search_split=False, is_training=True)
        cuda = s.device.type == "cuda"
        loader = create_loader(dataset, input_size=(3, s.image_size, s.image_size), batch_size=s.batch_size,
                               is_training=True, scale=CROP_SCALE, hflip=0.5, color_jitter=0.4, mean=MEAN, std=STD,
                               num_workers=s.workers, device=s.device, use_prefetcher=cuda, pin_memory=cuda,
                               persistent_workers=s.workers > 0)

        def step(x: torch.Tensor, y: torch.Tensor) -> None:
            x = x.to(s.device, non_blocking=True).contiguous(memory_format=torch.channels_last)
            y = y.to(s.device, non_blocking=True)
            with torch.autocast(s.device.type, dtype=torch.bfloat16):
                loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()

        model.train()
        rate = timed(s, lambda: cycle_batches(loader, max(s.warmup, 1), step), lambda: cycle_batches(loader, s.steps, step))
    return rate, {"workers": s.workers, "jpeg_files": len(dataset), "write_files_s": round(write_s, 1),
                  "mixed_precision": "bf16"}


def cells() -> list[Cell]:
    """The table, most important first (the budget drops cells from the end)."""
    return [
        Cell("augmentation", "kornia standard, batched on the device", aug_kornia),
        Cell("augmentation", "torchvision v2 per image, DataLoader workers", aug_torchvision),
        Cell("loop (bf16, channels-last)", "convrecipes SupervisedTrainer", trainer_cell("bf16")),
        Cell("loop (bf16, channels-last)", "hand-written loop", hand_written),
        Cell("loop (bf16, channels-last)", "timm create_loader, JPEG folder, workers", timm_loader_path),
        Cell("precision (trainer, channels-last)", "fp32", trainer_cell("no")),
        Cell("precision (trainer, channels-last)", "fp16 + GradScaler", trainer_cell("fp16"), needs_cuda=True),
        Cell("memory format / compile (trainer, bf16)", "channels-first", trainer_cell("bf16", channels_last=False)),
        Cell("memory format / compile (trainer, bf16)", "channels-last + torch.compile",
             trainer_cell("bf16", compiled=True), compiles=True),
        Cell("memory format / compile (trainer, bf16)", "channels-first + torch.compile",
             trainer_cell("bf16", channels_last=False, compiled=True), compiles=True),
    ]


def run_suite(s: Setup, budget_s: float, only: Optional[set[str]] = None) -> list[dict[str, Any]]:
    """Run the cells in order; skip what needs CUDA on another device and, once the next
    cell might not fit in ``budget_s`` (the slowest cell so far, 4x for a compiling cell
    after a non-compiling one), everything left. The first cell to run always runs."""
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    slowest = slowest_compile = 0.0
    ran = 0
    for cell in cells():
        row: dict[str, Any] = {"group": cell.group, "cell": cell.name}
        rows.append(row)
        if only and cell.name not in only:
            row["skipped"] = "not selected"
            continue
        if cell.needs_cuda and s.device.type != "cuda":
            row["skipped"] = "needs CUDA"
            continue
        estimate = max(slowest, slowest_compile) if not cell.compiles else (slowest_compile or 4 * slowest)
        if ran and time.perf_counter() - start + estimate > budget_s:
            row["skipped"] = f"budget ({budget_s:.0f} s)"
            continue
        t0 = time.perf_counter()
        rate, extra = cell.run(s)
        took = time.perf_counter() - t0
        ran += 1
        if cell.compiles:
            slowest_compile = max(slowest_compile, took)
        else:
            slowest = max(slowest, took)
        row.update(images_per_s=round(rate, 1), ms_per_step=round(1000 * s.batch_size / rate, 2),
                   cell_wall_s=round(took, 1), **extra)
        print(f"  {cell.group} | {cell.name}: {rate:,.0f} img/s ({took:.1f} s)", flush=True)
    return rows


def print_table(rows: list[dict[str, Any]]) -> None:
    print(f"\n{'group':<42} {'cell':<46} {'img/s':>10} {'ms/step':>9}  note")
    for r in rows:
        if "skipped" in r:
            print(f"{r['group']:<42} {r['cell']:<46} {'-':>10} {'-':>9}  skipped: {r['skipped']}")
        else:
            print(f"{r['group']:<42} {r['cell']:<46} {r['images_per_s']:>10,.0f} {r['ms_per_step']:>9.2f}  "
                  f"{r['cell_wall_s']} s")


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="small model at 32 px, 2 steps a cell: a CPU check")
    parser.add_argument("--model", help="timm name (default resnet50; tiny: resnet18)")
    parser.add_argument("--image-size", type=int, help="default 224; tiny: 32")
    parser.add_argument("--batch-size", type=int, help="default 128; tiny: 8")
    parser.add_argument("--steps", type=int, help="timed steps a cell (default 30; tiny: 2)")
    parser.add_argument("--warmup", type=int, help="untimed steps before them (default 10; tiny: 1)")
    parser.add_argument("--workers", type=int, help="DataLoader workers (default: CPU cores, at most 16; tiny: 2)")
    parser.add_argument("--budget-s", type=float, default=450.0, help="stop adding cells past this (default 450)")
    parser.add_argument("--device", help="default: cuda if available, else cpu")
    parser.add_argument("--only", nargs="*", help="run only these cells (names as printed)")
    parser.add_argument("--out", help="JSON path (default benchmarks/results/gpu_suite.json; tiny: gpu_suite_tiny.json)")
    args = parser.parse_args(argv)

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tiny = args.tiny
    model = args.model or ("resnet18" if tiny else "resnet50")
    size = args.image_size or (32 if tiny else 224)
    batch = args.batch_size or (8 if tiny else 128)
    steps = args.steps or (2 if tiny else 30)
    warmup = args.warmup if args.warmup is not None else (1 if tiny else 10)
    workers = args.workers if args.workers is not None else (2 if tiny else min(16, os.cpu_count() or 1))
    num_classes = 10 if tiny else 100
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    images, labels = make_images(batch * steps, size, num_classes)
    setup = Setup(model, size, batch, steps, warmup, workers, num_classes, device,
                  "inductor" if device.type == "cuda" else "eager", images, labels)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"gpu suite: {model} at {size} px, batch {batch}, {warmup} warm-up + {steps} timed steps a cell, "
          f"{workers} workers, {device} ({device_name}), torch.compile backend {setup.compile_backend}", flush=True)
    t0 = time.perf_counter()
    rows = run_suite(setup, args.budget_s, set(args.only) if args.only else None)
    wall = time.perf_counter() - t0
    print_table(rows)
    print(f"total {wall:.0f} s")
    import timm
    import kornia
    import torchvision

    result = {
        "benchmark": "gpu_suite", "tiny": tiny, "device": str(device), "device_name": device_name,
        "model": model, "image_size": size, "batch_size": batch, "steps": steps, "warmup": warmup,
        "workers": workers, "compile_backend": setup.compile_backend, "threads": torch.get_num_threads(),
        "load_average": os.getloadavg(), "versions": {"torch": torch.__version__, "timm": timm.__version__,
                                                     "kornia": kornia.__version__, "torchvision": torchvision.__version__},
        "wall_s": round(wall, 1), "cells": rows,
    }
    out = Path(args.out or f"benchmarks/results/gpu_suite{'_tiny' if tiny else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
