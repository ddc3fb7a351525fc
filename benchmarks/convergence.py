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
  p  the practitioner's baseline (issues 38, 44): 2 rounds of filtered pseudo-labelling with ``skcdf_pseudolabel``
     and stock nnU-Net students (``nnUNetTrainer_conv``: (a)'s trainer and budget); with curves. Round 1: teachers
     = (a)'s model folder, folds 0-2 (trained in this work folder first where their checkpoints are not here: a
     stored run is a result, not a checkpoint), student dataset <-d>+1 with 3 identical folds, its 3 students;
     round 2: teachers = those 3 students, ``--previous`` round 1, student dataset <-d>+2, whose students are the
     (p) runs (folds 0-2), evaluated on the source's imagesTs like every arm. The rounds are made once per work
     folder and shared by the (p) runs; each store file of (p) keeps both rounds (kept cases per site, their
     pseudo labels' Dice against the hidden labels, wall times, the teachers' runs, round 1's students' test
     Dice). Threshold: skcdf_pseudolabel's default 0.90, chosen a priori there (issue 38); tuning it on hidden or
     test labels would leak them, and issue 44 asks for the recipe as users run it. Several teachers per round
     matter: the *_conv trainers have no mirroring, so one model alone would be one member agreeing with itself
     (score 1, every case kept). Round 1 is made with ``--student-unlabeled`` (the dropped cases are also the
     student dataset's unlabelled images; a stock nnU-Net student does not read them), for arm q; round 2 without
     it (no SKCDF student reads round 2). Teachers predict on the CPU (``-device cpu``), as the trainings run. The
     (p) runs are the students of one chain: they differ by the student's seed only, so their spread understates
     what another chain (other teachers' seeds, other kept cases) would vary by
  q  issue 39's combination candidate: SKCDF (d's trainer and settings) as the student of (p)'s round 1 (the same
     round dataset: labelled + kept pseudo-labelled cases as labels, the cases the filter dropped as unlabelled
     images); with curves. One round, so it is ready as soon as round 1 is
  r  issue 39's appearance candidate: SKCDF 0.4 with each labelled sample mapped onto the intensity distribution of
     the case of an unlabelled sample of the step with probability 0.5 (``SKCDFTrainer_histMatch``); with curves
  s  the same appearance transfer in stock nnU-Net (``nnUNetTrainer_histMatch``): what (r) owes to it alone; with
     curves
  t  issue 39's mixing candidate: SKCDF 0.4 with a box of a labelled sample (2/3 of the patch per axis) pasted into
     every unlabelled sample before the labelled pass, D_u taught the true labels inside the box and the pseudo
     labels outside (``SKCDFTrainer_copyPaste``; after bidirectional copy-paste's labelled-into-unlabelled
     direction); with curves
  u  issue 39's filter candidate: SKCDF 0.4 with the pseudo-label voxels whose softmax maximum is below 0.95 left
     out of D_u's losses (``SKCDFTrainer_confidence``, FixMatch's threshold); with curves
  v  SKCDF with the reference code's settings (``SKCDFTrainer_reference``: constant head EMA step, per-head self
     mode, multiplied masking; every setting pinned): "the paper" inside nnU-Net, the row issue 39's new default is
     compared with; with curves
  w  issue 39's second combination candidate: SKCDF as the teacher of a pseudo-label round, the recipe's stock
     nnU-Net students: one round of ``skcdf_pseudolabel`` (same threshold and flags as (p)) whose teachers are (d)'s
     runs, folds 0-2 of this work folder (trained here first where missing), its own student dataset (<-d>+11,
     ``...PseudoR1fromD``) and 3 identical student folds, the (w) runs; with curves. The model a user would ship is
     a stock nnU-Net (prediction cost 1x); the chain costs (d)'s 3 runs, which the comparison trains anyway
  x  the recipe without a filter: (p)'s chain with every case kept in both rounds (``--keep 1.0``: FLARE22's
     winner kept every case between rounds, nnU-Net issue #2233 names no filter), its own round datasets
     (<-d>+21, <-d>+22, ``...PseudoR1Keep100``); round 1's teachers are (a)'s runs, as for (p). Run when (p)'s
     round 1 keeps under 25 % of its pool or no case of some site (BENCHMARKS_FINDINGS.md, item 37); a claim of
     SKCDF over the recipe then holds against the better of (p) and (x)
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

    python benchmarks/convergence.py [--labeled 4] [--iterations 8000] [--points 8] \
        [--arms a c b d e1 e2 f g h i j k l p q r s t u v w] [--runs 3] [--sites all --labelled-site A]
Budget: 8000 iterations by default, the budget at which (a) meets the last-quarter criterion on this phantom
(< 1 mean Dice point); the all-labelled bound (c) does not meet it there, and 12000 (``--iterations 12000``) is
the longer-budget check (each arm's last-quarter gain and its longer-budget figures: the generated tables of
documentation/results.md); the first stored runs have 4000 (the short-budget regime):
    python benchmarks/convergence.py --labeled 2 --iterations 4000 --work skcdf_data/convergence_2lab --stages report
One work folder per task and budget (default ``skcdf_data/convergence_<labelled>lab_<iterations>``):
``<work>/task.json`` and ``<work>/budget.json`` are fixed at its first run.

