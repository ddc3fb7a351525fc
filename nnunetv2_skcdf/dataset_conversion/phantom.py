"""Synthetic abdominal CT with the 13 Synapse organ labels, written as an nnU-Net v2 raw dataset.

The phantom is meant to look like the real problem so that the whole SKCDF pipeline (planning,
semi-supervised training, evaluation of class-imbalanced segmentation) can be exercised without
downloading Synapse/BTCV: anatomically plausible layout, tubular vessels, curved and randomly deformed
organs, unlabelled distractors (bowel, colon, muscle, bone, lung bases), overlapping CT intensities,
low-frequency texture, partial-volume blur, noise and a class imbalance of two orders of magnitude
(liver vs adrenal glands).

Conventions (as SimpleITK writes an array with identity direction, i.e. LPS):

* arrays are indexed ``(z, y, x)``;
* ``x`` increases toward the patient's LEFT, ``y`` toward POSTERIOR, ``z`` toward SUPERIOR
  (slice 0 is the most inferior one);
* anatomy is defined in physical millimetres relative to the field-of-view centre (the written
  origin puts the FOV centre at (0, 0, 0) mm). A different ``shape``/``spacing`` therefore samples
  the same anatomy at another resolution: the random draws do not depend on the voxel grid (only
  the white noise does), as long as the FOV stays within +-260 mm.

``generate_case`` is pure (no I/O); ``make_phantom_dataset`` writes
``<root>/DatasetNNN_<Name>/{imagesTr,labelsTr,imagesTs,labelsTs,imagesUnlabeled,dataset.json}``.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.interpolate import CubicSpline, make_interp_spline
from scipy.ndimage import gaussian_filter

from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES, synapse_labels_dict
from nnunetv2_skcdf.utilities.dataset_files import (
    UNLABELED_IMAGES_FOLDER,
    SKCDFInputError,
    _env_folder,
    exit_on_input_error,
)
from nnunetv2_skcdf.utilities.io import atomic_output, atomic_save_json
from nnunetv2_skcdf.utilities.parallel import imap_with_progress

GENERATOR_VERSION = "1.0"
DEFAULT_SHAPE: Tuple[int, int, int] = (48, 96, 96)  # (z, y, x) voxels
DEFAULT_SPACING: Tuple[float, float, float] = (5.0, 3.6, 3.6)  # (z, y, x) mm
ROLES = {"tr": 0, "ts": 1, "un": 2}  # part of each case's seed: cases do not depend on each other

Shape3 = Tuple[int, int, int]
Spacing3 = Tuple[float, float, float]
Slices = Tuple[slice, slice, slice]

# Label ids, from labels.py so that the generator and the dataset.json agree.
_ID = {name: label_id for label_id, name, _ in SYNAPSE_CLASSES}
SPLEEN, R_KIDNEY, L_KIDNEY, GALLBLADDER = _ID["spleen"], _ID["right_kidney"], _ID["left_kidney"], _ID["gallbladder"]
ESOPHAGUS, LIVER, STOMACH, AORTA = _ID["esophagus"], _ID["liver"], _ID["stomach"], _ID["aorta"]
IVC, PSV, PANCREAS = _ID["inferior_vena_cava"], _ID["portal_and_splenic_veins"], _ID["pancreas"]
R_ADRENAL, L_ADRENAL = _ID["right_adrenal_gland"], _ID["left_adrenal_gland"]

# --------------------------------------------------------------------------------------------------
# Tissues: (name, HU range of the per-case mean, texture amplitude in HU, follows contrast phase).
# Portal-venous phase values; ranges overlap on purpose (liver/spleen/pancreas, kidney/aorta, ...)
# so that a network has to use shape and context, as on real CT.
# --------------------------------------------------------------------------------------------------
_TISSUES: Tuple[Tuple[str, float, float, float, bool], ...] = (
    ("air", -1005, -995, 0, False),
    ("fat", -120, -80, 8, False),
    ("muscle", 40, 60, 5, False),
    ("bone_cortex", 600, 1000, 60, False),
    ("bone_cancellous", 220, 350, 40, False),
    ("csf", 10, 30, 3, False),
    ("lung", -880, -800, 30, False),
    ("heart", 110, 150, 8, True),
    ("bowel_wall", 40, 90, 8, True),
    ("bowel_fluid", 0, 30, 8, False),
    ("gas", -950, -850, 25, False),
    ("stomach_wall", 50, 90, 6, True),
    ("stomach_fluid", 0, 20, 4, False),
    ("liver", 90, 130, 6, True),
    ("spleen", 100, 130, 5, True),
    ("kidney_cortex", 150, 200, 8, True),
    ("kidney_medulla", 130, 170, 8, True),
    ("bile", 0, 25, 3, False),
    ("esophagus", 35, 60, 5, True),
    ("artery", 140, 200, 5, True),
    ("vena_cava", 110, 160, 6, True),
    ("portal_vein", 130, 180, 6, True),
    ("hepatic_vein", 120, 170, 6, True),
    ("pancreas", 70, 110, 10, True),
    ("adrenal", 30, 60, 4, True),
    ("disc", 70, 100, 5, False),
)
T = {name: i for i, (name, *_rest) in enumerate(_TISSUES)}


# --------------------------------------------------------------------------------------------------
# Smooth random fields defined on a fixed physical grid (independent of the voxel grid)
# --------------------------------------------------------------------------------------------------
def _interp_matrix(knots: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """(len(targets), len(knots)) matrix M such that M @ values is the cubic spline through the knots."""
    if len(knots) < 2:
        return np.ones((len(targets), 1), dtype=np.float32)
    return CubicSpline(knots, np.eye(len(knots)), bc_type="natural")(targets).astype(np.float32)


def _knots(lo: float, hi: float, cell_mm: float) -> np.ndarray:
    """Knot positions (mm) every ``cell_mm`` covering [lo, hi] with one spare knot on each side."""
    n = int(np.ceil((hi - lo) / cell_mm)) + 3
    return lo - cell_mm + cell_mm * np.arange(n)


def _smooth_noise(
    rng: np.random.Generator, axes_mm: Sequence[np.ndarray], lo: Sequence[float], hi: Sequence[float], cell_mm: float
) -> np.ndarray:
    """Unit-variance-ish smooth random field sampled at ``axes_mm`` (z, y, x coordinates in mm).

    Random values sit on knots every ``cell_mm`` inside the physical box [lo, hi] (z, y, x order) and
    are interpolated with separable cubic splines. The number of random draws depends only on the box,
    so the same draws give the same field at any resolution.
    """
    knots = [_knots(a, b, cell_mm) for a, b in zip(lo, hi)]
    values = rng.standard_normal([len(k) for k in knots]).astype(np.float32)
    mz, my, mx = (_interp_matrix(k, ax) for k, ax in zip(knots, axes_mm))
    field = np.tensordot(mz, values, axes=(1, 0))  # (Z, ky, kx)
    field = np.tensordot(my, field, axes=(1, 1)).transpose(1, 0, 2)  # (Z, Y, kx)
    return (field @ mx.T * 1.25).astype(np.float32)  # splines between random knots lose ~20 % of std


# --------------------------------------------------------------------------------------------------
# The canvas: deformed coordinates plus the tissue and label maps being painted
# --------------------------------------------------------------------------------------------------
class _Canvas:
    """Voxel grid ``(z, y, x)`` with physical coordinates (mm, deformed) and tissue/label maps.

    ``X, Y, Z`` hold, for every voxel, the position in the *undeformed* anatomy that the voxel shows:
    the voxel centre plus a smooth random displacement, so every organ is deformed coherently.
    """

    def __init__(self, rng: np.random.Generator, shape: Shape3, spacing: Spacing3, deform_mm: float):
        self.shape, self.spacing = tuple(shape), tuple(float(s) for s in spacing)
        self.axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
        # fixed physical box for the global random fields (bigger if the FOV is bigger)
        self.half = half = max(260.0, *(float(np.abs(a).max()) + 1 for a in self.axes))
        disp = [deform_mm * _smooth_noise(rng, self.axes, [-half] * 3, [half] * 3, 80.0) for _ in range(3)]
        self.margin = float(max(np.abs(d).max() for d in disp)) + 1.0
        z0, y0, x0 = np.meshgrid(*self.axes, indexing="ij")
        self.Z, self.Y, self.X = z0 + disp[0], y0 + disp[1], x0 + disp[2]
        self.texture = _smooth_noise(rng, self.axes, [-half] * 3, [half] * 3, 14.0)
        self.tissue = np.full(shape, T["air"], dtype=np.uint8)
        self.label = np.zeros(shape, dtype=np.uint8)
        self.space = np.zeros(shape, dtype=bool)  # abdominal cavity below the diaphragm
        self.cavity = np.zeros(shape, dtype=bool)  # inside the muscle wall (thorax included)
        self.inner_body = np.zeros(shape, dtype=bool)  # inside the subcutaneous fat

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> Optional[Slices]:
        """Voxel slices (z, y, x) that can show the physical box [lo, hi] given as (x, y, z) mm."""
        out = []
        for ax, a, b in zip(range(3), (lo[2], lo[1], lo[0]), (hi[2], hi[1], hi[0])):
            n, s = self.shape[ax], self.spacing[ax]
            i0 = int(np.ceil((a - self.margin) / s + (n - 1) / 2))
            i1 = int(np.floor((b + self.margin) / s + (n - 1) / 2)) + 1
            i0, i1 = max(i0, 0), min(i1, n)
            if i1 <= i0:
                return None
            out.append(slice(i0, i1))
        return tuple(out)  # type: ignore[return-value]

    def xyz(self, sl: Slices) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
        return self.X[sl], self.Y[sl], self.Z[sl]

    def paint(self, sl: Slices, mask: np.ndarray, tissue: int, label: Optional[int] = None,
              only_labels: Optional[Iterable[int]] = None) -> None:
        """Set ``tissue`` (and ``label``) where ``mask``; with ``only_labels`` only over those labels."""
        if only_labels is not None:
            mask = mask & np.isin(self.label[sl], list(only_labels))
        self.tissue[sl][mask] = tissue
        if label is not None:
            self.label[sl][mask] = label

    def wobble(self, rng: np.random.Generator, sl: Slices, lo: np.ndarray, hi: np.ndarray,
               cell_mm: float = 25.0) -> np.ndarray:
        """Smooth noise (~unit std) on the voxels of ``sl``, knots in the organ's box [lo, hi] (x, y, z)."""
        axes = [ax[s] for ax, s in zip(self.axes, sl)]
        return _smooth_noise(rng, axes, lo[::-1], hi[::-1], cell_mm)


