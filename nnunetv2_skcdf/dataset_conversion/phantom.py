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
from dataclasses import asdict
from typing import Optional, Sequence, Tuple

import numpy as np
import SimpleITK as sitk
from scipy.ndimage import gaussian_filter

from nnunetv2_skcdf.dataset_conversion import phantom_variation as variation
from nnunetv2_skcdf.dataset_conversion.labels import ORGAN_SETS, SYNAPSE_CLASSES, synapse_labels_dict
from nnunetv2_skcdf.dataset_conversion.phantom_geometry import (
    _TISSUES,
    T,
    Shape3,
    Spacing3,
    _Body,
    _Canvas,
    _draw_body,
    _draw_frame,
    _ellipsoid,
    _ellipsoid_q,
    _Frame,
    _inside,
    _jit,
    _knots,
    _rotation,
    _tube,
)
from nnunetv2_skcdf.dataset_conversion.phantom_sites import (
    SITES,
    SITES_VERSION,
    CaseProtocol,
    case_grid,
    check_sites,
    draw_protocol,
)
from nnunetv2_skcdf.utilities.dataset_files import (
    UNLABELED_IMAGES_FOLDER,
    SKCDFInputError,
    _env_folder,
    check_dataset_ids_free,
    datasets_with_id,
    exit_on_input_error,
)
from nnunetv2_skcdf.utilities.io import atomic_output, atomic_save_json
from nnunetv2_skcdf.utilities.parallel import imap_with_progress

GENERATOR_VERSION = "1.0"
DEFAULT_SHAPE: Tuple[int, int, int] = (48, 96, 96)  # (z, y, x) voxels
DEFAULT_SPACING: Tuple[float, float, float] = (5.0, 3.6, 3.6)  # (z, y, x) mm
ROLES = {"tr": 0, "ts": 1, "un": 2}  # part of each case's seed: cases do not depend on each other
CASES_FILE = "phantom_cases.json"  # per-case site parameters (site datasets only), next to dataset.json

# Label ids, from labels.py so that the generator and the dataset.json agree.
_ID = {name: label_id for label_id, name, _ in SYNAPSE_CLASSES}
SPLEEN, R_KIDNEY, L_KIDNEY, GALLBLADDER = _ID["spleen"], _ID["right_kidney"], _ID["left_kidney"], _ID["gallbladder"]
ESOPHAGUS, LIVER, STOMACH, AORTA = _ID["esophagus"], _ID["liver"], _ID["stomach"], _ID["aorta"]
IVC, PSV, PANCREAS = _ID["inferior_vena_cava"], _ID["portal_and_splenic_veins"], _ID["pancreas"]
R_ADRENAL, L_ADRENAL = _ID["right_adrenal_gland"], _ID["left_adrenal_gland"]

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
    s = rng.uniform(0.95, 1.05) * fr.scale("liver")
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
    s = rng.uniform(0.85, 1.15) * fr.scale("spleen")
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
    r = fr.size((27, 24, 55), rng.uniform(0.88, 1.12) * fr.scale("left_kidney" if side > 0 else "right_kidney"))
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
                  spacing: Sequence[float] = DEFAULT_SPACING,
                  protocol: Optional[CaseProtocol] = None) -> Tuple[np.ndarray, np.ndarray]:
    """One synthetic abdominal CT and its 13-organ label map (pure function, no I/O).

    :param rng: source of all randomness of the anatomy (body habitus, organ sizes/positions/deformations,
        and without ``protocol`` also contrast phase and noise); the same generator state gives the same case.
    :param shape: voxels along (z, y, x) (with a protocol: ``phantom_sites.case_grid``'s).
    :param spacing: voxel size in mm along (z, y, x).
    :param protocol: a site's draws for this case (``phantom_sites.draw_protocol``): coverage, habitus,
        organ sizes, pathology, surgery, phase, kernel, dose, calibration, artefacts. ``None`` is the
        original phantom (one portal-venous protocol, healthy anatomy), bit-identical to release 0.4.
    :return: ``(image_hu, label)``, both of shape ``shape`` indexed (z, y, x): ``image_hu`` int16
        Hounsfield units, ``label`` uint8 Synapse ids 0..13 (see ``labels.SYNAPSE_CLASSES``).
        x points to the patient's left, y posterior, z superior (slice 0 = most inferior).
    """
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    z_offset = protocol.centre_mm if protocol is not None else 0.0
    cv = _Canvas(rng, shape, spacing, deform_mm=rng.uniform(2.0, 4.0), z_offset_mm=z_offset)
    body = _draw_body(rng)
    if protocol is not None:
        body = variation.apply_habitus(body, protocol)
    fr = _draw_frame(rng, body)
    if protocol is not None:
        variation.apply_organ_scale(fr, protocol)
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
    if protocol is not None:
        variation.remove_absent(cv, protocol)
    for organ in (_aorta_and_sma, _ivc, _portal_splenic, _esophagus):
        organ(cv, fr, rng)
    _adrenal(cv, fr, rng, -1, R_ADRENAL)
    _adrenal(cv, fr, rng, +1, L_ADRENAL)
    if protocol is None:
        return _render(cv, rng), cv.label
    site_rng = np.random.default_rng(protocol.seed)
    metal = variation.paint_pathology(cv, fr, site_rng, protocol)
    return variation.render(cv, site_rng, protocol, metal), cv.label


