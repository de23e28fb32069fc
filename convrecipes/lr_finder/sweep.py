"""The LR range test's sweep (Smith 2017, section 3.3; the fastai / torch-lr-finder sweep).

What: train for ``num_iters`` steps while the LR rises from ``start_lr`` to ``end_lr``
(exponentially, fastai-style, or linearly, as in Smith's paper), record the loss of every
step, smooth it online with a debiased exponential moving average, stop once that exceeds
``diverge_threshold`` times its best, then smooth the finished curve again without lag
(centred, over a window in decades of LR) and read learning rates off that
(``convrecipes.lr_finder.rules``). Then put everything back: the sweep leaves no trace.

When: before training a new recipe, model, batch size or optimizer; after changing the
global batch size (the right LR moves with it). ``--repeat N`` shows how far to trust the
numbers: the suggestions of a single sweep move from seed to seed.

How it differs from the usual finders:

- It uses only the trainer's public API: ``snapshot()``, then one ``train_step`` per sweep
  point (the trainer's own batch preparation, training step, NaN guard, accumulation,
  clipping, loss ``post_step`` and EMA: augmentation, mixup, composite and distillation
  objectives are swept as they will be trained), then ``restore()``. Schedules are not
  stepped: the sweep sets the swept part's LRs itself, keeping its groups' ratios to the
  first group. For a trainer with several optimizers it sweeps one named ``part`` (default
  the primary) and says which.
- Afterwards training is bit-identical to training without the sweep (see
  ``convrecipes.trainers.snapshot``). Nothing is written to disk (callbacks, which write
  checkpoints, are never called).
- Under several processes the loss of a step is the mean over all processes, so every
  rank sees the same curve, stops at the same step and computes the same suggestions; the
  result records the global batch size (per-process batch x processes x accumulation)
  that the LR belongs to.

Conventions: point ``i`` pairs ``lrs[i]`` with the loss of the batch computed just before
the update made with ``lrs[i]`` (as fastai and torch-lr-finder record it).
"""

from __future__ import annotations

import math
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import torch

from convrecipes.data.loader import InMemoryLoader, is_epoch_loader
from convrecipes.errors import DataError, NonFiniteLossError, RecipeError
from convrecipes.lr_finder.result import LRFinderResult, RepeatedLRFinderResult
from convrecipes.lr_finder.rules import SMOOTH_WINDOW_DECADES, check_sweep_args, read_sweep, sweep_lrs

if TYPE_CHECKING:
    from convrecipes.trainers.base import Trainer


def _group_ratios(optimizer: torch.optim.Optimizer, schedule: Any) -> list[float]:
    """Each param group's base LR relative to the first group's (the schedule's base LRs,
    else the optimizer's initial LRs), so the sweep keeps the groups' proportions."""
    groups = optimizer.param_groups
    base = getattr(schedule, "base_lrs", None)
    if base is None or len(base) != len(groups):
        base = [g.get("initial_lr", g["lr"]) for g in groups]
    base = [float(b) for b in base]
    if not base[0] > 0:
        raise RecipeError(f"the first param group's base LR is {base[0]:g}, so the other groups' LRs cannot be "
                          f"swept in proportion to it; give the optimizer a positive lr (its value does not matter "
                          f"to the sweep, only the groups' ratios)")
    return [b / base[0] for b in base]


def _set_lr(optimizer: torch.optim.Optimizer, lr: float, ratios: Sequence[float]) -> None:
    for group, ratio in zip(optimizer.param_groups, ratios):
        value = lr * ratio
        if isinstance(group["lr"], torch.Tensor):  # capturable / fused optimizers: in place
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def _endless_batches(loader: Any, start_epoch: int, start_batch: int) -> Iterator[Any]:
    """Batches from the given position on, through as many epochs as needed."""
    epoch, first, seen = start_epoch, start_batch, 0
    positioned = is_epoch_loader(loader)
    while True:
        if positioned:
            loader.set_epoch(epoch, start_batch=first if first < len(loader) else 0)
        got = 0
        for batch in loader:
            got += 1
            yield batch
        seen += got
        if not got and (first == 0 or not positioned):
            break
        epoch, first = epoch + 1, 0
    if seen:
        raise DataError(f"the training loader ran out after {seen} batches and yields nothing when iterated again "
                        f"(a one-shot iterator?); pass a loader that can be iterated once per epoch, or lower "
                        f"num_iters")
    raise DataError("the training loader yields no batches, so there is nothing to sweep; add training data or "
                    "lower data.batch_size (a training loader drops its last incomplete batch)")


