"""run_demo.sh: its configuration is the one README.md and getting_started.md describe (not its accuracy), its
trainers train that budget with the optimiser the docs name, and its report reads its figures from files."""
from __future__ import annotations

import json
import math
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from nnunetv2_skcdf.training.nnUNetTrainer.variants.demo import demo_trainers as demo

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "scripts"))
import demo_report  # noqa: E402


def demo_settings() -> dict:
    """The task settings assigned at the top of run_demo.sh (NAME=value or NAME="value")."""
    text = (REPO / "run_demo.sh").read_text()
    names = ("SHAPE", "SPACING", "ORGANS", "NUM_TRAIN", "NUM_TEST", "NUM_UNLABELED", "VAL", "LABELED", "CONFIG", "PATCH",
             "BATCH", "STAGES", "FEATURES", "PSEUDO_KEEP")
    out = {}
    for name in names:
        m = re.search(rf'^{name}="?([^"\n#]*?)"?\s*(#.*)?$', text, flags=re.M)
        assert m, f"run_demo.sh no longer assigns {name}"
        out[name] = m.group(1).strip()
    return out


def description(s: dict) -> str:
    """The one-line description of the demo task that README.md and getting_started.md must carry verbatim."""
    from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES
    from nnunetv2_skcdf.dataset_conversion.phantom import resolve_organs

    hidden = int(s["NUM_TRAIN"]) - int(s["VAL"]) - int(s["LABELED"])
    pool = hidden + int(s["NUM_UNLABELED"])  # the round scores every case of the split's unlabelled list
    kept = resolve_organs(s["ORGANS"].split()) or [lid for lid, _, _ in SYNAPSE_CLASSES]
    organs = " ".join(abbr for lid, _, abbr in SYNAPSE_CLASSES if lid in kept)
    x = " x ".join
    return (f"{s['NUM_TRAIN']} training cases ({s['LABELED']} labelled, {s['VAL']} validation, {hidden} with hidden "
            f"labels) + {s['NUM_UNLABELED']} unlabelled images, {s['NUM_TEST']} test cases, "
            f"{x(s['SHAPE'].split())} voxels at {x(s['SPACING'].split())} mm, {len(kept)} organs labelled "
            f"({organs}); nnU-Net 2d plans, "
            f"patch {x(s['PATCH'].split())}, batch {s['BATCH']}, {s['STAGES']} stages, "
            f"{'-'.join(s['FEATURES'].split())} features; {demo.DEMO_EPOCHS * 50} iterations per arm, "
            f"Adam, learning rate {demo.DEMO_LR:g}; one pseudo-label round keeping the best-agreeing "
            f"{100 * float(s['PSEUDO_KEEP']):.0f} % of the unlabelled cases (the {hidden} hidden-label training cases "
            f"and the {s['NUM_UNLABELED']} images: {math.ceil(float(s['PSEUDO_KEEP']) * pool)} of {pool})")


def test_readme_and_getting_started_describe_the_demo_that_run_demo_sh_runs():
    line = description(demo_settings())
    for doc in ("README.md", "documentation/getting_started.md"):
        assert line in (REPO / doc).read_text(), f"{doc} does not describe run_demo.sh's task; expected:\n{line}"


def test_demo_threads_from_the_environment(monkeypatch):
    monkeypatch.delenv(demo.THREADS_ENV, raising=False)
    assert demo.demo_threads() == 0
    monkeypatch.setenv(demo.THREADS_ENV, "1")
    assert demo.demo_threads() == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv(demo.THREADS_ENV, bad)
        with pytest.raises(ValueError, match=f"SKCDF_DEMO_THREADS={bad!r}: give a positive number"):
            demo.demo_threads()


