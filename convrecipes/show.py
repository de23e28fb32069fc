"""``convrecipes show`` and ``convrecipes train --dry-run``: what a recipe will do, before it does it.

``format_recipe`` lists every key of a resolved recipe (overrides applied) as
``key=value  # help``, one per line, so any line can be copied back as an override; the
help comes from the schema (``convrecipes.recipe.schema_keys``). Below it, the parameters
the recipe's trainer, schedule and losses take (from their registries, with their
defaults and the first line of their docstring), marking those the recipe sets.
``dry_run_report`` builds the experiment as ``convrecipes train`` would (data, model,
loss, optimizer, schedule, trainer) without training or creating a run directory, and
sums up the data and the model.
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import math
import re
import typing
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from convrecipes.recipe import LOSS_TERM_HELP, Recipe, loss_terms, schema_keys

#: key=value columns wider than this push their help further right instead of widening every line
_KEY_COLUMN = 48
_MAX_CLASSES_LISTED = 12


def format_value(value: Any) -> str:
    """``value`` as a recipe override reads it back (YAML flow style: ``null``, ``[0.9, 0.999]``,
    ``{width: 16}``)."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**9, sort_keys=False).strip()
    return text[: -len("...")].rstrip() if text.endswith("\n...") else text


def _rows_of(obj: Any, prefix: str, help_of: dict[str, str]) -> list[tuple[str, Optional[str], str]]:
    """``(dotted key, value, help)`` of a schema section, its nested sections expanded."""
    rows: list[tuple[str, str, str]] = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        key, value = f"{prefix}{f.name}", getattr(obj, f.name)
        if dataclasses.is_dataclass(value) or key == "loss":
            rows.append((key, None, help_of[key]))  # a section's heading
            rows.extend(_rows_of(value, f"{key}.", help_of) if key != "loss" else _loss_rows(value))
            continue
        rows.append((key, format_value(value), help_of[key]))
        section = _optional_section(hints[f.name])
        if value is None and section is not None:  # an unset optional section: show what it would hold
            rows.extend((k, v, f"(off until set) {h}") for k, v, h in _rows_of(section(), f"{key}.", help_of))
    return rows


def _optional_section(tp: Any) -> Any:
    options = [a for a in typing.get_args(tp) if a is not type(None)]
    return options[0] if len(options) == 1 and dataclasses.is_dataclass(options[0]) else None


def _loss_rows(spec: Any) -> list[tuple[str, str, str]]:
    rows = []
    single = not isinstance(spec, list)
    for i, term in enumerate(loss_terms(spec)):
        where = "loss" if single else f"loss.{i}"
        term = term if isinstance(term, dict) else {"name": term}
        rows.append((f"{where}.name", format_value(term.get("name")), LOSS_TERM_HELP["name"]))
        weight = term.get("weight")
        rows.append((f"{where}.weight", format_value(1.0 if weight is None else weight), LOSS_TERM_HELP["weight"]))
        rows.append((f"{where}.params", format_value(term.get("params") or {}), LOSS_TERM_HELP["params"]))
    return rows


def recipe_rows(recipe: Recipe) -> list[tuple[str, Optional[str], str]]:
    """Every key of ``recipe`` as ``(dotted key, value as an override reads it, one-line help)``.

    A section (``data``) is a heading row (value None) followed by its keys
    (``data.image_size``); an unset optional section
    (``data.label_noise: null``) lists its keys too, marked off; the loss lists each term's
    ``name``, ``weight`` and ``params``.
    """
    return _rows_of(recipe, "", schema_keys())


def _table(rows: Iterable[tuple[str, Optional[str], str]], indent: str = "") -> list[str]:
    lines = []
    for key, value, help_text in rows:
        if value is None:
            lines.append(f"{indent}# {key}: {help_text}")
            continue
        setting = f"{indent}{key}={value}"
        lines.append(f"{setting:<{_KEY_COLUMN}}  # {help_text}" if help_text else setting)
    return lines


# -- parameters the registries know ---------------------------------------------------
_ARG_LINE = re.compile(r"^([\w*]+(?:\s*,\s*[\w*]+)*)\s*(?:\([^)]*\))?:\s*(.*)$")


