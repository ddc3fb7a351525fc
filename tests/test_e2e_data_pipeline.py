"""End to end through the real console commands, as a user runs them (README main job, tiny dataset)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from conftest import env_for, run_cli

DATASET = "952"


def test_console_commands_end_to_end(tmp_path, monkeypatch):
    env = env_for(tmp_path)
    run_cli(["skcdf_make_phantom", "-d", DATASET, "-n", "E2E", "--num-train", "5", "--num-test", "1",
             "--num-unlabeled", "2", "--shape", "24", "48", "48", "--spacing", "10", "7.2", "7.2"], env)
    raw = Path(env["nnUNet_raw"]) / "Dataset952_E2E"
    assert len(list((raw / "imagesTr").glob("*_0000.nii.gz"))) == 5
    assert len(list((raw / "imagesUnlabeled").glob("*_0000.nii.gz"))) == 2
    assert len(list((raw / "labelsTs").glob("*.nii.gz"))) == 1

    run_cli(["nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "3d_fullres", "-np", "1", "-npfp", "1",
             "--verify_dataset_integrity"], env)
    split = run_cli(["skcdf_split", "-d", DATASET, "--labeled", "2", "--val", "1", "--add-unlabeled-images",
                     "--folds", "2", "--fold-mode", "resample"], env)
    assert "splits_final.json" in split.stdout
    run_cli(["skcdf_preprocess_unlabeled", "-d", DATASET, "-c", "3d_fullres", "-np", "2"], env)
    again = run_cli(["skcdf_preprocess_unlabeled", "-d", DATASET, "-c", "3d_fullres", "-np", "2"], env)
    assert "2 already done, 0 to preprocess" in again.stdout

    pre = Path(env["nnUNet_preprocessed"]) / "Dataset952_E2E"
    splits = json.loads((pre / "splits_final.json").read_text())
    assert len(splits) == 2
    for fold in splits:
        assert len(fold["train"]) == 2 and len(fold["val"]) == 1
        assert len(fold["unlabeled"]) == 2 + 2  # 2 hidden-label training cases + 2 imagesUnlabeled
        assert not set(fold["train"]) & set(fold["unlabeled"])
    assert splits[0]["val"] == splits[1]["val"]

    # the trainer-side consumers: nnU-Net's own split reader and our unlabelled stream
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer
    from nnunetv2_skcdf.training.dataloading.unlabeled_loader import get_unlabeled_dataloader

    plans = json.loads((pre / "nnUNetPlans.json").read_text())
    plans["continue_training"] = False  # nnU-Net 2.8 run_training sets this key before building a trainer
    trainer = nnUNetTrainer(plans, "3d_fullres", 1, json.loads((pre / "dataset.json").read_text()),
                            device=torch.device("cpu"))
    tr_keys, val_keys = trainer.do_split()
    assert tr_keys == splits[1]["train"] and val_keys == splits[1]["val"]
    stream = get_unlabeled_dataloader(trainer, splits[1]["unlabeled"], batch_size=2, num_processes=0)
    batch = next(stream)
    assert tuple(batch["data"].shape) == (2, 1, *trainer.configuration_manager.patch_size)
    assert np.isfinite(batch["data"].numpy()).all() and set(batch["keys"]) <= set(splits[1]["unlabeled"])
