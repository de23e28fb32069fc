"""Recipes: a typed config (dataclasses) read from YAML, ``key=value`` overrides, validation.

A recipe names everything an experiment needs (data, model, optimizer, schedule, augment,
trainer, loss). Mistakes end in one ``RecipeError`` naming the key and the valid choices;
the CLI prints it and exits with code 2. ``convrecipes.build`` turns a recipe into objects.
"""

from __future__ import annotations

import dataclasses
import difflib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import yaml

from convrecipes.errors import RecipeError


def _key(default: Any = dataclasses.MISSING, *, doc: str, factory: Any = dataclasses.MISSING) -> Any:
    """A recipe key: its default (or ``factory`` for a list or mapping) and its one-line
    help, which ``convrecipes show`` prints (``schema_keys``); every key has one."""
    return field(default=default, default_factory=factory, metadata={"help": doc})


@dataclass
class LabelNoiseConfig:
    """Injected label noise, for experiments (``convrecipes.data.label_noise``): applied to
    the training split (validation included, unless ``clean_val``), seeded, recorded in the
    run directory as ``label_noise.json``. The test split stays clean."""

    kind: str = _key("symmetric", doc="symmetric, pair or permutation")
    rate: float = _key(0.2, doc="flip probability, in [0, 1)")
    seed: Optional[int] = _key(None, doc="seed of the flips; null: the recipe's seed")
    pairs: Any = _key(None, doc="pair noise: {shirt: t_shirt} or [\"shirt<->t_shirt\"]; null: class i -> i + 1")
    permutation: Optional[list[int]] = _key(None, doc="permutation noise's derangement; null: drawn from the seed")
    clean_val: bool = _key(False, doc="keep the validation split's labels clean")


@dataclass
class DataConfig:
    """Which images, how they are split and batched."""

    name: str = _key("digits", doc="a registered dataset: digits, fashion_mnist, cifar10, cifar100, image_folder, "
                                   "font_glyphs")
    data_dir: Optional[str] = _key(None, doc="where the files are (image_folder: the folder with one subfolder per "
                                             "class, or train/ and test/ folders of them)")
    download: bool = _key(False, doc="let torchvision download when the files are absent (needs internet)")
    image_size: Optional[int] = _key(None, doc="resize to this square once at load time (null: native size; "
                                               "image_folder: 64)")
    channels: Optional[int] = _key(None, doc="convert to 1 (grayscale) or 3 (RGB) channels (null: native; "
                                             "image_folder: 3)")
    val_fraction: float = _key(0.1, doc="stratified validation split carved from the training set")
    subset_fraction: Optional[float] = _key(None, doc="train on a stratified fraction of the training set")
    subset_per_class: Optional[int] = _key(None, doc="... or on this many images per class")
    batch_size: int = _key(128, doc="GLOBAL training batch size (split across processes)")
    eval_batch_size: int = _key(512, doc="GLOBAL batch size of validation and test")
    pk: Optional[list[int]] = _key(None, doc="[P, K]: batches of P classes x K images (metric losses)")
    labels_per_class: Optional[int] = _key(None, doc="semi-supervised (trainers uda, mpl): keep this many labels per "
                                                     "class (stratified, seeded) and use the rest unlabeled")
    unlabeled_folder: Optional[str] = _key(None, doc="image_folder: a subfolder of data_dir holding unlabeled images")
    unlabeled_batch_size: Optional[int] = _key(None, doc="GLOBAL unlabeled batch per step (null: 4 x batch_size)")
    label_noise: Optional[LabelNoiseConfig] = _key(None, doc="inject label noise into the training split "
                                                             "(experiments); setting any of its keys turns it on")


