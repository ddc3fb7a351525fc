"""SKCDFTrainer in-process: start, train steps, logging, checkpoint round trip, registration."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer


def test_train_steps_logging_and_checkpoint_round_trip(trainer_factory, tmp_path):
    trainer = trainer_factory()
    trainer.on_train_start()
    try:
        counts = trainer._net().class_voxel_counts
        assert int(counts.sum()) > 0 and counts[0] > counts[6] > 0  # background > liver > 0
        rates = trainer.class_keep_rates
        assert rates.shape == (14,) and torch.isfinite(rates).all() and rates.max() == 1.0
        trainer.on_epoch_start()
        trainer.on_train_epoch_start()
        outputs = [trainer.train_step(next(trainer.dataloader_train)) for _ in range(2)]
        for out in outputs:
            assert np.isfinite(out["loss"]) and np.isfinite(out["l_sup"]) and np.isfinite(out["l_u"])
            assert out["pseudo_histogram"].shape == (14,) and out["pseudo_histogram"].sum() > 0
        trainer.on_train_epoch_end(outputs)
        log = trainer.logger.local_logger.my_fantastic_logging
        assert len(log["train_l_sup"]) == len(log["consistency_weight"]) == 1
        assert sum(log["pseudo_label_fractions"][0]) == pytest.approx(1.0)
        trainer.save_checkpoint(str(tmp_path / "ckpt.pth"))
    finally:
        trainer.on_train_end()

    resumed = trainer_factory()
    resumed.load_checkpoint(str(tmp_path / "ckpt.pth"))
    assert torch.equal(resumed._net().class_voxel_counts, counts)
    assert resumed.logger.local_logger.my_fantastic_logging["train_l_sup"] == log["train_l_sup"]
    for a, b in zip(resumed.network.state_dict().values(), trainer.network.state_dict().values()):
        assert torch.equal(a, b)


def test_train_step_updates_parameters_with_ema_and_gradients(trainer_factory):
    trainer = trainer_factory()
    trainer.on_train_start()
    try:
        net = trainer._net()
        before = {k: v.clone() for k, v in net.state_dict().items()}
        trainer.train_step(next(trainer.dataloader_train))
        moved = {k for k, v in net.state_dict().items() if v.is_floating_point() and not torch.equal(v, before[k])}
        for prefix in ("encoder.", "skc.", "decoder_l.", "decoder_u."):
            assert any(k.startswith(prefix) for k in moved), prefix
    finally:
        trainer.on_train_end()


def test_multiply_masking_option_runs(trainer_factory):
    trainer = trainer_factory()
    trainer.masking = "multiply"
    trainer.on_train_start()
    try:
        out = trainer.train_step(next(trainer.dataloader_train))
        assert np.isfinite(out["loss"])
    finally:
        trainer.on_train_end()


def test_registered_through_nnunet_ext_trainer(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    for name in ("SKCDFTrainer", "SKCDFTrainer_5epochs", "SKCDFTrainer_cpuTest",
                 "nnUNetTrainer_demo8epochs", "SKCDFTrainer_demo8epochs"):
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name and "__" not in name


def test_region_datasets_are_refused(trainer_factory, phantom_workspace):
    pre = phantom_workspace["preprocessed"]
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    dataset_json = json.loads((pre / "dataset.json").read_text())
    dataset_json["labels"] = {"background": 0, "organs": [1, 2], "kidney": 2}
    dataset_json["regions_class_order"] = [1, 2]
    with pytest.raises(ValueError, match="region-based training"):
        SKCDFTrainer(plans, "3d_tiny", 0, dataset_json, device=torch.device("cpu"))


def test_unequal_labelled_and_unlabelled_batches_train(trainer_factory):
    """unlabeled_batch_size 3 beside the plans' 2 labelled patches: two steps train, and the pseudo labels
    cover exactly the 3 unlabelled patches (the network split the batch at B_l = 2)."""
    trainer = trainer_factory()
    trainer.unlabeled_batch_size = 3
    trainer.on_train_start()
    try:
        assert trainer.batch_size == 2
        trainer.on_train_epoch_start()
        patch_voxels = int(np.prod(trainer.configuration_manager.patch_size))
        for _ in range(2):
            out = trainer.train_step(next(trainer.dataloader_train))
            assert np.isfinite(out["loss"]) and np.isfinite(out["l_sup"]) and np.isfinite(out["l_u"])
            assert out["pseudo_histogram"].sum() == 3 * patch_voxels
        assert trainer.nonfinite_in_a_row == 0
    finally:
        trainer.on_train_end()


def test_resuming_a_checkpoint_with_another_local_window_is_refused(trainer_factory):
    """A network whose local block was rebuilt for an old checkpoint's window (SKCDFUNet.load_state_dict) may
    predict, but training it on would leave that block outside the optimiser: on_train_start refuses, naming the
    fix, before any loader starts."""
    from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

    trainer = trainer_factory()
    trainer.initialize()
    trainer._net().skc.set_local_window((1, 2, 2))  # what loading a pre-0.3 checkpoint does on an odd bottleneck
    with pytest.raises(SKCDFInputError, match="SKCDFTrainer_divisorWindow --c"):
        trainer.on_train_start()
    assert trainer.dataloader_unlabeled is None
