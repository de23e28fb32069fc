"""The LR range test's pure formulas: the sweep's LRs, the two smoothings of its loss, and
the rules that read learning rates off a curve (Smith 2017; fastai / torch-lr-finder).

Two smoothings, for two jobs:

- ``debiased_ema`` (fastai's online EMA, beta 0.98) runs *during* the sweep, for the stop
  rule: it only sees the past, so it lags. At 100 steps over 8 decades its memory of about
  49 steps is 4 decades of LR, and every rule read off it moves with the sweep length.
- ``centred_smooth`` runs on the *finished* sweep: a centred running median, then a centred
  moving average, both over a window in decades of LR (``SMOOTH_WINDOW_DECADES``), so it has
  no lag and means the same thing at 100 or 300 steps. The suggestions are read off it.

Suggestions (``suggest``), read off the smoothed loss without its first 10% (in an exp
sweep a fixed 0.8 decades) and the last half window (where the centred window is cut
short): ``steepest`` (most negative slope against log LR, on the way down to the
minimum), ``valley`` (fastai's default rule, with the plateau before the descent flattened
first), ``min_div_10`` (the LR of the lowest loss / 10), ``consensus`` (the geometric mean
of those three), and the cyclical bounds ``cyclic_max`` (where the loss has covered 80% of
its descent: "where it stops descending steeply") and ``cyclic_base`` (max / 4, Smith).
The rules were made for exponential sweeps; on a linear sweep the skipped first 10% is a
tenth of the whole LR range.
"""

from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import numpy as np

from convrecipes.errors import RecipeError

SWEEP_MODES = ("exp", "linear")
# The rules that each suggest an LR to train with (the cyclical bounds are reported apart).
LR_RULES = ("steepest", "valley", "min_div_10")
# The geometric mean of the rules' LRs: each rule errs in its own direction on a given
# curve (valley low, steepest high and jumpy from seed to seed), and their mean in log
# space moves less from seed to seed than any one of them. `optimizer.lr=auto` uses it
# under non-annealing schedules (see convrecipes.lr_finder.command.auto_lr_rule).
CONSENSUS_KEY = "consensus"
CYCLIC_KEYS = ("cyclic_base", "cyclic_max")
SUGGESTION_KEYS = LR_RULES + (CONSENSUS_KEY,) + CYCLIC_KEYS
# Smith 2017: "set base_lr to 1/3 or 1/4 of max_lr".
CYCLIC_BASE_DIVISOR = 4.0
# cyclic_max is where the smoothed loss has covered this fraction of its descent from the
# plateau before the descent to its minimum: "where the loss stops descending steeply".
# A level, not a slope, so that noise in the curve barely moves it.
CYCLIC_DESCENT_FRACTION = 0.8
# Rules agree when their LRs are within this factor of each other.
AGREEMENT_FACTOR = 2.0
# A descent smaller than this fraction of the starting loss counts as "never descends".
MIN_RELATIVE_DESCENT = 0.05
# The width, in decades of LR, of the centred window the suggestions' smoothing uses. Wide
# enough to average ~7 points of a 100-step 8-decade sweep, narrow enough that the loss
# minimum and the knee of the descent are not smeared (a symmetric window has no bias on a
# straight stretch of the curve, only where it bends).
SMOOTH_WINDOW_DECADES = 0.5
# valley: before the longest decreasing run is looked for, the curve is flattened above the
# level where the loss has covered this fraction of its descent. On a flat but noisy plateau
# a strictly decreasing subsequence can otherwise thread through the noise, and its length
# (so fastai's valley) then depends on how many plateau points the sweep has.
VALLEY_PLATEAU_FRACTION = 0.1
# A warning when the LR rules' suggestions span more than this factor: their geometric mean
# (consensus) is then pulled towards whichever rule is off (often a noisy steepest).
DISAGREEMENT_FACTOR = 10.0


# ---------------------------------------------------------------------------------------
# Pure formulas


