"""The closing table of ``run_demo.sh``: per-organ test Dice of each arm, its wall time, the regime in one line, the
labelled-only nnU-Net's plateau check, and the converged comparison read from the README's generated table.

Nothing here is typed in by hand: the Dice values come from the arms' ``summary.json`` files
(``nnUNetv2_evaluate_folder``), the times from ``times.tsv`` (written by ``run_demo.sh`` around each arm), the
regime from ``run_demo.sh``'s own settings (passed as arguments), and the converged figures from the table between
``<!-- results_tables:accuracy:start/end -->`` in README.md, which ``benchmarks/results_tables.py`` generates from
``benchmarks/results/``; the labelled-only model's stored learning curves at this budget and at twice it, from
``benchmarks/results/demo_plateau.json`` (``benchmarks/demo_plateau.py``).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nnunetv2_skcdf.evaluation.dice_table import dice_table  # noqa: E402

#: (arm folder under the demo's output folder, row name); the rows' order in the table
ARMS: Tuple[Tuple[str, str], ...] = (
    ("nnunet", "nnU-Net, labelled cases only"),
    ("pseudolabel", "nnU-Net + pseudo-labelling recipe (1 round)"),
    ("skcdf", "SKCDF"),
)
PLATEAU_ARM = "nnunet_plateau"
#: the plateau criterion of the demo (issue 43): the last quarter of the budget adds under this many points
PLATEAU_POINTS = 2.0
ACCURACY_MARKERS = ("<!-- results_tables:accuracy:start -->", "<!-- results_tables:accuracy:end -->")


def read_times(path: Path) -> Dict[str, float]:
    """``arm<TAB>seconds`` per line (the last entry of an arm wins: a rerun of the demo appends)."""
    times: Dict[str, float] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                arm, seconds = line.split("\t")
                times[arm] = float(seconds)
    return times


def mean_dice(summary: dict) -> float:
    """Mean foreground Dice of an nnU-Net ``summary.json`` (loaded), in %."""
    return 100 * summary["foreground_mean"]["Dice"]


def minutes(seconds: Optional[float]) -> str:
    return "-" if seconds is None else f"{seconds / 60:.1f} min"


def converged_table(readme: Path) -> str:
    """The README's generated accuracy table (between its markers), or a pointer when it is missing."""
    text = readme.read_text() if readme.exists() else ""
    start, end = ACCURACY_MARKERS
    if start not in text or end not in text:
        return f"(no generated accuracy table in {readme})"
    return text.split(start, 1)[1].split(end, 1)[0].strip()


def stored_curves(store: Path, iterations: int) -> List[str]:
    """What ``benchmarks/demo_plateau.py`` stored about the labelled-only model at this budget and at twice it (the
    curve of more than this one run: does a longer budget end higher?); nothing where it has no such figures."""
    if not store.exists():
        return []
    d = json.loads(store.read_text())
    here, twice = str(iterations), str(2 * iterations)
    if here not in d.get("final_mean", {}):
        return []
    runs = f"{d['runs']} run{'s' if d['runs'] > 1 else ''} per budget"
    text = (f"Stored learning curves of this labelled-only model (benchmarks/demo_plateau.py, {runs}, commit "
            f"{d['commit']}, BENCHMARKS.md#demo_plateau): mean test Dice {d['final_mean'][here]:.1f} after {here} "
            f"iterations")
    if twice in d["final_mean"]:
        gain = d["final_mean"][twice] - d["final_mean"][here]
        verdict = ("within the criterion: a longer budget does not change it" if gain < PLATEAU_POINTS else
                   "so at this budget the arms are compared below the labelled-only model's plateau; "
                   "`bash run_demo.sh --long` trains twice as long")
        text += f", {d['final_mean'][twice]:.1f} after {twice}: twice the budget ends {gain:+.1f} points higher, {verdict}"
    return ["", text + "."]


def report(out: Path, dataset_json: Path, labelled: int, hidden: int, extra_unlabelled: int, test_cases: int,
           iterations: int, plateau_iterations: int, task: str, readme: Path,
           curves_store: Path = REPO / "benchmarks" / "results" / "demo_plateau.json") -> str:
    labels = {v: k for k, v in json.loads(dataset_json.read_text())["labels"].items() if isinstance(v, int)}
    summaries = {}
    for folder, name in ARMS:
        path = out / folder / "summary.json"
        if not path.exists():
            raise FileNotFoundError(f"{path}: the arm '{name}' has no evaluation; run_demo.sh stopped before it.")
        summaries[name] = json.loads(path.read_text())
    times = read_times(out / "times.tsv")
    lines: List[str] = [
        f"Regime: {task}; {labelled} labelled training cases, {hidden} training cases with hidden labels + "
        f"{extra_unlabelled} extra unlabelled images; {iterations} iterations per arm; 1 run; {test_cases} test cases.",
        "",
        dice_table(summaries, labels),
        "",
        "Wall time per arm (training + prediction of the test set, on one core, the other lane running on the "
        "other; the pseudo-labelling arm: the round (pseudo labels of the unlabelled images by the labelled-only "
        "model) + its student's training + prediction, after the labelled-only model it starts from):",
    ]
    lines += [f"  {name}: {minutes(times.get(folder))}" for folder, name in ARMS]
    if "lanes" in times:
        lines.append(f"  both lanes (labelled-only -> pseudo-labelling | SKCDF), side by side: {minutes(times['lanes'])}")
    if "total" in times:
        lines.append(f"  whole demo, set-up included: {minutes(times['total'])}")
    plateau_path = out / PLATEAU_ARM / "summary.json"
    if plateau_path.exists():
        early = mean_dice(json.loads(plateau_path.read_text()))
        final = mean_dice(summaries[ARMS[0][1]])
        verdict = "met" if final - early < PLATEAU_POINTS else "not met: still rising"
        lines += ["", f"Plateau check, labelled-only nnU-Net: mean test Dice {early:.1f} at {plateau_iterations} "
                      f"iterations, {final:.1f} at {iterations}: the last quarter added {final - early:+.1f} points "
                      f"(plateau criterion, < {PLATEAU_POINTS:.0f} points: {verdict})."]
    lines += stored_curves(curves_store, iterations)
    lines += [
        "",
        "One run on an easy 2D demo task: differences of a few points are within run-to-run spread here. The real",
        "comparison is the converged benchmark (benchmarks/convergence.py, documentation/results.md); its table,",
        "generated from benchmarks/results/:",
        "",
        converged_table(readme),
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, type=Path, help="the demo's output folder (one sub-folder per arm)")
    p.add_argument("--dataset-json", required=True, type=Path)
    p.add_argument("--labelled", type=int, required=True)
    p.add_argument("--hidden", type=int, required=True)
    p.add_argument("--extra-unlabelled", type=int, required=True)
    p.add_argument("--test-cases", type=int, required=True)
    p.add_argument("--iterations", type=int, required=True)
    p.add_argument("--plateau-iterations", type=int, required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--readme", type=Path, default=REPO / "README.md")
    a = p.parse_args(argv)
    text = report(a.out, a.dataset_json, a.labelled, a.hidden, a.extra_unlabelled, a.test_cases, a.iterations,
                  a.plateau_iterations, a.task, a.readme)
    print(text)
    (a.out / "demo_table.md").write_text(text + "\n")


if __name__ == "__main__":
    main()
