"""Tests of ``skcdf_convert_synapse`` on tiny fake BTCV trees (real layout, 8x16x16 voxels, anisotropic)."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Dict, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_skcdf.dataset_conversion.convert_synapse import (
    BTCV_LABELS,
    PUBLISHED_TEST_IDS,
    btcv_label_mapping,
    convert_synapse,
    convert_synapse_entry,
)
from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES, synapse_labels_dict
from nnunetv2_skcdf.splits.published_lists import read_published_lists
from nnunetv2_skcdf.splits.semi_supervised_splits import compute_semi_supervised_splits, make_semi_supervised_splits
from nnunetv2_skcdf.utilities.dataset_files import (SKCDFInputError, SKCDFWriteError, load_dataset_json,
                                                    training_case_ids)

SHARED_SPLITS = Path(__file__).resolve().parents[1].parent / "shared" / "splits"
BTCV_IDS = [f"{i:04d}" for i in list(range(1, 11)) + list(range(21, 41))]  # the 30 labelled BTCV cases
SHAPE = (8, 16, 16)  # z, y, x
SPACING = (0.8, 0.8, 3.0)  # x, y, z mm (SimpleITK order)
ORIGIN = (-6.0, 4.0, 12.5)


def write_volume(path: Path, array: np.ndarray, spacing=SPACING, origin=ORIGIN) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin(origin)
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def fake_label(seed: int, dtype=np.uint8) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 14, SHAPE).astype(dtype)


def make_btcv(folder: Path, ids: Sequence[str] = BTCV_IDS, label_dtype=np.uint8) -> Path:
    """``folder/img/imgXXXX.nii.gz`` (int16 CT) + ``folder/label/labelXXXX.nii.gz``."""
    for k, case in enumerate(ids):
        image = np.random.default_rng(k).integers(-1000, 1500, SHAPE).astype(np.int16)
        write_volume(folder / "img" / f"img{case}.nii.gz", image)
        write_volume(folder / "label" / f"label{case}.nii.gz", fake_label(k, label_dtype))
    return folder


def listing(folder: Path) -> list:
    return sorted(p.name for p in folder.iterdir())


def leftovers(root: Path) -> list:
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


@pytest.fixture(scope="module")
def full_tree(tmp_path_factory) -> Path:
    """All 30 BTCV ids in the archive's own layout Abdomen/RawData/Training/{img,label}."""
    source = tmp_path_factory.mktemp("btcv") / "Abdomen"
    make_btcv(source / "RawData" / "Training")
    return source


@pytest.fixture(scope="module")
def converted(full_tree, tmp_path_factory) -> Dict[str, object]:
    """The full tree converted once, test cases to imagesTs, with nnU-Net's integrity check."""
    root = tmp_path_factory.mktemp("raw")
    out = convert_synapse(str(full_tree), 8, test_to_imagests=True, output_root=str(root), progress=False)
    return {"root": root, "raw": Path(out)}


# ------------------------------------------------------------------------------------------------
# labels and the converted dataset
# ------------------------------------------------------------------------------------------------
def test_btcv_label_values_are_the_labels_py_classes():
    assert btcv_label_mapping() == {i: i for i in range(1, 14)}
    assert [(v, ours) for v, _, ours in BTCV_LABELS] == [(i, name) for i, name, _ in SYNAPSE_CLASSES]
    assert BTCV_LABELS[9][1] == "portal vein and splenic vein" and BTCV_LABELS[8][2] == "inferior_vena_cava"


