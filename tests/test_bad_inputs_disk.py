"""Issue 42, item 1: a full disk (or another OS error while writing) is named as such, with the path and the free
space; ``--overwrite`` swaps its new folder in only when every case succeeded, so the old folder stays byte for byte;
no temporary file survives a failed run. Out-of-space is simulated deterministically: the writer raises
``OSError(ENOSPC)`` (or blosc2's ``RuntimeError``) at its n-th write, after writing part of the file."""
from __future__ import annotations

import errno
import hashlib
import json
import sys
import types
from pathlib import Path

import blosc2
import pytest

from conftest import DATASET_ID
from nnunetv2_skcdf.preprocessing.unlabeled import METADATA_FILE, preprocess_unlabeled
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

FOLDER = "nnUNetPlans_3d_fullres_unlabeled"
ENOSPC = OSError(errno.ENOSPC, "No space left on device")


def _hashes(folder: Path) -> dict:
    """Relative path -> sha256 of every file (and '<dir>' for every sub-folder) under ``folder``."""
    return {str(p.relative_to(folder)): "<dir>" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*"))}


def _temporaries(root: Path) -> list:
    """Temporary files and staging/old folders anywhere under ``root`` (lock files are kept on purpose)."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*")
                  if p.name.startswith(".tmp_") or ".new-" in p.name or ".old-" in p.name)


def _disk_full_at(monkeypatch, n: int, error: BaseException) -> list:
    """blosc2 (the writer of the .b2nd files) fails at its ``n``-th file write, having written part of the file."""
    real, calls = blosc2.asarray, []

    def writer(array, *args, urlpath=None, **kwargs):
        if urlpath is not None:  # in-memory trial compressions (nnU-Net's filter choice) are no writes
            calls.append(urlpath)
            if len(calls) == n:
                Path(urlpath).write_bytes(b"\0" * 4096)  # what a full disk leaves: a partly written file
                raise error
        return real(array, *args, urlpath=urlpath, **kwargs)

    monkeypatch.setattr(blosc2, "asarray", writer)
    return calls


def _cases(folder: Path) -> list:
    return sorted(p.name[:-4] for p in folder.glob("*.pkl"))


def test_overwrite_on_a_full_disk_keeps_the_old_folder_byte_identical(phantom_workspace, monkeypatch):
    """Was: 2 of 3 cases failed, the staging folder was swapped in anyway (a good old case deleted) and .tmp_ files
    were left in the live folder."""
    pre = phantom_workspace["preprocessed"]
    folder = pre / FOLDER
    before = _hashes(folder)
    assert len(_cases(folder)) == 3
    calls = _disk_full_at(monkeypatch, 3, ENOSPC)  # case 1 written (2 files), case 2's image fails
    with pytest.raises(SKCDFInputError) as e:
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, overwrite=True, verbose=False)
    assert len(calls) >= 3
    assert _hashes(folder) == before  # byte-identical, nothing added or removed
    assert _temporaries(pre) == []  # staging folder and its partial files removed
    msg = str(e.value)
    assert "1 of 3 unlabelled cases failed" in msg
    assert "out of disk space" in msg and "No space left on device" in msg and " free on its disk" in msg
    assert f"--overwrite replaced nothing: {folder} is as it was" in msg
    assert "Check the image" not in msg  # not blamed on the image


@pytest.mark.parametrize("error, what", [
    (ENOSPC, "out of disk space"),
    (RuntimeError("Error while creating the NDArray"), "write failed"),  # what blosc2 itself raises on a full disk
], ids=["ENOSPC", "blosc2_RuntimeError"])
def test_full_disk_without_overwrite_names_the_disk_and_leaves_no_temporary_file(phantom_workspace, monkeypatch,
                                                                                 error, what):
    """Was: "preprocessing failed (RuntimeError: ...). Check the image ..." and a .tmp_ file left on the full disk."""
    pre = phantom_workspace["preprocessed"]
    folder = pre / FOLDER
    gone = _cases(folder)[1]
    for ending in (".b2nd", "_seg.b2nd", ".pkl"):
        (folder / f"{gone}{ending}").unlink()
    kept = {k: v for k, v in _hashes(folder).items() if k != METADATA_FILE}
    _disk_full_at(monkeypatch, 1, error)
    with pytest.raises(SKCDFInputError) as e:
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, verbose=False)
    msg = str(e.value)
    assert "1 of 3 unlabelled cases failed (the others were saved)" in msg
    assert f"{folder / gone}: cannot be written, {what} ({type(error).__name__}: " in msg
    assert " free on its disk" in msg and "Free disk space" in msg and "Check the image" not in msg
    assert _temporaries(pre) == []
    assert {k: v for k, v in _hashes(folder).items() if k != METADATA_FILE} == kept  # the complete cases untouched


def _json_dump_fails(monkeypatch):
    """``atomic_save_json``'s writer runs out of space after writing part of the file."""
    from nnunetv2_skcdf.utilities import io

    def dump(obj, f, **kwargs):
        f.write("{\n  \"half\":")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(io, "json", types.SimpleNamespace(dump=dump))


def test_atomic_save_json_on_a_full_disk_names_the_path_and_the_free_space(tmp_path, monkeypatch):
    from nnunetv2_skcdf.utilities.dataset_files import SKCDFWriteError
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    target = tmp_path / "out" / "meta.json"
    target.parent.mkdir()
    target.write_text('{"old": 1}\n')
    _json_dump_fails(monkeypatch)
    with pytest.raises(SKCDFWriteError) as e:
        atomic_save_json({"new": 2}, str(target))
    msg = str(e.value)
    assert msg.startswith(f"{target}: cannot be written, out of disk space (OSError: [Errno 28] No space left on "
                          f"device); ")
    assert " free on its disk" in msg and "Free disk space" in msg
    assert isinstance(e.value, SKCDFInputError) and isinstance(e.value.__cause__, OSError)
    assert json.loads(target.read_text()) == {"old": 1}  # the old file is intact
    assert sorted(p.name for p in target.parent.iterdir()) == ["meta.json"]  # no .tmp_ file


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_console_command_on_a_full_disk_exits_with_a_message_not_a_traceback(phantom_workspace, monkeypatch, capsys,
                                                                             overwrite):
    """Was (0 KB free): a raw ``OSError: [Errno 28]`` traceback from ``atomic_save_json`` (the metadata file)."""
    from nnunetv2_skcdf.preprocessing.unlabeled import preprocess_unlabeled_entry

    pre = phantom_workspace["preprocessed"]
    before = _hashes(pre / FOLDER)
    _json_dump_fails(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["skcdf_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np",
                                      "1", "--quiet"] + (["--overwrite"] if overwrite else []))
    with pytest.raises(SystemExit) as exit_info:
        preprocess_unlabeled_entry()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR: ") and f"{METADATA_FILE}: cannot be written, out of disk space" in err
    assert " free on its disk" in err
    if overwrite:
        assert f"--overwrite replaced nothing: {pre / FOLDER} is as it was" in err
    assert _hashes(pre / FOLDER) == before and _temporaries(pre) == []
