"""``lr-find RECIPE [key=value ...]`` (the same as ``convrecipes lr-find``) and the
``optimizer.lr=auto`` resolution that ``convrecipes train`` runs before building a run.

Both sweep the recipe's own trainer (``convrecipes.lr_finder.find_lr``) on the
recipe's training split, with the schedule replaced by a constant one (the sweep sets the
LRs itself, and a cyclic schedule waiting for its bounds could not be built) and without
checkpoints. Kept apart from ``cli.py``; nothing heavy is imported until a command runs.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence

if TYPE_CHECKING:
    from accelerate import Accelerator

    from convrecipes.recipe import Recipe
    from convrecipes.lr_finder import LRFinderResult, RepeatedLRFinderResult

# The rule `optimizer.lr=auto` trains with depends on the schedule (``auto_lr_rule``).
# - A schedule that warms up to a peak and anneals to ~0 (cosine, linear, one-cycle) gets
#   the top of the usable range, ``cyclic_max``: Smith's 1cycle and super-convergence use
#   the range test's maximum as the peak LR, because the annealing tail recovers from it.
#   On the Fashion-MNIST benchmark (cosine, 4 epochs) test accuracy rises monotonically over
#   the grid x1/4 .. x4 of cyclic_max. Read off the zero-lag curve, cyclic_max (0.079) sits
#   0.52 points below the grid's best (x4, 0.32, near the loss minimum at 0.23); read off the
#   lagging EMA it was 0.29 and the grid's best (benchmarks/results/lr_range_test_fashion_
#   mnist*.json). On digits the best of a wide grid (0.025) lies below it, so the rule stays.
# - Any other schedule (constant, step, plateau, cyclic) trains long at or near the LR
#   itself, so it gets ``consensus``: the geometric mean of steepest, valley and min/10.
#   Each rule errs its own way (valley low, steepest jumping 2x between seeds); their mean
#   in log space moved 1.06x between the same seeds (1.75x when read off the EMA).
# benchmarks/lr_range_test_fashion_mnist.py and benchmarks/lr_rules_digits.py measure them.
ANNEALING_SCHEDULES = ("cosine", "linear", "one_cycle")
AUTO_LR_RULE = "consensus"
AUTO_LR_RULE_ANNEALING = "cyclic_max"


def auto_lr_rule(schedule_name: str) -> str:
    """The suggestion ``optimizer.lr=auto`` trains with under schedule ``schedule_name``:
    ``cyclic_max`` for a schedule that anneals from its peak, else ``consensus``."""
    return AUTO_LR_RULE_ANNEALING if schedule_name in ANNEALING_SCHEDULES else AUTO_LR_RULE
# The sweep sets every group's LR from its ratio to the first group's, so the value a
# recipe's "auto" is replaced by while sweeping does not matter; it only has to be positive.
_PLACEHOLDER_LR = 0.1


def add_lr_find_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``lr-find`` arguments to ``parser``."""
    parser.add_argument("recipe", help="recipe YAML path or name in recipes/ (e.g. quickstart)")
    parser.add_argument("overrides", nargs="*", help="key=value overrides, e.g. data.batch_size=256 optimizer.name=adamw")
    parser.add_argument("--start-lr", type=float, default=1e-7, help="first LR of the sweep (default 1e-7)")
    parser.add_argument("--end-lr", type=float, default=10.0, help="last LR of the sweep (default 10)")
    parser.add_argument("--num-iters", type=int, default=100, help="optimizer steps of the sweep (default 100)")
    parser.add_argument("--mode", choices=("exp", "linear"), default="exp",
                        help="exp: equal LR ratios (fastai); linear: equal LR steps (Smith) (default exp)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="sweeps with seeds seed, seed+1, ...; reports the spread of each suggestion (default 1)")
    parser.add_argument("--smooth-beta", type=float, default=0.98,
                        help="factor of the online EMA the stop rule watches (default 0.98)")
    parser.add_argument("--diverge-threshold", type=float, default=4.0,
                        help="stop when the online EMA of the loss exceeds this times its best (default 4)")
    parser.add_argument("--smooth-decades", type=float, default=None,
                        help="window, in decades of LR, of the centred (zero-lag) smoothing the suggestions are "
                             "read off (default 0.5: rules.SMOOTH_WINDOW_DECADES)")
    parser.add_argument("--part", help="trainers with several optimizers: the one to sweep, e.g. teacher or student "
                                       "for trainer mpl (default: the primary model's)")
    parser.add_argument("--out", help="output directory (default: <output_dir>/lr-find-<recipe>-<timestamp>)")
    return parser


def finder_recipe(recipe: "Recipe", seed: Optional[int] = None) -> "Recipe":
    """A copy of ``recipe`` to sweep: constant schedule without warmup, a placeholder for an
    ``auto`` LR, and optionally another seed."""
    from convrecipes.recipe import ScheduleConfig

    r = copy.deepcopy(recipe)
    if isinstance(r.optimizer.lr, str):
        r.optimizer.lr = _PLACEHOLDER_LR
    r.schedule = ScheduleConfig(name="constant")
    if seed is not None:
        r.seed = seed
    return r


def _fmt(value: Optional[float]) -> str:
    return "-" if value is None else f"{value:.3g}" if value >= 1e-2 else f"{value:.2e}"


def format_report(result: "RepeatedLRFinderResult", recipe_name: str, auto_rule: str = AUTO_LR_RULE) -> str:
    """The suggestions and their spread as a table (what ``lr-find`` prints)."""
    from convrecipes.lr_finder import LR_RULES, SUGGESTION_KEYS

    first = result.runs[0]
    s = first.settings
    runs = len(result.runs)
    swept = f" (optimizer {s['part']!r}, loss {s.get('loss', 'train_loss')!r})" if s.get("part") not in (None, "model") else ""
    lines = [
        f"LR range test of {recipe_name}{swept}: {s['mode']} sweep {s['start_lr']:g} -> {s['end_lr']:g} in "
        f"{s['num_iters']} steps, {runs} seed(s) {result.seeds}",
        f"the LRs belong to a global batch of {result.global_batch_size} ({s['per_process_batch_size']} per process x "
        f"{s['num_processes']} process(es) x {s['grad_accum_steps']} accumulation step(s)); stopped: "
        + ", ".join(f"{r.stop_reason} at lr {_fmt(r.stop_lr)}"
                    + (f" (loss rising from lr {_fmt(r.divergence_lr)})" if r.divergence_lr else "")
                    for r in result.runs),
        "",
        f"  {'rule':<12} {'lr' if runs == 1 else 'geo mean':>9}" + (f" {'min':>9} {'max':>9} {'max/min':>8}" if runs > 1 else ""),
    ]
    for key in SUGGESTION_KEYS:
        sp = result.spread[key]
        mark = " *" if key == auto_rule else ""
        row = f"  {key:<12} {_fmt(result.suggestions[key]):>9}"
        if runs > 1:
            ratio = "-" if sp["ratio"] is None else f"{sp['ratio']:.2f}"
            row += f" {_fmt(sp['min']):>9} {_fmt(sp['max']):>9} {ratio:>8}"
            if 0 < sp["n"] < runs:
                row += f"  ({sp['n']} of {runs} runs)"
        lines.append(row + mark)
    group = result.agreement["largest_group"]
    lines.append("")
    lines.append(f"rules agreeing within {result.agreement['factor']:g}x: "
                 + (", ".join(group) if group else f"none of {', '.join(LR_RULES)}"))
    lines.append("* used by optimizer.lr=auto under this recipe's schedule (cyclic_max for cosine, linear and one_cycle; "
                 "consensus otherwise); cyclic_base/cyclic_max: schedule.name=cyclic bounds "
                 "(max where the loss stops falling steeply, base = max / 4)")
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)


