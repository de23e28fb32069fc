"""Per-epoch metrics: one console line, one JSON line in ``metrics.jsonl``, a PNG of the curves
(drawn by ``convrecipes.trainers.curves``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional, Sequence


def format_metrics(metrics: dict[str, float]) -> str:
    """One readable console line; accuracies are percentages."""
    parts = []
    for key, value in metrics.items():
        if key == "epoch":
            continue
        if isinstance(value, float):
            if key.endswith(("top1", "top5")):
                parts.append(f"{key} {value:.2f}")
            elif key == "lr" or abs(value) < 1e-3:
                parts.append(f"{key} {value:.3g}")
            elif key.endswith(("images_per_s", "time_s")):
                parts.append(f"{key} {value:.0f}" if key.endswith("images_per_s") else f"{key} {value:.1f}")
            else:
                parts.append(f"{key} {value:.4f}")
        else:
            parts.append(f"{key} {value}")
    return "  ".join(parts)


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON object as a line."""
    with open(path, "a") as fh:
        fh.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> list[dict]:
    """All records of a JSON-lines file. A torn last line (a kill in the middle of a write)
    is dropped: it belongs to an epoch that a resume trains again."""
    with open(path) as fh:
        lines = [line for line in fh if line.strip()]
    records = []
    for i, line in enumerate(lines):
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if i == len(lines) - 1:
                break
            raise ValueError(f"{path} line {i + 1} is not JSON (only a torn last line is tolerated); "
                             f"remove that line or restore the file") from None
    return records


def plot_curves(records: Iterable[dict], path: Path, title: Optional[str] = None, *,
                lr_steps: Sequence[dict] = (), monitor: Optional[str] = "val_top1", mode: str = "max",
                num_classes: Optional[int] = None) -> Optional[Path]:
    """Write ``curves.png``: losses, loss parts, accuracy and LR against epoch, the best epoch
    by ``monitor`` marked (see ``convrecipes.trainers.curves.curves_figure``, which the
    keyword arguments are passed to). Returns the path (None if no records)."""
    from convrecipes.trainers.curves import curves_figure

    fig = curves_figure(records, lr_steps=lr_steps, monitor=monitor, mode=mode, num_classes=num_classes,
                        title=title)
    if fig is None:
        return None
    fig.savefig(path, dpi=110)
    return path
