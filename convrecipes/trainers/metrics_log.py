"""Per-epoch metrics: one console line, one JSON line in ``metrics.jsonl``, a PNG of the curves."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable, Optional


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


def plot_curves(records: Iterable[dict], path: Path, title: Optional[str] = None) -> Optional[Path]:
    """Loss, accuracy and LR against epoch in one PNG; returns the path (None if no records)."""
    records = list(records)
    if not records:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in records]
    keys = list(dict.fromkeys(k for r in records for k in r))  # every key any epoch logged, in order
    panels = [
        ("loss", [k for k in keys if k.endswith("loss")]),
        ("accuracy (%)", [k for k in keys if k.endswith(("top1", "top5"))]),
        ("learning rate", ["lr"]),
    ]
    memorisation = [k for k in keys if k.startswith("flipped_pred_")]
    if memorisation:  # label-noise runs: what the model predicts for the flipped training labels
        panels.append(("flipped training labels predicted as (%)", memorisation))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.7 * len(panels), 4))
    for ax, (label, panel_keys) in zip(axes, panels):
        for key in panel_keys:
            points = [(e, r[key]) for e, r in zip(epochs, records) if r.get(key) is not None]
            if points:  # epochs without the key (eval_every_epochs) are skipped, not plotted as gaps
                ax.plot(*zip(*points), marker="o", markersize=3, label=key)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if panel_keys and label != "learning rate":
            ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