# --------------------------------------------------------------------------------------------------
# Shape primitives. Each returns the voxel box and q = "normalised distance" (<= 1 inside).
# --------------------------------------------------------------------------------------------------
def _rotation(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    """Rotation matrix R = Rz @ Ry @ Rx; columns are the shape's local axes in patient (x, y, z)."""
    a, b, c = np.deg2rad([rx_deg, ry_deg, rz_deg])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _ellipsoid_q(cv: _Canvas, sl: Slices, centre: np.ndarray, radii: Sequence[float],
                 rot: Sequence[float] = (0.0, 0.0, 0.0)) -> np.ndarray:
    """q on the voxels of ``sl`` for an ellipsoid with semi-axes ``radii`` (mm) rotated by ``rot`` (deg)."""
    d = [c - float(p) for c, p in zip(cv.xyz(sl), centre)]
    rmat = _rotation(*rot)
    q2 = sum(((d[0] * rmat[0, k] + d[1] * rmat[1, k] + d[2] * rmat[2, k]) / radii[k]) ** 2 for k in range(3))
    return np.sqrt(q2)


def _ellipsoid(cv: _Canvas, centre: np.ndarray, radii: Sequence[float],
               rot: Sequence[float] = (0.0, 0.0, 0.0)) -> Optional[Tuple[Slices, np.ndarray]]:
    """Ellipsoid with semi-axes ``radii`` (mm) along its local axes, rotated by ``rot`` (degrees)."""
    r_max = float(max(radii))
    sl = cv.box(centre - r_max, centre + r_max)
    return None if sl is None else (sl, _ellipsoid_q(cv, sl, centre, radii, rot))


def _centre_line(points: np.ndarray, radii: np.ndarray, samples: int) -> Tuple[np.ndarray, np.ndarray]:
    """Smooth curve (cubic spline in chord length) through control points; radii interpolated linearly."""
    t = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(points, axis=0), axis=1))])
    t /= t[-1]
    ts = np.linspace(0.0, 1.0, samples)
    curve = make_interp_spline(t, points, k=min(3, len(points) - 1))(ts)
    return curve, np.interp(ts, t, radii)


