"""skcdf_preprocess_unlabeled: equality with nnU-Net's own preprocessing, idempotence, crash safety, bad input."""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import blosc2
import numpy as np
import pytest
import SimpleITK as sitk
from batchgenerators.utilities.file_and_folder_operations import load_pickle

from conftest import DATASET_ID, run_cli
from nnunetv2_skcdf.preprocessing.unlabeled import (
    METADATA_FILE,
    preprocess_unlabeled,
    read_unlabeled_case,
)
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

CONFIGS = ("2d", "3d_fullres")


def _b2nd(path: Path) -> np.ndarray:
    return blosc2.open(str(path), mode="r")[:]


def _first_training_case(raw: Path) -> str:
    return sorted(p.name[: -len("_0000.nii.gz")] for p in (raw / "imagesTr").glob("*_0000.nii.gz"))[0]


def _unlabeled_images(raw: Path):
    return sorted((raw / "imagesUnlabeled").glob("*.nii.gz"))


@pytest.mark.parametrize("configuration", CONFIGS)
def test_unlabeled_equals_nnunet_preprocessing_of_same_image(phantom_workspace, configuration):
    raw, pre = phantom_workspace["raw"], phantom_workspace["preprocessed"]
    case = _first_training_case(raw)
    shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesUnlabeled" / f"copy_{case}_0000.nii.gz")
    out = Path(preprocess_unlabeled(DATASET_ID, [configuration], num_processes=1, verbose=False)[configuration])
    labelled_folder = pre / out.name[: -len("_unlabeled")]
    assert out.name == labelled_folder.name + "_unlabeled" and labelled_folder.is_dir()

    ours, theirs = _b2nd(out / f"copy_{case}.b2nd"), _b2nd(labelled_folder / f"{case}.b2nd")
    assert ours.dtype == np.float32 and ours.shape == theirs.shape
    np.testing.assert_array_equal(ours, theirs)
    p_ours, p_theirs = load_pickle(out / f"copy_{case}.pkl"), load_pickle(labelled_folder / f"{case}.pkl")
    for key in ("spacing", "shape_before_cropping", "bbox_used_for_cropping",
                "shape_after_cropping_and_before_resampling"):
        assert np.array_equal(np.asarray(p_ours[key]), np.asarray(p_theirs[key])), key
    assert "class_locations" not in p_ours and "class_locations" in p_theirs
    # the _seg file of an unlabelled case is nnU-Net's crop mask, never labels
    assert set(np.unique(_b2nd(out / f"copy_{case}_seg.b2nd"))) <= {-1, 0}


def test_all_unlabeled_cases_written_with_metadata(planned_phantom):
    pre, raw = planned_phantom["preprocessed"], planned_phantom["raw"]
    ids = {p.name[: -len("_0000.nii.gz")] for p in _unlabeled_images(raw)}
    assert len(ids) == 3
    for folder in ("nnUNetPlans_2d_unlabeled", "nnUNetPlans_3d_fullres_unlabeled"):
        written = {p.name[:-4] for p in (pre / folder).glob("*.pkl")}
        assert written == ids
        meta = json.loads((pre / folder / METADATA_FILE).read_text())
        assert meta["plans_identifier"] == "nnUNetPlans" and len(meta["plans_fingerprint"]) == 16
        assert not any(p.name.startswith(".tmp_") for p in (pre / folder).iterdir())
    # nnU-Net's own labelled folder is untouched: no unlabelled case ended up there
    labelled = {p.name[:-4] for p in (pre / "nnUNetPlans_3d_fullres").glob("*.pkl")}
    assert not labelled & ids


def test_second_run_skips_done_cases_and_overwrite_redoes_them(phantom_workspace):
    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, verbose=False)
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir() if p.name != METADATA_FILE} == \
        {k: v for k, v in before.items() if k != METADATA_FILE}
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, overwrite=True, verbose=False)
    after = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert after.keys() == before.keys()
    assert all(after[k] != before[k] for k in after if k.endswith(".b2nd"))


def test_interrupted_run_leftovers_are_removed_and_redone(phantom_workspace):
    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    case = sorted(p.name[:-4] for p in folder.glob("*.pkl"))[0]
    reference = _b2nd(folder / f"{case}.b2nd")
    # simulate a kill between the renames of one case and in the middle of writing another
    (folder / f"{case}.pkl").unlink()
    (folder / ".tmp_other.b2nd").write_bytes(b"half written")
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, verbose=False)
    assert not (folder / ".tmp_other.b2nd").exists()
    assert (folder / f"{case}.pkl").exists()
    np.testing.assert_array_equal(_b2nd(folder / f"{case}.b2nd"), reference)


