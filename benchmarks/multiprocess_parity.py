"""Final test accuracy of a recipe on 1 process vs 2 DDP CPU processes, same global batch.

Runs `convrecipes train` for each seed under a plain `python` call and under
`accelerate launch --multi_gpu --num_processes 2` (CPU mode), then compares the means
with the seed-to-seed spread. Prints a table and writes JSON.

    python benchmarks/multiprocess_parity.py                      # quickstart, seeds 0 1 2
    python benchmarks/multiprocess_parity.py --recipe fashion_mnist --seeds 0 --overrides trainer.epochs=3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LAUNCH_2 = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]


def train(processes: int, recipe: str, seed: int, overrides: list[str], run_dir: Path) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1" if processes > 1 else os.environ.get("OMP_NUM_THREADS", "2")}
    if processes > 1:
        env["ACCELERATE_USE_CPU"] = "1"
        cmd = LAUNCH_2 + ["-m", "convrecipes.cli"]
    else:
        cmd = [sys.executable, "-m", "convrecipes.cli"]
    cmd += ["train", recipe, f"seed={seed}", "trainer.progress=false", *overrides, "--run-dir", str(run_dir)]
    t0 = time.perf_counter()
    subprocess.run(cmd, env=env, check=True, capture_output=True, text=True)
    results = json.loads((run_dir / "results.json").read_text())
    return {"seed": seed, "processes": results["num_processes"], "test_top1": results["test_final"]["test_top1"],
            "wall_s": time.perf_counter() - t0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="quickstart")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--out", default="benchmarks/results/multiprocess_parity.json")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for processes in (1, 2):
                row = train(processes, args.recipe, seed, args.overrides, Path(tmp) / f"p{processes}-s{seed}")
                assert row["processes"] == processes, "the launcher did not start real DDP processes"
                rows.append(row)
                print(f"seed {seed}  processes {processes}  test top-1 {row['test_top1']:.2f}%  ({row['wall_s']:.0f} s)")
    summary = {}
    for p in (1, 2):
        accs = [r["test_top1"] for r in rows if r["processes"] == p]
        summary[p] = {"mean": statistics.mean(accs), "std": statistics.stdev(accs) if len(accs) > 1 else 0.0}
    diff = summary[2]["mean"] - summary[1]["mean"]
    print(f"\n{'processes':<10} {'mean top-1':>10} {'std over seeds':>15}")
    for p, s in summary.items():
        print(f"{p:<10} {s['mean']:>10.2f} {s['std']:>15.2f}")
    print(f"difference (2 - 1): {diff:+.2f} points; seed-to-seed std: {summary[1]['std']:.2f} / {summary[2]['std']:.2f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"recipe": args.recipe, "overrides": args.overrides, "runs": rows,
                                          "summary": summary, "difference": diff}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
