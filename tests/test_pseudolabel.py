"""skcdf_pseudolabel: agreement scores on constructed segmentations, every refusal, and (slow) a real round."""
from __future__ import annotations

import hashlib
import inspect
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import env_for, run_cli
from nnunetv2_skcdf.pseudo_labelling.agreement import (
    case_score,
    dice_per_label,
    member_agreement,
    select_kept,
)
from nnunetv2_skcdf.pseudo_labelling.pseudo_label_round import (RECORD, Teacher, _mirror_variants, _parser,
                                                             check_single_teacher, run_round)
from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError


# ------------------------------------------------------------------------------------------ agreement scores
def test_dice_and_member_agreement_on_constructed_segmentations():
    a = np.zeros((4, 4, 4), np.uint8)
    a[:2] = 1  # 32 voxels of label 1
    b = a.copy()
    b[1] = 0  # 16 of them
    c = a.copy()
    c[3, 0, 0] = 2  # one voxel of label 2 in c only
    assert dice_per_label(a, b, [1, 2]) == {1: pytest.approx(2 * 16 / 48)}  # label 2 absent from both: left out
    agree = member_agreement([a, b, c], [1, 2])
    # label 1: pairs (a,b)=2/3, (a,c)=1, (b,c)=2/3 ; label 2 only in c: (a,c)=0, (b,c)=0, (a,b) does not count
    assert agree[1] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert agree[2] == pytest.approx(0.0)
    assert member_agreement([a], [1, 2]) == {1: 1.0}


def test_case_score_and_selection():
    assert case_score(0.9, 0.7) == 0.7 and case_score(0.8, None) == 0.8 and case_score(None, None) == 0.0
    scores = {"c1": 0.95, "c2": 0.80, "c3": 0.91, "c4": 0.91}
    assert select_kept(scores, threshold=0.9) == ["c1", "c3", "c4"]
    assert select_kept(scores, keep=0.5) == ["c1", "c3"]  # ties broken by id
    assert select_kept(scores, keep=1.0) == sorted(scores)


# ------------------------------------------------------------------------------------------ refusals
SOURCE = "Dataset961_PLSource"


@pytest.fixture
def fake_setup(tmp_path, monkeypatch):
    """A tiny raw dataset with a split and plans, and model folders whose files say how they were trained
    (the refusals happen before any checkpoint is loaded)."""
    from nnunetv2_skcdf.dataset_conversion.phantom import make_phantom_dataset

    env = env_for(tmp_path)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    raw = Path(make_phantom_dataset(env["nnUNet_raw"], 961, "PLSource", num_train=5, num_test=0, num_unlabeled=2,
                                    shape=(16, 32, 32), spacing=(10.0, 7.2, 7.2), progress=False))
    pre = Path(env["nnUNet_preprocessed"]) / SOURCE
    pre.mkdir(parents=True)
    dj = json.loads((raw / "dataset.json").read_text())
    plans = {"dataset_name": SOURCE, "plans_name": "nnUNetPlans",
             "configurations": {"3d_fullres": {"spacing": [10.0, 7.2, 7.2], "patch_size": [16, 32, 32]}}}
    (pre / "nnUNetPlans.json").write_text(json.dumps(plans))
    (pre / "dataset.json").write_text(json.dumps(dj))
    fold = {"train": ["phantom_tr_0000", "phantom_tr_0001"], "val": ["phantom_tr_0002"],
            "unlabeled": ["phantom_tr_0003", "phantom_tr_0004", "phantom_un_0000", "phantom_un_0001"]}
    other = {**fold, "train": ["phantom_tr_0000", "phantom_tr_0003"],
             "unlabeled": ["phantom_tr_0001", "phantom_tr_0004", "phantom_un_0000", "phantom_un_0001"]}
    (pre / "splits_final.json").write_text(json.dumps([fold, fold, other]))

    def model(name="nnUNetTrainer__nnUNetPlans__3d_fullres", plans_=plans, dj_=dj, folds=(0, 1, 2)):
        folder = tmp_path / "models" / name
        folder.mkdir(parents=True)
        (folder / "plans.json").write_text(json.dumps(plans_))
        (folder / "dataset.json").write_text(json.dumps(dj_))
        for f in folds:
            (folder / f"fold_{f}").mkdir()
            (folder / f"fold_{f}" / "checkpoint_final.pth").write_bytes(b"")
        return str(folder)

    return {"raw": raw, "pre": pre, "plans": plans, "dj": dj, "model": model, "tmp": tmp_path}