def test_demo_trainers_budget_optimiser_and_plateau_snapshot():
    import torch

    assert demo.nnUNetTrainer_demo.demo_epochs == demo.SKCDFTrainer_demo.demo_epochs == demo.DEMO_EPOCHS
    assert demo.nnUNetTrainer_demoLong.demo_epochs == demo.SKCDFTrainer_demoLong.demo_epochs == 2 * demo.DEMO_EPOCHS
    # the optimiser is nnU-Net's nnUNetTrainerVanillaAdam's (Adam, poly schedule) at DEMO_LR
    from types import SimpleNamespace as NS

    fake = NS(network=torch.nn.Linear(2, 2), initial_lr=demo.DEMO_LR, weight_decay=3e-5, num_epochs=40)
    optimizer, scheduler = demo._AdamDemo.configure_optimizers(fake)
    assert type(optimizer) is torch.optim.Adam and optimizer.param_groups[0]["lr"] == demo.DEMO_LR
    assert type(scheduler).__name__ == "PolyLRScheduler"
    # the plateau snapshot is saved once, after epoch 3/4 of the budget
    saved = []

    class Base:
        def on_epoch_end(self):
            self.current_epoch += 1

    class T(demo._AdamDemo, Base):
        def __init__(self):
            self.num_epochs, self.current_epoch, self.output_folder = 40, 0, "/out"

        def save_checkpoint(self, path):
            saved.append((self.current_epoch + 1, path))

    t = T()
    for _ in range(40):
        t.on_epoch_end()
    assert saved == [(30, "/out/" + demo.PLATEAU_CHECKPOINT)]


def _summary(dice: dict) -> dict:
    return {"foreground_mean": {"Dice": sum(dice.values()) / len(dice)},
            "mean": {str(k): {"Dice": v} for k, v in dice.items()}}


def test_report_reads_every_figure_from_files(tmp_path):
    out = tmp_path / "demo"
    values = {"nnunet": {1: 0.80, 2: 0.60}, "pseudolabel": {1: 0.82, 2: 0.64}, "skcdf": {1: 0.85, 2: 0.70},
              "nnunet_plateau": {1: 0.79, 2: 0.58}}
    for arm, dice in values.items():
        (out / arm).mkdir(parents=True)
        (out / arm / "summary.json").write_text(json.dumps(_summary(dice)))
    (out / "times.tsv").write_text("setup\t20\nnnunet\t120\nskcdf\t300\npseudolabel\t200\nskcdf\t330\nlanes\t400\n"
                                   "total\t840\n")
    dj = tmp_path / "dataset.json"
    dj.write_text(json.dumps({"labels": {"background": 0, "spleen": 1, "liver": 2}}))
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- results_tables:accuracy:start -->\n| method | Dice |\n|---|---|\n| a | 1 |\n"
                      "<!-- results_tables:accuracy:end -->\n")
    text = demo_report.report(out, dj, 3, 13, 16, 8, 2000, 1500, "demo task", readme)
    assert "3 labelled training cases, 13 training cases with hidden labels + 16 extra unlabelled images; 2000 " \
           "iterations per arm; 1 run; 8 test cases" in text
    assert "| nnU-Net, labelled cases only | 70.0 | 80.0 | 60.0 |" in text
    assert "| SKCDF | 77.5 | 85.0 | 70.0 |" in text
    assert "SKCDF: 5.5 min" in text  # the last entry of an arm wins (a rerun appends)
    assert "side by side: 6.7 min" in text and "set-up included: 14.0 min" in text
    assert "68.5 at 1500 iterations, 70.0 at 2000: the last quarter added +1.5 points (plateau criterion, < 2 points: met)" in text
    assert "| a | 1 |" in text  # the converged table comes from the README's generated block
    # a missing arm is named
    (out / "skcdf" / "summary.json").unlink()
    with pytest.raises(FileNotFoundError, match="the arm 'SKCDF' has no evaluation"):
        demo_report.report(out, dj, 3, 13, 16, 8, 2000, 1500, "demo task", readme)


