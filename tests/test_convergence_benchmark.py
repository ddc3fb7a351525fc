"""The convergence benchmark's bookkeeping (benchmarks/convergence.py, convergence_report.py): the budget a work
folder is fixed to, the run order, the plateau criterion, the goal arithmetic, and that every arm's trainer is
found by nnU-Net's own lookup. The training itself is the benchmark's job, not a unit test's."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCH), str(BENCH / "diagnostics")]  # the benchmark modules; head_drift, grad_norms

import convergence as C  # noqa: E402
import convergence_report as R  # noqa: E402


def test_budget_is_fixed_at_the_first_run_and_a_different_one_is_refused(tmp_path):
    budget = C.fixed_budget(tmp_path, 4000, 8)
    assert budget == {"iterations": 4000, "epochs": 80, "snapshot_epochs": [10, 20, 30, 40, 50, 60, 70, 80]}
    assert json.loads((tmp_path / "budget.json").read_text()) == budget
    assert C.fixed_budget(tmp_path, 4000, 8) == budget  # the same request: accepted
    with pytest.raises(SystemExit, match=r"holds another budget \(4000 iterations"):
        C.fixed_budget(tmp_path, 6000, 8)
    assert json.loads((tmp_path / "budget.json").read_text()) == budget  # untouched by the refusal


def test_budget_rounds_to_whole_epochs_of_50(tmp_path):
    budget = C.fixed_budget(tmp_path, 1010, 4)
    assert budget["iterations"] == 1000 and budget["epochs"] == 20
    assert budget["snapshot_epochs"] == [5, 10, 15, 20]


def test_schedule_is_run_major_with_ablations_last():
    order = [(arm.key, fold) for arm, fold in C.schedule(["a", "b", "c", "d", "e1", "e2", "f"], 2, 1)]
    assert order == [("a", 0), ("b", 0), ("c", 3), ("d", 0), ("a", 1), ("b", 1), ("c", 4), ("d", 1), ("e1", 0),
                     ("e2", 0), ("f", 0)]  # (d) is a main arm: SKCDFTrainer's defaults since 0.4.0


def test_ablation_arms_are_stored_without_a_curve_stage_and_curve_arms_only_with_one():
    assert C.stores_run(["train", "final"], C.ARMS["e1"]) and C.stores_run(["final"], C.ARMS["f"])
    assert not C.stores_run(["train", "final"], C.ARMS["d"])  # its curve would be missing from the store
    assert C.stores_run(["curves", "final"], C.ARMS["d"]) and C.stores_run(["curves", "final"], C.ARMS["e1"])
    assert not C.stores_run(["train", "curves"], C.ARMS["a"]) and not C.stores_run(["train"], C.ARMS["e2"])


def test_every_arm_trainer_is_found_by_nnunet_lookup(monkeypatch):
    import nnunetv2
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    for arm in C.ARMS.values():
        cls = recursive_find_python_class(str(BENCH / "trainers"), arm.trainer, "trainers")
        assert cls is not None and cls.__name__ == arm.trainer, arm.trainer
        assert cls.__mro__[1].__name__ == "_ConvergenceBudget"  # budget and snapshots before the parent trainer
        from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer

        assert issubclass(cls, SKCDFTrainer) == arm.skcdf, arm.key
    assert nnunetv2  # imported for the lookup's package layout


def test_arm_trainers_pin_the_masking_their_stored_runs_were_trained_with(trainer_factory, monkeypatch):
    """0.4.0 changed SKCDFTrainer's masking to 'multiply': the arms stored before (0.2 / 0.3 defaults and the
    ablations of the 0.3 defaults that were run) keep 'exclude'; arm d, the arms defined on the 0.4 defaults and
    the ablations never run before 0.4 (e1, f, h: they ablate the method as shipped) have 'multiply'."""
    from nnunetv2.utilities.find_class_by_name import recursive_find_python_class

    monkeypatch.setenv("SKCDF_CONV_EPOCHS", "2")
    monkeypatch.setenv("SKCDF_CONV_SNAPSHOTS", "1,2")
    expected = {"b": "exclude", "g": "exclude", "i": "exclude",
                "d": "multiply", "e1": "multiply", "f": "multiply", "h": "multiply", "j": "multiply", "k": "multiply",
                "l": "multiply", "q": "multiply", "r": "multiply", "t": "multiply", "u": "multiply", "v": "multiply"}
    assert set(expected) | {"a", "c", "e2", "p", "s", "w", "x"} == set(C.ARMS)  # e2 has no balanced heads: masking unused
    for key, masking in expected.items():
        cls = recursive_find_python_class(str(BENCH / "trainers"), C.ARMS[key].trainer, "trainers")
        trainer = trainer_factory(cls)
        assert trainer.masking == masking and trainer.num_epochs == 2, key
        variant = trainer_factory(cls.__bases__[-1])  # everything else as the package variant it extends
        for name in ("skc_enabled", "skc_self_heads", "head_ema", "consistency_weight", "unlabelled_view",
                     "balanced_heads", "ema_momentum", "rampup_epochs"):
            assert getattr(trainer, name) == getattr(variant, name), (key, name)


def test_train_records_the_commit_of_every_training_start_and_not_after_the_run_finished(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(C, "sh", lambda cmd, env, log: calls.append(cmd))
    monkeypatch.setattr(C, "model_folder", lambda env, raw, arm: tmp_path / "model")
    fold_dir = tmp_path / "model" / "fold_1"
    for env in ({}, {"SKCDF_CONV_THREADS": "2"}):  # a start (every core) and a resume (--c) with --threads 2
        C.train("962", C.ARMS["d"], 1, tmp_path, env, tmp_path / "log")
    entries = json.loads((fold_dir / C.TRAIN_COMMITS).read_text())
    assert len(entries) == len(calls) == 2 and calls[0][:2] == ["nnUNetv2_train", "962"] and "--c" in calls[0]
    assert [e["threads"] for e in entries] == [None, 2]
    assert all(e["commit"] == R.commit() and len(e["commit"]) >= 7 and isinstance(e["tracked_changes"], bool)
               for e in entries)
    (fold_dir / "checkpoint_final.pth").touch()  # finished: nothing trained, nothing recorded
    C.train("962", C.ARMS["d"], 1, tmp_path, {}, tmp_path / "log")
    assert len(calls) == 2 and len(json.loads((fold_dir / C.TRAIN_COMMITS).read_text())) == 2
    assert not list(fold_dir.glob("*.tmp*"))


def _curve(points):
    return {"name": "x", "runs": 1, "iterations": [500 * (i + 1) for i in range(len(points))],
            "mean": [[p] for p in points], "small": [[p] for p in points]}


def test_plateau_is_the_gain_over_the_last_quarter():
    # stored curve of arm (a) fold 0 at 4000 iterations (BENCHMARKS.md): +7.2 over 3000 -> 4000, not met
    p = R.plateau(_curve([5.4, 25.5, 53.1, 62.3, 71.4, 76.8, 83.3, 84.0]))
    assert (p["from_iteration"], p["to_iteration"]) == (3000, 4000)
    assert p["gain"] == pytest.approx(84.0 - 76.8) and not p["met"]
    assert R.plateau(_curve([50, 70, 80, 85, 86, 86.2, 86.5, 86.9]))["met"]
    assert R.plateau(_curve([50])) is None


def test_regime_line_says_whether_the_budget_is_the_converged_one():
    short = R.plateau(_curve([5.4, 25.5, 53.1, 62.3, 71.4, 76.8, 83.3, 84.0]))
    flat = R.plateau(_curve([50, 70, 80, 85, 86, 86.2, 86.5, 86.9]))
    assert R.regime({"a": flat, "c": flat}).startswith("**converged**")
    line = R.regime({"a": short, "c": flat, "g": short})
    assert line.startswith("**short budget, not converged**: (a) gains +7.2 mean Dice") and "(c)" not in line
    assert R.regime({"a": flat}) == "plateau not known yet ((c) has no stored curve at this budget)."
    # a rising last quarter that a longer budget does not raise (measured on the multi-site task: (a) fold 0 gains
    # +2.6 over 9000 -> 12000; one run at 16000 ends at 76.4, the three runs at 12000 at 76.2, 76.2, 77.5)
    rising = R.plateau(_curve([15.3, 62.0, 72.1, 76.5, 75.0, 74.9, 76.6, 77.5]))
    a16 = {"arm": "a", "fold": 0, "iterations": 16000, "mean": 76.39, "this_budget_runs": [76.17, 76.23, 77.51],
           "this_budget_mean": 76.17}
    assert R.regime({"a": rising, "c": flat}, [a16], 12000) == (
        "**plateau by the longer budget** (on a single run: read it as an indication): (a) gains +2.6 mean Dice over "
        "the last quarter (criterion < 1.0), but a longer budget adds -0.2 (no standard error: one run on a side) "
        "to (a), 1 run at 16000 against 3 here (< 1.0: the rise is the schedule's annealing, not missing training).")
    line = R.regime({"a": rising, "c": short}, [a16], 12000)
    assert line.startswith("**short budget, not converged**: (a) gains +2.6, (c) gains +7.2 mean Dice") and \
        line.endswith("; (c): no longer budget stored yet, read accuracy claims with that.")


def test_a_longer_budget_that_adds_a_point_overrules_a_flat_last_quarter():
    flat = R.plateau(_curve([50, 70, 80, 85, 86, 86.2, 86.5, 86.9]))
    # measured: (a) fold 0 reaches 86.4 at 8000 iterations (last quarter +0.1) and 88.0 at 12000
    a12 = {"arm": "a", "fold": 0, "iterations": 12000, "mean": 87.95, "this_budget_runs": [86.38]}
    a4 = {"arm": "a", "fold": 0, "iterations": 4000, "mean": 79.3, "this_budget_runs": [86.38]}  # shorter: no say
    d12 = {"arm": "d", "fold": 0, "iterations": 12000, "mean": 90.0, "this_budget_runs": [87.6]}  # not a baseline
    no_runs_here = {"arm": "c", "fold": 3, "iterations": 12000, "mean": 88.0, "this_budget_runs": []}
    line = R.regime({"a": flat, "c": flat}, [a4, a12, d12, no_runs_here], 8000)
    assert line == ("**not converged**: (a), 1 run at 12000 against 1 here: 88.0 against 86.4, +1.6 (no standard "
                    "error: one run on a side) (criterion < 1.0), whatever the last quarter adds; compare arms at the "
                    "longer budget.")
    assert R.regime({"a": flat, "c": flat}, [a4, d12, no_runs_here], 8000).endswith(
        "; no longer budget stored for (a) or (c) yet.")
    close = dict(a12, mean=86.9)
    assert R.regime({"a": flat, "c": flat}, [close], 8000).endswith(
        "; a longer budget adds +0.5 (no standard error: one run on a side) to (a), "
        "1 run at 12000 against 1 here.")
    # from the longer budget's own report the shorter run says nothing about convergence
    assert R.regime({"a": flat}, [dict(a12, iterations=8000)], 12000).startswith("plateau not known yet")


def test_the_longer_budget_rule_compares_the_means_of_all_runs_at_both_budgets_unpaired():
    flat = R.plateau(_curve([50, 70, 80, 85, 86, 86.2, 86.5, 86.9]))
    # measured: (a) at 12000 iterations ends 88.0 and 86.0 (folds 0, 1); at 8000 its three runs 86.4, 86.8, 86.9.
    # Folds repeat one split (training seed only), so fold k at two budgets is not a pair: means of all runs
    here = [86.39, 86.83, 86.87]
    f0 = {"arm": "a", "fold": 0, "iterations": 12000, "mean": 87.95, "this_budget_runs": here}
    f1 = {"arm": "a", "fold": 1, "iterations": 12000, "mean": 85.96, "this_budget_runs": here}
    (g,) = R.longer_budget_gains([f1, f0], 8000)
    assert g["folds"] == [0, 1] and (g["runs"], g["this_budget_n"]) == (2, 3)
    assert g["gain"] == pytest.approx(86.955 - np.mean(here)) and g["mean"] == pytest.approx(86.955)
    assert g["se"] == pytest.approx(np.sqrt(np.var([87.95, 85.96], ddof=1) / 2 + np.var(here, ddof=1) / 3))
    line = R.regime({"a": flat, "c": flat}, [f1, f0], 8000)
    assert line == ("**converged**: (a) and (c) gain < 1.0 mean Dice point over the last quarter (table below); "
                    f"a longer budget adds +0.3 ± {g['se']:.1f} (standard error) to (a), 2 runs at 12000 against 3 "
                    "here.")
    # two longer runs that both gain: not converged
    f1_up = dict(f1, mean=88.0)
    line = R.regime({"a": flat, "c": flat}, [f0, f1_up], 8000)
    assert line.startswith("**not converged**: (a), 2 runs at 12000 against 3 here: 88.0 against 86.7, +1.3 ± ")
    # (c) is grouped apart from (a); a run without any run of its arm at this budget has no say
    c12 = {"arm": "c", "fold": 3, "iterations": 12000, "mean": 94.0, "this_budget_runs": [93.7]}
    lonely = {"arm": "a", "fold": 2, "iterations": 16000, "mean": 99.0, "this_budget_runs": []}
    gains = R.longer_budget_gains([f0, f1, c12, lonely], 8000)
    assert [(x["arm"], x["iterations"], x["folds"]) for x in gains] == [("a", 12000, [0, 1]), ("c", 12000, [3])]


def _method(name, dice, asd, nsd, small_dice, missed=0, runs=1):
    classes = {"1": small_dice, "2": dice}
    return {"name": name, "average": {"Dice": {"mean": dice}, "ASD": {"mean": asd}, "NSD": {"mean": nsd}},
            "per_class": {k: {"Dice": {"mean": v}} for k, v in classes.items()},
            "missed": {"1": missed, "2": 0}, "runs": [{}] * runs}


def test_goals_arithmetic():
    aggregate = {"classes": [{"key": "1", "column": "LAG"}, {"key": "2", "column": "Li"}],
                 "methods": [_method("A", 0.80, 3.0, 0.70, 0.60), _method("B", 0.86, 2.5, 0.75, 0.72),
                             _method("C", 0.90, 2.0, 0.80, 0.85)]}
    arms = {"a": C.Arm("a", "A", "t", skcdf=False), "b": C.Arm("b", "B", "t"),
            "c": C.Arm("c", "C", "t", all_labelled=True, skcdf=False)}
    g = R.goals(aggregate, arms, ["LAG"])
    assert g["gain_mean"] == pytest.approx(6.0) and g["goal_gain_mean_5"]
    assert g["gain_small"] == pytest.approx(12.0) and g["goal_gain_small_10"]
    assert g["gap_closed"] == pytest.approx(0.6) and g["goal_gap_closed_40pct"]
    assert g["goal_asd_nsd_not_worse"]
    # better ASD and NSD bought by missing organs (no surface, so out of both means): the goal is not met
    aggregate["methods"][1] = _method("B", 0.86, 2.5, 0.75, 0.72, missed=3, runs=3)  # 1 per run against (a)'s 0
    g = R.goals(aggregate, arms, ["LAG"])
    assert g["missed_per_run"] == {"a": 0, "b": 1} and not g["goal_asd_nsd_not_worse"]
    aggregate["methods"][0] = _method("A", 0.80, 3.0, 0.70, 0.60, missed=2, runs=2)
    assert R.goals(aggregate, arms, ["LAG"])["goal_asd_nsd_not_worse"]
    aggregate["methods"][0] = _method("A", 0.80, 3.0, 0.70, 0.60)
    aggregate["methods"][1] = _method("B", 0.81, 3.5, 0.75, 0.65)
    g = R.goals(aggregate, arms, ["LAG"])
    assert not (g["goal_gain_mean_5"] or g["goal_gain_small_10"] or g["goal_gap_closed_40pct"]
                or g["goal_asd_nsd_not_worse"])
    assert R.goals({"classes": [], "methods": [_method("A", 0.8, 3, 0.7, 0.6)]}, arms, ["LAG"]) == {
        "status": "needs arms (a) and (b)"}
    arms["g"] = C.Arm("g", "G", "t", ablation=True)  # the goals of another SKCDF arm, keyed by its letter
    aggregate["methods"].append(_method("G", 0.87, 2.0, 0.76, 0.65))
    g = R.goals(aggregate, arms, ["LAG"], "g")
    assert g["mean_dice"] == pytest.approx({"a": 80.0, "g": 87.0, "c": 90.0}) and g["gap_closed"] == pytest.approx(0.7)
    assert g["goal_asd_nsd_not_worse"] and not g["goal_gain_small_10"]


def test_goals_per_arm_lists_main_arms_always_and_ablations_with_results():
    aggregate = {"classes": [{"key": "1", "column": "LAG"}, {"key": "2", "column": "Li"}],
                 "methods": [_method("A", 0.80, 3.0, 0.70, 0.60), _method("G", 0.84, 2.5, 0.75, 0.72),
                             _method("I", 0.88, 2.0, 0.80, 0.75)]}
    arms = {"a": C.Arm("a", "A", "t", skcdf=False), "b": C.Arm("b", "B", "t"), "g": C.Arm("g", "G", "t"),
            "h": C.Arm("h", "H", "t", ablation=True), "i": C.Arm("i", "I", "t", ablation=True),
            "c": C.Arm("c", "C", "t", all_labelled=True, skcdf=False)}
    out = R.goals_per_arm(aggregate, arms, ["LAG"])
    assert list(out) == ["b", "g", "i"]  # (h) has no final result; (a), (c) are not SKCDF arms
    assert out["b"] == {"status": "needs arms (a) and (b)"}
    assert out["i"]["gain_mean"] == pytest.approx(8.0) and out["i"]["goal_gain_mean_5"]
    assert out["g"]["gain_small"] == pytest.approx(12.0) and "gap_closed" not in out["g"]


def test_gap_per_organ_shares_of_the_gap_and_pseudo_labels_of_the_runs_that_measured_them():
    aggregate = {"classes": [{"key": "1", "column": "LAG"}, {"key": "2", "column": "Li"}],
                 "methods": [_method("A", 0.950, 3.0, 0.70, 0.60),  # Li 95.0, LAG 60.0
                             _method("D", 0.955, 2.5, 0.75, 0.70), _method("C", 0.958, 2.0, 0.80, 0.80)]}
    arms = {"a": C.Arm("a", "A", "t", skcdf=False), "d": C.Arm("d", "D", "t"),
            "c": C.Arm("c", "C", "t", all_labelled=True, skcdf=False)}
    measured = {"curve": {"20": {"pseudo_dice": {"1": 0.1, "2": 0.1}}, "160": {"pseudo_dice": {"1": 0.66, "2": 0.97}}}}
    late = {"curve": {"20": {"pseudo_dice": {"1": 0.1, "2": 0.1}}, "160": {"pseudo_dice": {"1": 0.70, "2": 0.95}}}}
    unmeasured = {"curve": {"160": {"test_dice": {"mean": 0.8}}}}  # a run curved with --no-pseudo-curves
    rows = R.gap_per_organ(aggregate, arms, {"d": [measured, unmeasured, late]})
    lag, li = rows
    assert (lag["organ"], lag["a"], lag["d"], lag["c"]) == ("LAG", pytest.approx(60), pytest.approx(70),
                                                              pytest.approx(80))
    assert lag["closed"] == pytest.approx(0.5) and lag["pseudo"] == pytest.approx(68) and lag["pseudo_runs"] == 2
    assert li["gap"] == pytest.approx(0.8) and li["closed"] is None  # a share of a gap under 1 point is noise
    table = R.gap_markdown(rows)
    assert "| LAG | 60.0 | 70.0 | 80.0 | 20.0 | 50 % | 68.0 |" in table
    assert "| Li | 95.0 | 95.5 | 95.8 | 0.8 | - |" in table
    assert "mean of 2 run(s)" in table
    assert [r["organ"] for r in R.gap_per_organ({**aggregate, "classes": aggregate["classes"][::-1]}, arms, {})] == [
        "LAG", "Li"]  # label order, whatever order the aggregate lists them in
    rows[0]["closed"] = -0.003
    assert "| 0 % |" in R.gap_markdown(rows)  # no "-0 %"
    assert R.gap_per_organ(aggregate, arms, {"d": [unmeasured]})[0]["pseudo"] is None
    assert "| not measured |" in R.gap_markdown(R.gap_per_organ(aggregate, arms, {}))
    assert "not measured by the runs of (d)" in R.gap_markdown(R.gap_per_organ(aggregate, arms, {}))
    aggregate["methods"].pop()  # no (c): no gap to close
    assert R.gap_per_organ(aggregate, arms, {}) is None and R.gap_markdown(None) == ""


TASK = {"num_train": 24, "num_unlabeled": 12, "num_test": 8, "val": "4", "labeled": "4"}


def test_task_is_fixed_per_work_folder(tmp_path):
    assert C.fixed_task(tmp_path, TASK, 8000) == TASK
    with pytest.raises(SystemExit, match=r"another task \(labeled 4 -> 2\); use another --work folder "
                                         r"\(e\.g\. skcdf_data/convergence_2lab_8000\)"):
        C.fixed_task(tmp_path, {**TASK, "labeled": "2"}, 8000)
    assert json.loads((tmp_path / "task.json").read_text()) == TASK


def _stored_run(arm, fold, iterations, dice_small, dice_other, labeled="4"):
    mean = {"0": {"Dice": 0.99}, "1": {"Dice": dice_small}, "2": {"Dice": dice_other}}
    return {"arm": arm, "name": arm.upper(), "fold": fold, "budget": {"iterations": iterations},
            "task": {**TASK, "labeled": labeled}, "final_summary": {"mean": mean}}


def test_store_keys_runs_by_task_and_budget_and_reports_other_budgets_against_the_same_fold(tmp_path, monkeypatch):
    main, longer = {"iterations": 4000}, {"iterations": 8000}
    a, c = C.ARMS["a"], C.ARMS["c"]
    assert C.store_file(a, 0, main, TASK).name == "a_fold0_4lab_4000it.json"
    assert C.store_file(a, 0, longer, TASK).name == "a_fold0_4lab_8000it.json"
    two = {**TASK, "labeled": "2"}
    assert C.store_file(a, 0, main, two).name == "a_fold0_2lab_4000it.json"
    assert C.store_file(c, 3, main, TASK) == C.store_file(c, 3, main, two)  # (c) does not depend on --labeled
    assert C.store_file(c, 3, main, TASK).name == "c_fold3_alllab_4000it.json"
    monkeypatch.setattr(C, "STORE", tmp_path)
    for run in (_stored_run("a", 0, 4000, 0.70, 0.90), _stored_run("a", 1, 4000, 0.5, 0.5),
                _stored_run("a", 0, 8000, 0.74, 0.92), _stored_run("a", 0, 4000, 0.3, 0.3, labeled="2"),
                _stored_run("c", 3, 4000, 0.9, 0.9, labeled="all")):
        tag = f"{run['task']['labeled']}lab_{run['budget']['iterations']}it"
        (tmp_path / f"{run['arm']}_fold{run['fold']}_{tag}.json").write_text(json.dumps(run))
    runs, other = C.load_store(main, TASK), C.load_store(main, TASK, same=False)
    assert [r["fold"] for r in runs["a"]] == [0, 1] and [r["budget"]["iterations"] for r in other["a"]] == [8000]
    assert [r["task"]["labeled"] for r in runs["a"]] == ["4", "4"]
    assert [r["fold"] for r in C.load_store(main, two)["a"]] == [0]
    assert C.load_store(main, two)["c"] == runs["c"]  # the upper bound serves every labelled count
    assert C.stored(a, 1, main, TASK) and not C.stored(a, 1, longer, TASK) and not C.stored(a, 1, main, two)
    rows = R.other_budgets(runs, other, ["1"])
    assert len(rows) == 1
    row = rows[0]
    assert (row["arm"], row["fold"], row["iterations"]) == ("a", 0, 8000)
    assert row["mean"] == pytest.approx(83.0) and row["small"] == pytest.approx(74.0)  # background left out
    assert row["this_budget_mean"] == pytest.approx(80.0) and row["this_budget_small"] == pytest.approx(70.0)
    assert row["this_budget_runs"] == pytest.approx([80.0, 50.0])  # every run of (a) here: the regime's comparison
    assert row["plateau"] is None  # stored without a curve
    other["a"][0]["curve"] = {str(e): {"test_dice": {"1": v, "2": v}} for e, v in ((40, 0.5), (120, 0.85), (160, 0.86))}
    row = R.other_budgets(runs, other, ["1"])[0]  # the longer run's own last quarter: 6000 -> 8000 iterations
    assert row["plateau"]["gain"] == pytest.approx(1.0) and row["plateau"]["from_iteration"] == 6000


def _work_folder(root: Path, task: dict) -> Path:
    (root / "nnUNet_raw" / "Dataset962_Convergence" / "imagesTr").mkdir(parents=True)
    (root / "nnUNet_raw" / "Dataset962_Convergence" / "imagesTr" / "phantom_tr_0000_0000.nii.gz").write_bytes(b"x")
    pre = root / "nnUNet_preprocessed" / "Dataset962_Convergence"
    (pre / "nnUNetPlans_3d_fullres").mkdir(parents=True)
    (pre / "nnUNetPlans_3d_fullres" / "phantom_tr_0000.b2nd").write_bytes(b"y")
    for name in ("nnUNetPlans.json", "splits_final.json", "convergence_split_done"):
        (pre / name).write_text("{}")
    (root / "task.json").write_text(json.dumps(task))
    return root


def test_data_from_copies_the_phantom_without_its_split_and_refuses_another_phantom(tmp_path):
    source = _work_folder(tmp_path / "four", TASK)
    raw, pre = tmp_path / "two" / "nnUNet_raw", tmp_path / "two" / "nnUNet_preprocessed"
    raw.mkdir(parents=True), pre.mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"another phantom \(\{'num_train': \(24, 30\)\}"):
        C.copy_phantom(source, raw, pre, "962", {**TASK, "num_train": 30, "labeled": "2"})
    assert not any(raw.iterdir()) and not any(pre.iterdir())
    with pytest.raises(SystemExit, match="no task.json there"):
        C.copy_phantom(tmp_path / "nowhere", raw, pre, "962", TASK)
    C.copy_phantom(source, raw, pre, "962", {**TASK, "labeled": "2"})
    copied = pre / "Dataset962_Convergence"
    assert (raw / "Dataset962_Convergence" / "imagesTr" / "phantom_tr_0000_0000.nii.gz").read_bytes() == b"x"
    assert (copied / "nnUNetPlans_3d_fullres" / "phantom_tr_0000.b2nd").read_bytes() == b"y"
    assert (copied / "nnUNetPlans.json").exists() and (copied / "convergence_planned").exists()
    assert not (copied / "splits_final.json").exists() and not (copied / "convergence_split_done").exists()
    assert sorted(p.name for p in pre.iterdir()) == ["Dataset962_Convergence"]  # no temporary folder left
    assert (source / "nnUNet_preprocessed" / "Dataset962_Convergence" / "splits_final.json").exists()  # untouched


def test_one_report_per_task_and_budget():
    assert R.report_stem(TASK, {"iterations": 8000}) == "convergence_4lab_8000it"
    assert R.report_stem({**TASK, "labeled": "2"}, {"iterations": 4000}) == "convergence_2lab_4000it"
    line = R.task_line({**TASK, "labeled": "2"})
    assert "24 training cases (4 validation, 2 of the other 20 labelled" in line and "all 20 with labels" in line


def test_head_drift_measures_the_full_resolution_head_pair_per_decoder():
    import torch

    import head_drift

    state = {}
    for decoder, scale in (("decoder_l", 0.5), ("decoder_u", 0.0)):
        for stage in (0, 1):
            w, b = torch.ones(14, 32, 1, 1, 1) * (stage + 1), torch.ones(14) * (stage + 1)
            state[f"{decoder}.seg_layers.{stage}.weight"], state[f"{decoder}.seg_layers.{stage}.bias"] = w, b
            state[f"{decoder}.balanced_seg_layers.{stage}.weight"] = w * (1 - scale)
            state[f"{decoder}.balanced_seg_layers.{stage}.bias"] = b * (1 + 2 * scale)
    drift = head_drift.head_drift(state)
    assert drift["decoder_l"]["weight"] == pytest.approx(0.5) and drift["decoder_l"]["bias"] == pytest.approx(1.0)
    assert drift["decoder_u"] == {"weight": 0.0, "bias": 0.0}  # heads equal: the main head became the balanced one
    assert head_drift.head_drift({"encoder.x.weight": torch.ones(1)}) == {}


def test_reevaluate_adds_new_metrics_and_refuses_changed_ones(tmp_path, monkeypatch):
    """A stored run evaluated before islands were counted gains them from its kept predictions; a store whose
    existing metrics would change is left byte for byte as it was; a run without its predictions is skipped."""
    import os

    import numpy as np
    import SimpleITK as sitk

    from nnunetv2_skcdf.evaluation.evaluate import evaluate_entry

    raw, pred = tmp_path / "Dataset990_T", tmp_path / "predictions" / "a_fold0"
    for folder in (raw / "labelsTs", pred):
        folder.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                  "numTraining": 1, "file_ending": ".nii.gz"}))
    ref = np.zeros((6, 8, 8), np.uint8)
    ref[1:4, 1:4, 1:4] = 1
    prd = ref.copy()
    prd[5, 6:8, 6:8] = 1  # an island of 4 voxels
    for labels, path in ((ref, raw / "labelsTs" / "c0.nii.gz"), (prd, pred / "c0.nii.gz")):
        sitk.WriteImage(sitk.GetImageFromArray(labels), str(path))
    (pred / "done").touch()
    evaluate_entry(["-ref", str(raw / "labelsTs"), "-pred", str(pred), "-np", "1", "--no-plot"])
    old = json.loads((pred / "summary.json").read_text())
    for case in old["metric_per_case"]:  # as stored before islands existed
        for metrics in case["metrics"].values():
            del metrics["n_islands"], metrics["island_volume"]
    monkeypatch.setattr(C, "STORE", tmp_path / "store")
    arm, budget, task = C.ARMS["a"], {"iterations": 100}, {"labeled": "2"}
    path = C.store_file(arm, 0, budget, {"labeled": "2"})
    path.parent.mkdir()
    run = {"arm": "a", "fold": 0, "budget": budget, "task": task, "final_summary": old, "prediction_folder": str(pred),
           "commit": "abc1234"}
    path.write_text(json.dumps(run))
    env, log = dict(os.environ), tmp_path / "log.txt"
    assert C.reevaluate(arm, 0, raw, tmp_path, env, log, budget, task, "1")
    stored = json.loads(path.read_text())
    assert stored["final_summary"]["metric_per_case"][0]["metrics"]["1"]["n_islands"] == 1
    assert stored["final_summary"]["skcdf"]["per_class"]["1"]["islands"] == 1
    assert stored["commit"] == "abc1234" and set(stored["final_summary_reevaluated"]) == {"commit", "date"}

    old["metric_per_case"][0]["metrics"]["1"]["Dice"] = 0.5  # a metric the run had: must not change silently
    path.write_text(json.dumps({**run, "final_summary": old}))
    before = path.read_bytes()
    assert not C.reevaluate(arm, 0, raw, tmp_path, env, log, budget, task, "1")
    assert path.read_bytes() == before
    assert C.summary_changes(old, stored["final_summary"]) == [f"c0.nii.gz/1/Dice: 0.5 -> {2 * 27 / (27 + 31)}"]

    (pred / "done").unlink()
    assert not C.reevaluate(arm, 0, raw, tmp_path, env, log, budget, task, "1")


def test_islands_per_run_over_all_and_smallest_organs():
    classes = [{"key": "1", "column": "LAG"}, {"key": "2", "column": "Li"}]
    method = {"name": "A", "runs": [{}, {}], "islands": {"1": 4, "2": 10}, "island_volume": {"1": 500.0, "2": 9500.0}}
    old = {"name": "B", "runs": [{}], "islands": {"1": None, "2": None}, "island_volume": {"1": None, "2": None}}
    out = R.islands_per_run({"classes": classes, "methods": [method, old]}, ["LAG"])
    assert out["A"] == {"runs": 2, "all": 7.0, "all_cm3": 5.0, "small": 2.0, "small_cm3": 0.25}
    assert out["B"] is None


def test_write_section_replaces_its_own_section_only_and_leaves_no_temporary_file(tmp_path, monkeypatch):
    import data_pipeline

    md = tmp_path / "BENCHMARKS.md"
    md.write_text("# Benchmarks\n\n<!-- x:start -->\nold x\n<!-- x:end -->\n\n<!-- y:start -->\ny\n<!-- y:end -->\n")
    monkeypatch.setattr(data_pipeline, "BENCHMARKS_MD", md)
    data_pipeline.write_section("x", "new x")
    data_pipeline.write_section("z", "z")
    assert md.read_text() == ("# Benchmarks\n\n<!-- x:start -->\nnew x\n<!-- x:end -->\n\n<!-- y:start -->\ny\n"
                              "<!-- y:end -->\n\n<!-- z:start -->\nz\n<!-- z:end -->\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["BENCHMARKS.md"]


def test_grad_norms_per_term_clip_factor_and_encoder_cosine():
    import torch
    import grad_norms as G

    enc = torch.nn.Parameter(torch.zeros(2))
    dec = torch.nn.Parameter(torch.zeros(1))
    named = [("encoder.w", enc), ("decoder_l.w", dec)]
    a, b = torch.tensor([3.0, 4.0]), torch.tensor([-4.0, 3.0])  # orthogonal on the encoder
    terms = {"sup_main": (enc * a).sum() + 2 * dec.sum(), "u_main": (enc * b).sum() + 10 * dec.sum()}
    fig = G.gradient_figures(named, terms, clip=12.0)
    assert fig["norm"]["sup_main"] == pytest.approx((25 + 4) ** 0.5)
    assert fig["norm"]["u_main"] == pytest.approx((25 + 100) ** 0.5)
    total = ((3 - 4) ** 2 + (4 + 3) ** 2 + 12 ** 2) ** 0.5  # 13.96: above nnU-Net's clip of 12
    assert fig["norm"]["total"] == pytest.approx(total)
    assert fig["clip_factor"] == pytest.approx(12 / total) and fig["clipped"] == 1.0
    assert fig["sup_step"] == pytest.approx(12 / total * 29 ** 0.5)
    assert fig["cos_encoder"] == pytest.approx(0.0, abs=1e-12)  # the decoder part does not enter the cosine
    # one term (nnU-Net's loss), a parameter it does not use: no cosine, no clipping
    fig = G.gradient_figures(named, {"sup_main": (enc * a).sum()}, clip=12.0)
    assert fig["clip_factor"] == 1.0 and fig["clipped"] == 0.0 and "cos_encoder" not in fig
    assert fig["sup_step"] == pytest.approx(5.0)
    rows = [fig, {**fig, "norm": {"sup_main": 7.0, "total": 7.0}}]
    mean = G.mean_figures(rows)
    assert mean["norm"]["total"] == pytest.approx(6.0) and mean["total_norm_std"] == pytest.approx(1.0)


def test_grad_norms_model_environment_reads_the_work_folder_budget_without_creating_or_overriding(tmp_path,
                                                                                                  monkeypatch):
    import grad_norms as G

    work = tmp_path / "work"
    budget = C.fixed_budget(work, 1000, 4)
    folder = work / "nnUNet_results" / "Dataset962_Convergence" / "SKCDFTrainer_cw1_conv__nnUNetPlans__3d_cpu"
    monkeypatch.setenv("nnUNet_extTrainer", "/somewhere/else")
    for var in ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results", "SKCDF_CONV_EPOCHS", "SKCDF_CONV_SNAPSHOTS"):
        monkeypatch.delenv(var, raising=False)
    assert G.model_environment(folder) == (work, "Dataset962_Convergence", "SKCDFTrainer_cw1_conv", "nnUNetPlans",
                                           "3d_cpu")
    assert os.environ["SKCDF_CONV_EPOCHS"] == "20" and os.environ["SKCDF_CONV_SNAPSHOTS"] == "5,10,15,20"
    assert {v: os.environ[v] for v in C.nnunet_paths(work)} == C.nnunet_paths(work)
    assert os.environ["nnUNet_results"] == str(work / "nnUNet_results")
    assert os.environ["nnUNet_extTrainer"] == "/somewhere/else"  # the caller's lookup path is kept
    assert sorted(p.name for p in work.iterdir()) == ["budget.json"]  # nothing created
    assert C.budget_variables(budget) == {"SKCDF_CONV_EPOCHS": "20", "SKCDF_CONV_SNAPSHOTS": "5,10,15,20"}
    with pytest.raises(SystemExit, match="not a model folder"):
        G.model_environment(tmp_path / "plainfolder")


def test_overlay_is_redrawn_only_with_the_predictions_of_every_arm_it_shows():
    lines = ["(a): phantom_ts_0002.nii.gz, slice 30", "(c): phantom_ts_0006.nii.gz, slice 26",
             "(e2): phantom_ts_0002.nii.gz, slice 30"]
    assert R.overlay_arms(lines) == {"a", "c", "e2"}
    assert not R.redraw_overlay(lines, {"d"})  # a later session with one arm keeps the wider picture
    assert not R.redraw_overlay(lines, {"a", "c", "d"})
    assert R.redraw_overlay(lines, {"a", "c", "e2", "d"})
    assert R.redraw_overlay([], {"d"})  # no picture yet
    note = R.overlay_note(lines, ["a", "c", "d", "e2"])
    assert "(e2): phantom_ts_0002.nii.gz, slice 30." in note
    assert note.endswith("Not in the picture (predictions made in another session's work folder): (d).")
    assert R.overlay_note([], ["a"]) == ""


def test_overlay_plan_draws_a_second_picture_of_the_arms_here_when_the_first_cannot_be_redrawn():
    first = ["(a): phantom_ts_0002.nii.gz, slice 30", "(c): phantom_ts_0006.nii.gz, slice 26"]
    second = ["(a): phantom_ts_0003.nii.gz, slice 29", "(d): phantom_ts_0002.nii.gz, slice 30"]
    assert list(R.OVERLAYS) == ["overlay", "overlay_current"]
    assert R.overlay_plan({}, {"a", "d"}) == {"overlay": "draw"}  # no picture yet: the first one
    assert R.overlay_plan({"overlay": first}, {"a", "c", "d"}) == {"overlay": "draw"}  # superset: redrawn
    # (c)'s predictions are gone: the first is kept, the second shows the arms here
    assert R.overlay_plan({"overlay": first}, {"a", "d", "l"}) == {"overlay": "keep", "overlay_current": "draw"}
    assert R.overlay_plan({"overlay": first, "overlay_current": second}, {"a", "d", "l"}) == \
        {"overlay": "keep", "overlay_current": "draw"}
    # a later session with one arm keeps both wider pictures
    assert R.overlay_plan({"overlay": first, "overlay_current": second}, {"l"}) == \
        {"overlay": "keep", "overlay_current": "keep"}
    assert R.overlay_plan({"overlay": first, "overlay_current": second}, set()) == \
        {"overlay": "keep", "overlay_current": "keep"}
    # redrawing the first drops the second (the first shows its arms too)
    assert R.overlay_plan({"overlay": first, "overlay_current": second}, {"a", "c", "d"}) == {"overlay": "draw"}
    assert R.overlay_plan({}, set()) == {}
    note = R.overlay_note(second, ["a", "c", "d"], "Second overlay")
    assert note.startswith("\n\nSecond overlay, median test case per arm") and note.endswith(": (c).")


def test_a_dropped_overlay_leaves_no_png_behind(tmp_path):
    stem = "convergence_2lab_8000it"
    for name in R.OVERLAYS:
        (tmp_path / f"{stem}_{name}.png").write_bytes(b"png")
    other = tmp_path / "convergence_4lab_8000it_overlay_current.png"  # another report's figure
    other.write_bytes(b"png")
    # both kept or drawn: nothing removed
    assert R.drop_unplanned_overlays(tmp_path, stem, {"overlay": "keep", "overlay_current": "draw"}) == []
    assert (tmp_path / f"{stem}_overlay_current.png").is_file()
    # the first redrawn: the second is no longer in the report, and its picture goes
    assert R.drop_unplanned_overlays(tmp_path, stem, {"overlay": "draw"}) == \
        [tmp_path / f"{stem}_overlay_current.png"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"{stem}_overlay.png", other.name])
    assert R.drop_unplanned_overlays(tmp_path, stem, {"overlay": "draw"}) == []  # nothing left to remove


def test_the_report_expects_the_runs_of_the_arms_named_only():
    ARMS = C.ARMS
    runs = {"a": [{"fold": 0}], "d": [{"fold": 0}, {"fold": 1}]}

    def missing(chosen, n, ablation_n, runs_):
        return R.missing_runs(R.planned_runs({}, R.expected_runs(ARMS, chosen, n, ablation_n), True), runs_)

    assert missing(["a", "d"], 1, 1, runs) == {}
    assert missing(["a", "d"], 3, 1, runs) == {"a": 2, "d": 1}
    assert missing(["a", "c", "k"], 2, 2, runs) == {"a": 1, "c": 2, "k": 2}  # k is an ablation
    assert missing(["k"], 3, 1, {}) == {"k": 1}
    assert set(missing(list(ARMS), 1, 1, runs)) == set(ARMS) - {"a", "d"}


def test_a_training_command_adds_its_arms_to_the_sections_plan_and_never_shrinks_it():
    """The lane trains (d) with ``--arms d --runs 1`` after the report command planned a, c, d, p x 3: the section
    stays partial with (a)'s and (p)'s missing runs, and (p) stays under the plateau criterion."""
    ARMS = C.ARMS
    runs = {"a": [{"fold": 0}], "c": [{"fold": 3}, {"fold": 4}, {"fold": 5}], "d": [{"fold": 0}]}
    plan = R.planned_runs({}, R.expected_runs(ARMS, ["a", "c", "d", "p"], 3, 1), report_only=True)
    assert plan == {"a": 3, "c": 3, "d": 3, "p": 3}
    trained = R.planned_runs({"planned_runs": plan}, R.expected_runs(ARMS, ["d"], 1, 1), report_only=False)
    assert trained == plan and R.missing_runs(trained, runs) == {"a": 2, "d": 2, "p": 3}
    assert R.plateau_arms(trained) == ("a", "c", "p")
    # a new arm joins the plan; the report command states it anew (here: without (p))
    assert R.planned_runs({"planned_runs": plan}, {"q": 1}, False) == {**plan, "q": 1}
    assert R.planned_runs({"planned_runs": plan}, R.expected_runs(ARMS, ["a", "c", "d"], 3, 1), True) == \
        {"a": 3, "c": 3, "d": 3}
    # a section written before the plan was recorded: its stored + missing runs
    old = {"stored_runs": {"a": [[0, "x", "d"]], "c": [[3, "x", "d"]] * 3}, "missing_runs": {"a": 2, "d": 3, "p": 3}}
    assert R.planned_runs(old, R.expected_runs(ARMS, ["a"], 1, 1), False) == {"a": 3, "c": 3, "d": 3, "p": 3}


def test_skcdf_curves_evaluate_the_hidden_label_cases_unless_none_are_given(tmp_path, monkeypatch):
    commands = []
    monkeypatch.setattr(C.subprocess, "run", lambda cmd, env, check: commands.append(cmd))
    budget = {"epochs": 240, "snapshot_epochs": [30, 240]}
    hidden = ["phantom_tr_0001", "phantom_tr_0003"]
    C.curves(C.ARMS["d"], 0, tmp_path, {"nnUNet_results": str(tmp_path)}, tmp_path, budget, hidden)
    C.curves(C.ARMS["d"], 0, tmp_path, {"nnUNet_results": str(tmp_path)}, tmp_path, budget, [])
    C.curves(C.ARMS["a"], 0, tmp_path, {"nnUNet_results": str(tmp_path)}, tmp_path, budget, hidden)
    with_hidden, test_only, nnunet = commands
    assert with_hidden[with_hidden.index("--hidden") + 1:] == hidden
    assert "--hidden" not in test_only and "--hidden" not in nnunet  # --no-pseudo-curves; a plain nnU-Net arm
    assert with_hidden[with_hidden.index("--epochs") + 1] == "30,240"
    assert test_only[test_only.index("--out") + 1] == str(tmp_path / "curves" / "d_fold0.json")


def test_curve_every_keeps_the_final_and_the_three_quarter_snapshot_and_the_report_names_the_sparser_arms(
        tmp_path, monkeypatch):
    snaps = [30, 60, 90, 120, 150, 180, 210, 240]
    assert C.curve_epochs(snaps, 1) == snaps
    assert C.curve_epochs(snaps, 2) == [60, 120, 180, 240]  # 180 = 3/4 of 240: the plateau criterion's point
    assert C.curve_epochs(snaps, 3) == [60, 150, 240]
    with pytest.raises(ValueError, match="curve-every"):
        C.curve_epochs(snaps, 0)
    commands = []
    monkeypatch.setattr(C.subprocess, "run", lambda cmd, env, check: commands.append(cmd))
    C.curves(C.ARMS["a"], 1, tmp_path, {"nnUNet_results": str(tmp_path)}, tmp_path,
             {"epochs": 240, "snapshot_epochs": snaps}, [], every=2)
    assert commands[0][commands[0].index("--epochs") + 1] == "60,120,180,240"
    # one run with 8 points, one with 4: the arm's mean curve has the 4 both have, and the plateau is unchanged
    full = {str(e): {"test_dice": {"1": e / 300}} for e in snaps}
    sparse = {str(e): {"test_dice": {"1": e / 300 + 0.01}} for e in [60, 120, 180, 240]}
    table = R.curve_table({"a": [{"arm": "a", "curve": full}, {"arm": "a", "curve": sparse}],
                           "c": [{"arm": "c", "curve": full}]}, ["1"])
    assert table["a"]["iterations"] == [3000, 6000, 9000, 12000] and table["a"]["runs"] == 2
    assert R.plateau(table["a"])["from_iteration"] == 9000
    line = R.curve_points_line({"epochs": 240, "snapshot_epochs": snaps}, table)
    assert line.startswith("1500, 3000, 4500, 6000, 7500, 9000, 10500, 12000; ")
    assert "(a) at 3000, 6000, 9000, 12000" in line and "(c)" not in line
    assert R.curve_points_line({"epochs": 240, "snapshot_epochs": snaps}, {"c": table["c"]}).endswith("12000")


# ---------------------------------------------------------------------------------------------- the multi-site task
MS = {"num_train": 40, "num_unlabeled": 24, "num_test": 16, "val": "4", "labeled": "4", "sites": ["A", "B", "C", "D"],
      "labelled_site": "A", "sites_version": "1"}


def _phantom_cases(counts=(("tr", 40), ("ts", 16), ("un", 24)), sites="ABCD") -> dict:
    """phantom_cases.json's 'cases' as skcdf_make_phantom --sites writes them: case i of every role from site i mod n."""
    return {f"phantom_{role}_{i:04d}": {"site": sites[i % len(sites)], "role": role, "phase": "x"}
            for role, n in counts for i in range(n)}


