"""The README's Python example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).parent.parent / "README.md"


def test_readme_python_example_runs(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert blocks, "README has a Python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    assert namespace["trainer"].evaluate.__self__.history[-1]["val_top1"] > 90.0
    assert (tmp_path / "runs" / "by-hand" / "best.safetensors").is_file()


def test_readme_run_api_and_manual_mode_examples_run(tmp_path, monkeypatch):
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
    assert len(blocks) >= 3, "README shows the run API and a manual-mode trainer"
    monkeypatch.chdir(tmp_path)
    run_ns: dict = {}
    exec(compile(blocks[1], str(README), "exec"), run_ns)
    assert run_ns["run"].test_top1 > 50.0 and (tmp_path / "runs" / "api-demo" / "results.json").is_file()
    manual_ns: dict = {}
    exec(compile(blocks[2], str(README), "exec"), manual_ns)
    trainer = manual_ns["trainer"]
    assert trainer.global_step == 2 * (1438 // 64) and "loss_a" in trainer.history[-1]
