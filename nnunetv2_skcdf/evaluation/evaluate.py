"""``skcdf_evaluate``: nnU-Net's folder evaluation plus surface metrics, empty-mask rules and paper tables.

For every case and class: nnU-Net's Dice, IoU, TP, FP, FN, TN, n_pred, n_ref (``compute_tp_fp_fn_tn`` and
``region_or_label_to_mask`` of ``nnunetv2.evaluation.evaluate_predictions``, same formulas), plus ASD,
ASD_ref_to_pred, ASSD, HD95 and NSD (``surface_metrics``):

- ASD = directed mean distance prediction surface -> reference surface (``medpy.metric.binary.asd(pred, ref)``,
  the SKCDF paper's metric).
- ASSD = mean of the pooled distances of both directions (Heimann et al. 2009; medpy >= 0.5). medpy < 0.5
  averaged the two directed means instead: ``(ASD + ASD_ref_to_pred) / 2``.
- HD95 = 95th percentile of the pooled distances of both directions (``medpy.metric.binary.hd95``).
- NSD = share of surface voxels of both masks within a tolerance of the other surface (surface Dice). Default
  tolerances per organ (mm) are the FLARE22 challenge's official ones (``DEFAULT_NSD_TOLERANCE_MM``).

Files. Every reference and prediction is checked before it is read: an empty (0 bytes) or truncated file (gzip
stream checked to its end-of-stream marker and CRC, as for ``imagesUnlabeled``) is refused naming it, and nothing is
written (SimpleITK would score a truncated ``.nii.gz`` silently, with garbage for the missing voxels).

Distances are in mm from the image spacing (numpy ``z, y, x`` order; nnU-Net's reader already reverses
SimpleITK's ``x, y, z``), or in voxels with ``--voxel-units``. Surfaces use the connectivity-1 erosion as in
medpy. Single-slice images are evaluated as 2D.

Empty masks. Default (nnU-Net) rules: Dice NaN when both masks are empty (0 when one is); all surface metrics
NaN when either mask is empty; means over cases ignore NaN and ``summary.json['skcdf']`` says how many cases
contributed. Missed organs (reference non-empty, prediction empty) and spurious organs (prediction non-empty,
reference empty) are counted per class.

Islands. ``n_islands`` = connected components of the prediction (full connectivity: 26 neighbours in 3D, 8 in
2D) that share no voxel with the reference, ``island_volume`` = their total volume (mm^3, or voxels with
``--voxel-units``): false-positive components such as a small organ predicted on the body wall, which Dice and
the means of surface distances barely see. A component that overlaps the reference by one voxel is not an
island; when the reference is empty every predicted component is one. Voxels with the ignore label are not
prediction voxels here either. The empty-mask rules do not change them; sums over cases (and runs) are reported
per class. ``--paper-rules`` reproduces the SKCDF paper's protocol instead: one
mask empty -> Dice 0, ASD (and ASD_ref_to_pred, ASSD, HD95) 128, NSD 0; both empty -> Dice 1 (= 100 % in
tables), distances 0, NSD 1. (The published code stored 1 for Dice on a 0-100 scale, a scale slip; 100 % is
what it means and what we use.) IoU follows Dice under paper rules.

Outputs. ``summary.json`` has nnU-Net's layout (``metric_per_case``, ``mean``, ``foreground_mean``; Dice on
nnU-Net's 0..1 scale) with the extra metrics per label and a top-level ``skcdf`` section (rules, units,
tolerances, per-class counts), so ``nnunetv2.evaluation.evaluate_predictions.load_summary_json`` and
``skcdf_dice_table`` read it. ``foreground_mean`` uses ``nanmean`` over classes (nnU-Net's plain mean is NaN as
soon as one class has no valid case). ``metrics_per_case.csv`` has one row per case and class.

- One prediction folder, no ``-o``: everything goes into the prediction folder (like nnU-Net):
  ``summary.json``, ``metrics_per_case.csv``, ``aggregate.json``, ``paper_table.md``, ``dice_per_class.png``.
- With ``-o OUT`` (required for several folders): ``OUT/runs/<method>_run<k>/summary.json`` and
  ``metrics_per_case.csv`` per prediction folder (the prediction folders are not touched), and
  ``OUT/aggregate.json``, ``OUT/paper_table.md``, ``OUT/dice_per_class.png``. Folders with the same
  ``--method`` name are runs of one method: tables show mean +- std over runs (numpy std, ddof=0, as the
  paper's code).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from scipy.ndimage import find_objects, generate_binary_structure, label

from nnunetv2_skcdf.evaluation.paper_table import (STD_DDOF, canonical_organ, column_title, normalise_name,
                                                   plot_dice_per_class, write_paper_table)
from nnunetv2_skcdf.evaluation.surface_metrics import SURFACE_METRICS, nan_metrics, surface_metrics
from nnunetv2_skcdf.preprocessing.image_checks import check_file_complete
from nnunetv2_skcdf.utilities.dataset_files import (SKCDFInputError, exit_on_input_error, format_numbers,
                                                    load_checked_dataset_json, plain)
from nnunetv2_skcdf.utilities.io import atomic_output, atomic_save_json
from nnunetv2_skcdf.utilities.parallel import imap_with_progress

Region = Union[int, Tuple[int, ...]]

#: NSD tolerance per organ in mm. Source: the official FLARE22 evaluation script (JunMa11/FLARE,
#: FLARE22/Evaluation/FLARE22_DSC_NSD_Eval.py), which covers 12 Synapse organs and the duodenum. Not in FLARE22,
#: chosen by analogy: portal/splenic veins 2 mm (FLARE22's value for the other vessels, aorta and IVC), bladder
#: 3 mm (a well-contrasted mid-size organ like kidneys and spleen), prostate/uterus 5 mm (a low-contrast soft
#: tissue boundary like pancreas, stomach and liver).
DEFAULT_NSD_TOLERANCE_MM: Dict[str, float] = {
    "spleen": 3.0, "right_kidney": 3.0, "left_kidney": 3.0, "gallbladder": 2.0, "esophagus": 3.0, "liver": 5.0,
    "stomach": 5.0, "aorta": 2.0, "inferior_vena_cava": 2.0, "portal_and_splenic_veins": 2.0, "pancreas": 5.0,
    "right_adrenal_gland": 2.0, "left_adrenal_gland": 2.0, "duodenum": 7.0, "bladder": 3.0,
    "prostate_uterus": 5.0,
}
#: tolerance for classes that are none of the organs above: the median of FLARE22's 13 values
FALLBACK_NSD_TOLERANCE_MM = 3.0
#: distance reported under --paper-rules when exactly one mask is empty (the paper code's constant)
PAPER_EMPTY_DISTANCE = 128.0
#: metrics that aggregate.json and the tables summarise over runs
AGGREGATED_METRICS = ("Dice", "IoU", "ASD", "ASSD", "HD95", "NSD")
#: island metrics of a class with no predicted voxel (see ``island_metrics``)
NO_ISLANDS = {"n_islands": 0, "island_volume": 0.0}

SUMMARY_FILE = "summary.json"
CASES_CSV = "metrics_per_case.csv"
AGGREGATE_FILE = "aggregate.json"
TABLE_FILE = "paper_table.md"
PLOT_FILE = "dice_per_class.png"
OUTPUT_FILES = (SUMMARY_FILE, CASES_CSV, AGGREGATE_FILE, TABLE_FILE, PLOT_FILE)


# ---------------------------------------------------------------------------------------------------- one case
@dataclass(frozen=True)
class CaseJob:
    """Everything a worker process needs to evaluate one (reference, prediction) pair."""
    reference_file: str
    prediction_file: str
    reader_writer: type  # an nnU-Net BaseReaderWriter subclass
    regions: Tuple[Region, ...]
    allowed_labels: Tuple[int, ...]
    ignore_label: Optional[int]
    nsd_tolerances: Dict[Region, float]  # per region, in mm (voxels with voxel_units)
    voxel_units: bool = False
    paper_rules: bool = False


def read_label_map(path: str, reader_writer: type) -> Tuple[np.ndarray, np.ndarray]:
    """``(labels, spacing)``: integer label map of shape ``(Z, Y, X)`` (``(Y, X)`` for 2D images) and its spacing
    in mm in the same axis order, read with nnU-Net's reader (which reverses SimpleITK's x, y, z spacing)."""
    labels, spacing, _ = read_label_map_and_geometry(path, reader_writer)
    return labels, spacing


#: what to do about an unreadable file, per role (``check_readable``)
_REREAD_FIX = {"prediction": "predict this case again (or copy the complete file again); nothing was written",
               "reference": "copy the reference segmentation again from its source; nothing was written"}


def check_readable(path: str, role: str) -> None:
    """Refuse an empty or truncated ``role`` file (``'prediction'`` or ``'reference'``) before it is read: nnU-Net's
    SimpleITK reader scores a truncated ``.nii.gz`` silently (the missing voxels become garbage) and fails on a
    zero-byte file with a traceback. The completeness check of ``imagesUnlabeled`` (``check_file_complete``)."""
    check_file_complete(path, fix=_REREAD_FIX[role])


def read_label_map_and_geometry(path: str, reader_writer: type) -> Tuple[np.ndarray, np.ndarray, Dict[str, tuple]]:
    """``read_label_map`` plus the header's origin and direction (``header_geometry``)."""
    try:
        seg, properties = reader_writer().read_seg(path)
    except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
        reason = (str(e).strip().splitlines() or [""])[-1]
        raise SKCDFInputError(f"{path}: cannot be read ({type(e).__name__}: {reason}). The file is truncated, corrupt "
                              f"or not a segmentation; write or copy it again.") from None
    seg, spacing = seg[0], np.asarray(properties["spacing"], dtype=np.float64)
    if seg.ndim == 3 and seg.shape[0] == 1:
        # nnU-Net gives 2D images a dummy first axis (spacing 999 x max); kept, it would make every voxel of a
        # one-voxel-thick object a surface voxel
        seg, spacing = seg[0], spacing[1:]
    return _as_labels(seg, path), spacing, header_geometry(properties)


