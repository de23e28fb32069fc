"""Command line: ``convrecipes train|evaluate|predict|export|recipes|lr-find|find-label-issues|compare`` (and ``lr-find``).

User errors (a bad recipe key, missing data, a wrong checkpoint, a NaN loss) print one
message and exit with code 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Optional, Sequence

from convrecipes.errors import ConvrecipesError, RecipeError


def _print_table(rows: dict[str, Any], title: str) -> None:
    width = max(len(k) for k in rows) if rows else 0
    print(title)
    for key, value in rows.items():
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        if isinstance(value, float) and key.endswith(("top1", "top5", "recall_at_1")):
            shown = f"{value:.2f}"
        print(f"  {key:<{width}}  {shown}")


def _print_run_results(results: dict[str, Any], recipe: Any, run_dir: Any, title: str) -> None:
    rows = {f"final {k}": v for k, v in results["test_final"].items()}
    if "test_final_ema" in results:
        rows.update({f"final EMA {k}": v for k, v in results["test_final_ema"].items()})
    if "test_best" in results:
        rows.update({f"best (epoch {results['best_epoch']}) {k}": v for k, v in results["test_best"].items()})
    rows["wall time (s)"] = results["wall_time_s"]
    if results.get("unseen_test_classes"):
        print(f"{recipe.data.name}: the test classes are unseen in training, so there is no test accuracy; "
              f"`convrecipes evaluate {run_dir} --weights last` reports Recall@1 on them")
    _print_table(rows, title)


def _stage_recipes(args: argparse.Namespace) -> tuple[list[Any], list[list[str]]]:
    """One recipe per stage: the recipe with its overrides, then each ``--then`` list added
    to the previous stage's overrides; ``--init-from`` applies to the first stage."""
    from convrecipes.recipe import load_recipe, parse_override

    overrides = list(args.overrides)
    stage_overrides, recipes = [overrides], []
    cumulative = list(overrides)
    for extra in args.then or []:
        for text in extra:
            if parse_override(text)[0] == "model.init_from":
                raise RecipeError(f"--then {text}: every later stage starts from the previous stage's weights; drop "
                                  f"model.init_from from --then (--init-from sets the first stage's)")
        stage_overrides.append(list(extra))
    for i, extra in enumerate(stage_overrides):
        if i:
            cumulative += extra
        recipe = load_recipe(args.recipe, cumulative)
        if i == 0 and args.init_from:
            recipe.model.init_from = args.init_from
        recipes.append(recipe)
    return recipes, stage_overrides


def _print_stages(staged: Any) -> None:
    """Each stage's test results (and its initial weights' where measured), then the summary file."""
    from convrecipes.run import process_state

    if not process_state().is_main_process:
        return
    for entry, run in zip(staged.results["stages"], staged.stages):
        if "test_init" in entry:
            _print_table(entry["test_init"], f"stage {entry['stage']}: its initial weights (stage "
                                             f"{entry['stage'] - 1}'s) on its test data, before training:")
        _print_run_results(run.results, run.recipe, run.run_dir,
                           f"stage {entry['stage']} ({' '.join(entry.get('overrides', [])) or 'the recipe'})"
                           f" test results ({run.run_dir / 'results.json'}):")
    print(f"summary of {len(staged.stages)} stages: {staged.run_dir / 'results.json'}")


def cmd_train(args: argparse.Namespace) -> int:
    from convrecipes.recipe import load_recipe
    from convrecipes.run import (is_multi_stage_run, process_state, recipe_of_checkpoint, resume_stages, train_recipe,
                                 train_stages)

    resume_ckpt = None
    if args.dry_run:
        from convrecipes.show import cmd_dry_run

        return cmd_dry_run(args)
    if args.resume:
        if args.init_from or args.then:
            raise RecipeError(f"--resume continues a run with its recorded recipe, so --init-from and --then do not "
                              f"apply; drop them (a multi-stage run: resume the unfinished stage, --resume "
                              f"{args.resume}/stageN)")
        overrides = list(args.overrides)
        if args.recipe and "=" in args.recipe:  # `--resume R key=value ...`: argparse took it for the recipe
            overrides.insert(0, args.recipe)
        elif args.recipe:
            print(f"resuming with the recipe recorded in {args.resume}; ignoring {args.recipe}", file=sys.stderr)
        if is_multi_stage_run(args.resume):
            if overrides:
                raise RecipeError(f"{args.resume} is a multi-stage run: it resumes with the stages' recorded recipes, "
                                  f"so overrides do not apply; drop {' '.join(overrides)} (or resume one stage: "
                                  f"--resume {args.resume}/stageN)")
            _print_stages(resume_stages(args.resume))
            return 0
        recipe, resume_ckpt = recipe_of_checkpoint(args.resume, prefer="last", overrides=overrides)
    else:
        if not args.recipe:
            raise ConvrecipesError("name a recipe (e.g. `convrecipes train recipes/quickstart.yaml`) or pass --resume RUN_DIR")
        if args.then:
            recipes, stage_overrides = _stage_recipes(args)
            staged = train_stages(recipes, args.run_dir, overwrite=args.overwrite, stage_overrides=stage_overrides)
            _print_stages(staged)
            return 0
        recipe = load_recipe(args.recipe, args.overrides)
        if args.init_from:
            recipe.model.init_from = args.init_from
    run = train_recipe(recipe, args.run_dir, resume_from=resume_ckpt, overwrite=args.overwrite)
    if process_state().is_main_process:
        _print_run_results(run.results, recipe, run.run_dir, f"test results ({run.run_dir / 'results.json'}):")
    return 0


