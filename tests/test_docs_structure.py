"""Issue 41: BENCHMARKS.md keeps the outline it was given: no two headings with the same text under one parent, no
raw JSON, every relative link and in-page anchor resolves, every section a script writes has its marker pair once,
and a script that rewrites its section keeps the heading level the file gives it."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import List

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

PAGES = [ROOT / "BENCHMARKS.md", ROOT / "BENCHMARKS_FINDINGS.md"]
FENCE = re.compile(r"^\s*(```|~~~)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def _outside_fences(text: str) -> List[str]:
    """The lines of ``text`` that are not inside fenced code."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def _title(raw: str) -> str:
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", raw)).strip()


def slug(title: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", _title(title).lower()).replace(" ", "-")


def headings(text: str) -> List[tuple]:
    """(level, title) of every heading outside fenced code."""
    return [(len(m.group(1)), _title(m.group(2))) for line in _outside_fences(text) if (m := HEADING.match(line))]


def duplicate_headings(text: str) -> List[str]:
    """Headings whose text another heading under the same parent already has."""
    seen, stack, out = set(), [], []  # stack: (level, index of the heading) of the open parents
    for i, (level, title) in enumerate(headings(text)):
        while stack and stack[-1][0] >= level:
            stack.pop()
        key = (stack[-1][1] if stack else None, title)
        if key in seen:
            out.append(f"{'#' * level} {title}")
        seen.add(key)
        stack.append((level, i))
    return out


def anchors(text: str) -> set:
    """The anchors a page offers: explicit ``id=`` / ``name=`` attributes and GitHub's heading slugs (a repeated
    slug gets -1, -2, ...)."""
    out = set(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", text))
    counts = {}
    for _, title in headings(text):
        s = slug(title)
        out.add(s if s not in counts else f"{s}-{counts[s]}")
        counts[s] = counts.get(s, 0) + 1
    return out


def problems(page: Path, text: str) -> List[str]:
    """What is wrong with ``text`` as the page ``page`` (links resolved from its folder)."""
    out = [f"duplicate heading under one parent: {h}" for h in duplicate_headings(text)]
    if re.search(r"^\s*(```|~~~)\s*json", text, re.M | re.I):
        out.append("a ```json block (link the result file instead)")
    for target in LINK.findall("\n".join(_outside_fences(text))):
        if "://" in target or target.startswith("mailto:"):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if path and (ROOT not in file.parents or not file.exists()):
            out.append(f"link to a missing file: {target}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text() if path else text):
            out.append(f"link to a missing anchor: {target}")
    for name in re.findall(r"^<!-- ([\w.:-]+):start -->$", text, re.M):  # a marker is a line of its own
        s, e = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
        if text.count(s) != 1 or text.count(e) != 1 or text.index(e) < text.index(s):
            out.append(f"marker pair {name} not once, in order")
    return out


def test_benchmarks_md_outline_links_and_markers():
    for page in PAGES:
        assert problems(page, page.read_text()) == [], page.name


def test_the_checks_catch_what_they_are_for(tmp_path):
    page = tmp_path / "B.md"
    bad = ("# B\n\n## Results\n\n### Further metrics\n\n## Results\n\n## Other\n\n### Further metrics\n\n"
           "```json\n{}\n```\n\n[x](missing.md) [y](#nowhere) [z](#other)\n\n<!-- s:start -->\n<!-- s:start -->\n")
    found = problems(page, bad)
    assert found == ["duplicate heading under one parent: ## Results", "a ```json block (link the result file instead)",
                     "link to a missing file: missing.md", "link to a missing anchor: #nowhere",
                     "marker pair s not once, in order", "marker pair s not once, in order"]
    # the same title under two parents, and a fenced heading, are fine
    assert duplicate_headings("## A\n### x\n## B\n### x\n```\n### x\n```\n### y\n") == []


def test_a_rewritten_section_keeps_its_level_and_a_new_one_is_appended(tmp_path, monkeypatch):
    import data_pipeline

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# B\n\n## Group\n\n<!-- x:start -->\n### Old title <a id=\"x\"></a>\n\nold\n<!-- x:end -->\n")
    monkeypatch.setattr(data_pipeline, "BENCHMARKS_MD", md)
    data_pipeline.write_section("x", "## New title\n\nnew\n\n### Part\n\ntext")
    data_pipeline.write_section("y", "## Y\n\ny")
    assert md.read_text() == ("# B\n\n## Group\n\n<!-- x:start -->\n### New title <a id=\"x\"></a>\n\nnew\n\n#### Part\n\n"
                              "text\n<!-- x:end -->\n\n<!-- y:start -->\n## Y <a id=\"y\"></a>\n\ny\n<!-- y:end -->\n")
    other = tmp_path / "F.md"
    data_pipeline.write_section("z", "## Z", other)  # another file (the diagnostics' BENCHMARKS_FINDINGS.md)
    assert "<!-- z:start -->\n## Z <a id=\"z\"></a>\n<!-- z:end -->" in other.read_text()


def test_an_embedded_evaluation_report_is_nested_with_unique_titles():
    from convergence_report import nest_report

    report = "## Results (`skcdf_evaluate`)\n\n| a |\n\n### Further metrics\n\nx\n\n### Islands"
    assert nest_report(report, "2 labelled cases, 8000 iterations") == (
        "### 2 labelled cases, 8000 iterations: per-organ results (`skcdf_evaluate`)\n\n| a |\n\n"
        "#### 2 labelled cases, 8000 iterations: further metrics\n\nx\n\n#### 2 labelled cases, 8000 iterations: islands")