The multi-site task (issue 44, ``--sites``): the phantom of ``skcdf_make_phantom --sites`` (``all`` = A portal-venous,
B arterial / thin slices, C non-contrast low dose, D delayed / oncology; case i of every role from site i mod 4;
per-case sites in ``phantom_cases.json``), by default 40 training cases (10 per site), 16 test cases (4 per site)
and 24 imagesUnlabeled images (6 per site). Validation = the first --val training cases of --labelled-site, labelled
= its next --labeled (a practitioner labels and validates on their own site; validation first, so that it and the
bound (c) are the same for every labelled count); every other training case, of every site, has its label hidden
and with every imagesUnlabeled image forms the unlabelled pool. These lists are written from phantom_cases.json in
the published-list format and imported with ``skcdf_split --import-lists``. (c) trains on every non-validation
training case (all sites). Names: work folder ``skcdf_data/convergence_4lab-siteA-ms_8000``, store files
``a_fold0_4lab-siteA-ms_8000it.json``, ``c_fold3_alllab-siteA-ms_8000it.json``, report and BENCHMARKS.md section
``convergence_4lab-siteA-ms_8000it`` (the original task keeps its names). Its report adds Dice per site (test cases
grouped by site) and per site and organ, SKCDF's pseudo-label Dice per site, (p)'s rounds, the (a) -> (c) room check
(>= 10 points; reported, not enforced) and training hours per arm. Its budget is 12000 iterations: the labelled-only
model's 8000-iteration run ended several points below its 12000-iteration run (BENCHMARKS.md, the task's two
sections), so the runs from 2026-12-07 on use ``--iterations 12000`` (work folder ``..._12000``; the 8000-iteration
runs stay stored as the shorter budget). Both (a) runs at 12000 still gain +2.6 and +2.8 over their last quarter,
so (a) fold 0 also runs at 16000 iterations, the longer-budget check of 12000 (``--iterations 16000 --data-from
skcdf_data/convergence_4lab-siteA-ms_12000 --arms a --runs 1``: the same phantom and split, its own work folder); the
report's regime line decides on both (it ended +0.2 over 12000: 12000 stays). Two single-thread runs side by side
share the 2 cores, in one work folder once it is prepared (or one run of ``--threads 2`` at a time, nothing else
running: about as many runs per hour, each done sooner; example_commands.md). With 4 labelled cases the room
(a) -> (c) over 3 runs each was 8.8 points, under 10, so by the rule fixed beforehand the comparison runs with 2
labelled cases of site A (``--labeled 2``; BENCHMARKS_FINDINGS.md item 34; (c)'s runs serve both):
    M="--sites all --labelled-site A --labeled 2 --iterations 12000"
    python benchmarks/convergence.py $M --stages prepare                  # phantom, plans, split (once)
    python benchmarks/convergence.py $M --arms a --runs 1 --threads 1     # (a) fold 0 (--runs 3: folds 0-2)
    python benchmarks/convergence.py $M --arms c --runs 1 --threads 1     # (c) fold 3
    python benchmarks/convergence.py $M --arms d --runs 1 --threads 1     # (d) fold 0, with the pseudo-label curves
    python benchmarks/convergence.py $M --arms d --runs 3 --threads 1 --no-pseudo-curves --curve-every 2  # (d) 1-2
    # (an SKCDF curve with the diagnostics predicts 16 test + 32 hidden-label cases per snapshot: ~22 min per
    # snapshot on one thread, ~3 h per run; the test curve alone ~1 h. One run's diagnostics serve the report)
    # Runs after an arm's first: --curve-every 2 (4 of the 8 snapshots, the 3/4 point and the final one among
    # them: the plateau criterion is unchanged, the curve costs ~30 min instead of ~1 h per run; the arm's mean
    # curve then has those 4 points, its first run's 8-point curve stays in its store file)
    python benchmarks/convergence.py $M --arms p --runs 3 --threads 1     # (p): after (a)'s folds 0-2 (its teachers)
    python benchmarks/convergence.py $M --arms a c d p --stages report     # the section, when runs are stored
(p) on the original 2-labelled task (1 run; this work folder trains (a)'s 3 teachers first, the stored (a) runs'
checkpoints being gone): ``python benchmarks/convergence.py --labeled 2 --arms p --runs 1 --threads 1``.
Processes side by side in one work folder share its work: the process that runs a run (arm x fold), trains one of
(p)'s teachers or students, or makes one of its rounds claims it (``<work>/claims/<name>.json``: pid, command) until
it is done; another process skips what is claimed and takes the next free item (e.g. two ``--arms p --runs 3``
processes train different students of a round). A claim whose process is gone (killed, machine restarted) is taken
over. Stop a lane by its process group (start it with ``setsid``, stop it with ``kill -- -<pgid>``), not by this
script's pid alone: its running child (``nnUNetv2_train``, ``skcdf_pseudolabel``) would go on, and a lane started
again would take the claim over and run the same work beside it. A section's plan (the arms and runs it expects)
is stated by a command that trains nothing (``--stages report``, ``--stages reevaluate report``); a command that
trains adds its arms to that plan and never shrinks it.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Tuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from data_pipeline import REPO, machine, sh  # noqa: E402
from trainers.convergence_trainers import ITERATIONS_PER_EPOCH  # noqa: E402
from convergence_common import (ALL_LABELLED_FOLDS, ARMS, CASES_FILE, LABELLED_FOLDS, SMALLEST, Arm,  # noqa: E402,F401
                                _nanmean, case_sites, checkpoint_identity, commit, dice_by_site, sites_tag,
                                task_tag, chain_key, chain_tag)
# imported with the rest, not at the report stage: a lane that runs for hours reports with the report module it
# started with, even if the benchmark's files change meanwhile (a lazy import once mixed an old convergence_common
# with a newer report module and failed after the run was stored). The package's modules, which the report imports
# lazily, can still change under a running lane (an editable install): restart lanes after changing them
from convergence_report import report  # noqa: E402

CONFIG = "3d_cpu"
RESULTS = REPO / "benchmarks" / "results"
STORE = RESULTS / "convergence"
CURVE_ARMS = ("a", "b", "c", "d", "g", "h", "i", "j", "k", "l", "p", "q", "r", "s", "t", "u", "v", "w", "x")
#: arm (p): round 1's teachers are the (a) runs (its model folder's folds 0-2), each round writes
#: ``P_STUDENT_FOLDS`` identical student folds; the round-1 students (all of them) teach round 2, whose
#: students are the (p) runs. The threshold is skcdf_pseudolabel's default (0.90, chosen a priori there).
P_TEACHER_FOLDS, P_STUDENT_FOLDS = LABELLED_FOLDS, 3
#: every pseudo-labelling chain (``convergence_common.chain_key``: round-1 teacher arm, keep rule) writes its round r
#: as dataset source id + offset + r, with its tag in the name, so that chains never share a round
CHAIN_DATASET_OFFSET = {"a": 0, "d": 10, "aKeep100": 20}
ROUND_DONE = "convergence_round_done"


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


#: phantom sizes when --num-train/--num-unlabeled/--num-test are not given: the original task, the multi-site one
#: (40 training cases = 10 per site, 16 test cases = 4 per site, 24 imagesUnlabeled = 6 per site)
SIZES = {"num_train": 24, "num_unlabeled": 12, "num_test": 8}
MULTISITE_SIZES = {"num_train": 40, "num_unlabeled": 24, "num_test": 16}


def task_of(args) -> dict:
    """What the data of a work folder is: phantom size and split. Fixed in ``<work>/task.json`` like the budget.
    The original task has exactly the keys it had before the multi-site task existed (its stored runs match on
    it); a multi-site task (``--sites``) adds the sites, in the phantom's order, and the labelled site."""
    sizes = MULTISITE_SIZES if getattr(args, "sites", None) else SIZES
    task = {k: sizes[k] if getattr(args, k) is None else getattr(args, k) for k in ("num_train", "num_unlabeled",
                                                                                     "num_test")}
    task.update({"val": str(args.val), "labeled": str(args.labeled)})
    if not getattr(args, "sites", None):
        if getattr(args, "labelled_site", None):
            raise SystemExit("--labelled-site needs --sites (the multi-site phantom).")
        return task
    from nnunetv2_skcdf.dataset_conversion.phantom_sites import check_sites
    from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

    try:
        sites = [site.name for site in check_sites(args.sites)]
    except SKCDFInputError as e:
        raise SystemExit(str(e)) from None
    labelled_site = args.labelled_site or sites[0]
    if labelled_site not in sites:
        raise SystemExit(f"--labelled-site {labelled_site} is not one of --sites {' '.join(sites)}.")
    if not (task["labeled"].isdigit() and task["val"].isdigit()):
        raise SystemExit("the multi-site task takes --labeled and --val as counts of the labelled site's cases.")
    if task["num_test"] < len(sites):
        raise SystemExit(f"--num-test {task['num_test']}: the test set must cover every site ({len(sites)}); case i "
                         f"comes from site i mod {len(sites)}, so give at least {len(sites)} (16 by default).")
    from nnunetv2_skcdf.dataset_conversion.phantom_sites import SITES_VERSION

    # the site generator's version: runs stored for one version never match data of another
    return {**task, "sites": sites, "labelled_site": labelled_site, "sites_version": SITES_VERSION}


def default_work(task: dict, iterations: int) -> Path:
    """One work folder per task and budget: ``skcdf_data/convergence_<task tag>_<iterations>``
    (``convergence_2lab_8000``, ``convergence_4lab-siteA-ms_8000``)."""
    return REPO / "skcdf_data" / f"convergence_{task_tag(task)}_{iterations}"


def fixed_task(work: Path, task: dict, iterations: int) -> dict:
    return _fixed_per_folder(work / "task.json", task, lambda fixed: (
        "was prepared for another task ("
        + ", ".join(f"{k} {fixed.get(k)} -> {v}" for k, v in task.items() if fixed.get(k) != v)
        + f"); use another --work folder (e.g. {default_work(task, iterations).relative_to(REPO)}) or "
        "the same options."))


def arm_task(arm: "Arm", task: dict) -> dict:
    """The task a run of ``arm`` trains on: the upper bound (c) uses every training case, whatever --labeled."""
    return {**task, "labeled": "all"} if arm.all_labelled else task


PHANTOM_KEYS = ("num_train", "num_unlabeled", "num_test", "sites", "sites_version")


def prepare(dataset: str, env: dict, log: Path, np_: str, args, data_from: Optional[Path] = None) -> Path:
    """Phantom + plans + preprocessing (once per folder; or copied from ``data_from``, a work folder of the same
    phantom size), then the split of this task, its all-labelled folds, the unlabelled images, the CPU config.
    The multi-site task's split is imported by ``skcdf_split --import-lists`` from lists written here
    (:func:`multisite_lists`: validation and labelled cases from the labelled site)."""
    task = task_of(args)
    raw, pre = Path(env["nnUNet_raw"]), Path(env["nnUNet_preprocessed"])
    found = list(raw.glob(f"Dataset{dataset}_*"))
    if found and (pre / found[0].name / "convergence_split_done").exists():
        return found[0]
    if data_from is not None and not found:
        copy_phantom(data_from, raw, pre, dataset, task)
    found = list(raw.glob(f"Dataset{dataset}_*"))
    if not (found and (pre / found[0].name / "convergence_planned").exists()):
        sh(["skcdf_make_phantom", "-d", dataset, "-n", "Convergence", "--num-train", str(task["num_train"]),
            "--num-unlabeled", str(task["num_unlabeled"]), "--num-test", str(task["num_test"]), "-np", np_,
            "--overwrite", "--no-progress"] + (["--sites", *task["sites"]] if task.get("sites") else []), env, log)
        sh(["nnUNetv2_plan_and_preprocess", "-d", dataset, "-c", "3d_fullres", "-np", np_, "-npfp", np_], env, log)
        (pre / next(raw.glob(f"Dataset{dataset}_*")).name / "convergence_planned").touch()
    name = next(raw.glob(f"Dataset{dataset}_*")).name
    if task.get("sites"):
        cases = json.loads((raw / name / CASES_FILE).read_text())["cases"]
        check_test_sites(cases, task["sites"])
        ratio = task_tag(task)
        folder = pre / name / "convergence_lists"
        write_lists(multisite_lists(cases, task["labelled_site"], int(task["labeled"]), int(task["val"])), folder,
                    ratio)
        sh(["skcdf_split", "-d", dataset, "--import-lists", str(folder), "--ratio", ratio, "--add-unlabeled-images",
            "--folds", "3", "--fold-mode", "repeat", "--overwrite"], env, log)
    else:
        sh(["skcdf_split", "-d", dataset, "--labeled", str(args.labeled), "--val", str(args.val),
            "--add-unlabeled-images", "--folds", "3", "--fold-mode", "repeat", "--overwrite"], env, log)
    add_all_labelled_folds(pre / name, raw / name)
    sh(["skcdf_preprocess_unlabeled", "-d", dataset, "-c", "3d_fullres", "-np", np_], env, log)
    sh(["skcdf_add_cpu_config", "-d", dataset, "--overwrite"], env, log)
    (pre / name / "convergence_split_done").touch()
    return raw / name


# ---------------------------------------------------------------------------------------------- multi-site task
def multisite_lists(cases: dict, labelled_site: str, labeled: int, val: int) -> Dict[str, List[str]]:
    """The multi-site split from ``phantom_cases.json``'s cases: validation = the first ``val`` training cases of
    ``labelled_site`` (by case number), labelled = its next ``labeled``; every other training case, of every
    site, has its label hidden (``unlabeled``; ``skcdf_split --add-unlabeled-images`` adds imagesUnlabeled).
    Validation before the labelled cases: the validation cases, and with them the bound (c) trained on every
    other training case, are then the same for every labelled count (as on the original task)."""
    training = sorted(c for c, rec in cases.items() if rec["role"] == "tr")
    own = [c for c in training if cases[c]["site"] == labelled_site]
    if len(own) < val + labeled:
        raise SystemExit(f"site {labelled_site} has {len(own)} training cases, fewer than --val {val} + --labeled "
                         f"{labeled}: give more training cases (--num-train) or fewer of either.")
    chosen = {"val": own[:val], "labeled": own[val:val + labeled]}
    taken = set(chosen["val"]) | set(chosen["labeled"])
    return {**chosen, "unlabeled": [c for c in training if c not in taken]}


def write_lists(lists: Dict[str, List[str]], folder: Path, ratio: str) -> None:
    """``labeled_<ratio>.txt``, ``unlabeled_<ratio>.txt`` and ``eval.txt`` (the published-list format
    ``skcdf_split --import-lists`` reads), one id per line."""
    from nnunetv2_skcdf.splits.published_lists import list_file_names

    names = list_file_names(ratio)
    folder.mkdir(parents=True, exist_ok=True)
    for role in ("labeled", "unlabeled", "val"):
        (folder / names[role]).write_text("".join(f"{c}\n" for c in lists[role]))


def check_test_sites(cases: dict, sites: List[str]) -> Dict[str, int]:
    """Test cases per site; refused unless every site of the task has one."""
    counts = {site: sum(1 for rec in cases.values() if rec["role"] == "ts" and rec["site"] == site) for site in sites}
    if not all(counts.values()):
        raise SystemExit(f"the test set must cover every site: test cases per site {counts} (give more --num-test).")
    return counts


def copy_phantom(source: Path, raw: Path, pre: Path, dataset: str, task: dict) -> None:
    """The phantom and its preprocessing from another work folder (deterministic: the same data this folder
    would generate), without its split; refused unless that folder was prepared for the same phantom size."""
    import shutil

    try:
        theirs = json.loads((source / "task.json").read_text())
    except FileNotFoundError:
        raise SystemExit(f"--data-from {source}: no task.json there (not a convergence work folder, or prepared by "
                         f"an older version); leave --data-from out to generate the phantom here.") from None
    differs = {k: (theirs.get(k), task.get(k)) for k in PHANTOM_KEYS if theirs.get(k) != task.get(k)}
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
def round_dataset(source: str, r: int, chain: str = "a") -> Tuple[str, str]:
    """(id, folder name) of the student dataset ``skcdf_pseudolabel`` writes in round ``r`` from the source dataset
    folder ``source`` (``Dataset962_Convergence`` -> ``963``, ``Dataset963_ConvergencePseudoR1``); a chain taught
    by another arm than (a) in round 1, or keeping every case, gets its own ids and names (chain ``d``: ``973``,
    ``Dataset973_ConvergencePseudoR1fromD``; chain ``aKeep100``: ``983``, ``...PseudoR1Keep100``)."""
    if chain not in CHAIN_DATASET_OFFSET:
        raise ValueError(f"no round datasets for the pseudo-labelling chain {chain!r}: add it to CHAIN_DATASET_OFFSET")
    number, name = source[len("Dataset"):].split("_", 1)
    first = int(number) + CHAIN_DATASET_OFFSET[chain] + 1
    out = first + r - 1
    if out > 999:
        raise SystemExit(f"a pseudo-labelling arm writes its rounds as datasets {first}..{out}: over nnU-Net's 999; "
                         f"use a smaller -d.")
    return str(out), f"Dataset{out:03d}_{name}PseudoR{r}{chain_tag(chain)}"


def arm_dataset(dataset: str, raw: Path, arm: Arm) -> Tuple[str, str]:
    """(id, folder name) of the dataset ``arm`` trains on: the source, or for a pseudo-labelling arm ((p), (q), (w))
    its last round's student dataset."""
    return round_dataset(raw.name, arm.pseudo_rounds, chain_key(arm)) if arm.pseudo_rounds else (dataset, raw.name)


def student_arm(arm: Arm, r: int) -> Arm:
    """The students of round ``r`` of a pseudo-labelling arm: the arm itself for its last round, otherwise the
    teachers of round ``r + 1`` (trained like it, never stored as a run of their own)."""
    if r == arm.pseudo_rounds:
        return arm
    return Arm(f"{arm.key}{r}", f"{arm.name}: round-{r} student", arm.trainer, skcdf=False, pseudo_rounds=r,
               teacher=arm.teacher, keep=arm.keep)


def model_folder(env: dict, raw: Path, arm: Arm) -> Path:
    return Path(env["nnUNet_results"]) / arm_dataset("", raw, arm)[1] / f"{arm.trainer}__nnUNetPlans__{CONFIG}"


TRAIN_COMMITS = "skcdf_train_commits.json"


def train(dataset: str, arm: Arm, fold: int, raw: Path, env: dict, log: Path) -> None:
    fold_dir = model_folder(env, raw, arm) / f"fold_{fold}"
    if not (fold_dir / "checkpoint_final.pth").exists():
        record_train_commit(fold_dir, env.get("SKCDF_CONV_THREADS"))
        sh(["nnUNetv2_train", arm_dataset(dataset, raw, arm)[0], CONFIG, str(fold), "-tr", arm.trainer, "-device",
            "cpu", "--c"], {**env, "nnUNet_n_proc_DA": "0"}, log)


def train_seconds(fold_dir: Path) -> Optional[float]:
    """Training time of a finished run: the sum of its epochs' durations (nnU-Net's own timestamps)."""
    import torch

    path = fold_dir / "checkpoint_final.pth"
    if not path.exists():
        return None
    logging = torch.load(path, map_location="cpu", weights_only=False)["logging"]
    return float(np.sum(np.array(logging["epoch_end_timestamps"]) - np.array(logging["epoch_start_timestamps"])))


def record_train_commit(fold_dir: Path, threads: Optional[str] = None) -> None:
    """Appends the commit this training session starts from, whether tracked files differed from it, and its torch
    threads (``--threads``; None: nnU-Net's default, every core) to the run's ``skcdf_train_commits.json`` (one
    entry per start or resume): a run may span sessions, and its store file is written at the end by whatever
    commit is checked out then; its hours read with its threads."""
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    path = fold_dir / TRAIN_COMMITS
    entries = json.loads(path.read_text()) if path.exists() else []
    dirty = subprocess.run(["git", "diff", "--quiet", "HEAD"], cwd=REPO, capture_output=True).returncode != 0
    entries.append({"commit": commit(), "tracked_changes": dirty, "date": datetime.datetime.now().isoformat(
        timespec="seconds"), "threads": int(threads) if threads else None})
    fold_dir.mkdir(parents=True, exist_ok=True)
    atomic_save_json(entries, str(path))


def predict_final(dataset: str, arm: Arm, fold: int, raw: Path, work: Path, env: dict, log: Path) -> Path:
    """Stock ``nnUNetv2_predict`` of the source's test images (imagesTs) with the arm's final checkpoint (for (p):
    its student dataset's model). The folder's ``done`` holds the checkpoint's identity; predictions (and the
    ``summary.json`` evaluated from them) of another checkpoint, or of an unfinished earlier call, are removed and
    made again: nothing in the folder outlives the checkpoint it came from."""
    import shutil

    pred = work / "predictions" / f"{arm.key}_fold{fold}"
    model = Path(model_folder(env, raw, arm)) / f"fold_{fold}" / "checkpoint_final.pth"
    identity = checkpoint_identity(model)
    done = pred / "done"
    if not done.exists() or done.read_text().strip() != identity:
        if done.exists():
            print(f"{pred}: made with another checkpoint than {model}: predicted again", flush=True)
        shutil.rmtree(pred, ignore_errors=True)
        sh(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", arm_dataset(dataset, raw, arm)[0],
            "-c", CONFIG, "-f", str(fold), "-tr", arm.trainer, "-device", "cpu", "-npp", "1", "-nps", "1"], env, log)
        done.write_text(identity + "\n")
    return pred