def _model_kwargs(pairs: Optional[Sequence[str]]) -> dict[str, Any]:
    """``["column=2"]`` -> ``{"column": 2}`` (values parsed as YAML)."""
    import yaml

    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RecipeError(f"--model-kwarg takes KEY=VALUE (e.g. --model-kwarg column=2), got {pair!r}")
        out[key] = yaml.safe_load(value)
    return out


def cmd_evaluate(args: argparse.Namespace) -> int:
    from convrecipes.evaluation_report import default_report_dir, per_class_table
    from convrecipes.run import evaluate_run, process_state

    if args.top_losses < 0:
        raise ConvrecipesError(f"--top-losses takes the number of images on the sheet (0: none), got {args.top_losses}")
    result = evaluate_run(args.run, args.weights, ema=args.ema, data_dir=args.data_dir, plot=args.plot,
                          model_kwargs=_model_kwargs(args.model_kwarg), top_losses=args.top_losses,
                          report_dir=args.out or default_report_dir(args.run, args.weights))
    if not process_state().is_main_process:
        return 0
    if args.json:
        if args.plot:
            print(f"wrote {args.plot}", file=sys.stderr)
        print(json.dumps({k: v for k, v in result.items() if k not in ("epoch", "dataset", "weights",
                                                                         "unseen_test_classes")}))
        return 0
    if result["unseen_test_classes"]:
        print(f"{result['dataset']}: the test classes are not among the training classes, so there is no test "
              "accuracy; read test_recall_at_1 (nearest neighbour among the test images)")
    metrics = {k: v for k, v in result.items() if k.startswith("test_")}
    changed = "".join(f", model.kwargs.{k}={v}" for k, v in result.get("model_kwargs", {}).items())
    _print_table(metrics, f"{result['checkpoint']} ({result['weights']} weights, epoch {result['epoch']}{changed}) "
                          f"on the {result['dataset']} test set:")
    if "per_class" in result:
        print(f"per class (overall top-1 {result['test_top1']:.2f}%):")
        print(per_class_table(result["per_class"], result["macro_average"]))
        print(f"wrote {', '.join(result['report_files'])}")
    if args.plot:
        print(f"wrote {args.plot}")
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
    from convrecipes.lr_finder.command import run_lr_find

    return run_lr_find(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="convrecipes", description="Training recipes for image classification.")
    sub = parser.add_subparsers(dest="command", required=True)
    from convrecipes.show import SHOW_DESCRIPTION, TRAIN_EPILOG, add_show_arguments, cmd_show

    train = sub.add_parser("train", help="train a recipe", description="Train a recipe; writes a run directory.",
                           epilog=TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    train.add_argument("recipe", nargs="?", help="recipe YAML path or name in recipes/ (e.g. quickstart)")
    train.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optimizer.lr=0.05 trainer.epochs=3")
    train.add_argument("--dry-run", action="store_true",
                       help="print what `convrecipes show` prints, the data summary and the model's parameter "
                            "count, and stop: nothing trains, no run directory is created")
    train.add_argument("--run-dir", help="run directory (default: <output_dir>/<name>-<timestamp>; for image_folder "
                                         "data: <data folder>-<timestamp>)")
    train.add_argument("--resume", help="run directory or checkpoint to resume (continues to the recipe's epochs)")
    train.add_argument("--overwrite", action="store_true",
                       help="--run-dir holds a run: move it aside to <dir>.old-<timestamp> and start afresh")
    train.add_argument("--init-from", metavar="RUN",
                       help="start from the model weights of this run directory or checkpoint (the classifier is "
                            "re-initialised when the classes differ) or of a local .safetensors of pretrained "
                            "weights: the recipe key model.init_from")
    train.add_argument("--then", action="append", nargs="+", metavar="KEY=VALUE",
                       help="then train another stage from this one's weights, with these overrides added, e.g. "
                            "--then data.image_size=16 trainer.epochs=2 optimizer.lr=0.01; writes RUN/stage1, "
                            "RUN/stage2 and a summary RUN/results.json; repeatable (one more stage each)")
    train.set_defaults(func=cmd_train)
    ev = sub.add_parser("evaluate", help="test metrics of a run or checkpoint")
    ev.add_argument("run", help="run directory or .safetensors checkpoint")
    ev.add_argument("--weights", choices=("best", "last"), default="best", help="which checkpoint of a run directory")
    ev.add_argument("--ema", action="store_true", help="evaluate the EMA weights")
    ev.add_argument("--data-dir", help="where the dataset is, if not where training found it")
    ev.add_argument("--plot", help="PNG path for a 2-D embedding plot (models with a 2-D embedding layer: "
                                   "model.embedding_dim=2; any other model is refused before evaluating)")
    ev.add_argument("--out", metavar="DIR", help="where to write confusion_matrix.png, top_losses.png and "
                                                 "evaluation.json (default: <run dir>/evaluation)")
    ev.add_argument("--top-losses", type=int, default=16, metavar="K",
                    help="the K most confidently wrong test images on top_losses.png (default 16; 0: none)")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.add_argument("--model-kwarg", action="append", metavar="KEY=VALUE",
                    help="rebuild the model with this model.kwargs entry changed, e.g. column=2 (FractalNet's "
                         "deepest column alone) or branch=0 (one SBN branch alone); repeatable")
    ev.set_defaults(func=cmd_evaluate)
    rec = sub.add_parser("recipes", help="list the available recipes")
    rec.set_defaults(func=cmd_recipes)
    show = sub.add_parser("show", help="print a resolved recipe: every key, its value and its help",
                          description=SHOW_DESCRIPTION)
    add_show_arguments(show)
    show.set_defaults(func=cmd_show)
    from convrecipes.lr_finder.command import add_lr_find_arguments

    lrf = sub.add_parser("lr-find", help="LR range test of a recipe (also the `lr-find` command)",
                         description="Sweep the LR of a recipe's own training step; writes lr_find.json and lr_find.png.")
    add_lr_find_arguments(lrf)
    lrf.set_defaults(func=cmd_lr_find)
    from convrecipes.label_issues import add_arguments as add_label_issues_arguments, cmd_find_label_issues

    fli = sub.add_parser("find-label-issues", help="rank the training images whose label is probably wrong",
                         description="Cross-train the recipe on k folds and flag the images a model that never "
                                     "saw them confidently puts in another class (confident learning); writes "
                                     "label_issues.csv, label_issues.png and label_issues_summary.json.")
    add_label_issues_arguments(fli)
    fli.set_defaults(func=cmd_find_label_issues)
    from convrecipes.choose.command import add_compare_arguments, cmd_compare

    cmp = sub.add_parser("compare", help="train several models with one recipe and compare accuracy and cost",
                         description="Train each --models candidate with the same recipe, data, budget and seeds "
                                     "(resumably, into <out>/runs/<model>_seed<s>), measure parameters, MACs, "
                                     "latency and training memory; writes compare.md/.csv/.json and pareto.png. "
                                     "With --fractions: learning curves instead.")
    add_compare_arguments(cmp)
    cmp.set_defaults(func=cmd_compare)
    from convrecipes.predict import add_arguments as add_predict_arguments, cmd_predict

    pred = sub.add_parser("predict", help="classify image files or folders with a trained run",
                          description="Classify image files and folders (recursively) with a run's model, "
                                      "preprocessed as its training images were; writes a CSV of the top-k classes "
                                      "and probabilities. Unreadable files are listed, not fatal.")
    add_predict_arguments(pred)
    pred.set_defaults(func=cmd_predict)
    from convrecipes.export import add_arguments as add_export_arguments, cmd_export

    exp = sub.add_parser("export", help="export a run's model to ONNX or TorchScript",
                         description="Write the run's model as ONNX (dynamic batch) or TorchScript, its plain weights "
                                     "(model.safetensors) and its preprocessing (preprocess.json), and check that "
                                     "the export gives the run's logits on a few test images.")
    add_export_arguments(exp)
    exp.set_defaults(func=cmd_export)
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
