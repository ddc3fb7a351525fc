"""Tests of ``skcdf_convert_amos`` on a tiny fake AMOS 2022 tree (real layout and dataset.json format)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_skcdf.dataset_conversion.convert_amos import CT_MAX_ID, MIXED_CHANNEL_NAME, convert_amos
from nnunetv2_skcdf.splits.published_lists import read_published_lists
from nnunetv2_skcdf.splits.semi_supervised_splits import compute_semi_supervised_splits
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError, list_unlabeled_cases

SHARED_SPLITS = Path(__file__).resolve().parents[1].parent / "shared" / "splits"
#: AMOS's own dataset.json label names (typos included: nnU-Net keeps them too)
AMOS_LABELS = {
    "0": "background", "1": "spleen", "2": "right kidney", "3": "left kidney", "4": "gall bladder",
    "5": "esophagus", "6": "liver", "7": "stomach", "8": "arota", "9": "postcava", "10": "pancreas",
    "11": "right adrenal gland", "12": "left adrenal gland", "13": "duodenum", "14": "bladder",
    "15": "prostate/uterus",
}
TRAINING = ["amos_0001", "amos_0004", "amos_0005", "amos_0507"]  # 0507: MRI
VALIDATION = ["amos_0008", "amos_0013", "amos_0540"]  # 0540: MRI
TEST = ["amos_0002", "amos_0550"]  # no labels; 0550: MRI
SHAPE = (8, 16, 16)  # z, y, x
SPACING = (0.7, 0.7, 5.0)  # x, y, z mm


def write_volume(path: Path, array: np.ndarray, spacing=SPACING) -> None:
    img = sitk.GetImageFromArray(array)
    img.SetSpacing(spacing)
    img.SetOrigin((10.0, -20.0, 30.0))
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(path), True)


def fake_label(case: str) -> np.ndarray:
    return np.random.default_rng(int(case[-4:])).integers(0, 16, SHAPE).astype(np.uint8)


def make_amos(folder: Path) -> Path:
    """dataset.json + imagesTr/labelsTr + imagesVa/labelsVa + imagesTs, as in amos22.zip."""
    entries: Dict[str, List[dict]] = {"training": [], "validation": [], "test": []}
    for key, cases, tag in (("training", TRAINING, "Tr"), ("validation", VALIDATION, "Va"), ("test", TEST, "Ts")):
        for case in cases:
            image = np.random.default_rng(int(case[-4:])).integers(-1000, 1000, SHAPE).astype(np.int16)
            write_volume(folder / f"images{tag}" / f"{case}.nii.gz", image)
            entry = {"image": f"./images{tag}/{case}.nii.gz"}
            if key != "test":
                write_volume(folder / f"labels{tag}" / f"{case}.nii.gz", fake_label(case))
                entry["label"] = f"./labels{tag}/{case}.nii.gz"
            entries[key].append(entry)
    dataset_json = {"name": "AMOS", "modality": {"0": "CT"}, "labels": AMOS_LABELS,
                    "numTraining": len(TRAINING), "numValidation": len(VALIDATION), "numTest": len(TEST), **entries}
    (folder / "dataset.json").write_text(json.dumps(dataset_json, indent=2))
    return folder


def listing(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def images(cases: Sequence[str]) -> List[str]:
    return [f"{c}_0000.nii.gz" for c in cases]


def labels(cases: Sequence[str]) -> List[str]:
    return [f"{c}.nii.gz" for c in cases]


@pytest.fixture(scope="module")
def amos_tree(tmp_path_factory) -> Path:
    return make_amos(tmp_path_factory.mktemp("amos") / "amos22")


@pytest.fixture
def private_tree(tmp_path) -> Path:
    return make_amos(tmp_path / "amos22")


def run(source: Path, root: Path, **kwargs) -> Path:
    kwargs.setdefault("verify", False)
    return Path(convert_amos(str(source), 9, output_root=str(root), progress=False, **kwargs))


# ------------------------------------------------------------------------------------------------
# the converted dataset
# ------------------------------------------------------------------------------------------------
def test_default_ct_only_validation_to_imagests(amos_tree, tmp_path, capsys):
    out = run(amos_tree.parent, tmp_path, verify=True)  # parent: amos22/ is found; nnU-Net's check passes
    assert out.name == "Dataset009_AMOS" and listing(tmp_path) == ["Dataset009_AMOS"]
    ct_train, ct_val = ["amos_0001", "amos_0004", "amos_0005"], ["amos_0008", "amos_0013"]
    assert listing(out / "imagesTr") == images(ct_train) and listing(out / "labelsTr") == labels(ct_train)
    assert listing(out / "imagesTs") == images(ct_val) and listing(out / "labelsTs") == labels(ct_val)
    assert not (out / "imagesUnlabeled").exists()
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": "CT"}
    assert dataset_json["labels"] == {name: int(k) for k, name in AMOS_LABELS.items()}
    assert len(dataset_json["labels"]) == 16 and dataset_json["labels"]["prostate/uterus"] == 15
    assert dataset_json["numTraining"] == 3 and dataset_json["numTest"] == 2 and dataset_json["file_ending"] == ".nii.gz"
    assert dataset_json["excluded_mri_cases"] == ["amos_0507", "amos_0540"]
    assert (out / "imagesTr" / "amos_0004_0000.nii.gz").read_bytes() == \
        (amos_tree / "imagesTr" / "amos_0004.nii.gz").read_bytes()
    label = sitk.ReadImage(str(out / "labelsTs" / "amos_0013.nii.gz"))
    assert label.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(sitk.GetArrayFromImage(label), fake_label("amos_0013"))
    text = capsys.readouterr().out
    assert "excluded 2 MRI case(s) (ids > 500" in text and "amos_0507, amos_0540" in text
    assert "not converted: 2 AMOS 'test' case(s)" in text and "verify_dataset_integrity Done" in text


def test_keep_mri(amos_tree, tmp_path):
    out = run(amos_tree, tmp_path, keep_mri=True)
    assert listing(out / "imagesTr") == images(TRAINING) and listing(out / "imagesTs") == images(VALIDATION)
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert dataset_json["channel_names"] == {"0": MIXED_CHANNEL_NAME}  # not "CT": no CT window on MRI
    assert dataset_json["numTraining"] == 4 and dataset_json["excluded_mri_cases"] == []


@pytest.mark.parametrize("validation_to", ["imagesTr", "skip"])
def test_validation_to(amos_tree, tmp_path, validation_to, capsys):
    out = run(amos_tree, tmp_path, validation_to=validation_to)
    ct_train = ["amos_0001", "amos_0004", "amos_0005"] + (["amos_0008", "amos_0013"] if validation_to == "imagesTr"
                                                          else [])
    assert listing(out / "imagesTr") == images(ct_train) and listing(out / "labelsTr") == labels(ct_train)
    assert not (out / "imagesTs").exists() and not (out / "labelsTs").exists()
    assert json.loads((out / "dataset.json").read_text())["numTraining"] == len(ct_train)
    if validation_to == "skip":
        assert "not converted: 3 AMOS 'validation' case(s)" in capsys.readouterr().out


def test_test_images_to_unlabeled(amos_tree, tmp_path):
    out = run(amos_tree, tmp_path, test_images_to="imagesUnlabeled")
    dataset_json = json.loads((out / "dataset.json").read_text())
    assert list(list_unlabeled_cases(str(out), dataset_json)) == ["amos_0002"]  # amos_0550 is MRI


# ------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing written
# ------------------------------------------------------------------------------------------------
def assert_nothing_written(root: Path) -> None:
    assert listing(root) == []  # neither the dataset nor its temporary folder


def test_missing_label_and_missing_image(private_tree, tmp_path):
    (private_tree / "labelsTr" / "amos_0004.nii.gz").unlink()
    (private_tree / "imagesVa" / "amos_0013.nii.gz").unlink()
    with pytest.raises(SKCDFInputError) as e:
        run(private_tree, tmp_path / "raw")
    msg = str(e.value)
    assert "case amos_0004: label labelsTr/amos_0004.nii.gz is missing" in msg
    assert "case amos_0013: image imagesVa/amos_0013.nii.gz is missing" in msg and "Restore them" in msg
    assert_nothing_written(tmp_path / "raw")


def test_missing_mri_files_do_not_matter_without_keep_mri(private_tree, tmp_path):
    (private_tree / "imagesTr" / "amos_0507.nii.gz").unlink()
    run(private_tree, tmp_path / "raw")
    with pytest.raises(SKCDFInputError, match="amos_0507"):
        run(private_tree, tmp_path / "raw", keep_mri=True, overwrite=True)


def test_no_validation_labels(private_tree, tmp_path):
    shutil.rmtree(private_tree / "labelsVa")
    with pytest.raises(SKCDFInputError, match="labelsVa does not exist.*--validation-to skip"):
        run(private_tree, tmp_path / "raw")
    assert listing(run(private_tree, tmp_path / "raw", validation_to="skip") / "imagesTr") == \
        images(["amos_0001", "amos_0004", "amos_0005"])


def test_label_out_of_range_and_geometry_mismatch(private_tree, tmp_path):
    bad = fake_label("amos_0005")
    bad[0, 0, 0] = 16
    write_volume(private_tree / "labelsTr" / "amos_0005.nii.gz", bad)
    write_volume(private_tree / "labelsVa" / "amos_0008.nii.gz", fake_label("amos_0008"), spacing=(0.7, 0.7, 2.5))
    with pytest.raises(SKCDFInputError) as e:
        run(private_tree, tmp_path / "raw", num_processes=2)
    msg = str(e.value)
    assert "2 case(s) cannot be converted" in msg
    assert "case amos_0005: label" in msg and "values 16 outside 0..15" in msg
    assert "case amos_0008: image" in msg and "do not match: spacing" in msg
    assert_nothing_written(tmp_path / "raw")


def test_wrong_layout_lists_expectations(tmp_path):
    (tmp_path / "src" / "imagesTr").mkdir(parents=True)
    with pytest.raises(SKCDFInputError) as e:
        run(tmp_path / "src", tmp_path / "raw")
    msg = str(e.value)
    for expected in ("does not look like the AMOS 2022 data", "dataset.json", "labelsTr", "imagesVa",
                     "Found in", "zenodo"):
        assert expected in msg


def test_bad_dataset_json_labels(private_tree, tmp_path):
    dataset_json = json.loads((private_tree / "dataset.json").read_text())
    dataset_json["labels"].pop("7")
    (private_tree / "dataset.json").write_text(json.dumps(dataset_json))
    with pytest.raises(SKCDFInputError, match="without gaps"):
        run(private_tree, tmp_path / "raw")


def test_existing_target_and_overwrite(amos_tree, tmp_path):
    out = run(amos_tree, tmp_path)
    (out / "marker.txt").write_text("old")
    with pytest.raises(SKCDFInputError, match="already exists. Pass --overwrite"):
        run(amos_tree, tmp_path)
    assert run(amos_tree, tmp_path, overwrite=True) == out and not (out / "marker.txt").exists()
    assert listing(tmp_path) == ["Dataset009_AMOS"]


def test_cli(amos_tree, tmp_path):
    env = {**os.environ, "nnUNet_raw": str(tmp_path / "raw")}
    bad = subprocess.run(["skcdf_convert_amos", str(tmp_path), "-d", "9"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("ERROR:") and "Traceback" not in bad.stderr
    ok = subprocess.run(["skcdf_convert_amos", str(amos_tree), "-d", "9", "--keep-mri", "--validation-to", "imagesTr",
                         "--no-verify", "--no-progress"], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "imagesTr/labelsTr: 7 case(s), 2 of them MRI" in ok.stdout
    assert len(listing(tmp_path / "raw" / "Dataset009_AMOS" / "imagesTr")) == 7


# ------------------------------------------------------------------------------------------------
# the published DHC/SKCDF lists (facts the --help epilog and example_commands.md state)
# ------------------------------------------------------------------------------------------------
@pytest.fixture
def amos_lists() -> Path:
    folder = SHARED_SPLITS / "amos"
    if not folder.is_dir():
        pytest.skip(f"published split lists not found at {folder}")
    return folder


def _ids(path: Path) -> List[str]:
    return path.read_text().split()


def test_published_lists_mri_counts(amos_lists):
    n_mri = {f.stem: sum(int(i[-4:]) > CT_MAX_ID for i in _ids(f)) for f in amos_lists.glob("*.txt")}
    assert {k: n_mri[k] for k in ("train", "eval", "test", "labeled_2p", "labeled_5p", "labeled_10p",
                                  "labeled_20p")} == dict(train=34, eval=6, test=20, labeled_2p=0, labeled_5p=3,
                                                          labeled_10p=5, labeled_20p=6)
    sizes = {k: len(_ids(amos_lists / f"{k}.txt")) for k in ("train", "eval", "test")}
    assert sizes == dict(train=216, eval=24, test=120)  # 240 = AMOS imagesTr, 120 = AMOS imagesVa


def test_published_2p_imports_with_mri_and_without_drop_overlaps(amos_lists):
    everything = sorted(set(_ids(amos_lists / "train.txt")) | set(_ids(amos_lists / "eval.txt")))
    lists = read_published_lists(str(amos_lists), "2p")
    fold = compute_semi_supervised_splits(everything, imported=lists, folds=3).folds[0]
    assert (len(fold["train"]), len(fold["val"]), len(fold["unlabeled"])) == (4, 24, 212)
    # a CT-only dataset cannot hold the published lists: their MRI ids have no case
    ct_only = [i for i in everything if int(i[-4:]) <= CT_MAX_ID]
    with pytest.raises(SKCDFInputError, match="match no case"):
        compute_semi_supervised_splits(ct_only, imported=lists)
    # the 20 % lists overlap eval.txt: those need --drop-overlaps-from
    with pytest.raises(SKCDFInputError):
        compute_semi_supervised_splits(everything, imported=read_published_lists(str(amos_lists), "20p"))
