"""The workflow a run goes through, shared by the CLI, the benchmarks and the examples.

``train_recipe(recipe, run_dir)`` resolves ``optimizer.lr=auto``, builds the experiment,
writes the resolved recipe, trains (or resumes), tests the final weights, the EMA weights
and the best checkpoint, and writes ``results.json``. ``train_stages(recipes)`` chains
runs, each from the previous one's weights (e.g. a second stage at a larger image size).
``evaluate_run(run)`` tests a run's checkpoint again, with embedding metrics for models that
expose embeddings. All work in one process or under ``accelerate launch`` (call them on
every process).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from convrecipes.errors import CheckpointError, ConvrecipesError
from convrecipes.loading import find_checkpoint
from convrecipes.recipe import Recipe
from convrecipes.trainers.callbacks import Callback

PathLike = Union[str, os.PathLike]


@dataclass
class RunResult:
    """What ``train_recipe`` did.

    Attributes:
        run_dir: the run directory.
        results: the contents of ``results.json`` (test metrics of the final, EMA and best
            weights, parameter count, batch, processes, wall time).
        history: the per-epoch metrics of this call (a resumed run: the epochs it trained).
        recipe: the resolved recipe (with the computed mean/std and a resolved ``auto`` LR).
    """

    run_dir: Path
    results: dict[str, Any]
    history: list[dict[str, float]] = field(default_factory=list)
    recipe: Optional[Recipe] = None

    @property
    def test_top1(self) -> Optional[float]:
        """Test top-1 of the final weights (None for datasets with unseen test classes)."""
        return self.results.get("test_final", {}).get("test_top1")


def process_state() -> Any:
    """Accelerate's process state before any ``Accelerator`` exists (which process this is,
    how many there are). ``ACCELERATE_USE_CPU`` is honoured as ``Accelerator`` does: a bare
    ``PartialState()`` would miss it and see one process under CPU DDP."""
    from accelerate import PartialState
    from accelerate.utils import parse_flag_from_env

    return PartialState(cpu=parse_flag_from_env("ACCELERATE_USE_CPU"))


def _from_main_process(value: Any, state: Any) -> Any:
    """``value`` (anything picklable) as the main process has it, on every process."""
    if state.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        holder = [value]
        broadcast_object_list(holder)
        value = holder[0]
    return value


def shared_path(default: PathLike, accelerator: Any) -> Path:
    """``default`` as decided on the main process, shared with the others (so a timestamp
    that ticks over between processes cannot split a run in two)."""
    return Path(_from_main_process(str(default), accelerator))


def run_name(recipe: Recipe) -> str:
    """The default name of a recipe's runs: the recipe's name; for a user's own images
    (``image_folder`` with a ``data.data_dir``) the data folder's name first, so runs on
    different folders are told apart: ``flowers`` for the template recipe ``image_folder``,
    ``flowers-<recipe name>`` for any other recipe."""
    d = recipe.data
    if d.name != "image_folder" or not d.data_dir:
        return recipe.name
    folder = Path(d.data_dir).expanduser().resolve().name or "image_folder"
    return folder if recipe.name == d.name else f"{folder}-{recipe.name}"


def new_run_dir(recipe: Recipe, accelerator: Any, explicit: Optional[PathLike] = None, prefix: str = "") -> Path:
    """``explicit``, or ``<output_dir>/<prefix><run_name>-<timestamp>``, the same on every process."""
    default = explicit or Path(recipe.output_dir) / f"{prefix}{run_name(recipe)}-{time.strftime('%Y%m%d-%H%M%S')}"
    return shared_path(default, accelerator)


#: recipe keys a resume may change: they do not change what the checkpoint's state means
RESUME_SAFE_KEYS = ("trainer.epochs", "data.data_dir", "trainer.checkpoint_every_steps", "trainer.progress",
                    "trainer.log_with", "trainer.log_every_steps", "trainer.early_stopping_patience",
                    "trainer.eval_every_epochs",
                    # how fast the step runs, not what it computes
                    "trainer.threads", "trainer.compile", "trainer.nan_check_every_steps", "optimizer.fused",
                    # a resume reads the weights from its checkpoint, never the initial ones
                    "model.init_from")


def recipe_of_checkpoint(path: PathLike, prefer: str = "last",
                         overrides: Sequence[str] = ()) -> tuple[Recipe, Path]:
    """The recipe recorded in a run's checkpoint, and that checkpoint (for ``--resume``),
    with ``overrides`` of the keys that are safe to change on resume (``RESUME_SAFE_KEYS``:
    more epochs, e.g. to extend a finished run, a moved data directory, checkpoint and
    logging frequency); any other key is refused by name."""
    from convrecipes.checkpoint import read_metadata
    from convrecipes.errors import RecipeError
    from convrecipes.recipe import apply_overrides, parse_override, recipe_from_dict

    ckpt = find_checkpoint(path, prefer=prefer)
    meta = read_metadata(ckpt)
    if "recipe" not in meta:
        raise CheckpointError(f"{ckpt} records no recipe; it needs a checkpoint written by `convrecipes train`")
    for text in overrides:
        key = parse_override(text)[0]
        if key not in RESUME_SAFE_KEYS:
            raise RecipeError(f"{key!r} cannot change on --resume (the checkpoint was trained with the recorded "
                              f"value); keys a resume may change: {', '.join(RESUME_SAFE_KEYS)}. To train with "
                              f"another {key}, start a new run from the recipe")
    raw = apply_overrides(dict(meta["recipe"]), overrides)
    return recipe_from_dict(raw), ckpt


class RunDirError(ConvrecipesError):
    """A run directory that belongs to another run (finished, unfinished or running)."""


LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunDirLock:
    """``<run dir>/.lock`` held for a run's lifetime (main process only): a second training
    into the same directory is refused while the first runs. A lock left by a crashed run
    (its process is gone on this host) is taken over, not obeyed forever."""

    def __init__(self, run_dir: Path) -> None:
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False

    def acquire(self) -> "RunDirLock":
        import socket

        me = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    other = json.loads(self.path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    other = {}
                stale = other.get("host") == me["host"] and not _pid_alive(int(other.get("pid", -1)))
                if stale or not other:
                    self.path.unlink(missing_ok=True)  # a crashed run's lock
                    continue
                raise RunDirError(f"run directory {self.path.parent} is in use by process {other.get('pid')} on "
                                  f"{other.get('host')} (since {other.get('started')}); wait for it to finish or "
                                  f"pick another --run-dir (if that process is gone, delete {self.path})") from None
            except OSError as exc:
                raise RunDirError(f"run directory {self.path.parent} is not writable ({exc.strerror or exc}); fix "
                                  f"its permissions or pick another --run-dir") from None
            with os.fdopen(fd, "w") as fh:
                json.dump(me, fh)
            self.held = True
            return self
        raise RunDirError(f"could not take the lock {self.path}; delete it if no run is using the directory")

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


# what marks a directory as holding a run (stages.json: a multi-stage run's parent)
RUN_FILES = ("results.json", "last.safetensors", "best.safetensors", "metrics.jsonl", "stages.json")


def claim_run_dir(run_dir: Path, resume: bool, overwrite: bool = False) -> Optional[Path]:
    """Refuse to start a new run in a directory that holds one, unless ``resume`` (continue
    it) or ``overwrite`` (move it aside to ``<dir>.old-<timestamp>``, returned)."""
    run_dir = Path(run_dir)
    found = [name for name in RUN_FILES if (run_dir / name).exists()]
    if resume or not found:
        return None
    if overwrite:
        aside = run_dir.with_name(f"{run_dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        os.replace(run_dir, aside)
        return aside
    if "results.json" in found:
        raise RunDirError(f"run directory {run_dir} holds a finished run (results.json); pick another --run-dir, or "
                          f"pass --overwrite to move the old run aside")
    raise RunDirError(f"run directory {run_dir} holds an unfinished run ({', '.join(found)}); continue it with "
                      f"`convrecipes train --resume {run_dir}`, pick another --run-dir, or pass --overwrite to move "
                      f"the old run aside")


class StopWhenOrphaned(Callback):
    """Under several processes: stop a rank whose launcher has died (its parent process
    changed), instead of training on into the run directory unsupervised."""

    def __init__(self) -> None:
        self.parent = os.getppid()

    def on_step_start(self, trainer: Any, global_step: int) -> None:
        if os.getppid() != self.parent:
            raise ConvrecipesError(f"the launcher of this process (pid {self.parent}) is gone; rank "
                                   f"{trainer.accelerator.process_index} stops before step {global_step}. The last "
                                   f"checkpoint is intact: resume with --resume")


class _WallClock:
    """Registered state: the run's wall time, summed over its resumes."""

    def __init__(self) -> None:
        self.before = 0.0
        self.t0 = time.perf_counter()

    def elapsed(self) -> float:
        return self.before + time.perf_counter() - self.t0

    def state_dict(self) -> dict[str, float]:
        return {"elapsed_s": self.elapsed()}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.before, self.t0 = float(state["elapsed_s"]), time.perf_counter()


