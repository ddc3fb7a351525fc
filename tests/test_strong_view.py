"""``SKCDFTrainer_strongView`` on any device: the student's view is perturbed where the batch was made (the CPU),
so batchgeneratorsv2's transforms (Gaussian blur builds its kernel on the CPU) never see a tensor of another
device; then both views move to the training device.

The CPU test uses the 'meta' device as the training device: a transform handed a moved tensor would see 'meta'
(and the blur's CPU kernel would not match it), exactly as it sees 'cuda' on a GPU."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from nnunetv2_skcdf.training import skcdf_components as C


class _Stop(Exception):
    pass


def _spying_strong_transform(devices: list):
    """strong_intensity_transform with every transform applied (blur on every channel), each recording the device
    of the image it receives."""
    from batchgeneratorsv2.transforms.base.basic_transform import BasicTransform
    from batchgeneratorsv2.transforms.noise.gaussian_blur import GaussianBlurTransform

    class DeviceSpy(BasicTransform):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def apply(self, data_dict, **params):
            devices.append((type(self.inner).__name__, data_dict["image"].device))
            return self.inner(**data_dict)

    original = C.strong_intensity_transform

    def make(*args, **kwargs):
        composed = original(*args, **kwargs)
        for random_transform in composed.transforms:
            random_transform.apply_probability = 1.0
            if isinstance(random_transform.transform, GaussianBlurTransform):
                random_transform.transform.p_per_channel = 1.0
            random_transform.transform = DeviceSpy(random_transform.transform)
        return composed

    return make


def _strong_view_trainer(tiny_training, device):
    from nnunetv2_skcdf.training.nnUNetTrainer.variants.ablation.SKCDFTrainer_ablations import SKCDFTrainer_strongView

    pre = tiny_training["preprocessed"]
    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False
    return SKCDFTrainer_strongView(plans, "3d_tiny", 0, json.loads((pre / "dataset.json").read_text()), device=device)


def test_view_transforms_receive_tensors_on_the_device_the_batch_was_made_on(tiny_training, monkeypatch):
    devices = []
    monkeypatch.setattr(C, "strong_intensity_transform", _spying_strong_transform(devices))
    trainer = _strong_view_trainer(tiny_training, torch.device("cpu"))
    trainer.on_train_start()
    seen = {}
    try:
        net = trainer._net()

        def stop(self, *inputs):
            seen["devices"] = [x.device for x in inputs]
            raise _Stop

        monkeypatch.setattr(type(net), "forward", stop)
        trainer.device = torch.device("meta")  # stands in for 'cuda': where train_step moves the batch
        with pytest.raises(_Stop):
            trainer.train_step(next(trainer.dataloader_train))
    finally:
        trainer.device = torch.device("cpu")
        trainer.on_train_end()
    names = {name for name, _ in devices}
    assert "GaussianBlurTransform" in names and len(names) == 6  # every transform of the view ran
    assert {device for _, device in devices} == {torch.device("cpu")}  # one device, the batch's
    assert seen["devices"] == [torch.device("meta")] * 3  # x_l, x_u and the view, all moved to the training device


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (runs where one exists)")
def test_strong_view_trains_on_cuda(tiny_training, monkeypatch):
    """The crash this guards against: conv3d with a CUDA image and the blur's CPU kernel, in the first steps."""
    devices = []
    monkeypatch.setattr(C, "strong_intensity_transform", _spying_strong_transform(devices))
    trainer = _strong_view_trainer(tiny_training, torch.device("cuda"))
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        for _ in range(2):
            out = trainer.train_step(next(trainer.dataloader_train))
            assert np.isfinite(out["loss"]) and np.isfinite(out["l_u"])
    finally:
        trainer.on_train_end()
    assert ("GaussianBlurTransform", torch.device("cpu")) in devices
    assert {device for _, device in devices} == {torch.device("cpu")}
