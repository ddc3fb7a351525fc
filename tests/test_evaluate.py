"""skcdf_evaluate: per-case metrics on real files (axis order, 2D, empty-mask rules), NSD tolerances, the CLI on a
tiny raw-layout dataset (single folder and multi-run aggregation, table numbers, nnU-Net compatibility, PNG) and
its error messages."""
from __future__ import annotations

import json
import math
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from nnunetv2_skcdf.evaluation.evaluate import (CaseJob, PAPER_EMPTY_DISTANCE, aggregate_runs, evaluate_case,
                                                evaluate_entry, island_metrics, resolve_nsd_tolerances)
from nnunetv2_skcdf.evaluation.surface_metrics import surface_metrics
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

SITK_SPACING = (1.3, 0.7, 3.0)  # x, y, z as SimpleITK wants it
SPACING_ZYX = SITK_SPACING[::-1]
SHAPE = (6, 12, 12)
LABELS = {"background": 0, "spleen": 1, "liver": 2, "gall bladder": 3}
NAMES = {"1": "spleen", "2": "liver", "3": "gall bladder"}


def write(labels: np.ndarray, path: Path, spacing=SITK_SPACING) -> None:
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(spacing[: labels.ndim])
    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(path))


def job(ref: Path, pred: Path, regions=(1, 2, 3), paper_rules=False, voxel_units=False, tol=2.0) -> CaseJob:
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    return CaseJob(str(ref), str(pred), SimpleITKIO, tuple(regions), (0, 1, 2, 3), None,
                   {r: tol for r in regions}, voxel_units, paper_rules)


