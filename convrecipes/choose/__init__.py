"""Choosing an architecture: compare models under one recipe, learning curves, cost.

- ``compare(recipe, models, seeds=..., overrides=..., out_dir=...)``: train every
  candidate with the same recipe, budget and seeds (resumably), measure parameters, MACs,
  latency and training memory, and write a table and a Pareto plot (``convrecipes compare``).
- ``learning_curve(recipe, models, fractions, ...)``: validation accuracy against the
  number of training images, and whether the curve has flattened
  (``convrecipes compare --fractions``).
- ``count_macs``, ``measure_latency``, ``peak_training_memory``: the measurements alone.
- ``pareto_front``: which (accuracy, cost) points no other point beats on both.
- ``train_or_resume``: one resumable run directory (the benchmarks use it too).
"""

from convrecipes.choose.candidates import FAMILIES, Candidate, parse_models, prepare_candidates
from convrecipes.choose.comparison import ComparisonResult, compare, format_table, measure_candidate
from convrecipes.choose.learning_curves import LearningCurveResult, flattening, learning_curve, parse_fractions
from convrecipes.choose.measure import count_macs, measure_latency, peak_training_memory
from convrecipes.choose.pareto import pareto_front, plot_pareto
from convrecipes.choose.runs import check_run_matches, run_metrics, train_or_resume

__all__ = [
    "compare", "ComparisonResult", "format_table", "measure_candidate",
    "learning_curve", "LearningCurveResult", "flattening", "parse_fractions",
    "count_macs", "measure_latency", "peak_training_memory",
    "pareto_front", "plot_pareto",
    "FAMILIES", "Candidate", "parse_models", "prepare_candidates",
    "train_or_resume", "check_run_matches", "run_metrics",
]
