"""Tests of the synthetic abdominal CT generator (nnunetv2_skcdf.dataset_conversion.phantom)."""
from __future__ import annotations

import filecmp
import json
import os
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_erosion, gaussian_filter

from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE8, SYNAPSE_CLASSES, synapse_labels_dict
from nnunetv2_skcdf.dataset_conversion.phantom import (
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    case_rng,
    generate_case,
    make_phantom_dataset,
    resolve_organs,
)
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

ID = {name: label_id for label_id, name, _ in SYNAPSE_CLASSES}
TINY = dict(shape=(24, 48, 48), spacing=(10.0, 7.2, 7.2))  # same anatomy, 8x fewer voxels
N_DEFAULT_CASES = 6


@pytest.fixture(scope="module")
def default_cases():
    """A few cases at the default shape/spacing: [(image_hu, label), ...]."""
    return [generate_case(case_rng(0, "tr", i)) for i in range(N_DEFAULT_CASES)]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("raw"))
    folder = make_phantom_dataset(root, 951, "Tiny", num_train=2, num_test=1, num_unlabeled=2, seed=3,
                                  progress=False, **TINY)
    return root, folder


def centroid_mm(label: np.ndarray, label_id: int, spacing=DEFAULT_SPACING) -> np.ndarray:
    """(x, y, z) centroid in mm (x -> patient left, y -> posterior, z -> superior)."""
    idx = np.argwhere(label == label_id).mean(0)  # (z, y, x) voxel indices
    return (idx * np.asarray(spacing))[::-1]


# ----------------------------------------------------------------------------------------------
# labels.py
# ----------------------------------------------------------------------------------------------
def test_synapse_classes():
    assert [c[0] for c in SYNAPSE_CLASSES] == list(range(1, 14))
    assert [c[1] for c in SYNAPSE_CLASSES][:6] == ["spleen", "right_kidney", "left_kidney", "gallbladder",
                                                    "esophagus", "liver"]
    assert [c[2] for c in SYNAPSE_CLASSES] == ["Sp", "RK", "LK", "Ga", "Es", "Li", "St", "Ao", "IVC", "PSV",
                                                "Pa", "RAG", "LAG"]
    labels = synapse_labels_dict()
    assert labels["background"] == 0 and labels["left_adrenal_gland"] == 13
    assert sorted(labels.values()) == list(range(14))


# ----------------------------------------------------------------------------------------------
# generate_case: arrays
# ----------------------------------------------------------------------------------------------
def test_case_arrays_and_determinism(default_cases):
    image, label = default_cases[0]
    assert image.shape == label.shape == DEFAULT_SHAPE
    assert image.dtype == np.int16 and label.dtype == np.uint8
    again = generate_case(case_rng(0, "tr", 0))
    assert np.array_equal(again[0], image) and np.array_equal(again[1], label)
    other_seed = generate_case(case_rng(1, "tr", 0))
    assert not np.array_equal(other_seed[1], label) and not np.array_equal(other_seed[0], image)
    other_role = generate_case(case_rng(0, "un", 0))
    assert not np.array_equal(other_role[1], label)


def test_every_organ_present_with_enough_voxels(default_cases):
    for _image, label in default_cases:
        assert set(np.unique(label).tolist()) == set(range(14))
        counts = np.bincount(label.ravel(), minlength=14)
        assert counts[1:].min() >= 30, counts


def test_class_imbalance(default_cases):
    for _image, label in default_cases:
        c = np.bincount(label.ravel(), minlength=14)
        assert c[ID["liver"]] == c[1:].max()
        for adrenal in ("right_adrenal_gland", "left_adrenal_gland"):
            assert c[ID["liver"]] >= 100 * c[ID[adrenal]], c
        small = max(c[ID["esophagus"]], c[ID["right_adrenal_gland"]], c[ID["left_adrenal_gland"]])
        for big in ("stomach", "spleen", "right_kidney", "left_kidney"):
            assert c[ID[big]] > small
        assert min(c[ID["right_adrenal_gland"]], c[ID["left_adrenal_gland"]]) < c[ID["pancreas"]]


