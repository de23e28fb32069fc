"""The result of an LR range test (one sweep, or several seeds), its JSON and its plot.

``lr_find.json`` has one layout whether ``lr-find`` or ``optimizer.lr=auto`` wrote it
(``write_lr_find_json``): the recipe, the ``auto`` choice, the aggregated suggestions with
their spread over the seeds (one seed for ``auto``), and every sweep under ``runs``.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, Sequence, Union

import numpy as np

from convrecipes.lr_finder.rules import (
    LR_RULES,
    SMOOTH_WINDOW_DECADES,
    SUGGESTION_KEYS,
    agreeing_rules,
    centred_smooth,
    disagreement_warning,
    divergence_index,
    spread_of,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def _finite_or_none(x: float) -> Optional[float]:
    return float(x) if math.isfinite(x) else None


@dataclass
class LRFinderResult:
    """One sweep: the curve, the suggestions and what they belong to.

    Attributes:
        lrs: the first param group's LR at each recorded step.
        losses: the raw loss of each step (mean over processes).
        smoothed: the online debiased EMA of ``losses`` that the stop rule watched (it lags).
        suggestions: ``steepest``, ``valley``, ``min_div_10``, ``consensus``, ``cyclic_base``,
            ``cyclic_max`` -> LR (None where the curve gives none), read off ``centred``.
        warnings: what makes the suggestions untrustworthy (never descends, diverges at once,
            rules more than 10x apart).
        global_batch_size: per-process batch x processes x accumulation steps: the batch
            the LRs belong to.
        stop_reason: ``completed``, ``diverged`` (online EMA > threshold x best) or
            ``non_finite`` (the loss became NaN/inf).
        settings: the sweep's arguments (start_lr, end_lr, num_iters, mode, smooth_beta,
            diverge_threshold, seed, smooth_window_decades) and the process layout.
        points: index into ``lrs`` of each suggestion (min_div_10: of the minimum itself).
        elapsed_s: wall time of the sweep including the state snapshot and restore.
        centred: the zero-lag smoothing of ``losses`` (``centred_smooth``) the suggestions
            are read off; computed from ``losses`` when not given.
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
    centred: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.centred and self.losses:
            window = self.settings.get("smooth_window_decades", SMOOTH_WINDOW_DECADES)
            self.centred = centred_smooth(self.lrs, self.losses, window)

    @property
    def diverged(self) -> bool:
        return self.stop_reason != "completed"

    @property
    def stop_lr(self) -> Optional[float]:
        """The LR of the last recorded step (where a diverging sweep stopped)."""
        return self.lrs[-1] if self.lrs else None

    @property
    def divergence_lr(self) -> Optional[float]:
        """For a sweep that stopped: the LR from which the smoothed (centred) loss only rose
        (see ``divergence_index``); None for a completed sweep, and None where the smoothed
        loss was still falling when the sweep stopped (e.g. a NaN out of the blue)."""
        if not self.diverged:
            return None
        i = divergence_index(self.centred)
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
            "centred": [_finite_or_none(v) for v in self.centred],
        }

    def to_json(self, path: Union[str, Path], extra: Optional[dict[str, Any]] = None) -> Path:
        """Write ``extra`` (e.g. the recipe's name) and ``to_dict()`` as JSON, atomically.
        Call it on the main process only. (``lr_find.json`` is written by
        ``write_lr_find_json``, in the layout of several seeds.)"""
        return _write_json(path, {**(extra or {}), **self.to_dict()})

    def figure(self, title: Optional[str] = None, auto_rule: Optional[str] = None) -> "Figure":
        """The plot (see ``lr_find_figure``) as a matplotlib ``Figure``."""
        return lr_find_figure([self], self.suggestions, title or self._title(), auto_rule=auto_rule,
                              mode=self.settings.get("mode"))

    def plot(self, path: Union[str, Path], title: Optional[str] = None, auto_rule: Optional[str] = None) -> Path:
        """PNG of the raw and smoothed loss against the LR on a log axis, the suggestions
        marked, the cyclical range shaded and, given ``auto_rule``, the LR
        ``optimizer.lr=auto`` takes (call it on the main process only)."""
        return _save(self.figure(title, auto_rule), path)

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
        disagreement = disagreement_warning(suggestions) if len(runs) > 1 else None
        if disagreement:  # one run's own warning already says it
            warnings.append(f"over the {len(runs)} seeds' geometric means, {disagreement}")
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

    def figure(self, title: Optional[str] = None, auto_rule: Optional[str] = None) -> "Figure":
        """The plot (see ``lr_find_figure``) as a matplotlib ``Figure``."""
        first = self.runs[0]
        title = title or (f"LR range test, {len(self.runs)} seed(s), global batch {self.global_batch_size}")
        return lr_find_figure(self.runs, self.suggestions, title, auto_rule=auto_rule, seeds=self.seeds,
                              mode=first.settings.get("mode"), spread=self.spread)

    def plot(self, path: Union[str, Path], title: Optional[str] = None, auto_rule: Optional[str] = None) -> Path:
        """Every run's smoothed curve and, with several seeds, their spread as a band and each
        suggestion's range; the geometric-mean suggestions marked and, given ``auto_rule``,
        the LR ``optimizer.lr=auto`` takes."""
        return _save(self.figure(title, auto_rule), path)