def header_geometry(properties: dict) -> Dict[str, tuple]:
    """Origin and direction as nnU-Net's reader saw them: ``sitk_stuff`` (SimpleITK readers) or the NIfTI affine
    (nibabel readers, ``nibabel_stuff``). Empty for readers without a geometry (PNG, TIFF)."""
    sitk_stuff = properties.get("sitk_stuff")
    if sitk_stuff:
        return {"origin": tuple(sitk_stuff["origin"]), "direction": tuple(sitk_stuff["direction"])}
    nibabel_stuff = properties.get("nibabel_stuff")
    if nibabel_stuff:
        return {"affine": tuple(np.ravel(nibabel_stuff["original_affine"]))}
    return {}


def _as_labels(seg: np.ndarray, path: str) -> np.ndarray:
    """Smallest unsigned integer copy of ``seg`` (nnU-Net reads segmentations as float32)."""
    lowest, highest = seg.min(), seg.max()
    if lowest < 0:
        raise SKCDFInputError(f"{path}: negative value {plain(lowest)}; a segmentation must hold label ids >= 0.")
    labels = seg.astype(np.uint8 if highest < 256 else np.uint16 if highest < 65536 else np.int64)
    if not np.array_equal(labels, seg):
        raise SKCDFInputError(f"{path}: non-integer values; expected a label map (is this a probability map?).")
    return labels


