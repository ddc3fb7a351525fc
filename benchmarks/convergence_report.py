"""Report of ``benchmarks/convergence.py``: learning curves, plateau check, final paper table, goals, diagnostics.

Works on whatever is finished: arms or runs still missing are listed as such in the JSON and the BENCHMARKS.md
section (``status: partial``), never silently left out.
"""
from __future__ import annotations

import datetime
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from convergence_common import commit  # noqa: F401 (convergence_report.commit: the scripts that import it)
from data_pipeline import machine, write_section

RESULTS = Path(__file__).resolve().parent / "results"
PLATEAU_POINTS = 1.0  # the last quarter of the budget must add less than this many mean Dice points to (a), (c)
ROOM_POINTS = 10.0  # issue 44: at the plateau the gap (a) -> (c) must be at least this (reported, not enforced)


# ---------------------------------------------------------------------------------------------- class names
def class_titles(dataset_json: dict) -> Dict[str, str]:
    from nnunetv2_skcdf.evaluation.paper_table import column_title

    return {str(v): column_title(k) for k, v in dataset_json["labels"].items() if int(v) != 0}


def _mean(d: Dict[str, float], keys=None) -> float:
    values = [v for k, v in d.items() if keys is None or k in keys]
    return 100 * float(np.nanmean(values)) if values else float("nan")


# ---------------------------------------------------------------------------------------------- curves
def arm_name(run: dict) -> str:
    """The arm's current name (a stored run keeps the name it had when it was stored)."""
    from convergence_common import ARMS

    return ARMS[run["arm"]].name


def curve_table(runs: Dict[str, list], small_keys: List[str]) -> Dict[str, dict]:
    """{arm: {'iterations': [...], 'mean': [[run values] per point], 'small': [...]}} from the stored runs."""
    from trainers.convergence_trainers import ITERATIONS_PER_EPOCH

    out = {}
    for key, stored in sorted(runs.items()):
        curves = [r["curve"] for r in stored if r.get("curve")]
        if not curves:
            continue
        epochs = sorted(set.intersection(*(set(map(int, c)) for c in curves)))
        out[key] = {"name": arm_name(stored[0]), "runs": len(curves),
                    "iterations": [e * ITERATIONS_PER_EPOCH for e in epochs],
                    "mean": [[_mean(c[str(e)]["test_dice"]) for c in curves] for e in epochs],
                    "small": [[_mean(c[str(e)]["test_dice"], small_keys) for c in curves] for e in epochs]}
    return out


def plateau(curve: dict) -> Optional[dict]:
    """Mean Dice gained over the last quarter of the budget (snapshot nearest 75 % -> final), mean over runs."""
    its = curve["iterations"]
    if len(its) < 2 or its[-1] == 0:
        return None
    i75 = int(np.argmin([abs(i - 0.75 * its[-1]) for i in its]))
    gain = float(np.mean(curve["mean"][-1]) - np.mean(curve["mean"][i75]))
    return {"from_iteration": its[i75], "to_iteration": its[-1], "gain": gain, "met": gain < PLATEAU_POINTS}


