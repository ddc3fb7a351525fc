"""One round of filtered pseudo-labelling with stock nnU-Net: the practitioner's baseline to compare SKCDF with.

What nnU-Net users do with unlabelled images today (nnU-Net issues #2233, #2338; FLARE22's best teams):
train on the labelled cases, predict the unlabelled ones, keep the cases whose predictions agree, retrain
on labelled + kept pseudo-labelled cases, repeat. One call of ``skcdf_pseudolabel`` is one round:

1. **Teachers**: trained model folders (``-m``, with folds ``-f``) of the source dataset ``-d``, or of an
   earlier round's student dataset. Each must have the source's labels and plans and the same labelled /
   validation cases (fold ``--split-fold`` of the source's ``splits_final.json``), else refused.
2. **Predict** the split's ``unlabeled`` cases (imagesUnlabeled images and hidden-label training cases:
   their images only, a hidden label is never opened) with nnU-Net's own predictor and the teachers' plans.
   Several teachers: each predicts with mirroring and the pseudo label is the argmax of the mean
   probability. One teacher: the mirror variants are predicted one by one and averaged (exactly nnU-Net's
   mirroring), so that they can vote. Probabilities live for one case at a time (a running sum).
3. **Score** each case (``agreement.py``): mean pairwise Dice between the members per organ, and with
   ``--previous`` the Dice against the previous round's pseudo label; the case score is the smaller.
4. **Keep** the cases with score >= ``--threshold`` (default 0.90), or the best ``--keep`` fraction.
5. **Write the student dataset** ``nnUNet_raw/Dataset<out>_<name>``: imagesTr/labelsTr with the labelled
   and validation cases (real labels, copied) and the kept cases (pseudo labels); every pseudo label of
   the round in ``pseudo_labels/``; the record ``pseudolabel_round.json`` (per case: origin, round,
   teachers, scores per organ). Then its ``nnUNet_preprocessed`` folder: the teachers' plans (identical
   plans: same spacing, patch, normalisation), ``splits_final.json`` with train = labelled + kept and the
   same validation cases, preprocessed with nnU-Net's own preprocessor.
6. With ``--student-unlabeled`` (for an SKCDF student): the cases not kept go to the student as unlabelled
   images (their images in ``imagesUnlabeled/``, the split's ``unlabeled`` list, preprocessed with
   ``skcdf_preprocess_unlabeled``'s code), so that ``nnUNetv2_train <out> ... -tr SKCDFTrainer`` learns from
   the kept cases' pseudo labels and, online, from the images the filter dropped. A stock nnU-Net student
   ignores them.

Why a new dataset id and not a split of the source: the pseudo labels need a ``labelsTr`` file, and the
source's ``labelsTr`` holds the hidden real labels of the benchmark's hidden-label cases; writing there
would overwrite them (and let a later round read them). The source dataset is never written.

The student is trained with the stock command: ``nnUNetv2_train <out> <configuration> 0``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from dataclasses import dataclass
from itertools import combinations
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from nnunetv2_skcdf.pseudo_labelling.agreement import (
    DEFAULT_THRESHOLD,
    case_score,
    dice_per_label,
    mean_or_none,
    member_agreement,
    select_kept,
)
from nnunetv2_skcdf.utilities.dataset_files import (
    UNLABELED_IMAGES_FOLDER,
    SKCDFInputError,
    _env_folder,
    check_dataset_ids_free,
    dataset_name,
    datasets_with_id,
    exit_on_input_error,
    list_unlabeled_cases,
    load_dataset_json,
    training_files,
)
from nnunetv2_skcdf.utilities.io import atomic_output, atomic_save_json, new_staging_folder, read_json, swap_in_folder

RECORD = "pseudolabel_round.json"
PSEUDO_FOLDER = "pseudo_labels"


@dataclass
class Teacher:
    """One trained model: a model folder and one fold of it."""

    folder: str
    fold: str
    trainer: str
    plans_name: str
    configuration: str
    plans: dict
    dataset_json: dict

    @property
    def dataset(self) -> str:
        return self.plans["dataset_name"]

    def describe(self) -> dict:
        return {"folder": self.folder, "fold": self.fold, "trainer": self.trainer, "plans": self.plans_name,
                "configuration": self.configuration, "dataset": self.dataset}


def load_teachers(folders: Sequence[str], folds: Sequence[str], checkpoint: str) -> List[Teacher]:
    """Every (model folder, fold) pair; the folder name is nnU-Net's ``<trainer>__<plans>__<configuration>``."""
    teachers = []
    for folder in folders:
        folder = os.path.abspath(folder)
        parts = os.path.basename(folder.rstrip("/")).split("__")
        if len(parts) != 3:
            raise SKCDFInputError(f"{folder}: not an nnU-Net model folder (its name must be "
                                  f"<trainer>__<plans>__<configuration>, e.g. nnUNetTrainer__nnUNetPlans__3d_fullres).")
        fix = ("Give the model folder of a finished nnU-Net training (nnUNet_results/<dataset>/"
               "<trainer>__<plans>__<configuration>).")
        plans = read_json(os.path.join(folder, "plans.json"), fix, "every nnU-Net model folder has one")
        dj = read_json(os.path.join(folder, "dataset.json"), fix, "every nnU-Net model folder has one")
        for fold in folds:
            ckpt = os.path.join(folder, f"fold_{fold}", checkpoint)
            if not os.path.isfile(ckpt):
                raise SKCDFInputError(f"{ckpt}: no such checkpoint. Train fold {fold} to the end (or pick another "
                                      f"checkpoint with -chk, e.g. checkpoint_best.pth).")
            teachers.append(Teacher(folder, str(fold), parts[0], parts[1], parts[2], plans, dj))
    return teachers


