"""The Pareto front of accuracy against latency, and its plot."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Optional, Sequence, Union


def pareto_front(accuracy: Sequence[float], cost: Sequence[float]) -> list[bool]:
    """Which points are Pareto-optimal when higher ``accuracy`` and lower ``cost`` are better.

    A point is dominated when another is at least as accurate and at most as costly, and
    strictly better in one of the two. Equal points dominate neither each other, so both
    stay on the front. Points with a missing (None or NaN) value are never on it.
    """
    if len(accuracy) != len(cost):
        raise ValueError(f"accuracy and cost must have the same length, got {len(accuracy)} and {len(cost)}")

    def ok(v: Optional[float]) -> bool:
        return v is not None and not math.isnan(v)

    points = [(a, c) if ok(a) and ok(c) else None for a, c in zip(accuracy, cost)]
    front = []
    for i, p in enumerate(points):
        if p is None:
            front.append(False)
            continue
        dominated = any(q is not None and j != i and q[0] >= p[0] and q[1] <= p[1] and (q[0] > p[0] or q[1] < p[1])
                        for j, q in enumerate(points))
        front.append(not dominated)
    return front


def plot_pareto(names: Sequence[str], accuracy: Sequence[float], latency_ms: Sequence[float],
                parameters: Sequence[int], path: Union[str, Path], *, accuracy_label: str = "validation top-1 (%)",
                latency_label: str = "latency at batch 1 (ms)", title: Optional[str] = None) -> Path:
    """Accuracy against latency (log x axis), marker area by parameter count, every point
    labelled; the Pareto-optimal models are filled, joined by their front and labelled in bold."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    front = pareto_front(accuracy, latency_ms)
    biggest = max([p for p in parameters if p] or [1])
    # area proportional to parameters, between 30 and 900 points^2 so the smallest stays visible
    sizes = [30 + 870 * (p or 0) / biggest for p in parameters]
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for on in (False, True):
        idx = [i for i, f in enumerate(front) if f == on and accuracy[i] is not None and latency_ms[i] is not None]
        if not idx:
            continue
        ax.scatter([latency_ms[i] for i in idx], [accuracy[i] for i in idx], s=[sizes[i] for i in idx],
                   c="tab:red" if on else "none", edgecolors="tab:red" if on else "tab:blue", linewidths=1.5,
                   alpha=0.6 if on else 0.9, label="Pareto-optimal" if on else "dominated", zorder=3)
    front_pts = sorted((latency_ms[i], accuracy[i]) for i, f in enumerate(front) if f)
    if len(front_pts) > 1:
        ax.step([p[0] for p in front_pts], [p[1] for p in front_pts], where="post", color="tab:red", alpha=0.5,
                linewidth=1, zorder=2)
    for i, name in enumerate(names):
        if accuracy[i] is None or latency_ms[i] is None:
            continue
        ax.annotate(name, (latency_ms[i], accuracy[i]), textcoords="offset points", xytext=(6, 5), fontsize=8,
                    fontweight="bold" if front[i] else "normal")
    ax.set_xscale("log")
    ax.margins(x=0.15, y=0.12)  # room for the labels and the largest markers
    ax.set_xlabel(latency_label)
    ax.set_ylabel(accuracy_label)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8, loc="best", markerscale=0.5)
    ax.set_title(title or "accuracy against latency (marker area: parameters)", fontsize=10)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