def _without_accuracy(metrics: dict[str, Any]) -> dict[str, Any]:
    """``metrics`` less test top-1/top-5: for test classes unseen in training they are a meaningless ~0."""
    return {k: v for k, v in metrics.items() if not k.startswith(("test_top1", "test_top5"))}


def train_recipe(
    recipe: Recipe,
    run_dir: Optional[PathLike] = None,
    *,
    resume_from: Optional[PathLike] = None,
    accelerator: Any = None,
    overwrite: bool = False,
) -> RunResult:
    """Train a recipe and test it; the whole ``convrecipes train`` workflow.

    Args:
        recipe: a validated recipe (``load_recipe``); ``optimizer.lr: auto`` is resolved
            here by an LR range test.
        run_dir: the run directory (default ``<output_dir>/<name>-<timestamp>``).
        resume_from: a checkpoint (or run directory: its ``last.safetensors``) to continue
            from; the run directory defaults to the checkpoint's.
        accelerator: an ``Accelerator`` (default: made from the recipe).
        overwrite: move a run already in ``run_dir`` aside (``<dir>.old-<timestamp>``)
            instead of refusing.

    Returns:
        A ``RunResult``; ``results.json`` in the run directory holds the same results.

    Raises:
        RunDirError: ``run_dir`` holds another run (and neither resume nor overwrite was
            asked), is in use by a running training, or is not writable.
    """
    resume_ckpt = find_checkpoint(resume_from, prefer="last") if resume_from is not None else None
    if run_dir is None and resume_ckpt is not None:
        run_dir = resume_ckpt.parent
    state = process_state()
    if run_dir is None:  # named before the accelerator exists: its trackers write into it
        run_dir = new_run_dir(recipe, state)
    run_dir = Path(run_dir)
    lock = RunDirLock(run_dir)
    refusal = ""
    created = state.is_main_process and not run_dir.exists()
    if state.is_main_process:
        try:
            aside = claim_run_dir(run_dir, resume=resume_ckpt is not None, overwrite=overwrite)
            if aside is not None:
                print(f"moved the previous run in {run_dir} aside to {aside}")
            try:
                run_dir.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise RunDirError(f"cannot create the run directory {run_dir} ({exc.strerror or exc}); pick a "
                                  f"writable --run-dir") from None
            lock.acquire()
        except RunDirError as exc:
            refusal = str(exc)
    refusal = _from_main_process(refusal, state)
    if refusal:  # every process stops, not only the main one
        raise RunDirError(refusal)
    try:
        return _train_in(recipe, run_dir, resume_ckpt, accelerator)
    finally:
        lock.release()
        if created and run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # a run that failed before writing anything (e.g. bad data) leaves no empty folder