def test_relative_positions(default_cases):
    for image, label in default_cases:
        cen = {name: centroid_mm(label, i) for name, i in ID.items()}
        x, y, z = 0, 1, 2
        assert cen["liver"][x] < cen["spleen"][x]  # liver on the patient's right (low x)
        assert cen["inferior_vena_cava"][x] < cen["aorta"][x]
        assert cen["stomach"][x] > cen["liver"][x] and cen["stomach"][y] < cen["spleen"][y]
        for kidney in ("right_kidney", "left_kidney"):
            assert cen[kidney][y] > cen["aorta"][y]  # kidneys posterior to the aorta
        assert cen["right_kidney"][x] < cen["left_kidney"][x]
        assert cen["right_kidney"][z] < cen["left_kidney"][z]  # right kidney lower
        gb = cen["gallbladder"]
        assert gb[y] < min(cen["liver"][y], cen["aorta"][y], cen["right_kidney"][y])  # anterior
        assert gb[x] < cen["aorta"][x]
        assert cen["pancreas"][y] < cen["aorta"][y]
        midline = (cen["right_kidney"][x] + cen["left_kidney"][x]) / 2
        for side in ("right", "left"):
            adrenal, kidney = cen[f"{side}_adrenal_gland"], cen[f"{side}_kidney"]
            assert adrenal[z] > kidney[z]  # superior
            assert abs(adrenal[x] - midline) < abs(kidney[x] - midline)  # medial
        es_slices = np.nonzero(label == ID["esophagus"])[0]
        assert es_slices.min() >= label.shape[0] // 2  # only in the upper (superior) half
        _assert_aorta_anterior_to_spine(image, label)


def _assert_aorta_anterior_to_spine(image: np.ndarray, label: np.ndarray) -> None:
    """Around the aorta's mid slice, bone within 20 mm of the aorta's x lies posterior to the aorta."""
    smooth = gaussian_filter(image.astype(np.float32), (0, 1, 1))  # suppress noise, keep bone > 250 HU
    zs, ys, xs = np.nonzero(label == ID["aorta"])
    offsets = []
    for z in range(int(np.median(zs)) - 4, int(np.median(zs)) + 5):
        ax, ay = xs[zs == z].mean(), ys[zs == z].mean()
        band = slice(max(int(ax - 20 / DEFAULT_SPACING[2]), 0), int(ax + 20 / DEFAULT_SPACING[2]) + 1)
        offsets.extend(np.nonzero(smooth[z][:, band] > 250)[0] - ay)
    assert len(offsets) > 50
    assert np.percentile(offsets, 2) > 0  # the vertebral bodies are behind (higher y than) the aorta


def test_intensities_overlap_and_order(default_cases):
    for image, label in default_cases:
        def interior(name):
            return image[binary_erosion(label == ID[name])].astype(float)

        liver, spleen, kidney, pancreas = (interior(n) for n in ("liver", "spleen", "left_kidney", "pancreas"))
        gallbladder = image[label == ID["gallbladder"]].astype(float)

        def overlap(a, b):
            return min(np.percentile(a, 95), np.percentile(b, 95)) > max(np.percentile(a, 5), np.percentile(b, 5))

        assert overlap(liver, spleen) and overlap(liver, pancreas)  # not separable by a threshold
        assert kidney.mean() > liver.mean() + 20
        assert gallbladder.mean() < liver.mean() - 40
        assert interior("aorta").mean() > liver.mean()
        corner = image[:, :4, :4].astype(float)  # outside the body: air plus noise
        assert abs(corner.mean() + 1000) < 10 and 5 < corner.std() < 30
        assert image.min() >= -1024 and image.max() > 400  # bone


def test_same_anatomy_at_another_resolution():
    """Anatomy is defined in mm: a grid with half the spacing samples the same label map."""
    for i in range(2):
        _, coarse = generate_case(case_rng(5, "tr", i), (25, 49, 49), (10.0, 7.2, 7.2))
        _, fine = generate_case(case_rng(5, "tr", i), (49, 97, 97), (5.0, 3.6, 3.6))
        assert (coarse == fine[::2, ::2, ::2]).mean() > 0.995


def test_generation_time_per_case():
    generate_case(case_rng(0, "tr", 100))  # warm-up (imports, caches)
    times = []
    for i in range(3):
        t0 = time.perf_counter()
        generate_case(case_rng(0, "tr", 101 + i))
        times.append(time.perf_counter() - t0)
    assert np.median(times) < 1.0, times