def _check_labels(path: str, boxes: list, allowed: Sequence[int]) -> None:
    """``boxes`` = ``find_objects(labels)``; every present label must be one of ``allowed``."""
    unknown = sorted(i + 1 for i, box in enumerate(boxes) if box is not None and i + 1 not in allowed)
    if unknown:
        raise SKCDFInputError(f"{path}: label values {unknown} are not in dataset.json (labels "
                              f"{plain(sorted(allowed))}). Use the dataset.json the model was trained with (-djfile), "
                              f"or fix the file.")


#: how far a prediction's header may be from the reference's: header rounding, not another grid (the converters'
#: image/label tolerances, ``dataset_conversion.conversion_common``)
ORIGIN_ATOL_MM = 1e-3  # plus ORIGIN_RTOL x origin for large coordinates
ORIGIN_RTOL = 1e-4
DIRECTION_ATOL = 1e-4
_GEOMETRY_PROBLEM = {
    "direction": "the prediction's axes are flipped or permuted relative to the reference (or it belongs to another "
                 "image)",
    "origin": "the prediction is shifted relative to the reference (or it belongs to another image)",
    "affine": "the prediction's NIfTI affine (orientation, origin, spacing) differs from the reference's",
}


def _check_same_grid(job: CaseJob, ref: np.ndarray, pred: np.ndarray, ref_spacing, pred_spacing,
                     ref_geometry: Optional[dict] = None, pred_geometry: Optional[dict] = None) -> None:
    """Shape, spacing, then origin and direction (when the reader has them): with any of them different, voxel i of
    the prediction is not voxel i of the reference and every metric would be wrong."""
    if ref.shape != pred.shape:
        raise SKCDFInputError(f"{job.prediction_file}: shape {pred.shape} differs from the reference "
                              f"{job.reference_file} {ref.shape}. Predictions must be on the reference grid "
                              f"(nnU-Net's predictions are; resample others to the reference image).")
    if not np.allclose(ref_spacing, pred_spacing, rtol=1e-3, atol=1e-5):
        raise SKCDFInputError(f"{job.prediction_file}: spacing {plain(list(pred_spacing))} differs from the "
                              f"reference {job.reference_file} {plain(list(ref_spacing))} (z, y, x order). Copy the "
                              f"reference geometry into the prediction or resample it.")
    ref_geometry, pred_geometry = ref_geometry or {}, pred_geometry or {}
    for key in ("direction", "origin", "affine"):
        a, b = ref_geometry.get(key), pred_geometry.get(key)
        rtol, atol = (0.0, DIRECTION_ATOL) if key == "direction" else (ORIGIN_RTOL, ORIGIN_ATOL_MM)
        if a is not None and b is not None and not np.allclose(b, a, rtol=rtol, atol=atol):
            unit = " (mm)" if key == "origin" else ""
            raise SKCDFInputError(
                f"{job.prediction_file}: {key} {format_numbers(b)}{unit} differs from the reference "
                f"{job.reference_file} {format_numbers(a)}: {_GEOMETRY_PROBLEM[key]}, so its voxels do not "
                f"correspond. Predict from the image that belongs to this reference (nnU-Net's predictions keep the "
                f"image's geometry), or, if the voxels do correspond, copy the reference geometry into the "
                f"prediction (SimpleITK: prediction.CopyInformation(reference)).")


def region_box(region: Region, ref_boxes: list, pred_boxes: list, shape: Tuple[int, ...],
               margin: int = 1) -> Optional[Tuple[slice, ...]]:
    """Bounding box (slices) of ``region`` in reference or prediction, grown by ``margin`` voxels and clipped to
    ``shape``; ``None`` when the region is empty in both. ``*_boxes`` = ``scipy.ndimage.find_objects`` output."""
    labels = region if isinstance(region, tuple) else (region,)
    if 0 in labels:  # background has no find_objects entry: use everything
        return tuple(slice(0, n) for n in shape)
    found = [boxes[lab - 1] for boxes in (ref_boxes, pred_boxes) for lab in labels
             if lab <= len(boxes) and boxes[lab - 1] is not None]
    if not found:
        return None
    return tuple(slice(max(min(b[a].start for b in found) - margin, 0),
                       min(max(b[a].stop for b in found) + margin, shape[a])) for a in range(len(shape)))


def overlap_metrics(tp: int, fp: int, fn: int, tn: int) -> Dict[str, float]:
    """nnU-Net's per-class entries, same keys, order and formulas as ``compute_metrics``."""
    empty = tp + fp + fn == 0
    return {"Dice": np.nan if empty else 2 * tp / (2 * tp + fp + fn), "IoU": np.nan if empty else tp / (tp + fp + fn),
            "FP": fp, "TP": tp, "FN": fn, "TN": tn, "n_pred": fp + tp, "n_ref": fn + tp}


