"""Acquisition sites and patient populations for the phantom: what makes real CT cases differ.

A **site** is a named bundle of distributions: how a centre acquires (contrast phase, dose, kernel, slice
thickness, display field of view, craniocaudal coverage, scanner calibration, oral contrast, artefacts)
and whom it scans (habitus, organ sizes, pathology, organs removed by surgery). ``draw_protocol`` draws one
case's :class:`CaseProtocol` from a site; ``case_grid`` turns it into the case's voxel grid. The painting
and rendering that use a protocol live in ``phantom_variation.py``; this module is data and draws only.

The parameter table with real-world ranges and sources is in ``documentation/phantom.md`` (the values
here are the ones it quotes; ``tests/test_phantom_sites.py`` checks that every site's parameters are
applied). Without ``--sites`` the phantom draws nothing from here and its cases stay bit-identical to
the original generator's.

Scale: anatomy is real-sized (mm), but the phantom's matrix is the dataset's ``--shape`` (96 x 96
in-plane by default instead of a scanner's 512 x 512). A site's display FOV (real mm) is therefore
sampled by that matrix (pixel = FOV / 96 at the default shape, 3.5-5.2 mm instead of 0.7-1.0 mm); its
slice thickness scales with the dataset's z spacing, whose default (5 mm) stands for a real 5 mm
reconstruction. The kernel is modelled at the phantom's voxel scale (edge sharpness and noise grain),
where a real kernel's sub-millimetre PSF would be invisible.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Dict, List, Sequence, Tuple

import numpy as np

#: version of what a site case is: bump it whenever a site case's pixels change (a test holds the golden hash),
#: so that benchmark runs stored for one version are never matched to data of another
SITES_VERSION = "1"
PHASES = ("non_contrast", "arterial", "portal_venous", "delayed")
#: real slice thickness that the dataset's z spacing stands for (the original phantom's 5 mm protocol)
REFERENCE_SLICE_MM = 5.0
#: the phantom's anatomy is defined within +-260 mm of the FOV centre (phantom_geometry's random fields)
_MAX_EXTENT_MM = 250.0

# --------------------------------------------------------------------------------------------------
# Per-phase HU of the per-case mean of every enhancing tissue: (lo, hi). Portal-venous values are the
# original phantom's (_TISSUES). Sources in documentation/phantom.md: Bae 2010 (enhancement timing),
# Yuh & Cohan 1999 (renal phases), Lu 1996 (pancreatic phase), Kodama 2007 (unenhanced liver/spleen).
# Arterial spleen, kidney cortex and portal vein were raised after the first comparison with a real
# arterial-phase CT (benchmarks/phantom_realism.py), staying inside the published ranges.
# --------------------------------------------------------------------------------------------------
PHASE_HU: Dict[str, Dict[str, Tuple[float, float]]] = {
    #                 non-contrast  arterial (~35 s)  portal-venous (~70 s)  delayed (3-5 min)
    "heart":          dict(non_contrast=(35, 50), arterial=(220, 320), portal_venous=(110, 150), delayed=(95, 125)),
    "bowel_wall":     dict(non_contrast=(30, 45), arterial=(70, 110), portal_venous=(40, 90), delayed=(45, 70)),
    "stomach_wall":   dict(non_contrast=(30, 45), arterial=(70, 110), portal_venous=(50, 90), delayed=(50, 75)),
    "liver":          dict(non_contrast=(50, 65), arterial=(65, 85), portal_venous=(90, 130), delayed=(75, 95)),
    "spleen":         dict(non_contrast=(40, 52), arterial=(120, 180), portal_venous=(100, 130), delayed=(75, 95)),
    "kidney_cortex":  dict(non_contrast=(28, 40), arterial=(170, 250), portal_venous=(150, 200), delayed=(120, 160)),
    "kidney_medulla": dict(non_contrast=(25, 35), arterial=(60, 100), portal_venous=(130, 170), delayed=(150, 220)),
    "esophagus":      dict(non_contrast=(30, 45), arterial=(50, 75), portal_venous=(35, 60), delayed=(45, 65)),
    "artery":         dict(non_contrast=(35, 50), arterial=(250, 400), portal_venous=(140, 200), delayed=(100, 130)),
    "vena_cava":      dict(non_contrast=(35, 50), arterial=(60, 110), portal_venous=(110, 160), delayed=(100, 130)),
    "portal_vein":    dict(non_contrast=(35, 50), arterial=(110, 170), portal_venous=(130, 180), delayed=(100, 130)),
    "hepatic_vein":   dict(non_contrast=(35, 50), arterial=(45, 75), portal_venous=(120, 170), delayed=(100, 125)),
    "pancreas":       dict(non_contrast=(35, 50), arterial=(110, 150), portal_venous=(70, 110), delayed=(65, 85)),
    "adrenal":        dict(non_contrast=(15, 35), arterial=(50, 80), portal_venous=(30, 60), delayed=(40, 60)),
    # tissues that exist only in site cases (phantom_variation.EXTRA_TISSUES)
    "lesion_hypo":    dict(non_contrast=(30, 45), arterial=(40, 60), portal_venous=(45, 70), delayed=(50, 70)),
    "lesion_hyper":   dict(non_contrast=(35, 50), arterial=(100, 140), portal_venous=(75, 100), delayed=(60, 75)),
}
#: texture amplitude multiplier per phase: the arterial spleen is heterogeneous ("moire"/arciform)
PHASE_TEXTURE: Dict[str, Dict[str, float]] = {"spleen": {"arterial": 5.0}, "kidney_cortex": {"arterial": 1.5}}

ORGANS_REMOVABLE = ("right_kidney", "left_kidney", "gallbladder", "spleen")


@dataclass(frozen=True)
class Acquisition:
    """How a site scans. Ranges are (lo, hi) of a uniform draw per case unless said otherwise."""

    phases: Tuple[Tuple[str, float], ...]  # (phase, probability)
    noise_hu: Tuple[float, float]  # quantum noise sd per voxel, HU (dose)
    kernel: Tuple[float, float]  # sharpness: < 0 smooth (blur, correlated noise), > 0 sharp (edge overshoot)
    slice_mm: Tuple[float, ...]  # slice thickness choices (= increment), real mm
    fov_mm: Tuple[float, float]  # display field of view, real mm (fitted to the patient's width within this range)
    coverage_mm: Tuple[float, float]  # craniocaudal scan length, mm
    centre_mm: Tuple[float, float]  # scan centre relative to the mid-abdomen, mm (+ superior)
    table_offset_mm: float  # sd of the patient's miscentring in the gantry (x and y), mm
    calibration_hu: float  # the site scanner's water offset, HU (fixed per site; + N(0, 2) per case)
    p_oral_contrast: float  # positive oral contrast in bowel and stomach
    p_streaks: float  # metal streak artefacts (clips, hardware, arms in the field)


@dataclass(frozen=True)
class Population:
    """Whom a site scans: habitus and pathology prevalence (per case)."""

    habitus_sd: float  # sd of the body-size factor (1 = the original phantom), clipped to [0.82, 1.25]
    organ_size_sd: float  # sd of extra size factors of liver and kidneys
    p_liver_lesions: float  # 1-6 focal liver lesions
    p_hyper_lesions: float  # of those, the fraction that enhance arterially (HCC-like), else hypovascular
    p_liver_cyst: float
    p_renal_cyst: float
    p_splenomegaly: float  # spleen scaled 1.35-1.8
    p_nephrectomy: float
    p_cholecystectomy: float
    p_splenectomy: float


@dataclass(frozen=True)
class Site:
    name: str
    description: str
    acquisition: Acquisition
    population: Population


_GENERAL = Population(habitus_sd=0.08, organ_size_sd=0.06, p_liver_lesions=0.08, p_hyper_lesions=0.2,
                      p_liver_cyst=0.15, p_renal_cyst=0.3, p_splenomegaly=0.03, p_nephrectomy=0.02,
                      p_cholecystectomy=0.1, p_splenectomy=0.01)

SITES: Dict[str, Site] = {s.name: s for s in (
    Site("A", "routine abdomen, portal-venous phase, standard dose and kernel, 5 mm slices (the original "
              "phantom's protocol), general population",
         Acquisition(phases=(("portal_venous", 1.0),), noise_hu=(10, 18), kernel=(-0.2, 0.2), slice_mm=(5.0,),
                     fov_mm=(340, 420), coverage_mm=(230, 260), centre_mm=(-10, 10), table_offset_mm=8.0,
                     calibration_hu=0.0, p_oral_contrast=0.3, p_streaks=0.05),
         _GENERAL),
    Site("B", "liver/pancreas protocol, late arterial (70 %) or portal-venous phase, thin 2.5 mm slices, "
              "sharper kernel, coverage from above the liver dome to the mid kidneys; hepatology population "
              "(arterially enhancing lesions, splenomegaly)",
         Acquisition(phases=(("arterial", 0.7), ("portal_venous", 0.3)), noise_hu=(12, 20), kernel=(0.2, 0.6),
                     slice_mm=(2.5,), fov_mm=(320, 380), coverage_mm=(180, 220), centre_mm=(25, 45),
                     table_offset_mm=8.0, calibration_hu=5.0, p_oral_contrast=0.0, p_streaks=0.05),
         Population(habitus_sd=0.08, organ_size_sd=0.1, p_liver_lesions=0.5, p_hyper_lesions=0.7, p_liver_cyst=0.15,
                    p_renal_cyst=0.3, p_splenomegaly=0.3, p_nephrectomy=0.01, p_cholecystectomy=0.15,
                    p_splenectomy=0.01)),
    Site("C", "non-contrast low-dose CT (stone protocol / PET-CT attenuation scan), smooth kernel, 5 mm slices, "
              "large FOV, coverage shifted inferiorly; older population",
         Acquisition(phases=(("non_contrast", 1.0),), noise_hu=(25, 40), kernel=(-0.9, -0.4), slice_mm=(5.0,),
                     fov_mm=(420, 500), coverage_mm=(250, 300), centre_mm=(-35, -10), table_offset_mm=15.0,
                     calibration_hu=-6.0, p_oral_contrast=0.2, p_streaks=0.15),
         Population(habitus_sd=0.1, organ_size_sd=0.06, p_liver_lesions=0.05, p_hyper_lesions=0.2,
                    p_liver_cyst=0.2, p_renal_cyst=0.45, p_splenomegaly=0.03, p_nephrectomy=0.03,
                    p_cholecystectomy=0.2, p_splenectomy=0.01)),
    Site("D", "oncology staging, delayed (60 %) or portal-venous phase, 3 mm slices, positive oral contrast "
              "common, ports and clips; oncology population (hypovascular metastases, nephrectomy)",
         Acquisition(phases=(("delayed", 0.6), ("portal_venous", 0.4)), noise_hu=(12, 22), kernel=(-0.3, 0.3),
                     slice_mm=(3.0,), fov_mm=(360, 460), coverage_mm=(260, 300), centre_mm=(10, 30),
                     table_offset_mm=10.0, calibration_hu=3.0, p_oral_contrast=0.7, p_streaks=0.2),
         Population(habitus_sd=0.1, organ_size_sd=0.08, p_liver_lesions=0.4, p_hyper_lesions=0.1, p_liver_cyst=0.15,
                    p_renal_cyst=0.3, p_splenomegaly=0.08, p_nephrectomy=0.08, p_cholecystectomy=0.15,
                    p_splenectomy=0.03)),
)}


@dataclass(frozen=True)
class CaseProtocol:
    """Everything drawn for one case from its site, before any anatomy (JSON-able; ``phantom_cases.json``).

    Lengths in real mm; ``seed`` drives the draws that depend on the anatomy (lesion positions, streaks).
    """

    site: str
    phase: str
    timing: float  # position within the phase window, 0..1 (shifts all enhancing tissues together)
    noise_hu: float
    kernel: float
    slice_mm: float
    fov_mm: float
    coverage_mm: float
    centre_mm: float
    table_offset_mm: Tuple[float, float]  # (x, y)
    calibration_hu: float
    oral_contrast: bool
    streaks: bool
    habitus: float
    organ_scale: Tuple[Tuple[str, float], ...]  # (organ, factor), factors on top of the anatomy's own draws
    liver_lesions: int
    lesion_kind: str  # "hypo" or "hyper" ("" without lesions)
    liver_cysts: int
    renal_cysts: Tuple[int, int]  # (right, left)
    absent: Tuple[str, ...]  # organs removed by surgery (their label is absent)
    seed: int

    def to_json(self) -> dict:
        return asdict(self)


def check_sites(names: Sequence[str]) -> List[Site]:
    """The sites named (``'all'`` = every built-in site); a clear error for an unknown name."""
    from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

    names = list(names)
    if names == ["all"]:
        return list(SITES.values())
    unknown = [n for n in names if n not in SITES]
    if unknown or not names:
        raise SKCDFInputError(f"Unknown site(s) {unknown} (option --sites): choose from {sorted(SITES)} or 'all'.")
    return [SITES[n] for n in names]


def _choice(rng: np.random.Generator, weighted: Sequence[Tuple[str, float]]) -> str:
    names, p = zip(*weighted)
    p = np.asarray(p, float)
    return str(names[int(rng.choice(len(names), p=p / p.sum()))])


def draw_protocol(site: Site, rng: np.random.Generator) -> CaseProtocol:
    """One case's acquisition and population draws from ``site`` (independent of the anatomy's generator)."""
    acq, pop = site.acquisition, site.population
    habitus = float(np.clip(rng.normal(1.0, pop.habitus_sd), 0.82, 1.25))
    # the display FOV is fitted to the patient (width ~304 mm at habitus 1) with a margin, within the site's range
    fov = float(np.clip(304.0 * habitus * rng.uniform(1.12, 1.3), *acq.fov_mm))
    scale = {"liver": float(np.clip(rng.normal(1.0, pop.organ_size_sd), 0.8, 1.25))}
    for kidney in ("right_kidney", "left_kidney"):
        scale[kidney] = float(np.clip(rng.normal(1.0, pop.organ_size_sd), 0.8, 1.2))
    if rng.uniform() < pop.p_splenomegaly:
        scale["spleen"] = float(rng.uniform(1.35, 1.8))
    absent = []
    if rng.uniform() < pop.p_nephrectomy:
        side = ("right_kidney", "left_kidney")[int(rng.integers(2))]
        absent.append(side)
        other = "left_kidney" if side == "right_kidney" else "right_kidney"
        scale[other] *= 1.15  # compensatory hypertrophy of the remaining kidney
    if rng.uniform() < pop.p_cholecystectomy:
        absent.append("gallbladder")
    if rng.uniform() < pop.p_splenectomy:
        absent.append("spleen")
        scale.pop("spleen", None)
    lesions = int(rng.integers(1, 7)) if rng.uniform() < pop.p_liver_lesions else 0
    kind = ("hyper" if rng.uniform() < pop.p_hyper_lesions else "hypo") if lesions else ""
    cysts = int(rng.integers(1, 4)) if rng.uniform() < pop.p_liver_cyst else 0
    renal = tuple(int(rng.integers(1, 3)) if rng.uniform() < pop.p_renal_cyst / 2 else 0 for _ in range(2))
    streaks = bool(rng.uniform() < acq.p_streaks) or "gallbladder" in absent  # cholecystectomy clips
    return CaseProtocol(
        site=site.name, phase=_choice(rng, acq.phases), timing=float(rng.uniform()),
        noise_hu=float(rng.uniform(*acq.noise_hu)), kernel=float(rng.uniform(*acq.kernel)),
        slice_mm=float(acq.slice_mm[int(rng.integers(len(acq.slice_mm)))]), fov_mm=fov,
        coverage_mm=float(rng.uniform(*acq.coverage_mm)), centre_mm=float(rng.uniform(*acq.centre_mm)),
        table_offset_mm=(float(rng.normal(0, acq.table_offset_mm)), float(rng.normal(0, acq.table_offset_mm))),
        calibration_hu=float(acq.calibration_hu + rng.normal(0, 2.0)),
        oral_contrast=bool(rng.uniform() < acq.p_oral_contrast), streaks=streaks, habitus=habitus,
        organ_scale=tuple(sorted(scale.items())), liver_lesions=lesions, lesion_kind=kind, liver_cysts=cysts,
        renal_cysts=renal, absent=tuple(absent), seed=int(rng.integers(2 ** 31)),
    )


def case_grid(protocol: CaseProtocol, base_shape: Sequence[int],
              base_spacing: Sequence[float]) -> Tuple[Tuple[int, int, int], Tuple[float, float, float]]:
    """The case's (shape, spacing), both (z, y, x), from the dataset's base grid and the protocol.

    In-plane: the base matrix (``base_shape[1:]``) over the protocol's FOV (real mm). Along z: the slice
    thickness scaled like the base grid (base z spacing = a real 5 mm reconstruction), over the coverage.
    """
    dz = protocol.slice_mm * float(base_spacing[0]) / REFERENCE_SLICE_MM
    dxy = protocol.fov_mm / float(max(base_shape[1], base_shape[2]))
    nz = max(8, int(round(protocol.coverage_mm / dz)))
    return (nz, int(base_shape[1]), int(base_shape[2])), (dz, dxy, dxy)


def check_site_table() -> None:
    """Every built-in site stays inside the anatomy's box and names known phases (a test calls it)."""
    for site in SITES.values():
        a = site.acquisition
        assert abs(sum(p for _, p in a.phases) - 1.0) < 1e-9, site.name
        assert all(p in PHASES for p, _ in a.phases), site.name
        assert a.coverage_mm[1] / 2 + max(abs(c) for c in a.centre_mm) <= _MAX_EXTENT_MM, site.name
        assert a.fov_mm[1] / 2 <= _MAX_EXTENT_MM, site.name


