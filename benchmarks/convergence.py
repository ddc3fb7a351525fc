"""Accuracy at convergence: SKCDF against a properly trained nnU-Net, with learning curves and diagnostics.

Arms (same configuration, same iterations, ``benchmarks/trainers/convergence_trainers.py``):
  a  labelled-only ``nnUNetTrainer`` on the 20 % labelled split (folds 0-2: 3 runs of one split)
  b  SKCDF on the same split, with the hidden-label training cases and imagesUnlabeled as unlabelled, with the
     defaults up to 0.2 (the reference's constant head EMA; ``SKCDFTrainer_constantHeadEMA``: the stored runs were
     trained as ``SKCDFTrainer`` before 0.3.0 changed the default to the lr-scaled head EMA of arm (g))
  c  ``nnUNetTrainer`` with every training case labelled (folds 3-5: the upper bound)
  d  SKCDF with the reference code's masking (``_multiplyMask``): ``SKCDFTrainer``'s defaults since 0.4.0;
     i changes one thing of the 0.3 defaults (lr-scaled head EMA, ``exclude`` masking, pinned in its trainer),
     d changes the masking of those (a main arm with --runs runs); e1, f, h change one thing of d (no run of
     them was stored before 0.4.0 made d the default, so they ablate the method as shipped)
  e1, e2  SKCDF ``_noSKC`` and ``_noABC`` (final budget only; e2 has no balanced losses, so no masking)
  f  SKCDF with the reference's per-head self mode (``_perHeadSelf``; final budget only)
  g, h  fixes from the first diagnosis (main heads absorbed by the balanced heads as lr anneals): head EMA step
     scaled by lr / initial lr (``_lrScaledHeadEMA``; ``SKCDFTrainer``'s default since 0.3.0, so a main arm with
     --runs runs), no head EMA (``_noHeadEMA``); with curves
  i  SKCDF with consistency weight w = 1 instead of 10 (``_cw1``; from the diagnosis at 8000 iterations: the
     unlabelled loss weighted 10x may hold SKCDF at its pseudo labels' quality); with curves
  j  SKCDF 0.4 (multiply masking) with a strongly intensity-perturbed view of x_u for D_u (``_strongView``, an
     extension); with curves
  k  SKCDF 0.4 without the unlabelled loss (w = 0, ``_cw0``): the unlabelled images enter only through the
     cross-attention of the labelled pass; what the pseudo labels add to (d); with curves
  l  SKCDF 0.4 with lambda(t) ramped over the first 50 epochs instead of the whole budget (``_rampup50``); with
     curves
Per run (arm x fold), each step resumable (rerun the same command and it continues where it stopped):
  prepare   once: phantom, ``nnUNetv2_plan_and_preprocess``, ``skcdf_split`` + all-labelled folds, unlabelled
            images, the CPU configuration; the budget is fixed in ``<work>/budget.json`` at the first run
  train     ``nnUNetv2_train --c``, snapshots at ``--points`` evenly spaced epochs
  curves    every snapshot evaluated in a child process (``convergence_eval.py``): test-set Dice per organ,
            and for SKCDF arms D_l's predictions of the hidden-label training cases (the source of the pseudo
            labels) against their hidden labels, and predicted vs true class fractions (test set only with
            --no-pseudo-curves: for a run that must be evaluated within the session it finishes in)
  final     stock ``nnUNetv2_predict`` of the final checkpoint + ``skcdf_evaluate`` (Dice, ASD, NSD, missed /
            spurious organs, islands: predicted components without a reference voxel)
  store     (after ``final``, and for an arm with a learning curve only when ``curves`` ran too)
            the run's result -> ``benchmarks/results/convergence/<arm>_fold<f>_<labelled>lab_<iterations>it.json``
            (curve, final per-case metrics, lambda(t), keep-rates, pseudo-label fractions, task, budget, commit;
            the commit of every training start or resume is in ``train_commits``).
            These files are committed: the work folder does not outlive a session here, the store does, and a run
            already stored with this task and budget is not trained again. The phantom and the split are
            deterministic, so every session trains on the same data. The upper bound (c) is stored as ``alllab``:
            it is the same run whatever --labeled (the validation cases do not depend on it). Runs with other
            budgets (another ``--work`` folder and ``--iterations``) are stored beside them; each report lists
            them next to the same arm and fold at its own budget (final checkpoints, each schedule annealed).
  reevaluate  (only when asked) stored runs whose predictions are still in the work folder are evaluated again
            with the current ``skcdf_evaluate`` to add metrics introduced after they were stored (islands); every
            metric a run already has must come out identical, else its store file is left as it was
  report    (after the runs) ``benchmarks/results/convergence_<n>lab_<iterations>it.json``, PNGs and the
            BENCHMARKS.md section (one per task and budget) from the store; missing runs are reported as such
            (status: partial).

    python benchmarks/convergence.py [--labeled 4] [--iterations 8000] [--points 8] [--arms a c b d e1 e2 f g h i j k] \
        [--runs 3]
Budget: 8000 iterations by default, the budget at which (a) and (c) meet the last-quarter criterion on this
phantom (< 1 mean Dice point); 12000 (``--iterations 12000``) adds +0.3 to (a) over 2 runs and +0.6 to (c)
(BENCHMARKS.md items 20-21), so the report marks 8000 converged; the first stored runs have 4000 (the
short-budget regime):
    python benchmarks/convergence.py --labeled 2 --iterations 4000 --work skcdf_data/convergence_2lab --stages report
One work folder per task and budget (default ``skcdf_data/convergence_<labelled>lab_<iterations>``):
``<work>/task.json`` and ``<work>/budget.json`` are fixed at its first run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import REPO, machine, sh  # noqa: E402
from trainers.convergence_trainers import ITERATIONS_PER_EPOCH  # noqa: E402

CONFIG = "3d_cpu"
RESULTS = REPO / "benchmarks" / "results"
STORE = RESULTS / "convergence"
#: the four organs with the smallest voxel fraction in the phantom (BENCHMARKS.md, data pipeline section)
SMALLEST = ("LAG", "RAG", "PSV", "Es")
LABELLED_FOLDS, ALL_LABELLED_FOLDS = (0, 1, 2), (3, 4, 5)


@dataclass(frozen=True)
class Arm:
    key: str
    name: str
    trainer: str
    all_labelled: bool = False
    skcdf: bool = True
    ablation: bool = False  # one run unless --ablation-runs says otherwise

    def folds(self, runs: int) -> Tuple[int, ...]:
        return (ALL_LABELLED_FOLDS if self.all_labelled else LABELLED_FOLDS)[:runs]


ARMS = {a.key: a for a in (
    Arm("a", "nnU-Net (labelled only)", "nnUNetTrainer_conv", skcdf=False),
    Arm("b", "SKCDF 0.2 defaults (constant head EMA)", "SKCDFTrainer_constantHeadEMA_conv"),
    Arm("c", "nnU-Net (all labelled)", "nnUNetTrainer_conv", all_labelled=True, skcdf=False),
    Arm("d", "SKCDF multiply mask", "SKCDFTrainer_multiplyMask_conv"),  # a main arm: the defaults since 0.4.0
    Arm("e1", "SKCDF w/o SKC", "SKCDFTrainer_noSKC_conv", ablation=True),
    Arm("e2", "SKCDF w/o ABC", "SKCDFTrainer_noABC_conv", ablation=True),
    Arm("f", "SKCDF per-head self mode", "SKCDFTrainer_perHeadSelf_conv", ablation=True),
    Arm("g", "SKCDF 0.3 defaults (head EMA step x lr/lr0)", "SKCDFTrainer_lrScaledHeadEMA_conv"),  # a main arm
    Arm("h", "SKCDF no head EMA", "SKCDFTrainer_noHeadEMA_conv", ablation=True),
    Arm("i", "SKCDF consistency weight w = 1", "SKCDFTrainer_cw1_conv", ablation=True),
    Arm("j", "SKCDF + strong intensity view for D_u", "SKCDFTrainer_strongView_conv", ablation=True),
    Arm("k", "SKCDF without the unlabelled loss (w = 0)", "SKCDFTrainer_cw0_conv", ablation=True),
    Arm("l", "SKCDF lambda ramp-up over 50 epochs", "SKCDFTrainer_rampup50_conv", ablation=True),
)}
CURVE_ARMS = ("a", "b", "c", "d", "g", "h", "i", "j", "k", "l")


# ---------------------------------------------------------------------------------------------- set-up
def ext_trainer_path() -> str:
    """``nnUNet_extTrainer`` for the benchmark: the package's trainers and the ``*_conv`` ones here."""
    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    return os.pathsep.join((trainer_folder(), str(REPO / "benchmarks" / "trainers")))