def plot_curves(curves: Dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, field, title in ((axes[0], "mean", "test mean Dice (13 organs)"),
                             (axes[1], "small", "test Dice, 4 smallest organs (LAG, RAG, PSV, Es)")):
        for key, c in curves.items():
            values = np.array(c[field])
            mean, std = values.mean(1), values.std(1)
            ax.plot(c["iterations"], mean, marker="o", label=f"({key}) {c['name']} [{c['runs']} run(s)]")
            ax.fill_between(c["iterations"], mean - std, mean + std, alpha=0.2)
        ax.set_xlabel("iteration")
        ax.set_ylabel("Dice (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- diagnostics
def skcdf_diagnostics(runs: Dict[str, list], titles: Dict[str, str]) -> dict:
    """Per SKCDF arm (its first stored run): pseudo-label (D_l) Dice per organ over training, predicted vs true
    class fractions, lambda(t) and the keep-rates."""
    out = {}
    for key, stored in sorted(runs.items()):
        run = next((r for r in stored if r.get("curve") and any("pseudo_dice" in p for p in r["curve"].values())),
                   None)
        if run is None:
            continue
        epochs = sorted(map(int, run["curve"]))
        last = run["curve"][str(epochs[-1])]
        out[key] = {"fold": run["fold"], "epochs": epochs,
                    "pseudo_dice": {titles[c]: [100 * run["curve"][str(e)]["pseudo_dice"][c] for e in epochs]
                                    for c in titles},
                    "pseudo_fractions_final": last["pseudo_fractions"], "true_fractions": last["true_fractions"],
                    "train_pseudo_fractions_last_epoch": (run["train_pseudo_fractions"] or [None])[-1],
                    "lambda": run["lambda"], "keep_rates": run["keep_rates"]}
    return out


def plot_diagnostics(diag: dict, titles: Dict[str, str], iterations_per_epoch: int, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(diag), 3, figsize=(16, 4.2 * len(diag)), squeeze=False)
    names = ["bg", *titles.values()]
    for row, (key, d) in zip(axes, diag.items()):
        its = [e * iterations_per_epoch for e in d["epochs"]]
        for organ, values in d["pseudo_dice"].items():
            row[0].plot(its, values, label=organ)
        row[0].set_title(f"({key}) D_l on hidden-label cases: Dice per organ")
        row[0].set_xlabel("iteration")
        row[0].legend(fontsize=6, ncol=2)
        x = np.arange(len(names))
        row[1].bar(x - 0.2, 100 * np.array(d["true_fractions"]), 0.4, label="true (hidden labels)")
        row[1].bar(x + 0.2, 100 * np.array(d["pseudo_fractions_final"]), 0.4, label="D_l predicted (final)")
        row[1].set_yscale("log")
        row[1].set_xticks(x, names, rotation=90, fontsize=7)
        row[1].set_title("class fractions (%)")
        row[1].legend(fontsize=7)
        epochs = np.arange(len(d["lambda"]))
        row[2].plot(epochs * iterations_per_epoch, d["lambda"], color="k", label="lambda(t)")
        row[2].set_xlabel("iteration")
        row[2].set_title("lambda(t) and annealed keep-rates r'(t) (unlabelled)")
        if d["keep_rates"]:
            twin = row[2].twinx()
            t = epochs / max(len(epochs), 1)
            for c, r in enumerate(d["keep_rates"][1:], start=1):
                twin.plot(epochs * iterations_per_epoch, 1 - t * (1 - r), lw=0.8, alpha=0.7)
            twin.set_yscale("log")
            twin.set_ylabel("keep-rate")
        row[2].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


#: report JSON key and PNG suffix -> the title its note has in BENCHMARKS.md (see overlay_plan)
OVERLAYS = {"overlay": "Overlay", "overlay_current": "Second overlay"}


def plot_overlay(preds: Dict[str, Path], names: Dict[str, str], raw: Path, summaries: Dict[str, dict],
                 path: Path) -> List[str]:
    """Per arm, its median test case (by that arm's mean Dice, in the run given): the axial slice with the most
    reference organs; columns image, reference, then every arm's prediction of that case."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import SimpleITK as sitk

    def read(p):
        return sitk.GetArrayFromImage(sitk.ReadImage(str(p)))

    medians = {}
    for key, summary in summaries.items():
        per_case = sorted((np.nanmean([m["Dice"] for k, m in c["metrics"].items()]),
                           Path(c["reference_file"]).name) for c in summary["metric_per_case"])
        medians[key] = per_case[len(per_case) // 2][1]
    fig, axes = plt.subplots(len(medians), 2 + len(preds), figsize=(2.6 * (2 + len(preds)), 2.8 * len(medians)),
                             squeeze=False)
    lines = []
    for row, (key, case) in zip(axes, medians.items()):
        ref = read(raw / "labelsTs" / case)
        z = int(np.argmax([len(np.unique(s)) for s in ref]))
        image = read(raw / "imagesTs" / case.replace(".nii.gz", "_0000.nii.gz"))[z]
        panels = [("image", None), ("reference", ref[z])] + [(f"({k}) {names[k]}", read(p / case)[z])
                                                            for k, p in preds.items()]
        for ax, (title, seg) in zip(row, panels):
            ax.imshow(image, cmap="gray", vmin=-200, vmax=300)
            if seg is not None:
                ax.imshow(np.ma.masked_equal(seg, 0), cmap="tab20", vmin=0, vmax=19, alpha=0.55,
                          interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
        row[0].set_ylabel(f"median case of ({key})")
        row[0].set_title(f"({key}) median: {case}, z={z}", fontsize=7)
        lines.append(f"({key}): {case}, slice {z}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return lines


# ---------------------------------------------------------------------------------------------- final table
def final_table(runs: Dict[str, list], dataset_json: dict) -> Optional[dict]:
    """skcdf_evaluate's aggregate and paper table over the stored runs' final per-case metrics (the same
    functions ``skcdf_evaluate`` uses over several prediction folders)."""
    from nnunetv2_skcdf.evaluation.evaluate import aggregate_runs, label_names
    from nnunetv2_skcdf.evaluation.paper_table import column_title, paper_table

    from convergence_common import ARMS

    ordered = [r for k in ARMS for r in runs.get(k, [])]
    if not ordered:
        return None
    names = label_names(dataset_json)
    keys = [k for k in ordered[0]["final_summary"]["mean"] if k != "0"]
    class_info = [{"key": k, "name": names.get(k, k), "column": column_title(names.get(k, k))} for k in keys]
    settings = {"rules": "nnunet", "units": "mm"}
    aggregate = aggregate_runs([{"method": arm_name(r), "pred_folder": r["prediction_folder"], "output_folder": "",
                                 "summary": r["final_summary"]} for r in ordered], class_info, settings)
    return {"table": paper_table(aggregate).strip(), "aggregate": aggregate}


def goals(aggregate: dict, arms: dict, small: List[str], skcdf: str = "b") -> dict:
    """The issue's goals at the plateau for the SKCDF arm ``skcdf`` against (a), from skcdf_evaluate's aggregate
    (Dice in points, ASD mm, NSD %)."""
    by = {m["name"]: m for m in aggregate["methods"]}
    a, b, c = (by.get(arms[k].name) for k in ("a", skcdf, "c"))
    if a is None or b is None:
        return {"status": f"needs arms (a) and ({skcdf})"}
    keys = [cl["key"] for cl in aggregate["classes"] if cl["column"] in small]

    def avg(m, metric):
        return m["average"][metric]["mean"]

    def small_dice(m):
        return 100 * float(np.mean([m["per_class"][k]["Dice"]["mean"] for k in keys]))

    out = {"mean_dice": {"a": 100 * avg(a, "Dice"), skcdf: 100 * avg(b, "Dice")},
           "gain_mean": 100 * (avg(b, "Dice") - avg(a, "Dice")), "gain_small": small_dice(b) - small_dice(a),
           "asd": {"a": avg(a, "ASD"), skcdf: avg(b, "ASD")},
           "nsd": {"a": 100 * avg(a, "NSD"), skcdf: 100 * avg(b, "NSD")},
           "missed_per_run": {"a": missed_per_run(a), skcdf: missed_per_run(b)}}
    out["goal_gain_mean_5"] = out["gain_mean"] >= 5
    out["goal_gain_small_10"] = out["gain_small"] >= 10
    # a missed organ has no surface: it leaves the ASD and NSD means (they would read better for missing it), so the
    # goal also asks for no more missed organ-cases per run than (a)
    out["goal_asd_nsd_not_worse"] = bool(avg(b, "ASD") <= avg(a, "ASD") and avg(b, "NSD") >= avg(a, "NSD")
                                         and out["missed_per_run"][skcdf] <= out["missed_per_run"]["a"])
    if c is not None:
        gap = avg(c, "Dice") - avg(a, "Dice")
        out["mean_dice"]["c"] = 100 * avg(c, "Dice")
        out["gap_closed"] = (avg(b, "Dice") - avg(a, "Dice")) / gap if gap > 0 else float("nan")
        out["goal_gap_closed_40pct"] = bool(out["gap_closed"] >= 0.4)
    return out


def missed_per_run(method: dict) -> float:
    """Organ-cases of a method (one row of skcdf_evaluate's aggregate) whose prediction has none of the organ the
    reference has, summed over classes and test cases, per run: they have no ASD or NSD, so those means leave them
    out."""
    return sum(method["missed"].values()) / max(len(method["runs"]), 1)


def goals_per_arm(aggregate: dict, arms: dict, small: List[str], main: tuple = ("d", "g", "b")) -> Dict[str, dict]:
    """:func:`goals` of each SKCDF arm: the ``main`` ones always ((d) = SKCDFTrainer's defaults since 0.4.0,
    (g) = 0.3's, (b) = up to 0.2; an absent one says what it needs), every other SKCDF arm (the ablations) where
    the aggregate has its final result."""
    present = {m["name"] for m in aggregate["methods"]}
    return {k: goals(aggregate, arms, small, k) for k, a in arms.items()
            if a.skcdf and (k in main or a.name in present)}


def gap_per_organ(aggregate: dict, arms: dict, runs: Dict[str, list], skcdf: str = "d",
                  min_gap: float = 1.0) -> Optional[List[dict]]:
    """Where SKCDF's gain comes from, organ by organ: test Dice (points, mean over runs) of (a), the SKCDF arm
    ``skcdf`` and (c), the gap (a)->(c) and the share of it the SKCDF arm closes (None where the gap, rounded to
    0.1 as printed, is under ``min_gap`` points: a share of a near-zero gap is noise). Beside it the SKCDF arm's
    pseudo labels (``D_l`` on the hidden-label training cases, last curve snapshot, mean over the runs that
    measured them; None where no run did): an organ whose pseudo labels are no better than nnU-Net's test Dice
    leaves the unlabelled loss nothing to teach there. Different cases from the test set, so a comparison of
    levels, not a paired one. None unless (a), (c) and the SKCDF arm all have a final result."""
    by = {m["name"]: m for m in aggregate["methods"]}
    a, s, c = (by.get(arms[k].name) for k in ("a", skcdf, "c"))
    if a is None or s is None or c is None:
        return None
    last = [r["curve"][str(max(map(int, r["curve"])))] for r in runs.get(skcdf, []) if r.get("curve")]
    measured = [point["pseudo_dice"] for point in last if "pseudo_dice" in point]
    rows = []
    for cl in sorted(aggregate["classes"], key=lambda cl: int(cl["key"]) if cl["key"].isdigit() else cl["key"]):
        k = cl["key"]
        dice = [100 * m["per_class"][k]["Dice"]["mean"] for m in (a, s, c)]
        gap = dice[2] - dice[0]
        pseudo = [100 * point[k] for point in measured]
        rows.append({"organ": cl["column"], "a": dice[0], skcdf: dice[1], "c": dice[2], "gap": gap,
                     "closed": (dice[1] - dice[0]) / gap if round(gap, 1) >= min_gap else None,
                     "pseudo": float(np.mean(pseudo)) if pseudo else None, "pseudo_runs": len(pseudo)})
    return rows


def gap_markdown(rows: Optional[List[dict]], skcdf: str = "d") -> str:
    if not rows:
        return ""
    n = max(r["pseudo_runs"] for r in rows)
    lines = [f"| {r['organ']} | {r['a']:.1f} | {r[skcdf]:.1f} | {r['c']:.1f} | {r['gap']:.1f} | "
             + (f"{round(100 * r['closed'])} %" if r["closed"] is not None else "-") + " | "
             + (f"{r['pseudo']:.1f}" if r["pseudo"] is not None else "not measured") + " |" for r in rows]
    return (f"Per organ: test Dice of (a), ({skcdf}) and (c), mean over runs, the share of the (a)->(c) gap "
            f"({skcdf}) closes ('-' where the gap is under 1 point) and ({skcdf})'s pseudo labels at the last "
            "snapshot (`D_l` on the hidden-label training cases, other cases than the test set; "
            + (f"mean of {n} run(s)" if n else f"not measured by the runs of ({skcdf}) stored at this budget")
            + "):\n\n"
            f"| organ | (a) | ({skcdf}) | (c) | gap | closed | ({skcdf}) pseudo labels |\n"
            "|---|---|---|---|---|---|---|\n" + "\n".join(lines))


def islands_per_run(aggregate: dict, small: List[str]) -> Dict[str, Optional[dict]]:
    """Per arm: islands (predicted components without a reference voxel) per run over all test cases, their
    volume in cm^3, over all organs and over the ``small`` columns; None where a run was stored before islands
    were counted (``--stages reevaluate`` adds them while its predictions are still in the work folder)."""
    out = {}
    for m in aggregate["methods"]:
        counts, volumes = m.get("islands", {}), m.get("island_volume", {})
        if not counts or any(v is None for v in counts.values()):
            out[m["name"]] = None
            continue
        runs = len(m["runs"])
        small_keys = [c["key"] for c in aggregate["classes"] if c["column"] in small]
        out[m["name"]] = {"runs": runs, "all": sum(counts.values()) / runs,
                          "all_cm3": sum(volumes.values()) / runs / 1000,
                          "small": sum(counts[k] for k in small_keys) / runs,
                          "small_cm3": sum(volumes[k] for k in small_keys) / runs / 1000}
    return out


# ---------------------------------------------------------------------------------------------- report
def final_mean_dice(run: dict, small_keys: Optional[List[str]] = None) -> float:
    """Mean test Dice (points) of a stored run's final prediction (stock predict + skcdf_evaluate), over the
    foreground classes or ``small_keys``."""
    return _mean({k: v["Dice"] for k, v in run["final_summary"]["mean"].items() if k != "0"}, small_keys)


def other_budgets(runs: Dict[str, list], other: Dict[str, list], small_keys: List[str]) -> List[dict]:
    """Plateau evidence beyond the curve: each run stored with another budget, beside the runs of the same arm at
    this budget (the final checkpoints of two schedules, each annealed to lr 0). The folds of a task repeat one
    split (they differ by the training seed only), so a run at another budget is an independent run, not a
    continuation of the same fold here: ``this_budget_runs`` holds every run of the arm at this budget, and the
    same fold's value (``this_budget_mean``) is shown for reference only."""
    rows = []
    for key, stored in sorted(other.items()):
        for run in stored:
            here = next((r for r in runs.get(key, []) if r["fold"] == run["fold"]), None)
            own = curve_table({key: [run]}, small_keys).get(key)  # its own curve: is that run at a plateau?
            rows.append({"arm": key, "name": arm_name(run), "fold": run["fold"],
                         "plateau": plateau(own) if own else None,
                         "iterations": run["budget"]["iterations"], "mean": final_mean_dice(run),
                         "small": final_mean_dice(run, small_keys),
                         "this_budget_runs": [final_mean_dice(r) for r in runs.get(key, [])],
                         "this_budget_mean": final_mean_dice(here) if here else None,
                         "this_budget_small": final_mean_dice(here, small_keys) if here else None})
    return rows


def overlay_arms(lines: List[str]) -> set:
    """Arm keys of an overlay's lines (``"(a): phantom_ts_0002.nii.gz, slice 30"``)."""
    return {m.group(1) for m in (re.match(r"\((\w+)\):", line) for line in lines) if m}


def redraw_overlay(previous_lines: List[str], local_arms: set) -> bool:
    """Whether this report draws the overlay again: only with the predictions of every arm the stored overlay
    shows. The predictions stay in the work folder of the session that made them, so a later session that
    trains one more arm has only that arm's: it keeps the earlier, wider picture (and its lines) instead of
    replacing it with a one-arm one."""
    return overlay_arms(previous_lines) <= local_arms


def overlay_plan(previous: Dict[str, List[str]], local_arms: set) -> Dict[str, str]:
    """Per overlay figure of :data:`OVERLAYS`: ``"draw"`` (from the predictions in this work folder) or ``"keep"``
    (the stored picture); a figure not named is dropped. The first is redrawn only with the predictions of every
    arm it shows (:func:`redraw_overlay`). Where it cannot be, the second shows the arms whose predictions are
    here (a later session's: the present defaults beside nnU-Net and the arms trained since), under the same rule
    against the arms it showed before; when the first is redrawn the second is dropped (the first shows them)."""
    first, second = OVERLAYS
    if local_arms and redraw_overlay(previous.get(first, []), local_arms):
        return {first: "draw"}
    plan = {first: "keep"} if previous.get(first) else {}
    if local_arms and redraw_overlay(previous.get(second, []), local_arms):
        plan[second] = "draw"
    elif previous.get(second):
        plan[second] = "keep"
    return plan


def overlay_figure(folder: Path, stem: str, name: str) -> Path:
    """The PNG of overlay figure ``name`` (a key of :data:`OVERLAYS`) of report ``stem``."""
    return folder / f"{stem}_{name}.png"


def drop_unplanned_overlays(folder: Path, stem: str, plan: Dict[str, str]) -> List[Path]:
    """Remove the PNG of each overlay figure the plan drops (the second one, once the first is redrawn and
    shows its arms): the report no longer names it, and a picture left beside the report would contradict it.
    Returns the files removed."""
    removed = []
    for name in OVERLAYS:
        figure = overlay_figure(folder, stem, name)
        if name not in plan and figure.is_file():
            figure.unlink()
            removed.append(figure)
    return removed


def overlay_note(lines: List[str], stored_arms: List[str], title: str = "Overlay") -> str:
    """An overlay's median cases, and the stored arms it lacks (their predictions were in another session's
    work folder)."""
    if not lines:
        return ""
    shown = overlay_arms(lines)
    absent = [k for k in stored_arms if k not in shown]
    return (f"\n\n{title}, median test case per arm (axial slice with the most reference organs): "
            + "; ".join(lines)
            + (f". Not in the picture (predictions made in another session's work folder): "
               f"{', '.join(f'({k})' for k in absent)}." if absent else "."))


def expected_runs(arms: dict, chosen: List[str], n_runs: int, ablation_runs: int) -> Dict[str, int]:
    """Runs a command expects per arm of its ``--arms`` (all arms by default)."""
    return {k: len(arms[k].folds(ablation_runs if arms[k].ablation else n_runs)) for k in chosen}


def planned_runs(previous: dict, expected: Dict[str, int], report_only: bool) -> Dict[str, int]:
    """The runs a section expects per arm. A command that trains nothing (no train, curves or final stage, e.g.
    ``--stages report`` or ``--stages reevaluate report``) states the plan: its arms and
    runs. A command that trains adds its arms to the plan its section already has (``previous``: the section's
    JSON) and never shrinks it: the lane's ``--arms d --runs 1`` must not call the section complete and drop the
    missing runs of (a) and (p) that the report command named. A section written before the plan was recorded:
    its stored + missing runs. (A longer-budget check has a section of its own, planned by its own command.)"""
    if report_only:
        return dict(expected)
    planned = dict(previous.get("planned_runs") or {})
    if not planned:
        stored, missing = previous.get("stored_runs") or {}, previous.get("missing_runs") or {}
        planned = {k: len(stored.get(k, [])) + missing.get(k, 0) for k in {*stored, *missing}}
    for k, n in expected.items():
        planned[k] = max(planned.get(k, 0), n)
    return planned


def missing_runs(planned: Dict[str, int], runs: Dict[str, list]) -> dict:
    """Runs still to store, per arm of the section's plan (:func:`planned_runs`)."""
    return {k: n - len(runs.get(k, [])) for k, n in planned.items() if n > len(runs.get(k, []))}


def report_stem(task: dict, budget: dict) -> str:
    """One report per task and budget: ``convergence_<n>lab_<iterations>it``, multi-site
    ``convergence_<n>lab-site<X>-ms_<iterations>it`` (JSON, PNGs, BENCHMARKS.md section); each also lists the
    runs of the same task stored with other budgets."""
    from convergence_common import task_tag

    return f"convergence_{task_tag(task)}_{budget['iterations']}it"


def plateau_arms(chosen) -> tuple:
    """The arms the plateau criterion applies to: (a) and (c), and the recipe's arms (p), (x) when the section's
    plan includes them."""
    return ("a", "c") + tuple(k for k in ("p", "x") if k in chosen)


def _arm_list(keys, conjunction: str = "and") -> str:
    names = [f"({k})" for k in keys]
    return names[0] if len(names) == 1 else f"{', '.join(names[:-1])} {conjunction} {names[-1]}"


# ---------------------------------------------------------------------------------------------- multi-site
def site_tables(runs: Dict[str, list], sites: Dict[str, str], titles: Dict[str, str]) -> Optional[dict]:
    """Final test Dice per site (test cases grouped by the site they come from): per arm, each run's mean over the
    organs of the site's per-organ means (``skcdf_evaluate``'s way over all cases, restricted to the site), and the
    per-organ means over runs. None on the original phantom (no sites)."""
    from convergence_common import ARMS, dice_by_site

    if not sites:
        return None
    out: dict = {"sites": sorted(set(sites.values())), "cases": {}, "arms": {}}
    for key in ARMS:
        stored = runs.get(key, [])
        if not stored:
            continue
        per_run = [dice_by_site(r["final_summary"], sites) for r in stored]
        if not out["cases"]:
            names = [Path(c["reference_file"]).name.split(".")[0]
                     for c in stored[0]["final_summary"]["metric_per_case"]]
            out["cases"] = {site: sum(1 for n in names if sites.get(n) == site) for site in out["sites"]}
        out["arms"][key] = {
            "name": arm_name(stored[0]), "runs": len(stored),
            "mean": {site: [_mean(d[site]) for d in per_run if site in d] for site in out["sites"]},
            "all": [final_mean_dice(r) for r in stored],
            "per_organ": {site: {titles.get(k, k): 100 * float(np.nanmean([d[site][k] for d in per_run if site in d]))
                                 for k in titles} for site in out["sites"]}}
    return out


def _pm(values: List[float]) -> str:
    if not values:
        return "-"
    return f"{np.mean(values):.1f}" + (f" ± {np.std(values):.1f}" if len(values) > 1 else "")


def site_markdown(t: Optional[dict]) -> str:
    if not t or not t["arms"]:
        return ""
    head = " | ".join(f"site {s} ({t['cases'].get(s, 0)})" for s in t["sites"])
    rows = "\n".join(f"| ({k}) {x['name']} | {x['runs']} | " + " | ".join(_pm(x["mean"][s]) for s in t["sites"])
                     + f" | {_pm(x['all'])} |" for k, x in t["arms"].items())
    organs = list(next(iter(t["arms"].values()))["per_organ"][t["sites"][0]])
    per_organ = "\n\n".join(
        f"Site {s}, per organ (mean over runs):\n\n| arm | " + " | ".join(organs) + " |\n|---|"
        + "---|" * len(organs) + "\n" + "\n".join(
            f"| ({k}) | " + " | ".join(f"{x['per_organ'][s][o]:.1f}" for o in organs) + " |"
            for k, x in t["arms"].items()) for s in t["sites"])
    return ("Per site: final test Dice of the test cases of each site (number of cases in brackets; mean over the "
            "organs of the site's per-organ means, mean ± sd over runs):\n\n"
            f"| arm | runs | {head} | all |\n|---|---|" + "---|" * (len(t["sites"]) + 1) + "\n" + rows
            + "\n\n" + per_organ)


def pseudo_site_table(runs: Dict[str, list]) -> Dict[str, dict]:
    """Per SKCDF arm: ``D_l``'s pseudo labels on the hidden-label training cases at the last curve snapshot, per
    site (mean over organs, mean over the runs that measured them) and the number of cases per site."""
    out = {}
    for key, stored in sorted(runs.items()):
        points = [r["curve"][str(max(map(int, r["curve"])))] for r in stored if r.get("curve")]
        points = [p for p in points if "pseudo_dice_per_site" in p]
        if not points:
            continue
        sites = sorted(points[0]["pseudo_dice_per_site"])
        out[key] = {"runs": len(points), "cases": points[0].get("pseudo_cases_per_site", {}),
                    "sites": {s: [_mean(p["pseudo_dice_per_site"][s]) for p in points if s in p["pseudo_dice_per_site"]]
                              for s in sites}}
    return out


def first_candidate(runs: Dict[str, list], per_site: Optional[dict], titles: Dict[str, str], small: List[str],
                    labelled_site: Optional[str]) -> Optional[dict]:
    """Issue 39's first candidate by findings item 36, made mechanical (2026-12-08) before (d) had a stored run on the
    comparison task. From (d)'s first run with per-site diagnostics (``D_l``'s pseudo labels on the hidden-label
    training cases, last snapshot) and the all-labelled bound (c) (final test Dice, mean over its runs), each
    group's *shortfall* = (c)'s Dice - (d)'s pseudo-label Dice (points):

    - site gap = mean shortfall over the other sites - shortfall on the labelled site;
    - organ gap = mean shortfall over the four smallest organs - mean shortfall over the other organs.

    (r), appearance transfer, when the site gap is at least the organ gap (the shifted sites' pseudo labels trail
    most), else (u), the confidence filter. Measuring against (c) leaves out what no model reaches on a site or
    organ. None until (d) has such a run and (c) a final result, or on a one-site task."""
    d = next((r for r in runs.get("d", []) if r.get("curve")
              and any("pseudo_dice_per_site" in p for p in r["curve"].values())), None)
    c = runs.get("c", [])
    bound_sites = ((per_site or {}).get("arms", {}).get("c") or {}).get("mean", {})
    if d is None or not c or not bound_sites or labelled_site is None:
        return None
    last = d["curve"][str(max(int(e) for e, p in d["curve"].items() if "pseudo_dice_per_site" in p))]
    pseudo_sites = {s: _mean(v) for s, v in last["pseudo_dice_per_site"].items()}
    short_site = {s: float(np.mean(bound_sites[s])) - pseudo_sites[s] for s in pseudo_sites if bound_sites.get(s)}
    others = [s for s in sorted(short_site) if s != labelled_site]
    if labelled_site not in short_site or not others:
        return None
    small_keys = [k for k, t in titles.items() if t in small]
    short_organ = {k: 100 * float(np.nanmean([r["final_summary"]["mean"][k]["Dice"] for r in c]))
                   - 100 * float(last["pseudo_dice"][k]) for k in titles if k in last["pseudo_dice"]}
    site_gap = float(np.mean([short_site[s] for s in others])) - short_site[labelled_site]
    short_small = float(np.nanmean([short_organ[k] for k in small_keys if k in short_organ]))
    organ_gap = short_small - float(np.nanmean([v for k, v in short_organ.items() if k not in small_keys]))
    if not (np.isfinite(site_gap) and np.isfinite(organ_gap)):  # a NaN would decide for (u) without evidence
        return None
    return {"run": d["fold"], "shortfall_per_site": short_site, "site_gap": site_gap, "organ_gap": organ_gap,
            "shortfall_small": short_small, "choice": "r" if site_gap >= organ_gap else "u"}


def first_candidate_line(x: Optional[dict], labelled_site: Optional[str]) -> str:
    if not x:
        return ""
    sites = ", ".join(f"{s} {v:.1f}" for s, v in x["shortfall_per_site"].items())
    what = ("appearance transfer (r): the other sites' pseudo labels trail most" if x["choice"] == "r"
            else "the confidence filter (u): the small organs' pseudo labels trail most")
    return (f"Issue 39's first candidate (findings item 36, made mechanical before this task's (d) run was stored): "
            f"shortfall of (d)'s pseudo labels (fold {x['run']}, last snapshot) below the all-labelled bound's test "
            f"Dice per site: {sites}; site gap (other sites - site {labelled_site}) {x['site_gap']:.1f}, organ gap "
            f"(4 smallest - other organs) {x['organ_gap']:.1f} points: **{what}**.")


def pseudo_rounds_of(runs: Dict[str, list], key: str = "p") -> List[dict]:
    """The rounds of the pseudo-labelling arm (shared by its runs: one chain per work folder), from its first
    stored run."""
    return next((r["pseudo_rounds"] for r in runs.get(key, []) if r.get("pseudo_rounds")), [])


def chains_of(runs: Dict[str, list], key: str = "p") -> int:
    """How many different chains the stored runs of a pseudo-labelling arm come from (runs stored from two work
    folders were students of two chains: other teachers, other kept cases); the report's rounds table and chain
    cost are the first run's, and say so when this is more than 1."""
    signatures = {json.dumps([(x.get("round"), x.get("kept_ids"), x.get("teachers")) for x in r["pseudo_rounds"]],
                             sort_keys=True, default=str)
                  for r in runs.get(key, []) if r.get("pseudo_rounds")}
    return len(signatures)


def _dice_or_dash(d: Optional[Dict[str, float]]) -> str:
    return "-" if not d else f"{_mean(d):.1f}"


def pseudo_markdown(skcdf: Dict[str, dict], rounds: List[dict], chains: Optional[Dict[str, List[dict]]] = None,
                    mixed: Optional[Dict[str, int]] = None) -> str:
    """SKCDF's pseudo labels per site, then the rounds of (p) and of every other pseudo-labelling chain (``chains``:
    arm key -> its rounds, e.g. (w), whose round 1 SKCDF teaches); ``mixed``: arm -> the number of chains its stored
    runs come from (:func:`chains_of`), flagged where more than one."""
    parts = []
    if skcdf:
        sites = sorted({s for x in skcdf.values() for s in x["sites"]})
        rows = "\n".join(f"| ({k}) | {x['runs']} | " + " | ".join(_pm(x["sites"].get(s, [])) for s in sites) + " |"
                         for k, x in skcdf.items())
        cases = next(iter(skcdf.values()))["cases"]
        parts.append("SKCDF's pseudo labels per site (`D_l` on the hidden-label training cases, last snapshot, mean "
                     "Dice over organs, mean ± sd over the runs that measured them; cases per site in brackets):\n\n"
                     "| arm | runs | " + " | ".join(f"site {s} ({cases.get(s, '?')})" for s in sites) + " |\n"
                     "|---|---|" + "---|" * len(sites) + "\n" + rows)
    for arm, arm_rounds in {"p": rounds, **(chains or {})}.items():
        if arm_rounds:
            parts.append(rounds_markdown(arm, arm_rounds))
            if (mixed or {}).get(arm, 1) > 1:
                parts.append(f"**({arm})'s stored runs come from {mixed[arm]} different chains** (work folders): the "
                             "table above and the chain's cost are those of the first run's chain.")
    return "\n\n".join(parts)


def rounds_markdown(arm: str, rounds: List[dict]) -> str:
    """One pseudo-labelling chain's rounds: teachers, kept cases, pseudo-label Dice per site, students."""
    rows = []
    for r in rounds:
        sites = " ; ".join(f"{s}: {x['kept']}/{x['pool']}, {_dice_or_dash(x['pseudo_dice'])} "
                           f"({_dice_or_dash(x['pseudo_dice_kept'])})" for s, x in r["per_site"].items())
        students = r.get("students") or []
        student_text = (f"{_pm([_mean(x['test_dice']) for x in students])} over {len(students)}, "
                        f"{np.mean([x['train_s'] for x in students]) / 3600:.1f} h each"
                        if students else f"the ({arm}) runs")
        teachers = f"{len(r['teachers'] or [])} x {(r['teachers'] or [{}])[0].get('trainer', '?')}"
        seconds = f"{r['seconds'] / 60:.0f}" if r.get("seconds") is not None else "?"
        rows.append(f"| {r['round']} | {teachers} | {r['kept']}/{r['pool']} | {sites} | "
                    f"{_dice_or_dash(r['pseudo_dice'])} / {_dice_or_dash(r['pseudo_dice_kept'])} | {seconds} | "
                    f"{student_text} |")
    threshold, keep = rounds[0].get("threshold"), rounds[0].get("keep")
    rule = (f"threshold {threshold}: a case is kept when its teachers' mean organ Dice agreement, and from round 2 "
            "its agreement with the previous round, is at least that" if keep is None else
            "every case kept (`--keep 1.0`): no filter" if keep == 1.0 else
            f"`--keep {keep}`: the best-agreeing fraction of the cases kept")
    return (f"({arm}) rounds (`skcdf_pseudolabel`, {rule}). Pseudo-label Dice against the hidden labels of the "
            "hidden-label training cases (the round never reads them): all cases of the pool / the kept ones "
            "(imagesUnlabeled cases have no label); per site: kept/pool, Dice all (kept):\n\n"
            "| round | teachers | kept/pool | per site | pseudo-label Dice all / kept | "
            "skcdf_pseudolabel min | students: test mean Dice, training |\n|---|---|---|---|---|---|---|\n"
            + "\n".join(rows))


# ---------------------------------------------------------------------------------------------- room, cost, (p) vs (d)
def difference_se(x: List[float], y: List[float]) -> Optional[float]:
    """Standard error of mean(x) - mean(y) for two independent sets of runs (sample sd, ddof 1); None while either
    has fewer than 2 runs."""
    if len(x) < 2 or len(y) < 2:
        return None
    return float(np.sqrt(np.var(x, ddof=1) / len(x) + np.var(y, ddof=1) / len(y)))


def room(aggregate: dict, arms: dict, runs: Optional[Dict[str, list]] = None,
         missing: Optional[Dict[str, int]] = None) -> Optional[dict]:
    """Issue 44's room check: the final (a) -> (c) gap in mean Dice points and whether it is >= ROOM_POINTS, with
    the runs behind each side, the gap's standard error (sample sd of each arm's per-run values, ddof 1; None
    with fewer than 2 runs on a side) and ``provisional`` while (a) or (c) has runs still missing."""
    by = {m["name"]: m for m in aggregate["methods"]}
    a, c = by.get(arms["a"].name), by.get(arms["c"].name)
    if a is None or c is None:
        return None
    gap = 100 * (c["average"]["Dice"]["mean"] - a["average"]["Dice"]["mean"])
    values = {k: [final_mean_dice(r) for r in (runs or {}).get(k, [])] for k in ("a", "c")}
    se = difference_se(values["a"], values["c"])
    return {"a": 100 * a["average"]["Dice"]["mean"], "c": 100 * c["average"]["Dice"]["mean"], "gap": gap,
            "met": gap >= ROOM_POINTS, "runs": {k: len(v) for k, v in values.items()} if runs else {}, "se": se,
            "provisional": any((missing or {}).get(k) for k in ("a", "c"))}


def room_line(x: Optional[dict]) -> str:
    if x is None:
        return "Room (a) -> (c): not known yet (needs a final result of both)."
    verdict = (f"at least {ROOM_POINTS:.0f}: met" if x["met"] else
               f"under {ROOM_POINTS:.0f}: **not met** (reported, not enforced: the remedy is a harder site shift or "
               "fewer labelled cases, never a shorter training)")
    runs = x.get("runs") or {}
    counts = f" ({runs['a']} and {runs['c']} runs)" if runs else ""
    se = (f", standard error {x['se']:.1f} (sample sd of each arm's runs)" if x.get("se") is not None else "")
    provisional = " **Provisional**: runs of (a) or (c) are still missing." if x.get("provisional") else ""
    return (f"Room to show anything: (a) {x['a']:.1f} -> (c) {x['c']:.1f}{counts}, a gap of {x['gap']:.1f} mean "
            f"Dice points{se}, {verdict}.{provisional}")


def versus(aggregate: dict, arms: dict, first: str = "p", second: str = "d") -> Optional[dict]:
    """Final mean Dice of arm ``first`` against ``second`` (the practitioner's pseudo-labelling against SKCDF)."""
    by = {m["name"]: m for m in aggregate["methods"]}
    x, y = by.get(arms[first].name), by.get(arms[second].name)
    if x is None or y is None:
        return None
    dx, dy = 100 * x["average"]["Dice"]["mean"], 100 * y["average"]["Dice"]["mean"]
    return {first: dx, second: dy, "runs": {first: len(x.get("runs", [])), second: len(y.get("runs", []))},
            "difference": dx - dy}


def versus_line(v: Optional[dict], first: str = "p", second: str = "d") -> str:
    if v is None:
        return ""
    d = v["difference"]
    who = (f"({first}) beats ({second}) by {d:.1f}" if d > 0 else f"({first}) trails ({second}) by {-d:.1f}"
           if d < 0 else f"({first}) and ({second}) tie")
    return (f"The practitioner's baseline against SKCDF: ({first}) {v[first]:.1f} ({v['runs'][first]} run(s)), "
            f"({second}) {v[second]:.1f} ({v['runs'][second]} run(s)): {who} mean Dice points. ({first})'s runs are "
            f"the students of one chain (shared teachers and kept cases; they differ by the student's seed), so "
            f"their spread understates what another chain would vary by.")


def versus_q_lines(v: Optional[Dict[str, Optional[dict]]]) -> str:
    """(q), SKCDF as the student of the recipe's round 1, against (p) and (d), where both have a final result."""
    lines = []
    for other, what in (("p", "the recipe's 2 rounds"), ("d", "SKCDF alone")):
        x = (v or {}).get(other)
        if x is not None:
            d = x["difference"]
            lines.append(f"(q) {x['q']:.1f} ({x['runs']['q']} run(s)) against {what} ({other}) {x[other]:.1f} "
                         f"({x['runs'][other]} run(s)): {d:+.1f} mean Dice points.")
    return "".join(" " + line for line in lines)


#: the rows every candidates table starts with, where they have a final result: nnU-Net, the recipe, SKCDF with the
#: reference's settings, SKCDF's defaults
CANDIDATE_REFERENCES = ("a", "p", "x", "v", "d")


def candidate_table(aggregate: dict, arms: dict, runs: Dict[str, list], per_site: Optional[dict],
                    small: List[str]) -> Optional[dict]:
    """Issue 39's table: each candidate arm (``Arm.candidate``) with a final result, its measured effect (mean Dice,
    the 4 smallest organs, per site, ASD, NSD) and the commits its runs trained at, beside the references
    :data:`CANDIDATE_REFERENCES`. Differences to (d) and (p) are of the means over each arm's runs. None while no
    candidate has a final result."""
    by = {m["name"]: m for m in aggregate["methods"]}
    present = [k for k, a in arms.items() if a.name in by and runs.get(k)]
    chosen = [k for k in present if arms[k].candidate]
    if not chosen:
        return None
    keys = [cl["key"] for cl in aggregate["classes"] if cl["column"] in small]
    sites = (per_site or {}).get("sites", [])
    rows = {}
    for k in [k for k in CANDIDATE_REFERENCES if k in present] + chosen:
        m = by[arms[k].name]
        site_means = ((per_site or {}).get("arms", {}).get(k) or {}).get("mean", {})
        rows[k] = {"name": arms[k].name, "runs": len(runs[k]), "candidate": arms[k].candidate,
                   "mean": 100 * m["average"]["Dice"]["mean"],
                   "small": 100 * float(np.mean([m["per_class"][c]["Dice"]["mean"] for c in keys])) if keys else None,
                   "sites": {site: float(np.mean(site_means[site])) if site_means.get(site) else None
                             for site in sites},
                   "asd": m["average"]["ASD"]["mean"], "nsd": 100 * m["average"]["NSD"]["mean"],
                   "missed": missed_per_run(m), "commits": sorted({r["commit"] for r in runs[k]})}
    for x in rows.values():
        x["vs"] = {ref: x["mean"] - rows[ref]["mean"] for ref in ("d", "p", "x") if ref in rows}
    return {"sites": sites, "small": list(small), "rows": rows}


def candidate_markdown(t: Optional[dict]) -> str:
    if not t:
        return ""

    def num(v, digits=1):
        return "-" if v is None else f"{v:.{digits}f}"

    def diff(x, ref):
        return "-" if ref not in x["vs"] or x is t["rows"].get(ref) else f"{x['vs'][ref]:+.1f}"

    head = "".join(f" site {s} |" for s in t["sites"])
    # the recipe without a filter (x), where it ran: a claim over the recipe holds against the better of (p), (x)
    with_x = "x" in t["rows"]
    rows = "\n".join(
        f"| ({k}) {x['name']} | {x['runs']} | {num(x['mean'])} | {diff(x, 'd')} | {diff(x, 'p')} |"
        + (f" {diff(x, 'x')} |" if with_x else "") + f" {num(x['small'])} |"
        + "".join(f" {num(x['sites'][s])} |" for s in t["sites"])
        + f" {num(x['asd'], 2)} | {num(x['nsd'])} | {num(x.get('missed'))} | {', '.join(x['commits'])} |"
        for k, x in t["rows"].items())
    return ("Issue 39's candidates beside nnU-Net (a), the recipe (p) (and without its filter, (x), where it ran), "
            "SKCDF with the reference's settings (v) and "
            "SKCDF's defaults (d): final test results "
            f"(mean over runs; 4 smallest = {', '.join(t['small'])}; per site as in the per-site table; ASD in mm, "
            "NSD in %, both over the organ-cases the prediction found; missed = organ-cases per run whose "
            "prediction has none of the organ, left out of ASD and NSD; the commits the runs trained at). One run "
            "screens a candidate; a default changes only on 3 runs.\n\n"
            f"| arm | runs | mean Dice | vs (d) | vs (p) |{' vs (x) |' if with_x else ''} 4 smallest |{head} ASD | "
            "NSD | missed | commits |\n"
            "|---|---|---|---|---|---|" + "---|" * (len(t["sites"]) + with_x) + "---|---|---|---|\n" + rows)


def cost_per_arm(runs: Dict[str, list], budget: dict) -> Dict[str, dict]:
    """Training hours per run of each arm (the sum of its epochs; runs stored before that was recorded: the median
    epoch x epochs, marked estimated); for (p), and every chain round 1 of which another arm teaches ((w): (d)),
    also its chain, paid once for all its runs: the rounds' ``skcdf_pseudolabel`` and the earlier rounds' students
    (round 1's teachers are the teacher arm's runs; those trained again in the chain's work folder are counted)."""
    out = {}
    for key, stored in sorted(runs.items()):
        hours = [(r["train_s"] if r.get("train_s") is not None else r["train_epoch_s_median"] * budget["epochs"]) / 3600
                 for r in stored]
        out[key] = {"runs": len(stored), "hours_per_run": float(np.mean(hours)),
                    "estimated": any(r.get("train_s") is None for r in stored), "threads": threads_of(stored),
                    "epoch_s_median": [float(r["train_epoch_s_median"]) for r in stored
                                       if r.get("train_epoch_s_median") is not None]}
    from convergence_common import ARMS, chain_arms

    for key in [k for k in chain_arms() if k in out]:
        arm = ARMS[key]
        rounds = pseudo_rounds_of(runs, key)
        if not rounds:
            continue
        # a teacher is a stored run of the teacher arm when the store (at report time: it may have been stored
        # after the round was made) has a run of it with the same training starts
        stored_starts = [r.get("train_commits") for r in runs.get(arm.teacher, []) if r.get("train_commits")]
        retrained = [t["train_s"] or 0.0 for t in rounds[0].get("teacher_runs", [])
                     if not (t.get("stored_run") or (t.get("train_commits") and t["train_commits"] in stored_starts))]
        out[key]["chain"] = {
            "teacher": arm.teacher,
            "pseudolabel_h": sum((r.get("seconds") or 0.0) for r in rounds) / 3600,
            "students_h": sum((x.get("train_s") or 0.0) for r in rounds for x in r.get("students") or []) / 3600,
            "teachers_retrained": len(retrained), "teachers_retrained_h": sum(retrained) / 3600}
    return out


def threads_of(stored: List[dict]) -> str:
    """The torch threads the runs' training starts used, as the cost table shows them: ``1``, ``2``, ``1, 2``;
    ``all`` for nnU-Net's default (every core); ``?`` for starts recorded before the threads were."""
    seen = []
    for run in stored:
        for start in run.get("train_commits") or [{}]:
            value = ("all" if start["threads"] is None else str(start["threads"])) if "threads" in start else "?"
            if value not in seen:
                seen.append(value)
    return ", ".join(sorted(seen, key=lambda v: (not v.isdigit(), v.zfill(4))))


def cost_markdown(cost: Dict[str, dict]) -> str:
    if not cost:
        return ""
    rows = "\n".join(f"| ({k}) | {x['runs']} | {x['hours_per_run']:.2f}{' (estimated)' if x['estimated'] else ''} | "
                     f"{', '.join(f'{v:.1f}' for v in x.get('epoch_s_median', [])) or '-'} | "
                     f"{x.get('threads', '?')} |" for k, x in cost.items())
    text = ("Cost: training hours per run (sum of the epochs' times; estimated = median epoch x epochs, for runs "
            "stored before the sum was recorded), each run's median epoch (50 iterations), and the torch threads "
            "of the runs' training starts (`--threads`; `?`: recorded before the threads were). The times include "
            "whatever ran beside the training on the 2 cores (another lane, tests, a paused suite): arms with the "
            "same trainer, batch and patch ((a), (c), the recipe's students) cost the same per epoch, so a "
            "difference between their median epochs is contention, not the method; compare the smallest median "
            "epochs:\n\n| arm | runs | training h per run | median epoch per run (s) | threads |\n"
            "|---|---|---|---|---|\n" + rows)
    for key, x in cost.items():
        chain = x.get("chain")
        if not chain:
            continue
        teacher = chain.get("teacher", "a")  # store files written before chains had other teachers: (a)
        students = (f", the earlier rounds' students {chain['students_h']:.2f} h" if chain["students_h"] else "")
        text += (f"\n\n({key})'s chain, paid once for all its runs: skcdf_pseudolabel {chain['pseudolabel_h']:.2f} h "
                 f"over the rounds{students}; round 1's teachers are "
                 f"({teacher})'s runs" + (f" ({chain['teachers_retrained']} of them trained again in this work "
                                          f"folder, {chain['teachers_retrained_h']:.2f} h: the stored ({teacher}) "
                                          "runs' checkpoints were elsewhere)" if chain["teachers_retrained"] else "")
                 + ".")
    return text


def report(args, budget: dict, task: dict, runs: Dict[str, list], budgets_elsewhere: Dict[str, list], raw: Path,
           work: Path, wall_s: float) -> None:
    from convergence_common import ARMS, SMALLEST, case_sites, chain_arms
    from nnunetv2_skcdf.utilities.io import atomic_output
    from trainers.convergence_trainers import ITERATIONS_PER_EPOCH

    dataset_json = json.loads((raw / "dataset.json").read_text())
    sites = case_sites(raw)
    titles = class_titles(dataset_json)
    small_keys = [k for k, t in titles.items() if t in SMALLEST]
    curves = curve_table(runs, small_keys)
    plateaus = {k: plateau(c) for k, c in curves.items()}
    others = other_budgets(runs, budgets_elsewhere, small_keys)
    stem = report_stem(task, budget)
    RESULTS.mkdir(exist_ok=True)
    figures = {}
    if curves:
        figures["curves"] = RESULTS / f"{stem}_curves.png"
        plot_curves(curves, figures["curves"])
    diag = skcdf_diagnostics(runs, titles)
    if diag:
        figures["diagnostics"] = RESULTS / f"{stem}_diagnostics.png"
        plot_diagnostics(diag, titles, ITERATIONS_PER_EPOCH, figures["diagnostics"])
    final = final_table(runs, dataset_json)
    goal = goals_per_arm(final["aggregate"], ARMS, list(SMALLEST)) if final else {}
    islands = islands_per_run(final["aggregate"], list(SMALLEST)) if final else {}
    gaps = gap_per_organ(final["aggregate"], ARMS, runs) if final else None
    per_site = site_tables(runs, sites, titles)
    result_file = RESULTS / f"{stem}.json"
    stored = json.loads(result_file.read_text()) if result_file.is_file() else {}
    planned = planned_runs(stored, expected_runs(ARMS, args.arms, args.runs, args.ablation_runs),
                           not {"train", "curves", "final"} & set(args.stages))
    baselines = plateau_arms(planned)
    overlays = {}  # figure name -> its lines (arm: median case, slice)
    local = {}  # per arm, its first run whose predictions are in this work folder
    for k, rs in runs.items():
        here = next((r for r in rs if Path(r["prediction_folder"]).is_dir()), None)
        if here is not None:
            local[k] = here
    previous = {name: stored.get(name, []) for name in OVERLAYS}
    plan = overlay_plan(previous, set(local))
    drop_unplanned_overlays(RESULTS, stem, plan)
    for name, action in plan.items():
        figure = overlay_figure(RESULTS, stem, name)
        if action == "draw":  # the predictions live in the work folder of the session that made them
            figures[name] = figure
            overlays[name] = plot_overlay({k: Path(r["prediction_folder"]) for k, r in local.items()},
                                          {k: arm_name(r) for k, r in local.items()}, raw,
                                          {k: r["final_summary"] for k, r in local.items()}, figure)
        elif figure.is_file():  # an earlier session drew arms this one has no predictions of
            figures[name] = figure
            overlays[name] = previous[name]
    missing = missing_runs(planned, runs)
    results = {"date": datetime.date.today().isoformat(), "machine": machine(), "commit": commit(),
               "command": "python benchmarks/convergence.py " + " ".join(sys.argv[1:]), "budget": budget,
               "task": task,
               "status": "partial" if missing else "complete", "planned_runs": planned, "missing_runs": missing,
               "stored_runs": {k: [(r["fold"], r["commit"], r["date"]) for r in v] for k, v in runs.items()},
               "train_epoch_s_median": {k: [r["train_epoch_s_median"] for r in v] for k, v in runs.items()},
               "curves": curves, "plateau": plateaus, "other_budgets": others, "goals": goal, "diagnostics": diag,
               "final_table": final["table"] if final else None, "islands_per_run": islands,
               "gap_per_organ": gaps, "plateau_arms": list(baselines),
               "regime": regime(plateaus, others, budget["iterations"], baselines),
               "room": room(final["aggregate"], ARMS, runs, missing) if final else None,
               "versus": versus(final["aggregate"], ARMS) if final else None,
               # the recipe without a filter (findings item 37), where it was run
               "versus_x": versus(final["aggregate"], ARMS, "x", "d") if final else None,
               # issue 39's combination candidate (q) against the recipe and against SKCDF alone
               "versus_q": {k: versus(final["aggregate"], ARMS, "q", k) for k in ("p", "d")} if final else None,
               "candidates": candidate_table(final["aggregate"], ARMS, runs, per_site, list(SMALLEST))
               if final else None,
               "per_site": per_site, "pseudo_per_site": pseudo_site_table(runs),
               "first_candidate": first_candidate(runs, per_site, titles, list(SMALLEST), task.get("labelled_site")),
               "pseudo_rounds": pseudo_rounds_of(runs),
               "other_chains": {k: pseudo_rounds_of(runs, k) for k in chain_arms()
                                if k != "p" and pseudo_rounds_of(runs, k)},
               "chains_per_arm": {k: n for k in chain_arms() if (n := chains_of(runs, k))},
               "cost": cost_per_arm(runs, budget),
               **{name: overlays.get(name, []) for name in OVERLAYS}}
    with atomic_output(str(result_file)) as tmp:
        Path(tmp).write_text(json.dumps(results, indent=1, default=str) + "\n")
    print(json.dumps({k: results[k] for k in ("status", "missing_runs", "plateau", "room", "versus", "goals")},
                     indent=1, default=str))
    write_section(stem, markdown(results, figures))
    print("the result tables of README.md, documentation/results.md and BENCHMARKS.md's summary are generated from "
          "the store: run `python benchmarks/results_tables.py` (tests/test_docs_generated.py checks them)")


def task_line(task: dict) -> str:
    other = f"{task['num_train'] - int(task['val'])}" if str(task["val"]).isdigit() else "non-validation"
    if task.get("sites"):
        sites, site = ", ".join(task["sites"]), task["labelled_site"]
        hidden = task["num_train"] - int(task["val"]) - int(task["labeled"])
        return (f"Task: multi-site phantom (`skcdf_make_phantom --sites {' '.join(task['sites'])}`: sites {sites}, "
                f"case i of every role from site i mod {len(task['sites'])}) with {task['num_train']} training cases: "
                f"{task['val']} validation and {task['labeled']} labelled cases, all of site {site} (its first "
                f"training cases), the other {hidden} of every site with hidden labels; {task['num_unlabeled']} "
                f"imagesUnlabeled images of every site; {task['num_test']} test cases of every site; (c) trains on "
                f"all {other} non-validation training cases, every site, with labels. Split written by `skcdf_split "
                f"--import-lists` from lists made of phantom_cases.json.")
    return (f"Task: phantom with {task['num_train']} training cases ({task['val']} validation, {task['labeled']} of "
            f"the other {other} labelled, the rest with hidden labels), {task['num_unlabeled']} imagesUnlabeled "
            f"images, {task['num_test']} test cases; (c) trains on all {other} with labels.")


def longer_budget_gains(others: List[dict], iterations: int, arms: tuple = ("a", "c")) -> List[dict]:
    """(a) and (c) runs stored with a longer budget beside the runs at this one: what the longer schedule adds at
    its end (a last quarter that adds little can still sit below a longer schedule's end: the poly schedule
    anneals whatever the budget). One entry per arm and longer budget: ``gain`` = the mean of the longer budget's
    runs - the mean of every run of the arm at this budget (unpaired: folds repeat one split, so fold k at two
    budgets are two independent trainings), with both run counts; ``se`` is the difference's standard error
    (:func:`difference_se`; None while either side has fewer than 2 runs)."""
    groups: Dict[tuple, List[dict]] = {}
    for x in others:
        if x["arm"] in arms and x["iterations"] > iterations and x.get("this_budget_runs"):
            groups.setdefault((x["arm"], x["iterations"]), []).append(x)
    out = []
    for (arm, its), xs in sorted(groups.items()):
        xs = sorted(xs, key=lambda x: x["fold"])
        longer, here = [x["mean"] for x in xs], xs[0]["this_budget_runs"]
        se = difference_se(longer, here)
        out.append({"arm": arm, "iterations": its, "folds": [x["fold"] for x in xs], "runs": len(longer),
                    "this_budget_n": len(here), "gain": float(np.mean(longer) - np.mean(here)), "se": se,
                    "mean": float(np.mean(longer)), "this_budget_mean": float(np.mean(here))})
    return out


def _which(x: dict) -> str:
    """'(a), 1 run at 16000 against 3 here'."""
    return (f"({x['arm']}), {x['runs']} run{'s' if x['runs'] > 1 else ''} at {x['iterations']} against "
            f"{x['this_budget_n']} here")


def _se(x: dict) -> str:
    return (f" ± {x['se']:.1f} (standard error)" if x.get("se") is not None
            else " (no standard error: one run on a side)")


def regime(plateaus: Dict[str, Optional[dict]], others: List[dict] = (), iterations: int = 0,
           arms: tuple = ("a", "c")) -> str:
    """Whether this budget is the converged regime: the baselines ``arms`` ((a) and (c); (p) too where the report's
    arms include it) all meet the plateau criterion, and no longer budget stored for one of them adds as much as the
    criterion, on the mean of the folds stored at both. A baseline beyond (a) and (c) without a stored curve yet is
    named after the verdict on the others (it does not hide theirs)."""
    pending = [k for k in arms if k not in ("a", "c") and plateaus.get(k) is None]
    verdict = _regime(plateaus, others, iterations, tuple(k for k in arms if k not in pending))
    return verdict + (f" {_arm_list(pending)}: no stored curve at this budget yet." if pending else "")


def _regime(plateaus: Dict[str, Optional[dict]], others: List[dict], iterations: int, arms: tuple) -> str:
    longer = longer_budget_gains(list(others), iterations, arms)
    beaten = [x for x in longer if x["gain"] >= PLATEAU_POINTS]
    if beaten:
        return ("**not converged**: " + ", ".join(
            f"{_which(x)}: {x['mean']:.1f} against {x['this_budget_mean']:.1f}, {x['gain']:+.1f}{_se(x)}"
            for x in beaten)
            + f" (criterion < {PLATEAU_POINTS}), whatever the last quarter adds; compare arms at the longer budget.")
    status = {k: plateaus.get(k) for k in arms}
    if any(p is None for p in status.values()):
        return "plateau not known yet (" + ", ".join(f"({k})" for k, p in status.items() if p is None) + \
            " has no stored curve at this budget)."
    if all(p["met"] for p in status.values()):
        checked = ("; a longer budget adds " + ", ".join(f"{x['gain']:+.1f}{_se(x)} to {_which(x)}"
                                                        for x in longer)
                   if longer else f"; no longer budget stored for {_arm_list(arms, 'or')} yet")
        return (f"**converged**: {_arm_list(arms)} gain < {PLATEAU_POINTS} mean Dice point over the last quarter "
                f"(table below){checked}.")
    rising = [k for k, p in status.items() if not p["met"]]
    gains = ", ".join(f"({k}) gains {status[k]['gain']:+.1f}" for k in rising)
    checked = [x for x in longer if x["arm"] in rising]
    if not checked:
        return (f"**short budget, not converged**: {gains} mean Dice over the last quarter (criterion < "
                f"{PLATEAU_POINTS}); read accuracy claims with that.")
    # a curve still rising over its last quarter, but runs trained longer end no higher: the schedule's annealing
    # tail (the poly learning rate falls to 0 whatever the budget), not missing training
    unchecked = [k for k in rising if k not in {x["arm"] for x in checked}]
    single = [x for x in checked if x.get("se") is None]
    return (("**plateau by the longer budget**" if not unchecked else "**short budget, not converged**")
            + (" (on a single run: read it as an indication)" if single and not unchecked else "")
            + f": {gains} mean Dice over the last quarter (criterion < {PLATEAU_POINTS}), but a longer budget adds "
            + ", ".join(f"{x['gain']:+.1f}{_se(x)} to {_which(x)}" for x in checked)
            + f" (< {PLATEAU_POINTS}: the rise is the schedule's annealing, not missing training)"
            + (f"; {_arm_list(unchecked)}: no longer budget stored yet, read accuracy claims with that."
               if unchecked else "."))


def goals_markdown(g: Optional[dict], stem: str) -> str:
    """The goals as a table (gains in mean Dice points, the share of the (a)->(c) gap, which goals are met) and a
    link to the JSON file that holds them in full (no raw JSON in BENCHMARKS.md)."""
    link = f"All values: `goals` in [benchmarks/results/{stem}.json](benchmarks/results/{stem}.json)."
    if not g:
        return "no final table yet. " + link
    rows = []
    for key, x in g.items():
        if "gain_mean" not in x:
            rows.append(f"| ({key}) | {x.get('status', '-')} | | | |")
            continue
        met = [name for name in ("goal_gain_mean_5", "goal_gain_small_10", "goal_asd_nsd_not_worse",
                                 "goal_gap_closed_40pct") if x.get(name)]
        closed = f"{round(100 * x['gap_closed'])} %" if "gap_closed" in x else "-"
        rows.append(f"| ({key}) | {x['gain_mean']:+.2f} | {x['gain_small']:+.2f} | {closed} | "
                    f"{', '.join(met) or 'none'} |")
    return ("| arm | gain, mean Dice | gain, 4 smallest | gap closed | goals met |\n|---|---|---|---|---|\n"
            + "\n".join(rows) + "\n\nGoal `goal_asd_nsd_not_worse`: ASD no higher, NSD no lower and no more missed "
              "organ-cases per run (no surface, so left out of ASD and NSD) than (a). " + link)


def nest_report(table: str, prefix: str) -> str:
    """``skcdf_evaluate``'s report (``## Results``, ``### Further metrics``, ...) as sub-headings of the section
    that embeds it: one level deeper, each title led by ``prefix`` (e.g. "2 labelled cases, 8000 iterations:
    further metrics"), so that no two headings of BENCHMARKS.md read alike."""
    out = []
    for line in table.split("\n"):
        m = re.match(r"^(#{1,5}) (.+)$", line)
        if m:
            title = m.group(2)
            title = "per-organ " + title[0].lower() + title[1:] if title.startswith("Results") \
                else title[0].lower() + title[1:]
            line = f"{m.group(1)}# {prefix}: {title}"
        out.append(line)
    return "\n".join(out)


def curve_points_line(budget: dict, curves: Dict[str, dict]) -> str:
    """The budget's curve points, and the arms whose mean curve has fewer (runs evaluated with --curve-every)."""
    from trainers.convergence_trainers import ITERATIONS_PER_EPOCH

    full = [e * ITERATIONS_PER_EPOCH for e in sorted(budget["snapshot_epochs"])]
    fewer = [f"({k}) at {', '.join(map(str, c['iterations']))}" for k, c in curves.items() if c["iterations"] != full]
    return ", ".join(map(str, full)) + (
        "; mean curves with the points every run of the arm was evaluated at (`--curve-every`): " + "; ".join(fewer)
        if fewer else "")


def markdown(r: dict, figures: dict) -> str:
    from convergence_common import SMALLEST

    rows = []
    for key, c in r["curves"].items():
        p = r["plateau"].get(key)
        rows.append(f"| ({key}) {c['name']} | {c['runs']} | {np.mean(c['mean'][-1]):.1f} ± {np.std(c['mean'][-1]):.1f}"
                    f" | {np.mean(c['small'][-1]):.1f} | " + (f"{p['gain']:+.2f} ({p['from_iteration']}->"
                                                                f"{p['to_iteration']})" if p else "n/a") + " |")
    curve_rows = "\n".join(rows)
    others = "\n".join(
        f"| ({x['arm']}) {x['name']} | {x['fold']} | {x['iterations']} | {x['mean']:.1f} | {x['small']:.1f} | "
        + (f"{x['this_budget_mean']:.1f} / {x['this_budget_small']:.1f}" if x["this_budget_mean"] is not None
           else "not stored") + " | "
        + (f"{x['plateau']['gain']:+.2f} ({x['plateau']['from_iteration']}->{x['plateau']['to_iteration']})"
           if x.get("plateau") else "no curve") + " |" for x in r["other_budgets"])
    if others:
        others = ("Other budgets (the same arm trained for another number of iterations, each with its own poly "
                  "schedule; final checkpoint, stock predict + skcdf_evaluate). The folds of a task repeat one split "
                  "and differ by the training seed only: a fold at two budgets is two independent runs, and the "
                  "regime line compares the means of all runs at each budget; the same fold here is shown for "
                  "reference:\n\n"
                  "| arm | fold | iterations | final mean Dice | final 4 smallest | "
                  f"at {r['budget']['iterations']} (mean / 4 smallest) | its own last-quarter gain |\n"
                  "|---|---|---|---|---|---|---|\n"
                  + others)
    its = curve_points_line(r["budget"], r["curves"])
    pics = "\n".join(f"![{k}](benchmarks/results/{Path(v).name})" for k, v in figures.items())
    pics += "".join(overlay_note(r.get(name, []), list(r["stored_runs"]), title)
                    for name, title in OVERLAYS.items())
    islands = "\n".join(
        f"| {name} | {x['runs']} | {x['all']:.1f} | {x['all_cm3']:.1f} | {x['small']:.1f} | {x['small_cm3']:.2f} |"
        if x else f"| {name} | - | n/a | n/a | n/a | n/a |" for name, x in r.get("islands_per_run", {}).items())
    if islands:
        islands = ("Islands per run (predicted components with no voxel in the reference organ, over the "
                   f"{r['task']['num_test']} test cases; 4 smallest = {', '.join(SMALLEST)}):\n\n"
                   "| arm | runs | islands, all organs | volume cm³ | islands, 4 smallest | volume cm³ |\n"
                   "|---|---|---|---|---|---|\n" + islands)
    goal_text = goals_markdown(r["goals"], report_stem(r["task"], r["budget"]))
    labelled = f"{r['task']['labeled']} labelled cases"
    if r["task"].get("sites"):
        labelled += f" of site {r['task']['labelled_site']}"
    run_label = f"{labelled}, {r['budget']['iterations']} iterations"  # leads the embedded report's headings
    if r["task"].get("sites"):
        labelled += f", multi-site phantom ({', '.join(r['task']['sites'])})"
    baselines = tuple(r.get("plateau_arms", ("a", "c")))
    extra = "\n\n".join(x for x in (candidate_markdown(r.get("candidates")), site_markdown(r.get("per_site")),
                                      pseudo_markdown(r.get("pseudo_per_site") or {}, r.get("pseudo_rounds") or [],
                                                      r.get("other_chains") or {}, r.get("chains_per_arm") or {}),
                                      first_candidate_line(r.get("first_candidate"), r["task"].get("labelled_site")),
                                      cost_markdown(r.get("cost") or {})) if x)
    return f"""## Accuracy against nnU-Net, {labelled}, {r['budget']['iterations']} iterations (`benchmarks/convergence.py`) — status: **{r['status']}**

Regime: {regime(r['plateau'], r['other_budgets'], r['budget']['iterations'], baselines)}

{room_line(r.get('room'))} {versus_line(r.get('versus'))}{(' ' + versus_line(r.get('versus_x'), 'x')) if r.get('versus_x') else ''}{versus_q_lines(r.get('versus_q'))}

Command: `{r['command']}` — {r['date']} — commit {r['commit']} — {r['machine']}.
Runs stored in `benchmarks/results/convergence/` (arm: fold, commit, date): {r['stored_runs'] or 'none'}.
Runs still missing: {r['missing_runs'] or 'none'}. Median training epoch (50 iterations): {r['train_epoch_s_median']} s.

{task_line(r['task'])}
Budget: {r['budget']['iterations']} iterations per arm (epochs of 50, nnU-Net's poly schedule over the budget),
curve points at iterations {its}. Test-set Dice in these curves: nnU-Net sliding window on the preprocessed grid
(`convergence_eval.py`); the final table below: stock `nnUNetv2_predict` + `skcdf_evaluate`.
Plateau criterion: the last quarter of the budget adds < {PLATEAU_POINTS} mean Dice point to {_arm_list(baselines)}.
The curves' last point (this table) is the final checkpoint on the preprocessed grid; the per-organ table below
evaluates the same checkpoint through stock predict on the original grid, so the two differ.

| arm | runs | curve's last point: mean Dice | its 4 smallest | last-quarter gain (plateau) |
|---|---|---|---|---|
{curve_rows}

{others}

{pics}

{nest_report(r['final_table'] or '', run_label)}

{islands}

{gap_markdown(r.get("gap_per_organ"))}

{extra}

Goals of each SKCDF arm with a final result against (a), gap (a)->(c); (d) = SKCDFTrainer's defaults since 0.4.0, (g) = 0.3's, (b) = up to 0.2:

{goal_text}"""