def _args(**kw):
    import argparse

    base = dict(num_train=None, num_unlabeled=None, num_test=None, val="4", labeled="4", sites=None,
                labelled_site=None)
    return argparse.Namespace(**{**base, **kw})


def test_the_task_of_the_original_phantom_keeps_its_keys_and_the_multisite_task_adds_its_sites():
    assert C.task_of(_args()) == TASK  # exactly the keys its stored runs were matched on
    assert C.task_of(_args(labeled="2", num_test=8)) == {**TASK, "labeled": "2"}
    assert C.task_of(_args(sites=["all"])) == MS  # sizes of the multi-site task: 10 / 4 / 6 cases per site
    assert C.task_of(_args(sites=["all"], labelled_site="C", num_test=20))["labelled_site"] == "C"
    assert C.task_of(_args(sites=["B", "A"]))["labelled_site"] == "B"  # the first site by default
    with pytest.raises(SystemExit, match="must cover every site"):
        C.task_of(_args(sites=["all"], num_test=3))
    with pytest.raises(SystemExit, match="--labelled-site E is not one of --sites A B C D"):
        C.task_of(_args(sites=["all"], labelled_site="E"))
    with pytest.raises(SystemExit, match="--labelled-site needs --sites"):
        C.task_of(_args(labelled_site="A"))
    with pytest.raises(SystemExit, match="counts"):
        C.task_of(_args(sites=["all"], labeled="0.2"))
    with pytest.raises(SystemExit, match="Unknown site"):
        C.task_of(_args(sites=["Z"]))


