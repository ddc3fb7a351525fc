"""Is the demo's labelled-only nnU-Net at its plateau? Its learning curve at the demo's budget and at twice it.

``run_demo.sh`` checks one thing about its baseline: how much the last quarter of the budget added (one snapshot
at 3/4). This benchmark draws the whole curve, for more than one run and for twice the budget
(``run_demo.sh --long``), on the demo's own task: ``bash run_demo.sh --prepare`` makes the data, plans and split
in the work folder; the demo's labelled-only trainers (``benchmarks/trainers/demo_plateau_trainers.py``: the same
trainers with a snapshot after every eighth of the budget) train one run per results folder; every snapshot
predicts the test set with ``nnUNetv2_predict`` and is scored with ``nnUNetv2_evaluate_folder``, exactly as the
demo scores its arms. Two questions, answered per run: does the last quarter add under 2 mean Dice points (the
demo's criterion), and does twice the budget end higher than the demo's budget?

Accuracies only: the trainings run at ``--threads`` torch threads beside whatever else runs, so no time is
reported (``benchmarks/demo_time.py`` measures the demo's time). Resumable: a finished training or an evaluated
snapshot is kept.

Writes ``benchmarks/results/demo_plateau.json`` and BENCHMARKS.md's section ``demo_plateau``.

    python benchmarks/demo_plateau.py [--runs 1] [--budgets 1 2] [--threads 1]
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from pathlib import Path
from typing import Dict, List

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE / "trainers"))
from convergence import ext_trainer_path  # noqa: E402
from convergence_common import commit  # noqa: E402
from convergence_trainers import ITERATIONS_PER_EPOCH  # noqa: E402
from data_pipeline import RESULTS, machine, sh, write_section  # noqa: E402
from demo_plateau_trainers import CURVE_POINTS, snapshot_epochs, snapshot_name  # noqa: E402

sys.path.insert(0, str(REPO / "scripts"))
from demo_report import PLATEAU_POINTS, mean_dice  # noqa: E402

from nnunetv2_skcdf.training.nnUNetTrainer.variants.demo.demo_trainers import (  # noqa: E402
    DEMO_EPOCHS,
    DEMO_LR,
    PLATEAU_EPOCH_FRACTION,
)

NAME = "demo_plateau"
DATASET = "950"
DATASET_NAME = f"Dataset{DATASET}_SKCDFPhantom"
CONFIG = "2d_demo"
#: budget factor -> trainer (1: the demo's budget, 2: run_demo.sh --long's)
TRAINERS = {1: "nnUNetTrainer_demoCurve", 2: "nnUNetTrainer_demoLongCurve"}


def environment(work: Path, results: Path, threads: int) -> dict:
    return {**os.environ, "nnUNet_raw": str(work / "nnUNet_raw"),
            "nnUNet_preprocessed": str(work / "nnUNet_preprocessed"), "nnUNet_results": str(results),
            "nnUNet_extTrainer": ext_trainer_path(),
            "nnUNet_compile": "false", "nnUNet_n_proc_DA": "0", "SKCDF_DEMO_THREADS": str(threads),
            "SKCDF_DEMO_DATASET": DATASET}


def prepare(work: Path, log: Path) -> None:
    """The demo's data, plans and split (``run_demo.sh --prepare``), once per work folder."""
    done = work / "prepared"
    if done.exists():
        return
    env = environment(work, work / "nnUNet_results", 1)
    del env["nnUNet_n_proc_DA"]  # 0 breaks nnU-Net's planner (torch.set_num_threads(0)); run_demo.sh trains with it
    env["SKCDF_DEMO_OUT"] = str(work / "prepare")
    sh(["bash", str(REPO / "run_demo.sh"), "--prepare"], env, log)
    done.write_text(datetime.datetime.now().isoformat())


def curve(work: Path, factor: int, run: int, threads: int, log: Path) -> Dict[int, dict]:
    """{iterations: {"mean": %, "organs": {name: %}}} of one run at ``factor`` x the demo's budget."""
    trainer = TRAINERS[factor]
    results = work / f"run{run}" / "nnUNet_results"
    env = environment(work, results, threads)
    fold = results / DATASET_NAME / f"{trainer}__nnUNetPlans__{CONFIG}" / "fold_0"
    if not (fold / "checkpoint_final.pth").exists():
        resume = ["--c"] if (fold / "checkpoint_latest.pth").exists() else []
        sh(["nnUNetv2_train", DATASET, CONFIG, "0", "-tr", trainer, "-device", "cpu", *resume], env, log)
    epochs = factor * DEMO_EPOCHS
    labels = {v: k for k, v in json.loads((work / "nnUNet_preprocessed" / DATASET_NAME / "dataset.json")
                                          .read_text())["labels"].items() if isinstance(v, int) and v > 0}
    raw = work / "nnUNet_raw" / DATASET_NAME
    points = {}
    for e, chk in [(e, snapshot_name(e)) for e in snapshot_epochs(epochs)] + [(epochs, "checkpoint_final.pth")]:
        out = work / f"run{run}" / "predictions" / trainer / chk.replace(".pth", "")
        summary = out / "summary.json"
        if not summary.exists():
            sh(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(out), "-d", DATASET, "-c", CONFIG,
                "-tr", trainer, "-f", "0", "-chk", chk, "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"],
               env, log)
            sh(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(out), "-djfile",
                str(work / "nnUNet_preprocessed" / DATASET_NAME / "dataset.json"), "-pfile",
                str(work / "nnUNet_preprocessed" / DATASET_NAME / "nnUNetPlans.json"), "-np", "2"], env, log)
        s = json.loads(summary.read_text())
        points[e * ITERATIONS_PER_EPOCH] = {
            "mean": round(mean_dice(s), 2),
            "organs": {labels[int(k)]: round(100 * v["Dice"], 1) for k, v in s["mean"].items() if int(k) in labels}}
    return points


