"""benchmarks/demo_plateau.py (the demo baseline's learning curve) and run_demo.sh's arguments: the snapshots, the
plateau arithmetic and the stored section, on made-up curves (the benchmark itself trains for half an hour)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "benchmarks"), str(REPO / "benchmarks" / "trainers")]
import demo_plateau as P  # noqa: E402
import demo_plateau_trainers as T  # noqa: E402

from nnunetv2_skcdf.training.nnUNetTrainer.variants.demo import demo_trainers as demo  # noqa: E402


def test_snapshots_every_eighth_of_each_budget_and_the_trainers_are_the_demo_ones():
    assert T.snapshot_epochs(24) == [3, 6, 9, 12, 15, 18, 21]
    assert T.snapshot_epochs(48) == [6, 12, 18, 24, 30, 36, 42]
    assert T.snapshot_name(6) == "checkpoint_ep0006.pth"
    assert issubclass(T.nnUNetTrainer_demoCurve, demo.nnUNetTrainer_demo)
    assert issubclass(T.nnUNetTrainer_demoLongCurve, demo.nnUNetTrainer_demoLong)
    # the 3/4 snapshot that the last-quarter check reads is one of the curve's points at both budgets
    for epochs in (demo.DEMO_EPOCHS, 2 * demo.DEMO_EPOCHS):
        assert demo.plateau_epoch(epochs) in T.snapshot_epochs(epochs)


def _curve(values, iterations):
    step = iterations // len(values)
    return {str(step * (k + 1)): {"mean": v, "organs": {"Li": 90.0, "Ga": v - 30}} for k, v in enumerate(values)}


def test_last_quarter_reads_three_quarters_and_the_end():
    pts = {int(i): v for i, v in _curve([10, 20, 30, 40, 50, 60, 78.6, 79.0], 1200).items()}
    assert sorted(pts)[5] == 900
    assert P.last_quarter(pts) == pytest.approx(79.0 - 60)


def test_markdown_tables_verdicts_and_doubling():
    r = {"date": "2026-12-07", "commit": "abc1234", "machine": "vm | CPU only", "iterations": 1200, "lr": 2e-3,
         "runs": 1, "points": 8,
         "curves": {"1200": {"1": _curve([10, 20, 30, 40, 50, 78.6, 78.6, 80.5], 1200)},
                    "2400": {"1": _curve([10, 50, 70, 75, 80, 82.8, 84.0, 84.6], 2400)}},
         "last_quarter": {"1200": {"1": 1.9}, "2400": {"1": 1.8}}, "final_mean": {"1200": 80.5, "2400": 84.6},
         "doubling": 4.1}
    md = P.markdown(r, "python benchmarks/demo_plateau.py")
    assert md.startswith("## Is the demo's labelled-only nnU-Net at its plateau?")
    assert "| 900 | 78.6 |" in md and "| 2400 | 84.6 |" in md
    assert "| 1200 | 1 | 80.5 | +1.9 | met | Ga 50.5 |" in md
    assert "Twice the budget ends +4.1 mean Dice points from the demo's budget" in md
    assert "84.6 vs 80.5" in md


def test_run_demo_refuses_an_unknown_argument_before_setting_anything_up(tmp_path):
    r = subprocess.run(["bash", str(REPO / "run_demo.sh"), "--lnog"], capture_output=True, text=True, cwd=tmp_path,
                       timeout=30)
    assert r.returncode == 2
    assert "usage: bash run_demo.sh [--long | --prepare]  (unknown argument: --lnog)" in r.stderr
    assert not (tmp_path / "skcdf_data").exists() and r.stdout == ""


def test_demo_time_section_names_the_long_variant_and_the_clean_environment_keeps_pip_only(monkeypatch):
    import demo_time

    r = {"date": "2026-12-07", "commit": "abc1234", "machine": "vm | CPU only", "wall_s": 1500.0,
         "steps_s": {"setup": 100.0, "lanes": 1300.0}, "mean_dice": {"nnunet": 85.0, "skcdf": 80.0},
         "plateau_mean_dice": 84.9, "load_before": 0.1, "load_during_mean": 2.0, "load_during_max": 2.5,
         "table": "closing text"}
    md = demo_time.markdown(r, "python benchmarks/demo_time.py --long", long=True)
    assert md.startswith("## `run_demo.sh --long`'s wall time from a fresh clone (`benchmarks/demo_time.py --long`)")
    assert "`bash run_demo.sh --long` in a fresh clone, clean environment, set-up (a new `.venv`) included: **25.0 min**" in md
    assert "| lanes | 21.7 min |" in md and "| SKCDF | 80.0 |" in md and "closing text" in md
    assert demo_time.markdown(r, "python benchmarks/demo_time.py").startswith("## The demo's wall time")
    monkeypatch.setenv("PIP_INDEX_URL", "http://x")
    monkeypatch.setenv("nnUNet_raw", "/elsewhere")
    env = demo_time.clean_env("/home/u")
    assert env["PIP_INDEX_URL"] == "http://x" and env["HOME"] == "/home/u" and "nnUNet_raw" not in env
