"""The process ``peak_training_memory`` starts: ``python -m convrecipes.choose._memory_child``
reads its arguments as JSON on stdin and prints the measurement as one JSON line.

It builds the recipe's model and optimizer, takes a few training steps on one random
batch and reports the memory high-water marks. A fresh interpreter per model, because a
process's peak resident set size only ever grows: measured in a process that held another
model before, it would report that one's.
"""

from __future__ import annotations

import json
import resource
import sys
from typing import Any, Optional


def _status_mib(field: str) -> Optional[float]:
    """``VmRSS`` (resident now) or ``VmHWM`` (its high-water mark) of this process, from
    Linux's ``/proc/self/status``; None elsewhere."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(f"{field}:"):
                    return int(line.split()[1]) / 1024  # kB
    except (OSError, ValueError, IndexError):
        pass
    return None


def _reset_peak() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0: ``clear_refs`` 5)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def _getrusage_peak_mib() -> float:
    # ru_maxrss also holds the parent's peak: exec records the (v)forked parent's high-water
    # mark in the child's, so it is only the fallback where /proc is missing
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def measure(recipe_dict: dict[str, Any], input_shape: list[int], num_classes: int, batch_size: int, steps: int,
            device: str, threads: int) -> dict[str, Any]:
    """Build, train ``steps`` steps, report the memory.

    ``baseline_rss_mib`` is the resident set after the imports and a warm-up step of a
    two-layer net; the high-water mark is then reset, so ``peak_rss_mib`` is the peak
    resident set while the model was built and trained (the baseline included) and
    ``training_rss_increase_mib`` what the model, its optimizer state and one step's
    activations added. On CUDA also ``cuda_max_allocated_mib``."""
    import torch
    import torch.nn.functional as F

    torch.set_num_threads(threads)
    from convrecipes.build import build_model
    from convrecipes.models import logits_of
    from convrecipes.optim import build_optimizer
    from convrecipes.recipe import recipe_from_dict

    recipe = recipe_from_dict(recipe_dict)
    dev = torch.device(device)
    # one step of a two-layer net first: the libraries' first-use cost (kernels, autograd,
    # allocator pools; ~150 MiB on CPU) goes into the baseline, not into the model's share
    warm = torch.nn.Sequential(torch.nn.Conv2d(input_shape[0], 4, 3, padding=1), torch.nn.Flatten(),
                               torch.nn.LazyLinear(num_classes)).to(dev)
    warm_x = torch.zeros(2, *input_shape, device=dev)
    warm(warm_x).sum().backward()
    torch.optim.SGD(warm.parameters(), lr=0.1, momentum=0.9).step()
    del warm, warm_x
    baseline = _status_mib("VmRSS")
    import_peak = _status_mib("VmHWM")  # the imports' transient peak, left out of the model's
    reset = _reset_peak()
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats(dev)
    model = build_model(recipe, in_chans=input_shape[0], num_classes=num_classes, pretrained=False).to(dev)
    o = recipe.optimizer
    lr = o.lr if isinstance(o.lr, float) else 0.01  # "auto": any LR takes the same memory
    optimizer = build_optimizer(model, o.name, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                decay_norm_and_bias=o.decay_norm_and_bias)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch_size, *input_shape, generator=g).to(dev)
    y = torch.randint(0, num_classes, (batch_size,), generator=g).to(dev)
    if recipe.model.channels_last:  # as the trainer runs it
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(logits_of(model(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    peak = _status_mib("VmHWM") if reset else None
    out: dict[str, Any] = {"peak_rss_mib": peak if peak is not None else _getrusage_peak_mib(),
                           "peak_source": "VmHWM after reset" if peak is not None else "getrusage ru_maxrss",
                           "baseline_rss_mib": baseline, "import_peak_rss_mib": import_peak,
                           "batch_size": batch_size, "steps": steps, "device": device, "threads": threads}
    if baseline is not None and peak is not None:
        out["training_rss_increase_mib"] = peak - baseline
    if dev.type == "cuda":
        out["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated(dev) / 2**20
    return out


if __name__ == "__main__":
    args = json.loads(sys.stdin.read())
    result = measure(args["recipe"], args["input_shape"], args["num_classes"], args["batch_size"], args["steps"],
                     args["device"], args["threads"])
    print(json.dumps(result))
