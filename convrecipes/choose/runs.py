"""Resumable training of one run directory, shared by ``convrecipes compare`` and the benchmarks.

``train_or_resume(recipe, overrides, run_dir)`` reads a finished run (``results.json``),
resumes an unfinished one (``last.safetensors`` without ``results.json``) and otherwise
trains afresh, so a long comparison killed half-way picks up where it stopped.
``check_run_matches`` refuses, before anything trains, a run directory that was trained
with another recipe (reading it as if it were this one would put a wrong number in a table).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from convrecipes.recipe import Recipe, load_recipe, recipe_to_dict
from convrecipes.run import RESUME_SAFE_KEYS, RunDirError, RunResult, recipe_of_checkpoint, train_recipe

PathLike = Union[str, Path]

#: keys that say how a run was run, not what it trained (a moved data directory, logging);
#: ``augment.mean``/``std`` are computed from the data when the recipe leaves them unset
_IGNORED_KEYS = ("name", "description", "output_dir", "augment.mean", "augment.std", "data.data_dir",
                 "data.download", "trainer.progress", "trainer.log_with", "trainer.log_every_steps",
                 "trainer.checkpoint_every_steps", "trainer.collective_timeout_s")


#: written into a run directory whose training stopped on a non-finite loss
DIVERGED = "diverged.json"


def run_state(run_dir: PathLike) -> str:
    """``"finished"`` (``results.json``), ``"diverged"`` (stopped on a NaN loss, ``diverged.json``),
    ``"unfinished"`` (``last.safetensors`` only) or ``"new"``."""
    run_dir = Path(run_dir)
    if (run_dir / "results.json").is_file():
        return "finished"
    if (run_dir / DIVERGED).is_file():
        return "diverged"
    if (run_dir / "last.safetensors").is_file():
        return "unfinished"
    return "new"


def train_or_resume(recipe: PathLike, overrides: Sequence[str], run_dir: PathLike) -> RunResult:
    """Train ``recipe`` with ``overrides`` (and ``trainer.progress=false``) into ``run_dir``.

    A run directory with ``results.json`` is finished and only read; one with
    ``last.safetensors`` but no ``results.json`` resumes from it with the recipe its
    checkpoint records (the overrides of ``RESUME_SAFE_KEYS``, e.g. more epochs, apply).
    ``history`` of the returned run holds every epoch of the run (for a skipped or resumed
    run, read from its ``metrics.jsonl``).
    """
    from convrecipes.recipe import parse_override
    from convrecipes.trainers.metrics_log import read_jsonl

    run_dir = Path(run_dir)
    state = run_state(run_dir)
    if state == "finished":
        return RunResult(run_dir, json.loads((run_dir / "results.json").read_text()),
                         read_jsonl(run_dir / "metrics.jsonl"))
    if state == "unfinished":
        # overrides that cannot change what the checkpoint means (e.g. how often to validate) apply on resume too
        safe = [o for o in overrides if parse_override(o)[0] in RESUME_SAFE_KEYS]
        resolved, last = recipe_of_checkpoint(run_dir, prefer="last", overrides=safe)
        run = train_recipe(resolved, run_dir, resume_from=last)
        run.history = read_jsonl(run_dir / "metrics.jsonl")
        return run
    return train_recipe(load_recipe(recipe, ["trainer.progress=false", *overrides]), run_dir)


def _flat(node: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(node, dict):
        out: dict[str, Any] = {}
        for key, value in node.items():
            out.update(_flat(value, f"{prefix}.{key}" if prefix else str(key)))
        return out if out or not prefix else {prefix: {}}
    return {prefix: node}


def recipe_differences(recorded: dict[str, Any], wanted: Recipe, resumable: bool = False) -> list[str]:
    """``"key: run has A, asked B"`` for every recipe key where a run's recorded recipe
    differs from ``wanted``, less the keys that do not change what is trained (and, for a
    run that will resume, the keys a resume may change)."""
    ignored = set(_IGNORED_KEYS) | (set(RESUME_SAFE_KEYS) if resumable else set())
    if isinstance(wanted.optimizer.lr, str):  # "auto": the run recorded the number its range test found
        ignored.add("optimizer.lr")
    have, want = _flat(recorded), _flat(recipe_to_dict(wanted))
    diffs = []
    for key in sorted(have.keys() | want.keys()):
        if key in ignored or any(key.startswith(f"{k}.") for k in ignored):
            continue
        a, b = have.get(key, "(unset)"), want.get(key, "(unset)")
        if a != b:
            diffs.append(f"{key}: run has {a!r}, asked {b!r}")
    return diffs


def check_run_matches(run_dir: PathLike, wanted: Recipe) -> None:
    """Refuse a run directory whose recorded recipe (``recipe.yaml``) is not ``wanted``.

    Raises:
        RunDirError: naming the differing keys and the fix (another output directory, or
            deleting the run directory to train it again).
    """
    import yaml

    run_dir = Path(run_dir)
    state = run_state(run_dir)
    path = run_dir / "recipe.yaml"
    if state == "new" or not path.is_file():
        return
    recorded = yaml.safe_load(path.read_text()) or {}
    diffs = recipe_differences(recorded, wanted, resumable=state == "unfinished")
    if diffs:
        shown = "; ".join(diffs[:3]) + (f"; and {len(diffs) - 3} more" if len(diffs) > 3 else "")
        raise RunDirError(f"run directory {run_dir} holds a{'n unfinished' if state == 'unfinished' else ' finished'} "
                          f"run of another recipe ({shown}); compare reuses the runs it finds, so pick another "
                          f"--out for these settings, or delete {run_dir} to train it again")


def train_all(recipe: PathLike, jobs: Sequence[tuple[str, Sequence[str], PathLike]],
              say: Any = print) -> list[RunResult]:
    """Train (or read, or resume) every ``(description, overrides, run_dir)`` job in order,
    printing ``[i/n] ...`` before each. Every run directory is checked against its recipe
    (``check_run_matches``) before the first training starts."""
    for _, overrides, run_dir in jobs:
        check_run_matches(run_dir, load_recipe(recipe, ["trainer.progress=false", *overrides]))
    from convrecipes.errors import NonFiniteLossError

    results: list[Optional[RunResult]] = []
    n = len(jobs)
    for i, (what, overrides, run_dir) in enumerate(jobs, 1):
        state = run_state(run_dir)
        if state == "diverged":
            say(f"[{i}/{n}] {what}: diverged before ({Path(run_dir) / DIVERGED}); not retrained. To retry, e.g. with a "
                f"lower optimizer.lr, compare into another --out")
            results.append(None)
            continue
        if state == "finished":
            say(f"[{i}/{n}] {what}: finished run in {run_dir}, reading its results")
        elif state == "unfinished":
            say(f"[{i}/{n}] resuming {what} from {Path(run_dir) / 'last.safetensors'} ...")
        else:
            say(f"[{i}/{n}] training {what} -> {run_dir} ...")
        try:
            results.append(train_or_resume(recipe, overrides, run_dir))
        except NonFiniteLossError as exc:
            # one candidate that diverges at the shared LR is a result (it needs another LR), not
            # a reason to lose the rest of the comparison
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            (Path(run_dir) / DIVERGED).write_text(json.dumps({"error": str(exc)}, indent=2))
            say(f"[{i}/{n}] {what} diverged (non-finite loss); it is reported without accuracy: {exc}")
            results.append(None)
    return results


def run_metrics(run_dir: PathLike) -> dict[str, Any]:
    """What a finished run measured: ``test_top1`` (final weights), ``val_top1`` (the last
    epoch's), ``train_images_per_s`` (median over epochs: the first epoch's warm-up does not
    count twice), ``wall_time_s`` (across resumes), ``epochs`` and ``num_parameters``."""
    import statistics

    from convrecipes.trainers.metrics_log import read_jsonl

    run_dir = Path(run_dir)
    if run_state(run_dir) == "diverged":
        return {"run_dir": str(run_dir), "test_top1": None, "val_top1": None, "train_images_per_s": None,
                "wall_time_s": None, "epochs": None, "num_parameters": None, "diverged": True}
    results = json.loads((run_dir / "results.json").read_text())
    history = read_jsonl(run_dir / "metrics.jsonl") if (run_dir / "metrics.jsonl").is_file() else []
    vals = [r["val_top1"] for r in history if r.get("val_top1") is not None]
    speeds = [r["images_per_s"] for r in history if r.get("images_per_s") is not None
              and r["images_per_s"] == r["images_per_s"]]  # NaN: an epoch too short to time
    return {
        "run_dir": str(run_dir),
        "test_top1": results.get("test_final", {}).get("test_top1"),
        "val_top1": vals[-1] if vals else None,
        "train_images_per_s": statistics.median(speeds) if speeds else None,
        "wall_time_s": results.get("wall_time_s"),
        "epochs": history[-1]["epoch"] if history else None,
        "num_parameters": results.get("num_parameters"),
    }


def run_dir_for(out_dir: PathLike, model: str, seed: int, fraction: Optional[float] = None) -> Path:
    """``<out>/runs/<model>_seed<s>``, or ``<model>_frac<f>_seed<s>`` for a learning-curve run."""
    frac = f"_frac{fraction:g}" if fraction is not None else ""
    return Path(out_dir) / "runs" / f"{model}{frac}_seed{seed}"


def mean_and_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float]]:
    """Mean and sample standard deviation of the values that are numbers (std None for one)."""
    import math
    import statistics

    vals = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return None, None
    return statistics.mean(vals), (statistics.stdev(vals) if len(vals) > 1 else None)