def _train_in(recipe: Recipe, run_dir: Path, resume_ckpt: Optional[Path], accelerator: Any) -> RunResult:
    from convrecipes.build import build, make_accelerator
    from convrecipes.data.datasets import has_unseen_test_classes
    from convrecipes.recipe import dump_recipe

    accelerator = accelerator or make_accelerator(recipe, run_dir)
    clock = _WallClock()
    if isinstance(recipe.optimizer.lr, str):  # "auto": the LR range test picks it (a resume reads the number)
        from convrecipes.lr_finder.command import resolve_auto_lr

        resolve_auto_lr(recipe, accelerator, run_dir)
    # a resume takes the weights from its checkpoint: the initial ones need not exist any more
    exp = build(recipe, accelerator=accelerator, run_dir=run_dir, init_weights=resume_ckpt is None)
    trainer = exp.trainer
    trainer.register_state("wall_clock", clock, required=False)
    if accelerator.num_processes > 1:
        trainer.callbacks.append(StopWhenOrphaned())
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        dump_recipe(recipe, run_dir / "recipe.yaml")  # resolved, with the computed mean/std
    ds = exp.datasets
    if ds.label_noise is not None:
        from convrecipes.data.label_noise import NOISE_FILE

        if accelerator.is_main_process:
            ds.label_noise.write(run_dir / NOISE_FILE)
        n = ds.label_noise.extra["num_labels"]
        trainer.print(f"label noise: {recipe.data.label_noise.kind} at rate {recipe.data.label_noise.rate}: "
                      f"{len(ds.label_noise.flipped)} of {n} training labels flipped "
                      f"({ds.label_noise.extra.get('flipped_in_val', 0)} of them in the validation split"
                      f"{', kept clean' if recipe.data.label_noise.clean_val else ''}); see {run_dir / NOISE_FILE}")
    trainer.print(
        f"recipe {recipe.name}: {recipe.data.name} train {len(ds.train)} / val {len(ds.val) if ds.val else 0} / "
        f"test {len(ds.test)} images of {tuple(ds.train.image_shape)}, {ds.num_classes} classes; model "
        f"{recipe.model.name} with {exp.num_parameters:,} parameters; trainer {recipe.trainer.name}; global batch "
        f"{exp.train_loader.batch_size} on {accelerator.num_processes} process(es), mixed precision "
        f"{accelerator.mixed_precision}; run dir {run_dir}"
    )
    if exp.init is not None:
        trainer.print(f"initial weights from {exp.init['file']} ({exp.init['kind']}); classifier "
                      f"{exp.init['classifier']}")
    if exp.freezer is not None:
        trainer.print(exp.freezer.summary())
    history = trainer.fit(exp.train_loader, exp.val_loader, epochs=recipe.trainer.epochs, resume_from=resume_ckpt)
    results: dict[str, Any] = {"run_dir": str(run_dir), "num_parameters": exp.num_parameters,
                               "global_batch_size": exp.train_loader.batch_size,
                               "num_processes": accelerator.num_processes}
    results["test_final"] = trainer.evaluate(exp.test_loader, prefix="test_")
    if trainer.ema is not None:
        results["test_final_ema"] = trainer.evaluate(exp.test_loader, model=trainer.ema.module, prefix="test_")
    for name, other in trainer.evaluation_models().items():  # e.g. an MPL teacher
        results[f"test_final_{name}"] = trainer.evaluate(exp.test_loader, model=other, prefix="test_")
    best = run_dir / "best.safetensors"
    # the main process reads the best weights and hands them to the others: across machines
    # without a shared filesystem only the main process's node has the run directory, and a
    # rank that decided on its own would skip the evaluation's collectives and hang the rest
    best_weights = None
    if accelerator.is_main_process and best.is_file():
        from convrecipes.checkpoint import load_checkpoint, model_weights_of

        state, meta = load_checkpoint(best)
        best_weights = (dict(model_weights_of(state, best)), meta.get("epoch"))
    best_weights = _from_main_process(best_weights, accelerator)
    if best_weights is not None:
        from convrecipes.checkpoint import load_model_weights

        load_model_weights(trainer.unwrapped_model, best_weights[0], best)
        results["best_epoch"] = best_weights[1]
        results["test_best"] = trainer.evaluate(exp.test_loader, prefix="test_")
    results["wall_time_s"] = round(clock.elapsed(), 1)  # across resumes
    if has_unseen_test_classes(recipe.data.name):
        results["unseen_test_classes"] = True
        for key in ("test_final", "test_final_ema", "test_best"):
            if key in results:
                results[key] = _without_accuracy(results[key])
    if accelerator.is_main_process:
        tmp = run_dir / ".results.json.tmp"
        tmp.write_text(json.dumps(results, indent=2))
        os.replace(tmp, run_dir / "results.json")
    accelerator.wait_for_everyone()
    return RunResult(run_dir, results, history, recipe)