def final(points: dict) -> dict:
    """The last point of a curve (keys: iterations, as int or as the stored str)."""
    return points[max(points, key=int)]


def last_quarter(points: Dict[int, dict]) -> float:
    """Mean Dice at the end minus at 3/4 of the budget (the demo's plateau check, the snapshot run_demo.sh keeps)."""
    end = max(points)
    return points[end]["mean"] - points[round(PLATEAU_EPOCH_FRACTION * end)]["mean"]


def markdown(r: dict, command: str) -> str:
    lines = ["## Is the demo's labelled-only nnU-Net at its plateau? (`benchmarks/demo_plateau.py`)", "",
             f"Command: `{command}` — {r['date']} — commit {r['commit']} — {r['machine']}", "",
             f"The demo's task and labelled-only trainer (`run_demo.sh --prepare`, `nnUNetTrainer_demo`: Adam "
             f"{r['lr']:g}, nnU-Net's poly schedule over the budget), at the demo's budget and at twice it "
             f"(`run_demo.sh --long`), {r['runs']} run(s) each; mean test Dice (8 test cases, nnU-Net's predictor "
             f"and evaluation) after every eighth of the budget. Accuracies only (the trainings shared the machine).",
             ""]
    for budget, runs in r["curves"].items():
        its = sorted({int(i) for pts in runs.values() for i in pts})
        lines += [f"**{budget} iterations**", "", "| iterations | " + " | ".join(f"run {k}" for k in runs) + " |",
                  "|---" * (len(runs) + 1) + "|"]
        lines += [f"| {i} | " + " | ".join(f"{pts[str(i)]['mean']:.1f}" if str(i) in pts else "-"
                                          for pts in runs.values()) + " |" for i in its]
        lines.append("")
    lines += ["| budget | run | final mean Dice | last quarter | criterion (< 2 points) | smallest organ at the end |",
              "|---|---|---|---|---|---|"]
    for budget, runs in r["curves"].items():
        for run, pts in runs.items():
            end = final(pts)
            gain = r["last_quarter"][budget][run]
            organ = min(end["organs"], key=end["organs"].get)
            lines.append(f"| {budget} | {run} | {end['mean']:.1f} | {gain:+.1f} | "
                         f"{'met' if gain < PLATEAU_POINTS else 'not met'} | {organ} {end['organs'][organ]:.1f} |")
    if r.get("doubling") is not None:
        lines += ["", f"Twice the budget ends {r['doubling']:+.1f} mean Dice points from the demo's budget (mean "
                      f"final over the runs: {r['final_mean'][str(2 * r['iterations'])]:.1f} vs "
                      f"{r['final_mean'][str(r['iterations'])]:.1f})."]
    return "\n".join(lines)


def main(argv: List[str] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=1, help="runs per budget (default: %(default)s)")
    p.add_argument("--budgets", type=int, nargs="+", default=[1, 2], choices=sorted(TRAINERS),
                   help="multiples of the demo's budget (default: 1 2)")
    p.add_argument("--threads", type=int, default=1, help="torch threads per training (default: %(default)s)")
    p.add_argument("--work", default=str(REPO / "skcdf_data" / NAME), help="work folder (default: %(default)s)")
    a = p.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    log = work / f"{NAME}.log"
    prepare(work, log)
    iterations = DEMO_EPOCHS * ITERATIONS_PER_EPOCH
    curves: Dict[str, Dict[str, dict]] = {}
    gains: Dict[str, Dict[str, float]] = {}
    for factor in a.budgets:
        budget = str(factor * iterations)
        for run in range(1, a.runs + 1):
            print(f"{budget} iterations, run {run}", flush=True)
            pts = curve(work, factor, run, a.threads, log)
            curves.setdefault(budget, {})[str(run)] = {str(i): v for i, v in pts.items()}
            gains.setdefault(budget, {})[str(run)] = round(last_quarter(pts), 2)
    finals = {b: round(sum(final(pts)["mean"] for pts in runs.values()) / len(runs), 2) for b, runs in curves.items()}
    doubling = (round(finals[str(2 * iterations)] - finals[str(iterations)], 2)
                if {str(iterations), str(2 * iterations)} <= set(finals) else None)
    r = {"date": datetime.date.today().isoformat(), "commit": commit(), "machine": machine(cpu_only=True),
         "iterations": iterations, "lr": DEMO_LR, "runs": a.runs, "points": CURVE_POINTS, "curves": curves,
         "last_quarter": gains, "final_mean": finals, "doubling": doubling}
    command = "python benchmarks/demo_plateau.py" + "".join(
        f" {flag} {' '.join(map(str, v)) if isinstance(v, list) else v}"
        for flag, v, default in (("--runs", a.runs, 1), ("--budgets", a.budgets, [1, 2]), ("--threads", a.threads, 1))
        if v != default)
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    RESULTS.mkdir(parents=True, exist_ok=True)
    atomic_save_json(r, str(RESULTS / f"{NAME}.json"))
    section = markdown(r, command)
    write_section(NAME, section)
    print(section)


if __name__ == "__main__":
    main()