def derived_datasets(source: str) -> Dict[str, dict]:
    """Pseudo-label datasets made from ``source`` (name -> their record), found in nnUNet_raw."""
    raw = _env_folder("nnUNet_raw")
    out = {}
    for name in sorted(os.listdir(raw)):
        path = os.path.join(raw, name, RECORD)
        if os.path.isfile(path):
            record = read_json(path, f"It is the record of the pseudo-label round {name}: repair it, or move that "
                                       f"folder out of nnUNet_raw.")
            if record.get("source_dataset") == source:
                out[name] = record
    return out


def _teacher_plans(plans: dict, configuration: str, where: str) -> dict:
    """What a teacher's predictions and the student's preprocessing depend on: the plans' global keys (name
    aside) and ``configuration`` resolved through ``inherits_from``. Other configurations may be added later (e.g.
    ``skcdf_add_cpu_config``) without making a trained teacher a stranger to its dataset."""
    from nnunetv2_skcdf.experiment_planning.cpu_configuration import resolved_configuration

    rest = {k: v for k, v in plans.items() if k not in ("dataset_name", "configurations")}
    return {**rest, "configuration": resolved_configuration(plans, configuration, where)}


def check_teachers(teachers: Sequence[Teacher], source: str, source_json: dict, split_fold: int,
                   roles: Dict[str, List[str]], splits: list) -> None:
    """Refuse teachers trained on another dataset, other labels, other plans or other labelled cases, and teachers
    whose trainer class nnU-Net's lookup does not give (before any checkpoint is read)."""
    derived = derived_datasets(source)
    pre = os.path.join(_env_folder("nnUNet_preprocessed"), source)
    first = teachers[0]
    for t in teachers:
        where = f"{t.folder} (fold {t.fold})"
        if not t.fold.isdigit():
            raise SKCDFInputError(f"{where}: fold {t.fold!r} trained on every case with a label file, the split's "
                                  f"validation cases and (in a semi-supervised split) the hidden-label cases "
                                  f"among them; its pseudo labels would leak those labels. Give numbered folds "
                                  f"of the split (-f 0 1 2).")
        if t.dataset != source and t.dataset not in derived:
            raise SKCDFInputError(f"{where} was trained on {t.dataset}, not on {source} or a pseudo-label round made "
                                  f"from it. Give models of {source} (-d) or of its rounds.")
        if t.dataset_json.get("labels") != source_json.get("labels"):
            raise SKCDFInputError(f"{where}: its labels {t.dataset_json.get('labels')} differ from {source}'s "
                                  f"dataset.json; a model of other labels cannot pseudo-label this dataset.")
        if (t.plans_name, t.configuration) != (first.plans_name, first.configuration):
            raise SKCDFInputError(f"{where} uses {t.plans_name}/{t.configuration}, {first.folder} "
                                  f"{first.plans_name}/{first.configuration}: give teachers of one plans and "
                                  f"configuration (the student is preprocessed with them).")
        source_plans_file = os.path.join(pre, f"{t.plans_name}.json")
        source_plans = read_json(source_plans_file, f"Plan and preprocess {source} with the teachers' plans "
                                                   f"({t.plans_name}) first.", f"the plans {t.plans_name} of {source}")
        if t.configuration not in source_plans.get("configurations", {}):
            raise SKCDFInputError(f"{where}: its configuration {t.configuration!r} is not in {source_plans_file}, so "
                                  f"the teacher cannot be checked against the source's plans. Add it again (e.g. "
                                  f"skcdf_add_cpu_config for 3d_cpu) or give teachers of a configuration it has.")
        if (_teacher_plans(t.plans, t.configuration, os.path.join(t.folder, "plans.json"))
                != _teacher_plans(source_plans, t.configuration, source_plans_file)):
            raise SKCDFInputError(f"{where} was trained on other plans than {source_plans_file} (the dataset was "
                                  f"planned again since, or the model comes from elsewhere). Retrain it, or use "
                                  f"the plans it was trained with.")
        if t.dataset == source:
            fold = _fold_entry(splits, int(t.fold), os.path.join(pre, "splits_final.json"))
            if set(fold["train"]) != set(roles["train"]) or set(fold["val"]) != set(roles["val"]):
                raise SKCDFInputError(f"{where} was trained on other labelled/validation cases than fold {split_fold}"
                                      f" of {pre}/splits_final.json; its pseudo labels would leak other labels. "
                                      f"Use teachers of that split (skcdf_split --fold-mode repeat gives several "
                                      f"runs of one split) or pass --split-fold {t.fold}.")
        elif derived[t.dataset].get("source_fold") != split_fold:
            raise SKCDFInputError(f"{where}: its round {t.dataset} was made from fold "
                                  f"{derived[t.dataset].get('source_fold')} of {source}, not {split_fold}.")
    for trainer in dict.fromkeys(t.trainer for t in teachers):  # before any checkpoint is read or case predicted
        problem = trainer_lookup_problem(trainer)
        if problem:
            folder = next(t.folder for t in teachers if t.trainer == trainer)
            raise SKCDFInputError(
                f"{folder}: nnU-Net's trainer lookup does not give the trainer class {trainer} the folder is named for, "
                f"which the predictor builds the network with ({problem}). For SKCDF's trainers: export "
                f"nnUNet_extTrainer=$(skcdf_trainer_path), as for "
                f"nnUNetv2_predict; for a trainer of your own, add the folder that defines it to nnUNet_extTrainer "
                f"(now: {os.environ.get('nnUNet_extTrainer') or 'not set'}).")