def test_multisite_split_labels_and_validates_one_site_and_stock_skcdf_split_imports_it(tmp_path):
    from nnunetv2_skcdf.splits.published_lists import read_published_lists
    from nnunetv2_skcdf.splits.semi_supervised_splits import compute_semi_supervised_splits

    cases = _phantom_cases()
    lists = C.multisite_lists(cases, "A", 4, 4)
    assert lists["val"] == ["phantom_tr_0000", "phantom_tr_0004", "phantom_tr_0008", "phantom_tr_0012"]
    assert lists["labeled"] == ["phantom_tr_0016", "phantom_tr_0020", "phantom_tr_0024", "phantom_tr_0028"]
    assert {cases[c]["site"] for c in lists["val"] + lists["labeled"]} == {"A"}
    hidden = lists["unlabeled"]
    assert len(hidden) == 32 and {cases[c]["site"] for c in hidden} == {"A", "B", "C", "D"}
    assert sum(cases[c]["site"] == "A" for c in hidden) == 2
    assert sorted(hidden + lists["val"] + lists["labeled"]) == sorted(c for c in cases if "_tr_" in c)
    # validation first: another labelled count keeps the validation cases, hence the same bound (c)
    assert C.multisite_lists(cases, "A", 2, 4)["val"] == lists["val"]
    assert {cases[c]["site"] for c in C.multisite_lists(cases, "C", 4, 4)["labeled"]} == {"C"}
    with pytest.raises(SystemExit, match=r"site A has 10 training cases, fewer than --val 4 \+ --labeled 7"):
        C.multisite_lists(cases, "A", 7, 4)

    ratio = C.task_tag(MS)
    C.write_lists(lists, tmp_path / "lists", ratio)
    assert sorted(p.name for p in (tmp_path / "lists").iterdir()) == [
        "eval.txt", "labeled_4lab-siteA-ms.txt", "unlabeled_4lab-siteA-ms.txt"]
    training = sorted(c for c in cases if "_tr_" in c)
    unlabelled_images = sorted(c for c in cases if "_un_" in c)
    result = compute_semi_supervised_splits(training, unlabelled_images,
                                            imported=read_published_lists(str(tmp_path / "lists"), ratio),
                                            add_unlabeled_images=True, folds=3)  # what skcdf_split --import-lists does
    assert len(result.folds) == 3 and all(f == result.folds[0] for f in result.folds)
    fold = result.folds[0]
    assert fold["train"] == lists["labeled"] and fold["val"] == lists["val"]
    assert fold["unlabeled"] == sorted(hidden + unlabelled_images)
    assert not result.notes  # every training case is in a list

    # the bound (c): every non-validation training case of every site labelled, the same validation cases
    raw, pre = tmp_path / "raw", tmp_path / "pre"
    (raw / "imagesTr").mkdir(parents=True), pre.mkdir()
    for c in training:
        (raw / "imagesTr" / f"{c}_0000.nii.gz").touch()
    (raw / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "x": 1},
                                                  "numTraining": 40, "file_ending": ".nii.gz"}))
    (pre / "splits_final.json").write_text(json.dumps(result.folds))
    C.add_all_labelled_folds(pre, raw)
    splits = json.loads((pre / "splits_final.json").read_text())
    assert len(splits) == 6 and splits[:3] == result.folds
    assert all(f["train"] == sorted(lists["labeled"] + hidden) and f["val"] == lists["val"] and not f["unlabeled"]
               for f in splits[3:])
    assert C.hidden_label_cases(pre, raw) == sorted(hidden)  # SKCDF's diagnostics: hidden-label cases, all sites