def test_parallel_run_matches_serial_run(phantom_workspace):
    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    serial = {p.name: _b2nd(p) for p in folder.glob("*.b2nd")}
    written = {name: (folder / name).stat().st_mtime_ns for name in serial}
    assert sorted(serial) == [f"phantom_un_{i:04d}{s}.b2nd" for i in range(3) for s in ("", "_seg")]
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=2, overwrite=True, verbose=False)
    for name, arr in serial.items():
        assert (folder / name).stat().st_mtime_ns != written[name], f"{name} was not written again"
        np.testing.assert_array_equal(_b2nd(folder / name), arr)


def test_changed_plans_are_refused_until_overwrite(phantom_workspace):
    plans_file = phantom_workspace["preprocessed"] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["foreground_intensity_properties_per_channel"]["0"]["mean"] += 10.0
    plans_file.write_text(json.dumps(plans))
    with pytest.raises(SKCDFInputError, match="different plans.*--overwrite"):
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, verbose=False)
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, overwrite=True, verbose=False)


# ---------------------------------------------------------------------------------------------- bad input
def _fail(match: str):
    with pytest.raises(SKCDFInputError, match="(?s)" + match):
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, verbose=False)


def test_extra_channel_is_rejected_naming_the_case(phantom_workspace):
    img = _unlabeled_images(phantom_workspace["raw"])[0]
    shutil.copy(img, img.with_name(img.name.replace("_0000.", "_0001.")))
    case = img.name[: -len("_0000.nii.gz")]
    _fail(rf"Unlabelled case '{case}'.*found channels \[_0000, _0001\].*expects \[_0000\]")


def test_wrong_file_ending_is_rejected_naming_the_file(phantom_workspace):
    img = _unlabeled_images(phantom_workspace["raw"])[0]
    sitk.WriteImage(sitk.ReadImage(str(img)), str(img.parent / "extra_0000.nrrd"))
    _fail(r"extra_0000\.nrrd: wrong file ending.*'\.nii\.gz'")


def test_bad_channel_naming_is_rejected(phantom_workspace):
    img = _unlabeled_images(phantom_workspace["raw"])[0]
    shutil.copy(img, img.parent / "nochannel.nii.gz")
    _fail(r"nochannel\.nii\.gz: name does not follow nnU-Net's channel naming")


