"""Where a dataset's files are, read the nnU-Net way (env vars, ``DatasetNNN_Name``, channel naming).

Every function raises ``SKCDFInputError`` with a message that names the file or folder and says how
to fix it; console entry points print that message instead of a traceback.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Callable, Dict, List, Optional, Union

import numpy as np
from batchgenerators.utilities.file_and_folder_operations import isdir, join

#: Folder inside ``nnUNet_raw/DatasetNNN_X`` that holds unlabelled images (stock nnU-Net ignores it).
UNLABELED_IMAGES_FOLDER = "imagesUnlabeled"


class SKCDFInputError(ValueError):
    """Bad user input (files, ids, options). The message names the culprit and the fix."""


class SKCDFWriteError(SKCDFInputError):
    """A file or folder could not be written (full disk, no permission, ...). The message names the path, the OS
    error and the free space on that disk (``utilities.io.write_error_message``); the ``OSError`` is the
    ``__cause__``. A ``SKCDFInputError``, so that console scripts print it like any other refusal."""


@contextmanager
def exit_on_input_error():
    """For console scripts: a ``SKCDFInputError`` prints ``ERROR: <message>`` to stderr and exits with status 2
    (the message already says what to fix; a traceback would only hide it)."""
    try:
        yield
    except SKCDFInputError as e:
        print(f"ERROR: {e}", file=sys.stderr)
        sys.exit(2)


@contextmanager
def refusal_first(who: str, log: Optional[Callable[[str], None]] = None):
    """For refusals inside a command whose entry point is not ours (``nnUNetv2_train``), which ends in a long
    traceback: a ``SKCDFInputError`` is printed to stderr as ``ERROR: <who> refused to start: <message>`` *before* it
    propagates (type unchanged), so it is the first thing a user reads; ``log`` (e.g. the trainer's log file) gets the
    same line."""
    try:
        yield
    except SKCDFInputError as e:
        line = f"ERROR: {who} refused to start: {e}"
        print(f"{line}\n(the {type(e).__name__} traceback below ends in the same message)", file=sys.stderr,
              flush=True)
        if log is not None:
            try:
                log(line)
            except Exception:  # noqa: BLE001 - a failing log must not replace the refusal
                pass
        raise


def plain(value):
    """``value`` for a message: numpy scalars and arrays become Python numbers and lists (numpy 2 prints
    ``np.float64(0.7)`` inside lists and tuples), floats are rounded to 6 significant digits (a spacing of 0.7 stored
    as float32 is 0.699999988) and -0.0 becomes 0.0. Containers keep their type."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(f"{float(value):.6g}") + 0.0
    if isinstance(value, np.ndarray):
        return plain(value.tolist())
    if isinstance(value, (list, tuple)):
        return type(value)(plain(v) for v in value)
    if isinstance(value, dict):
        return {plain(k): plain(v) for k, v in value.items()}
    return value


def format_numbers(values) -> str:
    """``(1, 0, -0.5)``: a geometry vector for a message, integers without ``.0``."""
    return "(" + ", ".join(f"{plain(float(v)):.6g}" for v in np.ravel(values)) + ")"


def _env_folder(var: str) -> str:
    value = os.environ.get(var)
    if not value:
        raise SKCDFInputError(
            f"The environment variable {var} is not set. nnU-Net and nnunetv2_skcdf find datasets through "
            f"nnUNet_raw, nnUNet_preprocessed and nnUNet_results, e.g.\n"
            f"  export {var}=/data/{var}\n(see README.md, section 'Where the data lives')."
        )
    return value


def dataset_name(dataset: Union[int, str]) -> str:
    """``3`` / ``'3'`` / ``'Dataset003_X'`` -> ``'Dataset003_X'`` using nnU-Net's own lookup."""
    from nnunetv2.utilities.dataset_name_id_conversion import maybe_convert_to_dataset_name

    try:
        return maybe_convert_to_dataset_name(dataset)
    except (RuntimeError, ValueError) as e:
        raise SKCDFInputError(f"Unknown dataset {dataset!r}: {e}") from None


def raw_dataset_folder(dataset: Union[int, str]) -> str:
    folder = join(_env_folder("nnUNet_raw"), dataset_name(dataset))
    if not isdir(folder):
        raise SKCDFInputError(f"Raw dataset folder {folder} does not exist (check nnUNet_raw).")
    return folder


def preprocessed_dataset_folder(dataset: Union[int, str], must_exist: bool = True) -> str:
    folder = join(_env_folder("nnUNet_preprocessed"), dataset_name(dataset))
    if must_exist and not isdir(folder):
        raise SKCDFInputError(
            f"Preprocessed dataset folder {folder} does not exist. Run "
            f"'nnUNetv2_plan_and_preprocess -d {dataset}' first."
        )
    return folder


def load_dataset_json(raw_folder: str) -> dict:
    """``raw_folder/dataset.json``, checked: valid JSON with the keys every command here reads."""
    return load_checked_dataset_json(join(raw_folder, "dataset.json"))


def load_checked_dataset_json(path: str, need_channels: bool = True) -> dict:
    """A dataset.json read and checked (JSON syntax, ``labels`` with a background, ``file_ending``, the channels
    unless ``need_channels`` is False), so that a hand-written file with a typo is named with its fault instead of failing later as a
    ``KeyError`` deep inside a command."""
    from nnunetv2_skcdf.utilities.io import read_json  # io imports this module

    if not os.path.isfile(path):
        raise SKCDFInputError(f"{path} is missing: every nnU-Net raw dataset needs a dataset.json.")
    dataset_json = read_json(path, "Fix the file (a trailing comma or a missing quote is the usual cause of "
                                   "invalid JSON).")
    if not isinstance(dataset_json, dict):
        raise SKCDFInputError(f"{path}: holds a {type(dataset_json).__name__}, not the object nnU-Net's "
                              f"dataset.json is (keys channel_names, labels, numTraining, file_ending).")
    missing = [key for key in ("labels", "file_ending") if key not in dataset_json]
    if need_channels and "channel_names" not in dataset_json and "modality" not in dataset_json:
        missing.append("channel_names")
    if missing:
        raise SKCDFInputError(f"{path} lacks {', '.join(repr(k) for k in missing)}: nnU-Net v2's dataset.json needs "
                              f"channel_names, labels, numTraining and file_ending (e.g. \"file_ending\": "
                              f"\".nii.gz\"; nnU-Net's documentation/dataset_format.md).")
    if not isinstance(dataset_json["labels"], dict) or "background" not in dataset_json["labels"]:
        raise SKCDFInputError(f"{path}: 'labels' must map names to values and include \"background\": 0 (nnU-Net's "
                              f"dataset format).")
    return dataset_json


def datasets_with_id(root: str, dataset_id: int, folder_name: str) -> List[str]:
    """The dataset folders in ``root`` other than ``folder_name`` that have the id ``dataset_id``, sorted (none
    when ``root`` is not a folder)."""
    prefix = f"Dataset{int(dataset_id):03d}_"
    if not isdir(root):
        return []
    return sorted(d for d in os.listdir(root) if d.startswith(prefix) and d != folder_name)


def check_dataset_ids_free(dataset_id: int, folder_name: str) -> None:
    """Refuse a new dataset ``folder_name`` whose id another dataset already has in ``nnUNet_preprocessed`` or
    ``nnUNet_results`` (the variables that are set): nnU-Net's lookup of that id would then find two names and
    fail in every later command (``nnUNet_raw`` is checked by the caller, which creates the raw folder)."""
    for var in ("nnUNet_preprocessed", "nnUNet_results"):
        root = os.environ.get(var)
        others = datasets_with_id(root, dataset_id, folder_name) if root else []
        if others:
            raise SKCDFInputError(
                f"Dataset id {int(dataset_id)} is already used by {join(root, others[0])} ({var}): nnU-Net's lookup "
                f"of that id would find two datasets. Pick another id, or remove that folder if its dataset is "
                f"gone.")


def num_channels(dataset_json: dict) -> int:
    key = "channel_names" if "channel_names" in dataset_json else "modality"
    return len(dataset_json[key])


def training_case_ids(raw_folder: str, dataset_json: dict) -> List[str]:
    """Identifiers of the labelled training cases (``imagesTr`` or the ``dataset`` key), sorted."""
    return sorted(training_files(raw_folder, dataset_json).keys())


def training_files(raw_folder: str, dataset_json: dict) -> dict:
    """nnU-Net's listing of the labelled training cases, ``{case: {"images": [...], "label": path}}``, with a
    message instead of a ``FileNotFoundError`` when ``imagesTr`` is missing."""
    from nnunetv2.utilities.utils import get_filenames_of_train_images_and_targets

    if "dataset" not in dataset_json and not isdir(join(raw_folder, "imagesTr")):
        raise SKCDFInputError(f"{join(raw_folder, 'imagesTr')} does not exist: an nnU-Net raw dataset keeps its "
                              f"training images there (or lists them under 'dataset' in dataset.json).")
    return get_filenames_of_train_images_and_targets(raw_folder, dict(dataset_json))


_CHANNEL_RE = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


def list_unlabeled_cases(raw_folder: str, dataset_json: dict) -> Dict[str, List[str]]:
    """Map case id -> channel files (sorted by channel) of ``raw_folder/imagesUnlabeled``.

    Returns ``{}`` when the folder does not exist. Every file must be ``<case>_<XXXX><file_ending>``
    and every case must have exactly the channels of dataset.json; anything else raises
    ``SKCDFInputError`` naming the file.
    """
    folder = join(raw_folder, UNLABELED_IMAGES_FOLDER)
    if not isdir(folder):
        return {}
    ending = dataset_json["file_ending"]
    n_channels = num_channels(dataset_json)
    cases: Dict[str, Dict[int, str]] = {}
    for fname in sorted(os.listdir(folder)):
        path = join(folder, fname)
        if fname.startswith(".") or os.path.isdir(path):
            continue
        if not fname.endswith(ending):
            raise SKCDFInputError(
                f"{path}: wrong file ending. dataset.json says file_ending={ending!r}; convert the image "
                f"to that format or remove it from {UNLABELED_IMAGES_FOLDER}/."
            )
        m = _CHANNEL_RE.match(fname[: -len(ending)])
        if m is None:
            raise SKCDFInputError(
                f"{path}: name does not follow nnU-Net's channel naming <case>_<XXXX>{ending} "
                f"(e.g. case_0000{ending}). Rename it."
            )
        cases.setdefault(m["case"], {})[int(m["channel"])] = path
    result = {}
    for case, channels in cases.items():
        expected = list(range(n_channels))
        if sorted(channels) != expected:
            found = ", ".join(f"_{c:04d}" for c in sorted(channels))
            want = ", ".join(f"_{c:04d}" for c in expected)
            raise SKCDFInputError(
                f"Unlabelled case {case!r} in {folder}: found channels [{found}], dataset.json "
                f"(channel_names) expects [{want}]. Add or remove channel files so they match."
            )
        result[case] = [channels[c] for c in expected]
    return result
