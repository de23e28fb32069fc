"""``build(recipe)``: turn a validated recipe into the plain objects a trainer takes.

The recipe layer knows about trainers; trainers never know about recipes. Kept apart from
``recipe.py`` (which only reads and validates configs) so that module stays importable
without torch.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn as nn
from accelerate import Accelerator
from accelerate.utils import set_seed

from convrecipes.augment import build_augment, build_eval_transform, dataset_mean_std
from convrecipes.data import ImageTensorDataset, InMemoryLoader, PKBatchSampler, load_dataset
from convrecipes.data.splits import stratified_split, subset_indices
from convrecipes.errors import RecipeError
from convrecipes.losses import LOSSES, build_loss, loss_param_groups
from convrecipes.models import count_parameters, create_model
from convrecipes.optim import build_optimizer, scaled_lr
from convrecipes.threads import apply_threads
from convrecipes.recipe import Recipe, loss_terms, recipe_to_dict
from convrecipes.registry import Registry
from convrecipes.schedulers import build_scheduler
from convrecipes.trainers import TRAINERS, EarlyStopping, ModelCheckpoint, Trainer


@dataclass
class Datasets:
    """The splits of a recipe's data (val may be None)."""

    train: ImageTensorDataset
    val: Optional[ImageTensorDataset]
    test: ImageTensorDataset
    #: images without labels (their labels -1, or hidden ones kept only for analysis), for
    #: semi-supervised trainers; None when the recipe names none
    unlabeled: Optional[ImageTensorDataset] = None
    #: what injected label noise changed (``data.label_noise``), else None
    label_noise: Any = None

    @property
    def num_classes(self) -> int:
        return self.test.num_classes


@dataclass
class Experiment:
    """Everything ``build`` makes: call ``trainer.fit(train_loader, val_loader, epochs)``."""

    recipe: Recipe
    trainer: Trainer
    train_loader: Any  # InMemoryLoader, or SemiSupervisedLoader for semi-supervised trainers
    val_loader: Optional[InMemoryLoader]
    test_loader: InMemoryLoader
    datasets: Datasets
    num_parameters: int
    #: what ``model.init_from`` loaded (``convrecipes.finetune.load_init_weights``), else None
    init: Optional[dict[str, Any]] = None
    #: the callback holding ``model.freeze_stages``/``model.freeze`` fixed, else None
    freezer: Any = None