def test_truncated_file_is_rejected_and_good_cases_are_kept(phantom_workspace):
    imgs = _unlabeled_images(phantom_workspace["raw"])
    data = imgs[0].read_bytes()
    imgs[0].write_bytes(data[: len(data) // 3])
    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    shutil.rmtree(folder)
    _fail(rf"1 of 3 unlabelled cases failed.*{imgs[0].name}: cannot be read.*truncated")
    written = sorted(p.name[:-4] for p in folder.glob("*.pkl"))
    assert written == sorted(p.name[: -len("_0000.nii.gz")] for p in imgs[1:])


def test_nan_image_is_rejected(tmp_path):
    """NIfTI: found on disk (nibabel), whatever the plans' reader; nrrd: SimpleITK keeps NaN, the array check sees it."""
    from nnunetv2.imageio.nibabel_reader_writer import NibabelIO
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    arr = np.zeros((4, 8, 8), np.float32)
    arr[1, 2, 3] = np.nan
    for reader, ending in ((NibabelIO, ".nii.gz"), (SimpleITKIO, ".nii.gz"), (SimpleITKIO, ".nrrd")):
        path = tmp_path / f"nan_0000{ending}"
        sitk.WriteImage(sitk.GetImageFromArray(arr), str(path))
        with pytest.raises(SKCDFInputError, match=rf"nan_0000{re.escape(ending)}: contains NaN or infinite"):
            read_unlabeled_case(reader(), [str(path)])


def test_2d_image_in_3d_dataset_is_rejected(phantom_workspace):
    img = _unlabeled_images(phantom_workspace["raw"])[0]
    slice2d = sitk.ReadImage(str(img))[:, :, 0]
    sitk.WriteImage(slice2d, str(img.parent / "flat_0000.nii.gz"))
    _fail(r"flat_0000\.nii\.gz: is a 2D image but the labelled images of this dataset \(imagesTr\) are 3D")


def test_id_clash_with_training_case_is_rejected(phantom_workspace):
    raw = phantom_workspace["raw"]
    case = _first_training_case(raw)
    shutil.copy(raw / "imagesTr" / f"{case}_0000.nii.gz", raw / "imagesUnlabeled" / f"{case}_0000.nii.gz")
    _fail(rf"Unlabelled case ids \['{case}'\].*also training case ids")


def test_empty_unlabeled_folder_and_missing_plans(phantom_workspace):
    for img in _unlabeled_images(phantom_workspace["raw"]):
        img.unlink()
    _fail(r"No unlabelled images found in .*imagesUnlabeled")
    (phantom_workspace["preprocessed"] / "nnUNetPlans.json").unlink()
    _fail(r"Plans file .*nnUNetPlans\.json not found.*nnUNetv2_plan_and_preprocess")


def test_unknown_configuration_is_rejected(phantom_workspace):
    with pytest.raises(SKCDFInputError, match=r"Configuration '3d_lowres_x' is not in plans nnUNetPlans"):
        preprocess_unlabeled(DATASET_ID, ["3d_lowres_x"], num_processes=1, verbose=False)


def test_channel_geometry_mismatch_is_rejected(tmp_path):
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    a = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    a.SetSpacing((1.0, 1.0, 2.0))
    b = sitk.GetImageFromArray(np.zeros((4, 8, 8), np.int16))
    b.SetSpacing((1.0, 1.0, 3.0))
    c = sitk.GetImageFromArray(np.zeros((4, 8, 9), np.int16))
    files = [str(tmp_path / f"case_000{i}.nii.gz") for i in range(3)]
    for img, f in zip((a, b, c), files):
        sitk.WriteImage(img, f)
    with pytest.raises(SKCDFInputError, match=r"case_0001\.nii\.gz: geometry does not match.*spacing \[3\.0, 1\.0, 1\.0\] "
                                              r"vs \[2\.0, 1\.0, 1\.0\]"):  # plain numbers, not np.float64(3.0)
        read_unlabeled_case(SimpleITKIO(), files[:2])
    with pytest.raises(SKCDFInputError, match=r"case_0002\.nii\.gz: geometry does not match.*shape"):
        read_unlabeled_case(SimpleITKIO(), [files[0], files[2]])
    data, props = read_unlabeled_case(SimpleITKIO(), [files[0], files[0]])
    assert data.shape == (2, 4, 8, 8) and data.dtype == np.float32 and list(props["spacing"]) == [2.0, 1.0, 1.0]


def test_console_script_help_and_error_exit_code(phantom_workspace):
    out = run_cli(["skcdf_preprocess_unlabeled", "--help"], phantom_workspace["env"])
    assert "imagesUnlabeled" in out.stdout and "--overwrite" in out.stdout
    bad = run_cli(["skcdf_preprocess_unlabeled", "-d", "999", "-c", "3d_fullres"], phantom_workspace["env"],
                  check=False)
    assert bad.returncode == 2 and "ERROR: Unknown dataset '999'" in bad.stderr and "Traceback" not in bad.stderr


# ---------------------------------------------------------------------------------------------- issue 13: bad files
def _output_cases(phantom_workspace) -> list:
    return sorted(p.name[:-4] for p in (phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled")
                  .glob("*.pkl"))


def test_4d_and_vector_images_are_refused_and_the_good_cases_saved_in_parallel(phantom_workspace):
    """nnU-Net's reader takes a 4D file (or the components of a vector image) for channels, and its normalisation
    then fails with an IndexError that aborted the pool: the good cases of the run were lost."""
    import nibabel

    folder = phantom_workspace["raw"] / "imagesUnlabeled"
    good = sorted(p.name[: -len("_0000.nii.gz")] for p in _unlabeled_images(phantom_workspace["raw"]))
    nibabel.save(nibabel.Nifti1Image(np.zeros((16, 16, 8, 3), np.int16), np.diag([1.0, 1.0, 2.0, 1.0])),
                 str(folder / "series4d_0000.nii.gz"))
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((8, 16, 16, 3), np.uint8), isVector=True),
                    str(folder / "rgb_0000.nii.gz"))
    shutil.rmtree(phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled")
    with pytest.raises(SKCDFInputError) as e:
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=2, verbose=False)
    msg = str(e.value)
    assert "2 of 5 unlabelled cases failed (the others were saved)" in msg
    assert "series4d_0000.nii.gz: is a 4D image (size x, y, z, t = 16, 16, 8, 3)" in msg
    assert "rgb_0000.nii.gz: has 3 components per voxel (a vector or RGB image)" in msg
    assert "one file per channel" in msg and "IndexError" not in msg
    assert _output_cases(phantom_workspace) == good


def test_unexpected_failure_of_one_case_becomes_a_message_naming_it(phantom_workspace, monkeypatch):
    """Any exception of one case (here nnU-Net's preprocessor) is reported with its file; the others are saved."""
    from nnunetv2.preprocessing.preprocessors.default_preprocessor import DefaultPreprocessor

    imgs = _unlabeled_images(phantom_workspace["raw"])
    real = DefaultPreprocessor.run_case_npy
    calls = []

    def flaky(self, data, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise IndexError("list index out of range")
        return real(self, data, *args, **kwargs)

    monkeypatch.setattr(DefaultPreprocessor, "run_case_npy", flaky)
    shutil.rmtree(phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled")
    _fail(rf"1 of 3 unlabelled cases failed.*{imgs[1].name}: preprocessing failed \(IndexError: list index out of "
          rf"range\).*remove the case")
    assert _output_cases(phantom_workspace) == [imgs[0].name[:-12], imgs[2].name[:-12]]


def test_nan_in_a_nifti_file_is_found_although_simpleitk_reads_it_as_zero(phantom_workspace):
    img = _unlabeled_images(phantom_workspace["raw"])[0]
    image = sitk.Cast(sitk.ReadImage(str(img)), sitk.sitkFloat32)
    arr = sitk.GetArrayFromImage(image)
    arr[3, 4, 5], arr[4, 5, 6] = np.nan, np.inf
    broken = sitk.GetImageFromArray(arr)
    broken.CopyInformation(image)
    sitk.WriteImage(broken, str(img))
    assert np.isfinite(sitk.GetArrayFromImage(sitk.ReadImage(str(img)))).all()  # why the array check cannot see it
    shutil.rmtree(phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled")
    _fail(rf"{img.name}: contains NaN or infinite voxels \(1 NaN, 1 inf in its float32 data; SimpleITK reads them "
          rf"as 0\)")


def _write_with_direction(src: Path, dst: Path, direction) -> None:
    image = sitk.ReadImage(str(src))
    image.SetDirection(direction)
    sitk.WriteImage(image, str(dst))


@pytest.mark.parametrize("direction, code", [
    ((-1, 0, 0, 0, -1, 0, 0, 0, 1), "RAS"),  # flipped left-right and front-back
    ((0, 1, 0, 1, 0, 0, 0, 0, 1), "PLS"),   # x and y axes swapped
])
def test_image_oriented_unlike_the_training_images_is_refused(phantom_workspace, direction, code):
    img = _unlabeled_images(phantom_workspace["raw"])[0]
    _write_with_direction(img, img, direction)
    shutil.rmtree(phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled")
    _fail(rf"{img.name}: orientation {code} \(direction {re.escape(str(tuple(direction)))}\) differs "
          rf"from the training images in imagesTr \(LPS, e.g. phantom_tr_0000_0000.nii.gz: direction "
          rf"\(1, 0, 0, 0, 1, 0, 0, 0, 1\)\).*nnU-Net does not reorient.*sitk.DICOMOrient\(image, 'LPS'\)")


def test_slightly_oblique_image_with_the_training_orientation_is_accepted(phantom_workspace):
    img = _unlabeled_images(phantom_workspace["raw"])[0]
    c, s = np.cos(np.radians(5)), np.sin(np.radians(5))
    _write_with_direction(img, img, (c, -s, 0, s, c, 0, 0, 0, 1))
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, overwrite=True, verbose=False)


def test_orientation_code_matches_simpleitk():
    from nnunetv2_skcdf.preprocessing.image_checks import orientation_code

    rng = np.random.default_rng(0)
    for _ in range(20):
        permutation = rng.permutation(3)
        matrix = np.eye(3)[:, permutation] * rng.choice([-1, 1], size=3)
        direction = tuple(matrix.ravel())
        assert orientation_code(direction) == \
            sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(direction)
    assert orientation_code((0, 1, 1, 0)) == "PL"  # 2D


# ---------------------------------------------------------------------------------- issue 13: interruption, concurrency
def _state(folder: Path) -> dict:
    """name -> (mtime, size) of everything in ``folder``, sub-folders included."""
    return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.stat().st_size) for p in sorted(folder.rglob("*"))}


def _leftovers(pre: Path) -> list:
    return sorted(p.name for p in pre.iterdir() if p.name.startswith(".") and not p.name.endswith(".lock"))


def test_overwrite_replaces_a_folder_with_unexpected_entries(phantom_workspace):
    """The old --overwrite deleted file by file and died on a sub-folder, leaving .pkl files without arrays."""
    pre = phantom_workspace["preprocessed"]
    folder = pre / "nnUNetPlans_3d_fullres_unlabeled"
    (folder / "notes").mkdir()
    (folder / "notes" / "readme.txt").write_text("mine")
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, overwrite=True, verbose=False)
    assert not (folder / "notes").exists() and (folder / METADATA_FILE).is_file()
    assert _output_cases(phantom_workspace) == sorted(p.name[:-12] for p in _unlabeled_images(phantom_workspace["raw"]))
    assert _leftovers(pre) == []


def test_interrupted_overwrite_leaves_the_old_folder_untouched(phantom_workspace, monkeypatch):
    from nnunetv2_skcdf.preprocessing import unlabeled

    pre = phantom_workspace["preprocessed"]
    folder = pre / "nnUNetPlans_3d_fullres_unlabeled"
    before = _state(folder)
    real, calls = unlabeled.preprocess_and_save_case, []

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt  # Ctrl-C in the middle of the rebuild
        return real(*args)

    monkeypatch.setattr(unlabeled, "preprocess_and_save_case", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, overwrite=True, verbose=False)
    assert _state(folder) == before and _leftovers(pre) == []


def test_temporary_names_are_unique_per_process(phantom_workspace, monkeypatch):
    """Fixed names per case let two writers collide (an obscure blosc2 error); the pid makes them unique."""
    from nnunetv2.training.dataloading.nnunet_dataset import nnUNetDatasetBlosc2

    real, names = nnUNetDatasetBlosc2.save_case, []
    monkeypatch.setattr(nnUNetDatasetBlosc2, "save_case",
                        staticmethod(lambda data, seg, props, out, **kw: names.append(out) or
                                     real(data, seg, props, out, **kw)))
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, overwrite=True, verbose=False)
    assert len(names) == 3 and all(Path(n).name.startswith(f".tmp_{os.getpid()}_") for n in names)


