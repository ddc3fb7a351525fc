"""One way to run independent per-case jobs: in-process or in a spawn pool, with a progress bar."""
from __future__ import annotations

import multiprocessing
from typing import Callable, Iterator, Sequence

from tqdm import tqdm


def imap_with_progress(fn: Callable, jobs: Sequence, num_processes: int, desc: str, show: bool = True,
                       unit: str = "case") -> Iterator:
    """Yield ``fn(job)`` for every job (completion order when parallel). ``fn`` must be a module-level function.

    Spawn, like nnU-Net's preprocessor: forking a parent whose torch/SimpleITK/BLAS thread pools are running can
    deadlock.
    """
    with tqdm(total=len(jobs), desc=desc, unit=unit, disable=not show) as bar:
        if num_processes <= 1 or len(jobs) <= 1:
            for result in map(fn, jobs):
                bar.update()
                yield result
            return
        with multiprocessing.get_context("spawn").Pool(min(num_processes, len(jobs))) as pool:
            for result in pool.imap_unordered(fn, jobs):
                bar.update()
                yield result
