"""``skcdf_dice_table``: per-class Dice of several nnU-Net ``summary.json`` files, side by side.

Reads what ``nnUNetv2_evaluate_folder`` (or ``skcdf_evaluate``) writes (``mean`` per label) and prints a Markdown
table with one row per method, the mean foreground Dice and one column per class, named by the paper's
abbreviations for the Synapse and AMOS classes (Sp RK LK ... Du Bl P/U, see ``paper_table.column_title``) and by
dataset.json's names otherwise. For mean +- std over runs, ASD and more metrics use ``skcdf_evaluate``.
"""
from __future__ import annotations

import argparse
from typing import Dict, List, Optional, Sequence

from nnunetv2_skcdf.evaluation.paper_table import column_title
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError, exit_on_input_error
from nnunetv2_skcdf.utilities.io import read_json

#: what to do about a summary that cannot be read
_SUMMARY_FIX = "Give the summary.json that nnUNetv2_evaluate_folder or skcdf_evaluate wrote."


def class_columns(summary: dict, label_names: Optional[Dict[int, str]] = None) -> List[tuple]:
    """[(label id, column title)] of the foreground labels in ``summary['mean']``, sorted by id."""
    ids = sorted(int(k) for k in summary["mean"] if str(k).lstrip("-").isdigit())
    names = label_names or {}
    return [(i, column_title(names[i]) if i in names else str(i)) for i in ids]


def dice_table(summaries: Dict[str, dict], label_names: Optional[Dict[int, str]] = None,
               sources: Optional[Dict[str, str]] = None) -> str:
    """Markdown table, Dice in %, one row per method (insertion order). Every summary must have the classes of the
    first one, no more and no fewer (and ``mean`` / ``foreground_mean``), else the row is named (with its file from
    ``sources``, method -> path) and the classes that differ."""
    def named(method: str) -> str:
        return f"{method} ({sources[method]})" if sources and sources.get(method, method) != method else method

    for method, summary in summaries.items():
        if not isinstance(summary, dict) or not {"mean", "foreground_mean"} <= set(summary):
            raise SKCDFInputError(f"{named(method)}: not an nnU-Net summary.json (no 'mean' / 'foreground_mean'; "
                                  f"aggregate.json and metrics files are not). {_SUMMARY_FIX}")
    first_method, first = next(iter(summaries.items()))
    columns = class_columns(first, label_names)
    column_ids = {i for i, _ in columns}
    for method, summary in summaries.items():
        missing = [str(i) for i, _ in columns if "Dice" not in summary["mean"].get(str(i), {})]
        extra = [str(i) for i, _ in class_columns(summary) if i not in column_ids]
        if missing or extra:
            differs = "; ".join(([f"no Dice for classes {', '.join(missing)}"] if missing else [])
                                + ([f"classes {', '.join(extra)} in addition"] if extra else []))
            raise SKCDFInputError(f"{named(method)} has other classes than {named(first_method)} ({differs}): the "
                                  f"summaries were evaluated with other labels (e.g. 13 organs beside Synapse's 8), so "
                                  f"their mean Dice values are not comparable. Compare summaries of one label set.")
    header = "| method | mean Dice | " + " | ".join(title for _, title in columns) + " |"
    rule = "|---" * (len(columns) + 2) + "|"
    rows = []
    for method, summary in summaries.items():
        dice = [100 * summary["mean"][str(i)]["Dice"] for i, _ in columns]
        rows.append(f"| {method} | {100 * summary['foreground_mean']['Dice']:.1f} | "
                    + " | ".join(f"{d:.1f}" for d in dice) + " |")
    return "\n".join([header, rule, *rows])


def dice_table_entry(argv: Optional[Sequence[str]] = None) -> None:
    parser = argparse.ArgumentParser(prog="skcdf_dice_table", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("summaries", nargs="+", help="summary.json files of nnUNetv2_evaluate_folder")
    parser.add_argument("--names", nargs="+", help="one row name per summary (default: the file paths)")
    parser.add_argument("-djfile", "--dataset-json", help="dataset.json, for the class names")
    args = parser.parse_args(argv)
    with exit_on_input_error():
        names = args.names or args.summaries
        if len(names) != len(args.summaries):
            raise SKCDFInputError(f"{len(names)} --names for {len(args.summaries)} summaries: give one name each.")
        label_names = None
        if args.dataset_json:
            from nnunetv2_skcdf.utilities.dataset_files import load_checked_dataset_json

            labels = load_checked_dataset_json(args.dataset_json, need_channels=False)["labels"]
            label_names = {v: k for k, v in labels.items() if isinstance(v, int)}
        print(dice_table({n: read_json(s, _SUMMARY_FIX) for n, s in zip(names, args.summaries)}, label_names,
                         dict(zip(names, args.summaries))))
