"""Geometry and tissue primitives of the synthetic abdominal CT (``phantom.py``'s building blocks).

Smooth random fields on a fixed physical grid, the canvas (deformed coordinates, tissue and label maps),
shape primitives (ellipsoids, tubes around smooth centre lines), the per-case body and anatomical frame.
Everything here is pure numpy; ``phantom.py`` paints the anatomy with it, ``phantom_variation.py`` the
site-dependent additions (pathology, artefacts, contrast phases).

Conventions: arrays are indexed ``(z, y, x)``; physical points are given as ``(x, y, z)`` mm, x to the
patient's left, y posterior, z superior; see ``phantom.py``.
"""
from __future__ import annotations

from dataclasses import dataclass, field as dc_field
from typing import Dict, Iterable, Optional, Sequence, Tuple

import numpy as np
from scipy.interpolate import CubicSpline, make_interp_spline

Shape3 = Tuple[int, int, int]
Spacing3 = Tuple[float, float, float]
Slices = Tuple[slice, slice, slice]

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

    def __init__(self, rng: np.random.Generator, shape: Shape3, spacing: Spacing3, deform_mm: float,
                 z_offset_mm: float = 0.0):
        self.shape, self.spacing = tuple(shape), tuple(float(s) for s in spacing)
        self.axes = [((np.arange(n) - (n - 1) / 2) * s).astype(np.float32) for n, s in zip(shape, spacing)]
        self.centre_mm = (float(z_offset_mm), 0.0, 0.0)  # (z, y, x) of the FOV centre in anatomy coordinates
        if z_offset_mm:  # craniocaudal coverage centred z_offset_mm above the anatomy's mid-slice (sites only)
            self.axes[0] = ((np.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0] + z_offset_mm).astype(np.float32)
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
            a, b = a - self.centre_mm[ax], b - self.centre_mm[ax]  # (0, 0, 0) for the original phantom: exact
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
    #: per-organ size factors on top of the anatomy's own draws (sites: splenomegaly, compensatory hypertrophy);
    #: empty for the original phantom, where every factor is exactly 1.0
    organ_scale: Dict[str, float] = dc_field(default_factory=dict)

    def scale(self, organ: str) -> float:
        return self.organ_scale.get(organ, 1.0)

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