# ---------------------------------------------------------------------------------- one case from files
def test_axis_order_from_simpleitk_spacing(tmp_path):
    """Slabs 3 voxels apart along the numpy z axis: ASD must use SimpleITK's *third* spacing (3.0 mm)."""
    ref, pred = np.zeros((12, 5, 5), np.uint8), np.zeros((12, 5, 5), np.uint8)
    ref[2:4], pred[5:7] = 1, 1
    write(ref, tmp_path / "r.nii.gz")
    write(pred, tmp_path / "p.nii.gz")
    m = evaluate_case(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz", regions=(1,)))["metrics"][1]
    assert m["ASD"] == pytest.approx(2.5 * 3.0)  # (2 + 3) / 2 slices of 3 mm; x or y spacing would differ
    assert m["HD95"] == pytest.approx(3 * 3.0)
    voxels = evaluate_case(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz", regions=(1,), voxel_units=True))
    assert voxels["metrics"][1]["ASD"] == pytest.approx(2.5)
    assert m["Dice"] == 0 and m["TN"] == 12 * 25 - 2 * 50 and m["n_pred"] == m["n_ref"] == 50


def test_case_metrics_match_nnunet_and_surface_functions(tmp_path):
    """Counts equal nnU-Net's compute_metrics on the full volume; distances equal surface_metrics (z, y, x)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    rng = np.random.default_rng(0)
    ref, pred = rng.integers(0, 3, SHAPE), rng.integers(0, 3, SHAPE)
    pred[:, :, :4] = 0
    write(ref, tmp_path / "r.nii.gz")
    write(pred, tmp_path / "p.nii.gz")
    ours = evaluate_case(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz", regions=(1, 2, (1, 2))))["metrics"]
    nnunet = compute_metrics(str(tmp_path / "r.nii.gz"), str(tmp_path / "p.nii.gz"), SimpleITKIO(), [1, 2, (1, 2)])
    for region in (1, 2, (1, 2)):
        for key, value in nnunet["metrics"][region].items():
            assert ours[region][key] == pytest.approx(value), (region, key)
    expected = surface_metrics(pred == 2, ref == 2, SPACING_ZYX, 2.0)
    assert {k: ours[2][k] for k in expected} == pytest.approx(expected)


def test_ignore_label_counts_like_nnunet(tmp_path):
    """Voxels with the ignore label in the reference count for nothing (nnU-Net), surfaces skip them too."""
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref[1:4, 2:6, 2:6], ref[1:4, 6:9, 2:6] = 1, 4  # label 4 = ignore
    pred[1:4, 2:9, 2:6] = 1  # spills exactly into the ignored region
    write(ref, tmp_path / "r.nii.gz")
    write(pred, tmp_path / "p.nii.gz")
    ours = evaluate_case(replace(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz", regions=(1,)),
                                 allowed_labels=(0, 1, 4), ignore_label=4))["metrics"][1]
    nnunet = compute_metrics(str(tmp_path / "r.nii.gz"), str(tmp_path / "p.nii.gz"), SimpleITKIO(), [1], 4)
    assert {k: ours[k] for k in nnunet["metrics"][1]} == nnunet["metrics"][1]
    assert ours["Dice"] == 1.0 and ours["ASD"] == 0.0 and ours["TN"] == ref.size - 48 - 36


def test_2d_image(tmp_path):
    ref, pred = np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8)
    ref[2:6, 2:6], pred[2:6, 3:7] = 1, 1
    write(ref, tmp_path / "r.nii.gz")
    write(pred, tmp_path / "p.nii.gz")
    m = evaluate_case(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz", regions=(1,)))["metrics"][1]
    assert m["Dice"] == pytest.approx(2 * 12 / 32)
    assert m["ASD"] == pytest.approx(surface_metrics(pred == 1, ref == 1, (0.7, 1.3))["ASD"])


def _one_sided(tmp_path, paper_rules):
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref[1:3, 1:4, 1:4] = 1  # spleen only in the reference (missed)
    pred[3:5, 5:8, 5:8] = 2  # liver only in the prediction (spurious); gall bladder in neither
    write(ref, tmp_path / "r.nii.gz")
    write(pred, tmp_path / "p.nii.gz")
    return evaluate_case(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz", paper_rules=paper_rules))["metrics"]


def test_empty_masks_default_rules(tmp_path):
    m = _one_sided(tmp_path, paper_rules=False)
    for one_sided in (m[1], m[2]):
        assert one_sided["Dice"] == 0 and one_sided["IoU"] == 0
        assert all(math.isnan(one_sided[k]) for k in ("ASD", "ASSD", "HD95", "NSD"))
    assert math.isnan(m[3]["Dice"]) and math.isnan(m[3]["ASD"])  # both empty: nnU-Net's NaN


def test_empty_masks_paper_rules(tmp_path):
    m = _one_sided(tmp_path, paper_rules=True)
    for one_sided in (m[1], m[2]):
        assert one_sided["Dice"] == 0 and one_sided["NSD"] == 0
        assert one_sided["ASD"] == one_sided["ASSD"] == one_sided["HD95"] == PAPER_EMPTY_DISTANCE == 128
    assert m[3]["Dice"] == 1.0 and m[3]["ASD"] == 0.0 and m[3]["HD95"] == 0.0  # both empty: 100 %, 0


def test_island_metrics():
    """Components without a reference voxel, full connectivity: a diagonal neighbour joins the component, a
    face-adjacent but disjoint blob is an island, overlap by one voxel is not."""
    ref, pred = np.zeros((8, 12, 12), bool), np.zeros((8, 12, 12), bool)
    ref[2:5, 2:5, 2:5] = True
    pred[2:5, 2:5, 2:5] = True  # the organ
    pred[5, 5, 5] = True  # touches the organ's corner only diagonally: same component (26-connectivity)
    pred[2:4, 2:4, 6:8] = True  # one voxel gap from the organ along x (x = 5 empty): island of 8 voxels
    pred[7, 10:12, 10:12] = True  # far away: island of 4 voxels
    pred[0, 0, 0], ref[0, 0, 0] = True, True  # a component that is all reference: not an island
    m = island_metrics(pred, ref, voxel_volume=2.0)
    assert m == {"n_islands": 2, "island_volume": 2.0 * (8 + 4)}
    assert island_metrics(pred, np.zeros_like(ref), 1.0) == {"n_islands": 4, "island_volume": float(pred.sum())}
    assert island_metrics(np.zeros_like(pred), ref, 1.0) == {"n_islands": 0, "island_volume": 0.0}
    flat_ref, flat_pred = np.zeros((6, 6), bool), np.zeros((6, 6), bool)
    flat_ref[0:2, 0:2] = flat_pred[0:2, 0:2] = True
    flat_pred[2, 2] = True  # 8-connected to the organ in 2D
    flat_pred[4:6, 4] = True
    assert island_metrics(flat_pred, flat_ref, 0.5) == {"n_islands": 1, "island_volume": 1.0}


def test_islands_in_case_metrics(tmp_path):
    """In mm^3 from the file's spacing (voxels with --voxel-units); per class; ignore-label voxels are no
    prediction; a class absent from both masks has none."""
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    ref[1:4, 2:6, 2:6] = 1
    ref[0, 10:12, 10:12] = 4  # ignore label
    pred[1:4, 2:6, 2:6] = 1
    pred[5, 0:2, 9:12] = 1  # spleen island, 6 voxels
    pred[0, 10:12, 10:12] = 1  # inside the ignore region: not counted
    pred[4:6, 8:10, 0:2] = 2  # liver predicted, not in the reference: 8 voxels
    write(ref, tmp_path / "r.nii.gz")
    write(pred, tmp_path / "p.nii.gz")
    base = replace(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz"), allowed_labels=(0, 1, 2, 3, 4), ignore_label=4)
    voxel_mm3 = float(np.prod(SITK_SPACING))
    m = evaluate_case(base)["metrics"]
    assert (m[1]["n_islands"], m[1]["island_volume"]) == (1, pytest.approx(6 * voxel_mm3))
    assert (m[2]["n_islands"], m[2]["island_volume"]) == (1, pytest.approx(8 * voxel_mm3))
    assert (m[3]["n_islands"], m[3]["island_volume"]) == (0, 0.0)
    voxels = evaluate_case(replace(base, voxel_units=True))["metrics"]
    assert voxels[1]["island_volume"] == 6 and voxels[2]["island_volume"] == 8
    paper = evaluate_case(replace(base, paper_rules=True))["metrics"]
    assert paper[2]["n_islands"] == 1 and paper[2]["ASD"] == PAPER_EMPTY_DISTANCE  # the rules leave islands alone


def test_aggregate_of_summaries_without_islands():
    """A summary written before islands were counted (stored benchmark runs) aggregates to None: the table says
    n/a instead of a false 0."""
    from nnunetv2_skcdf.evaluation.paper_table import island_table

    def summary(with_islands):
        counts = {"n_valid": {m: 1 for m in ("Dice", "IoU", "ASD", "ASSD", "HD95", "NSD")}, "missed": 0,
                  "spurious": 0, **({"islands": 2, "island_volume": 5.0} if with_islands else {})}
        return {"mean": {"1": {m: 0.5 for m in ("Dice", "IoU", "ASD", "ASSD", "HD95", "NSD")}},
                "foreground_mean": {m: 0.5 for m in ("Dice", "IoU", "ASD", "ASSD", "HD95", "NSD")},
                "skcdf": {"n_cases": 1, "per_class": {"1": counts}}}

    classes = [{"key": "1", "name": "spleen", "column": "Sp"}]
    runs = [{"method": "new", "pred_folder": "x", "output_folder": "", "summary": summary(True)},
            {"method": "new", "pred_folder": "y", "output_folder": "", "summary": summary(True)},
            {"method": "mixed", "pred_folder": "z", "output_folder": "", "summary": summary(False)},
            {"method": "mixed", "pred_folder": "w", "output_folder": "", "summary": summary(True)}]
    aggregate = aggregate_runs(runs, classes, {"rules": "nnunet", "units": "mm"})
    assert aggregate["methods"][0]["islands"] == {"1": 4} and aggregate["methods"][0]["island_volume"] == {"1": 10.0}
    assert aggregate["methods"][1]["islands"] == {"1": None}
    table = "\n".join(island_table(aggregate))
    assert "| new | 2 | 4 (10) |" in table and "| mixed | 2 | n/a |" in table


def test_nsd_tolerances():
    names = {"1": "spleen", "2": "liver", "3": "gall bladder", "4": "arota", "5": "tumour"}
    regions = (1, 2, 3, 4, 5)
    assert resolve_nsd_tolerances(None, regions, names) == {1: 3.0, 2: 5.0, 3: 2.0, 4: 2.0, 5: 3.0}
    assert resolve_nsd_tolerances(["Li=7", "1.5"], regions, names) == {1: 1.5, 2: 7.0, 3: 1.5, 4: 1.5, 5: 1.5}
    assert resolve_nsd_tolerances(["gall_bladder=4", "5=9"], regions, names)[3] == 4.0
    assert resolve_nsd_tolerances(["5=9"], regions, names)[5] == 9.0
    with pytest.raises(SKCDFInputError, match="no class called 'kidney'"):
        resolve_nsd_tolerances(["kidney=3"], regions, names)
    with pytest.raises(SKCDFInputError, match="positive number"):
        resolve_nsd_tolerances(["liver=-1"], regions, names)


# --------------------------------------------------------------------------------------------- the CLI
def _reference_cases():
    """case_000: spleen 4^3, liver 4^3, gall bladder 2^3; case_001: the same without gall bladder."""
    case0 = np.zeros(SHAPE, np.uint8)
    case0[1:5, 2:6, 2:6] = 1
    case0[1:5, 6:10, 6:10] = 2
    case0[1:3, 2:4, 8:10] = 3
    case1 = case0.copy()
    case1[case1 == 3] = 0
    return {"case_000": case0, "case_001": case1}


def _half_spleen(labels):
    out = labels.copy()
    out[1:5, 2:6, 4:6] = 0  # keep 32 of the 64 spleen voxels: Dice 2/3
    return out


def _swap_gallbladder(labels, case):
    out = labels.copy()
    out[out == 3] = 0  # case_000: gall bladder missed
    if case == "case_001":
        out[3:5, 9:11, 1:3] = 3  # case_001: spurious gall bladder
    return out


@pytest.fixture
def dataset(tmp_path) -> dict:
    """Raw layout Dataset/labelsTs + dataset.json, and prediction folders: A_run1 (perfect), A_run2 (half spleen),
    B (gall bladder missed in case_000, spurious in case_001)."""
    root = tmp_path / "Dataset990_Tiny"
    refs = _reference_cases()
    preds = {"A_run1": {c: l for c, l in refs.items()}, "A_run2": {c: _half_spleen(l) for c, l in refs.items()},
             "B": {c: _swap_gallbladder(l, c) for c, l in refs.items()}}
    for case, labels in refs.items():
        write(labels, root / "labelsTs" / f"{case}.nii.gz")
    for folder, cases in preds.items():
        for case, labels in cases.items():
            write(labels, tmp_path / "pred" / folder / f"{case}.nii.gz")
    (root / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": LABELS,
                                                   "numTraining": 2, "file_ending": ".nii.gz"}))
    return {"ref": root / "labelsTs", "pred": tmp_path / "pred", "root": root, "tmp": tmp_path, "refs": refs,
            "preds": preds}


def spleen_asd_half() -> float:
    """Mean over both cases of the half-spleen ASD (the cases are identical there)."""
    ref = _reference_cases()["case_000"]
    return surface_metrics(_half_spleen(ref) == 1, ref == 1, SPACING_ZYX)["ASD"]


def test_single_folder_outputs_in_prediction_folder(dataset, capsys):
    from nnunetv2.evaluation.evaluate_predictions import load_summary_json

    from nnunetv2_skcdf.evaluation.dice_table import dice_table

    pred = dataset["pred"] / "A_run2"
    evaluate_entry(["-ref", str(dataset["ref"]), "-pred", str(pred), "-np", "1"])
    summary = load_summary_json(str(pred / "summary.json"))  # nnU-Net's reader: int keys again
    assert summary["mean"][1]["Dice"] == pytest.approx(2 / 3)
    assert summary["mean"][1]["ASD"] == pytest.approx(spleen_asd_half())
    assert summary["mean"][3]["Dice"] == 1.0  # case_001 both empty -> NaN, left out
    assert summary["skcdf"]["per_class"]["3"]["n_valid"]["Dice"] == 1
    assert summary["foreground_mean"]["Dice"] == pytest.approx((2 / 3 + 1 + 1) / 3)
    assert [c["prediction_file"] for c in summary["metric_per_case"]] == \
        [str(pred / "case_000.nii.gz"), str(pred / "case_001.nii.gz")]
    assert summary["skcdf"]["nsd_tolerance_mm"] == {"1": 3.0, "2": 5.0, "3": 2.0}  # FLARE22 defaults
    rows = (pred / "metrics_per_case.csv").read_text().splitlines()
    assert len(rows) == 1 + 2 * 3 and rows[0].startswith("case,label,name,Dice,IoU,FP,TP,FN,TN,n_pred,n_ref,ASD")
    table = (pred / "paper_table.md").read_text()
    assert f"| A_run2 | 88.89 | {spleen_asd_half() / 3:.2f} | 66.67 | 100.00 | 100.00 |" in table
    assert "| Method | Avg Dice | Avg ASD | Sp | Li | Ga |" in table
    assert (pred / "dice_per_class.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "A_run2" in capsys.readouterr().out
    raw = json.loads((pred / "summary.json").read_text())  # skcdf_dice_table reads it too
    assert "| A_run2 | 88.9 | 66.7 | 100.0 | 100.0 |" in dice_table({"A_run2": raw}, {1: "spleen", 2: "liver"})
    # summaries of other label sets, or a file that is no summary: the row and the fault are named
    fewer = {**raw, "mean": {k: v for k, v in raw["mean"].items() if k != "3"}}
    with pytest.raises(SKCDFInputError, match=r"synapse8.json has other classes than full.json \(no Dice for classes 3\)"):
        dice_table({"full.json": raw, "synapse8.json": fewer})
    with pytest.raises(SKCDFInputError, match=r"B \(b/summary.json\) has other classes than A \(a/summary.json\) \(classes 3 in addition\)"):
        dice_table({"A": fewer, "B": raw}, sources={"A": "a/summary.json", "B": "b/summary.json"})
    with pytest.raises(SKCDFInputError, match=r"aggregate.json: not an nnU-Net summary.json"):
        dice_table({"full.json": raw, "aggregate.json": {"methods": {}}})


def test_multi_run_aggregation(dataset):
    import matplotlib.image

    p, out = dataset["pred"], dataset["tmp"] / "out"
    evaluate_entry(["-ref", str(dataset["ref"]), "-pred", str(p / "A_run1"), str(p / "A_run2"), str(p / "B"),
                    "--method", "A", "A", "B", "-o", str(out), "-np", "2"])
    for run in ("A_run1", "A_run2", "B_run1"):
        assert (out / "runs" / run / "summary.json").is_file() and (out / "runs" / run / "metrics_per_case.csv").is_file()
    assert not (p / "A_run1" / "summary.json").exists()  # prediction folders untouched
    table = (out / "paper_table.md").read_text()
    asd = spleen_asd_half() / 3  # run 2's class average; run 1's is 0
    # Avg Dice runs: 100 and 88.89 -> 94.44 +- 5.56 (ddof 0); spleen 100 and 66.67 -> 83.33 +- 16.67
    assert f"| A | 94.44 ± 5.56 | {asd / 2:.2f} ± {asd / 2:.2f} | 83.33 ± 16.67 | 100.00 ± 0.00 | 100.00 ± 0.00 |" \
        in table
    # B: gall bladder missed in one case and spurious in the other -> Dice 0, ASD n/a (NaN in both cases)
    assert "| B | 66.67 | 0.00 | 100.00 | 100.00 | 0.00 |" in table
    assert "| B | 2 | 0/0 | 0/0 | 1/1 |" in table and "| A | 4 | 0/0 | 0/0 | 0/0 |" in table
    # islands: B's spurious gall bladder (2x2x2 voxels of 1.3 x 0.7 x 3.0 mm = 21.8 mm^3); a half spleen has none
    assert "### Islands" in table and "total volume in mm³" in table
    assert "| B | 2 | 0 (0) | 0 (0) | 1 (22) |" in table and "| A | 4 | 0 (0) | 0 (0) | 0 (0) |" in table
    aggregate = json.loads((out / "aggregate.json").read_text())
    a = aggregate["methods"][0]
    assert a["name"] == "A" and len(a["runs"]) == 2 and aggregate["std_ddof"] == 0
    assert a["per_class"]["1"]["Dice"]["per_run"] == pytest.approx([1.0, 2 / 3])
    b = aggregate["methods"][1]
    assert math.isnan(b["per_class"]["3"]["ASD"]["mean"]) and b["missed"]["3"] == 1 and b["spurious"]["3"] == 1
    assert b["per_class"]["3"]["ASD"]["n_cases"] == 0 and a["per_class"]["3"]["Dice"]["n_cases"] == 2  # 1 per run
    image = matplotlib.image.imread(str(out / "dice_per_class.png"))
    assert image.ndim == 3 and image.shape[0] > 100


def test_paper_rules_cli(dataset):
    out = dataset["tmp"] / "paper"
    evaluate_entry(["-ref", str(dataset["ref"]), "-pred", str(dataset["pred"] / "B"), "-o", str(out), "-np", "1",
                    "--paper-rules", "--no-plot"])
    summary = json.loads((out / "runs" / "B_run1" / "summary.json").read_text())
    assert summary["mean"]["3"]["ASD"] == 128 and summary["mean"]["3"]["Dice"] == 0
    assert summary["skcdf"]["rules"] == "paper"
    assert not (out / "dice_per_class.png").exists()
    assert "| B | 66.67 | 42.67 | 100.00 | 100.00 | 0.00 |" in (out / "paper_table.md").read_text()  # 128 / 3


# ---------------------------------------------------------------------------------------------- errors
def _error(capsys, argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        evaluate_entry(argv + ["-np", "1", "--no-plot"])
    assert exit_info.value.code == 2
    return capsys.readouterr().err


def test_missing_prediction_names_case(dataset, capsys):
    (dataset["pred"] / "B" / "case_001.nii.gz").unlink()
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(dataset["pred"] / "B")])
    assert "no prediction for 1 reference case(s): case_001" in err and "Predict them" in err


def test_extra_prediction_file(dataset, capsys):
    shutil.copy(dataset["pred"] / "B" / "case_001.nii.gz", dataset["pred"] / "B" / "case_999.nii.gz")
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(dataset["pred"] / "B")])
    assert "case_999.nii.gz" in err and "without a reference" in err


def test_unknown_label_names_file_and_values(dataset, capsys):
    labels = dataset["preds"]["B"]["case_000"].copy()
    labels[0, 0, 0:2] = 7
    write(labels, dataset["pred"] / "B" / "case_000.nii.gz")
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(dataset["pred"] / "B")])
    assert "case_000.nii.gz: label values [7] are not in dataset.json (labels [0, 1, 2, 3])" in err
    assert "np." not in err  # was: (labels [np.int64(0), np.int64(1), ...])


def test_missing_dataset_json(dataset, capsys):
    (dataset["root"] / "dataset.json").unlink()
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(dataset["pred"] / "B")])
    assert "dataset.json not found" in err and "-djfile" in err


def test_broken_dataset_json_is_named_with_its_fault(dataset, capsys):
    dj = dataset["root"] / "dataset.json"
    good = json.loads(dj.read_text())
    dj.write_text(dj.read_text()[:-1] + ",}")
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(dataset["pred"] / "B")])
    assert f"{dj} is not valid JSON (" in err and "trailing comma" in err
    dj.write_text(json.dumps({k: v for k, v in good.items() if k != "file_ending"}))
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(dataset["pred"] / "B")])
    assert f"{dj} lacks 'file_ending'" in err


def test_a_summary_json_of_another_tool_is_never_replaced(dataset, capsys):
    """nnU-Net's own validation summary (fold_X/validation/summary.json) is left as it is: evaluating that folder
    without -o is refused; with -o, or over skcdf_evaluate's own summary (a rerun), it goes ahead."""
    pred = dataset["pred"] / "B"
    nnunet_summary = json.dumps({"foreground_mean": {"Dice": 0.5}, "mean": {}, "metric_per_case": []})
    (pred / "summary.json").write_text(nnunet_summary)
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(pred)])
    assert f"{pred / 'summary.json'} exists and was not written by skcdf_evaluate" in err and "-o OUT_FOLDER" in err
    assert (pred / "summary.json").read_text() == nnunet_summary and not (pred / "metrics_per_case.csv").exists()
    evaluate_entry(["-ref", str(dataset["ref"]), "-pred", str(pred), "-o", str(dataset["tmp"] / "out"), "-np", "1",
                    "--no-plot"])
    assert (pred / "summary.json").read_text() == nnunet_summary
    (pred / "summary.json").unlink()
    for _ in range(2):  # the second run replaces the first one's own summary
        evaluate_entry(["-ref", str(dataset["ref"]), "-pred", str(pred), "-np", "1", "--no-plot"])
    assert "skcdf" in json.loads((pred / "summary.json").read_text())


