"""The LR range test: the sweep (``find_lr``, on the trainer's public step and
snapshot/restore), the rules that read LRs off its curve, the result with its JSON and
plot, and the ``lr-find`` command with ``optimizer.lr=auto``."""

from convrecipes.lr_finder.result import LRFinderResult, RepeatedLRFinderResult
from convrecipes.lr_finder.rules import (
    CONSENSUS_KEY,
    CYCLIC_KEYS,
    LR_RULES,
    SUGGESTION_KEYS,
    agreeing_rules,
    cyclic_max_index,
    debiased_ema,
    divergence_index,
    geometric_mean,
    spread_of,
    steepest_index,
    suggest,
    sweep_lrs,
    valley_index,
)
from convrecipes.lr_finder.sweep import find_lr, find_lr_repeated

__all__ = [
    "find_lr", "find_lr_repeated", "LRFinderResult", "RepeatedLRFinderResult", "suggest", "sweep_lrs",
    "debiased_ema", "steepest_index", "valley_index", "cyclic_max_index", "divergence_index", "agreeing_rules",
    "spread_of", "geometric_mean", "LR_RULES", "SUGGESTION_KEYS", "CONSENSUS_KEY", "CYCLIC_KEYS",
    "resolve_auto_lr",
]


def resolve_auto_lr(*args, **kwargs):  # noqa: ANN002, ANN003 - re-exported lazily (the command imports build)
    """See ``convrecipes.lr_finder.command.resolve_auto_lr``."""
    from convrecipes.lr_finder.command import resolve_auto_lr as resolve

    return resolve(*args, **kwargs)