def trainer_lookup_problem(trainer: str) -> Optional[str]:
    """Why nnU-Net's trainer lookup (the one its predictor uses: nnunetv2's trainers, then ``nnUNet_extTrainer``)
    does not give ``trainer`` (not found, or found but not an ``nnUNetTrainer``), or None when it does. The name is
    the model folder's (``<trainer>__<plans>__<configuration>``), which a folder trained by nnU-Net shares with its
    checkpoints."""
    import contextlib
    import io

    from nnunetv2.utilities.find_objects import recursive_find_trainer_class_by_name

    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the lookup prints each folder it searches
            recursive_find_trainer_class_by_name(trainer)
    except RuntimeError as e:
        return str(e).split(". ")[0]
    except AssertionError:  # nnU-Net asserts the class it found inherits from nnUNetTrainer
        return f"a class {trainer} was found, but it is not an nnUNetTrainer"
    return None


def check_single_teacher(teacher: Teacher, variants: int, previous_folder: Optional[str]) -> None:
    """Refuse one teacher that cannot vote with itself: trained without mirroring, it gives one member per case,
    every organ agrees with itself (score 1) and every case would be kept unfiltered. With ``--previous`` the
    agreement with the previous round still scores the cases, so that is allowed."""
    if variants < 2 and previous_folder is None:
        raise SKCDFInputError(
            f"{teacher.folder} (fold {teacher.fold}) is the only teacher and its trainer disallows mirroring at "
            f"inference, so each case gets a single prediction and no agreement can be measured: every case would "
            f"be kept unfiltered. Give several teachers (-f 0 1 2, or several -m model folders), a teacher trained "
            f"with mirroring, or --previous with an earlier round to score against.")


def _fold_entry(splits: list, fold: int, path: str) -> dict:
    if not 0 <= fold < len(splits):
        raise SKCDFInputError(f"{path} has {len(splits)} folds; fold {fold} does not exist.")
    entry = splits[fold]
    if not isinstance(entry, dict) or "unlabeled" not in entry:
        raise SKCDFInputError(f"{path}: fold {fold} has no 'unlabeled' list. Make the split with skcdf_split "
                              f"(e.g. skcdf_split -d D --labeled 0.2 --add-unlabeled-images).")
    return entry