@dataclass
class TrainerContext:
    """What a trainer's recipe-side builder may need besides its params: the data's shape
    and normalisation and the device."""

    recipe: Recipe
    num_classes: int
    in_chans: int
    image_size: tuple[int, int]
    mean: list[float]
    std: list[float]
    device: Any
    steps_per_epoch: int = 0
    model: Optional[nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None

    def make_model(self, name: str, kwargs: Optional[dict[str, Any]] = None) -> nn.Module:
        """Another model for the recipe's images and classes (e.g. a teacher), with the
        recipe's drop rates; ``name`` is any timm name (ours included)."""
        m = self.recipe.model
        return create_model(name, in_chans=self.in_chans, num_classes=self.num_classes, drop_rate=m.drop_rate,
                            drop_path_rate=m.drop_path_rate, **dict(kwargs or {}))

    def make_optimizer(self, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        """An optimizer like the recipe's (its name, momentum, weight decay, ...) at ``lr``."""
        o = self.recipe.optimizer
        return build_optimizer(model, o.name, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                               decay_norm_and_bias=o.decay_norm_and_bias, fused=o.fused)

    def make_schedule(self, optimizer: torch.optim.Optimizer, epochs: int, name: Optional[str] = None,
                      warmup_epochs: Optional[float] = None) -> Any:
        """A schedule over ``epochs`` epochs: the recipe's (default) or ``name`` with no params."""
        s = self.recipe.schedule
        warmup = s.warmup_epochs if warmup_epochs is None else warmup_epochs
        params = s.params if name is None or name == s.name else {}
        return build_scheduler(name or s.name, optimizer, total_steps=self.steps_per_epoch * epochs,
                               steps_per_epoch=self.steps_per_epoch, warmup_steps=round(warmup * self.steps_per_epoch),
                               warmup_start_factor=s.warmup_start_factor, **params)

    def make_augment(self, preset: str, key: str) -> nn.Module:
        """The augment ``preset`` for this data (the recipe's hflip and normalisation);
        ``key`` names the recipe key in the error for an unknown preset."""
        from convrecipes.augment.presets import AUGMENT_PRESETS

        if not isinstance(preset, str) or preset not in AUGMENT_PRESETS:
            from convrecipes.registry import did_you_mean

            raise RecipeError(f"unknown augment preset {preset!r}{did_you_mean(str(preset), AUGMENT_PRESETS.names())} "
                              f"({key}); valid: {', '.join(AUGMENT_PRESETS.names())}")
        return build_augment(preset, image_size=self.image_size, channels=self.in_chans, mean=self.mean,
                             std=self.std, num_classes=self.num_classes, hflip=self.recipe.augment.hflip)


#: Recipe-side builders per trainer name: ``builder(params, context) -> constructor kwargs``
#: (e.g. a teacher named by a path becomes a module). Trainers never see recipes; a trainer
#: without a builder takes its ``trainer.params`` as they are.
TRAINER_BUILDERS: Registry[Callable[[dict[str, Any], TrainerContext], dict[str, Any]]] = Registry("trainer builder")


@TRAINER_BUILDERS.register("distillation")
def distillation_params(params: dict[str, Any], ctx: TrainerContext) -> dict[str, Any]:
    """Load a teacher named by a run directory, a checkpoint or a timm name (or a list of
    them: an ensemble), and fill in the student's batch shape and normalisation."""
    from convrecipes.loading import load_teacher

    params = dict(params)
    teacher = params.get("teacher")
    if teacher is None:
        raise RecipeError("trainer 'distillation' needs a teacher: set trainer.params.teacher=<run directory or "
                          ".safetensors written by `convrecipes train`, or a timm model name>")
    if isinstance(teacher, (list, tuple)):
        if not teacher:
            raise RecipeError("trainer.params.teacher is an empty list; give one teacher or several for an ensemble")
        params["teacher"] = [load_teacher(t, num_classes=ctx.num_classes) if isinstance(t, str) else t
                             for t in teacher]
    elif isinstance(teacher, str):
        params["teacher"] = load_teacher(teacher, num_classes=ctx.num_classes)
    params.setdefault("input_shape", (ctx.in_chans, *ctx.image_size))
    params.setdefault("student_mean", list(ctx.mean))
    params.setdefault("student_std", list(ctx.std))
    return params


def _view_augments(params: dict[str, Any], ctx: TrainerContext) -> dict[str, Any]:
    """Weak and strong unlabeled-view augments from preset names (defaults light/strong)."""
    for key, default in (("weak_augment", "light"), ("strong_augment", "strong")):
        value = params.get(key, default)
        params[key] = ctx.make_augment(value, f"trainer.params.{key}") if isinstance(value, str) or value is None \
            else value
    return params


@TRAINER_BUILDERS.register("uda")
def uda_params(params: dict[str, Any], ctx: TrainerContext) -> dict[str, Any]:
    """Weak and strong views from preset names (``trainer.params.weak_augment: light``,
    ``strong_augment: strong``)."""
    return _view_augments(dict(params), ctx)


@TRAINER_BUILDERS.register("mpl")
def mpl_params(params: dict[str, Any], ctx: TrainerContext) -> dict[str, Any]:
    """The teacher (``teacher_model``, default the student's architecture, with
    ``teacher_kwargs``), its optimizer like the student's at ``teacher_lr`` (default the
    student's) and schedule; the student's schedule over the MPL epochs only; the finetune
    optimizer at ``finetune_lr`` (default a tenth of the student's) with a cosine decay
    over ``finetune_epochs``; the weak and strong views."""
    params = _view_augments(dict(params), ctx)
    recipe = ctx.recipe
    name = params.pop("teacher_model", None) or recipe.model.name
    kwargs = params.pop("teacher_kwargs", None)
    kwargs = dict(recipe.model.kwargs) if kwargs is None and name == recipe.model.name else dict(kwargs or {})
    try:
        teacher = ctx.make_model(name, kwargs)
    except RecipeError as exc:
        raise RecipeError(f"trainer.params.teacher_model: {exc}") from None
    student_lr = ctx.optimizer.param_groups[0]["lr"]
    teacher_lr = params.pop("teacher_lr", None) or student_lr
    finetune_lr = params.pop("finetune_lr", None) or student_lr / 10
    finetune = int(params.get("finetune_epochs", 0) or 0)
    epochs = recipe.trainer.epochs
    if finetune >= epochs:
        raise RecipeError(f"trainer.params.finetune_epochs={finetune} leaves no MPL epochs in trainer.epochs={epochs} "
                          f"(which counts both stages); raise trainer.epochs or lower finetune_epochs")
    params["teacher"] = teacher
    params["teacher_optimizer"] = ctx.make_optimizer(teacher, teacher_lr)
    params["teacher_scheduler"] = ctx.make_schedule(params["teacher_optimizer"], epochs - finetune)
    params["scheduler"] = ctx.make_schedule(ctx.optimizer, epochs - finetune)
    if finetune:
        params["finetune_optimizer"] = ctx.make_optimizer(ctx.model, finetune_lr)
        params["finetune_scheduler"] = ctx.make_schedule(params["finetune_optimizer"], finetune, name="cosine",
                                                         warmup_epochs=0)
    return params


#: recipe-only params of the mpl builder (turned into constructor arguments above)
mpl_params.recipe_params = {"teacher_model": None, "teacher_kwargs": None, "teacher_lr": None,  # type: ignore[attr-defined]
                            "finetune_lr": None}
#: constructor arguments the mpl builder makes (a recipe cannot give them)
mpl_params.built_params = ("teacher", "teacher_optimizer", "teacher_scheduler", "finetune_optimizer",  # type: ignore[attr-defined]
                           "finetune_scheduler")


def make_accelerator(recipe: Recipe, run_dir: Optional[Path] = None) -> Accelerator:
    """An ``Accelerator`` for the recipe: its mixed precision (None: the launcher's), DDP's
    ``find_unused_parameters``, trackers (``trainer.log_with``, files in ``run_dir``) and
    ``trainer.collective_timeout_s`` (instead of torch's 30 minutes)."""
    from convrecipes.trainers.base import make_accelerator as accelerator_for

    t = recipe.trainer
    log_with = tracker_names(t.log_with) if run_dir is not None else None  # lr-find/evaluate track nothing
    # an algorithm that leaves parameters unused in its steps (freeze-drop-path) needs it under DDP
    find_unused = t.find_unused_parameters or getattr(TRAINERS.get(t.name), "leaves_parameters_unused", False)
    # frozen parameters get no gradient, and they are frozen after DDP wrapped the model (so
    # that unfreezing them later syncs them): convrecipes.finetune
    from convrecipes.finetune import freezes_parameters

    find_unused = find_unused or freezes_parameters(recipe)
    return accelerator_for(t.mixed_precision, find_unused, log_with, run_dir, t.collective_timeout_s)


# Accelerate's tracker names and the package each needs.
_TRACKER_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "comet_ml": "comet_ml",
                     "aim": "aim", "clearml": "clearml", "dvclive": "dvclive", "swanlab": "swanlab"}


def tracker_names(log_with: Any) -> Optional[list[str]]:
    """``trainer.log_with`` (a name or a list) checked: known trackers whose package is installed."""
    import importlib.util

    from convrecipes.registry import did_you_mean

    if not log_with:
        return None
    names = [log_with] if isinstance(log_with, str) else list(log_with)
    for name in names:
        if name not in _TRACKER_PACKAGES:
            raise RecipeError(f"unknown tracker {name!r}{did_you_mean(name, _TRACKER_PACKAGES)} (trainer.log_with); "
                              f"valid: {', '.join(_TRACKER_PACKAGES)}")
        if importlib.util.find_spec(_TRACKER_PACKAGES[name]) is None:
            raise RecipeError(f"trainer.log_with={name} needs the {_TRACKER_PACKAGES[name]!r} package; install it "
                              f"(pip install {_TRACKER_PACKAGES[name]}) or unset trainer.log_with")
    return names


def build_model(recipe: Recipe, in_chans: int, num_classes: int, pretrained: Optional[bool] = None,
                pretrained_file: Optional[Path] = None) -> nn.Module:
    """The recipe's model for ``in_chans``-channel images and ``num_classes`` (with the
    embedding head its losses need).

    Args:
        pretrained: load timm's pretrained weights (None: ``model.pretrained``).
        pretrained_file: read them from this local file instead of downloading them (timm's
            loader: the stem adapted to ``in_chans``, a classifier of another size dropped).

    Raises:
        RecipeError: pretrained weights that cannot be downloaded (offline; the message
            names the local-file fix) or a file that does not fit the model.
    """
    from convrecipes.errors import ConvrecipesError

    m = recipe.model
    needs_embeddings, head_factory = _loss_needs(recipe)
    needs_embeddings = needs_embeddings or m.with_embeddings
    pretrained = m.pretrained if pretrained is None else pretrained
    kwargs = dict(m.kwargs)
    if pretrained_file is not None:
        pretrained = True
        kwargs["pretrained_cfg_overlay"] = {**dict(kwargs.get("pretrained_cfg_overlay") or {}),
                                            "file": str(pretrained_file)}
    try:
        return create_model(m.name, in_chans=in_chans, num_classes=num_classes, drop_rate=m.drop_rate,
                            drop_path_rate=m.drop_path_rate, pretrained=pretrained,
                            with_embeddings=needs_embeddings, embedding_dim=m.embedding_dim,
                            head_factory=head_factory, **kwargs)
    except ConvrecipesError:
        raise
    except Exception as exc:  # timm's download (huggingface_hub, urllib) or its loading of the file
        if not pretrained:
            raise
        if pretrained_file is not None:
            raise RecipeError(f"model.init_from {pretrained_file} could not be loaded into timm's {m.name!r} "
                              f"({type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}); use "
                              f"pretrained weights of this architecture (model.name={m.name})") from None
        from convrecipes.finetune import pretrained_download_error

        raise pretrained_download_error(m.name, exc) from None


def load_datasets(recipe: Recipe, splits: tuple[str, ...] = ("train", "test")) -> Datasets:
    """Load, subset and split the recipe's data (test always; train/val if asked)."""
    d = recipe.data
    kw = dict(data_dir=d.data_dir, download=d.download, image_size=d.image_size, channels=d.channels,
              unlabeled_folder=d.unlabeled_folder if d.name == "image_folder" else None)
    test = load_dataset(d.name, "test", **kw)
    if "train" not in splits:
        return Datasets(train=test, val=None, test=test)
    train = load_dataset(d.name, "train", **kw)
    if d.subset_fraction is not None or d.subset_per_class is not None:
        train = train.subset(subset_indices(train.labels, fraction=d.subset_fraction,
                                            per_class=d.subset_per_class, seed=recipe.seed))
    noise = None
    if d.label_noise is not None:
        train, noise = _inject_label_noise(train, recipe)
    val = None
    if d.val_fraction > 0:
        # stratified by the true labels, so the partition is the same with and without noise
        by = train.clean_labels if train.clean_labels is not None else train.labels
        train_idx, val_idx = stratified_split(by, d.val_fraction, seed=recipe.seed)
        train, val = train.subset(train_idx), train.subset(val_idx)
        if noise is not None:
            noise.extra["flipped_in_val"] = int((val.labels != val.clean_labels).sum())
            if d.label_noise.clean_val:  # the report still lists them: they were drawn flipped
                val.labels = val.clean_labels.clone()
                noise.extra["val_restored_to_clean"] = True
    unlabeled = None
    if d.labels_per_class is not None:
        # after the validation split: validation images are never unlabeled training data
        labeled_idx = _labeled_indices(train, d.labels_per_class, recipe.seed)
        rest = torch.ones(len(train), dtype=torch.bool)
        rest[labeled_idx] = False
        unlabeled = train.subset(rest.nonzero().squeeze(1)) if bool(rest.any()) else None
        train = train.subset(labeled_idx)
    if d.unlabeled_folder is not None:
        folder = _load_unlabeled_folder(recipe, train.classes)
        unlabeled = folder if unlabeled is None else _concat(unlabeled, folder)
    return Datasets(train=train, val=val, test=test, unlabeled=unlabeled, label_noise=noise)


def _inject_label_noise(train: ImageTensorDataset, recipe: Recipe) -> tuple[ImageTensorDataset, Any]:
    """``train`` with noisy labels (the true ones kept as ``clean_labels``) and the report,
    whose ``flipped`` are dataset indices (``train.indices``)."""
    import dataclasses

    from convrecipes.data.label_noise import LabelNoise, apply_label_noise

    noise = LabelNoise(**dataclasses.asdict(recipe.data.label_noise))
    noisy, report = apply_label_noise(train.labels, train.classes, noise, seed=recipe.seed)
    report.flipped = train.indices[torch.as_tensor(report.flipped, dtype=torch.long)].tolist()
    clean = train.labels.clone()
    return ImageTensorDataset(train.images, noisy, list(train.classes), clean_labels=clean, origin=train.origin,
                              files=train.files), report


def _labeled_indices(train: ImageTensorDataset, per_class: int, seed: int) -> torch.Tensor:
    """``per_class`` labeled images per class (stratified, seeded), with the recipe key in errors."""
    counts = torch.bincount(train.labels, minlength=train.num_classes)
    smallest = int(counts.argmin())
    if int(counts[smallest]) < per_class:
        raise RecipeError(f"data.labels_per_class={per_class} is more than class {train.classes[smallest]!r} has "
                          f"({int(counts[smallest])} training images after the validation split); use "
                          f"data.labels_per_class<={int(counts[smallest])}")
    return subset_indices(train.labels, per_class=per_class, seed=seed)


def _load_unlabeled_folder(recipe: Recipe, classes: list[str]) -> ImageTensorDataset:
    from convrecipes.data.datasets import DEFAULT_CACHE_DIR
    from convrecipes.data.image_folder import load_unlabeled_folder

    d = recipe.data
    if d.name != "image_folder" or not d.data_dir:
        raise RecipeError(f"data.unlabeled_folder is a subfolder of an image_folder dataset's data.data_dir, but "
                          f"the recipe uses dataset {d.name!r}; use data.labels_per_class=N to hide labels of "
                          f"{d.name}, or set data.name=image_folder and data.data_dir")
    return load_unlabeled_folder(d.data_dir, d.unlabeled_folder, image_size=d.image_size or 64,
                                 channels=d.channels or 3, cache_dir=DEFAULT_CACHE_DIR, classes=classes)


def _concat(a: ImageTensorDataset, b: ImageTensorDataset) -> ImageTensorDataset:
    if a.image_shape != b.image_shape:
        raise RecipeError(f"the unlabeled images have shape {b.image_shape} but the others {a.image_shape}; set "
                          f"data.image_size and data.channels so they match")
    return ImageTensorDataset(torch.cat([a.images, b.images]), torch.cat([a.labels, b.labels]), list(a.classes))


def _eval_loader(ds: ImageTensorDataset, recipe: Recipe, accelerator: Accelerator) -> InMemoryLoader:
    n = accelerator.num_processes
    batch = max(n, recipe.data.eval_batch_size // n * n)  # divisible by the process count
    return InMemoryLoader(ds, batch, shuffle=False, drop_last=False, num_replicas=n,
                          rank=accelerator.process_index, device=accelerator.device)


def _loss_needs(recipe: Recipe) -> tuple[bool, Any]:
    """Whether the recipe's losses need embeddings, and a head factory if one brings its own."""
    needs, head = False, None
    for term in loss_terms(recipe.loss):
        cls = LOSSES.get(term["name"])
        needs = needs or bool(getattr(cls, "needs_embeddings", False))
        if hasattr(cls, "make_head"):
            head = cls.make_head
    return needs, head


def build(recipe: Recipe, accelerator: Optional[Accelerator] = None, run_dir: Optional[Path] = None,
          datasets: Optional[Datasets] = None, init_weights: bool = True) -> Experiment:
    """Build data loaders, model, loss, optimizer, schedule, augmentation and trainer.

    Mean/std computed from the training data are written back into ``recipe.augment`` so
    the resolved recipe saved with the run reproduces the same normalisation at evaluation.

    Args:
        init_weights: start the model from ``model.init_from`` / ``model.pretrained``;
            False when a checkpoint will supply the weights anyway (a resume, an
            evaluation), so neither the file nor the network is needed.
    """
    from convrecipes.finetune import backbone_lr_mult_of, load_init_weights, resolve_init_source, setup_freezing

    if isinstance(recipe.optimizer.lr, str):
        raise RecipeError(f"optimizer.lr={recipe.optimizer.lr!r} must be resolved to a number before building: "
                          f"`convrecipes train` does it; in code call "
                          f"convrecipes.lr_finder.resolve_auto_lr(recipe, accelerator) first")
    init_source = None
    if init_weights and recipe.model.init_from:  # checked before any data is loaded
        init_source = resolve_init_source(recipe.model.init_from, recipe.model.name)
    accelerator = accelerator or make_accelerator(recipe, run_dir)
    apply_threads(recipe.trainer.threads)  # physical cores shared among this machine's processes
    if recipe.trainer.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    datasets = datasets or load_datasets(recipe)
    train, num_classes = datasets.train, datasets.num_classes
    channels, height, width = train.image_shape
    if recipe.augment.mean is None or recipe.augment.std is None:
        mean, std = dataset_mean_std(train.images)
        recipe.augment.mean = [round(m, 6) for m in mean]
        recipe.augment.std = [round(s, 6) for s in std]

    # data
    d = recipe.data
    sampler = None
    if d.pk is not None:
        if len(d.pk) != 2:
            raise RecipeError(f"recipe key 'data.pk' must be [P, K], got {d.pk}")
        try:
            sampler = PKBatchSampler(train.labels, p=d.pk[0], k=d.pk[1], seed=recipe.seed)
        except ValueError as exc:  # more classes or images per batch than the training split has
            raise RecipeError(f"data.pk={list(d.pk)} does not fit the training data: {exc}") from None
    batch_size = sampler.global_batch_size if sampler is not None else d.batch_size
    if batch_size % accelerator.num_processes:
        raise RecipeError(f"data.batch_size={batch_size} is not divisible by the {accelerator.num_processes} "
                          f"processes; use a multiple of {accelerator.num_processes}")
    train_loader = InMemoryLoader(train, batch_size, shuffle=True, drop_last=True, seed=recipe.seed,
                                  num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                                  device=accelerator.device, batch_sampler=sampler)
    if len(train_loader) == 0:
        raise RecipeError(f"the training set has {len(train)} images, fewer than one batch of {batch_size}; "
                          f"lower data.batch_size")
    trainer_cls = TRAINERS.get(recipe.trainer.name)
    if getattr(trainer_cls, "uses_unlabeled_data", False):
        train_loader = _semi_supervised_loader(recipe, train_loader, datasets.unlabeled, accelerator)
    val_loader = _eval_loader(datasets.val, recipe, accelerator) if datasets.val is not None else None
    test_loader = _eval_loader(datasets.test, recipe, accelerator)

    # model and loss (the loss decides whether the model must expose embeddings)
    set_seed(recipe.seed)  # identical initial weights on every process
    m = recipe.model
    needs_embeddings = _loss_needs(recipe)[0] or m.with_embeddings
    if init_source is not None:
        timm_file = init_source.file if init_source.kind == "timm" else None
        model = build_model(recipe, in_chans=channels, num_classes=num_classes, pretrained=False,
                            pretrained_file=timm_file)
    else:
        model = build_model(recipe, in_chans=channels, num_classes=num_classes,
                            pretrained=None if init_weights else False)
    init = None
    if init_source is not None and init_source.kind != "timm":
        init = load_init_weights(model, init_source, train.classes)
    elif init_source is not None:
        from convrecipes.checkpoint import file_sha256

        init = {"from": init_source.given, "file": str(init_source.file.resolve()),
                "sha256": file_sha256(init_source.file), "kind": "timm",
                "classifier": "timm's pretrained loader (re-initialised when the number of classes differs)"}
    freezer = setup_freezing(recipe, model)  # checked (patterns, stage count) before anything trains
    embedding_dim = None
    if needs_embeddings or m.embedding_dim is not None:
        embedding_dim = m.embedding_dim or model.backbone.num_features
    loss_fn = build_loss(recipe.loss, num_classes=num_classes, embedding_dim=embedding_dim)

    # optimizer and schedule
    o = recipe.optimizer
    lr = scaled_lr(o.lr, batch_size, o.reference_batch_size) if o.scale_lr_with_batch else o.lr
    extra = [{**group, "weight_decay": 0.0} for group in loss_param_groups(loss_fn)]
    # every parameter, frozen or not: unfreezing later only flips requires_grad (convrecipes.finetune)
    lr_mult = backbone_lr_mult_of(model, o.backbone_lr_mult) if o.backbone_lr_mult is not None else None
    optimizer = build_optimizer(model, o.name, lr=lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay, betas=o.betas, eps=o.eps,
                                decay_norm_and_bias=o.decay_norm_and_bias, extra_param_groups=extra,
                                lr_mult=lr_mult, fused=o.fused)
    t = recipe.trainer
    steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum_steps)
    s = recipe.schedule
    warmup_steps = round(s.warmup_epochs * steps_per_epoch)
    if warmup_steps and warmup_steps >= steps_per_epoch * t.epochs:
        raise RecipeError(f"schedule.warmup_epochs={s.warmup_epochs} leaves no training after the warmup in "
                          f"trainer.epochs={t.epochs}; lower schedule.warmup_epochs (e.g. schedule.warmup_epochs=0) "
                          f"or raise trainer.epochs")
    scheduler = build_scheduler(s.name, optimizer, total_steps=steps_per_epoch * t.epochs,
                                steps_per_epoch=steps_per_epoch,
                                warmup_steps=warmup_steps,
                                warmup_start_factor=s.warmup_start_factor, **s.params)

    # augmentation
    a = recipe.augment
    augment = build_augment(a.preset, image_size=(height, width), channels=channels, mean=a.mean, std=a.std,
                            num_classes=num_classes, hflip=a.hflip, mixup_alpha=a.mixup_alpha,
                            cutmix_alpha=a.cutmix_alpha, mix_prob=a.mix_prob, random_erasing=a.random_erasing)
    eval_transform = build_eval_transform(a.mean, a.std)

    # trainer
    callbacks: list = []
    if run_dir is not None:
        callbacks.append(ModelCheckpoint(run_dir, monitor=t.monitor if val_loader is not None else None,
                                         mode=t.monitor_mode, every_n_steps=t.checkpoint_every_steps))
    if t.early_stopping_patience is not None:
        callbacks.append(EarlyStopping(monitor=t.monitor, mode=t.monitor_mode, patience=t.early_stopping_patience))
    if datasets.label_noise is not None:  # the true labels are known: log the memorisation curve
        from convrecipes.trainers.memorisation import MemorisationCurve, flipped_subset

        flipped = flipped_subset(train, seed=recipe.seed)
        if flipped is not None:
            callbacks.append(MemorisationCurve(_eval_loader(flipped, recipe, accelerator), num_classes))
    if freezer is not None:  # last: the other callbacks keep their checkpoint keys (by index)
        callbacks.append(freezer)
    params = _trainer_params(recipe)
    if t.name in TRAINER_BUILDERS:
        ctx = TrainerContext(recipe, num_classes, channels, (height, width), list(a.mean), list(a.std),
                             accelerator.device, steps_per_epoch=steps_per_epoch, model=model, optimizer=optimizer)
        params = TRAINER_BUILDERS.get(t.name)(params, ctx)
    num_parameters = count_parameters(model)
    metadata = {
        "recipe": recipe_to_dict(recipe),
        "classes": train.classes,
        # what the model takes: `predict` and `export` prepare new images to this shape
        "image_shape": [channels, height, width],
        "num_parameters": num_parameters,
        "global_batch_size": batch_size,
        "num_processes": accelerator.num_processes,
    }
    if init is not None:
        metadata["init"] = init
    kwargs: dict[str, Any] = dict(scheduler=scheduler)
    kwargs.update(params)  # a builder may replace the schedule (e.g. MPL's, over its first stage)
    trainer = trainer_cls(
        model, optimizer, loss_fn, augment=augment, eval_transform=eval_transform,
        accelerator=accelerator, grad_accum_steps=t.grad_accum_steps, grad_clip=t.grad_clip,
        ema_decay=t.ema_decay, callbacks=callbacks, run_dir=run_dir, seed=recipe.seed,
        channels_last=m.channels_last, progress=t.progress, checkpoint_metadata=metadata,
        log_every_steps=t.log_every_steps, eval_every_epochs=t.eval_every_epochs,
        nan_check_every_steps=t.nan_check_every_steps, compile=t.compile, **kwargs,
    )
    if freezer is not None:
        # after the trainer prepared (DDP-wrapped) the model, so DDP registers the frozen
        # parameters too and syncs them once they unfreeze; before fit, so anything that
        # steps the trainer first (the LR finder) trains with them frozen as well
        freezer.apply(trainer.epoch)
    return Experiment(recipe, trainer, train_loader, val_loader, test_loader, datasets, num_parameters,
                      init=init, freezer=freezer)


def _trainer_params(recipe: Recipe) -> dict[str, Any]:
    """``trainer.params`` checked against the trainer's constructor (less the loop's own
    arguments, which come from the recipe's trainer section) plus its builder's recipe-only
    params, less the arguments its builder makes."""
    from convrecipes.registry import check_params as check

    name = recipe.trainer.name
    return check(f"trainer {name!r}", dict(recipe.trainer.params), trainer_recipe_params(name), key="trainer.params")


def trainer_recipe_params(name: str) -> dict[str, inspect.Parameter]:
    """The parameters ``trainer.params`` may set for trainer ``name``: its constructor's
    own (not the loop's, which come from the trainer section), plus its builder's
    recipe-only ones, less the arguments its builder makes."""
    valid = TRAINERS.params(name, exclude=inspect.signature(Trainer.__init__).parameters)
    if name in TRAINER_BUILDERS:
        builder = TRAINER_BUILDERS.get(name)
        for key in getattr(builder, "built_params", ()):
            valid.pop(key, None)
        for key, default in getattr(builder, "recipe_params", {}).items():
            valid[key] = inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, default=default)
    return valid


