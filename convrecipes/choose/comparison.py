"""``compare``: train several architectures with one recipe and measure what each costs.

Every candidate gets the same recipe, data subset, budget and seeds (only ``model.name``
changes, and ``model.kwargs`` is emptied for models other than the recipe's own) and is
trained into ``<out>/runs/<model>_seed<s>``, resumably: a finished run is read, an
unfinished one resumed. Then each model is measured on this device (parameters, MACs per
image, latency at batch 1 and at a larger batch, training memory) and the results are
written as a table (console, ``compare.md``, ``compare.csv``, ``compare.json``) and a
Pareto plot (``pareto.png``: accuracy against latency at batch 1).
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from convrecipes.choose.candidates import Candidate, prepare_candidates
from convrecipes.choose.measure import count_macs, measure_latency, peak_training_memory
from convrecipes.choose.pareto import pareto_front, plot_pareto
from convrecipes.choose.runs import mean_and_std, run_dir_for, run_metrics, train_all
from convrecipes.errors import RecipeError
from convrecipes.recipe import recipe_to_dict

PathLike = Union[str, Path]
METRICS = ("val_top1", "test_top1")


@dataclass
class ComparisonResult:
    """What ``compare`` found.

    Attributes:
        out_dir: the comparison's directory.
        rows: one dict per model (the columns of ``compare.csv``), in ``--models`` order.
        runs: one dict per trained run (model, seed, run_dir, accuracies, speed, wall time).
        files: the written outputs by kind (``md``, ``csv``, ``json``, ``png``).
    """

    out_dir: Path
    rows: list[dict[str, Any]]
    runs: list[dict[str, Any]] = field(default_factory=list)
    files: dict[str, Path] = field(default_factory=dict)

    def row(self, model: str) -> dict[str, Any]:
        """The row of ``model``."""
        for r in self.rows:
            if r["model"] == model:
                return r
        raise KeyError(f"no model {model!r} in this comparison; models: {', '.join(r['model'] for r in self.rows)}")


def measurement_device() -> torch.device:
    """Where models are measured: the GPU when there is one (training runs there too)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def measure_candidate(cand: Candidate, latency_batch: int = 64, *, device: Optional[torch.device] = None,
                      memory: bool = True, latency_options: Optional[dict[str, Any]] = None) -> dict[str, Any]:
    """Parameters, MACs per image, latency at batch 1 and ``latency_batch`` and (with
    ``memory``) training memory of one candidate, on ``device`` (default
    ``measurement_device()``). The model is freshly built: its cost does not depend on the
    trained weights."""
    from convrecipes.build import build_model
    from convrecipes.models import count_parameters

    device = device or measurement_device()
    options = dict(latency_options or {})
    model = build_model(cand.recipe, in_chans=cand.input_shape[0], num_classes=cand.num_classes,
                        pretrained=False).to(device)
    channels_last = cand.recipe.model.channels_last
    out: dict[str, Any] = {
        "num_parameters": count_parameters(model),
        "macs": count_macs(model, cand.input_shape),
        "latency_b1": measure_latency(model, cand.input_shape, 1, channels_last=channels_last, **options),
        "latency_batch": measure_latency(model, cand.input_shape, latency_batch, channels_last=channels_last,
                                         **options),
    }
    del model
    if memory:
        out["memory"] = peak_training_memory(cand.recipe, cand.input_shape, cand.num_classes, device=str(device))
    return out


def _cached_measurement(cand: Candidate, out_dir: Path, latency_batch: int, device: torch.device, memory: bool,
                        remeasure: bool, latency_options: Optional[dict[str, Any]],
                        say: Callable[[str], None], where: str) -> dict[str, Any]:
    """``measure_candidate``, kept in ``<out>/measurements/<model>.json`` and reused while
    what it depends on (model settings, input, batch sizes, device, threads) is unchanged."""
    key = {"model": recipe_to_dict(cand.recipe)["model"], "input_shape": list(cand.input_shape),
           "num_classes": cand.num_classes, "latency_batch": latency_batch, "device": str(device),
           "threads": torch.get_num_threads(), "batch_size": cand.recipe.data.batch_size,
           "optimizer": cand.recipe.optimizer.name, "memory": memory, "torch": torch.__version__}
    path = out_dir / "measurements" / f"{cand.model}.json"
    if path.is_file() and not remeasure:
        stored = json.loads(path.read_text())
        if stored.get("key") == key:
            say(f"{where} {cand.model}: measured before, reading {path} (--remeasure to measure again)")
            return stored["measurement"]
    say(f"{where} {cand.model}: MACs, latency at batch 1 and {latency_batch} on {device} ({torch.get_num_threads()} "
        f"thread(s)){', training memory' if memory else ''} ...")
    measurement = measure_candidate(cand, latency_batch, device=device, memory=memory,
                                    latency_options=latency_options)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"key": key, "measurement": measurement}, indent=2))
    return measurement