def test_swap_cut_between_its_renames_is_undone_at_the_next_start(tmp_path, monkeypatch):
    """SIGKILL after the old folder was renamed aside, before the new one was renamed in: the old one comes back."""
    from nnunetv2_skcdf.utilities import io

    folder = tmp_path / "out"
    folder.mkdir()
    (folder / "old.txt").write_text("old")
    staging = Path(io.new_staging_folder(str(folder)))
    (staging / "new.txt").write_text("new")
    real_rename = os.rename

    def killed_at_second_rename(src, dst):
        if Path(src) == staging:
            raise SystemExit("killed")
        real_rename(src, dst)

    monkeypatch.setattr(io.os, "rename", killed_at_second_rename)
    with pytest.raises(SystemExit):
        io.swap_in_folder(str(staging), str(folder))
    monkeypatch.setattr(io.os, "rename", real_rename)
    assert not folder.exists()
    io.recover_folder_swap(str(folder))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (folder / "old.txt").read_text() == "old"


def _popen_preprocess(phantom_workspace, log: Path, *extra) -> subprocess.Popen:
    env = {**os.environ, **phantom_workspace["env"], "nnUNet_def_n_proc": "1", "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(["skcdf_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "3d_fullres", "-np", "1",
                             "--quiet", *extra], env=env, stdout=subprocess.DEVNULL, stderr=log.open("w"))


