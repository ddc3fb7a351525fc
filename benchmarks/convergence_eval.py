"""Learning-curve points of one trained run of ``benchmarks/convergence.py`` (benchmark side only).

For every snapshot ``checkpoint_ep<E>.pth`` (and ``checkpoint_final.pth``) of a model folder's fold:
- the test cases (imagesTs/labelsTs), preprocessed once with the model's plans by nnU-Net's own preprocessor,
  predicted with nnU-Net's sliding window (no mirroring) -> Dice per class on the preprocessed grid. The
  curves use this grid (no resampling back to the original images: the cost of 8 curve points per run);
  the final table of the benchmark is computed with the stock ``nnUNetv2_predict`` + ``skcdf_evaluate``;
- for SKCDF models (``--hidden``): the hidden-label training cases predicted by ``D_l`` (the decoder whose
  outputs become the pseudo labels), Dice per class against their hidden labels, and the class fractions of
  those predictions against the true ones. In training the pseudo labels come from ``D_l`` in cross mode on
  augmented patches next to a labelled batch; here ``D_l`` runs in self mode on whole cases (sliding window),
  a reproducible proxy for the pseudo labels' quality, read from the hidden labels the trainer never sees;
- on the multi-site phantom (``phantom_cases.json`` beside dataset.json) both also per site.
Results are cached per snapshot in ``--out`` (JSON, written atomically), so a rerun only adds new points.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from convergence_common import cached_point, checkpoint_identity  # noqa: E402
from trainers.convergence_trainers import snapshot_name  # noqa: E402


class LabelledDecoderView(nn.Module):
    """An SKCDF network's inference path through ``D_l`` instead of ``D_u``: encoder -> SKC(self) -> D_l -> H_l."""

    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = self.net.encoder(x)
        main, _ = self.net.decoder_l(self.net._with_bottleneck(skips, self.net.skc(skips[-1], mode="self")))
        return main


def cpu_predictor():
    """nnU-Net's predictor as every curve point and ``teacher_student.py`` use it: sliding window with Gaussian
    weighting, step 0.5, no mirroring, CPU (weights loaded by the caller)."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    return nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                           perform_everything_on_device=False, device=torch.device("cpu"), allow_tqdm=False)


def test_case_ids(raw: Path, ending: str) -> List[str]:
    """The raw dataset's test cases: those with a label in labelsTs."""
    return sorted(p.name[: -len(ending)] for p in (raw / "labelsTs").glob(f"*{ending}"))


def raw_cases(raw: Path, images: str, labels_dir: str, ids: List[str], ending: str) -> List[Tuple[str, List[str], str]]:
    """(case, [image], label) of single-channel raw cases, as ``preprocessed`` takes them."""
    return [(c, [str(raw / images / f"{c}_0000{ending}")], str(raw / labels_dir / f"{c}{ending}")) for c in ids]


def preprocessed(cases: List[Tuple[str, List[str], str]], predictor, cache: Path) -> Dict[str, tuple]:
    """{case: (data (C, *S) float32, seg (*S) int16)} with nnU-Net's preprocessor (cached as .npz)."""
    pre = predictor.configuration_manager.preprocessor_class(verbose=False)
    out = {}
    cache.mkdir(parents=True, exist_ok=True)
    for case, images, label in cases:
        path = cache / f"{case}.npz"
        if not path.exists():
            data, seg, _ = pre.run_case(images, label, predictor.plans_manager, predictor.configuration_manager,
                                        predictor.dataset_json)
            tmp = cache / f".{case}.{os.getpid()}.npz"
            np.savez_compressed(tmp, data=data.astype(np.float32), seg=np.maximum(seg[0], 0).astype(np.int16))
            os.replace(tmp, path)
        with np.load(path) as z:
            out[case] = (z["data"], z["seg"])
    return out


def predict(predictor, data: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data))
    return logits.argmax(0).cpu().numpy().astype(np.int16)


def dice_per_class(pred: np.ndarray, ref: np.ndarray, classes: List[int]) -> Dict[str, float]:
    """Dice per class (NaN where the class is absent from both)."""
    out = {}
    for c in classes:
        p, r = pred == c, ref == c
        denominator = int(p.sum()) + int(r.sum())
        out[str(c)] = float("nan") if denominator == 0 else 2.0 * int((p & r).sum()) / denominator
    return out


def mean_over_cases(per_case: Dict[str, Dict[str, float]]) -> Dict[str, float]:
    classes = next(iter(per_case.values())).keys()
    return {c: float(np.nanmean([d[c] for d in per_case.values()])) for c in classes}


def fractions(segs: List[np.ndarray], num_classes: int) -> List[float]:
    counts = sum(np.bincount(s.ravel(), minlength=num_classes) for s in segs)
    return (counts / counts.sum()).tolist()