def island_metrics(pred: np.ndarray, ref: np.ndarray, voxel_volume: float) -> Dict[str, float]:
    """Connected components of ``pred`` (full connectivity) that share no voxel with ``ref``: how many, and their
    total volume (``voxel_volume`` per voxel). Every component is an island when ``ref`` is empty."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if not pred.any():
        return dict(NO_ISLANDS)
    components, n = label(pred, structure=generate_binary_structure(pred.ndim, pred.ndim))
    island = np.ones(n + 1, dtype=bool)
    island[0] = False  # background
    island[components[ref]] = False  # components with at least one reference voxel
    sizes = np.bincount(components.ravel(), minlength=n + 1)
    return {"n_islands": int(island.sum()), "island_volume": float(sizes[island].sum() * voxel_volume)}


def apply_paper_rules(metrics: Dict[str, float]) -> Dict[str, float]:
    """The SKCDF paper's empty-mask values (see module doc); cases with two non-empty masks are unchanged."""
    pred_empty, ref_empty = metrics["n_pred"] == 0, metrics["n_ref"] == 0
    if not (pred_empty or ref_empty):
        return metrics
    both = pred_empty and ref_empty
    distance = 0.0 if both else PAPER_EMPTY_DISTANCE
    return {**metrics, "Dice": float(both), "IoU": float(both), "NSD": float(both),
            **{name: distance for name in SURFACE_METRICS if name != "NSD"}}


def region_metrics(job: CaseJob, region: Region, ref: np.ndarray, pred: np.ndarray, ignore: Optional[np.ndarray],
                   box: Optional[Tuple[slice, ...]], n_valid: int, spacing: np.ndarray) -> Dict[str, float]:
    """All metrics of one class, computed inside ``box`` (counts outside it are true negatives)."""
    from nnunetv2.evaluation.evaluate_predictions import compute_tp_fp_fn_tn, region_or_label_to_mask

    if box is None:
        metrics = {**overlap_metrics(0, 0, 0, n_valid), **nan_metrics(), **NO_ISLANDS}
    else:
        ignore_crop = None if ignore is None else ignore[box]
        mask_ref, mask_pred = region_or_label_to_mask(ref[box], region), region_or_label_to_mask(pred[box], region)
        tp, fp, fn, _ = (int(v) for v in compute_tp_fp_fn_tn(mask_ref, mask_pred, ignore_crop))
        if ignore_crop is not None:  # surfaces, like the counts, only see prediction voxels outside the ignore label
            mask_pred = mask_pred & ~ignore_crop
        # the box is already the union bounding box plus one voxel, so no further cropping (crop=False)
        metrics = {**overlap_metrics(tp, fp, fn, n_valid - tp - fp - fn),
                   **surface_metrics(mask_pred, mask_ref, spacing, job.nsd_tolerances[region], crop=False),
                   **island_metrics(mask_pred, mask_ref, float(np.prod(spacing)))}
    return apply_paper_rules(metrics) if job.paper_rules else metrics


def evaluate_case(job: CaseJob) -> dict:
    """One case in nnU-Net's ``compute_metrics`` layout: ``{'reference_file', 'prediction_file', 'metrics':
    {region: {metric: value}}}``. Bounding boxes of all labels come from one ``find_objects`` pass per image."""
    check_readable(job.reference_file, "reference")
    check_readable(job.prediction_file, "prediction")
    ref, ref_spacing, ref_geometry = read_label_map_and_geometry(job.reference_file, job.reader_writer)
    pred, pred_spacing, pred_geometry = read_label_map_and_geometry(job.prediction_file, job.reader_writer)
    _check_same_grid(job, ref, pred, ref_spacing, pred_spacing, ref_geometry, pred_geometry)
    ref_boxes, pred_boxes = find_objects(ref), find_objects(pred)
    _check_labels(job.reference_file, ref_boxes, job.allowed_labels)
    _check_labels(job.prediction_file, pred_boxes, job.allowed_labels)
    ignore = None if job.ignore_label is None else ref == job.ignore_label
    n_valid = ref.size - (0 if ignore is None else int(np.count_nonzero(ignore)))
    spacing = np.ones(ref.ndim) if job.voxel_units else ref_spacing
    metrics = {r: region_metrics(job, r, ref, pred, ignore, region_box(r, ref_boxes, pred_boxes, ref.shape),
                                 n_valid, spacing) for r in job.regions}
    return {"reference_file": job.reference_file, "prediction_file": job.prediction_file, "metrics": metrics}


def _evaluate_indexed(item: Tuple[Tuple[int, int], CaseJob]) -> Tuple[Tuple[int, int], dict]:
    key, job = item
    return key, evaluate_case(job)


# -------------------------------------------------------------------------------------------- one run (folder)
def nanmean(values) -> float:
    """Mean ignoring NaN; NaN (without a warning) when nothing is left."""
    values = np.asarray(values, dtype=np.float64)
    return float(np.nanmean(values)) if np.any(~np.isnan(values)) else float("nan")


def class_counts(cases: List[dict], key: str) -> dict:
    """How many cases a class has, how many gave each metric a value, and the empty-mask events."""
    entries = [c["metrics"][key] for c in cases]
    n_pred = np.array([e["n_pred"] for e in entries])
    n_ref = np.array([e["n_ref"] for e in entries])
    return {
        "n_cases": len(entries),
        "n_valid": {m: int(np.sum(~np.isnan([float(e[m]) for e in entries]))) for m in ("Dice", "IoU", *SURFACE_METRICS)},
        "missed": int(np.sum((n_ref > 0) & (n_pred == 0))),
        "spurious": int(np.sum((n_pred > 0) & (n_ref == 0))),
        "both_empty": int(np.sum((n_pred == 0) & (n_ref == 0))),
        "islands": int(sum(e["n_islands"] for e in entries)),
        "island_volume": float(sum(e["island_volume"] for e in entries)),
    }