def find_lr(
    trainer: "Trainer",
    train_loader: Iterable,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iters: int = 100,
    mode: str = "exp",
    smooth_beta: float = 0.98,
    diverge_threshold: float = 4.0,
    seed: Optional[int] = None,
    progress: Optional[bool] = None,
    part: Optional[str] = None,
    loss_key: Optional[str] = None,
    smooth_decades: float = SMOOTH_WINDOW_DECADES,
) -> LRFinderResult:
    """Run the LR range test with ``trainer``'s own training step; leave the trainer untouched.

    Collective under several processes: every process calls it with its trainer and the
    same arguments, and every process gets the same result.

    Args:
        trainer: any ``Trainer``; its ``train_step`` is what is swept.
        train_loader: the training loader (an ``EpochLoader`` such as ``InMemoryLoader``, or
            any iterable of batches); the sweep continues through epochs if it needs to.
        start_lr, end_lr: the first and last LR of the swept optimizer's first param group.
        num_iters: steps of the full sweep (each ``grad_accum_steps`` batches).
        mode: ``exp`` (equal ratios) or ``linear`` (equal steps).
        smooth_beta: the factor of the online EMA the stop rule watches.
        diverge_threshold: stop once the online EMA exceeds this times its best
            (only while the best is positive); a NaN/inf loss always stops.
        seed: None sweeps from where training stands (the trainer's epoch/batch and the
            current RNG); an int seeds the RNGs as ``fit`` does (per process) and, for an
            ``InMemoryLoader``, the data order, starting at its epoch 0 (a P x K batch
            sampler keeps its own seed).
        progress: show a progress bar (main process); None follows ``trainer.progress``.
        part: the optimizer whose LR is swept (trainers with several; default the primary).
            The other parts train at their current LRs.
        loss_key: the logged value whose curve is read (default: what the trainer's
            ``loss_key_of(part)`` names, else the step's loss), e.g. ``teacher_loss`` when
            sweeping an MPL teacher.
        smooth_decades: the window, in decades of LR, of the centred smoothing of the
            finished sweep that the suggestions are read off (``centred_smooth``).

    Returns:
        An ``LRFinderResult`` (``settings["part"]`` names the swept part, ``settings["loss"]``
        the curve).

    Raises:
        RecipeError: bad sweep arguments, or a first param group with LR 0.
        DataError: the loader yields no batches.
    """
    from accelerate.utils import set_seed

    from convrecipes.progress import progress_bar, shows_next

    check_sweep_args(start_lr, end_lr, num_iters, mode)
    if not 0.0 <= smooth_beta < 1.0:
        raise RecipeError(f"smooth_beta must be in [0, 1), got {smooth_beta}; 0.98 is usual (0: no smoothing)")
    if isinstance(smooth_decades, bool) or not isinstance(smooth_decades, (int, float)) or not smooth_decades >= 0:
        raise RecipeError(f"smooth_decades must be a number >= 0, got {smooth_decades!r}; 0.5 is usual "
                          f"(0: read the suggestions off the raw losses)")
    if not diverge_threshold > 1.0:
        raise RecipeError(f"diverge_threshold must be > 1, got {diverge_threshold}; 4-5 is usual")
    if part is not None and part not in trainer.optimizers:
        raise RecipeError(f"no optimizer part {part!r} to sweep; parts: {', '.join(trainer.optimizers)}")
    part = trainer.resolve_part(part)
    loss_key = loss_key or trainer.loss_key_of(part)
    optimizer = trainer.optimizers[part]
    plan = sweep_lrs(start_lr, end_lr, num_iters, mode)
    accelerator = trainer.accelerator
    # as fit does (sharding, device placement); other iterables are taken as they are
    configure = is_epoch_loader(train_loader) or isinstance(train_loader, torch.utils.data.DataLoader)
    loader = trainer.configure_loader(train_loader) if configure else train_loader
    if is_epoch_loader(loader) and len(loader) == 0:
        raise DataError(f"the training loader yields no batches ({getattr(loader, 'num_samples', '?')} samples, "
                        f"global batch {getattr(loader, 'batch_size', '?')}, incomplete batches dropped), so there "
                        f"is nothing to sweep; add training data or lower data.batch_size")
    ratios = _group_ratios(optimizer, trainer.schedulers.get(part))
    accum = trainer.grad_accum_steps
    num_processes = accelerator.num_processes
    show = trainer.progress if progress is None else progress
    t0 = time.perf_counter()
    snapshot = trainer.snapshot()
    in_memory = isinstance(loader, InMemoryLoader)
    loader_position = (loader.epoch, loader.start_batch, loader.seed) if in_memory else None
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stop_reason = "completed"
    local_batch = 0
    bar = None
    try:
        if seed is not None:
            set_seed(seed, device_specific=True)
            if in_memory:
                loader.seed = seed
            start_epoch, start_batch = 0, 0
        else:
            start_epoch, start_batch = trainer.epoch, trainer.batch_in_epoch
        for optim in trainer.optimizers.values():
            optim.zero_grad(set_to_none=True)
        for model in trainer.models.values():
            model.train()
        trainer.loss_fn.train()
        batches = _endless_batches(loader, start_epoch, start_batch)
        bar = progress_bar(total=num_iters, desc=f"lr-find ({part})" if len(trainer.optimizers) > 1 else "lr-find",
                           unit="step", disable=not (show and accelerator.is_main_process))
        avg, best = 0.0, math.inf
        for i, lr in enumerate(plan):
            _set_lr(optimizer, lr, ratios)
            step_batches = [next(batches) for _ in range(accum)]
            try:
                out = trainer.train_step(step_batches, step_schedules=False)
            except NonFiniteLossError:  # the guard stopped before the update: record and stop
                lrs.append(lr)
                losses.append(math.nan)
                smoothed.append(math.nan)
                stop_reason = "non_finite"
                break
            if i == 0:
                local_batch = out.batch_size // accum
            if loss_key is not None and loss_key not in out.logs:
                raise RecipeError(f"the training step logs no {loss_key!r} to sweep on; it logs: "
                                  f"{', '.join(['train_loss', *out.logs])}")
            step_loss = (out.logs[loss_key] if loss_key is not None else out.loss).float()
            if num_processes > 1:  # every rank sees the same curve and stops at the same step
                step_loss = accelerator.reduce(step_loss, "mean")
            loss = float(step_loss)
            lrs.append(lr)
            losses.append(loss)
            avg = smooth_beta * avg + (1.0 - smooth_beta) * loss
            smooth = avg / (1.0 - smooth_beta ** (i + 1))
            smoothed.append(smooth)
            best = min(best, smooth)
            if i > 0 and best > 0 and smooth > diverge_threshold * best:
                stop_reason = "diverged"
                break
            if shows_next(bar):
                bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smooth:.4f}", refresh=False)
            bar.update(1)
    finally:
        if bar is not None:
            bar.close()
        trainer.restore(snapshot)
        if loader_position is not None:
            loader.epoch, loader.start_batch, loader.seed = loader_position
    centred, suggestions, points, warnings = read_sweep(lrs, losses, num_iters, stop_reason, smooth_decades)
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        centred=centred,
        suggestions=suggestions,
        warnings=warnings,
        global_batch_size=local_batch * num_processes * accum,
        stop_reason=stop_reason,
        settings={
            "start_lr": start_lr, "end_lr": end_lr, "num_iters": num_iters, "mode": mode,
            "smooth_beta": smooth_beta, "diverge_threshold": diverge_threshold, "seed": seed,
            "smooth_window_decades": smooth_decades,
            "per_process_batch_size": local_batch, "num_processes": num_processes, "grad_accum_steps": accum,
            "param_group_ratios": list(ratios), "part": part,
            "loss": loss_key or "train_loss",
        },
        points=points,
        elapsed_s=time.perf_counter() - t0,
    )