def test_the_multisite_test_set_covers_every_site(tmp_path):
    cases = _phantom_cases()
    assert C.check_test_sites(cases, ["A", "B", "C", "D"]) == {"A": 4, "B": 4, "C": 4, "D": 4}
    too_few = _phantom_cases((("tr", 40), ("ts", 3), ("un", 0)))
    with pytest.raises(SystemExit, match=r"cover every site: test cases per site \{'A': 1, 'B': 1, 'C': 1, 'D': 0\}"):
        C.check_test_sites(too_few, ["A", "B", "C", "D"])
    (tmp_path / "phantom_cases.json").write_text(json.dumps({"cases": cases}))
    assert C.case_sites(tmp_path)["phantom_ts_0005"] == "B" and len(C.case_sites(tmp_path)) == 80
    assert C.case_sites(tmp_path / "original") == {}  # the original phantom: no sites


def test_store_names_of_the_multisite_task_and_of_arm_p_leave_every_stored_name_unchanged(tmp_path, monkeypatch):
    budget = {"iterations": 8000}
    a, c, p = C.ARMS["a"], C.ARMS["c"], C.ARMS["p"]
    assert C.store_file(a, 0, budget, MS).name == "a_fold0_4lab-siteA-ms_8000it.json"
    assert C.store_file(c, 3, budget, MS).name == "c_fold3_alllab-siteA-ms_8000it.json"
    assert C.store_file(p, 1, budget, MS).name == "p_fold1_4lab-siteA-ms_8000it.json"
    assert C.store_file(p, 0, budget, {**TASK, "labeled": "2"}).name == "p_fold0_2lab_8000it.json"
    assert C.store_file(a, 0, budget, {**MS, "sites": ["A", "C"]}).name == "a_fold0_4lab-siteA-msAC_8000it.json"
    assert C.store_file(a, 0, budget, {**MS, "labelled_site": "B"}).name == "a_fold0_4lab-siteB-ms_8000it.json"
    assert R.report_stem(MS, budget) == "convergence_4lab-siteA-ms_8000it"
    assert C.default_work(MS, 8000).name == "convergence_4lab-siteA-ms_8000"
    assert C.default_work({**TASK, "labeled": "2"}, 8000).name == "convergence_2lab_8000"
    # every run stored so far is found under its own name, with its own task and budget
    stored = sorted(C.STORE.glob("*.json"))
    assert len(stored) >= 31
    for path in stored:
        run = json.loads(path.read_text())
        arm = C.ARMS[run["arm"]]
        task = {**run["task"], "labeled": "4"} if arm.all_labelled else run["task"]
        assert C.store_file(arm, run["fold"], run["budget"], task) == path
        assert C.stored(arm, run["fold"], run["budget"], task)
    # the two tasks' stores do not mix
    monkeypatch.setattr(C, "STORE", tmp_path)
    two = {**TASK, "labeled": "2"}
    for arm, fold, task in ((a, 0, two), (c, 3, two), (a, 0, MS), (c, 3, MS), (p, 0, MS), (p, 0, two)):
        run = {"arm": arm.key, "fold": fold, "budget": budget, "task": C.arm_task(arm, task)}
        C.store_file(arm, fold, budget, task).write_text(json.dumps(run))
    ms_runs, two_runs = C.load_store(budget, MS), C.load_store(budget, two)
    assert {k: [r["task"].get("sites") for r in v] for k, v in ms_runs.items()} == {
        "a": [MS["sites"]], "c": [MS["sites"]], "p": [MS["sites"]]}
    assert all(r["task"].get("sites") is None for v in two_runs.values() for r in v) and set(two_runs) == {"a", "c", "p"}
    assert C.stored(c, 3, budget, MS) and C.stored(c, 3, budget, two) and not C.stored(c, 4, budget, MS)


def test_copying_a_phantom_refuses_one_of_other_sites(tmp_path):
    source = _work_folder(tmp_path / "four", TASK)
    raw, pre = tmp_path / "ms" / "nnUNet_raw", tmp_path / "ms" / "nnUNet_preprocessed"
    raw.mkdir(parents=True), pre.mkdir(parents=True)
    with pytest.raises(SystemExit, match=r"another phantom \(\{'sites': \(None, \['A', 'B', 'C', 'D'\]\), "
                                         r"'sites_version': \(None, '1'\)\}"):
        C.copy_phantom(source, raw, pre, "962", {**MS, "num_train": 24, "num_unlabeled": 12, "num_test": 8})
    # the same sites made by another version of the site generator: another phantom too
    older = _work_folder(tmp_path / "older", {**MS, "sites_version": "0"})
    with pytest.raises(SystemExit, match=r"another phantom \(\{'sites_version': \('0', '1'\)\}"):
        C.copy_phantom(older, raw, pre, "962", MS)


def _summary(cases: dict) -> dict:
    """skcdf_evaluate's per-case metrics: {case: {class: Dice}}."""
    return {"metric_per_case": [{"reference_file": f"/x/labelsTs/{c}.nii.gz", "prediction_file": f"/p/{c}.nii.gz",
                                 "metrics": {k: {"Dice": v} for k, v in d.items()}} for c, d in cases.items()],
            "mean": {k: {"Dice": float(np.nanmean([d[k] for d in cases.values()]))} for k in ("1", "2")}}