def test_full_conversion_names_ids_and_test_split(converted, full_tree, capsys):
    raw: Path = converted["raw"]
    assert raw.name == "Dataset008_Synapse" and leftovers(converted["root"]) == ["Dataset008_Synapse"]
    train = [c for c in BTCV_IDS if c not in PUBLISHED_TEST_IDS]
    assert listing(raw / "imagesTr") == [f"{c}_0000.nii.gz" for c in train]
    assert listing(raw / "labelsTr") == [f"{c}.nii.gz" for c in train]
    assert listing(raw / "imagesTs") == [f"{c}_0000.nii.gz" for c in PUBLISHED_TEST_IDS]
    assert listing(raw / "labelsTs") == [f"{c}.nii.gz" for c in PUBLISHED_TEST_IDS]
    src = full_tree / "RawData" / "Training"
    # images copied byte for byte, labels unchanged (uint8 already)
    assert (raw / "imagesTr" / "0021_0000.nii.gz").read_bytes() == (src / "img" / "img0021.nii.gz").read_bytes()
    label = sitk.ReadImage(str(raw / "labelsTs" / "0008.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8 and label.GetSpacing() == pytest.approx(SPACING)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), fake_label(BTCV_IDS.index("0008")))


def test_dataset_json(converted):
    dataset_json = json.loads((converted["raw"] / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["labels"] == synapse_labels_dict() and len(dataset_json["labels"]) == 14
    assert dataset_json["numTraining"] == 24 and dataset_json["numTest"] == 6
    assert dataset_json["file_ending"] == ".nii.gz"


def test_published_lists_import_without_id_template(converted, tmp_path, monkeypatch):
    lists_dir = SHARED_SPLITS / "synapse"
    if not lists_dir.is_dir():
        pytest.skip(f"published split lists not found at {lists_dir}")
    raw: Path = converted["raw"]
    training = training_case_ids(str(raw), load_dataset_json(str(raw)))
    result = compute_semi_supervised_splits(training, imported=read_published_lists(str(lists_dir), "20p"), folds=3)
    fold = result.folds[0]
    assert fold["train"] == ["0021", "0023", "0028", "0032"]
    assert fold["val"] == ["0035", "0036", "0038", "0040"] and len(fold["unlabeled"]) == 16
    assert not set().union(*map(set, fold.values())) & set(PUBLISHED_TEST_IDS)
    # the file-writing path skcdf_split takes, with nnU-Net's env vars pointing at this dataset
    monkeypatch.setenv("nnUNet_raw", str(converted["root"]))
    monkeypatch.setenv("nnUNet_preprocessed", str(tmp_path))
    folds = make_semi_supervised_splits(8, import_lists=str(lists_dir), ratio="20p", folds=3)
    assert folds == result.folds and (tmp_path / "Dataset008_Synapse" / "splits_final.json").is_file()


# ------------------------------------------------------------------------------------------------
# layouts, options
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", ["", "Training"])
def test_other_layouts_and_no_test_split(tmp_path, layout, capsys):
    source = tmp_path / "src"
    make_btcv(source / layout if layout else source, ["0001", "0002", "0008"], label_dtype=np.int16)
    out = Path(convert_synapse(str(source), 9, name="Syn", output_root=str(tmp_path / "raw"), verify=False,
                               progress=False))
    assert listing(out / "imagesTr") == ["0001_0000.nii.gz", "0002_0000.nii.gz", "0008_0000.nii.gz"]
    assert not (out / "imagesTs").exists()
    label = sitk.ReadImage(str(out / "labelsTr" / "0002.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8  # int16 source cast to uint8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), fake_label(1))
    expected = "img/ + label/" if not layout else "Training/img/ + Training/label/"
    assert f"Source layout: {expected}" in capsys.readouterr().out


def test_own_test_list_and_parallel(tmp_path):
    source = make_btcv(tmp_path / "src", ["0001", "0002", "0003", "0004"])
    out = Path(convert_synapse(str(source), 9, test_to_imagests=True, test_ids=["3", "img0004"], num_processes=2,
                               output_root=str(tmp_path / "raw"), verify=False, progress=False))
    assert listing(out / "imagesTs") == ["0003_0000.nii.gz", "0004_0000.nii.gz"]
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == 2


def test_published_test_ids_missing_from_source(tmp_path):
    source = make_btcv(tmp_path / "src", ["0001", "0002"])
    with pytest.raises(SKCDFInputError, match=r"0008, 0027.*--test-list"):
        convert_synapse(str(source), 9, test_to_imagests=True, output_root=str(tmp_path / "raw"), progress=False)
    assert leftovers(tmp_path / "raw") == []


# ------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written
# ------------------------------------------------------------------------------------------------
def _convert_small(tmp_path: Path, **kwargs) -> str:
    return convert_synapse(str(tmp_path / "src"), 9, output_root=str(tmp_path / "raw"), verify=False,
                           progress=False, **kwargs)


def test_missing_label_and_missing_image(tmp_path):
    source = make_btcv(tmp_path / "src", ["0001", "0002", "0003"])
    (source / "label" / "label0002.nii.gz").unlink()
    (source / "img" / "img0003.nii.gz").unlink()
    with pytest.raises(SKCDFInputError) as e:
        _convert_small(tmp_path)
    msg = str(e.value)
    assert "case 0002" in msg and "img0002.nii.gz has no label" in msg
    assert "case 0003" in msg and "label0003.nii.gz has no image" in msg and "Add the missing file" in msg
    assert leftovers(tmp_path / "raw") == []


def test_label_out_of_range_leaves_nothing(tmp_path):
    source = make_btcv(tmp_path / "src", ["0001", "0002"])
    bad = fake_label(1)
    bad[0, 0, :2] = (14, 200)
    write_volume(source / "label" / "label0002.nii.gz", bad)
    with pytest.raises(SKCDFInputError) as e:
        _convert_small(tmp_path)
    msg = str(e.value)
    assert "case 0002" in msg and "label0002.nii.gz" in msg and "14, 200 outside 0..13" in msg
    assert "case 0001" not in msg
    assert leftovers(tmp_path / "raw") == []  # neither the dataset nor its temporary folder


@pytest.mark.parametrize("change, expected", [
    (dict(spacing=(0.8, 0.8, 2.0)), "spacing"),
    (dict(origin=(-6.0, 4.0, 40.0)), "origin"),
    (dict(shape=(8, 16, 15)), "size"),
])
def test_geometry_mismatch(tmp_path, change, expected):
    source = make_btcv(tmp_path / "src", ["0001", "0002"])
    shape = change.pop("shape", SHAPE)
    write_volume(source / "label" / "label0001.nii.gz", np.zeros(shape, np.uint8), **change)
    with pytest.raises(SKCDFInputError, match=rf"case 0001: image .*img0001.nii.gz and label .* do not match: "
                                              rf"{expected}"):
        _convert_small(tmp_path)
    assert leftovers(tmp_path / "raw") == []


def test_geometry_noise_is_harmonised(tmp_path):
    source = make_btcv(tmp_path / "src", ["0001"])
    write_volume(source / "label" / "label0001.nii.gz", fake_label(0), origin=(-6.0, 4.0, 12.5 + 5e-4))
    out = Path(_convert_small(tmp_path))
    assert sitk.ReadImage(str(out / "labelsTr" / "0001.nii.gz")).GetOrigin() == pytest.approx(ORIGIN, abs=1e-9)


def test_wrong_layout_lists_expectations(tmp_path):
    (tmp_path / "src" / "images").mkdir(parents=True)
    with pytest.raises(SKCDFInputError) as e:
        _convert_small(tmp_path)
    msg = str(e.value)
    assert "does not look like the BTCV" in msg and "Found in" in msg and "images" in msg
    for layout in ("img/img0001.nii.gz", "Training/img/img0001.nii.gz", "RawData/Training/label/label0001.nii.gz"):
        assert layout in msg


def test_a_full_disk_is_named_with_the_file_and_leaves_the_old_dataset(tmp_path, monkeypatch):
    """A write that fails (full disk) names the file, the OS error and the free space (it was a bare OSError
    traceback); with --overwrite the old dataset stays as it was, and no temporary folder is left."""
    import errno

    import nnunetv2_skcdf.dataset_conversion.conversion_common as CC

    make_btcv(tmp_path / "src", ["0001", "0002"])
    out = Path(_convert_small(tmp_path))
    before = {p.name: p.read_bytes() for p in (out / "imagesTr").iterdir()}
    copy = CC.shutil.copyfile

    def full(src, dst, *a, **k):
        if "img0002" in str(src):  # as shutil's copy loop reports it: both files named, the source first
            raise OSError(errno.ENOSPC, "No space left on device", str(src), None, str(dst))
        return copy(src, dst, *a, **k)

    monkeypatch.setattr(CC.shutil, "copyfile", full)
    with pytest.raises(SKCDFWriteError, match=r"0002_0000.nii.gz: cannot be written, out of disk space \(OSError: "
                                              r"\[Errno 28\] No space left on device.*free on its disk"):
        _convert_small(tmp_path, overwrite=True)
    assert {p.name: p.read_bytes() for p in (out / "imagesTr").iterdir()} == before
    assert leftovers(tmp_path / "raw") == ["Dataset009_Synapse"]


def test_existing_target_and_overwrite(tmp_path):
    make_btcv(tmp_path / "src", ["0001"])
    out = Path(_convert_small(tmp_path))
    (out / "marker.txt").write_text("old")
    with pytest.raises(SKCDFInputError, match="already exists. Pass --overwrite"):
        _convert_small(tmp_path)
    assert (out / "marker.txt").exists()
    assert _convert_small(tmp_path, overwrite=True) == str(out)
    assert not (out / "marker.txt").exists() and leftovers(tmp_path / "raw") == ["Dataset009_Synapse"]


def test_cli_error_exit_status_and_help(tmp_path):
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw")}
    bad = subprocess.run(["skcdf_convert_synapse", str(tmp_path / "nowhere"), "-d", "8"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("ERROR:") and "does not exist" in bad.stderr
    assert "Traceback" not in bad.stderr
    help_text = subprocess.run(["skcdf_convert_synapse", "--help"], capture_output=True, text=True).stdout
    for flag in ("--test-to-imagesTs", "--test-list", "-np", "--overwrite", "--no-verify", " ".join(PUBLISHED_TEST_IDS)):
        assert flag in help_text


def test_entry_with_test_list_file(tmp_path, capsys):
    make_btcv(tmp_path / "src", ["0001", "0002"])
    (tmp_path / "test.txt").write_text("0002\n")
    convert_synapse_entry([str(tmp_path / "src"), "-d", "9", "--test-to-imagesTs", "--test-list",
                           str(tmp_path / "test.txt"), "-o", str(tmp_path / "raw"), "--no-verify", "--no-progress"])
    out = capsys.readouterr().out
    assert "imagesTs/labelsTs: 1 test case(s): 0002" in out
    with pytest.raises(SystemExit) as e:
        convert_synapse_entry([str(tmp_path / "src"), "-d", "9", "--test-list", str(tmp_path / "test.txt"),
                               "-o", str(tmp_path / "raw2")])
    assert e.value.code == 2 and "--test-to-imagesTs" in capsys.readouterr().err