def test_cli_usage_errors(dataset, capsys):
    ref, p = str(dataset["ref"]), dataset["pred"]
    assert "need an output folder" in _error(capsys, ["-ref", ref, "-pred", str(p / "A_run1"), str(p / "B")])
    assert "give one name per folder" in _error(
        capsys, ["-ref", ref, "-pred", str(p / "A_run1"), str(p / "B"), "--method", "A", "-o", str(p / "o")])
    assert "no class called 'pancreas'" in _error(
        capsys, ["-ref", ref, "-pred", str(p / "B"), "--nsd-tolerance", "pancreas=3"])


def test_shape_mismatch(dataset, capsys):
    write(np.zeros((6, 12, 10), np.uint8), dataset["pred"] / "B" / "case_000.nii.gz")
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(dataset["pred"] / "B")])
    assert "shape (6, 12, 10) differs from the reference" in err


def _write_with_geometry(labels: np.ndarray, path: Path, **geometry) -> None:
    image = sitk.GetImageFromArray(labels.astype(np.uint8))
    image.SetSpacing(geometry.get("spacing", SITK_SPACING))
    image.SetOrigin(geometry.get("origin", (0.0, 0.0, 0.0)))
    image.SetDirection(geometry.get("direction", (1, 0, 0, 0, 1, 0, 0, 0, 1)))
    sitk.WriteImage(image, str(path))