# --------------------------------------------------------------------------------------------------
# Dataset writing
# --------------------------------------------------------------------------------------------------
def case_rng(seed: int, role: str, index: int) -> np.random.Generator:
    """Generator for one case, keyed by (seed, role, index): independent of -np and of other cases."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), ROLES[role], int(index)]))


def protocol_rng(seed: int, role: str, index: int) -> np.random.Generator:
    """Generator of one case's site draws: a stream of its own, so that the anatomy's stays the original."""
    return np.random.default_rng(np.random.SeedSequence([int(seed), ROLES[role], int(index), 1]))


def case_site(sites: Sequence[str], index: int) -> str:
    """Case ``index`` of every role comes from ``sites[index % len(sites)]`` (each role covers every site)."""
    return sites[index % len(sites)]


def case_id(role: str, index: int) -> str:
    return f"phantom_{role}_{index:04d}"


def _write_nifti(array: np.ndarray, spacing: Spacing3, path: str, z_centre_mm: float = 0.0) -> None:
    """Write a (z, y, x) array with spacing (z, y, x) mm, identity direction, FOV centre at (0, 0, z_centre_mm)."""
    img = sitk.GetImageFromArray(array)
    sp_xyz = tuple(float(s) for s in spacing[::-1])
    img.SetSpacing(sp_xyz)
    origin = [-(n - 1) / 2 * s for n, s in zip(array.shape[::-1], sp_xyz)]
    if z_centre_mm:
        origin[2] += z_centre_mm
    img.SetOrigin(tuple(origin))
    img.SetDirection((1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0))
    with atomic_output(path) as tmp:
        sitk.WriteImage(img, tmp, True)


def resolve_organs(organs: Sequence[str]) -> Tuple[int, ...]:
    """The Synapse label ids of the organs to label (``--organs``), in label order; ``()`` means all 13.

    ``organs``: nnU-Net label names (``spleen``), the paper's abbreviations (``Sp``, any case) or one set name
    from ``labels.ORGAN_SETS`` (``all``, ``synapse8``).
    """
    if not organs:
        return ()
    by_name = {name: lid for lid, name, _ in SYNAPSE_CLASSES}
    by_abbr = {abbr.lower(): lid for lid, _, abbr in SYNAPSE_CLASSES}
    ids = []
    for item in organs:
        key = item.strip()
        if key.lower() in ORGAN_SETS and len(organs) == 1:
            ids = [by_name[name] for name in ORGAN_SETS[key.lower()]]
            break
        lid = by_name.get(key.lower(), by_abbr.get(key.lower()))
        if lid is None:
            hint = (f"'{key}' is a set name: give it alone" if key.lower() in ORGAN_SETS else
                    f"use label names ({', '.join(by_name)}), abbreviations "
                    f"({', '.join(abbr for _, _, abbr in SYNAPSE_CLASSES)}) or one set ({', '.join(ORGAN_SETS)})")
            raise SKCDFInputError(f"Unknown organ {item!r} in --organs: {hint}.")
        if lid in ids:
            raise SKCDFInputError(f"Organ {item!r} is named twice in --organs.")
        ids.append(lid)
    ids = sorted(ids)
    return () if len(ids) == len(SYNAPSE_CLASSES) else tuple(ids)


def organ_label_lut(organ_ids: Sequence[int]) -> np.ndarray:
    """uint8 look-up table from Synapse ids to the dataset's labels: the kept organs numbered 1..k in Synapse
    order, every other organ background (0)."""
    lut = np.zeros(256, dtype=np.uint8)
    for new, lid in enumerate(organ_ids, start=1):
        lut[lid] = new
    return lut


def organ_labels_dict(organ_ids: Sequence[int]) -> dict:
    """dataset.json ``labels`` of a phantom that labels ``organ_ids`` (``()``: all 13)."""
    if not organ_ids:
        return synapse_labels_dict()
    names = {lid: name for lid, name, _ in SYNAPSE_CLASSES}
    return {"background": 0, **{names[lid]: new for new, lid in enumerate(organ_ids, start=1)}}


_FOLDERS = {"tr": ("imagesTr", "labelsTr"), "ts": ("imagesTs", "labelsTs"), "un": (UNLABELED_IMAGES_FOLDER, None)}


def site_case(seed: int, role: str, index: int, sites: Sequence[str], base_shape: Sequence[int],
              base_spacing: Sequence[float]) -> Tuple[CaseProtocol, Shape3, Spacing3]:
    """A site case's protocol and voxel grid (deterministic in seed, role, index and the site list)."""
    protocol = draw_protocol(SITES[case_site(sites, index)], protocol_rng(seed, role, index))
    shape, spacing = case_grid(protocol, base_shape, base_spacing)
    return protocol, shape, spacing


