"""Evaluation that explains mistakes: per-class metrics, a confusion matrix and top losses.

``convrecipes evaluate`` hands the test set's logits and targets (``Trainer.predict``,
gathered from every process, each image once, in dataset order) to
``evaluation_report`` and writes, on the main process, with ``write_evaluation_report``:

- ``confusion_matrix.png``: rows the true class, columns the predicted class, each cell
  coloured by its share of the true class (so a small class's mistakes show as clearly as a
  large one's) and, up to ``CELL_TEXT_MAX_CLASSES`` classes, its count written in it;
- ``top_losses.png``: fastai's "top losses": the wrongly classified test images the model
  was most sure about, most confident first, each captioned with its true label, the
  predicted label and the predicted probability;
- ``evaluation.json``: the matrix, the class names, per-class precision, recall (the
  class's accuracy) and F1, their macro averages, and the top losses.

Definitions (as ``sklearn.metrics.precision_recall_fscore_support``; in percent here, like
the other accuracies): for class ``c`` with confusion matrix ``M`` (rows true):
precision = ``M[c, c] / sum_i M[i, c]`` (of the images predicted ``c``, the share that
are ``c``), recall = ``M[c, c] / sum_j M[c, j]`` (of the images of class ``c``, the share
predicted ``c``: the class's accuracy), F1 = their harmonic mean. A ratio with nothing to
count (a class never predicted, or absent from the test set) is undefined: ``None`` in
JSON, ``-`` in the table, and left out of the macro average (sklearn's
``zero_division=np.nan``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from convrecipes.errors import RecipeError

PathLike = Union[str, os.PathLike]
REPORT_DIR_NAME = "evaluation"
CONFUSION_PNG = "confusion_matrix.png"
TOP_LOSSES_PNG = "top_losses.png"
REPORT_JSON = "evaluation.json"
CELL_TEXT_MAX_CLASSES = 20  # beyond this the counts no longer fit in the cells
TICK_LABEL_MAX_CLASSES = 60  # beyond this class names on the axes overlap; the axes show indices


# -- metrics --------------------------------------------------------------------------------
def confusion_matrix(targets: Any, predictions: Any, num_classes: int) -> np.ndarray:
    """``(K, K)`` counts: entry ``[t, p]`` is the number of images of class ``t`` predicted ``p``.

    Args:
        targets: ``(N,)`` true class indices in ``[0, num_classes)``.
        predictions: ``(N,)`` predicted class indices in ``[0, num_classes)``.
        num_classes: ``K``.
    """
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    p = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if t.shape != p.shape:
        raise ValueError(f"targets and predictions differ in length: {t.shape[0]} vs {p.shape[0]}")
    for name, values in (("targets", t), ("predictions", p)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got [{values.min()}, {values.max()}]")
    return np.bincount(t * num_classes + p, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    out = np.full(numerator.shape, np.nan)
    np.divide(numerator, denominator, out=out, where=denominator > 0)
    return out


def per_class_metrics(matrix: np.ndarray) -> dict[str, np.ndarray]:
    """Per-class precision, recall and F1 in percent (NaN where undefined) and support.

    Args:
        matrix: ``(K, K)`` confusion matrix, rows the true class.

    Returns:
        ``{"precision", "recall", "f1", "support", "predicted"}``, each ``(K,)``; ``support``
        counts the images of each class, ``predicted`` the images predicted as it.
    """
    m = np.asarray(matrix, dtype=np.float64)
    hits, support, predicted = np.diag(m), m.sum(axis=1), m.sum(axis=0)
    precision, recall = _ratio(hits, predicted), _ratio(hits, support)
    # 2PR/(P+R) = 2TP/(2TP+FP+FN): defined whenever the class occurs or is predicted
    f1 = _ratio(2 * hits, support + predicted)
    return {"precision": 100 * precision, "recall": 100 * recall, "f1": 100 * f1,
            "support": support.astype(np.int64), "predicted": predicted.astype(np.int64)}


def _nan_mean(values: np.ndarray) -> Optional[float]:
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if defined.size else None


def _or_none(value: float) -> Optional[float]:
    return None if np.isnan(value) else float(value)


# -- top losses -----------------------------------------------------------------------------
@dataclass
class TopLosses:
    """The most confidently wrong predictions, most confident first.

    Attributes:
        indices: ``(k,)`` positions in the evaluated set.
        targets: ``(k,)`` their true classes.
        predicted: ``(k,)`` the (wrong) predicted classes.
        confidence: ``(k,)`` the predicted class's probability.
        p_true: ``(k,)`` the true class's probability.
        loss: ``(k,)`` the cross-entropy ``-log p_true``.
    """

    indices: np.ndarray
    targets: np.ndarray
    predicted: np.ndarray
    confidence: np.ndarray
    p_true: np.ndarray
    loss: np.ndarray

    def __len__(self) -> int:
        return len(self.indices)


def select_top_losses(logits: torch.Tensor, targets: torch.Tensor, k: int) -> TopLosses:
    """The ``k`` wrong predictions with the highest predicted probability.

    fastai's ``top_losses`` ranks every image by its loss; this ranks only the mistakes, by
    how sure the model was of its wrong answer, so the sheet shows what the model
    confidently gets wrong (the order of the two rankings agrees but for near ties, as a
    sure wrong answer leaves little probability for the true class). Ties keep the lower
    position first.

    Args:
        logits: ``(N, K)``.
        targets: ``(N,)`` class indices.
        k: at most this many (fewer when there are fewer mistakes); ``k >= 0``.
    """
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    log_probs = torch.as_tensor(logits).double().log_softmax(dim=1)
    y = torch.as_tensor(targets).long()
    confidence, predicted = log_probs.exp().max(dim=1)
    wrong = torch.nonzero(predicted != y).flatten()
    # a stable sort on -confidence keeps ties in position order
    order = torch.sort(-confidence[wrong], stable=True).indices[:k]
    idx = wrong[order]
    log_p_true = log_probs[idx, y[idx]]
    return TopLosses(idx.numpy(), y[idx].numpy(), predicted[idx].numpy(), confidence[idx].numpy(),
                     log_p_true.exp().numpy(), (-log_p_true).numpy())


# -- the report -----------------------------------------------------------------------------
@dataclass
class EvaluationReport:
    """Per-class metrics of one evaluation (see the module docstring).

    Attributes:
        classes: class names, indexed by class.
        matrix: ``(K, K)`` confusion matrix, rows true.
        metrics: ``per_class_metrics(matrix)``.
        top_losses: the most confidently wrong predictions (all of them, most confident first).
    """

    classes: list[str]
    matrix: np.ndarray
    metrics: dict[str, np.ndarray]
    top_losses: TopLosses

    @property
    def top1(self) -> float:
        """Overall accuracy in percent."""
        return 100.0 * float(np.trace(self.matrix)) / max(int(self.matrix.sum()), 1)

    def per_class(self) -> dict[str, dict[str, Any]]:
        """``{class name: {"images", "precision", "recall", "f1", "mistaken_for"}}``, percent
        or None where undefined; ``mistaken_for`` is the class this one is most often
        predicted as instead (None when it never is)."""
        out = {}
        for c, name in enumerate(self.classes):
            row = self.matrix[c].copy()
            row[c] = 0
            confused = {"class": self.classes[int(row.argmax())], "count": int(row.max())} if row.max() > 0 else None
            out[name] = {"images": int(self.metrics["support"][c]),
                         **{k: _or_none(self.metrics[k][c]) for k in ("precision", "recall", "f1")},
                         "mistaken_for": confused}
        return out

    def macro_average(self) -> dict[str, Optional[float]]:
        """Unweighted means over the classes where each is defined (macro recall is the
        balanced accuracy)."""
        return {k: _nan_mean(self.metrics[k]) for k in ("precision", "recall", "f1")}


def per_class_table(per_class: dict[str, dict[str, Any]], macro_average: dict[str, Optional[float]]) -> str:
    """The per-class metrics (``EvaluationReport.per_class``) as a text table, one line per
    class and one for the macro average; ``-`` where a metric is undefined."""
    width = max([len("macro average"), *(len(n) for n in per_class)])

    def pct(value: Optional[float]) -> str:
        return "-" if value is None else f"{value:.1f}"

    lines = [f"  {'class':<{width}}  {'images':>6}  {'precision':>9}  {'recall (= accuracy)':>19}  {'f1':>5}  "
             f"most often mistaken for"]
    for name, row in per_class.items():
        confused = f"{row['mistaken_for']['class']} ({row['mistaken_for']['count']})" if row["mistaken_for"] else "-"
        lines.append(f"  {name:<{width}}  {row['images']:>6}  {pct(row['precision']):>9}  {pct(row['recall']):>19}  "
                     f"{pct(row['f1']):>5}  {confused}")
    total = sum(row["images"] for row in per_class.values())
    lines.append(f"  {'macro average':<{width}}  {total:>6}  {pct(macro_average['precision']):>9}  "
                 f"{pct(macro_average['recall']):>19}  {pct(macro_average['f1']):>5}")
    return "\n".join(lines)


def evaluation_report(logits: torch.Tensor, targets: torch.Tensor, classes: Optional[Sequence[str]] = None
                      ) -> EvaluationReport:
    """Per-class metrics, confusion matrix and top losses of one evaluation.

    Args:
        logits: ``(N, K)`` of every evaluated image.
        targets: ``(N,)`` class indices.
        classes: ``K`` class names (default ``"0"``, ``"1"``, ...).
    """
    logits = torch.as_tensor(logits)
    num_classes = logits.shape[1]
    names = [str(c) for c in classes] if classes is not None and len(classes) == num_classes else \
        [str(i) for i in range(num_classes)]
    matrix = confusion_matrix(torch.as_tensor(targets).numpy(), logits.argmax(dim=1).numpy(), num_classes)
    return EvaluationReport(names, matrix, per_class_metrics(matrix),
                            select_top_losses(logits, targets, int(logits.shape[0])))


def write_evaluation_report(report: EvaluationReport, images: torch.Tensor, out_dir: PathLike,
                            top_losses: int = 16, files: Optional[Sequence[str]] = None,
                            indices: Optional[Sequence[int]] = None,
                            about: Optional[dict[str, Any]] = None) -> list[Path]:
    """Write ``confusion_matrix.png``, ``top_losses.png`` and ``evaluation.json`` (call it on
    the main process only).

    Args:
        report: what ``evaluation_report`` computed.
        images: ``(N, C, H, W)`` uint8, the evaluated images in the order of the logits.
        out_dir: the folder (created).
        top_losses: images on the top-losses sheet; 0 writes none. A sheet left from an
            earlier evaluation in ``out_dir`` is removed when this one has none.
        files: each image's file name (``image_folder``), shown in the captions and JSON.
        indices: each image's index in the split it was loaded from (default: its position),
            shown in the captions and JSON.
        about: what was evaluated (checkpoint, weights, dataset, ...), recorded in the JSON
            and the plot titles.

    Returns:
        The paths written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    about = dict(about or {})
    what = " ".join(str(about[k]) for k in ("dataset",) if k in about)
    written = [plot_confusion_matrix(report.matrix, report.classes, out / CONFUSION_PNG,
                                     title=f"{what} test set: top-1 {report.top1:.2f}%".strip())]
    shown = TopLosses(*(getattr(report.top_losses, f)[:top_losses] for f in
                        ("indices", "targets", "predicted", "confidence", "p_true", "loss")))
    sheet = out / TOP_LOSSES_PNG
    if len(shown):
        written.append(plot_top_losses(shown, images, report.classes, sheet, files=files, indices=indices))
    elif sheet.is_file():
        sheet.unlink()
    record = {
        **about,
        "num_images": int(report.matrix.sum()),
        "top1": report.top1,
        "classes": report.classes,
        "confusion_matrix": {"rows": "true class", "columns": "predicted class",
                             "counts": report.matrix.astype(int).tolist()},
        "per_class": report.per_class(),
        "macro_average": report.macro_average(),
        "num_wrong": len(report.top_losses),
        "top_losses": [{"index": int(indices[int(i)] if indices is not None else i),
                        **({"file": files[int(i)]} if files is not None else {}),
                        "true": report.classes[int(t)], "predicted": report.classes[int(p)],
                        "p_predicted": float(c), "p_true": float(pt), "loss": float(loss)}
                       for i, t, p, c, pt, loss in zip(shown.indices, shown.targets, shown.predicted,
                                                       shown.confidence, shown.p_true, shown.loss)],
    }
    tmp = out / f".{REPORT_JSON}.tmp"
    tmp.write_text(json.dumps(record, indent=2))
    os.replace(tmp, out / REPORT_JSON)
    written.append(out / REPORT_JSON)
    return written