def write_lr_find_json(path: Union[str, Path], result: Union[LRFinderResult, RepeatedLRFinderResult], *,
                       recipe: str, overrides: Sequence[str] = (), auto: Optional[dict[str, Any]] = None) -> Path:
    """Write ``lr_find.json``: one layout for ``lr-find`` and ``optimizer.lr=auto``.

    Keys: ``recipe``, ``overrides``, ``auto`` (the rule ``optimizer.lr=auto`` uses under the
    recipe's schedule, its ``suggested_lr``, and, when it was applied, the LR written into
    the recipe), then ``RepeatedLRFinderResult.to_dict()``: ``suggestions`` (geometric means
    over the seeds), ``spread``, ``agreement``, ``warnings``, ``global_batch_size``,
    ``seeds`` and ``runs`` (each sweep's curve and suggestions). A single sweep is written as
    a repeat of one seed. Call it on the main process only.
    """
    if isinstance(result, LRFinderResult):
        result = RepeatedLRFinderResult.from_runs([result], [result.settings.get("seed") or 0])
    return _write_json(path, {"recipe": recipe, "overrides": list(overrides), "auto": dict(auto or {}),
                              **result.to_dict()})


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


def _finite_curve(run: LRFinderResult) -> tuple[np.ndarray, np.ndarray]:
    lrs = np.asarray(run.lrs, dtype=np.float64)
    curve = np.asarray(run.centred, dtype=np.float64)
    ok = np.isfinite(curve) & (lrs > 0)
    return lrs[ok], curve[ok]