def evaluate_run(
    run: PathLike,
    weights: str = "best",
    *,
    ema: bool = False,
    data_dir: Optional[str] = None,
    plot: Optional[PathLike] = None,
    accelerator: Any = None,
    model_kwargs: Optional[dict[str, Any]] = None,
    overrides: Sequence[str] = (),
    report_dir: Optional[PathLike] = None,
    top_losses: int = 16,
) -> dict[str, Any]:
    """Test a run's checkpoint on its recipe's test split.

    Args:
        run: a run directory or a checkpoint file.
        weights: ``best`` or ``last`` (for a run directory).
        ema: evaluate the EMA weights.
        data_dir: where the dataset is, if not where training found it.
        plot: a PNG path for a 2-D embedding plot; a model without 2-D embeddings is
            refused (``RecipeError``) before anything is evaluated.
        accelerator: an ``Accelerator`` (default: made from the recipe).
        model_kwargs: ``model.kwargs`` entries to change when rebuilding the model (e.g.
            ``{"column": 2}``: a FractalNet's deepest column alone); recorded in the result.
        overrides: ``key=value`` changes of the recorded recipe's ``data`` section (e.g.
            ``data.image_size=16``: test at another resolution, the images resized at load
            time); recorded in the result. Other sections would change what the checkpoint's
            weights mean and are refused.
        report_dir: write the confusion matrix, the top-losses sheet and the per-class
            metrics there (``convrecipes.evaluation_report``; the main process writes).
        top_losses: images on the top-losses sheet (0: none).

    Returns:
        ``{"checkpoint", "epoch", "dataset", "weights", "unseen_test_classes", test_* metrics}``;
        models that expose embeddings add ``test_recall_at_1``, ``test_spread_*`` and
        ``test_angle_*``; with ``report_dir`` (and test classes the model was trained on),
        ``per_class``, ``macro_average`` and ``report_files``.
    """
    from convrecipes.build import build_for_evaluation
    from convrecipes.checkpoint import load_checkpoint, load_model_weights, model_weights_of
    from convrecipes.data.datasets import has_unseen_test_classes
    from convrecipes.models import Classifier
    from convrecipes.recipe import recipe_from_dict

    ckpt = find_checkpoint(run, prefer=weights)
    state, meta = load_checkpoint(ckpt)
    if "recipe" not in meta:
        raise CheckpointError(f"{ckpt} records no recipe; evaluate needs a checkpoint written by `convrecipes train`")
    model_weights_of(state, ckpt)  # before building anything
    raw = dict(meta["recipe"])
    if overrides:
        from convrecipes.errors import RecipeError
        from convrecipes.recipe import apply_overrides, parse_override

        for text in overrides:
            if not parse_override(text)[0].startswith("data."):
                raise RecipeError(f"evaluate changes only the data section of a run's recipe (e.g. "
                                  f"data.image_size=16), got {text!r}; other keys would change what the weights mean")
        raw = apply_overrides(raw, overrides)
    recipe = recipe_from_dict(raw)
    recipe.trainer.progress = False
    if data_dir:
        recipe.data.data_dir = data_dir
    if model_kwargs:
        recipe.model.kwargs = {**(recipe.model.kwargs or {}), **model_kwargs}
    exp = build_for_evaluation(recipe, accelerator)
    trainer = exp.trainer
    if plot:
        from convrecipes.evaluation_report import require_2d_embeddings

        require_2d_embeddings(trainer.unwrapped_model, exp.datasets.test.image_shape, recipe.model.name)
    chosen = state.get("ema") if ema else model_weights_of(state, ckpt)
    if chosen is None:
        raise CheckpointError(f"{ckpt} has no EMA weights; drop --ema")
    load_model_weights(trainer.unwrapped_model, chosen, ckpt)
    trainer.loss_fn.load_state_dict(state["loss"])
    metrics: dict[str, Any] = trainer.evaluate(exp.test_loader, prefix="test_")
    unseen = has_unseen_test_classes(recipe.data.name)
    if unseen:
        metrics = _without_accuracy(metrics)
    # a second pass over the test set for models that expose embeddings and for the report
    report = report_dir is not None and not unseen
    if isinstance(trainer.unwrapped_model, Classifier) or report:
        logits, targets, embeddings = trainer.predict(exp.test_loader)
        if report:
            from convrecipes.evaluation_report import explain_test_set

            about = {"checkpoint": str(ckpt), "epoch": meta.get("epoch"), "weights": "EMA" if ema else "raw",
                     "dataset": recipe.data.name, "model_kwargs": model_kwargs, "overrides": list(overrides)}
            metrics.update(explain_test_set(logits, targets, exp.datasets.test, meta.get("classes"), report_dir,
                                            top_losses, about, write=trainer.is_main_process))
        if embeddings is not None:
            from convrecipes.embedding_metrics import angular_spread, recall_at_1, spread_ratio

            metrics["test_recall_at_1"] = 100.0 * recall_at_1(embeddings, targets)
            metrics.update({f"test_spread_{k}": float(v) for k, v in spread_ratio(embeddings, targets).items()})
            metrics.update({f"test_angle_{k}": float(v) for k, v in angular_spread(embeddings, targets).items()})
            if embeddings.shape[1] == 2 and plot and trainer.is_main_process:
                from convrecipes.embedding_metrics import plot_embeddings_2d

                plot_embeddings_2d(embeddings, targets, plot, class_names=meta.get("classes"))
    return {"checkpoint": str(ckpt), "epoch": meta.get("epoch"), "dataset": recipe.data.name,
            "weights": "EMA" if ema else "raw", "unseen_test_classes": unseen,
            **({"model_kwargs": dict(model_kwargs)} if model_kwargs else {}),
            **({"overrides": list(overrides)} if overrides else {}), **metrics}