def _digest(folder: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(folder)).encode() + p.read_bytes())
    return h.hexdigest()


def test_refusals_name_the_problem_and_leave_the_source_alone(fake_setup):
    s = fake_setup
    before = _digest(s["raw"]), _digest(s["pre"])
    good = s["model"]()

    def refused(match, **kw):
        args = dict(dataset=SOURCE, model_folders=[good], folds=["0"], out_id=962, device="cpu")
        args.update(kw)
        with pytest.raises(SKCDFInputError, match=match):
            run_round(**args, preprocess=False, log=lambda m: None)

    other_ds = s["model"]("nnUNetTrainer__nnUNetPlans__3d_lowres", plans_={**s["plans"], "dataset_name": "Dataset5_X"})
    refused(r"trained on Dataset5_X, not on Dataset961_PLSource", model_folders=[other_ds])
    other_labels = s["model"]("T2__nnUNetPlans__3d_fullres", dj_={**s["dj"], "labels": {"background": 0, "liver": 1}})
    refused(r"its labels .* differ", model_folders=[other_labels])
    replanned = s["model"]("T3__nnUNetPlans__3d_fullres", plans_={**s["plans"], "configurations": {
        "3d_fullres": {"spacing": [5.0, 3.6, 3.6], "patch_size": [16, 32, 32]}}})
    refused(r"other plans than .*nnUNetPlans.json", model_folders=[replanned])
    refused(r"other labelled/validation cases than fold 0", folds=["0", "2"])
    refused(r"fold_7.*no such checkpoint", folds=["7"])
    refused(r"not an nnU-Net model folder", model_folders=[str(s["tmp"])])
    refused(r"is the source dataset", out_id=961)
    refused(r"--keep 1.5", keep=1.5)
    refused(r"fold 5 does not exist", split_fold=5)
    # an id of the split without an image
    image = s["raw"] / "imagesUnlabeled" / "phantom_un_0001_0000.nii.gz"
    shutil.move(image, s["tmp"] / image.name)
    refused(r"'phantom_un_0001' .* has no image")
    shutil.move(s["tmp"] / image.name, image)
    # an existing folder that is not a round of this source: refused even with --overwrite
    foreign = Path(os.environ["nnUNet_raw"]) / "Dataset962_Foreign"
    foreign.mkdir()
    refused(r"taken by .*Dataset962_Foreign", out_name="PLSourcePseudoR")
    refused(r"not a pseudo-label round of Dataset961_PLSource: refusing", out_name="Foreign", overwrite=True)
    refused(r"exists. Pass --overwrite", out_name="Foreign")
    # an orphan preprocessed folder of the output name is not replaced either
    orphan = Path(os.environ["nnUNet_preprocessed"]) / "Dataset968_Orphan"
    orphan.mkdir()
    refused(r"Dataset968_Orphan exists but .* is not a pseudo-label round", out_id=968, out_name="Orphan")
    # a previous round of another dataset
    prev = Path(os.environ["nnUNet_raw"]) / "Dataset963_OtherRound"
    prev.mkdir()
    (prev / RECORD).write_text(json.dumps({"round": 1, "source_dataset": "Dataset001_Other"}))
    refused(r"--previous Dataset963_OtherRound is a round of Dataset001_Other", previous="963", out_id=964)
    assert (_digest(s["raw"]), _digest(s["pre"])) == before  # the source dataset is never written