def schedule(arms: List[str], runs: int, ablation_runs: int) -> List[Tuple[Arm, int]]:
    """Run-major: every run of the main arms before the next run, then the pseudo-labelling arm's runs (round 1's
    teachers are all of (a)'s runs, which run-major order finishes last), ablations last; a benchmark cut short
    still compares (a), (b) and (c) over the runs it finished."""
    main = [ARMS[k] for k in arms if not ARMS[k].ablation and not ARMS[k].pseudo_rounds]
    pseudo = [ARMS[k] for k in arms if ARMS[k].pseudo_rounds]
    ablations = [ARMS[k] for k in arms if ARMS[k].ablation]
    order = [(arm, arm.folds(runs)[r]) for r in range(runs) for arm in main]
    order += [(arm, fold) for arm in pseudo for fold in arm.folds(runs)]
    return order + [(arm, fold) for arm in ablations for fold in arm.folds(ablation_runs)]


# ---------------------------------------------------------------------------------------------- claims
#: what one process is doing in a work folder, so that two processes side by side never train, evaluate or store
#: the same run (or make the same pseudo-label round) twice: ``<work>/claims/<name>.json`` (pid, boot id, command)
CLAIMS = "claims"
CLAIM_POLL_S = 30  # how often a process that waits for another's claim looks again
_HELD: set = set()  # the claims this process holds (a nested claim of the same name is its own)


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _holder_alive(holder: dict) -> bool:
    """The claiming process still runs: same boot, its pid alive and (where /proc tells) still this benchmark, not
    another process that got the pid after a restart."""
    pid = holder.get("pid")
    if not isinstance(pid, int) or holder.get("boot_id", "") != _boot_id():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    cmdline = Path(f"/proc/{pid}/cmdline")
    try:
        return "convergence" in cmdline.read_bytes().decode(errors="replace")
    except OSError:
        return not cmdline.parent.parent.exists()  # no /proc: the pid is alive, take it as the holder