def explain_test_set(logits: torch.Tensor, targets: torch.Tensor, dataset: Any, classes: Optional[Sequence[str]],
                     out_dir: PathLike, top_losses: int = 16, about: Optional[dict[str, Any]] = None,
                     write: bool = True) -> dict[str, Any]:
    """``evaluation_report`` of a test set, written to ``out_dir`` when ``write``.

    Call it on every process with the gathered logits (each computes the same metrics) and
    ``write`` true on the main process only.

    Args:
        logits: ``(N, K)`` of the test images, in dataset order.
        targets: ``(N,)``.
        dataset: the ``ImageTensorDataset`` evaluated (its images and, for image folders,
            file names go on the top-losses sheet).
        classes: class names (default: the dataset's).
        out_dir: the output folder.
        top_losses: images on the top-losses sheet.
        about: what was evaluated, for the JSON (entries that are None or empty are left out).
        write: write the files.

    Returns:
        ``{"per_class", "macro_average"}`` and, when written, ``"report_files"``.
    """
    report = evaluation_report(logits, targets, classes or dataset.classes)
    result: dict[str, Any] = {"per_class": report.per_class(), "macro_average": report.macro_average()}
    if write:
        about = {k: v for k, v in (about or {}).items() if v not in (None, [], {})}
        written = write_evaluation_report(report, dataset.images, out_dir, top_losses, dataset.files,
                                          dataset.indices.tolist(), about)
        result["report_files"] = [str(p) for p in written]
    return result


