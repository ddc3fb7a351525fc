"""Per-case time of ``skcdf_evaluate``'s metrics on a Synapse-sized case: bounding-box crops vs full volume.

Generates one 512 x 512 x 120 label map (z, y, x; spacing 3.0 x 0.78 x 0.78 mm) with the 13 Synapse organs as
ellipsoids of roughly real size (liver ~1.5 l, adrenal glands ~2 ml) and a prediction from it (every organ
shifted by 1-4 mm and rescaled by +-8 %, one organ missed, one spurious blob), writes both as .nii.gz and times

- ours: ``evaluate_case`` = read both files with nnU-Net's reader + every metric of every class (Dice, IoU,
  TP/FP/FN/TN, ASD, ASSD, HD95, NSD, islands) in the bounding box of each class; median of ``--repeats`` runs;
- full volume: the same metrics with full-volume masks and full-volume distance transforms (what medpy's
  functions do; one EDT per direction and class), arrays already in memory; median of ``--full-repeats``;
- medpy: ``medpy.metric.binary.asd`` alone for the liver (one full-volume EDT), to tie the figure to medpy.

Checks that both give identical metrics, prints the figures, writes ``benchmarks/results/evaluation_speed.json``
and the ``evaluation_speed`` section of ``BENCHMARKS.md``.

    python benchmarks/evaluation_speed.py [--repeats 5] [--full-repeats 1] [--rewrite-section]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import REPO, machine, write_section  # noqa: E402

SHAPE = (120, 512, 512)  # z, y, x
SPACING = (3.0, 0.78, 0.78)  # mm, z, y, x
#: label -> (centre z, y, x in mm from the volume corner, semi-axes z, y, x in mm); Synapse label ids
ORGANS = {
    1: ((170, 180, 300), (50, 35, 28)),   # spleen
    2: ((200, 240, 130), (45, 28, 25)),   # right kidney
    3: ((200, 240, 270), (45, 28, 25)),   # left kidney
    4: ((170, 120, 165), (30, 15, 15)),   # gallbladder
    5: ((90, 200, 215), (60, 8, 8)),      # esophagus
    6: ((120, 170, 110), (70, 80, 65)),   # liver
    7: ((140, 130, 260), (60, 45, 40)),   # stomach
    8: ((200, 230, 205), (150, 12, 12)),  # aorta
    9: ((190, 220, 170), (120, 12, 10)),  # inferior vena cava
    10: ((170, 170, 200), (20, 8, 50)),   # portal and splenic veins
    11: ((190, 180, 230), (20, 15, 70)),  # pancreas
    12: ((140, 250, 150), (20, 3, 10)),   # right adrenal gland
    13: ((140, 250, 250), (20, 3, 10)),   # left adrenal gland
}


def paint_ellipsoid(labels: np.ndarray, label: int, centre_mm, axes_mm) -> None:
    """Set the voxels inside the ellipsoid (mm, z, y, x) to ``label``, working only in its bounding box."""
    spacing = np.asarray(SPACING)
    lo = np.maximum(np.floor((np.asarray(centre_mm) - axes_mm) / spacing).astype(int), 0)
    hi = np.minimum(np.ceil((np.asarray(centre_mm) + axes_mm) / spacing).astype(int) + 1, SHAPE)
    grids = np.ogrid[tuple(slice(a, b) for a, b in zip(lo, hi))]
    inside = sum(((g * s - c) / r) ** 2 for g, s, c, r in zip(grids, spacing, centre_mm, axes_mm)) <= 1
    labels[tuple(slice(a, b) for a, b in zip(lo, hi))][inside] = label


def make_case(seed: int = 0):
    """``(reference, prediction)`` uint8 label maps of shape ``SHAPE``."""
    rng = np.random.default_rng(seed)
    ref, pred = np.zeros(SHAPE, np.uint8), np.zeros(SHAPE, np.uint8)
    # largest first, so that overlapping small organs stay visible (drawn on top)
    for label, (centre, axes) in sorted(ORGANS.items(), key=lambda item: -np.prod(item[1][1])):
        paint_ellipsoid(ref, label, centre, axes)
        if label == 13:  # one missed organ
            continue
        shift = rng.uniform(1, 4, 3) * rng.choice([-1, 1], 3)
        paint_ellipsoid(pred, label, np.asarray(centre) + shift, np.asarray(axes) * rng.uniform(0.92, 1.08, 3))
    paint_ellipsoid(pred, 4, (60, 300, 300), (6, 5, 5))  # a spurious gallbladder blob far from the real one
    return ref, pred


def write_nifti(labels: np.ndarray, path: str) -> None:
    import SimpleITK as sitk

    image = sitk.GetImageFromArray(labels)
    image.SetSpacing(SPACING[::-1])  # SimpleITK wants x, y, z
    sitk.WriteImage(image, path, useCompression=True)


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def full_volume_metrics(ref: np.ndarray, pred: np.ndarray, spacing, tolerances: dict) -> dict:
    """Reference computation: full-volume masks, counts and distance transforms, no bounding boxes."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn

    from nnunetv2_skcdf.evaluation.evaluate import island_metrics, overlap_metrics
    from nnunetv2_skcdf.evaluation.surface_metrics import surface_metrics

    out = {}
    for label in ORGANS:
        mask_ref, mask_pred = ref == label, pred == label
        tp, fp, fn, tn = (int(v) for v in compute_tp_fp_fn_tn(mask_ref, mask_pred))
        out[label] = {**overlap_metrics(tp, fp, fn, tn),
                      **surface_metrics(mask_pred, mask_ref, spacing, tolerances[label], crop=False),
                      **island_metrics(mask_pred, mask_ref, float(np.prod(spacing)))}
    return out