def param_docs(*objects: Any) -> dict[str, str]:
    """One line per parameter from the Google-style ``Args:`` sections of the objects'
    docstrings (a class: its own and its ``__init__``'s); ``a, b: text`` documents both."""
    docs: dict[str, str] = {}
    for obj in objects:
        if obj is None:
            continue
        texts = [inspect.getdoc(obj)]
        if inspect.isclass(obj) and "__init__" in vars(obj):
            texts.append(inspect.getdoc(vars(obj)["__init__"]))
        for text in filter(None, texts):
            for name, line in _args_section(text).items():
                docs.setdefault(name, line)
    return docs


def _args_section(doc: str) -> dict[str, str]:
    found: dict[str, list[str]] = {}
    current: list[str] = []
    indent: Optional[int] = None
    inside = False
    for line in doc.splitlines():
        stripped = line.strip()
        if stripped in ("Args:", "Arguments:", "Parameters:"):
            inside, indent, current = True, None, []
            continue
        if not inside or not stripped:
            continue
        lead = len(line) - len(line.lstrip())
        if lead == 0:  # the next section (Returns:, Raises:, ...)
            inside = False
            continue
        indent = lead if indent is None else indent
        match = _ARG_LINE.match(stripped) if lead == indent else None
        if match:
            current = [n.strip().lstrip("*") for n in match.group(1).split(",")]
            for name in current:
                found[name] = [match.group(2)]
        elif lead > indent:
            for name in current:
                found[name].append(stripped)
    return {name: _one_line(" ".join(parts)) for name, parts in found.items()}


def _one_line(text: str, limit: int = 150) -> str:
    """``text`` cut after its first sentence when it is long."""
    text = " ".join(text.split()).replace("``", "")
    if len(text) <= limit:
        return text
    end = text.find(". ")
    return text[: end + 1] if 0 < end < limit else text[: limit - 3].rstrip() + "..."


def _default(param: inspect.Parameter) -> str:
    return "(required)" if param.default is inspect.Parameter.empty else format_value(_plain(param.default))


def _plain(value: Any) -> Any:
    """A default as YAML can show it (tuples as lists; anything else as its repr)."""
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (bool, int, float, str, list, dict)):
        return value
    return repr(value)


def _param_rows(key: str, valid: dict[str, inspect.Parameter], given: dict[str, Any],
                docs: dict[str, str], source: str) -> list[tuple[str, str, str]]:
    rows = []
    for name, param in valid.items():
        help_text = docs.get(name) or f"see {source}"
        if name in given:
            rows.append((f"{key}.{name}", format_value(given[name]), f"(set) {help_text}"))
        else:
            rows.append((f"{key}.{name}", _default(param), f"(default) {help_text}"))
    return rows


def registry_param_sections(recipe: Recipe) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """For the recipe's trainer, schedule and each loss term: a title and the rows of the
    parameters its registry knows (``key.param``, the given value or the default, help).

    Raises:
        UnknownNameError: an unknown trainer, schedule or loss name (listing the valid ones).
    """
    from convrecipes.build import TRAINER_BUILDERS, trainer_recipe_params
    from convrecipes.losses import LOSSES
    from convrecipes.losses.registry import _AUTO_ARGS
    from convrecipes.schedulers import SCHEDULES
    from convrecipes.schedulers.schedules import schedule_params
    from convrecipes.trainers import TRAINERS

    sections = []
    t = recipe.trainer
    cls = TRAINERS.get(t.name)
    builder = TRAINER_BUILDERS.get(t.name) if t.name in TRAINER_BUILDERS else None
    rows = _param_rows("trainer.params", trainer_recipe_params(t.name), dict(t.params), param_docs(cls, builder),
                       f"{cls.__name__}'s docstring")
    sections.append((f"trainer {t.name!r} ({cls.__name__})", rows))
    s = recipe.schedule
    cls = SCHEDULES.get(s.name)
    rows = _param_rows("schedule.params", schedule_params(s.name), dict(s.params),
                       param_docs(cls, getattr(cls, "_setup", None)), f"{cls.__name__}'s docstring")
    sections.append((f"schedule {s.name!r} ({cls.__name__})", rows))
    single = not isinstance(recipe.loss, list)
    for i, term in enumerate(loss_terms(recipe.loss)):
        where = "loss" if single else f"loss.{i}"
        cls = LOSSES.get(term["name"])
        valid = LOSSES.params(term["name"], exclude=_AUTO_ARGS)
        rows = _param_rows(f"{where}.params", valid, dict(term.get("params") or {}), param_docs(cls),
                           f"{cls.__name__}'s docstring")
        sections.append((f"loss {term['name']!r} ({cls.__name__}; num_classes and embedding_dim come from the model)",
                         rows))
    return sections


