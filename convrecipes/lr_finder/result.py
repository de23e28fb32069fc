"""The result of an LR range test (one sweep, or several seeds), its JSON and its plot."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from convrecipes.lr_finder.rules import (
    LR_RULES,
    SUGGESTION_KEYS,
    agreeing_rules,
    divergence_index,
    spread_of,
)

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