def _semi_supervised_loader(recipe: Recipe, labeled: InMemoryLoader, unlabeled: Optional[ImageTensorDataset],
                            accelerator: Accelerator) -> Any:
    """The labeled stream zipped with the unlabeled one, for trainers that use both."""
    from convrecipes.data.semi_supervised import UNLABELED_SEED_OFFSET, SemiSupervisedLoader

    d = recipe.data
    if unlabeled is None or len(unlabeled) == 0:
        raise RecipeError(f"trainer {recipe.trainer.name!r} trains on unlabeled images too, but the recipe has "
                          f"none: set data.labels_per_class=N (keep N labels per class; the rest of the training "
                          f"split becomes unlabeled, and must not be all of it) or, for image_folder, "
                          f"data.unlabeled_folder=<subfolder of data.data_dir with the unlabeled images>")
    batch = d.unlabeled_batch_size or 4 * d.batch_size
    if batch % accelerator.num_processes:
        raise RecipeError(f"data.unlabeled_batch_size={batch} is not divisible by the {accelerator.num_processes} "
                          f"processes; use a multiple of {accelerator.num_processes}")
    if len(unlabeled) < batch:
        raise RecipeError(f"there are {len(unlabeled)} unlabeled images, fewer than one unlabeled batch of {batch}; "
                          f"lower data.unlabeled_batch_size")
    stream = InMemoryLoader(unlabeled, batch, shuffle=True, drop_last=True, seed=recipe.seed + UNLABELED_SEED_OFFSET,
                            num_replicas=accelerator.num_processes, rank=accelerator.process_index,
                            device=accelerator.device)
    return SemiSupervisedLoader(labeled, stream)