@dataclass
class ModelConfig:
    """Any timm model name (ours included) and its construction arguments."""

    name: str = _key("tiny_cnn", doc="any timm model name (ours included: tiny_cnn, small_resnet8/14/20/32, "
                                     "small_mlp)")
    pretrained: bool = _key(False, doc="start from timm's pretrained weights (downloads them; offline: "
                                       "model.init_from=<local .safetensors>)")
    drop_rate: float = _key(0.0, doc="dropout before the classifier")
    drop_path_rate: float = _key(0.0, doc="stochastic depth over the residual blocks (models that have them)")
    embedding_dim: Optional[int] = _key(None, doc="add a linear embedding layer of this width (e.g. 2 for plots)")
    with_embeddings: bool = _key(False, doc="return ModelOutput(logits, embeddings) even if the loss does not "
                                            "need them")
    channels_last: bool = _key(True, doc="channels-last memory format (faster convolutions on GPUs)")
    kwargs: dict[str, Any] = _key(factory=dict, doc="passed to the model constructor (e.g. {width: 32} for ours); "
                                                    "another model.name may need model.kwargs={}")
    # fine-tuning: convrecipes.finetune
    init_from: Optional[str] = _key(None, doc="start from these weights: a run directory or .safetensors of "
                                              "`convrecipes train` (a new classifier when the classes differ), or "
                                              "local timm pretrained weights")
    freeze_stages: Optional[int] = _key(None, doc="freeze the first N stages of the backbone (timm's stage groups; "
                                                  "never the classifier), their norm layers in eval mode")
    freeze: Union[list[str], str] = _key(factory=list, doc="... and/or freeze the parameters whose names match these "
                                                           "patterns (fnmatch; \"re:\" for a regex), e.g. "
                                                           "[\"stem.*\"]")
    unfreeze_epoch: Optional[int] = _key(None, doc="the first epoch (from 1) in which the frozen layers train too; "
                                                   "null: frozen for the whole run")


@dataclass
class OptimizerConfig:
    """Optimizer (built with timm's optimizer factory)."""

    name: str = _key("sgd", doc="sgd, adamw, adam, adamax")
    lr: Union[float, str] = _key(0.1, doc="learning rate, or auto: `convrecipes train` runs the LR range test "
                                          "first and takes its suggestion")
    momentum: float = _key(0.9, doc="SGD momentum")
    nesterov: bool = _key(True, doc="SGD: Nesterov momentum")
    weight_decay: float = _key(5e-4, doc="L2 weight decay (decoupled for adamw)")
    betas: list[float] = _key(factory=lambda: [0.9, 0.999], doc="Adam-family betas")
    eps: float = _key(1e-8, doc="Adam-family epsilon")
    decay_norm_and_bias: bool = _key(False, doc="also decay norm and bias parameters (by default they get none)")
    scale_lr_with_batch: bool = _key(False, doc="linear scaling: lr * batch_size / reference_batch_size")
    reference_batch_size: int = _key(256, doc="the batch size lr is given for, when scale_lr_with_batch")
    backbone_lr_mult: Optional[float] = _key(None, doc="fine-tuning: the backbone trains at lr * this, the "
                                                       "classifier at lr (null: one LR for all)")
    fused: Optional[bool] = _key(None, doc="update all parameters in one fused kernel (same arithmetic); null: "
                                           "fused adam/adamw, foreach kernels otherwise; true also for sgd when "
                                           "every parameter trains from the first step")


@dataclass
class ScheduleConfig:
    """Learning-rate schedule, stepped per optimizer step."""

    name: str = _key("cosine", doc="a registered schedule: constant, cosine, cyclic, linear, multistep, "
                                     "one_cycle, reduce_on_plateau, step")
    warmup_epochs: float = _key(0.0, doc="linear warmup before the schedule, in epochs (fractions allowed)")
    warmup_start_factor: float = _key(0.0, doc="the warmup's first LR as a fraction of the schedule's first LR")
    params: dict[str, Any] = _key(factory=dict, doc="the schedule's own arguments (listed below by name)")


