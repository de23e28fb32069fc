"""How close our trainer's step comes to the machine's limit, and where the rest of the time goes.

For each model and thread count:

- training FLOPs per image: ``torch.utils.flop_counter.FlopCounterMode`` over one forward,
  cross-entropy and backward of the model in training mode (it counts matmuls and
  convolutions, the FLOPs that dominate; element-wise ops, norms and the Kornia augmentation
  are not counted);
- achieved GFLOP/s: images/s of our trainer (``convrecipes train`` as ``_training_speed``
  builds it: Fashion-MNIST, batch 128, ``standard`` augmentation) x FLOPs per image;
- the machine's peak at the same thread count, counted the same way: a large float32 matmul
  and a large 3 x 3 convolution (forward; contiguous and channels-last, the faster counts);
- the fraction of the peak each model reaches;
- a profile of one short epoch of the same trainer: wall-clock timers around the loader's
  batch gather, the batch preparation (uint8 -> float, Kornia augmentation, channels-last),
  forward + loss, the NaN check (the step's host sync), backward, the optimizer and schedule
  step; the rest of the epoch is Python and loop overhead (callbacks, bookkeeping, autocast
  contexts). On CPU every op is synchronous, so the timers split the time exactly; on a GPU
  they synchronise, which changes what they measure.

Prints two tables and writes JSON.

    python benchmarks/machine_limit.py                       # 4 models, 1 and 2 threads
    python benchmarks/machine_limit.py --models tiny_cnn --threads 1 --steps 5 --profile-steps 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from _training_speed import MODELS, fashion_mnist_train, loader_like, model_kwargs, our_trainer, random_subset
from _training_speed import comma_ints, set_threads, timed_fit
from convrecipes.models import create_model
from convrecipes.trainers import Trainer

RESULT = "benchmarks/results/machine_limit.json"
PARTS = ("data", "augment", "forward", "nan_check", "backward", "optimizer", "rest")
PART_LABELS = {
    "data": "loader batch gather",
    "augment": "to float + augment",
    "forward": "forward + loss",
    "nan_check": "NaN check (host sync)",
    "backward": "backward",
    "optimizer": "optimizer + schedule",
    "rest": "Python/loop overhead",
}


def counted_flops(fn: Callable[[], Any]) -> int:
    """FLOPs ``FlopCounterMode`` counts while ``fn()`` runs."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return int(counter.get_total_flops())


def train_flops_per_image(model_name: str, batch_size: int = 8, image_shape: tuple[int, int, int] = (1, 28, 28),
                          num_classes: int = 10) -> float:
    """Training FLOPs per image of ``model_name``: one forward, cross-entropy and backward.

    Counted on a batch (the FLOPs of these layers are linear in the batch) in training mode,
    because batch norm in training mode needs more than one image.
    """
    model = create_model(model_name, image_shape[0], num_classes, **model_kwargs(model_name)).train()
    x = torch.randn(batch_size, *image_shape)
    y = torch.randint(0, num_classes, (batch_size,))

    def step() -> None:
        F.cross_entropy(model(x), y).backward()

    return counted_flops(step) / batch_size


def _best_rate(fn: Callable[[], Any], flops: int, min_time: float = 0.3, repeats: int = 3) -> float:
    """Best GFLOP/s of ``fn`` over ``repeats`` timings of enough calls to last ``min_time``."""
    fn()  # warm-up (allocations, kernel selection)
    t0 = time.perf_counter()
    fn()
    per_call = max(time.perf_counter() - t0, 1e-6)
    calls = max(1, int(min_time / per_call))
    best = 0.0
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = max(best, calls * flops / (time.perf_counter() - t0) / 1e9)
    return best