def _fmt_range(r) -> str:
    return f"{r[0]:g} to {r[1]:g}" if len(r) == 2 and r[0] != r[1] else "/".join(f"{v:g}" for v in r)


def site_table_markdown() -> str:
    """The per-site parameter table of documentation/phantom.md (a test checks the page holds exactly it)."""
    rows = [
        ("contrast phase (probability)", lambda s: ", ".join(f"{p.replace('_', '-')} {w:.0%}"
                                                             for p, w in s.acquisition.phases)),
        ("noise sd, HU", lambda s: _fmt_range(s.acquisition.noise_hu)),
        ("kernel sharpness (< 0 smooth)", lambda s: _fmt_range(s.acquisition.kernel)),
        ("slice thickness, mm", lambda s: _fmt_range(s.acquisition.slice_mm)),
        ("display FOV, mm", lambda s: _fmt_range(s.acquisition.fov_mm)),
        ("craniocaudal coverage, mm", lambda s: _fmt_range(s.acquisition.coverage_mm)),
        ("coverage centre, mm (+ superior)", lambda s: _fmt_range(s.acquisition.centre_mm)),
        ("miscentring sd, mm", lambda s: f"{s.acquisition.table_offset_mm:g}"),
        ("calibration offset, HU (+ N(0, 2))", lambda s: f"{s.acquisition.calibration_hu:+g}"),
        ("positive oral contrast", lambda s: f"{s.acquisition.p_oral_contrast:.0%}"),
        ("metal streaks (+ every cholecystectomy)", lambda s: f"{s.acquisition.p_streaks:.0%}"),
        ("habitus sd", lambda s: f"{s.population.habitus_sd:g}"),
        ("liver / kidney size sd", lambda s: f"{s.population.organ_size_sd:g}"),
        ("liver lesions (arterially enhancing share)", lambda s: f"{s.population.p_liver_lesions:.0%} "
                                                                 f"({s.population.p_hyper_lesions:.0%})"),
        ("liver cysts", lambda s: f"{s.population.p_liver_cyst:.0%}"),
        ("renal cysts", lambda s: f"{s.population.p_renal_cyst:.0%}"),
        ("splenomegaly", lambda s: f"{s.population.p_splenomegaly:.0%}"),
        ("nephrectomy / cholecystectomy / splenectomy", lambda s: f"{s.population.p_nephrectomy:.0%} / "
                                                                  f"{s.population.p_cholecystectomy:.0%} / "
                                                                  f"{s.population.p_splenectomy:.0%}"),
    ]
    sites = list(SITES.values())
    lines = ["| parameter | " + " | ".join(f"site {s.name}" for s in sites) + " |",
             "|---|" + "---|" * len(sites)]
    lines += [f"| {name} | " + " | ".join(get(s) for s in sites) + " |" for name, get in rows]
    return "\n".join(lines)


def phase_table_markdown() -> str:
    """Per-phase HU table of documentation/phantom.md: range of the per-case mean of each enhancing tissue."""
    lines = ["| tissue | " + " | ".join(p.replace("_", "-") for p in PHASES) + " |", "|---|" + "---|" * len(PHASES)]
    lines += [f"| {name.replace('_', ' ')} | " + " | ".join(_fmt_range(per_phase[p]) for p in PHASES) + " |"
              for name, per_phase in PHASE_HU.items()]
    return "\n".join(lines)