@dataclass
class AugmentConfig:
    """Batch augmentation on the device."""

    preset: str = _key("light", doc="none, light (pad-crop, flip), standard (resized crop, flip, color jitter), "
                                    "strong (standard + RandAugment-like)")
    hflip: bool = _key(True, doc="random horizontal flips; false where a mirror image is another class (digits, "
                                 "text)")
    mixup_alpha: float = _key(0.0, doc="mixup's Beta(alpha, alpha) (0: off)")
    cutmix_alpha: float = _key(0.0, doc="cutmix's Beta(alpha, alpha) (0: off)")
    mix_prob: float = _key(1.0, doc="probability that a batch is mixed (when mixup/cutmix is on)")
    random_erasing: Optional[float] = _key(None, doc="random erasing probability; null: the preset's default")
    mean: Optional[list[float]] = _key(None, doc="per-channel normalisation mean; null: computed from the training "
                                                 "set")
    std: Optional[list[float]] = _key(None, doc="per-channel normalisation std; null: computed from the training set")


@dataclass
class TrainerConfig:
    """The training algorithm and the loop's settings."""

    name: str = _key("supervised", doc="the training algorithm: supervised, distillation, uda, mpl, bootstrapping, "
                                       "freeze_drop_path")
    epochs: int = _key(10, doc="training epochs (a resume continues up to this many)")
    grad_accum_steps: int = _key(1, doc="accumulate gradients over N batches per optimizer step")
    grad_clip: Optional[float] = _key(None, doc="clip the gradients' global norm to this (null: no clipping)")
    mixed_precision: Optional[str] = _key(None, doc="no, fp16, bf16; null: `accelerate launch` decides")
    ema_decay: Optional[float] = _key(None, doc="keep an EMA of the weights with this decay, also tested (null: none)")
    checkpoint_every_steps: Optional[int] = _key(None, doc="also write last.safetensors every N optimizer steps")
    monitor: str = _key("val_top1", doc="the metric selecting best.safetensors (and early stopping)")
    monitor_mode: str = _key("max", doc="max or min: whether a larger monitor value is better")
    early_stopping_patience: Optional[int] = _key(None, doc="stop after N validations without improvement (null: "
                                                            "never)")
    deterministic: bool = _key(False, doc="torch.use_deterministic_algorithms (slower, reproducible on GPUs)")
    progress: bool = _key(True, doc="show progress: a bar on a terminal, a plain line every log_every_steps "
                                    "otherwise (logs)")
    find_unused_parameters: bool = _key(False, doc="DDP: for steps that leave some parameters without gradient")
    log_with: Union[str, list[str], None] = _key(None, doc="Accelerate trackers: tensorboard, wandb, mlflow, ... "
                                                           "(files in the run dir)")
    log_every_steps: int = _key(10, doc="every N steps: log loss and LR to the trackers, and print a progress line "
                                        "when the output is not a terminal")
    eval_every_epochs: int = _key(1, doc="validate every N epochs and after the last (training is unchanged by it)")
    collective_timeout_s: int = _key(600, doc="several processes: how long one waits for a stalled other, in "
                                              "seconds (torch: 1800)")
    nan_check_every_steps: Optional[int] = _key(None, doc="check the loss for inf/nan every N steps, at epoch ends "
                                                          "and before every checkpoint (one host sync each); null: "
                                                          "log_every_steps; 1: every step, before its update")
    threads: Optional[int] = _key(None, doc="torch's compute threads per process; null: OMP_NUM_THREADS if set, else "
                                            "the physical cores available divided among this machine's processes")
    compile: bool = _key(False, doc="torch.compile the trainable models (the first steps compile; checkpoints stay "
                                    "plain)")
    params: dict[str, Any] = _key(factory=dict, doc="the trainer's own arguments (listed below by name)")


