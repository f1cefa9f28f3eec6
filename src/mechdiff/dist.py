"""torch.distributed plumbing: the rank and world size torchrun gives a process, a process group, a launcher.

mechdiff scales out on PyTorch's own engine: `torchrun` (`python -m torch.distributed.run`) starts the
processes (one machine, or many through its rendezvous flags) and sets RANK / WORLD_SIZE / LOCAL_RANK /
LOCAL_WORLD_SIZE in their environment; `init` joins them in a process group (gloo on CPU, NCCL on GPU).
Data-parallel extraction uses the group only for one barrier before the forward passes; DDP SAE training
all-reduces gradients every step.
"""

from __future__ import annotations

import datetime
import os
import subprocess
import sys
from collections.abc import Sequence

import torch
import torch.distributed as dist

from mechdiff.errors import MechdiffError

# A barrier may wait while another rank loads a large model: far longer than torch's 30-minute default.
TIMEOUT = datetime.timedelta(hours=6)


def in_worker() -> bool:
    """True inside a process started by torchrun (or any launcher that sets WORLD_SIZE)."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def rank_world() -> tuple[int, int]:
    """(rank, world size): from the process group when one is initialised, else torchrun's environment, else (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if in_worker():
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    return 0, 1


def init(backend: str | None = None) -> tuple[int, int]:
    """Join torchrun's process group (gloo, or NCCL when `backend` says so); (rank, world). A no-op alone."""
    rank, world = rank_world()
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(backend or "gloo", timeout=TIMEOUT)
        rank, world = dist.get_rank(), dist.get_world_size()
    return rank, world


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a single process)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def close() -> None:
    """Leave the process group (if any)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def my_share(items: Sequence) -> list:
    """This rank's share of independent jobs (round robin: items[rank::world]); all of them in one process."""
    rank, world = rank_world()
    return list(items)[rank::world]


def local_threads() -> int:
    """Torch threads for this process: the CPUs it may use shared among the ranks on its machine."""
    return local_threads_for(int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


def launch(argv: Sequence[str], nproc: int, *, what: str = "run") -> None:
    """Run `python <argv>` as `nproc` processes on this machine under torchrun; raise if any rank fails.

    For several machines, start torchrun yourself on each (docs/SCALE.md and the README show the flags).
    """
    if not isinstance(nproc, int) or isinstance(nproc, bool) or nproc < 1:
        raise MechdiffError(f"nproc must be a positive integer, got {nproc!r}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *argv]
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(local_threads_for(nproc)))
    res = subprocess.run(cmd, env=env)
    if res.returncode != 0:
        raise MechdiffError(f"{what}: a rank of the {nproc}-process run failed (exit {res.returncode}; its error is "
                            "printed above); rerun to resume what the ranks committed")


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask; the machine's count where there is none)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def local_threads_for(nproc: int) -> int:
    """Threads per rank when `nproc` ranks share this machine's CPUs."""
    return max(1, available_cpus() // max(1, nproc))


def device_for_rank(device: str) -> str:
    """`cuda` becomes `cuda:<LOCAL_RANK>` in a multi-process run (one GPU per rank); other devices unchanged."""
    if device == "cuda" and in_worker() and torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if local >= torch.cuda.device_count():
            raise MechdiffError(f"local rank {local} has no GPU: this machine has {torch.cuda.device_count()}; "
                                f"start at most that many processes per node (nproc)")
        return f"cuda:{local}"
    return device


def backend_for(device: str) -> str:
    """The process-group backend for a device: NCCL for CUDA, gloo otherwise."""
    return "nccl" if str(device).startswith("cuda") and dist.is_nccl_available() else "gloo"


__all__ = ["TIMEOUT", "backend_for", "barrier", "close", "device_for_rank", "in_worker", "init", "launch", "local_threads",
           "local_threads_for", "my_share", "rank_world"]