def claim_holder(work: Path, name: str) -> Optional[dict]:
    """The live process holding claim ``name`` of ``work`` (its record), or None (free, stale or ours)."""
    path = work / CLAIMS / f"{name}.json"
    try:
        holder = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return holder if holder.get("pid") != os.getpid() and _holder_alive(holder) else None


@contextlib.contextmanager
def claimed(work: Path, name: str) -> Iterator[Optional[dict]]:
    """Claim ``name`` in ``work`` for the ``with`` block: yields None when this process holds it (then released at
    the end), else the record of the live process that does (the caller skips the work). A claim whose process is
    gone (killed, machine restarted) is stale and taken over; the claim file is created exclusively, so of two
    processes starting at once one gets it."""
    key = (str(work), name)
    if key in _HELD:
        yield None
        return
    folder = work / CLAIMS
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.json"
    record = {"pid": os.getpid(), "boot_id": _boot_id(), "command": " ".join(sys.argv),
              "since": datetime.datetime.now().isoformat(timespec="seconds")}
    for _ in range(2):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            holder = claim_holder(work, name)
            if holder is not None:
                yield holder
                return
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)  # stale: its process is gone
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(record, f)
        break
    else:
        yield claim_holder(work, name) or {"pid": None, "command": "another process (claim file kept reappearing)"}
        return
    _HELD.add(key)
    try:
        yield None
    finally:
        _HELD.discard(key)
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def held_by(holder: dict) -> str:
    return f"held by process {holder.get('pid')} ({holder.get('command', '?')}, since {holder.get('since', '?')})"