def _tube(cv: _Canvas, points: np.ndarray, radii: Sequence[float], z_stretch: float = 1.0,
          samples: int = 20) -> Optional[Tuple[Slices, np.ndarray]]:
    """Tube of varying radius (mm) around a smooth centre line through ``points`` ((K, 3) x, y, z mm).

    q = min over segments of distance / local radius. ``z_stretch`` > 1 makes the cross-section that
    many times taller along z (a ribbon, used for the adrenal limbs).
    """
    points = np.asarray(points, float)
    radii = np.broadcast_to(np.asarray(radii, float).ravel(), (len(points),))
    curve, rr = _centre_line(points, radii, samples)
    pad = np.array([rr.max(), rr.max(), rr.max() * z_stretch])
    sl = cv.box(curve.min(0) - pad, curve.max(0) + pad)
    if sl is None:
        return None
    X, Y, Z = cv.xyz(sl)
    Z = Z / z_stretch
    curve = curve / np.array([1.0, 1.0, z_stretch])
    q = np.full(X.shape, np.inf, dtype=np.float32)
    for a, b, ra, rb in zip(curve[:-1], curve[1:], rr[:-1], rr[1:]):
        ab = b - a
        dx, dy, dz = X - a[0], Y - a[1], Z - a[2]
        t = np.clip((dx * ab[0] + dy * ab[1] + dz * ab[2]) / max(float(ab @ ab), 1e-6), 0.0, 1.0)
        dist = np.sqrt((dx - t * ab[0]) ** 2 + (dy - t * ab[1]) ** 2 + (dz - t * ab[2]) ** 2)
        np.minimum(q, dist / (ra + t * (rb - ra)), out=q)
    return sl, q


# --------------------------------------------------------------------------------------------------
# Per-case frame: canonical anatomy (average adult, mm) -> this case's physical mm
# --------------------------------------------------------------------------------------------------
@dataclass
class _Frame:
    """Canonical coordinates are mm in an average abdomen whose cavity (inside the muscle wall) has
    half-axes 125 mm (left-right) and 92 mm (antero-posterior), origin at the cavity centre and the
    FOV's mid-slice. ``p`` maps them to this case's deformed-anatomy mm; ``size`` scales lengths."""

    centre: np.ndarray  # (x, y, z) mm of the canonical origin
    k: np.ndarray  # (kx, ky, kz) scale factors

    def p(self, x: float, y: float, z: float) -> np.ndarray:
        return self.centre + self.k * np.array([x, y, z], float)

    def pts(self, points: Sequence[Sequence[float]]) -> np.ndarray:
        return self.centre + self.k * np.asarray(points, float)

    def size(self, radii: Sequence[float], scale: float = 1.0) -> np.ndarray:
        """(x, y, z) lengths; in-plane lengths use the geometric mean of kx and ky."""
        kxy = float(np.sqrt(self.k[0] * self.k[1]))
        return scale * np.asarray(radii, float) * np.array([kxy, kxy, self.k[2]])

    def r(self, radius: float | Sequence[float], scale: float = 1.0) -> np.ndarray:
        return scale * float(np.sqrt(self.k[0] * self.k[1])) * np.atleast_1d(np.asarray(radius, float))


@dataclass
class _Body:
    """Per-case body outline parameters (mm)."""

    a: float  # half width (skin)
    b: float  # half depth (skin)
    fat: float  # subcutaneous fat thickness
    muscle: float  # muscle wall thickness
    cx: float
    cy: float


def _draw_body(rng: np.random.Generator) -> _Body:
    a = rng.uniform(138.0, 166.0)
    b = a * rng.uniform(0.72, 0.80)  # antero-posterior depth follows the width (habitus)
    fat = rng.uniform(6.0, 14.0) + 0.45 * (a - 138.0)  # bigger bodies carry more fat
    return _Body(a, b, fat, rng.uniform(8.0, 13.0), rng.normal(0, 5), rng.normal(0, 5))


def _draw_frame(rng: np.random.Generator, body: _Body) -> _Frame:
    cavity_a = body.a - body.fat - 1.2 * body.muscle
    cavity_b = body.b - 0.85 * body.fat - body.muscle
    k = np.array([cavity_a / 125.0, cavity_b / 92.0, rng.uniform(0.93, 1.07)])
    return _Frame(np.array([body.cx, body.cy, rng.normal(0.0, 6.0)]), k)


def _jit(rng: np.random.Generator, sigma: float = 5.0) -> np.ndarray:
    """Random organ displacement (x, y, z) mm; z a little larger (breathing, scan level)."""
    return rng.normal(0.0, 1.0, 3) * np.array([sigma, sigma, 1.3 * sigma])


def _inside(cv: _Canvas, res: Optional[Tuple[Slices, np.ndarray]], rng: Optional[np.random.Generator] = None,
            lo: Optional[np.ndarray] = None, hi: Optional[np.ndarray] = None, amp: float = 0.0,
            region: Optional[np.ndarray] = None) -> Optional[Tuple[Slices, np.ndarray]]:
    """Mask q <= 1 (+ smooth boundary wobble of relative amplitude ``amp``), clipped to ``region``."""
    if res is None:
        return None
    sl, q = res
    limit = 1.0 + amp * cv.wobble(rng, sl, lo, hi) if amp > 0 else 1.0
    mask = q <= limit
    if region is not None:
        mask &= region[sl]
    return sl, mask


# --------------------------------------------------------------------------------------------------
# Body wall, thorax, skeleton, muscles
# --------------------------------------------------------------------------------------------------
def _body_wall(cv: _Canvas, fr: _Frame, rng: np.random.Generator, body: _Body) -> None:
    """Skin outline (deformed super-ellipse varying along z), subcutaneous fat, muscle wall, cavity."""
    zk = _knots(-cv.half, cv.half, 60.0)
    a_z = np.interp(cv.Z, zk, body.a * (1 + 0.04 * rng.standard_normal(len(zk))))
    b_z = np.interp(cv.Z, zk, body.b * (1 + 0.04 * rng.standard_normal(len(zk))))
    dx, dy = cv.X - body.cx, cv.Y - body.cy
    u, v = np.abs(dx) / a_z, np.abs(dy) / b_z
    p = np.where(dy > 0, 2.8, 2.1)  # the back is flatter than the belly
    theta = np.arctan2(dy, dx)
    modulation = 1.0 + sum(rng.normal(0, 0.025) * np.cos(k * theta + rng.uniform(0, 2 * np.pi)) for k in (2, 3, 4))
    rho = (u ** p + v ** p) ** (1.0 / p) / modulation
    depth = np.hypot(dx, dy) * (1.0 / np.maximum(rho, 1e-3) - 1.0)  # mm from the skin along the ray
    fat = body.fat * (1.0 - 0.3 * np.sin(theta))  # thicker anteriorly (sin < 0), thinner at the back
    muscle = body.muscle * (1.0 + 0.4 * np.cos(2 * theta))  # obliques laterally, rectus in front
    inside = rho <= 1.0
    cv.tissue[inside] = T["fat"]
    cv.inner_body = inside & (depth >= fat)
    cv.tissue[cv.inner_body] = T["muscle"]
    cv.cavity = inside & (depth >= fat + muscle)
    cv.tissue[cv.cavity] = T["fat"]  # visceral fat fills whatever the organs leave
    linea_alba = cv.inner_body & ~cv.cavity & (np.abs(dx) < 4.0) & (dy < 0)
    cv.tissue[linea_alba] = T["fat"]
    _ribs(cv, fr, rng, depth, fat, theta)