def budget_variables(budget: dict) -> dict:
    """The variables the ``*_conv`` trainers read their budget from (epochs, snapshot epochs)."""
    return {"SKCDF_CONV_EPOCHS": str(budget["epochs"]),
            "SKCDF_CONV_SNAPSHOTS": ",".join(map(str, budget["snapshot_epochs"]))}


def nnunet_paths(work: Path) -> dict:
    """nnU-Net's three folders of a work folder (not created here)."""
    return {var: str(work / var) for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")}


def environment(work: Path, budget: dict, np_: str) -> dict:
    paths = nnunet_paths(work)
    for folder in paths.values():
        Path(folder).mkdir(parents=True, exist_ok=True)
    return {**os.environ, "nnUNet_compile": "false", "nnUNet_def_n_proc": np_,
            "nnUNet_extTrainer": ext_trainer_path(), **budget_variables(budget), **paths}


def fixed_budget(work: Path, iterations: int, points: int) -> dict:
    """The budget of this work folder: written at the first run, refused if a later run asks for another
    (the snapshots and the schedule of finished runs would no longer match)."""
    epochs = max(1, round(iterations / ITERATIONS_PER_EPOCH))
    wanted = {"iterations": epochs * ITERATIONS_PER_EPOCH, "epochs": epochs,
              "snapshot_epochs": sorted({max(1, round(k * epochs / points)) for k in range(1, points + 1)})}
    return _fixed_per_folder(work / "budget.json", wanted, lambda fixed: (
        f"holds another budget ({fixed['iterations']} iterations, snapshots {fixed['snapshot_epochs']}); rerun "
        f"with the same --iterations/--points or use another --work folder."))


def _fixed_per_folder(path: Path, wanted: dict, refusal) -> dict:
    """``wanted`` written to ``path`` at a work folder's first run; a later run wanting something else is refused
    with ``f"{path} " + refusal(fixed)``."""
    if path.exists():
        fixed = json.loads(path.read_text())
        if fixed != wanted:
            raise SystemExit(f"{path} {refusal(fixed)}")
        return fixed
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    atomic_save_json(wanted, str(path))
    return wanted


def task_of(args) -> dict:
    """What the data of a work folder is: phantom size and split. Fixed in ``<work>/task.json`` like the budget."""
    return {"num_train": args.num_train, "num_unlabeled": args.num_unlabeled, "num_test": args.num_test,
            "val": str(args.val), "labeled": str(args.labeled)}


def default_work(labeled: str, iterations: int) -> Path:
    """One work folder per task and budget: ``skcdf_data/convergence_<labeled>lab_<iterations>``."""
    return REPO / "skcdf_data" / f"convergence_{labeled}lab_{iterations}"


def fixed_task(work: Path, task: dict, iterations: int) -> dict:
    return _fixed_per_folder(work / "task.json", task, lambda fixed: (
        "was prepared for another task ("
        + ", ".join(f"{k} {fixed.get(k)} -> {v}" for k, v in task.items() if fixed.get(k) != v)
        + f"); use another --work folder (e.g. {default_work(task['labeled'], iterations).relative_to(REPO)}) or "
        "the same options."))


def arm_task(arm: "Arm", task: dict) -> dict:
    """The task a run of ``arm`` trains on: the upper bound (c) uses every training case, whatever --labeled."""
    return {**task, "labeled": "all"} if arm.all_labelled else task


PHANTOM_KEYS = ("num_train", "num_unlabeled", "num_test")


def prepare(dataset: str, env: dict, log: Path, np_: str, args, data_from: Optional[Path] = None) -> Path:
    """Phantom + plans + preprocessing (once per folder; or copied from ``data_from``, a work folder of the same
    phantom size), then the split of this task, its all-labelled folds, the unlabelled images, the CPU config."""
    raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    found = list(raw.glob(f"Dataset{dataset}_*"))
    if found and (pre / found[0].name / "convergence_split_done").exists():
        return found[0]
    if data_from is not None and not found:
        copy_phantom(data_from, raw, pre, dataset, task_of(args))
    found = list(raw.glob(f"Dataset{dataset}_*"))
    if not (found and (pre / found[0].name / "convergence_planned").exists()):
        sh(["skcdf_make_phantom", "-d", dataset, "-n", "Convergence", "--num-train", str(args.num_train),
            "--num-unlabeled", str(args.num_unlabeled), "--num-test", str(args.num_test), "-np", np_,
            "--overwrite", "--no-progress"], env, log)
        sh(["nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", "3d_fullres", "-np", np_, "-npfp", np_], env, log)
        (pre / next(raw.glob(f"Dataset{dataset}_*")).name / "convergence_planned").touch()
    sh(["skcdf_split", "-d", dataset, "--labeled", str(args.labeled), "--val", str(args.val),
        "--add-unlabeled-images", "--folds", "3", "--fold-mode", "repeat", "--overwrite"], env, log)
    name = next(raw.glob(f"Dataset{dataset}_*")).name
    add_all_labelled_folds(pre / name, raw / name)
    sh(["skcdf_preprocess_unlabeled", "-d", dataset, "-c", "3d_fullres", "-np", np_], env, log)
    sh(["skcdf_add_cpu_config", "-d", dataset, "--overwrite"], env, log)
    (pre / name / "convergence_split_done").touch()
    return raw / name


def copy_phantom(source: Path, raw: Path, pre: Path, dataset: str, task: dict) -> None:
    """The phantom and its preprocessing from another work folder (deterministic: the same data this folder
    would generate), without its split; refused unless that folder was prepared for the same phantom size."""
    import shutil

    try:
        theirs = json.loads((source / "task.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"--data-from {source}: no task.json there (not a convergence work folder, or prepared by "
                         f"an older version); leave --data-from out to generate the phantom here.") from None
    differs = {k: (theirs.get(k), task[k]) for k in PHANTOM_KEYS if theirs.get(k) != task[k]}
    if differs:
        raise SystemExit(f"--data-from {source}: another phantom ({differs}: theirs, this run); leave --data-from "
                         f"out to generate the phantom here.")
    src = list((source / "nnUNet_raw").glob(f"Dataset{dataset}_*"))
    if not src or not (source / "nnUNet_preprocessed" / src[0].name / "nnUNetPlans.json").exists():
        raise SystemExit(f"--data-from {source}: no planned Dataset{dataset} there; leave --data-from out.")
    name = src[0].name
    tmp_raw, tmp_pre = raw / f".{name}.copy{os.getpid()}", pre / f".{name}.copy{os.getpid()}"
    shutil.copytree(src[0], tmp_raw)
    shutil.copytree(source / "nnUNet_preprocessed" / name, tmp_pre,
                    ignore=shutil.ignore_patterns("splits_final.json", "convergence_*"))
    (tmp_pre / "convergence_planned").touch()
    os.replace(tmp_pre, pre / name)  # preprocessed first: the raw folder's presence means 'copied'
    os.replace(tmp_raw, raw / name)


def add_all_labelled_folds(pre: Path, raw: Path) -> None:
    """Folds 3-5 = folds 0-2 with every training case labelled (the hidden-label cases join 'train'), the same
    validation cases, no unlabelled cases: the upper bound (c) on the same data."""
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    path = pre / "splits_final.json"
    splits = json.loads(path.read_text())[:3]
    training = _training_cases(raw)
    extra = [{"train": sorted(f["train"] + [c for c in f["unlabeled"] if c in training]), "val": f["val"],
              "unlabeled": []} for f in splits]
    atomic_save_json(splits + extra, str(path))


def _training_cases(raw: Path) -> set:
    from nnunetv2_skcdf.utilities.dataset_files import training_case_ids

    return set(training_case_ids(str(raw), json.loads((raw / "dataset.json").read_text())))


def hidden_label_cases(pre: Path, raw: Path) -> List[str]:
    fold = json.loads((pre / "splits_final.json").read_text())[0]
    training = _training_cases(raw)
    return sorted(c for c in fold["unlabeled"] if c in training)


# ---------------------------------------------------------------------------------------------- train / predict
def model_folder(env: dict, raw: Path, arm: Arm) -> Path:
    return Path(env["nnUNet_results"]) / raw.name / f"{arm.trainer}__nnUNetPlans__{CONFIG}"


TRAIN_COMMITS = "skcdf_train_commits.json"


def train(dataset: str, arm: Arm, fold: int, raw: Path, env: dict, log: Path) -> None:
    fold_dir = model_folder(env, raw, arm) / f"fold_{fold}"
    if not (fold_dir / "checkpoint_final.pth").exists():
        record_train_commit(fold_dir)
        sh(["nnUNetv2_train", dataset, CONFIG, str(fold), "-tr", arm.trainer, "-device", "cpu", "--c"],
           {**env, "nnUNet_n_proc_DA": "0"}, log)


def record_train_commit(fold_dir: Path) -> None:
    """Appends the commit this training session starts from, and whether tracked files differed from it, to the
    run's ``skcdf_train_commits.json`` (one entry per start or resume): a run may span sessions, and its store
    file is written at the end by whatever commit is checked out then."""
    from convergence_report import commit
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    path = fold_dir / TRAIN_COMMITS
    entries = json.loads(path.read_text()) if path.exists() else []
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, capture_output=True).returncode != 0
    entries.append({"commit": commit(), "tracked_changes": dirty, "date": datetime.datetime.now().isoformat(
        timespec="seconds")})
    fold_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_json(entries, str(path))


def predict_final(dataset: str, arm: Arm, fold: int, raw: Path, work: Path, env: dict, log: Path) -> Path:
    pred = work / "predictions" / f"{arm.key}_fold{fold}"
    if not (pred / "done").exists():
        sh(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", dataset, "-c", CONFIG, "-f",
            str(fold), "-tr", arm.trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env, log)
        (pred / "done").touch()
    return pred


def schedule(arms: List[str], runs: int, ablation_runs: int) -> List[Tuple[Arm, int]]:
    """Run-major: every run of the main arms before the next run, ablations last; a benchmark cut short
    still compares (a), (b) and (c) over the runs it finished."""
    main = [ARMS[k] for k in arms if not ARMS[k].ablation]
    ablations = [ARMS[k] for k in arms if ARMS[k].ablation]
    order = [(arm, arm.folds(runs)[r]) for r in range(runs) for arm in main]
    return order + [(arm, fold) for arm in ablations for fold in arm.folds(ablation_runs)]


def stores_run(stages: List[str], arm: Arm) -> bool:
    """A run is stored once its final predictions are made and, for an arm with learning curves, its curve too; an
    ablation arm has no curve, so ``--stages train final`` stores it."""
    return "final" in stages and ("curves" in stages or arm.key not in CURVE_ARMS)


def curves(arm: Arm, fold: int, raw: Path, env: dict, work: Path, budget: dict, hidden: List[str]) -> None:
    """Snapshot evaluation in a child process (its own nnU-Net environment), cached per snapshot; an SKCDF arm's
    curve has the pseudo-label diagnostics on the ``hidden`` cases unless none are given (--no-pseudo-curves)."""
    out = work / "curves" / f"{arm.key}_fold{fold}.json"
    cmd = [sys.executable, str(REPO / "benchmarks" / "convergence_eval.py"), "--model",
           str(model_folder(env, raw, arm)), "--fold", str(fold), "--raw", str(raw), "--out", str(out),
           "--epochs", ",".join(map(str, budget["snapshot_epochs"])), "--final-epoch", str(budget["epochs"])]
    if arm.skcdf and hidden:
        cmd += ["--hidden", *hidden]
    subprocess.run(cmd, env=env, check=True)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="962")
    parser.add_argument("--iterations", type=int, default=8000, help="training iterations of every arm (8000: "
                        "(a) and (c) meet the last-quarter criterion on the phantom, and 12000 adds under 1 point to "
                        "either; 4000 is the short-budget regime of the first stored runs)")
    parser.add_argument("--points", type=int, default=8, help="snapshots for the learning curves")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--runs", type=int, default=3, help="runs of the main arms a, b, c, d, g")
    parser.add_argument("--ablation-runs", type=int, default=1)
    parser.add_argument("--num-train", type=int, default=24)
    parser.add_argument("--num-unlabeled", type=int, default=12)
    parser.add_argument("--num-test", type=int, default=8)
    parser.add_argument("--labeled", default="4", help="labelled cases (count or fraction of the non-val ones)")
    parser.add_argument("--val", default="4")
    parser.add_argument("--stages", nargs="+", default=["train", "curves", "final", "report"],
                        choices=["train", "curves", "final", "report", "reevaluate"],
                        help="reevaluate (never by default): stored runs whose predictions are still in the work "
                        "folder get skcdf_evaluate's current metrics (e.g. islands); every metric they already have "
                        "must come out the same")
    parser.add_argument("--no-pseudo-curves", action="store_true", help="SKCDF arms' curves on the test set only, "
                        "without D_l's pseudo-label Dice on the hidden-label training cases (18 of the 26 cases each "
                        "snapshot predicts on the 2-labelled task): for a run that must be evaluated before its session ends (the snapshots "
                        "do not outlive it); the report's diagnostics then come from another stored run of the arm. "
                        "A snapshot already evaluated keeps what it has")
    parser.add_argument("--work", help="work folder (default: skcdf_data/convergence_<labeled>lab_<iterations>); "
                        "one budget and one task (phantom size, split) per folder")
    parser.add_argument("--data-from", help="copy the phantom and its preprocessing from this work folder (same "
                        "--num-train/--num-unlabeled/--num-test) instead of generating them: another --labeled only "
                        "needs its own split")
    parser.add_argument("-np", default="2")
    parser.add_argument("--threads", type=int, help="torch threads of each training (default: all cores, as "
                        "nnU-Net; 1 when other jobs share the machine: contended 2-thread barriers are 5-10x slower)")
    args = parser.parse_args()

    work = Path(args.work) if args.work else default_work(args.labeled, args.iterations)
    budget = fixed_budget(work, args.iterations, args.points)
    task = fixed_task(work, task_of(args), args.iterations)  # the same name as default_work
    env = environment(work, budget, args.np)
    if args.threads:
        env["SKCDF_CONV_THREADS"] = str(args.threads)
    log = work / "convergence.log"
    t0 = time.perf_counter()
    raw = prepare(args.dataset, env, log, args.np, args, Path(args.data_from) if args.data_from else None)
    pre = Path(env["nnUNet_preprocessed"]) / raw.name
    hidden = hidden_label_cases(pre, raw)
    for arm, fold in schedule(args.arms, args.runs, args.ablation_runs):
        if stored(arm, fold, budget, task):
            print(f"{arm.key} ({arm.name}) fold {fold}: stored in {STORE.name}/", flush=True)
            if "reevaluate" in args.stages:
                reevaluate(arm, fold, raw, work, env, log, budget, task, args.np)
            continue
        if "train" in args.stages:
            train(args.dataset, arm, fold, raw, env, log)
        if not (model_folder(env, raw, arm) / f"fold_{fold}" / "checkpoint_final.pth").exists():
            print(f"{arm.key} fold {fold}: not trained yet", flush=True)
            continue
        if "curves" in args.stages and arm.key in CURVE_ARMS:
            curves(arm, fold, raw, env, work, budget, [] if args.no_pseudo_curves else hidden)
        if "final" in args.stages:
            predict_final(args.dataset, arm, fold, raw, work, env, log)
        if stores_run(args.stages, arm):
            store_run(arm, fold, raw, work, env, log, budget, task, args.np)
            print(f"{arm.key} ({arm.name}) fold {fold}: done and stored", flush=True)
        elif "final" in args.stages:
            print(f"{arm.key} fold {fold}: predicted, not stored: a curve arm is stored with --stages curves final",
                  flush=True)
    if "report" in args.stages:
        from convergence_report import report

        report(args, budget, task, load_store(budget, task), load_store(budget, task, same=False), raw, work,
               time.perf_counter() - t0)


# ---------------------------------------------------------------------------------------------- the store
def store_file(arm: Arm, fold: int, budget: dict, task: dict) -> Path:
    """One file per arm, fold, task and budget (``a_fold0_4lab_4000it.json``, ``c_fold3_alllab_4000it.json``): a
    longer-budget check or a harder task is stored beside the main runs, never over them."""
    return STORE / f"{arm.key}_fold{fold}_{arm_task(arm, task)['labeled']}lab_{budget['iterations']}it.json"


def stored(arm: Arm, fold: int, budget: dict, task: dict) -> bool:
    path = store_file(arm, fold, budget, task)
    if not path.exists():
        return False
    run = json.loads(path.read_text())
    return run["budget"] == budget and run["task"] == arm_task(arm, task)


def store_run(arm: Arm, fold: int, raw: Path, work: Path, env: dict, log: Path, budget: dict, task: dict,
              np_: str) -> None:
    """One finished run -> its store file (atomic): what the report needs, without the checkpoints."""
    import torch

    from convergence_report import commit
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    fold_dir = model_folder(env, raw, arm) / f"fold_{fold}"
    evaluation = work / "predictions" / f"{arm.key}_fold{fold}"  # skcdf_evaluate without -o writes there
    if not (evaluation / "summary.json").exists():
        sh(["skcdf_evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(evaluation), "-np", np_], env, log)
    checkpoint = torch.load(fold_dir / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    logging = checkpoint["logging"]
    log_text = "\n".join(p.read_text() for p in sorted(fold_dir.glob("training_log_*.txt")))
    rates = re.findall(r"SKCDF class keep-rates: (\[[^\]]*\])", log_text)
    epoch_s = np.array(logging["epoch_end_timestamps"]) - np.array(logging["epoch_start_timestamps"])
    curve = work / "curves" / f"{arm.key}_fold{fold}.json"
    STORE.mkdir(parents=True, exist_ok=True)
    atomic_save_json({
        "arm": arm.key, "name": arm.name, "trainer": arm.trainer, "fold": fold, "budget": budget,
        "task": arm_task(arm, task),
        "commit": commit(), "date": datetime.date.today().isoformat(), "machine": machine(),
        "train_commits": json.loads((fold_dir / TRAIN_COMMITS).read_text()) if (fold_dir / TRAIN_COMMITS).exists()
        else None,  # runs trained before this was recorded: None
        "train_epoch_s_median": float(np.median(epoch_s)),
        "curve": json.loads(curve.read_text()) if curve.exists() else None,
        "final_summary": json.loads((evaluation / "summary.json").read_text()),
        "lambda": [float(x) for x in logging.get("consistency_weight", [])],
        "train_pseudo_fractions": logging.get("pseudo_label_fractions", []),
        "keep_rates": json.loads(rates[-1]) if rates else None,
        "prediction_folder": str(work / "predictions" / f"{arm.key}_fold{fold}")},
        str(store_file(arm, fold, budget, task)))


def reevaluate(arm: Arm, fold: int, raw: Path, work: Path, env: dict, log: Path, budget: dict, task: dict,
               np_: str) -> bool:
    """A stored run's final predictions evaluated again with the current ``skcdf_evaluate``: its
    ``final_summary`` gains the metrics added since (``final_summary_reevaluated`` records when). Refused,
    store unchanged, if the predictions are gone or any metric the run already had comes out different."""
    import shutil

    from convergence_report import commit
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    path = store_file(arm, fold, budget, task)
    run = json.loads(path.read_text())
    pred = Path(run["prediction_folder"])
    if not (pred / "done").exists():
        print(f"{arm.key} fold {fold}: not re-evaluated, its predictions are not here ({pred})", flush=True)
        return False
    out = work / "reevaluate" / f"{arm.key}_fold{fold}"
    shutil.rmtree(out, ignore_errors=True)
    sh(["skcdf_evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(pred), "--method", "run", "-o", str(out),
        "-np", np_, "--no-plot"], env, log)
    new = json.loads((out / "runs" / "run_run1" / "summary.json").read_text())
    changed = summary_changes(run["final_summary"], new)
    if changed:
        print(f"{arm.key} fold {fold}: not re-evaluated, metrics it already had differ: {changed[:5]}", flush=True)
        return False
    run["final_summary"] = new
    run["final_summary_reevaluated"] = {"commit": commit(), "date": datetime.date.today().isoformat()}
    atomic_save_json(run, str(path))
    print(f"{arm.key} fold {fold}: re-evaluated, {STORE.name}/{path.name} updated", flush=True)
    return True


def summary_changes(old: dict, new: dict) -> List[str]:
    """``case/class/metric`` entries of ``old``'s per-case metrics that ``new`` lacks or has another value
    for (NaN equals NaN)."""
    if len(old["metric_per_case"]) != len(new["metric_per_case"]):
        return ["number of cases"]
    changes = []
    for a, b in zip(old["metric_per_case"], new["metric_per_case"]):
        case = Path(a["prediction_file"]).name
        if Path(b["prediction_file"]).name != case:
            changes.append(f"{case}: case order")
            continue
        for key, metrics in a["metrics"].items():
            for name, value in metrics.items():
                other = b["metrics"].get(key, {}).get(name)
                if other is None or not (value == other or (np.isnan(value) and np.isnan(other))):
                    changes.append(f"{case}/{key}/{name}: {value} -> {other}")
    return changes


def load_store(budget: dict, task: dict, same: bool = True) -> Dict[str, list]:
    """{arm: [stored run, ...]} of this task and budget (``same``) or of this task and every other budget."""
    runs: Dict[str, list] = {}
    for path in sorted(STORE.glob("*_fold*_*lab_*it.json")):
        run = json.loads(path.read_text())
        if run["arm"] in ARMS and run["task"] == arm_task(ARMS[run["arm"]], task) \
                and (run["budget"] == budget) == same:
            runs.setdefault(run["arm"], []).append(run)
    return runs


if __name__ == "__main__":
    main()
