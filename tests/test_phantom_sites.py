"""Sites, protocols and pathology in the phantom (phantom_sites.py, phantom_variation.py, --sites)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES
from nnunetv2_skcdf.dataset_conversion.phantom import (
    CASES_FILE,
    case_rng,
    generate_case,
    make_phantom_dataset,
    make_phantom_entry,
    site_case,
)
from nnunetv2_skcdf.dataset_conversion.phantom_sites import (
    PHASE_HU,
    PHASES,
    SITES,
    case_grid,
    check_site_table,
    check_sites,
    draw_protocol,
)
from nnunetv2_skcdf.dataset_conversion.phantom_variation import TX, _tissue_means
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

ID = {name: label_id for label_id, name, _ in SYNAPSE_CLASSES}
TINY = dict(shape=(24, 48, 48), spacing=(10.0, 7.2, 7.2))
ALL = sorted(SITES)


def test_original_phantom_bit_identical():
    """Without a protocol the generator gives exactly the arrays of release 0.4 (stored benchmark data)."""
    golden = {  # sha256 of image bytes + label bytes, computed with the generator before sites existed
        ("tr", 0): "74c96a4a4fdfe6eb6486cc9982ce8a1bd0f522b7248eab6281a7a177860dd1b1",
        ("ts", 3): "cc0b220030efb828b62b2cbd66877f3db55d2078cd6cdbd3bff791e7e240cd08",
        ("un", 7): "dd64a0c459986bca475558bb66c8be3196df7ca3d60e952c0927e38d216f6b02",
    }
    for (role, i), digest in golden.items():
        img, lab = generate_case(case_rng(0, role, i), **TINY)
        assert hashlib.sha256(img.tobytes() + lab.tobytes()).hexdigest() == digest, (role, i)


def test_site_table_is_consistent():
    check_site_table()
    assert set(SITES) == {"A", "B", "C", "D"}
    phases = {p for s in SITES.values() for p, _ in s.acquisition.phases}
    assert phases == set(PHASES)  # every phase is produced by some site
    for name, per_phase in PHASE_HU.items():
        assert set(per_phase) == set(PHASES), name
        assert all(lo < hi for lo, hi in per_phase.values()), name


def test_check_sites_errors():
    assert [s.name for s in check_sites(["all"])] == ALL
    with pytest.raises(SKCDFInputError, match=r"Unknown site\(s\) \['Z'\].*--sites.*'A'"):
        check_sites(["A", "Z"])


def _case(site="A", index=0, **changes):
    """A site case at the tiny base grid, with protocol fields overridden by ``changes``."""
    prot, _, _ = site_case(0, "tr", index, [site], TINY["shape"], TINY["spacing"])
    prot = replace(prot, **changes)
    shape, spacing = case_grid(prot, TINY["shape"], TINY["spacing"])
    img, lab = generate_case(case_rng(0, "tr", index), shape, spacing, prot)
    return prot, img, lab, spacing


QUIET = dict(noise_hu=0.0, calibration_hu=0.0, kernel=0.0, streaks=False, liver_lesions=0, liver_cysts=0,
             renal_cysts=(0, 0), absent=(), oral_contrast=False, organ_scale=())


def test_site_cases_deterministic_and_anatomy_stream_untouched():
    a = _case("B", 1)
    b = _case("B", 1)
    assert np.array_equal(a[1], b[1]) and np.array_equal(a[2], b[2])
    # the protocol has its own stream: drawing it does not consume the anatomy's generator
    p1 = draw_protocol(SITES["C"], np.random.default_rng(5))
    p2 = draw_protocol(SITES["C"], np.random.default_rng(5))
    assert p1 == p2


def test_phase_sets_vessel_and_organ_hu():
    """Aorta brightest in the arterial phase, kidney medulla brightest in the delayed phase, liver and
    aorta near water-blood values without contrast: each within its table range (no noise, no offset)."""
    med = {}
    for phase in PHASES:
        _, img, lab, _ = _case("A", 2, phase=phase, timing=0.5, **QUIET)
        core = lambda lid: np.median(img[lab == lid])  # noqa: E731
        med[phase] = {"aorta": core(ID["aorta"]), "liver": core(ID["liver"])}
        lo, hi = PHASE_HU["liver"][phase]
        assert lo - 15 <= med[phase]["liver"] <= hi + 15, (phase, med[phase])
    assert med["arterial"]["aorta"] > med["portal_venous"]["aorta"] > med["delayed"]["aorta"] > \
        med["non_contrast"]["aorta"] + 40
    assert med["non_contrast"]["aorta"] < 70 and med["portal_venous"]["liver"] > med["non_contrast"]["liver"] + 30


def test_noise_calibration_and_kernel_applied():
    _, quiet, lab, _ = _case("A", 3, **QUIET)
    _, noisy, _, _ = _case("A", 3, **{**QUIET, "noise_hu": 40.0})
    inside = quiet > -900  # air is clipped at -1024 HU
    diff = noisy.astype(float)[inside] - quiet[inside]
    assert 37 < diff.std() < 43  # the protocol's sd, HU
    _, shifted, _, _ = _case("A", 3, **{**QUIET, "calibration_hu": 30.0})
    body = lab > 0
    assert abs(np.median(shifted[body].astype(float) - quiet[body]) - 30) <= 1
    _, sharp, _, _ = _case("A", 3, **{**QUIET, "kernel": 0.8})
    _, smooth, _, _ = _case("A", 3, **{**QUIET, "kernel": -0.8})

    def edge_energy(im):
        im = im.astype(float)
        return np.abs(im - gaussian_filter(im, (0, 1, 1))).mean()

    assert edge_energy(sharp) > 1.3 * edge_energy(quiet) > 1.3 * edge_energy(smooth)


def test_grid_from_slice_thickness_fov_and_coverage():
    prot, img, lab, spacing = _case("B", 0, slice_mm=2.5, fov_mm=400.0, coverage_mm=200.0, centre_mm=0.0)
    assert spacing == pytest.approx((10.0 * 2.5 / 5.0, 400.0 / 48, 400.0 / 48))
    assert img.shape == (40, 48, 48)  # 200 mm / 5 mm along z


def test_coverage_cuts_organs():
    """Coverage centred high above the abdomen: the kidneys (inferior) are cut off, the heart level shows."""
    _, _, full, _ = _case("A", 4, coverage_mm=260.0, centre_mm=0.0, **{k: v for k, v in QUIET.items()})
    _, _, high, _ = _case("A", 4, coverage_mm=160.0, centre_mm=110.0, **QUIET)
    assert (full == ID["right_kidney"]).sum() > 0
    assert (high == ID["right_kidney"]).sum() < 0.3 * (full == ID["right_kidney"]).sum()
    assert (high == ID["esophagus"]).any()


def test_absent_organs_have_no_label_and_splenomegaly_grows_spleen():
    _, _, lab, _ = _case("D", 0, **{**QUIET, "absent": ("spleen", "left_kidney", "gallbladder")})
    for organ in ("spleen", "left_kidney", "gallbladder"):
        assert not (lab == ID[organ]).any(), organ
    assert (lab == ID["right_kidney"]).sum() > 0 and (lab == ID["liver"]).sum() > 0
    _, _, normal, _ = _case("D", 0, **QUIET)
    _, _, big, _ = _case("D", 0, **{**QUIET, "organ_scale": (("spleen", 1.6),)})
    assert (big == ID["spleen"]).sum() > 2.0 * (normal == ID["spleen"]).sum()


def test_habitus_changes_body_size():
    _, small, _, _ = _case("A", 5, **{**QUIET, "habitus": 0.85, "fov_mm": 420.0})
    _, large, _, _ = _case("A", 5, **{**QUIET, "habitus": 1.2, "fov_mm": 420.0})
    assert (large > -500).sum() > 1.5 * (small > -500).sum()


def test_lesions_and_cysts_change_hu_not_labels():
    _, clean, lab_clean, _ = _case("A", 6, **{**QUIET, "noise_hu": 1.0})
    _, sick, lab_sick, _ = _case("A", 6, **{**QUIET, "noise_hu": 1.0, "liver_lesions": 6, "lesion_kind": "hypo",
                                           "renal_cysts": (2, 2)})
    assert np.array_equal(lab_clean, lab_sick)  # lesions and cysts keep their organ's label
    liver = lab_clean == ID["liver"]
    dark = lambda im: (im[liver] < np.median(clean[liver]) - 30).mean()  # noqa: E731
    assert dark(sick) > dark(clean) + 0.01
    kidney = lab_clean == ID["right_kidney"]
    assert (sick[kidney] < 40).sum() > (clean[kidney] < 40).sum()  # water-dense cysts


def test_oral_contrast_and_streaks():
    prot, *_ = _case("D", 0)
    means = _tissue_means(np.random.default_rng(0), replace(prot, oral_contrast=True))
    assert means[TX["bowel_fluid"]] >= 120 and means[TX["stomach_fluid"]] >= 120
    means = _tissue_means(np.random.default_rng(0), replace(prot, oral_contrast=False))
    assert means[TX["bowel_fluid"]] <= 30
    _, plain, _, _ = _case("A", 7, **QUIET)
    _, metal, _, _ = _case("A", 7, **{**QUIET, "streaks": True})
    assert (metal > 2000).any() and not (plain > 2000).any()
    assert (np.abs(metal.astype(float) - plain) > 50).sum() > 50  # streaks beyond the metal itself


def test_dataset_with_sites(tmp_path):
    from nnunetv2.experiment_planning.verify_dataset_integrity import verify_dataset_integrity

    folder = make_phantom_dataset(str(tmp_path), 953, "Sites", num_train=4, num_test=4, num_unlabeled=2, seed=1,
                                  progress=False, sites=["all"], **TINY)
    with open(os.path.join(folder, CASES_FILE)) as f:
        cases = json.load(f)
    records = cases["cases"]
    assert len(records) == 10
    assert [records[f"phantom_ts_{i:04d}"]["site"] for i in range(4)] == ALL  # each role covers every site
    assert cases["cases_per_site"]["A"] == {"tr": 1, "ts": 1, "un": 1}
    for cid, rec in records.items():
        sub = {"tr": "imagesTr", "ts": "imagesTs", "un": "imagesUnlabeled"}[rec["role"]]
        img = sitk.ReadImage(os.path.join(folder, sub, f"{cid}_0000.nii.gz"))
        assert np.allclose(img.GetSpacing(), rec["spacing_zyx_mm"][::-1]), cid
        assert img.GetSize() == tuple(rec["shape_zyx_voxels"][::-1]), cid
        if rec["role"] != "un":
            lab = sitk.GetArrayFromImage(sitk.ReadImage(os.path.join(folder, sub.replace("images", "labels"),
                                                                     f"{cid}.nii.gz")))
            for organ in rec["absent"]:
                assert not (lab == ID[organ]).any(), (cid, organ)
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert dj["phantom_generator"]["sites"] == ALL and set(dj["phantom_generator"]["site_definitions"]) == set(ALL)
    verify_dataset_integrity(folder, num_processes=1)  # varying spacings and shapes are fine for nnU-Net
    # the same call again gives byte-identical case files
    again = make_phantom_dataset(str(tmp_path / "again"), 953, "Sites", num_train=4, num_test=4, num_unlabeled=2,
                                 seed=1, progress=False, sites=["all"], **TINY)
    for rel in ("imagesTr/phantom_tr_0002_0000.nii.gz", "labelsTs/phantom_ts_0003.nii.gz", CASES_FILE):
        with open(os.path.join(folder, rel), "rb") as a, open(os.path.join(again, rel), "rb") as b:
            assert a.read() == b.read(), rel


def test_original_dataset_has_no_site_files(tmp_path):
    folder = make_phantom_dataset(str(tmp_path), 954, "Plain", num_train=1, num_test=0, num_unlabeled=0,
                                  progress=False, **TINY)
    assert not os.path.exists(os.path.join(folder, CASES_FILE))
    with open(os.path.join(folder, "dataset.json")) as f:
        dj = json.load(f)
    assert "sites" not in dj["phantom_generator"] and "(portal-venous phase)" in dj["description"]


def test_cli_unknown_site(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        make_phantom_entry(["-o", str(tmp_path), "--num-train", "1", "--sites", "A", "Q", "--no-progress"])
    assert exc.value.code == 2
    assert "Unknown site(s) ['Q']" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []


def test_documentation_tables_are_generated():
    """documentation/phantom.md holds exactly the tables generated from the site definitions."""
    from nnunetv2_skcdf.dataset_conversion.phantom_sites import phase_table_markdown, site_table_markdown

    page = open(os.path.join(os.path.dirname(__file__), "..", "documentation", "phantom.md")).read()
    assert site_table_markdown() in page, "regenerate the per-site table (site_table_markdown)"
    assert phase_table_markdown() in page, "regenerate the phase table (phase_table_markdown)"


def test_documentation_realism_table_is_the_stored_one():
    """documentation/phantom.md holds the table benchmarks/phantom_realism.py wrote (figures cannot drift)."""
    root = os.path.join(os.path.dirname(__file__), "..")
    page = open(os.path.join(root, "documentation", "phantom.md")).read()
    table = open(os.path.join(root, "benchmarks", "results", "phantom_realism.md")).read().strip()
    assert table in page, "copy benchmarks/results/phantom_realism.md into documentation/phantom.md"


def test_site_cases_golden_hashes_pin_sites_version():
    """If a site case's pixels change, SITES_VERSION must be bumped (and these hashes updated): benchmark runs are
    stored per sites version, so a silent change would mix data of two generators under one name."""
    from nnunetv2_skcdf.dataset_conversion.phantom_sites import SITES_VERSION

    golden = {"1": ["c4584ed027f22f35854f42f4a8e75016aae6cef16b166af21eb426a51da8d21f",
                    "e50749676c5486e8dbe524b32c894bc3778b1da15f7f0ab3d31b5416b08a52f5",
                    "f656c6ff22f0251ff6b44f78750bc7b61bde8ca33a7f989768a7eb53c62bce8f",
                    "c0b71a404abb819782cb5949327d1d84bf8c9d8e314052dd1b0197d3219780c5"]}
    assert SITES_VERSION in golden, f"add the golden hashes of SITES_VERSION {SITES_VERSION}"
    for i, digest in enumerate(golden[SITES_VERSION]):
        prot, shape, spacing = site_case(0, "tr", i, ALL, TINY["shape"], TINY["spacing"])
        img, lab = generate_case(case_rng(0, "tr", i), shape, spacing, prot)
        assert hashlib.sha256(img.tobytes() + lab.tobytes()).hexdigest() == digest, \
            f"site case {i} changed: bump SITES_VERSION in phantom_sites.py and record its hashes here"


def test_documentation_sim_to_real_table_is_the_stored_one():
    root = os.path.join(os.path.dirname(__file__), "..")
    page = open(os.path.join(root, "documentation", "phantom.md")).read()
    table = open(os.path.join(root, "benchmarks", "results", "sim_to_real.md")).read().strip()
    assert table in page, "copy benchmarks/results/sim_to_real.md into documentation/phantom.md"
