"""The LR range test (Smith 2017, section 3.3; the fastai / torch-lr-finder sweep).

What: train for ``num_iters`` optimizer steps while the LR rises from ``start_lr`` to
``end_lr`` (exponentially, fastai-style, or linearly, as in Smith's paper), record the
loss of every step, smooth it with a debiased exponential moving average, stop once the
smoothed loss exceeds ``diverge_threshold`` times its best, and read learning rates off
the curve. Then put everything back: the sweep leaves no trace on the trainer.

When: before training a new recipe, model, batch size or optimizer; after changing the
global batch size (the right LR moves with it). ``--repeat N`` shows how far to trust the
numbers: the suggestions of a single sweep move from seed to seed.

How it differs from the usual finders:

- It runs the trainer's own ``prepare_batch`` and ``training_step`` (augmentation, mixup,
  composite and distillation objectives are swept as they will be trained) and the
  trainer's own optimizer step (clipping, loss ``post_step``, EMA), one sweep point per
  optimizer step (``grad_accum_steps`` micro-batches). The schedule is not stepped: the
  sweep sets every param group's LR itself, keeping the groups' ratios to the first group.
- Afterwards model, optimizer, schedule, EMA, loss state, gradient scaler, callbacks,
  position, gradients, train/eval modes, the loader's position and every RNG (torch CPU
  and CUDA, Python, NumPy) are restored exactly from an in-memory deep copy, so training
  after ``find_lr`` is bit-identical to training without it. Nothing is written to disk
  (callbacks' ``on_step_end``, which writes checkpoints, is never called).
- Under several processes the loss of a step is the mean over all processes, so every
  rank sees the same curve, stops at the same step and computes the same suggestions; the
  result records the global batch size (per-process batch x processes x accumulation)
  that the LR belongs to.

Suggestions (``suggest``), read off the smoothed loss without its first 10% and last few
points, as fastai does: ``steepest`` (most negative slope against log LR), ``valley``
(fastai's default rule), ``min_div_10`` (the LR of the lowest loss / 10), ``consensus``
(the geometric mean of those three; ``optimizer.lr=auto`` trains with it, or with
``cyclic_max`` under an annealing schedule), and the cyclical bounds ``cyclic_max`` (where the loss has
covered 80% of its descent: "where it stops descending steeply") and ``cyclic_base``
(max / 4, Smith). The rules were made for exponential sweeps; on a linear sweep the
skipped first 10% is a tenth of the whole LR range.

Where the loss diverges: ``stop_lr`` is where the stop rule fired, which lags the real
divergence (the EMA needs several rising steps to reach 4x its best); ``divergence_lr``
reads the raw curve (a centred, zero-lag average) for where the final rise began.

Conventions: point ``i`` pairs ``lrs[i]`` with the loss of the batch computed just before
the update made with ``lrs[i]`` (as fastai and torch-lr-finder record it).
"""

from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Sequence, Union

import numpy as np
import torch

from convrecipes.errors import DataError, RecipeError

if TYPE_CHECKING:
    from convrecipes.trainers.base import Trainer

SWEEP_MODES = ("exp", "linear")
# The rules that each suggest an LR to train with (the cyclical bounds are reported apart).
LR_RULES = ("steepest", "valley", "min_div_10")
# The geometric mean of the rules' LRs: each rule errs in its own direction on a given
# curve (valley low, steepest high and jumpy from seed to seed), and their mean in log
# space moves less from seed to seed than any one of them. `optimizer.lr=auto` uses it
# under non-annealing schedules (see lr_find_command.auto_lr_rule).
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


# ---------------------------------------------------------------------------------------
# Pure formulas


def sweep_lrs(start_lr: float, end_lr: float, num_iters: int, mode: str = "exp") -> list[float]:
    """The LR of each sweep step: ``start_lr`` at step 0, ``end_lr`` at step ``num_iters - 1``.

    ``exp``: ``start * (end / start) ** (i / (n - 1))`` (equal ratios, fastai's ``SchedExp``);
    ``linear``: ``start + (end - start) * i / (n - 1)`` (Smith's linear ramp).
    """
    _check_sweep_args(start_lr, end_lr, num_iters, mode)
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