def test_per_site_grouping_of_final_dice_curves_and_reports():
    import convergence_eval as E

    sites = {"phantom_ts_0000": "A", "phantom_ts_0001": "B", "phantom_ts_0002": "A", "phantom_ts_0003": "B",
             "phantom_tr_0001": "B"}
    nan = float("nan")
    one = _summary({"phantom_ts_0000": {"0": 1.0, "1": 0.8, "2": 0.9},
                    "phantom_ts_0001": {"0": 1.0, "1": 0.4, "2": 0.6},
                    "phantom_ts_0002": {"0": 1.0, "1": 0.6, "2": nan},
                    "phantom_ts_0003": {"0": 1.0, "1": 0.2, "2": 0.5}})
    by_site = C.dice_by_site(one, sites)
    assert by_site["A"] == pytest.approx({"1": 0.7, "2": 0.9})  # an organ absent from a case: left out of its mean
    assert by_site["B"] == pytest.approx({"1": 0.3, "2": 0.55})
    # the curves' per-site means: the same grouping on convergence_eval's per-case Dice
    per_case = {"phantom_ts_0000": {"1": 0.8}, "phantom_ts_0002": {"1": 0.6}, "phantom_ts_0001": {"1": 0.4},
                "elsewhere": {"1": 0.0}}
    assert E.per_site(per_case, sites) == {"A": pytest.approx({"1": 0.7}), "B": pytest.approx({"1": 0.4})}
    assert E.per_site(per_case, {}) == {}

    two = _summary({c: {"0": 1.0, "1": 0.5, "2": 0.5} for c in sites if "_ts_" in c})
    runs = {"a": [{"arm": "a", "final_summary": one}, {"arm": "a", "final_summary": two}],
            "p": [{"arm": "p", "final_summary": two}]}
    t = R.site_tables(runs, sites, {"1": "Sp", "2": "Li"})
    assert t["sites"] == ["A", "B"] and t["cases"] == {"A": 2, "B": 2} and list(t["arms"]) == ["a", "p"]
    assert t["arms"]["a"]["mean"]["A"] == pytest.approx([80.0, 50.0]) and t["arms"]["a"]["runs"] == 2
    assert t["arms"]["a"]["per_organ"]["B"] == pytest.approx({"Sp": 40.0, "Li": 52.5})
    text = R.site_markdown(t)
    assert "| arm | runs | site A (2) | site B (2) | all |" in text
    assert "| (a) nnU-Net (labelled only) | 2 | 65.0 ± 15.0 | 46.2 ± 3.7 | 54.2 ± 4.2 |" in text
    assert "Site B, per organ (mean over runs):\n\n| arm | Sp | Li |" in text and "| (p) | 50.0 | 50.0 |" in text
    assert R.site_tables(runs, {}, {"1": "Sp"}) is None and R.site_markdown(None) == ""

    # SKCDF's pseudo labels per site, from the last curve point of the runs that measured them
    point = {"pseudo_dice_per_site": {"A": {"1": 0.9, "2": 0.7}, "B": {"1": 0.5, "2": 0.5}},
             "pseudo_cases_per_site": {"A": 2, "B": 10}}
    skcdf = R.pseudo_site_table({"d": [{"curve": {"20": {"test_dice": {}}, "160": point}},
                                       {"curve": {"160": {"test_dice": {"1": 0.5}}}}],  # --no-pseudo-curves
                                 "a": [{"curve": {"160": {"test_dice": {"1": 0.5}}}}]})
    assert skcdf == {"d": {"runs": 1, "cases": {"A": 2, "B": 10}, "sites": {"A": [pytest.approx(80.0)],
                                                                           "B": [pytest.approx(50.0)]}}}
    assert "| (d) | 1 | 80.0 | 50.0 |" in R.pseudo_markdown(skcdf, [])
    assert "site A (2) | site B (10)" in R.pseudo_markdown(skcdf, [])


def _nifti(array, path: Path) -> None:
    import SimpleITK as sitk

    path.parent.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(sitk.GetImageFromArray(np.asarray(array, np.uint8)), str(path))


def test_a_round_summary_scores_pseudo_labels_against_hidden_labels_per_site(tmp_path):
    source, round_raw = tmp_path / "Dataset962_Convergence", tmp_path / "Dataset963_ConvergencePseudoR1"
    (source / "dataset.json").parent.mkdir(parents=True)
    (source / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1, "b": 2},
                                                     "file_ending": ".nii.gz"}))
    (source / "phantom_cases.json").write_text(json.dumps({"cases": {
        "phantom_tr_0001": {"site": "B", "role": "tr"}, "phantom_tr_0002": {"site": "C", "role": "tr"},
        "phantom_un_0000": {"site": "A", "role": "un"}, "phantom_tr_0000": {"site": "A", "role": "tr"}}}))
    ref = np.zeros((2, 4, 4))
    ref[:, :2, :] = 1
    ref[:, 2:, :] = 2
    good, half = ref.copy(), ref.copy()
    half[:, 2:, :] = 1  # class 1: 2*16/(16+32), class 2: 0
    for case, pseudo in (("phantom_tr_0001", good), ("phantom_tr_0002", half)):
        _nifti(ref, source / "labelsTr" / f"{case}.nii.gz")
        _nifti(pseudo, round_raw / "pseudo_labels" / f"{case}.nii.gz")
    _nifti(good, round_raw / "pseudo_labels" / "phantom_un_0000.nii.gz")  # imagesUnlabeled: no label to score
    record = {"round": 1, "kept": ["phantom_tr_0001", "phantom_un_0000"], "threshold": 0.9, "keep": None,
              "previous_round": None, "seconds_prediction": 12.0, "organ_mean_agreement": {"1": 0.9},
              "teachers": [{"trainer": "nnUNetTrainer_conv", "fold": "0"}] * 3,
              "cases": {"phantom_tr_0000": {"origin": "labelled"},
                        "phantom_tr_0001": {"origin": "pseudo", "score": 0.95},
                        "phantom_tr_0002": {"origin": "pseudo", "score": 0.5},
                        "phantom_un_0000": {"origin": "pseudo", "score": 0.97}}}
    (round_raw / "pseudolabel_round.json").write_text(json.dumps(record))
    s = C.round_summary(1, round_raw, source, 60.0, ["skcdf_pseudolabel", "-d", "962"])
    assert (s["pool"], s["kept"], s["hidden"], s["threshold"]) == (3, 2, 2, 0.9)
    assert s["kept_ids"] == ["phantom_tr_0001", "phantom_un_0000"] and s["command"] == "skcdf_pseudolabel -d 962"
    assert s["pseudo_dice"] == pytest.approx({"1": (1 + 2 / 3) / 2, "2": 0.5})
    assert s["pseudo_dice_kept"] == pytest.approx({"1": 1.0, "2": 1.0})
    assert s["per_site"] == {
        "A": {"pool": 1, "kept": 1, "hidden": 0, "hidden_kept": 0, "pseudo_dice": None, "pseudo_dice_kept": None},
        "B": {"pool": 1, "kept": 1, "hidden": 1, "hidden_kept": 1, "pseudo_dice": {"1": 1.0, "2": 1.0},
              "pseudo_dice_kept": {"1": 1.0, "2": 1.0}},
        "C": {"pool": 1, "kept": 0, "hidden": 1, "hidden_kept": 0, "pseudo_dice": pytest.approx({"1": 2 / 3, "2": 0.0}),
              "pseudo_dice_kept": None}}
    text = R.pseudo_markdown({}, [{**s, "students": [{"test_dice": {"1": 0.8, "2": 0.6}, "train_s": 7200.0}]},
                                  {**s, "round": 2}])
    assert "| 1 | 3 x nnUNetTrainer_conv | 2/3 | A: 1/1, - (-) ; B: 1/1, 100.0 (100.0) ; C: 0/1, 33.3 (-) | " \
           "66.7 / 100.0 | 1 | 70.0 over 1, 2.0 h each |" in text
    assert "| 2 |" in text and "| the (p) runs |" in text and "threshold 0.9" in text


def _fake_chain(tmp_path, monkeypatch, finish: dict):
    """A work folder with the source dataset's raw folder and ``sh`` replaced: trainings finish (a checkpoint) when
    ``finish["training"]``, ``skcdf_pseudolabel`` writes an empty student dataset, predictions an empty folder.
    Returns work, budget, task, env, raw and the list of the commands run."""
    work, budget, task = tmp_path / "work", {"iterations": 100, "epochs": 2}, {**TASK, "labeled": "2"}
    env = C.nnunet_paths(work)
    raw = work / "nnUNet_raw" / "Dataset962_Convergence"
    raw.mkdir(parents=True)
    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, "a": 1}, "file_ending": ".nii.gz"}))
    monkeypatch.setattr(C, "STORE", tmp_path / "store")
    monkeypatch.setattr(C, "train_seconds", lambda fold_dir: 5.0)
    calls = []

    def fake_sh(cmd, env_, log):
        calls.append(cmd)
        if cmd[0] == "nnUNetv2_train" and finish["training"]:
            name = next(p.name for p in Path(env["nnUNet_raw"]).iterdir() if p.name.startswith(f"Dataset{cmd[1]}_"))
            fold_dir = Path(env["nnUNet_results"]) / name / f"{cmd[5]}__nnUNetPlans__3d_cpu" / f"fold_{cmd[3]}"
            import torch  # what store_run reads of a checkpoint: nnU-Net's epoch timestamps

            torch.save({"logging": {"epoch_start_timestamps": [0.0, 10.0], "epoch_end_timestamps": [8.0, 20.0]}},
                       fold_dir / "checkpoint_final.pth")
        if cmd[0] == "skcdf_pseudolabel":  # the student dataset as skcdf_pseudolabel writes it (no pool here)
            out = Path(env["nnUNet_raw"]) / f"Dataset{cmd[cmd.index('--out-dataset') + 1]}_" \
                f"{cmd[cmd.index('--out-name') + 1]}"
            out.mkdir(parents=True)
            (out / "pseudolabel_round.json").write_text(json.dumps({"kept": [], "cases": {}, "threshold": 0.9}))
            (Path(env["nnUNet_preprocessed"]) / out.name).mkdir(parents=True)
        if cmd[0] == "nnUNetv2_predict":
            Path(cmd[cmd.index("-o") + 1]).mkdir(parents=True)
        if cmd[0] == "skcdf_evaluate":
            (Path(cmd[cmd.index("-pred") + 1]) / "summary.json").write_text(json.dumps(
                {"mean": {"0": {"Dice": 1.0}, "1": {"Dice": 0.5}}, "metric_per_case": []}))
        return 1.0

    monkeypatch.setattr(C, "sh", fake_sh)
    return work, budget, task, env, raw, calls


def test_arm_w_is_taught_by_d_in_its_own_round_datasets_beside_p(tmp_path, monkeypatch):
    """(w), SKCDF as the teacher of a pseudo-label round: (d)'s folds 0-2 are round 1's teachers (trained first
    where missing), its round gets its own dataset (973, named for the teacher), claim and summary, so that (p)'s
    chain in the same work folder never takes it for its own round 1; its students are stock nnU-Net."""
    finish = {"training": False}
    work, budget, task, env, raw, calls = _fake_chain(tmp_path, monkeypatch, finish)
    w = C.ARMS["w"]
    assert (w.teacher, w.pseudo_rounds, w.trainer, w.skcdf, w.candidate) == ("d", 1, "nnUNetTrainer_conv", False, True)
    assert C.round_dataset("Dataset962_Convergence", 1, "d") == ("973", "Dataset973_ConvergencePseudoR1fromD")
    with pytest.raises(ValueError, match=r"no round datasets for the pseudo-labelling chain 'c'"):
        C.round_dataset("Dataset962_Convergence", 1, "c")
    assert C.pseudo_chain(w, "962", raw, env, tmp_path / "log", "1", work, budget, task).startswith(
        "round 1's teachers (Dataset962_Convergence/SKCDFTrainer_multiplyMask_conv__nnUNetPlans__3d_cpu, folds [0, 1, 2])")
    # (d) fold 0 finished and was stored (same training starts); folds 1 and 2 finish in the next call
    d_dir = C.model_folder(env, raw, C.ARMS["d"]) / "fold_0"
    (d_dir / "checkpoint_final.pth").touch()
    C.STORE.mkdir()
    C.store_file(C.ARMS["d"], 0, budget, task).write_text(json.dumps(
        {"train_commits": json.loads((d_dir / C.TRAIN_COMMITS).read_text())}))
    finish["training"] = True
    assert C.pseudo_chain(w, "962", raw, env, tmp_path / "log", "1", work, budget, task) is None
    trains = [(c[1], c[3], c[5]) for c in calls if c[0] == "nnUNetv2_train"]
    assert trains == [("962", str(f), C.ARMS["d"].trainer) for f in (0, 1, 2, 1, 2)]  # (d)'s runs teach, not (a)'s
    (round1,) = [c for c in calls if c[0] == "skcdf_pseudolabel"]
    assert round1[round1.index("-m") + 1] == str(C.model_folder(env, raw, C.ARMS["d"]))
    assert round1[round1.index("--out-dataset") + 1] == "973" and "--previous" not in round1
    assert round1[round1.index("--out-name") + 1] == "ConvergencePseudoR1fromD"
    assert "--student-unlabeled" not in round1  # no SKCDF student reads (w)'s round
    summary = json.loads(C.round_summary_file(work, 1, "d").read_text())
    assert summary["dataset"] == "Dataset973_ConvergencePseudoR1fromD"
    assert [t["stored_run"] for t in summary["teacher_runs"]] == [True, False, False]  # against (d)'s store
    assert not C.round_summary_file(work, 1).exists() and C.round_name(1, "d") == "round1_fromD"
    assert C.model_folder(env, raw, w) == Path(env["nnUNet_results"]) / "Dataset973_ConvergencePseudoR1fromD" / \
        "nnUNetTrainer_conv__nnUNetPlans__3d_cpu"
    calls.clear()  # (p) in the same work folder: (a) teaches its own round 1 in dataset 963
    assert C.pseudo_chain(C.ARMS["p"], "962", raw, env, tmp_path / "log", "1", work, budget, task) is None
    firsts = [c for c in calls if c[0] == "skcdf_pseudolabel"]
    assert firsts[0][firsts[0].index("-m") + 1] == str(C.model_folder(env, raw, C.ARMS["a"]))
    assert firsts[0][firsts[0].index("--out-dataset") + 1] == "963"
    assert [(arm.key, fold) for arm, fold in C.schedule(["w", "d"], 3, 1)] == [("d", 0), ("d", 1), ("d", 2),
                                                                               ("w", 0), ("w", 1), ("w", 2)]