def sweep_lrs(start_lr: float, end_lr: float, num_iters: int, mode: str = "exp") -> list[float]:
    """The LR of each sweep step: ``start_lr`` at step 0, ``end_lr`` at step ``num_iters - 1``.

    ``exp``: ``start * (end / start) ** (i / (n - 1))`` (equal ratios, fastai's ``SchedExp``);
    ``linear``: ``start + (end - start) * i / (n - 1)`` (Smith's linear ramp).
    """
    check_sweep_args(start_lr, end_lr, num_iters, mode)
    last = num_iters - 1
    if mode == "exp":
        return [start_lr * (end_lr / start_lr) ** (i / last) for i in range(num_iters)]
    return [start_lr + (end_lr - start_lr) * i / last for i in range(num_iters)]


def debiased_ema(values: Sequence[float], beta: float = 0.98) -> list[float]:
    """Exponential moving average with bias correction (Adam's, fastai's smoothed loss).

    ``avg_i = beta * avg_{i-1} + (1 - beta) * x_i`` from ``avg_{-1} = 0``, reported as
    ``avg_i / (1 - beta ** (i + 1))``; the first value is ``x_0`` itself.
    """
    out, avg = [], 0.0
    for i, x in enumerate(values):
        avg = beta * avg + (1.0 - beta) * float(x)
        out.append(avg / (1.0 - beta ** (i + 1)))
    return out


def centred_smooth(lrs: Sequence[float], losses: Sequence[float],
                   window_decades: float = SMOOTH_WINDOW_DECADES) -> list[float]:
    """Zero-lag smoothing of a finished sweep: a centred running median, then a centred
    moving average of the medians, each over the points within ``window_decades / 2`` of
    log10(lr) on either side.

    Near either end the window shrinks symmetrically (to the distance to that end), so it
    stays centred there too; the average weights each point by its share of the log-LR axis,
    so a linear sweep (dense at high LRs) is averaged over log LR as an exp sweep is. The
    window is in decades, not points, so a 100-step and a 300-step sweep over the same range
    are smoothed alike. Losses from the first non-finite one on stay NaN. ``window_decades``
    0 returns the losses unchanged.
    """
    if not window_decades >= 0:
        raise RecipeError(f"the smoothing window must be >= 0 decades, got {window_decades!r}; 0.5 is usual "
                          f"(0: no smoothing)")
    out = [float(v) for v in losses]
    n = next((i for i, v in enumerate(out) if not math.isfinite(v)), len(out))
    if n < 3 or window_decades == 0:
        return out[:n] + [math.nan] * (len(out) - n)
    x = np.log10(np.asarray(lrs[:n], dtype=np.float64))
    loss = np.asarray(out[:n], dtype=np.float64)
    half = np.minimum(window_decades / 2, np.minimum(x - x[0], x[-1] - x))
    eps = 1e-9 * max(1.0, float(np.abs(x).max()))
    lo = np.searchsorted(x, x - half - eps, side="left")
    hi = np.searchsorted(x, x + half + eps, side="right")
    median = np.array([np.median(loss[a:b]) for a, b in zip(lo, hi)])
    weight = np.gradient(x)
    smooth = [float(np.average(median[a:b], weights=weight[a:b])) for a, b in zip(lo, hi)]
    return smooth + [math.nan] * (len(out) - n)


def flatten_plateau(losses: Sequence[float], fraction: float = VALLEY_PLATEAU_FRACTION) -> list[float]:
    """The curve clipped from above at the level where it has covered ``fraction`` of its
    descent (from the highest point before its minimum to the minimum), so a noisy plateau
    becomes flat. Unchanged when there is no descent."""
    loss = np.asarray(losses, dtype=np.float64)
    if len(loss) < 2:
        return loss.tolist()
    low = int(np.argmin(loss))
    peak = int(np.argmax(loss[: low + 1]))
    drop = loss[peak] - loss[low]
    if not drop > 0:
        return loss.tolist()
    return np.minimum(loss, loss[peak] - fraction * drop).tolist()