# ---------------------------------------------------------------------------------------------- arm (p)
def pseudo_chain(arm: Arm, dataset: str, raw: Path, env: dict, log: Path, np_: str, work: Path, budget: dict,
                 task: dict) -> Optional[str]:
    """Everything a run of the pseudo-labelling arm needs before its own training, each step resumable and done
    once per work folder: round 1's teachers = the teacher arm's model folder (``Arm.teacher``: (a) for (p)),
    folds 0-2 (trained here if this work folder lacks their checkpoints: stored runs from another work folder are
    results, not checkpoints);
    ``skcdf_pseudolabel`` round 1 -> student dataset, its ``P_STUDENT_FOLDS`` students trained like (a); round 2
    with those students as teachers and ``--previous`` round 1; ... Returns None when the last round's student
    dataset is ready, else what it waits for."""
    for r in range(1, arm.pseudo_rounds + 1):
        teacher = ARMS[arm.teacher] if r == 1 else student_arm(arm, r - 1)
        folds = P_TEACHER_FOLDS if r == 1 else tuple(range(P_STUDENT_FOLDS))
        folder = model_folder(env, raw, teacher)
        busy = {}  # fold -> the process training it (a second process side by side takes the next free fold)
        for f in folds:
            with claimed(work, f"{teacher.key}_fold{f}") as holder:
                if holder is None:
                    train(dataset, teacher, f, raw, env, log)
                else:
                    busy[f] = holder
        missing = [f for f in folds if not (folder / f"fold_{f}" / "checkpoint_final.pth").exists()]
        if missing:
            return (f"round {r}'s teachers ({folder.parent.name}/{folder.name}, folds {missing}) are not trained yet"
                    + "".join(f"; fold {f} {held_by(h)}" for f, h in busy.items() if f in missing))
        with claimed(work, round_name(r, chain_key(arm))) as holder:
            if holder is not None:
                return f"round {r} is being made, {held_by(holder)}"
            make_round(r, dataset, raw, env, log, np_, work, folder, folds, budget, task, arm)
    return None


def round_name(r: int, chain: str = "a") -> str:
    """A round's claim and summary name: ``round1`` for (a)'s filtered chain, ``round1_fromD``,
    ``round1_Keep100`` for the others."""
    tag = chain_tag(chain)
    return f"round{r}" + (f"_{tag}" if tag else "")


def round_summary_file(work: Path, r: int, chain: str = "a") -> Path:
    return work / "pseudo_rounds" / f"{round_name(r, chain)}.json"