def test_chains_taught_by_another_arm_get_their_own_rounds_table_and_cost_line():
    round1 = {"round": 1, "seconds": 600.0, "threshold": 0.9, "kept": 20, "pool": 56, "pseudo_dice": {"1": 0.8},
              "pseudo_dice_kept": {"1": 0.9}, "teachers": [{"trainer": "SKCDFTrainer_multiplyMask_conv"}] * 3,
              "per_site": {"C": {"kept": 5, "pool": 14, "pseudo_dice": {"1": 0.7}, "pseudo_dice_kept": None}},
              "teacher_runs": [{"fold": f, "train_s": 7200.0, "stored_run": f == 0} for f in range(3)]}
    text = R.pseudo_markdown({}, [], {"w": [round1]})
    assert text.startswith("(w) rounds (`skcdf_pseudolabel`, threshold 0.9")
    assert "| 1 | 3 x SKCDFTrainer_multiplyMask_conv | 20/56 | C: 5/14, 70.0 (-) | 80.0 / 90.0 | 10 | the (w) runs |" \
        in text
    runs = {"w": [{"train_s": 3600.0, "train_epoch_s_median": 15.0, "pseudo_rounds": [round1]}],
            "q": [{"train_s": 3600.0, "train_epoch_s_median": 15.0, "pseudo_rounds": [round1]}]}
    cost = R.cost_per_arm(runs, {"epochs": 240})
    assert "chain" not in cost["q"]  # (q) is a student of (p)'s round 1: that chain is (p)'s
    assert cost["w"]["chain"]["teacher"] == "d" and cost["w"]["chain"]["teachers_retrained"] == 2
    # (d) fold 1 stored after the round was made (its record says not stored): the store decides at report time
    starts = [{"commit": "abc1234", "threads": 2}]
    later = [dict(t, train_commits=starts) if t["fold"] == 1 else t for t in round1["teacher_runs"]]
    runs_later = {"w": [{"train_s": 3600.0, "pseudo_rounds": [dict(round1, teacher_runs=later)]}],
                  "d": [{"train_s": 7200.0, "train_commits": starts}]}
    assert R.cost_per_arm(runs_later, {"epochs": 240})["w"]["chain"]["teachers_retrained"] == 1
    text = R.cost_markdown(cost)
    assert "(w)'s chain, paid once for all its runs: skcdf_pseudolabel 0.17 h over the rounds; round 1's" in text
    assert "round 1's teachers are (d)'s runs (2 of them trained again in this work folder, 4.00 h: the stored (d) " \
        "runs' checkpoints were elsewhere)." in text


def test_arm_p_runs_after_every_a_run_and_before_the_ablations():
    order = [(arm.key, fold) for arm, fold in C.schedule(["p", "a", "c", "d", "e1"], 3, 1)]
    assert order == [("a", 0), ("c", 3), ("d", 0), ("a", 1), ("c", 4), ("d", 1), ("a", 2), ("c", 5), ("d", 2),
                     ("p", 0), ("p", 1), ("p", 2), ("e1", 0)]
    assert [(arm.key, fold) for arm, fold in C.schedule(["a", "p"], 1, 1)] == [("a", 0), ("p", 0)]
    assert C.ARMS["p"].folds(3) == (0, 1, 2) and "p" in C.CURVE_ARMS and not C.ARMS["p"].skcdf


def test_arm_p_trains_a_then_two_rounds_each_once_and_its_students_on_the_round_datasets(tmp_path, monkeypatch):
    """The chain of (p) without training: (a)'s folds 0-2 first (nothing else while one is missing), round 1 with
    them as teachers, its 3 students on dataset 963, round 2 with those students and --previous 963, then (p)'s
    own training on dataset 964; a second call repeats nothing."""
    finish = {"training": False}
    work, budget, task, env, raw, calls = _fake_chain(tmp_path, monkeypatch, finish)
    p = C.ARMS["p"]
    waiting = C.pseudo_chain(p, "962", raw, env, tmp_path / "log", "1", work, budget, task)
    assert waiting == ("round 1's teachers (Dataset962_Convergence/nnUNetTrainer_conv__nnUNetPlans__3d_cpu, folds "
                       "[0, 1, 2]) are not trained yet")
    assert [(c[0], c[1], c[3]) for c in calls] == [("nnUNetv2_train", "962", str(f)) for f in (0, 1, 2)]
    # (a) fold 0 finished and is the stored run: its store file has the same training starts
    a_dir = C.model_folder(env, raw, C.ARMS["a"]) / "fold_0"
    (a_dir / "checkpoint_final.pth").touch()
    C.STORE.mkdir()
    C.store_file(C.ARMS["a"], 0, budget, task).write_text(json.dumps(
        {"train_commits": json.loads((a_dir / C.TRAIN_COMMITS).read_text())}))

    calls.clear()
    finish["training"] = True
    assert C.pseudo_chain(p, "962", raw, env, tmp_path / "log", "1", work, budget, task) is None
    steps = [c[:2] if c[0] == "skcdf_pseudolabel" else (c[0], c[1], c[3]) for c in calls]
    assert steps == [("nnUNetv2_train", "962", "1"), ("nnUNetv2_train", "962", "2"),  # fold 0: trained already
                     ["skcdf_pseudolabel", "-d"],
                     ("nnUNetv2_train", "963", "0"), ("nnUNetv2_train", "963", "1"), ("nnUNetv2_train", "963", "2"),
                     ["skcdf_pseudolabel", "-d"]]
    round1, round2 = [c for c in calls if c[0] == "skcdf_pseudolabel"]
    a_folder = str(C.model_folder(env, raw, C.ARMS["a"]))
    assert round1[round1.index("-m") + 1] == a_folder and "--previous" not in round1
    assert round1[round1.index("-f") + 1: round1.index("-f") + 4] == ["0", "1", "2"]
    assert round1[round1.index("--student-folds") + 1] == "3"
    assert "--threshold" not in round1 and "--keep" not in round1  # skcdf_pseudolabel's default threshold
    assert "--student-unlabeled" in round1 and "--student-unlabeled" not in round2  # for (q)'s SKCDF student
    assert round1[round1.index("-device") + 1] == round2[round2.index("-device") + 1] == "cpu"  # as its trainings
    assert round2[round2.index("-m") + 1] == str(work / "nnUNet_results" / "Dataset963_ConvergencePseudoR1" /
                                                 "nnUNetTrainer_conv__nnUNetPlans__3d_cpu")
    assert round2[round2.index("--previous") + 1] == "963" and round2[round2.index("--out-dataset") + 1] == "964"
    first = json.loads(C.round_summary_file(work, 1).read_text())
    assert [t["stored_run"] for t in first["teacher_runs"]] == [True, False, False]
    assert first["seconds"] == 1.0 and first["pool"] == 0 and first["round"] == 1
    assert "stored_run" not in json.loads(C.round_summary_file(work, 2).read_text())["teacher_runs"][0]

    calls.clear()  # everything made once: a rerun goes straight to (p)'s own training
    assert C.pseudo_chain(p, "962", raw, env, tmp_path / "log", "1", work, budget, task) is None and calls == []
    assert C.model_folder(env, raw, p) == Path(env["nnUNet_results"]) / "Dataset964_ConvergencePseudoR2" / \
        "nnUNetTrainer_conv__nnUNetPlans__3d_cpu"
    C.train("962", p, 1, raw, env, tmp_path / "log")
    assert calls[-1][:4] == ["nnUNetv2_train", "964", "3d_cpu", "1"] and "nnUNetTrainer_conv" in calls[-1]

    # (p) fold 1 stored: both rounds in its store file, round 1's students predicted on the source's test images
    # with their own dataset's model (963), each under a claim released afterwards
    calls.clear()
    C.predict_final("962", p, 1, raw, work, env, tmp_path / "log")
    assert C.store_run(p, 1, raw, work, env, tmp_path / "log", budget, task, "1")
    stored = json.loads(C.store_file(p, 1, budget, task).read_text())
    assert [r["round"] for r in stored["pseudo_rounds"]] == [1, 2] and "students" not in stored["pseudo_rounds"][1]
    students = stored["pseudo_rounds"][0]["students"]
    assert [s["fold"] for s in students] == [0, 1, 2] and students[0]["test_dice"] == {"1": 0.5}
    assert stored["train_s"] == pytest.approx(18.0) and stored["final_summary"]["mean"]["1"]["Dice"] == 0.5
    predicts = [c for c in calls if c[0] == "nnUNetv2_predict"]
    assert [(c[c.index("-d") + 1], c[c.index("-f") + 1]) for c in predicts] == \
        [("964", "1"), ("963", "0"), ("963", "1"), ("963", "2")]
    assert {c[c.index("-i") + 1] for c in predicts} == {str(raw / "imagesTs")}
    assert not list((work / C.CLAIMS).glob("*.json"))
    final = C.model_folder(env, raw, p) / "fold_1" / "checkpoint_final.pth"
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(b"weights")
    C.predict_final("962", p, 1, raw, work, env, tmp_path / "log")
    predict = calls[-1]
    assert predict[predict.index("-d") + 1] == "964" and predict[predict.index("-i") + 1] == str(raw / "imagesTs")
    assert C.round_dataset("Dataset962_Convergence", 2) == ("964", "Dataset964_ConvergencePseudoR2")
    with pytest.raises(SystemExit, match="over nnU-Net's 999"):
        C.round_dataset("Dataset998_X", 2)
    # (q): SKCDF as the student of the same round 1 (made once, shared), on dataset 963, with its curve
    calls.clear()
    q = C.ARMS["q"]
    assert C.pseudo_chain(q, "962", raw, env, tmp_path / "log", "1", work, budget, task) is None and calls == []
    C.train("962", q, 0, raw, env, tmp_path / "log")
    assert calls[-1][:4] == ["nnUNetv2_train", "963", "3d_cpu", "0"] and "SKCDFTrainer_multiplyMask_conv" in calls[-1]
    assert q.skcdf and q.key in C.CURVE_ARMS and q.trainer == C.ARMS["d"].trainer
    assert C.store_file(q, 0, budget, task).name == "q_fold0_2lab_100it.json"


def test_room_versus_and_the_plateau_of_p():
    flat = R.plateau(_curve([50, 70, 80, 85, 86, 86.2, 86.5, 86.9]))
    short = R.plateau(_curve([5.4, 25.5, 53.1, 62.3, 71.4, 76.8, 83.3, 84.0]))
    assert R.plateau_arms(["a", "c", "d"]) == ("a", "c") and R.plateau_arms(["p"]) == ("a", "c", "p")
    assert R.regime({"a": flat, "c": flat, "p": flat}, arms=("a", "c", "p")) == (
        "**converged**: (a), (c) and (p) gain < 1.0 mean Dice point over the last quarter (table below); no longer "
        "budget stored for (a), (c) or (p) yet.")
    assert R.regime({"a": flat, "c": flat}, arms=("a", "c", "p")) == (
        "**converged**: (a) and (c) gain < 1.0 mean Dice point over the last quarter (table below); no longer budget "
        "stored for (a) or (c) yet. (p): no stored curve at this budget yet.")  # (p) pending: named, not hiding (a), (c)
    assert R.regime({"a": flat, "c": flat, "p": short}, arms=("a", "c", "p")).startswith(
        "**short budget, not converged**: (p) gains +7.2")
    arms = {"a": C.Arm("a", "A", "t", skcdf=False), "c": C.Arm("c", "C", "t", all_labelled=True, skcdf=False),
            "d": C.Arm("d", "D", "t"), "p": C.Arm("p", "P", "t", skcdf=False, pseudo_rounds=2)}
    aggregate = {"classes": [], "methods": [_method("A", 0.75, 3, 0.7, 0.6), _method("C", 0.90, 2, 0.8, 0.8),
                                            {**_method("D", 0.80, 3, 0.7, 0.6), "runs": [{}, {}, {}]},
                                            {**_method("P", 0.82, 3, 0.7, 0.6), "runs": [{}]}]}
    room = R.room(aggregate, arms)
    assert room["gap"] == pytest.approx(15.0) and room["met"] and room["se"] is None and not room["provisional"]
    assert R.room_line(room).endswith("a gap of 15.0 mean Dice points, at least 10: met.")
    # with the runs: their counts, the gap's standard error (sample sd), provisional while (c) misses a run
    runs = {"a": [_stored_run("a", f, 100, v, v) for f, v in ((0, 0.74), (1, 0.75), (2, 0.76))],
            "c": [_stored_run("c", f, 100, v, v, labeled="all") for f, v in ((3, 0.89), (4, 0.91))]}
    room = R.room(aggregate, arms, runs, {"c": 1})
    assert room["runs"] == {"a": 3, "c": 2} and room["provisional"]
    assert room["se"] == pytest.approx(np.sqrt(np.var([74, 75, 76], ddof=1) / 3 + np.var([89, 91], ddof=1) / 2))
    assert R.room_line(room) == (f"Room to show anything: (a) 75.0 -> (c) 90.0 (3 and 2 runs), a gap of 15.0 mean "
                                 f"Dice points, standard error {room['se']:.1f} (sample sd of each arm's runs), at "
                                 "least 10: met. **Provisional**: runs of (a) or (c) are still missing.")
    aggregate["methods"][1] = _method("C", 0.81, 2, 0.8, 0.8)
    assert not R.room(aggregate, arms)["met"] and "**not met**" in R.room_line(R.room(aggregate, arms))
    assert R.room_line(None).startswith("Room (a) -> (c): not known yet")
    v = R.versus(aggregate, arms)
    assert v["difference"] == pytest.approx(2.0) and v["runs"] == {"p": 1, "d": 3}
    assert R.versus_line(v).startswith("The practitioner's baseline against SKCDF: (p) 82.0 (1 run(s)), (d) 80.0 "
                                       "(3 run(s)): (p) beats (d) by 2.0 mean Dice points. (p)'s runs are the "
                                       "students of one chain")
    assert "(p) trails (d) by 2.0" in R.versus_line({**v, "difference": -2.0})
    assert R.versus({"classes": [], "methods": aggregate["methods"][:2]}, arms) is None and R.versus_line(None) == ""
    # (q), SKCDF as the student of round 1, against (p) and (d): a line each where both have a final result
    arms["q"] = C.Arm("q", "Q", "t", pseudo_rounds=1)
    assert R.versus_q_lines({k: R.versus(aggregate, arms, "q", k) for k in ("p", "d")}) == ""
    aggregate["methods"].append({**_method("Q", 0.835, 3, 0.7, 0.6), "runs": [{}]})
    assert R.versus_q_lines({k: R.versus(aggregate, arms, "q", k) for k in ("p", "d")}) == (
        " (q) 83.5 (1 run(s)) against the recipe's 2 rounds (p) 82.0 (1 run(s)): +1.5 mean Dice points."
        " (q) 83.5 (1 run(s)) against SKCDF alone (d) 80.0 (3 run(s)): +3.5 mean Dice points.")
    assert R.versus_q_lines(None) == ""


