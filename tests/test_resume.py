"""Exact resume: nnUNetv2_train killed with SIGKILL mid-training continues with --c where the last checkpoint
left it (epoch, learning rate, ramp-up, keep-rates, EMA and optimiser state, logs); checkpoints are written
atomically."""
from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import DATASET_ID, DATASET_NAME, run_cli
from nnunetv2_skcdf.training import skcdf_components as C
from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

TRAINER, CONFIG, EPOCHS = "SKCDFTrainer_killTest", "3d_tiny", 6


def _checkpoint(path: Path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture
def resume_env(tiny_training):
    return {**os.environ, **tiny_training["env"], "nnUNet_compile": "false", "nnUNet_n_proc_DA": "0",
            "nnUNet_extTrainer": os.pathsep.join((trainer_folder(), str(Path(__file__).parent / "trainers")))}


def test_sigkill_then_continue_resumes_exactly(resume_env):
    fold = Path(resume_env["nnUNet_results"]) / DATASET_NAME / f"{TRAINER}__nnUNetPlans__{CONFIG}" / "fold_0"
    latest = fold / "checkpoint_latest.pth"
    cmd = ["nnUNetv2_train", str(DATASET_ID), CONFIG, "0", "-tr", TRAINER, "-device", "cpu"]
    proc = subprocess.Popen(cmd, env=resume_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if latest.is_file() and _checkpoint(latest)["current_epoch"] >= 2:  # atomic: never half-written
                break
            time.sleep(0.2)
        assert proc.poll() is None, "training ended before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    killed = _checkpoint(latest)  # the last checkpoint the killed run left
    start = killed["current_epoch"]
    assert 2 <= start < EPOCHS and not list(fold.glob("checkpoint_final.pth"))

    run_cli(cmd + ["--c"], resume_env, timeout=600)
    final = _checkpoint(fold / "checkpoint_final.pth")
    logs = final["logging"]
    # the epoch counter went on from the checkpoint: the resumed log starts at that epoch
    resumed_log = max(fold.glob("training_log_*.txt"), key=lambda p: p.stat().st_mtime).read_text()
    epochs_logged = [int(m) for m in re.findall(r": Epoch (\d+)\s*$", resumed_log, flags=re.MULTILINE)]
    assert epochs_logged[0] == start and epochs_logged[-1] == EPOCHS - 1
    assert len(logs["train_losses"]) == len(logs["train_l_sup"]) == EPOCHS
    # what was logged before the kill is kept as it was
    for key in ("train_losses", "train_l_sup", "train_l_u", "consistency_weight", "lrs"):
        assert logs[key][:start] == killed["logging"][key][:start], key
    # learning rate (poly) and ramp-up weight follow the epoch over the whole run, across the kill
    np.testing.assert_allclose(logs["lrs"], [0.01 * (1 - e / EPOCHS) ** 0.9 for e in range(EPOCHS)], rtol=1e-6)
    np.testing.assert_allclose(logs["consistency_weight"],
                               [C.consistency_weight(e, EPOCHS, 10.0) for e in range(EPOCHS)], rtol=1e-6)
    # the keep-rates' source (class voxel counts) is the one the run started with
    assert torch.equal(final["network_weights"]["class_voxel_counts"],
                       killed["network_weights"]["class_voxel_counts"])
    assert not list(fold.glob("*.tmp*"))


def test_loaded_checkpoint_restores_every_piece_of_skcdf_state(trainer_factory, tmp_path):
    """In process: after load_checkpoint the trainer continues with the same EMA decoder, optimiser momentum,
    epoch, learning rate, ramp-up weight, annealed keep-rates and class keep-rates."""
    trainer = trainer_factory()
    trainer.on_train_start()
    try:
        trainer.on_train_epoch_start()
        for _ in range(2):
            trainer.train_step(next(trainer.dataloader_train))
        trainer.current_epoch = 3  # the checkpoint at the end of epoch 3 continues with epoch 4
        trainer.save_checkpoint(str(tmp_path / "ckpt.pth"))
        trainer.current_epoch = 4
        expected = {"optimizer": trainer.optimizer.state_dict(), "lam": trainer._consistency_weight(),
                    "rates": trainer.class_keep_rates.clone(),
                    "annealed": C.annealed_keep_rates(trainer.class_keep_rates, 4, trainer.num_epochs),
                    "net": {k: v.clone() for k, v in trainer.network.state_dict().items()}}
    finally:
        trainer.on_train_end()
    resumed = trainer_factory()
    resumed.load_checkpoint(str(tmp_path / "ckpt.pth"))
    resumed.on_train_start()
    try:
        assert resumed.current_epoch == 4 and resumed._consistency_weight() == expected["lam"]
        assert torch.equal(resumed.class_keep_rates, expected["rates"])
        assert torch.equal(C.annealed_keep_rates(resumed.class_keep_rates, 4, resumed.num_epochs),
                           expected["annealed"])
        for key, value in resumed.network.state_dict().items():  # D_u (EMA) included
            assert torch.equal(value, expected["net"][key]), key
        momentum = [s["momentum_buffer"] for s in resumed.optimizer.state_dict()["state"].values()]
        expected_momentum = [s["momentum_buffer"] for s in expected["optimizer"]["state"].values()]
        assert len(momentum) == len(expected_momentum) > 0
        assert all(torch.equal(a, b) for a, b in zip(momentum, expected_momentum))
        resumed.on_train_epoch_start()
        assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(0.01 * (1 - 4 / resumed.num_epochs) ** 0.9)
        assert np.isfinite(resumed.train_step(next(resumed.dataloader_train))["loss"])
    finally:
        resumed.on_train_end()


def test_checkpoint_write_is_atomic(trainer_factory, tmp_path, monkeypatch):
    """A crash while writing leaves the previous checkpoint untouched and no partial file behind."""
    trainer = trainer_factory()
    trainer.initialize()
    folder = tmp_path / "checkpoints"
    folder.mkdir()
    target = folder / "checkpoint_latest.pth"
    trainer.save_checkpoint(str(target))
    before = target.read_bytes()

    def crash(obj, f, *args, **kwargs):
        Path(f).write_bytes(b"partial")
        raise OSError("disk full (simulated)")

    monkeypatch.setattr(torch, "save", crash)
    trainer.current_epoch = 5
    with pytest.raises(OSError, match="simulated"):
        trainer.save_checkpoint(str(target))
    assert target.read_bytes() == before and sorted(p.name for p in folder.iterdir()) == [target.name]
