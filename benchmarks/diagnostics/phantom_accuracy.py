"""Accuracy on the built-in phantom: labelled-only nnU-Net vs SKCDF (and SKCDF without SKC / without ABC),
same configuration, same iteration budget, 3 runs each, test-set Dice and ASD per organ.

Set-up (skipped when the dataset already exists): ``skcdf_make_phantom`` (20 training + 10 unlabelled + 6 test
cases), ``nnUNetv2_plan_and_preprocess``, ``skcdf_split --labeled 0.2 --val 0.2 --add-unlabeled-images
--folds 3`` (3 identical folds = 3 runs with different random initialisation and sampling, as the paper's 3
seeds), ``skcdf_preprocess_unlabeled``, ``skcdf_add_cpu_config`` (3d_cpu). Every run: ``nnUNetv2_train`` with
the equal-budget trainers of ``benchmarks/diagnostics/trainers/``, ``nnUNetv2_predict`` on imagesTs, then one
``skcdf_evaluate`` over all runs prints the paper table. Finished trainings and predictions are reused, so an
interrupted benchmark continues where it stopped. Writes ``benchmarks/results/phantom_accuracy.json`` and a
``BENCHMARKS_FINDINGS.md`` section.

    python benchmarks/diagnostics/phantom_accuracy.py [-d 960] [--runs 3] [--work skcdf_data/phantom_accuracy]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import time
from pathlib import Path

# this folder (the other diagnostics) and benchmarks/ (the shared modules: data_pipeline, convergence, ...)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from data_pipeline import FINDINGS_MD, REPO, machine, sh, write_section  # noqa: E402

CONFIG = "3d_cpu"
TRAINERS = {  # method name in the table -> trainer
    "nnU-Net (labelled only)": "nnUNetTrainer_phantomAcc",
    "SKCDF": "SKCDFTrainer_phantomAcc",
    "SKCDF w/o SKC": "SKCDFTrainer_noSKC_phantomAcc",
    "SKCDF w/o ABC": "SKCDFTrainer_noABC_phantomAcc",
}
#: the four organs with the smallest voxel fraction in the phantom (BENCHMARKS.md, data pipeline section)
SMALLEST = ("LAG", "RAG", "PSV", "Es")


def prepare(dataset: str, env: dict, log: Path, np_: str) -> Path:
    raw = Path(env["nnUNet_raw"])
    found = list(raw.glob(f"Dataset{dataset}_*"))
    if found and (Path(env["nnUNet_preprocessed"]) / found[0].name / "splits_final.json").exists():
        return found[0]
    sh(["skcdf_make_phantom", "-d", dataset, "-n", "PhantomAccuracy", "--num-train", "20", "--num-unlabeled", "10",
        "--num-test", "6", "-np", np_, "--overwrite", "--no-progress"], env, log)
    sh(["nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", "3d_fullres", "-np", np_, "-npfp", np_], env, log)
    sh(["skcdf_split", "-d", dataset, "--labeled", "0.2", "--val", "0.2", "--add-unlabeled-images", "--folds",
        "3", "--fold-mode", "repeat", "--overwrite"], env, log)
    sh(["skcdf_preprocess_unlabeled", "-d", dataset, "-c", "3d_fullres", "-np", np_], env, log)
    sh(["skcdf_add_cpu_config", "-d", dataset, "--overwrite"], env, log)
    return next(raw.glob(f"Dataset{dataset}_*"))


def train_and_predict(dataset: str, trainer: str, run: int, raw: Path, out: Path, env: dict, log: Path) -> dict:
    results = Path(env["nnUNet_results"]) / raw.name / f"{trainer}__nnUNetPlans__{CONFIG}" / f"fold_{run}"
    times = {}
    if not (results / "checkpoint_final.pth").exists():
        times["train_s"] = sh(["nnUNetv2_train", dataset, CONFIG, str(run), "-tr", trainer, "-device", "cpu",
                               "--c"], {**env, "nnUNet_n_proc_DA": "0"}, log)
    pred = out / f"{trainer}_run{run}"
    if not (pred / "done").exists():
        times["predict_s"] = sh(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", dataset,
                                 "-c", CONFIG, "-f", str(run), "-tr", trainer, "-device", "cpu", "-npp", "1",
                                 "-nps", "1"], env, log)
        (pred / "done").touch()
    return {"prediction": str(pred), **times}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="960")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=list(TRAINERS), help="subset of the table rows")
    parser.add_argument("--work", default=str(REPO / "skcdf_data" / "phantom_accuracy"))
    parser.add_argument("-np", default="2")
    args = parser.parse_args()
    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    work = Path(args.work)
    trainers = Path(__file__).resolve().parent / "trainers"  # this benchmark's equal-budget trainers
    env = {**os.environ, "nnUNet_compile": "false", "nnUNet_def_n_proc": args.np,
           "nnUNet_extTrainer": os.pathsep.join((trainer_folder(), str(trainers)))}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(work / var)
        Path(env[var]).mkdir(parents=True, exist_ok=True)
    log = work / "phantom_accuracy.log"
    t0 = time.perf_counter()
    raw = prepare(args.dataset, env, log, args.np)
    runs = {m: [] for m in args.methods}
    # the two main methods first (run-major), then the ablations: a benchmark cut short still compares
    # nnU-Net and SKCDF over all runs
    main_methods, ablations = args.methods[:2], args.methods[2:]
    for group in (main_methods, ablations):
        for run in range(args.runs):
            for method in group:
                runs[method].append(train_and_predict(args.dataset, TRAINERS[method], run, raw,
                                                      work / "predictions", env, log))
                print(f"run {run} {method}: {runs[method][-1]}", flush=True)
    preds = [r["prediction"] for m in args.methods for r in runs[m]]
    names = [m for m in args.methods for _ in runs[m]]
    evaluation = work / "evaluation"
    sh(["skcdf_evaluate", "-ref", str(raw / "labelsTs"), "-pred", *preds, "--method", *names, "-o", str(evaluation),
        "-np", args.np], env, log)
    report(args, runs, evaluation, time.perf_counter() - t0)


def report(args, runs: dict, evaluation: Path, wall_s: float) -> None:
    table = (evaluation / "paper_table.md").read_text().strip()
    aggregate = json.loads((evaluation / "aggregate.json").read_text())
    gains = goal_check(aggregate, args.methods)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "dataset": args.dataset,
               "configuration": CONFIG, "runs": runs, "wall_s": wall_s, "gains": gains, "aggregate": aggregate}
    out = REPO / "benchmarks" / "results" / "phantom_accuracy.json"
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(table)
    print(json.dumps(gains, indent=2))
    from convergence_report import nest_report
    from trainers.phantom_accuracy_trainers import PHANTOM_ACC_EPOCHS
    write_section("phantom_accuracy", f"""## Accuracy on the phantom: nnU-Net vs SKCDF (`benchmarks/diagnostics/phantom_accuracy.py`)