def make_round(r: int, dataset: str, raw: Path, env: dict, log: Path, np_: str, work: Path, teachers: Path,
               folds, budget: dict, task: dict, arm: Arm) -> dict:
    """Round ``r`` of ``skcdf_pseudolabel`` (default threshold), once per work folder: the student dataset with
    ``P_STUDENT_FOLDS`` identical folds, and ``<work>/pseudo_rounds/<round_name>.json`` (:func:`round_summary`, the
    command's wall time and the teachers' runs) for the store files of the chain's arms ((p) and (q): ``round<r>``,
    (w): ``round1_fromD``, (x): ``round<r>_Keep100``)."""
    from nnunetv2_skcdf.utilities.io import atomic_save_json

    chain = chain_key(arm)
    out_id, name = round_dataset(raw.name, r, chain)
    done, path = Path(env["nnUNet_preprocessed"]) / name / ROUND_DONE, round_summary_file(work, r, chain)
    if done.exists() and path.exists():
        return json.loads(path.read_text())
    # --student-unlabeled only where an SKCDF arm is a student of this round ((q): round 1 of (a)'s filtered chain):
    # the dropped cases also go to the student dataset as unlabelled images; stock nnU-Net students ignore them
    # (their split's train/val lists are unchanged), so other rounds do not write and preprocess them (their time
    # is the chain's cost)
    skcdf_student = any(a.skcdf and a.pseudo_rounds == r and chain_key(a) == chain for a in ARMS.values())
    cmd = ["skcdf_pseudolabel", "-d", dataset, "-m", str(teachers), "-f", *map(str, folds), "--out-dataset", out_id,
           "--out-name", name.split("_", 1)[1], "--student-folds", str(P_STUDENT_FOLDS), "-np", np_, "--overwrite",
           "-device", "cpu"] + (["--student-unlabeled"] if skcdf_student else []) \
        + (["--keep", str(arm.keep)] if arm.keep is not None else [])
    if r > 1:
        cmd += ["--previous", round_dataset(raw.name, r - 1, chain)[0]]
    # --overwrite: only an interrupted attempt of this round can be there (no marker); --threads holds for its
    # predictions too (torch reads OMP_NUM_THREADS), as for the trainings beside it
    threads = {"OMP_NUM_THREADS": env["SKCDF_CONV_THREADS"]} if env.get("SKCDF_CONV_THREADS") else {}
    seconds = sh(cmd, {**env, **threads}, log)
    summary = round_summary(r, Path(env["nnUNet_raw"]) / name, raw, seconds, cmd)
    summary["teacher_runs"] = teacher_runs(teachers, folds, budget, task, ARMS[arm.teacher] if r == 1 else None)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_save_json(summary, str(path))
    done.touch()
    return summary


def teacher_runs(folder: Path, folds, budget: dict, task: dict, stored_arm: Optional[Arm]) -> List[dict]:
    """Per teacher fold: its training commits and time; for round 1 (``stored_arm``: the teacher arm) also whether
    it is that arm's stored run of the fold (same training starts) or a run trained again in this work folder."""
    out = []
    for f in folds:
        fold_dir = folder / f"fold_{f}"
        commits = json.loads((fold_dir / TRAIN_COMMITS).read_text()) if (fold_dir / TRAIN_COMMITS).exists() else None
        entry = {"fold": f, "train_commits": commits, "train_s": train_seconds(fold_dir)}
        if stored_arm is not None:
            stored_file = store_file(stored_arm, f, budget, task)
            entry["stored_run"] = stored_file.exists() and commits is not None and \
                json.loads(stored_file.read_text()).get("train_commits") == commits
        out.append(entry)
    return out


def round_summary(r: int, round_raw: Path, source_raw: Path, seconds: Optional[float], cmd: List[str]) -> dict:
    """What the store keeps of a round: ``skcdf_pseudolabel``'s record (kept cases, threshold, teachers, agreement)
    and, benchmark side, the pseudo labels of the hidden-label training cases scored against their hidden labels
    (all cases of the pool and the kept ones; per site on the multi-site phantom). The round itself never reads a
    hidden label; the diagnostics here do, as ``convergence_eval.py`` does for SKCDF's ``D_l``."""
    from convergence_eval import dice_per_class, mean_over_cases

    record = json.loads((round_raw / "pseudolabel_round.json").read_text())
    dataset_json = json.loads((source_raw / "dataset.json").read_text())
    ending = dataset_json["file_ending"]
    classes = sorted(int(v) for v in dataset_json["labels"].values() if int(v) > 0)
    pool = sorted(c for c, rec in record["cases"].items() if rec.get("origin") == "pseudo")
    kept = set(record["kept"])
    hidden = {c: dice_per_class(_read_labels(round_raw / "pseudo_labels" / f"{c}{ending}"),
                                _read_labels(source_raw / "labelsTr" / f"{c}{ending}"), classes)
              for c in pool if (source_raw / "labelsTr" / f"{c}{ending}").is_file()}
    sites = case_sites(source_raw)

    def means(ids) -> Optional[Dict[str, float]]:
        ids = [c for c in ids if c in hidden]
        return mean_over_cases({c: hidden[c] for c in ids}) if ids else None

    per_site = {}
    for site in sorted(set(sites.get(c, "all") for c in pool)):
        ids = [c for c in pool if sites.get(c, "all") == site]
        kept_here = sorted(kept & set(ids))
        per_site[site] = {"pool": len(ids), "kept": len(kept_here), "hidden": sum(c in hidden for c in ids),
                          "hidden_kept": sum(c in hidden for c in kept_here),
                          "pseudo_dice": means(ids), "pseudo_dice_kept": means(kept_here)}
    return {"round": r, "dataset": round_raw.name, "command": " ".join(cmd), "seconds": seconds,
            "seconds_prediction": record.get("seconds_prediction"), "threshold": record.get("threshold"),
            "keep": record.get("keep"), "previous_round": record.get("previous_round"),
            "teachers": record.get("teachers"), "pool": len(pool), "kept": len(kept), "kept_ids": sorted(kept),
            "scores": {c: record["cases"][c].get("score") for c in pool},
            "organ_mean_agreement": record.get("organ_mean_agreement"),
            "hidden": len(hidden), "pseudo_dice": means(pool), "pseudo_dice_kept": means(sorted(kept)),
            "per_site": per_site}


def _read_labels(path: Path) -> np.ndarray:
    import SimpleITK as sitk

    return sitk.GetArrayFromImage(sitk.ReadImage(str(path)))


def student_result(arm: Arm, r: int, fold: int, raw: Path, work: Path, env: dict, log: Path, np_: str) -> dict:
    """A round-``r`` student (not a stored run): its training time and its test Dice (stock predict +
    skcdf_evaluate, per organ and per site), to show what each round adds. Every stored run of the chain's arm
    asks for it: two processes storing two runs side by side take turns (a claim), never predicting into one
    folder at once."""
    student = student_arm(arm, r)
    while True:
        with claimed(work, f"{student.key}_fold{fold}_predict") as holder:
            if holder is None:
                pred = predict_final(arm_dataset("", raw, student)[0], student, fold, raw, work, env, log)
                if not (pred / "summary.json").exists():
                    sh(["skcdf_evaluate", "-ref", str(raw / "labelsTs"), "-pred", str(pred), "-np", np_], env, log)
                break
        print(f"{student.key} fold {fold}: predictions being made, {held_by(holder)}: waiting", flush=True)
        time.sleep(CLAIM_POLL_S)
    summary = json.loads((pred / "summary.json").read_text())
    return {"fold": fold, "train_s": train_seconds(model_folder(env, raw, student) / f"fold_{fold}"),
            "test_dice": {k: v["Dice"] for k, v in summary["mean"].items() if k != "0"},
            "test_dice_per_site": dice_by_site(summary, case_sites(raw))}