def default_report_dir(run: PathLike, weights: str = "best") -> Path:
    """``<run dir>/evaluation``: the folder of the checkpoint ``evaluate`` reads, plus
    ``evaluation`` (for a checkpoint file, next to it)."""
    from convrecipes.loading import find_checkpoint

    return find_checkpoint(run, prefer=weights).parent / REPORT_DIR_NAME


# -- plots ----------------------------------------------------------------------------------
def plot_confusion_matrix(matrix: np.ndarray, classes: Sequence[str], path: PathLike, title: str = "") -> Path:
    """Draw a confusion matrix (rows true, columns predicted) into a PNG.

    Each cell is coloured by its share of the true class (the row), so the diagonal reads
    as each class's recall whatever the class sizes; with up to ``CELL_TEXT_MAX_CLASSES``
    classes the counts are written in the cells (zeros off the diagonal left blank), and up
    to ``TICK_LABEL_MAX_CLASSES`` the class names label both axes (beyond, class indices).

    Args:
        matrix: ``(K, K)`` counts.
        classes: ``K`` class names.
        path: the PNG to write; parent folders are created.
        title: the plot's title.

    Returns:
        The path written.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    counts = np.asarray(matrix)
    k = counts.shape[0]
    rows = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts, rows, out=np.zeros(counts.shape), where=rows > 0)
    names = k <= TICK_LABEL_MAX_CLASSES
    longest = max((len(str(c)) for c in classes), default=1) if names else 3
    side = min(max(0.42 * k + 1.5, 4.5), 16.0)  # inches of the matrix itself
    cell_points = 72 * side / k  # a cell's width in points
    tick_size = max(4.0, min(9.0, 0.45 * cell_points))
    label_room = 0.08 * longest * tick_size / 9  # inches the rotated/left labels take
    fig = Figure(figsize=(side + label_room + 1.2, side + label_room + 0.6), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if names:
        ax.set_xticks(range(k), [str(c) for c in classes], rotation=45 if longest > 3 else 0, ha="right" if longest > 3
                      else "center", rotation_mode="anchor", fontsize=tick_size)
        ax.set_yticks(range(k), [str(c) for c in classes], fontsize=tick_size)
    if k <= CELL_TEXT_MAX_CLASSES:
        cell_size = max(5.0, min(10.0, 0.28 * cell_points))  # 4 digits need about a third of a cell
        for t in range(k):
            for p in range(k):
                if counts[t, p] == 0 and t != p:
                    continue
                ax.text(p, t, str(int(counts[t, p])), ha="center", va="center", fontsize=cell_size,
                        color="white" if share[t, p] > 0.5 else "black")
    where = "" if names else f" (index into the classes of {REPORT_JSON})"
    ax.set_xlabel(f"predicted class{where}")
    ax.set_ylabel(f"true class{where}")
    if title:
        ax.set_title(title, fontsize=10)
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, format="png")
    return out


def plot_top_losses(top: TopLosses, images: torch.Tensor, classes: Sequence[str], path: PathLike,
                    files: Optional[Sequence[str]] = None, indices: Optional[Sequence[int]] = None,
                    columns: int = 4) -> Path:
    """The contact sheet of ``top``: each image captioned with its true label, the predicted
    label and the predicted probability (and its file name or position).

    Args:
        top: the mistakes to show, in order.
        images: ``(N, C, H, W)`` uint8, indexed by ``top.indices``.
        classes: class names.
        path: the PNG to write.
        files: each image's file name, if it has one.
        indices: each image's index in its split (default: its position), shown without files.
        columns: images per row.
    """
    from convrecipes.contact_sheet import draw_contact_sheet

    captions = []
    for i, t, p, c in zip(top.indices, top.targets, top.predicted, top.confidence):
        if files is not None:  # the folder is the true label, already in the caption
            name = Path(files[int(i)]).name
            name = name if len(name) <= 26 else "..." + name[-23:]
        else:
            name = f"test #{int(indices[int(i)] if indices is not None else i)}"
        captions.append(f"{name}\ntrue: {classes[int(t)]}\npredicted: {classes[int(p)]} ({c:.2f})")
    picked = images[torch.as_tensor(top.indices, dtype=torch.long)]
    return draw_contact_sheet(picked, captions, path, "most confidently wrong test images (top losses), most "
                                                      "confident first", columns=columns)


# -- --plot ---------------------------------------------------------------------------------
def require_2d_embeddings(model: nn.Module, image_shape: Sequence[int], model_name: str) -> None:
    """Refuse ``--plot`` before any evaluation when ``model`` has no 2-D embeddings.

    One forward pass of a blank image tells the embedding width exactly, whatever built the
    model (the recipe's ``model.embedding_dim``, a loss that adds a head, a backbone).

    Args:
        model: the unwrapped model (``Classifier`` returns ``ModelOutput`` with embeddings).
        image_shape: ``(C, H, W)`` of its inputs.
        model_name: the recipe's model name, for the message.

    Raises:
        RecipeError: the model returns no embeddings, or embeddings that are not 2-D.
    """
    from convrecipes.models.output import ModelOutput

    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            output = model(torch.zeros(1, *image_shape, device=device))
    finally:
        model.train(was_training)
    embeddings = output.embeddings if isinstance(output, ModelOutput) else None
    if embeddings is not None and embeddings.ndim == 2 and embeddings.shape[1] == 2:
        return
    has = "returns no embeddings" if embeddings is None else f"has {embeddings.shape[1]}-dimensional embeddings"
    raise RecipeError(f"--plot draws 2-D embeddings, but this model ({model_name}) {has}; only a model trained with "
                      f"a 2-D embedding layer (model.embedding_dim=2, as in recipes loss_center_2d and "
                      f"loss_asoftmax_2d) has them. Nothing was evaluated or written; drop --plot")


__all__ = ["CONFUSION_PNG", "EvaluationReport", "REPORT_DIR_NAME", "REPORT_JSON", "TOP_LOSSES_PNG", "TopLosses",
           "confusion_matrix", "default_report_dir", "evaluation_report", "explain_test_set", "per_class_metrics",
           "per_class_table", "plot_confusion_matrix", "plot_top_losses", "require_2d_embeddings",
           "select_top_losses", "write_evaluation_report"]