def peak_gflops(matmul_n: int = 2048, conv_batch: int = 32, conv_channels: int = 64, conv_size: int = 56,
                min_time: float = 0.3) -> dict[str, Any]:
    """The machine's float32 GFLOP/s at the current thread count, on a large matmul and a
    large 3 x 3 convolution (stride 1, padding 1), FLOPs counted by ``FlopCounterMode``; each
    is the best of 3 timings of ``min_time`` seconds."""
    a, b = torch.randn(matmul_n, matmul_n), torch.randn(matmul_n, matmul_n)
    matmul = lambda: torch.mm(a, b)  # noqa: E731
    conv = torch.nn.Conv2d(conv_channels, conv_channels, 3, padding=1, bias=False).eval()
    x = torch.randn(conv_batch, conv_channels, conv_size, conv_size)
    conv_rates = {}
    with torch.no_grad():
        conv_flops = counted_flops(lambda: conv(x))
        for fmt in (torch.contiguous_format, torch.channels_last):
            conv_f, x_f = conv.to(memory_format=fmt), x.contiguous(memory_format=fmt)
            conv_rates["channels_last" if fmt == torch.channels_last else "contiguous"] = _best_rate(
                lambda: conv_f(x_f), conv_flops)
    return {"matmul_gflops": _best_rate(matmul, counted_flops(matmul), min_time), "matmul_n": matmul_n,
            "conv_gflops": max(conv_rates.values()), "conv_gflops_by_format": conv_rates,
            "conv_shape": [conv_batch, conv_channels, conv_size, conv_size]}


class _Timers:
    """Seconds per part, accumulated by wrapped callables."""

    def __init__(self, device: torch.device) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cuda = device.type == "cuda"

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def timed(*args: Any, **kwargs: Any) -> Any:
            if self.cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.cuda:
                torch.cuda.synchronize()
            self.seconds[part] += time.perf_counter() - t0
            return out

        return timed


def profile_epoch(trainer: Trainer, loader: Any) -> dict[str, float]:
    """Seconds per part (``PARTS``) of one ``fit`` epoch of ``trainer`` over ``loader``.

    The trainer's step methods are wrapped by timers on the instance for the epoch and
    restored afterwards; ``rest`` is the epoch's wall time less the timed parts.
    """
    timers = _Timers(trainer.device)
    loader_cls = type(loader)

    class TimedLoader(loader_cls):  # type: ignore[misc, valid-type]
        def __iter__(self):  # the gather of each batch, as the trainer's loop pulls it
            it = super().__iter__()
            while True:
                t0 = time.perf_counter()
                try:
                    batch = next(it)
                except StopIteration:
                    return
                timers.seconds["data"] += time.perf_counter() - t0
                yield batch

    wrapped = {"prepare_train_batch": "augment", "training_step": "forward", "_check_finite": "nan_check",
               "step": "optimizer"}
    for attr, part in wrapped.items():
        setattr(trainer, attr, timers.wrap(part, getattr(trainer, attr)))
    accelerator_backward = trainer.accelerator.backward
    trainer.accelerator.backward = timers.wrap("backward", accelerator_backward)
    loader.__class__ = TimedLoader
    try:
        t0 = time.perf_counter()
        timed_fit(trainer, loader)
        total = time.perf_counter() - t0
    finally:
        loader.__class__ = loader_cls
        for attr in wrapped:
            delattr(trainer, attr)  # the class's methods again
        trainer.accelerator.backward = accelerator_backward
    parts = {p: timers.seconds.get(p, 0.0) for p in PARTS if p != "rest"}
    parts["rest"] = max(total - sum(parts.values()), 0.0)
    parts["total"] = total
    return parts