def test_second_run_waits_for_the_lock_of_the_first(phantom_workspace, tmp_path):
    """Another run holds the folder's lock: a new run says so and writes nothing until the lock is free."""
    from nnunetv2_skcdf.utilities.io import folder_lock

    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    before, log = _state(folder), tmp_path / "stderr.txt"
    with folder_lock(str(folder), "test"):
        proc = _popen_preprocess(phantom_workspace, log, "--overwrite")
        deadline = time.time() + 120
        while "waiting for it to finish" not in log.read_text() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        text = log.read_text()
        assert f"is being written by another skcdf_preprocess_unlabeled run (pid {os.getpid()}" in text, text
        time.sleep(1)
        assert proc.poll() is None and _state(folder) == before  # waiting, nothing written
    assert proc.wait(timeout=300) == 0, log.read_text()
    assert _state(folder) != before and len(_output_cases(phantom_workspace)) == 3


_POOL_DRIVER = """
import sys, time
from nnunetv2_skcdf.utilities.parallel import imap_with_progress
print("started", flush=True)
list(imap_with_progress(time.sleep, [60, 60], 2, "sleep", show=False))
"""


def _spawned_children(parent: int) -> list:
    """Pids of the multiprocessing spawn workers whose parent is ``parent`` (Linux /proc)."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = Path(f"/proc/{entry}/status").read_text()
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        ppid = int(next(line.split()[1] for line in status.splitlines() if line.startswith("PPid:")))
        if ppid == parent and b"spawn_main" in cmdline:
            found.append(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG and /proc are Linux")
def test_pool_workers_end_when_the_parent_is_killed():
    """SIGKILL of the parent (kill -9, OOM killer): its workers must not go on and write cases."""
    proc = subprocess.Popen([sys.executable, "-c", _POOL_DRIVER], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        deadline, workers = time.time() + 60, []
        while len(workers) < 2 and time.time() < deadline:
            time.sleep(0.2)
            workers = _spawned_children(proc.pid)
        assert len(workers) == 2
        time.sleep(3)  # the workers are running their 60 s jobs
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        deadline = time.time() + 10
        while any(map(_alive, workers)) and time.time() < deadline:
            time.sleep(0.2)
        assert not any(map(_alive, workers)), "workers outlived their killed parent"
    finally:
        for pid in [proc.pid] + _spawned_children(proc.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_unlabelled_folder_without_metadata_is_refused_at_trainer_start(planned_phantom, tmp_path):
    from nnunetv2_skcdf.preprocessing.unlabeled import check_unlabeled_folder_is_current

    pre = planned_phantom["preprocessed"]
    plans, dataset_json = (json.loads((pre / f).read_text()) for f in ("nnUNetPlans.json", "dataset.json"))
    check_unlabeled_folder_is_current(str(pre / "nnUNetPlans_3d_fullres_unlabeled"), plans, "3d_fullres", dataset_json)
    with pytest.raises(SKCDFInputError, match=rf"{tmp_path}: no {METADATA_FILE}.*skcdf_preprocess_unlabeled -d "
                                              rf"Dataset951_TinyPhantom -c 3d_fullres -p nnUNetPlans --overwrite"):
        check_unlabeled_folder_is_current(str(tmp_path), plans, "3d_fullres", dataset_json)


# ---------------------------------------------------------------------------------------- issue 42: items 3 and 4
def _tree(folder: Path) -> dict:
    """Relative path -> file bytes (None for folders) of everything under ``folder``."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def test_user_subfolders_named_like_case_files_or_temporaries_are_left_alone(phantom_workspace):
    """A sub-folder 'x.b2nd' or '.tmp_x' crashed the cleanup of leftovers with IsADirectoryError."""
    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    mine = {"mine.b2nd": "a", ".tmp_mine": "b", "old_seg.b2nd": "c"}
    for name, text in mine.items():
        (folder / name).mkdir()
        (folder / name / "notes.txt").write_text(text)
    redo = _output_cases(phantom_workspace)[0]
    (folder / f"{redo}.pkl").unlink()  # work for the run: one case to redo, its arrays are leftovers
    preprocess_unlabeled(DATASET_ID, ["3d_fullres"], num_processes=1, verbose=False)
    for name, text in mine.items():
        assert (folder / name / "notes.txt").read_text() == text
    assert (folder / f"{redo}.pkl").is_file() and len(_output_cases(phantom_workspace)) == 3


