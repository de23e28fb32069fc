"""Classify new image files with a trained run: ``convrecipes predict RUN PATH...``.

A run's model is rebuilt from the recipe its checkpoint records (``load_run_model``) and fed
images prepared exactly as its training data was: each file decoded by the image folder's
own ``decode_image`` (EXIF orientation, converted to ``L`` or ``RGB`` -- so grayscale, RGB,
palette and RGBA files all work -- and resized bilinearly to the training size), scaled to
``[0, 1]`` and normalised with the recipe's ``augment.mean``/``std`` by the same evaluation
transform the trainer uses. Class names come from the checkpoint.

Files that cannot be decoded are listed (in the CSV, with the reason in its ``error``
column) and skipped; they never stop the run. ``TrainedModel`` and ``Preprocessing`` are
shared with ``convrecipes.export``.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from convrecipes.errors import CheckpointError, DataError, RecipeError

PathLike = Union[str, os.PathLike]


class LogitsOnly(nn.Module):
    """A model whose forward returns the logits alone, whether the wrapped model returns a
    tensor or a ``ModelOutput`` (``convrecipes.models.Classifier``): what an exported graph
    and a plain caller want."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, num_classes)`` of normalised images ``(B, C, H, W)``."""
        from convrecipes.models.output import logits_of

        return logits_of(self.model(images))