def same(a: dict, b: dict) -> bool:
    return all(np.allclose(a[k][m], b[k][m], equal_nan=True, rtol=1e-12) for k in a for m in a[k])


def measure(repeats: int, full_repeats: int, folder: str) -> dict:
    from medpy.metric.binary import asd

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from nnunetv2_skcdf.evaluation.evaluate import CaseJob, evaluate_case, read_label_map, resolve_nsd_tolerances
    from nnunetv2_skcdf.dataset_conversion.labels import synapse_labels_dict

    ref, pred = make_case()
    ref_file, pred_file = os.path.join(folder, "ref.nii.gz"), os.path.join(folder, "pred.nii.gz")
    write_nifti(ref, ref_file)
    write_nifti(pred, pred_file)
    names = {str(v): k for k, v in synapse_labels_dict().items()}
    tolerances = resolve_nsd_tolerances(None, tuple(ORGANS), names)
    job = CaseJob(ref_file, pred_file, SimpleITKIO, tuple(ORGANS), tuple(range(14)), None, tolerances)
    evaluate_case(job)  # warm-up: imports, page cache
    ours = [timed(evaluate_case, job) for _ in range(repeats)]
    # the spacing as read back (NIfTI stores float32: 0.78 -> 0.7799999713...), so that results must be equal
    spacing = read_label_map(ref_file, SimpleITKIO)[1]
    full = [timed(full_volume_metrics, ref, pred, spacing, tolerances) for _ in range(full_repeats)]
    _, t_medpy = timed(asd, pred == 6, ref == 6, spacing)
    ours_metrics = {k: v for k, v in ours[0][0]["metrics"].items()}
    sizes = {label: int(np.count_nonzero(ref == label)) for label in ORGANS}
    return {
        "shape_zyx": list(SHAPE), "spacing_zyx_mm": list(SPACING),
        "organ_voxels_reference": sizes,
        "ours_s": [t for _, t in ours], "ours_s_median": statistics.median(t for _, t in ours),
        "full_volume_s": [t for _, t in full], "full_volume_s_median": statistics.median(t for _, t in full),
        "medpy_asd_liver_s": t_medpy,
        "identical_metrics": same(ours_metrics, full[0][0]),
        "mean_dice": float(np.mean([m["Dice"] for m in ours_metrics.values()])),
    }


def previous_run(path: Path):
    """Key figures of the last saved run (to show run-to-run stability on a shared machine), or None."""
    if not path.exists():
        return None
    r = json.loads(path.read_text())
    return {k: r[k] for k in ("date", "ours_s_median", "full_volume_s_median") if k in r}


def markdown(r: dict, command: str) -> str:
    ratio = r["full_volume_s_median"] / r["ours_s_median"]
    sizes = r["organ_voxels_reference"].values()
    prev = r.get("previous_run")
    stability = (f" Previous run ({prev['date']}): ours {prev['ours_s_median']:.2f} s, full volume "
                 f"{prev['full_volume_s_median']:.1f} s." if prev else "")
    return f"""## Evaluation speed per case (`benchmarks/evaluation_speed.py`)

Command: `{command}` — {r['date']} — {r['machine']} (shared with other jobs while measured)

One synthetic Synapse-sized case: {r['shape_zyx']} voxels (z, y, x), spacing {r['spacing_zyx_mm']} mm, the 13
Synapse organs as ellipsoids of realistic size ({min(sizes)} to {max(sizes)} voxels); prediction = organs shifted
by 1-4 mm and rescaled by up to 8 %, one organ missed, one spurious blob. All metrics of all 13 classes (Dice, IoU,
TP/FP/FN/TN, ASD, ASD_ref_to_pred, ASSD, HD95, NSD, islands).

| computation | per case | repetitions |
|---|---|---|
| ours: `evaluate_case` (read 2 x .nii.gz + bounding-box crops) | **{r['ours_s_median']:.2f} s** median (min {min(r['ours_s']):.2f}, max {max(r['ours_s']):.2f}) | {len(r['ours_s'])} |
| full volume: same metrics, masks and EDTs on the whole array (arrays already in memory) | {r['full_volume_s_median']:.1f} s | {len(r['full_volume_s'])} |
| medpy `asd(pred, ref)`, liver only (one full-volume EDT) | {r['medpy_asd_liver_s']:.1f} s | 1 |

Speed-up {ratio:.0f}x; identical metrics (crop vs full volume): {r['identical_metrics']}. Target: <= 3 s per
case.{stability}"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--full-repeats", type=int, default=1)
    parser.add_argument("--rewrite-section", action="store_true",
                        help="only re-render the BENCHMARKS.md section from the saved JSON (no measuring)")
    args = parser.parse_args()
    out = REPO / "benchmarks" / "results" / "evaluation_speed.json"
    if args.rewrite_section:
        results = json.loads(out.read_text())
    else:
        with tempfile.TemporaryDirectory(prefix="skcdf_eval_bench_") as folder:
            results = {"date": datetime.date.today().isoformat(), "machine": machine(),
                       **measure(args.repeats, args.full_repeats, folder), "previous_run": previous_run(out)}
            results["command"] = " ".join(["python", f"benchmarks/{Path(__file__).name}", *sys.argv[1:]])
        print(json.dumps(results, indent=2))
        out.write_text(json.dumps(results, indent=2) + "\n")
    write_section("evaluation_speed", markdown(results, results["command"]))


if __name__ == "__main__":
    main()
