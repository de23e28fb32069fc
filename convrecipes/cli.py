"""Command line: ``convrecipes train|evaluate|recipes|lr-find`` (and ``lr-find``).

User errors (a bad recipe key, missing data, a wrong checkpoint, a NaN loss) print one
message and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from convrecipes.errors import CheckpointError, ConvrecipesError


def _run_dir_for(recipe: Any, accelerator: Any, explicit: Optional[str]) -> Path:
    """A new run directory, named once on the main process and shared with the others."""
    from accelerate.utils import broadcast_object_list

    name = explicit or str(Path(recipe.output_dir) / f"{recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if accelerator.num_processes > 1:
        holder = [name]
        broadcast_object_list(holder)
        name = holder[0]
    return Path(name)


def _resolve_checkpoint(path: str, prefer: str = "best") -> Path:
    """A checkpoint file from a file path or a run directory (``best`` or ``last`` inside it)."""
    p = Path(path)
    if p.is_dir():
        order = [prefer, "last" if prefer == "best" else "best"]
        for name in order:
            if (p / f"{name}.safetensors").is_file():
                return p / f"{name}.safetensors"
        raise CheckpointError(f"run directory {p} has no best.safetensors or last.safetensors; pass a checkpoint file")
    if not p.exists():
        raise CheckpointError(f"no run directory or checkpoint at {p}")
    return p


def _print_table(rows: dict[str, Any], title: str) -> None:
    width = max(len(k) for k in rows) if rows else 0
    print(title)
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if isinstance(value, float) and key.endswith(("top1", "top5", "recall_at_1")):
            shown = f"{value:.2f}"
        print(f"  {key:<{width}}  {shown}")


def _without_accuracy(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` less test top-1/top-5: for test classes unseen in training they are a meaningless ~0."""
    return {k: v for k, v in metrics.items() if not k.startswith(("test_top1", "test_top5"))}