def build_for_evaluation(recipe: Recipe, accelerator: Optional[Accelerator] = None) -> Experiment:
    """Like ``build`` but loads only the test split (mean/std must be in the recipe)."""
    if recipe.augment.mean is None or recipe.augment.std is None:
        raise RecipeError("the recipe has no augment.mean/std; evaluate a run directory or checkpoint written by "
                          "`convrecipes train`, which records them")
    accelerator = accelerator or make_accelerator(recipe)
    datasets = load_datasets(recipe, splits=("test",))
    recipe.data.val_fraction = 0.0
    # evaluating a model needs no training algorithm (a distillation run's teacher may be gone)
    recipe.trainer.name, recipe.trainer.params = "supervised", {}
    recipe.trainer.ema_decay = None
    # nor the weights it started from (the checkpoint replaces them) nor its frozen layers
    recipe.model.freeze_stages, recipe.model.freeze, recipe.model.unfreeze_epoch = None, [], None
    # the test split stands in for the (unused) training loader: a test set smaller than the
    # training batch, or than a P x K batch, must not stop an evaluation
    recipe.data.pk = None
    per_process = max(1, len(datasets.test) // accelerator.num_processes)
    if recipe.data.batch_size > per_process * accelerator.num_processes:
        recipe.data.batch_size = per_process * accelerator.num_processes
    return build(recipe, accelerator=accelerator, datasets=datasets, init_weights=False)


def module_summary(model: nn.Module) -> str:
    """``"<class> with N parameters"``."""
    return f"{type(model).__name__} with {count_parameters(model):,} parameters"