def per_site(per_case: Dict[str, Dict[str, float]], sites: Dict[str, str]) -> Dict[str, Dict[str, float]]:
    """{site: per-class mean over that site's cases} (cases without a site are left out)."""
    out = {}
    for site in sorted(set(sites[c] for c in per_case if c in sites)):
        out[site] = mean_over_cases({c: d for c, d in per_case.items() if sites.get(c) == site})
    return out


def case_sites(raw: Path) -> Dict[str, str]:
    """{case: site} from a multi-site phantom's ``phantom_cases.json``; {} without one (the original phantom)
    (the same reading as ``convergence.case_sites``, without importing the benchmark driver here)."""
    path = raw / "phantom_cases.json"
    return {c: r["site"] for c, r in json.loads(path.read_text())["cases"].items()} if path.is_file() else {}


def evaluate_snapshot(predictor, test: dict, hidden: dict, classes: List[int], num_classes: int,
                      sites: Optional[Dict[str, str]] = None) -> dict:
    """One curve point. With ``sites`` (the multi-site phantom) also the same Dice per site: ``test_dice_per_site``
    and, for the hidden-label cases, ``pseudo_dice_per_site`` and ``pseudo_cases_per_site``."""
    net = predictor.network
    test_cases = {c: dice_per_class(predict(predictor, d), s, classes) for c, (d, s) in test.items()}
    point = {"test_dice": mean_over_cases(test_cases)}
    if sites:
        point["test_dice_per_site"] = per_site(test_cases, sites)
    if hidden:
        predictor.network = LabelledDecoderView(net)
        preds = {c: predict(predictor, d) for c, (d, _) in hidden.items()}
        predictor.network = net
        pseudo = {c: dice_per_class(preds[c], hidden[c][1], classes) for c in preds}
        point["pseudo_dice"] = mean_over_cases(pseudo)
        point["pseudo_fractions"] = fractions(list(preds.values()), num_classes)
        point["true_fractions"] = fractions([s for _, s in hidden.values()], num_classes)
        if sites:
            point["pseudo_dice_per_site"] = per_site(pseudo, sites)
            point["pseudo_cases_per_site"] = {site: sum(1 for c in pseudo if sites.get(c) == site)
                                              for site in point["pseudo_dice_per_site"]}
    return point


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="model folder TRAINER__PLANS__CONFIG")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--raw", required=True, help="the raw dataset folder")
    parser.add_argument("--out", required=True)
    parser.add_argument("--epochs", required=True, help="comma-separated snapshot epochs")
    parser.add_argument("--final-epoch", type=int, required=True)
    parser.add_argument("--hidden", nargs="*", default=[], help="hidden-label training cases (SKCDF models)")
    args = parser.parse_args()
    # --threads of the benchmark (SKCDF_CONV_THREADS) holds here too: beside a one-thread training on 2 cores, two
    # threads here would contend (the barrier spins) and slow both
    threads = os.environ.get("SKCDF_CONV_THREADS")
    torch.set_num_threads(int(threads) if threads else (os.cpu_count() or 1))
    out, raw, fold_dir = Path(args.out), Path(args.raw), Path(args.model) / f"fold_{args.fold}"
    results = json.loads(out.read_text()) if out.exists() else {}
    predictor = cpu_predictor()
    epochs = [int(e) for e in args.epochs.split(",")]
    names = {e: "checkpoint_final.pth" if e == args.final_epoch else snapshot_name(e) for e in epochs}
    available = [e for e in epochs if (fold_dir / names[e]).exists()]
    if not available:
        raise SystemExit(f"{fold_dir}: no snapshot yet")
    # the network and plans from the first snapshot; each snapshot's weights are loaded below
    predictor.initialize_from_trained_model_folder(args.model, (args.fold,), names[available[0]])
    labels = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    classes = [c for c in labels.all_labels if c != 0]
    ending = predictor.dataset_json["file_ending"]

    cache = out.parent / "preprocessed_cache"
    test = preprocessed(raw_cases(raw, "imagesTs", "labelsTs", test_case_ids(raw, ending), ending), predictor, cache)
    hidden = preprocessed(raw_cases(raw, "imagesTr", "labelsTr", args.hidden, ending), predictor, cache) \
        if args.hidden else {}
    for epoch in available:
        identity = checkpoint_identity(fold_dir / names[epoch])
        if cached_point(results, epoch, identity):  # else not yet, or from another file (the fold trained again)
            continue
        checkpoint = torch.load(fold_dir / names[epoch], map_location="cpu", weights_only=False)
        predictor.network.load_state_dict(checkpoint["network_weights"])
        predictor.network.eval()
        results[str(epoch)] = {**evaluate_snapshot(predictor, test, hidden, classes, labels.num_segmentation_heads,
                                                   case_sites(raw)), "checkpoint": identity}
        tmp = out.with_suffix(f".tmp{os.getpid()}")
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(results, indent=1) + "\n")
        os.replace(tmp, out)
        print(f"{fold_dir}: epoch {epoch}: test mean Dice "
              f"{100 * np.nanmean(list(results[str(epoch)]['test_dice'].values())):.1f}", flush=True)


if __name__ == "__main__":
    main()