def stores_run(stages: List[str], arm: Arm) -> bool:
    """A run is stored once its final predictions are made and, for an arm with learning curves, its curve too; an
    ablation arm has no curve, so ``--stages train final`` stores it."""
    return "final" in stages and ("curves" in stages or arm.key not in CURVE_ARMS)


def curve_epochs(snapshot_epochs: List[int], every: int) -> List[int]:
    """The snapshots a run's curve evaluates: every ``every``-th one counted back from the final one, so that the
    final snapshot and (with 8 points and ``every`` 2) the 3/4 point of the plateau criterion are always in it."""
    if every < 1:
        raise ValueError(f"--curve-every must be >= 1, got {every}")
    return sorted(snapshot_epochs)[::-1][::every][::-1]


def curves(arm: Arm, fold: int, raw: Path, env: dict, work: Path, budget: dict, hidden: List[str],
           every: int = 1) -> None:
    """Snapshot evaluation in a child process (its own nnU-Net environment), cached per snapshot; an SKCDF arm's
    curve has the pseudo-label diagnostics on the ``hidden`` cases unless none are given (--no-pseudo-curves).
    ``every`` > 1 evaluates a subset of the snapshots (``curve_epochs``); the report's mean curve of an arm has the
    snapshots every run of it has."""
    out = work / "curves" / f"{arm.key}_fold{fold}.json"
    epochs = curve_epochs(budget["snapshot_epochs"], every)
    cmd = [sys.executable, str(REPO / "benchmarks" / "convergence_eval.py"), "--model",
           str(model_folder(env, raw, arm)), "--fold", str(fold), "--raw", str(raw), "--out", str(out),
           "--epochs", ",".join(map(str, epochs)), "--final-epoch", str(budget["epochs"])]
    if arm.skcdf and hidden:
        cmd += ["--hidden", *hidden]
    subprocess.run(cmd, env=env, check=True)


# ---------------------------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-d", "--dataset", default="962")
    parser.add_argument("--iterations", type=int, default=8000, help="training iterations of every arm (8000: "
                        "(a) meets the last-quarter criterion on the phantom, (c) does not; 12000 is the longer-budget "
                        "check; 4000 is the short-budget regime of the first stored runs; the multi-site task: 12000)")
    parser.add_argument("--points", type=int, default=8, help="snapshots for the learning curves")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    parser.add_argument("--runs", type=int, default=3, help="runs of every arm that is not an ablation ("
                        + ", ".join(k for k, a in ARMS.items() if not a.ablation) + ")")
    parser.add_argument("--ablation-runs", type=int, default=1)
    parser.add_argument("--num-train", type=int, help="training cases (default 24; 40 with --sites)")
    parser.add_argument("--num-unlabeled", type=int, help="imagesUnlabeled images (default 12; 24 with --sites)")
    parser.add_argument("--num-test", type=int, help="test cases (default 8; 16 with --sites: 4 per site)")
    parser.add_argument("--labeled", default="4", help="labelled cases (count or fraction of the non-val ones; with "
                        "--sites a count of the labelled site's cases)")
    parser.add_argument("--val", default="4", help="validation cases (with --sites: of the labelled site)")
    parser.add_argument("--sites", nargs="+", metavar="SITE", help="the multi-site task: the phantom with "
                        "skcdf_make_phantom --sites (e.g. 'all' = A B C D; case i of every role from site i mod n), "
                        "validation and labelled cases from --labelled-site, every other training case and every "
                        "imagesUnlabeled image (all sites) unlabelled, the test set from every site")
    parser.add_argument("--labelled-site", help="with --sites: the site of the validation and labelled cases "
                        "(default: the first site)")
    parser.add_argument("--stages", nargs="+", default=["train", "curves", "final", "report"],
                        choices=["prepare", "train", "curves", "final", "report", "reevaluate"],
                        help="prepare (always done first; alone: nothing else, e.g. before two runs side by side in "
                        "one work folder); reevaluate (never by default): stored runs whose predictions are still in "
                        "the work folder get skcdf_evaluate's current metrics (e.g. islands); every metric they "
                        "already have must come out the same")
    parser.add_argument("--no-pseudo-curves", action="store_true", help="SKCDF arms' curves on the test set only, "
                        "without D_l's pseudo-label Dice on the hidden-label training cases (18 of the 26 cases each "
                        "snapshot predicts on the 2-labelled task): for a run that must be evaluated before its session ends (the snapshots "
                        "do not outlive it); the report's diagnostics then come from another stored run of the arm. "
                        "A snapshot already evaluated keeps what it has")
    parser.add_argument("--curve-every", type=int, default=1, help="evaluate every N-th snapshot of a run's curve, "
                        "counted back from the final one (default 1: all; 2 with 8 points: 4 snapshots, the 3/4 point "
                        "and the final one among them, half the curve's cost). The report's mean curve of an arm has "
                        "the snapshots all its runs have; a snapshot already evaluated is kept")
    parser.add_argument("--work", help="work folder (default: skcdf_data/convergence_<labeled>lab_<iterations>, "
                        "multi-site: convergence_<labeled>lab-site<X>-ms_<iterations>); one budget and one task "
                        "(phantom size, sites, split) per folder")
    parser.add_argument("--data-from", help="copy the phantom and its preprocessing from this work folder (same "
                        "--num-train/--num-unlabeled/--num-test) instead of generating them: another --labeled only "
                        "needs its own split")
    parser.add_argument("-np", default="2")
    parser.add_argument("--threads", type=int, help="torch threads of each training (default: all cores, as "
                        "nnU-Net; 1 when other jobs share the machine: contended 2-thread barriers are 5-10x slower)")
    args = parser.parse_args()
    if args.curve_every < 1:
        parser.error(f"--curve-every must be >= 1, got {args.curve_every}")

    task = task_of(args)
    work = Path(args.work) if args.work else default_work(task, args.iterations)
    budget = fixed_budget(work, args.iterations, args.points)
    task = fixed_task(work, task, args.iterations)  # the same name as default_work
    env = environment(work, budget, args.np)
    if args.threads:
        env["SKCDF_CONV_THREADS"] = str(args.threads)
    log = work / "convergence.log"
    t0 = time.perf_counter()
    raw = prepare(args.dataset, env, log, args.np, args, Path(args.data_from) if args.data_from else None)
    if args.stages == ["prepare"]:
        print(f"{work}: prepared ({raw.name})", flush=True)
        return
    pre = Path(env["nnUNet_preprocessed"]) / raw.name
    hidden = hidden_label_cases(pre, raw)
    for arm, fold in schedule(args.arms, args.runs, args.ablation_runs):
        if stored(arm, fold, budget, task):
            print(f"{arm.key} ({arm.name}) fold {fold}: stored in {STORE.name}/", flush=True)
            if "reevaluate" in args.stages:
                reevaluate(arm, fold, raw, work, env, log, budget, task, args.np)
            continue
        with claimed(work, f"{arm.key}_fold{fold}") as holder:
            if holder is not None:  # another process side by side runs it: take the next run
                print(f"{arm.key} fold {fold}: skipped, {held_by(holder)}", flush=True)
                continue
            if stored(arm, fold, budget, task):  # stored by the holder we waited for, or from another work folder
                print(f"{arm.key} ({arm.name}) fold {fold}: stored in {STORE.name}/", flush=True)
                continue
            run(arm, fold, args, raw, work, env, log, budget, task, hidden)
    if "report" in args.stages:
        report(args, budget, task, load_store(budget, task), load_store(budget, task, same=False), raw, work,
               time.perf_counter() - t0)