def cmd_train(args: argparse.Namespace) -> int:
    from convrecipes.build import build, make_accelerator
    from convrecipes.recipe import dump_recipe, load_recipe, recipe_from_dict

    resume_ckpt = None
    if args.resume:
        resume_ckpt = _resolve_checkpoint(args.resume, prefer="last")
        from convrecipes.checkpoint import read_metadata

        meta = read_metadata(resume_ckpt)
        if "recipe" not in meta:
            raise CheckpointError(f"{resume_ckpt} records no recipe; resume needs a checkpoint written by convrecipes train")
        recipe = recipe_from_dict(meta["recipe"])
        if args.recipe:
            print(f"resuming with the recipe recorded in {resume_ckpt}; ignoring {args.recipe}", file=sys.stderr)
        run_dir = resume_ckpt.parent
    else:
        if not args.recipe:
            raise ConvrecipesError("name a recipe (e.g. `convrecipes train recipes/quickstart.yaml`) or pass --resume RUN_DIR")
        recipe = load_recipe(args.recipe, args.overrides)
    accelerator = make_accelerator(recipe)
    if not args.resume:
        run_dir = _run_dir_for(recipe, accelerator, args.run_dir)
    t0 = time.perf_counter()
    if isinstance(recipe.optimizer.lr, str):  # "auto": the LR range test picks it (a resume reads the number)
        from convrecipes.lr_find_command import resolve_auto_lr

        resolve_auto_lr(recipe, accelerator, run_dir)
    exp = build(recipe, accelerator=accelerator, run_dir=run_dir)
    trainer = exp.trainer
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "recipe.yaml")  # resolved, with the computed mean/std
    ds = exp.datasets
    trainer.print(
        f"recipe {recipe.name}: {recipe.data.name} train {len(ds.train)} / val {len(ds.val) if ds.val else 0} / "
        f"test {len(ds.test)} images of {tuple(ds.train.image_shape)}, {ds.num_classes} classes; model "
        f"{recipe.model.name} with {exp.num_parameters:,} parameters; global batch {exp.train_loader.batch_size} "
        f"on {accelerator.num_processes} process(es), mixed precision {accelerator.mixed_precision}; run dir {run_dir}"
    )
    trainer.fit(exp.train_loader, exp.val_loader, epochs=recipe.trainer.epochs, resume_from=resume_ckpt)
    results: dict[str, Any] = {"run_dir": str(run_dir), "num_parameters": exp.num_parameters,
                               "global_batch_size": exp.train_loader.batch_size,
                               "num_processes": accelerator.num_processes}
    results["test_final"] = trainer.evaluate(exp.test_loader, prefix="test_")
    if trainer.ema is not None:
        results["test_final_ema"] = trainer.evaluate(exp.test_loader, model=trainer.ema.module, prefix="test_")
    best = run_dir / "best.safetensors"
    if best.is_file():
        from convrecipes.checkpoint import load_checkpoint, load_model_weights

        state, meta = load_checkpoint(best)
        load_model_weights(trainer.unwrapped_model, state["model"], best)
        results["best_epoch"] = meta.get("epoch")
        results["test_best"] = trainer.evaluate(exp.test_loader, prefix="test_")
    results["wall_time_s"] = round(time.perf_counter() - t0, 1)
    from convrecipes.data.datasets import has_unseen_test_classes

    unseen = has_unseen_test_classes(recipe.data.name)
    if unseen:
        for key in ("test_final", "test_final_ema", "test_best"):
            if key in results:
                results[key] = _without_accuracy(results[key])
    if accelerator.is_main_process:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        rows = {f"final {k}": v for k, v in results["test_final"].items()}
        if "test_final_ema" in results:
            rows.update({f"final EMA {k}": v for k, v in results["test_final_ema"].items()})
        if "test_best" in results:
            rows.update({f"best (epoch {results['best_epoch']}) {k}": v for k, v in results["test_best"].items()})
        rows["wall time (s)"] = results["wall_time_s"]
        if unseen:
            trainer.print(f"{recipe.data.name}: the test classes are unseen in training, so there is no test accuracy; "
                          f"`convrecipes evaluate {run_dir} --weights last` reports Recall@1 on them")
        _print_table(rows, f"test results ({run_dir / 'results.json'}):")
    accelerator.end_training()
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from convrecipes.build import build_for_evaluation
    from convrecipes.checkpoint import load_checkpoint, load_model_weights
    from convrecipes.recipe import recipe_from_dict

    ckpt = _resolve_checkpoint(args.run, prefer=args.weights)
    state, meta = load_checkpoint(ckpt)
    if "recipe" not in meta:
        raise CheckpointError(f"{ckpt} records no recipe; evaluate needs a checkpoint written by `convrecipes train`")
    recipe = recipe_from_dict(meta["recipe"])
    recipe.trainer.progress = False
    if args.data_dir:
        recipe.data.data_dir = args.data_dir
    exp = build_for_evaluation(recipe)
    trainer = exp.trainer
    weights = state.get("ema") if args.ema else state["model"]
    if weights is None:
        raise CheckpointError(f"{ckpt} has no EMA weights; drop --ema")
    load_model_weights(trainer.unwrapped_model, weights, ckpt)
    trainer.loss_fn.load_state_dict(state["loss"])
    metrics: dict[str, Any] = trainer.evaluate(exp.test_loader, prefix="test_")
    from convrecipes.data.datasets import has_unseen_test_classes
    from convrecipes.models import Classifier

    unseen = has_unseen_test_classes(recipe.data.name)
    if unseen:
        metrics = _without_accuracy(metrics)

    # a second pass over the test set only for models that expose embeddings
    embeddings = None
    if isinstance(trainer.unwrapped_model, Classifier):
        _, targets, embeddings = trainer.predict(exp.test_loader)
    if embeddings is not None:
        from convrecipes.embedding_metrics import angular_spread, recall_at_1, spread_ratio

        metrics["test_recall_at_1"] = 100.0 * recall_at_1(embeddings, targets)
        spread = spread_ratio(embeddings, targets)
        metrics.update({f"test_spread_{k}": float(v) for k, v in spread.items()})
        angles = angular_spread(embeddings, targets)
        metrics.update({f"test_angle_{k}": float(v) for k, v in angles.items()})
        if embeddings.shape[1] == 2 and args.plot:
            from convrecipes.embedding_metrics import plot_embeddings_2d

            plot_embeddings_2d(embeddings, targets, args.plot, class_names=meta.get("classes"))
            print(f"wrote {args.plot}")
    if trainer.is_main_process:
        if unseen and not args.json:
            print(f"{recipe.data.name}: the test classes are not among the training classes, so there is no test "
                  "accuracy; read test_recall_at_1 (nearest neighbour among the test images)")
        if args.json:
            print(json.dumps({"checkpoint": str(ckpt), **metrics}))
        else:
            _print_table(metrics, f"{ckpt} ({'EMA' if args.ema else 'raw'} weights, epoch {meta.get('epoch')}) "
                                  f"on the {recipe.data.name} test set:")
    return 0


