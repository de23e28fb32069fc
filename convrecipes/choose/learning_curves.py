"""Learning curves: validation accuracy against the number of training images.

``learning_curve`` trains the recipe (one model, or each candidate) on stratified
fractions of the training set (``data.subset_fraction``; the validation split is then
carved from that subset, as in any run), writes ``learning_curve.json`` and
``learning_curve.png`` and says whether the curve has flattened.

The rule (``flattening``): take the last step of the curve, between the two largest
training sets, and divide its gain in validation top-1 by the number of doublings of the
data it spans (``log2(n_last / n_before)``). Below ``threshold`` points per doubling
(default 0.5) the curve has flattened: doubling the data again is expected to buy less
than that. The extrapolation assumes the usual concave curve in log data; it is a rule of
thumb, and with one seed the step is as noisy as the validation split is small.

Every fraction trains the recipe's ``trainer.epochs``, so a smaller fraction also takes
fewer optimizer steps (the usual fixed-epoch curve): at the small end part of the gap is
the shorter schedule, not only the fewer images.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

from convrecipes.choose.candidates import prepare_candidates
from convrecipes.choose.runs import mean_and_std, run_dir_for, run_metrics, train_all
from convrecipes.errors import RecipeError
from convrecipes.recipe import load_recipe

PathLike = Union[str, Path]
DEFAULT_FRACTIONS = (0.05, 0.1, 0.3, 1.0)
FLAT_THRESHOLD = 0.5  # validation top-1 points per doubling of the training images


def flattening(train_images: Sequence[float], accuracy: Sequence[Optional[float]],
               threshold: float = FLAT_THRESHOLD) -> dict[str, Any]:
    """Whether a learning curve has flattened (the rule in the module docstring).

    Args:
        train_images: training-set sizes.
        accuracy: accuracy (percent) at each size; None entries are skipped.
        threshold: points per doubling below which the curve counts as flattened.

    Returns:
        ``flattened`` (None with fewer than two sizes), ``gain_per_doubling``, ``gain``,
        ``doublings``, ``from_images``, ``to_images``, ``threshold`` and a plain
        ``statement``.
    """
    points = sorted((float(n), float(a)) for n, a in zip(train_images, accuracy) if a is not None and n > 0)
    distinct: dict[float, float] = {}
    for n, a in points:
        distinct[n] = a  # one accuracy per size
    if len(distinct) < 2:
        return {"flattened": None, "threshold": threshold,
                "statement": "one training-set size only: a learning curve needs at least two fractions"}
    (n0, a0), (n1, a1) = list(distinct.items())[-2:]
    doublings = math.log2(n1 / n0)
    gain = a1 - a0
    per = gain / doublings
    flattened = per < threshold
    span = f"from {n0:,.0f} to {n1:,.0f} training images ({doublings:.2f} doublings)"
    if flattened:
        statement = (f"flattened: {span} validation top-1 changed by {gain:+.2f} points, {per:+.2f} per doubling, "
                     f"below the {threshold:g}-point threshold; more data of this kind is unlikely to help much: "
                     f"a bigger model, a longer schedule or stronger augmentation is the better next step")
    else:
        statement = (f"not flattened: {span} validation top-1 rose {gain:+.2f} points, {per:+.2f} per doubling "
                     f"(threshold {threshold:g}); more training data should still help")
    return {"flattened": flattened, "gain_per_doubling": per, "gain": gain, "doublings": doublings,
            "from_images": n0, "to_images": n1, "threshold": threshold, "statement": statement}


def parse_fractions(value: Union[str, Sequence[float]]) -> list[float]:
    """``"0.05,0.1,1"`` or a list -> ascending fractions in (0, 1], duplicates dropped."""
    items = value.split(",") if isinstance(value, str) else list(value)
    out = []
    for item in items:
        try:
            f = float(item)
        except (TypeError, ValueError):
            raise RecipeError(f"--fractions takes numbers in (0, 1] separated by commas (e.g. "
                              f"--fractions 0.05,0.1,0.3,1.0), got {item!r}") from None
        if not 0.0 < f <= 1.0:
            raise RecipeError(f"--fractions: {f:g} is not in (0, 1]; a fraction is the share of the training set "
                              f"(e.g. --fractions 0.05,0.1,0.3,1.0)")
        if f not in out:
            out.append(f)
    if not out:
        raise RecipeError("--fractions is empty; e.g. --fractions 0.05,0.1,0.3,1.0")
    return sorted(out)


@dataclass
class LearningCurveResult:
    """What ``learning_curve`` found: per model its points (fraction, training and validation
    images, mean validation and test top-1) and its flattening verdict."""

    out_dir: Path
    curves: dict[str, list[dict[str, Any]]]
    verdicts: dict[str, dict[str, Any]]
    files: dict[str, Path] = field(default_factory=dict)


def learning_curve(
    recipe: PathLike,
    models: Union[None, str, Sequence[str]] = None,
    fractions: Union[str, Sequence[float]] = DEFAULT_FRACTIONS,
    *,
    seeds: Optional[Sequence[int]] = None,
    overrides: Sequence[str] = (),
    out_dir: Optional[PathLike] = None,
    image_size: Union[None, str, int] = "auto",
    threshold: float = FLAT_THRESHOLD,
    say: Callable[[str], None] = print,
) -> LearningCurveResult:
    """Train the recipe at each training-set fraction and write the learning curves.

    Fractions apply to the whole training set: a recipe's ``data.subset_per_class`` or
    ``data.subset_fraction`` is replaced (with a printed note). Runs go to
    ``<out>/runs/<model>_frac<f>_seed<s>`` and resume like ``compare``'s.

    Args:
        recipe: a recipe name or YAML path.
        models: as in ``compare`` (None: the recipe's own model).
        fractions: shares of the training set, in (0, 1].
        seeds: the seeds (default: the recipe's); accuracies are averaged over them.
        overrides: ``key=value`` overrides for every run.
        out_dir: default ``<output_dir>/learning-curve-<recipe>``.
        image_size: as in ``compare``.
        threshold: the flattening threshold in points per doubling.
        say: where progress goes.

    Raises:
        RecipeError: a bad fraction, model, recipe or override, or a fraction that leaves
            fewer training images than one batch; all found before anything trains.
    """
    from convrecipes.build import load_datasets

    fracs = parse_fractions(fractions)
    overrides = list(overrides)
    if any(o.split("=", 1)[0].strip() in ("data.subset_fraction", "data.subset_per_class") for o in overrides):
        raise RecipeError("--fractions sets data.subset_fraction itself; drop the data.subset_fraction / "
                          "data.subset_per_class override")
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise RecipeError("give the seeds with --seeds (e.g. --seeds 0 1), not seed=...")
    candidates = prepare_candidates(recipe, models, overrides, image_size, say=say)
    base = candidates[0].recipe
    d = base.data
    if d.subset_per_class is not None or d.subset_fraction is not None:
        what = (f"data.subset_per_class={d.subset_per_class}" if d.subset_per_class is not None
                else f"data.subset_fraction={d.subset_fraction:g}")
        say(f"note: the recipe's {what} is cleared: the fractions apply to the full training set")
    seeds = list(seeds) if seeds else [base.seed]
    out = Path(out_dir) if out_dir is not None else Path(base.output_dir) / f"learning-curve-{base.name}"

    def subset(f: float) -> list[str]:
        return ["data.subset_per_class=null", f"data.subset_fraction={f!r}"]

    sizes: dict[tuple[float, int], tuple[int, int]] = {}
    for f in fracs:  # before training: a fraction too small for one batch fails here, not after hours
        for s in seeds:
            r = load_recipe(recipe, [*candidates[0].overrides, *subset(f), f"seed={s}"])
            data = load_datasets(r)
            sizes[(f, s)] = (len(data.train), len(data.val) if data.val is not None else 0)
            if len(data.train) < r.data.batch_size:
                raise RecipeError(f"--fractions {f:g} leaves {len(data.train)} training images (after the "
                                  f"validation split), fewer than one batch of {r.data.batch_size}; drop that "
                                  f"fraction or lower data.batch_size")
    jobs = [(f"{c.model} at fraction {f:g} ({sizes[(f, s)][0]:,} images) seed {s}",
             [*c.overrides, *subset(f), f"seed={s}"], run_dir_for(out, c.model, s, f))
            for c in candidates for f in fracs for s in seeds]
    say(f"learning curve of {base.name}: {len(candidates)} model(s) x {len(fracs)} fraction(s) x {len(seeds)} "
        f"seed(s) = {len(jobs)} run(s) in {out}")
    train_all(recipe, jobs, say=say)

    curves: dict[str, list[dict[str, Any]]] = {}
    verdicts: dict[str, dict[str, Any]] = {}
    for c in candidates:
        points = []
        for f in fracs:
            runs = [{"seed": s, **run_metrics(run_dir_for(out, c.model, s, f))} for s in seeds]
            val, val_sd = mean_and_std([r["val_top1"] for r in runs])
            test, test_sd = mean_and_std([r["test_top1"] for r in runs])
            points.append({"fraction": f, "train_images": sizes[(f, seeds[0])][0],
                           "val_images": sizes[(f, seeds[0])][1], "val_top1": val, "val_top1_std": val_sd,
                           "test_top1": test, "test_top1_std": test_sd, "runs": runs})
        curves[c.model] = points
        verdicts[c.model] = flattening([p["train_images"] for p in points], [p["val_top1"] for p in points],
                                       threshold)
    out.mkdir(parents=True, exist_ok=True)
    result = LearningCurveResult(out, curves, verdicts)
    rule = (f"flattened when the last step (the two largest training sets) gains less than {threshold:g} validation "
            f"top-1 points per doubling of the training images: gain / log2(n_last / n_before) < {threshold:g}")
    payload = {"recipe": str(recipe), "recipe_name": base.name, "overrides": overrides, "fractions": fracs,
               "seeds": seeds, "rule": rule,
               "note": "every fraction trains the recipe's trainer.epochs: a smaller fraction also takes fewer "
                       "optimizer steps; the validation split is carved from each fraction's subset",
               "models": {m: {"image_size": c.image_size, "points": curves[m], "verdict": verdicts[m]}
                          for m, c in zip(curves, candidates)}}
    files = {"json": out / "learning_curve.json", "png": out / "learning_curve.png"}
    files["json"].write_text(json.dumps(payload, indent=2))
    plot_learning_curves(curves, files["png"], title=f"{base.name}: validation top-1 against training images")
    result.files = files
    for m, points in curves.items():
        say(f"{m}: " + ", ".join(f"{p['train_images']:,} images -> {p['val_top1']:.2f}" if p["val_top1"] is not None
                                 else f"{p['train_images']:,} images -> -" for p in points))
        say(f"  {verdicts[m]['statement']}")
    say(f"rule: {rule}")
    say(f"wrote {files['json']}, {files['png']}")
    return result


def plot_learning_curves(curves: dict[str, list[dict[str, Any]]], path: PathLike,
                         title: Optional[str] = None) -> Path:
    """Validation top-1 against training images (log2 x axis), one line per model, error
    bars of one standard deviation over seeds where there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, points in curves.items():
        pts = [p for p in points if p["val_top1"] is not None]
        if not pts:
            continue
        ax.errorbar([p["train_images"] for p in pts], [p["val_top1"] for p in pts],
                    yerr=[p["val_top1_std"] or 0.0 for p in pts], marker="o", markersize=4, capsize=3, label=model)
    ax.set_xscale("log", base=2)
    sizes = sorted({p["train_images"] for points in curves.values() for p in points})
    if sizes:  # the sizes trained at, written out, instead of powers of two
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{n:,}" for n in sizes], fontsize=8)
        ax.minorticks_off()
    ax.set_xlabel("training images (log scale)")
    ax.set_ylabel("validation top-1 (%)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