# -- stages -------------------------------------------------------------------------------
STAGE_DIR = "stage{}"


@dataclass
class StagesResult:
    """What ``train_stages`` did.

    Attributes:
        run_dir: the parent directory (``stage1``, ``stage2``, ... inside it).
        results: the contents of its ``results.json``: per stage its run directory, image
            size, epochs, the test metrics of its final and best weights and, from stage 2
            on, ``test_init``: its initial weights (the previous stage's) on its own test
            data before it trained (e.g. the stage-1 model at the larger image size).
        stages: each stage's ``RunResult``.
    """

    run_dir: Path
    results: dict[str, Any]
    stages: list[RunResult] = field(default_factory=list)


def _init_test_overrides(before: Recipe, after: Recipe) -> Optional[list[str]]:
    """The ``data`` overrides that test ``before``'s weights on ``after``'s test data, or
    None when the data is another dataset or has other channels (the weights do not apply)."""
    b, a = before.data, after.data
    if b.name != a.name or b.channels != a.channels:
        return None
    return [f"data.{key}={json.dumps(getattr(a, key))}" for key in ("image_size", "data_dir")
            if getattr(a, key) != getattr(b, key)]


STAGES_FILE = "stages.json"


def is_multi_stage_run(path: PathLike) -> bool:
    """True for the parent directory of a ``--then`` multi-stage run (it holds ``stages.json``)."""
    return (Path(path) / STAGES_FILE).is_file()


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