@dataclass
class Preprocessing:
    """How a run's model wants its images: decoded to ``channels`` at ``height x width``,
    scaled to ``[0, 1]``, then ``(x - mean) / std`` per channel, laid out ``NCHW``.

    Attributes:
        channels: 1 (grayscale, PIL mode ``L``) or 3 (``RGB``).
        height: image height in pixels.
        width: image width in pixels.
        mean: per-channel mean in ``[0, 1]`` units (the recipe's ``augment.mean``).
        std: per-channel standard deviation in ``[0, 1]`` units (``augment.std``).
    """

    channels: int
    height: int
    width: int
    mean: list[float]
    std: list[float]

    def decode(self, path: PathLike) -> np.ndarray:
        """One image file as uint8 ``(channels, height, width)``, as the image folder decodes
        its training images (raises whatever PIL raises on a file it cannot read)."""
        from convrecipes.data.image_folder import decode_image

        if self.height != self.width:  # decode_image makes squares, as every dataset here does
            raise RecipeError(f"the run's images are {self.height}x{self.width}, not square; predict and export "
                              f"handle square images only")
        return decode_image(path, self.height, self.channels)

    def normalise(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, C, H, W)`` -> float32, normalised as the trainer's evaluation batches are
        (``/ 255``, then the recipe's evaluation transform)."""
        from convrecipes.augment import build_eval_transform

        transform = build_eval_transform(self.mean, self.std).to(images.device)
        floats = images.float().div_(255.0)
        normalised, _ = transform(floats, torch.zeros(floats.shape[0], dtype=torch.long, device=images.device))
        return normalised

    def to_dict(self) -> dict[str, Any]:
        """The JSON description ``preprocess.json`` holds (see ``convrecipes.export``)."""
        return {
            "input_layout": "NCHW",
            "dtype": "float32",
            "channels": self.channels,
            "color_mode": "L" if self.channels == 1 else "RGB",
            "image_size": [self.height, self.width],
            "resize": "EXIF orientation applied, converted to color_mode (alpha dropped), then resized to "
                      "image_size (height, width) with PIL's bilinear filter",
            "scale": 1.0 / 255.0,
            "mean": list(self.mean),
            "std": list(self.std),
            "formula": "x = (pixel_uint8 * scale - mean[c]) / std[c]",
        }


@dataclass
class TrainedModel:
    """A run's model ready for inference (eval mode, logits only) and what it needs.

    Attributes:
        model: the model, wrapped to return logits ``(B, len(classes))``.
        preprocessing: how to prepare images for it.
        classes: the class names, in logit order.
        checkpoint: the checkpoint file the weights came from.
        weights: ``"raw"`` or ``"EMA"``.
        metadata: the checkpoint's metadata (recipe, epoch, ...).
        recipe: the run's recipe.
    """

    model: LogitsOnly
    preprocessing: Preprocessing
    classes: list[str]
    checkpoint: Path
    weights: str
    metadata: dict[str, Any] = field(default_factory=dict)
    recipe: Any = None

    @property
    def device(self) -> torch.device:
        """Where the model's parameters are."""
        return next(self.model.parameters()).device

    @torch.no_grad()
    def logits(self, images_uint8: torch.Tensor) -> torch.Tensor:
        """Float32 logits of uint8 images ``(B, C, H, W)`` (preprocessed here), on the CPU."""
        images = self.preprocessing.normalise(images_uint8.to(self.device))
        return self.model(images).float().cpu()


def _input_shape(loaded: Any) -> tuple[int, int, int]:
    """``(channels, height, width)`` the run's model was trained on."""
    recorded = loaded.metadata.get("image_shape")
    if recorded:  # written by `convrecipes train` since predict/export exist
        channels, height, width = (int(v) for v in recorded)
        return channels, height, width
    # an older checkpoint: the shape is whatever the recipe's data loads as
    from convrecipes.build import load_datasets

    try:
        channels, height, width = load_datasets(loaded.recipe, splits=("test",)).test.image_shape
    except DataError as exc:
        raise CheckpointError(
            f"{loaded.file} does not record its input image size (written before `predict` existed) and the run's "
            f"test data cannot be loaded to read it ({exc}); retrain the run, or make its data reachable "
            f"(data.data_dir {loaded.recipe.data.data_dir})"
        ) from None
    return int(channels), int(height), int(width)


def load_trained_model(run: PathLike, weights: str = "best", ema: bool = False,
                       device: Optional[Union[str, torch.device]] = None) -> TrainedModel:
    """Rebuild a run's model with its weights, preprocessing and class names.

    Args:
        run: a run directory (``best.safetensors`` / ``last.safetensors`` inside) or a
            checkpoint file written by ``convrecipes train``.
        weights: ``best`` or ``last`` (for a run directory).
        ema: the checkpoint's EMA weights instead of the raw ones.
        device: where to run the model (default: the first GPU, else the CPU).

    Raises:
        CheckpointError: no checkpoint there, one not written by ``convrecipes train``, or
            ``ema`` without EMA weights.
    """
    from convrecipes.loading import load_run_model

    if weights not in ("best", "last"):
        raise RecipeError(f"weights must be 'best' or 'last', got {weights!r}")
    loaded = load_run_model(run, prefer=weights, ema=ema)
    channels, height, width = _input_shape(loaded)
    mean, std = loaded.recipe.augment.mean, loaded.recipe.augment.std
    if mean is None or std is None or len(mean) != channels:
        raise CheckpointError(f"{loaded.file} records no normalisation for {channels}-channel images "
                              f"(augment.mean={mean}, augment.std={std}); use a checkpoint written by "
                              f"`convrecipes train`")
    device = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = LogitsOnly(loaded.module).to(device).eval()
    return TrainedModel(model, Preprocessing(channels, height, width, [float(m) for m in mean], [float(s) for s in std]),
                        list(loaded.metadata["classes"]), loaded.file, "EMA" if ema else "raw",
                        dict(loaded.metadata), loaded.recipe)


def find_images(paths: Sequence[PathLike]) -> list[Path]:
    """The image files named by ``paths``: a file as given (whatever its extension), a
    folder searched recursively for image extensions (hidden files and folders skipped).
    Order: the arguments' order, each folder's files sorted; duplicates once.

    Raises:
        DataError: a path that does not exist, or no image file at all.
    """
    from convrecipes.data.image_folder import IMAGE_EXTENSIONS, _walk_images

    missing = [str(p) for p in paths if not Path(p).expanduser().exists()]
    if missing:
        raise DataError(f"no such file or folder: {', '.join(missing)}; pass image files or folders of images")
    found: list[Path] = []
    seen: set[Path] = set()
    for given in paths:
        path = Path(given).expanduser()
        for file in sorted(_walk_images(path)) if path.is_dir() else [path]:
            if file not in seen:
                seen.add(file)
                found.append(file)
    if not found:
        raise DataError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in {', '.join(str(p) for p in paths)}; "
                        f"pass image files or folders that hold them (subfolders are searched)")
    return found


