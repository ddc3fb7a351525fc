"""Dice (test set by default; ``--cases hidden``: see below) of an SKCDF checkpoint's two decoders side by
side: ``D_u`` (the inference path, the student of the pseudo labels) and ``D_l`` (the pseudo labels' source,
trained on the labelled cases only), and of any other nnU-Net model folder's network on the same grid
(benchmark side only).

Question it answers (BENCHMARKS_FINDINGS.md, items 11 and 24): when SKCDF ends below a converged labelled-only
nnU-Net, is the student below its teacher (the distillation into ``D_u`` loses), or is the teacher itself
below nnU-Net (what the shared encoder and the loss composition do to ``D_l``)?

Every model is evaluated like the learning curves of ``convergence.py`` (``convergence_eval.py``): the test
cases preprocessed once with the model's plans by nnU-Net's preprocessor, nnU-Net's sliding window without
mirroring, Dice per class on the preprocessed grid (by default the same cache as the curves). ``D_l`` runs in
self mode (``LabelledDecoderView``). Writes one JSON (atomically) and prints a table; models already in
``--out`` and not given again are kept, so the file can grow one arm at a time.

``--cases hidden`` evaluates on the hidden-label training cases of the benchmark's split instead (the cases whose
``D_l`` predictions are the pseudo-label diagnostics of the curves): there a labelled-only nnU-Net's Dice is the
direct comparator of SKCDF's pseudo labels. One file holds one case set.

    python benchmarks/diagnostics/teacher_student.py --raw RAW --out benchmarks/results/teacher_student_2lab_8000it.json \\
        --model a=MODEL_FOLDER_a:0 --model g=MODEL_FOLDER_g:0 --model i=MODEL_FOLDER_i:0
    python benchmarks/diagnostics/teacher_student.py --raw RAW --cases hidden --preprocessed PREPROCESSED_DATASET_FOLDER \\
        --out benchmarks/results/teacher_student_hidden_2lab_8000it.json --model a=MODEL_FOLDER_a:2
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import torch

# this folder (the other diagnostics) and benchmarks/ (the shared modules: data_pipeline, convergence, ...)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from convergence_eval import (LabelledDecoderView, cpu_predictor, dice_per_class, mean_over_cases, predict,  # noqa
                              preprocessed, raw_cases, test_case_ids)


def parse_model(spec: str) -> Tuple[str, Path, int]:
    """``KEY=MODEL_FOLDER:FOLD`` -> (key, folder, fold), with a message naming the spec when it is malformed."""
    key, sep, rest = spec.partition("=")
    folder, colon, fold = rest.rpartition(":")
    if not (sep and colon and key and folder and fold.isdigit()):
        raise SystemExit(f"--model {spec!r}: expected KEY=MODEL_FOLDER:FOLD, e.g. "
                         f"g=nnUNet_results/Dataset962_Convergence/SKCDFTrainer__nnUNetPlans__3d_cpu:0")
    return key, Path(folder), int(fold)


def decoders(net: torch.nn.Module) -> Dict[str, torch.nn.Module]:
    """The inference paths to compare: an SKCDF network's ``D_u`` (its forward) and ``D_l``; any other
    network's forward as ``main``."""
    if hasattr(net, "decoder_l") and hasattr(net, "decoder_u"):
        return {"D_u": net, "D_l": LabelledDecoderView(net)}
    return {"main": net}


def summarise(per_class: Dict[str, float], names: Dict[str, str], small: List[str]) -> dict:
    """Mean Dice (points) over all classes and over the ``small`` organs, and per organ name."""
    by_name = {names[c]: 100 * v for c, v in per_class.items()}
    return {"mean": float(np.nanmean(list(by_name.values()))),
            "small": float(np.nanmean([by_name[n] for n in small if n in by_name])),
            "per_organ": by_name}


def case_ids(kind: str, raw: Path, pre, ending: str) -> List[str]:
    """The cases to evaluate: the raw dataset's test cases, or (``hidden``) the hidden-label training cases of the
    split in ``pre`` (its splits_final.json, as ``convergence.py`` reads them)."""
    if kind == "test":
        return test_case_ids(raw, ending)
    if pre is None or not (Path(pre) / "splits_final.json").is_file():
        raise SystemExit(f"--cases hidden needs --preprocessed, the dataset's preprocessed folder with the "
                         f"benchmark's splits_final.json (got {pre})")
    from convergence import hidden_label_cases

    ids = hidden_label_cases(Path(pre), raw)
    if not ids:
        raise SystemExit(f"{Path(pre) / 'splits_final.json'}: fold 0 has no hidden-label training case of {raw}")
    return ids