def _row(cand: Candidate, runs: list[dict[str, Any]], m: dict[str, Any]) -> dict[str, Any]:
    val, val_sd = mean_and_std([r["val_top1"] for r in runs])
    test, test_sd = mean_and_std([r["test_top1"] for r in runs])
    speed, _ = mean_and_std([r["train_images_per_s"] for r in runs])
    wall, _ = mean_and_std([r["wall_time_s"] for r in runs])
    b1, bn = m["latency_b1"], m["latency_batch"]
    mem = m.get("memory") or {}
    cuda = "cuda_max_allocated_mib" in mem
    return {
        "model": cand.model,
        "family": cand.family,
        "image_size": cand.image_size,
        "resized": cand.resized,
        "num_parameters": m["num_parameters"],
        "macs": m["macs"],
        "seeds": len(runs),
        "val_top1": val, "val_top1_std": val_sd,
        "test_top1": test, "test_top1_std": test_sd,
        "latency_b1_ms": b1["median_ms"], "latency_b1_p10_ms": b1["p10_ms"], "latency_b1_p90_ms": b1["p90_ms"],
        "latency_batch": bn["batch_size"], "latency_batch_ms": bn["median_ms"],
        "latency_batch_p10_ms": bn["p10_ms"], "latency_batch_p90_ms": bn["p90_ms"],
        "inference_images_per_s": bn["images_per_s"],
        "train_images_per_s": speed,
        "peak_memory_mib": mem.get("cuda_max_allocated_mib" if cuda else "peak_rss_mib"),
        "memory_increase_mib": None if cuda else mem.get("training_rss_increase_mib"),
        "memory_kind": ("cuda_max_allocated" if cuda else "cpu_peak_rss") if mem else None,
        "wall_time_s": wall,
        "threads": b1["threads"],
        "device": b1["device"],
        "pareto": False,
        "diverged_seeds": sum(bool(r.get("diverged")) for r in runs),
    }


