"""How far each SKCDF decoder's main head is from its balanced head, over a run's snapshots.

Every iteration SKCDF pulls each main segmentation head towards its balanced head by EMA
(``H <- m H + (1 - m) H_b``, m = 0.99), while SGD pulls the main head towards its own (unmasked) loss. With
nnU-Net's poly schedule the SGD pull fades to zero at the end of training and the EMA pull does not, so the main
heads can end up as copies of the balanced heads. This script measures it on the snapshots that
``benchmarks/convergence.py`` keeps: the relative distance ``|H - H_b| / |H|`` of the full-resolution 1x1x1 head
(weights, and bias separately), per decoder (D_l, the pseudo-label source; D_u, the one nnU-Net predicts with).

    python benchmarks/diagnostics/head_drift.py <model folder>/fold_0 [--out benchmarks/results/head_drift_<tag>.json]
"""
from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch


def head_drift(state: dict) -> dict:
    """{decoder: {'weight': rel. distance, 'bias': rel. distance}} of the last (full-resolution) head pair."""
    out = {}
    for decoder in ("decoder_l", "decoder_u"):
        stages = sorted({int(m.group(1)) for k in state
                         if (m := re.match(rf"{decoder}\.seg_layers\.(\d+)\.weight$", k))})
        if not stages:
            continue
        s = stages[-1]
        out[decoder] = {}
        for p in ("weight", "bias"):
            main, balanced = state[f"{decoder}.seg_layers.{s}.{p}"], state[f"{decoder}.balanced_seg_layers.{s}.{p}"]
            out[decoder][p] = float((main - balanced).norm() / main.norm())
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fold_folder")
    parser.add_argument("--out")
    args = parser.parse_args()
    folder = Path(args.fold_folder)
    snapshots = sorted(folder.glob("checkpoint_ep*.pth"))
    if not snapshots:
        raise SystemExit(f"{folder}: no checkpoint_ep*.pth snapshots (trained by benchmarks/convergence.py?)")
    rows = {}
    for path in snapshots:
        checkpoint = torch.load(path, map_location="cpu", weights_only=False)
        drift = head_drift(checkpoint["network_weights"])
        if not drift:
            raise SystemExit(f"{path}: no SKCDF decoder heads (decoder_l/decoder_u) in this checkpoint")
        epoch = int(re.search(r"ep(\d+)", path.name).group(1))
        rows[epoch] = {"learning_rate": checkpoint["optimizer_state"]["param_groups"][0]["lr"], **drift}
        print(f"epoch {epoch:3d} lr {rows[epoch]['learning_rate']:.5f}  " + "  ".join(
            f"{d}: |H-Hb|/|H| weight {v['weight']:.3f} bias {v['bias']:.3f}" for d, v in drift.items()), flush=True)
    if args.out:
        from nnunetv2_skcdf.utilities.io import atomic_save_json

        atomic_save_json({"folder": str(folder), "snapshots": rows}, args.out, indent=1)


if __name__ == "__main__":
    main()
