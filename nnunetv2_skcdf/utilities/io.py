"""Crash-safe file output: write to a temporary file in the target folder, then rename.

``os.replace`` is atomic on POSIX and Windows when source and target are on the same file system,
so a reader (or a resumed run) sees either the old complete file or the new complete file, never a
half-written one.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def atomic_output(path: str, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path next to ``path``; on success rename it to ``path``, on error delete it.

    ``suffix`` defaults to the extension of ``path`` (some writers, e.g. SimpleITK or blosc2, choose
    the format from the file name, so the temporary file keeps the real ending: ``.nii.gz`` etc.).
    """
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    if suffix is None:
        base = os.path.basename(path)
        suffix = base[base.index("."):] if "." in base else ""
    fd, tmp = tempfile.mkstemp(prefix=".tmp_", suffix=suffix, dir=folder)
    os.close(fd)
    os.remove(tmp)  # writers that refuse to overwrite (blosc2) must find the name free
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_save_json(obj, path: str, indent: int = 2) -> None:
    """Write ``obj`` as JSON to ``path`` atomically (``sort_keys`` off: list order is meaningful)."""
    with atomic_output(path, suffix=".json") as tmp:
        with open(tmp, "w") as f:
            json.dump(obj, f, indent=indent)
            f.write("\n")