def compare(
    recipe: PathLike,
    models: Union[None, str, Sequence[str]] = None,
    *,
    seeds: Optional[Sequence[int]] = None,
    overrides: Sequence[str] = (),
    out_dir: Optional[PathLike] = None,
    image_size: Union[None, str, int] = "auto",
    latency_batch: int = 64,
    metric: str = "val_top1",
    memory: bool = True,
    remeasure: bool = False,
    latency_options: Optional[dict[str, Any]] = None,
    say: Callable[[str], None] = print,
) -> ComparisonResult:
    """Train every model in ``models`` with ``recipe`` and the same seeds, measure each, and
    write the comparison.

    Args:
        recipe: a recipe name (``quickstart``) or YAML path.
        models: timm names (ours included), comma-separated or a list, or ``families``
            (``FAMILIES``); None: the recipe's own model.
        seeds: the seeds every model is trained with (default: the recipe's seed).
        overrides: ``key=value`` overrides applied to every model's recipe.
        out_dir: the comparison's directory (default ``<output_dir>/compare-<recipe>``);
            runs go to ``<out_dir>/runs/<model>_seed<s>``.
        image_size: ``auto`` (resize only models that cannot take the data's size, to the
            smallest of 32, 64 that works), ``native`` (refuse them) or N (resize every
            model to N x N).
        latency_batch: the larger batch latency is measured at (besides 1).
        metric: the accuracy of the Pareto front: ``val_top1`` (the last epoch's validation
            top-1: choosing by test accuracy would tune on the test set) or ``test_top1``.
        memory: measure training memory (one fresh Python process per model).
        remeasure: measure again even where ``<out>/measurements`` holds a measurement.
        latency_options: passed to ``measure_latency`` (``warmup``, ``iterations``,
            ``repeats``, ``max_time_s``).
        say: where progress goes.

    Returns:
        A ``ComparisonResult``; the same numbers are in ``compare.json``.

    Raises:
        UnknownNameError, RecipeError: a bad model name, recipe, override or image size,
            found before anything trains.
    """
    if metric not in METRICS:
        raise RecipeError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if latency_batch < 1:
        raise RecipeError(f"--latency-batch must be >= 1, got {latency_batch}")
    overrides = list(overrides)
    if any(o.split("=", 1)[0].strip() == "seed" for o in overrides):
        raise RecipeError("give the seeds with --seeds (e.g. --seeds 0 1), not seed=...")
    started = time.perf_counter()
    candidates = prepare_candidates(recipe, models, overrides, image_size, say=say)
    base = candidates[0].recipe
    seeds = list(seeds) if seeds else [base.seed]
    out = Path(out_dir) if out_dir is not None else Path(base.output_dir) / f"compare-{base.name}"
    jobs = [(f"{c.model} seed {s}", [*c.overrides, f"seed={s}"], run_dir_for(out, c.model, s))
            for c in candidates for s in seeds]
    say(f"compare {base.name}: {len(candidates)} model(s) x {len(seeds)} seed(s) = {len(jobs)} run(s) in {out}")
    train_all(recipe, jobs, say=say)

    device = measurement_device()
    runs: list[dict[str, Any]] = []
    rows = []
    for i, cand in enumerate(candidates, 1):
        m = _cached_measurement(cand, out, latency_batch, device, memory, remeasure, latency_options, say,
                                f"[measure {i}/{len(candidates)}]")
        mine = [{"model": cand.model, "seed": s, **run_metrics(run_dir_for(out, cand.model, s))} for s in seeds]
        runs.extend(mine)
        rows.append(_row(cand, mine, m))
    chosen = metric
    if all(r[metric] is None for r in rows) and metric == "val_top1":
        chosen = "test_top1"  # no validation split (data.val_fraction=0)
        say("note: the runs have no validation accuracy (data.val_fraction=0); the Pareto front uses test top-1")
    for row, on in zip(rows, pareto_front([r[chosen] for r in rows], [r["latency_b1_ms"] for r in rows])):
        row["pareto"] = on

    out.mkdir(parents=True, exist_ok=True)
    meta = {"recipe": str(recipe), "recipe_name": base.name, "overrides": overrides, "seeds": seeds,
            "metric": chosen, "device": str(device), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "timm": _timm_version(), "latency_batch": latency_batch,
            "notes": _notes(candidates, rows, chosen, latency_batch),
            # this call's time (training, reading finished runs, measuring) and the runs' own training time
            "wall_time_s": round(time.perf_counter() - started, 1),
            "training_wall_time_s": round(sum(r["wall_time_s"] or 0.0 for r in runs), 1)}
    result = ComparisonResult(out, rows, runs)
    result.files = write_comparison(result, meta)
    say(format_table(rows, markdown=False))
    for note in meta["notes"]:
        say(f"  {note}")
    say(f"comparison wall time {meta['wall_time_s']:.0f} s (the runs' training: {meta['training_wall_time_s']:.0f} s)")
    say(f"wrote {', '.join(str(p) for p in result.files.values())}")
    return result


def _timm_version() -> str:
    import timm

    return timm.__version__


def _notes(candidates: Sequence[Candidate], rows: Sequence[dict[str, Any]], metric: str, batch: int) -> list[str]:
    notes = []
    diverged = [r for r in rows if r.get("diverged_seeds")]
    if diverged:
        notes.append("diverged (non-finite loss at the recipe's settings; no accuracy, off the Pareto front): "
                     + ", ".join(f"{r['model']} ({r['diverged_seeds']} of {r['seeds']} seeds)" for r in diverged)
                     + "; compare them again with e.g. a lower optimizer.lr into another --out")
    resized = [c for c in candidates if c.resized]
    if resized:
        notes.append("resized: " + ", ".join(f"{c.model} to {c.image_size} px (it cannot take {c.native_size} px)"
                                             for c in resized) + "; the others at the data's size")
    kinds = {r["memory_kind"] for r in rows if r["memory_kind"]}
    if "cpu_peak_rss" in kinds:
        notes.append("peak memory: peak resident set size of a fresh Python process while it built the model and its "
                     "optimizer and took 3 training steps on one random batch of the recipe's batch size (fp32); the "
                     "total includes Python, torch and the libraries, (+N) is what the model, its optimizer state and "
                     "one step's activations added to them; the data set is not included")
    if "cuda_max_allocated" in kinds:
        notes.append("peak memory: torch.cuda.max_memory_allocated over 3 training steps on one batch of the recipe's "
                     "batch size, in a fresh process")
    notes.append(f"latency: median of timed forwards in eval mode under no_grad after warm-up, [p10-p90] beside it; "
                 f"at batch {batch} per batch, with the images/s it gives; accuracies are means over seeds "
                 f"(± standard deviation with several); * marks the Pareto front of {metric} against batch-1 latency")
    return notes