def measure(model: str, threads: int, peak: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Throughput, achieved GFLOP/s, fraction of the peak and the profile of ``model``."""
    set_threads(threads)
    train = fashion_mnist_train()
    trainer, loader = our_trainer(model, random_subset(train, args.steps * args.batch_size, seed=1),
                                  batch_size=args.batch_size)
    timed_fit(trainer, loader_like(loader, random_subset(train, max(args.warmup, 1) * args.batch_size, seed=2)))
    rates = [timed_fit(trainer, loader) for _ in range(args.rounds)]
    images_per_s = statistics.median(rates)
    flops = train_flops_per_image(model)
    achieved = images_per_s * flops / 1e9
    profile_loader = loader_like(loader, random_subset(train, args.profile_steps * args.batch_size, seed=3))
    seconds = profile_epoch(trainer, profile_loader)
    percent = {p: 100 * seconds[p] / seconds["total"] for p in PARTS}
    return {"train_gflop_per_image": flops / 1e9, "images_per_s": images_per_s, "images_per_s_rounds": rates,
            "achieved_gflops": achieved, "fraction_of_matmul_peak": achieved / peak["matmul_gflops"],
            "fraction_of_conv_peak": achieved / peak["conv_gflops"],
            "profile": {"steps": len(profile_loader), "seconds": seconds, "percent": percent}}


def print_tables(results: dict[str, Any]) -> None:
    """The limit table and the profile table."""
    print(f"\n{'threads':>7} {'model':<24} {'GFLOP/img':>9} {'img/s':>7} {'GFLOP/s':>8} {'matmul pk':>9} "
          f"{'conv pk':>8} {'of matmul':>9} {'of conv':>8}")
    for t, res in results.items():
        peak = res["peak"]
        for model, m in res["models"].items():
            print(f"{t:>7} {model:<24} {m['train_gflop_per_image']:>9.4f} {m['images_per_s']:>7.0f} "
                  f"{m['achieved_gflops']:>8.2f} {peak['matmul_gflops']:>9.1f} {peak['conv_gflops']:>8.1f} "
                  f"{100 * m['fraction_of_matmul_peak']:>8.1f}% {100 * m['fraction_of_conv_peak']:>7.1f}%")
    print("\nprofile of one epoch, % of step time: " + ", ".join(f"{p} = {PART_LABELS[p]}" for p in PARTS))
    print(f"{'threads':>7} {'model':<24} " + " ".join(f"{p:>9}" for p in PARTS) + f" {'s/step':>7}")
    for t, res in results.items():
        for model, m in res["models"].items():
            prof = m["profile"]
            print(f"{t:>7} {model:<24} " + " ".join(f"{prof['percent'][p]:>8.1f}%" for p in PARTS)
                  + f" {prof['seconds']['total'] / prof['steps']:>7.3f}")


def main(argv: Optional[list[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:]))
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated (default: %(default)s)")
    parser.add_argument("--threads", type=comma_ints, default=[1, 2], help="compute threads, comma-separated (default 1,2)")
    parser.add_argument("--steps", type=int, default=40, help="training steps per timed epoch")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--rounds", type=int, default=2, help="timed epochs (the median counts)")
    parser.add_argument("--profile-steps", type=int, default=40, help="steps of the profiled epoch")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--matmul-n", type=int, default=2048, help="size of the square peak matmul")
    parser.add_argument("--peak-seconds", type=float, default=0.3, help="length of each peak timing")
    parser.add_argument("--out", default=RESULT)
    args = parser.parse_args(argv)
    models = [m for m in args.models.split(",") if m]

    load_before = list(os.getloadavg())
    results: dict[str, Any] = {}
    for threads in args.threads:
        set_threads(threads)
        peak = peak_gflops(matmul_n=args.matmul_n, min_time=args.peak_seconds)
        print(f"{threads} thread(s): peak {peak['matmul_gflops']:.1f} GFLOP/s (matmul {args.matmul_n}), "
              f"{peak['conv_gflops']:.1f} GFLOP/s (conv)", flush=True)
        results[str(threads)] = {"peak": peak, "models": {}}
        for model in models:
            results[str(threads)]["models"][model] = m = measure(model, threads, peak, args)
            print(f"  {model}: {m['images_per_s']:.0f} img/s, {m['achieved_gflops']:.2f} GFLOP/s", flush=True)
    print_tables(results)
    doc = {"benchmark": "machine_limit", "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
           "torch": torch.__version__, "batch_size": args.batch_size, "steps": args.steps, "rounds": args.rounds,
           "load_average_at_start": load_before, "load_average_at_end": list(os.getloadavg()), "threads": results}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(doc, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