def test_candidates_table_lists_every_candidate_with_a_result_beside_a_p_d():
    aggregate = {"classes": [{"key": "1", "column": "LAG"}, {"key": "2", "column": "Li"}],
                 "methods": [_method("A", 0.75, 3.0, 0.70, 0.50), _method("P", 0.80, 2.8, 0.72, 0.55),
                             _method("D", 0.78, 2.5, 0.74, 0.52), _method("T", 0.815, 2.4, 0.76, 0.60, missed=3, runs=2),
                             _method("R", 0.77, 2.9, 0.71, 0.51)]}
    arms = {"a": C.Arm("a", "A", "t", skcdf=False), "d": C.Arm("d", "D", "t"), "v": C.Arm("v", "V", "t"),
            "p": C.Arm("p", "P", "t", skcdf=False, pseudo_rounds=2), "r": C.Arm("r", "R", "t", candidate=True),
            "t": C.Arm("t", "T", "t", candidate=True), "u": C.Arm("u", "U", "t", candidate=True)}
    runs = {"a": [{"commit": "a1"}, {"commit": "a2"}], "p": [{"commit": "p1"}], "d": [{"commit": "d1"}],
            "t": [{"commit": "t1"}, {"commit": "t1"}], "r": [{"commit": "r1"}]}
    per_site = {"sites": ["A", "C"], "arms": {"t": {"mean": {"A": [80.0, 84.0], "C": [70.0]}},
                                              "d": {"mean": {"A": [81.0], "C": []}}}}
    t = R.candidate_table(aggregate, arms, runs, per_site, ["LAG"])
    assert list(t["rows"]) == ["a", "p", "d", "r", "t"]  # references first; (u), (v) have no final result
    x = t["rows"]["t"]
    assert x["runs"] == 2 and x["commits"] == ["t1"] and x["candidate"]
    assert x["mean"] == pytest.approx(81.5) and x["small"] == pytest.approx(60.0)
    assert x["vs"] == {"d": pytest.approx(3.5), "p": pytest.approx(1.5)}
    assert x["sites"] == {"A": pytest.approx(82.0), "C": pytest.approx(70.0)} and x["asd"] == 2.4
    assert t["rows"]["d"]["sites"] == {"A": pytest.approx(81.0), "C": None}  # a site without runs: no number
    assert t["rows"]["r"]["sites"] == {"A": None, "C": None}
    text = R.candidate_markdown(t)
    assert x["missed"] == pytest.approx(1.5)  # 3 missed organ-cases over its 2 runs
    assert ("| arm | runs | mean Dice | vs (d) | vs (p) | 4 smallest | site A | site C | ASD | NSD | missed | commits |"
            in text)
    assert "|---|---|---|---|---|---|---|---|---|---|---|---|" in text
    assert "| (t) T | 2 | 81.5 | +3.5 | +1.5 | 60.0 | 82.0 | 70.0 | 2.40 | 76.0 | 1.5 | t1 |" in text
    assert "| (d) D | 1 | 78.0 | - | -2.0 | 52.0 | 81.0 | - | 2.50 | 74.0 | 0.0 | d1 |" in text  # none against itself
    assert "| (a) A | 2 | 75.0 | -3.0 | -5.0 | 50.0 | - | - | 3.00 | 70.0 | 0.0 | a1, a2 |" in text
    # no candidate with a final result: no table; the original phantom (no sites): no site columns
    assert R.candidate_table(aggregate, {k: arms[k] for k in "adp"}, runs, per_site, ["LAG"]) is None
    assert R.candidate_markdown(None) == ""
    assert "| 4 smallest | ASD | NSD | missed | commits |" in R.candidate_markdown(
        R.candidate_table(aggregate, arms, runs, None, ["LAG"]))
    # the recipe without a filter (x) where it ran: a reference row and a "vs (x)" column
    aggregate["methods"].append(_method("X", 0.82, 2.7, 0.73, 0.56))
    arms["x"], runs["x"] = C.Arm("x", "X", "t", skcdf=False, pseudo_rounds=2, keep=1.0), [{"commit": "x1"}]
    t = R.candidate_table(aggregate, arms, runs, per_site, ["LAG"])
    assert list(t["rows"]) == ["a", "p", "x", "d", "r", "t"] and t["rows"]["t"]["vs"]["x"] == pytest.approx(-0.5)
    text = R.candidate_markdown(t)
    assert "| mean Dice | vs (d) | vs (p) | vs (x) | 4 smallest | site A | site C | ASD |" in text
    assert "| (t) T | 2 | 81.5 | +3.5 | +1.5 | -0.5 | 60.0 | 82.0 | 70.0 | 2.40 |" in text
    assert "|---|---|---|---|---|---|---|---|---|---|---|---|---|" in text
    # the benchmark's own candidates: issue 39's arms, none of the references
    assert [k for k, a in C.ARMS.items() if a.candidate] == ["q", "r", "s", "t", "u", "w"]
    assert R.CANDIDATE_REFERENCES == ("a", "p", "x", "v", "d") and not C.ARMS["v"].candidate


def test_cost_per_arm_in_hours_with_the_chain_of_p():
    budget = {"epochs": 160}
    runs = {"a": [{"train_s": 3600.0, "train_epoch_s_median": 20.0}, {"train_s": 5400.0, "train_epoch_s_median": 30.0}],
            "c": [{"train_epoch_s_median": 18.0}],  # stored before train_s was recorded
            "p": [{"train_s": 3600.0, "train_epoch_s_median": 20.0, "pseudo_rounds": [
                {"round": 1, "seconds": 900.0, "teacher_runs": [{"fold": 0, "train_s": 3600.0, "stored_run": False},
                                                                {"fold": 1, "train_s": 3600.0, "stored_run": True}],
                 "students": [{"train_s": 3600.0}] * 3},
                {"round": 2, "seconds": 900.0}]}]}
    cost = R.cost_per_arm(runs, budget)
    assert cost["a"] == {"runs": 2, "hours_per_run": pytest.approx(1.25), "estimated": False, "threads": "?",
                         "epoch_s_median": [20.0, 30.0]}
    assert cost["c"]["hours_per_run"] == pytest.approx(0.8) and cost["c"]["estimated"]
    assert cost["p"]["chain"] == {"teacher": "a", "pseudolabel_h": pytest.approx(0.5), "students_h": pytest.approx(3.0),
                                  "teachers_retrained": 1, "teachers_retrained_h": pytest.approx(1.0)}
    text = R.cost_markdown(cost)
    assert "| (c) | 1 | 0.80 (estimated) | 18.0 | ? |" in text and "| (a) | 2 | 1.25 | 20.0, 30.0 | ? |" in text
    assert "(1 of them trained again in this work folder, 1.00 h" in text
    # the threads of every training start: recorded ones by value (None: every core), older starts as "?"
    assert R.threads_of([{"train_commits": [{"threads": 1}, {"threads": 2}]}, {"train_commits": [{"threads": 1}]},
                         {"train_commits": None}]) == "1, 2, ?"
    assert R.threads_of([{"train_commits": [{"threads": None}, {"threads": 12}, {"threads": 2}]}]) == "2, 12, all"


def test_the_multisite_section_names_its_task_and_shows_sites_rounds_room_and_cost():
    task = MS
    assert R.task_line(task).startswith("Task: multi-site phantom (`skcdf_make_phantom --sites A B C D`")
    assert "4 validation and 4 labelled cases, all of site A" in R.task_line(task)
    assert "the other 32 of every site with hidden labels" in R.task_line(task)
    assert "(c) trains on all 36 non-validation training cases" in R.task_line(task)
    budget = {"iterations": 8000, "epochs": 160, "snapshot_epochs": [20, 40, 60, 80, 100, 120, 140, 160]}
    r = {"task": task, "budget": budget, "status": "partial", "command": "python x", "date": "d",
         "commit": "c", "machine": "m", "stored_runs": {}, "missing_runs": {"p": 3}, "train_epoch_s_median": {},
         "curves": {}, "plateau": {}, "other_budgets": [], "goals": {}, "final_table": None, "islands_per_run": {},
         "gap_per_organ": None, "plateau_arms": ["a", "c", "p"], "room": {"a": 75.0, "c": 90.0, "gap": 15.0,
                                                                           "met": True},
         "versus": None, "per_site": None, "pseudo_per_site": {}, "pseudo_rounds": [],
         "cost": {"a": {"runs": 1, "hours_per_run": 0.75, "estimated": False}}}
    text = R.markdown(r, {})
    assert text.startswith("## Accuracy against nnU-Net, 4 labelled cases of site A, multi-site phantom (A, B, C, D), "
                           "8000 iterations")
    assert "Regime: plateau not known yet ((a), (c) has no stored curve at this budget). (p): no stored curve at " \
           "this budget yet." in text
    assert "a gap of 15.0 mean Dice points, at least 10: met." in text
    assert "adds < 1.0 mean Dice point to (a), (c) and (p)." in text and "| (a) | 1 | 0.75 |" in text
    assert "curve points at iterations 1000, 2000, 3000, 4000, 5000, 6000, 7000, 8000. Test-set Dice" in text


def _sleeper():
    """A live process whose command line names the benchmark (as a claim holder's does)."""
    import subprocess
    import time

    process = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "convergence.py"])
    cmdline = Path(f"/proc/{process.pid}/cmdline")
    for _ in range(200):  # until it runs its own command (between fork and exec it shows pytest's, or nothing)
        if not cmdline.exists() or b"time.sleep(60)" in cmdline.read_bytes():
            break
        time.sleep(0.05)
    return process


def test_a_claim_is_exclusive_released_after_its_block_and_taken_over_when_its_process_is_gone(tmp_path):
    work = tmp_path / "work"
    with C.claimed(work, "a_fold1") as holder:
        assert holder is None
        record = json.loads((work / C.CLAIMS / "a_fold1.json").read_text())
        assert record["pid"] == os.getpid() and "since" in record
        with C.claimed(work, "a_fold1") as nested:  # this process's own claim: no self-block
            assert nested is None
        assert (work / C.CLAIMS / "a_fold1.json").exists()  # the nested block does not release the outer claim
    assert not (work / C.CLAIMS / "a_fold1.json").exists()

    other = _sleeper()
    try:
        (work / C.CLAIMS / "c_fold3.json").write_text(json.dumps(
            {"pid": other.pid, "boot_id": C._boot_id(), "command": "convergence.py --arms c", "since": "now"}))
        with C.claimed(work, "c_fold3") as holder:
            assert holder["pid"] == other.pid
            assert C.held_by(holder) == f"held by process {other.pid} (convergence.py --arms c, since now)"
        assert json.loads((work / C.CLAIMS / "c_fold3.json").read_text())["pid"] == other.pid  # left as it was
        # the same pid after a restart (another boot) is not the holder
        (work / C.CLAIMS / "c_fold3.json").write_text(json.dumps({"pid": other.pid, "boot_id": "another boot"}))
        with C.claimed(work, "c_fold3") as holder:
            assert holder is None
            assert json.loads((work / C.CLAIMS / "c_fold3.json").read_text())["pid"] == os.getpid()
    finally:
        other.kill()
        other.wait()
    # a holder that died (killed mid-training): stale, taken over
    (work / C.CLAIMS / "d_fold0.json").write_text(json.dumps({"pid": other.pid, "boot_id": C._boot_id()}))
    with C.claimed(work, "d_fold0") as holder:
        assert holder is None
    assert sorted(p.name for p in (work / C.CLAIMS).iterdir()) == []


def test_a_process_beside_another_trains_the_next_free_teacher_and_waits_for_the_claimed_one(tmp_path, monkeypatch):
    """Two (p) processes side by side: what one trains the other skips (naming the holder), and a claimed round is
    not made twice."""
    work, budget, task = tmp_path / "work", {"iterations": 100, "epochs": 2}, {**TASK, "labeled": "2"}
    env = C.nnunet_paths(work)
    raw = work / "nnUNet_raw" / "Dataset962_Convergence"
    raw.mkdir(parents=True)
    trained = []

    def fake_sh(cmd, env_, log):
        assert cmd[0] == "nnUNetv2_train", cmd
        trained.append(cmd[3])
        fold_dir = C.model_folder(env, raw, C.ARMS["a"]) / f"fold_{cmd[3]}"
        (fold_dir / "checkpoint_final.pth").touch()
        return 1.0

    monkeypatch.setattr(C, "sh", fake_sh)
    other = _sleeper()
    try:
        (work / C.CLAIMS).mkdir(parents=True)
        (work / C.CLAIMS / "a_fold1.json").write_text(json.dumps(
            {"pid": other.pid, "boot_id": C._boot_id(), "command": "convergence.py --arms a", "since": "then"}))
        waiting = C.pseudo_chain(C.ARMS["p"], "962", raw, env, tmp_path / "log", "1", work, budget, task)
        assert trained == ["0", "2"]
        assert waiting == ("round 1's teachers (Dataset962_Convergence/nnUNetTrainer_conv__nnUNetPlans__3d_cpu, "
                           f"folds [1]) are not trained yet; fold 1 held by process {other.pid} (convergence.py "
                           "--arms a, since then)")
        (C.model_folder(env, raw, C.ARMS["a"]) / "fold_1").mkdir()  # the other process finished it
        (C.model_folder(env, raw, C.ARMS["a"]) / "fold_1" / "checkpoint_final.pth").touch()
        (work / C.CLAIMS / "a_fold1.json").unlink()
        (work / C.CLAIMS / "round1.json").write_text(json.dumps(
            {"pid": other.pid, "boot_id": C._boot_id(), "command": "convergence.py --arms p", "since": "then"}))
        waiting = C.pseudo_chain(C.ARMS["p"], "962", raw, env, tmp_path / "log", "1", work, budget, task)
        assert trained == ["0", "2"]  # nothing trained again
        assert waiting == f"round 1 is being made, held by process {other.pid} (convergence.py --arms p, since then)"
    finally:
        other.kill()
        other.wait()


def test_final_predictions_and_curve_points_never_outlive_their_checkpoint(tmp_path, monkeypatch):
    import convergence_common as CC

    calls = []

    def fake_predict(cmd, env, log):
        calls.append(cmd)
        out = Path(cmd[cmd.index("-o") + 1])
        out.mkdir(parents=True, exist_ok=True)
        (out / "case.nii.gz").write_text("prediction")

    monkeypatch.setattr(C, "sh", fake_predict)
    raw = tmp_path / "nnUNet_raw" / "Dataset962_Convergence"
    env = {"nnUNet_results": str(tmp_path / "nnUNet_results")}
    a = C.ARMS["a"]
    final = C.model_folder(env, raw, a) / "fold_0" / "checkpoint_final.pth"
    final.parent.mkdir(parents=True)
    final.write_bytes(b"first training")
    pred = C.predict_final("962", a, 0, raw, tmp_path, env, tmp_path / "log")
    assert len(calls) == 1 and (pred / "done").read_text().strip() == CC.checkpoint_identity(final)
    (pred / "summary.json").write_text("{}")  # skcdf_evaluate's output beside the predictions
    C.predict_final("962", a, 0, raw, tmp_path, env, tmp_path / "log")
    assert len(calls) == 1 and (pred / "summary.json").exists()  # same checkpoint: nothing made again
    final.write_bytes(b"the fold trained again")  # another size and time: the old outputs must go
    C.predict_final("962", a, 0, raw, tmp_path, env, tmp_path / "log")
    assert len(calls) == 2 and not (pred / "summary.json").exists()
    assert (pred / "done").read_text().strip() == CC.checkpoint_identity(final)
    (pred / "done").write_text("")  # a marker of an older version (no identity): predicted again
    C.predict_final("962", a, 0, raw, tmp_path, env, tmp_path / "log")
    assert len(calls) == 3
    # curve points: cached for the checkpoint they were evaluated from; older points without one are kept
    identity = CC.checkpoint_identity(final)
    assert CC.cached_point({"60": {"checkpoint": identity}}, 60, identity)
    assert not CC.cached_point({"60": {"checkpoint": "1:2"}}, 60, identity)
    assert CC.cached_point({"60": {"test_dice": {}}}, 60, identity) and not CC.cached_point({}, 60, identity)