# -- output ---------------------------------------------------------------------------------
def _count(n: Optional[float]) -> str:
    if n is None:
        return "-"
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.0f}"


def _acc(mean: Optional[float], std: Optional[float]) -> str:
    if mean is None:
        return "-"
    return f"{mean:.2f}" + (f" ± {std:.2f}" if std is not None else "")


def _ms(v: Optional[float]) -> str:
    if v is None:
        return "-"
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _table_cells(rows: Sequence[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    batch = rows[0]["latency_batch"] if rows else 64
    header = ["model", "image", "params", "MACs/img", "val top-1", "test top-1", "b1 ms [p10-p90]",
              f"b{batch} ms", f"b{batch} img/s", "train img/s", "peak mem MiB", "wall s", "Pareto"]
    body = []
    for r in rows:
        mem = "-" if r["peak_memory_mib"] is None else f"{r['peak_memory_mib']:.0f}"
        if r["memory_increase_mib"] is not None:
            mem += f" (+{r['memory_increase_mib']:.0f})"
        body.append([
            r["model"], f"{r['image_size']}{' (resized)' if r['resized'] else ''}", _count(r["num_parameters"]),
            _count(r["macs"]), _acc(r["val_top1"], r["val_top1_std"]), _acc(r["test_top1"], r["test_top1_std"]),
            f"{_ms(r['latency_b1_ms'])} [{_ms(r['latency_b1_p10_ms'])}-{_ms(r['latency_b1_p90_ms'])}]",
            _ms(r["latency_batch_ms"]), _count(r["inference_images_per_s"]),
            _count(r["train_images_per_s"]), mem,
            "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.0f}" if r["wall_time_s"] >= 10
            else f"{r['wall_time_s']:.1f}", "*" if r["pareto"] else "",
        ])
    return header, body


def format_table(rows: Sequence[dict[str, Any]], markdown: bool = True) -> str:
    """The comparison as a Markdown table, or aligned plain text for the console."""
    header, body = _table_cells(rows)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines)
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip() for cells in [header, *body])


def write_comparison(result: ComparisonResult, meta: dict[str, Any]) -> dict[str, Path]:
    """Write ``compare.json``, ``compare.csv``, ``compare.md`` and ``pareto.png`` into the
    comparison's directory; returns their paths by kind."""
    out = result.out_dir
    files = {"json": out / "compare.json", "csv": out / "compare.csv", "md": out / "compare.md",
             "png": out / "pareto.png"}
    files["json"].write_text(json.dumps({**meta, "models": result.rows, "runs": result.runs}, indent=2))
    with open(files["csv"], "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(result.rows[0]))
        writer.writeheader()
        writer.writerows(result.rows)
    metric_name = "validation" if meta["metric"] == "val_top1" else "test"
    given = " with " + " ".join(f"`{o}`" for o in meta["overrides"]) if meta["overrides"] else ""
    md = [f"# compare: {meta['recipe_name']}", "",
          f"Recipe `{meta['recipe']}`{given}, "
          f"seeds {', '.join(map(str, meta['seeds']))}; measured on {meta['device']} with {meta['threads']} thread(s), "
          f"torch {meta['torch']}, timm {meta['timm']}.", "", format_table(result.rows), ""]
    md += [f"- {note}" for note in meta["notes"]]
    md += ["", f"![{metric_name} top-1 against batch-1 latency](pareto.png)", ""]
    files["md"].write_text("\n".join(md))
    rows = result.rows
    plot_pareto([r["model"] for r in rows], [r[meta["metric"]] for r in rows], [r["latency_b1_ms"] for r in rows],
                [r["num_parameters"] for r in rows], files["png"],
                accuracy_label=f"{metric_name} top-1 (%)",
                latency_label=f"latency at batch 1 on {meta['device']}, {meta['threads']} thread(s) (ms)",
                title=f"{meta['recipe_name']}: {metric_name} top-1 against latency (marker area: parameters)")
    return files


def load_comparison(out_dir: PathLike) -> dict[str, Any]:
    """``compare.json`` of a comparison directory."""
    return json.loads((Path(out_dir) / "compare.json").read_text())