def divergence_index(losses: Sequence[float], window: int = 5) -> Optional[int]:
    """Where a diverging sweep's loss began its final rise: the minimum of the raw loss
    averaged over a centred ``window`` (zero lag, unlike the EMA; the average keeps one noisy
    batch from deciding), over the finite losses. None for an empty curve.

    The stop rule fires later than this, by construction: the EMA needs several steps of a
    rising loss before it exceeds ``diverge_threshold`` times its best.
    """
    finite = []
    for v in losses:
        if not math.isfinite(v):
            break
        finite.append(float(v))
    if not finite:
        return None
    x = np.asarray(finite, dtype=np.float64)
    half = window // 2
    averaged = [x[max(0, i - half): i + half + 1].mean() for i in range(len(x))]
    return int(np.argmin(averaged))


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


def spread_of(values: Sequence[float]) -> dict[str, Any]:
    """min, max, geometric mean and max/min of positive LRs."""
    vals = [float(v) for v in values]
    if not vals:
        return {"n": 0, "values": [], "min": None, "max": None, "geomean": None, "ratio": None}
    lo, hi = min(vals), max(vals)
    geo = min(max(math.exp(sum(math.log(v) for v in vals) / len(vals)), lo), hi)  # exp(log) rounding
    return {"n": len(vals), "values": vals, "min": lo, "max": hi, "geomean": geo, "ratio": hi / lo}


