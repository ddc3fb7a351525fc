"""Mosaic of the phantom's sites: one axial slice through the kidneys and one coronal slice per site and
contrast phase, with the label outlines, plus the original phantom for comparison.

    python benchmarks/phantom_mosaic.py [--out documentation/assets/phantom_sites_mosaic.png]

Cases are generated in memory (no dataset written): case ``i`` of role ``tr`` with seed 0, the first case
of each (site, phase) found among the first 40 indices, as ``skcdf_make_phantom --sites all`` would write it.
"""
from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from nnunetv2_skcdf.dataset_conversion.phantom import DEFAULT_SHAPE, DEFAULT_SPACING, case_rng, generate_case, site_case
from nnunetv2_skcdf.dataset_conversion.phantom_sites import SITES

REPO = Path(__file__).resolve().parents[1]
WINDOW = (-160, 240)  # abdominal soft-tissue window, HU


def pick_cases(n_indices: int = 40):
    """[(title, protocol or None, index)]: the original phantom, then the first case per (site, phase)."""
    sites = sorted(SITES)
    picked, seen = [("original phantom (no --sites)", None, 0)], set()
    for i in range(n_indices):
        prot, _, _ = site_case(0, "tr", i, sites, DEFAULT_SHAPE, DEFAULT_SPACING)
        if (prot.site, prot.phase) not in seen:
            seen.add((prot.site, prot.phase))
            picked.append((f"site {prot.site}, {prot.phase.replace('_', '-')}", prot, i))
    return picked


def main() -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=str(REPO / "documentation" / "assets" / "phantom_sites_mosaic.png"))
    args = ap.parse_args()
    cases = pick_cases()
    fig, axes = plt.subplots(2, len(cases), figsize=(2.6 * len(cases), 5.6))
    sites = sorted(SITES)
    for col, (title, prot, i) in enumerate(cases):
        if prot is None:
            shape, spacing = DEFAULT_SHAPE, DEFAULT_SPACING
        else:
            prot, shape, spacing = site_case(0, "tr", i, sites, DEFAULT_SHAPE, DEFAULT_SPACING)
        img, lab = generate_case(case_rng(0, "tr", i), shape, spacing, prot)
        kidneys = np.nonzero(np.isin(lab, (2, 3)).any((1, 2)))[0]
        z = int(np.median(kidneys)) if kidneys.size else shape[0] // 2
        y = int(np.median(np.nonzero((lab == 6).any((0, 2)))[0])) if (lab == 6).any() else shape[1] // 2
        for row, (im, lb, aspect) in enumerate(((img[z], lab[z], spacing[1] / spacing[2]),
                                               (img[:, y][::-1], lab[:, y][::-1], spacing[0] / spacing[2]))):
            ax = axes[row, col]
            ax.imshow(im, cmap="gray", vmin=WINDOW[0], vmax=WINDOW[1], aspect=aspect, interpolation="nearest")
            ax.contour(lb, levels=np.arange(0.5, 14), linewidths=0.4, cmap="tab20", alpha=0.8)
            ax.set_xticks([]), ax.set_yticks([])
        extra = "" if prot is None else (
            f"\n{prot.slice_mm:g} mm, FOV {prot.fov_mm:.0f}, noise {prot.noise_hu:.0f} HU"
            + (f"\n{prot.liver_lesions} {prot.lesion_kind} lesion(s)" if prot.liver_lesions else "")
            + (f"\nno {', '.join(prot.absent)}" if prot.absent else "")
            + ("\noral contrast" if prot.oral_contrast else "") + ("\nmetal" if prot.streaks else ""))
        axes[0, col].set_title(title + extra, fontsize=7)
    axes[0, 0].set_ylabel("axial (kidneys)", fontsize=8)
    axes[1, 0].set_ylabel("coronal (liver)", fontsize=8)
    fig.suptitle(f"skcdf_make_phantom --sites all: one case per site and phase (seed 0, window {WINDOW} HU)",
                 fontsize=9)
    fig.tight_layout()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out} ({len(cases)} cases)")


if __name__ == "__main__":
    main()