def _write_case(job: Tuple[str, str, int, int, Shape3, Spacing3, Tuple[str, ...], Tuple[int, ...]]
                ) -> Tuple[str, Optional[dict]]:
    """Generate and write one case (top-level so that worker processes can run it); returns its id and,
    for a site case, its record for ``phantom_cases.json``. ``organs``: the labelled subset (``()``: all)."""
    folder, role, index, seed, shape, spacing, sites, organs = job
    protocol, record, z_centre = None, None, 0.0
    if sites:
        protocol, shape, spacing = site_case(seed, role, index, sites, shape, spacing)
        z_centre = protocol.centre_mm
        record = {"role": role, "shape_zyx_voxels": list(shape), "spacing_zyx_mm": list(spacing), **protocol.to_json()}
    image, label = generate_case(case_rng(seed, role, index), shape, spacing, protocol)
    if organs:  # the image is the same whatever is labelled
        label = organ_label_lut(organs)[label]
    images_dir, labels_dir = _FOLDERS[role]
    cid = case_id(role, index)
    _write_nifti(image, spacing, os.path.join(folder, images_dir, f"{cid}_0000.nii.gz"), z_centre)
    if labels_dir is not None:
        _write_nifti(label, spacing, os.path.join(folder, labels_dir, f"{cid}.nii.gz"), z_centre)
    return cid, record