def check_split_cases(roles: dict, training: dict, split_fold: int, splits_path: str) -> None:
    """Every labelled and validation case of the fold has its image and label in the source (``training``:
    ``training_files``): checked before any checkpoint is read, so that a split older than the dataset fails at
    once, not after every case has been predicted."""
    for role, what in (("train", "labelled"), ("val", "validation")):
        for cid in roles[role]:
            if cid not in training:
                raise SKCDFInputError(f"Case {cid!r} of fold {split_fold}'s {role!r} list in {splits_path} has no "
                                      f"image in the source's imagesTr: the split is older than the dataset. Make "
                                      f"the split again (skcdf_split) or restore the case.")
            if not os.path.isfile(training[cid]["label"]):
                raise SKCDFInputError(f"{training[cid]['label']}: the label of {what} case {cid!r} (fold {split_fold}"
                                      f" of {splits_path}) is missing; the student needs it. Restore it, or make "
                                      f"the split again (skcdf_split).")


def case_images(raw: str, dataset_json: dict, training: dict, ids: Sequence[str]) -> Dict[str, List[str]]:
    """Image files of each id: imagesTr (images only: a hidden label is never opened; ``training`` is
    ``training_files``) or imagesUnlabeled."""
    unlabeled = list_unlabeled_cases(raw, dataset_json)
    out = {}
    for cid in ids:
        if cid in unlabeled:
            out[cid] = list(unlabeled[cid])
        elif cid in training:
            out[cid] = list(training[cid]["images"])
        else:
            raise SKCDFInputError(f"Case {cid!r} of the split's 'unlabeled' list has no image in {raw}/imagesTr or "
                                  f"imagesUnlabeled. Make the split again (skcdf_split) or restore the image.")
    return out


def _check_images_complete(images: Dict[str, List[str]]) -> None:
    """Every image to predict is read to its end once before any prediction: an empty or truncated file (which
    SimpleITK would read silently, filling the missing voxels with garbage) fails first, naming it, not hours in."""
    from nnunetv2_skcdf.preprocessing.image_checks import check_file_complete

    for cid, files in sorted(images.items()):
        for f in files:
            check_file_complete(f, fix=f"export the image of case {cid!r} again, or leave the case out of the split's "
                                       f"'unlabeled' list (skcdf_split)")


def _predictor(teacher: Teacher, mirroring: bool, device, checkpoint: str):
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

    predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=mirroring,
                                perform_everything_on_device=device.type == "cuda", device=device, verbose=False,
                                verbose_preprocessing=False, allow_tqdm=False)
    predictor.initialize_from_trained_model_folder(teacher.folder, (teacher.fold,), checkpoint)
    return predictor


def _mirror_variants(predictor) -> List[Tuple[int, ...]]:
    """Raw-image axes of every mirror variant nnU-Net's mirroring averages (the empty tuple = no flip).

    The allowed axes are the patch's: for a 2D configuration axis 0 of the patch is axis 1 of the (transposed)
    volume, whose first axis is the one nnU-Net slices along."""
    allowed = predictor.allowed_mirroring_axes or ()
    forward = predictor.plans_manager.transpose_forward
    offset = len(forward) - len(predictor.configuration_manager.patch_size)  # 1 for 2D configurations
    raw_axes = sorted(forward[a + offset] + 1 for a in allowed)  # +1: channel axis first
    return [c for r in range(len(raw_axes) + 1) for c in combinations(raw_axes, r)]


