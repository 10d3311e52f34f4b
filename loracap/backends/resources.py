"""What this process may use of the machine: CPUs, free memory, and the torch thread count that follows.

A container or scheduler gives a process less than the machine has, and `os.cpu_count()` and MemTotal see
none of it: an affinity mask (taskset, Slurm, Kubernetes cpusets) and a cgroup CPU quota (`docker --cpus`,
Kubernetes CPU limits) bound the CPUs, a cgroup memory limit the RAM. Both cgroup versions are read: v2's
`cpu.max` / `memory.max`, v1's `cpu.cfs_quota_us` / `memory.limit_in_bytes`, in this process's own cgroup
and the ones above it (a limit on any of them applies).

Nothing here imports torch at module level: `use_threads` does, when a run starts.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")
MEMINFO = Path("/proc/meminfo")
# cgroup v1 writes "no limit" as a huge number (PAGE_COUNTER_MAX pages), not as "max".
_NO_LIMIT = 2**60
# Threads that feed an accelerator: the CPU only tokenizes, copies and launches kernels.
ACCELERATOR_THREADS = 4


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None


def _own_cgroups(proc_cgroup: Path) -> dict[str, str]:
    """controller -> this process's cgroup path, from /proc/self/cgroup ("" is cgroup v2's hierarchy)."""
    paths: dict[str, str] = {}
    for line in (_read(proc_cgroup) or "").splitlines():
        fields = line.split(":", 2)  # "4:memory:/docker/abc", "2:cpu,cpuacct:/", "0::/user.slice"
        if len(fields) == 3:
            for controller in fields[1].split(","):
                paths[controller] = fields[2]
    return paths


def _folders(mount: Path, own: str | None) -> Iterator[Path]:
    """`mount` and the folders down to this process's cgroup under it. In a container with its own cgroup
    namespace the path is "/" and the mount is the process's cgroup; elsewhere the path leads to it."""
    folder = mount
    yield folder
    for part in Path(own or "/").parts[1:]:
        folder = folder / part
        if not folder.is_dir():
            return
        yield folder


def _v1_mounts(root: Path, controller: str) -> list[Path]:
    """Where cgroup v1 mounts a controller: alone or co-mounted (cpu,cpuacct)."""
    return [root / controller, root / f"{controller},cpuacct", root / f"cpuacct,{controller}"]


def cpu_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> float | None:
    """The cgroup CPU quota in CPUs (1.5 for `docker --cpus 1.5`), the tightest on the way to this process's
    cgroup; None without one."""
    own = _own_cgroups(proc_cgroup)
    limits = []
    for folder in _folders(root, own.get("")):
        quota, _, period = (_read(folder / "cpu.max") or "max").partition(" ")  # "200000 100000"
        if quota != "max" and quota.isdigit() and period.isdigit() and int(period) > 0:
            limits.append(int(quota) / int(period))
    for mount in _v1_mounts(root, "cpu"):
        for folder in _folders(mount, own.get("cpu")):
            quota, period = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
            # -1: no quota
            if quota and period and quota.isdigit() and period.isdigit() and int(quota) > 0 < int(period):
                limits.append(int(quota) / int(period))
    return min(limits) if limits else None


def cpu_threads() -> int:
    """Threads for a runtime other than torch (onnxruntime): OMP_NUM_THREADS when set, as torch honours it,
    else the CPUs this process may use."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return available_cpus()


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP) -> int:
    """CPUs this process may run on: its affinity mask, cut to the cgroup CPU quota (rounded up), at least 1.

    `root` and `proc_cgroup` are where the cgroup file system and this process's cgroup list are read."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows: no affinity mask to read
        cpus = os.cpu_count() or 1
    quota = cpu_quota(root, proc_cgroup)
    if quota is not None:
        cpus = min(cpus, math.ceil(quota))
    return max(1, cpus)


def _meminfo_available(meminfo: Path) -> int | None:
    for line in (_read(meminfo) or "").splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # kB
    return None