def format_recipe(recipe: Recipe, source: Optional[Path] = None, overrides: Iterable[str] = (),
                  with_params: bool = True) -> str:
    """The resolved recipe as ``key=value  # help`` lines, then the registries' parameters.

    Args:
        recipe: a validated recipe (``load_recipe``).
        source: the file it was read from, named in the title.
        overrides: the ``key=value`` overrides applied, named in the title.
        with_params: also list the parameters of its trainer, schedule and losses.
    """
    overrides = list(overrides)
    title = f"recipe {recipe.name}" + (f" ({source})" if source else "")
    if overrides:
        title += f" with {' '.join(overrides)}"
    lines = [f"{title}: every key, its value and what it does (set any with key=value)"]
    lines += _table(recipe_rows(recipe))
    if with_params:
        for heading, rows in registry_param_sections(recipe):
            lines.append(f"{heading} takes:" if rows else f"{heading} takes no params")
            lines += _table(rows, indent="  ")
    return "\n".join(lines)


# -- dry run ------------------------------------------------------------------------------
def _class_listing(classes: list[str]) -> str:
    shown = ", ".join(classes[:_MAX_CLASSES_LISTED])
    return shown + (f", ... ({len(classes) - _MAX_CLASSES_LISTED} more)" if len(classes) > _MAX_CLASSES_LISTED else "")


def dry_run_report(recipe: Recipe, run_dir: Optional[Path] = None) -> str:
    """Build the recipe's experiment as ``convrecipes train`` would, train nothing, and
    describe it: the data (images per split, labeled and unlabeled, classes, image shape,
    normalisation), the model's parameter count, the steps, the run directory it would use.

    ``optimizer.lr: auto`` is built with a stand-in LR (the range test runs only when
    training). Nothing is written: no run directory, no checkpoint (the image cache of an
    ``image_folder`` is written, as by any load).

    Args:
        recipe: a validated recipe; it is not modified.
        run_dir: the ``--run-dir`` that training would use (None: the default name).

    Raises:
        ConvrecipesError: anything ``convrecipes train`` would refuse before training
            (missing data, a bad name or parameter, a teacher that cannot be loaded, ...).
    """
    from convrecipes.build import build
    from convrecipes.models import count_parameters
    from convrecipes.run import run_name

    recipe = copy.deepcopy(recipe)
    auto_lr = isinstance(recipe.optimizer.lr, str)
    if auto_lr:
        recipe.optimizer.lr = 1e-3  # a stand-in: `train` replaces it with the range test's suggestion
    recipe.trainer.progress, recipe.trainer.log_with = False, None
    computed = recipe.augment.mean is None or recipe.augment.std is None
    exp = build(recipe)
    ds, d = exp.datasets, recipe.data
    train, test = ds.train, ds.test
    where = f" from {d.data_dir}" if d.data_dir else ""
    lines = [f"dry run of recipe {recipe.name}: nothing trained, no run directory created"]
    split = (f"train {len(train)} / val {len(ds.val) if ds.val is not None else 0} / test {len(test)} images of "
             f"shape {tuple(train.image_shape)} (channels, height, width)")
    lines.append(f"data: {d.name}{where}: {split}")
    counts = [int(c) for c in train.labels.bincount(minlength=train.num_classes)] if len(train) else []
    per_class = f"; training images per class {min(counts)}-{max(counts)}" if counts else ""
    lines.append(f"classes: {ds.num_classes} ({_class_listing(list(train.classes))}){per_class}")
    if ds.unlabeled is not None:
        lines.append(f"semi-supervised: {len(train)} labeled + {len(ds.unlabeled)} unlabeled training images")
    if ds.label_noise is not None:
        lines.append(f"label noise: {len(ds.label_noise.flipped)} training labels flipped "
                     f"({recipe.data.label_noise.kind}, rate {recipe.data.label_noise.rate})")
    lines.append(f"normalisation (augment.mean/std{', computed from the training images' if computed else ''}"
                 f"): mean {format_value(recipe.augment.mean)}, std {format_value(recipe.augment.std)}")
    model = exp.trainer.unwrapped_model
    trainable = count_parameters(model, trainable_only=True)
    frozen = f", {trainable:,} of them trainable at the start" if trainable != exp.num_parameters else ""
    lines.append(f"model: {recipe.model.name} ({type(model).__name__}) with {exp.num_parameters:,} parameters{frozen}")
    steps = math.ceil(len(exp.train_loader) / recipe.trainer.grad_accum_steps)
    lr = "auto (the LR range test runs first)" if auto_lr else format_value(recipe.optimizer.lr)
    lines.append(f"training: {recipe.trainer.name} trainer, {recipe.trainer.epochs} epochs x {steps} optimizer steps, "
                 f"global batch {exp.train_loader.batch_size}, {recipe.optimizer.name} at lr {lr}, "
                 f"{recipe.schedule.name} schedule, {exp.trainer.accelerator.num_processes} process(es) on "
                 f"{exp.trainer.device}")
    target = run_dir if run_dir is not None else Path(recipe.output_dir) / f"{run_name(recipe)}-<YYYYmmdd-HHMMSS>"
    lines.append(f"run directory: {target} (drop --dry-run to train)")
    return "\n".join(lines)