def test_folder_in_the_way_of_a_case_file_is_refused_naming_it(phantom_workspace):
    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    case = _output_cases(phantom_workspace)[1]
    for ending in (".b2nd", "_seg.b2nd", ".pkl"):
        (folder / f"{case}{ending}").unlink()
    (folder / f"{case}.pkl").mkdir()
    (folder / f"{case}.pkl" / "mine.txt").write_text("mine")
    before = _tree(folder)
    _fail(rf"{re.escape(str(folder / case))}\.pkl: is a folder, but skcdf_preprocess_unlabeled must write a file of "
          rf"unlabelled case '{case}' under this name\. Move or rename the folder.*then rerun")
    assert {k: v for k, v in _tree(folder).items() if k != METADATA_FILE} == \
        {k: v for k, v in before.items() if k != METADATA_FILE}  # refused before anything was written


def test_one_slice_3d_image_is_not_called_a_2d_image(phantom_workspace):
    img = _unlabeled_images(phantom_workspace["raw"])[0]
    one_slice = sitk.ReadImage(str(img))[:, :, 3:4]
    assert one_slice.GetDimension() == 3 and one_slice.GetSize() == (48, 48, 1)
    sitk.WriteImage(one_slice, str(img.parent / "thin_0000.nii.gz"))
    _fail(r"thin_0000\.nii\.gz: is a 3D image with a single slice \(size x, y, z = 48, 48, 1\), which nnU-Net reads "
          r"as 2D, but the labelled images of this dataset \(imagesTr\) are 3D")


