"""How many compute threads torch uses: the physical cores this process may run on, shared
among the processes of this machine, so a run never oversubscribes the cores.

A thread per logical CPU (hyper-threads) or several processes each taking every core makes
the threads wait for one another at every parallel region: a 2-thread run on a loaded
2-core machine was measured 10x slower than a 1-thread one. Order of precedence: an explicit
setting (``trainer.threads``), then ``OMP_NUM_THREADS`` (which launchers such as ``torchrun``
set for several processes), then the physical cores available divided by the local
processes (``LOCAL_WORLD_SIZE``, set by ``torchrun`` and ``accelerate launch``).

Physical cores are counted over the CPUs this process may use (``os.sched_getaffinity``):
from Linux's CPU topology files (one core per ``(package, core_id)`` pair); else with
``psutil.cpu_count(logical=False)`` scaled to the allowed CPUs; else one per logical CPU.
A cgroup CPU quota (a container limited to N CPUs) caps the count.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional

import torch

_SYS_CPU = Path("/sys/devices/system/cpu")


def available_cpus() -> set[int]:
    """The logical CPUs this process may run on."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def physical_cores(cpus: Optional[set[int]] = None) -> int:
    """Physical cores among ``cpus`` (default: the ones this process may use), capped by a
    cgroup CPU quota."""
    cpus = available_cpus() if cpus is None else cpus
    cores = _cores_from_topology(cpus)
    if cores is None:
        try:
            import psutil

            physical, logical = psutil.cpu_count(logical=False), psutil.cpu_count(logical=True)
            cores = max(1, round(len(cpus) * physical / logical)) if physical and logical else None
        except ImportError:
            cores = None
    cores = cores if cores is not None else len(cpus)
    quota = _cgroup_cpu_quota()
    return max(1, min(cores, quota) if quota is not None else cores)


def _cores_from_topology(cpus: set[int]) -> Optional[int]:
    pairs = set()
    for cpu in cpus:
        topology = _SYS_CPU / f"cpu{cpu}" / "topology"
        try:
            pairs.add(((topology / "physical_package_id").read_text().strip(),
                       (topology / "core_id").read_text().strip()))
        except OSError:
            return None
    return len(pairs) or None


def _cgroup_cpu_quota() -> Optional[int]:
    """CPUs a cgroup v2 quota allows (``cpu.max``: "quota period"), rounded up; None: no limit."""
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
    except (OSError, ValueError):
        return None
    if quota == "max":
        return None
    return max(1, math.ceil(int(quota) / int(period)))


def resolve_threads(requested: Optional[int], cores: int, local_processes: int,
                    env: Mapping[str, str]) -> tuple[int, str]:
    """The thread count for one process, and why (for the log).

    Args:
        requested: an explicit count (``trainer.threads``); None: decide.
        cores: physical cores available to the machine's processes.
        local_processes: processes training on this machine.
        env: the environment (``OMP_NUM_THREADS`` is respected when set).
    """
    if requested is not None:
        return int(requested), "trainer.threads"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp.isdigit() and int(omp) >= 1:
        return int(omp), "OMP_NUM_THREADS"
    processes = max(1, int(local_processes))
    share = max(1, cores // processes)
    return share, f"{cores} physical cores / {processes} process{'es' if processes > 1 else ''}"


def local_process_count(env: Mapping[str, str]) -> int:
    """Processes on this machine, as the launcher says (``LOCAL_WORLD_SIZE``); else 1."""
    value = env.get("LOCAL_WORLD_SIZE", "").strip()
    return int(value) if value.isdigit() and int(value) >= 1 else 1


def apply_threads(requested: Optional[int] = None) -> tuple[int, str]:
    """Set torch's intra-op threads by ``resolve_threads`` for this process; returns the
    count and its reason."""
    threads, why = resolve_threads(requested, physical_cores(), local_process_count(os.environ), os.environ)
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads, why