def run_lr_find(args: argparse.Namespace) -> int:
    """Run ``lr-find`` with parsed ``args``; writes lr_find.json and lr_find.png. Returns 0."""
    from convrecipes.build import build, load_datasets, make_accelerator
    from convrecipes.errors import RecipeError
    from convrecipes.lr_finder import find_lr_repeated
    from convrecipes.lr_finder.result import write_lr_find_json
    from convrecipes.recipe import load_recipe
    from convrecipes.run import new_run_dir

    recipe = load_recipe(args.recipe, args.overrides)
    accelerator = make_accelerator(recipe)
    out = new_run_dir(recipe, accelerator, args.out, prefix="lr-find-")
    datasets = load_datasets(recipe)  # once: the seeds vary the weights, data order and augmentation

    def make(seed: int) -> tuple[Any, Any]:
        accelerator.free_memory()  # drop the previous sweep's model and optimizer
        exp = build(finder_recipe(recipe, seed), accelerator=accelerator, datasets=datasets)
        return exp.trainer, exp.train_loader

    if args.repeat < 1:
        raise RecipeError(f"--repeat must be at least 1, got {args.repeat}; e.g. --repeat 3 to see the spread")
    result = find_lr_repeated(
        make, seeds=[recipe.seed + i for i in range(args.repeat)],
        start_lr=args.start_lr, end_lr=args.end_lr, num_iters=args.num_iters, mode=args.mode,
        smooth_beta=args.smooth_beta, diverge_threshold=args.diverge_threshold, progress=recipe.trainer.progress,
        part=args.part, **({} if args.smooth_decades is None else {"smooth_decades": args.smooth_decades}),
    )
    accelerator.free_memory()
    rule = auto_lr_rule(recipe.schedule.name)
    if accelerator.is_main_process:
        auto = {"rule": rule, "schedule": recipe.schedule.name, "suggested_lr": result.suggestions.get(rule),
                "applied": False}
        json_path = write_lr_find_json(out / "lr_find.json", result, recipe=recipe.name, overrides=args.overrides,
                                       auto=auto)
        png_path = result.plot(out / "lr_find.png", title=f"{recipe.name}: LR range test, global batch "
                                                          f"{result.global_batch_size}", auto_rule=rule)
        print(format_report(result, recipe.name, rule))
        print(f"wrote {json_path} and {png_path}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0


def resolve_auto_lr(recipe: "Recipe", accelerator: "Accelerator", run_dir: Optional[Path] = None,
                    overrides: Sequence[str] = (), **find_lr_kwargs: Any) -> Optional["LRFinderResult"]:
    """Replace ``optimizer.lr: auto`` in ``recipe`` by the LR range test's suggestion.

    Builds the recipe once to sweep it (seeded as training will be), takes the
    suggestion ``auto_lr_rule(schedule)`` names, and writes it into ``recipe.optimizer.lr`` (divided by the
    batch scaling when ``scale_lr_with_batch`` is on, so the LR trained with is the one
    found). A ``cyclic`` schedule without ``max_lr``/``base_lr`` takes the finder's
    cyclical bounds. Then the caller builds the real run from the resolved recipe: training
    is exactly what it would be with those numbers written in the recipe. ``run_dir``
    receives lr_find.json (``write_lr_find_json``: the layout ``lr-find`` writes, with the
    choice under ``"auto"`` and ``overrides`` recorded) and lr_find.png, with the chosen LR
    marked.

    Returns:
        The sweep's result, or None when the recipe's LR is already a number.

    Raises:
        ConvrecipesError: the sweep gives no suggestion for the rule (the message says why).
    """
    from convrecipes.build import build
    from convrecipes.errors import ConvrecipesError
    from convrecipes.lr_finder import find_lr
    from convrecipes.lr_finder.result import write_lr_find_json

    o, s = recipe.optimizer, recipe.schedule
    if not isinstance(o.lr, str):
        return None
    exp = build(finder_recipe(recipe), accelerator=accelerator)
    trainer = exp.trainer
    trainer.print(f"optimizer.lr=auto: running the LR range test on {recipe.name} first")
    find_lr_kwargs.setdefault("progress", recipe.trainer.progress)
    result = find_lr(trainer, exp.train_loader, seed=recipe.seed, **find_lr_kwargs)
    batch = exp.train_loader.batch_size
    del exp, trainer
    accelerator.free_memory()  # the sweep's model and optimizer must not linger in the accelerator
    rule = auto_lr_rule(s.name)
    chosen = result.suggestions.get(rule)
    record: dict[str, Any] = {"rule": rule, "schedule": s.name, "suggested_lr": chosen, "applied": chosen is not None}
    if chosen is not None:
        lr = float(f"{chosen:.4g}")  # the rule is not precise to more digits; keeps recipe.yaml readable
        o.lr = lr * o.reference_batch_size / batch if o.scale_lr_with_batch else lr
        record.update({"lr": lr, "optimizer.lr": o.lr})
        if s.name == "cyclic":
            for key, name in (("max_lr", "cyclic_max"), ("base_lr", "cyclic_base")):
                if key not in s.params and result.suggestions.get(name) is not None:
                    s.params[key] = float(f"{result.suggestions[name]:.4g}")
                    record[f"schedule.params.{key}"] = s.params[key]
    if run_dir is not None and accelerator.is_main_process:
        run_dir = Path(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        write_lr_find_json(run_dir / "lr_find.json", result, recipe=recipe.name, overrides=overrides, auto=record)
        result.plot(run_dir / "lr_find.png", title=f"{recipe.name}: LR range test for optimizer.lr=auto",
                    auto_rule=rule)
    accelerator.wait_for_everyone()
    where = f" (see {Path(run_dir) / 'lr_find.png'})" if run_dir is not None else ""
    if chosen is None:
        why = "; ".join(result.warnings) or "the curve has no valley"
        raise ConvrecipesError(f"optimizer.lr=auto: the LR range test gave no {rule!r} suggestion ({why}){where}; "
                               f"set optimizer.lr to a number instead")
    if s.name == "cyclic" and ("max_lr" not in s.params or "base_lr" not in s.params):
        raise ConvrecipesError(f"schedule 'cyclic' takes its bounds from the LR range test, but the test found none "
                               f"({'; '.join(result.warnings) or 'no descent'}){where}; set schedule.params.max_lr "
                               f"and base_lr")
    if accelerator.is_main_process:
        extra = "".join(f", {k} {v:g}" for k, v in record.items() if k.startswith("schedule."))
        print(f"optimizer.lr=auto: {rule} suggestion {lr:g} for a global batch of "
              f"{result.global_batch_size}{extra}{where}")
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
    return result