def lr_find_figure(runs: Sequence[LRFinderResult], suggestions: dict[str, Optional[float]], title: str,
                   auto_rule: Optional[str] = None, seeds: Sequence[int] = (), mode: Optional[str] = None,
                   spread: Optional[dict[str, dict[str, Any]]] = None) -> "Figure":
    """The LR range test's plot as a ``Figure`` (object-oriented API on an Agg canvas: no
    pyplot state, no backend switch for the caller).

    Draws the smoothed loss the suggestions are read off (``centred``) against the LR, the
    raw loss for a single sweep, a divergence line where the smoothed loss turns up (never
    where it still falls), the suggestions, the cyclical range, the LR ``optimizer.lr=auto``
    takes under ``auto_rule``, and a warning when the LR rules disagree by more than 10x.
    With several runs: each seed's curve, the band between their lowest and highest value,
    and each suggestion's range over the seeds (``spread``) as a horizontal bar.

    Artists carry ``gid``s for inspection: ``curve`` (one per run), ``raw``, ``divergence``,
    ``band``, ``suggestion:<key>``, ``spread:<key>``, ``auto_lr``, ``disagreement``.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7.5, 4.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    several = len(runs) > 1
    window = runs[0].settings.get("smooth_window_decades", SMOOTH_WINDOW_DECADES) if runs else SMOOTH_WINDOW_DECADES
    tops, bottoms = [], []
    curves = []
    for k, run in enumerate(runs):
        lrs, curve = _finite_curve(run)
        if not len(curve):
            continue
        curves.append((lrs, curve))
        label = (f"seed {seeds[k]}" if k < len(seeds) else f"run {k + 1}") if several else \
            f"smoothed loss (centred, {window:g} decades)"
        line, = ax.plot(lrs, curve, lw=1.0 if several else 1.8, alpha=0.8 if several else 1.0, label=label,
                        gid="curve")
        if not several:
            raw_lrs = np.asarray(run.lrs, dtype=np.float64)
            raw = np.asarray(run.losses, dtype=np.float64)
            rok = np.isfinite(raw) & (raw_lrs > 0)
            ax.plot(raw_lrs[rok], raw[rok], lw=0.6, alpha=0.35, color=line.get_color(), label="raw loss", gid="raw")
        low = int(np.argmin(curve))
        tops.append(float(curve[: low + 1].max()))
        bottoms.append(float(curve[low]))
    # Keep the explosion at the end from flattening the interesting part of the curve.
    if tops:
        top, bottom = max(tops), min(bottoms)
        pad = 0.1 * max(top - bottom, 1e-8)
        ax.set_ylim(bottom - pad, top + 3 * pad)
    # where the suggestions are drawn: the one curve, or the mean of the seeds' curves
    ref_x, ref_y = (np.log(curves[0][0]), curves[0][1]) if curves else (np.array([]), np.array([]))
    if several and len(curves) > 1:
        lo = max(float(np.log(c[0][0])) for c in curves)
        hi = min(float(np.log(c[0][-1])) for c in curves)
        if hi > lo:
            grid = np.linspace(lo, hi, 200)
            stack = np.stack([np.interp(grid, np.log(x), y) for x, y in curves])
            ax.fill_between(np.exp(grid), stack.min(axis=0), stack.max(axis=0), color="tab:gray", alpha=0.25,
                            label=f"spread over {len(curves)} seeds (lowest-highest)", gid="band")
            ref_x, ref_y = grid, stack.mean(axis=0)
    if len(runs) == 1 and runs[0].divergence_lr:
        ax.axvline(runs[0].divergence_lr, ls=":", color="tab:red", lw=1.2, gid="divergence",
                   label=f"smoothed loss rises from {runs[0].divergence_lr:.2e}")
    base, top_lr = suggestions.get("cyclic_base"), suggestions.get("cyclic_max")
    if base and top_lr:
        ax.axvspan(base, top_lr, color="tab:green", alpha=0.08, label=f"cyclic range {base:.2g}-{top_lr:.2g}")
    for key, (marker, name) in _MARKERS.items():
        lr = suggestions.get(key)
        if not lr or not len(ref_x):
            continue
        y = float(np.interp(np.log(lr), ref_x, ref_y))
        points, = ax.plot([lr], [y], marker, ms=8, mec="black", label=f"{name}: {lr:.2e}", zorder=5,
                          gid=f"suggestion:{key}")
        sp = (spread or {}).get(key) or {}
        if several and sp.get("n", 0) > 1:
            ax.errorbar([lr], [y], xerr=[[lr - sp["min"]], [sp["max"] - lr]], fmt="none", capsize=3, lw=1,
                        ecolor=points.get_color(), zorder=4, gid=f"spread:{key}", label=f"_spread:{key}")
    auto_lr = suggestions.get(auto_rule) if auto_rule else None
    if auto_lr:
        ax.axvline(auto_lr, color="black", lw=1.4, gid="auto_lr",
                   label=f"optimizer.lr=auto ({auto_rule}): {auto_lr:.2e}")
    disagreement = disagreement_warning(suggestions)
    if disagreement:
        ratio_text = disagreement.split(" (", 1)[0]
        # upper right, above the legend (lower left): the corner an LR range test leaves emptiest
        ax.text(0.99, 0.98, f"warning: {ratio_text};\nconsensus is pulled towards the odd one out", color="tab:red",
                fontsize=8, transform=ax.transAxes, va="top", ha="right", gid="disagreement", zorder=10,
                bbox=dict(facecolor="white", edgecolor="tab:red", alpha=0.9))
    all_lrs = np.concatenate([c[0] for c in curves]) if curves else np.array([1.0])
    ax.set_xscale("log" if mode != "linear" or all_lrs.min() > 0 else "linear")
    ax.set_xlabel("learning rate (first param group)")
    ax.set_ylabel("loss")
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=7, loc="lower left")
    fig.tight_layout()
    return fig


def _save(fig: "Figure", path: Union[str, Path]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