def predict_members(predictors: list, image: np.ndarray, props: dict) -> Tuple[np.ndarray, List[np.ndarray]]:
    """(pseudo label, member segmentations) of one case, in the image's geometry.

    Several predictors: each (with mirroring) is a member. One predictor (mirroring off): each mirror variant
    is a member. The pseudo label is the argmax of the mean probability over members."""
    total, members = None, []
    if len(predictors) > 1:
        jobs = [(p, ()) for p in predictors]
    else:
        jobs = [(predictors[0], axes) for axes in _mirror_variants(predictors[0])]
    for predictor, axes in jobs:
        flipped = np.flip(image, axes).copy() if axes else image
        _, probs = predictor.predict_single_npy_array(flipped, props, None, None, True)
        probs = np.flip(probs, axes) if axes else probs
        members.append(np.argmax(probs, 0).astype(np.uint8))
        total = probs.astype(np.float32) if total is None else total + probs
    return np.argmax(total, 0).astype(np.uint8), members


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _check_output(out_id: int, out_name: str, source: str, overwrite: bool) -> str:
    if not 1 <= out_id <= 999:
        raise SKCDFInputError(f"--out-dataset {out_id}: nnU-Net ids are 1..999.")
    raw = _env_folder("nnUNet_raw")
    target = f"Dataset{out_id:03d}_{out_name}"
    if target == source or source.startswith(f"Dataset{out_id:03d}_"):
        raise SKCDFInputError(f"--out-dataset {out_id} is the source dataset {source}: the round never writes into "
                              f"the source (its labelsTr holds the hidden labels). Pick a free id.")
    others = datasets_with_id(raw, out_id, target)
    if others:
        raise SKCDFInputError(f"--out-dataset {out_id} is taken by {raw}/{others[0]}; pick a free id.")
    check_dataset_ids_free(out_id, target)
    path = os.path.join(raw, target)
    pre_path = os.path.join(_env_folder("nnUNet_preprocessed"), target)
    if os.path.exists(pre_path) and not os.path.isfile(os.path.join(path, RECORD)):
        raise SKCDFInputError(f"{pre_path} exists but {path} is not a pseudo-label round: refusing to replace it. "
                              f"Remove that folder or pick another --out-dataset.")
    if os.path.exists(path):
        record = os.path.join(path, RECORD)
        if not overwrite:
            raise SKCDFInputError(f"{path} exists. Pass --overwrite to replace this pseudo-label round, or pick "
                                  f"another --out-dataset.")
        damaged = f"{path} holds a damaged round record: pick another --out-dataset, or move the folder away."
        if not os.path.isfile(record) or read_json(record, damaged).get("source_dataset") != source:
            raise SKCDFInputError(f"{path} exists and is not a pseudo-label round of {source}: refusing to replace "
                                  f"it even with --overwrite. Pick another --out-dataset.")
    return path


def load_previous(previous: Optional[str], source: str) -> Tuple[Optional[str], int, Optional[dict]]:
    """(folder of the previous round's pseudo labels, this round's number, its record)."""
    if previous is None:
        return None, 1, None
    name = dataset_name(previous)
    folder = os.path.join(_env_folder("nnUNet_raw"), name)
    record = read_json(os.path.join(folder, RECORD), f"--previous {previous} must be a round made by "
                                                    f"skcdf_pseudolabel (its folder holds {RECORD}).")
    if record.get("source_dataset") != source:
        raise SKCDFInputError(f"--previous {name} is a round of {record.get('source_dataset')}, not of {source}.")
    return os.path.join(folder, PSEUDO_FOLDER), int(record["round"]) + 1, record