def summarize_run(cases: List[dict], regions: Sequence[Region], settings: dict, names: Dict[str, str]) -> dict:
    """nnU-Net's summary (``metric_per_case``, ``mean``, ``foreground_mean``) plus the ``skcdf`` section.

    Classes are keyed by nnU-Net's summary.json strings (``'1'``, ``'(1, 2)'``) already in memory;
    ``save_summary_json`` leaves such keys as they are.
    """
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    keys = [label_or_region_to_key(r) for r in regions]
    cases = [{**c, "metrics": {label_or_region_to_key(r): m for r, m in c["metrics"].items()}} for c in cases]
    metric_names = list(cases[0]["metrics"][keys[0]])
    mean = {k: {m: nanmean([c["metrics"][k][m] for c in cases]) for m in metric_names} for k in keys}
    foreground = {m: nanmean([mean[k][m] for k in keys if k != "0"]) for m in metric_names}
    counts = {k: {"name": names.get(k, ""), **class_counts(cases, k)} for k in keys}
    return {"metric_per_case": cases, "mean": mean, "foreground_mean": foreground,
            "skcdf": {**settings, "n_cases": len(cases), "per_class": counts}}


def write_summary(summary: dict, path: str) -> None:
    """nnU-Net's ``save_summary_json`` (tuple keys -> strings, sorted keys), written to a temp file + rename."""
    from nnunetv2.evaluation.evaluate_predictions import save_summary_json
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    recursive_fix_for_json_export(summary)
    with atomic_output(path, suffix=".json") as tmp:
        save_summary_json(summary, tmp)


def write_cases_csv(summary: dict, names: Dict[str, str], file_ending: str, path: str) -> None:
    """One row per case and class: case id, label key and name, then every metric (Dice etc. on 0..1)."""
    import pandas as pd

    rows = []
    for case in summary["metric_per_case"]:
        case_id = os.path.basename(case["reference_file"])[: -len(file_ending)]
        for key, metrics in case["metrics"].items():
            rows.append({"case": case_id, "label": key, "name": names.get(key, ""), **metrics})
    with atomic_output(path, suffix=".csv") as tmp:
        pd.DataFrame(rows).to_csv(tmp, index=False)


# ---------------------------------------------------------------------------------------------- several runs
def _run_stat(values: Sequence[float]) -> dict:
    values = np.asarray(values, dtype=np.float64)
    finite = values[~np.isnan(values)]
    return {"mean": float(finite.mean()) if finite.size else float("nan"),
            "std": float(finite.std(ddof=STD_DDOF)) if finite.size else float("nan"),
            "n_runs": int(finite.size), "per_run": values.tolist()}


def _sum_or_none(values: Sequence[Optional[float]]):
    return None if any(v is None for v in values) else sum(values)


def aggregate_runs(runs: List[dict], class_info: List[dict], settings: dict) -> dict:
    """Methods (runs grouped by name, first-appearance order) with mean/std over runs of every run's per-class
    means and class averages. ``runs``: ``[{'method', 'pred_folder', 'output_folder', 'summary'}]``.
    ``per_class[key][metric]['n_cases']`` = cases (summed over runs) that had a value (not NaN) for it."""
    methods: Dict[str, List[dict]] = {}
    for run in runs:
        methods.setdefault(run["method"], []).append(run)
    out = []
    for name, group in methods.items():
        summaries = [r["summary"] for r in group]
        per_class = {c["key"]: {m: {**_run_stat([s["mean"][c["key"]][m] for s in summaries]),
                                    "n_cases": sum(s["skcdf"]["per_class"][c["key"]]["n_valid"][m] for s in summaries)}
                                for m in AGGREGATED_METRICS} for c in class_info}
        out.append({
            "name": name,
            "runs": [{"pred_folder": r["pred_folder"], "output_folder": r["output_folder"],
                      "n_cases": r["summary"]["skcdf"]["n_cases"]} for r in group],
            "average": {m: _run_stat([s["foreground_mean"][m] for s in summaries]) for m in AGGREGATED_METRICS},
            "per_class": per_class,
            "missed": {c["key"]: sum(s["skcdf"]["per_class"][c["key"]]["missed"] for s in summaries)
                       for c in class_info},
            "spurious": {c["key"]: sum(s["skcdf"]["per_class"][c["key"]]["spurious"] for s in summaries)
                         for c in class_info},
            # summaries written before islands were counted have none: None (the tables say n/a)
            **{name: {c["key"]: _sum_or_none([s["skcdf"]["per_class"][c["key"]].get(name) for s in summaries])
                      for c in class_info} for name in ("islands", "island_volume")},
            "cases_evaluated": sum(s["skcdf"]["n_cases"] for s in summaries),
        })
    return {**settings, "std_ddof": STD_DDOF, "classes": class_info, "methods": out}


# ------------------------------------------------------------------------------------------ dataset and folders
def resolve_dataset_json(ref_folder: str, dataset_json_file: Optional[str]) -> str:
    """``-djfile`` or the nnU-Net raw layout's ``REF_FOLDER/../dataset.json``."""
    path = dataset_json_file or os.path.join(os.path.dirname(os.path.abspath(ref_folder)), "dataset.json")
    if not os.path.isfile(path):
        how = "" if dataset_json_file else (" (looked next to the reference folder, as in nnU-Net's raw layout "
                                            "DatasetXXX/labelsTr + DatasetXXX/dataset.json)")
        raise SKCDFInputError(f"dataset.json not found: {path}{how}. Pass it with -djfile "
                              f"$nnUNet_raw/DatasetXXX_Name/dataset.json.")
    return path