TrainerFactory = Callable[[int], tuple["Trainer", Iterable]]


def find_lr_repeated(
    trainer_or_factory: Union["Trainer", TrainerFactory],
    train_loader: Optional[Iterable] = None,
    *,
    repeat: int = 3,
    seeds: Optional[Sequence[int]] = None,
    **find_lr_kwargs: Any,
) -> RepeatedLRFinderResult:
    """Run ``find_lr`` once per seed and report how much each suggestion moves.

    Args:
        trainer_or_factory: a ``Trainer`` (each run sweeps the same, restored trainer with
            another seed: data order, augmentation and dropout change) or a function
            ``seed -> (trainer, train_loader)`` (e.g. rebuilding a recipe with that seed,
            which also changes the initial weights).
        train_loader: the loader, when a trainer is given.
        repeat: number of sweeps (ignored when ``seeds`` is given).
        seeds: the seeds; default ``trainer.seed + i`` (or ``i`` with a factory).
        **find_lr_kwargs: passed to ``find_lr``.

    Returns:
        A ``RepeatedLRFinderResult`` with the spread (min, max, geometric mean, max/min) of
        each suggestion and which rules agree within 2x.
    """
    from convrecipes.trainers.base import Trainer

    is_trainer = isinstance(trainer_or_factory, Trainer)
    if is_trainer and train_loader is None:
        raise RecipeError("find_lr_repeated(trainer, ...) needs the train_loader too")
    if seeds is None:
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise RecipeError(f"repeat must be an integer >= 1, got {repeat!r}; e.g. repeat=3")
        base = trainer_or_factory.seed if is_trainer else 0
        seeds = [base + i for i in range(repeat)]
    if not seeds:
        raise RecipeError("seeds is empty; give at least one seed")
    runs = []
    for s in seeds:
        if is_trainer:
            trainer, loader = trainer_or_factory, train_loader
        else:
            trainer, loader = trainer_or_factory(int(s))
        runs.append(find_lr(trainer, loader, seed=int(s), **find_lr_kwargs))
    return RepeatedLRFinderResult.from_runs(runs, seeds)