def _stat(text: str | None, key: str) -> int:
    for line in (text or "").splitlines():
        name, _, value = line.partition(" ")
        if name == key and value.strip().isdigit():
            return int(value)
    return 0


def _cgroup_headroom(root: Path, proc_cgroup: Path) -> int | None:
    """Bytes left under the tightest cgroup memory limit; None without a limit. Reclaimable file cache
    (inactive_file) counts as free, as it does for the kernel: it is dropped before anything is killed."""
    own = _own_cgroups(proc_cgroup)
    room = []
    v2 = [
        (f / "memory.max", f / "memory.current", f / "memory.stat", "inactive_file")
        for f in _folders(root, own.get(""))
    ]
    v1 = [
        (f / "memory.limit_in_bytes", f / "memory.usage_in_bytes", f / "memory.stat", "total_inactive_file")
        for f in _folders(root / "memory", own.get("memory"))
    ]
    for limit_file, usage_file, stat_file, reclaimable in v2 + v1:
        limit, usage = _read(limit_file), _read(usage_file)
        if not (limit and usage and limit.isdigit() and usage.isdigit()) or int(limit) >= _NO_LIMIT:
            continue  # "max", or no such file at this level
        used = int(usage) - _stat(_read(stat_file), reclaimable)
        room.append(max(0, int(limit) - used))
    return min(room) if room else None


def available_memory(
    root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_CGROUP, meminfo: Path = MEMINFO
) -> int | None:
    """Bytes of RAM this process can still take: the kernel's MemAvailable, cut to what a cgroup memory limit
    leaves; None where neither can be read (not Linux)."""
    sizes = [s for s in (_meminfo_available(meminfo), _cgroup_headroom(root, proc_cgroup)) if s is not None]
    return min(sizes) if sizes else None


def choose_threads(available: int, workers: int, device: str) -> int:
    """Torch threads for a model on `device` ("cpu", "cuda", "mps") beside `workers` image-decoding threads.

    On a CPU the model and the decode threads share the cores, so torch gets what the decoders leave, at
    least one: with more threads than free cores every op waits for its slowest thread (two threads on a
    busy box took 7-19x the time of one, issue 14). On an accelerator the CPU only feeds the device, and a
    few threads are plenty."""
    spare = max(1, available - max(1, workers))  # the decode pool runs at least one thread
    return spare if device == "cpu" else min(spare, ACCELERATOR_THREADS)


def parse_threads(value: object) -> int | None:
    """A thread-count setting: a whole number from 1, or None (choose). ValueError for anything else."""
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"threads must be a whole number from 1, not {value!r}")
    return value


def use_threads(threads: int | None, *, workers: int, device: str) -> int:
    """Set torch's thread count for a run on `device` and say so in one info line; returns the count.

    `threads`: the caller's; None chooses it (`choose_threads` on `available_cpus()`), unless the
    environment already did (OMP_NUM_THREADS, which torch reads at start-up). The count is process-wide
    and stays after the run (torch has no per-call setting)."""
    import torch

    available = available_cpus()
    if parse_threads(threads) is not None:
        why = "as asked"
    elif os.environ.get("OMP_NUM_THREADS", "").strip().isdigit() and int(os.environ["OMP_NUM_THREADS"]):
        threads, why = int(os.environ["OMP_NUM_THREADS"]), "from OMP_NUM_THREADS"
    else:
        threads = choose_threads(available, workers, device)
        decoders = max(1, workers)
        why = f"{decoders} decode thread{'s' if decoders > 1 else ''} beside them on {device}"
    torch.set_num_threads(threads)
    # Inter-op threads serve only graph-level parallelism (torch.jit.fork), which generation does not use;
    # torch allows setting them once, before any parallel work, so a later run keeps what the first set.
    try:
        torch.set_num_interop_threads(threads)
    except RuntimeError:
        log.debug("torch's inter-op thread count was already fixed; left as it is")
    log.info("using %d torch threads of %d available CPUs (%s)", threads, available, why)
    return threads
