"""Is the built-in phantom learnable, and is it a test of class imbalance?

Trains plain ``nnUNetTrainer`` (labelled data only) on the default phantom with the small CPU
configuration (``skcdf_add_cpu_config``), predicts the 6 test cases with the stock predictor and
evaluates them with nnU-Net's evaluation; prints per-organ Dice and writes
``benchmarks/results/phantom_learnability.json`` plus a section in ``BENCHMARKS_FINDINGS.md``.

    python benchmarks/diagnostics/phantom_learnability.py [--trainer nnUNetTrainer_5epochs] [--keep DIR]

Default budget: ``nnUNetTrainer_5epochs`` (5 x 250 iterations), 16 labelled + 4 validation cases.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

# this folder (the other diagnostics) and benchmarks/ (the shared modules: data_pipeline, convergence, ...)
sys.path[:0] = [str(Path(__file__).resolve().parent), str(Path(__file__).resolve().parents[1])]
from data_pipeline import FINDINGS_MD, REPO, machine, sh, write_section  # noqa: E402

DATASET = "950"
CONFIG = "3d_cpu"


def per_class_dice(summary_file: Path) -> dict:
    from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES

    summary = json.loads(summary_file.read_text())
    by_label = summary["mean"]
    return {abbr: float(by_label[str(label_id)]["Dice"]) for label_id, _, abbr in SYNAPSE_CLASSES}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trainer", default="nnUNetTrainer_5epochs")
    parser.add_argument("--keep", help="work in this folder and keep it")
    args = parser.parse_args()
    root = Path(args.keep or tempfile.mkdtemp(prefix="skcdf_learn_"))
    env = {**os.environ, "nnUNet_def_n_proc": "2", "nnUNet_n_proc_DA": os.environ.get("nnUNet_n_proc_DA", "2")}
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results"):
        env[var] = str(root / var)
        os.makedirs(env[var], exist_ok=True)
    log = root / "log.txt"
    times = {}
    sh(["skcdf_make_phantom", "-d", DATASET, "-np", "2", "--overwrite", "--no-progress"], env, log)
    sh(["nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "3d_fullres", "-np", "2", "-npfp", "2"], env, log)
    sh(["skcdf_split", "-d", DATASET, "--labeled", "all", "--val", "4", "--overwrite"], env, log)
    sh(["skcdf_add_cpu_config", "-d", DATASET, "--overwrite"], env, log)
    times["train_s"] = sh(["nnUNetv2_train", DATASET, CONFIG, "0", "-tr", args.trainer, "-device", "cpu"], env, log)
    raw = Path(env["nnUNet_raw"]) / "Dataset950_SKCDFPhantom"
    pred = root / "pred_test"
    times["predict_s"] = sh(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", DATASET, "-c",
                             CONFIG, "-tr", args.trainer, "-f", "0", "-device", "cpu", "--disable_tta",
                             "-npp", "1", "-nps", "1"], env, log)
    pre = Path(env["nnUNet_preprocessed"]) / "Dataset950_SKCDFPhantom"
    sh(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(pred), "-djfile", str(pre / "dataset.json"),
        "-pfile", str(pre / "nnUNetPlans.json"), "-np", "2"], env, log)
    dice = per_class_dice(pred / "summary.json")
    plans = json.loads((pre / "nnUNetPlans.json").read_text())["configurations"][CONFIG]
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "trainer": args.trainer,
               "configuration": {"patch_size": plans["patch_size"], "batch_size": plans["batch_size"]},
               "labelled_train_cases": 16, "val_cases": 4, "test_cases": 6, **times,
               "test_dice": dice, "mean_dice": sum(dice.values()) / len(dice)}
    print(json.dumps(results, indent=2))
    out = REPO / "benchmarks" / "results" / "phantom_learnability.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    header = "| " + " | ".join(dice) + " | mean |"
    row = "| " + " | ".join(f"{100 * v:.1f}" for v in dice.values()) + f" | {100 * results['mean_dice']:.1f} |"
    body = f"""## Phantom learnability (`benchmarks/diagnostics/phantom_learnability.py`)

Command: `python benchmarks/diagnostics/{Path(__file__).name} {' '.join(sys.argv[1:])}` — {results['date']} — {results['machine']}

Plain `{args.trainer}` (labelled data only: 16 training + 4 validation cases of the default phantom),
configuration `{CONFIG}` (patch {plans['patch_size']}, batch {plans['batch_size']}), training
{times['train_s'] / 60:.1f} min incl. nnU-Net's final validation; test-set Dice (%, 6 cases, no TTA):

{header}
|{'---|' * (len(dice) + 1)}
{row}"""
    write_section(f"phantom_learnability_{args.trainer}", body, FINDINGS_MD)
    if not args.keep:
        shutil.rmtree(root)


if __name__ == "__main__":
    main()