def cmd_recipes(args: argparse.Namespace) -> int:
    from convrecipes.recipe import recipe_search_dirs

    import yaml

    seen = set()
    for folder in recipe_search_dirs():
        for path in sorted(folder.glob("*.yaml")) if folder.is_dir() else []:
            if path.stem in seen:
                continue
            seen.add(path.stem)
            desc = (yaml.safe_load(path.read_text()) or {}).get("description", "")
            print(f"{path.stem:<28} {desc}")
    return 0


def cmd_lr_find(args: argparse.Namespace) -> int:
    from convrecipes.lr_find_command import run_lr_find

    return run_lr_find(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convrecipes", description="Training recipes for image classification.")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train a recipe", description="Train a recipe; writes a run directory.")
    train.add_argument("recipe", nargs="?", help="recipe YAML path or name in recipes/ (e.g. quickstart)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=0.05 trainer.epochs=3")
    train.add_argument("--run-dir", help="run directory (default: <output_dir>/<name>-<timestamp>)")
    train.add_argument("--resume", help="run directory or checkpoint to resume (continues to the recipe's epochs)")
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("evaluate", help="test metrics of a run or checkpoint")
    ev.add_argument("run", help="run directory or .safetensors checkpoint")
    ev.add_argument("--weights", choices=("best", "last"), default="best", help="which checkpoint of a run directory")
    ev.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    ev.add_argument("--data-dir", help="where the dataset is, if not where training found it")
    ev.add_argument("--plot", help="PNG path for a 2-D embedding plot (models with a 2-D embedding layer)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_evaluate)
    rec = sub.add_parser("recipes", help="list the available recipes")
    rec.set_defaults(func=cmd_recipes)
    from convrecipes.lr_find_command import add_lr_find_arguments

    lrf = sub.add_parser("lr-find", help="LR range test of a recipe (also the `lr-find` command)",
                         description="Sweep the LR of a recipe's own training step; writes lr_find.json and lr_find.png.")
    add_lr_find_arguments(lrf)
    lrf.set_defaults(func=cmd_lr_find)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``convrecipes``."""
    parser = build_parser()
    # overrides may come after options (`train quickstart --run-dir d lr=...`), which argparse
    # cannot assign to a positional: collect the stray key=value arguments ourselves
    args, extra = parser.parse_known_args(argv)
    stray = [a for a in extra if a.startswith("-") or "=" not in a]
    if stray or (extra and not hasattr(args, "overrides")):
        parser.error(f"unrecognized arguments: {' '.join(stray or extra)}")
    if extra:
        args.overrides = list(args.overrides) + extra
    try:
        return args.func(args)
    except ConvrecipesError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; the last checkpoint in the run directory is intact (resume with --resume)", file=sys.stderr)
        return 130


def lr_find_main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of ``lr-find``: the same as ``convrecipes lr-find``."""
    return main(["lr-find", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