Command: `python benchmarks/diagnostics/{Path(__file__).name} {' '.join(sys.argv[1:])}` — {results['date']} —
{results['machine']} — {wall_s / 60:.0f} min in all.

Built-in phantom, 20 training cases: 4 validation, 3 labelled (20 % of the rest), 13 with hidden labels + 10
unlabelled images; 6 separate test cases. Configuration `{CONFIG}`; every method trains
{PHANTOM_ACC_EPOCHS} epochs x 50 iterations (batch 2 labelled patches; SKCDF variants also 2 unlabelled
patches), no mirroring, {args.runs} runs (folds of identical splits). Test-set Dice (%) and ASD (mm), mean ±
std over runs of the per-run means (`skcdf_evaluate`, default empty-mask rules: a missed organ counts Dice 0
and is left out of ASD).

{nest_report(table, f'Phantom, {PHANTOM_ACC_EPOCHS * 50} iterations')}

SKCDF minus baseline: **{gains.get('mean_dice_gain', float('nan')):+.1f}** mean Dice points (goal +5),
**{gains.get('smallest_gain', float('nan')):+.1f}** on the four smallest organs {', '.join(SMALLEST)} (goal +10).""", FINDINGS_MD)


def goal_check(aggregate: dict, methods: list) -> dict:
    """SKCDF's gains over the baseline (first method) in Dice points, from skcdf_evaluate's aggregate.json."""
    by_name = {m["name"]: m for m in aggregate["methods"]}
    if "SKCDF" not in by_name or methods[0] not in by_name:
        return {}
    base, ours = by_name[methods[0]], by_name["SKCDF"]
    small = [c["key"] for c in aggregate["classes"] if c["column"] in SMALLEST]

    def dice(method, key):
        return 100 * method["per_class"][key]["Dice"]["mean"]

    return {"mean_dice_gain": 100 * (ours["average"]["Dice"]["mean"] - base["average"]["Dice"]["mean"]),
            "smallest_gain": sum(dice(ours, k) - dice(base, k) for k in small) / max(len(small), 1),
            "smallest": {c["column"]: [dice(base, c["key"]), dice(ours, c["key"])]
                         for c in aggregate["classes"] if c["key"] in small}}


if __name__ == "__main__":
    main()
