"""Two "nodes" on one machine: two launchers joined by a rendezvous on localhost train the
quickstart exactly as two processes on one node do (same final weights, same test accuracy),
and only the main process of node 0 writes a run directory.

Each node gets its own ``--run-dir``: node 1's must never appear, which also stands in for
machines without a shared filesystem (node 1 cannot read what node 0 wrote)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from tests.conftest import TEARDOWN_ABORT, run_launched

ROOT = Path(__file__).parent.parent
ENV = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
TRAIN = ["-m", "convrecipes.cli", "train", "quickstart", "trainer.epochs=2", "model.kwargs.width=4",
         "trainer.progress=false"]
TIMEOUT_S = 240

pytestmark = pytest.mark.slow  # about 20 s per launch on the 2-core machine, 3 launches


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun_node(node_rank: int, port: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node_rank", str(node_rank),
            "--nproc_per_node", "1", "--master_addr", "127.0.0.1", "--master_port", str(port)]


def accelerate_machine(machine_rank: int, port: int) -> list[str]:
    # --num_processes counts the processes of all machines together: 1 per machine here
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
            "--num_machines", "2", "--machine_rank", str(machine_rank), "--main_process_ip", "127.0.0.1",
            "--main_process_port", str(port), "--mixed_precision", "no", "--dynamo_backend", "no"]


def launch_two_nodes(node_launcher, tmp_path: Path) -> tuple[Path, Path, list[subprocess.CompletedProcess]]:
    """Start node 0 and node 1 side by side (each with its own run directory); once more with a
    fresh port and fresh directories if a rank aborted at teardown (``TEARDOWN_ABORT``)."""
    for attempt in range(2):
        port = free_port()
        dirs = [tmp_path / f"try{attempt}-node{rank}" for rank in range(2)]
        procs = [subprocess.Popen(node_launcher(rank, port) + TRAIN + ["--run-dir", str(dirs[rank])], env=ENV,
                                  cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for rank in range(2)]
        results = []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=TIMEOUT_S)
            except subprocess.TimeoutExpired:
                for p in procs:
                    p.kill()
                raise
            results.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
        aborted = any(r.returncode != 0 and TEARDOWN_ABORT in r.stderr for r in results)
        if not aborted:
            break
    return dirs[0], dirs[1], results


@pytest.fixture(scope="module")
def one_node_run(tmp_path_factory) -> Path:
    """The reference: two processes on one node."""
    run_dir = tmp_path_factory.mktemp("one_node") / "run"
    result = run_launched([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
                          + TRAIN + ["--run-dir", str(run_dir)],
                          env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert result.returncode == 0, result.stderr[-4000:]
    return run_dir


def assert_same_training(two_nodes: Path, one_node: Path) -> None:
    assert sorted(p.name for p in two_nodes.iterdir()) == sorted(p.name for p in one_node.iterdir())
    for name in ("last.safetensors", "best.safetensors"):
        got, want = load_file(two_nodes / name), load_file(one_node / name)
        assert got.keys() == want.keys()
        different = [k for k in want if not (got[k] == want[k]).all()]
        assert not different, f"{name}: tensors differ between 2 nodes and 1 node: {different[:5]}"
    got, want = (json.loads((d / "results.json").read_text()) for d in (two_nodes, one_node))
    assert got["num_processes"] == want["num_processes"] == 2
    assert got["global_batch_size"] == want["global_batch_size"] == 64
    for key in ("test_final", "test_best"):
        assert got[key] == want[key], key


@pytest.mark.parametrize("launcher", [torchrun_node, accelerate_machine], ids=["torchrun", "accelerate"])
def test_two_nodes_train_as_two_processes_on_one_node(launcher, one_node_run, tmp_path):
    node0_dir, node1_dir, (node0, node1) = launch_two_nodes(launcher, tmp_path)
    assert node0.returncode == 0, node0.stderr[-4000:]
    assert node1.returncode == 0, node1.stderr[-4000:]
    assert not node1_dir.exists(), "only the main process (rank 0 of node 0) writes the run directory"
    assert node0.stdout.count("epoch 2/2") == 1 and "epoch" not in node1.stdout, "only the main process prints"
    assert_same_training(node0_dir, one_node_run)