# ----------------------------------------------------------------------------------------------
# make_phantom_dataset: files
# ----------------------------------------------------------------------------------------------
def test_dataset_layout_and_json(tiny_dataset):
    root, folder = tiny_dataset
    assert folder == os.path.join(root, "Dataset951_Tiny")
    assert sorted(os.listdir(root)) == ["Dataset951_Tiny"]  # no temporary folders left behind
    listing = {d: sorted(os.listdir(os.path.join(folder, d))) for d in os.listdir(folder) if d != "dataset.json"}
    assert listing == {
        "imagesTr": ["phantom_tr_0000_0000.nii.gz", "phantom_tr_0001_0000.nii.gz"],
        "labelsTr": ["phantom_tr_0000.nii.gz", "phantom_tr_0001.nii.gz"],
        "imagesTs": ["phantom_ts_0000_0000.nii.gz"],
        "labelsTs": ["phantom_ts_0000.nii.gz"],
        "imagesUnlabeled": ["phantom_un_0000_0000.nii.gz", "phantom_un_0001_0000.nii.gz"],
    }
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["channel_names"] == {"0": "CT"}
    assert dj["labels"] == synapse_labels_dict()
    assert dj["numTraining"] == 2 and dj["numTest"] == 1 and dj["numUnlabeled"] == 2
    assert dj["file_ending"] == ".nii.gz"
    assert "description" in dj and dj["phantom_generator"]["seed"] == 3
    assert dj["phantom_generator"]["spacing_zyx_mm"] == list(TINY["spacing"])
    assert dj["phantom_generator"]["shape_zyx_voxels"] == list(TINY["shape"])


def test_dataset_headers(tiny_dataset):
    _, folder = tiny_dataset
    for case, sub in (("phantom_tr_0001", "Tr"), ("phantom_ts_0000", "Ts")):
        img = sitk.ReadImage(os.path.join(folder, f"images{sub}", f"{case}_0000.nii.gz"))
        lab = sitk.ReadImage(os.path.join(folder, f"labels{sub}", f"{case}.nii.gz"))
        assert np.allclose(img.GetSpacing(), TINY["spacing"][::-1])
        for getter in ("GetSpacing", "GetOrigin", "GetDirection", "GetSize"):
            assert np.allclose(getattr(img, getter)(), getattr(lab, getter)())
        assert sitk.GetArrayFromImage(img).dtype == np.int16
        arr = sitk.GetArrayFromImage(lab)
        assert arr.dtype == np.uint8 and arr.shape == TINY["shape"]
        expected = generate_case(case_rng(3, case.split("_")[1], int(case[-4:])), **TINY)
        assert np.array_equal(arr, expected[1]) and np.array_equal(sitk.GetArrayFromImage(img), expected[0])


def test_nnunet_integrity_check(tiny_dataset):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(tiny_dataset[1], num_processes=1)  # raises on any problem


def test_default_spacing_is_anisotropic(tmp_path):
    assert DEFAULT_SPACING[0] > DEFAULT_SPACING[1] == DEFAULT_SPACING[2]
    folder = make_phantom_dataset(str(tmp_path), num_train=1, num_test=0, num_unlabeled=0, progress=False)
    assert os.path.basename(folder) == "Dataset950_SKCDFPhantom"
    img = sitk.ReadImage(os.path.join(folder, "imagesTr", "phantom_tr_0000_0000.nii.gz"))
    assert np.allclose(img.GetSpacing(), DEFAULT_SPACING[::-1])
    assert img.GetSize() == DEFAULT_SHAPE[::-1]


def _files(folder):
    return sorted(os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs)


def test_files_deterministic_and_independent_of_np_and_counts(tmp_path, tiny_dataset):
    root, ref = tiny_dataset
    same = make_phantom_dataset(str(tmp_path / "a"), 951, "Tiny", 2, 1, 2, seed=3, num_processes=2,
                                progress=False, **TINY)
    assert _files(same) == _files(ref)
    for rel in _files(ref):
        assert filecmp.cmp(os.path.join(ref, rel), os.path.join(same, rel), shallow=False), rel
    fewer = make_phantom_dataset(str(tmp_path / "b"), 951, "Tiny", 1, 0, 1, seed=3, progress=False, **TINY)
    for rel in ("imagesTr/phantom_tr_0000_0000.nii.gz", "labelsTr/phantom_tr_0000.nii.gz",
                "imagesUnlabeled/phantom_un_0000_0000.nii.gz"):
        assert filecmp.cmp(os.path.join(ref, rel), os.path.join(fewer, rel), shallow=False), rel
    other = make_phantom_dataset(str(tmp_path / "c"), 951, "Tiny", 1, 0, 0, seed=4, progress=False, **TINY)
    rel = "labelsTr/phantom_tr_0000.nii.gz"
    assert not filecmp.cmp(os.path.join(ref, rel), os.path.join(other, rel), shallow=False)


