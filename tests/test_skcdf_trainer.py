"""SKCDFTrainer in-process: start, train steps, logging, checkpoint round trip, registration."""
from __future__ import annotations

import json
from typing import List

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


@pytest.mark.parametrize("masking", ["multiply", "exclude"])
def test_both_masking_options_run(trainer_factory, masking):
    trainer = trainer_factory()
    assert trainer.masking == "multiply"  # the default since 0.4.0
    trainer.masking = masking
    trainer.on_train_start()
    try:
        out = trainer.train_step(next(trainer.dataloader_train))
        assert np.isfinite(out["loss"])
    finally:
        trainer.on_train_end()


def test_strong_student_view_perturbs_intensity_only_and_trains(trainer_factory, monkeypatch):
    from nnunetv2_skcdf.training import skcdf_components as C
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation.SKCDFTrainer_ablations import (
        SKCDFTrainer_strongView)

    trainer = trainer_factory(SKCDFTrainer_strongView)
    assert trainer.unlabelled_view == "strong_intensity"
    torch.manual_seed(0)
    x = torch.randn(2, 1, 8, 16, 16)
    copy = x.clone()
    view = C.perturbed_view(x, C.strong_intensity_transform())
    assert view.shape == x.shape and view.dtype == x.dtype and not torch.equal(view, x)
    assert torch.equal(x, copy)  # the input batch is not modified in place
    seen = []
    trainer.on_train_start()
    try:
        batch = next(trainer.dataloader_unlabeled)  # the loader makes the view beside the batch, on the CPU
        assert batch["data_view"].shape == batch["data"].shape and not torch.equal(batch["data_view"], batch["data"])
        net = trainer._net()
        original = type(net).forward
        monkeypatch.setattr(type(net), "forward", lambda self, *a: seen.append(a) or original(self, *a))
        out = trainer.train_step(next(trainer.dataloader_train))
        assert np.isfinite(out["loss"]) and np.isfinite(out["l_u"])
        (x_l, x_u, x_v), = seen  # one training forward, with the student's view as third input
        assert x_v.shape == x_u.shape and not torch.equal(x_v, x_u)
    finally:
        trainer.on_train_end()
    trainer = trainer_factory()
    trainer.unlabelled_view = "strong"
    with pytest.raises(ValueError, match=r"unlabelled_view = 'strong': use one of 'same', 'strong_intensity'"):
        trainer._student_view({"data": x})
    trainer.unlabelled_view = "same"
    assert trainer._student_view({"data": x}) is None and trainer._student_view_transform() is None


def test_registered_through_nnunet_ext_trainer(monkeypatch):
    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

    monkeypatch.setenv("nnUNet_extTrainer", trainer_folder())
    for name in ("SKCDFTrainer", "SKCDFTrainer_5epochs", "SKCDFTrainer_cpuTest",
                 "nnUNetTrainer_demo8epochs", "SKCDFTrainer_demo8epochs", "nnUNetTrainer_demo", "SKCDFTrainer_demo",
                 "nnUNetTrainer_demoLong", "SKCDFTrainer_demoLong"):
        cls = recursive_find_trainer_class_by_name(name)
        assert cls.__name__ == name


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


def test_training_weights_with_another_local_window_is_refused(trainer_factory):
    """A network whose local block was rebuilt for other weights' window (SKCDFUNet.load_state_dict; here without
    --c, e.g. pretrained weights) may predict, but training it on would leave that block outside the optimiser:
    on_train_start refuses, naming trainers that build that window, before any loader starts. (--c compares all
    settings: test_checkpoint_settings.py.)"""
    from nnunetv2_skcdf.utilities.dataset_files import SKCDFInputError

    trainer = trainer_factory()
    trainer.initialize()
    trainer._net().skc.set_local_window((1, 2, 2))  # what loading weights with another window does
    with pytest.raises(SKCDFInputError, match=r"local SKC window \[1, 2, 2\]; SKCDFTrainer builds \[2, 2, 2\]"):
        trainer.on_train_start()
    assert trainer.dataloader_unlabeled is None


def test_pretrained_skcdf_weights_leave_their_balanced_heads_and_class_counts_behind(trainer_factory):
    """nnU-Net's -pretrained_weights transfers every weight but '.seg_layers.': an SKCDF model's balanced heads and
    class voxel counts would come along (keep-rates of the other run's labels, heads of its classes). on_train_start
    of a network initialised before (nnU-Net's pretrained path) gives both a fresh start, as the main heads get;
    the rest of the pretrained weights stays."""
    trainer = trainer_factory()
    trainer.initialize()
    net = trainer._net()
    other_counts = torch.arange(1, net.class_voxel_counts.numel() + 1, dtype=net.class_voxel_counts.dtype) * 1000
    with torch.no_grad():  # what load_pretrained_weights copies from another SKCDF run
        net.class_voxel_counts.copy_(other_counts)
        for decoder in (net.decoder_l, net.decoder_u):
            for head in decoder.balanced_seg_layers:
                head.weight.fill_(0.5)
        next(net.encoder.parameters()).fill_(0.25)
    trainer.on_train_start()
    try:
        assert not torch.equal(net.class_voxel_counts, other_counts) and int(net.class_voxel_counts.sum()) > 0
        for decoder in (net.decoder_l, net.decoder_u):
            for head in decoder.balanced_seg_layers:
                assert not torch.any(head.weight == 0.5) and 0 < float(head.weight.std()) < 1
        assert torch.all(next(net.encoder.parameters()) == 0.25)  # the transferred weights stay
        assert "pretrained SKCDF weights: their balanced heads and class voxel counts" in open(trainer.log_file).read()
    finally:
        trainer.on_train_end()
    # a fresh network (no weights loaded) keeps its own initialisation: nothing is redrawn
    fresh = trainer_factory()
    fresh.initialize()
    heads = [h.weight.clone() for h in fresh._net().decoder_l.balanced_seg_layers]
    fresh._forget_pretrained_heads()
    assert all(torch.equal(a, h.weight) for a, h in zip(heads, fresh._net().decoder_l.balanced_seg_layers))


