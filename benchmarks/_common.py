"""What the benchmarks share: the run API called in this process, several trainings at once.

- ``train_run(recipe, overrides, run_dir)``: ``convrecipes train`` as a function call
  (``convrecipes.run.train_recipe``), skipping a finished run (``results.json``) and
  resuming an unfinished one (``last.safetensors``, no ``results.json``).
- ``run_jobs(fn, calls, jobs)``: ``fn(*call)`` for every call, in this process when
  ``jobs`` is 1, else in ``jobs`` spawned processes of one thread each (``OMP_NUM_THREADS``,
  if set, gives the threads per process). ``fn`` must be a module-level function.
- ``output_to(log)``: what a training prints goes to a file (parallel runs stay readable).
- ``lr_sweep(recipe, overrides, repeat)``: ``convrecipes lr-find ... --repeat N`` in this
  process, returning the result instead of writing files.

The benchmark scripts put ``benchmarks/`` on ``sys.path`` (Python does, for a script) and
import this as ``_common``.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional, Sequence

from convrecipes.recipe import load_recipe
from convrecipes.run import RunResult

if TYPE_CHECKING:
    from convrecipes.lr_finder import RepeatedLRFinderResult


def train_run(recipe: str, overrides: Sequence[str], run_dir: str | Path) -> RunResult:
    """Train ``recipe`` with ``overrides`` (and ``trainer.progress=false``) into ``run_dir``.

    A run directory with ``results.json`` is finished and only read; one with
    ``last.safetensors`` but no ``results.json`` resumes from it with the recipe its
    checkpoint records. ``history`` of the returned run holds every epoch of the run (for a
    skipped or resumed run, read from its ``metrics.jsonl``). The one implementation is
    ``convrecipes.choose.train_or_resume`` (``convrecipes compare`` trains with it too).
    """
    from convrecipes.choose.runs import train_or_resume

    return train_or_resume(recipe, overrides, run_dir)


@contextlib.contextmanager
def output_to(log: Optional[str | Path]) -> Iterator[None]:
    """Send stdout and stderr to ``log`` (None: leave them); an exception raised inside gets
    the log's last lines as a note."""
    if log is None:
        yield
        return
    log = Path(log)
    log.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(log, "a") as fh, contextlib.redirect_stdout(fh), contextlib.redirect_stderr(fh):
            yield
    except Exception as e:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        e.add_note(f"output in {log}, ending:\n{tail}")
        raise


def _one_thread_each(threads: int) -> None:
    import torch

    os.environ["OMP_NUM_THREADS"] = str(threads)
    torch.set_num_threads(threads)


def run_jobs(fn: Callable[..., Any], calls: Sequence[tuple], jobs: int = 1,
             on_done: Optional[Callable[[Any], None]] = None) -> list[Any]:
    """``[fn(*call) for call in calls]``, ``jobs`` at a time.

    ``jobs`` 1 runs them here, one after the other. More run in a pool of spawned processes
    (a fresh one per call, so no training inherits another's state) with
    ``OMP_NUM_THREADS`` threads each (default 1). ``on_done(result)`` is called here as each
    call finishes; the list keeps the order of ``calls``. An exception in a call is raised here.
    """
    if jobs <= 1:
        results = []
        for call in calls:
            results.append(fn(*call))
            if on_done is not None:
                on_done(results[-1])
        return results
    threads = int(os.environ.get("OMP_NUM_THREADS", "1"))
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn"), max_tasks_per_child=1,
                             initializer=_one_thread_each, initargs=(threads,)) as pool:
        futures = [pool.submit(fn, *call) for call in calls]
        for done in as_completed(futures):
            if on_done is not None:
                on_done(done.result())
        return [f.result() for f in futures]


def lr_sweep(recipe: str, overrides: Sequence[str], repeat: int = 1) -> tuple["RepeatedLRFinderResult", str]:
    """The LR range test of ``convrecipes lr-find RECIPE OVERRIDES --repeat REPEAT`` (its
    default sweep: 1e-7 -> 10 in 100 steps; seeds seed, seed+1, ...; the data loaded once),
    and the rule ``optimizer.lr=auto`` takes under the recipe's schedule."""
    from convrecipes.build import build, load_datasets, make_accelerator
    from convrecipes.lr_finder import find_lr_repeated
    from convrecipes.lr_finder.command import auto_lr_rule, finder_recipe

    loaded = load_recipe(recipe, list(overrides))
    accelerator = make_accelerator(loaded)
    data = load_datasets(loaded)

    def seeded(seed: int) -> tuple[Any, Any]:
        accelerator.free_memory()
        exp = build(finder_recipe(loaded, seed), accelerator=accelerator, datasets=data)
        return exp.trainer, exp.train_loader

    seeds = [loaded.seed + i for i in range(repeat)]
    result = find_lr_repeated(seeded, seeds=seeds, progress=False)
    accelerator.free_memory()
    return result, auto_lr_rule(loaded.schedule.name)


def summary(rows: Sequence[dict], key: str = "test_top1") -> dict:
    """Mean, min, max (and stdev for several) of ``row[key]`` over the rows that have it."""
    import statistics

    values = [r[key] for r in rows if r.get(key) is not None]
    if not values:
        return {}
    return {"mean": round(statistics.mean(values), 2), "min": round(min(values), 2), "max": round(max(values), 2),
            "stdev": round(statistics.stdev(values), 2) if len(values) > 1 else None, "n": len(values)}
