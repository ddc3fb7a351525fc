"""One way to run independent per-case jobs: in-process or in a spawn pool, with a progress bar."""
from __future__ import annotations

import multiprocessing
import os
import signal
import sys
from typing import Callable, Iterator, Sequence

from tqdm import tqdm

#: prctl option (linux/prctl.h): the signal a process gets when its parent ends
_PR_SET_PDEATHSIG = 1


def imap_with_progress(fn: Callable, jobs: Sequence, num_processes: int, desc: str, show: bool = True,
                       unit: str = "case") -> Iterator:
    """Yield ``fn(job)`` for every job (completion order when parallel). ``fn`` must be a module-level function.

    Spawn, like nnU-Net's preprocessor: forking a parent whose torch/SimpleITK/BLAS thread pools are running can
    deadlock. Workers end with the parent process, even when it is killed (``die_with_parent``).
    """
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not show) as bar:
        if num_processes <= 1 or len(jobs) <= 1:
            for result in map(fn, jobs):
                bar.update()
                yield result
            return
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs)), initializer=die_with_parent,
                                                       initargs=(os.getpid(),)) as pool:
            for result in pool.imap_unordered(fn, jobs):
                bar.update()
                yield result


def die_with_parent(parent_pid: int) -> None:
    """Pool initializer: the worker gets SIGKILL when its parent ends (Linux ``prctl(PR_SET_PDEATHSIG)``).

    Without it, workers of a parent killed by SIGKILL (or the OOM killer) go on and write their cases, into a folder
    the next run may already be writing. (The signal follows the parent *thread*: the one that creates the pool and
    waits for it, or the pool's own handler thread for replacement workers; both live as long as the pool.)
    Elsewhere than Linux only the check below runs.
    """
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent ended before the signal was armed
        os._exit(1)