def test_a_store_file_of_another_task_is_never_replaced_and_a_run_stored_meanwhile_stays(tmp_path, monkeypatch,
                                                                                         capsys):
    monkeypatch.setattr(C, "STORE", tmp_path / "store")
    (tmp_path / "store").mkdir()
    budget = {"iterations": 4000, "epochs": 80, "snapshot_epochs": [80]}
    c = C.ARMS["c"]
    target = C.store_file(c, 3, budget, TASK)
    other_task = {**C.arm_task(c, TASK), "num_test": 99}  # same file name, another phantom
    target.write_text(json.dumps({"task": other_task, "budget": budget}))
    with pytest.raises(SystemExit, match="holds a run of another task or budget"):
        C.store_run(c, 3, tmp_path, tmp_path, {}, tmp_path / "log", budget, TASK, "1")
    assert json.loads(target.read_text())["task"] == other_task  # untouched
    same = {"task": C.arm_task(c, TASK), "budget": budget, "prediction_folder": "/elsewhere/predictions/c_fold3"}
    target.write_text(json.dumps(same))
    assert C.store_run(c, 3, tmp_path, tmp_path, {}, tmp_path / "log", budget, TASK, "1") is False
    assert json.loads(target.read_text()) == same
    assert "was stored meanwhile (from /elsewhere/predictions/c_fold3)" in capsys.readouterr().out


def test_chains_of_counts_the_chains_behind_the_stored_runs_of_p():
    round1 = {"round": 1, "kept_ids": ["x", "y"], "teachers": [{"fold": 0}]}
    same = [{"pseudo_rounds": [round1]}, {"pseudo_rounds": [dict(round1)]}]
    assert R.chains_of({"p": same}) == 1 and R.chains_of({}) == 0
    other = same + [{"pseudo_rounds": [dict(round1, kept_ids=["x"])]}]
    assert R.chains_of({"p": other}) == 2
    text = R.pseudo_markdown({}, [dict(round1, threshold=0.9, kept=2, pool=4, per_site={}, pseudo_dice=None,
                                       pseudo_dice_kept=None)], {}, {"p": 2})
    assert "**(p)'s stored runs come from 2 different chains** (work folders)" in text


def test_the_report_reads_stored_runs_of_a_c_d_and_p_and_keeps_its_plan(tmp_path, monkeypatch):
    """``report()`` itself, on the stored runs of the 2-labelled four-site task ((a) fold 0, (c) folds 3-5: the
    repository's files) and runs made from them the way the benchmark stores (d) and (p) (a (p) run carries both
    rounds, round 1's students): no field only (p) has, or (p) lacks, breaks it; the section shows the rounds, the
    practitioner's line and the chain's cost; the lane's ``--arms d --runs 1`` keeps the plan."""
    import argparse
    import copy

    store = BENCH / "results" / "convergence"
    a0 = json.loads((store / "a_fold0_2lab-siteA-ms_12000it.json").read_text())
    runs = {"a": [a0], "c": [json.loads((store / f"c_fold{f}_alllab-siteA-ms_12000it.json").read_text())
                             for f in (3, 4, 5)]}
    d0 = {**copy.deepcopy(a0), "arm": "d", "name": C.ARMS["d"].name, "trainer": C.ARMS["d"].trainer}
    organs = {k: 0.8 for k in a0["curve"][max(a0["curve"], key=int)]["test_dice"]}
    site_dice = {"pseudo_dice": organs, "pseudo_dice_kept": {k: 0.9 for k in organs}}
    round1 = {"round": 1, "dataset": "Dataset963_ConvergencePseudoR1", "command": "skcdf_pseudolabel -d 962",
              "seconds": 1800.0, "seconds_prediction": 1500.0, "threshold": 0.9, "keep": None, "previous_round": None,
              "teachers": [{"trainer": "nnUNetTrainer_conv", "fold": str(f)} for f in range(3)], "pool": 58,
              "kept": 20, "kept_ids": ["phantom_tr_0005"], "scores": {"phantom_tr_0005": 0.95},
              "organ_mean_agreement": {"1": 0.9}, "hidden": 34, **site_dice,
              "per_site": {s: {"pool": 14, "kept": 5, "hidden": 8, "hidden_kept": 3, **site_dice} for s in "ABCD"},
              "teacher_runs": [{"fold": f, "train_commits": None, "train_s": 6000.0, "stored_run": f == 0}
                               for f in range(3)],
              "students": [{"fold": f, "train_s": 6500.0, "test_dice": organs,
                            "test_dice_per_site": {s: organs for s in "ABCD"}} for f in range(3)]}
    round2 = {**{k: v for k, v in round1.items() if k not in ("teacher_runs", "students")}, "round": 2,
              "dataset": "Dataset964_ConvergencePseudoR2", "previous_round": "Dataset963_ConvergencePseudoR1",
              "teacher_runs": [{"fold": f, "train_commits": None, "train_s": 6500.0} for f in range(3)]}
    p_runs = [{**copy.deepcopy(a0), "arm": "p", "name": C.ARMS["p"].name, "fold": f, "pseudo_rounds": [round1, round2]}
              for f in (0, 1)]
    runs.update(d=[d0], p=p_runs)
    for run in (r for rs in runs.values() for r in rs):  # predictions of another machine's work folder: not here
        run["prediction_folder"] = str(tmp_path / "gone" / f"{run['arm']}_fold{run['fold']}")

    raw = tmp_path / "Dataset962_Convergence"
    raw.mkdir()
    from nnunetv2_skcdf.dataset_conversion.labels import SYNAPSE_CLASSES

    (raw / "dataset.json").write_text(json.dumps({"labels": {"background": 0, **{n: i for i, n, _ in SYNAPSE_CLASSES}},
                                                  "file_ending": ".nii.gz"}))
    (raw / "phantom_cases.json").write_text(json.dumps({"cases": _phantom_cases()}))
    results = tmp_path / "results"
    results.mkdir()
    sections = {}
    monkeypatch.setattr(R, "RESULTS", results)
    monkeypatch.setattr(R, "write_section", lambda name, body: sections.__setitem__(name, body))
    monkeypatch.setattr(R, "commit", lambda: "abc1234")
    budget, task = a0["budget"], a0["task"]

    def report(arms, n, stages):
        args = argparse.Namespace(arms=arms, runs=n, ablation_runs=1, stages=stages)
        R.report(args, budget, task, runs, {}, raw, tmp_path, 1.0)
        return json.loads((results / "convergence_2lab-siteA-ms_12000it.json").read_text())

    out = report(["a", "c", "d", "p"], 3, ["report"])
    assert out["status"] == "partial" and out["planned_runs"] == {"a": 3, "c": 3, "d": 3, "p": 3}
    assert out["missing_runs"] == {"a": 2, "d": 2, "p": 1} and out["plateau_arms"] == ["a", "c", "p"]
    assert [x["round"] for x in out["pseudo_rounds"]] == [1, 2] and out["chains_per_arm"] == {"p": 1}
    assert out["versus"]["runs"] == {"p": 2, "d": 1} and out["versus"]["difference"] == pytest.approx(0.0)
    assert out["cost"]["p"]["chain"]["students_h"] == pytest.approx(3 * 6500 / 3600)
    text = sections["convergence_2lab-siteA-ms_12000it"]
    assert "(p) rounds (`skcdf_pseudolabel`, threshold 0.9" in text and "| 2 | 3 x nnUNetTrainer_conv | 20/58 |" in text
    assert "The practitioner's baseline against SKCDF: (p)" in text and "students of one chain" in text
    assert "site A" in text and "status: **partial**" in text
    # the lane trains (d) alone afterwards: the section keeps the plan, (p) stays under the plateau criterion
    out = report(["d"], 1, ["train", "curves", "final", "report"])
    assert out["planned_runs"] == {"a": 3, "c": 3, "d": 3, "p": 3} and out["status"] == "partial"
    assert out["missing_runs"] == {"a": 2, "d": 2, "p": 1} and out["plateau_arms"] == ["a", "c", "p"]


def test_issue_39s_first_candidate_follows_the_larger_shortfall_below_the_bound():
    """Findings item 36 made mechanical: (d)'s pseudo labels against (c)'s test Dice, per site and per organ group;
    (r) when the other sites trail the labelled site by more than the small organs trail the others, else (u)."""
    titles = {"1": "Sp", "2": "Li", "3": "Ga", "4": "Es"}  # Ga, Es: the "small" organs here
    small = ["Ga", "Es"]
    c_runs = [{"final_summary": {"mean": {k: {"Dice": v} for k, v in
                                          {"1": 0.9, "2": 0.9, "3": 0.8, "4": 0.8}.items()}}}]
    per_site = {"arms": {"c": {"mean": {"A": [90.0], "B": [86.0], "C": [84.0]}}}}

    def d_run(site_dice, organ_dice):
        return {"fold": 0, "curve": {"200": {"test_dice": {}},
                                     "240": {"pseudo_dice_per_site": site_dice, "pseudo_dice": organ_dice}}}

    # sites: shortfall A 90-85 = 5, B 86-70 = 16, C 84-68 = 16 -> site gap 11; organs: small 80-70 = 10, rest 90-85 =
    # 5 -> organ gap 5: (r)
    sites = {"A": {"1": 0.85}, "B": {"1": 0.70}, "C": {"1": 0.68}}
    organs = {"1": 0.85, "2": 0.85, "3": 0.70, "4": 0.70}
    x = R.first_candidate({"d": [d_run(sites, organs)], "c": c_runs}, per_site, titles, small, "A")
    assert x["shortfall_per_site"] == pytest.approx({"A": 5.0, "B": 16.0, "C": 16.0})
    assert (x["site_gap"], x["organ_gap"], x["choice"]) == (pytest.approx(11.0), pytest.approx(5.0), "r")
    line = R.first_candidate_line(x, "A")
    assert "site gap (other sites - site A) 11.0, organ gap (4 smallest - other organs) 5.0" in line
    assert "**appearance transfer (r)" in line
    # small organs far below the bound, sites close: (u)
    x = R.first_candidate({"d": [d_run({"A": {"1": 0.85}, "B": {"1": 0.80}, "C": {"1": 0.78}},
                                       {"1": 0.88, "2": 0.88, "3": 0.50, "4": 0.55})], "c": c_runs},
                          per_site, titles, small, "A")
    assert x["choice"] == "u" and x["organ_gap"] == pytest.approx(27.5 - 2.0)
    assert "**the confidence filter (u)" in R.first_candidate_line(x, "A")
    # not yet decidable: no (d) run with per-site diagnostics, no (c), a one-site task
    assert R.first_candidate({"d": [{"fold": 0, "curve": {"240": {"test_dice": {}}}}], "c": c_runs}, per_site,
                             titles, small, "A") is None
    assert R.first_candidate({"d": [d_run(sites, organs)]}, None, titles, small, "A") is None
    assert R.first_candidate({"d": [d_run(sites, organs)], "c": c_runs}, per_site, titles, small, None) is None
    assert R.first_candidate_line(None, "A") == ""
    # a NaN (an organ or site without a value) decides nothing: no choice rather than (u) by default
    assert R.first_candidate({"d": [d_run(sites, {**organs, "3": float("nan"), "4": float("nan")})], "c": c_runs},
                             per_site, titles, small, "A") is None


def test_arm_x_keeps_every_case_in_a_chain_of_its_own_taught_by_a(tmp_path, monkeypatch):
    """(x), the recipe without a filter (findings item 37): round 1 taught by (a)'s runs like (p), but every case kept
    (``--keep 1.0``) in both rounds, in datasets, claims and summaries of its own (983, 984, ``Keep100``), so that
    it never takes (p)'s filtered rounds; no unlabelled images written (no SKCDF student reads them)."""
    from convergence_common import chain_arms

    finish = {"training": True}
    work, budget, task, env, raw, calls = _fake_chain(tmp_path, monkeypatch, finish)
    x = C.ARMS["x"]
    assert (x.teacher, x.keep, x.pseudo_rounds, x.skcdf) == ("a", 1.0, 2, False) and "x" in C.CURVE_ARMS
    assert C.chain_key(x) == "aKeep100" and C.chain_key(C.ARMS["p"]) == C.chain_key(C.ARMS["q"]) == "a"
    assert C.chain_key(C.ARMS["w"]) == "d" and set(chain_arms()) == {"p", "w", "x"}
    assert C.round_dataset("Dataset962_Convergence", 2, "aKeep100") == ("984", "Dataset984_ConvergencePseudoR2Keep100")
    assert C.round_name(1, "aKeep100") == "round1_Keep100"
    assert C.pseudo_chain(x, "962", raw, env, tmp_path / "log", "1", work, budget, task) is None
    round1, round2 = [c for c in calls if c[0] == "skcdf_pseudolabel"]
    assert round1[round1.index("-m") + 1] == str(C.model_folder(env, raw, C.ARMS["a"]))
    for r, cmd in ((1, round1), (2, round2)):
        assert cmd[cmd.index("--keep") + 1] == "1.0" and "--student-unlabeled" not in cmd
        assert cmd[cmd.index("--out-dataset") + 1] == str(982 + r)
    assert round2[round2.index("--previous") + 1] == "983"
    assert round2[round2.index("-m") + 1] == str(work / "nnUNet_results" / "Dataset983_ConvergencePseudoR1Keep100" /
                                                 "nnUNetTrainer_conv__nnUNetPlans__3d_cpu")
    assert C.round_summary_file(work, 2, "aKeep100").is_file() and not C.round_summary_file(work, 1).exists()
    assert C.model_folder(env, raw, x).parent.name == "Dataset984_ConvergencePseudoR2Keep100"
    students = [(c[1], c[3]) for c in calls if c[0] == "nnUNetv2_train" and c[1] == "983"]
    assert students == [("983", "0"), ("983", "1"), ("983", "2")]  # round 1's students teach round 2
    text = R.rounds_markdown("x", [{"round": 1, "teachers": [], "kept": 3, "pool": 3, "per_site": {},
                                    "pseudo_dice": None, "pseudo_dice_kept": None, "threshold": None, "keep": 1.0}])
    assert text.startswith("(x) rounds (`skcdf_pseudolabel`, every case kept (`--keep 1.0`): no filter).")
    assert R.plateau_arms({"a": 3, "c": 3, "p": 3, "x": 3}) == ("a", "c", "p", "x")
