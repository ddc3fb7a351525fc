"""What a site protocol changes in a phantom case: habitus, pathology, surgery, contrast phase, kernel, dose,
calibration and streak artefacts (``phantom_sites.CaseProtocol`` -> pixels).

Only cases generated with ``--sites`` come here; ``phantom.generate_case`` calls these hooks in this order:
``apply_habitus`` (after the body draw), ``remove_absent`` (after the solid organs), ``paint_pathology``
(after all organs) and ``render`` (instead of the original renderer). Every random draw here comes from the
protocol's own generator (``np.random.default_rng(protocol.seed)``), never from the anatomy's.

Labels follow Synapse/BTCV: a lesion or cyst inside an organ keeps the organ's label (the organ's outline
is what is segmented); an organ removed by surgery has no label at all.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, List, Tuple

import numpy as np
from scipy.ndimage import gaussian_filter

from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES
from nnunetv2_skcdf.dataset_conversion.phantom_geometry import _TISSUES, T, _Body, _Canvas, _ellipsoid, _Frame, _inside
from nnunetv2_skcdf.dataset_conversion.phantom_sites import PHASE_HU, PHASE_TEXTURE, CaseProtocol

_ID = {name: label_id for label_id, name, _ in SYNAPSE_CLASSES}

#: tissues only site cases have: (name, HU range of the per-case mean, texture amplitude in HU).
#: Lesion HU depend on the phase (phantom_sites.PHASE_HU); the range here is the portal-venous one.
EXTRA_TISSUES: Tuple[Tuple[str, float, float, float], ...] = (
    ("lesion_hypo", 45, 70, 6),  # hypovascular metastasis
    ("lesion_hyper", 75, 100, 8),  # arterially enhancing lesion with washout (HCC-like)
    ("cyst", 0, 20, 2),  # simple hepatic / renal cyst: water, no enhancement
    ("oral_contrast", 150, 350, 15),  # positive oral contrast in bowel and stomach content
    ("metal", 2500, 3000, 0),  # surgical clips, spinal hardware (clipped at 3071 HU)
)
TX: Dict[str, int] = {**T, **{name: len(_TISSUES) + i for i, (name, *_r) in enumerate(EXTRA_TISSUES)}}


def apply_habitus(body: _Body, protocol: CaseProtocol) -> _Body:
    """Body size scaled by the habitus factor (subcutaneous fat grows faster than the frame), shifted by the
    patient's miscentring in the gantry."""
    h = protocol.habitus
    dx, dy = protocol.table_offset_mm
    return replace(body, a=body.a * h, b=body.b * h, fat=body.fat * h ** 3, cx=body.cx + dx, cy=body.cy + dy)


def apply_organ_scale(fr: _Frame, protocol: CaseProtocol) -> None:
    fr.organ_scale = dict(protocol.organ_scale)


def remove_absent(cv: _Canvas, protocol: CaseProtocol) -> None:
    """Organs removed by surgery: their voxels become fat (the surgical bed), their label disappears."""
    for organ in protocol.absent:
        gone = cv.label == _ID[organ]
        cv.tissue[gone] = T["fat"]
        cv.label[gone] = 0


def _random_point_in(cv: _Canvas, rng: np.random.Generator, label: int) -> np.ndarray | None:
    """(x, y, z) mm of a random voxel of ``label`` (deformed-anatomy coordinates), None if it has no voxel."""
    idx = np.flatnonzero(cv.label == label)
    if idx.size == 0:
        return None
    z, y, x = np.unravel_index(int(idx[rng.integers(idx.size)]), cv.shape)
    return np.array([cv.X[z, y, x], cv.Y[z, y, x], cv.Z[z, y, x]], float)


def _blob(cv: _Canvas, rng: np.random.Generator, label: int, tissue: str, radius_mm: Tuple[float, float]) -> None:
    """A roundish lesion (wobbly ellipsoid) centred in ``label``'s voxels, painted over that label only."""
    centre = _random_point_in(cv, rng, label)
    if centre is None:
        return
    r = rng.uniform(*radius_mm) * rng.uniform(0.8, 1.2, 3)
    res = _inside(cv, _ellipsoid(cv, centre, r, tuple(rng.uniform(-40, 40, 3))), rng, centre - r, centre + r, 0.1)
    if res is not None:
        cv.paint(res[0], res[1], TX[tissue], only_labels=[label])


def paint_pathology(cv: _Canvas, fr: _Frame, rng: np.random.Generator,
                    protocol: CaseProtocol) -> List[np.ndarray]:
    """Liver lesions and cysts, renal cysts (inside their organ's label) and metal (clips, hardware);
    returns the metal objects' (x, y, z) mm centres, the sources of ``render``'s streaks."""
    for _ in range(protocol.liver_lesions):
        kind = protocol.lesion_kind
        _blob(cv, rng, _ID["liver"], f"lesion_{kind}", (5.0, 20.0) if kind == "hypo" else (8.0, 28.0))
    for _ in range(protocol.liver_cysts):
        _blob(cv, rng, _ID["liver"], "cyst", (4.0, 15.0))
    for organ, n in zip(("right_kidney", "left_kidney"), protocol.renal_cysts):
        for _ in range(n):
            _blob(cv, rng, _ID[organ], "cyst", (5.0, 18.0))
    return _metal(cv, fr, rng, protocol) if protocol.streaks else []