def run_round(dataset: str, model_folders: Sequence[str], folds: Sequence[str], out_id: int,
              out_name: Optional[str] = None, split_fold: int = 0, previous: Optional[str] = None,
              threshold: float = DEFAULT_THRESHOLD, keep: Optional[float] = None,
              checkpoint: str = "checkpoint_final.pth", device: str = "cuda", student_folds: int = 1,
              num_processes: int = 1, overwrite: bool = False, preprocess: bool = True,
              student_unlabeled: bool = False, log=print) -> str:
    """One pseudo-label round (module docstring); returns the student dataset's raw folder."""
    import torch

    t0 = time.time()
    if keep is not None and not 0 < keep <= 1:
        raise SKCDFInputError(f"--keep {keep}: give a fraction 0 < keep <= 1.")
    if not 0 <= threshold <= 1:
        raise SKCDFInputError(f"--threshold {threshold}: give a Dice value in [0, 1].")
    if device == "cuda" and not torch.cuda.is_available():
        raise SKCDFInputError("-device cuda (the default, as for nnUNetv2_predict): PyTorch sees no CUDA device "
                              "here (torch.cuda.is_available() is False). Use -device cpu, or install a CUDA build "
                              "of PyTorch.")
    source = dataset_name(dataset)
    raw = os.path.join(_env_folder("nnUNet_raw"), source)
    pre = os.path.join(_env_folder("nnUNet_preprocessed"), source)
    source_json = load_dataset_json(raw)
    if any(isinstance(v, (list, tuple)) for v in source_json["labels"].values()):
        raise SKCDFInputError(f"{raw}/dataset.json defines regions (labels with lists of values): pseudo labels are "
                              f"one class per voxel, so region-based datasets are not supported. Use a copy of the "
                              f"dataset with one label value per class (nnU-Net's plain label format).")
    splits_path = os.path.join(pre, "splits_final.json")
    splits = read_json(splits_path, "Make the split with skcdf_split first.")
    roles = _fold_entry(splits, split_fold, splits_path)
    out_name = out_name or f"{source.split('_', 1)[1]}PseudoR"
    target = _check_output(int(out_id), out_name, source, overwrite)
    previous_folder, round_no, _ = load_previous(previous, source)
    teachers = load_teachers(model_folders, folds, checkpoint)
    check_teachers(teachers, source, source_json, split_fold, roles, splits)
    training = training_files(raw, source_json)
    check_split_cases(roles, training, split_fold, splits_path)
    images = case_images(raw, source_json, training, roles["unlabeled"])
    _check_images_complete(images)
    labels = sorted(int(v) for k, v in source_json["labels"].items() if k != "background" and int(v) > 0)

    dev = torch.device(device)
    predictors = [_predictor(t, len(teachers) > 1, dev, checkpoint) for t in teachers]
    if len(teachers) == 1:
        check_single_teacher(teachers[0], len(_mirror_variants(predictors[0])), previous_folder)
    reader = predictors[0].plans_manager.image_reader_writer_class()
    ending = source_json["file_ending"]
    pre_target = os.path.join(_env_folder("nnUNet_preprocessed"), os.path.basename(target))
    staging, pre_staging = new_staging_folder(target), new_staging_folder(pre_target)
    try:
        os.makedirs(os.path.join(staging, PSEUDO_FOLDER))
        cases, scores = {}, {}
        for i, (cid, files) in enumerate(sorted(images.items())):
            image, props = reader.read_images(files)
            pseudo, members = predict_members(predictors, image, props)
            with atomic_output(os.path.join(staging, PSEUDO_FOLDER, cid + ending)) as tmp:
                reader.write_seg(pseudo, tmp, props)
            agree = member_agreement(members, labels)
            prev_agree = None
            if previous_folder is not None and os.path.isfile(os.path.join(previous_folder, cid + ending)):
                prev, _ = reader.read_seg(os.path.join(previous_folder, cid + ending))
                prev_agree = dice_per_label(pseudo, prev[0], labels)
            member_score = mean_or_none(agree)
            prev_score = mean_or_none(prev_agree) if prev_agree is not None else None
            scores[cid] = case_score(member_score, prev_score)
            cases[cid] = {"origin": "pseudo", "round": round_no, "score": scores[cid], "member_score": member_score,
                          "previous_score": prev_score, "member_agreement": agree, "previous_agreement": prev_agree}
            log(f"[{i + 1}/{len(images)}] {cid}: score {scores[cid]:.3f} (members {member_score}, previous "
                f"{prev_score})")
        kept = select_kept(scores, threshold, keep)
        for cid in cases:
            cases[cid]["kept"] = cid in kept
        rest = sorted(set(images) - set(kept)) if student_unlabeled else []
        _write_student(staging, raw, source_json, training, roles, kept, images, cases, ending, rest)
        record = {
            "round": round_no, "source_dataset": source, "source_fold": split_fold, "previous_round": previous and
            dataset_name(previous), "teachers": [t.describe() for t in teachers],
            "members": "models (each with mirroring)" if len(teachers) > 1 else "mirror variants of one model",
            "threshold": None if keep is not None else threshold, "keep": keep,
            "kept": kept, "labelled": sorted(roles["train"]), "validation": sorted(roles["val"]),
            "student_unlabeled": rest if student_unlabeled else None,
            "organ_mean_agreement": _organ_means(cases), "cases": cases,
            "seconds_prediction": round(time.time() - t0, 1),
        }
        atomic_save_json(record, os.path.join(staging, RECORD))
        _write_preprocessed(pre_staging, os.path.basename(target), os.path.join(staging, "dataset.json"), pre,
                            teachers[0], roles, kept, student_folds, rest if student_unlabeled else None)
        # both folders are complete before either replaces its old version (a round of the same id): an
        # interruption leaves the old round or the new one in each, never a half-written plans or split
        swap_in_folder(staging, target)
        swap_in_folder(pre_staging, pre_target)
    finally:
        for folder in (staging, pre_staging):
            if os.path.isdir(folder):
                shutil.rmtree(folder, ignore_errors=True)
    log(f"kept {len(kept)} of {len(images)} pseudo-labelled cases (round {round_no}): {', '.join(kept) or 'none'}"
        + (f"; the other {len(rest)} go to the student as unlabelled images" if student_unlabeled else ""))
    if student_unlabeled and not rest:
        log("--student-unlabeled: every case was kept, so the student has no unlabelled images and SKCDFTrainer "
            "would refuse it; train a stock nnU-Net student on this round, or keep fewer cases (--threshold, --keep)")
    configuration = teachers[0].configuration
    if preprocess:
        from nnunetv2.experiment_planning.plan_and_preprocess_api import preprocess_dataset

        preprocess_dataset(int(out_id), teachers[0].plans_name, [configuration], [num_processes],
                           show_progress_bar=False)
        if rest:
            from nnunetv2_skcdf.preprocessing.unlabeled import preprocess_unlabeled

            preprocess_unlabeled(int(out_id), [configuration], teachers[0].plans_name, num_processes, verbose=False)
    train = f"nnUNetv2_train {out_id} {configuration} 0 -p {teachers[0].plans_name}"
    log(f"student dataset {target} ready ({time.time() - t0:.0f} s): {train}"
        + (" -tr SKCDFTrainer" if student_unlabeled else "")
        + ("" if preprocess or not rest else
           f" (first: skcdf_preprocess_unlabeled -d {out_id} -c {configuration} -p {teachers[0].plans_name})"))
    return target


