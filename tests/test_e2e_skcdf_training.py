"""End to end through the stock nnU-Net console commands with SKCDFTrainer (tiny CPU run): plan, split, train,
validate again (--val), predict, evaluate, find_best_configuration, export_model_to_zip, and a model folder of
the pre-0.2 trainer name predicting the same labels."""
from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from conftest import env_for, run_cli
from nnunetv2_skcdf.training.nnUNetTrainer.trainer_path import trainer_folder

DATASET, NAME, CONFIG, TRAINER = "954", "Dataset954_E2ETrain", "3d_cpu", "SKCDFTrainer_cpuTest"


def test_plan_split_train_predict_evaluate(tmp_path):
    env = {**env_for(tmp_path), "nnUNet_extTrainer": trainer_folder(), "nnUNet_compile": "false"}
    # 0 augmentation workers is as fast as 2 for tiny 3D patches on 2 cores; set only for training, because
    # nnU-Net's planner crashes with nnUNet_n_proc_DA=0 (torch.set_num_threads(0))
    train_env = {**env, "nnUNet_n_proc_DA": "0"}
    run_cli(["skcdf_make_phantom", "-d", DATASET, "-n", "E2ETrain", "--num-train", "6", "--num-test", "2",
             "--num-unlabeled", "2", "--shape", "24", "48", "48", "--spacing", "10", "7.2", "7.2", "--no-progress"], env)
    run_cli(["nnUNetv2_plan_and_preprocess", "-d", DATASET, "-c", "3d_fullres", "-np", "1", "-npfp", "1"], env)
    # the whole 24x48x48 image as patch, 4 stages of 16..64 features: liver is learnt in 400 iterations (~5 min)
    run_cli(["skcdf_add_cpu_config", "-d", DATASET, "--stages", "4", "--features", "16", "64"], env)
    run_cli(["skcdf_split", "-d", DATASET, "--labeled", "3", "--val", "1", "--add-unlabeled-images"], env)
    run_cli(["skcdf_preprocess_unlabeled", "-d", DATASET, "-c", CONFIG, "--quiet"], env)

    train = run_cli(["nnUNetv2_train", DATASET, CONFIG, "0", "-tr", TRAINER, "-device", "cpu"], train_env,
                    timeout=1200)
    results = Path(env["nnUNet_results"]) / NAME / f"{TRAINER}__nnUNetPlans__{CONFIG}"
    fold = results / "fold_0"
    assert (fold / "checkpoint_final.pth").is_file() and (fold / "progress.png").is_file()
    log = next(fold.glob("training_log_*.txt")).read_text()
    assert "SKCDF class keep-rates" in log and "L_sup" in log and "pseudo-label class fractions" in log
    checkpoint = torch.load(fold / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    assert checkpoint["trainer_name"] == TRAINER
    assert int(checkpoint["network_weights"]["class_voxel_counts"].sum()) > 0
    logging = checkpoint["logging"]
    assert len(logging["train_l_sup"]) == len(logging["train_l_u"]) == len(logging["consistency_weight"]) == 8
    assert logging["consistency_weight"][0] < logging["consistency_weight"][-1]
    assert (fold / "validation" / "summary.json").is_file(), train.stdout[-2000:]

    raw = Path(env["nnUNet_raw"]) / NAME
    pred = tmp_path / "pred"
    run_cli(["nnUNetv2_predict", "-i", str(raw / "imagesTs"), "-o", str(pred), "-d", DATASET, "-c", CONFIG, "-tr",
             TRAINER, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    for image in sorted((raw / "imagesTs").glob("*_0000.nii.gz")):
        case = image.name[: -len("_0000.nii.gz")]
        p, ref = sitk.ReadImage(str(pred / f"{case}.nii.gz")), sitk.ReadImage(str(image))
        assert p.GetSize() == ref.GetSize() and np.allclose(p.GetSpacing(), ref.GetSpacing())
        assert np.allclose(p.GetOrigin(), ref.GetOrigin()) and np.allclose(p.GetDirection(), ref.GetDirection())
        assert set(np.unique(sitk.GetArrayFromImage(p))) <= set(range(14))

    pre = Path(env["nnUNet_preprocessed"]) / NAME
    run_cli(["nnUNetv2_evaluate_folder", str(raw / "labelsTs"), str(pred), "-djfile", str(pre / "dataset.json"),
             "-pfile", str(pre / "nnUNetPlans.json"), "-np", "1"], env)
    summary = json.loads((pred / "summary.json").read_text())
    liver = summary["mean"]["6"]["Dice"]
    assert liver > 0.5, f"the largest organ (liver) was not learnt: Dice {liver:.3f}"
    _other_stock_commands(env, results, pred, tmp_path)


def _other_stock_commands(env: dict, results: Path, pred: Path, tmp_path: Path) -> None:
    """Every stock command that takes a trainer name: --val, find_best_configuration, export_model_to_zip, and
    the old name of a model folder trained before 0.2 (nnUNetTrainerSKCDF_*)."""
    validation = results / "fold_0" / "validation" / "summary.json"
    before = validation.stat().st_mtime_ns
    run_cli(["nnUNetv2_train", DATASET, CONFIG, "0", "-tr", TRAINER, "-device", "cpu", "--val"], env)
    assert validation.stat().st_mtime_ns > before

    run_cli(["nnUNetv2_find_best_configuration", DATASET, "-c", CONFIG, "-tr", TRAINER, "-f", "0", "-np", "1"], env)
    instructions = (results.parent / "inference_instructions.txt").read_text()
    assert f"-tr {TRAINER}" in instructions and f"-c {CONFIG}" in instructions

    archive = tmp_path / "model.zip"
    run_cli(["nnUNetv2_export_model_to_zip", "-d", DATASET, "-o", str(archive), "-c", CONFIG, "-tr", TRAINER,
             "-f", "0"], env)
    with zipfile.ZipFile(archive) as z:
        assert f"{NAME}/{results.name}/fold_0/checkpoint_final.pth" in z.namelist()

    # a model folder as the previous release wrote it: old folder name, old trainer_name in the checkpoint
    old_trainer = TRAINER.replace("SKCDFTrainer", "nnUNetTrainerSKCDF")
    old = results.parent / results.name.replace(TRAINER, old_trainer)
    shutil.copytree(results, old)
    checkpoint = torch.load(old / "fold_0" / "checkpoint_final.pth", map_location="cpu", weights_only=False)
    checkpoint["trainer_name"] = old_trainer
    torch.save(checkpoint, old / "fold_0" / "checkpoint_final.pth")
    case_images = sorted((Path(env["nnUNet_raw"]) / NAME / "imagesTs").glob("*_0000.nii.gz"))[:1]
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(case_images[0], single)
    old_pred = tmp_path / "pred_old_name"
    run_cli(["nnUNetv2_predict", "-i", str(single), "-o", str(old_pred), "-d", DATASET, "-c", CONFIG, "-tr",
             old_trainer, "-f", "0", "-device", "cpu", "--disable_tta", "-npp", "1", "-nps", "1"], env)
    case = case_images[0].name[: -len("_0000.nii.gz")] + ".nii.gz"
    assert np.array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(old_pred / case))),
                          sitk.GetArrayFromImage(sitk.ReadImage(str(pred / case))))
