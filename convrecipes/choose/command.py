"""``convrecipes compare RECIPE --models A,B [--seeds 0 1] [--fractions ...] [key=value ...]``.

Kept apart from ``cli.py``, which only adds these arguments and calls ``cmd_compare``.
"""

from __future__ import annotations

import argparse

from convrecipes.errors import RecipeError


def add_compare_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``compare`` arguments to ``parser``."""
    from convrecipes.choose.candidates import FAMILIES, RESIZE_SIZES

    families = ", ".join(FAMILIES)
    parser.add_argument("recipe", help="recipe YAML path or name in recipes/ (e.g. fashion_mnist)")
    parser.add_argument("overrides", nargs="*",
                        help="key=value overrides for every model, e.g. trainer.epochs=3 data.subset_per_class=500")
    parser.add_argument("--models", help=f"comma-separated timm names (ours included), e.g. tiny_cnn,resnet10t,"
                                         f"efficientnet_b0; 'families' is: {families} (default: the recipe's model)")
    parser.add_argument("--seeds", nargs="+", metavar="SEED",
                        help="seeds every model is trained with, e.g. --seeds 0 1 (default: the recipe's seed)")
    parser.add_argument("--out", help="comparison directory; runs go to <out>/runs/<model>_seed<s> and are reused "
                                      "or resumed by a second call (default: <output_dir>/compare-<recipe>, or "
                                      "<output_dir>/learning-curve-<recipe> with --fractions)")
    parser.add_argument("--image-size", default="auto",
                        help=f"auto: resize only a model that cannot take the data's size, to the smallest of "
                             f"{', '.join(map(str, RESIZE_SIZES))} that works (with a note); native: refuse such a "
                             f"model; N: resize every model to N x N (default auto)")
    parser.add_argument("--fractions",
                        help="learning curves instead of the table: train at these stratified fractions of the "
                             "training set (data.subset_fraction; they replace the recipe's data.subset_per_class), "
                             "e.g. 0.05,0.1,0.3,1.0")
    parser.add_argument("--flat-threshold", type=float, default=0.5,
                        help="with --fractions: the curve has flattened when its last step gains fewer validation "
                             "top-1 points than this per doubling of the data (default 0.5)")
    parser.add_argument("--latency-batch", type=int, default=64,
                        help="the larger batch latency is measured at, besides batch 1 (default 64)")
    parser.add_argument("--metric", choices=("val_top1", "test_top1"), default="val_top1",
                        help="accuracy of the Pareto front (default val_top1: choosing by test accuracy tunes on "
                             "the test set)")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the training-memory measurement (one fresh Python process per model)")
    parser.add_argument("--remeasure", action="store_true",
                        help="measure latency and memory again instead of reusing <out>/measurements")
    return parser


def _seeds_and_overrides(args: argparse.Namespace) -> tuple[list[int], list[str]]:
    """``--seeds`` takes what follows it, so overrides written after it land there: split them off."""
    seeds, overrides = [], list(args.overrides)
    for item in args.seeds or ():
        if "=" in item:
            overrides.append(item)
            continue
        for part in item.split(","):
            try:
                seeds.append(int(part))
            except ValueError:
                raise RecipeError(f"--seeds takes integers (e.g. --seeds 0 1), got {part!r}") from None
    return seeds, overrides


def cmd_compare(args: argparse.Namespace) -> int:
    """Run ``convrecipes compare``."""
    seeds, overrides = _seeds_and_overrides(args)
    if args.fractions:
        from convrecipes.choose.learning_curves import learning_curve

        learning_curve(args.recipe, args.models, args.fractions, seeds=seeds or None, overrides=overrides,
                       out_dir=args.out, image_size=args.image_size, threshold=args.flat_threshold)
        return 0
    from convrecipes.choose.comparison import compare

    compare(args.recipe, args.models, seeds=seeds or None, overrides=overrides, out_dir=args.out,
            image_size=args.image_size, latency_batch=args.latency_batch, metric=args.metric,
            memory=not args.no_memory, remeasure=args.remeasure)
    return 0
