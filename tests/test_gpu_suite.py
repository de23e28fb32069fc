"""``benchmarks/gpu_suite.py`` runs on CPU at a tiny size (``--tiny``): every cell runs, or is
skipped with its reason (CUDA-only cells, cells past ``--budget-s``)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402


def _by_cell(result: dict) -> dict:
    return {row["cell"]: row for row in result["cells"]}


def test_selected_cells_run_and_cuda_only_cells_say_so(tmp_path):
    out = tmp_path / "suite.json"
    result = gpu_suite.main(["--tiny", "--device", "cpu", "--out", str(out), "--only",
                             "kornia standard, batched on the device", "fp16 + GradScaler"])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    cells = _by_cell(result)
    assert cells["fp16 + GradScaler"]["skipped"] == "needs CUDA"
    kornia = cells["kornia standard, batched on the device"]
    assert kornia["images_per_s"] > 0
    assert kornia["ms_per_step"] == pytest.approx(1000 * result["batch_size"] / kornia["images_per_s"], rel=0.01)
    others = [row for name, row in cells.items() if name not in {"kornia standard, batched on the device", "fp16 + GradScaler"}]
    assert others and all(row["skipped"] == "not selected" for row in others)
    assert len(cells) == len(gpu_suite.cells())


def test_the_budget_stops_adding_cells(tmp_path):
    # the first cell runs (nothing measured yet says it will not fit); the budget of 0 s is
    # spent by then, so every later one is skipped
    result = gpu_suite.main(["--tiny", "--device", "cpu", "--budget-s", "0", "--out", str(tmp_path / "s.json")])
    rows = result["cells"]
    assert "images_per_s" in rows[0]
    assert all(row.get("skipped") in ("budget (0 s)", "needs CUDA") for row in rows[1:])


@pytest.mark.slow  # about 30 s on the 2-core machine
def test_the_whole_tiny_suite_runs_on_cpu(tmp_path):
    out = tmp_path / "suite.json"
    t0 = time.perf_counter()
    result = subprocess.run([sys.executable, "benchmarks/gpu_suite.py", "--tiny", "--device", "cpu", "--out", str(out)],
                            cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                            timeout=300)
    wall = time.perf_counter() - t0
    assert result.returncode == 0, result.stderr[-4000:]
    report = json.loads(out.read_text())
    for row in report["cells"]:
        if row["cell"] == "fp16 + GradScaler":
            assert row["skipped"] == "needs CUDA"
        else:
            assert row.get("images_per_s", 0) > 0, row
        assert row["cell"] in result.stdout
    assert report["compile_backend"] == "eager" and report["tiny"]
    assert wall < 120, f"--tiny should take well under a minute on a quiet machine, took {wall:.0f} s"