class _ImageFiles(torch.utils.data.Dataset):
    """Decodes one file per item; a file that fails gives its error text instead."""

    def __init__(self, files: Sequence[Path], preprocessing: Preprocessing) -> None:
        self.files = list(files)
        self.preprocessing = preprocessing

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[int, Optional[np.ndarray], str]:
        try:
            return index, self.preprocessing.decode(self.files[index]), ""
        except Exception as exc:  # any unreadable file is reported, never fatal
            return index, None, f"{type(exc).__name__}: {exc}".replace("\n", " ")


@dataclass
class Prediction:
    """One file's result: its top-k classes and probabilities, or why it could not be read."""

    path: Path
    classes: list[str] = field(default_factory=list)
    probabilities: list[float] = field(default_factory=list)
    error: str = ""


@dataclass
class PredictResult:
    """What ``predict`` did.

    Attributes:
        predictions: one per file, in ``find_images`` order (unreadable ones with ``error``).
        csv_path: where the CSV went (None when not written).
        top_k: how many classes each row holds.
        checkpoint: the checkpoint used.
        weights: ``"raw"`` or ``"EMA"``.
    """

    predictions: list[Prediction]
    csv_path: Optional[Path]
    top_k: int
    checkpoint: Path
    weights: str

    @property
    def unreadable(self) -> list[Prediction]:
        """The files that could not be decoded."""
        return [p for p in self.predictions if p.error]


def iter_batches(trained: TrainedModel, files: Sequence[Path], batch_size: int = 64,
                 workers: int = 0) -> Iterator[tuple[list[Path], Optional[torch.Tensor], list[tuple[Path, str]]]]:
    """Decode ``files`` in batches (in ``workers`` DataLoader processes; 0: in this one) and
    yield ``(readable files, their logits (B, C) or None, [(unreadable file, error)])``."""
    loader = torch.utils.data.DataLoader(_ImageFiles(files, trained.preprocessing), batch_size=batch_size,
                                         shuffle=False, num_workers=workers,
                                         collate_fn=list)  # items stay (index, array or None, error)
    for batch in loader:
        good = [(index, array) for index, array, error in batch if not error]
        bad = [(files[index], error) for index, _, error in batch if error]
        logits = None
        if good:
            images = torch.from_numpy(np.stack([array for _, array in good]))
            logits = trained.logits(images)
        yield [files[index] for index, _ in good], logits, bad