def test_overwrite_help_says_that_files_put_into_the_folder_are_deleted(monkeypatch, capsys):
    from nnunetv2_skcdf.preprocessing.unlabeled import preprocess_unlabeled_entry

    monkeypatch.setattr(sys, "argv", ["skcdf_preprocess_unlabeled", "--help"])
    with pytest.raises(SystemExit) as e:
        preprocess_unlabeled_entry()
    assert e.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert ("replaces <data_identifier>_unlabeled/ as a whole, only when every case succeeded: files and folders you "
            "put into <data_identifier>_unlabeled/ yourself are deleted") in text


def _add_tiny_configuration():
    from nnunetv2_skcdf.experiment_planning.cpu_configuration import add_cpu_configuration

    add_cpu_configuration(DATASET_ID, name="3d_tiny", patch_size=[8, 32, 32], n_stages=3, base_features=8,
                          max_features=32)  # inherits 3d_fullres and its data_identifier


def test_configurations_sharing_a_data_folder_are_preprocessed_once(phantom_workspace, monkeypatch):
    """'-c 3d_fullres 3d_cpu --overwrite' preprocessed the shared folder twice."""
    from nnunetv2_skcdf.preprocessing import unlabeled

    _add_tiny_configuration()
    real, calls = unlabeled.preprocess_and_save_case, []
    monkeypatch.setattr(unlabeled, "preprocess_and_save_case", lambda *args: calls.append(args[0]) or real(*args))
    out = preprocess_unlabeled(DATASET_ID, ["3d_fullres", "3d_tiny"], num_processes=1, overwrite=True, verbose=False)
    assert out["3d_fullres"] == out["3d_tiny"] and out["3d_tiny"].endswith("nnUNetPlans_3d_fullres_unlabeled")
    assert sorted(calls) == _output_cases(phantom_workspace)  # each case once, not once per configuration


def test_configurations_sharing_a_data_folder_but_preprocessing_differently_are_refused(phantom_workspace):
    _add_tiny_configuration()
    plans_file = phantom_workspace["preprocessed"] / "nnUNetPlans.json"
    plans = json.loads(plans_file.read_text())
    plans["configurations"]["3d_tiny"]["normalization_schemes"] = ["ZScoreNormalization"]
    plans_file.write_text(json.dumps(plans))
    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    before = _tree(folder)
    with pytest.raises(SKCDFInputError, match=(
            rf"Configurations '3d_fullres' and '3d_tiny' of {re.escape(str(plans_file))} share the data folder "
            rf"nnUNetPlans_3d_fullres \(and so nnUNetPlans_3d_fullres_unlabeled/\) but preprocess differently "
            rf"\(normalization_schemes \['CTNormalization'\] -> \['ZScoreNormalization'\]\)\. .*give one of them its "
            rf"own data_identifier")):
        preprocess_unlabeled(DATASET_ID, ["3d_fullres", "3d_tiny"], num_processes=1, overwrite=True, verbose=False)
    assert _tree(folder) == before
