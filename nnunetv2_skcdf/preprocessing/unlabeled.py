"""Preprocess ``imagesUnlabeled`` with the dataset's own plans and nnU-Net's own preprocessor.

Output: ``nnUNet_preprocessed/DatasetNNN_X/<data_identifier>_unlabeled/`` (e.g.
``nnUNetPlans_3d_fullres_unlabeled``) in nnU-Net's on-disk format (``<case>.b2nd``,
``<case>_seg.b2nd``, ``<case>.pkl``), next to the labelled ``<data_identifier>/`` folder. The
``_seg`` file of an unlabelled case is what nnU-Net writes for any case without a label: the
non-zero crop mask (-1 outside the body crop, 0 inside), never a segmentation.

Resampling, cropping and normalisation are nnU-Net's (``configuration_manager.preprocessor_class``
``.run_case_npy``), so an unlabelled image is preprocessed bit-for-bit like the same image would be
as a labelled case (tested). Configurations that share a ``data_identifier`` (e.g. a small CPU
configuration that inherits ``3d_fullres``) share the folder, exactly like nnU-Net's own data.

Checks: besides nnU-Net's own, every file must be complete, one scalar image, free of NaN/inf (NIfTI: read
with nibabel, as SimpleITK reads NaN as 0), 2D/3D and oriented like the training images (``image_checks``); the
channels of a case must share one grid. Any failure of one case, also an unexpected exception, becomes a message
naming its file(s); the other cases are still saved.

Crash safety: each case is written under temporary names (unique per process) and renamed; the ``.pkl`` is
renamed last and marks the case complete. Leftovers of an interrupted run (temporary files, data without
``.pkl``) are removed at the next start, so no half-written case is ever used. ``--overwrite`` builds the new
folder aside and swaps it in at the end, only when every case succeeded, so a failure or an interruption leaves the
old folder as it was (or the new one, never a mix); the swapped-in folder holds only what this command wrote.
One run at a time writes a folder (a lock next to it; a second run waits), and pool workers end with their
parent, even when it is killed. Configurations that share a ``data_identifier`` are preprocessed once per run.

Full disk: a failed write (any OS error, or blosc2's ``RuntimeError``) removes the case's temporary files and is
reported as a write failure with the path and the free space on its disk (``SKCDFWriteError``), never blamed on the
image. Sub-folders of the output folder are not this command's: the cleanup of leftovers skips them, and one named
like a file a case needs (``<case>.b2nd``, ``<case>_seg.b2nd``, ``<case>.pkl``) is refused before anything is written.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import join, load_json

from nnunetv2_skcdf.preprocessing.image_checks import (  # noqa: F401 - check_file_complete: also imported from here
    Orientation,
    check_file_complete,
    check_finite_on_disk,
    check_one_image_per_file,
    check_orientation,
    read_header,
    reader_reorients,
    training_orientations,
)
from nnunetv2_skcdf.utilities.dataset_files import (
    SKCDFInputError,
    SKCDFWriteError,
    UNLABELED_IMAGES_FOLDER,
    dataset_name,
    exit_on_input_error,
    format_numbers,
    list_unlabeled_cases,
    load_dataset_json,
    plain,
    preprocessed_dataset_folder,
    raw_dataset_folder,
    training_case_ids,
)
from nnunetv2_skcdf.utilities.io import (
    atomic_save_json,
    folder_lock,
    new_staging_folder,
    recover_folder_swap,
    swap_in_folder,
    write_error_message,
)
from nnunetv2_skcdf.utilities.parallel import imap_with_progress

#: suffix of the unlabelled folder next to nnU-Net's ``<data_identifier>`` folder
UNLABELED_SUFFIX = "_unlabeled"
#: metadata file in the unlabelled folder: which plans produced it (see ``plans_fingerprint``)
METADATA_FILE = "skcdf_unlabeled.json"
#: the files of one case, in the order they are renamed into place (``.pkl`` last: it marks the case complete)
CASE_FILE_ENDINGS = (".b2nd", "_seg.b2nd", ".pkl")
_TMP_PREFIX = ".tmp_"


def unlabeled_folder_name(data_identifier: str) -> str:
    return data_identifier + UNLABELED_SUFFIX


class TrainingImages(NamedTuple):
    """What unlabelled images must share with the labelled ones (read once, passed to every worker)."""
    is_2d: bool
    #: orientation code -> an example training image; ``None`` when the plans' reader reorients every image
    orientations: Optional[Dict[str, Orientation]]


def plans_fingerprint_inputs(plans: dict, configuration_name: str, dataset_json: dict) -> dict:
    """Everything that determines a preprocessed image (not the patch or network), JSON-ready.

    If any of it changes (new spacing, normalisation, intensity statistics), the unlabelled data on disk no longer
    matches the labelled data and must be redone. A configuration that inherits another's data
    (``inherits_from``, same ``data_identifier``) gets the inherited values, so it is compared like its parent.
    """
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration_name)
    relevant = {
        "data_identifier": cm.data_identifier,
        "preprocessor": cm.preprocessor_name,
        "spacing": list(cm.spacing),
        "normalization_schemes": list(cm.normalization_schemes),
        "use_mask_for_norm": list(cm.use_mask_for_norm),
        "resampling_fn_data": cm.configuration.get("resampling_fn_data"),
        "resampling_fn_data_kwargs": cm.configuration.get("resampling_fn_data_kwargs"),
        "transpose_forward": list(pm.transpose_forward),
        "intensity": pm.foreground_intensity_properties_per_channel,
        "reader": plans.get("image_reader_writer"),
        "channel_names": dataset_json.get("channel_names", dataset_json.get("modality")),
    }
    return json.loads(json.dumps(relevant, sort_keys=True, default=str))


def plans_fingerprint(plans: dict, configuration_name: str, dataset_json: dict) -> str:
    """Short hash of ``plans_fingerprint_inputs`` (stored in ``skcdf_unlabeled.json``)."""
    relevant = plans_fingerprint_inputs(plans, configuration_name, dataset_json)
    return hashlib.sha256(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:16]


def describe_plans_change(old: Optional[dict], new: dict) -> str:
    """``spacing [3.0, 1.5, 1.5] -> [2.0, 1.5, 1.5]; intensity`` (long values by name only); ``''`` without the old
    inputs (metadata written before they were stored)."""
    if not old:
        return ""
    changes = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a != b:
            shown = f"{key} {plain(a)} -> {plain(b)}"
            changes.append(shown if len(shown) <= 120 else key)
    return "; ".join(changes)


def check_unlabeled_folder_is_current(folder: str, plans: dict, configuration: str, dataset_json: dict) -> None:
    """Refuse unlabelled data made with other plans than ``configuration`` has now (trainer start).

    Changing the plans and rerunning ``nnUNetv2_preprocess`` without ``skcdf_preprocess_unlabeled`` would otherwise
    train on labelled patches at the new spacing (normalisation, ...) and unlabelled ones at the old.
    """
    plans_identifier, dataset = plans.get("plans_name", "nnUNetPlans"), plans.get("dataset_name", "<dataset>")
    fix = f"skcdf_preprocess_unlabeled -d {dataset} -c {configuration} -p {plans_identifier} --overwrite"
    meta_file = join(folder, METADATA_FILE)
    if not os.path.isfile(meta_file):
        raise SKCDFInputError(f"{folder}: no {METADATA_FILE}, so nothing says which plans its unlabelled images were "
                              f"preprocessed with. Redo them: {fix}")
    meta = load_json(meta_file)
    fingerprint = plans_fingerprint(plans, configuration, dataset_json)
    if meta.get("plans_fingerprint") == fingerprint:
        return
    change = describe_plans_change(meta.get("fingerprint_inputs"),
                                   plans_fingerprint_inputs(plans, configuration, dataset_json)) or \
        f"plans fingerprint {meta.get('plans_fingerprint')} -> {fingerprint}"
    raise SKCDFInputError(
        f"{folder}: unlabelled images preprocessed with other plans than configuration {configuration!r} of "
        f"{plans_identifier} uses now ({change}; they were made for configuration {meta.get('configuration')!r}). "
        f"Training would mix labelled patches preprocessed with the new plans and unlabelled ones with the old. "
        f"Redo the unlabelled images: {fix}")


# ----------------------------------------------------------------------------------------------
# reading one case, with the checks nnU-Net's reader only prints about
# ----------------------------------------------------------------------------------------------
def read_unlabeled_case(reader, files: Sequence[str],
                        orientations: Optional[Dict[str, Orientation]] = None) -> Tuple[np.ndarray, dict]:
    """Read the channel files of one case -> (data (c, x, y, z) float32, properties).

    Each channel is read on its own so that a bad file is named. Before reading: complete file, one scalar image
    per file, no NaN/inf on disk, and (``orientations``: the training images', see ``describe_training_images``)
    oriented like the training images (``image_checks``). Channels must agree in shape and spacing (as nnU-Net
    requires), and in origin and direction (nnU-Net only warns; without a label to check the overlap against, a
    misaligned channel would silently corrupt training).
    """
    arrays, props = [], []
    for f in files:
        check_file_complete(f)
        header = read_header(f)
        check_one_image_per_file(f, header)
        check_finite_on_disk(f)
        check_orientation(f, header, orientations)
        try:
            arr, p = reader.read_images([f])
        except Exception as e:  # noqa: BLE001 - any reader failure means the same thing to the user
            raise SKCDFInputError(
                f"{f}: cannot be read ({type(e).__name__}: {e}). The file is truncated or not a valid image; "
                f"re-export it or remove the case from {UNLABELED_IMAGES_FOLDER}/."
            ) from None
        if arr.shape[0] != 1:  # readers whose header SimpleITK cannot read
            raise SKCDFInputError(f"{f}: holds {arr.shape[0]} images (array shape {arr.shape}); nnU-Net reads one "
                                  f"image per channel file. Save one file per channel or keep the volume you mean.")
        if not np.all(np.isfinite(arr)):
            raise SKCDFInputError(f"{f}: contains NaN or infinite intensities. Fix the image or remove the case.")
        arrays.append(arr)
        props.append(p)
    ref_file, ref_arr, ref_props = files[0], arrays[0], props[0]
    for f, arr, p in zip(files[1:], arrays[1:], props[1:]):
        _check_same_geometry(ref_file, ref_arr, ref_props, f, arr, p)
    return np.vstack(arrays).astype(np.float32, copy=False), ref_props


def _check_same_geometry(ref_file, ref_arr, ref_props, f, arr, p) -> None:
    problems = []
    if arr.shape[1:] != ref_arr.shape[1:]:
        problems.append(f"shape {arr.shape[1:]} vs {ref_arr.shape[1:]}")
    if not np.allclose(p["spacing"], ref_props["spacing"], rtol=1e-5, atol=1e-6):
        problems.append(f"spacing {plain(list(p['spacing']))} vs {plain(list(ref_props['spacing']))}")
    for key in ("origin", "direction"):
        a, b = p.get("sitk_stuff", {}).get(key), ref_props.get("sitk_stuff", {}).get(key)
        if a is not None and b is not None and not np.allclose(a, b, atol=1e-3):
            problems.append(f"{key} {format_numbers(a)} vs {format_numbers(b)}")
    if problems:
        raise SKCDFInputError(
            f"{f}: geometry does not match the first channel {os.path.basename(ref_file)} ("
            + "; ".join(problems) + "). All channels of a case must share one grid: resample them onto the "
            "first channel's grid."
        )


def check_dimensionality(data: np.ndarray, expect_2d: bool, files: Sequence[str]) -> None:
    """nnU-Net reads 2D images as (c, 1, x, y): an unlabelled case must be 2D/3D like the labelled ones. A 3D file
    with a single slice is read like a 2D image; the message says which it is."""
    is_2d = data.shape[1] == 1
    if is_2d != expect_2d:
        kind, want = ("2D", "3D") if is_2d else ("3D", "2D")
        header = read_header(files[0]) if is_2d else None
        if header is not None and len(header.size) >= 3:  # a 3D file, one slice thick
            size = ", ".join(map(str, header.size[:3]))
            what = f"is a 3D image with a single slice (size x, y, z = {size}), which nnU-Net reads as 2D,"
        else:
            what = f"is a {kind} image"
        raise SKCDFInputError(
            f"{files[0]}: {what} but the labelled images of this dataset (imagesTr) are {want}. "
            f"Unlabelled images must have the dimensionality of the labelled ones."
        )


# ----------------------------------------------------------------------------------------------
# one case: preprocess + crash-safe save (runs in worker processes)
# ----------------------------------------------------------------------------------------------
def preprocess_and_save_case(case_id: str, files: List[str], output_folder: str, plans: dict,
                             configuration_name: str, dataset_json: dict, training: TrainingImages) -> str:
    """Preprocess one unlabelled case and write it to ``output_folder``; return ``case_id``."""
    from nnunetv2.training.dataloading.nnunet_dataset import comp_blosc2_params, nnUNetDatasetBlosc2
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration_name)
    data, properties = read_unlabeled_case(pm.image_reader_writer_class(), files, training.orientations)
    check_dimensionality(data, training.is_2d, files)
    preprocessor = cm.preprocessor_class(verbose=False)
    data, seg, properties = preprocessor.run_case_npy(data, None, properties, pm, cm, dataset_json)
    data = data.astype(np.float32, copy=False)
    seg = seg.astype(np.int16, copy=False)
    blocks, chunks = comp_blosc2_params(data.shape, tuple(cm.patch_size), data.itemsize)
    blocks_seg, chunks_seg = comp_blosc2_params(seg.shape, tuple(cm.patch_size), seg.itemsize)
    tmp = join(output_folder, f"{_TMP_PREFIX}{os.getpid()}_{case_id}")  # unique per process: never two writers
    final = join(output_folder, case_id)
    try:
        nnUNetDatasetBlosc2.save_case(data, seg, properties, tmp, chunks=chunks, blocks=blocks,
                                      chunks_seg=chunks_seg, blocks_seg=blocks_seg)
        for ending in CASE_FILE_ENDINGS:  # .pkl last: it marks the case complete
            os.replace(tmp + ending, final + ending)
    except BaseException as e:
        for ending in CASE_FILE_ENDINGS:  # no temporary file survives (a full disk keeps no half-written case)
            if os.path.isfile(tmp + ending):
                os.remove(tmp + ending)
        if isinstance(e, Exception):  # the image was fine, the write failed: say so, with the disk's free space
            raise SKCDFWriteError(write_error_message(final, e)) from e
        raise
    return case_id


def _worker(args) -> Tuple[str, Optional[str]]:
    """``(case_id, None)`` or ``(case_id, message)``: every failure of one case becomes a message naming its files,
    so that one bad case neither aborts the pool nor costs the other cases of the run."""
    case_id, files = args[0], args[1]
    try:
        return preprocess_and_save_case(*args), None
    except SKCDFInputError as e:
        return case_id, str(e)
    except Exception as e:  # noqa: BLE001 - whatever nnU-Net raises for a strange image, the user needs the file
        return case_id, (f"{', '.join(files)}: preprocessing failed ({type(e).__name__}: {e}). Check the image "
                         f"(open it in a viewer, compare its header with the imagesTr images), fix it or remove the "
                         f"case from {UNLABELED_IMAGES_FOLDER}/.")


def case_is_complete(output_folder: str, case_id: str) -> bool:
    return all(os.path.isfile(join(output_folder, case_id + e)) for e in CASE_FILE_ENDINGS)


def remove_incomplete_cases(output_folder: str) -> List[str]:
    """Delete temporary files and cases without their ``.pkl`` (an interrupted earlier run). Only files: sub-folders
    are not written by this command, so they are left alone, whatever their name (``check_no_folder_in_the_way``)."""
    removed = []
    for fname in os.listdir(output_folder):
        path = join(output_folder, fname)
        if not os.path.isfile(path) or os.path.islink(path):
            continue
        if fname.startswith(_TMP_PREFIX):
            os.remove(path)
            removed.append(fname)
        elif fname.endswith(".b2nd"):
            case = fname[: -len("_seg.b2nd")] if fname.endswith("_seg.b2nd") else fname[: -len(".b2nd")]
            if not os.path.isfile(join(output_folder, case + ".pkl")):
                os.remove(path)
                removed.append(fname)
    return removed


def check_no_folder_in_the_way(output_folder: str, case_ids: Sequence[str]) -> None:
    """Refuse sub-folders named like a file this run must write (``<case>.b2nd``, ``<case>_seg.b2nd``,
    ``<case>.pkl``): the case could not be saved. Other sub-folders are left alone."""
    blocked = [(c, join(output_folder, c + e)) for c in case_ids for e in CASE_FILE_ENDINGS
               if os.path.isdir(join(output_folder, c + e))]
    if blocked:
        (case, path), more = blocked[0], [os.path.basename(p) for _, p in blocked[1:]]
        raise SKCDFInputError(
            f"{path}: is a folder, but skcdf_preprocess_unlabeled must write a file of unlabelled case {case!r} under "
            "this name" + (f" (also in the way: {', '.join(more)})" if more else "") + ". Move or rename the "
            "folder (this folder holds what skcdf_preprocess_unlabeled writes; --overwrite replaces it as a whole), "
            "then rerun.")


# ----------------------------------------------------------------------------------------------
# the whole folder
# ----------------------------------------------------------------------------------------------
def _prepare_output_folder(folder: str, meta: dict) -> None:
    """Create ``folder``, or check that its cases were made with these plans; write the metadata (``meta`` with its
    fingerprint); drop leftovers of an interrupted run. Called holding ``folder_lock``."""
    meta_file = join(folder, METADATA_FILE)
    os.makedirs(folder, exist_ok=True)
    if os.path.isfile(meta_file):
        old = load_json(meta_file)
        if old.get("plans_fingerprint") != meta["plans_fingerprint"]:
            change = describe_plans_change(old.get("fingerprint_inputs"), meta["fingerprint_inputs"]) or \
                f"fingerprint {old.get('plans_fingerprint')} != {meta['plans_fingerprint']}"
            raise SKCDFInputError(
                f"{folder} was preprocessed with different plans ({change}; it was made with "
                f"{old.get('plans_identifier')}, configuration {old.get('configuration')}). The labelled data was "
                f"re-planned since; rerun with --overwrite."
            )
    atomic_save_json(meta, meta_file)
    remove_incomplete_cases(folder)


def describe_training_images(raw_folder: str, dataset_json: dict, plans: dict) -> TrainingImages:
    """Read the first training image once (nnU-Net's readers return 2D images as (c, 1, x, y)) and the headers of
    every training image's first channel (their orientations)."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    cases = get_filenames_of_train_images_and_targets(raw_folder, dict(dataset_json))
    reader_class = PlansManager(plans).image_reader_writer_class
    data, _ = reader_class().read_images(next(iter(cases.values()))["images"][:1])
    orientations = None if reader_reorients(reader_class) else \
        training_orientations(cases[c]["images"][0] for c in sorted(cases))
    return TrainingImages(data.shape[1] == 1, orientations)


def preprocess_unlabeled(dataset, configurations: Sequence[str], plans_identifier: str = "nnUNetPlans",
                         num_processes: int = 2, overwrite: bool = False, verbose: bool = True) -> Dict[str, str]:
    """Preprocess every case of ``imagesUnlabeled`` for each configuration.

    Returns {configuration: output folder}. Cases already complete are skipped unless ``overwrite``.
    All bad cases are reported together in one ``SKCDFInputError`` (the good ones are kept).
    """
    name = dataset_name(dataset)
    raw = raw_dataset_folder(name)
    pre = preprocessed_dataset_folder(name)
    plans_file = join(pre, plans_identifier + ".json")
    if not os.path.isfile(plans_file):
        raise SKCDFInputError(f"Plans file {plans_file} not found. Run 'nnUNetv2_plan_and_preprocess -d "
                              f"{dataset}' first (or pass the right -p).")
    plans = load_json(plans_file)
    # nnU-Net preprocesses with the copy of dataset.json in the preprocessed folder; so do we
    dataset_json = load_json(join(pre, "dataset.json")) if os.path.isfile(join(pre, "dataset.json")) \
        else load_dataset_json(raw)
    cases = list_unlabeled_cases(raw, dataset_json)
    if not cases:
        raise SKCDFInputError(
            f"No unlabelled images found in {join(raw, UNLABELED_IMAGES_FOLDER)}. Put them there with nnU-Net's "
            f"channel naming (<case>_0000{dataset_json['file_ending']}, ...).")
    clash = sorted(set(cases) & set(training_case_ids(raw, dataset_json)))
    if clash:
        raise SKCDFInputError(f"Unlabelled case ids {clash} in {UNLABELED_IMAGES_FOLDER}/ are also training case ids "
                              f"in imagesTr/. Case ids must be unique: rename the unlabelled files.")
    writers = configurations_per_folder(plans, plans_identifier, configurations, dataset_json, pre)
    training = describe_training_images(raw, dataset_json, plans)
    outputs = {}
    for configuration in dict.fromkeys(configurations):
        writer = writers[configuration]
        if writer != configuration:  # shares its data (and so its unlabelled folder) with an earlier configuration
            outputs[configuration] = outputs[writer]
            if verbose:
                print(f"{configuration}: same data_identifier as {writer}, so the same unlabelled folder "
                      f"{outputs[writer]} (done once)")
            continue
        outputs[configuration] = _preprocess_configuration(
            cases, plans, plans_identifier, configuration, dataset_json, pre, training, num_processes, overwrite,
            verbose)
    return outputs


def configurations_per_folder(plans: dict, plans_identifier: str, configurations: Sequence[str], dataset_json: dict,
                              pre: str) -> Dict[str, str]:
    """configuration -> the configuration that writes its unlabelled folder: the first of those sharing its
    ``data_identifier`` (e.g. a CPU configuration that inherits ``3d_fullres``), so that a folder is preprocessed once
    per run. Configurations that share a folder but would preprocess differently (spacing, normalisation, ...) are
    refused before anything is written: whichever ran last would decide what the other one trains on."""
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    writers: Dict[str, str] = {}
    first: Dict[str, str] = {}  # data_identifier -> first configuration
    for configuration in configurations:
        if configuration not in plans["configurations"]:
            raise SKCDFInputError(f"Configuration {configuration!r} is not in plans {plans_identifier} "
                                  f"(available: {', '.join(plans['configurations'])}).")
        data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
        writer = first.setdefault(data_identifier, configuration)
        writers[configuration] = writer
        if writer == configuration:
            continue
        a = plans_fingerprint_inputs(plans, writer, dataset_json)
        b = plans_fingerprint_inputs(plans, configuration, dataset_json)
        if a != b:
            raise SKCDFInputError(
                f"Configurations {writer!r} and {configuration!r} of {join(pre, plans_identifier + '.json')} share "
                f"the data folder {data_identifier} (and so {unlabeled_folder_name(data_identifier)}/) but preprocess "
                f"differently ({describe_plans_change(a, b)}). One folder cannot hold both: give one of them its own "
                f"data_identifier in the plans (and rerun nnUNetv2_preprocess for it), or preprocess one "
                f"configuration per run.")
    return writers


def _preprocess_configuration(cases: Dict[str, List[str]], plans: dict, plans_identifier: str, configuration: str,
                              dataset_json: dict, pre: str, training: TrainingImages, num_processes: int,
                              overwrite: bool, verbose: bool) -> str:
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    if configuration not in plans["configurations"]:
        raise SKCDFInputError(f"Configuration {configuration!r} is not in plans {plans_identifier} "
                              f"(available: {', '.join(plans['configurations'])}).")
    data_identifier = PlansManager(plans).get_configuration(configuration).data_identifier
    folder = join(pre, unlabeled_folder_name(data_identifier))
    meta = {"plans_identifier": plans_identifier, "configuration": configuration,
            "data_identifier": data_identifier,
            # what the fingerprint hashes, so that a refusal can say what changed
            "fingerprint_inputs": plans_fingerprint_inputs(plans, configuration, dataset_json),
            "plans_fingerprint": plans_fingerprint(plans, configuration, dataset_json)}
    kept = (f"--overwrite replaced nothing: {folder} is as it was (the staging folder with the new cases was "
            f"removed).")
    target = folder
    try:
        # one writer per folder: a second run waits here, then finds the cases done (or redoes them with --overwrite)
        with folder_lock(folder, "skcdf_preprocess_unlabeled"):
            recover_folder_swap(folder)
            # --overwrite builds the new folder aside and swaps it in at the end, and only when every case succeeded:
            # a failure or an interruption leaves the old folder as it was
            target = new_staging_folder(folder) if overwrite else folder
            try:
                _prepare_output_folder(target, meta)
                errors = _preprocess_cases(cases, target, plans, configuration, dataset_json, training,
                                           num_processes, verbose, shown_folder=folder)
                if overwrite and not errors:
                    swap_in_folder(target, folder)
            finally:
                if overwrite and os.path.isdir(target):  # not swapped in: the old folder stays as it was
                    shutil.rmtree(target, ignore_errors=True)
    except SKCDFInputError as e:
        if not overwrite:
            raise
        raise type(e)(f"{e} {kept}") from e
    except OSError as e:  # creating the staging folder, the lock, renaming: a full disk named as such
        raise SKCDFWriteError(write_error_message(e.filename or target, e)
                              + (" " + kept if overwrite else "")) from e
    if errors:
        head = (f"{len(errors)} of {len(cases)} unlabelled cases failed, so {kept}" if overwrite else
                f"{len(errors)} of {len(cases)} unlabelled cases failed (the others were saved):")
        raise SKCDFInputError(head + (" Fix or remove the cases below, then rerun with --overwrite:" if overwrite else
                                      "") + "\n" + "\n".join(f"  - {e}" for e in errors))
    return folder


def _preprocess_cases(cases: Dict[str, List[str]], folder: str, plans: dict, configuration: str, dataset_json: dict,
                      training: TrainingImages, num_processes: int, verbose: bool, shown_folder: str) -> List[str]:
    """Preprocess the cases not yet complete in ``folder``; return the error messages of the failed ones."""
    todo = [c for c in sorted(cases) if not case_is_complete(folder, c)]
    check_no_folder_in_the_way(folder, todo)
    if verbose:
        print(f"{configuration}: {len(cases)} unlabelled cases, {len(cases) - len(todo)} already done, "
              f"{len(todo)} to preprocess -> {shown_folder}")
    jobs = [(c, cases[c], folder, plans, configuration, dataset_json, training) for c in todo]
    return sorted(err for _, err in imap_with_progress(_worker, jobs, num_processes, f"Unlabelled {configuration}",
                                                       show=verbose) if err)


def preprocess_unlabeled_entry() -> None:
    parser = argparse.ArgumentParser(
        prog="skcdf_preprocess_unlabeled",
        description=(
            "Preprocess the unlabelled images of nnUNet_raw/DatasetNNN_X/imagesUnlabeled/ with the dataset's own "
            "plans and nnU-Net's own preprocessor (same resampling and normalisation as the labelled data). Output: "
            "nnUNet_preprocessed/DatasetNNN_X/<data_identifier>_unlabeled/, e.g. nnUNetPlans_3d_fullres_unlabeled/. "
            "Run it after nnUNetv2_plan_and_preprocess. Cases already done are skipped."),
        epilog="Example: skcdf_preprocess_unlabeled -d 950 -c 3d_fullres -np 2")
    parser.add_argument("-d", "--dataset", required=True, help="dataset id or name (e.g. 950 or Dataset950_X)")
    parser.add_argument("-c", "--configurations", nargs="+", default=["3d_fullres"],
                        help="configuration(s) of the plans to preprocess for (default: 3d_fullres)")
    parser.add_argument("-p", "--plans", default="nnUNetPlans", help="plans identifier (default: nnUNetPlans)")
    parser.add_argument("-np", "--num-processes", type=int, default=2, help="worker processes (default: 2)")
    parser.add_argument("--overwrite", action="store_true",
                        help="redo every case (needed after the plans changed). The new folder is built aside and "
                             "replaces <data_identifier>_unlabeled/ as a whole, only when every case succeeded: "
                             "files and folders you put into <data_identifier>_unlabeled/ yourself are deleted then")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args()
    with exit_on_input_error():
        preprocess_unlabeled(args.dataset, args.configurations, args.plans, args.num_processes, args.overwrite,
                             verbose=not args.quiet)
