"""What ``curves.png`` shows, and the per-step learning rates it needs.

- ``StepLRLog`` writes ``lr_steps.jsonl`` in the run directory: the LR each optimizer step
  trained with (every optimizer part: ``lr`` for the primary, ``lr_<part>`` for the others),
  so warmup and cyclic schedules show in the plot as they ran, not as one sample per epoch.
  A long run is thinned to at most ``MAX_LR_POINTS`` steps (every k-th step, k fixed by the
  run's planned length, so a resumed run keeps the same k). A resume first drops the records
  after the checkpoint's step: the curve continues without duplicates.
- ``curves_figure`` draws ``metrics.jsonl``'s records: the total losses (training and
  validation) apart from the training loss's parts (e.g. distillation's ``kd`` and
  ``task``), accuracy without top-5 when there are fewer than 10 classes (it says nothing
  there), the per-step LR, and the best epoch (the one ``ModelCheckpoint`` keeps as
  ``best.safetensors``) marked on every panel.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Optional, Sequence

from convrecipes.trainers.metrics_log import read_jsonl

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from convrecipes.trainers.base import Trainer

LR_STEPS_FILE = "lr_steps.jsonl"
# Enough for the shape of any schedule on a figure a few hundred pixels wide.
MAX_LR_POINTS = 2000
# Per-epoch keys that are neither losses nor parts of the training loss.
_BOOKKEEPING = ("epoch", "images_per_s", "train_time_s")
# Logged by training steps but not parts of the loss: rates, shares, weights, accuracies.
_STATISTIC_SUFFIXES = ("_acc", "_mask", "_weight", "_fraction", "_rate")
_STATISTIC_NAMES = ("h",)  # Meta Pseudo Labels' teacher feedback


def lr_key(part: str, primary: str) -> str:
    """The record key of ``part``'s LR: ``lr`` for the primary part, else ``lr_<part>`` (as
    in ``metrics.jsonl``)."""
    return "lr" if part == primary else f"lr_{part}"


class StepLRLog:
    """Appends the LR of every ``stride``-th optimizer step to ``path`` (one JSON line:
    ``step`` from 1, ``epoch`` as a fraction of epochs done after the step, and one LR per
    optimizer part).

    Args:
        path: the ``lr_steps.jsonl`` to write.
        stride: record steps 1, 1 + stride, 1 + 2 stride, ...
    """

    def __init__(self, path: Path, stride: int = 1) -> None:
        self.path = Path(path)
        self.stride = max(1, int(stride))

    @classmethod
    def start(cls, path: Path, global_step: int, total_steps: Optional[int]) -> "StepLRLog":
        """A log continuing after step ``global_step`` (0: a new run): records of later steps
        (logged before the checkpoint a run resumes from was overtaken) are dropped.
        ``total_steps`` (None if unknown) sets the stride so the run keeps at most
        ``MAX_LR_POINTS`` records."""
        path = Path(path)
        if path.exists():
            kept = [r for r in read_jsonl(path) if r.get("step", math.inf) <= global_step]
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, path)
        stride = math.ceil(total_steps / MAX_LR_POINTS) if total_steps else 1
        return cls(path, stride)

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (from 1) is recorded."""
        return (step - 1) % self.stride == 0

    def record(self, step: int, epoch: float, lrs: dict[str, float]) -> None:
        """Append one step's LRs (keys as ``lr_key``)."""
        with open(self.path, "a") as fh:
            fh.write(json.dumps({"step": int(step), "epoch": float(epoch), **lrs}) + "\n")


def start_lr_log(trainer: "Trainer", train_loader: Any, epochs: int) -> Optional[StepLRLog]:
    """The trainer's ``StepLRLog`` for a ``fit`` (None without a run directory or off the main
    process). Called after a resume has restored ``global_step``."""
    if trainer.run_dir is None or not trainer.is_main_process:
        return None
    try:
        steps_per_epoch = math.ceil(len(train_loader) / trainer.grad_accum_steps)
    except TypeError:  # a loader without a length: no thinning
        steps_per_epoch = 0
    return StepLRLog.start(Path(trainer.run_dir) / LR_STEPS_FILE, trainer.global_step, epochs * steps_per_epoch)


def record_step_lrs(trainer: "Trainer", log: Optional[StepLRLog], batches_done: int, batches_per_epoch: int) -> None:
    """Before optimizer step ``trainer.global_step + 1``: record the LR it will train with
    (every part's; the schedules step after the update). ``batches_done`` counts this
    epoch's batches including the step's own."""
    step = trainer.global_step + 1
    if log is None or not log.due(step):
        return
    primary = trainer.resolve_part(None)
    lrs = {lr_key(name, primary): trainer.current_lr(name) for name in trainer.optimizers}
    log.record(step, trainer.epoch + batches_done / max(batches_per_epoch, 1), lrs)


def read_lr_steps(run_dir: Path) -> list[dict]:
    """The records of ``run_dir``'s ``lr_steps.jsonl`` ([] when there is none)."""
    path = Path(run_dir) / LR_STEPS_FILE
    return read_jsonl(path) if path.exists() else []