def run(arm: Arm, fold: int, args, raw: Path, work: Path, env: dict, log: Path, budget: dict, task: dict,
        hidden: List[str]) -> None:
    """One run (arm x fold) as far as ``--stages`` go: train (for (p) its chain first), curves, final, store."""
    if "train" in args.stages:
        if arm.pseudo_rounds:
            waiting = pseudo_chain(arm, args.dataset, raw, env, log, args.np, work, budget, task)
            if waiting:
                print(f"{arm.key} fold {fold}: {waiting}", flush=True)
                return
        train(args.dataset, arm, fold, raw, env, log)
    if not (model_folder(env, raw, arm) / f"fold_{fold}" / "checkpoint_final.pth").exists():
        print(f"{arm.key} fold {fold}: not trained yet", flush=True)
        return
    if "curves" in args.stages and arm.key in CURVE_ARMS:
        curves(arm, fold, raw, env, work, budget, [] if args.no_pseudo_curves else hidden, args.curve_every)
    if "final" in args.stages:
        predict_final(args.dataset, arm, fold, raw, work, env, log)
    if stores_run(args.stages, arm):
        if store_run(arm, fold, raw, work, env, log, budget, task, args.np):
            print(f"{arm.key} ({arm.name}) fold {fold}: done and stored", flush=True)
    elif "final" in args.stages:
        print(f"{arm.key} fold {fold}: predicted, not stored: a curve arm is stored with --stages curves final",
              flush=True)


# ---------------------------------------------------------------------------------------------- the store
def store_file(arm: Arm, fold: int, budget: dict, task: dict) -> Path:
    """One file per arm, fold, task and budget (``a_fold0_4lab_4000it.json``, ``c_fold3_alllab_4000it.json``;
    multi-site: ``a_fold0_4lab-siteA-ms_8000it.json``, ``c_fold3_alllab-siteA-ms_8000it.json``): a
    longer-budget check or a harder task is stored beside the main runs, never over them."""
    return STORE / f"{arm.key}_fold{fold}_{task_tag(arm_task(arm, task))}_{budget['iterations']}it.json"


def stored(arm: Arm, fold: int, budget: dict, task: dict) -> bool:
    path = store_file(arm, fold, budget, task)
    if not path.exists():
        return False
    run = json.loads(path.read_text())
    return run["budget"] == budget and run["task"] == arm_task(arm, task)


def store_run(arm: Arm, fold: int, raw: Path, work: Path, env: dict, log: Path, budget: dict, task: dict,
              np_: str) -> bool:
    """One finished run -> its store file (atomic): what the report needs, without the checkpoints. False (nothing
    written) when the same run was stored meanwhile by another process."""
    target = store_file(arm, fold, budget, task)
    if target.exists():  # the file name holds labelled count and budget only: never replace another task's run
        old = json.loads(target.read_text())
        if old.get("task") != arm_task(arm, task) or old.get("budget") != budget:
            raise SystemExit(f"{target} holds a run of another task or budget (task {old.get('task')}, budget "
                             f"{old.get('budget')}); this run (task {arm_task(arm, task)}, budget {budget}) would "
                             "replace it. Move that file aside (or use the options it was made with).")
        # the same run stored meanwhile by a process in another work folder ((c) is shared by the tasks that differ
        # only in the labelled count, and claims are per work folder): the first stored stays
        print(f"{arm.key} fold {fold}: not stored, {target.name} was stored meanwhile (from "
              f"{old.get('prediction_folder')}); this run's predictions stay in {work / 'predictions'}", flush=True)
        return False
    import torch

    from nnunetv2_skcdf.utilities.io import atomic_save_json

    STORE.mkdir(parents=True, exist_ok=True)
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
    extra = {}
    if arm.pseudo_rounds:  # the chain this run comes from: each round's summary, the earlier rounds' students
        rounds = [json.loads(round_summary_file(work, r, chain_key(arm)).read_text())
                  for r in range(1, arm.pseudo_rounds + 1)]
        for r, summary in enumerate(rounds[:-1], start=1):
            summary["students"] = [student_result(arm, r, f, raw, work, env, log, np_)
                                   for f in range(P_STUDENT_FOLDS)]
        extra["pseudo_rounds"] = rounds
    atomic_save_json({
        "arm": arm.key, "name": arm.name, "trainer": arm.trainer, "fold": fold, "budget": budget,
        "task": arm_task(arm, task),
        "commit": commit(), "date": datetime.date.today().isoformat(), "machine": machine(),
        "train_commits": json.loads((fold_dir / TRAIN_COMMITS).read_text()) if (fold_dir / TRAIN_COMMITS).exists()
        else None,  # runs trained before this was recorded: None
        "train_epoch_s_median": float(np.median(epoch_s)), "train_s": float(np.sum(epoch_s)),
        "curve": json.loads(curve.read_text()) if curve.exists() else None,
        "final_summary": json.loads((evaluation / "summary.json").read_text()),
        "lambda": [float(x) for x in logging.get("consistency_weight", [])],
        "train_pseudo_fractions": logging.get("pseudo_label_fractions", []),
        "keep_rates": json.loads(rates[-1]) if rates else None,
        "prediction_folder": str(work / "predictions" / f"{arm.key}_fold{fold}"), **extra},
        str(target))
    return True


def reevaluate(arm: Arm, fold: int, raw: Path, work: Path, env: dict, log: Path, budget: dict, task: dict,
               np_: str) -> bool:
    """A stored run's final predictions evaluated again with the current ``skcdf_evaluate``: its
    ``final_summary`` gains the metrics added since (``final_summary_reevaluated`` records when). Refused,
    store unchanged, if the predictions are gone or any metric the run already had comes out different."""
    import shutil

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
    for path in sorted(STORE.glob("*_fold*_*lab*_*it.json")):
        run = json.loads(path.read_text())
        if run["arm"] in ARMS and run["task"] == arm_task(ARMS[run["arm"]], task) \
                and (run["budget"] == budget) == same:
            runs.setdefault(run["arm"], []).append(run)
    return runs


if __name__ == "__main__":
    main()