def train_stages(
    recipes: Sequence[Recipe],
    run_dir: Optional[PathLike] = None,
    *,
    overwrite: bool = False,
    stage_overrides: Optional[Sequence[Sequence[str]]] = None,
) -> StagesResult:
    """Train several stages one after the other, each from the previous one's weights: e.g.
    train at a small image size, then fine-tune a few epochs at a larger one (the
    ``convrecipes train RECIPE --then data.image_size=... trainer.epochs=...`` command).

    Stage ``k`` trains into ``<run_dir>/stage<k>`` with ``train_recipe``; from stage 2 on
    its ``model.init_from`` is set to the previous stage's run directory (its best
    checkpoint), and that checkpoint is first tested on the stage's own test data
    (``test_init``). ``<run_dir>/stages.json`` records the stages' recipes and progress from
    the start, so a killed multi-stage run continues with ``resume_stages`` (``convrecipes
    train --resume <run_dir>``); ``<run_dir>/results.json`` sums the stages up at the end.

    Args:
        recipes: one validated recipe per stage.
        run_dir: the parent directory (default ``<output_dir>/<first recipe's name>-<timestamp>``).
        overwrite: move a finished multi-stage run in ``run_dir`` aside instead of refusing.
        stage_overrides: the overrides each stage was made with, recorded in the summary.

    Raises:
        RecipeError: no stage, or stages with different mixed precision (one process runs
            them all).
        RunDirError: ``run_dir`` holds another run.
    """
    from convrecipes.errors import RecipeError
    from convrecipes.recipe import recipe_to_dict

    if not recipes:
        raise RecipeError("train_stages needs at least one recipe")
    precisions = {r.trainer.mixed_precision for r in recipes}
    if len(precisions) > 1:
        raise RecipeError(f"the stages ask for different trainer.mixed_precision ({', '.join(map(str, precisions))}), "
                          f"but one process runs them all with one setting; use the same value in every stage")
    state = process_state()
    run_dir = Path(run_dir) if run_dir is not None else new_run_dir(recipes[0], state)
    refusal = ""
    if state.is_main_process:
        try:
            aside = claim_run_dir(run_dir, resume=False, overwrite=overwrite)
            if aside is not None:
                print(f"moved the previous run in {run_dir} aside to {aside}")
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_json_atomic(run_dir / STAGES_FILE, {
                "recipes": [recipe_to_dict(r) for r in recipes],
                "stage_overrides": [list(o) for o in stage_overrides] if stage_overrides is not None else None,
                "entries": {}})
        except RunDirError as exc:
            refusal = str(exc)
    refusal = _from_main_process(refusal, state)
    if refusal:
        raise RunDirError(refusal)
    return _run_stages(list(recipes), run_dir, stage_overrides, state)