def _metal(cv: _Canvas, fr: _Frame, rng: np.random.Generator, protocol: CaseProtocol) -> List[np.ndarray]:
    """Small metal objects: cholecystectomy clips in the gallbladder fossa, else pedicle screws beside the
    spine. Returns their (x, y, z) mm centres (the streak sources)."""
    if "gallbladder" in protocol.absent:
        base = fr.p(-38, -35, 5)
        points = [base + rng.normal(0, 6, 3) for _ in range(int(rng.integers(2, 5)))]
        radius = 2.5
    else:
        z = fr.p(0, 0, rng.uniform(-100, 60))[2]
        points = [fr.p(side * 14, 55, 0) * np.array([1, 1, 0]) + np.array([0, 0, z + dz])
                  for side in (-1, 1) for dz in (0.0, 35.0)]
        radius = 4.0
    for p in points:
        res = _ellipsoid(cv, p, (radius, radius, radius))
        if res is not None:
            cv.paint(res[0], res[1] <= 1.0, TX["metal"])
    return points


def _tissue_means(rng: np.random.Generator, protocol: CaseProtocol) -> np.ndarray:
    """Per-case mean HU per tissue for the protocol's phase: all enhancing tissues shift together with the
    timing within the phase window, each also varies on its own (as the original renderer does)."""
    means = []
    for name, lo, hi, *_rest in (*_TISSUES, *EXTRA_TISSUES):
        v = rng.uniform()
        if name in PHASE_HU:
            lo, hi = PHASE_HU[name][protocol.phase]
            v = np.clip(0.6 * protocol.timing + 0.4 * v, 0, 1)
        means.append(lo + (hi - lo) * v)
    means = np.asarray(means, np.float32)
    if protocol.oral_contrast:
        for fluid in ("bowel_fluid", "stomach_fluid"):
            means[TX[fluid]] = means[TX["oral_contrast"]] * rng.uniform(0.8, 1.1)
    return means


def _texture_amplitudes(protocol: CaseProtocol) -> np.ndarray:
    tex = [t[3] for t in _TISSUES] + [t[3] for t in EXTRA_TISSUES]
    for name, per_phase in PHASE_TEXTURE.items():
        tex[TX[name]] *= per_phase.get(protocol.phase, 1.0)
    return np.asarray(tex, np.float32)


def _streaks(cv: _Canvas, rng: np.random.Generator, points: List[np.ndarray]) -> np.ndarray:
    """Bright and dark lines radiating in-plane from each metal object over the slices it is in (HU)."""
    out = np.zeros(cv.shape, np.float32)
    z_ax, y_ax, x_ax = cv.axes
    yy, xx = np.meshgrid(y_ax, x_ax, indexing="ij")
    width = max(2.0, 0.5 * min(cv.spacing[1:]))
    for p in points:
        near = np.abs(z_ax - p[2]) <= 10.0
        if not near.any():
            continue
        plane = np.zeros(yy.shape, np.float32)
        dx, dy = xx - p[0], yy - p[1]
        dist = np.hypot(dx, dy)
        for theta in rng.uniform(0, np.pi, int(rng.integers(4, 9))):
            across = np.abs(dx * np.sin(theta) - dy * np.cos(theta))
            plane += rng.choice([-1.0, 1.0]) * rng.uniform(60, 250) * np.exp(-(across / width) ** 2)
        plane /= 1.0 + dist / 80.0
        out[near] += plane
    return out


def render(cv: _Canvas, rng: np.random.Generator, protocol: CaseProtocol,
           metal_points: List[np.ndarray]) -> np.ndarray:
    """Tissue map -> int16 HU for a site case: phase-dependent means + texture, partial volume (as the
    original renderer), metal streaks, the kernel (blur or edge overshoot in-plane), noise of the protocol's
    sd (correlated for smooth kernels) and the scanner's calibration offset."""
    img = _tissue_means(rng, protocol)[cv.tissue] + _texture_amplitudes(protocol)[cv.tissue] * cv.texture
    spacing = np.asarray(cv.spacing)
    fwhm = np.array([spacing[0], 1.2, 1.2])
    sigma_mm = np.sqrt(np.square(spacing) / 12.0 + (fwhm / 2.355) ** 2)
    img = gaussian_filter(img, sigma=sigma_mm / spacing, truncate=3.0)
    if metal_points:
        img += _streaks(cv, rng, metal_points)
    k = protocol.kernel
    if k < 0:  # smooth kernel: extra in-plane blur
        img = gaussian_filter(img, sigma=(0, 0.7 * -k, 0.7 * -k), truncate=3.0)
    elif k > 0:  # sharp kernel: edge overshoot (unsharp masking)
        img = img + k * (img - gaussian_filter(img, sigma=(0, 1.0, 1.0), truncate=3.0))
    noise = rng.standard_normal(cv.shape, dtype=np.float32)
    if k < 0:  # smooth kernels correlate the noise in-plane
        noise = gaussian_filter(noise, sigma=(0, 0.8 * -k, 0.8 * -k), truncate=3.0)
    noise *= np.float32(protocol.noise_hu / max(float(noise.std()), 1e-6))
    img = img + noise + np.float32(protocol.calibration_hu)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16)
