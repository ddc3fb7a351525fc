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