def steepest_index(lrs: Sequence[float], losses: Sequence[float]) -> Optional[int]:
    """Index of the most negative slope ``d loss / d log(lr)`` (forward differences), or None
    when the loss never falls. Like fastai's ``steep``, the left end of the steepest segment."""
    if len(losses) < 2:
        return None
    log_lr = np.log(np.asarray(lrs, dtype=np.float64))
    loss = np.asarray(losses, dtype=np.float64)
    slopes = np.diff(loss) / np.diff(log_lr)
    i = int(np.argmin(slopes))
    return i if slopes[i] < 0 else None


def valley_index(losses: Sequence[float]) -> Optional[int]:
    """fastai's ``valley`` rule (developed by ESRI; fastai's default suggestion).

    The valley is the longest strictly decreasing subsequence of the loss (points need not
    be adjacent); with ``L`` its length and ``e`` its last index, fastai takes its start as
    ``s = e - L`` and suggests index ``s + floor((e - s) / 3) + floor((e - s) / 6)``, about
    half-way down the valley (fastai's docs say "roughly 2/3"; its arithmetic gives 1/2).
    Reimplemented from that description; None when the loss never decreases.
    """
    loss = np.asarray(losses, dtype=np.float64)
    n = len(loss)
    if n < 2:
        return None
    lds = np.ones(n, dtype=np.int64)
    for i in range(1, n):
        higher = loss[:i] > loss[i]
        if higher.any():
            lds[i] = lds[:i][higher].max() + 1
    end = int(np.argmax(lds))  # the first index reaching the longest length, as fastai
    if lds[end] < 2:
        return None
    start = end - int(lds[end])
    sections = (end - start) / 3
    return min(max(start + int(sections) + int(sections / 2), 0), n - 1)


def cyclic_max_index(losses: Sequence[float], fraction: float = CYCLIC_DESCENT_FRACTION) -> Optional[int]:
    """Where the loss "stops descending steeply": the first index, between the highest point
    before the minimum and the minimum, at which the loss has covered ``fraction`` of that
    descent. None when there is no descent."""
    loss = np.asarray(losses, dtype=np.float64)
    if len(loss) < 2:
        return None
    low = int(np.argmin(loss))
    peak = int(np.argmax(loss[: low + 1]))
    drop = loss[peak] - loss[low]
    if not drop > 0:
        return None
    level = loss[peak] - fraction * drop
    return peak + int(np.argmax(loss[peak: low + 1] <= level))


def divergence_index(smoothed: Sequence[float], min_rise: float = MIN_RELATIVE_DESCENT) -> Optional[int]:
    """Where the loss began its final rise: the minimum of a zero-lag smoothed curve
    (``centred_smooth``), over its finite values, provided the curve rises after it by at
    least ``min_rise`` times the larger of the minimum's magnitude and the descent into it.
    None when the curve is still falling at its end (a sweep stopped by a NaN while the loss
    fell): no point of it is a divergence.

    The stop rule fires later than this, by construction: the online EMA needs several steps
    of a rising loss before it exceeds ``diverge_threshold`` times its best.
    """
    finite = []
    for v in smoothed:
        if not math.isfinite(v):
            break
        finite.append(float(v))
    if len(finite) < 2:
        return None
    x = np.asarray(finite, dtype=np.float64)
    low = int(np.argmin(x))
    if low == len(x) - 1:
        return None
    descent = float(x[: low + 1].max() - x[low])
    rise = float(x[low + 1:].max() - x[low])
    return low if rise >= min_rise * max(abs(float(x[low])), descent, 1e-12) else None


def disagreement_warning(suggestions: dict[str, Optional[float]], factor: float = DISAGREEMENT_FACTOR,
                         ) -> Optional[str]:
    """A warning when the LR rules (``LR_RULES``) that gave an LR span more than ``factor``;
    None when they agree that well (or fewer than two gave one)."""
    known = {k: suggestions.get(k) for k in LR_RULES if suggestions.get(k)}
    if len(known) < 2:
        return None
    low, high = min(known, key=known.get), max(known, key=known.get)
    ratio = known[high] / known[low]
    if ratio <= factor:
        return None
    listing = ", ".join(f"{k} {v:.3g}" for k, v in known.items())
    return (f"the LR rules disagree by {ratio:.0f}x ({listing}): {CONSENSUS_KEY}, their geometric mean, is pulled "
            f"towards the odd one out; look at lr_find.png and trust the rule that sits on the descent, or run "
            f"--repeat 3 to see which one moves between seeds")


