"""The trainer's rows of the bad-input matrix (README, Troubleshooting): each refuses with a message that names
the file/case and the fix, before anything is trained or written half-way; NaN/inf losses are skipped."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError


def _edit_split(phantom_workspace, edit):
    path = phantom_workspace["preprocessed"] / "splits_final.json"
    splits = json.loads(path.read_text())
    edit(splits[0])
    path.write_text(json.dumps(splits))
    return path


def _start_refused(trainer_factory, match: str):
    trainer = trainer_factory()
    with pytest.raises(SKCDFInputError, match=match):
        trainer.on_train_start()
    assert trainer.dataloader_train is None  # refused before any loader or training
    return trainer


def test_empty_unlabelled_set_is_refused_with_how_to_add_some(trainer_factory, phantom_workspace):
    _edit_split(phantom_workspace, lambda f: f.update(unlabeled=[]))
    _start_refused(trainer_factory, r"(?s)no unlabelled cases.*--labeled 0.2.*--add-unlabeled-images")


def test_split_without_unlabeled_key_is_refused(trainer_factory, phantom_workspace):
    _edit_split(phantom_workspace, lambda f: f.pop("unlabeled"))
    _start_refused(trainer_factory, r"(?s)splits_final.json has no 'unlabeled' key.*skcdf_split")


@pytest.mark.parametrize("edit, match", [
    (lambda f: f.pop("val"), r"(?s)splits_final.json: fold 0: no 'val' key.*skcdf_split"),
    (lambda f: f.pop("train"), r"(?s)splits_final.json: fold 0: no 'train' key.*skcdf_split"),
    (lambda f: f["unlabeled"].append(f["unlabeled"][0]),
     r"(?s)fold 0: 'unlabeled' \(unlabelled\) lists \S+ more than once"),
    (lambda f: f["train"].append(7), r"fold 0: 'train' must be a list of case id strings; entry 3 is 7 \(int\)"),
], ids=["no_val", "no_train", "repeated_id", "int_id"])
def test_malformed_fold_is_refused_before_it_is_indexed(trainer_factory, phantom_workspace, edit, match):
    """Missing keys were a bare KeyError; repeated ids were accepted silently."""
    _edit_split(phantom_workspace, edit)
    _start_refused(trainer_factory, match)


def test_split_with_unknown_id_names_it(trainer_factory, phantom_workspace):
    _edit_split(phantom_workspace, lambda f: f["train"].append("no_such_case"))
    _start_refused(trainer_factory, r"(?s)splits_final.json: fold 0: unknown case id.*no_such_case")


def test_case_in_two_roles_is_refused(trainer_factory, phantom_workspace):
    _edit_split(phantom_workspace, lambda f: f["unlabeled"].append(f["train"][0]))
    _start_refused(trainer_factory, r"(?s)fold 0: 1 case\(s\) are in two roles.*--overwrite")


def test_dataset_without_the_unlabelled_preprocessing_step(trainer_factory, phantom_workspace):
    """imagesUnlabeled cases in the split, but skcdf_preprocess_unlabeled never ran for this configuration."""
    trainer = trainer_factory()
    shutil.rmtree(phantom_workspace["preprocessed"] / f"{trainer.configuration_manager.data_identifier}_unlabeled")
    with pytest.raises(SKCDFInputError, match=r"(?s)have no preprocessed image.*skcdf_preprocess_unlabeled"):
        trainer.on_train_start()


def _edit_plans(phantom_workspace, edit) -> None:
    path = phantom_workspace["preprocessed"] / "nnUNetPlans.json"
    plans = json.loads(path.read_text())
    edit(plans["configurations"])
    path.write_text(json.dumps(plans))


@pytest.mark.parametrize("configuration, edit, difference", [
    # 3d_tiny inherits 3d_fullres and its data (data_identifier nnUNetPlans_3d_fullres): re-planned spacing there
    ("3d_tiny", lambda c: c["3d_fullres"].update(spacing=[12.0, 7.2, 7.2]),
     r"spacing \[10(\.0)?, 7\.2, 7\.2\] -> \[12(\.0)?, 7\.2, 7\.2\]"),
    ("3d_tiny", lambda c: c["3d_tiny"].update(normalization_schemes=["ZScoreNormalization"]),
     r"normalization_schemes \['CTNormalization'\] -> \['ZScoreNormalization'\]"),
], ids=["inherited_spacing", "own_normalisation"])
def test_stale_unlabelled_data_is_refused_at_start(trainer_factory, phantom_workspace, configuration, edit,
                                                   difference):
    """Plans changed (nnUNetv2_preprocess rerun) but skcdf_preprocess_unlabeled not: labelled patches at the new
    spacing, unlabelled at the old one; refused before any data-loading worker starts."""
    _edit_plans(phantom_workspace, edit)
    folder = phantom_workspace["preprocessed"] / "nnUNetPlans_3d_fullres_unlabeled"
    _start_refused(trainer_factory, rf"(?s){folder}: unlabelled images preprocessed with other plans than "
                                    rf"configuration '{configuration}' of nnUNetPlans uses now \({difference}; they were made for "
                                    rf"configuration '3d_fullres'\).*"
                                    rf"skcdf_preprocess_unlabeled -d Dataset951_TinyPhantom -c {configuration} "
                                    rf"-p nnUNetPlans --overwrite")


def test_unlabelled_data_redone_for_the_new_plans_is_accepted(trainer_factory, phantom_workspace):
    from nnunetv2_skcdf.preprocessing.unlabeled import preprocess_unlabeled

    _edit_plans(phantom_workspace, lambda c: c["3d_tiny"].update(normalization_schemes=["ZScoreNormalization"]))
    preprocess_unlabeled(951, ["3d_tiny"], num_processes=1, overwrite=True, verbose=False)
    trainer = trainer_factory()
    trainer.on_train_start()
    trainer.on_train_end()


def test_class_absent_from_labelled_cases_gets_rate_one_and_is_logged(trainer_factory, monkeypatch):
    from nnunetv2_skcdf.training import skcdf_components as C

    real = C.count_class_voxels
    monkeypatch.setattr(C, "count_class_voxels", lambda arrays, n: real(arrays, n) * (np.arange(n) != 12))
    trainer = trainer_factory()
    trainer.on_train_start()
    try:
        assert trainer.class_keep_rates[12] == 1.0 and trainer.class_keep_rates[1] < 1.0
        log = open(trainer.log_file).read()
        assert "classes [12] absent from the labelled cases: rate 1" in log
    finally:
        trainer.on_train_end()


def test_nonfinite_loss_is_skipped_logged_and_aborts_after_a_bounded_run(trainer_factory):
    trainer = trainer_factory()
    trainer.max_nonfinite_steps = 3
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        encoder = {k: v.clone() for k, v in trainer._net().encoder.state_dict().items()}
        steps = trainer.optimizer.state_dict()["state"]
        real_loss = trainer.loss
        trainer.loss = lambda output, target: real_loss(output, target) * float("nan")
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
        assert all(np.isnan(o["loss"]) for o in outputs) and trainer.nonfinite_in_a_row == 2
        for key, value in trainer._net().encoder.state_dict().items():  # no optimiser step, no NaN weights
            assert torch.equal(value, encoder[key]), key
        assert trainer.optimizer.state_dict()["state"] == steps
        log = open(trainer.log_file).read()
        assert "non-finite loss in epoch 0" in log and ("step skipped, no optimiser step (the EMA of D_u and the main "
                                                        "heads ran at the step's start) (2 in a row)") in log
        trainer.loss = real_loss  # a finite step resets the count
        outputs.append(trainer.train_step(next(trainer.dataloader_train)))
        assert np.isfinite(outputs[-1]["loss"]) and trainer.nonfinite_in_a_row == 0
        trainer.on_train_epoch_end(outputs)  # the skipped steps leave the epoch means
        assert np.isfinite(trainer.logger.local_logger.my_fantastic_logging["train_losses"][-1])
        assert "2 of 3 steps of this epoch skipped" in open(trainer.log_file).read()
        trainer.loss = lambda output, target: real_loss(output, target) * float("inf")
        with pytest.raises(FloatingPointError, match=r"(?s)3 non-finite losses in a row.*resume with --c"):
            for _ in range(3):
                trainer.train_step(next(trainer.dataloader_train))
    finally:
        trainer.on_train_end()


def test_checkpoint_of_another_dataset_is_refused_clearly(trainer_factory):
    """What nnUNetv2_predict does with a model folder: build the network from its plans, load the weights."""
    from nnunetv2_skcdf.network.architectures.skcdf_unet import SKCDFUNet

    trainer = trainer_factory()
    trainer.initialize()
    net = trainer._net()
    other = {k: v for k, v in net.state_dict().items()}
    other["class_voxel_counts"] = torch.zeros(6, dtype=torch.long)  # a 5-organ dataset's checkpoint
    with pytest.raises(RuntimeError, match=r"(?s)predicts 6 classes.*has 14.*model folder of the dataset"):
        net.load_state_dict(other)
    other = dict(net.state_dict())
    key = next(k for k in other if k.startswith("decoder_u.seg_layers.0.weight"))
    other[key] = torch.zeros(3, *other[key].shape[1:])
    with pytest.raises(RuntimeError, match=r"(?s)'decoder_u.seg_layers.0.weight' has shape \(3,"):
        net.load_state_dict(other)
    assert isinstance(net, SKCDFUNet)
    net.load_state_dict(net.state_dict())  # the normal case still loads


# -------------------------------------------------------------------- issue 42: the refusal before the traceback
def _break(kind: str, trainer, phantom_workspace) -> str:
    """Make the trainer's start refuse; return the start of the refusal's message."""
    if kind == "split":
        _edit_split(phantom_workspace, lambda f: f["train"].append("no_such_case"))
        return "splits_final.json: fold 0: unknown case id"
    if kind == "missing":
        shutil.rmtree(phantom_workspace["preprocessed"] / f"{trainer.configuration_manager.data_identifier}_unlabeled")
        return "unlabelled case(s) of the split have no preprocessed image"
    _edit_plans(phantom_workspace, lambda c: c["3d_tiny"].update(normalization_schemes=["ZScoreNormalization"]))
    return "unlabelled images preprocessed with other plans than configuration '3d_tiny'"


@pytest.mark.parametrize("kind", ["split", "missing", "stale"])
def test_refusal_at_start_is_printed_and_logged_before_it_propagates(trainer_factory, phantom_workspace, capfd,
                                                                     kind):
    """nnUNetv2_train shows a refusal only under a ~25-line traceback; the message now comes first, on stderr and in
    the training log, and the exception keeps its type."""
    trainer = trainer_factory() if kind != "stale" else None
    start = _break(kind, trainer, phantom_workspace)
    trainer = trainer or trainer_factory()  # stale: the plans are read when the trainer is made
    capfd.readouterr()
    with pytest.raises(SKCDFInputError) as e:
        trainer.on_train_start()
    assert start in str(e.value)
    err = capfd.readouterr().err
    line = f"ERROR: SKCDFTrainer refused to start: {e.value}"
    assert line in err and "(the SKCDFInputError traceback below ends in the same message)" in err
    assert line in open(trainer.log_file).read()


def test_nnunetv2_train_prints_the_refusal_before_its_traceback(tiny_training):
    from conftest import DATASET_ID, run_cli
    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    _edit_split(tiny_training, lambda f: f["train"].append("no_such_case"))
    env = {**tiny_training["env"], "nnUNet_extTrainer": trainer_folder(), "nnUNet_compile": "false",
           "nnUNet_n_proc_DA": "0"}
    result = run_cli(["nnUNetv2_train", str(DATASET_ID), "3d_tiny", "0", "-tr", "SKCDFTrainer", "-device", "cpu"],
                     env, check=False)
    err = result.stderr
    assert result.returncode != 0 and "Traceback (most recent call last)" in err, err[-3000:]
    first = err.index("ERROR: SKCDFTrainer refused to start: ")
    assert first < err.index("Traceback (most recent call last)")
    assert "splits_final.json: fold 0: unknown case id" in err[first:err.index("Traceback")]
    assert err.rstrip().splitlines()[-1].startswith("nnunetv2_skcdf.utilities.dataset_files.SKCDFInputError: ")
