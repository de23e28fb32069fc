"""Throughput of ``SupervisedTrainer`` against a minimal hand-written PyTorch loop.

Same model, data, batch size, augmentation, optimizer and schedule; the two alternate epoch
by epoch in one process so background load hits both alike. Prints a table and writes JSON.

    python benchmarks/loop_overhead.py                # Fashion-MNIST subset, small_resnet8 (CPU)
    python benchmarks/loop_overhead.py --rounds 5 --images 20000
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from convrecipes.augment import build_augment, dataset_mean_std
from convrecipes.data import InMemoryLoader, load_dataset
from convrecipes.data.splits import subset_indices
from convrecipes.models import create_model
from convrecipes.trainers import SupervisedTrainer


def hand_written_epoch(model, optimizer, scheduler, augment, images, labels, batch_size, seed, epoch, device):
    """The loop a practitioner would write: permute, slice, float, augment, step."""
    model.train()
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(images), generator=generator)
    n_batches = len(images) // batch_size
    for b in range(n_batches):
        idx = order[b * batch_size:(b + 1) * batch_size]
        x = images.index_select(0, idx).to(device).float().div_(255)
        y = labels.index_select(0, idx).to(device)
        x, y = augment(x, y)
        x = x.contiguous(memory_format=torch.channels_last)
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
    return n_batches * batch_size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="small_resnet8")
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--images", type=int, default=10000, help="training images per epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--rounds", type=int, default=4, help="epochs of each, alternating")
    parser.add_argument("--out", default="benchmarks/results/loop_overhead.json")
    args = parser.parse_args()

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    ds = load_dataset("fashion_mnist", "train")
    ds = ds.subset(subset_indices(ds.labels, fraction=args.images / len(ds), seed=0))
    mean, std = dataset_mean_std(ds.images)

    def make(seed=0):
        torch.manual_seed(seed)
        model = create_model(args.model, 1, 10, width=args.width).to(device).to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10_000)
        aug = build_augment("light", (28, 28), 1, mean, std, 10).to(device)
        return model, opt, sched, aug

    model, opt, sched, aug = make()
    trainer = SupervisedTrainer(model, opt, nn.CrossEntropyLoss(), scheduler=sched, augment=aug,
                                channels_last=True, progress=True)
    loader = InMemoryLoader(ds, args.batch_size, seed=0)
    h_model, h_opt, h_sched, h_aug = make()
    images, labels = ds.images, ds.labels

    # one warm-up epoch each (allocator, kernels), not timed
    trainer.fit(loader, epochs=1)
    hand_written_epoch(h_model, h_opt, h_sched, h_aug, images, labels, args.batch_size, 0, 0, device)
    rates = {"trainer": [], "hand_written": []}
    for r in range(args.rounds):
        for name in ("trainer", "hand_written") if r % 2 == 0 else ("hand_written", "trainer"):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            if name == "trainer":
                trainer.fit(loader, epochs=trainer.epoch + 1)
                n = len(loader) * args.batch_size
            else:
                n = hand_written_epoch(h_model, h_opt, h_sched, h_aug, images, labels, args.batch_size, 0, r + 1, device)
            if device.type == "cuda":
                torch.cuda.synchronize()
            rates[name].append(n / (time.perf_counter() - t0))
    med = {k: statistics.median(v) for k, v in rates.items()}
    ratio = med["trainer"] / med["hand_written"]
    print(f"\n{'loop':<14} {'median img/s':>12}   per-epoch img/s")
    for k, v in rates.items():
        print(f"{k:<14} {med[k]:>12.0f}   {', '.join(f'{x:.0f}' for x in v)}")
    print(f"ratio trainer / hand-written: {ratio:.3f} (target >= 0.98)")
    result = {
        "benchmark": "loop_overhead", "device": str(device), "cpu": platform.processor() or platform.machine(),
        "threads": torch.get_num_threads(), "model": args.model, "width": args.width, "images": len(ds),
        "batch_size": args.batch_size, "rounds": args.rounds, "images_per_s": rates, "median": med, "ratio": ratio,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