def test_existing_folder_and_overwrite(tmp_path):
    root = str(tmp_path)
    kwargs = dict(num_train=1, num_test=0, num_unlabeled=0, progress=False, **TINY)
    folder = make_phantom_dataset(root, 952, "Tiny", seed=1, **kwargs)
    marker = os.path.join(folder, "stale_marker.txt")
    open(marker, "w").close()
    with pytest.raises(SKCDFInputError) as err:
        make_phantom_dataset(root, 952, "Tiny", seed=1, **kwargs)
    assert folder in str(err.value) and "--overwrite" in str(err.value)
    with pytest.raises(SKCDFInputError) as err:  # same id, other name
        make_phantom_dataset(root, 952, "Other", seed=1, **kwargs)
    assert "Dataset952_Tiny" in str(err.value)
    old_label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", "phantom_tr_0000.nii.gz")))
    assert make_phantom_dataset(root, 952, "Tiny", seed=2, overwrite=True, **kwargs) == folder
    assert not os.path.exists(marker)
    new_label = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, "labelsTr", "phantom_tr_0000.nii.gz")))
    assert not np.array_equal(old_label, new_label)
    assert sorted(os.listdir(root)) == ["Dataset952_Tiny"]


def test_an_id_taken_in_preprocessed_or_results_is_refused_in_nnunet_raw(tmp_path, monkeypatch):
    """A dataset written into nnUNet_raw whose id another dataset still has in nnUNet_preprocessed or nnUNet_results
    (a deleted dataset's leftovers) is refused before anything is written: nnU-Net's lookup of the id would find
    two names. Another output folder than nnUNet_raw is not looked up by id, so it is not checked."""
    kwargs = dict(num_train=1, num_test=0, num_unlabeled=0, progress=False, **TINY)
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        (tmp_path / var).mkdir()
        monkeypatch.setenv(var, str(tmp_path / var))
    for var in ("nnUNet_results", "nnUNet_preprocessed"):
        (tmp_path / var / "Dataset953_Old").mkdir()
        with pytest.raises(SKCDFInputError, match=rf"Dataset id 953 is already used by .*{var}/Dataset953_Old "
                                                  rf"\({var}\)"):
            make_phantom_dataset(None, 953, "Tiny", **kwargs)
        assert os.listdir(tmp_path / "nnUNet_raw") == []
        (tmp_path / var / "Dataset953_Old").rmdir()
    (tmp_path / "nnUNet_results" / "Dataset953_Tiny").mkdir()  # its own name: a dataset trained before, remade
    assert make_phantom_dataset(None, 953, "Tiny", **kwargs).endswith("Dataset953_Tiny")


def test_bad_options_and_missing_env(tmp_path, monkeypatch):
    with pytest.raises(SKCDFInputError, match="training case"):
        make_phantom_dataset(str(tmp_path), num_train=0, progress=False)
    with pytest.raises(SKCDFInputError, match="shape"):
        make_phantom_dataset(str(tmp_path), shape=(4, 48, 48), progress=False)
    with pytest.raises(SKCDFInputError, match="id"):
        make_phantom_dataset(str(tmp_path), dataset_id=1000, progress=False)
    monkeypatch.delenv("nnUNet_raw", raising=False)
    with pytest.raises(SKCDFInputError, match="nnUNet_raw"):
        make_phantom_dataset(None, progress=False)
    assert os.listdir(tmp_path) == []


def test_resolve_organs_names_abbreviations_sets_and_errors():
    assert resolve_organs(()) == () and resolve_organs(["all"]) == ()
    assert resolve_organs(["synapse8"]) == tuple(sorted(ID[n] for n in SYNAPSE8)) == (1, 2, 3, 4, 6, 7, 8, 11)
    # any order and spelling; label order out; all 13 named one by one is "all"
    assert resolve_organs(["pancreas", "Sp", "lag"]) == (ID["spleen"], ID["pancreas"], ID["left_adrenal_gland"])
    assert resolve_organs([abbr for _, _, abbr in SYNAPSE_CLASSES][::-1]) == ()
    with pytest.raises(SKCDFInputError, match=r"Unknown organ 'kidney'.*right_kidney.*RK.*synapse8"):
        resolve_organs(["kidney"])
    with pytest.raises(SKCDFInputError, match=r"'Sp' is named twice"):
        resolve_organs(["spleen", "Sp"])
    with pytest.raises(SKCDFInputError, match=r"'synapse8' is a set name: give it alone"):
        resolve_organs(["liver", "synapse8"])