def _check_summaries_are_ours(folders: Sequence[str]) -> None:
    """Refuse to replace a summary.json that skcdf_evaluate did not write (it has no ``skcdf`` section), e.g.
    nnU-Net's own validation summary in a ``fold_X/validation`` folder, evaluated without ``-o``."""
    for folder in folders:
        path = os.path.join(folder, SUMMARY_FILE)
        if not os.path.isfile(path):
            continue
        try:
            with open(path) as f:
                ours = "skcdf" in json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError):
            ours = False
        if not ours:
            raise SKCDFInputError(f"{path} exists and was not written by skcdf_evaluate (nnU-Net's own validation "
                                  f"summary, or another tool's); it is left as it is. Write the evaluation "
                                  f"elsewhere with -o OUT_FOLDER, or move that file away first.")


def label_manager(dataset_json: dict, plans_file: Optional[str]):
    """nnU-Net's LabelManager from the plans (``-pfile``) or from dataset.json alone."""
    from nnunetv2.utilities.label_handling.label_handling import LabelManager
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    try:
        if plans_file:
            return PlansManager(plans_file).get_label_manager(dataset_json)
        return LabelManager(dataset_json["labels"], dataset_json.get("regions_class_order"))
    except (OSError, KeyError, AssertionError, RuntimeError, ValueError) as e:
        raise SKCDFInputError(f"Cannot read the labels from dataset.json / plans ({plans_file}): {e!r}") from None