@dataclass
class Recipe:
    """A complete experiment."""

    name: str = _key("recipe", doc="the recipe's name (default: its file's); runs are called "
                                   "<output_dir>/<name>-<timestamp> (image_folder: after the data folder)")
    description: str = _key("", doc="one line saying what the recipe trains (`convrecipes recipes` lists it)")
    seed: int = _key(0, doc="seed of the weights, the data order, the splits and the augmentation")
    output_dir: str = _key("runs", doc="where run directories are created")
    data: DataConfig = _key(factory=DataConfig, doc="which images, how they are split and batched")
    model: ModelConfig = _key(factory=ModelConfig, doc="the network")
    optimizer: OptimizerConfig = _key(factory=OptimizerConfig, doc="the optimizer (timm's optimizer factory)")
    schedule: ScheduleConfig = _key(factory=ScheduleConfig, doc="the learning-rate schedule, stepped per optimizer "
                                                                "step")
    augment: AugmentConfig = _key(factory=AugmentConfig, doc="batch augmentation on the device, and normalisation")
    trainer: TrainerConfig = _key(factory=TrainerConfig, doc="the training algorithm and the loop's settings")
    loss: Any = _key(factory=lambda: {"name": "cross_entropy"}, doc="one loss {name, weight, params} or a list of "
                                                                    "them (a weighted sum)")


#: the keys of one loss term (``loss``, or ``loss.<i>`` in a list) and their help
LOSS_TERM_HELP = {
    "name": "a registered loss, e.g. cross_entropy, label_smoothing_ce, hinge, center, triplet (docs/losses.md)",
    "weight": "the term's weight in the sum (default 1.0)",
    "params": "the loss's own arguments (listed below by name)",
}


def schema_keys(cls: Any = None, prefix: str = "") -> dict[str, str]:
    """Every recipe key, dotted (``data.image_size``), with its one-line help, in schema order.

    Sections (``data``) are keys too, and so are the keys inside an optional section
    (``data.label_noise.rate``).
    """
    cls = Recipe if cls is None else cls
    hints = typing.get_type_hints(cls)
    keys: dict[str, str] = {}
    for f in dataclasses.fields(cls):
        full = f"{prefix}{f.name}"
        keys[full] = f.metadata.get("help", "")
        section = _section_type(hints[f.name])
        if section is not None:
            keys.update(schema_keys(section, f"{full}."))
    return keys


def _section_type(tp: Any) -> Any:
    """The dataclass a field holds (``X`` or ``Optional[X]``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    options = [a for a in typing.get_args(tp) if a is not type(None)] if typing.get_origin(tp) is Union else []
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


_CHOICES = {
    "trainer.mixed_precision": (None, "no", "fp16", "bf16"),
    "trainer.monitor_mode": ("min", "max"),
}


# -- reading -----------------------------------------------------------------------------
def recipe_search_dirs() -> list[Path]:
    """Where bare recipe names are looked up: ./recipes, then the repository's recipes/."""
    return [Path.cwd() / "recipes", Path(__file__).resolve().parent.parent / "recipes"]


def resolve_recipe_path(name_or_path: Union[str, Path]) -> Path:
    """A recipe file from a path or a bare name such as ``quickstart``."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    for folder in recipe_search_dirs():
        for candidate in (folder / f"{name_or_path}.yaml", folder / str(name_or_path)):
            if candidate.is_file():
                return candidate
    known = sorted({p.stem for d in recipe_search_dirs() if d.is_dir() for p in d.glob("*.yaml")})
    raise RecipeError(f"no recipe file {str(name_or_path)!r}; pass a YAML path or one of: {', '.join(known) or '(none found)'}")


def load_recipe(name_or_path: Union[str, Path], overrides: typing.Sequence[str] = ()) -> Recipe:
    """Read a YAML recipe (following ``base:``), apply ``key=value`` overrides and validate it."""
    path = resolve_recipe_path(name_or_path)
    raw = _read_raw(path, chain=())
    if not raw:
        raise RecipeError(f"recipe file {path} is empty; write the recipe's sections in it (see recipes/quickstart.yaml) "
                          f"or start from one with `base: quickstart`")
    raw["name"] = raw.get("name") or path.stem
    return recipe_from_dict(apply_overrides(raw, overrides))


def _read_raw(path: Path, chain: tuple[Path, ...]) -> dict[str, Any]:
    """A recipe file as a dict; ``base: other`` merges this file's keys over ``other``'s."""
    if path.resolve() in chain:
        raise RecipeError(f"recipe {path} inherits from itself through 'base' ({' -> '.join(map(str, chain))})")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise RecipeError(f"{path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path} must hold a mapping of recipe keys, got {type(raw).__name__}")
    base = raw.pop("base", None)
    if base is None:
        return raw
    base_path = path.parent / f"{base}.yaml" if (path.parent / f"{base}.yaml").is_file() else resolve_recipe_path(base)
    parent = _read_raw(base_path, chain + (path.resolve(),))
    parent.pop("name", None)
    parent.pop("description", None)
    return _deep_merge(parent, raw)


def _deep_merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``; sections merge key by key, other values (lists, the loss) replace."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict) and key != "loss":
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def recipe_from_dict(raw: dict[str, Any]) -> Recipe:
    """Validate a nested dict into a ``Recipe``: keys, types, names' shape and every
    value's range, so nothing bad reaches training."""
    recipe = _to_dataclass(Recipe, raw, "")
    _validate_loss(recipe.loss)
    _validate_lr(recipe.optimizer)
    _validate_ranges(recipe)
    _validate_label_noise(recipe.data.label_noise)
    _validate_finetune(recipe)
    return recipe


