"""Kill a training at many moments, resume it, and compare with an uninterrupted run.

Kill points (20 by default):

- ``between``: the process dies right after ``best.safetensors`` was written and before
  ``last.safetensors`` (the window where an old version lost the new best), at epochs 1..;
- ``mid_write``: it dies after a checkpoint's temp file was written and before the
  rename (a temp file is left behind), at the n-th checkpoint write;
- ``random``: SIGKILL at a uniformly random time within the uninterrupted run's duration.

Each killed run is resumed with ``convrecipes train --resume`` (repeatedly, if a resume is
killed again it is simply resumed again) and must end with the final weights, EMA weights,
``best.safetensors`` tensors and ``results.json`` test metrics of the uninterrupted run,
and with no temp file left. Prints a table and writes JSON.

    python benchmarks/kill_resume.py                      # 20 kills, about 5 minutes on 2 cores
    python benchmarks/kill_resume.py --kills 6 --out /tmp/kill_resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from convrecipes.checkpoint import load_checkpoint

ARGS = ["quickstart", "model.kwargs.width=4", "trainer.epochs=6", "trainer.checkpoint_every_steps=3",
        "trainer.ema_decay=0.9", "trainer.deterministic=true", "trainer.progress=false", "data.subset_per_class=40",
        "data.batch_size=16", "schedule.warmup_epochs=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}

# A child that trains with write_atomic wrapped to die at a chosen moment (no hook in the library).
CHILD = r"""
import os, sys
import convrecipes.checkpoint as ckpt
import convrecipes.trainers.base as base
mode, n = sys.argv[1], int(sys.argv[2])
real = ckpt.write_atomic
count = {"best": 0, "all": 0}
def dying_write(path, data):
    count["all"] += 1
    if mode == "mid_write" and count["all"] == n:
        tmp = ckpt.temp_path_for(path)
        with open(tmp, "wb") as fh:
            fh.write(data[: len(data) // 2])
        os._exit(9)
    out = real(path, data)
    if mode == "between" and path.name == "best.safetensors":
        count["best"] += 1
        if count["best"] == n:
            os._exit(9)
    return out
base.write_atomic = dying_write
from convrecipes.cli import main
sys.exit(main(sys.argv[3:]))
"""


def train(args: list[str], mode: str = "none", n: int = 0) -> int:
    cmd = [sys.executable, "-c", CHILD, mode, str(n), "train", *args]
    return subprocess.run(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode


def resume_until_done(run_dir: Path, max_tries: int = 5) -> int:
    for i in range(max_tries):
        if (run_dir / "results.json").is_file():
            return i
        rc = train(["--resume", str(run_dir)]) if (run_dir / "last.safetensors").is_file() else \
            train(ARGS + ["--run-dir", str(run_dir), "--overwrite"])
        if rc != 0 and not (run_dir / "results.json").is_file():
            continue
    return max_tries


def compare(reference: Path, run_dir: Path) -> dict:
    problems = []
    a, _ = load_checkpoint(reference / "last.safetensors")
    b, _ = load_checkpoint(run_dir / "last.safetensors")
    for part in ("model", "ema"):
        if any(not torch.equal(t, b[part][k]) for k, t in a[part].items()):
            problems.append(f"{part} weights differ")
    ba, meta_a = load_checkpoint(reference / "best.safetensors")
    bb, meta_b = load_checkpoint(run_dir / "best.safetensors")
    if meta_a["epoch"] != meta_b["epoch"] or any(not torch.equal(t, bb["model"][k]) for k, t in ba["model"].items()):
        problems.append(f"best differs (epoch {meta_b['epoch']} vs {meta_a['epoch']})")
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (reference, run_dir))
    for key in ("test_final", "test_final_ema", "test_best", "best_epoch"):
        if ra.get(key) != rb.get(key):
            problems.append(f"results.json {key} differs: {rb.get(key)} vs {ra.get(key)}")
    temps = [p.name for p in run_dir.iterdir() if ".tmp" in p.name or p.name == ".lock"]
    if temps:
        problems.append(f"left behind: {temps}")
    return {"identical": not problems, "problems": problems}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="benchmarks/results/kill_resume.json")
    args = parser.parse_args()
    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="kill-resume-"))
    reference = work / "reference"
    t0 = time.perf_counter()
    assert train(ARGS + ["--run-dir", str(reference)]) == 0, "the uninterrupted run failed"
    duration = time.perf_counter() - t0
    epochs = 6
    plan = [("between", e) for e in range(1, min(epochs, args.kills // 4) + 1)]
    plan += [("mid_write", n) for n in rng.sample(range(2, 30), k=min(args.kills // 4, 28))]
    plan += [("random", round(rng.uniform(2.0, 0.85 * duration), 2)) for _ in range(args.kills - len(plan))]
    rows = []
    for i, (mode, arg) in enumerate(plan):
        run_dir = work / f"kill_{i:02d}"
        if mode == "random":
            proc = subprocess.Popen([sys.executable, "-m", "convrecipes.cli", "train", *ARGS, "--run-dir", str(run_dir)],
                                    env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(arg)
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            killed = proc.returncode == -signal.SIGKILL
        else:
            killed = train(ARGS + ["--run-dir", str(run_dir)], mode, arg) != 0
        resumes = resume_until_done(run_dir)
        row = {"kill": i + 1, "mode": mode, "at": arg, "killed": killed, "resumes": resumes, **compare(reference, run_dir)}
        rows.append(row)
        print(f"{i + 1:>3} {mode:<10} {str(arg):>6}  killed={killed!s:<5} resumes={resumes}  "
              f"{'identical' if row['identical'] else '; '.join(row['problems'])}", flush=True)
    killed = [r for r in rows if r["killed"]]
    same = sum(r["identical"] for r in rows)
    print(f"\n{same} of {len(rows)} runs identical to the uninterrupted run ({len(killed)} were killed before they "
          f"finished; the others finished before the kill); uninterrupted run {duration:.1f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"benchmark": "kill_resume", "args": ARGS, "reference_s": duration,
                                          "identical": same, "runs": len(rows), "killed": len(killed),
                                          "rows": rows}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