def test_organ_subset_labels_renumbered_images_unchanged(tmp_path, tiny_dataset):
    _, full = tiny_dataset
    root = str(tmp_path)
    folder = make_phantom_dataset(root, 951, "Tiny", num_train=2, num_test=1, num_unlabeled=2, seed=3,
                                  progress=False, organs=["synapse8"], **TINY)
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["labels"] == {"background": 0, **{name: i for i, name in enumerate(SYNAPSE8, start=1)}}
    assert dj["phantom_generator"]["organs"] == list(SYNAPSE8)
    assert "8 of the 13 Synapse/BTCV organs labelled" in dj["description"]
    assert sorted(os.listdir(root)) == ["Dataset951_Tiny"]
    for rel in ("imagesTr/phantom_tr_0001_0000.nii.gz", "imagesTs/phantom_ts_0000_0000.nii.gz",
                "imagesUnlabeled/phantom_un_0000_0000.nii.gz"):
        assert filecmp.cmp(os.path.join(full, rel), os.path.join(folder, rel), shallow=False), rel
    for rel in ("labelsTr/phantom_tr_0001.nii.gz", "labelsTs/phantom_ts_0000.nii.gz"):
        all13 = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(full, rel)))
        sub = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, rel)))
        assert sub.dtype == np.uint8 and sub.max() <= 8
        for new, name in enumerate(SYNAPSE8, start=1):
            assert np.array_equal(sub == new, all13 == ID[name]), (rel, name)
        dropped = np.isin(all13, [ID[n] for n in ("esophagus", "inferior_vena_cava", "right_adrenal_gland")])
        assert dropped.any() and (sub[dropped] == 0).all()
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    verify_dataset_integrity(folder, num_processes=1)


# ----------------------------------------------------------------------------------------------
# console script
# ----------------------------------------------------------------------------------------------
def _script() -> str:
    path = shutil.which("skcdf_make_phantom")
    assert path is not None, "console script skcdf_make_phantom missing: run 'pip install -e .'"
    return path


def test_cli_help():
    out = subprocess.run([_script(), "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    for text in ("nnUNet_raw", "950", "SKCDFPhantom", "imagesUnlabeled", "--overwrite", "-np", "48", "3.6", "--organs",
                 "synapse8"):
        assert text in out.stdout, text


def test_cli_run_and_existing_folder_error(tmp_path):
    env = dict(os.environ, nnUNet_raw=str(tmp_path))
    cmd = [_script(), "-d", "953", "--num-train", "1", "--num-test", "0", "--num-unlabeled", "1",
           "--shape", "16", "32", "32", "--spacing", "12", "10", "10", "--seed", "7", "--organs", "Li", "Sp"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    folder = tmp_path / "Dataset953_SKCDFPhantom"
    assert (folder / "imagesTr" / "phantom_tr_0000_0000.nii.gz").is_file()
    assert (folder / "imagesUnlabeled" / "phantom_un_0000_0000.nii.gz").is_file()
    img = sitk.ReadImage(str(folder / "labelsTr" / "phantom_tr_0000.nii.gz"))
    assert np.allclose(img.GetSpacing(), (10, 10, 12)) and img.GetSize() == (32, 32, 16)
    assert set(np.unique(sitk.GetArrayFromImage(img))) == {0, 1, 2}  # spleen 1, liver 2
    assert json.loads((folder / "dataset.json").read_text())["labels"] == {"background": 0, "spleen": 1, "liver": 2}
    bad = subprocess.run(cmd[:-2] + ["kidney", "--overwrite"], capture_output=True, text=True, env=env, timeout=300)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.startswith("ERROR: Unknown organ 'kidney'")
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert again.returncode == 2
    assert again.stderr.startswith("ERROR: ") and "--overwrite" in again.stderr
    assert "Traceback" not in again.stderr
    forced = subprocess.run(cmd + ["--overwrite"], capture_output=True, text=True, env=env, timeout=300)
    assert forced.returncode == 0, forced.stderr


def test_module_runs_as_script():
    out = subprocess.run([sys.executable, "-m", "nnunetv2_skcdf.dataset_conversion.phantom", "--help"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "skcdf_make_phantom" in out.stdout