def _organ_means(cases: dict) -> Dict[int, float]:
    per: Dict[int, List[float]] = {}
    for rec in cases.values():  # pseudo-labelled cases only: labelled and validation cases have no scores
        for lab, d in rec.get("member_agreement", {}).items():
            per.setdefault(int(lab), []).append(d)
    return {lab: float(np.mean(v)) for lab, v in sorted(per.items())}


def _write_student(staging: str, raw: str, source_json: dict, training: dict, roles: dict, kept: List[str],
                   images: Dict[str, List[str]], cases: dict, ending: str, unlabeled: Sequence[str] = ()) -> None:
    """imagesTr/labelsTr of the student: labelled and validation cases with their real labels (``training``:
    ``training_files``), kept cases with their pseudo labels; ``unlabeled`` cases' images in imagesUnlabeled
    (``--student-unlabeled``: images only, a hidden label is never copied); dataset.json with the source's labels
    and channels."""
    os.makedirs(os.path.join(staging, "imagesTr"))
    os.makedirs(os.path.join(staging, "labelsTr"))
    for origin, ids in (("labelled", roles["train"]), ("validation", roles["val"])):
        for cid in ids:
            for f in training[cid]["images"]:
                _link_or_copy(f, os.path.join(staging, "imagesTr", os.path.basename(f)))
            shutil.copy2(training[cid]["label"], os.path.join(staging, "labelsTr", cid + ending))
            cases[cid] = {"origin": origin}
    for cid in kept:
        for f in images[cid]:
            _link_or_copy(f, os.path.join(staging, "imagesTr", os.path.basename(f)))
        shutil.copy2(os.path.join(staging, PSEUDO_FOLDER, cid + ending), os.path.join(staging, "labelsTr", cid + ending))
    if unlabeled:
        os.makedirs(os.path.join(staging, UNLABELED_IMAGES_FOLDER))
        for cid in unlabeled:
            for f in images[cid]:
                _link_or_copy(f, os.path.join(staging, UNLABELED_IMAGES_FOLDER, os.path.basename(f)))
    dj = {k: v for k, v in source_json.items() if k not in ("dataset", "numTest", "numUnlabeled",
                                                             "unlabeled_images_folder")}
    dj["numTraining"] = len(roles["train"]) + len(roles["val"]) + len(kept)
    if unlabeled:
        dj["numUnlabeled"] = len(unlabeled)
    dj["description"] = (f"Pseudo-label round made by skcdf_pseudolabel from {os.path.basename(raw)}: labelled and "
                         f"validation cases with their labels, {len(kept)} kept pseudo-labelled cases"
                         + (f", the {len(unlabeled)} cases not kept as unlabelled images" if unlabeled else "")
                         + f"; see {RECORD}.")
    atomic_save_json(dj, os.path.join(staging, "dataset.json"))


