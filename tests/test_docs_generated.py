"""Issue 41: the result tables of README.md and documentation/results.md are the ones benchmarks/results_tables.py
generates from the stored JSON in benchmarks/results/ (a figure cannot drift from its data), and no link of the
user documentation points outside the repository."""
from __future__ import annotations

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import results_tables  # noqa: E402

DOCS = [ROOT / "README.md", ROOT / "example_commands.md", ROOT / "CHANGELOG.md", ROOT / "BENCHMARKS.md",
        ROOT / "BENCHMARKS_FINDINGS.md",
        *sorted((ROOT / "documentation").glob("*.md"))]


def test_tables_are_generated():
    diff = results_tables.differences()
    assert not diff, ("tables differ from their data; run `python benchmarks/results_tables.py`: " + ", ".join(diff))


def test_readme_shows_the_four_methods():
    text = (ROOT / "README.md").read_text()
    for key in results_tables.README_ARMS:
        assert results_tables.README_NAMES[key] in text


def test_differences_sees_a_changed_figure(tmp_path, monkeypatch):
    tables = results_tables.generated()
    changed = dict(tables, accuracy=tables["accuracy"].replace("|", "| x", 1))
    assert "README.md: accuracy" in results_tables.differences(changed)


def test_no_link_points_outside_the_repository():
    bad = []
    for page in DOCS:
        text = page.read_text()
        if "shared/design" in text:
            bad.append(f"{page.name}: shared/design")
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            if "://" in target or target.startswith("mailto:"):
                continue
            resolved = (page.parent / target).resolve()
            if ROOT not in resolved.parents and resolved != ROOT or not resolved.exists():
                bad.append(f"{page.name}: {target}")
    assert not bad, bad


def test_table_cells_say_what_the_criteria_need():
    # a gain of 0.98 meets the plateau criterion (< 1): two decimals, never "+1.0"; another window is named
    assert results_tables._gain({"gain": 0.982, "from_iteration": 9000, "to_iteration": 12000}) == "+0.98"
    assert results_tables._gain({"gain": 1.5, "from_iteration": 8000, "to_iteration": 12000}) == "+1.50 (8000->12000)"
    assert results_tables._gain(None) == "-"
    # missed organ-cases (reference has the organ, the prediction none of it: no ASD there), skcdf_evaluate's counts
    per_class = {"1": {"missed": 2, "spurious": 1}, "2": {"missed": 0, "spurious": 0}, "3": {"missed": 1}}
    assert results_tables._missed({"final_summary": {"skcdf": {"per_class": per_class}}}) == 3
    assert results_tables._missed({"final_summary": {"skcdf": {"per_class": {"1": {"islands": 0}}}}}) is None
    assert results_tables._missed({"final_summary": {}}) is None
    # the commits the runs trained at, uncommitted changes marked; the storing commit only without that record
    runs = [{"commit": "s1", "train_commits": [{"commit": "aaa", "tracked_changes": False},
                                               {"commit": "bbb", "tracked_changes": True}]},
            {"commit": "s2", "train_commits": None}]
    assert results_tables._commits(runs) == ["aaa", "bbb+", "s2"]


def test_readme_shows_only_trained_budgets_and_results_lists_shared_runs_once():
    readme = results_tables.readme_accuracy()
    shortest = {name: b for name, _, b, _ in results_tables.README_TASKS}
    for line in readme.splitlines()[2:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[2] == "-" or int(cells[2]) >= shortest[cells[0]], line
    retired = [name for name, _, _, measured_only in results_tables.README_TASKS if measured_only]
    assert not [line for line in readme.splitlines() if line.split(" | ")[0].strip("| ") in retired
                and "not measured yet" in line]
    rows = results_tables.results_convergence().splitlines()[2:]
    keys = [tuple(c.strip() for c in r.strip("|").split("|")[:5]) for r in rows]
    assert len(keys) == len(set(keys))  # (c)'s runs serve every labelled count: listed once
