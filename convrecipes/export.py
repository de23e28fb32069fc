"""Export a trained run for deployment: ``convrecipes export RUN --format onnx|torchscript``.

Writes into one folder (default ``RUN/export_<format>``):

- ``model.onnx`` (batch dimension dynamic) or ``model.pt`` (TorchScript, traced): a graph
  from normalised float32 images ``(B, C, H, W)`` to logits ``(B, num_classes)``; a model
  returning ``ModelOutput`` (``convrecipes.models.Classifier``) is exported for its logits;
- ``model.safetensors``: the plain weights (the model's ``state_dict``, loadable into the
  model ``convrecipes.build.build_model`` makes from the run's recipe), class names in its
  metadata;
- ``preprocess.json``: what a caller does to an image first (channels, size, resize,
  scale, mean, std, layout), the class names in output order, where the weights came from,
  and the numerical check below.

The export is checked before the command returns: the exported graph and the run's own
model are run on a few of the run's test images (random images when the test data cannot
be loaded, which the report says), at the checked batch and at batch 1, and the largest
logit difference must stay within ``tolerance * max(1, max |logit|)`` (``DEFAULT_TOLERANCE``
= 1e-4, i.e. 1e-4 relative to the logits' scale). Otherwise the model file is removed and
the command fails.

ONNX export needs ``onnx``, ``onnxscript`` (torch's exporter) and ``onnxruntime`` (the
check): ``pip install 'convrecipes[export]'``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np
import torch

from convrecipes.errors import ConvrecipesError, DataError, RecipeError
from convrecipes.predict import TrainedModel, load_trained_model

PathLike = Union[str, os.PathLike]

FORMATS = ("onnx", "torchscript")
MODEL_FILES = {"onnx": "model.onnx", "torchscript": "model.pt"}
WEIGHTS_FILE = "model.safetensors"
PREPROCESS_FILE = "preprocess.json"
DEFAULT_TOLERANCE = 1e-4
DEFAULT_CHECK_IMAGES = 8
INPUT_NAME, OUTPUT_NAME = "images", "logits"
_ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")
_EXTERNAL_DATA_BYTES = 1 << 30  # one ONNX protobuf holds at most 2 GiB: larger weights go to model.onnx.data


class ExportError(ConvrecipesError):
    """An export that failed or whose graph does not reproduce the run's logits."""


@dataclass
class ExportCheck:
    """The comparison of the exported graph with the run's model.

    Attributes:
        images: how many images were compared (at that batch size, and the first at batch 1).
        source: where they came from (the run's test split, or random images and why).
        max_abs_diff: the largest absolute logit difference over both batches.
        max_abs_logit: the largest absolute logit of the run's model on them.
        tolerance: the relative tolerance; the bound is ``tolerance * max(1, max_abs_logit)``.
        batch_sizes: the batch sizes run through the exported graph.
    """

    images: int
    source: str
    max_abs_diff: float
    max_abs_logit: float
    tolerance: float
    batch_sizes: list[int] = field(default_factory=list)

    @property
    def bound(self) -> float:
        """The largest difference allowed."""
        return self.tolerance * max(1.0, self.max_abs_logit)

    @property
    def passed(self) -> bool:
        """Whether the exported graph reproduces the logits."""
        return self.max_abs_diff <= self.bound

    def to_dict(self) -> dict[str, Any]:
        """The check as JSON (in ``preprocess.json``)."""
        return {"images": self.images, "source": self.source, "batch_sizes": self.batch_sizes,
                "max_abs_diff": self.max_abs_diff, "max_abs_logit": self.max_abs_logit,
                "tolerance": self.tolerance, "bound": self.bound,
                "rule": "max |exported - run's model| <= tolerance * max(1, max |logit|)"}


@dataclass
class ExportResult:
    """What ``export_run`` wrote.

    Attributes:
        out_dir: the folder.
        model_file: ``model.onnx`` or ``model.pt``.
        weights_file: ``model.safetensors``.
        preprocess_file: ``preprocess.json``.
        check: the numerical comparison with the run's model.
        exporter: which exporter made the graph (``torch.onnx dynamo``, ``torch.onnx legacy``,
            ``torch.jit.trace``).
    """

    out_dir: Path
    model_file: Path
    weights_file: Path
    preprocess_file: Path
    check: ExportCheck
    exporter: str


def require_onnx() -> None:
    """Raise a clear error when the ONNX packages are missing."""
    missing = [name for name in _ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f"ONNX export needs {', '.join(_ONNX_PACKAGES)} (missing: {', '.join(missing)}); install "
                          f"them with pip install 'convrecipes[export]', or export with --format torchscript")


