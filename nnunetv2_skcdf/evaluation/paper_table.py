"""Paper-style results: a Markdown table (methods x organs, mean +- std over runs) and a Dice-per-class bar chart.

Input is the ``aggregate`` dictionary of ``nnunetv2_skcdf.evaluation.evaluate.aggregate_runs`` (what
``skcdf_evaluate`` writes to ``aggregate.json``). Rows are methods, columns ``Avg Dice``, ``Avg ASD`` and one
Dice column per organ, titled with the SKCDF paper's abbreviations (Synapse: Sp RK LK Ga Es Li St Ao IVC PSV Pa
RAG LAG; AMOS adds Du Bl P/U). Organs are recognised from dataset.json's label names, including the spellings
of the AMOS release ("gall bladder", "arota", "postcava", "prostate/uterus"); unknown names are used as they
are.

Cells are ``mean +- std`` over runs, where a run's value is the mean over its test cases (per class) and
``Avg`` is the mean over classes of those (the paper's protocol). ``std`` is numpy's default population
standard deviation (``ddof=0``), as in the paper's code, so that our numbers are comparable with the published
ones (with 3 runs, ``ddof=1`` would be 1.22x larger). Single-run rows show the mean only.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence

import numpy as np

from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES
from nnunetv2_skcdf.utilities.io import atomic_output

#: ``ddof`` of the std over runs (numpy's default, what the paper's code used)
STD_DDOF = 0

#: canonical organ name -> paper abbreviation (Synapse's 13 classes, then AMOS's three extra ones)
ORGAN_ABBREVIATIONS: Dict[str, str] = {
    **{name: abbr for _, name, abbr in SYNAPSE_CLASSES},
    "duodenum": "Du",
    "bladder": "Bl",
    "prostate_uterus": "P/U",
}

#: other spellings of the same organs (normalised, see ``normalise_name``) -> canonical name
_ALIASES = {
    "gall_bladder": "gallbladder",
    "arota": "aorta",  # sic, the AMOS release's dataset.json
    "postcava": "inferior_vena_cava",
    "ivc": "inferior_vena_cava",
    "kidney_right": "right_kidney",
    "kidney_left": "left_kidney",
    "adrenal_gland_right": "right_adrenal_gland",
    "adrenal_gland_left": "left_adrenal_gland",
    "oesophagus": "esophagus",
    "portal_vein_and_splenic_vein": "portal_and_splenic_veins",
    "portal_splenic_veins": "portal_and_splenic_veins",
    "urinary_bladder": "bladder",
    "prostate_and_uterus": "prostate_uterus",
    "prostate_or_uterus": "prostate_uterus",
}


def normalise_name(name: str) -> str:
    """``'Prostate/Uterus'`` -> ``'prostate_uterus'``: lower case, runs of other characters -> one ``_``."""
    return re.sub(r"[^a-z0-9]+", "_", str(name).lower()).strip("_")


def canonical_organ(name: str) -> Optional[str]:
    """The canonical organ name (a key of ``ORGAN_ABBREVIATIONS``) for a dataset.json label name, or None."""
    key = normalise_name(name)
    key = _ALIASES.get(key, key)
    return key if key in ORGAN_ABBREVIATIONS else None


def column_title(name: str) -> str:
    """Paper abbreviation of a label name (``'right kidney'`` -> ``'RK'``), else the name itself."""
    organ = canonical_organ(name)
    return ORGAN_ABBREVIATIONS[organ] if organ else str(name)


def format_cell(stat: dict, scale: float = 1.0, digits: int = 2) -> str:
    """``{'mean', 'std', 'n_runs'}`` -> ``'61.59 ± 1.20'`` (``'61.59'`` for one run, ``'n/a'`` for NaN); where
    fewer runs than the method has (``per_run``) gave a value (the others NaN: e.g. an organ every case of a run
    missed has no ASD), the count follows: ``'5.00 (1/3 runs)'``."""
    mean = stat["mean"]
    if mean is None or not np.isfinite(mean):
        return "n/a"
    n, runs = stat.get("n_runs", 1), len(stat.get("per_run") or [])
    partial = f" ({n}/{runs} runs)" if runs and n < runs else ""
    if n <= 1 or stat.get("std") is None or not np.isfinite(stat["std"]):
        return f"{scale * mean:.{digits}f}{partial}"
    return f"{scale * mean:.{digits}f} ± {scale * stat['std']:.{digits}f}{partial}"


def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _table(header: Sequence[str], rows: List[Sequence[str]]) -> List[str]:
    return [_row(header), "|" + "---|" * len(header), *(_row(r) for r in rows)]


def main_table(aggregate: dict) -> List[str]:
    """Avg Dice (%), Avg ASD, then Dice (%) per organ; one row per method."""
    classes = aggregate["classes"]
    header = ["Method", "Avg Dice", "Avg ASD", *(c["column"] for c in classes)]
    rows = []
    for method in aggregate["methods"]:
        cells = [method["name"], format_cell(method["average"]["Dice"], 100), format_cell(method["average"]["ASD"])]
        cells += [format_cell(method["per_class"][c["key"]]["Dice"], 100) for c in classes]
        rows.append(cells)
    return _table(header, rows)


def further_metrics_table(aggregate: dict) -> List[str]:
    """Class averages of the other metrics (IoU and NSD in %, distances in the run's unit)."""
    metrics = [("IoU", 100), ("ASSD", 1), ("HD95", 1), ("NSD", 100)]
    header = ["Method", *(f"Avg {m}" for m, _ in metrics)]
    rows = [[m["name"], *(format_cell(m["average"][name], scale) for name, scale in metrics)]
            for m in aggregate["methods"]]
    return _table(header, rows)


def empty_mask_table(aggregate: dict) -> List[str]:
    """Per organ ``missed/spurious`` case counts, summed over a method's runs."""
    classes = aggregate["classes"]
    header = ["Method", "cases", *(c["column"] for c in classes)]
    rows = []
    for m in aggregate["methods"]:
        rows.append([m["name"], str(m["cases_evaluated"]),
                     *(f"{m['missed'][c['key']]}/{m['spurious'][c['key']]}" for c in classes)])
    return _table(header, rows)


def island_table(aggregate: dict) -> List[str]:
    """Per organ ``islands (volume)``: predicted components without a reference voxel, summed over a method's
    cases and runs; ``n/a`` for summaries written before islands were counted."""
    classes = aggregate["classes"]
    header = ["Method", "cases", *(c["column"] for c in classes)]
    rows = []
    for m in aggregate["methods"]:
        counts, volumes = m.get("islands", {}), m.get("island_volume", {})
        rows.append([m["name"], str(m["cases_evaluated"]),
                     *("n/a" if counts.get(c["key"]) is None else f"{counts[c['key']]} ({volumes[c['key']]:.0f})"
                       for c in classes)])
    return _table(header, rows)


def _notes(aggregate: dict) -> List[str]:
    unit = aggregate["units"]
    runs = ", ".join(f"{m['name']}: {len(m['runs'])}" for m in aggregate["methods"])
    if aggregate["rules"] == "paper":
        rules = ("paper rules: one mask empty -> Dice 0, ASD/ASSD/HD95 128, NSD 0; both empty -> Dice 100 %, "
                 "distances 0, NSD 100 %")
    else:
        rules = ("nnU-Net rules: Dice NaN when both masks are empty; surface metrics NaN when either is empty; "
                 "NaN cases are left out of the means (how many cases remain: n_cases per class and metric in "
                 "aggregate.json)")
    return [
        f"Dice, IoU and NSD in %, ASD (directed, prediction -> reference), ASSD and HD95 in {unit}. Per class: "
        f"mean over test cases; Avg: mean over classes. Runs per method: {runs}; "
        f"'±' = std over runs of the per-run values (numpy, ddof={aggregate['std_ddof']}, as in the paper's code).",
        f"Empty masks: {rules}.",
    ]


def volume_unit(aggregate: dict) -> str:
    return "mm³" if aggregate["units"] == "mm" else aggregate["units"]


def paper_table(aggregate: dict) -> str:
    """The whole Markdown text: main table, notes, further metrics, missed/spurious organ counts, islands."""
    lines = ["## Results (`skcdf_evaluate`)", "", *main_table(aggregate), "", *_notes(aggregate), "",
             "### Further metrics", "", *further_metrics_table(aggregate), "",
             "### Missed / spurious organs", "",
             "Cases with the organ in the reference but not in the prediction (missed) / in the prediction but not "
             "in the reference (spurious), summed over runs.", "", *empty_mask_table(aggregate), "",
             "### Islands", "",
             "Connected components of the prediction (full connectivity) that share no voxel with the reference "
             f"organ: their number (total volume in {volume_unit(aggregate)}), summed over cases and runs.", "",
             *island_table(aggregate)]
    return "\n".join(lines) + "\n"


def write_paper_table(aggregate: dict, path: str) -> None:
    with atomic_output(path, suffix=".md") as tmp:
        with open(tmp, "w") as f:
            f.write(paper_table(aggregate))


def plot_dice_per_class(aggregate: dict, path: str) -> None:
    """Grouped bar chart, Dice (%) per organ, one bar per method, error bars = std over runs (PNG)."""
    import matplotlib

    matplotlib.use("Agg")  # no display needed (servers, workers)
    import matplotlib.pyplot as plt

    classes, methods = aggregate["classes"], aggregate["methods"]
    x = np.arange(len(classes))
    width = 0.8 / max(len(methods), 1)
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(classes) * max(len(methods), 1) ** 0.5 + 2), 4))
    for i, m in enumerate(methods):
        stats = [m["per_class"][c["key"]]["Dice"] for c in classes]
        means = [100 * _finite(s["mean"]) for s in stats]
        errors = [100 * _finite(s["std"]) if s["n_runs"] > 1 else 0.0 for s in stats]
        ax.bar(x + (i - (len(methods) - 1) / 2) * width, means, width, yerr=errors, capsize=2, label=m["name"])
    ax.set_xticks(x, [c["column"] for c in classes], rotation=45 if len(classes) > 10 else 0)
    ax.set_ylabel("Dice (%)")
    ax.set_ylim(0, 100)
    ax.set_title("Dice per class (mean ± std over runs)")
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.0, 1.0))  # outside: bars reach 100 %
    fig.tight_layout()
    with atomic_output(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def _finite(value) -> float:
    return float(value) if value is not None and np.isfinite(value) else 0.0
