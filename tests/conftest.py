"""Shared fixtures: a tiny phantom dataset planned and preprocessed once per test session.

nnU-Net reads nnUNet_raw / nnUNet_preprocessed / nnUNet_results lazily from the environment, so tests
point them at temporary folders. Tests that modify files get their own copy (``phantom_workspace``).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

DATASET_ID = 951
DATASET_NAME = f"Dataset{DATASET_ID:03d}_TinyPhantom"
ENV_VARS = ("nnUNet_raw", "nnUNet_preprocessed", "nnUNet_results")
#: small enough for seconds of preprocessing, large enough for nnU-Net to plan a real 3D U-Net
TINY = dict(num_train=6, num_test=2, num_unlabeled=3, shape=(24, 48, 48), spacing=(10.0, 7.2, 7.2))


def env_for(root: Path) -> dict:
    env = {var: str(root / var) for var in ENV_VARS}
    for path in env.values():
        os.makedirs(path, exist_ok=True)
    return env


def run_cli(args, env_extra: dict, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run a console script the way a user does (own process, environment variables)."""
    env = {**os.environ, **env_extra, "nnUNet_def_n_proc": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))} failed ({result.returncode}):\n"
                             f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="session")
def planned_phantom(tmp_path_factory) -> dict:
    """Tiny phantom -> nnUNetv2_plan_and_preprocess (2d + 3d_fullres) -> skcdf_preprocess_unlabeled.

    Returns {'root', 'env', 'raw', 'preprocessed'}; treat it as read-only (copy it to modify).
    """
    from nnunetv2_skcdf.dataset_conversion.phantom import make_phantom_dataset

    root = tmp_path_factory.mktemp("phantom")
    env = env_for(root)
    make_phantom_dataset(output_root=env["nnUNet_raw"], dataset_id=DATASET_ID, name="TinyPhantom", seed=0, **TINY)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1", "-npfp",
             "1", "--verify_dataset_integrity"], env)
    run_cli(["skcdf_preprocess_unlabeled", "-d", str(DATASET_ID), "-c", "2d", "3d_fullres", "-np", "1", "--quiet"],
            env)
    return {"root": root, "env": env, "raw": Path(env["nnUNet_raw"]) / DATASET_NAME,
            "preprocessed": Path(env["nnUNet_preprocessed"]) / DATASET_NAME}


@pytest.fixture
def phantom_workspace(planned_phantom, tmp_path, monkeypatch) -> dict:
    """A private, writable copy of the planned phantom with the env vars pointing at it."""
    env = env_for(tmp_path)
    for var in ("nnUNet_raw", "nnUNet_preprocessed"):
        shutil.copytree(Path(planned_phantom["env"][var]) / DATASET_NAME, Path(env[var]) / DATASET_NAME)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    return {"root": tmp_path, "env": env, "raw": Path(env["nnUNet_raw"]) / DATASET_NAME,
            "preprocessed": Path(env["nnUNet_preprocessed"]) / DATASET_NAME}


@pytest.fixture
def tiny_training(phantom_workspace, monkeypatch) -> dict:
    """The phantom copy made ready for in-process SKCDF training: a split with 2 labelled cases, 1 validation
    case and the unlabelled images, and a tiny 3D configuration '3d_tiny'. Returns phantom_workspace."""
    from nnunetv2_skcdf.experiment_planning.cpu_configuration import add_cpu_configuration
    from nnunetv2_skcdf.splits.semi_supervised_splits import make_semi_supervised_splits

    monkeypatch.setenv("nnUNet_n_proc_DA", "0")
    monkeypatch.setenv("nnUNet_compile", "false")
    make_semi_supervised_splits(DATASET_ID, labeled=2, val=1, add_unlabeled_images=True, overwrite=True)
    add_cpu_configuration(DATASET_ID, name="3d_tiny", patch_size=[8, 32, 32], n_stages=3, base_features=8,
                          max_features=32)
    return phantom_workspace


@pytest.fixture
def trainer_factory(tiny_training):
    """make(cls) -> an SKCDF trainer (CPU, no compile, in-process augmentation) on '3d_tiny' (tiny_training)."""
    import torch

    from nnunetv2_skcdf.training.nnUNetTrainer.SKCDFTrainer import SKCDFTrainer

    pre = tiny_training["preprocessed"]

    def make(cls=SKCDFTrainer):
        plans = json.loads((pre / "nnUNetPlans.json").read_text())
        plans["continue_training"] = False
        return cls(plans, "3d_tiny", 0, json.loads((pre / "dataset.json").read_text()), device=torch.device("cpu"))

    return make
