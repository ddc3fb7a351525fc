"""How confident SKCDF's pseudo-label source ``D_l`` is where its pseudo labels are wrong, per organ.

A voxel-confidence filter (FixMatch-style: leave pseudo-label voxels whose softmax maximum is below a threshold out
of the unlabelled loss) helps only if the wrong voxels are the unconfident ones. This script answers that on the
hidden-label training cases of a trained run of ``benchmarks/convergence.py``: ``D_l`` predicts each case (nnU-Net's
sliding window on the preprocessed grid, as the benchmark's curves do; ``convergence_eval.LabelledDecoderView``),
and per organ it reports, among the voxels the hidden label gives that organ: the share ``D_l`` labels correctly,
and the share of the *missed* and of the *correct* ones whose confidence is below each threshold (what a filter
at that threshold would drop); among the voxels ``D_l`` gives the organ where the hidden label does not
(*spurious*), the share below each threshold. Over all voxels: the share below each threshold, and the share of
wrong voxels.

    python benchmarks/diagnostics/pseudo_label_confidence.py --model <model folder> --fold 0 --raw <raw dataset> \\
        --cases phantom_tr_0006 phantom_tr_0010 ... [--checkpoint checkpoint_final.pth] --cache <folder> --out <json>

Preprocessed cases are cached in ``--cache`` (e.g. the work folder's ``curves/preprocessed_cache``, the same
files as the curves' cache).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from convergence_eval import LabelledDecoderView, cpu_predictor, preprocessed, raw_cases  # noqa: E402

THRESHOLDS = (0.5, 0.7, 0.9, 0.95)


def confidence_table(probabilities: torch.Tensor, reference: np.ndarray, classes: List[int]) -> dict:
    """Counts for one case: ``probabilities`` (C, *S) softmax, ``reference`` (*S) labels. Per class c (voxels whose
    reference is c): n, correct, and per threshold the correct / missed voxels below it; overall: n, wrong, and per
    threshold all / wrong voxels below it. Counts, so that cases add up."""
    confidence, prediction = probabilities.max(0)
    confidence, prediction = confidence.numpy(), prediction.numpy()
    ref = reference.astype(np.int64)
    wrong = prediction != ref
    out = {"all": {"n": int(ref.size), "wrong": int(wrong.sum()),
                   "below": {str(t): int((confidence < t).sum()) for t in THRESHOLDS},
                   "wrong_below": {str(t): int((wrong & (confidence < t)).sum()) for t in THRESHOLDS}}}
    for c in classes:
        inside = ref == c
        correct, missed, spurious = inside & ~wrong, inside & wrong, (prediction == c) & ~inside
        out[str(c)] = {"n": int(inside.sum()), "correct": int(correct.sum()), "spurious": int(spurious.sum()),
                       "correct_below": {str(t): int((correct & (confidence < t)).sum()) for t in THRESHOLDS},
                       "missed_below": {str(t): int((missed & (confidence < t)).sum()) for t in THRESHOLDS},
                       "spurious_below": {str(t): int((spurious & (confidence < t)).sum()) for t in THRESHOLDS}}
    return out


def add(total: dict, part: dict) -> dict:
    """Element-wise sum of two count tables of :func:`confidence_table` (nested dicts of ints)."""
    if not total:
        return json.loads(json.dumps(part))
    return {k: add(total[k], v) if isinstance(v, dict) else total[k] + v for k, v in part.items()}


def shares(counts: dict, names: Dict[str, str]) -> List[str]:
    """Printable rows: per organ, % correct, spurious voxels (% of the organ's), % of missed / correct / spurious
    voxels below each threshold."""
    rows = [f"{'organ':26s} {'voxels':>7s} {'correct':>8s} {'spurious':>8s}  "
            + "  ".join(f"{k}<{t:<4}" for k in ("miss", "corr", "spur") for t in THRESHOLDS)]
    for c, x in counts.items():
        if c == "all" or x["n"] == 0:
            continue
        missed = x["n"] - x["correct"]
        of = {"missed": max(missed, 1), "correct": max(x["correct"], 1), "spurious": max(x["spurious"], 1)}
        rows.append(f"{names.get(c, c):26s} {x['n']:7d} {100 * x['correct'] / x['n']:7.1f}% "
                    f"{100 * x['spurious'] / x['n']:7.1f}%  "
                    + "  ".join(f"{100 * x[k + '_below'][str(t)] / of[k]:8.1f}%" for k in ("missed", "correct", "spurious")
                                for t in THRESHOLDS))
    a = counts["all"]
    rows.append(f"all voxels: {100 * a['wrong'] / a['n']:.1f}% wrong; below threshold: " + ", ".join(
        f"{t}: {100 * a['below'][str(t)] / a['n']:.1f}% of all, {100 * a['wrong_below'][str(t)] / max(a['wrong'], 1):.1f}%"
        f" of the wrong" for t in THRESHOLDS))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="an SKCDF model folder TRAINER__PLANS__CONFIG")
    parser.add_argument("--fold", type=int, required=True)
    parser.add_argument("--raw", required=True, help="the raw dataset folder (imagesTr/labelsTr hold the cases)")
    parser.add_argument("--cases", nargs="+", required=True, help="hidden-label training cases")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cache", required=True, help="folder of preprocessed cases (.npz; created if absent)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if not os.environ.get("nnUNet_extTrainer"):  # the benchmark's *_conv trainers and the package's
        from convergence import ext_trainer_path

        os.environ["nnUNet_extTrainer"] = ext_trainer_path()
    predictor = cpu_predictor()
    predictor.initialize_from_trained_model_folder(args.model, (args.fold,), args.checkpoint)
    labels = predictor.plans_manager.get_label_manager(predictor.dataset_json)
    classes = [c for c in labels.all_labels if c != 0]
    names = {str(v): k for k, v in predictor.dataset_json["labels"].items()}
    ending = predictor.dataset_json["file_ending"]
    out = Path(args.out)
    cases = preprocessed(raw_cases(Path(args.raw), "imagesTr", "labelsTr", args.cases, ending), predictor,
                         Path(args.cache))
    predictor.network = LabelledDecoderView(predictor.network)
    predictor.network.eval()
    total, per_case = {}, {}
    for case, (data, seg) in cases.items():
        with torch.no_grad():
            logits = predictor.predict_sliding_window_return_logits(torch.from_numpy(data))
        per_case[case] = confidence_table(torch.softmax(logits.float(), 0), seg, classes)
        total = add(total, per_case[case])
        print(f"{case}: {100 * per_case[case]['all']['wrong'] / per_case[case]['all']['n']:.2f}% of voxels wrong",
              flush=True)
    print("\n".join(shares(total, names)))
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    atomic_save_json({"model": args.model, "fold": args.fold, "checkpoint": args.checkpoint, "cases": args.cases,
                      "thresholds": list(THRESHOLDS), "total": total, "per_case": per_case,
                      "names": names}, str(out), indent=1)
    print(f"written: {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