def _dataset_json(name: str, counts: Tuple[int, int, int], shape: Shape3, spacing: Spacing3, seed: int,
                  sites: Sequence[str] = (), organs: Sequence[int] = ()) -> dict:
    n_tr, n_ts, n_un = counts
    dj = {
        "channel_names": {"0": "CT"},
        "labels": organ_labels_dict(organs),
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
    if organs:
        kept = list(organ_labels_dict(organs))[1:]
        dj["description"] = dj["description"].replace(
            "with the 13 Synapse/BTCV organ labels", f"with {len(kept)} of the 13 Synapse/BTCV organs labelled (the "
            "other organs are in the images but labelled background)")
        dj["phantom_generator"]["organs"] = kept
    if sites:
        dj["description"] = dj["description"].replace(
            "(portal-venous phase)", f"from {len(sites)} acquisition site(s) ({', '.join(sites)}: contrast phases, "
            "doses, kernels, slice thicknesses, coverage, pathology; per-case parameters in phantom_cases.json)")
        dj["phantom_generator"].update({
            "sites": list(sites),
            "sites_version": SITES_VERSION,
            "site_assignment": "case i of every role comes from sites[i % len(sites)]",
            "site_definitions": {n: asdict(SITES[n]) for n in dict.fromkeys(sites)},
            "base_grid": "shape/spacing above are the base grid; each case's grid is in phantom_cases.json",
            "orientation": "identity direction (LPS), FOV centre at (0, 0, centre_mm) mm",
        })
    return dj


def _case_counts_by_site(records: dict) -> dict:
    out: dict = {}
    for rec in records.values():
        out.setdefault(rec["site"], {}).setdefault(rec["role"], 0)
        out[rec["site"]][rec["role"]] += 1
    return out


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
    others = datasets_with_id(root, dataset_id, folder_name)
    if others:
        raise SKCDFInputError(
            f"Dataset id {dataset_id} is already used by {os.path.join(root, others[0])}. nnU-Net needs unique "
            f"ids: pick another id (-d) or remove that folder."
        )
    raw = os.environ.get("nnUNet_raw")
    if raw and os.path.abspath(raw) == os.path.abspath(root):  # a dataset nnU-Net will look up by its id
        check_dataset_ids_free(dataset_id, folder_name)
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
                         progress: bool = True, sites: Sequence[str] = (), organs: Sequence[str] = ()) -> str:
    """Write the phantom as ``<output_root>/Dataset<id>_<name>`` (nnU-Net v2 raw format); return that path.

    ``output_root`` defaults to ``$nnUNet_raw``. ``shape`` is in voxels (z, y, x), ``spacing`` in mm
    (z, y, x). The dataset is built in a hidden temporary sibling folder and renamed into place when
    complete, so an interrupted run leaves no half-written dataset; an existing dataset folder is
    only replaced with ``overwrite=True``. Case ``i`` of each role depends only on (seed, role, i).

    ``sites`` (names from ``phantom_sites.SITES``, or ``["all"]``): draw each case's acquisition and
    population from a site (case ``i`` from ``sites[i % len(sites)]``); every case then has its own grid
    (``shape``/``spacing`` become the base grid) and ``phantom_cases.json`` records its parameters.
    Without sites the cases are the original phantom's, bit-identical.

    ``organs`` (see ``resolve_organs``; default all 13): label only these organs, numbered 1..k in Synapse order;
    the other organs stay in the images and are labelled background. The images do not depend on it.
    """
    counts = (int(num_train), int(num_test), int(num_unlabeled))
    shape = tuple(int(s) for s in shape)
    spacing = tuple(float(s) for s in spacing)
    _check_options(dataset_id, name, counts, shape, spacing, int(seed), int(num_processes))
    sites = tuple(s.name for s in check_sites(sites)) if sites else ()
    organ_ids = resolve_organs(organs)
    root = os.path.abspath(output_root if output_root is not None else _env_folder("nnUNet_raw"))
    folder_name = f"Dataset{int(dataset_id):03d}_{name}"
    target = _check_target(root, folder_name, dataset_id, overwrite)
    os.makedirs(root, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".tmp_{folder_name}_", dir=root)
    try:
        for sub in ("imagesTr", "labelsTr", "imagesTs", "labelsTs", UNLABELED_IMAGES_FOLDER):
            os.makedirs(os.path.join(tmp, sub))
        jobs = [(tmp, role, i, int(seed), shape, spacing, sites, organ_ids)
                for role, n in zip(ROLES, counts) for i in range(n)]
        records = {}
        for cid, record in imap_with_progress(_write_case, jobs, int(num_processes), "phantom cases", progress):
            records[cid] = record
        if sites:
            records = dict(sorted(records.items()))
            atomic_save_json({"cases_per_site": _case_counts_by_site(records), "cases": records},
                             os.path.join(tmp, CASES_FILE))
        atomic_save_json(_dataset_json(name, counts, shape, spacing, int(seed), sites, organ_ids),
                         os.path.join(tmp, "dataset.json"))
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
    p.add_argument("--sites", nargs="+", metavar="SITE", default=None,
                   help="acquisition sites the cases come from, case i of each role from the (i mod n)-th: "
                        f"{', '.join(sorted(SITES))} or 'all' (see documentation/phantom.md). Each case then has its "
                        "own contrast phase, dose, kernel, slice thickness, FOV, coverage, habitus and pathology, and "
                        "--shape/--spacing are the base grid. Without --sites: the original single-protocol phantom")
    p.add_argument("--organs", nargs="+", metavar="ORGAN", default=None,
                   help="label only these organs (label names such as 'pancreas', the paper's abbreviations such as "
                        f"'Pa', or one set: {', '.join(ORGAN_SETS)}; 'synapse8' = the 8 organs of the common Synapse "
                        "evaluation protocol), numbered 1..k in Synapse order; the other organs stay in the images, "
                        "labelled background (default: all 13)")
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
            progress=not args.no_progress, sites=args.sites or (), organs=args.organs or (),
        )
    print(f"Wrote {folder}")


if __name__ == "__main__":
    make_phantom_entry()
