"""How much of a labelled patch's organ voxels the appearance transfer sends to the air value: patch-to-patch matching
(the first version of ``appearance_transfer``) against whole-case tables (``case_quantiles``, the version trained).

CT normalisation clips air to one value, each image's minimum. Random patches differ in how much air they hold,
and quantile matching of two patches then maps the labelled patch's tissue onto the other patch's air wherever the
other holds more of it. This script takes one labelled and one unlabelled case of a preprocessed dataset, draws
``--pairs`` labelled patches centred on a random foreground voxel (as nnU-Net's foreground oversampling does) and
unlabelled patches at random, and maps each labelled patch both ways: the first version's rule (256 quantiles of
all voxels of each patch, ``match_quantiles`` on those tables: the same map) and the whole-case rule. It reports,
per rule, the share of the labelled patch's organ voxels that land within 0.5 of the unlabelled case's minimum.

    python benchmarks/diagnostics/appearance_transfer_air.py --preprocessed <nnUNet_preprocessed/DatasetX/...> \\
        --labelled phantom_tr_0016 --unlabelled phantom_tr_0002 --patch 40 24 48 --out <json>
"""
from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from convergence_common import commit  # noqa: E402


def patch_table(x: torch.Tensor, levels: int = 256) -> torch.Tensor:
    """The first version's table of a patch: quantiles at ``levels`` points of all its voxels (the air included)."""
    t = torch.linspace(0, 1, levels)
    return torch.stack([torch.quantile(x[c].reshape(-1).float(), t) for c in range(x.shape[0])])


def air_shares(image_l: np.ndarray, seg_l: np.ndarray, image_u: np.ndarray, patch, pairs: int, seed: int = 0) -> dict:
    from nnunetv2_skcdf.training import skcdf_components as C

    rng = np.random.default_rng(seed)
    case_l, case_u = C.case_quantiles(image_l), C.case_quantiles(image_u)
    air_u = float(image_u.min())
    foreground = np.argwhere(seg_l[0] > 0)
    out = {"patch": [], "case": []}
    for _ in range(pairs):
        centre = foreground[rng.integers(len(foreground))]
        start = [int(np.clip(c - p // 2, 0, s - p)) for c, p, s in zip(centre, patch, image_l.shape[1:])]
        box = tuple(slice(a, a + p) for a, p in zip(start, patch))
        start_u = [int(rng.integers(0, s - p + 1)) for s, p in zip(image_u.shape[1:], patch)]
        box_u = tuple(slice(a, a + p) for a, p in zip(start_u, patch))
        x_l = torch.from_numpy(np.ascontiguousarray(image_l[(slice(None),) + box])).float()
        x_u = torch.from_numpy(np.ascontiguousarray(image_u[(slice(None),) + box_u])).float()
        organ = seg_l[0][box] > 0
        for rule, mapped in (("patch", C.match_quantiles(x_l, patch_table(x_l), patch_table(x_u))),
                             ("case", C.match_quantiles(x_l, case_l, case_u))):
            out[rule].append(float((mapped[0].numpy()[organ] <= air_u + 0.5).mean()))
    return {rule: {"median": float(np.median(v)), "mean": float(np.mean(v)), "max": float(np.max(v)),
                   "pairs_over_10pct": int(np.sum(np.array(v) > 0.1)), "per_pair": v} for rule, v in out.items()}


def main() -> None:
    import blosc2

    from nnunetv2_skcdf.utilities.io import atomic_save_json

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preprocessed", required=True, help="folder of the .b2nd cases (nnUNetPlans_3d_fullres)")
    parser.add_argument("--labelled", required=True)
    parser.add_argument("--unlabelled", required=True)
    parser.add_argument("--patch", type=int, nargs=3, default=[40, 24, 48])
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = Path(args.preprocessed)

    def load(name: str) -> np.ndarray:
        return blosc2.open(str(folder / f"{name}.b2nd"), mode="r")[:]

    image_l, seg_l, image_u = load(args.labelled), load(f"{args.labelled}_seg"), load(args.unlabelled)
    result = air_shares(image_l, seg_l, image_u, tuple(args.patch), args.pairs)
    for rule, r in result.items():
        print(f"{rule:5s} rule: organ voxels sent to the air value, median {100 * r['median']:.1f} %, mean "
              f"{100 * r['mean']:.1f} %, max {100 * r['max']:.1f} %; pairs over 10 %: {r['pairs_over_10pct']} of "
              f"{args.pairs}")
    atomic_save_json({"date": datetime.date.today().isoformat(), "commit": commit(), "command": " ".join(sys.argv),
                      "labelled": args.labelled, "unlabelled": args.unlabelled, "patch": args.patch,
                      "pairs": args.pairs, **result}, args.out)


if __name__ == "__main__":
    main()