def test_report_quotes_the_stored_curves_of_its_budget_only(tmp_path):
    store = tmp_path / "demo_plateau.json"
    assert demo_report.stored_curves(store, 1200) == []  # nothing stored: nothing said
    store.write_text(json.dumps({"runs": 2, "commit": "abc1234", "final_mean": {"1200": 79.8, "2400": 85.5}}))
    text = " ".join(demo_report.stored_curves(store, 1200))
    assert "(benchmarks/demo_plateau.py, 2 runs per budget, commit abc1234, BENCHMARKS.md#demo_plateau): mean test " \
           "Dice 79.8 after 1200 iterations, 85.5 after 2400: twice the budget ends +5.7 points higher, so at this " \
           "budget the arms are compared below the labelled-only model's plateau" in text
    store.write_text(json.dumps({"runs": 1, "commit": "abc1234", "final_mean": {"1200": 84.8, "2400": 85.5}}))
    assert "ends +0.7 points higher, within the criterion" in " ".join(demo_report.stored_curves(store, 1200))
    # --long (2400): its own final is stored, twice it is not
    text = " ".join(demo_report.stored_curves(store, 2400))
    assert text.endswith("1 run per budget, commit abc1234, BENCHMARKS.md#demo_plateau): mean test Dice 85.5 after "
                         "2400 iterations.")
    assert demo_report.stored_curves(store, 2000) == []  # another budget: the store says nothing about it


def test_run_demo_sh_is_valid_bash_and_runs_the_three_arms():
    subprocess.run(["bash", "-n", str(REPO / "run_demo.sh")], check=True)
    text = (REPO / "run_demo.sh").read_text()
    for arm in ("timed nnunet arm_nnunet", "timed pseudolabel arm_pseudolabel", "timed skcdf arm_skcdf",
                "-chk checkpoint_plateau.pth", "scripts/demo_report.py", "timed lanes run_lanes",
                "SKCDF_DEMO_THREADS=1 nnUNetv2_train", '--organs $ORGANS'):
        assert arm in text
    # the recipe's teacher is the labelled-only model: same lane, after it
    lane = text.split("lane_nnunet() {", 1)[1].split("\n}", 1)[0]
    assert lane.index("timed nnunet arm_nnunet") < lane.index("timed pseudolabel arm_pseudolabel")
    assert demo.PLATEAU_CHECKPOINT == "checkpoint_plateau.pth"


def _lane_functions() -> str:
    """run_demo.sh's own lane_status / stop_lanes / run_lanes functions (bash source)."""
    text = (REPO / "run_demo.sh").read_text()
    return "\n".join(re.search(rf"^{name}\(\) {{.*?^}}", text, flags=re.S | re.M).group(0)
                     for name in ("lane_status", "stop_lanes", "run_lanes"))


def _lanes_source(tmp_path, nnunet: str, skcdf: str) -> str:
    """A bash script: run_lanes with stand-in lanes, under run_demo.sh's shell options."""
    return (f"set -euo pipefail\nOUT={tmp_path}\nEPOCHS=24\n{_lane_functions()}\n"
            f"lane_nnunet() {{ {nnunet}; }}\nlane_skcdf() {{ {skcdf}; }}\nrun_lanes\n")


def _lanes_script(tmp_path, nnunet: str, skcdf: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", _lanes_source(tmp_path, nnunet, skcdf)], capture_output=True, text=True,
                          timeout=120)


def test_run_lanes_runs_both_lanes_and_a_failure_stops_the_other(tmp_path):
    ok = _lanes_script(tmp_path, "echo teacher; echo done-a > $OUT/a", "echo done-b > $OUT/b")
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "a").read_text() == "done-a\n" and (tmp_path / "b").read_text() == "done-b\n"
    assert (tmp_path / "lane_nnunet.log").read_text() == "teacher\n"  # each lane's output goes to its log
    # the first lane fails: the other (a long sleep) is stopped, both logs' ends and the failed lane are named
    t0 = time.time()
    bad = _lanes_script(tmp_path, "echo boom; false", "sleep 100; echo never > $OUT/c")
    assert bad.returncode != 0 and time.time() - t0 < 60
    assert "the demo's nnunet lane failed" in bad.stderr and "boom" in bad.stdout
    assert not (tmp_path / "c").exists()
    # Ctrl-C / TERM while both lanes run: both are stopped (a script's background jobs ignore SIGINT themselves)
    script = _lanes_source(tmp_path, "sleep 100; echo x > $OUT/d", "sleep 100; echo x > $OUT/e")
    proc = subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(3)
    proc.terminate()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130 and "Interrupted: stopping both lanes." in err
    sleeps = subprocess.run(["pgrep", "-f", "^sleep 100$"], capture_output=True, text=True).stdout.split()
    assert sleeps == [], f"lane commands still running: {sleeps}"