# -- the commands ------------------------------------------------------------------------
SHOW_DESCRIPTION = ("Print a recipe with its overrides applied: every key as key=value (any line works as an "
                    "override), with its one-line help, then the parameters its trainer, schedule and losses take. "
                    "`convrecipes train RECIPE --dry-run` adds the data summary and the model's parameter count.")

TRAIN_EPILOG = """\
before training:
  convrecipes show RECIPE [key=value ...]              every key of the resolved recipe, its value and its help
  convrecipes train RECIPE --dry-run [key=value ...]   the same, plus the data summary and the model's parameter
                                                       count; trains nothing and creates no run directory
your own images (one subfolder per class):
  convrecipes train image_folder data.data_dir=/path/to/images   (runs/<folder name>-<timestamp>)"""


def add_show_arguments(parser: Any) -> None:
    """The arguments of ``convrecipes show``."""
    parser.add_argument("recipe", help="recipe YAML path or name in recipes/ (e.g. quickstart)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=0.05 trainer.epochs=3")


def cmd_show(args: Any) -> int:
    """``convrecipes show RECIPE [key=value ...]``."""
    from convrecipes.recipe import load_recipe, resolve_recipe_path

    recipe = load_recipe(args.recipe, args.overrides)
    _print_to_pipe(format_recipe(recipe, resolve_recipe_path(args.recipe), args.overrides))
    return 0


def _print_to_pipe(text: str) -> None:
    """Print ``text``; a reader that stops early (``convrecipes show X | head``) is no error."""
    import os
    import sys

    try:
        print(text, flush=True)
    except BrokenPipeError:
        # Python's advice: point stdout at devnull so the flush at exit does not fail again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())


def cmd_dry_run(args: Any) -> int:
    """``convrecipes train RECIPE --dry-run [key=value ...]``: ``show``, then ``dry_run_report``."""
    from convrecipes.errors import ConvrecipesError
    from convrecipes.recipe import load_recipe, resolve_recipe_path
    from convrecipes.run import process_state

    if args.resume or args.then:
        raise ConvrecipesError("--dry-run checks a new run of a recipe; drop --resume/--then (`convrecipes show "
                               "RECIPE` and `convrecipes train RECIPE --dry-run` take the overrides of one stage)")
    if not args.recipe:
        raise ConvrecipesError("name a recipe to check, e.g. `convrecipes train quickstart --dry-run`")
    recipe = load_recipe(args.recipe, args.overrides)
    if args.init_from:
        recipe.model.init_from = args.init_from
    main = process_state().is_main_process
    if main:
        print(format_recipe(recipe, resolve_recipe_path(args.recipe), args.overrides), flush=True)
    report = dry_run_report(recipe, Path(args.run_dir) if args.run_dir else None)
    if main:
        print(report)
    return 0


__all__ = ["format_value", "recipe_rows", "param_docs", "registry_param_sections", "format_recipe", "dry_run_report",
           "cmd_show", "cmd_dry_run"]