def test_ema_step_of_the_train_step_follows_the_buffer_rule(trainer_factory, monkeypatch):
    """train_step passes ema_buffers (parameters only by default, as the reference) to the network's EMA."""
    from nnunetv2_skcdf.network.architectures.skcdf_unet import SKCDFUNet

    calls = []
    original = SKCDFUNet.ema_update
    monkeypatch.setattr(SKCDFUNet, "ema_update", lambda self, *a, **k: calls.append(a) or original(self, *a, **k))
    trainer = trainer_factory()
    assert trainer.ema_buffers is False
    trainer.on_train_start()
    try:
        trainer.train_step(next(trainer.dataloader_train))
        trainer.ema_buffers = True
        trainer.train_step(next(trainer.dataloader_train))
    finally:
        trainer.on_train_end()
    assert [c[3] for c in calls] == [False, True]


# ---------------------------------------------------------------------------------------- MetaLogger / W&B
class _RecordingLogger:
    """Stands in for nnU-Net's WandbLogger in MetaLogger.loggers: records what MetaLogger hands it."""

    def __init__(self):
        self.logged = {}

    def log(self, key, value, step):
        self.logged.setdefault(key, []).append((step, value))

    def log_summary(self, key, value):
        pass

    def update_config(self, config):
        pass


def _epoch_outputs(n_classes: int = 14) -> List[dict]:
    """Two steps' outputs of train_step: 90 % background and 10 % liver (label 6) pseudo labels."""
    histogram = np.zeros(n_classes)
    histogram[0], histogram[6] = 900, 100
    return [{"loss": np.float32(1.0), "l_sup": np.float32(0.5), "l_u": np.float32(0.25),
             "pseudo_histogram": histogram} for _ in range(2)]


def _fractions_by_name(logged: dict, step: int) -> dict:
    prefix = "pseudo_label_fractions/"
    return {k[len(prefix):]: dict(v)[step] for k, v in logged.items() if k.startswith(prefix)}


def test_skcdf_curves_reach_nnunet_meta_loggers_under_readable_names(trainer_factory):
    """MetaLogger's other loggers (W&B) get L_sup, L_u, lambda and one pseudo-label fraction per class named by
    dataset.json: the background is 'background', label 6 'liver' (not MetaLogger's 'class_1' / 'class_7')."""
    trainer = trainer_factory()
    recorder = _RecordingLogger()
    trainer.logger.loggers.append(recorder)
    trainer.on_train_epoch_end(_epoch_outputs())
    assert {"train_losses", "train_l_sup", "train_l_u", "consistency_weight"} <= set(recorder.logged)
    assert recorder.logged["train_l_sup"] == [(0, pytest.approx(0.5))]
    assert not [k for k in recorder.logged if "class_" in k]
    fractions = _fractions_by_name(recorder.logged, 0)
    assert set(fractions) == set(trainer.dataset_json["labels"])
    assert fractions["background"] == pytest.approx(0.9) and fractions["liver"] == pytest.approx(0.1)
    assert fractions["spleen"] == 0
    local = trainer.logger.local_logger.my_fantastic_logging["pseudo_label_fractions"]  # checkpointed list
    assert len(local) == 1 and local[0][6] == pytest.approx(0.1)


def test_skcdf_curves_reach_weights_and_biases_offline(trainer_factory, monkeypatch):
    """The real W&B logger of nnU-Net 2.8 (nnUNet_wandb_enabled=1, offline mode): the run's summary holds the
    SKCDF curves under readable names. Skipped where wandb is not installed (it is optional for nnU-Net)."""
    pytest.importorskip("wandb")
    for var, value in (("nnUNet_wandb_enabled", "1"), ("nnUNet_wandb_mode", "offline"), ("WANDB_SILENT", "true"),
                       ("WANDB_MODE", "offline")):
        monkeypatch.setenv(var, value)
    trainer = trainer_factory()
    (wandb_logger,) = trainer.logger.loggers
    try:
        for epoch in range(2):  # W&B commits a step's values when the next step starts
            trainer.current_epoch = epoch
            trainer.on_train_epoch_end(_epoch_outputs())
        summary = dict(wandb_logger.run.summary)
    finally:
        wandb_logger.run.finish()
    assert {"train_losses", "train_l_sup", "train_l_u", "consistency_weight"} <= set(summary)
    assert summary["pseudo_label_fractions/background"] == pytest.approx(0.9)
    assert summary["pseudo_label_fractions/liver"] == pytest.approx(0.1)
    assert not [k for k in summary if "class_" in k]