def agreeing_rules(values: dict[str, Optional[float]], factor: float = AGREEMENT_FACTOR) -> dict[str, Any]:
    """Which rules agree: every pair within ``factor`` of each other, and the largest group of
    rules that all lie within ``factor`` (ties: the group with the lowest LRs)."""
    known = sorted(((v, k) for k, v in values.items() if v is not None and v > 0))
    pairs = [[a, b] for i, (va, a) in enumerate(known) for vb, b in known[i + 1:] if vb / va <= factor]
    best: list[str] = []
    for i in range(len(known)):
        group = [k for v, k in known[i:] if v / known[i][0] <= factor]
        if len(group) > len(best):
            best = group
    return {"factor": factor, "pairs": pairs, "largest_group": best if len(best) > 1 else []}


def geometric_mean(values: Sequence[Optional[float]]) -> Optional[float]:
    """The geometric mean of the positive values given (None where there is none), kept
    within [min, max] against exp(log) rounding."""
    known = [float(v) for v in values if v is not None and v > 0]
    if not known:
        return None
    return min(max(math.exp(sum(math.log(v) for v in known) / len(known)), min(known)), max(known))


def spread_of(values: Sequence[float]) -> dict[str, Any]:
    """min, max, geometric mean and max/min of positive LRs."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "values": [], "min": None, "max": None, "geomean": None, "ratio": None}
    lo, hi = min(vals), max(vals)
    return {"n": len(vals), "values": vals, "min": lo, "max": hi, "geomean": geometric_mean(vals), "ratio": hi / lo}


def suggest(lrs: Sequence[float], smoothed: Sequence[float], num_iters: int, stop_reason: str = "completed",
            window_decades: float = SMOOTH_WINDOW_DECADES,
            ) -> tuple[dict[str, Optional[float]], dict[str, int], list[str]]:
    """Suggestions from a sweep's smoothed loss (``centred_smooth`` of the raw losses).

    The first ``num_iters // 10`` points (a fixed share of the log-LR range in an exp
    sweep) are ignored, and so are the points within ``window_decades / 2`` of the last
    recorded LR (at least one: there the centred window was cut short) and everything from
    the first non-finite loss on.

    Returns:
        ``({rule: lr or None}, {rule: index into lrs}, warnings)`` for the rules
        ``steepest`` (up to the minimum), ``valley`` (on the curve with its plateau flattened,
        ``flatten_plateau``), ``min_div_10`` (the LR of the lowest loss / 10), their
        geometric mean ``consensus`` and the cyclical bounds ``cyclic_max`` (see
        ``cyclic_max_index``) and ``cyclic_base`` (``cyclic_max / 4``, Smith). A curve that
        never descends gives no suggestions; rules more than ``DISAGREEMENT_FACTOR`` apart
        give a warning.
    """
    suggestions: dict[str, Optional[float]] = {k: None for k in SUGGESTION_KEYS}
    points: dict[str, int] = {}
    warnings: list[str] = []
    n = next((i for i, v in enumerate(smoothed) if not math.isfinite(v)), len(smoothed))
    skip_start = num_iters // 10
    if n == 0:
        warnings.append("the sweep recorded no finite loss: the loss is NaN or infinite from the first step; lower "
                        "start_lr, check the data and the loss, or use bf16 instead of fp16")
        return suggestions, points, warnings
    log_lr = np.log10(np.asarray(lrs[:n], dtype=np.float64))
    skip_end = max(1, int(np.sum(log_lr > log_lr[-1] - window_decades / 2)))
    lo, hi = skip_start, n - skip_end
    lowest = int(np.argmin(np.asarray(smoothed[:n], dtype=np.float64)))
    if stop_reason != "completed" and (len(smoothed) <= max(3, num_iters // 10) or lowest <= skip_start):
        warnings.append(f"the loss diverges almost at once (stopped after {len(smoothed)} of {num_iters} steps at "
                        f"lr {lrs[len(smoothed) - 1]:.3g}; lowest smoothed loss at step {lowest + 1}): the sweep "
                        f"starts above the usable range; lower start_lr (e.g. 100x) and run again")
    if hi - lo < 3:
        warnings.append(f"only {max(hi - lo, 0)} usable points ({len(smoothed)} recorded, the first {skip_start} "
                        f"and last {skip_end} ignored): too few for suggestions; lower start_lr or raise num_iters")
        return suggestions, points, warnings
    win_lrs, win = list(lrs[lo:hi]), list(smoothed[lo:hi])
    wlow = int(np.argmin(win))
    wpeak = int(np.argmax(win[: wlow + 1]))
    reference = max(abs(win[wpeak]), 1e-12)
    descent = (win[wpeak] - win[wlow]) / reference
    if descent < MIN_RELATIVE_DESCENT:
        warnings.append(f"the loss never descends (it falls by {100 * descent:.1f}% at most between lr "
                        f"{win_lrs[0]:.3g} and {win_lrs[-1]:.3g}), so no suggestion is given: no LR in this range "
                        f"trains the model; widen the range (start_lr/end_lr), raise num_iters, or check that the "
                        f"model's parameters are trainable")
        return suggestions, points, warnings
    if stop_reason == "completed" and wlow == len(win) - 1:
        warnings.append(f"the loss was still falling at the end of the sweep (lr {win_lrs[-1]:.3g}): the usable "
                        f"range may extend higher; raise end_lr")
    rules = {
        # only on the way down to the minimum: past it the loss is diverging, and a second
        # drop after a bump there (seen on Fashion-MNIST) is no place to train
        "steepest": steepest_index(win_lrs[: wlow + 1], win[: wlow + 1]),
        "valley": valley_index(flatten_plateau(win)),
        "min_div_10": wlow,
        "cyclic_max": cyclic_max_index(win),
    }
    for key, idx in rules.items():
        if idx is None:
            continue
        points[key] = lo + idx
        suggestions[key] = float(win_lrs[idx]) / (10.0 if key == "min_div_10" else 1.0)
    if suggestions["cyclic_max"] is not None:
        suggestions["cyclic_base"] = suggestions["cyclic_max"] / CYCLIC_BASE_DIVISOR
    suggestions[CONSENSUS_KEY] = geometric_mean([suggestions[k] for k in LR_RULES])
    disagreement = disagreement_warning(suggestions)
    if disagreement:
        warnings.append(disagreement)
    return suggestions, points, warnings


def read_sweep(lrs: Sequence[float], losses: Sequence[float], num_iters: int, stop_reason: str = "completed",
               window_decades: float = SMOOTH_WINDOW_DECADES,
               ) -> tuple[list[float], dict[str, Optional[float]], dict[str, int], list[str]]:
    """A finished sweep's raw losses -> ``(centred_smooth(...), *suggest(...))``: what
    ``find_lr`` reports."""
    centred = centred_smooth(lrs, losses, window_decades)
    return (centred, *suggest(lrs, centred, num_iters, stop_reason, window_decades))


def check_sweep_args(start_lr: float, end_lr: float, num_iters: int, mode: str) -> None:
    if mode not in SWEEP_MODES:
        raise RecipeError(f"LR sweep mode must be one of {', '.join(SWEEP_MODES)}, got {mode!r}; use exp "
                          f"(fastai-style, 1e-7 to 10) or linear (Smith's ramp over a narrower range)")
    for name, value in (("start_lr", start_lr), ("end_lr", end_lr)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise RecipeError(f"{name} must be a positive number, got {value!r}; e.g. start_lr=1e-7 end_lr=10")
    if end_lr <= start_lr:
        raise RecipeError(f"end_lr ({end_lr:g}) must be above start_lr ({start_lr:g}); the sweep raises the LR")
    if isinstance(num_iters, bool) or not isinstance(num_iters, int) or num_iters < 2:
        raise RecipeError(f"num_iters must be an integer >= 2, got {num_iters!r}; about 100 is usual")


