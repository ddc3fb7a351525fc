"""Surface metrics: hand-computed distances, anisotropic spacing and axis order, empty masks, bounding-box crop
vs full volume, and medpy (test-only dependency) as an oracle on random blobs."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from nnunetv2_skcdf.evaluation.surface_metrics import (
    SURFACE_METRICS, as_spacing, bounding_box, surface_distances, surface_metrics, surface_voxels)

SPACING = (3.0, 0.7, 1.3)  # z, y, x: all different, so a swapped axis order changes every distance


def box(shape, *ranges) -> np.ndarray:
    mask = np.zeros(shape, bool)
    mask[tuple(slice(a, b) for a, b in ranges)] = True
    return mask


def blob(rng, shape, threshold=0.53, sigma=2.0) -> np.ndarray:
    return gaussian_filter(rng.random(shape), sigma) > threshold


# ------------------------------------------------------------------------------------------------ surfaces
def test_surface_of_cube_is_its_shell():
    cube = box((5, 5, 5), (1, 4), (1, 4), (1, 4))
    surface = surface_voxels(cube)
    assert surface.sum() == 26 and not surface[2, 2, 2]  # 3^3 cube: everything but the centre


def test_surface_of_square_2d():
    square = box((6, 6), (1, 5), (1, 5))
    assert surface_voxels(square).sum() == 12  # 4x4 square: 16 - 2x2 interior


def test_connectivity_one_keeps_cross_centre_inside():
    # a 3D plus sign: with face connectivity its centre has all 6 neighbours and is not surface
    plus = np.zeros((3, 3, 3), bool)
    plus[1, 1, :] = plus[1, :, 1] = plus[:, 1, 1] = True
    assert not surface_voxels(plus)[1, 1, 1]
    assert surface_voxels(plus, connectivity=3)[1, 1, 1]


def test_array_border_counts_as_surface():
    full = np.ones((4, 4), bool)
    assert surface_voxels(full).sum() == 12  # like medpy: erosion pads with background


# ------------------------------------------------------------------------------------- known distances
def test_concentric_cubes_hand_computed():
    """6^3 cube around a 4^3 cube, spacing 1: reference shell (56 voxels) all at 1; prediction shell
    (152 voxels): 96 face voxels at 1, 48 edge voxels at sqrt 2, 8 corners at sqrt 3."""
    pred, ref = box((10,) * 3, (2, 8), (2, 8), (2, 8)), box((10,) * 3, (3, 7), (3, 7), (3, 7))
    m = surface_metrics(pred, ref, nsd_tolerance=1.0)
    pred_sum = 96 + 48 * math.sqrt(2) + 8 * math.sqrt(3)
    assert m["ASD"] == pytest.approx(pred_sum / 152)
    assert m["ASD_ref_to_pred"] == pytest.approx(1.0)
    assert m["ASSD"] == pytest.approx((pred_sum + 56) / 208)  # pooled, not (ASD + 1) / 2
    assert m["ASSD"] != pytest.approx((m["ASD"] + 1.0) / 2)
    # pooled sorted: 152 x 1, 48 x sqrt2, 8 x sqrt3; 95th percentile at index 196.65 -> sqrt 2
    assert m["HD95"] == pytest.approx(math.sqrt(2))
    assert m["NSD"] == pytest.approx(152 / 208)
    assert surface_metrics(pred, ref, nsd_tolerance=1.5)["NSD"] == pytest.approx(200 / 208)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_slabs_along_each_axis_use_that_axis_spacing(axis):
    """Two 2-voxel slabs filling the other two axes, 1 voxel of gap: every voxel is surface, distances are 2
    and 3 voxels along ``axis``, so ASD = 2.5 x spacing[axis]. A swapped axis order gives another spacing."""
    shape = [6, 6, 6]
    shape[axis] = 10
    ranges_pred, ranges_ref = [(0, 6)] * 3, [(0, 6)] * 3
    ranges_pred[axis], ranges_ref[axis] = (2, 4), (5, 7)
    m = surface_metrics(box(shape, *ranges_pred), box(shape, *ranges_ref), SPACING, nsd_tolerance=2.5 * SPACING[axis])
    assert m["ASD"] == pytest.approx(2.5 * SPACING[axis])
    assert m["ASD_ref_to_pred"] == pytest.approx(2.5 * SPACING[axis])
    assert m["HD95"] == pytest.approx(3 * SPACING[axis])
    assert m["NSD"] == pytest.approx(0.5)  # the near halves (distance 2) are within 2.5 spacings
    assert surface_metrics(box(shape, *ranges_pred), box(shape, *ranges_ref))["ASD"] == pytest.approx(2.5)


def test_single_voxels_diagonal_anisotropic():
    pred, ref = box((5, 5, 5), (0, 1), (0, 1), (0, 1)), box((5, 5, 5), (2, 3), (3, 4), (1, 2))
    expected = math.sqrt((2 * 3.0) ** 2 + (3 * 0.7) ** 2 + (1 * 1.3) ** 2)
    m = surface_metrics(pred, ref, SPACING)
    assert all(m[k] == pytest.approx(expected) for k in ("ASD", "ASD_ref_to_pred", "ASSD", "HD95"))
    reversed_order = surface_metrics(pred, ref, SPACING[::-1])["ASD"]
    assert reversed_order != pytest.approx(expected)  # the order matters: z, y, x


def test_2d_shifted_squares():
    pred, ref = box((12, 12), (2, 6), (2, 6)), box((12, 12), (2, 6), (4, 8))
    m = surface_metrics(pred, ref, (0.5, 2.0))
    # columns x=2 and x=3 of pred are 2 and 1 columns (x 2 mm) from ref's left edge x=4; x=4, x=5 lie on ref's
    # surface only on the rows y=2 and y=5 (distance 0), interior rows are 1 row (0.5 mm) from ref's top/bottom
    d = surface_distances(pred, ref, (0.5, 2.0))[0]
    assert sorted(np.round(d, 6)) == sorted([4.0] * 4 + [2.0] * 2 + [0.0] * 4 + [0.5] * 2)
    assert m["ASD"] == pytest.approx(d.mean())


# ----------------------------------------------------------------------------------------- empty masks
@pytest.mark.parametrize("pred_empty, ref_empty", [(True, False), (False, True), (True, True)])
def test_empty_masks_give_nan(pred_empty, ref_empty):
    mask = box((6, 6, 6), (1, 4), (1, 4), (1, 4))
    empty = np.zeros_like(mask)
    m = surface_metrics(empty if pred_empty else mask, empty if ref_empty else mask)
    assert set(m) == set(SURFACE_METRICS) and all(math.isnan(v) for v in m.values())
    with pytest.raises(ValueError, match="surface distances need two non-empty masks"):
        surface_distances(empty if pred_empty else mask, empty if ref_empty else mask)


def test_identical_masks_are_zero_distance():
    mask = box((6, 7, 8), (1, 4), (2, 5), (1, 7))
    m = surface_metrics(mask, mask, SPACING, nsd_tolerance=0.1)
    assert m["ASD"] == m["ASSD"] == m["HD95"] == 0.0 and m["NSD"] == 1.0


# -------------------------------------------------------------------------------------- crop vs full
def test_bounding_box_margin_and_clipping():
    mask = box((10, 10), (0, 3), (4, 6))
    assert bounding_box(mask, margin=1) == (slice(0, 4), slice(3, 7))
    assert bounding_box(np.zeros((3, 3), bool)) is None


@pytest.mark.parametrize("seed", range(6))
def test_crop_equals_full_volume(seed, monkeypatch):
    rng = np.random.default_rng(seed)
    shape = (24, 30, 28)
    pred, ref = np.zeros(shape, bool), np.zeros(shape, bool)
    # small blobs at random places, one of them touching the array border for even seeds
    at = tuple(int(rng.integers(0, n - 10)) for n in shape)
    pred[at[0]:at[0] + 10, at[1]:at[1] + 10, at[2]:at[2] + 10] = blob(rng, (10, 10, 10), 0.5, 1.5)
    ref[4:14, 8:18, 6:16] = blob(rng, (10, 10, 10), 0.5, 1.5)
    if seed % 2 == 0:
        ref[:, 0, :3] = True
    import nnunetv2_skcdf.evaluation.surface_metrics as S

    shapes = []  # the arrays the distances are computed on: the box around both masks, then the whole volume
    distances = S.surface_distances
    monkeypatch.setattr(S, "surface_distances", lambda p, r, *a: shapes.append(p.shape) or distances(p, r, *a))
    cropped = surface_metrics(pred, ref, SPACING, nsd_tolerance=2.0)
    full = surface_metrics(pred, ref, SPACING, nsd_tolerance=2.0, crop=False)
    assert cropped == full  # exactly, not approximately
    assert shapes[1] == shape and shapes[0] == tuple(b.stop - b.start for b in bounding_box(pred | ref, margin=1))
    assert np.prod(shapes[0]) < np.prod(shape)


# -------------------------------------------------------------------------------------- medpy oracle
@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("ndim", [2, 3])
def test_medpy_oracle_on_random_blobs(seed, ndim):
    binary = pytest.importorskip("medpy.metric.binary")
    rng = np.random.default_rng(100 + seed)
    shape = (40, 36) if ndim == 2 else (16, 22, 20)
    spacing = SPACING[1:] if ndim == 2 else SPACING
    pred, ref = blob(rng, shape), blob(rng, shape)
    assert pred.any() and ref.any()
    m = surface_metrics(pred, ref, spacing)
    assert m["ASD"] == pytest.approx(binary.asd(pred, ref, spacing), rel=1e-12)
    assert m["ASD_ref_to_pred"] == pytest.approx(binary.asd(ref, pred, spacing), rel=1e-12)
    assert m["ASSD"] == pytest.approx(binary.assd(pred, ref, spacing), rel=1e-12)
    assert m["HD95"] == pytest.approx(binary.hd95(pred, ref, spacing), rel=1e-12)


def test_as_spacing():
    assert as_spacing(None, 3).tolist() == [1, 1, 1]
    assert as_spacing(2.0, 2).tolist() == [2, 2]
    with pytest.raises(ValueError, match="axes"):
        as_spacing((1.0, 2.0), 3)