def freeze_patterns(model: ModelConfig) -> list[str]:
    """``model.freeze`` as a list of patterns (a single string is one pattern)."""
    return [model.freeze] if isinstance(model.freeze, str) else list(model.freeze)


def _validate_finetune(recipe: Recipe) -> None:
    m = recipe.model
    if any(not p.strip() for p in freeze_patterns(m)):
        raise RecipeError("recipe key 'model.freeze' holds an empty pattern; give parameter-name patterns such as "
                          "model.freeze=[\"features.0.*\"]")
    if m.init_from is not None and not m.init_from.strip():
        raise RecipeError("recipe key 'model.init_from' is empty; give a run directory or .safetensors file, or null")
    if m.unfreeze_epoch is not None:
        if not m.freeze_stages and not freeze_patterns(m):
            raise RecipeError(f"model.unfreeze_epoch={m.unfreeze_epoch} but nothing is frozen; set "
                              f"model.freeze_stages=N or model.freeze=[patterns], or drop model.unfreeze_epoch")
        if m.unfreeze_epoch > recipe.trainer.epochs:
            raise RecipeError(f"model.unfreeze_epoch={m.unfreeze_epoch} comes after the last epoch "
                              f"(trainer.epochs={recipe.trainer.epochs}), so the frozen layers would never train; "
                              f"lower it, or drop model.unfreeze_epoch to keep them frozen for the whole run")


NOISE_KINDS = ("symmetric", "pair", "permutation")  # convrecipes.data.label_noise.NOISE_KINDS