def predict(
    run: PathLike,
    paths: Sequence[PathLike],
    top_k: int = 5,
    batch_size: int = 64,
    weights: str = "best",
    ema: bool = False,
    out: Optional[PathLike] = "predictions.csv",
    workers: int = 0,
    progress: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> PredictResult:
    """Classify image files and folders with a trained run; write a CSV.

    Args:
        run: a run directory or checkpoint written by ``convrecipes train``.
        paths: image files and folders (searched recursively).
        top_k: classes per image, most probable first (capped at the number of classes).
        batch_size: images per forward pass.
        weights: ``best`` or ``last`` (for a run directory).
        ema: use the EMA weights.
        out: the CSV path (None: write none). Columns: ``path``, then ``class_i`` and
            ``prob_i`` for i = 1..k, then ``error`` (empty for files that were read; the
            reason, with empty classes, for files that could not be).
        workers: DataLoader processes decoding the files (0: decode in this process).
        progress: show a progress bar.
        device: where to run the model (default: the first GPU, else the CPU).

    Returns:
        A ``PredictResult``.

    Raises:
        DataError: a path that does not exist or no image file in ``paths``.
        CheckpointError: no usable checkpoint at ``run``.
        RecipeError: ``top_k`` or ``batch_size`` below 1.
    """
    if top_k < 1:
        raise RecipeError(f"--top-k must be at least 1, got {top_k}")
    if batch_size < 1:
        raise RecipeError(f"--batch-size must be at least 1, got {batch_size}")
    if workers < 0:
        raise RecipeError(f"--workers must be 0 or more, got {workers}")
    files = find_images(paths)
    trained = load_trained_model(run, weights=weights, ema=ema, device=device)
    k = min(top_k, len(trained.classes))
    from convrecipes.progress import progress_bar

    by_path: dict[Path, Prediction] = {}
    # in a log (not a terminal): one line every 10 batches
    with progress_bar(total=len(files), desc="predict", unit="img", every=10 * batch_size,
                      disable=not progress) as bar:
        for readable, logits, unreadable in iter_batches(trained, files, batch_size, workers):
            if logits is not None:
                probs = logits.softmax(dim=1)
                top = probs.topk(k, dim=1)
                for file, values, indices in zip(readable, top.values.tolist(), top.indices.tolist()):
                    by_path[file] = Prediction(file, [trained.classes[i] for i in indices], values)
            for file, error in unreadable:
                by_path[file] = Prediction(file, error=error)
            bar.update(len(readable) + len(unreadable))
    predictions = [by_path[file] for file in files]
    csv_path = write_predictions_csv(predictions, out, k) if out is not None else None
    return PredictResult(predictions, csv_path, k, trained.checkpoint, trained.weights)


def write_predictions_csv(predictions: Sequence[Prediction], out: PathLike, top_k: int) -> Path:
    """Write ``predictions`` as CSV (see ``predict``); probabilities with 6 decimals."""
    out = Path(out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ["path"] + [name for i in range(1, top_k + 1) for name in (f"class_{i}", f"prob_{i}")] + ["error"]
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    with open(tmp, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        for p in predictions:
            cells: list[str] = []
            for i in range(top_k):
                cells += [p.classes[i], f"{p.probabilities[i]:.6f}"] if i < len(p.classes) else ["", ""]
            writer.writerow([str(p.path), *cells, p.error])
    os.replace(tmp, out)  # a half-written CSV never replaces an earlier one
    return out


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: Any) -> None:
    """The arguments of ``convrecipes predict`` on an ``argparse`` parser."""
    parser.add_argument("run", help="run directory or .safetensors checkpoint written by `convrecipes train`")
    parser.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders (searched recursively)")
    parser.add_argument("--top-k", type=int, default=5, help="classes per image, most probable first (default 5; "
                                                             "capped at the number of classes)")
    parser.add_argument("--out", default="predictions.csv",
                        help="CSV to write: path, class_1, prob_1, ..., class_k, prob_k, error "
                             "(default predictions.csv)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    parser.add_argument("--weights", choices=("best", "last"), default="best", help="which checkpoint of a run directory")
    parser.add_argument("--ema", action="store_true", help="use the EMA weights")
    parser.add_argument("--workers", type=int, default=0,
                        help="processes decoding the images (default 0: decode in the main process)")


def cmd_predict(args: Any) -> int:
    """``convrecipes predict``: classify, write the CSV, print a summary."""
    import sys

    result = predict(args.run, args.paths, top_k=args.top_k, batch_size=args.batch_size, weights=args.weights,
                     ema=args.ema, out=args.out, workers=args.workers, progress=True)
    done = len(result.predictions) - len(result.unreadable)
    print(f"predicted {done} image(s) with {result.checkpoint} ({result.weights} weights), top {result.top_k}: "
          f"wrote {result.csv_path}")
    bad = result.unreadable
    if bad:
        print(f"could not read {len(bad)} file(s) (listed in the CSV's error column, no prediction):",
              file=sys.stderr)
        for p in bad[:10]:
            print(f"  {p.path}: {p.error}", file=sys.stderr)
        if len(bad) > 10:
            print(f"  ... and {len(bad) - 10} more", file=sys.stderr)
    return 0