def check_images(trained: TrainedModel, count: int = DEFAULT_CHECK_IMAGES) -> tuple[torch.Tensor, str]:
    """Up to ``count`` uint8 images to compare the export on: the first of the run's test
    split, or (when that data cannot be loaded here) seeded random images."""
    from convrecipes.build import load_datasets

    shape = (trained.preprocessing.channels, trained.preprocessing.height, trained.preprocessing.width)
    try:
        test = load_datasets(trained.recipe, splits=("test",)).test
        if tuple(test.image_shape) == shape:
            return test.images[:count].clone(), f"the run's test split ({trained.recipe.data.name})"
        why = f"its images are {tuple(test.image_shape)}, the model takes {shape}"
    except (DataError, RecipeError) as exc:
        why = str(exc).split(";")[0]
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, *shape), dtype=torch.uint8, generator=generator)
    return images, f"random images (the run's test data could not be used: {why})"


def _export_onnx(model: torch.nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write ``model`` as ONNX with a dynamic batch dimension; returns the exporter used."""
    require_onnx()
    external = sum(p.numel() * p.element_size() for p in model.parameters()) > _EXTERNAL_DATA_BYTES
    try:
        torch.onnx.export(model, (example,), str(path), dynamo=True, verbose=False, external_data=external,
                          input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_shapes=({0: torch.export.Dim("batch")},))
        return "torch.onnx dynamo"
    except Exception as dynamo_exc:  # an op torch.export cannot trace: the TorchScript-based exporter may
        dynamo_error = f"{type(dynamo_exc).__name__}: {str(dynamo_exc).splitlines()[0] if str(dynamo_exc) else ''}"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # its deprecation notice; the check below vouches for the result
            torch.onnx.export(model, (example,), str(path), dynamo=False, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], dynamic_axes={INPUT_NAME: {0: "batch"},
                                                                        OUTPUT_NAME: {0: "batch"}})
        return f"torch.onnx legacy (the dynamo exporter failed: {dynamo_error})"
    except Exception as exc:
        raise ExportError(f"torch.onnx could not export the model (dynamo exporter: {dynamo_error}; legacy "
                          f"exporter: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                          f"try --format torchscript") from None


def _export_torchscript(model: torch.nn.Module, example: torch.Tensor, path: Path) -> str:
    """Write ``model`` traced to TorchScript; returns the exporter used."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation notice; the check below vouches for the result
        try:
            traced = torch.jit.trace(model, example)
        except Exception as exc:
            raise ExportError(f"torch.jit.trace could not trace the model ({type(exc).__name__}: {exc}); try "
                              f"--format onnx") from None
        torch.jit.save(traced, str(path))
    return "torch.jit.trace"


def load_exported(path: PathLike, fmt: str) -> Any:
    """A callable ``f(float32 numpy (B, C, H, W)) -> logits numpy (B, K)`` running an export."""
    if fmt == "onnx":
        require_onnx()
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        module = torch.jit.load(str(path), map_location="cpu").eval()

    def run(images: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return module(torch.from_numpy(images)).numpy()

    return run


def compare_with_run(trained: TrainedModel, exported: Any, images_uint8: torch.Tensor, source: str,
                     tolerance: float = DEFAULT_TOLERANCE) -> ExportCheck:
    """Run ``exported`` (see ``load_exported``) and the run's model on the same images, at
    their batch size and at batch 1; the largest logit difference."""
    inputs = trained.preprocessing.normalise(images_uint8.to(trained.device)).cpu()
    with torch.no_grad():
        reference = trained.model(inputs.to(trained.device)).float().cpu()
    batches = [inputs, inputs[:1]] if inputs.shape[0] > 1 else [inputs]
    max_diff = 0.0
    for batch in batches:
        got = torch.from_numpy(np.asarray(exported(batch.numpy().copy()), dtype=np.float32))
        want = reference[: batch.shape[0]]
        if got.shape != want.shape:
            raise ExportError(f"the exported model returned logits of shape {tuple(got.shape)} for a batch of "
                              f"{batch.shape[0]}, expected {tuple(want.shape)}")
        max_diff = max(max_diff, float((got - want).abs().max()))
    return ExportCheck(images=int(inputs.shape[0]), source=source, max_abs_diff=max_diff,
                       max_abs_logit=float(reference.abs().max()), tolerance=tolerance,
                       batch_sizes=[int(b.shape[0]) for b in batches])


def save_plain_weights(trained: TrainedModel, path: PathLike) -> Path:
    """The model's ``state_dict`` as a plain safetensors file (class names in its metadata)."""
    from safetensors.torch import save

    from convrecipes.checkpoint import write_atomic

    # clone: safetensors refuses tensors sharing memory (tied weights)
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in trained.model.model.state_dict().items()}
    metadata = {"classes": json.dumps(trained.classes), "model": str(trained.recipe.model.name),
                "preprocess": PREPROCESS_FILE}
    return write_atomic(path, save(tensors, metadata=metadata))


def export_run(
    run: PathLike,
    fmt: str,
    out_dir: Optional[PathLike] = None,
    weights: str = "best",
    ema: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    num_check_images: int = DEFAULT_CHECK_IMAGES,
) -> ExportResult:
    """Export a run's model, its plain weights and its preprocessing, and check the export.

    Args:
        run: a run directory or checkpoint written by ``convrecipes train``.
        fmt: ``onnx`` or ``torchscript``.
        out_dir: the folder to write (default ``<run directory>/export_<fmt>``).
        weights: ``best`` or ``last`` (for a run directory).
        ema: export the EMA weights.
        tolerance: the relative logit tolerance of the check (see the module docstring).
        num_check_images: how many images the check compares.

    Returns:
        An ``ExportResult``.

    Raises:
        ExportError: the ONNX packages are missing, the exporter fails, or the exported
            graph's logits differ from the run's beyond the tolerance (its file is removed).
        CheckpointError: no usable checkpoint at ``run``.
    """
    if fmt not in FORMATS:
        raise RecipeError(f"unknown export format {fmt!r}; valid formats: {', '.join(FORMATS)}")
    if fmt == "onnx":
        require_onnx()  # before any work
    if num_check_images < 1:
        raise RecipeError(f"num_check_images must be at least 1, got {num_check_images}")
    trained = load_trained_model(run, weights=weights, ema=ema, device="cpu")
    out = Path(out_dir).expanduser() if out_dir is not None else trained.checkpoint.parent / f"export_{fmt}"
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ExportError(f"cannot create {out} ({exc.strerror or exc}); pick a writable --out") from None
    images, source = check_images(trained, num_check_images)
    pre = trained.preprocessing
    # batch 2: torch.export specialises a dimension of size 1, which would fix the batch size
    example = trained.preprocessing.normalise(images[:1].repeat(2, 1, 1, 1))
    model_file = out / MODEL_FILES[fmt]
    export = _export_onnx if fmt == "onnx" else _export_torchscript
    exporter = export(trained.model, example, model_file)
    check = compare_with_run(trained, load_exported(model_file, fmt), images, source, tolerance)
    if not check.passed:
        model_file.unlink(missing_ok=True)
        Path(f"{model_file}.data").unlink(missing_ok=True)
        raise ExportError(f"the exported {fmt} model's logits differ from the run's by up to {check.max_abs_diff:.3g} "
                          f"(allowed {check.bound:.3g}) on {check.images} images from {source}; removed "
                          f"{model_file}. Try the other --format, or report the model ({trained.recipe.model.name})")
    weights_file = save_plain_weights(trained, out / WEIGHTS_FILE)
    description = {
        "format": fmt,
        "model_file": model_file.name,
        "weights_file": weights_file.name,
        "input_name": INPUT_NAME,
        "output_name": OUTPUT_NAME,
        "input_shape": ["batch", pre.channels, pre.height, pre.width],
        **pre.to_dict(),
        "output_shape": ["batch", len(trained.classes)],
        "output": "logits; softmax over the last axis gives the class probabilities",
        "classes": trained.classes,
        "source": {"checkpoint": str(trained.checkpoint), "epoch": trained.metadata.get("epoch"),
                   "weights": trained.weights, "model": trained.recipe.model.name, "recipe": trained.recipe.name},
        "exporter": exporter,
        "torch_version": torch.__version__,
        "check": check.to_dict(),
    }
    preprocess_file = out / PREPROCESS_FILE
    tmp = out / f".{PREPROCESS_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(description, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, preprocess_file)
    return ExportResult(out, model_file, weights_file, preprocess_file, check, exporter)


# -- command line ---------------------------------------------------------------------------
def add_arguments(parser: Any) -> None:
    """The arguments of ``convrecipes export`` on an ``argparse`` parser."""
    parser.add_argument("run", help="run directory or .safetensors checkpoint written by `convrecipes train`")
    parser.add_argument("--format", dest="fmt", choices=FORMATS, required=True,
                        help="onnx (dynamic batch; needs pip install 'convrecipes[export]') or torchscript")
    parser.add_argument("--out", help="folder to write (default: <run directory>/export_<format>)")
    parser.add_argument("--weights", choices=("best", "last"), default="best", help="which checkpoint of a run directory")
    parser.add_argument("--ema", action="store_true", help="export the EMA weights")
    parser.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                        help=f"allowed logit difference from the run's model, relative to the logits' scale: "
                             f"max |diff| <= tolerance * max(1, max |logit|) (default {DEFAULT_TOLERANCE:g})")


def cmd_export(args: Any) -> int:
    """``convrecipes export``: export, check, print what was written and the check."""
    result = export_run(args.run, args.fmt, out_dir=args.out, weights=args.weights, ema=args.ema,
                        tolerance=args.tolerance)
    check = result.check
    print(f"wrote {result.model_file} ({result.exporter}), {result.weights_file.name} and "
          f"{result.preprocess_file.name} in {result.out_dir}")
    print(f"check: max |logit difference| {check.max_abs_diff:.3g} <= {check.bound:.3g} (tolerance "
          f"{check.tolerance:g} x max(1, max |logit| {check.max_abs_logit:.3g})) on {check.images} images from "
          f"{check.source}, batch sizes {', '.join(str(b) for b in check.batch_sizes)}")
    return 0