def _validate_label_noise(noise: Optional[LabelNoiseConfig]) -> None:
    if noise is None:
        return
    if noise.kind not in NOISE_KINDS:
        close = difflib.get_close_matches(noise.kind, NOISE_KINDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise RecipeError(f"unknown label noise kind {noise.kind!r}{hint} (data.label_noise.kind); valid: "
                          f"{', '.join(NOISE_KINDS)}")
    if not 0.0 <= noise.rate < 1.0:
        raise RecipeError(f"recipe key 'data.label_noise.rate' must be in [0, 1), got {noise.rate!r}; e.g. "
                          f"data.label_noise.rate=0.44 (a rate of 1 leaves no correct label to learn from)")
    if noise.pairs is not None and noise.kind != "pair":
        raise RecipeError(f"data.label_noise.pairs is for kind 'pair', but kind is {noise.kind!r}; remove pairs or "
                          f"set data.label_noise.kind=pair")
    if noise.permutation is not None and noise.kind != "permutation":
        raise RecipeError(f"data.label_noise.permutation is for kind 'permutation', but kind is {noise.kind!r}; "
                          f"remove it or set data.label_noise.kind=permutation")


# (key, test, what it must be, a good example): checked after the types
_RANGES: list[tuple[str, Any, str, str]] = [
    ("data.batch_size", lambda v: v >= 1, "an integer >= 1", "data.batch_size=128"),
    ("data.eval_batch_size", lambda v: v >= 1, "an integer >= 1", "data.eval_batch_size=512"),
    ("data.val_fraction", lambda v: 0.0 <= v < 1.0, "in [0, 1)", "data.val_fraction=0.1"),
    ("data.subset_fraction", lambda v: v is None or 0.0 < v <= 1.0, "in (0, 1] or null", "data.subset_fraction=0.1"),
    ("data.subset_per_class", lambda v: v is None or v >= 1, "an integer >= 1 or null", "data.subset_per_class=100"),
    ("data.image_size", lambda v: v is None or v >= 1, "an integer >= 1 or null", "data.image_size=32"),
    ("data.channels", lambda v: v in (None, 1, 3), "1, 3 or null", "data.channels=3"),
    ("data.labels_per_class", lambda v: v is None or v >= 1, "an integer >= 1 or null", "data.labels_per_class=40"),
    ("data.unlabeled_batch_size", lambda v: v is None or v >= 1, "an integer >= 1 or null",
     "data.unlabeled_batch_size=256"),
    ("data.pk", lambda v: v is None or (len(v) == 2 and min(v) >= 1), "[P, K] with P, K >= 1 or null",
     "data.pk=[8,4]"),
    ("model.drop_rate", lambda v: 0.0 <= v < 1.0, "in [0, 1)", "model.drop_rate=0.1"),
    ("model.drop_path_rate", lambda v: 0.0 <= v < 1.0, "in [0, 1)", "model.drop_path_rate=0.1"),
    ("model.embedding_dim", lambda v: v is None or v >= 1, "an integer >= 1 or null", "model.embedding_dim=2"),
    ("model.freeze_stages", lambda v: v is None or v >= 1, "an integer >= 1 or null", "model.freeze_stages=2"),
    # epoch 1 would unfreeze before anything trained frozen
    ("model.unfreeze_epoch", lambda v: v is None or v >= 2, "an integer >= 2 (the first epoch that trains the "
     "frozen layers, counted from 1) or null", "model.unfreeze_epoch=3"),
    ("optimizer.backbone_lr_mult", lambda v: v is None or v > 0, "a number > 0 or null (to hold layers fixed, "
     "freeze them: model.freeze_stages)", "optimizer.backbone_lr_mult=0.1"),
    ("optimizer.lr", lambda v: isinstance(v, str) or v > 0, "a number > 0 or auto", "optimizer.lr=0.05"),
    ("optimizer.momentum", lambda v: 0.0 <= v < 1.0, "in [0, 1)", "optimizer.momentum=0.9"),
    ("optimizer.weight_decay", lambda v: v >= 0.0, ">= 0", "optimizer.weight_decay=5e-4"),
    ("optimizer.betas", lambda v: len(v) == 2 and all(0.0 <= b < 1.0 for b in v), "two numbers in [0, 1)",
     "optimizer.betas=[0.9,0.999]"),
    ("optimizer.eps", lambda v: v > 0.0, "> 0", "optimizer.eps=1e-8"),
    ("optimizer.reference_batch_size", lambda v: v >= 1, "an integer >= 1", "optimizer.reference_batch_size=256"),
    ("schedule.warmup_epochs", lambda v: v >= 0.0, ">= 0", "schedule.warmup_epochs=1"),
    ("schedule.warmup_start_factor", lambda v: 0.0 <= v <= 1.0, "in [0, 1]", "schedule.warmup_start_factor=0.1"),
    ("augment.mix_prob", lambda v: 0.0 <= v <= 1.0, "in [0, 1]", "augment.mix_prob=1.0"),
    ("augment.mixup_alpha", lambda v: v >= 0.0, ">= 0", "augment.mixup_alpha=0.2"),
    ("augment.cutmix_alpha", lambda v: v >= 0.0, ">= 0", "augment.cutmix_alpha=1.0"),
    ("augment.random_erasing", lambda v: v is None or 0.0 <= v <= 1.0, "in [0, 1] or null",
     "augment.random_erasing=0.25"),
    ("trainer.epochs", lambda v: v >= 1, "an integer >= 1", "trainer.epochs=10"),
    ("trainer.grad_accum_steps", lambda v: v >= 1, "an integer >= 1", "trainer.grad_accum_steps=2"),
    ("trainer.grad_clip", lambda v: v is None or v > 0.0, "a number > 0 or null", "trainer.grad_clip=1.0"),
    ("trainer.ema_decay", lambda v: v is None or 0.0 < v < 1.0, "in (0, 1) or null", "trainer.ema_decay=0.999"),
    ("trainer.checkpoint_every_steps", lambda v: v is None or v >= 1, "an integer >= 1 or null",
     "trainer.checkpoint_every_steps=500"),
    ("trainer.early_stopping_patience", lambda v: v is None or v >= 1, "an integer >= 1 or null",
     "trainer.early_stopping_patience=5"),
    ("trainer.log_every_steps", lambda v: v >= 1, "an integer >= 1", "trainer.log_every_steps=10"),
    ("trainer.eval_every_epochs", lambda v: v >= 1, "an integer >= 1", "trainer.eval_every_epochs=5"),
    ("trainer.collective_timeout_s", lambda v: v >= 1, "an integer >= 1 (seconds)", "trainer.collective_timeout_s=600"),
    ("trainer.nan_check_every_steps", lambda v: v is None or v >= 1, "an integer >= 1 or null",
     "trainer.nan_check_every_steps=10"),
    ("trainer.threads", lambda v: v is None or v >= 1, "an integer >= 1 or null", "trainer.threads=2"),
]


def _validate_ranges(recipe: Recipe) -> None:
    for key, ok, must, example in _RANGES:
        section, name = key.split(".")
        value = getattr(getattr(recipe, section), name)
        if not ok(value):
            raise RecipeError(f"recipe key {key!r} must be {must}, got {value!r}; e.g. {example}")


def recipe_to_dict(recipe: Recipe) -> dict[str, Any]:
    """The recipe as plain data (for YAML/JSON)."""
    return dataclasses.asdict(recipe)


def dump_recipe(recipe: Recipe, path: Union[str, Path]) -> None:
    """Write the resolved recipe as YAML."""
    Path(path).write_text(yaml.safe_dump(recipe_to_dict(recipe), sort_keys=False))


def parse_override(text: str) -> tuple[str, Any]:
    """``"optimizer.lr=0.1"`` -> ``("optimizer.lr", 0.1)``; values are read as YAML."""
    if "=" not in text:
        raise RecipeError(f"override {text!r} is not key=value (e.g. optimizer.lr=0.05)")
    key, value = text.split("=", 1)
    key = key.strip()
    if not key:
        raise RecipeError(f"override {text!r} has an empty key")
    try:
        return key, yaml.safe_load(value) if value.strip() else None
    except yaml.YAMLError:
        return key, value


def apply_overrides(raw: dict[str, Any], overrides: typing.Sequence[str]) -> dict[str, Any]:
    """Set each ``a.b.c=value`` in the nested dict (list items by index: ``loss.1.weight``)."""
    for text in overrides:
        key, value = parse_override(text)
        node: Any = raw
        parts = key.split(".")
        for depth, part in enumerate(parts[:-1]):
            where = ".".join(parts[: depth + 1])
            if isinstance(node, list):
                node = _list_item(node, part, where)
            else:
                child = node.get(part)
                if child is None:
                    child = node[part] = {}
                if not isinstance(child, (dict, list)):
                    raise RecipeError(f"recipe key {where!r} is a value, not a section; cannot set {key!r}")
                node = child
        last = parts[-1]
        if isinstance(node, list):
            node[int(_list_index(node, last, key))] = value
        else:
            node[last] = value
    return raw


def _list_index(node: list, part: str, where: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise RecipeError(f"recipe key {where!r}: {part!r} is not an index of a {len(node)}-item list")
    return int(part)


def _list_item(node: list, part: str, where: str) -> Any:
    return node[_list_index(node, part, where)]


# -- validation --------------------------------------------------------------------------
def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_name(a) for a in args) + (" (or null)" if type(None) in typing.get_args(tp) else "")
    if origin in (list, tuple):
        return f"a list of {_type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    return {bool: "true/false", int: "an integer", float: "a number", str: "a string"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp: Any, key: str) -> Any:
    if tp is Any:
        return value
    origin = typing.get_origin(tp)
    if origin is Union:
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        options = [a for a in args if a is not type(None)]
        if len(options) == 1 and dataclasses.is_dataclass(options[0]):
            return _coerce(value, options[0], key)  # an optional section: its own message (e.g. an unknown key)
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except RecipeError as exc:
                errors.append(exc)
        raise RecipeError(f"recipe key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key {key!r} is a section; give it a mapping of keys, got {value!r}")
        return _to_dataclass(tp, value, key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise RecipeError(f"recipe key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
        (item_tp,) = typing.get_args(tp)[:1]
        return [_coerce(v, item_tp, f"{key}.{i}") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"recipe key {key!r} must be a mapping, got {value!r} ({type(value).__name__})")
        return dict(value)
    if tp is float and isinstance(value, str):
        # YAML 1.1 reads 1e-3 (no dot in the mantissa) as a string; users write it all the time
        try:
            value = float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }.get(tp)
    if not ok:
        raise RecipeError(f"recipe key {key!r} must be {_type_name(tp)}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _to_dataclass(cls: Any, raw: dict[str, Any], prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            where = f"in section {prefix!r}" if prefix else "at the top level"
            raise RecipeError(f"unknown recipe key {full!r}{hint}; valid keys {where}: {', '.join(sorted(fields))}")
        kwargs[key] = _coerce(value, hints[key], full)
        if full in _CHOICES and kwargs[key] not in _CHOICES[full]:
            valid = ", ".join("null" if c is None else str(c) for c in _CHOICES[full])
            raise RecipeError(f"recipe key {full!r} must be one of {valid}, got {kwargs[key]!r}")
    return cls(**kwargs)


def loss_terms(spec: Any) -> list[dict[str, Any]]:
    """The loss spec as a list of ``{name, weight, params}`` terms."""
    return list(spec) if isinstance(spec, list) else [spec]


AUTO_LR = "auto"


def _validate_lr(optimizer: OptimizerConfig) -> None:
    """``optimizer.lr`` is a number or ``auto`` (resolved by an LR range test before building)."""
    if isinstance(optimizer.lr, str) and optimizer.lr != AUTO_LR:
        raise RecipeError(f"recipe key 'optimizer.lr' must be a number or {AUTO_LR!r} (run the LR range test and "
                          f"train with its suggestion), got {optimizer.lr!r}")


def _validate_loss(spec: Any) -> None:
    terms = loss_terms(spec)
    if not terms:
        raise RecipeError("recipe key 'loss' is empty; name at least one loss, e.g. loss.name=cross_entropy")
    for i, term in enumerate(terms):
        where = "loss" if not isinstance(spec, list) else f"loss.{i}"
        if not isinstance(term, dict) or "name" not in term:
            raise RecipeError(f"recipe key {where!r} must be a mapping with a 'name' (and optional 'weight', "
                              f"'params'), got {term!r}")
        unknown = set(term) - {"name", "weight", "params"}
        if unknown:
            raise RecipeError(f"unknown recipe key '{where}.{sorted(unknown)[0]}'; valid keys in a loss: name, weight, params")
        _coerce(term["name"], str, f"{where}.name")
        if "weight" in term:
            _coerce(term["weight"], float, f"{where}.weight")
        if "params" in term:
            _coerce(term["params"], dict[str, Any], f"{where}.params")