def _ribs(cv: _Canvas, fr: _Frame, rng: np.random.Generator, depth: np.ndarray, fat: np.ndarray,
          theta: np.ndarray) -> None:
    """Oblique rib bands in the upper wall (not in front of the midline), every ~30 mm along z."""
    period = rng.uniform(27.0, 33.0)
    phase = (cv.Z - rng.uniform(0, period) + 70.0 * np.cos(theta + np.pi / 2)) % period  # ribs run obliquely
    in_wall = (depth > fat + 1.0) & (depth < fat + 9.0)
    upper = cv.Z > fr.centre[2] - 40.0 - 25.0 * np.sin(theta)  # lower ribs reach further down at the back
    not_front = np.abs(theta + np.pi / 2) > np.deg2rad(35)
    cv.tissue[in_wall & upper & not_front & (phase < 9.0)] = T["bone_cortex"]


def _diaphragm(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Two domes (right higher); above them lung bases, mediastinal fat, the heart; below: ``space``."""
    zr, zl = fr.p(0, 0, 108)[2] + rng.normal(0, 5), fr.p(0, 0, 97)[2] + rng.normal(0, 5)
    xr, xl = fr.p(-55, 0, 0)[0], fr.p(55, 0, 0)[0]
    dy2 = 0.6 * (cv.Y - fr.p(0, 0, 0)[1]) ** 2
    dome = np.maximum(zr - 0.008 * ((cv.X - xr) ** 2 + dy2), zl - 0.008 * ((cv.X - xl) ** 2 + dy2))
    above = cv.cavity & (cv.Z > dome)
    cv.space = cv.cavity & (cv.Z <= dome - 8.0)
    cv.tissue[cv.cavity & ~above & ~cv.space] = T["muscle"]  # diaphragm muscle sheet
    lung = above & (np.abs(cv.X - fr.centre[0]) > 30.0 * fr.k[0])
    cv.tissue[lung] = T["lung"]
    heart = _inside(cv, _ellipsoid(cv, fr.p(15, -30, 150) + _jit(rng), fr.size((75, 55, 50))), region=above)
    if heart is not None:
        cv.paint(heart[0], heart[1], T["heart"])


def _spine(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Vertebral bodies (cortical rim, cancellous centre) with discs, canal, arch and spinous process."""
    c = fr.p(rng.normal(0, 2), 50, 0)
    lordosis = rng.normal(0, 4e-4)
    sl = cv.box(c - np.array([60, 80, 1e4]), c + np.array([60, 80, 1e4]))  # whole z range
    X, Y, Z = cv.xyz(sl)
    y_c = c[1] + lordosis * (Z - c[2]) ** 2
    rx, ry = fr.r(22)[0], fr.r(17)[0]
    q_vb = np.sqrt(((X - c[0]) / rx) ** 2 + ((Y - y_c) / ry) ** 2)
    period, offset = rng.uniform(34, 38), rng.uniform(0, 40)
    level = (Z - offset) % period  # 0..period along each vertebra + disc
    disc = level > period - 8.0
    cv.paint(sl, (q_vb <= 1) & disc, T["disc"])
    endplate = (level < 1.5) | (level > period - 9.5)
    cv.paint(sl, (q_vb <= 1) & ~disc & ((q_vb > 0.8) | endplate), T["bone_cortex"])
    cv.paint(sl, (q_vb <= 0.8) & ~disc & ~endplate, T["bone_cancellous"])
    d_canal = np.hypot(X - c[0], Y - (y_c + fr.r(24)[0]))
    arch = (d_canal <= fr.r(15)[0]) & (level < period - 10.0)
    cv.paint(sl, arch & (d_canal > fr.r(8)[0]), T["bone_cortex"])
    spinous = (np.abs(X - c[0]) < fr.r(4)[0]) & (Y > y_c + fr.r(36)[0]) & (Y < y_c + fr.r(50)[0])
    cv.paint(sl, spinous & (level < period - 14.0) & cv.inner_body[sl], T["bone_cortex"])
    cv.paint(sl, d_canal <= fr.r(8)[0], T["csf"])


def _back_muscles(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Paraspinal muscles (whole z) and psoas muscles (growing inferiorly from T12)."""
    for side in (-1, 1):
        c = fr.p(side * 30, 82, 0) + _jit(rng, 2)
        sl = cv.box(c - np.array([40, 40, 400]), c + np.array([40, 40, 400]))
        X, Y, _ = cv.xyz(sl)
        para = ((X - c[0]) / fr.r(22)[0]) ** 2 + ((Y - c[1]) / fr.r(15)[0]) ** 2 <= 1
        cv.paint(sl, para & cv.inner_body[sl] & (cv.tissue[sl] != T["bone_cortex"]), T["muscle"])
        pts = fr.pts([[side * 24, 46, 32], [side * 32, 44, -30], [side * 45, 36, -130]])
        psoas = _inside(cv, _tube(cv, pts, fr.r([4, 14, 21], rng.uniform(0.85, 1.15))), region=cv.space)
        if psoas is not None:
            cv.paint(*psoas, T["muscle"])


# --------------------------------------------------------------------------------------------------
# Unlabelled distractors: duodenum, colon, small bowel
# --------------------------------------------------------------------------------------------------
def _bowel(cv: _Canvas, rng: np.random.Generator, points: np.ndarray, radii: Sequence[float],
           gas_fraction: float, wall_mm: float = 3.0) -> None:
    """A bowel segment: enhancing wall, fluid content, gas pockets (mottled, rising anteriorly)."""
    res = _tube(cv, points, radii)
    if res is None:
        return
    sl, q = res
    inside = (q <= 1.0) & cv.space[sl]
    lo, hi = points.min(0) - max(radii), points.max(0) + max(radii)
    noise = cv.wobble(rng, sl, lo, hi, cell_mm=12.0)
    cv.paint(sl, inside, T["bowel_wall"], only_labels=[0])
    lumen = inside & (q <= 1.0 - wall_mm / float(np.max(radii)))
    cv.paint(sl, lumen, T["bowel_fluid"], only_labels=[0])
    y_rel = (cv.Y[sl] - points[:, 1].mean()) / float(np.max(radii))  # negative = anterior (up, supine)
    gas = lumen & (noise - 1.5 * y_rel > 2.0 * (1.0 - gas_fraction) - 0.5)
    cv.paint(sl, gas, T["gas"], only_labels=[0])


def _duodenum_and_colon(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    j = _jit(rng, 4)
    duo = fr.pts([[-22, -45, 8], [-50, -28, 6], [-58, -2, -8], [-45, 10, -30], [-10, 5, -38], [20, -2, -32]]) + j
    _bowel(cv, rng, duo, fr.r(11, rng.uniform(0.9, 1.1)), rng.uniform(0.1, 0.5))
    colon = [
        [[-92, 10, -125], [-95, 0, -60], [-88, -15, -10]],
        [[-88, -15, -10], [-45, -68, -5], [10, -72, -10], [60, -60, 5], [92, -20, 15]],
        [[92, -20, 15], [100, 10, -40], [95, 15, -125]],
    ]
    r_colon = fr.r(20, rng.uniform(0.85, 1.15))
    for seg in colon:
        _bowel(cv, rng, fr.pts(seg) + _jit(rng, 4), r_colon, rng.uniform(0.3, 0.8))


def _small_bowel(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Randomly walking loops in the lower anterior abdomen."""
    for _ in range(rng.integers(6, 10)):
        start = np.array([rng.uniform(-60, 70), rng.uniform(-75, 5), rng.uniform(-120, -25)])
        steps = rng.normal(0, 1, (3, 3)) * np.array([25.0, 15.0, 20.0])
        pts = fr.pts(start + np.concatenate([[np.zeros(3)], np.cumsum(steps, axis=0)]))
        _bowel(cv, rng, pts, fr.r(rng.uniform(10, 14)), rng.uniform(0.0, 0.4))


# --------------------------------------------------------------------------------------------------
# Labelled organs (one small function each; painted in anatomical overlap order)
# --------------------------------------------------------------------------------------------------
def _liver(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Large right lobe in the right upper quadrant plus a thinner left lobe crossing anteriorly."""
    s = rng.uniform(0.95, 1.05)
    lobes = [((-58, -5, 42), (70, 85, 65), rng.uniform(-8, 8)), ((15, -58, 58), (50, 24, 36), -15 + rng.uniform(-8, 8))]
    for centre, radii, angle in lobes:
        c, r = fr.p(*centre) + _jit(rng, 4), fr.size(radii, s * rng.uniform(0.95, 1.05, 3))
        mask = _inside(cv, _ellipsoid(cv, c, r, (0, 0, angle)), rng, c - r, c + r, 0.07, cv.space)
        if mask is not None:
            cv.paint(*mask, T["liver"], LIVER)


def _hepatic_veins(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Unlabelled-looking but labelled-liver vessels: enhance like veins, keep the liver label."""
    top = fr.p(-22, 5, 88)
    for end, r_end in (((-95, 5, 55), 2.5), ((-50, -45, 55), 2.5), ((5, -50, 70), 2.5)):
        pts = np.stack([top, (top + fr.p(*end)) / 2 + _jit(rng, 4), fr.p(*end) + _jit(rng, 5)])
        res = _inside(cv, _tube(cv, pts, fr.r([5.0, 3.5, r_end])))
        if res is not None:
            cv.paint(*res, T["hepatic_vein"], only_labels=[LIVER])


def _spleen(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Crescent along the left posterolateral wall: ellipsoid minus a hilar notch facing medially."""
    s = rng.uniform(0.85, 1.15)
    angle = -45 + rng.uniform(-10, 10)  # long axis runs anterolateral <-> posteromedial
    c, r = fr.p(85, 30, 50) + _jit(rng), fr.size((50, 20, 45), s)
    res = _inside(cv, _ellipsoid(cv, c, r, (0, 0, angle)), rng, c - r.max(), c + r.max(), 0.08, cv.space)
    if res is None:
        return
    normal = _rotation(0, 0, angle)[:, 1]  # local y: points posterolaterally
    notch = _ellipsoid_q(cv, res[0], c - normal * r[1] * 1.1, fr.size((28, 12, 24), s), (0, 0, angle))
    cv.paint(res[0], res[1] & (notch > 1.0), T["spleen"], SPLEEN)


def _stomach(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """J-shaped tube from the fundus (below the left dome) to the pylorus; wall, fluid and an air cap."""
    j = _jit(rng, 5)
    pts = fr.pts([[45, 5, 70], [58, -18, 48], [42, -50, 24], [5, -58, 12], [-22, -45, 8]]) + j
    radii = fr.r([26, 27, 23, 16, 10], rng.uniform(0.88, 1.12))
    res = _tube(cv, pts, radii, samples=24)
    if res is None:
        return
    sl, q = res
    organ = (q <= 1.0) & cv.space[sl]
    cv.paint(sl, organ, T["stomach_wall"], STOMACH)
    lumen = organ & (q <= 1.0 - 6.0 / radii.max())  # ~5 mm wall
    cv.paint(sl, lumen, T["stomach_fluid"], STOMACH)
    air_level = pts[:, 1].min() + rng.uniform(0.0, 25.0)  # supine: gas collects anteriorly (low y)
    cv.paint(sl, lumen & (cv.Y[sl] < air_level) & (cv.Z[sl] > pts[2, 2]), T["gas"], STOMACH)


def _esophagus(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Small tube anterior-left of the aorta, from the top slices down through the hiatus to the cardia."""
    pts = fr.pts([[12, 12, 135], [18, 6, 95], [30, -2, 72], [42, -5, 60]]) + _jit(rng, 2) * np.array([1, 1, 0.5])
    res = _inside(cv, _tube(cv, pts, fr.r([8, 8, 9, 10], rng.uniform(0.9, 1.1))), region=cv.cavity)
    if res is not None:
        cv.paint(*res, T["esophagus"], ESOPHAGUS)


def _kidney(cv: _Canvas, fr: _Frame, rng: np.random.Generator, side: int, label: int) -> None:
    """Bean: ellipsoid with an anteromedial hilum (sinus fat), cortex and medulla, perirenal fat halo.

    ``side`` = -1 right (patient right = low x), +1 left. Upper pole tilted medially and posteriorly.
    """
    centre = fr.p(62 * side, 52, -5 if side > 0 else -5 - rng.uniform(10, 30)) + _jit(rng, 4)
    r = fr.size((27, 24, 55), rng.uniform(0.88, 1.12))
    rot = (rng.uniform(-20, -10), side * rng.uniform(-20, -10), side * rng.uniform(20, 40))
    res = _ellipsoid(cv, centre, r * 1.25, rot)
    if res is None:
        return
    sl, q = res
    q = q * 1.25  # q <= 1.25 is the perirenal fat halo, q <= 1 the kidney
    cv.paint(sl, (q <= 1.25) & cv.space[sl], T["fat"], 0, only_labels=[0, LIVER, SPLEEN])
    organ = (q <= 1.0 + 0.06 * cv.wobble(rng, sl, centre - r.max(), centre + r.max())) & cv.space[sl]
    hilum_dir = _rotation(*rot)[:, 0] * (-side)  # local x points laterally; hilum is medial
    hilum = _ellipsoid_q(cv, sl, centre + hilum_dir * r[0] * 0.9, [r[0] * 0.55] * 3) < 1.0
    cv.paint(sl, organ & ~hilum, T["kidney_cortex"], label)
    cv.paint(sl, organ & ~hilum & (q < 0.62), T["kidney_medulla"], label)
    cv.paint(sl, organ & hilum, T["fat"], 0)


def _gallbladder(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Pear: fundus anterior-inferior below the liver edge, neck pointing up to the liver hilum."""
    pts = fr.pts([[-38, -62, -12], [-40, -40, 2], [-32, -20, 18]]) + _jit(rng, 5)
    res = _inside(cv, _tube(cv, pts, fr.r([16, 13, 7], rng.uniform(0.85, 1.15))), region=cv.space)
    if res is not None:
        cv.paint(*res, T["bile"], GALLBLADDER)


def _pancreas(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Curved organ: head in the duodenal C (right), neck, body over the aorta, tail to the splenic hilum."""
    pts = fr.pts([[-30, -6, -8], [-8, -14, 2], [22, -17, 10], [52, 1, 18], [70, 14, 26]]) + _jit(rng, 3)
    radii = fr.r([17, 13, 13, 11.5, 9], rng.uniform(0.9, 1.1))
    res = _tube(cv, pts, radii, samples=24)
    if res is None:
        return
    sl, q = res
    lo, hi = pts.min(0) - radii.max(), pts.max(0) + radii.max()
    organ = (q <= 1.0 + 0.12 * cv.wobble(rng, sl, lo, hi, 15.0)) & cv.space[sl]  # lobulated outline
    cv.paint(sl, organ, T["pancreas"], PANCREAS)


def _aorta_and_sma(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Aorta: tube just anterior-left of the vertebral bodies over the whole z range; SMA unlabelled."""
    j = _jit(rng, 2) * np.array([1, 1, 0])
    pts = fr.pts([[15, 28, 135], [12, 24, 60], [8, 21, -30], [5, 19, -135]]) + j
    res = _inside(cv, _tube(cv, pts, fr.r(11, rng.uniform(0.85, 1.15))), region=cv.cavity)
    if res is not None:
        cv.paint(*res, T["artery"], AORTA)
    sma = fr.pts([[8, 12, 6], [6, -2, 0], [3, -14, -40], [0, -18, -110]]) + j
    res = _inside(cv, _tube(cv, sma, fr.r([4, 4, 3.5, 3])), region=cv.space)
    if res is not None:
        cv.paint(*res, T["artery"], only_labels=[0])


def _ivc(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """IVC: tube right of the aorta, running up and slightly forward into the liver (ends at ~T10)."""
    pts = fr.pts([[-24, 20, -135], [-24, 18, -30], [-26, 12, 30], [-24, 5, 70], [-21, 5, 92]]) + _jit(rng, 2)
    res = _inside(cv, _tube(cv, pts, fr.r(11, rng.uniform(0.85, 1.15))), region=cv.cavity)
    if res is not None:
        cv.paint(*res, T["vena_cava"], IVC)


def _portal_splenic(cv: _Canvas, fr: _Frame, rng: np.random.Generator) -> None:
    """Splenic vein from the splenic hilum behind the pancreas to the confluence, portal vein to the
    liver hilum and a short intrahepatic branch."""
    ctrl = [[70, 20, 30], [50, 12, 22], [22, 2, 14], [0, -2, 10], [-18, -7, 20], [-32, -9, 32], [-42, -8, 40],
            [-60, -3, 46]]
    pts = fr.pts(ctrl) + _jit(rng, 2)
    radii = fr.r([5.5, 5.5, 5.5, 6.5, 7.5, 7.5, 6.5, 4.5], rng.uniform(0.85, 1.15))
    res = _inside(cv, _tube(cv, pts, radii, samples=28), region=cv.space)
    if res is not None:
        cv.paint(*res, T["portal_vein"], PSV)


def _adrenal(cv: _Canvas, fr: _Frame, rng: np.random.Generator, side: int, label: int) -> None:
    """Inverted Y: two thin limbs (ribbons, tall along z) diverging posteriorly from an anterior apex,
    superomedial to the kidney's upper pole, wrapped in retroperitoneal fat."""
    apex = fr.p(31 * side, 24, 40 if side < 0 else 30) + _jit(rng, 3)
    s = rng.uniform(0.95, 1.1)
    limbs = ([side * -4, 20, -2], [side * 14, 17, -5])  # medial limb, lateral limb (from the apex)
    for limb in limbs:
        end = apex + fr.size(limb, s)
        mid = (apex + end) / 2 + rng.normal(0, 1.5, 3)
        pts = np.stack([apex, mid, end])
        stretch = 3.4 * s  # ~ 8 mm thick and ~ 30 mm tall at the apex, thinner toward the limb's end
        # thickness in absolute mm: adrenal glands hardly scale with body habitus
        halo = _inside(cv, _tube(cv, pts, [7.0, 6.5, 5.5], z_stretch=stretch / 1.6), region=cv.space)
        if halo is not None:
            cv.paint(*halo, T["fat"], 0, only_labels=[0, LIVER, SPLEEN, PANCREAS, STOMACH])
        res = _inside(cv, _tube(cv, pts, [4.0, 3.7, 3.1], z_stretch=stretch), region=cv.space)
        if res is not None:
            cv.paint(*res, T["adrenal"], label)


# --------------------------------------------------------------------------------------------------
# CT image formation
# --------------------------------------------------------------------------------------------------
def _tissue_means(rng: np.random.Generator) -> np.ndarray:
    """Per-case mean HU per tissue. A shared contrast-phase variable shifts all enhancing tissues
    together (early vs late portal-venous), an individual term varies each tissue."""
    phase = rng.uniform()
    means = []
    for _name, lo, hi, _tex, enhancing in _TISSUES:
        v = rng.uniform()
        f = np.clip(0.6 * phase + 0.4 * v, 0, 1) if enhancing else v
        means.append(lo + (hi - lo) * f)
    return np.asarray(means, np.float32) + np.float32(rng.normal(0, 2))  # + scanner calibration offset


def _render(cv: _Canvas, rng: np.random.Generator) -> np.ndarray:
    """Tissue map -> int16 HU: mean + texture, partial-volume blur, quantum noise."""
    tex = np.array([t[3] for t in _TISSUES], np.float32)
    img = _tissue_means(rng)[cv.tissue] + tex[cv.tissue] * cv.texture
    # Partial volume: each voxel integrates a box of its size (sigma = size / sqrt(12)) seen through the
    # scanner PSF (in-plane FWHM ~1.2 mm; slice profile FWHM = slice thickness = z spacing), so the
    # blur in mm is larger along z.
    fwhm = np.array([cv.spacing[0], 1.2, 1.2])
    sigma_mm = np.sqrt(np.square(cv.spacing) / 12.0 + (fwhm / 2.355) ** 2)
    img = gaussian_filter(img, sigma=sigma_mm / np.asarray(cv.spacing), truncate=3.0)
    img += rng.uniform(10.0, 25.0) * rng.standard_normal(cv.shape, dtype=np.float32)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)


def generate_case(rng: np.random.Generator, shape: Sequence[int] = DEFAULT_SHAPE,
                  spacing: Sequence[float] = DEFAULT_SPACING) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal CT and its 13-organ label map (pure function, no I/O).

    :param rng: source of all randomness (body habitus, organ sizes/positions/deformations, contrast
        phase, noise); the same generator state gives the same case.
    :param shape: voxels along (z, y, x).
    :param spacing: voxel size in mm along (z, y, x).
    :return: ``(image_hu, label)``, both of shape ``shape`` indexed (z, y, x): ``image_hu`` int16
        Hounsfield units, ``label`` uint8 Synapse ids 0..13 (see ``labels.SYNAPSE_CLASSES``).
        x points to the patient's left, y posterior, z superior (slice 0 = most inferior).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    cv = _Canvas(rng, shape, spacing, deform_mm=rng.uniform(2.0, 4.0))
    body = _draw_body(rng)
    fr = _draw_frame(rng, body)
    _body_wall(cv, fr, rng, body)
    _diaphragm(cv, fr, rng)
    _back_muscles(cv, fr, rng)
    _spine(cv, fr, rng)
    _duodenum_and_colon(cv, fr, rng)
    _small_bowel(cv, fr, rng)
    for organ in (_liver, _hepatic_veins, _spleen, _stomach, _gallbladder, _pancreas):
        organ(cv, fr, rng)
    _kidney(cv, fr, rng, -1, R_KIDNEY)
    _kidney(cv, fr, rng, +1, L_KIDNEY)
    for organ in (_aorta_and_sma, _ivc, _portal_splenic, _esophagus):
        organ(cv, fr, rng)
    _adrenal(cv, fr, rng, -1, R_ADRENAL)
    _adrenal(cv, fr, rng, +1, L_ADRENAL)
    return _render(cv, rng), cv.label


# --------------------------------------------------------------------------------------------------
# Dataset writing
# --------------------------------------------------------------------------------------------------
def case_rng(seed: int, role: str, index: int) -> np.random.Generator:
    """Generator for one case, keyed by (seed, role, index): independent of -np and of other cases."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), ROLES[role], int(index)]))


def case_id(role: str, index: int) -> str:
    return f"phantom_{role}_{index:04d}"


def _write_nifti(array: np.ndarray, spacing: Spacing3, path: str) -> None:
    """Write a (z, y, x) array with spacing (z, y, x) mm, identity direction, FOV centre at (0, 0, 0)."""
    img = sitk.GetImageFromArray(array)
    sp_xyz = tuple(float(s) for s in spacing[::-1])
    img.SetSpacing(sp_xyz)
    img.SetOrigin(tuple(-(n - 1) / 2 * s for n, s in zip(array.shape[::-1], sp_xyz)))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with atomic_output(path) as tmp:
        sitk.WriteImage(img, tmp, True)


_FOLDERS = {"tr": ("imagesTr", "labelsTr"), "ts": ("imagesTs", "labelsTs"), "un": (UNLABELED_IMAGES_FOLDER, None)}


def _write_case(job: Tuple[str, str, int, int, Shape3, Spacing3]) -> str:
    """Generate and write one case (top-level so that worker processes can run it)."""
    folder, role, index, seed, shape, spacing = job
    image, label = generate_case(case_rng(seed, role, index), shape, spacing)
    images_dir, labels_dir = _FOLDERS[role]
    cid = case_id(role, index)
    _write_nifti(image, spacing, os.path.join(folder, images_dir, f"{cid}_0000.nii.gz"))
    if labels_dir is not None:
        _write_nifti(label, spacing, os.path.join(folder, labels_dir, f"{cid}.nii.gz"))
    return cid


def _dataset_json(name: str, counts: Tuple[int, int, int], shape: Shape3, spacing: Spacing3, seed: int) -> dict:
    n_tr, n_ts, n_un = counts
    return {
        "channel_names": {"0": "CT"},
        "labels": synapse_labels_dict(),
        "numTraining": n_tr,
        "file_ending": ".nii.gz",
        "name": name,
        "description": (
            "Synthetic abdominal CT phantom (portal-venous phase) with the 13 Synapse/BTCV organ labels, made "
            "by nnunetv2_skcdf (skcdf_make_phantom). imagesTr/labelsTr: labelled training cases; "
            "imagesTs/labelsTs: test cases with labels for evaluation; imagesUnlabeled: unlabelled images for "
            "semi-supervised training. Array axes (z, y, x); LPS: x to patient left, y posterior, z superior."
        ),
        "reference": "synthetic, nnunetv2_skcdf.dataset_conversion.phantom",
        "licence": "CC0 (synthetic data)",
        "release": GENERATOR_VERSION,
        "numTest": n_ts,
        "numUnlabeled": n_un,
        "unlabeled_images_folder": UNLABELED_IMAGES_FOLDER,
        "phantom_generator": {
            "version": GENERATOR_VERSION,
            "seed": seed,
            "shape_zyx_voxels": list(shape),
            "spacing_zyx_mm": list(spacing),
            "orientation": "identity direction (LPS), FOV centre at (0, 0, 0) mm",
        },
    }


def _check_options(dataset_id: int, name: str, counts: Sequence[int], shape: Sequence[int],
                   spacing: Sequence[float], seed: int, num_processes: int) -> None:
    if not 1 <= int(dataset_id) <= 999:
        raise SKCDFInputError(f"Dataset id {dataset_id} is out of range: nnU-Net ids are 1..999 (option -d).")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_\-]*", name):
        raise SKCDFInputError(f"Dataset name {name!r}: use letters, digits, '_' and '-' only (option --name).")
    if counts[0] < 1 or min(counts) < 0:
        raise SKCDFInputError(f"Case counts {tuple(counts)}: need >= 1 training case and >= 0 test/unlabelled cases.")
    if len(shape) != 3 or min(shape) < 8:
        raise SKCDFInputError(f"Shape {tuple(shape)}: give three sizes (z y x), each >= 8 voxels (option --shape).")
    if len(spacing) != 3 or min(spacing) <= 0:
        raise SKCDFInputError(f"Spacing {tuple(spacing)}: give three positive sizes in mm (z y x) (option --spacing).")
    if seed < 0:
        raise SKCDFInputError(f"Seed {seed} must be >= 0 (option --seed).")
    if num_processes < 1:
        raise SKCDFInputError(f"-np {num_processes}: need at least one process.")


def _check_target(root: str, folder_name: str, dataset_id: int, overwrite: bool) -> str:
    """Raise if the dataset folder exists (without ``overwrite``) or the id is taken by another name."""
    prefix = f"Dataset{int(dataset_id):03d}_"
    if os.path.isdir(root):
        others = sorted(d for d in os.listdir(root) if d.startswith(prefix) and d != folder_name)
        if others:
            raise SKCDFInputError(
                f"Dataset id {dataset_id} is already used by {os.path.join(root, others[0])}. nnU-Net needs unique "
                f"ids: pick another id (-d) or remove that folder."
            )
    target = os.path.join(root, folder_name)
    if os.path.lexists(target) and not overwrite:
        raise SKCDFInputError(f"{target} already exists. Pass --overwrite (overwrite=True) to replace it.")
    if os.path.lexists(target) and not os.path.isdir(target):
        raise SKCDFInputError(f"{target} exists and is not a folder; remove it first.")
    return target


def _swap_in(tmp: str, target: str) -> None:
    """Move the finished ``tmp`` folder to ``target``, replacing an old one (kept until the swap is done)."""
    if os.path.lexists(target):
        old = tempfile.mkdtemp(prefix=f".old_{os.path.basename(target)}_", dir=os.path.dirname(target))
        os.rmdir(old)
        os.rename(target, old)
        os.rename(tmp, target)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, target)


def make_phantom_dataset(output_root: Optional[str] = None, dataset_id: int = 950, name: str = "SKCDFPhantom",
                         num_train: int = 20, num_test: int = 6, num_unlabeled: int = 10,
                         shape: Sequence[int] = DEFAULT_SHAPE, spacing: Sequence[float] = DEFAULT_SPACING,
                         seed: int = 0, num_processes: int = 1, overwrite: bool = False,
                         progress: bool = True) -> str:
    """Write the phantom as ``<output_root>/Dataset<id>_<name>`` (nnU-Net v2 raw format); return that path.

    ``output_root`` defaults to ``$nnUNet_raw``. ``shape`` is in voxels (z, y, x), ``spacing`` in mm
    (z, y, x). The dataset is built in a hidden temporary sibling folder and renamed into place when
    complete, so an interrupted run leaves no half-written dataset; an existing dataset folder is
    only replaced with ``overwrite=True``. Case ``i`` of each role depends only on (seed, role, i).
    """
    counts = (int(num_train), int(num_test), int(num_unlabeled))
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    _check_options(dataset_id, name, counts, shape, spacing, int(seed), int(num_processes))
    root = os.path.abspath(output_root if output_root is not None else _env_folder("nnUNet_raw"))
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    target = _check_target(root, folder_name, dataset_id, overwrite)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp_{folder_name}_", dir=root)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", UNLABELED_IMAGES_FOLDER):
            os.makedirs(os.path.join(tmp, sub))
        jobs = [(tmp, role, i, int(seed), shape, spacing) for role, n in zip(ROLES, counts) for i in range(n)]
        for _ in imap_with_progress(_write_case, jobs, int(num_processes), "phantom cases", progress):
            pass
        atomic_save_json(_dataset_json(name, counts, shape, spacing, int(seed)), os.path.join(tmp, "dataset.json"))
        _check_target(root, folder_name, dataset_id, overwrite)  # nobody created it meanwhile
        _swap_in(tmp, target)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skcdf_make_phantom",
        description=(
            "Make a synthetic abdominal CT dataset with the 13 Synapse organ labels (spleen, kidneys,\n"
            "gallbladder, esophagus, liver, stomach, aorta, IVC, portal/splenic veins, pancreas, adrenal\n"
            "glands) in nnU-Net v2 raw format:\n"
            "  <output_root>/Dataset<ID>_<NAME>/dataset.json\n"
            "      imagesTr/ + labelsTr/   labelled training cases  (phantom_tr_XXXX)\n"
            "      imagesTs/ + labelsTs/   test cases with labels   (phantom_ts_XXXX)\n"
            "      imagesUnlabeled/        unlabelled images        (phantom_un_XXXX)\n"
            "Images are int16 HU (<case>_0000.nii.gz), labels uint8 (<case>.nii.gz); ~0.25 s per case\n"
            "at the default size."
        ),
        epilog=(
            "example: skcdf_make_phantom -d 950 --num-train 20 --num-test 6 --num-unlabeled 10 -np 4\n"
            "The same --seed gives byte-identical files, whatever -np and the other counts."
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("-o", "--output-root", default=None,
                   help="folder that receives Dataset<ID>_<NAME> (default: $nnUNet_raw)")
    p.add_argument("-d", "--dataset-id", type=int, default=950, help="nnU-Net dataset id, 1..999 (default: %(default)s)")
    p.add_argument("-n", "--name", default="SKCDFPhantom", help="dataset name (default: %(default)s)")
    p.add_argument("--num-train", type=int, default=20,
                   help="labelled training cases in imagesTr/labelsTr (default: %(default)s)")
    p.add_argument("--num-test", type=int, default=6,
                   help="test cases with labels in imagesTs/labelsTs (default: %(default)s)")
    p.add_argument("--num-unlabeled", type=int, default=10,
                   help=f"unlabelled cases in {UNLABELED_IMAGES_FOLDER} (default: %(default)s)")
    p.add_argument("--shape", type=int, nargs=3, default=list(DEFAULT_SHAPE), metavar=("Z", "Y", "X"),
                   help="image size in voxels (default: 48 96 96)")
    p.add_argument("--spacing", type=float, nargs=3, default=list(DEFAULT_SPACING), metavar=("Z", "Y", "X"),
                   help="voxel size in mm; slices thicker than in-plane (default: 5.0 3.6 3.6)")
    p.add_argument("--seed", type=int, default=0, help="random seed, >= 0 (default: %(default)s)")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="worker processes (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing dataset folder (without it an existing folder is an error)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return p


def make_phantom_entry(argv: Optional[Sequence[str]] = None) -> None:
    """Console script ``skcdf_make_phantom``; user errors print ``ERROR: ...`` and exit with status 2."""
    args = _parser().parse_args(argv)
    with exit_on_input_error():
        folder = make_phantom_dataset(
            args.output_root, args.dataset_id, args.name, args.num_train, args.num_test, args.num_unlabeled,
            tuple(args.shape), tuple(args.spacing), args.seed, args.num_processes, args.overwrite,
            progress=not args.no_progress,
        )
    print(f"Wrote {folder}")


if __name__ == "__main__":
    make_phantom_entry()