@pytest.mark.parametrize("geometry, message", [
    ({"direction": (-1, 0, 0, 0, 1, 0, 0, 0, 1)},
     r"p\.nii\.gz: direction \(-1, 0, 0, 0, 1, 0, 0, 0, 1\) differs from the reference .*r\.nii\.gz "
     r"\(1, 0, 0, 0, 1, 0, 0, 0, 1\).*flipped or permuted"),
    ({"origin": (0.0, 0.0, 30.0)}, r"p\.nii\.gz: origin \(0, 0, 30\) \(mm\) differs from the reference .*\(0, 0, 0\)"),
    ({"spacing": (1.3, 0.7, 2.5)}, r"p\.nii\.gz: spacing \[2\.5, 0\.7, 1\.3\] differs from the reference .*"
                                   r"\[3(\.0)?, 0\.7, 1\.3\] \(z, y, x order\)"),
])
def test_prediction_on_another_grid_is_refused(tmp_path, geometry, message):
    """Same shape, but flipped, shifted or rescaled: the voxels do not correspond, so the metrics would be wrong."""
    labels = _reference_cases()["case_000"]
    _write_with_geometry(labels, tmp_path / "r.nii.gz")
    _write_with_geometry(labels, tmp_path / "p.nii.gz", **geometry)
    with pytest.raises(SKCDFInputError, match=message) as e:
        evaluate_case(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz"))
    assert "np." not in str(e.value)  # plain numbers, not np.float64(0.7)
    _write_with_geometry(labels, tmp_path / "p.nii.gz", origin=(0.0, 0.0, 1e-5))  # header rounding is fine
    assert evaluate_case(job(tmp_path / "r.nii.gz", tmp_path / "p.nii.gz"))["metrics"][1]["Dice"] == 1.0


@pytest.mark.parametrize("role, case, cut", [
    ("prediction", "case_001", "end"), ("prediction", "case_001", "half"), ("prediction", "case_000", "empty"),
    ("reference", "case_001", "end"), ("reference", "case_000", "empty"),  # case_000: nnU-Net picks its reader by it
])
def test_truncated_or_empty_file_is_refused_naming_it_and_nothing_is_written(dataset, capsys, role, case, cut):
    """Was: a prediction cut to half its bytes scored silently (a perfect prediction got mean Dice 0.56, exit 0); a
    zero-byte file ended in a SimpleITK RuntimeError traceback."""
    pred = dataset["pred"] / "A_run1"
    target = (pred if role == "prediction" else dataset["ref"]) / f"{case}.nii.gz"
    data = target.read_bytes()
    # "end": the last 16 bytes lost (gzip's CRC and length among them), which SimpleITK reads without complaint
    target.write_bytes({"end": data[:-16], "half": data[: len(data) // 2], "empty": b""}[cut])
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(pred)])
    reason = ("the file is empty, 0 bytes" if cut == "empty" else
              "EOFError: Compressed file ended before the end-of-stream marker was reached")
    fix = "predict this case again" if role == "prediction" else "copy the reference segmentation again"
    assert f"ERROR: {target}: cannot be read ({reason}). The file is truncated or corrupt; {fix}" in err, err
    assert "nothing was written" in err and "Traceback" not in err
    assert sorted(p.name for p in pred.iterdir()) == ["case_000.nii.gz", "case_001.nii.gz"]  # no summary, no table


def test_complete_file_that_is_no_image_is_refused_naming_it(dataset, capsys):
    """A whole gzip stream that holds no image passes the completeness check; the reader's failure names the file."""
    import gzip

    pred = dataset["pred"] / "A_run1"
    (pred / "case_001.nii.gz").write_bytes(gzip.compress(b"not an image" * 100))
    err = _error(capsys, ["-ref", str(dataset["ref"]), "-pred", str(pred)])
    assert f"ERROR: {pred / 'case_001.nii.gz'}: cannot be read (RuntimeError: " in err
    assert "not a segmentation; write or copy it again" in err and "Traceback" not in err
    assert not (pred / "summary.json").exists()


def test_table_cell_says_how_many_runs_gave_a_value():
    from nnunetv2_skcdf.evaluation.evaluate import _run_stat
    from nnunetv2_skcdf.evaluation.paper_table import format_cell

    nan = float("nan")
    # an organ that every case of two runs missed has no ASD in those runs: the cell names the one run left
    assert format_cell(_run_stat([5.0, nan, nan])) == "5.00 (1/3 runs)"
    assert format_cell(_run_stat([5.0, 7.0, nan])) == "6.00 ± 1.00 (2/3 runs)"
    assert format_cell(_run_stat([5.0, 7.0, 6.0])) == "6.00 ± 0.82"
    assert format_cell(_run_stat([5.0])) == "5.00"
    assert format_cell(_run_stat([nan, nan])) == "n/a"
    assert format_cell({"mean": 0.5, "std": 0.1, "n_runs": 2}, scale=100, digits=1) == "50.0 ± 10.0"  # no per_run