def best_epoch(records: Sequence[dict], monitor: str, mode: str = "max") -> Optional[tuple[int, float]]:
    """``(epoch, value)`` of the best finite ``monitor`` value, the first one on ties: the
    epoch ``ModelCheckpoint`` saved as ``best.safetensors`` (it keeps a new best only when it
    strictly improves). None when no record has it."""
    best: Optional[tuple[int, float]] = None
    for record in records:
        value = record.get(monitor)
        if value is None or not math.isfinite(value):
            continue
        if best is None or (value > best[1] if mode == "max" else value < best[1]):
            best = (int(record["epoch"]), float(value))
    return best


def is_loss_part(key: str) -> bool:
    """Whether a per-epoch key is a part of the training loss that a training step logged
    (``kd``, ``task``, a composite loss's terms, MPL's ``teacher_loss``, ...), as opposed to
    the total losses, evaluation results, LRs, throughput and step statistics (``/`` in the
    name, or a rate, mask, weight, fraction or accuracy)."""
    if key in _BOOKKEEPING or key == "train_loss" or "val_" in key or key.startswith("test_"):
        return False
    if key == "lr" or key.startswith(("lr_", "flipped_pred_", "branch_")):
        return False
    return "/" not in key and not key.endswith(_STATISTIC_SUFFIXES) and key not in _STATISTIC_NAMES


def curves_context(trainer: "Trainer") -> dict[str, Any]:
    """What ``plot_curves`` needs from a trainer besides ``metrics.jsonl``: the per-step LRs,
    the metric that picks ``best.safetensors`` (its ``ModelCheckpoint``'s; else ``val_top1``,
    higher is better) and the number of classes (from the checkpoint metadata, if known)."""
    from convrecipes.trainers.callbacks import ModelCheckpoint

    checkpoint = next((cb for cb in trainer.callbacks if isinstance(cb, ModelCheckpoint)), None)
    monitor, mode = ("val_top1", "max") if checkpoint is None else (checkpoint.monitor, checkpoint.mode)
    classes = trainer.checkpoint_metadata.get("classes")
    return {"lr_steps": read_lr_steps(trainer.run_dir) if trainer.run_dir is not None else [],
            "monitor": monitor, "mode": mode, "num_classes": len(classes) if classes else None}


def _line(ax: Any, records: Sequence[dict], key: str, **kwargs: Any) -> None:
    points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
    if points:  # epochs without the key (eval_every_epochs) are skipped, not plotted as gaps
        ax.plot(*zip(*points), marker="o", markersize=3, label=key, gid=key, **kwargs)


def curves_figure(records: Iterable[dict], lr_steps: Sequence[dict] = (), monitor: Optional[str] = "val_top1",
                  mode: str = "max", num_classes: Optional[int] = None, title: Optional[str] = None,
                  ) -> Optional["Figure"]:
    """The learning curves of a run as a ``Figure`` (None without records).

    Panels (each titled): ``loss`` (the training loss and every validation loss),
    ``training loss parts`` (only when the training step logs parts), ``accuracy (%)``
    (top-1, and top-5 unless ``num_classes`` is below 10), ``learning rate`` (per optimizer
    step from ``lr_steps`` when given, else per epoch), and for label-noise runs ``flipped
    training labels predicted as (%)``. The best epoch by ``monitor`` (``mode`` max or min)
    is a dashed vertical line on every panel (gid ``best_epoch``) and a star on the
    monitored curve (gid ``best_point``). Lines carry their record key as gid.
    """
    records = list(records)
    if not records:
        return None
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    keys = list(dict.fromkeys(k for r in records for k in r))  # every key any epoch logged, in order
    top5_says_nothing = num_classes is not None and num_classes < 10
    accuracy = [k for k in keys if k.endswith("top1") or (k.endswith("top5") and not top5_says_nothing)]
    parts = [k for k in keys if is_loss_part(k) and isinstance(records[-1].get(k, 0.0), (int, float))]
    panels: list[tuple[str, list[str]]] = [("loss", [k for k in keys if k == "train_loss" or k.endswith("val_loss")])]
    if parts:
        panels.append(("training loss parts", parts))
    panels.append(("accuracy (%)", accuracy))
    panels.append(("learning rate", [k for k in keys if k == "lr" or k.startswith("lr_")]))
    memorisation = [k for k in keys if k.startswith("flipped_pred_")]
    if memorisation:  # label-noise runs: what the model predicts for the flipped training labels
        panels.append(("flipped training labels predicted as (%)", memorisation))

    fig = Figure(figsize=(4.7 * len(panels), 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    best = best_epoch(records, monitor, mode) if monitor else None
    for ax, (label, panel_keys) in zip(axes, panels):
        if label == "learning rate" and lr_steps:
            step_keys = list(dict.fromkeys(k for r in lr_steps for k in r if k == "lr" or k.startswith("lr_")))
            for key in step_keys:
                points = [(r["epoch"], r[key]) for r in lr_steps if r.get(key) is not None]
                ax.plot(*zip(*points), lw=1.2, label=f"{key} (per step)", gid=key)
        else:
            for key in panel_keys:
                _line(ax, records, key)
        if best is not None:
            epoch, value = best
            ax.axvline(epoch, ls="--", lw=1, color="tab:gray", gid="best_epoch",
                       label=f"best epoch {epoch} ({monitor})" if monitor in panel_keys or ax is axes[0] else None)
            if monitor in panel_keys:
                ax.plot([epoch], [value], "*", ms=13, color="gold", mec="black", zorder=5, gid="best_point",
                        label=f"best {monitor} {value:.4g}")
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