def test_refusals_before_any_prediction_fold_all_stale_split_taken_ids_regions_cuda(fake_setup, monkeypatch):
    """What used to fail late or as a traceback fails first, naming the culprit: a fold 'all' teacher (it trained on
    the hidden labels), a split older than the dataset (after hours of prediction, before), an id another dataset
    has in nnUNet_preprocessed / nnUNet_results, a region-based dataset, -device cuda without CUDA."""
    import torch

    s = fake_setup
    good = s["model"]()

    def refused(match, **kw):
        args = dict(dataset=SOURCE, model_folders=[good], folds=["0", "1"], out_id=962, device="cpu")
        args.update(kw)
        with pytest.raises(SKCDFInputError, match=match):
            run_round(**args, preprocess=False, log=lambda m: None)

    refused(r"fold 'all' trained on every case with a label file.*hidden-label cases.*-f 0 1 2",
            model_folders=[s["model"]("T4__nnUNetPlans__3d_fullres", folds=("all",))], folds=["all"])
    # the split names a labelled case whose image is gone, and a validation case whose label is gone
    image = s["raw"] / "imagesTr" / "phantom_tr_0001_0000.nii.gz"
    shutil.move(image, s["tmp"] / image.name)
    refused(r"Case 'phantom_tr_0001' of fold 0's 'train' list in .*splits_final.json has no image .* older than")
    shutil.move(s["tmp"] / image.name, image)
    label = s["raw"] / "labelsTr" / "phantom_tr_0002.nii.gz"
    shutil.move(label, s["tmp"] / label.name)
    refused(r"phantom_tr_0002.nii.gz: the label of validation case 'phantom_tr_0002' .* is missing")
    shutil.move(s["tmp"] / label.name, label)
    # a truncated image to predict (SimpleITK would read it silently)
    image = s["raw"] / "imagesUnlabeled" / "phantom_un_0000_0000.nii.gz"
    whole = image.read_bytes()
    image.write_bytes(whole[: len(whole) // 2])
    refused(r"phantom_un_0000_0000.nii.gz: cannot be read \(EOFError.*export the image of case 'phantom_un_0000' "
            r"again")
    image.write_bytes(whole)
    # an id taken in nnUNet_results (a model folder of a deleted dataset) or nnUNet_preprocessed
    taken = Path(os.environ["nnUNet_results"]) / "Dataset962_Old"
    taken.mkdir()
    refused(r"Dataset id 962 is already used by .*Dataset962_Old \(nnUNet_results\)")
    taken.rmdir()
    (Path(os.environ["nnUNet_preprocessed"]) / "Dataset962_Old").mkdir()
    refused(r"Dataset id 962 is already used by .*Dataset962_Old \(nnUNet_preprocessed\)")
    (Path(os.environ["nnUNet_preprocessed"]) / "Dataset962_Old").rmdir()
    if not torch.cuda.is_available():  # cuda is the default, as nnUNetv2_predict's
        refused(r"-device cuda \(the default, as for nnUNetv2_predict\): PyTorch sees no CUDA device.*-device cpu",
                device="cuda")
        refused(r"-device cuda \(the default", device=inspect.signature(run_round).parameters["device"].default)
    assert _parser().parse_args(["-d", "1", "-m", "m", "-f", "0", "--out-dataset", "2"]).device == "cuda"
    regions = {**s["dj"], "labels": {"background": 0, "organ": [1, 2]}, "regions_class_order": [1]}
    (s["raw"] / "dataset.json").write_text(json.dumps(regions))
    refused(r"defines regions .* not supported")


def test_a_configuration_added_after_training_keeps_the_teachers(fake_setup):
    """Plans compared by their global keys and the teacher's configuration (inheritance resolved): a configuration
    added to the source's plans later (skcdf_add_cpu_config) does not make the teachers strangers; a changed
    inherited value (the parent's spacing) does."""
    from nnunetv2_skcdf.pseudo_labelling.pseudo_label_round import check_teachers, load_teachers

    s = fake_setup
    child = {"inherits_from": "3d_fullres", "patch_size": [8, 16, 16]}
    plans = {**s["plans"], "configurations": {**s["plans"]["configurations"], "3d_small": child}}
    (s["pre"] / "nnUNetPlans.json").write_text(json.dumps(plans))
    splits = json.loads((s["pre"] / "splits_final.json").read_text())

    def check(folder, configuration_folds=("0", "1")):
        teachers = load_teachers([folder], list(configuration_folds), "checkpoint_final.pth")
        check_teachers(teachers, SOURCE, s["dj"], 0, splits[0], splits)

    check(s["model"]())  # trained before 3d_small was added: accepted
    check(s["model"]("nnUNetTrainer__nnUNetPlans__3d_small", plans_=plans))  # inherited configuration: accepted
    moved = {**plans, "configurations": {"3d_fullres": {"spacing": [5.0, 3.6, 3.6], "patch_size": [16, 32, 32]},
                                         "3d_small": child}}
    with pytest.raises(SKCDFInputError, match=r"3d_small \(fold 0\) was trained on other plans than"):
        check(s["model"]("T6__nnUNetPlans__3d_small", plans_=moved))
    with pytest.raises(SKCDFInputError, match=r"its configuration '3d_lowres' is not in .*nnUNetPlans.json"):
        check(s["model"]("T7__nnUNetPlans__3d_lowres", plans_={**plans, "configurations": {
            **plans["configurations"], "3d_lowres": {"spacing": [10.0, 7.2, 7.2], "patch_size": [16, 32, 32]}}}))


def test_a_round_replaces_an_earlier_one_whole_or_not_at_all(fake_setup, monkeypatch):
    """The student's raw and preprocessed folders are both built aside and swapped in after both are complete: a
    round that fails while writing the preprocessed folder leaves the earlier round's raw and preprocessed folders
    as they were (no split-less plans folder, which nnU-Net would fill with a random 5-fold split). The predictor is
    replaced by constant predictions here (the slow test runs the real one)."""
    from types import SimpleNamespace

    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    import nnunetv2_skcdf.pseudo_labelling.pseudo_label_round as R

    s = fake_setup
    fake = SimpleNamespace(plans_manager=SimpleNamespace(image_reader_writer_class=SimpleITKIO))
    monkeypatch.setattr(R, "_predictor", lambda *a, **k: fake)

    def constant(predictors, image, props):
        seg = np.zeros(image.shape[1:], np.uint8)
        seg[:4] = 1
        return seg, [seg, seg]

    monkeypatch.setattr(R, "predict_members", constant)
    teacher = s["model"]()
    target = run_round(SOURCE, [teacher], ["0", "1"], 962, student_folds=2, device="cpu", preprocess=False,
                       log=lambda m: None)
    pre = Path(os.environ["nnUNet_preprocessed"]) / Path(target).name
    split = json.loads((pre / "splits_final.json").read_text())
    assert len(split) == 2 and split[0]["val"] == ["phantom_tr_0002"] and len(split[0]["train"]) == 2 + 4
    assert json.loads((pre / "nnUNetPlans.json").read_text())["dataset_name"] == Path(target).name
    assert (pre / "dataset.json").read_text() == (Path(target) / "dataset.json").read_text()
    before = _digest(Path(target)), _digest(pre)

    def broken(pre_staging, *args, **kwargs):
        (Path(pre_staging) / "nnUNetPlans.json").write_text("{}")
        raise OSError("disk full")

    monkeypatch.setattr(R, "_write_preprocessed", broken)
    with pytest.raises(OSError, match="disk full"):
        run_round(SOURCE, [teacher], ["0", "1"], 962, keep=0.5, overwrite=True, device="cpu", preprocess=False,
                  log=lambda m: None)
    assert (_digest(Path(target)), _digest(pre)) == before
    for root in (Path(os.environ["nnUNet_raw"]), Path(os.environ["nnUNet_preprocessed"])):
        assert not [p.name for p in root.iterdir() if p.name.startswith(".")]  # no staging folder left behind


def test_teachers_whose_trainer_nnunet_cannot_find_are_refused_before_predicting(fake_setup, monkeypatch):
    """SKCDF models as teachers (convergence arm (w)): the predictor finds SKCDFTrainer through nnUNet_extTrainer
    only; without it the round says how to set it, naming the folder, before reading any checkpoint."""
    from nnunetv2_skcdf.pseudo_labelling.pseudo_label_round import trainer_lookup_problem
    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    skcdf = fake_setup["model"]("SKCDFTrainer__nnUNetPlans__3d_fullres")
    monkeypatch.delenv("nnUNet_extTrainer", raising=False)
    with pytest.raises(SKCDFInputError, match=r"SKCDFTrainer__nnUNetPlans__3d_fullres: nnU-Net's trainer lookup does "
                                              r"not give the trainer class SKCDFTrainer .*Could not find requested.*"
                                              r"export nnUNet_extTrainer=\$\(skcdf_trainer_path\).*\(now: not set\)"):
        run_round(dataset=SOURCE, model_folders=[skcdf], folds=["0", "1"], out_id=962, device="cpu",
                  preprocess=False, log=lambda m: None)
    assert "Could not find requested nnunet trainer SKCDFTrainer" in trainer_lookup_problem("SKCDFTrainer")
    assert trainer_lookup_problem("nnUNetTrainer") is None
    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    assert trainer_lookup_problem("SKCDFTrainer") is None
    assert "Could not find requested nnunet trainer NoSuchTrainer" in trainer_lookup_problem("NoSuchTrainer")
    # a class of that name that is not an nnU-Net trainer (nnU-Net asserts the subclass)
    not_a_trainer = fake_setup["tmp"] / "not_a_trainer"
    not_a_trainer.mkdir()
    (not_a_trainer / "plain.py").write_text("class PlainClass:\n    pass\n")
    monkeypatch.setenv("nnUNet_extTrainer", str(not_a_trainer))
    assert trainer_lookup_problem("PlainClass") == "a class PlainClass was found, but it is not an nnUNetTrainer"


def test_mirror_variants_are_the_raw_axes_of_the_patch_axes_in_2d_and_3d():
    from types import SimpleNamespace as NS

    def variants(allowed, forward, patch):
        return _mirror_variants(NS(allowed_mirroring_axes=allowed, plans_manager=NS(transpose_forward=forward),
                                   configuration_manager=NS(patch_size=patch)))

    assert variants((0, 1, 2), [0, 1, 2], [16, 32, 32]) == [(), (1,), (2,), (3,), (1, 2), (1, 3), (2, 3), (1, 2, 3)]
    # 3D, transposed: patch axis 0 is raw axis 2
    assert variants((0,), [2, 0, 1], [16, 32, 32]) == [(), (3,)]
    # 2D: patch axes (0, 1) are the in-plane axes (raw 1, 2), never the slicing axis 0
    assert variants((0, 1), [0, 1, 2], [64, 64]) == [(), (2,), (3,), (2, 3)]
    assert variants((0, 1), [2, 0, 1], [64, 64]) == [(), (1,), (2,), (1, 2)]
    assert variants(None, [0, 1, 2], [64, 64]) == [()]


def test_one_teacher_without_mirroring_is_refused_unless_a_previous_round_scores_the_cases():
    teacher = Teacher("/models/nnUNetTrainer_noMirroring__nnUNetPlans__3d_fullres", "0", "nnUNetTrainer_noMirroring",
                      "nnUNetPlans", "3d_fullres", {}, {})
    with pytest.raises(SKCDFInputError, match=r"nnUNetTrainer_noMirroring__nnUNetPlans__3d_fullres \(fold 0\) is "
                                              r"the only teacher .* disallows mirroring .* Give several teachers"):
        check_single_teacher(teacher, 1, None)
    check_single_teacher(teacher, 1, "/raw/Dataset962_PseudoR1")  # the previous round's agreement scores them
    check_single_teacher(teacher, 8, None)  # its 8 mirror variants vote


# ------------------------------------------------------------------------------------------ a real round (slow)
@pytest.mark.slow
def test_round_end_to_end_with_stock_nnunet(tmp_path):
    """2 tiny stock nnU-Net teachers -> round 1 with --student-unlabeled -> a stock student and an SKCDF student
    (the cases not kept as its unlabelled images) train on it -> round 2 (one teacher: its mirror variants vote,
    scored against round 1 too). Source labels untouched; hidden labels never copied."""
    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    trainers = str(Path(__file__).parent / "trainers")
    env = {**env_for(tmp_path), "nnUNet_extTrainer": os.pathsep.join((trainer_folder(), trainers)),
           "nnUNet_compile": "false"}
    train_env = {**env, "nnUNet_n_proc_DA": "0"}
    ds, name, cfg, tr = "965", "Dataset965_PLE2E", "3d_cpu", "nnUNetTrainer_plTest"
    run_cli(["skcdf_make_phantom", "-d", ds, "-n", "PLE2E", "--num-train", "6", "--num-test", "0", "--num-unlabeled",
             "2", "--shape", "24", "48", "48", "--spacing", "10", "7.2", "7.2", "--no-progress"], env)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", ds, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    run_cli(["skcdf_add_cpu_config", "-d", ds, "--stages", "3", "--features", "8", "32"], env)
    run_cli(["skcdf_split", "-d", ds, "--labeled", "2", "--val", "1", "--add-unlabeled-images", "--folds", "2",
             "--fold-mode", "repeat"], env)
    raw = Path(env["nnUNet_raw"]) / name
    source_digest = _digest(raw)
    for fold in ("0", "1"):
        run_cli(["nnUNetv2_train", ds, cfg, fold, "-tr", tr, "-device", "cpu"], train_env, timeout=900)
    teachers = str(Path(env["nnUNet_results"]) / name / f"{tr}__nnUNetPlans__{cfg}")
    out = run_cli(["skcdf_pseudolabel", "-d", ds, "-m", teachers, "-f", "0", "1", "--out-dataset", "966", "--keep",
                   "0.5", "--student-unlabeled", "-device", "cpu"], env, timeout=900)
    assert "kept 3 of 5 pseudo-labelled cases (round 1): " in out.stdout, out.stdout[-2000:]
    assert "; the other 2 go to the student as unlabelled images" in out.stdout
    assert "-tr SKCDFTrainer" in out.stdout.strip().splitlines()[-1]
    r1 = Path(env["nnUNet_raw"]) / "Dataset966_PLE2EPseudoR"
    rec = json.loads((r1 / RECORD).read_text())
    print(f"round 1: {rec['seconds_prediction']} s to predict and score {len(rec['kept'])} kept of 5 cases; "
          f"{out.stdout.strip().splitlines()[-1]}")
    split = json.loads((Path(env["nnUNet_preprocessed"]) / name / "splits_final.json").read_text())[0]
    assert rec["round"] == 1 and rec["members"].startswith("models") and len(rec["teachers"]) == 2
    assert sorted(rec["cases"][c]["origin"] for c in split["train"]) == ["labelled", "labelled"]
    assert len(list((r1 / "pseudo_labels").iterdir())) == len(split["unlabeled"]) == 5
    for cid, case in rec["cases"].items():
        if case["origin"] == "pseudo":
            assert 0.0 <= case["score"] <= 1.0 and case["previous_score"] is None
            assert (r1 / "labelsTr" / f"{cid}.nii.gz").exists() == case["kept"]
            if case["kept"]:  # a kept hidden-label case carries the pseudo label, not the real one
                assert (r1 / "labelsTr" / f"{cid}.nii.gz").read_bytes() == \
                       (r1 / "pseudo_labels" / f"{cid}.nii.gz").read_bytes()
    student_split = json.loads((Path(env["nnUNet_preprocessed"]) / r1.name / "splits_final.json").read_text())
    assert student_split[0]["val"] == sorted(split["val"])
    assert sorted(student_split[0]["train"]) == sorted(split["train"] + rec["kept"])
    # --student-unlabeled: the cases not kept, images only, are the student's unlabelled data (preprocessed)
    rest = sorted(set(split["unlabeled"]) - set(rec["kept"]))
    assert len(rest) == 2 and rec["student_unlabeled"] == rest == student_split[0]["unlabeled"]
    assert sorted(f.name for f in (r1 / "imagesUnlabeled").iterdir()) == [f"{c}_0000.nii.gz" for c in rest]
    for cid in rest:
        source_image = next(raw.glob(f"images*/{cid}_0000.nii.gz"))
        assert (r1 / "imagesUnlabeled" / source_image.name).read_bytes() == source_image.read_bytes()
        assert not (r1 / "labelsTr" / f"{cid}.nii.gz").exists()
    assert json.loads((r1 / "dataset.json").read_text())["numUnlabeled"] == 2
    unlabelled_pre = list((Path(env["nnUNet_preprocessed"]) / r1.name).glob("*_unlabeled"))
    assert len(unlabelled_pre) == 1 and sorted(f.name.split(".")[0] for f in unlabelled_pre[0].glob("*.pkl")) == rest
    assert _digest(raw) == source_digest  # the source dataset is never written
    run_cli(["nnUNetv2_train", "966", cfg, "0", "-tr", tr, "-device", "cpu"], train_env, timeout=900)
    skcdf = run_cli(["nnUNetv2_train", "966", cfg, "0", "-tr", "SKCDFTrainer_plTest", "-device", "cpu"], train_env,
                    timeout=900)
    assert (Path(env["nnUNet_results"]) / r1.name / f"SKCDFTrainer_plTest__nnUNetPlans__{cfg}" / "fold_0" /
            "checkpoint_final.pth").is_file(), skcdf.stdout[-2000:]
    student = str(Path(env["nnUNet_results"]) / r1.name / f"{tr}__nnUNetPlans__{cfg}")
    assert (Path(student) / "fold_0" / "checkpoint_final.pth").is_file()
    out = run_cli(["skcdf_pseudolabel", "-d", ds, "-m", student, "-f", "0", "--out-dataset", "967", "--previous",
                   "966", "--threshold", "0.0", "--student-unlabeled", "-device", "cpu"], env, timeout=900)
    rec2 = json.loads((Path(env["nnUNet_raw"]) / "Dataset967_PLE2EPseudoR" / RECORD).read_text())
    assert rec2["round"] == 2 and rec2["members"] == "mirror variants of one model"
    assert len(rec2["kept"]) == 5  # threshold 0 keeps every case
    # so nothing is left for an SKCDF student: said, and no empty unlabelled folder is written
    assert "every case was kept, so the student has no unlabelled images" in out.stdout
    assert rec2["student_unlabeled"] == [] and not (Path(env["nnUNet_raw"]) / "Dataset967_PLE2EPseudoR" /
                                                     "imagesUnlabeled").exists()
    # every case was compared with round 1's pseudo label (an empty dict: neither has any organ)
    assert all(rec2["cases"][c]["previous_agreement"] is not None for c in rec2["kept"])
    assert _digest(raw) == source_digest