def label_names(dataset_json: dict) -> Dict[str, str]:
    """summary.json key (``'1'`` or ``'(1, 2)'``) -> dataset.json label name."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    return {label_or_region_to_key(tuple(v) if isinstance(v, (list, tuple)) else int(v)): k
            for k, v in dataset_json["labels"].items()}


def resolve_nsd_tolerances(specs: Optional[Sequence[str]], regions: Sequence[Region],
                           names: Dict[str, str]) -> Dict[Region, float]:
    """Tolerance per region: per-organ default, then bare numbers (all classes), then ``NAME=MM`` entries (NAME =
    dataset.json name, paper abbreviation or label id)."""
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    keys = {r: label_or_region_to_key(r) for r in regions}
    tolerances = {r: DEFAULT_NSD_TOLERANCE_MM.get(canonical_organ(names.get(k, "")), FALLBACK_NSD_TOLERANCE_MM)
                  for r, k in keys.items()}
    specs = list(specs or [])
    for spec in [s for s in specs if "=" not in s] + [s for s in specs if "=" in s]:
        name, _, value = spec.rpartition("=")
        targets = list(regions) if not name else [r for r, k in keys.items() if _matches(name, k, names.get(k, ""))]
        if not targets:
            known = ", ".join(f"{names.get(k, k)} ({column_title(names.get(k, k))}, {k})" for k in keys.values())
            raise SKCDFInputError(f"--nsd-tolerance {spec}: no class called {name!r}. Classes: {known}.")
        tolerances.update({r: _positive_float(value, spec) for r in targets})
    return tolerances


def _matches(name: str, key: str, label_name: str) -> bool:
    return name == key or normalise_name(name) in (normalise_name(label_name), normalise_name(column_title(label_name)))


def _positive_float(value: str, spec: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number > 0:
        raise SKCDFInputError(f"--nsd-tolerance {spec}: give a positive number (mm), e.g. 2 or liver=5.")
    return number


def list_cases(ref_folder: str, pred_folder: str, file_ending: str) -> List[str]:
    """Sorted file names of the reference folder; every one must be in ``pred_folder`` and vice versa."""
    ref_files = _segmentation_files(ref_folder, file_ending)
    if not ref_files:
        raise SKCDFInputError(f"{ref_folder}: no reference segmentations ending with {file_ending!r} "
                              f"(file_ending of dataset.json).")
    pred_files = _segmentation_files(pred_folder, file_ending)
    missing = sorted(set(ref_files) - set(pred_files))
    if missing:
        cases = ", ".join(f[: -len(file_ending)] for f in missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise SKCDFInputError(f"{pred_folder}: no prediction for {len(missing)} reference case(s): {cases} "
                              f"(expected e.g. {os.path.join(pred_folder, missing[0])}). Predict them, or point "
                              f"-ref at a folder holding only the evaluated cases.")
    extra = sorted(set(pred_files) - set(ref_files))
    if extra:
        raise SKCDFInputError(f"{pred_folder}: {len(extra)} prediction(s) without a reference in {ref_folder}: "
                              f"{', '.join(extra[:10])}. Remove or move them, or use the matching -ref folder.")
    return ref_files


def _segmentation_files(folder: str, file_ending: str) -> List[str]:
    # our own outputs are skipped: with file_ending '.png' the bar chart would otherwise look like a case
    return sorted(f for f in os.listdir(folder) if f.endswith(file_ending) and not f.startswith(".")
                  and f not in OUTPUT_FILES and os.path.isfile(os.path.join(folder, f)))


def default_method_names(pred_folders: Sequence[str]) -> List[str]:
    """Folder base names when they are unique, else the paths as given."""
    names = [os.path.basename(os.path.normpath(p)) for p in pred_folders]
    return names if len(set(names)) == len(names) else [os.path.normpath(p) for p in pred_folders]


def run_output_folders(pred_folders: Sequence[str], methods: Sequence[str], output_folder: Optional[str]) -> List[str]:
    """The prediction folder itself (single folder, no -o) or ``OUT/runs/<method>_run<k>``."""
    if output_folder is None:
        return list(pred_folders)
    seen: Dict[str, int] = {}
    folders = []
    for method in methods:
        seen[method] = seen.get(method, 0) + 1
        safe = re.sub(r"[^A-Za-z0-9._-]+", "_", method).strip("_") or "method"
        folders.append(os.path.join(output_folder, "runs", f"{safe}_run{seen[method]}"))
    return folders


def _check_folders(ref_folder: str, pred_folders: Sequence[str], methods: Optional[Sequence[str]],
                   output_folder: Optional[str]) -> None:
    for folder in [ref_folder, *pred_folders]:
        if not os.path.isdir(folder):
            raise SKCDFInputError(f"{folder} is not a folder.")
    if len(pred_folders) > 1 and output_folder is None:
        raise SKCDFInputError(f"{len(pred_folders)} prediction folders need an output folder: add -o OUT_FOLDER "
                              f"(per-run summaries go to OUT_FOLDER/runs/, the tables to OUT_FOLDER).")
    if methods is not None and len(methods) != len(pred_folders):
        raise SKCDFInputError(f"{len(methods)} --method names for {len(pred_folders)} prediction folders: give one "
                              f"name per folder (repeat a name for repeated runs of one method).")


# ----------------------------------------------------------------------------------------------------- the API
def evaluate_folders(ref_folder: str, pred_folders: Sequence[str], methods: Optional[Sequence[str]] = None,
                     output_folder: Optional[str] = None, dataset_json_file: Optional[str] = None,
                     plans_file: Optional[str] = None, num_processes: Optional[int] = None,
                     paper_rules: bool = False, voxel_units: bool = False,
                     nsd_tolerance: Optional[Sequence[str]] = None, plot: bool = True, progress: bool = True) -> dict:
    """Evaluate every prediction folder against ``ref_folder``, write the outputs (see module doc) and return the
    aggregate (what ``aggregate.json`` holds)."""
    from nnunetv2.configuration import default_num_processes
    from nnunetv2.imageio.reader_writer_registry import determine_reader_writer_from_dataset_json

    _check_folders(ref_folder, pred_folders, methods, output_folder)
    methods = list(methods or default_method_names(pred_folders))
    dataset_json = load_checked_dataset_json(resolve_dataset_json(ref_folder, dataset_json_file), need_channels=False)
    outputs = run_output_folders(pred_folders, methods, output_folder)
    _check_summaries_are_ours(outputs)
    ending = dataset_json["file_ending"]
    lm = label_manager(dataset_json, plans_file)
    regions = tuple(lm.foreground_regions if lm.has_regions else lm.foreground_labels)
    names = label_names(dataset_json)
    tolerances = resolve_nsd_tolerances(nsd_tolerance, regions, names)
    cases = [list_cases(ref_folder, p, ending) for p in pred_folders]
    check_readable(os.path.join(ref_folder, cases[0][0]), "reference")  # nnU-Net picks the reader by reading it
    reader = determine_reader_writer_from_dataset_json(dataset_json, os.path.join(ref_folder, cases[0][0]),
                                                       verbose=False)
    allowed = tuple(sorted(int(v) for v in set(lm.all_labels) | ({lm.ignore_label} - {None})))
    settings = _settings(paper_rules, voxel_units, regions, names, tolerances)

    jobs = [((i, j), CaseJob(os.path.join(ref_folder, f), os.path.join(p, f), reader, regions, allowed,
                             lm.ignore_label, tolerances, voxel_units, paper_rules))
            for i, (p, files) in enumerate(zip(pred_folders, cases)) for j, f in enumerate(files)]
    n_proc = default_num_processes if num_processes is None else num_processes
    results = dict(imap_with_progress(_evaluate_indexed, jobs, n_proc, "skcdf_evaluate", show=progress))

    runs = []
    for i, (pred, method, out) in enumerate(zip(pred_folders, methods, outputs)):
        summary = summarize_run([results[(i, j)] for j in range(len(cases[i]))], regions, settings, names)
        write_summary(summary, os.path.join(out, SUMMARY_FILE))
        write_cases_csv(summary, names, ending, os.path.join(out, CASES_CSV))
        runs.append({"method": method, "pred_folder": pred, "output_folder": out, "summary": summary})
    return _write_aggregate(runs, regions, names, settings, output_folder or pred_folders[0], plot)


def _settings(paper_rules: bool, voxel_units: bool, regions, names, tolerances) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    unit = "voxels" if voxel_units else "mm"
    return {"rules": "paper" if paper_rules else "nnunet", "units": unit, "surface_connectivity": 1,
            f"nsd_tolerance_{unit}": {label_or_region_to_key(r): tolerances[r] for r in regions},
            "definitions": {
                "ASD": "mean distance prediction surface -> reference surface (medpy asd(pred, ref))",
                "ASD_ref_to_pred": "mean distance reference surface -> prediction surface",
                "ASSD": "mean of the pooled distances of both directions (medpy >= 0.5 assd)",
                "HD95": "95th percentile of the pooled distances of both directions (medpy hd95)",
                "NSD": "share of surface voxels of both masks within the tolerance of the other surface",
                "n_islands": "connected components (full connectivity) of the prediction without a reference voxel",
                "island_volume": f"total volume of those components ({unit}^3)" if unit == "mm"
                else "total voxels of those components"}}


def _write_aggregate(runs, regions, names, settings, folder: str, plot: bool) -> dict:
    from nnunetv2.evaluation.evaluate_predictions import label_or_region_to_key

    keys = [label_or_region_to_key(r) for r in regions]
    class_info = [{"key": k, "name": names.get(k, k), "column": column_title(names.get(k, k))} for k in keys]
    aggregate = aggregate_runs(runs, class_info,
                               {"rules": settings["rules"], "units": settings["units"]})
    atomic_save_json(_json_ready(aggregate), os.path.join(folder, AGGREGATE_FILE))
    write_paper_table(aggregate, os.path.join(folder, TABLE_FILE))
    if plot:
        plot_dice_per_class(aggregate, os.path.join(folder, PLOT_FILE))
    return aggregate


def _json_ready(obj):
    from nnunetv2.utilities.json_export import recursive_fix_for_json_export

    recursive_fix_for_json_export(obj)
    return obj


# ------------------------------------------------------------------------------------------------------ the CLI
_EPILOG = """\
definitions (distances in mm from the image spacing, or voxels with --voxel-units):
  ASD   mean distance prediction surface -> reference surface (directed; medpy asd(pred, ref), the paper's ASD)
  ASSD  mean of the pooled distances of both directions (medpy >= 0.5; medpy < 0.5 averaged the two directed
        means, recomputable as (ASD + ASD_ref_to_pred) / 2 from the per-case CSV)
  HD95  95th percentile of the pooled distances of both directions (medpy hd95)
  NSD   surface Dice: share of surface voxels of both masks within the tolerance of the other surface
        (voxels counted equally, as MONAI; FLARE22's script, DeepMind's surface-distance, weights them by area
        and reads higher: not comparable with published FLARE NSD)
  Surfaces = mask minus its erosion with the connectivity-1 structure (as medpy).
  islands   predicted connected components (full connectivity) that share no voxel with the reference:
            count and volume per case (CSV) and summed over cases and runs (paper_table.md)
empty masks:
  default      Dice NaN if both masks are empty (0 if one is); surface metrics NaN if either is empty;
               means ignore NaN; missed/spurious organs are counted per class
  --paper-rules one empty -> Dice 0, ASD/ASSD/HD95 128, NSD 0;
               both empty -> Dice 100 %, distances 0, NSD 100 %
               (the published code wrote Dice 1 on its 0-100 scale: a scale slip, 100 % is meant)
outputs:
  one folder, no -o: PRED/summary.json (nnU-Net layout + extra metrics), metrics_per_case.csv, aggregate.json,
                     paper_table.md, dice_per_class.png
  with -o OUT:       OUT/runs/<method>_run<k>/{summary.json, metrics_per_case.csv}, OUT/aggregate.json,
                     OUT/paper_table.md, OUT/dice_per_class.png (folders sharing a --method name are runs:
                     mean ± std over runs, numpy std with ddof=0 as in the paper's code)
example:
  skcdf_evaluate -ref $nnUNet_raw/Dataset950_SKCDFPhantom/labelsTs -pred run0 run1 run2 base0 \\
      --method SKCDF SKCDF SKCDF nnU-Net -o results/phantom -np 2
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="skcdf_evaluate", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_EPILOG,
        description="Evaluate nnU-Net predictions against reference segmentations: nnU-Net's Dice/IoU/TP/FP/FN "
                    "plus ASD, ASSD, HD95 and NSD per case and class, paper-style table over methods and runs.")
    parser.add_argument("-ref", required=True, metavar="REF_FOLDER", help="reference segmentations (e.g. labelsTs)")
    parser.add_argument("-pred", required=True, nargs="+", metavar="PRED_FOLDER",
                        help="prediction folder(s), same file names as the references")
    parser.add_argument("--method", nargs="+", metavar="NAME",
                        help="one method name per prediction folder; repeated names are runs of one method "
                             "(default: the folder names)")
    parser.add_argument("-o", metavar="OUT_FOLDER",
                        help="output folder (required for several prediction folders; default: the prediction folder)")
    parser.add_argument("-djfile", metavar="dataset.json", help="default: REF_FOLDER/../dataset.json")
    parser.add_argument("-pfile", metavar="plans.json", help="plans, for region-based label handling (optional)")
    parser.add_argument("-np", type=int, default=None, metavar="N",
                        help="worker processes (default: nnU-Net's default_num_processes, env nnUNet_def_n_proc)")
    parser.add_argument("--paper-rules", action="store_true", help="the SKCDF paper's empty-mask values (below)")
    parser.add_argument("--voxel-units", action="store_true",
                        help="distances (and NSD tolerances) in voxels instead of mm (spacing 1)")
    parser.add_argument("--nsd-tolerance", nargs="+", metavar="MM|NAME=MM",
                        help="NSD tolerance: a number for all classes and/or NAME=MM per class (name, paper "
                             "abbreviation or label id). Default per organ from the FLARE22 challenge (liver 5, "
                             "kidneys 3, spleen 3, pancreas 5, aorta/IVC 2, adrenals 2, gallbladder 2, esophagus 3, "
                             "stomach 5, duodenum 7; ours: veins 2, bladder 3, prostate/uterus 5), "
                             f"{FALLBACK_NSD_TOLERANCE_MM:g} for other classes")
    parser.add_argument("--no-plot", action="store_true", help="skip dice_per_class.png")
    return parser


def evaluate_entry(argv: Optional[Sequence[str]] = None) -> None:
    args = build_parser().parse_args(argv)
    with exit_on_input_error(), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # nanmean of all-NaN columns is expected (empty classes)
        aggregate = evaluate_folders(args.ref, args.pred, args.method, args.o, args.djfile, args.pfile, args.np,
                                     args.paper_rules, args.voxel_units, args.nsd_tolerance, not args.no_plot)
    from nnunetv2_skcdf.evaluation.paper_table import paper_table

    print(paper_table(aggregate))
    folder = args.o or args.pred[0]
    print(f"Wrote {os.path.join(folder, TABLE_FILE)}, {AGGREGATE_FILE}"
          f"{'' if args.no_plot else ', ' + PLOT_FILE} and per-run {SUMMARY_FILE} + {CASES_CSV} "
          f"({'in the prediction folder' if args.o is None else os.path.join(folder, 'runs')}).")
