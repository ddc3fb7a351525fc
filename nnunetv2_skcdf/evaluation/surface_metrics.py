"""Surface-distance metrics of binary masks: ASD, ASSD, HD95 and NSD (surface Dice), in 2D and 3D.

Pure numpy/scipy (no nnU-Net, no medpy), so that the definitions can be read and tested on their own.

Conventions
-----------
- Masks are boolean (or 0/1) arrays of shape ``(Z, Y, X)`` or ``(Y, X)``; ``pred`` and ``ref`` have the same
  shape. ``spacing`` is given **in the array's axis order** (numpy ``z, y, x``; note that SimpleITK's
  ``GetSpacing()`` is ``x, y, z`` and must be reversed) in mm. ``spacing=None`` means 1 per axis: distances
  are then in voxels.
- Surface of a mask = the mask voxels that its erosion with the connectivity-1 structure
  (``scipy.ndimage.generate_binary_structure(ndim, 1)``: face neighbours only) removes; voxels on the array
  border count as surface (erosion pads with background). This is exactly what medpy's
  ``__surface_distances`` does (``result ^ binary_erosion(result, structure=footprint, iterations=1)``).
- Distance of a surface voxel to the other surface = Euclidean distance between voxel centres, taken from
  ``scipy.ndimage.distance_transform_edt(~other_surface, sampling=spacing)``.

Definitions (``d(a, B)`` = distance of surface voxel ``a`` to the nearest voxel of surface ``B``;
``P``, ``R`` = surface voxels of prediction and reference)
- **ASD** = mean over ``p in P`` of ``d(p, R)``: the *directed* prediction -> reference mean, what
  ``medpy.metric.binary.asd(pred, ref)`` returns and what the SKCDF paper reports.
- **ASD_ref_to_pred** = mean over ``r in R`` of ``d(r, P)`` (the other direction).
- **ASSD** = mean of the pooled distances of both directions
  ``(sum_P d(p, R) + sum_R d(r, P)) / (|P| + |R|)``: Heimann et al., IEEE TMI 28(8) 2009, and
  ``medpy.metric.binary.assd`` since medpy 0.5. medpy < 0.5 returned the mean of the two directed means
  ``(ASD + ASD_ref_to_pred) / 2`` instead (medpy issue #108); both directed means are reported, so that value
  can be recomputed.
- **HD95** = 95th percentile (numpy's default linear interpolation) of the pooled distances of both
  directions: ``medpy.metric.binary.hd95``. (MONAI uses the maximum of the two directed 95th percentiles of the
  same voxel distances instead, which is never smaller; DeepMind's ``surface-distance`` weights surface elements
  by area, and its value can be smaller or larger.)
- **NSD** at tolerance ``tau`` (normalised surface distance / surface Dice, Nikolov et al. 2021)
  = ``(|{p: d(p, R) <= tau}| + |{r: d(r, P) <= tau}|) / (|P| + |R|)``, in [0, 1], counting surface *voxels*
  (MONAI's ``compute_surface_dice`` without sub-voxel surfels; DeepMind weights surface elements by area).

Every metric is NaN when either mask is empty (there is no surface to measure from or to); callers apply
their own rules for that case (see ``nnunetv2_skcdf.evaluation.evaluate``).

Speed: distances only need the bounding box of ``pred | ref`` plus a one-voxel margin (the margin keeps the
erosion at the box edge identical to the full volume; the exact EDT does not depend on the domain as long as
both surfaces are inside it), so ``surface_metrics`` crops first.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np
from scipy.ndimage import binary_erosion, distance_transform_edt, generate_binary_structure

#: connectivity of the erosion structure that defines surface voxels (medpy's default, face neighbours)
CONNECTIVITY = 1
#: percentile of the pooled surface distances reported as HD95
HD_PERCENTILE = 95.0
#: metric names returned by ``surface_metrics`` (in this order)
SURFACE_METRICS = ("ASD", "ASD_ref_to_pred", "ASSD", "HD95", "NSD")

BBox = Tuple[slice, ...]


def as_spacing(spacing: Optional[Sequence[float]], ndim: int) -> np.ndarray:
    """``spacing`` (array axis order, mm) as a float64 vector of length ``ndim``; ``None`` -> ones (voxels)."""
    if spacing is None:
        return np.ones(ndim)
    spacing = np.asarray(spacing, dtype=np.float64).ravel()
    if spacing.size == 1:
        return np.full(ndim, float(spacing[0]))
    if spacing.size != ndim or np.any(spacing <= 0):
        raise ValueError(f"spacing {spacing.tolist()} does not fit an array with {ndim} axes (positive, one per "
                         f"axis, in the array's axis order)")
    return spacing


def surface_voxels(mask: np.ndarray, connectivity: int = CONNECTIVITY) -> np.ndarray:
    """Boolean array, same shape as ``mask``: the voxels of ``mask`` that one erosion removes (see module doc)."""
    mask = np.asarray(mask, dtype=bool)
    structure = generate_binary_structure(mask.ndim, connectivity)
    return mask & ~binary_erosion(mask, structure=structure, iterations=1, border_value=0)


def directed_distances(from_surface: np.ndarray, to_surface: np.ndarray, spacing: np.ndarray) -> np.ndarray:
    """1-D float64 array: for every voxel of ``from_surface`` (C order) its distance to the nearest voxel of
    ``to_surface``, in the unit of ``spacing`` (mm, or voxels for ones). ``to_surface`` must not be empty."""
    # the EDT measures the distance to the nearest zero, so the target surface is the zero set
    return distance_transform_edt(~to_surface, sampling=spacing)[from_surface]


def bounding_box(mask: np.ndarray, margin: int = 1) -> Optional[BBox]:
    """Slices of the smallest box holding ``mask`` grown by ``margin`` voxels (clipped to the array);
    ``None`` when ``mask`` is empty."""
    slices = []
    for axis in range(mask.ndim):
        hit = np.flatnonzero(mask.any(axis=tuple(a for a in range(mask.ndim) if a != axis)))
        if hit.size == 0:
            return None
        slices.append(slice(max(hit[0] - margin, 0), min(hit[-1] + 1 + margin, mask.shape[axis])))
    return tuple(slices)


def surface_distances(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None,
                      connectivity: int = CONNECTIVITY) -> Tuple[np.ndarray, np.ndarray]:
    """``(pred_to_ref, ref_to_pred)``: the distances of every prediction surface voxel to the reference surface
    and vice versa (1-D, unit of ``spacing``), on the full arrays. Raises ``ValueError`` if a mask is empty."""
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if pred.shape != ref.shape:
        raise ValueError(f"prediction shape {pred.shape} != reference shape {ref.shape}")
    if not pred.any() or not ref.any():
        raise ValueError("surface distances need two non-empty masks")
    spacing = as_spacing(spacing, pred.ndim)
    pred_surface, ref_surface = surface_voxels(pred, connectivity), surface_voxels(ref, connectivity)
    return (directed_distances(pred_surface, ref_surface, spacing),
            directed_distances(ref_surface, pred_surface, spacing))


def metrics_from_distances(pred_to_ref: np.ndarray, ref_to_pred: np.ndarray,
                           nsd_tolerance: float) -> Dict[str, float]:
    """ASD, ASD_ref_to_pred, ASSD, HD95 and NSD (definitions in the module doc) from the two non-empty directed
    distance arrays; ``nsd_tolerance`` in the same unit as the distances."""
    pooled = np.concatenate([pred_to_ref, ref_to_pred])
    return {
        "ASD": float(pred_to_ref.mean()),
        "ASD_ref_to_pred": float(ref_to_pred.mean()),
        "ASSD": float(pooled.mean()),
        "HD95": float(np.percentile(pooled, HD_PERCENTILE)),
        "NSD": float(np.count_nonzero(pooled <= nsd_tolerance) / pooled.size),
    }


def nan_metrics() -> Dict[str, float]:
    """All surface metrics NaN (used when a mask is empty)."""
    return {name: float("nan") for name in SURFACE_METRICS}


def surface_metrics(pred: np.ndarray, ref: np.ndarray, spacing: Optional[Sequence[float]] = None,
                    nsd_tolerance: float = 2.0, connectivity: int = CONNECTIVITY,
                    crop: bool = True) -> Dict[str, float]:
    """Surface metrics of two binary masks of shape ``(Z, Y, X)`` or ``(Y, X)``.

    ``spacing``: per axis in the arrays' axis order (mm); ``None`` -> voxel units. ``nsd_tolerance``: in the
    same unit. ``crop=True`` works inside the bounding box of ``pred | ref`` plus one voxel (identical results,
    much less work); ``crop=False`` uses the full arrays (reference implementation for tests and benchmarks).
    Returns ``{name: value}`` for ``SURFACE_METRICS``; all NaN if either mask is empty.
    """
    pred, ref = np.asarray(pred, dtype=bool), np.asarray(ref, dtype=bool)
    if not pred.any() or not ref.any():
        return nan_metrics()
    if crop:
        box = bounding_box(pred | ref, margin=1)
        pred, ref = pred[box], ref[box]
    return metrics_from_distances(*surface_distances(pred, ref, spacing, connectivity), nsd_tolerance)