def default_cache(model_folder: Path) -> Path:
    """The preprocessed-case cache of the learning curves (``convergence_eval.py``) of the benchmark work folder
    that holds ``model_folder`` (``<work>/nnUNet_results/<dataset>/<trainer>``): shared with the curves, and never
    inside the repository (``--out`` usually is)."""
    folder = Path(model_folder).resolve()
    if len(folder.parents) < 3 or folder.parents[1].name != "nnUNet_results":
        raise SystemExit(f"{model_folder}: not <work>/nnUNet_results/<dataset>/<trainer>; give --cache, a folder "
                         f"for the preprocessed cases")
    return folder.parents[2] / "curves" / "preprocessed_cache"


def same_case_set(previous: dict, kind: str, out: Path) -> None:
    """One result file, one case set (files written before --cases existed are test-set files)."""
    if previous and previous.get("cases", "test") != kind:
        raise SystemExit(f"{out} holds results on the {previous.get('cases', 'test')} cases; write the --cases "
                         f"{kind} results to another --out")


def kept_models(previous: dict) -> dict:
    """The models of an earlier result file, each with its own provenance (date, commit, command); files written
    before provenance was kept per model have it at the top level only."""
    return {k: {**{f: previous[f] for f in ("date", "commit", "command") if f in previous}, **v}
            for k, v in previous.get("models", {}).items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--raw", required=True, help="the raw dataset folder (imagesTs, labelsTs)")
    parser.add_argument("--model", action="append", required=True, help="KEY=MODEL_FOLDER:FOLD (repeatable)")
    parser.add_argument("--checkpoint", default="checkpoint_final.pth")
    parser.add_argument("--cases", choices=["test", "hidden"], default="test",
                        help="test: imagesTs/labelsTs; hidden: the hidden-label training cases (needs --preprocessed)")
    parser.add_argument("--preprocessed",
                        help="the dataset's preprocessed folder (splits_final.json), for --cases hidden")
    parser.add_argument("--cache", default=None, help="preprocessed cases (default: the curves' cache of the "
                        "model's benchmark work folder, <work>/curves/preprocessed_cache)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    if args.cases == "hidden" and not args.preprocessed:
        parser.error("--cases hidden needs --preprocessed (the dataset's preprocessed folder, its splits_final.json)")
    from convergence import SMALLEST, ext_trainer_path, machine
    from convergence_report import class_titles, commit
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    # the benchmark trainers (``*_conv``) are found by nnU-Net's lookup as in convergence.py
    os.environ["nnUNet_extTrainer"] = os.pathsep.join(filter(None, (os.environ.get("nnUNet_extTrainer"),
                                                                    ext_trainer_path())))
    torch.set_num_threads(os.cpu_count() or 1)
    raw, out = Path(args.raw), Path(args.out)
    models = [parse_model(s) for s in args.model]
    for key, folder, fold in models:
        if not (folder / f"fold_{fold}" / args.checkpoint).is_file():
            raise SystemExit(f"--model {key}: {folder / f'fold_{fold}' / args.checkpoint} does not exist; "
                             f"train that fold first or give another --checkpoint")
        if not args.cache:
            default_cache(folder)  # refuses a model folder outside a benchmark work folder before any work
    # models measured before and not given now are kept (one file can grow arm by arm across sessions)
    previous = json.loads(out.read_text()) if out.is_file() else {}
    same_case_set(previous, args.cases, out)
    kept = kept_models(previous)
    today, measured_at = datetime.date.today().isoformat(), commit()
    results = {"date": today, "commit": measured_at, "machine": machine(), "checkpoint": args.checkpoint,
               "cases": args.cases,
               "grid": "preprocessed (as the learning curves), no mirroring", "models": kept}
    for key, folder, fold in models:
        predictor = cpu_predictor()
        predictor.initialize_from_trained_model_folder(str(folder), (fold,), args.checkpoint)
        net = predictor.network  # with the checkpoint's weights (nnU-Net loads the first fold's)
        net.eval()
        ending = predictor.dataset_json["file_ending"]
        names = class_titles(predictor.dataset_json)
        ids = case_ids(args.cases, raw, args.preprocessed, ending)
        cases = raw_cases(raw, *(("imagesTs", "labelsTs") if args.cases == "test" else ("imagesTr", "labelsTr")), ids,
                          ending)
        evaluated = preprocessed(cases, predictor, Path(args.cache) if args.cache else default_cache(folder))
        classes = [int(c) for c in names]
        entry = {"folder": str(folder), "fold": fold, "cases": len(ids), "date": today, "commit": measured_at,
                 "command": " ".join(["python", *sys.argv])}
        for path_name, module in decoders(net).items():
            predictor.network = module
            per_case = {c: dice_per_class(predict(predictor, d), s, classes) for c, (d, s) in evaluated.items()}
            entry[path_name] = summarise(mean_over_cases(per_case), names, list(SMALLEST))
            print(f"{key} {path_name}: mean {entry[path_name]['mean']:.1f}, 4 smallest "
                  f"{entry[path_name]['small']:.1f}", flush=True)
        predictor.network = net
        results["models"][key] = entry
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(results, str(out))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