def _write_preprocessed(pre: str, name: str, dataset_json: str, source_pre: str, teacher: Teacher, roles: dict,
                        kept: List[str], student_folds: int, unlabeled: Optional[Sequence[str]] = None) -> None:
    """The nnUNet_preprocessed folder of the student dataset ``name``, built in ``pre`` (a staging folder): the
    teachers' plans (renamed), the student's ``dataset_json``, the source's fingerprint and a split with the same
    validation cases (``student_folds`` identical folds = that many runs), and with ``unlabeled``
    (``--student-unlabeled``) the unlabelled list an SKCDF student reads."""
    plans = dict(teacher.plans, dataset_name=name)
    atomic_save_json(plans, os.path.join(pre, f"{teacher.plans_name}.json"))
    shutil.copy2(dataset_json, os.path.join(pre, "dataset.json"))
    fingerprint = os.path.join(source_pre, "dataset_fingerprint.json")
    if os.path.isfile(fingerprint):
        shutil.copy2(fingerprint, os.path.join(pre, "dataset_fingerprint.json"))
    fold = {"train": sorted(roles["train"]) + kept, "val": sorted(roles["val"])}
    if unlabeled is not None:
        fold["unlabeled"] = sorted(unlabeled)
    atomic_save_json([fold] * int(student_folds), os.path.join(pre, "splits_final.json"))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="skcdf_pseudolabel",
        description="One round of filtered pseudo-labelling with stock nnU-Net (the baseline to compare SKCDF "
                    "with): predict the split's unlabelled cases with trained models, score how much the models "
                    "(or one model's mirror variants) agree, keep the cases that agree, and write a student "
                    "dataset (labelled + kept pseudo-labelled cases, same validation cases, same plans) for "
                    "nnUNetv2_train.",
        epilog="example (round 1, then round 2 with the round-1 students as teachers):\n"
               "  skcdf_pseudolabel -d 950 -m $nnUNet_results/Dataset950_X/nnUNetTrainer__nnUNetPlans__3d_fullres "
               "-f 0 1 2 --out-dataset 951\n"
               "  nnUNetv2_train 951 3d_fullres 0\n"
               "  skcdf_pseudolabel -d 950 -m $nnUNet_results/Dataset951_XPseudoR/nnUNetTrainer__nnUNetPlans__"
               "3d_fullres -f 0 --out-dataset 952 --previous 951",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-d", "--dataset", required=True, help="source dataset id or name (its split defines the roles)")
    p.add_argument("-m", "--models", nargs="+", required=True, help="trained model folders "
                   "(<trainer>__<plans>__<configuration>) of the source dataset or of an earlier round")
    p.add_argument("-f", "--folds", nargs="+", default=["0"], help="folds of each model folder (default: 0)")
    p.add_argument("--out-dataset", type=int, required=True, help="id of the student dataset to write (new)")
    p.add_argument("--out-name", help="its name (default: <source name>PseudoR)")
    p.add_argument("--split-fold", type=int, default=0, help="fold of the source's splits_final.json whose "
                   "train / val / unlabeled lists are used (default 0)")
    p.add_argument("--previous", help="the previous round's student dataset: pseudo labels are also scored "
                   "against its (stability)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD,
                   help="keep cases whose score (mean organ Dice between members, and against the previous round) "
                        "is at least this (default %(default)s)")
    g.add_argument("--keep", type=float, help="keep the best fraction of cases instead (0 < keep <= 1)")
    p.add_argument("-chk", "--checkpoint", default="checkpoint_final.pth")
    p.add_argument("-device", default="cuda", choices=("cpu", "cuda"),
                   help="where the teachers predict (default cuda, as nnUNetv2_predict; cpu on a machine without one)")
    p.add_argument("--student-folds", type=int, default=1, help="identical folds in the student's split, one per "
                   "student run (default 1)")
    p.add_argument("-np", "--num-processes", type=int, default=1, help="preprocessing processes (default 1)")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier round written to --out-dataset")
    p.add_argument("--no-preprocess", action="store_true", help="write the student's raw and plans, do not "
                   "preprocess it (run nnUNetv2_preprocess later)")
    p.add_argument("--student-unlabeled", action="store_true", help="for an SKCDF student: the cases not kept "
                   "become the student's unlabelled images (imagesUnlabeled, the split's 'unlabeled' list, "
                   "preprocessed), so that -tr SKCDFTrainer also learns from the images the filter dropped")
    return p


def pseudolabel_entry(argv: Optional[Sequence[str]] = None) -> None:
    args = _parser().parse_args(argv)
    with exit_on_input_error():
        run_round(args.dataset, args.models, args.folds, args.out_dataset, args.out_name, args.split_fold,
                  args.previous, args.threshold, args.keep, args.checkpoint, args.device, args.student_folds,
                  args.num_processes, args.overwrite, not args.no_preprocess, args.student_unlabeled,
                  log=lambda m: print(m, file=sys.stdout, flush=True))


if __name__ == "__main__":
    pseudolabel_entry()
