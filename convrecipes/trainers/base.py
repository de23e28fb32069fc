"""``Trainer``: the training loop, written once, with named parts and two step modes.

A training algorithm changes the step, nothing else. Everything around it lives here:
Accelerate (mixed precision, data parallel), gradient accumulation, clipping, weight EMA,
per-step schedules, the NaN guard, callbacks, trackers, progress, metrics, and full
training-state checkpoints with exact resume.

Parts. A trainer holds named models, optimizers and schedules (``models=``,
``optimizers=``, ``schedulers=``), prepared together by Accelerate. The common case, one of
each, needs no names: ``Trainer(model, optimizer, loss_fn, scheduler=...)`` is the part
``"model"``. The *primary* model is the one evaluated, EMA'd, checkpointed under
``"model"`` and exported; every other part is checkpointed too. An optimizer's name is
its part: ``step("teacher")`` clips every parameter of the ``"teacher"`` optimizer
(models' and any loss or projection parameters in it), steps it and its schedule. Other
state (a loss with parameters, a projection, a teacher's identity) is registered once with
``register_state`` and then saved, restored and moved to the device by the base.

Step modes. *Automatic* (the default): ``training_step(batch) -> StepOutput(loss, logs)``
runs under autocast, and the base does the NaN check, backward (divided over the
accumulation micro-batches, with DDP's gradient sync only on the last one) and steps every
optimizer. *Manual* (``manual_steps = True``, e.g. Meta Pseudo Labels): ``training_step``
calls ``self.backward(loss, part)`` and ``self.step(part)`` itself, in the order the
algorithm needs, wrapping its forwards in ``self.autocast()``; gradient accumulation is
refused (each ``step`` is one optimizer update).

Batches. What a loader yields (``(images, targets)``, or named streams such as a
``SemiSupervisedBatch``) goes to ``prepare_train_batch``, which the algorithm may
override; the base never looks inside except to count samples (``StepOutput.batch_size``,
else the first tensor's length).

Exact resume: the data order of epoch ``e`` is a function of (seed, e), so a checkpoint
needs only the position (epoch, batch within the epoch) plus the RNG states of every
process (augmentation and dropout draw from torch's global generator) and the shared
generator. A run stopped after any step and resumed produces bit-identical weights on CPU.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Iterable, Mapping, Optional, Sequence, Union

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, gather_object, set_seed
from tqdm.auto import tqdm

from convrecipes.checkpoint import encode_checkpoint, model_weights_of, load_checkpoint, load_model_weights, write_atomic
from convrecipes.data.loader import InMemoryLoader, is_epoch_loader
from convrecipes.errors import CheckpointError, NonFiniteLossError, RecipeError
from convrecipes.progress import progress_bar, shows_next
from convrecipes.optim import load_optimizer_state
from convrecipes.losses.base import as_loss_output
from convrecipes.models.output import ModelOutput, logits_of
from convrecipes.trainers.callbacks import Callback
from convrecipes.trainers.curves import curves_context, record_step_lrs, start_lr_log
from convrecipes.trainers.finite_guard import FiniteGuard
from convrecipes.trainers.metrics_log import append_jsonl, format_metrics, plot_curves, read_jsonl

PRIMARY = "model"


@dataclass
class StepOutput:
    """What ``training_step`` returns: the loss (automatic mode: the one to backpropagate;
    manual mode: the one to log as ``train_loss``), 0-dim tensors to log, and optionally the
    number of samples the step trained on (default: the first tensor's length)."""

    loss: torch.Tensor
    logs: dict[str, torch.Tensor] = field(default_factory=dict)
    batch_size: Optional[int] = None


def _first_tensor(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, Mapping):
        batch = list(batch.values())
    if isinstance(batch, (list, tuple)):
        for item in batch:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


def make_accelerator(
    mixed_precision: Optional[str] = None,
    find_unused_parameters: bool = False,
    log_with: Optional[Union[str, Sequence[str]]] = None,
    project_dir: Optional[Union[str, Path]] = None,
    collective_timeout_s: Optional[float] = None,
) -> Accelerator:
    """The ``Accelerator`` a trainer runs on: mixed precision (None: the launcher decides),
    DDP's ``find_unused_parameters``, trackers writing into ``project_dir``, and the
    timeout after which one process stops waiting for a stalled other (None: torch's)."""
    from datetime import timedelta

    from accelerate.utils import InitProcessGroupKwargs

    handlers: list[Any] = []
    if collective_timeout_s is not None:
        handlers.append(InitProcessGroupKwargs(timeout=timedelta(seconds=collective_timeout_s)))
    if find_unused_parameters:
        handlers.append(DistributedDataParallelKwargs(find_unused_parameters=True))
    return Accelerator(mixed_precision=mixed_precision, kwargs_handlers=handlers, log_with=log_with or None,
                       project_dir=str(project_dir) if log_with else None)


_TEARDOWN_REGISTERED = False


def _destroy_process_group_at_exit() -> None:
    """Tear the process group down at interpreter exit (once per process). Left to the
    interpreter's own shutdown, a gloo rank sometimes aborted in C++ ("terminate called
    without an active exception", about 1 run in 20 on 2 CPU cores), failing a launch whose
    training had finished."""
    global _TEARDOWN_REGISTERED
    if _TEARDOWN_REGISTERED:
        return
    _TEARDOWN_REGISTERED = True
    import atexit

    def teardown() -> None:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # exiting anyway: a failed teardown must not mask the run's result
                pass

    atexit.register(teardown)


def _scalar_config(config: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """A nested config flattened to ``a.b`` keys with scalar values (what trackers store)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_scalar_config(value, f"{name}."))
        elif isinstance(value, (bool, int, float, str)):
            out[name] = value
        elif value is not None:
            out[name] = str(value)
    return out


class Trainer:
    """The training loop. Construct it from plain objects; ``fit`` trains.

    Args:
        model: the primary model (images -> logits or ``ModelOutput``); or give ``models``.
        optimizer: its optimizer (over the model's and the loss's parameters).
        loss_fn: ``loss_fn(output, targets)`` returning a tensor or a ``LossOutput``.
        scheduler: the optimizer's schedule, stepped once per optimizer step; its optional
            ``on_epoch_end(metrics)`` is called after each evaluation.
        models: named models, e.g. ``{"student": s, "teacher": t}``; models with trainable
            parameters are prepared by Accelerate (DDP), the others only moved to the device.
        optimizers: named optimizers; the name is the part ``step(part)`` steps.
        schedulers: named schedules, keyed like the optimizers they drive.
        primary: which model is evaluated, EMA'd and checkpointed as ``"model"``.
        augment: ``augment(images_float01, targets) -> (images, targets)`` for training batches.
        eval_transform: the same call for evaluation batches (normalisation).
        accelerator: an ``Accelerator``; if None one is made from ``mixed_precision``,
            ``find_unused_parameters`` and ``log_with``.
        mixed_precision: "no", "fp16", "bf16", or None to let ``accelerate launch`` decide.
        grad_accum_steps: micro-batches per optimizer step (automatic mode only).
        grad_clip: clip each part's global gradient norm to this value (> 0).
        ema_decay: keep an exponential moving average of the primary model's weights
            (timm's ``ModelEmaV3``), evaluated alongside the raw weights as ``ema_val_*``.
        callbacks: ``Callback`` objects.
        run_dir: where ``metrics.jsonl``, ``curves.png`` and tracker logs go (None: nowhere).
        seed: seeds torch on every process (different per process, for augmentation) and
            the shared generator (the same on every process).
        channels_last: use the channels-last memory format (faster convolutions on CPU and
            tensor cores).
        progress: show a progress bar (on the main process only).
        checkpoint_metadata: JSON-able facts stored in every checkpoint (e.g. the recipe).
        find_unused_parameters: DDP's flag, for models whose steps leave some parameters
            without gradient (branch dropping); used when the trainer makes the accelerator.
        log_with: Accelerate tracker(s) ("tensorboard", "wandb", "mlflow", ...; needs
            ``run_dir``); used when the trainer makes the accelerator.
        log_every_steps: per-step tracker logging interval (loss and LR).
        eval_every_epochs: validate every this many epochs and after the last (validation
            never changes training: the weights are the same for any value; a plateau
            schedule and early stopping then count validations, not epochs).
        nan_check_every_steps: check the training loss for inf/nan every this many
            optimizer steps (one host sync each), at each epoch's end and before every
            checkpoint; None: ``log_every_steps``. 1 is the exact guard, before the bad
            step's update; with more, the steps until the check update the weights in
            memory with non-finite gradients, which are never saved
            (``convrecipes.trainers.finite_guard``).
        compile: ``torch.compile`` each trainable model's forward in place
            (``nn.Module.compile``: the state-dict keys, checkpoints, EMA and resume are
            the plain module's); the first steps pay the compilation.
    """

    #: True for algorithms whose ``training_step`` calls ``backward``/``step`` itself.
    manual_steps: ClassVar[bool] = False
    #: True for algorithms that train on labeled and unlabeled streams together (recipes
    #: then build a ``SemiSupervisedLoader``).
    uses_unlabeled_data: ClassVar[bool] = False
    #: True for algorithms whose steps leave some parameters without gradient (branch
    #: dropping); under several processes they need DDP's ``find_unused_parameters``.
    leaves_parameters_unused: ClassVar[bool] = False

    def __init__(
        self,
        model: Optional[nn.Module] = None,
        optimizer: Optional[torch.optim.Optimizer] = None,
        loss_fn: Optional[nn.Module] = None,
        *,
        scheduler: Any = None,
        models: Optional[Mapping[str, nn.Module]] = None,
        optimizers: Optional[Mapping[str, torch.optim.Optimizer]] = None,
        schedulers: Optional[Mapping[str, Any]] = None,
        primary: Optional[str] = None,
        augment: Optional[nn.Module] = None,
        eval_transform: Optional[nn.Module] = None,
        accelerator: Optional[Accelerator] = None,
        mixed_precision: Optional[str] = None,
        grad_accum_steps: int = 1,
        grad_clip: Optional[float] = None,
        ema_decay: Optional[float] = None,
        callbacks: Sequence[Callback] = (),
        run_dir: Optional[Union[str, Path]] = None,
        seed: int = 0,
        channels_last: bool = False,
        progress: bool = True,
        checkpoint_metadata: Optional[Mapping[str, Any]] = None,
        find_unused_parameters: bool = False,
        log_with: Optional[Union[str, Sequence[str]]] = None,
        log_every_steps: int = 10,
        eval_every_epochs: int = 1,
        nan_check_every_steps: Optional[int] = None,
        compile: bool = False,
    ) -> None:
        models, optimizers, schedulers, primary = self._named_parts(model, optimizer, scheduler, models, optimizers,
                                                                    schedulers, primary)
        if loss_fn is None:
            raise ValueError("Trainer needs a loss_fn, e.g. torch.nn.CrossEntropyLoss()")
        if isinstance(grad_accum_steps, bool) or not isinstance(grad_accum_steps, int) or grad_accum_steps < 1:
            raise RecipeError(f"grad_accum_steps must be an integer >= 1, got {grad_accum_steps!r}")
        if self.manual_steps and grad_accum_steps != 1:
            raise RecipeError(f"{type(self).__name__} steps its optimizers inside training_step (manual mode), so "
                              f"gradient accumulation is not supported; set trainer.grad_accum_steps=1 (raise "
                              f"data.batch_size instead)")
        if grad_clip is not None and not grad_clip > 0:
            raise RecipeError(f"grad_clip must be > 0 (a maximum gradient norm), got {grad_clip}; e.g. "
                              f"trainer.grad_clip=1.0, or leave it unset for no clipping")
        if isinstance(eval_every_epochs, bool) or not isinstance(eval_every_epochs, int) or eval_every_epochs < 1:
            raise RecipeError(f"eval_every_epochs must be an integer >= 1, got {eval_every_epochs!r}")
        self.eval_every_epochs = eval_every_epochs
        if not isinstance(log_every_steps, int) or log_every_steps < 1:
            raise RecipeError(f"log_every_steps must be an integer >= 1, got {log_every_steps!r}")
        nan_check_every_steps = log_every_steps if nan_check_every_steps is None else nan_check_every_steps
        if isinstance(nan_check_every_steps, bool) or not isinstance(nan_check_every_steps, int) \
                or nan_check_every_steps < 1:
            raise RecipeError(f"nan_check_every_steps must be an integer >= 1 (1: every step), got "
                              f"{nan_check_every_steps!r}")
        self.nan_check_every_steps = nan_check_every_steps
        self.run_dir = Path(run_dir) if run_dir is not None else None
        if accelerator is None:
            if log_with and self.run_dir is None:
                raise RecipeError("log_with needs a run_dir for the tracker files")
            accelerator = make_accelerator(mixed_precision, find_unused_parameters, log_with, self.run_dir)
        self.accelerator = accelerator
        if self.accelerator.num_processes > 1:
            _destroy_process_group_at_exit()
        self.device = self.accelerator.device
        self.channels_last = channels_last
        self.primary = primary

        # Prepare every trainable model and every optimizer in one call, as Accelerate
        # expects; a model without trainable parameters (a frozen teacher) cannot be
        # wrapped in DDP and is only moved to the device.
        raw_models = {name: (m.to(memory_format=torch.channels_last) if channels_last else m)
                      for name, m in models.items()}
        trainable = [n for n, m in raw_models.items() if any(p.requires_grad for p in m.parameters())]
        self._check_unused_parameters(raw_models)
        prepared = self.accelerator.prepare(*(raw_models[n] for n in trainable), *optimizers.values())
        prepared = prepared if isinstance(prepared, tuple) else (prepared,)
        self._trainable = list(trainable)  # parts with parameters to train: prepared, synced, checkpointed
        self.models: dict[str, nn.Module] = {}
        for name, m in raw_models.items():
            self.models[name] = prepared[trainable.index(name)] if name in trainable else m.to(self.device)
        self.optimizers: dict[str, torch.optim.Optimizer] = dict(zip(optimizers, prepared[len(trainable):]))
        self.schedulers: dict[str, Any] = dict(schedulers)
        self.loss_fn = loss_fn.to(self.device)
        self.augment = augment.to(self.device) if augment is not None else None
        self.eval_transform = eval_transform.to(self.device) if eval_transform is not None else None
        self.grad_accum_steps = grad_accum_steps
        self.grad_clip = grad_clip
        self.ema = None
        if ema_decay is not None:
            from timm.utils import ModelEmaV3

            # warmup: the effective decay ramps up, so short runs do not average in the random
            # init; stochastic rounding (bf16 EMA weights only) would draw from a private generator
            self.ema = ModelEmaV3(self.unwrapped_model, decay=ema_decay, use_warmup=True, stochastic_rounding=False)
        self.compiled = bool(compile)
        if self.compiled:  # after the EMA's copy, which stays a plain module
            for name in self._trainable:
                self.unwrap(name).compile()
        self.callbacks = list(callbacks)
        self.seed = seed
        self.progress = progress
        self.log_every_steps = log_every_steps
        self.checkpoint_metadata = dict(checkpoint_metadata or {})
        #: identical on every process and saved in checkpoints: for random choices that must
        #: agree across ranks (a branch to train, a column to keep)
        self.shared_generator = torch.Generator().manual_seed(int(seed))
        for model in raw_models.values():  # drop-path draws (FractalNet) agree on every rank and resume exactly
            for m in model.modules():
                if hasattr(m, "path_generator") and m.path_generator is None:
                    m.path_generator = self.shared_generator
        self._registered: dict[str, Any] = {}
        self._optional_state: set[str] = set()
        # position in training: the next epoch/batch to run and training steps done
        self.epoch = 0
        self.batch_in_epoch = 0
        self.global_step = 0
        self.should_stop = False
        self.validated = True  # whether the last epoch was validated (eval_every_epochs)
        self.history: list[dict[str, float]] = []
        self.last_checkpoint: Optional[Path] = None
        # running sums of the logged values over the epoch (device tensors: no host sync per step)
        self._epoch_sums: dict[str, torch.Tensor] = {}
        self._epoch_samples = 0
        self._step_schedules = True
        self._where = ""
        self._lr_log = None  # lr_steps.jsonl of the current fit (convrecipes.trainers.curves)
        # fit() queues the step losses and checks them every nan_check_every_steps (no host
        # sync per step); train_step outside fit (the LR finder) checks each one at once
        self._finite_guard = FiniteGuard(
            (lambda flags: self.accelerator.reduce(flags, "sum")) if self.accelerator.num_processes > 1 else None)
        self._defer_finite_check = False

    def _check_unused_parameters(self, models: Mapping[str, nn.Module]) -> None:
        """Several processes with a model or algorithm that leaves parameters unused need
        DDP's ``find_unused_parameters``: say so before DDP fails in the first backward."""
        if self.accelerator.num_processes < 2:
            return
        handler = getattr(self.accelerator, "ddp_handler", None)
        if handler is not None and getattr(handler, "find_unused_parameters", False):
            return
        dropping = [type(m).__name__ for model in models.values() for m in model.modules()
                    if getattr(m, "drops_paths", False)]
        if self.leaves_parameters_unused or dropping:
            why = f"{type(self).__name__} trains one branch at a time" if self.leaves_parameters_unused else \
                f"{dropping[0]} drops paths (drop_path_rate > 0)"
            raise RecipeError(f"{why}, so some parameters get no gradient in a step, and DDP over "
                              f"{self.accelerator.num_processes} processes needs find_unused_parameters for that; "
                              f"set trainer.find_unused_parameters=true (in code: make_accelerator(..., "
                              f"find_unused_parameters=True))")

    @staticmethod
    def _named_parts(model: Any, optimizer: Any, scheduler: Any, models: Any, optimizers: Any, schedulers: Any,
                     primary: Optional[str]) -> tuple[dict, dict, dict, str]:
        if model is not None and models is not None:
            raise ValueError("give either model= (one part) or models= (named parts), not both")
        if model is not None:
            if optimizers is not None or schedulers is not None:
                raise ValueError("with model= give optimizer= and scheduler=; optimizers=/schedulers= go with models=")
            if optimizer is None:
                raise ValueError("Trainer(model, optimizer, loss_fn): the optimizer is missing")
            models, optimizers = {PRIMARY: model}, {PRIMARY: optimizer}
            schedulers = {PRIMARY: scheduler} if scheduler is not None else {}
            primary = primary or PRIMARY
        else:
            if not models:
                raise ValueError("Trainer needs a model (model=...) or named models (models={...})")
            if optimizer is not None or scheduler is not None:
                raise ValueError("with models= give optimizers= and schedulers= (dicts keyed by part name)")
            models, optimizers, schedulers = dict(models), dict(optimizers or {}), dict(schedulers or {})
            if not optimizers:
                raise ValueError("Trainer needs at least one optimizer (optimizers={name: optimizer})")
            primary = primary or next(iter(models))
        if primary not in models:
            raise ValueError(f"primary part {primary!r} is not among the models ({', '.join(models)})")
        unknown = sorted(set(schedulers) - set(optimizers))
        if unknown:
            raise ValueError(f"schedule {unknown[0]!r} has no optimizer of that name ({', '.join(optimizers)})")
        return models, optimizers, schedulers, primary

    # -- parts ----------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        """The primary model (wrapped for DDP where it applies)."""
        return self.models[self.primary]

    @property
    def optimizer(self) -> torch.optim.Optimizer:
        """The primary part's optimizer (the first one when the primary has none)."""
        return self.optimizers.get(self.primary) or next(iter(self.optimizers.values()))

    @property
    def scheduler(self) -> Any:
        """The primary optimizer's schedule, or None."""
        return self.schedulers.get(self.resolve_part(None))

    @property
    def unwrapped_model(self) -> nn.Module:
        """The primary model without DDP/compile wrappers."""
        return self.unwrap(self.primary)

    def unwrap(self, name: str) -> nn.Module:
        """Model ``name`` without DDP/compile wrappers."""
        return self.accelerator.unwrap_model(self.models[name])

    def resolve_part(self, part: Optional[str] = None) -> str:
        """The optimizer part name for ``part`` (None: the primary model's, else the first)."""
        if part is None:
            return self.primary if self.primary in self.optimizers else next(iter(self.optimizers))
        if part not in self.optimizers:
            raise KeyError(f"no optimizer part {part!r}; parts: {', '.join(self.optimizers)}")
        return part

    def add_model(self, name: str, module: nn.Module) -> nn.Module:
        """Add a model part after construction (e.g. a projection sized by a probe): moved to
        the device, prepared for DDP if trainable, checkpointed under its name. Put its
        parameters in an optimizer with ``add_param_group``. Returns the prepared module."""
        if name in self.models:
            raise ValueError(f"model part {name!r} exists already")
        module = module.to(self.device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        if any(p.requires_grad for p in module.parameters()):
            module = self.accelerator.prepare(module)
            self._trainable.append(name)
        self.models[name] = module
        return module

    def add_param_group(self, params: Sequence[nn.Parameter], part: Optional[str] = None, **overrides: Any) -> None:
        """Train ``params`` with optimizer ``part`` as one more param group with the first
        group's settings (and ``overrides``), following that part's schedule."""
        optimizer = self.optimizers[self.resolve_part(part)]
        ref = optimizer.param_groups[0]
        group = {k: v for k, v in ref.items() if k != "params"}
        group.update(overrides)
        group["params"] = list(params)
        optimizer.add_param_group(group)
        schedule = self.schedulers.get(self.resolve_part(part))
        if schedule is not None:
            if not hasattr(schedule, "sync_param_groups"):
                raise TypeError(f"the schedule of part {part!r} ({type(schedule).__name__}) cannot take a new param "
                                f"group; use a convrecipes schedule or build the optimizer with every group")
            schedule.sync_param_groups()

    def register_state(self, name: str, obj: Any, required: bool = True) -> Any:
        """Save and restore ``obj`` (anything with ``state_dict``/``load_state_dict``) with
        every checkpoint under ``name``; an ``nn.Module`` is also moved to the device.
        ``required=False``: a checkpoint without it (an older one) loads and leaves ``obj``
        as it is. Returns ``obj``."""
        if not (hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")):
            raise TypeError(f"register_state({name!r}, ...) needs an object with state_dict/load_state_dict")
        if name in self._registered:
            raise ValueError(f"state {name!r} is registered already")
        if isinstance(obj, nn.Module):
            obj = obj.to(self.device)
        self._registered[name] = obj
        if not required:
            self._optional_state.add(name)
        return obj

    def modules(self) -> dict[str, nn.Module]:
        """Every module the trainer holds, by name: models, loss, augmentations, EMA, and
        registered modules."""
        out: dict[str, nn.Module] = {f"models.{k}": m for k, m in self.models.items()}
        out["loss"] = self.loss_fn
        for name, m in (("augment", self.augment), ("eval_transform", self.eval_transform),
                        ("ema", self.ema)):
            if m is not None:
                out[name] = m
        out.update({f"registered.{k}": v for k, v in self._registered.items() if isinstance(v, nn.Module)})
        return out

    def parameters(self) -> list[nn.Parameter]:
        """Every parameter of every optimizer and module, each once."""
        seen: dict[int, nn.Parameter] = {}
        for optimizer in self.optimizers.values():
            for group in optimizer.param_groups:
                for p in group["params"]:
                    seen.setdefault(id(p), p)
        for module in self.modules().values():
            for p in module.parameters():
                seen.setdefault(id(p), p)
        return list(seen.values())

    # -- small conveniences -------------------------------------------------------
    @property
    def is_main_process(self) -> bool:
        return self.accelerator.is_main_process

    def print(self, *args: Any) -> None:
        """Print on the main process only (above the progress bar)."""
        if self.is_main_process:
            tqdm.write(" ".join(str(a) for a in args))

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def current_lr(self, part: Optional[str] = None) -> float:
        """The first param group's LR of optimizer ``part`` (default: the primary's)."""
        return float(self.optimizers[self.resolve_part(part)].param_groups[0]["lr"])

    def autocast(self) -> Any:
        """The accelerator's autocast context (manual-mode steps wrap their forwards in it)."""
        return self.accelerator.autocast()

    def loss_key_of(self, part: str) -> Optional[str]:
        """The logged value that measures how part ``part`` trains (what the LR finder reads
        when it sweeps that part); None: the step's loss."""
        return None

    def evaluation_models(self) -> dict[str, nn.Module]:
        """Models besides the primary (and its EMA) worth evaluating, by name (e.g. the
        teacher of Meta Pseudo Labels): validated each epoch as ``<name>_val_*`` and tested
        at the end of a recipe run. Default: none."""
        return {}

    # -- the one thing subclasses change ------------------------------------------------
    def training_step(self, batch: Any) -> StepOutput:
        """Loss of one prepared batch ``(images, targets)``; runs under autocast."""
        images, targets = batch
        output = self.model(images)
        loss = as_loss_output(self.loss_fn(output, targets))
        return StepOutput(loss.loss, {**loss.parts, **loss.stats} if len(loss.parts) > 1 or loss.stats else {})

    # -- batches ------------------------------------------------------------------------
    def prepare_batch(self, images: torch.Tensor, targets: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images on the device -> float in [0, 1] -> augment (train) or normalise (eval)."""
        images = images.to(self.device, non_blocking=True)
        targets = targets.to(self.device, non_blocking=True)
        if images.dtype == torch.uint8:
            images = images.float().div_(255.0)
        transform = self.augment if train else self.eval_transform
        if transform is not None:
            images, targets = transform(images, targets)
        if self.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        return images, targets

    def prepare_train_batch(self, batch: Any) -> Any:
        """What the loader yielded -> what ``training_step`` takes. Default: ``(images,
        targets)`` through ``prepare_batch``; algorithms with other streams override it."""
        if not (isinstance(batch, (tuple, list)) and len(batch) == 2
                and all(isinstance(x, torch.Tensor) for x in batch)):
            raise TypeError(f"{type(self).__name__} trains on (images, targets) batches, but the loader yielded a "
                            f"{type(batch).__name__}; a loader of several streams (e.g. SemiSupervisedLoader) needs a "
                            f"trainer whose prepare_train_batch takes them (e.g. a semi-supervised trainer)")
        images, targets = batch
        return self.prepare_batch(images, targets, train=True)

    def batch_size_of(self, batch: Any) -> int:
        """Samples in a prepared batch (the first tensor's length)."""
        first = _first_tensor(batch)
        return int(first.shape[0]) if first is not None and first.dim() > 0 else 1

    def configure_loader(self, loader: Iterable) -> Iterable:
        """Shard a loader for this process (``EpochLoader``s in place; others through
        Accelerate's ``prepare_data_loader``)."""
        if is_epoch_loader(loader):
            loader.shard(self.accelerator.num_processes, self.accelerator.process_index, self.device)
            return loader
        return self.accelerator.prepare_data_loader(loader)

    # -- the step -----------------------------------------------------------------------
    def backward(self, loss: torch.Tensor, part: Optional[str] = None) -> None:
        """NaN guard, then backward through the gradient scaler. ``part`` names the part
        in the NaN message (manual mode calls this directly)."""
        self._check_finite(loss, part)
        self.accelerator.backward(loss)

    def step(self, part: Optional[str] = None) -> None:
        """One update of optimizer ``part`` (default: the primary's): unscale and clip every
        parameter in it, step, zero its gradients, step its schedule (unless the scaler
        skipped the step), and the loss's ``post_step`` when the loss trains with this part."""
        name = self.resolve_part(part)
        optimizer = self.optimizers[name]
        if self.grad_clip is not None:
            # per part: unscale only this optimizer's gradients (unscaling another part's
            # twice in one iteration would corrupt them), then clip all of its parameters
            self.accelerator.unscale_gradients(optimizer=optimizer)
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        schedule = self.schedulers.get(name)
        if schedule is not None and self._step_schedules and not getattr(optimizer, "step_was_skipped", False):
            schedule.step()
        if name == self.resolve_part(None) and hasattr(self.loss_fn, "post_step"):
            self.loss_fn.post_step()

    def train_step(self, batches: Sequence[Any], step_schedules: bool = True) -> StepOutput:
        """One training step on ``batches`` (raw loader items, one per accumulation
        micro-batch), exactly as ``fit`` runs it: prepare, forward, NaN guard, backward,
        optimizer and schedule steps, EMA, ``global_step + 1``. No callbacks are called.

        Args:
            batches: the step's micro-batches (manual mode: exactly one).
            step_schedules: False leaves the learning rates to the caller (the LR finder).

        Returns:
            ``StepOutput`` with the step's sample-weighted mean loss and logs (detached) and
            the number of samples.
        """
        if not batches:
            raise ValueError("train_step needs at least one batch")
        if self.manual_steps and len(batches) != 1:
            raise ValueError(f"{type(self).__name__} takes one batch per step (manual mode, no accumulation)")
        group = len(batches)
        sums: dict[str, torch.Tensor] = {}
        samples = 0
        self._step_schedules = step_schedules
        try:
            for i, raw in enumerate(batches):
                sync = contextlib.nullcontext() if i == group - 1 else self._no_sync()
                with sync:
                    batch = self.prepare_train_batch(raw)
                    if self.manual_steps:
                        out = self.training_step(batch)
                    else:
                        with self.accelerator.autocast():
                            out = self.training_step(batch)
                        self._check_finite(out.loss)
                        self.accelerator.backward(out.loss / group)
                n = out.batch_size if out.batch_size is not None else self.batch_size_of(batch)
                samples += n
                for key, value in {"train_loss": out.loss, **out.logs}.items():
                    value = value.detach().double() * n
                    sums[key] = sums[key] + value if key in sums else value
            if not self.manual_steps:
                for name in self.optimizers:
                    self.step(name)
        finally:
            self._step_schedules = True
        self.global_step += 1
        if self.ema is not None:
            self.ema.update(self.unwrapped_model, step=self.global_step)
        means = {k: v / samples for k, v in sums.items()}
        return StepOutput(means.pop("train_loss"), means, samples)

    def _no_sync(self) -> contextlib.ExitStack:
        """DDP's no_sync on every prepared model (accumulation micro-batches)."""
        stack = contextlib.ExitStack()
        for name in self._trainable:
            stack.enter_context(self.accelerator.no_sync(self.models[name]))
        return stack

    # -- training -----------------------------------------------------------------------
    def fit(
        self,
        train_loader: Iterable,
        val_loader: Optional[Iterable] = None,
        epochs: int = 1,
        resume_from: Optional[Union[str, Path]] = None,
    ) -> list[dict[str, float]]:
        """Train for ``epochs`` epochs in total (a resumed run continues to the same total).

        Returns:
            The per-epoch metrics of this call.
        """
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise RecipeError(f"epochs must be an integer >= 1, got {epochs!r}; e.g. trainer.epochs=10")
        train_loader = self.configure_loader(train_loader)
        if val_loader is not None:
            val_loader = self.configure_loader(val_loader)
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            self.print(f"resumed from {resume_from} at epoch {self.epoch + 1}, batch {self.batch_in_epoch}, "
                       f"step {self.global_step}")
        elif self.global_step == 0 and self.batch_in_epoch == 0 and self.epoch == 0:
            # seed once, at the start of training: a later fit() call continues the same stream
            set_seed(self.seed, device_specific=True)
        if self.run_dir is not None and self.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self._lr_log = start_lr_log(self, train_loader, epochs)  # after a resume: drops the steps it retrains
        self._init_trackers()
        for cb in self.callbacks:
            cb.on_fit_start(self)
        new_history = []
        try:
            while self.epoch < epochs and not self.should_stop:
                for cb in self.callbacks:
                    cb.on_epoch_start(self, self.epoch)
                metrics = {"epoch": self.epoch + 1, **self._train_epoch(train_loader, epochs)}
                due = (self.epoch + 1) % self.eval_every_epochs == 0 or self.epoch + 1 == epochs
                #: False on an epoch whose validation was skipped (eval_every_epochs)
                self.validated = val_loader is None or due
                if val_loader is not None and due:
                    metrics.update(self.evaluate(val_loader, prefix="val_"))
                    if self.ema is not None:
                        metrics.update(self.evaluate(val_loader, model=self.ema.module, prefix="ema_val_"))
                    for name, other in self.evaluation_models().items():
                        metrics.update(self.evaluate(val_loader, model=other, prefix=f"{name}_val_"))
                for cb in self.callbacks:
                    cb.on_validation_end(self, metrics)
                for schedule in self.schedulers.values():
                    if hasattr(schedule, "on_epoch_end") and self.validated:
                        schedule.on_epoch_end(metrics)
                self.epoch += 1
                self.batch_in_epoch = 0
                self._log_epoch(metrics, epochs)
                new_history.append(metrics)
                for cb in self.callbacks:
                    cb.on_epoch_end(self, metrics)
            for cb in self.callbacks:
                cb.on_fit_end(self)
        finally:
            self._finish_trackers()
        self._plot()
        return new_history

    def _train_epoch(self, loader: Iterable, epochs: int) -> dict[str, float]:
        for m in self.models.values():
            m.train()
        self.loss_fn.train()
        start = self.batch_in_epoch
        epoch_loader = is_epoch_loader(loader)
        if epoch_loader:
            loader.set_epoch(self.epoch, start_batch=start)
        elif start:
            loader = self.accelerator.skip_first_batches(loader, start)
        n_batches = len(loader) + (start if not epoch_loader else 0)  # type: ignore[arg-type]
        if n_batches == 0:
            raise ValueError("the training loader yields no batches; lower data.batch_size or add data")
        if start == 0:
            self._epoch_sums, self._epoch_samples = {}, 0
        self._finite_guard.pending.clear()  # nothing left from an interrupted fit
        accum = self.grad_accum_steps
        # a bar on a terminal; in a log, a plain line every log_every_steps optimizer steps
        bar = progress_bar(total=n_batches, initial=start, desc=f"epoch {self.epoch + 1}/{epochs}", unit="batch",
                           every=self.log_every_steps * accum, disable=not (self.progress and self.is_main_process))
        t0, samples_this_call = time.perf_counter(), 0
        pending: list[Any] = []
        for b, raw in enumerate(loader, start=start):
            pending.append(raw)
            group_start = (b // accum) * accum
            if len(pending) < min(accum, n_batches - group_start):
                bar.update(1)
                continue
            for cb in self.callbacks:
                cb.on_step_start(self, self.global_step + 1)
            self._where = f"epoch {self.epoch + 1}, batch {b + 1}/{n_batches}"
            record_step_lrs(self, self._lr_log, b + 1, n_batches)
            try:
                self._defer_finite_check = True
                out = self.train_step(pending)
            except RuntimeError as exc:
                self._raise_if_collective_timeout(exc)
                raise
            finally:
                self._defer_finite_check = False
            pending = []
            if self.global_step % self.nan_check_every_steps == 0:
                self.check_finite_losses()
            self.batch_in_epoch = b + 1
            samples_this_call += out.batch_size
            # fold into the resumable per-epoch totals only at step boundaries, so a
            # checkpoint taken here carries exactly what was trained
            logs = {"train_loss": out.loss, **out.logs}
            for key, value in logs.items():
                value = value * out.batch_size
                self._epoch_sums[key] = self._epoch_sums[key] + value if key in self._epoch_sums else value
            self._epoch_samples += out.batch_size
            for cb in self.callbacks:
                cb.on_step_end(self, self.global_step, logs)
            self._log_step(logs)
            if shows_next(bar) or b + 1 == n_batches:
                bar.set_postfix(loss=f"{float(self._epoch_sums['train_loss']) / max(self._epoch_samples, 1):.4f}",
                                lr=f"{self.current_lr():.3g}", refresh=False)
            bar.update(1)
        bar.close()
        self.check_finite_losses()
        elapsed = time.perf_counter() - t0
        totals = torch.stack([torch.tensor(float(self._epoch_samples), dtype=torch.float64, device=self.device),
                              *(v.to(torch.float64) for v in self._epoch_sums.values())])
        totals = self.accelerator.reduce(totals, "sum") if self.accelerator.num_processes > 1 else totals
        count = max(float(totals[0]), 1.0)
        metrics = {key: float(v) / count for key, v in zip(self._epoch_sums, totals[1:])}
        metrics["lr"] = self.current_lr()
        for name in self.optimizers:
            if name != self.resolve_part(None):
                metrics[f"lr_{name}"] = self.current_lr(name)
        global_samples = samples_this_call * self.accelerator.num_processes
        metrics["images_per_s"] = global_samples / elapsed if elapsed > 0 else float("nan")
        metrics["train_time_s"] = elapsed
        return metrics

    def _raise_if_collective_timeout(self, exc: RuntimeError) -> None:
        """A collective that timed out means another process stalled or died: say where."""
        text = str(exc).lower()
        if self.accelerator.num_processes > 1 and ("timed out" in text or "timeout" in text):
            from convrecipes.errors import ConvrecipesError

            raise ConvrecipesError(
                f"process {self.accelerator.process_index} waited too long for the others at {self._where} (step "
                f"{self.global_step + 1}): another process stalled or died ({str(exc).splitlines()[0][:200]}). The last "
                f"checkpoint ({self.last_checkpoint or 'none written yet'}) is intact: resume with --resume; raise "
                f"trainer.collective_timeout_s if a step legitimately takes that long") from None

    def _check_finite(self, loss: torch.Tensor, part: Optional[str] = None) -> None:
        """The NaN guard: inside ``fit`` (with ``nan_check_every_steps`` > 1) the loss is
        queued and checked later in one host read (``check_finite_losses``); otherwise it is
        checked now, before the update. Every rank stops together."""
        where = self._where or f"epoch {self.epoch + 1}"
        if self._defer_finite_check and self.nan_check_every_steps > 1:
            self._finite_guard.add(loss, part, where, self.global_step + 1)
        else:
            self._finite_guard.check_now(loss, part, where, self.global_step + 1, self.last_checkpoint)

    def check_finite_losses(self) -> None:
        """Check the losses queued since the last check (one host sync; collective): raise
        ``NonFiniteLossError`` naming the first non-finite one. ``fit`` calls it every
        ``nan_check_every_steps``, at the end of each epoch and before every checkpoint."""
        self._finite_guard.flush(self.last_checkpoint, stopped_at=self.global_step)

    def _check_finite_weights(self) -> None:
        """Refuse to overwrite a good checkpoint with overflowed weights (the loss can still be
        finite for a step after a weight has become inf)."""
        models = {name: self.unwrap(name) for name in self.models}
        if self.ema is not None:
            models["ema"] = self.ema.module
        for part, model in models.items():
            for name, tensor in model.state_dict().items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    where = self.last_checkpoint or "none written yet"
                    raise NonFiniteLossError(
                        f"weight {name!r} of {part!r} became inf/nan by step {self.global_step} (epoch "
                        f"{self.epoch + 1}); this state was not saved and the last good checkpoint is intact "
                        f"({where}). Fix: lower the learning rate (optimizer.lr), clip gradients "
                        f"(trainer.grad_clip=1.0), or use bf16 instead of fp16."
                    )

    # -- trackers -----------------------------------------------------------------------
    def _init_trackers(self) -> None:
        if not self.accelerator.log_with or self.accelerator.trackers:
            return
        name = self.run_dir.name if self.run_dir is not None else "convrecipes"
        config = _scalar_config(self.checkpoint_metadata.get("recipe", {}))
        self.accelerator.init_trackers(name, config=config or None)

    def _log_step(self, logs: dict[str, torch.Tensor]) -> None:
        if not self.accelerator.trackers or self.global_step % self.log_every_steps:
            return
        values = {f"step/{k}": float(v) for k, v in logs.items()}
        for name in self.optimizers:
            values["step/lr" if name == self.resolve_part(None) else f"step/lr_{name}"] = self.current_lr(name)
        self.accelerator.log(values, step=self.global_step)

    def _finish_trackers(self) -> None:
        # not accelerator.end_training(): that also destroys the process group, which the
        # caller may still need (evaluation after fit)
        for tracker in self.accelerator.trackers:
            tracker.finish()
        self.accelerator.trackers = []

    # -- evaluation ---------------------------------------------------------------------
    @torch.no_grad()
    def predict(self, loader: Iterable, model: Optional[nn.Module] = None) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
        """Logits, targets and (if the model gives them) embeddings of every sample, gathered
        from all processes, each sample exactly once."""
        logits_all, targets_all, emb_all = [], [], []
        for logits, targets, embeddings in self._eval_batches(loader, model):
            logits_all.append(logits.float().cpu())
            targets_all.append(targets.cpu())
            if embeddings is not None:
                emb_all.append(embeddings.float().cpu())
        embeddings = torch.cat(emb_all) if emb_all else None
        return torch.cat(logits_all), torch.cat(targets_all), embeddings

    @torch.no_grad()
    def evaluate(self, loader: Iterable, model: Optional[nn.Module] = None, prefix: str = "") -> dict[str, float]:
        """Loss, top-1 and (with >= 5 classes) top-5 accuracy in percent over all processes."""
        loss_sum, correct1, correct5, count, num_classes = 0.0, 0, 0, 0, 0
        for logits, targets, embeddings in self._eval_batches(loader, model):
            output = logits if embeddings is None else ModelOutput(logits, embeddings)
            n = targets.shape[0]
            loss_sum += float(as_loss_output(self.loss_fn(output, targets)).loss) * n
            num_classes = logits.shape[1]
            top = logits.topk(min(5, num_classes), dim=1).indices
            hits = top.eq(targets[:, None])
            correct1 += int(hits[:, 0].sum())
            correct5 += int(hits.any(dim=1).sum())
            count += n
        if count == 0:
            raise ValueError("the evaluation loader yields no samples")
        metrics = {f"{prefix}loss": loss_sum / count, f"{prefix}top1": 100.0 * correct1 / count}
        if num_classes >= 5:
            metrics[f"{prefix}top5"] = 100.0 * correct5 / count
        return metrics

    def _eval_batches(self, loader: Iterable, model: Optional[nn.Module]):
        """Yield gathered (logits, targets, embeddings) batches with padding removed."""
        model = model if model is not None else self.model
        was_training, loss_was_training = model.training, self.loss_fn.training
        model.eval()
        self.loss_fn.eval()
        in_memory = isinstance(loader, InMemoryLoader)
        if in_memory:
            loader.shard(self.accelerator.num_processes, self.accelerator.process_index, self.device)
            loader.set_epoch(0)
            batches = loader.iter_with_mask()
        else:
            batches = ((x, y, None) for x, y in loader)
        try:
            for images, targets, valid in batches:
                images, targets = self.prepare_batch(images, targets, train=False)
                with self.accelerator.autocast():
                    output = model(images)
                logits = logits_of(output).float()
                embeddings = output.embeddings if isinstance(output, ModelOutput) else None
                if in_memory:
                    if self.accelerator.num_processes > 1:
                        logits, targets, valid = self.accelerator.gather((logits, targets, valid))
                        if embeddings is not None:
                            embeddings = self.accelerator.gather(embeddings.float().contiguous())
                    # padding of the last batch is marked invalid: each sample counts once
                    logits, targets = logits[valid], targets[valid]
                    embeddings = embeddings[valid] if embeddings is not None else None
                elif self.accelerator.num_processes > 1:
                    logits, targets = self.accelerator.gather_for_metrics((logits, targets))
                    if embeddings is not None:
                        embeddings = self.accelerator.gather_for_metrics(embeddings.float().contiguous())
                yield logits, targets, embeddings
        finally:
            model.train(was_training)
            self.loss_fn.train(loss_was_training)

    # -- logging ------------------------------------------------------------------------
    def _log_epoch(self, metrics: dict[str, float], epochs: int) -> None:
        self.history.append(metrics)
        self.print(f"epoch {metrics['epoch']}/{epochs}  {format_metrics(metrics)}")
        if self.run_dir is not None and self.is_main_process:
            append_jsonl(self.run_dir / "metrics.jsonl", metrics)
        if self.accelerator.trackers:
            self.accelerator.log({f"epoch/{k}": v for k, v in metrics.items() if isinstance(v, (int, float))},
                                 step=self.global_step)

    def _plot(self) -> None:
        if self.run_dir is None or not self.is_main_process:
            return
        path = self.run_dir / "metrics.jsonl"
        if path.exists():  # includes epochs from before a resume
            plot_curves(read_jsonl(path), self.run_dir / "curves.png", title=self.run_dir.name,
                        **curves_context(self))

    # -- snapshots ----------------------------------------------------------------------
    def snapshot(self) -> Any:
        """An exact in-memory copy of the whole training state (collective); ``restore``
        puts it back. See ``convrecipes.trainers.snapshot``."""
        from convrecipes.trainers.snapshot import take_snapshot

        self.check_finite_losses()
        return take_snapshot(self)

    def restore(self, snapshot: Any) -> None:
        """Put a ``snapshot()`` back: training continues bit-identically (collective)."""
        from convrecipes.trainers.snapshot import restore_snapshot

        restore_snapshot(self, snapshot)

    # -- checkpoints --------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The full training state. Collective: every process must call it (RNG states are
        gathered from all of them).

        The primary part keeps the keys ``model``/``optimizer``/``scheduler`` (what
        evaluation, teachers and older checkpoints use); other parts are under ``parts``.
        """
        rng = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available():
            rng["cuda"] = torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None
        rng_all = gather_object([rng]) if self.accelerator.num_processes > 1 else [rng]
        main_opt = self.resolve_part(None)
        state: dict[str, Any] = {
            "model": self.unwrapped_model.state_dict(),
            "optimizer": self.optimizers[main_opt].state_dict(),
            "loss": self.loss_fn.state_dict(),
            "rng": rng_all,
            "shared_rng": self.shared_generator.get_state(),
            "progress": {
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step,
                "epoch_sums": {k: v.detach().cpu() for k, v in self._epoch_sums.items()},
                "epoch_samples": self._epoch_samples,
                "num_processes": self.accelerator.num_processes,
            },
            "callbacks": {f"{i}:{type(cb).__name__}": cb.state_dict() for i, cb in enumerate(self.callbacks)},
            "registered": {name: obj.state_dict() for name, obj in self._registered.items()},
            "parts": {
                # frozen models (a teacher) are inputs, not training state
                "models": {n: self.unwrap(n).state_dict() for n in self._trainable if n != self.primary},
                "optimizers": {n: o.state_dict() for n, o in self.optimizers.items() if n != main_opt},
                "schedulers": {n: s.state_dict() for n, s in self.schedulers.items() if n != main_opt},
            },
        }
        if self.ema is not None:
            state["ema"] = self.ema.module.state_dict()
        if main_opt in self.schedulers:
            state["scheduler"] = self.schedulers[main_opt].state_dict()
        if self.accelerator.scaler is not None:
            state["scaler"] = self.accelerator.scaler.state_dict()
        return state

    def save_checkpoint(self, path: Union[str, Path, Sequence[Union[str, Path]]],
                        metadata: Optional[Mapping[str, Any]] = None) -> Path:
        """Write the full training state to ``path`` (collective; the main process writes).

        ``path`` may be a list: the state is serialised once and written to each file in
        order, each atomically (``ModelCheckpoint`` writes ``best`` before ``last``, so a
        kill between the two never leaves ``last`` claiming a best that is not on disk).
        Returns the last path written.
        """
        paths = [Path(p) for p in ([path] if isinstance(path, (str, Path)) else path)]
        self.check_finite_losses()  # the losses still queued name the step that went bad
        self._check_finite_weights()
        state = self.state_dict()
        if self.is_main_process:
            meta = {
                **self.checkpoint_metadata,
                "epoch": self.epoch,
                "batch_in_epoch": self.batch_in_epoch,
                "global_step": self.global_step,
                "metrics": self.history[-1] if self.history else {},
                **(metadata or {}),
            }
            data = encode_checkpoint(state, meta)
            for p in paths:
                write_atomic(p, data)
        self.last_checkpoint = paths[-1]
        self.wait_for_everyone()
        return paths[-1]

    def load_checkpoint(self, path: Union[str, Path]) -> dict[str, Any]:
        """Restore the full training state from ``path``; returns the checkpoint's metadata."""
        state, metadata = load_checkpoint(path)
        self.load_state_dict(state, source=path)
        history_path = self.run_dir / "metrics.jsonl" if self.run_dir is not None else None
        if history_path is not None and history_path.exists():
            # epochs logged after this checkpoint was written will be trained again
            self.history = read_jsonl(history_path)[: self.epoch]
            if self.is_main_process:
                tmp = history_path.with_suffix(".jsonl.tmp")
                tmp.write_text("".join(json.dumps(r) + "\n" for r in self.history))
                os.replace(tmp, history_path)
        self.last_checkpoint = Path(path)
        return metadata

    def load_state_dict(self, state: dict[str, Any], source: Union[str, Path] = "<memory>") -> None:
        """Restore ``state_dict()``'s output (every part, EMA, loss, registered state, scaler,
        callbacks, position, the shared generator and every process's RNG state)."""
        path = source
        main_opt = self.resolve_part(None)
        parts = state.get("parts", {})
        try:
            load_model_weights(self.unwrapped_model, model_weights_of(state, path), path)
            saved_models = parts.get("models", {})
            expected = [n for n in self._trainable if n != self.primary]
            if sorted(saved_models) != sorted(expected):
                raise CheckpointError(f"{path} holds the model parts {sorted(saved_models) or 'none'} besides the "
                                      f"primary, this trainer has {expected or 'none'}; resume with the trainer "
                                      f"settings it was written with")
            for name in expected:
                load_model_weights(self.unwrap(name), saved_models[name], path)
            if self.ema is not None:
                if "ema" not in state:
                    raise CheckpointError(f"{path} has no EMA weights; resume with trainer.ema_decay unset")
                load_model_weights(self.ema.module, state["ema"], path)
            load_optimizer_state(self.optimizers[main_opt], state["optimizer"])
            for name, optimizer in self.optimizers.items():
                if name != main_opt:
                    load_optimizer_state(optimizer, parts["optimizers"][name])
            self.loss_fn.load_state_dict(state["loss"])
            for name, schedule in self.schedulers.items():
                saved = state.get("scheduler") if name == main_opt else parts.get("schedulers", {}).get(name)
                if saved is not None:
                    schedule.load_state_dict(saved)
            if self.accelerator.scaler is not None and "scaler" in state:
                self.accelerator.scaler.load_state_dict(state["scaler"])
            registered = state.get("registered", {})
            for name, obj in self._registered.items():
                if name not in registered and name in self._optional_state:
                    continue
                if name not in registered:
                    raise CheckpointError(f"{path} has no state {name!r}; resume with the trainer settings it was "
                                          f"written with")
                obj.load_state_dict(registered[name])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"checkpoint {path} does not match this training set-up ({exc}); resume with "
                                  f"the same recipe it was written with") from None
        progress = state["progress"]
        self.epoch = progress["epoch"]
        self.batch_in_epoch = progress["batch_in_epoch"]
        self.global_step = progress["global_step"]
        self._epoch_sums = {k: torch.as_tensor(v).to(self.device) for k, v in progress["epoch_sums"].items()}
        self._epoch_samples = progress["epoch_samples"]
        if "shared_rng" in state:
            self.shared_generator.set_state(state["shared_rng"])
        for i, cb in enumerate(self.callbacks):
            key = f"{i}:{type(cb).__name__}"
            if key in state["callbacks"]:
                cb.load_state_dict(state["callbacks"][key])
        rng_all = state["rng"]
        rank = self.accelerator.process_index
        if len(rng_all) == self.accelerator.num_processes:
            torch.set_rng_state(rng_all[rank]["torch"])
            if rng_all[rank].get("cuda") is not None and self.device.type == "cuda":
                torch.cuda.set_rng_state(rng_all[rank]["cuda"], self.device)
        else:
            self.print(f"warning: {path} was written by {len(rng_all)} processes and this run has "
                       f"{self.accelerator.num_processes}; augmentation randomness is re-seeded, so the "
                       f"continuation is valid but not bit-identical")
            set_seed(self.seed + self.global_step, device_specific=True)
