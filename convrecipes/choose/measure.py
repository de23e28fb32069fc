"""What a model costs: multiply-accumulates per image, inference latency, training memory.

- ``count_macs``: one forward of one image under ``torch.utils.flop_counter.FlopCounterMode``;
  MACs = FLOPs / 2. Counted are the matrix products (convolutions, linear layers,
  matmuls, attention); element-wise work (norms, activations, pooling, bias adds) is not,
  as in the papers' MAC counts.
- ``measure_latency``: eval mode, ``no_grad``, warm-up, then the median of repeated
  timings and their spread, with the thread count the numbers were taken at.
- ``peak_training_memory``: a fresh Python process builds the model and its optimizer and
  takes a few training steps on one batch; on CUDA ``torch.cuda.max_memory_allocated``,
  on CPU the process's peak resident set size (``getrusage``), which includes Python,
  torch and the libraries (reported separately as the baseline).
"""

from __future__ import annotations

import math
import statistics
import time
from typing import Any, Optional, Sequence

import torch
import torch.nn as nn


def count_macs(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Multiply-accumulates of one forward of one image of ``input_shape`` ``(C, H, W)``.

    The model is run in eval mode (BatchNorm uses its running statistics, dropout is off)
    on a zero image on the model's device and put back in its previous mode.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from convrecipes.models import logits_of

    was_training = model.training
    model.eval()
    device = _device_of(model)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            logits_of(model(torch.zeros(1, *input_shape, device=device)))
    finally:
        model.train(was_training)
    return int(counter.get_total_flops()) // 2


def _device_of(model: nn.Module) -> torch.device:
    first = next(model.parameters(), None)
    return first.device if first is not None else torch.device("cpu")


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default) of sorted values, ``q`` in [0, 100]."""
    pos = (len(sorted_values) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def measure_latency(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_size: int = 1,
    *,
    warmup: int = 5,
    iterations: int = 20,
    repeats: int = 3,
    max_time_s: float = 10.0,
    channels_last: bool = False,
) -> dict[str, Any]:
    """Inference time of one batch on the model's device.

    ``warmup`` untimed forwards (allocator, kernel selection, caches), then ``repeats``
    rounds of up to ``iterations`` timed forwards each. A round stops early once it has
    used its share of ``max_time_s`` (after at least 3 forwards), so a large model at a
    large batch stays bounded in time. CUDA work is synchronised before every clock read.

    Returns:
        ``median_ms`` (of all timed forwards), ``p10_ms``/``p90_ms``, ``min_ms``/``max_ms``,
        ``repeat_medians_ms`` (one median per round: how much a round's median moves),
        ``images_per_s`` (``batch_size`` over the median), ``n`` timed forwards,
        ``batch_size``, ``threads`` (``torch.get_num_threads()``), ``device``.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = _device_of(model)
    was_training = model.training
    model.eval()
    x = torch.randn(batch_size, *input_shape, generator=torch.Generator().manual_seed(0)).to(device)
    if channels_last and x.dim() == 4:
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    rounds: list[list[float]] = []
    try:
        with torch.no_grad():
            start = time.perf_counter()
            for i in range(max(1, warmup)):
                model(x)
                sync()
                if time.perf_counter() - start > max_time_s / 4:  # a slow model is warm after one or two
                    break
            share = max_time_s / max(1, repeats)
            for _ in range(max(1, repeats)):
                times: list[float] = []
                round_start = time.perf_counter()
                for _ in range(max(1, iterations)):
                    t0 = time.perf_counter()
                    model(x)
                    sync()
                    times.append(time.perf_counter() - t0)
                    if len(times) >= 3 and time.perf_counter() - round_start > share:
                        break
                rounds.append(times)
    finally:
        model.train(was_training)
    every = sorted(t * 1000.0 for r in rounds for t in r)
    median = statistics.median(every)
    return {
        "batch_size": batch_size,
        "median_ms": median,
        "p10_ms": _percentile(every, 10),
        "p90_ms": _percentile(every, 90),
        "min_ms": every[0],
        "max_ms": every[-1],
        "repeat_medians_ms": [statistics.median(r) * 1000.0 for r in rounds],
        "images_per_s": batch_size / (median / 1000.0),
        "n": len(every),
        "threads": torch.get_num_threads(),
        "device": str(device),
    }


def peak_training_memory(recipe: Any, input_shape: Sequence[int], num_classes: int, batch_size: Optional[int] = None,
                         *, steps: int = 3, device: str = "cpu") -> dict[str, Any]:
    """Peak memory of training the recipe's model, measured in a fresh Python process.

    The child builds the model (``build_model``) and the recipe's optimizer and takes
    ``steps`` forward/backward/optimizer steps on one random batch of ``batch_size``
    (default the recipe's) at ``input_shape``, fp32. The data set, the evaluation batches
    and the trainer's bookkeeping are not included: this is the model's share.

    Returns:
        ``peak_rss_mib`` (the child's peak resident set size: Python, torch and the
        libraries included), ``baseline_rss_mib`` (its resident set before building the
        model), ``training_rss_increase_mib`` (their difference: what the model, its
        optimizer state and the activations of one step added), and on CUDA
        ``cuda_max_allocated_mib`` (``torch.cuda.max_memory_allocated``).
    """
    import json
    import subprocess
    import sys

    from convrecipes.recipe import recipe_to_dict

    args = {"recipe": recipe_to_dict(recipe), "input_shape": [int(s) for s in input_shape],
            "num_classes": int(num_classes), "batch_size": int(batch_size or recipe.data.batch_size),
            "steps": int(steps), "device": str(device), "threads": torch.get_num_threads()}
    # a fresh interpreter (not multiprocessing): no high-water mark left by other models, and
    # a caller's script without a __main__ guard is not imported again
    proc = subprocess.run([sys.executable, "-m", "convrecipes.choose._memory_child"], input=json.dumps(args),
                          capture_output=True, text=True)
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
        raise RuntimeError(f"the training-memory measurement process failed (exit code {proc.returncode}):\n{tail}")
    return json.loads(lines[-1])