def resume_stages(run_dir: PathLike) -> StagesResult:
    """Continue a killed multi-stage run in ``run_dir`` (written by ``train_stages``):
    finished stages are read back, the stage that was training resumes from its
    ``last.safetensors`` exactly, later stages train as they would have, and
    ``<run_dir>/results.json`` is written at the end as for an uninterrupted run.

    Raises:
        RunDirError: ``run_dir`` is not a multi-stage run.
    """
    from convrecipes.recipe import recipe_from_dict

    run_dir = Path(run_dir)
    if not is_multi_stage_run(run_dir):
        raise RunDirError(f"{run_dir} is not a multi-stage run (no {STAGES_FILE}); pass the parent directory that "
                          f"`convrecipes train ... --then ...` wrote, or a single run directory")
    record = json.loads((run_dir / STAGES_FILE).read_text())
    recipes = [recipe_from_dict(raw) for raw in record["recipes"]]
    return _run_stages(recipes, run_dir, record.get("stage_overrides"), process_state())


def _run_stages(recipes: list[Recipe], run_dir: Path, stage_overrides: Optional[Sequence[Sequence[str]]],
                state: Any) -> StagesResult:
    """The stages of ``train_stages`` / ``resume_stages``: each finished one read back, an
    unfinished one resumed, the others trained; progress kept in ``stages.json``."""
    record_path = run_dir / STAGES_FILE
    summary: dict[str, Any] = {"run_dir": str(run_dir), "stages": []}
    done: list[RunResult] = []
    for k, recipe in enumerate(recipes, start=1):
        stage_dir = run_dir / STAGE_DIR.format(k)
        record = json.loads(record_path.read_text())
        entry: dict[str, Any] = dict(record["entries"].get(str(k), {}))
        entry.update({"stage": k, "run_dir": str(stage_dir)})
        if stage_overrides is not None and k - 1 < len(stage_overrides):
            entry["overrides"] = list(stage_overrides[k - 1])
        if done:
            previous = done[-1]
            recipe.model.init_from = str(previous.run_dir)
            if "test_init" not in entry:  # measured once, before the stage first trained
                init_ckpt = find_checkpoint(previous.run_dir, prefer="best")  # what model.init_from loads
                overrides = _init_test_overrides(previous.recipe, recipe)
                if overrides is not None:
                    init = evaluate_run(init_ckpt, overrides=overrides)
                    entry["test_init"] = {key: v for key, v in init.items() if key.startswith("test_")}
                    entry["init_checkpoint"] = str(init_ckpt)
                    if state.is_main_process:
                        record["entries"][str(k)] = entry
                        _write_json_atomic(record_path, record)
        if (stage_dir / "results.json").is_file():
            finished = json.loads((stage_dir / "results.json").read_text())
            result = RunResult(stage_dir, finished, recipe=recipe_of_checkpoint(stage_dir, prefer="last")[0])
        elif (stage_dir / "last.safetensors").is_file():
            stage_recipe, ckpt = recipe_of_checkpoint(stage_dir, prefer="last")
            result = train_recipe(stage_recipe, stage_dir, resume_from=ckpt)
        else:
            result = train_recipe(recipe, stage_dir)
        done.append(result)
        entry.update({"image_size": result.recipe.data.image_size, "epochs": result.recipe.trainer.epochs,
                      **{key: v for key, v in result.results.items()
                         if key.startswith("test_") or key in ("best_epoch", "wall_time_s")}})
        summary["stages"].append(entry)
    if state.is_main_process:  # only now: a results.json marks the whole multi-stage run finished
        _write_json_atomic(run_dir / "results.json", summary)
    return StagesResult(run_dir, summary, done)