def suggest(lrs: Sequence[float], smoothed: Sequence[float], num_iters: int, stop_reason: str = "completed",
            ) -> tuple[dict[str, Optional[float]], dict[str, int], list[str]]:
    """Suggestions from a sweep's smoothed loss.

    Like fastai, the first ``num_iters // 10`` points (the warm-up of the smoothing) and the
    last ``min(5, num_iters // 20)`` (at least 1; the smoothed loss lags the explosion) are
    ignored, and so is everything from the first non-finite loss on.

    Returns:
        ``({rule: lr or None}, {rule: index into lrs}, warnings)`` for the rules
        ``steepest``, ``valley``, ``min_div_10`` (the LR of the lowest loss / 10), their
        geometric mean ``consensus`` and the
        cyclical bounds ``cyclic_max`` (see ``cyclic_max_index``) and ``cyclic_base``
        (``cyclic_max / 4``, Smith). A curve that never descends gives no suggestions.
    """
    suggestions: dict[str, Optional[float]] = {k: None for k in SUGGESTION_KEYS}
    points: dict[str, int] = {}
    warnings: list[str] = []
    n = next((i for i, v in enumerate(smoothed) if not math.isfinite(v)), len(smoothed))
    skip_start = num_iters // 10
    skip_end = max(1, min(5, num_iters // 20))
    lo, hi = skip_start, n - skip_end
    if n == 0:
        warnings.append("the sweep recorded no finite loss: the loss is NaN or infinite from the first step; lower "
                        "start_lr, check the data and the loss, or use bf16 instead of fp16")
        return suggestions, points, warnings
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
        "steepest": steepest_index(win_lrs, win),
        "valley": valley_index(win),
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
    suggestions[CONSENSUS_KEY] = consensus_lr([suggestions[k] for k in LR_RULES])
    return suggestions, points, warnings


def consensus_lr(values: Sequence[Optional[float]]) -> Optional[float]:
    """The geometric mean of the rules' LRs that exist (None when none does)."""
    known = [float(v) for v in values if v is not None and v > 0]
    if not known:
        return None
    return math.exp(sum(math.log(v) for v in known) / len(known))


# ---------------------------------------------------------------------------------------
# Results


def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


@dataclass
class LRFinderResult:
    """One sweep: the curve, the suggestions and what they belong to.

    Attributes:
        lrs: the first param group's LR at each recorded step.
        losses: the raw loss of each step (mean over processes).
        smoothed: the debiased EMA of ``losses``.
        suggestions: ``steepest``, ``valley``, ``min_div_10``, ``consensus``, ``cyclic_base``,
            ``cyclic_max`` -> LR (None where the curve gives none).
        warnings: what makes the suggestions untrustworthy (never descends, diverges at once).
        global_batch_size: per-process batch x processes x accumulation steps: the batch
            the LRs belong to.
        stop_reason: ``completed``, ``diverged`` (smoothed > threshold x best) or
            ``non_finite`` (the loss became NaN/inf).
        settings: the sweep's arguments (start_lr, end_lr, num_iters, mode, smooth_beta,
            diverge_threshold, seed) and the process layout.
        points: index into ``lrs`` of each suggestion (min_div_10: of the minimum itself).
        elapsed_s: wall time of the sweep including the state snapshot and restore.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    suggestions: dict[str, Optional[float]]
    warnings: list[str]
    global_batch_size: int
    stop_reason: str = "completed"
    settings: dict[str, Any] = field(default_factory=dict)
    points: dict[str, int] = field(default_factory=dict)
    elapsed_s: float = 0.0

    @property
    def diverged(self) -> bool:
        return self.stop_reason != "completed"

    @property
    def stop_lr(self) -> Optional[float]:
        """The LR of the last recorded step (where a diverging sweep stopped)."""
        return self.lrs[-1] if self.lrs else None

    @property
    def divergence_lr(self) -> Optional[float]:
        """For a sweep that stopped on divergence: the LR from which the loss only rose
        (see ``divergence_index``); None for a completed sweep."""
        if not self.diverged:
            return None
        i = divergence_index(self.losses)
        return None if i is None else self.lrs[i]

    def agreement(self) -> dict[str, Any]:
        """Which of the LR rules agree within 2x (see ``agreeing_rules``)."""
        return agreeing_rules({k: self.suggestions.get(k) for k in LR_RULES})

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data (non-finite losses become null)."""
        return {
            "suggestions": dict(self.suggestions),
            "agreement": self.agreement(),
            "warnings": list(self.warnings),
            "global_batch_size": self.global_batch_size,
            "stop_reason": self.stop_reason,
            "stop_lr": self.stop_lr,
            "divergence_lr": self.divergence_lr,
            "settings": dict(self.settings),
            "points": dict(self.points),
            "elapsed_s": self.elapsed_s,
            "lrs": list(self.lrs),
            "losses": [_finite_or_none(v) for v in self.losses],
            "smoothed": [_finite_or_none(v) for v in self.smoothed],
        }

    def to_json(self, path: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> Path:
        """Write ``extra`` (e.g. the recipe's name) and ``to_dict()`` as JSON, atomically.
        Call it on the main process only."""
        return _write_json(path, {**(extra or {}), **self.to_dict()})

    def plot(self, path: Union[str, Path], title: Optional[str] = None) -> Path:
        """PNG of the smoothed (and raw) loss against the LR on a log axis, the suggestions
        marked and the cyclical range shaded (call it on the main process only)."""
        return _plot_runs([self], self.suggestions, path, title or self._title())

    def _title(self) -> str:
        s = self.settings
        return (f"LR range test ({s.get('mode', 'exp')}, {len(self.lrs)} steps), global batch "
                f"{self.global_batch_size}")


@dataclass
class RepeatedLRFinderResult:
    """Several sweeps with different seeds and how much their suggestions move.

    Attributes:
        runs: one ``LRFinderResult`` per seed.
        seeds: the seeds, in the order of ``runs``.
        spread: per suggestion key, ``{n, values, min, max, geomean, ratio}`` over the runs
            that gave one (``ratio`` = max / min: 1.0 is perfectly stable).
        suggestions: the geometric mean of each suggestion over the runs.
        agreement: which LR rules' geometric means lie within 2x of each other.
        warnings: every run's warnings, prefixed with its seed.
    """

    runs: list[LRFinderResult]
    seeds: list[int]
    spread: dict[str, dict[str, Any]]
    suggestions: dict[str, Optional[float]]
    agreement: dict[str, Any]
    warnings: list[str]

    @property
    def global_batch_size(self) -> int:
        return self.runs[0].global_batch_size

    @classmethod
    def from_runs(cls, runs: Sequence[LRFinderResult], seeds: Sequence[int]) -> "RepeatedLRFinderResult":
        """Aggregate finished sweeps."""
        spread = {k: spread_of([r.suggestions[k] for r in runs if r.suggestions.get(k) is not None])
                  for k in SUGGESTION_KEYS}
        suggestions = {k: spread[k]["geomean"] for k in SUGGESTION_KEYS}
        agreement = agreeing_rules({k: suggestions[k] for k in LR_RULES})
        warnings = [f"seed {s}: {w}" if len(runs) > 1 else w for r, s in zip(runs, seeds) for w in r.warnings]
        for key in LR_RULES:
            if 0 < spread[key]["n"] < len(runs):
                warnings.append(f"rule {key} gave no LR in {len(runs) - spread[key]['n']} of {len(runs)} runs")
        return cls(list(runs), [int(s) for s in seeds], spread, suggestions, agreement, warnings)

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able data."""
        return {
            "suggestions": dict(self.suggestions),
            "spread": self.spread,
            "agreement": self.agreement,
            "warnings": list(self.warnings),
            "global_batch_size": self.global_batch_size,
            "seeds": list(self.seeds),
            "runs": [r.to_dict() for r in self.runs],
        }

    def to_json(self, path: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> Path:
        """Write ``extra`` (e.g. the recipe's name) and ``to_dict()`` as JSON, atomically.
        Call it on the main process only."""
        return _write_json(path, {**(extra or {}), **self.to_dict()})

    def plot(self, path: Union[str, Path], title: Optional[str] = None) -> Path:
        """Every run's smoothed curve, with the geometric-mean suggestions marked."""
        first = self.runs[0]
        title = title or (f"LR range test, {len(self.runs)} seed(s), global batch {self.global_batch_size}")
        return _plot_runs(self.runs, self.suggestions, path, title, label_runs=len(self.runs) > 1,
                          seeds=self.seeds, mode=first.settings.get("mode"))


def _json_safe(value: Any) -> Any:
    """Non-finite floats (a NaN loss, an infinite threshold) become null: strict JSON."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def _write_json(path: Union[str, Path], data: dict[str, Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(_json_safe(data), indent=2, allow_nan=False))
    tmp.replace(path)
    return path


_MARKERS = {"steepest": ("v", "steepest"), "valley": ("o", "valley"), "min_div_10": ("s", "min / 10"),
            "consensus": ("*", "consensus"),
            "cyclic_max": ("^", "cyclic max"), "cyclic_base": ("<", "cyclic base")}


def _plot_runs(runs: Sequence[LRFinderResult], suggestions: dict[str, Optional[float]], path: Union[str, Path],
               title: str, label_runs: bool = False, seeds: Sequence[int] = (), mode: Optional[str] = None) -> Path:
    # The object-oriented API with an Agg canvas: no pyplot state, no backend switch for the caller.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    tops, bottoms = [], []
    for k, run in enumerate(runs):
        lrs = np.asarray(run.lrs, dtype=np.float64)
        sm = np.asarray(run.smoothed, dtype=np.float64)
        ok = np.isfinite(sm) & (lrs > 0)
        if not ok.any():
            continue
        label = f"seed {seeds[k]}" if label_runs and k < len(seeds) else "smoothed loss"
        line, = ax.plot(lrs[ok], sm[ok], lw=1.6, label=label)
        if len(runs) == 1:
            raw = np.asarray(run.losses, dtype=np.float64)
            rok = np.isfinite(raw) & (lrs > 0)
            ax.plot(lrs[rok], raw[rok], lw=0.6, alpha=0.35, color=line.get_color(), label="raw loss")
        low = int(np.nanargmin(np.where(ok, sm, np.nan)))
        before = sm[: low + 1][ok[: low + 1]]
        tops.append(float(before.max()))
        bottoms.append(float(sm[low]))
    # Keep the explosion at the end from flattening the interesting part of the curve.
    if tops:
        top, bottom = max(tops), min(bottoms)
        pad = 0.1 * max(top - bottom, 1e-8)
        ax.set_ylim(bottom - pad, top + 3 * pad)
    ref = runs[0]
    ref_lrs = np.asarray(ref.lrs, dtype=np.float64)
    ref_sm = np.asarray(ref.smoothed, dtype=np.float64)
    good = np.isfinite(ref_sm) & (ref_lrs > 0)
    if len(runs) == 1 and runs[0].divergence_lr:
        ax.axvline(runs[0].divergence_lr, ls=":", color="tab:red", lw=1.2,
                   label=f"loss rises from {runs[0].divergence_lr:.2e}")
    base, top_lr = suggestions.get("cyclic_base"), suggestions.get("cyclic_max")
    if base and top_lr:
        ax.axvspan(base, top_lr, color="tab:green", alpha=0.08, label=f"cyclic range {base:.2g}-{top_lr:.2g}")
    for key, (marker, name) in _MARKERS.items():
        lr = suggestions.get(key)
        if not lr or not good.any():
            continue
        y = float(np.interp(np.log(lr), np.log(ref_lrs[good]), ref_sm[good]))
        ax.plot([lr], [y], marker, ms=8, mec="black", label=f"{name}: {lr:.2e}", zorder=5)
    ax.set_xscale("log" if mode != "linear" or ref_lrs.min() > 0 else "linear")
    ax.set_xlabel("learning rate (first param group)")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# ---------------------------------------------------------------------------------------
# Exact snapshot and restore of a trainer


@dataclass
class _Snapshot:
    """Everything a sweep changes, copied in memory (tensors deep-copied, on their device)."""

    state: dict[str, Any]
    python_rng: Any
    numpy_rng: Any
    cuda_rng: Optional[list[torch.Tensor]]
    grads: list[Optional[torch.Tensor]]
    buffers: list[tuple[torch.nn.Module, str, torch.Tensor]]
    modes: list[tuple[torch.nn.Module, bool]]
    ema_generator: Optional[torch.Tensor]
    should_stop: bool
    loader_position: Optional[tuple[int, int, int]]


def _modules_to_track(trainer: "Trainer") -> list[torch.nn.Module]:
    """Every module the trainer holds (model, loss, augment, EMA, a subclass's teacher or
    projection head), each once."""
    seen: dict[int, torch.nn.Module] = {}
    for value in vars(trainer).values():
        if isinstance(value, torch.nn.Module):
            seen.setdefault(id(value), value)
    return list(seen.values())


def _all_params(trainer: "Trainer") -> list[torch.nn.Parameter]:
    seen: dict[int, torch.nn.Parameter] = {}
    for group in trainer.optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    for module in _modules_to_track(trainer):
        for p in module.parameters():
            seen.setdefault(id(p), p)
    return list(seen.values())


def _take_snapshot(trainer: "Trainer", loader: Any) -> _Snapshot:
    # trainer.state_dict() holds references to live tensors (weights, momentum buffers,
    # EMA weights) that the sweep updates in place: deep-copy it.
    state = copy.deepcopy(trainer.state_dict())
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    # Persistent buffers are in the state dicts; non-persistent ones (e.g. a loss's pending
    # sums) are not, so copy every buffer.
    modules = _modules_to_track(trainer)
    # by (module, name): a module may replace a buffer rather than update it in place
    owners = {id(sub): sub for m in modules for sub in m.modules()}.values()
    buffers = [(sub, name, b.detach().clone()) for sub in owners for name, b in sub._buffers.items() if b is not None]
    modes = list({id(sub): (sub, sub.training) for m in modules for sub in m.modules()}.values())
    gen = getattr(trainer.ema, "_sr_generator", None) if trainer.ema is not None else None
    position = None
    if _is_in_memory(loader):
        position = (loader.epoch, loader.start_batch, loader.seed)
    return _Snapshot(
        state=state,
        python_rng=random.getstate(),
        numpy_rng=np.random.get_state(),
        cuda_rng=cuda_rng,
        grads=[None if p.grad is None else p.grad.detach().clone() for p in _all_params(trainer)],
        buffers=buffers,
        modes=modes,
        ema_generator=gen.get_state() if isinstance(gen, torch.Generator) else None,
        should_stop=trainer.should_stop,
        loader_position=position,
    )


def _restore_snapshot(trainer: "Trainer", loader: Any, snap: _Snapshot) -> None:
    trainer.load_state_dict(snap.state)
    with torch.no_grad():
        for module, name, saved in snap.buffers:
            live = module._buffers.get(name)
            if live is not None and live.shape == saved.shape and live.dtype == saved.dtype:
                live.copy_(saved)
            else:
                module._buffers[name] = saved
    for p, g in zip(_all_params(trainer), snap.grads):
        p.grad = g
    for module, mode in snap.modes:
        module.training = mode
    random.setstate(snap.python_rng)
    np.random.set_state(snap.numpy_rng)
    if snap.cuda_rng is not None:
        torch.cuda.set_rng_state_all(snap.cuda_rng)
    gen = getattr(trainer.ema, "_sr_generator", None) if trainer.ema is not None else None
    if snap.ema_generator is not None and isinstance(gen, torch.Generator):
        gen.set_state(snap.ema_generator)
    trainer.should_stop = snap.should_stop
    if snap.loader_position is not None:
        loader.epoch, loader.start_batch, loader.seed = snap.loader_position


def _is_in_memory(loader: Any) -> bool:
    from convrecipes.data.loader import InMemoryLoader

    return isinstance(loader, InMemoryLoader)


# ---------------------------------------------------------------------------------------
# The sweep


def _check_sweep_args(start_lr: float, end_lr: float, num_iters: int, mode: str) -> None:
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


def _group_ratios(trainer: "Trainer") -> list[float]:
    """Each param group's base LR relative to the first group's (the schedule's base LRs,
    else the optimizer's initial LRs), so the sweep keeps the groups' proportions."""
    groups = trainer.optimizer.param_groups
    base = getattr(trainer.scheduler, "base_lrs", None)
    if base is None or len(base) != len(groups):
        base = [g.get("initial_lr", g["lr"]) for g in groups]
    base = [float(b) for b in base]
    if not base[0] > 0:
        raise RecipeError(f"the first param group's base LR is {base[0]:g}, so the other groups' LRs cannot be "
                          f"swept in proportion to it; give the optimizer a positive lr (its value does not matter "
                          f"to the sweep, only the groups' ratios)")
    return [b / base[0] for b in base]


def _set_lr(trainer: "Trainer", lr: float, ratios: Sequence[float]) -> None:
    for group, ratio in zip(trainer.optimizer.param_groups, ratios):
        value = lr * ratio
        if isinstance(group["lr"], torch.Tensor):  # capturable / fused optimizers: in place
            group["lr"].fill_(value)
        else:
            group["lr"] = value


def _endless_batches(loader: Any, start_epoch: int, start_batch: int) -> Iterator[Any]:
    """Batches from the given position on, through as many epochs as needed."""
    epoch, first, seen = start_epoch, start_batch, 0
    while True:
        if _is_in_memory(loader):
            loader.set_epoch(epoch, start_batch=first if first < len(loader) else 0)
        got = 0
        for batch in loader:
            got += 1
            yield batch
        seen += got
        if not got and (first == 0 or not _is_in_memory(loader)):
            break
        epoch, first = epoch + 1, 0
    if seen:
        raise DataError(f"the training loader ran out after {seen} batches and yields nothing when iterated again "
                        f"(a one-shot iterator?); pass a loader that can be iterated once per epoch, or lower "
                        f"num_iters")
    raise DataError("the training loader yields no batches, so there is nothing to sweep; add training data or "
                    "lower data.batch_size (a training loader drops its last incomplete batch)")


def find_lr(
    trainer: "Trainer",
    train_loader: Iterable,
    start_lr: float = 1e-7,
    end_lr: float = 10.0,
    num_iters: int = 100,
    mode: str = "exp",
    smooth_beta: float = 0.98,
    diverge_threshold: float = 4.0,
    seed: Optional[int] = None,
    progress: Optional[bool] = None,
) -> LRFinderResult:
    """Run the LR range test with ``trainer``'s own training step; leave the trainer untouched.

    Collective under several processes: every process calls it with its trainer and the
    same arguments, and every process gets the same result.

    Args:
        trainer: any ``Trainer``; its ``prepare_batch``, ``training_step`` and optimizer
            step are what is swept.
        train_loader: the training loader (an ``InMemoryLoader`` or any iterable of
            ``(images, targets)``); the sweep continues through epochs if it needs to.
        start_lr, end_lr: the first and last LR of the first param group.
        num_iters: optimizer steps of the full sweep (each ``grad_accum_steps`` batches).
        mode: ``exp`` (equal ratios) or ``linear`` (equal steps).
        smooth_beta: the EMA factor of the smoothed loss.
        diverge_threshold: stop once the smoothed loss exceeds this times its best
            (only while the best is positive); a NaN/inf loss always stops.
        seed: None sweeps from where training stands (the trainer's epoch/batch and the
            current RNG); an int seeds the RNGs as ``fit`` does (per process) and, for an
            ``InMemoryLoader``, the data order, starting at its epoch 0 (a P x K batch
            sampler keeps its own seed).
        progress: show a progress bar (main process); None follows ``trainer.progress``.

    Returns:
        An ``LRFinderResult``.

    Raises:
        RecipeError: bad sweep arguments, or a first param group with LR 0.
        DataError: the loader yields no batches.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    _check_sweep_args(start_lr, end_lr, num_iters, mode)
    if not 0.0 <= smooth_beta < 1.0:
        raise RecipeError(f"smooth_beta must be in [0, 1), got {smooth_beta}; 0.98 is usual (0: no smoothing)")
    if not diverge_threshold > 1.0:
        raise RecipeError(f"diverge_threshold must be > 1, got {diverge_threshold}; 4-5 is usual")
    plan = sweep_lrs(start_lr, end_lr, num_iters, mode)
    accelerator = trainer.accelerator
    # as fit does (sharding, device placement); other iterables are taken as they are
    prepare = _is_in_memory(train_loader) or isinstance(train_loader, torch.utils.data.DataLoader)
    loader = trainer._configure_loader(train_loader) if prepare else train_loader
    if _is_in_memory(loader) and len(loader) == 0:
        raise DataError(f"the training loader yields no batches ({loader.num_samples} samples, global batch "
                        f"{loader.batch_size}, incomplete batches dropped), so there is nothing to sweep; add "
                        f"training data or lower data.batch_size")
    ratios = _group_ratios(trainer)
    accum = trainer.grad_accum_steps
    num_processes = accelerator.num_processes
    show = trainer.progress if progress is None else progress
    t0 = time.perf_counter()
    snapshot = _take_snapshot(trainer, loader)
    scheduler = trainer.scheduler
    lrs: list[float] = []
    losses: list[float] = []
    smoothed: list[float] = []
    stop_reason = "completed"
    local_batch = 0
    bar = None
    try:
        # The sweep sets the LRs itself; a schedule stepping in between would overwrite them.
        trainer.scheduler = None
        if seed is not None:
            set_seed(seed, device_specific=True)
            if _is_in_memory(loader):
                loader.seed = seed
            start_epoch, start_batch = 0, 0
        else:
            start_epoch, start_batch = trainer.epoch, trainer.batch_in_epoch
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.model.train()
        trainer.loss_fn.train()
        batches = _endless_batches(loader, start_epoch, start_batch)
        bar = tqdm(total=num_iters, desc="lr-find", leave=False, dynamic_ncols=True,
                   disable=not (show and accelerator.is_main_process))
        avg, best = 0.0, math.inf
        for i, lr in enumerate(plan):
            _set_lr(trainer, lr, ratios)
            total, count = None, 0
            for micro in range(accum):
                images, targets = next(batches)
                last = micro == accum - 1
                sync = contextlib.nullcontext() if last else accelerator.no_sync(trainer.model)
                with sync:
                    images, targets = trainer.prepare_batch(images, targets, train=True)
                    with accelerator.autocast():
                        out = trainer.training_step((images, targets))
                    accelerator.backward(out.loss / accum)
                n = images.shape[0]
                value = out.loss.detach().float() * n
                total = value if total is None else total + value
                count += n
            if i == 0:
                local_batch = count // accum
            step_loss = total / count
            if num_processes > 1:  # every rank sees the same curve and stops at the same step
                step_loss = accelerator.reduce(step_loss, "mean")
            loss = float(step_loss)
            lrs.append(lr)
            losses.append(loss)
            if not math.isfinite(loss):
                smoothed.append(math.nan)
                stop_reason = "non_finite"
                break
            avg = smooth_beta * avg + (1.0 - smooth_beta) * loss
            smooth = avg / (1.0 - smooth_beta ** (i + 1))
            smoothed.append(smooth)
            best = min(best, smooth)
            if i > 0 and best > 0 and smooth > diverge_threshold * best:
                stop_reason = "diverged"
                break
            trainer._optimizer_step()  # clipping, optimizer, loss post_step, EMA: as in training
            bar.update(1)
            if i % 10 == 0:
                bar.set_postfix(lr=f"{lr:.2e}", loss=f"{smooth:.4f}", refresh=False)
    finally:
        if bar is not None:
            bar.close()
        trainer.scheduler = scheduler
        trainer.optimizer.zero_grad(set_to_none=True)
        _restore_snapshot(trainer, loader, snapshot)
    suggestions, points, warnings = suggest(lrs, smoothed, num_iters, stop_reason)
    return LRFinderResult(
        lrs=lrs,
        losses=losses,
        smoothed=smoothed,
        suggestions=suggestions,
        warnings=warnings,
        global_batch_size=local_batch * num_processes * accum,
        stop_reason=stop_reason,
        settings={
            "start_lr": start_lr, "end_lr": end_lr, "num_iters": num_iters, "mode": mode,
            "smooth_beta": smooth_beta, "diverge_threshold": diverge_threshold, "seed": seed,
            "per_process_batch_size": local_batch, "num_processes": num_processes, "grad_accum_steps": accum,
            "param_group_ratios": list(ratios),
        },
        points=points,
        elapsed_s=time.perf_counter() - t0,
    )


TrainerFactory = Callable[[int], tuple["Trainer", Iterable]]


def find_lr_repeated(
    trainer_or_factory: Union["Trainer", TrainerFactory],
    train_loader: Optional[Iterable] = None,
    *,
    repeat: int = 3,
    seeds: Optional[Sequence[int]] = None,
    **find_lr_kwargs: Any,
) -> RepeatedLRFinderResult:
    """Run ``find_lr`` once per seed and report how much each suggestion moves.

    Args:
        trainer_or_factory: a ``Trainer`` (each run sweeps the same, restored trainer with
            another seed: data order, augmentation and dropout change) or a function
            ``seed -> (trainer, train_loader)`` (e.g. rebuilding a recipe with that seed,
            which also changes the initial weights).
        train_loader: the loader, when a trainer is given.
        repeat: number of sweeps (ignored when ``seeds`` is given).
        seeds: the seeds; default ``trainer.seed + i`` (or ``i`` with a factory).
        **find_lr_kwargs: passed to ``find_lr``.

    Returns:
        A ``RepeatedLRFinderResult`` with the spread (min, max, geometric mean, max/min) of
        each suggestion and which rules agree within 2x.
    """
    from convrecipes.trainers.base import Trainer

    is_trainer = isinstance(trainer_or_factory, Trainer)
    if is_trainer and train_loader is None:
        raise RecipeError("find_lr_repeated(trainer, ...) needs the train_loader too")
    if seeds is None:
        if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
            raise RecipeError(f"repeat must be an integer >= 1, got {repeat!r}; e.g. repeat=3")
        base = trainer_or_factory.seed if is_trainer else 0
        seeds = [base + i for i in range(repeat)]
    if not seeds:
        raise RecipeError("seeds is empty; give at least one seed")
    runs = []
    for s in seeds:
        if is_trainer:
            trainer, loader = trainer_or_factory, train_loader
        else:
            trainer, loader = trainer_or_factory(int(s))
        runs.append(find_lr(trainer, loader, seed=int(s), **find_lr_kwargs))
    return RepeatedLRFinderResult.from_runs(runs, seeds)
